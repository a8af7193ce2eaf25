//! One POP3 connection: AUTHORIZATION (USER/PASS, AUTH PLAIN, STLS) → TRANSACTION (STAT,
//! LIST, RETR, TOP, DELE, RSET, UIDL, NOOP) → UPDATE at QUIT, where the deletions are one
//! replicated expunge: `+OK` only once it is committed, nothing deleted otherwise.
//!
//! The session sees the maildrop as it was at login (RFC 1939). While it holds the maildrop
//! a background task renews the replicated lock; the lock is released at the end.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use service::partition::{MailError, PartitionCommand, PartitionResponse};
use service::types::{BodyHash, Uid, UidValidity};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::{Pop3, Pop3Kind};
use service::lines::{read_line, trim_eol, Line};
use service::mail;
use service::net::{upgrade_to_tls, Stream};
use service::policy::throttle::Verdict;
use service::sasl::decode_plain;

/// Longest command line (RFC 2449 allows 255 octets; SASL responses need more).
const LINE_BYTES_MAX: usize = 8_192;
const READ_BUFFER_BYTES: usize = 8 * 1024;
/// Commands that fail before the connection is closed.
const ERRORS_MAX: u32 = 20;

#[derive(Clone, Debug)]
struct Message {
    uid: Uid,
    size: u64,
    body: BodyHash,
}

/// The maildrop a logged-in session holds.
struct Maildrop {
    address: String,
    holder: [u8; 16],
    uid_validity: UidValidity,
    messages: Vec<Message>,
    deleted: BTreeSet<usize>,
    /// Stops the lock renewal task when the session ends, however it ends.
    _renewal: AbortOnDrop,
}

/// Aborts a background task when dropped (a detached renewal would hold the lock forever).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum Flow {
    Continue,
    Close,
}

pub struct Session {
    pop3: Arc<Pop3>,
    kind: Pop3Kind,
    peer: SocketAddr,
    io: BufReader<Stream>,
    out: Vec<u8>,
    tls: bool,
    user: Option<String>,
    maildrop: Option<Maildrop>,
    errors: u32,
}

fn ok(text: impl AsRef<str>) -> String {
    format!("+OK {}\r\n", text.as_ref())
}

fn err(text: impl AsRef<str>) -> String {
    format!("-ERR {}\r\n", text.as_ref())
}

