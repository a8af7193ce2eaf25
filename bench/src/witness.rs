//! `bench witness`: the two-server topology against three full nodes on the same machine.
//! SMTP msgs/s and p99 (saturated, 4 KiB) of two data nodes and a witness against three
//! data nodes, as a ratio; the witness's CPU, resident memory and disk per 10,000 messages;
//! and the failover dip when a data node is killed with SIGKILL under a retrying load.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use service::client::Client;

use crate::dip;
use crate::smtp_load::{self, Size};

pub struct Args {
    pub partitions: u32,
    /// Messages (4 KiB) of each saturated run.
    pub messages: usize,
    pub concurrency: usize,
    /// Seconds of load before and after the kill.
    pub before: u64,
    pub after: u64,
}

const USERS: usize = 64;

pub async fn run(bin: &Path, args: Args) -> anyhow::Result<serde_json::Value> {
    let users: Vec<String> = (0..USERS)
        .map(|i| format!("bench{i}@example.test"))
        .collect();
    let stamp = std::process::id();
    let saturated = |servers: Vec<String>, name: &str| {
        smtp_load::run(smtp_load::Load {
            servers,
            users: users.clone(),
            messages: args.messages,
            size: Size::Fixed(4096),
            concurrency: args.concurrency,
            run: format!("{stamp}-{name}"),
            route: None,
            rate: None,
            tls: false,
        })
    };

    // Three data nodes.
    let full = crate::start_topology(bin, 3, args.partitions, false).await?;
    crate::add_users(&Client::open(&full.nodes[0].2, None)?, &users).await?;
    let three = saturated(crate::cluster_listeners(&full, "smtp"), "full").await?;
    drop(full);

    // Two data nodes and a witness (node 3).
    let pair = crate::start_topology(bin, 2, args.partitions, true).await?;
    crate::add_users(&Client::open(&pair.nodes[0].2, None)?, &users).await?;
    let witness = pair
        .nodes
        .iter()
        .find(|n| n.0 == 3)
        .context("no witness")?
        .clone();
    let data_dirs: Vec<_> = pair.nodes.iter().filter(|n| n.0 != 3).cloned().collect();
    let disk_before = dir_bytes(&witness.2);
    let cpu_before = crate::cpu_ticks(witness.1);
    let two = saturated(crate::cluster_listeners(&pair, "smtp"), "witness").await?;
    let cpu_ticks = crate::cpu_ticks(witness.1)
        .zip(cpu_before)
        .map(|(a, b)| a.saturating_sub(b));
    let disk_after_load = dir_bytes(&witness.2);
    let rss_kib = rss_kib(witness.1);
    let http = witness_http(&pair)?;
    let entries_after_load = log_entries(&http).await;
    // The witness purges what both data nodes hold every few seconds.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let entries_after_purge = log_entries(&http).await;
    let disk_after_purge = dir_bytes(&witness.2);
    let data_disk: u64 = data_dirs.iter().map(|n| dir_bytes(&n.2)).max().unwrap_or(0);
    // sled reuses the space of purged entries rather than shrinking its file: a second load
    // as large shows whether the witness's disk stays bounded.
    let _ = saturated(crate::cluster_listeners(&pair, "smtp"), "witness-again").await?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let disk_after_second = dir_bytes(&witness.2);
    let per_10k = 10_000.0 / args.messages as f64;
    let wall = two["seconds"].as_f64().unwrap_or(0.0);
    let cpu_s = cpu_ticks.map(|t| t as f64 / crate::TICKS_PER_SEC);

    // The failover: a steady retrying load through both data nodes, node 2 killed.
    let bucket = Duration::from_millis(250);
    let load = dip::Load {
        servers: crate::cluster_listeners(&pair, "smtp"),
        users: users.clone(),
        senders: args.concurrency.min(16),
        size: 4096,
        run: format!("{stamp}-dip"),
        duration: Duration::from_secs(args.before + args.after),
        bucket,
    };
    let started = Instant::now();
    let running = tokio::spawn(dip::run(load, started));
    tokio::time::sleep(Duration::from_secs(args.before)).await;
    let victim = data_dirs.last().context("no data node")?.clone();
    Command::new("kill")
        .args(["-KILL", &victim.1.to_string()])
        .status()?;
    let kill_at = started.elapsed();
    let outcome = running.await?;
    let (base, lowest, back) = dip::dip(&outcome.buckets, bucket, kill_at);
    drop(pair);

    let rate = |r: &serde_json::Value| r["msgs_per_sec"].as_f64().unwrap_or(0.0);
    let p99 = |r: &serde_json::Value| r["p99_ms"].as_f64().unwrap_or(0.0);
    println!(
        "witness: SMTP 2 data + witness {:.0} msgs/s (p99 {:.1} ms) vs 3 data {:.0} msgs/s (p99 {:.1} ms): {:.2}x; \
         witness per 10,000 msgs: CPU {} s, RSS {} MiB, disk {:.0} KiB (a data node: {:.0} KiB), and {:.0} KiB after a second 10,000, \
         log entries kept {entries_after_load:?} -> {entries_after_purge:?} after its purge; \
         failover: {base:.0} msgs/s before, lowest {lowest:.0}, back to 90% after {}",
        rate(&two),
        p99(&two),
        rate(&three),
        p99(&three),
        rate(&two) / rate(&three),
        cpu_s.map(|s| format!("{:.1}", s * per_10k)).unwrap_or_else(|| "?".into()),
        rss_kib.map(|k| format!("{:.0}", k as f64 / 1024.0)).unwrap_or_else(|| "?".into()),
        disk_after_load.saturating_sub(disk_before) as f64 * per_10k / 1024.0,
        data_disk as f64 * per_10k / 1024.0,
        disk_after_second.saturating_sub(disk_before) as f64 * per_10k / 1024.0,
        back.map(|s| format!("{s:.2} s")).unwrap_or_else(|| "never (within the run)".into()),
    );
    Ok(serde_json::json!({
        "partitions": args.partitions,
        "messages": args.messages,
        "three_data_nodes": three,
        "two_data_nodes_and_witness": two,
        "throughput_ratio_witness_to_full": rate(&two) / rate(&three),
        "p99_ratio_witness_to_full": p99(&two) / p99(&three),
        "witness": {
            "cpu_seconds": cpu_s,
            "cpu_share_of_one_core_during_load": cpu_s.map(|s| s / wall.max(1e-9)),
            "rss_kib": rss_kib,
            "disk_bytes_before": disk_before,
            "disk_bytes_after_load": disk_after_load,
            "disk_bytes_after_purge": disk_after_purge,
            "disk_bytes_after_second_load": disk_after_second,
            "log_entries_after_load": entries_after_load,
            "log_entries_after_purge": entries_after_purge,
            "data_node_disk_bytes": data_disk,
        },
        "failover": {
            "killed_node": victim.0,
            "msgs_per_sec_before": base,
            "lowest_msgs_per_sec_after": lowest,
            "recovered_after_s": back,
            "buckets": outcome.buckets,
            "retries": outcome.retries,
        },
    }))
}

/// The witness's (node 3's) HTTP listener.
fn witness_http(cluster: &crate::DevCluster) -> anyhow::Result<String> {
    cluster.info["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["id"] == 3))
        .and_then(|n| n["listeners"]["http"].as_str())
        .map(str::to_string)
        .context("the witness published no http listener")
}

/// `mailgrid_raft_log_entries` from a node's `/metrics` (plain HTTP/1.0 GET).
async fn log_entries(addr: &str) -> Option<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("mailgrid_raft_log_entries "))?
        .trim()
        .parse()
        .ok()
}

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Resident memory of a process, in KiB (`VmRSS` of /proc/PID/status).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
