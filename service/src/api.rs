//! Requests nodes and commands send each other over the cluster transport, and their answers.
//!
//! `Peer*` requests travel between nodes (the caller already knows which node leads the
//! group). `Client` requests come from `mailgrid` commands and are routed by the node.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use storage::meta::{ClusterInfo, ClusterLimits, Domain, NodeRecord, NodeRole, PartitionRecord};
use storage::partition::{
    Account, Alias, Mailbox, MessageRecord, QueueEntry, QueueId, Quota, RecipientOutcome, Usage,
};
use storage::types::{BodyHash, ModSeq, Uid};
use storage::Command;

pub use raft::host::GroupStatus;
pub use raft::GroupId;

#[derive(Debug, Serialize, Deserialize)]
pub enum ServiceRequest {
    Join(JoinRequest),
    PeerWrite {
        group: GroupId,
        cmd: Command,
    },
    PeerRead {
        group: GroupId,
        query: Query,
    },
    /// This node's own view of its groups.
    LocalStatus,
    /// Digest of this node's own replica of a group.
    LocalDigest(GroupId),
    Client(ClientRequest),
    /// The rebalance as the receiving node runs it (`raft::host::MoveStats`).
    MoveStats,
    /// Like `Join`, for a node joining as a witness (a seed that predates witnesses cannot
    /// decode it and refuses the join, rather than taking the node for a data node).
    JoinWitness(JoinRequest),
    /// What is wrong with the receiving node (`Vec<String>`, empty when healthy).
    LocalHealth,
    /// The receiving node's release and the cluster formats it speaks (`NodeVersion`).
    /// Format 2; asked of any peer: one that predates it cannot decode it and answers with
    /// an error, which reads as release 0.1.0 (format 1).
    LocalVersion,
}

/// A node's release and the range of cluster formats it speaks (`storage::version`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeVersion {
    pub binary: String,
    pub format_min: u32,
    pub format_max: u32,
}

impl NodeVersion {
    /// This binary's.
    pub fn this() -> NodeVersion {
        NodeVersion {
            binary: storage::version::BINARY.to_string(),
            format_min: storage::version::FORMAT_MIN,
            format_max: storage::version::FORMAT_MAX,
        }
    }
}

/// The cluster's active format and what each node runs (`None`: it gave no answer; it is
/// down or cut off).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterVersions {
    pub active_format: u32,
    pub nodes: BTreeMap<u64, Option<NodeVersion>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub secret: String,
    pub node_id: u64,
    pub cluster_addr: String,
    pub public_key_pem: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinAccepted {
    pub cert_pem: String,
    pub ca_key_pem: String,
    pub cluster: ClusterInfo,
}

