//! containerd's rootfs mounts to a cached read-only ext4 disk.
//!
//! The overlay snapshotter hands the shim `overlay` mounts: `lowerdir=` lists the committed
//! image layers (top first), `upperdir`/`workdir` the container's writable snapshot. The lower
//! directories become one ext4 disk (their merged view, whiteouts applied by a read-only
//! overlay mount on the host), cached under the chain of lower directories; the writable layer
//! lives in the guest (the agent's overlay on a tmpfs), so `upperdir` stays unused.

use std::path::{Path, PathBuf};
use std::process::Command;

use containerd_shim_protos::types::mount::Mount;
use image::digest::Digest;
use image::disk::{Disk, DiskCache, DiskError};

use crate::error::ShimError;

/// The read-only directories a container's rootfs is made of, top first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layers {
    /// Lower directories, top first (overlayfs order).
    pub lower: Vec<PathBuf>,
}

impl Layers {
    /// The cache key: the chain of lower directories (snapshot ids change with the parents).
    pub fn key(&self) -> Digest {
        let mut chain = String::new();
        for l in &self.lower {
            chain.push_str(&l.to_string_lossy());
            chain.push('\n');
        }
        Digest::sha256(chain.as_bytes())
    }
}

/// Parses the mounts containerd passes in `CreateTaskRequest.rootfs`.
pub fn parse_mounts(mounts: &[Mount]) -> Result<Layers, ShimError> {
    let [m] = mounts else {
        return Err(ShimError::InvalidArgument(format!(
            "expected one rootfs mount, got {} (snapshotter overlayfs or native)",
            mounts.len()
        )));
    };
    match m.type_.as_str() {
        "overlay" => {
            let lower: Vec<PathBuf> = m
                .options
                .iter()
                .filter_map(|o| o.strip_prefix("lowerdir="))
                .flat_map(|l| l.split(':'))
                .filter(|l| !l.is_empty())
                .map(PathBuf::from)
                .collect();
            if lower.is_empty() {
                return Err(ShimError::InvalidArgument(
                    "overlay rootfs mount without lowerdir".into(),
                ));
            }
            Ok(Layers { lower })
        }
        "bind" | "none" if !m.source.is_empty() => Ok(Layers {
            lower: vec![PathBuf::from(&m.source)],
        }),
        other => Err(ShimError::InvalidArgument(format!(
            "rootfs mount type {other:?} is not supported"
        ))),
    }
}

impl From<DiskError> for ShimError {
    fn from(e: DiskError) -> Self {
        ShimError::Rootfs(sandbox::error_chain(&e))
    }
}

/// The disk for `layers`, built on first use.
pub fn disk_for(cache: &DiskCache, layers: &Layers) -> Result<Disk, ShimError> {
    for l in &layers.lower {
        if !l.is_absolute() || !l.is_dir() {
            return Err(ShimError::InvalidArgument(format!(
                "rootfs layer {} is not a directory",
                l.display()
            )));
        }
    }
    let disk = cache.get_or_build(&layers.key(), |tree| fill(tree, &layers.lower))?;
    // What the disk was made from, for the garbage collection (also for disks built before
    // these records existed).
    let record = layers_record(&disk.path);
    if !record.exists() {
        if let Err(e) = write_layers_record(&record, layers) {
            log::warn!("recording the layers of {}: {e}", disk.path.display());
        }
    }
    Ok(disk)
}

/// The file beside a disk that lists the layer directories it was built from.
fn layers_record(disk: &Path) -> PathBuf {
    disk.with_extension("layers")
}

fn write_layers_record(record: &Path, layers: &Layers) -> std::io::Result<()> {
    let mut text = String::new();
    for l in &layers.lower {
        text.push_str(&l.to_string_lossy());
        text.push('\n');
    }
    let dir = record.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-layers-")
        .tempfile_in(dir)?;
    std::fs::write(tmp.path(), text)?;
    tmp.persist(record).map_err(|e| e.error)?;
    Ok(())
}

/// Removes the cached disks whose layers containerd has deleted (their image and every
/// container of it are gone, so no new container can ask for them; a VM still running on
/// one keeps its open file). Disks without a layers record are kept. Returns what was
/// removed.
pub fn collect_garbage(cache: &DiskCache) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(disks) = cache.list() else {
        return removed;
    };
    for (key, disk) in disks {
        let record = layers_record(&disk.path);
        let Ok(text) = std::fs::read_to_string(&record) else {
            continue;
        };
        let lower: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        if lower.is_empty() || lower.iter().all(|l| Path::new(l).is_dir()) {
            continue;
        }
        match cache.remove(&key) {
            Ok(()) => {
                let _ = std::fs::remove_file(&record);
                log::info!(
                    "removed cached disk {}: its layers are gone",
                    disk.path.display()
                );
                removed.push(disk.path);
            }
            Err(e) => log::warn!("removing {}: {e}", disk.path.display()),
        }
    }
    removed
}

