//! A SPECmail2001-style mixed workload: the users of an ISP in their busy hour. Each user
//! sends messages and checks their mailbox by POP3 at the profile's daily rates, a share of
//! which falls in the busy hour; sessions arrive as independent Poisson streams (an open
//! system: a slow server does not slow the arrivals down). A load level passes when it meets
//! the quality-of-service rules; the result is the largest user count that passes.
//!
//! What this takes from SPECmail2001 (its architecture white paper, §4.2 user profile, §5.1
//! arrivals, §6 quality of service) and what it does not is in bench/README.md: in short the
//! per-user rates, the Poisson arrivals and the shape of the rules are SPEC's; the size and
//! recipient tables are ours with the profile's means; every message is local (no remote
//! relay or sink), and POP3 runs over TLS.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::mailbox_load;
use crate::smtp_load::{self, percentile};
pub use crate::workload::{mean, Profile, Rng, RECIPIENTS, SIZES};

/// The quality-of-service rules a level must meet.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// Every kind of protocol step answers within `response` for `share` of its instances.
    pub response: Duration,
    /// Messages reach the mailbox within `delivery` for `share` of them.
    pub delivery: Duration,
    pub share: f64,
    /// Failed sessions over all sessions.
    pub max_error_rate: f64,
    /// The load generator must start sessions on time (p99 lag), or the level says nothing.
    pub max_lag: Duration,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            response: Duration::from_secs(5),
            delivery: Duration::from_secs(60),
            share: 0.95,
            max_error_rate: 0.01,
            max_lag: Duration::from_secs(1),
        }
    }
}

/// Where the sessions go and as whom.
pub struct Target {
    pub smtp: Vec<String>,
    pub pop3s: Vec<String>,
    /// Account addresses, `{}` replaced by the account's number.
    pub user_format: String,
    pub password: String,
    /// Accounts 0..probes are polled to time delivery: a stream of messages of the mix's
    /// sizes goes to them at `probe_rate` per second on top of the mix. The population is the
    /// accounts after them.
    pub probes: usize,
    pub probe_rate: f64,
    /// Sessions in flight beyond which a new arrival counts as failed (a server that has
    /// stopped answering must not make the generator grow without bound).
    pub max_in_flight: usize,
}

impl Target {
    pub fn user(&self, i: usize) -> String {
        self.user_format.replace("{}", &i.to_string())
    }
}

#[derive(Default)]
struct Tally {
    steps: HashMap<&'static str, Vec<Duration>>,
    smtp: (usize, usize),
    pop3: (usize, usize),
    refused: usize,
    errors: Vec<String>,
    lag: Vec<Duration>,
    retrieved: usize,
    /// Probe copies being sent: message number → when the session began.
    probes_began: HashMap<u64, Duration>,
    /// Probe copies the server accepted (250).
    probes_sent: std::collections::HashSet<u64>,
    /// Probe copies found in a probe mailbox: message number → delivery time.
    probes_found: HashMap<u64, Duration>,
}

struct Level {
    target: Arc<Target>,
    users: usize,
    run: String,
    epoch: Instant,
    tally: Mutex<Tally>,
    in_flight: AtomicUsize,
}

impl Level {
    fn step(&self, name: &'static str, took: Duration) {
        let mut t = self.tally.lock().expect("tally");
        t.steps.entry(name).or_default().push(took);
    }

    fn failed(&self, what: &str, e: anyhow::Error) {
        let mut t = self.tally.lock().expect("tally");
        if t.errors.len() < 20 {
            t.errors.push(format!("{what}: {e:#}"));
        }
    }

    fn population_user(&self, rng: &mut Rng) -> String {
        self.target.user(self.target.probes + rng.below(self.users))
    }
}

