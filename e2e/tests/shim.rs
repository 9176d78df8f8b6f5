//! `containerd-shim-hyper-v1` under Debian's containerd 1.6, driven with `ctr` as a user would:
//! every task runs in its own pod VM (booted by the real `hyper-vmm` in the KVM test VM), its
//! rootfs a read-only ext4 disk the shim builds from containerd's overlay snapshot and caches.
//!
//! One containerd for every case (boots are slow under emulation): output and exit codes of
//! `ctr run`, output that a quickly exiting process leaves behind, `ctr task exec` (with stdin,
//! small and larger than a FIFO), pause/resume, metrics, a refused checkpoint, an OOM kill
//! under `--memory-limit`, a SIGKILL from `ctr task kill` seen as status 137 by `ctr run`, a
//! killed shim whose VM containerd's cleanup (the shim's `delete`) stops, a killed VMM that
//! ends its task with status 255, the task events containerd received (`ctr events`), and
//! after `ctr task delete` and `ctr container rm` no VMM, shim, mount, tap, pod state or disk
//! left but the shared image disk. Then CRI: a pod with runtime handler `hyper` and two
//! containers in its one VM, ExecSync, the pod IP inside the guest, the containers' logs, a
//! containerd restart the pod survives, StopPodSandbox + RemovePodSandbox. Last, the image is
//! removed and imported again: the next pod's shim replaces the old disk.
//!
//! The shim binary: `HYPERNETES_SHIM`, else `containerd-shim-hyper-v1` in the test binary's
//! target directory (`cargo build --release -p shim`).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ctl::spec::{prepare_log_dirs, ContainerSpec, PodSpec};
use ctl::{cri, Cri};
use e2e::servers::{block, mounts_mentioning, processes_mentioning, rss_kib, Containerd};
use e2e::{eventually, TempDir};

const IMAGE: &str = "docker.io/library/busybox:latest";
const RUNTIME: &str = "io.containerd.hyper.v1";
/// One `ctr` command, a pod boot included, in the nested test VM.
const CTR_TIMEOUT: Duration = Duration::from_secs(180);
const SHIM_NAME: &str = "containerd-shim-hyper-v1";

fn shim_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("HYPERNETES_SHIM") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/shim-<hash> -> target/<profile>/containerd-shim-hyper-v1
    let exe = std::env::current_exe().expect("the test binary's path");
    match exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(SHIM_NAME))
    {
        Some(p) if p.is_file() => p,
        _ => panic!(
            "{SHIM_NAME} is not next to {}: build it (cargo build --release -p shim) or set \
             HYPERNETES_SHIM",
            exe.display()
        ),
    }
}

struct Ctx {
    ctrd: Containerd,
}

/// `ctr events` running in the background: every event containerd received, one per line
/// (`<time> <namespace> <topic> <event JSON>`).
struct Events {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Events {
    fn start(ctrd: &Containerd) -> Events {
        let mut child = ctrd
            .ctr()
            .arg("events")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run ctr events");
        let out = child.stdout.take().expect("ctr events' stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        Events { child, lines }
    }

    /// Waits up to 30 s for an event on `topic` whose JSON contains every one of `fields`.
    fn expect(&self, topic: &str, fields: &[&str]) {
        let found = eventually(Duration::from_secs(30), || {
            self.lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|l| l.contains(&format!(" {topic} ")) && fields.iter().all(|f| l.contains(f)))
                .then_some(())
        });
        assert!(
            found.is_some(),
            "no {topic} event with {fields:?}; events seen:\n{}",
            self.lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .join("\n")
        );
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last 20 lines of `bytes` (with the number left out), so a failure message keeps its
/// diagnostics in view.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(20);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[{start} lines before]\n"));
    }
    out.push_str(&lines[start..].join("\n"));
    out
}

impl Ctx {
    /// `ctr run -d` of a task `id` that sleeps.
    fn run_detached(&self, id: &str) {
        self.ok(&[
            "run",
            "--runtime",
            RUNTIME,
            "-d",
            IMAGE,
            id,
            "sleep",
            "1000",
        ]);
    }

