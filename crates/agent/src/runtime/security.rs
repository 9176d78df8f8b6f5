//! What a container process may do: capabilities, rlimits, `no_new_privs`, seccomp, and for a
//! container's init process also sysctls and masked / read-only paths.
//!
//! [`SecurityPlan::from_spec`] (init) and [`SecurityPlan::for_exec`] (an exec'd process)
//! validate the OCI spec and prepare everything in the agent, where allocation and I/O are
//! fine. The cloned child applies the plan with raw system calls only, in this order (runc's):
//!
//! 1. [`rootfs::setup`](super::rootfs::setup) (`pivot_root`, the container's /proc and /dev);
//! 2. [`SecurityPlan::apply_sysctls`] (through the container's /proc/sys);
//! 3. [`SecurityPlan::apply_paths`] (read-only paths, then masked paths; uses /dev/null);
//! 4. [`SecurityPlan::apply_rlimits`] (still root: hard limits may be raised);
//! 5. [`SecurityPlan::before_set_user`]: seccomp when `noNewPrivileges` is false (still holding
//!    `CAP_SYS_ADMIN`), the bounding set, `PR_SET_KEEPCAPS`;
//! 6. `setgroups`, `setgid`, `setuid` (and `chdir` to the cwd, as the user);
//! 7. [`SecurityPlan::after_set_user`]: capabilities, ambient capabilities, `no_new_privs`, and
//!    seccomp when `noNewPrivileges` is true;
//! 8. `execve`.
//!
//! Steps 5 and 7 are the only ones for an exec'd process. With seccomp loaded, every system call
//! the child makes afterwards (including reporting a failed `execve`) goes through the filter,
//! as with runc.
//!
//! Capabilities follow runc: a capability unknown to the running kernel is ignored with a
//! warning; a set missing from `process.capabilities` is empty. Without `process.capabilities`
//! nothing is changed: a root process keeps every capability and a non-root one loses them at
//! `setuid`, as for any process.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::ptr;
use std::sync::OnceLock;

use oci_spec::runtime::{
    Capabilities, Capability, Linux, LinuxCapabilities, PosixRlimit, PosixRlimitType, Process,
};

use super::rootfs::{check, StepError, StepResult};
use super::seccomp;

/// The security sections of an OCI spec are invalid or unsupported.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecurityError {
    /// The client's spec is wrong; the message names the field (InvalidArgument at the edge).
    #[error("{0}")]
    InvalidSpec(String),
}

fn invalid(message: String) -> SecurityError {
    SecurityError::InvalidSpec(message)
}

/// Linux capability numbers (linux/capability.h).
const CAPABILITIES: [(Capability, u32); 41] = [
    (Capability::Chown, 0),
    (Capability::DacOverride, 1),
    (Capability::DacReadSearch, 2),
    (Capability::Fowner, 3),
    (Capability::Fsetid, 4),
    (Capability::Kill, 5),
    (Capability::Setgid, 6),
    (Capability::Setuid, 7),
    (Capability::Setpcap, 8),
    (Capability::LinuxImmutable, 9),
    (Capability::NetBindService, 10),
    (Capability::NetBroadcast, 11),
    (Capability::NetAdmin, 12),
    (Capability::NetRaw, 13),
    (Capability::IpcLock, 14),
    (Capability::IpcOwner, 15),
    (Capability::SysModule, 16),
    (Capability::SysRawio, 17),
    (Capability::SysChroot, 18),
    (Capability::SysPtrace, 19),
    (Capability::SysPacct, 20),
    (Capability::SysAdmin, 21),
    (Capability::SysBoot, 22),
    (Capability::SysNice, 23),
    (Capability::SysResource, 24),
    (Capability::SysTime, 25),
    (Capability::SysTtyConfig, 26),
    (Capability::Mknod, 27),
    (Capability::Lease, 28),
    (Capability::AuditWrite, 29),
    (Capability::AuditControl, 30),
    (Capability::Setfcap, 31),
    (Capability::MacOverride, 32),
    (Capability::MacAdmin, 33),
    (Capability::Syslog, 34),
    (Capability::WakeAlarm, 35),
    (Capability::BlockSuspend, 36),
    (Capability::AuditRead, 37),
    (Capability::Perfmon, 38),
    (Capability::Bpf, 39),
    (Capability::CheckpointRestore, 40),
];

fn cap_number(cap: Capability) -> u32 {
    // Every variant is in the table; 63 (never valid) is only a fallback.
    CAPABILITIES
        .iter()
        .find(|(c, _)| *c == cap)
        .map_or(63, |&(_, n)| n)
}

fn cap_name(number: u32) -> String {
    CAPABILITIES.iter().find(|(_, n)| *n == number).map_or_else(
        || format!("capability {number}"),
        |(c, _)| format!("CAP_{c}"),
    )
}

