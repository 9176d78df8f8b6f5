//! [`SandboxManager`]: the public API, the pod and container tables, and the helper threads.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::ManagerConfig;
use crate::error::{Result, SandboxError};
use crate::events::{ContainerEvent, EventBus};
use crate::exec::ExecResult;
use crate::layout::Layout;
use crate::lock;
use crate::pod::Pod;
use crate::record::{ContainerRecord, PodRecord};
use crate::spec::{ContainerSpec, PodSpec};
use crate::stats::{ContainerStats, PodStats};

/// What a remove call found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removed {
    /// It existed and is gone now.
    Removed,
    /// The id is unknown (never existed, or already removed). CRI wants RemovePodSandbox and
    /// RemoveContainer of unknown ids to succeed; the front end decides.
    Unknown,
}

/// What [`SandboxManager::recover`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Pods whose VMM still runs: re-attached, READY.
    pub reattached: Vec<String>,
    /// Pods whose VMM is gone: NOTREADY, their containers EXITED.
    pub lost: Vec<String>,
    /// Pods that stayed NOTREADY (stopped before the restart).
    pub stopped: Vec<String>,
    /// Pods caught in the middle of their creation: cleaned up.
    pub cleaned: Vec<String>,
    /// Directories whose record could not be read: left alone, with the reason.
    pub unreadable: Vec<(String, String)>,
}

