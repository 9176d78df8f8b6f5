//! Shared by the host-mode integration tests: start the real `hyperstart` binary on a Unix
//! socket, wait for its readiness line, and connect the real host client.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use protocol::client::connect_unix;
use protocol::AgentClient;

/// Spawn `hyperstart --listen unix://<sock> <extra...>` and connect once it reports ready.
pub fn spawn_agent<I, S>(sock: &Path, extra: I) -> (Child, AgentClient)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    spawn_agent_with(sock, extra, |_| {})
}

/// [`spawn_agent`], letting `configure` adjust the command first (working directory,
/// `pre_exec` namespace set-up, ...).
pub fn spawn_agent_with<I, S>(
    sock: &Path,
    extra: I,
    configure: impl FnOnce(&mut Command),
) -> (Child, AgentClient)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(env!("CARGO_BIN_EXE_hyperstart"));
    command
        .arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .args(extra)
        .stdout(Stdio::piped());
    configure(&mut command);
    let mut child = command.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("hyperstart: ready "), "{line:?}");
    let client =
        AgentClient::new(connect_unix(sock).unwrap()).with_timeout(Duration::from_secs(10));
    (child, client)
}
