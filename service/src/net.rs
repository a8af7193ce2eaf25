//! What the client-facing listeners share: the byte stream that turns into TLS at
//! STARTTLS/STLS, TLS handshakes with a deadline, and connection limits (per node and per
//! client address).

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

/// The byte stream under a session: plain TCP until STARTTLS, TLS after.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Only while the stream is being upgraded.
    Closed,
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Closed => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}

/// A TLS handshake that must finish within `timeout`; `None` when it fails or stalls.
pub async fn accept_tls(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> Option<Stream> {
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(Stream::Tls(Box::new(tls))),
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

/// STARTTLS/STLS: replaces a plaintext reader with a TLS one of `capacity`. Dropping the
/// old reader's buffer discards anything the client pipelined in the clear after the command
/// (CVE-2011-0411). `false` when the handshake failed: the connection is done.
pub async fn upgrade_to_tls(
    io: &mut tokio::io::BufReader<Stream>,
    acceptor: &TlsAcceptor,
    timeout: Duration,
    capacity: usize,
) -> bool {
    let old = std::mem::replace(io, tokio::io::BufReader::new(Stream::Closed));
    let Stream::Plain(tcp) = old.into_inner() else {
        return false;
    };
    let Some(tls) = accept_tls(acceptor, tcp, timeout).await else {
        return false;
    };
    *io = tokio::io::BufReader::with_capacity(capacity, tls);
    true
}

/// Open connections of one service: at most `total` together, `per_ip` from one address.
#[derive(Debug)]
pub struct ConnectionLimits {
    /// One permit per open connection.
    total: Arc<Semaphore>,
    per_ip_max: usize,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// Why a connection was not admitted (the text after the protocol's error prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Busy,
    TooManyFromAddress,
    /// This node cannot store anything (its disk failed): clients should use another node.
    Unhealthy,
}

/// A connection's share of the limits; dropping it gives them back.
#[derive(Debug)]
pub struct ConnectionSlot {
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

impl ConnectionLimits {
    pub fn new(total: usize, per_ip_max: usize) -> ConnectionLimits {
        ConnectionLimits {
            total: Arc::new(Semaphore::new(total)),
            per_ip_max,
            per_ip: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn admit(&self, ip: IpAddr) -> Result<ConnectionSlot, Refusal> {
        let permit = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Busy)?;
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.per_ip_max {
            return Err(Refusal::TooManyFromAddress);
        }
        *n += 1;
        Ok(ConnectionSlot {
            _permit: permit,
            ip,
            per_ip: self.per_ip.clone(),
        })
    }
}

/// Writes and flushes `out` (emptying it) within `timeout`.
pub async fn write_out(
    stream: &mut Stream,
    out: &mut Vec<u8>,
    timeout: Duration,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    if out.is_empty() {
        return Ok(());
    }
    let bytes = std::mem::take(out);
    let write = async {
        stream.write_all(&bytes).await?;
        stream.flush().await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Binds `addr` and serves it in the background, each connection in its own task by
/// `handle`; returns the bound address.
pub async fn listen<F, Fut>(
    addr: std::net::SocketAddr,
    name: &'static str,
    handle: F,
) -> anyhow::Result<std::net::SocketAddr>
where
    F: Fn(TcpStream, std::net::SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for {name} on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    spawn_accept_loop(listener, name, handle);
    Ok(bound)
}

/// Accepts connections on `listener` forever, each handled in its own task by `handle`.
fn spawn_accept_loop<F, Fut>(listener: tokio::net::TcpListener, name: &'static str, handle: F)
where
    F: Fn(TcpStream, std::net::SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(handle(stream, peer));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("{name} accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}

/// Admits a connection under `limits`, or tells the client (with the protocol's line for
/// the reason) and gives `None`.
///
/// On an implicit-TLS listener the refused connection is closed without a word: a client
/// there expects a TLS handshake, and a plaintext line reads to it as a corrupt record, while
/// a handshake to say "too busy" is work a node over its limits should not take on.
pub async fn admit_or_refuse(
    limits: &ConnectionLimits,
    healthy: bool,
    stream: &mut TcpStream,
    ip: IpAddr,
    implicit_tls: bool,
    line: impl FnOnce(Refusal) -> String,
) -> Option<ConnectionSlot> {
    let admitted = if healthy {
        limits.admit(ip)
    } else {
        Err(Refusal::Unhealthy)
    };
    match admitted {
        Ok(slot) => Some(slot),
        Err(refusal) => {
            if !implicit_tls {
                refuse(stream, &line(refusal)).await;
            }
            None
        }
    }
}

/// Tells a client it was not admitted (one line, best effort, bounded in time).
pub async fn refuse(stream: &mut TcpStream, line: &str) {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(line.as_bytes())).await;
}
