//! A raft group's state machine: which keyspace it owns, atomic apply, and streaming snapshots.
//!
//! Each group's state lives in its own sled tree, named with a generation number. Installing a
//! snapshot fills a fresh generation and then switches the pointer in one write, so a crash in
//! the middle leaves the old state intact. Snapshots are streamed record by record to and from
//! a file; a partition is never held in memory whole.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use crate::meta::{self, MetaCommand, MetaResponse, MetaView};
use crate::partition::{self, PartitionCommand, PartitionResponse, PartitionView, Txn};
use crate::{chunk, StorageError, Store};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Meta(MetaCommand),
    Partition(PartitionCommand),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// For entries that carry no command (blank and membership entries).
    Empty,
    Meta(MetaResponse),
    Partition(PartitionResponse),
    /// The command was meant for the other kind of group; nothing was changed.
    WrongGroup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupKind {
    Meta,
    Partition,
}

/// Key of the raft layer's applied-state record (applied log id and membership), written in
/// the same batch as every apply. The leading zero byte sorts it before every data key.
const RAFT_STATE: &[u8] = b"\0raft";
const GENERATIONS: &str = "sm-generation";
const SNAPSHOT_MAGIC: &[u8; 8] = b"MGSNAP01";
const SNAPSHOT_END: u32 = u32::MAX;
/// Records inserted per batch while installing a snapshot.
const INSTALL_BATCH_RECORDS: usize = 1024;

#[derive(Debug)]
pub struct GroupMachine {
    store: Store,
    group: u64,
    kind: GroupKind,
    /// Current generation's tree. Apply and reads take the read lock; installing a snapshot
    /// takes the write lock only for the moment of the switch.
    tree: RwLock<(u64, sled::Tree)>,
}

fn tree_name(group: u64, generation: u64) -> String {
    format!("sm/{group}/{generation}")
}

