//! Placement: where each partition's replicas and leader should be, given the nodes, their
//! capacity weights, which are draining, and where the replicas are now. Pure (no I/O, no
//! clock, no randomness): the meta leader's rebalancer computes the plan every round and
//! starts its moves a few at a time, and `status` on any node computes the same plan to show
//! what is still to move.
//!
//! The plan is a quota per node and a minimal set of replica moves toward it:
//! - each node's quota is its weight's share of all replicas, water-filled under the cap of one
//!   replica per partition, rounded to whole replicas by largest remainder (ties go to the node
//!   holding more now, so rounding never moves a replica by itself);
//! - a partition keeps every replica on a node that may hold it; it loses only replicas of
//!   removed or draining nodes and, while some node is over its quota and another under, one
//!   replica of an over-quota node to an under-quota one. Each such move brings both nodes
//!   one closer to their quota, so the number of moves is the least that reaches the quotas
//!   (the sum of the excesses), and applying part of a plan and planning again gives the rest
//!   of it (`a_partly_applied_plan_plans_the_rest`);
//! - leaders get quotas the same way (capped by the replicas a node holds) and each partition
//!   keeps its preferred leader (the first replica) unless that node leads more than its share.
//!
//! Rendezvous hashing (the order before this module) moves as few replicas as possible when a
//! node comes or goes, but balances only on average: with 64 partitions and 5 nodes a node
//! held between 30 and 46 replicas. Quotas make "within one replica of the fair share" exact
//! while keeping the least movement; rendezvous scores remain the tie-breaker, so choices are
//! stable and spread.

use std::collections::{BTreeMap, BTreeSet};

use storage::meta::{NodeSettings, PartitionRecord};

use crate::types::NodeId;

/// The target placement for every partition of `records` (same order), preferred leader
/// first, in a cluster whose `witnesses` (a subset of `nodes`) hold no mailbox data.
/// `replicas` is the cluster's replication factor.
///
/// Data nodes are planned by [`plan_data`]; a partition left with fewer data replicas than the
/// replication factor (fewer data nodes than that) is topped up with witnesses, after its data
/// replicas, so a witness is never a preferred leader. Once enough data nodes exist, witnesses
/// drop out of the partitions, and the group leaders remove them after the new data replica
/// is a voter. Draining witnesses are not used.
pub fn plan(
    records: &[PartitionRecord],
    nodes: &BTreeMap<NodeId, NodeSettings>,
    witnesses: &BTreeSet<NodeId>,
    replicas: usize,
) -> Vec<PartitionRecord> {
    let data: BTreeMap<NodeId, NodeSettings> = nodes
        .iter()
        .filter(|(id, _)| !witnesses.contains(id))
        .map(|(id, s)| (*id, s.clone()))
        .collect();
    if data.is_empty() {
        return records.to_vec();
    }
    let stripped: Vec<PartitionRecord> = records
        .iter()
        .map(|r| PartitionRecord {
            id: r.id,
            replicas: r
                .replicas
                .iter()
                .copied()
                .filter(|n| !witnesses.contains(n))
                .collect(),
        })
        .collect();
    let mut out = plan_data(&stripped, &data, replicas);
    let usable: Vec<NodeId> = witnesses
        .iter()
        .copied()
        .filter(|w| nodes.get(w).is_some_and(|s| !s.draining))
        .collect();
    for (record, planned) in records.iter().zip(out.iter_mut()) {
        // Witnesses a partition has now first, so topping up never swaps one for another.
        let mut order: Vec<NodeId> = usable.clone();
        order.sort_by_key(|w| {
            (
                !record.replicas.contains(w),
                std::cmp::Reverse(score(record.id, *w)),
            )
        });
        for w in order {
            if planned.replicas.len() >= replicas.max(1) {
                break;
            }
            planned.replicas.push(w);
        }
    }
    out
}