/// Copies the merged view of `lower` into `tree`.
fn fill(tree: &Path, lower: &[PathBuf]) -> Result<(), ShimError> {
    if let [single] = lower {
        return copy_tree(single, tree);
    }
    let view = tempfile::Builder::new()
        .prefix(".tmp-view-")
        .tempdir()
        .map_err(|e| ShimError::Io {
            what: "creating a mount point",
            path: std::env::temp_dir(),
            source: e,
        })?;
    let joined: Vec<String> = lower
        .iter()
        .map(|l| l.to_string_lossy().into_owned())
        .collect();
    let data = format!("lowerdir={}", joined.join(":"));
    nix::mount::mount(
        Some("overlay"),
        view.path(),
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(data.as_str()),
    )
    .map_err(|e| ShimError::Rootfs(format!("mounting the layers' overlay: {e}")))?;
    let copied = copy_tree(view.path(), tree);
    if let Err(e) = nix::mount::umount2(view.path(), nix::mount::MntFlags::MNT_DETACH) {
        log::warn!("unmounting {}: {e}", view.path().display());
    }
    copied
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), ShimError> {
    let out = Command::new("cp")
        .arg("-a")
        .arg(from.join("."))
        .arg(to)
        .output()
        .map_err(|e| ShimError::Io {
            what: "running cp for",
            path: from.to_path_buf(),
            source: e,
        })?;
    if !out.status.success() {
        return Err(ShimError::Rootfs(format!(
            "cp -a {}: {}",
            from.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(opts: &[&str]) -> Mount {
        Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: opts.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn lowerdirs_in_order_and_keyed_by_chain() {
        let l = parse_mounts(&[overlay(&[
            "index=off",
            "workdir=/s/3/work",
            "upperdir=/s/3/fs",
            "lowerdir=/s/2/fs:/s/1/fs",
        ])])
        .unwrap();
        assert_eq!(
            l.lower,
            vec![PathBuf::from("/s/2/fs"), PathBuf::from("/s/1/fs")]
        );
        let other = Layers {
            lower: vec![PathBuf::from("/s/1/fs")],
        };
        assert_ne!(l.key(), other.key());
        assert_eq!(l.key(), l.clone().key());
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        assert!(parse_mounts(&[]).is_err());
        assert!(parse_mounts(&[overlay(&["upperdir=/u"])]).is_err());
        let tmpfs = Mount {
            type_: "tmpfs".into(),
            ..Default::default()
        };
        assert!(parse_mounts(&[tmpfs]).is_err());
    }

    #[test]
    fn merges_layers_with_whiteouts() {
        // Needs root (mknod, mount) and overlayfs; skipped where they are missing.
        if !nix::unistd::Uid::effective().is_root() {
            return;
        }
        let bottom = tempfile::tempdir().unwrap();
        let top = tempfile::tempdir().unwrap();
        std::fs::write(bottom.path().join("kept"), b"bottom").unwrap();
        std::fs::write(bottom.path().join("gone"), b"bottom").unwrap();
        std::fs::write(bottom.path().join("changed"), b"bottom").unwrap();
        std::fs::write(top.path().join("changed"), b"top").unwrap();
        // An overlayfs whiteout: a 0:0 character device.
        nix::sys::stat::mknod(
            &top.path().join("gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        )
        .unwrap();
        let tree = tempfile::tempdir().unwrap();
        match fill(
            tree.path(),
            &[top.path().to_path_buf(), bottom.path().to_path_buf()],
        ) {
            Err(ShimError::Rootfs(m)) if m.contains("mounting") => return,
            r => r.unwrap(),
        }
        let read = |n: &str| std::fs::read(tree.path().join(n)).ok();
        assert_eq!(read("kept").as_deref(), Some(&b"bottom"[..]));
        assert_eq!(read("changed").as_deref(), Some(&b"top"[..]));
        assert!(!tree.path().join("gone").exists(), "the whiteout hides it");
    }

    #[test]
    fn builds_a_cached_disk_from_one_layer() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            return;
        }
        let layer = tempfile::tempdir().unwrap();
        std::fs::create_dir(layer.path().join("bin")).unwrap();
        std::fs::write(layer.path().join("bin/x"), b"hi").unwrap();
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(cache_dir.path()).unwrap();
        let layers = Layers {
            lower: vec![layer.path().to_path_buf()],
        };
        let d = disk_for(&cache, &layers).unwrap();
        assert!(!d.cached && d.path.is_file());
        assert!(disk_for(&cache, &layers).unwrap().cached);
        assert_eq!(
            std::fs::read_to_string(layers_record(&d.path)).unwrap(),
            format!("{}\n", layer.path().display())
        );
    }

    #[test]
    fn garbage_collection_removes_only_disks_whose_layers_are_gone() {
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(cache_dir.path()).unwrap();
        let kept_layer = tempfile::tempdir().unwrap();
        let gone_layer = tempfile::tempdir().unwrap();
        // Plain files stand in for disks: collection looks only at the records.
        let disk = |lower: Vec<PathBuf>, record: bool| {
            let layers = Layers { lower };
            let path = cache.path_for(&layers.key());
            std::fs::write(&path, b"disk").unwrap();
            if record {
                write_layers_record(&layers_record(&path), &layers).unwrap();
            }
            path
        };
        let kept = disk(vec![kept_layer.path().to_path_buf()], true);
        let mixed = disk(
            vec![
                kept_layer.path().to_path_buf(),
                gone_layer.path().to_path_buf(),
            ],
            true,
        );
        let gone = disk(vec![gone_layer.path().join("sub")], true);
        let unknown = disk(vec![PathBuf::from("/nonexistent/layer")], false);
        let gone_path = gone_layer.path().to_path_buf();
        drop(gone_layer);
        assert!(!gone_path.exists());
        let mut removed = collect_garbage(&cache);
        removed.sort();
        let mut want = vec![mixed.clone(), gone.clone()];
        want.sort();
        assert_eq!(removed, want);
        assert!(kept.is_file() && layers_record(&kept).is_file());
        assert!(!mixed.exists() && !layers_record(&mixed).exists());
        assert!(!gone.exists() && !layers_record(&gone).exists());
        assert!(unknown.is_file(), "a disk without a record is kept");
        assert!(collect_garbage(&cache).is_empty());
    }
}
