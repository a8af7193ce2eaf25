//! mailgrid: a shared-nothing mail server cluster. This library holds the node (router, mail
//! service, cluster requests), the protocol front ends and the command line; `src/main.rs`
//! only calls [`cli::main`]. `bench/` and `chaos/` drive clusters through [`client::Client`].

pub mod api;
pub mod cli;
pub mod client;
pub mod client_tls;
pub mod config;
pub mod datadir;
pub mod dev;
pub mod http;
pub mod imap;
pub mod lines;
pub mod mail;
pub mod net;
pub mod node;
pub mod outbound;
pub mod pop3;
pub mod query;
pub mod router;
pub mod sasl;
pub mod serve;
pub mod server_tls;
pub mod smtp;
pub mod throttle;
