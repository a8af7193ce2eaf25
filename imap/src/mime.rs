//! MIME structure analysis and IMAP4rev1 (RFC 3501) rendering: ENVELOPE,
//! BODY / BODYSTRUCTURE, `BODY[section]` extraction and the decoded views
//! needed by SEARCH.
//!
//! # Design
//!
//! * The MIME tree is built by a small single-pass scanner in this module
//!   rather than by `mail_parser::MessageParser::parse`. IMAP needs the exact
//!   raw byte ranges of every header and body (sizes, line counts, section
//!   bytes), and mail-parser stores nested `message/rfc822` parts as a
//!   recursive `Message` tree: its parse loop is iterative, but dropping the
//!   resulting tree recurses once per nesting level and overflows a 256 KiB
//!   stack for 10,000 nested messages. mail-parser is therefore only used for
//!   leaf work that never recurses over the MIME structure: RFC 2047 encoded
//!   words, RFC 5322 dates, base64 / quoted-printable and charset decoding.
//! * Entities (the message, body parts and encapsulated messages) live in a
//!   flat arena of [`Node`]s that hold raw byte ranges, so nothing here is a
//!   recursive owned structure.
//! * Nesting is capped at [`MAX_DEPTH`] entity levels. A `multipart/*` or
//!   `message/rfc822` entity at the deepest level is not descended into: it
//!   is rendered as a leaf `text/plain` part whose body is the raw content.
//!   Every recursion in this module is bounded by that cap. The parser cursor
//!   only moves forward, so parsing takes O(message size × MAX_DEPTH).
//! * Malformed input is accepted as far as possible and never causes a panic.
//!   All slicing is checked.

use std::borrow::Cow;
use std::ops::Range;

use mail_parser::decoders::base64::base64_decode;
use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::decoders::quoted_printable::quoted_printable_decode;
use mail_parser::parsers::MessageStream;
use mail_parser::HeaderValue;
pub use service::message::header_end;

/// Maximum number of entity levels that are rendered (the top-level message
/// is level 1). Composite entities at the last level become leaves.
pub const MAX_DEPTH: usize = 32;

/// Host used for addresses without a domain: an address structure with a
/// NIL host would be read as a group marker by clients.
const MISSING_HOST: &[u8] = b".MISSING-HOST-NAME.";

// ---------------------------------------------------------------------------
// IMAP strings
// ---------------------------------------------------------------------------

/// Writes an IMAP `nstring`: `NIL` for `None`, otherwise like [`write_string`].
pub fn write_nstring(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(value) => write_string(out, value),
        None => out.extend_from_slice(b"NIL"),
    }
}

/// Writes an IMAP `string`: a quoted string (with `\` and `"` escaped) when
/// the value has no CR, LF, NUL or 8-bit byte, otherwise a literal
/// `{N}\r\n<bytes>`.
pub fn write_string(out: &mut Vec<u8>, value: &[u8]) {
    let quotable = value
        .iter()
        .all(|&b| b != 0 && b != b'\r' && b != b'\n' && b < 0x80);
    if quotable {
        out.push(b'"');
        for &b in value {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.push(b'{');
        write_number(out, value.len());
        out.extend_from_slice(b"}\r\n");
        out.extend_from_slice(value);
    }
}

fn write_number(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(n.to_string().as_bytes());
}

// ---------------------------------------------------------------------------
// Raw byte helpers
// ---------------------------------------------------------------------------

/// Checked slicing: an out-of-range request yields an empty slice.
fn bytes(data: &[u8], range: Range<usize>) -> &[u8] {
    data.get(range).unwrap_or_default()
}

/// Offset just past the `\n` that ends the line starting at `pos`, or the end
/// of `data` for an unterminated last line.
fn line_end(data: &[u8], pos: usize) -> usize {
    match data
        .get(pos..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
    {
        Some(i) => pos + i + 1,
        None => data.len(),
    }
}

/// The header/body separator: an empty line, with CRLF or bare LF.
fn is_empty_line(line: &[u8]) -> bool {
    line == b"\n" || line == b"\r\n"
}

fn is_wsp(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&b| !is_wsp(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|&b| !is_wsp(b)).map_or(start, |i| i + 1);
    bytes(v, start..end)
}

/// Unfolds a raw header value (RFC 5322 §2.2.3) and trims it. NUL bytes are
/// dropped as well: they are not allowed in IMAP strings, not even literals.
fn unfold(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for (i, &b) in value.iter().enumerate() {
        let fold = b == b'\n' || (b == b'\r' && value.get(i + 1) == Some(&b'\n'));
        if !fold && b != 0 {
            out.push(b);
        }
    }
    trim(&out).to_vec()
}

/// Number of text lines: line terminators plus an unterminated last line.
fn count_lines(body: &[u8]) -> usize {
    let terminated = body.iter().filter(|&&b| b == b'\n').count();
    match body.last() {
        Some(&b) if b != b'\n' => terminated + 1,
        _ => terminated,
    }
}

fn non_empty(v: Vec<u8>) -> Option<Vec<u8>> {
    (!v.is_empty()).then_some(v)
}

// ---------------------------------------------------------------------------
// Header fields
// ---------------------------------------------------------------------------

/// One header field of a header block.
struct Field<'a> {
    /// Field name as written (without trailing whitespace).
    name: &'a [u8],
    /// Raw value after the colon, folds kept, final line break removed.
    value: &'a [u8],
    /// The complete original field including its line break(s).
    raw: &'a [u8],
}

/// Iterates over the fields of a header block, stopping at the first empty
/// line. Lines that are not `name: value` fields are skipped.
struct Fields<'a> {
    header: &'a [u8],
    pos: usize,
}

fn fields(header: &[u8]) -> Fields<'_> {
    Fields { header, pos: 0 }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Field<'a>;

    fn next(&mut self) -> Option<Field<'a>> {
        loop {
            let start = self.pos;
            let first_end = line_end(self.header, start);
            let first = bytes(self.header, start..first_end);
            if first.is_empty() || is_empty_line(first) {
                self.pos = self.header.len();
                return None;
            }
            let mut end = first_end;
            while matches!(self.header.get(end), Some(b' ' | b'\t')) {
                end = line_end(self.header, end);
            }
            self.pos = end;
            if let Some(field) = split_field(bytes(self.header, start..end)) {
                return Some(field);
            }
        }
    }
}

fn split_field(raw: &[u8]) -> Option<Field<'_>> {
    let first_line = bytes(raw, 0..line_end(raw, 0));
    let colon = first_line.iter().position(|&b| b == b':')?;
    let name = bytes(raw, 0..colon);
    let name = bytes(
        name,
        0..name.iter().rposition(|&b| !is_wsp(b)).map_or(0, |i| i + 1),
    );
    // RFC 5322 field names are printable ASCII without spaces; anything else
    // is junk such as an mbox "From " line and must not match a real name.
    if name.is_empty() || !name.iter().all(|&b| (33..=126).contains(&b)) {
        return None;
    }
    let mut value = bytes(raw, colon + 1..raw.len());
    if let Some(v) = value.strip_suffix(b"\n") {
        value = v.strip_suffix(b"\r").unwrap_or(v);
    }
    Some(Field { name, value, raw })
}

fn find_field<'a>(header: &'a [u8], name: &str) -> Option<Field<'a>> {
    fields(header).find(|f| f.name.eq_ignore_ascii_case(name.as_bytes()))
}

/// Unfolded, trimmed value of the first field called `name`.
fn field_value(header: &[u8], name: &str) -> Option<Vec<u8>> {
    find_field(header, name).map(|f| unfold(f.value))
}

// ---------------------------------------------------------------------------
// Lexical helpers shared by the structured-field parsers
// ---------------------------------------------------------------------------

