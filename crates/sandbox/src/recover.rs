//! Taking over the pods a previous manager left under the state root.

use std::sync::Arc;

use crate::error::{Result, SandboxError};
use crate::events::{ContainerEvent, EventKind};
use crate::lifecycle::{agent_client, KILL_WAIT};
use crate::manager::{Inner, RecoveryReport};
use crate::pod::{ContainerEntry, Pod};
use crate::process::{find_vmm, VmmProcess};
use crate::record::{
    ContainerRecord, ContainerState, ExitInfo, PodRecord, PodState, REASON_POD_STOPPED,
    REASON_VMM_EXITED, RECORD_VERSION,
};
use crate::spec::validate_id;
use crate::{error_chain, lock, store};

impl Inner {
    pub(crate) fn recover(self: &Arc<Self>) -> Result<RecoveryReport> {
        let root = self.layout.root();
        let mut names: Vec<String> = std::fs::read_dir(root)
            .map_err(SandboxError::io("listing", root))?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        names.sort();
        let mut report = RecoveryReport::default();
        for id in names {
            if validate_id("pod sandbox", &id).is_err() {
                report
                    .unreadable
                    .push((id, "the directory name is not a pod id".into()));
                continue;
            }
            if lock(&self.pods).contains_key(&id) {
                continue;
            }
            if let Err(e) = self.recover_pod(&id, &mut report) {
                log::error!("recovering pod {id}: {}", error_chain(&e));
                report.unreadable.push((id, error_chain(&e)));
            }
        }
        log::info!("recovery: {report:?}");
        Ok(report)
    }

    /// Kills a VMM started for pod `id` that should not run.
    fn kill_stray_vmm(&self, id: &str, rec: Option<&PodRecord>) {
        let config = self.layout.vm_config(id);
        let identity = rec
            .and_then(|r| r.vmm)
            .or_else(|| find_vmm(&self.cfg.vmm_binary, &config));
        if let Some(vmm) =
            identity.and_then(|i| VmmProcess::attach(i, &self.cfg.vmm_binary, &config))
        {
            log::warn!("pod {id}: killing stray hyper-vmm {}", vmm.pid());
            vmm.signal(libc::SIGKILL);
            vmm.wait_exit(KILL_WAIT);
            let _ = vmm.reap();
        }
        self.remove_sockets(id);
    }

    fn recover_pod(self: &Arc<Self>, id: &str, report: &mut RecoveryReport) -> Result<()> {
        let Some(rec) = store::read_json::<PodRecord>(&self.layout.pod_record(id))? else {
            // Created before its first record write: nothing was started, but make sure.
            self.kill_stray_vmm(id, None);
            store::remove_dir_all(&self.layout.pod_dir(id))?;
            report.cleaned.push(id.to_owned());
            return Ok(());
        };
        if rec.version > RECORD_VERSION || rec.id() != id {
            return Err(SandboxError::InvalidArgument(format!(
                "record of {id} has version {} and id {:?}: not ours",
                rec.version,
                rec.id()
            )));
        }
        if rec.state == PodState::Creating {
            // hyperd died in the middle of run_pod, which never returned: undo it.
            self.kill_stray_vmm(id, Some(&rec));
            store::remove_dir_all(&self.layout.pod_dir(id))?;
            report.cleaned.push(id.to_owned());
            return Ok(());
        }
        let mut containers = Vec::new();
        for path in store::list_records(&self.layout.containers_dir(id))? {
            match store::read_json::<ContainerRecord>(&path) {
                Ok(Some(c)) if c.pod_id == id => containers.push(c),
                Ok(_) => log::warn!("{}: not a container of pod {id}", path.display()),
                Err(e) => log::error!("skipping {}", error_chain(&e)),
            }
        }
        let config = self.layout.vm_config(id);
        let vmm = rec
            .vmm
            .and_then(|i| VmmProcess::attach(i, &self.cfg.vmm_binary, &config));
        let pod = Pod::new(rec.clone(), self.cfg.spare_drives);
        {
            let mut data = pod.data();
            for c in containers {
                data.containers.insert(
                    c.id.clone(),
                    ContainerEntry {
                        record: c,
                        op: Arc::default(),
                        logs: None,
                    },
                );
            }
            data.rebuild_drives();
        }
        match (rec.state, vmm) {
            (PodState::Ready, Some(vmm)) => self.reattach(&pod, vmm, report),
            (PodState::Ready, None) => {
                let events = self.mark_lost(&pod);
                self.insert_recovered(&pod);
                self.bus.publish_all(events);
                report.lost.push(id.to_owned());
                Ok(())
            }
            (_, vmm) => {
                // NOTREADY: a stop that may not have finished.
                if vmm.is_some() {
                    self.kill_stray_vmm(id, Some(&rec));
                }
                self.remove_sockets(id);
                {
                    let mut data = pod.data();
                    data.stopping = true;
                    let left = data.containers_in(&[
                        ContainerState::Creating,
                        ContainerState::Created,
                        ContainerState::Running,
                    ]);
                    for cid in left {
                        if let Some(c) = data.containers.get_mut(&cid) {
                            c.record.set_exited(&ExitInfo::vm_gone(
                                REASON_POD_STOPPED,
                                "the pod sandbox was stopped",
                            ));
                        }
                        data.persist_container(&self.layout, &cid);
                    }
                    data.record.vmm = None;
                    data.persist(&self.layout);
                }
                self.insert_recovered(&pod);
                report.stopped.push(id.to_owned());
                Ok(())
            }
        }
    }

