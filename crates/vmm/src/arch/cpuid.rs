//! CPUID filtering: start from what KVM supports and describe a topology of `count` single-thread
//! cores, each vCPU with its own APIC id.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_THERMAL: u32 = 0x6;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_ADDR_SIZE: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_EPB: u32 = 1 << 3;
const EDX_HTT: u32 = 1 << 28;

/// Bits needed to number `count` APIC ids.
fn apic_id_shift(count: u8) -> u32 {
    let mut shift = 0;
    while (1u32 << shift) < u32::from(count) {
        shift += 1;
    }
    shift
}

/// Patch one entry for vCPU `index` of `count`.
pub fn patch_entry(e: &mut kvm_cpuid_entry2, index: u8, count: u8) {
    let apic_id = u32::from(index);
    let count32 = u32::from(count);
    match e.function {
        LEAF_FEATURES => {
            e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (count32 << 16);
            // CLFLUSH line size 64 bytes (8 x 8).
            e.ebx = (e.ebx & !0xff00) | (8 << 8);
            e.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // Cores per package - 1 in EAX[31:26]; one thread per cache.
            e.eax =
                (e.eax & 0x03ff_ffff & !(0xfff << 14)) | ((count32.saturating_sub(1) & 0x3f) << 26);
        }
        LEAF_THERMAL => e.ecx &= !ECX_EPB,
        LEAF_PMU => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        LEAF_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
            e.edx = apic_id;
            match e.index {
                0 => {
                    // SMT level: one thread per core.
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                1 => {
                    // Core level: `count` cores.
                    e.eax = apic_id_shift(count);
                    e.ebx = count32;
                    e.ecx = (2 << 8) | 1;
                }
                n => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = n;
                }
            }
        }
        LEAF_AMD_ADDR_SIZE => {
            e.ecx = (apic_id_shift(count) << 12) | (count32.saturating_sub(1) & 0xff);
        }
        LEAF_AMD_TOPOLOGY => {
            e.eax = apic_id;
            e.ebx = apic_id & 0xff;
            e.ecx = 0;
        }
        _ => {}
    }
}

/// The CPUID for vCPU `index` of `count`, derived from KVM's supported CPUID.
pub fn vcpu_cpuid(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        patch_entry(e, index, count);
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_has_apic_id_and_hypervisor_bit() {
        let mut e = entry(1, 0);
        patch_entry(&mut e, 3, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_describes_cores() {
        let mut e = entry(0xb, 1);
        patch_entry(&mut e, 2, 5);
        assert_eq!(e.edx, 2);
        assert_eq!(e.ebx, 5);
        assert_eq!(e.eax, 3);
        let mut e = entry(0xb, 0);
        patch_entry(&mut e, 2, 5);
        assert_eq!(e.ebx, 1);
    }

    #[test]
    fn shift() {
        assert_eq!(apic_id_shift(1), 0);
        assert_eq!(apic_id_shift(2), 1);
        assert_eq!(apic_id_shift(3), 2);
        assert_eq!(apic_id_shift(32), 5);
    }

    #[test]
    fn whole_cpuid_patched() {
        let cpuid = CpuId::from_entries(&[entry(1, 0), entry(0x8000_0008, 0)]).unwrap();
        let out = vcpu_cpuid(&cpuid, 1, 2);
        assert_eq!(out.as_slice()[0].ebx >> 24, 1);
        assert_eq!(out.as_slice()[1].ecx & 0xff, 1);
    }
}
