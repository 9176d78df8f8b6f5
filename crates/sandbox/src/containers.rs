//! Container operations: create (drive attach, file copies, spec), start, stop, remove,
//! status, stats, resource updates and log reopening.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::agent as pb;
use protocol::client::{BlockTarget, ReconnectingClient};

use crate::control;
use crate::error::{is_not_found, Result, SandboxError};
use crate::events::{ContainerEvent, EventKind};
use crate::files::{self, Plan};
use crate::lifecycle::{wait_exit_until, KILL_WAIT, LOG_DRAIN_TIMEOUT};
use crate::manager::{Inner, Removed};
use crate::oci;
use crate::pod::{ContainerEntry, DriveSlot, Pod};
use crate::record::{
    ContainerRecord, ContainerState, ExitInfo, GuestMount, PodNamespaces, REASON_START_ERROR,
    RECORD_VERSION, START_ERROR_EXIT_CODE,
};
use crate::spec::{validate_id, ContainerSpec};
use crate::stats::{ContainerStats, PodStats};
use crate::{error_chain, lock, now_nanos, process, store};

/// How long the guest may take to see a drive's new capacity.
const DRIVE_WAIT: Duration = Duration::from_secs(10);
/// The backing of an empty spare drive.
const EMPTY_DRIVE: &str = "/dev/null";

fn drive_id(index: u8) -> String {
    format!("spare{index}")
}

impl Inner {
    /// The pod's agent and setup, if the pod is READY.
    fn ready_agent(&self, pod: &Pod) -> Result<(ReconnectingClient, PodNamespaces)> {
        let data = pod.data();
        match (&data.agent, &data.record.namespaces, data.is_ready()) {
            (Some(a), Some(ns), true) => Ok((a.clone(), ns.clone())),
            _ => Err(SandboxError::PodNotReady {
                id: pod.id.clone(),
                state: data.record.state,
            }),
        }
    }

    pub(crate) fn create_container(
        self: &Arc<Self>,
        pod_id: &str,
        spec: ContainerSpec,
    ) -> Result<ContainerRecord> {
        validate_id("container", &spec.id)?;
        let pod = self.pod(pod_id)?;
        let (agent, ns) = self.ready_agent(&pod)?;
        // Everything that can be refused is checked before anything is reserved.
        oci::prepare(&spec.oci_spec_json, &ns, &[])?;
        let disk = std::fs::canonicalize(&spec.rootfs_disk)
            .ok()
            .filter(|d| d.is_file())
            .ok_or_else(|| {
                SandboxError::InvalidArgument(format!(
                    "rootfs disk {} is not a file",
                    spec.rootfs_disk.display()
                ))
            })?;
        if let Some(log) = spec.log_path.as_ref().filter(|l| !l.is_absolute()) {
            return Err(SandboxError::InvalidArgument(format!(
                "log path {} is not absolute (join CRI's log_directory and log_path)",
                log.display()
            )));
        }
        let plan = files::plan(&spec.id, &spec.files)?;
        {
            let mut index = lock(&self.containers);
            if index.contains_key(&spec.id) {
                return Err(SandboxError::AlreadyExists {
                    kind: "container",
                    id: spec.id,
                });
            }
            index.insert(spec.id.clone(), pod_id.to_owned());
        }
        let id = spec.id.clone();
        let result = self.create_reserved(&pod, &agent, &ns, spec, &disk, plan);
        if result.is_err() {
            lock(&self.containers).remove(&id);
        }
        result
    }

