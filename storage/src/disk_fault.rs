//! Disk faults made on purpose, for tests and the chaos suite: with `MAILGRID_DISK_FAULT_FILE`
//! naming a file, every sync of the store first reads it and acts out what it says:
//!
//! - `eio`: the sync fails as a disk that returns EIO does;
//! - `stall`: the sync blocks until the file says something else (a disk that stops
//!   answering);
//! - `full`: the filesystem reports no free space (see [`crate::db::Store::free_bytes`]).
//!
//! Anything else, or no file, is a working disk. Unset, nothing is read: a check costs one
//! load of a `OnceLock`.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

pub const ENV: &str = "MAILGRID_DISK_FAULT_FILE";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Eio,
    Stall,
    Full,
}

fn file() -> Option<&'static PathBuf> {
    static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    FILE.get_or_init(|| std::env::var_os(ENV).map(PathBuf::from))
        .as_ref()
}

/// Whether faults can be injected in this process (the variable is set).
pub fn armed() -> bool {
    file().is_some()
}

/// The fault the file asks for now, if any.
pub fn current() -> Option<Fault> {
    let text = std::fs::read_to_string(file()?).ok()?;
    match text.trim() {
        "eio" => Some(Fault::Eio),
        "stall" => Some(Fault::Stall),
        "full" => Some(Fault::Full),
        _ => None,
    }
}

/// Run before each sync: fails it for `eio`, blocks while `stall`.
pub(crate) fn before_sync() -> std::io::Result<()> {
    if !armed() {
        return Ok(());
    }
    loop {
        match current() {
            Some(Fault::Eio) => {
                return Err(std::io::Error::from_raw_os_error(5)); // EIO
            }
            Some(Fault::Stall) => std::thread::sleep(Duration::from_millis(50)),
            _ => return Ok(()),
        }
    }
}
