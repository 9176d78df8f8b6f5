//! Image store for Hypernetes: every pod's rootfs comes from here.
//!
//! Data flow, one module per step:
//!
//! | step | module | what |
//! | --- | --- | --- |
//! | name | [`mod@reference`] | `busybox` -> `docker.io/library/busybox:latest`, validation |
//! | fetch | [`pull`] | OCI distribution API via `oci-client`: index -> linux/amd64, auth, insecure, mirrors, progress |
//! | offline | [`layout`] | OCI layout directories, `docker save` / tarred layout archives |
//! | keep | [`store`] | blobs by digest, verified while written, atomic, one writer per digest |
//! | read | [`manifest`], [`config`] | manifests, indexes and the runtime config |
//! | flatten | [`unpack`] | gzip/zstd/plain layers, whiteouts, links, devices, xattrs, no path escapes |
//! | disk | [`disk`], [`rootfs`] | `mkfs.ext4 -d` of the flattened tree, cached by image id |
//! | records | [`images`] | CRI view: tags, digests, config, list/status/remove, GC, usage |
//!
//! Blocking work (hashing to disk, unpacking, mkfs) is synchronous; async callers run it through
//! `spawn_blocking` (as [`images::ImageStore`] does for imports).

pub mod config;
pub mod digest;
pub mod disk;
pub mod images;
pub mod layout;
pub mod manifest;
pub mod pull;
pub mod reference;
pub mod rootfs;
pub mod store;
pub mod unpack;

pub use config::ImageConfig;
pub use digest::{Algorithm, Digest, DigestError};
pub use disk::{build_ext4, Disk, DiskCache, DiskError};
pub use images::{GcStats, ImageError, ImageRecord, ImageStore};
pub use layout::{import_archive, import_oci_layout, LayoutError};
pub use manifest::{Descriptor, Manifest, ManifestError, Platform};
pub use pull::{Auth, AuthError, Layer, PullConfig, PullError, PullProgress, PulledImage, Puller};
pub use reference::{Reference, ReferenceError};
pub use rootfs::{rootfs_disk, unpack_layers, RootfsError};
pub use store::{ContentStore, Ingest, StoreError, Written};
pub use unpack::{
    apply_layer, apply_layer_with, Compression, LayerStats, UnpackError, UnpackOptions,
};
