//! The connection multiplexer: the vsock state machine between guest packets and host Unix
//! streams.
//!
//! The muxer is plain code: it knows nothing of virtqueues, epoll or KVM. The queue handlers
//! feed it packets from the guest ([`Muxer::send_pkt`]) and ask it for packets for the guest
//! ([`Muxer::recv_pkt`]); the event loop tells it which of its file descriptors are ready
//! ([`Muxer::handle_event`]) and when time passed ([`Muxer::process_timeouts`]); it tells the
//! event loop what to watch through a [`Poller`].
//!
//! Host-initiated connections: a client connects to the listener at `uds_path` and writes
//! `CONNECT <port>\n`; we send the guest a `REQUEST` from a fresh host port and, on its
//! `RESPONSE`, write `OK <host port>\n` back. Guest-initiated connections: a `REQUEST` to port `P`
//! connects to the Unix socket `<uds_path>_<P>`.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::connection::{host_packet, ConnKey, ConnState, Connection, SendError};
use super::packet::{op, shutdown, HeaderError, PacketHeader, HOST_CID, TYPE_STREAM};
use super::ratelimit::{rl_log, LogLimiter};

/// Most connections (both directions together) per device; more are refused.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host clients that connected but have not sent their `CONNECT` line yet.
pub const MAX_HANDSHAKES: usize = 64;
/// Longest `CONNECT` line, newline excluded.
pub const MAX_CONNECT_LINE: usize = 32;
/// How long a host client may take to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to answer a host-initiated `REQUEST`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closing connection may wait for the guest's `RST` or for its data to drain.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// First port handed out to host-initiated connections.
pub const FIRST_HOST_PORT: u32 = 1 << 30;
/// Stop taking guest TX packets while this many control packets wait for RX buffers.
const RX_CTRL_BACKPRESSURE: usize = 64;
/// Hard cap on queued control packets; beyond it host-caused ones are dropped.
const RX_CTRL_MAX: usize = 4 * MAX_CONNECTIONS;
/// First poller token the muxer hands out; smaller ones belong to the event loop.
pub const FIRST_TOKEN: u64 = 16;

/// What the event loop should watch a file descriptor for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    /// Readable (and hang-up).
    pub read: bool,
    /// Writable.
    pub write: bool,
}

impl Interest {
    /// Not watched at all (not registered).
    pub const NONE: Interest = Interest {
        read: false,
        write: false,
    };
    /// Readable only.
    pub const READ: Interest = Interest {
        read: true,
        write: false,
    };

    /// Whether nothing is watched.
    pub fn is_none(&self) -> bool {
        !self.read && !self.write
    }
}

/// The event loop's side of fd registration. `old` is what was registered before
/// ([`Interest::NONE`]: not registered), `new` what should be ([`Interest::NONE`]: unregister).
/// Events for `fd` must come back through [`Muxer::handle_event`] with `token`.
pub trait Poller {
    /// Change the registration of `fd`.
    fn update(&mut self, fd: RawFd, token: u64, old: Interest, new: Interest) -> io::Result<()>;
}

/// A host client that has not sent its `CONNECT` line yet.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// What a token refers to.
#[derive(Clone, Copy, Debug)]
enum Target {
    Listener,
    Handshake,
    Conn(ConnKey),
}

/// The vsock connection multiplexer. See the module documentation.
#[derive(Debug)]
pub struct Muxer<P: Poller> {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    poller: P,
    conns: HashMap<ConnKey, Connection>,
    handshakes: HashMap<u64, Handshake>,
    tokens: HashMap<u64, Target>,
    /// Control packets for the guest; credit fields are filled in when they are sent.
    rx_ctrl: VecDeque<PacketHeader>,
    /// Connections that may have data for the guest, round robin.
    rx_ready: VecDeque<ConnKey>,
    next_token: u64,
    next_host_port: u32,
    log: LogLimiter,
}

