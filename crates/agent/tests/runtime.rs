//! The container runtime's OCI features in host mode (root, no VM): exec, terminals, the
//! security settings of the spec, spec mounts, the pod sandbox, files, events and processes.
//! Needs root. The cgroup cases are in `container_cgroups.rs` (they need cgroup v2 controllers).

mod support;

use std::time::Duration;

use protocol::agent as pb;
use support::*;
use ttrpc::Code;

#[test]
fn exec_joins_the_container() {
    let a = Agent::start("exec", &[]);
    a.create(
        "c",
        &spec_full(&process(&["sleep", "60"], ""), r#""hostname":"box""#),
    );
    a.client.start_container("c").unwrap();
    // PID 1 of the exec's pid namespace is the container's sleep; same hostname, same root.
    let pid = a
        .exec(
            "c",
            "e1",
            &process(
                &[
                    "sh",
                    "-c",
                    "cat /proc/1/cmdline; echo; hostname; echo $$; exit 7",
                ],
                "",
            ),
        )
        .unwrap();
    assert!(pid > 0);
    let exit = a.client.wait_process("c", "e1").unwrap();
    assert_eq!(exit.exit_code, 7);
    let out = a.output("c", "e1");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "sleep\u{0}60\u{0}");
    assert_eq!(lines[1], "box");
    assert_ne!(
        lines[2],
        pid.to_string(),
        "pid inside differs from the agent's view"
    );
    // Exec ids are unique; unknown containers and exec ids are NotFound.
    assert_eq!(
        code(a.exec("c", "e1", &process(&["true"], "")).unwrap_err()),
        Code::ALREADY_EXISTS
    );
    assert_eq!(
        code(a.exec("nope", "e2", &process(&["true"], "")).unwrap_err()),
        Code::NOT_FOUND
    );
    assert_eq!(
        code(a.exec("c", "e3", "{not json").unwrap_err()),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code(a.exec("c", "bad/id", &process(&["true"], "")).unwrap_err()),
        Code::INVALID_ARGUMENT
    );
    // stdin of an exec'd process.
    a.exec("c", "cat", &process(&["cat"], "")).unwrap();
    a.client.write_stdin("c", "cat", b"round trip\n").unwrap();
    a.client.close_stdin("c", "cat").unwrap();
    assert_eq!(a.client.wait_process("c", "cat").unwrap().exit_code, 0);
    assert_eq!(a.output("c", "cat"), "round trip\n");
    // RemoveProcess forgets an exec'd process; a second removal is fine.
    a.client.remove_process("c", "cat").unwrap();
    a.client.remove_process("c", "cat").unwrap();
    let mut wait = pb::WaitProcessRequest::new();
    wait.container_id = "c".into();
    wait.exec_id = "cat".into();
    assert_eq!(
        code(a.raw().wait_process(ctx(), &wait).unwrap_err()),
        Code::NOT_FOUND
    );
    assert!(a.client.remove_process("c", "").is_err());
    // Killing the init process ends the exec'd ones too (same pid namespace).
    a.exec("c", "long", &process(&["sleep", "60"], "")).unwrap();
    let mut req = pb::SignalProcessRequest::new();
    req.container_id = "c".into();
    req.signal = 9;
    a.raw().signal_process(ctx(), &req).unwrap();
    assert_eq!(a.client.wait_process("c", "").unwrap().signal, 9);
    assert_eq!(a.client.wait_process("c", "long").unwrap().signal, 9);
    // Exec into a stopped container fails.
    assert_eq!(
        code(a.exec("c", "late", &process(&["true"], "")).unwrap_err()),
        Code::FAILED_PRECONDITION
    );
    a.client.remove_container("c").unwrap();
}

