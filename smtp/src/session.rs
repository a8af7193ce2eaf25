//! One SMTP connection: the RFC 5321 state machine (greeting → EHLO/HELO → MAIL → RCPT... →
//! DATA/BDAT), STARTTLS, AUTH, and delivery through the mail service.
//!
//! Replies are collected and written when the client has nothing more buffered (PIPELINING,
//! RFC 2920). Buffered plaintext is thrown away at STARTTLS so nothing sent before the
//! handshake is taken as sent after it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use service::partition::RecipientOutcome;
use service::types::{domain_of, is_valid_address, normalize_address};
use smtp_proto::{Request, AUTH_LOGIN, AUTH_PLAIN, MAIL_SMTPUTF8};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::codec::{DataDecoder, Reply, Trace};
use super::{ListenerKind, Smtp};
use service::lines::{read_line, trim_eol, Line};
use service::mail;
use service::net::{upgrade_to_tls, Stream};
use service::policy::throttle::Verdict;
use service::policy::RcptVerdict;
use service::sasl::{decode_base64_text, decode_plain};
use service::{dkim, queue};

/// Longest command line we take, CRLF included (RFC 5321 §4.5.3.1.4 sets 512 and lets
/// extensions raise it; 1000 leaves room for SMTPUTF8 addresses and DSN parameters).
const COMMAND_BYTES_MAX: usize = 1_000;
/// Longest SASL response line.
const AUTH_LINE_BYTES_MAX: usize = 8_192;
const READ_BUFFER_BYTES: usize = 16 * 1024;

/// The user a session authenticated as (only made by a successful AUTH).
#[derive(Clone, Debug)]
struct Authenticated {
    address: String,
}

/// A mail transaction: from MAIL to the end of DATA/BDAT (or RSET).
#[derive(Debug, Default)]
struct Transaction {
    from: String,
    utf8: bool,
    size_hint: u64,
    /// Addresses accepted at RCPT, as given (normalized).
    recipients: Vec<String>,
    /// RCPT commands accepted, repeats included (what `recipients_max` limits).
    accepted_rcpts: usize,
    /// Accounts those resolve to.
    accounts: BTreeSet<String>,
    /// Recipients in other domains (only for authenticated senders), for the outbound queue.
    remote: Vec<String>,
    /// BDAT chunks so far, and whether they went over the limit.
    bdat: Option<Vec<u8>>,
    bdat_size: u64,
}

enum Flow {
    Continue,
    Close,
}

pub struct Session {
    smtp: Arc<Smtp>,
    kind: ListenerKind,
    peer: SocketAddr,
    io: BufReader<Stream>,
    out: Vec<u8>,
    tls: bool,
    helo: Option<String>,
    esmtp: bool,
    auth: Option<Authenticated>,
    tx: Option<Transaction>,
    errors: u32,
}

/// Reads one line within the command timeout; `None` when the client is gone or too slow.
enum Input {
    Line(Vec<u8>),
    TooLong,
    Gone,
    TimedOut,
}

impl Session {
    pub fn new(smtp: Arc<Smtp>, kind: ListenerKind, peer: SocketAddr) -> Session {
        Session {
            smtp,
            kind,
            peer,
            io: BufReader::with_capacity(READ_BUFFER_BYTES, Stream::Closed),
            out: Vec::new(),
            tls: false,
            helo: None,
            esmtp: false,
            auth: None,
            tx: None,
            errors: 0,
        }
    }

    pub async fn run(mut self, tcp: TcpStream) {
        let stream = if self.kind == ListenerKind::Submissions {
            match self.handshake(tcp).await {
                Some(tls) => {
                    self.tls = true;
                    tls
                }
                None => return,
            }
        } else {
            Stream::Plain(tcp)
        };
        self.io = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
        let banner = format!("{} ESMTP mailgrid", self.smtp.hostname);
        self.reply(Reply::new(220, "", banner));
        while let Ok(Flow::Continue) = self.next_command().await {}
        let _ = self.flush().await;
        let _ = self.io.get_mut().shutdown().await;
    }