/// The highest capability number of the running kernel.
fn cap_last_cap() -> u32 {
    static LAST: OnceLock<u32> = OnceLock::new();
    *LAST.get_or_init(|| {
        if let Ok(text) = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap") {
            if let Ok(n) = text.trim().parse::<u32>() {
                if n < 64 {
                    return n;
                }
            }
        }
        // No /proc: probe like libcap, PR_CAPBSET_READ fails with EINVAL past the last one.
        let mut last = 0;
        for cap in 1..64u32 {
            // SAFETY: PR_CAPBSET_READ only reads the calling thread's bounding set.
            let ret = unsafe { libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(cap)) };
            if ret < 0 {
                break;
            }
            last = cap;
        }
        last
    })
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: one 32-bit word of each set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The capability sets, as bit masks over 0..=last_cap.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CapPlan {
    last_cap: u32,
    bounding: u64,
    effective: u64,
    permitted: u64,
    inheritable: u64,
    ambient: u64,
}

impl CapPlan {
    fn new(caps: &LinuxCapabilities, last_cap: u32) -> Result<CapPlan, SecurityError> {
        let mut unavailable = Vec::new();
        let mut mask = |set: &Option<Capabilities>| {
            let mut bits = 0u64;
            for &cap in set.iter().flatten() {
                let n = cap_number(cap);
                if n > last_cap {
                    unavailable.push(cap_name(n));
                } else {
                    bits |= 1 << n;
                }
            }
            bits
        };
        let plan = CapPlan {
            last_cap,
            bounding: mask(caps.bounding()),
            effective: mask(caps.effective()),
            permitted: mask(caps.permitted()),
            inheritable: mask(caps.inheritable()),
            ambient: mask(caps.ambient()),
        };
        if !unavailable.is_empty() {
            unavailable.sort();
            unavailable.dedup();
            log::warn!("ignoring capabilities this kernel does not have: {unavailable:?}");
        }
        // What the kernel would refuse at capset / PR_CAP_AMBIENT_RAISE time, reported now.
        let subset = |what: &str, set: u64, of: u64, of_what: &str| match set & !of {
            0 => Ok(()),
            extra => Err(invalid(format!(
                "process.capabilities: {what} capability {} is not {of_what}",
                cap_name(extra.trailing_zeros())
            ))),
        };
        subset("effective", plan.effective, plan.permitted, "permitted")?;
        subset(
            "inheritable",
            plan.inheritable,
            plan.bounding,
            "in the bounding set",
        )?;
        subset(
            "ambient",
            plan.ambient,
            plan.permitted & plan.inheritable,
            "both permitted and inheritable",
        )?;
        Ok(plan)
    }

    fn data(&self) -> [CapData; 2] {
        let word = |set: u64, i: u32| ((set >> (32 * i)) & 0xffff_ffff) as u32;
        [0, 1].map(|i| CapData {
            effective: word(self.effective, i),
            permitted: word(self.permitted, i),
            inheritable: word(self.inheritable, i),
        })
    }
}

/// `struct rlimit64`.
#[repr(C)]
struct Rlimit64 {
    cur: u64,
    max: u64,
}

struct Rlimit {
    resource: u32,
    soft: u64,
    hard: u64,
}

/// The kernel's RLIMIT_* numbers (asm-generic/resource.h, which x86_64 uses).
fn rlimit_resource(typ: PosixRlimitType) -> u32 {
    match typ {
        PosixRlimitType::RlimitCpu => 0,
        PosixRlimitType::RlimitFsize => 1,
        PosixRlimitType::RlimitData => 2,
        PosixRlimitType::RlimitStack => 3,
        PosixRlimitType::RlimitCore => 4,
        PosixRlimitType::RlimitRss => 5,
        PosixRlimitType::RlimitNproc => 6,
        PosixRlimitType::RlimitNofile => 7,
        PosixRlimitType::RlimitMemlock => 8,
        PosixRlimitType::RlimitAs => 9,
        PosixRlimitType::RlimitLocks => 10,
        PosixRlimitType::RlimitSigpending => 11,
        PosixRlimitType::RlimitMsgqueue => 12,
        PosixRlimitType::RlimitNice => 13,
        PosixRlimitType::RlimitRtprio => 14,
        PosixRlimitType::RlimitRttime => 15,
    }
}

fn rlimits(list: &Option<Vec<PosixRlimit>>) -> Result<Vec<Rlimit>, SecurityError> {
    let mut out: Vec<Rlimit> = Vec::new();
    for limit in list.iter().flatten() {
        let (typ, soft, hard) = (limit.typ(), limit.soft(), limit.hard());
        if soft > hard {
            return Err(invalid(format!(
                "process.rlimits: {typ}: soft limit {soft} exceeds hard limit {hard}"
            )));
        }
        let resource = rlimit_resource(typ);
        if out.iter().any(|r| r.resource == resource) {
            return Err(invalid(format!("process.rlimits: {typ} is given twice")));
        }
        out.push(Rlimit {
            resource,
            soft,
            hard,
        });
    }
    Ok(out)
}

/// Masked and read-only paths: absolute, without NUL or `..` components.
fn container_paths(what: &str, list: &Option<Vec<String>>) -> Result<Vec<CString>, SecurityError> {
    list.iter()
        .flatten()
        .map(|path| {
            if !path.starts_with('/') {
                return Err(invalid(format!("{what}: {path:?} is not absolute")));
            }
            if path.split('/').any(|c| c == "..") {
                return Err(invalid(format!("{what}: {path:?} contains \"..\"")));
            }
            CString::new(path.as_str())
                .map_err(|_| invalid(format!("{what}: {path:?} contains a NUL byte")))
        })
        .collect()
}

