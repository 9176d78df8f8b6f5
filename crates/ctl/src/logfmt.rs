//! The CRI container log format, as kubelet reads it:
//!
//! ```text
//! 2016-10-06T00:17:09.669794202Z stdout F a complete line
//! 2016-10-06T00:17:09.669794203Z stderr P the first part of a long line,
//! 2016-10-06T00:17:09.669794204Z stderr F and its end
//! ```
//!
//! Each line is `<RFC3339Nano timestamp> <stream> <tags> <message>`; the first tag is `P` (partial: the
//! message continues in the next line of the same stream) or `F` (full: the message ends here and had a
//! newline). [`LogDecoder`] takes the file's bytes in arbitrary chunks and yields whole messages, with the
//! partial pieces of each stream joined.

use std::fmt;

/// Which output of the container a message came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        })
    }
}

/// One parsed line of a log file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogLine<'a> {
    pub timestamp: &'a str,
    pub stream: Stream,
    /// `P`: the message continues on the next line of this stream.
    pub partial: bool,
    pub message: &'a [u8],
}

/// Why a line is not in the CRI log format.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LogFormatError {
    /// The timestamp is missing or is not RFC 3339.
    #[error("the line does not start with an RFC 3339 timestamp")]
    Timestamp,
    /// The stream is neither `stdout` nor `stderr`.
    #[error("the stream is not stdout or stderr")]
    Stream,
    /// The tags are missing, or the first is neither `P` nor `F`.
    #[error("the tags are missing or do not start with P or F")]
    Tags,
}

/// Parses one line, without its trailing newline (a trailing `\r` is kept: it belongs to the message).
pub fn parse_line(line: &[u8]) -> Result<LogLine<'_>, LogFormatError> {
    let (ts, rest) = split_space(line).ok_or(LogFormatError::Timestamp)?;
    let timestamp = std::str::from_utf8(ts).map_err(|_| LogFormatError::Timestamp)?;
    if !is_rfc3339(timestamp) {
        return Err(LogFormatError::Timestamp);
    }
    let (stream, rest) = split_space(rest).ok_or(LogFormatError::Stream)?;
    let stream = match stream {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return Err(LogFormatError::Stream),
    };
    // The tags end at the next space; a line that ends right after its tags has an empty message.
    let (tags, message) = split_space(rest).unwrap_or((rest, &[]));
    let first = tags.split(|&b| b == b':').next().unwrap_or_default();
    let partial = match first {
        b"P" => true,
        b"F" => false,
        _ => return Err(LogFormatError::Tags),
    };
    Ok(LogLine {
        timestamp,
        stream,
        partial,
        message,
    })
}

fn split_space(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|&b| b == b' ')?;
    Some((&s[..i], &s[i + 1..]))
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, checked by shape (the runtime wrote it; we only need to tell a
/// log line from garbage).
fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 20 {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if !(digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && matches!(b[10], b'T' | b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19))
    {
        return false;
    }
    let mut rest = &b[19..];
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()),
        _ => false,
    }
}

/// A whole message: one `F` line, or `P` lines joined with the `F` line that ends them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The timestamp of the message's first line.
    pub timestamp: String,
    pub stream: Stream,
    /// The message without its newline.
    pub message: Vec<u8>,
    /// False when the message never got its `F` line (the log ended, or the message grew past the
    /// decoder's limit): it had no newline, so none should be printed.
    pub complete: bool,
}

impl Record {
    /// The bytes to print: the message, plus the newline that a complete message had.
    pub fn output(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.message.len() + 1);
        out.extend_from_slice(&self.message);
        if self.complete {
            out.push(b'\n');
        }
        out
    }
}

/// The most a joined message may hold before it is handed out as an incomplete record (a container that
/// writes without newlines must not grow hyperctl's memory without bound).
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;

/// Turns a log file's bytes, fed in any chunks, into [`Record`]s.
#[derive(Debug)]
pub struct LogDecoder {
    /// Bytes of a line whose newline has not arrived yet.
    line: Vec<u8>,
    /// The joined partial message of each stream (stdout, stderr).
    pending: [Option<Record>; 2],
    malformed: u64,
    max_message: usize,
}

impl Default for LogDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl LogDecoder {
    pub fn new() -> Self {
        Self::with_max_message(DEFAULT_MAX_MESSAGE)
    }

