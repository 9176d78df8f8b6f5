//! Pulls against a real registry: Debian's `docker-registry` started on 127.0.0.1 by the test,
//! serving images the test builds from busybox-static and pushes over the distribution API.

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use image::manifest::{
    DOCKER_CONFIG, DOCKER_LIST, DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST,
};
use image::{
    Auth, ContentStore, Digest, DiskCache, ImageError, ImageStore, PullConfig, PullError, Puller,
    Reference,
};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;

const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ZSTD_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const DOCKER_GZIP_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// A docker-registry process on a free 127.0.0.1 port, killed on drop.
struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        Self::start_with(None)
    }

    /// With `Some((user, password))`, the registry requires htpasswd basic auth.
    fn start_with(user: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let mut auth = String::new();
        if let Some((user, password)) = user {
            // bcrypt (cost 4) via libcrypt, as docker-registry's htpasswd wants.
            let out = Command::new("python3")
                .args(["-W", "ignore", "-c"])
                .arg("import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))")
                .arg(password)
                .output()
                .expect("python3 must be installed");
            assert!(out.status.success(), "{out:?}");
            let hash = String::from_utf8(out.stdout).unwrap();
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{}\n", hash.trim())).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                htpasswd.display()
            );
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{auth}",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry must be installed (hack/setup.sh)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "registry did not start on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A layer tarball built from files the test names.
struct TarBuilder(tar::Builder<Vec<u8>>);

impl TarBuilder {
    fn new() -> Self {
        TarBuilder(tar::Builder::new(Vec::new()))
    }
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h
    }
    fn dir(mut self, path: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    fn file(mut self, path: &str, data: &[u8], mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }
    fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o755, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
    fn tar(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn busybox() -> Vec<u8> {
    std::fs::read("/bin/busybox").expect("busybox-static must be installed (hack/setup.sh)")
}

fn base_layer() -> Vec<u8> {
    TarBuilder::new()
        .dir("bin")
        .file("bin/busybox", &busybox(), 0o755)
        .hardlink("bin/sh", "bin/busybox")
        .dir("etc")
        .file("etc/hostname", b"base\n", 0o644)
        .file("etc/remove-me", b"gone in layer 2\n", 0o644)
        .tar()
}

fn top_layer() -> Vec<u8> {
    TarBuilder::new()
        .dir("etc")
        .file("etc/.wh.remove-me", b"", 0o644)
        .file("etc/hostname", b"top\n", 0o644)
        .file("etc/added", b"added\n", 0o600)
        .tar()
}

/// Pushes blobs and manifests over the distribution API.
struct Pusher {
    client: oci_client::Client,
    registry: String,
}

impl Pusher {
    fn new(registry: &str) -> Pusher {
        Pusher {
            client: oci_client::Client::new(ClientConfig {
                protocol: ClientProtocol::Http,
                ..Default::default()
            }),
            registry: registry.to_string(),
        }
    }

    async fn with_auth(registry: &str, auth: RegistryAuth) -> Pusher {
        let p = Self::new(registry);
        p.client.store_auth_if_needed(registry, &auth).await;
        p
    }

    fn reference(&self, repo: &str, tag_or_digest: &str) -> oci_client::Reference {
        if tag_or_digest.starts_with("sha256:") {
            oci_client::Reference::with_digest(
                self.registry.clone(),
                repo.into(),
                tag_or_digest.into(),
            )
        } else {
            oci_client::Reference::with_tag(
                self.registry.clone(),
                repo.into(),
                tag_or_digest.into(),
            )
        }
    }

    async fn blob(&self, repo: &str, data: &[u8]) -> serde_json::Value {
        let digest = Digest::sha256(data).to_string();
        self.client
            .push_blob(&self.reference(repo, "latest"), data.to_vec(), &digest)
            .await
            .unwrap();
        serde_json::json!({ "digest": digest, "size": data.len() })
    }

    async fn manifest(
        &self,
        repo: &str,
        tag: &str,
        media_type: &str,
        body: &serde_json::Value,
    ) -> Digest {
        let bytes = serde_json::to_vec(body).unwrap();
        self.client
            .push_manifest_raw(
                &self.reference(repo, tag),
                bytes.clone(),
                http::HeaderValue::from_str(media_type).unwrap(),
            )
            .await
            .unwrap();
        Digest::sha256(&bytes)
    }

    /// Push config + layers and an image manifest; returns (manifest digest, size, config digest).
    async fn image(
        &self,
        repo: &str,
        tag: &str,
        docker: bool,
        layers: &[(&str, Vec<u8>)],
        arch: &str,
    ) -> (Digest, usize, Digest) {
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": { "Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "Labels": { "test.image": format!("{repo}:{tag}") } },
            "rootfs": { "type": "layers", "diff_ids": [] },
        });
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let mut cdesc = self.blob(repo, &config_bytes).await;
        cdesc["mediaType"] = (if docker { DOCKER_CONFIG } else { OCI_CONFIG }).into();
        let mut ldescs = Vec::new();
        for (media_type, data) in layers {
            let mut d = self.blob(repo, data).await;
            d["mediaType"] = (*media_type).into();
            ldescs.push(d);
        }
        let mt = if docker {
            DOCKER_MANIFEST
        } else {
            OCI_MANIFEST
        };
        let body = serde_json::json!({
            "schemaVersion": 2, "mediaType": mt, "config": cdesc, "layers": ldescs,
        });
        let size = serde_json::to_vec(&body).unwrap().len();
        let digest = self.manifest(repo, tag, mt, &body).await;
        (digest, size, Digest::sha256(&config_bytes))
    }
}

