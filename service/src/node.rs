//! A running node: the raft host, the router, and the service handler that answers peers
//! (forwarded proposals and reads, joins) and commands (admin, deliver, status).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use raft::host::{GroupError, HostConfig, RaftHost, ServiceHandler};
use raft::tls::{ClusterCa, Identity};
use raft::transport::{Peer, Transport};
use raft::{partition_group, GroupId, META_GROUP};
use storage::codec;
use storage::meta::{MetaCommand, MetaResponse, NodeRecord, NodeRole};
use storage::partition::{MailError, PartitionCommand, PartitionResponse, QueueAction, QueueId};
use storage::types::{is_valid_address, normalize_address, Uid};
use storage::{Command, Response};

use crate::api::*;
use crate::datadir::{self, NodeFile};
use crate::mail::{self, Resolved};
use crate::router::{raft_service, Router};

/// Tunables of a node that are not in its data directory.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    pub snapshot_logs: u64,
    pub write_timeout: Duration,
    /// Replica moves of a rebalance one node takes part in at once (`[raft] moves_per_node_max`).
    pub moves_per_node_max: usize,
    /// Byte rate of the snapshots this node sends to new replicas; 0 is unlimited
    /// (`[raft] move_mib_per_s`).
    pub move_bytes_per_s: u64,
    /// How passwords set through this node are hashed (`[auth] password_scheme`).
    pub password_scheme: mail::PasswordScheme,
    /// A sync of the store running this long means the disk stopped answering: the node
    /// gives up on it as on a failed one (`[raft] disk_stall_ms`).
    pub disk_stall: Duration,
    /// Free space below which the disk counts as full (`[raft] disk_free_min_mib`).
    pub disk_free_min: u64,
    /// How long after leaving a partition group this node drops its copy; `None` keeps it
    /// (`[raft] stale_replica_s`, 0 = keep).
    pub stale_replica_after: Option<Duration>,
}

impl Default for NodeOptions {
    fn default() -> NodeOptions {
        // With 64+ groups per node, heartbeats dominate idle load; these keep it modest while
        // a dead leader is replaced well within two seconds.
        NodeOptions {
            heartbeat_ms: 200,
            election_min_ms: 600,
            election_max_ms: 1000,
            snapshot_logs: 5_000,
            write_timeout: Duration::from_secs(5),
            moves_per_node_max: 4,
            move_bytes_per_s: 32 << 20,
            password_scheme: mail::PasswordScheme::default(),
            disk_stall: Duration::from_secs(5),
            disk_free_min: 128 << 20,
            stale_replica_after: Some(Duration::from_secs(60)),
        }
    }
}

pub struct Node {
    pub file: NodeFile,
    pub router: Router,
    ca: ClusterCa,
    join_secret: String,
    password_scheme: mail::PasswordScheme,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.file.node_id)
            .finish()
    }
}

pub fn read_file(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}

impl Node {
    /// Opens the data directory and starts serving the cluster transport.
    pub async fn start(dir: &Path, options: &NodeOptions) -> anyhow::Result<Arc<Node>> {
        let file = NodeFile::load(dir)?;
        let tls = datadir::tls_dir(dir);
        let identity = Identity::load(&tls)?;
        if identity.id != file.node_id {
            anyhow::bail!(
                "{}: certificate is for node {}, node.toml says {}",
                dir.display(),
                identity.id,
                file.node_id
            );
        }
        let ca = ClusterCa::from_pem(
            &read_file(&tls.join(raft::tls::CA_CERT_FILE))?,
            &read_file(&tls.join(raft::tls::CA_KEY_FILE))?,
        )?;
        let join_secret = read_file(&tls.join(datadir::JOIN_SECRET_FILE))?
            .trim()
            .to_string();
        let db = datadir::db_dir(dir);
        let store = storage::Store::open(&db, false)?;
        let owner = store.identity()?;
        if owner.as_deref() != Some(file.identity().as_bytes()) {
            anyhow::bail!(
                "{}: the database does not belong to this node ({}); it is empty, damaged or from elsewhere — \
                 not starting on it. Restore it, or remove the node and join a new one",
                db.display(),
                match owner {
                    Some(i) => format!("it says {:?}", String::from_utf8_lossy(&i)),
                    None => "it has no identity record".into(),
                }
            );
        }
        let addr = raft::transport::resolve(file.bind_addr()).await?;
        let transport = Arc::new(Transport::bind(&identity, addr)?);
        let config = HostConfig {
            id: file.node_id,
            data_dir: dir.to_path_buf(),
            partitions: file.partitions,
            replicas: file.replicas,
            heartbeat_ms: options.heartbeat_ms,
            election_min_ms: options.election_min_ms,
            election_max_ms: options.election_max_ms,
            snapshot_logs: options.snapshot_logs,
            write_timeout: options.write_timeout,
            moves_per_node_max: options.moves_per_node_max,
            witness: file.witness,
            disk_stall: options.disk_stall,
            disk_free_min: options.disk_free_min,
            stale_replica_after: options.stale_replica_after,
        };
        transport.set_body_rate(options.move_bytes_per_s);
        let host = RaftHost::start(config, store, transport)
            .await
            .map_err(anyhow::Error::msg)?;
        let node = Arc::new(Node {
            file,
            router: Router::new(host.clone()),
            ca,
            join_secret,
            password_scheme: options.password_scheme,
        });
        host.set_service(Arc::new(Service(Arc::downgrade(&node))));
        Ok(node)
    }

