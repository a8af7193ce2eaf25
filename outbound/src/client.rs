//! The SMTP client of outbound delivery (RFC 5321): one connection to one remote mail
//! exchanger, EHLO (HELO as fallback), opportunistic STARTTLS, and mail transactions with
//! PIPELINING when offered. A connection carries several transactions.
//!
//! Whatever the remote side sends is bounded: each reply line is at most `LINE_BYTES_MAX`,
//! only the first `KEPT_LINES_MAX` lines of a reply are kept (a 10,000-line reply costs time,
//! not memory), and every reply must arrive within the reply timeout.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use service::lines::{read_line, trim_eol, Line};

const LINE_BYTES_MAX: usize = 4_096;
const KEPT_LINES_MAX: usize = 20;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A reply: its code and text (the kept lines joined by spaces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection, a dropped one, or a timeout: try later or elsewhere.
    #[error("{0}")]
    Network(String),
    /// The peer does not speak SMTP (or sent an oversized line).
    #[error("protocol error: {0}")]
    Garbage(String),
    /// The TLS handshake after STARTTLS failed.
    #[error("TLS failed: {0}")]
    Tls(String),
    /// The session was refused: the greeting, EHLO, MAIL or DATA was answered with this.
    #[error("{0}")]
    Refused(Reply),
    /// The relay refused our credentials: an operator's problem, retried later.
    #[error("authentication failed: {0}")]
    Auth(Reply),
}

/// Service extensions the server announced in its EHLO reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    pub starttls: bool,
    pub pipelining: bool,
    pub size: Option<u64>,
    pub smtputf8: bool,
    pub eight_bit_mime: bool,
}

impl Extensions {
    fn parse(lines: &[String]) -> Extensions {
        let mut e = Extensions::default();
        // The first line is the server's greeting to us, not a keyword.
        for line in lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let keyword = words.next().unwrap_or("").to_ascii_uppercase();
            match keyword.as_str() {
                "STARTTLS" => e.starttls = true,
                "PIPELINING" => e.pipelining = true,
                "SMTPUTF8" => e.smtputf8 = true,
                "8BITMIME" => e.eight_bit_mime = true,
                "SIZE" => e.size = words.next().and_then(|n| n.parse().ok()).filter(|&n| n > 0),
                _ => {}
            }
        }
        e
    }
}

/// The answer to one mail transaction: each recipient's RCPT reply, in order, and the reply
/// to the message itself (`None` when no recipient was accepted and no message was sent).
#[derive(Debug, PartialEq, Eq)]
pub struct Transaction {
    pub rcpt: Vec<Reply>,
    pub data: Option<Reply>,
}

/// How a connection uses TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// STARTTLS when offered (remote MXs).
    Opportunistic,
    /// STARTTLS or nothing (a smarthost).
    Required,
    /// TLS from the first byte.
    Implicit,
    Off,
}

/// Settings for one connection.
#[derive(Clone)]
pub struct Settings {
    pub helo: String,
    pub connect_timeout: Duration,
    pub reply_timeout: Duration,
    pub tls: TlsMode,
    pub connector: tokio_rustls::TlsConnector,
    /// AUTH PLAIN after TLS, for a smarthost.
    pub auth: Option<(String, String)>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("helo", &self.helo)
            .field("tls", &self.tls)
            .field("auth", &self.auth.as_ref().map(|(user, _)| user))
            .finish()
    }
}

pub struct Connection {
    io: BufReader<Box<dyn Io>>,
    pub ext: Extensions,
    pub tls: bool,
    settings: Settings,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("ext", &self.ext)
            .field("tls", &self.tls)
            .finish()
    }
}

fn network(what: &str, e: impl std::fmt::Display) -> ClientError {
    ClientError::Network(format!("{what}: {e}"))
}

