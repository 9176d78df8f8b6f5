//! The OCI runtime spec, as far as this runtime supports it, and the [`ChildPlan`] built from it.
//!
//! The plan holds every C string and pointer array the cloned child needs, so the child (a copy
//! of a multi-threaded process) does not allocate between `clone` and `execve`.

use std::ffi::{CString, OsStr};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{Linux, LinuxNamespaceType, LinuxResources, Mount, Process, Spec};

use super::security::SecurityPlan;
use super::ContainerError;

/// Host device nodes bind-mounted into the container's /dev.
pub const DEV_NODES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// What a process runs as and with (the container's init or an exec'd process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
    /// Run on a pseudo terminal (stdout carries both streams).
    pub terminal: bool,
}

/// One namespace of linux.namespaces: new (`path` None) or joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceEntry {
    /// CLONE_NEW* flag.
    pub flag: libc::c_int,
    pub path: Option<PathBuf>,
}

/// A mount from the spec's `mounts`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Absolute, normalised, inside the container.
    pub destination: PathBuf,
    /// "bind" for bind mounts (type "bind" or a bind/rbind option), else the filesystem type.
    pub kind: String,
    pub source: Option<PathBuf>,
    pub flags: libc::c_ulong,
    /// MS_PRIVATE / MS_SLAVE / MS_SHARED (| MS_REC) applied after mounting, 0 for none.
    pub propagation: libc::c_ulong,
    /// Filesystem-specific options ("size=64m,mode=755").
    pub data: String,
}

/// Destinations the runtime always mounts itself; spec entries for them are not mounted twice.
pub const DEFAULT_MOUNTS: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
];

/// The parts of an OCI spec this runtime applies.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    pub process: ProcessConfig,
    pub hostname: Option<String>,
    /// root.readonly.
    pub readonly_root: bool,
    pub namespaces: Vec<NamespaceEntry>,
    pub mounts: Vec<MountEntry>,
    pub resources: Option<LinuxResources>,
    /// The parsed spec, for the security plan (capabilities, rlimits, seccomp, paths, sysctls).
    pub spec: Spec,
    /// Spec sections present but not applied (logged at create).
    pub ignored: Vec<&'static str>,
}

fn no_nul(what: &str, s: &str) -> Result<(), ContainerError> {
    if s.contains('\0') {
        return Err(ContainerError::InvalidSpec(format!(
            "{what} contains a NUL byte"
        )));
    }
    Ok(())
}

impl ProcessConfig {
    /// Validates an OCI `process` object.
    pub fn from_oci(process: &Process) -> Result<ProcessConfig, ContainerError> {
        let args = process.args().clone().unwrap_or_default();
        if args.is_empty() || args[0].is_empty() {
            return Err(ContainerError::InvalidSpec("process.args is empty".into()));
        }
        for a in &args {
            no_nul("process.args", a)?;
        }
        let env = process.env().clone().unwrap_or_default();
        for e in &env {
            no_nul("process.env", e)?;
            if !e.contains('=') {
                return Err(ContainerError::InvalidSpec(format!(
                    "process.env entry {e:?} has no '='"
                )));
            }
        }
        let cwd = process.cwd().clone();
        if !cwd.is_absolute() || cwd.as_os_str().as_bytes().contains(&0) {
            return Err(ContainerError::InvalidSpec(format!(
                "process.cwd {} is not an absolute path",
                cwd.display()
            )));
        }
        let user = process.user();
        Ok(ProcessConfig {
            args,
            env,
            cwd,
            uid: user.uid(),
            gid: user.gid(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
            umask: user.umask(),
            terminal: process.terminal().unwrap_or(false),
        })
    }

    /// PATH from the process environment, or the usual default.
    fn path_var(&self) -> &str {
        self.env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    }

    /// Where `execve` is tried, in order: args[0] if it has a slash, else each PATH entry.
    pub fn exec_candidates(&self) -> Vec<String> {
        let arg0 = &self.args[0];
        if arg0.contains('/') {
            return vec![arg0.clone()];
        }
        self.path_var()
            .split(':')
            .filter(|dir| !dir.is_empty())
            .map(|dir| format!("{}/{arg0}", dir.trim_end_matches('/')))
            .collect()
    }
}

/// Normalises an absolute container path: no "..", ".", or repeated slashes.
fn normalise_abs(what: &str, p: &Path) -> Result<PathBuf, ContainerError> {
    let bad = || {
        ContainerError::InvalidSpec(format!(
            "{what} {} is not a clean absolute path",
            p.display()
        ))
    };
    if !p.is_absolute() || p.as_os_str().as_bytes().contains(&0) {
        return Err(bad());
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => return Err(bad()),
        }
    }
    Ok(out)
}

