//! A self-contained cgroup v2 driver: one directory per container under a root the agent owns.
//!
//! - [`CgroupManager`] creates the root (inside a mounted cgroup2 hierarchy), enables the
//!   `cpu`, `cpuset`, `memory` and `pids` controllers for its children, and creates one
//!   [`Cgroup`] per container.
//! - [`Cgroup`] maps OCI [`LinuxResources`] onto the v2 interface files the way runc and crun do,
//!   reads statistics, freezes, kills and removes.
//! - [`validate_resources`] rejects bad client input before anything is created.
//! - [`OomWatcher`] reports OOM kills from `memory.events` through inotify.
//! - [`interface_stats`] reads the agent's network counters from sysfs.
//!
//! Every file the kernel writes is parsed defensively: an unparsable value reads as 0 and `max`
//! reads as 0, meaning "unlimited", in the statistics.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use nix::sys::signal::{kill, Signal};
use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxResources};

/// The controllers the agent enables for container cgroups, in the order they are enabled.
pub const CONTROLLERS: [&str; 4] = ["cpu", "cpuset", "memory", "pids"];

/// The CFS period the kernel and runc use when a quota comes without one, in µs.
pub const DEFAULT_CPU_PERIOD: u64 = 100_000;

/// Reads of cgroup (and sysfs) files stop here; the largest, `memory.stat`, is a few KiB.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// Longest cpuset list, `unified` value or cgroup name accepted from a client.
const MAX_ARG_LEN: usize = 4096;
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// A cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The resources or the cgroup name from the client are invalid.
    #[error("invalid cgroup argument: {0}")]
    InvalidArgument(String),
    /// A requested limit needs this controller, which is not enabled for the cgroup.
    #[error("cgroup controller {0:?} is not enabled")]
    ControllerUnavailable(String),
    /// A requested setting needs a cgroup interface file this kernel does not have.
    #[error("this kernel does not support {file} (in {path})")]
    Unsupported { file: &'static str, path: PathBuf },
    /// The directory is not inside a mounted cgroup2 hierarchy.
    #[error("{0} is not in a cgroup2 hierarchy")]
    NotCgroup2(PathBuf),
    /// The cgroup exists already.
    #[error("cgroup {0} already exists")]
    AlreadyExists(PathBuf),
    /// The kernel did not finish an operation in time.
    #[error("timed out {0}")]
    Timeout(String),
    /// The OOM watcher's inotify instance or thread could not be set up.
    #[error("cannot start the OOM watcher")]
    WatcherStart(#[source] io::Error),
    /// A cgroupfs operation failed.
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(op: &'static str, path: &Path, source: io::Error) -> CgroupError {
    CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(msg: impl Into<String>) -> CgroupError {
    CgroupError::InvalidArgument(msg.into())
}

/// Reads at most [`MAX_FILE_BYTES`] of a file; invalid UTF-8 is replaced, not an error.
fn read_text(path: &Path) -> io::Result<String> {
    let mut buf = Vec::new();
    File::open(path)?
        .take(MAX_FILE_BYTES)
        .read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Writes an existing file (never creates one) in a single `write`, as cgroupfs expects.
fn write_text(path: &Path, value: &str) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?
        .write_all(value.as_bytes())
}

/// The first token of a single-value file: a number, or `max` (and anything unparsable) as 0.
fn parse_single(text: &str) -> u64 {
    text.split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

/// A flat-keyed file (`key value` per line). Lines without exactly two fields are skipped; an
/// unparsable value reads as 0.
fn parse_flat_keyed(text: &str) -> BTreeMap<String, u64> {
    const MAX_KEYS: usize = 1024;
    let mut map = BTreeMap::new();
    for line in text.lines() {
        if map.len() >= MAX_KEYS {
            break;
        }
        let mut fields = line.split_whitespace();
        if let (Some(key), Some(value), None) = (fields.next(), fields.next(), fields.next()) {
            map.insert(key.to_string(), value.parse().unwrap_or(0));
        }
    }
    map
}

/// `cpu.weight` for OCI (cgroup v1) `cpu.shares`, as runc and crun convert it: shares are clamped
/// to 2..=262144 and mapped linearly onto 1..=10000.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// `memory.swap.max` for OCI `memory.swap` (memory plus swap) and the memory limit `limit`
/// (-1 for unlimited), as runc converts it. `None`: leave the file alone.
fn swap_max_value(swap: i64, limit: i64) -> Result<Option<String>, CgroupError> {
    match swap {
        0 => Ok(None),
        -1 => Ok(Some("max".to_string())),
        s if s < 0 => Err(invalid(format!("memory swap {s} is negative"))),
        _ if limit <= 0 => Err(invalid(
            "a memory+swap limit needs a memory limit".to_string(),
        )),
        s if s < limit => Err(invalid(format!(
            "memory+swap limit {s} is below the memory limit {limit}"
        ))),
        s => Ok(Some((s - limit).to_string())),
    }
}

/// A memory or pids value: -1 (and, for pids, any value <= 0) is `max`.
fn limit_value(v: i64) -> String {
    if v < 0 {
        "max".to_string()
    } else {
        v.to_string()
    }
}

fn validate_cpuset(what: &str, list: &str) -> Result<(), CgroupError> {
    if list.len() > MAX_ARG_LEN {
        return Err(invalid(format!("{what} list is too long")));
    }
    if list.is_empty() {
        return Ok(());
    }
    let number = |s: &str| -> Option<u32> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    for item in list.split(',') {
        let (first, last) = item.split_once('-').unwrap_or((item, item));
        match (number(first), number(last)) {
            (Some(a), Some(b)) if a <= b => {}
            _ => {
                return Err(invalid(format!(
                    "{what} {list:?} is not a list like \"0-3,5\""
                )))
            }
        }
    }
    Ok(())
}

/// `<controller>.<name>` (letters, digits, `_`, `.`), not one of the agent's own `cgroup.*` files.
fn unified_controller(key: &str) -> Result<&str, CgroupError> {
    let bad = || {
        invalid(format!(
            "unified key {key:?} is not a cgroup interface file"
        ))
    };
    let valid_chars = key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
    if key.len() > 255 || !valid_chars {
        return Err(bad());
    }
    match key.split_once('.') {
        Some((controller, rest)) if !controller.is_empty() && !rest.is_empty() => {
            if controller == "cgroup" {
                Err(invalid(format!(
                    "unified key {key:?}: cgroup.* files are managed by the agent"
                )))
            } else {
                Ok(controller)
            }
        }
        _ => Err(bad()),
    }
}

/// Checks client resources before anything is created or changed.
///
/// Rejects: negative values other than -1 for the CPU quota and the memory limit, reservation and
/// swap; a CPU quota below 1000 µs; a CPU period outside 1000..=1000000 µs; `cpu.idle` other than
/// 0 or 1; real-time CPU limits (cgroup v2 has none); cpuset lists other than `N` and `N-M` items
/// separated by commas; a memory+swap limit below the memory limit or with an unlimited memory
/// limit; malformed or agent-owned (`cgroup.*`) `unified` keys.
pub fn validate_resources(r: &LinuxResources) -> Result<(), CgroupError> {
    if let Some(cpu) = r.cpu() {
        validate_cpu(cpu)?;
    }
    if let Some(memory) = r.memory() {
        validate_memory(memory)?;
    }
    if let Some(unified) = r.unified() {
        for (key, value) in unified {
            unified_controller(key)?;
            if value.len() > MAX_ARG_LEN || value.contains('\0') {
                return Err(invalid(format!("unified value for {key:?} is invalid")));
            }
        }
    }
    Ok(())
}

fn validate_cpu(cpu: &LinuxCpu) -> Result<(), CgroupError> {
    match cpu.quota() {
        Some(q) if q < -1 => return Err(invalid(format!("cpu quota {q} is negative"))),
        Some(q) if q > 0 && q < 1000 => {
            return Err(invalid(format!("cpu quota {q} µs is below 1000 µs")))
        }
        _ => {}
    }
    if let Some(p) = cpu.period() {
        if p != 0 && !(1000..=1_000_000).contains(&p) {
            return Err(invalid(format!(
                "cpu period {p} µs is outside 1000..=1000000 µs"
            )));
        }
    }
    if let Some(idle) = cpu.idle() {
        if idle != 0 && idle != 1 {
            return Err(invalid(format!("cpu idle {idle} is not 0 or 1")));
        }
    }
    if cpu.realtime_runtime().is_some_and(|v| v != 0)
        || cpu.realtime_period().is_some_and(|v| v != 0)
    {
        return Err(invalid(
            "real-time CPU limits are not supported with cgroup v2",
        ));
    }
    if let Some(cpus) = cpu.cpus() {
        validate_cpuset("cpuset cpus", cpus)?;
    }
    if let Some(mems) = cpu.mems() {
        validate_cpuset("cpuset mems", mems)?;
    }
    Ok(())
}

fn validate_memory(m: &LinuxMemory) -> Result<(), CgroupError> {
    for (what, value) in [
        ("memory limit", m.limit()),
        ("memory reservation", m.reservation()),
        ("memory swap", m.swap()),
    ] {
        if let Some(v) = value {
            if v < -1 {
                return Err(invalid(format!("{what} {v} is negative")));
            }
        }
    }
    if let (Some(swap), Some(limit)) = (m.swap(), m.limit()) {
        if swap > 0 && limit != 0 {
            swap_max_value(swap, limit)?;
        }
    }
    Ok(())
}

fn validate_name(name: &str) -> Result<(), CgroupError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > 255
        || name.contains(['/', '\0', '\n'])
    {
        return Err(invalid(format!(
            "cgroup name {name:?} is not a single path component"
        )));
    }
    Ok(())
}

/// Reads `cgroup.controllers` (or `cgroup.subtree_control`) of `dir`; a missing file is empty.
fn read_controller_list(file: &Path) -> Result<Vec<String>, CgroupError> {
    match read_text(file) {
        Ok(text) => Ok(text.split_whitespace().map(str::to_string).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_error("read", file, e)),
    }
}

/// Writes `+<controller>` to `dir/cgroup.subtree_control` once per controller, logging failures.
fn enable_controllers(dir: &Path, wanted: &[&str]) {
    let file = dir.join("cgroup.subtree_control");
    for controller in wanted {
        if let Err(e) = write_text(&file, &format!("+{controller}")) {
            log::warn!(
                "cgroup: cannot enable controller {controller} in {}: {e}",
                file.display()
            );
        }
    }
}

/// Owns the agent's cgroup root and creates one child cgroup per container.
#[derive(Debug)]
pub struct CgroupManager {
    root: PathBuf,
    controllers: Vec<String>,
}

impl CgroupManager {
    /// Sets up `root`, a directory inside a mounted cgroup2 hierarchy, e.g.
    /// `/sys/fs/cgroup/hyperstart`.
    ///
    /// The parent of `root` must be a cgroup2 directory (its `statfs` type is
    /// `CGROUP2_SUPER_MAGIC`); `root` itself is created if missing (only the last component).
    /// Every controller of [`CONTROLLERS`] listed in the parent's `cgroup.controllers` is enabled
    /// in the parent's and then in `root`'s `cgroup.subtree_control`, one write per controller;
    /// one that fails is logged and skipped.
    pub fn new(root: PathBuf) -> Result<Self, CgroupError> {
        let parent = match (root.components().next_back(), root.parent()) {
            (Some(Component::Normal(_)), Some(parent)) if !parent.as_os_str().is_empty() => {
                parent.to_path_buf()
            }
            _ => {
                return Err(invalid(format!(
                    "cgroup root {} has no parent directory",
                    root.display()
                )))
            }
        };
        let fs = statfs(&parent).map_err(|e| io_error("statfs", &parent, e.into()))?;
        if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
            return Err(CgroupError::NotCgroup2(parent));
        }
        match fs::create_dir(&root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if !root.is_dir() {
                    return Err(io_error("use as a cgroup", &root, e));
                }
            }
            Err(e) => return Err(io_error("create", &root, e)),
        }

        let available = read_controller_list(&parent.join("cgroup.controllers"))?;
        let wanted: Vec<&str> = CONTROLLERS
            .into_iter()
            .filter(|c| available.iter().any(|a| a == c))
            .collect();
        enable_controllers(&parent, &wanted);
        let in_root = read_controller_list(&root.join("cgroup.controllers"))?;
        let wanted: Vec<&str> = wanted
            .into_iter()
            .filter(|c| in_root.iter().any(|a| a == c))
            .collect();
        enable_controllers(&root, &wanted);
        let enabled = read_controller_list(&root.join("cgroup.subtree_control"))?;
        let controllers: Vec<String> = CONTROLLERS
            .into_iter()
            .filter(|c| enabled.iter().any(|e| e == c))
            .map(str::to_string)
            .collect();
        log::info!(
            "cgroup: root {} with controllers [{}]",
            root.display(),
            controllers.join(" ")
        );
        Ok(Self { root, controllers })
    }

    /// The controllers (of [`CONTROLLERS`]) enabled for the cgroups this manager creates.
    pub fn controllers(&self) -> &[String] {
        &self.controllers
    }

    /// The agent's cgroup root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates `<root>/<name>` and applies `resources` to it.
    ///
    /// `name` must be one path component (non-empty, no `/`, not `.` or `..`). The resources are
    /// validated before the directory is created; if applying them fails, the new cgroup is
    /// removed again. An existing cgroup of that name is [`CgroupError::AlreadyExists`].
    pub fn create(
        &self,
        name: &str,
        resources: Option<&LinuxResources>,
    ) -> Result<Cgroup, CgroupError> {
        validate_name(name)?;
        if let Some(r) = resources {
            validate_resources(r)?;
        }
        let path = self.root.join(name);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(CgroupError::AlreadyExists(path))
            }
            Err(e) => return Err(io_error("create", &path, e)),
        }
        let cgroup = Cgroup { path };
        if let Some(r) = resources {
            if let Err(e) = cgroup.apply(r) {
                if let Err(remove_err) = cgroup.remove() {
                    log::warn!(
                        "cgroup: cannot remove {} again: {remove_err}",
                        cgroup.path.display()
                    );
                }
                return Err(e);
            }
        }
        Ok(cgroup)
    }
}

