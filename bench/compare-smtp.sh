#!/usr/bin/env bash
# SMTP delivery, mailgrid against Postfix -> LMTP -> Dovecot, in one run on this machine.
#
#   bench/compare-smtp.sh [MESSAGES] [SENDERS]      (defaults 4000 and 32; needs root)
#
# Builds the release binaries, starts the peer (bench/peer.sh) and a 3-node mailgrid cluster
# with replication factor 3 (bench smtp), sends MESSAGES 4 KiB messages with SENDERS
# concurrent senders to each, and prints msgs/s side by side with the ratio. For the peer it
# reports two figures: how fast Postfix answers 250 (its queue file fsynced), and how fast
# the messages are stored in Dovecot's maildirs (counted until all have arrived) — the
# figure comparable to mailgrid's 250, which comes only once the message is stored on 2 of
# 3 replicas with fdatasync.
#
# SIZE=spec draws each message's size from SPECmail2001's distribution instead of 4 KiB;
# TLS=1 sends with STARTTLS (Postfix offers it with the peer's self-signed certificate);
# REPLICAS=1 gives mailgrid replication factor 1 (each message fsynced on one node).
set -euo pipefail
cd "$(dirname "$0")/.."
messages="${1:-4000}"
senders="${2:-32}"
peer="$(mktemp -d /tmp/mailgrid-peer.XXXXXX)"
trap 'bench/peer.sh stop "$peer" >/dev/null 2>&1 || true; rm -rf "$peer"' EXIT

size="${SIZE:-4096}"
replicas="${REPLICAS:-3}"
extra=()
if [ -n "${TLS:-}" ]; then extra+=(--tls); fi
label="$size-byte messages"
if [ "$size" = spec ]; then label="SPECmail2001-sized messages"; fi
if [ -n "${TLS:-}" ]; then label="$label, STARTTLS"; fi

cargo build --release -q -p mailgrid -p bench
bench/peer.sh start "$peer" >/dev/null

stored() { find "$peer/mail" -path '*/new/*' -type f | wc -l; }
rate() { awk '/senders:/ { for (i = 1; i <= NF; i++) if ($i == "msgs/s,") print $(i - 1) }'; }

start=$(date +%s.%N)
peer_accept=$(target/release/bench smtp --target 127.0.0.1:"${PEER_SMTP_PORT:-2525}" \
    --messages "$messages" --sizes "$size" --concurrency "$senders" "${extra[@]}" 2>&1 | rate)
while [ "$(stored)" -lt "$messages" ]; do sleep 0.2; done
peer_store=$(echo "scale=0; $messages / ($(date +%s.%N) - $start)" | bc)

mailgrid=$(target/release/bench --replicas "$replicas" smtp --nodes 3 --partitions 64 \
    --messages "$messages" --sizes "$size" --concurrency "$senders" "${extra[@]}" 2>&1 | rate)

printf '%-52s %10s\n' "$label, $senders senders" "msgs/s"
printf '%-52s %10s\n' "Postfix 250 (queue file fsynced)" "$peer_accept"
printf '%-52s %10s\n' "Postfix -> LMTP -> Dovecot, stored in maildirs" "$peer_store"
printf '%-52s %10s\n' "mailgrid 3 nodes, RF $replicas (250 = fsynced on a majority)" "$mailgrid"
printf '%-52s %10s\n' "ratio mailgrid / Postfix->Dovecot stored" \
    "$(echo "scale=2; $mailgrid / $peer_store" | bc)"
printf '%-52s %10s\n' "ratio mailgrid / Postfix 250" \
    "$(echo "scale=2; $mailgrid / $peer_accept" | bc)"
