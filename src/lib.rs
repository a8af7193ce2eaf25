//! mailgrid: a shared-nothing mail server cluster. This library holds the node (router, mail
//! service, cluster requests) and the command line; `src/main.rs` only calls [`cli::main`].
//! `bench/` and `chaos/` drive clusters through [`client::Client`].

pub mod api;
pub mod cli;
pub mod client;
pub mod datadir;
pub mod dev;
pub mod mail;
pub mod node;
pub mod query;
pub mod router;