fn namespaces(linux: Option<&Linux>) -> Result<Vec<NamespaceEntry>, ContainerError> {
    let Some(list) = linux.and_then(|l| l.namespaces().as_ref()) else {
        // No linux.namespaces: the runtime's default, new pid, mount, uts and ipc namespaces.
        return Ok([
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNS,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
        ]
        .iter()
        .map(|&flag| NamespaceEntry { flag, path: None })
        .collect());
    };
    let mut out: Vec<NamespaceEntry> = Vec::new();
    for ns in list {
        let flag = match ns.typ() {
            LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
            LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
            LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
            LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
            LinuxNamespaceType::Network => libc::CLONE_NEWNET,
            LinuxNamespaceType::Cgroup => libc::CLONE_NEWCGROUP,
            other => {
                return Err(ContainerError::InvalidSpec(format!(
                    "{other:?} namespaces are not supported (the VM is the isolation boundary)"
                )))
            }
        };
        if out.iter().any(|e| e.flag == flag) {
            return Err(ContainerError::InvalidSpec(format!(
                "namespace {:?} listed twice",
                ns.typ()
            )));
        }
        let path = ns.path().clone();
        if let Some(p) = &path {
            if !p.is_absolute() || p.as_os_str().as_bytes().contains(&0) {
                return Err(ContainerError::InvalidSpec(format!(
                    "namespace path {} is not absolute",
                    p.display()
                )));
            }
            if flag == libc::CLONE_NEWNS {
                return Err(ContainerError::InvalidSpec(
                    "joining a mount namespace is not supported: every container gets its own"
                        .into(),
                ));
            }
            if flag == libc::CLONE_NEWCGROUP {
                return Err(ContainerError::InvalidSpec(
                    "joining a cgroup namespace is not supported".into(),
                ));
            }
        }
        out.push(NamespaceEntry { flag, path });
    }
    if !out.iter().any(|e| e.flag == libc::CLONE_NEWNS) {
        return Err(ContainerError::InvalidSpec(
            "linux.namespaces must include a new mount namespace".into(),
        ));
    }
    Ok(out)
}

