//! Outbound mail: the replicated queue's delivery workers.
//!
//! Submission turns remote recipients into queue entries committed in the partition their id
//! hashes to (`service::queue::enqueue`) before it answers 250. Every node runs an
//! [`Outbound`] worker that looks, in the partitions it leads, for entries that are due, and
//! delivers them: MX lookup, one SMTP transaction per destination domain, and a
//! `QueueAttempted` proposal with each recipient's outcome. When leadership moves, the new leader's worker finds the same entries;
//! an attempt that was in flight on the old leader may be repeated (at least once toward the
//! remote MX), but an entry is never dropped before its outcome is committed.
//!
//! Recipients that fail for good (5xx, or still undelivered when the entry expires) are
//! reported to the sender in one DSN per entry; the DSN's delivery key is derived from the
//! entry's id, so a report repeated after a crash is stored once.

// The delivery task's future nests the service's router and mail futures deep; computing
// its layout needs more than the default 128 query levels.
#![recursion_limit = "256"]

pub mod client;
pub mod config;
pub mod dns;
pub mod dsn;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use service::partition::{AttemptOutcome, PartitionCommand, QueueEntry, QueueId};
use service::types::{domain_of, UnixSeconds};
use service::Command;
use service::GroupId;
use tokio::sync::Semaphore;

use client::{ClientError, Connection, Settings, TlsMode, Transaction};
pub use config::{OutboundConfig, Relay, RelayTls};
use dns::{Dns, RouteError};
use service::mail::{self, MailServiceError, Resolved};
use service::metrics::{Exposition, MetricSource};
use service::node::Node;
use service::queue::enqueue;

/// Most due entries one partition hands its worker per look.
const DUE_BATCH: usize = 64;
/// How long a connection waits, idle, for the next message to its destination...
const IDLE_MAX: Duration = Duration::from_secs(5);
/// ...and how many messages it carries before it is closed.
const REUSE_MAX: u32 = 100;
/// Idle connections kept per destination.
const IDLE_PER_DESTINATION_MAX: usize = 4;

/// The delivery worker of one node.
pub struct Outbound {
    node: Arc<Node>,
    config: OutboundConfig,
    hostname: String,
    dns: Dns,
    inflight: Mutex<HashSet<QueueId>>,
    slots: Arc<Semaphore>,
    destinations: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// For remote MXs: opportunistic STARTTLS, no credentials.
    mx: Settings,
    /// Per smarthost: the global one (`None`) and each domain's, made once at start so a bad
    /// CA file stops the node rather than the mail.
    relays: HashMap<Option<String>, Settings>,
    /// Connections that finished a transaction, by destination, for the next message there.
    idle: Mutex<HashMap<String, Vec<Idle>>>,
    pub stats: Stats,
}

/// Counters since the node started, for metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub delivered: AtomicU64,
    pub deferred: AtomicU64,
    pub failed: AtomicU64,
    pub bounces: AtomicU64,
}

/// The queue in the partitions this node leads.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct QueueGauge {
    pub entries: u64,
    pub oldest: Option<UnixSeconds>,
    pub partitions_led: u64,
}

struct Idle {
    conn: Connection,
    since: tokio::time::Instant,
    uses: u32,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("hostname", &self.hostname)
            .finish()
    }
}

/// What delivery to one domain found, per recipient, and what went wrong on the way.
struct DomainResult {
    outcomes: Vec<(String, AttemptOutcome)>,
    error: Option<String>,
}

impl DomainResult {
    fn all(recipients: &[String], outcome: impl Fn() -> AttemptOutcome, error: &str) -> Self {
        DomainResult {
            outcomes: recipients.iter().map(|r| (r.clone(), outcome())).collect(),
            error: Some(error.to_string()),
        }
    }
}

/// Each recipient's outcome from the replies of one transaction.
fn outcomes_of(recipients: &[String], tx: &Transaction) -> Vec<(String, AttemptOutcome)> {
    recipients
        .iter()
        .zip(&tx.rcpt)
        .map(|(r, rcpt)| {
            let reply = match (&tx.data, rcpt.is_positive()) {
                (Some(data), true) => data,
                (None, true) => {
                    // Accepted at RCPT but no message went: cannot happen with a sane
                    // server; try again later.
                    return (
                        r.clone(),
                        AttemptOutcome::Deferred(format!("{rcpt}; no DATA")),
                    );
                }
                (_, false) => rcpt,
            };
            let text = reply.to_string();
            let outcome = if reply.is_positive() {
                AttemptOutcome::Delivered(text)
            } else if reply.is_permanent() {
                AttemptOutcome::Failed(text)
            } else {
                AttemptOutcome::Deferred(text)
            };
            (r.clone(), outcome)
        })
        .collect()
}

