//! Shared set-up for the integration tests: a private CNI world per test (conf dir, state dir,
//! netns dir, host-local store, a bridge and subnet of its own) that is torn down on drop,
//! even when the test panicked.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use network::{NetworkConfig, NetworkManager, PodNetworkRequest, PortMapping, Protocol};
use serde_json::{json, Value};

/// Debian's plugin directory (`containernetworking-plugins`).
pub const SYSTEM_CNI: &str = "/usr/lib/cni";

/// Whether the tests can run: root is needed for namespaces, bridges and iptables.
pub fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the network integration tests need root");
        return false;
    }
    assert!(
        Path::new(SYSTEM_CNI).join("bridge").exists(),
        "CNI plugins missing: apt-get install containernetworking-plugins"
    );
    true
}

/// One test's CNI world. `idx` picks the subnet `10.88.<idx>.0/24` and names.
pub struct TestEnv {
    pub root: tempfile::TempDir,
    pub conf_dir: PathBuf,
    pub state_dir: PathBuf,
    pub netns_dir: PathBuf,
    pub ipam_dir: PathBuf,
    pub fake_bin: PathBuf,
    pub log_dir: PathBuf,
    pub bridge: String,
    pub net_name: String,
    pub idx: u8,
    pub mgr: NetworkManager,
}

impl TestEnv {
    pub fn new(idx: u8) -> TestEnv {
        TestEnv::with_timeout(idx, Duration::from_secs(60))
    }

    pub fn with_timeout(idx: u8, plugin_timeout: Duration) -> TestEnv {
        let root = tempfile::Builder::new()
            .prefix("hn-network-test")
            .tempdir()
            .unwrap();
        let pid = std::process::id() % 100_000;
        let dir = |n: &str| {
            let p = root.path().join(n);
            fs::create_dir_all(&p).unwrap();
            p
        };
        let (conf_dir, state_dir, ipam_dir, fake_bin, log_dir) = (
            dir("net.d"),
            dir("state"),
            dir("ipam"),
            dir("bin"),
            dir("log"),
        );
        let netns_dir = root.path().join("netns");
        let mgr = NetworkManager::new(NetworkConfig {
            conf_dir: conf_dir.clone(),
            bin_dirs: vec![fake_bin.clone(), SYSTEM_CNI.into()],
            netns_dir: netns_dir.clone(),
            state_dir: state_dir.clone(),
            plugin_timeout,
        });
        TestEnv {
            root,
            conf_dir,
            state_dir,
            netns_dir,
            ipam_dir,
            fake_bin,
            log_dir,
            bridge: format!("hnt{idx}-{pid}"),
            net_name: format!("hnt-{idx}-{pid}"),
            idx,
            mgr,
        }
    }

    /// A unique pod id for this test.
    pub fn pod_id(&self, name: &str) -> String {
        format!("t{}-{}-{name}", self.idx, std::process::id())
    }

    pub fn request(&self, name: &str) -> PodNetworkRequest {
        PodNetworkRequest {
            pod_id: self.pod_id(name),
            name: format!("pod-{name}"),
            namespace: "hn-test".into(),
            uid: format!("uid-{name}"),
            port_mappings: Vec::new(),
        }
    }

    pub fn request_with_port(&self, name: &str, host_port: u16) -> PodNetworkRequest {
        let mut r = self.request(name);
        r.port_mappings.push(PortMapping {
            protocol: Protocol::Tcp,
            container_port: 80,
            host_port,
            host_ip: String::new(),
        });
        r
    }

    pub fn gateway(&self) -> String {
        format!("10.88.{}.1", self.idx)
    }

    /// The bridge plugin's configuration for this test.
    pub fn bridge_plugin(&self) -> Value {
        self.bridge_plugin_masq(true)
    }

