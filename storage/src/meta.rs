//! The cluster's meta state: identity, nodes, the partition map, and domains.
//!
//! Applied by the meta raft group on its voters and learners, so every node has a local copy
//! of the partition map and domain list.

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::partition::Txn;
use crate::types::*;
use crate::{codec, StorageError};

pub type NodeId = u64;
pub type PartitionId = u32;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub cluster_id: String,
    pub partitions: PartitionId,
    pub replicas: u32,
    pub created: UnixSeconds,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    /// QUIC address peers and commands use.
    pub cluster_addr: String,
    /// Client-facing listeners by protocol name ("smtp", "imap", "http", ...).
    pub listeners: BTreeMap<String, String>,
    pub joined: UnixSeconds,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRecord {
    pub id: PartitionId,
    /// Nodes that should hold a replica (the placement's target, not live state). The first
    /// is the replica that should lead the partition's group.
    pub replicas: Vec<NodeId>,
}

/// How the placement treats a node: its share of replicas and whether it is being emptied.
/// Kept apart from [`NodeRecord`] (its own record family) so records written before it
/// existed still read; a node without one has the default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSettings {
    /// Capacity weight: a node of weight 2 holds twice the replicas of one of weight 1.
    pub weight: u32,
    /// Every replica and leadership moves off the node.
    pub draining: bool,
    /// With `draining`: the node that takes each of this node's replicas (`node replace`).
    pub replace_by: Option<NodeId>,
}

/// What a node is for. Kept in its own record family (absent means `Data`), so records
/// written before roles existed read unchanged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeRole {
    /// Holds mailbox replicas, leads groups and serves clients.
    #[default]
    Data,
    /// Votes in groups and keeps their log until every data voter has it; never holds mailbox
    /// state or serves clients, and leads only to hand a lagging data voter the log.
    Witness,
}

/// The heaviest weight a node can be given.
pub const NODE_WEIGHT_MAX: u32 = 1000;