/// Reads served by a group's leader after confirming its leadership.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Query {
    Lookup(String),
    Accounts {
        domain: Option<String>,
    },
    Aliases {
        domain: Option<String>,
    },
    Mailboxes(String),
    Mailbox {
        address: String,
        name: String,
    },
    /// UIDs expunged from a mailbox after MODSEQ `since` (QRESYNC).
    Vanished {
        address: String,
        mailbox: String,
        since: ModSeq,
    },
    Messages {
        address: String,
        mailbox: String,
        from: Uid,
        limit: usize,
    },
    /// What changed in a mailbox after MODSEQ `since` (an IMAP session catching up).
    Changes {
        address: String,
        mailbox: String,
        since: ModSeq,
    },
    Body(BodyHash),
    /// Sum of the usage of a domain's accounts in one partition.
    DomainUsage(String),
    /// Up to `limit` outbound queue entries after `after`, in id order.
    Queue {
        after: Option<QueueId>,
        limit: usize,
    },
    QueueEntry(QueueId),
    /// A domain's DKIM key (meta).
    Dkim(String),
    Digest,
    Cluster,
    Nodes,
    Partitions,
    Domains,
    Limits,
    /// Several stored messages of one partition in one read, or only their headers (each up
    /// to and with the empty line that ends it). New variants go last: the tag is the index.
    Contents {
        hashes: Vec<BodyHash>,
        headers_only: bool,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum QueryResult {
    Lookup(Lookup),
    Accounts(Vec<Account>),
    Aliases(Vec<Alias>),
    Mailboxes(Vec<Mailbox>),
    Mailbox(Option<Mailbox>),
    /// `None` when the mailbox does not exist.
    Vanished(Option<Vanished>),
    Messages(Option<(Mailbox, Vec<(Uid, MessageRecord)>)>),
    Changes(Option<MailboxChanges>),
    Body(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    Digest([u8; 32]),
    Cluster(Option<ClusterInfo>),
    Nodes(Vec<NodeRecord>),
    Partitions(Vec<PartitionRecord>),
    Domains(Vec<Domain>),
    Limits(ClusterLimits),
    Usage(Usage),
    Queue(Vec<QueueEntry>),
    QueueEntry(Option<QueueEntry>),
    Dkim(Option<storage::meta::DkimKey>),
    /// One entry per asked hash, in order; `None` for a message no longer stored.
    Contents(Vec<Content>),
}

/// A stored message (or its header) as a read returns it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Content(#[serde(with = "serde_bytes")] pub Option<Vec<u8>>);

/// What was expunged from a mailbox after some MODSEQ.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Vanished {
    /// These UIDs, ascending.
    Exactly(Vec<Uid>),
    /// The mailbox's expunge history no longer reaches back that far: every UID below
    /// UIDNEXT that is not in the mailbox may have vanished since.
    Forgotten,
}

/// A mailbox's changes after some MODSEQ, read in one go at the partition leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MailboxChanges {
    pub mailbox: Mailbox,
    /// Messages added or re-flagged since, in UID order.
    pub changed: Vec<(Uid, MessageRecord)>,
    /// Whether `changed` holds all of them (else the reader lists the whole mailbox).
    pub complete: bool,
    /// UIDs expunged since.
    pub vanished: Vec<Uid>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Lookup {
    Account(Account),
    Alias(Alias),
    Unknown,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ClientRequest {
    DomainAdd(String),
    DomainRemove(String),
    DomainList,
    /// Changes the given limits of a domain (the others keep their value).
    DomainLimits {
        name: String,
        quota_bytes: Option<u64>,
        message_bytes_max: Option<u64>,
    },
    /// Shows the cluster-wide limits, changing those given.
    ClusterLimits {
        message_bytes_max: Option<u64>,
    },
    UserAdd {
        address: String,
        password: String,
        quota: Quota,
    },
    UserPasswd {
        address: String,
        password: String,
    },
    UserRemove(String),
    UserList {
        domain: Option<String>,
    },
    AliasAdd {
        address: String,
        targets: Vec<String>,
    },
    AliasRemove(String),
    AliasList {
        domain: Option<String>,
    },
    QuotaSet {
        address: String,
        quota: Quota,
    },
    QuotaShow(String),
    Deliver {
        recipients: Vec<String>,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        delivery_id: Option<String>,
    },
    /// Every message of a mailbox with its body (for checks and tests).
    Fetch {
        address: String,
        mailbox: String,
    },
    Status,
    NodeRemove(u64),
    /// Digest of every replica of a group, by node (replicas that caught up must agree).
    Digests(GroupId),
    /// Counters of the node that receives the request.
    NodeStats,
    /// Every outbound queue entry (without bodies), oldest first.
    QueueList,
    /// One entry by its id (hex).
    QueueShow(String),
    QueueControl {
        id: String,
        action: QueueOp,
    },
    /// Makes (or replaces) a domain's DKIM key; answers the DNS record to publish.
    DkimGenerate {
        domain: String,
        selector: String,
        algorithm: String,
    },
    DkimShow(String),
    DkimRemove(String),
    /// Adds an account with an existing argon2 password hash (PHC string), as when moving
    /// users over from another server: their passwords keep working, nothing is rehashed.
    UserImport {
        address: String,
        password_hash: String,
        quota: Quota,
    },
    /// Moves every replica and leadership off a node (`undrain` with `false`).
    NodeDrain {
        id: u64,
        draining: bool,
    },
    /// Sets a node's capacity weight.
    NodeWeight {
        id: u64,
        weight: u32,
    },
    /// Gives each of `old`'s replicas to `new`, then leaves `old` empty.
    NodeReplace {
        old: u64,
        new: u64,
    },
    /// Every node's replicas and leaders against the plan, and the moves under way.
    Placement,
    /// Every node's role and what is wrong with it (`Vec<NodeHealth>`).
    Health,
    /// The active cluster format and every node's release (`ClusterVersions`).
    Versions,
    /// Raises the active cluster format to the newest every node speaks, once every node
    /// runs a binary that speaks this one's newest (`ClusterVersions` after the change).
    UpgradeFinish,
}

/// What an operator does to a queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueOp {
    /// Try it now (a held entry is released).
    Retry,
    /// Drop it without delivering or bouncing.
    Delete,
    Hold,
    Release,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ClientReply {
    Done,
    Domains(Vec<DomainReport>),
    ClusterLimits(ClusterLimits),
    Accounts(Vec<Account>),
    Aliases(Vec<Alias>),
    Quota(Account),
    Delivered(Vec<(String, RecipientOutcome)>),
    Messages(Vec<FetchedMessage>),
    Status(ClusterStatus),
    Digests(BTreeMap<u64, Option<String>>),
    NodeStats(NodeStats),
    Queue(Vec<QueueEntry>),
    /// A DNS record to publish, in zone-file form.
    Record(String),
    Placement(PlacementStatus),
    Health(Vec<NodeHealth>),
    Versions(ClusterVersions),
}

/// One node's role and its problems, as the answering node knows them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHealth {
    pub id: u64,
    pub role: NodeRole,
    /// Empty when healthy; else one plain sentence each ("unreachable: no beat for 3 s").
    pub problems: Vec<String>,
}

/// Where the rebalance stands: each node against its target, and the moves.
#[derive(Debug, Serialize, Deserialize)]
pub struct PlacementStatus {
    pub nodes: Vec<NodePlacement>,
    /// Replicas the plan adds to partitions whose new replicas are not yet recorded.
    pub moves_pending: u64,
    /// Partitions whose group is not yet on its recorded replicas.
    pub moves_running: u64,
    /// Moves the meta leader saw finish while meta leader, since its process started.
    pub moves_done: u64,
    /// Mean duration of the meta leader's recent moves.
    pub move_mean_ms: Option<u64>,
    /// Rough time until the rebalance is done, from the recent moves' pace.
    pub estimate_s: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodePlacement {
    pub id: u64,
    pub weight: u32,
    pub draining: bool,
    pub replace_by: Option<u64>,
    /// Partitions whose group has this node as a voter or learner, as their leaders see it.
    pub replicas: u64,
    /// Replicas the plan gives it.
    pub replicas_target: u64,
    /// Partitions it leads.
    pub leaders: u64,
    /// Partitions whose plan prefers it as leader.
    pub leaders_target: u64,
    /// Draining and holding nothing: it can be stopped or removed without leaving any
    /// partition short of replicas.
    pub drained: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DomainReport {
    pub domain: Domain,
    /// Bytes and messages stored in all the domain's mailboxes.
    pub usage: Usage,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeStats {
    pub node_id: u64,
    /// Cluster transport calls served (raft RPCs and requests) since the node started.
    pub calls_served: u64,
    /// flush + fdatasync rounds of the storage syncer since start.
    pub syncs: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FetchedMessage {
    pub uid: u32,
    pub uid_validity: u32,
    pub flags: Vec<String>,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster: Option<ClusterInfo>,
    pub nodes: Vec<NodeStatus>,
    pub partitions: Vec<PartitionStatus>,
    /// Each reachable node's own view of every group (state, term, applied index, members):
    /// what to read when a group has no leader.
    #[serde(default)]
    pub views: BTreeMap<u64, Vec<raft::host::GroupStatus>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: u64,
    pub cluster_addr: String,
    /// Client-facing listeners by protocol ("smtp", "submission", ...), as the node bound them.
    pub listeners: BTreeMap<String, String>,
    pub reachable: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PartitionStatus {
    /// `None` for the meta group.
    pub partition: Option<u32>,
    pub group: GroupId,
    pub placement: Vec<u64>,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub leader: Option<u64>,
    pub term: u64,
    /// The group is between two voter sets (a membership change under way or left half done).
    #[serde(default)]
    pub joint: bool,
    pub healthy: bool,
}

/// What a node answers to a client request.
pub type ClientResult = Result<ClientReply, String>;
