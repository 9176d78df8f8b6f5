//! One vsock stream connection: its Unix stream, its state and both directions' credit.
//!
//! Naming follows the guest's view of the host: *peer* is the guest socket, *local* is ours.
//! Guest -> host bytes are written to the Unix stream (buffered in `pending` while it would
//! block, bounded by the buffer we advertise); host -> guest bytes are read from the Unix stream
//! only when the guest has credit for them, so nothing host -> guest is ever buffered here.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::muxer::Interest;
use super::packet::{op, PacketHeader, HOST_CID, TYPE_STREAM};

/// Receive buffer we advertise to the guest (`buf_alloc`): the most guest -> host bytes we hold.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Send a `CREDIT_UPDATE` once the guest's view of our `fwd_cnt` lags by this many bytes.
pub const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;

/// Connection key: (host port, guest port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Port on the host side (CID 2).
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
}

/// Lifecycle of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: `REQUEST` queued for the guest, waiting for its `RESPONSE`.
    LocalInit {
        /// When to give up.
        deadline: Instant,
    },
    /// Data flows.
    Established,
    /// Tearing down: waiting for the guest's `RST` (after we sent `SHUTDOWN` both ways) or for
    /// buffered guest bytes to drain (after the guest sent `SHUTDOWN` both ways).
    Closing {
        /// When to reset the connection regardless.
        deadline: Instant,
    },
}

/// A stream connection between a guest socket and a host Unix stream.
#[derive(Debug)]
pub struct Connection {
    /// The host side, non-blocking.
    pub stream: UnixStream,
    /// Poller token of `stream`.
    pub token: u64,
    /// Lifecycle state.
    pub state: ConnState,
    /// Interest currently registered with the poller.
    pub interest: Interest,
    /// Whether the connection sits in the muxer's list of connections with data for the guest.
    pub in_ready: bool,
    /// A `CREDIT_UPDATE` for this connection is queued.
    pub credit_update_queued: bool,
    /// The guest said it will receive no more data.
    pub guest_shut_rcv: bool,
    /// The guest said it will send no more data.
    pub guest_shut_send: bool,
    /// Reading the Unix stream returned end-of-file.
    pub host_eof: bool,
    /// We shut down the write half of the Unix stream.
    pub stream_write_shut: bool,
    // Host -> guest credit.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
    // Guest -> host.
    pending: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
}

/// The guest sent more than the credit we gave it.
#[derive(Debug, thiserror::Error)]
#[error("guest overran its credit: {buffered} bytes buffered, {incoming} more arrived")]
pub struct CreditOverrun {
    /// Bytes already buffered.
    pub buffered: usize,
    /// Bytes in the offending packet.
    pub incoming: usize,
}

impl Connection {
    /// A connection over `stream` (which must already be non-blocking).
    pub fn new(stream: UnixStream, token: u64, state: ConnState) -> Self {
        Connection {
            stream,
            token,
            state,
            interest: Interest::NONE,
            in_ready: false,
            credit_update_queued: false,
            guest_shut_rcv: false,
            guest_shut_send: false,
            host_eof: false,
            stream_write_shut: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            pending: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
        }
    }

