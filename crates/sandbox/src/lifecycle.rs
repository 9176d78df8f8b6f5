//! Pod lifecycle: run (boot), stop, remove.

use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::agent as pb;
use protocol::client::ReconnectingClient;

use crate::control;
use crate::error::{is_deadline, is_not_found, Result, SandboxError};
use crate::events::{ContainerEvent, EventKind};
use crate::manager::{Inner, Removed};
use crate::pod::Pod;
use crate::process::{tail, VmmProcess};
use crate::record::{
    ContainerState, ExitInfo, PodNamespaces, PodRecord, PodState, REASON_POD_STOPPED,
    RECORD_VERSION,
};
use crate::sizing::vm_size;
use crate::spec::{format_mac, GuestNetwork, PodSpec};
use crate::{error_chain, lock, now_nanos, store};

/// How long one dial of the agent retries (the boot loop and reconnections).
pub(crate) const AGENT_DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Default deadline of an ordinary agent call.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest gets to power off before the VMM is killed.
pub(crate) const VM_STOP_GRACE: Duration = Duration::from_secs(2);
/// How long a SIGKILLed process (container or VMM) may take to be gone.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long an exit waits for the container's remaining output to reach its log.
pub(crate) const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// The guest's vsock context id (each VM has its own vsock device).
const GUEST_CID: u64 = 3;
/// Why a stopped pod is NOTREADY.
const REASON_STOPPED: &str = "Stopped";

/// An agent client for a pod's VM.
pub(crate) fn agent_client(vsock: PathBuf, call_timeout: Duration) -> ReconnectingClient {
    ReconnectingClient::vsock(vsock, protocol::DEFAULT_AGENT_PORT, AGENT_DIAL_TIMEOUT)
        .with_timeout(call_timeout)
}

/// An exit as the agent reports it. Times are the host's: the guest's wall clock is not
/// synchronized with it (the VM has no RTC or kvmclock wall time), so an exit is dated when the
/// host learns of it, a few milliseconds late while the manager runs.
pub(crate) fn exit_from_wait(r: &pb::WaitProcessResponse) -> ExitInfo {
    ExitInfo {
        status: r.exit_code,
        signal: r.signal,
        oom_killed: r.oom_killed,
        finished_at_nanos: now_nanos(),
        reason: None,
        message: String::new(),
    }
}

impl Inner {
    pub(crate) fn run_pod(self: &Arc<Self>, spec: PodSpec) -> Result<PodRecord> {
        spec.validate()?;
        let size = vm_size(&spec.resources, &self.cfg)?;
        let id = spec.id.clone();
        if !self.layout.paths_fit(&id) {
            return Err(SandboxError::InvalidArgument(format!(
                "pod id {id:?} is too long for the socket paths under {}",
                self.layout.root().display()
            )));
        }
        let record = PodRecord {
            version: RECORD_VERSION,
            spec,
            state: PodState::Creating,
            created_at_nanos: now_nanos(),
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            vmm: None,
            namespaces: None,
            reason: String::new(),
            message: String::new(),
        };
        let pod = Pod::new(record, self.cfg.spare_drives);
        {
            let mut pods = lock(&self.pods);
            // A directory without a live pod is a pod recover() has not taken over (yet).
            if pods.contains_key(&id) || self.layout.pod_dir(&id).exists() {
                return Err(SandboxError::AlreadyExists {
                    kind: "pod sandbox",
                    id,
                });
            }
            pods.insert(id.clone(), pod.clone());
        }
        let _op = lock(&pod.op);
        match self.boot(&pod) {
            Ok(()) => {
                self.bus
                    .publish(ContainerEvent::pod(&id, EventKind::Created));
                Ok(pod.data().record.clone())
            }
            Err(e) => {
                log::warn!("pod {id}: {}", error_chain(&e));
                self.discard(&pod);
                lock(&self.pods).remove(&id);
                Err(e)
            }
        }
    }

