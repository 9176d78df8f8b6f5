//! The boot timer: the guest agent writes a magic byte to an I/O port once it is ready to serve,
//! and the VMM logs `boot_ms=<n>` measured from its own process start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use devices::bus::BusDevice;

/// I/O port the guest agent writes to (must match the agent's constant).
pub const BOOT_TIMER_PORT: u16 = 0x440;
/// The magic value that means "the agent is ready".
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// The boot timer device. Records the first magic write only.
pub struct BootTimer {
    start: Instant,
    boot_ms: Arc<AtomicU64>,
}

/// `u64::MAX` in the shared cell means "not booted yet".
pub const NOT_BOOTED: u64 = u64::MAX;

impl BootTimer {
    /// A timer counting from `start`; the boot time lands in `boot_ms`.
    pub fn new(start: Instant, boot_ms: Arc<AtomicU64>) -> Self {
        BootTimer { start, boot_ms }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&BOOT_TIMER_MAGIC) {
            return;
        }
        let ms = self.start.elapsed().as_millis() as u64;
        if self
            .boot_ms
            .compare_exchange(NOT_BOOTED, ms, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            log::info!("guest agent ready boot_ms={ms}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_magic_only() {
        let cell = Arc::new(AtomicU64::new(NOT_BOOTED));
        let mut t = BootTimer::new(Instant::now(), cell.clone());
        t.write(0, &[1]);
        assert_eq!(cell.load(Ordering::SeqCst), NOT_BOOTED);
        t.write(0, &[BOOT_TIMER_MAGIC]);
        let first = cell.load(Ordering::SeqCst);
        assert_ne!(first, NOT_BOOTED);
        std::thread::sleep(std::time::Duration::from_millis(5));
        t.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(cell.load(Ordering::SeqCst), first);
    }
}