/// Parses a comment starting at `start` (an opening parenthesis): returns its
/// inner bytes and the offset after it. Nesting and backslash escapes are
/// honoured; an unterminated comment runs to the end of the value.
fn comment(v: &[u8], start: usize) -> (&[u8], usize) {
    let mut depth = 0usize;
    let mut i = start;
    while let Some(&b) = v.get(i) {
        match b {
            b'\\' => i += 1,
            b'(' => depth += 1,
            b')' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return (bytes(v, start + 1..i), i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    (bytes(v, start + 1..v.len()), v.len())
}

/// Parses a quoted string starting at `start` (a double quote): returns the
/// inner bytes (escapes still in place) and the offset after it. An
/// unterminated quoted string runs to the end of the value.
fn quoted(v: &[u8], start: usize) -> (&[u8], usize) {
    let mut i = start + 1;
    while let Some(&b) = v.get(i) {
        match b {
            b'\\' => i += 2,
            b'"' => return (bytes(v, start + 1..i), i + 1),
            _ => i += 1,
        }
    }
    (bytes(v, start + 1..v.len()), v.len())
}

/// Removes quoted-pair backslashes.
fn unescape(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut escaped = false;
    for &b in v {
        if b == b'\\' && !escaped {
            escaped = true;
        } else {
            out.push(b);
            escaped = false;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Content-Type / Content-Disposition (RFC 2045, RFC 2183)
// ---------------------------------------------------------------------------

/// A lexical token of a MIME structured value. Comments and whitespace are
/// dropped; `space` records whether they separated this token from the
/// previous one.
#[derive(Debug)]
enum MimeTok<'a> {
    Atom(&'a [u8]),
    Quoted(Vec<u8>),
    Special(u8),
}

struct MimeToken<'a> {
    tok: MimeTok<'a>,
    space: bool,
}

fn is_mime_delimiter(b: u8) -> bool {
    is_wsp(b) || matches!(b, b'(' | b'"' | b';' | b'/' | b'=')
}

fn mime_tokens(v: &[u8]) -> Vec<MimeToken<'_>> {
    let mut out = Vec::new();
    let mut space = false;
    let mut i = 0;
    while let Some(&b) = v.get(i) {
        let tok = match b {
            _ if is_wsp(b) => {
                space = true;
                i += 1;
                continue;
            }
            b'(' => {
                space = true;
                i = comment(v, i).1;
                continue;
            }
            b'"' => {
                let (inner, next) = quoted(v, i);
                i = next;
                MimeTok::Quoted(unescape(inner))
            }
            b';' | b'/' | b'=' => {
                i += 1;
                MimeTok::Special(b)
            }
            _ => {
                let start = i;
                while v.get(i).is_some_and(|&c| !is_mime_delimiter(c)) {
                    i += 1;
                }
                MimeTok::Atom(bytes(v, start..i))
            }
        };
        out.push(MimeToken { tok, space });
        space = false;
    }
    out
}

type Params = Vec<(Vec<u8>, Vec<u8>)>;

/// A parsed structured MIME value: the tokens before the first parameter and
/// the `name=value` parameters (names upper-cased, values as sent, quoted
/// values unquoted). RFC 2231 parameters are passed through undecoded.
struct MimeValue<'a> {
    head: Vec<MimeToken<'a>>,
    params: Params,
}

fn parse_mime_value(v: &[u8]) -> MimeValue<'_> {
    let mut segments = Vec::new();
    let mut current = Vec::new();
    for t in mime_tokens(v) {
        if matches!(t.tok, MimeTok::Special(b';')) {
            segments.push(std::mem::take(&mut current));
        } else {
            current.push(t);
        }
    }
    segments.push(current);
    let mut segments = segments.into_iter();
    let mut head = segments.next().unwrap_or_default();
    let mut params = Params::new();
    // Leniency for a missing ';' after the head ("text/plain charset=x"): a
    // `name=` pair inside the head segment starts the first parameter.
    if let Some(eq) = head
        .iter()
        .position(|t| matches!(t.tok, MimeTok::Special(b'=')))
    {
        let split = eq.saturating_sub(1);
        if split > 0 {
            let tail = head.split_off(split);
            params.extend(parse_param(&tail));
        }
    }
    params.extend(segments.filter_map(|segment| parse_param(&segment)));
    MimeValue { head, params }
}

fn parse_param(tokens: &[MimeToken<'_>]) -> Option<(Vec<u8>, Vec<u8>)> {
    let eq = tokens
        .iter()
        .position(|t| matches!(t.tok, MimeTok::Special(b'=')))?;
    let name = join_mime_tokens(tokens.get(..eq)?);
    if name.is_empty() {
        return None;
    }
    let value = join_mime_tokens(tokens.get(eq + 1..).unwrap_or_default());
    Some((name.to_ascii_uppercase(), value))
}

/// Re-joins tokens, keeping a single space where the original had
/// whitespace, so that sloppy unquoted values ("name=my file.pdf") survive.
fn join_mime_tokens(tokens: &[MimeToken<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        if t.space && !out.is_empty() {
            out.push(b' ');
        }
        match &t.tok {
            MimeTok::Atom(a) => out.extend_from_slice(a),
            MimeTok::Quoted(q) => out.extend_from_slice(q),
            MimeTok::Special(c) => out.push(*c),
        }
    }
    out
}

/// The media type of an entity: type and subtype upper-cased.
#[derive(Clone, Debug)]
struct Media {
    main: Vec<u8>,
    sub: Vec<u8>,
    params: Params,
}

/// The implicit media type of an entity without a (valid) Content-Type.
#[derive(Clone, Copy, PartialEq)]
enum DefaultMedia {
    /// RFC 2045: `text/plain; charset=us-ascii`.
    Text,
    /// RFC 2046 §5.1.5: parts of a `multipart/digest` are `message/rfc822`.
    Message,
}

impl Media {
    fn text_plain() -> Media {
        Media {
            main: b"TEXT".to_vec(),
            sub: b"PLAIN".to_vec(),
            params: vec![(b"CHARSET".to_vec(), b"us-ascii".to_vec())],
        }
    }

    fn default_for(default: DefaultMedia) -> Media {
        match default {
            DefaultMedia::Text => Media::text_plain(),
            DefaultMedia::Message => Media {
                main: b"MESSAGE".to_vec(),
                sub: b"RFC822".to_vec(),
                params: Params::new(),
            },
        }
    }

    fn from_header(header: &[u8], default: DefaultMedia) -> Media {
        let Some(value) = field_value(header, "content-type") else {
            return Media::default_for(default);
        };
        let parsed = parse_mime_value(&value);
        match parsed.head.as_slice() {
            [MimeToken {
                tok: MimeTok::Atom(main),
                ..
            }, MimeToken {
                tok: MimeTok::Special(b'/'),
                ..
            }, MimeToken {
                tok: MimeTok::Atom(sub),
                ..
            }, ..] => Media {
                main: main.to_ascii_uppercase(),
                sub: sub.to_ascii_uppercase(),
                params: parsed.params,
            },
            // RFC 2045 §5.2: an unparsable Content-Type means the default.
            _ => Media::default_for(default),
        }
    }

    fn is_multipart(&self) -> bool {
        self.main == b"MULTIPART"
    }

    fn is_message_rfc822(&self) -> bool {
        self.main == b"MESSAGE" && self.sub == b"RFC822"
    }

    fn is_text(&self) -> bool {
        self.main == b"TEXT"
    }

    fn param(&self, name: &str) -> Option<&[u8]> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.as_slice())
    }
}

/// Content-Transfer-Encoding, upper-cased, `7BIT` when absent.
fn transfer_encoding(header: &[u8]) -> Vec<u8> {
    field_value(header, "content-transfer-encoding")
        .and_then(|v| {
            mime_tokens(&v).into_iter().find_map(|t| match t.tok {
                MimeTok::Atom(a) => Some(a.to_ascii_uppercase()),
                _ => None,
            })
        })
        .unwrap_or_else(|| b"7BIT".to_vec())
}

/// Only identity encodings allow looking inside a `message/rfc822` body.
fn is_identity_encoding(encoding: &[u8]) -> bool {
    matches!(encoding, b"7BIT" | b"8BIT" | b"BINARY")
}

// ---------------------------------------------------------------------------
// MIME tree
// ---------------------------------------------------------------------------

#[derive(Debug)]
enum Kind {
    Leaf,
    /// Child node indices, at least one.
    Multipart(Vec<usize>),
    /// Node index of the encapsulated message.
    Message(usize),
}

/// One MIME entity with its raw byte ranges in the message.
#[derive(Debug)]
struct Node {
    /// The entity header including the empty line that ends it.
    header: Range<usize>,
    /// The body octets, excluding the line break that belongs to the
    /// following boundary delimiter.
    body: Range<usize>,
    /// Effective media type (defaults applied; composite entities that are
    /// not descended into are `text/plain`).
    media: Media,
    kind: Kind,
}

/// The parsed MIME structure of a message; node 0 is the message itself.
struct Tree<'a> {
    data: &'a [u8],
    nodes: Vec<Node>,
}

/// Single-pass MIME scanner. The cursor only moves forward, every line is
/// examined once by the innermost open entity, and at each line start only
/// the (at most MAX_DEPTH) active boundaries are compared.
struct Parser<'a> {
    data: &'a [u8],
    pos: usize,
    /// `--boundary` of each open multipart, outermost first.
    delimiters: Vec<Vec<u8>>,
    nodes: Vec<Node>,
}

impl<'a> Parser<'a> {
    fn new(data: &'a [u8]) -> Parser<'a> {
        Parser {
            data,
            pos: 0,
            delimiters: Vec::new(),
            nodes: Vec::new(),
        }
    }

    /// If a boundary delimiter line starts at `pos`, returns the index of its
    /// multipart in `delimiters` and whether it is a close delimiter. The
    /// innermost multipart wins (RFC 2046 only requires a prefix match, so a
    /// nested boundary may extend an outer one).
    fn delimiter_at(&self, pos: usize) -> Option<(usize, bool)> {
        let rest = self.data.get(pos..)?;
        if !rest.starts_with(b"--") {
            return None;
        }
        let (index, delimiter) = self
            .delimiters
            .iter()
            .enumerate()
            .rev()
            .find(|(_, d)| rest.starts_with(d))?;
        let close = rest
            .get(delimiter.len()..)
            .is_some_and(|r| r.starts_with(b"--"));
        Some((index, close))
    }

    /// Advances to the next delimiter line of any open multipart (leaving the
    /// cursor on it) or to the end of the data.
    fn skip_to_delimiter(&mut self) -> Option<(usize, bool)> {
        if self.delimiters.is_empty() {
            self.pos = self.data.len();
            return None;
        }
        while self.pos < self.data.len() {
            if let Some(hit) = self.delimiter_at(self.pos) {
                return Some(hit);
            }
            self.pos = line_end(self.data, self.pos);
        }
        None
    }

    /// Advances past the header: through the first empty line, or up to a
    /// delimiter line or the end of the data when the header is unterminated.
    fn skip_header(&mut self) {
        while self.pos < self.data.len() && self.delimiter_at(self.pos).is_none() {
            let end = line_end(self.data, self.pos);
            let line = bytes(self.data, self.pos..end);
            self.pos = end;
            if is_empty_line(line) {
                return;
            }
        }
    }

    /// End of the body of an entity whose content stops at the cursor: the
    /// line break before a delimiter belongs to the delimiter (RFC 2046).
    fn entity_end(&self, body_start: usize) -> usize {
        if self.pos >= self.data.len() {
            return self.data.len().max(body_start);
        }
        let mut end = self.pos;
        if end > body_start && self.data.get(end - 1) == Some(&b'\n') {
            end -= 1;
            if end > body_start && self.data.get(end - 1) == Some(&b'\r') {
                end -= 1;
            }
        }
        end.max(body_start)
    }

    /// Parses the entity starting at the cursor; `depth` is 0 for the
    /// message. Returns its node index.
    fn parse_entity(&mut self, depth: usize, default: DefaultMedia) -> usize {
        let header_start = self.pos;
        self.skip_header();
        let body_start = self.pos;
        let header = bytes(self.data, header_start..body_start);
        let mut media = Media::from_header(header, default);
        let encoding = transfer_encoding(header);

        let index = self.nodes.len();
        self.nodes.push(Node {
            header: header_start..body_start,
            body: body_start..body_start,
            media: Media::text_plain(),
            kind: Kind::Leaf,
        });

        let may_nest = depth + 1 < MAX_DEPTH;
        let boundary = media.param("boundary").map(<[u8]>::to_vec);
        let kind = match boundary {
            Some(boundary) if media.is_multipart() && may_nest && !boundary.is_empty() => {
                let digest = media.sub == b"DIGEST";
                Kind::Multipart(self.parse_multipart(depth, &boundary, digest, body_start))
            }
            _ if media.is_message_rfc822() && may_nest && is_identity_encoding(&encoding) => {
                Kind::Message(self.parse_entity(depth + 1, DefaultMedia::Text))
            }
            _ => {
                // A composite type we do not descend into (depth cap, no
                // boundary, encoded message) must not be rendered with its
                // declared type: clients would expect sub-structure.
                if media.is_multipart() || media.is_message_rfc822() {
                    media = Media::text_plain();
                }
                self.skip_to_delimiter();
                Kind::Leaf
            }
        };

        let body_end = self.entity_end(body_start);
        if let Some(node) = self.nodes.get_mut(index) {
            node.body = body_start..body_end;
            node.media = media;
            node.kind = kind;
        }
        index
    }

    /// Parses the body parts of a multipart whose body starts at the cursor.
    fn parse_multipart(
        &mut self,
        depth: usize,
        boundary: &[u8],
        digest: bool,
        body_start: usize,
    ) -> Vec<usize> {
        let mut delimiter = b"--".to_vec();
        delimiter.extend_from_slice(boundary);
        self.delimiters.push(delimiter);
        let own = self.delimiters.len() - 1;
        let child_default = if digest {
            DefaultMedia::Message
        } else {
            DefaultMedia::Text
        };

        let mut children = Vec::new();
        let mut closed = false;
        while let Some((which, close)) = self.skip_to_delimiter() {
            if which != own {
                // An enclosing boundary: this multipart is unterminated.
                break;
            }
            self.pos = line_end(self.data, self.pos);
            if close {
                closed = true;
                break;
            }
            children.push(self.parse_entity(depth + 1, child_default));
        }
        self.delimiters.truncate(own);
        if closed {
            // Epilogue: ignored, but it is part of this entity's body.
            self.skip_to_delimiter();
        }
        if children.is_empty() {
            // The IMAP grammar requires at least one part; render an empty
            // text/plain part, like a multipart without any delimiter.
            let at = self.entity_end(body_start);
            children.push(self.nodes.len());
            self.nodes.push(Node {
                header: at..at,
                body: at..at,
                media: Media::text_plain(),
                kind: Kind::Leaf,
            });
        }
        children
    }
}

impl<'a> Tree<'a> {
    fn parse(data: &'a [u8]) -> Tree<'a> {
        let mut parser = Parser::new(data);
        parser.parse_entity(0, DefaultMedia::Text);
        Tree {
            data,
            nodes: parser.nodes,
        }
    }

    fn node(&self, index: usize) -> Option<&Node> {
        self.nodes.get(index)
    }

    fn header(&self, node: &Node) -> &'a [u8] {
        bytes(self.data, node.header.clone())
    }

