//! The agent under test: a `hyperstart --listen unix://...` process in its own namespaces.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use protocol::client::connect_unix;
use protocol::AgentClient;

use super::wire::{read_reply, request_body, request_frame, Reply};
use super::{ANSWER_TIMEOUT, ESCAPE_MARKER, REQUEST_TIMEOUT_NANO, SERVICE};
use crate::common;

/// A fresh-connection Ping after this many frames.
pub const PING_EVERY: usize = 10;

/// A `hyperstart --listen unix://...` process isolated in its own namespaces, its directory,
/// and the trail of recent frames for failure reports.
pub struct Harness {
    pub case: &'static str,
    pub seed: u64,
    pub base: PathBuf,
    pub sock: PathBuf,
    pub child: Child,
    pub recent: VecDeque<String>,
    pub frames: usize,
    pub passwd_before: (i64, i64, Vec<u8>),
}

/// Runs in the forked child before exec: new network, UTS, IPC and mount namespaces, mounts
/// made private, a fresh tmpfs on /run.
pub fn isolate() -> std::io::Result<()> {
    let flags = libc::CLONE_NEWNET | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWNS;
    // SAFETY: unshare(2) takes no pointers; the child is single-threaded after fork.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: static NUL-terminated strings; a null data pointer is allowed for a remount.
    let private = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if private != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: static NUL-terminated strings.
    let run = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            c"/run".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"mode=0755,size=64m".as_ptr().cast(),
        )
    };
    if run != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn passwd_state() -> (i64, i64, Vec<u8>) {
    let meta = std::fs::metadata("/etc/passwd").unwrap();
    (
        meta.mtime(),
        meta.mtime_nsec(),
        std::fs::read("/etc/passwd").unwrap(),
    )
}

