//! End-to-end: real guests booted by `hyper-vmm` (run with `--ignored` by hack/run-e2e.sh).

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use e2e::{eventually, pattern_file, sh, TempDir, TestVm, VmSpec};
use protocol::client::BlockTarget;

const BOOT: Duration = Duration::from_secs(90);
const EXIT: Duration = Duration::from_secs(30);

#[test]
#[ignore = "boots a guest: run through hack/run-e2e.sh"]
fn boots_and_answers_ping_over_vsock() {
    let vm = TestVm::start(&VmSpec {
        vcpus: 2,
        ..VmSpec::default()
    });
    let agent = vm.agent(BOOT);
    assert_eq!(agent.ping(0xdead_beef).expect("ping"), 0xdead_beef);
    let v = agent.version().expect("version");
    assert_eq!(v.protocol_version, protocol::PROTOCOL_VERSION);
    assert!(!v.agent_version.is_empty());

    let status = vm.control(serde_json::json!({"op": "status"}));
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["state"], "running");
    let boot_ms = status["boot_ms"]
        .as_u64()
        .expect("boot_ms after the agent answered");
    assert!(boot_ms > 0);
    let log = std::fs::read_to_string(&vm.log).unwrap();
    assert!(log.contains(&format!("boot_ms={boot_ms}")), "{log}");

    let m = vm.control(serde_json::json!({"op": "metrics"}));
    assert_eq!(m["ok"], true, "{m}");
    let touched = m["guest_memory_touched_bytes"].as_u64().unwrap();
    assert!(
        touched > 1 << 20 && touched < 128 << 20,
        "touched {touched}"
    );
    assert!(m["vmm_overhead_bytes"].as_u64().unwrap() > 0);
    assert!(m["exits"]["mmio"].as_u64().unwrap() > 0);
}

#[test]
#[ignore = "boots a guest: run through hack/run-e2e.sh"]
fn boots_an_elf_vmlinux_too() {
    let vmlinux = e2e::artifact("HYPERNETES_KERNEL").with_file_name("vmlinux");
    assert!(vmlinux.exists(), "{} missing", vmlinux.display());
    let vm = TestVm::start(&VmSpec {
        kernel: Some(vmlinux),
        ..VmSpec::default()
    });
    let agent = vm.agent(BOOT);
    assert_eq!(agent.ping(42).expect("ping"), 42);
    assert_eq!(agent.guest_info().expect("guest info").online_cpus, 1);
}

#[test]
#[ignore = "boots a guest: run through hack/run-e2e.sh"]
fn guest_sees_every_vcpu() {
    let vm = TestVm::start(&VmSpec {
        vcpus: 2,
        ..VmSpec::default()
    });
    let agent = vm.agent(BOOT);
    let info = agent.guest_info().expect("guest info");
    assert_eq!(info.online_cpus, 2, "{}", vm.diagnostics());
}

#[test]
#[ignore = "boots a guest: run through hack/run-e2e.sh"]
fn disk_content_is_read_back_by_the_guest() {
    let dir = TempDir::new("disk");
    let img = dir.path().join("data.img");
    let data = pattern_file(&img, 1 << 20, 7, 3);
    let vm = TestVm::start(&VmSpec {
        disks: vec![("data0".into(), img.clone(), true)],
        ..VmSpec::default()
    });
    let agent = vm.agent(BOOT);
    let r = agent
        .read_block(BlockTarget::Serial("data0".into()), 4096, 65536)
        .expect("read_block");
    assert_eq!(r.size_bytes, 1 << 20);
    assert_eq!(r.data, &data[4096..4096 + 65536]);
    // The last bytes, short read at the end.
    let r = agent
        .read_block(BlockTarget::Serial("data0".into()), (1 << 20) - 100, 4096)
        .expect("read_block tail");
    assert_eq!(r.data, &data[(1 << 20) - 100..]);
    // Unknown serial: NotFound, and the agent keeps serving.
    let err = agent
        .read_block(BlockTarget::Serial("nope".into()), 0, 16)
        .expect_err("unknown serial");
    assert_eq!(err.code(), Some(ttrpc::Code::NOT_FOUND), "{err}");
    assert_eq!(agent.ping(1).unwrap(), 1);
    // The VMM counted the guest's reads of the disk.
    let m = vm.control(serde_json::json!({"op": "metrics"}));
    let blk = &m["block"]["data0"];
    assert!(blk["reads"].as_u64().unwrap() >= 2, "{m}");
    assert!(blk["read_bytes"].as_u64().unwrap() >= 65536 + 100, "{m}");
    assert_eq!(blk["writes"], 0, "{m}");
}

fn swap(vm: &TestVm, id: &str, path: &Path) -> serde_json::Value {
    vm.control(serde_json::json!({"op": "update_drive", "id": id, "path": path, "read_only": true}))
}

