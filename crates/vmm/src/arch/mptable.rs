//! The Intel MultiProcessor table, so a guest without ACPI finds every vCPU and the IOAPIC.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, EBDA_START, IOAPIC_LAST_GSI, IOAPIC_START};

/// MP table errors.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// The table does not fit below 640 KiB.
    #[error("MP table for {0} vCPUs does not fit in the EBDA")]
    TooLarge(u8),
    /// Writing it failed.
    #[error("cannot write the MP table into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

const MPC_SPEC: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const BUS_ID_ISA: u8 = 0;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const IRQ_FLAGS_DEFAULT: u16 = 0;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Build the MP floating pointer and configuration table for `num_cpus` vCPUs, to be placed at
/// `base`. Returns the bytes to write.
pub fn build(num_cpus: u8, base: u64) -> Vec<u8> {
    let ioapic_id = num_cpus.wrapping_add(1);
    let mut table = Vec::with_capacity(1024);
    // Configuration table header; length and checksum patched below.
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&0u16.to_le_bytes()); // length
    table.push(MPC_SPEC);
    table.push(0); // checksum
    table.extend_from_slice(b"HYPERNET"); // OEM id
    table.extend_from_slice(b"HYPER-VMM   "); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&0u16.to_le_bytes()); // entry count, patched
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // reserved
    let mut entries: u16 = 0;
    for cpu in 0..num_cpus {
        table.push(0); // processor entry
        table.push(cpu);
        table.push(APIC_VERSION);
        table.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        table.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        table.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        table.extend_from_slice(&[0u8; 8]);
        entries += 1;
    }
    table.extend_from_slice(&[1, BUS_ID_ISA, b'I', b'S', b'A', b' ', b' ', b' ']);
    entries += 1;
    table.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    table.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries += 1;
    for irq in 0..=IOAPIC_LAST_GSI as u8 {
        table.push(3);
        table.push(INT_TYPE_INT);
        table.extend_from_slice(&IRQ_FLAGS_DEFAULT.to_le_bytes());
        table.extend_from_slice(&[BUS_ID_ISA, irq, ioapic_id, irq]);
        entries += 1;
    }
    for (kind, dest, lint) in [(INT_TYPE_EXTINT, 0u8, 0u8), (INT_TYPE_NMI, 0xff, 1)] {
        table.push(4);
        table.push(kind);
        table.extend_from_slice(&IRQ_FLAGS_DEFAULT.to_le_bytes());
        table.extend_from_slice(&[BUS_ID_ISA, 0, dest, lint]);
        entries += 1;
    }
    let len = table.len() as u16;
    table[4..6].copy_from_slice(&len.to_le_bytes());
    table[34..36].copy_from_slice(&entries.to_le_bytes());
    table[7] = checksum(&table);

    // Floating pointer structure, 16 bytes, pointing right after itself.
    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&((base + 16) as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(MPC_SPEC);
    out.push(0); // checksum
    out.extend_from_slice(&[0u8; 5]); // features: config table present
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    out
}

/// Write the MP table for `num_cpus` vCPUs at the start of the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap<()>, num_cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(num_cpus, EBDA_START);
    if EBDA_START + bytes.len() as u64 > 0xa0000 {
        return Err(MpTableError::TooLarge(num_cpus));
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MpTableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        let t = build(4, EBDA_START);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        let cfg = &t[16..];
        assert_eq!(&cfg[0..4], b"PCMP");
        let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(sum(cfg), 0);
        let count = u16::from_le_bytes([cfg[34], cfg[35]]);
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        // The first processor is the BSP, the second only enabled.
        assert_eq!(cfg[44 + 3], CPU_ENABLED | CPU_BOOTPROCESSOR);
        assert_eq!(cfg[44 + 20 + 3], CPU_ENABLED);
        assert_eq!(cfg[44 + 20 + 1], 1);
    }

    #[test]
    fn max_cpus_fit() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_mptable(&mem, crate::config::MAX_VCPUS).unwrap();
    }
}
