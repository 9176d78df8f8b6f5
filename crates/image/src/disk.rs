//! ext4 rootfs disks built from an unpacked tree with `mkfs.ext4 -d`, cached by image digest.
//!
//! A disk is built into a temporary file in the cache directory and renamed to
//! `<algorithm>-<hex>.ext4` only when complete, so a present disk is always whole. Builders of the
//! same key are serialised: the second one finds the disk ready.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use crate::digest::Digest;

const MIB: u64 = 1024 * 1024;
const BLOCK: u64 = 4096;
/// Fixed headroom on top of the measured tree.
const HEADROOM_BYTES: u64 = 16 * MIB;
/// Extra inodes on top of the counted ones.
const HEADROOM_INODES: u64 = 1024;

/// Errors from building a rootfs disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A filesystem operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// mkfs.ext4 could not be run.
    #[error("cannot run {program} (is e2fsprogs installed?)")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// mkfs.ext4 failed.
    #[error("mkfs.ext4 failed for {path} with {status}: {stderr}")]
    Mkfs {
        /// The disk being built.
        path: PathBuf,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed.
        stderr: String,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DiskError + 'a {
    move |source| DiskError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Space a tree needs: bytes in 4 KiB blocks, and inode count (hard links counted once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeUsage {
    /// Bytes of data blocks, rounded up per file.
    pub bytes: u64,
    /// Distinct inodes.
    pub inodes: u64,
}

/// Measure `root` without following symlinks.
pub fn tree_usage(root: &Path) -> Result<TreeUsage, DiskError> {
    let mut usage = TreeUsage::default();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        usage.inodes += 1;
        usage.bytes += BLOCK;
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let path = entry.path();
            let m = fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
            if m.is_dir() {
                stack.push(path);
                continue;
            }
            if m.nlink() > 1 && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            usage.inodes += 1;
            usage.bytes += m.len().div_ceil(BLOCK) * BLOCK;
        }
    }
    Ok(usage)
}

/// Disk size for a tree: data plus metadata overhead (~6%, inode tables) plus fixed headroom,
/// rounded up to a MiB.
pub fn disk_size_for(usage: TreeUsage) -> u64 {
    let inode_tables = (usage.inodes + HEADROOM_INODES) * 256;
    let raw = usage.bytes + usage.bytes / 16 + inode_tables + HEADROOM_BYTES;
    raw.div_ceil(MIB) * MIB
}

/// Build an ext4 image of `tree` at `dest` (written to `dest` directly; see [`DiskCache`] for the
/// atomic, cached variant). Returns the disk size in bytes.
pub fn build_ext4(tree: &Path, dest: &Path, label: &str) -> Result<u64, DiskError> {
    let usage = tree_usage(tree)?;
    let mut size = disk_size_for(usage);
    let inodes = usage.inodes + HEADROOM_INODES;
    // The estimate is generous; if mkfs still runs out of space, grow and retry.
    for attempt in 0..3 {
        {
            let f = fs::File::create(dest).map_err(io_err("create", dest))?;
            f.set_len(size).map_err(io_err("size", dest))?;
        }
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-m", "0", "-I", "256"])
            .args(["-O", "^has_journal,^resize_inode"])
            .args(["-E", "root_owner=0:0,lazy_itable_init=0"])
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-L")
            .arg(label)
            .arg("-d")
            .arg(tree)
            .arg(dest)
            .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
            .output()
            .map_err(|source| DiskError::Spawn {
                program: "mkfs.ext4".into(),
                source,
            })?;
        if out.status.success() {
            return Ok(size);
        }
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let no_space = stderr.contains("No space left") || stderr.contains("Could not allocate");
        if !no_space || attempt == 2 {
            let _ = fs::remove_file(dest);
            return Err(DiskError::Mkfs {
                path: dest.to_path_buf(),
                status: out.status,
                stderr,
            });
        }
        log::info!(
            "mkfs.ext4 out of space at {size} bytes for {}, growing",
            tree.display()
        );
        size *= 2;
    }
    unreachable!("the loop returns on its last attempt")
}

/// A built disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Where the ext4 image is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Whether it was already in the cache.
    pub cached: bool,
}

/// Directory of ext4 disks keyed by digest.
#[derive(Clone)]
pub struct DiskCache {
    dir: PathBuf,
    locks: Arc<Mutex<HashMap<Digest, Arc<Mutex<()>>>>>,
}

