//! Cloning a container process and the create/start handshake with it.
//!
//! The child is cloned (fork-like, no shared memory) into the namespaces its [`ChildPlan`]
//! asks for: new ones through the clone flags, a pid namespace to join through the spawning
//! thread's `pid_for_children` (set around the clone), the others with `setns` in the child.
//! A cgroup is entered at birth with `clone3(CLONE_INTO_CGROUP)`, so not a single instruction
//! of the container runs outside its limits.
//!
//! The child arranges its descriptors, builds its filesystem ([`super::rootfs::setup`]), opens
//! its terminal inside the container's own devpts when asked (the master travels back over
//! the sync socket with SCM_RIGHTS), reports readiness and blocks on the start pipe. On start
//! it applies rlimits, capabilities, the user, no_new_privs and seccomp, and `execve`s; the
//! sync socket is close-on-exec, so EOF there means the exec succeeded, while a failed step is
//! reported as `1, "<step>: errno <n>"` before `_exit(127)`.

use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::fcntl::OFlag;
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::unistd::{pipe2, Pid};

use super::rootfs::{self, check, StepError, StepResult};
use super::spec::{ChildPlan, ExecPlan};
use super::ContainerError;

/// The sync byte for "setup done, waiting for start".
const READY: u8 = 0;
/// The sync byte that precedes a failure message.
const FAILED: u8 = 1;
/// "Setup done", carrying the terminal's master descriptor.
const READY_TTY: u8 = 2;

/// Fixed descriptor numbers in the child (after 0, 1, 2).
const SYNC_FD: RawFd = 3;
const START_FD: RawFd = 4;

/// `clone3`'s flag for starting the child in a cgroup (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The agent's side of a freshly cloned, not yet started process.
pub struct Spawned {
    pub pid: Pid,
    /// Writing a byte here lets the child exec.
    pub start: File,
    /// The child's status reports; EOF after a successful exec.
    pub sync: UnixStream,
    /// Pipes; for a terminal process they are unused (the child's stdio is the terminal).
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ContainerError> {
    pipe2(OFlag::O_CLOEXEC).map_err(ContainerError::sys("pipe2"))
}

/// `struct clone_args` of clone3(2), up to the cgroup field.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Fork-like clone with `flags`, into `cgroup` when given. Returns the raw syscall result.
fn raw_clone(flags: libc::c_int, cgroup: Option<RawFd>) -> libc::c_long {
    match cgroup {
        None => {
            // SAFETY: clone without CLONE_VM and with a NULL stack behaves like fork(2): the
            // child gets a copy of the address space and continues here.
            unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (flags | libc::SIGCHLD) as libc::c_ulong,
                    0usize,
                    0usize,
                    0usize,
                    0usize,
                )
            }
        }
        Some(fd) => {
            let args = CloneArgs {
                flags: flags as u64 | CLONE_INTO_CGROUP,
                exit_signal: libc::SIGCHLD as u64,
                cgroup: fd as u64,
                ..CloneArgs::default()
            };
            // SAFETY: clone3 with a NULL stack and no CLONE_VM behaves like fork(2); `args`
            // is a valid clone_args of the given size.
            unsafe {
                libc::syscall(
                    libc::SYS_clone3,
                    &args as *const CloneArgs,
                    std::mem::size_of::<CloneArgs>(),
                )
            }
        }
    }
}

/// Runs `f` with the calling thread's pid_for_children set to `ns`, then restores it.
fn in_pid_namespace<T>(ns: &OwnedFd, f: impl FnOnce() -> T) -> Result<T, ContainerError> {
    let own = File::open("/proc/self/ns/pid")
        .map_err(|e| ContainerError::Setup(format!("opening the agent's pid namespace: {e}")))?;
    // SAFETY: setns on a namespace descriptor; it changes only this thread's pid_for_children.
    let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWPID) };
    if ret < 0 {
        return Err(ContainerError::Sys {
            what: "setns pid namespace",
            source: nix::Error::last(),
        });
    }
    let out = f();
    // SAFETY: as above; back to the agent's own pid namespace, always a valid target.
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
        log::error!(
            "restoring the thread's pid namespace failed: {}",
            nix::Error::last()
        );
    }
    Ok(out)
}

