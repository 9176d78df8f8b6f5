//! The pod: hostname, DNS, sysctls and the namespaces its containers share.
//!
//! A holder process keeps the pod's ipc and uts namespaces (and its pid namespace with
//! `share_pid_namespace`, where it is PID 1 and reaps the pod's orphans), like the pause
//! container of other runtimes, but without an image: it is a fork of the agent that only waits
//! for signals. Containers join the namespaces through `/proc/<holder>/ns/*` paths in their spec.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{pipe2, Pid};

use super::ContainerError;
use crate::reaper::{ExitStatus, Reaper};

/// Sysctls that live in the ipc namespace; applied by the holder, so in the pod's namespace.
fn is_ipc_sysctl(name: &str) -> bool {
    name.starts_with("kernel.shm")
        || name.starts_with("kernel.msg")
        || name == "kernel.sem"
        || name.starts_with("fs.mqueue.")
}

/// A hostname the kernel and resolvers accept: 1..=64 of `[A-Za-z0-9.-]`, not starting with
/// '-' or '.'.
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && !h.starts_with(['-', '.'])
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Checks a sysctl name and value and returns the /proc/sys path.
pub fn sysctl_path(name: &str, value: &str) -> Result<String, ContainerError> {
    let ok_name = !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        && !name.starts_with('.')
        && !name.contains("..");
    if !ok_name {
        return Err(ContainerError::InvalidArgument(format!(
            "bad sysctl name {name:?}"
        )));
    }
    if value.len() > 4096 || value.contains(['\0', '\n']) {
        return Err(ContainerError::InvalidArgument(format!(
            "bad value for sysctl {name}"
        )));
    }
    Ok(format!("/proc/sys/{}", name.replace('.', "/")))
}

/// What the pod asks for.
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    pub hostname: Option<String>,
    pub sysctls: Vec<(String, String)>,
    pub share_pid_namespace: bool,
}

/// The running pod.
pub struct Sandbox {
    pub pid: Pid,
    pub share_pid_namespace: bool,
    exited: Receiver<ExitStatus>,
    /// The holder watches the other end: when the agent dies (host mode), so does the holder.
    _life: std::os::fd::OwnedFd,
}

impl Sandbox {
    /// Starts the holder. `guest`: sysctls outside the ipc namespace change the guest kernel
    /// (the pod's own); in host mode they are refused.
    pub fn create(
        reaper: &Reaper,
        config: &SandboxConfig,
        guest: bool,
    ) -> Result<Sandbox, ContainerError> {
        let hostname = match &config.hostname {
            Some(h) if !valid_hostname(h) => {
                return Err(ContainerError::InvalidArgument(format!(
                    "bad hostname {h:?}: 1 to 64 letters, digits, '-' and '.'"
                )))
            }
            Some(h) => Some(CString::new(h.as_bytes()).unwrap_or_default()),
            None => None,
        };
        let mut ipc = Vec::new();
        let mut global = Vec::new();
        for (name, value) in &config.sysctls {
            let path = sysctl_path(name, value)?;
            if is_ipc_sysctl(name) {
                ipc.push((
                    CString::new(path).unwrap_or_default(),
                    CString::new(value.as_bytes()).unwrap_or_default(),
                ));
            } else if guest {
                global.push((path, value.clone()));
            } else {
                return Err(ContainerError::InvalidArgument(format!(
                    "sysctl {name} is not namespaced; only ipc sysctls are allowed in host mode"
                )));
            }
        }
        for (path, value) in &global {
            std::fs::write(path, value).map_err(|e| {
                ContainerError::InvalidArgument(format!("setting sysctl {path}: {e}"))
            })?;
        }
        let (ready_r, ready_w) = pipe2(OFlag::O_CLOEXEC).map_err(ContainerError::sys("pipe2"))?;
        let mut flags = libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if config.share_pid_namespace {
            flags |= libc::CLONE_NEWPID;
        }
        let ready_fd = ready_w.as_raw_fd();
        let (life_r, life_w) = pipe2(OFlag::O_CLOEXEC).map_err(ContainerError::sys("pipe2"))?;
        let life_fd = life_r.as_raw_fd();
        let (_, pid, exited) = reaper.spawn_owned(|| {
            // SAFETY: fork-like clone (no CLONE_VM, NULL stack); the child runs `holder_main`,
            // which only makes raw system calls on data prepared above and never returns.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (flags | libc::SIGCHLD) as libc::c_ulong,
                    0usize,
                    0usize,
                    0usize,
                    0usize,
                )
            };
            if ret == 0 {
                holder_main(ready_fd, life_fd, hostname.as_ref(), &ipc);
            }
            if ret < 0 {
                return Err(ContainerError::Sys {
                    what: "clone sandbox",
                    source: nix::Error::last(),
                });
            }
            let pid = Pid::from_raw(i32::try_from(ret).unwrap_or(-1));
            Ok(((), pid))
        })?;
        drop((ready_w, life_r));
        let mut status = [0u8; 8];
        let n = std::fs::File::from(ready_r).read(&mut status).unwrap_or(0);
        let sandbox = Sandbox {
            pid,
            share_pid_namespace: config.share_pid_namespace,
            exited,
            _life: life_w,
        };
        if n != 1 || status[0] != 0 {
            let errno = if n >= 5 {
                i32::from_ne_bytes([status[1], status[2], status[3], status[4]])
            } else {
                0
            };
            sandbox.destroy();
            if n >= 1 && status[0] == 2 {
                // The kernel refused a sysctl value (EINVAL, ERANGE) or name (ENOENT).
                let names: Vec<&str> = config.sysctls.iter().map(|(k, _)| k.as_str()).collect();
                return Err(ContainerError::InvalidArgument(format!(
                    "the kernel refused the pod's sysctls {names:?}: {}",
                    nix::Error::from_raw(errno)
                )));
            }
            return Err(ContainerError::Setup(format!(
                "the pod's holder process failed (step {}, errno {errno})",
                status[0]
            )));
        }
        Ok(sandbox)
    }

    /// `/proc/<holder>/ns/<name>`.
    pub fn namespace_path(&self, name: &str) -> String {
        format!("/proc/{}/ns/{name}", self.pid)
    }

    /// Kills the holder and waits for it to be reaped.
    pub fn destroy(&self) {
        let _ = kill(self.pid, Signal::SIGKILL);
        if self.exited.recv_timeout(Duration::from_secs(10)).is_err() {
            log::warn!("the pod holder {} was not reaped in time", self.pid);
        }
    }
}

