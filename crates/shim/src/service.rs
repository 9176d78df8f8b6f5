//! The shim v2 Task service over the sandbox manager.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::convert_to_any;
use containerd_shim::TtrpcResult;
use containerd_shim_protos::api;
use containerd_shim_protos::cgroups_v2::metrics as v2;
use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task as TaskService;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::context::Context;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use image::disk::DiskCache;
use protocol::client::ReconnectingClient;
use sandbox::layout::Layout;
use sandbox::{ContainerSpec, EventKind, ManagerConfig, PodSpec, SandboxManager};

use crate::bundle;
use crate::config::ShimConfig;
use crate::error::{agent, ShimError};
use crate::rootfs;
use crate::stdio::{self, StdioPaths};
use crate::task::{Exit, Kind, Proc, Status, Task, SANDBOX_ID};

/// How long an exit waits for its output copies (they end at the streams' EOF, right after
/// the exit unless the FIFO's reader is slow).
const OUTPUT_DRAIN: Duration = Duration::from_secs(10);
/// A disk build older than this in the shared cache was left by a crash.
const STALE_BUILD: Duration = Duration::from_secs(3600);
/// Exit status of a process whose VM went away.
const VM_GONE_STATUS: u32 = 255;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn timestamp(nanos: i64) -> MessageField<Timestamp> {
    MessageField::some(Timestamp {
        seconds: nanos.div_euclid(1_000_000_000),
        nanos: i32::try_from(nanos.rem_euclid(1_000_000_000)).unwrap_or(0),
        ..Default::default()
    })
}

/// The live parts: manager, agent socket layout, disk cache.
struct Backend {
    mgr: Arc<SandboxManager>,
    layout: Layout,
    disks: DiskCache,
}

/// The Task service of one shim (one pod).
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Result<Backend, String>,
    namespace: String,
    publisher: Arc<RemotePublisher>,
    exit: Arc<ExitSignal>,
    tasks: Mutex<HashMap<String, Arc<Task>>>,
    /// One agent connection per pod, shared by every call and stream copy.
    agents: Mutex<HashMap<String, ReconnectingClient>>,
    rt: tokio::runtime::Handle,
}

/// The manager's pod id for a containerd id (short: it is part of socket paths).
pub fn pod_id_for(id: &str) -> String {
    id.chars().take(32).collect()
}

impl Service {
    /// A service whose pods live under `state_root`.
    pub fn new(
        cfg: Result<ShimConfig, ShimError>,
        state_root: PathBuf,
        log_dir: PathBuf,
        namespace: String,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Service {
        let backend = cfg
            .and_then(|cfg| {
                let mut mc = ManagerConfig::new(cfg.vmm, cfg.kernel, cfg.initrd);
                mc.state_root = state_root.clone();
                mc.log_dir = log_dir.clone();
                mc.overhead_memory_mib = cfg.overhead_memory_mib;
                mc.default_memory_mib = cfg.default_memory_mib;
                mc.default_vcpus = cfg.default_vcpus;
                let mgr = SandboxManager::new(mc)?;
                // Every pod's shim shares the cache: keep other shims' builds in progress.
                let disks = DiskCache::open_shared(&cfg.disk_cache, STALE_BUILD)?;
                // Disks of images containerd has deleted go, off the pod's start path.
                let gc = disks.clone();
                std::thread::spawn(move || rootfs::collect_garbage(&gc));
                Ok(Backend {
                    mgr,
                    layout: Layout::new(&state_root, &log_dir),
                    disks,
                })
            })
            .map_err(|e| sandbox::error_chain(&e));
        if let Err(e) = &backend {
            log::error!("shim cannot run pods: {e}");
        }
        let inner = Arc::new(Inner {
            backend,
            namespace,
            publisher: Arc::new(publisher),
            exit,
            tasks: Mutex::new(HashMap::new()),
            agents: Mutex::new(HashMap::new()),
            rt: tokio::runtime::Handle::current(),
        });
        if let Ok(b) = &inner.backend {
            let events = b.mgr.subscribe();
            let weak = Arc::downgrade(&inner);
            std::thread::spawn(move || {
                while let Ok(e) = events.recv() {
                    let Some(inner) = weak.upgrade() else { return };
                    if e.kind != EventKind::Stopped {
                        continue;
                    }
                    inner.on_stopped(&e.pod_id, e.container_id.as_deref());
                }
            });
        }
        Service { inner }
    }
}

impl Inner {
    fn backend(&self) -> Result<&Backend, ShimError> {
        self.backend
            .as_ref()
            .map_err(|e| ShimError::NotReady(e.clone()))
    }

