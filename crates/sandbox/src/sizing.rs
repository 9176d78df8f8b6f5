//! VM size from the pod's resources.
//!
//! - vCPUs = ceil(cpu_quota_us / cpu_period_us) when the pod has a CPU limit (quota > 0; the
//!   period defaults to the CFS default of 100000 us), clamped to `1..=max_vcpus`; otherwise
//!   `default_vcpus`. CPU shares (requests) do not size the VM: a pod's guest can never use
//!   more than its vCPUs, so a request-only pod gets the default.
//! - memory MiB = round_up_2MiB(ceil(memory_limit_bytes / 1 MiB) + overhead_memory_mib) when the
//!   pod has a memory limit (> 0); otherwise round_up_2MiB(default_memory_mib +
//!   overhead_memory_mib). The overhead covers the guest kernel, the agent and page cache, and
//!   the containers' overlay upper layers (tmpfs in guest memory). 2 MiB granularity matches
//!   the huge pages the VMM advises for guest memory.
//!
//! Example: quota 150000 / period 100000 and a 256 MiB limit with the default 64 MiB overhead:
//! 2 vCPUs, 320 MiB.

use crate::config::ManagerConfig;
use crate::error::{Result, SandboxError};
use crate::spec::PodResources;

/// The CFS period when the pod gives a quota without one.
pub const DEFAULT_CPU_PERIOD_US: u64 = 100_000;

/// A VM's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmSize {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
}

const MIB: u64 = 1 << 20;

/// The VM size for `res` under `cfg`'s defaults and limits (see the module documentation).
pub fn vm_size(res: &PodResources, cfg: &ManagerConfig) -> Result<VmSize> {
    let vcpus = match res.cpu_quota_us {
        Some(quota) if quota > 0 => {
            let period = match res.cpu_period_us {
                Some(p) if p > 0 => p,
                _ => DEFAULT_CPU_PERIOD_US,
            };
            let cpus = quota.unsigned_abs().div_ceil(period);
            u8::try_from(cpus.clamp(1, u64::from(cfg.max_vcpus))).unwrap_or(cfg.max_vcpus)
        }
        _ => cfg.default_vcpus,
    };
    let base_mib = match res.memory_limit_bytes {
        Some(limit) if limit > 0 => limit.div_ceil(MIB),
        _ => cfg.default_memory_mib,
    };
    let memory_mib = base_mib
        .checked_add(cfg.overhead_memory_mib)
        .map(|m| m.div_ceil(2) * 2)
        .filter(|m| *m <= vmm::config::MAX_MEMORY_MIB)
        .ok_or_else(|| {
            SandboxError::InvalidArgument(format!(
                "a memory limit of {base_mib} MiB is larger than a VM can have ({} MiB)",
                vmm::config::MAX_MEMORY_MIB
            ))
        })?;
    Ok(VmSize {
        vcpus,
        memory_mib: memory_mib.max(vmm::config::MIN_MEMORY_MIB),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ManagerConfig {
        ManagerConfig::new("/vmm".into(), "/k".into(), "/i".into())
    }

    fn res(quota: Option<i64>, period: Option<u64>, mem: Option<u64>) -> PodResources {
        PodResources {
            cpu_quota_us: quota,
            cpu_period_us: period,
            cpu_shares: Some(1024),
            memory_limit_bytes: mem,
        }
    }

    #[test]
    fn defaults_without_limits() {
        let s = vm_size(&PodResources::default(), &cfg()).unwrap();
        assert_eq!(
            s,
            VmSize {
                vcpus: 1,
                memory_mib: 192
            }
        );
        // Unlimited quota (-1) and a zero limit mean "no limit" too.
        let s = vm_size(&res(Some(-1), Some(100_000), Some(0)), &cfg()).unwrap();
        assert_eq!(
            s,
            VmSize {
                vcpus: 1,
                memory_mib: 192
            }
        );
    }

    #[test]
    fn cpus_round_up_and_clamp() {
        let c = cfg();
        let v = |q, p| vm_size(&res(Some(q), p, None), &c).unwrap().vcpus;
        assert_eq!(v(100_000, Some(100_000)), 1);
        assert_eq!(v(100_001, Some(100_000)), 2);
        assert_eq!(v(150_000, None), 2);
        assert_eq!(v(1, Some(100_000)), 1);
        assert_eq!(v(50_000, Some(10_000)), 5);
        assert_eq!(v(10_000_000, Some(100_000)), 8);
        assert_eq!(v(i64::MAX, Some(1)), 8);
        assert_eq!(v(200_000, Some(0)), 2);
    }

    #[test]
    fn memory_adds_overhead_and_rounds_to_2mib() {
        let c = cfg();
        let m = |bytes| {
            vm_size(&res(None, None, Some(bytes)), &c)
                .unwrap()
                .memory_mib
        };
        assert_eq!(m(256 * MIB), 320);
        assert_eq!(m(256 * MIB + 1), 322);
        assert_eq!(m(MIB / 2), 66);
        assert_eq!(m(3 * MIB), 68);
        assert!(vm_size(&res(None, None, Some(u64::MAX)), &c).is_err());
        let mut small = cfg();
        small.overhead_memory_mib = 0;
        assert_eq!(
            vm_size(&res(None, None, Some(MIB)), &small)
                .unwrap()
                .memory_mib,
            vmm::config::MIN_MEMORY_MIB
        );
    }

    #[test]
    fn documented_example() {
        let s = vm_size(&res(Some(150_000), Some(100_000), Some(256 * MIB)), &cfg()).unwrap();
        assert_eq!(
            s,
            VmSize {
                vcpus: 2,
                memory_mib: 320
            }
        );
    }
}
