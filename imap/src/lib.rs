//! IMAP4rev1 on every node (RFC 3501 with IDLE, UIDPLUS, MOVE, NAMESPACE, SPECIAL-USE, QUOTA,
//! LITERAL+, ENABLE, UNSELECT, ID, CHILDREN, CONDSTORE and QRESYNC): port 143 with STARTTLS
//! and 993 with implicit TLS.
//!
//! A session keeps a view of its selected mailbox (UIDs in sequence order, flags, MODSEQs)
//! and brings it up to date from the partition leader after each command and, in IDLE,
//! every `imap.idle_poll`; the replicated MODSEQ tells it cheaply whether anything changed,
//! so sessions on different nodes see each other's changes.

// A session's future nests the service's router and mail futures deep; computing its
// layout needs more than the default 128 query levels.
#![recursion_limit = "256"]

pub mod framing;
pub mod headers;
pub mod mime;
pub mod search;
mod selected;
pub mod session;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use service::metrics::{Exposition, MetricSource};
use service::net::{admit_or_refuse, ConnectionLimits, Refusal};
use service::node::Node;
use service::policy::throttle::AuthThrottle;
use service::policy::Policy;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImapKind {
    /// Port 143: plaintext until STARTTLS.
    Plain,
    /// Port 993: TLS from the first byte.
    Tls,
}

impl ImapKind {
    pub fn name(self) -> &'static str {
        match self {
            ImapKind::Plain => "imap",
            ImapKind::Tls => "imaps",
        }
    }
}

/// What every IMAP session of a node shares.
pub struct Imap {
    pub node: Arc<Node>,
    pub config: ImapConfig,
    pub tls: Option<TlsAcceptor>,
    pub throttle: Arc<AuthThrottle>,
    /// Message size limits and domain quotas, as SMTP applies them.
    pub policy: Policy,
    /// Headers of messages read here, for every session.
    pub headers: headers::HeaderCache,
    connections: ConnectionLimits,
}

impl std::fmt::Debug for Imap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imap").finish()
    }
}

impl Imap {
    pub fn new(
        node: Arc<Node>,
        config: ImapConfig,
        tls: Option<TlsAcceptor>,
        throttle: Arc<AuthThrottle>,
    ) -> Arc<Imap> {
        Arc::new(Imap {
            policy: Policy::new(node.clone()),
            headers: headers::HeaderCache::new(config.header_cache_bytes),
            node,
            connections: ConnectionLimits::new(
                config.connections_max,
                config.connections_per_ip_max,
            ),
            config,
            tls,
            throttle,
        })
    }

    /// Binds a listener and serves it in the background; returns the bound address.
    pub async fn listen(
        self: &Arc<Self>,
        kind: ImapKind,
        addr: SocketAddr,
    ) -> anyhow::Result<SocketAddr> {
        if kind == ImapKind::Tls && self.tls.is_none() {
            anyhow::bail!("the imaps listener needs a TLS certificate");
        }
        let imap = self.clone();
        service::net::listen(addr, kind.name(), move |stream, peer| {
            imap.clone().connection(kind, stream, peer)
        })
        .await
    }

    async fn connection(self: Arc<Self>, kind: ImapKind, mut stream: TcpStream, peer: SocketAddr) {
        let refusal = |r| match r {
            Refusal::Busy => "* BYE [UNAVAILABLE] too many connections, try again later\r\n".into(),
            Refusal::Unhealthy => {
                "* BYE [UNAVAILABLE] this server's storage failed, try another\r\n".into()
            }
            Refusal::TooManyFromAddress => {
                "* BYE [UNAVAILABLE] too many connections from your address\r\n".into()
            }
        };
        let healthy = self.node.host().disk_failure().is_none();
        let admitted = admit_or_refuse(
            &self.connections,
            healthy,
            &mut stream,
            peer.ip(),
            kind == ImapKind::Tls,
            refusal,
        );
        let Some(slot) = admitted.await else {
            return;
        };
        session::Session::new(self.clone(), kind, peer)
            .run(stream)
            .await;
        drop(slot);
    }
}

/// The header cache's size and hit rate.
impl MetricSource for Imap {
    fn write_metrics(&self, out: &mut Exposition) {
        let headers = &self.headers;
        let (hits, misses) = headers.hits_and_misses();
        out.metric(
            "mailgrid_imap_header_cache_bytes",
            "gauge",
            "Memory held by the IMAP header cache (imap.header_cache_mib).",
            &[("", headers.bytes() as u64)],
        );
        out.metric(
            "mailgrid_imap_header_cache_lookups_total",
            "counter",
            "Header lookups by IMAP FETCH and SEARCH, answered from the cache (hit) or not (miss).",
            &[("{result=\"hit\"}", hits), ("{result=\"miss\"}", misses)],
        );
    }
}

/// The `[imap]` settings.
#[derive(Clone, Debug)]
pub struct ImapConfig {
    pub connections_max: usize,
    pub connections_per_ip_max: usize,
    /// RFC 3501 §5.4: an inactivity autologout timer of at least 30 minutes (IDLE included;
    /// clients re-issue IDLE every 29 minutes).
    pub idle_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// How often a session in IDLE looks for changes made through other nodes.
    pub idle_poll: Duration,
    /// Allow LOGIN and AUTHENTICATE without TLS (tests, trusted networks only).
    pub auth_without_tls: bool,
    /// Memory for the headers of messages this node has read (FETCH of header fields, and
    /// SEARCH on them, then need no read at the partition leader); 0 turns it off.
    pub header_cache_bytes: usize,
}

impl Default for ImapConfig {
    fn default() -> ImapConfig {
        ImapConfig {
            connections_max: 2_000,
            connections_per_ip_max: 50,
            idle_timeout: Duration::from_secs(1800),
            tls_handshake_timeout: Duration::from_secs(10),
            idle_poll: Duration::from_millis(500),
            auth_without_tls: false,
            header_cache_bytes: 64 << 20,
        }
    }
}
