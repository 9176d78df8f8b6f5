//! `make image-bench`: pull + unpack + ext4 rootfs disk of a ~50 MB multi-layer image from a local
//! registry, against `skopeo copy` + `umoci unpack` of the same image in the same run.
//!
//! The benchmark starts Debian's `docker-registry` on a free 127.0.0.1 port, builds an image itself
//! (busybox-static plus generated text and random files, many small and a few large, symlinks,
//! hard links, a whiteout and an opaque directory in the top layer), pushes it as an OCI manifest
//! with gzip layers, then times RUNS (default 5) cold runs of each side, alternating, every run in
//! fresh directories:
//!
//! - hypernetes: `ImageStore::open` + `pull` + `rootfs` (unpack + `mkfs.ext4 -d`);
//! - skopeo+umoci: `skopeo copy docker://... oci:DIR:bench` + `umoci unpack --image DIR:bench`.
//!
//! The last line is machine-readable:
//! `image_ms hypernetes=<median> skopeo+umoci=<median> ratio=<r> disk_mib=<d> tree_mib=<t>`.
//!
//! Everything lives under one temporary directory; it and the registry are removed on success,
//! on error, on panic (a panic hook: release builds abort) and on SIGINT/SIGTERM/SIGHUP.

use std::error::Error;
use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use image::manifest::{OCI_CONFIG, OCI_MANIFEST};
use image::{Auth, Digest, ImageStore, PullConfig, UnpackOptions};
use nix::sys::signal::{self, SigSet, Signal};
use nix::unistd::Pid;
use oci_client::client::{ClientConfig, ClientProtocol};

type Result<T, E = Box<dyn Error + Send + Sync>> = std::result::Result<T, E>;

const OCI_GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const REPO: &str = "bench";
const TAG: &str = "latest";
const MIB: f64 = 1024.0 * 1024.0;

// ---------------------------------------------------------------------------------------------
// Cleanup on every path

/// What must not outlive the benchmark.
struct Cleanup {
    /// The registry process.
    registry: Option<Child>,
    /// The peer tool running right now (skopeo or umoci).
    tool: Option<u32>,
    /// The temporary directory holding everything else.
    root: Option<tempfile::TempDir>,
}

static CLEANUP: Mutex<Cleanup> = Mutex::new(Cleanup {
    registry: None,
    tool: None,
    root: None,
});

fn cleanup_state() -> std::sync::MutexGuard<'static, Cleanup> {
    CLEANUP.lock().unwrap_or_else(|e| e.into_inner())
}

/// Kill the running tool and the registry, remove the temporary directory. Idempotent.
fn cleanup() {
    let mut c = cleanup_state();
    if let Some(pid) = c.tool.take() {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    if let Some(mut child) = c.registry.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    if let Some(root) = c.root.take() {
        let path = root.path().to_path_buf();
        if let Err(e) = root.close() {
            eprintln!("image_bench: cannot remove {}: {e}", path.display());
        }
    }
}

/// Block the termination signals in every thread and clean up from a dedicated one. Must run
/// before any other thread exists (threads inherit the mask; spawned processes get it reset).
fn handle_signals() -> Result<()> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                eprintln!("image_bench: {sig}: cleaning up");
                cleanup();
                std::process::exit(128 + sig as i32);
            }
        })?;
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = handle_signals() {
        eprintln!("image_bench: cannot handle signals: {e}");
        return ExitCode::FAILURE;
    }
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        cleanup();
    }));
    let result = run();
    cleanup();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprint!("image_bench: error: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprint!(": {s}");
                source = s.source();
            }
            eprintln!();
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Registry and tools