fn mount_entry(m: &Mount) -> Result<MountEntry, ContainerError> {
    let destination = normalise_abs("mount destination", m.destination())?;
    let options = m.options().clone().unwrap_or_default();
    let mut flags: libc::c_ulong = 0;
    let mut propagation: libc::c_ulong = 0;
    let mut bind = m.typ().as_deref() == Some("bind");
    let mut data = Vec::new();
    for o in &options {
        no_nul("mount option", o)?;
        let (set, clear): (libc::c_ulong, libc::c_ulong) = match o.as_str() {
            "ro" => (libc::MS_RDONLY, 0),
            "rw" => (0, libc::MS_RDONLY),
            "nosuid" => (libc::MS_NOSUID, 0),
            "suid" => (0, libc::MS_NOSUID),
            "nodev" => (libc::MS_NODEV, 0),
            "dev" => (0, libc::MS_NODEV),
            "noexec" => (libc::MS_NOEXEC, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "async" => (0, libc::MS_SYNCHRONOUS),
            "noatime" => (libc::MS_NOATIME, 0),
            "atime" => (0, libc::MS_NOATIME),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "relatime" => (libc::MS_RELATIME, 0),
            "norelatime" => (0, libc::MS_RELATIME),
            "strictatime" => (libc::MS_STRICTATIME, 0),
            "bind" => {
                bind = true;
                (0, 0)
            }
            "rbind" => {
                bind = true;
                (libc::MS_REC, 0)
            }
            "private" | "rprivate" | "slave" | "rslave" | "shared" | "rshared" | "unbindable"
            | "runbindable" => {
                let rec = if o.starts_with('r') { libc::MS_REC } else { 0 };
                propagation = rec
                    | match o.trim_start_matches('r') {
                        "private" => libc::MS_PRIVATE,
                        "slave" => libc::MS_SLAVE,
                        "shared" => libc::MS_SHARED,
                        _ => libc::MS_UNBINDABLE,
                    };
                (0, 0)
            }
            other => {
                data.push(other.to_owned());
                (0, 0)
            }
        };
        flags = (flags | set) & !clear;
    }
    let source = m.source().clone();
    let kind = if bind {
        let src = source.as_deref().ok_or_else(|| {
            ContainerError::InvalidSpec(format!(
                "bind mount {} has no source",
                destination.display()
            ))
        })?;
        if !src.is_absolute() || src.as_os_str().as_bytes().contains(&0) {
            return Err(ContainerError::InvalidSpec(format!(
                "bind mount source {} is not absolute",
                src.display()
            )));
        }
        if !data.is_empty() {
            return Err(ContainerError::InvalidSpec(format!(
                "bind mount {} has unknown options {:?}",
                destination.display(),
                data
            )));
        }
        "bind".to_owned()
    } else {
        let t = m.typ().clone().unwrap_or_default();
        match t.as_str() {
            "tmpfs" | "proc" | "sysfs" | "devpts" | "mqueue" | "cgroup2" => t,
            // runc's spec names the v2 hierarchy "cgroup" too.
            "cgroup" => "cgroup2".to_owned(),
            other => {
                return Err(ContainerError::InvalidSpec(format!(
                    "mount type {other:?} at {} is not supported",
                    destination.display()
                )))
            }
        }
    };
    let data = if kind == "cgroup2" {
        String::new()
    } else {
        data.join(",")
    };
    if data.contains(['\0']) {
        return Err(ContainerError::InvalidSpec("mount data has a NUL".into()));
    }
    Ok(MountEntry {
        destination,
        kind,
        source,
        flags,
        propagation,
        data,
    })
}

impl ContainerConfig {
    /// Parses and validates a config.json.
    pub fn from_json(json: &[u8]) -> Result<ContainerConfig, ContainerError> {
        let spec: Spec =
            serde_json::from_slice(json).map_err(|e| ContainerError::InvalidSpec(e.to_string()))?;
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| ContainerError::InvalidSpec("process is missing".into()))?;
        let process_config = ProcessConfig::from_oci(process)?;
        let hostname = spec.hostname().clone().filter(|h| !h.is_empty());
        if let Some(h) = &hostname {
            if !super::sandbox::valid_hostname(h) {
                return Err(ContainerError::InvalidSpec(format!(
                    "hostname {h:?} is not 1 to 64 letters, digits, '-' and '.'"
                )));
            }
        }
        let linux = spec.linux().as_ref();
        let namespaces = namespaces(linux)?;
        let mut mounts = Vec::new();
        for m in spec.mounts().as_deref().unwrap_or_default() {
            let entry = mount_entry(m)?;
            if DEFAULT_MOUNTS
                .iter()
                .any(|d| Path::new(d) == entry.destination)
            {
                continue;
            }
            mounts.push(entry);
        }
        let resources = linux.and_then(|l| l.resources().clone());
        let mut ignored = Vec::new();
        if let Some(linux) = linux {
            if linux.devices().as_ref().is_some_and(|d| !d.is_empty()) {
                ignored.push("linux.devices (the default /dev nodes only)");
            }
            if linux.uid_mappings().is_some() || linux.gid_mappings().is_some() {
                ignored.push("linux.uidMappings/gidMappings");
            }
        }
        if process.apparmor_profile().is_some() {
            ignored.push("process.apparmorProfile");
        }
        if process.selinux_label().is_some() {
            ignored.push("process.selinuxLabel");
        }
        Ok(ContainerConfig {
            ignored,
            process: process_config,
            hostname,
            readonly_root: spec
                .root()
                .as_ref()
                .and_then(|r| r.readonly())
                .unwrap_or(false),
            namespaces,
            mounts,
            resources,
            spec,
        })
    }

    /// Whether the container gets a new namespace of this kind.
    pub fn new_namespace(&self, flag: libc::c_int) -> bool {
        self.namespaces
            .iter()
            .any(|e| e.flag == flag && e.path.is_none())
    }
}