    pub fn host(&self) -> &Arc<RaftHost> {
        self.router.host()
    }

    /// The partition groups this node leads now, with their local state machines (for work
    /// only the leader does, like draining the outbound queue).
    pub fn led_partitions(&self) -> Vec<(GroupId, Arc<storage::GroupMachine>)> {
        let host = self.host();
        (0..host.config().partitions)
            .map(partition_group)
            .filter(|g| host.leader_of(*g).map(|(id, _)| id) == Some(host.id()))
            .filter_map(|g| Some((g, host.local_machine(g).ok()?)))
            .collect()
    }

    async fn join(&self, request: JoinRequest, role: NodeRole) -> Result<JoinAccepted, String> {
        let secret_ok =
            blake3::hash(request.secret.as_bytes()) == blake3::hash(self.join_secret.as_bytes());
        if !secret_ok {
            return Err("wrong join token".into());
        }
        if request.node_id == 0 {
            return Err("node id 0 is reserved".into());
        }
        raft::transport::resolve(&request.cluster_addr)
            .await
            .map_err(|e| e.to_string())?;
        let cluster = match self
            .router
            .read(META_GROUP, Query::Cluster)
            .await
            .map_err(|e| e.to_string())?
        {
            QueryResult::Cluster(Some(c)) => c,
            _ => return Err("cluster is not initialised".into()),
        };
        let cert_pem = self
            .ca
            .issue(request.node_id, &request.public_key_pem)
            .map_err(|e| e.to_string())?;
        let record = NodeRecord {
            id: request.node_id,
            cluster_addr: request.cluster_addr,
            listeners: BTreeMap::new(),
            joined: mail::now(),
        };
        let cmd = match role {
            NodeRole::Data => MetaCommand::AddNode(record),
            role => MetaCommand::AddNodeAs { node: record, role },
        };
        match self
            .router
            .meta_write(cmd)
            .await
            .map_err(|e| e.to_string())?
        {
            Response::Meta(MetaResponse::Done) => {}
            Response::Meta(MetaResponse::Refused(e)) => return Err(e.to_string()),
            other => return Err(format!("unexpected {other:?}")),
        }
        Ok(JoinAccepted {
            cert_pem,
            ca_key_pem: self.ca.key_pem().to_string(),
            cluster,
        })
    }

    async fn handle(self: Arc<Self>, peer: Option<u64>, request: ServiceRequest) -> Vec<u8> {
        match request {
            ServiceRequest::Join(j) => codec::encode(&self.join(j, NodeRole::Data).await),
            ServiceRequest::JoinWitness(j) => codec::encode(&self.join(j, NodeRole::Witness).await),
            _ if peer.is_none() => codec::encode(&Err::<(), _>(
                "this request needs a node certificate".to_string(),
            )),
            ServiceRequest::PeerWrite { group, cmd } => {
                codec::encode(&self.router.write_local(group, cmd).await)
            }
            ServiceRequest::PeerRead { group, query } => {
                codec::encode(&self.router.read_local(group, query).await)
            }
            ServiceRequest::LocalStatus => codec::encode(&self.host().status()),
            ServiceRequest::LocalDigest(group) => codec::encode(
                &self
                    .host()
                    .local_machine(group)
                    .ok()
                    .and_then(|m| m.stable_digest().ok().flatten()),
            ),
            ServiceRequest::Client(c) => codec::encode(&self.client(c).await),
            ServiceRequest::MoveStats => codec::encode(&self.host().move_stats()),
            ServiceRequest::LocalHealth => codec::encode(&self.host().problems()),
            ServiceRequest::LocalVersion => codec::encode(&NodeVersion::this()),
        }
    }

