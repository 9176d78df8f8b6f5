//! `make container-bench`: container start latency inside a pod VM against `runc run` on the
//! host, in the same run, plus the agent's memory with idle containers.
//!
//! - hyperstart: CreateContainer + StartContainer until the first byte of output arrives, for a
//!   busybox `echo` on an overlay over a virtio-blk ext4 rootfs, through the VMM's vsock (the
//!   VM is booted once; pod start itself is the boot benchmark's subject).
//! - runc: `runc run` of the same rootfs as an OCI bundle, from spawn to the first output byte.
//!
//! Prints medians of RUNS (default 20) and the ratio, then the agent's VmRSS inside the guest
//! with 10 idle containers. Needs root and a KVM that boots stock guests (hack/kvm-vm).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{sh, TempDir, TestVm, VmSpec};
use protocol::agent::{self as pb, Stream};
use protocol::AgentClient;

const APPLETS: &[&str] = &["sh", "echo", "cat", "sleep", "grep"];

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn spec(args: &[&str], extra: &str) -> String {
    let args = serde_json::to_string(args).unwrap();
    format!(
        r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},
        "process":{{"args":{args},"cwd":"/","env":["PATH=/bin"],"user":{{"uid":0,"gid":0}}}}{extra}}}"#
    )
}

fn create(agent: &AgentClient, id: &str, spec: &str) {
    let mut rootfs = pb::Rootfs::new();
    let mut dev = pb::BlockDevice::new();
    dev.set_serial("rootfs0".into());
    rootfs.set_block(dev);
    rootfs.overlay = true;
    agent
        .create_container(id, spec.as_bytes().to_vec(), rootfs)
        .unwrap_or_else(|e| panic!("create {id}: {e}"));
}

fn first_output(agent: &AgentClient, id: &str) {
    loop {
        let r = agent
            .read_stream(
                id,
                "",
                Stream::STREAM_STDOUT,
                4096,
                Duration::from_millis(5000),
            )
            .expect("read_stream");
        if !r.data.is_empty() || r.eof {
            assert!(!r.data.is_empty(), "no output from {id}");
            return;
        }
    }
}

fn main() {
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let dir = TempDir::new("cbench");
    let root = dir.path().join("bundle/rootfs");
    e2e::busybox_rootfs(&root, APPLETS);
    let img = dir.path().join("rootfs.ext4");
    sh(&format!(
        "mkfs.ext4 -q -F -d {} {} 16M",
        root.display(),
        img.display()
    ));

    // hyperstart inside a pod VM.
    let vm = TestVm::start(&VmSpec {
        vcpus: 1,
        memory_mib: 256,
        disks: vec![("rootfs0".into(), img, true)],
        ..VmSpec::default()
    });
    let agent = vm
        .agent(Duration::from_secs(90))
        .with_timeout(Duration::from_secs(30));
    let echo = spec(&["echo", "hi"], "");
    // One warm-up: the first container mounts the disk.
    let mut hyper = Vec::new();
    for i in 0..=runs {
        let id = format!("b{i}");
        let t = Instant::now();
        create(&agent, &id, &echo);
        agent.start_container(&id).unwrap();
        first_output(&agent, &id);
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        agent.wait_process(&id, "").unwrap();
        agent.remove_container(&id).unwrap();
        if i > 0 {
            hyper.push(ms);
        }
    }

    // Agent memory with 10 idle containers, read by an 11th through a bind of /proc/1/status.
    for i in 0..10 {
        let id = format!("idle{i}");
        create(&agent, &id, &spec(&["sleep", "600"], ""));
        agent.start_container(&id).unwrap();
    }
    let probe = spec(
        &["grep", "VmRSS", "/agent-status"],
        r#","mounts":[{"destination":"/agent-status","type":"bind","source":"/proc/1/status","options":["bind","ro"]}]"#,
    );
    create(&agent, "probe", &probe);
    agent.start_container("probe").unwrap();
    agent.wait_process("probe", "").unwrap();
    let (out, _, _) = agent
        .read_stream_to_end("probe", "", Stream::STREAM_STDOUT, Duration::from_secs(10))
        .unwrap();
    let rss_line = String::from_utf8_lossy(&out).trim().to_owned();
    let rss_kib: u64 = rss_line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    drop(agent);
    drop(vm);

    // runc run of the same rootfs on the host.
    let bundle = dir.path().join("bundle");
    sh(&format!("cd {} && runc spec", bundle.display()));
    let config = bundle.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["process"]["terminal"] = false.into();
    json["process"]["args"] = serde_json::json!(["echo", "hi"]);
    std::fs::write(&config, json.to_string()).unwrap();
    let mut runc = Vec::new();
    for i in 0..=runs {
        let id = format!("hb-runc-{}-{i}", std::process::id());
        let t = Instant::now();
        let mut child = Command::new("runc")
            .args(["run", "-b"])
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("runc (apt install runc)");
        let mut byte = [0u8; 1];
        let n = child.stdout.as_mut().unwrap().read(&mut byte).unwrap();
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(n, 1, "runc printed nothing");
        assert!(child.wait().unwrap().success());
        if i > 0 {
            runc.push(ms);
        }
    }
    let _ = Path::new("/");
    let h = median(&mut hyper);
    let r = median(&mut runc);
    println!("hyperstart in a pod VM: create+start to first output, median of {runs}: {h:.1} ms");
    println!("runc run on the host:   spawn to first output, median of {runs}: {r:.1} ms");
    println!("agent with 10 idle containers: {rss_line}");
    println!(
        "container_start_ms hyperstart={h:.1} runc={r:.1} ratio={:.2} agent_rss_kib_10_idle={rss_kib}",
        h / r
    );
}
