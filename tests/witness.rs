//! Two servers are enough (issue 24), shown with real node processes: two data nodes and a
//! witness survive kill -9 of any one of the three with nothing acknowledged lost, including
//! the case where only the witness holds the newest entries; the witness holds no mail and
//! purges its log once both data nodes have it; a third data node takes it out of the
//! partitions.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use common::*;

/// Each test runs a multi-process cluster; on two cores they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const PARTITIONS: u32 = 8;
const USERS: usize = 32;
/// The witness logs when it hands a group on (info level).
const ENV: [(&str, &str); 1] = [("MAILGRID_LOG", "warn,raft::host=info")];

/// One user in each partition, so a round of deliveries writes to every partition group.
fn user_per_partition() -> Vec<String> {
    let mut by_partition: BTreeMap<u32, String> = BTreeMap::new();
    for i in 0..USERS {
        let user = format!("user{i}@example.test");
        by_partition
            .entry(service::router::partition_of(&user, PARTITIONS))
            .or_insert(user);
    }
    assert_eq!(
        by_partition.len(),
        PARTITIONS as usize,
        "the test users cover every partition"
    );
    by_partition.into_values().collect()
}

/// Delivers one message named `round` to every user through `via`, retrying each (same
/// delivery id) until acknowledged; the (user, subject) pairs acknowledged.
fn round(c: &Cluster, via: &str, users: &[String], round: &str) -> Vec<(String, String)> {
    users
        .iter()
        .map(|user| {
            let subject = format!("{round}-{user}");
            let body = format!("Subject: {subject}\r\n\r\nround {round}\r\n");
            let mut last = String::new();
            eventually(
                Duration::from_secs(60),
                "delivery acknowledged",
                || match c.deliver(via, &[user], body.as_bytes(), &subject) {
                    Ok(_) => Some(()),
                    Err(e) => {
                        if e != last {
                            eprintln!("delivery of {subject} via {via}: {}", e.trim());
                            last = e;
                        }
                        None
                    }
                },
            );
            (user.clone(), subject)
        })
        .collect()
}

/// Every acknowledged message is in its user's mailbox exactly once, read through `via`.
fn check_readable(c: &Cluster, via: &str, acked: &[(String, String)]) {
    for (user, subject) in acked {
        let found = c
            .fetch(via, user)
            .iter()
            .filter(|(_, body)| body.contains(&format!("Subject: {subject}\r\n")))
            .count();
        assert_eq!(found, 1, "{subject} in {user}'s mailbox via {via}");
    }
}