#[test]
fn terminal_and_resize() {
    let a = Agent::start("tty", &[]);
    a.create(
        "t",
        &spec_full(
            &process(
                &[
                    "sh",
                    "-c",
                    "echo ready; read x; stty size; tty; test -t 0 && echo isatty",
                ],
                r#""terminal":true"#,
            ),
            "",
        ),
    );
    a.client.start_container("t").unwrap();
    a.read_until("t", "", "ready");
    let mut req = pb::ResizeTtyRequest::new();
    req.container_id = "t".into();
    req.rows = 33;
    req.cols = 101;
    a.raw().resize_tty(ctx(), &req).unwrap();
    a.client.write_stdin("t", "", b"go\n").unwrap();
    let out = a.read_until("t", "", "isatty");
    assert!(out.contains("33 101"), "{out:?}");
    // The terminal lives in the container's own devpts.
    assert!(out.contains("/dev/pts/0"), "{out:?}");
    assert_eq!(a.client.wait_process("t", "").unwrap().exit_code, 0);
    // A process without a terminal cannot be resized.
    a.create("plain", &spec(&["true"]));
    req.container_id = "plain".into();
    assert_eq!(
        code(a.raw().resize_tty(ctx(), &req).unwrap_err()),
        Code::FAILED_PRECONDITION
    );
    // An exec'd process with a terminal.
    a.create("host", &spec(&["sleep", "60"]));
    a.client.start_container("host").unwrap();
    a.exec(
        "host",
        "sh",
        &process(
            &["sh", "-c", "stty size"],
            r#""terminal":true,"consoleSize":{"height":5,"width":7}"#,
        ),
    )
    .unwrap();
    a.client.wait_process("host", "sh").unwrap();
    a.client.remove_container("host").unwrap();
}

fn cap_bits(status: &str, field: &str) -> u64 {
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

const CAP_NET_RAW: u64 = 1 << 13;
const CAP_CHOWN: u64 = 1;

#[test]
fn capabilities_rlimits_and_no_new_privs() {
    let a = Agent::start("caps", &[]);
    let caps = r#""capabilities":{"bounding":["CAP_CHOWN","CAP_KILL"],"effective":["CAP_CHOWN"],"permitted":["CAP_CHOWN","CAP_KILL"],"inheritable":[]}"#;
    let extra = format!(
        r#"{caps},"rlimits":[{{"type":"RLIMIT_NOFILE","hard":200,"soft":123}}],"noNewPrivileges":true"#
    );
    let (code_, _, out) = a.run(
        "caps",
        &spec_full(
            &process(&["sh", "-c", "cat /proc/self/status; ulimit -n"], &extra),
            "",
        ),
    );
    assert_eq!(code_, 0, "{out}");
    assert_eq!(cap_bits(&out, "CapBnd:"), CAP_CHOWN | (1 << 5));
    assert_eq!(cap_bits(&out, "CapEff:") & CAP_NET_RAW, 0);
    assert_eq!(cap_bits(&out, "CapEff:"), CAP_CHOWN | (1 << 5));
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.trim_end().ends_with("123"), "{out}");
    // A non-root user with an ambient capability keeps it across exec.
    let caps = r#""capabilities":{"bounding":["CAP_NET_RAW"],"effective":["CAP_NET_RAW"],"permitted":["CAP_NET_RAW"],"inheritable":["CAP_NET_RAW"],"ambient":["CAP_NET_RAW"]}"#;
    let p = process(&["cat", "/proc/self/status"], caps)
        .replace(r#""uid":0,"gid":0"#, r#""uid":1000,"gid":1000"#);
    let (code_, _, out) = a.run("ambient", &spec_full(&p, ""));
    assert_eq!(code_, 0, "{out}");
    assert_eq!(cap_bits(&out, "CapEff:"), CAP_NET_RAW);
    assert!(out.contains("Uid:\t1000"));
    // Without capabilities in the spec: unknown names are rejected.
    let bad = process(&["true"], r#""capabilities":{"bounding":["CAP_BOGUS"]}"#);
    let e = a
        .client
        .create_container("bad", spec_full(&bad, "").into_bytes(), a.rootfs(false))
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::INVALID_ARGUMENT));
}

