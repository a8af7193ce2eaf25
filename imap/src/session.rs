//! One IMAP connection: not authenticated (CAPABILITY, STARTTLS, LOGIN, AUTHENTICATE) →
//! authenticated (mailbox commands) → selected (message commands, in `selected.rs`).
//!
//! Each command is read whole (see `framing`), parsed by imap-codec and answered; changes
//! are proposed to the user's partition and acknowledged only once committed. Before the
//! tagged answer of a command in the selected state, the session catches up with changes
//! made elsewhere (other sessions, other nodes, deliveries) and reports them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use imap_codec::decode::Decoder;
use imap_codec::imap_types::auth::AuthMechanism;
use imap_codec::imap_types::command::{CommandBody, SelectParameter};
use imap_codec::imap_types::extensions::enable::CapabilityEnable;
use imap_codec::imap_types::mailbox::{ListMailbox, Mailbox as MailboxArg};
use imap_codec::imap_types::status::StatusDataItemName;
use imap_codec::CommandCodec;
use service::partition::{MailError, Mailbox, PartitionCommand, PartitionResponse};
use service::types::{domain_of, normalize_mailbox_name, ModSeq};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::framing::{read_command, tag_of, Frame, Limits};
use super::mime::write_string;
use super::view::{flag_list, View, Wording};
use super::{Imap, ImapKind};
use service::api::{Lookup, Query, QueryResult, Vanished};
use service::lines::{continue_line, read_line, trim_eol, Line};
use service::mail::{self, MailServiceError};
use service::net::{upgrade_to_tls, Stream};
use service::policy::throttle::Verdict;

const READ_BUFFER_BYTES: usize = 16 * 1024;
/// Commands other than APPEND: lines and literals together.
const COMMAND_BYTES_MAX: usize = 256 * 1024;
const LINE_BYTES_MAX: usize = 64 * 1024;
/// A SASL response line.
const SASL_LINE_BYTES_MAX: usize = 8 * 1024;
/// Longest LIST pattern (matching costs pattern × name).
const PATTERN_BYTES_MAX: usize = 1024;
/// Commands that fail (BAD) before the connection is closed.
const ERRORS_MAX: u32 = 50;
/// Flush the response buffer once it holds this much.
pub(super) const FLUSH_BYTES: usize = 256 * 1024;
pub(super) const DELIMITER: char = '/';

pub(super) const PERMANENT_FLAGS: &str = "(\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)";
pub(super) const FLAGS: &str = "(\\Answered \\Flagged \\Deleted \\Seen \\Draft)";

pub(super) enum Flow {
    Continue,
    Close,
}

/// The tagged completion of a command.
pub(super) struct Done {
    pub status: &'static str,
    pub text: String,
    pub flow: Flow,
}

impl Done {
    pub fn ok(text: impl Into<String>) -> Done {
        Done {
            status: "OK",
            text: text.into(),
            flow: Flow::Continue,
        }
    }
    pub fn no(text: impl Into<String>) -> Done {
        Done {
            status: "NO",
            text: text.into(),
            flow: Flow::Continue,
        }
    }
    pub fn bad(text: impl Into<String>) -> Done {
        Done {
            status: "BAD",
            text: text.into(),
            flow: Flow::Continue,
        }
    }
    pub fn unavailable(e: impl std::fmt::Display) -> Done {
        tracing::info!("IMAP command failed in the cluster: {e}");
        Done::no("[UNAVAILABLE] the mail store is unavailable, try again")
    }
}

pub struct Session {
    pub(super) imap: Arc<Imap>,
    kind: ImapKind,
    peer: SocketAddr,
    pub(super) io: BufReader<Stream>,
    pub(super) out: Vec<u8>,
    tls: bool,
    /// The logged-in account's address.
    pub(super) user: Option<String>,
    pub(super) selected: Option<View>,
    pub(super) wording: Wording,
    errors: u32,
}

/// A mailbox argument as a stored name, or the reason it is not one.
pub(super) fn mailbox_name(m: &MailboxArg<'_>) -> Result<String, Done> {
    let raw = match m {
        MailboxArg::Inbox => return Ok("INBOX".into()),
        MailboxArg::Other(o) => o.as_ref(),
    };
    let text = std::str::from_utf8(raw)
        .map_err(|_| Done::no("[CANNOT] mailbox names must be modified UTF-7 or UTF-8"))?;
    normalize_mailbox_name(text).ok_or_else(|| Done::no("[CANNOT] invalid mailbox name"))
}

/// An IMAP string (quoted or literal) in a response line being built.
pub(super) fn string(out: &mut Vec<u8>, s: &str) {
    write_string(out, s.as_bytes());
}

pub(super) fn mail_error(e: &MailError) -> Done {
    match e {
        MailError::NoSuchMailbox => Done::no("[NONEXISTENT] no such mailbox"),
        MailError::MailboxExists => Done::no("[ALREADYEXISTS] mailbox already exists"),
        MailError::InvalidMailboxName => Done::no("[CANNOT] invalid mailbox name"),
        MailError::OverQuota => Done::no("[OVERQUOTA] over quota"),
        MailError::TooLarge => Done::no("[TOOBIG] message too large"),
        MailError::TooMany => Done::no("[LIMIT] too many"),
        MailError::NotAllowed => Done::no("[CANNOT] not allowed on this mailbox"),
        MailError::InvalidFlag => Done::bad("invalid flag"),
        other => Done::no(other.to_string()),
    }
}

