//! The checker of the Jepsen-style suite: given the history of delivery operations (each
//! acknowledged, failed, or of unknown outcome) and the final contents of every mailbox, it
//! reports every way the cluster broke its promise. It knows nothing of how the history was
//! made, so it can be checked against hand-written histories that must fail.

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
            let unique: BTreeSet<u32> = uids.iter().copied().collect();
            if uids.windows(2).any(|w| w[0] >= w[1]) || unique.len() != uids.len() {
                violations.push(Violation::UidOrder {
                    recipient: recipient.clone(),
                    uid_validity,
                    uids,
                });
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(tag: &str, outcome: Outcome) -> Delivery {
        Delivery {
            tag: tag.into(),
            recipient: "u@example.test".into(),
            outcome,
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
}
