//! `make cri-bench`: pod start latency through CRI, hyperd against containerd + runc, in the
//! same run (one boot of the KVM test VM), plus hyperd's host memory per idle pod.
//!
//! `make shim-bench` (`CRI_BENCH_MODE=shim`): one containerd with both runtime handlers, pods
//! of handler `hyper` (containerd-shim-hyper-v1, a VM each) against runc pods, and the host
//! memory of an idle `hyper` pod (its shim and its hyper-vmm). Last line
//! `pod_start_ms containerd-hyper=<p50> containerd-runc=<p50> ratio=<hyper/runc>`.
//!
//! - Both servers get the same busybox image from a local registry (pulled before timing).
//! - `hyperctl bench --pods N --parallel P` against each: RunPodSandbox + CreateContainer +
//!   StartContainer timed per pod (`pod_start`), then stop and remove.
//! - Memory: `IDLE` pods (default 5) with a `sleep` container each started on hyperd; after
//!   they settle, (sum of the hyper-vmm processes' VmRSS + hyperd's VmRSS) / IDLE. The same
//!   for containerd: (its shims with their children + containerd's VmRSS) / IDLE.
//!
//! Environment: CRI_BENCH_PODS (20), CRI_BENCH_PARALLEL (4), CRI_BENCH_IDLE (5);
//! HYPERNETES_HYPERD, HYPERNETES_HYPERCTL and the guest artifacts as hack/cri-bench.sh sets
//! them. The last line is
//! `pod_start_ms hyperd=<p50> containerd-runc=<p50> ratio=<hyperd/runc>`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::artifact;
use e2e::servers::{processes_mentioning, rss_kib, Containerd, Hyperd, Registry};
use e2e::TempDir;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

/// Runs hyperctl against `endpoint`; panics with its output when it fails.
fn hyperctl(endpoint: &str, args: &[&str]) -> String {
    let out = Command::new(artifact("HYPERNETES_HYPERCTL"))
        .args(["--endpoint", endpoint, "--timeout", "300s"])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("cannot run hyperctl (HYPERNETES_HYPERCTL)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "hyperctl {args:?} failed ({}):\n{stdout}",
        out.status
    );
    stdout
}

/// `hyperctl bench` (pods of runtime handler `handler`, "" for the default); prints its table
/// and returns the p50 of pod_start.
fn bench(endpoint: &str, label: &str, image: &str, log_root: &Path, handler: &str) -> f64 {
    let pods = env_usize("CRI_BENCH_PODS", 20).to_string();
    let parallel = env_usize("CRI_BENCH_PARALLEL", 4).to_string();
    let out = hyperctl(
        endpoint,
        &[
            "--runtime",
            handler,
            "bench",
            "--pods",
            &pods,
            "--parallel",
            &parallel,
            "--image",
            image,
            "--label",
            label,
            "--log-root",
            &log_root.display().to_string(),
        ],
    );
    print!("{out}");
    let last = out.lines().last().unwrap_or_default();
    last.strip_prefix(&format!("pod_start_ms {label}="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no pod_start_ms line from hyperctl bench: {last:?}"))
}

/// Starts `n` idle pods (a `sleep` container each, runtime handler `handler`) and returns
/// their ids.
fn idle_pods(
    endpoint: &str,
    n: usize,
    image: &str,
    log_root: &Path,
    tag: &str,
    handler: &str,
) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..n {
        let name = format!("idle-{tag}-{i}");
        hyperctl(
            endpoint,
            &[
                "--runtime",
                handler,
                "run",
                "-d",
                "--name",
                &name,
                "--log-root",
                &log_root.display().to_string(),
                image,
                "sleep",
                "3600",
            ],
        );
        names.push(name);
    }
    let pods: serde_json::Value =
        serde_json::from_str(&hyperctl(endpoint, &["-o", "json", "pods"])).expect("pods json");
    pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["metadata"]["name"]
                .as_str()
                .is_some_and(|n| names.iter().any(|x| x == n))
        })
        .filter_map(|p| p["id"].as_str().map(str::to_owned))
        .collect()
}

fn remove_pods(endpoint: &str, ids: &[String]) {
    for id in ids {
        hyperctl(endpoint, &["rm", "-f", id]);
    }
}

/// Every process's parent.
fn parents() -> HashMap<u32, u32> {
    let mut m = HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
        {
            m.insert(pid, ppid);
        }
    }
    m
}

