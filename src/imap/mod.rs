//! IMAP4rev1 on every node (RFC 3501 with IDLE, UIDPLUS, MOVE, NAMESPACE, SPECIAL-USE, QUOTA,
//! LITERAL+, ENABLE, UNSELECT, ID, CHILDREN, CONDSTORE and QRESYNC): port 143 with STARTTLS
//! and 993 with implicit TLS.
//!
//! A session keeps a view of its selected mailbox (UIDs in sequence order, flags, MODSEQs)
//! and brings it up to date from the partition leader after each command and, in IDLE,
//! every `imap.idle_poll`; the replicated MODSEQ tells it cheaply whether anything changed,
//! so sessions on different nodes see each other's changes.

pub mod framing;
pub mod headers;
pub mod mime;
pub mod search;
mod selected;
pub mod session;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{ImapConfig, ServeConfig};
use crate::net::{admit_or_refuse, ConnectionLimits, Refusal};
use crate::node::Node;
use crate::smtp::policy::Policy;
use crate::throttle::AuthThrottle;

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
        config: &ServeConfig,
        tls: Option<TlsAcceptor>,
        throttle: Arc<AuthThrottle>,
    ) -> Arc<Imap> {
        Arc::new(Imap {
            policy: Policy::new(node.clone()),
            headers: headers::HeaderCache::new(config.imap.header_cache_bytes),
            node,
            config: config.imap.clone(),
            tls,
            throttle,
            connections: ConnectionLimits::new(
                config.imap.connections_max,
                config.imap.connections_per_ip_max,
            ),
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
        crate::net::listen(addr, kind.name(), move |stream, peer| {
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
