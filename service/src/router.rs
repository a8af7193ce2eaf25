//! Address → partition → leader. Proposals and linearizable reads for any group, run here
//! when this node leads the group and forwarded to the leader otherwise, so any node can
//! serve any user.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use raft::host::{GroupError, RaftHost};
use raft::transport::Peer;
use raft::{partition_group, GroupId, META_GROUP};
use storage::codec;
use storage::{Command, Response};

use crate::api::{Query, QueryResult, ServiceRequest};
use crate::query;

/// Pause between attempts while a group has no known leader (an election is under way).
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// How long a forwarded call may take on top of the group's own write timeout.
const FORWARD_SLACK: Duration = Duration::from_secs(2);
/// How long one attempt at an idempotent request may wait for its answer before it is tried
/// again (a leader that died with the request in flight never answers): a commit normally
/// takes milliseconds, plus time to move a large body.
const IDEMPOTENT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
const IDEMPOTENT_ATTEMPT_BYTES_PER_SECOND: u64 = 8 * 1024 * 1024;
/// How long a node that failed an attempt is passed over while it still looks like the leader.
const SUSPECT_FOR: Duration = Duration::from_secs(3);

/// The partition an address belongs to: blake3 of the lowercased address, modulo P.
/// Pinned forever: changing it would move every user.
pub fn partition_of(address: &str, partitions: u32) -> u32 {
    let hash = blake3::hash(address.to_ascii_lowercase().as_bytes());
    let n = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
    (n % partitions as u64) as u32
}

#[derive(Clone, Debug)]
pub struct Router {
    host: Arc<RaftHost>,
    /// Where each group was last led, as answers showed it. A node holding no replica of a
    /// group (most of them, once there are more nodes than replicas) has no raft view of
    /// it; without this it would look the placement up and ask a replica, often the wrong
    /// one, for every request.
    leaders: Arc<RwLock<HashMap<GroupId, (u64, String)>>>,
    /// Idempotent proposals this node is making, by a hash of (group, command), each with the
    /// channel its outcome will be sent on (see [`Router::write_local`]).
    in_flight: Arc<std::sync::Mutex<HashMap<[u8; 32], Outcome>>>,
}

type Outcome = tokio::sync::watch::Receiver<Option<Result<Response, GroupError>>>;

/// Deliveries, `Once` commands and queue entries: a repeat of one of these is a no-op, so the
/// router resends them through failures of unknown outcome.
fn idempotent(cmd: &Command) -> bool {
    use storage::partition::PartitionCommand as P;
    matches!(
        cmd,
        Command::Partition(P::Deliver { .. } | P::Once { .. } | P::Enqueue { .. })
    )
}

impl Router {
    pub fn new(host: Arc<RaftHost>) -> Router {
        Router {
            host,
            leaders: Arc::default(),
            in_flight: Arc::default(),
        }
    }

    /// This node's raft view of the group's leader when it holds a replica, else the leader
    /// answers last named.
    fn believed_leader(&self, group: GroupId) -> Option<(u64, String)> {
        self.host.leader_of(group).or_else(|| {
            let leaders = self.leaders.read().expect("leaders lock");
            leaders.get(&group).cloned()
        })
    }

    fn learn_leader(&self, group: GroupId, leader: Option<(u64, String)>) {
        let mut leaders = self.leaders.write().expect("leaders lock");
        match leader {
            Some(l) if l.0 != self.host.id() => {
                leaders.insert(group, l);
            }
            _ => {
                leaders.remove(&group);
            }
        }
    }

    /// Forgets `node` as the group's leader after it failed an attempt.
    fn forget_leader(&self, group: GroupId, node: u64) {
        let mut leaders = self.leaders.write().expect("leaders lock");
        if leaders.get(&group).is_some_and(|l| l.0 == node) {
            leaders.remove(&group);
        }
    }

    pub fn host(&self) -> &Arc<RaftHost> {
        &self.host
    }

    pub fn group_of(&self, address: &str) -> GroupId {
        partition_group(partition_of(address, self.host.config().partitions))
    }