/// Clones the child. Call inside [`crate::reaper::Reaper::spawn_owned`] so the pid is
/// registered before the reaper can see its exit. Returns once the child exists; use
/// [`wait_ready`] for the outcome of its setup.
pub fn spawn(plan: &ChildPlan) -> Result<(Spawned, Pid), ContainerError> {
    let (stdin_r, stdin_w) = pipe()?;
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;
    let (sync_parent, sync_child) =
        UnixStream::pair().map_err(|e| ContainerError::Setup(format!("socketpair: {e}")))?;
    let (start_r, start_w) = pipe()?;

    let fds = [
        stdin_r.as_raw_fd(),
        stdout_w.as_raw_fd(),
        stderr_w.as_raw_fd(),
        sync_child.as_raw_fd(),
        start_r.as_raw_fd(),
    ];
    let cgroup = plan.cgroup.as_ref().map(AsRawFd::as_raw_fd);
    let clone = || {
        let ret = raw_clone(plan.clone_flags, cgroup);
        if ret == 0 {
            child_main(plan, fds);
        }
        ret
    };
    let ret = match &plan.pid_ns {
        Some(ns) => in_pid_namespace(ns, clone)?,
        None => clone(),
    };
    if ret < 0 {
        return Err(ContainerError::Sys {
            what: "clone",
            source: nix::Error::last(),
        });
    }
    let pid = Pid::from_raw(i32::try_from(ret).unwrap_or(-1));
    // The child's ends are closed here when dropped.
    drop((stdin_r, stdout_w, stderr_w, sync_child, start_r));
    Ok((
        Spawned {
            pid,
            start: File::from(start_w),
            sync: sync_parent,
            stdin: stdin_w,
            stdout: stdout_r,
            stderr: stderr_r,
        },
        pid,
    ))
}

/// Reads the child's setup outcome: `Ok` once it waits for start, with the terminal's master
/// descriptor for a terminal process.
pub fn wait_ready(sync: &mut UnixStream) -> Result<Option<OwnedFd>, ContainerError> {
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (n, fd) = {
        let mut iov = [IoSliceMut::new(&mut byte)];
        let msg = loop {
            match recvmsg::<()>(
                sync.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::Error::EINTR) => continue,
                other => break other,
            }
        }
        .map_err(|e| ContainerError::Setup(format!("reading the sync socket: {e}")))?;
        let mut fd = None;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for raw in fds {
                        // SAFETY: SCM_RIGHTS delivered a new descriptor owned by us now.
                        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                        fd.get_or_insert(owned);
                    }
                }
            }
        }
        (msg.bytes, fd)
    };
    match (n, byte[0]) {
        (1, READY) => Ok(None),
        (1, READY_TTY) => fd
            .map(Some)
            .ok_or_else(|| ContainerError::Setup("the terminal descriptor did not arrive".into())),
        (0, _) => Err(ContainerError::Setup(
            "the child exited without a report".into(),
        )),
        _ => {
            let msg = read_message(sync);
            // A sysctl the kernel refuses (bad value, unknown name) is the client's mistake.
            if msg.starts_with("open sysctl") || msg.starts_with("write sysctl") {
                return Err(ContainerError::InvalidSpec(format!("linux.sysctl: {msg}")));
            }
            Err(ContainerError::Setup(msg))
        }
    }
}

/// Lets the child exec and waits for the outcome (EOF on the sync socket: success).
pub fn start(start: &mut File, sync: &mut UnixStream) -> Result<(), ContainerError> {
    start
        .write_all(&[0])
        .map_err(|e| ContainerError::Exec(format!("the child is gone: {e}")))?;
    let mut byte = [0u8; 1];
    match sync.read(&mut byte) {
        Ok(0) => Ok(()),
        Ok(_) => Err(ContainerError::Exec(read_message(sync))),
        Err(e) => Err(ContainerError::Exec(format!(
            "reading the sync socket: {e}"
        ))),
    }
}