struct Sysctl {
    /// `/proc/sys/...`.
    path: CString,
    value: CString,
}

/// Sysctls isolated by the namespaces every container gets here (ipc, uts) or shares with its
/// pod (net: the VM's network namespace is the pod's): runc's list. Anything else would change
/// the whole VM, the agent included.
fn sysctl_namespaced(name: &str) -> bool {
    matches!(
        name,
        "kernel.msgmax"
            | "kernel.msgmnb"
            | "kernel.msgmni"
            | "kernel.sem"
            | "kernel.shmall"
            | "kernel.shmmax"
            | "kernel.shmmni"
            | "kernel.shm_rmid_forced"
            | "kernel.domainname"
    ) || name.starts_with("fs.mqueue.")
        || name.starts_with("net.")
}

/// The /proc/sys path of a sysctl name. As sysctl(8) does, `.` separates components and `/`
/// stands for a literal dot (the kubelet writes `net.ipv4.conf.eth0/100.forwarding` for the
/// VLAN interface `eth0.100`).
fn sysctl_path(name: &str) -> Result<String, SecurityError> {
    let bad = || invalid(format!("linux.sysctl: invalid name {name:?}"));
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'))
    {
        return Err(bad());
    }
    let mut path = String::from("/proc/sys");
    for component in name.split('.') {
        let component = component.replace('/', ".");
        if component.is_empty() || component == "." || component == ".." {
            return Err(bad());
        }
        path.push('/');
        path.push_str(&component);
    }
    Ok(path)
}

fn sysctls(map: &Option<HashMap<String, String>>) -> Result<Vec<Sysctl>, SecurityError> {
    let mut entries: Vec<(&String, &String)> = map.iter().flatten().collect();
    entries.sort();
    entries
        .into_iter()
        .map(|(name, value)| {
            let path = sysctl_path(name)?;
            if name == "kernel.hostname" {
                return Err(invalid(
                    "linux.sysctl: kernel.hostname is not allowed; use the hostname field".into(),
                ));
            }
            if !sysctl_namespaced(name) {
                return Err(invalid(format!(
                    "linux.sysctl: {name} is not isolated by the container's namespaces"
                )));
            }
            if value.contains('\n') {
                return Err(invalid(format!(
                    "linux.sysctl: the value of {name} contains a newline"
                )));
            }
            Ok(Sysctl {
                path: CString::new(path).map_err(|_| invalid(format!("linux.sysctl: {name}")))?,
                value: CString::new(value.as_str()).map_err(|_| {
                    invalid(format!(
                        "linux.sysctl: the value of {name} contains a NUL byte"
                    ))
                })?,
            })
        })
        .collect()
}

struct SeccompPlan {
    filter: Vec<libc::sock_filter>,
    flags: u32,
}

/// Everything a container process's security settings need, prepared before the clone.
pub struct SecurityPlan {
    /// `None`: process.capabilities is absent, nothing changes.
    caps: Option<CapPlan>,
    rlimits: Vec<Rlimit>,
    no_new_privs: bool,
    sysctls: Vec<Sysctl>,
    readonly: Vec<CString>,
    masked: Vec<CString>,
    seccomp: Option<SeccompPlan>,
}

impl SecurityPlan {
    /// The plan of a container's init process: its process section (capabilities, rlimits,
    /// noNewPrivileges) and the linux section (sysctl, maskedPaths, readonlyPaths, seccomp).
    pub fn from_spec(
        process: &Process,
        linux: Option<&Linux>,
    ) -> Result<SecurityPlan, SecurityError> {
        let mut plan = SecurityPlan::for_exec(process, linux)?;
        if let Some(linux) = linux {
            plan.sysctls = sysctls(linux.sysctl())?;
            plan.readonly = container_paths("linux.readonlyPaths", linux.readonly_paths())?;
            plan.masked = container_paths("linux.maskedPaths", linux.masked_paths())?;
        }
        Ok(plan)
    }

    /// The plan of a process exec'd into a running container: its own process section and the
    /// container's seccomp profile; sysctls and paths are the container's already.
    pub fn for_exec(
        process: &Process,
        container_linux: Option<&Linux>,
    ) -> Result<SecurityPlan, SecurityError> {
        let caps = match process.capabilities() {
            Some(caps) => Some(CapPlan::new(caps, cap_last_cap())?),
            None => None,
        };
        let seccomp = match container_linux.and_then(|l| l.seccomp().as_ref()) {
            Some(profile) => Some(SeccompPlan {
                filter: seccomp::compile(profile)
                    .map_err(|e| invalid(format!("linux.seccomp: {e}")))?,
                flags: seccomp::filter_flags(profile),
            }),
            None => None,
        };
        Ok(SecurityPlan {
            caps,
            rlimits: rlimits(process.rlimits())?,
            no_new_privs: process.no_new_privileges().unwrap_or(false),
            sysctls: Vec::new(),
            readonly: Vec::new(),
            masked: Vec::new(),
            seccomp,
        })
    }

