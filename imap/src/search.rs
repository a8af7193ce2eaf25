//! SEARCH (RFC 3501 §6.4.4, WITHIN RFC 5032, MODSEQ RFC 7162): whether a message matches a
//! search key. Keys on flags, sizes, dates and numbers use the session's view; header and
//! text keys need the message (header keys only its header), which the caller loads as
//! [`need`] says.
//! String matching is a case-insensitive substring match on the decoded (UTF-8) text.

use chrono::{DateTime, NaiveDate, Utc};
use imap_codec::imap_types::core::AString;
use imap_codec::imap_types::search::SearchKey;
use imap_codec::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};

use super::mime;
use super::view::Msg;

/// One message as a search sees it.
pub struct Candidate<'a> {
    /// Its sequence number.
    pub seq: u32,
    pub msg: &'a Msg,
    pub recent: bool,
    /// The message, when the key needs it.
    pub body: Option<&'a [u8]>,
}

/// What the whole mailbox contributes to `*`.
pub struct Bounds {
    pub count: u32,
    pub largest_uid: u32,
    pub now: i64,
}

/// How much of each message a command needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Need {
    /// Only what the session's view holds (flags, sizes, dates, numbers).
    Nothing,
    /// The top-level header, up to and with the empty line that ends it.
    Header,
    /// The whole message.
    Whole,
}

/// How much of each message evaluating `key` needs.
pub fn need(key: &SearchKey<'_>) -> Need {
    use SearchKey as K;
    match key {
        K::And(keys) => keys
            .as_ref()
            .iter()
            .map(need)
            .max()
            .unwrap_or(Need::Nothing),
        K::Not(k) => need(k),
        K::Or(a, b) => need(a).max(need(b)),
        K::Bcc(_)
        | K::Cc(_)
        | K::From(_)
        | K::Header(..)
        | K::SentBefore(_)
        | K::SentOn(_)
        | K::SentSince(_)
        | K::Subject(_)
        | K::To(_) => Need::Header,
        K::Body(_) | K::Text(_) => Need::Whole,
        _ => Need::Nothing,
    }
}

/// Whether the key uses MODSEQ (the response then reports the highest one, RFC 7162 §3.1.5).
pub fn uses_modseq(key: &SearchKey<'_>) -> bool {
    use SearchKey as K;
    match key {
        K::And(keys) => keys.as_ref().iter().any(uses_modseq),
        K::Not(k) => uses_modseq(k),
        K::Or(a, b) => uses_modseq(a) || uses_modseq(b),
        K::ModSequence { .. } => true,
        _ => false,
    }
}

/// Whether `n` is in a sequence set whose `*` stands for `largest`.
pub fn in_set(set: &SequenceSet, n: u32, largest: u32) -> bool {
    let value = |v: &SeqOrUid| match v {
        SeqOrUid::Value(x) => x.get(),
        SeqOrUid::Asterisk => largest,
    };
    set.0.as_ref().iter().any(|s| match s {
        Sequence::Single(v) => value(v) == n,
        Sequence::Range(a, b) => {
            let (a, b) = (value(a), value(b));
            a.min(b) <= n && n <= a.max(b)
        }
    })
}

fn needle(s: &AString<'_>) -> String {
    String::from_utf8_lossy(s.as_ref()).to_lowercase()
}

fn contains(haystack: &str, needle: &str) -> bool {
    needle.is_empty() || haystack.to_lowercase().contains(needle)
}

fn header_contains(body: &[u8], name: &str, value: &AString<'_>) -> bool {
    let wanted = needle(value);
    mime::header_values(body, name)
        .iter()
        .any(|v| contains(v, &wanted))
}

fn internal_day(msg: &Msg) -> Option<NaiveDate> {
    DateTime::<Utc>::from_timestamp(msg.internal_date, 0).map(|d| d.date_naive())
}

fn sent_day(body: &[u8]) -> Option<NaiveDate> {
    let (y, m, d) = mime::sent_date(body)?;
    NaiveDate::from_ymd_opt(y, m, d)
}

