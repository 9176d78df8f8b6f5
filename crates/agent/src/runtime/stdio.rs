//! Container output: a bounded buffer per stream, filled by a reader thread from the pipe.
//!
//! Output stays in the agent until a host reader takes it, so a restarting host loses nothing
//! short of overflow. When a buffer is full the oldest bytes are dropped and counted.
//!
//! Two ways to read: [`StreamBuffer::take`] consumes what it returns; [`StreamBuffer::read_from`]
//! (acknowledged reads) forgets only the bytes before the offset the reader names and returns
//! the rest without consuming it, so a reader that dies before storing a chunk gets it again.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// What [`StreamBuffer::take`] returns.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    pub data: Vec<u8>,
    /// The writer is gone and the buffer is drained.
    pub eof: bool,
    /// Bytes dropped so far because the buffer was full.
    pub dropped: u64,
    /// The stream offset of `data[0]`.
    pub offset: u64,
}

#[derive(Debug, Default)]
struct Ring {
    buf: VecDeque<u8>,
    /// The stream offset of `buf[0]`: every byte ever pushed counts.
    start: u64,
    dropped: u64,
    closed: bool,
}

/// A bounded byte buffer between a pipe reader and RPC readers.
#[derive(Debug)]
pub struct StreamBuffer {
    capacity: usize,
    ring: Mutex<Ring>,
    readable: Condvar,
}