    async fn client(&self, request: ClientRequest) -> ClientResult {
        let r = &self.router;
        let err = |e: GroupError| e.to_string();
        match request {
            ClientRequest::DomainAdd(name) => {
                let name = name.to_ascii_lowercase();
                meta_done(
                    r.meta_write(MetaCommand::AddDomain {
                        name,
                        now: mail::now(),
                    })
                    .await
                    .map_err(err)?,
                )
            }
            ClientRequest::DomainRemove(name) => meta_done(
                r.meta_write(MetaCommand::RemoveDomain(name.to_ascii_lowercase()))
                    .await
                    .map_err(err)?,
            ),
            ClientRequest::DomainList => {
                let mut reports = Vec::new();
                for domain in self.domains().await? {
                    let usage = mail::domain_usage(r, &domain.name)
                        .await
                        .map_err(|e| e.to_string())?;
                    reports.push(DomainReport { domain, usage });
                }
                Ok(ClientReply::Domains(reports))
            }
            ClientRequest::DomainLimits {
                name,
                quota_bytes,
                message_bytes_max,
            } => {
                let name = name.to_ascii_lowercase();
                let Some(domain) = self.domains().await?.into_iter().find(|d| d.name == name)
                else {
                    return Err(format!("no such domain {name}"));
                };
                let mut limits = domain.limits;
                limits.quota_bytes = quota_bytes.unwrap_or(limits.quota_bytes);
                limits.message_bytes_max = message_bytes_max.unwrap_or(limits.message_bytes_max);
                meta_done(
                    r.meta_write(MetaCommand::SetDomainLimits { name, limits })
                        .await
                        .map_err(err)?,
                )
            }
            ClientRequest::ClusterLimits { message_bytes_max } => {
                if let Some(max) = message_bytes_max {
                    let limits = storage::meta::ClusterLimits {
                        message_bytes_max: max,
                    };
                    meta_done(
                        r.meta_write(MetaCommand::SetClusterLimits(limits))
                            .await
                            .map_err(err)?,
                    )?;
                }
                match r.read(META_GROUP, Query::Limits).await.map_err(err)? {
                    QueryResult::Limits(l) => Ok(ClientReply::ClusterLimits(l)),
                    other => Err(format!("unexpected {other:?}")),
                }
            }
            ClientRequest::UserAdd {
                address,
                password,
                quota,
            } => {
                let address = self.served_address(&address).await?;
                if password.is_empty() {
                    return Err("password must not be empty".into());
                }
                let hash = mail::hash_password(&password, self.password_scheme)?;
                self.partition_write_command(&address, mail::account_command(&address, hash, quota))
                    .await
            }
            ClientRequest::UserImport {
                address,
                password_hash,
                quota,
            } => {
                let address = self.served_address(&address).await?;
                let password_hash = mail::check_password_hash(&password_hash)?;
                self.partition_write_command(
                    &address,
                    mail::account_command(&address, password_hash, quota),
                )
                .await
            }
            ClientRequest::UserPasswd { address, password } => {
                let address = normalize_address(&address);
                let password_hash = mail::hash_password(&password, self.password_scheme)?;
                let cmd = PartitionCommand::SetPassword {
                    address: address.clone(),
                    password_hash,
                };
                self.partition_write(&address, cmd).await
            }
            ClientRequest::UserRemove(address) => {
                let address = normalize_address(&address);
                let cmd = PartitionCommand::RemoveAccount {
                    address: address.clone(),
                };
                self.partition_write(&address, cmd).await
            }
            ClientRequest::UserList { domain } => {
                let mut all = Vec::new();
                for result in self
                    .read_every_partition(Query::Accounts { domain })
                    .await?
                {
                    match result {
                        QueryResult::Accounts(a) => all.extend(a),
                        other => return Err(format!("unexpected {other:?}")),
                    }
                }
                all.sort_by(|a, b| a.address.cmp(&b.address));
                Ok(ClientReply::Accounts(all))
            }
            ClientRequest::AliasAdd { address, targets } => {
                let address = self.served_address(&address).await?;
                let targets: Vec<String> = targets.iter().map(|t| normalize_address(t)).collect();
                if let Some(bad) = targets.iter().find(|t| !is_valid_address(t)) {
                    return Err(format!("invalid target address {bad}"));
                }
                let cmd = PartitionCommand::SetAlias {
                    address: address.clone(),
                    targets,
                };
                self.partition_write(&address, cmd).await
            }
            ClientRequest::AliasRemove(address) => {
                let address = normalize_address(&address);
                let cmd = PartitionCommand::RemoveAlias {
                    address: address.clone(),
                };
                self.partition_write(&address, cmd).await
            }
            ClientRequest::AliasList { domain } => {
                let mut all = Vec::new();
                for result in self.read_every_partition(Query::Aliases { domain }).await? {
                    match result {
                        QueryResult::Aliases(a) => all.extend(a),
                        other => return Err(format!("unexpected {other:?}")),
                    }
                }
                all.sort_by(|a, b| a.address.cmp(&b.address));
                Ok(ClientReply::Aliases(all))
            }
            ClientRequest::QuotaSet { address, quota } => {
                let address = normalize_address(&address);
                let cmd = PartitionCommand::SetQuota {
                    address: address.clone(),
                    quota,
                };
                self.partition_write(&address, cmd).await
            }
            ClientRequest::QuotaShow(address) => {
                let address = normalize_address(&address);
                match mail::lookup(r, &address).await.map_err(|e| e.to_string())? {
                    Lookup::Account(a) => Ok(ClientReply::Quota(a)),
                    _ => Err(format!("no such account {address}")),
                }
            }
            ClientRequest::Deliver {
                recipients,
                body,
                delivery_id,
            } => self.deliver(recipients, body, delivery_id).await,
            ClientRequest::Fetch { address, mailbox } => {
                self.fetch(&normalize_address(&address), &mailbox).await
            }
            ClientRequest::Status => Ok(ClientReply::Status(self.status().await)),
            ClientRequest::NodeRemove(id) => {
                // Waits out a settling group (a re-election after a failure, say) for a while.
                let deadline = tokio::time::Instant::now() + REMOVE_SETTLE_WAIT;
                while let Err(e) = unsettled(&self.status().await) {
                    if tokio::time::Instant::now() > deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                meta_done(
                    r.meta_write(MetaCommand::RemoveNode(id))
                        .await
                        .map_err(err)?,
                )
            }
            ClientRequest::NodeDrain { id, draining } => {
                if draining {
                    self.refuse_emptying_the_last(id)?;
                }
                meta_done(
                    r.meta_write(MetaCommand::SetNodeDraining {
                        id,
                        draining,
                        replace_by: None,
                    })
                    .await
                    .map_err(err)?,
                )
            }
            ClientRequest::NodeReplace { old, new } => {
                if old == new {
                    return Err(format!("node {old} cannot replace itself"));
                }
                let settings = self
                    .host()
                    .meta()
                    .read_meta(|m| m.node_settings())
                    .map_err(|e| e.to_string())?;
                match settings.get(&new) {
                    None => {
                        return Err(format!(
                            "node {new} is not a member of the cluster: join it first (`mailgrid join`), then replace"
                        ))
                    }
                    Some(s) if s.draining => {
                        return Err(format!("node {new} is draining itself; undrain it first"))
                    }
                    Some(_) => {}
                }
                meta_done(
                    r.meta_write(MetaCommand::SetNodeDraining {
                        id: old,
                        draining: true,
                        replace_by: Some(new),
                    })
                    .await
                    .map_err(err)?,
                )
            }
            ClientRequest::NodeWeight { id, weight } => meta_done(
                r.meta_write(MetaCommand::SetNodeWeight { id, weight })
                    .await
                    .map_err(err)?,
            ),
            ClientRequest::Placement => Ok(ClientReply::Placement(self.placement().await?)),
            ClientRequest::Health => Ok(ClientReply::Health(self.health().await?)),
            ClientRequest::Versions => Ok(ClientReply::Versions(self.versions().await?)),
            ClientRequest::UpgradeFinish => Ok(ClientReply::Versions(self.upgrade_finish().await?)),
            ClientRequest::Digests(group) => Ok(ClientReply::Digests(self.digests(group).await)),
            ClientRequest::NodeStats => Ok(ClientReply::NodeStats(NodeStats {
                node_id: self.file.node_id,
                calls_served: self.host().transport().calls_served(),
                syncs: self.host().syncs(),
            })),
            ClientRequest::QueueList => self.queue_list().await,
            ClientRequest::DkimGenerate {
                domain,
                selector,
                algorithm,
            } => {
                let domain = domain.to_ascii_lowercase();
                let key = tokio::task::spawn_blocking(move || {
                    crate::dkim::generate(&selector, &algorithm, mail::now())
                })
                .await
                .map_err(|e| e.to_string())??;
                let record = crate::dkim::txt_record(&domain, &key);
                let cmd = MetaCommand::SetDkim {
                    domain,
                    key: Some(key),
                };
                meta_done(r.meta_write(cmd).await.map_err(err)?)?;
                Ok(ClientReply::Record(record))
            }
            ClientRequest::DkimShow(domain) => {
                let domain = domain.to_ascii_lowercase();
                match r.read(META_GROUP, Query::Dkim(domain.clone())).await.map_err(err)? {
                    QueryResult::Dkim(Some(key)) => Ok(ClientReply::Record(
                        crate::dkim::txt_record(&domain, &key),
                    )),
                    QueryResult::Dkim(None) => Err(format!(
                        "{domain} has no DKIM key (make one with `mailgrid admin dkim generate {domain}`)"
                    )),
                    other => Err(format!("unexpected {other:?}")),
                }
            }
            ClientRequest::DkimRemove(domain) => {
                let cmd = MetaCommand::SetDkim {
                    domain: domain.to_ascii_lowercase(),
                    key: None,
                };
                meta_done(r.meta_write(cmd).await.map_err(err)?)
            }
            ClientRequest::QueueShow(id) => {
                let id = queue_id(&id)?;
                let group = crate::queue::queue_group(&id, self.file.partitions);
                match r.read(group, Query::QueueEntry(id)).await.map_err(err)? {
                    QueryResult::QueueEntry(Some(e)) => Ok(ClientReply::Queue(vec![e])),
                    QueryResult::QueueEntry(None) => {
                        Err(format!("no queue entry {}", hex::encode(id)))
                    }
                    other => Err(format!("unexpected {other:?}")),
                }
            }
            ClientRequest::QueueControl { id, action } => {
                let id = queue_id(&id)?;
                let group = crate::queue::queue_group(&id, self.file.partitions);
                let cmd = match action {
                    QueueOp::Delete => PartitionCommand::QueueRemove { id },
                    QueueOp::Hold => PartitionCommand::QueueControl {
                        id,
                        action: QueueAction::Hold,
                    },
                    QueueOp::Release => PartitionCommand::QueueControl {
                        id,
                        action: QueueAction::Release,
                    },
                    QueueOp::Retry => PartitionCommand::QueueControl {
                        id,
                        action: QueueAction::RetryAt(mail::now()),
                    },
                };
                match r.write(group, Command::Partition(cmd)).await.map_err(err)? {
                    Response::Partition(PartitionResponse::Refused(MailError::NoSuchEntry)) => {
                        Err(format!("no queue entry {}", hex::encode(id)))
                    }
                    other => partition_done(other),
                }
            }
        }
    }

    /// Every queue entry of every partition, oldest first.
    async fn queue_list(&self) -> ClientResult {
        let mut all = Vec::new();
        for p in 0..self.file.partitions {
            let group = partition_group(p);
            let mut after = None;
            loop {
                let query = Query::Queue {
                    after,
                    limit: crate::query::QUEUE_READ_MAX,
                };
                let page = match self
                    .router
                    .read(group, query)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    QueryResult::Queue(page) => page,
                    other => return Err(format!("unexpected {other:?}")),
                };
                let full = page.len() == crate::query::QUEUE_READ_MAX;
                after = page.last().map(|e| e.id);
                all.extend(page);
                if !full {
                    break;
                }
            }
        }
        all.sort_by_key(|e| (e.created, e.id));
        Ok(ClientReply::Queue(all))
    }

