//! Raft RPCs between nodes: the wire messages, the client side each group's core uses, and
//! the decoding of incoming calls. Every message names its group, so all groups share one
//! connection per peer.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::errors::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::SnapshotOf;
use openraft::OptionalSend;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use storage::codec;

use crate::store::SnapshotFile;
use crate::transport::{Peer, Transport};
use crate::types::*;

/// Everything one node may ask another.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Append {
        group: GroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
    },
    Vote {
        group: GroupId,
        rpc: VoteRequest<TypeConfig>,
    },
    /// Followed on the stream by the snapshot file's bytes.
    Snapshot {
        group: GroupId,
        vote: Vote,
        meta: SnapshotMeta,
    },
    TransferLeader {
        group: GroupId,
        rpc: TransferLeaderRequest<TypeConfig>,
    },
    /// An application request, passed to the node's service handler as bytes.
    Service(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Node liveness: answered with the receiver's own beat.
    Beat(crate::liveness::Beat),
    PreVote {
        group: GroupId,
        rpc: VoteRequest<TypeConfig>,
    },
    /// The receiver's view of every group it hosts (`Vec<GroupStatus>`): how the rebalancer
    /// learns where each move stands.
    Groups,
    /// For every group the receiver leads, the log index every data voter holds
    /// (`Vec<DataProgress>`): how a witness learns which entries it may purge.
    Progress,
    /// Whether the receiver's disk is full (`Option<u64>`: its free bytes when it is): the
    /// rebalancer places no new replica there.
    DiskLow,
}

/// What a group's leader knows of its data voters' logs (the answer to `Request::Progress`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataProgress {
    pub group: GroupId,
    /// The leader's term.
    pub term: u64,
    /// The highest log index every data (non-witness) voter holds durably.
    pub held_by_all: u64,
}

/// The nodes known to be witnesses (from the meta state), shared by a node's groups.
pub type Witnesses = Arc<std::sync::RwLock<std::collections::BTreeSet<NodeId>>>;

/// The answer to a raft request: the group's reply, or why it could not be given.
pub type Reply<T> = Result<T, String>;

/// Slowest we let a snapshot transfer be, whatever openraft's option says.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// The rate an append's bytes are given time for on top of openraft's time-to-live: sent,
/// decoded, written and fsynced by a follower on a busy machine. Deliberately pessimistic.
const APPEND_BYTES_PER_SEC: f64 = 2e6;

/// What an append carrying entries gets on top of that: the follower may still be writing the
/// append before it (or one whose caller gave up) when this one arrives.
const APPEND_QUEUE_ALLOWANCE: Duration = Duration::from_secs(1);

/// How long an append may take. openraft gives every append one heartbeat interval, which a
/// batch of large messages (up to `max_payload_entries` of them, each up to the message size
/// limit) cannot meet on a loaded machine: the call timed out and was sent again whole while
/// the follower was still writing the first copy, the copies queued behind each other, every
/// one timed out, and the group stopped committing — the collapse of 100 KiB deliveries past
/// saturation, and 451s for 1 MB ones. Followers that died are found by the liveness beats,
/// not by this timeout, so giving appends the time their bytes need costs nothing. A
/// heartbeat (no entries) keeps openraft's time-to-live.
fn append_timeout(ttl: Duration, entries: bool, bytes: usize) -> Duration {
    if !entries {
        return ttl;
    }
    ttl + APPEND_QUEUE_ALLOWANCE + Duration::from_secs_f64(bytes as f64 / APPEND_BYTES_PER_SEC)
}

#[derive(Clone)]
pub struct NetworkFactory {
    pub transport: Arc<Transport>,
    pub group: GroupId,
    /// Whether this node is a witness (it never sends a partition snapshot: it has no data).
    pub witness: bool,
    pub witnesses: Witnesses,
}

pub struct Connection {
    transport: Arc<Transport>,
    group: GroupId,
    target: NodeId,
    addr: String,
    witness: bool,
    witnesses: Witnesses,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> Connection {
        Connection {
            transport: self.transport.clone(),
            group: self.group,
            target,
            addr: node.addr.clone(),
            witness: self.witness,
            witnesses: self.witnesses.clone(),
        }
    }
}

