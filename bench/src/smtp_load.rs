//! SMTP delivery load: N concurrent senders, each on its own connection to one of the target
//! servers (round robin, as DNS would spread them), sending messages of a given size to
//! recipients spread over the users. A message counts when the server answered `250` to its
//! data; latency is from MAIL FROM to that reply.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};
use tokio::net::TcpStream;

/// How big the messages of a run are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// Every message this many bytes.
    Fixed(usize),
    /// Each message's size drawn from SPECmail2001's distribution (`workload::SIZES`), the same
    /// for message `i` in every run.
    Spec,
}

impl Size {
    /// One item of `--sizes`: a number of bytes or `spec`.
    pub fn parse(item: &str) -> anyhow::Result<Size> {
        match item.trim() {
            "spec" => Ok(Size::Spec),
            n => n
                .parse()
                .map(Size::Fixed)
                .with_context(|| format!("--sizes: {n:?} is neither a number of bytes nor spec")),
        }
    }

    pub fn of(self, i: usize) -> usize {
        match self {
            Size::Fixed(n) => n,
            Size::Spec => crate::workload::Rng::new(i as u64).weighted(&crate::workload::SIZES),
        }
    }

    /// For message ids and file names: the number of bytes, or `spec`.
    pub fn tag(self) -> String {
        match self {
            Size::Fixed(n) => n.to_string(),
            Size::Spec => "spec".into(),
        }
    }

    /// As results record it: the number of bytes, or "spec".
    pub fn json(self) -> serde_json::Value {
        match self {
            Size::Fixed(n) => n.into(),
            Size::Spec => self.tag().into(),
        }
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Size::Fixed(n) => write!(f, "{n} B"),
            Size::Spec => write!(f, "SPECmail2001 sizes"),
        }
    }
}

pub struct Load {
    pub servers: Vec<String>,
    pub users: Vec<String>,
    pub messages: usize,
    pub size: Size,
    pub concurrency: usize,
    /// Distinguishes runs so no message repeats an earlier one (which would be deduplicated).
    pub run: String,
    /// Per user (same index), the server to send its mail to; `None`: each sender keeps one
    /// connection to one server, round robin, as DNS would spread clients.
    pub route: Option<Vec<usize>>,
    /// Open-loop arrivals: message `i` is due `i / rate` seconds after the start, and its
    /// latency counts from then (so a server falling behind shows as latency, not as a
    /// slower sender). `None`: each sender sends its next message as soon as one is done.
    pub rate: Option<f64>,
    /// STARTTLS on every connection before the first message.
    pub tls: bool,
}

/// What a connection runs over: plain TCP, or TLS after STARTTLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub(crate) struct Conn {
    reader: BufReader<ReadHalf<Box<dyn Stream>>>,
    writer: WriteHalf<Box<dyn Stream>>,
}

