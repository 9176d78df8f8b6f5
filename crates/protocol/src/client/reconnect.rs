//! [`ReconnectingClient`]: an [`AgentClient`] that re-dials a lost connection.
//!
//! A connection to the agent can break under a healthy caller: the VMM restarts its vsock
//! device, the agent restarts in host mode, a guest-side socket error. Every call that finds the
//! connection lost drops it, so the next call dials again. Only idempotent calls are also retried
//! once on the spot: a request that was written before the connection broke may have run in the
//! agent, and running CreateContainer, CopyFile, ReadStream (which takes the buffered output) or
//! SignalProcess twice is not the same as running it once. Those return the error, and the caller,
//! which knows whether a repeat is safe (same container id: ALREADY_EXISTS, ...), decides.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::{connect_unix, connect_vsock_uds, AgentClient, BlockTarget, ConnectError, RpcError};
use crate::agent;

/// Dials a new connection to the agent.
pub type Connector = Arc<dyn Fn() -> Result<ttrpc::Client, ConnectError> + Send + Sync>;

/// The current connection, shared by the clones of a [`ReconnectingClient`].
struct Shared {
    connector: Connector,
    /// The live connection and its generation (how many dials produced it).
    current: Mutex<Option<(u64, AgentClient)>>,
    /// Successful dials so far.
    dials: AtomicU64,
}

/// An agent client that dials lazily, re-dials after a lost connection and retries the
/// idempotent RPCs once (see the module documentation for why only those).
///
/// Clones share the connection; [`ReconnectingClient::with_timeout`] changes the per-call
/// timeout of the returned handle only.
#[derive(Clone)]
pub struct ReconnectingClient {
    shared: Arc<Shared>,
    timeout: Duration,
}

impl ReconnectingClient {
    /// A client that dials with `connector` when it first needs a connection.
    pub fn new(connector: Connector) -> Self {
        ReconnectingClient {
            shared: Arc::new(Shared {
                connector,
                current: Mutex::new(None),
                dials: AtomicU64::new(0),
            }),
            timeout: AgentClient::DEFAULT_TIMEOUT,
        }
    }

