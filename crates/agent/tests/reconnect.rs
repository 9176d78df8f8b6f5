//! `ReconnectingClient` against the real `hyperstart` binary in host mode: the agent is killed
//! and restarted on the same socket path under one client.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use protocol::client::ReconnectingClient;
use protocol::RpcError;

/// A test directory and the agent processes started in it, all cleaned up on drop.
struct Scene {
    dir: PathBuf,
    agent: Option<Child>,
}

impl Scene {
    fn new(tag: &str) -> Scene {
        let dir =
            std::env::temp_dir().join(format!("hyperstart-reconnect-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scene { dir, agent: None }
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// Starts an agent on the scene's socket (replacing the stale socket file of a dead one).
    fn start(&mut self) {
        assert!(self.agent.is_none());
        let state = self.dir.join("state");
        let (child, _client) =
            common::spawn_agent(&self.sock(), ["--state-dir".as_ref(), state.as_os_str()]);
        self.agent = Some(child);
    }

    /// SIGKILLs the agent and reaps it: its connections are closed by the kernel, its socket
    /// file stays behind.
    fn kill(&mut self) {
        let mut child = self.agent.take().expect("an agent runs");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(Path::new(&self.sock()).exists(), "stale socket file stays");
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn idempotent_calls_survive_an_agent_restart() {
    let mut scene = Scene::new("restart");
    scene.start();
    let client = ReconnectingClient::unix(scene.sock()).with_timeout(Duration::from_secs(10));
    assert_eq!(
        client.version().unwrap().protocol_version,
        protocol::PROTOCOL_VERSION
    );
    assert_eq!(client.ping(1).unwrap(), 1);
    assert_eq!(client.dials(), 1);

    // While no agent listens, the lost connection is noticed, the re-dial fails, and the error
    // says so.
    scene.kill();
    let err = client.ping(2).unwrap_err();
    assert!(matches!(err, RpcError::Connect(_)), "{err:?}");
    assert_eq!(client.dials(), 1);

    // A new agent on the same path: the very same client carries on.
    scene.start();
    assert_eq!(client.ping(3).unwrap(), 3);
    assert_eq!(client.dials(), 2);
    assert_eq!(
        client.version().unwrap().protocol_version,
        protocol::PROTOCOL_VERSION
    );

    // Killed and restarted between two calls: one idempotent call hides it completely.
    scene.kill();
    scene.start();
    assert_eq!(client.ping(4).unwrap(), 4);
    assert_eq!(client.dials(), 3);
}

#[test]
fn non_idempotent_calls_report_the_lost_connection() {
    let mut scene = Scene::new("once");
    scene.start();
    let client = ReconnectingClient::unix(scene.sock()).with_timeout(Duration::from_secs(10));
    assert_eq!(client.ping(1).unwrap(), 1);

    scene.kill();
    scene.start();
    // RemoveContainer may have run before a connection broke, so it is not repeated: the
    // caller gets the transport error...
    let err = client
        .call_once(|c| c.remove_container("absent"))
        .unwrap_err();
    assert!(err.is_connection_lost(), "{err:?}");
    assert_eq!(client.dials(), 1);

    // ...and the next call dials again and reaches the new agent, which answers it.
    let err = client
        .call_once(|c| c.remove_container("absent"))
        .unwrap_err();
    assert!(err.code().is_some(), "an answer from the agent: {err:?}");
    assert_eq!(client.dials(), 2);
    assert_eq!(client.ping(5).unwrap(), 5);
    assert_eq!(client.dials(), 2);
}
