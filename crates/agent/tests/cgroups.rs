//! The cgroup v2 driver against a real kernel. These tests need root and a cgroup2 hierarchy at
//! /sys/fs/cgroup offering the cpu, memory and pids controllers. The build machines' v2 hierarchy
//! has none (cgroup v1 owns them), so the tests are `#[ignore]`d and `make e2e` runs them with
//! `--ignored` inside the KVM test VM, where they fail loudly if the controllers are missing.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use agent::runtime::cgroup::{Cgroup, CgroupError, CgroupManager, OomWatcher};
use nix::sys::signal::Signal;
use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources, LinuxResourcesBuilder,
};

const CGROUP2: &str = "/sys/fs/cgroup";
const MIB: i64 = 1 << 20;

/// Why real cgroup v2 controllers cannot be used here, if they cannot.
fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".to_string());
    }
    match statfs(CGROUP2) {
        Ok(fs) if fs.filesystem_type() == CGROUP2_SUPER_MAGIC => {}
        _ => return Some(format!("{CGROUP2} is not a cgroup2 mount")),
    }
    let controllers =
        fs::read_to_string(format!("{CGROUP2}/cgroup.controllers")).unwrap_or_default();
    for wanted in ["cpu", "memory", "pids"] {
        if !controllers.split_whitespace().any(|c| c == wanted) {
            return Some(format!(
                "no {wanted} controller in {CGROUP2}/cgroup.controllers ({controllers:?})"
            ));
        }
    }
    None
}

/// A manager on a fresh root named after the test; everything in it is killed and removed on
/// drop. `None`: skip the test.
struct Root(CgroupManager);

impl Root {
    fn new(test: &str) -> Option<Self> {
        if let Some(why) = unavailable() {
            panic!(
                "these tests need root and cgroup v2 with the cpu, memory and pids controllers: \
                 {why}. Run them in the KVM test VM (make e2e)"
            );
        }
        let root = PathBuf::from(format!(
            "{CGROUP2}/hyperstart-test-{}-{test}",
            std::process::id()
        ));
        Some(Self(CgroupManager::new(root).unwrap()))
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if let Ok(entries) = fs::read_dir(self.0.root()) {
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    let cg = Cgroup::at(entry.path());
                    let _ = cg.kill_all();
                    let _ = cg.remove();
                }
            }
        }
        let _ = fs::remove_dir(self.0.root());
    }
}

fn read(cg: &Cgroup, file: &str) -> String {
    fs::read_to_string(cg.path().join(file))
        .unwrap()
        .trim()
        .to_string()
}

fn events(cg: &Cgroup, key: &str) -> Option<String> {
    read(cg, "cgroup.events")
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ').map(str::to_string))
}

fn sleeper(cg: &Cgroup) -> Child {
    let child = Command::new("sleep").arg("30").spawn().unwrap();
    cg.add_pid(child.id() as i32).unwrap();
    child
}

fn resources(limit: i64, pids: i64, quota: i64) -> LinuxResources {
    LinuxResourcesBuilder::default()
        .memory(LinuxMemoryBuilder::default().limit(limit).build().unwrap())
        .pids(LinuxPidsBuilder::default().limit(pids).build().unwrap())
        .cpu(
            LinuxCpuBuilder::default()
                .shares(1024u64)
                .quota(quota)
                .period(100_000u64)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap()
}

fn process_state(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("State:").map(|s| s.trim().to_string()))
        .unwrap_or_default()
}

#[test]
#[ignore = "needs cgroup v2 controllers: runs in the KVM test VM (make e2e)"]
fn manager_root_and_create_errors() {
    let Some(root) = Root::new("manager") else {
        return;
    };
    let m = &root.0;
    for c in ["cpu", "memory", "pids"] {
        assert!(
            m.controllers().iter().any(|e| e == c),
            "{:?}",
            m.controllers()
        );
    }
    // Opening the same root again is fine.
    let again = CgroupManager::new(m.root().to_path_buf()).unwrap();
    assert_eq!(again.controllers(), m.controllers());

    assert!(matches!(
        m.create("../escape", None),
        Err(CgroupError::InvalidArgument(_))
    ));
    let bad = LinuxResourcesBuilder::default()
        .pids(LinuxPidsBuilder::default().limit(4i64).build().unwrap())
        .memory(LinuxMemoryBuilder::default().limit(-5i64).build().unwrap())
        .build()
        .unwrap();
    assert!(matches!(
        m.create("bad", Some(&bad)),
        Err(CgroupError::InvalidArgument(_))
    ));
    assert!(!m.root().join("bad").exists());

    // A value only the kernel rejects: an invalid argument too, and the cgroup is removed.
    let rejected = LinuxResourcesBuilder::default()
        .unified(HashMap::from([(
            "memory.high".to_string(),
            "lots".to_string(),
        )]))
        .build()
        .unwrap();
    let err = m.create("rejected", Some(&rejected)).unwrap_err();
    assert!(matches!(err, CgroupError::InvalidArgument(_)), "{err}");
    assert!(!m.root().join("rejected").exists());

    let cg = m.create("c", None).unwrap();
    assert!(matches!(
        m.create("c", None),
        Err(CgroupError::AlreadyExists(_))
    ));
    assert_eq!(cg.stats().unwrap().pids.current, 0);
    cg.remove().unwrap();
    assert!(!cg.path().exists());
    cg.remove().unwrap();
}