    /// True when applying the plan changes nothing.
    pub fn is_noop(&self) -> bool {
        self.caps.is_none()
            && self.rlimits.is_empty()
            && !self.no_new_privs
            && self.sysctls.is_empty()
            && self.readonly.is_empty()
            && self.masked.is_empty()
            && self.seccomp.is_none()
    }

    /// Whether process.noNewPrivileges is set.
    pub fn no_new_privileges(&self) -> bool {
        self.no_new_privs
    }

    /// Whether a seccomp filter is loaded.
    pub fn has_seccomp(&self) -> bool {
        self.seccomp.is_some()
    }

    // ---- child side: raw system calls on the prepared data, no allocation ----

    /// Writes each sysctl through `/proc/sys`. After `pivot_root`, with the container's /proc
    /// mounted: the values land in the child's namespaces.
    pub fn apply_sysctls(&self) -> StepResult {
        for sysctl in &self.sysctls {
            // SAFETY: `path` is NUL-terminated.
            let fd = unsafe {
                libc::open(
                    sysctl.path.as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                )
            };
            check("open sysctl", fd)?;
            let value = sysctl.value.as_bytes();
            // SAFETY: writes from a valid buffer of `value.len()` bytes.
            let n = unsafe { libc::write(fd, value.as_ptr().cast(), value.len()) };
            let write_errno = last_errno();
            // SAFETY: closes the descriptor opened above.
            unsafe { libc::close(fd) };
            if n < 0 {
                return Err(StepError {
                    step: "write sysctl",
                    errno: write_errno,
                });
            }
            if n.unsigned_abs() != value.len() {
                return Err(StepError {
                    step: "write sysctl (short write)",
                    errno: libc::EIO,
                });
            }
        }
        Ok(())
    }

    /// Read-only paths, then masked paths (runc's order). After `pivot_root`: the paths are the
    /// container's; missing ones are skipped.
    ///
    /// A read-only path is bind-mounted onto itself and remounted read-only, keeping the
    /// nosuid / nodev / noexec flags of the mount it lives on. A masked file gets /dev/null
    /// bound over it, a masked directory an empty read-only tmpfs.
    pub fn apply_paths(&self) -> StepResult {
        for path in &self.readonly {
            match mount(Some(path), path, None, libc::MS_BIND | libc::MS_REC) {
                Err(e) if e.errno == libc::ENOENT => continue,
                other => other.map_err(|e| StepError {
                    step: "bind read-only path",
                    ..e
                })?,
            }
            let keep = mount_flags(path)?;
            mount(
                Some(path),
                path,
                None,
                keep | libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            )
            .map_err(|e| StepError {
                step: "remount path read-only",
                ..e
            })?;
        }
        for path in &self.masked {
            match mount(Some(c"/dev/null"), path, None, libc::MS_BIND) {
                Ok(()) => {}
                Err(e) if e.errno == libc::ENOENT => {}
                Err(e) if e.errno == libc::ENOTDIR => mount(
                    Some(c"tmpfs"),
                    path,
                    Some(c"tmpfs"),
                    libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                )
                .map_err(|e| StepError {
                    step: "mask directory",
                    ..e
                })?,
                Err(e) => {
                    return Err(StepError {
                        step: "mask path",
                        ..e
                    })
                }
            }
        }
        Ok(())
    }

    /// Sets process.rlimits. While still root: raising a hard limit needs `CAP_SYS_RESOURCE`.
    pub fn apply_rlimits(&self) -> StepResult {
        for limit in &self.rlimits {
            const SELF: libc::c_long = 0;
            let value = Rlimit64 {
                cur: limit.soft,
                max: limit.hard,
            };
            // SAFETY: prlimit64 on the calling process (pid 0) reads `value`, which outlives
            // the call; the old value is not requested (NULL).
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_prlimit64,
                    SELF,
                    libc::c_long::from(limit.resource),
                    &value as *const Rlimit64,
                    ptr::null_mut::<Rlimit64>(),
                )
            };
            raw("setrlimit", ret)?;
        }
        Ok(())
    }

    /// Before `setgroups`/`setgid`/`setuid`, still root with every capability: loads seccomp
    /// when noNewPrivileges is false (that needs `CAP_SYS_ADMIN`), drops from the bounding set
    /// every capability not in it, and sets `PR_SET_KEEPCAPS` so the permitted set survives
    /// `setuid`.
    pub fn before_set_user(&self) -> StepResult {
        if let Some(filter) = &self.seccomp {
            if !self.no_new_privs {
                seccomp::load(&filter.filter, filter.flags)?;
            }
        }
        if let Some(caps) = &self.caps {
            for cap in 0..=caps.last_cap {
                if caps.bounding & (1 << cap) == 0 {
                    prctl("drop from the bounding set", libc::PR_CAPBSET_DROP, cap, 0)?;
                }
            }
            prctl("PR_SET_KEEPCAPS", libc::PR_SET_KEEPCAPS, 1, 0)?;
        }
        Ok(())
    }

    /// After `setgroups`/`setgid`/`setuid`, right before `execve`: clears `PR_SET_KEEPCAPS`,
    /// sets the effective, permitted and inheritable sets, raises the ambient ones, sets
    /// `no_new_privs` and, when that is set, loads seccomp (last: as few calls as possible run
    /// under the filter before `execve`).
    pub fn after_set_user(&self) -> StepResult {
        if let Some(caps) = &self.caps {
            prctl("PR_SET_KEEPCAPS", libc::PR_SET_KEEPCAPS, 0, 0)?;
            let mut header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let data = caps.data();
            // SAFETY: version 3 takes a header and two data structs, both valid for the call.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_capset,
                    &mut header as *mut CapHeader,
                    data.as_ptr(),
                )
            };
            raw("capset", ret)?;
            // Kernels before 4.3 have no ambient set: only an error if one is asked for.
            let cleared = prctl(
                "clear ambient capabilities",
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL.unsigned_abs(),
                0,
            );
            if caps.ambient != 0 {
                cleared?;
            }
            for cap in 0..=caps.last_cap {
                if caps.ambient & (1 << cap) != 0 {
                    prctl(
                        "raise ambient capability",
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE.unsigned_abs(),
                        cap,
                    )?;
                }
            }
        }
        if self.no_new_privs {
            prctl("PR_SET_NO_NEW_PRIVS", libc::PR_SET_NO_NEW_PRIVS, 1, 0)?;
            if let Some(filter) = &self.seccomp {
                seccomp::load(&filter.filter, filter.flags)?;
            }
        }
        Ok(())
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn raw(step: &'static str, ret: libc::c_long) -> StepResult {
    check(step, if ret < 0 { -1 } else { 0 })
}

