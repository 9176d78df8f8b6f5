//! vCPU run-loop tests with tiny hand-assembled guests. They need only a KVM that can run a few
//! instructions (this machine's PVM KVM can), not one that boots Linux.

use std::sync::atomic::Ordering;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::bus::BusDevice;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm::arch::layout::{REBOOT_MODE_ADDR, REBOOT_MODE_WARM};
use vmm::bus::Bus;
use vmm::vcpu::{
    classify_reset, install_kick_handler, ExitCounters, RunState, Vcpu, VcpuControl, VcpuEvent,
};
use vmm_sys_util::eventfd::EventFd;

/// Records writes, answers reads with a fixed byte.
#[derive(Default)]
struct Recorder {
    writes: Vec<(u64, Vec<u8>)>,
    read_value: u8,
}
impl BusDevice for Recorder {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(self.read_value);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

struct TinyVm {
    _kvm: Kvm,
    _vm: VmFd,
    mem: GuestMemoryMmap<()>,
    vcpu: Option<VcpuFd>,
}

fn tiny_vm(mem_size: usize, code_at: u64, code: &[u8]) -> TinyVm {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("create VM");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size)]).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: mem_size as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: `mem` stays mapped for the life of the test VM (it is a field of TinyVm).
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    mem.write_slice(code, GuestAddress(code_at)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    vcpu.set_cpuid2(&vmm::arch::cpuid::vcpu_cpuid(&cpuid, 0, 1))
        .unwrap();
    TinyVm {
        _kvm: kvm,
        _vm: vm,
        mem,
        vcpu: Some(vcpu),
    }
}

fn real_mode(vcpu: &VcpuFd, ip: u64) {
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip: ip,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap();
}

fn run_until_event(v: &mut Vcpu) -> VcpuEvent {
    for _ in 0..10_000 {
        if let Some(ev) = v.run_once() {
            return ev;
        }
    }
    panic!("guest never stopped");
}

#[test]
fn real_mode_port_io_mmio_and_halt() {
    // mov dx,0x3f8; mov al,'H'; out dx,al; mov al,'i'; out dx,al; in al,dx; mov [0x2000],al;
    // mov byte [0x8000],0x42; mov al,[0x8004]; mov [0x2001],al; in al,0x99; mov [0x2002],al; hlt
    let code = [
        0xba, 0xf8, 0x03, 0xb0, b'H', 0xee, 0xb0, b'i', 0xee, 0xec, 0xa2, 0x00, 0x20, 0xc6, 0x06,
        0x00, 0x80, 0x42, 0xa0, 0x04, 0x80, 0xa2, 0x01, 0x20, 0xe4, 0x99, 0xa2, 0x02, 0x20, 0xf4,
    ];
    let mut t = tiny_vm(0x4000, 0x1000, &code);
    let fd = t.vcpu.take().unwrap();
    real_mode(&fd, 0x1000);
    let serial = Arc::new(Mutex::new(Recorder {
        read_value: 0x5a,
        ..Default::default()
    }));
    let mmio_dev = Arc::new(Mutex::new(Recorder {
        read_value: 0x77,
        ..Default::default()
    }));
    let mut pio = Bus::new();
    pio.insert(0x3f8, 8, serial.clone()).unwrap();
    let mut mmio = Bus::new();
    mmio.insert(0x8000, 0x10, mmio_dev.clone()).unwrap();
    let counters = Arc::new(ExitCounters::default());
    let mut v = Vcpu::new(
        fd,
        0,
        Arc::new(pio),
        Arc::new(mmio),
        t.mem.clone(),
        counters.clone(),
    );
    assert_eq!(run_until_event(&mut v), VcpuEvent::Halted);
    let writes = &serial.lock().unwrap().writes;
    assert_eq!(writes, &vec![(0, vec![b'H']), (0, vec![b'i'])]);
    assert_eq!(mmio_dev.lock().unwrap().writes, vec![(0, vec![0x42])]);
    let got: [u8; 3] = t.mem.read_obj(GuestAddress(0x2000)).unwrap();
    // Port read from the device, MMIO read from the device, unclaimed port reads as 0xff.
    assert_eq!(got, [0x5a, 0x77, 0xff]);
    assert_eq!(counters.unhandled.load(Ordering::SeqCst), 1);
    assert!(counters.pio.load(Ordering::SeqCst) >= 4);
}