    /// Waits up to 30 s for every shim and hyper-vmm to be gone.
    fn assert_no_shims_or_vmms(&self, when: &str) {
        let gone = eventually(Duration::from_secs(30), || {
            (self.shims().is_empty() && self.vmms().is_empty()).then_some(())
        });
        assert!(
            gone.is_some(),
            "left running {when}: shims {:?}, VMMs {:?}",
            self.shims(),
            self.vmms()
        );
    }

    /// containerd's log tail and every pod's VMM log and console, for failure messages.
    fn diagnostics(&self) -> String {
        let mut out = self.ctrd.log_tail();
        let mut files = Vec::new();
        if let Ok(dirs) = std::fs::read_dir(self.ctrd.hyper_logs()) {
            for d in dirs.flatten() {
                if let Ok(entries) = std::fs::read_dir(d.path()) {
                    files.extend(entries.flatten().map(|e| e.path()));
                }
            }
        }
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(25);
            out.push_str(&format!(
                "\n--- {} (tail) ---\n{}",
                f.display(),
                lines[start..].join("\n")
            ));
        }
        out
    }

    /// Runs `ctr ARGS` with `stdin` and a deadline; its output.
    fn ctr(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = self.ctrd.ctr();
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot run ctr");
        if let Some(data) = stdin {
            let mut w = child.stdin.take().expect("ctr's stdin");
            w.write_all(data).expect("writing ctr's stdin");
        }
        self.wait(child, &format!("ctr {}", args.join(" ")))
    }

    /// Waits for `child` up to [`CTR_TIMEOUT`] (killing it then, and failing).
    fn wait(&self, child: std::process::Child, what: &str) -> Output {
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(CTR_TIMEOUT) {
            Ok(out) => out.unwrap_or_else(|e| panic!("{what}: {e}")),
            Err(_) => {
                e2e::servers::kill(pid, libc::SIGKILL);
                panic!(
                    "`{what}` did not finish within {CTR_TIMEOUT:?}\n{}",
                    self.diagnostics()
                );
            }
        }
    }

    /// `ctr ARGS` must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args, None);
        self.expect_status(&out, 0, args);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn expect_status(&self, out: &Output, code: i32, args: &[&str]) {
        assert_eq!(
            out.status.code(),
            Some(code),
            "`ctr {}`: status {:?}, wanted {code}\nstdout: {}\nstderr: {}\n{}",
            args.join(" "),
            out.status,
            tail(&out.stdout),
            tail(&out.stderr),
            self.diagnostics()
        );
    }

    /// The task's status column in `ctr task ls` (None: no such task).
    fn task_status(&self, id: &str) -> Option<String> {
        self.ok(&["task", "ls"]).lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols.last().unwrap_or(&"").to_string())
        })
    }

    fn wait_status(&self, id: &str, want: &str) {
        let got = eventually(Duration::from_secs(60), || {
            (self.task_status(id).as_deref() == Some(want)).then_some(())
        });
        assert!(
            got.is_some(),
            "task {id} never became {want} (now {:?})\n{}",
            self.task_status(id),
            self.diagnostics()
        );
    }

    /// `hyper-vmm` processes of this containerd's shims.
    fn vmms(&self) -> Vec<(u32, String)> {
        let state = self.ctrd.hyper_state().display().to_string();
        processes_mentioning(&format!("{state}/"))
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("hyper-vmm"))
            .collect()
    }

    /// Shim processes of this containerd.
    fn shims(&self) -> Vec<(u32, String)> {
        let sock = self
            .ctrd
            .dir()
            .join("containerd.sock")
            .display()
            .to_string();
        processes_mentioning(SHIM_NAME)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(&sock))
            .collect()
    }

    /// The cached rootfs disks (name, mtime); their `.layers` records are not listed.
    fn disks(&self) -> Vec<(String, std::time::SystemTime)> {
        let mut v: Vec<(String, std::time::SystemTime)> =
            std::fs::read_dir(self.ctrd.hyper_disks())
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.file_name().to_string_lossy().ends_with(".ext4"))
                        .map(|e| {
                            let mtime = e
                                .metadata()
                                .and_then(|m| m.modified())
                                .unwrap_or(std::time::UNIX_EPOCH);
                            (e.file_name().to_string_lossy().into_owned(), mtime)
                        })
                        .collect()
                })
                .unwrap_or_default();
        v.sort();
        v
    }
}

