//! Mail data types named as the RFCs name them, shared by the state machine and its readers.

use serde::{Deserialize, Serialize};

/// IMAP unique identifier of a message within one mailbox and UIDVALIDITY (RFC 3501 §2.3.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Uid(pub u32);

/// IMAP UIDVALIDITY of a mailbox: changes only when the mailbox is recreated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UidValidity(pub u32);

/// CONDSTORE modification sequence (RFC 7162); strictly increases per mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ModSeq(pub u64);

/// Content address of a message body: blake3 of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BodyHash(pub [u8; 32]);

impl BodyHash {
    pub fn of(body: &[u8]) -> BodyHash {
        BodyHash(*blake3::hash(body).as_bytes())
    }
}

impl std::fmt::Debug for BodyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Seconds since the Unix epoch, stamped by the proposer (apply never reads a clock).
pub type UnixSeconds = i64;

/// Local part and domain are compared case-insensitively; we store addresses lowercased.
pub fn normalize_address(address: &str) -> String {
    address.trim().to_ascii_lowercase()
}

/// Longest address we accept (RFC 5321 §4.5.3.1.3 path limit).
pub const ADDRESS_BYTES_MAX: usize = 256;
/// Longest mailbox name we accept.
pub const MAILBOX_NAME_BYTES_MAX: usize = 512;
/// Most mailboxes one account may have.
pub const MAILBOXES_PER_ACCOUNT_MAX: usize = 10_000;
/// Most alias targets.
pub const ALIAS_TARGETS_MAX: usize = 1_000;
/// Most flags on one message.
pub const FLAGS_PER_MESSAGE_MAX: usize = 64;
/// Longest flag or keyword.
pub const FLAG_BYTES_MAX: usize = 128;

/// `local@domain` with a non-empty local part and a dotted or single-label domain.
pub fn is_valid_address(address: &str) -> bool {
    if address.len() > ADDRESS_BYTES_MAX
        || address.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return false;
    }
    match address.rsplit_once('@') {
        Some((local, domain)) => !local.is_empty() && is_valid_domain(domain),
        None => false,
    }
}

pub fn is_valid_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 253
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

pub fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

/// Mailbox names: non-empty UTF-8 without control characters; "INBOX" in any case is INBOX.
pub fn normalize_mailbox_name(name: &str) -> Option<String> {
    if name.is_empty()
        || name.len() > MAILBOX_NAME_BYTES_MAX
        || name.chars().any(|c| c.is_control())
        || name.starts_with('/')
        || name.ends_with('/')
        || name.contains("//")
    {
        return None;
    }
    if name.eq_ignore_ascii_case("INBOX") {
        return Some("INBOX".into());
    }
    Some(name.to_string())
}

pub fn is_valid_flag(flag: &str) -> bool {
    !flag.is_empty()
        && flag.len() <= FLAG_BYTES_MAX
        && flag.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_graphic() && !b"(){%*\"]".contains(&b) && (b != b'\\' || i == 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        // Goal: the validators accept ordinary names and refuse malformed ones.
        assert!(is_valid_address("alice@example.test"));
        assert!(!is_valid_address("alice"));
        assert!(!is_valid_address("@example.test"));
        assert!(!is_valid_address("a b@example.test"));
        assert!(!is_valid_address("a@-bad.test"));
        assert_eq!(normalize_mailbox_name("inbox").as_deref(), Some("INBOX"));
        assert_eq!(
            normalize_mailbox_name("Work/2026").as_deref(),
            Some("Work/2026")
        );
        assert_eq!(normalize_mailbox_name(""), None);
        assert_eq!(normalize_mailbox_name("a\u{0}b"), None);
        assert!(is_valid_flag("\\Seen"));
        assert!(is_valid_flag("$Junk"));
        assert!(!is_valid_flag("a(b"));
        assert!(!is_valid_flag("a\\b"));
    }
}
