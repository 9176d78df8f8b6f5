//! Containers and their processes, and [`Containers`], the agent's runtime state.
//!
//! Locking: the table lock is held only to look up, insert or remove an entry; a container's
//! own locks never across a blocking wait on a child (start waits on the sync socket while
//! holding only that process's `phase` lock).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{Linux, LinuxResources, Process as OciProcess};

use super::cgroup::{Cgroup, CgroupManager, OomWatcher};
use super::disks::{DiskRef, Disks};
use super::events::{EventKind, EventLog};
use super::files::FileStore;
use super::process::{self, Spawned};
use super::sandbox::{Sandbox, SandboxConfig};
use super::security::SecurityPlan;
use super::spec::{
    open_namespace, ChildPlan, ContainerConfig, ExecPlan, ProcessConfig, RootfsPlan,
};
use super::stdio::{self, Chunk, StreamBuffer};
use super::{unix_nanos, validate_id, ContainerError};
use crate::block::{BlockDevices, Selector};
use crate::reaper::{ExitStatus, Reaper};

/// How long RemoveContainer waits for a killed container to be reaped.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How a process ended, with timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub status: ExitStatus,
    /// Killed by SIGKILL while its cgroup counted an OOM kill.
    pub oom_killed: bool,
    pub started_at_unix_nanos: i64,
    pub finished_at_unix_nanos: i64,
}

/// Where a container's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsLocation {
    /// A directory in the agent's filesystem.
    Dir(PathBuf),
    /// A block device with this filesystem type.
    Block { selector: Selector, fs_type: String },
}

/// A container's rootfs request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsSource {
    pub location: RootfsLocation,
    pub read_only: bool,
    /// A writable overlay private to the container, its upper layer on a tmpfs (so the
    /// container's writes cost agent memory and vanish with it).
    pub overlay: bool,
}

/// Where children mount their overlay tmpfs, each in its own mount namespace.
pub const OVERLAY_SCRATCH: &str = "/run/hyperstart/overlay";

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdout,
    Stderr,
}

enum Phase {
    /// Set up, blocked before execve.
    Created { start: File, sync: UnixStream },
    /// exec'd (it may have exited since: see `exit`).
    Started,
    /// The start failed; the child is gone or going.
    Failed,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Created { .. } => "created",
            Phase::Started => "started",
            Phase::Failed => "failed to start",
        }
    }
}

#[derive(Default)]
struct ExitCell {
    info: Mutex<Option<ExitInfo>>,
    done: Condvar,
}

/// A process of a container: the init process (exec_id "") or an exec'd one.
pub struct Process {
    exec_id: String,
    pid: Pid,
    phase: Mutex<Phase>,
    started_at: Mutex<i64>,
    exit: Arc<ExitCell>,
    stdin: Mutex<Option<OwnedFd>>,
    /// The terminal's master, for resizing.
    tty: std::sync::OnceLock<OwnedFd>,
    stdout: Arc<StreamBuffer>,
    stderr: Arc<StreamBuffer>,
}

impl Process {
    pub fn exec_id(&self) -> &str {
        &self.exec_id
    }

    /// The pid in the agent's pid namespace.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The exit, once the reaper has collected it.
    pub fn exit_info(&self) -> Option<ExitInfo> {
        *lock(&self.exit.info)
    }

    fn start(&self) -> Result<(), ContainerError> {
        let mut phase = lock(&self.phase);
        let Phase::Created { start, sync } = &mut *phase else {
            return Err(ContainerError::InvalidState {
                id: self.exec_id.clone(),
                state: phase.name(),
            });
        };
        *lock(&self.started_at) = unix_nanos();
        match process::start(start, sync) {
            Ok(()) => {
                *phase = Phase::Started;
                Ok(())
            }
            Err(e) => {
                *phase = Phase::Failed;
                Err(e)
            }
        }
    }

