//! The raft groups of one node: opening and supervising them, serving peers' RPCs, proposing
//! and linearizable reads on local leaders, and the reconciler that moves each group's
//! membership toward the placement recorded in the meta state.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use openraft::async_runtime::WatchReceiver;
use openraft::{ChangeMembers, Config, ReadPolicy, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use storage::codec;
use storage::machine::GroupKind;
use storage::meta::{ClusterInfo, MetaCommand, NodeRecord, NodeSettings, PartitionRecord};
use storage::{Command, GroupLog, GroupMachine, Response, Store};

use crate::liveness::{self, Action, Beat, GroupView, Liveness, Memo, Timing};
use crate::network::{DataProgress, NetworkFactory, Reply, Request, Witnesses};
use crate::store::{LogStore, SnapshotFile, StateMachine};
use crate::transport::{Body, Handler, Transport, BODY_BYTES_MAX};
use crate::types::*;

/// One group's openraft core, over our state machine.
type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// Timing and sizing of the raft groups; validated once at start.
#[derive(Clone, Debug)]
pub struct HostConfig {
    pub id: NodeId,
    pub data_dir: PathBuf,
    pub partitions: u32,
    pub replicas: u32,
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Entries after which a group takes a snapshot and may purge its log.
    pub snapshot_logs: u64,
    /// How long a proposal may wait for its commit before the outcome is reported unknown.
    pub write_timeout: Duration,
    /// Replica moves of a rebalance that may involve one node (as receiver or giver) at once.
    pub moves_per_node_max: usize,
    /// This node is a witness: it votes and keeps logs but holds no mailbox state, serves no
    /// reads or writes, and leads a group only to hand a lagging data voter the log.
    pub witness: bool,
    /// A store sync running this long is taken for a disk that stopped answering.
    pub disk_stall: Duration,
    /// Below this many free bytes the disk counts as full: new mail is refused and no new
    /// replica is placed on the node, until space returns.
    pub disk_free_min: u64,
    /// A partition group this node has left for this long (the meta state and the group's
    /// leader agree it holds no replica) has its local copy dropped (see `drop_replica`);
    /// `None` keeps stale copies forever.
    pub stale_replica_after: Option<Duration>,
}

/// Most voters in the meta group; further nodes follow it as learners.
pub const META_VOTERS_MAX: usize = 5;
/// A learner this close to the leader's log is promoted to voter.
const CATCH_UP_ENTRIES: u64 = 64;
const RECONCILE_INTERVAL: Duration = Duration::from_millis(500);
/// How often a node looks for copies of groups it has left (see `drop_stale_replicas`).
const STALE_SCAN_INTERVAL: Duration = Duration::from_secs(5);
const MEMBERSHIP_CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a leader heartbeats an idle group's followers when nothing else prompts it.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

impl HostConfig {
    pub fn raft_config(&self) -> Result<Arc<Config>, String> {
        if self.election_min_ms < 2 * self.heartbeat_ms {
            return Err(format!(
                "raft timing: election_min_ms ({}) must be at least twice heartbeat_ms ({}): \
                 a peer is taken for dead after election_min_ms without a beat",
                self.election_min_ms, self.heartbeat_ms
            ));
        }
        let config = Config {
            cluster_name: "mailgrid".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            install_snapshot_timeout: 60_000,
            max_payload_entries: 64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_logs),
            max_in_snapshot_log_to_keep: self.snapshot_logs.min(1000),
            purge_batch_size: 64,
            // No per-group ticker: elections and heartbeats of idle groups are timed by the
            // node's liveness loop (`liveness`), so an idle group costs nothing.
            enable_tick: false,
            // A leader replicates entries before its own copy is durable, and followers alone
            // can commit them; restarted after a crash (or a failed or stalled disk) it may
            // have lost that tail. Restored as leader of the same term without an election,
            // it would write new, different entries at the same indexes under the same term,
            // which followers take for the ones they hold: replicas diverge (the disk
            // nemesis found it). A restarted node is a follower and must be elected again.
            enable_leader_restore: Some(false),
            ..Default::default()
        };
        config
            .validate()
            .map(Arc::new)
            .map_err(|e| format!("raft timing: {e}"))
    }

    /// The configuration of a witness's partition groups: no snapshot is built by policy and
    /// nothing is purged by openraft's own rule (which ignores the other voters); the witness's
    /// purge loop purges each entry once every data voter holds it (`witness_purge`).
    fn witness_partition_config(&self) -> Result<Arc<Config>, String> {
        let base = self.raft_config()?;
        let config = Config {
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: u64::MAX,
            ..(*base).clone()
        };
        config
            .validate()
            .map(Arc::new)
            .map_err(|e| format!("raft timing: {e}"))
    }

    fn timing(&self) -> Timing {
        Timing {
            beat: Duration::from_millis(self.heartbeat_ms),
            dead_after: Duration::from_millis(self.election_min_ms),
            sweep: SWEEP_INTERVAL,
        }
    }
}

/// Answers application (non-raft) requests; provided by the node above this crate.
pub trait ServiceHandler: Send + Sync + 'static {
    fn handle(&self, peer: Option<NodeId>, request: Vec<u8>) -> BoxFuture<'static, Vec<u8>>;
}

/// Why a proposal or read was not done here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum GroupError {
    #[error("not the leader of group {group}")]
    NotLeader {
        group: GroupId,
        leader: Option<(NodeId, String)>,
    },
    #[error("no such group {0}")]
    NoSuchGroup(GroupId),
    #[error("group {group} unavailable: {reason}")]
    Unavailable { group: GroupId, reason: String },
    /// The proposal may or may not have been committed.
    #[error("outcome unknown in group {group}: {reason}")]
    Uncertain { group: GroupId, reason: String },
    /// The group's leader refused new mail: its disk is below `disk_free_min`. Nothing was
    /// proposed; mail protocols answer with their "insufficient storage" reply (452 4.3.1).
    /// Appended last: an older node cannot decode it and treats the answer as unknown.
    #[error("group {group}: disk full on node {node} ({free_mib} MiB free)")]
    DiskFull {
        group: GroupId,
        node: NodeId,
        free_mib: u64,
    },
}

impl GroupError {
    /// Whether this is a refusal of new mail for lack of disk space (see [`GroupError::DiskFull`]).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, GroupError::DiskFull { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub group: GroupId,
    pub state: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_applied: Option<u64>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// The voter sets a quorum is needed in: one, or two during a joint (changing) membership.
    #[serde(default)]
    pub configs: Vec<Vec<NodeId>>,
    pub healthy: bool,
}

#[derive(Clone)]
struct Group {
    raft: Raft,
    sm: StateMachine,
    /// When this core was opened: it refuses votes for one lease after (see `handle_raft`).
    opened: std::time::Instant,
    /// Set once this replica's data was dropped after it left the group: the last log id it
    /// held. No candidate whose log is behind it gets this replica's vote.
    floor: Option<LogId>,
}

pub struct RaftHost {
    config: HostConfig,
    raft_config: Arc<Config>,
    /// For a witness's partition groups (see `HostConfig::witness_partition_config`).
    witness_config: Arc<Config>,
    /// The cluster's witnesses, as this node's copy of the meta state says.
    witnesses: Witnesses,
    /// On a witness: when it last refused a data voter's (pre-)vote in each group because its
    /// own log was further on. Only then does it stand for election (see `liveness_loop`).
    ahead: std::sync::Mutex<BTreeMap<GroupId, std::time::Instant>>,
    /// Set once this node stopped its groups because its disk failed (see `check_disk`).
    stopped_for_disk: std::sync::atomic::AtomicBool,
    /// Free bytes on the store's filesystem at the last check, while below `disk_free_min`.
    disk_low: std::sync::Mutex<Option<u64>>,
    store: Store,
    transport: Arc<Transport>,
    /// Every group this node hosts, by id. Replaced entries come from supervision restarts.
    groups: RwLock<BTreeMap<GroupId, Group>>,
    service: OnceLock<Arc<dyn ServiceHandler>>,
    liveness: Liveness,
    /// The groups this node led at the last liveness round, as its beats announce them.
    leads: std::sync::Mutex<Vec<(GroupId, u64)>>,
    /// When this node last handed each group's leadership away, and at which term (see
    /// [`RaftHost::read`] and `liveness_loop`).
    transfers: std::sync::Mutex<BTreeMap<GroupId, Transfer>>,
    /// The replica moves this node started as meta leader (see `rebalance`).
    moves: std::sync::Mutex<Moves>,
    /// Groups this node has left whose copy it still holds, with when that was first seen
    /// and the log id of the membership its own copy had then, and when it last looked (see
    /// `drop_stale_replicas`).
    stale: std::sync::Mutex<StaleCopies>,
    /// Copies of left groups dropped since this process started.
    dropped: std::sync::atomic::AtomicU64,
}

/// Copies of left groups a node still holds (see `RaftHost::drop_stale_replicas`).
#[derive(Debug, Default)]
struct StaleCopies {
    /// Per group: when it was first seen gone, and its copy's membership log id then.
    seen: BTreeMap<GroupId, (std::time::Instant, Option<LogId>)>,
    /// When the last scan ran.
    scanned: Option<std::time::Instant>,
}