impl Outbound {
    pub fn new(
        node: Arc<Node>,
        config: OutboundConfig,
        hostname: String,
    ) -> anyhow::Result<Arc<Outbound>> {
        let dns = Dns::new(config.resolver)?;
        let mx = Settings {
            helo: hostname.clone(),
            connect_timeout: config.connect_timeout,
            reply_timeout: config.reply_timeout,
            tls: if config.starttls {
                TlsMode::Opportunistic
            } else {
                TlsMode::Off
            },
            connector: service::client_tls::unverified_connector(),
            auth: None,
        };
        let mut relays = HashMap::new();
        let configured = config.relay.iter().map(|r| (None, r)).chain(
            config
                .domain_relays
                .iter()
                .map(|(domain, r)| (Some(domain.clone()), r)),
        );
        for (key, relay) in configured {
            let connector = match &relay.ca_file {
                Some(ca) => service::client_tls::verified_connector(ca)?,
                None => service::client_tls::unverified_connector(),
            };
            let tls = match relay.tls {
                RelayTls::StartTls => TlsMode::Required,
                RelayTls::Implicit => TlsMode::Implicit,
                RelayTls::None => TlsMode::Off,
            };
            let settings = Settings {
                tls,
                connector,
                auth: relay.auth.clone(),
                ..mx.clone()
            };
            relays.insert(key, settings);
        }
        Ok(Arc::new(Outbound {
            node,
            slots: Arc::new(Semaphore::new(config.concurrency_max)),
            config,
            hostname,
            dns,
            inflight: Mutex::new(HashSet::new()),
            destinations: Mutex::new(HashMap::new()),
            mx,
            relays,
            idle: Mutex::new(HashMap::new()),
            stats: Stats::default(),
        }))
    }

