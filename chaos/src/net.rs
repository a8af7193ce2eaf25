//! How the nodes reach each other, and how the nemesis cuts them apart.
//!
//! As root with `ip` and `nft`, every node lives in its own network namespace on a bridge with
//! its own address, and a partition is real packet drops: an nft set of blocked peer addresses
//! in each namespace. Otherwise every node binds a loopback port of its own and advertises the
//! port of a UDP proxy in this process (`mailgrid join --bind`), and the proxy drops the
//! datagrams between nodes that may not talk. Clients (the workload, the checker) always reach
//! every node, as in Jepsen: a partition is between nodes.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context};
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// A relay path without datagrams for this long is dropped.
const RELAY_IDLE: std::time::Duration = std::time::Duration::from_secs(120);

/// One node's place in the network. A slot outlives the node ids that occupy it (a wiped
/// node rejoins under a new id in the same slot).
#[derive(Clone, Debug)]
pub struct Slot {
    /// The host the node's client listeners bind.
    pub host: String,
    /// The address other nodes (and commands) reach the node on.
    pub cluster_addr: String,
    /// The address the node's cluster socket binds, when it differs.
    pub bind: Option<String>,
    /// Run every command of this node through this prefix (`ip netns exec NS`).
    pub prefix: Vec<String>,
}

impl Slot {
    pub fn command(&self, bin: &std::path::Path) -> Command {
        match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        }
    }
}

/// Which directed pairs of slots may not exchange packets.
pub type Blocked = BTreeSet<(usize, usize)>;

pub enum Net {
    Namespaces(Namespaces),
    Proxy(Proxy),
}

/// Which network to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// Namespaces when run as root with `ip` and `nft`, else the proxy.
    Auto,
    Namespaces,
    Proxy,
}

impl Net {
    /// The network `choice` asks for; for `Auto`, namespaces where they can be made, else the
    /// proxy. Says which and why.
    pub async fn start(slots: usize, choice: Choice) -> anyhow::Result<Net> {
        let available = match choice {
            Choice::Proxy => Err("the proxy was asked for".to_string()),
            Choice::Namespaces => {
                Namespaces::available()
                    .map_err(|why| anyhow::anyhow!("--net namespaces: {why}"))?;
                Ok(())
            }
            Choice::Auto => Namespaces::available(),
        };
        let why = match available {
            Ok(()) => match Namespaces::create(slots) {
                Ok(ns) => {
                    eprintln!(
                        "chaos: network: a namespace per node on bridge {} ({}.0/24); partitions drop packets with nft",
                        ns.bridge, ns.prefix
                    );
                    return Ok(Net::Namespaces(ns));
                }
                Err(e) if choice == Choice::Namespaces => return Err(e),
                Err(e) => format!("{e:#}"),
            },
            Err(why) => why,
        };
        eprintln!(
            "chaos: network: {why}; falling back to loopback ports and a UDP proxy in this process that drops datagrams between partitioned nodes"
        );
        Ok(Net::Proxy(Proxy::start(slots).await?))
    }

    pub fn slots(&self) -> &[Slot] {
        match self {
            Net::Namespaces(n) => &n.slots,
            Net::Proxy(p) => &p.slots,
        }
    }

    /// Blocks exactly `blocked` (healing every other pair).
    pub fn cut(&self, blocked: &Blocked) -> anyhow::Result<()> {
        match self {
            Net::Namespaces(n) => n.cut(blocked),
            Net::Proxy(p) => {
                *p.blocked.write().expect("blocked lock") = blocked.clone();
                Ok(())
            }
        }
    }

