//! A node's data directory: its identity file, TLS material, database and snapshots.
//!
//! ```text
//! DIR/node.toml      node id, cluster (and bind) address, cluster id, partitions, replicas
//! DIR/tls/           ca.pem, ca.key, node.pem, node.key, join.secret
//! DIR/db/            the sled database (every group's log and state)
//! DIR/snapshots/G/   snapshot files of group G
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFile {
    pub node_id: u64,
    pub cluster_addr: String,
    /// The local address the cluster socket binds, when it is not `cluster_addr` (behind NAT,
    /// a port forward or a proxy; or `0.0.0.0:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_addr: Option<String>,
    pub cluster_id: String,
    pub partitions: u32,
    pub replicas: u32,
    /// A witness: votes in every group and keeps logs, holds no mail, serves no client.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub witness: bool,
}

pub const NODE_FILE: &str = "node.toml";
pub const JOIN_SECRET_FILE: &str = "join.secret";

pub fn tls_dir(dir: &Path) -> PathBuf {
    dir.join("tls")
}

pub fn db_dir(dir: &Path) -> PathBuf {
    dir.join("db")
}

impl NodeFile {
    pub fn load(dir: &Path) -> anyhow::Result<NodeFile> {
        let path = dir.join(NODE_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is not a mailgrid data directory (cannot read {})",
                dir.display(),
                path.display()
            )
        })?;
        let file: NodeFile =
            toml::from_str(&text).with_context(|| format!("{} is malformed", path.display()))?;
        if file.partitions == 0 || file.replicas == 0 {
            bail!(
                "{}: partitions and replicas must be at least 1",
                path.display()
            );
        }
        Ok(file)
    }

    /// The address the cluster socket binds.
    pub fn bind_addr(&self) -> &str {
        self.bind_addr.as_deref().unwrap_or(&self.cluster_addr)
    }

    /// What the store records about its owner: cluster and node id.
    pub fn identity(&self) -> String {
        format!("mailgrid cluster {} node {}", self.cluster_id, self.node_id)
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let text = toml::to_string(self).context("encoding node.toml")?;
        raft::tls::write_private(&dir.join(NODE_FILE), &text)?;
        Ok(())
    }
}

/// Refuses to create a node where one already exists (or anything else lives).
pub fn prepare_new(dir: &Path) -> anyhow::Result<()> {
    if dir.join(NODE_FILE).exists() || db_dir(dir).exists() {
        bail!(
            "{} already holds a mailgrid node; use a new directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(tls_dir(dir))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(())
}
