//! A host-mode agent with a busybox rootfs, for the container integration tests. Needs root.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use protocol::agent::{self as pb, Rootfs, Stream};
use protocol::AgentClient;
use ttrpc::context::{self, Context};

#[path = "../common/mod.rs"]
mod common;

pub const BUSYBOX: &str = "/bin/busybox";
pub const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "id", "hostname", "pwd", "env", "ls", "touch", "dd", "test",
    "stty", "grep", "mkdir", "ps", "head", "tail", "wc", "yes", "true", "false", "tty", "readlink",
];

pub struct Agent {
    pub dir: PathBuf,
    pub child: Child,
    pub client: AgentClient,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn ctx() -> Context {
    context::with_timeout(Duration::from_secs(20).as_nanos() as i64)
}

impl Agent {
    /// Starts `hyperstart` with `extra` arguments (`--state-dir` is always given).
    pub fn start(tag: &str, extra: &[&str]) -> Agent {
        let dir = std::env::temp_dir().join(format!("hyperstart-rt-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        make_rootfs(&dir.join("rootfs"));
        let state = dir.join("state");
        let mut args = vec!["--state-dir".to_owned(), state.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let (child, client) = common::spawn_agent(&dir.join("agent.sock"), args);
        Agent { dir, child, client }
    }

    pub fn rootfs(&self, read_only: bool) -> Rootfs {
        Rootfs::from_host_dir(self.dir.join("rootfs").to_str().unwrap(), read_only)
    }

    pub fn raw(&self) -> &protocol::agent_ttrpc::AgentClient {
        self.client.raw()
    }

    pub fn create(&self, id: &str, spec: &str) -> u32 {
        self.client
            .create_container(id, spec.as_bytes().to_vec(), self.rootfs(false))
            .unwrap()
    }

    /// Creates, starts, waits, removes; returns (exit_code, signal, stdout + stderr).
    pub fn run(&self, id: &str, spec: &str) -> (i32, i32, String) {
        self.create(id, spec);
        self.client.start_container(id).unwrap();
        let exit = self.client.wait_process(id, "").unwrap();
        let out = self.output(id, "");
        self.client.remove_container(id).unwrap();
        (exit.exit_code, exit.signal, out)
    }

    /// Everything the process wrote, stdout then stderr.
    pub fn output(&self, id: &str, exec_id: &str) -> String {
        let mut all = Vec::new();
        for stream in [Stream::STREAM_STDOUT, Stream::STREAM_STDERR] {
            let (out, eof, _) = self
                .client
                .read_stream_to_end(id, exec_id, stream, Duration::from_secs(20))
                .unwrap();
            assert!(eof);
            all.extend(out);
        }
        String::from_utf8_lossy(&all).into_owned()
    }

    /// Reads stdout until `needle` shows up (or panics after 20 s); returns all read.
    pub fn read_until(&self, id: &str, exec_id: &str, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = String::new();
        while !seen.contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} in {seen:?}");
            let mut req = pb::ReadStreamRequest::new();
            req.container_id = id.into();
            req.exec_id = exec_id.into();
            req.stream = Stream::STREAM_STDOUT.into();
            req.wait_ms = 500;
            let resp = self.raw().read_stream(ctx(), &req).unwrap();
            seen.push_str(&String::from_utf8_lossy(&resp.data));
            if resp.eof {
                break;
            }
        }
        assert!(seen.contains(needle), "no {needle:?} in {seen:?}");
        seen
    }

    /// Reads stderr until `needle` shows up (or 20 s pass); returns all read.
    pub fn read_until_stderr(&self, id: &str, needle: &str) -> String {
        self.read_until_stderr_of(id, "", needle)
    }

    /// [`Agent::read_until_stderr`] of an exec'd process.
    pub fn read_until_stderr_of(&self, id: &str, exec_id: &str, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = String::new();
        while !seen.contains(needle) && Instant::now() < deadline {
            let mut req = pb::ReadStreamRequest::new();
            req.container_id = id.into();
            req.exec_id = exec_id.into();
            req.stream = Stream::STREAM_STDERR.into();
            req.wait_ms = 500;
            let resp = self.raw().read_stream(ctx(), &req).unwrap();
            seen.push_str(&String::from_utf8_lossy(&resp.data));
            if resp.eof {
                break;
            }
        }
        seen
    }

    pub fn exec(&self, id: &str, exec_id: &str, process_json: &str) -> ttrpc::Result<u32> {
        let mut req = pb::ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.process_json = process_json.as_bytes().to_vec();
        self.raw().exec_process(ctx(), &req).map(|r| r.pid)
    }

    pub fn events(&self, after: u64) -> pb::GetEventsResponse {
        let mut req = pb::GetEventsRequest::new();
        req.after_seq = after;
        req.wait_ms = 0;
        self.raw().get_events(ctx(), &req).unwrap()
    }

    pub fn stats(&self, id: &str) -> pb::StatsContainerResponse {
        let mut req = pb::StatsContainerRequest::new();
        req.container_id = id.into();
        self.raw().stats_container(ctx(), &req).unwrap()
    }
}

pub fn make_rootfs(root: &Path) {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "home/user"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
}

pub fn json_args(args: &[&str]) -> String {
    serde_json::to_string(args).unwrap()
}

/// An OCI process object.
pub fn process(args: &[&str], extra: &str) -> String {
    let args = json_args(args);
    let sep = if extra.is_empty() { "" } else { "," };
    format!(
        r#"{{"args":{args},"cwd":"/","env":["PATH=/bin","GREETING=hello"],"user":{{"uid":0,"gid":0}}{sep}{extra}}}"#
    )
}

/// A config.json: `process` (from [`process`]) and extra top-level members.
pub fn spec_full(process: &str, extra: &str) -> String {
    let sep = if extra.is_empty() { "" } else { "," };
    format!(
        r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"process":{process}{sep}{extra}}}"#
    )
}

pub fn spec(args: &[&str]) -> String {
    spec_full(&process(args, ""), "")
}

pub fn code(e: ttrpc::Error) -> ttrpc::Code {
    match e {
        ttrpc::Error::RpcStatus(s) => s.code(),
        other => panic!("not an RPC status: {other:?}"),
    }
}

/// Mount points in the agent's namespace under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(dir.to_str().unwrap()))
        .collect()
}

/// Children of `pid` (any of its threads), from /proc/*/stat.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}