/// prctl with two integer arguments; the unused ones are zero, as the kernel requires.
fn prctl(step: &'static str, option: libc::c_int, arg2: u32, arg3: u32) -> StepResult {
    let zero: libc::c_ulong = 0;
    // SAFETY: the options used here take integer arguments only.
    let ret = unsafe {
        libc::prctl(
            option,
            libc::c_ulong::from(arg2),
            libc::c_ulong::from(arg3),
            zero,
            zero,
        )
    };
    check(step, ret)
}

fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
) -> StepResult {
    let opt = |s: Option<&CStr>| s.map_or(ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or NULL where
    // mount(2) allows it.
    let ret = unsafe {
        libc::mount(
            opt(source),
            target.as_ptr(),
            opt(fstype),
            flags,
            ptr::null(),
        )
    };
    check("mount", ret)
}

/// The kernel's `struct statfs` on 64-bit architectures (asm-generic/statfs.h). glibc's
/// `struct statfs` in the libc crate lacks `f_flags`, so the raw call is used.
#[repr(C)]
#[derive(Default)]
struct KernelStatfs {
    /// f_type, f_bsize, f_blocks, f_bfree, f_bavail, f_files, f_ffree.
    counts: [u64; 7],
    fsid: [i32; 2],
    namelen: u64,
    frsize: u64,
    flags: u64,
    spare: [u64; 4],
}

/// The `ST_*` flags of the mount `path` is on.
fn statfs_flags(path: &CStr) -> Result<u64, StepError> {
    let mut st = KernelStatfs::default();
    // SAFETY: `path` is NUL-terminated and `st` has the layout the kernel writes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_statfs,
            path.as_ptr(),
            &mut st as *mut KernelStatfs,
        )
    };
    raw("statfs", ret)?;
    Ok(st.flags)
}

