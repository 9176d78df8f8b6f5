//! CRI servers for the end-to-end tests, all offline: a local registry serving a busybox image,
//! `hyperd` with a private configuration and CNI network, and the private containerd + runc of
//! `hack/containerd-test.sh` as the reference. Each is stopped and cleaned up on drop, pass or
//! fail, so that a failed test leaves no VMM, mount or bridge behind for the next one.

use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ctl::{Cri, Endpoint};

use crate::artifact;

/// Per-call timeout of the CRI clients: pod boots in the nested test VM are slow, and ten of
/// them at once slower still.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// The tokio runtime the (synchronous) tests drive the async CRI client with.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// Runs a future to completion on [`runtime`] (callable from any thread).
pub fn block<F: Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// The repository's `hack/` directory.
pub fn hack(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../hack")
        .join(script)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A short private directory under /tmp (hyperd's state root must leave room for 64-character
/// pod ids in 96-byte socket paths), removed on drop after everything mounted below it.
pub struct ShortDir(PathBuf);

impl ShortDir {
    pub fn new(tag: &str) -> ShortDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = PathBuf::from(format!("/tmp/{tag}{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create dir");
        ShortDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ShortDir {
    fn drop(&mut self) {
        for m in mounts_under(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    let mut v: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m == &prefix || m.starts_with(&format!("{prefix}/")))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.len()));
    v
}

/// Lines of /proc/self/mountinfo that mention `needle`.
pub fn mounts_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// Live (non-zombie) processes whose command line mentions `needle`: (pid, command line).
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|&pid| pid != me)
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            if state == 'Z' || state == 'X' {
                return None;
            }
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            cmd.contains(needle)
                .then(|| (pid, cmd.trim_end().to_owned()))
        })
        .collect()
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Sends `signal` to `pid`.
pub fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Processes and mounts whose command line or mount entry names `pod_id`.
fn pod_leftovers(pod_id: &str) -> Vec<String> {
    let mut left: Vec<String> = processes_mentioning(pod_id)
        .into_iter()
        .map(|(pid, cmd)| format!("process {pid}: {cmd}"))
        .collect();
    left.extend(
        mounts_mentioning(pod_id)
            .into_iter()
            .map(|m| format!("mount: {m}")),
    );
    left
}

/// `GET /` from `ip:80` over HTTP/1.0: the body.
pub fn http_get(ip: &str, timeout: Duration) -> std::io::Result<String> {
    http_get_port(ip, 80, timeout)
}

/// `GET /` from `ip:port` over HTTP/1.0: the body.
pub fn http_get_port(ip: &str, port: u16, timeout: Duration) -> std::io::Result<String> {
    let addr = SocketAddr::new(ip.parse().map_err(std::io::Error::other)?, port);
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.to_owned())
        }
        _ => Err(std::io::Error::other(format!("bad answer: {text:?}"))),
    }
}

