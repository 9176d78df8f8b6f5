//! A pod's in-memory state and its locks.
//!
//! Locks, in the order they may be taken (never the other way round):
//! 1. `Pod::op`: serializes the pod's lifecycle (run, stop, remove); held across the VM boot
//!    and the agent calls of that operation, so only requests for the same pod wait on it.
//! 2. A container's `op` lock: serializes create/start/stop/remove of one container.
//! 3. `Pod::drives`: attaching and detaching spare drives (a control request and a short
//!    poll of the guest).
//! 4. `Pod::data`: the records; held only to read or update them (and to write the record
//!    file), never across an agent call, a control request or a wait.
//!
//! The manager's table locks are taken only to look up or insert, never while holding these.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use protocol::client::ReconnectingClient;

use crate::layout::Layout;
use crate::lock;
use crate::logs::{Forwarders, LogWriter};
use crate::process::{VmmExit, VmmProcess};
use crate::record::{ContainerRecord, ContainerState, PodRecord, PodState};
use crate::store;

/// A container's log forwarders and their file.
#[derive(Clone)]
pub struct LogHandle {
    /// The forwarder threads' control.
    pub forwarders: Arc<Forwarders>,
    /// The file.
    pub writer: Arc<Mutex<LogWriter>>,
}

/// A container in memory.
pub struct ContainerEntry {
    /// The record.
    pub record: ContainerRecord,
    /// Serializes operations on this container.
    pub op: Arc<Mutex<()>>,
    /// Log forwarding, when the container has a log path.
    pub logs: Option<LogHandle>,
}

/// One spare drive of the VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriveSlot {
    /// The rootfs disk attached, if any.
    pub disk: Option<PathBuf>,
    /// Containers using it.
    pub users: usize,
}

/// The mutable part of a pod.
pub struct PodData {
    /// The record.
    pub record: PodRecord,
    /// Its containers.
    pub containers: BTreeMap<String, ContainerEntry>,
    /// The spare drives, by index.
    pub drives: Vec<DriveSlot>,
    /// The agent, while the VM runs.
    pub agent: Option<ReconnectingClient>,
    /// The VMM, while it runs.
    pub vmm: Option<Arc<VmmProcess>>,
    /// A stop (or a failed boot's clean-up) is under way or done: the supervisor and the
    /// event thread leave the state to it.
    pub stopping: bool,
    /// Removed: everything is gone.
    pub removed: bool,
}

/// A pod.
pub struct Pod {
    /// The id.
    pub id: String,
    /// Lifecycle lock.
    pub op: Mutex<()>,
    /// Drive attach/detach lock.
    pub drives: Mutex<()>,
    /// The records.
    pub data: Mutex<PodData>,
    /// How the VMM ended, once the supervisor saw it.
    vmm_exit: Mutex<Option<VmmExit>>,
    vmm_exit_cv: Condvar,
}

impl Pod {
    /// A pod around `record`, with `spare_drives` empty drives.
    pub fn new(record: PodRecord, spare_drives: u8) -> Arc<Pod> {
        Arc::new(Pod {
            id: record.spec.id.clone(),
            op: Mutex::new(()),
            drives: Mutex::new(()),
            data: Mutex::new(PodData {
                record,
                containers: BTreeMap::new(),
                drives: vec![DriveSlot::default(); usize::from(spare_drives)],
                agent: None,
                vmm: None,
                stopping: false,
                removed: false,
            }),
            vmm_exit: Mutex::new(None),
            vmm_exit_cv: Condvar::new(),
        })
    }

    /// The records.
    pub fn data(&self) -> MutexGuard<'_, PodData> {
        lock(&self.data)
    }

    /// Called by the supervisor when the VMM is gone.
    pub fn note_vmm_exit(&self, exit: VmmExit) {
        *lock(&self.vmm_exit) = Some(exit);
        self.vmm_exit_cv.notify_all();
    }

    /// How the VMM ended, if it has.
    pub fn vmm_exit(&self) -> Option<VmmExit> {
        lock(&self.vmm_exit).clone()
    }

    /// Waits up to `timeout` for the supervisor to note the VMM's exit.
    pub fn wait_vmm_exit(&self, timeout: Duration) -> Option<VmmExit> {
        let deadline = Instant::now() + timeout;
        let mut exit = lock(&self.vmm_exit);
        loop {
            if exit.is_some() {
                return exit.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            exit = self
                .vmm_exit_cv
                .wait_timeout(exit, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

impl PodData {
    /// Whether containers can be created and started.
    pub fn is_ready(&self) -> bool {
        self.record.state == PodState::Ready && !self.stopping && !self.removed
    }

    /// Writes the pod record; failures are logged (the in-memory state stays authoritative
    /// until the next successful write).
    pub fn persist(&self, layout: &Layout) {
        if self.removed {
            return;
        }
        if let Err(e) = store::write_json(&layout.pod_record(self.record.id()), &self.record) {
            log::error!("pod {}: {}", self.record.id(), crate::error_chain(&e));
        }
    }

    /// Writes a container record (see [`PodData::persist`]).
    pub fn persist_container(&self, layout: &Layout, id: &str) {
        if self.removed {
            return;
        }
        if let Some(c) = self.containers.get(id) {
            let path = layout.container_record(&c.record.pod_id, id);
            if let Err(e) = store::write_json(&path, &c.record) {
                log::error!("container {id}: {}", crate::error_chain(&e));
            }
        }
    }

    /// Ids of the containers in `states`.
    pub fn containers_in(&self, states: &[ContainerState]) -> Vec<String> {
        self.containers
            .iter()
            .filter(|(_, c)| states.contains(&c.record.state))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Drive usage rebuilt from the container records (after recovery).
    pub fn rebuild_drives(&mut self) {
        for slot in &mut self.drives {
            *slot = DriveSlot::default();
        }
        for c in self.containers.values() {
            if let Some(slot) = self.drives.get_mut(usize::from(c.record.drive)) {
                slot.disk = Some(c.record.rootfs_disk.clone());
                slot.users += 1;
            }
        }
    }
}
