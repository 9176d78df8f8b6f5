//! The `hyper-vmm` process: spawning it (in the pod's network namespace, in its own process
//! group), identifying it again after a hyperd restart, watching for its exit and killing it.
//!
//! A VMM is identified by pid + start time (field 22 of `/proc/<pid>/stat`) + command line
//! (our binary with `--config <the pod's vm.json>`), so a reused pid is never mistaken for it.
//! Watching and signalling go through a pidfd (`pidfd_open`, Linux 5.3), which keeps referring
//! to the same process even after it has been reaped by someone else; without pidfds (older
//! kernels) the start time is checked in /proc before every signal instead.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Result, SandboxError};
use crate::record::VmmIdentity;

/// How a VMM ended, as far as it is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmExit {
    /// Exited with this status (we were its parent and reaped it).
    Code(i32),
    /// Killed by this signal (we reaped it).
    Signal(i32),
    /// Gone, status unknown (not our child: reaped by someone else).
    Unknown,
}

impl VmmExit {
    /// A human description, with `hyper-vmm`'s exit codes spelled out.
    pub fn describe(&self) -> String {
        match self {
            VmmExit::Code(0) => "hyper-vmm exited with status 0 (guest reboot or stop)".into(),
            VmmExit::Code(1) => "hyper-vmm exited with status 1 (VMM error)".into(),
            VmmExit::Code(2) => "hyper-vmm exited with status 2 (invalid configuration)".into(),
            VmmExit::Code(3) => "hyper-vmm exited with status 3 (guest kernel panic)".into(),
            VmmExit::Code(c) => format!("hyper-vmm exited with status {c}"),
            VmmExit::Signal(s) => format!("hyper-vmm was killed by signal {s}"),
            VmmExit::Unknown => "hyper-vmm exited".into(),
        }
    }
}