    /// Waits for the exit until `deadline` (`None`: no limit).
    pub fn wait(&self, deadline: Option<Instant>) -> Result<ExitInfo, ContainerError> {
        let mut info = lock(&self.exit.info);
        loop {
            if let Some(i) = *info {
                return Ok(i);
            }
            info = match deadline {
                None => self
                    .exit
                    .done
                    .wait(info)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ContainerError::Timeout);
                    }
                    self.exit
                        .done
                        .wait_timeout(info, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// Sends a signal unless the process has already been reaped (its pid may be reused).
    pub fn signal(&self, signal: Signal) -> Result<(), ContainerError> {
        let info = lock(&self.exit.info);
        if info.is_some() {
            return Err(ContainerError::InvalidState {
                id: self.exec_id.clone(),
                state: "stopped",
            });
        }
        match kill(self.pid, signal) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(e) => Err(ContainerError::Sys {
                what: "kill",
                source: e,
            }),
        }
    }

    /// Takes buffered output.
    pub fn read(&self, stream: StreamKind, max: usize, wait: Duration) -> Chunk {
        match stream {
            StreamKind::Stdout => self.stdout.take(max, wait),
            StreamKind::Stderr => self.stderr.take(max, wait),
        }
    }

    /// Acknowledged read of buffered output (see [`super::stdio::StreamBuffer::read_from`]).
    pub fn read_from(&self, stream: StreamKind, offset: u64, max: usize, wait: Duration) -> Chunk {
        match stream {
            StreamKind::Stdout => self.stdout.read_from(offset, max, wait),
            StreamKind::Stderr => self.stderr.read_from(offset, max, wait),
        }
    }

    /// Writes what fits into stdin without blocking; returns the bytes written.
    pub fn write_stdin(&self, data: &[u8]) -> Result<usize, ContainerError> {
        let stdin = lock(&self.stdin);
        let fd = stdin.as_ref().ok_or(ContainerError::StdinClosed)?;
        match nix::unistd::write(fd.as_fd(), data) {
            Ok(n) => Ok(n),
            Err(nix::Error::EAGAIN) => Ok(0),
            Err(nix::Error::EPIPE | nix::Error::EIO) => Err(ContainerError::StdinClosed),
            Err(e) => Err(ContainerError::Sys {
                what: "writing stdin",
                source: e,
            }),
        }
    }

    /// Closes stdin; closing twice is fine. On a terminal, sends end-of-file (^D) instead: the
    /// terminal stays the process's output.
    pub fn close_stdin(&self) {
        let fd = lock(&self.stdin).take();
        if let (Some(fd), Some(_)) = (fd, self.tty.get()) {
            let _ = nix::unistd::write(fd.as_fd(), &[4u8]);
        }
    }

    /// Sets the terminal's window size.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ContainerError> {
        let tty = self.tty.get().ok_or_else(|| ContainerError::InvalidState {
            id: self.exec_id.clone(),
            state: "without a terminal",
        })?;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from the pointer.
        let ret = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if ret < 0 {
            return Err(ContainerError::Sys {
                what: "TIOCSWINSZ",
                source: nix::Error::last(),
            });
        }
        Ok(())
    }

    /// Kills the process (if not yet reaped) and waits for the reaper to collect it.
    fn kill_and_reap(&self) -> Result<(), ContainerError> {
        if self.exit_info().is_none() {
            let _ = self.signal(Signal::SIGKILL);
        }
        self.wait(Some(Instant::now() + REMOVE_TIMEOUT)).map(drop)
    }
}

/// A container: its init process, exec'd processes, cgroup and rootfs disk.
pub struct Container {
    id: String,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    cgroup: Option<Cgroup>,
    /// The spec's linux section (seccomp for exec'd processes).
    linux: Option<Linux>,
    disk: Option<DiskRef>,
    /// Killing the init process ends every process (it is PID 1 of its own pid namespace).
    own_pid_namespace: bool,
    paused: AtomicBool,
}

impl Container {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The init process's pid in the agent's pid namespace.
    pub fn pid(&self) -> Pid {
        self.init.pid
    }

    pub fn init(&self) -> &Arc<Process> {
        &self.init
    }

    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// A process by exec id ("" is the init process).
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, ContainerError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::ExecNotFound {
                container_id: self.id.clone(),
                exec_id: exec_id.to_owned(),
            })
    }

    /// Pids of the container: its cgroup's members, else its processes known to the agent.
    pub fn pids(&self) -> Vec<(i32, String)> {
        let mut known: HashMap<i32, String> = lock(&self.execs)
            .values()
            .filter(|p| p.exit_info().is_none())
            .map(|p| (p.pid.as_raw(), p.exec_id.clone()))
            .collect();
        if self.init.exit_info().is_none() {
            known.insert(self.init.pid.as_raw(), String::new());
        }
        let mut pids: Vec<i32> = match self.cgroup.as_ref().map(Cgroup::procs) {
            Some(Ok(p)) => p,
            _ if self.own_pid_namespace => {
                pids_in_namespace(self.init.pid).unwrap_or_else(|| known.keys().copied().collect())
            }
            _ => known.keys().copied().collect(),
        };
        pids.sort_unstable();
        pids.into_iter()
            .map(|pid| (pid, known.get(&pid).cloned().unwrap_or_default()))
            .collect()
    }

    fn kill_everything(&self) {
        if let Some(cg) = &self.cgroup {
            if let Err(e) = cg.kill_all() {
                log::warn!("container {}: killing its cgroup: {e}", self.id);
            }
        }
        let execs: Vec<_> = lock(&self.execs).values().cloned().collect();
        for p in execs {
            let _ = p.signal(Signal::SIGKILL);
        }
        let _ = self.init.signal(Signal::SIGKILL);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }
}