#[test]
fn two_data_nodes_and_a_witness_survive_the_loss_of_any_one() {
    // Goal: kill -9 of either data node or of the witness, or a data node hung by SIGSTOP,
    // leaves every partition writable through the survivors and loses nothing acknowledged; when a data node comes back
    // behind (it was down while the other wrote with the witness) and the up-to-date data
    // node dies, the witness hands it the entries only the witness still has. The witness
    // holds no mail in any partition.
    let _serial = serial();
    let mut c = Cluster::start_witness(PARTITIONS, 1000, USERS, &ENV);
    let users = user_per_partition();
    let (d1, d2, w) = (
        c.node(1).data().to_string(),
        c.node(2).data().to_string(),
        c.node(3).data().to_string(),
    );
    let mut acked = round(&c, &d1, &users, "start");

    // Either data node dies: the other takes every partition.
    for (dead, alive) in [(1, &d2), (2, &d1)] {
        c.node(dead).kill9();
        acked.extend(round(&c, alive, &users, &format!("without-{dead}")));
        // `status` says the cluster runs on one copy of the mail, and names the witness.
        let survivor = 3 - dead;
        let status = eventually(Duration::from_secs(30), "status shows the loss", || {
            let s = c.status_via(alive)?;
            let lines: Vec<String> = serde_json::from_value(s["degraded"].clone()).ok()?;
            let single = format!("one data replica left (node {survivor}); a second failure");
            lines.iter().any(|l| l.contains(&single)).then_some(s)
        });
        let roles: Vec<(u64, String)> = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["id"].as_u64().unwrap(),
                    n["role"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(
            roles,
            [
                (1, "data".into()),
                (2, "data".into()),
                (3, "witness".into())
            ]
        );
        check_readable(&c, alive, &acked);
        c.restart(dead);
        c.wait_converged(PARTITIONS as u64, &[1, 2]);
    }

    // A hung data node (SIGSTOP: the process lives but does nothing) loses its partitions
    // to the other; resumed, it catches up.
    signal(c.node(1).pid(), "STOP");
    acked.extend(round(&c, &d2, &users, "node-1-hung"));
    signal(c.node(1).pid(), "CONT");
    c.wait_converged(PARTITIONS as u64, &[1, 2]);

    // The witness dies: both data nodes go on.
    c.node(3).kill9();
    acked.extend(round(&c, &d1, &users, "no-witness-via-1"));
    acked.extend(round(&c, &d2, &users, "no-witness-via-2"));
    c.restart(3);
    c.wait_healthy(3);

    // Node 2 is down while node 1 writes with the witness; then node 1 dies and node 2
    // returns: the newest entries are on the witness alone.
    c.node(2).kill9();
    let only_on_1_and_witness = round(&c, &d1, &users, "behind");
    acked.extend(only_on_1_and_witness.clone());
    c.node(1).kill9();
    c.restart(2);
    check_readable(&c, &d2, &only_on_1_and_witness);
    acked.extend(round(&c, &d2, &users, "after-hand-over"));
    assert!(
        c.log(3).contains("witness hands the group to a data voter"),
        "the witness led to hand node 2 the entries it lacked"
    );
    c.restart(1);
    c.wait_converged(PARTITIONS as u64, &[1, 2]);
    check_readable(&c, &d1, &acked);
    check_readable(&c, &w, &acked);

    // The witness holds no mail: its partition replicas are empty, the data nodes' are not.
    for group in 1..=PARTITIONS as u64 {
        let digests = c.digests(&d1, group);
        assert_eq!(
            digests["3"], EMPTY_DIGEST,
            "witness replica of group {group}"
        );
        assert_eq!(digests["1"], digests["2"], "group {group}");
        assert_ne!(digests["1"], EMPTY_DIGEST, "data replica of group {group}");
    }
    assert_eq!(metric_of(&c, 3, "mailgrid_witness"), 1);
    assert_eq!(metric_of(&c, 1, "mailgrid_witness"), 0);
}

#[test]
fn the_witness_purges_what_both_data_nodes_hold_and_steps_out_for_a_third() {
    // Goal: the witness keeps log entries only until both data nodes have them (its log
    // shrinks after a burst of writes), and when a third data node joins, every partition
    // moves onto the three data nodes and the witness stays a voter of the meta group only.
    let _serial = serial();
    let mut c = Cluster::start_witness(PARTITIONS, 1000, USERS, &ENV);
    let users = user_per_partition();
    let d1 = c.node(1).data().to_string();
    // A burst into one partition: well over a purge batch (64 entries) in its group. The
    // data nodes keep their logs (snapshots every 1000 entries); the witness purges what
    // both data nodes hold.
    let mut acked = Vec::new();
    for k in 0..100 {
        let subject = format!("burst-{k}");
        let body = format!("Subject: {subject}\r\n\r\nburst\r\n");
        eventually(Duration::from_secs(60), "delivery acknowledged", || {
            c.deliver(&d1, &[&users[0]], body.as_bytes(), &subject).ok()
        });
        acked.push((users[0].clone(), subject));
    }
    eventually(
        Duration::from_secs(60),
        "the witness purges its log",
        || {
            let witness = metric_of(&c, 3, "mailgrid_raft_log_entries");
            let data = metric_of(&c, 1, "mailgrid_raft_log_entries");
            (witness + 64 <= data).then_some(())
        },
    );

    c.join(4);
    eventually(
        Duration::from_secs(240),
        "partitions on the three data nodes",
        || {
            let s = c.status_via(&d1)?;
            let groups = s["groups"].as_array()?;
            let on_data = groups.iter().filter(|g| g["partition"].is_u64()).all(|g| {
                let voters: Vec<u64> = g["voters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect();
                voters == [1, 2, 4] && g["learners"].as_array().is_some_and(|l| l.is_empty())
            });
            let meta_keeps_witness = groups.iter().find(|g| g["partition"].is_null())?["voters"]
                .as_array()?
                .contains(&serde_json::json!(3));
            (on_data && meta_keeps_witness).then_some(())
        },
    );
    acked.extend(round(&c, &d1, &users, "after-grow"));
    let d4 = c.node(4).data().to_string();
    check_readable(&c, &d4, &acked);
}

/// The greeting of node `id`'s SMTP listener.
fn smtp_greeting(c: &Cluster, id: u64) -> String {
    use std::io::BufRead;
    let addr = c.listener(id, "smtp");
    let stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .unwrap();
    line
}

#[test]
fn a_data_node_whose_disk_fails_stalls_or_fills_gives_way_to_the_other() {
    // Goal: the HA pair's disk faults. A data node whose syncs fail with EIO, or stop
    // returning, stops leading and voting at once (the other data node and the witness take
    // every partition), refuses mail with a temporary error, reports the failure in `status`
    // and `/metrics`, acknowledges nothing it could not make durable, and comes back as a
    // voter only when restarted with a working disk. A full disk refuses new mail with
    // 452 4.3.1 and recovers by itself.
    let _serial = serial();
    eprintln!(
        "disk faults are made with MAILGRID_DISK_FAULT_FILE, at the node's own fdatasync: a \
         device-mapper error or delay target would need a spare block device and root on the \
         test machine"
    );
    let mut c = Cluster::start_witness(PARTITIONS, 1000, USERS, &ENV);
    let users = user_per_partition();
    let [f1, f2] = with_disk_faults(&mut c, [1, 2]);
    c.wait_healthy(3);
    let (d1, d2) = (c.node(1).data().to_string(), c.node(2).data().to_string());
    let mut acked = round(&c, &d1, &users, "before");

    for (bad, good, f, what, why) in [
        (1, &d2, &f1, "eio", "a sync failed"),
        (2, &d1, &f2, "stall", "disk stalled"),
    ] {
        std::fs::write(f, what).unwrap();
        acked.extend(round(&c, good, &users, &format!("{what}-on-{bad}")));
        // Every group is led elsewhere, and the node says why.
        eventually(
            Duration::from_secs(60),
            "the failed node leads nothing",
            || {
                let s = c.status_via(good)?;
                let leads = s["groups"]
                    .as_array()?
                    .iter()
                    .any(|g| g["leader"] == bad || g["healthy"] != true);
                let node = s["nodes"].as_array()?.iter().find(|n| n["id"] == bad)?;
                let said = node["problems"]
                    .as_array()?
                    .iter()
                    .any(|p| p.as_str().is_some_and(|p| p.contains(why)));
                (!leads && said).then_some(())
            },
        );
        assert_eq!(metric_of(&c, bad, "mailgrid_disk_failed"), 1);
        let greeting = smtp_greeting(&c, bad);
        assert!(greeting.starts_with("421 4.3.0"), "{greeting}");
        acked.extend(round(&c, good, &users, &format!("after-{what}-on-{bad}")));
        // A working disk again is not enough: the node stays out until it restarts.
        std::fs::write(f, "").unwrap();
        assert_eq!(metric_of(&c, bad, "mailgrid_disk_failed"), 1);
        c.restart_env(bad, &[("MAILGRID_DISK_FAULT_FILE", path(f))]);
        c.wait_converged(PARTITIONS as u64, &[1, 2]);
        assert_eq!(metric_of(&c, bad, "mailgrid_disk_failed"), 0);
    }
    // A full disk: new mail is refused with 452 4.3.1 at MAIL FROM, `status` and `/metrics`
    // say so, and the node takes mail again by itself once space returns.
    std::fs::write(&f1, "full").unwrap();
    eventually(Duration::from_secs(30), "the full disk is reported", || {
        let s = c.status_via(&d2)?;
        let node = s["nodes"].as_array()?.iter().find(|n| n["id"] == 1)?;
        let said = node["problems"]
            .as_array()?
            .iter()
            .any(|p| p.as_str().is_some_and(|p| p.contains("disk almost full")));
        said.then_some(())
    });
    assert_eq!(metric_of(&c, 1, "mailgrid_disk_full"), 1);
    assert!(mail_from(&c, 1).starts_with("452 4.3.1"));
    std::fs::write(&f1, "").unwrap();
    eventually(Duration::from_secs(30), "mail taken again", || {
        mail_from(&c, 1).starts_with("250").then_some(())
    });
    assert_eq!(metric_of(&c, 1, "mailgrid_disk_full"), 0);
    acked.extend(round(&c, &d1, &users, "after-full"));
    check_readable(&c, &d1, &acked);
    check_readable(&c, &d2, &acked);
}

#[test]
fn a_full_leader_hands_its_groups_to_a_voter_with_room_and_a_full_partition_answers_452() {
    // Goal: a full disk on the partition leaders, not on the node the client talks to. Three
    // data nodes, two replicas per partition; nodes 1 and 3 fill up. Every group with a
    // replica on node 2 is handed to node 2 and takes mail through node 2's SMTP; a partition
    // held only by nodes 1 and 3 answers 452 4.3.1 at the end of DATA through node 2 (whose
    // own disk has room), not a generic failure after the write timeout; it takes mail again
    // once node 1 has room.
    let _serial = serial();
    let mut c = Cluster::start_replicas(3, 2, PARTITIONS, 1000, USERS, &ENV);
    let users = user_per_partition();
    let [f1, f3] = with_disk_faults(&mut c, [1, 3]);
    c.wait_healthy(2);
    let d2 = c.node(2).data().to_string();
    let status = c.status_via(&d2).unwrap();
    let voters_of = |user: &str| -> Vec<u64> {
        let group = service::router::partition_of(user, PARTITIONS) as u64 + 1;
        let g = status["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["group"] == group);
        let voters = g.unwrap()["voters"].as_array().unwrap();
        voters.iter().map(|v| v.as_u64().unwrap()).collect()
    };
    let (roomy, full): (Vec<String>, Vec<String>) = users
        .iter()
        .cloned()
        .partition(|u| voters_of(u).contains(&2));
    assert!(
        !roomy.is_empty() && !full.is_empty(),
        "both kinds of partition: {status}"
    );

    std::fs::write(&f1, "full").unwrap();
    std::fs::write(&f3, "full").unwrap();
    eventually(
        Duration::from_secs(60),
        "node 2 leads every group it holds",
        || {
            let s = c.status_via(&d2)?;
            let handed = s["groups"]
                .as_array()?
                .iter()
                .filter(|g| g["group"] != 0)
                .all(|g| {
                    let has_2 = g["voters"]
                        .as_array()
                        .is_some_and(|v| v.contains(&2.into()));
                    !has_2 || g["leader"] == 2
                });
            handed.then_some(())
        },
    );
    let mut acked = Vec::new();
    for user in &roomy {
        let subject = format!("roomy-{user}");
        let answer = smtp_send(&c, 2, user, &subject);
        assert!(answer.starts_with("250"), "{user}: {answer}");
        acked.push((user.clone(), subject));
    }
    for user in &full {
        let answer = smtp_send(&c, 2, user, &format!("refused-{user}"));
        assert!(answer.starts_with("452 4.3.1"), "{user}: {answer}");
    }
    // Node 1 has room again: the full partitions' leaders (1 or 3) end up on node 1.
    std::fs::write(&f1, "").unwrap();
    for user in &full {
        let subject = format!("after-{user}");
        eventually(Duration::from_secs(60), "mail taken again", || {
            smtp_send(&c, 2, user, &subject)
                .starts_with("250")
                .then_some(())
        });
        acked.push((user.clone(), subject));
    }
    std::fs::write(&f3, "").unwrap();
    check_readable(&c, &d2, &acked);
    let d1 = c.node(1).data().to_string();
    check_readable(&c, &d1, &acked);
}

/// Restarts nodes `ids` with a disk fault file each (empty: a working disk); the files.
fn with_disk_faults<const N: usize>(c: &mut Cluster, ids: [u64; N]) -> [std::path::PathBuf; N] {
    ids.map(|id| {
        let f = c.root.path().join(format!("disk-fault-{id}"));
        std::fs::write(&f, "").unwrap();
        c.restart_env(id, &[("MAILGRID_DISK_FAULT_FILE", path(&f))]);
        f
    })
}

/// Sends one message to `to` through node `id`'s MX; the reply to the end of DATA (or to the
/// command that refused it).
fn smtp_send(c: &Cluster, id: u64, to: &str, subject: &str) -> String {
    let data = format!("Subject: {subject}\r\n\r\nbody\r\n.\r\n");
    smtp_dialogue(
        c,
        id,
        &[
            "EHLO test.example\r\n".to_string(),
            "MAIL FROM:<someone@remote.example>\r\n".to_string(),
            format!("RCPT TO:<{to}>\r\n"),
            "DATA\r\n".to_string(),
            data,
        ],
    )
}

/// The answer of node `id`'s MX to `MAIL FROM` after `EHLO`.
fn mail_from(c: &Cluster, id: u64) -> String {
    smtp_dialogue(
        c,
        id,
        &[
            "EHLO test.example\r\n".to_string(),
            "MAIL FROM:<someone@remote.example>\r\n".to_string(),
        ],
    )
}

/// Sends `steps` to node `id`'s MX after its greeting, each after the previous reply, and
/// stops at the first reply that is not 2xx or 3xx; the last reply read.
fn smtp_dialogue(c: &Cluster, id: u64, steps: &[String]) -> String {
    use std::io::{BufRead, Write};
    let stream = std::net::TcpStream::connect(c.listener(id, "smtp")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = std::io::BufReader::new(stream);
    let mut read_reply = || {
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return line;
            }
        }
    };
    let mut answer = read_reply();
    for step in steps {
        writer.write_all(step.as_bytes()).unwrap();
        answer = read_reply();
        if !(answer.starts_with('2') || answer.starts_with('3')) {
            break;
        }
    }
    let _ = writer.write_all(b"QUIT\r\n");
    answer
}