fn tap_devices() -> BTreeSet<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("tun_flags").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
#[ignore = "boots pod VMs under containerd: run in the KVM test VM (hack/run-e2e.sh)"]
fn ctr_runs_tasks_in_pod_vms() {
    let begin = Instant::now();
    let shim = shim_binary();
    let taps_before = tap_devices();
    let sockets_before = entries(Path::new("/run/containerd/s"));
    let ctx = Ctx {
        ctrd: Containerd::start_with_hyper_shim(&shim),
    };
    eprintln!("containerd started, images imported: {:?}", begin.elapsed());
    let events = Events::start(&ctx.ctrd);
    let run = |id: &str, cmd: &[&str]| -> Output {
        let mut args = vec!["run", "--runtime", RUNTIME, "--rm", IMAGE, id];
        args.extend_from_slice(cmd);
        ctx.ctr(&args, None)
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();

    // 1. Output and a zero exit; the rootfs disk is built once.
    let t = Instant::now();
    let out = run("hi", &["echo", "hi"]);
    ctx.expect_status(&out, 0, &["run", "hi"]);
    assert_eq!(text(&out.stdout), "hi\n", "stderr: {}", text(&out.stderr));
    eprintln!("ctr run echo hi (first, disk built): {:?}", t.elapsed());
    let disks = ctx.disks();
    assert_eq!(
        disks.len(),
        1,
        "one rootfs disk after the first run: {disks:?}"
    );
    assert!(disks[0].0.ends_with(".ext4"), "{disks:?}");
    let record = ctx
        .ctrd
        .hyper_disks()
        .join(disks[0].0.replace(".ext4", ".layers"));
    assert!(record.is_file(), "{} is missing", record.display());

    // 2. stdout and stderr apart, and a non-zero exit status.
    let t = Instant::now();
    let out = run("streams", &["sh", "-c", "echo out; echo err >&2; exit 3"]);
    ctx.expect_status(&out, 3, &["run", "streams"]);
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    eprintln!("ctr run exit 3 (cached disk): {:?}", t.elapsed());

    // 3. A process that writes a lot and exits at once loses nothing.
    let out = run(
        "burst",
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 3000 ]; do echo line$i; i=$((i+1)); done",
        ],
    );
    ctx.expect_status(&out, 0, &["run", "burst"]);
    let want: String = (0..3000).map(|i| format!("line{i}\n")).collect();
    let got = text(&out.stdout);
    assert!(
        got == want,
        "burst output: {} lines, last {:?}",
        got.lines().count(),
        got.lines().last()
    );

    // 4. A running task: exec with output, exit status and stdin.
    ctx.run_detached("long");
    ctx.wait_status("long", "RUNNING");
    let vmms = ctx.vmms();
    assert_eq!(vmms.len(), 1, "one VMM for the running task: {vmms:?}");
    let shims = ctx.shims();
    assert_eq!(shims.len(), 1, "one shim for the running task: {shims:?}");
    eprintln!(
        "RSS with one idle pod: shim {} KiB, hyper-vmm {} KiB",
        rss_kib(shims[0].0).unwrap_or(0),
        rss_kib(vmms[0].0).unwrap_or(0)
    );
    assert_eq!(
        ctx.ok(&["task", "exec", "--exec-id", "x", "long", "echo", "in"]),
        "in\n"
    );
    let args = [
        "task",
        "exec",
        "--exec-id",
        "y",
        "long",
        "sh",
        "-c",
        "exit 5",
    ];
    let out = ctx.ctr(&args, None);
    ctx.expect_status(&out, 5, &args);
    // stdin reaches the exec before CloseIO ends it: small inputs several times over (CloseIO
    // arrives right after ctr wrote them), and one much larger than a FIFO's buffer and an
    // agent WriteStdin.
    for i in 0..3 {
        let id = format!("in{i}");
        let args = ["task", "exec", "--exec-id", &id, "long", "cat"];
        let input = format!("from stdin {i}\n");
        let out = ctx.ctr(&args, Some(input.as_bytes()));
        ctx.expect_status(&out, 0, &args);
        assert_eq!(text(&out.stdout), input);
    }
    let big: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let args = ["task", "exec", "--exec-id", "big", "long", "wc", "-c"];
    let out = ctx.ctr(&args, Some(&big));
    ctx.expect_status(&out, 0, &args);
    assert_eq!(text(&out.stdout).trim(), "300000");
    let ps = ctx.ok(&["task", "ps", "long"]);
    assert!(ps.lines().count() >= 2, "ctr task ps long: {ps}");

    // Pause and resume (the container's cgroup is frozen in the guest), then metrics.
    ctx.ok(&["task", "pause", "long"]);
    ctx.wait_status("long", "PAUSED");
    ctx.ok(&["task", "resume", "long"]);
    ctx.wait_status("long", "RUNNING");
    assert_eq!(
        ctx.ok(&[
            "task",
            "exec",
            "--exec-id",
            "after",
            "long",
            "echo",
            "resumed"
        ]),
        "resumed\n"
    );
    let metrics = ctx.ok(&["task", "metrics", "--format", "json", "long"]);
    let m: serde_json::Value = serde_json::from_str(&metrics)
        .unwrap_or_else(|e| panic!("ctr task metrics: {e}: {metrics}"));
    let num = |path: &[&str]| {
        path.iter()
            .fold(&m, |v, k| &v[*k])
            .as_u64()
            .unwrap_or_else(|| panic!("metrics {path:?} missing: {metrics}"))
    };
    assert!(num(&["memory", "usage"]) > 0, "{metrics}");
    assert!(num(&["pids", "current"]) >= 1, "{metrics}");
    assert!(num(&["cpu", "usage_usec"]) > 0, "{metrics}");
    // Checkpoint is refused clearly (ctr pauses around it, and resumes).
    let args = ["task", "checkpoint", "long"];
    let out = ctx.ctr(&args, None);
    assert_ne!(out.status.code(), Some(0), "ctr task checkpoint succeeded");
    assert!(
        text(&out.stderr).contains("not supported by the hyper runtime"),
        "ctr task checkpoint: {}",
        text(&out.stderr)
    );
    ctx.wait_status("long", "RUNNING");

    // A container over its memory limit is OOM-killed in the guest: 137 and an OOM event.
    let out = ctx.ctr(
        &[
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            "--memory-limit",
            "16777216",
            IMAGE,
            "oom",
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=64M",
            "count=1",
        ],
        None,
    );
    ctx.expect_status(&out, 137, &["run", "oom"]);
    events.expect("/tasks/oom", &[r#""container_id":"oom""#]);

    // 5. A signal from outside ends `ctr run` with 128 + signal.
    let mut cmd = ctx.ctrd.ctr();
    cmd.args([
        "run",
        "--runtime",
        RUNTIME,
        "--rm",
        IMAGE,
        "sig",
        "sleep",
        "1000",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = cmd.spawn().expect("cannot run ctr");
    ctx.wait_status("sig", "RUNNING");
    ctx.ok(&["task", "kill", "-s", "SIGKILL", "sig"]);
    let out = ctx.wait(child, "ctr run sig");
    ctx.expect_status(&out, 137, &["run", "sig"]);

    // 6. The shim dies: containerd runs the shim's `delete`, which stops the orphaned VM.
    ctx.run_detached("crash");
    ctx.wait_status("crash", "RUNNING");
    let crash_vmm = |ctx: &Ctx| -> Vec<(u32, String)> {
        ctx.vmms()
            .into_iter()
            .filter(|(_, c)| c.contains("/crash/"))
            .collect()
    };
    assert_eq!(crash_vmm(&ctx).len(), 1, "{:?}", ctx.vmms());
    let shim = ctx
        .shims()
        .into_iter()
        .find(|(_, c)| c.contains(" -id crash "))
        .unwrap_or_else(|| panic!("no shim for crash: {:?}", ctx.shims()));
    e2e::servers::kill(shim.0, libc::SIGKILL);
    let cleaned = eventually(Duration::from_secs(60), || {
        (crash_vmm(&ctx).is_empty() && ctx.task_status("crash").is_none()).then_some(())
    });
    assert!(
        cleaned.is_some(),
        "after the shim's death: VMM {:?}, task {:?}\n{}",
        crash_vmm(&ctx),
        ctx.task_status("crash"),
        ctx.diagnostics()
    );
    ctx.ok(&["container", "rm", "crash"]);

    // 7. The VMM dies under a running task: the task ends (status 255) with an exit event.
    ctx.run_detached("vmmdie");
    ctx.wait_status("vmmdie", "RUNNING");
    let vmm: Vec<(u32, String)> = ctx
        .vmms()
        .into_iter()
        .filter(|(_, c)| c.contains("/vmmdie/"))
        .collect();
    assert_eq!(vmm.len(), 1, "{:?}", ctx.vmms());
    e2e::servers::kill(vmm[0].0, libc::SIGKILL);
    ctx.wait_status("vmmdie", "STOPPED");
    events.expect(
        "/tasks/exit",
        &[r#""container_id":"vmmdie""#, r#""exit_status":255"#],
    );
    let out = ctx.ctr(&["task", "delete", "vmmdie"], None);
    ctx.expect_status(&out, 0, &["task", "delete", "vmmdie"]);
    ctx.ok(&["container", "rm", "vmmdie"]);

    // 8. Kill, delete, remove: nothing of the pod stays.
    ctx.ok(&["task", "kill", "-s", "SIGKILL", "long"]);
    ctx.wait_status("long", "STOPPED");
    let out = ctx.ctr(&["task", "delete", "long"], None);
    ctx.expect_status(&out, 0, &["task", "delete", "long"]);
    assert!(
        text(&out.stderr).contains("137"),
        "ctr task delete reports the exit status: {}",
        text(&out.stderr)
    );
    ctx.ok(&["container", "rm", "long"]);
    assert_eq!(ctx.task_status("long"), None);
    assert!(ctx.ok(&["container", "ls", "-q"]).trim().is_empty());
    ctx.assert_no_shims_or_vmms("after ctr task delete and ctr container rm");
    let dir = ctx.ctrd.dir().display().to_string();
    assert_eq!(mounts_mentioning(&dir), Vec::<String>::new(), "mounts left");
    assert_eq!(tap_devices(), taps_before, "tap devices left");
    assert_eq!(
        entries(&ctx.ctrd.hyper_state()),
        Vec::<String>::new(),
        "pod state left"
    );
    assert_eq!(
        entries(&ctx.ctrd.hyper_logs()),
        Vec::<String>::new(),
        "pod logs left"
    );
    assert_eq!(
        ctx.disks(),
        disks,
        "the one shared disk, never rebuilt, and nothing else"
    );
    assert_eq!(
        entries(Path::new("/run/containerd/s")),
        sockets_before,
        "shim sockets left"
    );
    // The task events containerd got from the shim.
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        events.expect(topic, &[r#""container_id":"hi""#]);
    }
    events.expect(
        "/tasks/exit",
        &[r#""container_id":"streams""#, r#""exit_status":3"#],
    );
    for topic in ["/tasks/exec-added", "/tasks/exec-started"] {
        events.expect(topic, &[r#""container_id":"long""#, r#""exec_id":"x""#]);
    }
    events.expect(
        "/tasks/exit",
        &[
            r#""container_id":"long""#,
            r#""id":"y""#,
            r#""exit_status":5"#,
        ],
    );
    for topic in ["/tasks/paused", "/tasks/resumed"] {
        events.expect(topic, &[r#""container_id":"long""#]);
    }
    drop(events);

    // 9. CRI: a pod with runtime handler `hyper`, two containers in its one VM.
    cri_pod(&ctx);
    assert!(ctx.vmms().is_empty(), "VMMs left: {:?}", ctx.vmms());
    assert_eq!(tap_devices(), taps_before, "tap devices left");
    assert_eq!(
        entries(&ctx.ctrd.hyper_state()),
        Vec::<String>::new(),
        "pod state left"
    );
    // The CRI containers' snapshots have the same parents as `ctr run`'s: the same disk.
    assert_eq!(ctx.disks(), disks, "the one shared disk after the CRI pod");

    // 10. The image goes (containerd deletes its snapshots) and comes back (new snapshots):
    // the next pod's shim builds a new disk and removes the old one.
    // Every image reference goes: containerd's CRI keeps its own by image id, and the pause
    // image shares busybox's one layer (both are built from busybox-static), so its snapshot
    // stays while any of them remains. No pod is left that needs them.
    let refs = ctx.ok(&["image", "ls", "-q"]);
    let mut args = vec!["image", "rm", "--sync"];
    args.extend(refs.lines().filter(|l| !l.trim().is_empty()));
    ctx.ok(&args);
    ctx.ctrd.import("busybox");
    let out = run("fresh", &["echo", "fresh"]);
    ctx.expect_status(&out, 0, &["run", "fresh"]);
    assert_eq!(text(&out.stdout), "fresh\n");
    let renewed = eventually(Duration::from_secs(30), || {
        let now = ctx.disks();
        (now.len() == 1 && now[0].0 != disks[0].0).then_some(now)
    });
    assert!(
        renewed.is_some(),
        "the old disk {disks:?} should be replaced by one new disk: {:?}",
        ctx.disks()
    );
    eprintln!("shim e2e: {:?}", begin.elapsed());
}

/// RunPodSandbox with the `hyper` handler, two containers, ExecSync, the containers' logs, the
/// pod's IP inside the guest, then StopPodSandbox + RemovePodSandbox.
fn cri_pod(ctx: &Ctx) {
    let t = Instant::now();
    let cri = ctx.ctrd.connect();
    let logs = TempDir::new("shim-cri-logs");
    let mut pod = PodSpec::new("shim-pod");
    pod.log_root = Some(logs.path().to_path_buf());
    let (c, config) = (cri.clone(), pod.config());
    let pod_id = block(async move { c.run_pod_sandbox(config, "hyper").await })
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctx.diagnostics()));
    eprintln!("CRI RunPodSandbox (hyper): {:?}", t.elapsed());
    let (c, id) = (cri.clone(), pod_id.clone());
    let status = block(async move { c.pod_sandbox_status(&id).await }).expect("PodSandboxStatus");
    let ip = status
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    assert!(
        ip.starts_with("10.99.0."),
        "pod IP from the CNI bridge: {ip:?}"
    );
    assert_eq!(ctx.vmms().len(), 1, "one VMM for the pod: {:?}", ctx.vmms());

    let mut ids = Vec::new();
    for name in ["one", "two"] {
        let spec = ContainerSpec {
            name: name.into(),
            image: IMAGE.into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                format!("echo {name} started; exec sleep 1000"),
            ],
            ..Default::default()
        };
        prepare_log_dirs(&pod, &spec).expect("log dirs");
        let (c, pid, config, sandbox) =
            (cri.clone(), pod_id.clone(), spec.config(true), pod.config());
        let id = block(async move {
            let id = c.create_container(&pid, config, sandbox).await?;
            c.start_container(&id).await?;
            Ok::<_, ctl::CtlError>(id)
        })
        .unwrap_or_else(|e| panic!("container {name}: {e}\n{}", ctx.diagnostics()));
        ids.push((
            name,
            id,
            pod.log_directory().expect("log dir").join(spec.log_path()),
        ));
    }
    // Both containers run in the pod's one VM, served by the pod's one shim.
    assert_eq!(
        ctx.vmms().len(),
        1,
        "one VMM for two containers: {:?}",
        ctx.vmms()
    );
    assert_eq!(ctx.shims().len(), 1, "one shim per pod: {:?}", ctx.shims());

    let exec = |cri: &Cri, id: &str, cmd: &[&str]| {
        let (c, id, cmd) = (
            cri.clone(),
            id.to_owned(),
            cmd.iter().map(|s| s.to_string()).collect(),
        );
        block(async move { c.exec_sync(&id, cmd, Some(Duration::from_secs(60))).await })
            .unwrap_or_else(|e| panic!("ExecSync: {e}\n{}", ctx.diagnostics()))
    };
    let r = exec(&cri, &ids[0].1, &["echo", "exec"]);
    assert_eq!((r.exit_code, r.stdout.as_slice()), (0, &b"exec\n"[..]));
    let r = exec(&cri, &ids[1].1, &["sh", "-c", "echo err >&2; exit 4"]);
    assert_eq!((r.exit_code, r.stderr.as_slice()), (4, &b"err\n"[..]));
    // The guest has the pod's CNI address (the VM's NIC is the pod's network).
    let r = exec(&cri, &ids[0].1, &["ip", "-o", "-4", "addr", "show"]);
    let addrs = String::from_utf8_lossy(&r.stdout).into_owned();
    assert!(
        addrs.contains(&format!("{ip}/")),
        "guest addresses: {addrs}"
    );
    // CRI stats (containerd asks the shim's Stats) and a resource update (the shim's Update).
    e2e::cri_checks::update_and_stats(&cri, &ids[1].1);
    // The containers' output reached their CRI logs (written by containerd from the stdio the
    // shim feeds).
    for (name, _, log) in &ids {
        let want = format!("{name} started");
        let found = eventually(Duration::from_secs(30), || {
            std::fs::read_to_string(log)
                .ok()
                .filter(|t| t.contains(&want))
        });
        assert!(found.is_some(), "{} lacks {want:?}", log.display());
    }

    // containerd restarts; the pod's shim and VM carry on, and containerd finds them again.
    let (vmms, shims) = (ctx.vmms(), ctx.shims());
    let t = Instant::now();
    ctx.ctrd.restart();
    let cri = ctx.ctrd.connect();
    eprintln!("containerd restart: {:?}", t.elapsed());
    assert_eq!(
        (ctx.vmms(), ctx.shims()),
        (vmms, shims),
        "the pod's VMM and shim survive"
    );
    for (name, id, _) in &ids {
        let (c, id2) = (cri.clone(), id.clone());
        let st = block(async move { c.container_status(&id2).await })
            .unwrap_or_else(|e| panic!("ContainerStatus {name} after the restart: {e}"));
        assert_eq!(
            st.state,
            cri::ContainerState::ContainerRunning as i32,
            "{name} after containerd's restart: {st:?}"
        );
    }
    let r = exec(&cri, &ids[1].1, &["echo", "after restart"]);
    assert_eq!(
        (r.exit_code, r.stdout.as_slice()),
        (0, &b"after restart\n"[..])
    );

    let t = Instant::now();
    let (c, id) = (cri.clone(), pod_id.clone());
    block(async move {
        c.stop_pod_sandbox(&id).await?;
        c.remove_pod_sandbox(&id).await
    })
    .unwrap_or_else(|e| panic!("stop/remove pod: {e}\n{}", ctx.diagnostics()));
    eprintln!("CRI StopPodSandbox + RemovePodSandbox: {:?}", t.elapsed());
    ctx.assert_no_shims_or_vmms("after RemovePodSandbox");
    let dir = ctx.ctrd.dir().display().to_string();
    let mounts: Vec<String> = mounts_mentioning(&dir)
        .into_iter()
        .filter(|m| m.contains(&pod_id))
        .collect();
    assert_eq!(mounts, Vec::<String>::new(), "mounts of the pod left");
}