#[test]
#[ignore = "boots a guest: run through hack/run-e2e.sh"]
fn spare_drive_swapped_while_running() {
    let dir = TempDir::new("spare");
    let vm = TestVm::start(&VmSpec {
        spare_disks: 2,
        ..VmSpec::default()
    });
    let agent = vm.agent(BOOT);
    assert_eq!(
        agent
            .block_size(BlockTarget::Serial("spare0".into()))
            .unwrap(),
        0
    );

    let a = dir.path().join("a.img");
    let a_data = pattern_file(&a, 512 * 1024, 3, 1);
    let r = swap(&vm, "spare0", &a);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["capacity_bytes"], 512 * 1024);
    let size = eventually(Duration::from_secs(10), || {
        match agent.block_size(BlockTarget::Serial("spare0".into())) {
            Ok(s) if s == 512 * 1024 => Some(s),
            _ => None,
        }
    });
    assert_eq!(
        size,
        Some(512 * 1024),
        "guest never saw the new capacity\n{}",
        vm.diagnostics()
    );
    let got = agent
        .read_block(BlockTarget::Serial("spare0".into()), 0, 8192)
        .unwrap();
    assert_eq!(got.data, &a_data[..8192]);

    // A second swap to different content of a different size.
    let b = dir.path().join("b.img");
    let b_data = pattern_file(&b, 1024 * 1024, 5, 2);
    assert_eq!(swap(&vm, "spare0", &b)["ok"], true);
    let size = eventually(Duration::from_secs(10), || {
        match agent.block_size(BlockTarget::Serial("spare0".into())) {
            Ok(s) if s == 1024 * 1024 => Some(s),
            _ => None,
        }
    });
    assert_eq!(size, Some(1024 * 1024));
    let got = agent
        .read_block(BlockTarget::Serial("spare0".into()), 0, 8192)
        .unwrap();
    assert_eq!(
        got.data,
        &b_data[..8192],
        "stale data after the second swap"
    );

    // The other spare is untouched; status reports both.
    assert_eq!(
        agent
            .block_size(BlockTarget::Serial("spare1".into()))
            .unwrap(),
        0
    );
    let st = vm.control(serde_json::json!({"op": "status"}));
    let drives = st["drives"].as_array().unwrap();
    assert_eq!(drives.len(), 2);
    assert_eq!(drives[0]["path"], b.to_str().unwrap());
    // Bad requests: unknown drive, missing file.
    assert_eq!(swap(&vm, "nope", &b)["ok"], false);
    let r = swap(&vm, "spare1", Path::new("/nonexistent.img"));
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("spare1"), "{r}");
}

#[test]
#[ignore = "boots a guest: run through hack/run-e2e.sh"]
fn guest_eth0_pings_the_host_side_of_the_tap() {
    let tap = "hne2etap0";
    let _ = sh(&format!("ip link del {tap} 2>/dev/null || true"));
    sh(&format!(
        "ip tuntap add dev {tap} mode tap vnet_hdr && ip addr add 169.254.77.1/24 dev {tap} && ip link set {tap} up"
    ));
    struct Cleanup(&'static str);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", self.0])
                .status();
        }
    }
    let _cleanup = Cleanup(tap);
    let vm = TestVm::start(&VmSpec {
        nets: vec![(tap.into(), "02:00:00:aa:bb:01".into())],
        ..VmSpec::default()
    });
    let agent = vm.agent(BOOT);
    let mut req = protocol::agent::UpdateInterfaceRequest::new();
    req.name = "eth0".into();
    let mut addr = protocol::agent::IPv4Address::new();
    addr.address = "169.254.77.2".into();
    addr.prefix_len = 24;
    req.ipv4 = Some(addr).into();
    req.up = true;
    agent.update_interface(&req).expect("update_interface");
    let r = agent.ping_host("169.254.77.1", 3, 2000).expect("ping_host");
    assert_eq!(r.transmitted, 3);
    assert!(
        r.received >= 2,
        "received {} of 3\n{}",
        r.received,
        vm.diagnostics()
    );
    // The VMM counted the echo requests out and the replies in.
    let m = vm.control(serde_json::json!({"op": "metrics"}));
    let nic = &m["net"][tap];
    assert!(nic["tx_frames"].as_u64().unwrap() >= 3, "{m}");
    assert!(nic["rx_frames"].as_u64().unwrap() >= 2, "{m}");
}

#[test]
#[ignore = "boots a guest: run through hack/run-e2e.sh"]
fn guest_reboot_ends_the_vmm_with_status_0() {
    let mut vm = TestVm::start(&VmSpec::default());
    let agent = vm.agent(BOOT);
    agent.reboot().expect("reboot");
    let st = vm
        .wait(EXIT)
        .expect("VMM did not exit after the guest rebooted");
    assert_eq!(st.code(), Some(0), "{st:?}\n{}", vm.diagnostics());
    assert!(
        !vm.vsock.exists() && !vm.control.exists(),
        "sockets left behind"
    );
}