    fn boot(self: &Arc<Self>, pod: &Arc<Pod>) -> Result<()> {
        let id = pod.id.as_str();
        let dir = self.layout.pod_dir(id);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(SandboxError::io("creating", &dir))?;
        let containers = self.layout.containers_dir(id);
        std::fs::create_dir(&containers).map_err(SandboxError::io("creating", &containers))?;
        for log in [self.layout.vmm_log(id), self.layout.console_log(id)] {
            std::fs::File::create(&log).map_err(SandboxError::io("creating", &log))?;
        }
        pod.data().persist(&self.layout);

        let vm = self.vm_config(&pod.data().record);
        vm.validate().map_err(SandboxError::VmConfig)?;
        let vm_path = self.layout.vm_config(id);
        store::write_json(&vm_path, &vm)?;
        let netns = pod
            .data()
            .record
            .spec
            .network
            .as_ref()
            .map(|n| n.netns.clone());
        let vmm = Arc::new(VmmProcess::spawn(
            &self.cfg.vmm_binary,
            &vm_path,
            &self.layout.vmm_log(id),
            netns.as_deref(),
        )?);
        log::info!("pod {id}: hyper-vmm pid {}", vmm.pid());
        let client = agent_client(self.layout.vsock(id), self.cfg.agent_call_timeout);
        {
            let mut data = pod.data();
            data.vmm = Some(vmm.clone());
            data.agent = Some(client.clone());
            data.record.vmm = Some(vmm.identity());
            data.persist(&self.layout);
        }
        self.spawn_supervisor(pod.clone(), vmm.clone())?;

        self.wait_for_agent(pod, &client)?;
        let spec = pod.data().record.spec.clone();
        if let Some(net) = &spec.network {
            setup_network(&client, net)?;
        }
        let namespaces = create_sandbox(&client, &spec)?;
        {
            let mut data = pod.data();
            // The supervisor notes an exit before it looks at the state: either it is noted
            // here, or the supervisor will find the pod READY and mark it NOTREADY.
            if let Some(exit) = pod.vmm_exit() {
                drop(data);
                return Err(self.boot_error(id, exit.describe()));
            }
            if !data.record.state.can_become(PodState::Ready) || data.stopping {
                return Err(SandboxError::PodNotReady {
                    id: id.to_owned(),
                    state: data.record.state,
                });
            }
            data.record.namespaces = Some(namespaces);
            data.record.state = PodState::Ready;
            data.persist(&self.layout);
        }
        self.spawn_event_loop(pod.clone(), client, false)?;
        log::info!("pod {id}: ready");
        Ok(())
    }

    fn vm_config(&self, rec: &PodRecord) -> vmm::config::VmConfig {
        let id = rec.id();
        let mut c = vmm::config::VmConfig::new(self.cfg.kernel.clone());
        c.initrd = Some(self.cfg.initrd.clone());
        c.cmdline = vmm::config::DEFAULT_CMDLINE.to_owned();
        if !self.cfg.kernel_cmdline_extra.is_empty() {
            c.cmdline.push(' ');
            c.cmdline.push_str(&self.cfg.kernel_cmdline_extra);
        }
        c.vcpus = rec.vcpus;
        c.memory_mib = rec.memory_mib;
        c.spare_disks = self.cfg.spare_drives;
        c.nets = rec
            .spec
            .network
            .iter()
            .map(|n| vmm::config::Net {
                tap: n.tap.clone(),
                mac: format_mac(&n.mac),
            })
            .collect();
        c.vsock = Some(vmm::config::Vsock {
            cid: GUEST_CID,
            socket: self.layout.vsock(id),
        });
        c.console = vmm::config::Console::File(self.layout.console_log(id));
        c.control_socket = Some(self.layout.control(id));
        c
    }

