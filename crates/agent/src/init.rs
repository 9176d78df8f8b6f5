//! Start-up as PID 1 and in host mode.
//!
//! PID 1 never returns and never exits (that would panic the kernel) except on DebugPanic:
//! failures are logged and retried.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::block::BlockDevices;
use crate::cmdline::Cmdline;
use crate::power::{PowerAction, PowerMode};
use crate::reaper::{self, Reaper};
use crate::runtime::container::RuntimeConfig;
use crate::runtime::Containers;

/// The cgroup every container's cgroup goes under, in the guest.
pub const GUEST_CGROUP_ROOT: &str = "/sys/fs/cgroup/pods";
use crate::server::{self, ListenAddr};
use crate::service::{AgentService, ServiceConfig};
use crate::{boottimer, mounts, net};

/// How long to wait before retrying a failed bind.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// Runs as the guest's init. Call from `main` before any other thread exists.
pub fn run_as_init() -> ! {
    let init_ms = boottime_ms();
    // Before any thread: every thread must inherit the blocked SIGCHLD (see crate::reaper).
    if let Err(e) = reaper::block_sigchld() {
        log::error!("{e}");
    }
    if let Err(e) = mounts::leave_initramfs() {
        log::error!("{}; containers cannot pivot_root", error_chain(&e));
    }
    for e in mounts::mount_all() {
        log::error!("{}", error_chain(&e));
    }
    ensure_console();

    let (cmdline, problems) = Cmdline::from_proc().unwrap_or_else(|e| {
        log::error!("reading /proc/cmdline failed: {e}");
        (Cmdline::default(), Vec::new())
    });
    for p in problems {
        log::warn!("{p}");
    }
    if cmdline.debug {
        log::set_max_level(log::LevelFilter::Debug);
    }

    let reaper = start_reaper();

    if let Err(e) = net::iface::set_up("lo", true) {
        log::error!("bringing up lo failed: {}", error_chain(&e));
    }

    let config = ServiceConfig {
        debug: cmdline.debug,
        block: BlockDevices::guest(),
        power: PowerMode::Guest,
    };
    let addr = ListenAddr::Vsock(cmdline.port);
    let runtime = RuntimeConfig {
        state_dir: "/run/hyperstart".into(),
        cgroup_root: Some(GUEST_CGROUP_ROOT.into()),
        guest: true,
        block: BlockDevices::guest(),
    };
    let containers = match Containers::with_config(reaper.clone(), runtime.clone()) {
        Ok(c) => c,
        Err(e) => {
            log::error!("{}; containers run without cgroup limits", error_chain(&e));
            let runtime = RuntimeConfig {
                cgroup_root: None,
                ..runtime
            };
            match Containers::with_config(reaper.clone(), runtime) {
                Ok(c) => c,
                Err(_) => Containers::new(reaper),
            }
        }
    };
    let _server = serve_until_bound(&addr, &config, &containers);
    crate::poweroff::start(protocol::POWEROFF_PORT);

    if let Err(e) = boottimer::signal_ready() {
        log::error!("boot timer: {}", error_chain(&e));
    }
    announce_ready(init_ms, boottime_ms());

    if cmdline.bench_exit {
        crate::power::run(PowerMode::Guest, PowerAction::Reboot);
    }
    loop {
        thread::park();
    }
}

/// Host mode: serve on `addr` until killed (or Reboot / DebugPanic exit the process).
///
/// Containers run as children of this process, so it reaps like PID 1 does: call from `main`
/// before any other thread exists (SIGCHLD must be blocked in every thread).
pub fn run_host(addr: &ListenAddr, config: ServiceConfig, runtime: RuntimeConfig) -> ! {
    if let Err(e) = reaper::block_sigchld() {
        log::error!("{}", error_chain(&e));
    }
    let reaper = start_reaper();
    let containers = match Containers::with_config(reaper, runtime) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hyperstart: {}", error_chain(&e));
            std::process::exit(1);
        }
    };
    let _server = serve_until_bound(addr, &config, &containers);
    announce_ready(0, 0);
    loop {
        thread::park();
    }
}

/// The reaper must run for as long as the agent does; keep retrying if the thread cannot start.
fn start_reaper() -> Arc<Reaper> {
    loop {
        match Reaper::start() {
            Ok(r) => return r,
            Err(e) => {
                log::error!("{}", error_chain(&e));
                thread::sleep(RETRY_DELAY);
            }
        }
    }
}

fn serve_until_bound(
    addr: &ListenAddr,
    config: &ServiceConfig,
    containers: &Arc<Containers>,
) -> ttrpc::Server {
    loop {
        let service = AgentService::new(config.clone()).with_containers(containers.clone());
        match server::serve(addr, service) {
            Ok(server) => {
                log::info!("serving on {addr:?}");
                return server;
            }
            Err(e) => {
                log::error!("{}; retrying", error_chain(&e));
                thread::sleep(RETRY_DELAY);
            }
        }
    }
}

/// Guest time since boot (CLOCK_BOOTTIME) in milliseconds; 0 if the clock cannot be read.
pub fn boottime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1000) + (t.tv_nsec() as u64) / 1_000_000)
        .unwrap_or(0)
}

/// The readiness line on the console, with where the guest's boot time went: the kernel until
/// init started (`init_ms`) and the agent until it served (`ready_ms`), both in guest uptime.
fn announce_ready(init_ms: u64, ready_ms: u64) {
    let mut out = std::io::stdout().lock();
    // Nothing to do if the console is gone.
    let _ = writeln!(
        out,
        "hyperstart: ready init_ms={init_ms} ready_ms={ready_ms}"
    );
    let _ = out.flush();
}

/// The kernel gives init /dev/console as fds 0-2 when the initramfs has the node; if it did
/// not, open it now that devtmpfs is mounted.
fn ensure_console() {
    // SAFETY: F_GETFD on a descriptor number has no side effects.
    let stdout_ok = unsafe { libc::fcntl(1, libc::F_GETFD) } >= 0;
    if stdout_ok {
        return;
    }
    let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    for fd in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors; `console` stays open during the calls.
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