impl Conn {
    fn over(io: Box<dyn Stream>) -> Conn {
        let (r, w) = tokio::io::split(io);
        Conn {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    pub(crate) async fn open(addr: &str) -> anyhow::Result<Conn> {
        Conn::connect(addr, false).await
    }

    /// A session greeted and past EHLO; with `tls`, also past STARTTLS and the second EHLO.
    /// The server's certificate is not verified (the nodes of a local cluster have their own).
    pub(crate) async fn connect(addr: &str, tls: bool) -> anyhow::Result<Conn> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        let mut c = Conn::over(Box::new(s));
        c.expect(220).await?;
        let extensions = c.ehlo().await?;
        if !tls {
            return Ok(c);
        }
        if !extensions.lines().any(|l| {
            l.get(4..)
                .is_some_and(|e| e.trim().eq_ignore_ascii_case("STARTTLS"))
        }) {
            bail!("{addr} does not offer STARTTLS");
        }
        c.writer.write_all(b"STARTTLS\r\n").await?;
        c.expect(220).await?;
        if !c.reader.buffer().is_empty() {
            bail!("{addr} sent data after its 220 to STARTTLS");
        }
        let io = c.reader.into_inner().unsplit(c.writer);
        let name = rustls::pki_types::ServerName::try_from("localhost")?.to_owned();
        let tls = service::client_tls::unverified_connector()
            .connect(name, io)
            .await
            .with_context(|| format!("TLS with {addr}"))?;
        let mut c = Conn::over(Box::new(tls));
        c.ehlo().await?;
        Ok(c)
    }

    /// EHLO; the server's reply (its extensions).
    async fn ehlo(&mut self) -> anyhow::Result<String> {
        self.writer.write_all(b"EHLO bench.test\r\n").await?;
        // Over TLS written bytes wait in the session until flushed.
        self.writer.flush().await?;
        let (code, text) = self.reply().await?;
        if code != 250 {
            bail!("expected 250 to EHLO, got {}", text.trim_end());
        }
        Ok(text)
    }

    async fn reply(&mut self) -> anyhow::Result<(u16, String)> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await? == 0 {
                bail!("connection closed");
            }
            all.push_str(&line);
            if line.len() < 4 {
                bail!("short reply {line:?}");
            }
            if line.as_bytes()[3] != b'-' {
                return Ok((line[..3].parse()?, all));
            }
        }
    }

    async fn expect(&mut self, code: u16) -> anyhow::Result<()> {
        let (got, text) = self.reply().await?;
        if got != code {
            bail!("expected {code}, got {}", text.trim_end());
        }
        Ok(())
    }

    /// One message with a pipelined envelope (MAIL, RCPT, DATA in one write).
    pub(crate) async fn send(&mut self, to: &str, body: &[u8]) -> anyhow::Result<()> {
        self.send_to(&[to], body).await.map(|_| ())
    }

    /// One message to several recipients with a pipelined envelope; how long the envelope
    /// took (to the 354) and how long the data took (to its 250).
    pub(crate) async fn send_to(
        &mut self,
        to: &[&str],
        body: &[u8],
    ) -> anyhow::Result<(Duration, Duration)> {
        let started = Instant::now();
        let mut envelope = String::from("MAIL FROM:<bench@remote.test>\r\n");
        for rcpt in to {
            envelope.push_str(&format!("RCPT TO:<{rcpt}>\r\n"));
        }
        envelope.push_str("DATA\r\n");
        self.writer.write_all(envelope.as_bytes()).await?;
        self.writer.flush().await?;
        self.expect(250).await?;
        for _ in to {
            self.expect(250).await?;
        }
        self.expect(354).await?;
        let envelope_took = started.elapsed();
        let started = Instant::now();
        self.writer.write_all(body).await?;
        self.writer.write_all(b".\r\n").await?;
        self.writer.flush().await?;
        self.expect(250).await?;
        Ok((envelope_took, started.elapsed()))
    }

    pub(crate) async fn quit(mut self) {
        let _ = self.writer.write_all(b"QUIT\r\n").await;
        let _ = self.writer.flush().await;
        let _ = self.reply().await;
    }
}

/// A message of exactly `size` bytes before the end marker, lines of 66 octets, nothing to
/// dot-stuff; unique per (run, i).
pub fn message(run: &str, i: usize, size: usize) -> Vec<u8> {
    filled(
        format!(
            "From: bench@remote.test\r\nTo: user@example.test\r\nSubject: bench {run} {i}\r\nMessage-ID: <{run}.{i}@bench>\r\n\r\n"
        ),
        size,
    )
}

/// `header` (ending in its blank line) and a body of 66-octet lines, `size` bytes in all.
pub fn filled(header: String, size: usize) -> Vec<u8> {
    let mut m = header.into_bytes();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ..\r\n";
    while m.len() + line.len() <= size {
        m.extend_from_slice(line);
    }
    while m.len() + 2 < size {
        m.push(b'x');
    }
    m.extend_from_slice(b"\r\n");
    m
}

