//! openraft storage adapters over the `storage` crate: the log store (durable appends through
//! the node-wide group-commit syncer) and the state machine (atomic apply, file snapshots).

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::type_config::alias::SnapshotOf;
use openraft::{
    EntryPayload, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot,
};
use storage::codec;
use storage::log::{COMMITTED, FLOOR, PURGED, RESETTING, VOTE};
use storage::machine::GroupKind;
use storage::{GroupLog, GroupMachine};

use crate::types::*;

fn to_io(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

#[derive(Clone, Debug)]
pub struct LogStore {
    log: GroupLog,
}

impl LogStore {
    pub fn new(log: GroupLog) -> LogStore {
        LogStore { log }
    }

    fn decode_mark<T: serde::de::DeserializeOwned>(&self, name: &str) -> io::Result<Option<T>> {
        match self.log.mark(name).map_err(to_io)? {
            Some(bytes) => Ok(Some(codec::decode(&bytes).map_err(to_io)?)),
            None => Ok(None),
        }
    }

    /// Waits until everything written so far is durable (shares the node's group commit).
    async fn synced(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.log.store().sync_then(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.await.map_err(to_io)?.map_err(io::Error::other)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e,
            Bound::Excluded(&0) => return Ok(Vec::new()),
            Bound::Excluded(&e) => e - 1,
            Bound::Unbounded => u64::MAX,
        };
        let raw = self.log.read(start..=end).map_err(to_io)?;
        raw.iter()
            .map(|(index, bytes)| {
                let entry: Entry = codec::decode(bytes).map_err(to_io)?;
                assert_eq!(
                    entry.index(),
                    *index,
                    "log entry stored under the wrong index"
                );
                Ok(entry)
            })
            .collect()
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.decode_mark(VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let purged: Option<LogId> = self.decode_mark(PURGED)?;
        let last = match self.log.last().map_err(to_io)? {
            Some((_, bytes)) => Some(codec::decode::<Entry>(&bytes).map_err(to_io)?.log_id()),
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        self.log
            .set_mark(VOTE, &codec::encode(vote))
            .map_err(to_io)?;
        self.synced().await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        // Not synced on its own: it rides along with the next append's sync, and openraft
        // tolerates a committed mark that lags after a crash.
        self.log
            .set_mark(COMMITTED, &codec::encode(&committed))
            .map_err(to_io)
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        Ok(self.decode_mark::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| (e.index(), codec::encode(&e)))
            .collect();
        self.log
            .append(encoded.iter().map(|(i, b)| (*i, &b[..])))
            .map_err(to_io)?;
        // Durable once the shared syncer's next flush + fdatasync completes.
        self.log.store().sync_then(Box::new(move |r| {
            callback.io_completed(r.map_err(io::Error::other))
        }));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        self.log.truncate_from(from).map_err(to_io)
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        self.log
            .set_mark(PURGED, &codec::encode(&log_id))
            .map_err(to_io)?;
        self.log.purge_upto(log_id.index()).map_err(to_io)
    }
}

/// The last log id a group's log holds (its last entry, else where it was purged up to).
fn last_log_id(log: &GroupLog) -> io::Result<Option<LogId>> {
    match log.last().map_err(to_io)? {
        Some((_, bytes)) => Ok(Some(
            codec::decode::<Entry>(&bytes).map_err(to_io)?.log_id(),
        )),
        None => match log.mark(PURGED).map_err(to_io)? {
            Some(bytes) => codec::decode(&bytes).map_err(to_io),
            None => Ok(None),
        },
    }
}

/// The floor of a replica whose data was dropped (see [`drop_replica`]), if it ever was.
pub fn floor(log: &GroupLog) -> io::Result<Option<LogId>> {
    match log.mark(FLOOR).map_err(to_io)? {
        Some(bytes) => Ok(Some(codec::decode::<LogId>(&bytes).map_err(to_io)?)),
        None => Ok(None),
    }
}

/// Whether a drop of this replica's data was interrupted (finish it with [`finish_drop`]
/// before the group's core opens).
pub fn drop_interrupted(log: &GroupLog) -> io::Result<bool> {
    Ok(log.mark(RESETTING).map_err(to_io)?.is_some())
}

/// Drops this node's copy of a group it has left: log, state and snapshot files. What its
/// votes depend on stays: the vote (so no term is voted in twice) and a floor, the last log
/// id it held (or an earlier, higher floor). A candidate whose log is behind the floor gets no
/// vote from it (see `raft::host`): every legitimate candidate holds the membership change
/// that removed this replica, which is past anything the replica held, so the replica votes
/// as its old log would have. Call with the group's core shut down. Crash-safe: the
/// `RESETTING` mark is durable before anything is removed, and [`finish_drop`] redoes it.
pub fn drop_replica(
    log: &GroupLog,
    machine: &GroupMachine,
    snapshot_dir: &Path,
) -> io::Result<Option<LogId>> {
    let floor = last_log_id(log)?.max(floor(log)?);
    if let Some(f) = &floor {
        log.set_mark(FLOOR, &codec::encode(f)).map_err(to_io)?;
    }
    log.set_mark(RESETTING, b"1").map_err(to_io)?;
    log.store().sync().map_err(to_io)?;
    finish_drop(log, machine, snapshot_dir)?;
    Ok(floor)
}

/// The removal half of [`drop_replica`]; idempotent.
pub fn finish_drop(log: &GroupLog, machine: &GroupMachine, snapshot_dir: &Path) -> io::Result<()> {
    machine.reset().map_err(to_io)?;
    match std::fs::remove_dir_all(snapshot_dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    log.clear().map_err(to_io)?;
    log.remove_mark(RESETTING).map_err(to_io)?;
    log.store().sync().map_err(to_io)
}

/// The applied-state record stored atomically with every apply.
type AppliedState = (Option<LogId>, StoredMembership);

/// A snapshot on disk, streamed by the transport and installed from the file.
#[derive(Debug)]
pub struct SnapshotFile {
    pub path: PathBuf,
}

/// The state machine of one group. Cheap to clone; openraft owns one clone, readers another.
#[derive(Clone, Debug)]
pub struct StateMachine {
    machine: Arc<GroupMachine>,
    snapshot_dir: PathBuf,
    /// The newest snapshot file and its meta, if any.
    current: Arc<Mutex<Option<(SnapshotMeta, PathBuf)>>>,
    /// A witness's partition: entries are acknowledged and kept in the log but never applied,
    /// and a snapshot installs only the applied state (no mailbox data is ever held).
    witness: bool,
}

const SNAPSHOT_SUFFIX: &str = ".snap";

impl StateMachine {
    /// `witness`: this is a witness's replica of a partition (see the field).
    pub fn open(
        machine: Arc<GroupMachine>,
        snapshot_dir: PathBuf,
        witness: bool,
    ) -> io::Result<StateMachine> {
        std::fs::create_dir_all(&snapshot_dir)?;
        let mut newest: Option<(SnapshotMeta, PathBuf)> = None;
        for entry in std::fs::read_dir(&snapshot_dir)? {
            let path = entry?.path();
            let is_snapshot = path
                .extension()
                .is_some_and(|e| format!(".{}", e.to_string_lossy()) == SNAPSHOT_SUFFIX);
            if !is_snapshot {
                // A partly received or partly built snapshot from before a crash.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Ok(meta) = snapshot_meta(&path) else {
                tracing::warn!(path = %path.display(), "removing unreadable snapshot");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            if newest
                .as_ref()
                .is_none_or(|(m, _)| m.last_log_id < meta.last_log_id)
            {
                newest = Some((meta, path));
            }
        }
        Ok(StateMachine {
            machine,
            snapshot_dir,
            current: Arc::new(Mutex::new(newest)),
            witness,
        })
    }

    pub fn machine(&self) -> &Arc<GroupMachine> {
        &self.machine
    }

    pub fn kind(&self) -> GroupKind {
        self.machine.kind()
    }

    /// A path for a snapshot being received; not picked up as a snapshot until renamed.
    pub fn incoming_path(&self) -> PathBuf {
        self.snapshot_dir
            .join(format!("incoming-{}.part", rand::random::<u64>()))
    }

    fn applied(&self) -> io::Result<AppliedState> {
        match self.machine.raft_state().map_err(to_io)? {
            Some(bytes) => codec::decode(&bytes).map_err(to_io),
            None => Ok((None, StoredMembership::default())),
        }
    }

    fn set_current(&self, meta: SnapshotMeta, path: PathBuf) {
        let old = self
            .current
            .lock()
            .expect("snapshot lock poisoned")
            .replace((meta, path.clone()));
        if let Some((_, old_path)) = old {
            if old_path != path {
                let _ = std::fs::remove_file(old_path);
            }
        }
    }
}

fn snapshot_meta(path: &Path) -> io::Result<SnapshotMeta> {
    let state = GroupMachine::snapshot_raft_state(path).map_err(to_io)?;
    let (last_log_id, last_membership): AppliedState = match state {
        Some(bytes) => codec::decode(&bytes).map_err(to_io)?,
        None => (None, StoredMembership::default()),
    };
    Ok(SnapshotMeta {
        last_log_id,
        last_membership,
    })
}

/// Writes to `path` a snapshot file holding only `meta`'s applied state (log id and
/// membership) and no data: what a witness is sent instead of a partition's snapshot.
pub fn write_state_only(meta: &SnapshotMeta, path: &Path) -> io::Result<()> {
    let state: AppliedState = (meta.last_log_id, meta.last_membership.clone());
    GroupMachine::export_state_only(&codec::encode(&state), path)
        .map(|_| ())
        .map_err(to_io)
}

fn snapshot_name(meta: &SnapshotMeta) -> String {
    match &meta.last_log_id {
        Some(id) => format!(
            "{:020}-{:020}{SNAPSHOT_SUFFIX}",
            id.committed_leader_id().term,
            id.index()
        ),
        None => format!("empty{SNAPSHOT_SUFFIX}"),
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<AppliedState> {
        self.applied()
    }

    async fn apply<S>(&mut self, mut entries: S) -> io::Result<()>
    where
        S: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let (_, mut membership) = self.applied()?;
        while let Some((entry, responder)) = entries.try_next().await? {
            let log_id = entry.log_id();
            let cmd = match &entry.payload {
                EntryPayload::Normal(_) if self.witness => None,
                EntryPayload::Normal(cmd) => Some(cmd),
                EntryPayload::Membership(m) => {
                    membership = StoredMembership::new(Some(log_id), m.clone());
                    None
                }
                EntryPayload::Blank => None,
            };
            if cmd.is_some() && crate::failpoint::fire("apply", self.machine.group()) {
                return Err(io::Error::other("failpoint: apply"));
            }
            let state = codec::encode(&(Some(log_id), membership.clone()));
            let response = self.machine.apply(cmd, &state).map_err(to_io)?;
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        // The snapshot is written here, in the state machine's own task, so no apply runs
        // while it is taken and it is consistent; building just hands it over.
        let sm = self.clone();
        let built = tokio::task::spawn_blocking(move || -> io::Result<(SnapshotMeta, PathBuf)> {
            let tmp = sm
                .snapshot_dir
                .join(format!("building-{}.part", rand::random::<u64>()));
            sm.machine.export(&tmp).map_err(to_io)?;
            let meta = snapshot_meta(&tmp)?;
            let path = sm.snapshot_dir.join(snapshot_name(&meta));
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&sm.snapshot_dir)?.sync_all()?;
            Ok((meta, path))
        })
        .await
        .map_err(to_io)
        .and_then(|r| r);
        SnapshotBuilder {
            sm: self.clone(),
            built: Some(built),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> io::Result<()> {
        let sm = self.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let found = snapshot_meta(&snapshot.path)?;
            if found.last_log_id != meta.last_log_id {
                return Err(io::Error::other(
                    "snapshot file does not match its announced log id",
                ));
            }
            if sm.witness {
                sm.machine
                    .install_state_only(&snapshot.path)
                    .map_err(to_io)?;
            } else {
                sm.machine.install(&snapshot.path).map_err(to_io)?;
            }
            let path = sm.snapshot_dir.join(snapshot_name(&meta));
            if path != snapshot.path {
                std::fs::rename(&snapshot.path, &path)?;
            }
            std::fs::File::open(&sm.snapshot_dir)?.sync_all()?;
            sm.set_current(meta, path);
            Ok(())
        })
        .await
        .map_err(to_io)?
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> io::Result<Option<SnapshotOf<TypeConfig, SnapshotFile>>> {
        let current = self.current.lock().expect("snapshot lock poisoned").clone();
        Ok(current.map(|(meta, path)| Snapshot {
            meta,
            snapshot: SnapshotFile { path },
        }))
    }
}

#[derive(Debug)]
pub struct SnapshotBuilder {
    sm: StateMachine,
    built: Option<io::Result<(SnapshotMeta, PathBuf)>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> io::Result<SnapshotOf<TypeConfig, SnapshotFile>> {
        let (meta, path) = self
            .built
            .take()
            .unwrap_or_else(|| Err(io::Error::other("snapshot already built")))?;
        self.sm.set_current(meta.clone(), path.clone());
        Ok(Snapshot {
            meta,
            snapshot: SnapshotFile { path },
        })
    }
}

/// What a stopped node's store says about one group, for `mailgrid inspect`: the applied log
/// id and membership, the committed mark, the index the log is purged up to, the log's last
/// index, and the state digest.
pub fn inspect(store: &storage::Store, group: u64) -> Result<String, storage::StorageError> {
    let kind = if group == crate::META_GROUP {
        GroupKind::Meta
    } else {
        GroupKind::Partition
    };
    let machine = GroupMachine::open(store, group, kind)?;
    let applied: AppliedState = match machine.raft_state()? {
        Some(bytes) => codec::decode(&bytes)?,
        None => (None, StoredMembership::default()),
    };
    let log = GroupLog::open(store, group)?;
    let committed: Option<Option<LogId>> = log
        .mark(COMMITTED)?
        .map(|b| codec::decode(&b))
        .transpose()?;
    let last = log.last()?.map(|(index, _)| index);
    let purged: Option<LogId> = log.mark(PURGED)?.map(|b| codec::decode(&b)).transpose()?;
    Ok(format!(
        "group {group}: applied {:?}, committed {:?}, purged up to {:?}, last log index {:?}, membership {:?}, digest {}",
        applied.0,
        committed.flatten(),
        purged.map(|l| l.index),
        last,
        applied.1,
        machine
            .digest()?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::log::{StoreBuilder, Suite};
    use openraft::type_config::TypeConfigExt;

    struct Builder {
        dirs: Mutex<Vec<tempfile::TempDir>>,
    }

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, ()> for Builder {
        async fn build(
            &self,
        ) -> Result<((), LogStore, StateMachine), openraft::StorageError<TypeConfig>> {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = storage::Store::open(&dir.path().join("db"), true).expect("open store");
            let log = LogStore::new(GroupLog::open(&store, 1).expect("log"));
            let machine =
                Arc::new(GroupMachine::open(&store, 1, GroupKind::Partition).expect("machine"));
            let sm = StateMachine::open(machine, dir.path().join("snapshots"), false).expect("sm");
            self.dirs.lock().unwrap().push(dir);
            Ok(((), log, sm))
        }
    }

    #[test]
    fn a_dropped_replica_keeps_its_vote_and_a_floor_and_nothing_else() {
        // Goal: dropping a left group's copy removes its log, state and snapshots, keeps the
        // vote, and records the last log id held as the floor (never lowering an older one);
        // a drop interrupted after its mark is finished by `finish_drop`.
        use openraft::testing::blank_ent;
        let dir = tempfile::tempdir().unwrap();
        let store = storage::Store::open(&dir.path().join("db"), true).unwrap();
        let log = GroupLog::open(&store, 4).unwrap();
        let machine = GroupMachine::open(&store, 4, GroupKind::Partition).unwrap();
        let empty = machine.digest().unwrap();
        let snapshots = dir.path().join("snapshots");
        std::fs::create_dir_all(&snapshots).unwrap();
        std::fs::write(snapshots.join("1-2-3.snap"), b"old snapshot").unwrap();
        let append = |term: u64, index: u64| {
            let entry = blank_ent::<TypeConfig>(term, 1, index);
            log.append([(index, &codec::encode(&entry)[..])]).unwrap();
            entry.log_id()
        };
        append(2, 1);
        let last = append(3, 2);
        log.set_mark(VOTE, b"the vote").unwrap();
        log.set_mark(PURGED, &codec::encode(&last)).unwrap();

        assert_eq!(
            drop_replica(&log, &machine, &snapshots).unwrap(),
            Some(last)
        );
        assert_eq!(floor(&log).unwrap(), Some(last));
        assert_eq!(log.last().unwrap(), None);
        assert_eq!(log.mark(PURGED).unwrap(), None);
        assert_eq!(log.mark(VOTE).unwrap().as_deref(), Some(&b"the vote"[..]));
        assert_eq!(machine.digest().unwrap(), empty);
        assert!(!snapshots.exists());
        assert!(!drop_interrupted(&log).unwrap());

        // A second drop with less in the log keeps the higher floor.
        append(1, 1);
        assert_eq!(
            drop_replica(&log, &machine, &snapshots).unwrap(),
            Some(last)
        );
        assert_eq!(floor(&log).unwrap(), Some(last));

        // Interrupted after the mark: the open finishes it.
        append(4, 3);
        log.set_mark(RESETTING, b"1").unwrap();
        assert!(drop_interrupted(&log).unwrap());
        finish_drop(&log, &machine, &snapshots).unwrap();
        assert_eq!(log.last().unwrap(), None);
        assert!(!drop_interrupted(&log).unwrap());
    }

    #[test]
    fn openraft_storage_suite() {
        // Goal: the log store and state machine meet openraft's storage contract.
        TypeConfig::run(async {
            Suite::test_all(Builder {
                dirs: Mutex::new(Vec::new()),
            })
            .await
            .unwrap();
        });
    }
}
