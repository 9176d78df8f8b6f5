//! The boot GDT.

/// Build a GDT entry from flags, base and limit (Intel SDM vol. 3, 3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Selector of the code segment.
pub const CODE_SELECTOR: u16 = 1 << 3;
/// Selector of the data segment.
pub const DATA_SELECTOR: u16 = 2 << 3;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 3 << 3;

/// Convert a GDT entry into the KVM segment register it describes.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_bindings::kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = (((entry >> 32) & 0x000f_0000) | (entry & 0x0000_ffff)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_bindings::kvm_segment {
        base,
        // A granular segment's limit counts 4 KiB pages.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_present_executable() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(seg.selector, CODE_SELECTOR);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.base, 0);
    }

    #[test]
    fn data_segment_is_writable() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!(seg.type_, 0x3);
        assert_eq!(seg.db, 1);
        assert_eq!(seg.l, 0);
    }

    #[test]
    fn null_entry_is_unusable() {
        assert_eq!(kvm_segment_from_gdt(BOOT_GDT[0], 0).unusable, 1);
    }
}
