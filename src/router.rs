//! Address → partition → leader. Proposals and linearizable reads for any group, run here
//! when this node leads the group and forwarded to the leader otherwise, so any node can
//! serve any user.

use std::sync::Arc;
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
}

enum Attempt<T> {
    Done(T),
    Retry(Option<(u64, String)>),
}

impl Router {
    pub fn new(host: Arc<RaftHost>) -> Router {
        Router { host }
    }

    pub fn host(&self) -> &Arc<RaftHost> {
        &self.host
    }

    pub fn group_of(&self, address: &str) -> GroupId {
        partition_group(partition_of(address, self.host.config().partitions))
    }

    /// Nodes worth asking about a group when no leader is known: its placement, then all.
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
        let mut out: Vec<(u64, String)> = placed
            .iter()
            .filter_map(|id| {
                nodes
                    .iter()
                    .find(|n| n.id == *id)
                    .map(|n| (n.id, n.cluster_addr.clone()))
            })
            .collect();
        for n in nodes {
            if !out.iter().any(|(id, _)| *id == n.id) {
                out.push((n.id, n.cluster_addr.clone()));
            }
        }
        out
    }

    async fn forward<T: serde::de::DeserializeOwned>(
        &self,
        node: u64,
        addr: &str,
        request: &ServiceRequest,
    ) -> Result<T, GroupError> {
        let timeout = self.host.config().write_timeout + FORWARD_SLACK;
        let bytes = codec::encode(request);
        let unavailable = |reason: String| GroupError::Unavailable { group: 0, reason };
        let response = self
            .host
            .transport()
            .call(
                Peer::Node(node),
                addr,
                &codec::encode(&raft_service(bytes)),
                None,
                timeout,
            )
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        codec::decode(&response)
            .map_err(|e| unavailable(format!("bad answer from node {node}: {e}")))
    }

    /// Runs `local` here or `request` on the leader, following leader hints and retrying
    /// through elections until `deadline`.
    async fn route<T, F, Fut>(
        &self,
        group: GroupId,
        request: ServiceRequest,
        local: F,
    ) -> Result<T, GroupError>
    where
        T: serde::de::DeserializeOwned,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, GroupError>>,
    {
        let deadline =
            tokio::time::Instant::now() + self.host.config().write_timeout + FORWARD_SLACK;
        let me = self.host.id();
        let mut hint: Option<(u64, String)> = None;
        let mut round = 0usize;
        loop {
            let target = hint.take().or_else(|| self.host.leader_of(group));
            let attempt = match target {
                Some((id, _)) if id == me => Self::classify(local().await)?,
                Some((id, addr)) => Self::classify(
                    self.forward::<Result<T, GroupError>>(id, &addr, &request)
                        .await
                        .and_then(|r| r),
                )?,
                None => {
                    // No leader known here: ask the replicas in turn for a hint.
                    let candidates = self.candidates(group);
                    let Some((id, addr)) = candidates.get(round % candidates.len().max(1)).cloned()
                    else {
                        return Err(GroupError::Unavailable {
                            group,
                            reason: "no nodes known".into(),
                        });
                    };
                    round += 1;
                    if id == me {
                        Self::classify(local().await)?
                    } else {
                        Self::classify(
                            self.forward::<Result<T, GroupError>>(id, &addr, &request)
                                .await
                                .and_then(|r| r),
                        )?
                    }
                }
            };
            match attempt {
                Attempt::Done(v) => return Ok(v),
                Attempt::Retry(next) => {
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
        }
    }

    fn classify<T>(r: Result<T, GroupError>) -> Result<Attempt<T>, GroupError> {
        match r {
            Ok(v) => Ok(Attempt::Done(v)),
            Err(GroupError::NotLeader { leader, .. }) => Ok(Attempt::Retry(leader)),
            Err(GroupError::Unavailable { .. }) => Ok(Attempt::Retry(None)),
            Err(e) => Err(e),
        }
    }

    /// Proposes `cmd` to `group`; returns once committed by a majority and applied.
    pub async fn write(&self, group: GroupId, cmd: Command) -> Result<Response, GroupError> {
        let request = ServiceRequest::PeerWrite {
            group,
            cmd: cmd.clone(),
        };
        self.route(group, request, || self.host.write(group, cmd.clone()))
            .await
    }

    /// A linearizable read of `group`.
    pub async fn read(&self, group: GroupId, query: Query) -> Result<QueryResult, GroupError> {
        let request = ServiceRequest::PeerRead {
            group,
            query: query.clone(),
        };
        self.route(group, request, || self.read_local(group, query.clone()))
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

/// Wraps service bytes as the raft crate's service request.
pub fn raft_service(bytes: Vec<u8>) -> raft::network::Request {
    raft::network::Request::Service(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

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
