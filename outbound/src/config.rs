//! The `[outbound]` settings: how queued mail is delivered to other domains.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Delivery of queued mail to other domains (like Postfix's `smtp` client settings).
#[derive(Clone, Debug)]
pub struct OutboundConfig {
    /// DNS server for MX and address lookups; `None` uses the system's (/etc/resolv.conf).
    pub resolver: Option<SocketAddr>,
    /// TCP port of remote mail exchangers (25; other values are for tests).
    pub port: u16,
    /// Wait before the first retry; each further retry waits twice as long, up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Age at which undelivered recipients are given up on and bounced.
    pub lifetime: Duration,
    pub connect_timeout: Duration,
    /// Longest wait for any one reply (the greeting, EHLO, each command, the end of DATA).
    pub reply_timeout: Duration,
    /// Messages being delivered at once by this node, and to any one destination domain.
    pub concurrency_max: usize,
    pub per_destination_max: usize,
    /// Use STARTTLS when the remote server offers it (without checking its certificate, as
    /// opportunistic TLS does).
    pub starttls: bool,
    /// How often a partition leader looks for due queue entries.
    pub poll: Duration,
    /// A smarthost for every remote domain instead of MX delivery...
    pub relay: Option<Relay>,
    /// ...or for some domains only (these take precedence).
    pub domain_relays: std::collections::BTreeMap<String, Relay>,
}

/// How the connection to a smarthost is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayTls {
    /// STARTTLS, required: a relay that does not offer it gets nothing.
    StartTls,
    /// TLS from the first byte (port 465).
    Implicit,
    /// Plain text (a relay on a trusted network).
    None,
}

/// A relay host (smarthost), as enterprises behind a mail gateway use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relay {
    pub host: String,
    pub port: u16,
    pub tls: RelayTls,
    /// AUTH PLAIN credentials (only over TLS).
    pub auth: Option<(String, String)>,
    /// PEM roots the relay's certificate must chain to; `None` accepts any certificate.
    pub ca_file: Option<PathBuf>,
}

impl Default for OutboundConfig {
    fn default() -> OutboundConfig {
        OutboundConfig {
            resolver: None,
            port: 25,
            retry_min: Duration::from_secs(300),
            retry_max: Duration::from_secs(4_000),
            lifetime: Duration::from_secs(5 * 24 * 3600),
            connect_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(300),
            concurrency_max: 32,
            per_destination_max: 4,
            starttls: true,
            poll: Duration::from_secs(1),
            relay: None,
            domain_relays: std::collections::BTreeMap::new(),
        }
    }
}
