//! Commands of the selected state: CHECK, CLOSE, UNSELECT, EXPUNGE, UID EXPUNGE, SEARCH,
//! FETCH, STORE, COPY, MOVE (and their UID forms).
//!
//! Message content is read from the partition leader only for the items that need it, and
//! only the header where that is all they need: one read per run of messages (bounded in
//! count and bytes), so a FETCH of a large mailbox streams with bounded memory. Headers come
//! from the node's header cache when it holds them.

use std::collections::BTreeSet;
use std::sync::Arc;

use imap_codec::imap_types::command::{CommandBody, FetchModifier, StoreModifier};
use imap_codec::imap_types::fetch::{
    Macro, MacroOrMessageDataItemNames, MessageDataItemName, Part, Section,
};
use imap_codec::imap_types::flag::{Flag, StoreResponse, StoreType};
use imap_codec::imap_types::mailbox::Mailbox as MailboxArg;
use imap_codec::imap_types::search::SearchKey;
use imap_codec::imap_types::sequence::SequenceSet;
use service::partition::{FlagOp, MailError, PartitionCommand, PartitionResponse};
use service::types::{domain_of, ModSeq, Uid};

use super::mime::{self, SectionSpec};
use super::search::{self, Bounds, Candidate, Need};
use super::session::{mail_error, mailbox_name, Done, Session, FLUSH_BYTES};
use super::view::{flag_list, uid_set, Msg, Resolve};
use service::api::{Query, QueryResult};
use service::mail;

/// Most messages whose content one read at the partition leader returns.
const MESSAGES_PER_READ: usize = 64;
/// Most bytes of messages (by stored size) one read returns, unless one alone is larger.
const BYTES_PER_READ: u64 = 4 << 20;

