//! `bench`: measurements of a real local mailgrid cluster. `bench core` reports commit
//! latency and throughput of deliveries, idle load per node, and the time from a leader's
//! kill -9 to its partition's next commit. `bench smtp` measures SMTP delivery (msgs/s and
//! latency) against a cluster it starts or any SMTP server given. `bench mailbox` measures
//! IMAP session mixes (ops/s, latency per command) and POP3 download sessions per second.
//! `bench spec` finds the largest user count a SPECmail2001-style mix serves within its
//! quality-of-service rules.
//! Figures are printed and written as JSON.

mod dip;
mod grow;
mod mailbox_load;
mod scale;
mod smtp_load;
mod spec;
mod witness;
mod workload;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use service::api::{ClientReply, ClientRequest, NodeStats};
use service::client::Client;
use storage::partition::Quota;

#[derive(Parser, Debug)]
struct Cli {
    /// Replicas of each partition in the clusters bench starts (1 to --nodes). Default 3, or
    /// the node count when that is smaller.
    #[arg(long, global = true)]
    replicas: Option<u32>,
    #[command(subcommand)]
    command: Cmd,
}

/// `--replicas` of this run: every cluster a command starts has the same shape.
static REPLICAS: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();

/// The replication factor a cluster of `nodes` gets (what `mailgrid dev` picks by default).
fn replicas(nodes: u32) -> u32 {
    REPLICAS.get().copied().flatten().unwrap_or(nodes.min(3))
}