/// One write of a resource file, planned before any write happens.
struct ResourceWrite {
    file: String,
    value: String,
}

/// One container's cgroup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// A handle on an existing cgroup directory, without any checks (e.g. to reopen a cgroup the
    /// agent created earlier, or a test directory of regular files).
    pub fn at(path: PathBuf) -> Self {
        Self { path }
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves process `pid` into this cgroup (a write to `cgroup.procs`).
    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        if pid <= 0 {
            return Err(invalid(format!("pid {pid} is not a process id")));
        }
        let file = self.path.join("cgroup.procs");
        write_text(&file, &pid.to_string()).map_err(|e| io_error("write", &file, e))
    }

    /// The controllers available in this cgroup (its `cgroup.controllers`).
    pub fn available_controllers(&self) -> Result<Vec<String>, CgroupError> {
        read_controller_list(&self.path.join("cgroup.controllers"))
    }

    /// Applies the fields of `resources` that are set, leaving the others alone (so it serves
    /// both create and update). The mapping follows runc and crun:
    ///
    /// - `cpu.shares` -> `cpu.weight` ([`shares_to_weight`]; 0 means unset);
    /// - `cpu.quota`/`cpu.period` -> `cpu.max` `"<quota|max> <period>"`: quota -1 is `max`, 0 is
    ///   unset; a quota without a period uses [`DEFAULT_CPU_PERIOD`]; a period alone keeps the
    ///   current quota;
    /// - `cpu.idle` -> `cpu.idle`, `cpu.burst` -> `cpu.max.burst` (when the kernel has them);
    /// - `cpu.cpus` -> `cpuset.cpus`, `cpu.mems` -> `cpuset.mems` (empty means unset);
    /// - `memory.limit` -> `memory.max`, `memory.reservation` -> `memory.low` (-1 is `max`, 0 is
    ///   unset);
    /// - `memory.swap` (memory plus swap) -> `memory.swap.max` = swap - limit (-1 is `max`; the
    ///   current `memory.max` is used when the request has no limit; skipped when the kernel has
    ///   no swap accounting); an unlimited memory limit without a swap value makes swap unlimited
    ///   too;
    /// - `pids.limit` -> `pids.max` (<= 0 is `max`);
    /// - `unified` -> the named files, after everything else.
    ///
    /// A resource whose controller is not enabled is [`CgroupError::ControllerUnavailable`];
    /// nothing is written then. Block I/O and RDMA limits need controllers the agent does not
    /// enable and are refused the same way. Not applied (cgroup v1 only, or handled elsewhere):
    /// device rules, hugepage limits, network class/priorities, swappiness, kernel memory and
    /// `disableOOMKiller`. A value the kernel rejects (`EINVAL`, `ERANGE`) is
    /// [`CgroupError::InvalidArgument`].
    pub fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        validate_resources(resources)?;
        fs::metadata(&self.path).map_err(|e| io_error("stat", &self.path, e))?;
        let available = self.available_controllers()?;
        let writes = self.plan(resources, &available)?;
        for w in writes {
            let file = self.path.join(&w.file);
            log::debug!("cgroup: {} <- {:?}", file.display(), w.value);
            write_text(&file, &w.value).map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) | Some(libc::ERANGE) => {
                    invalid(format!("the kernel rejected {:?} for {}", w.value, w.file))
                }
                Some(libc::ENOENT) => invalid(format!("no cgroup file {}", w.file)),
                _ => io_error("write", &file, e),
            })?;
        }
        Ok(())
    }

    fn require(&self, available: &[String], controller: &str) -> Result<(), CgroupError> {
        if available.iter().any(|c| c == controller) {
            Ok(())
        } else {
            Err(CgroupError::ControllerUnavailable(controller.to_string()))
        }
    }

    fn require_file(&self, file: &'static str) -> Result<(), CgroupError> {
        let path = self.path.join(file);
        if path.exists() {
            Ok(())
        } else {
            Err(CgroupError::Unsupported { file, path })
        }
    }

    /// Every write `apply` makes, in order; fails before any write when a controller is missing.
    fn plan(
        &self,
        r: &LinuxResources,
        available: &[String],
    ) -> Result<Vec<ResourceWrite>, CgroupError> {
        let mut writes = Vec::new();
        let mut push = |file: &str, value: String| {
            writes.push(ResourceWrite {
                file: file.to_string(),
                value,
            })
        };
        if let Some(cpu) = r.cpu() {
            if let Some(shares) = cpu.shares().filter(|&s| s != 0) {
                self.require(available, "cpu")?;
                push("cpu.weight", shares_to_weight(shares).to_string());
            }
            let quota = cpu.quota().filter(|&q| q != 0);
            let period = cpu.period().filter(|&p| p != 0);
            if quota.is_some() || period.is_some() {
                self.require(available, "cpu")?;
                let quota = match quota {
                    Some(q) if q > 0 => q.to_string(),
                    Some(_) => "max".to_string(),
                    None => self.current_cpu_quota()?,
                };
                let period = period.unwrap_or(DEFAULT_CPU_PERIOD);
                push("cpu.max", format!("{quota} {period}"));
            }
            if let Some(burst) = cpu.burst() {
                self.require(available, "cpu")?;
                self.require_file("cpu.max.burst")?;
                push("cpu.max.burst", burst.to_string());
            }
            if let Some(idle) = cpu.idle() {
                self.require(available, "cpu")?;
                self.require_file("cpu.idle")?;
                push("cpu.idle", idle.to_string());
            }
            for (file, list) in [("cpuset.cpus", cpu.cpus()), ("cpuset.mems", cpu.mems())] {
                if let Some(list) = list.as_deref().filter(|l| !l.is_empty()) {
                    self.require(available, "cpuset")?;
                    push(file, list.to_string());
                }
            }
        }
        if let Some(m) = r.memory() {
            let limit = m.limit().filter(|&l| l != 0);
            if let Some(limit) = limit {
                self.require(available, "memory")?;
                push("memory.max", limit_value(limit));
            }
            if let Some(reservation) = m.reservation().filter(|&v| v != 0) {
                self.require(available, "memory")?;
                push("memory.low", limit_value(reservation));
            }
            let swap = m.swap().filter(|&s| s != 0);
            let swap_value = match (swap, limit) {
                (Some(-1), _) | (None, Some(-1)) => Some("max".to_string()),
                (Some(swap), Some(limit)) => swap_max_value(swap, limit)?,
                (Some(swap), None) => {
                    self.require(available, "memory")?;
                    swap_max_value(swap, self.current_memory_limit()?)?
                }
                (None, _) => None,
            };
            if let Some(value) = swap_value {
                self.require(available, "memory")?;
                if self.path.join("memory.swap.max").exists() {
                    push("memory.swap.max", value);
                } else {
                    log::debug!(
                        "cgroup: no swap accounting, memory swap {value} not applied to {}",
                        self.path.display()
                    );
                }
            }
            if m.swappiness().is_some() || m.disable_oom_killer().is_some() {
                log::debug!("cgroup: swappiness and disableOOMKiller do not exist in cgroup v2");
            }
        }
        if let Some(pids) = r.pids() {
            self.require(available, "pids")?;
            let limit = pids.limit();
            push("pids.max", limit_value(if limit <= 0 { -1 } else { limit }));
        }
        if let Some(bio) = r.block_io() {
            let set = bio.weight().is_some()
                || bio.leaf_weight().is_some()
                || bio.weight_device().as_ref().is_some_and(|v| !v.is_empty())
                || bio
                    .throttle_read_bps_device()
                    .as_ref()
                    .is_some_and(|v| !v.is_empty())
                || bio
                    .throttle_write_bps_device()
                    .as_ref()
                    .is_some_and(|v| !v.is_empty())
                || bio
                    .throttle_read_iops_device()
                    .as_ref()
                    .is_some_and(|v| !v.is_empty())
                || bio
                    .throttle_write_iops_device()
                    .as_ref()
                    .is_some_and(|v| !v.is_empty());
            if set {
                self.require(&[], "io")?;
            }
        }
        if r.rdma().as_ref().is_some_and(|m| !m.is_empty()) {
            self.require(&[], "rdma")?;
        }
        if let Some(unified) = r.unified() {
            // Sorted, so that the write order does not depend on the hash map.
            let sorted: BTreeMap<&String, &String> = unified.iter().collect();
            for (key, value) in sorted {
                self.require(available, unified_controller(key)?)?;
                push(key, value.clone());
            }
        }
        Ok(writes)
    }

    /// The quota field of `cpu.max` (`max` or a number), to keep it when only the period changes.
    fn current_cpu_quota(&self) -> Result<String, CgroupError> {
        let file = self.path.join("cpu.max");
        let text = read_text(&file).map_err(|e| io_error("read", &file, e))?;
        match text.split_whitespace().next() {
            Some("max") => Ok("max".to_string()),
            Some(q) if q.parse::<u64>().is_ok() => Ok(q.to_string()),
            _ => Err(io_error(
                "parse",
                &file,
                io::Error::new(io::ErrorKind::InvalidData, format!("{text:?}")),
            )),
        }
    }

    /// The current `memory.max` in bytes, -1 for `max`.
    fn current_memory_limit(&self) -> Result<i64, CgroupError> {
        let file = self.path.join("memory.max");
        let text = read_text(&file).map_err(|e| io_error("read", &file, e))?;
        let value = text.trim();
        if value == "max" {
            return Ok(-1);
        }
        value.parse().map_err(|_| {
            io_error(
                "parse",
                &file,
                io::Error::new(io::ErrorKind::InvalidData, format!("{text:?}")),
            )
        })
    }

    /// A file of this cgroup, `None` when it does not exist (its controller is off).
    fn read_optional(&self, file: &str) -> Result<Option<String>, CgroupError> {
        let path = self.path.join(file);
        match read_text(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("read", &path, e)),
        }
    }

    fn read_or_empty(&self, file: &str) -> Result<String, CgroupError> {
        Ok(self.read_optional(file)?.unwrap_or_default())
    }

    /// CPU, memory and pids statistics. Files of controllers that are off read as zeros; the
    /// cgroup directory itself must exist.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        fs::metadata(&self.path).map_err(|e| io_error("stat", &self.path, e))?;
        Ok(CgroupStats {
            cpu: CpuStat::parse(&self.read_or_empty("cpu.stat")?),
            memory: MemoryStat::parse(&MemoryFiles {
                current: &self.read_or_empty("memory.current")?,
                max: &self.read_or_empty("memory.max")?,
                stat: &self.read_or_empty("memory.stat")?,
                events: &self.read_or_empty("memory.events")?,
                swap_current: &self.read_or_empty("memory.swap.current")?,
            }),
            pids: PidsStat {
                current: parse_single(&self.read_or_empty("pids.current")?),
                limit: parse_single(&self.read_or_empty("pids.max")?),
            },
        })
    }

    /// The `oom_kill` count of `memory.events`; 0 when unreadable.
    pub fn oom_kill_count(&self) -> u64 {
        read_oom_kill(&self.memory_events_path()).unwrap_or(0)
    }

    /// This cgroup's `memory.events`, the file to give [`OomWatcher::watch`].
    pub fn memory_events_path(&self) -> PathBuf {
        self.path.join("memory.events")
    }

    /// The processes in this cgroup (`cgroup.procs`); unparsable lines are skipped.
    pub fn procs(&self) -> Result<Vec<i32>, CgroupError> {
        let file = self.path.join("cgroup.procs");
        let text = read_text(&file).map_err(|e| io_error("read", &file, e))?;
        Ok(text
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|&pid: &i32| pid > 0)
            .collect())
    }

    /// Whether `cgroup.freeze` says frozen (the requested state, not necessarily reached yet).
    fn freeze_requested(&self) -> bool {
        self.read_optional("cgroup.freeze")
            .ok()
            .flatten()
            .is_some_and(|t| t.trim() == "1")
    }

    /// Freezes (`true`) or thaws the cgroup: writes `cgroup.freeze` and waits, up to 5 s, until
    /// `cgroup.events` reports the state reached. A freeze that does not complete is undone.
    pub fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        self.require_file("cgroup.freeze")?;
        let file = self.path.join("cgroup.freeze");
        let value = if frozen { "1" } else { "0" };
        write_text(&file, value).map_err(|e| io_error("write", &file, e))?;
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        loop {
            let events = parse_flat_keyed(&self.read_or_empty("cgroup.events")?);
            if events.get("frozen").copied() == Some(u64::from(frozen)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                if frozen {
                    if let Err(e) = write_text(&file, "0") {
                        log::warn!("cgroup: cannot thaw {}: {e}", self.path.display());
                    }
                }
                return Err(CgroupError::Timeout(format!(
                    "waiting for {} to become {}",
                    self.path.display(),
                    if frozen { "frozen" } else { "thawed" }
                )));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Sends `signal` to every process of the cgroup once, returning how many were signalled.
    ///
    /// When the kernel has `cgroup.freeze`, the cgroup is frozen meanwhile, so that no process
    /// forks or exits (and has its pid reused) between listing and signalling; a cgroup that was
    /// frozen before stays frozen.
    pub fn signal_all(&self, signal: Signal) -> Result<usize, CgroupError> {
        let can_freeze = self.path.join("cgroup.freeze").exists();
        let was_frozen = self.freeze_requested();
        if can_freeze && !was_frozen {
            if let Err(e) = self.freeze(true) {
                log::warn!("cgroup: signalling {} unfrozen: {e}", self.path.display());
            }
        }
        let result = self.procs().map(|pids| {
            let mut signalled = 0;
            for pid in pids {
                match kill(Pid::from_raw(pid), signal) {
                    Ok(()) => signalled += 1,
                    Err(Errno::ESRCH) => {}
                    Err(e) => log::warn!("cgroup: cannot signal {pid} with {signal}: {e}"),
                }
            }
            signalled
        });
        if can_freeze && !was_frozen {
            if let Err(e) = self.freeze(false) {
                log::warn!("cgroup: cannot thaw {}: {e}", self.path.display());
            }
        }
        result
    }

    /// Kills every process and waits (up to 5 s) until `cgroup.procs` is empty.
    ///
    /// A frozen cgroup is thawed first. The kill is a write of `1` to `cgroup.kill` when the
    /// kernel has it (Linux >= 5.14, atomic against forks); otherwise, and for stragglers,
    /// [`Cgroup::signal_all`] with `SIGKILL` is repeated until the cgroup is empty. A cgroup that
    /// is already gone counts as empty.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if self.freeze_requested() {
            if let Err(e) = self.freeze(false) {
                log::warn!(
                    "cgroup: cannot thaw {} before killing: {e}",
                    self.path.display()
                );
            }
        }
        let kill_file = self.path.join("cgroup.kill");
        let mut use_signals = true;
        if kill_file.exists() {
            match write_text(&kill_file, "1") {
                Ok(()) => use_signals = false,
                Err(e) => log::warn!("cgroup: {}: {e}; killing pid by pid", kill_file.display()),
            }
        }
        let deadline = Instant::now() + KILL_TIMEOUT;
        let mut rounds = 0u32;
        loop {
            let pids = match self.procs() {
                Ok(pids) => pids,
                Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            };
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Timeout(format!(
                    "waiting for the {} processes of {} to die",
                    pids.len(),
                    self.path.display()
                )));
            }
            // After cgroup.kill, give the kernel a moment before falling back to signals.
            if use_signals || rounds >= 50 {
                self.signal_all(Signal::SIGKILL)?;
            }
            rounds = rounds.saturating_add(1);
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Removes the (empty) cgroup directory, retrying `EBUSY` for up to 2 s: processes leave a
    /// cgroup only once they are reaped. A cgroup that is already gone is not an error.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(POLL_INTERVAL);
                }
                Err(e) => return Err(io_error("remove", &self.path, e)),
            }
        }
    }
}