/// Resolves `dest` (absolute, normalised) inside `root` like a chroot would: symlinks in the
/// root's tree are followed but never leave it. Returns the path relative to the root and the
/// prefixes (relative) that do not exist yet.
pub fn secure_join(root: &Path, dest: &Path) -> Result<(PathBuf, Vec<PathBuf>), ContainerError> {
    let mut pending: Vec<std::ffi::OsString> = dest
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            _ => None,
        })
        .collect();
    let mut resolved = PathBuf::new();
    let mut links = 0;
    let mut missing = Vec::new();
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        if part == "." {
            continue;
        }
        let candidate = resolved.join(&part);
        if !missing.is_empty() {
            missing.push(candidate.clone());
            resolved = candidate;
            continue;
        }
        match std::fs::symlink_metadata(root.join(&candidate)) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(ContainerError::InvalidSpec(format!(
                        "too many symlinks resolving {}",
                        dest.display()
                    )));
                }
                let target = std::fs::read_link(root.join(&candidate)).map_err(|e| {
                    ContainerError::Setup(format!("readlink {}: {e}", candidate.display()))
                })?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_owned()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            Ok(_) => resolved = candidate,
            Err(_) => {
                missing.push(candidate.clone());
                resolved = candidate;
            }
        }
    }
    Ok((resolved, missing))
}

fn cstring(bytes: &[u8]) -> CString {
    // Callers validated the absence of NUL bytes; an interior NUL would truncate, not panic.
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    CString::new(&bytes[..end]).unwrap_or_default()
}

fn path_c(p: &Path) -> CString {
    cstring(p.as_os_str().as_bytes())
}

/// A NULL-terminated pointer array over owned C strings.
pub struct CStringArray {
    _strings: Vec<CString>,
    ptrs: Vec<*const libc::c_char>,
}

impl CStringArray {
    fn new(items: &[String]) -> CStringArray {
        let strings: Vec<CString> = items.iter().map(|s| cstring(s.as_bytes())).collect();
        let mut ptrs: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        CStringArray {
            _strings: strings,
            ptrs,
        }
    }

    pub fn as_ptr(&self) -> *const *const libc::c_char {
        self.ptrs.as_ptr()
    }
}

/// A bind mount of a host device node onto an empty file in the container's /dev.
pub struct DevNode {
    pub host: CString,
    pub target: CString,
}

/// A writable overlay over the rootfs, its upper layer on a tmpfs private to the container.
pub struct OverlayPlan {
    /// Where the child mounts its tmpfs (the same agent path for every container: each child
    /// mounts it in its own mount namespace).
    pub scratch: CString,
    pub upper: CString,
    pub work: CString,
    /// The overlay mount point: the container's root.
    pub merged: CString,
    /// `lowerdir=...,upperdir=...,workdir=...`.
    pub options: CString,
}

/// One spec mount, resolved to paths under the container root before pivot_root.
pub struct MountPlan {
    /// Directories to create first, outermost first.
    pub mkdirs: Vec<CString>,
    /// For a bind mount of a file: the empty file to create as the mount point.
    pub touch: bool,
    pub target: CString,
    pub source: Option<CString>,
    pub fstype: Option<CString>,
    pub flags: libc::c_ulong,
    pub data: Option<CString>,
    /// For bind mounts with flags (ro, nosuid, ...): the remount that applies them.
    pub remount: Option<libc::c_ulong>,
    pub propagation: libc::c_ulong,
}

/// The container's filesystem, for the init process only.
pub struct RootfsPlan {
    /// The container's root before pivot_root: the rootfs directory (bind-mounted onto itself),
    /// or the overlay's merged directory.
    pub rootfs: CString,
    pub overlay: Option<OverlayPlan>,
    pub proc_dir: CString,
    pub sys_dir: CString,
    pub dev_dir: CString,
    pub pts_dir: CString,
    pub shm_dir: CString,
    pub mqueue_dir: CString,
    pub ptmx_link: CString,
    pub dev_links: Vec<(CString, CString)>,
    pub dev_nodes: Vec<DevNode>,
    pub mounts: Vec<MountPlan>,
    pub read_only: bool,
}

/// What the process runs, as whom, with which privileges.
pub struct ExecPlan {
    pub cwd: CString,
    pub argv: CStringArray,
    pub envp: CStringArray,
    pub exec_candidates: Vec<CString>,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
    pub umask: Option<libc::mode_t>,
    pub terminal: bool,
    pub security: SecurityPlan,
}