impl GroupMachine {
    pub fn open(store: &Store, group: u64, kind: GroupKind) -> Result<GroupMachine, StorageError> {
        let generations = store.tree(GENERATIONS)?;
        let generation = match generations.get(group.to_be_bytes())? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| StorageError::Corrupt(format!("generation of group {group}")))?,
            ),
            None => 0,
        };
        // Drop trees of other generations left by a crash during snapshot install.
        let prefix = format!("sm/{group}/");
        for name in store.tree_names() {
            if name.starts_with(&prefix) && name != tree_name(group, generation) {
                store.drop_tree(&name)?;
            }
        }
        let tree = store.tree(&tree_name(group, generation))?;
        Ok(GroupMachine {
            store: store.clone(),
            group,
            kind,
            tree: RwLock::new((generation, tree)),
        })
    }

    pub fn group(&self) -> u64 {
        self.group
    }

    pub fn kind(&self) -> GroupKind {
        self.kind
    }

    fn tree(&self) -> sled::Tree {
        self.tree.read().expect("machine lock poisoned").1.clone()
    }

    /// The raft layer's applied-state record, if anything was applied yet.
    pub fn raft_state(&self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.tree().get(RAFT_STATE)?.map(|v| v.to_vec()))
    }

    /// Applies one entry atomically with its applied-state record. `cmd` is `None` for entries
    /// without a command. Not durable by itself: the log is, and replay is deterministic.
    pub fn apply(
        &self,
        cmd: Option<&Command>,
        raft_state: &[u8],
    ) -> Result<Response, StorageError> {
        let tree = self.tree();
        let mut txn = Txn::new(&tree);
        let response = match (cmd, self.kind) {
            (None, _) => Response::Empty,
            (Some(Command::Meta(c)), GroupKind::Meta) => Response::Meta(meta::apply(&mut txn, c)?),
            (Some(Command::Partition(c)), GroupKind::Partition) => {
                Response::Partition(partition::apply(&mut txn, c)?)
            }
            (Some(_), _) => Response::WrongGroup,
        };
        txn.put_raw(RAFT_STATE.to_vec(), raft_state.to_vec());
        tree.apply_batch(txn.into_batch())?;
        Ok(response)
    }

    pub fn read_partition<T>(&self, f: impl FnOnce(&PartitionView<'_>) -> T) -> T {
        assert_eq!(self.kind, GroupKind::Partition);
        let tree = self.tree();
        f(&PartitionView { tree: &tree })
    }

    pub fn read_meta<T>(&self, f: impl FnOnce(&MetaView<'_>) -> T) -> T {
        assert_eq!(self.kind, GroupKind::Meta);
        let tree = self.tree();
        f(&MetaView { tree: &tree })
    }

    /// Digest of the data (not the raft bookkeeping), equal on replicas that applied the same
    /// commands. Used by tests and the chaos checker to compare replicas.
    pub fn digest(&self) -> Result<[u8; 32], StorageError> {
        let mut h = blake3::Hasher::new();
        for item in self.tree().iter() {
            let (k, v) = item?;
            if &k[..] == RAFT_STATE {
                continue;
            }
            h.update(&(k.len() as u32).to_be_bytes());
            h.update(&k);
            h.update(&(v.len() as u32).to_be_bytes());
            h.update(&v);
        }
        Ok(*h.finalize().as_bytes())
    }

    /// [`digest`](Self::digest) of one applied state: a digest read while an apply changed
    /// the tree is thrown away and read again (every apply rewrites the applied-state record).
    /// `None` when applies kept coming.
    pub fn stable_digest(&self) -> Result<Option<[u8; 32]>, StorageError> {
        for _ in 0..5 {
            let before = self.raft_state()?;
            let digest = self.digest()?;
            if self.raft_state()? == before {
                return Ok(Some(digest));
            }
        }
        Ok(None)
    }

    /// Writes a consistent snapshot of this group to `path` and fsyncs it. The caller must not
    /// apply concurrently (the raft layer calls this from the state machine's own task). The
    /// store is synced first so the state the snapshot covers is durable before logs are purged.
    pub fn export(&self, path: &Path) -> Result<u64, StorageError> {
        self.store.sync()?;
        write_snapshot(
            path,
            self.tree().iter().map(|r| r.map_err(StorageError::from)),
        )
    }

    /// Writes a snapshot file holding only `raft_state` (the applied log id and membership):
    /// what a witness gets instead of a partition's data, which it never keeps.
    pub fn export_state_only(raft_state: &[u8], path: &Path) -> Result<u64, StorageError> {
        let record = (
            sled::IVec::from(RAFT_STATE),
            sled::IVec::from(raft_state.to_vec()),
        );
        write_snapshot(path, std::iter::once(Ok(record)))
    }

    /// Reads the applied-state record stored inside a snapshot file, after checking the file.
    pub fn snapshot_raft_state(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
        let mut state = None;
        for_each_record(path, |k, v| {
            if k == RAFT_STATE {
                state = Some(v.to_vec());
            }
            Ok(())
        })?;
        Ok(state)
    }

    /// Replaces this group's state with the snapshot in `path` (checked in full first).
    pub fn install(&self, path: &Path) -> Result<(), StorageError> {
        self.install_records(path, false)
    }

    /// Like [`install`](Self::install), but keeps only the snapshot's applied-state record and
    /// drops every data record: how a witness takes a snapshot (it holds no mailbox state).
    pub fn install_state_only(&self, path: &Path) -> Result<(), StorageError> {
        self.install_records(path, true)
    }

    /// Drops every record (applied state included): this replica holds nothing, as if the
    /// group had just been created here. Durable on return.
    pub fn reset(&self) -> Result<(), StorageError> {
        let (generation, fresh) = self.fresh_generation()?;
        self.switch_to(generation, fresh)
    }

    /// The next generation's tree, emptied (a crash may have left one half written).
    fn fresh_generation(&self) -> Result<(u64, sled::Tree), StorageError> {
        let generation = self.tree.read().expect("machine lock poisoned").0 + 1;
        let fresh = self.store.tree(&tree_name(self.group, generation))?;
        fresh.clear()?;
        Ok((generation, fresh))
    }

    /// Makes `fresh` this group's state: one durable write of the generation pointer, then
    /// the old generation is dropped.
    fn switch_to(&self, generation: u64, fresh: sled::Tree) -> Result<(), StorageError> {
        self.store.sync()?;
        let generations = self.store.tree(GENERATIONS)?;
        generations.insert(self.group.to_be_bytes(), &generation.to_be_bytes())?;
        self.store.sync()?;
        let old = {
            let mut guard = self.tree.write().expect("machine lock poisoned");
            let old = guard.0;
            *guard = (generation, fresh);
            old
        };
        self.store.drop_tree(&tree_name(self.group, old))?;
        Ok(())
    }

    fn install_records(&self, path: &Path, state_only: bool) -> Result<(), StorageError> {
        for_each_record(path, |_, _| Ok(()))?;
        let (generation, fresh) = self.fresh_generation()?;
        let mut batch = sled::Batch::default();
        let mut pending = 0;
        for_each_record(path, |k, v| {
            if state_only && k != RAFT_STATE {
                return Ok(());
            }
            batch.insert(k, v);
            pending += 1;
            if pending == INSTALL_BATCH_RECORDS {
                fresh.apply_batch(std::mem::take(&mut batch))?;
                pending = 0;
            }
            Ok(())
        })?;
        fresh.apply_batch(batch)?;
        self.switch_to(generation, fresh)
    }
}

/// Writes `records` (sorted key, value pairs) as a snapshot file with its trailing digest and
/// fsyncs it. Returns the number of records.
fn write_snapshot(
    path: &Path,
    records: impl Iterator<Item = Result<(sled::IVec, sled::IVec), StorageError>>,
) -> Result<u64, StorageError> {
    let file = std::fs::File::create(path).map_err(|e| StorageError::io(path, e))?;
    let mut w = HashingWriter {
        inner: BufWriter::new(file),
        hash: blake3::Hasher::new(),
    };
    let io = |e| StorageError::io(path, e);
    w.write_all(SNAPSHOT_MAGIC).map_err(io)?;
    let mut count = 0u64;
    for item in records {
        let (k, v) = item?;
        assert!(v.len() <= chunk::CHUNK_BYTES_MAX && k.len() <= chunk::CHUNK_BYTES_MAX);
        w.write_all(&(k.len() as u32).to_be_bytes()).map_err(io)?;
        w.write_all(&k).map_err(io)?;
        w.write_all(&(v.len() as u32).to_be_bytes()).map_err(io)?;
        w.write_all(&v).map_err(io)?;
        count += 1;
    }
    w.write_all(&SNAPSHOT_END.to_be_bytes()).map_err(io)?;
    let digest = *w.hash.finalize().as_bytes();
    let mut inner = w.inner;
    inner.write_all(&digest).map_err(io)?;
    let file = inner.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(count)
}

struct HashingWriter<W: Write> {
    inner: W,
    hash: blake3::Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Streams the records of a snapshot file, verifying framing, limits and the trailing digest.
/// The callback runs before the digest is verified, so callers that change state must run a
/// verifying pass first.
fn for_each_record(
    path: &Path,
    mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    let bad = |what: &str| StorageError::Snapshot(format!("{}: {what}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| StorageError::io(path, e))?;
    let mut r = BufReader::new(file);
    let mut hash = blake3::Hasher::new();
    let read = |r: &mut BufReader<std::fs::File>, buf: &mut [u8], hash: &mut blake3::Hasher| {
        r.read_exact(buf).map_err(|_| bad("truncated"))?;
        hash.update(buf);
        Ok::<(), StorageError>(())
    };
    let mut magic = [0u8; 8];
    read(&mut r, &mut magic, &mut hash)?;
    if &magic != SNAPSHOT_MAGIC {
        return Err(bad("not a mailgrid snapshot"));
    }
    let (mut k, mut v) = (Vec::new(), Vec::new());
    loop {
        let mut len = [0u8; 4];
        read(&mut r, &mut len, &mut hash)?;
        let klen = u32::from_be_bytes(len);
        if klen == SNAPSHOT_END {
            break;
        }
        if klen as usize > chunk::CHUNK_BYTES_MAX {
            return Err(bad("key too long"));
        }
        k.resize(klen as usize, 0);
        read(&mut r, &mut k, &mut hash)?;
        read(&mut r, &mut len, &mut hash)?;
        let vlen = u32::from_be_bytes(len) as usize;
        if vlen > chunk::CHUNK_BYTES_MAX {
            return Err(bad("value too long"));
        }
        v.resize(vlen, 0);
        read(&mut r, &mut v, &mut hash)?;
        f(&k, &v)?;
    }
    let mut digest = [0u8; 32];
    r.read_exact(&mut digest)
        .map_err(|_| bad("truncated digest"))?;
    if digest != *hash.finalize().as_bytes() {
        return Err(bad("digest mismatch"));
    }
    let mut rest = [0u8; 1];
    if r.read(&mut rest).map_err(|e| StorageError::io(path, e))? != 0 {
        return Err(bad("trailing bytes"));
    }
    Ok(())
}

impl std::fmt::Display for Command {
    /// A short description for logs: never the message body or a password hash.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use PartitionCommand as P;
        match self {
            Command::Meta(m) => write!(f, "meta {m:?}"),
            Command::Partition(P::Deliver {
                recipients, body, ..
            }) => {
                write!(
                    f,
                    "deliver {} bytes to {} recipients",
                    body.len(),
                    recipients.len()
                )
            }
            Command::Partition(P::Append {
                address,
                mailbox,
                body,
                ..
            }) => {
                write!(f, "append {} bytes to {address} {mailbox}", body.len())
            }
            Command::Partition(P::CreateAccount { address, .. }) => {
                write!(f, "create account {address}")
            }
            Command::Partition(P::SetPassword { address, .. }) => {
                write!(f, "set password of {address}")
            }
            Command::Partition(other) => write!(f, "{other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::{
        FlagOp, MailError, QueueAction, QueueEntry, QueueRecipient, Quota, RecipientOutcome,
        RecipientState,
    };
    use crate::types::BodyHash;
    use crate::types::{ModSeq, Uid};

    fn partition(dir: &Path) -> (Store, GroupMachine) {
        let store = Store::open(dir, true).unwrap();
        let m = GroupMachine::open(&store, 1, GroupKind::Partition).unwrap();
        (store, m)
    }

    fn apply(m: &GroupMachine, index: u64, cmd: PartitionCommand) -> PartitionResponse {
        match m
            .apply(Some(&Command::Partition(cmd)), &index.to_be_bytes())
            .unwrap()
        {
            Response::Partition(r) => r,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn the_cluster_format_starts_at_one_goes_up_and_never_down() {
        // Goal: a cluster without a format record is at format 1 (release 0.1.0);
        // SetClusterFormat raises it, and a lower one is refused, the same on every replica.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), true).unwrap();
        let m = GroupMachine::open(&store, 0, GroupKind::Meta).unwrap();
        let meta = |index: u64, cmd: meta::MetaCommand| match m
            .apply(Some(&Command::Meta(cmd)), &index.to_be_bytes())
            .unwrap()
        {
            Response::Meta(r) => r,
            other => panic!("unexpected {other:?}"),
        };
        let info = meta::ClusterInfo {
            cluster_id: "c".into(),
            partitions: 1,
            replicas: 1,
            created: 0,
        };
        let node = meta::NodeRecord {
            id: 1,
            cluster_addr: "127.0.0.1:1".into(),
            listeners: Default::default(),
            joined: 0,
        };
        meta(1, meta::MetaCommand::Init { info, node });
        let format = || m.read_meta(|v| v.cluster_format()).unwrap();
        assert_eq!(format(), crate::version::FORMAT_INITIAL);
        assert_eq!(
            meta(2, meta::MetaCommand::SetClusterFormat(2)),
            meta::MetaResponse::Done
        );
        assert_eq!(format(), 2);
        assert_eq!(
            meta(3, meta::MetaCommand::SetClusterFormat(1)),
            meta::MetaResponse::Refused(meta::MetaError::FormatDown {
                active: 2,
                asked: 1
            })
        );
        assert_eq!(format(), 2);
    }

    fn account(address: &str, quota: Quota) -> PartitionCommand {
        PartitionCommand::CreateAccount {
            address: address.into(),
            password_hash: "x".into(),
            quota,
            now: 1000,
        }
    }

    fn deliver(key: u8, to: &[&str], body: &[u8]) -> PartitionCommand {
        PartitionCommand::Deliver {
            key: [key; 32],
            recipients: to.iter().map(|s| s.to_string()).collect(),
            body: body.to_vec(),
            internal_date: 1000,
            now: 1000,
        }
    }

    #[test]
    fn retry_with_other_recipients_gives_each_mailbox_one_copy() {
        // Goal: delivery keys are per (message, recipient): a retry naming more recipients
        // stores the message only for the new ones; a refusal is not remembered, so a retry
        // after room is made succeeds.
        let dir = tempfile::tempdir().unwrap();
        let (_store, m) = partition(dir.path());
        apply(&m, 1, account("a@x.test", Quota::default()));
        let tight = Quota {
            bytes: 0,
            messages: 1,
        };
        apply(&m, 2, account("b@x.test", tight));
        apply(&m, 3, deliver(9, &["b@x.test"], b"filler"));
        let first = apply(&m, 4, deliver(7, &["a@x.test", "b@x.test"], b"msg"));
        let PartitionResponse::Delivered(o) = first else {
            panic!()
        };
        assert!(matches!(
            o[0].1,
            RecipientOutcome::Delivered { uid: Uid(1), .. }
        ));
        assert_eq!(o[1].1, RecipientOutcome::OverQuota);
        let cmd = PartitionCommand::Expunge {
            address: "b@x.test".into(),
            mailbox: "INBOX".into(),
            uids: Some(vec![Uid(1)]),
        };
        apply(&m, 5, cmd);
        let retry = apply(&m, 6, deliver(7, &["b@x.test", "a@x.test"], b"msg"));
        let PartitionResponse::Delivered(o) = retry else {
            panic!()
        };
        assert!(matches!(
            o[0].1,
            RecipientOutcome::Delivered { uid: Uid(2), .. }
        ));
        assert!(matches!(
            o[1].1,
            RecipientOutcome::Delivered { uid: Uid(1), .. }
        ));
        let inbox = m.read_partition(|p| p.mailbox("a@x.test", "INBOX").unwrap().unwrap());
        assert_eq!(inbox.messages, 1);
    }

    #[test]
    fn maildrop_lock_is_exclusive_until_released_or_expired() {
        // Goal: one holder at a time; renewal by the holder; release; expiry by lease.
        let dir = tempfile::tempdir().unwrap();
        let (_store, m) = partition(dir.path());
        apply(&m, 1, account("a@x.test", Quota::default()));
        let lock = |holder: u8, now: i64| PartitionCommand::LockMaildrop {
            address: "a@x.test".into(),
            holder: [holder; 16],
            now,
            lease_seconds: 30,
        };
        let in_use = PartitionResponse::Refused(MailError::InUse);
        assert_eq!(apply(&m, 2, lock(1, 100)), PartitionResponse::Done);
        assert_eq!(apply(&m, 3, lock(2, 110)), in_use);
        assert_eq!(apply(&m, 4, lock(1, 125)), PartitionResponse::Done);
        assert_eq!(apply(&m, 5, lock(2, 150)), in_use);
        assert_eq!(apply(&m, 6, lock(2, 156)), PartitionResponse::Done);
        let unlock = PartitionCommand::UnlockMaildrop {
            address: "a@x.test".into(),
            holder: [1; 16],
        };
        assert_eq!(apply(&m, 7, unlock), PartitionResponse::Done);
        assert_eq!(apply(&m, 8, lock(1, 160)), in_use);
        let unlock = PartitionCommand::UnlockMaildrop {
            address: "a@x.test".into(),
            holder: [2; 16],
        };
        apply(&m, 9, unlock);
        assert_eq!(apply(&m, 10, lock(1, 161)), PartitionResponse::Done);
        let nobody = PartitionCommand::LockMaildrop {
            address: "nobody@x.test".into(),
            holder: [1; 16],
            now: 1,
            lease_seconds: 30,
        };
        let no_account = PartitionResponse::Refused(MailError::NoSuchAccount);
        assert_eq!(apply(&m, 11, nobody), no_account);
    }

    #[test]
    fn delivery_is_idempotent_deduplicated_and_quota_checked() {
        // Goal: a repeated delivery key stores nothing new; identical bodies are stored once;
        // a recipient over quota is refused while others get the message; UIDs increase.
        let dir = tempfile::tempdir().unwrap();
        let (_store, m) = partition(dir.path());
        apply(&m, 1, account("a@x.test", Quota::default()));
        apply(
            &m,
            2,
            account(
                "b@x.test",
                Quota {
                    bytes: 10,
                    messages: 0,
                },
            ),
        );
        let first = apply(
            &m,
            3,
            deliver(
                1,
                &["a@x.test", "b@x.test", "nobody@x.test"],
                b"hello world, long body",
            ),
        );
        let PartitionResponse::Delivered(outcome) = &first else {
            panic!("{first:?}")
        };
        assert!(matches!(
            outcome[0].1,
            RecipientOutcome::Delivered { uid: Uid(1), .. }
        ));
        assert_eq!(outcome[1].1, RecipientOutcome::OverQuota);
        assert_eq!(outcome[2].1, RecipientOutcome::NoSuchAccount);
        assert_eq!(
            apply(
                &m,
                4,
                deliver(
                    1,
                    &["a@x.test", "b@x.test", "nobody@x.test"],
                    b"hello world, long body"
                )
            ),
            first
        );
        let again = apply(&m, 5, deliver(2, &["a@x.test"], b"hello world, long body"));
        let PartitionResponse::Delivered(o) = again else {
            panic!()
        };
        assert!(matches!(
            o[0].1,
            RecipientOutcome::Delivered { uid: Uid(2), .. }
        ));
        m.read_partition(|p| {
            assert_eq!(
                p.body_count().unwrap(),
                1,
                "identical bodies are stored once"
            );
            let a = p.account("a@x.test").unwrap().unwrap();
            assert_eq!((a.usage.messages, a.usage.bytes), (2, 44));
            let inbox = p.mailbox("a@x.test", "inbox").unwrap().unwrap();
            let msgs = p.messages(inbox.id, Uid(1), 100).unwrap();
            assert_eq!(
                msgs.iter().map(|(u, _)| u.0).collect::<Vec<_>>(),
                vec![1, 2]
            );
        });
    }

    #[test]
    fn expunge_frees_quota_and_bodies_and_uids_are_not_reused() {
        // Goal: deleting frees quota and body storage at once; new mail never reuses a UID.
        let dir = tempfile::tempdir().unwrap();
        let (_store, m) = partition(dir.path());
        apply(
            &m,
            1,
            account(
                "a@x.test",
                Quota {
                    bytes: 0,
                    messages: 1,
                },
            ),
        );
        apply(&m, 2, deliver(1, &["a@x.test"], b"one"));
        let full = apply(&m, 3, deliver(2, &["a@x.test"], b"two"));
        assert_eq!(
            full,
            PartitionResponse::Delivered(vec![("a@x.test".into(), RecipientOutcome::OverQuota)])
        );
        let store = PartitionCommand::StoreFlags {
            address: "a@x.test".into(),
            mailbox: "INBOX".into(),
            uids: vec![Uid(1)],
            op: FlagOp::Add,
            flags: vec!["\\Deleted".into()],
            unchanged_since: None,
        };
        assert!(matches!(
            apply(&m, 4, store),
            PartitionResponse::Flags { .. }
        ));
        let expunged = apply(
            &m,
            5,
            PartitionCommand::Expunge {
                address: "a@x.test".into(),
                mailbox: "INBOX".into(),
                uids: None,
            },
        );
        assert_eq!(expunged, PartitionResponse::Expunged(vec![Uid(1)]));
        m.read_partition(|p| assert_eq!(p.body_count().unwrap(), 0));
        let PartitionResponse::Delivered(o) = apply(&m, 6, deliver(3, &["a@x.test"], b"three"))
        else {
            panic!()
        };
        assert!(
            matches!(o[0].1, RecipientOutcome::Delivered { uid: Uid(2), .. }),
            "{o:?}"
        );
        let bad = apply(
            &m,
            7,
            PartitionCommand::CreateMailbox {
                address: "a@x.test".into(),
                name: "a\u{1}".into(),
                now: 1,
            },
        );
        assert_eq!(
            bad,
            PartitionResponse::Refused(MailError::InvalidMailboxName)
        );
    }

    #[test]
    fn imap_state_recent_claims_conditional_store_and_vanished() {
        // Goal: \Recent is claimed by exactly one caller per message; UNCHANGEDSINCE leaves a
        // message changed after it alone; expunged UIDs are remembered with their MODSEQ.
        let dir = tempfile::tempdir().unwrap();
        let (_store, m) = partition(dir.path());
        apply(&m, 1, account("a@x.test", Quota::default()));
        apply(&m, 2, deliver(1, &["a@x.test"], b"one"));
        apply(&m, 3, deliver(2, &["a@x.test"], b"two"));
        let claim = || PartitionCommand::ClaimRecent {
            address: "a@x.test".into(),
            mailbox: "INBOX".into(),
        };
        let recent = |from, to| PartitionResponse::Recent {
            from: Uid(from),
            to: Uid(to),
        };
        assert_eq!(apply(&m, 4, claim()), recent(1, 3));
        assert_eq!(apply(&m, 5, claim()), recent(3, 3));
        let store = |uids: Vec<u32>, since: Option<u64>| PartitionCommand::StoreFlags {
            address: "a@x.test".into(),
            mailbox: "INBOX".into(),
            uids: uids.into_iter().map(Uid).collect(),
            op: FlagOp::Add,
            flags: vec!["\\Seen".into()],
            unchanged_since: since.map(ModSeq),
        };
        let PartitionResponse::Flags { stored, conflicts } = apply(&m, 6, store(vec![1], None))
        else {
            panic!()
        };
        assert!(conflicts.is_empty());
        let seen_modseq = stored[0].1;
        // Message 1 changed at `seen_modseq`; a store conditional on an older value skips it.
        let PartitionResponse::Flags { stored, conflicts } =
            apply(&m, 7, store(vec![1, 2], Some(seen_modseq.0 - 1)))
        else {
            panic!()
        };
        assert_eq!(conflicts, vec![Uid(1)]);
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].0, Uid(2));
        let before = m.read_partition(|p| p.mailbox("a@x.test", "INBOX").unwrap().unwrap());
        apply(
            &m,
            8,
            PartitionCommand::Expunge {
                address: "a@x.test".into(),
                mailbox: "INBOX".into(),
                uids: Some(vec![Uid(2)]),
            },
        );
        m.read_partition(|p| {
            let after = p.mailbox("a@x.test", "INBOX").unwrap().unwrap();
            assert!(after.highest_modseq > before.highest_modseq);
            assert_eq!(
                p.vanished(&after, before.highest_modseq).unwrap(),
                Some(vec![Uid(2)])
            );
            assert_eq!(
                p.vanished(&after, after.highest_modseq).unwrap(),
                Some(vec![])
            );
        });
    }

    fn append(body: &[u8]) -> PartitionCommand {
        PartitionCommand::Append {
            address: "a@x.test".into(),
            mailbox: "INBOX".into(),
            body: body.to_vec(),
            flags: vec![],
            internal_date: 1000,
        }
    }

    fn expunge(uids: impl IntoIterator<Item = u32>) -> PartitionCommand {
        PartitionCommand::Expunge {
            address: "a@x.test".into(),
            mailbox: "INBOX".into(),
            uids: Some(uids.into_iter().map(Uid).collect()),
        }
    }

    #[test]
    fn expunge_history_is_bounded_and_says_when_it_forgot() {
        // Goal: a mailbox keeps at most EXPUNGE_HISTORY_MAX expunge records, drops the oldest
        // first, and answers "forgotten" (None) for a MODSEQ older than what it still knows.
        use crate::partition::EXPUNGE_HISTORY_MAX;
        let dir = tempfile::tempdir().unwrap();
        let (_store, m) = partition(dir.path());
        apply(&m, 1, account("a@x.test", Quota::default()));
        let total = EXPUNGE_HISTORY_MAX as u32 + 10;
        let mut index = 2;
        for i in 0..total {
            apply(&m, index, append(format!("m{i}").as_bytes()));
            index += 1;
        }
        let mailbox = || m.read_partition(|p| p.mailbox("a@x.test", "INBOX").unwrap().unwrap());
        let start = mailbox().highest_modseq;
        // One expunge per message: MODSEQs start+1 ..= start+total.
        for uid in 1..=total {
            apply(&m, index, expunge([uid]));
            index += 1;
        }
        let mb = mailbox();
        assert_eq!(mb.expunge_records, EXPUNGE_HISTORY_MAX);
        assert_eq!(mb.expunge_history_from, ModSeq(start.0 + 10));
        m.read_partition(|p| {
            assert_eq!(p.vanished(&mb, start).unwrap(), None);
            assert_eq!(p.vanished(&mb, ModSeq(start.0 + 9)).unwrap(), None);
            let recent = p.vanished(&mb, ModSeq(start.0 + 10)).unwrap().unwrap();
            assert_eq!(recent, (11..=total).map(Uid).collect::<Vec<_>>());
            let last = p.vanished(&mb, ModSeq(mb.highest_modseq.0 - 1)).unwrap();
            assert_eq!(last, Some(vec![Uid(total)]));
        });
        // One expunge larger than the whole history keeps none and moves the floor to itself.
        let first_uid = mb.uid_next.0;
        for i in 0..total {
            apply(&m, index, append(format!("n{i}").as_bytes()));
            index += 1;
        }
        apply(&m, index, expunge(first_uid..first_uid + total));
        let mb = mailbox();
        assert_eq!(mb.messages, 0);
        assert_eq!(mb.expunge_records, 0);
        assert_eq!(mb.expunge_history_from, mb.highest_modseq);
        m.read_partition(|p| {
            assert_eq!(
                p.vanished(&mb, ModSeq(mb.highest_modseq.0 - 1)).unwrap(),
                None
            );
            assert_eq!(p.vanished(&mb, mb.highest_modseq).unwrap(), Some(vec![]));
        });
    }

    #[test]
    fn once_applies_a_command_a_single_time_per_key() {
        // Goal: a repeated `Once` (a retry after an unknown outcome) answers the first
        // response and stores nothing more; another key applies again; a key is forgotten
        // after its retention; nesting is refused.
        use crate::partition::ONCE_KEY_RETENTION_SECONDS;
        let dir = tempfile::tempdir().unwrap();
        let (_store, m) = partition(dir.path());
        apply(&m, 1, account("a@x.test", Quota::default()));
        let once = |key: u8, now: i64| PartitionCommand::Once {
            key: [key; 32],
            now,
            command: Box::new(append(b"hello")),
        };
        let first = apply(&m, 2, once(1, 1000));
        assert_eq!(apply(&m, 3, once(1, 1001)), first);
        let messages =
            || m.read_partition(|p| p.mailbox("a@x.test", "INBOX").unwrap().unwrap().messages);
        assert_eq!(messages(), 1);
        assert_ne!(apply(&m, 4, once(2, 1002)), first);
        assert_eq!(messages(), 2);
        // Key 1 expires once a later command's time is past its retention.
        apply(&m, 5, once(3, 1000 + ONCE_KEY_RETENTION_SECONDS + 1));
        assert_eq!(messages(), 3);
        assert_ne!(
            apply(&m, 6, once(1, 1000 + ONCE_KEY_RETENTION_SECONDS + 2)),
            first
        );
        assert_eq!(messages(), 4);
        let nested = PartitionCommand::Once {
            key: [9; 32],
            now: 1000,
            command: Box::new(once(8, 1000)),
        };
        assert_eq!(
            apply(&m, 7, nested),
            PartitionResponse::Refused(MailError::NotAllowed)
        );
        assert_eq!(messages(), 4);
    }

    #[test]
    fn snapshot_round_trip_reproduces_state_and_rejects_corruption() {
        // Goal: export → install on another store gives the same digest and applied state;
        // a corrupted snapshot file is refused and leaves the target untouched.
        let dir = tempfile::tempdir().unwrap();
        let (_store, m) = partition(&dir.path().join("a"));
        apply(&m, 1, account("a@x.test", Quota::default()));
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        apply(&m, 2, deliver(1, &["a@x.test"], &big));
        let snap = dir.path().join("snap");
        m.export(&snap).unwrap();
        let (_store2, target) = partition(&dir.path().join("b"));
        let mut corrupt = std::fs::read(&snap).unwrap();
        let mid = corrupt.len() / 2;
        corrupt[mid] ^= 0xff;
        let bad = dir.path().join("bad");
        std::fs::write(&bad, &corrupt).unwrap();
        assert!(target.install(&bad).is_err());
        assert_eq!(target.raft_state().unwrap(), None);
        target.install(&snap).unwrap();
        assert_eq!(target.digest().unwrap(), m.digest().unwrap());
        assert_eq!(
            target.raft_state().unwrap(),
            Some(2u64.to_be_bytes().to_vec())
        );
        target.read_partition(|p| {
            let inbox = p.mailbox("a@x.test", "INBOX").unwrap().unwrap();
            let (_, rec) = p.messages(inbox.id, Uid(1), 1).unwrap().remove(0);
            assert_eq!(p.body(rec.body).unwrap().unwrap(), big);
        });
    }

    #[test]
    fn a_witness_takes_only_the_applied_state_from_a_snapshot() {
        // Goal: a state-only install (and a state-only snapshot file) carries the applied log
        // id and membership but no mailbox record, and replaces data a witness held.
        let dir = tempfile::tempdir().unwrap();
        let (_store, m) = partition(&dir.path().join("a"));
        apply(&m, 1, account("a@x.test", Quota::default()));
        apply(&m, 2, deliver(1, &["a@x.test"], b"not for witnesses"));
        let snap = dir.path().join("snap");
        m.export(&snap).unwrap();
        let (_store2, witness) = partition(&dir.path().join("b"));
        let (_store3, empty) = partition(&dir.path().join("c"));
        apply(&witness, 1, account("stale@x.test", Quota::default()));
        witness.install_state_only(&snap).unwrap();
        assert_eq!(witness.raft_state().unwrap(), m.raft_state().unwrap());
        assert_eq!(witness.digest().unwrap(), empty.digest().unwrap());
        assert_ne!(witness.digest().unwrap(), m.digest().unwrap());
        let stub = dir.path().join("stub");
        let state = m.raft_state().unwrap().unwrap();
        assert_eq!(GroupMachine::export_state_only(&state, &stub).unwrap(), 1);
        assert_eq!(
            GroupMachine::snapshot_raft_state(&stub).unwrap(),
            Some(state)
        );
        assert!(std::fs::metadata(&stub).unwrap().len() < 200);
    }

    #[test]
    fn state_survives_drop_and_reopen() {
        // Goal: applied state is read back unchanged after the database is closed and reopened.
        let dir = tempfile::tempdir().unwrap();
        let digest = {
            let (store, m) = partition(dir.path());
            apply(&m, 1, account("a@x.test", Quota::default()));
            apply(&m, 2, deliver(1, &["a@x.test"], b"persist me"));
            store.sync().unwrap();
            m.digest().unwrap()
        };
        let (_store, m) = partition(dir.path());
        assert_eq!(m.digest().unwrap(), digest);
        assert_eq!(m.raft_state().unwrap(), Some(2u64.to_be_bytes().to_vec()));
    }

    fn queued(id: u8, sender: &str, to: &[&str], at: i64) -> QueueEntry {
        QueueEntry {
            id: [id; 16],
            sender: sender.into(),
            recipients: to
                .iter()
                .map(|a| QueueRecipient {
                    address: a.to_string(),
                    state: RecipientState::Pending,
                    reply: None,
                })
                .collect(),
            body: BodyHash([0; 32]),
            size: 0,
            created: at,
            next_attempt: at,
            attempts: 0,
            held: false,
            last_error: None,
        }
    }

    #[test]
    fn queue_entries_live_until_every_recipient_is_settled_and_reported() {
        // Goal: an entry is stored once per id with its body, is due by time, takes each
        // attempt's outcomes per recipient, stays (for the bounce) while a failure is
        // unreported, and leaves no body behind once removed; held entries are never due.
        use crate::partition::queue::AttemptOutcome as O;
        let dir = tempfile::tempdir().unwrap();
        let (_store, m) = partition(dir.path());
        let empty = m.digest().unwrap();
        let entry = queued(7, "a@x.test", &["r1@far.test", "r2@far.test"], 100);
        let enqueue = || PartitionCommand::Enqueue {
            entry: entry.clone(),
            body: b"outbound body".to_vec(),
        };
        assert_eq!(apply(&m, 1, enqueue()), PartitionResponse::Done);
        let once = m.digest().unwrap();
        assert_eq!(apply(&m, 2, enqueue()), PartitionResponse::Done);
        assert_eq!(
            m.digest().unwrap(),
            once,
            "a repeated enqueue changed state"
        );
        m.read_partition(|p| {
            assert!(p.queue_due(99, 10).unwrap().is_empty());
            assert_eq!(p.queue_due(100, 10).unwrap(), vec![[7; 16]]);
            assert_eq!(p.queue_summary().unwrap(), (1, Some(100)));
            let stored = p.queue_entry(&[7; 16]).unwrap().unwrap();
            assert_eq!(p.body(stored.body).unwrap().unwrap(), b"outbound body");
        });
        let attempt = |outcomes: Vec<(&str, O)>, next| PartitionCommand::QueueAttempted {
            id: [7; 16],
            outcomes: outcomes
                .into_iter()
                .map(|(a, o)| (a.to_string(), o))
                .collect(),
            error: None,
            next_attempt: next,
        };
        apply(
            &m,
            3,
            attempt(
                vec![
                    ("r1@far.test", O::Delivered("250 ok".into())),
                    ("r2@far.test", O::Deferred("451 later".into())),
                ],
                400,
            ),
        );
        m.read_partition(|p| {
            assert!(
                p.queue_due(399, 10).unwrap().is_empty(),
                "old due time kept"
            );
            assert_eq!(p.queue_due(400, 10).unwrap(), vec![[7; 16]]);
            let e = p.queue_entry(&[7; 16]).unwrap().unwrap();
            assert_eq!(e.attempts, 1);
            assert_eq!(e.pending().count(), 1);
        });
        let hold = PartitionCommand::QueueControl {
            id: [7; 16],
            action: QueueAction::Hold,
        };
        apply(&m, 4, hold);
        m.read_partition(|p| assert!(p.queue_due(i64::MAX, 10).unwrap().is_empty()));
        let retry = PartitionCommand::QueueControl {
            id: [7; 16],
            action: QueueAction::RetryAt(500),
        };
        apply(&m, 5, retry);
        m.read_partition(|p| assert_eq!(p.queue_due(500, 10).unwrap(), vec![[7; 16]]));
        // A late outcome for the delivered recipient does not undo it; the failure stays
        // until the bounce is sent.
        apply(
            &m,
            6,
            attempt(
                vec![
                    ("r1@far.test", O::Failed("550 late".into())),
                    ("r2@far.test", O::Failed("550 no such user".into())),
                ],
                600,
            ),
        );
        m.read_partition(|p| {
            let e = p.queue_entry(&[7; 16]).unwrap().unwrap();
            assert!(e.is_final());
            let failed: Vec<_> = e.failed().map(|r| r.address.as_str()).collect();
            assert_eq!(failed, ["r2@far.test"]);
        });
        let remove = PartitionCommand::QueueRemove { id: [7; 16] };
        assert_eq!(apply(&m, 7, remove.clone()), PartitionResponse::Done);
        assert_eq!(
            apply(&m, 8, remove),
            PartitionResponse::Refused(MailError::NoSuchEntry)
        );
        m.read_partition(|p| {
            assert_eq!(p.queue_summary().unwrap(), (0, None));
            assert_eq!(p.body_count().unwrap(), 0);
        });
        assert_eq!(
            m.digest().unwrap(),
            empty,
            "the removed entry left something behind"
        );
    }

    #[test]
    fn a_bounce_or_a_fully_delivered_entry_leaves_the_queue_at_once() {
        // Goal: nothing waits for a report nobody gets: a null-sender entry whose recipient
        // failed, and an entry whose recipients were all delivered, are removed by the attempt.
        use crate::partition::queue::AttemptOutcome as O;
        let dir = tempfile::tempdir().unwrap();
        let (_store, m) = partition(dir.path());
        for (i, (sender, outcome)) in [
            ("", O::Failed("550 gone".into())),
            ("a@x.test", O::Delivered("250 ok".into())),
        ]
        .into_iter()
        .enumerate()
        {
            let id = [i as u8; 16];
            let entry = queued(i as u8, sender, &["r@far.test"], 100);
            let index = 10 * i as u64;
            apply(
                &m,
                index + 1,
                PartitionCommand::Enqueue {
                    entry,
                    body: vec![b'x'; 10 + i],
                },
            );
            let cmd = PartitionCommand::QueueAttempted {
                id,
                outcomes: vec![("r@far.test".into(), outcome)],
                error: None,
                next_attempt: 200,
            };
            apply(&m, index + 2, cmd);
            m.read_partition(|p| assert_eq!(p.queue_entry(&id).unwrap(), None));
        }
        m.read_partition(|p| assert_eq!(p.body_count().unwrap(), 0));
    }
}
