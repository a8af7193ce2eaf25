//! The outbound queue of a partition: mail for other domains, accepted at submission and kept
//! here, replicated like any mailbox, until every recipient is delivered or has failed and the
//! sender has been told.
//!
//! An entry lives under its id; the entries waiting for an attempt are also indexed by the
//! time of their next attempt (held entries are not), so a delivery worker finds what is due
//! without reading the whole queue. The message bytes are a body like any other, shared by
//! reference count with mailboxes that hold the same bytes.
//!
//! Apply stays deterministic: the worker stamps times and the outcome of each attempt.

use serde::{Deserialize, Serialize};

use super::{key, refused, MailError, Outcome, PartitionResponse, Txn, MESSAGE_BYTES_MAX};
use crate::types::{is_valid_address, BodyHash, UnixSeconds};
use crate::StorageError;

/// A queue entry's id; the entry lives in the partition the id hashes to.
pub type QueueId = [u8; 16];

/// Most recipients one entry carries (a submission with more becomes several entries), so an
/// entry stays well under the storage value limit.
pub const QUEUE_RECIPIENTS_MAX: usize = 50;
/// Longest remote reply kept per recipient (and as the entry's last error).
pub const QUEUE_REPLY_BYTES_MAX: usize = 400;

const QUEUE_ENTRY: u8 = b'U';
const QUEUE_DUE: u8 = b'V';

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecipientState {
    /// Not delivered yet; will be tried again.
    Pending,
    /// The remote server took responsibility (2xx after DATA).
    Delivered,
    /// Refused for good (5xx), or given up on when the entry expired.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRecipient {
    pub address: String,
    pub state: RecipientState,
    /// The last reply about this recipient (the remote server's, or why none was had).
    pub reply: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub id: QueueId,
    /// Envelope sender; empty for a bounce (which is never bounced itself).
    pub sender: String,
    pub recipients: Vec<QueueRecipient>,
    pub body: BodyHash,
    pub size: u64,
    pub created: UnixSeconds,
    pub next_attempt: UnixSeconds,
    pub attempts: u32,
    /// Held by the operator: no attempts until released.
    pub held: bool,
    pub last_error: Option<String>,
}

impl QueueEntry {
    pub fn pending(&self) -> impl Iterator<Item = &QueueRecipient> {
        self.recipients
            .iter()
            .filter(|r| r.state == RecipientState::Pending)
    }

    /// Every recipient is delivered or failed: what is left is telling the sender.
    pub fn is_final(&self) -> bool {
        self.pending().next().is_none()
    }

    pub fn failed(&self) -> impl Iterator<Item = &QueueRecipient> {
        self.recipients
            .iter()
            .filter(|r| r.state == RecipientState::Failed)
    }
}

/// What one attempt found out about one recipient.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptOutcome {
    Delivered(String),
    Failed(String),
    /// Try again later (4xx, no connection, a timeout).
    Deferred(String),
}

/// Operator actions on one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueAction {
    Hold,
    Release,
    /// Due now (at the stamped time), held or not.
    RetryAt(UnixSeconds),
}

fn entry_key(id: &QueueId) -> Vec<u8> {
    key(QUEUE_ENTRY, &[id])
}

fn due_key(at: UnixSeconds, id: &QueueId) -> Vec<u8> {
    key(QUEUE_DUE, &[&super::time_key(at), id])
}

