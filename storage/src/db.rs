//! The node's one sled database and the group-commit syncer that makes writes durable.
//!
//! sled 0.34's `flush()` only issues `sync_file_range`, which neither flushes the device cache
//! nor persists metadata (DESIGN.md invariant 6). After every flush we therefore `fdatasync` the
//! database file ourselves. Many raft groups share this one database, so one flush + fdatasync
//! covers all of their pending writes: the [`Syncer`] thread collects waiting callers while a
//! sync runs and releases them together (group commit).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use crate::StorageError;

const IDENTITY: &str = "identity";

/// How many durability requests one flush may cover; bounds the latency of the last one.
const SYNC_BATCH_MAX: usize = 4096;

/// A callback run once the writes issued before it are durable (or failed to become so).
pub type SyncCallback = Box<dyn FnOnce(Result<(), String>) + Send + 'static>;

/// Counters a test or bench can read to check that acknowledgements follow syncs.
#[derive(Debug, Default)]
pub struct SyncStats {
    pub syncs: std::sync::atomic::AtomicU64,
    pub callbacks: std::sync::atomic::AtomicU64,
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    db: sled::Db,
    dir: PathBuf,
    /// Open handle on sled's data file; `sync_data` on it is the real durability barrier.
    data_file: Mutex<File>,
    /// Requests for the syncer thread. Bounded: a full queue makes writers wait (back-pressure).
    sync_tx: mpsc::SyncSender<SyncCallback>,
    stats: Arc<SyncStats>,
    /// Set for good by the first failed sync (or a stall the node gave up on): after a failed
    /// fdatasync the kernel may have dropped the dirty pages, so nothing written since the last
    /// good sync can be trusted to reach the disk, and no later sync is attempted. Only a
    /// restart, which reads the store back from the disk, clears it.
    failed: Mutex<Option<String>>,
    /// When the sync under way started, if one is.
    syncing_since: Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

impl Store {
    /// Opens (or creates, when `create` is true) the database under `dir`.
    ///
    /// Refuses to silently start on an empty store: opening a directory that has no database
    /// with `create == false` is an error that names the directory.
    pub fn open(dir: &Path, create: bool) -> Result<Store, StorageError> {
        let exists = dir.join("db").exists();
        if !exists && !create {
            return Err(StorageError::Missing(dir.display().to_string()));
        }
        std::fs::create_dir_all(dir).map_err(|e| StorageError::io(dir, e))?;
        let db = open_sled(dir)?;
        let data_path = dir.join("db");
        let data_file = File::open(&data_path).map_err(|e| StorageError::io(&data_path, e))?;
        if !exists {
            // Make the new files' directory entries durable.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| StorageError::io(dir, e))?;
        }
        let (sync_tx, sync_rx) = mpsc::sync_channel::<SyncCallback>(SYNC_BATCH_MAX);
        let stats = Arc::new(SyncStats::default());
        let inner = Arc::new(StoreInner {
            db,
            dir: dir.to_path_buf(),
            data_file: Mutex::new(data_file),
            sync_tx,
            stats: stats.clone(),
            failed: Mutex::new(None),
            syncing_since: Mutex::new(None),
        });
        let weak = Arc::downgrade(&inner);
        thread::Builder::new()
            .name("storage-sync".into())
            .spawn(move || syncer_loop(weak, sync_rx))
            .map_err(|e| StorageError::io(dir, e))?;
        Ok(Store { inner })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn stats(&self) -> &SyncStats {
        &self.inner.stats
    }

    pub(crate) fn tree(&self, name: &str) -> Result<sled::Tree, StorageError> {
        Ok(self.inner.db.open_tree(name)?)
    }

    pub(crate) fn drop_tree(&self, name: &str) -> Result<(), StorageError> {
        self.inner.db.drop_tree(name)?;
        Ok(())
    }

    pub(crate) fn tree_names(&self) -> Vec<String> {
        self.inner
            .db
            .tree_names()
            .into_iter()
            .map(|n| String::from_utf8_lossy(&n).into_owned())
            .collect()
    }

    /// The identity record written when the node was created (see [`Store::set_identity`]).
    pub fn identity(&self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .inner
            .db
            .open_tree(IDENTITY)?
            .get(IDENTITY)?
            .map(|v| v.to_vec()))
    }

    /// Records which node this store belongs to, durably. A store that later opens without
    /// it was emptied or replaced, and must not be served as if nothing happened.
    pub fn set_identity(&self, identity: &[u8]) -> Result<(), StorageError> {
        self.inner
            .db
            .open_tree(IDENTITY)?
            .insert(IDENTITY, identity)?;
        self.sync()
    }

    /// Flushes sled and `fdatasync`s its data file. Blocking.
    pub fn sync(&self) -> Result<(), StorageError> {
        self.inner.sync_now()
    }

    /// Why this store stopped making writes durable, once a sync failed or stalled (for good;
    /// see the field).
    pub fn failure(&self) -> Option<String> {
        self.inner.failed.lock().expect("failed lock").clone()
    }

    /// Marks the store failed, as a failed sync does: a sync that has not returned for too
    /// long means the disk stopped answering.
    pub fn fail(&self, why: String) {
        let mut failed = self.inner.failed.lock().expect("failed lock");
        if failed.is_none() {
            tracing::error!(error = %why, "storage failed; nothing more is made durable");
            *failed = Some(why);
        }
    }