#[test]
#[ignore = "boots a guest: run through hack/run-e2e.sh"]
fn guest_panic_ends_the_vmm_non_zero() {
    let mut vm = TestVm::start(&VmSpec::default());
    let agent = vm.agent(BOOT);
    let _ = agent.debug_panic();
    let st = vm
        .wait(EXIT)
        .expect("VMM did not exit after the guest panicked");
    assert_eq!(st.code(), Some(3), "{st:?}\n{}", vm.diagnostics());
    let console = std::fs::read_to_string(&vm.console).unwrap();
    assert!(console.contains("Kernel panic"), "{console}");
}

#[test]
#[ignore = "boots a guest: run through hack/run-e2e.sh"]
fn two_vms_at_once() {
    let a = TestVm::start(&VmSpec {
        cid: 3,
        ..VmSpec::default()
    });
    let b = TestVm::start(&VmSpec {
        cid: 4,
        ..VmSpec::default()
    });
    let (ca, cb) = (a.agent(BOOT), b.agent(BOOT));
    assert_eq!(ca.ping(1).unwrap(), 1);
    assert_eq!(cb.ping(2).unwrap(), 2);
    assert_ne!(a.pid(), b.pid());
}

#[test]
#[ignore = "boots a guest: run through hack/run-e2e.sh"]
fn control_socket_pause_resume_reattach_and_stop() {
    let mut vm = TestVm::start(&VmSpec {
        vcpus: 2,
        ..VmSpec::default()
    });
    let agent = vm.agent(BOOT);
    let r = vm.control(serde_json::json!({"op": "pause"}));
    assert_eq!(r["state"], "paused", "{r}");
    assert_eq!(
        vm.control(serde_json::json!({"op": "status"}))["state"],
        "paused"
    );
    // While paused the guest cannot answer.
    let short = agent.with_timeout(Duration::from_millis(500));
    assert!(short.ping(5).is_err(), "a paused guest answered");
    let r = vm.control(serde_json::json!({"op": "resume"}));
    assert_eq!(r["state"], "running", "{r}");
    // A new connection (a restarted runtime) is served; bad requests get errors.
    let r = vm.control(serde_json::json!({"op": "fly"}));
    assert_eq!(r["ok"], false);
    assert_eq!(agent.ping(6).expect("ping after resume"), 6);
    // Graceful stop: the agent powers the guest off.
    let r = vm.control(serde_json::json!({"op": "stop", "graceful": true, "timeout_ms": 20000}));
    assert_eq!(r["ok"], true, "{r}");
    let st = vm.wait(EXIT).expect("VMM did not stop");
    assert_eq!(st.code(), Some(0), "{}", vm.diagnostics());
    let log = std::fs::read_to_string(&vm.log).unwrap();
    assert!(
        !log.contains("timed out"),
        "graceful stop was forced\n{log}"
    );
}

#[test]
#[ignore = "boots a guest: run through hack/run-e2e.sh"]
fn forced_stop_and_sigterm_leave_nothing_behind() {
    let mut vm = TestVm::start(&VmSpec::default());
    vm.agent(BOOT);
    let r = vm.control(serde_json::json!({"op": "stop"}));
    assert_eq!(r["graceful"], false, "{r}");
    assert_eq!(vm.wait(EXIT).expect("stop").code(), Some(0));
    assert!(!vm.vsock.exists() && !vm.control.exists());

    let mut vm = TestVm::start(&VmSpec::default());
    vm.agent(BOOT);
    // SAFETY-free: plain kill(2) through the shell.
    sh(&format!("kill -TERM {}", vm.pid()));
    let st = vm.wait(EXIT).expect("SIGTERM");
    assert_eq!(st.code(), Some(0), "{st:?} signal {:?}", st.signal());
    assert!(!vm.vsock.exists() && !vm.control.exists());
}

#[test]
#[ignore = "needs the VMM binary: run through hack/run-e2e.sh"]
fn invalid_config_fails_before_any_vm_exists() {
    let dir = TempDir::new("badcfg");
    let cfg = dir.path().join("bad.json");
    std::fs::write(&cfg, r#"{"kernel":"/nonexistent/vmlinux","vcpus":4}"#).unwrap();
    let out = std::process::Command::new(e2e::artifact("HYPERNETES_VMM"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kernel") && err.contains("/nonexistent/vmlinux"),
        "{err}"
    );
    std::fs::write(&cfg, r#"{"kernel":"/bin/true","vcpus":1,"bogus":true}"#).unwrap();
    let out = std::process::Command::new(e2e::artifact("HYPERNETES_VMM"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
}
