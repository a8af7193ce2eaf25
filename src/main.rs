//! The `mailgrid` command: create, join and run cluster nodes, a local dev cluster, and
//! administration, local delivery and status through any node.

mod api;
mod cli;
mod client;
mod datadir;
mod dev;
mod mail;
mod node;
mod query;
mod router;

fn main() -> std::process::ExitCode {
    cli::main()
}