/// A validated spec with its security plan and namespaces opened, ready to spawn.
struct Prepared {
    config: ContainerConfig,
    security: SecurityPlan,
    clone_flags: libc::c_int,
    pid_ns: Option<OwnedFd>,
    join: Vec<(OwnedFd, libc::c_int)>,
    unshare_cgroup: bool,
}

/// Agent-wide runtime settings.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where the agent keeps its files: `files/` (CopyFile), `disks/` (rootfs mounts).
    pub state_dir: PathBuf,
    /// The cgroup v2 directory containers' cgroups go under; `None`: no cgroups (host mode on
    /// a machine whose cgroup v2 hierarchy has no controllers).
    pub cgroup_root: Option<PathBuf>,
    /// Guest PID 1 (the pod's own kernel) rather than a process on a shared host.
    pub guest: bool,
    pub block: BlockDevices,
}

/// Every container of this agent, by id, and the pod around them.
pub struct Containers {
    reaper: Arc<Reaper>,
    config: RuntimeConfig,
    table: Mutex<HashMap<String, Arc<Container>>>,
    /// Per stream, bytes kept until read.
    buffer_capacity: usize,
    cgroups: Option<CgroupManager>,
    oom: Option<Arc<OomWatcher>>,
    events: Arc<EventLog>,
    files: FileStore,
    disks: Arc<Disks>,
    sandbox: Mutex<Option<Sandbox>>,
}

impl Containers {
    /// The runtime without cgroups, files under a per-process state directory (tests).
    pub fn new(reaper: Arc<Reaper>) -> Arc<Containers> {
        let config = RuntimeConfig {
            state_dir: std::env::temp_dir().join(format!("hyperstart-{}", std::process::id())),
            cgroup_root: None,
            guest: false,
            block: BlockDevices::guest(),
        };
        match Containers::with_config(reaper.clone(), config.clone()) {
            Ok(c) => c,
            Err(e) => {
                log::error!("runtime set-up failed ({e}); running without cgroups");
                Containers::build(reaper, config, None, None)
            }
        }
    }

    /// The runtime; fails when the cgroup root cannot be set up.
    pub fn with_config(
        reaper: Arc<Reaper>,
        config: RuntimeConfig,
    ) -> Result<Arc<Containers>, ContainerError> {
        let cgroups = match &config.cgroup_root {
            Some(root) => Some(
                CgroupManager::new(root.clone())
                    .map_err(|e| ContainerError::Setup(format!("cgroups: {e}")))?,
            ),
            None => None,
        };
        Ok(Containers::build(reaper, config, cgroups, None))
    }

    fn build(
        reaper: Arc<Reaper>,
        config: RuntimeConfig,
        cgroups: Option<CgroupManager>,
        _unused: Option<()>,
    ) -> Arc<Containers> {
        let events = Arc::new(EventLog::new(protocol::EVENT_LOG_CAPACITY));
        let oom = if cgroups.is_some() {
            let sink = events.clone();
            match OomWatcher::start(move |key: &str, _count: u64| {
                sink.publish(EventKind::Oom, key, "", 0);
            }) {
                Ok(w) => Some(w),
                Err(e) => {
                    log::warn!("OOM watcher unavailable: {e}");
                    None
                }
            }
        } else {
            None
        };
        Arc::new(Containers {
            files: FileStore::new(config.state_dir.join("files"), protocol::MAX_COPY_FILE_SIZE),
            disks: Disks::new(config.block.clone(), config.state_dir.join("disks")),
            reaper,
            config,
            table: Mutex::new(HashMap::new()),
            buffer_capacity: protocol::MAX_STREAM_BUFFER,
            cgroups,
            oom,
            events,
            sandbox: Mutex::new(None),
        })
    }

