//! The mailbox workload: IMAP clients that APPEND, flag, expunge and MOVE uniquely tagged
//! messages in mailboxes they share, and POP3 clients that take delivered messages with RETR,
//! DELE and QUIT. Each connection goes to a random node over TLS (trusting that node's own
//! certificate) and every operation is recorded as acknowledged, failed or unknown.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chaos::{Action, MailboxOp, Outcome};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use crate::cluster::Endpoints;
use crate::workload::{deliver, message, pick, read_line};

/// How long one protocol step may take before the operation counts as of unknown outcome.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// The mailbox IMAP clients MOVE messages to.
pub const ARCHIVE: &str = "Archive";
pub const FLAG: &str = "\\Flagged";

/// One mailbox operation as the history records it.
#[derive(Clone, Debug, Serialize)]
pub struct BoxAttempt {
    pub client: String,
    pub node: u64,
    pub invoked_ms: u64,
    pub completed_ms: u64,
    pub op: MailboxOp,
    pub detail: String,
}

pub struct Boxes {
    pub imap_users: Vec<String>,
    pub pop_users: Vec<String>,
    pub password: String,
    pub endpoints: Endpoints,
    pub started: Instant,
    pub until: Instant,
    pub seed: u64,
}

type Tls = BufReader<tokio_rustls::client::TlsStream<TcpStream>>;