    async fn handshake(&self, tcp: TcpStream) -> Option<Stream> {
        let acceptor = self.smtp.tls.as_ref()?;
        service::net::accept_tls(acceptor, tcp, self.smtp.config.tls_handshake_timeout).await
    }

    fn reply(&mut self, reply: Reply) {
        reply.encode(&mut self.out);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        service::net::write_out(
            self.io.get_mut(),
            &mut self.out,
            self.smtp.config.command_timeout,
        )
        .await
    }

    async fn read_input(&mut self, max: usize) -> std::io::Result<Input> {
        // Pipelined commands are answered together: write only when the client waits.
        if self.io.buffer().is_empty() {
            self.flush().await?;
        }
        let mut line = Vec::new();
        let timeout = self.smtp.config.command_timeout;
        match tokio::time::timeout(timeout, read_line(&mut self.io, max, &mut line)).await {
            Err(_) => Ok(Input::TimedOut),
            Ok(Err(_)) | Ok(Ok(Line::Eof)) => Ok(Input::Gone),
            Ok(Ok(Line::TooLong)) => Ok(Input::TooLong),
            Ok(Ok(Line::Complete)) => Ok(Input::Line(line)),
        }
    }

    /// Counts a client error; too many close the connection.
    fn error(&mut self, reply: Reply) -> Flow {
        self.reply(reply);
        self.errors += 1;
        if self.errors >= self.smtp.config.errors_max {
            self.reply(Reply::new(
                421,
                "4.7.0",
                "Too many errors, closing connection",
            ));
            return Flow::Close;
        }
        Flow::Continue
    }

    async fn next_command(&mut self) -> std::io::Result<Flow> {
        let line = match self.read_input(COMMAND_BYTES_MAX).await? {
            Input::Line(l) => l,
            Input::TooLong => return Ok(self.error(Reply::new(500, "5.5.2", "Line too long"))),
            Input::Gone => return Ok(Flow::Close),
            Input::TimedOut => {
                let text = format!("{} Error: timeout exceeded", self.smtp.hostname);
                self.reply(Reply::new(421, "4.4.2", text));
                return Ok(Flow::Close);
            }
        };
        if line.contains(&0) {
            return Ok(self.error(Reply::new(500, "5.5.2", "NUL byte in command")));
        }
        let mut terminated = trim_eol(&line).to_vec();
        terminated.extend_from_slice(b"\r\n");
        let request = match Request::parse(&mut terminated.iter()) {
            Ok(r) => r.into_owned(),
            Err(e) => return Ok(self.parse_error(e)),
        };
        self.command(request).await
    }

    fn parse_error(&mut self, e: smtp_proto::Error) -> Flow {
        use smtp_proto::Error as E;
        let reply = match e {
            E::UnknownCommand | E::NeedsMoreData { .. } => {
                Reply::new(500, "5.5.2", "Syntax error, command unrecognized")
            }
            E::InvalidSenderAddress => Reply::new(553, "5.1.7", "Bad sender address syntax"),
            E::InvalidRecipientAddress => Reply::new(553, "5.1.3", "Bad recipient address syntax"),
            E::SyntaxError { syntax } => Reply::new(501, "5.5.4", format!("Syntax: {syntax}")),
            E::InvalidParameter { param } => {
                Reply::new(501, "5.5.4", format!("Invalid parameter {param}"))
            }
            E::UnsupportedParameter { param } => {
                Reply::new(555, "5.5.4", format!("Unsupported parameter {param}"))
            }
            E::ResponseTooLong | E::InvalidResponse { .. } => {
                Reply::new(500, "5.5.2", "Syntax error")
            }
        };
        self.error(reply)
    }