fn puller(store: &ContentStore, reg: &Registry) -> Puller {
    Puller::new(
        store.clone(),
        &PullConfig {
            insecure_registries: vec![reg.addr.clone()],
            ..Default::default()
        },
    )
}

fn debugfs(img: &Path, req: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(req)
        .arg(img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn debugfs_cat(img: &Path, file: &str) -> Vec<u8> {
    Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {file}"))
        .arg(img)
        .output()
        .unwrap()
        .stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_single_layer_by_tag_and_digest() {
    let reg = Registry::start();
    let pusher = Pusher::new(&reg.addr);
    let layer = gzip(&base_layer());
    let (mdigest, _, config_digest) = pusher
        .image(
            "tests/single",
            "v1",
            true,
            &[(DOCKER_GZIP_LAYER, layer.clone())],
            "amd64",
        )
        .await;

    let dir = tempfile::tempdir().unwrap();
    let store = ContentStore::open(dir.path().join("content")).unwrap();
    let p = puller(&store, &reg);
    let r = Reference::parse(&format!("{}/tests/single:v1", reg.addr)).unwrap();
    let img = p.pull(&r, &Auth::Anonymous).await.unwrap();
    assert_eq!(img.manifest_digest, mdigest);
    assert_eq!(img.index_digest, None);
    assert_eq!(img.repo_digest(), mdigest);
    assert_eq!(img.config_digest, config_digest);
    assert_eq!(img.layers.len(), 1);
    assert_eq!(img.layers[0].digest, Digest::sha256(&layer));
    assert_eq!(img.layers[0].media_type, DOCKER_GZIP_LAYER);
    assert_eq!(store.read(&img.layers[0].digest).unwrap(), layer);
    assert!(store.contains(&mdigest) && store.contains(&config_digest));
    assert!(img.downloaded_bytes as usize > layer.len());

    // Again, by digest: nothing new downloaded.
    let by_digest = Reference::parse(&format!("{}/tests/single@{mdigest}", reg.addr)).unwrap();
    let again = p.pull(&by_digest, &Auth::Anonymous).await.unwrap();
    assert_eq!(again.downloaded_bytes, 0);
    assert_eq!(again.layers, img.layers);

    // A digest the registry does not have fails.
    let missing = Reference::parse(&format!(
        "{}/tests/single@{}",
        reg.addr,
        Digest::sha256(b"nope")
    ))
    .unwrap();
    assert!(matches!(
        p.pull(&missing, &Auth::Anonymous).await,
        Err(PullError::Registry { .. })
    ));
    // So does an unknown tag.
    let unknown = Reference::parse(&format!("{}/tests/single:nope", reg.addr)).unwrap();
    assert!(matches!(
        p.pull(&unknown, &Auth::Anonymous).await,
        Err(PullError::Registry { .. })
    ));
}

async fn push_multiarch(pusher: &Pusher, docker_list: bool) -> (Digest, Digest, Vec<Vec<u8>>) {
    let base = gzip(&base_layer());
    let top = zstd::encode_all(&top_layer()[..], 3).unwrap();
    let (amd, amd_size, _) = pusher
        .image(
            "tests/multi",
            "amd64",
            false,
            &[(GZIP_LAYER, base.clone()), (ZSTD_LAYER, top.clone())],
            "amd64",
        )
        .await;
    let arm_layer = gzip(&TarBuilder::new().file("arm", b"arm", 0o644).tar());
    let (arm, arm_size, _) = pusher
        .image(
            "tests/multi",
            "arm64",
            false,
            &[(GZIP_LAYER, arm_layer)],
            "arm64",
        )
        .await;
    let mt = if docker_list { DOCKER_LIST } else { OCI_INDEX };
    let index = serde_json::json!({
        "schemaVersion": 2, "mediaType": mt,
        "manifests": [
            { "mediaType": OCI_MANIFEST, "digest": arm.to_string(), "size": arm_size,
              "platform": { "architecture": "arm64", "os": "linux", "variant": "v8" } },
            { "mediaType": OCI_MANIFEST, "digest": amd.to_string(), "size": amd_size,
              "platform": { "architecture": "amd64", "os": "linux" } },
        ],
    });
    let index_digest = pusher.manifest("tests/multi", "latest", mt, &index).await;
    (index_digest, amd, vec![base, top])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_index_multi_layer_gzip_zstd_to_rootfs_disk() {
    let reg = Registry::start();
    let pusher = Pusher::new(&reg.addr);
    let (index_digest, amd, layers) = push_multiarch(&pusher, false).await;

    let dir = tempfile::tempdir().unwrap();
    let store = ContentStore::open(dir.path().join("content")).unwrap();
    let p = puller(&store, &reg);
    let r = Reference::parse(&format!("{}/tests/multi", reg.addr)).unwrap();
    let img = p.pull(&r, &Auth::Anonymous).await.unwrap();
    assert_eq!(img.index_digest.as_ref(), Some(&index_digest));
    assert_eq!(
        img.manifest_digest, amd,
        "linux/amd64 chosen from the index"
    );
    assert_eq!(img.repo_digest(), index_digest);
    let got: Vec<_> = img.layers.iter().map(|l| l.digest.clone()).collect();
    assert_eq!(
        got,
        layers.iter().map(|l| Digest::sha256(l)).collect::<Vec<_>>()
    );
    assert_eq!(img.layers[1].media_type, ZSTD_LAYER);

    // By index digest and by platform manifest digest.
    let by_index = Reference::parse(&format!("{}/tests/multi@{index_digest}", reg.addr)).unwrap();
    assert_eq!(
        p.pull(&by_index, &Auth::Anonymous)
            .await
            .unwrap()
            .manifest_digest,
        amd
    );
    let by_manifest = Reference::parse(&format!("{}/tests/multi@{amd}", reg.addr)).unwrap();
    let direct = p.pull(&by_manifest, &Auth::Anonymous).await.unwrap();
    assert_eq!(direct.index_digest, None);
    assert_eq!(direct.layers, img.layers);

    // Layers in order, whiteout applied, into an ext4 disk.
    let cache = DiskCache::open(dir.path().join("disks")).unwrap();
    let disk = image::rootfs_disk(&store, &cache, &img).unwrap();
    assert!(!disk.cached);
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&disk.path)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "{fsck:?}");
    assert_eq!(debugfs_cat(&disk.path, "/bin/busybox"), busybox());
    assert_eq!(debugfs_cat(&disk.path, "/etc/hostname"), b"top\n");
    assert_eq!(debugfs_cat(&disk.path, "/etc/added"), b"added\n");
    let etc = debugfs(&disk.path, "ls /etc");
    assert!(!etc.contains("remove-me"), "{etc}");
    assert!(!etc.contains(".wh."), "{etc}");
    let sh = debugfs(&disk.path, "stat /bin/sh");
    assert!(sh.contains("Links: 2"), "{sh}");
    assert!(image::rootfs_disk(&store, &cache, &img).unwrap().cached);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_manifest_list_resolves_to_amd64() {
    let reg = Registry::start();
    let pusher = Pusher::new(&reg.addr);
    let (list_digest, amd, _) = push_multiarch(&pusher, true).await;
    let dir = tempfile::tempdir().unwrap();
    let store = ContentStore::open(dir.path()).unwrap();
    let r = Reference::parse(&format!("{}/tests/multi:latest", reg.addr)).unwrap();
    let img = puller(&store, &reg)
        .pull(&r, &Auth::Anonymous)
        .await
        .unwrap();
    assert_eq!(img.index_digest, Some(list_digest));
    assert_eq!(img.manifest_digest, amd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_parallel_pulls_download_each_blob_once() {
    let reg = Registry::start();
    let pusher = Pusher::new(&reg.addr);
    let (_, _, layers) = push_multiarch(&pusher, false).await;
    let dir = tempfile::tempdir().unwrap();
    let store = ContentStore::open(dir.path()).unwrap();
    let r = Reference::parse(&format!("{}/tests/multi:latest", reg.addr)).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let p = puller(&store, &reg);
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            p.pull(&r, &Auth::Anonymous).await.unwrap()
        }));
    }
    let mut total = 0;
    let mut results = Vec::new();
    for t in tasks {
        let img = t.await.unwrap();
        total += img.downloaded_bytes;
        results.push(img);
    }
    let config_size = store.size(&results[0].config_digest).unwrap();
    let expected: u64 = layers.iter().map(|l| l.len() as u64).sum::<u64>() + config_size;
    assert_eq!(
        total, expected,
        "every blob downloaded exactly once across 4 pulls"
    );
    for img in &results {
        assert_eq!(img.manifest_digest, results[0].manifest_digest);
        assert_eq!(img.layers, results[0].layers);
        assert!(img.layers.iter().all(|l| store.contains(&l.digest)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_needs_the_insecure_setting() {
    let reg = Registry::start();
    let pusher = Pusher::new(&reg.addr);
    pusher
        .image(
            "tests/tls",
            "v1",
            true,
            &[(DOCKER_GZIP_LAYER, gzip(&base_layer()))],
            "amd64",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let store = ContentStore::open(dir.path()).unwrap();
    let secure = Puller::new(store.clone(), &PullConfig::default());
    let r = Reference::parse(&format!("{}/tests/tls:v1", reg.addr)).unwrap();
    assert!(matches!(
        secure.pull(&r, &Auth::Anonymous).await,
        Err(PullError::Registry { .. })
    ));
    assert!(store.list().unwrap().is_empty());
}

/// A tiny registry that serves fixed bytes per path over HTTP/1.1 (one request per connection),
/// so tests can serve content that does not match its digest.
async fn serve_fixed(routes: std::collections::HashMap<String, (String, Vec<u8>)>) -> String {
    serve_fixed_with_token(routes, None).await
}

/// With `Some((user, password, token))` every `/v2/` request needs `Authorization: Bearer
/// <token>`, and `/token` hands the token out for basic credentials `user:password` (the Docker
/// Hub token flow).
async fn serve_fixed_with_token(
    routes: std::collections::HashMap<String, (String, Vec<u8>)>,
    token_auth: Option<(String, String, String)>,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let routes = std::sync::Arc::new(routes);
    let token_auth = std::sync::Arc::new(token_auth);
    let realm = format!("http://{addr}/token");
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let routes = routes.clone();
            let token_auth = token_auth.clone();
            let realm = realm.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&req);
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or("").to_string();
                let path = parts.next().unwrap_or("").to_string();
                let authz = line
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("authorization")
                            .then(|| v.trim().to_string())
                    })
                    .unwrap_or_default();
                let mut extra = String::new();
                let denied = match token_auth.as_ref() {
                    None => None,
                    Some((user, password, token)) => {
                        use base64::Engine as _;
                        let basic = format!(
                            "Basic {}",
                            base64::engine::general_purpose::STANDARD
                                .encode(format!("{user}:{password}"))
                        );
                        if path.starts_with("/token") {
                            if authz == basic {
                                Some(("200 OK", format!(r#"{{"token":"{token}"}}"#)))
                            } else {
                                Some(("401 Unauthorized", "{}".to_string()))
                            }
                        } else if authz != format!("Bearer {token}") {
                            extra = format!(
                                "WWW-Authenticate: Bearer realm=\"{realm}\",service=\"test\"\r\n"
                            );
                            Some((
                                "401 Unauthorized",
                                r#"{"errors":[{"code":"UNAUTHORIZED","message":"auth"}]}"#
                                    .to_string(),
                            ))
                        } else {
                            None
                        }
                    }
                };
                let (status, ctype, body) = match routes.get(&path) {
                    _ if denied.is_some() => {
                        let (st, b) = denied.unwrap_or_default();
                        (st, "application/json".to_string(), b.into_bytes())
                    }
                    Some((ct, body)) => ("200 OK", ct.clone(), body.clone()),
                    None if path == "/v2/" => ("200 OK", "application/json".into(), b"{}".to_vec()),
                    None => (
                        "404 Not Found",
                        "application/json".into(),
                        br#"{"errors":[{"code":"NOT_FOUND","message":"not found"}]}"#.to_vec(),
                    ),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\n{extra}Content-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                if method != "HEAD" {
                    let _ = sock.write_all(&body).await;
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_blob_and_tampered_manifest_are_refused() {
    let layer = gzip(&base_layer());
    let mut corrupted = layer.clone();
    let mid = corrupted.len() / 2;
    corrupted[mid] ^= 0xff;
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let layer_digest = Digest::sha256(&layer);
    let config_digest = Digest::sha256(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": config_digest.to_string(), "size": config.len() },
        "layers": [{ "mediaType": GZIP_LAYER, "digest": layer_digest.to_string(), "size": layer.len() }],
    }))
    .unwrap();
    let manifest_digest = Digest::sha256(&manifest);
    let mut routes = std::collections::HashMap::new();
    routes.insert(
        "/v2/bad/manifests/v1".to_string(),
        (OCI_MANIFEST.to_string(), manifest.clone()),
    );
    routes.insert(
        format!("/v2/bad/blobs/{config_digest}"),
        (OCI_CONFIG.to_string(), config.clone()),
    );
    routes.insert(
        format!("/v2/bad/blobs/{layer_digest}"),
        (GZIP_LAYER.to_string(), corrupted),
    );
    // A manifest fetched by a digest it does not have.
    let other = Digest::sha256(b"some other manifest");
    routes.insert(
        format!("/v2/bad/manifests/{other}"),
        (OCI_MANIFEST.to_string(), manifest),
    );
    let addr = serve_fixed(routes).await;

    let dir = tempfile::tempdir().unwrap();
    let store = ContentStore::open(dir.path()).unwrap();
    let p = Puller::new(
        store.clone(),
        &PullConfig {
            insecure_registries: vec![addr.clone()],
            ..Default::default()
        },
    );
    let r = Reference::parse(&format!("{addr}/bad:v1")).unwrap();
    let err = p.pull(&r, &Auth::Anonymous).await.unwrap_err();
    let refused = match &err {
        PullError::Store(image::StoreError::DigestMismatch { expected, .. }) => {
            *expected == layer_digest
        }
        // oci-client's own stream check may notice first.
        PullError::Download { digest, .. } => *digest == layer_digest,
        _ => false,
    };
    assert!(refused, "unexpected error: {err:?}");
    assert!(
        !store.contains(&layer_digest),
        "corrupted layer must not be stored"
    );
    assert!(store.contains(&manifest_digest) && store.contains(&config_digest));
    assert_eq!(
        std::fs::read_dir(dir.path().join("ingest"))
            .unwrap()
            .count(),
        0
    );

    let tampered = Reference::parse(&format!("{addr}/bad@{other}")).unwrap();
    let err = p.pull(&tampered, &Auth::Anonymous).await.unwrap_err();
    assert!(
        matches!(&err, PullError::ManifestDigestMismatch { expected, actual } if *expected == other && *actual == manifest_digest),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_right_and_wrong_credentials() {
    let reg = Registry::start_with(Some(("alice", "s3cret")));
    let pusher = Pusher::with_auth(
        &reg.addr,
        RegistryAuth::Basic("alice".into(), "s3cret".into()),
    )
    .await;
    let (mdigest, _, _) = pusher
        .image(
            "private/app",
            "v1",
            true,
            &[(DOCKER_GZIP_LAYER, gzip(&base_layer()))],
            "amd64",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let store = ContentStore::open(dir.path()).unwrap();
    let p = puller(&store, &reg);
    let r = Reference::parse(&format!("{}/private/app:v1", reg.addr)).unwrap();

    for bad in [
        Auth::Anonymous,
        Auth::Basic {
            username: "alice".into(),
            password: "wrong".into(),
        },
        Auth::Basic {
            username: "mallory".into(),
            password: "s3cret".into(),
        },
    ] {
        let err = p.pull(&r, &bad).await.unwrap_err();
        assert!(
            matches!(err, PullError::Registry { .. }),
            "{bad:?}: {err:?}"
        );
    }
    assert!(store.list().unwrap().is_empty());

    // The same puller, now with the right credentials (not the ones it saw first).
    let good = Auth::Basic {
        username: "alice".into(),
        password: "s3cret".into(),
    };
    let img = p.pull(&r, &good).await.unwrap();
    assert_eq!(img.manifest_digest, mdigest);
    assert!(img.layers.iter().all(|l| store.contains(&l.digest)));
    // Credentials never show in Debug output.
    assert!(!format!("{good:?}").contains("s3cret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_store_records_status_remove_gc() {
    let reg = Registry::start();
    let pusher = Pusher::new(&reg.addr);
    let (index_digest, amd, _) = push_multiarch(&pusher, false).await;
    let (single, _, single_config) = pusher
        .image(
            "tests/single",
            "v1",
            true,
            &[(DOCKER_GZIP_LAYER, gzip(&base_layer()))],
            "amd64",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = PullConfig {
        insecure_registries: vec![reg.addr.clone()],
        ..Default::default()
    };
    let store = ImageStore::open(dir.path(), &config).unwrap();
    let multi = store
        .pull(&format!("{}/tests/multi", reg.addr), &Auth::Anonymous)
        .await
        .unwrap();
    assert_eq!(
        multi.repo_tags,
        vec![format!("{}/tests/multi:latest", reg.addr)]
    );
    assert_eq!(
        multi.repo_digests,
        vec![format!("{}/tests/multi@{index_digest}", reg.addr)]
    );
    assert_eq!(multi.manifest_digest, amd);
    assert_eq!(multi.config.cmd, vec!["/bin/sh"]);
    assert_eq!(multi.config.env, vec!["PATH=/bin"]);
    assert_eq!(multi.config.architecture, "amd64");
    let layer_bytes: u64 = multi.layers.iter().map(|l| l.size).sum();
    assert!(multi.size > layer_bytes);

    let one = store
        .pull(&format!("{}/tests/single:v1", reg.addr), &Auth::Anonymous)
        .await
        .unwrap();
    assert_eq!(one.id, single_config);
    assert_eq!(
        one.repo_digests,
        vec![format!("{}/tests/single@{single}", reg.addr)]
    );

    // Status by every name form; absence is None, not an error.
    for name in [
        multi.id.to_string(),
        multi.id.hex().to_string(),
        format!("{}/tests/multi", reg.addr),
        format!("{}/tests/multi:latest", reg.addr),
        format!("{}/tests/multi@{index_digest}", reg.addr),
    ] {
        assert_eq!(
            store.status(&name).map(|r| r.id),
            Some(multi.id.clone()),
            "{name}"
        );
    }
    assert!(store.status("busybox").is_none());
    assert!(store
        .status(&format!("{}/tests/multi:other", reg.addr))
        .is_none());
    assert_eq!(store.list(None).len(), 2);
    assert_eq!(
        store.list(Some(&format!("{}/tests/single:v1", reg.addr))),
        vec![one.clone()]
    );

    // Records survive a restart.
    drop(store);
    let store = ImageStore::open(dir.path(), &config).unwrap();
    assert_eq!(store.status(&one.id.to_string()), Some(one.clone()));

    let disk = store.rootfs(&multi.id).unwrap();
    assert_eq!(debugfs_cat(&disk.path, "/etc/hostname"), b"top\n");
    let (used, _) = store.fs_usage().unwrap();
    assert!(used >= disk.size);

    // In use: refused with a clear error; then removed, then collected.
    let err = store
        .remove(&format!("{}/tests/multi", reg.addr), |id| *id == multi.id)
        .unwrap_err();
    assert!(
        matches!(&err, ImageError::InUse(id) if *id == multi.id),
        "{err}"
    );
    store
        .remove(&format!("{}/tests/multi", reg.addr), |_| false)
        .unwrap();
    store
        .remove(&format!("{}/tests/multi", reg.addr), |_| false)
        .unwrap();
    assert!(store.status(&multi.id.to_string()).is_none());
    let gc = store.gc().await.unwrap();
    assert_eq!(gc.disks, 1);
    assert!(!disk.path.exists());
    // The zstd layer and the amd64 manifest were only in the removed image; the shared
    // gzip base layer and the other image's blobs stay.
    assert!(!store.content().contains(&multi.layers[1].digest));
    assert!(!store.content().contains(&amd));
    assert!(
        store.content().contains(&multi.layers[0].digest),
        "shared layer kept"
    );
    assert!(one
        .layers
        .iter()
        .all(|l| store.content().contains(&l.digest)));
    assert!(store.content().contains(&one.id));
    assert!(gc.blobs >= 3);
    assert_eq!(store.gc().await.unwrap(), image::GcStats::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_are_tried_in_order_and_progress_is_reported() {
    let mirror_empty = Registry::start();
    let mirror = Registry::start();
    let pusher = Pusher::new(&mirror.addr);
    let (_, _, layers) = push_multiarch(&pusher, false).await;
    // The origin: a port nothing listens on.
    let origin = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let store = ContentStore::open(dir.path()).unwrap();
    let mut mirrors = std::collections::BTreeMap::new();
    mirrors.insert(
        origin.clone(),
        vec![mirror_empty.addr.clone(), mirror.addr.clone()],
    );
    let p = Puller::new(
        store.clone(),
        &PullConfig {
            insecure_registries: vec![
                origin.clone(),
                mirror_empty.addr.clone(),
                mirror.addr.clone(),
            ],
            mirrors,
        },
    );
    let r = Reference::parse(&format!("{origin}/tests/multi:latest")).unwrap();
    let (tx, rx) = tokio::sync::watch::channel(image::PullProgress::default());
    let img = p
        .pull_with_progress(&r, &Auth::Anonymous, Some(&tx))
        .await
        .unwrap();
    assert_eq!(img.reference, r, "the image keeps its own name");
    assert_eq!(
        img.layers
            .iter()
            .map(|l| l.digest.clone())
            .collect::<Vec<_>>(),
        layers.iter().map(|l| Digest::sha256(l)).collect::<Vec<_>>()
    );
    let progress = rx.borrow().clone();
    assert_eq!(progress.blobs_total, 3);
    assert_eq!(progress.blobs_done, 3);
    let config_size = store.size(&img.config_digest).unwrap();
    let total = layers.iter().map(|l| l.len() as u64).sum::<u64>() + config_size;
    assert_eq!(progress.bytes_total, total);
    assert_eq!(progress.bytes_done, total);

    // Without mirrors the dead origin fails.
    let direct = Puller::new(
        store.clone(),
        &PullConfig {
            insecure_registries: vec![origin.clone()],
            ..Default::default()
        },
    );
    assert!(matches!(
        direct.pull(&r, &Auth::Anonymous).await,
        Err(PullError::Registry { .. })
    ));
}

/// Write an OCI layout with one image tagged `v1`; returns its manifest digest.
fn write_oci_layout(dir: &Path, layers: &[(&str, Vec<u8>)]) -> Digest {
    let blob = |data: &[u8]| {
        let d = Digest::sha256(data);
        let p = dir.join("blobs/sha256");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join(d.hex()), data).unwrap();
        serde_json::json!({ "digest": d.to_string(), "size": data.len() })
    };
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": { "Cmd": ["/bin/sh"] },
        "rootfs": { "type": "layers", "diff_ids": [] },
    }))
    .unwrap();
    let mut c = blob(&config);
    c["mediaType"] = OCI_CONFIG.into();
    let ls: Vec<_> = layers
        .iter()
        .map(|(mt, data)| {
            let mut d = blob(data);
            d["mediaType"] = (*mt).into();
            d
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": c, "layers": ls,
    }))
    .unwrap();
    let mut m = blob(&manifest);
    m["mediaType"] = OCI_MANIFEST.into();
    m["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": "v1" });
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [m] });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    Digest::sha256(&manifest)
}

/// Interop: an image pushed by skopeo (not by our own pusher) pulls and unpacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_image_pushed_by_skopeo() {
    let reg = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    let base = gzip(&base_layer());
    let top = zstd::encode_all(&top_layer()[..], 3).unwrap();
    let mdigest = write_oci_layout(
        layout.path(),
        &[(GZIP_LAYER, base.clone()), (ZSTD_LAYER, top.clone())],
    );
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--insecure-policy",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:v1", layout.path().display()))
        .arg(format!("docker://{}/skopeo/demo:v1", reg.addr))
        .output()
        .expect("skopeo must be installed (hack/setup.sh)");
    assert!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let store = ContentStore::open(dir.path().join("content")).unwrap();
    let r = Reference::parse(&format!("{}/skopeo/demo:v1", reg.addr)).unwrap();
    let img = puller(&store, &reg)
        .pull(&r, &Auth::Anonymous)
        .await
        .unwrap();
    assert_eq!(img.manifest_digest, mdigest);
    assert_eq!(img.layers[0].digest, Digest::sha256(&base));
    assert_eq!(img.layers[1].digest, Digest::sha256(&top));
    let cache = DiskCache::open(dir.path().join("disks")).unwrap();
    let disk = image::rootfs_disk(&store, &cache, &img).unwrap();
    assert_eq!(debugfs_cat(&disk.path, "/etc/hostname"), b"top\n");
    assert!(!debugfs(&disk.path, "ls /etc").contains("remove-me"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow_with_basic_credentials() {
    let layer = gzip(&base_layer());
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let (ld, cd) = (Digest::sha256(&layer), Digest::sha256(&config));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": cd.to_string(), "size": config.len() },
        "layers": [{ "mediaType": GZIP_LAYER, "digest": ld.to_string(), "size": layer.len() }],
    }))
    .unwrap();
    let mut routes = std::collections::HashMap::new();
    routes.insert(
        "/v2/priv/manifests/v1".to_string(),
        (OCI_MANIFEST.to_string(), manifest),
    );
    routes.insert(
        format!("/v2/priv/blobs/{cd}"),
        (OCI_CONFIG.to_string(), config),
    );
    routes.insert(
        format!("/v2/priv/blobs/{ld}"),
        (GZIP_LAYER.to_string(), layer.clone()),
    );
    let addr = serve_fixed_with_token(
        routes,
        Some(("bob".into(), "hunter2".into(), "tok-123".into())),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let store = ContentStore::open(dir.path()).unwrap();
    let p = Puller::new(
        store.clone(),
        &PullConfig {
            insecure_registries: vec![addr.clone()],
            ..Default::default()
        },
    );
    let r = Reference::parse(&format!("{addr}/priv:v1")).unwrap();
    let wrong = Auth::Basic {
        username: "bob".into(),
        password: "nope".into(),
    };
    assert!(p.pull(&r, &wrong).await.is_err());
    assert!(p.pull(&r, &Auth::Anonymous).await.is_err());
    assert!(!store.contains(&ld));
    // A registry token is sent as is.
    let img = p.pull(&r, &Auth::Bearer("tok-123".into())).await.unwrap();
    assert_eq!(img.layers[0].digest, ld);
    store.remove(&ld).unwrap();
    let right = Auth::Basic {
        username: "bob".into(),
        password: "hunter2".into(),
    };
    let img = p.pull(&r, &right).await.unwrap();
    assert_eq!(img.layers[0].digest, ld);
    assert_eq!(store.read(&ld).unwrap(), layer);
}