pub fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

pub async fn run(load: Load) -> anyhow::Result<serde_json::Value> {
    let load = Arc::new(load);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..load.concurrency {
        let load = load.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            // This sender's connections, by server, opened when first needed.
            let mut conns: Vec<Option<Conn>> = load.servers.iter().map(|_| None).collect();
            let mut latencies = Vec::new();
            let mut bytes = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= load.messages {
                    for conn in conns.into_iter().flatten() {
                        conn.quit().await;
                    }
                    return Ok::<_, anyhow::Error>((latencies, bytes));
                }
                let body = message(&load.run, i, load.size.of(i));
                let user = i % load.users.len();
                let to = &load.users[user];
                let server = match &load.route {
                    Some(route) => route[user],
                    None => w % load.servers.len(),
                };
                let conn = match &mut conns[server] {
                    Some(conn) => conn,
                    empty => empty.insert(Conn::connect(&load.servers[server], load.tls).await?),
                };
                let t = match load.rate {
                    Some(rate) => {
                        let due = started + Duration::from_secs_f64(i as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    None => Instant::now(),
                };
                conn.send(to, &body)
                    .await
                    .with_context(|| format!("message {i} via {}", load.servers[server]))?;
                latencies.push(t.elapsed());
                bytes += body.len() as u64;
            }
        }));
    }
    let (mut all, mut bytes) = (Vec::new(), 0u64);
    for t in tasks {
        let (latencies, sent) = t.await??;
        all.extend(latencies);
        bytes += sent;
    }
    let messages = all.len().max(1) as u64;
    let mut r = summary(
        all,
        load.concurrency,
        load.size.json(),
        started.elapsed().as_secs_f64(),
    );
    r["mean_size"] = (bytes / messages).into();
    Ok(r)
}