    /// A decoder that hands out joined messages once they reach `max_message` bytes.
    pub fn with_max_message(max_message: usize) -> Self {
        LogDecoder {
            line: Vec::new(),
            pending: [None, None],
            malformed: 0,
            max_message: max_message.max(1),
        }
    }

    /// How many malformed lines were skipped so far.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Feeds the next bytes of the file; returns the messages they complete, in file order.
    pub fn feed(&mut self, mut data: &[u8]) -> Vec<Record> {
        let mut out = Vec::new();
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            if self.line.is_empty() {
                self.line_done(&data[..nl], &mut out);
            } else {
                self.line.extend_from_slice(&data[..nl]);
                let line = std::mem::take(&mut self.line);
                self.line_done(&line, &mut out);
            }
            data = &data[nl + 1..];
        }
        self.line.extend_from_slice(data);
        // A "line" that never ends is not a log line: bound it like a message.
        if self.line.len() > self.max_message.saturating_mul(2).max(64 * 1024) {
            self.line.clear();
            self.malformed += 1;
        }
        out
    }

    /// The log has ended (the container exited and its output is drained): parses a last unterminated line
    /// and hands out the partial messages still waiting for their end.
    pub fn finish(&mut self) -> Vec<Record> {
        let mut out = Vec::new();
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, &mut out);
        }
        for slot in &mut self.pending {
            if let Some(r) = slot.take() {
                out.push(r);
            }
        }
        out
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<Record>) {
        let parsed = match parse_line(line) {
            Ok(l) => l,
            Err(_) => {
                // kubelet skips an empty line silently (a crashed writer's leftover newline)
                if !line.is_empty() {
                    self.malformed += 1;
                }
                return;
            }
        };
        let slot = &mut self.pending[parsed.stream as usize];
        let record = match slot.take() {
            Some(mut r) => {
                r.message.extend_from_slice(parsed.message);
                r
            }
            None => Record {
                timestamp: parsed.timestamp.to_string(),
                stream: parsed.stream,
                message: parsed.message.to_vec(),
                complete: false,
            },
        };
        if !parsed.partial {
            out.push(Record {
                complete: true,
                ..record
            });
        } else if record.message.len() >= self.max_message {
            out.push(record);
        } else {
            *slot = Some(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TS: &str = "2024-05-01T10:00:00.123456789Z";

    fn line(stream: &str, tag: &str, msg: &str) -> String {
        format!("{TS} {stream} {tag} {msg}\n")
    }

    fn texts(records: &[Record]) -> Vec<(Stream, String, bool)> {
        records
            .iter()
            .map(|r| {
                (
                    r.stream,
                    String::from_utf8_lossy(&r.message).into_owned(),
                    r.complete,
                )
            })
            .collect()
    }

    #[test]
    fn parses_a_full_line() {
        let l = parse_line(b"2016-10-06T00:17:09.669794202Z stdout F hello world").unwrap();
        assert_eq!(l.timestamp, "2016-10-06T00:17:09.669794202Z");
        assert_eq!(l.stream, Stream::Stdout);
        assert!(!l.partial);
        assert_eq!(l.message, b"hello world");
    }

    #[test]
    fn message_keeps_spaces_and_may_be_empty() {
        let message = |line: String| parse_line(line.as_bytes()).unwrap().message.to_vec();
        assert_eq!(
            message(format!("{TS} stderr F   two  spaces ")),
            b"  two  spaces "
        );
        assert_eq!(message(format!("{TS} stdout F ")), b"");
        assert_eq!(message(format!("{TS} stdout F")), b"");
    }

    #[test]
    fn extra_tags_and_offsets() {
        let text = format!("{TS} stdout P:x:y part");
        let l = parse_line(text.as_bytes()).unwrap();
        assert!(l.partial);
        assert_eq!(l.message, b"part");
        assert!(parse_line(b"2024-05-01T10:00:00+02:00 stdout F x").is_ok());
        assert!(parse_line(b"2024-05-01T10:00:00Z stdout F x").is_ok());
    }

    #[test]
    fn malformed_lines() {
        for bad in [
            "",
            "hello",
            "not-a-time stdout F x",
            "2024-05-01 10:00:00Z stdout F x",
            "2024-05-01T10:00:00.Z stdout F x",
            "2024-05-01T10:00:00 stdout F x",
            "2024-05-01T10:00:00Zjunk stdout F x",
            &format!("{TS} stdin F x"),
            &format!("{TS} stdout"),
            &format!("{TS} stdout X x"),
            &format!("{TS} stdout  F x"),
            &format!("{TS} stdout PF x"),
        ] {
            assert!(parse_line(bad.as_bytes()).is_err(), "'{bad}' parsed");
        }
        assert_eq!(
            parse_line(format!("{TS} stdin F x").as_bytes()),
            Err(LogFormatError::Stream)
        );
        assert_eq!(
            parse_line(format!("{TS} stdout Q x").as_bytes()),
            Err(LogFormatError::Tags)
        );
    }

    #[test]
    fn joins_partials_per_stream() {
        let mut d = LogDecoder::new();
        let input = [
            line("stdout", "P", "hel"),
            line("stderr", "P", "err-"),
            line("stdout", "P", "lo "),
            line("stderr", "F", "done"),
            line("stdout", "F", "world"),
            line("stdout", "F", "second"),
        ]
        .concat();
        let out = d.feed(input.as_bytes());
        assert_eq!(
            texts(&out),
            vec![
                (Stream::Stderr, "err-done".into(), true),
                (Stream::Stdout, "hello world".into(), true),
                (Stream::Stdout, "second".into(), true),
            ]
        );
        assert_eq!(out[1].output(), b"hello world\n");
        assert!(d.finish().is_empty());
        assert_eq!(d.malformed(), 0);
    }

    #[test]
    fn any_chunking_gives_the_same_records() {
        let input = [
            line("stdout", "F", "one"),
            line("stderr", "P", "two-"),
            "garbage line\n".to_string(),
            line("stderr", "F", "three"),
            line("stdout", "F", "ünïcödé"),
        ]
        .concat();
        let whole = {
            let mut d = LogDecoder::new();
            let mut r = d.feed(input.as_bytes());
            r.extend(d.finish());
            r
        };
        assert_eq!(whole.len(), 3);
        for size in 1..input.len() {
            let mut d = LogDecoder::new();
            let mut got = Vec::new();
            for chunk in input.as_bytes().chunks(size) {
                got.extend(d.feed(chunk));
            }
            got.extend(d.finish());
            assert_eq!(got, whole, "chunk size {size}");
            assert_eq!(d.malformed(), 1);
        }
    }

    #[test]
    fn malformed_lines_are_skipped_and_counted() {
        let mut d = LogDecoder::new();
        let input = format!(
            "oops\n\n{}{TS} stdout Z x\n{}",
            line("stdout", "F", "a"),
            line("stderr", "F", "b")
        );
        let out = d.feed(input.as_bytes());
        assert_eq!(
            texts(&out),
            vec![
                (Stream::Stdout, "a".into(), true),
                (Stream::Stderr, "b".into(), true)
            ]
        );
        assert_eq!(d.malformed(), 2);
    }

    #[test]
    fn finish_flushes_unterminated_input() {
        let mut d = LogDecoder::new();
        let input = format!("{}{TS} stdout F last", line("stderr", "P", "half"));
        assert!(d.feed(input.as_bytes()).is_empty());
        let out = d.finish();
        assert_eq!(
            texts(&out),
            vec![
                (Stream::Stdout, "last".into(), true),
                (Stream::Stderr, "half".into(), false)
            ]
        );
        assert_eq!(out[1].output(), b"half");
        assert!(d.finish().is_empty());
    }

    #[test]
    fn long_partial_messages_are_bounded() {
        let mut d = LogDecoder::with_max_message(8);
        let input = [
            line("stdout", "P", "12345"),
            line("stdout", "P", "6789"),
            line("stdout", "F", "end"),
        ]
        .concat();
        let out = d.feed(input.as_bytes());
        assert_eq!(
            texts(&out),
            vec![
                (Stream::Stdout, "123456789".into(), false),
                (Stream::Stdout, "end".into(), true)
            ]
        );
    }

    #[test]
    fn first_timestamp_is_kept() {
        let mut d = LogDecoder::new();
        let out = d.feed(b"2024-01-01T00:00:00Z stdout P a\n2024-01-01T00:00:01Z stdout F b\n");
        assert_eq!(out[0].timestamp, "2024-01-01T00:00:00Z");
    }
}
