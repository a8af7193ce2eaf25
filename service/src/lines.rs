//! Bounded line reading for the text protocols (SMTP now; IMAP and POP3 use it too). A line
//! longer than the limit is read to its end and discarded, so one oversized line costs the
//! sender a protocol error, never our memory.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A whole line, its terminating LF (and CR, if any) included, in the caller's buffer.
    Complete,
    /// The line was longer than the limit; it was read and thrown away.
    TooLong,
    /// The peer closed the connection (a partial last line is dropped).
    Eof,
}

/// Reads one line into `out` (cleared first), holding at most `max` bytes of it; of a line
/// that is too long, `out` keeps the first `max` bytes.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
    out: &mut Vec<u8>,
) -> std::io::Result<Line> {
    out.clear();
    continue_line(reader, max, out).await
}

/// Like [`read_line`] but keeps what `out` already holds: a caller whose read was cancelled
/// (a `select!` that took another branch) resumes the same line without losing its start.
pub async fn continue_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
    out: &mut Vec<u8>,
) -> std::io::Result<Line> {
    let mut too_long = out.len() > max;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(Line::Eof);
        }
        let (take, complete) = match memchr_lf(buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if !too_long {
            if out.len() + take > max {
                // Keep what fits: callers may still want the start (an IMAP tag).
                too_long = true;
                let room = max - out.len();
                out.extend_from_slice(&buf[..room]);
            } else {
                out.extend_from_slice(&buf[..take]);
            }
        }
        reader.consume(take);
        if complete {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete
            });
        }
    }
}

fn memchr_lf(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

/// The line without its line ending.
pub fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: lines come out whole, an oversized one is skipped entirely, and the next line
    // after it is intact.
    #[tokio::test]
    async fn bounded_lines() {
        let input: &[u8] = b"EHLO a\r\nXXXXXXXXXXXXXXXXXXXX\r\nQUIT\r\npartial";
        let mut r = tokio::io::BufReader::with_capacity(4, input);
        let mut line = Vec::new();
        assert_eq!(
            read_line(&mut r, 10, &mut line).await.unwrap(),
            Line::Complete
        );
        assert_eq!(line, b"EHLO a\r\n");
        assert_eq!(
            read_line(&mut r, 10, &mut line).await.unwrap(),
            Line::TooLong
        );
        assert_eq!(
            read_line(&mut r, 10, &mut line).await.unwrap(),
            Line::Complete
        );
        assert_eq!(trim_eol(&line), b"QUIT");
        assert_eq!(read_line(&mut r, 10, &mut line).await.unwrap(), Line::Eof);
    }

    // Goal: a line whose read was interrupted after its first bytes resumes intact.
    #[tokio::test]
    async fn resumed_line_keeps_its_start() {
        let mut r = tokio::io::BufReader::new(&b"NE\r\nnext\r\n"[..]);
        let mut line = b"DO".to_vec();
        assert_eq!(
            continue_line(&mut r, 10, &mut line).await.unwrap(),
            Line::Complete
        );
        assert_eq!(trim_eol(&line), b"DONE");
    }
}
