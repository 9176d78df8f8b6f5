//! Containers in host mode: the `hyperstart` binary on a Unix socket, driven through the real
//! host client, running a busybox rootfs built from Debian's busybox-static. Needs root.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use protocol::agent::{Rootfs, Stream};
use protocol::AgentClient;
use ttrpc::Code;

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "id", "hostname", "pwd", "env", "ls", "touch", "dd", "test",
];

struct Agent {
    dir: PathBuf,
    child: Child,
    client: AgentClient,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Agent {
    fn start(tag: &str) -> Agent {
        let dir = std::env::temp_dir().join(format!("hyperstart-ctr-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        make_rootfs(&dir.join("rootfs"));
        let (child, client) = common::spawn_agent(&dir.join("agent.sock"), [] as [&str; 0]);
        Agent { dir, child, client }
    }

    fn rootfs(&self, read_only: bool) -> Rootfs {
        Rootfs::from_host_dir(self.dir.join("rootfs").to_str().unwrap(), read_only)
    }

    fn create(&self, id: &str, spec: &str) -> u32 {
        self.client
            .create_container(id, spec.as_bytes().to_vec(), self.rootfs(false))
            .unwrap()
    }

    /// Creates, starts, waits; returns (exit_code, signal, stdout).
    fn run(&self, id: &str, spec: &str) -> (i32, i32, String) {
        self.create(id, spec);
        self.client.start_container(id).unwrap();
        let exit = self.client.wait_process(id, "").unwrap();
        let (out, eof, dropped) = self
            .client
            .read_stream_to_end(id, "", Stream::STREAM_STDOUT, Duration::from_secs(10))
            .unwrap();
        assert!(eof);
        assert_eq!(dropped, 0);
        self.client.remove_container(id).unwrap();
        (exit.exit_code, exit.signal, String::from_utf8(out).unwrap())
    }
}

fn make_rootfs(root: &Path) {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "home/user"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
}

/// An OCI config.json running `args`.
fn spec(args: &[&str]) -> String {
    spec_with(args, "/", 0, 0, "")
}

fn spec_with(args: &[&str], cwd: &str, uid: u32, gid: u32, hostname: &str) -> String {
    let args = serde_json_args(args);
    format!(
        r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"hostname":"{hostname}",
        "process":{{"args":{args},"cwd":"{cwd}","env":["PATH=/bin","GREETING=hello"],
        "user":{{"uid":{uid},"gid":{gid}}}}}}}"#
    )
}

fn serde_json_args(args: &[&str]) -> String {
    let quoted: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!("[{}]", quoted.join(","))
}

fn code(e: protocol::RpcError) -> Code {
    e.code().expect("an RPC status")
}

#[test]
fn echo_exit_codes_and_stdout() {
    let a = Agent::start("echo");
    assert_eq!(a.run("echo", &spec(&["echo", "hi"])), (0, 0, "hi\n".into()));
    assert_eq!(
        a.run("exit3", &spec(&["sh", "-c", "exit 3"])),
        (3, 0, String::new())
    );
    // stderr is its own stream.
    a.create("err", &spec(&["sh", "-c", "echo oops >&2"]));
    a.client.start_container("err").unwrap();
    a.client.wait_process("err", "").unwrap();
    let (err, eof, _) = a
        .client
        .read_stream_to_end("err", "", Stream::STREAM_STDERR, Duration::from_secs(10))
        .unwrap();
    assert_eq!((err.as_slice(), eof), (&b"oops\n"[..], true));
    a.client.remove_container("err").unwrap();
}

#[test]
fn acknowledged_reads_keep_output_until_acknowledged() {
    let a = Agent::start("acked");
    a.create("hello", &spec(&["echo", "hello world"]));
    a.client.start_container("hello").unwrap();
    assert_eq!(a.client.wait_process("hello", "").unwrap().exit_code, 0);
    let read = |offset: u64, max: u32| {
        a.client
            .read_stream_from(
                "hello",
                "",
                Stream::STREAM_STDOUT,
                offset,
                max,
                Duration::ZERO,
            )
            .unwrap()
    };
    // A reader that died after the first read reads the same bytes again.
    for _ in 0..2 {
        let r = read(0, 5);
        assert_eq!(
            (r.data.as_slice(), r.offset, r.eof),
            (&b"hello"[..], 0, false)
        );
        assert!(r.acknowledged);
    }
    let r = read(5, 0);
    assert_eq!(
        (r.data.as_slice(), r.offset, r.eof),
        (&b" world\n"[..], 5, false)
    );
    // Everything acknowledged: end of stream.
    let r = read(12, 0);
    assert_eq!((r.data.len(), r.offset, r.eof), (0, 12, true));
    // A plain (consuming) read sees the same end.
    let r = a
        .client
        .read_stream("hello", "", Stream::STREAM_STDOUT, 0, Duration::ZERO)
        .unwrap();
    assert!(r.eof && r.data.is_empty() && !r.acknowledged);
    a.client.remove_container("hello").unwrap();
}

#[test]
fn output_beyond_the_buffer_is_dropped_and_counted() {
    let a = Agent::start("overflow");
    // 3 MiB while nobody reads: the agent keeps the newest MAX_STREAM_BUFFER bytes.
    a.create("dd", &spec(&["dd", "if=/dev/zero", "bs=65536", "count=48"]));
    a.client.start_container("dd").unwrap();
    assert_eq!(a.client.wait_process("dd", "").unwrap().exit_code, 0);
    let (out, eof, dropped) = a
        .client
        .read_stream_to_end("dd", "", Stream::STREAM_STDOUT, Duration::from_secs(10))
        .unwrap();
    assert!(eof);
    assert_eq!(out.len(), protocol::MAX_STREAM_BUFFER);
    assert_eq!(
        dropped as usize,
        3 * 1024 * 1024 - protocol::MAX_STREAM_BUFFER
    );
    a.client.remove_container("dd").unwrap();
}

#[test]
fn sigkill_is_reported_as_signal_9() {
    let a = Agent::start("kill");
    a.create("sleeper", &spec(&["sleep", "100"]));
    a.client.start_container("sleeper").unwrap();
    // The agent answers DEADLINE_EXCEEDED a little before the caller's deadline; on a loaded
    // machine that answer can still arrive after the client gave up on its own. Either way the
    // call must end at the deadline, not when the process exits.
    let short = a.client.with_timeout(Duration::from_millis(500));
    let t = std::time::Instant::now();
    match short.wait_process("sleeper", "").unwrap_err() {
        protocol::RpcError::Status { code, .. } => assert_eq!(code, Code::DEADLINE_EXCEEDED),
        protocol::RpcError::Transport(ttrpc::Error::LocalClosed) => {}
        protocol::RpcError::Transport(e) => {
            assert!(format!("{e:?}").contains("imeout"), "{e:?}")
        }
        other => panic!("{other}"),
    }
    assert!(t.elapsed() < Duration::from_secs(50));
    a.client.signal_process("sleeper", "", 9).unwrap();
    let exit = a.client.wait_process("sleeper", "").unwrap();
    assert_eq!(
        (exit.exit_code, exit.signal, exit.oom_killed),
        (0, 9, false)
    );
    assert!(exit.started_at_unix_nanos > 0);
    assert!(exit.finished_at_unix_nanos >= exit.started_at_unix_nanos);
    a.client.remove_container("sleeper").unwrap();
}

#[test]
fn stdin_round_trip_through_cat() {
    let a = Agent::start("cat");
    a.create("cat", &spec(&["cat"]));
    a.client.start_container("cat").unwrap();
    let input: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    // Written while the output is drained, as the pipes hold only 64 KiB each.
    let writer = {
        let client = a.client.clone();
        let input = input.clone();
        std::thread::spawn(move || {
            client.write_stdin("cat", "", &input).unwrap();
            client.close_stdin("cat", "").unwrap();
        })
    };
    let (out, eof, dropped) = a
        .client
        .read_stream_to_end("cat", "", Stream::STREAM_STDOUT, Duration::from_secs(20))
        .unwrap();
    writer.join().unwrap();
    assert!(eof);
    assert_eq!(dropped, 0);
    assert!(out == input, "got {} bytes back", out.len());
    assert_eq!(a.client.wait_process("cat", "").unwrap().exit_code, 0);
    assert_eq!(
        code(a.client.write_stdin("cat", "", b"x").unwrap_err()),
        Code::FAILED_PRECONDITION
    );
    a.client.remove_container("cat").unwrap();
}

#[test]
fn env_cwd_user_hostname() {
    let a = Agent::start("env");
    let (code, _, out) = a.run("env", &spec_with(&["env"], "/", 0, 0, ""));
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l == "GREETING=hello"), "{out}");
    let (_, _, out) = a.run("pwd", &spec_with(&["pwd"], "/home/user", 0, 0, ""));
    assert_eq!(out, "/home/user\n");
    let (_, _, out) = a.run("uid", &spec_with(&["id", "-u"], "/", 1000, 1000, ""));
    assert_eq!(out, "1000\n");
    let (_, _, out) = a.run("gid", &spec_with(&["id", "-g"], "/", 1000, 1234, ""));
    assert_eq!(out, "1234\n");
    let (_, _, out) = a.run("host", &spec_with(&["hostname"], "/", 0, 0, "pod-a"));
    assert_eq!(out, "pod-a\n");
    // The container is pid 1 of its own pid namespace, with its own /proc and /dev.
    let (_, _, out) = a.run("pid", &spec(&["sh", "-c", "echo $$; ls /dev"]));
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("1"));
    let dev: Vec<&str> = lines.collect();
    for node in [
        "null", "zero", "full", "random", "urandom", "tty", "pts", "shm",
    ] {
        assert!(dev.contains(&node), "/dev lacks {node}: {dev:?}");
    }
    assert_eq!(
        a.run(
            "null",
            &spec(&["sh", "-c", "echo x > /dev/null && cat /dev/null"])
        ),
        (0, 0, String::new())
    );
}