impl ExecPlan {
    pub fn new(p: &ProcessConfig, security: SecurityPlan) -> ExecPlan {
        ExecPlan {
            cwd: path_c(&p.cwd),
            argv: CStringArray::new(&p.args),
            envp: CStringArray::new(&p.env),
            exec_candidates: p
                .exec_candidates()
                .iter()
                .map(|c| cstring(OsStr::new(c).as_bytes()))
                .collect(),
            uid: p.uid,
            gid: p.gid,
            groups: p.additional_gids.clone(),
            umask: p.umask,
            terminal: p.terminal,
            security,
        }
    }
}

/// Everything the child needs, prepared in the parent.
pub struct ChildPlan {
    /// CLONE_NEW* flags of the namespaces created by the clone.
    pub clone_flags: libc::c_int,
    /// A pid namespace to create the child in (the spawning thread joins it around the clone).
    pub pid_ns: Option<OwnedFd>,
    /// The cgroup directory to create the child in (clone3 CLONE_INTO_CGROUP).
    pub cgroup: Option<OwnedFd>,
    /// Namespaces the child joins first thing (setns), in order.
    pub join: Vec<(OwnedFd, libc::c_int)>,
    /// unshare(CLONE_NEWCGROUP) once in its cgroup.
    pub unshare_cgroup: bool,
    /// Set in a new uts namespace.
    pub hostname: Option<CString>,
    /// `None` for a process exec'd into an existing container.
    pub rootfs: Option<RootfsPlan>,
    pub exec: ExecPlan,
}

/// `ioctl(NS_GET_NSTYPE)`: the CLONE_NEW* type of a namespace file.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Opens a namespace file and checks it is a namespace of type `flag`.
pub fn open_namespace(path: &Path, flag: libc::c_int) -> Result<OwnedFd, ContainerError> {
    let file = std::fs::File::open(path).map_err(|e| {
        ContainerError::InvalidSpec(format!("namespace path {}: {e}", path.display()))
    })?;
    let fd = OwnedFd::from(file);
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor's namespace.
    let typ = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&fd), NS_GET_NSTYPE as _) };
    if typ != flag {
        return Err(ContainerError::InvalidSpec(format!(
            "{} is not a namespace of the expected type",
            path.display()
        )));
    }
    Ok(fd)
}

impl RootfsPlan {
    /// `rootfs`: the directory holding the container's files (the overlay's lower layer);
    /// `overlay_scratch`: where the child mounts the overlay's tmpfs, `None` for no overlay.
    /// The caller checked that the paths hold no `,`, `:` or `\\` (overlay option syntax).
    pub fn new(
        config: &ContainerConfig,
        rootfs: &Path,
        read_only: bool,
        overlay_scratch: Option<&Path>,
    ) -> Result<RootfsPlan, ContainerError> {
        let overlay = overlay_scratch.map(|scratch| {
            let upper = scratch.join("upper");
            let work = scratch.join("work");
            let options = format!(
                "lowerdir={},upperdir={},workdir={}",
                rootfs.display(),
                upper.display(),
                work.display()
            );
            OverlayPlan {
                scratch: path_c(scratch),
                upper: path_c(&upper),
                work: path_c(&work),
                merged: path_c(&scratch.join("merged")),
                options: cstring(options.as_bytes()),
            }
        });
        let source_root = rootfs;
        let merged = overlay_scratch.map(|s| s.join("merged"));
        let root = merged.as_deref().unwrap_or(rootfs);
        let under = |rel: &str| path_c(&root.join(rel));
        let dev_nodes = DEV_NODES
            .iter()
            .map(|name| DevNode {
                host: path_c(&Path::new("/dev").join(name)),
                target: under(&format!("dev/{name}")),
            })
            .collect();
        let dev_links = [
            ("/proc/self/fd", "dev/fd"),
            ("/proc/self/fd/0", "dev/stdin"),
            ("/proc/self/fd/1", "dev/stdout"),
            ("/proc/self/fd/2", "dev/stderr"),
        ]
        .iter()
        .map(|(target, link)| (cstring(target.as_bytes()), under(link)))
        .collect();
        let mut mounts = Vec::new();
        for m in &config.mounts {
            mounts.push(mount_plan(m, source_root, root)?);
        }
        Ok(RootfsPlan {
            rootfs: path_c(root),
            overlay,
            proc_dir: under("proc"),
            sys_dir: under("sys"),
            dev_dir: under("dev"),
            pts_dir: under("dev/pts"),
            shm_dir: under("dev/shm"),
            mqueue_dir: under("dev/mqueue"),
            ptmx_link: under("dev/ptmx"),
            dev_links,
            dev_nodes,
            mounts,
            read_only: read_only || config.readonly_root,
        })
    }
}

