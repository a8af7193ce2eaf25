//! `chaos`: starts a cluster of real `mailgrid` nodes, runs an SMTP delivery workload against
//! random nodes while the nemesis kills, restarts and pauses them, heals everything, reads
//! every mailbox back and checks the history. Exits non-zero on any violation.

mod boxes;
mod cluster;
mod nemesis;
mod net;
mod report;
mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chaos::{check, check_mailboxes, Delivery, Found, Outcome, Stored, Violation};
use clap::Parser;
use service::api::{ClientReply, ClientRequest};
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
    /// Faults to inject, comma-separated: kill, kill-leader, kill-minority, pause, rolling,
    /// partition, clock, membership.
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
    /// Concurrent IMAP clients (APPEND, STORE, EXPUNGE, MOVE on mailboxes they share).
    #[arg(long, default_value_t = 3)]
    imap_clients: usize,
    /// Concurrent POP3 clients (SMTP in, RETR + DELE out), a user each.
    #[arg(long, default_value_t = 1)]
    pop_clients: usize,
    /// How the nodes are connected: a network namespace each (root, `ip`, `nft`), or loopback
    /// ports behind a UDP proxy in this process; `auto` picks namespaces when it can.
    #[arg(long, value_enum, default_value = "auto")]
    net: crate::net::Choice,
    /// The mailgrid binary (default: next to this one).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Where the results folder of this run is made.
    #[arg(long, default_value = "chaos/results")]
    out: PathBuf,
    /// The last node joins as a witness: `--nodes 3 --witness` is two data nodes and a
    /// witness, the two-server topology.
    #[arg(long)]
    witness: bool,
    /// An older release's mailgrid binary: the nodes start on it, and the `upgrade` nemesis
    /// moves them one by one to `--bin` (a rolling upgrade under the other faults).
    #[arg(long)]
    bin_old: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // Interrupted, the run is dropped, which stops the nodes and removes the namespaces.
    let interrupted = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let result = tokio::select! {
        r = run(cli) => r,
        () = interrupted => Err(anyhow::anyhow!("interrupted; the cluster was stopped")),
    };
    match result {
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
    if cli.witness {
        if cli.nodes != 3 {
            bail!("--witness runs the two-server topology: --nodes 3 (two data nodes and the witness)");
        }
        if let Some(f) = faults
            .iter()
            .find(|f| matches!(f, Fault::Membership | Fault::Grow))
        {
            bail!(
                "--witness: the {f:?} nemesis removes, drains or adds data nodes, which the \
                 two-server topology has none to spare for; leave it out"
            );
        }
    }
    if cli.users == 0 || cli.clients == 0 || cli.time == 0 {
        bail!("--users, --clients and --time must be positive");
    }
    let seed = cli.seed.unwrap_or_else(rand::random);
    let repeat = format!(
        "cargo run --release -p chaos -- --nodes {} --time {} --seed {seed} --nemesis {} --clients {} --users {} --partitions {} --imap-clients {} --pop-clients {}",
        cli.nodes, cli.time, cli.nemesis, cli.clients, cli.users, cli.partitions, cli.imap_clients, cli.pop_clients
    ) + &match cli.net {
        crate::net::Choice::Auto => String::new(),
        crate::net::Choice::Namespaces => " --net namespaces".into(),
        crate::net::Choice::Proxy => " --net proxy".into(),
    } + if cli.witness { " --witness" } else { "" }
        + &cli
            .bin_old
            .as_ref()
            .map(|b| format!(" --bin-old {}", b.display()))
            .unwrap_or_default();
    let bin = mailgrid_binary(cli.bin)?;
    let bin_old = match &cli.bin_old {
        Some(old) => Some(mailgrid_binary(Some(old.clone()))?),
        None if faults.contains(&Fault::Upgrade) => {
            bail!("the upgrade nemesis needs --bin-old: an older release's mailgrid binary")
        }
        None => None,
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let results = cli.out.join(format!("{stamp}-seed{seed}"));
    std::fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;
    let results = results.canonicalize()?;
    eprintln!("chaos: seed {seed}, results in {}", results.display());

    let skewable = faults.contains(&Fault::Clock);
    let mut cluster = Cluster::start(
        &bin,
        cli.nodes,
        cli.partitions,
        &results.join("cluster"),
        crate::cluster::Layout {
            skewable,
            network: cli.net,
            // `grow` joins one node into a slot of its own.
            spare_slots: usize::from(faults.contains(&Fault::Grow)),
            witness: cli.witness,
            disk_faults: faults.contains(&Fault::Disk),
            bin_old: bin_old.clone(),
        },
    )
    .await?;
    cluster.wait_healthy(Duration::from_secs(120)).await?;
    let users: Vec<String> = (0..cli.users)
        .map(|i| format!("chaos{i}@example.test"))
        .collect();
    // The IMAP clients share these users' mailboxes; each POP3 client has one of its own.
    let imap_users: Vec<String> = (0..cli.imap_clients.min(3))
        .map(|i| format!("chaosbox{i}@example.test"))
        .collect();
    let pop_users: Vec<String> = (0..cli.pop_clients)
        .map(|i| format!("chaospop{i}@example.test"))
        .collect();
    for u in users.iter().chain(&imap_users).chain(&pop_users) {
        cluster
            .request(ClientRequest::UserAdd {
                address: u.clone(),
                password: PASSWORD.into(),
                quota: Quota::default(),
            })
            .await
            .with_context(|| format!("adding {u}"))?;
    }
    cluster.refresh_listeners().await;

    let started = Instant::now();
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let until = started + Duration::from_secs(cli.time);
    let workload = Arc::new(Workload {
        users: users.clone(),
        endpoints: cluster.endpoints.clone(),
        started,
        until,
        seed,
    });
    let clients: Vec<_> = (0..cli.clients)
        .map(|c| tokio::spawn(workload.clone().client(c)))
        .collect();
    let boxes = Arc::new(boxes::Boxes {
        imap_users: imap_users.clone(),
        pop_users: pop_users.clone(),
        password: PASSWORD.into(),
        endpoints: cluster.endpoints.clone(),
        started,
        until,
        seed,
    });
    let mut box_clients: Vec<_> = (0..cli.imap_clients)
        .map(|c| tokio::spawn(boxes.clone().imap_client(c)))
        .collect();
    box_clients.extend((0..cli.pop_clients).map(|c| tokio::spawn(boxes.clone().pop_client(c))));
    let timeline = nemesis::run(&mut cluster, &faults, seed, started, until).await?;
    let mut attempts: Vec<Attempt> = Vec::new();
    for c in clients {
        attempts.extend(c.await?);
    }
    let mut box_attempts: Vec<boxes::BoxAttempt> = Vec::new();
    for c in box_clients {
        box_attempts.extend(c.await?);
    }
    box_attempts.sort_by_key(|a| a.invoked_ms);
    report::write_jsonl(&results.join("mailbox-history.jsonl"), &box_attempts)?;
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
            .map(|p| cluster.data_voters(*group, &p.voters))
            .unwrap_or_default();
        if let Some(w) = cluster.witness.filter(|_| *group != 0) {
            // A witness's replica of a partition holds no record at all.
            if let Some(Some(digest)) = d.get(&w) {
                if digest != EMPTY_DIGEST {
                    violations.push(Violation::WitnessHoldsMail {
                        group: *group,
                        node: w,
                        digest: digest.clone(),
                    });
                }
            }
        }
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
    let mut found: BTreeMap<String, Vec<Found>> = BTreeMap::new();
    // When each delivered message was received, by the receiving node's clock.
    let mut received: BTreeMap<String, i64> = BTreeMap::new();
    for u in users.iter().chain(&imap_users).chain(&pop_users) {
        let mut stored_bytes = 0;
        for mailbox in ["INBOX", boxes::ARCHIVE] {
            let messages = match cluster
                .request(ClientRequest::Fetch {
                    address: u.clone(),
                    mailbox: mailbox.into(),
                })
                .await
            {
                Ok(ClientReply::Messages(m)) => m,
                Ok(other) => bail!("fetch answered {other:?}"),
                Err(e) if mailbox != "INBOX" && format!("{e:#}").contains("no mailbox") => {
                    Vec::new()
                }
                Err(e) => return Err(e),
            };
            stored_bytes += messages.iter().map(|m| m.body.len() as u64).sum::<u64>();
            if users.contains(u) {
                if mailbox == "INBOX" {
                    for m in &messages {
                        if let Some(at) = received_ms(&m.body) {
                            received.insert(subject(&m.body), at);
                        }
                    }
                    let stored = messages.iter().map(|m| Stored {
                        uid_validity: m.uid_validity,
                        uid: m.uid,
                        tag: subject(&m.body),
                    });
                    state.insert(u.clone(), stored.collect());
                }
                continue;
            }
            found
                .entry(u.clone())
                .or_default()
                .extend(messages.iter().map(|m| Found {
                    mailbox: mailbox.to_string(),
                    uid_validity: m.uid_validity,
                    uid: m.uid,
                    tag: subject(&m.body),
                    flags: m.flags.clone(),
                }));
        }
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
    let ops: Vec<_> = box_attempts.iter().map(|a| a.op.clone()).collect();
    violations.extend(check_mailboxes(&ops, &found));

    let mut verdict = report::verdict(&violations, &attempts);
    if faults.contains(&Fault::Clock) {
        let (skewed, largest) = clock_skews(&received, &attempts, started_unix_ms);
        let clock_faults = timeline.iter().filter(|w| w.fault == Fault::Clock).count();
        verdict.push_str(&format!(
            "clock: {skewed} messages stamped by a node whose clock was off (up to {} s), in {clock_faults} clock faults\n",
            largest / 1000
        ));
        if clock_faults > 0 && skewed == 0 {
            std::fs::write(results.join("verdict.txt"), &verdict)?;
            bail!(
                "the clock faults had no visible effect on any node's clock (is {} working?)",
                cluster::FAKETIME_LIB
            );
        }
    }
    if bin_old.is_some() {
        let (done, all) = cluster.upgraded();
        let format = match cluster.request(ClientRequest::Versions).await {
            Ok(ClientReply::Versions(v)) => v.active_format.to_string(),
            _ => "unknown (the answering node runs the older release)".into(),
        };
        verdict.push_str(&format!(
            "upgrade: {done} of {all} nodes on the release under test; cluster format {format}\n"
        ));
    }
    let dropped = lines_in_logs(&results.join("cluster"), DROPPED_LINE);
    verdict.push_str(&format!(
        "grow: {dropped} copies of groups a node had left were dropped (node logs)\n"
    ));
    let count = |o: Outcome| ops.iter().filter(|op| op.outcome == o).count();
    verdict.insert_str(
        verdict.find('\n').map_or(0, |i| i + 1),
        &format!(
            "mailbox operations (IMAP APPEND/STORE/EXPUNGE/MOVE, POP3 DELE): {} ok, {} failed, {} unknown\n",
            count(Outcome::Ok),
            count(Outcome::Fail),
            count(Outcome::Unknown)
        ),
    );
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

const PASSWORD: &str = "chaos-password";

/// The time (Unix milliseconds) in the first `Received:` header: when the receiving node's
/// clock said the message arrived.
fn received_ms(body: &[u8]) -> Option<i64> {
    let text = String::from_utf8_lossy(body);
    let mut header = String::new();
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        if line.starts_with("Received:") {
            header = line.to_string();
        } else if !header.is_empty() && line.starts_with([' ', '\t']) {
            header.push_str(line);
        } else if !header.is_empty() {
            break;
        }
    }
    let date = header.rsplit(';').next()?.trim();
    chrono::DateTime::parse_from_rfc2822(date)
        .ok()
        .map(|d| d.timestamp_millis())
}

/// How many acknowledged deliveries were stamped outside the real time of their attempts
/// (with 2 s of slack for the one-second stamp), and the largest deviation in milliseconds.
fn clock_skews(
    received: &BTreeMap<String, i64>,
    attempts: &[Attempt],
    started_unix_ms: i64,
) -> (usize, i64) {
    let mut spans: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for a in attempts {
        let (from, to) = (
            started_unix_ms + a.invoked_ms as i64,
            started_unix_ms + a.completed_ms as i64,
        );
        let span = spans.entry(&a.tag).or_insert((from, to));
        *span = (span.0.min(from), span.1.max(to));
    }
    let mut skewed = 0;
    let mut largest = 0;
    for (tag, at) in received {
        let Some(&(from, to)) = spans.get(tag.as_str()) else {
            continue;
        };
        let off = if *at < from - 2000 {
            from - at
        } else if *at > to + 2000 {
            at - to
        } else {
            0
        };
        if off > 0 {
            skewed += 1;
            largest = largest.max(off);
        }
    }
    (skewed, largest)
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

/// The digest of a partition replica holding no record (blake3 of nothing): a witness's.
const EMPTY_DIGEST: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

/// What a node logs when it drops its copy of a group it left (`raft::host`).
const DROPPED_LINE: &str = "dropped the copy of a group this node left";

/// How many lines of the node logs (`*.log` in `dir`) contain `needle`.
fn lines_in_logs(dir: &std::path::Path, needle: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|text| text.lines().filter(|l| l.contains(needle)).count())
        .sum()
}
