#!/usr/bin/env bash
# IMAP session mix and POP3 download sessions, mailgrid against Dovecot (fed by Postfix over
# LMTP), in one run on this machine, on the same data: every user's INBOX preloaded by SMTP.
#
#   bench/compare-mailbox.sh [CLIENTS]        (default 10,50; needs root)
#
# Prints each system's `bench mailbox` summary lines, the peer's first.
set -euo pipefail
cd "$(dirname "$0")/.."
clients="${1:-10,50}"
peer="$(mktemp -d /tmp/mailgrid-peer.XXXXXX)"
trap 'bench/peer.sh stop "$peer" >/dev/null 2>&1 || true; rm -rf "$peer"' EXIT

cargo build --release -q -p mailgrid -p bench
bench/peer.sh start "$peer" >/dev/null
target="smtp=127.0.0.1:${PEER_SMTP_PORT:-2525},imaps=127.0.0.1:${PEER_IMAPS_PORT:-11993}"
target="$target,pop3s=127.0.0.1:${PEER_POP3S_PORT:-11995}"

echo "== Postfix -> LMTP -> Dovecot"
target/release/bench mailbox --target "$target" --clients "$clients" 2>&1 | grep -E "(sessions?|wake-ups).*clients|rror"
echo "== mailgrid, 3 nodes, RF 3"
target/release/bench mailbox --nodes 3 --partitions 64 --clients "$clients" 2>&1 |
    grep -E "(sessions?|wake-ups).*clients|rror"