impl Connection {
    /// Connects, reads the greeting, says EHLO and, when offered and wanted, starts TLS.
    pub async fn open(
        addr: SocketAddr,
        host: &str,
        settings: &Settings,
    ) -> Result<Connection, ClientError> {
        let tcp = tokio::time::timeout(settings.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| network(&format!("connect to {addr}"), "timed out"))?
            .map_err(|e| network(&format!("connect to {addr}"), e))?;
        let _ = tcp.set_nodelay(true);
        let mut conn = Connection {
            io: BufReader::new(Box::new(tcp) as Box<dyn Io>),
            ext: Extensions::default(),
            tls: false,
            settings: settings.clone(),
        };
        if settings.tls == TlsMode::Implicit {
            conn.handshake(host).await?;
        }
        let greeting = conn.reply().await?;
        if greeting.code != 220 {
            return Err(ClientError::Refused(greeting));
        }
        conn.hello().await?;
        let starttls = match settings.tls {
            TlsMode::Opportunistic => conn.ext.starttls,
            TlsMode::Required if !conn.ext.starttls => {
                return Err(ClientError::Tls("the relay does not offer STARTTLS".into()))
            }
            TlsMode::Required => true,
            TlsMode::Implicit | TlsMode::Off => false,
        };
        if starttls {
            conn.starttls(host).await?;
            conn.hello().await?;
        }
        if let Some((user, password)) = &settings.auth {
            conn.authenticate(user, password).await?;
        }
        Ok(conn)
    }

    /// AUTH PLAIN (RFC 4616) with an initial response; only ever over TLS.
    async fn authenticate(&mut self, user: &str, password: &str) -> Result<(), ClientError> {
        use base64::Engine;
        if !self.tls {
            return Err(ClientError::Tls("no TLS, so no password is sent".into()));
        }
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        self.send(format!("AUTH PLAIN {token}\r\n").as_bytes())
            .await?;
        let reply = self.reply().await?;
        if reply.code != 235 {
            return Err(ClientError::Auth(reply));
        }
        Ok(())
    }

    async fn hello(&mut self) -> Result<(), ClientError> {
        let helo = self.settings.helo.clone();
        self.send(format!("EHLO {helo}\r\n").as_bytes()).await?;
        let (reply, lines) = self.reply_lines().await?;
        if reply.is_positive() {
            self.ext = Extensions::parse(&lines);
            return Ok(());
        }
        // An old server without ESMTP (RFC 5321 §3.2).
        self.send(format!("HELO {helo}\r\n").as_bytes()).await?;
        let reply = self.reply().await?;
        if !reply.is_positive() {
            return Err(ClientError::Refused(reply));
        }
        self.ext = Extensions::default();
        Ok(())
    }

    async fn starttls(&mut self, host: &str) -> Result<(), ClientError> {
        self.send(b"STARTTLS\r\n").await?;
        let reply = self.reply().await?;
        if reply.code != 220 {
            return Err(ClientError::Tls(format!("STARTTLS answered {reply}")));
        }
        // Anything the server sent after its 220 would be injected into the TLS session's
        // plain-text past (CVE-2011-0411 style): refuse it.
        if !self.io.buffer().is_empty() {
            return Err(ClientError::Garbage("data after the STARTTLS reply".into()));
        }
        self.handshake(host).await
    }

    /// Turns the connection into TLS (after STARTTLS, or at once for implicit TLS).
    async fn handshake(&mut self, host: &str) -> Result<(), ClientError> {
        let plain = std::mem::replace(
            &mut self.io,
            BufReader::new(Box::new(tokio::io::empty()) as Box<dyn Io>),
        )
        .into_inner();
        let name = rustls::pki_types::ServerName::try_from(host.trim_end_matches('.').to_string())
            .map_err(|e| ClientError::Tls(format!("{host}: {e}")))?;
        let handshake = self.settings.connector.connect(name, plain);
        let tls = tokio::time::timeout(self.settings.reply_timeout, handshake)
            .await
            .map_err(|_| ClientError::Tls("handshake timed out".into()))?
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        self.io = BufReader::new(Box::new(tls) as Box<dyn Io>);
        self.tls = true;
        Ok(())
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        let io = self.io.get_mut();
        let write = async {
            io.write_all(bytes).await?;
            io.flush().await
        };
        tokio::time::timeout(self.settings.reply_timeout, write)
            .await
            .map_err(|_| network("send", "timed out"))?
            .map_err(|e| network("send", e))
    }

    async fn reply(&mut self) -> Result<Reply, ClientError> {
        Ok(self.reply_lines().await?.0)
    }

    /// Reads one (possibly multi-line) reply within the reply timeout.
    async fn reply_lines(&mut self) -> Result<(Reply, Vec<String>), ClientError> {
        let timeout = self.settings.reply_timeout;
        tokio::time::timeout(timeout, read_reply(&mut self.io))
            .await
            .map_err(|_| network("waiting for a reply", "timed out"))?
    }

