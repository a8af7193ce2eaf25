//! QUIC transport with mutual TLS: one connection per peer, one bidirectional stream per call.
//!
//! A call is `u32be(len) ‖ request ‖ optional body bytes ‖ FIN`, answered by the response bytes
//! and FIN. Every read is bounded. The server learns the caller's node id from its verified
//! certificate; a caller without a certificate is passed on as `None` (only a join request is
//! answered for it). This is the only module that names `quinn`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::AsyncWriteExt;

use crate::tls::{self, Identity, TlsError};
use crate::NodeId;

/// Largest request header or response we read.
pub const MESSAGE_BYTES_MAX: usize = 128 * 1024 * 1024;
/// Largest snapshot body we accept in one call.
pub const BODY_BYTES_MAX: u64 = 64 * 1024 * 1024 * 1024;
/// Both ends use the same idle timeout (a mismatch makes one side give up first).
/// A peer that stops answering is given up after this long; keep-alives keep live ones open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// How long establishing a connection may take (a dead peer's port just stays silent).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Concurrent calls in flight per connection (each is one stream).
const STREAMS_MAX: u32 = 1024;
/// Concurrent calls served for all connections together; more wait for a slot.
const SERVED_CALLS_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("cannot connect to node {node} at {addr}: {reason}")]
    Connect {
        node: String,
        addr: String,
        reason: String,
    },
    #[error("call failed: {0}")]
    Call(String),
    #[error("call timed out")]
    Timeout,
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot bind {addr}: {reason}")]
    Bind { addr: String, reason: String },
}

impl TransportError {
    /// True when the request certainly never reached the peer, so it is safe to send again.
    pub fn is_unsent(&self) -> bool {
        matches!(
            self,
            TransportError::Resolve(_)
                | TransportError::Connect { .. }
                | TransportError::Tls(_)
                | TransportError::Bind { .. }
        )
    }
}

/// Whom a call goes to: a node by id, or any cluster member (for joining).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    Node(NodeId),
    AnyMember,
}

/// The body of an incoming call, read on demand.
pub struct Body {
    recv: quinn::RecvStream,
}

impl Body {
    /// Copies the rest of the stream into `path` (created), at most `limit` bytes, and fsyncs it.
    pub async fn save(mut self, path: &Path, limit: u64) -> std::io::Result<u64> {
        let mut file = tokio::fs::File::create(path).await?;
        let mut total = 0u64;
        while let Some(chunk) = self
            .recv
            .read_chunk(64 * 1024, true)
            .await
            .map_err(std::io::Error::other)?
        {
            total += chunk.bytes.len() as u64;
            if total > limit {
                return Err(std::io::Error::other("body over limit"));
            }
            file.write_all(&chunk.bytes).await?;
        }
        file.sync_all().await?;
        Ok(total)
    }
}

/// Serves incoming calls. `peer` is the caller's verified node id, `None` for a caller
/// without a certificate.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        peer: Option<NodeId>,
        request: Vec<u8>,
        body: Body,
    ) -> BoxFuture<'static, Vec<u8>>;
}

pub struct Transport {
    endpoint: quinn::Endpoint,
    /// Calls served since start (for idle-load measurements).
    served: Arc<std::sync::atomic::AtomicU64>,
    /// Open connections by peer, reused by every call and every raft group.
    connections: Mutex<HashMap<Peer, quinn::Connection>>,
    /// Paces the bodies this node sends (snapshots to new and lagging replicas), all calls
    /// together, so moving replicas leaves room for client traffic.
    pacer: Pacer,
}

/// A byte rate shared by every body a node sends: each piece reserves its slot on one
/// timeline and waits for it. A rate of zero sends at full speed.
#[derive(Debug, Default)]
pub struct Pacer {
    bytes_per_s: std::sync::atomic::AtomicU64,
    /// When the next piece may start.
    next: Mutex<Option<tokio::time::Instant>>,
}

/// A paced body is sent in pieces of this size.
const PACE_PIECE_BYTES: usize = 64 * 1024;

