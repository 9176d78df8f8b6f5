//! Harness for end-to-end tests that boot real guests with `hyper-vmm`.
//!
//! The tests are `#[ignore]`d in plain `cargo test` runs: they need a KVM that can boot a stock
//! kernel, the guest kernel and the initramfs. `hack/run-e2e.sh` builds those and runs the test
//! binaries with `--ignored` inside the KVM test VM, where `HYPERNETES_VMM`, `HYPERNETES_KERNEL`
//! and `HYPERNETES_INITRD` name the artifacts.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use protocol::client::{connect_vsock_uds, AgentClient};

pub mod cri_checks;
pub mod servers;

/// Path of an artifact named by an environment variable.
pub fn artifact(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(v) => PathBuf::from(v),
        None => panic!("{var} is not set: run the e2e tests through hack/run-e2e.sh"),
    }
}

/// A private temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Create a fresh directory under /tmp.
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "hn-e2e-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Command line used by the tests: the VMM's default plus the agent's debug RPCs.
pub const TEST_CMDLINE: &str = "console=ttyS0 quiet reboot=t,panic_warm panic=-1 \
    tsc=reliable no_timer_check cryptomgr.notests hyperstart.debug=1";

/// How to start a test VM.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// vCPUs.
    pub vcpus: u8,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disks: (id, path, read_only).
    pub disks: Vec<(String, PathBuf, bool)>,
    /// Spare drives.
    pub spare_disks: u8,
    /// NICs: (tap, mac).
    pub nets: Vec<(String, String)>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest CID.
    pub cid: u64,
    /// Kernel image; `None` is `HYPERNETES_KERNEL` (the bzImage).
    pub kernel: Option<PathBuf>,
}

impl Default for VmSpec {
    fn default() -> Self {
        VmSpec {
            vcpus: 1,
            memory_mib: 128,
            disks: Vec::new(),
            spare_disks: 0,
            nets: Vec::new(),
            cmdline: TEST_CMDLINE.to_string(),
            cid: 3,
            kernel: None,
        }
    }
}

/// A running `hyper-vmm` with its sockets in a private directory.
pub struct TestVm {
    child: Option<Child>,
    /// The VM's directory (sockets, console log, config).
    pub dir: TempDir,
    /// Host side of the hybrid vsock.
    pub vsock: PathBuf,
    /// Control socket.
    pub control: PathBuf,
    /// Console log file.
    pub console: PathBuf,
    /// VMM stderr log.
    pub log: PathBuf,
}

impl TestVm {
    /// The JSON configuration for `spec`, with sockets under `dir`.
    pub fn config(spec: &VmSpec, dir: &Path) -> serde_json::Value {
        let disks: Vec<_> = spec
            .disks
            .iter()
            .map(|(id, p, ro)| serde_json::json!({"id": id, "path": p, "read_only": ro}))
            .collect();
        let nets: Vec<_> = spec
            .nets
            .iter()
            .map(|(tap, mac)| serde_json::json!({"tap": tap, "mac": mac}))
            .collect();
        serde_json::json!({
            "kernel": spec.kernel.clone().unwrap_or_else(|| artifact("HYPERNETES_KERNEL")),
            "initrd": artifact("HYPERNETES_INITRD"),
            "cmdline": spec.cmdline,
            "vcpus": spec.vcpus,
            "memory_mib": spec.memory_mib,
            "disks": disks,
            "spare_disks": spec.spare_disks,
            "nets": nets,
            "vsock": {"cid": spec.cid, "socket": dir.join("vsock.sock")},
            "console": {"file": dir.join("console.log")},
            "control_socket": dir.join("control.sock"),
        })
    }

    /// Start a VM; does not wait for the guest.
    pub fn start(spec: &VmSpec) -> TestVm {
        let dir = TempDir::new("vm");
        let cfg_path = dir.path().join("vm.json");
        std::fs::write(&cfg_path, Self::config(spec, dir.path()).to_string())
            .expect("write config");
        let log = dir.path().join("vmm.log");
        let child = Command::new(artifact("HYPERNETES_VMM"))
            .arg("--config")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                std::fs::File::create(dir.path().join("vmm.out")).expect("out"),
            ))
            .stderr(Stdio::from(std::fs::File::create(&log).expect("log")))
            .spawn()
            .expect("spawn hyper-vmm");
        TestVm {
            child: Some(child),
            vsock: dir.path().join("vsock.sock"),
            control: dir.path().join("control.sock"),
            console: dir.path().join("console.log"),
            log,
            dir,
        }
    }

    /// PID of the VMM.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Everything the VMM logged and the guest printed, for failure messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- vmm log ---\n{}\n--- console ---\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(&self.console).unwrap_or_default()
        )
    }

    /// Connect to the guest agent, waiting up to `timeout` for it to come up.
    pub fn agent(&self, timeout: Duration) -> AgentClient {
        match connect_vsock_uds(&self.vsock, protocol::DEFAULT_AGENT_PORT, timeout) {
            Ok(c) => AgentClient::new(c),
            Err(e) => panic!("cannot reach the agent: {e}\n{}", self.diagnostics()),
        }
    }

    /// One control request on a fresh connection.
    pub fn control(&self, req: serde_json::Value) -> serde_json::Value {
        control_request(&self.control, &req)
            .unwrap_or_else(|e| panic!("control {req}: {e}\n{}", self.diagnostics()))
    }

    /// Wait for the VMM to exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Send one JSON request to a control socket and read the one-line response.
pub fn control_request(path: &Path, req: &serde_json::Value) -> std::io::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

/// A file of `len` bytes where byte i is `(i * mul + add) % 251`.
pub fn pattern_file(path: &Path, len: usize, mul: usize, add: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..len).map(|i| ((i * mul + add) % 251) as u8).collect();
    std::fs::write(path, &data).expect("write pattern file");
    data
}

/// Run a command, panicking with its output when it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Poll `f` until it returns Some or `timeout` passes.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes a minimal busybox root filesystem under `root`: the usual top-level directories,
/// `/bin/busybox` (Debian's busybox-static) and a symlink per applet.
pub fn busybox_rootfs(root: &Path, applets: &[&str]) {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).expect("rootfs directory");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("/bin/busybox (busybox-static) is needed");
    for a in applets {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).expect("applet link");
    }
}

/// A 16 MiB ext4 image `<dir>/rootfs.ext4` holding [`busybox_rootfs`] (made with
/// `mkfs.ext4 -d` from `<dir>/rootfs`).
pub fn busybox_rootfs_disk(dir: &Path, applets: &[&str]) -> PathBuf {
    let root = dir.join("rootfs");
    busybox_rootfs(&root, applets);
    let img = dir.join("rootfs.ext4");
    sh(&format!(
        "mkfs.ext4 -q -F -d {} {} 16M",
        root.display(),
        img.display()
    ));
    img
}