/// A docker-registry (Debian's `docker-registry`) on a free 127.0.0.1 port, serving
/// `library/busybox:latest` built from busybox-static by `hack/containerd-test.sh image`;
/// killed on drop.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    _dir: crate::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        let dir = crate::TempDir::new("registry");
        let addr = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .expect("registry config");
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                File::create(dir.path().join("registry.log")).expect("registry log"),
            ))
            .spawn()
            .expect("docker-registry must be installed (hack/setup.sh)");
        let reg = Registry {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&reg.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry did not listen on {}",
                reg.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let tar = reg._dir.path().join("busybox.tar");
        crate::sh(&format!(
            "{} image busybox {}",
            hack("containerd-test.sh").display(),
            tar.display()
        ));
        crate::sh(&format!(
            "skopeo copy -q --dest-tls-verify=false docker-archive:{} docker://{}",
            tar.display(),
            reg.image("busybox")
        ));
        reg
    }

    /// `127.0.0.1:<port>/library/<name>:latest`.
    pub fn image(&self, name: &str) -> String {
        format!("{}/library/{name}:latest", self.addr)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bridge of hyperd's test network.
pub const HYPERD_BRIDGE: &str = "hyp-e2e0";
/// Its subnet.
pub const HYPERD_SUBNET: &str = "10.77.0.0/24";
/// The bridge's address (the pods' gateway): a local address of the host.
pub const HYPERD_GATEWAY: &str = "10.77.0.1";

/// `hyperd` with everything under a private directory: socket, pod state, images, VM logs,
/// network namespaces, a CNI conflist (bridge + host-local + portmap, loopback) using Debian's
/// plugins in /usr/lib/cni. Restartable with the same configuration.
pub struct Hyperd {
    dir: ShortDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub netns_dir: PathBuf,
    pub network_state_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Hyperd {
    /// Writes the configuration and starts hyperd (`HYPERNETES_HYPERD`, VMM, kernel and initrd
    /// from the environment); `registry` is trusted over plain HTTP.
    pub fn start(registry: &str) -> Hyperd {
        let dir = ShortDir::new("hyd");
        let d = dir.path().to_path_buf();
        let cni = d.join("cni");
        std::fs::create_dir_all(&cni).expect("cni dir");
        std::fs::write(
            cni.join("10-hyp-e2e.conflist"),
            format!(
                r#"{{
  "cniVersion": "0.4.0",
  "name": "hyp-e2e",
  "plugins": [
    {{
      "type": "bridge", "bridge": "{HYPERD_BRIDGE}", "isGateway": true, "ipMasq": true,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local", "dataDir": "{ipam}",
        "ranges": [[{{ "subnet": "{HYPERD_SUBNET}" }}]], "routes": [{{ "dst": "0.0.0.0/0" }}]
      }}
    }},
    {{ "type": "portmap", "capabilities": {{ "portMappings": true }} }}
  ]
}}
"#,
                ipam = d.join("ipam").display()
            ),
        )
        .expect("conflist");
        std::fs::write(
            cni.join("99-loopback.conf"),
            r#"{ "cniVersion": "0.4.0", "name": "lo", "type": "loopback" }"#,
        )
        .expect("loopback conf");
        let config = d.join("config.toml");
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        std::fs::write(
            &config,
            format!(
                "socket = {socket}\nstate_dir = {state}\nimage_dir = {images}\nvm_log_dir = {vmlogs}\n\
                 vmm = {vmm}\nkernel = {kernel}\ninitrd = {initrd}\n\
                 default_memory_mib = 96\noverhead_memory_mib = 32\nboot_timeout_secs = 180\nagent_call_timeout_secs = 120\n\
                 cni_conf_dir = {cni}\ncni_bin_dirs = [\"/usr/lib/cni\"]\n\
                 netns_dir = {netns}\nnetwork_state_dir = {net}\n\
                 insecure_registries = [\"{registry}\"]\n",
                socket = q(&d.join("hyperd.sock")),
                state = q(&d.join("s")),
                images = q(&d.join("images")),
                vmlogs = q(&d.join("vm")),
                vmm = q(&artifact("HYPERNETES_VMM")),
                kernel = q(&artifact("HYPERNETES_KERNEL")),
                initrd = q(&artifact("HYPERNETES_INITRD")),
                cni = q(&cni),
                netns = q(&d.join("netns")),
                net = q(&d.join("net")),
            ),
        )
        .expect("hyperd config");
        let mut h = Hyperd {
            config,
            socket: d.join("hyperd.sock"),
            state_dir: d.join("s"),
            netns_dir: d.join("netns"),
            network_state_dir: d.join("net"),
            log: d.join("hyperd.log"),
            dir,
            child: None,
        };
        h.spawn();
        h
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.socket.clone())
    }

    /// hyperd's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts hyperd (again), appending to its log.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "hyperd already runs");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("hyperd log");
        let child = Command::new(artifact("HYPERNETES_HYPERD"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("cannot start hyperd (HYPERNETES_HYPERD)");
        self.child = Some(child);
    }

    /// Waits until hyperd answers Version, and returns a client.
    pub fn connect(&mut self) -> Cri {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("hyperd exited with {st}\n{}", self.log_tail());
                }
            }
            if self.socket.exists() {
                let ep = self.endpoint();
                if let Ok(cri) = block(async move {
                    let cri = Cri::connect(&ep, CALL_TIMEOUT).await?;
                    cri.version().await.map(|_| cri)
                }) {
                    return cri;
                }
            }
            assert!(
                Instant::now() < deadline,
                "hyperd did not answer within 90 s\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops hyperd with `signal` and waits for it to exit; pods keep running.
    pub fn stop(&mut self, signal: i32) -> Duration {
        let mut child = self.child.take().expect("hyperd is not running");
        let t = Instant::now();
        kill(child.id(), signal);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return t.elapsed();
            }
            if t.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "hyperd did not exit within 60 s of signal {signal}\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The end of hyperd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(60);
        format!("--- hyperd log (tail) ---\n{}", lines[start..].join("\n"))
    }

    /// The VMM and console log of a pod (while it exists), for failure messages.
    pub fn vm_logs(&self, pod_id: &str) -> String {
        let d = self.dir.path().join("vm");
        let read = |n: String| std::fs::read_to_string(d.join(n)).unwrap_or_default();
        format!(
            "--- vmm log ---\n{}\n--- console ---\n{}",
            read(format!("{pod_id}.vmm.log")),
            read(format!("{pod_id}.console"))
        )
    }

    /// The pod's hyper-vmm processes.
    pub fn vmm_pids(&self, pod_id: &str) -> Vec<u32> {
        let needle = self.state_dir.join(pod_id).join("vm.json");
        processes_mentioning(&needle.display().to_string())
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    }

    /// What the pod left on the host: VMM processes, its state directory, its network
    /// namespace file and network record, mounts. Empty once it is removed.
    pub fn leftovers(&self, pod_id: &str) -> Vec<String> {
        let mut left = pod_leftovers(pod_id);
        for p in [
            self.state_dir.join(pod_id),
            self.netns_dir.join(pod_id),
            self.network_state_dir.join(format!("{pod_id}.json")),
            self.dir.path().join("vm").join(format!("{pod_id}.vmm.log")),
        ] {
            if p.symlink_metadata().is_ok() {
                left.push(format!("file: {}", p.display()));
            }
        }
        left
    }
}