fn truncated(s: &str) -> String {
    if s.len() <= QUEUE_REPLY_BYTES_MAX {
        return s.to_string();
    }
    let mut end = QUEUE_REPLY_BYTES_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Stores a new entry (every recipient pending, due at `next_attempt`). A repeat of the same
/// id changes nothing: a submission retried after a lost reply is queued once.
pub(super) fn enqueue(txn: &mut Txn<'_>, entry: &QueueEntry, body: &[u8]) -> Outcome {
    if txn.get::<QueueEntry>(&entry_key(&entry.id))?.is_some() {
        return Ok(PartitionResponse::Done);
    }
    if body.len() > MESSAGE_BYTES_MAX {
        return refused(MailError::TooLarge);
    }
    if entry.recipients.is_empty() || entry.recipients.len() > QUEUE_RECIPIENTS_MAX {
        return refused(MailError::TooMany);
    }
    let valid = |a: &str| is_valid_address(a);
    if (!entry.sender.is_empty() && !valid(&entry.sender))
        || entry.recipients.iter().any(|r| !valid(&r.address))
    {
        return refused(MailError::InvalidAddress);
    }
    let hash = BodyHash::of(body);
    let mut stored = entry.clone();
    stored.body = hash;
    stored.size = body.len() as u64;
    stored.attempts = 0;
    stored.held = false;
    stored.last_error = None;
    for r in &mut stored.recipients {
        r.state = RecipientState::Pending;
        r.reply = None;
    }
    txn.body_ref(hash, Some(body), stored.size)?;
    txn.put(due_key(stored.next_attempt, &stored.id), &());
    txn.put(entry_key(&stored.id), &stored);
    Ok(PartitionResponse::Done)
}

/// Records an attempt: each named recipient that was still pending takes its outcome; the
/// entry is due again at `next_attempt`. An entry with nothing left to do and nobody to tell
/// (all delivered, or a bounce) is removed. An attempt on an entry already gone (another
/// leader finished it) changes nothing.
pub(super) fn attempted(
    txn: &mut Txn<'_>,
    id: &QueueId,
    outcomes: &[(String, AttemptOutcome)],
    error: Option<&str>,
    next_attempt: UnixSeconds,
) -> Outcome {
    let Some(mut entry) = txn.get::<QueueEntry>(&entry_key(id))? else {
        return refused(MailError::NoSuchEntry);
    };
    for (address, outcome) in outcomes {
        let Some(r) = entry
            .recipients
            .iter_mut()
            .find(|r| r.address == *address && r.state == RecipientState::Pending)
        else {
            continue;
        };
        let (state, reply) = match outcome {
            AttemptOutcome::Delivered(reply) => (RecipientState::Delivered, reply),
            AttemptOutcome::Failed(reply) => (RecipientState::Failed, reply),
            AttemptOutcome::Deferred(reply) => (RecipientState::Pending, reply),
        };
        r.state = state;
        r.reply = Some(truncated(reply));
    }
    entry.attempts = entry.attempts.saturating_add(1);
    entry.last_error = error.map(truncated);
    let nobody_to_tell = entry.sender.is_empty() || entry.failed().next().is_none();
    if entry.is_final() && nobody_to_tell {
        return remove(txn, id);
    }
    reschedule(txn, &mut entry, next_attempt);
    txn.put(entry_key(id), &entry);
    Ok(PartitionResponse::Done)
}

fn reschedule(txn: &mut Txn<'_>, entry: &mut QueueEntry, at: UnixSeconds) {
    if !entry.held {
        txn.del(due_key(entry.next_attempt, &entry.id));
        txn.put(due_key(at, &entry.id), &());
    }
    entry.next_attempt = at;
}

/// Removes an entry (delivered and reported, or deleted by the operator) and its body reference.
pub(super) fn remove(txn: &mut Txn<'_>, id: &QueueId) -> Outcome {
    let k = entry_key(id);
    let Some(entry) = txn.get::<QueueEntry>(&k)? else {
        return refused(MailError::NoSuchEntry);
    };
    if !entry.held {
        txn.del(due_key(entry.next_attempt, id));
    }
    txn.del(k);
    txn.body_unref(entry.body)?;
    Ok(PartitionResponse::Done)
}

pub(super) fn control(txn: &mut Txn<'_>, id: &QueueId, action: QueueAction) -> Outcome {
    let k = entry_key(id);
    let Some(mut entry) = txn.get::<QueueEntry>(&k)? else {
        return refused(MailError::NoSuchEntry);
    };
    match action {
        QueueAction::Hold if !entry.held => {
            txn.del(due_key(entry.next_attempt, id));
            entry.held = true;
        }
        QueueAction::Release if entry.held => {
            entry.held = false;
            txn.put(due_key(entry.next_attempt, id), &());
        }
        QueueAction::RetryAt(at) => {
            if entry.held {
                entry.held = false;
                entry.next_attempt = at;
                txn.put(due_key(at, id), &());
            } else {
                reschedule(txn, &mut entry, at);
            }
        }
        QueueAction::Hold | QueueAction::Release => {}
    }
    txn.put(k, &entry);
    Ok(PartitionResponse::Done)
}

/// Reads of the queue, for delivery workers and operators.
impl super::PartitionView<'_> {
    pub fn queue_entry(&self, id: &QueueId) -> Result<Option<QueueEntry>, StorageError> {
        self.get(&entry_key(id))
    }

    /// Up to `limit` entries in id order, starting after `after`.
    pub fn queue(
        &self,
        after: Option<&QueueId>,
        limit: usize,
    ) -> Result<Vec<QueueEntry>, StorageError> {
        let start = match after {
            Some(id) => {
                let mut k = entry_key(id);
                k.push(0);
                k
            }
            None => vec![QUEUE_ENTRY],
        };
        let mut out = Vec::new();
        for item in self.tree.range(start..) {
            let (k, v) = item?;
            if k.first() != Some(&QUEUE_ENTRY) || out.len() >= limit {
                break;
            }
            out.push(crate::codec::decode(&v)?);
        }
        Ok(out)
    }

    /// Ids of up to `limit` unheld entries due at or before `now`, soonest first.
    pub fn queue_due(&self, now: UnixSeconds, limit: usize) -> Result<Vec<QueueId>, StorageError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([QUEUE_DUE]) {
            let (k, _) = item?;
            let (Some(at), Some(id)) = (k.get(1..9), k.get(9..25)) else {
                return Err(StorageError::Corrupt("short queue index key".into()));
            };
            let at = i64::from_be_bytes(at.try_into().expect("8 bytes")) ^ i64::MIN;
            if at > now || out.len() >= limit {
                break;
            }
            out.push(id.try_into().expect("16 bytes"));
        }
        Ok(out)
    }

    /// How many entries the queue holds (held ones included) and when the oldest was
    /// queued, for metrics.
    pub fn queue_summary(&self) -> Result<(u64, Option<UnixSeconds>), StorageError> {
        let mut count = 0;
        let mut oldest: Option<UnixSeconds> = None;
        for item in self.tree.scan_prefix([QUEUE_ENTRY]) {
            let entry: QueueEntry = crate::codec::decode(&item?.1)?;
            count += 1;
            oldest = Some(oldest.map_or(entry.created, |o| o.min(entry.created)));
        }
        Ok((count, oldest))
    }
}