    /// Runs the worker until the process ends.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                me.look();
                tokio::time::sleep(me.config.poll).await;
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                for conn in me.expired() {
                    tokio::spawn(conn.quit());
                }
            }
        });
    }

    /// Idle connections past their time, taken out of the pool.
    fn expired(&self) -> Vec<Connection> {
        let mut idle = self.idle.lock().expect("idle lock");
        let mut out = Vec::new();
        for list in idle.values_mut() {
            let (old, young): (Vec<Idle>, Vec<Idle>) =
                list.drain(..).partition(|i| i.since.elapsed() >= IDLE_MAX);
            *list = young;
            out.extend(old.into_iter().map(|i| i.conn));
        }
        idle.retain(|_, list| !list.is_empty());
        out
    }

    /// A connection that carried a message to `key` a moment ago, if one waits.
    fn take_idle(&self, key: &str) -> Option<(Connection, u32)> {
        let mut idle = self.idle.lock().expect("idle lock");
        let list = idle.get_mut(key)?;
        while let Some(i) = list.pop() {
            if i.since.elapsed() < IDLE_MAX {
                return Some((i.conn, i.uses));
            }
        }
        None
    }

    fn put_idle(&self, key: &str, conn: Connection, uses: u32) -> Option<Connection> {
        if uses >= REUSE_MAX {
            return Some(conn);
        }
        let mut idle = self.idle.lock().expect("idle lock");
        let list = idle.entry(key.to_string()).or_default();
        if list.len() >= IDLE_PER_DESTINATION_MAX {
            return Some(conn);
        }
        list.push(Idle {
            conn,
            since: tokio::time::Instant::now(),
            uses,
        });
        None
    }

    /// Runs the transaction on an idle connection to `key` when there is one. `None` when
    /// there was none, or it turned out dead (the server closed it meanwhile): then a new
    /// connection is made.
    async fn try_idle(
        &self,
        key: &str,
        host: &str,
        sender: &str,
        rcpts: &[String],
        body: &[u8],
    ) -> Option<DomainResult> {
        let (mut conn, uses) = self.take_idle(key)?;
        let result = conn.transaction(sender, rcpts, body).await;
        if matches!(
            result,
            Err(ClientError::Network(_) | ClientError::Garbage(_))
        ) {
            return None;
        }
        Some(self.finish(conn, key, uses, host, rcpts, result).await)
    }

    /// Starts an attempt for every due entry in the partitions this node leads.
    fn look(self: &Arc<Self>) {
        let now = mail::now();
        for (group, machine) in self.node.led_partitions() {
            let due = match machine.read_partition(|v| v.queue_due(now, DUE_BATCH)) {
                Ok(due) => due,
                Err(e) => {
                    tracing::error!("queue of group {group} unreadable: {e}");
                    continue;
                }
            };
            for id in due {
                if !self.inflight.lock().expect("inflight lock").insert(id) {
                    continue;
                }
                let me = self.clone();
                tokio::spawn(async move {
                    let slot = me.slots.clone().acquire_owned().await;
                    if slot.is_ok() {
                        me.attempt(group, id).await;
                    }
                    me.inflight.lock().expect("inflight lock").remove(&id);
                });
            }
        }
    }

    /// Entries queued in the partitions this node leads now.
    pub fn gauge(&self) -> QueueGauge {
        let mut gauge = QueueGauge::default();
        for (_, machine) in self.node.led_partitions() {
            gauge.partitions_led += 1;
            if let Ok((entries, oldest)) = machine.read_partition(|v| v.queue_summary()) {
                gauge.entries += entries;
                gauge.oldest = match (gauge.oldest, oldest) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        gauge
    }

    fn count(&self, outcomes: &[(String, AttemptOutcome)]) {
        for (_, outcome) in outcomes {
            let counter = match outcome {
                AttemptOutcome::Delivered(_) => &self.stats.delivered,
                AttemptOutcome::Deferred(_) => &self.stats.deferred,
                AttemptOutcome::Failed(_) => &self.stats.failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32.checked_shl(attempts.min(20)).unwrap_or(u32::MAX);
        self.config
            .retry_min
            .saturating_mul(factor)
            .min(self.config.retry_max)
    }

    async fn attempt(&self, group: GroupId, id: QueueId) {
        let Ok(machine) = self.node.host().local_machine(group) else {
            return;
        };
        let read = machine.read_partition(|v| {
            let Some(entry) = v.queue_entry(&id)? else {
                return Ok(None);
            };
            let body = v.body(entry.body)?;
            Ok::<_, service::StorageError>(Some((entry, body)))
        });
        let (entry, body) = match read {
            Ok(Some((entry, Some(body)))) => (entry, body),
            Ok(Some((entry, None))) => {
                tracing::error!("queue entry {} has no body", hex::encode(entry.id));
                return;
            }
            Ok(None) => return,
            Err(e) => {
                tracing::error!("queue entry {} unreadable: {e}", hex::encode(id));
                return;
            }
        };
        if entry.held {
            return;
        }
        let now = mail::now();
        if entry.is_final() {
            self.report(group, &entry, &body, now).await;
            return;
        }
        let expired = now.saturating_sub(entry.created) >= self.config.lifetime.as_secs() as i64;
        let (outcomes, error) = if expired {
            let outcomes = entry
                .pending()
                .map(|r| {
                    let last = r
                        .reply
                        .as_deref()
                        .or(entry.last_error.as_deref())
                        .unwrap_or("no attempt succeeded");
                    let why = format!(
                        "gave up after {} attempts over {} s: {last}",
                        entry.attempts,
                        self.config.lifetime.as_secs()
                    );
                    (r.address.clone(), AttemptOutcome::Failed(why))
                })
                .collect();
            (outcomes, Some("expired".to_string()))
        } else {
            self.deliver(&entry, &body).await
        };
        self.count(&outcomes);
        let next = now.saturating_add(self.backoff(entry.attempts).as_secs() as i64);
        let cmd = PartitionCommand::QueueAttempted {
            id,
            outcomes,
            error,
            next_attempt: next,
        };
        if let Err(e) = self.node.router.write(group, Command::Partition(cmd)).await {
            // The entry stays due; this node or the next leader tries it again.
            tracing::info!(
                "outcome of queue entry {} not recorded: {e}",
                hex::encode(id)
            );
        }
    }

    /// One attempt at every pending recipient, domain by domain in parallel.
    async fn deliver(
        &self,
        entry: &QueueEntry,
        body: &[u8],
    ) -> (Vec<(String, AttemptOutcome)>, Option<String>) {
        let mut by_domain: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in entry.pending() {
            by_domain
                .entry(domain_of(&r.address).to_ascii_lowercase())
                .or_default()
                .push(r.address.clone());
        }
        let results = join_all(
            by_domain
                .iter()
                .map(|(domain, rcpts)| self.deliver_domain(domain, &entry.sender, rcpts, body)),
        )
        .await;
        let mut outcomes = Vec::new();
        let mut errors = Vec::new();
        for r in results {
            outcomes.extend(r.outcomes);
            errors.extend(r.error);
        }
        let error = (!errors.is_empty()).then(|| errors.join("; "));
        (outcomes, error)
    }

    fn destination(&self, domain: &str) -> Arc<Semaphore> {
        let mut map = self.destinations.lock().expect("destinations lock");
        if map.len() > 10_000 {
            // Forget idle destinations (nobody holds their permits).
            map.retain(|_, s| s.available_permits() < self.config.per_destination_max);
        }
        map.entry(domain.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.per_destination_max)))
            .clone()
    }

    async fn deliver_domain(
        &self,
        domain: &str,
        sender: &str,
        rcpts: &[String],
        body: &[u8],
    ) -> DomainResult {
        let Ok(_permit) = self.destination(domain).acquire_owned().await else {
            return DomainResult::all(
                rcpts,
                || AttemptOutcome::Deferred("shutting down".into()),
                "shutting down",
            );
        };
        if let Some((relay, settings, key)) = self.relay_for(domain) {
            if let Some(done) = self.try_idle(&key, &relay.host, sender, rcpts, body).await {
                return done;
            }
            return self
                .deliver_via_relay(relay, settings, &key, sender, rcpts, body)
                .await;
        }
        let key = format!("mx/{domain}");
        if let Some(done) = self.try_idle(&key, domain, sender, rcpts, body).await {
            return done;
        }
        let routes = match self.dns.routes(domain).await {
            Ok(routes) => routes,
            Err(RouteError::Permanent(why)) => {
                return DomainResult::all(
                    rcpts,
                    || AttemptOutcome::Failed(format!("550 5.1.2 {why}")),
                    &why,
                )
            }
            Err(RouteError::Temporary(why)) => {
                return DomainResult::all(
                    rcpts,
                    || AttemptOutcome::Deferred(format!("451 4.4.3 {why}")),
                    &why,
                )
            }
        };
        let mut errors = Vec::new();
        for route in &routes {
            for ip in &route.addrs {
                let addr = SocketAddr::new(*ip, self.config.port);
                let conn = match self.connect(addr, &route.host, &self.mx).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Greeting refused, no answer, garbage: the next exchanger may do.
                        errors.push(format!("{} [{addr}]: {e}", route.host));
                        continue;
                    }
                };
                return self
                    .transact(conn, &key, &route.host, sender, rcpts, body)
                    .await;
            }
        }
        let why = errors.join("; ");
        DomainResult::all(
            rcpts,
            || AttemptOutcome::Deferred(format!("451 4.4.1 {why}")),
            &why,
        )
    }

    /// The smarthost for `domain` (its own, else the global one) and how to connect to it.
    /// Also names its pool of idle connections.
    fn relay_for(&self, domain: &str) -> Option<(&Relay, &Settings, String)> {
        if let Some(relay) = self.config.domain_relays.get(domain) {
            let settings = &self.relays[&Some(domain.to_string())];
            return Some((relay, settings, format!("relay/{domain}")));
        }
        let relay = self.config.relay.as_ref()?;
        Some((relay, &self.relays[&None], "relay/*".to_string()))
    }

    /// Delivery through a smarthost: every failure to reach it, or to log in, is retried
    /// (it is the operator's relay, not the recipient's server, that is unwell).
    async fn deliver_via_relay(
        &self,
        relay: &Relay,
        settings: &Settings,
        key: &str,
        sender: &str,
        rcpts: &[String],
        body: &[u8],
    ) -> DomainResult {
        let addrs = match relay.host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => match self.dns.addresses(&relay.host).await {
                Ok(addrs) => addrs,
                Err(e) => {
                    let why = format!("relay {}: {e}", relay.host);
                    return DomainResult::all(
                        rcpts,
                        || AttemptOutcome::Deferred(format!("451 4.4.3 {why}")),
                        &why,
                    );
                }
            },
        };
        let mut errors = Vec::new();
        for ip in addrs {
            let addr = SocketAddr::new(ip, relay.port);
            match self.connect(addr, &relay.host, settings).await {
                Ok(conn) => {
                    return self
                        .transact(conn, key, &relay.host, sender, rcpts, body)
                        .await
                }
                Err(e) => errors.push(format!("relay {} [{addr}]: {e}", relay.host)),
            }
        }
        let why = errors.join("; ");
        DomainResult::all(
            rcpts,
            || AttemptOutcome::Deferred(format!("451 4.4.1 {why}")),
            &why,
        )
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        host: &str,
        settings: &Settings,
    ) -> Result<Connection, ClientError> {
        match Connection::open(addr, host, settings).await {
            // Opportunistic TLS: a server whose TLS is broken still gets its mail in plain
            // text, as it would from Postfix with `smtp_tls_security_level = may`.
            Err(ClientError::Tls(why)) if settings.tls == TlsMode::Opportunistic => {
                tracing::info!("{host} [{addr}]: {why}; retrying without TLS");
                let plain = Settings {
                    tls: TlsMode::Off,
                    ..settings.clone()
                };
                Connection::open(addr, host, &plain).await
            }
            other => other,
        }
    }

    async fn transact(
        &self,
        mut conn: Connection,
        key: &str,
        host: &str,
        sender: &str,
        rcpts: &[String],
        body: &[u8],
    ) -> DomainResult {
        let result = conn.transaction(sender, rcpts, body).await;
        self.finish(conn, key, 0, host, rcpts, result).await
    }

    /// Outcomes of a transaction; a connection that completed one waits for the next message
    /// to the same destination.
    async fn finish(
        &self,
        conn: Connection,
        key: &str,
        uses: u32,
        host: &str,
        rcpts: &[String],
        result: Result<Transaction, ClientError>,
    ) -> DomainResult {
        let result = match result {
            Ok(tx) => {
                if let Some(conn) = self.put_idle(key, conn, uses + 1) {
                    conn.quit().await;
                }
                return DomainResult {
                    outcomes: outcomes_of(rcpts, &tx),
                    error: None,
                };
            }
            Err(ClientError::Refused(reply)) => {
                let text = reply.to_string();
                let why = format!("{host} said: {text}");
                if reply.is_permanent() {
                    DomainResult::all(rcpts, || AttemptOutcome::Failed(text.clone()), &why)
                } else {
                    DomainResult::all(rcpts, || AttemptOutcome::Deferred(text.clone()), &why)
                }
            }
            Err(e) => {
                // The connection broke mid-transaction: whether the server kept the message
                // is unknown, so it is sent again later (at least once).
                let why = format!("{host}: {e}");
                return DomainResult::all(
                    rcpts,
                    || AttemptOutcome::Deferred(format!("451 4.4.2 {why}")),
                    &why,
                );
            }
        };
        conn.quit().await;
        result
    }

    /// Tells the sender about failed recipients (once), then drops the entry.
    async fn report(&self, group: GroupId, entry: &QueueEntry, body: &[u8], now: UnixSeconds) {
        if !entry.sender.is_empty() && entry.failed().next().is_some() {
            let date = time::OffsetDateTime::from_unix_timestamp(now)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            let dsn = dsn::bounce(entry, body, &self.hostname, date);
            if let Err(e) = self.send_bounce(entry, &dsn, now).await {
                tracing::info!(
                    "bounce for queue entry {} not sent: {e}",
                    hex::encode(entry.id)
                );
                let cmd = PartitionCommand::QueueAttempted {
                    id: entry.id,
                    outcomes: Vec::new(),
                    error: Some(format!("bounce not sent: {e}")),
                    next_attempt: now.saturating_add(self.config.retry_min.as_secs() as i64),
                };
                let _ = self.node.router.write(group, Command::Partition(cmd)).await;
                return;
            }
            self.stats.bounces.fetch_add(1, Ordering::Relaxed);
        }
        let cmd = PartitionCommand::QueueRemove { id: entry.id };
        match self.node.router.write(group, Command::Partition(cmd)).await {
            Ok(_) => {}
            Err(e) => tracing::info!("queue entry {} not removed: {e}", hex::encode(entry.id)),
        }
    }

    /// Delivers a bounce to the sender's mailbox here, or queues it (with a null sender, so
    /// it is never bounced itself) when the sender is elsewhere.
    async fn send_bounce(
        &self,
        entry: &QueueEntry,
        dsn: &[u8],
        now: UnixSeconds,
    ) -> Result<(), MailServiceError> {
        let key = mail::message_key(&[b"dsn", &entry.id]);
        let router = &self.node.router;
        let domain = domain_of(&entry.sender).to_ascii_lowercase();
        let local = self
            .node
            .host()
            .meta()
            .read_meta(|m| m.domain(&domain))
            .ok()
            .flatten()
            .is_some();
        if !local {
            enqueue(
                router,
                "",
                std::slice::from_ref(&entry.sender),
                dsn.to_vec(),
                &key,
                now,
            )
            .await?;
            return Ok(());
        }
        match mail::resolve(router, &entry.sender).await? {
            Resolved::Accounts(accounts) => {
                let mut body = b"Return-Path: <>\r\n".to_vec();
                body.extend_from_slice(dsn);
                let names: Vec<String> = accounts.into_iter().map(|a| a.address).collect();
                mail::deliver(router, &names, &body, &key).await?;
            }
            Resolved::Unknown => {
                tracing::info!(
                    "bounce for queue entry {} dropped: sender {} no longer exists",
                    hex::encode(entry.id),
                    entry.sender
                );
            }
        }
        Ok(())
    }
}