/// A TLS connection to `addr` that trusts only the certificate in `cert` (the node's own).
async fn connect(addr: &str, cert: &Path) -> Result<Tls, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    for c in certs {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("literal name");
    let tcp = timeout(STEP_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect to {addr}: timeout"))?
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let tls = timeout(
        STEP_TIMEOUT,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| format!("TLS with {addr}: timeout"))?
    .map_err(|e| format!("TLS with {addr}: {e}"))?;
    Ok(BufReader::new(tls))
}

async fn write(io: &mut Tls, bytes: &[u8]) -> Result<(), String> {
    timeout(STEP_TIMEOUT, async {
        io.get_mut().write_all(bytes).await?;
        io.get_mut().flush().await
    })
    .await
    .map_err(|_| "write timeout".to_string())?
    .map_err(|e| format!("write: {e}"))
}

async fn line(io: &mut Tls) -> Result<String, String> {
    let l = read_line(io).await?;
    Ok(l.trim_end_matches(['\r', '\n']).to_string())
}

/// An IMAP session: commands with tags, answers read up to the tagged status.
struct Imap {
    io: Tls,
    next: u32,
}

/// A tagged answer: OK, or the NO/BAD line.
enum Answer {
    Ok(Vec<String>),
    Refused(String),
}

impl Imap {
    async fn open(addr: &str, cert: &Path, user: &str, password: &str) -> Result<Imap, String> {
        let mut io = connect(addr, cert).await?;
        let greeting = line(&mut io).await?;
        if !greeting.starts_with("* OK") {
            return Err(format!("greeting {greeting}"));
        }
        let mut imap = Imap { io, next: 0 };
        for cmd in [
            format!("LOGIN \"{user}\" \"{password}\""),
            "SELECT INBOX".into(),
        ] {
            if let Answer::Refused(l) = imap.command(&cmd, None).await? {
                return Err(l);
            }
        }
        Ok(imap)
    }

    /// Sends `text` (and a LITERAL+ literal after it); the untagged lines and the outcome.
    async fn command(&mut self, text: &str, literal: Option<&[u8]>) -> Result<Answer, String> {
        self.next += 1;
        let tag = format!("c{}", self.next);
        let mut bytes = format!("{tag} {text}\r\n").into_bytes();
        if let Some(l) = literal {
            bytes.extend_from_slice(l);
            bytes.extend_from_slice(b"\r\n");
        }
        write(&mut self.io, &bytes).await?;
        let mut untagged = Vec::new();
        loop {
            let mut l = line(&mut self.io).await?;
            // A literal in an answer (none of these commands fetch bodies, but be exact).
            while let Some(n) = literal_len(&l) {
                let mut buf = vec![0u8; n];
                timeout(STEP_TIMEOUT, self.io.read_exact(&mut buf))
                    .await
                    .map_err(|_| "reply timeout".to_string())?
                    .map_err(|e| format!("read: {e}"))?;
                l.push_str(&String::from_utf8_lossy(&buf));
                l.push_str(&line(&mut self.io).await?);
            }
            if let Some(rest) = l.strip_prefix(&format!("{tag} ")) {
                return Ok(if rest.starts_with("OK") {
                    Answer::Ok(untagged)
                } else {
                    Answer::Refused(l)
                });
            }
            untagged.push(l);
        }
    }

    /// The UID of the message tagged `tag` in the selected mailbox, if there is one.
    async fn find(&mut self, tag: &str) -> Result<Option<u32>, String> {
        match self
            .command(&format!("UID SEARCH SUBJECT \"{tag}\""), None)
            .await?
        {
            Answer::Ok(lines) => Ok(lines
                .iter()
                .filter_map(|l| l.strip_prefix("* SEARCH"))
                .flat_map(|l| l.split_whitespace().map(str::parse::<u32>))
                .find_map(Result::ok)),
            Answer::Refused(_) => Ok(None),
        }
    }
}

fn literal_len(line: &str) -> Option<usize> {
    let open = line.rfind('{')?;
    line[open + 1..]
        .strip_suffix('}')
        .and_then(|n| n.trim_end_matches('+').parse().ok())
}

/// A NO answers the outcome of a write only when it names a refusal made before anything
/// was changed; otherwise (a timeout inside the cluster, say) the write may have happened.
fn refused_outcome(line: &str) -> Outcome {
    let definite = [
        "[OVERQUOTA]",
        "[TOOBIG]",
        "[TRYCREATE]",
        "[NONEXISTENT]",
        "[CANNOT]",
        "[LIMIT]",
    ];
    if line.split_whitespace().nth(1) == Some("BAD") || definite.iter().any(|c| line.contains(c)) {
        Outcome::Fail
    } else {
        Outcome::Unknown
    }
}

impl Boxes {
    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn record(
        &self,
        out: &mut Vec<BoxAttempt>,
        (client, node, invoked_ms): (&str, u64, u64),
        user: &str,
        tag: &str,
        action: Action,
        (outcome, detail): (Outcome, String),
    ) {
        out.push(BoxAttempt {
            client: client.to_string(),
            node,
            invoked_ms,
            completed_ms: self.ms(),
            op: MailboxOp {
                user: user.to_string(),
                tag: tag.to_string(),
                action,
                outcome,
            },
            detail,
        });
    }

    /// IMAP client `client`: sessions of a few operations each on a random node, on one of
    /// the shared users; messages it appended are the ones it flags, expunges and moves.
    pub async fn imap_client(self: Arc<Self>, client: usize) -> Vec<BoxAttempt> {
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_mul(7_919) ^ (client as u64 + 1));
        let name = format!("imap{client}");
        let mut out = Vec::new();
        // Appended (acknowledged) and still in INBOX, by user.
        let mut mine: Vec<(String, String)> = Vec::new();
        let mut op = 0u64;
        let mut session: Option<(u64, String, Imap, u32)> = None;
        while Instant::now() < self.until {
            if session.as_ref().is_none_or(|s| s.3 == 0) {
                let user = self.imap_users[rng.gen_range(0..self.imap_users.len())].clone();
                let Some((node, l)) = pick(&self.endpoints, &mut rng) else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let Some(addr) = l.imaps else { break };
                match Imap::open(&addr, &l.cert, &user, &self.password).await {
                    Ok(mut imap) => {
                        // The MOVE target; "already exists" is fine.
                        let _ = imap.command(&format!("CREATE {ARCHIVE}"), None).await;
                        session = Some((node, user, imap, rng.gen_range(5..30)));
                    }
                    Err(_) => {
                        session = None;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            let (node, user, imap, left) = session.as_mut().expect("a session");
            *left -= 1;
            let at = (name.as_str(), *node, self.ms());
            let candidates: Vec<usize> = (0..mine.len()).filter(|&i| mine[i].0 == *user).collect();
            let result = if candidates.is_empty() || rng.gen_bool(0.4) {
                op += 1;
                let tag = format!("chaos-s{}-i{client}-o{op}.", self.seed);
                let body = message(&tag);
                let cmd = format!("APPEND INBOX {{{}+}}", body.len());
                let r = imap.command(&cmd, Some(body.as_bytes())).await;
                let outcome = match &r {
                    Ok(Answer::Ok(_)) => (Outcome::Ok, "OK".to_string()),
                    Ok(Answer::Refused(l)) => (refused_outcome(l), l.clone()),
                    Err(e) => (Outcome::Unknown, e.clone()),
                };
                if outcome.0 == Outcome::Ok {
                    mine.push((user.clone(), tag.clone()));
                }
                self.record(&mut out, at, user, &tag, Action::Append, outcome);
                r.map(|_| ())
            } else {
                let i = candidates[rng.gen_range(0..candidates.len())];
                let tag = mine[i].1.clone();
                let r = async {
                    let Some(uid) = imap.find(&tag).await? else {
                        return Ok(None);
                    };
                    let choice = rng.gen_range(0..3);
                    let (action, first, second) = match choice {
                        0 => (
                            Action::Flag(FLAG.into()),
                            format!("UID STORE {uid} +FLAGS.SILENT ({FLAG})"),
                            None,
                        ),
                        1 => (
                            Action::Expunge,
                            format!("UID STORE {uid} +FLAGS.SILENT (\\Deleted)"),
                            Some(format!("UID EXPUNGE {uid}")),
                        ),
                        _ => (
                            Action::Move(ARCHIVE.into()),
                            format!("UID MOVE {uid} {ARCHIVE}"),
                            None,
                        ),
                    };
                    let at = (at.0, at.1, self.ms());
                    // The expunge's \Deleted is only a preparation: refused, nothing happened.
                    let last = match second {
                        Some(second) => match imap.command(&first, None).await? {
                            Answer::Ok(_) => imap.command(&second, None).await,
                            Answer::Refused(_) => return Ok(None),
                        },
                        None => imap.command(&first, None).await,
                    };
                    Ok::<_, String>(Some((at, action, last)))
                }
                .await;
                match r {
                    Ok(None) => Ok(()),
                    Ok(Some((at, action, last))) => {
                        let outcome = match &last {
                            Ok(Answer::Ok(_)) => (Outcome::Ok, "OK".to_string()),
                            Ok(Answer::Refused(l)) => (refused_outcome(l), l.clone()),
                            Err(e) => (Outcome::Unknown, e.clone()),
                        };
                        if !matches!(action, Action::Flag(_)) && outcome.0 != Outcome::Fail {
                            mine.remove(i);
                        }
                        self.record(&mut out, at, user, &tag, action, outcome);
                        last.map(|_| ())
                    }
                    Err(e) => Err(e),
                }
            };
            if result.is_err() {
                session = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if let Some((_, _, mut imap, _)) = session {
            let _ = imap.command("LOGOUT", None).await;
        }
        out
    }

    /// POP3 client `client`: delivers tagged messages to its user over SMTP and takes them
    /// away again with RETR, DELE and QUIT, each session on a random node.
    pub async fn pop_client(self: Arc<Self>, client: usize) -> Vec<BoxAttempt> {
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_mul(104_729) ^ (client as u64 + 1));
        let name = format!("pop{client}");
        let user = self.pop_users[client % self.pop_users.len()].clone();
        let mut out = Vec::new();
        let mut op = 0u64;
        while Instant::now() < self.until {
            let Some((node, l)) = pick(&self.endpoints, &mut rng) else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            if rng.gen_bool(0.5) {
                op += 1;
                let tag = format!("chaos-s{}-p{client}-o{op}.", self.seed);
                let at = (name.as_str(), node, self.ms());
                let (outcomes, detail) =
                    deliver(&l.smtp, std::slice::from_ref(&user), &message(&tag)).await;
                let outcome = outcomes.first().map_or(Outcome::Fail, |o| o.1);
                self.record(
                    &mut out,
                    at,
                    &user,
                    &tag,
                    Action::Deliver,
                    (outcome, detail),
                );
                if outcome != Outcome::Ok {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                continue;
            }
            let Some(addr) = l.pop3s else { break };
            let at = (name.as_str(), node, self.ms());
            match self.pop_session(&addr, &l.cert, &user, &mut rng).await {
                Ok(None) => {}
                Ok(Some((tag, outcome))) => {
                    self.record(&mut out, at, &user, &tag, Action::PopDelete, outcome)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        out
    }

    /// One POP3 session that deletes one random message: its tag and the outcome, `None` when
    /// nothing was deleted (empty maildrop, refused login, or a failure before DELE).
    async fn pop_session(
        &self,
        addr: &str,
        cert: &Path,
        user: &str,
        rng: &mut StdRng,
    ) -> Result<Option<(String, (Outcome, String))>, String> {
        let mut io = connect(addr, cert).await?;
        for cmd in [
            None,
            Some(format!("USER {user}")),
            Some(format!("PASS {}", self.password)),
        ] {
            if pop_ask(&mut io, cmd).await?.is_err() {
                return Ok(None);
            }
        }
        let Ok(stat) = pop_ask(&mut io, Some("STAT".into())).await? else {
            return Ok(None);
        };
        let count: usize = stat
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if count == 0 {
            let _ = pop_ask(&mut io, Some("QUIT".into())).await;
            return Ok(None);
        }
        let n = rng.gen_range(1..=count);
        if pop_ask(&mut io, Some(format!("RETR {n}"))).await?.is_err() {
            return Ok(None);
        }
        let mut tag = String::new();
        loop {
            let l = line(&mut io).await?;
            if l == "." {
                break;
            }
            if let Some(s) = l.strip_prefix("Subject: ") {
                tag = s.trim().to_string();
            }
        }
        match pop_ask(&mut io, Some(format!("DELE {n}"))).await {
            Ok(Ok(_)) => {}
            _ => return Ok(None),
        }
        // The deletion happens at QUIT: only its +OK acknowledges it.
        let outcome = match pop_ask(&mut io, Some("QUIT".into())).await {
            Ok(Ok(l)) => (Outcome::Ok, l),
            Ok(Err(l)) => (Outcome::Unknown, l),
            Err(e) => (Outcome::Unknown, e),
        };
        Ok(Some((tag, outcome)))
    }
}

/// Sends a POP3 command (none: reads the greeting); `Ok(Ok)` for +OK, `Ok(Err)` for -ERR.
async fn pop_ask(io: &mut Tls, cmd: Option<String>) -> Result<Result<String, String>, String> {
    if let Some(c) = cmd {
        write(io, format!("{c}\r\n").as_bytes()).await?;
    }
    let l = line(io).await?;
    Ok(if l.starts_with("+OK") { Ok(l) } else { Err(l) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_lengths_and_refusals_are_read_exactly() {
        // Goal: answers with literals are followed; only definite refusals count as failed.
        assert_eq!(literal_len("* 1 FETCH (BODY[] {42}"), Some(42));
        assert_eq!(literal_len("c1 APPEND INBOX {7+}"), Some(7));
        assert_eq!(literal_len("* SEARCH 1 2"), None);
        assert_eq!(
            refused_outcome("c3 NO [OVERQUOTA] over quota"),
            Outcome::Fail
        );
        assert_eq!(refused_outcome("c3 BAD syntax"), Outcome::Fail);
        assert_eq!(
            refused_outcome("c3 NO [UNAVAILABLE] try again"),
            Outcome::Unknown
        );
    }
}
