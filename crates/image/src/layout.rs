//! Offline import of an OCI image layout directory (`oci-layout`, `index.json`, `blobs/`).
//!
//! Every blob is copied into the content store through the same verification as a pull (digest
//! and size), so a corrupt layout imports nothing it cannot vouch for.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::digest::{Digest, DigestError};
use crate::manifest::{self, Descriptor, Manifest, ManifestError};
use crate::pull::{Layer, PulledImage};
use crate::reference::Reference;
use crate::store::{ContentStore, StoreError};

/// The annotation naming an image in an OCI layout's index.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Errors from importing a layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A layout file could not be read.
    #[error("reading {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Not an OCI layout (missing or wrong `oci-layout`).
    #[error("{0} is not an OCI image layout (no valid oci-layout file)")]
    NotALayout(PathBuf),
    /// A manifest or index is malformed.
    #[error("malformed manifest in layout")]
    Manifest(#[from] ManifestError),
    /// A descriptor has an invalid digest.
    #[error("invalid digest in layout")]
    Digest(#[from] DigestError),
    /// A blob failed verification or could not be stored.
    #[error("storing a layout blob failed")]
    Store(#[from] StoreError),
    /// No index entry matches the requested name or platform.
    #[error("layout has no image named `{0}` for linux/amd64")]
    NoImage(String),
    /// An archive could not be extracted (it is unpacked with the same path checks as layers).
    #[error("extracting image archive failed")]
    Unpack(#[from] crate::unpack::UnpackError),
    /// A `docker save` manifest.json is malformed.
    #[error("malformed docker save manifest.json")]
    DockerManifest(#[source] serde_json::Error),
    /// A path named by manifest.json is outside the archive.
    #[error("docker save manifest.json names `{0}`, which is not a plain path in the archive")]
    BadArchivePath(String),
    /// The index nests indexes more than once.
    #[error("layout index nests indexes too deeply")]
    NestedIndex,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs")
        .join(digest.algorithm().name())
        .join(digest.hex())
}

/// Copy one blob from the layout into the store, verifying digest and size.
fn copy_blob(store: &ContentStore, dir: &Path, desc: &Descriptor) -> Result<Digest, LayoutError> {
    let digest = desc.digest()?;
    let Some(mut ingest) = store.begin(&digest)? else {
        return Ok(digest);
    };
    ingest.expect_size(desc.size);
    let path = blob_path(dir, &digest);
    let mut f = File::open(&path).map_err(io_err(&path))?;
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io_err(&path))?;
        if n == 0 {
            break;
        }
        ingest.write(&buf[..n])?;
    }
    ingest.commit()?;
    Ok(digest)
}

/// Import the image `name` from the layout at `dir` into `store`. The index entry is the one
/// whose `org.opencontainers.image.ref.name` is `name`'s tag (or the whole name), else the only
/// entry; an index found there is resolved to linux/amd64. Blocking.
pub fn import_oci_layout(
    store: &ContentStore,
    dir: &Path,
    name: &Reference,
) -> Result<PulledImage, LayoutError> {
    let marker = dir.join("oci-layout");
    let ok = fs::read(&marker)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v.get("imageLayoutVersion").is_some());
    if !ok {
        return Err(LayoutError::NotALayout(dir.to_path_buf()));
    }
    let index_path = dir.join("index.json");
    let index_bytes = fs::read(&index_path).map_err(io_err(&index_path))?;
    let Manifest::Index(entries) = Manifest::parse(&index_bytes)? else {
        return Err(LayoutError::NoImage(name.to_string()));
    };
    let wanted = [name.tag().unwrap_or_default().to_string(), name.to_string()];
    let entry = entries
        .iter()
        .find(|e| {
            e.annotations
                .get(REF_NAME)
                .is_some_and(|n| wanted.contains(n))
        })
        .or(if entries.len() == 1 {
            entries.first()
        } else {
            None
        })
        .or_else(|| manifest::select_linux_amd64(&entries))
        .ok_or_else(|| LayoutError::NoImage(name.to_string()))?;

    let first = copy_blob(store, dir, entry)?;
    let (index_digest, manifest_digest, config, layers) =
        match Manifest::parse(&store.read(&first)?)? {
            Manifest::Image { config, layers } => (None, first, config, layers),
            Manifest::Index(platforms) => {
                let m = manifest::select_linux_amd64(&platforms)
                    .ok_or_else(|| LayoutError::NoImage(name.to_string()))?;
                let md = copy_blob(store, dir, m)?;
                match Manifest::parse(&store.read(&md)?)? {
                    Manifest::Image { config, layers } => (Some(first), md, config, layers),
                    Manifest::Index(_) => return Err(LayoutError::NestedIndex),
                }
            }
        };
    let config_digest = copy_blob(store, dir, &config)?;
    let mut out = Vec::with_capacity(layers.len());
    for l in &layers {
        out.push(Layer {
            digest: copy_blob(store, dir, l)?,
            media_type: l.media_type.clone(),
            size: l.size,
        });
    }
    Ok(PulledImage {
        reference: name.clone(),
        index_digest,
        manifest_digest,
        config_digest,
        layers: out,
        downloaded_bytes: 0,
    })
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// A path from manifest.json, refused unless it stays inside `dir`.
fn archive_path(dir: &Path, rel: &str) -> Result<PathBuf, LayoutError> {
    let p = Path::new(rel);
    let plain = p
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain || rel.is_empty() {
        return Err(LayoutError::BadArchivePath(rel.to_string()));
    }
    Ok(dir.join(p))
}

/// Store a file under its SHA-256 digest (hash pass, then verified copy).
fn store_file(store: &ContentStore, path: &Path) -> Result<(Digest, u64), LayoutError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut hasher = crate::digest::Hasher::new(crate::digest::Algorithm::Sha256);
    let mut buf = vec![0u8; 128 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let digest = hasher.finish();
    let f = File::open(path).map_err(io_err(path))?;
    store.write_from(&digest, f)?;
    Ok((digest, size))
}

/// Import the image `name` from an archive: a `docker save` tarball (manifest.json with
/// RepoTags; the entry whose tag is `name`, else the only one) or a tarred OCI layout; plain or
/// gzip/zstd-compressed. The archive is extracted with the layer unpacker's path checks into a
/// temporary directory next to the store. Blocking.
pub fn import_archive(
    store: &ContentStore,
    archive: impl Read,
    name: &Reference,
) -> Result<PulledImage, LayoutError> {
    let tmp = tempfile::Builder::new()
        .prefix("import-")
        .tempdir_in(store.root())
        .map_err(io_err(store.root()))?;
    let dir = tmp.path();
    let opts = crate::unpack::UnpackOptions {
        preserve_ownership: false,
        create_devices: false,
    };
    crate::unpack::apply_layer(dir, archive, &opts)?;
    if dir.join("oci-layout").exists() {
        return import_oci_layout(store, dir, name);
    }
    let mpath = dir.join("manifest.json");
    let bytes = fs::read(&mpath).map_err(io_err(&mpath))?;
    let entries: Vec<DockerSaveEntry> =
        serde_json::from_slice(&bytes).map_err(LayoutError::DockerManifest)?;
    let wanted = name.to_string();
    let entry = entries
        .iter()
        .find(|e| {
            e.repo_tags
                .iter()
                .flatten()
                .any(|t| Reference::parse(t).is_ok_and(|r| r.to_string() == wanted))
        })
        .or(if entries.len() == 1 {
            entries.first()
        } else {
            None
        })
        .ok_or_else(|| LayoutError::NoImage(wanted.clone()))?;
    let (config_digest, config_size) = store_file(store, &archive_path(dir, &entry.config)?)?;
    let mut layers = Vec::with_capacity(entry.layers.len());
    for l in &entry.layers {
        let (digest, size) = store_file(store, &archive_path(dir, l)?)?;
        layers.push(Layer {
            digest,
            // docker save layers are plain tars (older) or whatever the blob was (newer);
            // an empty media type makes the unpacker go by the magic bytes.
            media_type: String::new(),
            size,
        });
    }
    // A synthesized Docker v2 manifest, so the image has a manifest digest like a pulled one.
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest::DOCKER_MANIFEST,
        "config": { "mediaType": manifest::DOCKER_CONFIG, "digest": config_digest.to_string(), "size": config_size },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar",
            "digest": l.digest.to_string(),
            "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(LayoutError::DockerManifest)?;
    let manifest_digest = store.put(&manifest_bytes)?;
    Ok(PulledImage {
        reference: name.clone(),
        index_digest: None,
        manifest_digest,
        config_digest,
        layers,
        downloaded_bytes: 0,
    })
}