#[test]
fn seccomp_masked_and_readonly_paths() {
    let a = Agent::start("seccomp", &[]);
    let linux = r#""linux":{"seccomp":{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
        "syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]},
        "maskedPaths":["/proc/version","/proc/scsi_missing"],"readonlyPaths":["/proc/sys"]}"#;
    let script = "mkdir /tmp/x; echo mkdir=$?; wc -c < /proc/version; echo 1 > /proc/sys/kernel/domainname; echo sysctl=$?";
    let (code_, _, out) = a.run(
        "sec",
        &spec_full(
            &process(&["sh", "-c", script], r#""noNewPrivileges":true"#),
            linux,
        ),
    );
    assert_eq!(code_, 0, "{out}");
    assert!(out.contains("mkdir=1"), "{out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    assert!(
        out.lines().any(|l| l.trim() == "0"),
        "masked /proc/version reads empty: {out}"
    );
    assert!(out.contains("sysctl=1"), "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    // A bad profile is refused at create.
    let bad = r#""linux":{"seccomp":{"defaultAction":"SCMP_ACT_NOTIFY"}}"#;
    let e = a
        .client
        .create_container(
            "bad",
            spec_full(&process(&["true"], ""), bad).into_bytes(),
            a.rootfs(false),
        )
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::INVALID_ARGUMENT));
}

#[test]
fn spec_mounts_files_and_sysctls() {
    let a = Agent::start("mounts", &[]);
    let mut req = pb::CopyFileRequest::new();
    req.path = "pod/etc/hosts".into();
    req.data = b"10.0.0.1 db\n".to_vec();
    req.file_size = req.data.len() as u64;
    req.file_mode = 0o644;
    let hosts = a.raw().copy_file(ctx(), &req).unwrap();
    assert!(hosts.complete);
    let mounts = format!(
        r#""mounts":[{{"destination":"/etc/hosts","type":"bind","source":"{}","options":["rbind","ro"]}},
        {{"destination":"/data/scratch","type":"tmpfs","source":"tmpfs","options":["nosuid","size=1m"]}},
        {{"destination":"/proc","type":"proc","source":"proc"}}],
        "linux":{{"sysctl":{{"kernel.shm_rmid_forced":"1"}}}}"#,
        hosts.path
    );
    let script = "cat /etc/hosts; echo x > /etc/hosts || echo ro-ok; dd if=/dev/zero of=/data/scratch/f bs=1k count=2048 2>/dev/null || echo full-ok; cat /proc/sys/kernel/shm_rmid_forced; ls -d /dev/mqueue";
    let (code_, _, out) = a.run(
        "m",
        &spec_full(&process(&["sh", "-c", script], ""), &mounts),
    );
    assert_eq!(code_, 0, "{out}");
    assert!(out.contains("10.0.0.1 db"), "{out}");
    assert!(out.contains("ro-ok"), "{out}");
    assert!(out.contains("full-ok"), "{out}");
    assert!(out.lines().any(|l| l == "1"), "{out}");
    assert!(out.contains("/dev/mqueue"), "{out}");
    // With a bind (not overlay) rootfs, missing mount points are created in it, as runc does.
    assert!(a.dir.join("rootfs/data/scratch").is_dir());
    // CopyFile refuses paths out of the store and oversize files.
    for path in ["../x", "/etc/passwd", "a/../../b", ""] {
        req.path = path.into();
        assert_eq!(
            code(a.raw().copy_file(ctx(), &req).unwrap_err()),
            Code::INVALID_ARGUMENT,
            "{path}"
        );
    }
    req.path = "big".into();
    req.file_size = protocol::MAX_COPY_FILE_SIZE + 1;
    assert_eq!(
        code(a.raw().copy_file(ctx(), &req).unwrap_err()),
        Code::INVALID_ARGUMENT
    );
    // A sysctl value the kernel refuses is the client's error.
    let bad = r#""linux":{"sysctl":{"kernel.msgmax":"not-a-number"}}"#;
    let e = a
        .client
        .create_container(
            "badsysctl",
            spec_full(&process(&["true"], ""), bad).into_bytes(),
            a.rootfs(false),
        )
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::INVALID_ARGUMENT), "{e}");
    // Unsupported mount types and relative destinations are invalid.
    let bad = r#""mounts":[{"destination":"/x","type":"nfs","source":"srv:/x"}]"#;
    let e = a
        .client
        .create_container(
            "bad",
            spec_full(&process(&["true"], ""), bad).into_bytes(),
            a.rootfs(false),
        )
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::INVALID_ARGUMENT));
}