    fn create_reserved(
        self: &Arc<Self>,
        pod: &Arc<Pod>,
        agent: &ReconnectingClient,
        ns: &PodNamespaces,
        spec: ContainerSpec,
        disk: &Path,
        plan: Plan,
    ) -> Result<ContainerRecord> {
        let drive = self.attach_drive(pod, agent, disk)?;
        let op = Arc::new(Mutex::new(()));
        let _op = lock(&op);
        let mut record = ContainerRecord {
            version: RECORD_VERSION,
            id: spec.id.clone(),
            pod_id: pod.id.clone(),
            name: spec.name.clone(),
            attempt: spec.attempt,
            image_ref: spec.image_ref.clone(),
            image_id: spec.image_id.clone(),
            labels: spec.labels.clone(),
            annotations: spec.annotations.clone(),
            log_path: spec.log_path.clone(),
            tty: spec.tty,
            stdin: spec.stdin,
            state: ContainerState::Creating,
            created_at_nanos: now_nanos(),
            started_at_nanos: 0,
            finished_at_nanos: 0,
            exit_code: None,
            signal: 0,
            oom_killed: false,
            reason: String::new(),
            message: String::new(),
            rootfs_disk: disk.to_path_buf(),
            drive,
            guest_pid: 0,
            mounts: Vec::new(),
            process: serde_json::Value::Null,
            stop_signal: spec.stop_signal.unwrap_or(libc::SIGTERM),
        };
        {
            // Recorded before the agent sees it, so a crash in between leaves a trace.
            let mut data = pod.data();
            if !data.is_ready() {
                drop(data);
                self.release_drive(pod, drive);
                return Err(SandboxError::PodNotReady {
                    id: pod.id.clone(),
                    state: pod.data().record.state,
                });
            }
            data.containers.insert(
                record.id.clone(),
                ContainerEntry {
                    record: record.clone(),
                    op: op.clone(),
                    logs: None,
                },
            );
            data.persist_container(&self.layout, &record.id);
        }
        match self.create_in_agent(agent, ns, &spec, &mut record, plan) {
            Ok(()) => {}
            Err(e) => {
                self.abort_create(pod, agent, &record.id, drive);
                return Err(e);
            }
        }
        let logs = match self.start_forwarders(agent, &record) {
            Ok(l) => l,
            Err(e) => {
                self.abort_create(pod, agent, &record.id, drive);
                return Err(e);
            }
        };
        record.state = ContainerState::Created;
        {
            let mut data = pod.data();
            if let Some(c) = data.containers.get_mut(&record.id) {
                c.record = record.clone();
                c.logs = logs;
            }
            data.persist_container(&self.layout, &record.id);
        }
        self.bus.publish(ContainerEvent::container(
            &pod.id,
            &record.id,
            EventKind::Created,
        ));
        log::info!(
            "container {} created in pod {} on {}",
            record.id,
            pod.id,
            drive_id(drive)
        );
        Ok(record)
    }

    /// Copies the files, rewrites the spec and creates the container in the agent.
    fn create_in_agent(
        &self,
        agent: &ReconnectingClient,
        ns: &PodNamespaces,
        spec: &ContainerSpec,
        record: &mut ContainerRecord,
        plan: Plan,
    ) -> Result<()> {
        let mounts = copy_files(agent, ns, plan)?;
        let prepared = oci::prepare(&spec.oci_spec_json, ns, &mounts)?;
        let rootfs =
            pb::Rootfs::from_block_serial(drive_id(record.drive), prepared.root_readonly, true);
        let json = prepared.json;
        record.guest_pid = agent
            .call_once(|c| c.create_container(&record.id, json, rootfs))
            .map_err(SandboxError::agent("CreateContainer"))?;
        record.mounts = mounts;
        record.process = prepared.process;
        Ok(())
    }

    pub(crate) fn abort_create(&self, pod: &Pod, agent: &ReconnectingClient, id: &str, drive: u8) {
        if let Err(e) = agent.call_once(|c| c.remove_container(id)) {
            if !is_not_found(&e) {
                log::warn!("container {id}: clean-up: {}", error_chain(&e));
            }
        }
        let removed = pod.data().containers.remove(id);
        if let Some(l) = removed.and_then(|c| c.logs) {
            l.forwarders.stop();
        }
        if let Err(e) = store::remove(&self.layout.container_record(&pod.id, id)) {
            log::warn!("container {id}: {}", error_chain(&e));
        }
        let _ = std::fs::remove_file(self.layout.log_cursor(&pod.id, id));
        self.release_drive(pod, drive);
    }

