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
}

impl Fault {
    pub const ALL: [(&'static str, Fault); 5] = [
        ("kill", Fault::Kill),
        ("kill-leader", Fault::KillLeader),
        ("kill-minority", Fault::KillMinority),
        ("pause", Fault::Pause),
        ("rolling", Fault::Rolling),
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
            if matches!(name, "partition" | "clock" | "membership") {
                return Err(format!(
                    "the {name} nemesis is not available in this runner yet; known: {}",
                    known()
                ));
            }
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
    let ids: Vec<u64> = cluster.nodes.iter().map(|n| n.id).collect();
    let minority = (ids.len() - 1) / 2;
    let mut timeline = Vec::new();
    // A quiet start, so the history shows the cluster before the first fault.
    tokio::time::sleep(Duration::from_millis(rng.gen_range(2000..4000))).await;
    while Instant::now() + Duration::from_secs(4) < until {
        let fault = *faults.choose(&mut rng).expect("at least one fault");
        let hold = Duration::from_millis(rng.gen_range(2000..6000));
        let start_ms = ms();
        let mut nodes = Vec::new();
        match fault {
            Fault::Kill | Fault::KillLeader | Fault::KillMinority => {
                nodes = match fault {
                    Fault::Kill => vec![*ids.choose(&mut rng).expect("nodes")],
                    Fault::KillMinority => ids
                        .choose_multiple(&mut rng, minority.max(1))
                        .copied()
                        .collect(),
                    _ => {
                        let group = rng.gen_range(1..=cluster.partitions as u64);
                        match cluster.leader_of(group).await {
                            Some(leader) => vec![leader],
                            None => vec![*ids.choose(&mut rng).expect("nodes")],
                        }
                    }
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
        }
        timeline.push(Window {
            fault,
            nodes,
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
