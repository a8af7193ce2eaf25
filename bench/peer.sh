#!/usr/bin/env bash
# The comparison peer for bench/: Postfix delivering over LMTP into Dovecot (maildir), as
# Debian packages them, as private instances on loopback (their own config, spool and mail
# directories; the system's own Postfix and Dovecot are not touched). Needs root.
#
#   bench/peer.sh start DIR      installs the packages if missing, starts both, prints the
#                                addresses: SMTP 127.0.0.1:$PEER_SMTP_PORT (default 2525),
#                                IMAP :$PEER_IMAP_PORT (11143), IMAPS :$PEER_IMAPS_PORT
#                                (11993), POP3 :$PEER_POP3_PORT (11110), POP3S
#                                :$PEER_POP3S_PORT (11995)
#   bench/peer.sh stop DIR
#
# Every address in example.test is accepted, and every user logs in with any password (the
# loads use "bench"; PEER_PASSWORD_HASH makes Dovecot verify an argon2 hash, see below); TLS
# (IMAPS, POP3S, and STARTTLS on Postfix's SMTP for `bench smtp --tls`) with a self-signed
# certificate made here. Durability as shipped: Postfix
# fsyncs its queue file before 250; Dovecot's LMTP fsyncs the delivered file (mail_fsync =
# optimized, the default) before Postfix removes the queue file.
set -euo pipefail

cmd="${1:-}"
dir="${2:-}"
if [ -z "$cmd" ] || [ -z "$dir" ]; then
    echo "usage: $0 start|stop DIR" >&2
    exit 2
fi
smtp_port="${PEER_SMTP_PORT:-2525}"
imap_port="${PEER_IMAP_PORT:-11143}"
pop3_port="${PEER_POP3_PORT:-11110}"
imaps_port="${PEER_IMAPS_PORT:-11993}"
pop3s_port="${PEER_POP3S_PORT:-11995}"

if [ "$cmd" = stop ]; then
    [ -d "$dir/postfix" ] && postfix -c "$dir/postfix/etc" stop || true
    [ -f "$dir/dovecot/dovecot.conf" ] && doveadm -c "$dir/dovecot/dovecot.conf" stop || true
    exit 0
fi
if [ "$cmd" != start ]; then
    echo "unknown command $cmd (start or stop)" >&2
    exit 2
fi
if [ "$(id -u)" != 0 ]; then
    echo "$0: private Postfix and Dovecot instances need root" >&2
    exit 1
fi

need=()
[ -x /usr/sbin/postfix ] || need+=(postfix)
[ -x /usr/sbin/dovecot ] || need+=(dovecot-core)
[ -e /usr/lib/dovecot/imap ] || need+=(dovecot-imapd)
[ -e /usr/lib/dovecot/pop3 ] || need+=(dovecot-pop3d)
[ -e /usr/lib/dovecot/lmtp ] || need+=(dovecot-lmtpd)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${need[@]}"
fi

dir="$(mkdir -p "$dir" && cd "$dir" && pwd)"
# Passwords: none checked by default; with PEER_PASSWORD_HASH (a PHC string, as
# `mailgrid admin user add --password-hash` takes) every user's password is verified against
# that hash, as mailgrid verifies its argon2id hashes (Dovecot's auth cache standing in for
# mailgrid's login cache).
if [ -n "${PEER_PASSWORD_HASH:-}" ]; then
    passdb_args="password={ARGON2ID}$PEER_PASSWORD_HASH"
else
    passdb_args="nopassword=y"
fi
mkdir -p "$dir/postfix/etc" "$dir/postfix/spool" "$dir/postfix/data" \
    "$dir/dovecot/run" "$dir/dovecot/state" "$dir/mail"
chown postfix "$dir/postfix/data"
chown dovecot:dovecot "$dir/mail"
chmod 755 "$dir" "$dir/dovecot"

openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=peer.example.test \
    -keyout "$dir/dovecot/key.pem" -out "$dir/dovecot/cert.pem" 2>/dev/null

