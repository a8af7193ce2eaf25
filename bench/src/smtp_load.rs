//! SMTP delivery load: N concurrent senders, each on its own connection to one of the target
//! servers (round robin, as DNS would spread them), sending messages of a given size to
//! recipients spread over the users. A message counts when the server answered `250` to its
//! data; latency is from MAIL FROM to that reply.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct Load {
    pub servers: Vec<String>,
    pub users: Vec<String>,
    pub messages: usize,
    pub size: usize,
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
}

pub(crate) struct Conn {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Conn {
    pub(crate) async fn open(addr: &str) -> anyhow::Result<Conn> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut c = Conn {
            reader: BufReader::new(r),
            writer: w,
        };
        c.expect(220).await?;
        c.writer.write_all(b"EHLO bench.test\r\n").await?;
        c.expect(250).await?;
        Ok(c)
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
        self.expect(250).await?;
        for _ in to {
            self.expect(250).await?;
        }
        self.expect(354).await?;
        let envelope_took = started.elapsed();
        let started = Instant::now();
        self.writer.write_all(body).await?;
        self.writer.write_all(b".\r\n").await?;
        self.expect(250).await?;
        Ok((envelope_took, started.elapsed()))
    }

    pub(crate) async fn quit(mut self) {
        let _ = self.writer.write_all(b"QUIT\r\n").await;
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
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= load.messages {
                    for conn in conns.iter_mut().flatten() {
                        let _ = conn.writer.write_all(b"QUIT\r\n").await;
                    }
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let body = message(&load.run, i, load.size);
                let user = i % load.users.len();
                let to = &load.users[user];
                let server = match &load.route {
                    Some(route) => route[user],
                    None => w % load.servers.len(),
                };
                let conn = match &mut conns[server] {
                    Some(conn) => conn,
                    empty => empty.insert(Conn::open(&load.servers[server]).await?),
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
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(summary(
        all,
        load.concurrency,
        load.size,
        started.elapsed().as_secs_f64(),
    ))
}

/// Throughput and latency percentiles of one run, as the JSON every bench run writes.
pub fn summary(
    mut latencies: Vec<Duration>,
    concurrency: usize,
    size: usize,
    seconds: f64,
) -> serde_json::Value {
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

    /// Accepts every message: enough SMTP for `Conn` (greeting, EHLO, pipelined envelope,
    /// data, QUIT) and nothing else.
    async fn accepting_server() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut lines = BufReader::new(r).lines();
                    w.write_all(b"220 test\r\n").await.unwrap();
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
                        if w.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_rate_spaces_the_messages_and_every_one_is_counted() {
        // Goal: `--rate R` releases message i no earlier than i/R seconds after the start,
        // so 11 messages at 50/s take at least 200 ms (unpaced, they take a few ms here).
        let load = Load {
            servers: vec![accepting_server().await],
            users: vec!["a@example.test".into(), "b@example.test".into()],
            messages: 11,
            size: 512,
            concurrency: 4,
            run: "rate-test".into(),
            route: None,
            rate: Some(50.0),
        };
        let started = Instant::now();
        let summary = run(load).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(summary["messages"], 11);
    }
}