/// [`plan`] for a cluster of data nodes only (`nodes` holds no witness).
pub fn plan_data(
    records: &[PartitionRecord],
    nodes: &BTreeMap<NodeId, NodeSettings>,
    replicas: usize,
) -> Vec<PartitionRecord> {
    if nodes.is_empty() || records.is_empty() {
        return records.to_vec();
    }
    let eligible: BTreeSet<NodeId> = nodes
        .iter()
        .filter(|(_, s)| !s.draining)
        .map(|(id, _)| *id)
        .collect();
    let per_partition = replicas.clamp(1, nodes.len());
    let on_eligible = per_partition.min(eligible.len());
    let mut sets: Vec<Vec<NodeId>> = records.iter().map(|r| current(r, nodes)).collect();

    let weights: Vec<(NodeId, u64)> = eligible
        .iter()
        .map(|id| (*id, u64::from(nodes[id].weight.max(1))))
        .collect();
    let mut count = counts(&sets, &eligible);
    let caps: BTreeMap<NodeId, usize> = eligible.iter().map(|n| (*n, records.len())).collect();
    let quota = shares(&weights, records.len() * on_eligible, &caps, &count);

    // Draining and surplus members leave; eligible nodes with the most room fill the gaps.
    for (p, set) in sets.iter_mut().enumerate() {
        let partition = records[p].id;
        let mut keep: Vec<NodeId> = set
            .iter()
            .copied()
            .filter(|n| eligible.contains(n))
            .collect();
        while keep.len() > on_eligible {
            let n = keep.pop().expect("longer than on_eligible");
            *count.get_mut(&n).expect("eligible") -= 1;
        }
        while keep.len() < on_eligible {
            let Some(n) = most_room(partition, &eligible, &keep, &count, &quota) else {
                break;
            };
            keep.push(n);
            *count.get_mut(&n).expect("eligible") += 1;
        }
        // Draining nodes hold replicas only where no eligible node can: members first.
        let mut draining: Vec<NodeId> = nodes
            .keys()
            .copied()
            .filter(|n| !eligible.contains(n) && !set.contains(n))
            .collect();
        draining.sort_by_key(|n| std::cmp::Reverse(score(partition, *n)));
        for n in set.iter().chain(&draining) {
            if keep.len() >= per_partition {
                break;
            }
            if !keep.contains(n) {
                keep.push(*n);
            }
        }
        *set = keep;
    }
    balance(records, &mut sets, &mut count, &quota);
    let leaders = lead(records, &sets, &eligible, &weights);
    records
        .iter()
        .zip(sets)
        .zip(leaders)
        .map(|((r, mut set), leader)| {
            if let Some(i) = set.iter().position(|n| Some(*n) == leader) {
                let l = set.remove(i);
                set.insert(0, l);
            }
            PartitionRecord {
                id: r.id,
                replicas: set,
            }
        })
        .collect()
}

/// Fair shares (exact, before rounding) of `total` replicas over the eligible nodes: what
/// `status` shows as each node's target.
pub fn quotas(
    records: &[PartitionRecord],
    nodes: &BTreeMap<NodeId, NodeSettings>,
    replicas: usize,
) -> BTreeMap<NodeId, usize> {
    let eligible: BTreeSet<NodeId> = nodes
        .iter()
        .filter(|(_, s)| !s.draining)
        .map(|(id, _)| *id)
        .collect();
    let per_partition = replicas.clamp(1, nodes.len().max(1));
    let on_eligible = per_partition.min(eligible.len());
    let weights: Vec<(NodeId, u64)> = eligible
        .iter()
        .map(|id| (*id, u64::from(nodes[id].weight.max(1))))
        .collect();
    let sets: Vec<Vec<NodeId>> = records.iter().map(|r| current(r, nodes)).collect();
    let count = counts(&sets, &eligible);
    let caps: BTreeMap<NodeId, usize> = eligible.iter().map(|n| (*n, records.len())).collect();
    let mut out = shares(&weights, records.len() * on_eligible, &caps, &count);
    for id in nodes.keys() {
        out.entry(*id).or_insert(0);
    }
    out
}