impl<P: Poller> Muxer<P> {
    /// A muxer for a guest with `guest_cid`, accepting host clients on `listener` (which must be
    /// non-blocking) and connecting guest requests to `<uds_path>_<port>`.
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
        mut poller: P,
    ) -> io::Result<Self> {
        let listener_token = FIRST_TOKEN;
        poller.update(
            listener.as_raw_fd(),
            listener_token,
            Interest::NONE,
            Interest::READ,
        )?;
        let mut tokens = HashMap::new();
        tokens.insert(listener_token, Target::Listener);
        Ok(Muxer {
            guest_cid,
            uds_path,
            listener,
            poller,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            tokens,
            rx_ctrl: VecDeque::new(),
            rx_ready: VecDeque::new(),
            next_token: listener_token + 1,
            next_host_port: FIRST_HOST_PORT,
            log: LogLimiter::default(),
        })
    }

    /// Number of live connections.
    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether there is something for the guest (it may still turn out to be nothing, e.g. a
    /// ready stream that would block).
    pub fn has_rx(&self) -> bool {
        !self.rx_ctrl.is_empty() || !self.rx_ready.is_empty()
    }

    /// Whether the TX queue should wait until the guest drains control packets.
    pub fn rx_full(&self) -> bool {
        self.rx_ctrl.len() >= RX_CTRL_BACKPRESSURE
    }

    /// Earliest deadline of a handshake or connection, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        let hs = self.handshakes.values().map(|h| h.deadline);
        let conns = self.conns.values().filter_map(|c| match c.state {
            ConnState::LocalInit { deadline } | ConnState::Closing { deadline } => Some(deadline),
            ConnState::Established => None,
        });
        hs.chain(conns).min()
    }

    fn new_token(&mut self, target: Target) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        self.tokens.insert(t, target);
        t
    }

    fn push_ctrl(&mut self, hdr: PacketHeader) -> bool {
        if self.rx_ctrl.len() >= RX_CTRL_MAX {
            rl_log!(
                self.log,
                warn,
                "vsock: control queue full, dropping op {}",
                hdr.op
            );
            return false;
        }
        self.rx_ctrl.push_back(hdr);
        true
    }

    fn push_conn_ctrl(&mut self, key: ConnKey, op: u16, flags: u32) -> bool {
        self.push_ctrl(host_packet(self.guest_cid, key, op, flags))
    }

    /// Reply `RST` to a guest packet (never to an `RST`).
    fn reply_rst(&mut self, hdr: &PacketHeader) {
        if hdr.op == op::RST {
            return;
        }
        self.push_ctrl(PacketHeader {
            src_cid: hdr.dst_cid,
            dst_cid: hdr.src_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Remove a connection, closing its stream; optionally tell the guest with an `RST`.
    fn kill(&mut self, key: ConnKey, send_rst: bool) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        self.tokens.remove(&conn.token);
        if !conn.interest.is_none() {
            // Best effort: closing the fd below unregisters it anyway.
            let _ = self.poller.update(
                conn.stream.as_raw_fd(),
                conn.token,
                conn.interest,
                Interest::NONE,
            );
        }
        if send_rst {
            self.push_conn_ctrl(key, op::RST, 0);
        }
    }

    /// Bring the poller registration of `key` in line with what the connection needs.
    fn sync_interest(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let want = conn.wanted_interest();
        if want == conn.interest {
            return;
        }
        match self
            .poller
            .update(conn.stream.as_raw_fd(), conn.token, conn.interest, want)
        {
            Ok(()) => conn.interest = want,
            Err(e) => {
                log::error!("vsock: cannot watch connection {key:?}: {e}");
                self.kill(key, true);
            }
        }
    }

    /// A file descriptor registered with `token` is ready. `readable` should also be set on
    /// hang-up and error, `writable` on error.
    pub fn handle_event(&mut self, token: u64, readable: bool, writable: bool) {
        match self.tokens.get(&token).copied() {
            Some(Target::Listener) => self.accept(),
            Some(Target::Handshake) => self.handshake_ready(token),
            Some(Target::Conn(key)) => self.conn_ready(key, readable, writable),
            None => {}
        }
    }

    fn accept(&mut self) {
        // Bounded so a flood of clients cannot starve the queues.
        for _ in 0..MAX_HANDSHAKES {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    rl_log!(self.log, warn, "vsock: accept failed: {e}");
                    return;
                }
            };
            if self.handshakes.len() >= MAX_HANDSHAKES || self.conns.len() >= MAX_CONNECTIONS {
                rl_log!(
                    self.log,
                    warn,
                    "vsock: too many connections, refusing host client"
                );
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                rl_log!(
                    self.log,
                    warn,
                    "vsock: cannot make host client non-blocking: {e}"
                );
                continue;
            }
            let token = self.new_token(Target::Handshake);
            if let Err(e) =
                self.poller
                    .update(stream.as_raw_fd(), token, Interest::NONE, Interest::READ)
            {
                log::error!("vsock: cannot watch host client: {e}");
                self.tokens.remove(&token);
                continue;
            }
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    line: Vec::with_capacity(MAX_CONNECT_LINE),
                    deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                },
            );
        }
    }

    fn remove_handshake(&mut self, token: u64) -> Option<Handshake> {
        let hs = self.handshakes.remove(&token)?;
        self.tokens.remove(&token);
        let _ = self
            .poller
            .update(hs.stream.as_raw_fd(), token, Interest::READ, Interest::NONE);
        Some(hs)
    }

    fn handshake_ready(&mut self, token: u64) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        // Byte by byte so nothing after the newline is consumed; the line is tiny.
        let result = loop {
            let mut b = [0u8; 1];
            match hs.stream.read(&mut b) {
                Ok(0) => break None,
                Ok(_) if b[0] == b'\n' => break parse_connect(&hs.line),
                Ok(_) if hs.line.len() >= MAX_CONNECT_LINE => break None,
                Ok(_) => hs.line.push(b[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break None,
            }
        };
        let Some(hs) = self.remove_handshake(token) else {
            return;
        };
        match result {
            Some(port) => self.host_connect(hs.stream, port),
            None => {
                rl_log!(
                    self.log,
                    warn,
                    "vsock: bad CONNECT line from host client, closing"
                );
            }
        }
    }

    fn alloc_host_port(&mut self) -> u32 {
        // Terminates: at most MAX_CONNECTIONS ports are in use out of 2^31 candidates.
        loop {
            let port = self.next_host_port;
            self.next_host_port = port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.keys().any(|k| k.local_port == port) {
                return port;
            }
        }
    }

    fn host_connect(&mut self, stream: UnixStream, peer_port: u32) {
        if self.conns.len() >= MAX_CONNECTIONS {
            rl_log!(
                self.log,
                warn,
                "vsock: too many connections, refusing host client"
            );
            return;
        }
        let key = ConnKey {
            local_port: self.alloc_host_port(),
            peer_port,
        };
        let token = self.new_token(Target::Conn(key));
        let state = ConnState::LocalInit {
            deadline: Instant::now() + CONNECT_TIMEOUT,
        };
        self.conns
            .insert(key, Connection::new(stream, token, state));
        if !self.push_conn_ctrl(key, op::REQUEST, 0) {
            self.kill(key, false);
        }
    }

    fn conn_ready(&mut self, key: ConnKey, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if writable && conn.pending_len() > 0 {
            if let Err(e) = conn.flush() {
                rl_log!(self.log, debug, "vsock: write to host stream failed: {e}");
                self.kill(key, true);
                return;
            }
            self.after_forward(key);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if readable && conn.can_read() && !conn.in_ready {
            conn.in_ready = true;
            self.rx_ready.push_back(key);
        }
        self.sync_interest(key);
    }

    /// After guest bytes went to the Unix stream: finish shutdowns and refresh the guest's credit.
    fn after_forward(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.pending_len() == 0 && conn.guest_shut_send {
            if conn.guest_shut_rcv {
                // The guest closed both ways and everything it sent is delivered.
                self.kill(key, true);
                return;
            }
            if !conn.stream_write_shut {
                conn.stream_write_shut = true;
                let _ = conn.stream.shutdown(Shutdown::Write);
            }
        }
        if conn.state == ConnState::Established && conn.needs_credit_update() {
            conn.credit_update_queued = true;
            self.push_conn_ctrl(key, op::CREDIT_UPDATE, 0);
        }
        self.sync_interest(key);
    }

    /// Reject a packet whose header was readable but whose body was not (bad length): reset the
    /// connection it belongs to.
    pub fn reject_pkt(&mut self, hdr: &PacketHeader) {
        if hdr.src_cid != self.guest_cid {
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.dst_cid == HOST_CID && self.conns.contains_key(&key) {
            self.kill(key, hdr.op != op::RST);
        } else {
            self.reply_rst(hdr);
        }
    }

    /// Handle a packet from the guest. `payload` is the packet's data for `OP_RW` (exactly
    /// `hdr.len` bytes) and is ignored otherwise.
    pub fn send_pkt(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        match hdr.validate_from_guest(self.guest_cid) {
            Ok(()) => {}
            Err(HeaderError::SrcCid(cid)) => {
                rl_log!(
                    self.log,
                    warn,
                    "vsock: dropping packet with source cid {cid}"
                );
                return;
            }
            Err(e) => {
                rl_log!(self.log, debug, "vsock: resetting: {e}");
                self.reject_pkt(hdr);
                return;
            }
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                op::REQUEST => self.guest_connect(hdr, key),
                op::RST => {}
                _ => self.reply_rst(hdr),
            }
            return;
        };
        conn.update_peer_credit(hdr);
        match (conn.state, hdr.op) {
            (_, op::RST) => self.kill(key, false),
            (_, op::REQUEST) => self.kill(key, true),
            (ConnState::LocalInit { .. }, op::RESPONSE) => {
                let line = format!("OK {}\n", key.local_port);
                // The stream is fresh and empty: a short write means it is broken.
                match conn.stream.write(line.as_bytes()) {
                    Ok(n) if n == line.len() => {
                        conn.state = ConnState::Established;
                        self.sync_interest(key);
                    }
                    _ => self.kill(key, true),
                }
            }
            (ConnState::LocalInit { .. }, _) => self.kill(key, true),
            (ConnState::Established, op::RESPONSE) => self.kill(key, true),
            (ConnState::Established, op::RW) => {
                if conn.guest_shut_send {
                    self.kill(key, true);
                    return;
                }
                match conn.send_to_host(payload) {
                    Ok(()) => self.after_forward(key),
                    Err(SendError::Overrun(e)) => {
                        rl_log!(self.log, warn, "vsock: {e}; resetting {key:?}");
                        self.kill(key, true);
                    }
                    Err(SendError::Io(e)) => {
                        rl_log!(self.log, debug, "vsock: host stream write failed: {e:?}");
                        self.kill(key, true);
                    }
                }
            }
            (ConnState::Established, op::SHUTDOWN) => {
                conn.guest_shut_rcv |= hdr.flags & shutdown::RCV != 0;
                conn.guest_shut_send |= hdr.flags & shutdown::SEND != 0;
                if conn.guest_shut_rcv && conn.guest_shut_send && conn.pending_len() > 0 {
                    conn.state = ConnState::Closing {
                        deadline: Instant::now() + CLOSE_TIMEOUT,
                    };
                }
                self.after_forward(key);
            }
            (ConnState::Established, op::CREDIT_REQUEST) => {
                if !conn.credit_update_queued {
                    conn.credit_update_queued = true;
                    self.push_conn_ctrl(key, op::CREDIT_UPDATE, 0);
                }
                self.sync_interest(key);
            }
            // CREDIT_UPDATE: the new credit is recorded above; reading may resume.
            (ConnState::Established, _) => self.sync_interest(key),
            (ConnState::Closing { .. }, op::SHUTDOWN) => {
                conn.guest_shut_rcv |= hdr.flags & shutdown::RCV != 0;
                conn.guest_shut_send |= hdr.flags & shutdown::SEND != 0;
                if conn.host_eof {
                    // We already said SHUTDOWN both ways; the guest agrees.
                    self.kill(key, true);
                } else {
                    self.after_forward(key);
                }
            }
            // Data or credit traffic racing with the close: dropped.
            (ConnState::Closing { .. }, _) => {}
        }
    }

    fn guest_connect(&mut self, hdr: &PacketHeader, key: ConnKey) {
        if self.conns.len() >= MAX_CONNECTIONS {
            rl_log!(
                self.log,
                warn,
                "vsock: too many connections, refusing guest request"
            );
            self.reply_rst(hdr);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.local_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                rl_log!(
                    self.log,
                    debug,
                    "vsock: guest connect to {} failed: {e}",
                    Path::new(&path).display()
                );
                self.reply_rst(hdr);
                return;
            }
        };
        let token = self.new_token(Target::Conn(key));
        let mut conn = Connection::new(stream, token, ConnState::Established);
        conn.update_peer_credit(hdr);
        self.conns.insert(key, conn);
        if !self.push_conn_ctrl(key, op::RESPONSE, 0) {
            self.kill(key, false);
            return;
        }
        self.sync_interest(key);
    }

    /// The next packet for the guest, if any. For `OP_RW` the payload is in
    /// `buf[..hdr.len]`; at most `buf.len()` bytes are read from a stream.
    pub fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<PacketHeader> {
        while let Some(mut hdr) = self.rx_ctrl.pop_front() {
            let key = ConnKey {
                local_port: hdr.src_port,
                peer_port: hdr.dst_port,
            };
            match self.conns.get_mut(&key) {
                Some(conn) if hdr.dst_cid == self.guest_cid && hdr.src_cid == HOST_CID => {
                    conn.stamp(&mut hdr);
                    return Some(hdr);
                }
                // Resets outlive their connection; anything else for a dead one is moot.
                _ if hdr.op == op::RST => return Some(hdr),
                _ => {}
            }
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_ready = false;
            let max = buf.len().min(conn.peer_credit() as usize);
            if !conn.can_read() || max == 0 {
                self.sync_interest(key);
                continue;
            }
            match conn.stream.read(&mut buf[..max]) {
                Ok(0) => {
                    conn.host_eof = true;
                    let flags = if peer_hung_up(conn.stream.as_raw_fd()) {
                        conn.state = ConnState::Closing {
                            deadline: Instant::now() + CLOSE_TIMEOUT,
                        };
                        shutdown::BOTH
                    } else {
                        shutdown::SEND
                    };
                    self.sync_interest(key);
                    let mut hdr = host_packet(self.guest_cid, key, op::SHUTDOWN, flags);
                    if let Some(conn) = self.conns.get_mut(&key) {
                        conn.stamp(&mut hdr);
                    }
                    return Some(hdr);
                }
                Ok(n) => {
                    // n <= max <= u32 credit.
                    let mut hdr = host_packet(self.guest_cid, key, op::RW, 0);
                    hdr.len = n as u32;
                    conn.stamp(&mut hdr);
                    // Keep it in the round robin until the stream runs dry.
                    conn.in_ready = true;
                    self.rx_ready.push_back(key);
                    return Some(hdr);
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    self.sync_interest(key);
                }
                Err(e) => {
                    rl_log!(self.log, debug, "vsock: read from host stream failed: {e}");
                    self.kill(key, true);
                }
            }
        }
        None
    }

    /// Expire handshakes, unanswered requests and stuck closes whose deadline is `<= now`.
    pub fn process_timeouts(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in expired {
            rl_log!(
                self.log,
                warn,
                "vsock: host client sent no CONNECT line in time"
            );
            self.remove_handshake(t);
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| match c.state {
                ConnState::LocalInit { deadline } | ConnState::Closing { deadline } => {
                    deadline <= now
                }
                ConnState::Established => false,
            })
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            rl_log!(self.log, debug, "vsock: connection {key:?} timed out");
            self.kill(key, true);
        }
    }
}

