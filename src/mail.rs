//! The mail service API over the router: accounts, aliases and delivery. Protocol front ends
//! and the commands call these; they work the same on every node.

use std::collections::BTreeMap;

use futures::future::join_all;
use raft::host::GroupError;
use storage::partition::{PartitionCommand, PartitionResponse, Quota, RecipientOutcome};
use storage::types::{is_valid_address, normalize_address, UnixSeconds};
use storage::{Command, Response};

use crate::api::{Lookup, Query, QueryResult};
use crate::router::Router;

/// Deepest alias chain we follow (a → b → c ...); loops end here too.
const ALIAS_DEPTH_MAX: usize = 8;
/// Most final recipients one delivery may fan out to.
pub const RECIPIENTS_MAX: usize = 1_000;

pub fn now() -> UnixSeconds {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum MailServiceError {
    #[error("{0}")]
    Group(#[from] GroupError),
    #[error("invalid address {0}")]
    InvalidAddress(String),
    #[error("too many recipients")]
    TooManyRecipients,
    #[error("unexpected answer from the cluster: {0}")]
    Unexpected(String),
}

/// What an address resolves to for delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// Final mailbox owners (aliases expanded).
    Accounts(Vec<String>),
    Unknown,
}

pub async fn lookup(router: &Router, address: &str) -> Result<Lookup, MailServiceError> {
    let group = router.group_of(address);
    match router
        .read(group, Query::Lookup(address.to_string()))
        .await?
    {
        QueryResult::Lookup(l) => Ok(l),
        other => Err(MailServiceError::Unexpected(format!("{other:?}"))),
    }
}

/// Expands aliases (breadth first, bounded) into the accounts that receive mail for `address`.
pub async fn resolve(router: &Router, address: &str) -> Result<Resolved, MailServiceError> {
    let address = normalize_address(address);
    if !is_valid_address(&address) {
        return Err(MailServiceError::InvalidAddress(address));
    }
    let mut frontier = vec![address];
    let mut accounts = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..ALIAS_DEPTH_MAX {
        if frontier.is_empty() {
            break;
        }
        let mut next = Vec::new();
        for addr in frontier {
            if !seen.insert(addr.clone()) {
                continue;
            }
            match lookup(router, &addr).await? {
                Lookup::Account(a) => accounts.push(a.address),
                Lookup::Alias(a) => next.extend(a.targets.iter().map(|t| normalize_address(t))),
                Lookup::Unknown => {}
            }
        }
        frontier = next;
    }
    accounts.sort();
    accounts.dedup();
    if accounts.len() > RECIPIENTS_MAX {
        return Err(MailServiceError::TooManyRecipients);
    }
    Ok(if accounts.is_empty() {
        Resolved::Unknown
    } else {
        Resolved::Accounts(accounts)
    })
}

/// Delivers `body` to the INBOX of every account, one proposal per partition, all in
/// parallel. Returns once every partition committed. `delivery_id` names this delivery: the
/// same id with the same body and recipients is stored once however often it is retried.
pub async fn deliver(
    router: &Router,
    accounts: &[String],
    body: &[u8],
    delivery_id: &[u8],
) -> Result<Vec<(String, RecipientOutcome)>, MailServiceError> {
    let mut by_group: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for a in accounts {
        by_group
            .entry(router.group_of(a))
            .or_default()
            .push(a.clone());
    }
    let now = now();
    let body_hash = blake3::hash(body);
    let proposals = by_group.into_iter().map(|(group, recipients)| {
        let mut key = blake3::Hasher::new();
        key.update(delivery_id);
        key.update(body_hash.as_bytes());
        for r in &recipients {
            key.update(r.as_bytes());
            key.update(&[0]);
        }
        let cmd = Command::Partition(PartitionCommand::Deliver {
            key: *key.finalize().as_bytes(),
            recipients,
            body: body.to_vec(),
            internal_date: now,
            now,
        });
        router.write(group, cmd)
    });
    let mut outcomes = Vec::new();
    for result in join_all(proposals).await {
        match result? {
            Response::Partition(PartitionResponse::Delivered(o)) => outcomes.extend(o),
            other => return Err(MailServiceError::Unexpected(format!("{other:?}"))),
        }
    }
    Ok(outcomes)
}

/// Argon2id hash of a password, computed here (the proposer) so apply stays deterministic.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing password: {e}"))
}

pub fn account_command(address: &str, password_hash: String, quota: Quota) -> Command {
    Command::Partition(PartitionCommand::CreateAccount {
        address: address.to_string(),
        password_hash,
        quota,
        now: now(),
    })
}
