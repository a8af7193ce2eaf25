//! Reading one IMAP command off the wire: a line, and for every literal it announces
//! (`{N}` or the LITERAL+ `{N+}`) the N octets and the line after them, until a line ends
//! without one. The whole command is then parsed at once by imap-codec.
//!
//! Everything is bounded: a line, the literals of an ordinary command, and those of APPEND
//! (the largest message the cluster accepts). A synchronizing literal over the limit is
//! refused before the client sends it; a non-synchronizing one ends the connection, since
//! its octets are already on their way.

use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use service::lines::{read_line, trim_eol, Line};

/// How large a command may grow.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// One line (between literals).
    pub line: usize,
    /// All lines and literals of a command other than APPEND.
    pub command: usize,
    /// All lines and literals of an APPEND.
    pub append: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete command, literals included, CRLF at the end.
    Command(Vec<u8>),
    /// The command was refused before all of it arrived; `tag` is `*` if it could not be read.
    Refused {
        tag: String,
        response: String,
    },
    /// The connection cannot continue (a non-synchronizing literal over the limit).
    Fatal(String),
    Eof,
}

/// The tag of a command line, if it has a well-formed one.
pub fn tag_of(line: &[u8]) -> Option<String> {
    let end = line
        .iter()
        .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
        .unwrap_or(line.len());
    let tag = &line[..end];
    let valid = !tag.is_empty()
        && tag.len() <= 64
        && tag
            .iter()
            .all(|&b| b.is_ascii_graphic() && !b"(){%*\"\\+]".contains(&b));
    valid.then(|| String::from_utf8_lossy(tag).into_owned())
}

/// The literal a line announces at its end: its length and whether it is synchronizing.
fn literal_at_end(line: &[u8]) -> Option<(u64, bool)> {
    let body = line.strip_suffix(b"}")?;
    let open = body.iter().rposition(|&b| b == b'{')?;
    let inside = &body[open + 1..];
    let (digits, sync) = match inside.strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (inside, true),
    };
    if digits.is_empty() || digits.len() > 12 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((n, sync))
}

fn is_append(first_line: &[u8]) -> bool {
    let mut words = first_line.split(|&b| b == b' ');
    let _tag = words.next();
    words
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case(b"APPEND"))
}