    async fn command(&mut self, request: Request<String>) -> std::io::Result<Flow> {
        Ok(match request {
            Request::Ehlo { host } => self.hello(host, true),
            Request::Helo { host } => self.hello(host, false),
            Request::Lhlo { .. } => self.error(Reply::new(500, "5.5.1", "This is SMTP, not LMTP")),
            Request::StartTls => return self.starttls().await,
            Request::Auth {
                mechanism,
                initial_response,
            } => return self.auth(mechanism, initial_response).await,
            Request::Mail { from } => {
                let utf8 = from.flags & MAIL_SMTPUTF8 != 0;
                self.mail(from.address, utf8, from.size as u64).await
            }
            Request::Rcpt { to } => self.rcpt(to.address).await,
            Request::Data => return self.data().await,
            Request::Bdat {
                chunk_size,
                is_last,
            } => return self.bdat(chunk_size, is_last).await,
            Request::Rset => {
                self.tx = None;
                self.reply(Reply::new(250, "2.0.0", "Ok"));
                Flow::Continue
            }
            Request::Noop { .. } => {
                self.reply(Reply::new(250, "2.0.0", "Ok"));
                Flow::Continue
            }
            Request::Vrfy { value } => self.vrfy(value).await,
            Request::Expn { .. } => {
                self.reply(Reply::new(502, "5.5.1", "EXPN is not available"));
                Flow::Continue
            }
            Request::Help { .. } => {
                self.reply(Reply::new(214, "2.0.0", "See RFC 5321; mailgrid"));
                Flow::Continue
            }
            Request::Quit => {
                self.reply(Reply::new(221, "2.0.0", "Bye"));
                Flow::Close
            }
            Request::Etrn { .. } | Request::Atrn { .. } | Request::Burl { .. } => {
                self.error(Reply::new(502, "5.5.1", "Command not implemented"))
            }
        })
    }

    fn auth_offered(&self) -> bool {
        self.tls || self.smtp.config.auth_without_tls
    }

    fn hello(&mut self, host: String, esmtp: bool) -> Flow {
        if host.is_empty() {
            return self.error(Reply::new(501, "5.5.4", "Syntax: EHLO hostname"));
        }
        self.tx = None;
        self.helo = Some(host);
        self.esmtp = esmtp;
        let name = &self.smtp.hostname;
        if !esmtp {
            self.reply(Reply::new(250, "", name.clone()));
            return Flow::Continue;
        }
        let mut lines = vec![
            format!("{name} greets {}", self.peer.ip()),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.smtp.policy.cluster_message_bytes_max()),
            "8BITMIME".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "SMTPUTF8".to_string(),
            "CHUNKING".to_string(),
        ];
        if !self.tls && self.smtp.tls.is_some() {
            lines.push("STARTTLS".to_string());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        self.reply(Reply::new(250, "", lines.join("\n")));
        Flow::Continue
    }

    async fn starttls(&mut self) -> std::io::Result<Flow> {
        if self.tls {
            return Ok(self.error(Reply::new(503, "5.5.1", "TLS already active")));
        }
        let Some(acceptor) = self.smtp.tls.clone() else {
            self.reply(Reply::new(454, "4.7.0", "TLS not available"));
            return Ok(Flow::Continue);
        };
        self.reply(Reply::new(220, "2.0.0", "Ready to start TLS"));
        self.flush().await?;
        let timeout = self.smtp.config.tls_handshake_timeout;
        if !upgrade_to_tls(&mut self.io, &acceptor, timeout, READ_BUFFER_BYTES).await {
            return Ok(Flow::Close);
        }
        // RFC 3207 §4.2: forget everything learned before the handshake.
        self.tls = true;
        self.helo = None;
        self.auth = None;
        self.tx = None;
        Ok(Flow::Continue)
    }

