//! The grid grows online (issue 23), shown with real node processes: nodes joined to a loaded
//! cluster take their share of replicas and leaders, a heavier node takes more, a drained node
//! ends empty and is removed, and every acknowledged message stays readable through every node.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// Each test runs a multi-process cluster; on two cores they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const PARTITIONS: u32 = 16;
const USERS: usize = 8;

/// Each node's (replicas, leaders) once the placement is settled: no move pending or running
/// and every node holding what the plan gives it.
fn wait_balanced(c: &Cluster, what: &str) -> BTreeMap<u64, (u64, u64)> {
    eventually(Duration::from_secs(240), what, || {
        let s = c.status_via(c.any())?;
        let p = &s["placement"];
        let nodes = p["nodes"].as_array()?;
        let settled = p["moves_pending"] == 0
            && p["moves_running"] == 0
            && nodes.iter().all(|n| {
                n["replicas"] == n["replicas_target"] && n["leaders"] == n["leaders_target"]
            });
        settled.then(|| {
            nodes
                .iter()
                .map(|n| {
                    (
                        n["id"].as_u64().unwrap(),
                        (
                            n["replicas"].as_u64().unwrap(),
                            n["leaders"].as_u64().unwrap(),
                        ),
                    )
                })
                .collect()
        })
    })
}

/// Delivers message `k` through `via` until acknowledged (the same delivery id each time, so
/// a retry of an unknown outcome stores it once); the number of attempts it took.
fn deliver_acked(via: &str, k: usize) -> usize {
    let user = format!("user{}@example.test", k % USERS);
    let body = format!("Subject: m{k}\r\n\r\nmessage {k}\r\n");
    let id = format!("grow-{k}");
    let mut attempts = 0;
    eventually(Duration::from_secs(60), "delivery acknowledged", || {
        attempts += 1;
        let args = [
            "deliver",
            "--data",
            via,
            "--delivery-id",
            &id,
            "--to",
            &user,
        ];
        run(&args, Some(body.as_bytes()))
            .status
            .success()
            .then_some(())
    });
    attempts
}

/// Every acknowledged message is in its user's mailbox exactly once, read through `via`.
fn check_all_readable(c: &Cluster, via: &str, acked: &[usize]) {
    for u in 0..USERS {
        let user = format!("user{u}@example.test");
        let bodies: Vec<String> = c.fetch(via, &user).into_iter().map(|(_, b)| b).collect();
        for k in acked.iter().filter(|k| *k % USERS == u) {
            let want = format!("message {k}\r\n");
            let copies = bodies.iter().filter(|b| b.ends_with(&want)).count();
            assert_eq!(
                copies, 1,
                "message {k} for {user} through {via}: {copies} copies"
            );
        }
    }
}

