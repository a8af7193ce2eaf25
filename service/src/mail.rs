//! The mail service API over the router: accounts, aliases and delivery. Protocol front ends
//! and the commands call these; they work the same on every node.

use std::collections::BTreeMap;

use futures::future::join_all;
use raft::host::GroupError;
use storage::partition::{
    Account, Mailbox, MessageRecord, PartitionCommand, PartitionResponse, Quota, RecipientOutcome,
    Usage,
};
use storage::types::{is_valid_address, normalize_address, BodyHash, Uid, UnixSeconds};
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

impl MailServiceError {
    /// Whether the cluster refused new mail because a leader's disk is full (mail protocols
    /// answer with their "insufficient storage" reply, 452 4.3.1 in SMTP).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, MailServiceError::Group(e) if e.is_disk_full())
    }
}

/// What an address resolves to for delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// Final mailbox owners (aliases expanded), sorted by address.
    Accounts(Vec<Account>),
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

/// Bytes and messages stored in every mailbox of `domain`, summed over all partitions.
pub async fn domain_usage(router: &Router, domain: &str) -> Result<Usage, MailServiceError> {
    let partitions = router.host().config().partitions;
    let reads = (0..partitions).map(|p| {
        router.read(
            raft::partition_group(p),
            Query::DomainUsage(domain.to_string()),
        )
    });
    let mut total = Usage::default();
    for result in join_all(reads).await {
        match result? {
            QueryResult::Usage(u) => {
                total.bytes += u.bytes;
                total.messages += u.messages;
            }
            other => return Err(MailServiceError::Unexpected(format!("{other:?}"))),
        }
    }
    Ok(total)
}

/// Expands aliases (breadth first, bounded) into the accounts that receive mail for `address`,
/// as read at their partitions' leaders (with their quota and usage).
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
                Lookup::Account(a) => accounts.push(a),
                Lookup::Alias(a) => next.extend(a.targets.iter().map(|t| normalize_address(t))),
                Lookup::Unknown => {}
            }
        }
        frontier = next;
    }
    // Each address is looked up once (`seen`), so the accounts are distinct.
    accounts.sort_by(|a, b| a.address.cmp(&b.address));
    if accounts.len() > RECIPIENTS_MAX {
        return Err(MailServiceError::TooManyRecipients);
    }
    Ok(if accounts.is_empty() {
        Resolved::Unknown
    } else {
        Resolved::Accounts(accounts)
    })
}

/// Names a message for delivery: the same key stores at most one copy per mailbox, however
/// often the delivery is retried and whichever recipients each attempt names.
pub type MessageKey = [u8; 32];

/// A message key from the parts that identify one message (an id the sender chose, the
/// original bytes as received, ...), hashed with length prefixes so parts cannot run together.
pub fn message_key(parts: &[&[u8]]) -> MessageKey {
    let mut h = blake3::Hasher::new_derive_key("mailgrid message key v1");
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    *h.finalize().as_bytes()
}

