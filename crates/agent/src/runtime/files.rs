//! The agent's file store for `CopyFile`: files the host writes into the guest (/etc/hosts,
//! resolv.conf, secrets, config maps) and container specs then bind-mount.
//!
//! Paths are relative to the store and walked one component at a time with `O_NOFOLLOW`, so a
//! symlink planted by a container in a directory it has mounted read-write cannot redirect a
//! later write outside the store. Chunks arrive in order; the file is renamed into place
//! atomically once the last one is written, so readers never see half a secret.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fchmod, fstat, mkdirat, Mode};
use nix::unistd::{fchown, Gid, Uid};

use super::ContainerError;

/// Deepest path accepted.
const MAX_DEPTH: usize = 32;
/// Longest path accepted, in bytes.
const MAX_PATH_LEN: usize = 1024;

/// One `CopyFile` chunk.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    pub path: &'a str,
    pub file_size: u64,
    pub offset: u64,
    pub data: &'a [u8],
    pub file_mode: u32,
    pub dir_mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The store.
#[derive(Debug)]
pub struct FileStore {
    root: PathBuf,
    max_size: u64,
    /// CopyFile is rare: one writer at a time keeps the partial-file protocol simple.
    lock: Mutex<()>,
}

fn invalid(msg: impl Into<String>) -> ContainerError {
    ContainerError::InvalidArgument(msg.into())
}

fn io(what: &'static str) -> impl FnOnce(Errno) -> ContainerError {
    move |source| ContainerError::Sys { what, source }
}

/// Splits a store-relative path into validated components.
pub fn components(path: &str) -> Result<Vec<&OsStr>, ContainerError> {
    if path.is_empty() || path.len() > MAX_PATH_LEN || path.contains('\0') {
        return Err(invalid(format!(
            "file path must be 1..={MAX_PATH_LEN} bytes without NUL"
        )));
    }
    let mut parts = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(name) if !name.as_bytes().starts_with(b".hyperstart-partial") => {
                parts.push(name)
            }
            Component::CurDir => {}
            _ => {
                return Err(invalid(format!(
                    "file path {path:?} must be relative to the file store, without '..'"
                )))
            }
        }
    }
    if parts.is_empty() || parts.len() > MAX_DEPTH {
        return Err(invalid(format!(
            "file path {path:?} has no file name or is too deep"
        )));
    }
    Ok(parts)
}

fn cstr(name: &OsStr) -> CString {
    // Validated: no NUL.
    CString::new(name.as_bytes()).unwrap_or_default()
}

