//! The workload: clients delivering uniquely tagged messages over SMTP to random users, each
//! connection to a random node (as DNS round robin would pick), every attempt recorded.

use std::sync::Arc;
use std::time::Duration;

use chaos::Outcome;

use crate::cluster::{Endpoints, Listeners};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// How long one SMTP step may take before the attempt counts as of unknown outcome (or as
/// failed, before the message was sent).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts of one message: a real MTA retries a temporary failure with the same bytes.
const ATTEMPTS: usize = 3;

/// One attempt to deliver one message, as the history records it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attempt {
    pub client: usize,
    pub op: u64,
    pub tag: String,
    pub node: u64,
    /// Milliseconds since the run started.
    pub invoked_ms: u64,
    pub completed_ms: u64,
    /// Each recipient's outcome.
    pub outcomes: Vec<(String, Outcome)>,
    /// The last reply or error, for the reader of the history.
    pub detail: String,
}

pub struct Workload {
    pub users: Vec<String>,
    pub endpoints: Endpoints,
    pub started: Instant,
    pub until: Instant,
    pub seed: u64,
}

pub fn tag_of(seed: u64, client: usize, op: u64) -> String {
    format!("chaos-s{seed}-c{client}-o{op}")
}

/// The message for `tag`: its Subject is the tag, which the checker reads back.
pub fn message(tag: &str) -> String {
    format!(
        "From: <chaos@sender.test>\r\nSubject: {tag}\r\nMessage-ID: <{tag}@chaos.test>\r\n\r\nbody of {tag}\r\n"
    )
}