/// Delivers `body` to the INBOX of every account, one proposal per partition, all in
/// parallel. Returns once every partition committed.
pub async fn deliver(
    router: &Router,
    accounts: &[String],
    body: &[u8],
    key: &MessageKey,
) -> Result<Vec<(String, RecipientOutcome)>, MailServiceError> {
    let mut by_group: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for a in accounts {
        by_group
            .entry(router.group_of(a))
            .or_default()
            .push(a.clone());
    }
    let now = now();
    let proposals = by_group.into_iter().map(|(group, recipients)| {
        let cmd = Command::Partition(PartitionCommand::Deliver {
            key: *key,
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

/// How passwords set here (`user add --password`, `user passwd`) are stored. Either form
/// verifies whatever the node's setting; it only chooses the hash of new passwords.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PasswordScheme {
    /// argon2id, RFC 9106's memory-hard hash (19 MiB, 2 passes): 20-50 ms of CPU per first
    /// login, by machine. The default.
    #[default]
    Argon2id,
    /// SHA512-CRYPT with 5000 rounds (glibc's `$6$`, the usual Dovecot scheme): about 1.5 ms
    /// per first login, and no memory cost, so cheaper to guess offline.
    Sha512Crypt,
}

impl std::str::FromStr for PasswordScheme {
    type Err = String;

    fn from_str(s: &str) -> Result<PasswordScheme, String> {
        match s.to_ascii_lowercase().as_str() {
            "argon2id" => Ok(PasswordScheme::Argon2id),
            "sha512-crypt" => Ok(PasswordScheme::Sha512Crypt),
            _ => Err(format!(
                "unknown password scheme {s:?}: expected \"argon2id\" or \"sha512-crypt\""
            )),
        }
    }
}

/// The scheme a stored password hash is in, as operators name it (`user list` shows it).
pub fn password_scheme_name(hash: &str) -> &'static str {
    match hash.split('$').nth(1) {
        Some("argon2id") => "argon2id",
        Some("argon2i") => "argon2i",
        Some("argon2d") => "argon2d",
        Some("6") => "sha512-crypt",
        Some("5") => "sha256-crypt",
        _ => "unknown",
    }
}

/// Hash of a password in `scheme`, computed here (the proposer) so apply stays deterministic.
pub fn hash_password(password: &str, scheme: PasswordScheme) -> Result<String, String> {
    match scheme {
        PasswordScheme::Argon2id => {
            use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
            let salt = SaltString::generate(&mut OsRng);
            argon2::Argon2::default()
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| format!("hashing password: {e}"))
        }
        PasswordScheme::Sha512Crypt => {
            let params = sha_crypt::Sha512Params::new(sha_crypt::ROUNDS_DEFAULT)
                .map_err(|e| format!("hashing password: {e:?}"))?;
            sha_crypt::sha512_simple(password, &params)
                .map_err(|e| format!("hashing password: {e:?}"))
        }
    }
}

/// The stored form of an imported password hash, or why it is refused. Accepted: an argon2
/// (id, i or d) PHC string, verified with the parameters it names; and SHA-crypt
/// (`$6$...` SHA-512, `$5$...` SHA-256), what Dovecot's SHA512-CRYPT / SHA256-CRYPT schemes
/// and `/etc/shadow` hold, so users moving over keep their passwords. Dovecot's `{SCHEME}`
/// prefix is dropped.
pub fn check_password_hash(hash: &str) -> Result<String, String> {
    use argon2::password_hash::PasswordHash;
    let expected = "expected an argon2 PHC string ($argon2id$v=19$m=19456,t=2,p=1$SALT$HASH) \
                    or a SHA-crypt one ($6$SALT$HASH, $5$SALT$HASH, optionally $6$rounds=N$...)";
    let hash = match hash.strip_prefix('{').and_then(|rest| rest.split_once('}')) {
        Some((scheme, rest)) => {
            let known = [
                "SHA512-CRYPT",
                "SHA256-CRYPT",
                "CRYPT",
                "ARGON2ID",
                "ARGON2I",
            ];
            if !known.contains(&scheme.to_ascii_uppercase().as_str()) {
                return Err(format!(
                    "password hash: scheme {{{scheme}}} is not supported; {expected}"
                ));
            }
            rest
        }
        None => hash,
    };
    if hash.starts_with("$5$") || hash.starts_with("$6$") {
        return check_sha_crypt(hash)
            .map(|()| hash.to_string())
            .map_err(|e| format!("password hash: {e}; {expected}"));
    }
    let parsed = PasswordHash::new(hash).map_err(|e| format!("password hash: {e}; {expected}"))?;
    match parsed.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" if parsed.hash.is_some() => Ok(hash.to_string()),
        other => Err(format!(
            "password hash: algorithm {other:?} (or no hash part) is not supported; {expected}"
        )),
    }
}

/// Most rounds an imported SHA-crypt hash may name: each login costs them (about 0.5 µs
/// each), and far more than the 5,000 default would turn logins into a CPU drain.
const SHA_CRYPT_ROUNDS_MAX: usize = 1_000_000;

/// The layout of a SHA-crypt string: `$5$` or `$6$`, optional `rounds=N$` (1,000 to
/// `SHA_CRYPT_ROUNDS_MAX`), a salt of at most 16 characters, and the hash in crypt's base64
/// (43 characters for SHA-256, 86 for SHA-512).
fn check_sha_crypt(hash: &str) -> Result<(), String> {
    let (id, rest) = hash[1..]
        .split_once('$')
        .ok_or("no $ after the scheme id")?;
    let mut parts: Vec<&str> = rest.split('$').collect();
    if let Some(rounds) = parts.first().and_then(|p| p.strip_prefix("rounds=")) {
        let rounds: usize = rounds
            .parse()
            .map_err(|_| format!("rounds={rounds:?} is not a number"))?;
        if !(1_000..=SHA_CRYPT_ROUNDS_MAX).contains(&rounds) {
            return Err(format!(
                "rounds={rounds} is outside 1000..={SHA_CRYPT_ROUNDS_MAX}"
            ));
        }
        parts.remove(0);
    }
    let [salt, digest] = parts[..] else {
        return Err("expected SALT$HASH after the scheme (and rounds)".into());
    };
    let crypt64 = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/')
    };
    if salt.is_empty() || salt.len() > 16 || salt.bytes().any(|b| b == b':' || b == b'\n') {
        return Err(format!("salt {salt:?} must be 1 to 16 characters"));
    }
    let digest_len = if id == "6" { 86 } else { 43 };
    if digest.len() != digest_len || !crypt64(digest) {
        return Err(format!(
            "the hash part must be {digest_len} characters of crypt's base64 (./0-9A-Za-z)"
        ));
    }
    Ok(())
}

