//! How commands reach the cluster: with the credentials of a node's data directory, over the
//! cluster transport, to that node (or to `--node ADDR`), which routes the request.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};
use raft::tls::Identity;
use raft::transport::{Peer, Transport};
use storage::codec;

use crate::api::{ClientReply, ClientRequest, ClientResult, ServiceRequest};
use crate::datadir::{self, NodeFile};
use crate::router::raft_service;

/// Long enough for a write that waits out a leader election.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Client {
    transport: Transport,
    node_id: u64,
    addr: String,
}

impl Client {
    /// Acts with the credentials in `dir`; talks to `node_addr` or to that node itself.
    pub fn open(dir: &Path, node_addr: Option<&str>) -> anyhow::Result<Client> {
        let file = NodeFile::load(dir)?;
        let identity = Identity::load(&datadir::tls_dir(dir))
            .with_context(|| format!("cannot load the credentials in {}", dir.display()))?;
        let transport = Transport::client(identity.client_config()?)?;
        let (node_id, addr) = match node_addr {
            Some(a) => (None, a.to_string()),
            None => (Some(file.node_id), file.cluster_addr.clone()),
        };
        Ok(Client {
            transport,
            node_id: node_id.unwrap_or(0),
            addr,
        })
    }

    pub async fn request(&self, request: ClientRequest) -> anyhow::Result<ClientReply> {
        // Requests that change nothing, or carry their own idempotency key, survive a
        // reconnect to a restarted node; any other request is sent once.
        let retries = match &request {
            ClientRequest::Deliver { delivery_id, .. } if delivery_id.is_some() => 2,
            ClientRequest::DomainList
            | ClientRequest::UserList { .. }
            | ClientRequest::AliasList { .. }
            | ClientRequest::QuotaShow(_)
            | ClientRequest::Fetch { .. }
            | ClientRequest::Status
            | ClientRequest::Digests(_)
            | ClientRequest::NodeStats => 2,
            _ => 0,
        };
        let bytes = codec::encode(&raft_service(codec::encode(&ServiceRequest::Client(
            request,
        ))));
        let peer = if self.node_id == 0 {
            Peer::AnyMember
        } else {
            Peer::Node(self.node_id)
        };
        let mut attempt = 0;
        let response = loop {
            match self
                .transport
                .call(peer, &self.addr, &bytes, None, CALL_TIMEOUT)
                .await
            {
                Ok(r) => break r,
                Err(e) if attempt < retries => {
                    attempt += 1;
                    tracing::debug!(error = %e, "retrying request");
                }
                Err(e) => {
                    return Err(anyhow!(e))
                        .with_context(|| format!("cannot reach the node at {}", self.addr))
                }
            }
        };
        let result: ClientResult =
            codec::decode(&response).map_err(|e| anyhow!("bad answer from {}: {e}", self.addr))?;
        result.map_err(|e| anyhow!(e))
    }
}
