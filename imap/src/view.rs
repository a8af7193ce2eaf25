//! A session's view of its selected mailbox: the messages in sequence order as this session
//! last told the client, and how a catch-up from the partition leader changes it.
//!
//! Sequence numbers only exist here: the stored state knows UIDs. The view changes only
//! through [`View::apply`], which turns the stored changes into the untagged responses that
//! keep the client's numbering identical to ours (EXPUNGE, EXISTS, RECENT, FETCH FLAGS).

use std::collections::{BTreeMap, BTreeSet};

use imap_codec::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use service::api::Vanished;
use service::partition::{Mailbox, MessageRecord};
use service::types::{BodyHash, ModSeq, Uid, UidValidity, UnixSeconds};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub uid: Uid,
    pub flags: BTreeSet<String>,
    pub modseq: ModSeq,
    pub size: u64,
    pub internal_date: UnixSeconds,
    pub body: BodyHash,
}

impl Msg {
    pub fn new(uid: Uid, r: MessageRecord) -> Msg {
        Msg {
            uid,
            flags: r.flags,
            modseq: r.modseq,
            size: r.size,
            internal_date: r.internal_date,
            body: r.body,
        }
    }
}

#[derive(Debug)]
pub struct View {
    pub name: String,
    pub read_only: bool,
    pub uid_validity: UidValidity,
    pub uid_next: Uid,
    /// The MODSEQ up to which this view has taken in the stored changes.
    pub highest_modseq: ModSeq,
    pub messages: Vec<Msg>,
    /// UID ranges `from..to` this session claimed as `\Recent`.
    recent: Vec<(Uid, Uid)>,
    /// Expunged messages not yet announced (EXPUNGE may not be sent during FETCH, STORE or
    /// SEARCH by sequence number, RFC 3501 §7.4.1).
    pending_expunge: BTreeSet<Uid>,
}

/// How untagged responses about changes are worded for this session.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wording {
    /// CONDSTORE enabled: FETCH responses carry MODSEQ.
    pub condstore: bool,
    /// QRESYNC enabled: expunges are announced as VANISHED.
    pub qresync: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Resolve {
    Indexes(Vec<usize>),
    /// A sequence number beyond the mailbox: the command is refused.
    BadSequence,
}

pub fn flag_list(flags: &BTreeSet<String>, recent: bool) -> String {
    let mut out = String::from("(");
    for f in flags {
        if out.len() > 1 {
            out.push(' ');
        }
        out.push_str(f);
    }
    if recent {
        if out.len() > 1 {
            out.push(' ');
        }
        out.push_str("\\Recent");
    }
    out.push(')');
    out
}

/// A compact IMAP sequence set of UIDs ("1:3,7").
pub fn uid_set(uids: impl IntoIterator<Item = Uid>) -> String {
    let mut sorted: Vec<u32> = uids.into_iter().map(|u| u.0).collect();
    sorted.sort_unstable();
    range_set(&ranges_of(&sorted))
}

/// Sorted, distinct numbers as inclusive ranges of consecutive ones.
fn ranges_of(sorted: &[u32]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &n in sorted {
        match out.last_mut() {
            Some((_, end)) if n <= *end => {}
            Some((_, end)) if n == *end + 1 => *end = n,
            _ => out.push((n, n)),
        }
    }
    out
}

/// Inclusive ranges in IMAP sequence-set syntax (`1:3,7`).
fn range_set(ranges: &[(u32, u32)]) -> String {
    let mut out = String::new();
    for &(start, end) in ranges {
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
    }
    out
}