    /// An agent in host mode on the Unix socket `path` (one connect attempt per dial).
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self::new(Arc::new(move || connect_unix(&path)))
    }

    /// Guest vsock `port` through the VMM's hybrid vsock socket; every dial retries the
    /// handshake for up to `connect_timeout` (the agent may be restarting).
    pub fn vsock(uds_path: impl Into<PathBuf>, port: u32, connect_timeout: Duration) -> Self {
        let uds_path = uds_path.into();
        Self::new(Arc::new(move || {
            connect_vsock_uds(&uds_path, port, connect_timeout)
        }))
    }

    /// A handle sharing the connection whose calls time out after `timeout`.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        ReconnectingClient {
            shared: self.shared.clone(),
            timeout,
        }
    }

    /// Successful dials so far (1 after the first call, +1 per reconnection).
    pub fn dials(&self) -> u64 {
        self.shared.dials.load(Ordering::Relaxed)
    }

    /// Drops the current connection; the next call dials again. For a caller that knows the
    /// connection is stale (e.g. the VM was restarted) or that keeps timing out on it.
    pub fn disconnect(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, AgentClient)>> {
        // The guarded value is replaced whole; a panic elsewhere cannot leave it half-written.
        self.shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The live connection, dialing first if there is none. Dialing happens under the lock, so
    /// concurrent callers wait for one dial instead of racing several.
    fn connection(&self) -> Result<(u64, AgentClient), RpcError> {
        let mut current = self.lock();
        if let Some((generation, client)) = current.as_ref() {
            return Ok((*generation, client.with_timeout(self.timeout)));
        }
        let client = AgentClient::new((self.shared.connector)().map_err(RpcError::Connect)?);
        let generation = self.shared.dials.fetch_add(1, Ordering::Relaxed) + 1;
        *current = Some((generation, client.clone()));
        Ok((generation, client.with_timeout(self.timeout)))
    }

    /// Forgets connection `generation` after it was found lost, unless another caller already
    /// replaced it.
    fn forget(&self, generation: u64) {
        let mut current = self.lock();
        if matches!(current.as_ref(), Some((g, _)) if *g == generation) {
            *current = None;
        }
    }

    /// Runs `call` once. If the connection turns out lost, it is dropped (the next call dials
    /// again) and the error is returned: for RPCs that must not run twice, which may have run
    /// before the connection broke.
    pub fn call_once<T>(
        &self,
        call: impl FnOnce(&AgentClient) -> Result<T, RpcError>,
    ) -> Result<T, RpcError> {
        let (generation, client) = self.connection()?;
        let result = call(&client);
        if matches!(&result, Err(e) if e.is_connection_lost()) {
            self.forget(generation);
        }
        result
    }

    /// Runs `call`; if the connection turns out lost, dials again and runs it once more. Only
    /// for idempotent RPCs.
    fn call_idempotent<T>(
        &self,
        call: impl Fn(&AgentClient) -> Result<T, RpcError>,
    ) -> Result<T, RpcError> {
        match self.call_once(&call) {
            Err(e) if e.is_connection_lost() => self.call_once(&call),
            other => other,
        }
    }

    /// [`AgentClient::version`], retried after a reconnection.
    pub fn version(&self) -> Result<agent::VersionResponse, RpcError> {
        self.call_idempotent(|c| c.version())
    }

    /// [`AgentClient::ping`], retried after a reconnection.
    pub fn ping(&self, nonce: u64) -> Result<u64, RpcError> {
        self.call_idempotent(|c| c.ping(nonce))
    }

    /// [`AgentClient::health`], retried after a reconnection.
    pub fn health(&self) -> Result<agent::HealthResponse, RpcError> {
        self.call_idempotent(|c| c.health())
    }

    /// [`AgentClient::guest_info`], retried after a reconnection.
    pub fn guest_info(&self) -> Result<agent::GuestInfoResponse, RpcError> {
        self.call_idempotent(|c| c.guest_info())
    }

    /// [`AgentClient::stats_container`], retried after a reconnection.
    pub fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<agent::StatsContainerResponse, RpcError> {
        self.call_idempotent(|c| c.stats_container(container_id))
    }

    /// [`AgentClient::list_processes`], retried after a reconnection.
    pub fn list_processes(&self, container_id: &str) -> Result<Vec<agent::ProcessInfo>, RpcError> {
        self.call_idempotent(|c| c.list_processes(container_id))
    }

    /// [`AgentClient::get_events`], retried after a reconnection: the agent keeps its event log
    /// across connections, so the same `after_seq` loses nothing.
    pub fn get_events(
        &self,
        after_seq: u64,
        max_events: u32,
        wait: Duration,
    ) -> Result<agent::GetEventsResponse, RpcError> {
        self.call_idempotent(|c| c.get_events(after_seq, max_events, wait))
    }

    /// [`AgentClient::wait_process`], retried after a reconnection (the wait starts over).
    pub fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<agent::WaitProcessResponse, RpcError> {
        self.call_idempotent(|c| c.wait_process(container_id, exec_id))
    }

    /// [`AgentClient::block_size`], retried after a reconnection.
    pub fn block_size(&self, device: &BlockTarget) -> Result<u64, RpcError> {
        self.call_idempotent(|c| c.block_size(device.clone()))
    }

    /// [`AgentClient::read_block`], retried after a reconnection.
    pub fn read_block(
        &self,
        device: &BlockTarget,
        offset: u64,
        length: u32,
    ) -> Result<agent::ReadBlockResponse, RpcError> {
        self.call_idempotent(|c| c.read_block(device.clone(), offset, length))
    }

    /// [`AgentClient::read_stream_from`] (an acknowledged read: repeating it returns the same
    /// bytes), retried after a reconnection.
    pub fn read_stream_from(
        &self,
        container_id: &str,
        exec_id: &str,
        stream: agent::Stream,
        offset: u64,
        max_bytes: u32,
        wait: Duration,
    ) -> Result<agent::ReadStreamResponse, RpcError> {
        self.call_idempotent(|c| {
            c.read_stream_from(container_id, exec_id, stream, offset, max_bytes, wait)
        })
    }
}