    /// Polls the agent until it answers, the VMM exits or the boot timeout passes.
    fn wait_for_agent(&self, pod: &Pod, client: &ReconnectingClient) -> Result<()> {
        let deadline = Instant::now() + self.cfg.boot_timeout;
        let quick = client.with_timeout(Duration::from_secs(5));
        loop {
            if let Some(exit) = pod.vmm_exit() {
                return Err(self.boot_error(&pod.id, exit.describe()));
            }
            match quick.version() {
                Ok(v) if v.protocol_version >= 3 => return Ok(()),
                Ok(v) => {
                    return Err(self.boot_error(
                        &pod.id,
                        format!(
                            "the agent speaks protocol {}, version 3 is needed",
                            v.protocol_version
                        ),
                    ))
                }
                // The VMM's exit explains a failure better than the timeout.
                Err(_) if pod.wait_vmm_exit(Duration::from_millis(300)).is_some() => {}
                Err(e) if Instant::now() >= deadline => {
                    return Err(self.boot_error(
                        &pod.id,
                        format!(
                            "the agent did not answer within {:?}: {}",
                            self.cfg.boot_timeout,
                            error_chain(&e)
                        ),
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn boot_error(&self, id: &str, reason: String) -> SandboxError {
        let mut details = String::new();
        for path in [self.layout.vmm_log(id), self.layout.console_log(id)] {
            let t = tail(&path, 20);
            if !t.is_empty() {
                details.push_str(&format!("\n--- {} ---\n{t}", path.display()));
            }
        }
        SandboxError::Boot {
            id: id.to_owned(),
            reason,
            details,
        }
    }

    /// Tears down a pod whose boot failed: kills the VMM and removes the state directory.
    fn discard(&self, pod: &Pod) {
        let vmm = {
            let mut data = pod.data();
            data.stopping = true;
            data.agent = None;
            data.vmm.take()
        };
        if let Some(vmm) = vmm {
            vmm.signal(libc::SIGKILL);
            if !vmm.wait_exit(KILL_WAIT) {
                log::error!("pod {}: hyper-vmm {} survives SIGKILL", pod.id, vmm.pid());
            }
            // The supervisor reaps it too; whoever comes first gets the status.
            let _ = vmm.reap();
        }
        if let Err(e) = store::remove_dir_all(&self.layout.pod_dir(&pod.id)) {
            log::error!("pod {}: {}", pod.id, error_chain(&e));
        }
        pod.data().removed = true;
    }

    pub(crate) fn stop_pod(self: &Arc<Self>, id: &str, timeout: Duration) -> Result<()> {
        let pod = self.pod(id)?;
        let _op = lock(&pod.op);
        self.stop_locked(&pod, timeout)
    }

    /// Stops containers and the VM; the caller holds the pod's operation lock.
    fn stop_locked(self: &Arc<Self>, pod: &Arc<Pod>, timeout: Duration) -> Result<()> {
        let (vmm, agent, running) = {
            let mut data = pod.data();
            if data.removed {
                return Ok(());
            }
            data.stopping = true;
            let running: Vec<(String, i32)> = data
                .containers
                .values()
                .filter(|c| c.record.state == ContainerState::Running)
                .map(|c| (c.record.id.clone(), c.record.stop_signal))
                .collect();
            (data.vmm.clone(), data.agent.clone(), running)
        };
        let vm_alive = vmm.as_ref().is_some_and(|v| !v.has_exited());
        if let (true, Some(agent)) = (vm_alive, &agent) {
            self.stop_containers(pod, agent, &running, timeout);
        }
        // The forwarders have what they will get; let them finish, then stop them.
        let logs: Vec<_> = pod
            .data()
            .containers
            .values()
            .filter_map(|c| c.logs.clone())
            .collect();
        for l in &logs {
            if vm_alive {
                l.forwarders.wait_drained(LOG_DRAIN_TIMEOUT);
            }
            l.forwarders.stop();
        }
        if let Some(vmm) = &vmm {
            self.stop_vmm(pod, vmm)?;
        }
        self.remove_sockets(&pod.id);

        let mut events = Vec::new();
        {
            let mut data = pod.data();
            let leftovers = data.containers_in(&[ContainerState::Created, ContainerState::Running]);
            for cid in leftovers {
                if let Some(c) = data.containers.get_mut(&cid) {
                    c.record.set_exited(&ExitInfo::vm_gone(
                        REASON_POD_STOPPED,
                        "the pod sandbox was stopped",
                    ));
                }
                data.persist_container(&self.layout, &cid);
                events.push(ContainerEvent::container(&pod.id, &cid, EventKind::Stopped));
            }
            if data.record.state.can_become(PodState::NotReady) {
                data.record.state = PodState::NotReady;
                data.record.reason = REASON_STOPPED.into();
                events.push(ContainerEvent::pod(&pod.id, EventKind::Stopped));
            }
            data.record.vmm = None;
            data.vmm = None;
            data.agent = None;
            data.persist(&self.layout);
        }
        self.bus.publish_all(events);
        Ok(())
    }

    /// Sends each running container its stop signal, waits until `timeout`, then SIGKILLs
    /// what is left; exits are recorded as they are seen.
    fn stop_containers(
        self: &Arc<Self>,
        pod: &Arc<Pod>,
        agent: &ReconnectingClient,
        running: &[(String, i32)],
        timeout: Duration,
    ) {
        for (cid, sig) in running {
            let sig = if timeout.is_zero() {
                libc::SIGKILL
            } else {
                *sig
            };
            let sig = u32::try_from(sig).unwrap_or(libc::SIGTERM as u32);
            if let Err(e) = agent.call_once(|c| c.signal_process(cid, "", sig)) {
                log::debug!("container {cid}: signal {sig}: {}", error_chain(&e));
            }
        }
        let deadline = Instant::now() + timeout;
        for (cid, _) in running {
            let mut exit = wait_exit_until(agent, cid, deadline);
            if exit.is_none() {
                let kill = libc::SIGKILL as u32;
                if let Err(e) = agent.call_once(|c| c.signal_process(cid, "", kill)) {
                    log::debug!("container {cid}: SIGKILL: {}", error_chain(&e));
                }
                exit = wait_exit_until(agent, cid, Instant::now() + KILL_WAIT);
            }
            if let Some(exit) = exit {
                self.container_exited(pod, cid, exit);
            }
        }
    }

    /// Stops the VMM: graceful power-off, SIGKILL after [`VM_STOP_GRACE`].
    fn stop_vmm(&self, pod: &Pod, vmm: &VmmProcess) -> Result<()> {
        if !vmm.has_exited() {
            let asked = match control::stop(&self.layout.control(&pod.id), true, VM_STOP_GRACE) {
                Ok(()) => true,
                Err(e) => {
                    log::info!("pod {}: {}", pod.id, error_chain(&e));
                    false
                }
            };
            if !asked || !vmm.wait_exit(VM_STOP_GRACE + Duration::from_secs(1)) {
                log::info!("pod {}: hyper-vmm still runs, killing it", pod.id);
                vmm.signal(libc::SIGKILL);
                if !vmm.wait_exit(KILL_WAIT) {
                    return Err(SandboxError::StopFailed {
                        id: pod.id.clone(),
                        pid: vmm.pid(),
                    });
                }
            }
        }
        // Leave reaping to the supervisor; reap here if it is not around (shutting down).
        if pod.wait_vmm_exit(Duration::from_secs(1)).is_none() {
            let _ = vmm.reap();
        }
        Ok(())
    }

    /// Removes the VMM's sockets (a killed VMM cannot).
    pub(crate) fn remove_sockets(&self, pod: &str) {
        for s in [self.layout.vsock(pod), self.layout.control(pod)] {
            let _ = std::fs::remove_file(s);
        }
    }

    pub(crate) fn remove_pod(self: &Arc<Self>, id: &str) -> Result<Removed> {
        let pod = match self.pod(id) {
            Ok(p) => p,
            Err(_) => return Ok(Removed::Unknown),
        };
        let _op = lock(&pod.op);
        if pod.data().removed {
            return Ok(Removed::Unknown);
        }
        self.stop_locked(&pod, Duration::ZERO)?;
        // Marked removed first: no record write can race with the directory's removal.
        let cids: Vec<String> = {
            let mut data = pod.data();
            data.removed = true;
            let cids = data.containers.keys().cloned().collect();
            data.containers.clear();
            cids
        };
        let removed_dir = store::remove_dir_all(&self.layout.pod_dir(id));
        for log in [self.layout.vmm_log(id), self.layout.console_log(id)] {
            let _ = std::fs::remove_file(log);
        }
        {
            let mut index = lock(&self.containers);
            for c in &cids {
                index.remove(c);
            }
        }
        lock(&self.pods).remove(id);
        let mut events: Vec<ContainerEvent> = cids
            .iter()
            .map(|c| ContainerEvent::container(id, c, EventKind::Deleted))
            .collect();
        events.push(ContainerEvent::pod(id, EventKind::Deleted));
        self.bus.publish_all(events);
        removed_dir?;
        log::info!("pod {id}: removed");
        Ok(Removed::Removed)
    }

    /// Records a container's exit once its output has reached the log; publishes the event.
    /// A container that is not CREATED or RUNNING any more is left alone (exits are reported
    /// by several paths: the event log, stop calls, recovery).
    pub(crate) fn container_exited(&self, pod: &Pod, cid: &str, exit: ExitInfo) {
        let logs = {
            let data = pod.data();
            match data.containers.get(cid) {
                Some(c) if c.record.state.can_become(ContainerState::Exited) => c.logs.clone(),
                _ => return,
            }
        };
        if let Some(l) = &logs {
            if !l.forwarders.wait_drained(LOG_DRAIN_TIMEOUT) {
                log::debug!("container {cid}: output still flowing after its exit");
            }
        }
        let changed = {
            let mut data = pod.data();
            let changed = match data.containers.get_mut(cid) {
                Some(c) if c.record.state.can_become(ContainerState::Exited) => {
                    c.record.set_exited(&exit);
                    true
                }
                _ => false,
            };
            if changed {
                data.persist_container(&self.layout, cid);
            }
            changed
        };
        if changed {
            log::info!("container {cid}: exited ({exit:?})");
            self.bus
                .publish(ContainerEvent::container(&pod.id, cid, EventKind::Stopped));
        }
    }
}

/// Waits for a container's init process to exit until `deadline`; `None` when it still runs
/// then. A container the agent does not know counts as exited with an unknown status.
pub(crate) fn wait_exit_until(
    agent: &ReconnectingClient,
    cid: &str,
    deadline: Instant,
) -> Option<ExitInfo> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left < Duration::from_millis(50) {
            return None;
        }
        match agent.with_timeout(left).wait_process(cid, "") {
            Ok(r) => return Some(exit_from_wait(&r)),
            Err(e) if is_deadline(&e) => return None,
            Err(e) if is_not_found(&e) => {
                return Some(ExitInfo::vm_gone(
                    crate::record::REASON_ERROR,
                    "the container is unknown to the agent",
                ))
            }
            Err(e) => {
                log::debug!("waiting for {cid}: {}", error_chain(&e));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Gives the guest interface the CNI's MAC, address and MTU, then the routes.
fn setup_network(client: &ReconnectingClient, net: &GuestNetwork) -> Result<()> {
    let mut req = pb::UpdateInterfaceRequest::new();
    req.name = net.guest_ifname.clone();
    req.mac = format_mac(&net.mac);
    req.mtu = net.mtu;
    req.up = true;
    if let Some((IpAddr::V4(addr), prefix)) = net.addresses.iter().find(|(a, _)| a.is_ipv4()) {
        let mut ip = pb::IPv4Address::new();
        ip.address = addr.to_string();
        ip.prefix_len = u32::from(*prefix);
        req.ipv4 = Some(ip).into();
    }
    for (addr, _) in net.addresses.iter().filter(|(a, _)| a.is_ipv6()) {
        log::warn!("pod address {addr}: IPv6 is not configured in the guest yet");
    }
    client
        .call_once(|c| c.update_interface(&req))
        .map_err(SandboxError::agent("UpdateInterface"))?;
    let routes = guest_routes(net);
    if !routes.is_empty() {
        client
            .call_once(|c| c.update_routes(routes))
            .map_err(SandboxError::agent("UpdateRoutes"))?;
    }
    Ok(())
}

/// The IPv4 routes for the agent, link-scope ones (no gateway) first so that gateways are
/// reachable when their routes are added.
pub(crate) fn guest_routes(net: &GuestNetwork) -> Vec<pb::Route> {
    let mut routes: Vec<&(String, Option<IpAddr>)> = net
        .routes
        .iter()
        .filter(|(dst, gw)| !dst.contains(':') && !gw.is_some_and(|g| g.is_ipv6()))
        .collect();
    routes.sort_by_key(|(_, gw)| gw.is_some());
    routes
        .into_iter()
        .map(|(dst, gw)| {
            let mut r = pb::Route::new();
            r.destination = dst.clone();
            r.gateway = gw.map(|g| g.to_string()).unwrap_or_default();
            r.device = net.guest_ifname.clone();
            r
        })
        .collect()
}

/// The agent's `CreateSandbox`, plus the pod's /etc/hostname in the file store (which also
/// tells where the store is).
fn create_sandbox(client: &ReconnectingClient, spec: &PodSpec) -> Result<PodNamespaces> {
    let mut req = pb::CreateSandboxRequest::new();
    req.hostname = spec.hostname.clone();
    if let Some(dns) = &spec.dns {
        let mut d = pb::DnsConfig::new();
        d.servers = dns.servers.clone();
        d.searches = dns.searches.clone();
        d.options = dns.options.clone();
        req.dns = Some(d).into();
    }
    req.sysctls = spec
        .sysctls
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    req.share_pid_namespace = spec.share_pid_namespace;
    let resp = client
        .call_once(|c| c.create_sandbox(&req))
        .map_err(SandboxError::agent("CreateSandbox"))?;
    let hostname = if spec.hostname.is_empty() {
        Vec::new()
    } else {
        format!("{}\n", spec.hostname).into_bytes()
    };
    const HOSTNAME_FILE: &str = "pod/hostname";
    let path = client
        .call_once(|c| c.copy_file(HOSTNAME_FILE, &hostname, 0o644, 0o755, 0, 0))
        .map_err(SandboxError::agent("CopyFile"))?;
    let store_root = path
        .strip_suffix(HOSTNAME_FILE)
        .map(|r| r.trim_end_matches('/').to_owned());
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    Ok(PodNamespaces {
        ipc: resp.ipc_namespace_path,
        uts: resp.uts_namespace_path,
        pid: non_empty(resp.pid_namespace_path),
        resolv_conf: non_empty(resp.resolv_conf_path),
        hostname_file: (!spec.hostname.is_empty()).then_some(path),
        store_root,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_link_scope_first_ipv4_only() {
        let net = GuestNetwork {
            netns: "/n".into(),
            tap: "tap0".into(),
            guest_ifname: "eth0".into(),
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 0,
            addresses: vec![],
            routes: vec![
                ("0.0.0.0/0".into(), Some("169.254.1.1".parse().unwrap())),
                ("169.254.1.1/32".into(), None),
                ("::/0".into(), Some("fe80::1".parse().unwrap())),
            ],
        };
        let r = guest_routes(&net);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].destination, "169.254.1.1/32");
        assert_eq!(r[0].gateway, "");
        assert_eq!(r[1].gateway, "169.254.1.1");
        assert_eq!(r[1].device, "eth0");
    }

    #[test]
    fn exits_from_the_agent() {
        let mut w = pb::WaitProcessResponse::new();
        w.signal = 9;
        w.oom_killed = true;
        w.finished_at_unix_nanos = 5;
        let e = exit_from_wait(&w);
        assert_eq!((e.exit_code(), e.oom_killed), (137, true));
        assert!(e.finished_at_nanos > 5, "the host's clock, not the guest's");
    }
}
