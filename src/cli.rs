//! Command-line parsing and the commands that do not run a node loop themselves.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use raft::tls::{self, ClusterCa};
use raft::transport::{Peer, Transport};
use storage::codec;
use storage::meta::{ClusterInfo, NodeRecord};
use storage::partition::{Quota, RecipientOutcome};

use service::api::*;
use service::client::Client;
use service::datadir::{self, NodeFile};
use service::node::{JoinToken, Node, NodeOptions};
use service::router::raft_service;

#[derive(Parser, Debug)]
#[command(
    name = "mailgrid",
    version,
    about = "A shared-nothing mail server cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a new cluster with this node as its first member; prints a join token.
    Init {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        node_id: u64,
        /// Address (host:port, UDP) other nodes and commands reach this node on.
        #[arg(long)]
        cluster_addr: String,
        /// Local address the cluster socket binds, when other nodes reach this one through
        /// another (NAT, a port forward, a proxy; or 0.0.0.0:PORT). Default: --cluster-addr.
        #[arg(long)]
        bind: Option<String>,
        #[arg(long, default_value_t = 64)]
        partitions: u32,
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        /// Refused: the first node must hold data (join witnesses to a running cluster).
        #[arg(long)]
        witness: bool,
    },
    /// Add a new node to a running cluster (then run it with `mailgrid serve`).
    Join {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        node_id: u64,
        /// Address (host:port, UDP) other nodes and commands reach this node on.
        #[arg(long)]
        cluster_addr: String,
        /// Local address the cluster socket binds, when other nodes reach this one through
        /// another (NAT, a port forward, a proxy; or 0.0.0.0:PORT). Default: --cluster-addr.
        #[arg(long)]
        bind: Option<String>,
        /// Cluster address of any running member.
        #[arg(long)]
        seed: String,
        #[arg(long)]
        token: String,
        /// Join as a witness: a voter in every group that keeps their logs until every data
        /// node has them, holds no mail and serves no client (two data nodes and a witness
        /// survive the loss of any one of the three).
        #[arg(long)]
        witness: bool,
    },
    /// Run a node until interrupted.
    Serve {
        #[arg(long)]
        data: PathBuf,
        /// TOML config: hostname, [listen], [tls], [smtp], [auth], [raft] (see the README).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run a local cluster of separate node processes on loopback with a demo domain.
    Dev {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long)]
        dir: PathBuf,
        /// Print one JSON line describing the cluster once it is ready.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 16)]
        partitions: u32,
        /// Replicas of each partition (voters of its raft group): 1 to --nodes. Default 3, or
        /// the node count when that is smaller.
        #[arg(long)]
        replicas: Option<u32>,
        /// Add a witness (node --nodes + 1) beside the data nodes: `--nodes 2 --witness` is the
        /// two-server topology that survives the loss of any one of the three.
        #[arg(long)]
        witness: bool,
    },
    /// Administer domains, users, aliases and quotas through any node.
    Admin {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: AdminCmd,
    },
    /// Deliver a message from standard input; exits 0 only once it is committed.
    Deliver {
        #[command(flatten)]
        target: Target,
        #[arg(long = "to", required = true)]
        to: Vec<String>,
        /// Names this delivery: retrying with the same id stores the message only once.
        #[arg(long)]
        delivery_id: Option<String>,
    },
    /// Show nodes and every partition's replicas, leader and health.
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Read a stopped node's store: per group the applied and committed log ids, the last
    /// log index, the membership and the state digest (to compare replicas after a fault).
    Inspect {
        #[arg(long)]
        data: PathBuf,
        /// Only this group (0 = meta, p + 1 = partition p).
        #[arg(long)]
        group: Option<u64>,
    },
}

#[derive(Args, Debug)]
struct Target {
    /// Data directory of a node on this machine; its credentials authenticate the command.
    #[arg(long)]
    data: PathBuf,
    /// Cluster address of the node to ask (default: the node of `--data`).
    #[arg(long)]
    node: Option<String>,
}