/// A body as a POP3 multi-line response: dot-stuffed, CRLF-terminated, then ".".
fn multiline(out: &mut Vec<u8>, content: &[u8]) {
    for line in content.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    if !content.is_empty() && !content.ends_with(b"\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

/// The header and the first `lines` lines of the body (RFC 1939 TOP).
fn top(body: &[u8], lines: usize) -> &[u8] {
    let header_end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .unwrap_or(body.len());
    let mut end = header_end;
    for _ in 0..lines {
        if end >= body.len() {
            break;
        }
        end = match body[end..].iter().position(|&b| b == b'\n') {
            Some(i) => end + i + 1,
            None => body.len(),
        };
    }
    &body[..end]
}

impl Session {
    pub fn new(pop3: Arc<Pop3>, kind: Pop3Kind, peer: SocketAddr) -> Session {
        Session {
            pop3,
            kind,
            peer,
            io: BufReader::with_capacity(READ_BUFFER_BYTES, Stream::Closed),
            out: Vec::new(),
            tls: false,
            user: None,
            maildrop: None,
            errors: 0,
        }
    }

    pub async fn run(mut self, tcp: TcpStream) {
        let stream = if self.kind == Pop3Kind::Tls {
            let Some(acceptor) = self.pop3.tls.clone() else {
                return;
            };
            let timeout = self.pop3.config.tls_handshake_timeout;
            match service::net::accept_tls(&acceptor, tcp, timeout).await {
                Some(s) => {
                    self.tls = true;
                    s
                }
                None => return,
            }
        } else {
            Stream::Plain(tcp)
        };
        self.io = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
        self.out
            .extend_from_slice(ok("mailgrid POP3 server ready").as_bytes());
        while let Ok(Flow::Continue) = self.next_command().await {}
        self.release().await;
        let _ = self.flush().await;
        let _ = self.io.get_mut().shutdown().await;
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        service::net::write_out(
            self.io.get_mut(),
            &mut self.out,
            self.pop3.config.idle_timeout,
        )
        .await
    }

    async fn read_line(&mut self) -> std::io::Result<Option<Result<String, ()>>> {
        if self.io.buffer().is_empty() {
            self.flush().await?;
        }
        let mut line = Vec::new();
        let timeout = self.pop3.config.idle_timeout;
        match tokio::time::timeout(timeout, read_line(&mut self.io, LINE_BYTES_MAX, &mut line))
            .await
        {
            Err(_) => {
                self.out
                    .extend_from_slice(err("autologout: idle for too long").as_bytes());
                Ok(None)
            }
            Ok(Err(_)) | Ok(Ok(Line::Eof)) => Ok(None),
            Ok(Ok(Line::TooLong)) => Ok(Some(Err(()))),
            Ok(Ok(Line::Complete)) => {
                let text = String::from_utf8_lossy(trim_eol(&line)).into_owned();
                Ok(Some(Ok(text)))
            }
        }
    }

    fn fail(&mut self, text: impl AsRef<str>) -> Flow {
        self.out.extend_from_slice(err(text).as_bytes());
        self.errors += 1;
        if self.errors >= ERRORS_MAX {
            self.out
                .extend_from_slice(err("too many errors, closing").as_bytes());
            return Flow::Close;
        }
        Flow::Continue
    }

    fn auth_allowed(&self) -> bool {
        self.tls || self.pop3.config.auth_without_tls
    }

    async fn next_command(&mut self) -> std::io::Result<Flow> {
        let line = match self.read_line().await? {
            None => return Ok(Flow::Close),
            Some(Err(())) => return Ok(self.fail("line too long")),
            Some(Ok(l)) => l,
        };
        let (command, args) = match line.split_once(' ') {
            Some((c, a)) => (c.to_ascii_uppercase(), a.to_string()),
            None => (line.to_ascii_uppercase(), String::new()),
        };
        if self.maildrop.is_some() {
            return self.transaction(&command, &args).await;
        }
        Ok(match command.as_str() {
            "CAPA" => {
                self.capa();
                Flow::Continue
            }
            "STLS" => return self.stls().await,
            "USER" => self.user(args),
            "PASS" => {
                let Some(user) = self.user.take() else {
                    return Ok(self.fail("USER first"));
                };
                self.login(user, args).await
            }
            "AUTH" => return self.auth(&args).await,
            "APOP" => self.fail("APOP is not supported; use USER/PASS or AUTH PLAIN over TLS"),
            "NOOP" => {
                self.out.extend_from_slice(ok("").as_bytes());
                Flow::Continue
            }
            "QUIT" => {
                self.out.extend_from_slice(ok("bye").as_bytes());
                Flow::Close
            }
            "" => self.fail("empty command"),
            _ => self.fail("unknown command or not allowed before login"),
        })
    }

    fn capa(&mut self) {
        let mut lines = vec!["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"];
        if self.auth_allowed() {
            lines.push("USER");
            lines.push("SASL PLAIN");
        }
        if !self.tls && self.pop3.tls.is_some() {
            lines.push("STLS");
        }
        lines.push("IMPLEMENTATION mailgrid");
        let mut text = ok("capability list follows");
        for l in lines {
            text.push_str(l);
            text.push_str("\r\n");
        }
        text.push_str(".\r\n");
        self.out.extend_from_slice(text.as_bytes());
    }

    async fn stls(&mut self) -> std::io::Result<Flow> {
        if self.tls {
            return Ok(self.fail("TLS is already active"));
        }
        let Some(acceptor) = self.pop3.tls.clone() else {
            return Ok(self.fail("TLS is not available"));
        };
        self.out
            .extend_from_slice(ok("begin TLS negotiation").as_bytes());
        self.flush().await?;
        let timeout = self.pop3.config.tls_handshake_timeout;
        if !upgrade_to_tls(&mut self.io, &acceptor, timeout, READ_BUFFER_BYTES).await {
            return Ok(Flow::Close);
        }
        self.tls = true;
        self.user = None;
        Ok(Flow::Continue)
    }

    fn user(&mut self, name: String) -> Flow {
        if !self.auth_allowed() {
            return self.fail("[AUTH] login is only allowed over TLS; use STLS first");
        }
        if name.is_empty() {
            return self.fail("USER needs a name");
        }
        self.user = Some(name);
        self.out.extend_from_slice(ok("send PASS").as_bytes());
        Flow::Continue
    }

    async fn auth(&mut self, args: &str) -> std::io::Result<Flow> {
        if args.is_empty() {
            // RFC 5034 §4: AUTH without a mechanism lists them.
            self.out
                .extend_from_slice(ok("SASL mechanisms\r\nPLAIN\r\n.").as_bytes());
            return Ok(Flow::Continue);
        }
        if !self.auth_allowed() {
            return Ok(self.fail("[AUTH] authentication is only allowed over TLS; use STLS first"));
        }
        let (mechanism, initial) = match args.split_once(' ') {
            Some((m, i)) => (m.to_ascii_uppercase(), i.trim().to_string()),
            None => (args.to_ascii_uppercase(), String::new()),
        };
        if mechanism != "PLAIN" {
            return Ok(self.fail("unsupported SASL mechanism"));
        }
        let response = if initial.is_empty() {
            self.out.extend_from_slice(b"+ \r\n");
            match self.read_line().await? {
                None => return Ok(Flow::Close),
                Some(Err(())) => return Ok(self.fail("response too long")),
                Some(Ok(r)) => r,
            }
        } else if initial == "=" {
            String::new()
        } else {
            initial
        };
        if response.trim() == "*" {
            return Ok(self.fail("authentication cancelled"));
        }
        Ok(match decode_plain(&response) {
            Ok((user, password)) => self.login(user, password).await,
            Err(why) => self.fail(why),
        })
    }

    /// Checks the password, takes the maildrop lock and reads the maildrop.
    async fn login(&mut self, user: String, password: String) -> Flow {
        let throttle = self.pop3.throttle.clone();
        let ip = self.peer.ip();
        match throttle.check(ip, &user, Instant::now()) {
            Verdict::Refuse => return self.fail("[AUTH] too many failed logins; try again later"),
            Verdict::Allow(delay) if !delay.is_zero() => tokio::time::sleep(delay).await,
            Verdict::Allow(_) => {}
        }
        let router = &self.pop3.node.router;
        let address = match mail::authenticate(router, &user, &password).await {
            Ok(Some(address)) => address,
            Ok(None) => {
                throttle.failure(ip, &user, Instant::now());
                return self.fail("[AUTH] invalid user name or password");
            }
            Err(e) => {
                tracing::info!("POP3 login for {user} could not be checked: {e}");
                return self.fail("[SYS/TEMP] the mail store is unavailable, try again later");
            }
        };
        throttle.success(&address);
        let holder: [u8; 16] = rand::random();
        match self.lock(&address, holder).await {
            Ok(()) => {}
            Err(text) => return self.fail(text),
        }
        let listing = mail::list_messages(router, &address, "INBOX").await;
        let (mailbox, records) = match listing {
            Ok(Some(found)) => found,
            Ok(None) | Err(_) => {
                self.unlock(&address, holder).await;
                return self.fail("[SYS/TEMP] cannot read the maildrop, try again later");
            }
        };
        let messages: Vec<Message> = records
            .into_iter()
            .map(|(uid, r)| Message {
                uid,
                size: r.size,
                body: r.body,
            })
            .collect();
        let renewal = tokio::spawn(renew_lock(self.pop3.clone(), address.clone(), holder));
        let count = messages.len();
        let bytes: u64 = messages.iter().map(|m| m.size).sum();
        self.maildrop = Some(Maildrop {
            address,
            holder,
            uid_validity: mailbox.uid_validity,
            messages,
            deleted: BTreeSet::new(),
            _renewal: AbortOnDrop(renewal),
        });
        let text = format!("maildrop has {count} messages ({bytes} octets)");
        self.out.extend_from_slice(ok(text).as_bytes());
        Flow::Continue
    }

    async fn lock(&self, address: &str, holder: [u8; 16]) -> Result<(), &'static str> {
        let cmd = PartitionCommand::LockMaildrop {
            address: address.to_string(),
            holder,
            now: mail::now(),
            lease_seconds: self.pop3.config.lock_lease.as_secs() as i64,
        };
        match mail::partition_write(&self.pop3.node.router, address, cmd).await {
            Ok(PartitionResponse::Done) => Ok(()),
            Ok(PartitionResponse::Refused(MailError::InUse)) => {
                Err("[IN-USE] the maildrop is in use by another session")
            }
            _ => Err("[SYS/TEMP] cannot lock the maildrop, try again later"),
        }
    }

    async fn unlock(&self, address: &str, holder: [u8; 16]) {
        let cmd = PartitionCommand::UnlockMaildrop {
            address: address.to_string(),
            holder,
        };
        // If this fails the lease runs out by itself.
        let _ = mail::partition_write(&self.pop3.node.router, address, cmd).await;
    }

    /// Ends the session's hold on its maildrop (whether or not QUIT committed anything).
    async fn release(&mut self) {
        if let Some(drop) = self.maildrop.take() {
            let (address, holder) = (drop.address.clone(), drop.holder);
            std::mem::drop(drop); // stops the renewal before the lock is released
            self.unlock(&address, holder).await;
        }
    }

    /// A message number from the client, 1-based, of a message not marked deleted.
    fn message(&self, arg: &str) -> Result<(usize, Message), String> {
        let drop = self.maildrop.as_ref().expect("in transaction state");
        let n: usize = arg
            .trim()
            .parse()
            .map_err(|_| format!("invalid message number {arg:?}"))?;
        if n == 0 || n > drop.messages.len() {
            return Err(format!("no message {n}"));
        }
        if drop.deleted.contains(&(n - 1)) {
            return Err(format!("message {n} is deleted"));
        }
        Ok((n - 1, drop.messages[n - 1].clone()))
    }

    async fn transaction(&mut self, command: &str, args: &str) -> std::io::Result<Flow> {
        let drop = self.maildrop.as_ref().expect("in transaction state");
        let live = || {
            drop.messages
                .iter()
                .enumerate()
                .filter(|(i, _)| !drop.deleted.contains(i))
        };
        let reply = match command {
            "STAT" => {
                let (count, bytes) = live().fold((0, 0), |(c, b), (_, m)| (c + 1, b + m.size));
                ok(format!("{count} {bytes}"))
            }
            "LIST" | "UIDL" => {
                let item = |i: usize, m: &Message| {
                    if command == "LIST" {
                        format!("{} {}", i + 1, m.size)
                    } else {
                        format!("{} {}.{}", i + 1, drop.uid_validity.0, m.uid.0)
                    }
                };
                if args.trim().is_empty() {
                    let mut text = ok("listing follows");
                    for (i, m) in live() {
                        text.push_str(&item(i, m));
                        text.push_str("\r\n");
                    }
                    text.push_str(".\r\n");
                    text
                } else {
                    match self.message(args) {
                        Ok((i, m)) => ok(item(i, &m)),
                        Err(e) => return Ok(self.fail(e)),
                    }
                }
            }
            "RETR" | "TOP" => return self.retrieve(command, args).await,
            "DELE" => match self.message(args) {
                Ok((i, _)) => {
                    let drop = self.maildrop.as_mut().expect("in transaction state");
                    drop.deleted.insert(i);
                    ok(format!("message {} deleted", i + 1))
                }
                Err(e) => return Ok(self.fail(e)),
            },
            "RSET" => {
                let drop = self.maildrop.as_mut().expect("in transaction state");
                drop.deleted.clear();
                ok(format!("maildrop has {} messages", drop.messages.len()))
            }
            "NOOP" => ok(""),
            "CAPA" => {
                self.capa();
                return Ok(Flow::Continue);
            }
            "QUIT" => return Ok(self.update().await),
            _ => return Ok(self.fail("unknown command")),
        };
        self.out.extend_from_slice(reply.as_bytes());
        Ok(Flow::Continue)
    }

    async fn retrieve(&mut self, command: &str, args: &str) -> std::io::Result<Flow> {
        let mut parts = args.split_whitespace();
        let (index, message) = match self.message(parts.next().unwrap_or("")) {
            Ok(found) => found,
            Err(e) => return Ok(self.fail(e)),
        };
        let lines = if command == "TOP" {
            match parts.next().map(str::parse::<usize>) {
                Some(Ok(n)) => Some(n),
                _ => return Ok(self.fail("TOP needs a message number and a line count")),
            }
        } else {
            None
        };
        let address = self
            .maildrop
            .as_ref()
            .expect("in transaction")
            .address
            .clone();
        let body = match mail::body(&self.pop3.node.router, &address, message.body).await {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(self.fail(format!("message {} is gone", index + 1))),
            Err(_) => return Ok(self.fail("[SYS/TEMP] the mail store is unavailable, try again")),
        };
        let content = match lines {
            Some(n) => top(&body, n),
            None => &body[..],
        };
        self.out
            .extend_from_slice(ok(format!("{} octets", message.size)).as_bytes());
        multiline(&mut self.out, content);
        Ok(Flow::Continue)
    }

    /// UPDATE state: the marked messages are expunged in one committed write; `+OK` only
    /// then. On failure nothing is deleted and the client is told.
    async fn update(&mut self) -> Flow {
        let drop = self.maildrop.as_ref().expect("in transaction state");
        let uids: Vec<Uid> = drop.deleted.iter().map(|&i| drop.messages[i].uid).collect();
        let address = drop.address.clone();
        let holder = drop.holder;
        if uids.is_empty() {
            self.out.extend_from_slice(ok("bye").as_bytes());
            return Flow::Close;
        }
        // Still ours? (A lease lost while this node was cut off must not delete anything.)
        if let Err(text) = self.lock(&address, holder).await {
            self.out
                .extend_from_slice(err(format!("{text}; nothing deleted")).as_bytes());
            return Flow::Close;
        }
        let cmd = PartitionCommand::Expunge {
            address: address.clone(),
            mailbox: "INBOX".into(),
            uids: Some(uids),
        };
        let reply = match mail::partition_write(&self.pop3.node.router, &address, cmd).await {
            Ok(PartitionResponse::Expunged(removed)) => {
                ok(format!("{} messages deleted, bye", removed.len()))
            }
            _ => err("[SYS/TEMP] deletions could not be stored; nothing deleted"),
        };
        self.out.extend_from_slice(reply.as_bytes());
        Flow::Close
    }
}

/// Renews the maildrop lock every third of its lease until aborted.
async fn renew_lock(pop3: Arc<Pop3>, address: String, holder: [u8; 16]) {
    let lease = pop3.config.lock_lease;
    loop {
        tokio::time::sleep(lease / 3).await;
        let cmd = PartitionCommand::LockMaildrop {
            address: address.clone(),
            holder,
            now: mail::now(),
            lease_seconds: lease.as_secs() as i64,
        };
        if let Err(e) = mail::partition_write(&pop3.node.router, &address, cmd).await {
            tracing::debug!("renewing the maildrop lock of {address}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: multi-line bodies are dot-stuffed and terminated; TOP keeps the header and n lines.
    #[test]
    fn multiline_and_top() {
        let mut out = Vec::new();
        multiline(&mut out, b"Subject: x\r\n\r\n.dot\r\nlast");
        assert_eq!(out, b"Subject: x\r\n\r\n..dot\r\nlast\r\n.\r\n");
        let body = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n";
        assert_eq!(top(body, 0), b"A: 1\r\nB: 2\r\n\r\n");
        assert_eq!(top(body, 2), b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n");
        assert_eq!(top(body, 10), &body[..]);
    }
}
