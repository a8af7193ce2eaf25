//! The cluster under test: a `mailgrid dev` cluster of real node processes on loopback, whose
//! nodes the nemesis kills, restarts, pauses and resumes by process id.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use mailgrid::api::{ClientReply, ClientRequest, ClusterStatus};
use mailgrid::client::Client;

pub struct Node {
    pub id: u64,
    pub data: PathBuf,
    pid: u32,
    /// A process this harness started (after a restart); `dev` owns the first one.
    child: Option<Child>,
    pub running: bool,
    pub paused: bool,
}

pub struct Cluster {
    bin: PathBuf,
    dev: Child,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub partitions: u32,
    /// Each node's current SMTP listener (a restarted node binds a new port).
    pub smtp: Arc<Mutex<BTreeMap<u64, String>>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if n.paused {
                signal(n.pid, "CONT");
            }
            if let Some(c) = &mut n.child {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        signal(self.dev.id(), "TERM");
        let _ = self.dev.wait();
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

impl Cluster {
    /// Starts `nodes` nodes with `partitions` partitions in `dir` (which must not exist).
    pub fn start(bin: &Path, nodes: u32, partitions: u32, dir: &Path) -> anyhow::Result<Cluster> {
        let mut dev = Command::new(bin)
            .args(["dev", "--json", "--nodes", &nodes.to_string()])
            .args(["--partitions", &partitions.to_string(), "--dir"])
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = dev.stdout.take().context("dev stdout")?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let info: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("mailgrid dev printed {line:?} (see its log above)"))?;
        let mut list = Vec::new();
        let mut smtp = BTreeMap::new();
        for n in info["nodes"].as_array().context("dev printed no nodes")? {
            let id = n["id"].as_u64().context("node id")?;
            list.push(Node {
                id,
                data: PathBuf::from(n["data"].as_str().context("node data")?),
                pid: n["pid"].as_u64().context("node pid")? as u32,
                child: None,
                running: true,
                paused: false,
            });
            if let Some(addr) = n["listeners"]["smtp"].as_str() {
                smtp.insert(id, addr.to_string());
            }
        }
        if smtp.len() != list.len() {
            bail!("mailgrid dev did not report an smtp listener for every node: {line}");
        }
        Ok(Cluster {
            bin: bin.to_path_buf(),
            dev,
            dir: PathBuf::from(info["dir"].as_str().unwrap_or_default()),
            nodes: list,
            partitions,
            smtp: Arc::new(Mutex::new(smtp)),
        })
    }

    fn node(&mut self, id: u64) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .expect("known node")
    }

    pub fn kill(&mut self, id: u64) {
        let n = self.node(id);
        if !n.running {
            return;
        }
        signal(n.pid, "KILL");
        if let Some(c) = &mut n.child {
            let _ = c.wait();
        }
        n.running = false;
        n.paused = false;
    }

    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let bin = self.bin.clone();
        let log_path = self.dir.join(format!("node{id}.log"));
        let n = self.node(id);
        if n.running {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = Command::new(bin)
            .args(["serve", "--data"])
            .arg(&n.data)
            .arg("--config")
            .arg(n.data.with_extension("toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("restarting a node")?;
        n.pid = child.id();
        n.child = Some(child);
        n.running = true;
        Ok(())
    }

    pub fn pause(&mut self, id: u64) {
        let n = self.node(id);
        if n.running && !n.paused {
            signal(n.pid, "STOP");
            n.paused = true;
        }
    }

    pub fn resume(&mut self, id: u64) {
        let n = self.node(id);
        if n.paused {
            signal(n.pid, "CONT");
            n.paused = false;
        }
    }

    /// Resumes every paused node and restarts every dead one.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        let ids: Vec<u64> = self.nodes.iter().map(|n| n.id).collect();
        for id in ids {
            self.resume(id);
            self.restart(id)?;
        }
        Ok(())
    }

    /// A client acting through the first running, unpaused node.
    pub fn client(&self) -> anyhow::Result<Client> {
        let n = self
            .nodes
            .iter()
            .find(|n| n.running && !n.paused)
            .context("no node is up")?;
        Client::open(&n.data, None)
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

    /// Re-reads every node's SMTP listener from the cluster status.
    pub async fn refresh_listeners(&self) {
        if let Ok(status) = self.status().await {
            let mut smtp = self.smtp.lock().expect("listeners lock");
            for n in status.nodes {
                if let Some(addr) = n.listeners.get("smtp") {
                    smtp.insert(n.id, addr.clone());
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
                .map(|p| p.voters.clone())
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// Waits until every group has a leader and every node is reachable.
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(s) = self.status().await {
                if s.partitions.iter().all(|p| p.healthy) && s.nodes.iter().all(|n| n.reachable) {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the cluster did not become healthy within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
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
                    out.insert(group, digests);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(out)
    }
}
