//! The manager against fake `hyper-vmm` scripts: boot failures leave nothing behind, recovery
//! tells live VMMs from dead ones, a VMM's death makes its pod NOTREADY. No KVM needed.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sandbox::layout::Layout;
use sandbox::process::{pids_mentioning, proc_start_time};
use sandbox::record::RECORD_VERSION;
use sandbox::{
    store, ContainerRecord, ContainerState, EventKind, ManagerConfig, PodRecord, PodSpec, PodState,
    Removed, SandboxError, SandboxManager, VmmIdentity,
};

struct Env {
    _dir: tempfile::TempDir,
    cfg: ManagerConfig,
}

/// A state root, artifacts and a fake VMM running `script`.
fn env(script: &str) -> Env {
    // Short paths: the socket paths must fit in 96 bytes.
    let dir = tempfile::Builder::new()
        .prefix("sbx")
        .tempdir_in("/tmp")
        .unwrap();
    let vmm = dir.path().join("hyper-vmm");
    std::fs::write(&vmm, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["kernel", "initrd"] {
        std::fs::write(dir.path().join(f), b"x").unwrap();
    }
    let mut cfg = ManagerConfig::new(vmm, dir.path().join("kernel"), dir.path().join("initrd"));
    cfg.state_root = dir.path().join("s");
    cfg.log_dir = dir.path().join("l");
    cfg.boot_timeout = Duration::from_secs(1);
    Env { _dir: dir, cfg }
}

fn pod_spec(id: &str) -> PodSpec {
    PodSpec {
        id: id.into(),
        name: "n".into(),
        namespace: "default".into(),
        ..PodSpec::default()
    }
}

fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn state_dir_entries(cfg: &ManagerConfig) -> Vec<PathBuf> {
    std::fs::read_dir(&cfg.state_root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect()
}

#[test]
fn a_vmm_that_exits_fails_the_boot_and_leaves_nothing() {
    let e = env("echo boom >&2; exit 1");
    let m = SandboxManager::new(e.cfg.clone()).unwrap();
    let err = m.run_pod(pod_spec("p1")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, SandboxError::Boot { .. }), "{text}");
    assert!(text.contains("status 1"), "{text}");
    assert!(text.contains("boom"), "{text}");
    assert!(state_dir_entries(&e.cfg).is_empty());
    assert!(m.list_pods().is_empty());
    assert!(matches!(
        m.pod_status("p1"),
        Err(SandboxError::PodNotFound(_))
    ));
    // The id is free again.
    assert!(m.run_pod(pod_spec("p1")).is_err());
}

#[test]
fn a_boot_timeout_kills_the_vmm() {
    let e = env("while :; do sleep 1; done");
    let m = SandboxManager::new(e.cfg.clone()).unwrap();
    let start = Instant::now();
    let err = m.run_pod(pod_spec("p1")).unwrap_err();
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(15));
    let config = Layout::new(&e.cfg.state_root, &e.cfg.log_dir).vm_config("p1");
    assert!(pids_mentioning(&config.display().to_string()).is_empty());
    assert!(state_dir_entries(&e.cfg).is_empty());
    // The VMM log stays for diagnosis.
    assert!(e.cfg.log_dir.join("p1.vmm.log").exists());
}

#[test]
fn invalid_requests_are_refused_before_anything_starts() {
    let e = env("exit 0");
    let m = SandboxManager::new(e.cfg.clone()).unwrap();
    for bad in ["", "../x", "a/b"] {
        assert!(matches!(
            m.run_pod(pod_spec(bad)),
            Err(SandboxError::InvalidArgument(_))
        ));
    }
    // Too long for the socket paths under a long state root.
    let mut long_root = e.cfg.clone();
    long_root.state_root = e.cfg.state_root.join("a-rather-long-directory-name");
    let m2 = SandboxManager::new(long_root).unwrap();
    assert!(matches!(
        m2.run_pod(pod_spec(&"x".repeat(64))),
        Err(SandboxError::InvalidArgument(_))
    ));
    drop(m2);
    std::fs::remove_dir(e.cfg.state_root.join("a-rather-long-directory-name")).unwrap();
    assert_eq!(m.remove_pod("nope").unwrap(), Removed::Unknown);
    assert!(matches!(
        m.stop_pod("nope", Duration::ZERO),
        Err(SandboxError::PodNotFound(_))
    ));
    assert_eq!(m.remove_container("nope").unwrap(), Removed::Unknown);
    assert!(m.container_status("nope").is_err());
    assert!(state_dir_entries(&e.cfg).is_empty());
}