fn unreachable(e: impl std::fmt::Display) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::from_string(e.to_string()))
}

impl Connection {
    async fn call<T: DeserializeOwned>(
        &self,
        request: &Request,
        body: Option<&std::path::Path>,
        timeout: Duration,
    ) -> Result<T, RPCError<TypeConfig>> {
        self.call_encoded(codec::encode(request), body, timeout)
            .await
    }

    async fn call_encoded<T: DeserializeOwned>(
        &self,
        bytes: Vec<u8>,
        body: Option<&std::path::Path>,
        timeout: Duration,
    ) -> Result<T, RPCError<TypeConfig>> {
        let response = self
            .transport
            .call(Peer::Node(self.target), &self.addr, &bytes, body, timeout)
            .await
            .map_err(unreachable)?;
        let reply: Reply<T> = codec::decode(&response).map_err(unreachable)?;
        reply.map_err(unreachable)
    }
}

impl RaftNetworkV2<TypeConfig> for Connection {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let entries = !rpc.entries.is_empty();
        let bytes = codec::encode(&Request::Append {
            group: self.group,
            rpc,
        });
        let timeout = append_timeout(option.hard_ttl(), entries, bytes.len());
        self.call_encoded(bytes, None, timeout).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(
            &Request::Vote {
                group: self.group,
                rpc,
            },
            None,
            option.hard_ttl(),
        )
        .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(
            &Request::PreVote {
                group: self.group,
                rpc,
            },
            None,
            option.hard_ttl(),
        )
        .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        if self.group != META_GROUP && self.witness {
            // A witness's partition snapshot holds no mail: installed on a data node it would
            // wipe the replica. The caller retries; a data leader takes over meanwhile.
            return Err(unreachable("a witness has no partition data to send").into());
        }
        let request = Request::Snapshot {
            group: self.group,
            vote,
            meta: snapshot.meta.clone(),
        };
        // A witness keeps no partition data, so it gets the applied state alone.
        let to_witness = self.group != META_GROUP
            && self
                .witnesses
                .read()
                .expect("witnesses lock")
                .contains(&self.target);
        let stub = to_witness.then(|| {
            let dir = snapshot
                .snapshot
                .path
                .parent()
                .unwrap_or(std::path::Path::new("."));
            dir.join(format!("witness-{}.part", rand::random::<u64>()))
        });
        if let Some(stub) = &stub {
            if let Err(e) = crate::store::write_state_only(&snapshot.meta, stub) {
                let _ = std::fs::remove_file(stub);
                return Err(unreachable(e).into());
            }
        }
        let body = stub.as_deref().unwrap_or(&snapshot.snapshot.path);
        let send =
            self.call::<SnapshotResponse<TypeConfig>>(&request, Some(body), SNAPSHOT_TIMEOUT);
        let result = tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = send => result.map_err(StreamingError::from),
        };
        if let Some(stub) = &stub {
            let _ = std::fs::remove_file(stub);
        }
        result
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        if crate::failpoint::fire("transfer-lost", self.group) {
            return Err(unreachable(
                "failpoint transfer-lost: the request was dropped",
            ));
        }
        self.call(
            &Request::TransferLeader {
                group: self.group,
                rpc,
            },
            None,
            option.hard_ttl(),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_get_time_for_their_bytes() {
        let ttl = Duration::from_millis(200);
        // A heartbeat (no entries) keeps openraft's time-to-live.
        assert_eq!(append_timeout(ttl, false, 200), ttl);
        // One small entry may wait for the follower's previous write.
        assert!(append_timeout(ttl, true, 4096) > Duration::from_secs(1));
        // 64 entries of 1 MiB get many seconds, not 200 ms.
        let big = append_timeout(ttl, true, 64 << 20);
        assert!(big > Duration::from_secs(30), "{big:?}");
    }
}
