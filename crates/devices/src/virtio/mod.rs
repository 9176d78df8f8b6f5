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
}

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;