    async fn auth(&mut self, mechanism: u64, initial: String) -> std::io::Result<Flow> {
        if self.helo.is_none() || !self.esmtp {
            return Ok(self.error(Reply::new(503, "5.5.1", "Send EHLO first")));
        }
        if self.auth.is_some() {
            return Ok(self.error(Reply::new(503, "5.5.1", "Already authenticated")));
        }
        if self.tx.is_some() {
            return Ok(self.error(Reply::new(
                503,
                "5.5.1",
                "AUTH not allowed during a mail transaction",
            )));
        }
        if !self.auth_offered() {
            let text = "Must issue a STARTTLS command first";
            return Ok(self.error(Reply::new(538, "5.7.11", text)));
        }
        let credentials = match mechanism {
            AUTH_PLAIN => {
                let response = if initial.is_empty() {
                    self.reply(Reply::new(334, "", ""));
                    match self.sasl_line().await? {
                        Some(r) => r,
                        None => return Ok(Flow::Close),
                    }
                } else if initial == "=" {
                    String::new()
                } else {
                    initial
                };
                if response == "*" {
                    return Ok(self.error(Reply::new(501, "5.0.0", "Authentication cancelled")));
                }
                decode_plain(&response)
            }
            AUTH_LOGIN => match self.login_exchange(initial).await? {
                Some(Ok(c)) => Ok(c),
                Some(Err(reply)) => return Ok(self.error(reply)),
                None => return Ok(Flow::Close),
            },
            _ => {
                let text = "Unrecognized authentication type";
                return Ok(self.error(Reply::new(504, "5.5.4", text)));
            }
        };
        let (user, password) = match credentials {
            Ok(c) => c,
            Err(why) => return Ok(self.error(Reply::new(501, "5.5.2", why))),
        };
        Ok(self.verify(user, password).await)
    }

    /// AUTH LOGIN: username and password prompts, each answered in base64.
    async fn login_exchange(
        &mut self,
        initial: String,
    ) -> std::io::Result<Option<Result<(String, String), Reply>>> {
        let user_b64 = if initial.is_empty() {
            self.reply(Reply::new(334, "", "VXNlcm5hbWU6"));
            match self.sasl_line().await? {
                Some(r) => r,
                None => return Ok(None),
            }
        } else {
            initial
        };
        if user_b64 == "*" {
            return Ok(Some(Err(Reply::new(
                501,
                "5.0.0",
                "Authentication cancelled",
            ))));
        }
        self.reply(Reply::new(334, "", "UGFzc3dvcmQ6"));
        let Some(password_b64) = self.sasl_line().await? else {
            return Ok(None);
        };
        if password_b64 == "*" {
            return Ok(Some(Err(Reply::new(
                501,
                "5.0.0",
                "Authentication cancelled",
            ))));
        }
        let decoded =
            decode_base64_text(&user_b64).and_then(|u| Ok((u, decode_base64_text(&password_b64)?)));
        Ok(Some(decoded.map_err(|why| Reply::new(501, "5.5.2", why))))
    }

    async fn sasl_line(&mut self) -> std::io::Result<Option<String>> {
        match self.read_input(AUTH_LINE_BYTES_MAX).await? {
            Input::Line(l) => Ok(Some(
                String::from_utf8_lossy(trim_eol(&l)).trim().to_string(),
            )),
            Input::TooLong => Ok(Some("*".to_string())),
            Input::Gone | Input::TimedOut => Ok(None),
        }
    }

    async fn verify(&mut self, user: String, password: String) -> Flow {
        let throttle = self.smtp.throttle.clone();
        let ip = self.peer.ip();
        match throttle.check(ip, &user, Instant::now()) {
            Verdict::Refuse => {
                let text = "Too many failed logins; try again later";
                self.reply(Reply::new(454, "4.7.0", text));
                return Flow::Continue;
            }
            Verdict::Allow(delay) if !delay.is_zero() => tokio::time::sleep(delay).await,
            Verdict::Allow(_) => {}
        }
        match mail::authenticate(&self.smtp.node.router, &user, &password).await {
            Ok(Some(address)) => {
                throttle.success(&address);
                self.auth = Some(Authenticated { address });
                self.reply(Reply::new(235, "2.7.0", "Authentication successful"));
                Flow::Continue
            }
            Ok(None) => {
                throttle.failure(ip, &user, Instant::now());
                self.error(Reply::new(
                    535,
                    "5.7.8",
                    "Authentication credentials invalid",
                ))
            }
            Err(e) => {
                tracing::info!("AUTH for {user} could not be checked: {e}");
                let text = "Temporary authentication failure; try again later";
                self.reply(Reply::new(454, "4.7.0", text));
                Flow::Continue
            }
        }
    }