/// The nosuid / nodev / noexec flags of the mount `path` is on, as mount flags.
fn mount_flags(path: &CStr) -> Result<libc::c_ulong, StepError> {
    let st = statfs_flags(path)?;
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
    ] {
        if st & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::super::seccomp::test_child::{errno, run, sys, Outcome};
    use super::*;

    fn process(json: &str) -> Process {
        serde_json::from_str(&format!(
            r#"{{"cwd":"/","args":["x"],"user":{{"uid":1000,"gid":1000}}{json}}}"#
        ))
        .unwrap()
    }

    fn linux(json: &str) -> Linux {
        serde_json::from_str(json).unwrap()
    }

    fn is_root() -> bool {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("skipped: needs root");
        }
        root
    }

    fn err(process_json: &str, linux_json: &str) -> String {
        let p = process(process_json);
        let l = linux(linux_json);
        match SecurityPlan::from_spec(&p, Some(&l)) {
            Err(SecurityError::InvalidSpec(m)) => m,
            Ok(_) => panic!("accepted: {process_json} {linux_json}"),
        }
    }

    #[test]
    fn validation() {
        let m = err(
            r#","rlimits":[{"type":"RLIMIT_NOFILE","soft":2,"hard":1}]"#,
            "{}",
        );
        assert!(m.contains("RLIMIT_NOFILE"), "{m}");
        err(
            r#","rlimits":[{"type":"RLIMIT_NOFILE","soft":1,"hard":1},{"type":"RLIMIT_NOFILE","soft":1,"hard":1}]"#,
            "{}",
        );
        err("", r#"{"maskedPaths":["proc/kcore"]}"#);
        err("", r#"{"maskedPaths":["/proc/../etc"]}"#);
        err("", r#"{"readonlyPaths":["/a\u0000b"]}"#);
        err("", r#"{"readonlyPaths":[""]}"#);
        err("", r#"{"sysctl":{"vm.swappiness":"1"}}"#);
        err("", r#"{"sysctl":{"kernel.hostname":"x"}}"#);
        err("", r#"{"sysctl":{"net..ipv4":"1"}}"#);
        err("", r#"{"sysctl":{"net.//.ip_forward":"1"}}"#);
        err("", r#"{"sysctl":{"net.ipv4./":"1"}}"#);
        err("", r#"{"sysctl":{"net.ipv4 x":"1"}}"#);
        err("", r#"{"sysctl":{"net.ipv4.ip_forward":"1\n0"}}"#);
        err("", r#"{"seccomp":{"defaultAction":"SCMP_ACT_NOTIFY"}}"#);
        let m = err(
            "",
            r#"{"seccomp":{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":7,"value":0,"op":"SCMP_CMP_EQ"}]}]}}"#,
        );
        assert!(m.starts_with("linux.seccomp:"), "{m}");
        let m = err(
            r#","capabilities":{"effective":["CAP_CHOWN"],"permitted":["CAP_KILL"]}"#,
            "{}",
        );
        assert!(m.contains("CAP_CHOWN"), "{m}");
        err(
            r#","capabilities":{"permitted":["CAP_KILL"],"inheritable":["CAP_KILL"],"ambient":["CAP_CHOWN"]}"#,
            "{}",
        );
        err(r#","capabilities":{"inheritable":["CAP_KILL"]}"#, "{}");
        // Unknown capability names and rlimit types do not parse.
        for json in [
            r#"{"cwd":"/","user":{"uid":0,"gid":0},"capabilities":{"bounding":["CAP_BOGUS"]}}"#,
            r#"{"cwd":"/","user":{"uid":0,"gid":0},"rlimits":[{"type":"RLIMIT_BOGUS","soft":1,"hard":1}]}"#,
        ] {
            assert!(serde_json::from_str::<Process>(json).is_err(), "{json}");
        }
    }

    #[test]
    fn accepted_specs() {
        let p = process("");
        assert!(SecurityPlan::from_spec(&p, None).unwrap().is_noop());
        // Kubernetes' default: runc's capability list in four sets, no ambient.
        let caps = r#"["CAP_CHOWN","CAP_DAC_OVERRIDE","CAP_FSETID","CAP_FOWNER","CAP_MKNOD","CAP_NET_RAW","CAP_SETGID","CAP_SETUID","CAP_SETFCAP","CAP_SETPCAP","CAP_NET_BIND_SERVICE","CAP_SYS_CHROOT","CAP_KILL","CAP_AUDIT_WRITE"]"#;
        let p = process(&format!(
            r#","capabilities":{{"bounding":{caps},"effective":{caps},"permitted":{caps}}},"noNewPrivileges":false"#
        ));
        let l = linux(
            r#"{"maskedPaths":["/proc/kcore","/sys/firmware"],"readonlyPaths":["/proc/sys"],
                "sysctl":{"net.ipv4.ip_unprivileged_port_start":"0","kernel.shm_rmid_forced":"1",
                          "net.ipv4.conf.eth0/100.forwarding":"1"}}"#,
        );
        let plan = SecurityPlan::from_spec(&p, Some(&l)).unwrap();
        let caps = plan.caps.as_ref().unwrap();
        assert_eq!(caps.bounding, 0xa80425fb);
        assert_eq!(caps.effective, caps.bounding);
        assert_eq!((caps.inheritable, caps.ambient), (0, 0));
        let paths: Vec<_> = plan.sysctls.iter().map(|s| s.path.clone()).collect();
        assert_eq!(
            paths,
            [
                c"/proc/sys/kernel/shm_rmid_forced",
                c"/proc/sys/net/ipv4/conf/eth0.100/forwarding",
                c"/proc/sys/net/ipv4/ip_unprivileged_port_start",
            ]
        );
        assert_eq!(plan.masked.len(), 2);
        // An exec gets neither paths nor sysctls.
        let exec = SecurityPlan::for_exec(&p, Some(&l)).unwrap();
        assert!(exec.sysctls.is_empty() && exec.masked.is_empty() && exec.readonly.is_empty());
    }

    #[test]
    fn cap_data_words() {
        let plan = CapPlan {
            last_cap: 40,
            bounding: 0,
            effective: 1 << 40 | 1,
            permitted: 1 << 40 | 1 << 13,
            inheritable: 0,
            ambient: 0,
        };
        let d = plan.data();
        assert_eq!((d[0].effective, d[0].permitted), (1, 1 << 13));
        assert_eq!((d[1].effective, d[1].permitted), (1 << 8, 1 << 8));
    }

    /// capget of the calling thread: both words of (effective, permitted, inheritable).
    fn capget() -> Option<[CapData; 2]> {
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        let r = sys(
            libc::SYS_capget,
            [
                &mut header as *mut CapHeader as u64,
                data.as_mut_ptr() as u64,
                0,
                0,
                0,
                0,
            ],
        );
        (r == 0).then_some(data)
    }

    fn prctl_get(option: libc::c_int, arg: u64) -> i64 {
        sys(libc::SYS_prctl, [option as u64, arg, 0, 0, 0, 0])
    }

    /// setgroups([]), setresgid, setresuid to 1000 with raw calls.
    fn become_1000() -> bool {
        sys(libc::SYS_setgroups, [0; 6]) == 0
            && sys(libc::SYS_setresgid, [1000, 1000, 1000, 0, 0, 0]) == 0
            && sys(libc::SYS_setresuid, [1000, 1000, 1000, 0, 0, 0]) == 0
    }

    fn nofile() -> (u64, u64) {
        let mut old = Rlimit64 { cur: 0, max: 0 };
        sys(
            libc::SYS_prlimit64,
            [0, 7, 0, &mut old as *mut Rlimit64 as u64, 0, 0],
        );
        (old.cur, old.max)
    }

    const DENY_UNAME: &str = r#"{"seccomp":{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["uname"],"action":"SCMP_ACT_ERRNO","errnoRet":38}]}}"#;

    fn uname_denied() -> bool {
        let mut buf = [0u8; 512];
        sys(libc::SYS_uname, [buf.as_mut_ptr() as u64, 0, 0, 0, 0, 0]) == -i64::from(libc::ENOSYS)
    }

    #[test]
    fn capabilities_rlimits_no_new_privs_seccomp() {
        if !is_root() {
            return;
        }
        let p = process(
            r#","capabilities":{"bounding":["CAP_CHOWN"],"effective":["CAP_CHOWN"],"permitted":["CAP_CHOWN"]},
               "rlimits":[{"type":"RLIMIT_NOFILE","soft":123,"hard":456}],"noNewPrivileges":true"#,
        );
        let plan = SecurityPlan::from_spec(&p, Some(&linux(DENY_UNAME))).unwrap();
        let tmp = TempDir::new("caps");
        let owned = std::fs::File::create(tmp.path("owned")).unwrap();
        let owned_fd = std::os::fd::AsRawFd::as_raw_fd(&owned) as u64;
        let outcome = run(|| {
            if plan.apply_rlimits().is_err() {
                return 10;
            }
            if plan.before_set_user().is_err() {
                return 11;
            }
            // no_new_privs is set: seccomp is not loaded yet.
            if uname_denied() {
                return 12;
            }
            if !become_1000() {
                return 13;
            }
            if plan.after_set_user().is_err() {
                return 14;
            }
            if sys(libc::SYS_getuid, [0; 6]) != 1000 {
                return 15;
            }
            let chown_only = CapData {
                effective: 1,
                permitted: 1,
                inheritable: 0,
            };
            if capget() != Some([chown_only, CapData::default()]) {
                return 17;
            }
            if prctl_get(libc::PR_CAPBSET_READ, 13) != 0 || prctl_get(libc::PR_CAPBSET_READ, 0) != 1
            {
                return 18;
            }
            if nofile() != (123, 456) {
                return 19;
            }
            if prctl_get(libc::PR_GET_NO_NEW_PRIVS, 0) != 1 {
                return 20;
            }
            if !uname_denied() {
                return 21;
            }
            // CAP_CHOWN is effective, as uid 1000, on a file owned by root.
            if sys(libc::SYS_fchown, [owned_fd, 0, 0, 0, 0, 0]) != 0 {
                return 22;
            }
            0
        });
        assert_eq!(outcome, Outcome::Exited(0));
    }

    #[test]
    fn seccomp_without_no_new_privs_and_ambient() {
        if !is_root() {
            return;
        }
        let set = r#"["CAP_NET_BIND_SERVICE","CAP_KILL"]"#;
        let p = process(&format!(
            r#","capabilities":{{"bounding":{set},"effective":{set},"permitted":{set},"inheritable":{set},"ambient":["CAP_NET_BIND_SERVICE"]}}"#
        ));
        let plan = SecurityPlan::from_spec(&p, Some(&linux(DENY_UNAME))).unwrap();
        let outcome = run(|| {
            if plan.before_set_user().is_err() {
                return 10;
            }
            // Loaded as root, without no_new_privs.
            if !uname_denied() {
                return 11;
            }
            if !become_1000() || plan.after_set_user().is_err() {
                return 12;
            }
            if prctl_get(libc::PR_GET_NO_NEW_PRIVS, 0) != 0 {
                return 13;
            }
            let is_set = libc::PR_CAP_AMBIENT_IS_SET as u64;
            if sys(
                libc::SYS_prctl,
                [libc::PR_CAP_AMBIENT as u64, is_set, 10, 0, 0, 0],
            ) != 1
                || sys(
                    libc::SYS_prctl,
                    [libc::PR_CAP_AMBIENT as u64, is_set, 5, 0, 0, 0],
                ) != 0
            {
                return 14;
            }
            match capget() {
                Some([c, _])
                    if c.effective == (1 << 10 | 1 << 5) && c.inheritable == c.effective =>
                {
                    0
                }
                _ => 15,
            }
        });
        assert_eq!(outcome, Outcome::Exited(0));
    }

    #[test]
    fn no_capabilities_section_keeps_root_caps() {
        if !is_root() {
            return;
        }
        let p: Process = serde_json::from_str(r#"{"cwd":"/","user":{"uid":0,"gid":0}}"#).unwrap();
        let plan = SecurityPlan::from_spec(&p, None).unwrap();
        assert!(plan.is_noop());
        let before = capget().unwrap();
        let outcome = run(|| {
            if plan.before_set_user().is_err() || plan.after_set_user().is_err() {
                return 10;
            }
            i32::from(capget() != Some(before))
        });
        assert_eq!(outcome, Outcome::Exited(0));
    }

    /// A fresh directory under /tmp, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("hyperstart-security-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).unwrap();
            TempDir(dir)
        }

        fn path(&self, rel: &str) -> String {
            self.0.join(rel).to_str().unwrap().to_owned()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    #[test]
    fn masked_and_readonly_paths() {
        if !is_root() {
            return;
        }
        let tmp = TempDir::new("paths");
        std::fs::write(tmp.path("secret"), "secret").unwrap();
        std::fs::create_dir(tmp.path("hidden")).unwrap();
        std::fs::write(tmp.path("hidden/inner"), "x").unwrap();
        std::fs::create_dir(tmp.path("ro")).unwrap();
        let l = linux(&format!(
            r#"{{"maskedPaths":["{}","{}","{}"],"readonlyPaths":["{}","{}"]}}"#,
            tmp.path("secret"),
            tmp.path("hidden"),
            tmp.path("missing"),
            tmp.path("ro"),
            tmp.path("missing-too"),
        ));
        let plan = SecurityPlan::from_spec(&process(""), Some(&l)).unwrap();
        let (secret, inner, hidden_new) = (
            c(&tmp.path("secret")),
            c(&tmp.path("hidden/inner")),
            c(&tmp.path("hidden/new")),
        );
        let (ro, ro_new) = (c(&tmp.path("ro")), c(&tmp.path("ro/new")));
        let outcome = run(|| {
            // SAFETY: a new mount namespace for this child only.
            if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
                return 10;
            }
            if mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE).is_err() {
                return 11;
            }
            // The read-only path lives on a nosuid, noexec mount: those flags must survive.
            if mount(
                Some(c"tmpfs"),
                &ro,
                Some(c"tmpfs"),
                libc::MS_NOSUID | libc::MS_NOEXEC,
            )
            .is_err()
            {
                return 12;
            }
            if let Err(e) = plan.apply_paths() {
                return 100 + e.errno;
            }
            // SAFETY: `secret` is NUL-terminated.
            let fd = unsafe { libc::open(secret.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return 13;
            }
            let mut buf = [0u8; 16];
            // SAFETY: reads into a stack buffer.
            if unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } != 0 {
                return 14;
            }
            // SAFETY: `inner` is NUL-terminated.
            if unsafe { libc::open(inner.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) } >= 0
                || errno() != libc::ENOENT
            {
                return 15;
            }
            for path in [&hidden_new, &ro_new] {
                // SAFETY: `path` is NUL-terminated.
                if unsafe { libc::mkdir(path.as_ptr(), 0o755) } == 0 || errno() != libc::EROFS {
                    return 16;
                }
            }
            match mount_flags(&ro) {
                Ok(f) if f == libc::MS_NOSUID | libc::MS_NOEXEC => {}
                _ => return 17,
            }
            match statfs_flags(&ro) {
                Ok(f) if f & libc::ST_RDONLY != 0 => 0,
                _ => 18,
            }
        });
        assert_eq!(outcome, Outcome::Exited(0));
        // Nothing leaked into the test's mount namespace.
        assert_eq!(
            std::fs::read_to_string(tmp.path("secret")).unwrap(),
            "secret"
        );
    }

    #[test]
    fn sysctls_in_a_new_ipc_namespace() {
        if !is_root() {
            return;
        }
        let l = linux(r#"{"sysctl":{"kernel.msgmax":"12345"}}"#);
        let plan = SecurityPlan::from_spec(&process(""), Some(&l)).unwrap();
        let host = std::fs::read_to_string("/proc/sys/kernel/msgmax").unwrap();
        let outcome = run(|| {
            // SAFETY: a new IPC namespace for this child only.
            if unsafe { libc::unshare(libc::CLONE_NEWIPC) } != 0 {
                return 10;
            }
            if plan.apply_sysctls().is_err() {
                return 11;
            }
            // SAFETY: a NUL-terminated literal.
            let fd = unsafe {
                libc::open(
                    c"/proc/sys/kernel/msgmax".as_ptr(),
                    libc::O_RDONLY | libc::O_CLOEXEC,
                )
            };
            let mut buf = [0u8; 16];
            // SAFETY: reads into a stack buffer.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            i32::from(n != 6 || &buf[..6] != b"12345\n") * 12
        });
        assert_eq!(outcome, Outcome::Exited(0));
        assert_eq!(
            std::fs::read_to_string("/proc/sys/kernel/msgmax").unwrap(),
            host
        );
    }
}