/// Throughput and latency percentiles of one run, as the JSON every bench run writes.
pub fn summary(
    mut latencies: Vec<Duration>,
    concurrency: usize,
    size: impl Into<serde_json::Value>,
    seconds: f64,
) -> serde_json::Value {
    let size = size.into();
    latencies.sort();
    serde_json::json!({
        "concurrency": concurrency,
        "messages": latencies.len(),
        "size": size,
        "seconds": seconds,
        "msgs_per_sec": latencies.len() as f64 / seconds,
        "p50_ms": percentile(&latencies, 0.5),
        "p90_ms": percentile(&latencies, 0.9),
        "p99_ms": percentile(&latencies, 0.99),
        "max_ms": percentile(&latencies, 1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers a greeted session's commands until QUIT: 250 to each, 354 to DATA, 250 to
    /// the end of the data.
    async fn accept_mail(r: impl AsyncRead + Unpin, mut w: impl AsyncWrite + Unpin) {
        let mut lines = BufReader::new(r).lines();
        let mut in_data = false;
        while let Ok(Some(line)) = lines.next_line().await {
            let reply: &[u8] = match (in_data, line.as_str()) {
                (true, ".") => {
                    in_data = false;
                    b"250 queued\r\n"
                }
                (true, _) => continue,
                (false, "DATA") => {
                    in_data = true;
                    b"354 go on\r\n"
                }
                (false, "QUIT") => return,
                (false, _) => b"250 ok\r\n",
            };
            if w.write_all(reply).await.is_err() || w.flush().await.is_err() {
                return;
            }
        }
    }

    /// Accepts every message: enough SMTP for `Conn` (greeting, EHLO, pipelined envelope,
    /// data, QUIT) and nothing else.
    async fn accepting_server() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    w.write_all(b"220 test\r\n").await.unwrap();
                    accept_mail(r, w).await;
                });
            }
        });
        addr
    }

    /// Like `accepting_server`, but offers STARTTLS (a real rustls handshake, the node's own
    /// self-signed certificate code) and refuses mail until the session is encrypted.
    async fn starttls_server(dir: &std::path::Path) -> String {
        let (cert, key) = service::server_tls::default_paths(dir);
        std::fs::create_dir_all(cert.parent().unwrap()).unwrap();
        service::server_tls::ensure_self_signed(dir, "bench.test").unwrap();
        let acceptor =
            tokio_rustls::TlsAcceptor::from(service::server_tls::load(&cert, &key).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let mut plain = BufReader::new(stream);
                    plain.get_mut().write_all(b"220 test\r\n").await.unwrap();
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if plain.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let reply: &[u8] = match line.trim_end() {
                            "EHLO bench.test" => b"250-test\r\n250 STARTTLS\r\n",
                            "STARTTLS" => break,
                            _ => b"530 5.7.0 Must issue a STARTTLS command first\r\n",
                        };
                        plain.get_mut().write_all(reply).await.unwrap();
                    }
                    plain
                        .get_mut()
                        .write_all(b"220 go ahead\r\n")
                        .await
                        .unwrap();
                    let Ok(tls) = acceptor.accept(plain.into_inner()).await else {
                        return;
                    };
                    let (r, w) = tokio::io::split(tls);
                    accept_mail(r, w).await;
                });
            }
        });
        addr
    }

    fn load(server: String, tls: bool) -> Load {
        Load {
            servers: vec![server],
            users: vec!["a@example.test".into(), "b@example.test".into()],
            messages: 11,
            size: Size::Fixed(512),
            concurrency: 4,
            run: "test".into(),
            route: None,
            rate: None,
            tls,
        }
    }

    #[tokio::test]
    async fn tls_sends_every_message_after_starttls_and_a_server_without_it_is_named() {
        // Goal: `--tls` sends over STARTTLS (the fixture refuses MAIL before it), and a server
        // that does not offer STARTTLS fails the run with an error that says so.
        let dir = tempfile::tempdir().unwrap();
        let summary = run(load(starttls_server(dir.path()).await, true))
            .await
            .unwrap();
        assert_eq!(summary["messages"], 11);
        let plain = run(load(starttls_server(dir.path()).await, false)).await;
        assert!(format!("{:#}", plain.unwrap_err()).contains("530"));
        let err = run(load(accepting_server().await, true)).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("does not offer STARTTLS"),
            "{err:#}"
        );
    }

    #[test]
    fn spec_sizes_follow_specmail_and_repeat_per_message() {
        // Goal: `--sizes spec` gives each message a size from SPECmail2001's table, the same
        // for the same message number, with the table's mean over many messages.
        let sizes: Vec<usize> = (0..20_000).map(|i| Size::Spec.of(i)).collect();
        assert!(sizes
            .iter()
            .all(|s| crate::workload::SIZES.iter().any(|(v, _)| v == s)));
        assert_eq!(Size::Spec.of(7), sizes[7]);
        let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
        let expected = crate::workload::mean(&crate::workload::SIZES);
        assert!((mean / expected - 1.0).abs() < 0.1, "{mean} vs {expected}");
        assert_eq!(Size::parse("spec").unwrap(), Size::Spec);
        assert_eq!(Size::parse(" 4096").unwrap(), Size::Fixed(4096));
        assert!(Size::parse("4k").is_err());
    }

    #[tokio::test]
    async fn a_rate_spaces_the_messages_and_every_one_is_counted() {
        // Goal: `--rate R` releases message i no earlier than i/R seconds after the start,
        // so 11 messages at 50/s take at least 200 ms (unpaced, they take a few ms here).
        let load = Load {
            servers: vec![accepting_server().await],
            users: vec!["a@example.test".into(), "b@example.test".into()],
            messages: 11,
            size: Size::Fixed(512),
            concurrency: 4,
            run: "rate-test".into(),
            route: None,
            rate: Some(50.0),
            tls: false,
        };
        let started = Instant::now();
        let summary = run(load).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(summary["messages"], 11);
    }
}
