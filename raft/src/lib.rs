//! mailgrid replication: one openraft group per partition plus the meta group, their storage
//! adapters, and the QUIC transport (mutual TLS) that carries raft and service RPCs.

pub mod failpoint;
pub mod host;
pub mod liveness;
pub mod network;
pub mod placement;
pub mod store;
pub mod tls;
pub mod transport;
pub mod types;

pub use types::*;