impl Drop for Hyperd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Keep hyperd's log where the caller asked (hack/run-e2e.sh: the scratch share).
        if let Some(dir) = std::env::var_os("HYPERNETES_E2E_ARTIFACTS") {
            let dir = PathBuf::from(dir);
            if std::fs::create_dir_all(&dir).is_ok() {
                let _ = std::fs::copy(&self.log, dir.join("hyperd.log"));
            }
        }
        // VMMs of pods the test did not remove (it failed).
        for (pid, _) in processes_mentioning(&self.state_dir.display().to_string()) {
            kill(pid, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(200));
        let _ = Command::new("ip")
            .args(["link", "del", HYPERD_BRIDGE])
            .stderr(Stdio::null())
            .status();
        // ShortDir's drop unmounts the netns files and removes the directory.
    }
}

/// The private containerd + runc of `hack/containerd-test.sh` (bridge cni-ctrd0,
/// 10.99.0.0/24), stopped and removed on drop.
pub struct Containerd {
    dir: PathBuf,
}

impl Containerd {
    pub fn start() -> Containerd {
        Self::start_with(&[])
    }

    /// A containerd that also runs `containerd-shim-hyper-v1` (`shim`) as the runtime
    /// `io.containerd.hyper.v1` and the CRI runtime handler `hyper`, with the VMM, kernel and
    /// initrd of `HYPERNETES_VMM`, `HYPERNETES_KERNEL` and `HYPERNETES_INITRD`; the shim's pod
    /// state is under [`Containerd::hyper_state`], its disks under [`Containerd::hyper_disks`].
    pub fn start_with_hyper_shim(shim: &Path) -> Containerd {
        for var in ["HYPERNETES_VMM", "HYPERNETES_KERNEL", "HYPERNETES_INITRD"] {
            artifact(var);
        }
        Self::start_with(&[("CONTAINERD_TEST_HYPER_SHIM", shim.as_os_str())])
    }

    fn start_with(env: &[(&str, &std::ffi::OsStr)]) -> Containerd {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let guard = Containerd {
            dir: PathBuf::from(format!("/tmp/e2e-ctrd-{}-{nanos}", std::process::id())),
        };
        let out = Command::new(hack("containerd-test.sh"))
            .arg("start")
            .arg(&guard.dir)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("cannot run hack/containerd-test.sh");
        assert!(
            out.status.success(),
            "hack/containerd-test.sh start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            guard.log_tail()
        );
        guard
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `ctr` on this containerd, in CRI's namespace (where the test images are).
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(["-n", "k8s.io"]);
        c
    }

    /// Stops containerd (SIGTERM) and starts it again with the same configuration; its
    /// containers and shims keep running.
    pub fn restart(&self) {
        self.script(&["restart"]);
    }

    /// Imports the test image `kind` (`busybox` or `pause`) again, unpacked into new
    /// snapshots.
    pub fn import(&self, kind: &str) {
        self.script(&["import", &self.dir.display().to_string(), kind]);
    }

    fn script(&self, args: &[&str]) {
        let mut cmd = Command::new(hack("containerd-test.sh"));
        cmd.arg(args[0]);
        if args.len() == 1 {
            cmd.arg(&self.dir);
        } else {
            cmd.args(&args[1..]);
        }
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .expect("cannot run hack/containerd-test.sh");
        assert!(
            out.status.success(),
            "hack/containerd-test.sh {} failed: {}\n{}",
            args[0],
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    /// The hyper shim's pod state root (one directory per shim below it).
    pub fn hyper_state(&self) -> PathBuf {
        self.dir.join("hs")
    }

    /// The hyper shim's VMM logs and guest consoles (one directory per shim below it).
    pub fn hyper_logs(&self) -> PathBuf {
        self.dir.join("hs-log")
    }

    /// The hyper shim's rootfs disk cache.
    pub fn hyper_disks(&self) -> PathBuf {
        self.dir.join("hs-disks")
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.dir.join("containerd.sock"))
    }

    pub fn connect(&self) -> Cri {
        let ep = self.endpoint();
        block(async move { Cri::connect(&ep, CALL_TIMEOUT).await }).expect("connect to containerd")
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(40);
        format!(
            "--- containerd log (tail) ---\n{}",
            lines[start..].join("\n")
        )
    }

    /// What a pod left on the host: processes (its shim) and mounts naming it.
    pub fn leftovers(&self, pod_id: &str) -> Vec<String> {
        pod_leftovers(pod_id)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        match Command::new(hack("containerd-test.sh"))
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