/// Start `docker-registry` on a free 127.0.0.1 port with its storage under `dir`; returns the
/// address. The process is owned by [`CLEANUP`].
fn start_registry(dir: &Path) -> Result<String> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    fs::create_dir_all(dir)?;
    let config = dir.join("config.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.join("data").display()
        ),
    )?;
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!("cannot start docker-registry (apt-get install docker-registry): {e}")
        })?;
    cleanup_state().registry = Some(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(&addr).is_err() {
        if let Some(Ok(Some(status))) = cleanup_state().registry.as_mut().map(Child::try_wait) {
            return Err(format!("docker-registry exited with {status}").into());
        }
        if Instant::now() > deadline {
            return Err(format!("docker-registry did not listen on {addr} within 20 s").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(addr)
}

/// Run a tool to completion, failing with its stderr; it is killed by [`cleanup`] if the
/// benchmark is interrupted meanwhile.
fn tool(cmd: &mut Command) -> Result<String> {
    let name = format!("{:?}", cmd.get_program());
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {name}: {e}"))?;
    cleanup_state().tool = Some(child.id());
    let out = child.wait_with_output();
    cleanup_state().tool = None;
    let out = out?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// First whitespace-separated field of a tool's output, as a number.
fn first_number(out: &str) -> Result<u64> {
    let field = out.split_whitespace().next().unwrap_or_default();
    field
        .parse()
        .map_err(|_| format!("expected a number, got {out:?}").into())
}

/// `du -sb` and `du -sk` of a tree: (apparent bytes, allocated bytes).
fn du(path: &Path) -> Result<(u64, u64)> {
    let apparent = first_number(&tool(Command::new("du").arg("-sb").arg(path))?)?;
    let kib = first_number(&tool(Command::new("du").arg("-sk").arg(path))?)?;
    Ok((apparent, kib * 1024))
}

/// `stat` of a file: (apparent size, allocated bytes).
fn stat(path: &Path) -> Result<(u64, u64)> {
    let out = tool(Command::new("stat").args(["-c", "%s %b %B"]).arg(path))?;
    let nums: Vec<u64> = out
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| format!("unexpected stat output {out:?}"))?;
    match nums[..] {
        [size, blocks, block_size] => Ok((size, blocks * block_size)),
        _ => Err(format!("unexpected stat output {out:?}").into()),
    }
}

// ---------------------------------------------------------------------------------------------
// The image

/// splitmix64: deterministic, so the image (and its digests) is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below((hi - lo) as u64) as usize
    }
    /// Incompressible bytes.
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
    /// Compressible text: lines of words from a small vocabulary (gzip gets ~3x).
    fn text(&mut self, len: usize) -> Vec<u8> {
        const WORDS: &[&str] = &[
            "the",
            "image",
            "layer",
            "registry",
            "manifest",
            "digest",
            "config",
            "rootfs",
            "disk",
            "pod",
            "container",
            "sandbox",
            "kernel",
            "guest",
            "virtio",
            "block",
            "network",
            "runtime",
            "hypernetes",
            "cluster",
            "node",
            "volume",
            "mount",
            "ext4",
            "inode",
            "extent",
            "journal",
            "request",
            "response",
            "timeout",
            "retry",
            "error",
            "warning",
            "info",
            "debug",
            "trace",
            "started",
            "stopped",
            "pulled",
            "unpacked",
            "verified",
            "sha256",
            "gzip",
            "zstd",
            "tar",
            "whiteout",
            "opaque",
            "symlink",
            "hardlink",
            "owner",
            "mode",
            "xattr",
            "device",
            "socket",
            "pipe",
            "memory",
            "cpu",
            "balloon",
            "vsock",
            "agent",
            "ttrpc",
            "protobuf",
            "and",
            "of",
            "to",
            "in",
            "for",
            "with",
            "on",
            "is",
        ];
        let mut out = Vec::with_capacity(len + 80);
        while out.len() < len {
            out.extend_from_slice(format!("{:08x} ", self.below(1 << 32)).as_bytes());
            for _ in 0..self.range(6, 14) {
                out.extend_from_slice(WORDS[self.below(WORDS.len() as u64) as usize].as_bytes());
                out.push(b' ');
            }
            out.push(b'\n');
        }
        out.truncate(len);
        out
    }
}

/// One layer being written: a tar stream with root-owned entries and a fixed mtime.
struct LayerTar {
    tar: tar::Builder<Vec<u8>>,
    files: u64,
}

impl LayerTar {
    fn new() -> LayerTar {
        LayerTar {
            tar: tar::Builder::new(Vec::new()),
            files: 0,
        }
    }
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }
    fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.tar.append_data(&mut h, path, &[][..])?;
        Ok(())
    }
    fn file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.tar.append_data(&mut h, path, data)?;
        self.files += 1;
        Ok(())
    }
    fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar.append_link(&mut h, path, target)?;
        Ok(())
    }
    fn hardlink(&mut self, path: &str, target: &str) -> Result<()> {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        self.tar.append_link(&mut h, path, target)?;
        Ok(())
    }
    fn finish(self) -> Result<(Vec<u8>, u64)> {
        Ok((self.tar.into_inner()?, self.files))
    }
}

