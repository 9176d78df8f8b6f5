//! The README's main job at this stage: boot one pod VM offline with the built-in guest
//! (our kernel + hyperstart), talk to its agent over vsock, read a disk through it, and stop it.

use std::time::{Duration, Instant};

use e2e::{TempDir, TestVm, VmSpec};
use protocol::client::BlockTarget;

fn main() {
    let dir = TempDir::new("demo");
    let img = dir.path().join("hello.img");
    let mut data = b"hello from a pod VM disk\n".to_vec();
    data.resize(4096, 0);
    std::fs::write(&img, &data).expect("write disk image");

    let t0 = Instant::now();
    let mut vm = TestVm::start(&VmSpec {
        vcpus: 2,
        disks: vec![("hello".into(), img, true)],
        ..VmSpec::default()
    });
    let agent = vm.agent(Duration::from_secs(90));
    let ready = t0.elapsed();
    let status = vm.control(serde_json::json!({"op": "status"}));
    let version = agent.version().expect("Version RPC");
    let info = agent.guest_info().expect("GuestInfo RPC");
    let disk = agent
        .read_block(BlockTarget::Serial("hello".into()), 0, 25)
        .expect("ReadBlock RPC");
    let metrics = vm.control(serde_json::json!({"op": "metrics"}));
    println!(
        "pod VM up in {} ms (VMM boot_ms={})",
        ready.as_millis(),
        status["boot_ms"]
    );
    println!(
        "agent: hyperstart {} (protocol {}), guest kernel {}, {} vCPUs, {} MiB",
        version.agent_version,
        version.protocol_version,
        info.kernel_release,
        info.online_cpus,
        info.mem_total_bytes >> 20
    );
    println!(
        "disk 'hello' says: {}",
        String::from_utf8_lossy(&disk.data).trim_end()
    );
    println!(
        "host memory: VMM overhead {} KiB, guest memory touched {} KiB of {} MiB",
        metrics["vmm_overhead_bytes"].as_u64().unwrap_or(0) / 1024,
        metrics["guest_memory_touched_bytes"].as_u64().unwrap_or(0) / 1024,
        metrics["guest_memory_bytes"].as_u64().unwrap_or(0) >> 20
    );
    let r = vm.control(serde_json::json!({"op": "stop", "graceful": true, "timeout_ms": 10000}));
    assert_eq!(r["ok"], true, "{r}");
    let st = vm.wait(Duration::from_secs(30)).expect("VM did not stop");
    println!("pod VM stopped, hyper-vmm exit status {:?}", st.code());
    if !st.success() {
        eprintln!("{}", vm.diagnostics());
        std::process::exit(1);
    }
}