# Dovecot: LMTP on a socket Postfix can reach, IMAP and POP3 on loopback, one static user db.
cat > "$dir/dovecot/dovecot.conf" <<EOF
base_dir = $dir/dovecot/run
state_dir = $dir/dovecot/state
log_path = $dir/dovecot/dovecot.log
protocols = imap pop3 lmtp
listen = 127.0.0.1
ssl = yes
ssl_cert = <$dir/dovecot/cert.pem
ssl_key = <$dir/dovecot/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:$dir/mail/%d/%n
mail_fsync = optimized
first_valid_uid = 1
auth_cache_size = 10M
auth_cache_ttl = 5 mins
passdb {
  driver = static
  args = $passdb_args
}
userdb {
  driver = static
  args = uid=dovecot gid=dovecot home=$dir/mail/%d/%n
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $imap_port
  }
  inet_listener imaps {
    address = 127.0.0.1
    port = $imaps_port
  }
}
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = $pop3_port
  }
  inet_listener pop3s {
    address = 127.0.0.1
    port = $pop3s_port
  }
}
service lmtp {
  unix_listener lmtp {
    mode = 0666
  }
}
protocol lmtp {
  postmaster_address = postmaster@example.test
}
EOF
# Daemons must not keep the caller's stdout open (a pipe reading us would never end).
dovecot -c "$dir/dovecot/dovecot.conf" </dev/null >"$dir/dovecot/start.log" 2>&1 ||
    { cat "$dir/dovecot/start.log" >&2; exit 1; }

# Postfix: example.test handed to Dovecot's LMTP socket.
cat > "$dir/postfix/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $dir/postfix/spool
data_directory = $dir/postfix/data
mail_owner = postfix
myhostname = peer.example.test
mydestination =
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
virtual_mailbox_domains = example.test
virtual_mailbox_maps = static:ok
virtual_transport = lmtp:unix:$dir/dovecot/run/lmtp
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_tls_security_level = may
smtpd_tls_cert_file = $dir/dovecot/cert.pem
smtpd_tls_key_file = $dir/dovecot/key.pem
maillog_file = $dir/postfix/maillog
maillog_file_prefixes = $dir
EOF
services=(
    "$smtp_port inet n - n - - smtpd"
    "cleanup unix n - n - 0 cleanup"
    "qmgr unix n - n 300 1 qmgr"
    "rewrite unix - - n - - trivial-rewrite"
    "bounce unix - - n - 0 bounce"
    "defer unix - - n - 0 bounce"
    "trace unix - - n - 0 bounce"
    "verify unix - - n - 1 verify"
    "proxymap unix - - n - - proxymap"
    "smtp unix - - n - - smtp"
    "lmtp unix - - n - - lmtp"
    "showq unix n - n - - showq"
    "error unix - - n - - error"
    "retry unix - - n - - error"
    "discard unix - - n - - discard"
    "anvil unix - - n - 1 anvil"
    "scache unix - - n - 1 scache"
    "postlog unix-dgram n - n - 1 postlogd"
    "flush unix n - n 1000? 0 flush"
    "tlsmgr unix - - n 1000? 1 tlsmgr"
)
printf '%s\n' "${services[@]}" | sed "1s/^/127.0.0.1:/" > "$dir/postfix/etc/master.cf"
postfix -c "$dir/postfix/etc" start </dev/null >"$dir/postfix/start.log" 2>&1 ||
    { cat "$dir/postfix/start.log" >&2; exit 1; }

for port in "$smtp_port" "$imap_port" "$pop3_port" "$imaps_port" "$pop3s_port"; do
    for _ in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.2
    done
done
echo "smtp 127.0.0.1:$smtp_port"
echo "imap 127.0.0.1:$imap_port"
echo "pop3 127.0.0.1:$pop3_port"
echo "imaps 127.0.0.1:$imaps_port"
echo "pop3s 127.0.0.1:$pop3s_port"
