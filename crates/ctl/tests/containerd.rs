//! hyperctl against the reference CRI implementation: a private containerd + runc started by
//! hack/containerd-test.sh (offline: its pause and busybox images are built from busybox-static).
//!
//! Needs root; run with `cargo test -p ctl --test containerd -- --ignored`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running private containerd; stopped (and its directory removed) on drop, pass or fail.
struct Containerd {
    dir: PathBuf,
}

impl Containerd {
    fn start() -> Containerd {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let dir = PathBuf::from(format!("/tmp/hyperctl-ctrd-{}-{nanos}", std::process::id()));
        let guard = Containerd { dir };
        let out = Command::new(script())
            .arg("start")
            .arg(&guard.dir)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run hack/containerd-test.sh");
        assert!(
            out.status.success(),
            "hack/containerd-test.sh start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(guard.dir.join("containerd.log")).unwrap_or_default()
        );
        guard
    }

    fn endpoint(&self) -> String {
        format!("unix://{}/containerd.sock", self.dir.display())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        match Command::new(script())
            .arg("stop")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "hack/containerd-test.sh stop failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("cannot run hack/containerd-test.sh stop: {e}"),
        }
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hack/containerd-test.sh")
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self, what: &str) -> Run {
        assert_eq!(
            self.code, 0,
            "{what}: exit {}; stderr: {}",
            self.code, self.stderr
        );
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Runs hyperctl against `ctrd`, killing it after two minutes.
fn hyperctl(ctrd: &Containerd, args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hyperctl"))
        .arg("--endpoint")
        .arg(ctrd.endpoint())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start hyperctl");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "hyperctl {args:?} hung; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("wait");
    let run = Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    };
    eprintln!(
        "$ hyperctl {} -> {}\n{}{}",
        args.join(" "),
        run.code,
        run.stdout,
        run.stderr
    );
    run
}