    fn task(&self, id: &str) -> Result<Arc<Task>, ShimError> {
        lock(&self.tasks)
            .get(id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("task {id}")))
    }

    fn proc(&self, task: &Task, exec_id: &str) -> Result<Arc<Proc>, ShimError> {
        lock(&task.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("exec {exec_id} of {}", task.id)))
    }

    fn agent(&self, pod_id: &str) -> Result<ReconnectingClient, ShimError> {
        let b = self.backend()?;
        let mut agents = lock(&self.agents);
        let client = agents.entry(pod_id.to_owned()).or_insert_with(|| {
            ReconnectingClient::vsock(
                b.layout.vsock(pod_id),
                protocol::DEFAULT_AGENT_PORT,
                Duration::from_secs(5),
            )
        });
        Ok(client.clone())
    }

    fn vmm_pid(&self, pod_id: &str) -> u32 {
        self.backend()
            .ok()
            .and_then(|b| b.mgr.pod_status(pod_id).ok())
            .and_then(|r| r.vmm_pid())
            .unwrap_or(0)
    }

    fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        let publisher = self.publisher.clone();
        let ns = self.namespace.clone();
        self.rt.spawn(async move {
            if let Err(e) = publisher
                .publish(Context::default(), topic, &ns, event)
                .await
            {
                log::warn!("publishing {topic}: {e}");
            }
        });
    }

    /// Records an exit (once), after the process's output is copied, and announces it.
    fn finish(&self, task: &Task, exec_id: &str, p: &Proc, status: u32) {
        if p.exited().is_some() {
            return;
        }
        // The process is gone: its stdin copy has nothing left to do.
        drop(lock(&p.stdin).take());
        let outputs = std::mem::take(&mut *lock(&p.output));
        let deadline = Instant::now() + OUTPUT_DRAIN;
        for h in outputs {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        let exit = Exit {
            status,
            at_nanos: sandbox::now_nanos(),
        };
        *lock(&p.status) = Status::Stopped;
        p.exit.send_replace(Some(exit));
        let pid = *lock(&p.pid);
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(ev::TaskExit {
                container_id: task.id.clone(),
                id: if exec_id.is_empty() {
                    task.id.clone()
                } else {
                    exec_id.to_owned()
                },
                pid,
                exit_status: status,
                exited_at: timestamp(exit.at_nanos),
                ..Default::default()
            }),
        );
    }

    /// A manager event: a container exited, or a pod's VM stopped.
    fn on_stopped(&self, pod_id: &str, container: Option<&str>) {
        let tasks: Vec<Arc<Task>> = lock(&self.tasks).values().cloned().collect();
        let Ok(b) = self.backend() else { return };
        for t in tasks.iter().filter(|t| t.pod_id == pod_id) {
            match container {
                Some(c) if c == t.id && t.kind != Kind::Sandbox => {
                    let rec = b.mgr.container_status(c).ok();
                    let status = rec
                        .as_ref()
                        .and_then(|r| {
                            if r.oom_killed {
                                self.publish(
                                    topics::TASK_OOM_EVENT_TOPIC,
                                    Box::new(ev::TaskOOM {
                                        container_id: t.id.clone(),
                                        ..Default::default()
                                    }),
                                );
                            }
                            r.exit_code
                        })
                        .and_then(|c| u32::try_from(c).ok())
                        .unwrap_or(VM_GONE_STATUS);
                    if status == VM_GONE_STATUS {
                        log::warn!(
                            "task {}: exit status {status}: {}",
                            t.id,
                            rec.as_ref().map_or_else(
                                || "the container's record is gone".to_owned(),
                                |r| format!("{:?} {} {}", r.exit_code, r.reason, r.message)
                            )
                        );
                    }
                    self.finish(t, "", &t.init, status);
                }
                Some(_) => {}
                None => {
                    // The VM is gone: every process of the pod ended.
                    let status = if t.kind == Kind::Sandbox {
                        137
                    } else {
                        VM_GONE_STATUS
                    };
                    let execs: Vec<(String, Arc<Proc>)> = lock(&t.execs)
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    for (id, p) in execs {
                        self.finish(t, &id, &p, VM_GONE_STATUS);
                    }
                    self.finish(t, "", &t.init, status);
                }
            }
        }
    }

    fn create(&self, req: &api::CreateTaskRequest) -> Result<u32, ShimError> {
        let b = self.backend()?;
        if lock(&self.tasks).contains_key(&req.id) {
            return Err(ShimError::AlreadyExists(format!("task {}", req.id)));
        }
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unimplemented("restoring a checkpoint"));
        }
        let bundle_dir = PathBuf::from(&req.bundle);
        let mut spec = bundle::read_spec(&bundle_dir)?;
        let annotations = bundle::annotations(&spec);
        let kind = Kind::from_annotations(&annotations);
        let pod_id = match kind {
            Kind::Container => pod_id_for(
                annotations
                    .get(SANDBOX_ID)
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| {
                        ShimError::InvalidArgument(format!("{SANDBOX_ID} is missing"))
                    })?,
            ),
            Kind::Sandbox | Kind::Standalone => pod_id_for(&req.id),
        };
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut netns = None;
        if kind != Kind::Container {
            let strs = bundle::string_map(&annotations);
            let mut pod = PodSpec {
                id: pod_id.clone(),
                name: strs
                    .get("io.kubernetes.cri.sandbox-name")
                    .cloned()
                    .unwrap_or_else(|| req.id.clone()),
                namespace: strs
                    .get("io.kubernetes.cri.sandbox-namespace")
                    .cloned()
                    .unwrap_or_else(|| self.namespace.clone()),
                uid: strs
                    .get("io.kubernetes.cri.sandbox-uid")
                    .cloned()
                    .unwrap_or_default(),
                hostname: spec
                    .get("hostname")
                    .and_then(|h| h.as_str())
                    .unwrap_or("")
                    .to_owned(),
                resources: if kind == Kind::Standalone {
                    bundle::or_container(
                        bundle::pod_resources(&annotations),
                        bundle::container_resources(&spec),
                    )
                } else {
                    bundle::pod_resources(&annotations)
                },
                annotations: strs,
                runtime_handler: "hyper".into(),
                ..Default::default()
            };
            if let Some(path) = bundle::netns_path(&spec) {
                let net = network::existing_netns::attach_tap(&path)?;
                netns = Some(path);
                pod.network = Some(sandbox::GuestNetwork {
                    netns: net.netns.clone(),
                    tap: net.tap.clone(),
                    guest_ifname: "eth0".into(),
                    mac: net.interface.mac,
                    mtu: net.interface.mtu,
                    addresses: net.interface.addresses.clone(),
                    routes: net
                        .routes
                        .iter()
                        .map(|r| (r.destination.clone(), r.gateway))
                        .collect(),
                });
            }
            if let Err(e) = b.mgr.run_pod(pod) {
                if let Some(path) = &netns {
                    network::existing_netns::detach_tap(path);
                }
                return Err(e.into());
            }
        }
        if kind != Kind::Sandbox {
            let made = (|| {
                let layers = rootfs::parse_mounts(&req.rootfs)?;
                let disk = rootfs::disk_for(&b.disks, &layers)?;
                let files = bundle::take_bind_mounts(&mut spec);
                let json = serde_json::to_vec(&spec)
                    .map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
                let cspec = ContainerSpec {
                    id: req.id.clone(),
                    name: req.id.clone(),
                    rootfs_disk: disk.path,
                    oci_spec_json: json,
                    files,
                    tty: req.terminal,
                    stdin: !req.stdin.is_empty(),
                    annotations: bundle::string_map(&annotations),
                    ..Default::default()
                };
                b.mgr.create_container(&pod_id, cspec)?;
                Ok::<(), ShimError>(())
            })();
            if let Err(e) = made {
                if kind == Kind::Standalone {
                    let _ = b.mgr.remove_pod(&pod_id);
                }
                return Err(e);
            }
        }
        let pid = self.vmm_pid(&pod_id);
        let task = Arc::new(Task {
            id: req.id.clone(),
            kind,
            pod_id,
            bundle: bundle_dir,
            netns,
            init: Proc::new(stdio, Vec::new()),
            execs: Mutex::new(HashMap::new()),
        });
        *lock(&task.init.pid) = pid;
        lock(&self.tasks).insert(req.id.clone(), task);
        Ok(pid)
    }

    fn start(&self, id: &str, exec_id: &str) -> Result<u32, ShimError> {
        let b = self.backend()?;
        let t = self.task(id)?;
        if !exec_id.is_empty() {
            let p = self.proc(&t, exec_id)?;
            let agent = self.agent(&t.pod_id)?;
            let pid = agent
                .call_once(|c| c.exec_process(&t.id, exec_id, &p.spec))
                .map_err(agent_err("ExecProcess"))?;
            *lock(&p.pid) = pid;
            *lock(&p.status) = Status::Running;
            p.attach(stdio::start(&agent, &t.id, exec_id, &p.stdio));
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(ev::TaskExecStarted {
                    container_id: t.id.clone(),
                    exec_id: exec_id.to_owned(),
                    pid,
                    ..Default::default()
                }),
            );
            return Ok(pid);
        }
        let pid = match t.kind {
            Kind::Sandbox => self.vmm_pid(&t.pod_id),
            Kind::Container | Kind::Standalone => {
                let agent = self.agent(&t.pod_id)?;
                t.init
                    .attach(stdio::start(&agent, &t.id, "", &t.init.stdio));
                b.mgr.start_container(&t.id)?;
                agent
                    .list_processes(&t.id)
                    .ok()
                    .and_then(|p| p.first().map(|p| p.pid))
                    .unwrap_or_else(|| self.vmm_pid(&t.pod_id))
            }
        };
        *lock(&t.init.pid) = pid;
        *lock(&t.init.status) = Status::Running;
        self.publish(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(ev::TaskStart {
                container_id: t.id.clone(),
                pid,
                ..Default::default()
            }),
        );
        // A container that exited before its record was running gets no later event.
        if t.kind != Kind::Sandbox {
            if let Ok(r) = b.mgr.container_status(&t.id) {
                if let Some(code) = r.exit_code {
                    self.finish(
                        &t,
                        "",
                        &t.init,
                        u32::try_from(code).unwrap_or(VM_GONE_STATUS),
                    );
                }
            }
        }
        Ok(pid)
    }

    /// Waits for an exec's exit in the agent (blocking thread).
    fn watch_exec(self: &Arc<Self>, t: Arc<Task>, exec_id: String, p: Arc<Proc>) {
        let inner = self.clone();
        std::thread::spawn(move || {
            let Ok(agent) = inner.agent(&t.pod_id) else {
                return;
            };
            // Until the exec is started, WaitProcess says NotFound.
            while *lock(&p.status) == Status::Created && p.exited().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            loop {
                if p.exited().is_some() {
                    return;
                }
                match agent
                    .with_timeout(Duration::from_secs(30))
                    .wait_process(&t.id, &exec_id)
                {
                    Ok(r) => {
                        let code = if r.signal != 0 {
                            128 + r.signal
                        } else {
                            r.exit_code
                        };
                        let status = u32::try_from(code).unwrap_or(VM_GONE_STATUS);
                        inner.finish(&t, &exec_id, &p, status);
                        return;
                    }
                    Err(e) if e.code() == Some(ttrpc::Code::DEADLINE_EXCEEDED) => {}
                    Err(e) if e.is_connection_lost() => {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => {
                        log::warn!("exec {exec_id} of {}: {e}", t.id);
                        inner.finish(&t, &exec_id, &p, VM_GONE_STATUS);
                        return;
                    }
                }
            }
        });
    }

    fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<(), ShimError> {
        let b = self.backend()?;
        let t = self.task(id)?;
        if !exec_id.is_empty() {
            let p = self.proc(&t, exec_id)?;
            if p.exited().is_some() {
                return Err(ShimError::NotFound(format!("process {exec_id} has exited")));
            }
            let agent = self.agent(&t.pod_id)?;
            return agent
                .call_once(|c| c.signal_process(&t.id, exec_id, signal))
                .map_err(agent_err("SignalProcess"));
        }
        if t.init.exited().is_some() {
            return Err(ShimError::NotFound(format!("process {id} has exited")));
        }
        match t.kind {
            Kind::Sandbox => {
                b.mgr.stop_pod(&t.pod_id, Duration::ZERO)?;
                let status = 128 + signal;
                self.finish(&t, "", &t.init, status);
                Ok(())
            }
            Kind::Container | Kind::Standalone => {
                let agent = self.agent(&t.pod_id)?;
                if all {
                    // Execs share the container's pid namespace: signal each as well.
                    let execs: Vec<String> = lock(&t.execs).keys().cloned().collect();
                    for e in execs {
                        let _ = agent.call_once(|c| c.signal_process(&t.id, &e, signal));
                    }
                }
                if *lock(&t.init.status) == Status::Created {
                    // Never started: nothing runs; the container just ends.
                    b.mgr.stop_container(&t.id, Duration::ZERO)?;
                    self.finish(&t, "", &t.init, 128 + signal);
                    return Ok(());
                }
                agent
                    .call_once(|c| c.signal_process(&t.id, "", signal))
                    .map_err(agent_err("SignalProcess"))
            }
        }
    }

    fn delete(&self, id: &str, exec_id: &str) -> Result<(u32, Exit), ShimError> {
        let b = self.backend()?;
        let t = self.task(id)?;
        let unknown = Exit {
            status: VM_GONE_STATUS,
            at_nanos: sandbox::now_nanos(),
        };
        if !exec_id.is_empty() {
            let p = self.proc(&t, exec_id)?;
            if *lock(&p.status) == Status::Running && p.exited().is_none() {
                return Err(ShimError::FailedPrecondition(format!(
                    "exec {exec_id} is still running"
                )));
            }
            if let Ok(agent) = self.agent(&t.pod_id) {
                let _ = agent.call_once(|c| c.remove_process(&t.id, exec_id));
            }
            lock(&t.execs).remove(exec_id);
            return Ok((*lock(&p.pid), p.exited().unwrap_or(unknown)));
        }
        if *lock(&t.init.status) == Status::Running && t.init.exited().is_none() {
            return Err(ShimError::FailedPrecondition(format!(
                "task {id} is still running"
            )));
        }
        match t.kind {
            Kind::Container => {
                b.mgr.remove_container(&t.id)?;
            }
            Kind::Standalone => {
                b.mgr.remove_container(&t.id)?;
                b.mgr.remove_pod(&t.pod_id)?;
            }
            Kind::Sandbox => {
                b.mgr.remove_pod(&t.pod_id)?;
                if let Some(ns) = &t.netns {
                    network::existing_netns::detach_tap(ns);
                }
            }
        }
        if t.kind != Kind::Container {
            lock(&self.agents).remove(&t.pod_id);
        }
        lock(&self.tasks).remove(id);
        let exit = t.init.exited().unwrap_or(unknown);
        let pid = *lock(&t.init.pid);
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(ev::TaskDelete {
                container_id: t.id.clone(),
                pid,
                exit_status: exit.status,
                exited_at: timestamp(exit.at_nanos),
                ..Default::default()
            }),
        );
        Ok((pid, exit))
    }

    fn stats(&self, id: &str) -> Result<v2::Metrics, ShimError> {
        let b = self.backend()?;
        let t = self.task(id)?;
        let mut m = v2::Metrics::new();
        if t.kind == Kind::Sandbox {
            let s = b.mgr.pod_stats(&t.pod_id)?;
            let mut cpu = v2::CPUStat::new();
            cpu.usage_usec = s.vmm_cpu_usage_nanos / 1000;
            m.cpu = MessageField::some(cpu);
            let mut mem = v2::MemoryStat::new();
            mem.usage = s.vmm_rss_bytes;
            mem.usage_limit = s.guest_memory_bytes;
            m.memory = MessageField::some(mem);
            return Ok(m);
        }
        let s = b.mgr.container_stats(id)?;
        let mut cpu = v2::CPUStat::new();
        cpu.usage_usec = s.cpu_usage_nanos / 1000;
        m.cpu = MessageField::some(cpu);
        let mut mem = v2::MemoryStat::new();
        mem.usage = s.memory_usage_bytes;
        mem.usage_limit = s.memory_limit_bytes;
        mem.anon = s.memory_rss_bytes;
        mem.inactive_file = s
            .memory_usage_bytes
            .saturating_sub(s.memory_working_set_bytes);
        m.memory = MessageField::some(mem);
        let mut pids = v2::PidsStat::new();
        pids.current = s.pids;
        m.pids = MessageField::some(pids);
        let mut events = v2::MemoryEvents::new();
        events.oom_kill = s.oom_kills;
        m.memory_events = MessageField::some(events);
        Ok(m)
    }
}

