//! SMTP on every node: inbound MX (25), submission (587, STARTTLS then AUTH) and submissions
//! (465, implicit TLS). A message is acknowledged with `250` only once every partition it
//! touches committed it.
//!
//! `codec` holds the wire pieces (no I/O); `session` runs one connection; the crate root owns
//! the listeners, connection limits and what sessions share.

// A session's future nests the service's router and mail futures deep; computing its
// layout needs more than the default 128 query levels.
#![recursion_limit = "256"]

pub mod codec;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use service::net::{admit_or_refuse, ConnectionLimits, Refusal};
use service::node::Node;
use service::policy::throttle::AuthThrottle;
use service::policy::Policy;

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
    pub policy: Policy,
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
        hostname: String,
        config: SmtpConfig,
        tls: Option<TlsAcceptor>,
        throttle: Arc<AuthThrottle>,
    ) -> Arc<Smtp> {
        Arc::new(Smtp {
            policy: Policy::new(node.clone()),
            node,
            hostname,
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
        kind: ListenerKind,
        addr: SocketAddr,
    ) -> anyhow::Result<SocketAddr> {
        if kind == ListenerKind::Submissions && self.tls.is_none() {
            anyhow::bail!("the submissions listener needs a TLS certificate");
        }
        let smtp = self.clone();
        service::net::listen(addr, kind.name(), move |stream, peer| {
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

/// The `[smtp]` settings.
#[derive(Clone, Debug)]
pub struct SmtpConfig {
    /// Recipients accepted in one transaction; further RCPTs get 452 4.5.3.
    pub recipients_max: usize,
    /// Open SMTP connections on this node, all listeners together.
    pub connections_max: usize,
    /// Open SMTP connections from one client address.
    pub connections_per_ip_max: usize,
    /// Longest wait for a command line (RFC 5321 §4.5.3.2 suggests 5 minutes).
    pub command_timeout: Duration,
    /// Longest wait for the next block of message data.
    pub data_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// Unknown or malformed commands before the connection is closed.
    pub errors_max: u32,
    /// Answer VRFY truthfully (off: 252, the usual policy against address harvesting).
    pub vrfy: bool,
    /// Allow AUTH without TLS (for tests and trusted networks only).
    pub auth_without_tls: bool,
}

impl Default for SmtpConfig {
    fn default() -> SmtpConfig {
        SmtpConfig {
            recipients_max: 100,
            connections_max: 1_000,
            connections_per_ip_max: 50,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            tls_handshake_timeout: Duration::from_secs(10),
            errors_max: 10,
            vrfy: false,
            auth_without_tls: false,
        }
    }
}
