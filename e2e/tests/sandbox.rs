//! End-to-end: the sandbox manager runs pods as real VMs (hyper-vmm + guest kernel + agent)
//! inside the KVM test VM (run with `--ignored` by hack/run-e2e.sh). Few boots: one pod for
//! the lifecycle, logs, exec, restart and VMM-death cases, three concurrent pods for start and
//! stop, and one failed boot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::{artifact, eventually, TempDir};
use sandbox::process::pids_mentioning;
use sandbox::{
    ContainerSpec, ContainerState, Dns, EventKind, FileToCopy, ManagerConfig, PodResources,
    PodSpec, PodState, Removed, SandboxError, SandboxManager,
};

const APPLETS: &[&str] = &["sh", "echo", "cat", "sleep", "hostname", "true"];

fn rootfs_disk(dir: &Path) -> PathBuf {
    e2e::busybox_rootfs_disk(dir, APPLETS)
}

fn config(dir: &Path) -> ManagerConfig {
    let mut cfg = ManagerConfig::new(
        artifact("HYPERNETES_VMM"),
        artifact("HYPERNETES_KERNEL"),
        artifact("HYPERNETES_INITRD"),
    );
    cfg.state_root = dir.join("s");
    cfg.log_dir = dir.join("l");
    cfg.boot_timeout = Duration::from_secs(90);
    cfg.max_vcpus = 2;
    cfg
}

fn pod(id: &str) -> PodSpec {
    PodSpec {
        id: id.into(),
        name: format!("{id}-name"),
        namespace: "default".into(),
        uid: format!("uid-{id}"),
        ..PodSpec::default()
    }
}

fn oci_spec(args: &[&str]) -> Vec<u8> {
    let args = serde_json::to_string(args).unwrap();
    format!(
        r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs","readonly":false}},
        "process":{{"args":{args},"cwd":"/","env":["PATH=/bin"],"user":{{"uid":0,"gid":0}}}}}}"#
    )
    .into_bytes()
}

fn container(id: &str, disk: &Path, args: &[&str], log: Option<PathBuf>) -> ContainerSpec {
    ContainerSpec {
        id: id.into(),
        name: id.into(),
        image_ref: "busybox:test".into(),
        image_id: "sha256:busybox".into(),
        rootfs_disk: disk.to_path_buf(),
        oci_spec_json: oci_spec(args),
        log_path: log,
        labels: BTreeMap::from([("app".to_string(), id.to_string())]),
        ..ContainerSpec::default()
    }
}

fn cmd(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn wait_exited(m: &SandboxManager, id: &str) -> sandbox::ContainerRecord {
    eventually(Duration::from_secs(60), || {
        let c = m.container_status(id).ok()?;
        (c.state == ContainerState::Exited).then_some(c)
    })
    .unwrap_or_else(|| panic!("{id} did not exit: {:?}", m.container_status(id)))
}

/// Nothing of the pod is left: no process, no socket, no state directory.
fn assert_gone(cfg: &ManagerConfig, id: &str) {
    let dir = cfg.state_root.join(id);
    assert!(!dir.exists(), "{} still exists", dir.display());
    let vm_json = dir.join("vm.json").display().to_string();
    assert!(
        pids_mentioning(&vm_json).is_empty(),
        "a hyper-vmm of {id} still runs"
    );
}

/// The CRI log lines as (stream, tag, text), checking the timestamps.
fn cri_lines(path: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|l| {
            let parts: Vec<&str> = l.splitn(4, ' ').collect();
            assert_eq!(parts.len(), 4, "{l:?}");
            let ts = parts[0];
            assert!(
                ts.len() >= 20 && ts.ends_with('Z') && &ts[10..11] == "T",
                "timestamp {ts:?}"
            );
            (parts[1].into(), parts[2].into(), parts[3].into())
        })
        .collect()
}