    pub fn heal(&self) -> anyhow::Result<()> {
        self.cut(&Blocked::new())
    }
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> anyhow::Result<()> {
    use std::io::Write;
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {shown}"))?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub struct Namespaces {
    /// Names start with this (unique per run): namespaces `TAG-N`, bridge `TAGbr`.
    tag: String,
    bridge: String,
    /// The first three octets of the subnet.
    prefix: String,
    slots: Vec<Slot>,
    ips: Vec<String>,
}

/// The cluster port of every node (each has its own address).
const NS_CLUSTER_PORT: u16 = 7400;

impl Namespaces {
    fn available() -> Result<(), String> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let root = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0");
        if !root {
            return Err("not running as root, so no network namespaces".into());
        }
        for tool in [["ip", "-V"], ["nft", "--version"]] {
            let ok = Command::new(tool[0])
                .arg(tool[1])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                return Err(format!(
                    "`{}` is not installed (apt-get install iproute2 nftables)",
                    tool[0]
                ));
            }
        }
        Ok(())
    }

    fn create(slots: usize) -> anyhow::Result<Namespaces> {
        let pid = std::process::id();
        let tag = format!("mgc{}", pid % 100_000);
        let prefix = format!("10.213.{}", pid % 250 + 1);
        let mut ns = Namespaces {
            bridge: format!("{tag}br"),
            tag,
            prefix,
            slots: Vec::new(),
            ips: Vec::new(),
        };
        // Dropped on error too, which removes whatever was made.
        ns.setup(slots).with_context(|| {
            "setting up network namespaces (run as root, or as a user to use the proxy)"
        })?;
        Ok(ns)
    }

    fn setup(&mut self, slots: usize) -> anyhow::Result<()> {
        let ip = |args: &[&str]| run(Command::new("ip").args(args), None);
        let br = self.bridge.clone();
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}.1/24", self.prefix), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        for i in 0..slots {
            let name = format!("{}-{i}", self.tag);
            let veth = format!("{}v{i}", self.tag);
            let addr = format!("{}.{}", self.prefix, 10 + i);
            ip(&["netns", "add", &name])?;
            self.slots.push(Slot {
                host: addr.clone(),
                cluster_addr: format!("{addr}:{NS_CLUSTER_PORT}"),
                bind: None,
                prefix: vec!["ip".into(), "netns".into(), "exec".into(), name.clone()],
            });
            self.ips.push(addr.clone());
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &name,
            ])?;
            ip(&["link", "set", &veth, "master", &br, "up"])?;
            let inside = |args: &[&str]| {
                run(
                    Command::new("ip")
                        .args(["netns", "exec", &name, "ip"])
                        .args(args),
                    None,
                )
            };
            inside(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            inside(&["link", "set", "eth0", "up"])?;
            inside(&["link", "set", "lo", "up"])?;
            run(
                Command::new("ip").args(["netns", "exec", &name, "nft", "-f", "-"]),
                Some(
                    "table inet chaos {\n\
                     set blocked { type ipv4_addr; }\n\
                     chain input { type filter hook input priority 0; policy accept; ip saddr @blocked drop; }\n\
                     chain output { type filter hook output priority 0; policy accept; ip daddr @blocked drop; }\n\
                     }\n",
                ),
            )?;
        }
        Ok(())
    }

    fn cut(&self, blocked: &Blocked) -> anyhow::Result<()> {
        for (i, slot) in self.slots.iter().enumerate() {
            let peers: BTreeSet<&str> = blocked
                .iter()
                .filter_map(|&(a, b)| {
                    if a == i {
                        Some(self.ips[b].as_str())
                    } else if b == i {
                        Some(self.ips[a].as_str())
                    } else {
                        None
                    }
                })
                .collect();
            let mut script = String::from("flush set inet chaos blocked\n");
            if !peers.is_empty() {
                let list: Vec<&str> = peers.into_iter().collect();
                script.push_str(&format!(
                    "add element inet chaos blocked {{ {} }}\n",
                    list.join(", ")
                ));
            }
            let mut cmd = Command::new(&slot.prefix[0]);
            cmd.args(&slot.prefix[1..]).args(["nft", "-f", "-"]);
            run(&mut cmd, Some(&script))?;
        }
        Ok(())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        for slot in &self.slots {
            // Deleting the namespace deletes its end of the veth pair, and so both ends.
            quiet(&["netns", "del", &slot.prefix[3]]);
        }
        quiet(&["link", "del", &self.bridge]);
    }
}

