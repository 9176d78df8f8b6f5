//! Host-side access to the agent.
//!
//! The VMM exposes guest vsock ports through one Unix socket ("hybrid vsock", as in Firecracker):
//! the host connects, writes `CONNECT <port>\n` and reads `OK <hostport>\n`; from then on the
//! stream is the guest connection. [`connect_vsock_uds`] performs that handshake, retrying until a
//! deadline because the agent may not listen yet, and hands the socket to ttrpc.
//! [`connect_unix`] reaches an agent started in host mode (`hyperstart --listen unix://...`).
//!
//! [`AgentClient`] wraps one connection; [`ReconnectingClient`] re-dials a lost connection and
//! retries the idempotent calls.

use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::io::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::agent;
use crate::agent_ttrpc;

mod reconnect;

pub use reconnect::{Connector, ReconnectingClient};

/// Longest handshake reply accepted, newline included.
const MAX_REPLY_LEN: usize = 64;
/// First retry delay; doubles up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// Why a connection to the agent could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Connecting to the Unix socket failed.
    #[error("connecting to {path} failed")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading or writing the handshake failed.
    #[error("vsock handshake I/O failed")]
    HandshakeIo(#[source] io::Error),
    /// The VMM closed the connection without a reply: nothing listens on the guest port yet.
    #[error("the VMM closed the connection to guest port {port} without a reply")]
    Refused { port: u32 },
    /// The VMM answered something other than `OK <hostport>`.
    #[error("unexpected vsock handshake reply {reply:?}")]
    BadReply { reply: String },
    /// Every attempt until the deadline failed; `last` is the final attempt's error.
    #[error("no connection after {attempts} attempts in {elapsed:?}")]
    Timeout {
        attempts: u32,
        elapsed: Duration,
        #[source]
        last: Box<ConnectError>,
    },
    /// ttrpc could not take over the connected socket.
    #[error("creating the ttrpc client failed")]
    Ttrpc(#[source] ttrpc::Error),
}

impl ConnectError {
    /// Whether another attempt may succeed (the VMM or the agent may still be starting).
    fn is_transient(&self) -> bool {
        match self {
            ConnectError::Connect { .. } | ConnectError::Refused { .. } => true,
            ConnectError::HandshakeIo(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::TimedOut
            ),
            ConnectError::BadReply { .. }
            | ConnectError::Timeout { .. }
            | ConnectError::Ttrpc(_) => false,
        }
    }
}

/// Connects to guest vsock `port` through the VMM's hybrid vsock socket at `uds_path`, retrying
/// with backoff for up to `timeout` (at least one attempt is made).
///
/// Returns the raw ttrpc client; wrap it in [`AgentClient`] for typed calls.
pub fn connect_vsock_uds(
    uds_path: impl AsRef<Path>,
    port: u32,
    timeout: Duration,
) -> Result<ttrpc::Client, ConnectError> {
    let uds_path = uds_path.as_ref();
    let start = Instant::now();
    let deadline = start + timeout;
    let mut backoff = INITIAL_BACKOFF;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        // A VMM that accepted but never answers must not eat the whole budget of one attempt
        // forever; give each handshake the remaining time, but at least a little.
        let io_timeout = remaining.max(Duration::from_millis(50));
        match handshake(uds_path, port, io_timeout) {
            Ok(stream) => {
                return ttrpc::Client::new(stream.into_raw_fd()).map_err(ConnectError::Ttrpc)
            }
            Err(e) if e.is_transient() && Instant::now() + backoff < deadline => {
                thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) if e.is_transient() => {
                return Err(ConnectError::Timeout {
                    attempts,
                    elapsed: start.elapsed(),
                    last: Box::new(e),
                })
            }
            Err(e) => return Err(e),
        }
    }
}

