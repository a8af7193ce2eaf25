//! `chaos`: starts a cluster of real `mailgrid` nodes, runs an SMTP delivery workload against
//! random nodes while the nemesis kills, restarts and pauses them, heals everything, reads
//! every mailbox back and checks the history. Exits non-zero on any violation.

mod cluster;
mod nemesis;
mod report;
mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chaos::{check, Delivery, Stored, Violation};
use clap::Parser;
use mailgrid::api::{ClientReply, ClientRequest};
use storage::partition::Quota;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::nemesis::Fault;
use crate::workload::{Attempt, Workload};

#[derive(Parser, Debug)]
#[command(about = "Jepsen-style fault suite for mailgrid: nothing acknowledged may be lost")]
struct Cli {
    /// Node processes to run.
    #[arg(long, default_value_t = 5)]
    nodes: u32,
    /// Seconds of workload under faults.
    #[arg(long, default_value_t = 60)]
    time: u64,
    /// Fixes the workload and the fault schedule (random when absent).
    #[arg(long)]
    seed: Option<u64>,
    /// Faults to inject, comma-separated: kill, kill-leader, kill-minority, pause, rolling.
    #[arg(long, default_value = "kill,kill-leader,pause")]
    nemesis: String,
    /// Concurrent SMTP clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Recipients the messages are spread over.
    #[arg(long, default_value_t = 20)]
    users: usize,
    #[arg(long, default_value_t = 16)]
    partitions: u32,
    /// The mailgrid binary (default: next to this one).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Where the results folder of this run is made.
    #[arg(long, default_value = "chaos/results")]
    out: PathBuf,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("chaos: {e:#}");
            std::process::exit(2);
        }
    }
}

fn mailgrid_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let bin = match given {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .context("locating this executable")?
            .join("mailgrid"),
    };
    if !bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release --bin mailgrid) or pass --bin",
            bin.display()
        );
    }
    Ok(bin.canonicalize()?)
}

/// Runs the suite; whether the checker found nothing.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    let faults = Fault::parse_list(&cli.nemesis).map_err(anyhow::Error::msg)?;
    if !(3..=9).contains(&cli.nodes) {
        bail!("--nodes must be between 3 and 9 (replication factor 3)");
    }
    if cli.users == 0 || cli.clients == 0 || cli.time == 0 {
        bail!("--users, --clients and --time must be positive");
    }
    let seed = cli.seed.unwrap_or_else(rand::random);
    let repeat = format!(
        "cargo run --release -p chaos -- --nodes {} --time {} --seed {seed} --nemesis {} --clients {} --users {} --partitions {}",
        cli.nodes, cli.time, cli.nemesis, cli.clients, cli.users, cli.partitions
    );
    let bin = mailgrid_binary(cli.bin)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let results = cli.out.join(format!("{stamp}-seed{seed}"));
    std::fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;
    let results = results.canonicalize()?;
    eprintln!("chaos: seed {seed}, results in {}", results.display());

    let mut cluster = Cluster::start(&bin, cli.nodes, cli.partitions, &results.join("cluster"))?;
    cluster.wait_healthy(Duration::from_secs(120)).await?;
    let users: Vec<String> = (0..cli.users)
        .map(|i| format!("chaos{i}@example.test"))
        .collect();
    for u in &users {
        cluster
            .request(ClientRequest::UserAdd {
                address: u.clone(),
                password: "chaos-password".into(),
                quota: Quota::default(),
            })
            .await
            .with_context(|| format!("adding {u}"))?;
    }
    cluster.refresh_listeners().await;

    let started = Instant::now();
    let until = started + Duration::from_secs(cli.time);
    let workload = Arc::new(Workload {
        users: users.clone(),
        smtp: cluster.smtp.clone(),
        started,
        until,
        seed,
    });
    let clients: Vec<_> = (0..cli.clients)
        .map(|c| tokio::spawn(workload.clone().client(c)))
        .collect();
    let timeline = nemesis::run(&mut cluster, &faults, seed, started, until).await?;
    let mut attempts: Vec<Attempt> = Vec::new();
    for c in clients {
        attempts.extend(c.await?);
    }
    let duration_ms = started.elapsed().as_millis() as u64;
    attempts.sort_by_key(|a| a.invoked_ms);
    report::write_jsonl(&results.join("history.jsonl"), &attempts)?;
    report::write_jsonl(&results.join("nemesis.jsonl"), &timeline)?;

    eprintln!("chaos: workload done; healing and waiting for convergence");
    cluster.heal()?;
    cluster.wait_healthy(Duration::from_secs(120)).await?;
    let digests = cluster.converged_digests(Duration::from_secs(120)).await?;

    let mut violations: Vec<Violation> = Vec::new();
    let status = cluster.status().await?;
    for (group, d) in &digests {
        // Only the group's voters hold its state; other nodes answer an empty one.
        let voters: Vec<u64> = status
            .partitions
            .iter()
            .find(|p| p.group == *group)
            .map(|p| p.voters.clone())
            .unwrap_or_default();
        let d: BTreeMap<u64, Option<String>> = d
            .iter()
            .filter(|(node, _)| voters.contains(node))
            .map(|(node, digest)| (*node, digest.clone()))
            .collect();
        let values: Vec<&Option<String>> = d.values().collect();
        if values.iter().any(|v| v.is_none()) || values.windows(2).any(|w| w[0] != w[1]) {
            violations.push(Violation::ReplicasDiffer {
                group: *group,
                digests: d,
            });
        }
    }
    let mut state: BTreeMap<String, Vec<Stored>> = BTreeMap::new();
    for u in &users {
        let messages = match cluster
            .request(ClientRequest::Fetch {
                address: u.clone(),
                mailbox: "INBOX".into(),
            })
            .await?
        {
            ClientReply::Messages(m) => m,
            other => bail!("fetch answered {other:?}"),
        };
        let stored_bytes: u64 = messages.iter().map(|m| m.body.len() as u64).sum();
        let account = match cluster.request(ClientRequest::QuotaShow(u.clone())).await? {
            ClientReply::Quota(account) => account,
            other => bail!("quota show answered {other:?}"),
        };
        if account.usage.bytes != stored_bytes {
            violations.push(Violation::UsageMismatch {
                recipient: u.clone(),
                recorded_bytes: account.usage.bytes,
                stored_bytes,
            });
        }
        let stored = messages
            .iter()
            .map(|m| Stored {
                uid_validity: m.uid_validity,
                uid: m.uid,
                tag: subject(&m.body),
            })
            .collect();
        state.insert(u.clone(), stored);
    }
    let history: Vec<Delivery> = attempts
        .iter()
        .flat_map(|a| {
            a.outcomes.iter().map(|(recipient, outcome)| Delivery {
                tag: a.tag.clone(),
                recipient: recipient.clone(),
                outcome: *outcome,
                invoked_ms: a.invoked_ms,
                completed_ms: a.completed_ms,
            })
        })
        .collect();
    violations.extend(check(&history, &state));

    let verdict = report::verdict(&violations, &attempts);
    std::fs::write(results.join("verdict.txt"), &verdict)?;
    std::fs::write(
        results.join("timeline.svg"),
        report::timeline_svg(&attempts, &timeline, duration_ms),
    )?;
    println!("{verdict}");
    println!("results: {}", results.display());
    if violations.is_empty() {
        println!("chaos: PASS (seed {seed})");
        Ok(true)
    } else {
        println!("chaos: FAIL (seed {seed}); repeat with:\n  {repeat}");
        Ok(false)
    }
}

/// The Subject of a stored message (the workload's tag).
fn subject(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or("")
        .trim()
        .to_string()
}
