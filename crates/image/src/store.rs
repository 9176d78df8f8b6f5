//! Content-addressed blob store on disk.
//!
//! Layout under the root: `blobs/<algorithm>/<hex>` for committed blobs and `ingest/` for blobs being
//! written. A blob is written to a temporary file in `ingest/` while it is hashed, and renamed into
//! `blobs/` only if its digest (and size, when known) matches; anything else leaves nothing behind.
//! Writers of the same digest are serialised by a per-digest lock: the first one writes, the others
//! wait and then find the blob present, so each blob is fetched and stored once.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use tempfile::NamedTempFile;
use tokio::io::AsyncWriteExt;

use crate::digest::{Digest, Hasher};

/// Errors from the content store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation failed.
    #[error("content store: {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The content does not hash to the expected digest.
    #[error("digest mismatch: expected {expected}, content hashes to {actual}")]
    DigestMismatch {
        /// The digest the content was announced with.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },
    /// The content does not have the expected size.
    #[error("size mismatch for {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// Size from the descriptor.
        expected: u64,
        /// Bytes received so far.
        actual: u64,
    },
    /// The blob is not in the store.
    #[error("blob {0} not found")]
    NotFound(Digest),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

type LockMap = Mutex<HashMap<Digest, Arc<DigestLock>>>;

/// A lock that both threads (blocking) and async tasks (awaiting) can wait for.
#[derive(Default)]
struct DigestLock {
    held: Mutex<bool>,
    cond: Condvar,
    notify: tokio::sync::Notify,
}

impl DigestLock {
    fn try_acquire(&self) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        !std::mem::replace(&mut *held, true)
    }

    fn acquire_blocking(&self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while *held {
            held = self.cond.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        *held = true;
    }

    async fn acquire(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Register before trying, so a release in between is not missed.
            notified.as_mut().enable();
            if self.try_acquire() {
                return;
            }
            notified.await;
        }
    }

    fn release(&self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.cond.notify_all();
        self.notify.notify_waiters();
    }
}

struct Inner {
    root: PathBuf,
    inflight: Arc<LockMap>,
}

/// A content-addressed blob store. Cheap to clone; clones share the same in-flight locks.
#[derive(Clone)]
pub struct ContentStore {
    inner: Arc<Inner>,
}

/// Result of a completed write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// This call stored the blob.
    Stored {
        /// Bytes written.
        size: u64,
    },
    /// The blob was already present (possibly written concurrently by another caller).
    AlreadyPresent,
}

