//! Container logs in the CRI format, forwarded from the agent's output buffers.
//!
//! Every line of a log file is `<RFC3339Nano UTC timestamp> <stdout|stderr> <P|F> <text>\n`:
//! `F` ends a line, `P` is a part of a line that continues in the next entry (a chunk that did
//! not end with a newline). Kubelet joins `P` entries up to the next `F`.
//!
//! One forwarder thread per stream long-polls `ReadStream` and appends each chunk before it
//! reads the next one. `ReadStream` removes what it returns from the agent's buffer, so what
//! hyperd has not read yet survives a hyperd restart (the agent buffers up to
//! [`protocol::MAX_STREAM_BUFFER`] per stream), and at most one chunk
//! ([`protocol::MAX_READ_STREAM_LEN`] bytes) can be lost: the one in flight if hyperd dies
//! between receiving it and writing it. Writes go to the page cache at once (readers such as
//! `kubectl logs -f` see them immediately); the file is fsynced at most every
//! [`SYNC_INTERVAL`] and when the stream ends.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Result, SandboxError};
use crate::lock;

/// How often a log file is fsynced while output flows.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(5);

/// A container output stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl LogStream {
    /// The name in the CRI format.
    pub fn name(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

/// Unix nanoseconds as Go's `time.RFC3339Nano` in UTC: `2006-01-02T15:04:05.999999999Z`
/// (trailing zeros of the fraction dropped, no fraction when it is zero), as containerd writes.
pub fn rfc3339_nano(unix_nanos: i64) -> String {
    let secs = unix_nanos.div_euclid(1_000_000_000);
    let nanos = unix_nanos.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let mut out = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    );
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Appends the CRI entries of one chunk to `out`: one `F` entry per newline-terminated line,
/// and a `P` entry for a trailing part without newline.
pub fn format_cri(timestamp: &str, stream: LogStream, chunk: &[u8], out: &mut Vec<u8>) {
    let mut rest = chunk;
    while !rest.is_empty() {
        let (line, tag, next) = match rest.iter().position(|b| *b == b'\n') {
            Some(i) => (&rest[..i], b'F', &rest[i + 1..]),
            None => (rest, b'P', &rest[rest.len()..]),
        };
        out.extend_from_slice(timestamp.as_bytes());
        out.push(b' ');
        out.extend_from_slice(stream.name().as_bytes());
        out.push(b' ');
        out.push(tag);
        out.push(b' ');
        out.extend_from_slice(line);
        out.push(b'\n');
        rest = next;
    }
}

/// A container's log file, shared by its two forwarders and reopened after log rotation.
///
/// With a cursor file, every write is followed by a record of how far each stream has been
/// written and how long the log then was (24 bytes at offset 0 of `<container>.logpos`). The
/// forwarders read with acknowledged reads from those offsets, so the agent keeps a chunk
/// until a later read says it is stored. A host killed between writing a chunk and recording
/// it leaves the log longer than recorded: the next open cuts that tail off and the chunk is
/// read again. So no byte is lost or doubled, whatever moment hyperd dies at.
pub struct LogWriter {
    path: PathBuf,
    file: Option<File>,
    last_sync: Instant,
    dirty: bool,
    cursor: Option<Cursor>,
}

/// Where the log forwarding stands (see [`LogWriter`]).
struct Cursor {
    file: File,
    path: PathBuf,
    /// Stream offsets written to the log: stdout, stderr.
    offsets: [u64; 2],
    /// The log's length after the last recorded write.
    log_len: u64,
}

impl Cursor {
    const LEN: usize = 24;

    fn store(&self) -> std::io::Result<()> {
        let mut buf = [0u8; Self::LEN];
        buf[..8].copy_from_slice(&self.offsets[0].to_le_bytes());
        buf[8..16].copy_from_slice(&self.offsets[1].to_le_bytes());
        buf[16..].copy_from_slice(&self.log_len.to_le_bytes());
        std::os::unix::fs::FileExt::write_all_at(&self.file, &buf, 0)
    }
}

fn stream_index(stream: LogStream) -> usize {
    match stream {
        LogStream::Stdout => 0,
        LogStream::Stderr => 1,
    }
}

fn open_log(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(SandboxError::io("creating log directory", dir))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(SandboxError::io("opening log", path))
}

impl LogWriter {
    /// Opens (creates, appends to) the log file.
    pub fn open(path: &Path) -> Result<LogWriter> {
        Ok(LogWriter {
            path: path.to_path_buf(),
            file: Some(open_log(path)?),
            last_sync: Instant::now(),
            dirty: false,
            cursor: None,
        })
    }

    /// Opens the log file with the cursor at `cursor_path` (created when missing: a new
    /// container starts at offset 0). A log longer than the cursor recorded ends with a chunk
    /// whose write was never recorded: that tail is cut off, and [`LogWriter::offset`] says to
    /// read it again. A log shorter than recorded was rotated or removed; it is kept.
    pub fn open_with_cursor(path: &Path, cursor_path: &Path) -> Result<LogWriter> {
        let mut w = LogWriter::open(path)?;
        let cfile = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(cursor_path)
            .map_err(SandboxError::io("opening log cursor", cursor_path))?;
        let mut buf = [0u8; Cursor::LEN];
        let stored = std::os::unix::fs::FileExt::read_exact_at(&cfile, &mut buf, 0).is_ok();
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let log_len = w.len()?;
        let mut cursor = Cursor {
            file: cfile,
            path: cursor_path.to_path_buf(),
            offsets: [0, 0],
            log_len,
        };
        if stored {
            cursor.offsets = [word(0), word(1)];
            let recorded = word(2);
            if log_len > recorded {
                log::info!(
                    "{}: cutting {} bytes written after the last recorded position; they are read again",
                    path.display(),
                    log_len - recorded
                );
                if let Some(f) = w.file.as_ref() {
                    f.set_len(recorded)
                        .map_err(SandboxError::io("truncating log", path))?;
                }
                cursor.log_len = recorded;
            }
        }
        cursor
            .store()
            .map_err(SandboxError::io("writing log cursor", cursor_path))?;
        w.cursor = Some(cursor);
        Ok(w)
    }

    /// The stream offset to read `stream` from: everything before it is in the log.
    pub fn offset(&self, stream: LogStream) -> u64 {
        self.cursor
            .as_ref()
            .map_or(0, |c| c.offsets[stream_index(stream)])
    }

    fn len(&self) -> Result<u64> {
        match self.file.as_ref() {
            Some(f) => Ok(f
                .metadata()
                .map_err(SandboxError::io("stat of log", &self.path))?
                .len()),
            None => Ok(0),
        }
    }

    /// Appends one chunk of `stream`, timestamped now.
    pub fn write_chunk(&mut self, stream: LogStream, chunk: &[u8]) -> Result<()> {
        let mut buf = Vec::with_capacity(chunk.len() + 64);
        format_cri(&rfc3339_nano(crate::now_nanos()), stream, chunk, &mut buf);
        self.write_raw(&buf)
    }

    /// Appends the chunk of `stream` that ends at stream offset `end`, then records the
    /// position in the cursor (when there is one).
    pub fn write_chunk_at(&mut self, stream: LogStream, chunk: &[u8], end: u64) -> Result<()> {
        self.write_chunk(stream, chunk)?;
        self.advance(stream, end)
    }

    /// Records that `stream` is in the log up to `end` (bytes the agent dropped are skipped
    /// this way too).
    pub fn advance(&mut self, stream: LogStream, end: u64) -> Result<()> {
        let log_len = self.len()?;
        if let Some(c) = self.cursor.as_mut() {
            c.offsets[stream_index(stream)] = end;
            c.log_len = log_len;
            c.store()
                .map_err(SandboxError::io("writing log cursor", &c.path))?;
        }
        Ok(())
    }

    fn write_raw(&mut self, buf: &[u8]) -> Result<()> {
        if self.file.is_none() {
            // A failed reopen earlier: try again.
            self.file = Some(open_log(&self.path)?);
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        file.write_all(buf)
            .map_err(SandboxError::io("writing log", &self.path))?;
        self.dirty = true;
        if self.last_sync.elapsed() >= SYNC_INTERVAL {
            self.sync();
        }
        Ok(())
    }

    /// fsyncs pending writes.
    pub fn sync(&mut self) {
        if let (true, Some(f)) = (self.dirty, self.file.as_ref()) {
            if let Err(e) = f.sync_data() {
                log::warn!("fsync of {} failed: {e}", self.path.display());
            }
        }
        self.dirty = false;
        self.last_sync = Instant::now();
    }

    /// Closes and reopens the file (after the log was rotated: renamed away).
    pub fn reopen(&mut self) -> Result<()> {
        self.sync();
        self.file = None;
        self.file = Some(open_log(&self.path)?);
        let log_len = self.len()?;
        if let Some(c) = self.cursor.as_mut() {
            c.log_len = log_len;
            c.store()
                .map_err(SandboxError::io("writing log cursor", &c.path))?;
        }
        Ok(())
    }
}

/// What one read of a stream returned.
#[derive(Debug, Default)]
pub struct StreamChunk {
    /// Output.
    pub data: Vec<u8>,
    /// The stream is closed and drained.
    pub eof: bool,
    /// Bytes the agent dropped so far (its buffer overflowed).
    pub dropped: u64,
    /// Acknowledged read: the stream offset of `data[0]`.
    pub offset: u64,
    /// The agent honoured the acknowledged read (protocol 5); false: it consumed `data`.
    pub acknowledged: bool,
}

/// Why a stream read failed.
#[derive(Debug)]
pub enum ReadFailure {
    /// The container is gone from the agent: nothing more to read.
    Gone,
    /// Try again later (connection lost, VM busy).
    Retry(String),
}

/// The forwarders of one container: stop flag and completion.
#[derive(Default)]
pub struct Forwarders {
    stop: AtomicBool,
    /// Streams finished (EOF, gone or stopped).
    done: Mutex<u8>,
    done_cv: Condvar,
    streams: u8,
}

impl Forwarders {
    /// Forwarders for `streams` streams.
    pub fn new(streams: u8) -> Arc<Forwarders> {
        Arc::new(Forwarders {
            streams,
            ..Forwarders::default()
        })
    }

    /// Asks the forwarders to stop after their current read.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether stopping was asked.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn finished(&self) {
        *lock(&self.done) += 1;
        self.done_cv.notify_all();
    }

    /// Waits until every stream reached its end, at most `timeout`. True when they did.
    pub fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut done = lock(&self.done);
        while *done < self.streams {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            done = self
                .done_cv
                .wait_timeout(done, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// The body of a forwarder thread: reads `stream` with `read` (given the stream offset to read
/// from, everything before it being in the log) and appends to `writer` until EOF, until the
/// container is gone, or until `fwd` or `shutdown` says stop.
pub fn forward(
    stream: LogStream,
    writer: &Mutex<LogWriter>,
    fwd: &Forwarders,
    shutdown: &AtomicBool,
    mut read: impl FnMut(u64) -> std::result::Result<StreamChunk, ReadFailure>,
) {
    let mut offset = lock(writer).offset(stream);
    let mut dropped = 0;
    let mut failures = 0u32;
    while !fwd.stopping() && !shutdown.load(Ordering::SeqCst) {
        match read(offset) {
            Ok(chunk) => {
                failures = 0;
                if chunk.acknowledged {
                    // The agent is not trusted: data starting before `offset` overlaps what
                    // the log has, and only its new part is written.
                    let overlap = offset.saturating_sub(chunk.offset);
                    let data = chunk
                        .data
                        .get(usize::try_from(overlap).unwrap_or(usize::MAX)..)
                        .unwrap_or_default();
                    let start = chunk.offset.max(offset);
                    if start > offset {
                        log::warn!(
                            "{} lost {} bytes: the agent's buffer overflowed before they were read",
                            stream.name(),
                            start - offset
                        );
                    }
                    let end = start.saturating_add(data.len() as u64);
                    let stored = if data.is_empty() {
                        if start > offset {
                            lock(writer).advance(stream, end)
                        } else {
                            Ok(())
                        }
                    } else {
                        lock(writer).write_chunk_at(stream, data, end)
                    };
                    match stored {
                        Ok(()) => offset = end,
                        // Not acknowledged: the agent keeps the chunk and it is read again.
                        Err(e) => {
                            log::warn!("{e}");
                            std::thread::sleep(Duration::from_millis(200));
                            continue;
                        }
                    }
                } else {
                    // An agent older than protocol 5 consumed the chunk.
                    if !chunk.data.is_empty() {
                        if let Err(e) = lock(writer).write_chunk(stream, &chunk.data) {
                            log::warn!("{e}");
                        }
                    }
                    if chunk.dropped > dropped {
                        log::warn!(
                            "{} lost {} bytes: the agent's buffer overflowed before they were read",
                            stream.name(),
                            chunk.dropped - dropped
                        );
                        dropped = chunk.dropped;
                    }
                }
                if chunk.eof {
                    break;
                }
            }
            Err(ReadFailure::Gone) => break,
            Err(ReadFailure::Retry(why)) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    log::debug!("reading {}: {why}", stream.name());
                }
                std::thread::sleep(Duration::from_millis(200).saturating_mul(failures.min(10)));
            }
        }
    }
    lock(writer).sync();
    fwd.finished();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_nano_utc() {
        assert_eq!(rfc3339_nano(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_nano(1_475_713_029_669_794_202),
            "2016-10-06T00:17:09.669794202Z"
        );
        // Trailing zeros are dropped, as Go's RFC3339Nano does.
        assert_eq!(
            rfc3339_nano(1_475_713_029_500_000_000),
            "2016-10-06T00:17:09.5Z"
        );
        assert_eq!(
            rfc3339_nano(951_782_400_000_000_001),
            "2000-02-29T00:00:00.000000001Z"
        );
        assert_eq!(
            rfc3339_nano(4_102_444_799_000_000_000),
            "2099-12-31T23:59:59Z"
        );
        assert_eq!(rfc3339_nano(-1_000_000_000), "1969-12-31T23:59:59Z");
    }

    fn cri(chunk: &[u8]) -> String {
        let mut out = Vec::new();
        format_cri("T", LogStream::Stdout, chunk, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn full_and_partial_lines() {
        assert_eq!(cri(b""), "");
        assert_eq!(cri(b"hi\n"), "T stdout F hi\n");
        assert_eq!(cri(b"a\nb\n"), "T stdout F a\nT stdout F b\n");
        assert_eq!(cri(b"a\nbc"), "T stdout F a\nT stdout P bc\n");
        assert_eq!(cri(b"abc"), "T stdout P abc\n");
        assert_eq!(cri(b"\n\n"), "T stdout F \nT stdout F \n");
        let mut out = Vec::new();
        format_cri("T", LogStream::Stderr, b"x y\n", &mut out);
        assert_eq!(out, b"T stderr F x y\n");
    }

    #[test]
    fn forwarder_writes_until_eof_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/c.log");
        let writer = Mutex::new(LogWriter::open(&path).unwrap());
        let fwd = Forwarders::new(1);
        let shutdown = AtomicBool::new(false);
        let mut chunks = vec![
            Ok(StreamChunk {
                data: b"one\ntw".to_vec(),
                ..StreamChunk::default()
            }),
            Err(ReadFailure::Retry("busy".into())),
            Ok(StreamChunk {
                data: b"o\n".to_vec(),
                eof: true,
                ..StreamChunk::default()
            }),
        ]
        .into_iter();
        forward(LogStream::Stdout, &writer, &fwd, &shutdown, |_| {
            chunks.next().unwrap_or(Err(ReadFailure::Gone))
        });
        assert!(fwd.wait_drained(Duration::ZERO));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let parts: Vec<Vec<&str>> = lines.iter().map(|l| l.splitn(4, ' ').collect()).collect();
        assert_eq!(parts[0][1..], ["stdout", "F", "one"]);
        assert_eq!(parts[1][1..], ["stdout", "P", "tw"]);
        assert_eq!(parts[2][1..], ["stdout", "F", "o"]);
        assert!(parts[0][0].ends_with('Z') && parts[0][0].contains('T'));

        // Rotation: rename the file away, reopen, the next write lands in a new file.
        std::fs::rename(&path, dir.path().join("sub/c.log.1")).unwrap();
        let mut w = writer.into_inner().unwrap();
        w.reopen().unwrap();
        w.write_chunk(LogStream::Stderr, b"after\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with(" stderr F after\n"), "{text}");
    }

    #[test]
    fn forwarder_stops_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Mutex::new(LogWriter::open(&dir.path().join("l")).unwrap());
        let fwd = Forwarders::new(2);
        let shutdown = AtomicBool::new(false);
        assert!(!fwd.wait_drained(Duration::from_millis(10)));
        let mut n = 0;
        forward(LogStream::Stdout, &writer, &fwd, &shutdown, |_| {
            n += 1;
            if n == 3 {
                fwd.stop();
            }
            Ok(StreamChunk::default())
        });
        assert_eq!(n, 3);
        forward(LogStream::Stderr, &writer, &fwd, &shutdown, |_| {
            Err(ReadFailure::Gone)
        });
        assert!(fwd.wait_drained(Duration::ZERO));
    }

    /// A fake agent stream for acknowledged reads: `content` written so far; reads return up
    /// to 4 bytes from the requested offset; `log` records the offsets asked for.
    fn acked_reader<'a>(
        content: &'a [u8],
        asked: &'a mut Vec<u64>,
    ) -> impl FnMut(u64) -> std::result::Result<StreamChunk, ReadFailure> + 'a {
        move |offset| {
            asked.push(offset);
            let start = (offset as usize).min(content.len());
            let end = (start + 4).min(content.len());
            Ok(StreamChunk {
                data: content[start..end].to_vec(),
                eof: start == content.len(),
                offset: start as u64,
                acknowledged: true,
                ..StreamChunk::default()
            })
        }
    }

    fn messages(path: &Path) -> String {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap().to_owned())
            .collect::<Vec<_>>()
            .join("|")
    }

    #[test]
    fn cursor_resumes_without_loss_or_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let (path, cursor) = (dir.path().join("c.log"), dir.path().join("c.logpos"));
        let fwd = Forwarders::new(1);
        let shutdown = AtomicBool::new(false);
        let mut asked = Vec::new();
        // A first hyperd forwards "aaaa\nbb" and stops (its reads acknowledge as they go).
        {
            let writer = Mutex::new(LogWriter::open_with_cursor(&path, &cursor).unwrap());
            let mut read = acked_reader(b"aaaa\nbb", &mut asked);
            let mut n = 0;
            forward(LogStream::Stdout, &writer, &fwd, &shutdown, |o| {
                n += 1;
                if n == 3 {
                    fwd.stop();
                }
                read(o)
            });
        }
        assert_eq!(asked, [0, 4, 7]);
        assert_eq!(messages(&path), "aaaa||bb");
        // It died after writing a chunk but before recording it: simulate the write.
        {
            use std::io::Write;
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(b"2026-01-01T00:00:00Z stdout P cc\n").unwrap();
        }
        // The next hyperd cuts that tail, reads from offset 7 again, and the stream goes on.
        let writer = Mutex::new(LogWriter::open_with_cursor(&path, &cursor).unwrap());
        assert_eq!(writer.lock().unwrap().offset(LogStream::Stdout), 7);
        assert_eq!(writer.lock().unwrap().offset(LogStream::Stderr), 0);
        assert_eq!(messages(&path), "aaaa||bb");
        let mut asked = Vec::new();
        let fwd = Forwarders::new(1);
        forward(
            LogStream::Stdout,
            &writer,
            &fwd,
            &shutdown,
            acked_reader(b"aaaa\nbbcc\n", &mut asked),
        );
        assert_eq!(asked, [7, 10]);
        assert_eq!(messages(&path), "aaaa||bb|cc");
        assert!(fwd.wait_drained(Duration::ZERO));
    }

    #[test]
    fn hostile_offsets_neither_repeat_nor_stall() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let writer = Mutex::new(LogWriter::open_with_cursor(&path, &dir.path().join("p")).unwrap());
        let fwd = Forwarders::new(1);
        let shutdown = AtomicBool::new(false);
        let mut replies = vec![
            // Offset 0 again and again: only new bytes count.
            (b"abc\n".to_vec(), 0, false),
            (b"abc\nde\n".to_vec(), 0, false),
            // A gap (dropped bytes) then data far ahead, then EOF.
            (b"z\n".to_vec(), u64::MAX - 2, false),
            (Vec::new(), u64::MAX, true),
        ]
        .into_iter();
        let mut asked = Vec::new();
        forward(LogStream::Stdout, &writer, &fwd, &shutdown, |o| {
            asked.push(o);
            let (data, offset, eof) = replies.next().ok_or(ReadFailure::Gone)?;
            Ok(StreamChunk {
                data,
                offset,
                eof,
                acknowledged: true,
                ..StreamChunk::default()
            })
        });
        assert_eq!(asked, [0, 4, 7, u64::MAX]);
        assert_eq!(messages(&path), "abc|de|z");
    }
}