    fn body(&self, node: &Node) -> &'a [u8] {
        bytes(self.data, node.body.clone())
    }

    /// Resolves an IMAP part number path (RFC 3501 §6.4.5) to a node.
    ///
    /// Numbers index the parts of a multipart; for a message (the top-level
    /// one or one encapsulated in a message/rfc822 part) they index the parts
    /// of its body, and a non-multipart message has the single part 1: the
    /// message entity itself, in its role as its own body.
    fn resolve(&self, path: &[u32]) -> Option<usize> {
        let mut current: Option<usize> = None;
        for &number in path {
            let k = usize::try_from(number).ok()?.checked_sub(1)?;
            let (container, is_message) = match current {
                None => (0, true),
                Some(index) => match &self.node(index)?.kind {
                    Kind::Message(child) => (*child, true),
                    Kind::Multipart(_) => (index, false),
                    Kind::Leaf => return None,
                },
            };
            current = Some(match &self.node(container)?.kind {
                Kind::Multipart(children) => *children.get(k)?,
                _ if is_message && k == 0 => container,
                _ => return None,
            });
        }
        current
    }

    // -- BODY / BODYSTRUCTURE ----------------------------------------------

    fn write_body(&self, out: &mut Vec<u8>, index: usize, extensible: bool) {
        let Some(node) = self.node(index) else {
            // Unreachable by construction; keeps the output well-formed.
            out.extend_from_slice(b"(\"TEXT\" \"PLAIN\" NIL NIL NIL \"7BIT\" 0 0)");
            return;
        };
        match &node.kind {
            Kind::Multipart(children) => self.write_multipart(out, node, children, extensible),
            _ => self.write_single(out, node, extensible),
        }
    }

    fn write_multipart(&self, out: &mut Vec<u8>, node: &Node, children: &[usize], ext: bool) {
        out.push(b'(');
        for &child in children {
            self.write_body(out, child, ext);
        }
        out.push(b' ');
        write_string(out, &node.media.sub);
        if ext {
            out.push(b' ');
            write_params(out, &node.media.params);
            out.push(b' ');
            write_extension_tail(out, self.header(node));
        }
        out.push(b')');
    }

    fn write_single(&self, out: &mut Vec<u8>, node: &Node, ext: bool) {
        let header = self.header(node);
        let body = self.body(node);
        out.push(b'(');
        write_string(out, &node.media.main);
        out.push(b' ');
        write_string(out, &node.media.sub);
        out.push(b' ');
        write_params(out, &node.media.params);
        out.push(b' ');
        write_nstring(out, field_value(header, "content-id").as_deref());
        out.push(b' ');
        write_nstring(out, field_value(header, "content-description").as_deref());
        out.push(b' ');
        write_string(out, &transfer_encoding(header));
        out.push(b' ');
        write_number(out, body.len());
        if let Kind::Message(child) = node.kind {
            out.push(b' ');
            let child_header = self.node(child).map_or(&b""[..], |c| self.header(c));
            write_envelope(out, child_header);
            out.push(b' ');
            self.write_body(out, child, ext);
            out.push(b' ');
            write_number(out, count_lines(body));
        } else if node.media.is_text() {
            out.push(b' ');
            write_number(out, count_lines(body));
        }
        if ext {
            // body-fld-md5 is always NIL: Content-MD5 is not reported.
            out.extend_from_slice(b" NIL ");
            write_extension_tail(out, header);
        }
        out.push(b')');
    }

    // -- BODY[section] -----------------------------------------------------

    /// Sections that address a whole message (top level or encapsulated).
    fn message_section(&self, index: usize, spec: &SectionSpec) -> Option<Vec<u8>> {
        let node = self.node(index)?;
        let header = self.header(node);
        Some(match spec {
            SectionSpec::Full => bytes(self.data, node.header.start..node.body.end).to_vec(),
            SectionSpec::Header => header.to_vec(),
            SectionSpec::Text => self.body(node).to_vec(),
            SectionSpec::HeaderFields(names) => select_fields(header, names, true),
            SectionSpec::HeaderFieldsNot(names) => select_fields(header, names, false),
            SectionSpec::Mime => return None,
        })
    }
}

fn write_params(out: &mut Vec<u8>, params: &Params) {
    if params.is_empty() {
        out.extend_from_slice(b"NIL");
        return;
    }
    out.push(b'(');
    for (i, (name, value)) in params.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        write_string(out, name);
        out.push(b' ');
        write_string(out, value);
    }
    out.push(b')');
}

/// Writes `disposition SP language SP location`, the extension data shared
/// by single and multipart bodies.
fn write_extension_tail(out: &mut Vec<u8>, header: &[u8]) {
    write_disposition(out, header);
    out.push(b' ');
    write_language(out, header);
    out.push(b' ');
    write_nstring(out, field_value(header, "content-location").as_deref());
}

fn write_disposition(out: &mut Vec<u8>, header: &[u8]) {
    let value = field_value(header, "content-disposition").unwrap_or_default();
    let parsed = parse_mime_value(&value);
    match parsed.head.first() {
        Some(MimeToken {
            tok: MimeTok::Atom(kind),
            ..
        }) => {
            out.push(b'(');
            write_string(out, &kind.to_ascii_uppercase());
            out.push(b' ');
            write_params(out, &parsed.params);
            out.push(b')');
        }
        _ => out.extend_from_slice(b"NIL"),
    }
}

/// Content-Language (RFC 3282): a list of tags, always rendered as a
/// parenthesized list, NIL when absent or empty.
fn write_language(out: &mut Vec<u8>, header: &[u8]) {
    let value = field_value(header, "content-language").unwrap_or_default();
    let mut tags = Vec::new();
    let mut i = 0;
    while let Some(&b) = value.get(i) {
        if b == b'(' {
            i = comment(&value, i).1;
        } else if is_wsp(b) || b == b',' {
            i += 1;
        } else {
            let start = i;
            while value
                .get(i)
                .is_some_and(|&c| !is_wsp(c) && c != b',' && c != b'(')
            {
                i += 1;
            }
            tags.push(bytes(&value, start..i));
        }
    }
    if tags.is_empty() {
        out.extend_from_slice(b"NIL");
        return;
    }
    out.push(b'(');
    for (i, tag) in tags.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        write_string(out, tag);
    }
    out.push(b')');
}