#[test]
fn joined_nodes_take_their_share_weights_count_and_a_drained_node_leaves_empty() {
    // Goal: issue 23's "how it is shown". (1) Two nodes joined to a 3-node cluster under a
    // delivery load end with their fair share of replicas (16 partitions x 3 / 5 = 9.6) and of
    // leaders (3.2), and nothing acknowledged is lost or doubled. (2) Weight 2 on node 1 gives
    // it twice the replicas of the others (16 against 8). (3) A drained node ends with no
    // replicas, `status` says it is safe to remove, and the cluster stays whole through its
    // removal. (4) The nodes that gave replicas away drop their copies of those groups.
    let _g = serial();
    // Copies of left groups are dropped 5 s after the move (60 s by default).
    let mut c = Cluster::start_with(3, PARTITIONS, 5000, USERS, "stale_replica_s = 5\n");
    let via1 = c.node(1).data().to_string();
    let mut acked: Vec<usize> = (0..16).collect();
    for k in &acked {
        deliver_acked(&via1, *k);
    }

    // A steady load through node 3 while nodes 4 and 5 join and the replicas move.
    let stop = Arc::new(AtomicBool::new(false));
    let during = Arc::new(Mutex::new(Vec::new()));
    let retried = Arc::new(Mutex::new(0usize));
    let via3 = c.node(3).data().to_string();
    let loader = {
        let (stop, during, retried) = (stop.clone(), during.clone(), retried.clone());
        std::thread::spawn(move || {
            let mut k = 1000;
            while !stop.load(Ordering::Relaxed) {
                let attempts = deliver_acked(&via3, k);
                *retried.lock().unwrap() += attempts - 1;
                during.lock().unwrap().push(k);
                k += 1;
            }
        })
    };
    c.join(4);
    c.join(5);
    let balanced = wait_balanced(&c, "nodes 4 and 5 take their share");
    stop.store(true, Ordering::Relaxed);
    loader.join().unwrap();
    println!(
        "after join: {balanced:?}; {} deliveries during the moves, {} retried",
        during.lock().unwrap().len(),
        retried.lock().unwrap()
    );
    assert_eq!(balanced.len(), 5);
    for (n, (replicas, leaders)) in &balanced {
        assert!((9..=10).contains(replicas), "node {n} holds {replicas}");
        assert!((3..=4).contains(leaders), "node {n} leads {leaders}");
    }
    assert_eq!(balanced.values().map(|b| b.0).sum::<u64>(), 48);
    acked.extend(during.lock().unwrap().iter().copied());
    for n in 1..=5 {
        let via = c.node(n).data().to_string();
        check_all_readable(&c, &via, &acked);
    }
    // Nodes 1-3 gave replicas away: their copies of those groups are dropped, freeing space,
    // while every remaining replica still agrees with the others of its group.
    let left = wait_copies_dropped(&c, &[1, 2, 3, 4, 5]);
    assert!(left >= 16, "replicas moved off nodes 1-3: {left}");
    // A partition without mail has the empty digest before its copy is dropped too (and a
    // drop is put off when the copy's membership changed meanwhile): wait for every drop.
    eventually(Duration::from_secs(60), "every left copy dropped", || {
        let dropped = metric_sum(&c, "mailgrid_stale_replicas_dropped_total");
        (dropped == left as u64).then_some(())
    });

    // Weights: node 1 counts twice.
    c.admin(&["node", "weight", "1", "2"]);
    let weighted = wait_balanced(&c, "node 1 takes a double share");
    println!("weights 2:1:1:1:1: {weighted:?}");
    assert_eq!(weighted[&1].0, 16);
    assert!(
        (5..=6).contains(&weighted[&1].1),
        "node 1 leads {:?}",
        weighted[&1]
    );
    for n in 2..=5 {
        assert_eq!(weighted[&n].0, 8, "node {n}");
        assert!(
            (2..=3).contains(&weighted[&n].1),
            "node {n} leads {:?}",
            weighted[&n]
        );
    }
    let bad = run(
        &["admin", "--data", c.any(), "node", "weight", "1", "0"],
        None,
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("between 1 and 1000"));

    // Drain node 2: it ends empty, and then it is removed and stopped.
    c.admin(&["node", "drain", "2"]);
    let drained = wait_balanced(&c, "node 2 drained");
    println!("node 2 drained: {drained:?}");
    assert_eq!(drained[&2], (0, 0));
    let text = ok(&["status", "--data", c.any()], None);
    assert!(
        text.contains("drained: holds nothing, safe to stop or remove"),
        "{text}"
    );
    c.admin(&["node", "remove", "2"]);
    c.node(2).kill9();
    let via4 = c.node(4).data().to_string();
    for k in 2000..2008 {
        deliver_acked(&via4, k);
        acked.push(k);
    }
    for n in [1, 3, 4, 5] {
        let via = c.node(n).data().to_string();
        check_all_readable(&c, &via, &acked);
    }
    // Node 1 took replicas back after dropping them (weight 2): those were rebuilt from the
    // group, and agree with the other replicas.
    wait_copies_dropped(&c, &[1, 3, 4, 5]);
}

/// Waits until, in every partition group, the voters' replicas agree and every other node of
/// `nodes` holds an empty copy (it dropped what it had of a group it left); the number of such
/// empty copies on nodes that once held a replica.
fn wait_copies_dropped(c: &Cluster, nodes: &[u64]) -> usize {
    eventually(
        Duration::from_secs(90),
        "left groups' copies dropped",
        || {
            let s = c.status_via(c.any())?;
            let mut dropped = 0;
            for group in 1..=PARTITIONS as u64 {
                let g = s["groups"]
                    .as_array()?
                    .iter()
                    .find(|g| g["group"] == group)?;
                let voters: Vec<u64> = g["voters"]
                    .as_array()?
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .collect();
                let digests = c.digests(c.any(), group);
                let digest = |n: u64| {
                    digests
                        .get(&n.to_string())
                        .and_then(|d| d.as_str().map(str::to_string))
                };
                let first = digest(voters[0])?;
                if voters
                    .iter()
                    .any(|v| digest(*v).as_deref() != Some(first.as_str()))
                {
                    return None;
                }
                for n in nodes.iter().filter(|n| !voters.contains(n)) {
                    if digest(*n)? != EMPTY_DIGEST {
                        return None;
                    }
                    // Nodes 4 and 5 started empty; nodes 1-3 held every group.
                    dropped += usize::from(*n <= 3);
                }
            }
            Some(dropped)
        },
    )
}