    async fn mail(&mut self, from: String, utf8: bool, size: u64) -> Flow {
        if self.helo.is_none() {
            return self.error(Reply::new(503, "5.5.1", "Send EHLO or HELO first"));
        }
        if self.tx.is_some() {
            return self.error(Reply::new(503, "5.5.1", "Nested MAIL command"));
        }
        if self.kind != ListenerKind::Mx && self.auth.is_none() {
            return self.error(Reply::new(530, "5.7.0", "Authentication required"));
        }
        if !utf8 && !from.is_ascii() {
            return self.error(Reply::new(553, "5.6.7", "Non-ASCII address needs SMTPUTF8"));
        }
        if self.smtp.node.host().disk_low().is_some() {
            self.reply(insufficient_storage());
            return Flow::Continue;
        }
        let max = self.smtp.policy.cluster_message_bytes_max();
        if size > max {
            let text = format!("Message size exceeds the limit of {max} bytes");
            self.reply(Reply::new(552, "5.3.4", text));
            return Flow::Continue;
        }
        let from = if from.is_empty() {
            from
        } else {
            normalize_address(&from)
        };
        if !from.is_empty() && !is_valid_address(&from) {
            return self.error(Reply::new(553, "5.1.7", "Bad sender address syntax"));
        }
        if let Some(user) = self.auth.clone() {
            match mail::may_send_as(&self.smtp.node.router, &user.address, &from).await {
                Ok(true) => {}
                Ok(false) => {
                    let text = format!("Sender address <{from}> is not owned by {}", user.address);
                    self.reply(Reply::new(553, "5.7.1", text));
                    return Flow::Continue;
                }
                Err(e) => return self.unavailable(e),
            }
        }
        self.tx = Some(Transaction {
            from,
            utf8,
            size_hint: size,
            ..Transaction::default()
        });
        self.reply(Reply::new(250, "2.1.0", "Ok"));
        Flow::Continue
    }

    fn unavailable(&mut self, e: mail::MailServiceError) -> Flow {
        tracing::info!("mail store unavailable: {e}");
        let text = "Temporary failure: the mail store is unavailable, try again later";
        self.reply(Reply::new(451, "4.3.0", text));
        Flow::Continue
    }

    async fn rcpt(&mut self, to: String) -> Flow {
        let Some(tx) = self.tx.as_ref() else {
            return self.error(Reply::new(503, "5.5.1", "Need MAIL command"));
        };
        if tx.accepted_rcpts >= self.smtp.config.recipients_max {
            self.reply(Reply::new(452, "4.5.3", "Too many recipients"));
            return Flow::Continue;
        }
        if !tx.utf8 && !to.is_ascii() {
            return self.error(Reply::new(553, "5.6.7", "Non-ASCII address needs SMTPUTF8"));
        }
        let address = normalize_address(&to);
        if !is_valid_address(&address) {
            return self.error(Reply::new(501, "5.1.3", "Bad recipient address syntax"));
        }
        let size = tx.size_hint;
        let limit = self.smtp.policy.message_bytes_max(domain_of(&address));
        if size > limit {
            let text =
                format!("Message size exceeds the limit of {limit} bytes for this recipient");
            self.reply(Reply::new(552, "5.3.4", text));
            return Flow::Continue;
        }
        let verdict = match self.smtp.policy.check_recipient(&address, size).await {
            Ok(v) => v,
            Err(e) => return self.unavailable(e),
        };
        let reply = match verdict {
            RcptVerdict::Local(accounts) => {
                let tx = self.tx.as_mut().expect("transaction checked above");
                tx.accepted_rcpts += 1;
                if !tx.recipients.contains(&address) {
                    tx.recipients.push(address);
                }
                tx.accounts.extend(accounts);
                Reply::new(250, "2.1.5", "Ok")
            }
            RcptVerdict::Unknown => {
                return self.error(Reply::new(
                    550,
                    "5.1.1",
                    format!("<{address}>: no such user here"),
                ))
            }
            RcptVerdict::OverQuota(why) => Reply::new(452, "4.2.2", why),
            RcptVerdict::Remote if self.auth.is_some() => {
                let tx = self.tx.as_mut().expect("transaction checked above");
                tx.accepted_rcpts += 1;
                if !tx.recipients.contains(&address) {
                    tx.recipients.push(address.clone());
                    tx.remote.push(address);
                }
                Reply::new(250, "2.1.5", "Ok")
            }
            RcptVerdict::Remote => {
                Reply::new(554, "5.7.1", format!("<{address}>: relay access denied"))
            }
        };
        self.reply(reply);
        Flow::Continue
    }

