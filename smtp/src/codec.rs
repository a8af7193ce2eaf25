//! SMTP wire pieces with no I/O: replies (with RFC 3463 enhanced status codes), the DATA
//! decoder (dot-unstuffing, end-of-data detection, size limit, bare CR/LF and NUL
//! detection) and the `Received:` trace header. Command lines are parsed
//! by `smtp-proto`.

/// One SMTP reply; `text` may hold several lines separated by `\n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code ("2.1.0"); empty for replies that carry none (220, 221 greetings,
    /// 334, 354).
    pub status: &'static str,
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, status: &'static str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            status,
            text: text.into(),
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let lines: Vec<&str> = self.text.split('\n').collect();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.extend_from_slice(format!("{}{sep}", self.code).as_bytes());
            if !self.status.is_empty() {
                out.extend_from_slice(self.status.as_bytes());
                out.push(b' ');
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataState {
    LineStart,
    Dot,
    DotCr,
    Mid,
    Cr,
}

/// What was wrong with a message's data, found while decoding it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataFaults {
    pub over_limit: bool,
    /// A CR or LF not part of a CRLF pair (RFC 5321 §2.3.8; accepting them enables SMTP
    /// smuggling).
    pub bare_line_ending: bool,
    pub nul: bool,
}

/// Decodes DATA content fed in arbitrary slices: removes dot-stuffing, finds the terminating
/// `CRLF . CRLF`, and keeps at most `limit` bytes (the rest is counted, not stored).
#[derive(Debug)]
pub struct DataDecoder {
    state: DataState,
    limit: usize,
    body: Vec<u8>,
    size: usize,
    faults: DataFaults,
    done: bool,
}

impl DataDecoder {
    pub fn new(limit: usize) -> DataDecoder {
        DataDecoder {
            state: DataState::LineStart,
            limit,
            body: Vec::new(),
            size: 0,
            faults: DataFaults::default(),
            done: false,
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Feeds bytes; returns how many were used (fewer than given once the end is found: the
    /// rest belongs to the next command).
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        for (i, &b) in bytes.iter().enumerate() {
            self.step(b);
            if self.done {
                return i + 1;
            }
        }
        bytes.len()
    }

    /// The message (when no fault) and what was wrong with it.
    pub fn finish(self) -> (Vec<u8>, usize, DataFaults) {
        (self.body, self.size, self.faults)
    }

    fn emit(&mut self, b: u8) {
        self.size += 1;
        if b == 0 {
            self.faults.nul = true;
        }
        if self.size <= self.limit {
            self.body.push(b);
        } else {
            self.faults.over_limit = true;
        }
    }

    fn step(&mut self, b: u8) {
        use DataState::*;
        self.state = match (self.state, b) {
            (LineStart, b'.') => Dot,
            (LineStart, _) | (Mid, _) => return self.mid(b),
            (Dot, b'\r') => DotCr,
            // RFC 5321 §4.5.2: a leading dot is removed whatever follows it.
            (Dot, _) => return self.mid(b),
            (DotCr, b'\n') => {
                self.done = true;
                LineStart
            }
            (DotCr, _) => {
                self.faults.bare_line_ending = true;
                self.emit(b'\r');
                return self.mid(b);
            }
            (Cr, b'\n') => {
                self.emit(b'\r');
                self.emit(b'\n');
                LineStart
            }
            (Cr, _) => {
                self.faults.bare_line_ending = true;
                self.emit(b'\r');
                return self.mid(b);
            }
        };
    }

    fn mid(&mut self, b: u8) {
        self.state = match b {
            b'\r' => DataState::Cr,
            b'\n' => {
                self.faults.bare_line_ending = true;
                self.emit(b);
                DataState::LineStart
            }
            _ => {
                self.emit(b);
                DataState::Mid
            }
        };
    }
}

/// What a `Received:` header records about one transaction (RFC 5321 §4.4).
#[derive(Debug)]
pub struct Trace<'a> {
    pub helo: &'a str,
    pub peer_ip: std::net::IpAddr,
    pub hostname: &'a str,
    /// "SMTP", "ESMTP", "ESMTPS", "ESMTPSA", ... (RFC 3848).
    pub protocol: String,
    pub id: &'a str,
    /// The recipient, when there is exactly one.
    pub recipient: Option<&'a str>,
    pub date: time::OffsetDateTime,
}

impl Trace<'_> {
    pub fn header(&self) -> String {
        let date = self
            .date
            .format(&time::format_description::well_known::Rfc2822)
            .unwrap_or_default();
        let ip = match self.peer_ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("IPv6:{v6}"),
        };
        // HELO names come from the client: keep only what is safe inside a header.
        let helo: String = self
            .helo
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(255)
            .collect();
        let mut h = format!(
            "Received: from {helo} ([{ip}])\r\n\tby {} (mailgrid) with {} id {}",
            self.hostname, self.protocol, self.id
        );
        if let Some(r) = self.recipient {
            h.push_str(&format!("\r\n\tfor <{r}>"));
        }
        h.push_str(&format!(";\r\n\t{date}\r\n"));
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(input: &[u8], limit: usize) -> (Vec<u8>, usize, DataFaults, usize) {
        let mut d = DataDecoder::new(limit);
        let used = d.feed(input);
        assert!(d.is_done(), "end of data not found in {input:?}");
        let (body, size, faults) = d.finish();
        (body, size, faults, used)
    }