/// One SMTP session: connect (banner and EHLO), one message to its recipients, QUIT.
async fn smtp_session(
    level: &Level,
    server: &str,
    number: u64,
    recipients: Vec<String>,
    size: usize,
    probe: bool,
) -> anyhow::Result<()> {
    if probe {
        let began = level.epoch.elapsed();
        level
            .tally
            .lock()
            .expect("tally")
            .probes_began
            .insert(number, began);
    }
    let t = Instant::now();
    let mut conn = smtp_load::Conn::open(server).await?;
    level.step("smtp connect+ehlo", t.elapsed());
    let header = format!(
        "From: bench@remote.test\r\nTo: user@example.test\r\nSubject: spec {run} {number}\r\nMessage-ID: <spec.{run}.{number}@bench>\r\nX-Bench-Message: {run} {number}\r\n\r\n",
        run = level.run
    );
    let body = smtp_load::filled(header, size);
    let to: Vec<&str> = recipients.iter().map(String::as_str).collect();
    let (envelope, data) = conn.send_to(&to, &body).await?;
    level.step("smtp envelope", envelope);
    level.step("smtp data", data);
    if probe {
        let mut t = level.tally.lock().expect("tally");
        t.probes_sent.insert(number);
    }
    let t = Instant::now();
    conn.quit().await;
    level.step("smtp quit", t.elapsed());
    Ok(())
}

/// One mailbox check: log in, STAT, download and delete everything, QUIT.
async fn pop3_check(level: &Level, server: &str, user: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    let mut conn = mailbox_load::Conn::open(server).await?;
    level.step("pop3 connect+tls", t.elapsed());
    let t = Instant::now();
    conn.pop3_login(user, &level.target.password).await?;
    level.step("pop3 login", t.elapsed());
    let t = Instant::now();
    let count = conn.pop3_stat().await?;
    level.step("pop3 stat", t.elapsed());
    for i in 1..=count {
        let t = Instant::now();
        conn.pop3(&format!("RETR {i}"), true).await?;
        level.step("pop3 retr", t.elapsed());
        let t = Instant::now();
        conn.pop3(&format!("DELE {i}"), false).await?;
        level.step("pop3 dele", t.elapsed());
    }
    let t = Instant::now();
    conn.pop3("QUIT", false).await?;
    level.step("pop3 quit", t.elapsed());
    level.tally.lock().expect("tally").retrieved += count;
    Ok(())
}

/// Polls one probe mailbox: every copy found is timed from its session's start and deleted.
async fn poll_probe(level: &Level, server: &str, user: &str) -> anyhow::Result<()> {
    let mut conn = mailbox_load::Conn::open(server).await?;
    conn.pop3_login(user, &level.target.password).await?;
    let count = conn.pop3_stat().await?;
    for i in 1..=count {
        let lines = conn.pop3_lines(&format!("RETR {i}")).await?;
        let found = level.epoch.elapsed();
        let ours = lines.iter().find_map(|l| {
            let rest = l.strip_prefix("X-Bench-Message: ")?;
            let (run, number) = rest.split_once(' ')?;
            (run == level.run).then(|| number.trim().parse::<u64>().ok())?
        });
        if let Some(number) = ours {
            let mut t = level.tally.lock().expect("tally");
            // Timed from the session's start (a copy can show up before its 250 is read).
            let began = t.probes_began.get(&number).copied().unwrap_or(found);
            t.probes_found
                .entry(number)
                .or_insert(found.saturating_sub(began));
        }
        conn.pop3(&format!("DELE {i}"), false).await?;
    }
    conn.pop3("QUIT", false).await?;
    Ok(())
}