/// A layer ready to push: gzip blob and the digest of the uncompressed tar (its diff id).
struct BuiltLayer {
    gz: Vec<u8>,
    diff_id: Digest,
    tar_bytes: u64,
    files: u64,
}

fn seal(layer: LayerTar) -> Result<BuiltLayer> {
    let (tar, files) = layer.finish()?;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(&tar)?;
    Ok(BuiltLayer {
        gz: e.finish()?,
        diff_id: Digest::sha256(&tar),
        tar_bytes: tar.len() as u64,
        files,
    })
}

/// The bench image, bottom layer first (~50 MB of gzip, ~70 MB unpacked).
fn build_layers() -> Result<Vec<BuiltLayer>> {
    let mut rng = Rng(0x4879_7065_726e_6574);
    let busybox = fs::read("/bin/busybox")
        .map_err(|e| format!("/bin/busybox (apt-get install busybox-static): {e}"))?;
    let mut layers = Vec::new();

    // 1. Base system: busybox, applets as hard links and symlinks, /etc.
    let mut l = LayerTar::new();
    for (d, mode) in [
        ("bin", 0o755),
        ("etc", 0o755),
        ("root", 0o700),
        ("tmp", 0o1777),
        ("usr", 0o755),
        ("usr/bin", 0o755),
        ("var", 0o755),
    ] {
        l.dir(d, mode)?;
    }
    l.file("bin/busybox", &busybox, 0o755)?;
    for applet in [
        "sh", "ls", "cat", "cp", "mv", "rm", "mkdir", "ps", "mount", "grep",
    ] {
        l.hardlink(&format!("bin/{applet}"), "bin/busybox")?;
    }
    for applet in ["env", "head", "tail", "sort", "uniq", "wc", "xargs", "find"] {
        l.symlink(&format!("usr/bin/{applet}"), "../../bin/busybox")?;
    }
    l.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)?;
    l.file("etc/group", b"root:x:0:\n", 0o644)?;
    l.file("etc/hostname", b"bench\n", 0o644)?;
    l.file("etc/motd", &rng.text(4096), 0o644)?;
    layers.push(seal(l)?);

    // 2. Many small files: 600 "packages" of docs (text) and small libraries (random).
    let mut l = LayerTar::new();
    for d in ["usr/share", "usr/share/doc", "usr/lib"] {
        l.dir(d, 0o755)?;
    }
    for p in 0..600 {
        let doc = format!("usr/share/doc/pkg-{p:03}");
        l.dir(&doc, 0o755)?;
        for name in ["README", "changelog", "copyright", "NEWS"] {
            let len = rng.range(512, 12 * 1024);
            l.file(&format!("{doc}/{name}"), &rng.text(len), 0o644)?;
        }
        if p % 3 == 0 {
            let lib = format!("usr/lib/pkg-{p:03}");
            l.dir(&lib, 0o755)?;
            let len = rng.range(4 * 1024, 64 * 1024);
            l.file(&format!("{lib}/libpkg.so.1.0"), &rng.bytes(len), 0o755)?;
            l.symlink(&format!("{lib}/libpkg.so.1"), "libpkg.so.1.0")?;
        }
    }
    layers.push(seal(l)?);

    // 3. A few large files: random data and a big log.
    let mut l = LayerTar::new();
    for d in ["opt", "opt/data", "var/log"] {
        l.dir(d, 0o755)?;
    }
    l.file("opt/data/blob-a.bin", &rng.bytes(12 << 20), 0o644)?;
    l.file("opt/data/blob-b.bin", &rng.bytes(8 << 20), 0o644)?;
    l.file("var/log/big.log", &rng.text(16 << 20), 0o640)?;
    layers.push(seal(l)?);

    // 4. An application: medium random files, a hard link, a symlink into layer 3.
    let mut l = LayerTar::new();
    for d in ["opt/app", "opt/app/bin", "opt/app/lib", "opt/app/share"] {
        l.dir(d, 0o755)?;
    }
    let mut total = 0;
    let mut i = 0;
    while total < 10 << 20 {
        let len = rng.range(64 * 1024, 1 << 20);
        l.file(
            &format!("opt/app/lib/mod-{i:02}.so"),
            &rng.bytes(len),
            0o755,
        )?;
        total += len;
        i += 1;
    }
    l.file("opt/app/bin/app", &rng.bytes(2 << 20), 0o755)?;
    l.hardlink("opt/app/bin/app-debug", "opt/app/bin/app")?;
    l.symlink("opt/app/share/data", "/opt/data/blob-a.bin")?;
    l.file("opt/app/config.yaml", &rng.text(8 * 1024), 0o600)?;
    layers.push(seal(l)?);

    // 5. Top: whiteouts (a large file, a doc dir) and an opaque directory, changed /etc.
    let mut l = LayerTar::new();
    l.dir("opt", 0o755)?;
    l.dir("opt/data", 0o755)?;
    l.file("opt/data/.wh.blob-b.bin", b"", 0o644)?;
    l.dir("usr", 0o755)?;
    l.dir("usr/share", 0o755)?;
    l.dir("usr/share/doc", 0o755)?;
    l.file("usr/share/doc/.wh.pkg-599", b"", 0o644)?;
    l.dir("usr/share/doc/pkg-000", 0o755)?;
    l.file("usr/share/doc/pkg-000/.wh..wh..opq", b"", 0o644)?;
    l.file("usr/share/doc/pkg-000/README", b"replaced\n", 0o644)?;
    l.dir("etc", 0o755)?;
    l.file("etc/hostname", b"bench-top\n", 0o644)?;
    layers.push(seal(l)?);

    Ok(layers)
}

