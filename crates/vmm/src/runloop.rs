//! The VMM's main thread: waits on vCPU events, the i8042 reset line, the control socket and
//! SIGTERM/SIGINT, and decides when the VM ends.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::control::{self, Conn, ReadOutcome};
use crate::vm::{bind_control, Vm, VmExit};

/// Vsock port on which the guest agent accepts a power-off request.
pub const POWEROFF_PORT: u32 = 1025;

const TOKEN_VCPU: u64 = 0;
const TOKEN_RESET: u64 = 1;
const TOKEN_LISTENER: u64 = 2;
const TOKEN_SIGNAL: u64 = 3;
const TOKEN_CONN_BASE: u64 = 100;
/// Most control clients connected at once.
const MAX_CONNS: usize = 16;

/// Per-loop state the request handlers may change.
#[derive(Default)]
pub struct LoopCtx {
    /// Stop as soon as the current batch of events is handled.
    pub stop_now: bool,
    /// A graceful stop is under way; force it at this instant.
    pub stop_deadline: Option<Instant>,
}

/// Signals the VMM turns into a clean stop. Must be blocked in every thread, so call this before
/// any thread is spawned.
pub fn block_termination_signals() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialize it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
    }
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: `set` is a valid, initialized sigset_t and `sig` a valid signal.
        unsafe {
            libc::sigaddset(&mut set, sig);
        }
    }
    // SAFETY: `set` is initialized; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: `set` is initialized; -1 creates a new signalfd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn read_signal(fd: &OwnedFd) -> Option<u32> {
    let mut info = std::mem::MaybeUninit::<libc::signalfd_siginfo>::zeroed();
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: we read at most `size` bytes into a buffer of that size.
    let n = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
    if n as usize == size {
        // SAFETY: the kernel filled the whole struct.
        Some(unsafe { info.assume_init() }.ssi_signo)
    } else {
        None
    }
}

/// Ask the guest agent to power off: connect through our own vsock socket to its power-off
/// port. Runs on a short-lived thread so the control loop never blocks on the guest, and retries
/// until `deadline` (an agent that is still starting answers with a reset).
pub fn request_guest_poweroff(vsock_socket: PathBuf, deadline: Instant) {
    let r = std::thread::Builder::new()
        .name("poweroff".into())
        .spawn(move || {
            let attempt = || -> std::io::Result<()> {
                let mut s = UnixStream::connect(&vsock_socket)?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(format!("CONNECT {POWEROFF_PORT}\n").as_bytes())?;
                let mut line = String::new();
                BufReader::new(s.try_clone()?).read_line(&mut line)?;
                if !line.starts_with("OK ") {
                    return Err(std::io::Error::other(format!("vsock answered {line:?}")));
                }
                s.write_all(b"poweroff\n")?;
                Ok(())
            };
            let mut last = None;
            while Instant::now() < deadline {
                match attempt() {
                    Ok(()) => return,
                    Err(e) => last = Some(e),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some(e) = last {
                log::warn!("graceful stop: cannot reach the guest agent: {e}");
            }
        });
    if let Err(e) = r {
        log::warn!("graceful stop: cannot spawn thread: {e}");
    }
}

fn add(epoll: &Epoll, fd: i32, token: u64) -> std::io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, token),
    )
}

/// The loop itself.
pub fn run(vm: &Vm, control_path: Option<&std::path::Path>, signals: Option<&OwnedFd>) -> VmExit {
    match run_inner(vm, control_path, signals) {
        Ok(exit) => exit,
        Err(e) => VmExit::Error(format!("control loop failed: {e}")),
    }
}

fn run_inner(
    vm: &Vm,
    control_path: Option<&std::path::Path>,
    signals: Option<&OwnedFd>,
) -> std::io::Result<VmExit> {
    let epoll = Epoll::new()?;
    add(&epoll, vm.vcpu_evt_fd(), TOKEN_VCPU)?;
    add(&epoll, vm.reset_evt_fd(), TOKEN_RESET)?;
    let listener: Option<UnixListener> = match control_path {
        Some(p) => Some(bind_control(p).map_err(std::io::Error::other)?),
        None => None,
    };
    if let Some(l) = &listener {
        add(&epoll, l.as_raw_fd(), TOKEN_LISTENER)?;
    }
    if let Some(s) = signals {
        add(&epoll, s.as_raw_fd(), TOKEN_SIGNAL)?;
    }
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut next_token = TOKEN_CONN_BASE;
    let mut ctx = LoopCtx::default();
    let mut events = vec![EpollEvent::default(); 32];
    loop {
        let timeout = match ctx.stop_deadline {
            Some(d) => d.saturating_duration_since(Instant::now()).as_millis() as i32,
            None => -1,
        };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            if let Some(d) = ctx.stop_deadline {
                if Instant::now() >= d {
                    log::warn!("graceful stop timed out, stopping the VM");
                    return Ok(VmExit::Stopped);
                }
            }
        }
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_VCPU => {
                    if let Some(exit) = vm.drain_vcpu_events() {
                        return Ok(exit);
                    }
                }
                TOKEN_RESET => {
                    if vm.drain_reset() {
                        log::info!("guest reset through the i8042 controller");
                        return Ok(if vm.guest_panicked() {
                            VmExit::GuestPanic
                        } else {
                            VmExit::GuestReset
                        });
                    }
                }
                TOKEN_SIGNAL => {
                    if let Some(sig) = signals.and_then(read_signal) {
                        log::info!("signal {sig}: stopping the VM");
                        return Ok(VmExit::Stopped);
                    }
                }
                TOKEN_LISTENER => {
                    let Some(l) = &listener else { continue };
                    while let Ok((stream, _)) = l.accept() {
                        if conns.len() >= MAX_CONNS {
                            log::warn!("control socket: too many clients, refusing one");
                            continue;
                        }
                        let token = next_token;
                        next_token += 1;
                        match Conn::new(stream) {
                            Ok(c) => {
                                add(&epoll, c.stream.as_raw_fd(), token)?;
                                conns.insert(token, c);
                            }
                            Err(e) => log::warn!("control socket: {e}"),
                        }
                    }
                }
                token => {
                    let Some(conn) = conns.get_mut(&token) else {
                        continue;
                    };
                    let drop_conn = match conn.read_lines() {
                        ReadOutcome::Closed => true,
                        ReadOutcome::Lines(lines) => {
                            let mut failed = false;
                            for line in lines {
                                let resp = match control::parse(&line) {
                                    Ok(req) => vm.handle(req, &mut ctx),
                                    Err(e) => e,
                                };
                                if conn.reply(&resp).is_err() {
                                    failed = true;
                                    break;
                                }
                            }
                            failed
                        }
                    };
                    if drop_conn {
                        if let Some(c) = conns.remove(&token) {
                            let _ = epoll.ctl(
                                ControlOperation::Delete,
                                c.stream.as_raw_fd(),
                                EpollEvent::default(),
                            );
                        }
                    }
                }
            }
        }
        if ctx.stop_now {
            return Ok(VmExit::Stopped);
        }
    }
}
