//! One container's state and the id-keyed table of all containers.
//!
//! Locking: the table lock is held only to look up, insert or remove an entry; a container's
//! own locks never across a blocking wait on the child (start waits on the sync pipe while
//! holding only that container's `phase` lock).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::process::{self, Spawned};
use super::spec::{ChildPlan, ContainerConfig};
use super::stdio::{self, Chunk, StreamBuffer};
use super::{unix_nanos, validate_id, ContainerError};
use crate::reaper::{ExitStatus, Reaper};

/// How long RemoveContainer waits for a killed container to be reaped.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How the init process ended, with timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub status: ExitStatus,
    pub started_at_unix_nanos: i64,
    pub finished_at_unix_nanos: i64,
}

/// Where a container's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsSource {
    /// A directory in the agent's filesystem.
    pub dir: PathBuf,
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
    Created { start: File, sync: File },
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

/// A container: its init process, stdio and exit status.
pub struct Container {
    id: String,
    pid: Pid,
    phase: Mutex<Phase>,
    started_at: Mutex<i64>,
    exit: Arc<ExitCell>,
    stdin: Mutex<Option<OwnedFd>>,
    stdout: Arc<StreamBuffer>,
    stderr: Arc<StreamBuffer>,
}

impl Container {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The init process's pid in the agent's pid namespace.
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
                id: self.id.clone(),
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
                id: self.id.clone(),
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

    /// Writes what fits into the stdin pipe without blocking; returns the bytes written.
    pub fn write_stdin(&self, data: &[u8]) -> Result<usize, ContainerError> {
        let stdin = lock(&self.stdin);
        let fd = stdin.as_ref().ok_or(ContainerError::StdinClosed)?;
        match nix::unistd::write(fd.as_fd(), data) {
            Ok(n) => Ok(n),
            Err(nix::Error::EAGAIN) => Ok(0),
            Err(nix::Error::EPIPE) => Err(ContainerError::StdinClosed),
            Err(e) => Err(ContainerError::Sys {
                what: "writing stdin",
                source: e,
            }),
        }
    }

    /// Closes stdin; closing twice is fine.
    pub fn close_stdin(&self) {
        lock(&self.stdin).take();
    }

    /// Kills the process (if not yet reaped) and waits for the reaper to collect it.
    fn kill_and_reap(&self) -> Result<(), ContainerError> {
        if self.exit_info().is_none() {
            // A not-yet-started child is killed the same way; it is pid 1 of its namespace, so
            // SIGKILL takes every process in it along.
            let _ = self.signal(Signal::SIGKILL);
        }
        self.wait(Some(Instant::now() + REMOVE_TIMEOUT)).map(drop)
    }
}

/// Every container of this agent, by id.
pub struct Containers {
    reaper: Arc<Reaper>,
    table: Mutex<HashMap<String, Arc<Container>>>,
    /// Per stream, bytes kept until read.
    buffer_capacity: usize,
}

impl Containers {
    pub fn new(reaper: Arc<Reaper>) -> Arc<Containers> {
        Arc::new(Containers {
            reaper,
            table: Mutex::new(HashMap::new()),
            buffer_capacity: protocol::MAX_STREAM_BUFFER,
        })
    }

