//! Device models for `hyper-vmm`.
//!
//! Everything here is free of KVM: devices see guest memory through `vm-memory`, queues through
//! `virtio-queue`, and raise interrupts through an [`virtio::Interrupt`] (an eventfd the VMM
//! wires to a KVM irqfd). Queue processing is a plain function over guest memory so it can be
//! unit-tested against `virtio-queue`'s mock driver.

pub mod bus;
pub mod legacy;
pub mod virtio;

/// The guest memory type every device works on.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
