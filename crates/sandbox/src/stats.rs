//! Container and pod statistics.
//!
//! Container figures come from the agent (the container's cgroup in the guest). A pod adds
//! what the VM costs on the host: the VMM process's resident memory (`VmRSS`, guest memory the
//! guest touched included) and CPU time, and the VMM's own metrics from its control socket.

use protocol::agent as pb;

/// Counters of one guest network interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceStats {
    /// Name in the guest.
    pub name: String,
    /// Received bytes.
    pub rx_bytes: u64,
    /// Received errors.
    pub rx_errors: u64,
    /// Sent bytes.
    pub tx_bytes: u64,
    /// Send errors.
    pub tx_errors: u64,
}

/// One container's usage, from its cgroup in the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerStats {
    /// The container.
    pub container_id: String,
    /// Unix nanoseconds of the sample.
    pub timestamp_nanos: i64,
    /// Cumulative CPU time.
    pub cpu_usage_nanos: u64,
    /// memory.current.
    pub memory_usage_bytes: u64,
    /// memory.current minus inactive file pages.
    pub memory_working_set_bytes: u64,
    /// Anonymous memory.
    pub memory_rss_bytes: u64,
    /// memory.max; 0: unlimited.
    pub memory_limit_bytes: u64,
    /// OOM kills so far.
    pub oom_kills: u64,
    /// Processes.
    pub pids: u64,
    /// The guest's interfaces (shared by the pod).
    pub interfaces: Vec<InterfaceStats>,
}

impl ContainerStats {
    /// From the agent's answer.
    pub fn from_agent(container_id: &str, r: &pb::StatsContainerResponse) -> Self {
        ContainerStats {
            container_id: container_id.to_owned(),
            // The host's clock: the guest's is not synchronized with it.
            timestamp_nanos: crate::now_nanos(),
            cpu_usage_nanos: r.cpu.usage_usec.saturating_mul(1000),
            memory_usage_bytes: r.memory.usage_bytes,
            memory_working_set_bytes: r.memory.working_set_bytes,
            memory_rss_bytes: r.memory.anon_bytes,
            memory_limit_bytes: r.memory.limit_bytes,
            oom_kills: r.memory.oom_kill_events,
            pids: r.pids.current,
            interfaces: r
                .interfaces
                .iter()
                .map(|i| InterfaceStats {
                    name: i.name.clone(),
                    rx_bytes: i.rx_bytes,
                    rx_errors: i.rx_errors,
                    tx_bytes: i.tx_bytes,
                    tx_errors: i.tx_errors,
                })
                .collect(),
        }
    }
}

/// A pod's usage: its containers plus the VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodStats {
    /// The pod.
    pub pod_id: String,
    /// Unix nanoseconds of the sample.
    pub timestamp_nanos: i64,
    /// Running and created containers (exited ones have no cgroup any more).
    pub containers: Vec<ContainerStats>,
    /// The VMM's pid.
    pub vmm_pid: u32,
    /// The VMM's resident memory (`VmRSS`): guest memory touched plus the VMM's own.
    pub vmm_rss_bytes: u64,
    /// The VMM's CPU time (every vCPU and device thread).
    pub vmm_cpu_usage_nanos: u64,
    /// Guest memory size.
    pub guest_memory_bytes: u64,
    /// Guest memory the guest has touched (from the VMM's metrics).
    pub guest_memory_touched_bytes: u64,
    /// The VMM's memory that is not guest memory (from the VMM's metrics).
    pub vmm_overhead_bytes: u64,
    /// The guest's interfaces.
    pub interfaces: Vec<InterfaceStats>,
}

impl PodStats {
    /// CPU time of the containers together.
    pub fn containers_cpu_usage_nanos(&self) -> u64 {
        self.containers.iter().map(|c| c.cpu_usage_nanos).sum()
    }

    /// Working set of the containers together.
    pub fn containers_working_set_bytes(&self) -> u64 {
        self.containers
            .iter()
            .map(|c| c.memory_working_set_bytes)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_agent_converts_units() {
        let mut r = pb::StatsContainerResponse::new();
        let mut cpu = pb::CpuStats::new();
        cpu.usage_usec = 1500;
        r.cpu = Some(cpu).into();
        let mut mem = pb::MemoryStats::new();
        mem.working_set_bytes = 10;
        mem.anon_bytes = 4;
        r.memory = Some(mem).into();
        let mut i = pb::InterfaceStats::new();
        i.name = "eth0".into();
        i.rx_bytes = 7;
        r.interfaces.push(i);
        r.timestamp_unix_nanos = 99;
        let s = ContainerStats::from_agent("c", &r);
        assert_eq!(s.cpu_usage_nanos, 1_500_000);
        assert_eq!(s.memory_working_set_bytes, 10);
        assert_eq!(s.memory_rss_bytes, 4);
        assert_eq!(s.interfaces[0].rx_bytes, 7);
        assert!(s.timestamp_nanos > 99);
        let p = PodStats {
            containers: vec![s.clone(), s],
            ..PodStats::default()
        };
        assert_eq!(p.containers_cpu_usage_nanos(), 3_000_000);
        assert_eq!(p.containers_working_set_bytes(), 20);
    }
}