    // Goal: dot-unstuffing, the end marker, and what follows it left for the next command.
    #[test]
    fn data_transcript() {
        let (body, size, faults, used) =
            decode_all(b"Subject: x\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n", 1000);
        assert_eq!(body, b"Subject: x\r\n\r\n.leading dot\r\n");
        assert_eq!(size, body.len());
        assert_eq!(faults, DataFaults::default());
        assert_eq!(used, b"Subject: x\r\n\r\n..leading dot\r\n.\r\n".len());
        let (body, ..) = decode_all(b".\r\n", 10);
        assert!(body.is_empty());
    }

    // Goal: bare LF, bare CR, NUL and oversize are reported, and ".\n" does not end the data.
    #[test]
    fn data_faults() {
        let (_, _, f, _) = decode_all(b"a\nb\r\n.\r\n", 100);
        assert!(f.bare_line_ending && !f.nul && !f.over_limit);
        let (_, _, f, _) = decode_all(b"a\rb\r\n.\r\n", 100);
        assert!(f.bare_line_ending);
        let (_, _, f, _) = decode_all(b"a\0b\r\n.\r\n", 100);
        assert!(f.nul && !f.bare_line_ending);
        let (body, size, f, _) = decode_all(b"0123456789\r\n.\r\n", 4);
        assert!(f.over_limit);
        assert_eq!((body.len(), size), (4, 12));
        let mut d = DataDecoder::new(100);
        d.feed(b"x\r\n.\nstill data\r\n");
        assert!(!d.is_done());
    }

    proptest! {
        // Goal: dot-stuffing what a client sends and decoding it in arbitrary slices gives
        // back exactly the message (any CRLF-terminated lines).
        #[test]
        fn stuff_then_decode(lines in proptest::collection::vec("[ -~]{0,20}", 0..20), cut in 0usize..200) {
            let mut message = Vec::new();
            let mut wire = Vec::new();
            for l in &lines {
                message.extend_from_slice(l.as_bytes());
                message.extend_from_slice(b"\r\n");
                if l.starts_with('.') {
                    wire.push(b'.');
                }
                wire.extend_from_slice(l.as_bytes());
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b".\r\n");
            let cut = cut.min(wire.len());
            let mut d = DataDecoder::new(usize::MAX);
            let used = d.feed(&wire[..cut]);
            prop_assert_eq!(used, cut);
            if !d.is_done() {
                let more = d.feed(&wire[cut..]);
                prop_assert_eq!(cut + more, wire.len());
            }
            prop_assert!(d.is_done());
            let (body, _, faults) = d.finish();
            prop_assert_eq!(body, message);
            prop_assert_eq!(faults, DataFaults::default());
        }
    }

    // Goal: multi-line replies use '-' on all lines but the last.
    #[test]
    fn reply_encoding() {
        let mut out = Vec::new();
        Reply::new(250, "", "mx.test\nPIPELINING\nSIZE 10").encode(&mut out);
        assert_eq!(out, b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n");
        out.clear();
        Reply::new(550, "5.1.1", "no such user").encode(&mut out);
        assert_eq!(out, b"550 5.1.1 no such user\r\n");
    }
}
