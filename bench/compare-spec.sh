#!/usr/bin/env bash
# The SPECmail2001-style mix, Postfix -> LMTP -> Dovecot and then mailgrid (3 nodes, RF 3),
# in one run on this machine, with the same accounts, the same argon2id password hash, the
# same prefilled mailboxes (in mean) and the same load levels.
#
#   bench/compare-spec.sh [USERS [SECONDS [PREFILL]]]
#       USERS    comma-separated user counts (default 25000,50000,100000,150000)
#       SECONDS  seconds of arrivals per level (default 60)
#       PREFILL  mean messages per mailbox before the first level (default 0.25)
#
# Needs root (for the peer). Prints each system's level lines, the peer's first; the JSON
# of both runs goes to bench/results/spec-*.json, everything they printed to
# bench/results/compare-spec-*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
users="${1:-25000,50000,100000,150000}"
seconds="${2:-60}"
prefill="${3:-0.25}"
peer="$(mktemp -d /tmp/mailgrid-peer.XXXXXX)"
log="bench/results/compare-spec-$(date +%s).log"
mkdir -p bench/results
trap 'bench/peer.sh stop "$peer" >/dev/null 2>&1 || true; rm -rf "$peer"' EXIT

cargo build --release -q -p mailgrid -p bench
hash="$(target/release/bench hash bench)"
PEER_PASSWORD_HASH="$hash" bench/peer.sh start "$peer" >/dev/null
target="smtp=127.0.0.1:${PEER_SMTP_PORT:-2525},pop3s=127.0.0.1:${PEER_POP3S_PORT:-11995}"

echo "== Postfix -> LMTP -> Dovecot"
target/release/bench spec --target "$target" --users "$users" --seconds "$seconds" \
    --prefill "$prefill" 2>&1 | tee -a "$log" |
    grep -E "^([0-9]+ users|prefilled|settled|largest|no level|Error)"
bench/peer.sh stop "$peer" >/dev/null 2>&1 || true
echo "== mailgrid, 3 nodes, RF 3"
target/release/bench spec --nodes 3 --partitions 64 --users "$users" --seconds "$seconds" \
    --prefill "$prefill" --password-hash "$hash" 2>&1 | tee -a "$log" |
    grep -E "^([0-9]+ users|prefilled|settled|largest|no level|Error)"