#[test]
fn sandbox_shares_namespaces() {
    let a = Agent::start("sandbox", &[]);
    let mut req = pb::CreateSandboxRequest::new();
    req.hostname = "pod-a".into();
    req.share_pid_namespace = true;
    req.sysctls.insert("kernel.msgmax".into(), "4321".into());
    let mut dns = pb::DnsConfig::new();
    dns.servers = vec!["10.96.0.10".into()];
    dns.searches = vec!["default.svc.cluster.local".into()];
    dns.options = vec!["ndots:5".into()];
    req.dns = Some(dns).into();
    let sb = a.raw().create_sandbox(ctx(), &req).unwrap();
    assert!(sb.pid > 0);
    assert!(!sb.pid_namespace_path.is_empty());
    let resolv = std::fs::read_to_string(&sb.resolv_conf_path).unwrap();
    assert_eq!(
        resolv,
        "nameserver 10.96.0.10\nsearch default.svc.cluster.local\noptions ndots:5\n"
    );
    assert_eq!(
        code(a.raw().create_sandbox(ctx(), &req).unwrap_err()),
        Code::ALREADY_EXISTS
    );
    let ns = format!(
        r#""linux":{{"namespaces":[{{"type":"mount"}},{{"type":"pid","path":"{}"}},{{"type":"ipc","path":"{}"}},{{"type":"uts","path":"{}"}}]}}"#,
        sb.pid_namespace_path, sb.ipc_namespace_path, sb.uts_namespace_path
    );
    a.create("first", &spec_full(&process(&["sleep", "60"], ""), &ns));
    a.client.start_container("first").unwrap();
    let script =
        "hostname; cat /proc/sys/kernel/msgmax; for p in /proc/[0-9]*; do cat $p/comm; done";
    a.create(
        "second",
        &spec_full(&process(&["sh", "-c", script], ""), &ns),
    );
    a.client.start_container("second").unwrap();
    assert_eq!(a.client.wait_process("second", "").unwrap().exit_code, 0);
    let out = a.output("second", "");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "pod-a");
    assert_eq!(lines[1], "4321");
    assert!(
        lines.contains(&"sleep"),
        "the other container's process is visible: {out}"
    );
    assert!(lines.contains(&"pod-holder"), "{out}");
    // Sysctls outside the ipc namespace are refused in host mode.
    a.raw()
        .destroy_sandbox(ctx(), &pb::DestroySandboxRequest::new())
        .unwrap();
    assert!(
        a.client.remove_container("first").is_err(),
        "destroy removed the containers"
    );
    let mut bad = pb::CreateSandboxRequest::new();
    bad.sysctls.insert("net.ipv4.ip_forward".into(), "1".into());
    assert_eq!(
        code(a.raw().create_sandbox(ctx(), &bad).unwrap_err()),
        Code::INVALID_ARGUMENT
    );
    // So are values the kernel refuses, and hostnames no resolver would take.
    let mut bad = pb::CreateSandboxRequest::new();
    bad.sysctls
        .insert("kernel.msgmax".into(), "not-a-number".into());
    assert_eq!(
        code(a.raw().create_sandbox(ctx(), &bad).unwrap_err()),
        Code::INVALID_ARGUMENT
    );
    let mut bad = pb::CreateSandboxRequest::new();
    bad.hostname = "a\nb".into();
    assert_eq!(
        code(a.raw().create_sandbox(ctx(), &bad).unwrap_err()),
        Code::INVALID_ARGUMENT
    );
    // Destroy is idempotent.
    a.raw()
        .destroy_sandbox(ctx(), &pb::DestroySandboxRequest::new())
        .unwrap();
}

