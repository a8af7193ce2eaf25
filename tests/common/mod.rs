//! Test harness: real `mailgrid` node processes on loopback, driven through the command line
//! exactly as an operator would.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_mailgrid");

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mailgrid");
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    child.wait_with_output().expect("wait mailgrid")
}

pub fn ok(args: &[&str], stdin: Option<&[u8]>) -> String {
    let out = run(args, stdin);
    assert!(
        out.status.success(),
        "mailgrid {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A UDP port that was free a moment ago and was never handed out before in this process.
/// The system may return the same free port twice in a row, and a node spawned a moment ago
/// may not have bound its port yet: CI once gave two nodes of one cluster the same address.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

pub struct TestNode {
    pub id: u64,
    pub dir: PathBuf,
    pub addr: String,
    pub child: Option<Child>,
}

pub struct Cluster {
    pub root: tempfile::TempDir,
    pub nodes: Vec<TestNode>,
    pub token: String,
    pub config: PathBuf,
    /// Environment every node process starts with (failpoints).
    pub env: Vec<(String, String)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed && self.nodes.iter().any(|n| n.child.is_some()) {
            // Bounded: a wedged cluster must not turn a failure into a hang.
            let out = Command::new("timeout")
                .args(["30", BIN, "status", "--data", self.any(), "--json"])
                .stdin(Stdio::null())
                .output()
                .expect("spawn timeout (coreutils)");
            eprintln!(
                "---- cluster status at failure ----\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for n in &mut self.nodes {
            n.kill9();
        }
        if failed {
            self.print_log_tails(80);
            if std::env::var_os("MAILGRID_TEST_KEEP").is_some() {
                self.root.disable_cleanup(true);
                eprintln!("kept {}", self.root.path().display());
            }
        }
    }
}

impl Cluster {
    /// Everything node `id` has logged so far.
    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.root.path().join(format!("node{id}.log"))).unwrap_or_default()
    }

    /// Prints the last `lines` lines of every node's log, so a failed test (in CI, where the
    /// temporary directory is gone afterwards) shows what the nodes were doing.
    fn print_log_tails(&self, lines: usize) {
        for n in &self.nodes {
            let text = self.log(n.id);
            let all: Vec<&str> = text.lines().collect();
            eprintln!("---- last {lines} lines of node {} log ----", n.id);
            for l in &all[all.len().saturating_sub(lines)..] {
                eprintln!("{l}");
            }
        }
    }
}

impl TestNode {
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("node running").id() as i32
    }

    pub fn data(&self) -> &str {
        self.dir.to_str().unwrap()
    }
}