/// Push the layers, an OCI config and an OCI manifest as `REPO:TAG`; returns the manifest digest.
async fn push(addr: &str, layers: &[BuiltLayer]) -> Result<Digest> {
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let reference = oci_client::Reference::with_tag(addr.into(), REPO.into(), TAG.into());
    let blob = |data: Vec<u8>, media_type: &str| {
        let digest = Digest::sha256(&data).to_string();
        let descriptor = serde_json::json!({
            "mediaType": media_type, "digest": digest, "size": data.len(),
        });
        let client = &client;
        let reference = &reference;
        async move {
            client.push_blob(reference, data, &digest).await?;
            Ok::<_, Box<dyn Error + Send + Sync>>(descriptor)
        }
    };
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"], "WorkingDir": "/" },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>(),
        },
    });
    let config = blob(serde_json::to_vec(&config)?, OCI_CONFIG).await?;
    let mut descriptors = Vec::new();
    for l in layers {
        descriptors.push(blob(l.gz.clone(), OCI_GZIP_LAYER).await?);
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": descriptors,
    }))?;
    client
        .push_manifest_raw(
            &reference,
            manifest.clone(),
            http::HeaderValue::from_static(OCI_MANIFEST),
        )
        .await?;
    Ok(Digest::sha256(&manifest))
}

