//! The virtio-mmio transport, version 2 ("modern"), as the Linux `virtio_mmio` driver expects it
//! (virtio spec 1.2, section 4.2.2).
//!
//! The transport owns the register file, the per-queue configuration the driver writes, and one
//! notification eventfd per queue. On `DRIVER_OK` it turns the queue registers into validated
//! [`Queue`]s and hands them to the device in an [`ActivateContext`]. A status write of zero
//! resets the device.

use std::io;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::GuestMemory;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern virtio-mmio version.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest.
pub const VENDOR_ID: u32 = 0;
/// Size of one virtio-mmio device window (registers + config space).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of `QueueNotify`, where the VMM may register per-queue ioeventfds (datamatch = index).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// Register offsets (virtio spec 1.2, 4.2.2, table "MMIO Device Register Layout").
mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio spec 1.2, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Errors from building a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue notification eventfd could not be created.
    #[error("cannot create queue eventfd")]
    QueueEvent(#[source] io::Error),
}

impl From<MmioError> for io::Error {
    fn from(e: MmioError) -> io::Error {
        match e {
            MmioError::QueueEvent(e) => e,
        }
    }
}

/// What the driver wrote into one queue's registers.
#[derive(Clone, Copy, Debug)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Build and validate a `Queue` from the registers.
    fn build(&self, mem: &GuestMemory) -> Option<Queue> {
        let mut q = Queue::new(self.max_size).ok()?;
        q.try_set_size(self.size).ok()?;
        q.try_set_desc_table_address(GuestAddress(self.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .ok()?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .ok()?;
        q.set_ready(true);
        q.is_valid(mem).then_some(q)
    }
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// A virtio device behind a virtio-mmio (version 2) register window.
pub struct MmioTransport {
    mem: GuestMemory,
    device: Box<dyn VirtioDevice>,
    interrupt: Interrupt,
    queue_evts: Vec<EventFd>,
    queues: Vec<QueueConfig>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    activated: bool,
}

impl MmioTransport {
    /// Put `device` behind a new transport. Creates one (non-blocking) notification eventfd per
    /// queue of the device.
    pub fn new(
        mem: GuestMemory,
        device: Box<dyn VirtioDevice>,
        interrupt: Interrupt,
    ) -> io::Result<Self> {
        let sizes = device.queue_max_sizes().to_vec();
        let queue_evts = sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::QueueEvent))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            mem,
            device,
            interrupt,
            queue_evts,
            queues: sizes.into_iter().map(QueueConfig::new).collect(),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
        })
    }

    /// The per-queue notification eventfds, in queue order. The VMM may register them as KVM
    /// ioeventfds on `base + QUEUE_NOTIFY_OFFSET` with datamatch = queue index.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt line (its eventfd is the irqfd to register).
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// The virtio device type behind this transport.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device has been activated (driver set `DRIVER_OK` and activation succeeded).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    /// The selected queue, if the driver may still change its configuration.
    fn selected_queue_mut(&mut self) -> Option<&mut QueueConfig> {
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        let i = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(i)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let f = self.device.avail_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: a length of all ones means "does not exist".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.device.config_generation(),
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                // Features may only change between DRIVER and FEATURES_OK.
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    return;
                }
                match self.driver_features_sel {
                    0 => set_low(&mut self.driver_features, v),
                    1 => set_high(&mut self.driver_features, v),
                    _ => {}
                }
                self.driver_features &= self.device.avail_features();
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue_mut() {
                    q.size = u16::try_from(v).unwrap_or(0);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue_mut() {
                    q.ready = v == 1;
                }
            }
            reg::QUEUE_DESC_LOW => self.with_queue(|q| set_low(&mut q.desc, v)),
            reg::QUEUE_DESC_HIGH => self.with_queue(|q| set_high(&mut q.desc, v)),
            reg::QUEUE_DRIVER_LOW => self.with_queue(|q| set_low(&mut q.driver, v)),
            reg::QUEUE_DRIVER_HIGH => self.with_queue(|q| set_high(&mut q.driver, v)),
            reg::QUEUE_DEVICE_LOW => self.with_queue(|q| set_low(&mut q.device, v)),
            reg::QUEUE_DEVICE_HIGH => self.with_queue(|q| set_high(&mut q.device, v)),
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            // We expose no shared memory regions; the selector has no effect.
            reg::SHM_SEL => {}
            _ => {}
        }
    }

    /// Change the selected queue's addresses, only while it is not ready (spec 4.2.2.3).
    fn with_queue(&mut self, f: impl FnOnce(&mut QueueConfig)) {
        if let Some(q) = self.selected_queue_mut() {
            if !q.ready {
                f(q);
            }
        }
    }

    fn notify(&self, index: u32) {
        let evt = usize::try_from(index)
            .ok()
            .and_then(|i| self.queue_evts.get(i));
        if let Some(evt) = evt {
            if let Err(e) = evt.write(1) {
                log::error!("cannot signal queue {index} eventfd: {e}");
            }
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (clearing happens through a reset). FAILED is accepted
        // any time; NEEDS_RESET is device-owned.
        let v = v & !status::DEVICE_NEEDS_RESET;
        if v & self.status != self.status & !status::DEVICE_NEEDS_RESET {
            log::debug!(
                "virtio-mmio: driver cleared status bits {:#x} -> {v:#x}",
                self.status
            );
            return;
        }
        let added = v & !self.status;
        let mut new = self.status | v;
        if added & status::FEATURES_OK != 0 {
            // A modern-only device: refuse drivers that did not accept VERSION_1. The driver
            // re-reads the status, sees FEATURES_OK missing and gives up.
            if self.status & status::DRIVER == 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                new &= !status::FEATURES_OK;
            } else {
                self.device.ack_features(self.driver_features);
            }
        }
        if added & status::DRIVER_OK != 0 {
            if new & status::FEATURES_OK == 0 {
                new &= !status::DRIVER_OK;
            } else {
                self.status = new;
                self.activate();
                return;
            }
        }
        self.status = new;
    }

    fn activate(&mut self) {
        if self.activated {
            return;
        }
        match self.build_context() {
            Some(ctx) => match self.device.activate(ctx) {
                Ok(()) => self.activated = true,
                Err(e) => {
                    match e {
                        // The driver's doing: keep it quiet, a guest can retry in a loop.
                        ActivateError::QueueCount { .. } => {
                            log::debug!("virtio device {}: {e}", self.device_type())
                        }
                        ActivateError::Worker(_) => log::error!(
                            "virtio device {} activation failed: {e}",
                            self.device_type()
                        ),
                    }
                    self.needs_reset();
                }
            },
            None => self.needs_reset(),
        }
    }

    /// The ready queues (which must be a prefix of the device's queues), validated against guest
    /// memory, with clones of their notification eventfds.
    fn build_context(&self) -> Option<ActivateContext> {
        let ready = self.queues.iter().take_while(|q| q.ready).count();
        if self.queues.iter().skip(ready).any(|q| q.ready) {
            log::debug!("virtio-mmio: ready queues are not contiguous");
            return None;
        }
        let mut queues = Vec::with_capacity(ready);
        let mut queue_evts = Vec::with_capacity(ready);
        for (i, (cfg, evt)) in self
            .queues
            .iter()
            .zip(&self.queue_evts)
            .take(ready)
            .enumerate()
        {
            let Some(q) = cfg.build(&self.mem) else {
                log::debug!("virtio-mmio: queue {i} is invalid");
                return None;
            };
            queues.push(q);
            match evt.try_clone() {
                Ok(e) => queue_evts.push(e),
                Err(e) => {
                    log::error!("cannot clone queue eventfd: {e}");
                    return None;
                }
            }
        }
        Some(ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            interrupt: self.interrupt.clone(),
        })
    }

    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        if let Err(e) = self.interrupt.signal_config_change() {
            log::error!("cannot signal device-needs-reset: {e}");
        }
    }

    fn reset(&mut self) {
        if self.activated && !self.device.reset() {
            log::error!("virtio device {} cannot be reset", self.device_type());
            self.status = status::DEVICE_NEEDS_RESET;
            return;
        }
        self.activated = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        // Forget stale notifications so a re-activated device does not see them.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.reset();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let v = if data.len() == 4 && offset & 3 == 0 {
            self.read_reg(offset)
        } else {
            log::debug!(
                "virtio-mmio: bad register read at {offset:#x}/{}",
                data.len()
            );
            0
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset & 3 == 0 => self.write_reg(offset, u32::from_le_bytes(bytes)),
            _ => log::debug!(
                "virtio-mmio: bad register write at {offset:#x}/{}",
                data.len()
            ),
        }
    }
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