#[test]
fn read_only_rootfs() {
    let a = Agent::start("ro");
    a.client
        .create_container(
            "ro",
            spec(&["sh", "-c", "touch /x"]).into_bytes(),
            a.rootfs(true),
        )
        .unwrap();
    a.client.start_container("ro").unwrap();
    assert_ne!(a.client.wait_process("ro", "").unwrap().exit_code, 0);
    a.client.remove_container("ro").unwrap();
    assert!(!a.dir.join("rootfs/x").exists());
    // /dev/shm stays writable.
    assert_eq!(a.run("rw-shm", &spec(&["touch", "/dev/shm/x"])).0, 0);
}

#[test]
fn overlay_rootfs_is_writable_and_private() {
    let a = Agent::start("overlay");
    let overlay = |read_only| {
        let mut r = a.rootfs(read_only);
        r.overlay = true;
        r
    };
    let run = |id: &str, script: &str, rootfs: Rootfs| {
        a.client
            .create_container(id, spec(&["sh", "-c", script]).into_bytes(), rootfs)
            .unwrap();
        a.client.start_container(id).unwrap();
        let exit = a.client.wait_process(id, "").unwrap();
        a.client.remove_container(id).unwrap();
        exit.exit_code
    };
    assert_eq!(
        run(
            "w",
            "echo data > /x && cat /x && ls /bin/busybox",
            overlay(false)
        ),
        0
    );
    // Not in the lower directory, not seen by the next container.
    assert!(!a.dir.join("rootfs/x").exists());
    assert_eq!(run("r", "test -e /x", overlay(false)), 1);
    // Read-only wins over the overlay.
    assert_ne!(run("ro", "touch /y", overlay(true)), 0);
}

