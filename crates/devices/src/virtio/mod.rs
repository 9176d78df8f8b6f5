//! Virtio devices and the virtio-mmio transport.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemory;

/// `VIRTIO_MMIO_INT_VRING`: the device used a buffer in one of its queues.
pub const INTERRUPT_STATUS_USED_RING: u32 = 0x1;
/// `VIRTIO_MMIO_INT_CONFIG`: the device configuration changed.
pub const INTERRUPT_STATUS_CONFIG_CHANGED: u32 = 0x2;

/// Virtio device type ids (virtio spec 1.2, section 5).
pub mod device_type {
    /// virtio-net.
    pub const NET: u32 = 1;
    /// virtio-blk.
    pub const BLOCK: u32 = 2;
    /// virtio-rng (entropy).
    pub const RNG: u32 = 4;
    /// virtio-vsock.
    pub const VSOCK: u32 = 19;
}

/// `VIRTIO_F_VERSION_1`: every device we offer is a modern (virtio 1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// The interrupt line of one virtio-mmio device: an interrupt status register shared between
/// the transport (which the guest reads and acknowledges) and the device worker (which sets bits),
/// plus the eventfd the VMM registers as a KVM irqfd for the device's GSI.
#[derive(Clone, Debug)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    evt: Arc<EventFd>,
}

impl Interrupt {
    /// A new interrupt line signalled through `evt`.
    pub fn new(evt: EventFd) -> Self {
        Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            evt: Arc::new(evt),
        }
    }

    /// The eventfd the VMM registers as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Current interrupt status (the `InterruptStatus` register).
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clear the bits the guest acknowledged (`InterruptACK`).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Reset the status to zero (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    fn raise(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// Tell the guest a queue has new used buffers.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.raise(INTERRUPT_STATUS_USED_RING)
    }

    /// Tell the guest the device configuration space changed.
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.raise(INTERRUPT_STATUS_CONFIG_CHANGED)
    }
}

/// What a device receives when the driver sets `DRIVER_OK`.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The queues the driver configured, in index order, already validated by the transport.
    pub queues: Vec<Queue>,
    /// One eventfd per queue; the transport writes it when the guest notifies that queue.
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt line.
    pub interrupt: Interrupt,
}

/// Errors from activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured a different number of queues than the device needs.
    #[error("device needs {expected} queues, driver configured {got}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues the driver made ready.
        got: usize,
    },
    /// The device's worker thread or backend could not be set up.
    #[error("cannot start device worker")]
    Worker(#[source] std::io::Error),
}

/// A virtio device behind a transport. Implementations hold the device's config space and, once
/// activated, run their queue processing on a worker thread they own.
pub trait VirtioDevice: Send {
    /// Virtio device type id (see [`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// The driver accepted `features` (already masked by the transport to offered bits).
    fn ack_features(&mut self, features: u64);
    /// Read device config space at `offset`; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write device config space at `offset`; read-only or out-of-range bytes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start processing queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stop the worker and forget the queues, returning to the pre-activation state.
    /// Returns false if the device cannot be reset (the transport then marks it `NEEDS_RESET`).
    fn reset(&mut self) -> bool;
    /// Generation counter of the device config space (the `ConfigGeneration` register). Devices
    /// whose config can change at runtime (block drive swap) bump it on every change so the
    /// driver can detect torn reads.
    fn config_generation(&self) -> u32 {
        0
    }
}

/// A device worker thread plus the eventfd that tells it to stop.
///
/// Devices spawn one on `activate` and stop it on `reset`; dropping it (with the device) also
/// stops and joins the thread.
#[derive(Debug)]
pub(crate) struct Worker {
    kill: EventFd,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    /// Spawn `run` on a thread called `name`. `run` receives a clone of the kill eventfd, which
    /// it must watch (in its epoll set) and return when it becomes readable.
    pub(crate) fn spawn<F>(name: String, run: F) -> std::io::Result<Worker>
    where
        F: FnOnce(EventFd) + Send + 'static,
    {
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let thread_kill = kill.try_clone()?;
        // A NUL in a thread name would make `spawn` panic.
        let name = name.replace('\0', "?");
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(thread_kill))?;
        Ok(Worker {
            kill,
            handle: Some(handle),
        })
    }

    /// Ask the worker to stop and wait for it. Returns false if the worker could not be
    /// signalled or had panicked.
    pub(crate) fn stop(mut self) -> bool {
        self.stop_inner()
    }

    /// Stop the worker in `slot`, if any (a device's `reset`). True if there was none.
    pub(crate) fn stop_slot(slot: &mut Option<Worker>) -> bool {
        slot.take().is_none_or(Worker::stop)
    }

    fn stop_inner(&mut self) -> bool {
        let Some(handle) = self.handle.take() else {
            return true;
        };
        if let Err(e) = self.kill.write(1) {
            log::error!("cannot signal device worker to stop: {e}");
            return false;
        }
        handle.join().is_ok()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Epoll token of a worker's kill eventfd (queue eventfds use their queue index).
pub(crate) const KILL_TOKEN: u64 = u64::MAX;

/// Pop the next available chain whose head names a descriptor of `queue`. Heads beyond the queue
/// size are skipped (a guest can write anything into the available ring): there is nothing to
/// process and no used entry can name them.
pub(crate) fn pop_chain<'m, M: vm_memory::GuestMemory>(
    queue: &mut Queue,
    mem: &'m M,
    device: &str,
) -> Result<Option<virtio_queue::DescriptorChain<&'m M>>, virtio_queue::Error> {
    use virtio_queue::{QueueOwnedT, QueueT};
    loop {
        let Some(chain) = queue.iter(mem)?.next() else {
            return Ok(None);
        };
        let head = chain.head_index();
        if head < queue.size() {
            return Ok(Some(chain));
        }
        log::debug!("{device}: avail ring names descriptor {head}");
    }
}

