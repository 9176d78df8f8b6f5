//! Atomic JSON records: write a temporary file, fsync it, rename it over the record, fsync the
//! directory. A crash at any point leaves either the old record or the new one, never a mix;
//! leftover temporary files (`*.tmp`) are removed when the directory is next read.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Result, SandboxError};

/// The temporary file a write of `path` goes through.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// First half of an atomic write: the new content, durable, beside the record.
pub fn write_tmp(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let tmp = tmp_path(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(SandboxError::io("creating", &tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(SandboxError::io("writing", &tmp))?;
    Ok(tmp)
}

/// Second half: rename over the record and make the rename durable.
pub fn commit(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).map_err(SandboxError::io("renaming into", path))?;
    sync_dir(path.parent().unwrap_or(Path::new("/")))
}

/// fsync a directory (after a rename, create or unlink in it).
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(SandboxError::io("syncing directory", dir))
}

/// Writes `value` as the JSON record `path`, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes =
        serde_json::to_vec_pretty(value).map_err(|source| SandboxError::CorruptRecord {
            path: path.to_path_buf(),
            source,
        })?;
    bytes.push(b'\n');
    let tmp = write_tmp(path, &bytes)?;
    commit(&tmp, path)
}

/// Reads the JSON record `path`; `Ok(None)` when it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SandboxError::io("reading", path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| SandboxError::CorruptRecord {
            path: path.to_path_buf(),
            source,
        })
}

/// Removes a record (and a leftover temporary file); a missing one is fine.
pub fn remove(path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(tmp_path(path));
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(path.parent().unwrap_or(Path::new("/"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SandboxError::io("removing", path)(e)),
    }
}

/// The `*.json` records of a directory, after removing leftover temporary files.
pub fn list_records(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SandboxError::io("listing", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(SandboxError::io("listing", dir))?;
        let path = entry.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("tmp") => {
                log::info!("removing interrupted write {}", path.display());
                let _ = std::fs::remove_file(&path);
            }
            Some("json") => out.push(path),
            _ => {}
        }
    }
    out.sort();
    Ok(out)
}

/// Removes a directory tree; a missing one is fine.
pub fn remove_dir_all(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SandboxError::io("removing", dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct R {
        n: u32,
        s: String,
    }

    #[test]
    fn round_trip_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        assert_eq!(read_json::<R>(&p).unwrap(), None);
        let r = R {
            n: 7,
            s: "x".into(),
        };
        write_json(&p, &r).unwrap();
        assert_eq!(read_json::<R>(&p).unwrap(), Some(r));
        assert!(!tmp_path(&p).exists());
        remove(&p).unwrap();
        remove(&p).unwrap();
        assert_eq!(read_json::<R>(&p).unwrap(), None);
    }

    #[test]
    fn crash_between_tmp_write_and_rename_keeps_the_old_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        let old = R {
            n: 1,
            s: "old".into(),
        };
        write_json(&p, &old).unwrap();
        // The "crash": the new content reached the temporary file, the rename never happened.
        let tmp = write_tmp(&p, br#"{"n":2,"s":"new"}"#).unwrap();
        assert!(tmp.exists());
        assert_eq!(read_json::<R>(&p).unwrap(), Some(old));
        // A half-written temporary file is just as harmless.
        std::fs::write(&tmp, b"{\"n\":").unwrap();
        let listed = list_records(dir.path()).unwrap();
        assert_eq!(listed, vec![p.clone()]);
        assert!(!tmp.exists(), "recovery removes the leftover");
        assert_eq!(read_json::<R>(&p).unwrap().unwrap().s, "old");
    }

    #[test]
    fn corrupt_records_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        std::fs::write(&p, b"{not json").unwrap();
        assert!(matches!(
            read_json::<R>(&p),
            Err(SandboxError::CorruptRecord { .. })
        ));
    }
}
