//! A partition's mail data and its deterministic `apply`: accounts, aliases, mailboxes, the
//! message index, reference-counted content-addressed bodies and delivery keys.
//!
//! Apply reads no clock and no randomness: the proposer stamps `now` and internal dates, and
//! hashes passwords, before proposing. Every command is applied as one atomic sled batch,
//! together with the raft layer's applied-state record.

use std::collections::{BTreeMap, BTreeSet};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::types::*;
use crate::{chunk, codec, StorageError};

pub mod queue;

pub use queue::{
    AttemptOutcome, QueueAction, QueueEntry, QueueId, QueueRecipient, RecipientState,
    QUEUE_RECIPIENTS_MAX,
};

/// Mailboxes every new account gets, with their RFC 6154 special-use attribute.
pub const DEFAULT_MAILBOXES: [(&str, Option<&str>); 6] = [
    ("INBOX", None),
    ("Sent", Some("\\Sent")),
    ("Drafts", Some("\\Drafts")),
    ("Trash", Some("\\Trash")),
    ("Junk", Some("\\Junk")),
    ("Archive", Some("\\Archive")),
];

/// How long a delivery key is remembered, so a retried delivery is recognised.
pub const DELIVERY_KEY_RETENTION_SECONDS: i64 = 7 * 24 * 3600;
/// How many expired delivery keys one apply may prune (bounds the work of one entry).
const DELIVERY_KEY_PRUNE_MAX: usize = 32;
/// How long a [`PartitionCommand::Once`] key is remembered: far longer than a proposer
/// retries (its write deadline), so a late repeat is still recognised.
pub const ONCE_KEY_RETENTION_SECONDS: i64 = 3600;
/// Largest response remembered whole for a `Once` key; a larger COPY answer is remembered
/// without its UID pairs (a repeat then answers no COPYUID, which RFC 4315 allows).
const ONCE_RESPONSE_BYTES_MAX: usize = 16 * 1024;
/// Largest message body we store.
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most recipients in one partition for one delivery.
pub const RECIPIENTS_MAX: usize = 10_000;
/// Expunge records (UID and MODSEQ, for QRESYNC's VANISHED) kept per mailbox; older ones are
/// dropped, and a client resynchronising from before them is answered from the listing.
pub const EXPUNGE_HISTORY_MAX: u64 = 1_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Quota {
    /// Zero means unlimited.
    pub bytes: u64,
    /// Zero means unlimited.
    pub messages: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Usage {
    pub bytes: u64,
    pub messages: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub address: String,
    /// PHC string (argon2id), computed by the proposer.
    pub password_hash: String,
    pub quota: Quota,
    pub usage: Usage,
    pub created: UnixSeconds,
}

impl Account {
    /// Whether one more message of `size` bytes fits in the quota.
    pub fn fits(&self, size: u64) -> bool {
        (self.quota.bytes == 0 || self.usage.bytes.saturating_add(size) <= self.quota.bytes)
            && (self.quota.messages == 0 || self.usage.messages < self.quota.messages)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    pub address: String,
    pub targets: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mailbox {
    pub id: u64,
    pub name: String,
    pub uid_validity: UidValidity,
    pub uid_next: Uid,
    pub highest_modseq: ModSeq,
    pub subscribed: bool,
    pub special_use: Option<String>,
    pub messages: u64,
    pub bytes: u64,
    /// First UID no IMAP session has claimed as `\Recent` yet (RFC 3501 §2.3.2).
    pub recent_from: Uid,
    /// Expunge records kept for this mailbox (at most [`EXPUNGE_HISTORY_MAX`]).
    pub expunge_records: u64,
    /// Expunges with a MODSEQ up to this one are no longer individually remembered: a reader
    /// asking what vanished since an older MODSEQ must compare listings instead.
    pub expunge_history_from: ModSeq,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub body: BodyHash,
    pub size: u64,
    pub internal_date: UnixSeconds,
    pub flags: BTreeSet<String>,
    pub modseq: ModSeq,
}

/// A stored body's reference count (messages pointing at it) and size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyMeta {
    pub refs: u64,
    pub size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlagOp {
    Add,
    Remove,
    Replace,
}

/// Commands a partition group applies. Times and hashes are stamped by the proposer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartitionCommand {
    CreateAccount {
        address: String,
        password_hash: String,
        quota: Quota,
        now: UnixSeconds,
    },
    SetPassword {
        address: String,
        password_hash: String,
    },
    SetQuota {
        address: String,
        quota: Quota,
    },
    RemoveAccount {
        address: String,
    },
    SetAlias {
        address: String,
        targets: Vec<String>,
    },
    RemoveAlias {
        address: String,
    },
    CreateMailbox {
        address: String,
        name: String,
        now: UnixSeconds,
    },
    DeleteMailbox {
        address: String,
        name: String,
    },
    RenameMailbox {
        address: String,
        from: String,
        to: String,
        now: UnixSeconds,
    },
    Subscribe {
        address: String,
        name: String,
        subscribed: bool,
    },
    /// Delivery of one message to the INBOX of each recipient in this partition. A recipient
    /// that already received a delivery with the same `key` gets no second copy (the first
    /// outcome is returned); the key names the message, not the recipient list.
    Deliver {
        key: [u8; 32],
        recipients: Vec<String>,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        internal_date: UnixSeconds,
        now: UnixSeconds,
    },
    Append {
        address: String,
        mailbox: String,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        flags: Vec<String>,
        internal_date: UnixSeconds,
    },
    /// Changes the flags of the given messages. With `unchanged_since` (RFC 7162
    /// UNCHANGEDSINCE), a message whose MODSEQ is higher is left alone and reported.
    StoreFlags {
        address: String,
        mailbox: String,
        uids: Vec<Uid>,
        op: FlagOp,
        flags: Vec<String>,
        unchanged_since: Option<ModSeq>,
    },
    /// Removes the given messages, or every `\Deleted` one when `uids` is `None`.
    Expunge {
        address: String,
        mailbox: String,
        uids: Option<Vec<Uid>>,
    },
    Copy {
        address: String,
        from: String,
        to: String,
        uids: Vec<Uid>,
        remove_source: bool,
    },
    /// Claims the mailbox's messages not yet seen by any session as `\Recent` for the caller:
    /// answers the range of UIDs that are recent for it, and moves the mark to UIDNEXT.
    ClaimRecent {
        address: String,
        mailbox: String,
    },
    /// Takes (or renews) the exclusive lock on an account's maildrop (POP3, RFC 1939 §8) for
    /// `holder` until `now + lease_seconds`. Refused while another holder's lease runs.
    LockMaildrop {
        address: String,
        holder: [u8; 16],
        now: UnixSeconds,
        lease_seconds: i64,
    },
    /// Releases the lock if `holder` holds it.
    UnlockMaildrop {
        address: String,
        holder: [u8; 16],
    },
    /// Applies `command` once per `key`: a repeat (a proposer retrying after a failure of
    /// unknown outcome) answers the first response and changes nothing. For commands that
    /// are not idempotent by themselves, such as APPEND and COPY.
    Once {
        key: [u8; 32],
        now: UnixSeconds,
        command: Box<PartitionCommand>,
    },
    /// Queues a message for remote recipients (a repeat of the id changes nothing).
    Enqueue {
        entry: QueueEntry,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    /// The outcome of one delivery attempt of a queue entry, and when to try again.
    QueueAttempted {
        id: QueueId,
        outcomes: Vec<(String, AttemptOutcome)>,
        error: Option<String>,
        next_attempt: UnixSeconds,
    },
    /// Drops a queue entry: done and reported, or deleted by the operator.
    QueueRemove {
        id: QueueId,
    },
    QueueControl {
        id: QueueId,
        action: QueueAction,
    },
}

/// Why a command had no effect. These are expected outcomes, not failures of the system.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MailError {
    #[error("no such account")]
    NoSuchAccount,
    #[error("address is already in use")]
    AddressInUse,
    #[error("no such mailbox")]
    NoSuchMailbox,
    #[error("mailbox already exists")]
    MailboxExists,
    #[error("invalid mailbox name")]
    InvalidMailboxName,
    #[error("invalid address")]
    InvalidAddress,
    #[error("invalid flag")]
    InvalidFlag,
    #[error("over quota")]
    OverQuota,
    #[error("message too large")]
    TooLarge,
    #[error("too many items")]
    TooMany,
    #[error("operation not allowed on this mailbox")]
    NotAllowed,
    #[error("maildrop is in use by another session")]
    InUse,
    #[error("no such queue entry")]
    NoSuchEntry,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecipientOutcome {
    Delivered { uid_validity: UidValidity, uid: Uid },
    NoSuchAccount,
    OverQuota,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartitionResponse {
    Done,
    Delivered(Vec<(String, RecipientOutcome)>),
    Appended {
        uid_validity: UidValidity,
        uid: Uid,
    },
    /// Every named message that still exists, with its MODSEQ and flags after the store,
    /// and the ones left alone because they changed after UNCHANGEDSINCE.
    Flags {
        stored: Vec<(Uid, ModSeq, BTreeSet<String>)>,
        conflicts: Vec<Uid>,
    },
    /// The UIDs `from..to` are `\Recent` for the session that claimed them.
    Recent {
        from: Uid,
        to: Uid,
    },
    Expunged(Vec<Uid>),
    Copied {
        uid_validity: UidValidity,
        pairs: Vec<(Uid, Uid)>,
    },
    Refused(MailError),
}

/// What a `Once` key remembers: when it was first applied and what it answered. (The stored
/// records are public so the golden-format tests can name them.)
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OnceRecord {
    pub at: UnixSeconds,
    pub response: PartitionResponse,
}

/// What a delivery key remembers: when it was applied and the recipient's outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeliveryKeyRecord {
    pub at: UnixSeconds,
    pub outcome: RecipientOutcome,
}

// Key prefixes of the partition keyspace.
const ACCOUNT: u8 = b'A';
const ALIAS: u8 = b'L';
const MAILBOX: u8 = b'M';
const MESSAGE: u8 = b'I';
const BODY_META: u8 = b'B';
const BODY_CHUNKS: u8 = b'C';
const DELIVERY_KEY: u8 = b'K';
const DELIVERY_KEY_BY_TIME: u8 = b'T';
const COUNTER: u8 = b'S';
const MAILDROP_LOCK: u8 = b'P';
/// Expunged UIDs by the MODSEQ of their expunge, for QRESYNC's VANISHED (RFC 7162 §3.2.10):
/// mailbox id, MODSEQ, UID → ().
const EXPUNGED: u8 = b'X';
/// `Once` keys → their first response, and the same keys by time for pruning.
const ONCE_KEY: u8 = b'O';
const ONCE_KEY_BY_TIME: u8 = b'Q';

/// A POP3 maildrop lock: the session holding it and when its lease ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaildropLock {
    pub holder: [u8; 16],
    pub until: UnixSeconds,
}

fn key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = vec![prefix];
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

fn mailbox_key(address: &str, name: &str) -> Vec<u8> {
    key(MAILBOX, &[address.as_bytes(), &[0], name.as_bytes()])
}

fn message_key(mailbox: u64, uid: Uid) -> Vec<u8> {
    key(MESSAGE, &[&mailbox.to_be_bytes(), &uid.0.to_be_bytes()])
}

fn expunged_key(mailbox: u64, modseq: ModSeq, uid: Uid) -> Vec<u8> {
    key(
        EXPUNGED,
        &[
            &mailbox.to_be_bytes(),
            &modseq.0.to_be_bytes(),
            &uid.0.to_be_bytes(),
        ],
    )
}

/// The MODSEQ and UID of an expunge record's key.
fn expunged_parts(k: &[u8]) -> Option<(ModSeq, Uid)> {
    let modseq = k.get(9..17)?.try_into().ok().map(u64::from_be_bytes)?;
    let uid = k.get(17..21)?.try_into().ok().map(u32::from_be_bytes)?;
    (k.len() == 21).then_some((ModSeq(modseq), Uid(uid)))
}

/// Order-preserving encoding of a signed time for big-endian keys.
fn time_key(t: UnixSeconds) -> [u8; 8] {
    ((t as u64) ^ (1 << 63)).to_be_bytes()
}

/// Read-your-writes overlay over the tree for one apply; turned into one atomic batch.
pub(crate) struct Txn<'a> {
    tree: &'a sled::Tree,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    chunks: sled::Batch,
}

impl<'a> Txn<'a> {
    pub(crate) fn new(tree: &'a sled::Tree) -> Txn<'a> {
        Txn {
            tree,
            writes: BTreeMap::new(),
            chunks: sled::Batch::default(),
        }
    }

    fn get<T: DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>, StorageError> {
        let raw = self.get_raw(k)?;
        raw.map(|v| codec::decode(&v))
            .transpose()
            .map_err(Into::into)
    }

    fn put<T: Serialize>(&mut self, k: Vec<u8>, v: &T) {
        let bytes = codec::encode(v);
        assert!(
            bytes.len() <= chunk::CHUNK_BYTES_MAX,
            "record over the sled value limit"
        );
        self.writes.insert(k, Some(bytes));
    }

    pub(crate) fn put_raw(&mut self, k: Vec<u8>, v: Vec<u8>) {
        assert!(
            v.len() <= chunk::CHUNK_BYTES_MAX,
            "record over the sled value limit"
        );
        self.writes.insert(k, Some(v));
    }

    fn del(&mut self, k: Vec<u8>) {
        self.writes.insert(k, None);
    }

    pub(crate) fn del_raw(&mut self, k: Vec<u8>) {
        self.del(k)
    }

    pub(crate) fn get_raw(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(match self.writes.get(k) {
            Some(v) => v.clone(),
            None => self.tree.get(k)?.map(|v| v.to_vec()),
        })
    }

    /// Keys and values with `prefix`, as stored before this apply (callers scan before writing).
    fn scan<T: DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, T)>, StorageError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix) {
            let (k, v) = item?;
            if self.writes.contains_key(&k[..]) {
                continue;
            }
            out.push((k.to_vec(), codec::decode(&v)?));
        }
        for (k, v) in self.writes.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            if let Some(v) = v {
                out.push((k.clone(), codec::decode(v)?));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    pub(crate) fn into_batch(self) -> sled::Batch {
        let mut batch = self.chunks;
        for (k, v) in self.writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        batch
    }

    fn counter(&mut self, name: &str) -> Result<u64, StorageError> {
        Ok(self
            .get::<u64>(&key(COUNTER, &[name.as_bytes()]))?
            .unwrap_or(0))
    }

    fn set_counter(&mut self, name: &str, value: u64) {
        self.put(key(COUNTER, &[name.as_bytes()]), &value);
    }

    /// Adds one reference to a body, storing its bytes if this is the first.
    fn body_ref(
        &mut self,
        hash: BodyHash,
        body: Option<&[u8]>,
        size: u64,
    ) -> Result<(), StorageError> {
        let meta_key = key(BODY_META, &[&hash.0]);
        let meta = match self.get::<BodyMeta>(&meta_key)? {
            Some(mut meta) => {
                meta.refs += 1;
                meta
            }
            None => {
                let body = body.expect("first reference to a body must carry its bytes");
                chunk::put(&mut self.chunks, &key(BODY_CHUNKS, &[&hash.0]), body);
                BodyMeta { refs: 1, size }
            }
        };
        self.put(meta_key, &meta);
        Ok(())
    }

    fn body_unref(&mut self, hash: BodyHash) -> Result<(), StorageError> {
        let meta_key = key(BODY_META, &[&hash.0]);
        let Some(mut meta) = self.get::<BodyMeta>(&meta_key)? else {
            return Err(StorageError::Corrupt(format!(
                "message refers to missing body {hash:?}"
            )));
        };
        meta.refs -= 1;
        if meta.refs == 0 {
            self.del(meta_key);
            chunk::remove(self.tree, &mut self.chunks, &key(BODY_CHUNKS, &[&hash.0]))?;
        } else {
            self.put(meta_key, &meta);
        }
        Ok(())
    }
}

type Outcome = Result<PartitionResponse, StorageError>;

fn refused(e: MailError) -> Outcome {
    Ok(PartitionResponse::Refused(e))
}

/// Applies one command to the overlay. Pure function of (stored state, command).
pub(crate) fn apply(txn: &mut Txn<'_>, cmd: &PartitionCommand) -> Outcome {
    use PartitionCommand as C;
    match cmd {
        C::Once {
            key: once,
            now,
            command,
        } => apply_once(txn, once, *now, command),
        C::CreateAccount {
            address,
            password_hash,
            quota,
            now,
        } => create_account(txn, address, password_hash, quota, *now),
        C::SetPassword {
            address,
            password_hash,
        } => update_account(txn, address, |a| {
            a.password_hash = password_hash.clone();
        }),
        C::SetQuota { address, quota } => update_account(txn, address, |a| a.quota = quota.clone()),
        C::RemoveAccount { address } => remove_account(txn, address),
        C::SetAlias { address, targets } => {
            if !is_valid_address(address) || targets.iter().any(|t| !is_valid_address(t)) {
                return refused(MailError::InvalidAddress);
            }
            if targets.is_empty() || targets.len() > ALIAS_TARGETS_MAX {
                return refused(MailError::TooMany);
            }
            if txn
                .get::<Account>(&key(ACCOUNT, &[address.as_bytes()]))?
                .is_some()
            {
                return refused(MailError::AddressInUse);
            }
            let alias = Alias {
                address: address.clone(),
                targets: targets.clone(),
            };
            txn.put(key(ALIAS, &[address.as_bytes()]), &alias);
            Ok(PartitionResponse::Done)
        }
        C::RemoveAlias { address } => {
            let k = key(ALIAS, &[address.as_bytes()]);
            if txn.get::<Alias>(&k)?.is_none() {
                return refused(MailError::NoSuchAccount);
            }
            txn.del(k);
            Ok(PartitionResponse::Done)
        }
        C::CreateMailbox { address, name, now } => {
            if txn
                .get::<Account>(&key(ACCOUNT, &[address.as_bytes()]))?
                .is_none()
            {
                return refused(MailError::NoSuchAccount);
            }
            let Some(name) = normalize_mailbox_name(name) else {
                return refused(MailError::InvalidMailboxName);
            };
            if txn.scan::<Mailbox>(&mailbox_key(address, ""))?.len() >= MAILBOXES_PER_ACCOUNT_MAX {
                return refused(MailError::TooMany);
            }
            if txn.get::<Mailbox>(&mailbox_key(address, &name))?.is_some() {
                return refused(MailError::MailboxExists);
            }
            new_mailbox(txn, address, &name, None, *now)?;
            Ok(PartitionResponse::Done)
        }
        C::DeleteMailbox { address, name } => delete_mailbox(txn, address, name),
        C::RenameMailbox {
            address,
            from,
            to,
            now,
        } => rename_mailbox(txn, address, from, to, *now),
        C::Subscribe {
            address,
            name,
            subscribed,
        } => {
            let k = mailbox_key(address, name);
            let Some(mut mb) = txn.get::<Mailbox>(&k)? else {
                return refused(MailError::NoSuchMailbox);
            };
            mb.subscribed = *subscribed;
            txn.put(k, &mb);
            Ok(PartitionResponse::Done)
        }
        C::Deliver {
            key: dkey,
            recipients,
            body,
            internal_date,
            now,
        } => deliver(txn, dkey, recipients, body, *internal_date, *now),
        C::Append {
            address,
            mailbox,
            body,
            flags,
            internal_date,
        } => {
            if body.len() > MESSAGE_BYTES_MAX {
                return refused(MailError::TooLarge);
            }
            if flags.len() > FLAGS_PER_MESSAGE_MAX || !flags.iter().all(|f| is_valid_flag(f)) {
                return refused(MailError::InvalidFlag);
            }
            let Some(mut account) = txn.get::<Account>(&key(ACCOUNT, &[address.as_bytes()]))?
            else {
                return refused(MailError::NoSuchAccount);
            };
            if txn
                .get::<Mailbox>(&mailbox_key(address, mailbox))?
                .is_none()
            {
                return refused(MailError::NoSuchMailbox);
            }
            if !account.fits(body.len() as u64) {
                return refused(MailError::OverQuota);
            }
            let hash = BodyHash::of(body);
            let size = body.len() as u64;
            txn.body_ref(hash, Some(body), size)?;
            let flags: BTreeSet<String> = flags.iter().cloned().collect();
            let (uid_validity, uid) = add_message(
                txn,
                &mut account,
                mailbox,
                hash,
                size,
                *internal_date,
                flags,
            )?;
            txn.put(key(ACCOUNT, &[address.as_bytes()]), &account);
            Ok(PartitionResponse::Appended { uid_validity, uid })
        }
        C::StoreFlags {
            address,
            mailbox,
            uids,
            op,
            flags,
            unchanged_since,
        } => store_flags(txn, address, mailbox, uids, *op, flags, *unchanged_since),
        C::ClaimRecent { address, mailbox } => {
            let k = mailbox_key(address, mailbox);
            let Some(mut mb) = txn.get::<Mailbox>(&k)? else {
                return refused(MailError::NoSuchMailbox);
            };
            let from = mb.recent_from;
            if from != mb.uid_next {
                mb.recent_from = mb.uid_next;
                txn.put(k, &mb);
            }
            Ok(PartitionResponse::Recent {
                from,
                to: mb.uid_next,
            })
        }
        C::Expunge {
            address,
            mailbox,
            uids,
        } => expunge(txn, address, mailbox, uids.as_deref()),
        C::LockMaildrop {
            address,
            holder,
            now,
            lease_seconds,
        } => {
            if txn
                .get::<Account>(&key(ACCOUNT, &[address.as_bytes()]))?
                .is_none()
            {
                return refused(MailError::NoSuchAccount);
            }
            let lk = key(MAILDROP_LOCK, &[address.as_bytes()]);
            if let Some(held) = txn.get::<MaildropLock>(&lk)? {
                if held.holder != *holder && held.until > *now {
                    return refused(MailError::InUse);
                }
            }
            let lock = MaildropLock {
                holder: *holder,
                until: now.saturating_add(*lease_seconds),
            };
            txn.put(lk, &lock);
            Ok(PartitionResponse::Done)
        }
        C::UnlockMaildrop { address, holder } => {
            let lk = key(MAILDROP_LOCK, &[address.as_bytes()]);
            if txn
                .get::<MaildropLock>(&lk)?
                .is_some_and(|l| l.holder == *holder)
            {
                txn.del(lk);
            }
            Ok(PartitionResponse::Done)
        }
        C::Copy {
            address,
            from,
            to,
            uids,
            remove_source,
        } => copy(txn, address, from, to, uids, *remove_source),
        C::Enqueue { entry, body } => queue::enqueue(txn, entry, body),
        C::QueueAttempted {
            id,
            outcomes,
            error,
            next_attempt,
        } => queue::attempted(txn, id, outcomes, error.as_deref(), *next_attempt),
        C::QueueRemove { id } => queue::remove(txn, id),
        C::QueueControl { id, action } => queue::control(txn, id, *action),
    }
}

fn create_account(
    txn: &mut Txn<'_>,
    address: &str,
    password_hash: &str,
    quota: &Quota,
    now: UnixSeconds,
) -> Outcome {
    if !is_valid_address(address) {
        return refused(MailError::InvalidAddress);
    }
    let k = key(ACCOUNT, &[address.as_bytes()]);
    if txn.get::<Account>(&k)?.is_some()
        || txn
            .get::<Alias>(&key(ALIAS, &[address.as_bytes()]))?
            .is_some()
    {
        return refused(MailError::AddressInUse);
    }
    let account = Account {
        address: address.to_string(),
        password_hash: password_hash.to_string(),
        quota: quota.clone(),
        usage: Usage::default(),
        created: now,
    };
    txn.put(k, &account);
    for (name, special_use) in DEFAULT_MAILBOXES {
        new_mailbox(txn, address, name, special_use, now)?;
    }
    Ok(PartitionResponse::Done)
}

fn update_account(txn: &mut Txn<'_>, address: &str, f: impl FnOnce(&mut Account)) -> Outcome {
    let k = key(ACCOUNT, &[address.as_bytes()]);
    let Some(mut account) = txn.get::<Account>(&k)? else {
        return refused(MailError::NoSuchAccount);
    };
    f(&mut account);
    txn.put(k, &account);
    Ok(PartitionResponse::Done)
}

fn remove_account(txn: &mut Txn<'_>, address: &str) -> Outcome {
    let k = key(ACCOUNT, &[address.as_bytes()]);
    if txn.get::<Account>(&k)?.is_none() {
        return refused(MailError::NoSuchAccount);
    }
    for (mk, mb) in txn.scan::<Mailbox>(&mailbox_key(address, ""))? {
        drop_mailbox_messages(txn, mb.id)?;
        txn.del(mk);
    }
    txn.del(key(MAILDROP_LOCK, &[address.as_bytes()]));
    txn.del(k);
    Ok(PartitionResponse::Done)
}

fn new_mailbox(
    txn: &mut Txn<'_>,
    address: &str,
    name: &str,
    special_use: Option<&str>,
    now: UnixSeconds,
) -> Result<Mailbox, StorageError> {
    let id = txn.counter("mailbox_id")? + 1;
    txn.set_counter("mailbox_id", id);
    // UIDVALIDITY follows the proposer's clock but never repeats within the partition, even if
    // a mailbox is recreated within the same second or the clock steps back.
    let last = txn.counter("uid_validity")?;
    let validity = (now.clamp(1, u32::MAX as i64) as u64).max(last + 1);
    let validity = u32::try_from(validity).unwrap_or(u32::MAX);
    txn.set_counter("uid_validity", validity as u64);
    let mb = Mailbox {
        id,
        name: name.to_string(),
        uid_validity: UidValidity(validity),
        uid_next: Uid(1),
        highest_modseq: ModSeq(1),
        subscribed: true,
        special_use: special_use.map(str::to_string),
        messages: 0,
        bytes: 0,
        recent_from: Uid(1),
        expunge_records: 0,
        expunge_history_from: ModSeq(0),
    };
    txn.put(mailbox_key(address, name), &mb);
    Ok(mb)
}

fn drop_mailbox_messages(txn: &mut Txn<'_>, mailbox_id: u64) -> Result<(u64, u64), StorageError> {
    for (k, ()) in txn.scan::<()>(&key(EXPUNGED, &[&mailbox_id.to_be_bytes()]))? {
        txn.del(k);
    }
    let (mut count, mut bytes) = (0, 0);
    for (k, msg) in txn.scan::<MessageRecord>(&key(MESSAGE, &[&mailbox_id.to_be_bytes()]))? {
        txn.body_unref(msg.body)?;
        txn.del(k);
        count += 1;
        bytes += msg.size;
    }
    Ok((count, bytes))
}

fn delete_mailbox(txn: &mut Txn<'_>, address: &str, name: &str) -> Outcome {
    let Some(name) = normalize_mailbox_name(name) else {
        return refused(MailError::InvalidMailboxName);
    };
    if name == "INBOX" {
        return refused(MailError::NotAllowed);
    }
    let Some(mut account) = txn.get::<Account>(&key(ACCOUNT, &[address.as_bytes()]))? else {
        return refused(MailError::NoSuchAccount);
    };
    let k = mailbox_key(address, &name);
    let Some(mb) = txn.get::<Mailbox>(&k)? else {
        return refused(MailError::NoSuchMailbox);
    };
    let (count, bytes) = drop_mailbox_messages(txn, mb.id)?;
    account.usage.messages -= count;
    account.usage.bytes -= bytes;
    txn.put(key(ACCOUNT, &[address.as_bytes()]), &account);
    txn.del(k);
    Ok(PartitionResponse::Done)
}

fn rename_mailbox(
    txn: &mut Txn<'_>,
    address: &str,
    from: &str,
    to: &str,
    now: UnixSeconds,
) -> Outcome {
    let (Some(from), Some(to)) = (normalize_mailbox_name(from), normalize_mailbox_name(to)) else {
        return refused(MailError::InvalidMailboxName);
    };
    if to == "INBOX" {
        return refused(MailError::MailboxExists);
    }
    let Some(mut src) = txn.get::<Mailbox>(&mailbox_key(address, &from))? else {
        return refused(MailError::NoSuchMailbox);
    };
    if txn.get::<Mailbox>(&mailbox_key(address, &to))?.is_some() {
        return refused(MailError::MailboxExists);
    }
    if from == "INBOX" {
        // RFC 3501 §6.3.5: renaming INBOX moves its messages to the new name and leaves an
        // empty INBOX behind. We move the mailbox record and create a fresh INBOX.
        src.name = to.clone();
        src.special_use = None;
        txn.del(mailbox_key(address, &from));
        txn.put(mailbox_key(address, &to), &src);
        new_mailbox(txn, address, "INBOX", None, now)?;
        return Ok(PartitionResponse::Done);
    }
    // Children move with their parent ("a" → "b" renames "a/x" to "b/x").
    let child_prefix = format!("{from}/");
    for (k, mut mb) in txn.scan::<Mailbox>(&mailbox_key(address, ""))? {
        let renamed = if mb.name == from {
            to.clone()
        } else if let Some(rest) = mb.name.strip_prefix(&child_prefix) {
            format!("{to}/{rest}")
        } else {
            continue;
        };
        if txn
            .get::<Mailbox>(&mailbox_key(address, &renamed))?
            .is_some()
        {
            return refused(MailError::MailboxExists);
        }
        txn.del(k);
        mb.name = renamed.clone();
        txn.put(mailbox_key(address, &renamed), &mb);
    }
    Ok(PartitionResponse::Done)
}

/// Stores one message record in `mailbox`, bumping UIDNEXT, HIGHESTMODSEQ and usage.
fn add_message(
    txn: &mut Txn<'_>,
    account: &mut Account,
    mailbox: &str,
    body: BodyHash,
    size: u64,
    internal_date: UnixSeconds,
    flags: BTreeSet<String>,
) -> Result<(UidValidity, Uid), StorageError> {
    let mk = mailbox_key(&account.address, mailbox);
    let mut mb: Mailbox = txn.get(&mk)?.expect("caller checked the mailbox exists");
    let uid = mb.uid_next;
    assert!(uid.0 < u32::MAX, "UID space exhausted");
    mb.uid_next = Uid(uid.0 + 1);
    mb.highest_modseq = ModSeq(mb.highest_modseq.0 + 1);
    mb.messages += 1;
    mb.bytes += size;
    let record = MessageRecord {
        body,
        size,
        internal_date,
        flags,
        modseq: mb.highest_modseq,
    };
    txn.put(message_key(mb.id, uid), &record);
    txn.put(mk, &mb);
    account.usage.messages += 1;
    account.usage.bytes += size;
    Ok((mb.uid_validity, uid))
}

fn deliver(
    txn: &mut Txn<'_>,
    dkey: &[u8; 32],
    recipients: &[String],
    body: &[u8],
    internal_date: UnixSeconds,
    now: UnixSeconds,
) -> Outcome {
    if body.len() > MESSAGE_BYTES_MAX {
        return refused(MailError::TooLarge);
    }
    if recipients.len() > RECIPIENTS_MAX {
        return refused(MailError::TooMany);
    }
    let hash = BodyHash::of(body);
    let size = body.len() as u64;
    let mut outcome = Vec::with_capacity(recipients.len());
    let mut done = BTreeSet::new();
    for rcpt in recipients {
        if !done.insert(rcpt.as_str()) {
            continue; // the same recipient twice gets one copy
        }
        // Keys are per recipient, so a retry that names only some of the first attempt's
        // recipients (or more) still stores one copy per mailbox.
        let rkey = recipient_delivery_key(dkey, rcpt);
        let kk = key(DELIVERY_KEY, &[&rkey]);
        if let Some(seen) = txn.get::<DeliveryKeyRecord>(&kk)? {
            outcome.push((rcpt.clone(), seen.outcome));
            continue;
        }
        let ak = key(ACCOUNT, &[rcpt.as_bytes()]);
        let Some(mut account) = txn.get::<Account>(&ak)? else {
            outcome.push((rcpt.clone(), RecipientOutcome::NoSuchAccount));
            continue;
        };
        if !account.fits(size) {
            outcome.push((rcpt.clone(), RecipientOutcome::OverQuota));
            continue;
        }
        txn.body_ref(hash, Some(body), size)?;
        let (uid_validity, uid) = add_message(
            txn,
            &mut account,
            "INBOX",
            hash,
            size,
            internal_date,
            BTreeSet::new(),
        )?;
        txn.put(ak, &account);
        let delivered = RecipientOutcome::Delivered { uid_validity, uid };
        // Only deliveries are remembered: a refusal (over quota, no account) may succeed
        // when the sender retries later.
        txn.put(
            kk,
            &DeliveryKeyRecord {
                at: now,
                outcome: delivered.clone(),
            },
        );
        txn.put(key(DELIVERY_KEY_BY_TIME, &[&time_key(now), &rkey]), &());
        outcome.push((rcpt.clone(), delivered));
    }
    prune_keys(
        txn,
        DELIVERY_KEY_BY_TIME,
        DELIVERY_KEY,
        now.saturating_sub(DELIVERY_KEY_RETENTION_SECONDS),
    )?;
    Ok(PartitionResponse::Delivered(outcome))
}

fn apply_once(
    txn: &mut Txn<'_>,
    once: &[u8; 32],
    now: UnixSeconds,
    command: &PartitionCommand,
) -> Outcome {
    if matches!(command, PartitionCommand::Once { .. }) {
        return refused(MailError::NotAllowed);
    }
    let k = key(ONCE_KEY, &[once]);
    if let Some(seen) = txn.get::<OnceRecord>(&k)? {
        return Ok(seen.response);
    }
    let response = apply(txn, command)?;
    let mut remembered = response.clone();
    if codec::encode(&remembered).len() > ONCE_RESPONSE_BYTES_MAX {
        if let PartitionResponse::Copied { pairs, .. } = &mut remembered {
            pairs.clear();
        }
    }
    txn.put(
        k,
        &OnceRecord {
            at: now,
            response: remembered,
        },
    );
    txn.put(key(ONCE_KEY_BY_TIME, &[&time_key(now), once]), &());
    prune_keys(
        txn,
        ONCE_KEY_BY_TIME,
        ONCE_KEY,
        now.saturating_sub(ONCE_KEY_RETENTION_SECONDS),
    )?;
    Ok(response)
}

fn recipient_delivery_key(dkey: &[u8; 32], recipient: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(dkey);
    h.update(recipient.as_bytes());
    *h.finalize().as_bytes()
}

/// Drops up to [`DELIVERY_KEY_PRUNE_MAX`] keys recorded before `horizon`: `by_time` holds
/// (time, key) index entries, `records` the records they point at.
fn prune_keys(
    txn: &mut Txn<'_>,
    by_time: u8,
    records: u8,
    horizon: UnixSeconds,
) -> Result<(), StorageError> {
    let horizon = time_key(horizon);
    let mut expired = Vec::new();
    for item in txn.tree.scan_prefix([by_time]) {
        let (k, _) = item?;
        if k.len() != 1 + 8 + 32
            || k[1..9] >= horizon[..]
            || expired.len() >= DELIVERY_KEY_PRUNE_MAX
        {
            break;
        }
        expired.push(k.to_vec());
    }
    for k in expired {
        txn.del(key(records, &[&k[9..]]));
        txn.del(k);
    }
    Ok(())
}

fn selected(txn: &Txn<'_>, address: &str, mailbox: &str) -> Result<Option<Mailbox>, StorageError> {
    txn.get::<Mailbox>(&mailbox_key(address, mailbox))
}

fn store_flags(
    txn: &mut Txn<'_>,
    address: &str,
    mailbox: &str,
    uids: &[Uid],
    op: FlagOp,
    flags: &[String],
    unchanged_since: Option<ModSeq>,
) -> Outcome {
    if flags.len() > FLAGS_PER_MESSAGE_MAX || !flags.iter().all(|f| is_valid_flag(f)) {
        return refused(MailError::InvalidFlag);
    }
    let Some(mut mb) = selected(txn, address, mailbox)? else {
        return refused(MailError::NoSuchMailbox);
    };
    let mut changed = Vec::new();
    let mut conflicts = Vec::new();
    for uid in uids.iter().collect::<BTreeSet<_>>() {
        let k = message_key(mb.id, *uid);
        let Some(mut msg) = txn.get::<MessageRecord>(&k)? else {
            continue; // expunged meanwhile: RFC 3501 lets STORE ignore it
        };
        if unchanged_since.is_some_and(|since| msg.modseq > since) {
            conflicts.push(*uid);
            continue;
        }
        let before = msg.flags.clone();
        match op {
            FlagOp::Add => msg.flags.extend(flags.iter().cloned()),
            FlagOp::Remove => msg.flags.retain(|f| !flags.contains(f)),
            FlagOp::Replace => msg.flags = flags.iter().cloned().collect(),
        }
        if msg.flags.len() > FLAGS_PER_MESSAGE_MAX {
            return refused(MailError::TooMany);
        }
        if msg.flags != before {
            mb.highest_modseq = ModSeq(mb.highest_modseq.0 + 1);
            msg.modseq = mb.highest_modseq;
            txn.put(k, &msg);
        }
        changed.push((*uid, msg.modseq, msg.flags));
    }
    txn.put(mailbox_key(address, mailbox), &mb);
    Ok(PartitionResponse::Flags {
        stored: changed,
        conflicts,
    })
}

fn expunge(txn: &mut Txn<'_>, address: &str, mailbox: &str, uids: Option<&[Uid]>) -> Outcome {
    let ak = key(ACCOUNT, &[address.as_bytes()]);
    let Some(mut account) = txn.get::<Account>(&ak)? else {
        return refused(MailError::NoSuchAccount);
    };
    let Some(mut mb) = selected(txn, address, mailbox)? else {
        return refused(MailError::NoSuchMailbox);
    };
    // Named UIDs are looked up directly; only "every \Deleted one" walks the mailbox.
    let chosen: Vec<(Vec<u8>, MessageRecord)> = match uids {
        Some(uids) => {
            let mut found = Vec::new();
            for uid in uids.iter().collect::<BTreeSet<_>>() {
                let k = message_key(mb.id, *uid);
                if let Some(msg) = txn.get::<MessageRecord>(&k)? {
                    found.push((k, msg));
                }
            }
            found
        }
        None => txn
            .scan::<MessageRecord>(&key(MESSAGE, &[&mb.id.to_be_bytes()]))?
            .into_iter()
            .filter(|(_, msg)| msg.flags.contains("\\Deleted"))
            .collect(),
    };
    let expunge_modseq = ModSeq(mb.highest_modseq.0 + 1);
    let mut removed = Vec::with_capacity(chosen.len());
    for (k, msg) in chosen {
        let uid = Uid(u32::from_be_bytes(k[9..13].try_into().expect("4-byte uid")));
        txn.body_unref(msg.body)?;
        txn.del(k);
        mb.messages -= 1;
        mb.bytes -= msg.size;
        account.usage.messages -= 1;
        account.usage.bytes -= msg.size;
        removed.push(uid);
    }
    if !removed.is_empty() {
        mb.highest_modseq = expunge_modseq;
        remember_expunges(txn, &mut mb, expunge_modseq, &removed)?;
    }
    txn.put(mailbox_key(address, mailbox), &mb);
    txn.put(ak, &account);
    Ok(PartitionResponse::Expunged(removed))
}

/// Records `removed` as expunged at `modseq`, dropping the oldest records beyond
/// [`EXPUNGE_HISTORY_MAX`] and moving the mailbox's history floor past them.
fn remember_expunges(
    txn: &mut Txn<'_>,
    mb: &mut Mailbox,
    modseq: ModSeq,
    removed: &[Uid],
) -> Result<(), StorageError> {
    let prefix = key(EXPUNGED, &[&mb.id.to_be_bytes()]);
    let added = removed.len() as u64;
    if added > EXPUNGE_HISTORY_MAX {
        // This expunge alone overflows the history: keep none, remember only the floor.
        for (k, ()) in txn.scan::<()>(&prefix)? {
            txn.del(k);
        }
        mb.expunge_records = 0;
        mb.expunge_history_from = modseq;
        return Ok(());
    }
    for uid in removed {
        txn.put(expunged_key(mb.id, modseq, *uid), &());
    }
    let excess = (mb.expunge_records + added).saturating_sub(EXPUNGE_HISTORY_MAX);
    // The oldest records are in the tree (this apply's records have the highest MODSEQ).
    let mut dropped = 0;
    for item in txn.tree.scan_prefix(&prefix).take(excess as usize) {
        let (k, _) = item?;
        if let Some((old, _)) = expunged_parts(&k) {
            mb.expunge_history_from = mb.expunge_history_from.max(old);
        }
        txn.del(k.to_vec());
        dropped += 1;
    }
    mb.expunge_records = mb.expunge_records + added - dropped;
    Ok(())
}

fn copy(
    txn: &mut Txn<'_>,
    address: &str,
    from: &str,
    to: &str,
    uids: &[Uid],
    remove_source: bool,
) -> Outcome {
    let ak = key(ACCOUNT, &[address.as_bytes()]);
    let Some(mut account) = txn.get::<Account>(&ak)? else {
        return refused(MailError::NoSuchAccount);
    };
    let (Some(src), Some(dst)) = (selected(txn, address, from)?, selected(txn, address, to)?)
    else {
        return refused(MailError::NoSuchMailbox);
    };
    let mut sources = Vec::new();
    for uid in uids.iter().collect::<BTreeSet<_>>() {
        if let Some(msg) = txn.get::<MessageRecord>(&message_key(src.id, *uid))? {
            sources.push((*uid, msg));
        }
    }
    if !remove_source {
        // A copy adds usage; a move within one account does not.
        let extra: u64 = sources.iter().map(|(_, m)| m.size).sum();
        let fits = (account.quota.bytes == 0 || account.usage.bytes + extra <= account.quota.bytes)
            && (account.quota.messages == 0
                || account.usage.messages + sources.len() as u64 <= account.quota.messages);
        if !fits {
            return refused(MailError::OverQuota);
        }
    }
    let mut pairs = Vec::with_capacity(sources.len());
    for (uid, msg) in &sources {
        txn.body_ref(msg.body, None, msg.size)?;
        let mut flags = msg.flags.clone();
        flags.remove("\\Recent");
        let (_, new_uid) = add_message(
            txn,
            &mut account,
            &dst.name,
            msg.body,
            msg.size,
            msg.internal_date,
            flags,
        )?;
        pairs.push((*uid, new_uid));
    }
    txn.put(ak, &account);
    if remove_source && !sources.is_empty() {
        let moved: Vec<Uid> = sources.iter().map(|(u, _)| *u).collect();
        expunge(txn, address, from, Some(&moved))?;
    }
    Ok(PartitionResponse::Copied {
        uid_validity: dst.uid_validity,
        pairs,
    })
}

/// What an address is in this partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Account(Account),
    Alias(Alias),
    Unknown,
}