/// The event loop of a device with one queue: process the queue once (requests may predate
/// activation), then again whenever `queue_evt` fires, until `kill` fires.
pub(crate) fn single_queue_loop(
    queue_evt: &EventFd,
    kill: &EventFd,
    mut process: impl FnMut(),
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        queue_evt.as_raw_fd(),
        EpollEvent::new(EventSet::IN, 0),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        kill.as_raw_fd(),
        EpollEvent::new(EventSet::IN, KILL_TOKEN),
    )?;
    let mut events = [EpollEvent::default(); 4];
    process();
    loop {
        let n = epoll_wait(&epoll, &mut events)?;
        for ev in events.iter().take(n) {
            if ev.data() == KILL_TOKEN {
                return Ok(());
            }
            let _ = queue_evt.read();
            process();
        }
    }
}

/// Wait on `epoll` (retrying on `EINTR`), returning the ready events.
pub(crate) fn epoll_wait(
    epoll: &vmm_sys_util::epoll::Epoll,
    events: &mut [vmm_sys_util::epoll::EpollEvent],
) -> std::io::Result<usize> {
    loop {
        match epoll.wait(-1, events) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

/// Helpers for unit tests: guest memory and a mock driver publishing descriptor chains.
#[cfg(test)]
pub(crate) mod test_utils {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// Guest memory size used by tests (one region at 0).
    pub const MEM_SIZE: usize = 0x10_0000;
    /// Where tests put data buffers.
    pub const DATA_ADDR: u64 = 0x1_0000;
    /// Device-writable descriptor flag.
    pub const W: u16 = VRING_DESC_F_WRITE as u16;
    /// Device-readable descriptor flag.
    pub const R: u16 = 0;

    /// 1 MiB of guest memory at address 0.
    pub fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    /// Publish one chain of `(addr, len, flags)` descriptors, written at descriptor table index
    /// `first` onwards, in the available ring.
    pub fn add_chain(
        vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
        first: u16,
        descs: &[(u64, u32, u16)],
    ) {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let i = u16::try_from(i).unwrap();
                let last = usize::from(i) + 1 == descs.len();
                let flags = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT as u16
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, first + i + 1))
            })
            .collect();
        vq.add_desc_chains(&raw, first).unwrap();
    }

    /// The `(id, len)` of used ring entry `i`.
    pub fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>, i: usize) -> (u32, u32) {
        let e = vq.used().ring().ref_at(i).unwrap().load();
        (e.id(), e.len())
    }

    /// A self-deleting temporary file path.
    pub struct TempPath(pub std::path::PathBuf);

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    impl std::ops::Deref for TempPath {
        type Target = std::path::Path;
        fn deref(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl AsRef<std::path::Path> for TempPath {
        fn as_ref(&self) -> &std::path::Path {
            &self.0
        }
    }

    /// A fresh temporary path (the file is not created).
    pub fn temp_path(tag: &str) -> TempPath {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        TempPath(std::env::temp_dir().join(format!("hypernetes-{tag}-{}-{n}", std::process::id())))
    }

    /// Wait (up to 5 s) until the device has published `n` used entries.
    pub fn wait_used(vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>, n: u16) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while used_idx(vq) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "device did not use {n} buffers"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// The used ring index the device published.
    pub fn used_idx(vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>) -> u16 {
        vq.used().idx().load()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_runs_until_stopped() {
        let (tx, rx) = std::sync::mpsc::channel();
        // A NUL in the name must not make spawn panic.
        let w = Worker::spawn("bad\0name".to_string(), move |kill| {
            tx.send(std::thread::current().name().map(str::to_string))
                .unwrap();
            let epoll = vmm_sys_util::epoll::Epoll::new().unwrap();
            epoll
                .ctl(
                    vmm_sys_util::epoll::ControlOperation::Add,
                    std::os::fd::AsRawFd::as_raw_fd(&kill),
                    vmm_sys_util::epoll::EpollEvent::new(
                        vmm_sys_util::epoll::EventSet::IN,
                        KILL_TOKEN,
                    ),
                )
                .unwrap();
            let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 1];
            let n = epoll_wait(&epoll, &mut events).unwrap();
            assert_eq!(n, 1);
            assert_eq!(events[0].data(), KILL_TOKEN);
        })
        .unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("bad?name"));
        assert!(w.stop());
    }

    #[test]
    fn interrupt_status_bits() {
        let i = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        i.signal_config_change().unwrap();
        assert_eq!(i.status(), INTERRUPT_STATUS_CONFIG_CHANGED);
        i.signal_used_queue().unwrap();
        i.ack(INTERRUPT_STATUS_CONFIG_CHANGED);
        assert_eq!(i.status(), INTERRUPT_STATUS_USED_RING);
        assert_eq!(i.eventfd().read().unwrap(), 2);
        i.reset();
        assert_eq!(i.status(), 0);
    }
}
