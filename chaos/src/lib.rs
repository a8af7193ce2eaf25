//! The checker of the Jepsen-style suite: given the history of delivery operations (each
//! acknowledged, failed, or of unknown outcome) and the final contents of every mailbox, it
//! reports every way the cluster broke its promise. It knows nothing of how the history was
//! made, so it can be checked against hand-written histories that must fail.
//!
//! The runner (`main.rs`: `cluster`, `workload`, `nemesis`, `report`) makes such histories
//! against real node processes under faults.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The cluster acknowledged the operation.
    Ok,
    /// The cluster refused it: it must not have taken effect.
    Fail,
    /// Timeout or dropped connection: it may or may not have taken effect.
    Unknown,
}

/// One delivery of a uniquely tagged message to one recipient.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub tag: String,
    pub recipient: String,
    pub outcome: Outcome,
    /// When the operation was invoked and when its outcome was known, in milliseconds since
    /// the run started (for the real-time order of UIDs).
    #[serde(default)]
    pub invoked_ms: u64,
    #[serde(default)]
    pub completed_ms: u64,
}

/// A message found in a mailbox at the end, in UID order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub uid_validity: u32,
    pub uid: u32,
    pub tag: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Violation {
    /// An acknowledged delivery is missing.
    Lost { recipient: String, tag: String },
    /// A message is stored more than once.
    Duplicated {
        recipient: String,
        tag: String,
        copies: usize,
    },
    /// A message that was never submitted, or whose delivery failed, is stored.
    Invented { recipient: String, tag: String },
    /// UIDs do not strictly increase in arrival order, or one is reused, under a UIDVALIDITY.
    UidOrder {
        recipient: String,
        uid_validity: u32,
        uids: Vec<u32>,
    },
    /// A delivery acknowledged before another was even invoked got the higher UID.
    UidAfter {
        recipient: String,
        earlier: String,
        later: String,
    },
    /// Replicas of a group that caught up hold different state.
    ReplicasDiffer {
        group: u64,
        digests: BTreeMap<u64, Option<String>>,
    },
    /// A witness holds a record of a partition's mail (it must hold none).
    WitnessHoldsMail {
        group: u64,
        node: u64,
        digest: String,
    },
    /// An account's recorded usage is not the sum of what its mailboxes hold.
    UsageMismatch {
        recipient: String,
        recorded_bytes: u64,
        stored_bytes: u64,
    },
    /// A message whose expunge (IMAP) or deletion (POP3) was acknowledged is present.
    ExpungedReturned { recipient: String, tag: String },
    /// A message whose MOVE was acknowledged is in another mailbox.
    Misplaced {
        recipient: String,
        tag: String,
        mailbox: String,
    },
    /// A message whose STORE +FLAGS was acknowledged lacks the flag.
    FlagLost {
        recipient: String,
        tag: String,
        flag: String,
    },
}

impl Violation {
    /// The kind of violation, as the verdict table names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::Lost { .. } => "lost acknowledged delivery",
            Violation::Duplicated { .. } => "duplicated message",
            Violation::Invented { .. } => "invented message",
            Violation::UidOrder { .. } => "UID reused or out of order",
            Violation::UidAfter { .. } => "UID against real-time order",
            Violation::ReplicasDiffer { .. } => "replicas differ",
            Violation::WitnessHoldsMail { .. } => "witness holds mail",
            Violation::UsageMismatch { .. } => "quota usage wrong",
            Violation::ExpungedReturned { .. } => "expunged message back",
            Violation::Misplaced { .. } => "moved message misplaced",
            Violation::FlagLost { .. } => "acknowledged flag lost",
        }
    }
}

/// Every kind the checker looks for, in the verdict table's order.
pub const KINDS: [&str; 11] = [
    "lost acknowledged delivery",
    "duplicated message",
    "invented message",
    "UID reused or out of order",
    "UID against real-time order",
    "expunged message back",
    "moved message misplaced",
    "acknowledged flag lost",
    "replicas differ",
    "witness holds mail",
    "quota usage wrong",
];

/// What a mailbox operation did to one tagged message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// IMAP APPEND to INBOX.
    Append,
    /// SMTP delivery (for the POP3 users).
    Deliver,
    /// IMAP UID STORE +FLAGS of this flag.
    Flag(String),
    /// IMAP \Deleted and UID EXPUNGE.
    Expunge,
    /// IMAP UID MOVE to this mailbox.
    Move(String),
    /// POP3 RETR, DELE and QUIT.
    PopDelete,
}