#[test]
fn long_mode_boot_state_runs_64_bit_code() {
    // mov dx,0x3f8; mov al,'L'; out dx,al; mov rax,0x1122334455667788; mov [0x3000],rax; hlt
    let code = [
        0x66, 0xba, 0xf8, 0x03, 0xb0, b'L', 0xee, 0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33,
        0x22, 0x11, 0x48, 0x89, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00, 0xf4,
    ];
    let mut t = tiny_vm(4 << 20, 0x10_0000, &code);
    vmm::arch::regs::write_boot_tables(&t.mem).unwrap();
    let fd = t.vcpu.take().unwrap();
    vmm::arch::regs::setup_boot_regs(&fd, 0x10_0000).unwrap();
    vmm::arch::regs::setup_msrs(&fd).unwrap();
    vmm::arch::regs::setup_fpu(&fd).unwrap();
    let serial = Arc::new(Mutex::new(Recorder::default()));
    let mut pio = Bus::new();
    pio.insert(0x3f8, 8, serial.clone()).unwrap();
    let mut v = Vcpu::new(
        fd,
        0,
        Arc::new(pio),
        Arc::new(Bus::new()),
        t.mem.clone(),
        Arc::default(),
    );
    assert_eq!(run_until_event(&mut v), VcpuEvent::Halted);
    assert_eq!(serial.lock().unwrap().writes, vec![(0, vec![b'L'])]);
    let q: u64 = t.mem.read_obj(GuestAddress(0x3000)).unwrap();
    assert_eq!(q, 0x1122_3344_5566_7788);
    let sregs = v.fd().get_sregs().unwrap();
    assert_eq!(sregs.efer & 0x500, 0x500, "not in long mode");
}

#[test]
fn reset_classification_reads_the_kernel_reboot_mode_word() {
    // A real guest's triple fault is exercised by the e2e reboot/panic tests: this machine's PVM
    // KVM never reports a triple fault as a shutdown exit.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    assert_eq!(classify_reset(&mem), VcpuEvent::Reset);
    mem.write_obj(REBOOT_MODE_WARM, GuestAddress(REBOOT_MODE_ADDR))
        .unwrap();
    assert_eq!(classify_reset(&mem), VcpuEvent::Panic);
    mem.write_obj(0u16, GuestAddress(REBOOT_MODE_ADDR)).unwrap();
    assert_eq!(classify_reset(&mem), VcpuEvent::Reset);
}

#[test]
fn spinning_vcpu_thread_pauses_resumes_and_stops() {
    install_kick_handler().unwrap();
    // jmp $ (spin forever)
    let mut t = tiny_vm(0x4000, 0x1000, &[0xeb, 0xfe]);
    let fd = t.vcpu.take().unwrap();
    real_mode(&fd, 0x1000);
    let counters = Arc::new(ExitCounters::default());
    let v = Vcpu::new(
        fd,
        0,
        Arc::default(),
        Arc::default(),
        t.mem.clone(),
        counters.clone(),
    );
    let control = Arc::new(VcpuControl::default());
    let (tx, rx) = channel();
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    v.start(control.clone(), tx, evt.try_clone().unwrap())
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(control.pause(Duration::from_secs(5)), "vCPU did not pause");
    assert_eq!(control.state(), RunState::Paused);
    assert!(counters.interrupted.load(Ordering::SeqCst) >= 1);
    control.resume();
    assert_eq!(control.state(), RunState::Running);
    std::thread::sleep(Duration::from_millis(20));
    control.stop(Duration::from_secs(5));
    assert_eq!(control.thread_count(), 0, "vCPU thread not joined");
    assert!(rx.try_recv().is_err(), "a spinning guest produced an event");
}
