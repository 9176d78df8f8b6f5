//! Building a VM from a [`VmConfig`] and running it until the guest resets or a runtime stops it.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::virtio::block::{Block, BlockHandle};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::{Interrupt, VirtioDevice};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::*;
use crate::arch::{boot, cpuid, mptable, regs};
use crate::boot_timer::{BootTimer, BOOT_TIMER_PORT, NOT_BOOTED};
use crate::bus::Bus;
use crate::config::{parse_mac, Console, VmConfig};
use crate::memory::GuestRam;
use crate::vcpu::{install_kick_handler, ExitCounters, RunState, Vcpu, VcpuControl, VcpuEvent};

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// /dev/kvm cannot be used.
    #[error("cannot use /dev/kvm: {what}")]
    Kvm {
        /// The failing step.
        what: String,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A KVM capability we rely on is missing.
    #[error("KVM lacks capability {0}")]
    MissingCap(&'static str),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// Loading the kernel failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// vCPU register setup failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// The MP table failed.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// A device could not be created.
    #[error("cannot create {what}")]
    Device {
        /// Which device.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Bus layout conflict (a bug).
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    /// A host resource (eventfd, socket, thread) could not be set up.
    #[error("cannot set up {what}")]
    Io {
        /// What.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Kvm { what, source }
}
fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}
fn dev_err<E: std::error::Error + Send + Sync + 'static>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> VmError {
    let what = what.into();
    move |e| VmError::Device {
        what,
        source: Box::new(e),
    }
}

/// How the VM ended; maps to the process exit status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest rebooted (`reboot -f`) or powered off through a reset: status 0.
    GuestReset,
    /// A runtime asked the VM to stop over the control socket, or SIGTERM: status 0.
    Stopped,
    /// The guest kernel panicked: status 3.
    GuestPanic,
    /// The VMM failed while running the guest: status 1.
    Error(String),
}

impl VmExit {
    /// Process exit status for this outcome.
    pub fn code(&self) -> i32 {
        match self {
            VmExit::GuestReset | VmExit::Stopped => 0,
            VmExit::GuestPanic => 3,
            VmExit::Error(_) => 1,
        }
    }
}

/// A built, running VM.
pub struct Vm {
    config: VmConfig,
    start: Instant,
    _kvm: Kvm,
    _vm_fd: VmFd,
    ram: GuestRam,
    control: Arc<VcpuControl>,
    vcpu_events: Receiver<(u8, VcpuEvent)>,
    vcpu_evt: EventFd,
    reset_evt: EventFd,
    drives: BTreeMap<String, BlockHandle>,
    nics: Vec<(String, Arc<devices::virtio::net::NetCounters>)>,
    boot_ms: Arc<AtomicU64>,
    counters: Arc<ExitCounters>,
    /// Kept alive for the VM's lifetime: transports and legacy devices live on the buses.
    _pio: Arc<Bus>,
    _mmio: Arc<Bus>,
    cmdline: String,
}

fn console_sink(console: &Console) -> Result<Box<dyn Write + Send>, VmError> {
    Ok(match console {
        Console::Off => Box::new(std::io::sink()),
        Console::Stdout => Box::new(std::io::stdout()),
        Console::File(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(io_err(format!("console file {}", p.display())))?,
        ),
    })
}

fn check_caps(kvm: &Kvm) -> Result<(), VmError> {
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(())
}

/// Where VM set-up time goes, for the boot-time split the VMM logs.
struct Phases {
    last: Instant,
    start: Instant,
    marks: Vec<(&'static str, u128)>,
}

impl Phases {
    fn new(start: Instant) -> Self {
        let now = Instant::now();
        Phases {
            last: now,
            start,
            marks: vec![("exec", now.duration_since(start).as_millis())],
        }
    }

    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.marks
            .push((name, now.duration_since(self.last).as_millis()));
        self.last = now;
    }

    fn report(&self) -> String {
        let parts: Vec<String> = self
            .marks
            .iter()
            .map(|(n, ms)| format!("{n}_ms={ms}"))
            .collect();
        format!(
            "total_ms={} {}",
            self.last.duration_since(self.start).as_millis(),
            parts.join(" ")
        )
    }
}

/// A virtio device waiting to be placed on the bus.
struct PendingVirtio {
    name: String,
    device: Box<dyn VirtioDevice>,
}

