//! Cloning the container's init process and the create/start handshake with it.
//!
//! The child is cloned (fork-like, no shared memory) into new pid, mount, uts and ipc
//! namespaces. It arranges its descriptors, builds its filesystem ([`super::rootfs::setup`]),
//! reports readiness on the sync pipe and blocks on the start pipe. On start it drops to the
//! spec's user and `execve`s; the sync pipe is close-on-exec, so EOF there means the exec
//! succeeded, while a failed step is reported as `1, "<step>: errno <n>"` before `_exit(127)`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
use nix::unistd::{pipe2, Pid};

use super::rootfs::{self, check, StepError, StepResult};
use super::spec::ChildPlan;
use super::ContainerError;

/// The sync byte for "setup done, waiting for start".
const READY: u8 = 0;
/// The sync byte that precedes a failure message.
const FAILED: u8 = 1;

/// Fixed descriptor numbers in the child (after 0, 1, 2).
const SYNC_FD: RawFd = 3;
const START_FD: RawFd = 4;

/// The agent's side of a freshly cloned, not yet started container process.
pub struct Spawned {
    pub pid: Pid,
    /// Writing a byte here lets the child exec.
    pub start: File,
    /// The child's status reports; EOF after a successful exec.
    pub sync: File,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ContainerError> {
    pipe2(OFlag::O_CLOEXEC).map_err(ContainerError::sys("pipe2"))
}

/// Clones the child. Call inside [`crate::reaper::Reaper::spawn_owned`] so the pid is
/// registered before the reaper can see its exit. Returns once the child exists; use
/// [`wait_ready`] for the outcome of its setup.
pub fn spawn(plan: &ChildPlan) -> Result<(Spawned, Pid), ContainerError> {
    let (stdin_r, stdin_w) = pipe()?;
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;
    let (sync_r, sync_w) = pipe()?;
    let (start_r, start_w) = pipe()?;

    let flags = libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    // SAFETY: clone without CLONE_VM and with a NULL stack behaves like fork(2): the child gets
    // a copy of the address space and continues here. The child only runs `child_main`, which
    // makes raw system calls on data prepared before the clone and never returns.
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
    if ret < 0 {
        return Err(ContainerError::Sys {
            what: "clone",
            source: nix::Error::last(),
        });
    }
    if ret == 0 {
        child_main(
            plan,
            [
                stdin_r.as_raw_fd(),
                stdout_w.as_raw_fd(),
                stderr_w.as_raw_fd(),
                sync_w.as_raw_fd(),
                start_r.as_raw_fd(),
            ],
        );
    }
    let pid = Pid::from_raw(i32::try_from(ret).unwrap_or(-1));
    // The child's ends are closed here when dropped.
    drop((stdin_r, stdout_w, stderr_w, sync_w, start_r));
    Ok((
        Spawned {
            pid,
            start: File::from(start_w),
            sync: File::from(sync_r),
            stdin: stdin_w,
            stdout: stdout_r,
            stderr: stderr_r,
        },
        pid,
    ))
}

/// Reads the child's setup outcome: `Ok` once it waits for start.
pub fn wait_ready(sync: &mut File) -> Result<(), ContainerError> {
    let mut byte = [0u8; 1];
    match sync.read(&mut byte) {
        Ok(1) if byte[0] == READY => Ok(()),
        Ok(0) => Err(ContainerError::Setup(
            "the child exited without a report".into(),
        )),
        Ok(_) => Err(ContainerError::Setup(read_message(sync))),
        Err(e) => Err(ContainerError::Setup(format!("reading the sync pipe: {e}"))),
    }
}

/// Lets the child exec and waits for the outcome (EOF on the sync pipe: success).
pub fn start(start: &mut File, sync: &mut File) -> Result<(), ContainerError> {
    start
        .write_all(&[0])
        .map_err(|e| ContainerError::Exec(format!("the child is gone: {e}")))?;
    let mut byte = [0u8; 1];
    match sync.read(&mut byte) {
        Ok(0) => Ok(()),
        Ok(_) => Err(ContainerError::Exec(read_message(sync))),
        Err(e) => Err(ContainerError::Exec(format!("reading the sync pipe: {e}"))),
    }
}

fn read_message(sync: &mut File) -> String {
    let mut text = Vec::new();
    // Bounded: the child writes one short message.
    let _ = sync.take(512).read_to_end(&mut text);
    String::from_utf8_lossy(&text).into_owned()
}

// ---- the child ----

fn write_fd(fd: RawFd, bytes: &[u8]) {
    // SAFETY: writes from a valid buffer; errors are ignored (the parent may be gone).
    unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
}

/// Reports a failed step (`1`, step name, `: errno <n>`) and exits; no allocation.
fn fail(e: StepError) -> ! {
    let mut buf = [0u8; 192];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if len < buf.len() {
                buf[len] = b;
                len += 1;
            }
        }
    };
    put(&[FAILED]);
    put(e.step.as_bytes());
    put(b": errno ");
    let mut digits = [0u8; 12];
    let mut n = e.errno.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(&digits[i..]);
    write_fd(SYNC_FD, &buf[..len]);
    // SAFETY: _exit is always safe; it skips the parent's atexit handlers and buffers.
    unsafe { libc::_exit(127) }
}