/// One connection attempt: connect, `CONNECT <port>\n`, expect `OK <hostport>\n`.
///
/// Returns the stream in blocking mode without timeouts, ready for ttrpc.
fn handshake(uds_path: &Path, port: u32, io_timeout: Duration) -> Result<UnixStream, ConnectError> {
    let mut stream = UnixStream::connect(uds_path).map_err(|source| ConnectError::Connect {
        path: uds_path.to_owned(),
        source,
    })?;
    stream
        .set_read_timeout(Some(io_timeout))
        .and_then(|()| stream.set_write_timeout(Some(io_timeout)))
        .map_err(ConnectError::HandshakeIo)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(ConnectError::HandshakeIo)?;

    // Byte by byte: whatever follows the newline already belongs to ttrpc.
    let mut reply = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) if reply.is_empty() => return Err(ConnectError::Refused { port }),
            Ok(0) => {
                return Err(ConnectError::BadReply {
                    reply: String::from_utf8_lossy(&reply).into_owned(),
                })
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if reply.len() + 1 >= MAX_REPLY_LEN => {
                reply.push(byte[0]);
                return Err(ConnectError::BadReply {
                    reply: String::from_utf8_lossy(&reply).into_owned(),
                });
            }
            Ok(_) => reply.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ConnectError::HandshakeIo(e)),
        }
    }
    parse_ok_reply(&reply).ok_or_else(|| ConnectError::BadReply {
        reply: String::from_utf8_lossy(&reply).into_owned(),
    })?;

    stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(None))
        .map_err(ConnectError::HandshakeIo)?;
    Ok(stream)
}

/// Parses `OK <hostport>` (newline already stripped) and returns the host port.
fn parse_ok_reply(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_prefix("OK ")?;
    port.parse().ok()
}

/// Connects to an agent serving on a Unix socket (host mode), without any handshake.
pub fn connect_unix(path: impl AsRef<Path>) -> Result<ttrpc::Client, ConnectError> {
    let path = path.as_ref();
    let stream = UnixStream::connect(path).map_err(|source| ConnectError::Connect {
        path: path.to_owned(),
        source,
    })?;
    ttrpc::Client::new(stream.into_raw_fd()).map_err(ConnectError::Ttrpc)
}

/// A failed agent call.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The agent answered with a non-OK status.
    #[error("agent returned {code:?}: {message}")]
    Status { code: ttrpc::Code, message: String },
    /// The call did not complete: connection lost, timeout, encoding error.
    #[error("agent call failed")]
    Transport(#[source] ttrpc::Error),
    /// No connection to the agent could be made ([`ReconnectingClient`] dialing).
    #[error("connecting to the agent failed")]
    Connect(#[source] ConnectError),
}

impl RpcError {
    /// The agent's status code, or `None` when the call failed below the RPC layer.
    pub fn code(&self) -> Option<ttrpc::Code> {
        match self {
            RpcError::Status { code, .. } => Some(*code),
            RpcError::Transport(_) | RpcError::Connect(_) => None,
        }
    }

    /// Whether the connection the call used is gone: the socket failed or the peer closed it.
    /// The request may or may not have reached the agent. A timeout is not a lost connection.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            RpcError::Transport(e) => match e {
                ttrpc::Error::Socket(_)
                | ttrpc::Error::Nix(_)
                | ttrpc::Error::LocalClosed
                | ttrpc::Error::RemoteClosed
                | ttrpc::Error::Eof => true,
                // The sync client's sender or receiver thread is gone, which only happens once
                // its socket failed; ttrpc reports both as `Others` with these prefixes.
                ttrpc::Error::Others(msg) => {
                    msg.starts_with("Send packet to sender error")
                        || msg.starts_with("Receive packet from Receiver error")
                }
                ttrpc::Error::RpcStatus(_) => false,
            },
            RpcError::Status { .. } | RpcError::Connect(_) => false,
        }
    }
}

impl From<ttrpc::Error> for RpcError {
    fn from(e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(status) => RpcError::Status {
                code: status.code(),
                message: status.message().to_owned(),
            },
            other => RpcError::Transport(other),
        }
    }
}

/// Which block device a [`AgentClient::read_block`] or [`AgentClient::block_size`] targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockTarget {
    /// The virtio-blk serial (drive ID).
    Serial(String),
    /// A guest node such as `/dev/vdb`.
    Path(String),
}

impl agent::Rootfs {
    /// A rootfs directory in the agent's filesystem.
    pub fn from_host_dir(path: impl Into<String>, read_only: bool) -> agent::Rootfs {
        let mut rootfs = agent::Rootfs::new();
        rootfs.set_host_path(path.into());
        rootfs.read_only = read_only;
        rootfs
    }

    /// A rootfs on the virtio-blk disk with this serial, mounted by the agent (ext4 unless
    /// [`Self::with_fs_type`] says otherwise). `overlay` gives the container a private writable
    /// layer over the (then read-only) disk.
    pub fn from_block_serial(
        serial: impl Into<String>,
        read_only: bool,
        overlay: bool,
    ) -> agent::Rootfs {
        let mut rootfs = agent::Rootfs::new();
        rootfs.set_block(BlockTarget::Serial(serial.into()).into());
        rootfs.read_only = read_only;
        rootfs.overlay = overlay;
        rootfs
    }

