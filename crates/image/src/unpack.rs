//! Apply OCI/Docker layer tarballs (uncompressed, gzip or zstd) to a directory.
//!
//! Every path is resolved component by component inside the target root: `..` entries are
//! refused, absolute entry paths are taken relative to the root, symlinks met in parent
//! components are followed only while they stay inside the root (absolute targets are
//! root-relative, as in the container), and the final component is never followed. Whiteouts
//! (`.wh.<name>`) delete lower-layer paths and opaque markers (`.wh..wh..opq`) empty a directory of
//! lower-layer content.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use tar::EntryType;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const MAX_SYMLINKS: usize = 40;

/// Errors from unpacking a layer.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// Reading the archive failed (truncated or corrupt stream).
    #[error("reading layer archive")]
    Archive(#[source] io::Error),
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
    /// An entry path contains `..`.
    #[error("layer entry `{0}` has a `..` component")]
    DotDot(PathBuf),
    /// An entry path is empty or names the root itself where that is not allowed.
    #[error("layer entry `{0}` has an invalid path")]
    InvalidPath(PathBuf),
    /// A symlink in a parent component points outside the root.
    #[error("layer entry `{entry}` goes through symlink `{symlink}` that points outside the root")]
    SymlinkEscape {
        /// The entry being written.
        entry: PathBuf,
        /// The symlink that would lead out.
        symlink: PathBuf,
    },
    /// Too many symlinks while resolving a path.
    #[error("too many levels of symlinks resolving `{0}`")]
    SymlinkLoop(PathBuf),
    /// A parent component is not a directory.
    #[error("parent of layer entry `{0}` is not a directory")]
    NotADirectory(PathBuf),
    /// A hard link points to a path that does not exist in the root.
    #[error("hard link `{entry}` points to missing `{target}`")]
    MissingLinkTarget {
        /// The link entry.
        entry: PathBuf,
        /// Its target.
        target: PathBuf,
    },
    /// An entry type the unpacker does not handle.
    #[error("layer entry `{path}` has unsupported type {kind:?}")]
    UnsupportedEntry {
        /// The entry.
        path: PathBuf,
        /// Its tar type byte.
        kind: u8,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn nix_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> UnpackError + 'a {
    move |e| UnpackError::Io {
        op,
        path: path.to_path_buf(),
        source: io::Error::from(e),
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// From the magic bytes at the start of a blob (plain tar otherwise).
    pub fn detect(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// From an OCI or Docker layer media type; `None` if it is not a known layer type.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }
}

/// Options for [`apply_layer`].
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// Set uid/gid from the archive (needs root). Default: whether we run as root.
    pub preserve_ownership: bool,
    /// Create device nodes (needs root; skipped otherwise). Default: whether we run as root.
    pub create_devices: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        let root = nix::unistd::geteuid().is_root();
        UnpackOptions {
            preserve_ownership: root,
            create_devices: root,
        }
    }
}

/// What applying a layer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries created or replaced.
    pub entries: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Device nodes skipped for lack of privilege.
    pub skipped_devices: u64,
    /// Bytes of regular file content written.
    pub bytes: u64,
}

/// Apply one layer, detecting its compression from the magic bytes.
pub fn apply_layer(
    root: &Path,
    reader: impl Read,
    opts: &UnpackOptions,
) -> Result<LayerStats, UnpackError> {
    let mut reader = BufReader::with_capacity(256 * 1024, reader);
    let head = reader.fill_buf().map_err(UnpackError::Archive)?;
    let compression = Compression::detect(head);
    apply_layer_with(root, reader, compression, opts)
}

/// Apply one layer with a known compression.
pub fn apply_layer_with(
    root: &Path,
    reader: impl Read,
    compression: Compression,
    opts: &UnpackOptions,
) -> Result<LayerStats, UnpackError> {
    match compression {
        Compression::None => apply_tar(root, reader, opts),
        Compression::Gzip => apply_tar(root, flate2::read::MultiGzDecoder::new(reader), opts),
        Compression::Zstd => {
            let dec = zstd::stream::read::Decoder::new(reader).map_err(UnpackError::Archive)?;
            apply_tar(root, dec, opts)
        }
    }
}

/// Normalise an entry path to root-relative components; refuses `..`.
fn entry_components(path: &Path) -> Result<Vec<OsString>, UnpackError> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            Component::ParentDir => return Err(UnpackError::DotDot(path.to_path_buf())),
        }
    }
    Ok(out)
}