/// A partition's replicas now, with removed nodes dropped and a replaced node's replica given
/// to its replacement (`node replace`).
fn current(record: &PartitionRecord, nodes: &BTreeMap<NodeId, NodeSettings>) -> Vec<NodeId> {
    let mut set = Vec::new();
    for n in &record.replicas {
        let Some(settings) = nodes.get(n) else {
            continue;
        };
        let n = match settings.replace_by {
            Some(new)
                if settings.draining
                    && nodes.get(&new).is_some_and(|s| !s.draining)
                    && !record.replicas.contains(&new) =>
            {
                new
            }
            _ => *n,
        };
        if !set.contains(&n) {
            set.push(n);
        }
    }
    set
}

fn counts(sets: &[Vec<NodeId>], eligible: &BTreeSet<NodeId>) -> BTreeMap<NodeId, usize> {
    let mut count: BTreeMap<NodeId, usize> = eligible.iter().map(|n| (*n, 0)).collect();
    for set in sets {
        for n in set {
            if let Some(c) = count.get_mut(n) {
                *c += 1;
            }
        }
    }
    count
}

/// Whole-number shares of `total` by weight, each at most its cap: nodes whose exact share
/// passes their cap get the cap, the rest is shared again among the others (water-filling);
/// the remainders left by rounding down go by largest fraction, then to the node holding
/// more now (`held`), then by lower id.
fn shares(
    weights: &[(NodeId, u64)],
    total: usize,
    caps: &BTreeMap<NodeId, usize>,
    held: &BTreeMap<NodeId, usize>,
) -> BTreeMap<NodeId, usize> {
    let mut out: BTreeMap<NodeId, usize> = BTreeMap::new();
    let mut open: Vec<(NodeId, u64)> = weights.to_vec();
    let mut remaining = total;
    loop {
        let sum: u64 = open.iter().map(|(_, w)| w).sum();
        if sum == 0 {
            break;
        }
        let full: Vec<(NodeId, u64)> = open
            .iter()
            .copied()
            .filter(|(n, w)| remaining as u128 * *w as u128 >= caps[n] as u128 * sum as u128)
            .collect();
        if full.is_empty() {
            let mut floors = 0;
            let mut fractions = Vec::new();
            for (n, w) in &open {
                let exact = remaining as u128 * *w as u128;
                let floor = (exact / sum as u128) as usize;
                floors += floor;
                out.insert(*n, floor);
                let fraction = exact % sum as u128;
                fractions.push((fraction, held.get(n).copied().unwrap_or(0), *n));
            }
            fractions.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
            for (_, _, n) in fractions.into_iter().take(remaining - floors) {
                *out.get_mut(&n).expect("inserted above") += 1;
            }
            break;
        }
        for (n, _) in &full {
            out.insert(*n, caps[n]);
            remaining -= caps[n].min(remaining);
        }
        open.retain(|(n, _)| !full.iter().any(|(f, _)| f == n));
        if open.is_empty() {
            break;
        }
    }
    out
}

/// The eligible node outside `set` with the most room under its quota; ties go to the
/// partition's rendezvous order.
fn most_room(
    partition: u32,
    eligible: &BTreeSet<NodeId>,
    set: &[NodeId],
    count: &BTreeMap<NodeId, usize>,
    quota: &BTreeMap<NodeId, usize>,
) -> Option<NodeId> {
    eligible
        .iter()
        .copied()
        .filter(|n| !set.contains(n))
        .max_by_key(|n| (room(*n, count, quota), score(partition, *n)))
}

fn room(n: NodeId, count: &BTreeMap<NodeId, usize>, quota: &BTreeMap<NodeId, usize>) -> i64 {
    quota.get(&n).copied().unwrap_or(0) as i64 - count.get(&n).copied().unwrap_or(0) as i64
}