impl Harness {
    pub fn start(case: &'static str, seed: u64) -> Harness {
        eprintln!("protocol_fuzz {case}: seed {seed:#x} (HYPERNETES_FUZZ_SEED overrides)");
        let base =
            std::env::temp_dir().join(format!("hyperstart-fuzz-{}-{case}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let work = base.join("work");
        for dir in ["work", "dev", "sys/block/vdb"] {
            std::fs::create_dir_all(base.join(dir)).unwrap();
        }
        std::fs::write(base.join("sys/block/vdb/serial"), "scratch\n").unwrap();
        std::fs::write(base.join("dev/vdb"), vec![0x5a; 8192]).unwrap();
        let log = File::create(base.join("agent.log")).unwrap();
        let sock = base.join("agent.sock");
        let args = [
            "--dev-dir".into(),
            base.join("dev").into_os_string(),
            "--sys-block-dir".into(),
            base.join("sys/block").into_os_string(),
            "--state-dir".into(),
            base.join("state").into_os_string(),
        ];
        let passwd_before = passwd_state();
        let (child, _client) = common::spawn_agent_with(&sock, args, |cmd| {
            cmd.current_dir(&work).stderr(log);
            // SAFETY: `isolate` makes raw syscalls only: no allocation, no locks.
            unsafe { cmd.pre_exec(isolate) };
        });
        Harness {
            case,
            seed,
            base,
            sock,
            child,
            recent: VecDeque::new(),
            frames: 0,
            passwd_before,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn connect(&self) -> UnixStream {
        let conn = UnixStream::connect(&self.sock)
            .unwrap_or_else(|e| self.fail(&format!("connecting to the agent: {e}")));
        conn.set_write_timeout(Some(ANSWER_TIMEOUT)).unwrap();
        conn
    }

    /// Panics with the seed, the recent frames and the agent's log tail.
    pub fn fail(&self, msg: &str) -> ! {
        let mut report = format!(
            "protocol_fuzz {}: {msg}\n  seed {:#x} (rerun with HYPERNETES_FUZZ_SEED={:#x}), \
             after {} frames; last frames, oldest first:\n",
            self.case, self.seed, self.seed, self.frames
        );
        for frame in &self.recent {
            let _ = writeln!(report, "    {frame}");
        }
        let log = std::fs::read_to_string(self.base.join("agent.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        report.push_str("  agent log tail:\n");
        for line in tail.iter().rev() {
            let _ = writeln!(report, "    {line}");
        }
        panic!("{report}");
    }

    /// Records a frame about to be sent.
    pub fn note(&mut self, what: String) {
        self.frames += 1;
        if self.recent.len() == PING_EVERY + 2 {
            self.recent.pop_front();
        }
        self.recent.push_back(format!("#{} {what}", self.frames));
    }

    /// The process still runs; every [`PING_EVERY`] frames, a fresh connection answers Ping.
    pub fn after_frame(&mut self) {
        self.assert_running();
        if self.frames.is_multiple_of(PING_EVERY) {
            self.assert_alive();
        }
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            self.fail(&format!("the agent exited: {status}"));
        }
    }

    /// Still running and answering Ping on a new connection.
    pub fn assert_alive(&mut self) {
        self.assert_running();
        let nonce = 0x5eed ^ self.frames as u64;
        let answered = connect_unix(&self.sock)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                AgentClient::new(c)
                    .with_timeout(ANSWER_TIMEOUT)
                    .ping(nonce)
                    .map_err(|e| format!("{e:?}"))
            });
        match answered {
            Ok(n) if n == nonce => {}
            other => self.fail(&format!("no Ping answer on a fresh connection: {other:?}")),
        }
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Sends one request for `method` of the agent's service on `conn`; `false` if the
    /// connection is gone.
    pub fn send(
        conn: &mut UnixStream,
        stream_id: u32,
        method: &str,
        payload: &[u8],
        timeout_nano: i64,
    ) -> bool {
        let body = request_body(
            SERVICE.as_bytes(),
            method.as_bytes(),
            payload,
            timeout_nano,
            &[],
        );
        conn.write_all(&request_frame(stream_id, &body)).is_ok()
    }

    /// Sends one request on `conn` and waits up to `patience` for its answer.
    pub fn call_raw(
        &mut self,
        conn: &mut UnixStream,
        stream_id: u32,
        method: &str,
        payload: &[u8],
        patience: Duration,
    ) -> Reply {
        if !Self::send(conn, stream_id, method, payload, REQUEST_TIMEOUT_NANO) {
            return Reply::Closed;
        }
        self.reply(conn, method, patience)
    }

    /// Waits up to `patience` for an answer on `conn`; fails on a malformed one.
    pub fn reply(&self, conn: &mut UnixStream, method: &str, patience: Duration) -> Reply {
        match read_reply(conn, patience) {
            Ok(reply) => reply,
            Err(violation) => self.fail(&format!("{method}: {violation}")),
        }
    }

    /// Nothing left the agent's own directories: /etc/passwd is as it was and no file holds
    /// the marker of the hostile CopyFile requests.
    pub fn assert_nothing_escaped(&self) {
        if passwd_state() != self.passwd_before {
            self.fail("/etc/passwd changed");
        }
        let root = PathBuf::from(format!("/proc/{}/root", self.pid()));
        let mut found = Vec::new();
        for dir in [self.base.clone(), root.join("run")] {
            find_marker(&dir, 0, &mut found);
        }
        for name in ["abs", "b", "passwd", "tmp/b", "tmp/abs", "etc/b"] {
            let path = root.join(name);
            if std::fs::read(&path).is_ok_and(|d| d.starts_with(ESCAPE_MARKER)) {
                found.push(path);
            }
        }
        if let Some(parent) = self.base.parent() {
            for name in ["b", "abs", "passwd"] {
                let path = parent.join(name);
                if std::fs::read(&path).is_ok_and(|d| d.starts_with(ESCAPE_MARKER)) {
                    found.push(path);
                }
            }
        }
        if !found.is_empty() {
            self.fail(&format!("hostile CopyFile data was written to {found:?}"));
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Files under `dir` that start with [`ESCAPE_MARKER`].
pub fn find_marker(dir: &Path, depth: u32, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() && depth < 12 {
            find_marker(&path, depth + 1, found);
        } else if kind.is_file() {
            let mut head = vec![0; ESCAPE_MARKER.len()];
            if File::open(&path)
                .and_then(|mut f| f.read_exact(&mut head))
                .is_ok()
                && head == ESCAPE_MARKER
            {
                found.push(path);
            }
        }
    }
}
