//! The producer side of the outbound queue: which partition a queue entry lives in, and how a
//! submission (SMTP AUTH today, JMAP `EmailSubmission` next) turns remote recipients into
//! committed entries. The delivery workers that drain the queue are the `outbound` crate.

use futures::future::join_all;
use raft::{partition_group, GroupId};
use storage::partition::{
    PartitionCommand, PartitionResponse, QueueEntry, QueueId, QueueRecipient, RecipientState,
    QUEUE_RECIPIENTS_MAX,
};
use storage::types::UnixSeconds;
use storage::{Command, Response};

use crate::mail::{self, MailServiceError, MessageKey};
use crate::router::Router;

/// The partition group a queue entry lives in.
pub fn queue_group(id: &QueueId, partitions: u32) -> GroupId {
    let n = u32::from_be_bytes(id[..4].try_into().expect("16-byte id"));
    partition_group(n % partitions)
}

/// Queues `body` from `sender` for the remote `recipients`, in entries of at most
/// [`QUEUE_RECIPIENTS_MAX`] recipients; returns once every entry is committed. The ids come
/// from `key` and the recipients, so a retried submission queues nothing twice.
pub async fn enqueue(
    router: &Router,
    sender: &str,
    recipients: &[String],
    body: Vec<u8>,
    key: &MessageKey,
    now: UnixSeconds,
) -> Result<Vec<QueueId>, MailServiceError> {
    let mut sorted = recipients.to_vec();
    sorted.sort();
    sorted.dedup();
    let partitions = router.host().config().partitions;
    let chunks: Vec<&[String]> = sorted.chunks(QUEUE_RECIPIENTS_MAX).collect();
    let last = chunks.len().saturating_sub(1);
    // Each entry's command owns the bytes; the last one takes them, the others copy.
    let mut body = Some(body);
    let writes = chunks.into_iter().enumerate().map(|(i, chunk)| {
        let bytes = if i == last {
            body.take().unwrap_or_default()
        } else {
            body.clone().unwrap_or_default()
        };
        let mut parts: Vec<&[u8]> = vec![b"queue", key];
        parts.extend(chunk.iter().map(|r| r.as_bytes()));
        let hash = mail::message_key(&parts);
        let id: QueueId = hash[..16].try_into().expect("16 bytes");
        let entry = QueueEntry {
            id,
            sender: sender.to_string(),
            recipients: chunk
                .iter()
                .map(|r| QueueRecipient {
                    address: r.clone(),
                    state: RecipientState::Pending,
                    reply: None,
                })
                .collect(),
            body: storage::types::BodyHash([0; 32]),
            size: bytes.len() as u64,
            created: now,
            next_attempt: now,
            attempts: 0,
            held: false,
            last_error: None,
        };
        let cmd = PartitionCommand::Enqueue { entry, body: bytes };
        async move {
            let group = queue_group(&id, partitions);
            match router.write(group, Command::Partition(cmd)).await? {
                Response::Partition(PartitionResponse::Done) => Ok(id),
                other => Err(MailServiceError::Unexpected(format!("{other:?}"))),
            }
        }
    });
    join_all(writes).await.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn queue_ids_spread_over_partitions() {
        // Goal: entries land in every partition, not one hot spot.
        let groups: HashSet<GroupId> = (0u32..2000)
            .map(|i| {
                let h = blake3::hash(&i.to_le_bytes());
                queue_group(&h.as_bytes()[..16].try_into().unwrap(), 16)
            })
            .collect();
        assert_eq!(groups.len(), 16);
    }
}