/// One mailbox operation on one tagged message of one user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxOp {
    pub user: String,
    pub tag: String,
    pub action: Action,
    pub outcome: Outcome,
}

/// A message found at the end in one of a user's mailboxes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Found {
    pub mailbox: String,
    pub uid_validity: u32,
    pub uid: u32,
    pub tag: String,
    pub flags: Vec<String>,
}

/// The outcome that counts when an operation was tried several times: acknowledged if any
/// try was, else unknown if any was, else failed.
fn merge(a: Option<Outcome>, b: Outcome) -> Outcome {
    match (a, b) {
        (Some(Outcome::Ok), _) | (_, Outcome::Ok) => Outcome::Ok,
        (Some(Outcome::Unknown), _) | (_, Outcome::Unknown) => Outcome::Unknown,
        _ => Outcome::Fail,
    }
}

/// Every violation of the mailbox operations (IMAP APPEND/STORE/EXPUNGE/MOVE, POP3 DELE)
/// against the final contents of the users' mailboxes: an added message is present exactly
/// once unless its removal may have happened, an acknowledged removal is final, an
/// acknowledged move lands where it was sent, an acknowledged flag stays, and UIDs in each
/// mailbox strictly increase.
pub fn check_mailboxes(ops: &[MailboxOp], state: &BTreeMap<String, Vec<Found>>) -> Vec<Violation> {
    #[derive(Default)]
    struct Fate<'a> {
        added: Option<Outcome>,
        removed: Option<Outcome>,
        moved: Option<(&'a str, Outcome)>,
        flags: Vec<&'a str>,
    }
    let mut fates: BTreeMap<(&str, &str), Fate> = BTreeMap::new();
    for op in ops {
        let f = fates.entry((&op.user, &op.tag)).or_default();
        match &op.action {
            Action::Append | Action::Deliver => f.added = Some(merge(f.added, op.outcome)),
            Action::Expunge | Action::PopDelete => {
                if op.outcome != Outcome::Fail {
                    f.removed = Some(merge(f.removed, op.outcome));
                }
            }
            Action::Move(to) => {
                if op.outcome != Outcome::Fail {
                    f.moved = Some((to, merge(f.moved.map(|m| m.1), op.outcome)));
                }
            }
            Action::Flag(flag) => {
                if op.outcome == Outcome::Ok {
                    f.flags.push(flag);
                }
            }
        }
    }
    let mut violations = Vec::new();
    let empty = Vec::new();
    for ((user, tag), fate) in &fates {
        let v = |make: fn(String, String) -> Violation| make(user.to_string(), tag.to_string());
        let copies: Vec<&Found> = state
            .get(*user)
            .unwrap_or(&empty)
            .iter()
            .filter(|s| s.tag == *tag)
            .collect();
        match (fate.added, fate.removed, copies.len()) {
            (_, Some(Outcome::Ok), n) if n > 0 => violations.push(v(|recipient, tag| {
                Violation::ExpungedReturned { recipient, tag }
            })),
            (Some(Outcome::Ok), None, 0) => {
                violations.push(v(|recipient, tag| Violation::Lost { recipient, tag }))
            }
            (None | Some(Outcome::Fail), _, n) if n > 0 => {
                violations.push(v(|recipient, tag| Violation::Invented { recipient, tag }))
            }
            _ => {}
        }
        if copies.len() > 1 {
            violations.push(Violation::Duplicated {
                recipient: user.to_string(),
                tag: tag.to_string(),
                copies: copies.len(),
            });
        }
        if let [found] = copies.as_slice() {
            if let Some((to, Outcome::Ok)) = fate.moved {
                if found.mailbox != to {
                    violations.push(Violation::Misplaced {
                        recipient: user.to_string(),
                        tag: tag.to_string(),
                        mailbox: found.mailbox.clone(),
                    });
                }
            }
            for flag in &fate.flags {
                if !found.flags.iter().any(|f| f == flag) {
                    violations.push(Violation::FlagLost {
                        recipient: user.to_string(),
                        tag: tag.to_string(),
                        flag: flag.to_string(),
                    });
                }
            }
        }
    }
    for (user, found) in state {
        let mut uids: BTreeMap<(&str, u32), Vec<u32>> = BTreeMap::new();
        for f in found {
            if !fates.contains_key(&(user.as_str(), f.tag.as_str())) {
                violations.push(Violation::Invented {
                    recipient: user.clone(),
                    tag: f.tag.clone(),
                });
            }
            uids.entry((&f.mailbox, f.uid_validity))
                .or_default()
                .push(f.uid);
        }
        for ((_, uid_validity), uids) in uids {
            violations.extend(uid_order(user, uid_validity, uids));
        }
    }
    violations
}