    pub fn events(&self) -> &EventLog {
        &self.events
    }

    pub fn files(&self) -> &FileStore {
        &self.files
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// The container with this id.
    pub fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        lock(&self.table)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.to_owned()))
    }

    /// Every container id.
    pub fn ids(&self) -> Vec<String> {
        lock(&self.table).keys().cloned().collect()
    }

    fn cgroup_for(
        &self,
        id: &str,
        resources: Option<&LinuxResources>,
    ) -> Result<Option<Cgroup>, ContainerError> {
        if let Some(r) = resources {
            super::cgroup::validate_resources(r)
                .map_err(|e| ContainerError::InvalidSpec(e.to_string()))?;
        }
        match &self.cgroups {
            Some(m) => m.create(id, resources).map(Some).map_err(cgroup_error),
            None => {
                let limits = resources.is_some_and(|r| {
                    r.cpu().is_some() || r.memory().is_some() || r.pids().is_some()
                });
                if limits {
                    Err(ContainerError::FailedPrecondition(
                        "this agent runs without cgroups (no cgroup v2 controllers): resource \
                         limits cannot be enforced"
                            .into(),
                    ))
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// Creates a container: its init process is set up and waits for [`Containers::start`].
    pub fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &RootfsSource,
    ) -> Result<Arc<Container>, ContainerError> {
        validate_id(id)?;
        let config = ContainerConfig::from_json(spec_json)?;
        if !config.ignored.is_empty() {
            log::warn!("container {id}: not applied: {}", config.ignored.join(", "));
        }
        if lock(&self.table).contains_key(id) {
            return Err(ContainerError::AlreadyExists(id.to_owned()));
        }
        let security = SecurityPlan::from_spec(
            config
                .spec
                .process()
                .as_ref()
                .ok_or_else(|| ContainerError::InvalidSpec("process is missing".into()))?,
            config.spec.linux().as_ref(),
        )
        .map_err(|e| ContainerError::InvalidSpec(e.to_string()))?;
        // Namespaces to join.
        let mut pid_ns = None;
        let mut join = Vec::new();
        let mut clone_flags = 0;
        for ns in &config.namespaces {
            match (&ns.path, ns.flag) {
                (None, libc::CLONE_NEWCGROUP) => {}
                (None, flag) => clone_flags |= flag,
                (Some(path), libc::CLONE_NEWPID) => {
                    pid_ns = Some(open_namespace(path, libc::CLONE_NEWPID)?)
                }
                (Some(path), flag) => join.push((open_namespace(path, flag)?, flag)),
            }
        }
        let unshare_cgroup = config.new_namespace(libc::CLONE_NEWCGROUP);

        // The rootfs.
        let (dir, disk) = match &rootfs.location {
            RootfsLocation::Dir(dir) => {
                if !dir.is_absolute() || !dir.is_dir() {
                    return Err(ContainerError::InvalidArgument(format!(
                        "rootfs {} is not an absolute path to a directory",
                        dir.display()
                    )));
                }
                (dir.clone(), None)
            }
            RootfsLocation::Block { selector, fs_type } => {
                let writable = !rootfs.read_only && !rootfs.overlay;
                let disk = self.disks.acquire(selector, fs_type, writable)?;
                (disk.dir.clone(), Some(disk))
            }
        };
        let release = |disk: &Option<DiskRef>| {
            if let Some(d) = disk {
                self.disks.release(d);
            }
        };
        let prepared = Prepared {
            config,
            security,
            clone_flags,
            pid_ns,
            join,
            unshare_cgroup,
        };
        let result = self.create_with_rootfs(id, prepared, rootfs, &dir, disk);
        if let Err((e, disk)) = result {
            release(&disk);
            return Err(e);
        }
        result.map_err(|(e, _)| e)
    }

    fn create_with_rootfs(
        &self,
        id: &str,
        prepared: Prepared,
        rootfs: &RootfsSource,
        dir: &Path,
        disk: Option<DiskRef>,
    ) -> Result<Arc<Container>, (ContainerError, Option<DiskRef>)> {
        let Prepared {
            config,
            security,
            clone_flags,
            pid_ns,
            join,
            unshare_cgroup,
        } = prepared;
        let scratch = Path::new(OVERLAY_SCRATCH);
        if rootfs.overlay {
            if !Disks::overlay_safe(dir) {
                return Err((
                    ContainerError::InvalidArgument(format!(
                        "an overlay rootfs path must not contain ',', ':' or '\\': {}",
                        dir.display()
                    )),
                    disk,
                ));
            }
            if let Err(e) = std::fs::create_dir_all(scratch) {
                return Err((
                    ContainerError::Setup(format!("creating {OVERLAY_SCRATCH}: {e}")),
                    disk,
                ));
            }
        }
        let rootfs_plan = match RootfsPlan::new(
            &config,
            dir,
            rootfs.read_only,
            rootfs.overlay.then_some(scratch),
        ) {
            Ok(p) => p,
            Err(e) => return Err((e, disk)),
        };
        let cgroup = match self.cgroup_for(id, config.resources.as_ref()) {
            Ok(c) => c,
            Err(e) => return Err((e, disk)),
        };
        let cgroup_fd = match cgroup.as_ref().map(|c| open_dir(c.path())).transpose() {
            Ok(fd) => fd,
            Err(e) => {
                remove_cgroup(cgroup.as_ref());
                return Err((e, disk));
            }
        };
        let own_pid_namespace = clone_flags & libc::CLONE_NEWPID != 0;
        let hostname = if clone_flags & libc::CLONE_NEWUTS != 0 {
            config
                .hostname
                .as_deref()
                .map(|h| std::ffi::CString::new(h).unwrap_or_default())
        } else {
            None
        };
        let plan = ChildPlan {
            clone_flags,
            pid_ns,
            cgroup: cgroup_fd,
            join,
            unshare_cgroup,
            hostname,
            rootfs: Some(rootfs_plan),
            exec: ExecPlan::new(&config.process, security),
        };
        let spawned = self.spawn_process(id, "", &plan, cgroup.as_ref());
        let init = match spawned {
            Ok(p) => p,
            Err(e) => {
                remove_cgroup(cgroup.as_ref());
                return Err((e, disk));
            }
        };
        let container = Arc::new(Container {
            id: id.to_owned(),
            init,
            execs: Mutex::new(HashMap::new()),
            cgroup,
            linux: config.spec.linux().clone(),
            disk,
            own_pid_namespace,
            paused: AtomicBool::new(false),
        });
        let mut table = lock(&self.table);
        if table.contains_key(id) {
            drop(table);
            self.teardown(&container);
            return Err((ContainerError::AlreadyExists(id.to_owned()), None));
        }
        table.insert(id.to_owned(), container.clone());
        drop(table);
        if let (Some(w), Some(cg)) = (&self.oom, &container.cgroup) {
            if let Err(e) = w.watch(&cg.memory_events_path(), id.to_owned()) {
                log::warn!("container {id}: OOM events unavailable: {e}");
            }
        }
        self.events
            .publish(EventKind::Created, id, "", container.pid().as_raw() as u32);
        Ok(container)
    }

    /// Clones a process from `plan`, waits for its set-up and wires its stdio.
    fn spawn_process(
        &self,
        container_id: &str,
        exec_id: &str,
        plan: &ChildPlan,
        cgroup: Option<&Cgroup>,
    ) -> Result<Arc<Process>, ContainerError> {
        // Serialised by the reaper's registry lock: no other child is cloned while this one's
        // pipes are open in the agent.
        let (spawned, pid, exited) = self.reaper.spawn_owned(|| process::spawn(plan))?;
        let Spawned {
            pid: _,
            start,
            mut sync,
            stdin,
            stdout,
            stderr,
        } = spawned;
        let name = if exec_id.is_empty() {
            container_id.to_owned()
        } else {
            format!("{container_id}.{exec_id}")
        };
        let exit = Arc::new(ExitCell::default());
        let proc_ = Arc::new(Process {
            exec_id: exec_id.to_owned(),
            pid,
            phase: Mutex::new(Phase::Failed),
            started_at: Mutex::new(0),
            exit: exit.clone(),
            stdin: Mutex::new(None),
            tty: std::sync::OnceLock::new(),
            stdout: StreamBuffer::new(self.buffer_capacity),
            stderr: StreamBuffer::new(self.buffer_capacity),
        });
        // From here the child exists: every error path must leave it reapable, which the
        // waiter thread below guarantees.
        let oom_count = cgroup.map(|c| c.memory_events_path());
        self.spawn_waiter(container_id, &proc_, exited, oom_count)?;
        let ready = process::wait_ready(&mut sync);
        let tty = match ready {
            Ok(tty) => tty,
            Err(e) => {
                let _ = proc_.kill_and_reap();
                return Err(e);
            }
        };
        let wired = (|| {
            let (stdin, out, tty) = match tty {
                None => (stdin, stdout, None),
                Some(master) => {
                    drop((stdin, stdout));
                    proc_.stderr.close();
                    let reader = master
                        .try_clone()
                        .map_err(|e| ContainerError::Setup(format!("dup terminal: {e}")))?;
                    let writer = master
                        .try_clone()
                        .map_err(|e| ContainerError::Setup(format!("dup terminal: {e}")))?;
                    (writer, reader, Some(master))
                }
            };
            fcntl(stdin.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
                .map_err(ContainerError::sys("setting stdin non-blocking"))?;
            stdio::spawn_reader(format!("{name}-out"), out, proc_.stdout.clone())
                .map_err(|e| ContainerError::Setup(format!("starting output readers: {e}")))?;
            if tty.is_none() {
                stdio::spawn_reader(format!("{name}-err"), stderr, proc_.stderr.clone())
                    .map_err(|e| ContainerError::Setup(format!("starting output readers: {e}")))?;
            }
            Ok((stdin, tty))
        })();
        let (stdin, tty) = match wired {
            Ok(w) => w,
            Err(e) => {
                let _ = proc_.kill_and_reap();
                return Err(e);
            }
        };
        if let Some(master) = tty {
            let _ = proc_.tty.set(master);
        }
        *lock(&proc_.stdin) = Some(stdin);
        *lock(&proc_.phase) = Phase::Created { start, sync };
        Ok(proc_)
    }

    fn spawn_waiter(
        &self,
        container_id: &str,
        proc_: &Arc<Process>,
        exited: Receiver<ExitStatus>,
        memory_events: Option<PathBuf>,
    ) -> Result<(), ContainerError> {
        let exit = proc_.exit.clone();
        let events = self.events.clone();
        let cid = container_id.to_owned();
        let eid = proc_.exec_id.clone();
        let pid = proc_.pid.as_raw() as u32;
        // The start time is read at exit through a weak reference: the waiter must not keep
        // the process alive.
        let weak = Arc::downgrade(proc_);
        let spawned = thread::Builder::new()
            .name(format!("{cid}-wait"))
            .spawn(move || {
                // The sender lives in the reaper until the child is collected.
                let Ok(status) = exited.recv() else { return };
                let oom_killed = status == ExitStatus::Signaled(libc::SIGKILL)
                    && memory_events.is_some_and(|p| oom_kills(&p) > 0);
                let started = weak.upgrade().map_or(0, |p| *lock(&p.started_at));
                let finished = unix_nanos();
                let (exit_code, signal) = match status {
                    ExitStatus::Exited(c) => (c, 0),
                    ExitStatus::Signaled(s) => (0, s),
                };
                // The event first: a waiter released below may remove the container at once,
                // and its REMOVED event must come after this EXITED.
                events.publish(
                    EventKind::Exited {
                        exit_code,
                        signal,
                        oom_killed,
                    },
                    &cid,
                    &eid,
                    pid,
                );
                *lock(&exit.info) = Some(ExitInfo {
                    status,
                    oom_killed,
                    started_at_unix_nanos: started,
                    finished_at_unix_nanos: finished,
                });
                exit.done.notify_all();
            });
        spawned.map(drop).map_err(|e| {
            // Without a waiter nobody would ever learn of the exit; kill the child now (the
            // reaper still collects it).
            let _ = kill(proc_.pid, Signal::SIGKILL);
            ContainerError::Setup(format!("starting the exit waiter: {e}"))
        })
    }

    /// Starts a created container.
    pub fn start(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        let container = self.get(id)?;
        container.init.start()?;
        self.events
            .publish(EventKind::Started, id, "", container.pid().as_raw() as u32);
        Ok(container)
    }

    /// Starts another process in a running container.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
    ) -> Result<Arc<Process>, ContainerError> {
        validate_id(exec_id)
            .map_err(|_| ContainerError::InvalidArgument(format!("invalid exec id {exec_id:?}")))?;
        let container = self.get(id)?;
        let oci: OciProcess = serde_json::from_slice(process_json)
            .map_err(|e| ContainerError::InvalidSpec(format!("process: {e}")))?;
        let pconfig = ProcessConfig::from_oci(&oci)?;
        let security = SecurityPlan::for_exec(&oci, container.linux.as_ref())
            .map_err(|e| ContainerError::InvalidSpec(e.to_string()))?;
        if container.init.exit_info().is_some()
            || !matches!(*lock(&container.init.phase), Phase::Started)
        {
            return Err(ContainerError::InvalidState {
                id: id.to_owned(),
                state: "not running",
            });
        }
        if lock(&container.execs).contains_key(exec_id) {
            return Err(ContainerError::AlreadyExists(format!("{id}/{exec_id}")));
        }
        // The init process's namespaces, where they differ from the agent's.
        let init = container.init.pid.as_raw();
        let mut join = Vec::new();
        let mut pid_ns = None;
        for (name, flag) in [
            ("net", libc::CLONE_NEWNET),
            ("ipc", libc::CLONE_NEWIPC),
            ("uts", libc::CLONE_NEWUTS),
            ("cgroup", libc::CLONE_NEWCGROUP),
            ("pid", libc::CLONE_NEWPID),
            ("mnt", libc::CLONE_NEWNS),
        ] {
            let theirs = PathBuf::from(format!("/proc/{init}/ns/{name}"));
            let ours = PathBuf::from(format!("/proc/self/ns/{name}"));
            let same = match (std::fs::metadata(&theirs), std::fs::metadata(&ours)) {
                (Ok(a), Ok(b)) => {
                    use std::os::unix::fs::MetadataExt;
                    a.ino() == b.ino() && a.dev() == b.dev()
                }
                (Err(e), _) | (_, Err(e)) => {
                    return Err(ContainerError::InvalidState {
                        id: format!("{id} ({e})"),
                        state: "gone",
                    })
                }
            };
            if same {
                continue;
            }
            let fd = open_namespace(&theirs, flag)?;
            if flag == libc::CLONE_NEWPID {
                pid_ns = Some(fd);
            } else {
                join.push((fd, flag));
            }
        }
        let cgroup_fd = container
            .cgroup
            .as_ref()
            .map(|c| open_dir(c.path()))
            .transpose()?;
        let plan = ChildPlan {
            clone_flags: 0,
            pid_ns,
            cgroup: cgroup_fd,
            join,
            unshare_cgroup: false,
            hostname: None,
            rootfs: None,
            exec: ExecPlan::new(&pconfig, security),
        };
        let proc_ = self.spawn_process(id, exec_id, &plan, container.cgroup.as_ref())?;
        {
            let mut execs = lock(&container.execs);
            if execs.contains_key(exec_id) {
                drop(execs);
                let _ = proc_.kill_and_reap();
                return Err(ContainerError::AlreadyExists(format!("{id}/{exec_id}")));
            }
            execs.insert(exec_id.to_owned(), proc_.clone());
        }
        if let Err(e) = proc_.start() {
            lock(&container.execs).remove(exec_id);
            let _ = proc_.kill_and_reap();
            return Err(e);
        }
        self.events
            .publish(EventKind::Started, id, exec_id, proc_.pid.as_raw() as u32);
        Ok(proc_)
    }

    /// Kills an exec'd process if it runs, waits for it to be reaped and forgets it.
    pub fn remove_exec(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        if exec_id.is_empty() {
            return Err(ContainerError::InvalidArgument(
                "the init process is removed with its container".into(),
            ));
        }
        let container = self.get(id)?;
        let Some(p) = lock(&container.execs).remove(exec_id) else {
            return Ok(());
        };
        p.kill_and_reap()?;
        p.close_stdin();
        Ok(())
    }

    /// Kills the container if it runs, waits for it to be reaped and forgets it.
    pub fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        self.teardown(&container);
        lock(&self.table).remove(id);
        self.events.publish(EventKind::Removed, id, "", 0);
        Ok(())
    }

    fn teardown(&self, container: &Container) {
        if container.is_paused() {
            if let Some(cg) = &container.cgroup {
                let _ = cg.freeze(false);
            }
        }
        container.kill_everything();
        let execs: Vec<_> = lock(&container.execs).values().cloned().collect();
        for p in execs.iter().chain(std::iter::once(&container.init)) {
            if let Err(e) = p.kill_and_reap() {
                log::warn!("container {}: {} not reaped: {e}", container.id, p.exec_id);
            }
            p.close_stdin();
        }
        if !container.own_pid_namespace {
            // Processes the container's processes forked and that are not in its cgroup
            // cannot be tracked without one; with a cgroup, kill_all got them.
            log::debug!("container {}: shared pid namespace", container.id);
        }
        if let (Some(w), Some(_)) = (&self.oom, &container.cgroup) {
            w.unwatch(&container.id);
        }
        remove_cgroup(container.cgroup.as_ref());
        if let Some(d) = &container.disk {
            self.disks.release(d);
        }
    }

    /// Applies new resource limits.
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let resources: LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| ContainerError::InvalidArgument(format!("resources: {e}")))?;
        super::cgroup::validate_resources(&resources)
            .map_err(|e| ContainerError::InvalidArgument(e.to_string()))?;
        let cg = container.cgroup.as_ref().ok_or_else(|| {
            ContainerError::FailedPrecondition("the container has no cgroup".into())
        })?;
        cg.apply(&resources).map_err(cgroup_error)
    }

    /// Freezes or thaws the container.
    pub fn set_paused(&self, id: &str, paused: bool) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let cg = container.cgroup.as_ref().ok_or_else(|| {
            ContainerError::FailedPrecondition("the container has no cgroup to freeze".into())
        })?;
        cg.freeze(paused).map_err(cgroup_error)?;
        container.paused.store(paused, Ordering::SeqCst);
        let kind = if paused {
            EventKind::Paused
        } else {
            EventKind::Resumed
        };
        self.events.publish(kind, id, "", 0);
        Ok(())
    }

    /// Creates the pod's namespaces and settings.
    pub fn create_sandbox(&self, config: &SandboxConfig) -> Result<(u32, bool), ContainerError> {
        let mut slot = lock(&self.sandbox);
        if slot.is_some() {
            return Err(ContainerError::AlreadyExists("sandbox".into()));
        }
        let sandbox = Sandbox::create(&self.reaper, config, self.config.guest)?;
        let pid = sandbox.pid.as_raw() as u32;
        let shared = sandbox.share_pid_namespace;
        *slot = Some(sandbox);
        Ok((pid, shared))
    }

    /// Namespace path of the sandbox holder.
    pub fn sandbox_namespace(&self, name: &str) -> Option<String> {
        lock(&self.sandbox).as_ref().map(|s| s.namespace_path(name))
    }

    pub fn has_sandbox(&self) -> bool {
        lock(&self.sandbox).is_some()
    }

    /// Removes every container, then the sandbox. Idempotent.
    pub fn destroy_sandbox(&self) {
        for id in self.ids() {
            let _ = self.remove(&id);
        }
        if let Some(s) = lock(&self.sandbox).take() {
            s.destroy();
        }
    }

    /// How many containers exist.
    pub fn len(&self) -> usize {
        lock(&self.table).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every process in the pid namespace of `init` (a scan of /proc), `None` when unreadable.
fn pids_in_namespace(init: Pid) -> Option<Vec<i32>> {
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::metadata(format!("/proc/{init}/ns/pid")).ok()?;
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/pid")) {
            if m.ino() == ns.ino() && m.dev() == ns.dev() {
                pids.push(pid);
            }
        }
    }
    Some(pids)
}

/// The oom_kill count of a memory.events file (0 when unreadable).
fn oom_kills(memory_events: &Path) -> u64 {
    std::fs::read_to_string(memory_events)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn open_dir(path: &Path) -> Result<OwnedFd, ContainerError> {
    File::open(path)
        .map(OwnedFd::from)
        .map_err(|e| ContainerError::Setup(format!("opening {}: {e}", path.display())))
}

fn remove_cgroup(cg: Option<&Cgroup>) {
    if let Some(cg) = cg {
        if let Err(e) = cg.kill_all().and_then(|()| cg.remove()) {
            log::warn!("removing cgroup {}: {e}", cg.path().display());
        }
    }
}

fn cgroup_error(e: super::cgroup::CgroupError) -> ContainerError {
    use super::cgroup::CgroupError as E;
    match e {
        E::InvalidArgument(m) => ContainerError::InvalidArgument(m),
        E::ControllerUnavailable(c) => {
            ContainerError::FailedPrecondition(format!("cgroup controller {c} is not available"))
        }
        other => ContainerError::Setup(format!("cgroup: {other}")),
    }
}

impl std::fmt::Debug for Containers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containers")
            .field("count", &self.len())
            .finish()
    }
}