fn agent_err(op: &'static str) -> impl FnOnce(protocol::client::RpcError) -> ShimError {
    agent(op)
}

/// Runs blocking shim work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ShimError> + Send + 'static,
) -> TtrpcResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(ShimError::Rootfs(format!("worker failed: {e}")).into()),
    }
}

fn proto_status(s: Status) -> api::Status {
    match s {
        Status::Created => api::Status::CREATED,
        Status::Running => api::Status::RUNNING,
        Status::Paused => api::Status::PAUSED,
        Status::Stopped => api::Status::STOPPED,
    }
}

#[async_trait]
impl TaskService for Service {
    async fn state(
        &self,
        _: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let t = self.inner.task(&req.id)?;
        let p = if req.exec_id.is_empty() {
            None
        } else {
            Some(self.inner.proc(&t, &req.exec_id)?)
        };
        let proc_ref: &Proc = p.as_deref().unwrap_or(&t.init);
        let mut r = api::StateResponse::new();
        r.id = req.id.clone();
        r.exec_id = req.exec_id.clone();
        r.bundle = t.bundle.to_string_lossy().into_owned();
        r.pid = *lock(&proc_ref.pid);
        r.status = proto_status(*lock(&proc_ref.status)).into();
        r.stdin = proc_ref.stdio.stdin.clone();
        r.stdout = proc_ref.stdio.stdout.clone();
        r.stderr = proc_ref.stdio.stderr.clone();
        r.terminal = proc_ref.stdio.terminal;
        if let Some(e) = proc_ref.exited() {
            r.status = api::Status::STOPPED.into();
            r.exit_status = e.status;
            r.exited_at = timestamp(e.at_nanos);
        }
        Ok(r)
    }