    /// The same rootfs with the disk's filesystem type (e.g. "ext4", "xfs").
    pub fn with_fs_type(mut self, fs_type: impl Into<String>) -> agent::Rootfs {
        self.fs_type = fs_type.into();
        self
    }
}

/// The byte ranges [`AgentClient::copy_file`] sends, one `CopyFile` call each: consecutive, at
/// most `chunk` bytes long (a `chunk` of 0 counts as 1), covering `0..len`. An empty file is one
/// empty range, so that the agent still creates it.
pub fn copy_file_chunks(len: usize, chunk: usize) -> Vec<Range<usize>> {
    let chunk = chunk.max(1);
    if len == 0 {
        return std::iter::once(0..0).collect();
    }
    (0..len)
        .step_by(chunk)
        .map(|start| start..len.min(start + chunk))
        .collect()
}

/// Milliseconds for a `wait_ms` field, saturating at `u32::MAX`.
fn wait_millis(wait: Duration) -> u32 {
    u32::try_from(wait.as_millis()).unwrap_or(u32::MAX)
}

impl From<BlockTarget> for agent::BlockDevice {
    fn from(target: BlockTarget) -> Self {
        let mut dev = agent::BlockDevice::new();
        match target {
            BlockTarget::Serial(s) => dev.set_serial(s),
            BlockTarget::Path(p) => dev.set_path(p),
        }
        dev
    }
}

/// Typed agent client; every call carries a deadline (the default or [`AgentClient::with_timeout`]).
#[derive(Clone)]
pub struct AgentClient {
    inner: agent_ttrpc::AgentClient,
    timeout: Duration,
}

impl AgentClient {
    /// Default per-call timeout.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Wraps a connected ttrpc client.
    pub fn new(client: ttrpc::Client) -> Self {
        AgentClient {
            inner: agent_ttrpc::AgentClient::new(client),
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// Returns a client (sharing the connection) whose calls time out after `timeout`.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        AgentClient {
            inner: self.inner.clone(),
            timeout,
        }
    }

    /// The generated client, for RPCs this wrapper does not cover yet.
    pub fn raw(&self) -> &agent_ttrpc::AgentClient {
        &self.inner
    }

    fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_duration(self.timeout)
    }

    /// The deadline of a call that may wait `wait_ms` in the agent before answering: the
    /// requested wait (the agent may clamp it lower) plus the usual per-call timeout.
    fn long_poll_ctx(&self, wait_ms: u32) -> ttrpc::context::Context {
        let wait = Duration::from_millis(u64::from(wait_ms));
        ttrpc::context::with_duration(self.timeout.saturating_add(wait))
    }

    /// Agent version and protocol version.
    pub fn version(&self) -> Result<agent::VersionResponse, RpcError> {
        Ok(self
            .inner
            .version(self.ctx(), &agent::VersionRequest::new())?)
    }

    /// Round trip; returns the echoed nonce.
    pub fn ping(&self, nonce: u64) -> Result<u64, RpcError> {
        let mut req = agent::PingRequest::new();
        req.nonce = nonce;
        Ok(self.inner.ping(self.ctx(), &req)?.nonce)
    }

    /// Reads `length` bytes (at most [`crate::MAX_READ_BLOCK_LEN`]) at `offset`.
    pub fn read_block(
        &self,
        device: BlockTarget,
        offset: u64,
        length: u32,
    ) -> Result<agent::ReadBlockResponse, RpcError> {
        let mut req = agent::ReadBlockRequest::new();
        req.device = Some(device.into()).into();
        req.offset = offset;
        req.length = length;
        Ok(self.inner.read_block(self.ctx(), &req)?)
    }

    /// The device's current size in bytes.
    pub fn block_size(&self, device: BlockTarget) -> Result<u64, RpcError> {
        let mut req = agent::BlockSizeRequest::new();
        req.device = Some(device.into()).into();
        Ok(self.inner.block_size(self.ctx(), &req)?.size_bytes)
    }

    /// Configures a guest interface.
    pub fn update_interface(&self, req: &agent::UpdateInterfaceRequest) -> Result<(), RpcError> {
        self.inner.update_interface(self.ctx(), req)?;
        Ok(())
    }

    /// Adds or replaces guest routes.
    pub fn update_routes(&self, routes: Vec<agent::Route>) -> Result<(), RpcError> {
        let mut req = agent::UpdateRoutesRequest::new();
        req.routes = routes;
        self.inner.update_routes(self.ctx(), &req)?;
        Ok(())
    }

    /// Pings `address` from the guest. The call's own deadline is extended to cover the pings.
    pub fn ping_host(
        &self,
        address: &str,
        count: u32,
        timeout_ms: u32,
    ) -> Result<agent::PingHostResponse, RpcError> {
        let mut req = agent::PingHostRequest::new();
        req.address = address.to_owned();
        req.count = count;
        req.timeout_ms = timeout_ms;
        let budget = Duration::from_millis(u64::from(count) * u64::from(timeout_ms));
        let ctx = ttrpc::context::with_duration(self.timeout + budget);
        Ok(self.inner.ping_host(ctx, &req)?)
    }

    /// Asks the guest to reboot (the VM stops). The agent replies before rebooting.
    pub fn reboot(&self) -> Result<(), RpcError> {
        self.inner
            .reboot(self.ctx(), &agent::RebootRequest::new())?;
        Ok(())
    }

    /// Same effect as [`AgentClient::reboot`].
    pub fn shutdown(&self) -> Result<(), RpcError> {
        self.inner
            .shutdown(self.ctx(), &agent::ShutdownRequest::new())?;
        Ok(())
    }

    /// Makes PID 1 exit (guest kernel panic); only with `hyperstart.debug=1`.
    pub fn debug_panic(&self) -> Result<(), RpcError> {
        self.inner
            .debug_panic(self.ctx(), &agent::DebugPanicRequest::new())?;
        Ok(())
    }

    /// What the guest kernel sees: CPUs, memory, release, uptime.
    pub fn guest_info(&self) -> Result<agent::GuestInfoResponse, RpcError> {
        Ok(self
            .inner
            .guest_info(self.ctx(), &agent::GuestInfoRequest::new())?)
    }

    /// Creates a container from an OCI spec (JSON) and a rootfs directory in the agent's
    /// filesystem. Returns the init process's pid.
    pub fn create_container(
        &self,
        container_id: &str,
        oci_spec_json: Vec<u8>,
        rootfs: agent::Rootfs,
    ) -> Result<u32, RpcError> {
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = container_id.to_owned();
        req.oci_spec_json = oci_spec_json;
        req.rootfs = Some(rootfs).into();
        Ok(self.inner.create_container(self.ctx(), &req)?.pid)
    }

    /// Starts a created container; returns its init pid.
    pub fn start_container(&self, container_id: &str) -> Result<u32, RpcError> {
        let mut req = agent::StartContainerRequest::new();
        req.container_id = container_id.to_owned();
        Ok(self.inner.start_container(self.ctx(), &req)?.pid)
    }

    /// Waits for a process to exit, up to this client's timeout (DEADLINE_EXCEEDED after).
    pub fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<agent::WaitProcessResponse, RpcError> {
        let mut req = agent::WaitProcessRequest::new();
        req.container_id = container_id.to_owned();
        req.exec_id = exec_id.to_owned();
        Ok(self.inner.wait_process(self.ctx(), &req)?)
    }

    /// Sends `signal` to a process.
    pub fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
    ) -> Result<(), RpcError> {
        let mut req = agent::SignalProcessRequest::new();
        req.container_id = container_id.to_owned();
        req.exec_id = exec_id.to_owned();
        req.signal = signal;
        self.inner.signal_process(self.ctx(), &req)?;
        Ok(())
    }

    /// Kills (if running), reaps and forgets a container.
    pub fn remove_container(&self, container_id: &str) -> Result<(), RpcError> {
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = container_id.to_owned();
        self.inner.remove_container(self.ctx(), &req)?;
        Ok(())
    }

    /// Takes up to `max_bytes` of buffered output, waiting up to `wait` for some to arrive.
    pub fn read_stream(
        &self,
        container_id: &str,
        exec_id: &str,
        stream: agent::Stream,
        max_bytes: u32,
        wait: Duration,
    ) -> Result<agent::ReadStreamResponse, RpcError> {
        self.read_stream_with(container_id, exec_id, stream, max_bytes, wait, None)
    }

    /// ReadStream; `offset` makes it an acknowledged read.
    fn read_stream_with(
        &self,
        container_id: &str,
        exec_id: &str,
        stream: agent::Stream,
        max_bytes: u32,
        wait: Duration,
        offset: Option<u64>,
    ) -> Result<agent::ReadStreamResponse, RpcError> {
        let mut req = agent::ReadStreamRequest::new();
        req.container_id = container_id.to_owned();
        req.exec_id = exec_id.to_owned();
        req.stream = stream.into();
        req.max_bytes = max_bytes;
        req.wait_ms = wait_millis(wait);
        if let Some(offset) = offset {
            req.acknowledged = true;
            req.offset = offset;
        }
        Ok(self
            .inner
            .read_stream(self.long_poll_ctx(req.wait_ms), &req)?)
    }

    /// An acknowledged read (protocol 5): forgets the stream's bytes before `offset` and
    /// returns those from `offset` on without consuming them, so the call is safe to repeat.
    /// The response's `offset` is where its data starts; `acknowledged` is false from an
    /// agent older than version 5 (which consumed what it returned).
    pub fn read_stream_from(
        &self,
        container_id: &str,
        exec_id: &str,
        stream: agent::Stream,
        offset: u64,
        max_bytes: u32,
        wait: Duration,
    ) -> Result<agent::ReadStreamResponse, RpcError> {
        self.read_stream_with(container_id, exec_id, stream, max_bytes, wait, Some(offset))
    }

    /// Reads a stream until EOF (or until `timeout` passes: the bytes so far are returned with
    /// `eof == false`). Returns the data, whether EOF was reached, and the dropped-bytes count.
    pub fn read_stream_to_end(
        &self,
        container_id: &str,
        exec_id: &str,
        stream: agent::Stream,
        timeout: Duration,
    ) -> Result<(Vec<u8>, bool, u64), RpcError> {
        let deadline = Instant::now() + timeout;
        let mut data = Vec::new();
        loop {
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1));
            let resp = self.read_stream(container_id, exec_id, stream, 0, wait)?;
            data.extend_from_slice(&resp.data);
            if resp.eof || Instant::now() >= deadline {
                return Ok((data, resp.eof, resp.dropped_bytes));
            }
        }
    }

    /// Writes all of `data` to a process's stdin, retrying short writes.
    pub fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<(), RpcError> {
        let mut rest = data;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(crate::MAX_WRITE_STDIN_LEN)];
            let mut req = agent::WriteStdinRequest::new();
            req.container_id = container_id.to_owned();
            req.exec_id = exec_id.to_owned();
            req.data = chunk.to_vec();
            let written = self.inner.write_stdin(self.ctx(), &req)?.written as usize;
            if written == 0 {
                thread::sleep(Duration::from_millis(5));
            }
            rest = &rest[written.min(rest.len())..];
        }
        Ok(())
    }

    /// Closes a process's stdin.
    pub fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), RpcError> {
        let mut req = agent::CloseStdinRequest::new();
        req.container_id = container_id.to_owned();
        req.exec_id = exec_id.to_owned();
        self.inner.close_stdin(self.ctx(), &req)?;
        Ok(())
    }

    /// Sets up the pod's namespaces, hostname, DNS and sysctls (protocol version 3).
    pub fn create_sandbox(
        &self,
        req: &agent::CreateSandboxRequest,
    ) -> Result<agent::CreateSandboxResponse, RpcError> {
        Ok(self.inner.create_sandbox(self.ctx(), req)?)
    }

    /// Removes every container, then the sandbox. Idempotent in the agent.
    pub fn destroy_sandbox(&self) -> Result<(), RpcError> {
        self.inner
            .destroy_sandbox(self.ctx(), &agent::DestroySandboxRequest::new())?;
        Ok(())
    }

    /// Starts `exec_id` in a running container from an OCI `process` object (JSON); returns its
    /// pid in the agent's pid namespace.
    pub fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process_json: &[u8],
    ) -> Result<u32, RpcError> {
        let mut req = agent::ExecProcessRequest::new();
        req.container_id = container_id.to_owned();
        req.exec_id = exec_id.to_owned();
        req.process_json = process_json.to_vec();
        Ok(self.inner.exec_process(self.ctx(), &req)?.pid)
    }

    /// Sets the window size of a process's terminal.
    pub fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), RpcError> {
        let mut req = agent::ResizeTtyRequest::new();
        req.container_id = container_id.to_owned();
        req.exec_id = exec_id.to_owned();
        req.rows = rows;
        req.cols = cols;
        self.inner.resize_tty(self.ctx(), &req)?;
        Ok(())
    }

    /// cgroup figures of a container, plus the guest's NIC counters.
    pub fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<agent::StatsContainerResponse, RpcError> {
        let mut req = agent::StatsContainerRequest::new();
        req.container_id = container_id.to_owned();
        Ok(self.inner.stats_container(self.ctx(), &req)?)
    }

    /// Changes a container's cgroup limits from OCI `linux.resources` (JSON).
    pub fn update_container(
        &self,
        container_id: &str,
        resources_json: &[u8],
    ) -> Result<(), RpcError> {
        let mut req = agent::UpdateContainerRequest::new();
        req.container_id = container_id.to_owned();
        req.resources_json = resources_json.to_vec();
        self.inner.update_container(self.ctx(), &req)?;
        Ok(())
    }

    /// Freezes every process of a container.
    pub fn pause_container(&self, container_id: &str) -> Result<(), RpcError> {
        let mut req = agent::PauseContainerRequest::new();
        req.container_id = container_id.to_owned();
        self.inner.pause_container(self.ctx(), &req)?;
        Ok(())
    }

    /// Thaws a paused container.
    pub fn resume_container(&self, container_id: &str) -> Result<(), RpcError> {
        let mut req = agent::ResumeContainerRequest::new();
        req.container_id = container_id.to_owned();
        self.inner.resume_container(self.ctx(), &req)?;
        Ok(())
    }

    /// Writes `data` as `path` (relative) under the agent's file store, in chunks of at most
    /// [`crate::MAX_COPY_FILE_CHUNK`] bytes (see [`copy_file_chunks`]), and returns the file's
    /// absolute path in the agent's filesystem. The file appears atomically with the last chunk;
    /// the agent refuses files larger than [`crate::MAX_COPY_FILE_SIZE`] on the first one.
    ///
    /// Not retried as a whole: if a chunk fails, call again from the start.
    pub fn copy_file(
        &self,
        path: &str,
        data: &[u8],
        file_mode: u32,
        dir_mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<String, RpcError> {
        let file_size = data.len() as u64;
        let mut resp = agent::CopyFileResponse::new();
        for range in copy_file_chunks(data.len(), crate::MAX_COPY_FILE_CHUNK) {
            let mut req = agent::CopyFileRequest::new();
            req.path = path.to_owned();
            req.file_size = file_size;
            req.offset = range.start as u64;
            req.data = data[range].to_vec();
            req.file_mode = file_mode;
            req.dir_mode = dir_mode;
            req.uid = uid;
            req.gid = gid;
            resp = self.inner.copy_file(self.ctx(), &req)?;
        }
        Ok(resp.path)
    }

    /// The processes of a container.
    pub fn list_processes(&self, container_id: &str) -> Result<Vec<agent::ProcessInfo>, RpcError> {
        let mut req = agent::ListProcessesRequest::new();
        req.container_id = container_id.to_owned();
        Ok(self.inner.list_processes(self.ctx(), &req)?.processes)
    }

    /// Events with `seq > after_seq`, at most `max_events` (0: the agent's maximum), waiting up
    /// to `wait` (the agent clamps it to [`crate::MAX_EVENTS_WAIT_MS`]) when none are pending.
    /// The call's own deadline is extended by `wait`.
    pub fn get_events(
        &self,
        after_seq: u64,
        max_events: u32,
        wait: Duration,
    ) -> Result<agent::GetEventsResponse, RpcError> {
        let mut req = agent::GetEventsRequest::new();
        req.after_seq = after_seq;
        req.max_events = max_events;
        req.wait_ms = wait_millis(wait);
        Ok(self
            .inner
            .get_events(self.long_poll_ctx(req.wait_ms), &req)?)
    }

    /// Whether the agent serves requests, with its container count.
    pub fn health(&self) -> Result<agent::HealthResponse, RpcError> {
        Ok(self
            .inner
            .health(self.ctx(), &agent::HealthRequest::new())?)
    }

    /// Forgets an exec'd process (killed first if it still runs); idempotent.
    pub fn remove_process(&self, container_id: &str, exec_id: &str) -> Result<(), RpcError> {
        let mut req = agent::RemoveProcessRequest::new();
        req.container_id = container_id.to_owned();
        req.exec_id = exec_id.to_owned();
        self.inner.remove_process(self.ctx(), &req)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