impl Default for NodeSettings {
    fn default() -> NodeSettings {
        NodeSettings {
            weight: 1,
            draining: false,
            replace_by: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DomainLimits {
    /// Total bytes of every mailbox in the domain; zero means unlimited.
    pub quota_bytes: u64,
    /// Largest message accepted for the domain; zero means the cluster default.
    pub message_bytes_max: u64,
}

/// Limits that apply to every domain unless the domain sets its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterLimits {
    /// Largest message accepted, in bytes.
    pub message_bytes_max: u64,
}

/// The largest message a new cluster accepts (what the large free providers accept).
pub const DEFAULT_MESSAGE_BYTES_MAX: u64 = 25 * 1024 * 1024;

impl Default for ClusterLimits {
    fn default() -> ClusterLimits {
        ClusterLimits {
            message_bytes_max: DEFAULT_MESSAGE_BYTES_MAX,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Domain {
    pub name: String,
    pub limits: DomainLimits,
    pub created: UnixSeconds,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    Init {
        info: ClusterInfo,
        node: NodeRecord,
    },
    AddNode(NodeRecord),
    RemoveNode(NodeId),
    SetListeners {
        id: NodeId,
        listeners: BTreeMap<String, String>,
    },
    SetReplicas {
        partition: PartitionId,
        replicas: Vec<NodeId>,
    },
    AddDomain {
        name: String,
        now: UnixSeconds,
    },
    RemoveDomain(String),
    SetDomainLimits {
        name: String,
        limits: DomainLimits,
    },
    SetClusterLimits(ClusterLimits),
    /// Sets (or with `None` removes) the DKIM signing key of a served domain.
    SetDkim {
        domain: String,
        key: Option<DkimKey>,
    },
    /// Sets a node's capacity weight (1 to [`NODE_WEIGHT_MAX`]).
    SetNodeWeight {
        id: NodeId,
        weight: u32,
    },
    /// Starts (`draining`) or ends emptying a node; `replace_by` names the node that takes its
    /// replicas one for one.
    SetNodeDraining {
        id: NodeId,
        draining: bool,
        replace_by: Option<NodeId>,
    },
    /// Adds a node with a role other than `Data` (a witness), in one step, so no plan ever
    /// gives it mailbox replicas.
    AddNodeAs {
        node: NodeRecord,
        role: NodeRole,
    },
    /// Raises the cluster's active format (`crate::version`); never lowers it. Format 2: an
    /// older binary cannot decode it, so it is proposed only once every node speaks it.
    SetClusterFormat(u32),
}

/// A domain's DKIM signing key (RFC 6376), generated by the proposer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DkimKey {
    pub selector: String,
    /// "rsa" (RSA-SHA256) or "ed25519" (RFC 8463).
    pub algorithm: String,
    /// PKCS#1 DER for RSA, PKCS#8 DER for Ed25519.
    pub private_der: Vec<u8>,
    /// The `p=` value of the DNS record (base64 of the public key).
    pub public_base64: String,
    pub created: UnixSeconds,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetaError {
    #[error("cluster is already initialised")]
    AlreadyInitialised,
    #[error("cluster is not initialised")]
    NotInitialised,
    #[error("node {0} already exists")]
    NodeExists(NodeId),
    #[error("no such node {0}")]
    NoSuchNode(NodeId),
    #[error("no such partition")]
    NoSuchPartition,
    #[error("domain already exists")]
    DomainExists,
    #[error("no such domain")]
    NoSuchDomain,
    #[error("invalid domain name")]
    InvalidDomain,
    #[error("invalid limit: {0}")]
    InvalidLimit(String),
    #[error("the cluster's active format is {active}; it never goes down (asked: {asked})")]
    FormatDown { active: u32, asked: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResponse {
    Done,
    Refused(MetaError),
}

const CLUSTER: &[u8] = b"cluster";
const LIMITS: &[u8] = b"limits";
/// The cluster's active format (`u32`; absent: `version::FORMAT_INITIAL`).
const FORMAT: &[u8] = b"format";
const NODE: u8 = b'N';
const PARTITION: u8 = b'P';
const DOMAIN: u8 = b'D';
const DKIM: u8 = b'K';
const SETTINGS: u8 = b'W';
const ROLE: u8 = b'R';

fn role_key(id: NodeId) -> Vec<u8> {
    let mut k = vec![ROLE];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn settings_key(id: NodeId) -> Vec<u8> {
    let mut k = vec![SETTINGS];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn dkim_key(domain: &str) -> Vec<u8> {
    let mut k = vec![DKIM];
    k.extend_from_slice(domain.as_bytes());
    k
}

fn node_key(id: NodeId) -> Vec<u8> {
    let mut k = vec![NODE];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn partition_key(id: PartitionId) -> Vec<u8> {
    let mut k = vec![PARTITION];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn domain_key(name: &str) -> Vec<u8> {
    let mut k = vec![DOMAIN];
    k.extend_from_slice(name.as_bytes());
    k
}

fn get<T: DeserializeOwned>(txn: &Txn<'_>, k: &[u8]) -> Result<Option<T>, StorageError> {
    txn.get_raw(k)?
        .map(|v| codec::decode(&v))
        .transpose()
        .map_err(Into::into)
}

fn put<T: Serialize>(txn: &mut Txn<'_>, k: Vec<u8>, v: &T) {
    txn.put_raw(k, codec::encode(v));
}

pub(crate) fn apply(txn: &mut Txn<'_>, cmd: &MetaCommand) -> Result<MetaResponse, StorageError> {
    use MetaCommand as C;
    let refused = |e| Ok(MetaResponse::Refused(e));
    let initialised = get::<ClusterInfo>(txn, CLUSTER)?.is_some();
    if !initialised && !matches!(cmd, C::Init { .. }) {
        return refused(MetaError::NotInitialised);
    }
    match cmd {
        C::Init { info, node } => {
            if initialised {
                return refused(MetaError::AlreadyInitialised);
            }
            put(txn, CLUSTER.to_vec(), info);
            put(txn, node_key(node.id), node);
            for p in 0..info.partitions {
                let record = PartitionRecord {
                    id: p,
                    replicas: vec![node.id],
                };
                put(txn, partition_key(p), &record);
            }
        }
        C::AddNode(node) => {
            if get::<NodeRecord>(txn, &node_key(node.id))?.is_some() {
                return refused(MetaError::NodeExists(node.id));
            }
            put(txn, node_key(node.id), node);
        }
        C::AddNodeAs { node, role } => {
            if get::<NodeRecord>(txn, &node_key(node.id))?.is_some() {
                return refused(MetaError::NodeExists(node.id));
            }
            put(txn, node_key(node.id), node);
            if *role != NodeRole::Data {
                put(txn, role_key(node.id), role);
            }
        }
        C::RemoveNode(id) => {
            if get::<NodeRecord>(txn, &node_key(*id))?.is_none() {
                return refused(MetaError::NoSuchNode(*id));
            }
            txn.del_raw(node_key(*id));
            txn.del_raw(settings_key(*id));
            txn.del_raw(role_key(*id));
        }
        C::SetNodeWeight { id, weight } => {
            if get::<NodeRecord>(txn, &node_key(*id))?.is_none() {
                return refused(MetaError::NoSuchNode(*id));
            }
            if *weight == 0 || *weight > NODE_WEIGHT_MAX {
                return refused(MetaError::InvalidLimit(format!(
                    "a node's weight is between 1 and {NODE_WEIGHT_MAX} (drain it to give it nothing)"
                )));
            }
            let mut settings = get::<NodeSettings>(txn, &settings_key(*id))?.unwrap_or_default();
            settings.weight = *weight;
            put(txn, settings_key(*id), &settings);
        }
        C::SetNodeDraining {
            id,
            draining,
            replace_by,
        } => {
            if get::<NodeRecord>(txn, &node_key(*id))?.is_none() {
                return refused(MetaError::NoSuchNode(*id));
            }
            if let Some(new) = replace_by {
                if new == id || get::<NodeRecord>(txn, &node_key(*new))?.is_none() {
                    return refused(MetaError::NoSuchNode(*new));
                }
            }
            let mut settings = get::<NodeSettings>(txn, &settings_key(*id))?.unwrap_or_default();
            settings.draining = *draining;
            settings.replace_by = replace_by.filter(|_| *draining);
            put(txn, settings_key(*id), &settings);
        }
        C::SetListeners { id, listeners } => {
            let Some(mut node) = get::<NodeRecord>(txn, &node_key(*id))? else {
                return refused(MetaError::NoSuchNode(*id));
            };
            node.listeners = listeners.clone();
            put(txn, node_key(*id), &node);
        }
        C::SetReplicas {
            partition,
            replicas,
        } => {
            let k = partition_key(*partition);
            if get::<PartitionRecord>(txn, &k)?.is_none() {
                return refused(MetaError::NoSuchPartition);
            }
            let record = PartitionRecord {
                id: *partition,
                replicas: replicas.clone(),
            };
            put(txn, k, &record);
        }
        C::AddDomain { name, now } => {
            if !is_valid_domain(name) {
                return refused(MetaError::InvalidDomain);
            }
            if get::<Domain>(txn, &domain_key(name))?.is_some() {
                return refused(MetaError::DomainExists);
            }
            let domain = Domain {
                name: name.clone(),
                limits: DomainLimits::default(),
                created: *now,
            };
            put(txn, domain_key(name), &domain);
        }
        C::RemoveDomain(name) => {
            if get::<Domain>(txn, &domain_key(name))?.is_none() {
                return refused(MetaError::NoSuchDomain);
            }
            txn.del_raw(domain_key(name));
            txn.del_raw(dkim_key(name));
        }
        C::SetDkim { domain, key } => {
            if get::<Domain>(txn, &domain_key(domain))?.is_none() {
                return refused(MetaError::NoSuchDomain);
            }
            match key {
                Some(key) => put(txn, dkim_key(domain), key),
                None => txn.del_raw(dkim_key(domain)),
            }
        }
        C::SetDomainLimits { name, limits } => {
            let Some(mut domain) = get::<Domain>(txn, &domain_key(name))? else {
                return refused(MetaError::NoSuchDomain);
            };
            if limits.message_bytes_max > crate::partition::MESSAGE_BYTES_MAX as u64 {
                return refused(MetaError::InvalidLimit(format!(
                    "largest message size is {} bytes",
                    crate::partition::MESSAGE_BYTES_MAX
                )));
            }
            domain.limits = limits.clone();
            put(txn, domain_key(name), &domain);
        }
        C::SetClusterFormat(asked) => {
            // Deterministic: no binary's own range is consulted here (the proposer checked
            // that every node speaks the format).
            let active = get::<u32>(txn, FORMAT)?.unwrap_or(crate::version::FORMAT_INITIAL);
            if *asked < active {
                return refused(MetaError::FormatDown {
                    active,
                    asked: *asked,
                });
            }
            put(txn, FORMAT.to_vec(), asked);
        }
        C::SetClusterLimits(limits) => {
            let max = crate::partition::MESSAGE_BYTES_MAX as u64;
            if limits.message_bytes_max == 0 || limits.message_bytes_max > max {
                return refused(MetaError::InvalidLimit(format!(
                    "message size limit must be between 1 and {max} bytes"
                )));
            }
            put(txn, LIMITS.to_vec(), limits);
        }
    }
    Ok(MetaResponse::Done)
}

/// Read-only view of the meta state.
pub struct MetaView<'a> {
    pub(crate) tree: &'a sled::Tree,
}

impl MetaView<'_> {
    fn scan<T: DeserializeOwned>(&self, prefix: u8) -> Result<Vec<T>, StorageError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([prefix]) {
            out.push(codec::decode(&item?.1)?);
        }
        Ok(out)
    }

    pub fn cluster(&self) -> Result<Option<ClusterInfo>, StorageError> {
        self.tree
            .get(CLUSTER)?
            .map(|v| codec::decode(&v))
            .transpose()
            .map_err(Into::into)
    }

    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StorageError> {
        self.scan(NODE)
    }

    pub fn node(&self, id: NodeId) -> Result<Option<NodeRecord>, StorageError> {
        self.tree
            .get(node_key(id))?
            .map(|v| codec::decode(&v))
            .transpose()
            .map_err(Into::into)
    }

    /// Every node's placement settings; a node without a record has the default.
    pub fn node_settings(&self) -> Result<BTreeMap<NodeId, NodeSettings>, StorageError> {
        let mut out = BTreeMap::new();
        for node in self.nodes()? {
            let settings = self
                .tree
                .get(settings_key(node.id))?
                .map(|v| codec::decode(&v))
                .transpose()?
                .unwrap_or_default();
            out.insert(node.id, settings);
        }
        Ok(out)
    }

    /// Every node's role; a node without a role record holds data.
    pub fn roles(&self) -> Result<BTreeMap<NodeId, NodeRole>, StorageError> {
        let mut out = BTreeMap::new();
        for node in self.nodes()? {
            let role = self
                .tree
                .get(role_key(node.id))?
                .map(|v| codec::decode(&v))
                .transpose()?
                .unwrap_or_default();
            out.insert(node.id, role);
        }
        Ok(out)
    }

    /// The nodes that are witnesses.
    pub fn witnesses(&self) -> Result<std::collections::BTreeSet<NodeId>, StorageError> {
        Ok(self
            .roles()?
            .into_iter()
            .filter(|(_, r)| *r == NodeRole::Witness)
            .map(|(id, _)| id)
            .collect())
    }

    pub fn partitions(&self) -> Result<Vec<PartitionRecord>, StorageError> {
        self.scan(PARTITION)
    }

    /// The cluster's active format (see `crate::version`).
    pub fn cluster_format(&self) -> Result<u32, StorageError> {
        Ok(self
            .tree
            .get(FORMAT)?
            .map(|v| codec::decode(&v))
            .transpose()?
            .unwrap_or(crate::version::FORMAT_INITIAL))
    }

    pub fn limits(&self) -> Result<ClusterLimits, StorageError> {
        Ok(self
            .tree
            .get(LIMITS)?
            .map(|v| codec::decode(&v))
            .transpose()?
            .unwrap_or_default())
    }

    pub fn domains(&self) -> Result<Vec<Domain>, StorageError> {
        self.scan(DOMAIN)
    }

    pub fn dkim(&self, domain: &str) -> Result<Option<DkimKey>, StorageError> {
        self.tree
            .get(dkim_key(domain))?
            .map(|v| codec::decode(&v))
            .transpose()
            .map_err(Into::into)
    }

    pub fn domain(&self, name: &str) -> Result<Option<Domain>, StorageError> {
        self.tree
            .get(domain_key(name))?
            .map(|v| codec::decode(&v))
            .transpose()
            .map_err(Into::into)
    }
}