/// Splits `items` into the runs whose content is read at once: at most
/// [`MESSAGES_PER_READ`] and [`BYTES_PER_READ`] each, never empty.
fn runs<T>(items: &[T], size: impl Fn(&T) -> u64) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, item) in items.iter().enumerate() {
        let full = i - start == MESSAGES_PER_READ || bytes + size(item) > BYTES_PER_READ;
        if i > start && full {
            out.push(&items[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += size(item);
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// A message's content as one command reads it: a header shared with the node's header
/// cache, or the bytes read for this command (a whole body is never copied).
#[derive(Clone)]
enum Content {
    Shared(Arc<[u8]>),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Content {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Content::Shared(bytes) => bytes,
            Content::Owned(bytes) => bytes,
        }
    }
}

/// One FETCH data item, as we answer it.
#[derive(Clone, Debug)]
enum Item {
    Uid,
    Flags,
    InternalDate,
    Size,
    Envelope,
    Structure {
        extensible: bool,
    },
    ModSeq,
    /// BODY[...] / BODY.PEEK[...] / RFC822 / RFC822.HEADER / RFC822.TEXT.
    Section {
        /// The name the response uses for the item, e.g. `BODY[1.MIME]` or `RFC822.TEXT`.
        label: String,
        part: Vec<u32>,
        spec: SectionSpec,
        partial: Option<(u32, u32)>,
        /// Whether fetching it sets `\Seen`.
        sets_seen: bool,
    },
}

impl Item {
    fn need(&self) -> Need {
        match self {
            Item::Envelope => Need::Header,
            Item::Section {
                part,
                spec:
                    SectionSpec::Header | SectionSpec::HeaderFields(_) | SectionSpec::HeaderFieldsNot(_),
                ..
            } if part.is_empty() => Need::Header,
            Item::Structure { .. } | Item::Section { .. } => Need::Whole,
            Item::Uid | Item::Flags | Item::InternalDate | Item::Size | Item::ModSeq => {
                Need::Nothing
            }
        }
    }
}

fn part_numbers(p: &Part) -> Vec<u32> {
    p.0.as_ref().iter().map(|n| n.get()).collect()
}

fn part_prefix(part: &[u32]) -> String {
    part.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(".")
}

/// The section as a response names it (`1.2.HEADER.FIELDS (FROM TO)`), its part path and
/// what to extract.
fn section(s: &Option<Section<'_>>) -> (String, Vec<u32>, SectionSpec) {
    let fields =
        |f: &imap_codec::imap_types::core::Vec1<imap_codec::imap_types::core::AString<'_>>| {
            f.as_ref()
                .iter()
                .map(|a| String::from_utf8_lossy(a.as_ref()).to_ascii_uppercase())
                .collect::<Vec<String>>()
        };
    let with_part = |part: &Option<Part>, name: &str| {
        let nums = part.as_ref().map(part_numbers).unwrap_or_default();
        let label = if nums.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", part_prefix(&nums))
        };
        (label, nums)
    };
    match s {
        None => (String::new(), Vec::new(), SectionSpec::Full),
        Some(Section::Part(p)) => {
            let nums = part_numbers(p);
            (part_prefix(&nums), nums, SectionSpec::Full)
        }
        Some(Section::Header(p)) => {
            let (label, nums) = with_part(p, "HEADER");
            (label, nums, SectionSpec::Header)
        }
        Some(Section::Text(p)) => {
            let (label, nums) = with_part(p, "TEXT");
            (label, nums, SectionSpec::Text)
        }
        Some(Section::Mime(p)) => {
            let nums = part_numbers(p);
            (
                format!("{}.MIME", part_prefix(&nums)),
                nums,
                SectionSpec::Mime,
            )
        }
        Some(Section::HeaderFields(p, f)) => {
            let names = fields(f);
            let (label, nums) = with_part(p, "HEADER.FIELDS");
            let label = format!("{label} ({})", names.join(" "));
            (label, nums, SectionSpec::HeaderFields(names))
        }
        Some(Section::HeaderFieldsNot(p, f)) => {
            let names = fields(f);
            let (label, nums) = with_part(p, "HEADER.FIELDS.NOT");
            let label = format!("{label} ({})", names.join(" "));
            (label, nums, SectionSpec::HeaderFieldsNot(names))
        }
    }
}

fn items(names: &MacroOrMessageDataItemNames<'_>) -> Result<Vec<Item>, Done> {
    use MessageDataItemName as N;
    let names: Vec<N<'_>> = match names {
        MacroOrMessageDataItemNames::Macro(m) => {
            let mut v = vec![N::Flags, N::InternalDate, N::Rfc822Size];
            match m {
                Macro::All => v.push(N::Envelope),
                Macro::Full => v.extend([N::Envelope, N::Body]),
                _ => {} // FAST
            }
            v
        }
        MacroOrMessageDataItemNames::MessageDataItemNames(v) => v.clone(),
    };
    let mut out = Vec::new();
    for name in names {
        out.push(match name {
            N::Uid => Item::Uid,
            N::Flags => Item::Flags,
            N::InternalDate => Item::InternalDate,
            N::Rfc822Size => Item::Size,
            N::Envelope => Item::Envelope,
            N::Body => Item::Structure { extensible: false },
            N::BodyStructure => Item::Structure { extensible: true },
            N::ModSeq => Item::ModSeq,
            N::Rfc822 => Item::Section {
                label: "RFC822".into(),
                part: Vec::new(),
                spec: SectionSpec::Full,
                partial: None,
                sets_seen: true,
            },
            N::Rfc822Header => Item::Section {
                label: "RFC822.HEADER".into(),
                part: Vec::new(),
                spec: SectionSpec::Header,
                partial: None,
                sets_seen: false,
            },
            N::Rfc822Text => Item::Section {
                label: "RFC822.TEXT".into(),
                part: Vec::new(),
                spec: SectionSpec::Text,
                partial: None,
                sets_seen: true,
            },
            N::BodyExt {
                section: s,
                partial,
                peek,
            } => {
                let (label, part, spec) = section(&s);
                Item::Section {
                    label: format!("BODY[{label}]"),
                    part,
                    spec,
                    partial: partial.map(|(start, len)| (start, len.get())),
                    sets_seen: !peek,
                }
            }
            N::Binary { .. } | N::BinarySize { .. } => {
                return Err(Done::bad("BINARY is not supported by this server"))
            }
        });
    }
    Ok(out)
}