/// Read-only view of a partition's data (reads are made linearizable by the raft layer).
pub struct PartitionView<'a> {
    pub(crate) tree: &'a sled::Tree,
}

impl PartitionView<'_> {
    fn get<T: DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>, StorageError> {
        self.tree
            .get(k)?
            .map(|v| codec::decode(&v))
            .transpose()
            .map_err(Into::into)
    }

    pub fn lookup(&self, address: &str) -> Result<Lookup, StorageError> {
        if let Some(a) = self.get(&key(ACCOUNT, &[address.as_bytes()]))? {
            return Ok(Lookup::Account(a));
        }
        if let Some(a) = self.get(&key(ALIAS, &[address.as_bytes()]))? {
            return Ok(Lookup::Alias(a));
        }
        Ok(Lookup::Unknown)
    }

    pub fn account(&self, address: &str) -> Result<Option<Account>, StorageError> {
        self.get(&key(ACCOUNT, &[address.as_bytes()]))
    }

    /// Accounts in this partition whose domain is `domain` (all when `None`).
    pub fn accounts(&self, domain: Option<&str>) -> Result<Vec<Account>, StorageError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([ACCOUNT]) {
            let a: Account = codec::decode(&item?.1)?;
            if domain.is_none_or(|d| domain_of(&a.address) == d) {
                out.push(a);
            }
        }
        Ok(out)
    }

    pub fn aliases(&self, domain: Option<&str>) -> Result<Vec<Alias>, StorageError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([ALIAS]) {
            let a: Alias = codec::decode(&item?.1)?;
            if domain.is_none_or(|d| domain_of(&a.address) == d) {
                out.push(a);
            }
        }
        Ok(out)
    }

    pub fn mailboxes(&self, address: &str) -> Result<Vec<Mailbox>, StorageError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(mailbox_key(address, "")) {
            out.push(codec::decode(&item?.1)?);
        }
        Ok(out)
    }

    pub fn mailbox(&self, address: &str, name: &str) -> Result<Option<Mailbox>, StorageError> {
        let Some(name) = normalize_mailbox_name(name) else {
            return Ok(None);
        };
        self.get(&mailbox_key(address, &name))
    }

    /// Up to `limit` messages of a mailbox with UID >= `from`, in UID order.
    pub fn messages(
        &self,
        mailbox_id: u64,
        from: Uid,
        limit: usize,
    ) -> Result<Vec<(Uid, MessageRecord)>, StorageError> {
        let prefix = key(MESSAGE, &[&mailbox_id.to_be_bytes()]);
        let start = message_key(mailbox_id, from);
        let mut out = Vec::new();
        for item in self.tree.range(start..) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            let uid = Uid(u32::from_be_bytes(k[9..13].try_into().expect("4-byte uid")));
            out.push((uid, codec::decode(&v)?));
        }
        Ok(out)
    }

    /// Up to `limit` messages of a mailbox whose MODSEQ is above `since` (new or changed), in
    /// UID order, and whether that is all of them.
    pub fn changed_since(
        &self,
        mailbox_id: u64,
        since: ModSeq,
        limit: usize,
    ) -> Result<(Vec<(Uid, MessageRecord)>, bool), StorageError> {
        let mut out = Vec::new();
        for item in self
            .tree
            .scan_prefix(key(MESSAGE, &[&mailbox_id.to_be_bytes()]))
        {
            let (k, v) = item?;
            let record: MessageRecord = codec::decode(&v)?;
            if record.modseq <= since || k.len() != 13 {
                continue;
            }
            if out.len() >= limit {
                return Ok((out, false));
            }
            out.push((
                Uid(u32::from_be_bytes(k[9..13].try_into().expect("4 bytes"))),
                record,
            ));
        }
        Ok((out, true))
    }

    /// UIDs expunged from a mailbox by an expunge with a MODSEQ above `since`, ascending, or
    /// `None` when the mailbox no longer remembers every expunge since then.
    pub fn vanished(
        &self,
        mailbox: &Mailbox,
        since: ModSeq,
    ) -> Result<Option<Vec<Uid>>, StorageError> {
        if since < mailbox.expunge_history_from {
            return Ok(None);
        }
        let prefix = key(EXPUNGED, &[&mailbox.id.to_be_bytes()]);
        let start = key(
            EXPUNGED,
            &[
                &mailbox.id.to_be_bytes(),
                &(since.0.saturating_add(1)).to_be_bytes(),
            ],
        );
        let mut out = Vec::new();
        for item in self.tree.range(start..) {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if let Some((_, uid)) = expunged_parts(&k) {
                out.push(uid);
            }
        }
        out.sort_unstable();
        Ok(Some(out))
    }

    pub fn body(&self, hash: BodyHash) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(chunk::get(self.tree, &key(BODY_CHUNKS, &[&hash.0]))?)
    }

    /// The start of a stored body: its stored pieces in order until `enough` says the bytes
    /// so far suffice (e.g. they hold the whole header), so a large message is not read whole.
    pub fn body_until(
        &self,
        hash: BodyHash,
        enough: impl FnMut(&[u8]) -> bool,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(chunk::get_until(
            self.tree,
            &key(BODY_CHUNKS, &[&hash.0]),
            enough,
        )?)
    }

    /// Number of distinct bodies stored (for dedup checks and metrics).
    pub fn body_count(&self) -> Result<usize, StorageError> {
        Ok(self.tree.scan_prefix([BODY_META]).count())
    }
}
