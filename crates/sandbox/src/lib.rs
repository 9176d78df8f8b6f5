//! The sandbox manager: a Kubernetes pod is a microVM.
//!
//! Used by both front ends (hyperd's CRI server and the containerd shim). The API is
//! synchronous and thread-safe: share one `Arc<SandboxManager>` and call it from blocking
//! threads (`spawn_blocking`).
//!
//! - Pods ([`SandboxManager::run_pod`]): one `hyper-vmm` process per pod, sized from the pod's
//!   resources ([`sizing`]), started in the pod's network namespace, supervised by a thread;
//!   its agent configures the guest network and the pod's namespaces.
//! - Containers ([`SandboxManager::create_container`]): the image's ext4 rootfs disk is
//!   attached to a spare drive of the VM (shared by the pod's containers of the same image),
//!   CRI mounts are copied into the guest, the agent runs the OCI spec.
//! - Logs ([`logs`]): CRI-format files fed from the agent's output buffers.
//! - Events ([`events`]): container exits from the agent's event log, VM deaths from the
//!   supervisor, for [`SandboxManager::subscribe`].
//! - Persistence and recovery ([`store`], [`SandboxManager::recover`]): one directory per pod
//!   under the state root, atomic JSON records; a restarted manager re-attaches to the VMMs
//!   still running and marks the others' pods NOTREADY.
//!
//! Locking is described in [`pod`]: a global table lock for lookups and inserts only, and per
//! pod an operation lock plus a data lock that is never held across a boot or an agent call.

pub mod config;
mod containers;
pub mod control;
pub mod error;
pub mod events;
mod exec;
pub mod files;
pub mod layout;
mod lifecycle;
pub mod logs;
mod manager;
pub mod oci;
pub mod pod;
pub mod process;
pub mod record;
mod recover;
pub mod sizing;
pub mod spec;
pub mod stats;
pub mod store;
mod watch;

use std::sync::{Mutex, MutexGuard, PoisonError};

pub use config::ManagerConfig;
pub use error::{ErrorKind, Result, SandboxError};
pub use events::{ContainerEvent, EventKind};
pub use exec::ExecResult;
pub use manager::{RecoveryReport, Removed, SandboxManager};
pub use record::{
    ContainerRecord, ContainerState, GuestMount, PodNamespaces, PodRecord, PodState, VmmIdentity,
};
pub use sizing::{vm_size, VmSize};
pub use spec::{ContainerSpec, Dns, FileToCopy, GuestNetwork, PodResources, PodSpec};
pub use stats::{ContainerStats, InterfaceStats, PodStats};

/// Unix time now, in nanoseconds.
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Locks a mutex; a panic elsewhere while it was held does not make the state unusable (every
/// guarded value here is updated in single assignments or is a plain record).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An error with its sources, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
