//! Host files a container mounts (CRI mounts: /etc/hosts, secrets, config maps), read with
//! size limits and planned as `CopyFile` calls under a store directory private to the
//! container (`c/<container id>/...`).
//!
//! The guest gets a copy taken at container creation: later host changes (a rotated service
//! account token, an updated config map) are not seen, and writes in the guest do not reach
//! the host. Shared, live volumes need virtio-fs (a later step). An empty directory becomes a
//! tmpfs in the container.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path};

use crate::error::{Result, SandboxError};
use crate::spec::FileToCopy;

/// Largest single file copied into the guest.
pub const MAX_FILE_SIZE: u64 = protocol::MAX_COPY_FILE_SIZE;
/// Largest total of the files copied for one container.
pub const MAX_CONTAINER_FILES_SIZE: u64 = 64 << 20;
/// Most files copied for one container.
pub const MAX_FILES: usize = 4096;
/// Deepest directory level walked.
const MAX_DEPTH: usize = 16;

/// One file to write with `CopyFile`.
#[derive(Debug, PartialEq, Eq)]
pub struct PlannedFile {
    /// Path relative to the agent's file store.
    pub store_path: String,
    /// Content.
    pub data: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// One mount of a copied file or directory.
#[derive(Debug, PartialEq, Eq)]
pub struct PlannedMount {
    /// Store-relative path of the file or directory; `None`: an empty directory (tmpfs).
    pub store_path: Option<String>,
    /// The mount point.
    pub container_path: String,
    /// Read-only.
    pub read_only: bool,
    /// The host file or directory it is a copy of.
    pub host_path: String,
}

/// Everything to copy for one container.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Files, in order.
    pub files: Vec<PlannedFile>,
    /// Mounts, in the order given.
    pub mounts: Vec<PlannedMount>,
}

fn invalid(msg: String) -> SandboxError {
    SandboxError::InvalidArgument(msg)
}

/// A relative path without `..`, `.`-only or empty components, normalised.
fn clean_relative(p: &str) -> Result<String> {
    let path = Path::new(p);
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => parts.push(
                n.to_str()
                    .ok_or_else(|| invalid(format!("path {p:?} is not UTF-8")))?,
            ),
            Component::CurDir => {}
            _ => {
                return Err(invalid(format!(
                    "guest path {p:?} must be relative without '..'"
                )))
            }
        }
    }
    if parts.is_empty() || p.contains('\0') {
        return Err(invalid(format!("guest path {p:?} is empty or invalid")));
    }
    Ok(parts.join("/"))
}

struct Budget {
    container: String,
    total: u64,
    count: usize,
}

impl Budget {
    fn take(&mut self, path: &Path, size: u64) -> Result<()> {
        if size > MAX_FILE_SIZE {
            return Err(SandboxError::FileTooLarge {
                path: path.to_path_buf(),
                size,
                limit: MAX_FILE_SIZE,
            });
        }
        self.total += size;
        self.count += 1;
        if self.total > MAX_CONTAINER_FILES_SIZE {
            return Err(SandboxError::FilesTooLarge {
                id: self.container.clone(),
                limit: MAX_CONTAINER_FILES_SIZE,
            });
        }
        if self.count > MAX_FILES {
            return Err(invalid(format!(
                "container {:?} mounts more than {MAX_FILES} files",
                self.container
            )));
        }
        Ok(())
    }
}

fn read_file(
    path: &Path,
    meta: &std::fs::Metadata,
    store_path: String,
    mode: Option<u32>,
    budget: &mut Budget,
) -> Result<PlannedFile> {
    budget.take(path, meta.len())?;
    let data = std::fs::read(path).map_err(SandboxError::io("reading", path))?;
    // The file may have grown since the stat.
    if data.len() as u64 > meta.len() {
        budget.take(path, data.len() as u64 - meta.len())?;
    }
    Ok(PlannedFile {
        store_path,
        data,
        mode: mode.unwrap_or(meta.mode()) & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
    })
}

fn walk(
    dir: &Path,
    store_dir: &str,
    mode: Option<u32>,
    depth: usize,
    budget: &mut Budget,
    out: &mut Vec<PlannedFile>,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(invalid(format!(
            "{} is nested deeper than {MAX_DEPTH} levels",
            dir.display()
        )));
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(SandboxError::io("listing", dir))?
        .collect::<std::io::Result<_>>()
        .map_err(SandboxError::io("listing", dir))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        // kubelet's atomic writer keeps the real files in "..data" / "..<timestamp>" and links
        // them from the visible names: copy the visible names only.
        if name.starts_with("..") {
            continue;
        }
        let path = e.path();
        let lmeta = std::fs::symlink_metadata(&path).map_err(SandboxError::io("stat", &path))?;
        let store_path = format!("{store_dir}/{name}");
        if lmeta.is_dir() {
            walk(&path, &store_path, mode, depth + 1, budget, out)?;
        } else if lmeta.is_file() {
            out.push(read_file(&path, &lmeta, store_path, mode, budget)?);
        } else if lmeta.file_type().is_symlink() {
            // A link to a file is copied as that file; links to directories are skipped (they
            // could loop or leave the volume).
            if let Ok(meta) = std::fs::metadata(&path) {
                if meta.is_file() {
                    out.push(read_file(&path, &meta, store_path, mode, budget)?);
                }
            }
        }
    }
    Ok(())
}

