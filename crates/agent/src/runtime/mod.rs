//! The container runtime: OCI containers as namespaced processes of the agent.
//! (`runtime` rather than `container`, which names the per-container state module inside.)
//!
//! - [`spec`]: the OCI runtime spec, validated and turned into a [`spec::ChildPlan`] (everything
//!   the cloned child needs, allocated before the clone).
//! - [`rootfs`]: the child's mount namespace (bind rootfs, /proc, /sys, /dev, pivot_root).
//! - [`process`]: clone into new namespaces, the child's side up to `execve`, and the parent's
//!   side of the create/start handshake.
//! - [`stdio`]: bounded output buffers fed by pipe reader threads.
//! - [`container`]: one container's state; [`Containers`], the id-keyed table the service uses.
//!
//! Every mount a container needs lives in its own mount namespace, so removing a container (its
//! last process dying) leaves nothing mounted in the agent's namespace. Children are spawned
//! through [`crate::reaper::Reaper::spawn_owned`]: the reaper thread is the only `waitpid` caller.

pub mod cgroup;
pub mod container;
pub mod disks;
pub mod events;
pub mod files;
pub mod process;
pub mod rootfs;
pub mod sandbox;
pub mod seccomp;
pub mod security;
pub mod spec;
pub mod stdio;

pub use container::{Container, Containers};

/// A container operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The container id is not of the form `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
    #[error("invalid container id {0:?}")]
    InvalidId(String),
    /// The request is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The OCI spec could not be parsed or is not supported.
    #[error("invalid OCI spec: {0}")]
    InvalidSpec(String),
    /// No container with this id.
    #[error("container {0:?} not found")]
    NotFound(String),
    /// No such process in the container (only the init process, exec_id "", exists so far).
    #[error("process {exec_id:?} not found in container {container_id:?}")]
    ExecNotFound {
        container_id: String,
        exec_id: String,
    },
    /// A container with this id exists.
    #[error("container {0:?} already exists")]
    AlreadyExists(String),
    /// The system is not in a state that allows the request (e.g. no cgroups for limits).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The request asks for something this agent does not do yet.
    #[error("not implemented: {0}")]
    Unimplemented(&'static str),
    /// The container is not in a state that allows the operation.
    #[error("container {id:?} is {state}")]
    InvalidState { id: String, state: &'static str },
    /// The child failed while setting up the container, before execve.
    #[error("container setup failed: {0}")]
    Setup(String),
    /// execve of the container's process failed.
    #[error("starting the container process failed: {0}")]
    Exec(String),
    /// The process's stdin is closed.
    #[error("stdin is closed")]
    StdinClosed,
    /// The process did not exit in time.
    #[error("the process has not exited before the deadline")]
    Timeout,
    /// A system call in the agent failed.
    #[error("{what} failed")]
    Sys {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
}

impl ContainerError {
    fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> ContainerError {
        move |source| ContainerError::Sys { what, source }
    }
}

/// Checks a container id: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
pub fn validate_id(id: &str) -> Result<(), ContainerError> {
    let mut chars = id.chars();
    let ok = id.len() <= 128
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::InvalidId(id.to_owned()))
    }
}

/// Unix time now, in nanoseconds.
pub fn now_unix_nanos() -> i64 {
    unix_nanos()
}

fn unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["a", "pod-1_c.2", &"x".repeat(128)] {
            validate_id(ok).unwrap();
        }
        for bad in ["", "-a", ".", "a/b", "a b", "ä", &"x".repeat(129)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }
}