/// Shared by the manager handle and its threads.
pub(crate) struct Inner {
    pub cfg: ManagerConfig,
    pub layout: Layout,
    pub pods: Mutex<HashMap<String, Arc<Pod>>>,
    /// Container id -> pod id.
    pub containers: Mutex<HashMap<String, String>>,
    pub bus: EventBus,
    pub shutdown: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    /// Starts a helper thread, tracked so that shutdown can join it.
    pub fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) -> Result<()> {
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(f)
            .map_err(|source| SandboxError::Thread { name, source })?;
        let mut threads = lock(&self.threads);
        threads.retain(|h| !h.is_finished());
        threads.push(handle);
        Ok(())
    }

    pub fn is_shut_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// The pod, or `PodNotFound`.
    pub fn pod(&self, id: &str) -> Result<Arc<Pod>> {
        lock(&self.pods)
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::PodNotFound(id.to_owned()))
    }

    /// The pod holding a container and the container's operation lock.
    pub fn container(&self, id: &str) -> Result<(Arc<Pod>, Arc<Mutex<()>>)> {
        let not_found = || SandboxError::ContainerNotFound(id.to_owned());
        let pod_id = lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(not_found)?;
        let pod = lock(&self.pods)
            .get(&pod_id)
            .cloned()
            .ok_or_else(not_found)?;
        let op = pod
            .data()
            .containers
            .get(id)
            .map(|c| c.op.clone())
            .ok_or_else(not_found)?;
        Ok((pod, op))
    }

    fn stop_threads(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// The sandbox manager. Dropping the last handle stops its threads (within a few seconds: the
/// agent long polls end) but leaves every VM running, as a hyperd restart must.
pub struct SandboxManager {
    inner: Arc<Inner>,
}

impl Drop for SandboxManager {
    fn drop(&mut self) {
        self.inner.stop_threads();
    }
}

impl SandboxManager {
    /// A manager over `cfg.state_root` (created if missing). Call [`SandboxManager::recover`]
    /// next to take over the pods a previous instance left.
    pub fn new(cfg: ManagerConfig) -> Result<Arc<SandboxManager>> {
        cfg.validate()?;
        for dir in [&cfg.state_root, &cfg.log_dir] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(SandboxError::io("creating", dir))?;
        }
        let layout = Layout::new(&cfg.state_root, &cfg.log_dir);
        Ok(Arc::new(SandboxManager {
            inner: Arc::new(Inner {
                cfg,
                layout,
                pods: Mutex::new(HashMap::new()),
                containers: Mutex::new(HashMap::new()),
                bus: EventBus::default(),
                shutdown: AtomicBool::new(false),
                threads: Mutex::new(Vec::new()),
            }),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &ManagerConfig {
        &self.inner.cfg
    }

    /// Whether a pod id of `len` characters keeps the pod's socket and log paths within
    /// the `sockaddr_un` limit under the configured directories (a daemon checks its id
    /// length at start-up instead of refusing every pod later).
    pub fn id_len_fits(&self, len: usize) -> bool {
        self.inner.layout.paths_fit(&"0".repeat(len))
    }

    /// Takes over the pods recorded under the state root (after a hyperd restart): re-attaches
    /// to VMMs that still run (same pid, start time and command line), reconnects their agents,
    /// restarts log forwarding and event watching; pods whose VMM is gone become NOTREADY with
    /// their containers EXITED ("VMM exited", exit code 255); half-created pods are removed.
    pub fn recover(&self) -> Result<RecoveryReport> {
        self.inner.recover()
    }

    /// Starts a pod's VM and returns its record once the pod is READY. On failure nothing is
    /// left: no VMM process, no socket, no state directory (the VMM and console logs stay in
    /// the log directory for diagnosis, and their tails are in the error).
    pub fn run_pod(&self, spec: PodSpec) -> Result<PodRecord> {
        self.inner.run_pod(spec)
    }

    /// Stops a pod: its running containers get their stop signal, then SIGKILL after
    /// `timeout`; then the VM stops (graceful power-off for a moment, then SIGKILL). The pod is
    /// NOTREADY afterwards. Idempotent; `PodNotFound` for an unknown id.
    pub fn stop_pod(&self, id: &str, timeout: Duration) -> Result<()> {
        self.inner.stop_pod(id, timeout)
    }

    /// Removes a pod: stops it if needed (containers are killed at once), deletes its records,
    /// state directory and VM logs. Idempotent: an unknown id gives [`Removed::Unknown`].
    pub fn remove_pod(&self, id: &str) -> Result<Removed> {
        self.inner.remove_pod(id)
    }

    /// A pod's record.
    pub fn pod_status(&self, id: &str) -> Result<PodRecord> {
        Ok(self.inner.pod(id)?.data().record.clone())
    }

    /// Every pod's record (pods being created included, in state CREATING).
    pub fn list_pods(&self) -> Vec<PodRecord> {
        let pods: Vec<Arc<Pod>> = lock(&self.inner.pods).values().cloned().collect();
        let mut out: Vec<PodRecord> = pods
            .iter()
            .map(|p| p.data())
            .filter(|d| !d.removed)
            .map(|d| d.record.clone())
            .collect();
        out.sort_by_key(|a| a.created_at_nanos);
        out
    }

    /// Creates a container in a READY pod (CREATED afterwards).
    pub fn create_container(&self, pod_id: &str, spec: ContainerSpec) -> Result<ContainerRecord> {
        self.inner.create_container(pod_id, spec)
    }

    /// Starts a CREATED container.
    pub fn start_container(&self, id: &str) -> Result<ContainerRecord> {
        self.inner.start_container(id)
    }

    /// Stops a running container: its stop signal, then SIGKILL after `timeout` (0: SIGKILL at
    /// once). Idempotent for a container that is not running.
    pub fn stop_container(&self, id: &str, timeout: Duration) -> Result<()> {
        self.inner.stop_container(id, timeout)
    }

    /// Removes a container (killing it if it runs) and frees its drive. Idempotent.
    pub fn remove_container(&self, id: &str) -> Result<Removed> {
        self.inner.remove_container(id)
    }

    /// A container's record.
    pub fn container_status(&self, id: &str) -> Result<ContainerRecord> {
        self.inner.container_status(id)
    }

    /// Containers, of one pod or of all.
    pub fn list_containers(&self, pod_id: Option<&str>) -> Vec<ContainerRecord> {
        self.inner.list_containers(pod_id)
    }

    /// Runs `cmd` in a running container and returns its exit code and output. With a
    /// `timeout` (`None` or zero: none), a command still running then is killed and
    /// [`SandboxError::ExecTimeout`] returned.
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Option<Duration>,
    ) -> Result<ExecResult> {
        self.inner.exec_sync(id, cmd, timeout)
    }

    /// A container's usage.
    pub fn container_stats(&self, id: &str) -> Result<ContainerStats> {
        self.inner.container_stats(id)
    }

    /// A pod's usage, the VM's cost on the host included.
    pub fn pod_stats(&self, pod_id: &str) -> Result<PodStats> {
        self.inner.pod_stats(pod_id)
    }

    /// Applies new cgroup limits (OCI `linux.resources` JSON) to a container.
    pub fn update_container_resources(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        self.inner.update_container_resources(id, resources_json)
    }

    /// Reopens a running container's log file (after the log was rotated).
    pub fn reopen_log(&self, id: &str) -> Result<()> {
        self.inner.reopen_log(id)
    }

    /// Subscribes to container and pod events.
    pub fn subscribe(&self) -> Receiver<ContainerEvent> {
        self.inner.bus.subscribe()
    }
}
