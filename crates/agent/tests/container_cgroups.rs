//! Containers with cgroup v2 limits, through a host-mode agent started with `--cgroup-root`.
//!
//! These need cgroup v2 *controllers*: the build machines' v2 hierarchy has none (cgroup v1
//! owns them), so the tests are `#[ignore]`d here and `make e2e` runs them (`--ignored`) inside
//! the KVM test VM, whose kernel has a full cgroup2 at /sys/fs/cgroup. Needs root.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use protocol::agent as pb;
use support::*;
use ttrpc::Code;

fn cgroup_agent(tag: &str) -> (Agent, String) {
    let root = format!(
        "/sys/fs/cgroup/hyperstart-test-{}-{tag}",
        std::process::id()
    );
    let ctl = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    assert!(
        ctl.contains("memory") && ctl.contains("pids") && ctl.contains("cpu"),
        "no cgroup v2 controllers here ({ctl:?}): run through `make e2e`"
    );
    (Agent::start(tag, &["--cgroup-root", &root]), root)
}

fn limited(args: &[&str], resources: &str) -> String {
    spec_full(
        &process(args, ""),
        &format!(r#""linux":{{"resources":{resources}}}"#),
    )
}

#[test]
#[ignore = "needs cgroup v2 controllers: runs in the KVM test VM (make e2e)"]
fn memory_limit_is_enforced_and_reported_as_oom() {
    let (a, root) = cgroup_agent("oom");
    let before = a.events(0).last_seq;
    // dd allocates a 64 MiB buffer and touches it: over a 16 MiB limit it is OOM-killed.
    a.create(
        "oom",
        &limited(
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
            r#"{"memory":{"limit":16777216,"swap":16777216}}"#,
        ),
    );
    assert_eq!(
        std::fs::read_to_string(format!("{root}/oom/memory.max"))
            .unwrap()
            .trim(),
        "16777216"
    );
    a.client.start_container("oom").unwrap();
    let exit = a.client.wait_process("oom", "").unwrap();
    assert_eq!(exit.signal, 9, "{exit:?}");
    assert!(exit.oom_killed, "{exit:?}");
    let stats = a.stats("oom");
    assert!(stats.memory.oom_kill_events >= 1);
    assert_eq!(stats.memory.limit_bytes, 16 << 20);
    // The OOM event and the exit with oom_killed reach the event stream.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = a.events(before);
        let oom = ev.events.iter().any(|e| {
            e.type_.enum_value() == Ok(pb::EventType::EVENT_OOM) && e.container_id == "oom"
        });
        let exited = ev
            .events
            .iter()
            .any(|e| e.type_.enum_value() == Ok(pb::EventType::EVENT_EXITED) && e.oom_killed);
        if oom && exited {
            break;
        }
        assert!(Instant::now() < deadline, "no OOM events: {:?}", ev.events);
        std::thread::sleep(Duration::from_millis(100));
    }
    a.client.remove_container("oom").unwrap();
    assert!(!Path::new(&format!("{root}/oom")).exists());
}

