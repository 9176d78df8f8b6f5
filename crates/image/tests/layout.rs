//! Offline import of an OCI image layout the test writes itself.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use image::manifest::{OCI_CONFIG, OCI_INDEX, OCI_MANIFEST};
use image::{Digest, ImageError, ImageStore, LayoutError, PullConfig, StoreError};

fn tar_of(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(*mode);
        h.set_size(data.len() as u64);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn write_blob(dir: &Path, data: &[u8]) -> serde_json::Value {
    let d = Digest::sha256(data);
    let p = dir.join("blobs/sha256");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join(d.hex()), data).unwrap();
    serde_json::json!({ "digest": d.to_string(), "size": data.len() })
}

/// Writes a layout with one image named `v1` (two layers: gzip then zstd). Returns the layer
/// digests.
fn write_layout(dir: &Path) -> Vec<Digest> {
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static (hack/setup.sh)");
    let base = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar_of(&[
            ("bin/busybox", &busybox, 0o755),
            ("etc/motd", b"base\n", 0o644),
        ]))
        .unwrap();
        e.finish().unwrap()
    };
    let top = zstd::encode_all(&tar_of(&[("etc/motd", b"offline demo\n", 0o644)])[..], 3).unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Entrypoint": ["/bin/busybox"], "Cmd": ["sh"], "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [] },
    }))
    .unwrap();
    let mut c = write_blob(dir, &config);
    c["mediaType"] = OCI_CONFIG.into();
    let mut l1 = write_blob(dir, &base);
    l1["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
    let mut l2 = write_blob(dir, &top);
    l2["mediaType"] = "application/vnd.oci.image.layer.v1.tar+zstd".into();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": c, "layers": [l1, l2],
    }))
    .unwrap();
    let mut m = write_blob(dir, &manifest);
    m["mediaType"] = OCI_MANIFEST.into();
    m["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": "v1" });
    let index = serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [m] });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    vec![Digest::sha256(&base), Digest::sha256(&top)]
}

#[tokio::test]
async fn imports_layout_and_builds_rootfs() {
    let layout = tempfile::tempdir().unwrap();
    let layers = write_layout(layout.path());
    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path(), &PullConfig::default()).unwrap();
    let rec = store
        .import_oci_layout(layout.path(), "hypernetes/demo:v1")
        .await
        .unwrap();
    assert_eq!(rec.repo_tags, vec!["docker.io/hypernetes/demo:v1"]);
    assert_eq!(
        rec.layers
            .iter()
            .map(|l| l.digest.clone())
            .collect::<Vec<_>>(),
        layers
    );
    assert_eq!(rec.config.entrypoint, vec!["/bin/busybox"]);
    assert_eq!(
        store.status("hypernetes/demo:v1").map(|r| r.id),
        Some(rec.id.clone())
    );
    let disk = store.rootfs(&rec.id).unwrap();
    let motd = Command::new("debugfs")
        .args(["-R", "cat /etc/motd"])
        .arg(&disk.path)
        .output()
        .unwrap()
        .stdout;
    assert_eq!(motd, b"offline demo\n");
}

#[tokio::test]
async fn corrupt_layout_blob_is_refused() {
    let layout = tempfile::tempdir().unwrap();
    let layers = write_layout(layout.path());
    let p = layout.path().join("blobs/sha256").join(layers[1].hex());
    let mut data = std::fs::read(&p).unwrap();
    let n = data.len() - 1;
    data[n] ^= 1;
    std::fs::write(&p, data).unwrap();
    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path(), &PullConfig::default()).unwrap();
    let err = store
        .import_oci_layout(layout.path(), "hypernetes/demo:v1")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ImageError::Layout(LayoutError::Store(StoreError::DigestMismatch { expected, .. })) if *expected == layers[1]),
        "{err:?}"
    );
    assert!(!store.content().contains(&layers[1]));
    assert!(store.list(None).is_empty());
}

