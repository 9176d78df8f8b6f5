//! The `hyperstart` binary in host mode, driven through the real host client.

mod common;

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use protocol::client::BlockTarget;
use protocol::AgentClient;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(dir: &Dir, extra: &[&str]) -> (Child, AgentClient) {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--dev-dir".into(),
        dir.0.join("dev").into(),
        "--sys-block-dir".into(),
        dir.0.join("sys/block").into(),
    ];
    args.extend(extra.iter().map(Into::into));
    common::spawn_agent(&dir.0.join("agent.sock"), args)
}

fn setup(tag: &str) -> Dir {
    let dir =
        Dir(std::env::temp_dir().join(format!("hyperstart-host-{}-{tag}", std::process::id())));
    std::fs::create_dir_all(dir.0.join("dev")).unwrap();
    std::fs::create_dir_all(dir.0.join("sys/block/vdb")).unwrap();
    std::fs::write(dir.0.join("sys/block/vdb/serial"), "scratch\n").unwrap();
    std::fs::write(dir.0.join("dev/vdb"), b"hello, block").unwrap();
    dir
}

fn wait_exit(child: &mut Child) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "hyperstart did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serves_then_exits_on_reboot() {
    let dir = setup("reboot");
    let (mut child, client) = start(&dir, &[]);
    assert_eq!(
        client.version().unwrap().protocol_version,
        protocol::PROTOCOL_VERSION
    );
    let r = client
        .read_block(BlockTarget::Serial("scratch".into()), 7, 100)
        .unwrap();
    assert_eq!(r.data, b"block");
    assert_eq!(r.size_bytes, 12);
    client.reboot().unwrap();
    assert_eq!(wait_exit(&mut child), 0);
}

#[test]
fn debug_panic_exits_when_allowed() {
    let dir = setup("panic");
    let (mut child, client) = start(&dir, &["--debug"]);
    client.debug_panic().unwrap();
    assert_eq!(wait_exit(&mut child), 1);
}
