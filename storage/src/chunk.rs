//! Values larger than one sled value may be are split into numbered chunks.
//!
//! sled 0.34 moves values over ~128 KiB into blob files that it never fsyncs (DESIGN.md
//! invariant 6), so no value we store is larger than [`CHUNK_BYTES_MAX`]. A logical value under
//! key `k` is stored as `k ‖ u32be(0)`, `k ‖ u32be(1)`, … so a prefix scan returns it in order.

/// Largest single value handed to sled.
pub const CHUNK_BYTES_MAX: usize = 60 * 1024;

pub fn chunk_key(key: &[u8], chunk: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 4);
    k.extend_from_slice(key);
    k.extend_from_slice(&chunk.to_be_bytes());
    k
}

/// Adds the chunks of `value` under `key` to `batch`. An empty value still gets one chunk so
/// that presence can be told apart from absence.
pub fn put(batch: &mut sled::Batch, key: &[u8], value: &[u8]) {
    if value.is_empty() {
        batch.insert(chunk_key(key, 0), &[][..]);
        return;
    }
    for (i, part) in value.chunks(CHUNK_BYTES_MAX).enumerate() {
        let i = u32::try_from(i).expect("value has more than 2^32 chunks");
        assert!(part.len() <= CHUNK_BYTES_MAX);
        batch.insert(chunk_key(key, i), part);
    }
}

/// Reads the whole value stored under `key`, or `None` if it has no chunks.
pub fn get(tree: &sled::Tree, key: &[u8]) -> Result<Option<Vec<u8>>, sled::Error> {
    get_until(tree, key, |_| false)
}

/// Reads the value stored under `key` chunk by chunk and stops after the first chunk at
/// which `enough` says the bytes read so far suffice (the whole value if it never does);
/// `None` if it has no chunks.
pub fn get_until(
    tree: &sled::Tree,
    key: &[u8],
    mut enough: impl FnMut(&[u8]) -> bool,
) -> Result<Option<Vec<u8>>, sled::Error> {
    let mut out = Vec::new();
    let mut found = false;
    for (i, item) in tree.scan_prefix(key).enumerate() {
        let (k, v) = item?;
        if k.len() != key.len() + 4 {
            continue;
        }
        let expected = u32::try_from(i).unwrap_or(u32::MAX);
        if k[key.len()..] != expected.to_be_bytes() {
            break;
        }
        found = true;
        out.extend_from_slice(&v);
        if enough(&out) {
            break;
        }
    }
    Ok(found.then_some(out))
}

/// Adds removal of every chunk under `key` to `batch`.
pub fn remove(tree: &sled::Tree, batch: &mut sled::Batch, key: &[u8]) -> Result<(), sled::Error> {
    for item in tree.scan_prefix(key) {
        let (k, _) = item?;
        if k.len() == key.len() + 4 {
            batch.remove(k);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_values_split_and_rejoin() {
        // Goal: a value several chunks long reads back byte for byte; no stored piece is large.
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("t").unwrap();
        let value: Vec<u8> = (0..(CHUNK_BYTES_MAX * 3 + 17)).map(|i| i as u8).collect();
        let mut batch = sled::Batch::default();
        put(&mut batch, b"key", &value);
        put(&mut batch, b"empty", b"");
        tree.apply_batch(batch).unwrap();
        assert_eq!(get(&tree, b"key").unwrap().unwrap(), value);
        assert_eq!(get(&tree, b"empty").unwrap().unwrap(), b"");
        assert_eq!(get(&tree, b"nope").unwrap(), None);
        // A prefix stops at the first chunk that suffices, and never reads past the value.
        let mut calls = 0;
        let head = get_until(&tree, b"key", |so_far| {
            calls += 1;
            so_far.len() > CHUNK_BYTES_MAX
        });
        assert_eq!(head.unwrap().unwrap(), value[..CHUNK_BYTES_MAX * 2]);
        assert_eq!(calls, 2);
        assert_eq!(get_until(&tree, b"key", |_| false).unwrap().unwrap(), value);
        assert_eq!(get_until(&tree, b"nope", |_| true).unwrap(), None);
        for item in tree.iter() {
            assert!(item.unwrap().1.len() <= CHUNK_BYTES_MAX);
        }
        let mut batch = sled::Batch::default();
        remove(&tree, &mut batch, b"key").unwrap();
        tree.apply_batch(batch).unwrap();
        assert_eq!(get(&tree, b"key").unwrap(), None);
    }
}
