//! The trait the VMM's MMIO and port-I/O buses dispatch guest accesses to.

/// A device on an I/O bus. `offset` is relative to the start of the device's range.
///
/// Implementations must never panic on any `offset` or `data` length: both come from the guest.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`. Unknown registers read as zero.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`. Unknown registers are ignored.
    fn write(&mut self, offset: u64, data: &[u8]);
}