impl Workload {
    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Runs client `client` until the end of the workload; its attempts.
    pub async fn client(self: Arc<Self>, client: usize) -> Vec<Attempt> {
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_mul(1_000_003) ^ client as u64);
        let mut attempts = Vec::new();
        let mut op = 0u64;
        while Instant::now() < self.until {
            op += 1;
            let tag = tag_of(self.seed, client, op);
            let count = rng.gen_range(1..=2.min(self.users.len()));
            let mut recipients: Vec<String> = Vec::new();
            while recipients.len() < count {
                let u = self.users[rng.gen_range(0..self.users.len())].clone();
                if !recipients.contains(&u) {
                    recipients.push(u);
                }
            }
            for _ in 0..ATTEMPTS {
                let Some((node, listeners)) = pick(&self.endpoints, &mut rng) else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let addr = listeners.smtp;
                let invoked_ms = self.ms();
                let (outcomes, detail) = deliver(&addr, &recipients, &message(&tag)).await;
                // Unknown outcomes are retried with the same bytes, and a node that could not
                // be reached is replaced by another, as a real MTA would.
                let retry =
                    outcomes.is_empty() || outcomes.iter().any(|(_, o)| *o == Outcome::Unknown);
                attempts.push(Attempt {
                    client,
                    op,
                    tag: tag.clone(),
                    node,
                    invoked_ms,
                    completed_ms: self.ms(),
                    outcomes,
                    detail,
                });
                if !retry || Instant::now() >= self.until {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        attempts
    }
}

/// A random member and its listeners, as DNS round robin would pick (none while every node
/// is out of the cluster).
pub fn pick(endpoints: &Endpoints, rng: &mut StdRng) -> Option<(u64, Listeners)> {
    let map = endpoints.lock().expect("listeners lock");
    let ids: Vec<u64> = map.keys().copied().collect();
    if ids.is_empty() {
        return None;
    }
    let id = ids[rng.gen_range(0..ids.len())];
    Some((id, map[&id].clone()))
}

/// One SMTP transaction: each recipient's outcome and the last reply or error.
pub async fn deliver(
    addr: &str,
    recipients: &[String],
    body: &str,
) -> (Vec<(String, Outcome)>, String) {
    let mut accepted: Vec<String> = Vec::new();
    let mut outcomes: Vec<(String, Outcome)> = Vec::new();
    let result = transaction(addr, recipients, body, &mut accepted, &mut outcomes).await;
    let (data_outcome, detail) = match result {
        Ok(Sent::Stored(reply)) => (Outcome::Ok, reply),
        Ok(Sent::Refused(reply)) => (Outcome::Fail, reply),
        // Nothing was sent: the message cannot have been stored.
        Err(Step::BeforeData(e)) => (Outcome::Fail, e),
        // The message was sent but the answer is unknown (or a 4xx, which may follow a
        // commit of unknown outcome): it may or may not be stored.
        Err(Step::AfterData(e)) => (Outcome::Unknown, e),
    };
    for r in accepted {
        outcomes.push((r, data_outcome));
    }
    (outcomes, detail)
}

enum Sent {
    Stored(String),
    Refused(String),
}

enum Step {
    BeforeData(String),
    AfterData(String),
}

async fn transaction(
    addr: &str,
    recipients: &[String],
    body: &str,
    accepted: &mut Vec<String>,
    refused: &mut Vec<(String, Outcome)>,
) -> Result<Sent, Step> {
    let before = Step::BeforeData;
    let tcp = timeout(STEP_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| before(format!("connect to {addr}: timeout")))?
        .map_err(|e| before(format!("connect to {addr}: {e}")))?;
    let mut io = BufReader::new(tcp);
    expect(&mut io, None, 2).await.map_err(before)?;
    expect(&mut io, Some("EHLO chaos.test\r\n"), 2)
        .await
        .map_err(before)?;
    expect(&mut io, Some("MAIL FROM:<chaos@sender.test>\r\n"), 2)
        .await
        .map_err(before)?;
    for r in recipients {
        match expect(&mut io, Some(&format!("RCPT TO:<{r}>\r\n")), 2).await {
            Ok(_) => accepted.push(r.clone()),
            Err(e) if e.starts_with("reply ") => refused.push((r.clone(), Outcome::Fail)),
            Err(e) => return Err(before(e)),
        }
    }
    if accepted.is_empty() {
        return Ok(Sent::Refused("every recipient refused".into()));
    }
    expect(&mut io, Some("DATA\r\n"), 3).await.map_err(before)?;
    let mut data = body.to_string();
    data.push_str(".\r\n");
    match expect(&mut io, Some(&data), 2).await {
        Ok(reply) => {
            let _ = timeout(Duration::from_secs(1), io.get_mut().write_all(b"QUIT\r\n")).await;
            Ok(Sent::Stored(reply))
        }
        Err(e) if e.starts_with("reply 5") => Ok(Sent::Refused(e)),
        Err(e) => Err(Step::AfterData(e)),
    }
}

/// One line (with its line end) within the step timeout; an error text on timeout, I/O
/// failure or end of stream.
pub async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(io: &mut R) -> Result<String, String> {
    let mut l = String::new();
    let n = timeout(STEP_TIMEOUT, io.read_line(&mut l))
        .await
        .map_err(|_| "reply timeout".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    if n == 0 {
        return Err("connection closed".into());
    }
    Ok(l)
}

/// Sends `line` (if any) and reads a whole reply; `Ok` when its class is `class`, else
/// `Err("reply ...")` for another class and another text for I/O failures and timeouts.
async fn expect(
    io: &mut BufReader<TcpStream>,
    line: Option<&str>,
    class: u8,
) -> Result<String, String> {
    if let Some(line) = line {
        timeout(STEP_TIMEOUT, io.get_mut().write_all(line.as_bytes()))
            .await
            .map_err(|_| "write timeout".to_string())?
            .map_err(|e| format!("write: {e}"))?;
    }
    let mut reply = String::new();
    loop {
        let l = read_line(io).await?;
        reply.push_str(&l);
        if l.len() < 4 || l.as_bytes()[3] != b'-' {
            break;
        }
    }
    let reply = reply.trim_end().to_string();
    if reply.as_bytes().first() == Some(&(b'0' + class)) {
        Ok(reply)
    } else {
        Err(format!("reply {reply}"))
    }
}
