//! `mailgrid dev`: a local cluster of separate node processes on loopback, with the demo
//! domain `example.test` and demo users, stopped with its children on interrupt.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use service::api::{ClientReply, ClientRequest, ClusterStatus};
use service::client::Client;
use storage::partition::Quota;

pub const DEMO_DOMAIN: &str = "example.test";
pub const DEMO_USERS: [(&str, &str); 2] = [
    ("alice@example.test", "alice-password"),
    ("bob@example.test", "bob-password"),
];
/// How long the cluster may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Children are stopped (SIGTERM, then SIGKILL) when this is dropped, even on error.
struct Children(Vec<(u64, PathBuf, String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, _, _, child) in &mut self.0 {
            let _ = signal(child.id(), libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for (_, _, _, child) in &mut self.0 {
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn signal(pid: u32, sig: i32) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(std::io::Error::other)?;
    nix_kill(pid, sig)
}

#[allow(unsafe_code)]
fn nix_kill(pid: i32, sig: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A UDP port on 127.0.0.1 that was free a moment ago and is not in `taken` (recorded
/// there). The system may hand out the same free port twice in a row, and a node spawned
/// a moment ago may not have bound its port yet: two nodes were once given one address.
fn free_port(taken: &mut std::collections::HashSet<u16>) -> anyhow::Result<u16> {
    for _ in 0..1000 {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("finding a free port")?;
        let port = socket.local_addr()?.port();
        if taken.insert(port) {
            return Ok(port);
        }
    }
    bail!("no free UDP port on 127.0.0.1 that is not already given to a node")
}

fn run_step(exe: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "`mailgrid {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every dev node listens on loopback, on ports the system picks (see `status`).
const DEV_CONFIG: &str = "hostname = \"localhost\"\n[listen]\nsmtp = \"127.0.0.1:0\"\nsubmission = \"127.0.0.1:0\"\nsubmissions = \"127.0.0.1:0\"\npop3 = \"127.0.0.1:0\"\npop3s = \"127.0.0.1:0\"\nimap = \"127.0.0.1:0\"\nimaps = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n";

/// Starts `mailgrid serve` for the node in `dir` with the dev configuration (loopback, ports
/// the system picks), logging to `log`.
pub fn spawn_serve(exe: &Path, dir: &Path, log: &Path) -> anyhow::Result<Child> {
    let log = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let config = dir.with_extension("toml");
    std::fs::write(&config, DEV_CONFIG).with_context(|| format!("writing {}", config.display()))?;
    Command::new(exe)
        .args(["serve", "--data"])
        .arg(dir)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting a node")
}

/// Rebuilds the join token of an existing dev cluster from node 1's files.
pub fn read_token(node1: &Path) -> anyhow::Result<String> {
    let file = service::datadir::NodeFile::load(node1)?;
    let tls = service::datadir::tls_dir(node1);
    let read = |name: &str| service::node::read_file(&tls.join(name));
    let token = service::node::JoinToken {
        cluster_id: file.cluster_id,
        secret: read(service::datadir::JOIN_SECRET_FILE)?.trim().to_string(),
        ca_pem: read(raft::tls::CA_CERT_FILE)?,
    };
    Ok(token.encode())
}

/// Polls until every group has a leader with `voters` voters and every node has published
/// its listeners (a witness has no mail listeners, only `http`).
async fn wait_ready(
    client: &Client,
    voters: usize,
    witness: Option<u64>,
) -> anyhow::Result<ClusterStatus> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(ClientReply::Status(s)) = client.request(ClientRequest::Status).await {
            let ready = s
                .partitions
                .iter()
                .all(|p| p.healthy && p.voters.len() >= voters);
            let listening = s.nodes.iter().all(|n| {
                let wanted = if Some(n.id) == witness {
                    "http"
                } else {
                    "smtp"
                };
                n.listeners.contains_key(wanted)
            });
            if ready && listening && !s.partitions.is_empty() {
                return Ok(s);
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the cluster did not become ready within {}s",
                READY_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn run(
    nodes: u32,
    dir: &Path,
    json: bool,
    partitions: u32,
    replicas: Option<u32>,
    witness: bool,
) -> anyhow::Result<()> {
    if !(1..=9).contains(&nodes) {
        bail!("--nodes must be between 1 and 9");
    }
    let voters = nodes + u32::from(witness);
    let replicas = replicas.unwrap_or(voters.min(3));
    if !(1..=voters).contains(&replicas) {
        let with = if witness { " plus the witness" } else { "" };
        bail!("--replicas must be between 1 and --nodes{with} ({voters})");
    }
    let witness_id = witness.then_some(u64::from(nodes) + 1);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let exe = std::env::current_exe().context("locating the mailgrid binary")?;
    let mut children = Children(Vec::new());
    let mut token = String::new();
    let mut taken = std::collections::HashSet::new();
    for id in 1..=u64::from(voters) {
        let data = dir.join(format!("node{id}"));
        let data_s = data.to_string_lossy().to_string();
        // A directory from an earlier run is started again as it is.
        if let Ok(existing) = service::datadir::NodeFile::load(&data) {
            if let Some((_, port)) = existing.cluster_addr.rsplit_once(':') {
                taken.extend(port.parse::<u16>().ok());
            }
            let child = spawn_serve(&exe, &data, &dir.join(format!("node{id}.log")))?;
            children
                .0
                .push((id, data.clone(), existing.cluster_addr, child));
            continue;
        }
        let addr = format!("127.0.0.1:{}", free_port(&mut taken)?);
        if id == 1 {
            let out = run_step(
                &exe,
                &[
                    "init",
                    "--data",
                    &data_s,
                    "--node-id",
                    "1",
                    "--cluster-addr",
                    &addr,
                    "--partitions",
                    &partitions.to_string(),
                    "--replicas",
                    &replicas.to_string(),
                ],
            )?;
            token = out
                .lines()
                .find_map(|l| l.strip_prefix("join token: "))
                .context("init printed no token")?
                .to_string();
        } else {
            if token.is_empty() {
                token = read_token(&dir.join("node1"))?;
            }
            let seed = children.0[0].2.clone();
            let id_s = id.to_string();
            let mut args = vec![
                "join",
                "--data",
                &data_s,
                "--node-id",
                &id_s,
                "--cluster-addr",
                &addr,
                "--seed",
                &seed,
                "--token",
                &token,
            ];
            if Some(id) == witness_id {
                args.push("--witness");
            }
            run_step(&exe, &args)?;
        }
        let child = spawn_serve(&exe, &data, &dir.join(format!("node{id}.log")))?;
        children.0.push((id, data.clone(), addr, child));
        if id == 1 {
            let client = Client::open(&data, None)?;
            wait_ready(&client, 1, None).await?;
            client
                .request(ClientRequest::DomainAdd(DEMO_DOMAIN.into()))
                .await?;
            for (user, password) in DEMO_USERS {
                let quota = Quota::default();
                let request = ClientRequest::UserAdd {
                    address: user.into(),
                    password: password.into(),
                    quota,
                };
                client.request(request).await?;
            }
        }
    }
    let first = Client::open(&children.0[0].1, None)?;
    let status = wait_ready(&first, replicas as usize, witness_id).await?;
    print_ready(&children, &status, &dir, json, witness_id)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(children);
    Ok(())
}

fn print_ready(
    children: &Children,
    status: &ClusterStatus,
    dir: &Path,
    json: bool,
    witness: Option<u64>,
) -> anyhow::Result<()> {
    let role = |id: u64| {
        if Some(id) == witness {
            "witness"
        } else {
            "data"
        }
    };
    let listeners = |id: u64| {
        status
            .nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.listeners.clone())
            .unwrap_or_default()
    };
    if json {
        let nodes: Vec<_> = children
            .0
            .iter()
            .map(|(id, data, addr, child)| {
                serde_json::json!({ "id": id, "pid": child.id(), "data": data, "cluster": addr,
                    "role": role(*id), "listeners": listeners(*id) })
            })
            .collect();
        let users: Vec<_> = DEMO_USERS
            .iter()
            .map(|(u, p)| serde_json::json!({ "address": u, "password": p }))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "dir": dir, "domain": DEMO_DOMAIN, "nodes": nodes, "users": users })
        );
    } else {
        println!(
            "mailgrid dev cluster ready: {} nodes in {}",
            children.0.len(),
            dir.display()
        );
        for (id, data, addr, child) in &children.0 {
            let what = if Some(*id) == witness {
                " (witness: no mail, no mail listeners)"
            } else {
                ""
            };
            println!(
                "  node {id}{what}: pid {} cluster {addr} data {}",
                child.id(),
                data.display()
            );
            let l: Vec<String> = listeners(*id)
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            println!("    {}", l.join(", "));
        }
        println!("demo domain {DEMO_DOMAIN}; users:");
        for (u, p) in DEMO_USERS {
            println!("  {u} / {p}");
        }
        let d = children.0[0].1.display();
        println!("try: echo 'Subject: hi' | mailgrid deliver --data {d} --to alice@example.test");
        println!("     mailgrid admin --data {d} fetch alice@example.test");
        println!("     mailgrid status --data {d}");
        println!("press Ctrl-C to stop the cluster");
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    Ok(())
}