    /// Attaches `disk` to a spare drive (or shares the drive that already holds it) and waits
    /// until the guest sees it.
    fn attach_drive(&self, pod: &Pod, agent: &ReconnectingClient, disk: &Path) -> Result<u8> {
        let _drives = lock(&pod.drives);
        let (index, fresh) = {
            let mut data = pod.data();
            let count = data.drives.len();
            if let Some(i) = data
                .drives
                .iter()
                .position(|d| d.disk.as_deref() == Some(disk))
            {
                data.drives[i].users += 1;
                (i, false)
            } else if let Some(i) = data.drives.iter().position(|d| d.disk.is_none()) {
                data.drives[i] = DriveSlot {
                    disk: Some(disk.to_path_buf()),
                    users: 1,
                };
                (i, true)
            } else {
                return Err(SandboxError::NoFreeDrive {
                    pod: pod.id.clone(),
                    count: u8::try_from(count).unwrap_or(u8::MAX),
                });
            }
        };
        let index = u8::try_from(index).unwrap_or(u8::MAX);
        if fresh {
            let drive = drive_id(index);
            let attached = control::update_drive(&self.layout.control(&pod.id), &drive, disk, true)
                .and_then(|capacity| wait_capacity(agent, &drive, capacity));
            if let Err(e) = attached {
                let mut data = pod.data();
                if let Some(slot) = data.drives.get_mut(usize::from(index)) {
                    *slot = DriveSlot::default();
                }
                drop(data);
                let _ = control::update_drive(
                    &self.layout.control(&pod.id),
                    &drive,
                    Path::new(EMPTY_DRIVE),
                    false,
                );
                return Err(e);
            }
        }
        Ok(index)
    }

    /// One container less on a drive; the last one gives it back its empty backing (the agent
    /// has unmounted it by then: RemoveContainer releases the disk).
    fn release_drive(&self, pod: &Pod, index: u8) {
        let _drives = lock(&pod.drives);
        let (detach, ready) = {
            let mut data = pod.data();
            let ready = data.is_ready();
            match data.drives.get_mut(usize::from(index)) {
                Some(slot) if slot.users > 0 => {
                    slot.users -= 1;
                    if slot.users == 0 {
                        slot.disk = None;
                        (true, ready)
                    } else {
                        (false, ready)
                    }
                }
                _ => (false, ready),
            }
        };
        if detach && ready {
            if let Err(e) = control::update_drive(
                &self.layout.control(&pod.id),
                &drive_id(index),
                Path::new(EMPTY_DRIVE),
                false,
            ) {
                log::warn!(
                    "pod {}: detaching {}: {}",
                    pod.id,
                    drive_id(index),
                    error_chain(&e)
                );
            }
        }
    }

    pub(crate) fn start_container(self: &Arc<Self>, id: &str) -> Result<ContainerRecord> {
        let (pod, op) = self.container(id)?;
        let _op = lock(&op);
        let (agent, _) = self.ready_agent(&pod)?;
        {
            let data = pod.data();
            let state = data
                .containers
                .get(id)
                .map(|c| c.record.state)
                .ok_or_else(|| SandboxError::ContainerNotFound(id.to_owned()))?;
            if state != ContainerState::Created {
                return Err(SandboxError::ContainerState {
                    id: id.to_owned(),
                    state,
                    op: "start",
                });
            }
        }
        let started = agent.call_once(|c| c.start_container(id));
        let mut data = pod.data();
        let Some(c) = data.containers.get_mut(id) else {
            return Err(SandboxError::ContainerNotFound(id.to_owned()));
        };
        let event = match &started {
            // An exit seen by the event thread in the meantime stays recorded.
            Ok(_) if c.record.state.can_become(ContainerState::Running) => {
                c.record.state = ContainerState::Running;
                c.record.started_at_nanos = now_nanos();
                Some(EventKind::Started)
            }
            Ok(_) => None,
            Err(e) if c.record.state.can_become(ContainerState::Exited) => {
                c.record.set_exited(&ExitInfo {
                    status: START_ERROR_EXIT_CODE,
                    finished_at_nanos: now_nanos(),
                    reason: Some(REASON_START_ERROR.into()),
                    message: error_chain(e),
                    ..ExitInfo::default()
                });
                Some(EventKind::Stopped)
            }
            Err(_) => None,
        };
        let record = c.record.clone();
        data.persist_container(&self.layout, id);
        drop(data);
        if let Some(kind) = event {
            self.bus
                .publish(ContainerEvent::container(&pod.id, id, kind));
        }
        started.map_err(SandboxError::agent("StartContainer"))?;
        Ok(record)
    }

