//! CRI checks shared by the hyperd and shim end-to-end tests.

use std::time::Duration;

use ctl::{cri, Cri};

use crate::servers::block;

/// ContainerStats of a running container reports CPU and memory use, and
/// UpdateContainerResources reaches the container's cgroup (read back inside it with
/// ExecSync): 96 MiB of memory and half a CPU.
pub fn update_and_stats(cri: &Cri, container: &str) {
    let (c, id) = (cri.clone(), container.to_owned());
    let stats = block(async move { c.container_stats(&id).await })
        .unwrap_or_else(|e| panic!("ContainerStats {container}: {e}"));
    let cpu = stats
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map_or(0, |v| v.value);
    let memory = stats
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .map_or(0, |v| v.value);
    assert!(cpu > 0, "ContainerStats without CPU use: {stats:?}");
    assert!(memory > 0, "ContainerStats without memory use: {stats:?}");
    assert_eq!(
        stats.attributes.as_ref().map(|a| a.id.as_str()),
        Some(container),
        "{stats:?}"
    );

    let limit = 96 << 20;
    let linux = cri::LinuxContainerResources {
        memory_limit_in_bytes: limit,
        cpu_quota: 50_000,
        cpu_period: 100_000,
        ..Default::default()
    };
    let (c, id) = (cri.clone(), container.to_owned());
    block(async move { c.update_container_resources(&id, linux).await })
        .unwrap_or_else(|e| panic!("UpdateContainerResources {container}: {e}"));
    let (c, id) = (cri.clone(), container.to_owned());
    // cgroup v2 (the guest, the test VM), else v1 (a v1 host running the containerd
    // reference).
    let cmd = [
        "sh",
        "-c",
        "cat /sys/fs/cgroup/memory.max 2>/dev/null || \
         cat /sys/fs/cgroup/memory/memory.limit_in_bytes; \
         cat /sys/fs/cgroup/cpu.max 2>/dev/null || \
         echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us)",
    ];
    let r = block(async move {
        c.exec_sync(
            &id,
            cmd.iter().map(|s| s.to_string()).collect(),
            Some(Duration::from_secs(60)),
        )
        .await
    })
    .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {container}: {e}"));
    let out = String::from_utf8_lossy(&r.stdout);
    assert_eq!(
        (r.exit_code, out.lines().collect::<Vec<_>>()),
        (0, vec![limit.to_string().as_str(), "50000 100000"]),
        "the container's cgroup after UpdateContainerResources; stderr: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    // An unknown container is NotFound.
    let c = cri.clone();
    let err = block(async move { c.container_stats("no-such-container").await })
        .expect_err("ContainerStats of an unknown container");
    assert!(
        err.is_not_found(),
        "ContainerStats of an unknown container: {err}"
    );
}
