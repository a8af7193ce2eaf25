//! The headers of messages this node has read, by content hash, shared by its IMAP sessions.
//!
//! A client that opens a mailbox typically fetches a few header fields of every message
//! and then searches on them; without this each would be a read at the partition leader,
//! often another node. A body's hash is the blake3 of its bytes, so an entry can never go
//! stale: whatever a message's flags or mailbox, the same hash has the same header.
//! Entries are dropped oldest first once the cache holds more than its byte budget.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use service::types::BodyHash;

/// Bookkeeping charged per entry on top of the header's bytes.
const ENTRY_OVERHEAD: usize = 96;

pub struct HeaderCache {
    budget: usize,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct Inner {
    headers: HashMap<BodyHash, Arc<[u8]>>,
    /// Insertion order, oldest first: the eviction order.
    order: VecDeque<BodyHash>,
    bytes: usize,
}

impl HeaderCache {
    /// A cache holding at most `budget` bytes of headers (0: holds nothing).
    pub fn new(budget: usize) -> HeaderCache {
        HeaderCache {
            budget,
            inner: Mutex::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The header of the message whose hash is `hash`, if held (counted as a hit or miss).
    pub fn get(&self, hash: &BodyHash) -> Option<Arc<[u8]>> {
        let found = self
            .inner
            .lock()
            .expect("header cache")
            .headers
            .get(hash)
            .cloned();
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Whether the header of `hash` is held (not counted).
    pub fn contains(&self, hash: &BodyHash) -> bool {
        self.inner
            .lock()
            .expect("header cache")
            .headers
            .contains_key(hash)
    }

    /// Keeps `header` (the header of the message whose hash is `hash`, up to and with the
    /// empty line that ends it), evicting the oldest entries past the budget.
    pub fn insert(&self, hash: BodyHash, header: Arc<[u8]>) {
        let cost = header.len() + ENTRY_OVERHEAD;
        if cost > self.budget {
            return;
        }
        let mut inner = self.inner.lock().expect("header cache");
        if inner.headers.insert(hash, header).is_some() {
            return;
        }
        inner.order.push_back(hash);
        inner.bytes += cost;
        while inner.bytes > self.budget {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            if let Some(gone) = inner.headers.remove(&old) {
                inner.bytes -= gone.len() + ENTRY_OVERHEAD;
            }
        }
    }

    /// Bytes held, overhead included.
    pub fn bytes(&self) -> usize {
        self.inner.lock().expect("header cache").bytes
    }

    /// Lookups answered from the cache, and those that were not, since the node started.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> BodyHash {
        BodyHash([n; 32])
    }

    #[test]
    fn the_oldest_headers_go_first_and_the_budget_holds() {
        // Goal: the cache never holds more than its budget, drops in insertion order, and
        // a repeated insert neither double-counts nor reorders.
        let header = |n: usize| -> Arc<[u8]> { vec![b'x'; n].into() };
        let cache = HeaderCache::new(3 * (100 + ENTRY_OVERHEAD));
        for n in 1..=3 {
            cache.insert(hash(n), header(100));
        }
        cache.insert(hash(1), header(100));
        assert_eq!(cache.bytes(), 3 * (100 + ENTRY_OVERHEAD));
        assert!(cache.contains(&hash(1)));
        assert_eq!(cache.hits_and_misses(), (0, 0), "contains counts nothing");
        cache.insert(hash(4), header(100));
        assert!(cache.get(&hash(1)).is_none(), "the oldest is dropped");
        for n in 2..=4 {
            assert_eq!(cache.get(&hash(n)).unwrap().len(), 100);
        }
        cache.insert(hash(5), header(250));
        assert!(cache.bytes() <= 3 * (100 + ENTRY_OVERHEAD));
        assert!(cache.get(&hash(5)).is_some());
        assert!(cache.get(&hash(2)).is_none() && cache.get(&hash(3)).is_none());
        // Larger than the whole budget: not kept, and nothing else is dropped for it.
        cache.insert(hash(6), header(10_000));
        assert!(cache.get(&hash(6)).is_none());
        assert!(cache.get(&hash(5)).is_some());
        assert_eq!(cache.hits_and_misses(), (5, 4));
        let off = HeaderCache::new(0);
        off.insert(hash(1), header(1));
        assert!(off.get(&hash(1)).is_none());
        assert_eq!(off.bytes(), 0);
    }
}