    /// Runs one mail transaction. `Err` means the transaction as a whole failed (MAIL or
    /// DATA refused, or the connection broke); recipient refusals are in the result.
    pub async fn transaction(
        &mut self,
        from: &str,
        recipients: &[String],
        body: &[u8],
    ) -> Result<Transaction, ClientError> {
        let utf8 = !from.is_ascii() || recipients.iter().any(|r| !r.is_ascii());
        if utf8 && !self.ext.smtputf8 {
            return Err(ClientError::Refused(Reply {
                code: 553,
                text: "5.6.7 the receiving server does not support SMTPUTF8 addresses".into(),
            }));
        }
        if let Some(max) = self.ext.size {
            if body.len() as u64 > max {
                return Err(ClientError::Refused(Reply {
                    code: 552,
                    text: format!(
                        "5.3.4 message exceeds the receiving server's limit of {max} bytes"
                    ),
                }));
            }
        }
        let mut mail = format!("MAIL FROM:<{from}>");
        if self.ext.size.is_some() {
            mail.push_str(&format!(" SIZE={}", body.len()));
        }
        if self.ext.eight_bit_mime && !body.is_ascii() {
            mail.push_str(" BODY=8BITMIME");
        }
        if utf8 {
            mail.push_str(" SMTPUTF8");
        }
        mail.push_str("\r\n");
        let rcpts: Vec<String> = recipients
            .iter()
            .map(|r| format!("RCPT TO:<{r}>\r\n"))
            .collect();
        if self.ext.pipelining {
            // RFC 2920: MAIL, every RCPT and DATA in one write, replies read in order.
            let mut batch = mail.into_bytes();
            for r in &rcpts {
                batch.extend_from_slice(r.as_bytes());
            }
            batch.extend_from_slice(b"DATA\r\n");
            self.send(&batch).await?;
            let mail_reply = self.reply().await?;
            let mut rcpt = Vec::with_capacity(rcpts.len());
            for _ in &rcpts {
                rcpt.push(self.reply().await?);
            }
            let data = self.reply().await?;
            if !mail_reply.is_positive() {
                if data.code == 354 {
                    self.send(b".\r\n").await?;
                    self.reply().await?;
                }
                return Err(ClientError::Refused(mail_reply));
            }
            let accepted = rcpt.iter().any(Reply::is_positive);
            return self.finish_data(rcpt, data, accepted, body).await;
        }
        self.send(mail.as_bytes()).await?;
        let mail_reply = self.reply().await?;
        if !mail_reply.is_positive() {
            return Err(ClientError::Refused(mail_reply));
        }
        let mut rcpt = Vec::with_capacity(rcpts.len());
        for r in &rcpts {
            self.send(r.as_bytes()).await?;
            rcpt.push(self.reply().await?);
        }
        if !rcpt.iter().any(Reply::is_positive) {
            self.send(b"RSET\r\n").await?;
            self.reply().await?;
            return Ok(Transaction { rcpt, data: None });
        }
        self.send(b"DATA\r\n").await?;
        let data = self.reply().await?;
        self.finish_data(rcpt, data, true, body).await
    }

    async fn finish_data(
        &mut self,
        rcpt: Vec<Reply>,
        data: Reply,
        accepted: bool,
        body: &[u8],
    ) -> Result<Transaction, ClientError> {
        if data.code != 354 {
            if !accepted {
                return Ok(Transaction { rcpt, data: None });
            }
            return Err(ClientError::Refused(data));
        }
        if !accepted {
            // Pipelined DATA accepted with no recipient: send an empty message's end.
            self.send(b".\r\n").await?;
            self.reply().await?;
            return Ok(Transaction { rcpt, data: None });
        }
        self.send(&dot_stuffed(body)).await?;
        let end = self.reply().await?;
        Ok(Transaction {
            rcpt,
            data: Some(end),
        })
    }

    /// Ends the session politely (errors do not matter any more).
    pub async fn quit(mut self) {
        if self.send(b"QUIT\r\n").await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), read_reply(&mut self.io)).await;
        }
    }
}