#[test]
fn a_node_killed_mid_move_leaves_every_group_its_replicas_and_the_move_resumes() {
    // Goal: issue 23's safety under faults. Node 4 joins and is killed -9 while replicas are
    // moving to it: every group keeps a leader and at least three voters (a move adds before
    // it removes), deliveries go on, and once node 4 is back the rebalance finishes with its
    // share (16 x 3 / 4 = 12) and every message readable through it. Then node 5 dies
    // mid-move for good: removing it abandons its moves and leaves three voters everywhere.
    let _g = serial();
    let mut c = Cluster::start(3, PARTITIONS, 5000, USERS);
    let via1 = c.node(1).data().to_string();
    let mut acked: Vec<usize> = (0..8).collect();
    for k in &acked {
        deliver_acked(&via1, *k);
    }
    c.join(4);
    eventually(
        Duration::from_secs(60),
        "a move to node 4 under way",
        || {
            let s = c.status_via(&via1)?;
            let p = &s["placement"];
            let node4 = p["nodes"].as_array()?.iter().find(|n| n["id"] == 4)?;
            let moving = node4["replicas"].as_u64()? > 0
                && node4["replicas"] != node4["replicas_target"]
                && p["moves_running"].as_u64()? > 0;
            moving.then_some(())
        },
    );
    c.node(4).kill9();
    for k in 100..108 {
        deliver_acked(&via1, k);
        acked.push(k);
    }
    let s = c.wait_healthy(3);
    for g in s["groups"].as_array().unwrap() {
        let voters = g["voters"].as_array().unwrap().len();
        assert!(voters >= 3, "group {} has {voters} voters: {g}", g["group"]);
    }
    c.restart(4);
    let balanced = wait_balanced(&c, "the move resumes once node 4 is back");
    println!("after node 4 came back: {balanced:?}");
    assert_eq!(balanced[&4].0, 12);
    let via4 = c.node(4).data().to_string();
    check_all_readable(&c, &via4, &acked);

    // A move abandoned: node 5 joins, dies mid-move and never comes back; `node remove 5`
    // takes it out of the plan and of every group it had reached, and the partitions it was
    // to hold are back on three voters of nodes 1-4.
    c.join(5);
    eventually(
        Duration::from_secs(60),
        "a move to node 5 under way",
        || {
            let s = c.status_via(&via1)?;
            let node5 = s["placement"]["nodes"]
                .as_array()?
                .iter()
                .find(|n| n["id"] == 5)?;
            (node5["replicas"].as_u64()? > 0 && node5["replicas"] != node5["replicas_target"])
                .then_some(())
        },
    );
    c.node(5).kill9();
    c.admin(&["node", "remove", "5"]);
    let balanced = wait_balanced(&c, "the move to node 5 abandoned");
    println!("after node 5 was removed: {balanced:?}");
    assert!(!balanced.contains_key(&5));
    assert_eq!(balanced.values().map(|b| b.0).sum::<u64>(), 48);
    let s = c.wait_healthy(3);
    for g in s["groups"].as_array().unwrap() {
        let voters = g["voters"].as_array().unwrap();
        // Partitions have three voters; the meta group has every node (up to five).
        let want = if g["group"] == 0 { 4 } else { 3 };
        assert_eq!(voters.len(), want, "group {}: {g}", g["group"]);
        assert!(!voters.contains(&5.into()), "group {}: {g}", g["group"]);
        assert!(
            !g["learners"].as_array().unwrap().contains(&5.into()),
            "{g}"
        );
    }
    for k in 200..208 {
        deliver_acked(&via4, k);
        acked.push(k);
    }
    for n in 1..=4 {
        let via = c.node(n).data().to_string();
        check_all_readable(&c, &via, &acked);
    }
}
