//! The sandbox manager's error type, and the coarse kind the RPC front ends map to their status
//! codes (once, at their edge).

use std::path::PathBuf;
use std::time::Duration;

use protocol::RpcError;

use crate::record::{ContainerState, PodState};

/// What went wrong, coarsely: the front ends turn this into gRPC / ttrpc codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed.
    InvalidArgument,
    /// The pod or container does not exist.
    NotFound,
    /// The id is taken.
    AlreadyExists,
    /// The object is not in a state that allows the request.
    FailedPrecondition,
    /// A per-pod resource (spare drives) or a size limit is exhausted.
    ResourceExhausted,
    /// The operation did not finish in time.
    DeadlineExceeded,
    /// The VM or its agent cannot be reached.
    Unavailable,
    /// Anything else: I/O on the state directory, a VMM that misbehaves.
    Internal,
}

/// A sandbox manager error.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A request field is invalid; the message names it.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The manager configuration is invalid.
    #[error("invalid sandbox manager configuration: {0}")]
    InvalidConfig(String),
    /// No pod with this id.
    #[error("pod sandbox {0:?} not found")]
    PodNotFound(String),
    /// No container with this id.
    #[error("container {0:?} not found")]
    ContainerNotFound(String),
    /// The id is already in use.
    #[error("{kind} {id:?} already exists")]
    AlreadyExists {
        /// "pod sandbox" or "container".
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// The pod is not ready (its VM is stopped, being created or gone).
    #[error("pod sandbox {id:?} is {state}")]
    PodNotReady {
        /// The pod.
        id: String,
        /// Its state.
        state: PodState,
    },
    /// The container is not in a state that allows the operation.
    #[error("container {id:?} is {state}: cannot {op}")]
    ContainerState {
        /// The container.
        id: String,
        /// Its state.
        state: ContainerState,
        /// What was asked.
        op: &'static str,
    },
    /// Every spare drive of the pod holds another rootfs disk.
    #[error("pod sandbox {pod:?} has no free drive for a rootfs disk (all {count} are in use)")]
    NoFreeDrive {
        /// The pod.
        pod: String,
        /// Its spare drive count.
        count: u8,
    },
    /// A file to copy into the guest is larger than the per-file limit.
    #[error("{path} is {size} bytes, more than the {limit} bytes a copied file may have")]
    FileTooLarge {
        /// The host file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The files to copy into the guest for one container are too large together.
    #[error("the files copied for container {id:?} exceed {limit} bytes together")]
    FilesTooLarge {
        /// The container.
        id: String,
        /// The limit.
        limit: u64,
    },
    /// Reading or writing the state directory, a log or a host file failed.
    #[error("{what} {path} failed")]
    Io {
        /// What was done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A record on disk cannot be parsed.
    #[error("record {path} is corrupt")]
    CorruptRecord {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The VM configuration the manager built is invalid.
    #[error("invalid VM configuration")]
    VmConfig(#[source] vmm::config::ConfigError),
    /// `hyper-vmm` could not be started.
    #[error("cannot start {binary}")]
    Spawn {
        /// The VMM binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A helper thread could not be started.
    #[error("cannot start thread {name}")]
    Thread {
        /// The thread's name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VM did not come up: the VMM exited, or the agent did not answer in time.
    /// `details` carries the tails of the VMM log and the guest console.
    #[error("pod sandbox {id:?} did not boot: {reason}{details}")]
    Boot {
        /// The pod.
        id: String,
        /// What happened.
        reason: String,
        /// Log tails, formatted (may be empty).
        details: String,
    },
    /// The VMM could not be stopped (it survived SIGKILL: stuck in the kernel).
    #[error("hyper-vmm pid {pid} of pod sandbox {id:?} did not exit")]
    StopFailed {
        /// The pod.
        id: String,
        /// The VMM pid.
        pid: u32,
    },
    /// The VMM's control socket could not be used.
    #[error("VMM control socket {path}")]
    ControlIo {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM refused a control request.
    #[error("VMM control request {op} failed: {message}")]
    Control {
        /// The request's op.
        op: String,
        /// The VMM's error message.
        message: String,
    },
    /// An agent call failed.
    #[error("agent call {call} failed")]
    Agent {
        /// The RPC.
        call: &'static str,
        /// Why.
        #[source]
        source: RpcError,
    },
    /// The guest did not see a drive's new backing file in time.
    #[error("the guest did not see drive {drive} with {expected} bytes within {waited:?}")]
    DriveTimeout {
        /// The spare drive id.
        drive: String,
        /// The expected capacity.
        expected: u64,
        /// How long it was polled.
        waited: Duration,
    },
    /// An exec did not finish within its timeout; it was killed.
    #[error("command in container {id:?} did not finish within {timeout:?}; it was killed")]
    ExecTimeout {
        /// The container.
        id: String,
        /// The timeout.
        timeout: Duration,
    },
    /// A container did not exit after SIGKILL.
    #[error("container {id:?} did not exit within {waited:?}")]
    ContainerStopTimeout {
        /// The container.
        id: String,
        /// How long it was given.
        waited: Duration,
    },
    /// The OCI spec handed in is not usable.
    #[error("invalid OCI spec: {0}")]
    InvalidSpec(String),
}

impl SandboxError {
    /// The coarse kind, for the RPC edge.
    pub fn kind(&self) -> ErrorKind {
        use SandboxError as E;
        match self {
            E::InvalidArgument(_) | E::InvalidSpec(_) => ErrorKind::InvalidArgument,
            E::PodNotFound(_) | E::ContainerNotFound(_) => ErrorKind::NotFound,
            E::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            E::PodNotReady { .. } | E::ContainerState { .. } => ErrorKind::FailedPrecondition,
            E::NoFreeDrive { .. } | E::FileTooLarge { .. } | E::FilesTooLarge { .. } => {
                ErrorKind::ResourceExhausted
            }
            E::ExecTimeout { .. } | E::DriveTimeout { .. } | E::ContainerStopTimeout { .. } => {
                ErrorKind::DeadlineExceeded
            }
            E::Agent { source, .. } => match source.code() {
                Some(ttrpc::Code::NOT_FOUND) => ErrorKind::NotFound,
                Some(ttrpc::Code::INVALID_ARGUMENT) => ErrorKind::InvalidArgument,
                Some(ttrpc::Code::ALREADY_EXISTS) => ErrorKind::AlreadyExists,
                Some(ttrpc::Code::FAILED_PRECONDITION) => ErrorKind::FailedPrecondition,
                Some(ttrpc::Code::DEADLINE_EXCEEDED) => ErrorKind::DeadlineExceeded,
                Some(_) => ErrorKind::Internal,
                None => ErrorKind::Unavailable,
            },
            E::Boot { .. } | E::ControlIo { .. } => ErrorKind::Unavailable,
            E::InvalidConfig(_)
            | E::Io { .. }
            | E::CorruptRecord { .. }
            | E::VmConfig(_)
            | E::Spawn { .. }
            | E::Thread { .. }
            | E::StopFailed { .. }
            | E::Control { .. } => ErrorKind::Internal,
        }
    }

    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> SandboxError {
        let path = path.into();
        move |source| SandboxError::Io { what, path, source }
    }

    pub(crate) fn agent(call: &'static str) -> impl FnOnce(RpcError) -> SandboxError {
        move |source| SandboxError::Agent { call, source }
    }
}

/// Result with [`SandboxError`].
pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

/// Whether an agent error says the object is unknown to the agent.
pub(crate) fn is_not_found(e: &RpcError) -> bool {
    e.code() == Some(ttrpc::Code::NOT_FOUND)
}

/// Whether an agent error is the call's deadline passing (in the agent or in the client).
pub(crate) fn is_deadline(e: &RpcError) -> bool {
    match e {
        RpcError::Status { code, .. } => *code == ttrpc::Code::DEADLINE_EXCEEDED,
        // The sync client's own deadline (a recv_timeout on the reply channel).
        RpcError::Transport(ttrpc::Error::Others(m)) => {
            m.starts_with("Receive packet from Receiver timeout")
        }
        _ => false,
    }
}
