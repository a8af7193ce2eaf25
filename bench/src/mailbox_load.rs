//! Mailbox access load: IMAP session mixes, IMAP IDLE wake-ups and POP3 download sessions,
//! over implicit TLS, each client its own user, through every node in turn (as DNS round
//! robin spreads them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::smtp_load::percentile;

/// How long a session waits for the next line of an answer before it gives up (a server
/// that stops answering fails the run instead of hanging it).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Test nodes have self-signed certificates: the load generator accepts any.
fn connector() -> tokio_rustls::TlsConnector {
    service::client_tls::unverified_connector()
}

pub(crate) struct Conn {
    io: BufReader<TlsStream<TcpStream>>,
    tag: u64,
}

impl Conn {
    pub(crate) async fn open(addr: &str) -> anyhow::Result<Conn> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?.to_owned();
        let tls = connector().connect(name, tcp).await?;
        let mut conn = Conn {
            io: BufReader::new(tls),
            tag: 0,
        };
        conn.line().await?; // greeting
        Ok(conn)
    }

    async fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        let read = tokio::time::timeout(ANSWER_TIMEOUT, self.io.read_line(&mut line))
            .await
            .with_context(|| format!("no answer within {ANSWER_TIMEOUT:?}"))??;
        if read == 0 {
            bail!("connection closed");
        }
        Ok(line)
    }

    /// Sends `command` under the next tag; returns the tag.
    async fn send_tagged(&mut self, command: &str) -> anyhow::Result<String> {
        self.tag += 1;
        let tag = format!("b{}", self.tag);
        self.io
            .get_mut()
            .write_all(format!("{tag} {command}\r\n").as_bytes())
            .await?;
        // TLS holds written bytes until flushed: an unflushed command may never leave.
        self.io.get_mut().flush().await?;
        Ok(tag)
    }

    /// An IMAP command; the untagged lines (literal contents skipped) and the status.
    pub(crate) async fn imap(&mut self, command: &str) -> anyhow::Result<Vec<String>> {
        let tag = self.send_tagged(command).await?;
        let mut lines = Vec::new();
        loop {
            let line = self.line().await.with_context(|| {
                let verb = command.split(' ').next().unwrap_or_default();
                format!("{verb}, after {} lines of its answer", lines.len())
            })?;
            if let Some(rest) = line.strip_prefix(&format!("{tag} ")) {
                if !rest.starts_with("OK") {
                    bail!("{command}: {}", line.trim());
                }
                return Ok(lines);
            }
            // A literal: skip its octets (the line goes on after them).
            if let Some(n) = line
                .trim_end()
                .strip_suffix('}')
                .and_then(|l| l.rsplit_once('{'))
                .and_then(|(_, n)| n.parse::<u64>().ok())
            {
                let mut skip = (&mut self.io).take(n);
                tokio::io::copy(&mut skip, &mut tokio::io::sink()).await?;
            }
            lines.push(line);
        }
    }

    /// Starts IDLE: sends it and waits for the server's continuation.
    async fn idle_start(&mut self) -> anyhow::Result<()> {
        let tag = self.send_tagged("IDLE").await?;
        loop {
            let line = self.line().await?;
            if line.starts_with('+') {
                return Ok(());
            }
            if line.starts_with(&format!("{tag} ")) {
                bail!("IDLE: {}", line.trim());
            }
        }
    }

    /// While idling: waits for `* N EXISTS` with N at least `count`.
    async fn wait_exists(&mut self, count: u32) -> anyhow::Result<()> {
        loop {
            if exists_in(&self.line().await?).is_some_and(|n| n >= count) {
                return Ok(());
            }
        }
    }

    /// Ends IDLE with DONE and reads the tagged OK.
    async fn idle_done(&mut self) -> anyhow::Result<()> {
        let tag = format!("b{} ", self.tag);
        self.io.get_mut().write_all(b"DONE\r\n").await?;
        self.io.get_mut().flush().await?;
        loop {
            let line = self.line().await?;
            if let Some(rest) = line.strip_prefix(&tag) {
                if !rest.starts_with("OK") {
                    bail!("DONE: {}", line.trim());
                }
                return Ok(());
            }
        }
    }

    /// Sends a POP3 command and reads its status line, which must be `+OK`.
    async fn pop3_status(&mut self, command: &str) -> anyhow::Result<String> {
        self.io
            .get_mut()
            .write_all(format!("{command}\r\n").as_bytes())
            .await?;
        self.io.get_mut().flush().await?;
        let status = self.line().await?;
        if !status.starts_with("+OK") {
            bail!("{command}: {}", status.trim());
        }
        Ok(status)
    }

    /// A POP3 command; the status line, and the body of a multi-line answer when `multi`.
    pub(crate) async fn pop3(
        &mut self,
        command: &str,
        multi: bool,
    ) -> anyhow::Result<(String, usize)> {
        let status = self.pop3_status(command).await?;
        let mut bytes = 0;
        if multi {
            loop {
                let line = self.line().await?;
                if line == ".\r\n" {
                    break;
                }
                bytes += line.len();
            }
        }
        Ok((status, bytes))
    }

    /// A POP3 command with a multi-line answer; its lines (dot-unstuffed, without CRLF).
    pub(crate) async fn pop3_lines(&mut self, command: &str) -> anyhow::Result<Vec<String>> {
        self.pop3_status(command).await?;
        let mut lines = Vec::new();
        loop {
            let line = self.line().await?;
            if line == ".\r\n" {
                return Ok(lines);
            }
            let line = line.trim_end_matches(['\r', '\n']);
            lines.push(line.strip_prefix('.').unwrap_or(line).to_string());
        }
    }

    /// USER and PASS.
    pub(crate) async fn pop3_login(&mut self, user: &str, password: &str) -> anyhow::Result<()> {
        self.pop3_status(&format!("USER {user}")).await?;
        self.pop3_status(&format!("PASS {password}")).await?;
        Ok(())
    }

    /// STAT: how many messages the maildrop holds.
    pub(crate) async fn pop3_stat(&mut self) -> anyhow::Result<usize> {
        let stat = self.pop3_status("STAT").await?;
        stat.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("STAT answered {}", stat.trim()))
    }
}