/// Moves the inherited descriptors to 0..=4 and closes every other one, so the child keeps
/// no other container's pipes open (which would hide their EOF).
fn arrange_fds(fds: [RawFd; 5]) -> StepResult {
    let mut high = [0; 5];
    for (i, fd) in fds.iter().enumerate() {
        // SAFETY: F_DUPFD_CLOEXEC on an open descriptor.
        high[i] = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 100) };
        check("dup", high[i])?;
    }
    for (target, fd) in high.iter().enumerate().take(3) {
        // SAFETY: dup2 onto a standard descriptor; the result is inherited by execve.
        check("dup2 stdio", unsafe { libc::dup2(*fd, target as RawFd) })?;
    }
    // SAFETY: dup3 onto fixed descriptors, close-on-exec.
    check("dup3 sync", unsafe {
        libc::dup3(high[3], SYNC_FD, libc::O_CLOEXEC)
    })?;
    // SAFETY: as above.
    check("dup3 start", unsafe {
        libc::dup3(high[4], START_FD, libc::O_CLOEXEC)
    })?;
    // SAFETY: closes descriptors this process owns; nothing else uses them in the child.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, START_FD + 1, u32::MAX, 0) };
    if ret < 0 {
        for fd in START_FD + 1..4096 {
            // SAFETY: as above; EBADF is harmless.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// Resets what the agent changed in its own process: signal mask, SIGPIPE disposition.
fn reset_signals() -> StepResult {
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None).map_err(|e| StepError {
        step: "sigprocmask",
        errno: e as i32,
    })?;
    for sig in [libc::SIGPIPE, libc::SIGCHLD] {
        // SAFETY: restores the default disposition.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    Ok(())
}

/// Drops to the spec's user. Raw system calls: glibc's wrappers broadcast credential changes
/// to every thread it believes exists (setxid), and in this cloned copy those threads are gone,
/// so the wrappers would wait forever.
fn set_user(plan: &ChildPlan) -> StepResult {
    let raw = |step, ret: libc::c_long| check(step, if ret < 0 { -1 } else { 0 });
    // SAFETY: the pointer and length describe `plan.groups`.
    raw("setgroups", unsafe {
        libc::syscall(libc::SYS_setgroups, plan.groups.len(), plan.groups.as_ptr())
    })?;
    // SAFETY: plain credential call.
    raw("setgid", unsafe {
        libc::syscall(libc::SYS_setgid, plan.gid)
    })?;
    // SAFETY: plain credential call.
    raw("setuid", unsafe {
        libc::syscall(libc::SYS_setuid, plan.uid)
    })?;
    if let Some(mask) = plan.umask {
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(mask) };
    }
    Ok(())
}

fn exec(plan: &ChildPlan) -> StepError {
    let mut last = libc::ENOENT;
    for path in &plan.exec_candidates {
        // SAFETY: path, argv and envp are NUL-terminated strings / NULL-terminated arrays
        // prepared before the clone. execve only returns on failure.
        unsafe { libc::execve(path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
        let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        // Like execvp: keep searching past missing or inaccessible candidates.
        if e != libc::ENOENT && e != libc::ENOTDIR {
            last = e;
            if e != libc::EACCES {
                break;
            }
        }
    }
    StepError {
        step: "execve",
        errno: last,
    }
}

fn child_main(plan: &ChildPlan, fds: [RawFd; 5]) -> ! {
    if let Err(e) = arrange_fds(fds) {
        // The sync pipe may not be at SYNC_FD yet: report on the original descriptor.
        // SAFETY: dup2 of an inherited descriptor.
        unsafe { libc::dup2(fds[3], SYNC_FD) };
        fail(e);
    }
    let setup = reset_signals()
        .and_then(|()| {
            // SAFETY: plain process-attribute calls.
            check("setsid", unsafe { libc::setsid() })
        })
        .and_then(|()| rootfs::setup(plan));
    if let Err(e) = setup {
        fail(e);
    }
    write_fd(SYNC_FD, &[READY]);

    let mut byte = 0u8;
    // SAFETY: reads one byte into a local.
    let n = unsafe { libc::read(START_FD, (&mut byte as *mut u8).cast(), 1) };
    if n != 1 {
        // The agent dropped the container without starting it.
        // SAFETY: always safe.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: closes our own descriptor.
    unsafe { libc::close(START_FD) };
    if let Err(e) = set_user(plan) {
        fail(e);
    }
    // No PR_SET_PDEATHSIG: it fires when the cloning *thread* (a ttrpc worker) exits, not
    // the agent.
    // SAFETY: `cwd` is NUL-terminated.
    if let Err(e) = check("chdir cwd", unsafe { libc::chdir(plan.cwd.as_ptr()) }) {
        fail(e);
    }
    fail(exec(plan))
}
