//! mailgrid storage: one sled database per node holding every raft group's log and vote, and
//! the deterministic state machines (the cluster's meta state and each partition's mail data).
//!
//! This crate knows nothing about raft libraries, networks or async runtimes: the raft layer
//! hands it opaque log entries and decoded commands, and it answers with bytes and values.

pub mod chunk;
pub mod codec;
pub mod db;
pub mod disk_fault;
pub mod log;
pub mod machine;
pub mod meta;
pub mod partition;
pub mod types;
pub mod version;

pub use db::Store;
pub use log::GroupLog;
pub use machine::{Command, GroupMachine, Response};

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("no mailgrid data in {0} (run `mailgrid init` or `mailgrid join` first)")]
    Missing(String),
    #[error("data store is corrupt or unreadable: {0}")]
    Corrupt(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored value does not decode: {0}")]
    Codec(#[from] codec::CodecError),
    #[error("snapshot rejected: {0}")]
    Snapshot(String),
    /// The disk failed (or stopped answering) earlier: nothing more is made durable.
    #[error("storage failed: {0}")]
    Failed(String),
}

impl StorageError {
    pub fn io(path: &Path, source: std::io::Error) -> StorageError {
        StorageError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