pub fn signal(pid: i32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

impl Cluster {
    /// A cluster of `n` nodes, `partitions` partitions, replication factor min(n, 3), with
    /// domain example.test and users user0..user{users-1}@example.test (password "pw").
    pub fn start(n: u64, partitions: u32, snapshot_logs: u64, users: usize) -> Cluster {
        Self::start_with(n, partitions, snapshot_logs, users, "")
    }

    /// Like [`Cluster::start`], every node started with `env` (failpoints) from the first.
    pub fn start_env(
        n: u64,
        partitions: u32,
        snapshot_logs: u64,
        users: usize,
        env: &[(&str, &str)],
    ) -> Cluster {
        Self::start_full(n, partitions, snapshot_logs, users, "", env)
    }

    /// Like [`Cluster::start`], with more config sections (`[smtp]`, `[auth]`, ...) for every
    /// node. Every listener is on 127.0.0.1 with a port the system picks.
    pub fn start_with(
        n: u64,
        partitions: u32,
        snapshot_logs: u64,
        users: usize,
        extra_config: &str,
    ) -> Cluster {
        Self::start_full(n, partitions, snapshot_logs, users, extra_config, &[])
    }

    fn start_full(
        n: u64,
        partitions: u32,
        snapshot_logs: u64,
        users: usize,
        extra_config: &str,
        env: &[(&str, &str)],
    ) -> Cluster {
        let mut cluster = Self::start_first(
            n.min(3),
            partitions,
            snapshot_logs,
            users,
            extra_config,
            env,
        );
        for id in 2..=n {
            cluster.join(id);
        }
        cluster.wait_healthy(n.min(3) as usize);
        cluster
    }

    /// The two-server topology: data nodes 1 and 2 and witness 3, replication factor 3, every
    /// node started with `env`.
    pub fn start_witness(
        partitions: u32,
        snapshot_logs: u64,
        users: usize,
        env: &[(&str, &str)],
    ) -> Cluster {
        let mut cluster = Self::start_first(3, partitions, snapshot_logs, users, "", env);
        cluster.join(2);
        cluster.join_as(3, true);
        cluster.wait_healthy(3);
        cluster
    }

    /// `n` data nodes with replication factor `replicas` (fewer than `n`, so some nodes hold
    /// no replica of a partition), every node started with `env`.
    pub fn start_replicas(
        n: u64,
        replicas: u64,
        partitions: u32,
        snapshot_logs: u64,
        users: usize,
        env: &[(&str, &str)],
    ) -> Cluster {
        let mut cluster = Self::start_first(replicas, partitions, snapshot_logs, users, "", env);
        for id in 2..=n {
            cluster.join(id);
        }
        cluster.wait_healthy(replicas as usize);
        cluster
    }

    /// Node 1 of a new cluster (replication factor `replicas`), with domain example.test and
    /// its users.
    fn start_first(
        replicas: u64,
        partitions: u32,
        snapshot_logs: u64,
        users: usize,
        extra_config: &str,
        env: &[(&str, &str)],
    ) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let config = root.path().join("node.toml");
        std::fs::write(
            &config,
            format!("hostname = \"mx.example.test\"\n[listen]\nsmtp = \"127.0.0.1:0\"\nsubmission = \"127.0.0.1:0\"\nsubmissions = \"127.0.0.1:0\"\npop3 = \"127.0.0.1:0\"\npop3s = \"127.0.0.1:0\"\nimap = \"127.0.0.1:0\"\nimaps = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n[raft]\nheartbeat_ms = 100\nelection_min_ms = 500\nelection_max_ms = 1000\nsnapshot_logs = {snapshot_logs}\nwrite_timeout_ms = 3000\n{extra_config}"),
        )
        .unwrap();
        let mut cluster = Cluster {
            root,
            nodes: Vec::new(),
            token: String::new(),
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let replicas = replicas.to_string();
        let first = cluster.new_node_dir(1);
        let out = ok(
            &[
                "init",
                "--data",
                first.0.to_str().unwrap(),
                "--node-id",
                "1",
                "--cluster-addr",
                &first.1,
                "--partitions",
                &partitions.to_string(),
                "--replicas",
                &replicas,
            ],
            None,
        );
        cluster.token = out
            .lines()
            .find_map(|l| l.strip_prefix("join token: "))
            .unwrap()
            .to_string();
        cluster.add_started(1, first.0, first.1);
        cluster.wait_healthy(1);
        cluster.admin(&["domain", "add", "example.test"]);
        for i in 0..users {
            cluster.admin(&[
                "user",
                "add",
                &format!("user{i}@example.test"),
                "--password",
                "pw",
            ]);
        }
        cluster
    }

    fn new_node_dir(&self, id: u64) -> (PathBuf, String) {
        (
            self.root.path().join(format!("node{id}")),
            format!("127.0.0.1:{}", free_port()),
        )
    }

    fn add_started(&mut self, id: u64, dir: PathBuf, addr: String) {
        let mut node = TestNode {
            id,
            dir,
            addr,
            child: None,
        };
        self.spawn(&mut node);
        self.nodes.push(node);
    }

    fn spawn(&self, node: &mut TestNode) {
        self.spawn_env(node, &[]);
    }

    fn spawn_env(&self, node: &mut TestNode, env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join(format!("node{}.log", node.id)))
            .unwrap();
        let child = Command::new(BIN)
            .args([
                "serve",
                "--data",
                node.data(),
                "--config",
                self.config.to_str().unwrap(),
            ])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        node.child = Some(child);
    }

    /// Joins a new node with id `id` through node 1 (or the first running node) and starts it.
    pub fn join(&mut self, id: u64) {
        self.join_as(id, false)
    }

    /// [`Cluster::join`], as a witness when `witness`.
    pub fn join_as(&mut self, id: u64, witness: bool) {
        let (dir, addr) = self.new_node_dir(id);
        let seed = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .unwrap()
            .addr
            .clone();
        let id_s = id.to_string();
        let mut args = vec![
            "join",
            "--data",
            dir.to_str().unwrap(),
            "--node-id",
            &id_s,
            "--cluster-addr",
            &addr,
            "--seed",
            &seed,
            "--token",
            &self.token,
        ];
        if witness {
            args.push("--witness");
        }
        ok(&args, None);
        self.add_started(id, dir, addr);
    }

    pub fn node(&mut self, id: u64) -> &mut TestNode {
        self.nodes.iter_mut().find(|n| n.id == id).unwrap()
    }

    pub fn restart(&mut self, id: u64) {
        self.restart_env(id, &[]);
    }

    /// Restarts node `id` with extra environment variables (failpoints).
    pub fn restart_env(&mut self, id: u64, env: &[(&str, &str)]) {
        let mut node = std::mem::replace(
            self.node(id),
            TestNode {
                id,
                dir: PathBuf::new(),
                addr: String::new(),
                child: None,
            },
        );
        node.kill9();
        self.spawn_env(&mut node, env);
        *self.node(id) = node;
    }

    /// Data dir of some running node (for commands).
    pub fn any(&self) -> &str {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .unwrap()
            .data()
    }

    pub fn admin(&self, args: &[&str]) -> String {
        let mut all = vec!["admin", "--data", self.any()];
        all.extend_from_slice(args);
        ok(&all, None)
    }

    pub fn status_via(&self, data: &str) -> Option<serde_json::Value> {
        let out = run(&["status", "--data", data, "--json"], None);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// Waits until every group has a leader and at least `voters` voters.
    pub fn wait_healthy(&self, voters: usize) -> serde_json::Value {
        eventually(Duration::from_secs(60), "cluster healthy", || {
            let s = self.status_via(self.any())?;
            let groups = s["groups"].as_array()?;
            let ok = groups.iter().all(|g| {
                g["healthy"] == true
                    && g["voters"].as_array().map(|v| v.len()).unwrap_or(0) >= voters
            });
            ok.then_some(s)
        })
    }

    /// The leader of the partition group holding `user` (with `partitions` partitions),
    /// once every group has one.
    pub fn leader_of_user(&self, user: &str, partitions: u32) -> u64 {
        let group = service::router::partition_of(user, partitions) as u64 + 1;
        let s = self.wait_healthy(1);
        s["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["group"] == group)
            .unwrap()["leader"]
            .as_u64()
            .unwrap()
    }

    /// The address node `id` listens on for `service` ("smtp", "submission", ...), once it
    /// has published it.
    pub fn listener(&self, id: u64, service: &str) -> String {
        eventually(Duration::from_secs(30), "node listeners published", || {
            let s = self.status_via(self.any())?;
            let node = s["nodes"].as_array()?.iter().find(|n| n["id"] == id)?;
            node["listeners"][service].as_str().map(str::to_string)
        })
    }

    /// Delivers via node `via`; `Ok(stdout)` when acknowledged.
    pub fn deliver(&self, via: &str, to: &[&str], body: &[u8], id: &str) -> Result<String, String> {
        let mut args = vec!["deliver", "--data", via, "--delivery-id", id];
        for t in to {
            args.push("--to");
            args.push(t);
        }
        let out = run(&args, Some(body));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Every message (uid, body) in a user's INBOX, read through node `via`.
    pub fn fetch(&self, via: &str, user: &str) -> Vec<(u64, String)> {
        let out = ok(&["admin", "--data", via, "fetch", user], None);
        out.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["uid"].as_u64().unwrap(),
                    v["body"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Replica digests of a group, by node id, as reported through `via`.
    pub fn digests(&self, via: &str, group: u64) -> serde_json::Map<String, serde_json::Value> {
        let out = ok(
            &["admin", "--data", via, "digest", &group.to_string()],
            None,
        );
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap()
            .as_object()
            .unwrap()
            .clone()
    }

    /// Waits until every live replica of every group reports the same digest.
    pub fn wait_converged(&self, groups: u64, nodes: &[u64]) {
        eventually(Duration::from_secs(60), "replicas converge", || {
            for g in 0..=groups {
                let d = self.digests(self.any(), g);
                let vals: Vec<&serde_json::Value> = nodes
                    .iter()
                    .map(|n| d.get(&n.to_string()).unwrap_or(&serde_json::Value::Null))
                    .collect();
                if vals.iter().any(|v| v.is_null()) || vals.windows(2).any(|w| w[0] != w[1]) {
                    return None;
                }
            }
            Some(())
        })
    }
}

/// Runs `scenario` of a Python client script in `tests/` with JSON arguments; its stdout.
/// Panics with the script's output when it fails.
pub fn python_scenario(script: &str, scenario: &str, args: &serde_json::Value) -> String {
    let script = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .args([&script, scenario, &args.to_string()])
        .output()
        .expect("python3 runs (scripts/test installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "scenario {scenario} of {script} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The last line of a scenario's output, as JSON (`Null` if it is not).
pub fn last_json(stdout: &str) -> serde_json::Value {
    stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Runs swaks (a widely used SMTP test client); its transcript. Panics when it fails.
pub fn swaks(args: &[&str]) -> String {
    let out = Command::new("swaks")
        .args(args)
        .output()
        .expect("swaks runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "swaks {args:?} failed:\n{text}");
    text
}

pub fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A metric summed over every running node's /metrics (fetched with curl).
/// The digest of a group replica holding no record: what a witness has of a partition, and a
/// node that dropped its copy of a group it left.
pub const EMPTY_DIGEST: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

pub fn metric_sum(c: &Cluster, name: &str) -> u64 {
    c.nodes
        .iter()
        .filter(|n| n.child.is_some())
        .map(|n| metric_of(c, n.id, name))
        .sum()
}

/// A metric from node `id`'s /metrics (fetched with curl).
pub fn metric_of(c: &Cluster, id: u64, name: &str) -> u64 {
    // A restarted node listens on new ports and publishes them shortly after it starts;
    // until then the cluster status still names the old ones.
    let (url, text) = eventually(Duration::from_secs(30), "GET /metrics", || {
        let url = format!("http://{}/metrics", c.listener(id, "http"));
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "10", &url])
            .output()
            .expect("curl runs");
        out.status
            .success()
            .then(|| (url, String::from_utf8(out.stdout).unwrap()))
    });
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing from {url}:\n{text}"));
    value.trim().parse::<u64>().unwrap()
}