pub struct Load {
    pub servers: Vec<String>,
    /// SMTP servers for the mail that IDLE wake-ups wait for.
    pub smtp: Vec<String>,
    /// One user per client.
    pub users: Vec<String>,
    pub password: String,
    pub sessions_per_client: usize,
}

fn ops_summary(name: &str, mut latencies: Vec<Duration>, seconds: f64) -> serde_json::Value {
    latencies.sort();
    serde_json::json!({
        "op": name,
        "count": latencies.len(),
        "p50_ms": percentile(&latencies, 0.5),
        "p90_ms": percentile(&latencies, 0.9),
        "p99_ms": percentile(&latencies, 0.99),
        "max_ms": percentile(&latencies, 1.0),
        "per_sec": latencies.len() as f64 / seconds,
    })
}

const IMAP_OPS: [&str; 8] = [
    "LOGIN",
    "SELECT",
    "FETCH headers",
    "SEARCH",
    "FETCH body",
    "STORE flags",
    "EXPUNGE",
    "LOGOUT",
];

/// The IMAP session mix: LOGIN, SELECT INBOX, FETCH the headers of every message, SEARCH by
/// subject, FETCH the newest message's body, mark it \Deleted, EXPUNGE, LOGOUT.
async fn imap_session(addr: &str, user: &str, password: &str) -> anyhow::Result<[Duration; 8]> {
    let mut t = [Duration::ZERO; 8];
    let mut conn = Conn::open(addr).await?;
    let timed = Instant::now();
    conn.imap(&format!("LOGIN \"{user}\" \"{password}\""))
        .await?;
    t[0] = timed.elapsed();
    let timed = Instant::now();
    let lines = conn.imap("SELECT INBOX").await?;
    t[1] = timed.elapsed();
    let exists = exists(&lines)?;
    if exists == 0 {
        bail!("{user}'s INBOX is empty: preload more messages");
    }
    let timed = Instant::now();
    conn.imap("FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])")
        .await?;
    t[2] = timed.elapsed();
    let timed = Instant::now();
    // Every preloaded message's subject holds "bench": the server reads every header.
    let found = conn.imap("SEARCH SUBJECT \"bench\"").await?;
    t[3] = timed.elapsed();
    if !found
        .iter()
        .any(|l| l.starts_with("* SEARCH ") && l.len() > 10)
    {
        bail!("SEARCH SUBJECT found none of {user}'s {exists} messages");
    }
    let timed = Instant::now();
    conn.imap(&format!("FETCH {exists} BODY[]")).await?;
    t[4] = timed.elapsed();
    let timed = Instant::now();
    conn.imap(&format!("STORE {exists} +FLAGS.SILENT (\\Deleted)"))
        .await?;
    t[5] = timed.elapsed();
    let timed = Instant::now();
    conn.imap("EXPUNGE").await?;
    t[6] = timed.elapsed();
    let timed = Instant::now();
    conn.imap("LOGOUT").await?;
    t[7] = timed.elapsed();
    Ok(t)
}