/// Parse `CONNECT <port>` (newline already stripped).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Whether the peer of a stream closed both directions.
fn peer_hung_up(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and we pass a count of 1;
    // a zero timeout never blocks.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    r > 0 && pfd.revents & libc::POLLHUP != 0
}

/// Connect a non-blocking Unix stream to `path`, failing instead of blocking when the listener's
/// backlog is full (a guest must not be able to stall the device thread).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and own exclusively.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid, NUL-terminated `sockaddr_un` living across the call and `len`
    // does not exceed its size; the result is checked.
    let r = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect(b"CONNECT "), None);
        assert_eq!(parse_connect(b"CONNECT +5"), None);
        assert_eq!(parse_connect(b"CONNECT -5"), None);
        assert_eq!(parse_connect(b"CONNECT 5 "), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(b"CONNECT\t5"), None);
        assert_eq!(parse_connect(b""), None);
    }

    #[test]
    fn connect_nonblocking_refused_and_too_long() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vsock-conn").unwrap();
        let missing = dir.as_path().join("nope");
        assert!(connect_nonblocking(&missing).is_err());
        let long = dir.as_path().join("x".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let path = dir.as_path().join("sock");
        let _l = UnixListener::bind(&path).unwrap();
        assert!(connect_nonblocking(&path).is_ok());
    }
}