/// The original lines of the fields whose names are (`include`) or are not
/// in `names`, followed by the terminating empty line.
fn select_fields(header: &[u8], names: &[String], include: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for field in fields(header) {
        let listed = names
            .iter()
            .any(|n| n.as_bytes().eq_ignore_ascii_case(field.name));
        if listed == include {
            out.extend_from_slice(field.raw);
            if !field.raw.ends_with(b"\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

// ---------------------------------------------------------------------------
// Addresses (RFC 5322 §3.4, with obsolete and broken forms tolerated)
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum AddrTok<'a> {
    Word(&'a [u8]),
    /// Inner bytes of a quoted string, escapes still in place.
    Quoted(&'a [u8]),
    /// Inner bytes of a comment.
    Comment(&'a [u8]),
    /// A domain literal including its brackets.
    Literal(&'a [u8]),
    Special(u8),
}

#[derive(Clone, Copy, Debug)]
struct AddrToken<'a> {
    tok: AddrTok<'a>,
    /// Whitespace or a comment precedes this token.
    space: bool,
}

fn is_addr_delimiter(b: u8) -> bool {
    is_wsp(b)
        || matches!(
            b,
            b'(' | b'"' | b'[' | b'<' | b'>' | b'@' | b',' | b';' | b':'
        )
}

fn address_tokens(v: &[u8]) -> Vec<AddrToken<'_>> {
    let mut out = Vec::new();
    let mut space = false;
    let mut i = 0;
    while let Some(&b) = v.get(i) {
        let tok = match b {
            _ if is_wsp(b) => {
                space = true;
                i += 1;
                continue;
            }
            b'(' => {
                let (inner, next) = comment(v, i);
                i = next;
                AddrTok::Comment(inner)
            }
            b'"' => {
                let (inner, next) = quoted(v, i);
                i = next;
                AddrTok::Quoted(inner)
            }
            b'[' => {
                let start = i;
                i = v
                    .get(i..)
                    .and_then(|rest| rest.iter().position(|&c| c == b']'))
                    .map_or(v.len(), |p| i + p + 1);
                AddrTok::Literal(bytes(v, start..i))
            }
            b'<' | b'>' | b'@' | b',' | b';' | b':' => {
                i += 1;
                AddrTok::Special(b)
            }
            _ => {
                let start = i;
                while v.get(i).is_some_and(|&c| !is_addr_delimiter(c)) {
                    i += 1;
                }
                AddrTok::Word(bytes(v, start..i))
            }
        };
        let is_comment = matches!(tok, AddrTok::Comment(_));
        out.push(AddrToken { tok, space });
        // A comment separates the tokens around it like whitespace does.
        space = is_comment;
    }
    out
}

/// One element of an IMAP address list.
#[derive(Debug, PartialEq)]
enum Addr {
    Mailbox {
        name: Option<Vec<u8>>,
        adl: Option<Vec<u8>>,
        mailbox: Vec<u8>,
        host: Vec<u8>,
    },
    GroupStart(Vec<u8>),
    GroupEnd,
}

/// Parses an unfolded address-list header value.
fn parse_address_list(value: &[u8]) -> Vec<Addr> {
    let mut out = Vec::new();
    let mut current: Vec<AddrToken<'_>> = Vec::new();
    let mut in_angle = false;
    let mut in_group = false;
    for token in address_tokens(value) {
        match token.tok {
            AddrTok::Special(b'<') if !in_angle => {
                in_angle = true;
                current.push(token);
            }
            AddrTok::Special(b'>') if in_angle => {
                in_angle = false;
                current.push(token);
            }
            AddrTok::Special(b',') if !in_angle => {
                out.extend(make_mailbox(&current));
                current.clear();
            }
            AddrTok::Special(b':') if !in_angle && !in_group => {
                out.push(Addr::GroupStart(phrase_text(&current)));
                current.clear();
                in_group = true;
            }
            AddrTok::Special(b';') if !in_angle => {
                out.extend(make_mailbox(&current));
                current.clear();
                if in_group {
                    out.push(Addr::GroupEnd);
                    in_group = false;
                }
            }
            _ => current.push(token),
        }
    }
    out.extend(make_mailbox(&current));
    if in_group {
        out.push(Addr::GroupEnd);
    }
    out
}

fn is_special(token: &AddrToken<'_>, c: u8) -> bool {
    matches!(token.tok, AddrTok::Special(s) if s == c)
}

/// Builds a mailbox from the tokens between two separators.
fn make_mailbox(tokens: &[AddrToken<'_>]) -> Option<Addr> {
    // Old style "user@host (Full Name)": the comment is the only name.
    let comment_name = || {
        tokens.iter().find_map(|t| match t.tok {
            AddrTok::Comment(c) => non_empty(trim(c).to_vec()),
            _ => None,
        })
    };
    let (name, adl, spec) = match tokens.iter().position(|t| is_special(t, b'<')) {
        Some(lt) => {
            let phrase = tokens.get(..lt).unwrap_or_default();
            let rest = tokens.get(lt + 1..).unwrap_or_default();
            let gt = rest
                .iter()
                .position(|t| is_special(t, b'>'))
                .unwrap_or(rest.len());
            let (adl, spec) = split_route(rest.get(..gt).unwrap_or_default());
            let name = non_empty(phrase_text(phrase)).or_else(comment_name);
            (name, adl, spec)
        }
        None => (comment_name(), None, tokens),
    };
    let (mailbox, host) = split_addr_spec(spec);
    if mailbox.is_empty() && host.is_none() && adl.is_none() {
        return None;
    }
    Some(Addr::Mailbox {
        name,
        adl,
        mailbox,
        host: host.unwrap_or_else(|| MISSING_HOST.to_vec()),
    })
}

/// Splits an obsolete source route ("@a,@b:") off an angle-addr.
fn split_route<'t, 'a>(inner: &'t [AddrToken<'a>]) -> (Option<Vec<u8>>, &'t [AddrToken<'a>]) {
    let starts_with_at = inner
        .iter()
        .find(|t| !matches!(t.tok, AddrTok::Comment(_)))
        .is_some_and(|t| is_special(t, b'@'));
    if starts_with_at {
        if let Some(colon) = inner.iter().position(|t| is_special(t, b':')) {
            let route = non_empty(compact_text(inner.get(..colon).unwrap_or_default()));
            return (route, inner.get(colon + 1..).unwrap_or_default());
        }
    }
    (None, inner)
}

/// Splits an addr-spec at its last `@` into local part and domain.
fn split_addr_spec(tokens: &[AddrToken<'_>]) -> (Vec<u8>, Option<Vec<u8>>) {
    match tokens.iter().rposition(|t| is_special(t, b'@')) {
        Some(at) => (
            compact_text(tokens.get(..at).unwrap_or_default()),
            non_empty(compact_text(tokens.get(at + 1..).unwrap_or_default())),
        ),
        // No domain at all (e.g. "To: John"): keep the words readable.
        None => (phrase_text(tokens), None),
    }
}

/// Display text of a phrase: words as written (encoded words untouched),
/// quoted strings without their quotes, comments dropped, one space where the
/// original had whitespace.
fn phrase_text(tokens: &[AddrToken<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        let piece: Cow<'_, [u8]> = match t.tok {
            AddrTok::Comment(_) => continue,
            AddrTok::Word(w) | AddrTok::Literal(w) => Cow::Borrowed(w),
            AddrTok::Quoted(q) => Cow::Owned(unescape(q)),
            AddrTok::Special(c) => Cow::Owned(vec![c]),
        };
        if t.space && !out.is_empty() {
            out.push(b' ');
        }
        out.extend_from_slice(&piece);
    }
    out
}

/// Text of an addr-spec component: CFWS removed, quoted strings kept quoted
/// so that `mailbox@host` stays a valid address.
fn compact_text(tokens: &[AddrToken<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        match t.tok {
            AddrTok::Comment(_) => {}
            AddrTok::Word(w) | AddrTok::Literal(w) => out.extend_from_slice(w),
            AddrTok::Quoted(q) => {
                out.push(b'"');
                out.extend_from_slice(q);
                out.push(b'"');
            }
            AddrTok::Special(c) => out.push(c),
        }
    }
    out
}

fn header_addresses(header: &[u8], name: &str) -> Vec<Addr> {
    field_value(header, name)
        .map(|v| parse_address_list(&v))
        .unwrap_or_default()
}

fn write_address_list(out: &mut Vec<u8>, list: &[Addr]) {
    if list.is_empty() {
        out.extend_from_slice(b"NIL");
        return;
    }
    out.push(b'(');
    for addr in list {
        match addr {
            Addr::Mailbox {
                name,
                adl,
                mailbox,
                host,
            } => {
                out.push(b'(');
                write_nstring(out, name.as_deref());
                out.push(b' ');
                write_nstring(out, adl.as_deref());
                out.push(b' ');
                write_string(out, mailbox);
                out.push(b' ');
                write_string(out, host);
                out.push(b')');
            }
            Addr::GroupStart(name) => {
                out.extend_from_slice(b"(NIL NIL ");
                write_string(out, name);
                out.extend_from_slice(b" NIL)");
            }
            Addr::GroupEnd => out.extend_from_slice(b"(NIL NIL NIL NIL)"),
        }
    }
    out.push(b')');
}

fn write_envelope(out: &mut Vec<u8>, header: &[u8]) {
    out.push(b'(');
    write_nstring(out, field_value(header, "date").as_deref());
    out.push(b' ');
    write_nstring(out, field_value(header, "subject").as_deref());
    out.push(b' ');
    let from = header_addresses(header, "from");
    write_address_list(out, &from);
    // RFC 3501: absent or empty Sender / Reply-To default to From.
    for name in ["sender", "reply-to"] {
        let list = header_addresses(header, name);
        out.push(b' ');
        write_address_list(out, if list.is_empty() { &from } else { &list });
    }
    for name in ["to", "cc", "bcc"] {
        out.push(b' ');
        write_address_list(out, &header_addresses(header, name));
    }
    out.push(b' ');
    write_nstring(out, field_value(header, "in-reply-to").as_deref());
    out.push(b' ');
    write_nstring(out, field_value(header, "message-id").as_deref());
    out.push(b')');
}

fn message_header(raw: &[u8]) -> &[u8] {
    let mut parser = Parser::new(raw);
    parser.skip_header();
    bytes(raw, 0..parser.pos)
}

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

/// RFC 3501 ENVELOPE of a message:
/// `(date subject from sender reply-to to cc bcc in-reply-to message-id)`.
///
/// Values are the raw, unfolded header values (encoded words are passed
/// through undecoded); the first occurrence of each field is used. Sender and
/// Reply-To default to From when absent or empty. NUL bytes are dropped.
pub fn envelope(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_envelope(&mut out, message_header(raw));
    out
}

/// RFC 3501 BODYSTRUCTURE (`extensible = true`) or BODY (`false`) of a
/// message, without the leading keyword.
///
/// Type, subtype, parameter names, disposition type and transfer encoding are
/// upper-cased; parameter values are sent as written. Body-fld-md5 is always
/// NIL; Content-Language is rendered as a list. Composite parts at the
/// nesting cap, multiparts without a boundary and encoded message/rfc822 parts
/// are rendered as `text/plain` leaves; a multipart without any part gets one
/// empty `text/plain` part.
pub fn body_structure(raw: &[u8], extensible: bool) -> Vec<u8> {
    let tree = Tree::parse(raw);
    let mut out = Vec::new();
    tree.write_body(&mut out, 0, extensible);
    out
}

/// What a `BODY[section]` names after the part number path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SectionSpec {
    /// No section text: the whole message, or the body of a part.
    Full,
    /// `HEADER`
    Header,
    /// `HEADER.FIELDS (...)`
    HeaderFields(Vec<String>),
    /// `HEADER.FIELDS.NOT (...)`
    HeaderFieldsNot(Vec<String>),
    /// `TEXT`
    Text,
    /// `MIME` (only with a part number)
    Mime,
}

/// The bytes of `BODY[part.spec]` (RFC 3501 §6.4.5); `part` is the MIME part
/// number path, empty for the message itself.
///
/// `HEADER`, `TEXT` and `HEADER.FIELDS[.NOT]` with a part number require the
/// part to be message/rfc822 and refer to the encapsulated message.
/// `HEADER.FIELDS` output keeps the original field lines (folding included)
/// and ends with an empty line. Returns `None` for a part that does not exist
/// or a spec that is not valid for it.
pub fn section(raw: &[u8], part: &[u32], spec: &SectionSpec) -> Option<Vec<u8>> {
    let tree = Tree::parse(raw);
    if part.is_empty() {
        return tree.message_section(0, spec);
    }
    let index = tree.resolve(part)?;
    let node = tree.node(index)?;
    match spec {
        SectionSpec::Full => Some(tree.body(node).to_vec()),
        SectionSpec::Mime => Some(tree.header(node).to_vec()),
        _ => match node.kind {
            Kind::Message(child) => tree.message_section(child, spec),
            _ => None,
        },
    }
}

/// Decoded values (RFC 2047 encoded words decoded to UTF-8, unfolded) of
/// every top-level header field called `name` (case-insensitive), in order.
pub fn header_values(raw: &[u8], name: &str) -> Vec<String> {
    fields(message_header(raw))
        .filter(|f| f.name.eq_ignore_ascii_case(name.as_bytes()))
        .map(|f| decode_unstructured(f.value))
        .collect()
}

fn decode_unstructured(value: &[u8]) -> String {
    // mail-parser's field parsers read up to the line break that ends the
    // field, so the value must be terminated.
    let mut line = Vec::with_capacity(value.len() + 1);
    line.extend_from_slice(value);
    line.push(b'\n');
    match MessageStream::new(&line).parse_unstructured() {
        HeaderValue::Text(text) => text.into_owned(),
        _ => String::new(),
    }
}

/// Decoded text of all `text/*` leaf parts (including those inside attached
/// messages), transfer encoding undone and charset converted to UTF-8 where
/// mail-parser knows the charset (lossy UTF-8 otherwise), joined with `\n`.
pub fn body_text(raw: &[u8]) -> String {
    let tree = Tree::parse(raw);
    let mut out = String::new();
    for node in &tree.nodes {
        if !matches!(node.kind, Kind::Leaf) || !node.media.is_text() {
            continue;
        }
        let text = decode_text(tree.header(node), tree.body(node), &node.media);
        if text.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&text);
    }
    out
}

fn decode_text(header: &[u8], body: &[u8], media: &Media) -> String {
    let decoded: Cow<'_, [u8]> = match transfer_encoding(header).as_slice() {
        b"BASE64" => {
            // Drop everything outside the base64 alphabet first: mail-parser
            // rejects the whole body on a single stray character.
            let clean: Vec<u8> = body
                .iter()
                .copied()
                .filter(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
                .collect();
            base64_decode(&clean).map_or(Cow::Borrowed(body), Cow::Owned)
        }
        b"QUOTED-PRINTABLE" => {
            quoted_printable_decode(body).map_or(Cow::Borrowed(body), Cow::Owned)
        }
        _ => Cow::Borrowed(body),
    };
    match media.param("charset").and_then(charset_decoder) {
        Some(decode) => decode(&decoded),
        None => String::from_utf8_lossy(&decoded).into_owned(),
    }
}

/// The Date header as `(year, month, day)` in the header's own time zone, if
/// it parses as an RFC 5322 date.
pub fn sent_date(raw: &[u8]) -> Option<(i32, u32, u32)> {
    let field = find_field(message_header(raw), "date")?;
    let mut line = field.value.to_vec();
    line.push(b'\n');
    match MessageStream::new(&line).parse_date() {
        HeaderValue::DateTime(dt) if (1..=12).contains(&dt.month) && (1..=31).contains(&dt.day) => {
            Some((i32::from(dt.year), u32::from(dt.month), u32::from(dt.day)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    // -- a small IMAP response parser used to prove outputs are well-formed --

    #[derive(Debug, Clone, PartialEq)]
    enum V {
        Nil,
        Str(Vec<u8>),
        Num(u64),
        List(Vec<V>),
    }

    fn parse_imap(input: &[u8]) -> Result<V, String> {
        let mut pos = 0;
        let value = parse_value(input, &mut pos)?;
        if pos != input.len() {
            return Err(format!("trailing bytes at {pos}"));
        }
        Ok(value)
    }

    fn parse_value(s: &[u8], pos: &mut usize) -> Result<V, String> {
        match s.get(*pos) {
            Some(b'(') => {
                *pos += 1;
                let mut items: Vec<V> = Vec::new();
                loop {
                    match s.get(*pos) {
                        Some(b')') => {
                            *pos += 1;
                            return Ok(V::List(items));
                        }
                        None => return Err("unterminated list".into()),
                        Some(b' ') if !items.is_empty() => *pos += 1,
                        // Bodies of a multipart are concatenated without SP.
                        Some(b'(') if matches!(items.last(), None | Some(V::List(_))) => {}
                        Some(_) if items.is_empty() => {}
                        Some(&c) => {
                            return Err(format!("expected SP, got {:?} at {pos}", c as char))
                        }
                    }
                    items.push(parse_value(s, pos)?);
                }
            }
            Some(b'"') => {
                *pos += 1;
                let mut out = Vec::new();
                loop {
                    match s.get(*pos) {
                        Some(b'"') => {
                            *pos += 1;
                            return Ok(V::Str(out));
                        }
                        Some(b'\\') => match s.get(*pos + 1) {
                            Some(&c @ (b'"' | b'\\')) => {
                                out.push(c);
                                *pos += 2;
                            }
                            _ => return Err("bad escape".into()),
                        },
                        Some(&c) if c == 0 || c == b'\r' || c == b'\n' || c >= 0x80 => {
                            return Err(format!("bad quoted char {c}"));
                        }
                        Some(&c) => {
                            out.push(c);
                            *pos += 1;
                        }
                        None => return Err("unterminated quoted".into()),
                    }
                }
            }
            Some(b'{') => {
                let close = s[*pos..].iter().position(|&c| c == b'}').ok_or("no }")? + *pos;
                let n: usize = std::str::from_utf8(&s[*pos + 1..close])
                    .map_err(|e| e.to_string())?
                    .parse()
                    .map_err(|e: std::num::ParseIntError| e.to_string())?;
                if s.get(close + 1..close + 3) != Some(b"\r\n") {
                    return Err("literal without CRLF".into());
                }
                let data = s.get(close + 3..close + 3 + n).ok_or("short literal")?;
                if data.contains(&0) {
                    return Err("NUL in literal".into());
                }
                *pos = close + 3 + n;
                Ok(V::Str(data.to_vec()))
            }
            Some(b'N') if s[*pos..].starts_with(b"NIL") => {
                *pos += 3;
                Ok(V::Nil)
            }
            Some(c) if c.is_ascii_digit() => {
                let start = *pos;
                while s.get(*pos).is_some_and(u8::is_ascii_digit) {
                    *pos += 1;
                }
                Ok(V::Num(
                    std::str::from_utf8(&s[start..*pos])
                        .unwrap()
                        .parse()
                        .unwrap(),
                ))
            }
            other => Err(format!("unexpected {other:?} at {pos}")),
        }
    }

    fn is_nstring(v: &V) -> bool {
        matches!(v, V::Nil | V::Str(_))
    }

    fn check_params(v: &V) -> Result<(), String> {
        match v {
            V::Nil => Ok(()),
            V::List(items) if !items.is_empty() && items.len() % 2 == 0 => {
                if items.iter().all(|i| matches!(i, V::Str(_))) {
                    Ok(())
                } else {
                    Err("param not a string".into())
                }
            }
            _ => Err(format!("bad params {v:?}")),
        }
    }

    fn check_envelope(v: &V) -> Result<(), String> {
        let V::List(items) = v else {
            return Err("envelope not a list".into());
        };
        if items.len() != 10 {
            return Err(format!("envelope has {} items", items.len()));
        }
        for (i, item) in items.iter().enumerate() {
            if (2..8).contains(&i) {
                match item {
                    V::Nil => {}
                    V::List(addrs) if !addrs.is_empty() => {
                        for a in addrs {
                            match a {
                                V::List(f) if f.len() == 4 && f.iter().all(is_nstring) => {}
                                _ => return Err(format!("bad address {a:?}")),
                            }
                        }
                    }
                    _ => return Err(format!("bad address list {item:?}")),
                }
            } else if !is_nstring(item) {
                return Err(format!("envelope item {i} not nstring"));
            }
        }
        Ok(())
    }

    /// Checks the RFC 3501 `body` grammar; returns the number of leaf parts.
    fn check_body(v: &V, ext: bool) -> Result<usize, String> {
        let V::List(items) = v else {
            return Err("body not a list".into());
        };
        if matches!(items.first(), Some(V::List(_))) {
            let n = items.iter().take_while(|i| matches!(i, V::List(_))).count();
            let mut leaves = 0;
            for child in &items[..n] {
                leaves += check_body(child, ext)?;
            }
            if !matches!(items.get(n), Some(V::Str(_))) {
                return Err("multipart subtype missing".into());
            }
            let rest = &items[n + 1..];
            if ext {
                if rest.len() != 4 {
                    return Err("multipart extension length".into());
                }
                check_params(&rest[0])?;
            } else if !rest.is_empty() {
                return Err("BODY with extension data".into());
            }
            return Ok(leaves);
        }
        if items.len() < 7 {
            return Err(format!("short basic body {items:?}"));
        }
        let (V::Str(main), V::Str(sub)) = (&items[0], &items[1]) else {
            return Err("type/subtype not strings".into());
        };
        check_params(&items[2])?;
        if !is_nstring(&items[3]) || !is_nstring(&items[4]) || !matches!(items[5], V::Str(_)) {
            return Err("bad id/desc/encoding".into());
        }
        if !matches!(items[6], V::Num(_)) {
            return Err("size not a number".into());
        }
        let mut next = 7;
        if main.eq_ignore_ascii_case(b"MESSAGE") && sub.eq_ignore_ascii_case(b"RFC822") {
            check_envelope(items.get(7).ok_or("no envelope")?)?;
            check_body(items.get(8).ok_or("no inner body")?, ext)?;
            if !matches!(items.get(9), Some(V::Num(_))) {
                return Err("message lines missing".into());
            }
            next = 10;
        } else if main.eq_ignore_ascii_case(b"TEXT") {
            if !matches!(items.get(7), Some(V::Num(_))) {
                return Err("text lines missing".into());
            }
            next = 8;
        }
        let rest = &items[next..];
        if ext {
            if rest.len() != 4 || !is_nstring(&rest[0]) || !is_nstring(&rest[3]) {
                return Err(format!("bad single-part extension {rest:?}"));
            }
            match &rest[1] {
                V::Nil => {}
                V::List(d) if d.len() == 2 && matches!(d[0], V::Str(_)) => check_params(&d[1])?,
                other => return Err(format!("bad disposition {other:?}")),
            }
            match &rest[2] {
                V::Nil | V::Str(_) => {}
                V::List(l) if !l.is_empty() && l.iter().all(|i| matches!(i, V::Str(_))) => {}
                other => return Err(format!("bad language {other:?}")),
            }
        } else if !rest.is_empty() {
            return Err("BODY with extension data".into());
        }
        Ok(1)
    }

    /// Runs every public function on `raw` and checks the outputs' syntax.
    /// Returns the number of leaf parts in BODYSTRUCTURE.
    fn check_all(raw: &[u8]) -> usize {
        let env = envelope(raw);
        let parsed = parse_imap(&env).unwrap_or_else(|e| panic!("envelope: {e}: {}", show(&env)));
        check_envelope(&parsed).unwrap();
        let mut leaves = 0;
        for ext in [true, false] {
            let bs = body_structure(raw, ext);
            let parsed = parse_imap(&bs).unwrap_or_else(|e| panic!("body: {e}: {}", show(&bs)));
            leaves =
                check_body(&parsed, ext).unwrap_or_else(|e| panic!("body: {e}: {}", show(&bs)));
        }
        let specs = [
            SectionSpec::Full,
            SectionSpec::Header,
            SectionSpec::Text,
            SectionSpec::Mime,
            SectionSpec::HeaderFields(vec!["Subject".into(), "content-type".into()]),
            SectionSpec::HeaderFieldsNot(vec!["from".into()]),
        ];
        for path in [
            &[][..],
            &[1],
            &[2],
            &[1, 1],
            &[2, 1],
            &[1, 2, 1],
            &[0],
            &[u32::MAX],
        ] {
            for spec in &specs {
                let _ = section(raw, path, spec);
            }
        }
        let _ = header_values(raw, "subject");
        let _ = header_values(raw, "from");
        let _ = body_text(raw);
        let _ = sent_date(raw);
        leaves
    }

    fn show(v: &[u8]) -> String {
        String::from_utf8_lossy(v).into_owned()
    }

    /// Runs `f` on a thread with a deliberately small stack.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap()
    }

    // -- sample messages --

    const SIMPLE: &[u8] = b"Date: Mon, 7 Feb 1994 21:52:25 -0800 (PST)\r\n\
From: Fred Foobar <foobar@Blurdybloop.example>\r\n\
Subject: afternoon meeting\r\n\
To: mooch@owatagu.siam.edu.example\r\n\
Message-Id: <B27397-0100000@Blurdybloop.example>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n\
\r\n\
Hello Joe, do you think we can meet at 3:30 tomorrow?\r\n";

    const ALTERNATIVE: &[u8] = b"From: a@example.com\r\n\
To: b@example.com\r\n\
Subject: alt\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/alternative; boundary=\"XX\"\r\n\
\r\n\
preamble\r\n\
--XX\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
plain body\r\n\
--XX\r\n\
Content-Type: text/html; charset=utf-8\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
<p>html =3D body</p>\r\n\
--XX--\r\n\
epilogue\r\n";

    const MIXED: &[u8] = b"From: \"Doe, John\" <john@example.com>\r\n\
To: Jane <jane@example.org>, bob@example.net (Bob)\r\n\
Subject: report\r\n\
Content-Type: multipart/mixed;\r\n\tboundary=frontier\r\n\
\r\n\
--frontier\r\n\
Content-Type: text/plain\r\n\
Content-Language: en, fr\r\n\
\r\n\
See attached.\r\n\
--frontier\r\n\
Content-Type: application/pdf; name=\"report.pdf\"\r\n\
Content-Transfer-Encoding: base64\r\n\
Content-Disposition: attachment; filename=\"report.pdf\"\r\n\
Content-ID: <part2@example.com>\r\n\
Content-Description: The report\r\n\
Content-Location: http://example.com/r.pdf\r\n\
\r\n\
JVBERi0xLjQK\r\n\
--frontier--\r\n";

    const FORWARD: &[u8] = b"From: a@example.com\r\n\
Subject: fwd\r\n\
Content-Type: multipart/mixed; boundary=b1\r\n\
\r\n\
--b1\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
see below\r\n\
--b1\r\n\
Content-Type: message/rfc822\r\n\
\r\n\
From: inner@example.com\r\n\
Subject: inner\r\n\
Content-Type: multipart/alternative; boundary=b2\r\n\
\r\n\
--b2\r\n\
Content-Type: text/plain\r\n\
\r\n\
inner text\r\n\
--b2\r\n\
Content-Type: text/html\r\n\
\r\n\
<b>inner</b>\r\n\
--b2--\r\n\
\r\n\
--b1--\r\n";

    const INNER_MESSAGE: &[u8] = b"From: inner@example.com\r\n\
Subject: inner\r\n\
Content-Type: multipart/alternative; boundary=b2\r\n\
\r\n\
--b2\r\n\
Content-Type: text/plain\r\n\
\r\n\
inner text\r\n\
--b2\r\n\
Content-Type: text/html\r\n\
\r\n\
<b>inner</b>\r\n\
--b2--\r\n";

    const HEADERS_ONLY: &[u8] = b"Subject: Hello\r\n\
From: Ann <ann@example.com>\r\n\
X-Folded: one\r\n two\r\n\
subject: second\r\n\
\r\n\
body line 1\r\n\
body line 2\r\n";

    // -- string helpers --

    #[test]
    fn strings() {
        let mut out = Vec::new();
        write_string(&mut out, b"a \"q\" \\ b");
        assert_eq!(out, b"\"a \\\"q\\\" \\\\ b\"");
        out.clear();
        write_string(&mut out, "caf\u{e9}".as_bytes());
        assert_eq!(out, b"{5}\r\ncaf\xc3\xa9");
        out.clear();
        write_string(&mut out, b"a\r\nb");
        assert_eq!(out, b"{4}\r\na\r\nb");
        out.clear();
        write_nstring(&mut out, None);
        write_nstring(&mut out, Some(b""));
        assert_eq!(out, b"NIL\"\"");
    }

    // -- ENVELOPE / BODYSTRUCTURE with exact output --

    #[test]
    fn simple_text_message() {
        assert_eq!(
            show(&envelope(SIMPLE)),
            "(\"Mon, 7 Feb 1994 21:52:25 -0800 (PST)\" \"afternoon meeting\" \
((\"Fred Foobar\" NIL \"foobar\" \"Blurdybloop.example\")) \
((\"Fred Foobar\" NIL \"foobar\" \"Blurdybloop.example\")) \
((\"Fred Foobar\" NIL \"foobar\" \"Blurdybloop.example\")) \
((NIL NIL \"mooch\" \"owatagu.siam.edu.example\")) NIL NIL NIL \
\"<B27397-0100000@Blurdybloop.example>\")"
        );
        assert_eq!(
            show(&body_structure(SIMPLE, true)),
            "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL \"7BIT\" 55 1 NIL NIL NIL NIL)"
        );
        assert_eq!(
            show(&body_structure(SIMPLE, false)),
            "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL \"7BIT\" 55 1)"
        );
        assert_eq!(sent_date(SIMPLE), Some((1994, 2, 7)));
        check_all(SIMPLE);
    }

    #[test]
    fn defaults_without_content_type() {
        let raw = b"Subject: x\r\n\r\nline1\r\nline2";
        assert_eq!(
            show(&body_structure(raw, true)),
            "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 12 2 NIL NIL NIL NIL)"
        );
        assert_eq!(
            show(&envelope(raw)),
            "(NIL \"x\" NIL NIL NIL NIL NIL NIL NIL NIL)"
        );
    }

    #[test]
    fn multipart_alternative() {
        assert_eq!(
            show(&body_structure(ALTERNATIVE, true)),
            "((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"utf-8\") NIL NIL \"7BIT\" 10 1 NIL NIL NIL NIL)\
(\"TEXT\" \"HTML\" (\"CHARSET\" \"utf-8\") NIL NIL \"QUOTED-PRINTABLE\" 20 1 NIL NIL NIL NIL) \
\"ALTERNATIVE\" (\"BOUNDARY\" \"XX\") NIL NIL NIL)"
        );
        assert_eq!(
            show(&body_structure(ALTERNATIVE, false)),
            "((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"utf-8\") NIL NIL \"7BIT\" 10 1)\
(\"TEXT\" \"HTML\" (\"CHARSET\" \"utf-8\") NIL NIL \"QUOTED-PRINTABLE\" 20 1) \"ALTERNATIVE\")"
        );
        assert_eq!(body_text(ALTERNATIVE), "plain body\n<p>html = body</p>");
        check_all(ALTERNATIVE);
    }

    #[test]
    fn multipart_mixed_with_attachment() {
        assert_eq!(
            show(&body_structure(MIXED, true)),
            "((\"TEXT\" \"PLAIN\" NIL NIL NIL \"7BIT\" 13 1 NIL NIL (\"en\" \"fr\") NIL)\
(\"APPLICATION\" \"PDF\" (\"NAME\" \"report.pdf\") \"<part2@example.com>\" \"The report\" \
\"BASE64\" 12 NIL (\"ATTACHMENT\" (\"FILENAME\" \"report.pdf\")) NIL \"http://example.com/r.pdf\") \
\"MIXED\" (\"BOUNDARY\" \"frontier\") NIL NIL NIL)"
        );
        assert_eq!(
            show(&envelope(MIXED)),
            "(NIL \"report\" ((\"Doe, John\" NIL \"john\" \"example.com\")) \
((\"Doe, John\" NIL \"john\" \"example.com\")) ((\"Doe, John\" NIL \"john\" \"example.com\")) \
((\"Jane\" NIL \"jane\" \"example.org\")(\"Bob\" NIL \"bob\" \"example.net\")) NIL NIL NIL NIL)"
        );
        assert_eq!(
            section(MIXED, &[2], &SectionSpec::Full).unwrap(),
            b"JVBERi0xLjQK"
        );
        check_all(MIXED);
    }

    #[test]
    fn message_rfc822_attachment() {
        assert_eq!(
            show(&body_structure(FORWARD, true)),
            "((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 9 1 NIL NIL NIL NIL)\
(\"MESSAGE\" \"RFC822\" NIL NIL NIL \"7BIT\" 194 \
(NIL \"inner\" ((NIL NIL \"inner\" \"example.com\")) ((NIL NIL \"inner\" \"example.com\")) \
((NIL NIL \"inner\" \"example.com\")) NIL NIL NIL NIL NIL) \
((\"TEXT\" \"PLAIN\" NIL NIL NIL \"7BIT\" 10 1 NIL NIL NIL NIL)\
(\"TEXT\" \"HTML\" NIL NIL NIL \"7BIT\" 12 1 NIL NIL NIL NIL) \
\"ALTERNATIVE\" (\"BOUNDARY\" \"b2\") NIL NIL NIL) 13 NIL NIL NIL NIL) \
\"MIXED\" (\"BOUNDARY\" \"b1\") NIL NIL NIL)"
        );
        assert_eq!(
            show(&body_structure(FORWARD, false)),
            "((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 9 1)\
(\"MESSAGE\" \"RFC822\" NIL NIL NIL \"7BIT\" 194 \
(NIL \"inner\" ((NIL NIL \"inner\" \"example.com\")) ((NIL NIL \"inner\" \"example.com\")) \
((NIL NIL \"inner\" \"example.com\")) NIL NIL NIL NIL NIL) \
((\"TEXT\" \"PLAIN\" NIL NIL NIL \"7BIT\" 10 1)(\"TEXT\" \"HTML\" NIL NIL NIL \"7BIT\" 12 1) \
\"ALTERNATIVE\") 13) \"MIXED\")"
        );
        assert_eq!(INNER_MESSAGE.len(), 194);
        assert_eq!(body_text(FORWARD), "see below\ninner text\n<b>inner</b>");
        check_all(FORWARD);
    }

    #[test]
    fn non_multipart_encapsulated_message() {
        let raw =
            b"Subject: outer\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nhi\r\n";
        assert_eq!(
            show(&body_structure(raw, false)),
            "(\"MESSAGE\" \"RFC822\" NIL NIL NIL \"7BIT\" 22 \
(NIL \"inner\" NIL NIL NIL NIL NIL NIL NIL NIL) \
(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 4 1) 3)"
        );
        assert_eq!(
            section(raw, &[1], &SectionSpec::Full).unwrap(),
            b"Subject: inner\r\n\r\nhi\r\n"
        );
        assert_eq!(
            section(raw, &[1, 1], &SectionSpec::Full).unwrap(),
            b"hi\r\n"
        );
        assert_eq!(
            section(raw, &[1], &SectionSpec::Header).unwrap(),
            b"Subject: inner\r\n\r\n"
        );
        assert_eq!(section(raw, &[1], &SectionSpec::Text).unwrap(), b"hi\r\n");
        assert_eq!(section(raw, &[1, 2], &SectionSpec::Full), None);
    }

    #[test]
    fn group_addresses() {
        let raw = b"From: Ann <ann@example.com>\r\n\
To: A Group:alice@example.com, \"Bob B.\" <bob@example.com>;, undisclosed-recipients:;,\r\n carol@example.com\r\n\
Cc: <@relay.example,@other.example:dave@example.com>, nobody\r\n\
\r\n";
        assert_eq!(
            show(&envelope(raw)),
            "(NIL NIL ((\"Ann\" NIL \"ann\" \"example.com\")) ((\"Ann\" NIL \"ann\" \"example.com\")) \
((\"Ann\" NIL \"ann\" \"example.com\")) \
((NIL NIL \"A Group\" NIL)(NIL NIL \"alice\" \"example.com\")(\"Bob B.\" NIL \"bob\" \"example.com\")\
(NIL NIL NIL NIL)(NIL NIL \"undisclosed-recipients\" NIL)(NIL NIL NIL NIL)\
(NIL NIL \"carol\" \"example.com\")) \
((NIL \"@relay.example,@other.example\" \"dave\" \"example.com\")\
(NIL NIL \"nobody\" \".MISSING-HOST-NAME.\")) NIL NIL NIL)"
        );
    }

    #[test]
    fn encoded_words_pass_through_envelope() {
        let raw = b"Subject: =?UTF-8?B?SGVsbG8gV8O2cmxk?=\r\n =?UTF-8?Q?_again?=\r\n\
From: =?ISO-8859-1?Q?Andr=E9?= Pirard <PIRARD@vm1.ulg.ac.be>\r\n\
Reply-To: \"=?UTF-8?Q?J=C3=B6rg?=\" <j@example.com>\r\n\
\r\nbody\r\n";
        assert_eq!(
            show(&envelope(raw)),
            "(NIL \"=?UTF-8?B?SGVsbG8gV8O2cmxk?= =?UTF-8?Q?_again?=\" \
((\"=?ISO-8859-1?Q?Andr=E9?= Pirard\" NIL \"PIRARD\" \"vm1.ulg.ac.be\")) \
((\"=?ISO-8859-1?Q?Andr=E9?= Pirard\" NIL \"PIRARD\" \"vm1.ulg.ac.be\")) \
((\"=?UTF-8?Q?J=C3=B6rg?=\" NIL \"j\" \"example.com\")) NIL NIL NIL NIL NIL)"
        );
        assert_eq!(
            header_values(raw, "SUBJECT"),
            vec!["Hello W\u{f6}rld again".to_string()]
        );
        assert_eq!(
            header_values(raw, "from"),
            vec!["André Pirard <PIRARD@vm1.ulg.ac.be>".to_string()]
        );
    }

    #[test]
    fn eight_bit_header_values_become_literals() {
        let raw = "Subject: caf\u{e9}\r\nFrom: J\u{f6}rg <j@example.com>\r\n\r\n".as_bytes();
        assert_eq!(
            envelope(raw),
            "(NIL {5}\r\ncaf\u{e9} (({5}\r\nJ\u{f6}rg NIL \"j\" \"example.com\")) \
(({5}\r\nJ\u{f6}rg NIL \"j\" \"example.com\")) (({5}\r\nJ\u{f6}rg NIL \"j\" \"example.com\")) \
NIL NIL NIL NIL NIL)"
                .as_bytes()
        );
        check_all(raw);
    }

    // -- BODY[section] --

    #[test]
    fn sections_of_multipart_message() {
        let full = |path: &[u32]| section(FORWARD, path, &SectionSpec::Full);
        assert_eq!(full(&[1]).unwrap(), b"see below");
        assert_eq!(full(&[2]).unwrap(), INNER_MESSAGE);
        assert_eq!(full(&[2, 1]).unwrap(), b"inner text");
        assert_eq!(full(&[2, 2]).unwrap(), b"<b>inner</b>");
        assert_eq!(full(&[3]), None);
        assert_eq!(full(&[1, 1]), None);
        assert_eq!(full(&[2, 1, 1]), None);
        assert_eq!(full(&[0]), None);
        assert_eq!(
            section(FORWARD, &[2], &SectionSpec::Mime).unwrap(),
            b"Content-Type: message/rfc822\r\n\r\n"
        );
        assert_eq!(
            section(FORWARD, &[2, 1], &SectionSpec::Mime).unwrap(),
            b"Content-Type: text/plain\r\n\r\n"
        );
        assert_eq!(
            section(FORWARD, &[2], &SectionSpec::Header).unwrap(),
            b"From: inner@example.com\r\nSubject: inner\r\n\
Content-Type: multipart/alternative; boundary=b2\r\n\r\n"
        );
        assert_eq!(
            section(
                FORWARD,
                &[2],
                &SectionSpec::HeaderFields(vec!["subject".into()])
            )
            .unwrap(),
            b"Subject: inner\r\n\r\n"
        );
        let inner_text = section(FORWARD, &[2], &SectionSpec::Text).unwrap();
        assert!(inner_text.starts_with(b"--b2\r\n") && inner_text.ends_with(b"--b2--\r\n"));
        // HEADER / TEXT are only valid on message/rfc822 parts.
        assert_eq!(section(FORWARD, &[1], &SectionSpec::Header), None);
        assert_eq!(section(FORWARD, &[1], &SectionSpec::Text), None);
        assert_eq!(section(FORWARD, &[], &SectionSpec::Mime), None);
        assert_eq!(section(FORWARD, &[], &SectionSpec::Full).unwrap(), FORWARD);
    }

    #[test]
    fn sections_of_top_level_header_and_text() {
        let fields = SectionSpec::HeaderFields(vec!["SUBJECT".into(), "From".into()]);
        assert_eq!(
            show(&section(HEADERS_ONLY, &[], &fields).unwrap()),
            "Subject: Hello\r\nFrom: Ann <ann@example.com>\r\nsubject: second\r\n\r\n"
        );
        let not = SectionSpec::HeaderFieldsNot(vec!["subject".into(), "from".into()]);
        assert_eq!(
            show(&section(HEADERS_ONLY, &[], &not).unwrap()),
            "X-Folded: one\r\n two\r\n\r\n"
        );
        assert_eq!(
            section(HEADERS_ONLY, &[], &SectionSpec::Text).unwrap(),
            b"body line 1\r\nbody line 2\r\n"
        );
        let header = section(HEADERS_ONLY, &[], &SectionSpec::Header).unwrap();
        assert!(header.starts_with(b"Subject: Hello\r\n") && header.ends_with(b"second\r\n\r\n"));
        let none = SectionSpec::HeaderFields(vec!["x-absent".into()]);
        assert_eq!(section(HEADERS_ONLY, &[], &none).unwrap(), b"\r\n");
        assert_eq!(
            header_values(HEADERS_ONLY, "subject"),
            vec!["Hello", "second"]
        );
        assert_eq!(header_values(HEADERS_ONLY, "x-folded"), vec!["one two"]);
    }

    #[test]
    fn the_header_alone_answers_every_header_item_as_the_whole_message_does() {
        // Goal: what a node serves from a headers-only read or its header cache is what it
        // would serve from the whole message, for every item that needs no more.
        let specs = [
            SectionSpec::Header,
            SectionSpec::HeaderFields(vec!["subject".into(), "FROM".into()]),
            SectionSpec::HeaderFieldsNot(vec!["subject".into()]),
        ];
        for raw in [
            SIMPLE,
            ALTERNATIVE,
            MIXED,
            FORWARD,
            INNER_MESSAGE,
            HEADERS_ONLY,
        ] {
            let end = header_end(raw).expect("a header that ends");
            let head = &raw[..end];
            assert!(head.ends_with(b"\r\n\r\n"), "{}", show(head));
            assert_eq!(header_end(head), Some(end));
            for spec in &specs {
                assert_eq!(
                    section(head, &[], spec),
                    section(raw, &[], spec),
                    "{spec:?}"
                );
            }
            assert_eq!(envelope(head), envelope(raw));
            assert_eq!(sent_date(head), sent_date(raw));
            assert_eq!(
                header_values(head, "subject"),
                header_values(raw, "subject")
            );
        }
        // Bare LF; no empty line yet (also a piece cut inside a CRLF); nothing but the line.
        assert_eq!(header_end(b"A: 1\nB: 2\n\nbody\n"), Some(11));
        assert_eq!(header_end(b"A: 1\r\nB: 2\r\n"), None);
        assert_eq!(header_end(b"A: 1\r\n\r"), None);
        assert_eq!(header_end(b"\r\nbody"), Some(2));
        assert_eq!(header_end(b""), None);
    }

    #[test]
    fn part_one_of_non_multipart_message() {
        assert_eq!(
            section(HEADERS_ONLY, &[1], &SectionSpec::Full).unwrap(),
            b"body line 1\r\nbody line 2\r\n"
        );
        assert_eq!(section(HEADERS_ONLY, &[2], &SectionSpec::Full), None);
        assert_eq!(section(HEADERS_ONLY, &[1, 1], &SectionSpec::Full), None);
        assert_eq!(section(HEADERS_ONLY, &[1], &SectionSpec::Header), None);
        let mime = section(HEADERS_ONLY, &[1], &SectionSpec::Mime).unwrap();
        assert!(mime.starts_with(b"Subject: Hello\r\n") && mime.ends_with(b"\r\n\r\n"));
    }

    #[test]
    fn multipart_digest_defaults_to_message() {
        let raw = b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\n\
Subject: one\r\n\r\nfirst\r\n--d\r\nContent-Type: text/plain\r\n\r\nsecond\r\n--d--\r\n";
        assert_eq!(
            show(&body_structure(raw, false)),
            "((\"MESSAGE\" \"RFC822\" NIL NIL NIL \"7BIT\" 21 \
(NIL \"one\" NIL NIL NIL NIL NIL NIL NIL NIL) \
(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 5 1) 3)\
(\"TEXT\" \"PLAIN\" NIL NIL NIL \"7BIT\" 6 1) \"DIGEST\")"
        );
        assert_eq!(section(raw, &[1, 1], &SectionSpec::Full).unwrap(), b"first");
    }

    // -- search helpers --

    #[test]
    fn body_text_decodes_transfer_encoding_and_charset() {
        let raw = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n\
Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
caf=E9 =\r\nsoft\r\n--x\r\n\
Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n\
w6l0w6k=\r\n--x\r\n\
Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--x--\r\n";
        assert_eq!(body_text(raw), "caf\u{e9} soft\n\u{e9}t\u{e9}");
    }

    #[test]
    fn sent_date_variants() {
        assert_eq!(
            sent_date(b"Date: Tue, 1 Jul 2003 10:52:37 +0200\r\n\r\n"),
            Some((2003, 7, 1))
        );
        // The header's own zone is kept: no conversion to UTC.
        assert_eq!(
            sent_date(b"Date: 31 Dec 2020 23:59:59 -1200\r\n\r\n"),
            Some((2020, 12, 31))
        );
        assert_eq!(sent_date(b"Date: garbage\r\n\r\n"), None);
        assert_eq!(sent_date(b"Subject: none\r\n\r\n"), None);
        assert_eq!(sent_date(b""), None);
    }

    // -- robustness --

    fn nested_multiparts(levels: usize) -> Vec<u8> {
        let mut raw = Vec::new();
        for i in 0..levels {
            raw.extend_from_slice(
                format!("Content-Type: multipart/mixed; boundary=\"=_{i}_=\"\r\n\r\n--=_{i}_=\r\n")
                    .as_bytes(),
            );
        }
        raw.extend_from_slice(b"Content-Type: text/plain\r\n\r\ndeep\r\n");
        for i in (0..levels).rev() {
            raw.extend_from_slice(format!("--=_{i}_=--\r\n").as_bytes());
        }
        raw
    }

    fn nested_messages(levels: usize) -> Vec<u8> {
        let mut raw = Vec::new();
        for i in 0..levels {
            raw.extend_from_slice(
                format!("Subject: level {i}\r\nContent-Type: message/rfc822\r\n\r\n").as_bytes(),
            );
        }
        raw.extend_from_slice(b"Subject: leaf\r\n\r\ndeep\r\n");
        raw
    }

    /// Number of entity levels in a parsed body (multipart, encapsulated
    /// message and leaf each count as one).
    fn body_levels(v: &V) -> usize {
        let V::List(items) = v else { return 0 };
        match items.first() {
            Some(V::List(_)) => {
                1 + items
                    .iter()
                    .take_while(|i| matches!(i, V::List(_)))
                    .map(body_levels)
                    .max()
                    .unwrap_or(0)
            }
            Some(V::Str(main))
                if main == b"MESSAGE" && items.get(1) == Some(&V::Str(b"RFC822".to_vec())) =>
            {
                1 + items.get(8).map_or(0, body_levels)
            }
            _ => 1,
        }
    }

    #[test]
    fn ten_thousand_nested_multiparts() {
        let raw = nested_multiparts(10_000);
        let started = Instant::now();
        let (bs, deepest, too_deep) = on_small_stack(move || {
            (
                body_structure(&raw, true),
                section(&raw, &[1; MAX_DEPTH - 1], &SectionSpec::Mime),
                section(&raw, &[1; MAX_DEPTH], &SectionSpec::Full),
            )
        });
        assert!(started.elapsed() < Duration::from_secs(20));
        let parsed = parse_imap(&bs).unwrap();
        assert_eq!(check_body(&parsed, true).unwrap(), 1);
        // 31 multipart levels, then the capped level rendered as text/plain.
        assert_eq!(body_levels(&parsed), MAX_DEPTH);
        assert_eq!(
            deepest.unwrap(),
            b"Content-Type: multipart/mixed; boundary=\"=_31_=\"\r\n\r\n"
        );
        assert_eq!(too_deep, None);
        let raw = nested_multiparts(10_000);
        on_small_stack(move || check_all(&raw));
    }

    #[test]
    fn ten_thousand_nested_messages() {
        let raw = nested_messages(10_000);
        let started = Instant::now();
        let (bs, deepest, too_deep) = on_small_stack(move || {
            (
                body_structure(&raw, false),
                section(&raw, &[1; MAX_DEPTH], &SectionSpec::Mime),
                section(&raw, &[1; MAX_DEPTH + 1], &SectionSpec::Full),
            )
        });
        assert!(started.elapsed() < Duration::from_secs(20));
        let parsed = parse_imap(&bs).unwrap();
        assert_eq!(check_body(&parsed, false).unwrap(), 1);
        assert_eq!(body_levels(&parsed), MAX_DEPTH);
        assert_eq!(
            deepest.unwrap(),
            b"Subject: level 31\r\nContent-Type: message/rfc822\r\n\r\n"
        );
        assert_eq!(too_deep, None);
        let raw = nested_messages(10_000);
        on_small_stack(move || check_all(&raw));
    }

    #[test]
    fn fifty_thousand_tiny_parts() {
        let mut raw =
            b"Subject: many\r\nContent-Type: multipart/mixed; boundary=sep\r\n\r\n".to_vec();
        for i in 0..50_000 {
            raw.extend_from_slice(
                format!("--sep\r\nContent-Type: text/plain\r\n\r\npart{i:05}\r\n").as_bytes(),
            );
        }
        raw.extend_from_slice(b"--sep--\r\n");
        assert!(raw.len() >= 2_000_000);
        let started = Instant::now();
        let bs = body_structure(&raw, true);
        let last = section(&raw, &[50_000], &SectionSpec::Full);
        let text = body_text(&raw);
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
        assert_eq!(check_body(&parse_imap(&bs).unwrap(), true).unwrap(), 50_000);
        assert_eq!(last.unwrap(), b"part49999");
        assert_eq!(section(&raw, &[50_001], &SectionSpec::Full), None);
        assert!(text.ends_with("part49998\npart49999"));
    }

    #[test]
    fn unbalanced_quotes_and_comments() {
        let raw = b"From: \"John <john@example.com>\r\n\
To: (unclosed comment <x@example.com>\r\n\
Cc: <bad@example.com, \"also\r\n\
Subject: \"half\r\n\
Content-Type: multipart/mixed; boundary=\"abc\r\n\
\r\n\
--abc\r\n\
Content-Type: text/plain; charset=\"utf-8\r\n\
Content-Disposition: attachment; filename=\"x\r\n\
\r\n\
text\r\n\
--abc--\r\n";
        check_all(raw);
        assert_eq!(
            show(&envelope(raw)),
            "(NIL \"\\\"half\" \
((NIL NIL \"John <john@example.com>\" \".MISSING-HOST-NAME.\")) \
((NIL NIL \"John <john@example.com>\" \".MISSING-HOST-NAME.\")) \
((NIL NIL \"John <john@example.com>\" \".MISSING-HOST-NAME.\")) \
NIL ((NIL NIL \"bad\" \"example.com,\\\"also\\\"\")) NIL NIL NIL)"
        );
        assert_eq!(
            show(&body_structure(raw, true)),
            "((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"utf-8\") NIL NIL \"7BIT\" 4 1 NIL \
(\"ATTACHMENT\" (\"FILENAME\" \"x\")) NIL NIL) \"MIXED\" (\"BOUNDARY\" \"abc\") NIL NIL NIL)"
        );
    }

    #[test]
    fn nul_bytes() {
        let raw = b"Subject: a\0b\r\nFrom: x\0y@example.com\r\nContent-Type: text/pl\0ain\r\n\r\nbo\0dy\r\n";
        check_all(raw);
        let env = envelope(raw);
        assert!(!env.contains(&0));
        assert_eq!(
            show(&env),
            "(NIL \"ab\" ((NIL NIL \"xy\" \"example.com\")) ((NIL NIL \"xy\" \"example.com\")) \
((NIL NIL \"xy\" \"example.com\")) NIL NIL NIL NIL NIL)"
        );
        assert!(!body_structure(raw, true).contains(&0));
        assert_eq!(
            section(raw, &[1], &SectionSpec::Full).unwrap(),
            b"bo\0dy\r\n"
        );
        check_all(b"\0\0\0");
        check_all(b"\0\r\n\r\n\0");
    }

    #[test]
    fn malformed_structures() {
        let cases: &[&[u8]] = &[
            b"",
            b"\r\n",
            b"\n\n\n",
            b"no header separator at all",
            b"Subject: only a header",
            b": empty name\r\n\r\n",
            b" leading continuation\r\nSubject: x\r\n\r\nbody",
            b"Content-Type: multipart/mixed\r\n\r\nno boundary param",
            b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n",
            b"Content-Type: multipart/mixed; boundary=q\r\n\r\nno delimiter at all",
            b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\nContent-Type: text/plain\r\n\r\ntruncated",
            b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q--\r\n",
            b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n--q\r\n--q--",
            b"Content-Type: multipart/mixed; boundary=q\n\n--q\nContent-Type: text/plain\n\nbare LF\n--q--\n",
            b"Content-Type: message/rfc822\r\n\r\n",
            b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\nU3ViamVjdDogeA==",
            b"Content-Type: /\r\nContent-Transfer-Encoding:\r\n\r\nx",
            b"Content-Type: text\r\n\r\nx",
            b"Content-Type: ;;;=;=x;\"\r\nContent-Disposition: ;\r\nContent-Language: ,,(\r\n\r\n",
            b"From: ,,,;;;:::<<<>>>@@@\r\nTo: :;\r\nCc: <>\r\nBcc: @\r\n\r\n",
            b"From: a@b@c, [lit@eral], \"\\\r\n\r\n",
            b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n\
Content-Type: multipart/mixed; boundary=ab\r\n\r\n--ab\r\n\r\ninner\r\n--a--\r\n",
            b"\xff\xfe\x80: \x81\r\n\r\n\xc3\x28",
        ];
        for raw in cases {
            check_all(raw);
        }
        // A multipart without delimiters gets one empty text part.
        assert_eq!(
            show(&body_structure(cases[9], false)),
            "((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 0 0) \"MIXED\")"
        );
        // Bare LF line endings are handled like CRLF.
        assert_eq!(
            section(cases[13], &[1], &SectionSpec::Full).unwrap(),
            b"bare LF"
        );
        // An unterminated inner multipart ends at the outer delimiter.
        assert_eq!(
            section(cases[21], &[1, 1], &SectionSpec::Full).unwrap(),
            b"inner"
        );
    }

    /// Deterministic mutation fuzzing: every mutated message must still give
    /// syntactically valid IMAP output.
    #[test]
    fn mutation_fuzz() {
        let digest: &[u8] = b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\n\
Subject: one\r\nContent-Type: message/rfc822\r\n\r\nFrom: x@y\r\n\r\nhi\r\n--d--\r\n";
        let seeds: &[&[u8]] = &[SIMPLE, ALTERNATIVE, MIXED, FORWARD, HEADERS_ONLY, digest];
        let interesting: &[&[u8]] = &[
            b"\r\n",
            b"\n",
            b"\r",
            b"\"",
            b"(",
            b")",
            b"<",
            b">",
            b":",
            b";",
            b",",
            b"\\",
            b"@",
            b"\0",
            b"\xff",
            b"=?utf-8?q?",
            b"?=",
            b"--",
            b"--b1",
            b"--XX--",
            b"--frontier\r\n",
            b"\r\n\r\n",
            b" ",
            b"Content-Type: multipart/mixed; boundary=z\r\n",
            b"Content-Type: message/rfc822\r\n",
            b"charset=utf-7",
            b"base64",
            b"=\r\n",
        ];
        // MIME_FUZZ_SEED selects another deterministic sequence (non-zero).
        let mut state = std::env::var("MIME_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&v| v != 0)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        let mut rand = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n.max(1) as u64) as usize
        };
        // MIME_FUZZ_ITERATIONS allows longer runs (e.g. in release mode).
        let iterations = std::env::var("MIME_FUZZ_ITERATIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        for _ in 0..iterations {
            let mut raw = seeds[rand(seeds.len())].to_vec();
            for _ in 0..1 + rand(6) {
                let at = rand(raw.len() + 1);
                match rand(4) {
                    0 => {
                        let piece = interesting[rand(interesting.len())];
                        raw.splice(at..at, piece.iter().copied());
                    }
                    1 => {
                        let end = (at + rand(20)).min(raw.len());
                        raw.drain(at..end);
                    }
                    2 => raw.truncate(at),
                    _ => {
                        if let Some(b) = raw.get_mut(at) {
                            *b = rand(256) as u8;
                        }
                    }
                }
            }
            check_all(&raw);
        }
    }
}