    /// Nodes worth asking about a group when no leader is known, in the order to ask them
    /// (see [`ask_order`]).
    fn candidates(&self, group: GroupId) -> Vec<(u64, String)> {
        let meta = self.host.meta();
        let (nodes, partitions) = meta
            .read_meta(|m| Ok::<_, storage::StorageError>((m.nodes()?, m.partitions()?)))
            .unwrap_or_default();
        let placed: Vec<u64> = partitions
            .iter()
            .find(|p| partition_group(p.id) == group)
            .map(|p| p.replicas.clone())
            .unwrap_or_default();
        let nodes: Vec<(u64, String)> = nodes.into_iter().map(|n| (n.id, n.cluster_addr)).collect();
        ask_order(self.host.id(), &placed, &nodes)
    }

    /// Sends `request` to `node`. A request that may have arrived but got no answer is
    /// `Uncertain`; one that certainly did not arrive is `Unavailable` (safe to resend).
    async fn forward<T: serde::de::DeserializeOwned>(
        &self,
        group: GroupId,
        node: u64,
        addr: &str,
        request: &ServiceRequest,
        timeout: Duration,
    ) -> Result<T, GroupError> {
        let bytes = codec::encode(&raft_service(codec::encode(request)));
        let response = self
            .host
            .transport()
            .call(Peer::Node(node), addr, &bytes, None, timeout)
            .await
            .map_err(|e| {
                let reason = format!("node {node}: {e}");
                if e.is_unsent() {
                    GroupError::Unavailable { group, reason }
                } else {
                    GroupError::Uncertain { group, reason }
                }
            })?;
        codec::decode(&response).map_err(|e| GroupError::Uncertain {
            group,
            reason: format!("bad answer from node {node}: {e}"),
        })
    }

    /// One attempt on `target`: locally when it is this node, else forwarded.
    async fn attempt<T, F, Fut>(
        &self,
        group: GroupId,
        target: (u64, String),
        request: &ServiceRequest,
        timeout: Duration,
        local: &F,
    ) -> Result<T, GroupError>
    where
        T: serde::de::DeserializeOwned,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, GroupError>>,
    {
        if target.0 == self.host.id() {
            return local().await;
        }
        self.forward::<Result<T, GroupError>>(group, target.0, &target.1, request, timeout)
            .await
            .and_then(|r| r)
    }

