//! One raft group's log, vote and marks, as opaque bytes.
//!
//! Entries are keyed by their log index (big-endian, so sled's order is log order) and chunked
//! (see [`crate::chunk`]). The raft layer owns the entry format; this module only promises that
//! what was appended and synced reads back unchanged, and that truncate/purge remove exactly the
//! asked-for ranges.

use std::ops::RangeInclusive;

use crate::{chunk, StorageError, Store};

/// Keys of the small per-group records kept beside the log.
pub const VOTE: &str = "vote";
pub const COMMITTED: &str = "committed";
pub const PURGED: &str = "purged";
/// The last log id this replica held when its data was dropped (it had left the group): no
/// candidate whose log is behind it gets this replica's vote (see `raft::host`).
pub const FLOOR: &str = "floor";
/// Set while this replica's data is being dropped; a reset found set on open is redone.
pub const RESETTING: &str = "resetting";

#[derive(Clone, Debug)]
pub struct GroupLog {
    store: Store,
    entries: sled::Tree,
    marks: sled::Tree,
}

impl GroupLog {
    pub fn open(store: &Store, group: u64) -> Result<GroupLog, StorageError> {
        Ok(GroupLog {
            store: store.clone(),
            entries: store.tree(&format!("log/{group}"))?,
            marks: store.tree(&format!("marks/{group}"))?,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Writes entries (not yet durable: follow with [`Store::sync_then`]).
    pub fn append<'a>(
        &self,
        entries: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for (index, bytes) in entries {
            // An entry may replace one of another length (after a truncation that was not
            // seen, or a rewrite): drop every old chunk first; later inserts win in a batch.
            chunk::remove(&self.entries, &mut batch, &index.to_be_bytes())?;
            chunk::put(&mut batch, &index.to_be_bytes(), bytes);
        }
        self.entries.apply_batch(batch)?;
        Ok(())
    }

    /// Entries with indexes in `range`, in order.
    pub fn read(&self, range: RangeInclusive<u64>) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let (start, end) = (*range.start(), *range.end());
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        if start > end {
            return Ok(out);
        }
        let lo = chunk::chunk_key(&start.to_be_bytes(), 0);
        let iter = match end.checked_add(1) {
            Some(hi) => self
                .entries
                .range(lo..chunk::chunk_key(&hi.to_be_bytes(), 0)),
            None => self.entries.range(lo..),
        };
        for item in iter {
            let (k, v) = item?;
            let (index, chunk_no) = split_key(&k)?;
            match out.last_mut() {
                Some((last, bytes)) if *last == index => bytes.extend_from_slice(&v),
                _ => {
                    if chunk_no != 0 {
                        return Err(StorageError::Corrupt(format!(
                            "log entry {index} starts at chunk {chunk_no}"
                        )));
                    }
                    out.push((index, v.to_vec()));
                }
            }
        }
        Ok(out)
    }

    /// The entry with the highest index, if any.
    pub fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let Some((k, _)) = self.entries.last()? else {
            return Ok(None);
        };
        let (index, _) = split_key(&k)?;
        Ok(self.read(index..=index)?.pop())
    }

    /// Removes every entry with index >= `from`.
    pub fn truncate_from(&self, from: u64) -> Result<(), StorageError> {
        self.remove_range(chunk::chunk_key(&from.to_be_bytes(), 0), None)
    }

    /// Removes every entry with index <= `upto`.
    pub fn purge_upto(&self, upto: u64) -> Result<(), StorageError> {
        let hi = upto
            .checked_add(1)
            .map(|h| chunk::chunk_key(&h.to_be_bytes(), 0));
        self.remove_range(Vec::new(), hi)
    }

