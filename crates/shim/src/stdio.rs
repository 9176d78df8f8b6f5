//! containerd's stdio FIFOs joined to the agent's process streams.
//!
//! Output: a thread per stream long-polls `ReadStream` and writes to the FIFO until EOF (the
//! FIFO is closed then, which is how `ctr` knows the output is complete). Input: a thread
//! reads the stdin FIFO and writes to the process; EOF closes the process's stdin.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::thread::JoinHandle;
use std::time::Duration;

use protocol::agent::Stream;
use protocol::client::ReconnectingClient;

/// One ReadStream poll.
const POLL: Duration = Duration::from_millis(500);

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

/// Starts the copies for process `exec_id` (empty: the init process) of `container`; returns
/// the output threads, which end at the streams' EOF.
pub fn start(
    agent: &ReconnectingClient,
    container: &str,
    exec_id: &str,
    paths: &StdioPaths,
) -> Vec<JoinHandle<()>> {
    let mut out = Vec::new();
    let mut streams = vec![(Stream::STREAM_STDOUT, paths.stdout.clone())];
    if !paths.terminal {
        streams.push((Stream::STREAM_STDERR, paths.stderr.clone()));
    }
    for (stream, path) in streams {
        if path.is_empty() {
            continue;
        }
        let (agent, c, e) = (agent.clone(), container.to_owned(), exec_id.to_owned());
        out.push(std::thread::spawn(move || {
            copy_out(&agent, &c, &e, stream, &path)
        }));
    }
    if !paths.stdin.is_empty() {
        let (agent, c, e, path) = (
            agent.clone(),
            container.to_owned(),
            exec_id.to_owned(),
            paths.stdin.clone(),
        );
        std::thread::spawn(move || copy_in(&agent, &c, &e, &path));
    }
    out
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

fn copy_in(agent: &ReconnectingClient, container: &str, exec_id: &str, path: &str) {
    let mut fifo = match OpenOptions::new().read(true).open(path) {
        Ok(f) => f,
        Err(e) => {
            log::warn!("{container}/{exec_id}: opening {path}: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match fifo.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Err(e) = agent.call_once(|c| c.write_stdin(container, exec_id, &buf[..n])) {
                    log::debug!("{container}/{exec_id}: stdin: {e}");
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = agent.call_once(|c| c.close_stdin(container, exec_id));
}