/// How results name a cluster bench started.
fn cluster_label(nodes: u32, partitions: u32) -> String {
    format!(
        "mailgrid {nodes} nodes, {partitions} partitions, replication factor {}",
        replicas(nodes)
    )
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The replicated core: delivery commits, idle load, failover.
    Core {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value_t = 64)]
        partitions: u32,
        #[arg(long, default_value_t = 2000)]
        messages: usize,
        #[arg(long, default_value_t = 4096)]
        size: usize,
        /// Comma-separated numbers of concurrent senders.
        #[arg(long, default_value = "1,32")]
        concurrency: String,
        #[arg(long, default_value_t = 10)]
        idle_seconds: u64,
        #[arg(long, default_value_t = 3)]
        failovers: usize,
        /// The mailgrid binary (default: next to this one).
        #[arg(long)]
        mailgrid: Option<PathBuf>,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// SMTP delivery throughput and latency (through every node's MX, as DNS round robin).
    Smtp {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value_t = 64)]
        partitions: u32,
        /// Messages per (size, concurrency) run.
        #[arg(long, default_value_t = 2000)]
        messages: usize,
        /// Comma-separated message sizes in bytes, one run each; `spec` is a run whose
        /// messages draw their sizes from SPECmail2001's distribution (most a few KiB, a tail
        /// to 1 MiB).
        #[arg(long, default_value = "4096,102400")]
        sizes: String,
        /// Comma-separated numbers of concurrent senders.
        #[arg(long, default_value = "1,32")]
        concurrency: String,
        /// Send to these SMTP servers (HOST:PORT, comma-separated) instead of starting a
        /// mailgrid cluster; recipients are `--users` addresses made from `--user-format`.
        #[arg(long)]
        target: Option<String>,
        #[arg(long, default_value_t = 64)]
        users: usize,
        /// Recipient addresses, `{}` replaced by 0..users.
        #[arg(long, default_value = "bench{}@example.test")]
        user_format: String,
        /// After the runs, measure each node's idle CPU over this many seconds (own cluster).
        #[arg(long, default_value_t = 0)]
        idle_seconds: u64,
        /// Send each message to the node leading its recipient's partition (as it led when
        /// the run began), so no node forwards it to another: the cost of forwarding,
        /// measured apart. Own cluster only.
        #[arg(long, conflicts_with = "target")]
        direct: bool,
        /// Offer messages at this fixed rate (msgs/s, open loop) instead of as fast as the
        /// senders go; `--concurrency` then bounds the messages in flight. Below saturation,
        /// CPU per message is the work a message costs rather than what sharing the cores
        /// with other node processes adds to it. Latency counts from each message's due time.
        #[arg(long)]
        rate: Option<f64>,
        /// STARTTLS on every connection (the server's certificate is not verified).
        #[arg(long)]
        tls: bool,
        #[arg(long)]
        mailgrid: Option<PathBuf>,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Many accounts: provisioning rate, memory per node, disk per message, login latency.
    Scale {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value_t = 64)]
        partitions: u32,
        #[arg(long, default_value_t = 100_000)]
        users: usize,
        /// Messages delivered (4 KiB, spread over a tenth of the users).
        #[arg(long, default_value_t = 20_000)]
        messages: usize,
        /// Users whose IMAP LOGIN is timed (twice: first login, then again).
        #[arg(long, default_value_t = 2000)]
        logins: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// First logins a second for the paced measurement (other users than the 8-at-once
        /// one). SPECmail2001's busy hour is 0.6 POP3 logins per user per hour: 17/s for
        /// 100,000 users.
        #[arg(long, default_value_t = 50.0)]
        login_rate: f64,
        /// The stored hash of every account's password, which must be `bench` (default: an
        /// argon2id hash of it, as `user add` makes by default). `$(bench hash bench --scheme
        /// sha512-crypt)` times accounts made with `[auth] password_scheme = "sha512-crypt"`,
        /// and `$(openssl passwd -6 bench)` ones imported from Dovecot with SHA512-CRYPT.
        #[arg(long)]
        password_hash: Option<String>,
        #[arg(long)]
        mailgrid: Option<PathBuf>,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Capacity grown online: a filled 3-node cluster measured, nodes 4 and 5 joined under a
    /// fixed SMTP load until the placement settles (time, p99 during), then the 5 measured.
    Grow {
        #[arg(long, default_value_t = 64)]
        partitions: u32,
        /// Mail stored before the join, in MiB.
        #[arg(long, default_value_t = 1024)]
        prefill_mib: u64,
        /// Messages (4 KiB) of each saturated throughput run.
        #[arg(long, default_value_t = 4000)]
        messages: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// The offered load (msgs/s) kept up while replicas move.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long)]
        mailgrid: Option<PathBuf>,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Two data nodes and a witness against three data nodes: SMTP msgs/s and p99 as ratios,
    /// the witness's CPU, memory and disk per 10,000 messages, and the failover dip when a
    /// data node is killed.
    Witness {
        #[arg(long, default_value_t = 64)]
        partitions: u32,
        /// Messages (4 KiB) of each saturated run.
        #[arg(long, default_value_t = 10000)]
        messages: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Seconds of load before the kill.
        #[arg(long, default_value_t = 10)]
        before: u64,
        /// Seconds of load after the kill.
        #[arg(long, default_value_t = 15)]
        after: u64,
        #[arg(long)]
        mailgrid: Option<PathBuf>,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// The failover dip: a steady SMTP load while one node is killed with SIGKILL; reports
    /// the throughput per interval, the dip and the time until throughput is back.
    Dip {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value_t = 64)]
        partitions: u32,
        #[arg(long, default_value_t = 16)]
        senders: usize,
        #[arg(long, default_value_t = 4096)]
        size: usize,
        /// Seconds of load before the kill.
        #[arg(long, default_value_t = 10)]
        before: u64,
        /// Seconds of load after the kill.
        #[arg(long, default_value_t = 15)]
        after: u64,
        /// Width of one throughput interval, in milliseconds.
        #[arg(long, default_value_t = 250)]
        bucket_ms: u64,
        #[arg(long)]
        mailgrid: Option<PathBuf>,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// IMAP session mix and POP3 download sessions (each client its own user, over TLS,
    /// spread over every node), after preloading every mailbox by SMTP.
    Mailbox {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value_t = 64)]
        partitions: u32,
        /// Comma-separated numbers of concurrent clients.
        #[arg(long, default_value = "10,50")]
        clients: String,
        /// Sessions each client runs, one after another.
        #[arg(long, default_value_t = 10)]
        sessions: usize,
        /// Size of the preloaded messages.
        #[arg(long, default_value_t = 4096)]
        size: usize,
        /// Run against these servers instead of a mailgrid cluster:
        /// `smtp=HOST:PORT,imaps=HOST:PORT,pop3s=HOST:PORT` (users box0.. in example.test
        /// must exist there, and log in with password "bench").
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        mailgrid: Option<PathBuf>,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Prints a hash of PASSWORD as a node with `[auth] password_scheme = SCHEME` stores it
    /// (for `--password-hash`).
    Hash {
        password: String,
        /// argon2id or sha512-crypt.
        #[arg(long, default_value = "argon2id")]
        scheme: String,
    },
    /// A SPECmail2001-style mix (SMTP arrivals and POP3 checks per user per busy hour,
    /// Poisson arrivals) at rising user counts; reports the largest count that meets the
    /// quality-of-service rules (95% of every step within 5 s, 95% of messages in the
    /// mailbox within 60 s, under 1% failed sessions).
    Spec {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value_t = 64)]
        partitions: u32,
        /// Comma-separated user counts, one load level each, smallest first.
        #[arg(long, default_value = "10000,20000,50000,100000")]
        users: String,
        /// Seconds of arrivals per level.
        #[arg(long, default_value_t = 120)]
        seconds: u64,
        /// Messages a user sends a day.
        #[arg(long, default_value_t = 2.0)]
        sent_per_day: f64,
        /// POP3 checks a user makes a day.
        #[arg(long, default_value_t = 4.0)]
        checks_per_day: f64,
        /// Share of a day's sessions in the busy hour.
        #[arg(long, default_value_t = 0.15)]
        busy_hour_share: f64,
        /// Go on after a level fails (default: stop at the first failure).
        #[arg(long)]
        keep_going: bool,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Run against these servers instead of a mailgrid cluster:
        /// `smtp=HOST:PORT,pop3s=HOST:PORT` (every `--user-format` account must log in with
        /// password "bench").
        #[arg(long)]
        target: Option<String>,
        /// Account addresses, `{}` replaced by the account's number.
        #[arg(long, default_value = "scale{}@example.test")]
        user_format: String,
        /// The argon2 hash (PHC string) of "bench" the accounts of a cluster started here
        /// get (default: a fresh one with mailgrid's own parameters); give a peer the same.
        #[arg(long)]
        password_hash: Option<String>,
        /// Messages per user delivered before the first level (a steady-state mailbox: as
        /// many as arrive between two checks), drawn around this mean.
        #[arg(long, default_value_t = 1.0)]
        prefill: f64,
        #[arg(long)]
        mailgrid: Option<PathBuf>,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
}