pub fn account_command(address: &str, password_hash: String, quota: Quota) -> Command {
    Command::Partition(PartitionCommand::CreateAccount {
        address: address.to_string(),
        password_hash,
        quota,
        now: now(),
    })
}

/// A hash of a random password, checked for unknown users so that a login for an unknown
/// address takes as long as one for a known address with a wrong password.
fn dummy_hash() -> String {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        let random = hex::encode(rand::random::<[u8; 16]>());
        hash_password(&random, PasswordScheme::Argon2id).unwrap_or_default()
    })
    .clone()
}

/// Checks a password against the replicated account (a linearizable read at the partition's
/// leader; the hash is verified here, off the async threads). `Ok(Some(address))` is the
/// account's canonical address.
pub async fn authenticate(
    router: &Router,
    user: &str,
    password: &str,
) -> Result<Option<String>, MailServiceError> {
    let started = tokio::time::Instant::now();
    let address = normalize_address(user);
    let account = if is_valid_address(&address) {
        match lookup(router, &address).await? {
            Lookup::Account(a) => Some(a),
            _ => None,
        }
    } else {
        None
    };
    let hash = account.as_ref().map(|a| a.password_hash.clone());
    if let Some(account) = &account {
        if LOGINS.verified(&account.address, &account.password_hash, password) {
            return Ok(Some(account.address.clone()));
        }
    }
    let password = password.to_string();
    // One verification per core at a time, the rest wait their turn in order: argon2id takes
    // 19 MiB and 20-50 ms of CPU each (by machine), so a burst of logins verified all at once
    // would share the cores until every one of them was slow, and a flood would take memory
    // without limit.
    let turn = HASHING.acquire().await;
    let (matches, password) = tokio::task::spawn_blocking(move || {
        let ok = verify_password(&hash.unwrap_or_else(dummy_hash), &password);
        (ok, password)
    })
    .await
    .unwrap_or((false, String::new()));
    drop(turn);
    let account = account.filter(|_| matches);
    match &account {
        Some(account) => LOGINS.remember(&account.address, &account.password_hash, &password),
        None => tokio::time::sleep_until(started + FAILED_LOGIN_FLOOR).await,
    }
    Ok(account.map(|a| a.address))
}