fn mount_plan(
    m: &MountEntry,
    source_root: &Path,
    root: &Path,
) -> Result<MountPlan, ContainerError> {
    let (rel, missing) = secure_join(source_root, &m.destination)?;
    let bind = m.kind == "bind";
    let mut touch = false;
    let mut source = m.source.as_deref().map(path_c);
    if bind {
        let src = m.source.as_deref().unwrap_or(Path::new("/"));
        let meta = std::fs::metadata(src).map_err(|e| {
            ContainerError::InvalidSpec(format!("bind mount source {}: {e}", src.display()))
        })?;
        // A missing file target is created as a file; an existing one keeps its kind.
        touch = !meta.is_dir() && missing.last().is_some_and(|l| *l == rel);
    } else if source.is_none() {
        source = Some(cstring(m.kind.as_bytes()));
    }
    let dirs = if touch {
        &missing[..missing.len() - 1]
    } else {
        &missing[..]
    };
    let flags_on_bind = m.flags & !(libc::MS_REC);
    Ok(MountPlan {
        mkdirs: dirs.iter().map(|d| path_c(&root.join(d))).collect(),
        touch,
        target: path_c(&root.join(&rel)),
        source,
        fstype: (!bind).then(|| cstring(m.kind.as_bytes())),
        flags: if bind {
            libc::MS_BIND | (m.flags & libc::MS_REC)
        } else {
            m.flags
        },
        data: (!m.data.is_empty()).then(|| cstring(m.data.as_bytes())),
        remount: (bind && flags_on_bind != 0)
            .then_some(libc::MS_BIND | libc::MS_REMOUNT | flags_on_bind),
        propagation: m.propagation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(process: &str) -> Vec<u8> {
        format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs","readonly":true}},"hostname":"h1","process":{process}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn parses_process() {
        let c = ContainerConfig::from_json(&spec(
            r#"{"args":["sh","-c","x"],"env":["PATH=/bin:/usr/bin","A=b"],"cwd":"/tmp","user":{"uid":1000,"gid":100,"additionalGids":[5]}}"#,
        ))
        .unwrap();
        assert_eq!(c.process.args, ["sh", "-c", "x"]);
        assert_eq!((c.process.uid, c.process.gid), (1000, 100));
        assert_eq!(c.process.additional_gids, [5]);
        assert_eq!(c.hostname.as_deref(), Some("h1"));
        assert!(c.readonly_root);
        assert_eq!(c.process.exec_candidates(), ["/bin/sh", "/usr/bin/sh"]);
        assert!(c.ignored.is_empty());
    }

    #[test]
    fn rejects_bad_specs() {
        for (json, what) in [
            (b"not json".to_vec(), "garbage"),
            (br#"{"ociVersion":"1.0.2"}"#.to_vec(), "no process"),
            (spec(r#"{"args":[],"cwd":"/"}"#), "empty args"),
            (spec(r#"{"args":["sh"],"cwd":"rel"}"#), "relative cwd"),
            (
                spec(r#"{"args":["sh"],"cwd":"/","env":["NOEQUALS"]}"#),
                "env",
            ),
            (spec(r#"{"args":["a\u0000b"],"cwd":"/"}"#), "nul"),
        ] {
            assert!(
                matches!(
                    ContainerConfig::from_json(&json),
                    Err(ContainerError::InvalidSpec(_))
                ),
                "{what}"
            );
        }
    }

    fn with(extra: &str) -> Vec<u8> {
        format!(
            r#"{{"ociVersion":"1.0.2","process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}}}},{extra}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn namespaces_default_listed_and_joined() {
        let c = ContainerConfig::from_json(&with(r#""hostname":"h""#)).unwrap();
        for flag in [
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNS,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
        ] {
            assert!(c.new_namespace(flag));
        }
        assert!(!c.new_namespace(libc::CLONE_NEWNET));
        let c = ContainerConfig::from_json(&with(
            r#""linux":{"namespaces":[{"type":"mount"},{"type":"pid","path":"/proc/7/ns/pid"},{"type":"network"}]}"#,
        ))
        .unwrap();
        assert!(c.new_namespace(libc::CLONE_NEWNET));
        assert!(!c.new_namespace(libc::CLONE_NEWPID));
        assert_eq!(
            c.namespaces[1].path.as_deref(),
            Some(Path::new("/proc/7/ns/pid"))
        );
        for bad in [
            r#""linux":{"namespaces":[{"type":"pid"}]}"#,
            r#""linux":{"namespaces":[{"type":"mount"},{"type":"user"}]}"#,
            r#""linux":{"namespaces":[{"type":"mount","path":"/proc/1/ns/mnt"}]}"#,
            r#""linux":{"namespaces":[{"type":"mount"},{"type":"ipc","path":"rel"}]}"#,
            r#""linux":{"namespaces":[{"type":"mount"},{"type":"mount"}]}"#,
        ] {
            assert!(
                matches!(
                    ContainerConfig::from_json(&with(bad)),
                    Err(ContainerError::InvalidSpec(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn mounts_are_parsed_and_defaults_skipped() {
        let c = ContainerConfig::from_json(&with(
            r#""mounts":[{"destination":"/proc","type":"proc","source":"proc"},
            {"destination":"/data/./x/","type":"tmpfs","options":["nosuid","ro","size=1m","mode=755"]},
            {"destination":"/etc/hosts","source":"/run/h","options":["rbind","ro","rprivate"]},
            {"destination":"/sys/fs/cgroup","type":"cgroup","source":"cgroup","options":["ro"]}]"#,
        ))
        .unwrap();
        assert_eq!(c.mounts.len(), 3);
        let t = &c.mounts[0];
        assert_eq!(t.destination, Path::new("/data/x"));
        assert_eq!(t.kind, "tmpfs");
        assert_eq!(t.flags, libc::MS_NOSUID | libc::MS_RDONLY);
        assert_eq!(t.data, "size=1m,mode=755");
        let b = &c.mounts[1];
        assert_eq!(b.kind, "bind");
        assert_eq!(b.flags, libc::MS_REC | libc::MS_RDONLY);
        assert_eq!(b.propagation, libc::MS_REC | libc::MS_PRIVATE);
        assert_eq!(c.mounts[2].kind, "cgroup2");
        for bad in [
            r#""mounts":[{"destination":"rel","type":"tmpfs"}]"#,
            r#""mounts":[{"destination":"/a/../b","type":"tmpfs"}]"#,
            r#""mounts":[{"destination":"/x","type":"nfs","source":"s:/x"}]"#,
            r#""mounts":[{"destination":"/x","type":"bind"}]"#,
            r#""mounts":[{"destination":"/x","type":"bind","source":"rel"}]"#,
            r#""mounts":[{"destination":"/x","type":"bind","source":"/x","options":["size=1"]}]"#,
        ] {
            assert!(
                matches!(
                    ContainerConfig::from_json(&with(bad)),
                    Err(ContainerError::InvalidSpec(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn secure_join_stays_inside_the_root() {
        let tmp = std::env::temp_dir().join(format!("hs-secure-join-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(tmp.join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc", tmp.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../etc", tmp.join("up")).unwrap();
        std::os::unix::fs::symlink("loop", tmp.join("loop")).unwrap();
        let (rel, missing) = secure_join(&tmp, Path::new("/abs/hosts")).unwrap();
        assert_eq!(rel, Path::new("etc/hosts"));
        assert_eq!(missing, [PathBuf::from("etc/hosts")]);
        let (rel, _) = secure_join(&tmp, Path::new("/up/passwd")).unwrap();
        assert_eq!(rel, Path::new("etc/passwd"));
        let (rel, missing) = secure_join(&tmp, Path::new("/new/dir")).unwrap();
        assert_eq!(rel, Path::new("new/dir"));
        assert_eq!(missing.len(), 2);
        assert!(secure_join(&tmp, Path::new("/loop/x")).is_err());
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