    /// The limit for the message: the smallest of its recipients' domains' limits.
    fn message_limit(&self) -> u64 {
        let policy = &self.smtp.policy;
        let tx = self.tx.as_ref();
        tx.into_iter()
            .flat_map(|t| t.recipients.iter())
            .map(|r| policy.message_bytes_max(domain_of(r)))
            .min()
            .unwrap_or_else(|| policy.cluster_message_bytes_max())
    }

    async fn data(&mut self) -> std::io::Result<Flow> {
        match self.tx.as_ref() {
            None => return Ok(self.error(Reply::new(503, "5.5.1", "Need MAIL command"))),
            Some(tx) if tx.bdat.is_some() => {
                return Ok(self.error(Reply::new(503, "5.5.1", "DATA not allowed after BDAT")))
            }
            Some(tx) if tx.recipients.is_empty() => {
                return Ok(self.error(Reply::new(554, "5.5.1", "No valid recipients")))
            }
            Some(_) => {}
        }
        let limit = self.message_limit();
        self.reply(Reply::new(354, "", "End data with <CR><LF>.<CR><LF>"));
        self.flush().await?;
        let mut decoder = DataDecoder::new(limit as usize);
        while !decoder.is_done() {
            let timeout = self.smtp.config.data_timeout;
            let buf = match tokio::time::timeout(timeout, self.io.fill_buf()).await {
                Err(_) => {
                    self.reply(Reply::new(421, "4.4.2", "Timeout while receiving data"));
                    return Ok(Flow::Close);
                }
                Ok(r) => r?,
            };
            if buf.is_empty() {
                return Ok(Flow::Close); // nothing acknowledged, nothing stored
            }
            let used = decoder.feed(buf);
            self.io.consume(used);
        }
        let (body, size, faults) = decoder.finish();
        let tx = self.tx.take().expect("transaction checked above");
        let reply = if faults.over_limit {
            Reply::new(
                552,
                "5.3.4",
                format!("Message size {size} exceeds the limit of {limit} bytes"),
            )
        } else if faults.bare_line_ending {
            Reply::new(
                550,
                "5.6.11",
                "Message contains a bare CR or LF; lines must end with CRLF",
            )
        } else if faults.nul {
            Reply::new(554, "5.6.0", "Message contains NUL bytes")
        } else {
            self.store(tx, body).await
        };
        self.reply(reply);
        Ok(Flow::Continue)
    }