    /// Runs `local` here or `request` on the leader, following leader hints and retrying
    /// through elections until a deadline. An `idempotent` request is also retried when an
    /// attempt's outcome is unknown; any other request reports that to its caller.
    async fn route<T, F, Fut>(
        &self,
        group: GroupId,
        request: ServiceRequest,
        idempotent: bool,
        local: F,
    ) -> Result<T, GroupError>
    where
        T: serde::de::DeserializeOwned,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, GroupError>>,
    {
        let write_timeout = self.host.config().write_timeout;
        let deadline = tokio::time::Instant::now() + write_timeout + FORWARD_SLACK;
        let mut attempt_timeout = if idempotent {
            let size = codec::encode(&request).len() as u64;
            IDEMPOTENT_ATTEMPT_TIMEOUT
                + Duration::from_secs(size / IDEMPOTENT_ATTEMPT_BYTES_PER_SECOND)
        } else {
            write_timeout + FORWARD_SLACK
        };
        let mut hint: Option<(u64, String)> = None;
        let mut round = 0usize;
        // A node that just failed us is not asked again until our view of the group moves
        // on (a dead leader stays "leader" here until the election ends) or a while passes.
        let mut failed: Option<(u64, tokio::time::Instant)> = None;
        loop {
            let believed = self.believed_leader(group);
            if hint.is_none() {
                if let (Some((bad, since)), Some((id, _))) = (failed, &believed) {
                    let waiting = since.elapsed() < SUSPECT_FOR;
                    if bad == *id && waiting && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(RETRY_PAUSE).await;
                        continue;
                    }
                }
            }
            let target = match hint.take().or(believed) {
                Some(t) => t,
                None => {
                    // No leader known here: ask the replicas in turn; they answer with a hint.
                    let candidates = self.candidates(group);
                    if candidates.is_empty() {
                        return Err(GroupError::Unavailable {
                            group,
                            reason: "no nodes known".into(),
                        });
                    }
                    let next = candidates[round % candidates.len()].clone();
                    round += 1;
                    next
                }
            };
            let target_id = target.0;
            let result = self
                .attempt(group, target.clone(), &request, attempt_timeout, &local)
                .await;
            if let Err(e) = &result {
                tracing::debug!(group, node = target_id, "attempt failed: {e}");
            }
            let next = match result {
                Ok(v) => {
                    if target_id != self.host.id() {
                        self.learn_leader(group, Some(target));
                    }
                    return Ok(v);
                }
                Err(GroupError::NotLeader { leader, .. }) => {
                    self.learn_leader(group, leader.clone());
                    leader
                }
                Err(GroupError::Unavailable { .. }) => {
                    self.forget_leader(group, target_id);
                    failed = Some((target_id, tokio::time::Instant::now()));
                    None
                }
                Err(GroupError::Uncertain { .. })
                    if idempotent && self.host.peer_alive(target_id) =>
                {
                    // Slow, not dead: a loaded leader. Ask it again and give it until the
                    // deadline; it joins the resend to the proposal it is still making
                    // (`write_local`), so waiting costs nothing. Treating it as dead sent
                    // deliveries hunting for another leader until their deadline passed.
                    attempt_timeout = deadline
                        .saturating_duration_since(tokio::time::Instant::now())
                        .max(RETRY_PAUSE);
                    Some(target)
                }
                Err(GroupError::Uncertain { .. }) if idempotent => {
                    self.forget_leader(group, target_id);
                    failed = Some((target_id, tokio::time::Instant::now()));
                    None
                }
                // The leader is fine but has no room for new mail: say so at once (no other
                // node could take this proposal; the leader hands the group to a voter with
                // room, and the sender's retry goes there).
                Err(e @ GroupError::DiskFull { .. }) => return Err(e),
                Err(e) => {
                    self.forget_leader(group, target_id);
                    return Err(e);
                }
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(GroupError::Unavailable {
                    group,
                    reason: "no leader reachable".into(),
                });
            }
            if next.is_none() {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            hint = next;
        }
    }

    /// Proposes `cmd` to `group`; returns once committed by a majority and applied.
    /// Deliveries and `Once` commands are retried through failures of unknown outcome (their
    /// key makes a repeat a no-op); other commands report such a failure to the caller.
    pub async fn write(&self, group: GroupId, cmd: Command) -> Result<Response, GroupError> {
        let idempotent = idempotent(&cmd);
        let request = ServiceRequest::PeerWrite {
            group,
            cmd: cmd.clone(),
        };
        self.route(group, request, idempotent, || {
            self.write_local(group, cmd.clone())
        })
        .await
    }