/// Reads a reply: lines of `ddd-text` ending with `ddd text` (or a bare `ddd`), all with the
/// same code.
async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(
    io: &mut R,
) -> Result<(Reply, Vec<String>), ClientError> {
    let mut buf = Vec::with_capacity(256);
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        match read_line(io, LINE_BYTES_MAX, &mut buf)
            .await
            .map_err(|e| network("reading a reply", e))?
        {
            Line::Complete => {}
            Line::TooLong => return Err(ClientError::Garbage("reply line too long".into())),
            Line::Eof => return Err(network("reading a reply", "connection closed")),
        }
        let line = trim_eol(&buf);
        let digits = line.get(..3).filter(|d| d.iter().all(u8::is_ascii_digit));
        let Some(digits) = digits else {
            let shown = String::from_utf8_lossy(&line[..line.len().min(60)]).into_owned();
            return Err(ClientError::Garbage(format!("not a reply: {shown:?}")));
        };
        let this: u16 = std::str::from_utf8(digits)
            .expect("digits")
            .parse()
            .expect("three digits");
        if !(200..600).contains(&this) || code.is_some_and(|c| c != this) {
            return Err(ClientError::Garbage(format!(
                "unexpected reply code {this}"
            )));
        }
        code = Some(this);
        let (more, text) = match line.get(3) {
            Some(b'-') => (true, &line[4..]),
            Some(b' ') => (false, &line[4..]),
            None => (false, &line[3..]),
            Some(_) => return Err(ClientError::Garbage("malformed reply line".into())),
        };
        if lines.len() < KEPT_LINES_MAX {
            lines.push(String::from_utf8_lossy(text).trim().to_string());
        }
        if !more {
            break;
        }
    }
    let text = lines
        .iter()
        .filter(|l| !l.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    let reply = Reply {
        code: code.expect("one line read"),
        text,
    };
    Ok((reply, lines))
}

