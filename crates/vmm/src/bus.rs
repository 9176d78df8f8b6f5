//! Address-range dispatch of guest MMIO and port I/O accesses to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;

/// A device shared between the bus and whoever else needs it (the control socket, tests).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Bus errors.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps an existing one or is empty/overflowing.
    #[error("bus range {base:#x}+{len:#x} overlaps another device or is invalid")]
    Overlap {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// A set of non-overlapping ranges.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Overlap { base, len })?;
        if let Some((b, (l, _))) = self.ranges.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must lie inside the device's range.
        if offset.checked_add(size as u64)? <= *len {
            Some((offset, dev))
        } else {
            None
        }
    }

    /// Dispatch a read; returns false (and leaves `data` untouched) when no device claims it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatch a write; returns false when no device claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Lock a device, recovering from a poisoned lock (a panicking device thread must not wedge vCPUs).
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_bounds() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Reg(vec![])));
        bus.insert(0x1000, 0x10, dev.clone()).unwrap();
        let mut b = [0u8; 4];
        assert!(bus.read(0x1004, &mut b));
        assert_eq!(b, [4; 4]);
        assert!(bus.write(0x100c, &[1, 2, 3, 4]));
        assert_eq!(dev.lock().unwrap().0, vec![(0xc, vec![1, 2, 3, 4])]);
        // Straddling the end, before, after: unclaimed.
        assert!(!bus.read(0x100e, &mut b));
        assert!(!bus.read(0xfff, &mut [0u8; 1]));
        assert!(!bus.write(0x1010, &[0]));
    }

    #[test]
    fn overlaps_rejected() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Reg(vec![])));
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        assert!(bus.insert(0x108, 0x10, dev.clone()).is_err());
        assert!(bus.insert(0xf8, 0x10, dev.clone()).is_err());
        assert!(bus.insert(0x110, 0, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        bus.insert(0x110, 0x10, dev.clone()).unwrap();
        bus.insert(0xf0, 0x10, dev).unwrap();
    }
}