/// Moves one replica at a time from a node over its quota to one under it, in the partition
/// the receiving node ranks highest, until no such move is left.
fn balance(
    records: &[PartitionRecord],
    sets: &mut [Vec<NodeId>],
    count: &mut BTreeMap<NodeId, usize>,
    quota: &BTreeMap<NodeId, usize>,
) {
    let bound = sets.iter().map(Vec::len).sum::<usize>() + 1;
    for _ in 0..bound {
        let mut over: Vec<NodeId> = count
            .keys()
            .copied()
            .filter(|n| room(*n, count, quota) < 0)
            .collect();
        let mut under: Vec<NodeId> = count
            .keys()
            .copied()
            .filter(|n| room(*n, count, quota) > 0)
            .collect();
        over.sort_by_key(|n| (room(*n, count, quota), *n));
        under.sort_by_key(|n| (-room(*n, count, quota), *n));
        let step = over.iter().find_map(|a| {
            under.iter().find_map(|b| {
                (0..sets.len())
                    .filter(|p| sets[*p].contains(a) && !sets[*p].contains(b))
                    .max_by_key(|p| (score(records[*p].id, *b), std::cmp::Reverse(*p)))
                    .map(|p| (p, *a, *b))
            })
        });
        let Some((p, a, b)) = step else { return };
        let i = sets[p].iter().position(|n| *n == a).expect("a is in p");
        sets[p][i] = b;
        *count.get_mut(&a).expect("counted") -= 1;
        *count.get_mut(&b).expect("counted") += 1;
    }
}

/// Each partition's preferred leader: leader quotas by weight (capped by the replicas a node
/// holds); a partition keeps its current preferred leader while that node is within its
/// quota.
fn lead(
    records: &[PartitionRecord],
    sets: &[Vec<NodeId>],
    eligible: &BTreeSet<NodeId>,
    weights: &[(NodeId, u64)],
) -> Vec<Option<NodeId>> {
    let held = counts(sets, eligible);
    let leadable = sets
        .iter()
        .filter(|s| s.iter().any(|n| eligible.contains(n)))
        .count();
    let quota = shares(weights, leadable, &held, &held);
    let mut led: BTreeMap<NodeId, usize> = eligible.iter().map(|n| (*n, 0)).collect();
    let mut leaders: Vec<Option<NodeId>> = vec![None; sets.len()];
    for (p, record) in records.iter().enumerate() {
        let Some(first) = record.replicas.first() else {
            continue;
        };
        if sets[p].contains(first) && eligible.contains(first) && room(*first, &led, &quota) > 0 {
            leaders[p] = Some(*first);
            *led.get_mut(first).expect("eligible") += 1;
        }
    }
    for (p, set) in sets.iter().enumerate() {
        if leaders[p].is_some() {
            continue;
        }
        let choice = set
            .iter()
            .copied()
            .filter(|n| eligible.contains(n))
            .max_by_key(|n| (room(*n, &led, &quota), score(records[p].id, *n)))
            .or_else(|| set.first().copied());
        if let Some(n) = choice {
            if let Some(c) = led.get_mut(&n) {
                *c += 1;
            }
        }
        leaders[p] = choice;
    }
    // Leadership of an over-quota node goes to an under-quota one, through a chain of
    // hand-overs when no partition it leads has an under-quota replica: A leads p1 where C
    // holds a replica, C leads p2 where B does; p1 goes to C and p2 to B. The shortest chain
    // is taken (breadth first), and every step lowers the total excess by one.
    for _ in 0..=sets.len() {
        let Some(path) = leader_chain(records, sets, eligible, &leaders, &led, &quota) else {
            break;
        };
        for (p, to) in path {
            let from = leaders[p].expect("chains follow led partitions");
            *led.get_mut(&from).expect("eligible") -= 1;
            *led.get_mut(&to).expect("eligible") += 1;
            leaders[p] = Some(to);
        }
    }
    leaders
}

