//! The openraft type configuration shared by every group, and the aliases the crate uses.

use serde::{Deserialize, Serialize};

pub use storage::meta::NodeId;

/// What a raft membership records about a node: where to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    pub addr: String,
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = storage::Command,
        R = storage::Response,
        NodeId = u64,
        Node = NodeAddr,
);

pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// What an [`Entry`] carries (named for the golden-format tests).
pub type EntryPayload = openraft::type_config::alias::EntryPayloadOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;

/// Raft group ids: the meta group is 0, partition `p` is group `p + 1`.
pub type GroupId = u64;
pub const META_GROUP: GroupId = 0;

pub fn partition_group(partition: u32) -> GroupId {
    partition as GroupId + 1
}
