//! The operator's configuration file for `mailgrid serve`: raft timing, the client-facing
//! listeners, the TLS certificate they present, and per-protocol limits. Parsed and validated
//! once at start-up into [`ServeConfig`]; components get their own section.
//!
//! ```toml
//! hostname = "mail.example.com"          # banner, Received: headers, self-signed certificate
//! [listen]                               # "" turns a listener off
//! smtp = "0.0.0.0:25"
//! submission = "0.0.0.0:587"
//! submissions = "0.0.0.0:465"
//! pop3 = "0.0.0.0:110"
//! pop3s = "0.0.0.0:995"
//! http = "0.0.0.0:8080"                 # Prometheus metrics at /metrics
//! [tls]                                  # absent: DIR/tls/server.pem, made at init/join
//! cert = "/etc/mailgrid/fullchain.pem"
//! key = "/etc/mailgrid/key.pem"
//! [smtp]
//! recipients_max = 100
//! [auth]
//! failures_per_ip_max = 10
//! password_scheme = "argon2id"           # or "sha512-crypt", for passwords set from now on
//! [raft]
//! heartbeat_ms = 200
//! [outbound]                             # mail to other domains
//! resolver = "127.0.0.1:53"              # absent: /etc/resolv.conf
//! retry_min_s = 300                      # first retry; doubles up to retry_max_s
//! lifetime_s = 432000                    # give up and bounce after 5 days
//! [outbound.relay]                       # smarthost for every remote domain
//! host = "smtp.corp.example"
//! user = "mailgrid"
//! password = "secret"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use imap::ImapConfig;
use outbound::{OutboundConfig, Relay, RelayTls};
use pop3::Pop3Config;
use service::node::NodeOptions;
use service::policy::throttle::AuthLimits;
use smtp::SmtpConfig;

/// Everything `serve` needs beyond the data directory.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub node: NodeOptions,
    pub hostname: String,
    pub listen: Listen,
    /// Certificate chain and key (PEM) for client-facing TLS; `None` means the node's
    /// self-signed pair in its data directory.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub smtp: SmtpConfig,
    pub pop3: Pop3Config,
    pub imap: ImapConfig,
    pub auth: AuthLimits,
    pub outbound: OutboundConfig,
}