    async fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let inner = self.inner.clone();
        let r = req.clone();
        let pid = blocking(move || inner.create(&r)).await?;
        let mut io = ev::TaskIO::new();
        io.stdin = req.stdin.clone();
        io.stdout = req.stdout.clone();
        io.stderr = req.stderr.clone();
        io.terminal = req.terminal;
        self.inner.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(ev::TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(io),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let inner = self.inner.clone();
        let pid = blocking(move || inner.start(&req.id, &req.exec_id)).await?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let inner = self.inner.clone();
        let (pid, exit) = blocking(move || inner.delete(&req.id, &req.exec_id)).await?;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: timestamp(exit.at_nanos),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let inner = self.inner.clone();
        let procs = blocking(move || {
            let t = inner.task(&req.id)?;
            if t.kind == Kind::Sandbox {
                return Ok(vec![inner.vmm_pid(&t.pod_id)]);
            }
            let agent = inner.agent(&t.pod_id)?;
            let ps = agent
                .list_processes(&t.id)
                .map_err(agent_err("ListProcesses"))?;
            Ok(ps.iter().map(|p| p.pid).collect())
        })
        .await?;
        Ok(api::PidsResponse {
            processes: procs
                .into_iter()
                .map(|pid| containerd_shim_protos::types::task::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let inner = self.inner.clone();
        blocking(move || {
            let t = inner.task(&req.id)?;
            if t.kind == Kind::Sandbox {
                return Err(ShimError::Unimplemented("pausing a sandbox"));
            }
            let agent = inner.agent(&t.pod_id)?;
            agent
                .call_once(|c| c.pause_container(&t.id))
                .map_err(agent_err("PauseContainer"))?;
            *lock(&t.init.status) = Status::Paused;
            inner.publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(ev::TaskPaused {
                    container_id: t.id.clone(),
                    ..Default::default()
                }),
            );
            Ok(())
        })
        .await?;
        Ok(api::Empty::new())
    }

    async fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let inner = self.inner.clone();
        blocking(move || {
            let t = inner.task(&req.id)?;
            let agent = inner.agent(&t.pod_id)?;
            agent
                .call_once(|c| c.resume_container(&t.id))
                .map_err(agent_err("ResumeContainer"))?;
            *lock(&t.init.status) = Status::Running;
            inner.publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(ev::TaskResumed {
                    container_id: t.id.clone(),
                    ..Default::default()
                }),
            );
            Ok(())
        })
        .await?;
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _: &TtrpcContext,
        _: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(ShimError::Unimplemented("checkpoint").into())
    }