/// Replica moves the meta leader started and has seen finish. In memory only: a new meta
/// leader learns the moves under way from the groups themselves and counts from zero.
#[derive(Debug, Default)]
struct Moves {
    /// Partition → when its new replicas were recorded, and the replicas it had.
    running: BTreeMap<u32, (std::time::Instant, Vec<NodeId>)>,
    done: u64,
    /// Durations of the last `RECENT_MOVES` moves, newest last.
    recent: std::collections::VecDeque<Duration>,
}

const RECENT_MOVES: usize = 32;

/// One node's share of the placement, for `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct PlacementGauges {
    /// Partition groups this node is a member of.
    pub replicas: u64,
    /// Replicas the plan gives it.
    pub replicas_target: u64,
    /// Partitions whose plan prefers it as leader.
    pub leaders_target: u64,
    /// Replicas the plan still adds somewhere (the same on every node).
    pub moves_pending: u64,
}

/// What the meta leader knows of the rebalance it runs (`status`, metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveStats {
    /// Whether this node is the meta leader (only its figures count).
    pub meta_leader: bool,
    /// Moves it started that have not finished.
    pub running: u64,
    /// Moves it saw finish while meta leader (counted since this process started).
    pub done: u64,
    /// Mean duration of its recent moves, in milliseconds.
    pub mean_ms: Option<u64>,
}

impl std::fmt::Debug for RaftHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftHost")
            .field("id", &self.config.id)
            .finish()
    }
}

fn group_kind(group: GroupId) -> GroupKind {
    if group == META_GROUP {
        GroupKind::Meta
    } else {
        GroupKind::Partition
    }
}

impl RaftHost {
    /// Opens every group (meta and all partitions) on `store` and starts serving peers.
    pub async fn start(
        config: HostConfig,
        store: Store,
        transport: Arc<Transport>,
    ) -> Result<Arc<RaftHost>, String> {
        let raft_config = config.raft_config()?;
        let witness_config = config.witness_partition_config()?;
        let host = Arc::new(RaftHost {
            config,
            raft_config,
            witness_config,
            witnesses: Arc::new(RwLock::new(BTreeSet::new())),
            ahead: std::sync::Mutex::new(BTreeMap::new()),
            stopped_for_disk: std::sync::atomic::AtomicBool::new(false),
            disk_low: std::sync::Mutex::new(None),
            store,
            transport,
            groups: RwLock::new(BTreeMap::new()),
            service: OnceLock::new(),
            liveness: Liveness::new(),
            leads: std::sync::Mutex::new(Vec::new()),
            transfers: std::sync::Mutex::new(BTreeMap::new()),
            moves: std::sync::Mutex::new(Moves::default()),
            stale: std::sync::Mutex::new(StaleCopies::default()),
            dropped: std::sync::atomic::AtomicU64::new(0),
        });
        for group in 0..=host.config.partitions as GroupId {
            let g = host.open_group(group).await?;
            host.groups.write().expect("groups lock").insert(group, g);
            if group == META_GROUP {
                host.refresh_witnesses();
            }
        }
        host.transport
            .serve(Arc::new(Dispatch(Arc::downgrade(&host))));
        let weak = Arc::downgrade(&host);
        tokio::spawn(async move { reconcile_loop(weak).await });
        let weak = Arc::downgrade(&host);
        tokio::spawn(async move { liveness_loop(weak).await });
        if host.config.witness {
            let weak = Arc::downgrade(&host);
            tokio::spawn(async move { witness_purge_loop(weak).await });
        }
        Ok(host)
    }

    /// Reloads the set of witnesses from this node's copy of the meta state.
    fn refresh_witnesses(&self) {
        let Ok(g) = self.group(META_GROUP) else {
            return;
        };
        if let Ok(found) = g.sm.machine().read_meta(|m| m.witnesses()) {
            *self.witnesses.write().expect("witnesses lock") = found;
        }
    }

    /// The nodes known to be witnesses.
    pub fn witnesses(&self) -> BTreeSet<NodeId> {
        self.witnesses.read().expect("witnesses lock").clone()
    }

    /// Whether this node is a witness.
    pub fn is_witness(&self) -> bool {
        self.config.witness
    }

    /// Why this node's disk is failed, if it is: a sync failed, or one ran past
    /// `disk_stall`. Sticky until the process restarts (see `storage::Store::failure`).
    pub fn disk_failure(&self) -> Option<String> {
        self.store.failure()
    }

