//! POP3 on every node (RFC 1939, CAPA RFC 2449, STLS RFC 2595, SASL RFC 5034): port 110
//! with STLS and 995 with implicit TLS. The maildrop is the account's INBOX; its exclusive
//! lock is replicated in the account's partition with a lease, so a second session on any
//! node gets `-ERR [IN-USE]`, and a lock left by a dead node expires.

// A session's future nests the service's router and mail futures deep; computing its
// layout needs more than the default 128 query levels.
#![recursion_limit = "256"]

pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use service::net::{admit_or_refuse, ConnectionLimits, Refusal};
use service::node::Node;
use service::policy::throttle::AuthThrottle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pop3Kind {
    /// Port 110: plaintext until STLS.
    Plain,
    /// Port 995: TLS from the first byte.
    Tls,
}

impl Pop3Kind {
    pub fn name(self) -> &'static str {
        match self {
            Pop3Kind::Plain => "pop3",
            Pop3Kind::Tls => "pop3s",
        }
    }
}

/// What every POP3 session of a node shares.
pub struct Pop3 {
    pub node: Arc<Node>,
    pub config: Pop3Config,
    pub tls: Option<TlsAcceptor>,
    pub throttle: Arc<AuthThrottle>,
    connections: ConnectionLimits,
}

impl std::fmt::Debug for Pop3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pop3").finish()
    }
}

impl Pop3 {
    pub fn new(
        node: Arc<Node>,
        config: Pop3Config,
        tls: Option<TlsAcceptor>,
        throttle: Arc<AuthThrottle>,
    ) -> Arc<Pop3> {
        Arc::new(Pop3 {
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
        kind: Pop3Kind,
        addr: SocketAddr,
    ) -> anyhow::Result<SocketAddr> {
        if kind == Pop3Kind::Tls && self.tls.is_none() {
            anyhow::bail!("the pop3s listener needs a TLS certificate");
        }
        let pop3 = self.clone();
        service::net::listen(addr, kind.name(), move |stream, peer| {
            pop3.clone().connection(kind, stream, peer)
        })
        .await
    }

    async fn connection(self: Arc<Self>, kind: Pop3Kind, mut stream: TcpStream, peer: SocketAddr) {
        let refusal = |r| match r {
            Refusal::Busy => "-ERR [SYS/TEMP] too many connections, try again later\r\n".into(),
            Refusal::Unhealthy => {
                "-ERR [SYS/TEMP] this server's storage failed, try another\r\n".into()
            }
            Refusal::TooManyFromAddress => {
                "-ERR [SYS/TEMP] too many connections from your address\r\n".into()
            }
        };
        let healthy = self.node.host().disk_failure().is_none();
        let admitted = admit_or_refuse(
            &self.connections,
            healthy,
            &mut stream,
            peer.ip(),
            kind == Pop3Kind::Tls,
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

/// The `[pop3]` settings.
#[derive(Clone, Debug)]
pub struct Pop3Config {
    pub connections_max: usize,
    pub connections_per_ip_max: usize,
    /// RFC 1939 §3: an inactivity autologout timer of at least 10 minutes.
    pub idle_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// How long a maildrop lock outlives its session if the session's node dies.
    pub lock_lease: Duration,
    /// Allow USER/PASS and AUTH without TLS (tests, trusted networks only).
    pub auth_without_tls: bool,
}

impl Default for Pop3Config {
    fn default() -> Pop3Config {
        Pop3Config {
            connections_max: 1_000,
            connections_per_ip_max: 50,
            idle_timeout: Duration::from_secs(600),
            tls_handshake_timeout: Duration::from_secs(10),
            lock_lease: Duration::from_secs(30),
            auth_without_tls: false,
        }
    }
}