    /// The container with this id.
    pub fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        lock(&self.table)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.to_owned()))
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
            log::warn!(
                "container {id}: not applied yet: {}",
                config.ignored.join(", ")
            );
        }
        if lock(&self.table).contains_key(id) {
            return Err(ContainerError::AlreadyExists(id.to_owned()));
        }
        if !rootfs.dir.is_absolute() || !rootfs.dir.is_dir() {
            return Err(ContainerError::InvalidArgument(format!(
                "rootfs {} is not an absolute path to a directory",
                rootfs.dir.display()
            )));
        }
        let scratch = Path::new(OVERLAY_SCRATCH);
        if rootfs.overlay {
            let bad = |p: &Path| p.to_str().is_none_or(|s| s.contains([',', ':', '\\']));
            if bad(&rootfs.dir) {
                return Err(ContainerError::InvalidArgument(format!(
                    "an overlay rootfs path must not contain ',', ':' or '\\': {}",
                    rootfs.dir.display()
                )));
            }
            std::fs::create_dir_all(scratch)
                .map_err(|e| ContainerError::Setup(format!("creating {OVERLAY_SCRATCH}: {e}")))?;
        }
        let plan = ChildPlan::new(
            &config,
            &rootfs.dir,
            rootfs.read_only,
            rootfs.overlay.then_some(scratch),
        );

        // Serialised by the reaper's registry lock: no other child is cloned while this one's
        // pipes are open in the agent.
        let (spawned, pid, exited) = self.reaper.spawn_owned(|| process::spawn(&plan))?;
        let Spawned {
            pid: _,
            start,
            mut sync,
            stdin,
            stdout,
            stderr,
        } = spawned;
        let exit = Arc::new(ExitCell::default());
        let container = Arc::new(Container {
            id: id.to_owned(),
            pid,
            phase: Mutex::new(Phase::Failed),
            started_at: Mutex::new(0),
            exit: exit.clone(),
            stdin: Mutex::new(None),
            stdout: StreamBuffer::new(self.buffer_capacity),
            stderr: StreamBuffer::new(self.buffer_capacity),
        });
        // From here the child exists: every error path must leave it reapable, which the
        // waiter thread below guarantees.
        self.spawn_waiter(&container, exited)?;
        let ready = process::wait_ready(&mut sync).and_then(|()| {
            fcntl(stdin.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
                .map_err(ContainerError::sys("setting stdin non-blocking"))?;
            stdio::spawn_reader(format!("{id}-out"), stdout, container.stdout.clone())
                .and_then(|_| {
                    stdio::spawn_reader(format!("{id}-err"), stderr, container.stderr.clone())
                })
                .map_err(|e| ContainerError::Setup(format!("starting output readers: {e}")))?;
            Ok(())
        });
        if let Err(e) = ready {
            let _ = container.kill_and_reap();
            return Err(e);
        }
        *lock(&container.stdin) = Some(stdin);
        *lock(&container.phase) = Phase::Created { start, sync };

        let mut table = lock(&self.table);
        if table.contains_key(id) {
            drop(table);
            let _ = container.kill_and_reap();
            return Err(ContainerError::AlreadyExists(id.to_owned()));
        }
        table.insert(id.to_owned(), container.clone());
        Ok(container)
    }

    fn spawn_waiter(
        &self,
        container: &Arc<Container>,
        exited: Receiver<ExitStatus>,
    ) -> Result<(), ContainerError> {
        let weak = Arc::downgrade(container);
        let exit = container.exit.clone();
        let spawned = thread::Builder::new()
            .name(format!("{}-wait", container.id))
            .spawn(move || {
                // The sender lives in the reaper until the child is collected.
                let Ok(status) = exited.recv() else { return };
                let started = weak.upgrade().map_or(0, |c| *lock(&c.started_at));
                *lock(&exit.info) = Some(ExitInfo {
                    status,
                    started_at_unix_nanos: started,
                    finished_at_unix_nanos: unix_nanos(),
                });
                exit.done.notify_all();
            });
        spawned.map(drop).map_err(|e| {
            // Without a waiter nobody would ever learn of the exit; kill the child now (the
            // reaper still collects it).
            let _ = kill(container.pid, Signal::SIGKILL);
            ContainerError::Setup(format!("starting the exit waiter: {e}"))
        })
    }

    /// Starts a created container.
    pub fn start(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        let container = self.get(id)?;
        container.start()?;
        Ok(container)
    }

    /// Kills the container if it runs, waits for it to be reaped and forgets it.
    pub fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        container.kill_and_reap()?;
        container.close_stdin();
        lock(&self.table).remove(id);
        Ok(())
    }

    /// How many containers exist.
    pub fn len(&self) -> usize {
        lock(&self.table).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for Containers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containers")
            .field("count", &self.len())
            .finish()
    }
}