/// Reads one command. `io` is the buffered connection: continuation requests for
/// synchronizing literals are written to it (after flushing `pending` responses).
pub async fn read_command<S>(io: &mut S, limits: Limits) -> std::io::Result<Frame>
where
    S: AsyncBufRead + AsyncWrite + Unpin,
{
    let mut command = Vec::new();
    let mut line = Vec::new();
    loop {
        match read_line(io, limits.line, &mut line).await? {
            Line::Eof => return Ok(Frame::Eof),
            Line::TooLong => {
                let first = if command.is_empty() { &line } else { &command };
                let tag = tag_of(first).unwrap_or_else(|| "*".into());
                return Ok(Frame::Refused {
                    tag,
                    response: "BAD command line too long".into(),
                });
            }
            Line::Complete => {}
        }
        command.extend_from_slice(&line);
        let Some((n, sync)) = literal_at_end(trim_eol(&line)) else {
            return Ok(Frame::Command(command));
        };
        let append = is_append(&command);
        let limit = if append {
            limits.append
        } else {
            limits.command
        } as u64;
        if (command.len() as u64).saturating_add(n) > limit {
            if !sync {
                return Ok(Frame::Fatal(format!(
                    "literal of {n} octets is over the limit of {limit}"
                )));
            }
            let tag = tag_of(&command).unwrap_or_else(|| "*".into());
            let response = if append {
                format!("NO [TOOBIG] the message is larger than the limit of {limit} octets")
            } else {
                format!("BAD literal of {n} octets is over the limit of {limit}")
            };
            return Ok(Frame::Refused { tag, response });
        }
        if sync {
            io.write_all(b"+ go ahead\r\n").await?;
            io.flush().await?;
        }
        let start = command.len();
        command.resize(start + n as usize, 0);
        io.read_exact(&mut command[start..]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory connection: reads from `input`, records what is written.
    struct Duplex {
        input: std::io::Cursor<Vec<u8>>,
        written: Vec<u8>,
    }

    impl tokio::io::AsyncRead for Duplex {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.input).poll_read(cx, buf)
        }
    }

    impl AsyncBufRead for Duplex {
        fn poll_fill_buf(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<&[u8]>> {
            std::pin::Pin::new(&mut self.get_mut().input).poll_fill_buf(cx)
        }
        fn consume(mut self: std::pin::Pin<&mut Self>, amt: usize) {
            std::pin::Pin::new(&mut self.input).consume(amt)
        }
    }

    impl AsyncWrite for Duplex {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.written.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn duplex(input: &[u8]) -> Duplex {
        Duplex {
            input: std::io::Cursor::new(input.to_vec()),
            written: Vec::new(),
        }
    }

    const LIMITS: Limits = Limits {
        line: 100,
        command: 200,
        append: 1000,
    };

    // Goal: literals are read with a continuation request only when synchronizing, and the
    // command comes out whole.
    #[tokio::test]
    async fn literals_are_framed() {
        let mut io = duplex(b"a LOGIN {3}\r\nbob {2+}\r\npw\r\nb NOOP\r\n");
        let frame = read_command(&mut io, LIMITS).await.unwrap();
        assert_eq!(
            frame,
            Frame::Command(b"a LOGIN {3}\r\nbob {2+}\r\npw\r\n".to_vec())
        );
        assert_eq!(io.written, b"+ go ahead\r\n");
        let next = read_command(&mut io, LIMITS).await.unwrap();
        assert_eq!(next, Frame::Command(b"b NOOP\r\n".to_vec()));
        assert_eq!(read_command(&mut io, LIMITS).await.unwrap(), Frame::Eof);
    }

    // Goal: a 2 GB announcement costs nothing: refused before the data (synchronizing), or
    // the connection ends (non-synchronizing); APPEND gets a larger limit and TOOBIG.
    #[tokio::test]
    async fn oversized_literals_are_refused() {
        let mut io = duplex(b"t1 SEARCH TEXT {2000000000}\r\n");
        let Frame::Refused { tag, response } = read_command(&mut io, LIMITS).await.unwrap() else {
            panic!()
        };
        assert_eq!(tag, "t1");
        assert!(response.starts_with("BAD"), "{response}");
        assert!(io.written.is_empty());
        let mut input = b"t2 APPEND INBOX {900}\r\n".to_vec();
        input.extend_from_slice(&[b'x'; 900]);
        input.extend_from_slice(b"\r\n");
        let mut io = duplex(&input);
        assert_eq!(
            read_command(&mut io, LIMITS).await.unwrap(),
            Frame::Command(input.clone())
        );
        let mut io = duplex(b"t3 APPEND INBOX {2000}\r\n");
        let Frame::Refused { response, .. } = read_command(&mut io, LIMITS).await.unwrap() else {
            panic!()
        };
        assert!(response.starts_with("NO [TOOBIG]"), "{response}");
        let mut io = duplex(b"t4 APPEND INBOX {2000000000+}\r\n");
        assert!(matches!(
            read_command(&mut io, LIMITS).await.unwrap(),
            Frame::Fatal(_)
        ));
        let mut io = duplex(&[b'x'; 300]);
        assert!(matches!(
            read_command(&mut io, LIMITS).await.unwrap(),
            Frame::Eof | Frame::Refused { .. }
        ));
    }

    #[test]
    fn tags_and_announcements() {
        assert_eq!(tag_of(b"a1 NOOP\r\n").as_deref(), Some("a1"));
        assert_eq!(tag_of(b"* NOOP"), None);
        assert_eq!(literal_at_end(b"a LOGIN {12}"), Some((12, true)));
        assert_eq!(literal_at_end(b"a LOGIN {12+}"), Some((12, false)));
        assert_eq!(literal_at_end(b"a LOGIN {x}"), None);
        assert_eq!(literal_at_end(b"a LOGIN \"{1}\""), None);
    }
}
