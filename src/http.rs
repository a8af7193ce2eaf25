//! The node's HTTP listener: Prometheus metrics at `/metrics` (text exposition format 0.0.4),
//! node-local figures a scraper sums over the cluster: the outbound queue in the partitions
//! this node leads, delivery outcomes, the storage and transport counters, and the IMAP
//! header cache.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::routing::get;

use crate::imap::Imap;
use crate::node::Node;
use crate::outbound::Outbound;

#[derive(Clone)]
struct Shared {
    node: Arc<Node>,
    outbound: Arc<Outbound>,
    imap: Arc<Imap>,
}

/// Serves HTTP on `addr` until the process ends; returns the bound address.
pub async fn listen(
    node: Arc<Node>,
    outbound: Arc<Outbound>,
    imap: Arc<Imap>,
    addr: SocketAddr,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("http: cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .with_state(Shared {
            node,
            outbound,
            imap,
        });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("http listener stopped: {e}");
        }
    });
    Ok(bound)
}

async fn metrics(State(s): State<Shared>) -> impl axum::response::IntoResponse {
    let outbound = s.outbound.clone();
    let gauge = tokio::task::spawn_blocking(move || outbound.gauge())
        .await
        .unwrap_or_default();
    let now = crate::mail::now();
    let stats = &s.outbound.stats;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    metric(
        "mailgrid_queue_entries",
        "gauge",
        "Outbound queue entries in the partitions this node leads.",
        &[("", gauge.entries)],
    );
    let age = gauge.oldest.map(|t| now.saturating_sub(t).max(0) as u64);
    metric(
        "mailgrid_queue_oldest_age_seconds",
        "gauge",
        "Age of the oldest outbound queue entry in the partitions this node leads (0: none).",
        &[("", age.unwrap_or(0))],
    );
    metric(
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
    metric(
        "mailgrid_outbound_bounces_total",
        "counter",
        "Delivery status notifications sent by this node.",
        &[("", stats.bounces.load(Ordering::Relaxed))],
    );
    metric(
        "mailgrid_partitions_led",
        "gauge",
        "Partition groups this node leads.",
        &[("", gauge.partitions_led)],
    );
    let host = s.node.host();
    metric(
        "mailgrid_storage_syncs_total",
        "counter",
        "fdatasync calls of the node's store (each covers a group commit).",
        &[("", host.syncs())],
    );
    metric(
        "mailgrid_cluster_calls_served_total",
        "counter",
        "Requests this node served for its peers over the cluster transport.",
        &[("", host.transport().calls_served())],
    );
    metric(
        "mailgrid_disk_failed",
        "gauge",
        "1 once a sync of this node's store failed or stalled (it then leads and votes in nothing until restarted), else 0.",
        &[("", u64::from(host.disk_failure().is_some()))],
    );
    metric(
        "mailgrid_disk_full",
        "gauge",
        "1 while this node's free disk space is below [raft] disk_free_min_mib (new mail refused, no new replicas), else 0.",
        &[("", u64::from(host.disk_low().is_some()))],
    );
    metric(
        "mailgrid_witness",
        "gauge",
        "1 when this node is a witness (votes and keeps logs, holds no mail), else 0.",
        &[("", u64::from(host.is_witness()))],
    );
    metric(
        "mailgrid_raft_log_entries",
        "gauge",
        "Raft log entries this node keeps over all its groups (appended, not yet purged).",
        &[("", host.log_entries())],
    );
    let placement = host.placement_gauges();
    let moves = host.move_stats();
    metric(
        "mailgrid_replicas",
        "gauge",
        "Partition groups this node is a member of (voter or learner).",
        &[("", placement.replicas)],
    );
    metric(
        "mailgrid_replicas_target",
        "gauge",
        "Partition replicas the placement plan gives this node.",
        &[("", placement.replicas_target)],
    );
    metric(
        "mailgrid_leaders_target",
        "gauge",
        "Partitions whose placement plan prefers this node as leader.",
        &[("", placement.leaders_target)],
    );
    // The rebalance is the meta leader's: other nodes report zero, so sums stay right.
    let (pending, running, done) = if moves.meta_leader {
        (placement.moves_pending, moves.running, moves.done)
    } else {
        (0, 0, 0)
    };
    metric(
        "mailgrid_rebalance_moves",
        "gauge",
        "Replica moves of the rebalance: planned but not started (pending) and started (running); reported by the meta leader.",
        &[
            ("{state=\"pending\"}", pending),
            ("{state=\"running\"}", running),
        ],
    );
    metric(
        "mailgrid_rebalance_moves_done_total",
        "counter",
        "Replica moves this node saw finish while meta leader, since it started.",
        &[("", done)],
    );
    let headers = &s.imap.headers;
    let (hits, misses) = headers.hits_and_misses();
    metric(
        "mailgrid_imap_header_cache_bytes",
        "gauge",
        "Memory held by the IMAP header cache (imap.header_cache_mib).",
        &[("", headers.bytes() as u64)],
    );
    metric(
        "mailgrid_imap_header_cache_lookups_total",
        "counter",
        "Header lookups by IMAP FETCH and SEARCH, answered from the cache (hit) or not (miss).",
        &[("{result=\"hit\"}", hits), ("{result=\"miss\"}", misses)],
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}