/// Resolve `dirs` (components below the root) to a real directory inside `root`, following
/// symlinks only while they stay inside. Missing directories are created when `create`, else
/// `Ok(None)` is returned.
fn resolve_dir(
    root: &Path,
    entry: &Path,
    dirs: &[OsString],
    create: bool,
) -> Result<Option<PathBuf>, UnpackError> {
    let mut stack: Vec<OsString> = Vec::new();
    let mut queue: VecDeque<OsString> = dirs.iter().cloned().collect();
    let mut followed = 0;
    let mut last_link = PathBuf::new();
    while let Some(comp) = queue.pop_front() {
        if comp == "." || comp.is_empty() {
            continue;
        }
        if comp == ".." {
            // Only symlink targets bring `..` here; climbing above the root leads out.
            if stack.pop().is_none() {
                return Err(UnpackError::SymlinkEscape {
                    entry: entry.to_path_buf(),
                    symlink: last_link,
                });
            }
            continue;
        }
        let mut here = root.to_path_buf();
        here.extend(&stack);
        here.push(&comp);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.is_dir() => stack.push(comp),
            Ok(m) if m.file_type().is_symlink() => {
                followed += 1;
                if followed > MAX_SYMLINKS {
                    return Err(UnpackError::SymlinkLoop(entry.to_path_buf()));
                }
                let target = fs::read_link(&here).map_err(io_err("read symlink", &here))?;
                if target.is_absolute() {
                    stack.clear();
                }
                let mut pending: Vec<OsString> = Vec::new();
                for c in target.components() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push(OsString::from("..")),
                        _ => {}
                    }
                }
                last_link = here.strip_prefix(root).unwrap_or(&here).to_path_buf();
                for c in pending.into_iter().rev() {
                    queue.push_front(c);
                }
            }
            Ok(_) => return Err(UnpackError::NotADirectory(entry.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !create {
                    return Ok(None);
                }
                fs::create_dir(&here).map_err(io_err("create directory", &here))?;
                fs::set_permissions(&here, fs::Permissions::from_mode(0o755))
                    .map_err(io_err("chmod", &here))?;
                stack.push(comp);
            }
            Err(e) => return Err(io_err("stat", &here)(e)),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&stack);
    Ok(Some(out))
}

/// Remove whatever is at `path` (never following a symlink).
fn remove_any(path: &Path) -> Result<(), UnpackError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io_err("remove", path)),
        Ok(_) => fs::remove_file(path).map_err(io_err("remove", path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("stat", path)(e)),
    }
}

fn set_xattr(path: &Path, name: &[u8], value: &[u8]) -> Result<(), UnpackError> {
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| UnpackError::InvalidPath(path.to_path_buf()))?;
    let cname =
        std::ffi::CString::new(name).map_err(|_| UnpackError::InvalidPath(path.to_path_buf()))?;
    // SAFETY: both strings are valid NUL-terminated C strings that outlive the call, and
    // `value` is a valid buffer of `value.len()` bytes; lsetxattr does not retain any pointer.
    let rc = unsafe {
        libc::lsetxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(io_err("set xattr on", path)(io::Error::last_os_error()));
    }
    Ok(())
}

/// A numeric header field; an all-NUL or blank field reads as 0 (as Go's archive/tar does), any
/// other unparsable value is an error.
fn lenient(raw: &[u8], parsed: io::Result<u64>) -> Result<u64, UnpackError> {
    match parsed {
        Ok(v) => Ok(v),
        Err(_) if raw.iter().all(|b| *b == 0 || *b == b' ') => Ok(0),
        Err(e) => Err(UnpackError::Archive(e)),
    }
}

struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn apply_meta(
    path: &Path,
    kind: EntryType,
    meta: &Meta,
    opts: &UnpackOptions,
) -> Result<(), UnpackError> {
    if opts.preserve_ownership {
        let uid = u32::try_from(meta.uid).ok();
        let gid = u32::try_from(meta.gid).ok();
        std::os::unix::fs::lchown(path, uid, gid).map_err(io_err("chown", path))?;
    }
    for (name, value) in &meta.xattrs {
        set_xattr(path, name, value)?;
    }
    if kind != EntryType::Symlink {
        // After chown, which clears set-id bits.
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode & 0o7777))
            .map_err(io_err("chmod", path))?;
    }
    let secs = i64::try_from(meta.mtime).unwrap_or(i64::MAX);
    let t = TimeSpec::new(secs, 0);
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink)
        .map_err(nix_err("set times on", path))?;
    Ok(())
}