/// A sequence set as sorted, merged inclusive ranges (`*` is `largest`).
fn set_ranges(set: &SequenceSet, largest: u32) -> Vec<(u32, u32)> {
    let value = |v: &SeqOrUid| match v {
        SeqOrUid::Value(x) => x.get(),
        SeqOrUid::Asterisk => largest,
    };
    let mut ranges: Vec<(u32, u32)> = set
        .0
        .as_ref()
        .iter()
        .map(|s| match s {
            Sequence::Single(v) => (value(v), value(v)),
            Sequence::Range(a, b) => (value(a).min(value(b)), value(a).max(value(b))),
        })
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match merged.last_mut() {
            Some((_, end)) if a <= end.saturating_add(1) => *end = (*end).max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

/// The overlap of two sorted lists of disjoint inclusive ranges.
fn intersect(a: &[(u32, u32)], b: &[(u32, u32)]) -> Vec<(u32, u32)> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (lo, hi) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if lo <= hi {
            out.push((lo, hi));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

impl View {
    /// A view of `mailbox` listing `messages` (UID order).
    pub fn new(mailbox: &Mailbox, messages: Vec<(Uid, MessageRecord)>, read_only: bool) -> View {
        View {
            name: mailbox.name.clone(),
            read_only,
            uid_validity: mailbox.uid_validity,
            uid_next: mailbox.uid_next,
            highest_modseq: mailbox.highest_modseq,
            messages: messages
                .into_iter()
                .map(|(uid, r)| Msg::new(uid, r))
                .collect(),
            recent: Vec::new(),
            pending_expunge: BTreeSet::new(),
        }
    }

    pub fn claim_recent(&mut self, from: Uid, to: Uid) {
        if from < to {
            self.recent.push((from, to));
        }
    }

    pub fn is_recent(&self, uid: Uid) -> bool {
        self.recent
            .iter()
            .any(|(from, to)| *from <= uid && uid < *to)
    }

    pub fn recent_count(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| self.is_recent(m.uid))
            .count()
    }

    pub fn index_of(&self, uid: Uid) -> Option<usize> {
        self.messages.binary_search_by_key(&uid, |m| m.uid).ok()
    }

    /// The messages a sequence set names, as indexes in ascending order. A UID set names the
    /// messages that exist within it; a sequence-number set must stay within the mailbox.
    pub fn resolve(&self, set: &SequenceSet, by_uid: bool) -> Resolve {
        let count = self.messages.len() as u32;
        let largest = if by_uid {
            self.messages.last().map(|m| m.uid.0).unwrap_or(0)
        } else {
            count
        };
        let value = |v: &SeqOrUid| match v {
            SeqOrUid::Value(n) => n.get(),
            SeqOrUid::Asterisk => largest,
        };
        let mut out = BTreeSet::new();
        for seq in set.0.as_ref() {
            let (a, b) = match seq {
                Sequence::Single(v) => (value(v), value(v)),
                Sequence::Range(x, y) => (value(x), value(y)),
            };
            let (lo, hi) = (a.min(b), a.max(b));
            if by_uid {
                let start = self.messages.partition_point(|m| m.uid.0 < lo);
                let end = self.messages.partition_point(|m| m.uid.0 <= hi);
                out.extend(start..end);
            } else {
                if lo == 0 || hi > count {
                    return Resolve::BadSequence;
                }
                out.extend((lo - 1) as usize..hi as usize);
            }
        }
        Resolve::Indexes(out.into_iter().collect())
    }

    /// Records this session's own flag change (its FETCH response was already written).
    pub fn set_flags(&mut self, uid: Uid, modseq: ModSeq, flags: BTreeSet<String>) {
        if let Some(i) = self.index_of(uid) {
            self.messages[i].flags = flags;
            self.messages[i].modseq = modseq;
        }
    }

    /// Removes messages this session expunged itself, writing their EXPUNGE (or VANISHED).
    pub fn remove(&mut self, uids: &[Uid], wording: Wording, out: &mut Vec<u8>) {
        let gone: BTreeSet<Uid> = uids
            .iter()
            .copied()
            .filter(|u| self.index_of(*u).is_some())
            .collect();
        self.announce_expunges(&gone, wording, out);
    }

    fn announce_expunges(&mut self, gone: &BTreeSet<Uid>, wording: Wording, out: &mut Vec<u8>) {
        if gone.is_empty() {
            return;
        }
        if wording.qresync {
            out.extend_from_slice(
                format!("* VANISHED {}\r\n", uid_set(gone.iter().copied())).as_bytes(),
            );
        } else {
            // Highest first, so each number is still valid when the client reads it.
            for uid in gone.iter().rev() {
                if let Some(i) = self.index_of(*uid) {
                    out.extend_from_slice(format!("* {} EXPUNGE\r\n", i + 1).as_bytes());
                }
            }
        }
        self.messages.retain(|m| !gone.contains(&m.uid));
        self.pending_expunge.retain(|u| !gone.contains(u));
    }

    /// Takes in the stored changes since `highest_modseq`: `changed` (new or re-flagged
    /// messages, UID order) and `vanished` (expunged UIDs). Writes the untagged responses;
    /// expunges wait when `allow_expunge` is false. Returns how many new messages arrived.
    pub fn apply(
        &mut self,
        mailbox: &Mailbox,
        changed: Vec<(Uid, MessageRecord)>,
        vanished: &[Uid],
        allow_expunge: bool,
        wording: Wording,
        out: &mut Vec<u8>,
    ) -> usize {
        let known: Vec<Uid> = vanished
            .iter()
            .copied()
            .filter(|u| self.index_of(*u).is_some())
            .collect();
        self.pending_expunge.extend(known);
        if allow_expunge {
            let gone = std::mem::take(&mut self.pending_expunge);
            self.announce_expunges(&gone, wording, out);
        }
        let last = self.messages.last().map(|m| m.uid).unwrap_or(Uid(0));
        let mut added = 0;
        for (uid, record) in changed {
            if vanished.contains(&uid) {
                continue;
            }
            match self.index_of(uid) {
                Some(i) => {
                    let msg = &mut self.messages[i];
                    let flags_changed = msg.flags != record.flags;
                    msg.modseq = record.modseq;
                    msg.flags = record.flags;
                    if flags_changed && !self.pending_expunge.contains(&uid) {
                        let recent = self.is_recent(uid);
                        let msg = &self.messages[i];
                        let mut line = format!(
                            "* {} FETCH (UID {} FLAGS {}",
                            i + 1,
                            uid.0,
                            flag_list(&msg.flags, recent)
                        );
                        if wording.condstore {
                            line.push_str(&format!(" MODSEQ ({})", msg.modseq.0));
                        }
                        line.push_str(")\r\n");
                        out.extend_from_slice(line.as_bytes());
                    }
                }
                None if uid > last => {
                    self.messages.push(Msg::new(uid, record));
                    added += 1;
                }
                // Expunged before we saw it, or already gone from the view.
                None => {}
            }
        }
        self.uid_next = mailbox.uid_next;
        self.highest_modseq = mailbox.highest_modseq.max(self.highest_modseq);
        if added > 0 {
            out.extend_from_slice(format!("* {} EXISTS\r\n", self.messages.len()).as_bytes());
        }
        added
    }

    /// The changes a full listing implies (when the leader could not send a delta).
    pub fn diff_listing(
        &self,
        listing: Vec<(Uid, MessageRecord)>,
    ) -> (Vec<(Uid, MessageRecord)>, Vec<Uid>) {
        let stored: BTreeMap<Uid, MessageRecord> = listing.into_iter().collect();
        let vanished = self
            .messages
            .iter()
            .map(|m| m.uid)
            .filter(|u| !stored.contains_key(u))
            .collect();
        let changed = stored
            .into_iter()
            .filter(|(uid, r)| {
                self.index_of(*uid)
                    .is_none_or(|i| self.messages[i].flags != r.flags)
            })
            .collect();
        (changed, vanished)
    }

    /// The UID set for `VANISHED (EARLIER)` (RFC 7162 §3.2.5.2, §3.2.6): what vanished of the
    /// UIDs the client names in `known` (every UID below UIDNEXT when `None`). When the store
    /// no longer remembers every expunge that far back, every UID below UIDNEXT that is not in
    /// this (current) view counts as vanished. `None` when nothing did.
    pub fn vanished_earlier(
        &self,
        vanished: &Vanished,
        known: Option<&SequenceSet>,
    ) -> Option<String> {
        let largest = self.uid_next.0.saturating_sub(1);
        if largest == 0 {
            return None;
        }
        let gone = match vanished {
            Vanished::Exactly(uids) => {
                let uids: Vec<u32> = uids.iter().map(|u| u.0).filter(|u| *u <= largest).collect();
                ranges_of(&uids)
            }
            Vanished::Forgotten => {
                let mut gaps = Vec::new();
                let mut next = 1u32;
                for m in &self.messages {
                    if m.uid.0 > next {
                        gaps.push((next, m.uid.0 - 1));
                    }
                    next = next.max(m.uid.0.saturating_add(1));
                }
                if next <= largest {
                    gaps.push((next, largest));
                }
                gaps
            }
        };
        let wanted = known.map_or_else(|| vec![(1, largest)], |set| set_ranges(set, largest));
        let gone = intersect(&gone, &wanted);
        (!gone.is_empty()).then(|| range_set(&gone))
    }

    /// The sequence number of the first unseen message.
    pub fn first_unseen(&self) -> Option<usize> {
        self.messages
            .iter()
            .position(|m| !m.flags.contains("\\Seen"))
            .map(|i| i + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(modseq: u64, flags: &[&str]) -> MessageRecord {
        MessageRecord {
            body: BodyHash::of(b"x"),
            size: 1,
            internal_date: 0,
            flags: flags.iter().map(|f| f.to_string()).collect(),
            modseq: ModSeq(modseq),
        }
    }

    fn mailbox(uid_next: u32, modseq: u64) -> Mailbox {
        Mailbox {
            id: 1,
            name: "INBOX".into(),
            uid_validity: UidValidity(7),
            uid_next: Uid(uid_next),
            highest_modseq: ModSeq(modseq),
            subscribed: true,
            special_use: None,
            messages: 0,
            bytes: 0,
            recent_from: Uid(1),
            expunge_records: 0,
            expunge_history_from: ModSeq(0),
        }
    }

    fn view(uids: &[u32]) -> View {
        let listing = uids.iter().map(|u| (Uid(*u), record(1, &[]))).collect();
        View::new(&mailbox(10, 1), listing, false)
    }

    // Goal: sequence and UID sets resolve to the right messages; `*` and reversed ranges
    // work; a sequence number beyond the mailbox is refused; UID sets skip missing UIDs.
    #[test]
    fn sequence_sets() {
        let v = view(&[2, 4, 6, 9]);
        let set = |s: &str| SequenceSet::try_from(s).unwrap();
        assert_eq!(
            v.resolve(&set("1:*"), false),
            Resolve::Indexes(vec![0, 1, 2, 3])
        );
        assert_eq!(v.resolve(&set("3:2"), false), Resolve::Indexes(vec![1, 2]));
        assert_eq!(v.resolve(&set("5"), false), Resolve::BadSequence);
        assert_eq!(v.resolve(&set("3:6"), true), Resolve::Indexes(vec![1, 2]));
        assert_eq!(v.resolve(&set("100:*"), true), Resolve::Indexes(vec![3]));
        assert_eq!(v.resolve(&set("10:20"), true), Resolve::Indexes(vec![]));
        assert_eq!(
            uid_set([Uid(1), Uid(2), Uid(3), Uid(7), Uid(9), Uid(10)]),
            "1:3,7,9:10"
        );
    }

    // Goal: VANISHED (EARLIER) names what vanished of the client's known UIDs; when the
    // store forgot that far back, every absent UID below UIDNEXT (view of 2,4,6,9 with
    // UIDNEXT 10) counts, still limited to the known set.
    #[test]
    fn vanished_earlier_from_history_or_from_the_listing() {
        let v = view(&[2, 4, 6, 9]);
        let set = |s: &str| SequenceSet::try_from(s).unwrap();
        let exactly = Vanished::Exactly(vec![Uid(1), Uid(3), Uid(5), Uid(7), Uid(8), Uid(40)]);
        assert_eq!(
            v.vanished_earlier(&exactly, None).as_deref(),
            Some("1,3,5,7:8")
        );
        assert_eq!(
            v.vanished_earlier(&exactly, Some(&set("3:7"))).as_deref(),
            Some("3,5,7")
        );
        assert_eq!(v.vanished_earlier(&exactly, Some(&set("2,4"))), None);
        let forgotten = Vanished::Forgotten;
        assert_eq!(
            v.vanished_earlier(&forgotten, None).as_deref(),
            Some("1,3,5,7:8")
        );
        assert_eq!(
            v.vanished_earlier(&forgotten, Some(&set("8:*,1,5:3")))
                .as_deref(),
            Some("1,3,5,8")
        );
        assert_eq!(v.vanished_earlier(&Vanished::Exactly(vec![]), None), None);
    }

    // Goal: a catch-up announces expunges highest first, new messages as EXISTS and other
    // sessions' flag changes as FETCH; expunges wait while they are not allowed.
    #[test]
    fn catch_up_responses() {
        let mut v = view(&[1, 2, 3]);
        let mut out = Vec::new();
        let changed = vec![(Uid(2), record(5, &["\\Seen"])), (Uid(4), record(6, &[]))];
        let added = v.apply(
            &mailbox(5, 6),
            changed,
            &[Uid(1), Uid(3)],
            false,
            Wording::default(),
            &mut out,
        );
        assert_eq!(added, 1);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "* 2 FETCH (UID 2 FLAGS (\\Seen))\r\n* 4 EXISTS\r\n"
        );
        out.clear();
        v.apply(
            &mailbox(5, 6),
            vec![],
            &[],
            true,
            Wording::default(),
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "* 3 EXPUNGE\r\n* 1 EXPUNGE\r\n"
        );
        assert_eq!(
            v.messages.iter().map(|m| m.uid.0).collect::<Vec<_>>(),
            vec![2, 4]
        );
        let mut out = Vec::new();
        let qresync = Wording {
            condstore: true,
            qresync: true,
        };
        v.remove(&[Uid(2), Uid(4)], qresync, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "* VANISHED 2,4\r\n");
        assert!(v.messages.is_empty());
    }
}