/// Drive a transport through the Linux driver's bring-up: accept every offered feature, set up
/// one queue per mock queue (full size), set `DRIVER_OK`.
#[cfg(test)]
pub(crate) fn bring_up(
    t: &mut MmioTransport,
    vqs: &[&virtio_queue::mock::MockSplitQueue<'_, GuestMemory>],
) {
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    let features = t.device.avail_features();
    w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(t, reg::DRIVER_FEATURES_SEL, 0);
    w(t, reg::DRIVER_FEATURES, features as u32);
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    w(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    for (i, vq) in vqs.iter().enumerate() {
        w(t, reg::QUEUE_SEL, i as u32);
        let max = t.selected_queue().map_or(0, |q| q.max_size);
        w(t, reg::QUEUE_NUM, u32::from(max));
        for (lo, addr) in [
            (reg::QUEUE_DESC_LOW, vq.desc_table_addr().0),
            (reg::QUEUE_DRIVER_LOW, vq.avail_addr().0),
            (reg::QUEUE_DEVICE_LOW, vq.used_addr().0),
        ] {
            w(t, lo, addr as u32);
            w(t, lo + 4, (addr >> 32) as u32);
        }
        w(t, reg::QUEUE_READY, 1);
    }
    w(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use virtio_queue::mock::MockSplitQueue;

    use super::*;
    use crate::virtio::test_utils::memory;

    #[derive(Debug, Default)]
    struct Record {
        acked: Option<u64>,
        activations: Vec<(usize, usize)>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
        fail_activate: bool,
        fail_reset: bool,
        generation: u32,
    }

    /// A device that records what the transport does to it.
    struct FakeDevice {
        rec: Arc<Mutex<Record>>,
        sizes: Vec<u16>,
    }

    const FEATURES: u64 = VIRTIO_F_VERSION_1 | 0b1010;

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn avail_features(&self) -> u64 {
            FEATURES
        }
        fn ack_features(&mut self, features: u64) {
            self.rec.lock().unwrap().acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let config = [1u8, 2, 3, 4, 5, 6, 7, 8];
            crate::virtio::block::read_config_bytes(&config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.rec
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            let mut rec = self.rec.lock().unwrap();
            if rec.fail_activate {
                return Err(ActivateError::QueueCount {
                    expected: 9,
                    got: ctx.queues.len(),
                });
            }
            rec.activations
                .push((ctx.queues.len(), ctx.queue_evts.len()));
            Ok(())
        }
        fn reset(&mut self) -> bool {
            let mut rec = self.rec.lock().unwrap();
            rec.resets += 1;
            !rec.fail_reset
        }
        fn config_generation(&self) -> u32 {
            self.rec.lock().unwrap().generation
        }
    }

    fn transport(sizes: &[u16]) -> (MmioTransport, Arc<Mutex<Record>>) {
        let rec = Arc::new(Mutex::new(Record::default()));
        let dev = FakeDevice {
            rec: rec.clone(),
            sizes: sizes.to_vec(),
        };
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        (
            MmioTransport::new(memory(), Box::new(dev), irq).unwrap(),
            rec,
        )
    }

    fn r32(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Negotiate features as the Linux driver does, accepting `features`.
    fn negotiate(t: &mut MmioTransport, features: u64) {
        w32(t, reg::STATUS, status::ACKNOWLEDGE);
        w32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(t, reg::DRIVER_FEATURES_SEL, 0);
        w32(t, reg::DRIVER_FEATURES, features as u32);
        w32(t, reg::DRIVER_FEATURES_SEL, 1);
        w32(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        w32(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    /// Point queue `index` at a mock queue's rings and mark it ready.
    fn setup_queue(
        t: &mut MmioTransport,
        index: u32,
        vq: &MockSplitQueue<'_, GuestMemory>,
        size: u32,
    ) {
        w32(t, reg::QUEUE_SEL, index);
        w32(t, reg::QUEUE_NUM, size);
        for (lo, addr) in [
            (reg::QUEUE_DESC_LOW, vq.desc_table_addr().0),
            (reg::QUEUE_DRIVER_LOW, vq.avail_addr().0),
            (reg::QUEUE_DEVICE_LOW, vq.used_addr().0),
        ] {
            w32(t, lo, addr as u32);
            w32(t, lo + 4, (addr >> 32) as u32);
        }
        w32(t, reg::QUEUE_READY, 1);
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport(&[16]);
        assert_eq!(r32(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r32(&mut t, reg::VERSION), 2);
        assert_eq!(r32(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(r32(&mut t, reg::VENDOR_ID), VENDOR_ID);
        assert_eq!(r32(&mut t, reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(r32(&mut t, reg::SHM_LEN_HIGH), u32::MAX);
    }

    #[test]
    fn device_features_by_page() {
        let (mut t, _) = transport(&[16]);
        w32(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r32(&mut t, reg::DEVICE_FEATURES), FEATURES as u32);
        w32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r32(&mut t, reg::DEVICE_FEATURES), 1);
        w32(&mut t, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(r32(&mut t, reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn driver_features_masked_to_offered() {
        let (mut t, rec) = transport(&[16]);
        negotiate(&mut t, u64::MAX);
        assert_eq!(rec.lock().unwrap().acked, Some(FEATURES));
        assert_ne!(r32(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // After FEATURES_OK, feature writes are ignored.
        w32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w32(&mut t, reg::DRIVER_FEATURES, 0);
        assert_eq!(t.driver_features, FEATURES);
    }

    #[test]
    fn features_ok_refused_without_version_1() {
        let (mut t, rec) = transport(&[16]);
        negotiate(&mut t, 0b1010);
        assert_eq!(r32(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        assert_eq!(rec.lock().unwrap().acked, None);
        // DRIVER_OK without FEATURES_OK does not activate either.
        w32(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert!(!t.is_activated());
    }

    #[test]
    fn driver_features_need_driver_status() {
        let (mut t, _) = transport(&[16]);
        w32(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.driver_features, 0);
    }

    #[test]
    fn queue_registers() {
        let (mut t, _) = transport(&[16, 64]);
        w32(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 64);
        assert_eq!(r32(&mut t, reg::QUEUE_READY), 0);
        w32(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
        w32(&mut t, reg::QUEUE_DESC_HIGH, 0x2);
        assert_eq!(t.queues[1].desc, 0x2_0000_1000);
        w32(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r32(&mut t, reg::QUEUE_READY), 1);
        // Addresses are frozen while the queue is ready.
        w32(&mut t, reg::QUEUE_DESC_LOW, 0x3000);
        assert_eq!(t.queues[1].desc, 0x2_0000_1000);
        // A queue that does not exist.
        w32(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 0);
        w32(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r32(&mut t, reg::QUEUE_READY), 0);
        w32(&mut t, reg::QUEUE_SEL, u32::MAX);
        assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn activate_on_driver_ok() {
        let (mut t, rec) = transport(&[16]);
        let mem = t.mem.clone();
        let vq = MockSplitQueue::new(&mem, 16);
        negotiate(&mut t, FEATURES);
        setup_queue(&mut t, 0, &vq, 16);
        assert!(rec.lock().unwrap().activations.is_empty());
        w32(&mut t, reg::STATUS, ALL_OK);
        assert!(t.is_activated());
        assert_eq!(rec.lock().unwrap().activations, vec![(1, 1)]);
        assert_eq!(r32(&mut t, reg::STATUS), ALL_OK);
        // Queue config is frozen after DRIVER_OK.
        w32(&mut t, reg::QUEUE_NUM, 8);
        assert_eq!(t.queues[0].size, 16);
        // Writing DRIVER_OK again does not re-activate.
        w32(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(rec.lock().unwrap().activations.len(), 1);
    }

    #[test]
    fn invalid_queue_sets_needs_reset() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        for bad in ["outside", "size", "align", "gap"] {
            let (mut t, rec) = transport(&[16, 16]);
            negotiate(&mut t, FEATURES);
            setup_queue(&mut t, 0, &vq, 16);
            match bad {
                "outside" => {
                    w32(&mut t, reg::QUEUE_READY, 0);
                    w32(&mut t, reg::QUEUE_DEVICE_HIGH, 0x10);
                    w32(&mut t, reg::QUEUE_READY, 1);
                }
                "size" => {
                    w32(&mut t, reg::QUEUE_READY, 0);
                    w32(&mut t, reg::QUEUE_NUM, 12);
                    w32(&mut t, reg::QUEUE_READY, 1);
                }
                "align" => {
                    w32(&mut t, reg::QUEUE_READY, 0);
                    w32(&mut t, reg::QUEUE_DESC_LOW, 0x8);
                    w32(&mut t, reg::QUEUE_READY, 1);
                }
                _ => {
                    // Queue 1 ready while queue 0 is not.
                    w32(&mut t, reg::QUEUE_READY, 0);
                    setup_queue(&mut t, 1, &vq, 16);
                }
            }
            w32(&mut t, reg::STATUS, ALL_OK);
            assert!(!t.is_activated(), "{bad}");
            assert!(rec.lock().unwrap().activations.is_empty(), "{bad}");
            assert_ne!(
                r32(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
                0,
                "{bad}"
            );
            assert_ne!(
                t.interrupt().status() & crate::virtio::INTERRUPT_STATUS_CONFIG_CHANGED,
                0
            );
        }
    }

    #[test]
    fn activation_failure_sets_needs_reset() {
        let (mut t, rec) = transport(&[16]);
        rec.lock().unwrap().fail_activate = true;
        let mem = t.mem.clone();
        let vq = MockSplitQueue::new(&mem, 16);
        negotiate(&mut t, FEATURES);
        setup_queue(&mut t, 0, &vq, 16);
        w32(&mut t, reg::STATUS, ALL_OK);
        assert!(!t.is_activated());
        assert_eq!(
            r32(&mut t, reg::STATUS),
            ALL_OK | status::DEVICE_NEEDS_RESET
        );
    }

    #[test]
    fn reset_restores_initial_state() {
        let (mut t, rec) = transport(&[16]);
        let mem = t.mem.clone();
        let vq = MockSplitQueue::new(&mem, 16);
        negotiate(&mut t, FEATURES);
        setup_queue(&mut t, 0, &vq, 16);
        w32(&mut t, reg::STATUS, ALL_OK);
        t.interrupt().signal_used_queue().unwrap();
        t.queue_evts()[0].write(1).unwrap();
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(rec.lock().unwrap().resets, 1);
        assert!(!t.is_activated());
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 0);
        w32(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r32(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(t.queues[0].desc, 0);
        assert!(
            t.queue_evts()[0].read().is_err(),
            "stale notification drained"
        );
        // The device can be brought up again.
        negotiate(&mut t, FEATURES);
        setup_queue(&mut t, 0, &vq, 16);
        w32(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(rec.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn failed_reset_marks_needs_reset() {
        let (mut t, rec) = transport(&[16]);
        rec.lock().unwrap().fail_reset = true;
        let mem = t.mem.clone();
        let vq = MockSplitQueue::new(&mem, 16);
        negotiate(&mut t, FEATURES);
        setup_queue(&mut t, 0, &vq, 16);
        w32(&mut t, reg::STATUS, ALL_OK);
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(r32(&mut t, reg::STATUS), status::DEVICE_NEEDS_RESET);
    }

    #[test]
    fn reset_before_activation_does_not_touch_device() {
        let (mut t, rec) = transport(&[16]);
        negotiate(&mut t, FEATURES);
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(rec.lock().unwrap().resets, 0);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        assert_eq!(t.driver_features, 0);
    }

    #[test]
    fn status_bits_cannot_be_cleared_without_reset() {
        let (mut t, _) = transport(&[16]);
        negotiate(&mut t, FEATURES);
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(
            r32(&mut t, reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
        );
        // FAILED can be added.
        w32(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::FAILED,
        );
        assert_ne!(r32(&mut t, reg::STATUS) & status::FAILED, 0);
    }

    #[test]
    fn notify_writes_queue_eventfd() {
        let (mut t, _) = transport(&[16, 16]);
        w32(&mut t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        assert!(t.queue_evts()[0].read().is_err());
        // Unknown queues are ignored.
        w32(&mut t, reg::QUEUE_NOTIFY, 2);
        w32(&mut t, reg::QUEUE_NOTIFY, u32::MAX);
        assert!(t.queue_evts()[0].read().is_err());
        assert!(t.queue_evts()[1].read().is_err());
    }

    #[test]
    fn interrupt_status_and_ack() {
        let (mut t, _) = transport(&[16]);
        t.interrupt().signal_used_queue().unwrap();
        t.interrupt().signal_config_change().unwrap();
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 3);
        assert_eq!(t.interrupt().eventfd().read().unwrap(), 2);
        w32(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 2);
    }

    #[test]
    fn config_space_and_generation() {
        let (mut t, rec) = transport(&[16]);
        let mut b = [0u8; 2];
        t.read(reg::CONFIG + 2, &mut b);
        assert_eq!(b, [3, 4]);
        let mut b = [0xffu8; 4];
        t.read(reg::CONFIG + 6, &mut b);
        assert_eq!(b, [7, 8, 0, 0]);
        t.read(u64::MAX, &mut b);
        assert_eq!(b, [0, 0, 0, 0]);
        t.write(reg::CONFIG + 1, &[9]);
        assert_eq!(rec.lock().unwrap().config_writes, vec![(1, vec![9])]);
        assert_eq!(r32(&mut t, reg::CONFIG_GENERATION), 0);
        rec.lock().unwrap().generation = 7;
        assert_eq!(r32(&mut t, reg::CONFIG_GENERATION), 7);
    }

    #[test]
    fn bad_register_accesses_are_harmless() {
        let (mut t, _) = transport(&[16]);
        // Wrong sizes and unaligned offsets read as zero.
        for (off, len) in [
            (0u64, 1usize),
            (0, 2),
            (0, 8),
            (1, 4),
            (0x0fe, 4),
            (0x0ff, 1),
        ] {
            let mut b = vec![0xffu8; len];
            t.read(off, &mut b);
            assert!(b.iter().all(|&x| x == 0), "{off:#x}/{len}");
        }
        let mut empty = [];
        t.read(0, &mut empty);
        // Wrong-size writes are ignored.
        t.write(reg::STATUS, &[1]);
        t.write(reg::STATUS, &[1, 0]);
        t.write(reg::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
        t.write(reg::STATUS + 1, &[1, 0, 0, 0]);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        // Writes to read-only or unknown registers change nothing.
        w32(&mut t, reg::MAGIC_VALUE, 0);
        w32(&mut t, reg::QUEUE_NUM_MAX, 0);
        w32(&mut t, 0x0f0, 5);
        assert_eq!(r32(&mut t, reg::MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 16);
    }
}
