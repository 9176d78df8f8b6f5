//! Reboot and deliberate PID 1 exit, deferred so that the RPC reply leaves first.

use std::thread;
use std::time::Duration;

/// How long the reply gets to leave before the action runs.
pub const REPLY_GRACE: Duration = Duration::from_millis(100);

/// Where the agent runs, which decides what "reboot" may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerMode {
    /// PID 1 in a guest: reboot(2) and a real exit of init.
    Guest,
    /// A process on the host (tests): never reboot the machine, exit the process instead.
    HostProcess,
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// `reboot -f`: reboot(2) with RB_AUTOBOOT; the VMM stops the VM on it.
    Reboot,
    /// Exit PID 1, which panics the guest kernel ("Attempted to kill init!").
    ExitInit,
}

/// Runs `action` on a separate thread after `delay`.
pub fn schedule(mode: PowerMode, action: PowerAction, delay: Duration) {
    let spawned = thread::Builder::new().name("power".into()).spawn(move || {
        thread::sleep(delay);
        run(mode, action)
    });
    if let Err(e) = spawned {
        log::error!("cannot start the power thread ({e}); running {action:?} now");
        run(mode, action);
    }
}

/// Runs `action` now. Returns only if reboot(2) failed.
pub fn run(mode: PowerMode, action: PowerAction) {
    match (mode, action) {
        (PowerMode::Guest, PowerAction::Reboot) => {
            log::info!("rebooting");
            nix::unistd::sync();
            let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
            log::error!("reboot(2) failed: {e}");
        }
        (PowerMode::Guest, PowerAction::ExitInit) => {
            log::warn!("DebugPanic: PID 1 exits now, the kernel will panic");
            std::process::exit(1);
        }
        (PowerMode::HostProcess, PowerAction::Reboot) => {
            log::info!("host mode: reboot requested, exiting");
            std::process::exit(0);
        }
        (PowerMode::HostProcess, PowerAction::ExitInit) => {
            log::warn!("host mode: DebugPanic requested, exiting with status 1");
            std::process::exit(1);
        }
    }
}