/// The shortest chain of leadership hand-overs from a node over its leader quota to one under
/// it: (partition, new leader) steps, each partition led by the previous step's receiver.
fn leader_chain(
    records: &[PartitionRecord],
    sets: &[Vec<NodeId>],
    eligible: &BTreeSet<NodeId>,
    leaders: &[Option<NodeId>],
    led: &BTreeMap<NodeId, usize>,
    quota: &BTreeMap<NodeId, usize>,
) -> Option<Vec<(usize, NodeId)>> {
    let mut came_from: BTreeMap<NodeId, Option<(usize, NodeId)>> = BTreeMap::new();
    let mut frontier: std::collections::VecDeque<NodeId> = std::collections::VecDeque::new();
    for n in eligible.iter().filter(|n| room(**n, led, quota) < 0) {
        came_from.insert(*n, None);
        frontier.push_back(*n);
    }
    while let Some(x) = frontier.pop_front() {
        for p in (0..sets.len()).filter(|p| leaders[*p] == Some(x)) {
            let mut next: Vec<NodeId> = sets[p]
                .iter()
                .copied()
                .filter(|y| eligible.contains(y) && !came_from.contains_key(y))
                .collect();
            next.sort_by_key(|y| std::cmp::Reverse(score(records[p].id, *y)));
            for y in next {
                came_from.insert(y, Some((p, x)));
                if room(y, led, quota) > 0 {
                    let mut path = Vec::new();
                    let mut at = y;
                    while let Some(Some((p, prev))) = came_from.get(&at).copied() {
                        path.push((p, at));
                        at = prev;
                    }
                    path.reverse();
                    return Some(path);
                }
                frontier.push_back(y);
            }
        }
    }
    None
}

/// The rendezvous score of a node for a partition (higher is preferred).
fn score(partition: u32, node: NodeId) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&partition.to_be_bytes());
    h.update(&node.to_be_bytes());
    *h.finalize().as_bytes()
}