impl DiskCache {
    /// Open (creating) the cache directory; removes temporary files left by a crash.
    pub fn open(dir: impl Into<PathBuf>) -> Result<DiskCache, DiskError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            if entry.file_name().to_string_lossy().starts_with(".tmp") {
                let p = entry.path();
                fs::remove_file(&p).map_err(io_err("remove", &p))?;
            }
        }
        Ok(DiskCache {
            dir,
            locks: Arc::default(),
        })
    }

    /// Open (creating) a cache directory that several processes use at once (one
    /// containerd shim per pod): another process's build in progress is left alone, so only
    /// temporary files and trees older than `stale_after` (left by a crash) are removed, and
    /// failing to remove one is not an error. Builds of one key in two processes both run;
    /// the rename makes the last one win, whole.
    pub fn open_shared(
        dir: impl Into<PathBuf>,
        stale_after: std::time::Duration,
    ) -> Result<DiskCache, DiskError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let Ok(entry) = entry else { continue };
            if !entry.file_name().to_string_lossy().starts_with(".tmp") {
                continue;
            }
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > stale_after);
            if stale {
                let p = entry.path();
                let removed = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
                if let Err(e) = removed {
                    log::warn!("removing stale {}: {e}", p.display());
                }
            }
        }
        Ok(DiskCache {
            dir,
            locks: Arc::default(),
        })
    }

    /// Where the disk for `key` lives.
    pub fn path_for(&self, key: &Digest) -> PathBuf {
        self.dir
            .join(format!("{}-{}.ext4", key.algorithm().name(), key.hex()))
    }

    /// The disk for `key`, if built.
    pub fn get(&self, key: &Digest) -> Option<Disk> {
        let path = self.path_for(key);
        let m = fs::metadata(&path).ok()?;
        Some(Disk {
            path,
            size: m.len(),
            cached: true,
        })
    }

    /// The disk for `key`, building it from the tree that `prepare` fills if absent. `prepare`
    /// gets an empty directory and runs only when the disk must be built.
    pub fn get_or_build<E>(
        &self,
        key: &Digest,
        prepare: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<Disk, E>
    where
        E: From<DiskError>,
    {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(key.clone()).or_default().clone()
        };
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(disk) = self.get(key) {
            return Ok(disk);
        }
        let tree = tempfile::Builder::new()
            .prefix(".tmp-tree-")
            .tempdir_in(&self.dir)
            .map_err(|e| io_err("create temp dir in", &self.dir)(e))?;
        prepare(tree.path())?;
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-disk-")
            .tempfile_in(&self.dir)
            .map_err(|e| io_err("create temp file in", &self.dir)(e))?;
        let size = build_ext4(tree.path(), tmp.path(), "rootfs")?;
        tmp.as_file()
            .sync_all()
            .map_err(|e| io_err("sync", tmp.path())(e))?;
        let path = self.path_for(key);
        tmp.persist(&path)
            .map_err(|e| io_err("rename into place", &path)(e.error))?;
        Ok(Disk {
            path,
            size,
            cached: false,
        })
    }

    /// All disks present, by key.
    pub fn list(&self) -> Result<Vec<(Digest, Disk)>, DiskError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))? {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".ext4") else {
                continue;
            };
            let Some((alg, hex)) = stem.split_once('-') else {
                continue;
            };
            let Ok(key) = format!("{alg}:{hex}").parse::<Digest>() else {
                continue;
            };
            if let Some(disk) = self.get(&key) {
                out.push((key, disk));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Remove the disk for `key` (absent is fine).
    pub fn remove(&self, key: &Digest) -> Result<(), DiskError> {
        let path = self.path_for(key);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &path)(e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unpack::tests::LayerBuilder;
    use crate::unpack::{apply_layer, UnpackError, UnpackOptions};

    #[derive(Debug, thiserror::Error)]
    enum TestError {
        #[error(transparent)]
        Disk(#[from] DiskError),
        #[error(transparent)]
        Unpack(#[from] UnpackError),
    }

    fn debugfs(img: &Path, req: &str) -> String {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(req)
            .arg(img)
            .output()
            .expect("debugfs (e2fsprogs) must be installed");
        assert!(out.status.success(), "debugfs {req}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn stat_field<'a>(stat: &'a str, field: &str) -> &'a str {
        let i = stat
            .find(field)
            .unwrap_or_else(|| panic!("{field} in {stat}"))
            + field.len();
        stat[i..].split_whitespace().next().unwrap()
    }

    #[test]
    fn disk_has_tree_owners_modes_and_is_cached() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path()).unwrap();
        let key = Digest::sha256(b"image config");
        let big: Vec<u8> = (0..3 * MIB as u32).map(|i| (i * 7 % 256) as u8).collect();
        let layer = LayerBuilder::new()
            .dir("bin", 0o755)
            .file("bin/busybox", &big, 0o4755)
            .hardlink("bin/sh", "bin/busybox")
            .symlink("bin/ls", "busybox")
            .dir("etc", 0o700)
            .owned_file("etc/shadow", b"root:*:", 42, 43)
            .dir("tmp", 0o1777)
            .tar();
        let disk = cache
            .get_or_build(&key, |tree| {
                apply_layer(tree, &layer[..], &UnpackOptions::default())?;
                Ok::<_, TestError>(())
            })
            .unwrap();
        assert!(!disk.cached);
        assert_eq!(disk.path, cache.path_for(&key));
        assert_eq!(fs::metadata(&disk.path).unwrap().len(), disk.size);
        assert!(disk.size >= 3 * MIB + HEADROOM_BYTES);
        assert!(disk.size < 64 * MIB, "sized to fit: {}", disk.size);
        // No temporary trees or disks left.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![format!("sha256-{}.ext4", key.hex())]);

        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(&disk.path)
            .output()
            .unwrap();
        assert!(fsck.status.success(), "e2fsck: {fsck:?}");

        let ls = debugfs(&disk.path, "ls -l /bin");
        assert!(
            ls.contains("busybox") && ls.contains(" sh") && ls.contains(" ls"),
            "{ls}"
        );
        let bb = debugfs(&disk.path, "stat /bin/busybox");
        assert_eq!(stat_field(&bb, "Mode:"), "04755");
        assert_eq!(stat_field(&bb, "Links:"), "2");
        assert_eq!(stat_field(&bb, "Size:"), (3 * MIB).to_string());
        let sh = debugfs(&disk.path, "stat /bin/sh");
        assert_eq!(stat_field(&sh, "Inode:"), stat_field(&bb, "Inode:"));
        let content = Command::new("debugfs")
            .arg("-R")
            .arg("cat /bin/busybox")
            .arg(&disk.path)
            .output()
            .unwrap()
            .stdout;
        assert!(content == big, "file content survives");
        let ls_link = debugfs(&disk.path, "stat /bin/ls");
        assert!(ls_link.contains("Fast link dest: \"busybox\""), "{ls_link}");
        let etc = debugfs(&disk.path, "stat /etc");
        assert_eq!(stat_field(&etc, "Mode:"), "0700");
        let tmp = debugfs(&disk.path, "stat /tmp");
        assert_eq!(stat_field(&tmp, "Mode:"), "01777");
        if nix::unistd::geteuid().is_root() {
            let shadow = debugfs(&disk.path, "stat /etc/shadow");
            assert_eq!(stat_field(&shadow, "User:"), "42");
            assert_eq!(stat_field(&shadow, "Group:"), "43");
            assert_eq!(stat_field(&shadow, "Mode:"), "0640");
        }

        // Second call: cached, prepare does not run.
        let again = cache
            .get_or_build(&key, |_| -> Result<(), TestError> {
                panic!("must not rebuild a cached disk")
            })
            .unwrap();
        assert!(again.cached);
        assert_eq!(again.path, disk.path);
        cache.remove(&key).unwrap();
        assert!(cache.get(&key).is_none());
    }

    #[test]
    fn failed_prepare_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path()).unwrap();
        let key = Digest::sha256(b"bad image");
        let layer = LayerBuilder::new().file("../evil", b"x", 0o644).tar();
        let err = cache
            .get_or_build(&key, |tree| {
                apply_layer(tree, &layer[..], &UnpackOptions::default())?;
                Ok::<_, TestError>(())
            })
            .unwrap_err();
        assert!(matches!(err, TestError::Unpack(UnpackError::DotDot(_))));
        assert!(cache.get(&key).is_none());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn shared_open_removes_only_stale_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let names = |d: &Path| {
            let mut v: Vec<String> = fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        // Another process's build in progress, and a finished disk.
        fs::create_dir(dir.path().join(".tmp-tree-a")).unwrap();
        fs::write(dir.path().join(".tmp-tree-a/f"), b"x").unwrap();
        fs::write(dir.path().join(".tmp-disk-a"), b"x").unwrap();
        fs::write(dir.path().join("sha256-00.ext4"), b"x").unwrap();
        let all = names(dir.path());
        DiskCache::open_shared(dir.path(), std::time::Duration::from_secs(3600)).unwrap();
        assert_eq!(names(dir.path()), all, "fresh builds are left alone");
        std::thread::sleep(std::time::Duration::from_millis(20));
        DiskCache::open_shared(dir.path(), std::time::Duration::from_millis(10)).unwrap();
        assert_eq!(names(dir.path()), vec!["sha256-00.ext4".to_string()]);
    }

    #[test]
    fn size_estimate_grows_with_content() {
        let small = disk_size_for(TreeUsage {
            bytes: 0,
            inodes: 1,
        });
        let big = disk_size_for(TreeUsage {
            bytes: 100 * MIB,
            inodes: 5000,
        });
        assert_eq!(small % MIB, 0);
        assert!(big >= 100 * MIB + HEADROOM_BYTES);
        assert!(big < 130 * MIB);
    }
}