    /// The pod's VMM is gone: NOTREADY, containers EXITED.
    fn mark_lost(&self, pod: &Pod) -> Vec<ContainerEvent> {
        let mut events = Vec::new();
        self.remove_sockets(&pod.id);
        let mut data = pod.data();
        let why = "hyper-vmm exited while the sandbox manager was not running";
        let left = data.containers_in(&[
            ContainerState::Creating,
            ContainerState::Created,
            ContainerState::Running,
        ]);
        for cid in left {
            if let Some(c) = data.containers.get_mut(&cid) {
                c.record
                    .set_exited(&ExitInfo::vm_gone(REASON_VMM_EXITED, why));
            }
            data.persist_container(&self.layout, &cid);
            events.push(ContainerEvent::container(&pod.id, &cid, EventKind::Stopped));
        }
        data.stopping = true;
        data.record.state = PodState::NotReady;
        data.record.reason = REASON_VMM_EXITED.into();
        data.record.message = why.into();
        data.record.vmm = None;
        data.persist(&self.layout);
        events.push(ContainerEvent::pod(&pod.id, EventKind::Stopped));
        log::warn!("pod {}: {why}", pod.id);
        events
    }

    fn insert_recovered(&self, pod: &Arc<Pod>) {
        let cids: Vec<String> = pod.data().containers.keys().cloned().collect();
        {
            let mut index = lock(&self.containers);
            for c in cids {
                if let Some(other) = index.insert(c.clone(), pod.id.clone()) {
                    log::error!("container {c} is recorded in pods {other} and {}", pod.id);
                }
            }
        }
        lock(&self.pods).insert(pod.id.clone(), pod.clone());
    }

    /// The VMM still runs: supervise it, reconnect the agent, clean up half-created
    /// containers, resume log forwarding and event watching.
    fn reattach(
        self: &Arc<Self>,
        pod: &Arc<Pod>,
        vmm: VmmProcess,
        report: &mut RecoveryReport,
    ) -> Result<()> {
        let vmm = Arc::new(vmm);
        let agent = agent_client(self.layout.vsock(&pod.id), self.cfg.agent_call_timeout);
        {
            let mut data = pod.data();
            data.vmm = Some(vmm.clone());
            data.agent = Some(agent.clone());
        }
        self.insert_recovered(pod);
        self.spawn_supervisor(pod.clone(), vmm.clone())?;
        match agent.health() {
            Ok(h) => log::info!(
                "pod {}: re-attached to hyper-vmm {} ({} containers in the agent)",
                pod.id,
                vmm.pid(),
                h.containers
            ),
            Err(e) => log::warn!(
                "pod {}: re-attached to hyper-vmm {}, but its agent does not answer yet: {}",
                pod.id,
                vmm.pid(),
                error_chain(&e)
            ),
        }
        let (half_created, with_logs) = {
            let data = pod.data();
            let half: Vec<(String, u8)> = data
                .containers
                .values()
                .filter(|c| c.record.state == ContainerState::Creating)
                .map(|c| (c.record.id.clone(), c.record.drive))
                .collect();
            let logs: Vec<ContainerRecord> = data
                .containers
                .values()
                .filter(|c| c.record.state != ContainerState::Creating)
                .filter(|c| c.record.log_path.is_some())
                .map(|c| c.record.clone())
                .collect();
            (half, logs)
        };
        for (cid, drive) in half_created {
            log::info!("container {cid}: its creation was interrupted, removing it");
            self.abort_create(pod, &agent, &cid, drive);
            lock(&self.containers).remove(&cid);
        }
        // Output the agent still buffers (exited containers included) reaches the logs.
        for rec in with_logs {
            match self.start_forwarders(&agent, &rec) {
                Ok(logs) => {
                    if let Some(c) = pod.data().containers.get_mut(&rec.id) {
                        c.logs = logs;
                    }
                }
                Err(e) => log::error!("container {}: logs: {}", rec.id, error_chain(&e)),
            }
        }
        self.spawn_event_loop(pod.clone(), agent, true)?;
        report.reattached.push(pod.id.clone());
        Ok(())
    }
}