#[tokio::test]
async fn not_a_layout_and_unknown_name() {
    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path(), &PullConfig::default()).unwrap();
    let empty = tempfile::tempdir().unwrap();
    let err = store
        .import_oci_layout(empty.path(), "demo")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ImageError::Layout(LayoutError::NotALayout(_))),
        "{err:?}"
    );

    // Two entries, neither named as asked and neither with a platform.
    let layout = tempfile::tempdir().unwrap();
    write_layout(layout.path());
    let idx_path = layout.path().join("index.json");
    let mut idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&idx_path).unwrap()).unwrap();
    let entry = idx["manifests"][0].clone();
    idx["manifests"] = serde_json::json!([entry.clone(), entry]);
    std::fs::write(&idx_path, serde_json::to_vec(&idx).unwrap()).unwrap();
    let err = store
        .import_oci_layout(layout.path(), "demo:other")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ImageError::Layout(LayoutError::NoImage(_))),
        "{err:?}"
    );
    // Asked by its annotated name, it is found.
    assert!(store
        .import_oci_layout(layout.path(), "demo:v1")
        .await
        .is_ok());
}

fn tar_dir(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap()
}

#[tokio::test]
async fn imports_docker_save_archive() {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static (hack/setup.sh)");
    let l1 = tar_of(&[
        ("bin/busybox", &busybox, 0o755),
        ("etc/motd", b"one\n", 0o644),
    ]);
    let l2 = tar_of(&[("etc/motd", b"two\n", 0o644), ("etc/.wh.gone", b"", 0o644)]);
    let config = br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["sh"]}}"#;
    let config_name = format!("{}.json", Digest::sha256(config).hex());
    let manifest = serde_json::json!([
        { "Config": "other.json", "RepoTags": ["other:1"], "Layers": ["l1/layer.tar"] },
        { "Config": config_name, "RepoTags": ["hypernetes/demo:latest"],
          "Layers": ["l1/layer.tar", "l2/layer.tar"] },
    ]);
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    };
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    add(&config_name, config);
    add("other.json", b"{}");
    add("l1/layer.tar", &l1);
    add("l2/layer.tar", &l2);
    let archive = b.into_inner().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("demo.tar.gz");
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&archive).unwrap();
    std::fs::write(&file, e.finish().unwrap()).unwrap();

    let store = ImageStore::open(dir.path().join("store"), &PullConfig::default()).unwrap();
    let rec = store
        .import_archive(&file, "hypernetes/demo")
        .await
        .unwrap();
    assert_eq!(rec.id, Digest::sha256(config));
    assert_eq!(rec.repo_tags, vec!["docker.io/hypernetes/demo:latest"]);
    assert_eq!(rec.layers.len(), 2);
    assert_eq!(rec.layers[1].digest, Digest::sha256(&l2));
    assert_eq!(rec.config.cmd, vec!["sh"]);
    let disk = store.rootfs(&rec.id).unwrap();
    let motd = Command::new("debugfs")
        .args(["-R", "cat /etc/motd"])
        .arg(&disk.path)
        .output()
        .unwrap()
        .stdout;
    assert_eq!(motd, b"two\n");
    // No extraction leftovers next to the blobs.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("store/content"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("import-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn imports_tarred_oci_layout_and_refuses_escaping_archives() {
    let layout = tempfile::tempdir().unwrap();
    write_layout(layout.path());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("layout.tar");
    std::fs::write(&file, tar_dir(layout.path())).unwrap();
    let store = ImageStore::open(dir.path().join("store"), &PullConfig::default()).unwrap();
    let rec = store.import_archive(&file, "demo:v1").await.unwrap();
    assert_eq!(rec.config.entrypoint, vec!["/bin/busybox"]);

    // manifest.json pointing outside the archive.
    let mut b = tar::Builder::new(Vec::new());
    let m = br#"[{"Config":"../../etc/passwd","RepoTags":["x:1"],"Layers":[]}]"#;
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(m.len() as u64);
    b.append_data(&mut h, "manifest.json", &m[..]).unwrap();
    let bad = dir.path().join("bad.tar");
    std::fs::write(&bad, b.into_inner().unwrap()).unwrap();
    let err = store.import_archive(&bad, "x:1").await.unwrap_err();
    assert!(
        matches!(err, ImageError::Layout(LayoutError::BadArchivePath(_))),
        "{err:?}"
    );
    assert!(store.status("x:1").is_none());
}