/// A UDP relay per node: node `j` binds a loopback port of its own and advertises the relay's,
/// so every datagram between nodes passes through here and can be dropped.
pub struct Proxy {
    slots: Vec<Slot>,
    blocked: Arc<RwLock<Blocked>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Proxy {
    async fn start(slots: usize) -> anyhow::Result<Proxy> {
        let mut binds = Vec::new();
        let mut fronts = Vec::new();
        // Each node binds a loopback address of its own (all of 127/8 is loopback), so no
        // socket of this process can take its port first, and its datagrams say who sent them.
        let pid = std::process::id();
        let net = format!("127.{}.{}", 100 + pid % 100, pid / 100 % 250);
        for i in 0..slots {
            let bind: SocketAddr = format!("{net}.{}:{NS_CLUSTER_PORT}", 10 + i).parse()?;
            binds.push(bind);
            fronts.push(Arc::new(UdpSocket::bind("127.0.0.1:0").await?));
        }
        let blocked = Arc::new(RwLock::new(Blocked::new()));
        let mut tasks = Vec::new();
        let mut out = Vec::new();
        for (j, front) in fronts.iter().enumerate() {
            out.push(Slot {
                host: "127.0.0.1".into(),
                cluster_addr: front.local_addr()?.to_string(),
                bind: Some(binds[j].to_string()),
                prefix: Vec::new(),
            });
            tasks.push(tokio::spawn(relay(
                j,
                front.clone(),
                binds.clone(),
                blocked.clone(),
            )));
        }
        Ok(Proxy {
            slots: out,
            blocked,
            tasks,
        })
    }
}

/// Relays datagrams sent to node `to`'s advertised port: one upstream socket per sender, so
/// the node's replies come back here and go out to that sender from the advertised port.
async fn relay(
    to: usize,
    front: Arc<UdpSocket>,
    binds: Vec<SocketAddr>,
    blocked: Arc<RwLock<Blocked>>,
) {
    let target = binds[to];
    let mut upstream: HashMap<SocketAddr, (Arc<UdpSocket>, Instant)> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, from)) = front.recv_from(&mut buf).await else {
            continue;
        };
        // A sender that is no node's socket is a client: never cut off.
        let sender = binds.iter().position(|b| *b == from);
        let is_cut =
            |from: usize, to: usize| blocked.read().expect("blocked lock").contains(&(from, to));
        if sender.is_some_and(|s| is_cut(s, to)) {
            continue;
        }
        let now = Instant::now();
        let socket = match upstream.get_mut(&from) {
            Some((s, used)) => {
                *used = now;
                s.clone()
            }
            None => {
                // Senders gone quiet (commands come from a new port each time) are forgotten.
                upstream.retain(|_, (_, used)| now.duration_since(*used) < RELAY_IDLE);
                let Ok(s) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if s.connect(target).await.is_err() {
                    continue;
                }
                let s = Arc::new(s);
                upstream.insert(from, (s.clone(), now));
                let (back, front, blocked) = (s.clone(), front.clone(), blocked.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    loop {
                        let n = match tokio::time::timeout(RELAY_IDLE, back.recv(&mut buf)).await {
                            Err(_) => break,
                            // Port unreachable while the node is not up yet (or restarting):
                            // the path stays, and the node answers once it is back.
                            Ok(Err(_)) => continue,
                            Ok(Ok(n)) => n,
                        };
                        let cut = sender.is_some_and(|s| {
                            blocked.read().expect("blocked lock").contains(&(to, s))
                        });
                        if !cut {
                            let _ = front.send_to(&buf[..n], from).await;
                        }
                    }
                });
                s
            }
        };
        let _ = socket.send(&buf[..n]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
        let mut buf = [0u8; 64];
        let (n, from) =
            tokio::time::timeout(std::time::Duration::from_secs(10), s.recv_from(&mut buf))
                .await
                .expect("a datagram within 10 s")
                .unwrap();
        (buf[..n].to_vec(), from)
    }

    #[tokio::test]
    async fn the_proxy_relays_between_nodes_until_they_are_cut_apart() {
        // Goal: datagrams from node 0 reach node 1 through node 1's advertised port, replies
        // come back from it; once the pair is cut nothing passes, and after healing it does.
        let net = Net::start(2, Choice::Proxy).await.unwrap();
        let slots = net.slots().to_vec();
        let a = UdpSocket::bind(slots[0].bind.clone().unwrap())
            .await
            .unwrap();
        let b = UdpSocket::bind(slots[1].bind.clone().unwrap())
            .await
            .unwrap();
        let to_b = slots[1].cluster_addr.clone();
        a.send_to(b"ping", &to_b).await.unwrap();
        let (got, from) = recv(&b).await;
        assert_eq!(got, b"ping");
        b.send_to(b"pong", from).await.unwrap();
        let (got, from) = recv(&a).await;
        assert_eq!(got, b"pong");
        assert_eq!(
            from.to_string(),
            to_b,
            "replies come from the advertised port"
        );

        net.cut(&Blocked::from([(0, 1), (1, 0)])).unwrap();
        a.send_to(b"dropped", &to_b).await.unwrap();
        // A client is never cut off, and the relay handles one datagram at a time: once the
        // client's marker is through, the node's datagram before it was judged.
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"marker", &to_b).await.unwrap();
        let (got, _) = recv(&b).await;
        assert_eq!(got, b"marker", "the datagram sent while cut was dropped");
        let mut buf = [0u8; 16];
        assert!(b.try_recv_from(&mut buf).is_err(), "nothing else arrived");
        net.heal().unwrap();
        a.send_to(b"after", &to_b).await.unwrap();
        let (got, _) = recv(&b).await;
        assert_eq!(got, b"after");
    }
}