fn names(list: &Value, key: &str) -> Vec<(String, i64)> {
    list[key]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    (
                        x["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        x["state"].as_i64().unwrap_or(-1),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn state_of(list: &[(String, i64)], name: &str) -> Option<i64> {
    list.iter().find(|(n, _)| n == name).map(|(_, s)| *s)
}

const POD_READY: i64 = 0;
const POD_NOTREADY: i64 = 1;
const CONTAINER_RUNNING: i64 = 1;
const CONTAINER_EXITED: i64 = 2;

#[test]
#[ignore = "starts containerd: run with --ignored"]
fn hyperctl_against_containerd() {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .expect("cannot run id");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "this test starts containerd: run it as root"
    );
    let ctrd = Containerd::start();

    // info and images
    let info = hyperctl(&ctrd, &["info"]).ok("info");
    assert!(info.stdout.contains("containerd"), "{}", info.stdout);
    assert!(info.stdout.contains("RuntimeReady=true"), "{}", info.stdout);
    let info = hyperctl(&ctrd, &["-o", "json", "info"]).ok("info -o json");
    assert_eq!(info.json()["version"]["runtime_name"], "containerd");
    let images = hyperctl(&ctrd, &["images"]).ok("images");
    assert!(
        images.stdout.contains("docker.io/library/busybox"),
        "{}",
        images.stdout
    );
    let images = hyperctl(&ctrd, &["images", "-o", "json"])
        .ok("images -o json")
        .json();
    assert!(
        images["images"]
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i["repo_tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "docker.io/library/busybox:latest")))),
        "{images}"
    );

    // run: output, exit codes, partial lines
    let r = hyperctl(
        &ctrd,
        &["run", "--rm", "--name", "t-rm", "busybox", "echo", "hello"],
    )
    .ok("run --rm");
    assert_eq!(r.stdout, "hello\n");
    let r = hyperctl(
        &ctrd,
        &[
            "run",
            "--name",
            "t-exit",
            "busybox",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
    );
    assert_eq!(r.code, 3, "stderr: {}", r.stderr);
    assert_eq!(r.stdout, "out\n");
    assert!(r.stderr.contains("err\n"), "{}", r.stderr);
    // no trailing newline: the runtime writes a P line that is never completed
    let r = hyperctl(&ctrd, &["run", "--rm", "busybox", "printf", "abc"]).ok("run printf");
    assert_eq!(r.stdout, "abc");
    // longer than containerd's 16 KiB log line limit: split into P lines, joined back
    let r = hyperctl(
        &ctrd,
        &[
            "run",
            "--rm",
            "-e",
            "N=40000",
            "busybox",
            "sh",
            "-c",
            "head -c $N /dev/zero | tr '\\0' x; echo",
        ],
    )
    .ok("run long line");
    assert_eq!(r.stdout, format!("{}\n", "x".repeat(40000)));

    // a detached container to exec into
    let r = hyperctl(
        &ctrd,
        &[
            "run",
            "-d",
            "--name",
            "t-sleep",
            "busybox",
            "sh",
            "-c",
            "echo started; sleep 3600",
        ],
    )
    .ok("run -d");
    let sleeper = r.stdout.trim().to_string();
    assert_eq!(sleeper.len(), 64, "not a container id: {sleeper}");

    let pods_json = hyperctl(&ctrd, &["pods", "-o", "json"])
        .ok("pods -o json")
        .json();
    let log_dirs: Vec<PathBuf> = pods_json["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["annotations"]["io.hypernetes.hyperctl/log-directory"].as_str())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(log_dirs.len(), 2, "{pods_json}");
    assert!(log_dirs.iter().all(|d| d.is_dir()), "{log_dirs:?}");
    let pods = names(&pods_json, "items");
    assert_eq!(state_of(&pods, "t-exit"), Some(POD_READY), "{pods:?}");
    assert_eq!(state_of(&pods, "t-sleep"), Some(POD_READY), "{pods:?}");
    assert_eq!(state_of(&pods, "t-rm"), None, "--rm left its pod: {pods:?}");
    let ps = hyperctl(&ctrd, &["ps", "-a", "-o", "json"])
        .ok("ps -a -o json")
        .json();
    let ps = names(&ps, "containers");
    assert_eq!(state_of(&ps, "t-exit"), Some(CONTAINER_EXITED), "{ps:?}");
    assert_eq!(state_of(&ps, "t-sleep"), Some(CONTAINER_RUNNING), "{ps:?}");
    let running = hyperctl(&ctrd, &["ps", "-q"]).ok("ps -q");
    assert_eq!(running.stdout.trim(), sleeper);
    let table = hyperctl(&ctrd, &["pods"]).ok("pods");
    assert!(table.stdout.starts_with("POD ID"), "{}", table.stdout);
    assert!(table.stdout.contains("t-sleep"), "{}", table.stdout);

    // exec, by name and by id prefix
    let r = hyperctl(
        &ctrd,
        &[
            "exec",
            "t-sleep",
            "sh",
            "-c",
            "echo in; echo oops >&2; exit 5",
        ],
    );
    assert_eq!(r.code, 5, "stderr: {}", r.stderr);
    assert_eq!(r.stdout, "in\n");
    assert_eq!(r.stderr, "oops\n");
    let r = hyperctl(&ctrd, &["exec", &sleeper[..8], "cat", "/etc/hostname"]).ok("exec by prefix");
    assert_eq!(r.stdout, "t-sleep\n");

    // logs
    let r = hyperctl(&ctrd, &["logs", "t-exit"]).ok("logs");
    assert_eq!(r.stdout, "out\n");
    assert_eq!(r.stderr, "err\n");
    let r = hyperctl(&ctrd, &["logs", "-f", "t-exit"]).ok("logs -f of an exited container");
    assert_eq!(r.stdout, "out\n");
    let r = hyperctl(&ctrd, &["logs", "-t", &sleeper[..12]]).ok("logs -t");
    assert!(r.stdout.ends_with("Z started\n"), "{}", r.stdout);

    // stop and rm: a container by id prefix, pods by name
    let r = hyperctl(&ctrd, &["stop", "-t", "0", &sleeper[..10]]).ok("stop container");
    assert_eq!(r.stdout.trim(), sleeper);
    let ps = names(
        &hyperctl(&ctrd, &["ps", "-a", "-o", "json"]).ok("ps").json(),
        "containers",
    );
    assert_eq!(state_of(&ps, "t-sleep"), Some(CONTAINER_EXITED), "{ps:?}");
    let r = hyperctl(&ctrd, &["rm", "t-exit"]);
    assert_eq!(r.code, 1, "rm of a ready pod without -f succeeded");
    assert!(r.stderr.contains("rm -f"), "{}", r.stderr);
    hyperctl(&ctrd, &["stop", "t-sleep"]).ok("stop pod");
    let pods = names(
        &hyperctl(&ctrd, &["pods", "-o", "json"]).ok("pods").json(),
        "items",
    );
    assert_eq!(state_of(&pods, "t-sleep"), Some(POD_NOTREADY), "{pods:?}");
    hyperctl(&ctrd, &["rm", "t-sleep"]).ok("rm stopped pod");
    hyperctl(&ctrd, &["rm", "-f", "t-exit"]).ok("rm -f ready pod");
    let pods = names(
        &hyperctl(&ctrd, &["pods", "-o", "json"]).ok("pods").json(),
        "items",
    );
    assert!(pods.is_empty(), "pods left: {pods:?}");
    let left: Vec<_> = log_dirs.iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "pod log directories left: {left:?}");

    let r = hyperctl(&ctrd, &["rm", "no-such-thing"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("no pod or container matches"),
        "{}",
        r.stderr
    );
    let r = hyperctl(&ctrd, &["logs", "no-such-thing"]);
    assert_eq!(r.code, 1);

    // bench
    let r = hyperctl(&ctrd, &["bench", "--pods", "4", "--parallel", "2"]).ok("bench");
    let line = r.stdout.lines().last().unwrap_or_default().to_string();
    let value = line
        .strip_prefix("pod_start_ms containerd=")
        .unwrap_or_else(|| panic!("last line is not the pod_start_ms line: {line}"));
    let ms: f64 = value.parse().unwrap_or_else(|e| panic!("{value}: {e}"));
    assert!(ms > 0.0, "{line}");
    let pods = names(
        &hyperctl(&ctrd, &["pods", "-o", "json"]).ok("pods").json(),
        "items",
    );
    assert!(pods.is_empty(), "bench left pods: {pods:?}");
}
