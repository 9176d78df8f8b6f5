//! The container's mount namespace, set up by the cloned child before `execve`.
//!
//! Runs between `clone` and `execve` in a copy of a multi-threaded process: only raw system
//! calls on strings prepared in [`RootfsPlan`], no allocation, no locks.

use std::ffi::CStr;
use std::ptr;

use super::spec::{MountPlan, RootfsPlan};

/// A failed step in the child: which one and its errno.
#[derive(Debug, Clone, Copy)]
pub struct StepError {
    pub step: &'static str,
    pub errno: i32,
}

pub type StepResult = Result<(), StepError>;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Turns a libc return value into a step result.
pub fn check(step: &'static str, ret: libc::c_int) -> StepResult {
    if ret < 0 {
        Err(StepError {
            step,
            errno: errno(),
        })
    } else {
        Ok(())
    }
}

fn mount(
    step: &'static str,
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
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
            opt(data).cast(),
        )
    };
    check(step, ret)
}

fn mkdir(step: &'static str, path: &CStr, mode: libc::mode_t) -> StepResult {
    // SAFETY: `path` is NUL-terminated.
    let ret = unsafe { libc::mkdir(path.as_ptr(), mode) };
    if ret < 0 && errno() != libc::EEXIST {
        return check(step, ret);
    }
    Ok(())
}

fn touch(step: &'static str, path: &CStr) -> StepResult {
    // SAFETY: `path` is NUL-terminated; the descriptor is closed right away.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
            0o666,
        )
    };
    check(step, fd)?;
    // SAFETY: `fd` was just opened by this function.
    unsafe { libc::close(fd) };
    Ok(())
}

fn symlink(step: &'static str, target: &CStr, link: &CStr) -> StepResult {
    // SAFETY: both strings are NUL-terminated.
    let ret = unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) };
    if ret < 0 && errno() != libc::EEXIST {
        return check(step, ret);
    }
    Ok(())
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// Builds the container's filesystem view and pivots into it. Called in the new mount
/// namespace; afterwards `/` is the container's root and the old root is detached.
pub fn setup(plan: &RootfsPlan) -> StepResult {
    // Nothing done below may propagate back to the agent's namespace.
    mount(
        "make / rprivate",
        None,
        c"/",
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    match &plan.overlay {
        None => mount(
            "bind rootfs",
            Some(&plan.rootfs),
            &plan.rootfs,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )?,
        Some(overlay) => {
            mount(
                "mount overlay tmpfs",
                Some(c"tmpfs"),
                &overlay.scratch,
                Some(c"tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV,
                Some(c"mode=755"),
            )?;
            mkdir("mkdir overlay upper", &overlay.upper, 0o755)?;
            mkdir("mkdir overlay work", &overlay.work, 0o755)?;
            mkdir("mkdir overlay merged", &overlay.merged, 0o755)?;
            mount(
                "mount overlay",
                Some(c"overlay"),
                &overlay.merged,
                Some(c"overlay"),
                0,
                Some(&overlay.options),
            )?;
        }
    }

    mkdir("mkdir /proc", &plan.proc_dir, 0o555)?;
    mount(
        "mount /proc",
        Some(c"proc"),
        &plan.proc_dir,
        Some(c"proc"),
        NOSUID_NODEV_NOEXEC,
        None,
    )?;
    mkdir("mkdir /sys", &plan.sys_dir, 0o555)?;
    mount(
        "mount /sys",
        Some(c"sysfs"),
        &plan.sys_dir,
        Some(c"sysfs"),
        NOSUID_NODEV_NOEXEC | libc::MS_RDONLY,
        None,
    )?;

    mkdir("mkdir /dev", &plan.dev_dir, 0o755)?;
    mount(
        "mount /dev",
        Some(c"tmpfs"),
        &plan.dev_dir,
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        Some(c"mode=755,size=65536k"),
    )?;
    for node in &plan.dev_nodes {
        touch("create /dev node", &node.target)?;
        mount(
            "bind /dev node",
            Some(&node.host),
            &node.target,
            None,
            libc::MS_BIND,
            None,
        )?;
    }
    for (target, link) in &plan.dev_links {
        symlink("symlink in /dev", target, link)?;
    }
    mkdir("mkdir /dev/pts", &plan.pts_dir, 0o755)?;
    mount(
        "mount /dev/pts",
        Some(c"devpts"),
        &plan.pts_dir,
        Some(c"devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(c"newinstance,ptmxmode=0666,mode=0620"),
    )?;
    symlink("symlink /dev/ptmx", c"pts/ptmx", &plan.ptmx_link)?;
    mkdir("mkdir /dev/shm", &plan.shm_dir, 0o1777)?;
    mount(
        "mount /dev/shm",
        Some(c"shm"),
        &plan.shm_dir,
        Some(c"tmpfs"),
        NOSUID_NODEV_NOEXEC,
        Some(c"mode=1777,size=65536k"),
    )?;

    mkdir("mkdir /dev/mqueue", &plan.mqueue_dir, 0o1777)?;
    mount(
        "mount /dev/mqueue",
        Some(c"mqueue"),
        &plan.mqueue_dir,
        Some(c"mqueue"),
        NOSUID_NODEV_NOEXEC,
        None,
    )?;
    for m in &plan.mounts {
        spec_mount(m)?;
    }

    // SAFETY: `rootfs` is NUL-terminated.
    check("chdir rootfs", unsafe { libc::chdir(plan.rootfs.as_ptr()) })?;
    // pivot_root(".", "."): the old root ends up on top of the new one and is detached next.
    // SAFETY: both arguments are NUL-terminated strings.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    check("pivot_root", if ret < 0 { -1 } else { 0 })?;
    // SAFETY: "." is NUL-terminated.
    check("detach old root", unsafe {
        libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
    })?;
    // SAFETY: "/" is NUL-terminated.
    check("chdir /", unsafe { libc::chdir(c"/".as_ptr()) })?;

    Ok(())
}

/// After pivot_root (and the security plan's path masking): the read-only root.
pub fn finish(plan: &RootfsPlan) -> StepResult {
    if plan.read_only {
        mount(
            "remount / read-only",
            None,
            c"/",
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
            None,
        )?;
    }
    Ok(())
}

fn spec_mount(m: &MountPlan) -> StepResult {
    for dir in &m.mkdirs {
        mkdir("mkdir mount point", dir, 0o755)?;
    }
    if m.touch {
        touch("create mount point file", &m.target)?;
    }
    mount(
        "spec mount",
        m.source.as_deref(),
        &m.target,
        m.fstype.as_deref(),
        m.flags,
        m.data.as_deref(),
    )?;
    if let Some(flags) = m.remount {
        mount("spec mount remount", None, &m.target, None, flags, None)?;
    }
    if m.propagation != 0 {
        mount(
            "spec mount propagation",
            None,
            &m.target,
            None,
            m.propagation,
            None,
        )?;
    }
    Ok(())
}

/// Sets the hostname (in a new uts namespace).
pub fn set_hostname(hostname: &std::ffi::CStr) -> StepResult {
    // SAFETY: the pointer and length describe `hostname`'s bytes.
    let ret = unsafe { libc::sethostname(hostname.as_ptr(), hostname.to_bytes().len()) };
    check("sethostname", ret)
}