#[test]
#[ignore = "needs cgroup v2 controllers: runs in the KVM test VM (make e2e)"]
fn limits_stats_update_freeze_kill() {
    let Some(root) = Root::new("limits") else {
        return;
    };
    let cg = root
        .0
        .create("c1", Some(&resources(32 * MIB, 8, 50_000)))
        .unwrap();
    assert_eq!(read(&cg, "memory.max"), (32 * MIB).to_string());
    assert_eq!(read(&cg, "pids.max"), "8");
    assert_eq!(read(&cg, "cpu.max"), "50000 100000");
    assert_eq!(read(&cg, "cpu.weight"), "39");

    let mut child = sleeper(&cg);
    let pid = child.id();
    assert_eq!(cg.procs().unwrap(), vec![pid as i32]);
    let stats = cg.stats().unwrap();
    assert!(stats.pids.current >= 1, "{stats:?}");
    assert_eq!(stats.pids.limit, 8);
    assert_eq!(stats.memory.limit_bytes, 32 << 20);
    assert!(!stats.memory.stat.is_empty(), "{stats:?}");

    // Updates change only what they name.
    let update = LinuxResourcesBuilder::default()
        .pids(LinuxPidsBuilder::default().limit(16i64).build().unwrap())
        .cpu(
            LinuxCpuBuilder::default()
                .period(50_000u64)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    cg.apply(&update).unwrap();
    assert_eq!(read(&cg, "pids.max"), "16");
    assert_eq!(read(&cg, "cpu.max"), "50000 50000");
    assert_eq!(read(&cg, "memory.max"), (32 * MIB).to_string());
    assert_eq!(read(&cg, "cpu.weight"), "39");
    let update = LinuxResourcesBuilder::default()
        .pids(LinuxPidsBuilder::default().limit(-1i64).build().unwrap())
        .memory(LinuxMemoryBuilder::default().limit(-1i64).build().unwrap())
        .build()
        .unwrap();
    cg.apply(&update).unwrap();
    assert_eq!(read(&cg, "pids.max"), "max");
    assert_eq!(read(&cg, "memory.max"), "max");
    assert_eq!(cg.stats().unwrap().memory.limit_bytes, 0);

    cg.freeze(true).unwrap();
    assert_eq!(events(&cg, "frozen").as_deref(), Some("1"));
    eprintln!("frozen sleep: {}", process_state(pid));
    cg.freeze(false).unwrap();
    assert_eq!(events(&cg, "frozen").as_deref(), Some("0"));

    // kill_all thaws a frozen cgroup first.
    cg.freeze(true).unwrap();
    cg.kill_all().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(cg.procs().unwrap().is_empty());
    assert_eq!(read(&cg, "cgroup.freeze"), "0");
    cg.remove().unwrap();
    assert!(!cg.path().exists());
}

#[test]
#[ignore = "needs cgroup v2 controllers: runs in the KVM test VM (make e2e)"]
fn signal_all_keeps_a_paused_cgroup_paused() {
    let Some(root) = Root::new("signal") else {
        return;
    };
    let cg = root.0.create("c", None).unwrap();
    let mut a = sleeper(&cg);
    let mut b = sleeper(&cg);
    assert_eq!(cg.signal_all(Signal::SIGTERM).unwrap(), 2);
    for child in [&mut a, &mut b] {
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    }

    let mut c = sleeper(&cg);
    cg.freeze(true).unwrap();
    assert_eq!(cg.signal_all(Signal::SIGKILL).unwrap(), 1);
    // SIGKILL reaches frozen processes; the cgroup itself stays frozen.
    let status = c.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert_eq!(read(&cg, "cgroup.freeze"), "1");
    cg.freeze(false).unwrap();
    cg.kill_all().unwrap();
    cg.remove().unwrap();
}

#[test]
#[ignore = "needs cgroup v2 controllers: runs in the KVM test VM (make e2e)"]
fn oom_watcher_sees_an_oom_kill() {
    let Some(root) = Root::new("oom") else {
        return;
    };
    // memory+swap == memory: no swap to escape to.
    let r = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(16 * MIB)
                .swap(16 * MIB)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let cg = root.0.create("oom", Some(&r)).unwrap();
    let quiet = root.0.create("quiet", None).unwrap();

    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let watcher = OomWatcher::start(move |key, count| {
        let _ = tx.lock().unwrap().send((key.to_string(), count));
    })
    .unwrap();
    watcher
        .watch(&cg.memory_events_path(), "oom".to_string())
        .unwrap();
    watcher
        .watch(&quiet.memory_events_path(), "quiet".to_string())
        .unwrap();
    assert_eq!(cg.oom_kill_count(), 0);

    // The shell joins the cgroup before it execs dd, whose 64 MiB buffer is filled by read(2).
    let mut child = Command::new("sh")
        .args([
            "-c",
            "read go && exec dd if=/dev/zero of=/dev/null bs=64M count=1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    cg.add_pid(child.id() as i32).unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");

    let (key, count) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(key, "oom");
    assert!(count >= 1);
    assert!(cg.oom_kill_count() >= 1);
    let stats = cg.stats().unwrap();
    assert!(stats.memory.oom_kill_events >= 1, "{stats:?}");
    assert!(stats.memory.oom_events >= 1, "{stats:?}");

    // Removing a watched cgroup is harmless; the watcher goes on.
    watcher.unwatch("oom");
    cg.kill_all().unwrap();
    cg.remove().unwrap();
    quiet.remove().unwrap();
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    assert!(!Path::new(quiet.path()).exists());
    drop(watcher);
}
