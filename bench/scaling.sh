#!/usr/bin/env bash
# Work per message as nodes are added: the same SMTP load against 3-, 5- and 7-node clusters
# (64 partitions, replication factor 3), and the CPU seconds of all node processes together
# per stored message, side by side with the ratio to 3 nodes; then each node's idle CPU.
#
#   bench/scaling.sh [MESSAGES] [SENDERS] [NODE COUNTS]     (defaults 3000, 32, "3 5 7")
#
# Results (bench smtp's JSON per size, and SVG plots by bench/plot.py) go to
# bench/results/scaling-<unix time>/.
# On a machine with fewer cores than nodes the nodes share cores, so msgs/s does not grow
# here; CPU per message is what tells whether adding nodes adds work per message.
set -euo pipefail
cd "$(dirname "$0")/.."
messages="${1:-3000}"
senders="${2:-32}"
counts="${3:-3 5 7}"
out="bench/results/scaling-$(date +%s)"
mkdir -p "$out"

cargo build --release -q -p mailgrid -p bench
for n in $counts; do
    target/release/bench smtp --nodes "$n" --partitions 64 --messages "$messages" \
        --sizes 4096 --concurrency "$senders" --idle-seconds 20 --out "$out/$n" >&2
done
python3 - "$out" $counts <<'PY'
import json, glob, sys
out, counts = sys.argv[1], sys.argv[2:]
rows = []
for n in counts:
    r = json.load(open(glob.glob(f"{out}/{n}/smtp-*.json")[0]))
    run = r["runs"][0]
    idle = r.get("idle_cpu_percent", [])
    rows.append((n, run["msgs_per_sec"], run["cpu_ms_per_msg"], max(idle) if idle else float("nan")))
base = rows[0][2]
print(f"{'nodes':>5} {'msgs/s':>8} {'CPU ms/msg':>11} {'ratio':>6} {'idle CPU/node (max)':>20}")
for n, rate, cpu, idle in rows:
    print(f"{n:>5} {rate:>8.0f} {cpu:>11.3f} {cpu / base:>6.2f} {idle:>19.2f}%")
PY
python3 bench/plot.py nodes "$out/nodes" "$out"/*/smtp-*.json
