//! Scale: many accounts on one cluster. Provisions `users` accounts (with one imported argon2
//! hash, as a migration would: hashing 100,000 passwords is the old server's work, not this
//! one's), delivers messages over a sample of them, and reports what an operator sizes
//! machines by: provisioning rate, resident memory per node, disk bytes per stored message,
//! and IMAP LOGIN latency for users logging in for the first time (a password verification)
//! and again (the login cache): as fast as 8 clients can (where queueing for the two cores
//! is most of a first login's latency), and paced at a fixed rate, as logins arrive on a
//! server that is not saturated.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use service::api::{ClientReply, ClientRequest};
use service::client::Client;
use storage::partition::Quota;

use crate::mailbox_load::Conn;
use crate::smtp_load::percentile;

/// Provisions `users` accounts `scale{i}@example.test` with `concurrency` requests in flight.
pub async fn provision(
    clients: &[Arc<Client>],
    users: usize,
    password_hash: &str,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let client = clients[w % clients.len()].clone();
        let (next, hash) = (next.clone(), password_hash.to_string());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= users {
                    return Ok::<_, anyhow::Error>(());
                }
                if i % 10_000 == 0 && i > 0 {
                    eprintln!("  {i} accounts");
                }
                let request = ClientRequest::UserImport {
                    address: user(i),
                    password_hash: hash.clone(),
                    quota: Quota::default(),
                };
                match client.request(request).await? {
                    ClientReply::Done => {}
                    other => bail!("adding {}: {other:?}", user(i)),
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(users as f64 / started.elapsed().as_secs_f64())
}

pub fn user(i: usize) -> String {
    format!("scale{i}@example.test")
}

/// Resident memory of a process, in bytes.
pub fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes of every file under `dir`.
pub fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// IMAP LOGIN latency (the LOGIN command alone, over implicit TLS) of `sample` users, through
/// the servers in turn, `concurrency` at a time.
pub async fn logins(
    servers: &[String],
    sample: &[String],
    password: &str,
    concurrency: usize,
) -> anyhow::Result<serde_json::Value> {
    let next = Arc::new(AtomicUsize::new(0));
    let sample = Arc::new(sample.to_vec());
    let servers = Arc::new(servers.to_vec());
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, sample, servers) = (next.clone(), sample.clone(), servers.clone());
        let password = password.to_string();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(user) = sample.get(i) else {
                    return Ok::<_, anyhow::Error>(latencies);
                };
                let mut conn = Conn::open(&servers[i % servers.len()]).await?;
                let t = Instant::now();
                conn.imap(&format!("LOGIN \"{user}\" \"{password}\""))
                    .await
                    .with_context(|| format!("LOGIN {user}"))?;
                latencies.push(t.elapsed());
                let _ = conn.imap("LOGOUT").await;
            }
        }));
    }
    let mut all: Vec<Duration> = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(latency_summary(all))
}

/// First logins of `sample` arriving at `rate` per second (open loop: each on its own
/// connection at its scheduled time, whatever the earlier ones do); only LOGIN is timed.
pub async fn paced_logins(
    servers: &[String],
    sample: &[String],
    password: &str,
    rate: f64,
) -> anyhow::Result<serde_json::Value> {
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for (i, user) in sample.iter().enumerate() {
        let at = started + Duration::from_secs_f64(i as f64 / rate);
        let server = servers[i % servers.len()].clone();
        let login = format!("LOGIN \"{user}\" \"{password}\"");
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let mut conn = Conn::open(&server).await?;
            let t = Instant::now();
            conn.imap(&login).await.with_context(|| login.clone())?;
            let took = t.elapsed();
            let _ = conn.imap("LOGOUT").await;
            Ok::<_, anyhow::Error>(took)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await??);
    }
    let mut summary = latency_summary(all);
    summary["rate_per_sec"] = rate.into();
    Ok(summary)
}

fn latency_summary(mut all: Vec<Duration>) -> serde_json::Value {
    all.sort();
    serde_json::json!({
        "logins": all.len(),
        "p50_ms": percentile(&all, 0.5),
        "p90_ms": percentile(&all, 0.9),
        "p99_ms": percentile(&all, 0.99),
        "max_ms": percentile(&all, 1.0),
    })
}