#[test]
#[ignore = "needs cgroup v2 controllers: runs in the KVM test VM (make e2e)"]
fn pids_limit_update_and_pause() {
    let (a, root) = cgroup_agent("pids");
    a.create("p", &limited(&["sleep", "60"], r#"{"pids":{"limit":4}}"#));
    a.client.start_container("p").unwrap();
    // An exec'd process joins the container's cgroup: its forks count against the limit.
    a.exec(
        "p",
        "forks",
        &process(
            &[
                "sh",
                "-c",
                "for i in 1 2 3 4 5 6 7 8; do sleep 30 & done; wait",
            ],
            "",
        ),
    )
    .unwrap();
    let err = a.read_until_stderr_of("p", "forks", "fork");
    assert!(
        err.contains("can't fork") || err.contains("Resource temporarily"),
        "{err}"
    );
    let stats = a.stats("p");
    assert_eq!(stats.pids.limit, 4);
    assert!(
        stats.pids.current <= 4 && stats.pids.current >= 2,
        "{:?}",
        stats.pids
    );
    // UpdateContainer raises the limit.
    let mut up = pb::UpdateContainerRequest::new();
    up.container_id = "p".into();
    up.resources_json = br#"{"pids":{"limit":64},"cpu":{"quota":50000,"period":100000}}"#.to_vec();
    a.raw().update_container(ctx(), &up).unwrap();
    assert_eq!(a.stats("p").pids.limit, 64);
    assert_eq!(
        std::fs::read_to_string(format!("{root}/p/cpu.max"))
            .unwrap()
            .trim(),
        "50000 100000"
    );
    up.resources_json = br#"{"pids":{"limit":"many"}}"#.to_vec();
    assert_eq!(
        code(a.raw().update_container(ctx(), &up).unwrap_err()),
        Code::INVALID_ARGUMENT
    );
    // Pause freezes every process; exec still refuses nothing but the processes do not run.
    let mut pause = pb::PauseContainerRequest::new();
    pause.container_id = "p".into();
    a.raw().pause_container(ctx(), &pause).unwrap();
    let frozen = std::fs::read_to_string(format!("{root}/p/cgroup.events")).unwrap();
    assert!(frozen.contains("frozen 1"), "{frozen}");
    let mut resume = pb::ResumeContainerRequest::new();
    resume.container_id = "p".into();
    a.raw().resume_container(ctx(), &resume).unwrap();
    let thawed = std::fs::read_to_string(format!("{root}/p/cgroup.events")).unwrap();
    assert!(thawed.contains("frozen 0"), "{thawed}");
    // ListProcesses reads the cgroup.
    let mut req = pb::ListProcessesRequest::new();
    req.container_id = "p".into();
    let list = a.raw().list_processes(ctx(), &req).unwrap();
    assert!(list.processes.len() >= 2, "{:?}", list.processes);
    a.client.remove_container("p").unwrap();
}

#[test]
#[ignore = "needs cgroup v2 controllers: runs in the KVM test VM (make e2e)"]
fn stats_follow_a_cpu_burner_and_exec_joins_the_cgroup() {
    let (a, root) = cgroup_agent("cpu");
    a.create(
        "burn",
        &limited(&["sleep", "60"], r#"{"cpu":{"shares":512,"cpus":"0"}}"#),
    );
    assert_eq!(
        std::fs::read_to_string(format!("{root}/burn/cpu.weight"))
            .unwrap()
            .trim(),
        "20"
    );
    a.client.start_container("burn").unwrap();
    let first = a.stats("burn").cpu.usage_usec;
    a.exec(
        "burn",
        "yes",
        &process(&["sh", "-c", "yes > /dev/null"], ""),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let second = a.stats("burn");
    assert!(
        second.cpu.usage_usec > first + 200_000,
        "{first} -> {}",
        second.cpu.usage_usec
    );
    assert!(second.memory.usage_bytes > 0);
    // sleep, and sh exec'd into yes.
    assert!(second.pids.current >= 2, "{:?}", second.pids);
    a.client.remove_container("burn").unwrap();
}

#[test]
#[ignore = "needs cgroup v2 controllers: runs in the KVM test VM (make e2e)"]
fn fifty_containers_leave_no_cgroups() {
    let (a, root) = cgroup_agent("fifty");
    for i in 0..50 {
        let id = format!("c{i}");
        a.create(&id, &limited(&["sleep", "60"], r#"{"pids":{"limit":16}}"#));
        a.client.start_container(&id).unwrap();
    }
    let dirs = |root: &str| {
        std::fs::read_dir(root)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_dir())
            .count()
    };
    assert_eq!(dirs(&root), 50);
    for i in 0..50 {
        a.client.remove_container(&format!("c{i}")).unwrap();
    }
    assert_eq!(dirs(&root), 0);
    assert!(children(a.child.id()).is_empty());
    drop(a);
    let _ = std::fs::remove_dir(&root);
}