impl Pacer {
    pub fn set_rate(&self, bytes_per_s: u64) {
        self.bytes_per_s
            .store(bytes_per_s, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits until `bytes` may be sent.
    async fn admit(&self, bytes: usize) {
        let rate = self.bytes_per_s.load(std::sync::atomic::Ordering::Relaxed);
        if rate == 0 {
            return;
        }
        let start = {
            let mut next = self.next.lock().expect("pacer lock");
            let now = tokio::time::Instant::now();
            let start = next.filter(|n| *n > now).unwrap_or(now);
            *next = Some(start + Duration::from_secs_f64(bytes as f64 / rate as f64));
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("local", &self.endpoint.local_addr().ok())
            .finish()
    }
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("idle timeout fits"),
    ));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(STREAMS_MAX));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    Arc::new(t)
}

fn client_config(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, TransportError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::Tls(TlsError::Config(e.to_string())))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport_config());
    Ok(cfg)
}

pub async fn resolve(addr: &str) -> Result<SocketAddr, TransportError> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| TransportError::Resolve(format!("{addr}: {e}")))?
        .next()
        .ok_or_else(|| TransportError::Resolve(addr.to_string()))
}

impl Transport {
    /// A node's endpoint: serves on `addr` and calls peers with the node's certificate.
    pub fn bind(identity: &Identity, addr: SocketAddr) -> Result<Transport, TransportError> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(identity.server_config()?)
            .map_err(|e| TransportError::Tls(TlsError::Config(e.to_string())))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport_config());
        let mut endpoint =
            quinn::Endpoint::server(server, addr).map_err(|e| TransportError::Bind {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        endpoint.set_default_client_config(client_config(identity.client_config()?)?);
        Ok(Transport {
            endpoint,
            served: Arc::default(),
            connections: Mutex::new(HashMap::new()),
            pacer: Pacer::default(),
        })
    }

    /// A calling-only endpoint with the given client TLS configuration.
    pub fn client(tls: rustls::ClientConfig) -> Result<Transport, TransportError> {
        let bind: SocketAddr = "0.0.0.0:0".parse().expect("literal address");
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| TransportError::Bind {
            addr: bind.to_string(),
            reason: e.to_string(),
        })?;
        endpoint.set_default_client_config(client_config(tls)?);
        Ok(Transport {
            endpoint,
            served: Arc::default(),
            connections: Mutex::new(HashMap::new()),
            pacer: Pacer::default(),
        })
    }

    /// The byte rate for call bodies (snapshots) this node sends; 0 is unlimited.
    pub fn set_body_rate(&self, bytes_per_s: u64) {
        self.pacer.set_rate(bytes_per_s);
    }

    pub fn calls_served(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Accepts connections until the endpoint closes, serving each call with `handler`.
    pub fn serve(self: &Arc<Self>, handler: Arc<dyn Handler>) {
        let endpoint = self.endpoint.clone();
        let served = self.served.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(SERVED_CALLS_MAX));
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let handler = handler.clone();
                let slots = slots.clone();
                let served = served.clone();
                tokio::spawn(async move {
                    let connection = match incoming.await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::debug!(error = %e, "refused a cluster connection");
                            return;
                        }
                    };
                    let peer = peer_id(&connection);
                    while let Ok((send, recv)) = connection.accept_bi().await {
                        let Ok(permit) = slots.clone().acquire_owned().await else {
                            return;
                        };
                        let handler = handler.clone();
                        served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::spawn(async move {
                            serve_call(peer, send, recv, handler).await;
                            drop(permit);
                        });
                    }
                });
            }
        });
    }

    async fn connection(
        &self,
        peer: Peer,
        addr: &str,
    ) -> Result<quinn::Connection, TransportError> {
        if let Some(c) = self
            .connections
            .lock()
            .expect("connections lock")
            .get(&peer)
        {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let sock = resolve(addr).await?;
        let name = match peer {
            Peer::Node(id) => tls::node_name(id),
            Peer::AnyMember => tls::CLUSTER_NAME.to_string(),
        };
        let connect_err = |reason: String| TransportError::Connect {
            node: name.clone(),
            addr: addr.to_string(),
            reason,
        };
        let connecting = self
            .endpoint
            .connect(sock, &name)
            .map_err(|e| connect_err(e.to_string()))?;
        let connection = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(connect_err(e.to_string())),
            Err(_) => return Err(connect_err("no answer".into())),
        };
        self.connections
            .lock()
            .expect("connections lock")
            .insert(peer, connection.clone());
        Ok(connection)
    }

    /// One call: sends `request` (and the file at `body`, if any), returns the response.
    pub async fn call(
        &self,
        peer: Peer,
        addr: &str,
        request: &[u8],
        body: Option<&Path>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let connection = self.connection_within(peer, addr, timeout).await?;
        // A cached connection whose peer restarted fails at once; nothing was sent on it yet,
        // so opening the stream on a fresh connection is safe.
        let (connection, mut send, recv) = match connection.open_bi().await {
            Ok((send, recv)) => (connection, send, recv),
            Err(_) => {
                self.forget(peer, &connection);
                let fresh = self.connection_within(peer, addr, timeout).await?;
                let (send, recv) = fresh.open_bi().await.map_err(|e| TransportError::Connect {
                    node: format!("{peer:?}"),
                    addr: addr.into(),
                    reason: e.to_string(),
                })?;
                (fresh, send, recv)
            }
        };
        let mut recv = recv;
        let work = async {
            let call_err = |e: &dyn std::fmt::Display| TransportError::Call(e.to_string());
            let len = u32::try_from(request.len()).map_err(|e| call_err(&e))?;
            send.write_all(&len.to_be_bytes())
                .await
                .map_err(|e| call_err(&e))?;
            send.write_all(request).await.map_err(|e| call_err(&e))?;
            if let Some(path) = body {
                let mut file = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| call_err(&e))?;
                let mut piece = vec![0u8; PACE_PIECE_BYTES];
                loop {
                    let n = tokio::io::AsyncReadExt::read(&mut file, &mut piece)
                        .await
                        .map_err(|e| call_err(&e))?;
                    if n == 0 {
                        break;
                    }
                    self.pacer.admit(n).await;
                    send.write_all(&piece[..n])
                        .await
                        .map_err(|e| call_err(&e))?;
                }
            }
            send.finish().map_err(|e| call_err(&e))?;
            recv.read_to_end(MESSAGE_BYTES_MAX)
                .await
                .map_err(|e| call_err(&e))
        };
        let result = match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout),
        };
        if result.is_err() && connection.close_reason().is_some() {
            self.forget(peer, &connection);
        }
        result
    }

    async fn connection_within(
        &self,
        peer: Peer,
        addr: &str,
        timeout: Duration,
    ) -> Result<quinn::Connection, TransportError> {
        match tokio::time::timeout(timeout, self.connection(peer, addr)).await {
            Ok(c) => c,
            Err(_) => Err(TransportError::Connect {
                node: format!("{peer:?}"),
                addr: addr.into(),
                reason: "timed out".into(),
            }),
        }
    }

    fn forget(&self, peer: Peer, connection: &quinn::Connection) {
        let mut connections = self.connections.lock().expect("connections lock");
        if connections
            .get(&peer)
            .is_some_and(|c| c.stable_id() == connection.stable_id())
        {
            connections.remove(&peer);
        }
    }

    /// Closes every connection and the endpoint.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
    }
}

