//! The mail service every protocol front end is built on: the router that sends a request to
//! the partition leader, the mail service operations and queries, the node (its raft host and
//! the cluster requests it serves), policy (throttles and refusal rules every protocol
//! consults), and the listener, TLS and line helpers the protocols share.
//!
//! Protocol crates (`smtp`, `imap`, `pop3`, `outbound`, `web`) depend on this crate and never
//! on `raft` or `storage` directly: the records and commands they read and propose are
//! re-exported here.

pub mod api;
pub mod client;
pub mod client_tls;
pub mod datadir;
pub mod dkim;
pub mod lines;
pub mod mail;
pub mod message;
pub mod metrics;
pub mod net;
pub mod node;
pub mod policy;
pub mod query;
pub mod queue;
pub mod router;
pub mod sasl;
pub mod server_tls;

/// The replicated records and the commands on them (the `storage` crate's data model).
pub use storage::{meta, partition, types, Command, GroupMachine, Response, StorageError};

/// Group identities (the `raft` crate's).
pub use raft::{partition_group, GroupId, META_GROUP};