/// Client-facing listeners; `None` is off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listen {
    pub smtp: Option<SocketAddr>,
    pub submission: Option<SocketAddr>,
    pub submissions: Option<SocketAddr>,
    pub pop3: Option<SocketAddr>,
    pub pop3s: Option<SocketAddr>,
    pub imap: Option<SocketAddr>,
    pub imaps: Option<SocketAddr>,
    /// HTTP: Prometheus metrics at /metrics.
    pub http: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    hostname: Option<String>,
    #[serde(default)]
    raft: RaftSection,
    #[serde(default)]
    listen: ListenSection,
    tls: Option<TlsSection>,
    #[serde(default)]
    smtp: SmtpSection,
    #[serde(default)]
    pop3: Pop3Section,
    #[serde(default)]
    imap: ImapSection,
    #[serde(default)]
    auth: AuthSection,
    #[serde(default)]
    outbound: OutboundSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboundSection {
    resolver: Option<String>,
    port: Option<u16>,
    retry_min_s: Option<u64>,
    retry_max_s: Option<u64>,
    lifetime_s: Option<u64>,
    connect_timeout_s: Option<u64>,
    reply_timeout_s: Option<u64>,
    concurrency_max: Option<usize>,
    per_destination_max: Option<usize>,
    starttls: Option<bool>,
    poll_ms: Option<u64>,
    relay: Option<RelaySection>,
    #[serde(default)]
    domain_relays: std::collections::BTreeMap<String, RelaySection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelaySection {
    host: String,
    port: Option<u16>,
    tls: Option<String>,
    user: Option<String>,
    password: Option<String>,
    ca_file: Option<PathBuf>,
}

fn relay(name: &str, r: RelaySection) -> anyhow::Result<Relay> {
    let tls = match r.tls.as_deref().unwrap_or("starttls") {
        "starttls" => RelayTls::StartTls,
        "implicit" => RelayTls::Implicit,
        "none" => RelayTls::None,
        other => bail!("{name}.tls: {other:?} is not starttls, implicit or none"),
    };
    if r.host.is_empty() || r.host.bytes().any(|b| b.is_ascii_whitespace() || b == b':') {
        bail!(
            "{name}.host: {:?} is not a host name or address (give the port as port)",
            r.host
        );
    }
    let auth = match (r.user, r.password) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => bail!("{name}: give both user and password, or neither"),
    };
    if auth.is_some() && tls == RelayTls::None {
        bail!("{name}: a password is never sent without TLS (set tls to starttls or implicit)");
    }
    if let Some(ca) = &r.ca_file {
        if !ca.exists() {
            bail!("{name}.ca_file: {} does not exist", ca.display());
        }
    }
    let port = r.port.unwrap_or(match tls {
        RelayTls::Implicit => 465,
        _ => 587,
    });
    Ok(Relay {
        host: r.host,
        port,
        tls,
        auth,
        ca_file: r.ca_file,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pop3Section {
    connections_max: Option<usize>,
    connections_per_ip_max: Option<usize>,
    idle_timeout_s: Option<u64>,
    tls_handshake_timeout_s: Option<u64>,
    lock_lease_s: Option<u64>,
    auth_without_tls: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImapSection {
    connections_max: Option<usize>,
    connections_per_ip_max: Option<usize>,
    idle_timeout_s: Option<u64>,
    tls_handshake_timeout_s: Option<u64>,
    idle_poll_ms: Option<u64>,
    auth_without_tls: Option<bool>,
    header_cache_mib: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RaftSection {
    heartbeat_ms: Option<u64>,
    election_min_ms: Option<u64>,
    election_max_ms: Option<u64>,
    snapshot_logs: Option<u64>,
    write_timeout_ms: Option<u64>,
    moves_per_node_max: Option<usize>,
    move_mib_per_s: Option<u64>,
    disk_stall_ms: Option<u64>,
    disk_free_min_mib: Option<u64>,
    stale_replica_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenSection {
    smtp: Option<String>,
    submission: Option<String>,
    submissions: Option<String>,
    pop3: Option<String>,
    pop3s: Option<String>,
    imap: Option<String>,
    imaps: Option<String>,
    http: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SmtpSection {
    recipients_max: Option<usize>,
    connections_max: Option<usize>,
    connections_per_ip_max: Option<usize>,
    command_timeout_s: Option<u64>,
    data_timeout_s: Option<u64>,
    tls_handshake_timeout_s: Option<u64>,
    errors_max: Option<u32>,
    vrfy: Option<bool>,
    auth_without_tls: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthSection {
    failures_per_ip_max: Option<u32>,
    failures_per_account_max: Option<u32>,
    window_s: Option<u64>,
    lockout_s: Option<u64>,
    delay_step_ms: Option<u64>,
    delay_max_ms: Option<u64>,
    password_scheme: Option<String>,
}

/// The machine's host name, for banners when the config names none.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn listener(
    name: &str,
    value: Option<String>,
    default: &str,
) -> anyhow::Result<Option<SocketAddr>> {
    let text = value.unwrap_or_else(|| default.to_string());
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .with_context(|| format!("listen.{name}: {text:?} is not an address like 0.0.0.0:25"))
}

impl ServeConfig {
    /// Reads and validates the config file; `None` gives the defaults (standard ports on
    /// every interface).
    pub fn load(path: Option<&Path>) -> anyhow::Result<ServeConfig> {
        let file: File = match path {
            None => File::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("{} is not a valid config", path.display()))?
            }
        };
        let name = path.map(|p| p.display().to_string()).unwrap_or_default();
        Self::from_file(file).with_context(|| format!("config {name}"))
    }

    fn from_file(file: File) -> anyhow::Result<ServeConfig> {
        let mut node = NodeOptions::default();
        let r = file.raft;
        node.heartbeat_ms = r.heartbeat_ms.unwrap_or(node.heartbeat_ms);
        node.election_min_ms = r.election_min_ms.unwrap_or(node.election_min_ms);
        node.election_max_ms = r.election_max_ms.unwrap_or(node.election_max_ms);
        node.snapshot_logs = r.snapshot_logs.unwrap_or(node.snapshot_logs);
        if let Some(ms) = r.write_timeout_ms {
            node.write_timeout = Duration::from_millis(ms);
        }
        if node.snapshot_logs == 0 {
            bail!("raft.snapshot_logs must be at least 1");
        }
        node.moves_per_node_max = r.moves_per_node_max.unwrap_or(node.moves_per_node_max);
        if !(1..=64).contains(&node.moves_per_node_max) {
            bail!("raft.moves_per_node_max must be between 1 and 64");
        }
        if let Some(ms) = r.disk_stall_ms {
            if !(100..=600_000).contains(&ms) {
                bail!("raft.disk_stall_ms must be between 100 and 600000");
            }
            node.disk_stall = Duration::from_millis(ms);
        }
        if let Some(mib) = r.disk_free_min_mib {
            node.disk_free_min = mib << 20;
        }
        if let Some(secs) = r.stale_replica_s {
            if secs > 0 && !(5..=86_400 * 30).contains(&secs) {
                bail!("raft.stale_replica_s must be 0 (keep) or between 5 and 2592000");
            }
            node.stale_replica_after = (secs > 0).then(|| Duration::from_secs(secs));
        }
        if let Some(mib) = r.move_mib_per_s {
            if mib > 100_000 {
                bail!("raft.move_mib_per_s must be at most 100000 (0 = unlimited)");
            }
            node.move_bytes_per_s = mib << 20;
        }
        let l = file.listen;
        let listen = Listen {
            smtp: listener("smtp", l.smtp, "0.0.0.0:25")?,
            submission: listener("submission", l.submission, "0.0.0.0:587")?,
            submissions: listener("submissions", l.submissions, "0.0.0.0:465")?,
            pop3: listener("pop3", l.pop3, "0.0.0.0:110")?,
            pop3s: listener("pop3s", l.pop3s, "0.0.0.0:995")?,
            imap: listener("imap", l.imap, "0.0.0.0:143")?,
            imaps: listener("imaps", l.imaps, "0.0.0.0:993")?,
            http: listener("http", l.http, "0.0.0.0:8080")?,
        };
        let hostname = file.hostname.unwrap_or_else(system_hostname);
        if hostname.is_empty() || hostname.bytes().any(|b| b.is_ascii_whitespace()) {
            bail!("hostname {hostname:?} is not a host name");
        }
        let defaults = SmtpConfig::default();
        let s = file.smtp;
        let secs = |v: Option<u64>, d: Duration| v.map(Duration::from_secs).unwrap_or(d);
        let smtp = SmtpConfig {
            recipients_max: s.recipients_max.unwrap_or(defaults.recipients_max),
            connections_max: s.connections_max.unwrap_or(defaults.connections_max),
            connections_per_ip_max: s
                .connections_per_ip_max
                .unwrap_or(defaults.connections_per_ip_max),
            command_timeout: secs(s.command_timeout_s, defaults.command_timeout),
            data_timeout: secs(s.data_timeout_s, defaults.data_timeout),
            tls_handshake_timeout: secs(s.tls_handshake_timeout_s, defaults.tls_handshake_timeout),
            errors_max: s.errors_max.unwrap_or(defaults.errors_max),
            vrfy: s.vrfy.unwrap_or(defaults.vrfy),
            auth_without_tls: s.auth_without_tls.unwrap_or(defaults.auth_without_tls),
        };
        if smtp.recipients_max == 0 || smtp.recipients_max > service::mail::RECIPIENTS_MAX {
            bail!(
                "smtp.recipients_max must be between 1 and {}",
                service::mail::RECIPIENTS_MAX
            );
        }
        if smtp.connections_max == 0 || smtp.connections_per_ip_max == 0 {
            bail!("smtp.connections_max and smtp.connections_per_ip_max must be at least 1");
        }
        let d = Pop3Config::default();
        let p = file.pop3;
        let pop3 = Pop3Config {
            connections_max: p.connections_max.unwrap_or(d.connections_max),
            connections_per_ip_max: p.connections_per_ip_max.unwrap_or(d.connections_per_ip_max),
            idle_timeout: secs(p.idle_timeout_s, d.idle_timeout),
            tls_handshake_timeout: secs(p.tls_handshake_timeout_s, d.tls_handshake_timeout),
            lock_lease: secs(p.lock_lease_s, d.lock_lease),
            auth_without_tls: p.auth_without_tls.unwrap_or(d.auth_without_tls),
        };
        if pop3.connections_max == 0 || pop3.connections_per_ip_max == 0 {
            bail!("pop3.connections_max and pop3.connections_per_ip_max must be at least 1");
        }
        if pop3.lock_lease < Duration::from_secs(3) {
            bail!("pop3.lock_lease_s must be at least 3");
        }
        let d = ImapConfig::default();
        let i = file.imap;
        let imap = ImapConfig {
            connections_max: i.connections_max.unwrap_or(d.connections_max),
            connections_per_ip_max: i.connections_per_ip_max.unwrap_or(d.connections_per_ip_max),
            idle_timeout: secs(i.idle_timeout_s, d.idle_timeout),
            tls_handshake_timeout: secs(i.tls_handshake_timeout_s, d.tls_handshake_timeout),
            idle_poll: i
                .idle_poll_ms
                .map(Duration::from_millis)
                .unwrap_or(d.idle_poll),
            auth_without_tls: i.auth_without_tls.unwrap_or(d.auth_without_tls),
            header_cache_bytes: match i.header_cache_mib {
                Some(mib) if mib > 4096 => bail!("imap.header_cache_mib must be at most 4096"),
                Some(mib) => mib << 20,
                None => d.header_cache_bytes,
            },
        };
        if imap.connections_max == 0 || imap.connections_per_ip_max == 0 {
            bail!("imap.connections_max and imap.connections_per_ip_max must be at least 1");
        }
        if imap.idle_poll < Duration::from_millis(50) || imap.idle_poll > Duration::from_secs(60) {
            bail!("imap.idle_poll_ms must be between 50 and 60000");
        }
        let d = AuthLimits::default();
        let a = file.auth;
        let ms = |v: Option<u64>, d: Duration| v.map(Duration::from_millis).unwrap_or(d);
        let auth = AuthLimits {
            failures_per_ip_max: a.failures_per_ip_max.unwrap_or(d.failures_per_ip_max),
            failures_per_account_max: a
                .failures_per_account_max
                .unwrap_or(d.failures_per_account_max),
            window: secs(a.window_s, d.window),
            lockout: secs(a.lockout_s, d.lockout),
            delay_step: ms(a.delay_step_ms, d.delay_step),
            delay_max: ms(a.delay_max_ms, d.delay_max),
        };
        if auth.failures_per_ip_max == 0 || auth.failures_per_account_max == 0 {
            bail!("auth failure limits must be at least 1");
        }
        if let Some(scheme) = &a.password_scheme {
            node.password_scheme = scheme
                .parse()
                .map_err(|e| anyhow::anyhow!("auth.password_scheme: {e}"))?;
        }
        let outbound = outbound(file.outbound)?;
        Ok(ServeConfig {
            node,
            hostname,
            listen,
            tls: file.tls.map(|t| (t.cert, t.key)),
            smtp,
            pop3,
            imap,
            auth,
            outbound,
        })
    }
}

fn outbound(o: OutboundSection) -> anyhow::Result<OutboundConfig> {
    let d = OutboundConfig::default();
    let secs = |v: Option<u64>, d: Duration| v.map(Duration::from_secs).unwrap_or(d);
    let resolver = match o.resolver {
        None => None,
        Some(text) => Some(
            text.parse::<SocketAddr>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                .map_err(|_| {
                    anyhow::anyhow!(
                        "outbound.resolver: {text:?} is not an address like 127.0.0.1:53"
                    )
                })?,
        ),
    };
    let c = OutboundConfig {
        resolver,
        port: o.port.unwrap_or(d.port),
        retry_min: secs(o.retry_min_s, d.retry_min),
        retry_max: secs(o.retry_max_s, d.retry_max),
        lifetime: secs(o.lifetime_s, d.lifetime),
        connect_timeout: secs(o.connect_timeout_s, d.connect_timeout),
        reply_timeout: secs(o.reply_timeout_s, d.reply_timeout),
        concurrency_max: o.concurrency_max.unwrap_or(d.concurrency_max),
        per_destination_max: o.per_destination_max.unwrap_or(d.per_destination_max),
        starttls: o.starttls.unwrap_or(d.starttls),
        poll: o.poll_ms.map(Duration::from_millis).unwrap_or(d.poll),
        relay: o.relay.map(|r| relay("outbound.relay", r)).transpose()?,
        domain_relays: o
            .domain_relays
            .into_iter()
            .map(|(domain, r)| {
                let relay = relay(&format!("outbound.domain_relays.{domain}"), r)?;
                Ok((domain.to_ascii_lowercase(), relay))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    if c.port == 0 {
        bail!("outbound.port must not be 0");
    }
    if c.retry_min.is_zero() || c.retry_max < c.retry_min {
        bail!("outbound.retry_min_s must be at least 1 and at most outbound.retry_max_s");
    }
    if c.lifetime.is_zero() || c.connect_timeout.is_zero() || c.reply_timeout.is_zero() {
        bail!("outbound.lifetime_s and the outbound timeouts must be at least 1");
    }
    if c.concurrency_max == 0 || c.per_destination_max == 0 {
        bail!("outbound.concurrency_max and outbound.per_destination_max must be at least 1");
    }
    if c.poll < Duration::from_millis(50) || c.poll > Duration::from_secs(60) {
        bail!("outbound.poll_ms must be between 50 and 60000");
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a config names only what differs from the defaults, and typos are refused.
    #[test]
    fn defaults_overrides_and_typos() {
        let c = ServeConfig::from_file(toml::from_str("").unwrap()).unwrap();
        assert_eq!(c.listen.smtp, Some("0.0.0.0:25".parse().unwrap()));
        assert_eq!(c.smtp.recipients_max, 100);
        let f: File = toml::from_str(
            "hostname = \"mx.test\"\n[listen]\nsmtp = \"127.0.0.1:0\"\nsubmissions = \"\"\n[smtp]\nrecipients_max = 5\n",
        )
        .unwrap();
        let c = ServeConfig::from_file(f).unwrap();
        assert_eq!(c.hostname, "mx.test");
        assert_eq!(c.listen.submissions, None);
        assert_eq!(c.smtp.recipients_max, 5);
        assert!(toml::from_str::<File>("[smtp]\nrecipient_max = 5\n").is_err());
        let bad: File = toml::from_str("[listen]\nsmtp = \"port 25\"\n").unwrap();
        let err = ServeConfig::from_file(bad).unwrap_err().to_string();
        assert!(err.contains("listen.smtp"), "{err}");
        let f: File =
            toml::from_str("[outbound]\nresolver = \"10.0.0.53\"\nretry_min_s = 1\n").unwrap();
        let c = ServeConfig::from_file(f).unwrap();
        assert_eq!(c.outbound.resolver, Some("10.0.0.53:53".parse().unwrap()));
        assert_eq!(c.outbound.retry_min, Duration::from_secs(1));
        let f: File =
            toml::from_str("[outbound.relay]\nhost = \"gw.corp\"\ntls = \"implicit\"\n").unwrap();
        let relay = ServeConfig::from_file(f).unwrap().outbound.relay.unwrap();
        assert_eq!((relay.port, relay.tls), (465, RelayTls::Implicit));
        assert_eq!(c.imap.header_cache_bytes, 64 << 20);
        let f: File = toml::from_str("[imap]\nheader_cache_mib = 0\n").unwrap();
        assert_eq!(
            ServeConfig::from_file(f).unwrap().imap.header_cache_bytes,
            0
        );
        let f: File = toml::from_str("[auth]\npassword_scheme = \"SHA512-CRYPT\"\n").unwrap();
        let c = ServeConfig::from_file(f).unwrap();
        assert_eq!(
            c.node.password_scheme,
            service::mail::PasswordScheme::Sha512Crypt
        );
        for (bad, key) in [
            (
                "[auth]\npassword_scheme = \"md5-crypt\"\n",
                "auth.password_scheme",
            ),
            (
                "[outbound]\nresolver = \"dns.example\"\n",
                "outbound.resolver",
            ),
            (
                "[outbound]\nretry_min_s = 900\nretry_max_s = 60\n",
                "outbound.retry_min_s",
            ),
            ("[outbound]\nport = 0\n", "outbound.port"),
            ("[imap]\nheader_cache_mib = 5000\n", "imap.header_cache_mib"),
            (
                "[outbound.relay]\nhost = \"gw\"\ntls = \"none\"\nuser = \"u\"\npassword = \"p\"\n",
                "never sent without TLS",
            ),
            (
                "[outbound.relay]\nhost = \"gw:25\"\n",
                "outbound.relay.host",
            ),
            (
                "[outbound.domain_relays.\"x.test\"]\nhost = \"gw\"\nuser = \"u\"\n",
                "outbound.domain_relays.x.test",
            ),
        ] {
            let err = ServeConfig::from_file(toml::from_str(bad).unwrap())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }
}