    pub(crate) fn stop_container(self: &Arc<Self>, id: &str, timeout: Duration) -> Result<()> {
        let (pod, op) = self.container(id)?;
        let _op = lock(&op);
        let (state, sig) = {
            let data = pod.data();
            let c = data
                .containers
                .get(id)
                .ok_or_else(|| SandboxError::ContainerNotFound(id.to_owned()))?;
            (c.record.state, c.record.stop_signal)
        };
        if state != ContainerState::Running {
            return Ok(());
        }
        // A pod that is not ready has had its containers marked exited.
        let Ok((agent, _)) = self.ready_agent(&pod) else {
            return Ok(());
        };
        let first = if timeout.is_zero() {
            libc::SIGKILL
        } else {
            sig
        };
        let first = u32::try_from(first).unwrap_or(libc::SIGTERM as u32);
        if let Err(e) = agent.call_once(|c| c.signal_process(id, "", first)) {
            log::debug!("container {id}: signal {first}: {}", error_chain(&e));
        }
        let mut exit = wait_exit_until(&agent, id, Instant::now() + timeout);
        if exit.is_none() {
            let kill = libc::SIGKILL as u32;
            agent
                .call_once(|c| c.signal_process(id, "", kill))
                .or_else(|e| if is_not_found(&e) { Ok(()) } else { Err(e) })
                .map_err(SandboxError::agent("SignalProcess"))?;
            exit = wait_exit_until(&agent, id, Instant::now() + KILL_WAIT);
        }
        match exit {
            Some(exit) => {
                self.container_exited(&pod, id, exit);
                Ok(())
            }
            None => Err(SandboxError::ContainerStopTimeout {
                id: id.to_owned(),
                waited: timeout + KILL_WAIT,
            }),
        }
    }