/// Least time a refused password takes to answer. Verification time depends on how the
/// account's hash is stored (argon2id tens of ms, an imported SHA-crypt hash under 2 ms) and
/// an unknown address is checked against a dummy argon2id hash, so without a floor the timing
/// of a wrong password would tell which addresses exist with imported hashes.
const FAILED_LOGIN_FLOOR: std::time::Duration = std::time::Duration::from_millis(250);

/// Turns at password verification: one per core (see `authenticate`).
static HASHING: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    tokio::sync::Semaphore::new(cores)
});

/// How long a verified login spares the next one its argon2 verification.
const LOGIN_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(300);
const LOGIN_CACHE_MAX: usize = 100_000;

static LOGINS: std::sync::LazyLock<LoginCache> = std::sync::LazyLock::new(LoginCache::new);

/// Logins verified recently on this node, like Dovecot's auth cache: mail clients log in
/// again and again (IMAP clients open several connections, POP3 clients poll), and argon2id
/// is built to be slow. An entry holds the account's stored hash and a blake3 of the password
/// keyed with a secret of this process — never the password — and counts only while the
/// stored hash is unchanged (a password change ends it) and for `LOGIN_CACHE_TTL`. Failures
/// are never cached, so guessing still pays full price (and the throttle).
struct LoginCache {
    key: [u8; 32],
    entries: std::sync::Mutex<std::collections::HashMap<String, CachedLogin>>,
}

struct CachedLogin {
    stored_hash: String,
    password: [u8; 32],
    at: std::time::Instant,
}

