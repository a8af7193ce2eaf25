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
    /// Nodes that should hold a replica (the placement's target, not live state).
    pub replicas: Vec<NodeId>,
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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResponse {
    Done,
    Refused(MetaError),
}

const CLUSTER: &[u8] = b"cluster";
const LIMITS: &[u8] = b"limits";
const NODE: u8 = b'N';
const PARTITION: u8 = b'P';
const DOMAIN: u8 = b'D';

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
        C::RemoveNode(id) => {
            if get::<NodeRecord>(txn, &node_key(*id))?.is_none() {
                return refused(MetaError::NoSuchNode(*id));
            }
            txn.del_raw(node_key(*id));
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

    pub fn partitions(&self) -> Result<Vec<PartitionRecord>, StorageError> {
        self.scan(PARTITION)
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

    pub fn domain(&self, name: &str) -> Result<Option<Domain>, StorageError> {
        self.tree
            .get(domain_key(name))?
            .map(|v| codec::decode(&v))
            .transpose()
            .map_err(Into::into)
    }
}