    /// Proposes a partition command to the partition of `address`.
    async fn partition_write(&self, address: &str, cmd: PartitionCommand) -> ClientResult {
        self.partition_write_command(address, Command::Partition(cmd))
            .await
    }

    async fn partition_write_command(&self, address: &str, cmd: Command) -> ClientResult {
        let group = self.router.group_of(address);
        partition_done(
            self.router
                .write(group, cmd)
                .await
                .map_err(|e| e.to_string())?,
        )
    }

    /// The same query on every partition, in partition order.
    async fn read_every_partition(&self, query: Query) -> Result<Vec<QueryResult>, String> {
        let mut out = Vec::with_capacity(self.file.partitions as usize);
        for p in 0..self.file.partitions {
            let group = partition_group(p);
            out.push(
                self.router
                    .read(group, query.clone())
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok(out)
    }

    async fn domains(&self) -> Result<Vec<storage::meta::Domain>, String> {
        match self
            .router
            .read(META_GROUP, Query::Domains)
            .await
            .map_err(|e| e.to_string())?
        {
            QueryResult::Domains(d) => Ok(d),
            other => Err(format!("unexpected {other:?}")),
        }
    }

    /// Normalizes an address and checks that its domain is one we serve.
    async fn served_address(&self, address: &str) -> Result<String, String> {
        let address = normalize_address(address);
        if !is_valid_address(&address) {
            return Err(format!("invalid address {address}"));
        }
        let domain = storage::types::domain_of(&address);
        match self.router.read(META_GROUP, Query::Domains).await.map_err(|e| e.to_string())? {
            QueryResult::Domains(d) if d.iter().any(|x| x.name == domain) => Ok(address),
            QueryResult::Domains(_) => Err(format!("domain {domain} is not served here (add it with `mailgrid admin domain add {domain}`)")),
            other => Err(format!("unexpected {other:?}")),
        }
    }

    async fn deliver(
        &self,
        recipients: Vec<String>,
        body: Vec<u8>,
        delivery_id: Option<String>,
    ) -> ClientResult {
        if recipients.is_empty() {
            return Err("no recipients".into());
        }
        if body.len() > storage::partition::MESSAGE_BYTES_MAX {
            return Err(format!(
                "message of {} bytes is over the {} byte limit",
                body.len(),
                storage::partition::MESSAGE_BYTES_MAX
            ));
        }
        let mut accounts = Vec::new();
        for rcpt in &recipients {
            match mail::resolve(&self.router, rcpt)
                .await
                .map_err(|e| e.to_string())?
            {
                Resolved::Accounts(a) => accounts.extend(a.into_iter().map(|a| a.address)),
                Resolved::Unknown => return Err(format!("unknown recipient {rcpt}")),
            }
        }
        accounts.sort();
        accounts.dedup();
        // Without an id every request is a new message; with one, retries store it once.
        let id = delivery_id.unwrap_or_else(|| hex::encode(rand::random::<[u8; 16]>()));
        let key = mail::message_key(&[id.as_bytes(), blake3::hash(&body).as_bytes()]);
        let outcomes = mail::deliver(&self.router, &accounts, &body, &key)
            .await
            .map_err(|e| e.to_string())?;
        Ok(ClientReply::Delivered(outcomes))
    }

    async fn fetch(&self, address: &str, mailbox: &str) -> ClientResult {
        let group = self.router.group_of(address);
        let mut out = Vec::new();
        let mut from = Uid(1);
        loop {
            let query = Query::Messages {
                address: address.into(),
                mailbox: mailbox.into(),
                from,
                limit: 1000,
            };
            let (mb, messages) = match self
                .router
                .read(group, query)
                .await
                .map_err(|e| e.to_string())?
            {
                QueryResult::Messages(Some(m)) => m,
                QueryResult::Messages(None) => {
                    return Err(format!("no mailbox {mailbox} for {address}"))
                }
                other => return Err(format!("unexpected {other:?}")),
            };
            let Some(last) = messages.last().map(|(u, _)| *u) else {
                break;
            };
            for (uid, record) in messages {
                let body = match self
                    .router
                    .read(group, Query::Body(record.body))
                    .await
                    .map_err(|e| e.to_string())?
                {
                    QueryResult::Body(Some(b)) => b,
                    _ => return Err(format!("body of uid {} is missing", uid.0)),
                };
                out.push(FetchedMessage {
                    uid: uid.0,
                    uid_validity: mb.uid_validity.0,
                    flags: record.flags.into_iter().collect(),
                    body,
                });
            }
            from = Uid(last.0 + 1);
        }
        Ok(ClientReply::Messages(out))
    }

    /// Asks a node over the transport; `None` when it does not answer in time.
    async fn ask_node<T: serde::de::DeserializeOwned>(
        &self,
        id: u64,
        addr: &str,
        request: ServiceRequest,
    ) -> Option<T> {
        codec::decode(&self.ask_node_raw(id, addr, request).await?).ok()
    }

    /// The encoded answer of node `id` to `request`; `None` when it gave none.
    async fn ask_node_raw(&self, id: u64, addr: &str, request: ServiceRequest) -> Option<Vec<u8>> {
        let bytes = codec::encode(&raft_service(codec::encode(&request)));
        self.host()
            .transport()
            .call(Peer::Node(id), addr, &bytes, None, Duration::from_secs(2))
            .await
            .ok()
    }

    async fn status(&self) -> ClusterStatus {
        let meta = self.host().meta();
        let (cluster, nodes, placements) = meta
            .read_meta(|m| {
                Ok::<_, storage::StorageError>((m.cluster()?, m.nodes()?, m.partitions()?))
            })
            .unwrap_or_default();
        let mut node_status = Vec::new();
        let mut views: BTreeMap<u64, Vec<GroupStatus>> = BTreeMap::new();
        for n in &nodes {
            let view: Option<Vec<GroupStatus>> = if n.id == self.file.node_id {
                Some(self.host().status())
            } else {
                self.ask_node(n.id, &n.cluster_addr, ServiceRequest::LocalStatus)
                    .await
            };
            node_status.push(NodeStatus {
                id: n.id,
                cluster_addr: n.cluster_addr.clone(),
                listeners: n.listeners.clone(),
                reachable: view.is_some(),
            });
            if let Some(v) = view {
                views.insert(n.id, v);
            }
        }
        let mut partitions = Vec::new();
        for group in 0..=self.file.partitions as u64 {
            // The freshest leader's view of the group wins.
            let best = views
                .values()
                .filter_map(|v| v.iter().find(|g| g.group == group))
                .filter(|g| g.state == "Leader")
                .max_by_key(|g| g.term)
                .or_else(|| {
                    views
                        .values()
                        .filter_map(|v| v.iter().find(|g| g.group == group))
                        .max_by_key(|g| g.term)
                });
            let partition = group.checked_sub(1).map(|p| p as u32);
            let placement = match partition {
                Some(p) => placements
                    .iter()
                    .find(|r| r.id == p)
                    .map(|r| r.replicas.clone())
                    .unwrap_or_default(),
                None => nodes.iter().map(|n| n.id).collect(),
            };
            let (voters, learners, leader, term, healthy) = match best {
                Some(g) => (
                    g.voters.clone(),
                    g.learners.clone(),
                    (g.state == "Leader").then_some(g.leader).flatten(),
                    g.term,
                    g.healthy && g.state == "Leader",
                ),
                None => (Vec::new(), Vec::new(), None, 0, false),
            };
            partitions.push(PartitionStatus {
                partition,
                group,
                placement,
                voters,
                learners,
                leader,
                term,
                joint: best.is_some_and(|g| g.configs.len() > 1),
                healthy,
            });
        }
        ClusterStatus {
            cluster,
            nodes: node_status,
            partitions,
            views,
        }
    }

    /// A drain that would leave no node to hold the replicas is refused.
    fn refuse_emptying_the_last(&self, id: u64) -> Result<(), String> {
        let (settings, witnesses) = self
            .host()
            .meta()
            .read_meta(|m| Ok::<_, storage::StorageError>((m.node_settings()?, m.witnesses()?)))
            .map_err(|e| e.to_string())?;
        if !settings.contains_key(&id) {
            return Err(format!("no such node {id}"));
        }
        // A witness holds no mail, so it cannot take a data node's replicas.
        let takers = settings
            .iter()
            .any(|(n, s)| *n != id && !s.draining && !witnesses.contains(n));
        if !witnesses.contains(&id) && !takers {
            return Err(format!(
                "not draining node {id}: no other data node would be left to hold its replicas"
            ));
        }
        Ok(())
    }

    /// The active cluster format and every node's release, as each node reports it.
    async fn versions(&self) -> Result<ClusterVersions, String> {
        let (nodes, active_format) = self
            .host()
            .meta()
            .read_meta(|m| Ok::<_, storage::StorageError>((m.nodes()?, m.cluster_format()?)))
            .map_err(|e| e.to_string())?;
        let me = self.file.node_id;
        let asks = nodes.iter().map(|n| async move {
            let version = if n.id == me {
                Some(NodeVersion::this())
            } else {
                let answer = self
                    .ask_node_raw(n.id, &n.cluster_addr, ServiceRequest::LocalVersion)
                    .await;
                // A node that answers something else cannot decode the request: it predates
                // it, and the only release before it is 0.1.0 (format 1).
                answer.map(|a| {
                    codec::decode::<NodeVersion>(&a).unwrap_or(NodeVersion {
                        binary: "0.1.0".into(),
                        format_min: 1,
                        format_max: 1,
                    })
                })
            };
            (n.id, version)
        });
        Ok(ClusterVersions {
            active_format,
            nodes: futures::future::join_all(asks).await.into_iter().collect(),
        })
    }

    /// `admin cluster upgrade-finish`: raises the active format to this binary's newest once
    /// every member node answers that it speaks it; refused, naming the nodes, otherwise (a
    /// node that does not answer counts as not upgraded: it may be down on the old binary).
    async fn upgrade_finish(&self) -> Result<ClusterVersions, String> {
        let versions = self.versions().await?;
        let target = storage::version::FORMAT_MAX;
        if versions.active_format >= target {
            return Ok(versions);
        }
        let behind: Vec<String> = versions
            .nodes
            .iter()
            .filter_map(|(id, v)| match v {
                None => Some(format!("node {id} does not answer (down or cut off)")),
                Some(v) if v.format_max < target => Some(format!(
                    "node {id} runs mailgrid {} (formats up to {})",
                    v.binary, v.format_max
                )),
                Some(_) => None,
            })
            .collect();
        if !behind.is_empty() {
            return Err(format!(
                "not every node speaks format {target} yet: {}; upgrade them (and start them), \
                 then run upgrade-finish again",
                behind.join("; ")
            ));
        }
        let response = self
            .router
            .meta_write(MetaCommand::SetClusterFormat(target))
            .await
            .map_err(|e| e.to_string())?;
        meta_done(response)?;
        tracing::warn!(
            from = versions.active_format,
            to = target,
            "cluster format raised"
        );
        // Committed; this node's own copy of the meta state may not have applied it yet.
        Ok(ClusterVersions {
            active_format: target,
            ..versions
        })
    }

    /// Every node's role and problems, as each node reports its own (a failed disk); one
    /// that does not answer is unreachable.
    async fn health(&self) -> Result<Vec<NodeHealth>, String> {
        let (nodes, roles) = self
            .host()
            .meta()
            .read_meta(|m| Ok::<_, storage::StorageError>((m.nodes()?, m.roles()?)))
            .map_err(|e| e.to_string())?;
        let me = self.file.node_id;
        let roles = &roles;
        let asks = nodes.iter().map(|n| async move {
            let problems = if n.id == me {
                self.host().problems()
            } else {
                self.ask_node::<Vec<String>>(n.id, &n.cluster_addr, ServiceRequest::LocalHealth)
                    .await
                    .unwrap_or_else(|| {
                        vec![format!("unreachable: node {me} gets no answer from it")]
                    })
            };
            NodeHealth {
                id: n.id,
                role: roles.get(&n.id).copied().unwrap_or_default(),
                problems,
            }
        });
        Ok(futures::future::join_all(asks).await)
    }

    /// Every node's replicas and leaders (as the groups' leaders report them) against the
    /// plan, and the moves still to make.
    async fn placement(&self) -> Result<PlacementStatus, String> {
        let meta = self.host().meta();
        let (cluster, nodes, settings, records, witnesses) = meta
            .read_meta(|m| {
                Ok::<_, storage::StorageError>((
                    m.cluster()?,
                    m.nodes()?,
                    m.node_settings()?,
                    m.partitions()?,
                    m.witnesses()?,
                ))
            })
            .map_err(|e| e.to_string())?;
        let info = cluster.ok_or("the cluster is not initialised")?;
        let observed = self.host().observe(&nodes).await;
        let plan = raft::placement::plan(&records, &settings, &witnesses, info.replicas as usize);
        let all_seen = records
            .iter()
            .all(|r| observed.contains_key(&partition_group(r.id)));
        let nodes = settings
            .iter()
            .map(|(&id, s)| {
                let holds = |v: &GroupStatus| v.voters.contains(&id) || v.learners.contains(&id);
                let replicas = records
                    .iter()
                    .filter(|r| observed.get(&partition_group(r.id)).is_some_and(holds))
                    .count() as u64;
                let recorded = records.iter().filter(|r| r.replicas.contains(&id)).count();
                let replicas_target =
                    plan.iter().filter(|r| r.replicas.contains(&id)).count() as u64;
                NodePlacement {
                    id,
                    weight: s.weight,
                    draining: s.draining,
                    replace_by: s.replace_by,
                    replicas,
                    replicas_target,
                    leaders: observed
                        .values()
                        .filter(|v| v.group != META_GROUP && v.leader == Some(id))
                        .count() as u64,
                    leaders_target: plan
                        .iter()
                        .filter(|r| r.replicas.first() == Some(&id))
                        .count() as u64,
                    drained: s.draining
                        && all_seen
                        && replicas == 0
                        && recorded == 0
                        && replicas_target == 0,
                }
            })
            .collect();
        let (moves_pending, _) = raft::placement::distance(&records, &plan);
        let moves_running = records
            .iter()
            .filter(|r| !raft::host::settled(r, observed.get(&partition_group(r.id))))
            .count() as u64;
        let stats = match self.host().leader_of(META_GROUP) {
            Some((id, _)) if id == self.file.node_id => Some(self.host().move_stats()),
            Some((id, addr)) => {
                self.ask_node::<raft::host::MoveStats>(id, &addr, ServiceRequest::MoveStats)
                    .await
            }
            None => None,
        }
        .unwrap_or_default();
        let left = moves_pending as u64 + moves_running;
        let parallel = self.host().config().moves_per_node_max.max(1) as u64;
        Ok(PlacementStatus {
            nodes,
            moves_pending: moves_pending as u64,
            moves_running,
            moves_done: stats.done,
            move_mean_ms: stats.mean_ms,
            estimate_s: stats
                .mean_ms
                .map(|ms| (left * ms).div_ceil(parallel * 1000)),
        })
    }

    async fn digests(&self, group: u64) -> BTreeMap<u64, Option<String>> {
        let meta = self.host().meta();
        let nodes = meta.read_meta(|m| m.nodes()).unwrap_or_default();
        let mut out = BTreeMap::new();
        for n in nodes {
            let digest = if n.id == self.file.node_id {
                self.host()
                    .local_machine(group)
                    .ok()
                    .and_then(|m| m.stable_digest().ok().flatten())
            } else {
                self.ask_node::<Option<[u8; 32]>>(
                    n.id,
                    &n.cluster_addr,
                    ServiceRequest::LocalDigest(group),
                )
                .await
                .flatten()
            };
            out.insert(n.id, digest.map(hex::encode));
        }
        out
    }
}

/// How long `node remove` waits for the cluster to settle before it refuses.
const REMOVE_SETTLE_WAIT: Duration = Duration::from_secs(15);

/// Refuses a removal while an earlier membership change is still moving replicas: removing
/// a second node of a group that has not yet replaced the first could take its majority
/// away for good. Settled means every partition's voters are its placement (no learner
/// catching up, no removed node still voting) and the meta group has a leader whose voters
/// are all members.
fn unsettled(status: &ClusterStatus) -> Result<(), String> {
    let members: std::collections::BTreeSet<u64> = status.nodes.iter().map(|n| n.id).collect();
    for p in &status.partitions {
        let mut voters = p.voters.clone();
        voters.sort_unstable();
        let mut placement = p.placement.clone();
        placement.sort_unstable();
        let settled = !p.joint
            && match p.partition {
                Some(_) => {
                    p.leader.is_some()
                        && voters == placement
                        && p.learners.is_empty()
                        && placement.iter().all(|v| members.contains(v))
                }
                None => p.leader.is_some() && voters.iter().all(|v| members.contains(v)),
            };
        if !settled {
            let what = match p.partition {
                Some(n) => format!("partition {n}"),
                None => "the meta group".to_string(),
            };
            return Err(format!(
                "not removing a node now: {what} is not settled (voters {voters:?}{}, learners {:?}, placement {placement:?}, leader {:?}); an earlier membership change or failure is still being repaired, and removing another node could leave it without a majority. Retry when `mailgrid status` shows every partition healthy on its placement",
                if p.joint { " in a joint change" } else { "" },
                p.learners,
                p.leader
            ));
        }
    }
    Ok(())
}

fn meta_done(response: Response) -> ClientResult {
    match response {
        Response::Meta(MetaResponse::Done) => Ok(ClientReply::Done),
        Response::Meta(MetaResponse::Refused(e)) => Err(e.to_string()),
        other => Err(format!("unexpected {other:?}")),
    }
}

/// A queue id as operators type it: 32 hex digits.
fn queue_id(text: &str) -> Result<QueueId, String> {
    hex::decode(text.trim())
        .ok()
        .and_then(|b| QueueId::try_from(b.as_slice()).ok())
        .ok_or_else(|| {
            format!("{text:?} is not a queue id (32 hex digits, as `admin queue list` shows)")
        })
}

fn partition_done(response: Response) -> ClientResult {
    match response {
        Response::Partition(PartitionResponse::Done) => Ok(ClientReply::Done),
        Response::Partition(PartitionResponse::Refused(e)) => Err(match e {
            MailError::NoSuchAccount => "no such account or alias".to_string(),
            other => other.to_string(),
        }),
        other => Err(format!("unexpected {other:?}")),
    }
}

struct Service(std::sync::Weak<Node>);

impl ServiceHandler for Service {
    fn handle(&self, peer: Option<u64>, request: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        let node = self.0.clone();
        Box::pin(async move {
            let Some(node) = node.upgrade() else {
                return codec::encode(&Err::<(), _>("node is shutting down".to_string()));
            };
            match codec::decode::<ServiceRequest>(&request) {
                Ok(r) => node.handle(peer, r).await,
                Err(e) => codec::encode(&Err::<(), _>(format!("bad request: {e}"))),
            }
        })
    }
}

/// A join token: what a new node needs to find and trust the cluster, and prove it may join.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct JoinToken {
    pub cluster_id: String,
    pub secret: String,
    pub ca_pem: String,
}

const TOKEN_PREFIX: &str = "mgjoin1.";

impl JoinToken {
    pub fn encode(&self) -> String {
        use base64::Engine;
        format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(codec::encode(self))
        )
    }

