//! vCPU threads: the KVM_RUN loop, exit dispatch to the buses, and pause/resume/stop.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::layout::{REBOOT_MODE_ADDR, REBOOT_MODE_WARM};
use crate::bus::Bus;

/// Why a vCPU stopped running the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest reset the machine (reboot, or a triple fault) without panicking.
    Reset,
    /// The guest kernel panicked (it wrote the warm-reboot flag before resetting).
    Panic,
    /// The vCPU executed HLT with no in-kernel irqchip to wake it (only tiny test guests do this).
    Halted,
    /// KVM failed to run the vCPU or reported an unrecoverable exit.
    Error(String),
}

/// The run state shared by all vCPU threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Running the guest.
    Running,
    /// Parked until resumed.
    Paused,
    /// Leaving the run loop for good.
    Stopping,
}

/// Exit counters, exported as metrics.
#[derive(Default, Debug)]
pub struct ExitCounters {
    /// Port I/O exits.
    pub pio: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// Accesses no device claimed.
    pub unhandled: AtomicU64,
    /// Exits caused by a kick signal.
    pub interrupted: AtomicU64,
}

/// Shared control block for all vCPUs of one VM.
pub struct VcpuControl {
    state: Mutex<RunState>,
    cond: Condvar,
    parked: AtomicUsize,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Install the (empty) kick handler; without SA_RESTART the signal makes KVM_RUN return EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            state: Mutex::new(RunState::Running),
            cond: Condvar::new(),
            parked: AtomicUsize::new(0),
            threads: Mutex::new(Vec::new()),
        }
    }
}

