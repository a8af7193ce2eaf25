//! Node figures for Prometheus (text exposition format 0.0.4). Each part of a node that
//! counts something implements [`MetricSource`]; the HTTP listener asks every source in turn
//! and serves the concatenation at `/metrics`. Figures are node-local: a scraper sums them
//! over the cluster.

use std::fmt::Write;

use crate::node::Node;

/// The text of one scrape, built metric by metric.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// Appends one metric: its help and type lines, then one line per `(labels, value)`
    /// sample (`labels` is `""` or a `{name="value"}` set).
    pub fn metric(&mut self, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(self.text, "{name}{labels} {value}");
        }
    }

    pub fn into_text(self) -> String {
        self.text
    }
}

/// Something that reports figures at `/metrics`. Called on a blocking thread, so it may read
/// local state machines.
pub trait MetricSource: Send + Sync {
    fn write_metrics(&self, out: &mut Exposition);
}

/// The storage, transport, disk and placement figures of the node's raft host.
impl MetricSource for Node {
    fn write_metrics(&self, out: &mut Exposition) {
        let host = self.host();
        out.metric(
            "mailgrid_storage_syncs_total",
            "counter",
            "fdatasync calls of the node's store (each covers a group commit).",
            &[("", host.syncs())],
        );
        out.metric(
            "mailgrid_cluster_calls_served_total",
            "counter",
            "Requests this node served for its peers over the cluster transport.",
            &[("", host.transport().calls_served())],
        );
        out.metric(
            "mailgrid_disk_failed",
            "gauge",
            "1 once a sync of this node's store failed or stalled (it then leads and votes in nothing until restarted), else 0.",
            &[("", u64::from(host.disk_failure().is_some()))],
        );
        out.metric(
            "mailgrid_disk_full",
            "gauge",
            "1 while this node's free disk space is below [raft] disk_free_min_mib (new mail refused, no new replicas), else 0.",
            &[("", u64::from(host.disk_low().is_some()))],
        );
        out.metric(
            "mailgrid_witness",
            "gauge",
            "1 when this node is a witness (votes and keeps logs, holds no mail), else 0.",
            &[("", u64::from(host.is_witness()))],
        );
        out.metric(
            "mailgrid_raft_log_entries",
            "gauge",
            "Raft log entries this node keeps over all its groups (appended, not yet purged).",
            &[("", host.log_entries())],
        );
        out.metric(
            "mailgrid_stale_replicas_dropped_total",
            "counter",
            "Copies of partition groups this node had left that it dropped (space freed after a move), since it started.",
            &[("", host.stale_replicas_dropped())],
        );
        let placement = host.placement_gauges();
        let moves = host.move_stats();
        out.metric(
            "mailgrid_replicas",
            "gauge",
            "Partition groups this node is a member of (voter or learner).",
            &[("", placement.replicas)],
        );
        out.metric(
            "mailgrid_replicas_target",
            "gauge",
            "Partition replicas the placement plan gives this node.",
            &[("", placement.replicas_target)],
        );
        out.metric(
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
        out.metric(
            "mailgrid_rebalance_moves",
            "gauge",
            "Replica moves of the rebalance: planned but not started (pending) and started (running); reported by the meta leader.",
            &[
                ("{state=\"pending\"}", pending),
                ("{state=\"running\"}", running),
            ],
        );
        out.metric(
            "mailgrid_rebalance_moves_done_total",
            "counter",
            "Replica moves this node saw finish while meta leader, since it started.",
            &[("", done)],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_has_help_type_and_one_line_per_sample() {
        // Goal: the exposition format Prometheus parses: HELP, TYPE, then samples.
        let mut out = Exposition::default();
        out.metric(
            "m_total",
            "counter",
            "Things.",
            &[("{a=\"x\"}", 1), ("{a=\"y\"}", 2)],
        );
        assert_eq!(
            out.into_text(),
            "# HELP m_total Things.\n# TYPE m_total counter\nm_total{a=\"x\"} 1\nm_total{a=\"y\"} 2\n"
        );
    }
}
