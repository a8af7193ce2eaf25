//! The nemesis: faults on a schedule drawn from the seed, each held for a while and then
//! healed, recorded as a timeline.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;

use crate::cluster::Cluster;

/// The faults this runner can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Fault {
    /// kill -9 of one random node, restarted when healed.
    Kill,
    /// kill -9 of the leader of a random partition.
    KillLeader,
    /// kill -9 of a minority of the nodes at once.
    KillMinority,
    /// SIGSTOP of one random node, SIGCONT when healed.
    Pause,
    /// Every node restarted in turn, one at a time.
    Rolling,
    /// The nodes cut apart: random halves, an isolated leader, two sides that only a bridge
    /// node sees, or a ring where each node sees only its neighbours.
    Partition,
    /// One node's wall clock jumped forward or back (libfaketime).
    Clock,
    /// A node removed from the cluster under load (its disk wiped), and a fresh one joined in
    /// its place.
    Membership,
    /// The placement changed under load: a node joined into a spare slot (the cluster grows
    /// for good), or a node drained or given a heavier weight, undone when healed, so
    /// replicas move both ways, often while earlier moves are still running.
    Grow,
    /// One node's disk fails (syncs return EIO), stops answering (syncs block), or fills up;
    /// healed by a working disk and, for the first two, a restart, since a node gives up on a
    /// failed disk for good.
    Disk,
    /// A rolling upgrade (`--bin-old`): the next node still on the older release is stopped
    /// and started on the release under test; once every node runs it, `admin cluster
    /// upgrade-finish` raises the cluster's format. Old and new releases serve side by side
    /// under the other faults until then.
    Upgrade,
}

