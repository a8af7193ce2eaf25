//! Reads against a group's state machine, run on the leader after it confirmed leadership.

use storage::machine::GroupKind;
use storage::partition::{Lookup as StoredLookup, Usage};
use storage::{GroupMachine, StorageError};

use crate::api::{Content, Lookup, MailboxChanges, Query, QueryResult, Vanished};
use crate::message::header_end;

/// Most messages one read returns.
pub const MESSAGES_PER_READ_MAX: usize = 10_000;
/// Most queue entries one read returns.
pub const QUEUE_READ_MAX: usize = 1_000;

pub fn run(machine: &GroupMachine, query: &Query) -> Result<QueryResult, StorageError> {
    if let Query::Digest = query {
        return Ok(QueryResult::Digest(machine.digest()?));
    }
    if machine.kind() == GroupKind::Meta {
        return machine.read_meta(|m| {
            Ok(match query {
                Query::Cluster => QueryResult::Cluster(m.cluster()?),
                Query::Nodes => QueryResult::Nodes(m.nodes()?),
                Query::Partitions => QueryResult::Partitions(m.partitions()?),
                Query::Domains => QueryResult::Domains(m.domains()?),
                Query::Limits => QueryResult::Limits(m.limits()?),
                Query::Dkim(domain) => QueryResult::Dkim(m.dkim(domain)?),
                other => {
                    return Err(StorageError::Corrupt(format!(
                        "{other:?} is not a meta query"
                    )))
                }
            })
        });
    }
    machine.read_partition(|p| {
        Ok(match query {
            Query::Lookup(address) => QueryResult::Lookup(match p.lookup(address)? {
                StoredLookup::Account(a) => Lookup::Account(a),
                StoredLookup::Alias(a) => Lookup::Alias(a),
                StoredLookup::Unknown => Lookup::Unknown,
            }),
            Query::Accounts { domain } => QueryResult::Accounts(p.accounts(domain.as_deref())?),
            Query::Aliases { domain } => QueryResult::Aliases(p.aliases(domain.as_deref())?),
            Query::Mailboxes(address) => QueryResult::Mailboxes(p.mailboxes(address)?),
            Query::Mailbox { address, name } => QueryResult::Mailbox(p.mailbox(address, name)?),
            Query::Vanished {
                address,
                mailbox,
                since,
            } => QueryResult::Vanished(match p.mailbox(address, mailbox)? {
                Some(mb) => Some(match p.vanished(&mb, *since)? {
                    Some(uids) => Vanished::Exactly(uids),
                    None => Vanished::Forgotten,
                }),
                None => None,
            }),
            Query::Changes {
                address,
                mailbox,
                since,
            } => QueryResult::Changes(match p.mailbox(address, mailbox)? {
                // Nothing changed (the common case): no scan of the mailbox.
                Some(mb) if mb.highest_modseq <= *since => Some(MailboxChanges {
                    mailbox: mb,
                    changed: Vec::new(),
                    complete: true,
                    vanished: Vec::new(),
                }),
                Some(mb) => match p.vanished(&mb, *since)? {
                    Some(vanished) => {
                        let (changed, complete) =
                            p.changed_since(mb.id, *since, MESSAGES_PER_READ_MAX)?;
                        Some(MailboxChanges {
                            mailbox: mb,
                            changed,
                            complete,
                            vanished,
                        })
                    }
                    // Expunges that old are forgotten: the reader compares a full listing.
                    None => Some(MailboxChanges {
                        mailbox: mb,
                        changed: Vec::new(),
                        complete: false,
                        vanished: Vec::new(),
                    }),
                },
                None => None,
            }),
            Query::Messages {
                address,
                mailbox,
                from,
                limit,
            } => QueryResult::Messages(match p.mailbox(address, mailbox)? {
                Some(mb) => {
                    let messages = p.messages(mb.id, *from, (*limit).min(MESSAGES_PER_READ_MAX))?;
                    Some((mb, messages))
                }
                None => None,
            }),
            Query::Body(hash) => QueryResult::Body(p.body(*hash)?),
            Query::Contents {
                hashes,
                headers_only,
            } => {
                let mut out = Vec::with_capacity(hashes.len());
                for hash in hashes {
                    out.push(Content(if *headers_only {
                        p.body_until(*hash, |so_far| header_end(so_far).is_some())?
                            .map(|mut head| {
                                head.truncate(header_end(&head).unwrap_or(head.len()));
                                head
                            })
                    } else {
                        p.body(*hash)?
                    }));
                }
                QueryResult::Contents(out)
            }
            Query::Queue { after, limit } => {
                QueryResult::Queue(p.queue(after.as_ref(), (*limit).min(QUEUE_READ_MAX))?)
            }
            Query::QueueEntry(id) => QueryResult::QueueEntry(p.queue_entry(id)?),
            Query::DomainUsage(domain) => {
                let mut usage = Usage::default();
                for a in p.accounts(Some(domain))? {
                    usage.bytes += a.usage.bytes;
                    usage.messages += a.usage.messages;
                }
                QueryResult::Usage(usage)
            }
            other => {
                return Err(StorageError::Corrupt(format!(
                    "{other:?} is not a partition query"
                )))
            }
        })
    })
}