/// The `oom_kill` count of a `memory.events` file.
fn read_oom_kill(memory_events: &Path) -> Option<u64> {
    let text = read_text(memory_events).ok()?;
    Some(
        parse_flat_keyed(&text)
            .get("oom_kill")
            .copied()
            .unwrap_or(0),
    )
}

/// Statistics of one cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupStats {
    pub cpu: CpuStat,
    pub memory: MemoryStat,
    pub pids: PidsStat,
}

/// From `cpu.stat`, in µs (the `usage`/`user`/`system` lines exist without the cpu controller).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuStat {
    pub usage_usec: u64,
    pub user_usec: u64,
    pub system_usec: u64,
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_usec: u64,
}

impl CpuStat {
    /// Parses the contents of `cpu.stat`; missing keys are 0.
    pub fn parse(cpu_stat: &str) -> Self {
        let map = parse_flat_keyed(cpu_stat);
        let get = |key: &str| map.get(key).copied().unwrap_or(0);
        Self {
            usage_usec: get("usage_usec"),
            user_usec: get("user_usec"),
            system_usec: get("system_usec"),
            nr_periods: get("nr_periods"),
            nr_throttled: get("nr_throttled"),
            throttled_usec: get("throttled_usec"),
        }
    }
}

/// Memory statistics, in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryStat {
    /// `memory.current`.
    pub usage_bytes: u64,
    /// `memory.max`; 0 is unlimited (`max`).
    pub limit_bytes: u64,
    /// `usage_bytes` minus `inactive_file`, as the kubelet computes it.
    pub working_set_bytes: u64,
    /// `anon` of `memory.stat`.
    pub anon_bytes: u64,
    /// `file` of `memory.stat`.
    pub file_bytes: u64,
    /// `oom` of `memory.events`: times the limit was hit and the OOM killer invoked.
    pub oom_events: u64,
    /// `oom_kill` of `memory.events`: processes killed by the OOM killer.
    pub oom_kill_events: u64,
    /// `memory.swap.current`; 0 without swap accounting.
    pub swap_usage_bytes: u64,
    /// Every line of `memory.stat`.
    pub stat: BTreeMap<String, u64>,
}