struct DevCluster {
    child: Child,
    /// What `mailgrid dev --json` printed.
    info: serde_json::Value,
    dir: PathBuf,
    nodes: Vec<(u64, u32, PathBuf, String)>,
    restarted: Vec<Child>,
    _tmp: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        for c in &mut self.restarted {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A dev cluster, once every partition has settled where the placement puts it (see
/// [`wait_settled`]): what a measurement starts from.
async fn start_cluster(bin: &Path, nodes: u32, partitions: u32) -> anyhow::Result<DevCluster> {
    start_topology(bin, nodes, partitions, false).await
}

/// [`start_cluster`], with a witness (node `nodes + 1`) beside the data nodes when `witness`.
async fn start_topology(
    bin: &Path,
    nodes: u32,
    partitions: u32,
    witness: bool,
) -> anyhow::Result<DevCluster> {
    let cluster = spawn_cluster(bin, nodes, partitions, witness)?;
    let client = Client::open(&cluster.nodes[0].2, None)?;
    let waited = wait_settled(&client).await?;
    if waited > Duration::from_secs(1) {
        eprintln!("the cluster settled its placement in {waited:.1?}");
    }
    Ok(cluster)
}

/// Waits until every group's voters are its placement, with a leader, no learners and no
/// membership change under way. `mailgrid dev` reports ready once every group has its
/// replicas; with more nodes than replicas, groups are still moving to the later nodes then,
/// and a measurement taken meanwhile counts that work too.
async fn wait_settled(client: &Client) -> anyhow::Result<Duration> {
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(180);
    loop {
        if let Ok(ClientReply::Status(s)) = client.request(ClientRequest::Status).await {
            let settled = s.partitions.iter().all(|p| {
                let mut voters = p.voters.clone();
                let mut placement = p.placement.clone();
                voters.sort_unstable();
                placement.sort_unstable();
                // The meta group keeps nodes past its fifth as learners for good.
                let partition_settled = p.learners.is_empty() && voters == placement;
                p.healthy
                    && p.leader.is_some()
                    && !p.joint
                    && (p.partition.is_none() || partition_settled)
            });
            if settled && s.nodes.iter().all(|n| n.reachable) {
                return Ok(started.elapsed());
            }
        }
        if std::time::Instant::now() > deadline {
            bail!("the cluster's groups did not settle on their placement within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn spawn_cluster(
    bin: &Path,
    nodes: u32,
    partitions: u32,
    witness: bool,
) -> anyhow::Result<DevCluster> {
    // One directory per cluster a run starts (some runs start two).
    static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("mailgrid-bench-{}-{n}", std::process::id()));
    let voters = nodes + u32::from(witness);
    let mut child = Command::new(bin)
        .args([
            "dev",
            "--nodes",
            &nodes.to_string(),
            "--partitions",
            &partitions.to_string(),
            "--replicas",
            &replicas(voters).to_string(),
            "--json",
            "--dir",
        ])
        .arg(&dir)
        .args(witness.then_some("--witness"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("dev stdout")?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    let v: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("dev printed {line:?}"))?;
    let nodes = v["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .map(|n| {
            (
                n["id"].as_u64().unwrap_or(0),
                n["pid"].as_u64().unwrap_or(0) as u32,
                PathBuf::from(n["data"].as_str().unwrap_or_default()),
                n["cluster"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    Ok(DevCluster {
        child,
        info: v.clone(),
        dir: dir.clone(),
        nodes,
        restarted: Vec::new(),
        _tmp: tempdir::Dir(dir),
    })
}

fn message(i: usize, size: usize) -> Vec<u8> {
    let mut m = format!("From: bench@example.test\r\nTo: user@example.test\r\nSubject: bench {i}\r\nMessage-ID: <{i}@bench>\r\n\r\n").into_bytes();
    while m.len() < size {
        m.extend_from_slice(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.\r\n");
    }
    m.truncate(size);
    m
}

async fn deliveries(
    clients: &[Arc<Client>],
    users: &[String],
    messages: usize,
    size: usize,
    concurrency: usize,
    run: usize,
) -> anyhow::Result<serde_json::Value> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let client = clients[w % clients.len()].clone();
        let users = users.to_vec();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= messages {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let body = message(i, size);
                let to = users[i % users.len()].clone();
                let t = Instant::now();
                client
                    .request(ClientRequest::Deliver {
                        recipients: vec![to],
                        body,
                        delivery_id: Some(format!("bench-{run}-{i}")),
                    })
                    .await?;
                latencies.push(t.elapsed());
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(smtp_load::summary(
        all,
        concurrency,
        size,
        started.elapsed().as_secs_f64(),
    ))
}

/// USER_HZ on Linux: the unit of /proc/PID/stat's CPU times.
const TICKS_PER_SEC: f64 = 100.0;

/// User + system CPU ticks of all these processes together.
fn total_cpu_ticks(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|p| cpu_ticks(*p)).sum()
}

/// Each node's CPU use (percent of one core) while nothing is asked of the cluster.
async fn idle_cpu(cluster: &DevCluster, seconds: u64) -> Vec<f64> {
    let before: Vec<Option<u64>> = cluster.nodes.iter().map(|n| cpu_ticks(n.1)).collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    cluster
        .nodes
        .iter()
        .zip(before)
        .map(|(n, a)| match (a, cpu_ticks(n.1)) {
            (Some(a), Some(b)) => (b - a) as f64 / TICKS_PER_SEC / seconds as f64 * 100.0,
            _ => f64::NAN,
        })
        .collect()
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// fdatasyncs and cluster calls served, summed over every node of the cluster.
async fn cluster_counters(cluster: &DevCluster) -> anyhow::Result<(u64, u64)> {
    let (mut syncs, mut calls) = (0, 0);
    for n in &cluster.nodes {
        let s = stats(&Client::open(&n.2, None)?).await?;
        syncs += s.syncs;
        calls += s.calls_served;
    }
    Ok((syncs, calls))
}

async fn stats(client: &Client) -> anyhow::Result<NodeStats> {
    match client.request(ClientRequest::NodeStats).await? {
        ClientReply::NodeStats(s) => Ok(s),
        other => bail!("unexpected {other:?}"),
    }
}

async fn idle(
    cluster: &DevCluster,
    clients: &[Arc<Client>],
    seconds: u64,
) -> anyhow::Result<serde_json::Value> {
    let before = futures::future::try_join_all(clients.iter().map(|c| stats(c))).await?;
    let cpu = idle_cpu(cluster, seconds).await;
    let after = futures::future::try_join_all(clients.iter().map(|c| stats(c))).await?;
    let mut per_node = Vec::new();
    for (i, n) in cluster.nodes.iter().enumerate() {
        // Two of the calls counted are our own stats requests.
        let calls = after[i]
            .calls_served
            .saturating_sub(before[i].calls_served + 1);
        let rpcs = calls as f64 / seconds as f64;
        per_node
            .push(serde_json::json!({ "node": n.0, "rpcs_per_sec": rpcs, "cpu_percent": cpu[i] }));
    }
    Ok(serde_json::json!({ "seconds": seconds, "nodes": per_node }))
}

/// For each user, the index in `servers` (SMTP listeners, in node order) of the node that
/// leads the user's partition now.
async fn leader_route(
    client: &Client,
    users: &[String],
    partitions: u32,
    servers: &[String],
) -> anyhow::Result<Vec<usize>> {
    let ClientReply::Status(s) = client.request(ClientRequest::Status).await? else {
        bail!("unexpected answer to status");
    };
    users
        .iter()
        .map(|u| {
            let group = group_of(u, partitions);
            let leader = s
                .partitions
                .iter()
                .find(|p| p.group == group)
                .and_then(|p| p.leader)
                .with_context(|| format!("group {group} has no leader"))?;
            let smtp = s
                .nodes
                .iter()
                .find(|n| n.id == leader)
                .and_then(|n| n.listeners.get("smtp"))
                .with_context(|| format!("node {leader} has no SMTP listener"))?;
            servers
                .iter()
                .position(|a| a == smtp)
                .with_context(|| format!("node {leader}'s SMTP listener {smtp} is not a target"))
        })
        .collect()
}

/// Group of a user, per the router's pinned hash.
fn group_of(user: &str, partitions: u32) -> u64 {
    service::router::partition_of(user, partitions) as u64 + 1
}

async fn failover(
    cluster: &mut DevCluster,
    bin: &Path,
    clients: &[Arc<Client>],
    users: &[String],
    partitions: u32,
    trial: usize,
) -> anyhow::Result<f64> {
    let user = &users[trial % users.len()];
    let group = group_of(user, partitions);
    let status = match clients[0].request(ClientRequest::Status).await? {
        ClientReply::Status(s) => s,
        other => bail!("unexpected {other:?}"),
    };
    let leader = status
        .partitions
        .iter()
        .find(|p| p.group == group)
        .and_then(|p| p.leader)
        .context("no leader")?;
    let idx = cluster
        .nodes
        .iter()
        .position(|n| n.0 == leader)
        .context("leader not in cluster")?;
    let via = clients
        .iter()
        .enumerate()
        .find(|(i, _)| *i != idx)
        .map(|(_, c)| c.clone())
        .context("no other node")?;
    let pid = cluster.nodes[idx].1;
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    let killed = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let r = via
            .request(ClientRequest::Deliver {
                recipients: vec![user.clone()],
                body: message(attempt, 512),
                delivery_id: Some(format!("failover-{trial}-{attempt}")),
            })
            .await;
        if r.is_ok() {
            break;
        }
    }
    let took = killed.elapsed().as_secs_f64();
    // Bring the node back and wait until every group is healthy again.
    let data = cluster.nodes[idx].2.clone();
    let child = Command::new(bin)
        .args(["serve", "--data"])
        .arg(&data)
        .arg("--config")
        .arg(data.with_extension("toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    cluster.nodes[idx].1 = child.id();
    cluster.restarted.push(child);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(ClientReply::Status(s)) = via.request(ClientRequest::Status).await {
            if s.partitions.iter().all(|p| p.healthy) && s.nodes.iter().all(|n| n.reachable) {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("cluster did not recover after failover trial {trial}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(took)
}

/// A run's latency spread as printed: `p50 X ms, p90 X ms, p99 X ms, max X ms`.
fn spread(r: &serde_json::Value, decimals: usize) -> String {
    ["p50", "p90", "p99", "max"]
        .iter()
        .map(|q| {
            let ms = r[format!("{q}_ms")].as_f64().unwrap_or(0.0);
            format!("{q} {ms:.decimals$} ms")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn mailgrid_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let bin = match given {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .join("mailgrid"),
    };
    if !bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release --bin mailgrid)",
            bin.display()
        );
    }
    Ok(bin)
}

fn numbers(list: &str, what: &str) -> anyhow::Result<Vec<usize>> {
    list.split(',')
        .map(|x| x.trim().parse().with_context(|| format!("{what}: {x:?}")))
        .collect()
}

fn write_results(out: &Path, name: &str, results: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let path = out.join(format!("{name}-{stamp}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(results)?)?;
    println!("{}", serde_json::to_string(results)?);
    eprintln!("results written to {}", path.display());
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    REPLICAS.get_or_init(|| cli.replicas);
    match cli.command {
        Cmd::Core {
            nodes,
            partitions,
            messages,
            size,
            concurrency,
            idle_seconds,
            failovers,
            mailgrid,
            out,
        } => {
            let bin = mailgrid_binary(mailgrid)?;
            core(
                &bin,
                nodes,
                partitions,
                messages,
                size,
                &concurrency,
                idle_seconds,
                failovers,
                &out,
            )
            .await
        }
        Cmd::Smtp {
            nodes,
            partitions,
            messages,
            sizes,
            concurrency,
            target,
            users,
            user_format,
            idle_seconds,
            direct,
            rate,
            tls,
            mailgrid,
            out,
        } => {
            if rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                bail!("--rate must be a positive number of messages per second");
            }
            let users: Vec<String> = (0..users)
                .map(|i| user_format.replace("{}", &i.to_string()))
                .collect();
            let mut cluster = None;
            let mut route = None;
            let servers: Vec<String> = match target {
                Some(t) => t.split(',').map(|s| s.trim().to_string()).collect(),
                None => {
                    let bin = mailgrid_binary(mailgrid)?;
                    let c = start_cluster(&bin, nodes, partitions).await?;
                    let client = Client::open(&c.nodes[0].2, None)?;
                    add_users(&client, &users).await?;
                    let servers: Vec<String> = c.info["nodes"]
                        .as_array()
                        .context("nodes")?
                        .iter()
                        .filter_map(|n| n["listeners"]["smtp"].as_str().map(str::to_string))
                        .collect();
                    if direct {
                        route = Some(leader_route(&client, &users, partitions, &servers).await?);
                    }
                    cluster = Some(c);
                    servers
                }
            };
            let mut runs = Vec::new();
            let stamp = std::process::id();
            let sizes = sizes
                .split(',')
                .map(smtp_load::Size::parse)
                .collect::<anyhow::Result<Vec<_>>>()?;
            for size in sizes {
                for c in numbers(&concurrency, "--concurrency")? {
                    let load = smtp_load::Load {
                        servers: servers.clone(),
                        users: users.clone(),
                        messages,
                        size,
                        concurrency: c,
                        run: format!("{stamp}-{}-{c}", size.tag()),
                        route: route.clone(),
                        rate,
                        tls,
                    };
                    let pids: Vec<u32> = cluster
                        .as_ref()
                        .map(|c| c.nodes.iter().map(|n| n.1).collect())
                        .unwrap_or_default();
                    let counters_before = match &cluster {
                        Some(c) => Some(cluster_counters(c).await?),
                        None => None,
                    };
                    let cpu_before = total_cpu_ticks(&pids);
                    let mut r = smtp_load::run(load).await?;
                    if let (Some(c), Some((syncs, calls))) = (&cluster, counters_before) {
                        // What the nodes did per message besides CPU: group commits (each one
                        // fdatasync covering whatever was ready) and calls between nodes.
                        let (syncs_after, calls_after) = cluster_counters(c).await?;
                        let per = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / messages as f64;
                        r["syncs_per_msg"] = per(syncs_after, syncs).into();
                        r["cluster_calls_per_msg"] = per(calls_after, calls).into();
                    }
                    let cpu_note = match (cpu_before, total_cpu_ticks(&pids)) {
                        (Some(a), Some(b)) if !pids.is_empty() => {
                            // CPU of every node process together, per stored message.
                            let cpu_seconds = (b - a) as f64 / TICKS_PER_SEC;
                            let per_msg = cpu_seconds * 1000.0 / messages as f64;
                            r["cpu_seconds"] = cpu_seconds.into();
                            r["cpu_ms_per_msg"] = per_msg.into();
                            format!(", {per_msg:.3} CPU ms/msg (all nodes)")
                        }
                        _ => String::new(),
                    };
                    let offered = rate.map(|r| format!(" ({r} offered)")).unwrap_or_default();
                    eprintln!(
                        "smtp {size} x{messages}, {c} senders: {:.0} msgs/s{offered}, {}{cpu_note}",
                        r["msgs_per_sec"].as_f64().unwrap_or(0.0),
                        spread(&r, 2)
                    );
                    runs.push(r);
                }
            }
            let mut results = serde_json::json!({
                "target": if cluster.is_some() { cluster_label(nodes, partitions) } else { servers.join(",") },
                "servers": servers,
                "direct": direct,
                "rate": rate,
                "runs": runs,
            });
            if let (Some(c), Some(route)) = (&cluster, &route) {
                // Leaders may have moved during the runs; what share of users no longer
                // went straight to theirs tells how direct the runs stayed.
                let client = Client::open(&c.nodes[0].2, None)?;
                let now = leader_route(&client, &users, partitions, &servers).await?;
                let moved = now.iter().zip(route).filter(|(a, b)| a != b).count();
                let share = moved as f64 / users.len().max(1) as f64;
                eprintln!(
                    "direct: {:.1}% of users' leaders moved during the runs",
                    share * 100.0
                );
                results["direct_moved_share"] = share.into();
            }
            if let (Some(c), true) = (&cluster, idle_seconds > 0) {
                let idle = idle_cpu(c, idle_seconds).await;
                eprintln!("idle CPU per node over {idle_seconds} s: {idle:?} %");
                results["idle_cpu_percent"] = idle.into();
            }
            drop(cluster);
            write_results(&out, "smtp", &results)
        }
        Cmd::Scale {
            nodes,
            partitions,
            users,
            messages,
            logins,
            concurrency,
            login_rate,
            password_hash,
            mailgrid,
            out,
        } => {
            if !(login_rate > 0.0 && login_rate.is_finite()) {
                bail!("--login-rate must be a positive number of logins a second");
            }
            let hash = match password_hash {
                Some(h) => service::mail::check_password_hash(&h).map_err(anyhow::Error::msg)?,
                None => {
                    service::mail::hash_password("bench", service::mail::PasswordScheme::Argon2id)
                        .map_err(anyhow::Error::msg)?
                }
            };
            let scheme = hash.split('$').nth(1).unwrap_or_default().to_string();
            let bin = mailgrid_binary(mailgrid)?;
            let cluster = start_cluster(&bin, nodes, partitions).await?;
            let mut clients = Vec::new();
            for n in &cluster.nodes {
                clients.push(Arc::new(Client::open(&n.2, None)?));
            }
            let pids: Vec<u32> = cluster.nodes.iter().map(|n| n.1).collect();
            let rss = |pids: &[u32]| -> Vec<u64> {
                pids.iter()
                    .map(|p| scale::rss(*p).unwrap_or(0) / (1 << 20))
                    .collect()
            };
            let disk = || -> u64 { cluster.nodes.iter().map(|n| scale::disk_bytes(&n.2)).sum() };
            let rss_empty = rss(&pids);
            eprintln!("provisioning {users} accounts (password hash ${scheme}$)");
            let rate = scale::provision(&clients, users, &hash, concurrency).await?;
            let rss_users = rss(&pids);
            eprintln!("{users} accounts at {rate:.0}/s; RSS per node (MiB): {rss_empty:?} empty, {rss_users:?} with the accounts");
            let sample: Vec<String> = (0..users).step_by(10).map(scale::user).collect();
            let disk_before = disk();
            let delivered = deliveries(&clients, &sample, messages, 4096, concurrency, 0).await?;
            let disk_after = disk();
            let per_message = disk_after.saturating_sub(disk_before) as f64 / messages as f64;
            let rss_mail = rss(&pids);
            eprintln!(
                "{messages} deliveries at {:.0} msgs/s; disk {:.0} bytes per 4 KiB message (all {nodes} nodes, {:.0} per replica); RSS per node (MiB): {rss_mail:?}",
                delivered["msgs_per_sec"].as_f64().unwrap_or(0.0),
                per_message,
                per_message / nodes.min(3) as f64
            );
            let servers = cluster_listeners(&cluster, "imaps");
            // Users spread over all partitions, none logged in before.
            let step = (users / logins.max(1)).max(1);
            let who: Vec<String> = (0..users)
                .step_by(step)
                .take(logins)
                .map(scale::user)
                .collect();
            let first = scale::logins(&servers, &who, "bench", 8).await?;
            let again = scale::logins(&servers, &who, "bench", 8).await?;
            // As many other users, halfway between the first sample's.
            let paced_who: Vec<String> = (step / 2..users)
                .step_by(step)
                .take(logins)
                .map(scale::user)
                .collect();
            let paced = scale::paced_logins(&servers, &paced_who, "bench", login_rate).await?;
            let ms = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0);
            eprintln!(
                "IMAP LOGIN of {} users, 8 at once: first p50 {:.2} ms p99 {:.2} ms; again p50 {:.2} ms p99 {:.2} ms",
                who.len(),
                ms(&first, "p50_ms"),
                ms(&first, "p99_ms"),
                ms(&again, "p50_ms"),
                ms(&again, "p99_ms"),
            );
            eprintln!(
                "IMAP LOGIN of {} other users, first, {login_rate}/s: p50 {:.2} ms p99 {:.2} ms",
                paced_who.len(),
                ms(&paced, "p50_ms"),
                ms(&paced, "p99_ms"),
            );
            let results = serde_json::json!({
                "nodes": nodes,
                "partitions": partitions,
                "replicas": replicas(nodes),
                "users": users,
                "password_scheme": scheme,
                "provision_per_sec": rate,
                "rss_mib_empty": rss_empty,
                "rss_mib_with_users": rss_users,
                "rss_mib_after_mail": rss_mail,
                "deliveries": delivered,
                "disk_bytes_per_message_all_nodes": per_message,
                "login_first": first,
                "login_again": again,
                "login_first_paced": paced,
            });
            drop(cluster);
            write_results(&out, "scale", &results)
        }
        Cmd::Grow {
            partitions,
            prefill_mib,
            messages,
            concurrency,
            rate,
            mailgrid,
            out,
        } => {
            if !(rate.is_finite() && rate > 0.0) {
                bail!("--rate must be a positive number of messages per second");
            }
            let bin = mailgrid_binary(mailgrid)?;
            let args = grow::Args {
                partitions,
                prefill_mib,
                messages,
                concurrency,
                rate,
            };
            let results = grow::run(&bin, args).await?;
            write_results(&out, "grow", &results)
        }
        Cmd::Witness {
            partitions,
            messages,
            concurrency,
            before,
            after,
            mailgrid,
            out,
        } => {
            if messages == 0 {
                bail!("--messages must be positive");
            }
            let bin = mailgrid_binary(mailgrid)?;
            let args = witness::Args {
                partitions,
                messages,
                concurrency,
                before,
                after,
            };
            let results = witness::run(&bin, args).await?;
            write_results(&out, "witness", &results)
        }
        Cmd::Dip {
            nodes,
            partitions,
            senders,
            size,
            before,
            after,
            bucket_ms,
            mailgrid,
            out,
        } => {
            let bin = mailgrid_binary(mailgrid)?;
            let cluster = start_cluster(&bin, nodes, partitions).await?;
            let client = Client::open(&cluster.nodes[0].2, None)?;
            let users: Vec<String> = (0..64).map(|i| format!("bench{i}@example.test")).collect();
            add_users(&client, &users).await?;
            let servers = cluster_listeners(&cluster, "smtp");
            let bucket = Duration::from_millis(bucket_ms.max(10));
            let load = dip::Load {
                servers,
                users,
                senders,
                size,
                run: format!("dip-{}", std::process::id()),
                duration: Duration::from_secs(before + after),
                bucket,
            };
            let started = Instant::now();
            let running = tokio::spawn(dip::run(load, started));
            tokio::time::sleep(Duration::from_secs(before)).await;
            // The last node: never the one `dev` created the cluster on.
            let victim = cluster.nodes.last().context("no nodes")?.clone();
            Command::new("kill")
                .args(["-KILL", &victim.1.to_string()])
                .status()?;
            let kill_at = started.elapsed();
            eprintln!("killed node {} at {:.2} s", victim.0, kill_at.as_secs_f64());
            let outcome = running.await?;
            let (base, lowest, back) = dip::dip(&outcome.buckets, bucket, kill_at);
            let per_second: Vec<f64> = dip::windows(&outcome.buckets, bucket)
                .into_iter()
                .step_by((1000 / bucket.as_millis().max(1)) as usize)
                .collect();
            eprintln!("msgs/s per second: {per_second:?}");
            eprintln!(
                "dip: {base:.0} msgs/s before the kill; lowest one-second rate after it {lowest:.0} msgs/s; \
                 back to 90% after {}; {} messages, {} retried attempts",
                back.map(|s| format!("{s:.2} s")).unwrap_or_else(|| "never (within the run)".into()),
                outcome.messages,
                outcome.retries
            );
            let results = serde_json::json!({
                "nodes": nodes,
                "partitions": partitions,
                "replicas": replicas(nodes),
                "senders": senders,
                "size": size,
                "killed_node": victim.0,
                "kill_at_s": kill_at.as_secs_f64(),
                "bucket_ms": bucket.as_millis() as u64,
                "buckets": outcome.buckets,
                "msgs_per_sec_before": base,
                "lowest_msgs_per_sec_after": lowest,
                "recovered_after_s": back,
                "messages": outcome.messages,
                "retries": outcome.retries,
            });
            drop(cluster);
            write_results(&out, "dip", &results)
        }
        Cmd::Mailbox {
            nodes,
            partitions,
            clients,
            sessions,
            size,
            target,
            mailgrid,
            out,
        } => {
            let counts = numbers(&clients, "--clients")?;
            let most = counts.iter().copied().max().unwrap_or(1);
            let users: Vec<String> = (0..most).map(|i| format!("box{i}@example.test")).collect();
            let (cluster, services) = match &target {
                Some(t) => (None, parse_services(t, &["smtp", "imaps", "pop3s"])?),
                None => {
                    let bin = mailgrid_binary(mailgrid)?;
                    let cluster = start_cluster(&bin, nodes, partitions).await?;
                    let client = Client::open(&cluster.nodes[0].2, None)?;
                    add_users(&client, &users).await?;
                    let services = ["smtp", "imaps", "pop3s"]
                        .into_iter()
                        .map(|service| (service.to_string(), cluster_listeners(&cluster, service)))
                        .collect();
                    (Some(cluster), services)
                }
            };
            let listeners = |service: &str| -> Vec<String> {
                services.get(service).cloned().unwrap_or_default()
            };
            // Every IMAP and every POP3 session removes one message (IDLE wake-ups add one);
            // the first users serve every run.
            let per_user = 2 * sessions * counts.len() + 10;
            let preload = smtp_load::Load {
                servers: listeners("smtp"),
                users: users.clone(),
                messages: per_user * users.len(),
                size: smtp_load::Size::Fixed(size),
                concurrency: 32,
                run: format!("preload-{}", std::process::id()),
                route: None,
                rate: None,
                tls: false,
            };
            smtp_load::run(preload).await?;
            // A peer may answer 250 before the message is in the mailbox: wait until it is.
            mailbox_load::wait_loaded(&listeners("imaps"), &users, "bench", per_user).await?;
            let mut imap_runs = Vec::new();
            let mut idle_runs = Vec::new();
            let mut pop3_runs = Vec::new();
            for c in counts {
                let load = |servers: Vec<String>| mailbox_load::Load {
                    servers,
                    smtp: listeners("smtp"),
                    users: users[..c].to_vec(),
                    password: "bench".into(),
                    sessions_per_client: sessions,
                };
                let r = mailbox_load::imap(load(listeners("imaps"))).await?;
                eprintln!(
                    "imap session mix, {c} clients: {:.0} ops/s, {}",
                    r["ops_per_sec"].as_f64().unwrap_or(0.0),
                    spread(&r, 2)
                );
                imap_runs.push(r);
                let r = mailbox_load::idle_wakeups(load(listeners("imaps"))).await?;
                eprintln!(
                    "imap idle wake-ups, {c} clients: {} after the 250",
                    spread(&r, 1)
                );
                idle_runs.push(r);
                let r = mailbox_load::pop3(load(listeners("pop3s"))).await?;
                eprintln!(
                    "pop3 download sessions, {c} clients: {:.1} sessions/s, {}",
                    r["sessions_per_sec"].as_f64().unwrap_or(0.0),
                    spread(&r, 1)
                );
                pop3_runs.push(r);
            }
            let results = serde_json::json!({
                "target": target.clone().unwrap_or_else(|| cluster_label(nodes, partitions)),
                "message_size": size,
                "imap": imap_runs,
                "imap_idle": idle_runs,
                "pop3": pop3_runs,
            });
            drop(cluster);
            write_results(&out, "mailbox", &results)
        }
        Cmd::Hash { password, scheme } => {
            let scheme = scheme.parse().map_err(anyhow::Error::msg)?;
            println!(
                "{}",
                service::mail::hash_password(&password, scheme).map_err(anyhow::Error::msg)?
            );
            Ok(())
        }
        Cmd::Spec {
            nodes,
            partitions,
            users,
            seconds,
            sent_per_day,
            checks_per_day,
            busy_hour_share,
            keep_going,
            seed,
            target,
            user_format,
            password_hash,
            prefill,
            mailgrid,
            out,
        } => {
            let levels = numbers(&users, "--users")?;
            let most = levels.iter().copied().max().unwrap_or(0);
            let probes = 4;
            let (cluster, services) = match &target {
                Some(t) => (None, parse_services(t, &["smtp", "pop3s"])?),
                None => {
                    if user_format != "scale{}@example.test" {
                        bail!("--user-format applies to --target only (a cluster started here has scale{{}}@example.test)");
                    }
                    let bin = mailgrid_binary(mailgrid)?;
                    let cluster = start_cluster(&bin, nodes, partitions).await?;
                    let mut clients = Vec::new();
                    for n in &cluster.nodes {
                        clients.push(Arc::new(Client::open(&n.2, None)?));
                    }
                    let hash = match password_hash {
                        Some(h) => h,
                        None => service::mail::hash_password(
                            "bench",
                            service::mail::PasswordScheme::Argon2id,
                        )
                        .map_err(anyhow::Error::msg)?,
                    };
                    eprintln!("provisioning {} accounts", most + probes);
                    let rate = scale::provision(&clients, most + probes, &hash, 32).await?;
                    eprintln!("provisioned at {rate:.0} accounts/s");
                    let services = ["smtp", "pop3s"]
                        .into_iter()
                        .map(|service| (service.to_string(), cluster_listeners(&cluster, service)))
                        .collect();
                    (Some(cluster), services)
                }
            };
            let target = Arc::new(spec::Target {
                smtp: services["smtp"].clone(),
                pop3s: services["pop3s"].clone(),
                user_format,
                password: "bench".into(),
                probes,
                probe_rate: 1.0,
                max_in_flight: 2000,
            });
            if prefill > 0.0 {
                let (count, rate) = spec::prefill(&target, most, prefill, seed).await?;
                eprintln!("prefilled {count} messages at {rate:.0} msgs/s");
            }
            let settled = spec::settle(&target).await?;
            eprintln!("settled: a message sent now reached its mailbox in {settled:.1?}");
            let profile = spec::Profile {
                sent_per_day,
                checks_per_day,
                busy_hour_share,
            };
            let rules = spec::Rules::default();
            let mut reports = Vec::new();
            let mut largest = None;
            for (i, users) in levels.into_iter().enumerate() {
                let report = spec::level(
                    target.clone(),
                    profile,
                    rules,
                    users,
                    seconds,
                    seed + i as u64,
                )
                .await?;
                let pass = report["pass"].as_bool().unwrap_or(false);
                eprintln!(
                    "{users} users ({:.0} SPEC msgs/min; {:.1} SMTP sessions/s, {:.1} POP3 checks/s): {} — errors {:.2}%, delivery p95 {:.0} ms, slowest step p95 {:.0} ms, generator lag p99 {:.0} ms",
                    report["spec_messages_per_minute"].as_f64().unwrap_or(0.0),
                    report["offered"]["smtp_sessions_per_sec"].as_f64().unwrap_or(0.0),
                    report["offered"]["pop3_checks_per_sec"].as_f64().unwrap_or(0.0),
                    if pass { "PASS" } else { "FAIL" },
                    report["error_rate"].as_f64().unwrap_or(0.0) * 100.0,
                    report["delivery"]["p95_ms"].as_f64().unwrap_or(0.0),
                    report["steps"]
                        .as_object()
                        .map(|steps| steps
                            .values()
                            .filter_map(|s| s["p95_ms"].as_f64())
                            .fold(0.0, f64::max))
                        .unwrap_or(0.0),
                    report["generator_lag_p99_ms"].as_f64().unwrap_or(0.0),
                );
                reports.push(report);
                if pass {
                    largest = Some(users);
                } else if !keep_going {
                    break;
                }
            }
            let results = serde_json::json!({
                "target": target.smtp,
                "nodes": if cluster.is_some() { Some(nodes) } else { None },
                "profile": {
                    "sent_per_day": sent_per_day,
                    "checks_per_day": checks_per_day,
                    "busy_hour_share": busy_hour_share,
                    "mean_size_bytes": spec::mean(&spec::SIZES),
                    "mean_recipients": spec::mean(&spec::RECIPIENTS),
                },
                "levels": reports,
                "largest_users_passing": largest,
                "largest_spec_messages_per_minute": largest.map(|u| profile.messages_per_minute(u)),
            });
            match largest {
                Some(u) => eprintln!(
                    "largest user count meeting the rules: {u} ({:.0} SPECmail2001-style msgs/min)",
                    profile.messages_per_minute(u)
                ),
                None => eprintln!("no level met the rules"),
            }
            drop(cluster);
            write_results(&out, "spec", &results)
        }
    }
}

/// Every node's address for `service`, as `mailgrid dev --json` printed them.
fn cluster_listeners(cluster: &DevCluster, service: &str) -> Vec<String> {
    cluster.info["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|n| n["listeners"][service].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `smtp=HOST:PORT,imaps=HOST:PORT,...` as a map of service to addresses.
fn parse_services(
    text: &str,
    needed: &[&str],
) -> anyhow::Result<std::collections::BTreeMap<String, Vec<String>>> {
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for part in text.split(',') {
        let (service, addr) = part
            .split_once('=')
            .with_context(|| format!("--target: {part:?} is not SERVICE=HOST:PORT"))?;
        out.entry(service.to_string())
            .or_default()
            .push(addr.to_string());
    }
    for needed in needed {
        if !out.contains_key(*needed) {
            anyhow::bail!("--target names no {needed} server");
        }
    }
    Ok(out)
}

async fn add_users(client: &Client, users: &[String]) -> anyhow::Result<()> {
    for u in users {
        client
            .request(ClientRequest::UserAdd {
                address: u.clone(),
                password: "bench".into(),
                quota: Quota::default(),
            })
            .await?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn core(
    bin: &Path,
    nodes: u32,
    partitions: u32,
    messages: usize,
    size: usize,
    concurrency: &str,
    idle_seconds: u64,
    failovers: usize,
    out: &Path,
) -> anyhow::Result<()> {
    if failovers > 0 && replicas(nodes) < 3 {
        bail!("--failovers needs 3 or more replicas: with fewer, a killed leader leaves no majority to elect another");
    }
    let bin = bin.to_path_buf();
    let mut cluster = start_cluster(&bin, nodes, partitions).await?;
    eprintln!("cluster of {nodes} nodes up in {}", cluster.dir.display());
    let mut clients = Vec::new();
    for n in &cluster.nodes {
        clients.push(Arc::new(Client::open(&n.2, None)?));
    }
    let users: Vec<String> = (0..64).map(|i| format!("bench{i}@example.test")).collect();
    add_users(&clients[0], &users).await?;
    let mut results = serde_json::Map::new();
    let mut runs = Vec::new();
    for (run, c) in concurrency.split(',').enumerate() {
        let c: usize = c.trim().parse().context("--concurrency")?;
        let r = deliveries(&clients, &users, messages, size, c, run).await?;
        eprintln!(
            "deliver {size} B x{messages}, {c} senders: {:.0} msgs/s, p50 {:.2} ms, p99 {:.2} ms",
            r["msgs_per_sec"].as_f64().unwrap_or(0.0),
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0)
        );
        runs.push(r);
    }
    results.insert("deliveries".into(), runs.into());
    let idle = idle(&cluster, &clients, idle_seconds).await?;
    eprintln!("idle: {idle}");
    results.insert("idle".into(), idle);
    let mut times = Vec::new();
    for trial in 0..failovers {
        let t = failover(&mut cluster, &bin, &clients, &users, partitions, trial).await?;
        eprintln!("failover {trial}: leader kill -9 → next commit in {t:.3} s");
        times.push(t);
    }
    results.insert("failover_seconds".into(), times.into());
    results.insert("nodes".into(), nodes.into());
    results.insert("partitions".into(), partitions.into());
    results.insert("replicas".into(), replicas(nodes).into());
    write_results(out, "core", &serde_json::Value::Object(results))
}