// ---------------------------------------------------------------------------------------------
// The two sides

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One cold run of ours in `dir`: (pull ms, unpack + disk ms).
fn run_hypernetes(rt: &tokio::runtime::Runtime, addr: &str, dir: &Path) -> Result<(f64, f64)> {
    let config = PullConfig {
        insecure_registries: vec![addr.to_string()],
        ..Default::default()
    };
    let start = Instant::now();
    let store = ImageStore::open(dir, &config)?;
    let record = rt.block_on(store.pull(&format!("{addr}/{REPO}:{TAG}"), &Auth::Anonymous))?;
    let pulled = start.elapsed();
    let disk = store.rootfs(&record.id)?;
    let total = start.elapsed();
    if disk.cached {
        return Err("the rootfs disk was cached: the run was not cold".into());
    }
    Ok((ms(pulled), ms(total - pulled)))
}

/// One cold run of the peer in `dir`: (skopeo copy ms, umoci unpack ms).
fn run_peer(addr: &str, dir: &Path) -> Result<(f64, f64)> {
    let layout = dir.join("oci");
    let bundle = dir.join("bundle");
    fs::create_dir_all(dir)?;
    let start = Instant::now();
    tool(
        Command::new("skopeo")
            .args(["copy", "--insecure-policy", "--src-tls-verify=false"])
            .arg(format!("docker://{addr}/{REPO}:{TAG}"))
            .arg(format!("oci:{}:{TAG}", layout.display())),
    )?;
    let copied = start.elapsed();
    let mut umoci = Command::new("umoci");
    umoci.arg("unpack");
    if !nix::unistd::geteuid().is_root() {
        umoci.arg("--rootless");
    }
    tool(
        umoci
            .arg("--image")
            .arg(format!("{}:{TAG}", layout.display()))
            .arg(&bundle),
    )?;
    let total = start.elapsed();
    Ok((ms(copied), ms(total - copied)))
}