impl Fault {
    pub const ALL: [(&'static str, Fault); 11] = [
        ("kill", Fault::Kill),
        ("kill-leader", Fault::KillLeader),
        ("kill-minority", Fault::KillMinority),
        ("pause", Fault::Pause),
        ("rolling", Fault::Rolling),
        ("partition", Fault::Partition),
        ("clock", Fault::Clock),
        ("membership", Fault::Membership),
        ("grow", Fault::Grow),
        ("disk", Fault::Disk),
        ("upgrade", Fault::Upgrade),
    ];

    /// Faults from a comma-separated list; unknown names are an error that lists the known.
    pub fn parse_list(list: &str) -> Result<Vec<Fault>, String> {
        let known = || {
            Fault::ALL
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = Vec::new();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match Fault::ALL.iter().find(|(n, _)| *n == name) {
                Some((_, f)) => out.push(*f),
                None => return Err(format!("unknown nemesis {name:?}; known: {}", known())),
            }
        }
        if out.is_empty() {
            return Err(format!("no nemesis given; known: {}", known()));
        }
        Ok(out)
    }
}

/// One fault as it happened: milliseconds since the start of the run.
#[derive(Clone, Debug, Serialize)]
pub struct Window {
    pub fault: Fault,
    pub nodes: Vec<u64>,
    /// What exactly was done (the partition's shape, the clock offset, the new node).
    pub detail: String,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// Injects faults from `faults` until `until`, then heals everything. The timeline.
pub async fn run(
    cluster: &mut Cluster,
    faults: &[Fault],
    seed: u64,
    started: Instant,
    until: Instant,
) -> anyhow::Result<Vec<Window>> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e656d65);
    let ms = || started.elapsed().as_millis() as u64;
    let mut timeline = Vec::new();
    // A quiet start, so the history shows the cluster before the first fault.
    tokio::time::sleep(Duration::from_millis(rng.gen_range(2000..4000))).await;
    while Instant::now() + Duration::from_secs(4) < until {
        let fault = *faults.choose(&mut rng).expect("at least one fault");
        let hold = Duration::from_millis(rng.gen_range(2000..6000));
        let start_ms = ms();
        let ids = cluster.ids();
        let minority = (ids.len() - 1) / 2;
        let mut nodes = Vec::new();
        let mut detail = String::new();
        match fault {
            Fault::Kill | Fault::KillLeader | Fault::KillMinority => {
                nodes = match fault {
                    Fault::Kill => vec![*ids.choose(&mut rng).expect("nodes")],
                    Fault::KillMinority => ids
                        .choose_multiple(&mut rng, minority.max(1))
                        .copied()
                        .collect(),
                    _ => random_leader(cluster, &mut rng).await,
                };
                for id in &nodes {
                    cluster.kill(*id);
                }
                eprintln!("[{:>6} ms] nemesis: kill -9 nodes {nodes:?}", ms());
                tokio::time::sleep(hold).await;
                for id in &nodes {
                    cluster.restart(*id)?;
                }
            }
            Fault::Pause => {
                nodes = vec![*ids.choose(&mut rng).expect("nodes")];
                cluster.pause(nodes[0]);
                eprintln!("[{:>6} ms] nemesis: pause node {}", ms(), nodes[0]);
                tokio::time::sleep(hold).await;
                cluster.resume(nodes[0]);
            }
            Fault::Rolling => {
                eprintln!("[{:>6} ms] nemesis: rolling restart", ms());
                for id in &ids {
                    cluster.kill(*id);
                    cluster.restart(*id)?;
                    nodes.push(*id);
                    // Each node back and the cluster healthy before the next goes down.
                    if let Err(e) = cluster.wait_healthy(Duration::from_secs(30)).await {
                        eprintln!("[{:>6} ms] nemesis: rolling restart goes on: {e}", ms());
                    }
                    cluster.refresh_listeners().await;
                }
            }
            Fault::Partition => {
                let leader = random_leader(cluster, &mut rng).await;
                let (shape, pairs) = partition(&ids, &leader, &mut rng);
                cluster.cut(&pairs)?;
                nodes = ids.clone();
                detail = shape;
                eprintln!("[{:>6} ms] nemesis: partition {detail}", ms());
                tokio::time::sleep(hold).await;
                cluster.net.heal()?;
            }
            Fault::Disk => {
                // A failed disk stays failed until the node restarts (its data read back
                // from the disk), so healing is a working disk and a restart.
                let id = *ids.choose(&mut rng).expect("nodes");
                let what = *["eio", "stall", "full"].choose(&mut rng).expect("faults");
                cluster.set_disk(id, what)?;
                nodes = vec![id];
                detail = format!("node {id} disk {what}");
                eprintln!("[{:>6} ms] nemesis: {detail}", ms());
                tokio::time::sleep(hold).await;
                cluster.set_disk(id, "")?;
                // A full disk recovers by itself once space returns.
                if what != "full" {
                    cluster.kill(id);
                    cluster.restart(id)?;
                }
            }
            Fault::Clock => {
                // A witness stamps no mail, so a jump of its clock would show nowhere the
                // checker looks: the clock nemesis skews data nodes.
                let data: Vec<u64> = ids
                    .iter()
                    .copied()
                    .filter(|i| Some(*i) != cluster.witness)
                    .collect();
                let id = *data.choose(&mut rng).expect("data nodes");
                let magnitude = if rng.gen_bool(0.5) {
                    rng.gen_range(5..120)
                } else {
                    rng.gen_range(600..3000)
                };
                let offset = if rng.gen_bool(0.5) {
                    magnitude
                } else {
                    -magnitude
                };
                cluster.set_clock(id, offset)?;
                nodes = vec![id];
                detail = format!("node {id} clock {offset:+} s");
                eprintln!("[{:>6} ms] nemesis: {detail}", ms());
                tokio::time::sleep(hold).await;
                cluster.set_clock(id, 0)?;
            }
            Fault::Membership => {
                let id = *ids.choose(&mut rng).expect("nodes");
                let slot = cluster.slot_of(id).expect("member slot");
                eprintln!("[{:>6} ms] nemesis: removing node {id}", ms());
                match cluster.remove(id).await {
                    Ok(()) => {
                        tokio::time::sleep(hold).await;
                        let new = cluster.rejoin(slot)?;
                        nodes = vec![id, new];
                        detail = format!("node {id} removed and wiped; node {new} joined");
                        eprintln!("[{:>6} ms] nemesis: {detail}", ms());
                    }
                    // Refused (no meta majority, say): nothing was changed.
                    Err(e) => {
                        nodes = vec![id];
                        detail = format!("removing node {id} failed: {e:#}");
                        eprintln!("[{:>6} ms] nemesis: {detail}", ms());
                    }
                }
            }
            Fault::Grow => {
                (nodes, detail) = grow(cluster, &mut rng, hold).await;
                eprintln!("[{:>6} ms] nemesis: {detail}", ms());
            }
            Fault::Upgrade => {
                (nodes, detail) = upgrade(cluster).await?;
                eprintln!("[{:>6} ms] nemesis: {detail}", ms());
            }
        }
        timeline.push(Window {
            fault,
            nodes,
            detail,
            start_ms,
            end_ms: ms(),
        });
        eprintln!("[{:>6} ms] nemesis: healed", ms());
        // Restarted nodes bind new client ports.
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.refresh_listeners().await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1000..3000))).await;
    }
    cluster.heal()?;
    Ok(timeline)
}