/// The contents of the files [`MemoryStat`] is computed from ("" for a missing file).
pub struct MemoryFiles<'a> {
    pub current: &'a str,
    pub max: &'a str,
    pub stat: &'a str,
    pub events: &'a str,
    pub swap_current: &'a str,
}

impl MemoryStat {
    /// Computes the statistics from the files' contents.
    pub fn parse(files: &MemoryFiles<'_>) -> Self {
        let stat = parse_flat_keyed(files.stat);
        let events = parse_flat_keyed(files.events);
        let stat_value = |key: &str| stat.get(key).copied().unwrap_or(0);
        let usage_bytes = parse_single(files.current);
        Self {
            usage_bytes,
            limit_bytes: parse_single(files.max),
            working_set_bytes: usage_bytes.saturating_sub(stat_value("inactive_file")),
            anon_bytes: stat_value("anon"),
            file_bytes: stat_value("file"),
            oom_events: events.get("oom").copied().unwrap_or(0),
            oom_kill_events: events.get("oom_kill").copied().unwrap_or(0),
            swap_usage_bytes: parse_single(files.swap_current),
            stat,
        }
    }
}

/// From `pids.current` and `pids.max`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PidsStat {
    pub current: u64,
    /// 0 is unlimited (`max`).
    pub limit: u64,
}