/// `roots` and all their descendants.
fn with_descendants(roots: &[u32]) -> HashSet<u32> {
    let parents = parents();
    let mut set: HashSet<u32> = roots.iter().copied().collect();
    loop {
        let before = set.len();
        for (&pid, ppid) in &parents {
            if set.contains(ppid) {
                set.insert(pid);
            }
        }
        if set.len() == before {
            return set;
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    if std::env::var("CRI_BENCH_MODE").as_deref() == Ok("shim") {
        return shim_main();
    }
    let registry = Registry::start();
    let image = registry.image("busybox");
    let logs = TempDir::new("cri-bench-logs");
    let idle = env_usize("CRI_BENCH_IDLE", 5);

    let mut hyperd = Hyperd::start(&registry.addr);
    drop(hyperd.connect());
    let h_ep = hyperd.endpoint().to_string();
    let containerd = Containerd::start();
    let c_ep = containerd.endpoint().to_string();
    for ep in [&h_ep, &c_ep] {
        hyperctl(ep, &["pull", &image]);
    }

    println!("== hyperd ({h_ep})");
    let h = bench(&h_ep, "hyperd", &image, logs.path(), "");
    println!("== containerd + runc ({c_ep})");
    let c = bench(&c_ep, "containerd-runc", &image, logs.path(), "");

    // Memory of idle pods.
    let settle = Duration::from_secs(10);
    let ids = idle_pods(&h_ep, idle, &image, logs.path(), "h", "");
    std::thread::sleep(settle);
    let vmm_kib: Vec<u64> = ids
        .iter()
        .flat_map(|id| hyperd.vmm_pids(id))
        .filter_map(rss_kib)
        .collect();
    assert_eq!(vmm_kib.len(), ids.len(), "not one hyper-vmm per idle pod");
    let hyperd_kib = hyperd.pid().and_then(rss_kib).unwrap_or(0);
    let vmm_total: u64 = vmm_kib.iter().sum();
    let per_pod_h = mib(vmm_total + hyperd_kib) / ids.len() as f64;
    println!(
        "hyperd: {} idle pods (guest {} MiB each): hyper-vmm VmRSS {:.1} MiB in all ({:.1}..{:.1} each), hyperd VmRSS {:.1} MiB",
        ids.len(),
        96 + 32,
        mib(vmm_total),
        mib(*vmm_kib.iter().min().unwrap_or(&0)),
        mib(*vmm_kib.iter().max().unwrap_or(&0)),
        mib(hyperd_kib)
    );
    remove_pods(&h_ep, &ids);

    let ids_c = idle_pods(&c_ep, idle, &image, logs.path(), "c", "");
    std::thread::sleep(settle);
    let shims: Vec<u32> = ids_c
        .iter()
        .flat_map(|id| processes_mentioning(&format!("-id {id}")))
        .map(|(pid, _)| pid)
        .collect();
    let shim_tree_kib: u64 = with_descendants(&shims)
        .into_iter()
        .filter_map(rss_kib)
        .sum();
    let ctrd_kib = std::fs::read_to_string(containerd.dir().join("containerd.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .and_then(rss_kib)
        .unwrap_or(0);
    let per_pod_c = mib(shim_tree_kib + ctrd_kib) / ids_c.len().max(1) as f64;
    println!(
        "containerd: {} idle pods: {} shims with their children VmRSS {:.1} MiB in all, containerd VmRSS {:.1} MiB",
        ids_c.len(),
        shims.len(),
        mib(shim_tree_kib),
        mib(ctrd_kib)
    );
    remove_pods(&c_ep, &ids_c);

    println!(
        "idle_pod_host_mib hyperd={per_pod_h:.1} containerd-runc={per_pod_c:.1} (VMM or shim tree + daemon share, {idle} pods)"
    );
    println!(
        "pod_start_ms hyperd={h:.1} containerd-runc={c:.1} ratio={:.2}",
        h / c
    );
}

/// `make shim-bench`: containerd with handler `hyper` against the same containerd with runc.
fn shim_main() {
    let registry = Registry::start();
    let image = registry.image("busybox");
    let logs = TempDir::new("shim-bench-logs");
    let idle = env_usize("CRI_BENCH_IDLE", 5);
    let containerd = Containerd::start_with_hyper_shim(&artifact("HYPERNETES_SHIM"));
    let ep = containerd.endpoint().to_string();
    hyperctl(&ep, &["pull", &image]);

    println!("== containerd, runtime handler hyper ({ep})");
    let h = bench(&ep, "containerd-hyper", &image, logs.path(), "hyper");
    println!("== containerd, runc ({ep})");
    let c = bench(&ep, "containerd-runc", &image, logs.path(), "");

    // Memory of idle hyper pods: each has one shim and one hyper-vmm.
    let ids = idle_pods(&ep, idle, &image, logs.path(), "h", "hyper");
    std::thread::sleep(Duration::from_secs(10));
    let shims: Vec<u64> = processes_mentioning("containerd-shim-hyper-v1")
        .into_iter()
        .filter_map(|(pid, _)| rss_kib(pid))
        .collect();
    let state = containerd.hyper_state().display().to_string();
    let vmms: Vec<u64> = processes_mentioning(&state)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("hyper-vmm"))
        .filter_map(|(pid, _)| rss_kib(pid))
        .collect();
    assert_eq!(vmms.len(), ids.len(), "not one hyper-vmm per idle pod");
    assert_eq!(shims.len(), ids.len(), "not one shim per idle pod");
    let (shim_total, vmm_total): (u64, u64) = (shims.iter().sum(), vmms.iter().sum());
    println!(
        "containerd-hyper: {} idle pods: shim VmRSS {:.1} MiB each ({:.1} in all), hyper-vmm VmRSS {:.1} MiB each",
        ids.len(),
        mib(shim_total) / ids.len() as f64,
        mib(shim_total),
        mib(vmm_total) / ids.len() as f64,
    );
    remove_pods(&ep, &ids);
    let ids_c = idle_pods(&ep, idle, &image, logs.path(), "c", "");
    std::thread::sleep(Duration::from_secs(10));
    let runc_shims: Vec<u32> = ids_c
        .iter()
        .flat_map(|id| processes_mentioning(&format!("-id {id}")))
        .map(|(pid, _)| pid)
        .collect();
    let runc_kib: u64 = with_descendants(&runc_shims)
        .into_iter()
        .filter_map(rss_kib)
        .sum();
    println!(
        "containerd-runc: {} idle pods: shims with their children VmRSS {:.1} MiB each",
        ids_c.len(),
        mib(runc_kib) / ids_c.len().max(1) as f64
    );
    remove_pods(&ep, &ids_c);
    println!(
        "idle_pod_host_mib containerd-hyper={:.1} containerd-runc={:.1} (shim + VMM, or runc shim tree; containerd itself not counted)",
        mib(shim_total + vmm_total) / ids.len() as f64,
        mib(runc_kib) / ids_c.len().max(1) as f64
    );
    println!(
        "pod_start_ms containerd-hyper={h:.1} containerd-runc={c:.1} ratio={:.2}",
        h / c
    );
}