/// The message as DATA sends it: lines starting with "." get another (RFC 5321 §4.5.2),
/// the end is CRLF "." CRLF.
pub fn dot_stuffed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 5);
    let mut line_start = true;
    for &b in body {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(input: &[u8]) -> Result<(Reply, Vec<String>), ClientError> {
        read_reply(&mut BufReader::new(input)).await
    }

    #[tokio::test]
    async fn replies_are_read_whole_and_bounded() {
        // Goal: multi-line replies come out as one, with their extensions; a huge reply keeps
        // only its first lines; replies that are not SMTP are refused rather than guessed at.
        let (r, lines) =
            parse(b"250-mx.far.test hi\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 STARTTLS\r\n")
                .await
                .unwrap();
        assert_eq!(r.code, 250);
        let ext = Extensions::parse(&lines);
        assert!(ext.pipelining && ext.starttls && !ext.smtputf8);
        assert_eq!(ext.size, Some(1000));
        let (r, _) = parse(b"451 4.7.1 try later\r\n").await.unwrap();
        assert_eq!(r.to_string(), "451 4.7.1 try later");
        assert!(!r.is_permanent() && !r.is_positive());
        let (r, _) = parse(b"250\r\n").await.unwrap();
        assert_eq!(r.code, 250);
        let mut huge = Vec::new();
        for i in 0..10_000 {
            huge.extend_from_slice(format!("550-line {i}\r\n").as_bytes());
        }
        huge.extend_from_slice(b"550 end\r\n");
        let (r, lines) = parse(&huge).await.unwrap();
        assert_eq!(r.code, 550);
        assert_eq!(lines.len(), KEPT_LINES_MAX);
        for garbage in [
            &b"HTTP/1.1 400 Bad Request\r\n"[..],
            b"250-one\r\n354 two\r\n",
            b"999 no\r\n",
            b"250x\r\n",
        ] {
            assert!(
                matches!(parse(garbage).await, Err(ClientError::Garbage(_))),
                "{garbage:?}"
            );
        }
        assert!(matches!(
            parse(b"250-cut off").await,
            Err(ClientError::Network(_))
        ));
        let mut long = vec![b'2'; LINE_BYTES_MAX + 10];
        long.extend_from_slice(b"\r\n");
        assert!(matches!(parse(&long).await, Err(ClientError::Garbage(_))));
    }

    /// A misbehaving server on a real socket: it answers each line it reads with the next
    /// canned reply; `None` closes the connection; after the replies it stalls.
    async fn server(greeting: &'static [u8], replies: Vec<Option<&'static [u8]>>) -> SocketAddr {
        use tokio::io::AsyncBufReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut io = BufReader::new(tcp);
            io.get_mut().write_all(greeting).await.unwrap();
            let mut line = String::new();
            for reply in replies {
                line.clear();
                if io.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                match reply {
                    Some(r) => io.get_mut().write_all(r).await.unwrap(),
                    None => return,
                }
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        addr
    }

    fn settings(starttls: bool) -> Settings {
        Settings {
            helo: "mx.example.test".into(),
            connect_timeout: Duration::from_secs(2),
            reply_timeout: Duration::from_millis(500),
            tls: if starttls {
                TlsMode::Opportunistic
            } else {
                TlsMode::Off
            },
            connector: service::client_tls::unverified_connector(),
            auth: None,
        }
    }

    #[tokio::test]
    async fn misbehaving_servers_end_in_errors_not_hangs() {
        // Goal: a server that stalls, talks garbage, drops the connection mid-DATA, breaks
        // TLS after STARTTLS or sends a 10,000-line reply costs a bounded wait and a clear
        // error (or, for the long reply, nothing at all).
        let ehlo: &[u8] = b"250-mx.far.test\r\n250 PIPELINING\r\n";
        let to = vec!["r@far.test".to_string()];

        let stall = server(b"", vec![]).await;
        let e = Connection::open(stall, "mx", &settings(true))
            .await
            .unwrap_err();
        assert!(
            matches!(e, ClientError::Network(ref m) if m.contains("timed out")),
            "{e}"
        );

        let garbage = server(b"HTTP/1.1 400 Bad Request\r\n", vec![]).await;
        let e = Connection::open(garbage, "mx", &settings(true))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Garbage(_)), "{e}");

        let refused = server(b"554 5.7.1 go away\r\n", vec![]).await;
        let e = Connection::open(refused, "mx", &settings(true))
            .await
            .unwrap_err();
        assert!(
            matches!(e, ClientError::Refused(ref r) if r.code == 554),
            "{e}"
        );

        // Pipelined MAIL+RCPT+DATA arrive as three lines: three replies, then the body's
        // first line closes the connection.
        let dropped = server(
            b"220 hi\r\n",
            vec![
                Some(ehlo),
                Some(b"250 ok\r\n"),
                Some(b"250 ok\r\n"),
                Some(b"354 go\r\n"),
                None,
            ],
        )
        .await;
        let mut conn = Connection::open(dropped, "mx", &settings(true))
            .await
            .unwrap();
        let e = conn
            .transaction("a@example.test", &to, b"Subject: x\r\n\r\nbody\r\n")
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Network(_)), "{e}");

        let broken_tls = server(
            b"220 hi\r\n",
            vec![
                Some(b"250-mx\r\n250 STARTTLS\r\n"),
                Some(b"220 go ahead\r\n"),
                Some(b"this is not a TLS record\r\n"),
            ],
        )
        .await;
        let e = Connection::open(broken_tls, "mx.far.test", &settings(true))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Tls(_)), "{e}");

        let mut huge = b"250-mx.far.test\r\n".to_vec();
        for i in 0..10_000 {
            huge.extend_from_slice(format!("250-X-FILLER-{i}\r\n").as_bytes());
        }
        huge.extend_from_slice(b"250 SIZE 100\r\n");
        let huge: &'static [u8] = Box::leak(huge.into_boxed_slice());
        let long = server(b"220 hi\r\n", vec![Some(huge)]).await;
        let mut conn = Connection::open(long, "mx", &settings(true)).await.unwrap();
        assert_eq!(
            conn.ext.size, None,
            "capabilities after the kept lines are not seen"
        );
        assert!(!conn.ext.pipelining);
        // Too big for the announced limit is refused before anything is sent... when seen.
        conn.ext.size = Some(100);
        let e = conn
            .transaction("a@example.test", &to, &[b'x'; 200])
            .await
            .unwrap_err();
        assert!(
            matches!(e, ClientError::Refused(ref r) if r.code == 552),
            "{e}"
        );
    }

    #[test]
    fn data_is_dot_stuffed_and_terminated() {
        // Goal: a line that starts with a dot cannot end the message early.
        assert_eq!(
            dot_stuffed(b"a\r\n.b\r\n..\r\n"),
            b"a\r\n..b\r\n...\r\n.\r\n"
        );
        assert_eq!(dot_stuffed(b".x"), b"..x\r\n.\r\n");
        assert_eq!(dot_stuffed(b""), b".\r\n");
    }
}
