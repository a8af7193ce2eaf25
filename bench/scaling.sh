#!/usr/bin/env bash
# Work per message as nodes are added: the same SMTP load against 3-, 5- and 7-node clusters
# (64 partitions, replication factor 3), and the CPU seconds of all node processes together
# per stored message, side by side with the ratio to 3 nodes; then each node's idle CPU.
#
#   bench/scaling.sh [MESSAGES] [SENDERS] [NODE COUNTS] [ROUNDS]
#                                         (defaults 8000, 32, "3 5 7", 3)
#
# Each round starts a fresh cluster of every size in turn, so the sizes alternate and slow
# spells of a shared machine fall on all of them; the table gives each size's median over the
# rounds (and the spread), idle CPU from the first round. MAILGRID=path measures that binary.
# DIRECT=1 sends each message to its recipient's partition leader (bench smtp --direct), so no
# node forwards: compared with a default run, it tells forwarding's share of the work.
# RATE=R offers R msgs/s (bench smtp --rate) instead of as many as the senders can push: below
# saturation the nodes do not fight over the cores, so CPU per message is the work a message
# costs (every size then makes one fsync per replica write, with nothing to batch).
# Results (bench smtp's JSON per run, and SVG plots by bench/plot.py) go to
# bench/results/scaling-<unix time>/.
# On a machine with fewer cores than nodes the nodes share cores, so msgs/s does not grow
# here; CPU per message is what tells whether adding nodes adds work per message. Runs of a
# few seconds are too noisy for a 10% question: keep MESSAGES at 8000 or more.
set -euo pipefail
cd "$(dirname "$0")/.."
messages="${1:-8000}"
senders="${2:-32}"
counts="${3:-3 5 7}"
rounds="${4:-3}"
out="bench/results/scaling-$(date +%s)"
mkdir -p "$out"

cargo build --release -q -p mailgrid -p bench
binary=()
if [ -n "${MAILGRID:-}" ]; then binary=(--mailgrid "$MAILGRID"); fi
if [ -n "${DIRECT:-}" ]; then binary+=(--direct); fi
if [ -n "${RATE:-}" ]; then binary+=(--rate "$RATE"); fi
for round in $(seq 1 "$rounds"); do
    idle=0
    if [ "$round" = 1 ]; then idle=20; fi
    for n in $counts; do
        target/release/bench smtp --nodes "$n" --partitions 64 --messages "$messages" \
            --sizes 4096 --concurrency "$senders" --idle-seconds "$idle" "${binary[@]}" \
            --out "$out/$n/$round" >&2
    done
done
python3 - "$out" $counts <<'PY'
import json, glob, statistics, sys
out, counts = sys.argv[1], sys.argv[2:]
rows = []
for n in counts:
    runs, idle = [], []
    for f in sorted(glob.glob(f"{out}/{n}/*/smtp-*.json")):
        r = json.load(open(f))
        runs.append(r["runs"][0])
        idle += r.get("idle_cpu_percent", [])
    cpu = [r["cpu_ms_per_msg"] for r in runs]
    rate = statistics.median(r["msgs_per_sec"] for r in runs)
    rows.append((n, rate, statistics.median(cpu), min(cpu), max(cpu),
                 max(idle) if idle else float("nan")))
base = rows[0][2]
print(f"{'nodes':>5} {'msgs/s':>8} {'CPU ms/msg':>11} {'(min-max)':>13} {'ratio':>6} {'idle CPU/node (max)':>20}")
for n, rate, cpu, lo, hi, idle in rows:
    print(f"{n:>5} {rate:>8.0f} {cpu:>11.3f} {lo:>6.3f}-{hi:<6.3f} {cpu / base:>6.2f} {idle:>19.2f}%")
PY
python3 bench/plot.py nodes "$out/nodes" "$out"/*/*/smtp-*.json
