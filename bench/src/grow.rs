//! `bench grow`: capacity that grows with the servers, made a number. A 3-node cluster is
//! filled with mail and measured (SMTP msgs/s saturated, and p99 at a fixed offered load);
//! then nodes 4 and 5 join it online (`mailgrid join` + `serve`, not a cluster started with
//! five) and the run times the rebalance until every node holds its planned replicas and
//! leaders, with the same fixed load running throughout (p99 during the moves); finally the
//! grown cluster is measured as the first was.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use service::api::{ClientReply, ClientRequest};
use service::client::Client;

use crate::smtp_load::{self, Size};
use crate::DevCluster;

pub struct Args {
    pub partitions: u32,
    /// Mail stored before nodes join, in MiB (100 KiB messages).
    pub prefill_mib: u64,
    /// Messages of each saturated throughput run (4 KiB).
    pub messages: usize,
    pub concurrency: usize,
    /// The fixed offered load while the replicas move, in msgs/s.
    pub rate: f64,
}

const USERS: usize = 64;

pub async fn run(bin: &Path, args: Args) -> anyhow::Result<serde_json::Value> {
    let mut cluster = crate::start_cluster(bin, 3, args.partitions).await?;
    let client = Client::open(&cluster.nodes[0].2, None)?;
    let users: Vec<String> = (0..USERS)
        .map(|i| format!("bench{i}@example.test"))
        .collect();
    crate::add_users(&client, &users).await?;
    let stamp = std::process::id();
    let load = |servers: &[String], messages: usize, size: Size, rate: Option<f64>, run: String| {
        smtp_load::Load {
            servers: servers.to_vec(),
            users: users.clone(),
            messages,
            size,
            concurrency: args.concurrency,
            run,
            route: None,
            rate,
            tls: false,
        }
    };
    let three = smtp_servers(&client).await?;
    let prefill = (args.prefill_mib << 20) as usize / (100 << 10);
    eprintln!(
        "grow: storing {} MiB ({prefill} messages of 100 KiB)",
        args.prefill_mib
    );
    let started = Instant::now();
    smtp_load::run(load(
        &three,
        prefill,
        Size::Fixed(100 << 10),
        None,
        format!("{stamp}-fill"),
    ))
    .await?;
    eprintln!("grow: stored in {:.0?}", started.elapsed());
    // SMTP as fast as the senders go, 4 KiB messages, through `servers`.
    let saturated = |servers: &[String], name: &str| {
        smtp_load::run(load(
            servers,
            args.messages,
            Size::Fixed(4096),
            None,
            format!("{stamp}-{name}"),
        ))
    };
    let before = saturated(&three, "3").await?;
    let paced = |name: &str, i: usize| {
        load(
            &three,
            (args.rate * 10.0) as usize,
            Size::Fixed(4096),
            Some(args.rate),
            format!("{stamp}-{name}-{i}"),
        )
    };
    let quiet = smtp_load::run(paced("quiet", 0)).await?;
    eprintln!(
        "grow: 3 nodes: {:.0} msgs/s; at {} msgs/s p99 {:.1} ms",
        before["msgs_per_sec"].as_f64().unwrap_or(0.0),
        args.rate,
        quiet["p99_ms"].as_f64().unwrap_or(0.0)
    );

    let joined = Instant::now();
    join(&mut cluster, bin, 4)?;
    join(&mut cluster, bin, 5)?;
    // The fixed load runs in 10-second rounds until the placement is settled.
    let mut during = Vec::new();
    let settled = loop {
        let round = smtp_load::run(paced("moving", during.len())).await?;
        during.push(round);
        if let Some(p) = settled(&client).await {
            break p;
        }
        if joined.elapsed() > Duration::from_secs(1800) {
            bail!("the placement did not settle within 30 minutes of the join");
        }
    };
    // Checked after each 10-second round: the placement settled at most this long after the
    // join (reported as an upper bound).
    let rebalance_s = joined.elapsed().as_secs_f64();
    let five = smtp_servers(&client).await?;
    if five.len() != 5 {
        bail!(
            "the grown cluster lists {} SMTP listeners, not 5",
            five.len()
        );
    }
    let after = saturated(&five, "5").await?;
    let p99 = |r: &serde_json::Value| r["p99_ms"].as_f64().unwrap_or(0.0);
    let worst_during = during.iter().map(p99).fold(0.0, f64::max);
    let rate = |r: &serde_json::Value| r["msgs_per_sec"].as_f64().unwrap_or(0.0);
    let result = serde_json::json!({
        "cluster": crate::cluster_label(3, args.partitions),
        "prefill_mib": args.prefill_mib,
        "three_nodes": before,
        "five_nodes": after,
        "throughput_ratio_5_to_3": rate(&after) / rate(&before),
        "rate": args.rate,
        "p99_before_ms": p99(&quiet),
        "p99_during_moves_ms": during.iter().map(p99).collect::<Vec<_>>(),
        "p99_ratio_worst_during_to_before": worst_during / p99(&quiet),
        "rebalance_seconds_upper_bound": rebalance_s,
        "placement": settled,
    });
    println!(
        "grow: {} MiB, 3 -> 5 nodes by join: rebalanced within {:.0} s; p99 at {} msgs/s {:.1} ms before, worst {:.1} ms during ({:.2}x); SMTP {:.0} -> {:.0} msgs/s ({:.2}x)",
        args.prefill_mib,
        rebalance_s,
        args.rate,
        p99(&quiet),
        worst_during,
        worst_during / p99(&quiet),
        rate(&before),
        rate(&after),
        rate(&after) / rate(&before)
    );
    Ok(result)
}

/// Every node's SMTP listener, as the cluster publishes them.
async fn smtp_servers(client: &Client) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let ClientReply::Status(s) = client.request(ClientRequest::Status).await? {
            let smtp: Vec<String> = s
                .nodes
                .iter()
                .filter_map(|n| n.listeners.get("smtp").cloned())
                .collect();
            if smtp.len() == s.nodes.len() || Instant::now() > deadline {
                return Ok(smtp);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The placement once no move is pending or running and every node holds its planned
/// replicas and leaders; `None` before.
async fn settled(client: &Client) -> Option<serde_json::Value> {
    let Ok(ClientReply::Placement(p)) = client.request(ClientRequest::Placement).await else {
        return None;
    };
    let done = p.moves_pending == 0
        && p.moves_running == 0
        && p.nodes
            .iter()
            .all(|n| n.replicas == n.replicas_target && n.leaders == n.leaders_target);
    done.then(|| serde_json::to_value(&p).unwrap_or_default())
}

/// Joins node `id` to the dev cluster (`mailgrid join`, then `serve` as `mailgrid dev`
/// starts its nodes).
fn join(cluster: &mut DevCluster, bin: &Path, id: u64) -> anyhow::Result<()> {
    let data = cluster.dir.join(format!("node{id}"));
    let token = mailgrid::dev::read_token(&cluster.dir.join("node1"))?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let seed = cluster.nodes[0].3.clone();
    let out = Command::new(bin)
        .arg("join")
        .arg("--data")
        .arg(&data)
        .args(["--node-id", &id.to_string()])
        .args(["--cluster-addr", &format!("127.0.0.1:{port}")])
        .args(["--seed", &seed, "--token", &token])
        .output()
        .context("running mailgrid join")?;
    if !out.status.success() {
        bail!(
            "joining node {id}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let log = cluster.dir.join(format!("node{id}.log"));
    let child = mailgrid::dev::spawn_serve(bin, &data, &log)?;
    cluster.restarted.push(child);
    Ok(())
}