fn peer_id(connection: &quinn::Connection) -> Option<NodeId> {
    let chain = connection
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    tls::node_id_of(chain.first()?)
}

async fn serve_call(
    peer: Option<NodeId>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    handler: Arc<dyn Handler>,
) {
    let mut len = [0u8; 4];
    if recv.read_exact(&mut len).await.is_err() {
        return;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MESSAGE_BYTES_MAX {
        let _ = send.reset(1u32.into());
        return;
    }
    let mut request = vec![0u8; len];
    if recv.read_exact(&mut request).await.is_err() {
        return;
    }
    let response = handler.handle(peer, request, Body { recv }).await;
    if send.write_all(&response).await.is_ok() {
        let _ = send.finish();
        // Wait for the peer to read it all; dropping the stream early would reset it.
        let _ = send.stopped().await;
    }
}

#[cfg(test)]
mod pacer_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_pacer_spaces_pieces_at_its_rate_across_callers() {
        // Goal: at 1 MiB/s, 4 MiB sent by two callers together take 4 s (paused time), and an
        // unlimited pacer takes none.
        let pacer = Arc::new(Pacer::default());
        let start = tokio::time::Instant::now();
        pacer.admit(1 << 20).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        pacer.set_rate(1 << 20);
        let send = |p: Arc<Pacer>| async move {
            for _ in 0..2 {
                p.admit(1 << 20).await;
            }
        };
        tokio::join!(send(pacer.clone()), send(pacer.clone()));
        // Four reservations of one second each: the last starts at 3 s.
        assert!(
            start.elapsed() >= Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        pacer.admit(1).await;
        assert!(
            start.elapsed() >= Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
    }
}