#[test]
fn errors_have_the_right_codes() {
    let a = Agent::start("errors");
    let c = &a.client;
    assert_eq!(
        code(c.start_container("nope").unwrap_err()),
        Code::NOT_FOUND
    );
    assert_eq!(
        code(c.wait_process("nope", "").unwrap_err()),
        Code::NOT_FOUND
    );
    assert_eq!(
        code(c.signal_process("nope", "", 9).unwrap_err()),
        Code::NOT_FOUND
    );
    assert_eq!(
        code(c.remove_container("nope").unwrap_err()),
        Code::NOT_FOUND
    );
    assert_eq!(
        code(c.close_stdin("nope", "").unwrap_err()),
        Code::NOT_FOUND
    );
    let bad = |id: &str, json: &[u8]| {
        code(
            c.create_container(id, json.to_vec(), a.rootfs(false))
                .unwrap_err(),
        )
    };
    assert_eq!(bad("x", b"{garbage"), Code::INVALID_ARGUMENT);
    assert_eq!(
        bad("a/b", spec(&["true"]).as_bytes()),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code(
            c.create_container("x", spec(&["true"]).into_bytes(), Rootfs::new())
                .unwrap_err()
        ),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code(
            c.create_container(
                "x",
                spec(&["true"]).into_bytes(),
                Rootfs::from_host_dir("/nonexistent", false)
            )
            .unwrap_err()
        ),
        Code::INVALID_ARGUMENT
    );

    a.create("dup", &spec(&["sleep", "100"]));
    assert_eq!(bad("dup", spec(&["true"]).as_bytes()), Code::ALREADY_EXISTS);
    assert_eq!(
        code(c.wait_process("dup", "exec-1").unwrap_err()),
        Code::NOT_FOUND
    );
    assert_eq!(
        code(c.signal_process("dup", "", 0).unwrap_err()),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code(c.signal_process("dup", "", 1000).unwrap_err()),
        Code::INVALID_ARGUMENT
    );
    // A created, never started container can be removed.
    c.remove_container("dup").unwrap();

    // A missing executable fails at start, and the container can still be removed.
    a.create("noexec", &spec(&["/no/such/binary"]));
    assert_eq!(
        code(c.start_container("noexec").unwrap_err()),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code(c.start_container("noexec").unwrap_err()),
        Code::FAILED_PRECONDITION
    );
    assert_eq!(c.wait_process("noexec", "").unwrap().exit_code, 127);
    c.remove_container("noexec").unwrap();
    // Still serving.
    assert_eq!(c.ping(7).unwrap(), 7);
}

fn mount_count() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count()
}

/// Children of `pid`, over all its threads.
fn children(pid: u32) -> Vec<String> {
    let mut kids = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path().join("children");
        if let Ok(text) = std::fs::read_to_string(path) {
            kids.extend(text.split_whitespace().map(str::to_owned));
        }
    }
    kids
}

#[test]
fn twenty_containers_leave_nothing_behind() {
    let a = Agent::start("many");
    let mounts_before = mount_count();
    let agent_pid = a.child.id();
    let ids: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
    for id in &ids {
        a.create(id, &spec(&["sh", "-c", "sleep 100 & sleep 100"]));
        a.client.start_container(id).unwrap();
    }
    assert_eq!(children(agent_pid).len(), 20);
    for id in &ids {
        a.client.remove_container(id).unwrap();
    }
    assert!(children(agent_pid).is_empty(), "{:?}", children(agent_pid));
    assert_eq!(mount_count(), mounts_before);
    assert_eq!(
        code(a.client.wait_process("c0", "").unwrap_err()),
        Code::NOT_FOUND
    );
}
