//! The replicated core's promises, shown with real node processes on loopback.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::*;

/// Each test runs a multi-process cluster; on two cores they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const PARTITIONS: u32 = 4;

#[test]
fn acknowledged_delivery_survives_leader_kill_and_is_read_everywhere() {
    // Goal (a): a delivery acknowledged by the cluster survives kill -9 of its partition's
    // leader and is readable through every surviving node.
    let _g = serial();
    let mut c = Cluster::start(3, PARTITIONS, 5000, 2);
    let user = "user0@example.test";
    c.deliver(c.any(), &[user], b"Subject: a\r\n\r\nsurvives\r\n", "a-1")
        .expect("delivery acknowledged");
    let leader = c.leader_of_user(user, PARTITIONS);
    c.node(leader).kill9();
    for n in [1u64, 2, 3].into_iter().filter(|n| *n != leader) {
        let via = c.node(n).data().to_string();
        let msgs = eventually(Duration::from_secs(30), "read after leader kill", || {
            let out = run(&["admin", "--data", &via, "fetch", user], None);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        });
        assert_eq!(msgs.lines().count(), 1, "node {n} sees {msgs}");
        assert!(msgs.contains("survives"));
    }
    // The dead leader's store, read offline, has the delivery applied in the user's group;
    // a running node's store is refused (its database is locked).
    let group = (service::router::partition_of(user, PARTITIONS) + 1).to_string();
    let dead = c.node(leader).data().to_string();
    let out = ok(&["inspect", "--data", &dead, "--group", &group], None);
    assert!(
        out.starts_with(&format!("group {group}: applied Some(")),
        "{out}"
    );
    assert!(out.contains("digest "), "{out}");
    let alive = c.any().to_string();
    let refused = run(&["inspect", "--data", &alive, "--group", &group], None);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("still running"), "{err}");
}