    /// What is wrong with this node, one plain sentence each (empty when healthy).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(why) = self.disk_failure() {
            out.push(format!(
                "disk failed ({why}): it leads and votes in nothing and refuses mail; restart it \
                 once the disk works (its data is read back and checked on open)"
            ));
        }
        if let Some(free) = self.disk_low() {
            out.push(format!(
                "disk almost full: {} MiB free, below {} MiB: new mail is refused (452 4.3.1) \
                 and no new replica is placed here until space returns",
                free >> 20,
                self.config.disk_free_min >> 20
            ));
        }
        out
    }

    /// Free bytes on this node's disk while it is below `disk_free_min` (else `None`).
    pub fn disk_low(&self) -> Option<u64> {
        *self.disk_low.lock().expect("disk low lock")
    }

    /// Refuses a command that brings new mail (a delivery, an APPEND, a queued message) while
    /// this node's disk is full; everything else, deletions included, goes on.
    fn refuse_new_mail_on_full_disk(
        &self,
        group: GroupId,
        cmd: &Command,
    ) -> Result<(), GroupError> {
        fn brings_mail(cmd: &storage::partition::PartitionCommand) -> bool {
            use storage::partition::PartitionCommand as P;
            match cmd {
                P::Deliver { .. } | P::Append { .. } | P::Enqueue { .. } => true,
                P::Once { command, .. } => brings_mail(command),
                _ => false,
            }
        }
        let new_mail = matches!(cmd, Command::Partition(c) if brings_mail(c));
        match self.disk_low() {
            Some(free) if new_mail => Err(GroupError::DiskFull {
                group,
                node: self.id(),
                free_mib: free >> 20,
            }),
            _ => Ok(()),
        }
    }

    /// Gives up on a disk that failed or stopped answering: every group's core is stopped at
    /// once, so the node leads nothing, votes for nothing and acknowledges nothing more, and
    /// its beats claim no group (the other voters elect new leaders within `dead_after`).
    /// Called every liveness round.
    async fn check_disk(&self) {
        if let Ok(free) = self.store.free_bytes() {
            let low = (free < self.config.disk_free_min).then_some(free);
            let was = std::mem::replace(&mut *self.disk_low.lock().expect("disk low lock"), low);
            match (was, low) {
                (None, Some(free)) => tracing::warn!(
                    free_mib = free >> 20,
                    "disk almost full: refusing new mail and new replicas"
                ),
                (Some(_), None) => tracing::warn!("disk space is back: taking new mail again"),
                _ => {}
            }
        }
        if let Some(running) = self.store.sync_running_for() {
            if running >= self.config.disk_stall {
                self.store.fail(format!(
                    "disk stalled: a sync has not returned for {:.1} s",
                    running.as_secs_f64()
                ));
            }
        }
        let Some(why) = self.store.failure() else {
            return;
        };
        if self
            .stopped_for_disk
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        tracing::error!(error = %why, "disk failed: stopping every group on this node");
        for g in self.all_groups() {
            // Not awaited: a core blocked on the stalled disk must not hold up the others.
            tokio::spawn(async move {
                let _ = g.raft.shutdown().await;
            });
        }
    }

    fn refuse_on_failed_disk(&self, group: GroupId) -> Result<(), GroupError> {
        match self.disk_failure() {
            Some(why) => Err(GroupError::Unavailable {
                group,
                reason: format!("this node's disk failed: {why}"),
            }),
            None => Ok(()),
        }
    }

    /// A witness serves no reads or writes: a group it leads for a moment (to hand a data
    /// voter the log) answers "not the leader", and the caller retries at the data leader
    /// that follows.
    fn refuse_on_witness(&self, group: GroupId) -> Result<(), GroupError> {
        if self.config.witness {
            return Err(GroupError::NotLeader {
                group,
                leader: None,
            });
        }
        Ok(())
    }

    fn snapshot_dir(&self, group: GroupId) -> PathBuf {
        self.config
            .data_dir
            .join("snapshots")
            .join(group.to_string())
    }

    async fn open_group(&self, group: GroupId) -> Result<Group, String> {
        let io = |e: &dyn std::fmt::Display| format!("group {group}: {e}");
        let group_log = GroupLog::open(&self.store, group).map_err(|e| io(&e))?;
        let machine = Arc::new(
            GroupMachine::open(&self.store, group, group_kind(group)).map_err(|e| io(&e))?,
        );
        let snapshot_dir = self.snapshot_dir(group);
        if crate::store::drop_interrupted(&group_log).map_err(|e| io(&e))? {
            tracing::warn!(
                group,
                "finishing the interrupted drop of a left group's copy"
            );
            crate::store::finish_drop(&group_log, &machine, &snapshot_dir).map_err(|e| io(&e))?;
        }
        let floor = crate::store::floor(&group_log).map_err(|e| io(&e))?;
        let log = LogStore::new(group_log);
        let witness_partition = self.config.witness && group != META_GROUP;
        let sm =
            StateMachine::open(machine, snapshot_dir, witness_partition).map_err(|e| io(&e))?;
        let network = NetworkFactory {
            transport: self.transport.clone(),
            group,
            witness: self.config.witness,
            witnesses: self.witnesses.clone(),
        };
        let config = if witness_partition {
            self.witness_config.clone()
        } else {
            self.raft_config.clone()
        };
        let raft = Raft::new(self.config.id, config, network, log, sm.clone())
            .await
            .map_err(|e| io(&e))?;
        Ok(Group {
            raft,
            sm,
            opened: std::time::Instant::now(),
            floor,
        })
    }

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// flush + fdatasync rounds of this node's store since start.
    pub fn syncs(&self) -> u64 {
        self.store
            .stats()
            .syncs
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn transport(&self) -> &Arc<Transport> {
        &self.transport
    }

    pub fn set_service(&self, service: Arc<dyn ServiceHandler>) {
        let _ = self.service.set(service);
    }

    fn groups_by_id(&self) -> Vec<(GroupId, Group)> {
        let groups = self.groups.read().expect("groups lock");
        groups.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    fn all_groups(&self) -> Vec<Group> {
        self.groups
            .read()
            .expect("groups lock")
            .values()
            .cloned()
            .collect()
    }

    fn group(&self, group: GroupId) -> Result<Group, GroupError> {
        self.groups
            .read()
            .expect("groups lock")
            .get(&group)
            .cloned()
            .ok_or(GroupError::NoSuchGroup(group))
    }

    /// This node's copy of the meta state (may lag; use [`RaftHost::read`] for fresh data).
    pub fn meta(&self) -> Arc<GroupMachine> {
        self.group(META_GROUP)
            .expect("meta group always open")
            .sm
            .machine()
            .clone()
    }

    /// Makes this node the only member of every group and records the cluster in the meta
    /// state. Used once, by `init`.
    pub async fn bootstrap(
        &self,
        info: storage::meta::ClusterInfo,
        node: NodeRecord,
    ) -> Result<(), String> {
        let members = BTreeMap::from([(
            self.config.id,
            NodeAddr {
                addr: node.cluster_addr.clone(),
            },
        )]);
        let groups = self.all_groups();
        for g in &groups {
            g.raft
                .initialize(members.clone())
                .await
                .map_err(|e| format!("initialize: {e}"))?;
        }
        let cmd = Command::Meta(MetaCommand::Init { info, node });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.write(META_GROUP, cmd.clone()).await {
                Ok(Response::Meta(storage::meta::MetaResponse::Done)) => return Ok(()),
                Ok(other) => return Err(format!("meta state refused initialisation: {other:?}")),
                Err(GroupError::NotLeader { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn leader_hint(&self, g: &Group) -> Option<(NodeId, String)> {
        let metrics = g.raft.metrics().borrow_watched().clone();
        let leader = metrics.current_leader?;
        let addr = metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())?;
        Some((leader, addr))
    }

    /// Proposes `cmd` to `group` on this node, which must be its leader. Returns once the
    /// entry is committed (durable on a majority) and applied here.
    pub async fn write(&self, group: GroupId, cmd: Command) -> Result<Response, GroupError> {
        self.refuse_on_failed_disk(group)?;
        self.refuse_new_mail_on_full_disk(group, &cmd)?;
        self.refuse_on_witness(group)?;
        let g = self.group(group)?;
        self.renew_lease(&g).await;
        match tokio::time::timeout(self.config.write_timeout, g.raft.client_write(cmd)).await {
            Ok(Ok(response)) => Ok(response.data),
            Ok(Err(e)) => {
                if let Some(f) = e.forward_to_leader() {
                    let leader = f
                        .leader_id
                        .and_then(|id| f.leader_node.as_ref().map(|n| (id, n.addr.clone())));
                    return Err(GroupError::NotLeader { group, leader });
                }
                Err(GroupError::Uncertain {
                    group,
                    reason: e.to_string(),
                })
            }
            Err(_) => Err(GroupError::Uncertain {
                group,
                reason: "commit timed out (no quorum?)".into(),
            }),
        }
    }

    /// openraft refuses writes and membership changes from a leader whose quorum-ack lease
    /// (`election_max_ms`) ran out, and a quiet group has no heartbeats to keep it: one
    /// ReadIndex round (a heartbeat acknowledged by a majority) renews it first. Failures are
    /// left to the operation that follows, which reports them.
    /// See [`renew_lease`].
    async fn renew_lease(&self, g: &Group) {
        renew_lease(
            g,
            Duration::from_millis(self.config.election_max_ms),
            self.config.write_timeout,
        )
        .await
    }

    /// Confirms this node is still the group's leader and returns its state machine, applied
    /// at least up to that point: reads from it are linearizable.
    ///
    /// A leader a majority acknowledged within the lease (`election_max_ms`, counted from
    /// when it sent what they acknowledged) serves from its lease without a network round:
    /// openraft's followers refuse every vote until their own lease from that contact runs
    /// out, so no other leader can exist yet. The one exception is a leadership transfer,
    /// whose votes are granted despite the lease: for two leases after this node hands a
    /// group away, its reads take the full ReadIndex round (a majority confirms it still
    /// leads), as they do whenever the lease has run out.
    pub async fn read(&self, group: GroupId) -> Result<Arc<GroupMachine>, GroupError> {
        self.refuse_on_failed_disk(group)?;
        self.refuse_on_witness(group)?;
        let g = self.group(group)?;
        if !self.transferred_recently(group)
            && g.raft
                .ensure_linearizable(ReadPolicy::LeaseRead)
                .await
                .is_ok()
        {
            return Ok(g.sm.machine().clone());
        }
        match tokio::time::timeout(
            self.config.write_timeout,
            g.raft.ensure_linearizable(ReadPolicy::ReadIndex),
        )
        .await
        {
            Ok(Ok(_)) => Ok(g.sm.machine().clone()),
            Ok(Err(e)) => {
                if e.forward_to_leader().is_some() {
                    return Err(GroupError::NotLeader {
                        group,
                        leader: self.leader_hint(&g),
                    });
                }
                Err(GroupError::Unavailable {
                    group,
                    reason: e.to_string(),
                })
            }
            Err(_) => Err(GroupError::Unavailable {
                group,
                reason: "read timed out (no quorum?)".into(),
            }),
        }
    }

    /// Whether `node` is this node or its beats still arrive (see `liveness`): a peer that is
    /// slow to answer but alive, as opposed to one that died.
    pub fn peer_alive(&self, node: NodeId) -> bool {
        node == self.id()
            || self
                .liveness
                .heard_within(node, Duration::from_millis(self.config.election_min_ms))
    }

    fn transferred_recently(&self, group: GroupId) -> bool {
        let window = Duration::from_millis(2 * self.config.election_max_ms);
        self.transfers
            .lock()
            .expect("transfers lock")
            .get(&group)
            .is_some_and(|t| t.at.elapsed() < window)
    }

    /// The groups this node leads and may still write to, as its beats announce them. A
    /// leader that started a leadership transfer in its current term refuses every write
    /// and membership change for the rest of that term (openraft has no way to cancel a
    /// transfer). If the target never takes over (it died, the request was lost) the
    /// group would be stuck under a live leader, so that leader stops claiming the group
    /// and its followers elect a new one once `dead_after` has passed (see `liveness`).
    fn announced_leads(&self, views: &[(Group, GroupView)]) -> Vec<(GroupId, u64)> {
        let transfers = self.transfers.lock().expect("transfers lock");
        views
            .iter()
            .map(|(_, v)| v)
            .filter(|v| v.leading)
            .filter(|v| transfers.get(&v.group).is_none_or(|t| t.term != v.term))
            .map(|v| (v.group, v.term))
            .collect()
    }

    /// This node's own replica, however stale (status and replica comparison only).
    pub fn local_machine(&self, group: GroupId) -> Result<Arc<GroupMachine>, GroupError> {
        Ok(self.group(group)?.sm.machine().clone())
    }

    /// Where this node believes the group's leader is.
    pub fn leader_of(&self, group: GroupId) -> Option<(NodeId, String)> {
        self.leader_hint(&self.group(group).ok()?)
    }

    pub fn status(&self) -> Vec<GroupStatus> {
        let disk_failed = self.disk_failure().is_some();
        let groups = self.groups_by_id();
        groups
            .into_iter()
            .map(|(group, g)| {
                let m = g.raft.metrics().borrow_watched().clone();
                let membership = m.membership_config.membership();
                GroupStatus {
                    group,
                    // Stopped for a failed disk: its last metrics are no longer true.
                    state: if disk_failed {
                        "Stopped".to_string()
                    } else {
                        format!("{:?}", m.state)
                    },
                    leader: m.current_leader,
                    term: m.current_term,
                    last_applied: m.last_applied.as_ref().map(|l| l.index),
                    voters: membership.voter_ids().collect(),
                    learners: membership.learner_ids().collect(),
                    configs: membership
                        .get_joint_config()
                        .iter()
                        .map(|c| c.iter().copied().collect())
                        .collect(),
                    healthy: m.running_state.is_ok() && !disk_failed,
                }
            })
            .collect()
    }

    /// `request` sent to every live node of `nodes` but this one, at once; the answers that
    /// came back within `OBSERVE_TIMEOUT` and decoded, by node.
    async fn ask_peers<T: serde::de::DeserializeOwned>(
        &self,
        nodes: &[NodeRecord],
        request: &Request,
    ) -> Vec<(NodeId, T)> {
        let request = codec::encode(request);
        let calls = nodes
            .iter()
            .filter(|n| n.id != self.id() && self.peer_alive(n.id))
            .map(|n| {
                let request = &request;
                async move {
                    let answer = self
                        .transport
                        .call(
                            crate::transport::Peer::Node(n.id),
                            &n.cluster_addr,
                            request,
                            None,
                            OBSERVE_TIMEOUT,
                        )
                        .await
                        .ok()?;
                    let value = codec::decode::<Reply<T>>(&answer).ok()?.ok()?;
                    Some((n.id, value))
                }
            });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Every group's membership as seen by its leader (the leader's view with the highest
    /// term), gathered from every live node in `nodes`, this one without a call.
    pub async fn observe(&self, nodes: &[NodeRecord]) -> BTreeMap<GroupId, GroupStatus> {
        let mut views: Vec<Vec<GroupStatus>> = self
            .ask_peers(nodes, &Request::Groups)
            .await
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        views.push(self.status());
        leader_views(views.iter().flatten())
    }

    /// The nodes in `nodes` whose disk is full (this one without a call); a node that does
    /// not answer counts as not full (its moves then wait on the node itself).
    async fn full_disks(&self, nodes: &[NodeRecord]) -> BTreeSet<NodeId> {
        let mut full: BTreeSet<NodeId> = self
            .ask_peers::<Option<u64>>(nodes, &Request::DiskLow)
            .await
            .into_iter()
            .filter(|(_, low)| low.is_some())
            .map(|(id, _)| id)
            .collect();
        if self.disk_low().is_some() {
            full.insert(self.id());
        }
        full
    }

    /// This node's replicas against the plan, from its own groups and its copy of the meta
    /// state (no network round: for `/metrics`).
    pub fn placement_gauges(&self) -> PlacementGauges {
        let me = self.id();
        let held = self
            .status()
            .iter()
            .filter(|g| g.group != META_GROUP)
            .filter(|g| g.voters.contains(&me) || g.learners.contains(&me))
            .count() as u64;
        let planned = self
            .meta()
            .read_meta(|m| -> Result<_, storage::StorageError> {
                let (info, settings, records) = (m.cluster()?, m.node_settings()?, m.partitions()?);
                let replicas = info.map(|i| i.replicas as usize).unwrap_or(1);
                let plan = crate::placement::plan(&records, &settings, &m.witnesses()?, replicas);
                Ok((crate::placement::distance(&records, &plan).0, plan))
            });
        let (pending, plan) = planned.unwrap_or_default();
        PlacementGauges {
            replicas: held,
            replicas_target: plan.iter().filter(|r| r.replicas.contains(&me)).count() as u64,
            leaders_target: plan
                .iter()
                .filter(|r| r.replicas.first() == Some(&me))
                .count() as u64,
            moves_pending: pending as u64,
        }
    }

    /// Log entries this node keeps over all its groups (appended and not yet purged): what a
    /// witness stores, since it holds no state beside its logs.
    pub fn log_entries(&self) -> u64 {
        self.all_groups()
            .iter()
            .map(|g| {
                let m = g.raft.metrics().borrow_watched().clone();
                let purged = m.purged.as_ref().map(|l| l.index);
                match (m.last_log_index, purged) {
                    (Some(last), Some(p)) => last.saturating_sub(p),
                    (Some(last), None) => last + 1,
                    (None, _) => 0,
                }
            })
            .sum()
    }

    /// The rebalance as this node runs it (figures only on the meta leader).
    pub fn move_stats(&self) -> MoveStats {
        let moves = self.moves.lock().expect("moves lock");
        let meta_leader = self
            .group(META_GROUP)
            .is_ok_and(|g| g.raft.metrics().borrow_watched().state == ServerState::Leader);
        let total: Duration = moves.recent.iter().sum();
        MoveStats {
            meta_leader,
            running: moves.running.len() as u64,
            done: moves.done,
            mean_ms: (!moves.recent.is_empty())
                .then(|| (total / moves.recent.len() as u32).as_millis() as u64),
        }
    }

    pub async fn shutdown(&self) {
        let groups = self.all_groups();
        for g in groups {
            let _ = g.raft.shutdown().await;
        }
        self.transport.close();
        let _ = self.store.sync();
    }

    async fn handle_raft(&self, peer: Option<NodeId>, request: Request, body: Body) -> Vec<u8> {
        fn reply<T: Serialize, E: std::fmt::Display>(r: Result<T, E>) -> Vec<u8> {
            codec::encode(&r.map_err(|e| e.to_string()))
        }
        if peer.is_none() {
            return reply::<(), _>(Err("raft requests need a node certificate"));
        }
        if let Some(why) = self.disk_failure() {
            return reply::<(), _>(Err(format!("this node's disk failed: {why}")));
        }
        let group_id = match &request {
            Request::Append { group, .. }
            | Request::Vote { group, .. }
            | Request::PreVote { group, .. }
            | Request::Snapshot { group, .. }
            | Request::TransferLeader { group, .. } => *group,
            Request::Service(_)
            | Request::Beat(_)
            | Request::Groups
            | Request::Progress
            | Request::DiskLow => {
                unreachable!("service requests, beats and views are dispatched elsewhere")
            }
        };
        let g = match self.group(group_id) {
            Ok(g) => g,
            Err(e) => return reply::<(), _>(Err(e)),
        };
        match request {
            Request::Append { rpc, .. } => reply(g.raft.append_entries(rpc).await),
            Request::Vote { rpc, .. } => {
                // A voter's lease (no votes while it hears a leader) lives in memory: a core
                // that was just opened — a restarted process, or a group supervision reopened
                // — has none, yet it may have acknowledged a leader that still serves lease
                // reads (see `RaftHost::read`). So it votes only once a whole lease has passed
                // since it opened; a transfer's election is the leader's own and goes ahead.
                let lease = Duration::from_millis(self.config.election_max_ms);
                if !rpc.leadership_transfer && g.opened.elapsed() < lease {
                    return reply::<(), _>(Err("no votes within a lease of opening"));
                }
                if let Some(why) = below_floor(&g, rpc.last_log_id.as_ref()) {
                    return reply::<(), _>(Err(why));
                }
                let asked = rpc.last_log_id;
                let answer = g.raft.vote(rpc).await;
                self.note_refusal(group_id, &asked, answer.as_ref().ok());
                reply(answer)
            }
            Request::PreVote { rpc, .. } => {
                if let Some(why) = below_floor(&g, rpc.last_log_id.as_ref()) {
                    return reply::<(), _>(Err(why));
                }
                let asked = rpc.last_log_id;
                let answer = g.raft.pre_vote(rpc).await;
                self.note_refusal(group_id, &asked, answer.as_ref().ok());
                reply(answer)
            }
            Request::TransferLeader { rpc, .. } => reply(g.raft.handle_transfer_leader(rpc).await),
            Request::Snapshot { vote, meta, .. } => {
                let from_witness = peer
                    .is_some_and(|p| self.witnesses.read().expect("witnesses lock").contains(&p));
                if group_id != META_GROUP && from_witness {
                    // It holds no mail: installing its snapshot would wipe this replica.
                    return reply::<(), _>(Err(
                        "a witness's partition snapshot is never installed",
                    ));
                }
                let path = g.sm.incoming_path();
                if let Err(e) = body.save(&path, BODY_BYTES_MAX).await {
                    let _ = std::fs::remove_file(&path);
                    return reply::<(), _>(Err(format!("receiving snapshot: {e}")));
                }
                // The file is checked in full (framing and digest) before anything is replaced.
                if let Err(e) = GroupMachine::snapshot_raft_state(&path) {
                    let _ = std::fs::remove_file(&path);
                    return reply::<(), _>(Err(e));
                }
                let snapshot = openraft::Snapshot {
                    meta,
                    snapshot: SnapshotFile { path },
                };
                reply(g.raft.install_full_snapshot(vote, snapshot).await)
            }
            Request::Service(_)
            | Request::Beat(_)
            | Request::Groups
            | Request::Progress
            | Request::DiskLow => unreachable!(),
        }
    }

    /// On a witness: remembers that it refused a vote because its own log is further on than
    /// the candidate's, which only the witness can then hand on (see `liveness_loop`).
    fn note_refusal(
        &self,
        group: GroupId,
        candidate_last: &Option<LogId>,
        answer: Option<&openraft::raft::VoteResponse<TypeConfig>>,
    ) {
        if !self.config.witness {
            return;
        }
        if let Some(a) = answer {
            if !a.vote_granted && a.last_log_id > *candidate_last {
                self.ahead
                    .lock()
                    .expect("ahead lock")
                    .insert(group, std::time::Instant::now());
            }
        }
    }

    /// Whether this witness refused a vote for being ahead in `group` within `within`.
    fn ahead_within(&self, group: GroupId, within: Duration) -> bool {
        self.ahead
            .lock()
            .expect("ahead lock")
            .get(&group)
            .is_some_and(|at| at.elapsed() < within)
    }

    /// For every group this node leads, the log index each of its data voters holds (the
    /// answer to `Request::Progress`, which a witness purges by).
    pub fn data_progress(&self) -> Vec<DataProgress> {
        if self.disk_failure().is_some() {
            return Vec::new();
        }
        let witnesses = self.witnesses();
        let me = self.id();
        self.groups_by_id()
            .into_iter()
            .filter_map(|(group, g)| {
                let m = g.raft.metrics().borrow_watched().clone();
                if m.state != ServerState::Leader {
                    return None;
                }
                let replication = m.replication.clone().unwrap_or_default();
                let held_by_all = m
                    .membership_config
                    .membership()
                    .voter_ids()
                    .filter(|v| !witnesses.contains(v))
                    .map(|v| match replication.get(&v).cloned().flatten() {
                        Some(l) => l.index,
                        None if v == me => m.last_log_index.unwrap_or(0),
                        None => 0,
                    })
                    .min()?;
                Some(DataProgress {
                    group,
                    term: m.current_term,
                    held_by_all,
                })
            })
            .collect()
    }

    /// Copies of left groups this node dropped since it started (for `/metrics`).
    pub fn stale_replicas_dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Drops this node's copy of each partition group it has left, once the meta state has
    /// no replica of it here and the group's leader has had a single configuration without
    /// this node for `stale_replica_after` (observed every `STALE_SCAN_INTERVAL`): growing the
    /// cluster frees space on the nodes that gave replicas away. The meta group is kept whole
    /// everywhere.
    async fn drop_stale_replicas(&self) {
        let Some(after) = self.config.stale_replica_after else {
            return;
        };
        if self.disk_failure().is_some() {
            return;
        }
        {
            let mut stale = self.stale.lock().expect("stale lock");
            if stale
                .scanned
                .is_some_and(|t| t.elapsed() < STALE_SCAN_INTERVAL)
            {
                return;
            }
            stale.scanned = Some(std::time::Instant::now());
        }
        let Some((nodes, left)) = self.left_groups() else {
            return;
        };
        let views = if left.is_empty() {
            BTreeMap::new()
        } else {
            self.observe(&nodes).await
        };
        let me = self.id();
        let now = std::time::Instant::now();
        let due: Vec<(GroupId, Option<LogId>)> = {
            let mut stale = self.stale.lock().expect("stale lock");
            stale.seen.retain(|g, _| left.contains(g));
            let mut due = Vec::new();
            for group in &left {
                let gone = views.get(group).is_some_and(|v| {
                    v.leader.is_some_and(|l| l != me)
                        && v.configs.len() <= 1
                        && !v.voters.contains(&me)
                        && !v.learners.contains(&me)
                });
                if !gone {
                    stale.seen.remove(group);
                    continue;
                }
                let membership = self.local_membership(*group);
                let (since, seen) = *stale.seen.entry(*group).or_insert((now, membership));
                if now.duration_since(since) >= after {
                    due.push((*group, seen));
                }
            }
            due
        };
        for (group, seen) in due {
            // Asked again right before: the rebalancer may have given the partition back.
            if !self
                .left_groups()
                .is_some_and(|(_, left)| left.contains(&group))
            {
                continue;
            }
            self.drop_replica(group, seen).await;
            self.stale.lock().expect("stale lock").seen.remove(&group);
        }
    }

    /// The log id of the membership this node's own copy of `group` has.
    fn local_membership(&self, group: GroupId) -> Option<LogId> {
        let g = self.group(group).ok()?;
        let m = g.raft.metrics().borrow_watched().clone();
        *m.membership_config.log_id()
    }

    /// The live nodes, and the partition groups whose recorded replicas exclude this node
    /// while its local copy still holds something (log entries or applied state).
    fn left_groups(&self) -> Option<(Vec<NodeRecord>, BTreeSet<GroupId>)> {
        let me = self.id();
        let (nodes, partitions) = self
            .meta()
            .read_meta(|m| -> Result<_, storage::StorageError> {
                Ok((m.nodes()?, m.partitions()?))
            })
            .ok()?;
        let groups = self.groups.read().expect("groups lock");
        let left = partitions
            .iter()
            .filter(|r| !r.replicas.contains(&me))
            .map(|r| partition_group(r.id))
            .filter(|group| {
                groups.get(group).is_some_and(|g| {
                    let m = g.raft.metrics().borrow_watched().clone();
                    m.state != ServerState::Leader
                        && (m.last_log_index.is_some() || m.last_applied.is_some())
                })
            })
            .collect();
        Some((nodes, left))
    }

    /// Stops the group's core, drops its data (`store::drop_replica`) and opens it again,
    /// empty but for the vote and the floor. `seen`: the membership log id the copy had when
    /// the group was first seen gone. If it has another once the core is stopped (so nothing
    /// more can arrive), a leader has sent it a membership change since — it may be being
    /// given the partition back, as a learner or even a voter that acknowledged entries — and
    /// nothing is dropped.
    async fn drop_replica(&self, group: GroupId, seen: Option<LogId>) {
        let Ok(old) = self.group(group) else { return };
        let _ = old.raft.shutdown().await;
        let now = *old
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .log_id();
        let dropped = if now != seen {
            tracing::info!(group, "a left group's copy got a membership change: kept");
            Ok(None)
        } else {
            GroupLog::open(&self.store, group)
                .map_err(|e| e.to_string())
                .and_then(|log| {
                    crate::store::drop_replica(&log, old.sm.machine(), &self.snapshot_dir(group))
                        .map(Some)
                        .map_err(|e| e.to_string())
                })
        };
        match dropped {
            Ok(None) => {}
            Ok(Some(floor)) => {
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(group, ?floor, "dropped the copy of a group this node left");
            }
            Err(e) => tracing::error!(group, error = %e, "dropping a left group's copy failed"),
        }
        // Opened again either way: an interrupted drop is finished on open.
        match self.open_group(group).await {
            Ok(g) => {
                self.groups.write().expect("groups lock").insert(group, g);
            }
            Err(e) => tracing::error!(group, error = %e, "reopening a dropped group failed"),
        }
    }

    /// Restarts groups whose core stopped with a fatal error (openraft leaves them stuck),
    /// unless the disk failed (then they stay stopped until the process restarts).
    async fn supervise(&self) {
        if self.disk_failure().is_some() {
            return;
        }
        let failed: Vec<GroupId> = self
            .groups
            .read()
            .expect("groups lock")
            .iter()
            .filter(|(_, g)| g.raft.metrics().borrow_watched().running_state.is_err())
            .map(|(id, _)| *id)
            .collect();
        // A leader that began a leadership transfer refuses writes for the rest of its term
        // and openraft cannot cancel the transfer. When the target never takes over (it died
        // or its disk failed right then) another voter normally elects itself, but there may
        // be none: beside a witness, this leader is the only data voter left. Reopened, its
        // core is a follower (no leader restore) and stands like any voter.
        let stuck_for = Duration::from_millis(4 * self.config.election_min_ms);
        let stuck: Vec<GroupId> = {
            let transfers = self.transfers.lock().expect("transfers lock");
            self.groups_by_id()
                .into_iter()
                .filter(|(group, g)| {
                    let m = g.raft.metrics().borrow_watched().clone();
                    m.state == ServerState::Leader
                        && transfers.get(group).is_some_and(|t| {
                            t.term == m.current_term && t.at.elapsed() >= stuck_for
                        })
                })
                .map(|(group, _)| group)
                .collect()
        };
        for group in &failed {
            tracing::error!(group, "raft group stopped; restarting it");
        }
        for group in &stuck {
            tracing::warn!(
                group,
                "leadership transfer never completed; reopening the group to elect again"
            );
        }
        for group in failed.into_iter().chain(stuck) {
            if let Ok(old) = self.group(group) {
                let _ = old.raft.shutdown().await;
            }
            match self.open_group(group).await {
                Ok(g) => {
                    self.groups.write().expect("groups lock").insert(group, g);
                }
                Err(e) => tracing::error!(group, error = %e, "restarting raft group failed"),
            }
        }
    }
}

/// Why a candidate gets no vote from a replica whose data was dropped: its log is behind the
/// replica's floor (see [`Group::floor`]), so it lacks the change that removed the replica.
fn below_floor(g: &Group, candidate: Option<&LogId>) -> Option<&'static str> {
    let floor = g.floor.as_ref()?;
    let behind = candidate.is_none_or(|c| c < floor);
    behind.then_some("the candidate's log is behind what this replica held before it left")
}

/// A leadership transfer this node started as a group's leader.
#[derive(Clone, Copy, Debug)]
struct Transfer {
    at: std::time::Instant,
    /// The leader's term: the transfer disables writes until the leader of this term steps
    /// down.
    term: u64,
}

struct Dispatch(Weak<RaftHost>);

impl Handler for Dispatch {
    fn handle(
        &self,
        peer: Option<NodeId>,
        request: Vec<u8>,
        body: Body,
    ) -> BoxFuture<'static, Vec<u8>> {
        let host = self.0.clone();
        Box::pin(async move {
            let Some(host) = host.upgrade() else {
                return codec::encode(&Reply::<()>::Err("node is shutting down".into()));
            };
            let request: Request = match codec::decode(&request) {
                Ok(r) => r,
                Err(e) => return codec::encode(&Reply::<()>::Err(format!("bad request: {e}"))),
            };
            match request {
                Request::Service(bytes) => match host.service.get() {
                    Some(service) => service.handle(peer, bytes).await,
                    None => codec::encode(&Reply::<()>::Err("node is starting".into())),
                },
                // A node whose disk failed sends and answers no beat: its peers take it for
                // dead, so none of them hands it a group or waits for it.
                Request::Beat(_) if host.disk_failure().is_some() => {
                    codec::encode(&Reply::<()>::Err("this node's disk failed".into()))
                }
                Request::Beat(beat) => match peer {
                    Some(peer) => {
                        let t = host.config.timing();
                        host.liveness
                            .asked(peer, beat, std::time::Instant::now(), t.dead_after);
                        codec::encode(&Reply::<Beat>::Ok(host.own_beat()))
                    }
                    None => {
                        codec::encode(&Reply::<()>::Err("beats need a node certificate".into()))
                    }
                },
                Request::Groups => match peer {
                    Some(_) => codec::encode(&Reply::<Vec<GroupStatus>>::Ok(host.status())),
                    None => codec::encode(&Reply::<()>::Err(
                        "group views need a node certificate".into(),
                    )),
                },
                Request::DiskLow => match peer {
                    Some(_) => codec::encode(&Reply::<Option<u64>>::Ok(host.disk_low())),
                    None => codec::encode(&Reply::<()>::Err(
                        "disk state needs a node certificate".into(),
                    )),
                },
                Request::Progress => match peer {
                    Some(_) => codec::encode(&Reply::<Vec<DataProgress>>::Ok(host.data_progress())),
                    None => codec::encode(&Reply::<()>::Err(
                        "progress needs a node certificate".into(),
                    )),
                },
                other => host.handle_raft(peer, other, body).await,
            }
        })
    }
}

/// Highest-random-weight choice of `count` nodes for a partition: stable as nodes come and go.
pub fn rendezvous(partition: u32, nodes: &[NodeId], count: usize) -> Vec<NodeId> {
    let mut scored: Vec<([u8; 32], NodeId)> = nodes
        .iter()
        .map(|n| {
            let mut h = blake3::Hasher::new();
            h.update(&partition.to_be_bytes());
            h.update(&n.to_be_bytes());
            (*h.finalize().as_bytes(), *n)
        })
        .collect();
    scored.sort();
    scored.iter().rev().take(count).map(|(_, n)| *n).collect()
}

async fn reconcile_loop(host: Weak<RaftHost>) {
    loop {
        tokio::time::sleep(RECONCILE_INTERVAL).await;
        let Some(host) = host.upgrade() else { return };
        host.supervise().await;
        host.drop_stale_replicas().await;
        if let Err(e) = reconcile(&host).await {
            tracing::debug!(error = %e, "reconcile step");
        }
    }
}

impl RaftHost {
    fn own_beat(&self) -> Beat {
        Beat {
            incarnation: self.liveness.incarnation(),
            leads: self.leads.lock().expect("leads lock").clone(),
        }
    }

    /// Sends one beat to `peer` and records its answering beat.
    async fn beat(&self, peer: NodeId, addr: String, timing: Timing) {
        let request = codec::encode(&Request::Beat(self.own_beat()));
        let answer = self
            .transport
            .call(
                crate::transport::Peer::Node(peer),
                &addr,
                &request,
                None,
                timing.dead_after,
            )
            .await;
        if let Ok(bytes) = answer {
            if let Ok(Ok(beat)) = codec::decode::<Reply<Beat>>(&bytes) {
                self.liveness
                    .heard(peer, beat, std::time::Instant::now(), timing.dead_after);
            }
        }
    }

    /// Every group as the liveness decisions see it, and the address of every peer that shares
    /// a group with this node.
    fn group_views(&self) -> (Vec<(Group, GroupView)>, BTreeMap<NodeId, String>) {
        let mut peers = BTreeMap::new();
        let views = self
            .groups_by_id()
            .into_iter()
            .map(|(group, g)| {
                let view = {
                    let metrics = g.raft.metrics();
                    let m = metrics.borrow_watched();
                    let membership = m.membership_config.membership();
                    for (id, node) in membership.nodes() {
                        if *id != self.config.id {
                            peers.insert(*id, node.addr.clone());
                        }
                    }
                    GroupView {
                        group,
                        leading: m.state == ServerState::Leader,
                        candidate: m.state == ServerState::Candidate,
                        leader: m.current_leader,
                        term: m.current_term,
                        voters: membership.voter_ids().collect(),
                        members: membership.nodes().map(|(id, _)| *id).collect(),
                    }
                };
                (g, view)
            })
            .collect();
        (views, peers)
    }
}

/// Beats to every peer and times the groups' elections and heartbeats (see `liveness`).
async fn liveness_loop(host: Weak<RaftHost>) {
    let Some(timing) = host.upgrade().map(|h| h.config.timing()) else {
        return;
    };
    let mut memos: BTreeMap<GroupId, Memo> = BTreeMap::new();
    let mut in_flight: BTreeMap<NodeId, Arc<std::sync::atomic::AtomicBool>> = BTreeMap::new();
    let mut last_round = std::time::Instant::now();
    // After this node itself was frozen (SIGSTOP, a stalled machine) its views are old: it
    // judges nobody dead until fresh beats had time to arrive.
    let mut judge_from = last_round;
    loop {
        tokio::time::sleep(timing.beat).await;
        let Some(host) = host.upgrade() else { return };
        let now = std::time::Instant::now();
        if now.saturating_duration_since(last_round) > timing.beat + timing.dead_after / 2 {
            judge_from = now + timing.beat * 2;
        }
        last_round = now;
        host.check_disk().await;
        let disk_failed = host.disk_failure().is_some();
        let (groups, peers) = host.group_views();
        // A node whose disk failed claims no group (its stopped cores' last metrics may still
        // say "leader"), so the other voters elect new leaders.
        *host.leads.lock().expect("leads lock") = if disk_failed {
            Vec::new()
        } else {
            host.announced_leads(&groups)
        };
        for (peer, addr) in peers.into_iter().filter(|_| !disk_failed) {
            if !host
                .liveness
                .should_call(host.config.id, peer, now, timing.beat)
            {
                continue; // its own beats to us carry ours back in their replies
            }
            let flag = in_flight.entry(peer).or_default().clone();
            if flag.swap(true, std::sync::atomic::Ordering::AcqRel) {
                continue; // the last beat to it is still waiting for an answer
            }
            let host = host.clone();
            tokio::spawn(async move {
                host.beat(peer, addr, timing).await;
                flag.store(false, std::sync::atomic::Ordering::Release);
            });
        }
        let (views, revived) = host.liveness.take();
        if now < judge_from || disk_failed {
            continue;
        }
        let witnesses = host.witnesses();
        for (g, view) in groups {
            if host.config.witness && view.leading {
                hand_over(&host, view.group, &g).await;
            }
            let memo = memos.entry(view.group).or_insert_with(|| Memo::new(now));
            // Witnesses stand last, and only when a data voter cannot win (see below).
            let data_voters: Vec<NodeId> = view
                .voters
                .iter()
                .copied()
                .filter(|v| !witnesses.contains(v))
                .collect();
            let order = rendezvous(view.group as u32, &data_voters, data_voters.len());
            let jitter: f64 = rand::random();
            let action = liveness::decide(
                host.config.id,
                &view,
                &order,
                &views,
                &revived,
                memo,
                now,
                &timing,
                jitter,
            );
            let done = match action {
                Action::Nothing => continue,
                Action::Stand
                    if host.config.witness
                        && !host.ahead_within(view.group, timing.dead_after * 2) =>
                {
                    // A witness stands only after refusing a data voter's vote for being
                    // further on: then no data voter can win without the entries only the
                    // witness (and the dead leader) hold, so it leads long enough to hand
                    // them on (`hand_over`).
                    continue;
                }
                Action::Stand => {
                    tracing::info!(group = view.group, term = view.term, leader = ?view.leader, "standing for election");
                    g.raft.trigger().elect(view.voters.len() > 1).await
                }
                Action::Heartbeat => g.raft.trigger().heartbeat().await,
            };
            if let Err(e) = done {
                tracing::debug!(group = view.group, error = %e, "liveness action");
            }
        }
    }
}

/// How often a witness asks the data leaders what every data voter holds.
const WITNESS_PURGE_INTERVAL: Duration = Duration::from_secs(5);
/// A witness purges a group's log once at least this many entries can go.
const WITNESS_PURGE_BATCH: u64 = 64;
/// How long a witness waits for the (empty) snapshot a purge needs.
const WITNESS_SNAPSHOT_WAIT: Duration = Duration::from_secs(10);

/// A witness's log keeper: every `WITNESS_PURGE_INTERVAL` it purges each partition's log up
/// to the entry every data voter holds (as the group's leader reports it), never further. Until
/// then the witness may be the only node beside a dead leader holding a committed entry, and
/// hands it on by leading (see `liveness_loop`).
async fn witness_purge_loop(host: Weak<RaftHost>) {
    loop {
        tokio::time::sleep(WITNESS_PURGE_INTERVAL).await;
        let Some(host) = host.upgrade() else { return };
        host.witness_purge().await;
    }
}

impl RaftHost {
    /// Per group, what the data leader at the highest term says every data voter holds.
    async fn gather_progress(&self) -> BTreeMap<GroupId, DataProgress> {
        let witnesses = self.witnesses();
        let nodes: Vec<NodeRecord> = self
            .meta()
            .read_meta(|m| m.nodes())
            .unwrap_or_default()
            .into_iter()
            .filter(|n| !witnesses.contains(&n.id))
            .collect();
        let mut best: BTreeMap<GroupId, DataProgress> = BTreeMap::new();
        let answers = self
            .ask_peers::<Vec<DataProgress>>(&nodes, &Request::Progress)
            .await;
        for p in answers.into_iter().flat_map(|(_, p)| p) {
            if best.get(&p.group).is_none_or(|b| b.term < p.term) {
                best.insert(p.group, p);
            }
        }
        best
    }

    /// One purge round of a witness (see `witness_purge_loop`).
    async fn witness_purge(&self) {
        let progress = self.gather_progress().await;
        for (group, g) in self.groups_by_id() {
            if group == META_GROUP {
                continue; // the meta group is held whole and purged by openraft's policy
            }
            let Some(p) = progress.get(&group) else {
                continue;
            };
            let m = g.raft.metrics().borrow_watched().clone();
            let applied = m.last_applied.as_ref().map(|l| l.index).unwrap_or(0);
            let purged = m.purged.as_ref().map(|l| l.index).unwrap_or(0);
            let upto = p.held_by_all.min(applied);
            if upto < purged + WITNESS_PURGE_BATCH {
                continue;
            }
            if m.snapshot.as_ref().map(|l| l.index).unwrap_or(0) < upto {
                // openraft purges only what a snapshot covers; a witness's is its applied
                // state alone.
                if g.raft.trigger().snapshot().await.is_err() {
                    continue;
                }
                let deadline = tokio::time::Instant::now() + WITNESS_SNAPSHOT_WAIT;
                let covered = loop {
                    let at = g
                        .raft
                        .metrics()
                        .borrow_watched()
                        .snapshot
                        .as_ref()
                        .map(|l| l.index);
                    if at.unwrap_or(0) >= upto {
                        break true;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        break false;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                if !covered {
                    continue;
                }
            }
            tracing::debug!(group, upto, "witness purges entries every data voter holds");
            let _ = g.raft.trigger().purge_log(upto).await;
        }
    }
}

/// openraft refuses writes and membership changes from a leader whose quorum-ack lease
/// (`lease`, the longest election timeout) ran out, and a quiet group has no heartbeats to keep
/// it: one ReadIndex round (a heartbeat acknowledged by a majority) renews it first. Failures
/// are left to the operation that follows, which reports them.
async fn renew_lease(g: &Group, lease: Duration, timeout: Duration) {
    use openraft::Instant as _;
    type Now = openraft::type_config::alias::InstantOf<TypeConfig>;
    let acked = {
        let metrics = g.raft.metrics();
        let m = metrics.borrow_watched();
        if m.state != ServerState::Leader {
            return;
        }
        m.last_quorum_acked.as_ref().map(|a| **a)
    };
    if acked.is_some_and(|a| Now::now() < a + lease / 2) {
        return;
    }
    let _ = tokio::time::timeout(timeout, g.raft.ensure_linearizable(ReadPolicy::ReadIndex)).await;
}

async fn reconcile(host: &RaftHost) -> Result<(), String> {
    if host.disk_failure().is_some() {
        return Ok(());
    }
    host.refresh_witnesses();
    if host.config.witness {
        // A witness changes no membership and keeps no placement: it only hands on groups.
        for (group, g) in host.groups_by_id() {
            hand_over(host, group, &g).await;
        }
        return Ok(());
    }
    let meta = host.meta();
    let (nodes, settings, partitions, info, witnesses) = meta
        .read_meta(|m| -> Result<_, storage::StorageError> {
            Ok((
                m.nodes()?,
                m.node_settings()?,
                m.partitions()?,
                m.cluster()?,
                m.witnesses()?,
            ))
        })
        .map_err(|e| e.to_string())?;
    let Some(info) = info else { return Ok(()) };
    let addrs: BTreeMap<NodeId, String> = nodes
        .iter()
        .map(|n| (n.id, n.cluster_addr.clone()))
        .collect();
    let groups = host.groups_by_id();
    // The nodes whose disk is full, asked at most once a round and only when a leadership
    // decision needs it.
    let mut full: Option<BTreeSet<NodeId>> = None;
    // A group that cannot take a step now (no quorum, a leader handing over) is logged and
    // passed over, so it never holds up the groups after it.
    for (group, g) in groups {
        if !g.raft.is_leader() {
            continue;
        }
        let (voters, learners): (BTreeSet<NodeId>, BTreeSet<NodeId>) = if group == META_GROUP {
            // The meta leader also keeps the partition map on its plan.
            if let Err(e) = rebalance(host, &info, &nodes, &settings, &witnesses, &partitions).await
            {
                tracing::debug!(group, error = %e, "reconcile step: partition map");
            }
            meta_members(&settings, &witnesses)
        } else {
            let Some(record) = partitions.iter().find(|p| partition_group(p.id) == group) else {
                continue;
            };
            (record.replicas.iter().copied().collect(), BTreeSet::new())
        };
        if voters.is_empty() {
            continue;
        }
        let lease = Duration::from_millis(host.config.election_max_ms);
        match reconcile_group(&g, &voters, &learners, &addrs, lease).await {
            Ok(true) if group != META_GROUP => {
                let preferred = partitions
                    .iter()
                    .find(|p| partition_group(p.id) == group)
                    .and_then(|p| p.replicas.first().copied());
                if host.disk_low().is_some() {
                    // A full leader refuses new mail; a data voter with room takes it.
                    let full = full_once(host, &nodes, &mut full).await;
                    hand_to_data_voter(host, group, &g, full, "disk full: handing the group on")
                        .await;
                } else if let Some(preferred) = preferred.filter(|p| *p != host.id()) {
                    // Never back to a preferred leader whose disk is full: it would hand the
                    // group straight back.
                    if !full_once(host, &nodes, &mut full)
                        .await
                        .contains(&preferred)
                    {
                        balance_leader(host, group, &g, preferred).await
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(group, error = %e, "reconcile step"),
        }
    }
    Ok(())
}

/// The meta group's voters (up to `META_VOTERS_MAX`; draining nodes last, witnesses after the
/// data nodes) and learners.
fn meta_members(
    settings: &BTreeMap<NodeId, NodeSettings>,
    witnesses: &BTreeSet<NodeId>,
) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
    let mut order: Vec<NodeId> = settings.keys().copied().collect();
    order.sort_by_key(|n| (settings[n].draining, witnesses.contains(n), *n));
    let voters: BTreeSet<NodeId> = order.iter().copied().take(META_VOTERS_MAX).collect();
    let learners = order.into_iter().filter(|n| !voters.contains(n)).collect();
    (voters, learners)
}

/// How long the rebalancer waits for one node's view of its groups.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(1);

/// Per group, the view of the node that leads it at the highest term.
pub fn leader_views<'a>(
    views: impl Iterator<Item = &'a GroupStatus>,
) -> BTreeMap<GroupId, GroupStatus> {
    let mut best: BTreeMap<GroupId, GroupStatus> = BTreeMap::new();
    for v in views.filter(|v| v.state == "Leader") {
        if best.get(&v.group).is_none_or(|b| b.term < v.term) {
            best.insert(v.group, v.clone());
        }
    }
    best
}

/// Whether a partition's group is on its recorded placement: a leader, no joint
/// configuration, no learner, and exactly the recorded voters.
pub fn settled(record: &PartitionRecord, view: Option<&GroupStatus>) -> bool {
    view.is_some_and(|v| {
        let voters: BTreeSet<NodeId> = v.voters.iter().copied().collect();
        let want: BTreeSet<NodeId> = record.replicas.iter().copied().collect();
        v.leader.is_some() && v.configs.len() <= 1 && v.learners.is_empty() && voters == want
    })
}

/// The meta leader's rebalancer: plans the placement (`placement::plan`) and records the
/// planned replicas of a partition once the move can start. A partition whose group is not
/// yet on its recorded replicas is not given new ones (one membership change per group at a
/// time), and a move that joins or leaves a node already in `moves_per_node_max` moves waits.
/// Partitions short of replicas (a node removed) are refilled first and without that limit:
/// their redundancy is already reduced.
async fn rebalance(
    host: &RaftHost,
    info: &ClusterInfo,
    nodes: &[NodeRecord],
    settings: &BTreeMap<NodeId, NodeSettings>,
    witnesses: &BTreeSet<NodeId>,
    partitions: &[PartitionRecord],
) -> Result<(), String> {
    let target = crate::placement::plan(partitions, settings, witnesses, info.replicas as usize);
    let changed: Vec<usize> = (0..partitions.len())
        .filter(|i| target[*i] != partitions[*i])
        .collect();
    let tracking = !host.moves.lock().expect("moves lock").running.is_empty();
    if changed.is_empty() && !tracking {
        return Ok(());
    }
    let observed = host.observe(nodes).await;
    let full = if changed.is_empty() {
        BTreeSet::new()
    } else {
        host.full_disks(nodes).await
    };
    let now = std::time::Instant::now();
    let mut load: BTreeMap<NodeId, usize> = BTreeMap::new();
    let mut in_flight: BTreeSet<u32> = BTreeSet::new();
    {
        let mut moves = host.moves.lock().expect("moves lock");
        for r in partitions {
            let view = observed.get(&partition_group(r.id));
            if settled(r, view) {
                if let Some((start, from)) = moves.running.remove(&r.id) {
                    let took = now.saturating_duration_since(start);
                    tracing::info!(
                        partition = r.id,
                        ?from,
                        to = ?r.replicas,
                        seconds = took.as_secs_f64(),
                        "replica move done"
                    );
                    moves.done += 1;
                    moves.recent.push_back(took);
                    if moves.recent.len() > RECENT_MOVES {
                        moves.recent.pop_front();
                    }
                }
                continue;
            }
            in_flight.insert(r.id);
            if let Some(v) = view {
                let want: BTreeSet<NodeId> = r.replicas.iter().copied().collect();
                let have: BTreeSet<NodeId> = v.voters.iter().chain(&v.learners).copied().collect();
                for n in want.symmetric_difference(&have) {
                    *load.entry(*n).or_default() += 1;
                }
            }
        }
    }
    let per_partition = (info.replicas as usize).clamp(1, settings.len().max(1));
    let short = |r: &PartitionRecord| {
        r.replicas
            .iter()
            .filter(|n| settings.contains_key(n))
            .count()
            < per_partition
            || r.replicas.iter().any(|n| !settings.contains_key(n))
    };
    let mut order = changed;
    order.sort_by_key(|i| (!short(&partitions[*i]), *i));
    let max = host.config.moves_per_node_max.max(1);
    for i in order {
        let (record, planned) = (&partitions[i], &target[i]);
        let from: BTreeSet<NodeId> = record.replicas.iter().copied().collect();
        let to: BTreeSet<NodeId> = planned.replicas.iter().copied().collect();
        let moving: Vec<NodeId> = from.symmetric_difference(&to).copied().collect();
        if to.difference(&from).any(|n| full.contains(n)) {
            continue; // a full disk takes no new replica; the move waits for space
        }
        if !moving.is_empty() {
            let refill = short(record);
            if in_flight.contains(&record.id) && !refill {
                continue;
            }
            if !refill
                && moving
                    .iter()
                    .any(|n| load.get(n).copied().unwrap_or(0) >= max)
            {
                continue;
            }
            for n in &moving {
                *load.entry(*n).or_default() += 1;
            }
        }
        let cmd = Command::Meta(MetaCommand::SetReplicas {
            partition: record.id,
            replicas: planned.replicas.clone(),
        });
        host.write(META_GROUP, cmd)
            .await
            .map_err(|e| e.to_string())?;
        if !moving.is_empty() {
            tracing::info!(partition = record.id, from = ?record.replicas, to = ?planned.replicas, "replica move started");
            host.moves
                .lock()
                .expect("moves lock")
                .running
                .insert(record.id, (now, record.replicas.clone()));
        }
    }
    Ok(())
}

/// Hands a partition's leadership to its preferred replica (the first of its placement, as
/// the plan spreads leaders), once that replica is a voter holding the whole log; the new
/// leader prefers itself, so leadership settles instead of moving back and forth.
async fn balance_leader(host: &RaftHost, group: GroupId, g: &Group, preferred: NodeId) {
    let me = host.id();
    if preferred == me || !host.peer_alive(preferred) || host.witnesses().contains(&preferred) {
        return;
    }
    let m = g.raft.metrics().borrow_watched().clone();
    if !m
        .membership_config
        .membership()
        .voter_ids()
        .any(|v| v == preferred)
    {
        return;
    }
    let last = m.last_log_index.unwrap_or(0);
    let matched = m
        .replication
        .as_ref()
        .and_then(|r| r.get(&preferred).cloned().flatten())
        .map(|l| l.index);
    if m.state == ServerState::Leader && last > 0 && matched == Some(last) {
        tracing::debug!(group, to = preferred, "transferring leadership");
        // Lease reads stop before the transfer starts (see `RaftHost::read`).
        host.transfers.lock().expect("transfers lock").insert(
            group,
            Transfer {
                at: std::time::Instant::now(),
                term: m.current_term,
            },
        );
        let _ = g.raft.trigger().transfer_leader(preferred).await;
    }
}

/// The nodes whose disk is full, asked of the live peers the first time a round needs it.
async fn full_once<'a>(
    host: &RaftHost,
    nodes: &[NodeRecord],
    full: &'a mut Option<BTreeSet<NodeId>>,
) -> &'a BTreeSet<NodeId> {
    if full.is_none() {
        *full = Some(host.full_disks(nodes).await);
    }
    full.get_or_insert_with(BTreeSet::new)
}

/// On a witness that leads `group` (it was elected to hand a lagging data voter the log):
/// transfers the leadership to a live data voter holding the whole log, as soon as one does.
async fn hand_over(host: &RaftHost, group: GroupId, g: &Group) {
    let none = BTreeSet::new();
    hand_to_data_voter(
        host,
        group,
        g,
        &none,
        "witness hands the group to a data voter",
    )
    .await
}

/// Transfers the leadership of `group`, which this node leads, to a live data voter that holds
/// the whole log and is not in `avoid`, once per term; logs `why` when it does. Nothing happens
/// while no voter qualifies (the group stays here).
async fn hand_to_data_voter(
    host: &RaftHost,
    group: GroupId,
    g: &Group,
    avoid: &BTreeSet<NodeId>,
    why: &str,
) {
    let m = g.raft.metrics().borrow_watched().clone();
    if m.state != ServerState::Leader {
        return;
    }
    let witnesses = host.witnesses();
    let last = m.last_log_index.unwrap_or(0);
    let replication = m.replication.clone().unwrap_or_default();
    let target = m.membership_config.membership().voter_ids().find(|v| {
        !witnesses.contains(v)
            && !avoid.contains(v)
            && *v != host.id()
            && host.peer_alive(*v)
            && replication.get(v).cloned().flatten().map(|l| l.index) == Some(last)
    });
    let Some(target) = target else { return };
    let already = host
        .transfers
        .lock()
        .expect("transfers lock")
        .get(&group)
        .is_some_and(|t| t.term == m.current_term);
    if already {
        return;
    }
    tracing::info!(group, to = target, term = m.current_term, "{why}");
    host.transfers.lock().expect("transfers lock").insert(
        group,
        Transfer {
            at: std::time::Instant::now(),
            term: m.current_term,
        },
    );
    let _ = g.raft.trigger().transfer_leader(target).await;
}

/// One step toward the wanted membership: add a missing node as learner, promote a caught-up
/// learner, then drop voters and learners no longer wanted. Never shrinks before it grows.
/// Returns whether the membership already was the wanted one (nothing to do).
async fn reconcile_group(
    g: &Group,
    want_voters: &BTreeSet<NodeId>,
    want_learners: &BTreeSet<NodeId>,
    addrs: &BTreeMap<NodeId, String>,
    lease: Duration,
) -> Result<bool, String> {
    let m = g.raft.metrics().borrow_watched().clone();
    if m.state != ServerState::Leader {
        return Ok(false);
    }
    let membership = m.membership_config.membership().clone();
    if membership.get_joint_config().len() > 1 {
        // A change that an earlier leader left half done (it died between the joint and the
        // final configuration): finish it first. Counted as settled, it would leave the group
        // needing a majority of the old voters too, and losing one more of them would stop it
        // for good (chaos found this: a removal after a leader kill mid-promotion).
        let finish = ChangeMembers::AddVoterIds(BTreeSet::new());
        return timed(g, lease, g.raft.change_membership(finish, false))
            .await
            .map(|()| false);
    }
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let members: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
    for id in want_voters.iter().chain(want_learners) {
        if !members.contains(id) {
            let Some(addr) = addrs.get(id) else { continue };
            let node = NodeAddr { addr: addr.clone() };
            return timed(g, lease, g.raft.add_learner(*id, node, false))
                .await
                .map(|()| false);
        }
    }
    let last = m.last_log_index.unwrap_or(0);
    let replication = m.replication.clone().unwrap_or_default();
    for id in want_voters {
        if voters.contains(id) {
            continue;
        }
        let matched = replication
            .get(id)
            .cloned()
            .flatten()
            .map(|l| l.index)
            .unwrap_or(0);
        if matched + CATCH_UP_ENTRIES >= last {
            let change = ChangeMembers::AddVoterIds(BTreeSet::from([*id]));
            return timed(g, lease, g.raft.change_membership(change, false))
                .await
                .map(|()| false);
        }
    }
    if !want_voters.is_subset(&voters) {
        return Ok(false);
    }
    let extra_voters: BTreeSet<NodeId> = voters.difference(want_voters).copied().collect();
    if !extra_voters.is_empty() {
        return timed(
            g,
            lease,
            g.raft
                .change_membership(ChangeMembers::RemoveVoters(extra_voters), false),
        )
        .await
        .map(|()| false);
    }
    let extra: BTreeSet<NodeId> = members
        .iter()
        .copied()
        .filter(|n| !want_voters.contains(n) && !want_learners.contains(n))
        .collect();
    if !extra.is_empty() {
        return timed(
            g,
            lease,
            g.raft
                .change_membership(ChangeMembers::RemoveNodes(extra), false),
        )
        .await
        .map(|()| false);
    }
    Ok(true)
}

/// Runs one membership change (`f`, not yet started) after renewing the leader's lease.
async fn timed<T, E: std::fmt::Display>(
    g: &Group,
    lease: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<(), String> {
    renew_lease(g, lease, MEMBERSHIP_CHANGE_TIMEOUT).await;
    match tokio::time::timeout(MEMBERSHIP_CHANGE_TIMEOUT, f).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("membership change: {e}")),
        Err(_) => Err("membership change timed out".to_string()),
    }
}