#[derive(Subcommand, Debug)]
enum AdminCmd {
    Domain {
        #[command(subcommand)]
        command: DomainCmd,
    },
    User {
        #[command(subcommand)]
        command: UserCmd,
    },
    Alias {
        #[command(subcommand)]
        command: AliasCmd,
    },
    Quota {
        #[command(subcommand)]
        command: QuotaCmd,
    },
    Node {
        #[command(subcommand)]
        command: NodeCmd,
    },
    /// DKIM signing keys of our domains (outbound mail from a domain with a key is signed).
    Dkim {
        #[command(subcommand)]
        command: DkimCmd,
    },
    /// The outbound queue: mail waiting for other domains.
    Queue {
        #[command(subcommand)]
        command: QueueCmd,
    },
    /// Print every message of a mailbox (JSON lines: uid, uidvalidity, flags, body).
    Fetch {
        address: String,
        #[arg(long, default_value = "INBOX")]
        mailbox: String,
    },
    /// Digest of every replica of a group (0 = meta, p + 1 = partition p).
    Digest { group: u64 },
    /// The cluster's active format and every node's release; rolling upgrades.
    Cluster {
        #[command(subcommand)]
        command: ClusterCmd,
    },
    /// Show the cluster-wide limits, or change them.
    Limits {
        /// Largest message accepted by any domain without its own limit.
        #[arg(long)]
        message_bytes_max: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// The active cluster format and the release and formats of every node.
    Version,
    /// After a rolling upgrade (every node restarted on the new release): let the cluster use
    /// what the new release added. Refused, naming them, while any node runs an older release
    /// or does not answer. It cannot be undone: older releases cannot join afterwards.
    UpgradeFinish,
}

#[derive(Subcommand, Debug)]
enum DkimCmd {
    /// Make a new key (replacing any old one) and print the DNS TXT record to publish.
    Generate {
        domain: String,
        #[arg(long, default_value = "mailgrid")]
        selector: String,
        /// rsa (2048 bits, understood everywhere) or ed25519 (RFC 8463).
        #[arg(long, default_value = "rsa")]
        algorithm: String,
    },
    /// Print the DNS TXT record of the domain's key.
    Show { domain: String },
    /// Stop signing the domain's mail.
    Remove { domain: String },
}

#[derive(Subcommand, Debug)]
enum QueueCmd {
    /// Every entry: id, age, sender, recipients still pending, attempts, last error.
    List {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One entry with every recipient's state and last reply (JSON).
    Show {
        id: String,
    },
    /// Try delivery now (releases a held entry).
    Retry {
        id: String,
    },
    /// Drop an entry: no delivery, no bounce.
    Delete {
        id: String,
    },
    /// Stop delivery attempts until released.
    Hold {
        id: String,
    },
    Release {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum DomainCmd {
    Add {
        name: String,
    },
    Remove {
        name: String,
    },
    /// Every domain with its limits and the bytes its mailboxes hold.
    List,
    /// Set a domain's limits (those not given keep their value).
    Limits {
        name: String,
        /// Total bytes of all the domain's mailboxes (0 = unlimited).
        #[arg(long)]
        quota_bytes: Option<u64>,
        /// Largest message accepted for the domain (0 = the cluster's limit).
        #[arg(long)]
        message_bytes_max: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    Add {
        address: String,
        /// The password (read from standard input when absent).
        #[arg(long, conflicts_with = "password_hash")]
        password: Option<String>,
        /// An existing hash instead of a password, for moving users over without knowing
        /// their passwords: an argon2 PHC string (Dovecot's `{ARGON2ID}`), or SHA-crypt
        /// (`$6$...`/`$5$...`: Dovecot's `{SHA512-CRYPT}`/`{SHA256-CRYPT}`, /etc/shadow).
        #[arg(long)]
        password_hash: Option<String>,
        #[arg(long, default_value_t = 0)]
        quota_bytes: u64,
        #[arg(long, default_value_t = 0)]
        quota_messages: u64,
    },
    Passwd {
        address: String,
        #[arg(long)]
        password: Option<String>,
    },
    Remove {
        address: String,
    },
    List {
        #[arg(long)]
        domain: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum AliasCmd {
    Add {
        address: String,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    Remove {
        address: String,
    },
    List {
        #[arg(long)]
        domain: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum QuotaCmd {
    /// Set a user's quota (0 = unlimited).
    Set {
        address: String,
        #[arg(long, default_value_t = 0)]
        bytes: u64,
        #[arg(long, default_value_t = 0)]
        messages: u64,
    },
    Show {
        address: String,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Forget a node that will not come back; its replicas move to the others.
    Remove { id: u64 },
    /// Move every replica and leadership off a node, a few at a time; `status` says when it
    /// holds nothing and can be stopped or removed.
    Drain { id: u64 },
    /// Let a drained (or draining) node take its share again.
    Undrain { id: u64 },
    /// Give each replica of OLD to NEW (a node already joined), then leave OLD empty.
    Replace { old: u64, new: u64 },
    /// Set a node's capacity weight (1-1000): weight 2 holds twice the replicas of weight 1.
    Weight { id: u64, weight: u32 },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Cmd::Serve { .. } | Cmd::Dev { .. }) {
        // A one-shot command whose reader went away (`mailgrid status | head`) ends quietly
        // like any Unix tool instead of panicking on the failed print. Servers keep Rust's
        // default (SIGPIPE ignored): a client closing its socket must not stop the node.
        restore_sigpipe();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MAILGRID_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mailgrid: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailgrid: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Init {
            data,
            node_id,
            cluster_addr,
            bind,
            partitions,
            replicas,
            witness,
        } => {
            if witness {
                bail!(
                    "init --witness: the first node of a cluster must hold data; init a data \
                     node, then `mailgrid join --witness` the witness to it"
                );
            }
            let addrs = Addrs {
                cluster: &cluster_addr,
                bind: bind.as_deref(),
            };
            let token = init(&data, node_id, addrs, partitions, replicas).await?;
            println!("initialised cluster; node {node_id} in {}", data.display());
            println!("join token: {token}");
            println!(
                "run this node with: mailgrid serve --data {}",
                data.display()
            );
            Ok(())
        }
        Cmd::Join {
            data,
            node_id,
            cluster_addr,
            bind,
            seed,
            token,
            witness,
        } => {
            let addrs = Addrs {
                cluster: &cluster_addr,
                bind: bind.as_deref(),
            };
            join(&data, node_id, addrs, &seed, &token, witness).await?;
            println!(
                "node {node_id} joined; run it with: mailgrid serve --data {}",
                data.display()
            );
            Ok(())
        }
        Cmd::Serve { data, config } => crate::serve::run(&data, config.as_deref()).await,
        Cmd::Dev {
            nodes,
            dir,
            json,
            partitions,
            replicas,
            witness,
        } => crate::dev::run(nodes, &dir, json, partitions, replicas, witness).await,
        Cmd::Admin { target, command } => admin(&target, command).await,
        Cmd::Deliver {
            target,
            to,
            delivery_id,
        } => {
            let mut body = Vec::new();
            std::io::stdin()
                .read_to_end(&mut body)
                .context("reading the message from standard input")?;
            let client = Client::open(&target.data, target.node.as_deref())?;
            // The client may resend the request after a lost answer; one id per invocation
            // makes those resends store the message once.
            let delivery_id = delivery_id.or_else(|| Some(random_hex(16)));
            let reply = client
                .request(ClientRequest::Deliver {
                    recipients: to,
                    body,
                    delivery_id,
                })
                .await?;
            report_delivery(reply)
        }
        Cmd::Status { target, json } => {
            let client = Client::open(&target.data, target.node.as_deref())?;
            let ClientReply::Status(status) = client.request(ClientRequest::Status).await? else {
                bail!("unexpected answer to status");
            };
            // A node too old to know the request answers an error: its status is shown alone.
            let placement = match client.request(ClientRequest::Placement).await {
                Ok(ClientReply::Placement(p)) => Some(p),
                _ => None,
            };
            let health = match client.request(ClientRequest::Health).await {
                Ok(ClientReply::Health(h)) => h,
                _ => Vec::new(),
            };
            let versions = match client.request(ClientRequest::Versions).await {
                Ok(ClientReply::Versions(v)) => Some(v),
                _ => None,
            };
            print_status(
                &status,
                placement.as_ref(),
                &health,
                versions.as_ref(),
                json,
            )
        }
        Cmd::Inspect { data, group } => {
            let file = service::datadir::NodeFile::load(&data)?;
            // Opening takes sled's lock: a running node's store is refused here.
            let store =
                storage::Store::open(&service::datadir::db_dir(&data), false).map_err(|e| {
                    anyhow::anyhow!("{}: {e} (is the node still running?)", data.display())
                })?;
            let groups: Vec<u64> = match group {
                Some(g) if g > file.partitions as u64 => {
                    bail!(
                        "group {g} does not exist: the cluster has {} partitions",
                        file.partitions
                    )
                }
                Some(g) => vec![g],
                None => (0..=file.partitions as u64).collect(),
            };
            for g in groups {
                println!("{}", raft::store::inspect(&store, g)?);
            }
            Ok(())
        }
    }
}

fn report_delivery(reply: ClientReply) -> anyhow::Result<()> {
    let ClientReply::Delivered(outcomes) = reply else {
        bail!("unexpected answer to deliver")
    };
    let mut failed = 0;
    for (rcpt, outcome) in outcomes {
        match outcome {
            RecipientOutcome::Delivered { uid_validity, uid } => {
                println!(
                    "{rcpt}: delivered (uidvalidity {} uid {})",
                    uid_validity.0, uid.0
                )
            }
            RecipientOutcome::NoSuchAccount => {
                failed += 1;
                eprintln!("{rcpt}: no such account");
            }
            RecipientOutcome::OverQuota => {
                failed += 1;
                eprintln!("{rcpt}: over quota");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} recipient(s) not delivered");
    }
    Ok(())
}

fn random_hex(bytes: usize) -> String {
    let v: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(v)
}

fn check_addr(addr: &str) -> anyhow::Result<()> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .with_context(|| format!("invalid cluster address {addr:?} (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("cluster address {addr:?} resolves to nothing"))?;
    Ok(())
}

/// Writes the TLS files of a node.
fn write_tls(
    dir: &Path,
    ca_pem: &str,
    ca_key: &str,
    cert_pem: &str,
    key_pem: &str,
    secret: &str,
) -> anyhow::Result<()> {
    let t = datadir::tls_dir(dir);
    tls::write_private(&t.join(tls::CA_CERT_FILE), ca_pem)?;
    tls::write_private(&t.join(tls::CA_KEY_FILE), ca_key)?;
    tls::write_private(&t.join(tls::NODE_CERT_FILE), cert_pem)?;
    tls::write_private(&t.join(tls::NODE_KEY_FILE), key_pem)?;
    tls::write_private(&t.join(datadir::JOIN_SECRET_FILE), secret)?;
    Ok(())
}

/// A node's cluster address, and the local address its socket binds when that differs.
#[derive(Clone, Copy, Debug)]
pub struct Addrs<'a> {
    pub cluster: &'a str,
    pub bind: Option<&'a str>,
}

impl Addrs<'_> {
    fn check(&self) -> anyhow::Result<()> {
        check_addr(self.cluster)?;
        if let Some(b) = self.bind {
            check_addr(b).context("--bind")?;
        }
        Ok(())
    }
}

pub async fn init(
    dir: &Path,
    node_id: u64,
    addrs: Addrs<'_>,
    partitions: u32,
    replicas: u32,
) -> anyhow::Result<String> {
    if node_id == 0 {
        bail!("--node-id must be at least 1");
    }
    if !(1..=4096).contains(&partitions) {
        bail!("--partitions must be between 1 and 4096");
    }
    if !(1..=7).contains(&replicas) {
        bail!("--replicas must be between 1 and 7");
    }
    addrs.check()?;
    let cluster_addr = addrs.cluster;
    datadir::prepare_new(dir)?;
    let cluster_id = random_hex(8);
    let secret = random_hex(24);
    let ca = ClusterCa::generate(&cluster_id)?;
    let (key_pem, public_pem) = tls::generate_node_key()?;
    let cert_pem = ca.issue(node_id, &public_pem)?;
    write_tls(
        dir,
        &ca.cert_pem,
        ca.key_pem(),
        &cert_pem,
        &key_pem,
        &secret,
    )?;
    let file = NodeFile {
        node_id,
        cluster_addr: cluster_addr.to_string(),
        bind_addr: addrs.bind.map(str::to_string),
        cluster_id: cluster_id.clone(),
        partitions,
        replicas,
        witness: false,
    };
    storage::Store::open(&datadir::db_dir(dir), true)?.set_identity(file.identity().as_bytes())?;
    file.save(dir)?;
    let node = Node::start(dir, &NodeOptions::default()).await?;
    let info = ClusterInfo {
        cluster_id: cluster_id.clone(),
        partitions,
        replicas,
        created: service::mail::now(),
    };
    let record = NodeRecord {
        id: node_id,
        cluster_addr: cluster_addr.to_string(),
        listeners: Default::default(),
        joined: info.created,
    };
    node.host()
        .bootstrap(info, record)
        .await
        .map_err(anyhow::Error::msg)?;
    node.host().shutdown().await;
    Ok(JoinToken {
        cluster_id,
        secret,
        ca_pem: ca.cert_pem.clone(),
    }
    .encode())
}

pub async fn join(
    dir: &Path,
    node_id: u64,
    addrs: Addrs<'_>,
    seed: &str,
    token: &str,
    witness: bool,
) -> anyhow::Result<()> {
    if node_id == 0 {
        bail!("--node-id must be at least 1");
    }
    addrs.check()?;
    let cluster_addr = addrs.cluster;
    let token = JoinToken::decode(token)?;
    datadir::prepare_new(dir)?;
    let (key_pem, public_pem) = tls::generate_node_key()?;
    let transport = Transport::client(tls::anonymous_client_config(&token.ca_pem)?)?;
    let request = JoinRequest {
        secret: token.secret.clone(),
        node_id,
        cluster_addr: cluster_addr.to_string(),
        public_key_pem: public_pem,
    };
    let request = if witness {
        ServiceRequest::JoinWitness(request)
    } else {
        ServiceRequest::Join(request)
    };
    let bytes = codec::encode(&raft_service(codec::encode(&request)));
    let response = transport
        .call(Peer::AnyMember, seed, &bytes, None, std::time::Duration::from_secs(30))
        .await
        .with_context(|| format!("cannot reach the cluster at {seed} (is it running, and is the token from this cluster?)"))?;
    let accepted: Result<JoinAccepted, String> =
        codec::decode(&response).map_err(|e| anyhow::anyhow!("bad answer from {seed}: {e}"))?;
    let accepted =
        accepted.map_err(|e| anyhow::anyhow!("the cluster refused to admit this node: {e}"))?;
    if accepted.cluster.cluster_id != token.cluster_id {
        bail!("the seed belongs to another cluster");
    }
    write_tls(
        dir,
        &token.ca_pem,
        &accepted.ca_key_pem,
        &accepted.cert_pem,
        &key_pem,
        &token.secret,
    )?;
    let file = NodeFile {
        node_id,
        cluster_addr: cluster_addr.to_string(),
        bind_addr: addrs.bind.map(str::to_string),
        cluster_id: accepted.cluster.cluster_id,
        partitions: accepted.cluster.partitions,
        replicas: accepted.cluster.replicas,
        witness,
    };
    storage::Store::open(&datadir::db_dir(dir), true)?.set_identity(file.identity().as_bytes())?;
    file.save(dir)?;
    Ok(())
}

fn password_or_stdin(password: Option<String>) -> anyhow::Result<String> {
    match password {
        Some(p) => Ok(p),
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from standard input")?;
            Ok(line.trim_end_matches(['\r', '\n']).to_string())
        }
    }
}

fn queue_control(id: String, action: QueueOp) -> ClientRequest {
    ClientRequest::QueueControl { id, action }
}

/// One queue entry as `admin queue` prints it in JSON.
fn queue_entry_json(e: &storage::partition::QueueEntry, now: i64) -> serde_json::Value {
    serde_json::json!({
        "id": hex::encode(e.id),
        "sender": e.sender,
        "size": e.size,
        "created": e.created,
        "age_s": now.saturating_sub(e.created),
        "next_attempt": e.next_attempt,
        "attempts": e.attempts,
        "held": e.held,
        "last_error": e.last_error,
        "recipients": e.recipients.iter().map(|r| serde_json::json!({
            "address": r.address,
            "state": format!("{:?}", r.state).to_lowercase(),
            "reply": r.reply,
        })).collect::<Vec<_>>(),
    })
}

async fn admin(target: &Target, command: AdminCmd) -> anyhow::Result<()> {
    let client = Client::open(&target.data, target.node.as_deref())?;
    let mut queue_json = false;
    let request = match command {
        AdminCmd::Domain { command } => match command {
            DomainCmd::Add { name } => ClientRequest::DomainAdd(name),
            DomainCmd::Remove { name } => ClientRequest::DomainRemove(name),
            DomainCmd::List => ClientRequest::DomainList,
            DomainCmd::Limits {
                name,
                quota_bytes,
                message_bytes_max,
            } => {
                if quota_bytes.is_none() && message_bytes_max.is_none() {
                    bail!("give --quota-bytes and/or --message-bytes-max");
                }
                ClientRequest::DomainLimits {
                    name,
                    quota_bytes,
                    message_bytes_max,
                }
            }
        },
        AdminCmd::User { command } => match command {
            UserCmd::Add {
                address,
                password,
                password_hash,
                quota_bytes,
                quota_messages,
            } => {
                let quota = Quota {
                    bytes: quota_bytes,
                    messages: quota_messages,
                };
                match password_hash {
                    Some(password_hash) => ClientRequest::UserImport {
                        address,
                        password_hash,
                        quota,
                    },
                    None => ClientRequest::UserAdd {
                        address,
                        password: password_or_stdin(password)?,
                        quota,
                    },
                }
            }
            UserCmd::Passwd { address, password } => ClientRequest::UserPasswd {
                address,
                password: password_or_stdin(password)?,
            },
            UserCmd::Remove { address } => ClientRequest::UserRemove(address),
            UserCmd::List { domain } => ClientRequest::UserList { domain },
        },
        AdminCmd::Alias { command } => match command {
            AliasCmd::Add { address, targets } => ClientRequest::AliasAdd { address, targets },
            AliasCmd::Remove { address } => ClientRequest::AliasRemove(address),
            AliasCmd::List { domain } => ClientRequest::AliasList { domain },
        },
        AdminCmd::Quota { command } => match command {
            QuotaCmd::Set {
                address,
                bytes,
                messages,
            } => ClientRequest::QuotaSet {
                address,
                quota: Quota { bytes, messages },
            },
            QuotaCmd::Show { address } => ClientRequest::QuotaShow(address),
        },
        AdminCmd::Node { command } => match command {
            NodeCmd::Remove { id } => ClientRequest::NodeRemove(id),
            NodeCmd::Drain { id } => ClientRequest::NodeDrain { id, draining: true },
            NodeCmd::Undrain { id } => ClientRequest::NodeDrain {
                id,
                draining: false,
            },
            NodeCmd::Replace { old, new } => ClientRequest::NodeReplace { old, new },
            NodeCmd::Weight { id, weight } => ClientRequest::NodeWeight { id, weight },
        },
        AdminCmd::Dkim { command } => match command {
            DkimCmd::Generate {
                domain,
                selector,
                algorithm,
            } => ClientRequest::DkimGenerate {
                domain,
                selector,
                algorithm,
            },
            DkimCmd::Show { domain } => ClientRequest::DkimShow(domain),
            DkimCmd::Remove { domain } => ClientRequest::DkimRemove(domain),
        },
        AdminCmd::Queue { command } => match command {
            QueueCmd::List { json } => {
                queue_json = json;
                ClientRequest::QueueList
            }
            QueueCmd::Show { id } => {
                queue_json = true;
                ClientRequest::QueueShow(id)
            }
            QueueCmd::Retry { id } => queue_control(id, QueueOp::Retry),
            QueueCmd::Delete { id } => queue_control(id, QueueOp::Delete),
            QueueCmd::Hold { id } => queue_control(id, QueueOp::Hold),
            QueueCmd::Release { id } => queue_control(id, QueueOp::Release),
        },
        AdminCmd::Fetch { address, mailbox } => ClientRequest::Fetch { address, mailbox },
        AdminCmd::Digest { group } => ClientRequest::Digests(group),
        AdminCmd::Cluster { command } => match command {
            ClusterCmd::Version => ClientRequest::Versions,
            ClusterCmd::UpgradeFinish => ClientRequest::UpgradeFinish,
        },
        AdminCmd::Limits { message_bytes_max } => {
            ClientRequest::ClusterLimits { message_bytes_max }
        }
    };
    match client.request(request).await? {
        ClientReply::Done => println!("ok"),
        ClientReply::Domains(domains) => {
            let or = |n: u64, zero: &str| {
                if n == 0 {
                    zero.to_string()
                } else {
                    n.to_string()
                }
            };
            for d in domains {
                println!(
                    "{}\tused {} of {} bytes\tmessages {}\tmessage size max {}",
                    d.domain.name,
                    d.usage.bytes,
                    or(d.domain.limits.quota_bytes, "unlimited"),
                    d.usage.messages,
                    or(d.domain.limits.message_bytes_max, "cluster default"),
                );
            }
        }
        ClientReply::ClusterLimits(l) => {
            println!("message size max {} bytes", l.message_bytes_max);
        }
        ClientReply::Accounts(accounts) => {
            for a in accounts {
                println!(
                    "{}\t{} bytes\t{} messages\t{}",
                    a.address,
                    a.usage.bytes,
                    a.usage.messages,
                    service::mail::password_scheme_name(&a.password_hash)
                );
            }
        }
        ClientReply::Aliases(aliases) => {
            for a in aliases {
                println!("{}\t{}", a.address, a.targets.join(","));
            }
        }
        ClientReply::Quota(a) => {
            let limit = |n: u64| {
                if n == 0 {
                    "unlimited".to_string()
                } else {
                    n.to_string()
                }
            };
            println!(
                "{}: {} of {} bytes, {} of {} messages",
                a.address,
                a.usage.bytes,
                limit(a.quota.bytes),
                a.usage.messages,
                limit(a.quota.messages)
            );
        }
        ClientReply::Messages(messages) => {
            use base64::Engine;
            for m in messages {
                let line = serde_json::json!({
                    "uid": m.uid,
                    "uidvalidity": m.uid_validity,
                    "flags": m.flags,
                    "body": String::from_utf8_lossy(&m.body),
                    "body_base64": base64::engine::general_purpose::STANDARD.encode(&m.body),
                });
                println!("{line}");
            }
        }
        ClientReply::Digests(d) => println!("{}", serde_json::to_string(&d)?),
        ClientReply::Versions(v) => print_versions(&v),
        ClientReply::Record(record) => println!("{record}"),
        ClientReply::Queue(entries) => {
            let now = service::mail::now();
            if !queue_json {
                println!("id\tage\tsize\tattempts\tsender\tpending\tstate\tlast error");
            }
            for e in &entries {
                if queue_json {
                    println!("{}", queue_entry_json(e, now));
                    continue;
                }
                let pending: Vec<&str> = e.pending().map(|r| r.address.as_str()).collect();
                let state = if e.held {
                    "held"
                } else if e.is_final() {
                    "bouncing"
                } else {
                    "queued"
                };
                println!(
                    "{}\t{}s\t{}\t{}\t<{}>\t{}\t{}\t{}",
                    hex::encode(e.id),
                    now.saturating_sub(e.created),
                    e.size,
                    e.attempts,
                    e.sender,
                    pending.join(","),
                    state,
                    e.last_error.as_deref().unwrap_or("-"),
                );
            }
            if !queue_json {
                println!("{} entries", entries.len());
            }
        }
        other => bail!("unexpected answer {other:?}"),
    }
    Ok(())
}

/// The active cluster format, then each node's release and formats.
fn print_versions(v: &service::api::ClusterVersions) {
    println!("cluster format {}", v.active_format);
    for (id, version) in &v.nodes {
        match version {
            Some(n) => println!(
                "node {id:>3}  mailgrid {}  formats {}-{}",
                n.binary, n.format_min, n.format_max
            ),
            None => println!("node {id:>3}  no answer (down or cut off)"),
        }
    }
    let newest = v
        .nodes
        .values()
        .flatten()
        .map(|n| n.format_max)
        .min()
        .filter(|_| v.nodes.values().all(Option::is_some));
    if let Some(newest) = newest.filter(|n| *n > v.active_format) {
        println!(
            "every node speaks format {newest}: run `mailgrid admin cluster upgrade-finish` to use it"
        );
    }
}

/// Per node its replicas and leaders against the plan, then the moves.
fn print_placement(p: &PlacementStatus) {
    println!(
        "{:<8} {:>6} {:>18} {:>18}  state",
        "node", "weight", "replicas/target", "leaders/target"
    );
    for n in &p.nodes {
        let state = match (n.draining, n.drained, n.replace_by) {
            (_, true, _) => "drained: holds nothing, safe to stop or remove".to_string(),
            (true, false, Some(new)) => format!("being replaced by node {new}"),
            (true, false, None) => "draining".to_string(),
            (false, _, _) if n.replicas == n.replicas_target && n.leaders == n.leaders_target => {
                "balanced".to_string()
            }
            (false, _, _) => "moving".to_string(),
        };
        println!(
            "node {:>3} {:>6} {:>18} {:>18}  {}",
            n.id,
            n.weight,
            format!("{}/{}", n.replicas, n.replicas_target),
            format!("{}/{}", n.leaders, n.leaders_target),
            state
        );
    }
    let estimate = p
        .estimate_s
        .filter(|_| p.moves_pending + p.moves_running > 0)
        .map(|s| format!(", about {s} s left"))
        .unwrap_or_default();
    let mean = p
        .move_mean_ms
        .map(|ms| format!(", {:.1} s per move", ms as f64 / 1000.0))
        .unwrap_or_default();
    println!(
        "moves: {} pending, {} running, {} done{mean}{estimate}",
        p.moves_pending, p.moves_running, p.moves_done
    );
}

/// What runs without redundancy or not at all, one sentence per set of groups in the same
/// state: a group whose live voters are just a majority stops at the next failure; one with a
/// single live data voter (the others dead, a witness beside it) has one copy of its mail.
pub fn degraded(status: &ClusterStatus, health: &[NodeHealth]) -> Vec<String> {
    // A node that answers but reports a problem (a failed disk) votes in nothing.
    let up = |id: u64| {
        status.nodes.iter().any(|n| n.id == id && n.reachable)
            && !health.iter().any(|h| h.id == id && !h.problems.is_empty())
    };
    let witness = |id: u64| {
        health
            .iter()
            .any(|h| h.id == id && h.role == storage::meta::NodeRole::Witness)
    };
    let mut by_state: std::collections::BTreeMap<String, Vec<Option<u32>>> = Default::default();
    for p in &status.partitions {
        let name = p.partition;
        let voters = &p.voters;
        if voters.is_empty() {
            by_state
                .entry("no node reports the group: unavailable".into())
                .or_default()
                .push(name);
            continue;
        }
        let live: Vec<u64> = voters.iter().copied().filter(|v| up(*v)).collect();
        let majority = voters.len() / 2 + 1;
        let data: Vec<u64> = voters.iter().copied().filter(|v| !witness(*v)).collect();
        let live_data: Vec<u64> = data.iter().copied().filter(|v| up(*v)).collect();
        let state = if voters.len() == 1 && live.len() == 1 {
            "a single voter: no redundancy".to_string()
        } else if live.len() < majority {
            format!(
                "unavailable: {} of {} voters up, a majority is {majority}",
                live.len(),
                voters.len()
            )
        } else if live_data.len() == 1 && data.len() > 1 && p.partition.is_some() {
            format!(
                "one data replica left (node {}); a second failure stops it",
                live_data[0]
            )
        } else if live.len() == majority && voters.len() > 1 {
            format!(
                "no redundancy: {} of {} voters up; one more failure stops it",
                live.len(),
                voters.len()
            )
        } else {
            continue;
        };
        by_state.entry(state).or_default().push(name);
    }
    by_state
        .into_iter()
        .map(|(state, groups)| format!("{}: {state}", group_ranges(&groups)))
        .collect()
}

/// "meta,p0-p7,p9": groups named compactly, partitions in runs.
fn group_ranges(groups: &[Option<u32>]) -> String {
    let mut out: Vec<String> = Vec::new();
    if groups.contains(&None) {
        out.push("meta".into());
    }
    let mut partitions: Vec<u32> = groups.iter().flatten().copied().collect();
    partitions.sort_unstable();
    let mut i = 0;
    while i < partitions.len() {
        let start = partitions[i];
        while i + 1 < partitions.len() && partitions[i + 1] == partitions[i] + 1 {
            i += 1;
        }
        let end = partitions[i];
        out.push(if start == end {
            format!("p{start}")
        } else {
            format!("p{start}-p{end}")
        });
        i += 1;
    }
    out.join(",")
}

fn print_status(
    status: &ClusterStatus,
    placement: Option<&PlacementStatus>,
    health: &[NodeHealth],
    versions: Option<&service::api::ClusterVersions>,
    json: bool,
) -> anyhow::Result<()> {
    let version = |id: u64| {
        versions
            .and_then(|v| v.nodes.get(&id).cloned().flatten())
            .map(|n| n.binary)
    };
    let degraded = degraded(status, health);
    let role = |id: u64| {
        health
            .iter()
            .find(|h| h.id == id)
            .map(|h| match h.role {
                storage::meta::NodeRole::Data => "data",
                storage::meta::NodeRole::Witness => "witness",
            })
            .unwrap_or("data")
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({
                "cluster": status.cluster,
                "nodes": status.nodes.iter().map(|n| serde_json::json!({"id": n.id, "cluster_addr": n.cluster_addr, "listeners": n.listeners, "reachable": n.reachable, "role": role(n.id), "version": version(n.id),
                    "problems": health.iter().find(|h| h.id == n.id).map(|h| h.problems.clone()).unwrap_or_default()})).collect::<Vec<_>>(),
                "groups": status.partitions.iter().map(|p| serde_json::json!({
                    "group": p.group, "partition": p.partition, "placement": p.placement, "voters": p.voters,
                    "learners": p.learners, "leader": p.leader, "term": p.term, "healthy": p.healthy,
                })).collect::<Vec<_>>(),
                "views": status.views,
                "placement": placement,
                "degraded": degraded,
                "format": versions.map(|v| v.active_format),
            }))?
        );
        return Ok(());
    }
    if let Some(c) = &status.cluster {
        let format = versions
            .map(|v| format!(", format {}", v.active_format))
            .unwrap_or_default();
        println!(
            "cluster {}: {} partitions, replication factor {}{format}",
            c.cluster_id, c.partitions, c.replicas
        );
    }
    for n in &status.nodes {
        let listeners: Vec<String> = n
            .listeners
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let role = if role(n.id) == "witness" {
            " witness"
        } else {
            ""
        };
        let release = version(n.id)
            .map(|v| format!(" mailgrid {v}"))
            .unwrap_or_default();
        println!(
            "node {:>3}  {:<22} {:<12} {}{role}{release}",
            n.id,
            n.cluster_addr,
            if n.reachable { "up" } else { "UNREACHABLE" },
            listeners.join(", ")
        );
        if let Some(h) = health.iter().find(|h| h.id == n.id) {
            for problem in &h.problems {
                println!("          {problem}");
            }
        }
    }
    if degraded.is_empty() {
        println!("redundancy: every group can lose a voter");
    } else {
        println!("DEGRADED:");
        for line in &degraded {
            println!("  {line}");
        }
    }
    if let Some(p) = placement {
        print_placement(p);
    }
    println!(
        "{:<10} {:<8} {:<14} {:<14} health",
        "group", "leader", "voters", "placement"
    );
    for p in &status.partitions {
        let name = p
            .partition
            .map(|x| format!("p{x}"))
            .unwrap_or_else(|| "meta".into());
        let ids = |v: &[u64]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        println!(
            "{:<10} {:<8} {:<14} {:<14} {}",
            name,
            p.leader
                .map(|l| l.to_string())
                .unwrap_or_else(|| "-".into()),
            ids(&p.voters),
            ids(&p.placement),
            if p.healthy { "ok" } else { "NO LEADER" }
        );
    }
    Ok(())
}

#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: signal(2) with SIG_DFL installs no handler code; it is called before any thread
    // is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use storage::meta::NodeRole;

    fn status(up: &[u64], groups: &[(Option<u32>, &[u64])]) -> ClusterStatus {
        ClusterStatus {
            cluster: None,
            nodes: (1..=4)
                .map(|id| NodeStatus {
                    id,
                    cluster_addr: String::new(),
                    listeners: Default::default(),
                    reachable: up.contains(&id),
                })
                .collect(),
            partitions: groups
                .iter()
                .map(|(partition, voters)| PartitionStatus {
                    partition: *partition,
                    group: partition.map(|p| p as u64 + 1).unwrap_or(0),
                    placement: voters.to_vec(),
                    voters: voters.to_vec(),
                    learners: Vec::new(),
                    leader: voters.first().copied(),
                    term: 1,
                    joint: false,
                    healthy: true,
                })
                .collect(),
            views: Default::default(),
        }
    }

    fn roles(witness: Option<u64>) -> Vec<NodeHealth> {
        (1..=4)
            .map(|id| NodeHealth {
                id,
                role: if Some(id) == witness {
                    NodeRole::Witness
                } else {
                    NodeRole::Data
                },
                problems: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn degraded_names_groups_without_redundancy_and_single_data_copies() {
        // Goal: status says plainly what one more failure would stop, per set of groups.
        let groups: &[(Option<u32>, &[u64])] = &[
            (None, &[1, 2, 3]),
            (Some(0), &[1, 2, 3]),
            (Some(1), &[2, 1, 3]),
            (Some(2), &[1, 2, 3]),
            (Some(5), &[1, 2, 3]),
        ];
        // Everything up: nothing degraded.
        assert!(degraded(&status(&[1, 2, 3], groups), &roles(Some(3))).is_empty());
        // Data node 1 down beside a witness: one data copy of every partition's mail.
        assert_eq!(
            degraded(&status(&[2, 3], groups), &roles(Some(3))),
            [
                "meta: no redundancy: 2 of 3 voters up; one more failure stops it",
                "p0-p2,p5: one data replica left (node 2); a second failure stops it",
            ]
        );
        // Three data nodes, one down: no redundancy, but two data copies.
        assert_eq!(
            degraded(&status(&[2, 3], groups), &roles(None)),
            ["meta,p0-p2,p5: no redundancy: 2 of 3 voters up; one more failure stops it"]
        );
        // Two down: unavailable.
        assert_eq!(
            degraded(&status(&[3], groups), &roles(Some(3))),
            ["meta,p0-p2,p5: unavailable: 1 of 3 voters up, a majority is 2"]
        );
        // A single-voter cluster has no redundancy even when all is well.
        let single: &[(Option<u32>, &[u64])] = &[(None, &[1]), (Some(0), &[1])];
        assert_eq!(
            degraded(&status(&[1], single), &roles(None)),
            ["meta,p0: a single voter: no redundancy"]
        );
    }
}