/// Runs one load level: `users` users for `seconds`, then waits for the sessions in flight
/// and for the probe copies (up to the delivery limit). Returns the level's report, with
/// `"pass"` saying whether it met every rule.
pub async fn level(
    target: Arc<Target>,
    profile: Profile,
    rules: Rules,
    users: usize,
    seconds: u64,
    seed: u64,
) -> anyhow::Result<serde_json::Value> {
    let run = format!("{}-{users}-{seed}", std::process::id());
    let level = Arc::new(Level {
        target: target.clone(),
        users,
        run,
        epoch: Instant::now(),
        tally: Mutex::new(Tally::default()),
        in_flight: AtomicUsize::new(0),
    });
    let smtp_rate = profile.smtp_per_sec(users);
    let check_rate = profile.checks_per_sec(users);
    let stop_probes = Arc::new(AtomicBool::new(false));
    let mut pollers = Vec::new();
    for p in 0..target.probes {
        let (level, stop) = (level.clone(), stop_probes.clone());
        pollers.push(tokio::spawn(async move {
            let user = level.target.user(p);
            let mut n = p;
            while !stop.load(Ordering::Relaxed) {
                let server = &level.target.pop3s[n % level.target.pop3s.len()];
                n += 1;
                if let Err(e) = poll_probe(&level, server, &user).await {
                    level.failed(&format!("probe {user}"), e);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }
    let end = level.epoch + Duration::from_secs(seconds);
    let smtp = tokio::spawn(arrivals(level.clone(), smtp_rate, end, seed, Kind::Smtp));
    let pop3 = tokio::spawn(arrivals(
        level.clone(),
        check_rate,
        end,
        seed ^ 0x5eed,
        Kind::Pop3,
    ));
    let probe = tokio::spawn(arrivals(
        level.clone(),
        if target.probes > 0 {
            target.probe_rate
        } else {
            0.0
        },
        end,
        seed ^ 0x9b0be,
        Kind::Probe,
    ));
    let mut sessions = smtp.await?;
    sessions.extend(pop3.await?);
    sessions.extend(probe.await?);
    for s in sessions {
        s.await?;
    }
    // Every accepted probe copy gets the delivery limit to show up.
    let deadline = Instant::now() + rules.delivery;
    loop {
        let (sent, found) = {
            let t = level.tally.lock().expect("tally");
            let found = t
                .probes_sent
                .iter()
                .filter(|n| t.probes_found.contains_key(n))
                .count();
            (t.probes_sent.len(), found)
        };
        if found >= sent || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_probes.store(true, Ordering::Relaxed);
    for p in pollers {
        p.await?;
    }
    Ok(report(
        &level, profile, rules, seconds, smtp_rate, check_rate,
    ))
}

#[derive(Clone, Copy)]
enum Kind {
    Smtp,
    Pop3,
    Probe,
}

/// Starts sessions of one kind at Poisson times until `end`; their handles.
async fn arrivals(
    level: Arc<Level>,
    rate: f64,
    end: Instant,
    seed: u64,
    kind: Kind,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut rng = Rng::new(seed);
    let mut handles = Vec::new();
    if rate <= 0.0 {
        return handles;
    }
    let mut at = Instant::now() + rng.interval(rate);
    let mut number = 0u64;
    while at < end {
        tokio::time::sleep_until(at.into()).await;
        let lag = at.elapsed();
        number += 1;
        let mut tally = level.tally.lock().expect("tally");
        tally.lag.push(lag);
        match kind {
            Kind::Smtp | Kind::Probe => tally.smtp.0 += 1,
            Kind::Pop3 => tally.pop3.0 += 1,
        }
        if level.in_flight.load(Ordering::Relaxed) >= level.target.max_in_flight {
            tally.refused += 1;
            drop(tally);
            at += rng.interval(rate);
            continue;
        }
        drop(tally);
        level.in_flight.fetch_add(1, Ordering::Relaxed);
        let level = level.clone();
        let handle = match kind {
            Kind::Smtp | Kind::Probe => {
                let probe = matches!(kind, Kind::Probe);
                let mut recipients: Vec<String> = Vec::new();
                if probe {
                    recipients.push(level.target.user(rng.below(level.target.probes)));
                } else {
                    let count = rng.weighted(&RECIPIENTS).min(level.users);
                    while recipients.len() < count {
                        let r = level.population_user(&mut rng);
                        if !recipients.contains(&r) {
                            recipients.push(r);
                        }
                    }
                }
                // Numbers are per stream: the probe stream's are told apart by the bit.
                let number = if probe { number | 1 << 63 } else { number };
                let size = rng.weighted(&SIZES);
                let server = level.target.smtp[rng.below(level.target.smtp.len())].clone();
                tokio::spawn(async move {
                    let r = smtp_session(&level, &server, number, recipients, size, probe).await;
                    if let Err(e) = r {
                        level.failed(&format!("smtp via {server}"), e);
                        level.tally.lock().expect("tally").smtp.1 += 1;
                    }
                    level.in_flight.fetch_sub(1, Ordering::Relaxed);
                })
            }
            Kind::Pop3 => {
                let user = level.population_user(&mut rng);
                let server = level.target.pop3s[rng.below(level.target.pop3s.len())].clone();
                tokio::spawn(async move {
                    if let Err(e) = pop3_check(&level, &server, &user).await {
                        level.failed(&format!("pop3 {user} via {server}"), e);
                        level.tally.lock().expect("tally").pop3.1 += 1;
                    }
                    level.in_flight.fetch_sub(1, Ordering::Relaxed);
                })
            }
        };
        handles.push(handle);
        at += rng.interval(rate);
    }
    handles
}

fn report(
    level: &Level,
    profile: Profile,
    rules: Rules,
    seconds: u64,
    smtp_rate: f64,
    check_rate: f64,
) -> serde_json::Value {
    let mut t = level.tally.lock().expect("tally");
    let mut steps = serde_json::Map::new();
    let mut responses_ok = true;
    let mut names: Vec<&'static str> = t.steps.keys().copied().collect();
    names.sort();
    for name in names {
        let times = t.steps.get_mut(name).expect("step");
        times.sort();
        let within = times.iter().filter(|d| **d <= rules.response).count() as f64
            / times.len().max(1) as f64;
        responses_ok &= within >= rules.share;
        steps.insert(
            name.to_string(),
            serde_json::json!({
                "count": times.len(),
                "p50_ms": percentile(times, 0.5),
                "p95_ms": percentile(times, 0.95),
                "p99_ms": percentile(times, 0.99),
                "max_ms": percentile(times, 1.0),
                "within_limit": within,
            }),
        );
    }
    let sessions = t.smtp.0 + t.pop3.0;
    let failed = t.smtp.1 + t.pop3.1 + t.refused;
    let error_rate = failed as f64 / sessions.max(1) as f64;
    let mut delivery: Vec<Duration> = t.probes_found.values().copied().collect();
    delivery.sort();
    let sent = t.probes_sent.len();
    let on_time = t
        .probes_sent
        .iter()
        .filter(|n| t.probes_found.get(n).is_some_and(|d| *d <= rules.delivery))
        .count();
    let delivered_share = on_time as f64 / sent.max(1) as f64;
    t.lag.sort();
    let lag_p99 = percentile(&t.lag, 0.99);
    let lag_ok = lag_p99 <= rules.max_lag.as_secs_f64() * 1000.0;
    let delivery_ok = sent > 0 && delivered_share >= rules.share;
    let errors_ok = error_rate <= rules.max_error_rate;
    let pass = responses_ok && delivery_ok && errors_ok && lag_ok;
    serde_json::json!({
        "users": level.users,
        "seconds": seconds,
        "spec_messages_per_minute": profile.messages_per_minute(level.users),
        "offered": { "smtp_sessions_per_sec": smtp_rate, "pop3_checks_per_sec": check_rate },
        "smtp_sessions": t.smtp.0,
        "smtp_failed": t.smtp.1,
        "pop3_checks": t.pop3.0,
        "pop3_failed": t.pop3.1,
        "refused_in_flight": t.refused,
        "messages_retrieved": t.retrieved,
        "error_rate": error_rate,
        "errors": t.errors,
        "steps": steps,
        "delivery": {
            "probes": sent,
            "found": t.probes_found.len(),
            "within_limit": delivered_share,
            "p50_ms": percentile(&delivery, 0.5),
            "p95_ms": percentile(&delivery, 0.95),
            "max_ms": percentile(&delivery, 1.0),
        },
        "generator_lag_p99_ms": lag_p99,
        "rules": {
            "responses": responses_ok,
            "delivery": delivery_ok,
            "errors": errors_ok,
            "generator_on_time": lag_ok,
        },
        "pass": pass,
    })
}

/// Delivers each of the first `users` population accounts a Poisson-distributed number of
/// messages with mean `mean_per_user` (1 is the steady state: at the profile's rates a user
/// receives about one message between two checks), sizes from `SIZES`, 32 sessions at a
/// time; how many messages and how many per second.
pub async fn prefill(
    target: &Arc<Target>,
    users: usize,
    mean_per_user: f64,
    seed: u64,
) -> anyhow::Result<(usize, f64)> {
    let mut rng = Rng::new(seed ^ 0xf111);
    let mut jobs: Vec<(String, usize)> = Vec::new();
    for i in 0..users {
        let count = rng.poisson(mean_per_user);
        for _ in 0..count {
            jobs.push((target.user(target.probes + i), rng.weighted(&SIZES)));
        }
    }
    let total = jobs.len();
    let jobs = Arc::new(Mutex::new(jobs));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..32 {
        let (jobs, target) = (jobs.clone(), target.clone());
        workers.push(tokio::spawn(async move {
            let server = &target.smtp[w % target.smtp.len()];
            let mut conn = smtp_load::Conn::open(server).await?;
            let mut n = 0;
            loop {
                let Some((to, size)) = jobs.lock().expect("jobs").pop() else {
                    conn.quit().await;
                    return Ok::<_, anyhow::Error>(());
                };
                n += 1;
                let header = format!(
                    "From: bench@remote.test\r\nTo: {to}\r\nSubject: prefill {w} {n}\r\nMessage-ID: <prefill.{}.{w}.{n}@bench>\r\n\r\n",
                    std::process::id()
                );
                conn.send(&to, &smtp_load::filled(header, size))
                    .await
                    .with_context(|| format!("prefilling {to} via {server}"))?;
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok((total, total as f64 / started.elapsed().as_secs_f64()))
}

/// Sends one message to the first probe account and waits (up to ten minutes) until it is in
/// that mailbox, emptying it: a server that queues before delivering has then delivered what
/// came before (the prefill), so the first level does not pay for it.
pub async fn settle(target: &Target) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let user = target.user(0);
    let marker = format!("settle-{}", std::process::id());
    let header = format!(
        "From: bench@remote.test\r\nTo: {user}\r\nSubject: {marker}\r\nMessage-ID: <{marker}@bench>\r\nX-Bench-Message: {marker} 0\r\n\r\n"
    );
    let mut conn = smtp_load::Conn::open(&target.smtp[0]).await?;
    conn.send(&user, &smtp_load::filled(header, 1024)).await?;
    conn.quit().await;
    let deadline = started + Duration::from_secs(600);
    loop {
        let mut pop = mailbox_load::Conn::open(&target.pop3s[0]).await?;
        pop.pop3_login(&user, &target.password).await?;
        let count = pop.pop3_stat().await?;
        let mut found = false;
        for i in 1..=count {
            let lines = pop.pop3_lines(&format!("RETR {i}")).await?;
            found |= lines
                .iter()
                .any(|l| l.starts_with(&format!("X-Bench-Message: {marker} ")));
            pop.pop3(&format!("DELE {i}"), false).await?;
        }
        pop.pop3("QUIT", false).await?;
        if found {
            return Ok(started.elapsed());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the settling message did not reach {user} in ten minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_have_the_profiles_means() {
        let kib = mean(&SIZES) / 1024.0;
        assert!((20.0..26.0).contains(&kib), "mean size {kib} KiB");
        let rcpts = mean(&RECIPIENTS);
        assert!((rcpts - 2.0).abs() < 0.05, "mean recipients {rcpts}");
    }

    #[test]
    fn draws_follow_the_tables_and_the_rate() {
        let mut rng = Rng::new(7);
        let n = 200_000;
        let ones = (0..n).filter(|_| rng.weighted(&RECIPIENTS) == 1).count();
        let share = ones as f64 / n as f64;
        assert!(
            (share - 0.70).abs() < 0.01,
            "share of one recipient {share}"
        );
        let total: f64 = (0..n).map(|_| rng.interval(50.0).as_secs_f64()).sum();
        let rate = n as f64 / total;
        assert!((rate - 50.0).abs() < 1.0, "rate {rate}");
        let mean = (0..n).map(|_| rng.poisson(0.25)).sum::<usize>() as f64 / n as f64;
        assert!((mean - 0.25).abs() < 0.01, "poisson mean {mean}");
    }

    #[test]
    fn the_profile_gives_specs_metric() {
        let p = Profile {
            sent_per_day: 2.0,
            checks_per_day: 4.0,
            busy_hour_share: 0.15,
        };
        // 200 users make one message per minute in the busy hour.
        assert!((p.messages_per_minute(200) - 1.0).abs() < 1e-9);
        assert!((p.checks_per_sec(3600) - 0.6).abs() < 1e-9);
    }
}