/// The counters of one network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceStat {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// The network counters of the agent's network namespace: every interface of `sys_class_net`
/// (normally `/sys/class/net`) but `lo`, sorted by name, from its `statistics/` directory.
/// Entries without one are skipped; an unreadable counter is 0; an unreadable directory gives an
/// empty list.
pub fn interface_stats(sys_class_net: &Path) -> Vec<InterfaceStat> {
    const MAX_INTERFACES: usize = 4096;
    let entries = match fs::read_dir(sys_class_net) {
        Ok(entries) => entries,
        Err(e) => {
            log::debug!("net stats: cannot read {}: {e}", sys_class_net.display());
            return Vec::new();
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .take(MAX_INTERFACES)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name != "lo")
        .collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|name| {
            let dir = sys_class_net.join(&name).join("statistics");
            if !dir.is_dir() {
                return None;
            }
            let counter = |file: &str| read_text(&dir.join(file)).map_or(0, |t| parse_single(&t));
            Some(InterfaceStat {
                rx_bytes: counter("rx_bytes"),
                rx_packets: counter("rx_packets"),
                rx_errors: counter("rx_errors"),
                rx_dropped: counter("rx_dropped"),
                tx_bytes: counter("tx_bytes"),
                tx_packets: counter("tx_packets"),
                tx_errors: counter("tx_errors"),
                tx_dropped: counter("tx_dropped"),
                name,
            })
        })
        .collect()
}

type OomCallback = dyn Fn(&str, u64) + Send + Sync + 'static;

struct Watch {
    wd: WatchDescriptor,
    path: PathBuf,
    /// The last `oom_kill` count seen.
    last: u64,
}

struct WatcherShared {
    inotify: Inotify,
    wake: EventFd,
    stop: AtomicBool,
    watches: Mutex<HashMap<String, Watch>>,
    callback: Box<OomCallback>,
}

impl WatcherShared {
    fn watches(&self) -> MutexGuard<'_, HashMap<String, Watch>> {
        self.watches.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the inotify watch `wd` unless another key still uses it (same file).
    fn release(&self, watches: &HashMap<String, Watch>, wd: WatchDescriptor) {
        if !watches.values().any(|w| w.wd == wd) {
            // Fails harmlessly when the kernel dropped the watch already (file removed).
            let _ = self.inotify.rm_watch(wd);
        }
    }