/// A mailbox's UIDs (in listing order) under one UIDVALIDITY must strictly increase.
fn uid_order(recipient: &str, uid_validity: u32, uids: Vec<u32>) -> Option<Violation> {
    let unique: BTreeSet<u32> = uids.iter().copied().collect();
    (uids.windows(2).any(|w| w[0] >= w[1]) || unique.len() != uids.len()).then(|| {
        Violation::UidOrder {
            recipient: recipient.to_string(),
            uid_validity,
            uids,
        }
    })
}

/// Every violation of the history against the final state. Empty means the run passed.
pub fn check(history: &[Delivery], state: &BTreeMap<String, Vec<Stored>>) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut submitted: BTreeMap<(&str, &str), Outcome> = BTreeMap::new();
    for d in history {
        // An operation retried with the same tag counts as acknowledged if any try was.
        let entry = submitted.entry((&d.recipient, &d.tag)).or_insert(d.outcome);
        if d.outcome == Outcome::Ok || (*entry == Outcome::Fail && d.outcome == Outcome::Unknown) {
            *entry = d.outcome;
        }
    }
    let empty = Vec::new();
    for ((recipient, tag), outcome) in &submitted {
        let stored = state.get(*recipient).unwrap_or(&empty);
        let copies = stored.iter().filter(|s| s.tag == *tag).count();
        match (outcome, copies) {
            (Outcome::Ok, 0) => violations.push(Violation::Lost {
                recipient: recipient.to_string(),
                tag: tag.to_string(),
            }),
            (Outcome::Fail, n) if n > 0 => violations.push(Violation::Invented {
                recipient: recipient.to_string(),
                tag: tag.to_string(),
            }),
            _ => {}
        }
        if copies > 1 {
            violations.push(Violation::Duplicated {
                recipient: recipient.to_string(),
                tag: tag.to_string(),
                copies,
            });
        }
    }
    check_real_time_order(history, state, &mut violations);
    for (recipient, stored) in state {
        for s in stored {
            if !submitted.contains_key(&(recipient.as_str(), s.tag.as_str())) {
                violations.push(Violation::Invented {
                    recipient: recipient.clone(),
                    tag: s.tag.clone(),
                });
            }
        }
        let mut by_validity: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for s in stored {
            by_validity.entry(s.uid_validity).or_default().push(s.uid);
        }
        for (uid_validity, uids) in by_validity {
            violations.extend(uid_order(recipient, uid_validity, uids));
        }
    }
    violations
}