    /// The bridge plugin's configuration, with or without `ipMasq`.
    pub fn bridge_plugin_masq(&self, ip_masq: bool) -> Value {
        json!({
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": ip_masq,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": format!("10.88.{}.0/24", self.idx)}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.ipam_dir,
            }
        })
    }

    /// Writes `10-test.conflist` with `plugins`.
    pub fn write_conflist(&self, plugins: Vec<Value>) {
        let list = json!({"cniVersion": "1.0.0", "name": self.net_name, "plugins": plugins});
        fs::write(
            self.conf_dir.join("10-test.conflist"),
            serde_json::to_vec_pretty(&list).unwrap(),
        )
        .unwrap();
    }

    /// The usual list: bridge + host-local, then portmap.
    pub fn write_default_conflist(&self) {
        self.write_conflist(vec![
            self.bridge_plugin(),
            json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
        ]);
    }

    /// Writes a fake plugin `name` that records its stdin and CNI_* environment under
    /// `log/<name>.<command>.{stdin,env}` and then runs `body` (shell).
    pub fn write_fake_plugin(&self, name: &str, body: &str) {
        let script = format!(
            "#!/bin/sh\n\
             log={log}/{name}.$CNI_COMMAND\n\
             cat > \"$log.stdin\"\n\
             env | grep '^CNI_' | sort > \"$log.env\"\n\
             {body}\n",
            log = self.log_dir.display()
        );
        let path = self.fake_bin.join(name);
        fs::write(&path, script).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// What a fake plugin recorded for `command`.
    pub fn fake_log(&self, name: &str, command: &str, ext: &str) -> Option<String> {
        fs::read_to_string(self.log_dir.join(format!("{name}.{command}.{ext}"))).ok()
    }

    /// The host-local reservations (IP addresses) of this test's network.
    pub fn reservations(&self) -> Vec<String> {
        let dir = self.ipam_dir.join(&self.net_name);
        let mut v: Vec<String> = fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Host interfaces enslaved to this test's bridge (the pods' veth peers).
    pub fn bridge_ports(&self) -> usize {
        let out = Command::new("ip")
            .args(["-j", "link", "show", "master", &self.bridge])
            .output()
            .unwrap();
        if !out.status.success() {
            return 0;
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(json!([]));
        v.as_array().map_or(0, Vec::len)
    }

    /// Files in the netns directory.
    pub fn netns_files(&self) -> Vec<String> {
        fs::read_dir(&self.netns_dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for pod in self.mgr.pods().unwrap_or_default() {
            if let Err(e) = self.mgr.teardown(&pod) {
                eprintln!("cleanup: teardown {pod}: {e}");
            }
        }
        for f in self.netns_files() {
            let p = self.netns_dir.join(f);
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
            let _ = fs::remove_file(&p);
        }
        // The directory was bind-mounted onto itself to make it shared.
        let _ = nix::mount::umount2(&self.netns_dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        remove_nat_rules(&format!("name: \\\"{}\\\"", self.net_name));
    }
}

/// Safety net for a failed test: deletes the NAT rules whose comment names this test's
/// network, and the per-pod chains they jump to. (`iptables -S` prints rules shell-quoted, so
/// a shell re-reads them.)
fn remove_nat_rules(needle: &str) {
    let Ok(out) = Command::new("iptables")
        .args(["-w", "-t", "nat", "-S"])
        .output()
    else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut chains = Vec::new();
    for rule in text
        .lines()
        .filter(|l| l.starts_with("-A ") && l.contains(needle))
    {
        eprintln!("cleanup: nat rule {rule}");
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("iptables -w -t nat -D {}", &rule[3..]))
            .output();
        if let Some(target) = rule.split(" -j ").nth(1) {
            if target.starts_with("CNI-") && !target.starts_with("CNI-HOSTPORT") {
                chains.push(target.trim().to_string());
            }
        }
    }
    for chain in chains {
        for op in ["-F", "-X"] {
            let _ = Command::new("iptables")
                .args(["-w", "-t", "nat", op, &chain])
                .output();
        }
    }
}

/// Runs `args` inside the namespace at `netns` with nsenter (independent of the crate's own
/// way in); its stdout.
pub fn nsenter(netns: &Path, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nsenter {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `ip -j <args>` inside `netns`, parsed.
pub fn ip_json(netns: &Path, args: &[&str]) -> Value {
    let mut full = vec!["ip", "-j"];
    full.extend_from_slice(args);
    serde_json::from_str(&nsenter(netns, &full)).unwrap()
}

/// The NAT rules mentioning `needle`.
pub fn nat_rules_mentioning(needle: &str) -> Vec<String> {
    let out = Command::new("iptables-save")
        .args(["-t", "nat"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect()
}