    /// Proposes `cmd` on this node, which must lead the group. An idempotent command that is
    /// already being proposed here is not proposed again: the caller waits for the proposal
    /// in flight and gets its outcome. A forwarding node resends such a command when its
    /// answer is slow (the leader may have died), and under load the first copy is usually
    /// still on its way to a commit; proposing every resend made a loaded group replicate the
    /// same large message several times and fall further behind.
    pub async fn write_local(&self, group: GroupId, cmd: Command) -> Result<Response, GroupError> {
        if !idempotent(&cmd) {
            return self.host.write(group, cmd).await;
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&group.to_le_bytes());
        hasher.update(&codec::encode(&cmd));
        let key: [u8; 32] = hasher.finalize().into();
        let mut outcome = {
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            match in_flight.get(&key) {
                Some(outcome) => outcome.clone(),
                None => {
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    in_flight.insert(key, rx.clone());
                    let (host, in_flight) = (self.host.clone(), self.in_flight.clone());
                    // Its own task: the proposal goes on when the caller that started it gives
                    // up, so the caller's resend can still join it.
                    tokio::spawn(async move {
                        let result = host.write(group, cmd).await;
                        // Out of the map first: whoever holds the receiver gets this result,
                        // whoever comes later proposes anew.
                        in_flight.lock().expect("in-flight lock").remove(&key);
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        let result = match outcome.wait_for(Option::is_some).await {
            Ok(result) => result.clone().expect("waited for an outcome"),
            Err(_) => Err(GroupError::Uncertain {
                group,
                reason: "the proposal ended without an outcome".into(),
            }),
        };
        result
    }

    /// A linearizable read of `group`.
    pub async fn read(&self, group: GroupId, query: Query) -> Result<QueryResult, GroupError> {
        let request = ServiceRequest::PeerRead {
            group,
            query: query.clone(),
        };
        self.route(group, request, true, || {
            self.read_local(group, query.clone())
        })
        .await
    }

    /// Serves a read on this node, which must lead the group.
    pub async fn read_local(
        &self,
        group: GroupId,
        query: Query,
    ) -> Result<QueryResult, GroupError> {
        let machine = self.host.read(group).await?;
        let unavailable = |reason: String| GroupError::Unavailable { group, reason };
        tokio::task::spawn_blocking(move || query::run(&machine, &query))
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .map_err(|e| unavailable(e.to_string()))
    }

    pub async fn meta_write(
        &self,
        cmd: storage::meta::MetaCommand,
    ) -> Result<Response, GroupError> {
        self.write(META_GROUP, Command::Meta(cmd)).await
    }
}

/// Whom to ask about a group whose leader is unknown: its replicas first (any of them
/// leads or names the leader), then the other nodes (in case the placement read here is
/// stale), this node last. It only helps once the others failed: a node that holds a
/// replica and does not know the leader would not know it on a second look either, and one
/// that holds none never does. Asking a node that holds no replica first cost a retry
/// pause each: with one replica per partition, the first message of each partition
/// through a node without it waited 200 ms.
fn ask_order(me: u64, placed: &[u64], nodes: &[(u64, String)]) -> Vec<(u64, String)> {
    let mut out: Vec<(u64, String)> = placed
        .iter()
        .filter(|id| **id != me)
        .filter_map(|id| nodes.iter().find(|(n, _)| n == id).cloned())
        .collect();
    for (id, addr) in nodes {
        if *id != me && !out.iter().any(|(o, _)| o == id) {
            out.push((*id, addr.clone()));
        }
    }
    if let Some(myself) = nodes.iter().find(|(id, _)| *id == me) {
        out.push(myself.clone());
    }
    out
}

/// Wraps service bytes as the raft crate's service request.
pub fn raft_service(bytes: Vec<u8>) -> raft::network::Request {
    raft::network::Request::Service(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_without_a_known_leader_is_asked_of_its_replicas_first_and_this_node_last() {
        // Goal: the first node asked holds a replica (with one replica, the leader itself),
        // other nodes follow for a stale placement, and every known node is asked once.
        let nodes: Vec<(u64, String)> = (1..=5).map(|n| (n, format!("10.0.0.{n}:7"))).collect();
        let ids = |me, placed: &[u64]| -> Vec<u64> {
            ask_order(me, placed, &nodes)
                .iter()
                .map(|(id, _)| *id)
                .collect()
        };
        assert_eq!(ids(2, &[4]), vec![4, 1, 3, 5, 2]);
        assert_eq!(ids(2, &[3, 2, 5]), vec![3, 5, 1, 4, 2]);
        assert_eq!(ids(1, &[]), vec![2, 3, 4, 5, 1]);
        // A replica the node list does not know (yet) is skipped, not invented.
        assert_eq!(ids(1, &[9, 2]), vec![2, 3, 4, 5, 1]);
        assert_eq!(
            ask_order(1, &[1], &nodes[..1]),
            vec![(1, "10.0.0.1:7".into())]
        );
    }

    #[test]
    fn partition_is_pinned_and_case_insensitive() {
        // Goal: the user → partition mapping never changes between builds and ignores case.
        assert_eq!(
            partition_of("alice@example.test", 64),
            partition_of("Alice@Example.TEST", 64)
        );
        let spread: std::collections::BTreeSet<u32> = (0..1000)
            .map(|i| partition_of(&format!("user{i}@example.test"), 64))
            .collect();
        assert_eq!(spread.len(), 64);
        // Pinned value: if this changes, every deployed cluster would lose its users.
        let h = blake3::hash(b"alice@example.test");
        let expected = (u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap()) % 64) as u32;
        assert_eq!(partition_of("alice@example.test", 64), expected);
    }
}