    /// How long the sync under way has been running, if one is.
    pub fn sync_running_for(&self) -> Option<std::time::Duration> {
        self.inner
            .syncing_since
            .lock()
            .expect("syncing lock")
            .map(|at| at.elapsed())
    }

    /// Bytes free for this store on its filesystem (zero while a `full` disk fault is made).
    pub fn free_bytes(&self) -> Result<u64, StorageError> {
        if crate::disk_fault::current() == Some(crate::disk_fault::Fault::Full) {
            return Ok(0);
        }
        fs2::available_space(&self.inner.dir).map_err(|e| StorageError::io(&self.inner.dir, e))
    }

    /// Calls `done` once everything written before this call is durable. Callers that arrive
    /// while a sync is running share the next one.
    pub fn sync_then(&self, done: SyncCallback) {
        if let Err(mpsc::SendError(done)) = self.inner.sync_tx.send(done) {
            done(Err("storage syncer stopped".into()));
        }
    }
}

impl StoreInner {
    fn sync_now(&self) -> Result<(), StorageError> {
        if let Some(why) = self.failed.lock().expect("failed lock").clone() {
            return Err(StorageError::Failed(why));
        }
        *self.syncing_since.lock().expect("syncing lock") = Some(std::time::Instant::now());
        let result = self.flush_and_sync();
        *self.syncing_since.lock().expect("syncing lock") = None;
        match result {
            Err(e) => {
                let why = format!("a sync failed: {e}");
                let mut failed = self.failed.lock().expect("failed lock");
                if failed.is_none() {
                    tracing::error!(error = %why, "storage failed; nothing more is made durable");
                    *failed = Some(why.clone());
                }
                Err(StorageError::Failed(why))
            }
            // A sync that returned after the node gave up on it (a stall) does not undo that.
            Ok(()) => match self.failed.lock().expect("failed lock").clone() {
                Some(why) => Err(StorageError::Failed(why)),
                None => Ok(()),
            },
        }
    }

    fn flush_and_sync(&self) -> Result<(), StorageError> {
        let db_path = self.dir.join("db");
        crate::disk_fault::before_sync().map_err(|e| StorageError::io(&db_path, e))?;
        self.db.flush()?;
        let file = self.data_file.lock().expect("data file lock poisoned");
        file.sync_data()
            .map_err(|e| StorageError::io(&db_path, e))?;
        self.stats
            .syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// How long opening waits for a previous handle on the same directory to let go of its file
/// lock: sled's background threads release it shortly after the last handle is dropped.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn open_sled(dir: &Path) -> Result<sled::Db, StorageError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        let opened = sled::Config::new()
            .path(dir)
            .cache_capacity(64 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .open();
        match opened {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(StorageError::Corrupt(format!("{}: {e}", dir.display()))),
        }
    }
}

fn syncer_loop(store: std::sync::Weak<StoreInner>, rx: mpsc::Receiver<SyncCallback>) {
    let mut batch = Vec::with_capacity(64);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < SYNC_BATCH_MAX {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let Some(store) = store.upgrade() else {
            for done in batch.drain(..) {
                done(Err("storage closed".into()));
            }
            return;
        };
        let result = store.sync_now().map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(error = %e, "storage sync failed");
        }
        store
            .stats
            .callbacks
            .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
        drop(store);
        for done in batch.drain(..) {
            done(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_missing_without_create_fails() {
        // Goal: a node never starts silently on an empty store.
        let dir = tempfile::tempdir().unwrap();
        let err = Store::open(&dir.path().join("nothing"), false).unwrap_err();
        assert!(matches!(err, StorageError::Missing(_)), "{err}");
    }

    #[test]
    fn sync_then_runs_after_a_sync() {
        // Goal: every durability callback is preceded by at least one flush + fdatasync.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), true).unwrap();
        let tree = store.tree("t").unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..50u32 {
            tree.insert(i.to_be_bytes(), &b"v"[..]).unwrap();
            let tx = tx.clone();
            let stats = store.inner.stats.clone();
            store.sync_then(Box::new(move |r| {
                let syncs = stats.syncs.load(std::sync::atomic::Ordering::Relaxed);
                tx.send((r, syncs)).unwrap();
            }));
        }
        for _ in 0..50 {
            let (r, syncs) = rx.recv().unwrap();
            r.unwrap();
            assert!(syncs >= 1);
        }
        assert!(
            store
                .stats()
                .callbacks
                .load(std::sync::atomic::Ordering::Relaxed)
                == 50
        );
    }

    #[test]
    fn a_failed_sync_fails_every_later_one() {
        // Goal: after one sync failed (or the store was failed for a stall), no later sync
        // reports success, even one the disk would now complete: acknowledgements stop.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), true).unwrap();
        store.sync().unwrap();
        assert_eq!(store.failure(), None);
        store.fail("disk stalled".into());
        assert!(matches!(store.sync(), Err(StorageError::Failed(_))));
        let (tx, rx) = mpsc::channel();
        store.sync_then(Box::new(move |r| tx.send(r).unwrap()));
        assert!(rx.recv().unwrap().is_err());
        assert_eq!(store.failure().as_deref(), Some("disk stalled"));
        assert!(store.free_bytes().unwrap() > 0);
    }
}