/// A live (or recently live) VMM process.
#[derive(Debug)]
pub struct VmmProcess {
    id: VmmIdentity,
    pidfd: Option<OwnedFd>,
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    let fd = i32::try_from(fd).ok()?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl VmmProcess {
    /// Spawns `binary --config <config>` with stdout and stderr to `log`, in its own process
    /// group (signals to hyperd's group do not reach it), inside `netns` when given. The VMM
    /// does not die with hyperd: pods survive a hyperd restart.
    pub fn spawn(binary: &Path, config: &Path, log: &Path, netns: Option<&Path>) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(SandboxError::io("opening VMM log", log))?;
        let err = out
            .try_clone()
            .map_err(SandboxError::io("opening VMM log", log))?;
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // Opened before the fork; the child only calls setns on the raw descriptor.
        let netns_file = match netns {
            Some(p) => Some(File::open(p).map_err(SandboxError::io("opening netns", p))?),
            None => None,
        };
        if let Some(f) = &netns_file {
            let fd = f.as_raw_fd();
            let enter_netns = move || {
                // SAFETY: setns on a descriptor that stays open until spawn returns (owned by
                // `netns_file`; it is close-on-exec), changing only this process's netns.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            // SAFETY: the closure runs in the forked child before exec and only makes the
            // async-signal-safe setns system call (no allocation, no locks).
            unsafe {
                cmd.pre_exec(enter_netns);
            }
        }
        let child = cmd.spawn().map_err(|source| SandboxError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
        drop(netns_file);
        let pid = child.id();
        // The child is not reaped until the supervisor does it, so its pid cannot be reused
        // before the pidfd is opened. Dropping `child` neither kills nor waits.
        drop(child);
        let pidfd = pidfd_open(pid);
        let start_time = proc_start_time(pid).unwrap_or(0);
        Ok(VmmProcess {
            id: VmmIdentity { pid, start_time },
            pidfd,
        })
    }

    /// Re-attaches to the VMM recorded as `id` if it is still running and is our VMM for the
    /// configuration `config` (same start time, `binary`'s name and `--config <config>` in its
    /// command line). `None` when it is gone or something else holds the pid now.
    pub fn attach(id: VmmIdentity, binary: &Path, config: &Path) -> Option<Self> {
        // Open the pidfd first: if the identity checks pass afterwards, the pidfd refers to the
        // right process.
        let pidfd = pidfd_open(id.pid);
        if proc_start_time(id.pid)? != id.start_time || !is_vmm_cmdline(id.pid, binary, config) {
            return None;
        }
        let p = VmmProcess { id, pidfd };
        (!p.has_exited()).then_some(p)
    }

    /// Pid and start time.
    pub fn identity(&self) -> VmmIdentity {
        self.id
    }

    /// Pid.
    pub fn pid(&self) -> u32 {
        self.id.pid
    }

    /// Whether the process has terminated (a zombie counts as terminated).
    pub fn has_exited(&self) -> bool {
        self.wait_exit(Duration::ZERO)
    }

    /// Waits up to `timeout` for the process to terminate; true when it has.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        match &self.pidfd {
            Some(fd) => {
                let deadline = Instant::now() + timeout;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
                    let mut pfd = libc::pollfd {
                        fd: fd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the duration of the call.
                    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
                    if n > 0 {
                        return true;
                    }
                    if n == 0 {
                        return false;
                    }
                    if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                        // poll itself failed: fall back to /proc.
                        return !self.alive_in_proc();
                    }
                }
            }
            None => {
                let deadline = Instant::now() + timeout;
                loop {
                    if !self.alive_in_proc() {
                        return true;
                    }
                    if Instant::now() >= deadline {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(50).min(timeout));
                }
            }
        }
    }

    fn alive_in_proc(&self) -> bool {
        proc_start_time(self.id.pid) == Some(self.id.start_time)
            && proc_state(self.id.pid).is_some_and(|s| s != 'Z' && s != 'X')
    }

    /// Sends `signal` to the VMM (never to a process that reused its pid).
    pub fn signal(&self, signal: i32) {
        match &self.pidfd {
            Some(fd) => {
                // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no siginfo
                // and no flags.
                let rc = unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        signal,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
                if rc != 0 {
                    log::debug!(
                        "signal {signal} to VMM {}: {}",
                        self.id.pid,
                        std::io::Error::last_os_error()
                    );
                }
            }
            None => {
                if self.alive_in_proc() {
                    if let Ok(pid) = libc::pid_t::try_from(self.id.pid) {
                        // SAFETY: kill with a pid just verified to be our VMM.
                        unsafe {
                            libc::kill(pid, signal);
                        }
                    }
                }
            }
        }
    }

    /// Reaps the process if it is our child and has exited; `Unknown` when it is not our
    /// child (after a hyperd restart the VMM was re-parented).
    pub fn reap(&self) -> VmmExit {
        let Ok(pid) = libc::pid_t::try_from(self.id.pid) else {
            return VmmExit::Unknown;
        };
        let mut status = 0;
        // SAFETY: waitpid on one specific pid, WNOHANG, into a local status word.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc != pid {
            return VmmExit::Unknown;
        }
        if libc::WIFEXITED(status) {
            VmmExit::Code(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            VmmExit::Signal(libc::WTERMSIG(status))
        } else {
            VmmExit::Unknown
        }
    }
}

/// Field 22 of `/proc/<pid>/stat`: the start time in clock ticks after boot.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Field 3 of `/proc/<pid>/stat`: R, S, D, Z, ...
pub fn proc_state(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// CPU time (user + system) of a process, in nanoseconds.
pub fn proc_cpu_nanos(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(ticks.saturating_mul(1_000_000_000) / hz)
}

/// The fields after the command name (field 3 onwards: index 0 is the state).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Vec<String>> {
    // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// `VmRSS` of `/proc/<pid>/status`, in bytes.
pub fn proc_rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&text)
}

fn parse_vm_rss(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Whether a command line is `binary ... --config <config>` (the binary is compared by file
/// name, and may be argv[1] when an interpreter runs it).
pub fn matches_vmm_cmdline(args: &[String], binary: &Path, config: &Path) -> bool {
    let name = binary.file_name();
    let binary_ok = args
        .iter()
        .take(2)
        .any(|a| Path::new(a).file_name() == name && name.is_some());
    let config = config.as_os_str().to_string_lossy();
    let config_ok = args
        .windows(2)
        .any(|w| w[0] == "--config" && w[1] == config);
    binary_ok && config_ok
}

fn is_vmm_cmdline(pid: u32, binary: &Path, config: &Path) -> bool {
    cmdline(pid).is_some_and(|a| matches_vmm_cmdline(&a, binary, config))
}

/// Finds a running VMM started for `config` (a crash between spawning it and recording its
/// pid leaves one that only its command line names).
pub fn find_vmm(binary: &Path, config: &Path) -> Option<VmmIdentity> {
    let entries = std::fs::read_dir("/proc").ok()?;
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if is_vmm_cmdline(pid, binary, config) {
            if let Some(start_time) = proc_start_time(pid) {
                return Some(VmmIdentity { pid, start_time });
            }
        }
    }
    None
}

/// Every pid whose command line mentions `needle` (diagnostics and tests).
pub fn pids_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| {
            proc_state(*pid).is_some_and(|s| s != 'Z')
                && cmdline(*pid).is_some_and(|a| a.iter().any(|x| x.contains(needle)))
        })
        .collect()
}