    fn run(&self) {
        while !self.stop.load(Ordering::Acquire) {
            let mut fds = [
                PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    log::error!("oom watcher: poll: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            match self.inotify.read_events() {
                Ok(events) => self.handle(&events),
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                Err(e) => {
                    log::error!("oom watcher: reading inotify events: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    fn handle(&self, events: &[InotifyEvent]) {
        let mut check_all = false;
        let mut changed = HashSet::new();
        let mut gone = HashSet::new();
        for event in events {
            if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                check_all = true;
            } else if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                gone.insert(event.wd);
            } else {
                changed.insert(event.wd);
            }
        }
        let mut fired = Vec::new();
        {
            let mut watches = self.watches();
            for (key, watch) in watches.iter_mut() {
                if !(check_all || changed.contains(&watch.wd) || gone.contains(&watch.wd)) {
                    continue;
                }
                if let Some(count) = read_oom_kill(&watch.path) {
                    if count > watch.last {
                        watch.last = count;
                        fired.push((key.clone(), count));
                    }
                }
            }
            // The kernel dropped these watches (the cgroup was removed).
            watches.retain(|_, w| !gone.contains(&w.wd));
        }
        // Outside the lock, so that the callback may call `watch` and `unwatch`.
        for (key, count) in fired {
            let call = std::panic::AssertUnwindSafe(|| (self.callback)(&key, count));
            if std::panic::catch_unwind(call).is_err() {
                log::error!("oom watcher: the callback panicked for {key:?}");
            }
        }
    }
}

/// Reports OOM kills: one thread waits for inotify `IN_MODIFY` events on `memory.events` files
/// (cgroupfs raises them when the counters change) and calls the callback whenever a watched
/// file's `oom_kill` count grows. Files that disappear (cgroups removed) are forgotten.
pub struct OomWatcher {
    shared: Arc<WatcherShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for OomWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OomWatcher")
            .field("watches", &self.shared.watches().len())
            .finish()
    }
}

impl OomWatcher {
    /// Starts the watcher thread. `callback(key, new_oom_kill_count)` runs on that thread; it
    /// must not block for long. A panic in it is caught and logged.
    pub fn start<F>(callback: F) -> Result<Arc<Self>, CgroupError>
    where
        F: Fn(&str, u64) + Send + Sync + 'static,
    {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .map_err(|e| CgroupError::WatcherStart(e.into()))?;
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| CgroupError::WatcherStart(e.into()))?;
        let shared = Arc::new(WatcherShared {
            inotify,
            wake,
            stop: AtomicBool::new(false),
            watches: Mutex::new(HashMap::new()),
            callback: Box::new(callback),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("oom-watcher".to_string())
            .spawn(move || thread_shared.run())
            .map_err(CgroupError::WatcherStart)?;
        Ok(Arc::new(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Watches `memory_events` (a cgroup's `memory.events`) under `key`, replacing an earlier
    /// watch of that key. OOM kills before this call are not reported.
    pub fn watch(&self, memory_events: &Path, key: String) -> Result<(), CgroupError> {
        let mut watches = self.shared.watches();
        let wd = self
            .shared
            .inotify
            .add_watch(memory_events, AddWatchFlags::IN_MODIFY)
            .map_err(|e| io_error("watch", memory_events, e.into()))?;
        let last = read_oom_kill(memory_events).unwrap_or(0);
        let old = watches.insert(
            key,
            Watch {
                wd,
                path: memory_events.to_path_buf(),
                last,
            },
        );
        if let Some(old) = old {
            self.shared.release(&watches, old.wd);
        }
        Ok(())
    }

    /// Stops watching `key`; returns whether it was watched.
    pub fn unwatch(&self, key: &str) -> bool {
        let mut watches = self.shared.watches();
        match watches.remove(key) {
            Some(old) => {
                self.shared.release(&watches, old.wd);
                true
            }
            None => false,
        }
    }
}

impl Drop for OomWatcher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Err(e) = self.shared.wake.write(1) {
            log::warn!("oom watcher: cannot wake the thread to stop: {e}");
            return;
        }
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            // The last reference may be dropped by the callback, on the thread itself.
            if thread.thread().id() != std::thread::current().id() && thread.join().is_err() {
                log::error!("oom watcher: the thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder,
    };
    use std::sync::mpsc;

    /// A directory of regular files standing in for a cgroup.
    fn fake_cgroup(controllers: &str) -> (tempfile::TempDir, Cgroup) {
        let dir = tempfile::tempdir().unwrap();
        let files = [
            ("cgroup.controllers", controllers),
            ("cgroup.procs", ""),
            ("cgroup.freeze", "0"),
            ("cgroup.events", "populated 0\nfrozen 0\n"),
            ("cpu.weight", "100\n"),
            ("cpu.max", "max 100000\n"),
            ("cpuset.cpus", ""),
            ("cpuset.mems", ""),
            ("memory.max", "max\n"),
            ("memory.low", "0\n"),
            ("memory.swap.max", "max\n"),
            ("pids.max", "max\n"),
        ];
        for (name, content) in files {
            fs::write(dir.path().join(name), content).unwrap();
        }
        let cgroup = Cgroup::at(dir.path().to_path_buf());
        (dir, cgroup)
    }

    fn read(cg: &Cgroup, file: &str) -> String {
        fs::read_to_string(cg.path().join(file)).unwrap()
    }

    const ALL: &str = "cpuset cpu io memory pids\n";

    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<CgroupManager>();
        check::<Cgroup>();
        check::<OomWatcher>();
        check::<CgroupError>();
    }

    #[test]
    fn weights() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1), 1);
        assert_eq!(shares_to_weight(u64::MAX), 10_000);
    }

    #[test]
    fn cpu_mapping() {
        let (_dir, cg) = fake_cgroup(ALL);
        let cpu = LinuxCpuBuilder::default()
            .shares(1024u64)
            .quota(50_000i64)
            .period(200_000u64)
            .cpus("0-1,3")
            .mems("0")
            .build()
            .unwrap();
        cg.apply(&LinuxResourcesBuilder::default().cpu(cpu).build().unwrap())
            .unwrap();
        assert_eq!(read(&cg, "cpu.weight"), "39");
        assert_eq!(read(&cg, "cpu.max"), "50000 200000");
        assert_eq!(read(&cg, "cpuset.cpus"), "0-1,3");
        assert_eq!(read(&cg, "cpuset.mems"), "0");

        // Only a period: the quota stays.
        let cpu = LinuxCpuBuilder::default()
            .period(50_000u64)
            .build()
            .unwrap();
        cg.apply(&LinuxResourcesBuilder::default().cpu(cpu).build().unwrap())
            .unwrap();
        assert_eq!(read(&cg, "cpu.max"), "50000 50000");

        // Only a quota: the default period. Quota -1: max.
        let cpu = LinuxCpuBuilder::default().quota(20_000i64).build().unwrap();
        cg.apply(&LinuxResourcesBuilder::default().cpu(cpu).build().unwrap())
            .unwrap();
        assert_eq!(read(&cg, "cpu.max"), "20000 100000");
        let cpu = LinuxCpuBuilder::default().quota(-1i64).build().unwrap();
        cg.apply(&LinuxResourcesBuilder::default().cpu(cpu).build().unwrap())
            .unwrap();
        assert_eq!(read(&cg, "cpu.max"), "max 100000");
        fs::write(cg.path().join("cpu.max"), "max 100000\n").unwrap();
        let cpu = LinuxCpuBuilder::default()
            .period(10_000u64)
            .build()
            .unwrap();
        cg.apply(&LinuxResourcesBuilder::default().cpu(cpu).build().unwrap())
            .unwrap();
        assert_eq!(read(&cg, "cpu.max"), "max 10000");

        // Shares 0 and quota 0 are unset: nothing changes.
        let cpu = LinuxCpuBuilder::default()
            .shares(0u64)
            .quota(0i64)
            .build()
            .unwrap();
        cg.apply(&LinuxResourcesBuilder::default().cpu(cpu).build().unwrap())
            .unwrap();
        assert_eq!(read(&cg, "cpu.weight"), "39");
        assert_eq!(read(&cg, "cpu.max"), "max 10000");

        // cpu.idle and cpu.max.burst need kernel files this fake lacks.
        let cpu = LinuxCpuBuilder::default().idle(1i64).build().unwrap();
        let err = cg
            .apply(&LinuxResourcesBuilder::default().cpu(cpu).build().unwrap())
            .unwrap_err();
        assert!(
            matches!(
                err,
                CgroupError::Unsupported {
                    file: "cpu.idle",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn memory_mapping() {
        let (_dir, cg) = fake_cgroup(ALL);
        let mib = 1 << 20;
        let memory = LinuxMemoryBuilder::default()
            .limit(64 * mib)
            .reservation(32 * mib)
            .swap(96 * mib)
            .build()
            .unwrap();
        cg.apply(
            &LinuxResourcesBuilder::default()
                .memory(memory)
                .build()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(read(&cg, "memory.max"), (64 * mib).to_string());
        assert_eq!(read(&cg, "memory.low"), (32 * mib).to_string());
        assert_eq!(read(&cg, "memory.swap.max"), (32 * mib).to_string());

        // Swap alone is relative to the current memory.max.
        let memory = LinuxMemoryBuilder::default()
            .swap(64 * mib)
            .build()
            .unwrap();
        cg.apply(
            &LinuxResourcesBuilder::default()
                .memory(memory)
                .build()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(read(&cg, "memory.swap.max"), "0");

        // Unlimited memory makes swap unlimited too.
        let memory = LinuxMemoryBuilder::default().limit(-1i64).build().unwrap();
        cg.apply(
            &LinuxResourcesBuilder::default()
                .memory(memory)
                .build()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(read(&cg, "memory.max"), "max");
        assert_eq!(read(&cg, "memory.swap.max"), "max");

        // Swap without any memory limit is refused.
        let memory = LinuxMemoryBuilder::default()
            .swap(64 * mib)
            .build()
            .unwrap();
        let err = cg
            .apply(
                &LinuxResourcesBuilder::default()
                    .memory(memory)
                    .build()
                    .unwrap(),
            )
            .unwrap_err();
        assert!(matches!(err, CgroupError::InvalidArgument(_)), "{err}");

        // Without swap accounting the swap value is skipped.
        fs::remove_file(cg.path().join("memory.swap.max")).unwrap();
        let memory = LinuxMemoryBuilder::default()
            .limit(mib)
            .swap(2 * mib)
            .build()
            .unwrap();
        cg.apply(
            &LinuxResourcesBuilder::default()
                .memory(memory)
                .build()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(read(&cg, "memory.max"), mib.to_string());
    }

    #[test]
    fn swap_arithmetic() {
        assert_eq!(swap_max_value(0, 100).unwrap(), None);
        assert_eq!(swap_max_value(-1, 100).unwrap().as_deref(), Some("max"));
        assert_eq!(swap_max_value(150, 100).unwrap().as_deref(), Some("50"));
        assert_eq!(swap_max_value(100, 100).unwrap().as_deref(), Some("0"));
        assert!(swap_max_value(50, 100).is_err());
        assert!(swap_max_value(150, -1).is_err());
        assert!(swap_max_value(-5, 100).is_err());
    }

    #[test]
    fn pids_mapping() {
        let (_dir, cg) = fake_cgroup(ALL);
        for (limit, expected) in [(8i64, "8"), (0, "max"), (-1, "max"), (-7, "max"), (1, "1")] {
            let pids = LinuxPidsBuilder::default().limit(limit).build().unwrap();
            cg.apply(&LinuxResourcesBuilder::default().pids(pids).build().unwrap())
                .unwrap();
            assert_eq!(read(&cg, "pids.max"), expected, "limit {limit}");
        }
    }

    #[test]
    fn unified_mapping() {
        let (_dir, cg) = fake_cgroup(ALL);
        fs::write(cg.path().join("memory.oom.group"), "0").unwrap();
        let unified = HashMap::from([("memory.oom.group".to_string(), "1".to_string())]);
        cg.apply(
            &LinuxResourcesBuilder::default()
                .unified(unified)
                .build()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(read(&cg, "memory.oom.group"), "1");

        for key in [
            "cgroup.procs",
            "../x",
            "memory",
            "memory max",
            ".max",
            "memory.",
            "a/b.c",
        ] {
            let unified = HashMap::from([(key.to_string(), "1".to_string())]);
            let r = LinuxResourcesBuilder::default()
                .unified(unified)
                .build()
                .unwrap();
            let err = cg.apply(&r).unwrap_err();
            assert!(
                matches!(err, CgroupError::InvalidArgument(_)),
                "{key}: {err}"
            );
        }
        // A file the kernel does not have.
        let unified = HashMap::from([("memory.nonexistent".to_string(), "1".to_string())]);
        let r = LinuxResourcesBuilder::default()
            .unified(unified)
            .build()
            .unwrap();
        assert!(matches!(cg.apply(&r), Err(CgroupError::InvalidArgument(_))));
        // A controller that is off.
        let unified = HashMap::from([("hugetlb.2MB.max".to_string(), "1".to_string())]);
        let r = LinuxResourcesBuilder::default()
            .unified(unified)
            .build()
            .unwrap();
        assert!(matches!(
            cg.apply(&r),
            Err(CgroupError::ControllerUnavailable(_))
        ));
    }

    #[test]
    fn missing_controller_writes_nothing() {
        let (_dir, cg) = fake_cgroup("cpu memory\n");
        let r = LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(1i64 << 30)
                    .build()
                    .unwrap(),
            )
            .pids(LinuxPidsBuilder::default().limit(5i64).build().unwrap())
            .build()
            .unwrap();
        match cg.apply(&r) {
            Err(CgroupError::ControllerUnavailable(controller)) => assert_eq!(controller, "pids"),
            other => panic!("{other:?}"),
        }
        assert_eq!(read(&cg, "memory.max"), "max\n");

        let cpu = LinuxCpuBuilder::default().cpus("0").build().unwrap();
        let r = LinuxResourcesBuilder::default().cpu(cpu).build().unwrap();
        assert!(matches!(
            cg.apply(&r),
            Err(CgroupError::ControllerUnavailable(c)) if c == "cpuset"
        ));

        // No cgroup.controllers at all: nothing is available.
        fs::remove_file(cg.path().join("cgroup.controllers")).unwrap();
        let cpu = LinuxCpuBuilder::default().shares(100u64).build().unwrap();
        let r = LinuxResourcesBuilder::default().cpu(cpu).build().unwrap();
        assert!(matches!(
            cg.apply(&r),
            Err(CgroupError::ControllerUnavailable(_))
        ));
        // Nothing requested: nothing needed.
        cg.apply(&LinuxResources::default()).unwrap();
    }

    #[test]
    fn validation() {
        let cpu = |b: LinuxCpuBuilder| {
            LinuxResourcesBuilder::default()
                .cpu(b.build().unwrap())
                .build()
                .unwrap()
        };
        let mem = |b: LinuxMemoryBuilder| {
            LinuxResourcesBuilder::default()
                .memory(b.build().unwrap())
                .build()
                .unwrap()
        };
        let bad = [
            cpu(LinuxCpuBuilder::default().quota(-2i64)),
            cpu(LinuxCpuBuilder::default().quota(999i64)),
            cpu(LinuxCpuBuilder::default().quota(50_000i64).period(999u64)),
            cpu(LinuxCpuBuilder::default().period(1_000_001u64)),
            cpu(LinuxCpuBuilder::default().idle(2i64)),
            cpu(LinuxCpuBuilder::default().realtime_runtime(1000i64)),
            cpu(LinuxCpuBuilder::default().cpus("0-")),
            cpu(LinuxCpuBuilder::default().cpus("3-1")),
            cpu(LinuxCpuBuilder::default().cpus("0,,1")),
            cpu(LinuxCpuBuilder::default().cpus("0 1")),
            cpu(LinuxCpuBuilder::default().cpus("a")),
            cpu(LinuxCpuBuilder::default().mems("0\n")),
            cpu(LinuxCpuBuilder::default().cpus("99999999999")),
            mem(LinuxMemoryBuilder::default().limit(-2i64)),
            mem(LinuxMemoryBuilder::default().reservation(-3i64)),
            mem(LinuxMemoryBuilder::default().swap(-2i64)),
            mem(LinuxMemoryBuilder::default().limit(100i64).swap(50i64)),
            mem(LinuxMemoryBuilder::default().limit(-1i64).swap(50i64)),
        ];
        for r in &bad {
            let err = validate_resources(r).unwrap_err();
            assert!(
                matches!(err, CgroupError::InvalidArgument(_)),
                "{r:?}: {err}"
            );
        }
        let good = [
            LinuxResources::default(),
            cpu(LinuxCpuBuilder::default().quota(-1i64).period(1000u64)),
            cpu(LinuxCpuBuilder::default()
                .quota(1000i64)
                .period(1_000_000u64)),
            cpu(LinuxCpuBuilder::default()
                .period(0u64)
                .cpus("")
                .mems("0-1,4,6-7")),
            cpu(LinuxCpuBuilder::default().shares(u64::MAX)),
            mem(LinuxMemoryBuilder::default().limit(1i64).swap(-1i64)),
            mem(LinuxMemoryBuilder::default().limit(100i64).swap(100i64)),
            mem(LinuxMemoryBuilder::default().limit(0i64).reservation(-1i64)),
        ];
        for r in &good {
            validate_resources(r).unwrap();
        }
    }

    #[test]
    fn names() {
        for name in ["", ".", "..", "a/b", "/", "a\0b", &"x".repeat(256)] {
            assert!(
                matches!(validate_name(name), Err(CgroupError::InvalidArgument(_))),
                "{name:?}"
            );
        }
        for name in ["a", "...", "pod-1_c.2", &"x".repeat(255)] {
            validate_name(name).unwrap();
        }
    }

    #[test]
    fn manager_needs_cgroup2_parent() {
        let dir = tempfile::tempdir().unwrap();
        let err = CgroupManager::new(dir.path().join("hyperstart")).unwrap_err();
        assert!(matches!(err, CgroupError::NotCgroup2(_)), "{err}");
        assert!(!dir.path().join("hyperstart").exists());
        for root in ["/", "hyperstart", "/sys/fs/cgroup/.."] {
            let err = CgroupManager::new(PathBuf::from(root)).unwrap_err();
            assert!(
                matches!(err, CgroupError::InvalidArgument(_)),
                "{root}: {err}"
            );
        }
        let err = CgroupManager::new(dir.path().join("missing/hyperstart")).unwrap_err();
        assert!(matches!(err, CgroupError::Io { op: "statfs", .. }), "{err}");
    }

    const CPU_STAT: &str = "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\n\
        nr_periods 10\nnr_throttled 3\nthrottled_usec 4567\nnr_bursts 0\nburst_usec 0\n";
    const MEMORY_STAT: &str = "anon 1048576\nfile 4194304\nkernel 65536\n\
        inactive_file 3145728\nactive_file 1048576\nbogus\nweird x y\npgfault notanumber\n";
    const MEMORY_EVENTS: &str = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";

    #[test]
    fn stats_parsing() {
        let cpu = CpuStat::parse(CPU_STAT);
        assert_eq!(
            cpu,
            CpuStat {
                usage_usec: 123_456,
                user_usec: 100_000,
                system_usec: 23_456,
                nr_periods: 10,
                nr_throttled: 3,
                throttled_usec: 4567,
            }
        );
        let mem = MemoryStat::parse(&MemoryFiles {
            current: "8388608\n",
            max: "33554432\n",
            stat: MEMORY_STAT,
            events: MEMORY_EVENTS,
            swap_current: "",
        });
        assert_eq!(mem.usage_bytes, 8 << 20);
        assert_eq!(mem.limit_bytes, 32 << 20);
        assert_eq!(mem.working_set_bytes, 5 << 20);
        assert_eq!(mem.anon_bytes, 1 << 20);
        assert_eq!(mem.file_bytes, 4 << 20);
        assert_eq!(mem.oom_events, 2);
        assert_eq!(mem.oom_kill_events, 1);
        assert_eq!(mem.swap_usage_bytes, 0);
        assert_eq!(mem.stat.len(), 6);
        assert_eq!(mem.stat["kernel"], 65536);
        assert_eq!(mem.stat["pgfault"], 0);

        // "max", garbage and inactive_file above usage.
        let mem = MemoryStat::parse(&MemoryFiles {
            current: "100",
            max: "max\n",
            stat: "inactive_file 4096\n",
            events: "\0\u{fffd}garbage",
            swap_current: "-5",
        });
        assert_eq!(mem.limit_bytes, 0);
        assert_eq!(mem.working_set_bytes, 0);
        assert_eq!(mem.swap_usage_bytes, 0);
        assert_eq!(mem.oom_kill_events, 0);
        assert_eq!(
            CpuStat::parse("usage_usec 18446744073709551616\n").usage_usec,
            0
        );
    }

    #[test]
    fn stats_from_files() {
        let (_dir, cg) = fake_cgroup(ALL);
        for (file, content) in [
            ("cpu.stat", CPU_STAT),
            ("memory.current", "4096\n"),
            ("memory.stat", MEMORY_STAT),
            ("memory.events", MEMORY_EVENTS),
            ("pids.current", "3\n"),
            ("cgroup.procs", "12\n34\nx\n-1\n"),
        ] {
            fs::write(cg.path().join(file), content).unwrap();
        }
        let stats = cg.stats().unwrap();
        assert_eq!(stats.cpu.usage_usec, 123_456);
        assert_eq!(stats.memory.usage_bytes, 4096);
        assert_eq!(stats.memory.limit_bytes, 0);
        assert_eq!(stats.pids.current, 3);
        assert_eq!(stats.pids.limit, 0);
        assert_eq!(cg.oom_kill_count(), 1);
        assert_eq!(cg.procs().unwrap(), vec![12, 34]);

        // Controllers off: zeros. A missing cgroup: an error.
        let empty = tempfile::tempdir().unwrap();
        let cg = Cgroup::at(empty.path().to_path_buf());
        assert_eq!(cg.stats().unwrap(), CgroupStats::default());
        assert_eq!(cg.oom_kill_count(), 0);
        let gone = Cgroup::at(empty.path().join("gone"));
        assert!(matches!(gone.stats(), Err(CgroupError::Io { .. })));
        let pids = LinuxPidsBuilder::default().limit(5i64).build().unwrap();
        let r = LinuxResourcesBuilder::default().pids(pids).build().unwrap();
        assert!(matches!(gone.apply(&r), Err(CgroupError::Io { .. })));
        assert!(gone.procs().is_err());
        gone.remove().unwrap();
        gone.kill_all().unwrap();
    }

    #[test]
    fn freeze_waits_for_events() {
        let (_dir, cg) = fake_cgroup(ALL);
        fs::write(cg.path().join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        cg.freeze(true).unwrap();
        assert_eq!(read(&cg, "cgroup.freeze"), "1");
        fs::remove_file(cg.path().join("cgroup.freeze")).unwrap();
        assert!(matches!(
            cg.freeze(false),
            Err(CgroupError::Unsupported {
                file: "cgroup.freeze",
                ..
            })
        ));
    }

    #[test]
    fn interfaces() {
        let dir = tempfile::tempdir().unwrap();
        let add = |name: &str, counters: &[(&str, &str)]| {
            let stats = dir.path().join(name).join("statistics");
            fs::create_dir_all(&stats).unwrap();
            for (file, value) in counters {
                fs::write(stats.join(file), value).unwrap();
            }
        };
        add("lo", &[("rx_bytes", "999\n")]);
        add(
            "eth0",
            &[
                ("rx_bytes", "1000\n"),
                ("rx_packets", "10\n"),
                ("rx_errors", "1\n"),
                ("rx_dropped", "2\n"),
                ("tx_bytes", "2000\n"),
                ("tx_packets", "20\n"),
                ("tx_errors", "3\n"),
                ("tx_dropped", "4\n"),
            ],
        );
        add("eth1", &[("rx_bytes", "garbage"), ("tx_bytes", "5\n")]);
        fs::write(dir.path().join("bonding_masters"), "").unwrap();

        let stats = interface_stats(dir.path());
        assert_eq!(
            stats,
            vec![
                InterfaceStat {
                    name: "eth0".to_string(),
                    rx_bytes: 1000,
                    rx_packets: 10,
                    rx_errors: 1,
                    rx_dropped: 2,
                    tx_bytes: 2000,
                    tx_packets: 20,
                    tx_errors: 3,
                    tx_dropped: 4,
                },
                InterfaceStat {
                    name: "eth1".to_string(),
                    tx_bytes: 5,
                    ..Default::default()
                },
            ]
        );
        assert!(interface_stats(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn oom_watcher_on_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.events");
        let b = dir.path().join("b.events");
        fs::write(&a, "oom 0\noom_kill 0\n").unwrap();
        fs::write(&b, "oom 0\noom_kill 3\n").unwrap();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let watcher = OomWatcher::start(move |key, count| {
            let _ = tx.lock().unwrap().send((key.to_string(), count));
        })
        .unwrap();
        watcher.watch(&a, "a".to_string()).unwrap();
        watcher.watch(&b, "b".to_string()).unwrap();
        watcher.watch(&a, "a2".to_string()).unwrap();
        assert!(watcher
            .watch(&dir.path().join("missing"), "m".to_string())
            .is_err());

        // b's earlier kills are not reported; a's first one is, for both keys.
        fs::write(&a, "oom 1\noom_kill 1\n").unwrap();
        let mut got = vec![
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        ];
        got.sort();
        assert_eq!(got, vec![("a".to_string(), 1), ("a2".to_string(), 1)]);

        // Unwatched keys are quiet; the other key on the same file still reports.
        assert!(watcher.unwatch("a2"));
        assert!(!watcher.unwatch("a2"));
        fs::write(&a, "oom 2\noom_kill 2\n").unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            ("a".to_string(), 2)
        );
        // Same count again: nothing.
        fs::write(&a, "oom 3\noom_kill 2\n").unwrap();
        fs::write(&b, "oom 3\noom_kill 4\n").unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            ("b".to_string(), 4)
        );

        // A file that disappears is forgotten.
        fs::remove_file(&a).unwrap();
        fs::write(&b, "oom 3\noom_kill 5\n").unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            ("b".to_string(), 5)
        );
        assert!(rx.try_recv().is_err());
        drop(watcher);
    }
}