/// How far `plan` is from `records`: replicas to add (each one move) and preferred leaders
/// to change.
pub fn distance(records: &[PartitionRecord], plan: &[PartitionRecord]) -> (usize, usize) {
    let mut moves = 0;
    let mut leaders = 0;
    for (r, t) in records.iter().zip(plan) {
        moves += t
            .replicas
            .iter()
            .filter(|n| !r.replicas.contains(n))
            .count();
        if r.replicas.first() != t.replicas.first() {
            leaders += 1;
        }
    }
    (moves, leaders)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nodes(weights: &[(NodeId, u32)]) -> BTreeMap<NodeId, NodeSettings> {
        weights
            .iter()
            .map(|(id, w)| {
                (
                    *id,
                    NodeSettings {
                        weight: *w,
                        ..NodeSettings::default()
                    },
                )
            })
            .collect()
    }

    fn records(partitions: u32, replicas: &[NodeId]) -> Vec<PartitionRecord> {
        (0..partitions)
            .map(|id| PartitionRecord {
                id,
                replicas: replicas.to_vec(),
            })
            .collect()
    }

    fn held(plan: &[PartitionRecord]) -> BTreeMap<NodeId, usize> {
        let mut out = BTreeMap::new();
        for r in plan {
            for n in &r.replicas {
                *out.entry(*n).or_default() += 1;
            }
        }
        out
    }

    fn leaders(plan: &[PartitionRecord]) -> BTreeMap<NodeId, usize> {
        let mut out = BTreeMap::new();
        for r in plan {
            *out.entry(r.replicas[0]).or_default() += 1;
        }
        out
    }

    #[test]
    fn two_nodes_joining_three_take_their_share_with_the_fewest_moves() {
        // Goal: issue 23's scenario. 64 partitions on nodes 1-3 (RF 3); nodes 4 and 5 join.
        // Every node ends within one replica of 64*3/5 = 38.4, leaders within one of 12.8,
        // and only the new nodes' replicas are moved: 76, the least possible (the two
        // replicas of rounding stay on old nodes).
        let before = records(64, &[1, 2, 3]);
        let all = nodes(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]);
        let after = plan_data(&before, &all, 3);
        for (n, c) in held(&after) {
            assert!((38..=39).contains(&c), "node {n} holds {c}");
        }
        for (n, c) in leaders(&after) {
            assert!((12..=13).contains(&c), "node {n} leads {c}");
        }
        let (moves, _) = distance(&before, &after);
        let new: usize = held(&after)
            .iter()
            .filter(|(n, _)| **n >= 4)
            .map(|(_, c)| c)
            .sum();
        assert_eq!(moves, new);
        assert_eq!(moves, 76);
        for r in &after {
            assert_eq!(r.replicas.len(), 3);
            let distinct: BTreeSet<_> = r.replicas.iter().collect();
            assert_eq!(distinct.len(), 3);
        }
        assert_eq!(plan_data(&after, &all, 3), after, "a plan is its own plan");
    }

    #[test]
    fn a_draining_node_ends_with_nothing_and_its_replicas_spread() {
        // Goal: drain. Node 2 of 4 (RF 3) gives up every replica and leadership; the others
        // share its replicas evenly and no partition drops below three replicas.
        let mut all = nodes(&[(1, 1), (2, 1), (3, 1), (4, 1)]);
        let balanced = plan_data(&records(16, &[1, 2, 3]), &all, 3);
        all.get_mut(&2).unwrap().draining = true;
        let drained = plan_data(&balanced, &all, 3);
        assert!(drained.iter().all(|r| !r.replicas.contains(&2)));
        assert!(drained.iter().all(|r| r.replicas.len() == 3));
        assert_eq!(
            held(&drained).values().copied().collect::<Vec<_>>(),
            [16, 16, 16]
        );
        // Undrained, it takes its share back.
        all.get_mut(&2).unwrap().draining = false;
        let back = plan_data(&drained, &all, 3);
        assert_eq!(held(&back)[&2], 12);
    }

    #[test]
    fn a_drain_with_no_node_to_take_over_keeps_the_replication_factor() {
        // Goal: with three nodes and RF 3, a draining node keeps its replicas (the plan never
        // drops below the replication factor), and gives up leadership.
        let mut all = nodes(&[(1, 1), (2, 1), (3, 1)]);
        all.get_mut(&3).unwrap().draining = true;
        let p = plan_data(&records(8, &[3, 1, 2]), &all, 3);
        assert!(p.iter().all(|r| r.replicas.len() == 3));
        assert!(p.iter().all(|r| r.replicas[0] != 3));
    }

    #[test]
    fn replace_gives_each_replica_to_the_named_node() {
        // Goal: `node replace 2 5`: node 5 takes exactly node 2's replicas, nothing else moves.
        let mut all = nodes(&[(1, 1), (2, 1), (3, 1), (4, 1)]);
        let balanced = plan_data(&records(16, &[1, 2, 3]), &all, 3);
        all.insert(5, NodeSettings::default());
        all.get_mut(&2).unwrap().draining = true;
        all.get_mut(&2).unwrap().replace_by = Some(5);
        let replaced = plan_data(&balanced, &all, 3);
        for (b, r) in balanced.iter().zip(&replaced) {
            let want: BTreeSet<NodeId> = b
                .replicas
                .iter()
                .map(|n| if *n == 2 { 5 } else { *n })
                .collect();
            let got: BTreeSet<NodeId> = r.replicas.iter().copied().collect();
            assert_eq!(got, want, "partition {}", r.id);
        }
    }

    #[test]
    fn weights_give_a_heavy_node_twice_the_replicas() {
        // Goal: weights 2:1:1 at RF 2 over 64 partitions: 64, 32, 32 replicas; at RF 1: 32,
        // 16, 16, and leaders likewise.
        let all = nodes(&[(1, 2), (2, 1), (3, 1)]);
        let p = plan_data(&records(64, &[2, 3]), &all, 2);
        assert_eq!(held(&p).values().copied().collect::<Vec<_>>(), [64, 32, 32]);
        let p = plan_data(&records(64, &[2]), &all, 1);
        assert_eq!(held(&p).values().copied().collect::<Vec<_>>(), [32, 16, 16]);
        assert_eq!(
            leaders(&p).values().copied().collect::<Vec<_>>(),
            [32, 16, 16]
        );
        // At RF 3 on three nodes every node holds every partition whatever the weights.
        let p = plan_data(&records(64, &[1, 2, 3]), &all, 3);
        assert!(held(&p).values().all(|c| *c == 64));
        // Five nodes, one of weight 2, 16 partitions at RF 3: 16 and 8 each; leaders 5 or 6
        // against 2 or 3 (16 x 2/6 and 16 x 1/6), whatever the start.
        let five = nodes(&[(1, 2), (2, 1), (3, 1), (4, 1), (5, 1)]);
        let even = plan_data(
            &records(16, &[1, 2, 3]),
            &nodes(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]),
            3,
        );
        let p = plan_data(&even, &five, 3);
        assert_eq!(
            held(&p).values().copied().collect::<Vec<_>>(),
            [16, 8, 8, 8, 8]
        );
        let l = leaders(&p);
        assert!((5..=6).contains(&l[&1]), "{l:?}");
        for n in 2..=5 {
            assert!((2..=3).contains(&l[&n]), "{l:?}");
        }
    }

    #[test]
    fn a_witness_fills_in_until_enough_data_nodes_exist() {
        // Goal: two data nodes and a witness at RF 3: every partition gets both data nodes and
        // the witness, last (never a preferred leader), leaders split between the data nodes;
        // when a third data node joins the witness leaves every partition, with one move each.
        let witnesses = BTreeSet::from([9]);
        let two = nodes(&[(1, 1), (2, 1), (9, 1)]);
        let p = plan(&records(64, &[1]), &two, &witnesses, 3);
        for r in &p {
            assert_eq!(r.replicas.len(), 3, "{r:?}");
            assert_eq!(r.replicas[2], 9, "{r:?}");
        }
        assert_eq!(leaders(&p), BTreeMap::from([(1, 32), (2, 32)]));
        assert_eq!(plan(&p, &two, &witnesses, 3), p, "a plan is its own plan");
        let three = nodes(&[(1, 1), (2, 1), (3, 1), (9, 1)]);
        let grown = plan(&p, &three, &witnesses, 3);
        assert_eq!(held(&grown), BTreeMap::from([(1, 64), (2, 64), (3, 64)]));
        assert_eq!(distance(&p, &grown).0, 64);
        // One data node left (the other removed): the witness stays beside it.
        let one = nodes(&[(1, 1), (9, 1)]);
        let p = plan(&p, &one, &witnesses, 3);
        assert!(p.iter().all(|r| r.replicas == [1, 9]), "{p:?}");
        // A cluster of witnesses only cannot be planned: the records stay as they are.
        let none = nodes(&[(9, 1)]);
        assert_eq!(plan(&p, &none, &witnesses, 3), p);
    }

    #[test]
    fn removed_nodes_are_replaced_and_surviving_replicas_stay() {
        // Goal: the old fill behaviour: a removed node's replicas go to the survivors, and a
        // partition keeps every replica that is still on a member.
        let before = records(8, &[1, 2, 3]);
        let p = plan_data(&before, &nodes(&[(1, 1), (2, 1), (4, 1)]), 3);
        for r in &p {
            let set: BTreeSet<NodeId> = r.replicas.iter().copied().collect();
            assert_eq!(set, BTreeSet::from([1, 2, 4]));
        }
        let grown = plan_data(&records(8, &[1]), &nodes(&[(1, 1), (2, 1)]), 3);
        assert!(grown.iter().all(|r| r.replicas.len() == 2));
    }

    #[test]
    fn a_partly_applied_plan_plans_the_rest() {
        // Goal: the rebalancer applies a plan a few moves at a time; planning again from any
        // point on the way leads to the same balance without moving anything back.
        let before = records(32, &[1, 2, 3]);
        let all = nodes(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]);
        let target = plan_data(&before, &all, 3);
        let (total, _) = distance(&before, &target);
        let mut now = before.clone();
        let mut moved = 0;
        for _ in 0..100 {
            let next = plan_data(&now, &all, 3);
            let Some(i) = (0..now.len()).find(|i| {
                let a: BTreeSet<_> = now[*i].replicas.iter().collect();
                let b: BTreeSet<_> = next[*i].replicas.iter().collect();
                a != b
            }) else {
                break;
            };
            moved += distance(&now[i..=i], &next[i..=i]).0;
            now[i] = next[i].clone();
        }
        assert_eq!(moved, total);
        for c in held(&now).values() {
            assert!((19..=20).contains(c), "{c}");
        }
    }

    proptest! {
        #[test]
        fn any_start_plans_to_within_one_of_the_fair_share(
            node_count in 1usize..8,
            replicas in 1usize..4,
            partitions in 1u32..48,
            seeds in proptest::collection::vec(any::<u64>(), 48),
            draining in proptest::collection::vec(any::<bool>(), 8),
        ) {
            // Goal: from any placement (random, possibly naming removed nodes), with equal
            // weights and any nodes draining, the plan puts min(RF, nodes) distinct replicas in
            // every partition, nothing on a draining node that an eligible node could hold,
            // every eligible node within one of the fair share, and is its own plan.
            let mut all = nodes(&(1..=node_count as u64).map(|n| (n, 1)).collect::<Vec<_>>());
            for (i, s) in all.values_mut().enumerate() {
                s.draining = draining[i] && i > 0;
            }
            let before: Vec<PartitionRecord> = (0..partitions)
                .map(|id| PartitionRecord {
                    id,
                    replicas: (0..3)
                        .map(|k| seeds[id as usize].rotate_left(k * 8) % (node_count as u64 + 2) + 1)
                        .collect(),
                })
                .collect();
            let after = plan_data(&before, &all, replicas);
            let per = replicas.min(node_count);
            let eligible: Vec<NodeId> =
                all.iter().filter(|(_, s)| !s.draining).map(|(n, _)| *n).collect();
            for r in &after {
                let set: BTreeSet<_> = r.replicas.iter().collect();
                prop_assert_eq!(set.len(), r.replicas.len());
                prop_assert_eq!(r.replicas.len(), per);
                prop_assert!(r.replicas.iter().all(|n| all.contains_key(n)));
                let on_draining = r.replicas.iter().filter(|n| all[n].draining).count();
                prop_assert_eq!(on_draining, per.saturating_sub(eligible.len()));
            }
            let fair = partitions as f64 * per.min(eligible.len()) as f64 / eligible.len() as f64;
            let h = held(&after);
            for n in &eligible {
                let c = h.get(n).copied().unwrap_or(0) as f64;
                prop_assert!((c - fair).abs() < 1.0, "node {} holds {} of fair {}", n, c, fair);
            }
            let l = leaders(&after);
            let fair_leaders = partitions as f64 / eligible.len() as f64;
            for n in &eligible {
                let c = l.get(n).copied().unwrap_or(0) as f64;
                prop_assert!((c - fair_leaders).abs() < 1.0, "node {} leads {} of fair {}", n, c, fair_leaders);
            }
            prop_assert_eq!(plan_data(&after, &all, replicas), after);
        }
    }
}
