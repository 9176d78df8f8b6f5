//! Image records with CRI semantics on top of the content store, puller and disk cache.
//!
//! Layout under the root: `content/` (blobs), `disks/` (ext4 rootfs disks by image id) and
//! `images.json` (the records, replaced atomically on every change).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::config::ImageConfig;
use crate::digest::Digest;
use crate::disk::{Disk, DiskCache, DiskError};
use crate::pull::{Auth, Layer, PullConfig, PullError, PulledImage, Puller};
use crate::reference::{Reference, ReferenceError};
use crate::rootfs::{self, RootfsError};
use crate::store::{ContentStore, StoreError};

/// Errors from the image store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image reference is invalid.
    #[error("invalid image reference")]
    Reference(#[from] ReferenceError),
    /// The pull failed.
    #[error("pull failed")]
    Pull(#[from] PullError),
    /// Blob access failed.
    #[error("content store failure")]
    Store(#[from] StoreError),
    /// Building the rootfs failed.
    #[error("rootfs failure")]
    Rootfs(#[from] RootfsError),
    /// Disk cache failure.
    #[error("disk cache failure")]
    Disk(#[from] DiskError),
    /// The image config could not be parsed.
    #[error("image config {digest} is malformed")]
    Config {
        /// The config blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The records file could not be read or written.
    #[error("image records at {path}")]
    Records {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The records file is corrupt.
    #[error("image records at {path} are malformed")]
    RecordsJson {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Importing an OCI layout failed.
    #[error("importing OCI layout failed")]
    Layout(#[from] crate::layout::LayoutError),
    /// The archive file could not be opened.
    #[error("cannot open image archive {path}")]
    Archive {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The image is used by a live container.
    #[error("image {0} is in use by a container")]
    InUse(Digest),
}

/// One image as CRI sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Image id: the config digest.
    pub id: Digest,
    /// `registry/repository:tag` names.
    pub repo_tags: Vec<String>,
    /// `registry/repository@digest` names.
    pub repo_digests: Vec<String>,
    /// The platform manifest.
    pub manifest_digest: Digest,
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    /// Size: compressed layers plus config.
    pub size: u64,
    /// Runtime config.
    pub config: ImageConfig,
}

/// What [`ImageStore::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Blobs removed.
    pub blobs: usize,
    /// Disks removed.
    pub disks: usize,
    /// Bytes freed.
    pub bytes: u64,
}

/// The image store.
pub struct ImageStore {
    content: ContentStore,
    disks: DiskCache,
    puller: Puller,
    records_path: PathBuf,
    records: Mutex<BTreeMap<Digest, ImageRecord>>,
    /// Pulls and imports hold it shared from their first blob until their record is saved; GC
    /// holds it exclusively, so it never collects the blobs of an image not yet recorded.
    leases: tokio::sync::RwLock<()>,
}

impl ImageStore {
    /// Open (creating) an image store at `root`.
    pub fn open(root: impl AsRef<Path>, config: &PullConfig) -> Result<ImageStore, ImageError> {
        let root = root.as_ref();
        let content = ContentStore::open(root.join("content"))?;
        let disks = DiskCache::open(root.join("disks"))?;
        let records_path = root.join("images.json");
        let records = match fs::read(&records_path) {
            Ok(bytes) => {
                let list: Vec<ImageRecord> =
                    serde_json::from_slice(&bytes).map_err(|source| ImageError::RecordsJson {
                        path: records_path.clone(),
                        source,
                    })?;
                list.into_iter().map(|r| (r.id.clone(), r)).collect()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(ImageError::Records {
                    path: records_path,
                    source,
                })
            }
        };
        Ok(ImageStore {
            puller: Puller::new(content.clone(), config),
            content,
            disks,
            records_path,
            records: Mutex::new(records),
            leases: tokio::sync::RwLock::new(()),
        })
    }

    /// The content store.
    pub fn content(&self) -> &ContentStore {
        &self.content
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Digest, ImageRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, records: &BTreeMap<Digest, ImageRecord>) -> Result<(), ImageError> {
        let path = &self.records_path;
        let err = |source| ImageError::Records {
            path: path.clone(),
            source,
        };
        let list: Vec<&ImageRecord> = records.values().collect();
        let json = serde_json::to_vec_pretty(&list).map_err(|source| ImageError::RecordsJson {
            path: path.clone(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
        tmp.write_all(&json).map_err(err)?;
        tmp.as_file().sync_all().map_err(err)?;
        tmp.persist(path).map_err(|e| err(e.error))?;
        Ok(())
    }

    /// Pull `image` and record it. Returns the record (the image id is `record.id`).
    pub async fn pull(&self, image: &str, auth: &Auth) -> Result<ImageRecord, ImageError> {
        self.pull_with_progress(image, auth, None).await
    }

    /// [`ImageStore::pull`], publishing bytes and blobs done on `progress`.
    pub async fn pull_with_progress(
        &self,
        image: &str,
        auth: &Auth,
        progress: Option<&tokio::sync::watch::Sender<crate::pull::PullProgress>>,
    ) -> Result<ImageRecord, ImageError> {
        let reference = Reference::parse(image)?;
        let _lease = self.leases.read().await;
        let pulled = self
            .puller
            .pull_with_progress(&reference, auth, progress)
            .await?;
        let content = self.content.clone();
        let config_digest = pulled.config_digest.clone();
        let (config_bytes, config_size) = tokio::task::spawn_blocking(move || {
            let bytes = content.read(&config_digest)?;
            let size = bytes.len() as u64;
            Ok::<_, StoreError>((bytes, size))
        })
        .await
        .map_err(PullError::from)??;
        self.record(&pulled, &config_bytes, config_size)
    }

    fn record(
        &self,
        pulled: &PulledImage,
        config_bytes: &[u8],
        config_size: u64,
    ) -> Result<ImageRecord, ImageError> {
        let config = ImageConfig::parse(config_bytes).map_err(|source| ImageError::Config {
            digest: pulled.config_digest.clone(),
            source,
        })?;
        let reference = &pulled.reference;
        let tag = reference.tag().map(|t| format!("{}:{t}", reference.name()));
        let repo_digest = format!("{}@{}", reference.name(), pulled.repo_digest());
        let mut records = self.lock();
        // A tag names one image: move it.
        if let Some(tag) = &tag {
            for r in records.values_mut() {
                r.repo_tags.retain(|t| t != tag);
            }
        }
        let record = records
            .entry(pulled.config_digest.clone())
            .or_insert_with(|| ImageRecord {
                id: pulled.config_digest.clone(),
                repo_tags: Vec::new(),
                repo_digests: Vec::new(),
                manifest_digest: pulled.manifest_digest.clone(),
                layers: pulled.layers.clone(),
                size: pulled.size() + config_size,
                config,
            });
        if let Some(tag) = tag {
            record.repo_tags.push(tag);
        }
        if !record.repo_digests.contains(&repo_digest) {
            record.repo_digests.push(repo_digest);
        }
        let out = record.clone();
        records.retain(|_, r| !r.repo_tags.is_empty() || !r.repo_digests.is_empty());
        self.save(&records)?;
        Ok(out)
    }

    /// Import the image `name` (e.g. `hypernetes/demo:latest`) from an OCI layout directory,
    /// without network, and record it under that name.
    pub async fn import_oci_layout(
        &self,
        dir: &Path,
        name: &str,
    ) -> Result<ImageRecord, ImageError> {
        let reference = Reference::parse(name)?;
        let _lease = self.leases.read().await;
        let content = self.content.clone();
        let dir = dir.to_path_buf();
        let (pulled, config_bytes) = tokio::task::spawn_blocking(move || {
            let pulled = crate::layout::import_oci_layout(&content, &dir, &reference)?;
            let config = content.read(&pulled.config_digest)?;
            Ok::<_, ImageError>((pulled, config))
        })
        .await
        .map_err(PullError::from)??;
        let size = config_bytes.len() as u64;
        self.record(&pulled, &config_bytes, size)
    }

    /// Import the image `name` from a `docker save` or tarred OCI layout archive file (plain,
    /// gzip or zstd), without network, and record it under that name.
    pub async fn import_archive(&self, file: &Path, name: &str) -> Result<ImageRecord, ImageError> {
        let reference = Reference::parse(name)?;
        let _lease = self.leases.read().await;
        let content = self.content.clone();
        let file = file.to_path_buf();
        let (pulled, config_bytes) = tokio::task::spawn_blocking(move || {
            let f = fs::File::open(&file).map_err(|source| ImageError::Archive {
                path: file.clone(),
                source,
            })?;
            let pulled = crate::layout::import_archive(&content, f, &reference)?;
            let config = content.read(&pulled.config_digest)?;
            Ok::<_, ImageError>((pulled, config))
        })
        .await
        .map_err(PullError::from)??;
        let size = config_bytes.len() as u64;
        self.record(&pulled, &config_bytes, size)
    }

    /// Find an image by id (`sha256:...`, or its hex), `name:tag`, `name@digest` or a short name
    /// (`busybox`). Not found is `None` (CRI ImageStatus semantics).
    pub fn status(&self, image: &str) -> Option<ImageRecord> {
        let records = self.lock();
        find(&records, image).cloned()
    }

    /// All images, or those matching `filter` (same forms as [`ImageStore::status`]).
    pub fn list(&self, filter: Option<&str>) -> Vec<ImageRecord> {
        let records = self.lock();
        match filter {
            None | Some("") => records.values().cloned().collect(),
            Some(f) => find(&records, f).cloned().into_iter().collect(),
        }
    }

    /// Remove an image (all its names). Absent is not an error; an image `in_use` reports is
    /// refused. The blobs and disk stay until [`ImageStore::gc`].
    pub fn remove(&self, image: &str, in_use: impl Fn(&Digest) -> bool) -> Result<(), ImageError> {
        let mut records = self.lock();
        let Some(id) = find(&records, image).map(|r| r.id.clone()) else {
            return Ok(());
        };
        if in_use(&id) {
            return Err(ImageError::InUse(id));
        }
        records.remove(&id);
        self.save(&records)
    }

    /// The read-only rootfs disk of image `id`, built on first use.
    pub fn rootfs(&self, id: &Digest) -> Result<Disk, ImageError> {
        let record = {
            let records = self.lock();
            records.get(id).cloned()
        };
        let Some(record) = record else {
            return Err(StoreError::NotFound(id.clone()).into());
        };
        Ok(self.disks.get_or_build(id, |tree| {
            rootfs::unpack_layers(
                &self.content,
                &record.layers,
                tree,
                &crate::unpack::UnpackOptions::default(),
            )
        })?)
    }

    /// Remove blobs and disks no image references. Waits for running pulls and imports to
    /// record their images first.
    pub async fn gc(&self) -> Result<GcStats, ImageError> {
        let _exclusive = self.leases.write().await;
        let records = self.lock();
        let mut keep = std::collections::HashSet::new();
        for r in records.values() {
            keep.insert(r.id.clone());
            keep.insert(r.manifest_digest.clone());
            for l in &r.layers {
                keep.insert(l.digest.clone());
            }
            for d in &r.repo_digests {
                if let Some(Ok(d)) = d.rsplit_once('@').map(|(_, d)| d.parse::<Digest>()) {
                    keep.insert(d);
                }
            }
        }
        let mut stats = GcStats::default();
        for d in self.content.list()? {
            if !keep.contains(&d) {
                stats.bytes += self.content.size(&d).unwrap_or(0);
                self.content.remove(&d)?;
                stats.blobs += 1;
            }
        }
        for (key, disk) in self.disks.list()? {
            if !records.contains_key(&key) {
                stats.bytes += disk.size;
                self.disks.remove(&key)?;
                stats.disks += 1;
            }
        }
        Ok(stats)
    }

    /// Bytes and inodes used by blobs and disks (CRI ImageFsInfo).
    pub fn fs_usage(&self) -> Result<(u64, u64), ImageError> {
        let mut bytes = 0;
        let mut inodes = 0;
        for d in self.content.list()? {
            bytes += self.content.size(&d)?;
            inodes += 1;
        }
        for (_, disk) in self.disks.list()? {
            bytes += disk.size;
            inodes += 1;
        }
        Ok((bytes, inodes))
    }
}

fn find<'a>(records: &'a BTreeMap<Digest, ImageRecord>, image: &str) -> Option<&'a ImageRecord> {
    // An id, with or without the algorithm.
    let as_id = if image.contains(':') {
        image.to_string()
    } else {
        format!("sha256:{image}")
    };
    if let Ok(d) = as_id.parse::<Digest>() {
        if let Some(r) = records.get(&d) {
            return Some(r);
        }
    }
    let reference = Reference::parse(image).ok()?;
    let wanted = reference.to_string();
    records.values().find(|r| {
        if reference.digest().is_some() {
            let by_digest = format!(
                "{}@{}",
                reference.name(),
                reference
                    .digest()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
            r.repo_digests.contains(&by_digest)
        } else {
            r.repo_tags.contains(&wanted)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn gc_waits_for_running_pulls_and_removes_unreferenced_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            std::sync::Arc::new(ImageStore::open(dir.path(), &PullConfig::default()).unwrap());
        let orphan = store
            .content()
            .put(b"blob of a pull still running")
            .unwrap();
        let lease = store.leases.read().await;
        let s2 = store.clone();
        let gc = tokio::spawn(async move { s2.gc().await.unwrap() });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!gc.is_finished(), "gc must wait for the running pull");
        assert!(store.content().contains(&orphan));
        drop(lease);
        let stats = gc.await.unwrap();
        assert_eq!(stats.blobs, 1);
        assert_eq!(stats.bytes, 28);
        assert!(!store.content().contains(&orphan));
    }

    #[test]
    fn status_of_unknown_image_is_none_and_remove_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path(), &PullConfig::default()).unwrap();
        assert!(store.status("busybox").is_none());
        assert!(store.status("sha256:0000").is_none());
        assert!(store.list(None).is_empty());
        store.remove("busybox", |_| true).unwrap();
        assert!(matches!(
            store.rootfs(&Digest::sha256(b"x")),
            Err(ImageError::Store(StoreError::NotFound(_)))
        ));
    }

    #[test]
    fn corrupt_records_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("images.json"), b"{not json").unwrap();
        assert!(matches!(
            ImageStore::open(dir.path(), &PullConfig::default()),
            Err(ImageError::RecordsJson { .. })
        ));
    }
}