fn apply_tar(
    root: &Path,
    reader: impl Read,
    opts: &UnpackOptions,
) -> Result<LayerStats, UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let mut stats = LayerStats::default();
    // Paths (root-relative) written by this layer: opaque markers must not delete them.
    let mut this_layer: HashSet<PathBuf> = HashSet::new();
    // Directory times are set last: creating children changes them.
    let mut dir_times: Vec<(PathBuf, u64)> = Vec::new();

    for entry in archive.entries().map_err(UnpackError::Archive)? {
        let mut entry = entry.map_err(UnpackError::Archive)?;
        let raw_path = entry.path().map_err(UnpackError::Archive)?.into_owned();
        let comps = entry_components(&raw_path)?;
        let kind = entry.header().entry_type();
        let Some((name, parents)) = comps.split_last() else {
            // The root directory itself ("./"): nothing to create.
            continue;
        };
        let rel: PathBuf = comps.iter().collect();
        let name_bytes = name.as_bytes();

        // Whiteouts.
        if name == OPAQUE_MARKER {
            if let Some(dir) = resolve_dir(root, &raw_path, parents, true)? {
                let parent_rel: PathBuf = parents.iter().collect();
                for child in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
                    let child = child.map_err(io_err("list", &dir))?;
                    if !this_layer.contains(&parent_rel.join(child.file_name())) {
                        remove_any(&child.path())?;
                    }
                }
            }
            stats.whiteouts += 1;
            continue;
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if hidden.starts_with(WHITEOUT_PREFIX.as_bytes()) {
                // Other `.wh..wh.` metadata (e.g. AUFS hard link dirs): not content.
                continue;
            }
            let hidden = OsStr::from_bytes(hidden);
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(UnpackError::InvalidPath(raw_path));
            }
            if let Some(dir) = resolve_dir(root, &raw_path, parents, false)? {
                remove_any(&dir.join(hidden))?;
            }
            stats.whiteouts += 1;
            continue;
        }

        let xattrs = match entry.pax_extensions().map_err(UnpackError::Archive)? {
            Some(exts) => {
                let mut v = Vec::new();
                for ext in exts {
                    let ext = ext.map_err(UnpackError::Archive)?;
                    if let Some(n) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                        v.push((n.to_vec(), ext.value_bytes().to_vec()));
                    }
                }
                v
            }
            None => Vec::new(),
        };
        let header = entry.header().clone();
        let meta = Meta {
            mode: header.mode().map_err(UnpackError::Archive)?,
            uid: lenient(&header.as_old().uid, header.uid())?,
            gid: lenient(&header.as_old().gid, header.gid())?,
            mtime: lenient(&header.as_old().mtime, header.mtime())?,
            xattrs,
        };
        let dir = resolve_dir(root, &raw_path, parents, true)?
            .ok_or_else(|| UnpackError::InvalidPath(raw_path.clone()))?;
        let dest = dir.join(name);
        let existing = match fs::symlink_metadata(&dest) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("stat", &dest)(e)),
        };

        match kind {
            EntryType::Directory => {
                if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                    remove_any(&dest)?;
                    fs::create_dir(&dest).map_err(io_err("create directory", &dest))?;
                }
                apply_meta(&dest, kind, &meta, opts)?;
                dir_times.push((dest.clone(), meta.mtime));
            }
            EntryType::Regular | EntryType::Continuous => {
                remove_any(&dest)?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&dest)
                    .map_err(io_err("create", &dest))?;
                stats.bytes += io::copy(&mut entry, &mut f).map_err(UnpackError::Archive)?;
                drop(f);
                apply_meta(&dest, kind, &meta, opts)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Archive)?
                    .ok_or_else(|| UnpackError::InvalidPath(raw_path.clone()))?
                    .into_owned();
                remove_any(&dest)?;
                symlink(&target, &dest).map_err(io_err("create symlink", &dest))?;
                apply_meta(&dest, kind, &meta, opts)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Archive)?
                    .ok_or_else(|| UnpackError::InvalidPath(raw_path.clone()))?
                    .into_owned();
                let tcomps = entry_components(&target)?;
                let Some((tname, tparents)) = tcomps.split_last() else {
                    return Err(UnpackError::InvalidPath(target));
                };
                let missing = || UnpackError::MissingLinkTarget {
                    entry: raw_path.clone(),
                    target: target.clone(),
                };
                let tdir = resolve_dir(root, &target, tparents, false)?.ok_or_else(missing)?;
                let tpath = tdir.join(tname);
                match fs::symlink_metadata(&tpath) {
                    Ok(m) if m.is_dir() => return Err(UnpackError::InvalidPath(target)),
                    Ok(_) => {}
                    Err(_) => return Err(missing()),
                }
                if tpath != dest {
                    remove_any(&dest)?;
                    // linkat without AT_SYMLINK_FOLLOW: a symlink target is linked, not followed.
                    fs::hard_link(&tpath, &dest).map_err(io_err("create hard link", &dest))?;
                }
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                if kind != EntryType::Fifo && !opts.create_devices {
                    log::warn!("skipping device node {} (not root)", rel.display());
                    stats.skipped_devices += 1;
                    continue;
                }
                remove_any(&dest)?;
                let sflag = match kind {
                    EntryType::Char => SFlag::S_IFCHR,
                    EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let major = header
                    .device_major()
                    .map_err(UnpackError::Archive)?
                    .unwrap_or(0);
                let minor = header
                    .device_minor()
                    .map_err(UnpackError::Archive)?
                    .unwrap_or(0);
                let dev = libc::makedev(major, minor);
                mknod(&dest, sflag, Mode::from_bits_truncate(0o600), dev)
                    .map_err(nix_err("create node", &dest))?;
                apply_meta(&dest, kind, &meta, opts)?;
            }
            EntryType::XGlobalHeader | EntryType::XHeader => continue,
            other => {
                return Err(UnpackError::UnsupportedEntry {
                    path: raw_path,
                    kind: other.as_byte(),
                })
            }
        }
        this_layer.insert(rel);
        stats.entries += 1;
    }
    for (dir, mtime) in dir_times.into_iter().rev() {
        let secs = i64::try_from(mtime).unwrap_or(i64::MAX);
        let t = TimeSpec::new(secs, 0);
        // The directory may have been removed by a later whiteout in the same layer.
        if dir.exists() {
            utimensat(None, &dir, &t, &t, UtimensatFlags::NoFollowSymlink)
                .map_err(nix_err("set times on", &dir))?;
        }
    }
    Ok(stats)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    /// Builds layer tarballs with raw paths (so tests can write hostile entries).
    pub(crate) struct LayerBuilder {
        b: tar::Builder<Vec<u8>>,
    }

    impl LayerBuilder {
        pub(crate) fn new() -> Self {
            LayerBuilder {
                b: tar::Builder::new(Vec::new()),
            }
        }

        fn header(path: &str, kind: EntryType, mode: u32, size: u64) -> tar::Header {
            let mut h = tar::Header::new_ustar();
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(size);
            h.set_mtime(1_600_000_000);
            h.set_uid(0);
            h.set_gid(0);
            h
        }

        fn push(&mut self, mut h: tar::Header, data: &[u8]) -> &mut Self {
            h.set_cksum();
            self.b.append(&h, data).unwrap();
            self
        }

        pub(crate) fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
            let h = Self::header(path, EntryType::Directory, mode, 0);
            self.push(h, &[])
        }

        pub(crate) fn file(&mut self, path: &str, data: &[u8], mode: u32) -> &mut Self {
            let h = Self::header(path, EntryType::Regular, mode, data.len() as u64);
            self.push(h, data)
        }

        pub(crate) fn owned_file(
            &mut self,
            path: &str,
            data: &[u8],
            uid: u64,
            gid: u64,
        ) -> &mut Self {
            let mut h = Self::header(path, EntryType::Regular, 0o640, data.len() as u64);
            h.set_uid(uid);
            h.set_gid(gid);
            h.set_mtime(1_234_567_890);
            self.push(h, data)
        }

        fn link(&mut self, path: &str, target: &str, kind: EntryType) -> &mut Self {
            let mut h = Self::header(path, kind, 0o777, 0);
            h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
            self.push(h, &[])
        }

        pub(crate) fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.link(path, target, EntryType::Symlink)
        }

        pub(crate) fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.link(path, target, EntryType::Link)
        }

        pub(crate) fn node(
            &mut self,
            path: &str,
            kind: EntryType,
            major: u32,
            minor: u32,
        ) -> &mut Self {
            let mut h = Self::header(path, kind, 0o666, 0);
            h.set_device_major(major).unwrap();
            h.set_device_minor(minor).unwrap();
            self.push(h, &[])
        }

        pub(crate) fn xattr_file(&mut self, path: &str, key: &str, value: &[u8]) -> &mut Self {
            let k = format!("SCHILY.xattr.{key}");
            self.b.append_pax_extensions([(k.as_str(), value)]).unwrap();
            self.file(path, b"x", 0o644)
        }

        pub(crate) fn tar(&mut self) -> Vec<u8> {
            let b = std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()));
            b.into_inner().unwrap()
        }

        pub(crate) fn gzip(&mut self) -> Vec<u8> {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&self.tar()).unwrap();
            e.finish().unwrap()
        }

        pub(crate) fn zstd(&mut self) -> Vec<u8> {
            zstd::encode_all(&self.tar()[..], 3).unwrap()
        }
    }

    fn apply(root: &Path, layer: &[u8]) -> Result<LayerStats, UnpackError> {
        apply_layer(root, layer, &UnpackOptions::default())
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn sample(b: &mut LayerBuilder) -> &mut LayerBuilder {
        b.dir("bin/", 0o755)
            .file("bin/busybox", b"#!busybox", 0o4755)
            .hardlink("bin/sh", "bin/busybox")
            .symlink("bin/ls", "busybox")
            .dir("etc", 0o700)
            .owned_file("etc/shadow", b"root:*", 42, 43)
    }

    fn check_sample(root: &Path) {
        let bb = fs::symlink_metadata(root.join("bin/busybox")).unwrap();
        assert_eq!(fs::read(root.join("bin/busybox")).unwrap(), b"#!busybox");
        assert_eq!(bb.mode() & 0o7777, 0o4755);
        assert_eq!(bb.mtime(), 1_600_000_000);
        let sh = fs::symlink_metadata(root.join("bin/sh")).unwrap();
        assert_eq!(sh.ino(), bb.ino(), "hard link shares the inode");
        assert_eq!(bb.nlink(), 2);
        assert_eq!(
            fs::read_link(root.join("bin/ls")).unwrap(),
            Path::new("busybox")
        );
        let etc = fs::metadata(root.join("etc")).unwrap();
        assert_eq!(etc.mode() & 0o777, 0o700);
        assert_eq!(
            etc.mtime(),
            1_600_000_000,
            "directory mtime set after its children"
        );
        let shadow = fs::metadata(root.join("etc/shadow")).unwrap();
        assert_eq!(shadow.mode() & 0o777, 0o640);
        assert_eq!(shadow.mtime(), 1_234_567_890);
        if is_root() {
            assert_eq!((shadow.uid(), shadow.gid()), (42, 43));
        }
    }

    #[test]
    fn plain_gzip_and_zstd_layers_unpack_the_same() {
        for (i, data) in [
            sample(&mut LayerBuilder::new()).tar(),
            sample(&mut LayerBuilder::new()).gzip(),
            sample(&mut LayerBuilder::new()).zstd(),
        ]
        .iter()
        .enumerate()
        {
            let dir = tempfile::tempdir().unwrap();
            let stats = apply(dir.path(), data).unwrap();
            assert_eq!(stats.entries, 6, "layer {i}");
            assert_eq!(stats.bytes, 15);
            check_sample(dir.path());
        }
        assert_eq!(
            Compression::detect(&sample(&mut LayerBuilder::new()).zstd()),
            Compression::Zstd
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(Compression::from_media_type("text/plain"), None);
    }

    #[test]
    fn corrupt_compressed_stream_is_an_error() {
        let mut gz = sample(&mut LayerBuilder::new()).gzip();
        let n = gz.len();
        gz.truncate(n / 2);
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            apply(dir.path(), &gz),
            Err(UnpackError::Archive(_))
        ));
    }

    #[test]
    fn whiteout_removes_lower_file_and_dir() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        apply(
            root,
            &LayerBuilder::new()
                .dir("a", 0o755)
                .file("a/x", b"x", 0o644)
                .file("a/y", b"y", 0o644)
                .dir("a/sub", 0o755)
                .file("a/sub/z", b"z", 0o644)
                .tar(),
        )
        .unwrap();
        let stats = apply(
            root,
            &LayerBuilder::new()
                .file("a/.wh.x", b"", 0o644)
                .file("a/.wh.sub", b"", 0o644)
                .file("a/.wh.never-existed", b"", 0o644)
                .tar(),
        )
        .unwrap();
        assert_eq!(stats.whiteouts, 3);
        assert!(!root.join("a/x").exists());
        assert!(!root.join("a/sub").exists());
        assert!(!root.join("a/.wh.x").exists(), "markers are not content");
        assert_eq!(fs::read(root.join("a/y")).unwrap(), b"y");
    }

    #[test]
    fn opaque_dir_hides_only_lower_layers() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        apply(
            root,
            &LayerBuilder::new()
                .dir("d", 0o755)
                .file("d/old", b"old", 0o644)
                .dir("d/olddir", 0o755)
                .file("d/olddir/f", b"f", 0o644)
                .file("keep", b"k", 0o644)
                .tar(),
        )
        .unwrap();
        apply(
            root,
            &LayerBuilder::new()
                .dir("d", 0o750)
                .file("d/new", b"new", 0o644)
                .file("d/.wh..wh..opq", b"", 0o644)
                .tar(),
        )
        .unwrap();
        let mut names: Vec<_> = fs::read_dir(root.join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, vec![OsString::from("new")]);
        assert_eq!(fs::metadata(root.join("d")).unwrap().mode() & 0o777, 0o750);
        assert!(root.join("keep").exists());
    }

    #[test]
    fn later_layer_replaces_file_types() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        apply(
            root,
            &LayerBuilder::new()
                .dir("x", 0o755)
                .file("x/f", b"f", 0o644)
                .file("y", b"y", 0o644)
                .tar(),
        )
        .unwrap();
        apply(
            root,
            &LayerBuilder::new()
                .file("x", b"now a file", 0o644)
                .dir("y", 0o755)
                .tar(),
        )
        .unwrap();
        assert_eq!(fs::read(root.join("x")).unwrap(), b"now a file");
        assert!(root.join("y").is_dir());
    }

    #[test]
    fn dotdot_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        for path in ["../evil", "a/../../evil", "./../evil"] {
            let err = apply(&root, &LayerBuilder::new().file(path, b"x", 0o644).tar()).unwrap_err();
            assert!(matches!(err, UnpackError::DotDot(_)), "{path}: {err}");
        }
        let err = apply(
            &root,
            &LayerBuilder::new().hardlink("h", "../../etc/passwd").tar(),
        )
        .unwrap_err();
        assert!(matches!(err, UnpackError::DotDot(_)));
        assert!(!dir.path().join("evil").exists());
    }

    #[test]
    fn absolute_entry_paths_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let outside = dir.path().join("abs-target");
        let path = outside.to_str().unwrap().to_string();
        apply(
            &root,
            &LayerBuilder::new().file(&path, b"inside", 0o644).tar(),
        )
        .unwrap();
        assert!(!outside.exists());
        let inside = root.join(path.trim_start_matches('/'));
        assert_eq!(fs::read(inside).unwrap(), b"inside");
    }

    #[test]
    fn writes_through_escaping_symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        // Relative symlink leading out, in the same layer and across layers.
        let err = apply(
            &root,
            &LayerBuilder::new()
                .symlink("out", "../outside")
                .file("out/pwned", b"x", 0o644)
                .tar(),
        )
        .unwrap_err();
        assert!(matches!(err, UnpackError::SymlinkEscape { .. }), "{err}");
        let err = apply(
            &root,
            &LayerBuilder::new()
                .dir("a", 0o755)
                .symlink("a/deep", "../../../../outside")
                .tar(),
        )
        .and_then(|_| {
            apply(
                &root,
                &LayerBuilder::new().file("a/deep/pwned", b"x", 0o644).tar(),
            )
        })
        .unwrap_err();
        assert!(matches!(err, UnpackError::SymlinkEscape { .. }), "{err}");
        // Chains of symlinks that end outside.
        let err = apply(
            &root,
            &LayerBuilder::new()
                .symlink("l1", "l2")
                .symlink("l2", "a/../..")
                .file("l1/outside/pwned", b"x", 0o644)
                .tar(),
        )
        .unwrap_err();
        assert!(matches!(err, UnpackError::SymlinkEscape { .. }), "{err}");
        // Whiteouts and hard links through an escaping link are refused too.
        fs::write(outside.join("victim"), b"v").unwrap();
        let err = apply(
            &root,
            &LayerBuilder::new().file("out/.wh.victim", b"", 0o644).tar(),
        )
        .unwrap_err();
        assert!(matches!(err, UnpackError::SymlinkEscape { .. }), "{err}");
        let err = apply(
            &root,
            &LayerBuilder::new().hardlink("h", "out/victim").tar(),
        )
        .unwrap_err();
        assert!(matches!(err, UnpackError::SymlinkEscape { .. }), "{err}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
        assert_eq!(fs::read(outside.join("victim")).unwrap(), b"v");
    }

    #[test]
    fn symlinks_inside_the_root_are_resolved_in_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let host_target = dir.path().join("hostdir");
        fs::create_dir(&host_target).unwrap();
        apply(
            &root,
            &LayerBuilder::new()
                .dir("usr/lib", 0o755)
                .symlink("lib", "usr/lib")
                // Absolute target: means <root>/<abs>, never the host path.
                .symlink("abs", host_target.to_str().unwrap())
                .file("lib/libc.so", b"libc", 0o755)
                .file("abs/f", b"in root", 0o644)
                .tar(),
        )
        .unwrap();
        assert_eq!(fs::read(root.join("usr/lib/libc.so")).unwrap(), b"libc");
        let rel = host_target.strip_prefix("/").unwrap();
        assert_eq!(fs::read(root.join(rel).join("f")).unwrap(), b"in root");
        assert_eq!(fs::read_dir(&host_target).unwrap().count(), 0);
    }

    #[test]
    fn final_symlink_component_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"original").unwrap();
        apply(&root, &LayerBuilder::new().symlink("f", "../victim").tar()).unwrap();
        apply(&root, &LayerBuilder::new().file("f", b"new", 0o600).tar()).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"original");
        assert!(fs::symlink_metadata(root.join("f")).unwrap().is_file());
        assert_eq!(fs::read(root.join("f")).unwrap(), b"new");
    }

    #[test]
    fn symlink_loops_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let err = apply(
            dir.path(),
            &LayerBuilder::new()
                .symlink("a", "b")
                .symlink("b", "a")
                .file("a/f", b"", 0o644)
                .tar(),
        )
        .unwrap_err();
        assert!(matches!(err, UnpackError::SymlinkLoop(_)), "{err}");
    }

    #[test]
    fn hard_link_to_missing_target_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = apply(dir.path(), &LayerBuilder::new().hardlink("h", "nope").tar()).unwrap_err();
        assert!(
            matches!(err, UnpackError::MissingLinkTarget { .. }),
            "{err}"
        );
    }

    #[test]
    fn device_nodes_and_fifos() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let stats = apply(
            root,
            &LayerBuilder::new()
                .dir("dev", 0o755)
                .node("dev/null", EntryType::Char, 1, 3)
                .node("dev/loopx", EntryType::Block, 7, 200)
                .node("dev/pipe", EntryType::Fifo, 0, 0)
                .tar(),
        )
        .unwrap();
        let fifo = fs::symlink_metadata(root.join("dev/pipe")).unwrap();
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o777, 0o666);
        if is_root() {
            assert_eq!(stats.skipped_devices, 0);
            let null = fs::symlink_metadata(root.join("dev/null")).unwrap();
            assert!(null.file_type().is_char_device());
            assert_eq!(null.rdev(), libc::makedev(1, 3));
            let blk = fs::symlink_metadata(root.join("dev/loopx")).unwrap();
            assert!(blk.file_type().is_block_device());
            assert_eq!(blk.rdev(), libc::makedev(7, 200));
        } else {
            assert_eq!(stats.skipped_devices, 2);
        }
    }

    #[test]
    fn xattrs_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        apply(
            root,
            &LayerBuilder::new()
                .xattr_file("cap", "user.hypernetes.test", b"v1")
                .tar(),
        )
        .unwrap();
        let path = std::ffi::CString::new(root.join("cap").as_os_str().as_bytes()).unwrap();
        let name = std::ffi::CString::new("user.hypernetes.test").unwrap();
        let mut buf = [0u8; 16];
        // SAFETY: valid C strings and a writable buffer of the given length.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(n, 2);
        assert_eq!(&buf[..2], b"v1");
    }
}