#[test]
#[ignore = "boots a guest: run through hack/run-e2e.sh"]
fn pod_lifecycle_logs_exec_restart_and_vmm_death() {
    let dir = TempDir::new("sbx");
    let disk = rootfs_disk(dir.path());
    let cfg = config(dir.path());
    let m = SandboxManager::new(cfg.clone()).unwrap();
    assert_eq!(m.recover().unwrap(), Default::default());
    let events = m.subscribe();

    let t = Instant::now();
    let spec = PodSpec {
        hostname: "pod1".into(),
        dns: Some(Dns {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        resources: PodResources {
            cpu_quota_us: Some(150_000),
            cpu_period_us: Some(100_000),
            cpu_shares: None,
            memory_limit_bytes: Some(64 << 20),
        },
        ..pod("p1")
    };
    let rec = m.run_pod(spec).unwrap();
    eprintln!("run_pod: {:?}", t.elapsed());
    assert_eq!(rec.state, PodState::Ready);
    assert_eq!((rec.vcpus, rec.memory_mib), (2, 128));
    let vmm_pid = rec.vmm_pid().unwrap();
    assert_eq!(m.list_pods().len(), 1);
    assert_eq!(
        events.recv_timeout(Duration::from_secs(5)).unwrap().kind,
        EventKind::Created
    );

    // A container that writes to both streams and fails: its log, its exit.
    let log1 = dir.path().join("logs/c1.log");
    let c1 = m
        .create_container(
            "p1",
            container(
                "c1",
                &disk,
                &["sh", "-c", "echo out; echo err >&2; exit 3"],
                Some(log1.clone()),
            ),
        )
        .unwrap();
    assert_eq!(c1.state, ContainerState::Created);
    m.start_container("c1").unwrap();
    let c1 = wait_exited(&m, "c1");
    assert_eq!((c1.exit_code, c1.reason.as_str()), (Some(3), "Error"));
    assert!(c1.finished_at_nanos >= c1.started_at_nanos && c1.started_at_nanos > 0);
    let lines = cri_lines(&log1);
    assert!(
        lines.contains(&("stdout".into(), "F".into(), "out".into())),
        "{lines:?}"
    );
    assert!(
        lines.contains(&("stderr".into(), "F".into(), "err".into())),
        "{lines:?}"
    );

    // A long-running container with a copied file; exec into it.
    let greeting = dir.path().join("greeting");
    std::fs::write(&greeting, "hello\n").unwrap();
    let sleeper_log = dir.path().join("logs/sleeper.log");
    let mut sleeper = container(
        "sleeper",
        &disk,
        &["sleep", "600"],
        Some(sleeper_log.clone()),
    );
    sleeper.files = vec![FileToCopy {
        guest_relative_path: "greeting".into(),
        host_source: greeting,
        mode: None,
        read_only: true,
        container_path: "/etc/greeting".into(),
    }];
    let s = m.create_container("p1", sleeper).unwrap();
    assert_eq!(s.drive, c1.drive, "containers of one image share a drive");
    m.start_container("sleeper").unwrap();
    assert_eq!(
        m.container_status("sleeper").unwrap().state,
        ContainerState::Running
    );
    let r = m
        .exec_sync(
            "sleeper",
            &cmd(&["sh", "-c", "echo hi; echo e >&2; exit 2"]),
            Some(Duration::from_secs(60)),
        )
        .unwrap();
    assert_eq!(
        (r.exit_code, r.stdout.as_slice(), r.stderr.as_slice()),
        (2, &b"hi\n"[..], &b"e\n"[..])
    );
    let r = m
        .exec_sync(
            "sleeper",
            &cmd(&["sh", "-c", "hostname; cat /etc/greeting /etc/resolv.conf"]),
            None,
        )
        .unwrap();
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.starts_with("pod1\nhello\n"), "{out}");
    assert!(out.contains("nameserver 10.96.0.10"), "{out}");
    assert!(out.contains("options ndots:5"), "{out}");
    let t = Instant::now();
    let e = m
        .exec_sync(
            "sleeper",
            &cmd(&["sleep", "100"]),
            Some(Duration::from_secs(2)),
        )
        .unwrap_err();
    assert!(matches!(e, SandboxError::ExecTimeout { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());

    // Log rotation: the file was renamed away, reopening creates it again.
    std::fs::rename(&sleeper_log, dir.path().join("logs/sleeper.log.1")).unwrap();
    m.reopen_log("sleeper").unwrap();
    assert!(sleeper_log.exists());
    assert!(m.reopen_log("c1").is_err(), "c1 is not running");

    // Resources, stats, with the VM's cost.
    m.update_container_resources("sleeper", br#"{"memory":{"limit":33554432}}"#)
        .unwrap();
    let cs = m.container_stats("sleeper").unwrap();
    assert!(cs.pids >= 1, "{cs:?}");
    assert_eq!(cs.memory_limit_bytes, 32 << 20, "{cs:?}");
    let ps = m.pod_stats("p1").unwrap();
    assert_eq!(ps.vmm_pid, vmm_pid);
    assert!(ps.vmm_rss_bytes > 1 << 20, "{ps:?}");
    assert_eq!(ps.guest_memory_bytes, 128 << 20);
    assert!(ps.guest_memory_touched_bytes > 0);
    assert!(!ps.containers.is_empty());

    assert_eq!(m.remove_container("c1").unwrap(), Removed::Removed);
    assert_eq!(m.remove_container("c1").unwrap(), Removed::Unknown);
    assert!(m.container_status("c1").is_err());

    // "hyperd restarts": the first manager goes away without stopping anything.
    drop(events);
    drop(m);
    let m = SandboxManager::new(cfg.clone()).unwrap();
    let report = m.recover().unwrap();
    assert_eq!(report.reattached, ["p1"], "{report:?}");
    let events = m.subscribe();
    assert_eq!(m.pod_status("p1").unwrap().vmm_pid(), Some(vmm_pid));
    assert_eq!(
        m.container_status("sleeper").unwrap().state,
        ContainerState::Running
    );
    let r = m
        .exec_sync("sleeper", &cmd(&["echo", "still here"]), None)
        .unwrap();
    assert_eq!(
        (r.exit_code, r.stdout.as_slice()),
        (0, &b"still here\n"[..])
    );
    // Logs work after the restart too.
    let log2 = dir.path().join("logs/c2.log");
    m.create_container(
        "p1",
        container(
            "c2",
            &disk,
            &["sh", "-c", "echo after; exit 0"],
            Some(log2.clone()),
        ),
    )
    .unwrap();
    m.start_container("c2").unwrap();
    let c2 = wait_exited(&m, "c2");
    assert_eq!((c2.exit_code, c2.reason.as_str()), (Some(0), "Completed"));
    assert_eq!(
        cri_lines(&log2),
        [("stdout".to_string(), "F".to_string(), "after".to_string())]
    );

    // The VMM dies.
    // SAFETY: kill(2) of the pod's VMM, a process this test's manager started.
    assert_eq!(unsafe { libc::kill(vmm_pid as i32, libc::SIGKILL) }, 0);
    let s = wait_exited(&m, "sleeper");
    assert_eq!((s.exit_code, s.reason.as_str()), (Some(255), "VMM exited"));
    let p = m.pod_status("p1").unwrap();
    assert_eq!(p.state, PodState::NotReady);
    let seen: Vec<_> = eventually(Duration::from_secs(5), || {
        let v: Vec<_> = events.try_iter().collect();
        (!v.is_empty()).then_some(v)
    })
    .unwrap_or_default();
    assert!(
        seen.iter()
            .any(|e| e.container_id.as_deref() == Some("sleeper") && e.kind == EventKind::Stopped),
        "{seen:?}"
    );
    assert!(!cfg.state_root.join("p1/v.sock").exists());
    assert!(!cfg.state_root.join("p1/c.sock").exists());

    m.stop_pod("p1", Duration::from_secs(1)).unwrap();
    assert_eq!(m.remove_pod("p1").unwrap(), Removed::Removed);
    assert_gone(&cfg, "p1");
    assert_eq!(m.remove_pod("p1").unwrap(), Removed::Unknown);
    assert!(m.list_pods().is_empty() && m.list_containers(None).is_empty());
}

#[test]
#[ignore = "boots a guest: run through hack/run-e2e.sh"]
fn three_pods_start_concurrently_and_stop_cleanly() {
    let dir = TempDir::new("sbx3");
    let disk = rootfs_disk(dir.path());
    let cfg = config(dir.path());
    let m = SandboxManager::new(cfg.clone()).unwrap();
    // HYPERNETES_SANDBOX_PODS=10 for a heavier run.
    let n: usize = std::env::var("HYPERNETES_SANDBOX_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let names: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
    let ids: Vec<&str> = names.iter().map(String::as_str).collect();

    let t = Instant::now();
    let started: Vec<_> = ids
        .iter()
        .map(|id| {
            let m = Arc::clone(&m);
            let id = id.to_string();
            std::thread::spawn(move || m.run_pod(pod(&id)))
        })
        .collect();
    let recs: Vec<_> = started
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    eprintln!("{n} pods in {:?}", t.elapsed());
    let mut pids: Vec<u32> = recs.iter().map(|r| r.vmm_pid().unwrap()).collect();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), n);
    assert!(recs.iter().all(|r| r.state == PodState::Ready));

    // A quick container in each, a stubborn one in the first (sleep as PID 1 ignores
    // SIGTERM: the stop escalates to SIGKILL).
    for &id in &ids {
        let cid = format!("{id}-c");
        m.create_container(id, container(&cid, &disk, &["true"], None))
            .unwrap();
        m.start_container(&cid).unwrap();
    }
    m.create_container("p0", container("p0-sleep", &disk, &["sleep", "600"], None))
        .unwrap();
    m.start_container("p0-sleep").unwrap();
    for &id in &ids {
        let c = wait_exited(&m, &format!("{id}-c"));
        assert_eq!((c.exit_code, c.reason.as_str()), (Some(0), "Completed"));
    }

    let stops: Vec<_> = ids
        .iter()
        .map(|id| {
            let m = Arc::clone(&m);
            let id = id.to_string();
            std::thread::spawn(move || m.stop_pod(&id, Duration::from_secs(2)))
        })
        .collect();
    for h in stops {
        h.join().unwrap().unwrap();
    }
    let s = m.container_status("p0-sleep").unwrap();
    assert_eq!((s.state, s.exit_code), (ContainerState::Exited, Some(137)));
    for &id in &ids {
        let p = m.pod_status(id).unwrap();
        assert_eq!(p.state, PodState::NotReady);
        assert_eq!(p.vmm_pid(), None);
        let vm_json = cfg
            .state_root
            .join(id)
            .join("vm.json")
            .display()
            .to_string();
        assert!(
            pids_mentioning(&vm_json).is_empty(),
            "{id}'s VMM still runs"
        );
        for sock in ["v.sock", "c.sock"] {
            assert!(!cfg.state_root.join(id).join(sock).exists());
        }
        // Stop is idempotent.
        m.stop_pod(id, Duration::ZERO).unwrap();
    }
    for &id in &ids {
        assert_eq!(m.remove_pod(id).unwrap(), Removed::Removed);
        assert_gone(&cfg, id);
    }
    assert_eq!(std::fs::read_dir(&cfg.state_root).unwrap().count(), 0);
}

#[test]
#[ignore = "boots a guest: run through hack/run-e2e.sh"]
fn a_failed_boot_leaves_nothing_behind() {
    let dir = TempDir::new("sbxf");
    let mut cfg = config(dir.path());
    let junk = dir.path().join("junk-kernel");
    std::fs::write(&junk, vec![0u8; 4096]).unwrap();
    cfg.kernel = junk;
    let m = SandboxManager::new(cfg.clone()).unwrap();
    let e = m.run_pod(pod("bad")).unwrap_err();
    assert!(matches!(e, SandboxError::Boot { .. }), "{e}");
    eprintln!("{e}");
    assert_gone(&cfg, "bad");
    assert_eq!(std::fs::read_dir(&cfg.state_root).unwrap().count(), 0);
    assert!(m.list_pods().is_empty());
}