#[test]
fn events_processes_and_health() {
    let a = Agent::start("events", &[]);
    let start = a.events(0).last_seq;
    // PID 1 of a pid namespace ignores signals it has no handler for: trap TERM.
    a.create(
        "p",
        &spec(&[
            "sh",
            "-c",
            "trap 'exit 143' TERM; sleep 60 & sleep 60 & wait",
        ]),
    );
    a.client.start_container("p").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut req = pb::ListProcessesRequest::new();
    req.container_id = "p".into();
    let list = a.raw().list_processes(ctx(), &req).unwrap();
    let comms: Vec<&str> = list.processes.iter().map(|p| p.comm.as_str()).collect();
    assert_eq!(
        comms.iter().filter(|c| **c == "sleep").count(),
        2,
        "{comms:?}"
    );
    assert!(comms.contains(&"sh"));
    assert!(list
        .processes
        .iter()
        .any(|p| p.exec_id.is_empty() && p.comm == "sh"));
    let mut kill = pb::SignalProcessRequest::new();
    kill.container_id = "p".into();
    kill.signal = 15;
    a.raw().signal_process(ctx(), &kill).unwrap();
    let exit = a.client.wait_process("p", "").unwrap();
    assert_eq!((exit.exit_code, exit.signal), (143, 0));
    a.client.remove_container("p").unwrap();
    let events = a.events(start);
    let kinds: Vec<pb::EventType> = events
        .events
        .iter()
        .filter(|e| e.container_id == "p")
        .map(|e| e.type_.enum_value().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            pb::EventType::EVENT_CREATED,
            pb::EventType::EVENT_STARTED,
            pb::EventType::EVENT_EXITED,
            pb::EventType::EVENT_REMOVED
        ]
    );
    let exited = events
        .events
        .iter()
        .find(|e| e.type_.enum_value() == Ok(pb::EventType::EVENT_EXITED))
        .unwrap();
    assert_eq!(exited.exit_code, 143);
    // A long poll returns when an event arrives.
    let last = events.last_seq;
    let waiter = {
        let raw = a.raw().clone();
        std::thread::spawn(move || {
            let mut req = pb::GetEventsRequest::new();
            req.after_seq = last;
            req.wait_ms = 10_000;
            raw.get_events(ctx(), &req).unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    a.create("q", &spec(&["true"]));
    let got = waiter.join().unwrap();
    assert_eq!(got.events[0].container_id, "q");
    let health = a.raw().health(ctx(), &pb::HealthRequest::new()).unwrap();
    assert_eq!(health.status, "SERVING");
    assert_eq!(health.containers, 1);
    // Without cgroups, limits are refused rather than ignored.
    let limited = spec_full(
        &process(&["true"], ""),
        r#""linux":{"resources":{"memory":{"limit":16777216}}}"#,
    );
    let e = a
        .client
        .create_container("lim", limited.into_bytes(), a.rootfs(false))
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::FAILED_PRECONDITION));
}

#[test]
fn fifty_containers_leave_nothing_behind() {
    let a = Agent::start("fifty", &[]);
    let agent_pid = a.child.id();
    for i in 0..50 {
        let id = format!("c{i}");
        a.create(&id, &spec(&["sleep", "60"]));
        a.client.start_container(&id).unwrap();
        a.exec(&id, "e", &process(&["sleep", "60"], "")).unwrap();
    }
    assert!(children(agent_pid).len() >= 100);
    for i in 0..50 {
        a.client.remove_container(&format!("c{i}")).unwrap();
    }
    assert!(children(agent_pid).is_empty(), "{:?}", children(agent_pid));
    assert!(
        mounts_under(&a.dir).is_empty(),
        "{:?}",
        mounts_under(&a.dir)
    );
    let overlay = mounts_under(std::path::Path::new("/run/hyperstart"));
    assert!(overlay.is_empty(), "{overlay:?}");
}

#[test]
fn pod_holder_dies_with_the_agent() {
    let mut a = Agent::start("holder", &[]);
    let sb = a
        .raw()
        .create_sandbox(ctx(), &pb::CreateSandboxRequest::new())
        .unwrap();
    assert!(std::path::Path::new(&format!("/proc/{}", sb.pid)).exists());
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    // The holder is re-parented and sees its life pipe close.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{}/comm", sb.pid)).exists() {
        let zombie = std::fs::read_to_string(format!("/proc/{}/stat", sb.pid))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true);
        if zombie {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "holder {} still runs",
            sb.pid
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