impl ContentStore {
    /// Open (creating if needed) a store rooted at `root`. Leftovers in `ingest/` from an earlier
    /// crash are removed.
    pub fn open(root: impl Into<PathBuf>) -> Result<ContentStore, StoreError> {
        let root = root.into();
        let ingest = root.join("ingest");
        if ingest.exists() {
            fs::remove_dir_all(&ingest).map_err(io_err("clean", &ingest))?;
        }
        for dir in [root.join("blobs"), ingest] {
            fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        }
        // Archive extraction directories left by a crash (see `layout::import_archive`).
        for entry in fs::read_dir(&root).map_err(io_err("list", &root))? {
            let entry = entry.map_err(io_err("list", &root))?;
            if entry.file_name().to_string_lossy().starts_with("import-") {
                let p = entry.path();
                fs::remove_dir_all(&p).map_err(io_err("clean", &p))?;
            }
        }
        Ok(ContentStore {
            inner: Arc::new(Inner {
                root,
                inflight: Arc::new(Mutex::new(HashMap::new())),
            }),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Where the blob `digest` lives (whether or not it is present).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner
            .root
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    /// Whether the blob is present.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Size of a present blob.
    pub fn size(&self, digest: &Digest) -> Result<u64, StoreError> {
        let path = self.blob_path(digest);
        match fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::NotFound(digest.clone()))
            }
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }

    /// Open a present blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, StoreError> {
        let path = self.blob_path(digest);
        match File::open(&path) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::NotFound(digest.clone()))
            }
            Err(e) => Err(io_err("open", &path)(e)),
        }
    }

    /// Read a whole present blob.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let mut buf = Vec::new();
        let path = self.blob_path(digest);
        self.open_blob(digest)?
            .read_to_end(&mut buf)
            .map_err(io_err("read", &path))?;
        Ok(buf)
    }

    /// Store `data` under its SHA-256 digest.
    pub fn put(&self, data: &[u8]) -> Result<Digest, StoreError> {
        let digest = Digest::sha256(data);
        if let Some(mut ingest) = self.begin(&digest)? {
            ingest.expect_size(data.len() as u64);
            ingest.write(data)?;
            ingest.commit()?;
        }
        Ok(digest)
    }

    /// Copy `reader` into the store as `expected`, verifying its digest.
    pub fn write_from(&self, expected: &Digest, reader: impl Read) -> Result<Written, StoreError> {
        let Some(mut ingest) = self.begin(expected)? else {
            return Ok(Written::AlreadyPresent);
        };
        let mut reader = reader;
        let mut buf = vec![0u8; 128 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("read source for", &ingest.path())(e)),
            };
            ingest.write(&buf[..n])?;
        }
        let size = ingest.commit()?;
        Ok(Written::Stored { size })
    }

    /// Start writing `expected`, blocking while another writer of the same digest is active.
    /// Returns `None` if the blob is (or has meanwhile become) present.
    ///
    /// From async code use [`ContentStore::begin_async`]: this one blocks the thread.
    pub fn begin(&self, expected: &Digest) -> Result<Option<Ingest>, StoreError> {
        let lock = self.lock_for(expected);
        lock.acquire_blocking();
        self.begin_locked(expected, lock)
    }

    /// Async variant of [`ContentStore::begin`].
    pub async fn begin_async(&self, expected: &Digest) -> Result<Option<Ingest>, StoreError> {
        let lock = self.lock_for(expected);
        lock.acquire().await;
        self.begin_locked(expected, lock)
    }

    fn lock_for(&self, digest: &Digest) -> Arc<DigestLock> {
        let mut map = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.entry(digest.clone()).or_default().clone()
    }

    /// `lock` is held (acquired) by the caller; the returned value releases it.
    fn begin_locked(
        &self,
        expected: &Digest,
        lock: Arc<DigestLock>,
    ) -> Result<Option<Ingest>, StoreError> {
        let lock = InflightLock {
            map: self.inner.inflight.clone(),
            digest: expected.clone(),
            lock: Some(lock),
        };
        if self.contains(expected) {
            return Ok(None);
        }
        let ingest_dir = self.inner.root.join("ingest");
        let tmp = tempfile::Builder::new()
            .prefix(expected.hex())
            .tempfile_in(&ingest_dir)
            .map_err(io_err("create temp file in", &ingest_dir))?;
        Ok(Some(Ingest {
            expected: expected.clone(),
            target: self.blob_path(expected),
            tmp,
            async_file: None,
            hasher: Hasher::new(expected.algorithm()),
            size: 0,
            expected_size: None,
            _lock: lock,
        }))
    }

    /// Remove a blob. Removing an absent blob is not an error.
    pub fn remove(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.blob_path(digest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    /// All digests present.
    pub fn list(&self) -> Result<Vec<Digest>, StoreError> {
        let mut out = Vec::new();
        let blobs = self.inner.root.join("blobs");
        for alg in fs::read_dir(&blobs).map_err(io_err("list", &blobs))? {
            let alg = alg.map_err(io_err("list", &blobs))?;
            let alg_path = alg.path();
            for entry in fs::read_dir(&alg_path).map_err(io_err("list", &alg_path))? {
                let entry = entry.map_err(io_err("list", &alg_path))?;
                let s = format!(
                    "{}:{}",
                    alg.file_name().to_string_lossy(),
                    entry.file_name().to_string_lossy()
                );
                if let Ok(d) = s.parse() {
                    out.push(d);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Holds the per-digest lock: releases it and drops the map entry when the last user is gone.
struct InflightLock {
    map: Arc<LockMap>,
    digest: Digest,
    lock: Option<Arc<DigestLock>>,
}

impl Drop for InflightLock {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take() {
            lock.release();
        }
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map
            .get(&self.digest)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.digest);
        }
    }
}

/// A blob being written. Dropping it without [`Ingest::commit`] discards the partial content and
/// lets the next waiting writer try.
pub struct Ingest {
    expected: Digest,
    target: PathBuf,
    tmp: NamedTempFile,
    async_file: Option<tokio::fs::File>,
    hasher: Hasher,
    size: u64,
    expected_size: Option<u64>,
    _lock: InflightLock,
}

impl Ingest {
    /// The digest this blob must have.
    pub fn expected(&self) -> &Digest {
        &self.expected
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.size
    }

    fn path(&self) -> PathBuf {
        self.tmp.path().to_path_buf()
    }

    /// Fail as soon as more than `size` bytes arrive, and at commit if fewer did.
    pub fn expect_size(&mut self, size: u64) {
        self.expected_size = Some(size);
    }

    fn account(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        self.size += buf.len() as u64;
        if let Some(expected) = self.expected_size {
            if self.size > expected {
                return Err(StoreError::SizeMismatch {
                    digest: self.expected.clone(),
                    expected,
                    actual: self.size,
                });
            }
        }
        self.hasher.update(buf);
        Ok(())
    }

    /// Append bytes (blocking).
    pub fn write(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        self.account(buf)?;
        let path = self.path();
        self.tmp
            .as_file_mut()
            .write_all(buf)
            .map_err(io_err("write", &path))
    }

    /// Append bytes from async code (the file write runs on tokio's blocking pool).
    pub async fn write_async(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        self.account(buf)?;
        let path = self.path();
        if self.async_file.is_none() {
            let f = self.tmp.reopen().map_err(io_err("reopen", &path))?;
            let mut f = tokio::fs::File::from_std(f);
            tokio::io::AsyncSeekExt::seek(&mut f, io::SeekFrom::End(0))
                .await
                .map_err(io_err("seek", &path))?;
            self.async_file = Some(f);
        }
        if let Some(f) = self.async_file.as_mut() {
            f.write_all(buf).await.map_err(io_err("write", &path))?;
        }
        Ok(())
    }

    /// Verify and move the blob into place. Returns its size. On mismatch the partial file is
    /// removed and the blob stays absent. Blocking: call it via `spawn_blocking` from async code
    /// (after [`Ingest::flush_async`]).
    pub fn commit(mut self) -> Result<u64, StoreError> {
        let path = self.path();
        if let Some(expected) = self.expected_size {
            if self.size != expected {
                return Err(StoreError::SizeMismatch {
                    digest: self.expected,
                    expected,
                    actual: self.size,
                });
            }
        }
        let actual =
            std::mem::replace(&mut self.hasher, Hasher::new(self.expected.algorithm())).finish();
        if actual != self.expected {
            return Err(StoreError::DigestMismatch {
                expected: self.expected,
                actual,
            });
        }
        self.tmp
            .as_file()
            .sync_all()
            .map_err(io_err("sync", &path))?;
        if let Some(parent) = self.target.parent() {
            fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        let Ingest {
            tmp, target, size, ..
        } = self;
        tmp.persist(&target)
            .map_err(|e| io_err("rename into place", &target)(e.error))?;
        Ok(size)
    }

    /// Flush buffered async writes; call before [`Ingest::commit`] when using
    /// [`Ingest::write_async`].
    pub async fn flush_async(&mut self) -> Result<(), StoreError> {
        let path = self.path();
        if let Some(f) = self.async_file.as_mut() {
            f.flush().await.map_err(io_err("flush", &path))?;
            f.sync_all().await.map_err(io_err("sync", &path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;
    use std::time::Duration;

    fn ingest_is_empty(store: &ContentStore) -> bool {
        fs::read_dir(store.root().join("ingest")).unwrap().count() == 0
    }

    #[test]
    fn put_read_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let d = store.put(b"hello").unwrap();
        assert_eq!(
            d.to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert!(store.contains(&d));
        assert_eq!(store.read(&d).unwrap(), b"hello");
        assert_eq!(store.size(&d).unwrap(), 5);
        assert!(store
            .blob_path(&d)
            .ends_with(format!("blobs/sha256/{}", d.hex())));
        // Storing the same content again is deduplicated.
        assert_eq!(
            store.write_from(&d, &b"hello"[..]).unwrap(),
            Written::AlreadyPresent
        );
        assert_eq!(store.list().unwrap(), vec![d.clone()]);
        store.remove(&d).unwrap();
        assert!(!store.contains(&d));
        assert!(matches!(store.read(&d), Err(StoreError::NotFound(_))));
        assert!(ingest_is_empty(&store));
    }

    #[test]
    fn corrupted_blob_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let good = Digest::sha256(b"the real layer");
        let err = store.write_from(&good, &b"the fake layer"[..]).unwrap_err();
        match err {
            StoreError::DigestMismatch { expected, actual } => {
                assert_eq!(expected, good);
                assert_eq!(actual, Digest::sha256(b"the fake layer"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!store.contains(&good));
        assert!(store.list().unwrap().is_empty());
        assert!(ingest_is_empty(&store));
        // The correct content can still be written afterwards.
        assert_eq!(
            store.write_from(&good, &b"the real layer"[..]).unwrap(),
            Written::Stored { size: 14 }
        );
    }

    #[test]
    fn size_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let d = Digest::sha256(b"abcdef");
        let mut ingest = store.begin(&d).unwrap().unwrap();
        ingest.expect_size(3);
        assert!(matches!(
            ingest.write(b"abcdef"),
            Err(StoreError::SizeMismatch {
                expected: 3,
                actual: 6,
                ..
            })
        ));
        drop(ingest);
        let mut ingest = store.begin(&d).unwrap().unwrap();
        ingest.expect_size(10);
        ingest.write(b"abcdef").unwrap();
        assert!(matches!(
            ingest.commit(),
            Err(StoreError::SizeMismatch {
                expected: 10,
                actual: 6,
                ..
            })
        ));
        assert!(!store.contains(&d));
        assert!(ingest_is_empty(&store));
    }

    #[test]
    fn four_concurrent_writers_store_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let digest = Digest::sha256(&data);
        let barrier = Arc::new(Barrier::new(4));
        let stored = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (store, data, digest, barrier, stored) = (
                    store.clone(),
                    data.clone(),
                    digest.clone(),
                    barrier.clone(),
                    stored.clone(),
                );
                std::thread::spawn(move || {
                    barrier.wait();
                    if let Some(mut ingest) = store.begin(&digest).unwrap() {
                        stored.fetch_add(1, Ordering::SeqCst);
                        for chunk in data.chunks(100_000) {
                            ingest.write(chunk).unwrap();
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        ingest.commit().unwrap();
                    }
                    // Every writer sees the complete blob once begin/commit returned.
                    assert_eq!(store.read(&digest).unwrap().len(), 1_000_000);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(stored.load(Ordering::SeqCst), 1);
        assert_eq!(store.read(&digest).unwrap(), data);
        assert!(ingest_is_empty(&store));
        assert!(store.inner.inflight.lock().unwrap().is_empty());
    }

    #[test]
    fn failed_writer_lets_the_next_one_try() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let digest = Digest::sha256(b"payload");
        let first = store.begin(&digest).unwrap().unwrap();
        let s2 = store.clone();
        let d2 = digest.clone();
        let waiter = std::thread::spawn(move || s2.write_from(&d2, &b"payload"[..]).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "second writer must wait for the first"
        );
        drop(first); // the first writer fails without committing
        assert_eq!(waiter.join().unwrap(), Written::Stored { size: 7 });
        assert!(store.contains(&digest));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_and_thread_writers_share_one_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let digest = Digest::sha256(b"shared");
        // A thread holds the write; an async writer must wait, then find the blob present.
        let held = store.begin(&digest).unwrap().unwrap();
        let s2 = store.clone();
        let d2 = digest.clone();
        let waiter = tokio::spawn(async move { s2.begin_async(&d2).await.unwrap().is_none() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        let mut held = held;
        held.write(b"shared").unwrap();
        tokio::task::spawn_blocking(move || held.commit().unwrap())
            .await
            .unwrap();
        assert!(waiter.await.unwrap(), "async writer found the blob present");
        assert!(store.inner.inflight.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn async_writes_verify_too() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let digest = Digest::sha256(b"async payload");
        let mut ingest = store.begin_async(&digest).await.unwrap().unwrap();
        ingest.write_async(b"async ").await.unwrap();
        ingest.write_async(b"payload").await.unwrap();
        ingest.flush_async().await.unwrap();
        let size = tokio::task::spawn_blocking(move || ingest.commit())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(size, 13);
        assert_eq!(store.read(&digest).unwrap(), b"async payload");
        assert!(store.begin_async(&digest).await.unwrap().is_none());
    }
}