    fn remove_range(&self, lo: Vec<u8>, hi: Option<Vec<u8>>) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        let iter = match hi {
            Some(hi) => self.entries.range(lo..hi),
            None => self.entries.range(lo..),
        };
        for item in iter {
            batch.remove(item?.0);
        }
        self.entries.apply_batch(batch)?;
        Ok(())
    }

    /// Removes every entry and the `COMMITTED` and `PURGED` marks; the vote and the other
    /// marks stay. Not durable until synced.
    pub fn clear(&self) -> Result<(), StorageError> {
        self.remove_range(Vec::new(), None)?;
        self.marks.remove(COMMITTED)?;
        self.marks.remove(PURGED)?;
        Ok(())
    }

    /// Removes a mark. Not durable until synced.
    pub fn remove_mark(&self, name: &str) -> Result<(), StorageError> {
        self.marks.remove(name)?;
        Ok(())
    }

    pub fn mark(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.marks.get(name)?.map(|v| v.to_vec()))
    }

    /// Writes a mark (small: vote, committed, purged). Not durable until synced.
    pub fn set_mark(&self, name: &str, value: &[u8]) -> Result<(), StorageError> {
        assert!(value.len() <= chunk::CHUNK_BYTES_MAX);
        self.marks.insert(name, value)?;
        Ok(())
    }
}

fn split_key(k: &[u8]) -> Result<(u64, u32), StorageError> {
    if k.len() != 12 {
        return Err(StorageError::Corrupt(format!(
            "log key of {} bytes",
            k.len()
        )));
    }
    let index = u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
    let chunk_no = u32::from_be_bytes(k[8..].try_into().expect("4 bytes"));
    Ok((index, chunk_no))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn clear_drops_entries_and_positions_but_keeps_the_vote() {
        // Goal: dropping a replica's log keeps what its votes depend on (the vote and the
        // floor) and nothing else, across a reopen.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), true).unwrap();
        let log = GroupLog::open(&store, 3).unwrap();
        log.append([(1, &b"a"[..]), (2, &b"b"[..])]).unwrap();
        for mark in [VOTE, COMMITTED, PURGED, FLOOR] {
            log.set_mark(mark, mark.as_bytes()).unwrap();
        }
        log.clear().unwrap();
        store.sync().unwrap();
        drop(log);
        drop(store);
        let store = Store::open(dir.path(), false).unwrap();
        let log = GroupLog::open(&store, 3).unwrap();
        assert_eq!(log.last().unwrap(), None);
        assert_eq!(log.mark(VOTE).unwrap().as_deref(), Some(VOTE.as_bytes()));
        assert_eq!(log.mark(FLOOR).unwrap().as_deref(), Some(FLOOR.as_bytes()));
        assert_eq!(log.mark(COMMITTED).unwrap(), None);
        assert_eq!(log.mark(PURGED).unwrap(), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        #[test]
        fn behaves_like_a_btreemap_across_reopen(ops in proptest::collection::vec((0u8..4, 1u64..40, 0usize..150_000), 1..40)) {
            // Goal: the log matches a BTreeMap model after every op, including after the
            // database is dropped and reopened.
            let dir = tempfile::tempdir().unwrap();
            let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let mut store = Store::open(dir.path(), true).unwrap();
            for (i, (op, index, len)) in ops.into_iter().enumerate() {
                let log = GroupLog::open(&store, 7).unwrap();
                match op {
                    0 | 1 => {
                        let bytes: Vec<u8> = (0..len).map(|b| (b as u8) ^ (index as u8)).collect();
                        log.append([(index, &bytes[..])]).unwrap();
                        model.insert(index, bytes);
                    }
                    2 => { log.truncate_from(index).unwrap(); model.retain(|k, _| *k < index); }
                    _ => { log.purge_upto(index).unwrap(); model.retain(|k, _| *k > index); }
                }
                if i % 7 == 6 {
                    store.sync().unwrap();
                    drop(log);
                    drop(store);
                    store = Store::open(dir.path(), false).unwrap();
                }
                let log = GroupLog::open(&store, 7).unwrap();
                let got: BTreeMap<u64, Vec<u8>> = log.read(0..=u64::MAX).unwrap().into_iter().collect();
                proptest::prop_assert!(got == model, "log differs from model after op {}", i);
                proptest::prop_assert_eq!(log.last().unwrap().map(|e| e.0), model.keys().last().copied());
            }
        }
    }
}