fn record(id: &str, state: PodState, vmm: Option<VmmIdentity>) -> PodRecord {
    PodRecord {
        version: RECORD_VERSION,
        spec: pod_spec(id),
        state,
        created_at_nanos: 1,
        vcpus: 1,
        memory_mib: 192,
        vmm,
        namespaces: None,
        reason: String::new(),
        message: String::new(),
    }
}

fn container(id: &str, pod: &str, state: ContainerState) -> ContainerRecord {
    ContainerRecord {
        version: RECORD_VERSION,
        id: id.into(),
        pod_id: pod.into(),
        name: id.into(),
        attempt: 0,
        image_ref: "busybox".into(),
        image_id: "sha256:1".into(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        log_path: None,
        tty: false,
        stdin: false,
        state,
        created_at_nanos: 2,
        started_at_nanos: 3,
        finished_at_nanos: 0,
        exit_code: None,
        signal: 0,
        oom_killed: false,
        reason: String::new(),
        message: String::new(),
        rootfs_disk: "/nonexistent.ext4".into(),
        drive: 0,
        guest_pid: 10,
        mounts: vec![],
        process: serde_json::json!({"args": ["sleep", "1"]}),
        stop_signal: 15,
    }
}

fn write_pod(layout: &Layout, rec: &PodRecord, containers: &[ContainerRecord]) {
    std::fs::create_dir_all(layout.containers_dir(rec.id())).unwrap();
    store::write_json(&layout.pod_record(rec.id()), rec).unwrap();
    for c in containers {
        store::write_json(&layout.container_record(rec.id(), &c.id), c).unwrap();
    }
}

/// Starts the fake VMM the way the manager would, for pod `id`. The manager under test reaps
/// it (its supervisor waits for the pid, which is this process's child).
#[allow(clippy::zombie_processes)]
fn start_fake(cfg: &ManagerConfig, layout: &Layout, id: &str) -> VmmIdentity {
    let child = std::process::Command::new(&cfg.vmm_binary)
        .arg("--config")
        .arg(layout.vm_config(id))
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = child.id();
    let start_time = proc_start_time(pid).unwrap();
    // Wait until the shell has exec'd (the command line is then the script's).
    let needle = layout.vm_config(id).display().to_string();
    eventually(Duration::from_secs(10), || {
        (!pids_mentioning(&needle).is_empty()).then_some(())
    })
    .expect("fake VMM started");
    VmmIdentity { pid, start_time }
}

#[test]
fn recovery_tells_live_vmms_from_dead_ones() {
    let e = env("while :; do sleep 1; done");
    let layout = Layout::new(&e.cfg.state_root, &e.cfg.log_dir);
    std::fs::create_dir_all(&e.cfg.state_root).unwrap();

    // A pod whose VMM died while no manager ran.
    let dead = VmmIdentity {
        pid: u32::MAX / 2,
        start_time: 1,
    };
    write_pod(
        &layout,
        &record("lost", PodState::Ready, Some(dead)),
        &[
            container("c-run", "lost", ContainerState::Running),
            container("c-new", "lost", ContainerState::Created),
        ],
    );
    // A pod caught in the middle of its creation.
    write_pod(&layout, &record("half", PodState::Creating, None), &[]);
    // A pod whose VMM still runs.
    let live = start_fake(&e.cfg, &layout, "live");
    write_pod(
        &layout,
        &record("live", PodState::Ready, Some(live)),
        &[container("c-live", "live", ContainerState::Running)],
    );
    // Something that is not a pod.
    std::fs::create_dir(e.cfg.state_root.join("not a pod")).unwrap();

    let m = SandboxManager::new(e.cfg.clone()).unwrap();
    let events = m.subscribe();
    let report = m.recover().unwrap();
    assert_eq!(report.lost, ["lost"]);
    assert_eq!(report.cleaned, ["half"]);
    assert_eq!(report.reattached, ["live"]);
    assert_eq!(report.unreadable.len(), 1);
    assert!(!layout.pod_dir("half").exists());

    let lost = m.pod_status("lost").unwrap();
    assert_eq!(
        (lost.state, lost.reason.as_str()),
        (PodState::NotReady, "VMM exited")
    );
    for cid in ["c-run", "c-new"] {
        let c = m.container_status(cid).unwrap();
        assert_eq!(c.state, ContainerState::Exited);
        assert_eq!((c.exit_code, c.reason.as_str()), (Some(255), "VMM exited"));
    }
    // Persisted, not only in memory.
    let on_disk: ContainerRecord = store::read_json(&layout.container_record("lost", "c-run"))
        .unwrap()
        .unwrap();
    assert_eq!(on_disk.state, ContainerState::Exited);

    let live_rec = m.pod_status("live").unwrap();
    assert_eq!(live_rec.state, PodState::Ready);
    assert_eq!(live_rec.vmm_pid(), Some(live.pid));
    assert_eq!(
        m.container_status("c-live").unwrap().state,
        ContainerState::Running
    );

    // The VMM dies: the supervisor notices.
    // SAFETY: kill(2) on the fake VMM this test started (still our unreaped child).
    unsafe {
        libc::kill(live.pid as i32, libc::SIGKILL);
    }
    let c = eventually(Duration::from_secs(10), || {
        let c = m.container_status("c-live").ok()?;
        (c.state == ContainerState::Exited).then_some(c)
    })
    .expect("container marked exited");
    assert_eq!((c.exit_code, c.reason.as_str()), (Some(255), "VMM exited"));
    let p = m.pod_status("live").unwrap();
    assert_eq!(p.state, PodState::NotReady);
    assert!(p.message.contains("signal 9"), "{}", p.message);
    let seen: Vec<_> = eventually(Duration::from_secs(5), || {
        let all: Vec<_> = events.try_iter().collect();
        (!all.is_empty()).then_some(all)
    })
    .unwrap_or_default();
    assert!(
        seen.iter()
            .any(|e| e.container_id.as_deref() == Some("c-live") && e.kind == EventKind::Stopped),
        "{seen:?}"
    );
    assert!(!layout.vsock("live").exists() && !layout.control("live").exists());

    // Stop is idempotent on a dead pod; remove clears everything.
    m.stop_pod("live", Duration::ZERO).unwrap();
    assert_eq!(m.remove_pod("live").unwrap(), Removed::Removed);
    assert_eq!(m.remove_pod("live").unwrap(), Removed::Unknown);
    assert!(!layout.pod_dir("live").exists());
    assert!(m.container_status("c-live").is_err());
    assert_eq!(m.remove_pod("lost").unwrap(), Removed::Removed);
    assert!(m.list_pods().is_empty());

    // Dropping the manager joins its threads quickly.
    let t = Instant::now();
    drop(m);
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
}

#[test]
fn a_restarted_manager_leaves_a_live_vmm_running() {
    let e = env("while :; do sleep 1; done");
    let layout = Layout::new(&e.cfg.state_root, &e.cfg.log_dir);
    std::fs::create_dir_all(&e.cfg.state_root).unwrap();
    let live = start_fake(&e.cfg, &layout, "p");
    write_pod(&layout, &record("p", PodState::Ready, Some(live)), &[]);

    let first = SandboxManager::new(e.cfg.clone()).unwrap();
    assert_eq!(first.recover().unwrap().reattached, ["p"]);
    drop(first);
    // Still running after the first manager is gone; a second one takes over.
    assert!(proc_start_time(live.pid).is_some());
    let second = SandboxManager::new(e.cfg.clone()).unwrap();
    assert_eq!(second.recover().unwrap().reattached, ["p"]);
    // remove_pod kills the VMM (there is no control socket: straight to SIGKILL).
    assert_eq!(second.remove_pod("p").unwrap(), Removed::Removed);
    assert!(pids_mentioning(&layout.vm_config("p").display().to_string()).is_empty());
    assert!(!layout.pod_dir("p").exists());
}