/// One `grow` fault: a join into a free slot when there is one, else a drain or a weight
/// change held for `hold` and undone. Refusals (no meta majority under another fault, the
/// last node not draining) are recorded, not errors: nothing was changed.
async fn grow(cluster: &mut Cluster, rng: &mut StdRng, hold: Duration) -> (Vec<u64>, String) {
    use service::api::{ClientReply, ClientRequest};
    if let Some(slot) = cluster.free_slot() {
        return match cluster.add_node(slot) {
            Ok(id) => (vec![id], format!("node {id} joined")),
            Err(e) => (Vec::new(), format!("joining a node failed: {e:#}")),
        };
    }
    let ids = cluster.ids();
    let id = *ids.choose(rng).expect("nodes");
    let weight = rng.gen_range(2..=3);
    let drain = rng.gen_bool(0.5);
    // The change, or with `false` its undoing.
    let change = |on: bool| match (drain, on) {
        (true, draining) => ClientRequest::NodeDrain { id, draining },
        (false, true) => ClientRequest::NodeWeight { id, weight },
        (false, false) => ClientRequest::NodeWeight { id, weight: 1 },
    };
    let what = if drain {
        format!("node {id} drained")
    } else {
        format!("node {id} weight {weight}")
    };
    match cluster.request(change(true)).await {
        Ok(ClientReply::Done) => {}
        other => return (vec![id], format!("{what}: refused ({other:?})")),
    }
    tokio::time::sleep(hold).await;
    // Undone through whichever node answers, retried: a later fault must not leave it set.
    for _ in 0..20 {
        if let Ok(ClientReply::Done) = cluster.request(change(false)).await {
            return (vec![id], format!("{what}, then undone"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    (vec![id], format!("{what}; undoing it failed"))
}

/// One `upgrade` step: the next node on the older release moves to the release under test
/// (and the cluster is let heal before the next fault); after the last one, upgrade-finish.
async fn upgrade(cluster: &mut Cluster) -> anyhow::Result<(Vec<u64>, String)> {
    use service::api::{ClientReply, ClientRequest};
    let Some(id) = cluster.upgrade_next()? else {
        return Ok((Vec::new(), "every node runs the new release".into()));
    };
    if let Err(e) = cluster.wait_healthy(Duration::from_secs(30)).await {
        eprintln!("nemesis: after upgrading node {id}: {e}");
    }
    let (done, all) = cluster.upgraded();
    let mut detail = format!("node {id} upgraded ({done} of {all})");
    if done == all {
        // Retried: a node just restarted may not answer its version yet.
        let mut last = String::new();
        for _ in 0..20 {
            match cluster.request(ClientRequest::UpgradeFinish).await {
                Ok(ClientReply::Versions(v)) => {
                    last = format!("upgrade-finish: cluster format {}", v.active_format);
                    break;
                }
                Ok(other) => last = format!("upgrade-finish answered {other:?}"),
                Err(e) => last = format!("upgrade-finish refused: {e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        detail = format!("{detail}; {last}");
    }
    Ok((vec![id], detail))
}

/// The leader of a random partition (a random node when none is known).
async fn random_leader(cluster: &Cluster, rng: &mut StdRng) -> Vec<u64> {
    let group = rng.gen_range(1..=cluster.partitions as u64);
    let ids = cluster.ids();
    match cluster.leader_of(group).await {
        Some(leader) if ids.contains(&leader) => vec![leader],
        _ => vec![*ids.choose(rng).expect("nodes")],
    }
}

/// A partition of `ids` drawn from `rng`: its shape and the node pairs that may not talk.
pub fn partition(ids: &[u64], leader: &[u64], rng: &mut StdRng) -> (String, Vec<(u64, u64)>) {
    let mut order = ids.to_vec();
    order.shuffle(rng);
    let n = order.len();
    let shapes: &[&str] = if n >= 4 {
        &["halves", "leader", "bridge", "ring"]
    } else {
        &["halves", "leader", "bridge"]
    };
    let across = |a: &[u64], b: &[u64]| {
        let mut out = Vec::new();
        for &x in a {
            for &y in b {
                out.push((x, y));
                out.push((y, x));
            }
        }
        out
    };
    match *shapes.choose(rng).expect("shapes") {
        "halves" => {
            let (small, big) = order.split_at(n / 2);
            (format!("halves {small:?} | {big:?}"), across(small, big))
        }
        "leader" => {
            let rest: Vec<u64> = order
                .iter()
                .copied()
                .filter(|i| !leader.contains(i))
                .collect();
            (
                format!("isolated leader {leader:?} | {rest:?}"),
                across(leader, &rest),
            )
        }
        "bridge" => {
            let bridge = order[0];
            let (a, b) = order[1..].split_at((n - 1) / 2);
            (
                format!("bridge {bridge} between {a:?} and {b:?}"),
                across(a, b),
            )
        }
        _ => {
            let mut pairs = Vec::new();
            for i in 0..n {
                for j in 0..n {
                    let d = (i + n - j) % n;
                    if i != j && d != 1 && d != n - 1 {
                        pairs.push((order[i], order[j]));
                    }
                }
            }
            (format!("ring {order:?}"), pairs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cut_what_their_shape_says() {
        // Goal: every shape leaves no majority-side pair cut and cuts both directions.
        let ids = [1, 2, 3, 4, 5];
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let (shape, pairs) = partition(&ids, &[3], &mut rng);
            let kind = shape.split_whitespace().next().unwrap().to_string();
            for &(a, b) in &pairs {
                assert!(pairs.contains(&(b, a)), "{shape}: {a}->{b} one way only");
                assert_ne!(a, b);
            }
            match kind.as_str() {
                "halves" => assert_eq!(pairs.len(), 2 * 2 * 3, "{shape}"),
                "isolated" => {
                    assert_eq!(pairs.len(), 2 * 4, "{shape}");
                    assert!(pairs.iter().all(|&(a, b)| a == 3 || b == 3));
                }
                "bridge" => {
                    let bridge: u64 = shape.split_whitespace().nth(1).unwrap().parse().unwrap();
                    assert!(pairs.iter().all(|&(a, b)| a != bridge && b != bridge));
                    assert_eq!(pairs.len(), 2 * 2 * 2, "{shape}");
                }
                "ring" => {
                    // Each node keeps exactly its two neighbours.
                    for id in ids {
                        let cut = pairs.iter().filter(|(a, _)| *a == id).count();
                        assert_eq!(cut, 2, "{shape}");
                    }
                }
                other => panic!("unknown shape {other}"),
            }
            seen.insert(kind);
        }
        assert_eq!(seen.len(), 4, "every shape drawn: {seen:?}");
    }
}