/// The queue in the partitions this node leads, and this node's delivery outcomes.
impl MetricSource for Outbound {
    fn write_metrics(&self, out: &mut Exposition) {
        let gauge = self.gauge();
        let now = mail::now();
        let stats = &self.stats;
        out.metric(
            "mailgrid_queue_entries",
            "gauge",
            "Outbound queue entries in the partitions this node leads.",
            &[("", gauge.entries)],
        );
        let age = gauge.oldest.map(|t| now.saturating_sub(t).max(0) as u64);
        out.metric(
            "mailgrid_queue_oldest_age_seconds",
            "gauge",
            "Age of the oldest outbound queue entry in the partitions this node leads (0: none).",
            &[("", age.unwrap_or(0))],
        );
        out.metric(
            "mailgrid_outbound_recipients_total",
            "counter",
            "Outcomes of delivery attempts per recipient, by this node.",
            &[
                (
                    "{result=\"delivered\"}",
                    stats.delivered.load(Ordering::Relaxed),
                ),
                (
                    "{result=\"deferred\"}",
                    stats.deferred.load(Ordering::Relaxed),
                ),
                ("{result=\"failed\"}", stats.failed.load(Ordering::Relaxed)),
            ],
        );
        out.metric(
            "mailgrid_outbound_bounces_total",
            "counter",
            "Delivery status notifications sent by this node.",
            &[("", stats.bounces.load(Ordering::Relaxed))],
        );
        out.metric(
            "mailgrid_partitions_led",
            "gauge",
            "Partition groups this node leads.",
            &[("", gauge.partitions_led)],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use client::Reply;

    fn reply(code: u16) -> Reply {
        Reply {
            code,
            text: "x".into(),
        }
    }

    #[test]
    fn each_recipient_takes_the_class_of_its_own_reply() {
        // Goal: a refused RCPT decides that recipient alone; accepted ones take the reply to
        // the message; 5xx fails, 4xx defers, 2xx delivers.
        let rcpts: Vec<String> = ["a@x", "b@x", "c@x"].map(String::from).to_vec();
        let tx = Transaction {
            rcpt: vec![reply(250), reply(550), reply(451)],
            data: Some(reply(250)),
        };
        let got = outcomes_of(&rcpts, &tx);
        assert!(matches!(got[0].1, AttemptOutcome::Delivered(_)));
        assert!(matches!(got[1].1, AttemptOutcome::Failed(_)));
        assert!(matches!(got[2].1, AttemptOutcome::Deferred(_)));
        let tx = Transaction {
            rcpt: vec![reply(250), reply(250), reply(250)],
            data: Some(reply(554)),
        };
        assert!(outcomes_of(&rcpts, &tx)
            .iter()
            .all(|(_, o)| matches!(o, AttemptOutcome::Failed(_))));
    }
}
