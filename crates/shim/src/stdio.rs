//! containerd's stdio FIFOs joined to the agent's process streams.
//!
//! Output: a thread per stream long-polls `ReadStream` and writes to the FIFO until EOF (the
//! FIFO is closed then, which is how `ctr` knows the output is complete).
//!
//! Input works as in containerd's runc shim: the shim holds a write end of the stdin FIFO
//! itself, so the copy sees end-of-file only once the client's writer is closed *and*
//! `CloseIO` dropped the shim's own. Whatever the client wrote before `CloseIO` is still in
//! the FIFO then and is forwarded first; only after the copy drained it is the process's
//! stdin closed. (Closing it at `CloseIO` directly would race the copy and lose input.)

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use protocol::agent::Stream;
use protocol::client::ReconnectingClient;

/// One ReadStream poll.
const POLL: Duration = Duration::from_millis(500);
/// How often an idle stdin copy checks whether its process ended.
const STDIN_POLL_MS: libc::c_int = 500;

/// The FIFO paths of a process (empty: not wanted).
#[derive(Clone, Debug, Default)]
pub struct StdioPaths {
    /// stdin FIFO.
    pub stdin: String,
    /// stdout FIFO.
    pub stdout: String,
    /// stderr FIFO.
    pub stderr: String,
    /// Terminal mode (stderr goes with stdout).
    pub terminal: bool,
}

/// The stdin copy of one process.
pub struct StdinCopy {
    /// The shim's own write end of the FIFO; `CloseIO` drops it.
    keepalive: Option<File>,
    /// Set when the process ended: the copy stops without waiting for the client.
    stop: Arc<AtomicBool>,
}

impl StdinCopy {
    /// `CloseIO`: the copy forwards what the FIFO still holds, then closes the process's
    /// stdin once the client's writer is closed too.
    pub fn close(&mut self) {
        self.keepalive = None;
    }
}

impl Drop for StdinCopy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The copies of one process.
#[derive(Default)]
pub struct Copies {
    /// Output threads, which end at the streams' EOF.
    pub output: Vec<JoinHandle<()>>,
    /// The stdin copy, if the process has stdin.
    pub stdin: Option<StdinCopy>,
}

/// Starts the copies for process `exec_id` (empty: the init process) of `container`.
pub fn start(
    agent: &ReconnectingClient,
    container: &str,
    exec_id: &str,
    paths: &StdioPaths,
) -> Copies {
    let mut copies = Copies::default();
    let mut streams = vec![(Stream::STREAM_STDOUT, paths.stdout.clone())];
    if !paths.terminal {
        streams.push((Stream::STREAM_STDERR, paths.stderr.clone()));
    }
    for (stream, path) in streams {
        if path.is_empty() {
            continue;
        }
        let (agent, c, e) = (agent.clone(), container.to_owned(), exec_id.to_owned());
        copies.output.push(std::thread::spawn(move || {
            copy_out(&agent, &c, &e, stream, &path)
        }));
    }
    if !paths.stdin.is_empty() {
        match open_stdin(&paths.stdin) {
            Ok((fifo, keepalive)) => {
                let stop = Arc::new(AtomicBool::new(false));
                let (agent, c, e, flag) = (
                    agent.clone(),
                    container.to_owned(),
                    exec_id.to_owned(),
                    stop.clone(),
                );
                std::thread::spawn(move || copy_in(&agent, &c, &e, fifo, &flag));
                copies.stdin = Some(StdinCopy {
                    keepalive: Some(keepalive),
                    stop,
                });
            }
            Err(e) => log::warn!("{container}/{exec_id}: opening stdin {}: {e}", paths.stdin),
        }
    }
    copies
}

/// The stdin FIFO's read end (non-blocking) and the shim's own write end.
fn open_stdin(path: &str) -> std::io::Result<(File, File)> {
    let fifo = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    // A reader exists now, so a non-blocking open for writing succeeds.
    let keepalive = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    Ok((fifo, keepalive))
}

fn copy_out(
    agent: &ReconnectingClient,
    container: &str,
    exec_id: &str,
    stream: Stream,
    path: &str,
) {
    let mut fifo = match OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) => {
            log::warn!("{container}/{exec_id}: opening {path}: {e}");
            return;
        }
    };
    let mut failures = 0u32;
    // Acknowledged reads: the agent keeps the bytes from `offset` on until a later read says
    // they were written, so a call lost with its connection is simply repeated.
    let mut offset = 0u64;
    loop {
        match agent.read_stream_from(container, exec_id, stream, offset, 0, POLL) {
            Ok(r) => {
                failures = 0;
                if r.acknowledged {
                    let len = u64::try_from(r.data.len()).unwrap_or(u64::MAX);
                    offset = r.offset.saturating_add(len);
                }
                if !r.data.is_empty() && fifo.write_all(&r.data).is_err() {
                    // The reader went away: keep draining so the guest buffer does not stall.
                    log::debug!("{container}/{exec_id}: {path} reader gone");
                }
                if r.eof {
                    return;
                }
            }
            Err(e) if e.code() == Some(ttrpc::Code::NOT_FOUND) => return,
            Err(e) => {
                failures += 1;
                if failures > 100 {
                    log::warn!("{container}/{exec_id}: reading output: {e}");
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Waits up to [`STDIN_POLL_MS`] for `fd` to be readable (or hung up).
fn wait_readable(fd: &File) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call and `fd` stays open.
    unsafe { libc::poll(&mut pfd, 1, STDIN_POLL_MS) };
}

fn copy_in(
    agent: &ReconnectingClient,
    container: &str,
    exec_id: &str,
    mut fifo: File,
    stop: &AtomicBool,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match fifo.read(&mut buf) {
            // Every writer is gone, the shim's own included (CloseIO): end of input.
            Ok(0) => break,
            Ok(n) => {
                // `write_stdin` repeats until the agent took every byte.
                if let Err(e) = agent.call_once(|c| c.write_stdin(container, exec_id, &buf[..n])) {
                    log::debug!("{container}/{exec_id}: stdin: {e}");
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_readable(&fifo),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("{container}/{exec_id}: reading stdin: {e}");
                break;
            }
        }
    }
    let _ = agent.call_once(|c| c.close_stdin(container, exec_id));
}