impl FileStore {
    /// A store rooted at `root` (created on first use).
    pub fn new(root: PathBuf, max_size: u64) -> FileStore {
        FileStore {
            root,
            max_size,
            lock: Mutex::new(()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes one chunk. Returns the file's absolute path and whether it is complete.
    pub fn write(&self, chunk: &Chunk<'_>) -> Result<(PathBuf, bool), ContainerError> {
        let parts = components(chunk.path)?;
        if chunk.file_size > self.max_size {
            return Err(invalid(format!(
                "file size {} exceeds the limit of {} bytes",
                chunk.file_size, self.max_size
            )));
        }
        let end = chunk
            .offset
            .checked_add(chunk.data.len() as u64)
            .filter(|&end| end <= chunk.file_size)
            .ok_or_else(|| invalid("chunk extends past file_size"))?;
        let file_mode = Mode::from_bits_truncate(chunk.file_mode & 0o7777);
        let dir_mode = match chunk.dir_mode & 0o7777 {
            0 => Mode::from_bits_truncate(0o755),
            m => Mode::from_bits_truncate(m),
        };
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        std::fs::create_dir_all(&self.root)
            .map_err(|e| ContainerError::Setup(format!("creating {}: {e}", self.root.display())))?;
        let root_c = CString::new(self.root.as_os_str().as_bytes())
            .map_err(|_| invalid("file store path has a NUL"))?;
        let flags = OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
        let raw = nix::fcntl::open(root_c.as_c_str(), flags, Mode::empty())
            .map_err(io("opening the file store"))?;
        // SAFETY: `raw` was just opened and is owned here.
        let mut dir = unsafe { OwnedFd::from_raw_fd(raw) };
        let (name, dirs) = parts.split_last().ok_or_else(|| invalid("empty path"))?;
        for part in dirs {
            let c = cstr(part);
            match mkdirat(Some(dir.as_raw_fd()), c.as_c_str(), dir_mode) {
                Ok(()) => {
                    // A new directory: give it to the file's owner like the file.
                    let raw = openat(Some(dir.as_raw_fd()), c.as_c_str(), flags, Mode::empty())
                        .map_err(io("opening a new directory"))?;
                    // SAFETY: just opened, owned here.
                    let sub = unsafe { OwnedFd::from_raw_fd(raw) };
                    fchmod(sub.as_raw_fd(), dir_mode).map_err(io("chmod directory"))?;
                    fchown(
                        sub.as_raw_fd(),
                        Some(Uid::from_raw(chunk.uid)),
                        Some(Gid::from_raw(chunk.gid)),
                    )
                    .map_err(io("chown directory"))?;
                    dir = sub;
                    continue;
                }
                Err(Errno::EEXIST) => {}
                Err(e) => return Err(io("mkdir")(e)),
            }
            let raw =
                openat(Some(dir.as_raw_fd()), c.as_c_str(), flags, Mode::empty()).map_err(|e| {
                    match e {
                        Errno::ELOOP | Errno::ENOTDIR => invalid(format!(
                            "{:?} in {:?} is not a directory (symlinks are not followed)",
                            part, chunk.path
                        )),
                        e => io("opening a directory")(e),
                    }
                })?;
            // SAFETY: just opened, owned here.
            dir = unsafe { OwnedFd::from_raw_fd(raw) };
        }
        let mut partial = b".hyperstart-partial-".to_vec();
        partial.extend_from_slice(name.as_bytes());
        let partial = CString::new(partial).map_err(|_| invalid("NUL in name"))?;
        let mut oflags = OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_CREAT;
        if chunk.offset == 0 {
            oflags |= OFlag::O_TRUNC;
        }
        let raw = openat(
            Some(dir.as_raw_fd()),
            partial.as_c_str(),
            oflags,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(io("opening the partial file"))?;
        // SAFETY: just opened, owned here.
        let mut file = unsafe { File::from_raw_fd(raw) };
        let have = fstat(file.as_raw_fd()).map_err(io("fstat"))?.st_size as u64;
        if have != chunk.offset {
            return Err(invalid(format!(
                "chunk at offset {} but {} bytes were written so far (chunks go in order)",
                chunk.offset, have
            )));
        }
        file.seek(SeekFrom::Start(chunk.offset))
            .and_then(|_| file.write_all(chunk.data))
            .map_err(|e| ContainerError::Setup(format!("writing {}: {e}", chunk.path)))?;
        let path = parts.iter().fold(self.root.clone(), |p, c| p.join(c));
        if end < chunk.file_size {
            return Ok((path, false));
        }
        fchmod(file.as_raw_fd(), file_mode).map_err(io("chmod"))?;
        fchown(
            file.as_fd().as_raw_fd(),
            Some(Uid::from_raw(chunk.uid)),
            Some(Gid::from_raw(chunk.gid)),
        )
        .map_err(io("chown"))?;
        let name_c = cstr(name);
        renameat(
            Some(dir.as_raw_fd()),
            partial.as_c_str(),
            Some(dir.as_raw_fd()),
            name_c.as_c_str(),
        )
        .map_err(|e| match e {
            Errno::EISDIR | Errno::ENOTEMPTY => invalid(format!("{:?} is a directory", chunk.path)),
            e => io("renaming the file into place")(e),
        })?;
        Ok((path, true))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn chunk<'a>(path: &'a str, size: u64, offset: u64, data: &'a [u8]) -> Chunk<'a> {
        Chunk {
            path,
            file_size: size,
            offset,
            data,
            file_mode: 0o640,
            dir_mode: 0o750,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn rejects_escaping_paths() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../b",
            "a/..",
            ".",
            "a\0b",
            ".hyperstart-partial-x",
        ] {
            assert!(components(bad).is_err(), "{bad:?}");
        }
        assert_eq!(components("a/./b").unwrap().len(), 2);
    }

    #[test]
    fn chunked_write_is_atomic() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::new(tmp.path().join("files"), 100);
        let (path, done) = store.write(&chunk("pod/etc/hosts", 6, 0, b"abc")).unwrap();
        assert!(!done);
        assert!(!path.exists());
        // Out of order.
        assert!(store.write(&chunk("pod/etc/hosts", 6, 4, b"de")).is_err());
        let (path, done) = store.write(&chunk("pod/etc/hosts", 6, 3, b"def")).unwrap();
        assert!(done);
        assert_eq!(std::fs::read(&path).unwrap(), b"abcdef");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        let dir = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(dir.permissions().mode() & 0o7777, 0o750);
        // Replacing works, too big fails.
        store.write(&chunk("pod/etc/hosts", 1, 0, b"x")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
        assert!(store.write(&chunk("big", 101, 0, b"")).is_err());
        assert!(store.write(&chunk("past", 1, 0, b"xy")).is_err());
        assert_eq!(meta.uid(), 0);
    }

    #[test]
    fn symlinks_are_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let store = FileStore::new(tmp.path().join("files"), 100);
        std::fs::create_dir_all(store.root()).unwrap();
        std::os::unix::fs::symlink(&outside, store.root().join("evil")).unwrap();
        assert!(store.write(&chunk("evil/x", 1, 0, b"x")).is_err());
        assert!(!outside.join("x").exists());
        std::os::unix::fs::symlink(outside.join("f"), store.root().join("link")).unwrap();
        // The final component is replaced by rename, never written through.
        store.write(&chunk("link", 1, 0, b"y")).unwrap();
        assert!(!outside.join("f").exists());
    }
}