fn report(fd: RawFd, step: u8, errno: i32) {
    let e = errno.to_ne_bytes();
    let msg = [step, e[0], e[1], e[2], e[3]];
    let len = if step == 0 { 1 } else { msg.len() };
    // SAFETY: writes from a valid buffer.
    unsafe { libc::write(fd, msg.as_ptr().cast(), len) };
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The holder: set up, report, then reap and wait. Raw system calls only.
fn holder_main(
    ready: RawFd,
    life: RawFd,
    hostname: Option<&CString>,
    sysctls: &[(CString, CString)],
) -> ! {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in [libc::SIGCHLD, libc::SIGTERM] {
        // SAFETY: as above, with valid signal numbers.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    // SAFETY: sets this (single-threaded) process's mask from a valid set.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) };
    // SAFETY: plain process-attribute calls.
    unsafe { libc::setsid() };
    // SAFETY: PR_SET_NAME reads a NUL-terminated string.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"pod-holder".as_ptr()) };
    if let Some(h) = hostname {
        // SAFETY: pointer and length describe `h`.
        if unsafe { libc::sethostname(h.as_ptr(), h.as_bytes().len()) } < 0 {
            report(ready, 1, last_errno());
            exit(1);
        }
    }
    for (path, value) in sysctls {
        // SAFETY: NUL-terminated path.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        // SAFETY: writes from a valid buffer to a descriptor we opened (or fails on -1).
        let written = fd >= 0
            && unsafe { libc::write(fd, value.as_ptr().cast(), value.as_bytes().len()) } >= 0;
        if !written {
            report(ready, 2, last_errno());
            exit(1);
        }
        // SAFETY: closes our own descriptor.
        unsafe { libc::close(fd) };
    }
    // SAFETY: NUL-terminated path.
    unsafe { libc::chdir(c"/".as_ptr()) };
    report(ready, 0, 0);
    // Keep only the life pipe, as descriptor 0.
    // SAFETY: dup2 of an inherited descriptor.
    if unsafe { libc::dup2(life, 0) } < 0 {
        exit(1);
    }
    // SAFETY: closes every other descriptor of this process; nothing uses them afterwards.
    unsafe { libc::syscall(libc::SYS_close_range, 1u32, u32::MAX, 0u32) };
    // SAFETY: a signalfd for the blocked set.
    let sigfd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    if sigfd < 0 {
        exit(1);
    }
    let mut fds = [
        libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: sigfd,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: reaps any exited child; a NULL status pointer is allowed.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        // SAFETY: polls two descriptors of this process.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            // The agent is gone (its end of the life pipe closed).
            exit(0);
        }
        if fds[1].revents != 0 {
            let mut info = [0u8; 128];
            // SAFETY: reads one signalfd_siginfo (128 bytes) into a local buffer.
            let n = unsafe { libc::read(sigfd, info.as_mut_ptr().cast(), info.len()) };
            // ssi_signo is the first u32 of signalfd_siginfo.
            if n == 128 && u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) == 15 {
                exit(0);
            }
        }
    }
}

fn exit(code: i32) -> ! {
    // SAFETY: _exit is always safe; it skips the agent's atexit handlers.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_names() {
        assert_eq!(
            sysctl_path("kernel.shm_rmid_forced", "1").unwrap(),
            "/proc/sys/kernel/shm_rmid_forced"
        );
        for bad in ["", "../x", "a/b", "kernel..x", ".x", "K"] {
            assert!(sysctl_path(bad, "1").is_err(), "{bad:?}");
        }
        assert!(sysctl_path("kernel.x", "a\nb").is_err());
        assert!(valid_hostname("pod-a.example"));
        for bad in ["", "a\nb", "-a", ".a", "a b", "ä", &"x".repeat(65)] {
            assert!(!valid_hostname(bad), "{bad:?}");
        }
        assert!(is_ipc_sysctl("kernel.msgmax"));
        assert!(!is_ipc_sysctl("net.ipv4.ip_forward"));
    }
}