impl LoginCache {
    fn new() -> LoginCache {
        LoginCache {
            key: rand::random(),
            entries: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn keyed(&self, password: &str) -> [u8; 32] {
        *blake3::keyed_hash(&self.key, password.as_bytes()).as_bytes()
    }

    /// Whether `password` was verified for `address` (whose stored hash is `stored_hash`)
    /// within the TTL.
    fn verified(&self, address: &str, stored_hash: &str, password: &str) -> bool {
        let entries = self.entries.lock().expect("login cache lock");
        entries.get(address).is_some_and(|e| {
            e.at.elapsed() < LOGIN_CACHE_TTL
                && e.stored_hash == stored_hash
                && e.password == self.keyed(password)
        })
    }

    fn remember(&self, address: &str, stored_hash: &str, password: &str) {
        let mut entries = self.entries.lock().expect("login cache lock");
        if entries.len() >= LOGIN_CACHE_MAX {
            entries.retain(|_, e| e.at.elapsed() < LOGIN_CACHE_TTL);
            if entries.len() >= LOGIN_CACHE_MAX {
                entries.clear();
            }
        }
        let entry = CachedLogin {
            stored_hash: stored_hash.to_string(),
            password: self.keyed(password),
            at: std::time::Instant::now(),
        };
        entries.insert(address.to_string(), entry);
    }
}

/// Whether `password` matches the stored `hash` (argon2 PHC or SHA-crypt, see
/// `check_password_hash`).
fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    if hash.starts_with("$6$") {
        return sha_crypt::sha512_check(password, hash).is_ok();
    }
    if hash.starts_with("$5$") {
        return sha_crypt::sha256_check(password, hash).is_ok();
    }
    match PasswordHash::new(hash) {
        Ok(parsed) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Whether `user` may send as `sender`: it is the user's own address, or an alias whose
/// targets include the user.
pub async fn may_send_as(
    router: &Router,
    user: &str,
    sender: &str,
) -> Result<bool, MailServiceError> {
    let sender = normalize_address(sender);
    if sender == user {
        return Ok(true);
    }
    if !is_valid_address(&sender) {
        return Ok(false);
    }
    Ok(match lookup(router, &sender).await? {
        Lookup::Alias(a) => a.targets.iter().any(|t| normalize_address(t) == user),
        _ => false,
    })
}

/// Every message of a mailbox (uid order), read in pages at the partition's leader; `None`
/// when the mailbox does not exist.
pub async fn list_messages(
    router: &Router,
    address: &str,
    mailbox: &str,
) -> Result<Option<(Mailbox, Vec<(Uid, MessageRecord)>)>, MailServiceError> {
    let group = router.group_of(address);
    let mut all = Vec::new();
    let mut from = Uid(1);
    loop {
        let query = Query::Messages {
            address: address.to_string(),
            mailbox: mailbox.to_string(),
            from,
            limit: crate::query::MESSAGES_PER_READ_MAX,
        };
        let (mb, page) = match router.read(group, query).await? {
            QueryResult::Messages(Some(found)) => found,
            QueryResult::Messages(None) => return Ok(None),
            other => return Err(MailServiceError::Unexpected(format!("{other:?}"))),
        };
        let full = page.len() >= crate::query::MESSAGES_PER_READ_MAX;
        if let Some((last, _)) = page.last() {
            from = Uid(last.0 + 1);
        }
        all.extend(page);
        if !full {
            return Ok(Some((mb, all)));
        }
    }
}

/// A stored body, read at the leader of the partition of `address`.
pub async fn body(
    router: &Router,
    address: &str,
    hash: BodyHash,
) -> Result<Option<Vec<u8>>, MailServiceError> {
    match router
        .read(router.group_of(address), Query::Body(hash))
        .await?
    {
        QueryResult::Body(b) => Ok(b),
        other => Err(MailServiceError::Unexpected(format!("{other:?}"))),
    }
}

/// Several stored messages of the partition of `address` (or only their headers), in one
/// read at its leader: one entry per hash, in order, `None` for one no longer stored.
pub async fn contents(
    router: &Router,
    address: &str,
    hashes: Vec<BodyHash>,
    headers_only: bool,
) -> Result<Vec<Option<Vec<u8>>>, MailServiceError> {
    let asked = hashes.len();
    let query = Query::Contents {
        hashes,
        headers_only,
    };
    match router.read(router.group_of(address), query).await? {
        QueryResult::Contents(found) if found.len() == asked => {
            Ok(found.into_iter().map(|c| c.0).collect())
        }
        QueryResult::Contents(found) => Err(MailServiceError::Unexpected(format!(
            "asked for {asked} messages, got {}",
            found.len()
        ))),
        other => Err(MailServiceError::Unexpected(format!("{other:?}"))),
    }
}

/// Proposes a partition command for `address` and returns the partition's answer.
/// Wraps `cmd` so that the cluster applies it at most once however often the write is
/// retried (the router retries such writes through failures of unknown outcome).
pub fn once(cmd: PartitionCommand) -> PartitionCommand {
    PartitionCommand::Once {
        key: rand::random(),
        now: now(),
        command: Box::new(cmd),
    }
}

pub async fn partition_write(
    router: &Router,
    address: &str,
    cmd: PartitionCommand,
) -> Result<PartitionResponse, MailServiceError> {
    match router
        .write(router.group_of(address), Command::Partition(cmd))
        .await?
    {
        Response::Partition(r) => Ok(r),
        other => Err(MailServiceError::Unexpected(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_passwords_are_hashed_in_the_configured_scheme_and_verify() {
        for (scheme, prefix) in [
            (PasswordScheme::Argon2id, "$argon2id$"),
            (PasswordScheme::Sha512Crypt, "$6$"),
        ] {
            let hash = hash_password("secret", scheme).unwrap();
            assert!(hash.starts_with(prefix), "{scheme:?}: {hash}");
            let name = password_scheme_name(&hash);
            assert_eq!(name.parse::<PasswordScheme>(), Ok(scheme));
            assert!(verify_password(&hash, "secret"));
            assert!(!verify_password(&hash, "Secret"));
            // What a node stores, it would also accept as an import.
            assert_eq!(check_password_hash(&hash).as_deref(), Ok(hash.as_str()));
        }
        assert_eq!(
            "sha512-crypt".parse::<PasswordScheme>(),
            Ok(PasswordScheme::Sha512Crypt)
        );
        let e = "bcrypt".parse::<PasswordScheme>().unwrap_err();
        assert!(e.contains("argon2id") && e.contains("sha512-crypt"), "{e}");
    }

    #[test]
    fn argon2_and_sha_crypt_hashes_are_imported_and_others_refused() {
        let made = hash_password("pw", PasswordScheme::Argon2id).unwrap();
        assert_eq!(check_password_hash(&made).as_deref(), Ok(made.as_str()));
        let e = check_password_hash("$2y$10$abcdefghijklmnopqrstuuhLUiD7aNWB3Bk6Z1HVV0ZZEoTp7v5me")
            .unwrap_err();
        assert!(e.contains("argon2") && e.contains("$6$"), "{e}");
        assert!(check_password_hash("plain").is_err());
        assert!(check_password_hash("$argon2id$v=19$m=19456,t=2,p=1").is_err());
        // crypt(3)'s own form, and Dovecot's (`doveadm pw -s SHA512-CRYPT`) with its prefix.
        let sha512 = SHA512_SECRET;
        assert_eq!(check_password_hash(sha512).as_deref(), Ok(sha512));
        let dovecot = format!("{{SHA512-CRYPT}}{sha512}");
        assert_eq!(check_password_hash(&dovecot).as_deref(), Ok(sha512));
        let e = check_password_hash(&format!("{{PLAIN-MD5}}{sha512}")).unwrap_err();
        assert!(e.contains("PLAIN-MD5"), "{e}");
        assert!(check_password_hash(&sha512[..sha512.len() - 1]).is_err());
        let rounds = sha512.replacen("$6$", "$6$rounds=5000000$", 1);
        assert!(check_password_hash(&rounds).unwrap_err().contains("rounds"));
        let rounds = sha512.replacen("$6$", "$6$rounds=20000$", 1);
        assert!(check_password_hash(&rounds).is_ok());
        assert!(check_password_hash(SHA256_SECRET).is_ok());
    }

    /// `secret` hashed by glibc's crypt(3) with salt `saltsalt` (Python's
    /// `crypt.crypt('secret', '$6$saltsalt$')`; `mkpasswd -m sha-512 -S saltsalt` agrees).
    const SHA512_SECRET: &str =
        "$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1";
    /// The same with SHA-256 (`$5$saltsalt$`).
    const SHA256_SECRET: &str = "$5$saltsalt$0IyaXrmV7.sGNS6tirgqHLqX/G.FBvgkYA.lpPdS5sA";

    #[test]
    fn sha_crypt_hashes_from_glibc_verify_the_right_password_only() {
        assert!(verify_password(SHA512_SECRET, "secret"));
        assert!(!verify_password(SHA512_SECRET, "Secret"));
        assert!(verify_password(SHA256_SECRET, "secret"));
        assert!(!verify_password(SHA256_SECRET, "secre"));
        assert!(!verify_password("$6$saltsalt$garbage", "secret"));
    }

    #[test]
    fn a_cached_login_needs_the_same_password_and_the_same_stored_hash() {
        // Goal: the cache answers only for the very password that was verified, and a
        // password change (a new stored hash) ends the entry.
        let cache = LoginCache::new();
        assert!(!cache.verified("a@x.test", "$argon2id$old", "pw"));
        cache.remember("a@x.test", "$argon2id$old", "pw");
        assert!(cache.verified("a@x.test", "$argon2id$old", "pw"));
        assert!(!cache.verified("a@x.test", "$argon2id$old", "pw2"));
        assert!(!cache.verified("a@x.test", "$argon2id$new", "pw"));
        assert!(!cache.verified("b@x.test", "$argon2id$old", "pw"));
    }
}
