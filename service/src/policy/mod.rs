//! The rules every protocol consults before it accepts something: what may be delivered
//! (which domains we serve, message size limits, whether a recipient exists and has room in
//! its own quota and its domain's) here, and how password guessing is slowed and locked out
//! in [`throttle`].
//!
//! Domains and limits are read from this node's copy of the meta state (it may lag the meta
//! leader by a heartbeat); a domain missing from it is checked at the meta leader before
//! mail for it is refused. A domain's usage is the sum over all partitions, cached for a
//! couple of seconds; so a domain quota can be overshot by what arrives within that window,
//! while each account's quota is checked again inside the partition when the message is
//! stored.

pub mod throttle;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use storage::meta::Domain;
use storage::partition::Usage;
use storage::types::domain_of;

use crate::api::{Query, QueryResult};
use crate::mail::{self, MailServiceError, Resolved};
use crate::node::Node;

/// How long a domain's summed usage is trusted before it is read again.
const DOMAIN_USAGE_TTL: Duration = Duration::from_secs(2);

#[derive(Debug, PartialEq, Eq)]
pub enum RcptVerdict {
    /// The accounts that receive mail for the address (aliases expanded).
    Local(Vec<String>),
    Unknown,
    /// The named account or domain has no room for the message.
    OverQuota(String),
    /// The domain is not one of ours.
    Remote,
}

#[derive(Debug)]
pub struct Policy {
    node: Arc<Node>,
    usage: Mutex<HashMap<String, (Instant, Usage)>>,
}

impl Policy {
    pub fn new(node: Arc<Node>) -> Policy {
        Policy {
            node,
            usage: Mutex::new(HashMap::new()),
        }
    }

    /// The served domain of that name, from this node's meta copy.
    pub fn domain(&self, name: &str) -> Option<Domain> {
        let name = name.to_ascii_lowercase();
        self.node
            .host()
            .meta()
            .read_meta(|m| m.domain(&name))
            .ok()
            .flatten()
    }

    /// Whether `domain` is served, asked of the meta leader: a refusal for "not our domain" is
    /// permanent, so it must not rest on a local copy that has not caught up (a node just
    /// started or joined).
    async fn served_fresh(&self, domain: &str) -> Result<bool, MailServiceError> {
        match self
            .node
            .router
            .read(raft::META_GROUP, Query::Domains)
            .await?
        {
            QueryResult::Domains(d) => Ok(d.iter().any(|x| x.name == domain)),
            other => Err(MailServiceError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The cluster-wide message size limit (what EHLO advertises as SIZE).
    pub fn cluster_message_bytes_max(&self) -> u64 {
        self.node
            .host()
            .meta()
            .read_meta(|m| m.limits())
            .map(|l| l.message_bytes_max)
            .unwrap_or(storage::meta::DEFAULT_MESSAGE_BYTES_MAX)
    }

    /// The largest message `domain` accepts.
    pub fn message_bytes_max(&self, domain: &str) -> u64 {
        match self.domain(domain) {
            Some(d) if d.limits.message_bytes_max > 0 => d.limits.message_bytes_max,
            _ => self.cluster_message_bytes_max(),
        }
    }

    /// Whether mail for `address` can be accepted now, for a message of about `size` bytes.
    pub async fn check_recipient(
        &self,
        address: &str,
        size: u64,
    ) -> Result<RcptVerdict, MailServiceError> {
        if self.domain(domain_of(address)).is_none()
            && !self.served_fresh(domain_of(address)).await?
        {
            return Ok(RcptVerdict::Remote);
        }
        let accounts = match mail::resolve(&self.node.router, address).await? {
            Resolved::Unknown => return Ok(RcptVerdict::Unknown),
            Resolved::Accounts(a) => a,
        };
        for account in &accounts {
            if !account.fits(size.max(1)) {
                let text = format!("mailbox {} is full", account.address);
                return Ok(RcptVerdict::OverQuota(text));
            }
            let domain = domain_of(&account.address);
            if !self.domain_fits(domain, size).await? {
                let text = format!("domain {domain} is over its quota");
                return Ok(RcptVerdict::OverQuota(text));
            }
        }
        Ok(RcptVerdict::Local(
            accounts.into_iter().map(|a| a.address).collect(),
        ))
    }

    /// Whether `size` more bytes fit in the quota of `domain` (always, when it has none).
    pub async fn domain_fits(&self, domain: &str, size: u64) -> Result<bool, MailServiceError> {
        let Some(d) = self.domain(domain) else {
            return Ok(true);
        };
        if d.limits.quota_bytes == 0 {
            return Ok(true);
        }
        let usage = self.domain_usage(&d.name).await?;
        Ok(usage.bytes.saturating_add(size.max(1)) <= d.limits.quota_bytes)
    }

    async fn domain_usage(&self, domain: &str) -> Result<Usage, MailServiceError> {
        let now = Instant::now();
        if let Some((at, usage)) = self.lock().get(domain) {
            if now.duration_since(*at) < DOMAIN_USAGE_TTL {
                return Ok(usage.clone());
            }
        }
        let usage = mail::domain_usage(&self.node.router, domain).await?;
        self.lock().insert(domain.to_string(), (now, usage.clone()));
        Ok(usage)
    }

    /// Counts a stored message against its domain's cached usage until the next read.
    pub fn note_stored(&self, account: &str, bytes: u64) {
        if let Some((_, usage)) = self.lock().get_mut(domain_of(account)) {
            usage.bytes += bytes;
            usage.messages += 1;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Usage)>> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }
}
