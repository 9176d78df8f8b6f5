//! Zombie reaping for PID 1.
//!
//! Every orphan in the guest is re-parented to the agent, so it must `waitpid` them all. A
//! dedicated thread waits for SIGCHLD with `sigwait` and drains `waitpid(-1, WNOHANG)`.
//!
//! Because that loop collects *every* child, owners of a child (later: container processes)
//! must not call `waitpid` themselves, which would race with the reaper and see `ECHILD`.
//! Instead they spawn through [`Reaper::spawn_owned`], which registers the pid while holding
//! the registry lock, so the reaper cannot collect the exit before the owner is registered; the
//! owner receives the [`ExitStatus`] on a channel. Unregistered children (orphans) are reaped
//! and logged.
//!
//! SIGCHLD must be blocked in every thread for `sigwait` to see it: [`block_sigchld`] has to run
//! in `main` before any thread is spawned (threads inherit the mask). `std::process::Command`
//! resets the signal mask in the child, so spawned programs start with nothing blocked.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use nix::errno::Errno;
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// exit(code).
    Exited(i32),
    /// Killed by a signal (the raw signal number).
    Signaled(i32),
}

/// Setting up the reaper failed.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    /// pthread_sigmask failed.
    #[error("blocking SIGCHLD failed")]
    SigMask(#[source] nix::Error),
    /// The reaper thread could not be started.
    #[error("starting the reaper thread failed")]
    Spawn(#[source] std::io::Error),
}

fn sigchld_set() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set
}

/// Blocks SIGCHLD in the calling thread (and so in every thread it spawns afterwards).
pub fn block_sigchld() -> Result<(), ReaperError> {
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&sigchld_set()), None).map_err(ReaperError::SigMask)
}

/// The registry of owned children; see the module documentation.
#[derive(Default)]
pub struct Reaper {
    owners: Mutex<HashMap<i32, Sender<ExitStatus>>>,
}

impl Reaper {
    /// A reaper without a thread; call [`Reaper::reap_all`] yourself (tests) or use
    /// [`Reaper::start`].
    pub fn new() -> Arc<Reaper> {
        Arc::new(Reaper::default())
    }

    /// Starts the SIGCHLD thread. [`block_sigchld`] must already have run in `main`.
    pub fn start() -> Result<Arc<Reaper>, ReaperError> {
        let reaper = Reaper::new();
        let worker = reaper.clone();
        thread::Builder::new()
            .name("reaper".into())
            .spawn(move || worker.run())
            .map_err(ReaperError::Spawn)?;
        Ok(reaper)
    }

    fn run(&self) {
        let set = sigchld_set();
        // Children that exited before the thread started.
        self.reap_all();
        loop {
            if let Err(e) = set.wait() {
                log::error!("sigwait failed: {e}");
                thread::sleep(std::time::Duration::from_millis(100));
            }
            self.reap_all();
        }
    }

    /// Collects every exited child without blocking; owned ones are reported to their owner.
    /// Returns how many children were reaped.
    pub fn reap_all(&self) -> usize {
        let mut reaped = 0;
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Exited(code)),
                Ok(WaitStatus::Signaled(pid, signal, _)) => {
                    (pid, ExitStatus::Signaled(signal as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return reaped,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("waitpid failed: {e}");
                    return reaped;
                }
            };
            reaped += 1;
            let owner = self
                .owners
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&pid.as_raw());
            match owner {
                // The owner may have gone away; nothing else to do then.
                Some(tx) => drop(tx.send(status)),
                None => log::debug!("reaped orphan {pid}: {status:?}"),
            }
        }
    }

    /// Spawns a child through `spawn` (which returns its result and the child's pid) and
    /// registers it, atomically with respect to reaping. The returned receiver yields the exit
    /// status exactly once. The owner must not `waitpid` the child itself.
    pub fn spawn_owned<T, E>(
        &self,
        spawn: impl FnOnce() -> Result<(T, Pid), E>,
    ) -> Result<(T, Pid, Receiver<ExitStatus>), E> {
        let mut owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        let (value, pid) = spawn()?;
        let (tx, rx) = mpsc::channel();
        owners.insert(pid.as_raw(), tx);
        Ok((value, pid, rx))
    }
}