/// Whether the candidate matches. Keys that need the message are false without it.
pub fn matches(key: &SearchKey<'_>, c: &Candidate<'_>, b: &Bounds) -> bool {
    use SearchKey as K;
    let flag = |f: &str| c.msg.flags.contains(f);
    let body = c.body.unwrap_or_default();
    match key {
        K::And(keys) => keys.as_ref().iter().all(|k| matches(k, c, b)),
        K::Not(k) => !matches(k, c, b),
        K::Or(x, y) => matches(x, c, b) || matches(y, c, b),
        K::SequenceSet(set) => in_set(set, c.seq, b.count),
        K::Uid(set) => in_set(set, c.msg.uid.0, b.largest_uid),
        K::All => true,
        K::Answered => flag("\\Answered"),
        K::Deleted => flag("\\Deleted"),
        K::Draft => flag("\\Draft"),
        K::Flagged => flag("\\Flagged"),
        K::Seen => flag("\\Seen"),
        K::Unanswered => !flag("\\Answered"),
        K::Undeleted => !flag("\\Deleted"),
        K::Undraft => !flag("\\Draft"),
        K::Unflagged => !flag("\\Flagged"),
        K::Unseen => !flag("\\Seen"),
        K::Recent => c.recent,
        K::New => c.recent && !flag("\\Seen"),
        K::Old => !c.recent,
        K::Keyword(k) => c
            .msg
            .flags
            .iter()
            .any(|f| f.eq_ignore_ascii_case(k.as_ref())),
        K::Unkeyword(k) => !c
            .msg
            .flags
            .iter()
            .any(|f| f.eq_ignore_ascii_case(k.as_ref())),
        K::Larger(n) => c.msg.size > u64::from(*n),
        K::Smaller(n) => c.msg.size < u64::from(*n),
        K::Before(d) => internal_day(c.msg).is_some_and(|x| x < *d.as_ref()),
        K::On(d) => internal_day(c.msg).is_some_and(|x| x == *d.as_ref()),
        K::Since(d) => internal_day(c.msg).is_some_and(|x| x >= *d.as_ref()),
        K::Older(secs) => c.msg.internal_date <= b.now - i64::from(secs.get()),
        K::Younger(secs) => c.msg.internal_date >= b.now - i64::from(secs.get()),
        K::SentBefore(d) => sent_day(body).is_some_and(|x| x < *d.as_ref()),
        K::SentOn(d) => sent_day(body).is_some_and(|x| x == *d.as_ref()),
        K::SentSince(d) => sent_day(body).is_some_and(|x| x >= *d.as_ref()),
        K::Bcc(v) => header_contains(body, "Bcc", v),
        K::Cc(v) => header_contains(body, "Cc", v),
        K::From(v) => header_contains(body, "From", v),
        K::To(v) => header_contains(body, "To", v),
        K::Subject(v) => header_contains(body, "Subject", v),
        K::Header(name, v) => {
            let name = String::from_utf8_lossy(name.as_ref()).into_owned();
            let wanted = needle(v);
            let values = mime::header_values(body, &name);
            // An empty value matches every message that has the field.
            !values.is_empty() && values.iter().any(|x| contains(x, &wanted))
        }
        K::Body(v) => c.body.is_some() && contains(&mime::body_text(body), &needle(v)),
        K::Text(v) => {
            let wanted = needle(v);
            c.body.is_some()
                && (contains(&String::from_utf8_lossy(header_part(body)), &wanted)
                    || contains(&mime::body_text(body), &wanted))
        }
        K::ModSequence { modseq, .. } => c.msg.modseq.0 >= *modseq,
    }
}

/// The header of a message (through the empty line that ends it).
fn header_part(body: &[u8]) -> &[u8] {
    &body[..mime::header_end(body).unwrap_or(body.len())]
}

#[cfg(test)]
mod tests {
    use super::*;
    use imap_codec::decode::Decoder;
    use imap_codec::imap_types::command::CommandBody;
    use imap_codec::CommandCodec;
    use service::types::{BodyHash, ModSeq, Uid};