/// The last `max_lines` lines of a file, for error messages.
pub fn tail(path: &PathBuf, max_lines: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let start = bytes.len().saturating_sub(16 << 10);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_names() {
        let text = "1234 (a) b) (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 98765 1000 10 \n";
        let f = parse_stat(text).unwrap();
        assert_eq!(f[0], "S");
        assert_eq!(f[19], "98765");
        assert_eq!(f[11], "7");
    }

    #[test]
    fn own_process_is_visible() {
        let me = std::process::id();
        assert!(proc_start_time(me).is_some());
        assert!(matches!(proc_state(me), Some('R' | 'S')));
        assert!(proc_rss_bytes(me).unwrap() > 0);
        assert!(proc_cpu_nanos(me).is_some());
    }

    #[test]
    fn vm_rss() {
        assert_eq!(
            parse_vm_rss("Name: x\nVmRSS:\t  2048 kB\nThreads: 1\n"),
            Some(2 << 20)
        );
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn cmdline_matching() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let bin = Path::new("/usr/bin/hyper-vmm");
        let cfg = Path::new("/run/s/p1/vm.json");
        assert!(matches_vmm_cmdline(
            &s(&["/usr/bin/hyper-vmm", "--config", "/run/s/p1/vm.json"]),
            bin,
            cfg
        ));
        assert!(matches_vmm_cmdline(
            &s(&["/bin/sh", "/x/hyper-vmm", "--config", "/run/s/p1/vm.json"]),
            bin,
            cfg
        ));
        assert!(!matches_vmm_cmdline(
            &s(&["/usr/bin/hyper-vmm", "--config", "/run/s/p2/vm.json"]),
            bin,
            cfg
        ));
        assert!(!matches_vmm_cmdline(
            &s(&["/usr/bin/sleep", "--config", "/run/s/p1/vm.json"]),
            bin,
            cfg
        ));
    }

    #[test]
    fn spawn_watch_reap() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("hyper-vmm");
        std::fs::write(&script, "#!/bin/sh\nexit 3\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let cfg = dir.path().join("vm.json");
        let p = VmmProcess::spawn(&script, &cfg, &dir.path().join("log"), None).unwrap();
        assert!(p.wait_exit(Duration::from_secs(10)));
        assert_eq!(p.reap(), VmmExit::Code(3));
        assert_eq!(p.reap(), VmmExit::Unknown);
        assert!(VmmExit::Code(3).describe().contains("panic"));
    }

    #[test]
    fn attach_verifies_identity_and_kill_works() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("hyper-vmm");
        std::fs::write(&script, "#!/bin/sh\nsleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let cfg = dir.path().join("vm.json");
        let p = VmmProcess::spawn(&script, &cfg, &dir.path().join("log"), None).unwrap();
        let id = p.identity();
        // Until the child has exec'd, its command line is still ours.
        let deadline = Instant::now() + Duration::from_secs(10);
        let attached = loop {
            if let Some(a) = VmmProcess::attach(id, &script, &cfg) {
                break a;
            }
            assert!(Instant::now() < deadline, "cannot attach");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(VmmProcess::attach(id, &script, &dir.path().join("other.json")).is_none());
        let wrong_start = VmmIdentity {
            start_time: id.start_time + 1,
            ..id
        };
        assert!(VmmProcess::attach(wrong_start, &script, &cfg).is_none());
        assert_eq!(find_vmm(&script, &cfg), Some(id));
        assert!(!attached.has_exited());
        attached.signal(libc::SIGKILL);
        assert!(p.wait_exit(Duration::from_secs(10)));
        assert_eq!(p.reap(), VmmExit::Signal(libc::SIGKILL));
        assert!(VmmProcess::attach(id, &script, &cfg).is_none());
    }
}