fn internal_date(secs: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp(secs, 0)
        .unwrap_or_default()
        .format("\"%d-%b-%Y %H:%M:%S +0000\"")
        .to_string()
}

fn store_op(kind: &StoreType) -> FlagOp {
    match kind {
        StoreType::Add => FlagOp::Add,
        StoreType::Remove => FlagOp::Remove,
        StoreType::Replace => FlagOp::Replace,
    }
}

impl Session {
    pub(super) async fn selected_command(
        &mut self,
        body: CommandBody<'_>,
    ) -> std::io::Result<Done> {
        use CommandBody as C;
        if self.selected.is_none() {
            return Ok(Done::bad("no mailbox selected"));
        }
        Ok(match body {
            C::Check => Done::ok("CHECK completed"),
            C::Unselect => {
                self.selected = None;
                Done::ok("UNSELECT completed")
            }
            C::Close => self.close().await,
            C::Expunge => self.expunge(None).await,
            C::ExpungeUid { sequence_set } => self.expunge(Some(&sequence_set)).await,
            C::Search {
                charset,
                criteria,
                uid,
            } => {
                if let Some(c) = charset {
                    let c = c.as_ref().to_ascii_uppercase();
                    if c != "UTF-8" && c != "US-ASCII" {
                        return Ok(Done::no(
                            "[BADCHARSET (UTF-8 US-ASCII)] unsupported charset",
                        ));
                    }
                }
                let mut keys = criteria.into_inner();
                let key = if keys.len() == 1 {
                    keys.remove(0)
                } else {
                    match keys.try_into() {
                        Ok(v) => SearchKey::And(v),
                        Err(_) => return Ok(Done::bad("empty search")),
                    }
                };
                self.search(&key, uid).await
            }
            C::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
                modifiers,
            } => {
                self.fetch(&sequence_set, &macro_or_item_names, uid, &modifiers)
                    .await?
            }
            C::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
                modifiers,
            } => {
                let silent = matches!(response, StoreResponse::Silent);
                self.store(&sequence_set, &kind, silent, &flags, uid, &modifiers)
                    .await
            }
            C::Copy {
                sequence_set,
                mailbox,
                uid,
            } => self.copy(&sequence_set, &mailbox, uid, false).await,
            C::Move {
                sequence_set,
                mailbox,
                uid,
            } => self.copy(&sequence_set, &mailbox, uid, true).await,
            _ => Done::bad("command not supported"),
        })
    }

    fn resolve(&self, set: &SequenceSet, by_uid: bool) -> Result<Vec<usize>, Done> {
        let view = self.selected.as_ref().expect("selected");
        match view.resolve(set, by_uid) {
            Resolve::Indexes(i) => Ok(i),
            Resolve::BadSequence => Err(Done::bad("invalid message sequence number")),
        }
    }

    async fn close(&mut self) -> Done {
        let Some(view) = self.selected.take() else {
            return Done::bad("no mailbox selected");
        };
        if !view.read_only {
            // CLOSE expunges silently (RFC 3501 §6.4.2).
            let cmd = PartitionCommand::Expunge {
                address: self.address().to_string(),
                mailbox: view.name.clone(),
                uids: None,
            };
            if let Err(e) = self.write(cmd).await {
                return Done::unavailable(e);
            }
        }
        Done::ok("CLOSE completed")
    }

    async fn expunge(&mut self, set: Option<&SequenceSet>) -> Done {
        let view = self.selected.as_ref().expect("selected");
        if view.read_only {
            return Done::no("[READ-ONLY] mailbox is read-only");
        }
        let uids = match set {
            None => None,
            Some(set) => {
                let indexes = match self.resolve(set, true) {
                    Ok(i) => i,
                    Err(done) => return done,
                };
                let view = self.selected.as_ref().expect("selected");
                Some(
                    indexes
                        .into_iter()
                        .map(|i| &view.messages[i])
                        .filter(|m| m.flags.contains("\\Deleted"))
                        .map(|m| m.uid)
                        .collect::<Vec<Uid>>(),
                )
            }
        };
        if uids.as_ref().is_some_and(|u| u.is_empty()) {
            return Done::ok("EXPUNGE completed");
        }
        let cmd = PartitionCommand::Expunge {
            address: self.address().to_string(),
            mailbox: view.name.clone(),
            uids,
        };
        match self.write(cmd).await {
            Ok(PartitionResponse::Expunged(removed)) => {
                let wording = self.wording;
                if let Some(view) = self.selected.as_mut() {
                    view.remove(&removed, wording, &mut self.out);
                }
                Done::ok("EXPUNGE completed")
            }
            Ok(PartitionResponse::Refused(e)) => mail_error(&e),
            Ok(other) => Done::unavailable(format!("{other:?}")),
            Err(e) => Done::unavailable(e),
        }
    }

    /// What `need` asks of each of `msgs` (in order), in one read at the partition leader
    /// for what the node's header cache does not hold. `None` for a message no longer
    /// stored, and for every message when nothing is needed.
    async fn contents(&self, msgs: &[&Msg], need: Need) -> Result<Vec<Option<Content>>, Done> {
        let mut out: Vec<Option<Content>> = vec![None; msgs.len()];
        if need == Need::Nothing {
            return Ok(out);
        }
        let cache = &self.imap.headers;
        let mut wanted = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            match need {
                Need::Header => match cache.get(&m.body) {
                    Some(header) => out[i] = Some(Content::Shared(header)),
                    None => wanted.push(i),
                },
                _ => wanted.push(i),
            }
        }
        if wanted.is_empty() {
            return Ok(out);
        }
        let hashes = wanted.iter().map(|&i| msgs[i].body).collect();
        let router = &self.imap.node.router;
        let found = mail::contents(router, self.address(), hashes, need == Need::Header)
            .await
            .map_err(Done::unavailable)?;
        for (i, content) in wanted.into_iter().zip(found) {
            let Some(content) = content else { continue };
            let hash = msgs[i].body;
            out[i] = Some(if need == Need::Header {
                let header: Arc<[u8]> = content.into();
                cache.insert(hash, header.clone());
                Content::Shared(header)
            } else {
                if !cache.contains(&hash) {
                    let end = mime::header_end(&content).unwrap_or(content.len());
                    cache.insert(hash, content[..end].into());
                }
                Content::Owned(content)
            });
        }
        Ok(out)
    }

    async fn search(&mut self, key: &SearchKey<'_>, by_uid: bool) -> Done {
        let view = self.selected.as_ref().expect("selected");
        let bounds = Bounds {
            count: view.messages.len() as u32,
            largest_uid: view.messages.last().map(|m| m.uid.0).unwrap_or(0),
            now: mail::now(),
        };
        let need = search::need(key);
        let messages = view.messages.clone();
        let mut found = Vec::new();
        let mut highest = ModSeq(0);
        let mut seq = 0;
        for run in runs(&messages, |m| m.size) {
            let msgs: Vec<&Msg> = run.iter().collect();
            let bodies = match self.contents(&msgs, need).await {
                Ok(b) => b,
                Err(done) => return done,
            };
            let view = self.selected.as_ref().expect("selected");
            for (msg, body) in run.iter().zip(&bodies) {
                seq += 1;
                let c = Candidate {
                    seq,
                    msg,
                    recent: view.is_recent(msg.uid),
                    body: body.as_deref(),
                };
                if search::matches(key, &c, &bounds) {
                    found.push(if by_uid { msg.uid.0 } else { seq });
                    highest = highest.max(msg.modseq);
                }
            }
        }
        let mut line = String::from("* SEARCH");
        for n in &found {
            line.push(' ');
            line.push_str(&n.to_string());
        }
        if search::uses_modseq(key) && !found.is_empty() {
            self.wording.condstore = true;
            line.push_str(&format!(" (MODSEQ {})", highest.0));
        }
        line.push_str("\r\n");
        self.out.extend_from_slice(line.as_bytes());
        Done::ok(if by_uid {
            "UID SEARCH completed"
        } else {
            "SEARCH completed"
        })
    }

    async fn fetch(
        &mut self,
        set: &SequenceSet,
        names: &MacroOrMessageDataItemNames<'_>,
        by_uid: bool,
        modifiers: &[FetchModifier],
    ) -> std::io::Result<Done> {
        let mut items = match items(names) {
            Ok(i) => i,
            Err(done) => return Ok(done),
        };
        let indexes = match self.resolve(set, by_uid) {
            Ok(i) => i,
            Err(done) => return Ok(done),
        };
        let mut changed_since = None;
        let mut vanished = false;
        for m in modifiers {
            match m {
                FetchModifier::ChangedSince(n) => changed_since = Some(n.get()),
                FetchModifier::Vanished => vanished = true,
            }
        }
        if vanished && (!by_uid || changed_since.is_none() || !self.wording.qresync) {
            return Ok(Done::bad(
                "VANISHED needs UID FETCH, CHANGEDSINCE and QRESYNC enabled",
            ));
        }
        if changed_since.is_some() {
            self.wording.condstore = true;
        }
        if by_uid && !items.iter().any(|i| matches!(i, Item::Uid)) {
            items.insert(0, Item::Uid);
        }
        if self.wording.condstore
            && changed_since.is_some()
            && !items.iter().any(|i| matches!(i, Item::ModSeq))
        {
            items.push(Item::ModSeq);
        }
        let view = self.selected.as_ref().expect("selected");
        if let (true, Some(since)) = (vanished, changed_since) {
            let query = Query::Vanished {
                address: self.address().to_string(),
                mailbox: view.name.clone(),
                since: ModSeq(since),
            };
            if let Ok(QueryResult::Vanished(Some(gone))) = self.read(query).await {
                let view = self.selected.as_ref().expect("selected");
                if let Some(set) = view.vanished_earlier(&gone, Some(set)) {
                    let line = format!("* VANISHED (EARLIER) {set}\r\n");
                    self.out.extend_from_slice(line.as_bytes());
                }
            }
        }
        let view = self.selected.as_ref().expect("selected");
        let chosen: Vec<(usize, Msg)> = indexes
            .into_iter()
            .map(|i| (i, view.messages[i].clone()))
            .filter(|(_, m)| changed_since.is_none_or(|since| m.modseq.0 > since))
            .collect();
        // Reading content marks it \Seen in a writable mailbox: one store for all of them.
        let marks_seen = !view.read_only
            && items.iter().any(|i| {
                matches!(
                    i,
                    Item::Section {
                        sets_seen: true,
                        ..
                    }
                )
            });
        let mut flags_in_response = items.iter().any(|i| matches!(i, Item::Flags));
        if marks_seen {
            let unseen: Vec<Uid> = chosen
                .iter()
                .filter(|(_, m)| !m.flags.contains("\\Seen"))
                .map(|(_, m)| m.uid)
                .collect();
            if !unseen.is_empty() {
                match self
                    .set_flags(&unseen, FlagOp::Add, &["\\Seen".into()], None)
                    .await
                {
                    Ok(_) => flags_in_response = true,
                    Err(done) => return Ok(done),
                }
            }
        }
        if flags_in_response && !items.iter().any(|i| matches!(i, Item::Flags)) {
            items.push(Item::Flags);
        }
        let need = items.iter().map(Item::need).max().unwrap_or(Need::Nothing);
        let mut missing = false;
        for run in runs(&chosen, |(_, m)| m.size) {
            let msgs: Vec<&Msg> = run.iter().map(|(_, m)| m).collect();
            let bodies = match self.contents(&msgs, need).await {
                Ok(b) => b,
                Err(done) => return Ok(done),
            };
            for ((index, _), body) in run.iter().zip(bodies) {
                if need != Need::Nothing && body.is_none() {
                    missing = true;
                    continue;
                }
                let view = self.selected.as_ref().expect("selected");
                // Flags as they are now (this command may have just set \Seen).
                let msg = view.messages[*index].clone();
                let recent = view.is_recent(msg.uid);
                self.render(*index, &msg, recent, &items, body.as_deref());
            }
            if self.out.len() >= FLUSH_BYTES {
                self.flush().await?;
            }
        }
        Ok(if missing {
            Done::no("some messages were expunged meanwhile and could not be fetched")
        } else if by_uid {
            Done::ok("UID FETCH completed")
        } else {
            Done::ok("FETCH completed")
        })
    }

    fn render(
        &mut self,
        index: usize,
        msg: &Msg,
        recent: bool,
        items: &[Item],
        body: Option<&[u8]>,
    ) {
        let body = body.unwrap_or_default();
        let out = &mut self.out;
        out.extend_from_slice(format!("* {} FETCH (", index + 1).as_bytes());
        for (n, item) in items.iter().enumerate() {
            if n > 0 {
                out.push(b' ');
            }
            match item {
                Item::Uid => out.extend_from_slice(format!("UID {}", msg.uid.0).as_bytes()),
                Item::Flags => out.extend_from_slice(
                    format!("FLAGS {}", flag_list(&msg.flags, recent)).as_bytes(),
                ),
                Item::InternalDate => out.extend_from_slice(
                    format!("INTERNALDATE {}", internal_date(msg.internal_date)).as_bytes(),
                ),
                Item::Size => out.extend_from_slice(format!("RFC822.SIZE {}", msg.size).as_bytes()),
                Item::ModSeq => {
                    out.extend_from_slice(format!("MODSEQ ({})", msg.modseq.0).as_bytes())
                }
                Item::Envelope => {
                    out.extend_from_slice(b"ENVELOPE ");
                    out.extend_from_slice(&mime::envelope(body));
                }
                Item::Structure { extensible } => {
                    out.extend_from_slice(if *extensible {
                        b"BODYSTRUCTURE "
                    } else {
                        b"BODY "
                    });
                    out.extend_from_slice(&mime::body_structure(body, *extensible));
                }
                Item::Section {
                    label,
                    part,
                    spec,
                    partial,
                    ..
                } => {
                    let data = mime::section(body, part, spec).unwrap_or_default();
                    out.extend_from_slice(label.as_bytes());
                    match partial {
                        None => {
                            out.push(b' ');
                            write_literal(out, &data);
                        }
                        Some((start, len)) => {
                            let from = (*start as usize).min(data.len());
                            let to = from.saturating_add(*len as usize).min(data.len());
                            out.extend_from_slice(format!("<{start}> ").as_bytes());
                            write_literal(out, &data[from..to]);
                        }
                    }
                }
            }
        }
        out.extend_from_slice(b")\r\n");
    }

    /// Proposes a flag change for `uids` and records it in the view. Answers the stored
    /// (UID, MODSEQ, flags) and the UIDs left alone by UNCHANGEDSINCE.
    async fn set_flags(
        &mut self,
        uids: &[Uid],
        op: FlagOp,
        flags: &[String],
        unchanged_since: Option<ModSeq>,
    ) -> Result<(Vec<(Uid, ModSeq, BTreeSet<String>)>, Vec<Uid>), Done> {
        let view = self.selected.as_ref().expect("selected");
        let cmd = PartitionCommand::StoreFlags {
            address: self.address().to_string(),
            mailbox: view.name.clone(),
            uids: uids.to_vec(),
            op,
            flags: flags.to_vec(),
            unchanged_since,
        };
        match self.write(cmd).await {
            Ok(PartitionResponse::Flags { stored, conflicts }) => {
                if let Some(view) = self.selected.as_mut() {
                    for (uid, modseq, flags) in &stored {
                        view.set_flags(*uid, *modseq, flags.clone());
                    }
                }
                Ok((stored, conflicts))
            }
            Ok(PartitionResponse::Refused(MailError::InvalidFlag)) => {
                Err(Done::bad("invalid flag"))
            }
            Ok(PartitionResponse::Refused(MailError::TooMany)) => {
                Err(Done::no("[LIMIT] too many flags on a message"))
            }
            Ok(PartitionResponse::Refused(e)) => Err(mail_error(&e)),
            Ok(other) => Err(Done::unavailable(format!("{other:?}"))),
            Err(e) => Err(Done::unavailable(e)),
        }
    }

    async fn store(
        &mut self,
        set: &SequenceSet,
        kind: &StoreType,
        silent: bool,
        flags: &[Flag<'_>],
        by_uid: bool,
        modifiers: &[StoreModifier],
    ) -> Done {
        if self.selected.as_ref().is_some_and(|v| v.read_only) {
            return Done::no("[READ-ONLY] mailbox is read-only");
        }
        let indexes = match self.resolve(set, by_uid) {
            Ok(i) => i,
            Err(done) => return done,
        };
        let unchanged_since = modifiers
            .iter()
            .map(|StoreModifier::UnchangedSince(n)| ModSeq(*n))
            .next();
        if unchanged_since.is_some() {
            self.wording.condstore = true;
        }
        // \Recent is the server's to set (RFC 3501 §2.3.2).
        let flags: Vec<String> = flags
            .iter()
            .map(|f| f.to_string())
            .filter(|f| !f.eq_ignore_ascii_case("\\Recent"))
            .collect();
        let view = self.selected.as_ref().expect("selected");
        let uids: Vec<Uid> = indexes.iter().map(|i| view.messages[*i].uid).collect();
        if uids.is_empty() {
            return Done::ok("STORE completed");
        }
        let (stored, conflicts) = match self
            .set_flags(&uids, store_op(kind), &flags, unchanged_since)
            .await
        {
            Ok(r) => r,
            Err(done) => return done,
        };
        let condstore = self.wording.condstore;
        let view = self.selected.as_ref().expect("selected");
        for (uid, modseq, flags) in &stored {
            let Some(i) = view.index_of(*uid) else {
                continue;
            };
            let mut line = format!("* {} FETCH (", i + 1);
            let mut parts = Vec::new();
            if !silent {
                parts.push(format!("FLAGS {}", flag_list(flags, view.is_recent(*uid))));
            }
            if by_uid {
                parts.push(format!("UID {}", uid.0));
            }
            if condstore {
                parts.push(format!("MODSEQ ({})", modseq.0));
            }
            if silent && !condstore {
                continue;
            }
            line.push_str(&parts.join(" "));
            line.push_str(")\r\n");
            self.out.extend_from_slice(line.as_bytes());
        }
        if !conflicts.is_empty() {
            let numbers: Vec<Uid> = if by_uid {
                conflicts
            } else {
                conflicts
                    .iter()
                    .filter_map(|u| view.index_of(*u).map(|i| Uid(i as u32 + 1)))
                    .collect()
            };
            return Done::ok(format!(
                "[MODIFIED {}] conditional STORE failed for some messages",
                uid_set(numbers)
            ));
        }
        Done::ok("STORE completed")
    }

    async fn copy(
        &mut self,
        set: &SequenceSet,
        target: &MailboxArg<'_>,
        by_uid: bool,
        remove_source: bool,
    ) -> Done {
        let command = if remove_source { "MOVE" } else { "COPY" };
        if remove_source && self.selected.as_ref().is_some_and(|v| v.read_only) {
            return Done::no("[READ-ONLY] mailbox is read-only");
        }
        let target = match mailbox_name(target) {
            Ok(n) => n,
            Err(done) => return done,
        };
        let indexes = match self.resolve(set, by_uid) {
            Ok(i) => i,
            Err(done) => return done,
        };
        let view = self.selected.as_ref().expect("selected");
        let uids: Vec<Uid> = indexes.iter().map(|i| view.messages[*i].uid).collect();
        if uids.is_empty() {
            return Done::ok(format!("{command} completed"));
        }
        if !remove_source {
            let size: u64 = indexes.iter().map(|i| view.messages[*i].size).sum();
            match self
                .imap
                .policy
                .domain_fits(domain_of(self.address()), size)
                .await
            {
                Ok(true) => {}
                Ok(false) => return Done::no("[OVERQUOTA] the domain is over its quota"),
                Err(e) => return Done::unavailable(e),
            }
        }
        let view = self.selected.as_ref().expect("selected");
        // Once: a retry through a leader change must not copy twice.
        let cmd = mail::once(PartitionCommand::Copy {
            address: self.address().to_string(),
            from: view.name.clone(),
            to: target,
            uids,
            remove_source,
        });
        let (validity, pairs) = match self.write(cmd).await {
            Ok(PartitionResponse::Copied {
                uid_validity,
                pairs,
            }) => (uid_validity, pairs),
            Ok(PartitionResponse::Refused(MailError::NoSuchMailbox)) => {
                return Done::no("[TRYCREATE] no such mailbox")
            }
            Ok(PartitionResponse::Refused(e)) => return mail_error(&e),
            Ok(other) => return Done::unavailable(format!("{other:?}")),
            Err(e) => return Done::unavailable(e),
        };
        if pairs.is_empty() {
            return Done::ok(format!("{command} completed"));
        }
        let code = format!(
            "COPYUID {} {} {}",
            validity.0,
            uid_set(pairs.iter().map(|p| p.0)),
            uid_set(pairs.iter().map(|p| p.1))
        );
        if remove_source {
            // RFC 6851 §4.3: COPYUID comes untagged, before the expunges.
            self.out
                .extend_from_slice(format!("* OK [{code}] moved\r\n").as_bytes());
            let moved: Vec<Uid> = pairs.iter().map(|p| p.0).collect();
            let wording = self.wording;
            if let Some(view) = self.selected.as_mut() {
                view.remove(&moved, wording, &mut self.out);
            }
            Done::ok(format!("{command} completed"))
        } else {
            Done::ok(format!("[{code}] {command} completed"))
        }
    }
}

/// Message content always goes out as a literal (it may hold any octet but NUL).
fn write_literal(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(format!("{{{}}}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_bounded_in_count_and_bytes_and_keep_every_message_in_order() {
        // Goal: one read never asks for more than MESSAGES_PER_READ messages or (unless one
        // message alone is larger) BYTES_PER_READ bytes, and no message is skipped.
        let sizes: Vec<u64> = (0..200)
            .map(|i| match i {
                70 => BYTES_PER_READ * 3,
                100..=110 => BYTES_PER_READ / 4,
                _ => 4096,
            })
            .collect();
        let runs = runs(&sizes, |s| *s);
        assert_eq!(runs.concat(), sizes);
        for run in &runs {
            assert!(!run.is_empty() && run.len() <= MESSAGES_PER_READ);
            let bytes: u64 = run.iter().sum();
            assert!(bytes <= BYTES_PER_READ || run.len() == 1, "{run:?}");
        }
        assert_eq!(runs[0].len(), MESSAGES_PER_READ);
        assert!(runs.iter().any(|r| r == &[BYTES_PER_READ * 3]));
        assert!(super::runs(&[] as &[u64], |s| *s).is_empty());
    }
}