/// LIST wildcard matching: `*` matches anything, `%` anything but the delimiter. A table of
/// (pattern prefix × name prefix) so no pattern can make it exponential.
fn wildcard_match(pattern: &[char], name: &[char]) -> bool {
    let mut row = vec![false; name.len() + 1];
    row[0] = true;
    for p in pattern {
        let mut next = vec![false; name.len() + 1];
        match p {
            '*' | '%' => {
                next[0] = row[0];
                for j in 1..=name.len() {
                    let can_extend = *p == '*' || name[j - 1] != DELIMITER;
                    next[j] = row[j] || (next[j - 1] && can_extend);
                }
            }
            c => {
                for j in 1..=name.len() {
                    next[j] = row[j - 1] && name[j - 1] == *c;
                }
            }
        }
        row = next;
    }
    row[name.len()]
}

/// Whether a LIST pattern matches a mailbox name (INBOX in any case).
fn list_match(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let name_chars: Vec<char> = name.chars().collect();
    if wildcard_match(&pattern, &name_chars) {
        return true;
    }
    // "inbox" and "InBox/..." patterns name INBOX, which is case-insensitive.
    if let Some(rest) = name.strip_prefix("INBOX") {
        let upper: String = pattern.iter().collect();
        if upper.len() >= 5 && upper.is_char_boundary(5) && upper[..5].eq_ignore_ascii_case("INBOX")
        {
            let p: Vec<char> = format!("INBOX{}", &upper[5..]).chars().collect();
            let n: Vec<char> = format!("INBOX{rest}").chars().collect();
            return wildcard_match(&p, &n);
        }
    }
    false
}

impl Session {
    pub fn new(imap: Arc<Imap>, kind: ImapKind, peer: SocketAddr) -> Session {
        Session {
            imap,
            kind,
            peer,
            io: BufReader::with_capacity(READ_BUFFER_BYTES, Stream::Closed),
            out: Vec::new(),
            tls: false,
            user: None,
            selected: None,
            wording: Wording::default(),
            errors: 0,
        }
    }

