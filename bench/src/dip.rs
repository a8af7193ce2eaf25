//! The failover dip: a steady SMTP load runs while one node is killed. Each sender behaves
//! like a retrying MTA: a failed message (connection lost, 4xx) is sent again through the
//! next node, so nothing is dropped and every message counts once, when its `250` arrives.
//! Completions are counted per interval; the report is the rate before the kill, the lowest
//! one-second rate after it, and how long until a one-second rate is back to 90% of before.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::smtp_load::{message, Conn};

pub struct Load {
    pub servers: Vec<String>,
    pub users: Vec<String>,
    pub senders: usize,
    pub size: usize,
    pub run: String,
    pub duration: Duration,
    pub bucket: Duration,
}

/// Longest we wait for one message's `250` before giving up on that connection.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

pub struct Outcome {
    /// Messages completed per bucket, from the start of the load.
    pub buckets: Vec<u64>,
    /// Failed attempts (each retried through another node).
    pub retries: u64,
    /// Messages sent in all.
    pub messages: usize,
}

pub async fn run(load: Load, started: Instant) -> Outcome {
    let load = Arc::new(load);
    let n = (load.duration.as_millis() / load.bucket.as_millis()) as usize + 1;
    let buckets = Arc::new(Mutex::new(vec![0u64; n]));
    let next = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let deadline = started + load.duration;
    let mut tasks = Vec::new();
    for w in 0..load.senders {
        let (load, buckets, next, retries) =
            (load.clone(), buckets.clone(), next.clone(), retries.clone());
        tasks.push(tokio::spawn(async move {
            let mut server = w;
            let mut conn: Option<Conn> = None;
            let mut pending: Option<usize> = None;
            while Instant::now() < deadline {
                let i = *pending.get_or_insert_with(|| next.fetch_add(1, Ordering::Relaxed));
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => {
                        let addr = &load.servers[server % load.servers.len()];
                        match tokio::time::timeout(SEND_TIMEOUT, Conn::open(addr)).await {
                            Ok(Ok(c)) => conn.insert(c),
                            _ => {
                                retries.fetch_add(1, Ordering::Relaxed);
                                server += 1;
                                tokio::time::sleep(RECONNECT_PAUSE).await;
                                continue;
                            }
                        }
                    }
                };
                let body = message(&load.run, i, load.size);
                let to = &load.users[i % load.users.len()];
                match tokio::time::timeout(SEND_TIMEOUT, c.send(to, &body)).await {
                    Ok(Ok(())) => {
                        pending = None;
                        let at = started.elapsed().as_millis() / load.bucket.as_millis();
                        let mut b = buckets.lock().expect("buckets lock");
                        if let Some(slot) = b.get_mut(at as usize) {
                            *slot += 1;
                        }
                    }
                    _ => {
                        // Like an MTA: drop the connection, try the same message elsewhere.
                        retries.fetch_add(1, Ordering::Relaxed);
                        conn = None;
                        server += 1;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let buckets = buckets.lock().expect("buckets lock").clone();
    Outcome {
        messages: buckets.iter().sum::<u64>() as usize,
        buckets,
        retries: retries.load(Ordering::Relaxed),
    }
}

/// Messages per second over each one-second window starting at bucket `i`.
pub fn windows(buckets: &[u64], bucket: Duration) -> Vec<f64> {
    let per = (1000 / bucket.as_millis().max(1)) as usize;
    let per = per.max(1);
    (0..buckets.len().saturating_sub(per))
        .map(|i| buckets[i..i + per].iter().sum::<u64>() as f64)
        .collect()
}

/// (rate before, lowest one-second rate after the kill, seconds from the kill until a
/// one-second window is back at 90% of the rate before; None if it never came back).
pub fn dip(buckets: &[u64], bucket: Duration, kill_at: Duration) -> (f64, f64, Option<f64>) {
    let b = bucket.as_secs_f64();
    let kill = (kill_at.as_secs_f64() / b) as usize;
    let warm = (1.0 / b) as usize; // skip the first second (connections opening)
    let before = &buckets[warm.min(kill)..kill];
    let base = before.iter().sum::<u64>() as f64 / (before.len().max(1) as f64 * b);
    let w = windows(buckets, bucket);
    let after: Vec<f64> = w.iter().skip(kill).copied().collect();
    let lowest = after.iter().copied().fold(f64::INFINITY, f64::min);
    let dipped = after.iter().position(|r| *r < 0.9 * base);
    let back = match dipped {
        None => Some(0.0),
        Some(d) => after[d..]
            .iter()
            .position(|r| *r >= 0.9 * base)
            .map(|p| (d + p) as f64 * b + 1.0),
    };
    (base, if lowest.is_finite() { lowest } else { 0.0 }, back)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dip_and_the_recovery_are_read_off_the_buckets() {
        // 4 buckets a second: 100 msgs/s before the kill at 3 s, nothing for 1 s, then back.
        let bucket = Duration::from_millis(250);
        let mut b = vec![25u64; 12];
        b.extend([0, 0, 0, 0]);
        b.extend([25u64; 12]);
        let (base, lowest, back) = dip(&b, bucket, Duration::from_secs(3));
        assert!((base - 100.0).abs() < 1e-9, "{base}");
        assert_eq!(lowest, 0.0);
        // The first full second at 90% starts 1 s after the kill and ends 2 s after it.
        assert_eq!(back, Some(2.0));
        let flat = vec![25u64; 28];
        assert_eq!(dip(&flat, bucket, Duration::from_secs(3)).2, Some(0.0));
    }
}