fn read_message(sync: &mut UnixStream) -> String {
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
fn set_user(plan: &ExecPlan) -> StepResult {
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

fn exec(plan: &ExecPlan) -> StepError {
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

/// Opens a terminal in the container's devpts (`/dev/ptmx` after pivot_root or setns), makes
/// its slave the controlling terminal and stdio, and sends the master to the agent.
fn setup_terminal() -> StepResult {
    // SAFETY: opens a path with a NUL-terminated name.
    let master = unsafe {
        libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    check("open /dev/ptmx", master)?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from the given pointer.
    check("unlock pty", unsafe {
        libc::ioctl(master, libc::TIOCSPTLCK, &unlock)
    })?;
    // SAFETY: TIOCGPTPEER opens the slave of this master with the given flags.
    let slave = unsafe { libc::ioctl(master, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY) };
    check("open pty slave", slave)?;
    for target in 0..3 {
        // SAFETY: dup2 onto a standard descriptor.
        check("dup2 pty", unsafe { libc::dup2(slave, target) })?;
    }
    // SAFETY: closes our own descriptor; 0..2 keep the slave open.
    unsafe { libc::close(slave) };
    // SAFETY: makes the slave (now fd 0) the controlling terminal of this new session.
    check("set controlling terminal", unsafe {
        libc::ioctl(0, libc::TIOCSCTTY, 0)
    })?;
    send_fd(master)?;
    // SAFETY: the agent has its own copy now.
    unsafe { libc::close(master) };
    Ok(())
}

/// Sends READY_TTY with `fd` attached over the sync socket; no allocation.
fn send_fd(fd: RawFd) -> StepResult {
    let mut byte = [READY_TTY];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Large enough and aligned for one SCM_RIGHTS descriptor.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as _;
    // SAFETY: `msg` describes a control buffer of CMSG_SPACE(4) <= 32 bytes, so the first
    // header is in bounds (or NULL, checked below).
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    if cmsg.is_null() {
        return Err(StepError {
            step: "cmsg",
            errno: libc::EINVAL,
        });
    }
    // SAFETY: pure size computation.
    let len = unsafe { libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) };
    // Three field writes: `cmsg` points into the zeroed `control`, aligned for cmsghdr (a u64
    // array); padding fields (musl) stay zero.
    // SAFETY: see above.
    unsafe { (*cmsg).cmsg_len = len as _ };
    // SAFETY: as above.
    unsafe { (*cmsg).cmsg_level = libc::SOL_SOCKET };
    // SAFETY: as above.
    unsafe { (*cmsg).cmsg_type = libc::SCM_RIGHTS };
    // SAFETY: the data area of the header holds one descriptor (CMSG_LEN above).
    let data = unsafe { libc::CMSG_DATA(cmsg) };
    // SAFETY: `data` points at 4 bytes inside `control`, possibly unaligned.
    unsafe { std::ptr::write_unaligned(data.cast::<RawFd>(), fd) };
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(SYNC_FD, &msg, 0) };
    check("send terminal", if n == 1 { 0 } else { -1 })
}

fn child_main(plan: &ChildPlan, fds: [RawFd; 5]) -> ! {
    // Joining namespaces first: the descriptors are still open here.
    for (fd, flag) in &plan.join {
        // SAFETY: setns on a namespace descriptor prepared by the parent.
        if let Err(e) = check("setns", unsafe { libc::setns(fd.as_raw_fd(), *flag) }) {
            // SAFETY: dup2 of an inherited descriptor, to report on the usual one.
            unsafe { libc::dup2(fds[3], SYNC_FD) };
            fail(e);
        }
    }
    if let Err(e) = arrange_fds(fds) {
        // The sync socket may not be at SYNC_FD yet: report on the original descriptor.
        // SAFETY: dup2 of an inherited descriptor.
        unsafe { libc::dup2(fds[3], SYNC_FD) };
        fail(e);
    }
    let exec_plan = &plan.exec;
    let setup = reset_signals()
        .and_then(|()| {
            // SAFETY: plain process-attribute calls.
            check("setsid", unsafe { libc::setsid() })
        })
        .and_then(|()| {
            if plan.unshare_cgroup {
                // Born in its cgroup, so the new cgroup namespace is rooted there.
                // SAFETY: plain unshare of the cgroup namespace.
                check("unshare cgroup", unsafe {
                    libc::unshare(libc::CLONE_NEWCGROUP)
                })?;
            }
            if let Some(h) = &plan.hostname {
                rootfs::set_hostname(h)?;
            }
            if let Some(r) = &plan.rootfs {
                rootfs::setup(r)?;
                exec_plan.security.apply_sysctls()?;
                exec_plan.security.apply_paths()?;
                rootfs::finish(r)?;
            }
            if exec_plan.terminal {
                setup_terminal()?;
            }
            Ok(())
        });
    if let Err(e) = setup {
        fail(e);
    }
    if !exec_plan.terminal {
        write_fd(SYNC_FD, &[READY]);
    }

    let mut byte = 0u8;
    // SAFETY: reads one byte into a local.
    let n = unsafe { libc::read(START_FD, (&mut byte as *mut u8).cast(), 1) };
    if n != 1 {
        // The agent dropped the process without starting it.
        // SAFETY: always safe.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: closes our own descriptor.
    unsafe { libc::close(START_FD) };
    let privileges = exec_plan
        .security
        .apply_rlimits()
        .and_then(|()| exec_plan.security.before_set_user())
        .and_then(|()| set_user(exec_plan))
        .and_then(|()| {
            // No PR_SET_PDEATHSIG: it fires when the cloning *thread* (a ttrpc worker) exits,
            // not the agent.
            // SAFETY: `cwd` is NUL-terminated.
            check("chdir cwd", unsafe { libc::chdir(exec_plan.cwd.as_ptr()) })
        })
        .and_then(|()| exec_plan.security.after_set_user());
    if let Err(e) = privileges {
        fail(e);
    }
    fail(exec(exec_plan))
}
