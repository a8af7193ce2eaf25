//! mailgrid: a shared-nothing mail server cluster. This crate is the node binary and the only
//! one that wires the others together: the command line ([`cli`]), `serve` (a node with its
//! listeners, [`serve`]), `dev` (a local cluster, [`dev`]) and the configuration file they
//! read ([`config`]). `src/main.rs` only calls [`cli::main`].
//!
//! The mail service is the `service` crate; the protocol front ends are the `smtp`, `imap`,
//! `pop3`, `outbound` and `web` crates. `bench/` and `chaos/` drive clusters through
//! `service::client::Client`.

pub mod cli;
pub mod config;
pub mod dev;
pub mod serve;