    pub(crate) fn remove_container(self: &Arc<Self>, id: &str) -> Result<Removed> {
        let Ok((pod, op)) = self.container(id) else {
            return Ok(Removed::Unknown);
        };
        let _op = lock(&op);
        let (state, logs, drive) = {
            let data = pod.data();
            let Some(c) = data.containers.get(id) else {
                return Ok(Removed::Unknown);
            };
            (c.record.state, c.logs.clone(), c.record.drive)
        };
        let agent = self.ready_agent(&pod).ok().map(|(a, _)| a);
        if let Some(agent) = &agent {
            if state == ContainerState::Running {
                let kill = libc::SIGKILL as u32;
                let _ = agent.call_once(|c| c.signal_process(id, "", kill));
                if let Some(exit) = wait_exit_until(agent, id, Instant::now() + KILL_WAIT) {
                    self.container_exited(&pod, id, exit);
                }
            }
        }
        if let Some(l) = &logs {
            if agent.is_some() {
                l.forwarders.wait_drained(LOG_DRAIN_TIMEOUT);
            }
            l.forwarders.stop();
        }
        if let Some(agent) = &agent {
            // The disk stays attached (and mounted in the guest) if the agent cannot remove
            // the container: the record stays too, for a retry.
            match agent.call_once(|c| c.remove_container(id)) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(SandboxError::agent("RemoveContainer")(e)),
            }
        }
        self.release_drive(&pod, drive);
        pod.data().containers.remove(id);
        store::remove(&self.layout.container_record(&pod.id, id))?;
        let _ = std::fs::remove_file(self.layout.log_cursor(&pod.id, id));
        lock(&self.containers).remove(id);
        self.bus
            .publish(ContainerEvent::container(&pod.id, id, EventKind::Deleted));
        log::info!("container {id} removed");
        Ok(Removed::Removed)
    }

    pub(crate) fn container_status(&self, id: &str) -> Result<ContainerRecord> {
        let (pod, _) = self.container(id)?;
        let data = pod.data();
        data.containers
            .get(id)
            .map(|c| c.record.clone())
            .filter(|r| r.state != ContainerState::Creating)
            .ok_or_else(|| SandboxError::ContainerNotFound(id.to_owned()))
    }

    pub(crate) fn list_containers(&self, pod_id: Option<&str>) -> Vec<ContainerRecord> {
        let pods: Vec<Arc<Pod>> = match pod_id {
            Some(p) => self.pod(p).into_iter().collect(),
            None => lock(&self.pods).values().cloned().collect(),
        };
        let mut out: Vec<ContainerRecord> = pods
            .iter()
            .flat_map(|p| {
                p.data()
                    .containers
                    .values()
                    .filter(|c| c.record.state != ContainerState::Creating)
                    .map(|c| c.record.clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_by_key(|a| a.created_at_nanos);
        out
    }

    /// The agent and the record of a container that has processes (CREATED or RUNNING).
    pub(crate) fn live_container(
        &self,
        id: &str,
        op: &'static str,
    ) -> Result<(Arc<Pod>, ReconnectingClient, ContainerRecord)> {
        let (pod, _) = self.container(id)?;
        let (agent, _) = self.ready_agent(&pod)?;
        let record = self.container_status(id)?;
        if !matches!(
            record.state,
            ContainerState::Created | ContainerState::Running
        ) {
            return Err(SandboxError::ContainerState {
                id: id.to_owned(),
                state: record.state,
                op,
            });
        }
        Ok((pod, agent, record))
    }

    pub(crate) fn container_stats(&self, id: &str) -> Result<ContainerStats> {
        let (_, agent, _) = self.live_container(id, "report stats")?;
        let r = agent
            .stats_container(id)
            .map_err(SandboxError::agent("StatsContainer"))?;
        Ok(ContainerStats::from_agent(id, &r))
    }

    pub(crate) fn pod_stats(&self, pod_id: &str) -> Result<PodStats> {
        let pod = self.pod(pod_id)?;
        let (agent, vmm, live) = {
            let data = pod.data();
            (
                data.agent.clone().filter(|_| data.is_ready()),
                data.vmm.clone(),
                data.containers_in(&[ContainerState::Created, ContainerState::Running]),
            )
        };
        let mut stats = PodStats {
            pod_id: pod_id.to_owned(),
            timestamp_nanos: now_nanos(),
            ..PodStats::default()
        };
        if let Some(agent) = &agent {
            for cid in live {
                match agent.stats_container(&cid) {
                    Ok(r) => stats.containers.push(ContainerStats::from_agent(&cid, &r)),
                    Err(e) => log::debug!("stats of {cid}: {}", error_chain(&e)),
                }
            }
        }
        if let Some(first) = stats.containers.first() {
            stats.interfaces = first.interfaces.clone();
        }
        if let Some(vmm) = vmm.filter(|v| !v.has_exited()) {
            stats.vmm_pid = vmm.pid();
            stats.vmm_rss_bytes = process::proc_rss_bytes(vmm.pid()).unwrap_or(0);
            stats.vmm_cpu_usage_nanos = process::proc_cpu_nanos(vmm.pid()).unwrap_or(0);
            match control::metrics(&self.layout.control(pod_id)) {
                Ok(m) => {
                    let get = |k: &str| m[k].as_u64().unwrap_or(0);
                    stats.guest_memory_bytes = get("guest_memory_bytes");
                    stats.guest_memory_touched_bytes = get("guest_memory_touched_bytes");
                    stats.vmm_overhead_bytes = get("vmm_overhead_bytes");
                }
                Err(e) => log::debug!("pod {pod_id}: metrics: {}", error_chain(&e)),
            }
        }
        Ok(stats)
    }

    pub(crate) fn update_container_resources(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        serde_json::from_slice::<serde_json::Value>(resources_json)
            .ok()
            .filter(serde_json::Value::is_object)
            .ok_or_else(|| {
                SandboxError::InvalidArgument("resources must be a JSON object".into())
            })?;
        let (_, agent, _) = self.live_container(id, "update resources")?;
        agent
            .call_once(|c| c.update_container(id, resources_json))
            .map_err(SandboxError::agent("UpdateContainer"))
    }

    pub(crate) fn reopen_log(&self, id: &str) -> Result<()> {
        let (pod, _) = self.container(id)?;
        let logs = {
            let data = pod.data();
            let c = data
                .containers
                .get(id)
                .ok_or_else(|| SandboxError::ContainerNotFound(id.to_owned()))?;
            if c.record.state != ContainerState::Running {
                return Err(SandboxError::ContainerState {
                    id: id.to_owned(),
                    state: c.record.state,
                    op: "reopen its log",
                });
            }
            c.logs.clone()
        };
        match logs {
            Some(l) => lock(&l.writer).reopen(),
            None => Ok(()),
        }
    }
}

/// Polls the guest until drive `drive` has `capacity` bytes.
fn wait_capacity(agent: &ReconnectingClient, drive: &str, capacity: u64) -> Result<()> {
    let start = Instant::now();
    let target = BlockTarget::Serial(drive.to_owned());
    loop {
        match agent.block_size(&target) {
            Ok(size) if size == capacity => return Ok(()),
            Ok(_) => {}
            Err(e) if start.elapsed() >= DRIVE_WAIT => {
                return Err(SandboxError::agent("BlockSize")(e));
            }
            Err(_) => {}
        }
        if start.elapsed() >= DRIVE_WAIT {
            return Err(SandboxError::DriveTimeout {
                drive: drive.to_owned(),
                expected: capacity,
                waited: DRIVE_WAIT,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes the planned files into the guest and returns the container's mounts: the files,
/// then the pod's resolv.conf and /etc/hostname unless the container brings its own.
fn copy_files(
    agent: &ReconnectingClient,
    ns: &PodNamespaces,
    plan: Plan,
) -> Result<Vec<GuestMount>> {
    let mut root = ns.store_root.clone();
    for f in &plan.files {
        let path = agent
            .call_once(|c| c.copy_file(&f.store_path, &f.data, f.mode, 0o755, f.uid, f.gid))
            .map_err(SandboxError::agent("CopyFile"))?;
        if root.is_none() {
            root = path
                .strip_suffix(f.store_path.as_str())
                .map(|r| r.trim_end_matches('/').to_owned());
        }
    }
    let mut mounts = Vec::new();
    for m in plan.mounts {
        let guest_path = match (&m.store_path, &root) {
            (None, _) => String::new(),
            (Some(p), Some(root)) => format!("{root}/{p}"),
            (Some(p), None) => {
                return Err(SandboxError::InvalidArgument(format!(
                    "cannot tell where the agent stored {p}"
                )))
            }
        };
        mounts.push(GuestMount {
            container_path: m.container_path,
            guest_path,
            read_only: m.read_only,
            host_path: m.host_path,
        });
    }
    let pod_files = [
        ("/etc/resolv.conf", &ns.resolv_conf),
        ("/etc/hostname", &ns.hostname_file),
    ];
    for (dest, src) in pod_files {
        if let Some(src) = src {
            if !mounts.iter().any(|m| m.container_path == dest) {
                mounts.push(GuestMount {
                    container_path: dest.into(),
                    guest_path: src.clone(),
                    read_only: false,
                    host_path: String::new(),
                });
            }
        }
    }
    Ok(mounts)
}