/// Waits (up to two minutes) until every user's INBOX holds at least `count` messages.
pub async fn wait_loaded(
    servers: &[String],
    users: &[String],
    password: &str,
    count: usize,
) -> anyhow::Result<()> {
    let addr = servers.first().context("no IMAP server")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    for user in users {
        loop {
            let mut conn = Conn::open(addr).await?;
            conn.imap(&format!("LOGIN \"{user}\" \"{password}\""))
                .await?;
            let status = conn.imap("STATUS INBOX (MESSAGES)").await?;
            let _ = conn.imap("LOGOUT").await;
            let messages = status
                .iter()
                .find_map(|l| {
                    let rest = l.split("(MESSAGES ").nth(1)?;
                    rest.split(')').next()?.trim().parse::<usize>().ok()
                })
                .context("no STATUS MESSAGES")?;
            if messages >= count {
                break;
            }
            if Instant::now() > deadline {
                bail!("{user}'s INBOX holds {messages} of {count} preloaded messages");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(())
}

/// Runs `session` `sessions_per_client` times in a row for every client, all clients at
/// once (client `c` on user `c`, round `s`); every outcome, in no particular order.
async fn every_client<T, F, Fut>(load: &Arc<Load>, session: F) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(Arc<Load>, usize, usize, String) -> Fut + Send + Sync + Copy + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send,
{
    let mut tasks = Vec::new();
    for (c, user) in load.users.iter().enumerate() {
        let (load, user) = (load.clone(), user.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for s in 0..load.sessions_per_client {
                out.push(session(load.clone(), c, s, user.clone()).await?);
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// N of an untagged `* N EXISTS` line.
fn exists_in(line: &str) -> Option<u32> {
    line.strip_prefix("* ")?
        .strip_suffix(" EXISTS\r\n")?
        .parse()
        .ok()
}

/// The `* N EXISTS` count in a SELECT's answer.
fn exists(lines: &[String]) -> anyhow::Result<u32> {
    lines.iter().find_map(|l| exists_in(l)).context("no EXISTS")
}

pub async fn imap(load: Load) -> anyhow::Result<serde_json::Value> {
    let load = Arc::new(load);
    let started = Instant::now();
    let sessions = every_client(&load, |load, c, s, user| async move {
        let addr = &load.servers[(c + s) % load.servers.len()];
        imap_session(addr, &user, &load.password)
            .await
            .with_context(|| format!("{user} via {addr}"))
    })
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let ops: Vec<serde_json::Value> = IMAP_OPS
        .iter()
        .enumerate()
        .map(|(i, name)| ops_summary(name, sessions.iter().map(|s| s[i]).collect(), seconds))
        .collect();
    let all: Vec<Duration> = sessions.iter().flat_map(|s| s.iter().copied()).collect();
    let total = ops_summary("all", all, seconds);
    Ok(serde_json::json!({
        "clients": load.users.len(),
        "sessions": sessions.len(),
        "seconds": seconds,
        "ops_per_sec": total["per_sec"],
        "p50_ms": total["p50_ms"],
        "p90_ms": total["p90_ms"],
        "p99_ms": total["p99_ms"],
        "max_ms": total["max_ms"],
        "ops": ops,
    }))
}

/// One POP3 download session: USER/PASS, STAT, RETR every message, DELE the oldest, QUIT
/// (which removes it; the rest stay for the next session, as a client that keeps mail on the
/// server for a while does).
async fn pop3_session(addr: &str, user: &str, password: &str) -> anyhow::Result<usize> {
    let mut conn = Conn::open(addr).await?;
    conn.pop3_login(user, password).await?;
    let count = conn.pop3_stat().await?;
    if count == 0 {
        bail!("{user}'s maildrop is empty: preload more messages");
    }
    let mut bytes = 0;
    for i in 1..=count {
        bytes += conn.pop3(&format!("RETR {i}"), true).await?.1;
    }
    conn.pop3("DELE 1", false).await?;
    conn.pop3("QUIT", false).await?;
    Ok(bytes)
}

pub async fn pop3(load: Load) -> anyhow::Result<serde_json::Value> {
    let load = Arc::new(load);
    let started = Instant::now();
    let sessions = every_client(&load, |load, c, s, user| async move {
        let addr = &load.servers[(c + s) % load.servers.len()];
        let t = Instant::now();
        let bytes = pop3_session(addr, &user, &load.password)
            .await
            .with_context(|| format!("{user} via {addr}"))?;
        Ok((t.elapsed(), bytes))
    })
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let bytes: usize = sessions.iter().map(|s| s.1).sum();
    let summary = ops_summary("session", sessions.iter().map(|s| s.0).collect(), seconds);
    Ok(serde_json::json!({
        "clients": load.users.len(),
        "sessions": sessions.len(),
        "seconds": seconds,
        "sessions_per_sec": summary["per_sec"],
        "p50_ms": summary["p50_ms"],
        "p90_ms": summary["p90_ms"],
        "p99_ms": summary["p99_ms"],
        "max_ms": summary["max_ms"],
        "mbytes_per_sec": bytes as f64 / seconds / 1e6,
    }))
}

/// IDLE wake-ups: each client selects its INBOX and idles; the load generator then sends it
/// one message by SMTP and times from that message's `250` to the `* N EXISTS` that reports
/// it on the idling connection. `sessions_per_client` rounds per client, all clients at once.
pub async fn idle_wakeups(load: Load) -> anyhow::Result<serde_json::Value> {
    if load.smtp.is_empty() {
        bail!("IDLE wake-ups need an SMTP server to send the mail they wait for");
    }
    let load = Arc::new(load);
    let started = Instant::now();
    let waits = every_client(&load, |load, c, s, user| async move {
        let addr = &load.servers[(c + s) % load.servers.len()];
        let smtp = &load.smtp[(c + s + 1) % load.smtp.len()];
        idle_wakeup(addr, smtp, &user, &load.password)
            .await
            .with_context(|| format!("{user} idling via {addr}, mail via {smtp}"))
    })
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let mut summary = ops_summary("IDLE wake-up", waits, seconds);
    summary["clients"] = load.users.len().into();
    Ok(summary)
}

async fn idle_wakeup(
    addr: &str,
    smtp: &str,
    user: &str,
    password: &str,
) -> anyhow::Result<Duration> {
    let mut conn = Conn::open(addr).await?;
    conn.imap(&format!("LOGIN \"{user}\" \"{password}\""))
        .await?;
    let exists = exists(&conn.imap("SELECT INBOX").await?)?;
    conn.idle_start().await?;
    let mut sender = crate::smtp_load::Conn::open(smtp).await?;
    // Unique in the process: mailgrid drops a repeat of a message it already delivered.
    static SENT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let i = SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let run = format!("idle-{}", std::process::id());
    sender
        .send(user, &crate::smtp_load::message(&run, i, 2048))
        .await?;
    let accepted = Instant::now();
    sender.quit().await;
    tokio::time::timeout(Duration::from_secs(60), conn.wait_exists(exists + 1))
        .await
        .context("no EXISTS within 60 s of the 250")??;
    let waited = accepted.elapsed();
    conn.idle_done().await?;
    conn.imap("LOGOUT").await?;
    Ok(waited)
}