/// Remove a run's directory and flush dirty pages, so no run pays for the previous one.
fn reset(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    nix::unistd::sync();
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

// ---------------------------------------------------------------------------------------------

fn run() -> Result<()> {
    let runs: usize = match std::env::var("RUNS") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("RUNS={v:?} is not a count"))?,
        Err(_) => 5,
    };
    if runs == 0 {
        return Err("RUNS must be at least 1".into());
    }
    let root = tempfile::Builder::new().prefix("image-bench-").tempdir()?;
    let root_path = root.path().to_path_buf();
    cleanup_state().root = Some(root);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    let addr = start_registry(&root_path.join("registry"))?;
    let t = Instant::now();
    let layers = build_layers()?;
    let gz: u64 = layers.iter().map(|l| l.gz.len() as u64).sum();
    let tar: u64 = layers.iter().map(|l| l.tar_bytes).sum();
    let files: u64 = layers.iter().map(|l| l.files).sum();
    println!(
        "image: {} gzip layers, {:.1} MiB compressed, {:.1} MiB of tar, {files} files (built in {:.1} s)",
        layers.len(),
        mib(gz),
        mib(tar),
        t.elapsed().as_secs_f64()
    );
    for (i, l) in layers.iter().enumerate() {
        println!(
            "  layer {}: {:6.1} MiB gzip {:6.1} MiB tar {:5} files",
            i + 1,
            mib(l.gz.len() as u64),
            mib(l.tar_bytes),
            l.files
        );
    }
    let manifest = rt.block_on(push(&addr, &layers))?;
    drop(layers);
    println!("pushed {addr}/{REPO}:{TAG} (OCI manifest {manifest})");
    println!("{runs} cold runs per side, alternating; times in ms");

    let (mut ours, mut ours_pull, mut ours_rootfs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut peer, mut peer_copy, mut peer_unpack) = (Vec::new(), Vec::new(), Vec::new());
    for i in 1..=runs {
        let dir = root_path.join("run");
        reset(&dir)?;
        let (pull, rootfs) = run_hypernetes(&rt, &addr, &dir)?;
        println!(
            "run {i}/{runs} hypernetes    total={:7.0}  pull={:6.0}  unpack+disk={:6.0}",
            pull + rootfs,
            pull,
            rootfs
        );
        ours.push(pull + rootfs);
        ours_pull.push(pull);
        ours_rootfs.push(rootfs);

        reset(&dir)?;
        let (copy, unpack) = run_peer(&addr, &dir)?;
        println!(
            "run {i}/{runs} skopeo+umoci  total={:7.0}  copy={:6.0}  unpack={:6.0}",
            copy + unpack,
            copy,
            unpack
        );
        peer.push(copy + unpack);
        peer_copy.push(copy);
        peer_unpack.push(unpack);
    }
    let (m_ours, m_peer) = (median(&ours), median(&peer));
    println!(
        "median hypernetes    total={m_ours:7.0}  pull={:6.0}  unpack+disk={:6.0}",
        median(&ours_pull),
        median(&ours_rootfs)
    );
    println!(
        "median skopeo+umoci  total={m_peer:7.0}  copy={:6.0}  unpack={:6.0}",
        median(&peer_copy),
        median(&peer_unpack)
    );

    // Sizes (untimed): the last peer run's tree, then ours: pull, unpack, ext4 step by step.
    let dir = root_path.join("run");
    let (peer_tree, peer_tree_alloc) = du(&dir.join("bundle/rootfs"))?;
    let measure = root_path.join("measure");
    let store = ImageStore::open(
        measure.join("store"),
        &PullConfig {
            insecure_registries: vec![addr.clone()],
            ..Default::default()
        },
    )?;
    let record = rt.block_on(store.pull(&format!("{addr}/{REPO}:{TAG}"), &Auth::Anonymous))?;
    let tree = measure.join("tree");
    fs::create_dir_all(&tree)?;
    let t = Instant::now();
    image::unpack_layers(
        store.content(),
        &record.layers,
        &tree,
        &UnpackOptions::default(),
    )?;
    let unpack_ms = ms(t.elapsed());
    let disk_path = measure.join("rootfs.ext4");
    let t = Instant::now();
    image::build_ext4(&tree, &disk_path, "rootfs")?;
    let mkfs_ms = ms(t.elapsed());
    let t = Instant::now();
    fs::File::open(&disk_path)?.sync_all()?;
    let fsync_ms = ms(t.elapsed());
    let (disk, disk_alloc) = stat(&disk_path)?;
    let (tree_bytes, tree_alloc) = du(&tree)?;
    let same = Command::new("diff")
        .args(["-r", "--no-dereference", "-q"])
        .arg(&tree)
        .arg(dir.join("bundle/rootfs"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success();
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&disk_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success();
    println!(
        "ours, once more step by step: unpack={unpack_ms:.0} mkfs.ext4 -d={mkfs_ms:.0} fsync={fsync_ms:.0} ms; e2fsck -fn {}; tree {} umoci's rootfs",
        if fsck { "clean" } else { "FAILED" },
        if same { "identical to" } else { "DIFFERS from" },
    );
    println!(
        "disk (stat):     apparent {:7.1} MiB  allocated {:7.1} MiB",
        mib(disk),
        mib(disk_alloc)
    );
    println!(
        "tree (du -sb/-sk): apparent {:5.1} MiB  allocated {:7.1} MiB  (umoci rootfs: {:.1} / {:.1} MiB)",
        mib(tree_bytes),
        mib(tree_alloc),
        mib(peer_tree),
        mib(peer_tree_alloc)
    );
    println!(
        "disk/tree: apparent {:.2}x, allocated {:.2}x",
        disk as f64 / tree_bytes as f64,
        disk_alloc as f64 / tree_alloc as f64
    );
    if !fsck || !same {
        return Err("the rootfs disk or tree is wrong (see above)".into());
    }
    println!(
        "image_ms hypernetes={m_ours:.0} skopeo+umoci={m_peer:.0} ratio={:.2} disk_mib={:.1} tree_mib={:.1}",
        m_ours / m_peer,
        mib(disk),
        mib(tree_bytes)
    );
    Ok(())
}
