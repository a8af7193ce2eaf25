//! Facts about a stored message's bytes that more than one protocol needs. The full MIME
//! analysis (structure, envelope, decoding) is the IMAP crate's; this is only what the
//! service's own queries use.

/// Where the top-level header of a message ends: just after the empty line (CRLF or bare LF)
/// that ends it; `None` while no complete empty line has been seen (the header is the whole
/// of `raw`).
pub fn header_end(raw: &[u8]) -> Option<usize> {
    let mut pos = 0;
    while pos < raw.len() {
        let end = match raw[pos..].iter().position(|&b| b == b'\n') {
            Some(i) => pos + i + 1,
            None => raw.len(),
        };
        if matches!(&raw[pos..end], b"\n" | b"\r\n") {
            return Some(end);
        }
        pos = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_ends_after_the_first_empty_line() {
        // Goal: CRLF and bare LF separators both end the header; a header with no empty line
        // has no end yet, however long it is.
        assert_eq!(header_end(b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\n"), Some(14));
        assert_eq!(header_end(b"A: 1\nB: 2\n\nbody\n"), Some(11));
        assert_eq!(header_end(b"\r\nbody"), Some(2));
        assert_eq!(header_end(b"A: 1\r\nB: 2\r\n"), None);
        assert_eq!(header_end(b"A: 1\r\n\r"), None);
        assert_eq!(header_end(b""), None);
    }
}