/// Reads every file of `files` (within the limits) and plans its copy under `c/<container>/`.
pub fn plan(container: &str, files: &[FileToCopy]) -> Result<Plan> {
    let mut budget = Budget {
        container: container.to_owned(),
        total: 0,
        count: 0,
    };
    let mut plan = Plan::default();
    for f in files {
        if !f.container_path.starts_with('/') || f.container_path.contains('\0') {
            return Err(invalid(format!(
                "mount point {:?} must be an absolute path",
                f.container_path
            )));
        }
        let store_path = format!("c/{container}/{}", clean_relative(&f.guest_relative_path)?);
        if plan
            .mounts
            .iter()
            .any(|m| m.store_path.as_deref() == Some(store_path.as_str()))
        {
            return Err(invalid(format!(
                "guest path {:?} is used twice",
                f.guest_relative_path
            )));
        }
        let meta =
            std::fs::metadata(&f.host_source).map_err(SandboxError::io("stat", &f.host_source))?;
        let store_path = if meta.is_dir() {
            let before = plan.files.len();
            walk(
                &f.host_source,
                &store_path,
                f.mode,
                0,
                &mut budget,
                &mut plan.files,
            )?;
            (plan.files.len() > before).then_some(store_path)
        } else if meta.is_file() {
            plan.files.push(read_file(
                &f.host_source,
                &meta,
                store_path.clone(),
                f.mode,
                &mut budget,
            )?);
            Some(store_path)
        } else {
            return Err(invalid(format!(
                "{} is neither a file nor a directory",
                f.host_source.display()
            )));
        };
        plan.mounts.push(PlannedMount {
            store_path,
            container_path: f.container_path.clone(),
            read_only: f.read_only,
            host_path: f.host_source.display().to_string(),
        });
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(rel: &str, src: &Path, dest: &str) -> FileToCopy {
        FileToCopy {
            guest_relative_path: rel.into(),
            host_source: src.to_path_buf(),
            mode: None,
            read_only: true,
            container_path: dest.into(),
        }
    }

    #[test]
    fn files_and_directories() {
        let d = tempfile::tempdir().unwrap();
        let hosts = d.path().join("hosts");
        std::fs::write(&hosts, b"127.0.0.1 localhost\n").unwrap();
        // A config map volume as kubelet writes it.
        let vol = d.path().join("vol");
        let data = vol.join("..2024_01_01");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("key"), b"value").unwrap();
        std::os::unix::fs::symlink("..2024_01_01", vol.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/key", vol.join("key")).unwrap();
        std::fs::create_dir(vol.join("sub")).unwrap();
        std::fs::write(vol.join("sub/x"), b"x").unwrap();
        let empty = d.path().join("empty");
        std::fs::create_dir(&empty).unwrap();

        let p = plan(
            "c1",
            &[
                copy("./etc-hosts", &hosts, "/etc/hosts"),
                copy("vol", &vol, "/config"),
                copy("scratch", &empty, "/scratch"),
            ],
        )
        .unwrap();
        let paths: Vec<&str> = p.files.iter().map(|f| f.store_path.as_str()).collect();
        assert_eq!(paths, ["c/c1/etc-hosts", "c/c1/vol/key", "c/c1/vol/sub/x"]);
        assert_eq!(p.files[1].data, b"value");
        assert_eq!(p.mounts[0].store_path.as_deref(), Some("c/c1/etc-hosts"));
        assert_eq!(p.mounts[1].store_path.as_deref(), Some("c/c1/vol"));
        assert_eq!(p.mounts[2].store_path, None);
    }

    #[test]
    fn limits_and_bad_paths() {
        let d = tempfile::tempdir().unwrap();
        let big = d.path().join("big");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_FILE_SIZE + 1).unwrap();
        assert!(matches!(
            plan("c", &[copy("big", &big, "/big")]),
            Err(SandboxError::FileTooLarge { .. })
        ));
        f.set_len(MAX_FILE_SIZE).unwrap();
        let many: Vec<FileToCopy> = (0..5)
            .map(|i| copy(&format!("b{i}"), &big, &format!("/b{i}")))
            .collect();
        assert!(matches!(
            plan("c", &many),
            Err(SandboxError::FilesTooLarge { .. })
        ));
        let small = d.path().join("s");
        std::fs::write(&small, b"s").unwrap();
        for (rel, dest) in [
            ("../x", "/x"),
            ("/abs", "/x"),
            ("", "/x"),
            ("a/../../b", "/x"),
            ("ok", "relative"),
        ] {
            assert!(
                plan("c", &[copy(rel, &small, dest)]).is_err(),
                "{rel} {dest}"
            );
        }
        assert!(plan("c", &[copy("a", &small, "/a"), copy("a", &small, "/b")]).is_err());
        assert!(plan("c", &[copy("a", &d.path().join("missing"), "/a")]).is_err());
    }

    #[test]
    fn modes() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
        let p = plan("c", &[copy("f", &f, "/f")]).unwrap();
        assert_eq!(p.files[0].mode, 0o640);
        let mut c = copy("f", &f, "/f");
        c.mode = Some(0o100_400);
        assert_eq!(plan("c", &[c]).unwrap().files[0].mode, 0o400);
    }
}