    fn key(text: &str) -> SearchKey<'static> {
        let line = format!("a SEARCH {text}\r\n");
        let (_, cmd) = CommandCodec::default()
            .decode(line.as_bytes())
            .unwrap_or_else(|e| panic!("{text}: {e:?}"));
        let CommandBody::Search { criteria, .. } = cmd.body else {
            panic!()
        };
        let mut keys = criteria.into_inner();
        let k = if keys.len() == 1 {
            keys.remove(0)
        } else {
            SearchKey::And(keys.try_into().unwrap())
        };
        bounded_static::IntoBoundedStatic::into_static(k)
    }

    const MAIL: &[u8] = b"From: Alice <alice@example.test>\r\nTo: bob@example.test\r\nSubject: =?utf-8?q?Caf=C3=A9?= plans\r\nDate: Tue, 3 Nov 2026 10:00:00 +0000\r\n\r\nLet us meet at noon.\r\n";

    // Goal: each kind of key (flags, numbers, sizes, dates, headers, text, boolean
    // combinations) selects exactly the messages it should.
    #[test]
    fn keys_match() {
        let msg = Msg {
            uid: Uid(7),
            flags: ["\\Seen".to_string(), "$Work".to_string()].into(),
            modseq: ModSeq(12),
            size: MAIL.len() as u64,
            internal_date: 1_793_700_000, // 2026-11-03
            body: BodyHash::of(MAIL),
        };
        let c = Candidate {
            seq: 3,
            msg: &msg,
            recent: false,
            body: Some(MAIL),
        };
        let b = Bounds {
            count: 5,
            largest_uid: 9,
            now: 1_793_700_100,
        };
        let yes = [
            "ALL",
            "SEEN",
            "OLD",
            "KEYWORD $work",
            "UNKEYWORD $home",
            "3",
            "2:4",
            "UID 7",
            "UID 5:*",
            "LARGER 10",
            "SMALLER 100000",
            "SINCE 1-Nov-2026",
            "ON 3-Nov-2026",
            "SENTON 3-Nov-2026",
            "SENTBEFORE 4-Nov-2026",
            "FROM alice",
            "TO BOB@",
            "SUBJECT {5}\r\ncafé",
            "HEADER Subject plans",
            "HEADER Date \"\"",
            "BODY noon",
            "TEXT alice",
            "NOT DELETED",
            "OR DELETED SEEN",
            "YOUNGER 1000",
            "MODSEQ 12",
            "(SEEN UNDELETED) UNANSWERED",
        ];
        // What needs no more than the header answers the same from the header alone (as
        // the cache and a headers-only read give it); what needs the message answers no.
        let header = &MAIL[..mime::header_end(MAIL).unwrap()];
        let from_header = Candidate {
            body: Some(header),
            ..c
        };
        for k in yes {
            assert!(matches(&key(k), &c, &b), "{k} should match");
            let k = key(k);
            if need(&k) != Need::Whole {
                assert!(matches(&k, &from_header, &b), "{k:?} on the header only");
            }
        }
        assert!(!matches(&key("BODY noon"), &from_header, &b));
        let no = [
            "UNSEEN",
            "NEW",
            "RECENT",
            "4:*",
            "UID 8",
            "BEFORE 3-Nov-2026",
            "FROM carol",
            "BODY midnight",
            "HEADER X-Missing \"\"",
            "OLDER 1000",
            "MODSEQ 13",
            "OR DELETED FLAGGED",
        ];
        for k in no {
            assert!(!matches(&key(k), &c, &b), "{k} should not match");
        }
        assert_eq!(need(&key("OR SEEN BODY x")), Need::Whole);
        assert_eq!(need(&key("OR SEEN UID 1")), Need::Nothing);
        assert_eq!(need(&key("SEEN NOT SUBJECT x")), Need::Header);
        assert_eq!(need(&key("OR FROM a TEXT b")), Need::Whole);
        assert_eq!(need(&key("SENTSINCE 1-Feb-2020 UNSEEN")), Need::Header);
        assert!(uses_modseq(&key("NOT MODSEQ 3")));
    }
}