    async fn bdat(&mut self, chunk_size: usize, last: bool) -> std::io::Result<Flow> {
        // The chunk follows the command whatever we answer, so it is always read (RFC 3030).
        let limit = self.message_limit();
        let accepting = matches!(self.tx.as_ref(), Some(tx) if !tx.recipients.is_empty());
        let keep = if accepting {
            let so_far = self.tx.as_ref().map(|t| t.bdat_size).unwrap_or(0);
            so_far.saturating_add(chunk_size as u64) <= limit
        } else {
            false
        };
        let mut chunk = Vec::new();
        let mut left = chunk_size as u64;
        let timeout = self.smtp.config.data_timeout;
        let mut block = [0u8; 8192];
        while left > 0 {
            let want = left.min(block.len() as u64) as usize;
            let n = match tokio::time::timeout(timeout, self.io.read(&mut block[..want])).await {
                Err(_) => {
                    self.reply(Reply::new(421, "4.4.2", "Timeout while receiving data"));
                    return Ok(Flow::Close);
                }
                Ok(r) => r?,
            };
            if n == 0 {
                return Ok(Flow::Close);
            }
            if keep {
                chunk.extend_from_slice(&block[..n]);
            }
            left -= n as u64;
        }
        let Some(tx) = self.tx.as_mut() else {
            return Ok(self.error(Reply::new(503, "5.5.1", "Need MAIL command")));
        };
        if tx.recipients.is_empty() {
            return Ok(self.error(Reply::new(554, "5.5.1", "No valid recipients")));
        }
        tx.bdat_size = tx.bdat_size.saturating_add(chunk_size as u64);
        if tx.bdat_size > limit {
            // The transaction is over; the client must start again with a smaller message.
            let size = tx.bdat_size;
            self.tx = None;
            let text = format!("Message size {size} exceeds the limit of {limit} bytes");
            self.reply(Reply::new(552, "5.3.4", text));
            return Ok(Flow::Continue);
        }
        tx.bdat
            .get_or_insert_with(Vec::new)
            .extend_from_slice(&chunk);
        if !last {
            self.reply(Reply::new(
                250,
                "2.0.0",
                format!("{chunk_size} octets received"),
            ));
            return Ok(Flow::Continue);
        }
        let mut tx = self.tx.take().expect("transaction checked above");
        let body = tx.bdat.take().unwrap_or_default();
        let reply = self.store(tx, body).await;
        self.reply(reply);
        Ok(Flow::Continue)
    }

    /// The `with` protocol of the `Received:` header (RFC 3848: ESMTPS, ESMTPA, ESMTPSA are
    /// defined only for ESMTP).
    fn protocol(&self) -> String {
        let extended = self.esmtp || self.tls || self.auth.is_some();
        let mut p = String::from(if extended { "ESMTP" } else { "SMTP" });
        if self.tls {
            p.push('S');
        }
        if self.auth.is_some() {
            p.push('A');
        }
        p
    }

    /// Stores the message in every recipient's INBOX; the reply tells the client whether it
    /// is now our responsibility.
    async fn store(&mut self, tx: Transaction, data: Vec<u8>) -> Reply {
        let original = blake3::hash(&data);
        // The same sender sending the same bytes again (a retry after a lost reply or a
        // 451) is the same message: each mailbox gets it once.
        let key = mail::message_key(&[b"smtp", tx.from.as_bytes(), original.as_bytes()]);
        let id = hex::encode(&key[..8]);
        let trace = Trace {
            helo: self.helo.as_deref().unwrap_or(""),
            peer_ip: self.peer.ip(),
            hostname: &self.smtp.hostname,
            protocol: self.protocol(),
            id: &id,
            recipient: (tx.recipients.len() == 1).then(|| tx.recipients[0].as_str()),
            date: time::OffsetDateTime::now_utc(),
        };
        let received = trace.header();
        if !tx.remote.is_empty() {
            // What leaves the cluster: our Received: line and the data, DKIM-signed when the
            // sender's domain has a key (the Return-Path is the final MTA's to add).
            let mut message = Vec::with_capacity(received.len() + data.len());
            message.extend_from_slice(received.as_bytes());
            message.extend_from_slice(&data);
            match self.dkim_signature(&tx.from, &message) {
                Ok(Some(header)) => {
                    message.splice(0..0, header.into_bytes());
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("message {id} not signed: {e}");
                    let text =
                        "Temporary failure: the message could not be signed, try again later";
                    return Reply::new(451, "4.3.0", text);
                }
            }
            // Queued before anything is stored locally: a failure here leaves nothing done
            // that a retry would not repeat exactly (both are keyed by the message).
            let now = mail::now();
            let result = queue::enqueue(
                &self.smtp.node.router,
                &tx.from,
                &tx.remote,
                message,
                &key,
                now,
            )
            .await;
            if let Err(e) = result {
                tracing::info!("message {id} not queued: {e}");
                if e.is_disk_full() {
                    return insufficient_storage();
                }
                let text = "Temporary failure: the message could not be queued, try again later";
                return Reply::new(451, "4.3.0", text);
            }
            if tx.accounts.is_empty() {
                return Reply::new(250, "2.0.0", format!("Ok: queued as {id}"));
            }
        }
        let mut body = format!("Return-Path: <{}>\r\n{received}", tx.from).into_bytes();
        body.extend_from_slice(&data);
        let size = body.len() as u64;
        let accounts: Vec<String> = tx.accounts.into_iter().collect();
        for account in &accounts {
            match self.smtp.policy.domain_fits(domain_of(account), size).await {
                Ok(true) => {}
                Ok(false) => {
                    let text = format!("Domain {} is over its quota", domain_of(account));
                    return Reply::new(552, "5.2.2", text);
                }
                Err(e) => {
                    tracing::info!("domain quota check failed: {e}");
                    return Reply::new(451, "4.3.0", "Temporary failure, try again later");
                }
            }
        }
        let outcomes = match mail::deliver(&self.smtp.node.router, &accounts, &body, &key).await {
            Ok(o) => o,
            Err(e) => {
                tracing::info!("delivery {id} not committed: {e}");
                if e.is_disk_full() {
                    return insufficient_storage();
                }
                let text = "Temporary failure: the message could not be stored, try again later";
                return Reply::new(451, "4.3.0", text);
            }
        };
        let delivered = outcomes
            .iter()
            .filter(|(_, o)| matches!(o, RecipientOutcome::Delivered { .. }))
            .count();
        for (account, outcome) in &outcomes {
            if matches!(outcome, RecipientOutcome::Delivered { .. }) {
                self.smtp.policy.note_stored(account, size);
            }
        }
        if delivered == outcomes.len() {
            return Reply::new(250, "2.0.0", format!("Ok: stored as {id}"));
        }
        let over_quota = outcomes
            .iter()
            .any(|(_, o)| *o == RecipientOutcome::OverQuota);
        if delivered == 0 && over_quota {
            return Reply::new(552, "5.2.2", "Mailbox full");
        }
        if delivered == 0 {
            return Reply::new(550, "5.1.1", "No such user here");
        }
        // Some mailboxes have it, others could not take it now. A temporary failure makes the
        // sender retry; mailboxes that have it will not get a second copy.
        Reply::new(
            452,
            "4.2.2",
            "Some recipients could not take the message now; try again later",
        )
    }