    pub fn decode(token: &str) -> anyhow::Result<JoinToken> {
        use base64::Engine;
        let bad = || {
            anyhow::anyhow!(
                "the join token is malformed (copy it whole from `mailgrid init` output or {})",
                datadir::JOIN_SECRET_FILE
            )
        };
        let body = token.trim().strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| bad())?;
        codec::decode(&bytes).map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{NodeStatus, PartitionStatus};

    fn status(nodes: &[u64], voters: &[u64], learners: &[u64], placement: &[u64]) -> ClusterStatus {
        let group = |partition: Option<u32>, voters: &[u64], placement: &[u64]| PartitionStatus {
            partition,
            group: partition.map_or(0, |p| p as u64 + 1),
            placement: placement.to_vec(),
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            leader: voters.first().copied(),
            term: 1,
            joint: false,
            healthy: true,
        };
        ClusterStatus {
            cluster: None,
            nodes: nodes
                .iter()
                .map(|&id| NodeStatus {
                    id,
                    cluster_addr: String::new(),
                    listeners: BTreeMap::new(),
                    reachable: true,
                })
                .collect(),
            partitions: vec![group(None, nodes, nodes), group(Some(0), voters, placement)],
            views: BTreeMap::new(),
        }
    }

    #[test]
    fn a_node_is_removed_only_from_a_settled_cluster() {
        // Goal: a removal waits for every partition to sit on its placement; the case that
        // chaos found (a second removal while the first one's replicas were still moving)
        // is refused.
        assert!(unsettled(&status(&[1, 2, 3], &[1, 2, 3], &[], &[1, 2, 3])).is_ok());
        // Node 2 removed, its replacement not yet voting.
        let moving = status(&[1, 3, 4], &[1, 2, 3], &[4], &[1, 3, 4]);
        let e = unsettled(&moving).unwrap_err();
        assert!(e.contains("partition 0 is not settled"), "{e}");
        // Placement not yet updated for the removal: a voter that is no member.
        assert!(unsettled(&status(&[1, 3], &[1, 2, 3], &[], &[1, 2, 3])).is_err());
        // No leader.
        let mut leaderless = status(&[1, 2, 3], &[1, 2, 3], &[], &[1, 2, 3]);
        leaderless.partitions[1].leader = None;
        assert!(unsettled(&leaderless).is_err());
        // Between two voter sets (a promotion that a dead leader left half done): the group
        // still needs a majority of the old set, so no node may go.
        let mut joint = status(&[1, 3, 4], &[1, 3, 4], &[], &[1, 3, 4]);
        joint.partitions[1].joint = true;
        assert!(unsettled(&joint).is_err());
    }
}