impl Vm {
    /// Build the VM and start its vCPUs. `start` is the VMM process start, for `boot_ms`.
    pub fn build(config: VmConfig, start: Instant) -> Result<Vm, VmError> {
        config.validate()?;
        let mut phases = Phases::new(start);
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        check_caps(&kvm)?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("create VM"))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("set TSS address"))?;
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("set identity map address"))?;
        vm_fd.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("create PIT"))?;

        phases.mark("kvm");
        let ram = GuestRam::new(config.memory_mib << 20)?;
        for (slot, region) in ram.mem.iter().enumerate() {
            let host = ram
                .mem
                .get_host_address(region.start_addr())
                .map_err(|_| VmError::MissingCap("host mapping of guest memory"))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `ram`, which outlives the VM fd
            // (both are fields of `Vm`, and `ram` is declared after `_vm_fd` so dropped later is
            // not required: KVM keeps no reference after the VM fd closes).
            unsafe { vm_fd.set_user_memory_region(r) }.map_err(kvm_err("register guest memory"))?;
        }

        phases.mark("memory");
        let mut pio = Bus::new();
        let mut mmio = Bus::new();

        // Legacy devices: COM1, i8042 (reset path), boot timer.
        let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("serial eventfd"))?;
        vm_fd
            .register_irqfd(&serial_evt, SERIAL_IRQ)
            .map_err(kvm_err("serial irqfd"))?;
        let serial = devices::legacy::Serial::new(serial_evt, console_sink(&config.console)?);
        pio.insert(u64::from(SERIAL_PORT), 8, Arc::new(Mutex::new(serial)))?;
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("reset eventfd"))?;
        let i8042 =
            devices::legacy::I8042::new(reset_evt.try_clone().map_err(io_err("reset eventfd"))?);
        pio.insert(u64::from(I8042_PORT), 5, Arc::new(Mutex::new(i8042)))?;
        let boot_ms = Arc::new(AtomicU64::new(NOT_BOOTED));
        pio.insert(
            u64::from(BOOT_TIMER_PORT),
            1,
            Arc::new(Mutex::new(BootTimer::new(start, boot_ms.clone()))),
        )?;

        // Virtio devices, in a fixed order: disks, spares, nets, vsock, rng.
        let mut pending = Vec::new();
        let mut drives = BTreeMap::new();
        for disk in &config.disks {
            let blk = Block::new(&disk.id, &disk.path, disk.read_only)
                .map_err(dev_err(format!("disk {}", disk.id)))?;
            drives.insert(disk.id.clone(), blk.handle());
            pending.push(PendingVirtio {
                name: format!("disk {}", disk.id),
                device: Box::new(blk),
            });
        }
        for id in config.spare_ids() {
            // Spares start empty (capacity 0) and writable-capable; a swap gives them content.
            let blk = Block::new(&id, Path::new("/dev/null"), false)
                .map_err(dev_err(format!("spare drive {id}")))?;
            drives.insert(id.clone(), blk.handle());
            pending.push(PendingVirtio {
                name: format!("spare drive {id}"),
                device: Box::new(blk),
            });
        }
        let mut nics = Vec::new();
        for net in &config.nets {
            let mac = parse_mac(&net.mac)?;
            let dev = devices::virtio::net::Net::new(&net.tap, mac)
                .map_err(dev_err(format!("net on tap {}", net.tap)))?;
            nics.push((net.tap.clone(), dev.counters()));
            pending.push(PendingVirtio {
                name: format!("net {}", net.tap),
                device: Box::new(dev),
            });
        }
        if let Some(vs) = &config.vsock {
            // A stale socket from a crashed VMM would make bind fail.
            let _ = std::fs::remove_file(&vs.socket);
            let dev =
                devices::virtio::vsock::Vsock::new(vs.cid, &vs.socket).map_err(dev_err("vsock"))?;
            pending.push(PendingVirtio {
                name: "vsock".into(),
                device: Box::new(dev),
            });
        }
        if config.rng {
            pending.push(PendingVirtio {
                name: "rng".into(),
                device: Box::new(devices::virtio::rng::Rng::new()),
            });
        }

        let mut cmdline = config.cmdline.clone();
        for (i, p) in pending.into_iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + (i as u64) * VIRTIO_MMIO_SIZE;
            let gsi = VIRTIO_FIRST_GSI + i as u32;
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("virtio irq eventfd"))?;
            vm_fd
                .register_irqfd(&irq, gsi)
                .map_err(kvm_err(format!("irqfd for {}", p.name)))?;
            let transport = MmioTransport::new(ram.mem.clone(), p.device, Interrupt::new(irq))
                .map_err(io_err(format!("transport for {}", p.name)))?;
            for (q, evt) in transport.queue_evts().iter().enumerate() {
                vm_fd
                    .register_ioevent(evt, &IoEventAddress::Mmio(base + 0x50), q as u32)
                    .map_err(kvm_err(format!("ioeventfd for {}", p.name)))?;
            }
            mmio.insert(base, VIRTIO_MMIO_SIZE, Arc::new(Mutex::new(transport)))?;
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
        }

        phases.mark("devices");
        let loaded = boot::load(
            &ram.mem,
            ram.size(),
            &config.kernel,
            config.initrd.as_deref(),
            &cmdline,
        )?;
        log::debug!("kernel {:?} entry {:#x}", loaded.format, loaded.entry);
        regs::write_boot_tables(&ram.mem)?;
        mptable::setup_mptable(&ram.mem, config.vcpus)?;

        phases.mark("load");
        install_kick_handler().map_err(io_err("vCPU kick signal handler"))?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        let pio = Arc::new(pio);
        let mmio = Arc::new(mmio);
        let counters = Arc::new(ExitCounters::default());
        let mut vcpus = Vec::new();
        for i in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(i))
                .map_err(kvm_err(format!("create vCPU {i}")))?;
            fd.set_cpuid2(&cpuid::vcpu_cpuid(&supported, i, config.vcpus))
                .map_err(kvm_err(format!("set CPUID of vCPU {i}")))?;
            regs::setup_msrs(&fd)?;
            regs::setup_fpu(&fd)?;
            regs::setup_lapic(&fd)?;
            if i == 0 {
                regs::setup_boot_regs(&fd, loaded.entry)?;
            }
            vcpus.push(Vcpu::new(
                fd,
                i,
                pio.clone(),
                mmio.clone(),
                ram.mem.clone(),
                counters.clone(),
            ));
        }
        let control = Arc::new(VcpuControl::default());
        let (tx, rx) = channel();
        let vcpu_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("vCPU eventfd"))?;
        for v in vcpus {
            v.start(
                control.clone(),
                tx.clone(),
                vcpu_evt.try_clone().map_err(io_err("vCPU eventfd"))?,
            )
            .map_err(io_err("vCPU thread"))?;
        }
        phases.mark("vcpus");
        log::info!("VM set up: {}", phases.report());
        Ok(Vm {
            config,
            start,
            _kvm: kvm,
            _vm_fd: vm_fd,
            ram,
            control,
            vcpu_events: rx,
            vcpu_evt,
            reset_evt,
            drives,
            nics,
            boot_ms,
            counters,
            _pio: pio,
            _mmio: mmio,
            cmdline,
        })
    }

    /// The full kernel command line, including the device entries the VMM appended.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Milliseconds from VMM start to the agent's boot-timer write, once it happened.
    pub fn boot_ms(&self) -> Option<u64> {
        match self.boot_ms.load(Ordering::SeqCst) {
            NOT_BOOTED => None,
            ms => Some(ms),
        }
    }

    fn state_name(&self) -> &'static str {
        match self.control.state() {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Stopping => "stopping",
        }
    }

    fn status(&self) -> serde_json::Value {
        let drives: Vec<_> = self
            .drives
            .values()
            .map(|h| {
                let info = h.info();
                serde_json::json!({
                    "id": info.id,
                    "path": info.path,
                    "capacity_bytes": info.capacity_sectors.saturating_mul(512),
                    "read_only": info.read_only,
                })
            })
            .collect();
        serde_json::json!({
            "ok": true,
            "state": self.state_name(),
            "pid": std::process::id(),
            "boot_ms": self.boot_ms(),
            "vcpus": self.config.vcpus,
            "memory_mib": self.config.memory_mib,
            "drives": drives,
        })
    }

    fn metrics(&self) -> serde_json::Value {
        let st = crate::metrics::ProcStatus::read();
        let counters = |pairs: &[(&str, u64)]| -> serde_json::Map<String, serde_json::Value> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).into()))
                .collect()
        };
        let blk: serde_json::Map<String, serde_json::Value> = self
            .drives
            .iter()
            .map(|(id, h)| (id.clone(), counters(&h.stats().snapshot()).into()))
            .collect();
        let net: serde_json::Map<String, serde_json::Value> = self
            .nics
            .iter()
            .map(|(tap, c)| (tap.clone(), counters(&c.snapshot()).into()))
            .collect();
        serde_json::json!({
            "ok": true,
            "uptime_ms": self.start.elapsed().as_millis() as u64,
            "boot_ms": self.boot_ms(),
            "exits": {
                "pio": self.counters.pio.load(Ordering::Relaxed),
                "mmio": self.counters.mmio.load(Ordering::Relaxed),
                "unhandled": self.counters.unhandled.load(Ordering::Relaxed),
                "interrupted": self.counters.interrupted.load(Ordering::Relaxed),
            },
            "guest_memory_bytes": self.ram.size(),
            "guest_memory_touched_bytes": self.ram.touched_bytes(),
            "vmm_rss_bytes": st.rss,
            "vmm_peak_rss_bytes": st.hwm,
            "vmm_overhead_bytes": st.overhead(),
            "threads": st.threads,
            "block": blk,
            "net": net,
        })
    }

    /// Run the control loop until the VM ends. Removes the sockets it created before returning.
    pub fn run(
        self,
        control_path: Option<&Path>,
        signals: Option<&std::os::fd::OwnedFd>,
    ) -> VmExit {
        let exit = crate::runloop::run(&self, control_path, signals);
        self.control.stop(Duration::from_millis(500));
        if let Some(vs) = &self.config.vsock {
            let _ = std::fs::remove_file(&vs.socket);
        }
        if let Some(p) = control_path {
            let _ = std::fs::remove_file(p);
        }
        exit
    }

    pub(crate) fn handle(
        &self,
        req: crate::control::Request,
        ctx: &mut crate::runloop::LoopCtx,
    ) -> serde_json::Value {
        use crate::control::{error, Request};
        match req {
            Request::Status {} => self.status(),
            Request::Metrics {} => self.metrics(),
            Request::Pause {} => {
                if self.control.pause(Duration::from_secs(2)) {
                    serde_json::json!({"ok": true, "state": "paused"})
                } else {
                    error("vCPUs did not pause in time")
                }
            }
            Request::Resume {} => {
                self.control.resume();
                serde_json::json!({"ok": true, "state": self.state_name()})
            }
            Request::Stop {
                graceful,
                timeout_ms,
            } => {
                let timeout = Duration::from_millis(timeout_ms.unwrap_or(5000).min(600_000));
                match (&self.config.vsock, graceful) {
                    (Some(vs), true) => {
                        self.control.resume();
                        let deadline = Instant::now() + timeout;
                        crate::runloop::request_guest_poweroff(vs.socket.clone(), deadline);
                        ctx.stop_deadline = Some(deadline);
                        serde_json::json!({"ok": true, "state": "stopping", "graceful": true})
                    }
                    _ => {
                        ctx.stop_now = true;
                        serde_json::json!({"ok": true, "state": "stopping", "graceful": false})
                    }
                }
            }
            Request::UpdateDrive {
                id,
                path,
                read_only,
            } => match self.drives.get(&id) {
                None => error(format!("no drive {id:?}")),
                Some(h) => match h.swap(&path, read_only) {
                    Ok(sectors) => serde_json::json!({
                        "ok": true, "id": id, "capacity_bytes": sectors.saturating_mul(512)
                    }),
                    Err(e) => error(format!(
                        "cannot update drive {id}: {}",
                        crate::error_chain(&e)
                    )),
                },
            },
        }
    }

    pub(crate) fn vcpu_evt_fd(&self) -> i32 {
        self.vcpu_evt.as_raw_fd()
    }
    pub(crate) fn reset_evt_fd(&self) -> i32 {
        self.reset_evt.as_raw_fd()
    }
    pub(crate) fn drain_vcpu_events(&self) -> Option<VmExit> {
        let _ = self.vcpu_evt.read();
        let mut exit = None;
        while let Ok((idx, ev)) = self.vcpu_events.try_recv() {
            log::info!("vcpu{idx}: {ev:?}");
            exit = match ev {
                VcpuEvent::Reset => Some(VmExit::GuestReset),
                VcpuEvent::Panic => Some(VmExit::GuestPanic),
                VcpuEvent::Halted => exit,
                VcpuEvent::Error(e) => Some(VmExit::Error(e)),
            };
        }
        exit
    }
    pub(crate) fn drain_reset(&self) -> bool {
        self.reset_evt.read().is_ok()
    }
    pub(crate) fn guest_panicked(&self) -> bool {
        use vm_memory::Bytes;
        matches!(
            self.ram
                .mem
                .read_obj::<u16>(vm_memory::GuestAddress(REBOOT_MODE_ADDR)),
            Ok(REBOOT_MODE_WARM)
        )
    }
}

/// Bind the control socket, replacing a stale one.
pub fn bind_control(path: &Path) -> Result<UnixListener, VmError> {
    let _ = std::fs::remove_file(path);
    let l =
        UnixListener::bind(path).map_err(io_err(format!("control socket {}", path.display())))?;
    l.set_nonblocking(true).map_err(io_err("control socket"))?;
    Ok(l)
}
