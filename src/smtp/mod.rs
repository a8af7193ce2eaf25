//! SMTP on every node: inbound MX (25), submission (587, STARTTLS then AUTH) and submissions
//! (465, implicit TLS). A message is acknowledged with `250` only once every partition it
//! touches committed it.
//!
//! `codec` holds the wire pieces (no I/O); `session` runs one connection; this module owns
//! the listeners, connection limits and what sessions share.

pub mod codec;
pub mod policy;
pub mod session;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::{ServeConfig, SmtpConfig};
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
    /// One permit per open connection, all listeners together (`connections_max`).
    connections: Arc<Semaphore>,
    /// Open connections per client address (`connections_per_ip_max`).
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl std::fmt::Debug for Smtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Smtp")
            .field("hostname", &self.hostname)
            .finish()
    }
}

/// Holds a connection's share of the limits; dropping it gives them back.
#[derive(Debug)]
struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
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
            connections: Arc::new(Semaphore::new(config.smtp.connections_max)),
            per_ip: Arc::new(Mutex::new(HashMap::new())),
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
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen for {} on {addr}: {e}", kind.name()))?;
        let bound = listener.local_addr()?;
        let smtp = self.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let smtp = smtp.clone();
                        tokio::spawn(async move { smtp.connection(kind, stream, peer).await });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("{} accept failed: {e}", kind.name());
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(bound)
    }

    fn admit(&self, ip: IpAddr) -> Result<ConnectionSlot, &'static str> {
        let permit = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| "4.3.2 Too many connections, try again later")?;
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.config.connections_per_ip_max {
            return Err("4.7.0 Too many connections from your address, try again later");
        }
        *n += 1;
        Ok(ConnectionSlot {
            _permit: permit,
            ip,
            per_ip: self.per_ip.clone(),
        })
    }

    async fn connection(
        self: Arc<Self>,
        kind: ListenerKind,
        mut stream: TcpStream,
        peer: SocketAddr,
    ) {
        let slot = match self.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(text) => {
                use tokio::io::AsyncWriteExt;
                let line = format!("421 {text}\r\n");
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    stream.write_all(line.as_bytes()),
                )
                .await;
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        session::Session::new(self.clone(), kind, peer)
            .run(stream)
            .await;
        drop(slot);
    }
}
