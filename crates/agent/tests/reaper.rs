//! Reaper behaviour with real child processes. An integration test so that this process's
//! `waitpid(-1)` cannot steal children from unrelated unit tests.

use std::process::Command;
use std::time::Duration;

use agent::reaper::{ExitStatus, Reaper};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

#[test]
// The point is that the reaper, not the spawner, collects the children.
#[allow(clippy::zombie_processes)]
fn owned_and_orphan_children() {
    let reaper = Reaper::new();
    let (_child, pid, rx) = reaper
        .spawn_owned(|| {
            let child = Command::new("sh").args(["-c", "exit 7"]).spawn()?;
            let pid = Pid::from_raw(child.id() as i32);
            Ok::<_, std::io::Error>((child, pid))
        })
        .unwrap();
    let orphan = Command::new("true").spawn().unwrap();
    let orphan_pid = Pid::from_raw(orphan.id() as i32);

    let mut reaped = 0;
    let status = loop {
        reaped += reaper.reap_all();
        if let Ok(status) = rx.try_recv() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status, ExitStatus::Exited(7));

    // The orphan is collected too: nothing is left to wait for.
    for _ in 0..200 {
        if reaped >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        reaped += reaper.reap_all();
    }
    assert_eq!(reaped, 2);
    assert_eq!(waitpid(orphan_pid, None), Err(nix::errno::Errno::ECHILD));
    assert_eq!(waitpid(pid, None), Err(nix::errno::Errno::ECHILD));
}