/// An acknowledged delivery that completed before another acknowledged one to the same
/// recipient was invoked must have the lower UID (same UIDVALIDITY). A message's interval
/// runs from its first attempt (any attempt may be the one that stored it, even one of
/// unknown outcome) to its first acknowledgement.
fn check_real_time_order(
    history: &[Delivery],
    state: &BTreeMap<String, Vec<Stored>>,
    violations: &mut Vec<Violation>,
) {
    // (recipient, tag) → (first invocation, first acknowledgement)
    let mut spans: BTreeMap<(&str, &str), (u64, Option<u64>)> = BTreeMap::new();
    for d in history {
        let span = spans
            .entry((&d.recipient, &d.tag))
            .or_insert((d.invoked_ms, None));
        span.0 = span.0.min(d.invoked_ms);
        if d.outcome == Outcome::Ok {
            span.1 = Some(span.1.map_or(d.completed_ms, |c| c.min(d.completed_ms)));
        }
    }
    let mut acked: BTreeMap<&str, Vec<(&str, u64, u64)>> = BTreeMap::new();
    for ((recipient, tag), (invoked, completed)) in spans {
        if let Some(completed) = completed {
            acked
                .entry(recipient)
                .or_default()
                .push((tag, invoked, completed));
        }
    }
    for (recipient, deliveries) in acked {
        let Some(stored) = state.get(recipient) else {
            continue;
        };
        let uids: std::collections::HashMap<&str, (u32, u32)> = stored
            .iter()
            .map(|s| (s.tag.as_str(), (s.uid_validity, s.uid)))
            .collect();
        // Every delivery b must get a higher UID than every delivery a acknowledged before b
        // was invoked: walk b in invocation order, keeping the highest UID (per UIDVALIDITY)
        // among those acknowledged so far. O(n log n), so long runs stay quick to check.
        let mut by_completed: Vec<&(&str, u64, u64)> = deliveries.iter().collect();
        by_completed.sort_by_key(|d| d.2);
        let mut by_invoked: Vec<&(&str, u64, u64)> = deliveries.iter().collect();
        by_invoked.sort_by_key(|d| d.1);
        let mut highest: BTreeMap<u32, (u32, &str)> = BTreeMap::new();
        let mut done = by_completed.iter().peekable();
        for (b, b_invoked, _) in by_invoked {
            while let Some((a, _, _)) = done.next_if(|d| d.2 < *b_invoked) {
                if let Some(&(validity, uid)) = uids.get(a) {
                    let top = highest.entry(validity).or_insert((uid, a));
                    if uid > top.0 {
                        *top = (uid, a);
                    }
                }
            }
            let Some(&(validity, uid)) = uids.get(b) else {
                continue;
            };
            if let Some(&(top, a)) = highest.get(&validity) {
                if top >= uid {
                    violations.push(Violation::UidAfter {
                        recipient: recipient.to_string(),
                        earlier: a.to_string(),
                        later: b.to_string(),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_operations_are_checked_against_the_final_mailboxes() {
        // Goal: a clean history passes; then each mailbox violation is reported: an
        // expunged message back, a moved one in the wrong mailbox, a lost flag, a lost
        // append, a duplicate, and a reused UID.
        let u = "box@example.test";
        let op = |tag: &str, action: Action, outcome| MailboxOp {
            user: u.into(),
            tag: tag.into(),
            action,
            outcome,
        };
        let found = |mailbox: &str, uid, tag: &str, flags: &[&str]| Found {
            mailbox: mailbox.into(),
            uid_validity: 1,
            uid,
            tag: tag.into(),
            flags: flags.iter().map(|f| f.to_string()).collect(),
        };
        let flagged = || Action::Flag("\\Flagged".into());
        let archive = || Action::Move("Archive".into());
        let ops = vec![
            op("kept", Action::Append, Outcome::Ok),
            op("kept", flagged(), Outcome::Ok),
            op("gone", Action::Append, Outcome::Ok),
            op("gone", Action::Expunge, Outcome::Ok),
            op("maybe", Action::Append, Outcome::Ok),
            op("maybe", Action::Expunge, Outcome::Unknown),
            op("moved", Action::Append, Outcome::Ok),
            op("moved", archive(), Outcome::Ok),
            op("popped", Action::Deliver, Outcome::Ok),
            op("popped", Action::PopDelete, Outcome::Ok),
            op("unsure", Action::Append, Outcome::Unknown),
        ];
        let clean = BTreeMap::from([(
            u.to_string(),
            vec![
                found("INBOX", 1, "kept", &["\\Flagged"]),
                found("INBOX", 3, "maybe", &[]),
                found("Archive", 1, "moved", &[]),
            ],
        )]);
        assert_eq!(check_mailboxes(&ops, &clean), vec![]);

        let broken = BTreeMap::from([(
            u.to_string(),
            vec![
                found("INBOX", 2, "gone", &[]),
                found("INBOX", 3, "moved", &[]),
                found("INBOX", 4, "popped", &[]),
                found("INBOX", 4, "unsure", &[]),
                found("INBOX", 5, "unsure", &[]),
                found("Archive", 1, "kept", &[]),
            ],
        )]);
        let v = check_mailboxes(&ops, &broken);
        let kinds: BTreeSet<&str> = v.iter().map(Violation::kind).collect();
        for kind in [
            "expunged message back",
            "moved message misplaced",
            "acknowledged flag lost",
            "duplicated message",
            "UID reused or out of order",
        ] {
            assert!(kinds.contains(kind), "{kind} not reported in {v:?}");
        }
        assert!(v.contains(&Violation::ExpungedReturned {
            recipient: u.into(),
            tag: "popped".into()
        }));
        // "maybe" (expunge of unknown outcome) may be gone; "kept" is present.
        assert!(!v
            .iter()
            .any(|x| matches!(x, Violation::Lost { tag, .. } if tag == "maybe")));
        let lost = check_mailboxes(&ops[..2], &BTreeMap::new());
        assert_eq!(
            lost,
            vec![Violation::Lost {
                recipient: u.into(),
                tag: "kept".into()
            }]
        );
    }

    fn d(tag: &str, outcome: Outcome) -> Delivery {
        Delivery {
            tag: tag.into(),
            recipient: "u@example.test".into(),
            outcome,
            invoked_ms: 0,
            completed_ms: 0,
        }
    }

    fn s(uid: u32, tag: &str) -> Stored {
        Stored {
            uid_validity: 7,
            uid,
            tag: tag.into(),
        }
    }

    #[test]
    fn a_clean_history_passes() {
        // Goal: acknowledged present once, unknown either way, failed absent: no violation.
        let history = [
            d("a", Outcome::Ok),
            d("b", Outcome::Unknown),
            d("c", Outcome::Unknown),
            d("x", Outcome::Fail),
        ];
        let state = BTreeMap::from([("u@example.test".to_string(), vec![s(1, "a"), s(2, "b")])]);
        assert_eq!(check(&history, &state), vec![]);
    }

    #[test]
    fn lost_duplicated_invented_and_reused_uids_are_each_reported() {
        // Goal: the checker can fail; each kind of violation is found.
        let history = [
            d("lost", Outcome::Ok),
            d("dup", Outcome::Ok),
            d("failed", Outcome::Fail),
            d("ok", Outcome::Ok),
        ];
        let state = BTreeMap::from([(
            "u@example.test".to_string(),
            vec![
                s(1, "dup"),
                s(2, "dup"),
                s(3, "failed"),
                s(3, "ok"),
                s(4, "never-sent"),
            ],
        )]);
        let v = check(&history, &state);
        let who = |t: &str| Violation::Lost {
            recipient: "u@example.test".into(),
            tag: t.into(),
        };
        assert!(v.contains(&who("lost")), "{v:?}");
        assert!(v.contains(&Violation::Duplicated {
            recipient: "u@example.test".into(),
            tag: "dup".into(),
            copies: 2
        }));
        assert!(v.contains(&Violation::Invented {
            recipient: "u@example.test".into(),
            tag: "failed".into()
        }));
        assert!(v.contains(&Violation::Invented {
            recipient: "u@example.test".into(),
            tag: "never-sent".into()
        }));
        assert!(v.iter().any(
            |x| matches!(x, Violation::UidOrder { uids, .. } if uids == &vec![1, 2, 3, 3, 4])
        ));
    }

    #[test]
    fn a_retry_that_was_acknowledged_counts_as_acknowledged() {
        // Goal: an operation whose first try was unknown and retry acknowledged must be present.
        let history = [d("r", Outcome::Unknown), d("r", Outcome::Ok)];
        let v = check(&history, &BTreeMap::new());
        assert_eq!(
            v,
            vec![Violation::Lost {
                recipient: "u@example.test".into(),
                tag: "r".into()
            }]
        );
    }

    #[test]
    fn a_uid_against_real_time_order_is_reported() {
        // Goal: "first" was acknowledged before "second" was invoked, yet holds the higher
        // UID: reported; overlapping deliveries may be stored in either order.
        let timed = |tag: &str, invoked_ms, completed_ms| Delivery {
            invoked_ms,
            completed_ms,
            ..d(tag, Outcome::Ok)
        };
        // "retried" was first tried (outcome unknown) before "overlap-a" was acknowledged:
        // its acknowledged retry may carry the UID of that first try.
        let unknown = Delivery {
            invoked_ms: 80,
            completed_ms: 85,
            ..d("retried", Outcome::Unknown)
        };
        let history = [
            timed("first", 0, 10),
            timed("second", 20, 30),
            timed("overlap-a", 40, 60),
            timed("overlap-b", 50, 70),
            timed("after", 100, 110),
            unknown,
            timed("retried", 120, 130),
        ];
        let state = BTreeMap::from([(
            "u@example.test".to_string(),
            vec![
                s(1, "second"),
                s(2, "first"),
                s(3, "overlap-b"),
                s(4, "overlap-a"),
                s(5, "retried"),
                s(6, "after"),
            ],
        )]);
        assert_eq!(
            check(&history, &state),
            vec![Violation::UidAfter {
                recipient: "u@example.test".into(),
                earlier: "first".into(),
                later: "second".into()
            }]
        );
    }
}