    /// Record the credit fields of a packet from the guest.
    pub fn update_peer_credit(&mut self, hdr: &PacketHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes we may still send to the guest. A guest reporting a `fwd_cnt` ahead of what we sent
    /// gets no credit rather than a huge one.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether we should read from the Unix stream for the guest right now.
    pub fn can_read(&self) -> bool {
        self.state == ConnState::Established && !self.host_eof && !self.guest_shut_rcv
    }

    /// Bytes from the guest not yet written to the Unix stream.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Poller interest this connection needs now.
    pub fn wanted_interest(&self) -> Interest {
        Interest {
            read: self.can_read() && !self.in_ready && self.peer_credit() > 0,
            write: !self.pending.is_empty(),
        }
    }

    /// Fill in our credit fields of a packet about to go to the guest and account for its
    /// payload.
    pub fn stamp(&mut self, hdr: &mut PacketHeader) {
        hdr.buf_alloc = BUF_ALLOC;
        hdr.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        if hdr.op == op::RW {
            self.tx_cnt += Wrapping(hdr.len);
        }
        if hdr.op == op::CREDIT_UPDATE {
            self.credit_update_queued = false;
        }
    }

    /// Whether the guest's view of our `fwd_cnt` is stale enough to warrant a `CREDIT_UPDATE`.
    pub fn needs_credit_update(&self) -> bool {
        !self.credit_update_queued
            && (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// Take guest data for the Unix stream: write what the stream accepts now, buffer the rest.
    ///
    /// Fails if the guest overran the credit we advertised (the buffer never exceeds
    /// [`BUF_ALLOC`]) or if the stream failed.
    pub fn send_to_host(&mut self, data: &[u8]) -> Result<(), SendError> {
        if self.pending.len() + data.len() > BUF_ALLOC as usize {
            return Err(SendError::Overrun(CreditOverrun {
                buffered: self.pending.len(),
                incoming: data.len(),
            }));
        }
        let mut written = 0;
        if self.pending.is_empty() {
            written = write_nonblocking(&mut self.stream, data).map_err(SendError::Io)?;
            self.account_forwarded(written);
        }
        self.pending.extend(&data[written..]);
        Ok(())
    }

    /// Write buffered guest data to the Unix stream until it would block.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            let n = write_nonblocking(&mut self.stream, front)?;
            if n == 0 {
                break;
            }
            self.pending.drain(..n);
            self.account_forwarded(n);
        }
        Ok(())
    }

    fn account_forwarded(&mut self, n: usize) {
        // n is bounded by BUF_ALLOC (the most we ever buffer or pass in one call).
        self.fwd_cnt += Wrapping(n as u32);
    }
}

/// Why guest data could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The guest ignored our credit.
    #[error(transparent)]
    Overrun(CreditOverrun),
    /// Writing the Unix stream failed.
    #[error("cannot write to the host stream")]
    Io(#[source] io::Error),
}

/// Write as much of `data` as the non-blocking `stream` takes; 0 when it would block.
fn write_nonblocking(stream: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match stream.write(&data[done..]) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// A control packet (no payload) from the host side of `key` to the guest.
pub fn host_packet(guest_cid: u64, key: ConnKey, op: u16, flags: u32) -> PacketHeader {
    PacketHeader {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: key.local_port,
        dst_port: key.peer_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc: 0,
        fwd_cnt: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn conn() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, 16, ConnState::Established), b)
    }

    #[test]
    fn peer_credit_tracks_buf_alloc_and_fwd_cnt() {
        let (mut c, _peer) = conn();
        assert_eq!(c.peer_credit(), 0);
        let mut h = PacketHeader {
            buf_alloc: 1000,
            fwd_cnt: 0,
            ..Default::default()
        };
        c.update_peer_credit(&h);
        assert_eq!(c.peer_credit(), 1000);
        let mut rw = PacketHeader {
            op: op::RW,
            len: 600,
            ..Default::default()
        };
        c.stamp(&mut rw);
        assert_eq!(c.peer_credit(), 400);
        h.fwd_cnt = 600;
        c.update_peer_credit(&h);
        assert_eq!(c.peer_credit(), 1000);
        // A lying fwd_cnt ahead of what we sent yields no credit, not 4 GiB.
        h.fwd_cnt = 10_000;
        c.update_peer_credit(&h);
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn credit_wraps_around_u32() {
        let (mut c, _peer) = conn();
        c.tx_cnt = Wrapping(u32::MAX - 10);
        c.update_peer_credit(&PacketHeader {
            buf_alloc: 100,
            fwd_cnt: u32::MAX - 10,
            ..Default::default()
        });
        let mut rw = PacketHeader {
            op: op::RW,
            len: 50,
            ..Default::default()
        };
        c.stamp(&mut rw);
        assert_eq!(c.peer_credit(), 50);
    }

    #[test]
    fn buffers_when_stream_blocks_and_enforces_buf_alloc() {
        let (mut c, mut peer) = conn();
        let chunk = vec![7u8; 64 * 1024];
        // Fill the socket buffer and then our buffer, never beyond BUF_ALLOC.
        let mut sent = 0usize;
        loop {
            match c.send_to_host(&chunk) {
                Ok(()) => sent += chunk.len(),
                Err(SendError::Overrun(o)) => {
                    assert!(o.buffered + o.incoming > BUF_ALLOC as usize);
                    break;
                }
                Err(e) => panic!("{e}"),
            }
            assert!(sent < 64 << 20, "never overran");
        }
        assert!(c.pending_len() <= BUF_ALLOC as usize);
        assert!(c.pending_len() > 0);
        assert!(c.wanted_interest().write);
        // fwd_cnt counts exactly the bytes the stream took.
        assert_eq!(c.fwd_cnt.0 as usize + c.pending_len(), sent);
        assert!(c.needs_credit_update());
        // Drain the peer and flush everything.
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        peer.set_nonblocking(true).unwrap();
        while total < sent {
            match peer.read(&mut buf) {
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.flush().unwrap(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(c.pending_len(), 0);
        assert_eq!(c.fwd_cnt.0 as usize, sent);
        assert!(!c.wanted_interest().write);
    }
}