impl StreamBuffer {
    pub fn new(capacity: usize) -> Arc<StreamBuffer> {
        Arc::new(StreamBuffer {
            capacity,
            ring: Mutex::new(Ring::default()),
            readable: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends output, dropping the oldest bytes beyond the capacity.
    pub fn push(&self, data: &[u8]) {
        let mut ring = self.lock();
        ring.buf.extend(data);
        let excess = ring.buf.len().saturating_sub(self.capacity);
        if excess > 0 {
            ring.buf.drain(..excess);
            ring.dropped += excess as u64;
            ring.start += excess as u64;
        }
        drop(ring);
        self.readable.notify_all();
    }

    /// Marks the writer side closed.
    pub fn close(&self) {
        self.lock().closed = true;
        self.readable.notify_all();
    }

    /// Locks the ring and waits up to `wait` until it holds data or is closed, running
    /// `settle` on it before each check.
    fn wait_for_data(
        &self,
        wait: Duration,
        mut settle: impl FnMut(&mut Ring),
    ) -> std::sync::MutexGuard<'_, Ring> {
        let deadline = Instant::now() + wait;
        let mut ring = self.lock();
        loop {
            settle(&mut ring);
            if !ring.buf.is_empty() || ring.closed {
                return ring;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return ring;
            }
            ring = self
                .readable
                .wait_timeout(ring, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Takes up to `max` bytes, waiting up to `wait` while the buffer is empty and open.
    pub fn take(&self, max: usize, wait: Duration) -> Chunk {
        let mut ring = self.wait_for_data(wait, |_| {});
        let n = ring.buf.len().min(max);
        let offset = ring.start;
        let data: Vec<u8> = ring.buf.drain(..n).collect();
        ring.start += n as u64;
        Chunk {
            eof: ring.closed && ring.buf.is_empty(),
            dropped: ring.dropped,
            offset,
            data,
        }
    }

    /// An acknowledged read: forgets the bytes before `offset` (the reader has them), then
    /// returns up to `max` bytes from there on without consuming them, waiting up to `wait`
    /// while there are none and the stream is open. An `offset` beyond what was written
    /// acknowledges everything written so far. The chunk's `offset` is where its data starts:
    /// later than asked when the bytes in between were dropped (or consumed by `take`).
    pub fn read_from(&self, offset: u64, max: usize, wait: Duration) -> Chunk {
        // Acknowledged again after every wake-up: an offset past what was written also
        // covers bytes pushed while waiting.
        let ring = self.wait_for_data(wait, |ring| {
            let acked = offset.saturating_sub(ring.start).min(ring.buf.len() as u64) as usize;
            if acked > 0 {
                ring.buf.drain(..acked);
                ring.start += acked as u64;
            }
        });
        let n = ring.buf.len().min(max);
        let (a, b) = ring.buf.as_slices();
        let mut data = Vec::with_capacity(n);
        data.extend_from_slice(&a[..n.min(a.len())]);
        data.extend_from_slice(&b[..n.saturating_sub(a.len())]);
        Chunk {
            // Drained only once the reader acknowledged the last byte.
            eof: ring.closed && ring.buf.is_empty(),
            dropped: ring.dropped,
            offset: ring.start,
            data,
        }
    }
}

/// Starts a thread copying `pipe` into `buffer` until EOF.
pub fn spawn_reader(
    name: String,
    pipe: OwnedFd,
    buffer: Arc<StreamBuffer>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new().name(name).spawn(move || {
        let mut file = File::from(pipe);
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buffer.push(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A terminal master shares its file description with the non-blocking stdin
                // writer: wait for input instead.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut fds = [nix::poll::PollFd::new(
                        std::os::fd::AsFd::as_fd(&file),
                        nix::poll::PollFlags::POLLIN,
                    )];
                    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE);
                }
                // The terminal's slave side is closed: the process and its children are gone.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
                Err(e) => {
                    log::warn!("reading container output failed: {e}");
                    break;
                }
            }
        }
        buffer.close();
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_with_dropped_count() {
        let b = StreamBuffer::new(4);
        b.push(b"abc");
        b.push(b"def");
        let c = b.take(10, Duration::ZERO);
        assert_eq!(c.data, b"cdef");
        assert_eq!(c.dropped, 2);
        assert!(!c.eof);
        b.push(b"gh");
        b.close();
        let c = b.take(1, Duration::ZERO);
        assert_eq!((c.data.as_slice(), c.eof), (&b"g"[..], false));
        let c = b.take(1, Duration::from_secs(5));
        assert_eq!((c.data.as_slice(), c.eof), (&b"h"[..], true));
    }

    #[test]
    fn acknowledged_reads_repeat_until_acknowledged() {
        let b = StreamBuffer::new(8);
        b.push(b"hello");
        // Read twice from 0: the same bytes (a reader that died re-reads).
        for _ in 0..2 {
            let c = b.read_from(0, 3, Duration::ZERO);
            assert_eq!(
                (c.data.as_slice(), c.offset, c.eof),
                (&b"hel"[..], 0, false)
            );
        }
        // Acknowledge 3: the rest.
        let c = b.read_from(3, 16, Duration::ZERO);
        assert_eq!((c.data.as_slice(), c.offset), (&b"lo"[..], 3));
        // Overflow while unacknowledged: the oldest bytes go, the offset says so.
        b.push(b"world!!");
        let c = b.read_from(3, 16, Duration::ZERO);
        assert_eq!(c.dropped, 1);
        assert_eq!((c.data.as_slice(), c.offset), (&b"oworld!!"[..], 4));
        // EOF only once everything is acknowledged; acknowledging past the end is harmless.
        b.close();
        let c = b.read_from(10, 16, Duration::ZERO);
        assert_eq!(
            (c.data.as_slice(), c.offset, c.eof),
            (&b"!!"[..], 10, false)
        );
        let c = b.read_from(u64::MAX, 16, Duration::from_secs(5));
        assert_eq!((c.data.len(), c.offset, c.eof), (0, 12, true));
        // A consuming read after acknowledged ones continues at the same offsets.
        let b = StreamBuffer::new(8);
        b.push(b"abcd");
        assert_eq!(b.take(2, Duration::ZERO).offset, 0);
        let c = b.read_from(0, 16, Duration::ZERO);
        assert_eq!((c.data.as_slice(), c.offset), (&b"cd"[..], 2));
    }

    #[test]
    fn acknowledged_read_waits_for_new_data() {
        let b = StreamBuffer::new(16);
        b.push(b"ab");
        let w = b.clone();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            w.push(b"c");
        });
        // Everything so far acknowledged: waits for the next byte.
        let c = b.read_from(2, 16, Duration::from_secs(5));
        assert_eq!((c.data.as_slice(), c.offset), (&b"c"[..], 2));
        t.join().unwrap();
    }

    #[test]
    fn take_waits_for_data() {
        let b = StreamBuffer::new(16);
        let w = b.clone();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            w.push(b"x");
        });
        let c = b.take(16, Duration::from_secs(5));
        assert_eq!(c.data, b"x");
        t.join().unwrap();
    }
}