    pub async fn run(mut self, tcp: TcpStream) {
        let stream = if self.kind == ImapKind::Tls {
            let Some(acceptor) = self.imap.tls.clone() else {
                return;
            };
            match service::net::accept_tls(&acceptor, tcp, self.imap.config.tls_handshake_timeout)
                .await
            {
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
        let greeting = format!(
            "* OK [CAPABILITY {}] {} mailgrid IMAP4rev1 ready\r\n",
            self.capabilities(),
            self.imap.node.file.node_id
        );
        self.out.extend_from_slice(greeting.as_bytes());
        while let Ok(Flow::Continue) = self.next_command().await {}
        let _ = self.flush().await;
        let _ = self.io.get_mut().shutdown().await;
    }

    pub(super) async fn flush(&mut self) -> std::io::Result<()> {
        service::net::write_out(
            self.io.get_mut(),
            &mut self.out,
            self.imap.config.idle_timeout,
        )
        .await
    }

    fn auth_allowed(&self) -> bool {
        self.tls || self.imap.config.auth_without_tls
    }

    fn capabilities(&self) -> String {
        let mut caps = vec!["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE"];
        caps.extend([
            "NAMESPACE",
            "UIDPLUS",
            "MOVE",
            "UNSELECT",
            "CHILDREN",
            "SPECIAL-USE",
            "QUOTA",
            "QUOTA=RES-STORAGE",
            "QUOTA=RES-MESSAGE",
            "CONDSTORE",
            "QRESYNC",
            "WITHIN",
            "STATUS=SIZE",
        ]);
        if !self.tls && self.imap.tls.is_some() {
            caps.push("STARTTLS");
        }
        if self.auth_allowed() {
            caps.push("AUTH=PLAIN");
        } else {
            caps.push("LOGINDISABLED");
        }
        caps.join(" ")
    }

    async fn next_command(&mut self) -> std::io::Result<Flow> {
        if self.io.buffer().is_empty() {
            self.flush().await?;
        }
        let limits = Limits {
            line: LINE_BYTES_MAX,
            command: COMMAND_BYTES_MAX,
            append: self.append_limit() as usize + LINE_BYTES_MAX,
        };
        let timeout = self.imap.config.idle_timeout;
        let frame = match tokio::time::timeout(timeout, read_command(&mut self.io, limits)).await {
            Err(_) => {
                self.out
                    .extend_from_slice(b"* BYE autologout: idle for too long\r\n");
                return Ok(Flow::Close);
            }
            Ok(frame) => frame?,
        };
        let bytes = match frame {
            Frame::Eof => return Ok(Flow::Close),
            Frame::Fatal(why) => {
                self.out
                    .extend_from_slice(format!("* BYE {why}\r\n").as_bytes());
                return Ok(Flow::Close);
            }
            Frame::Refused { tag, response } => {
                self.out
                    .extend_from_slice(format!("{tag} {response}\r\n").as_bytes());
                return Ok(self.count_error());
            }
            Frame::Command(bytes) => bytes,
        };
        let command = match CommandCodec::default().decode(&bytes) {
            Ok((b"", command)) => command,
            _ => {
                let tag = tag_of(&bytes).unwrap_or_else(|| "*".into());
                let text = if trim_eol(&bytes).is_empty() {
                    "empty command line"
                } else {
                    "unknown command or invalid arguments"
                };
                self.out
                    .extend_from_slice(format!("{tag} BAD {text}\r\n").as_bytes());
                return Ok(self.count_error());
            }
        };
        let tag = command.tag.inner().to_string();
        let name = command.body.name();
        let selection_changes = matches!(
            command.body,
            CommandBody::Select { .. }
                | CommandBody::Examine { .. }
                | CommandBody::Unselect
                | CommandBody::Close
                | CommandBody::Logout
                | CommandBody::Idle
        );
        // EXPUNGE responses may not be sent during FETCH, STORE or SEARCH by sequence number.
        let allow_expunge = !matches!(
            command.body,
            CommandBody::Fetch { uid: false, .. }
                | CommandBody::Store { uid: false, .. }
                | CommandBody::Search { uid: false, .. }
        );
        let done = self.dispatch(&tag, command.body).await?;
        if done.status != "BAD" && !selection_changes && self.selected.is_some() {
            if let Flow::Close = self.catch_up(allow_expunge).await {
                return Ok(Flow::Close);
            }
        }
        // STARTTLS answered before its handshake; it has nothing left to say.
        if !done.status.is_empty() {
            let line = format!("{tag} {} {}\r\n", done.status, done.text);
            self.out.extend_from_slice(line.as_bytes());
        }
        tracing::trace!("IMAP {name} from {}: {}", self.peer, done.status);
        if done.status == "BAD" {
            return Ok(self.count_error());
        }
        if self.out.len() >= FLUSH_BYTES {
            self.flush().await?;
        }
        Ok(done.flow)
    }

    fn count_error(&mut self) -> Flow {
        self.errors += 1;
        if self.errors >= ERRORS_MAX {
            self.out
                .extend_from_slice(b"* BYE too many invalid commands\r\n");
            return Flow::Close;
        }
        Flow::Continue
    }

    /// The largest message this user may store (the domain's limit, else the cluster's).
    pub(super) fn append_limit(&self) -> u64 {
        match &self.user {
            Some(user) => self.imap.policy.message_bytes_max(domain_of(user)),
            None => self.imap.policy.cluster_message_bytes_max(),
        }
    }

    async fn dispatch(&mut self, tag: &str, body: CommandBody<'_>) -> std::io::Result<Done> {
        use CommandBody as C;
        // Any state.
        match body {
            C::Capability => {
                let line = format!("* CAPABILITY {}\r\n", self.capabilities());
                self.out.extend_from_slice(line.as_bytes());
                return Ok(Done::ok("CAPABILITY completed"));
            }
            C::Noop => return Ok(Done::ok("NOOP completed")),
            C::Logout => {
                self.out.extend_from_slice(b"* BYE logging out\r\n");
                return Ok(Done {
                    flow: Flow::Close,
                    ..Done::ok("LOGOUT completed")
                });
            }
            C::Id { .. } => {
                let line = format!(
                    "* ID (\"name\" \"mailgrid\" \"vendor\" \"mailgrid\" \"version\" \"{}\")\r\n",
                    env!("CARGO_PKG_VERSION")
                );
                self.out.extend_from_slice(line.as_bytes());
                return Ok(Done::ok("ID completed"));
            }
            _ => {}
        }
        if self.user.is_none() {
            return match body {
                C::StartTLS => self.starttls(tag).await,
                C::Login { username, password } => {
                    let user = String::from_utf8_lossy(username.as_ref()).into_owned();
                    let password =
                        String::from_utf8_lossy(password.declassify().as_ref()).into_owned();
                    Ok(self.login(user, password).await)
                }
                C::Authenticate {
                    mechanism,
                    initial_response,
                } => {
                    let initial = initial_response.map(|r| r.declassify().to_vec());
                    self.authenticate(mechanism, initial).await
                }
                _ => Ok(Done::bad("command not valid before login")),
            };
        }
        match body {
            C::StartTLS | C::Login { .. } | C::Authenticate { .. } => {
                Ok(Done::bad("already logged in"))
            }
            C::Select {
                mailbox,
                parameters,
            } => Ok(self.select(&mailbox, parameters, false).await),
            C::Examine {
                mailbox,
                parameters,
            } => Ok(self.select(&mailbox, parameters, true).await),
            C::Create { mailbox } => Ok(self.create(&mailbox).await),
            C::Delete { mailbox } => Ok(self.delete(&mailbox).await),
            C::Rename { from, to } => Ok(self.rename(&from, &to).await),
            C::Subscribe { mailbox } => Ok(self.subscribe(&mailbox, true).await),
            C::Unsubscribe { mailbox } => Ok(self.subscribe(&mailbox, false).await),
            C::List {
                reference,
                mailbox_wildcard,
            } => Ok(self.list(&reference, &mailbox_wildcard, false).await),
            C::Lsub {
                reference,
                mailbox_wildcard,
            } => Ok(self.list(&reference, &mailbox_wildcard, true).await),
            C::Status {
                mailbox,
                item_names,
            } => Ok(self.status(&mailbox, &item_names).await),
            C::Append {
                mailbox,
                flags,
                date,
                message,
            } => Ok(self.append(&mailbox, &flags, date.as_ref(), &message).await),
            C::Idle => self.idle().await,
            C::Enable { capabilities } => Ok(self.enable(capabilities.as_ref())),
            C::Namespace => {
                self.out
                    .extend_from_slice(b"* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n");
                Ok(Done::ok("NAMESPACE completed"))
            }
            C::GetQuota { root } => {
                if !root.as_ref().is_empty() {
                    return Ok(Done::no(
                        "[NONEXISTENT] no such quota root; the root is \"\"",
                    ));
                }
                Ok(self.quota(None).await)
            }
            C::GetQuotaRoot { mailbox } => {
                let name = match mailbox_name(&mailbox) {
                    Ok(n) => n,
                    Err(done) => return Ok(done),
                };
                Ok(self.quota(Some(&name)).await)
            }
            C::SetQuota { .. } => Ok(Done::no("[NOPERM] quotas are set by the administrator")),
            C::Compress { .. } | C::Sort { .. } | C::Thread { .. } => {
                Ok(Done::bad("not supported by this server"))
            }
            other => self.selected_command(other).await,
        }
    }

    async fn starttls(&mut self, tag: &str) -> std::io::Result<Done> {
        if self.tls {
            return Ok(Done::bad("TLS is already active"));
        }
        let Some(acceptor) = self.imap.tls.clone() else {
            return Ok(Done::no("TLS is not available"));
        };
        self.out
            .extend_from_slice(format!("{tag} OK begin TLS negotiation now\r\n").as_bytes());
        self.flush().await?;
        let timeout = self.imap.config.tls_handshake_timeout;
        if !upgrade_to_tls(&mut self.io, &acceptor, timeout, READ_BUFFER_BYTES).await {
            return Err(std::io::ErrorKind::ConnectionAborted.into());
        }
        self.tls = true;
        // The tagged OK went out before the handshake; nothing more to say for this tag.
        // A fresh CAPABILITY is the client's to ask for (RFC 3501 §6.2.1).
        Ok(Done {
            status: "",
            text: String::new(),
            flow: Flow::Continue,
        })
    }

    async fn authenticate(
        &mut self,
        mechanism: AuthMechanism<'_>,
        initial: Option<Vec<u8>>,
    ) -> std::io::Result<Done> {
        if !self.auth_allowed() {
            return Ok(Done::no(
                "[PRIVACYREQUIRED] authentication is only allowed over TLS; use STARTTLS first",
            ));
        }
        if mechanism != AuthMechanism::Plain {
            return Ok(Done::no("unsupported SASL mechanism; PLAIN is offered"));
        }
        let parsed = match initial {
            Some(raw) => service::sasl::parse_plain(&raw),
            None => {
                self.out.extend_from_slice(b"+ \r\n");
                self.flush().await?;
                let mut line = Vec::new();
                let read = tokio::time::timeout(
                    self.imap.config.tls_handshake_timeout * 6,
                    read_line(&mut self.io, SASL_LINE_BYTES_MAX, &mut line),
                )
                .await;
                match read {
                    Err(_) | Ok(Ok(Line::Eof)) | Ok(Err(_)) => {
                        return Err(std::io::ErrorKind::ConnectionAborted.into())
                    }
                    Ok(Ok(Line::TooLong)) => return Ok(Done::bad("response too long")),
                    Ok(Ok(Line::Complete)) => {}
                }
                let text = String::from_utf8_lossy(trim_eol(&line)).into_owned();
                if text.trim() == "*" {
                    return Ok(Done::bad("authentication cancelled"));
                }
                service::sasl::decode_plain(&text)
            }
        };
        Ok(match parsed {
            Ok((user, password)) => self.login(user, password).await,
            Err(why) => Done::bad(why),
        })
    }

    async fn login(&mut self, user: String, password: String) -> Done {
        if !self.auth_allowed() {
            return Done::no(
                "[PRIVACYREQUIRED] login is only allowed over TLS; use STARTTLS first",
            );
        }
        let throttle = self.imap.throttle.clone();
        let ip = self.peer.ip();
        match throttle.check(ip, &user, Instant::now()) {
            Verdict::Refuse => {
                return Done::no("[UNAVAILABLE] too many failed logins; try again later")
            }
            Verdict::Allow(delay) if !delay.is_zero() => tokio::time::sleep(delay).await,
            Verdict::Allow(_) => {}
        }
        match mail::authenticate(&self.imap.node.router, &user, &password).await {
            Ok(Some(address)) => {
                throttle.success(&address);
                self.user = Some(address);
                Done::ok(format!("[CAPABILITY {}] logged in", self.capabilities()))
            }
            Ok(None) => {
                throttle.failure(ip, &user, Instant::now());
                Done::no("[AUTHENTICATIONFAILED] invalid user name or password")
            }
            Err(e) => Done::unavailable(e),
        }
    }

    pub(super) fn address(&self) -> &str {
        self.user.as_deref().unwrap_or_default()
    }

    pub(super) async fn write(
        &self,
        cmd: PartitionCommand,
    ) -> Result<PartitionResponse, MailServiceError> {
        mail::partition_write(&self.imap.node.router, self.address(), cmd).await
    }

    pub(super) async fn read(&self, query: Query) -> Result<QueryResult, MailServiceError> {
        let router = &self.imap.node.router;
        Ok(router.read(router.group_of(self.address()), query).await?)
    }

    async fn mailboxes(&self) -> Result<Vec<Mailbox>, MailServiceError> {
        match self
            .read(Query::Mailboxes(self.address().to_string()))
            .await?
        {
            QueryResult::Mailboxes(m) => Ok(m),
            other => Err(MailServiceError::Unexpected(format!("{other:?}"))),
        }
    }

    fn enable(&mut self, capabilities: &[CapabilityEnable<'_>]) -> Done {
        let mut enabled = Vec::new();
        for c in capabilities {
            let name = c.to_string().to_ascii_uppercase();
            match name.as_str() {
                "CONDSTORE" => {
                    self.wording.condstore = true;
                    enabled.push("CONDSTORE");
                }
                "QRESYNC" => {
                    self.wording.condstore = true;
                    self.wording.qresync = true;
                    enabled.push("QRESYNC");
                }
                _ => {}
            }
        }
        let mut line = String::from("* ENABLED");
        for e in enabled {
            line.push(' ');
            line.push_str(e);
        }
        line.push_str("\r\n");
        self.out.extend_from_slice(line.as_bytes());
        Done::ok("ENABLE completed")
    }

    async fn select(
        &mut self,
        mailbox: &MailboxArg<'_>,
        parameters: Vec<SelectParameter>,
        read_only: bool,
    ) -> Done {
        if self.selected.take().is_some() && self.wording.qresync {
            self.out
                .extend_from_slice(b"* OK [CLOSED] previous mailbox closed\r\n");
        }
        let name = match mailbox_name(mailbox) {
            Ok(n) => n,
            Err(done) => return done,
        };
        let mut qresync = None;
        for p in parameters {
            match p {
                SelectParameter::CondStore => self.wording.condstore = true,
                SelectParameter::QResync {
                    uid_validity,
                    mod_sequence_value,
                    known_uids,
                    ..
                } => {
                    if !self.wording.qresync {
                        return Done::bad("QRESYNC must be enabled first (ENABLE QRESYNC)");
                    }
                    qresync = Some((uid_validity.get(), mod_sequence_value.get(), known_uids));
                }
            }
        }
        let listing = mail::list_messages(&self.imap.node.router, self.address(), &name).await;
        let (mb, messages) = match listing {
            Ok(Some(found)) => found,
            Ok(None) => return Done::no("[NONEXISTENT] no such mailbox"),
            Err(e) => return Done::unavailable(e),
        };
        let mut view = View::new(&mb, messages, read_only);
        // Claiming \Recent is a replicated write: only when some message is unclaimed. One
        // delivered after the listing reaches the view, and is claimed, as any other arrival.
        if !read_only && mb.recent_from < mb.uid_next {
            let claim = PartitionCommand::ClaimRecent {
                address: self.address().to_string(),
                mailbox: name.clone(),
            };
            match self.write(claim).await {
                Ok(PartitionResponse::Recent { from, to }) => view.claim_recent(from, to),
                Ok(other) => tracing::debug!("claiming \\Recent: {other:?}"),
                Err(e) => tracing::debug!("claiming \\Recent: {e}"),
            }
        }
        let mut text = format!(
            "* FLAGS {FLAGS}\r\n* OK [PERMANENTFLAGS {}] flags\r\n",
            if read_only { "()" } else { PERMANENT_FLAGS }
        );
        text.push_str(&format!("* {} EXISTS\r\n", view.messages.len()));
        text.push_str(&format!("* {} RECENT\r\n", view.recent_count()));
        if let Some(unseen) = view.first_unseen() {
            text.push_str(&format!("* OK [UNSEEN {unseen}] first unseen\r\n"));
        }
        text.push_str(&format!(
            "* OK [UIDVALIDITY {}] UIDs valid\r\n* OK [UIDNEXT {}] predicted next UID\r\n* OK [HIGHESTMODSEQ {}] highest\r\n",
            view.uid_validity.0, view.uid_next.0, view.highest_modseq.0
        ));
        self.out.extend_from_slice(text.as_bytes());
        if let Some((validity, since, known)) = qresync {
            if validity == view.uid_validity.0 {
                let query = Query::Vanished {
                    address: self.address().to_string(),
                    mailbox: name.clone(),
                    since: ModSeq(since),
                };
                let vanished = match self.read(query).await {
                    Ok(QueryResult::Vanished(Some(v))) => v,
                    Ok(_) => Vanished::Exactly(Vec::new()),
                    Err(e) => return Done::unavailable(e),
                };
                if let Some(set) = view.vanished_earlier(&vanished, known.as_ref()) {
                    let line = format!("* VANISHED (EARLIER) {set}\r\n");
                    self.out.extend_from_slice(line.as_bytes());
                }
                for (i, m) in view.messages.iter().enumerate() {
                    if m.modseq.0 > since {
                        let line = format!(
                            "* {} FETCH (UID {} FLAGS {} MODSEQ ({}))\r\n",
                            i + 1,
                            m.uid.0,
                            flag_list(&m.flags, view.is_recent(m.uid)),
                            m.modseq.0
                        );
                        self.out.extend_from_slice(line.as_bytes());
                    }
                }
            }
        }
        self.selected = Some(view);
        let mode = if read_only { "READ-ONLY" } else { "READ-WRITE" };
        Done::ok(format!(
            "[{mode}] {} completed",
            if read_only { "EXAMINE" } else { "SELECT" }
        ))
    }

    async fn create(&mut self, mailbox: &MailboxArg<'_>) -> Done {
        let raw = match mailbox {
            MailboxArg::Inbox => return Done::no("[ALREADYEXISTS] INBOX always exists"),
            MailboxArg::Other(o) => match std::str::from_utf8(o.as_ref()) {
                Ok(text) => text.to_string(),
                Err(_) => {
                    return Done::no("[CANNOT] mailbox names must be modified UTF-7 or UTF-8")
                }
            },
        };
        // A trailing delimiter only says the name will have children (RFC 3501 §6.3.3).
        let trimmed = raw.strip_suffix(DELIMITER).unwrap_or(&raw);
        let name = match normalize_mailbox_name(trimmed) {
            Some(n) if n != "INBOX" => n,
            Some(_) => return Done::no("[ALREADYEXISTS] INBOX always exists"),
            None => return Done::no("[CANNOT] invalid mailbox name"),
        };
        // Superiors are created as needed.
        let mut prefix = String::new();
        for (i, part) in name.split(DELIMITER).enumerate() {
            if i > 0 {
                prefix.push(DELIMITER);
            }
            prefix.push_str(part);
            let last = prefix.len() == name.len();
            let cmd = PartitionCommand::CreateMailbox {
                address: self.address().to_string(),
                name: prefix.clone(),
                now: mail::now(),
            };
            match self.write(cmd).await {
                Ok(PartitionResponse::Done) => {}
                Ok(PartitionResponse::Refused(MailError::MailboxExists)) if !last => {}
                Ok(PartitionResponse::Refused(e)) => return mail_error(&e),
                Ok(other) => return Done::unavailable(format!("{other:?}")),
                Err(e) => return Done::unavailable(e),
            }
        }
        Done::ok("CREATE completed")
    }

    async fn delete(&mut self, mailbox: &MailboxArg<'_>) -> Done {
        let name = match mailbox_name(mailbox) {
            Ok(n) => n,
            Err(done) => return done,
        };
        if name == "INBOX" {
            return Done::no("[CANNOT] INBOX cannot be deleted");
        }
        let cmd = PartitionCommand::DeleteMailbox {
            address: self.address().to_string(),
            name,
        };
        self.simple_write(cmd, "DELETE completed").await
    }

    async fn simple_write(&self, cmd: PartitionCommand, ok: &str) -> Done {
        match self.write(cmd).await {
            Ok(PartitionResponse::Done) => Done::ok(ok),
            Ok(PartitionResponse::Refused(e)) => mail_error(&e),
            Ok(other) => Done::unavailable(format!("{other:?}")),
            Err(e) => Done::unavailable(e),
        }
    }

    async fn rename(&mut self, from: &MailboxArg<'_>, to: &MailboxArg<'_>) -> Done {
        let (from, to) = match (mailbox_name(from), mailbox_name(to)) {
            (Ok(f), Ok(t)) => (f, t),
            (Err(done), _) | (_, Err(done)) => return done,
        };
        let cmd = PartitionCommand::RenameMailbox {
            address: self.address().to_string(),
            from,
            to,
            now: mail::now(),
        };
        self.simple_write(cmd, "RENAME completed").await
    }

    async fn subscribe(&mut self, mailbox: &MailboxArg<'_>, subscribed: bool) -> Done {
        let name = match mailbox_name(mailbox) {
            Ok(n) => n,
            Err(done) => return done,
        };
        let cmd = PartitionCommand::Subscribe {
            address: self.address().to_string(),
            name,
            subscribed,
        };
        let ok = if subscribed {
            "SUBSCRIBE completed"
        } else {
            "UNSUBSCRIBE completed"
        };
        self.simple_write(cmd, ok).await
    }

    async fn list(
        &mut self,
        reference: &MailboxArg<'_>,
        pattern: &ListMailbox<'_>,
        subscribed_only: bool,
    ) -> Done {
        let command = if subscribed_only { "LSUB" } else { "LIST" };
        let reference = match reference {
            MailboxArg::Inbox => "INBOX".to_string(),
            MailboxArg::Other(o) => String::from_utf8_lossy(o.as_ref()).into_owned(),
        };
        let pattern = match pattern {
            ListMailbox::Token(t) => String::from_utf8_lossy(t.as_ref()).into_owned(),
            ListMailbox::String(s) => String::from_utf8_lossy(s.as_ref()).into_owned(),
        };
        if pattern.len() + reference.len() > PATTERN_BYTES_MAX {
            return Done::bad("pattern too long");
        }
        if pattern.is_empty() {
            // The hierarchy delimiter and root (RFC 3501 §6.3.8).
            let line = format!("* {command} (\\Noselect) \"/\" \"\"\r\n");
            self.out.extend_from_slice(line.as_bytes());
            return Done::ok(format!("{command} completed"));
        }
        let full = if pattern.starts_with(DELIMITER) || reference.is_empty() {
            pattern
        } else if reference.ends_with(DELIMITER) {
            format!("{reference}{pattern}")
        } else {
            format!("{reference}{DELIMITER}{pattern}")
        };
        let mailboxes = match self.mailboxes().await {
            Ok(m) => m,
            Err(e) => return Done::unavailable(e),
        };
        // Every name with its attributes; superiors that do not exist are \Noselect.
        let mut names: BTreeMap<String, (Vec<String>, bool)> = BTreeMap::new();
        let existing: BTreeSet<&str> = mailboxes.iter().map(|m| m.name.as_str()).collect();
        for mb in &mailboxes {
            let mut attrs = Vec::new();
            if let Some(su) = &mb.special_use {
                attrs.push(su.clone());
            }
            names.insert(mb.name.clone(), (attrs, mb.subscribed));
            let mut parent = mb.name.as_str();
            while let Some((up, _)) = parent.rsplit_once(DELIMITER) {
                if !existing.contains(up) {
                    names
                        .entry(up.to_string())
                        .or_insert((vec!["\\Noselect".into()], false));
                }
                parent = up;
            }
        }
        let with_children: BTreeSet<String> = names
            .keys()
            .filter_map(|n| n.rsplit_once(DELIMITER).map(|(up, _)| up.to_string()))
            .collect();
        for (name, (attrs, subscribed)) in &names {
            if subscribed_only && !subscribed {
                continue;
            }
            if !list_match(&full, name) {
                continue;
            }
            let mut all = attrs.clone();
            all.push(if with_children.contains(name) {
                "\\HasChildren".into()
            } else {
                "\\HasNoChildren".into()
            });
            let line = format!("* {command} ({}) \"/\" ", all.join(" "));
            self.out.extend_from_slice(line.as_bytes());
            string(&mut self.out, name);
            self.out.extend_from_slice(b"\r\n");
        }
        Done::ok(format!("{command} completed"))
    }

    async fn status(&mut self, mailbox: &MailboxArg<'_>, items: &[StatusDataItemName]) -> Done {
        let name = match mailbox_name(mailbox) {
            Ok(n) => n,
            Err(done) => return done,
        };
        let listing = mail::list_messages(&self.imap.node.router, self.address(), &name).await;
        let (mb, messages) = match listing {
            Ok(Some(found)) => found,
            Ok(None) => return Done::no("[NONEXISTENT] no such mailbox"),
            Err(e) => return Done::unavailable(e),
        };
        let mut parts = Vec::new();
        for item in items {
            let part = match item {
                StatusDataItemName::Messages => format!("MESSAGES {}", messages.len()),
                StatusDataItemName::Recent => {
                    let recent = messages
                        .iter()
                        .filter(|(u, _)| *u >= mb.recent_from)
                        .count();
                    format!("RECENT {recent}")
                }
                StatusDataItemName::UidNext => format!("UIDNEXT {}", mb.uid_next.0),
                StatusDataItemName::UidValidity => format!("UIDVALIDITY {}", mb.uid_validity.0),
                StatusDataItemName::Unseen => {
                    let unseen = messages
                        .iter()
                        .filter(|(_, r)| !r.flags.contains("\\Seen"))
                        .count();
                    format!("UNSEEN {unseen}")
                }
                StatusDataItemName::Deleted => {
                    let deleted = messages
                        .iter()
                        .filter(|(_, r)| r.flags.contains("\\Deleted"))
                        .count();
                    format!("DELETED {deleted}")
                }
                StatusDataItemName::Size => format!("SIZE {}", mb.bytes),
                StatusDataItemName::HighestModSeq => {
                    self.wording.condstore = true;
                    format!("HIGHESTMODSEQ {}", mb.highest_modseq.0)
                }
                StatusDataItemName::DeletedStorage => {
                    let bytes: u64 = messages
                        .iter()
                        .filter(|(_, r)| r.flags.contains("\\Deleted"))
                        .map(|(_, r)| r.size)
                        .sum();
                    format!("DELETED-STORAGE {bytes}")
                }
            };
            parts.push(part);
        }
        self.out.extend_from_slice(b"* STATUS ");
        string(&mut self.out, &mb.name);
        self.out
            .extend_from_slice(format!(" ({})\r\n", parts.join(" ")).as_bytes());
        Done::ok("STATUS completed")
    }

    /// QUOTAROOT (when a mailbox is named) and QUOTA for the account's one quota root "".
    async fn quota(&mut self, mailbox: Option<&str>) -> Done {
        let account = match mail::lookup(&self.imap.node.router, self.address()).await {
            Ok(Lookup::Account(a)) => a,
            Ok(_) => return Done::no("[NONEXISTENT] no such account"),
            Err(e) => return Done::unavailable(e),
        };
        if let Some(name) = mailbox {
            self.out.extend_from_slice(b"* QUOTAROOT ");
            string(&mut self.out, name);
            self.out.extend_from_slice(b" \"\"\r\n");
        }
        let mut resources = Vec::new();
        if account.quota.bytes > 0 {
            resources.push(format!(
                "STORAGE {} {}",
                account.usage.bytes.div_ceil(1024),
                account.quota.bytes / 1024
            ));
        }
        if account.quota.messages > 0 {
            resources.push(format!(
                "MESSAGE {} {}",
                account.usage.messages, account.quota.messages
            ));
        }
        let line = format!("* QUOTA \"\" ({})\r\n", resources.join(" "));
        self.out.extend_from_slice(line.as_bytes());
        Done::ok(if mailbox.is_some() {
            "GETQUOTAROOT completed"
        } else {
            "GETQUOTA completed"
        })
    }

    async fn append(
        &mut self,
        mailbox: &MailboxArg<'_>,
        flags: &[imap_codec::imap_types::flag::Flag<'_>],
        date: Option<&imap_codec::imap_types::datetime::DateTime>,
        message: &imap_codec::imap_types::extensions::binary::LiteralOrLiteral8<'_>,
    ) -> Done {
        use imap_codec::imap_types::extensions::binary::LiteralOrLiteral8;
        let name = match mailbox_name(mailbox) {
            Ok(n) => n,
            Err(done) => return done,
        };
        let body = match message {
            LiteralOrLiteral8::Literal(l) => l.data().to_vec(),
            LiteralOrLiteral8::Literal8(_) => return Done::no("BINARY is not supported"),
        };
        let limit = self.append_limit();
        if body.len() as u64 > limit {
            return Done::no(format!(
                "[TOOBIG] the message is larger than the limit of {limit} octets"
            ));
        }
        if body.is_empty() {
            return Done::no("an empty message cannot be stored");
        }
        match self
            .imap
            .policy
            .domain_fits(domain_of(self.address()), body.len() as u64)
            .await
        {
            Ok(true) => {}
            Ok(false) => return Done::no("[OVERQUOTA] the domain is over its quota"),
            Err(e) => return Done::unavailable(e),
        }
        let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        let internal_date = date
            .map(|d| d.as_ref().timestamp())
            .unwrap_or_else(mail::now);
        let size = body.len() as u64;
        // Once: a retry through a leader change must not store the message twice.
        let cmd = mail::once(PartitionCommand::Append {
            address: self.address().to_string(),
            mailbox: name,
            body,
            flags,
            internal_date,
        });
        match self.write(cmd).await {
            Ok(PartitionResponse::Appended { uid_validity, uid }) => {
                self.imap.policy.note_stored(self.address(), size);
                Done::ok(format!(
                    "[APPENDUID {} {}] APPEND completed",
                    uid_validity.0, uid.0
                ))
            }
            Ok(PartitionResponse::Refused(MailError::NoSuchMailbox)) => {
                Done::no("[TRYCREATE] no such mailbox")
            }
            Ok(PartitionResponse::Refused(e)) => mail_error(&e),
            Ok(other) => Done::unavailable(format!("{other:?}")),
            Err(e) if e.is_disk_full() => {
                tracing::info!("APPEND refused: {e}");
                Done::no("[UNAVAILABLE] the server's disk is full; try again later")
            }
            Err(e) => Done::unavailable(e),
        }
    }

    /// IDLE (RFC 2177): reports changes as they happen (looking every `idle_poll`) until the
    /// client sends DONE.
    async fn idle(&mut self) -> std::io::Result<Done> {
        self.out.extend_from_slice(b"+ idling\r\n");
        self.flush().await?;
        let deadline = tokio::time::Instant::now() + self.imap.config.idle_timeout;
        let mut tick = tokio::time::interval(self.imap.config.idle_poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut line = Vec::new();
        loop {
            tokio::select! {
                read = continue_line(&mut self.io, LINE_BYTES_MAX, &mut line) => {
                    return Ok(match read? {
                        Line::Complete if trim_eol(&line).eq_ignore_ascii_case(b"DONE") => {
                            if self.selected.is_some() {
                                if let Flow::Close = self.catch_up(true).await {
                                    return Ok(Done { flow: Flow::Close, ..Done::ok("") });
                                }
                            }
                            Done::ok("IDLE terminated")
                        }
                        Line::Eof => Done { flow: Flow::Close, ..Done::ok("IDLE ended") },
                        _ => Done::bad("expected DONE"),
                    });
                }
                _ = tick.tick() => {
                    if tokio::time::Instant::now() > deadline {
                        self.out.extend_from_slice(b"* BYE autologout: idle for too long\r\n");
                        return Ok(Done { flow: Flow::Close, ..Done::ok("IDLE ended") });
                    }
                    if self.selected.is_some() {
                        if let Flow::Close = self.catch_up(true).await {
                            return Ok(Done { flow: Flow::Close, ..Done::ok("IDLE ended") });
                        }
                        if !self.out.is_empty() {
                            self.flush().await?;
                        }
                    }
                }
            }
        }
    }

    /// Brings the selected mailbox's view up to date and writes what changed. `Close` when
    /// the mailbox no longer exists (the session cannot go on with it).
    pub(super) async fn catch_up(&mut self, allow_expunge: bool) -> Flow {
        let Some(view) = &self.selected else {
            return Flow::Continue;
        };
        let query = Query::Changes {
            address: self.address().to_string(),
            mailbox: view.name.clone(),
            since: view.highest_modseq,
        };
        let changes = match self.read(query).await {
            Ok(QueryResult::Changes(c)) => c,
            Ok(other) => {
                tracing::debug!("IMAP catch-up: unexpected {other:?}");
                return Flow::Continue;
            }
            Err(e) => {
                tracing::debug!("IMAP catch-up: {e}");
                return Flow::Continue;
            }
        };
        let Some(changes) = changes.filter(|c| c.mailbox.uid_validity == view.uid_validity) else {
            self.out
                .extend_from_slice(b"* BYE the selected mailbox was deleted or recreated\r\n");
            self.selected = None;
            return Flow::Close;
        };
        let (changed, vanished) = if changes.complete {
            (changes.changed, changes.vanished)
        } else {
            let listing =
                mail::list_messages(&self.imap.node.router, self.address(), &view.name).await;
            match listing {
                Ok(Some((_, all))) => view.diff_listing(all),
                _ => return Flow::Continue,
            }
        };
        let wording = self.wording;
        let Some(view) = self.selected.as_mut() else {
            return Flow::Continue;
        };
        let added = view.apply(
            &changes.mailbox,
            changed,
            &vanished,
            allow_expunge,
            wording,
            &mut self.out,
        );
        if added > 0 && !view.read_only {
            let claim = PartitionCommand::ClaimRecent {
                address: self.address().to_string(),
                mailbox: changes.mailbox.name.clone(),
            };
            if let Ok(PartitionResponse::Recent { from, to }) = self.write(claim).await {
                if let Some(view) = self.selected.as_mut() {
                    view.claim_recent(from, to);
                }
            }
        }
        if added > 0 {
            if let Some(view) = &self.selected {
                let line = format!("* {} RECENT\r\n", view.recent_count());
                self.out.extend_from_slice(line.as_bytes());
            }
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: LIST patterns follow RFC 3501 §6.3.8 (`*` crosses levels, `%` does not, INBOX is
    // case-insensitive) and a pathological pattern stays cheap.
    #[test]
    fn list_patterns() {
        assert!(list_match("*", "Work/2026"));
        assert!(list_match("%", "Work"));
        assert!(!list_match("%", "Work/2026"));
        assert!(list_match("Work/%", "Work/2026"));
        assert!(list_match("inbox", "INBOX"));
        assert!(list_match("InBox*", "INBOX"));
        assert!(!list_match("Sent", "Sent Items"));
        assert!(list_match("S*t", "Sent"));
        let evil = "*a".repeat(300);
        assert!(!list_match(&evil, &"a".repeat(200)));
    }
}