    /// The DKIM-Signature header for mail from `sender`, when its domain has a key.
    fn dkim_signature(&self, sender: &str, message: &[u8]) -> Result<Option<String>, String> {
        if sender.is_empty() {
            return Ok(None);
        }
        let domain = domain_of(sender).to_ascii_lowercase();
        let key = self
            .smtp
            .node
            .host()
            .meta()
            .read_meta(|m| m.dkim(&domain))
            .map_err(|e| e.to_string())?;
        match key {
            Some(key) => dkim::sign(&key, &domain, message).map(Some),
            None => Ok(None),
        }
    }

    async fn vrfy(&mut self, value: String) -> Flow {
        if !self.smtp.config.vrfy {
            let text = "Cannot VRFY user, but will accept message and attempt delivery";
            self.reply(Reply::new(252, "2.5.2", text));
            return Flow::Continue;
        }
        let address = normalize_address(value.trim_matches(['<', '>']));
        if !is_valid_address(&address) {
            return self.error(Reply::new(501, "5.1.3", "Bad address syntax"));
        }
        match self.smtp.policy.check_recipient(&address, 0).await {
            Ok(RcptVerdict::Local(_)) | Ok(RcptVerdict::OverQuota(_)) => {
                self.reply(Reply::new(250, "2.1.5", format!("<{address}>")))
            }
            Ok(RcptVerdict::Unknown) => self.reply(Reply::new(550, "5.1.1", "No such user here")),
            Ok(RcptVerdict::Remote) => self.reply(Reply::new(551, "5.1.6", "Not a local address")),
            Err(e) => return self.unavailable(e),
        }
        Flow::Continue
    }
}

/// RFC 5321 4.5.3.1.10: a full disk (this node's, or a partition leader's) is a temporary
/// condition; the sender retries, by then on a leader with room.
fn insufficient_storage() -> Reply {
    Reply::new(452, "4.3.1", "Insufficient system storage, try again later")
}