impl VcpuControl {
    /// Current state.
    pub fn state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, s: RunState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
        self.cond.notify_all();
    }

    fn kick_all(&self) {
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = t.kill(kick_signal());
        }
    }

    fn live_threads(&self) -> usize {
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|t| !t.is_finished())
            .count()
    }

    /// Pause every vCPU; returns once all are parked (or `timeout` passed: returns false).
    pub fn pause(&self, timeout: Duration) -> bool {
        if self.state() == RunState::Stopping {
            return false;
        }
        self.set_state(RunState::Paused);
        let deadline = Instant::now() + timeout;
        // A kick can land just before a thread enters KVM_RUN and be lost: kick until all park.
        while self.parked.load(Ordering::SeqCst) < self.live_threads() {
            if Instant::now() > deadline {
                return false;
            }
            self.kick_all();
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Resume paused vCPUs.
    pub fn resume(&self) {
        if self.state() == RunState::Paused {
            self.set_state(RunState::Running);
        }
    }

    /// Stop every vCPU and join the threads (bounded by `timeout`; stragglers are left detached,
    /// the process is about to exit anyway).
    pub fn stop(&self, timeout: Duration) {
        self.set_state(RunState::Stopping);
        let deadline = Instant::now() + timeout;
        while self.live_threads() > 0 && Instant::now() < deadline {
            self.kick_all();
            std::thread::sleep(Duration::from_millis(2));
        }
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for t in threads {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }

    /// Number of vCPU threads started.
    pub fn thread_count(&self) -> usize {
        self.threads.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Block while paused; returns the state to act on.
    fn wait_while_paused(&self) -> RunState {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if *st == RunState::Paused {
            self.parked.fetch_add(1, Ordering::SeqCst);
            while *st == RunState::Paused {
                st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            self.parked.fetch_sub(1, Ordering::SeqCst);
        }
        *st
    }
}

/// Tell a guest panic from a clean reset. `reboot=panic_warm` on the guest command line makes a
/// panicking kernel store 0x1234 (warm reboot) at 0x472 right before it resets; a `reboot(2)`
/// stores 0 there.
pub fn classify_reset(mem: &GuestMemoryMmap<()>) -> VcpuEvent {
    match mem.read_obj::<u16>(GuestAddress(REBOOT_MODE_ADDR)) {
        Ok(REBOOT_MODE_WARM) => VcpuEvent::Panic,
        _ => VcpuEvent::Reset,
    }
}

/// One vCPU and what it needs to handle exits.
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mem: GuestMemoryMmap<()>,
    counters: Arc<ExitCounters>,
}

impl Vcpu {
    /// Wrap a configured KVM vCPU.
    pub fn new(
        fd: VcpuFd,
        index: u8,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        mem: GuestMemoryMmap<()>,
        counters: Arc<ExitCounters>,
    ) -> Self {
        Vcpu {
            fd,
            index,
            pio,
            mmio,
            mem,
            counters,
        }
    }

    /// The KVM vCPU.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn reset_event(&self) -> VcpuEvent {
        classify_reset(&self.mem)
    }

    /// The vCPU's instruction pointer and control registers, for logs.
    fn describe_state(&self) -> String {
        let regs = match self.fd.get_regs() {
            Ok(r) => format!("rip={:#x} rsp={:#x} rflags={:#x}", r.rip, r.rsp, r.rflags),
            Err(e) => format!("registers unavailable: {e}"),
        };
        let sregs = match self.fd.get_sregs() {
            Ok(s) => format!(
                "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} idt={:#x}/{:#x}",
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.idt.base, s.idt.limit
            ),
            Err(e) => format!("special registers unavailable: {e}"),
        };
        format!("{regs} {sregs}")
    }

    /// Run the guest until one exit that needs attention; `None` means keep running.
    pub fn run_once(&mut self) -> Option<VcpuEvent> {
        let counters = self.counters.clone();
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    counters.pio.fetch_add(1, Ordering::Relaxed);
                    if !self.pio.read(u64::from(port), data) {
                        counters.unhandled.fetch_add(1, Ordering::Relaxed);
                        data.fill(0xff);
                    }
                    None
                }
                VcpuExit::IoOut(port, data) => {
                    counters.pio.fetch_add(1, Ordering::Relaxed);
                    if !self.pio.write(u64::from(port), data) {
                        counters.unhandled.fetch_add(1, Ordering::Relaxed);
                    }
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    counters.mmio.fetch_add(1, Ordering::Relaxed);
                    if !self.mmio.read(addr, data) {
                        counters.unhandled.fetch_add(1, Ordering::Relaxed);
                        data.fill(0xff);
                    }
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    counters.mmio.fetch_add(1, Ordering::Relaxed);
                    if !self.mmio.write(addr, data) {
                        counters.unhandled.fetch_add(1, Ordering::Relaxed);
                    }
                    None
                }
                VcpuExit::Hlt => Some(VcpuEvent::Halted),
                VcpuExit::Shutdown => {
                    // KVM_EXIT_SHUTDOWN: a triple fault, or a reset the guest forced that way.
                    // Where the vCPU stood tells a guest bug from a reboot.
                    let ev = self.reset_event();
                    log::warn!(
                        "vcpu{}: shutdown exit (triple fault or forced reset), {ev:?}; {}",
                        self.index,
                        self.describe_state()
                    );
                    Some(ev)
                }
                VcpuExit::SystemEvent(kind, _) => {
                    log::info!("vcpu{}: system event {kind}", self.index);
                    Some(self.reset_event())
                }
                VcpuExit::FailEntry(reason, cpu) => Some(VcpuEvent::Error(format!(
                    "KVM entry failure, reason {reason:#x} on cpu {cpu}"
                ))),
                VcpuExit::InternalError => Some(VcpuEvent::Error("KVM internal error".to_string())),
                VcpuExit::Intr => {
                    counters.interrupted.fetch_add(1, Ordering::Relaxed);
                    None
                }
                other => Some(VcpuEvent::Error(format!("unexpected vCPU exit {other:?}"))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                counters.interrupted.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(e) => Some(VcpuEvent::Error(format!("KVM_RUN failed: {e}"))),
        }
    }

    /// Start the vCPU on its own thread. Events go to `events` and wake `notify`.
    pub fn start(
        mut self,
        control: Arc<VcpuControl>,
        events: Sender<(u8, VcpuEvent)>,
        notify: EventFd,
    ) -> std::io::Result<()> {
        let index = self.index;
        let ctl = control.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || loop {
                match ctl.wait_while_paused() {
                    RunState::Stopping => return,
                    RunState::Paused | RunState::Running => {}
                }
                if let Some(ev) = self.run_once() {
                    let last = !matches!(ev, VcpuEvent::Halted);
                    let _ = events.send((index, ev));
                    let _ = notify.write(1);
                    if last {
                        return;
                    }
                    // A halted test guest: wait for a stop or resume.
                    while ctl.state() == RunState::Running {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            })?;
        control
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
        Ok(())
    }
}
