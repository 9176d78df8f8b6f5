//! End-to-end: containers inside a real guest, the agent as PID 1 behind `hyper-vmm`, the
//! rootfs on a virtio-blk ext4 disk found by its serial. One VM boot runs every case (run
//! with `--ignored` by hack/run-e2e.sh).

use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::{TempDir, TestVm, VmSpec};
use protocol::agent::{self as pb, Stream};
use protocol::AgentClient;
use ttrpc::context::{self, Context};

const BOOT: Duration = Duration::from_secs(90);
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "dd", "yes", "ls", "hostname", "grep", "wc",
];

fn ctx() -> Context {
    context::with_timeout(Duration::from_secs(60).as_nanos() as i64)
}

fn rootfs_disk(dir: &Path) -> PathBuf {
    e2e::busybox_rootfs_disk(dir, APPLETS)
}

fn spec(args: &[&str], linux: &str) -> Vec<u8> {
    let args = serde_json::to_string(args).unwrap();
    let sep = if linux.is_empty() { "" } else { "," };
    format!(
        r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs","readonly":false}},"hostname":"ctr",
        "process":{{"args":{args},"cwd":"/","env":["PATH=/bin"],"user":{{"uid":0,"gid":0}}}}{sep}{linux}}}"#
    )
    .into_bytes()
}

fn create(agent: &AgentClient, id: &str, spec: Vec<u8>) {
    let mut rootfs = pb::Rootfs::new();
    let mut dev = pb::BlockDevice::new();
    dev.set_serial("rootfs0".into());
    rootfs.set_block(dev);
    rootfs.overlay = true;
    agent
        .create_container(id, spec, rootfs)
        .unwrap_or_else(|e| panic!("create {id}: {e}"));
}

fn output(agent: &AgentClient, id: &str, exec_id: &str) -> String {
    let (out, eof, _) = agent
        .read_stream_to_end(id, exec_id, Stream::STREAM_STDOUT, Duration::from_secs(30))
        .unwrap();
    assert!(eof);
    String::from_utf8_lossy(&out).into_owned()
}

fn run(agent: &AgentClient, id: &str, spec: Vec<u8>) -> (pb::WaitProcessResponse, String) {
    create(agent, id, spec);
    agent.start_container(id).unwrap();
    let exit = agent.wait_process(id, "").unwrap();
    let out = output(agent, id, "");
    agent.remove_container(id).unwrap();
    (exit, out)
}

fn stats(agent: &AgentClient, id: &str) -> pb::StatsContainerResponse {
    let mut req = pb::StatsContainerRequest::new();
    req.container_id = id.into();
    agent.raw().stats_container(ctx(), &req).unwrap()
}

#[test]
#[ignore = "boots a guest: run through hack/run-e2e.sh"]
fn containers_on_a_virtio_blk_rootfs() {
    let dir = TempDir::new("ctr");
    let img = rootfs_disk(dir.path());
    let vm = TestVm::start(&VmSpec {
        vcpus: 2,
        memory_mib: 256,
        disks: vec![("rootfs0".into(), img, true)],
        ..VmSpec::default()
    });
    let agent = vm.agent(BOOT).with_timeout(Duration::from_secs(60));

    // Exit codes and stdout.
    let (exit, out) = run(&agent, "echo", spec(&["sh", "-c", "echo hi; hostname"], ""));
    assert_eq!(
        (exit.exit_code, out.as_str()),
        (0, "hi\nctr\n"),
        "{}",
        vm.diagnostics()
    );
    let (exit, _) = run(&agent, "three", spec(&["sh", "-c", "exit 3"], ""));
    assert_eq!(exit.exit_code, 3);

    // The overlay makes a read-only disk writable and private per container.
    let (exit, out) = run(
        &agent,
        "write",
        spec(&["sh", "-c", "echo data > /etc/x && cat /etc/x"], ""),
    );
    assert_eq!((exit.exit_code, out.as_str()), (0, "data\n"));
    let (_, out) = run(
        &agent,
        "read",
        spec(&["sh", "-c", "cat /etc/x || echo absent"], ""),
    );
    assert_eq!(out, "absent\n");

    // Exec into a running container, then SIGKILL.
    create(&agent, "long", spec(&["sleep", "600"], ""));
    agent.start_container("long").unwrap();
    let mut req = pb::ExecProcessRequest::new();
    req.container_id = "long".into();
    req.exec_id = "ps".into();
    req.process_json =
        br#"{"args":["sh","-c","cat /proc/1/comm; hostname"],"cwd":"/","env":["PATH=/bin"],"user":{"uid":0,"gid":0}}"#
            .to_vec();
    agent.raw().exec_process(ctx(), &req).unwrap();
    assert_eq!(agent.wait_process("long", "ps").unwrap().exit_code, 0);
    assert_eq!(output(&agent, "long", "ps"), "sleep\nctr\n");
    agent.signal_process("long", "", 9).unwrap();
    assert_eq!(agent.wait_process("long", "").unwrap().signal, 9);
    agent.remove_container("long").unwrap();

    // Stats follow a CPU burner.
    create(&agent, "burn", spec(&["sh", "-c", "yes > /dev/null"], ""));
    agent.start_container("burn").unwrap();
    let first = stats(&agent, "burn").cpu.usage_usec;
    std::thread::sleep(Duration::from_secs(2));
    let second = stats(&agent, "burn");
    assert!(
        second.cpu.usage_usec > first + 100_000,
        "{first} -> {second:?}"
    );
    assert!(second.memory.usage_bytes > 0);
    assert!(second.pids.current >= 1);
    agent.remove_container("burn").unwrap();

    // A memory limit is enforced and reported as an OOM kill.
    let (exit, _) = run(
        &agent,
        "oom",
        spec(
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
            r#""linux":{"resources":{"memory":{"limit":16777216}}}"#,
        ),
    );
    assert_eq!(exit.signal, 9, "{exit:?}");
    assert!(exit.oom_killed, "{exit:?}");

    // Nothing is left: one container sees the agent's mounts and cgroups through bind mounts.
    let probe = spec(
        &[
            "sh",
            "-c",
            "grep -c hyperstart/disks /agent-mountinfo; ls -d /agent-cgroups/*/ | wc -l",
        ],
        r#""mounts":[{"destination":"/agent-mountinfo","type":"bind","source":"/proc/1/mountinfo","options":["bind","ro"]},
            {"destination":"/agent-cgroups","type":"bind","source":"/sys/fs/cgroup/pods","options":["bind","ro"]}]"#,
    );
    let (exit, out) = run(&agent, "probe", probe);
    assert_eq!(exit.exit_code, 0, "{out}");
    let counts: Vec<&str> = out.lines().collect();
    // Only the probe's own disk mount and its own cgroup (plus the cgroup files).
    assert_eq!(counts[0], "1", "{out}");
    assert_eq!(counts[1].trim(), "1", "{out}");
    let health = agent
        .raw()
        .health(ctx(), &pb::HealthRequest::new())
        .unwrap();
    assert_eq!(health.containers, 0);
}