    async fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let inner = self.inner.clone();
        blocking(move || inner.kill(&req.id, &req.exec_id, req.signal, req.all)).await?;
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let t = self.inner.task(&req.id)?;
        if req.exec_id.is_empty() || lock(&t.execs).contains_key(&req.exec_id) {
            return Err(ShimError::AlreadyExists(format!("exec {:?}", req.exec_id)).into());
        }
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| ShimError::InvalidArgument("exec without a process spec".into()))?;
        let p = Arc::new(Proc::new(
            StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
            spec,
        ));
        lock(&t.execs).insert(req.exec_id.clone(), p.clone());
        self.inner.watch_exec(t.clone(), req.exec_id.clone(), p);
        self.inner.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(ev::TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let inner = self.inner.clone();
        blocking(move || {
            let t = inner.task(&req.id)?;
            let agent = inner.agent(&t.pod_id)?;
            agent
                .call_once(|c| c.resize_tty(&t.id, &req.exec_id, req.width, req.height))
                .map_err(agent_err("ResizeTty"))
        })
        .await?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if !req.stdin {
            return Ok(api::Empty::new());
        }
        let inner = self.inner.clone();
        blocking(move || {
            let t = inner.task(&req.id)?;
            let p = if req.exec_id.is_empty() {
                None
            } else {
                Some(inner.proc(&t, &req.exec_id)?)
            };
            let proc_ref: &Proc = p.as_deref().unwrap_or(&t.init);
            if let Some(copy) = lock(&proc_ref.stdin).as_mut() {
                // The copy closes the process's stdin after forwarding what is still queued.
                copy.close();
                return Ok(());
            }
            let agent = inner.agent(&t.pod_id)?;
            agent
                .call_once(|c| c.close_stdin(&t.id, &req.exec_id))
                .map_err(agent_err("CloseStdin"))
        })
        .await?;
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let inner = self.inner.clone();
        blocking(move || {
            let t = inner.task(&req.id)?;
            if t.kind == Kind::Sandbox {
                return Ok(());
            }
            let json = req
                .resources
                .as_ref()
                .map(|a| a.value.clone())
                .ok_or_else(|| ShimError::InvalidArgument("update without resources".into()))?;
            inner
                .backend()?
                .mgr
                .update_container_resources(&t.id, &json)?;
            Ok(())
        })
        .await?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let t = self.inner.task(&req.id)?;
        let mut rx = if req.exec_id.is_empty() {
            t.init.exit.subscribe()
        } else {
            self.inner.proc(&t, &req.exec_id)?.exit.subscribe()
        };
        let exit = loop {
            if let Some(e) = *rx.borrow_and_update() {
                break e;
            }
            if rx.changed().await.is_err() {
                return Err(ShimError::NotFound(format!("task {}", req.id)).into());
            }
        };
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: timestamp(exit.at_nanos),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let inner = self.inner.clone();
        let m = blocking(move || inner.stats(&req.id)).await?;
        let any = convert_to_any(Box::new(m))
            .map_err(|e| ShimError::Rootfs(format!("encoding metrics: {e}")))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .inner
            .task(&req.id)
            .map(|t| self.inner.vmm_pid(&t.pod_id))
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, _: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if lock(&self.inner.tasks).is_empty() {
            self.inner.exit.signal();
        }
        Ok(api::Empty::new())
    }
}
