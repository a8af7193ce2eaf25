//! SMTP on every node: inbound MX (25), submission (587, STARTTLS then AUTH) and submissions
//! (465, implicit TLS). A message is acknowledged with `250` only once every partition it
//! touches committed it.
//!
//! `codec` holds the wire pieces (no I/O); `session` runs one connection; this module owns
//! the listeners, connection limits and what sessions share.

pub mod codec;
pub mod policy;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{ServeConfig, SmtpConfig};
use crate::net::{admit_or_refuse, ConnectionLimits, Refusal};
use crate::node::Node;
use crate::throttle::AuthThrottle;

/// Which service a listener offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// Port 25: mail for our domains from anywhere; relay only after AUTH.
    Mx,
    /// Port 587: AUTH required (after STARTTLS) before any mail (RFC 6409).
    Submission,
    /// Port 465: like submission, inside implicit TLS (RFC 8314).
    Submissions,
}

impl ListenerKind {
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Mx => "smtp",
            ListenerKind::Submission => "submission",
            ListenerKind::Submissions => "submissions",
        }
    }
}

/// What every SMTP session of a node shares.
pub struct Smtp {
    pub node: Arc<Node>,
    pub hostname: String,
    pub config: SmtpConfig,
    pub tls: Option<TlsAcceptor>,
    pub throttle: Arc<AuthThrottle>,
    pub policy: policy::Policy,
    /// All SMTP listeners together (`connections_max`, `connections_per_ip_max`).
    connections: ConnectionLimits,
}

impl std::fmt::Debug for Smtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Smtp")
            .field("hostname", &self.hostname)
            .finish()
    }
}

impl Smtp {
    pub fn new(
        node: Arc<Node>,
        config: &ServeConfig,
        tls: Option<TlsAcceptor>,
        throttle: Arc<AuthThrottle>,
    ) -> Arc<Smtp> {
        Arc::new(Smtp {
            policy: policy::Policy::new(node.clone()),
            node,
            hostname: config.hostname.clone(),
            config: config.smtp.clone(),
            tls,
            throttle,
            connections: ConnectionLimits::new(
                config.smtp.connections_max,
                config.smtp.connections_per_ip_max,
            ),
        })
    }

    /// Binds a listener and serves it in the background; returns the bound address.
    pub async fn listen(
        self: &Arc<Self>,
        kind: ListenerKind,
        addr: SocketAddr,
    ) -> anyhow::Result<SocketAddr> {
        if kind == ListenerKind::Submissions && self.tls.is_none() {
            anyhow::bail!("the submissions listener needs a TLS certificate");
        }
        let smtp = self.clone();
        crate::net::listen(addr, kind.name(), move |stream, peer| {
            smtp.clone().connection(kind, stream, peer)
        })
        .await
    }

    async fn connection(
        self: Arc<Self>,
        kind: ListenerKind,
        mut stream: TcpStream,
        peer: SocketAddr,
    ) {
        let refusal = |r| match r {
            Refusal::Busy => "421 4.3.2 Too many connections, try again later\r\n".into(),
            Refusal::Unhealthy => {
                "421 4.3.0 This server cannot store mail now (disk failure); try another\r\n".into()
            }
            Refusal::TooManyFromAddress => {
                "421 4.7.0 Too many connections from your address, try again later\r\n".into()
            }
        };
        let healthy = self.node.host().disk_failure().is_none();
        let admitted = admit_or_refuse(
            &self.connections,
            healthy,
            &mut stream,
            peer.ip(),
            kind == ListenerKind::Submissions,
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
