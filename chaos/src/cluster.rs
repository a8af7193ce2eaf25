//! The cluster under test: real `mailgrid` node processes, one per network slot (see `net`),
//! made with `mailgrid init`/`join` and run with `mailgrid serve`, which the nemesis kills,
//! restarts, pauses, cuts apart, skews the clocks of, removes and joins again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use service::api::{ClientReply, ClientRequest, ClusterStatus};
use service::client::Client;

use crate::net::{Blocked, Choice, Net, Slot};

/// libfaketime, which the clock nemesis runs every node under (Debian package `faketime`).
pub const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// How long a new cluster may take to elect every leader.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A node process in a slot.
pub struct Node {
    pub id: u64,
    pub slot: usize,
    pub data: PathBuf,
    child: Option<Child>,
    pub running: bool,
    pub paused: bool,
    /// Taken out of the cluster (`node remove`) with its disk wiped; joins again on heal.
    pub removed: bool,
    /// Runs the release under test; `false` while it still runs `--bin-old` (see
    /// [`Cluster::upgrade_next`]).
    pub upgraded: bool,
}

impl Node {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

pub struct Cluster {
    bin: PathBuf,
    /// An older release the first nodes start on, upgraded to `bin` one by one (`upgrade`).
    bin_old: Option<PathBuf>,
    /// Nodes made now start on `bin_old` (the first ones; later joins run `bin`).
    start_old: bool,
    pub dir: PathBuf,
    pub net: Net,
    pub nodes: Vec<Node>,
    pub partitions: u32,
    token: String,
    next_id: u64,
    /// Nodes run under libfaketime, each with a file holding its clock offset.
    skewable: bool,
    /// Each member's current client listeners (a restarted node binds new ports).
    pub endpoints: Endpoints,
    /// The witness's id, in the two-data-nodes-and-a-witness topology.
    pub witness: Option<u64>,
    /// Whether nodes run with a disk fault file (see [`Cluster::set_disk`]).
    disk_faults: bool,
}

/// Where clients reach a node.
#[derive(Clone, Debug)]
pub struct Listeners {
    pub smtp: String,
    pub imaps: Option<String>,
    pub pop3s: Option<String>,
    /// The node's self-signed certificate, which TLS clients trust.
    pub cert: PathBuf,
}

pub type Endpoints = Arc<Mutex<BTreeMap<u64, Listeners>>>;

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(c) = &mut n.child {
                if n.paused {
                    signal(c.id(), "CONT");
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn run_step(mut cmd: Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every client listener on the slot's own host, on ports the system picks. Copies of left
/// groups are dropped after 5 s (not 60), so the `grow` nemesis drops replicas and gives
/// them back under the other faults within a run.
fn config(slot: &Slot) -> String {
    let h = &slot.host;
    format!(
        "hostname = \"localhost\"\n[listen]\nsmtp = \"{h}:0\"\nsubmission = \"{h}:0\"\nsubmissions = \"{h}:0\"\npop3 = \"{h}:0\"\npop3s = \"{h}:0\"\nimap = \"{h}:0\"\nimaps = \"{h}:0\"\nhttp = \"{h}:0\"\n[raft]\nstale_replica_s = 5\n"
    )
}

/// How a cluster is laid out.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Nodes run under libfaketime so the clock nemesis can move their clocks.
    pub skewable: bool,
    pub network: Choice,
    /// Network slots beyond the nodes', for nodes joined later (`grow`).
    pub spare_slots: usize,
    /// The last node joins as a witness.
    pub witness: bool,
    /// Nodes run with a disk fault file each (`storage::disk_fault`), for the disk nemesis.
    pub disk_faults: bool,
    /// An older release to start the first nodes on (the `upgrade` nemesis moves them to the
    /// release under test).
    pub bin_old: Option<PathBuf>,
}

impl Cluster {
    /// Starts `nodes` nodes with `partitions` partitions in `dir` (which must not exist), laid
    /// out as `layout` says.
    pub async fn start(
        bin: &Path,
        nodes: u32,
        partitions: u32,
        dir: &Path,
        layout: Layout,
    ) -> anyhow::Result<Cluster> {
        let Layout {
            skewable,
            network,
            spare_slots,
            witness,
            disk_faults,
            bin_old,
        } = layout;
        if skewable && !Path::new(FAKETIME_LIB).exists() {
            bail!("the clock nemesis needs {FAKETIME_LIB} (apt-get install faketime)");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let net = Net::start(nodes as usize + spare_slots, network).await?;
        let mut cluster = Cluster {
            bin: bin.to_path_buf(),
            start_old: bin_old.is_some(),
            bin_old,
            dir: dir.to_path_buf(),
            net,
            nodes: Vec::new(),
            partitions,
            token: String::new(),
            next_id: 1,
            skewable,
            endpoints: Arc::new(Mutex::new(BTreeMap::new())),
            witness: None,
            disk_faults,
        };
        for slot in 0..nodes as usize {
            if witness && slot + 1 == nodes as usize {
                cluster.witness = Some(cluster.next_id);
            }
            cluster.add_node(slot)?;
            if slot == 0 {
                cluster.wait_ready(1, READY_TIMEOUT).await?;
                cluster
                    .request(ClientRequest::DomainAdd(mailgrid::dev::DEMO_DOMAIN.into()))
                    .await?;
            }
        }
        cluster.wait_ready(3, READY_TIMEOUT).await?;
        cluster.refresh_listeners().await;
        cluster.start_old = false;
        Ok(cluster)
    }

    /// Upgrades the first member still on the older release: stopped, then started on the
    /// release under test (its data as it was). Its id, or `None` when every member runs it.
    pub fn upgrade_next(&mut self) -> anyhow::Result<Option<u64>> {
        let Some(id) = self
            .nodes
            .iter()
            .find(|n| !n.upgraded && !n.removed)
            .map(|n| n.id)
        else {
            return Ok(None);
        };
        self.kill(id);
        self.node(id).upgraded = true;
        self.restart(id)?;
        Ok(Some(id))
    }

    /// Members on the release under test, and all members.
    pub fn upgraded(&self) -> (usize, usize) {
        let members = self.nodes.iter().filter(|n| !n.removed);
        let all = members.clone().count();
        (members.filter(|n| n.upgraded).count(), all)
    }

    /// The binary node `id` runs.
    fn bin_of(&self, upgraded: bool) -> PathBuf {
        match (&self.bin_old, upgraded) {
            (Some(old), false) => old.clone(),
            _ => self.bin.clone(),
        }
    }

    /// Makes a new node (the next id) in `slot`, initialising the cluster when it is the
    /// first, and starts it.
    pub fn add_node(&mut self, slot: usize) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let s = self.net.slots()[slot].clone();
        let data = self.dir.join(format!("node{id}"));
        let upgraded = !self.start_old;
        let mut cmd = s.command(&self.bin_of(upgraded));
        if self.token.is_empty() {
            cmd.arg("init")
                .args(["--partitions", &self.partitions.to_string()])
                .args(["--replicas", "3"]);
        } else {
            let seed = self.seed(slot)?;
            cmd.arg("join")
                .args(["--seed", &seed, "--token", &self.token]);
            if self.witness == Some(id) {
                cmd.arg("--witness");
            }
        }
        cmd.arg("--data")
            .arg(&data)
            .args(["--node-id", &id.to_string()])
            .args(["--cluster-addr", &s.cluster_addr]);
        if let Some(b) = &s.bind {
            cmd.args(["--bind", b]);
        }
        let out = run_step(cmd, &format!("adding node {id}"))?;
        if self.token.is_empty() {
            self.token = out
                .lines()
                .find_map(|l| l.strip_prefix("join token: "))
                .context("init printed no token")?
                .to_string();
        }
        std::fs::write(data.with_extension("toml"), config(&s))?;
        let node = Node {
            id,
            slot,
            data,
            child: None,
            running: false,
            paused: false,
            removed: false,
            upgraded,
        };
        match self.nodes.iter().position(|n| n.slot == slot) {
            Some(i) => self.nodes[i] = node,
            None => self.nodes.push(node),
        }
        self.restart(id)?;
        Ok(id)
    }

    fn disk_file(&self, slot: usize) -> PathBuf {
        self.dir.join(format!("slot{slot}.disk"))
    }

    /// Makes node `id`'s disk fail (`"eio"`), stop answering (`"stall"`), or work again
    /// (`""`), as `storage::disk_fault` reads it.
    pub fn set_disk(&mut self, id: u64, fault: &str) -> anyhow::Result<()> {
        let slot = self.node(id).slot;
        std::fs::write(self.disk_file(slot), fault)?;
        Ok(())
    }

    /// A network slot no node was ever started in (the `grow` nemesis joins nodes there).
    pub fn free_slot(&self) -> Option<usize> {
        (0..self.net.slots().len()).find(|s| !self.nodes.iter().any(|n| n.slot == *s))
    }

    /// The cluster address of a running member other than `slot`.
    fn seed(&self, slot: usize) -> anyhow::Result<String> {
        let n = self
            .nodes
            .iter()
            .find(|n| n.slot != slot && n.running && !n.paused && !n.removed)
            .context("no running node to join through")?;
        Ok(self.net.slots()[n.slot].cluster_addr.clone())
    }

    fn node(&mut self, id: u64) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .expect("known node")
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| !n.removed)
            .map(|n| n.id)
            .collect()
    }

    pub fn slot_of(&self, id: u64) -> Option<usize> {
        self.nodes.iter().find(|n| n.id == id).map(|n| n.slot)
    }

    pub fn kill(&mut self, id: u64) {
        let n = self.node(id);
        if let Some(c) = &mut n.child {
            if n.running {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        n.running = false;
        n.paused = false;
    }

    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let upgraded = self.node(id).upgraded;
        let bin = self.bin_of(upgraded);
        let log_path = self.dir.join(format!("node{id}.log"));
        let skewable = self.skewable;
        let index = self.node(id).slot;
        let slot = self.net.slots()[index].clone();
        let clock = self.dir.join(format!("slot{index}.faketime"));
        let disk = self.disk_faults.then(|| self.disk_file(index));
        let n = self.node(id);
        if n.running || n.removed {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut cmd = slot.command(&bin);
        cmd.args(["serve", "--data"])
            .arg(&n.data)
            .arg("--config")
            .arg(n.data.with_extension("toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if skewable {
            if !clock.exists() {
                std::fs::write(&clock, "+0\n")?;
            }
            // Only the wall clock moves: timers and timeouts run on the monotonic clock.
            cmd.env("LD_PRELOAD", FAKETIME_LIB)
                .env("FAKETIME_TIMESTAMP_FILE", &clock)
                .env("FAKETIME_CACHE_DURATION", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_DONT_RESET", "1");
        }
        if let Some(disk) = disk {
            if !disk.exists() {
                std::fs::write(&disk, "")?;
            }
            cmd.env(storage::disk_fault::ENV, &disk);
        }
        if std::env::var_os("MAILGRID_LOG").is_none() {
            // Moves, hand-overs and dropped copies are logged at info (counted in the verdict).
            cmd.env("MAILGRID_LOG", "warn,raft::host=info");
        }
        let child = cmd.spawn().context("starting a node")?;
        n.child = Some(child);
        n.running = true;
        n.paused = false;
        Ok(())
    }

    /// Moves node `id`'s wall clock `offset_s` seconds from the real time (0 puts it back).
    pub fn set_clock(&mut self, id: u64, offset_s: i64) -> anyhow::Result<()> {
        if !self.skewable {
            bail!("the nodes do not run under libfaketime");
        }
        let slot = self.node(id).slot;
        let path = self.dir.join(format!("slot{slot}.faketime"));
        std::fs::write(&path, format!("{offset_s:+}\n"))?;
        Ok(())
    }

    pub fn pause(&mut self, id: u64) {
        let n = self.node(id);
        if let (true, false, Some(pid)) = (n.running, n.paused, n.pid()) {
            signal(pid, "STOP");
            n.paused = true;
        }
    }

    pub fn resume(&mut self, id: u64) {
        let n = self.node(id);
        if let (true, Some(pid)) = (n.paused, n.pid()) {
            signal(pid, "CONT");
            n.paused = false;
        }
    }

    /// Takes node `id` out of the cluster: `node remove` through another node, then kill -9
    /// and a wiped disk. Its replicas move to the remaining nodes.
    pub async fn remove(&mut self, id: u64) -> anyhow::Result<()> {
        let client = self.client_avoiding(Some(id))?;
        match client.request(ClientRequest::NodeRemove(id)).await? {
            ClientReply::Done => {}
            other => bail!("node remove {id} answered {other:?}"),
        }
        self.kill(id);
        let n = self.node(id);
        n.removed = true;
        let data = n.data.clone();
        std::fs::remove_dir_all(&data).with_context(|| format!("wiping {}", data.display()))?;
        self.endpoints.lock().expect("listeners lock").remove(&id);
        Ok(())
    }

    /// Joins a fresh node (a new id) into the slot of a removed node.
    pub fn rejoin(&mut self, slot: usize) -> anyhow::Result<u64> {
        self.add_node(slot)
    }

    /// Puts clocks back, heals the network, resumes every paused node, restarts every dead
    /// one and joins a fresh node where one was removed.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        self.net.heal()?;
        let ids: Vec<u64> = self.nodes.iter().map(|n| n.id).collect();
        for id in ids {
            if self.skewable {
                self.set_clock(id, 0)?;
            }
            self.resume(id);
            self.restart(id)?;
        }
        let removed: Vec<usize> = self
            .nodes
            .iter()
            .filter(|n| n.removed)
            .map(|n| n.slot)
            .collect();
        for slot in removed {
            self.rejoin(slot)?;
        }
        Ok(())
    }

    /// Blocks exactly these pairs of nodes (by id) from exchanging packets.
    pub fn cut(&self, pairs: &[(u64, u64)]) -> anyhow::Result<()> {
        let blocked: Blocked = pairs
            .iter()
            .filter_map(|&(a, b)| Some((self.slot_of(a)?, self.slot_of(b)?)))
            .collect();
        self.net.cut(&blocked)
    }

    fn client_avoiding(&self, avoid: Option<u64>) -> anyhow::Result<Client> {
        let n = self
            .nodes
            .iter()
            .find(|n| n.running && !n.paused && !n.removed && Some(n.id) != avoid)
            .context("no node is up")?;
        Client::open(&n.data, None)
    }

    /// A client acting through the first running, unpaused node.
    pub fn client(&self) -> anyhow::Result<Client> {
        self.client_avoiding(None)
    }

    pub async fn request(&self, request: ClientRequest) -> anyhow::Result<ClientReply> {
        self.client()?.request(request).await
    }

    pub async fn status(&self) -> anyhow::Result<ClusterStatus> {
        match self.request(ClientRequest::Status).await? {
            ClientReply::Status(s) => Ok(s),
            other => bail!("status answered {other:?}"),
        }
    }

    /// Re-reads every member's listeners from the cluster status (members only: a removed
    /// node's entry goes).
    pub async fn refresh_listeners(&self) {
        if let Ok(status) = self.status().await {
            let mut endpoints = self.endpoints.lock().expect("listeners lock");
            endpoints.retain(|id, _| status.nodes.iter().any(|n| n.id == *id));
            for n in status.nodes {
                let data = self.nodes.iter().find(|m| m.id == n.id).map(|m| &m.data);
                if let (Some(smtp), Some(data)) = (n.listeners.get("smtp"), data) {
                    let listeners = Listeners {
                        smtp: smtp.clone(),
                        imaps: n.listeners.get("imaps").cloned(),
                        pop3s: n.listeners.get("pop3s").cloned(),
                        cert: data.join("tls/server.pem"),
                    };
                    endpoints.insert(n.id, listeners);
                }
            }
        }
    }

    /// The leader of a partition group, as the cluster reports it.
    pub async fn leader_of(&self, group: u64) -> Option<u64> {
        let status = self.status().await.ok()?;
        status
            .partitions
            .iter()
            .find(|p| p.group == group)
            .and_then(|p| p.leader)
    }

    /// The voters of a group, as the cluster reports them.
    pub async fn voters(&self, group: u64) -> Vec<u64> {
        match self.status().await {
            Ok(s) => s
                .partitions
                .iter()
                .find(|p| p.group == group)
                .map(|p| self.data_voters(group, &p.voters))
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// The voters of `group` that hold its state: a witness holds the meta state but no
    /// partition's.
    pub fn data_voters(&self, group: u64, voters: &[u64]) -> Vec<u64> {
        voters
            .iter()
            .copied()
            .filter(|v| group == 0 || Some(*v) != self.witness)
            .collect()
    }

    /// Waits until every group has a leader and `voters` voters, and every member is
    /// reachable and has published its SMTP listener.
    async fn wait_ready(&self, voters: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(s) = self.status().await {
                let groups = !s.partitions.is_empty()
                    && s.partitions
                        .iter()
                        .all(|p| p.healthy && p.voters.len() >= voters.min(s.nodes.len()));
                // A witness serves no mail: it publishes its HTTP listener only.
                let nodes = s.nodes.iter().all(|n| {
                    let wanted = if Some(n.id) == self.witness {
                        "http"
                    } else {
                        "smtp"
                    };
                    n.reachable && n.listeners.contains_key(wanted)
                });
                if groups && nodes {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                // What every node thought of every group, for the reader of the failure.
                let path = self.dir.join("status-at-timeout.json");
                if let Ok(s) = self.status().await {
                    let _ = std::fs::write(&path, serde_json::to_string_pretty(&s)?);
                }
                bail!(
                    "the cluster did not become ready within {timeout:?} (see the node logs and {} in {})",
                    path.display(),
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until every group has a leader and a full set of voters, and every node is
    /// reachable.
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_ready(3, timeout).await
    }

    /// Every group's digests by node, waiting (up to `timeout`) for the voters of each group
    /// to agree; the last answer per group either way.
    pub async fn converged_digests(
        &self,
        timeout: Duration,
    ) -> anyhow::Result<BTreeMap<u64, BTreeMap<u64, Option<String>>>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = BTreeMap::new();
        for group in 0..=self.partitions as u64 {
            loop {
                let digests = match self.request(ClientRequest::Digests(group)).await {
                    Ok(ClientReply::Digests(d)) => d,
                    Ok(other) => bail!("digests answered {other:?}"),
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        eprintln!("digests of group {group}: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let voters = self.voters(group).await;
                let values: Vec<&Option<String>> = digests
                    .iter()
                    .filter(|(node, _)| voters.contains(node))
                    .map(|(_, d)| d)
                    .collect();
                let agree = !values.is_empty()
                    && values.iter().all(|v| v.is_some())
                    && values.windows(2).all(|w| w[0] == w[1]);
                if agree || tokio::time::Instant::now() > deadline {
                    if !agree {
                        // Lagging or diverged? Each node's applied index says which.
                        if let Ok(status) = self.status().await {
                            let views: BTreeMap<u64, Vec<_>> = status
                                .views
                                .iter()
                                .map(|(n, v)| (*n, v.iter().filter(|g| g.group == group).collect()))
                                .collect();
                            let path = self.dir.join(format!("group{group}-disagreement.json"));
                            let text = serde_json::json!({ "digests": digests, "views": views });
                            let _ = std::fs::write(&path, text.to_string());
                        }
                    }
                    out.insert(group, digests);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(out)
    }
}