#[test]
fn writes_resume_after_a_node_dies_and_it_catches_up() {
    // Goal (b): after kill -9 of one of three nodes every partition accepts writes again, and
    // the node catches up when restarted (its replicas match the others'). Also issue 22's
    // upgrade-finish: refused, naming the node, while a node does not answer; once every node
    // speaks the newest format, it raises the cluster's format, which `status` shows.
    let _g = serial();
    let mut c = Cluster::start(3, PARTITIONS, 5000, 8);
    let version = c.admin(&["cluster", "version"]);
    assert!(version.starts_with("cluster format 1\n"), "{version}");
    let release = format!("mailgrid {}", env!("CARGO_PKG_VERSION"));
    assert_eq!(version.matches(&release).count(), 3, "{version}");
    assert!(version.contains("upgrade-finish"), "{version}");
    c.node(1).kill9();
    let refused = run(
        &["admin", "--data", c.any(), "cluster", "upgrade-finish"],
        None,
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("node 1 does not answer"), "{stderr}");
    assert_eq!(c.status_via(c.any()).unwrap()["format"], 1);
    let via = c.node(2).data().to_string();
    for i in 0..8 {
        let user = format!("user{i}@example.test");
        eventually(Duration::from_secs(30), "write after node death", || {
            c.deliver(
                &via,
                &[&user],
                format!("Subject: b{i}\r\n\r\nx\r\n").as_bytes(),
                &format!("b-{i}"),
            )
            .ok()
        });
    }
    c.restart(1);
    c.wait_healthy(3);
    let raised = eventually(Duration::from_secs(30), "upgrade-finish taken", || {
        let out = run(
            &["admin", "--data", c.any(), "cluster", "upgrade-finish"],
            None,
        );
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    assert!(raised.starts_with("cluster format 2\n"), "{raised}");
    c.wait_converged(PARTITIONS as u64, &[1, 2, 3]);
    let n1 = c.node(1).data().to_string();
    let status = c.status_via(&n1).unwrap();
    assert_eq!(status["format"], 2, "{status}");
    for n in status["nodes"].as_array().unwrap() {
        assert_eq!(n["version"], env!("CARGO_PKG_VERSION"), "{n}");
    }
    for i in 0..8 {
        assert_eq!(c.fetch(&n1, &format!("user{i}@example.test")).len(), 1);
    }
}

#[test]
fn a_group_whose_raft_core_fails_is_restarted_and_catches_up() {
    // Goal: "groups are supervised": when one group's core stops on a storage error (here a
    // failpoint in its state machine's apply, on one follower), the node restarts that group,
    // it re-applies what it missed, and its replica matches the others' again. The other
    // groups and nodes never notice.
    let _g = serial();
    let mut c = Cluster::start(3, PARTITIONS, 5000, 4);
    let user = "user0@example.test";
    let group = service::router::partition_of(user, PARTITIONS) as u64 + 1;
    let leader = c.leader_of_user(user, PARTITIONS);
    let victim = if leader == 1 { 2 } else { 1 };
    c.restart_env(
        victim,
        &[("MAILGRID_FAILPOINTS", &format!("apply@{group}:1"))],
    );
    c.wait_healthy(3);
    let via = c.node(leader).data().to_string();
    for i in 0..5 {
        eventually(Duration::from_secs(30), "delivery", || {
            c.deliver(
                &via,
                &[user],
                format!("Subject: s{i}\r\n\r\nx\r\n").as_bytes(),
                &format!("s-{i}"),
            )
            .ok()
        });
    }
    let log = c.root.path().join(format!("node{victim}.log"));
    eventually(Duration::from_secs(30), "the group's restart", || {
        let text = std::fs::read_to_string(&log).ok()?;
        (text.contains("failpoint fired") && text.contains("raft group stopped; restarting it"))
            .then_some(())
    });
    c.wait_converged(PARTITIONS as u64, &[1, 2, 3]);
    let victim_data = c.node(victim).data().to_string();
    assert_eq!(c.fetch(&victim_data, user).len(), 5);
}

#[test]
fn a_node_cut_off_from_the_majority_acknowledges_nothing() {
    // Goal (c): with both peers frozen, a node cannot commit, so it acknowledges no delivery.
    let _g = serial();
    let mut c = Cluster::start(3, PARTITIONS, 5000, 4);
    let (p2, p3) = (c.node(2).pid(), c.node(3).pid());
    signal(p2, "STOP");
    signal(p3, "STOP");
    let via = c.node(1).data().to_string();
    let mut refused = 0;
    for i in 0..4 {
        let user = format!("user{i}@example.test");
        let r = c.deliver(
            &via,
            &[&user],
            b"Subject: c\r\n\r\nisolated\r\n",
            &format!("c-{i}"),
        );
        assert!(
            r.is_err(),
            "an isolated node acknowledged a delivery: {r:?}"
        );
        refused += 1;
    }
    assert_eq!(refused, 4);
    signal(p2, "CONT");
    signal(p3, "CONT");
    c.wait_healthy(3);
}

#[test]
fn a_leader_cut_off_from_its_peers_stops_serving_reads_when_its_lease_ends() {
    // Reads on a leader are served from its quorum-ack lease without a network round. The
    // lease must end: a leader whose peers stopped answering has to refuse reads (a new
    // leader may be taking writes it cannot see), not serve them from old state forever.
    let _g = serial();
    let mut c = Cluster::start(3, PARTITIONS, 5000, 4);
    let user = "user0@example.test";
    let leader = c.leader_of_user(user, PARTITIONS);
    let via = c.node(leader).data().to_string();
    c.deliver(&via, &[user], b"Subject: l\r\n\r\nlease\r\n", "lease-1")
        .unwrap();
    assert_eq!(c.fetch(&via, user).len(), 1);
    let peers: Vec<i32> = (1..=3)
        .filter(|n| *n != leader)
        .map(|n| c.node(n).pid())
        .collect();
    for p in &peers {
        signal(*p, "STOP");
    }
    let read = |via: &str| run(&["admin", "--data", via, "fetch", user], None);
    eventually(
        Duration::from_secs(30),
        "a cut-off leader refusing reads",
        || (!read(&via).status.success()).then_some(()),
    );
    // And it stays refused: nothing renews the lease without a majority.
    let again = read(&via);
    assert!(
        !again.status.success(),
        "a leader without a majority served a read after its lease: {}",
        String::from_utf8_lossy(&again.stdout)
    );
    for p in &peers {
        signal(*p, "CONT");
    }
    c.wait_healthy(3);
    assert_eq!(c.fetch(&via, user).len(), 1);
}

#[test]
fn a_wiped_node_rejoins_under_a_new_id_and_catches_up_by_snapshot() {
    // Goal (d): a node whose disk was wiped rejoins with a new id, receives replicas of every
    // partition by snapshot (the others purged their logs) and holds the same data.
    let _g = serial();
    let mut c = Cluster::start(3, PARTITIONS, 20, 4);
    for i in 0..40 {
        let user = format!("user{}@example.test", i % 4);
        c.deliver(
            c.any(),
            &[&user],
            format!("Subject: d{i}\r\n\r\nbody {i}\r\n").as_bytes(),
            &format!("d-{i}"),
        )
        .unwrap();
    }
    let wiped = c.node(3).dir.clone();
    c.node(3).kill9();
    std::fs::remove_dir_all(&wiped).unwrap();
    c.admin(&["node", "remove", "3"]);
    c.join(4);
    eventually(Duration::from_secs(90), "node 4 holds every group", || {
        let s = c.status_via(c.any())?;
        let all = s["groups"].as_array()?.iter().all(|g| {
            let v: Vec<u64> = g["voters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            g["healthy"] == true && v.contains(&4) && !v.contains(&3)
        });
        all.then_some(())
    });
    c.wait_converged(PARTITIONS as u64, &[1, 2, 4]);
    let snapshots = c.node(4).dir.join("snapshots");
    let installed = std::fs::read_dir(&snapshots)
        .unwrap()
        .flatten()
        .filter(|g| {
            std::fs::read_dir(g.path())
                .map(|d| d.count() > 0)
                .unwrap_or(false)
        })
        .count();
    assert!(installed > 0, "node 4 caught up without any snapshot");
    let n4 = c.node(4).data().to_string();
    for i in 0..4 {
        assert_eq!(c.fetch(&n4, &format!("user{i}@example.test")).len(), 10);
    }
}

#[test]
fn a_leadership_transfer_that_never_arrives_does_not_stop_the_group() {
    // Goal: a leader hands a partition to its preferred replica and the replica never takes
    // over (it died as the request left, or the request was lost). openraft cannot cancel a
    // transfer: the old leader refuses writes and membership changes for the rest of its term.
    // CI caught this as a group left on a removed node for good. Here every transfer request
    // is dropped, so node 1, which leads every group after `init`, strands each group it hands
    // to another node; mail to the users of that group must still be accepted.
    let _g = serial();
    let lost: Vec<String> = (1..=PARTITIONS)
        .map(|g| format!("transfer-lost@{g}:1000"))
        .collect();
    let users = 16;
    let mut c = Cluster::start_env(
        3,
        PARTITIONS,
        5000,
        users,
        &[("MAILGRID_FAILPOINTS", &lost.join(","))],
    );
    // Leadership is balanced once the replicas have caught up: wait for a dropped transfer.
    let stranded: u64 = eventually(
        Duration::from_secs(60),
        "a leadership transfer dropped",
        || {
            (1..=3).find_map(|n| {
                let log = c.log(n);
                let line = log.lines().find(|l| l.contains("failpoint fired"))?;
                let group = line.split("group=").nth(1)?;
                group
                    .trim_matches(|ch: char| !ch.is_ascii_digit())
                    .parse()
                    .ok()
            })
        },
    );
    let user = (0..users)
        .map(|i| format!("user{i}@example.test"))
        .find(|u| service::router::partition_of(u, PARTITIONS) as u64 + 1 == stranded)
        .expect("some user in every partition");
    eventually(
        Duration::from_secs(60),
        &format!("a delivery to {user} (group {stranded}) acknowledged"),
        || {
            c.deliver(c.any(), &[&user], b"Subject: t\r\n\r\nx\r\n", "t-1")
                .ok()
        },
    );
    let n2 = c.node(2).data().to_string();
    assert_eq!(c.fetch(&n2, &user).len(), 1);
}

#[test]
fn kill_during_a_stream_of_deliveries_loses_and_doubles_nothing() {
    // Goal (e): kill -9 of a node in the middle of acknowledged deliveries: after restart every
    // acknowledged message is present exactly once (retries reuse the delivery id).
    let _g = serial();
    let mut c = Cluster::start(3, PARTITIONS, 5000, 4);
    let mut acked = Vec::new();
    for i in 0..30 {
        if i == 10 {
            let victim = c.leader_of_user("user0@example.test", PARTITIONS);
            c.node(victim).kill9();
        }
        if i == 20 {
            let dead: Vec<u64> = c
                .nodes
                .iter()
                .filter(|n| n.child.is_none())
                .map(|n| n.id)
                .collect();
            for d in dead {
                c.restart(d);
            }
        }
        let user = format!("user{}@example.test", i % 4);
        let body = format!("Subject: e{i}\r\n\r\nmsg-{i}\r\n");
        // The sender retries until acknowledged, through any live node, with the same id.
        eventually(Duration::from_secs(30), "delivery acknowledged", || {
            let via = c.any().to_string();
            c.deliver(&via, &[&user], body.as_bytes(), &format!("e-{i}"))
                .ok()
        });
        acked.push((user, format!("msg-{i}")));
    }
    c.wait_healthy(3);
    c.wait_converged(PARTITIONS as u64, &[1, 2, 3]);
    for u in 0..4 {
        let user = format!("user{u}@example.test");
        let msgs = c.fetch(c.any(), &user);
        for (_, tag) in acked.iter().filter(|(to, _)| *to == user) {
            let n = msgs
                .iter()
                .filter(|(_, b)| b.contains(&format!("{tag}\r\n")))
                .count();
            assert_eq!(n, 1, "{tag} present {n} times in {user}");
        }
        let uids: Vec<u64> = msgs.iter().map(|(u, _)| *u).collect();
        assert!(
            uids.windows(2).all(|w| w[0] < w[1]),
            "UIDs not increasing: {uids:?}"
        );
        assert_eq!(
            msgs.len(),
            acked.iter().filter(|(to, _)| *to == user).count()
        );
    }
}

#[test]
fn a_peer_with_a_certificate_from_another_ca_is_refused() {
    // Goal (f): credentials of another cluster get nothing from this one, and a wrong join
    // token is refused with a clear message.
    let _g = serial();
    let c = Cluster::start(1, PARTITIONS, 5000, 0);
    let other = tempfile::tempdir().unwrap();
    let other_dir = other.path().join("n");
    let port = free_port();
    ok(
        &[
            "init",
            "--data",
            path(&other_dir),
            "--node-id",
            "1",
            "--cluster-addr",
            &format!("127.0.0.1:{port}"),
            "--partitions",
            "1",
            "--replicas",
            "1",
        ],
        None,
    );
    let target = c.nodes[0].addr.clone();
    let out = run(
        &["status", "--data", path(&other_dir), "--node", &target],
        None,
    );
    assert!(!out.status.success(), "a foreign certificate was accepted");
    let out = run(
        &[
            "admin",
            "--data",
            path(&other_dir),
            "--node",
            &target,
            "domain",
            "list",
        ],
        None,
    );
    assert!(!out.status.success());
    // The same command with this cluster's credentials works.
    ok(&["status", "--data", c.any(), "--node", &target], None);

    let joiner = other.path().join("j");
    let bad_token = c.token.replace('A', "B");
    let out = run(
        &[
            "join",
            "--data",
            path(&joiner),
            "--node-id",
            "9",
            "--cluster-addr",
            "127.0.0.1:1",
            "--seed",
            &target,
            "--token",
            &bad_token,
        ],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("token") || err.contains("refused") || err.contains("cannot reach"),
        "{err}"
    );
}

#[test]
fn bad_data_and_config_fail_with_a_clear_message() {
    // Goal: a corrupted data directory or bad config names the problem and exits non-zero;
    // never a silent start on an empty store.
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["serve", "--data", path(dir.path())], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a mailgrid data directory"));

    let node = dir.path().join("n");
    let port = free_port();
    ok(
        &[
            "init",
            "--data",
            path(&node),
            "--node-id",
            "1",
            "--cluster-addr",
            &format!("127.0.0.1:{port}"),
            "--partitions",
            "2",
            "--replicas",
            "1",
        ],
        None,
    );
    let out = run(
        &[
            "init",
            "--data",
            path(&node),
            "--node-id",
            "1",
            "--cluster-addr",
            &format!("127.0.0.1:{port}"),
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a mailgrid node"));

    // A database emptied behind the node's back is refused, not served as a new empty store.
    let db_file = node.join("db").join("db");
    let saved = std::fs::read(&db_file).unwrap();
    std::fs::write(&db_file, b"").unwrap();
    let out = run(&["serve", "--data", path(&node)], None);
    assert!(!out.status.success(), "served an emptied database");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("database") || err.contains("corrupt"), "{err}");
    std::fs::write(&db_file, &saved).unwrap();

    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[raft]\nheartbeat_ms = \"fast\"\n").unwrap();
    let out = run(
        &["serve", "--data", path(&node), "--config", path(&config)],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid config"));

    std::fs::write(node.join("node.toml"), "node_id = 1\ncluster_addr = ").unwrap();
    let out = run(&["serve", "--data", path(&node)], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("node.toml is malformed"));

    let out = run(
        &[
            "init",
            "--data",
            path(&dir.path().join("x")),
            "--node-id",
            "1",
            "--cluster-addr",
            "nowhere",
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid cluster address"));
}

/// Starts `mailgrid dev --json` with `args` on `dir`; the process and the line it printed
/// once the cluster was ready.
fn spawn_dev(args: &[&str], dir: &std::path::Path) -> (std::process::Child, serde_json::Value) {
    let mut child = std::process::Command::new(BIN)
        .arg("dev")
        .args(args)
        .args(["--json", "--dir", path(dir)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    (child, v)
}

#[test]
fn dev_cluster_starts_serves_the_demo_users_and_stops_its_children() {
    // Goal: `mailgrid dev --json` (README's main command) reports a ready cluster whose demo
    // users receive mail, restarts from its directory, and stops its node processes on SIGTERM.
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let start = || spawn_dev(&["--nodes", "2", "--partitions", "2"], dir.path());
    let (mut dev, info) = start();
    let nodes = info["nodes"].as_array().unwrap().clone();
    assert_eq!(nodes.len(), 2);
    let user = info["users"][0]["address"].as_str().unwrap().to_string();
    let node2 = nodes[1]["data"].as_str().unwrap().to_string();
    ok(
        &["deliver", "--data", &node2, "--to", &user],
        Some(b"Subject: dev\r\n\r\nhello dev\r\n"),
    );
    let node1 = nodes[0]["data"].as_str().unwrap().to_string();
    assert!(ok(&["admin", "--data", &node1, "fetch", &user], None).contains("hello dev"));

    let pids: Vec<i32> = nodes
        .iter()
        .map(|n| n["pid"].as_i64().unwrap() as i32)
        .collect();
    signal(dev.id() as i32, "TERM");
    assert!(dev.wait().unwrap().success());
    for pid in &pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "node {pid} outlived dev"
        );
    }

    // Started again on the same directory, the cluster keeps its mail.
    let (mut dev, info) = start();
    let node1 = info["nodes"][0]["data"].as_str().unwrap().to_string();
    assert!(ok(&["admin", "--data", &node1, "fetch", &user], None).contains("hello dev"));
    signal(dev.id() as i32, "TERM");
    assert!(dev.wait().unwrap().success());
}

#[test]
fn dev_cluster_takes_a_replication_factor() {
    // Goal: `mailgrid dev --replicas` (what bench uses for replication factor 1) places each
    // partition on that many nodes and still serves mail; a factor above the node count is
    // refused, naming the option.
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let dir_s = path(dir.path());
    let out = run(
        &["dev", "--nodes", "2", "--replicas", "3", "--dir", dir_s],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--replicas must be between 1 and --nodes (2)"),
        "{err}"
    );

    let (mut dev, info) = spawn_dev(
        &["--nodes", "3", "--partitions", "4", "--replicas", "1"],
        dir.path(),
    );
    let node1 = info["nodes"][0]["data"].as_str().unwrap().to_string();
    let partitions = eventually(Duration::from_secs(60), "4 partitions of one voter", || {
        let out = run(&["status", "--data", &node1, "--json"], None);
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let parts: Vec<serde_json::Value> = s["groups"]
            .as_array()?
            .iter()
            .filter(|g| !g["partition"].is_null())
            .cloned()
            .collect();
        let one_voter = parts
            .iter()
            .all(|g| g["healthy"] == true && g["voters"].as_array().map(Vec::len) == Some(1));
        (parts.len() == 4 && one_voter).then_some(parts)
    });
    assert_eq!(partitions.len(), 4);
    let user = info["users"][0]["address"].as_str().unwrap().to_string();
    let node3 = info["nodes"][2]["data"].as_str().unwrap().to_string();
    ok(
        &["deliver", "--data", &node3, "--to", &user],
        Some(b"Subject: rf1\r\n\r\none copy\r\n"),
    );
    assert!(ok(&["admin", "--data", &node1, "fetch", &user], None).contains("one copy"));
    signal(dev.id() as i32, "TERM");
    assert!(dev.wait().unwrap().success());
}
