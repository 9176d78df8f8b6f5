//! From pulled layers in the content store to a flattened tree and a cached ext4 rootfs disk.

use std::path::Path;

use crate::disk::{Disk, DiskCache, DiskError};
use crate::pull::{Layer, PulledImage};
use crate::store::{ContentStore, StoreError};
use crate::unpack::{self, Compression, UnpackError, UnpackOptions};

/// Errors from building a rootfs.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A layer blob could not be read.
    #[error("reading layer blob failed")]
    Store(#[from] StoreError),
    /// A layer could not be applied.
    #[error("applying layer {digest} failed")]
    Unpack {
        /// The layer.
        digest: String,
        /// The cause.
        #[source]
        source: UnpackError,
    },
    /// The disk could not be built.
    #[error("building the rootfs disk failed")]
    Disk(#[from] DiskError),
}

/// Apply `layers` (bottom first) from `store` onto `root`.
pub fn unpack_layers(
    store: &ContentStore,
    layers: &[Layer],
    root: &Path,
    opts: &UnpackOptions,
) -> Result<(), RootfsError> {
    for layer in layers {
        let blob = store.open_blob(&layer.digest)?;
        let wrap = |source| RootfsError::Unpack {
            digest: layer.digest.to_string(),
            source,
        };
        match Compression::from_media_type(&layer.media_type) {
            Some(c) => unpack::apply_layer_with(root, blob, c, opts).map_err(wrap)?,
            // Unknown or missing media type: go by the magic bytes.
            None => unpack::apply_layer(root, blob, opts).map_err(wrap)?,
        };
    }
    Ok(())
}

/// The rootfs disk of `image`, cached by its config digest (the image id).
pub fn rootfs_disk(
    store: &ContentStore,
    cache: &DiskCache,
    image: &PulledImage,
) -> Result<Disk, RootfsError> {
    cache.get_or_build(&image.config_digest, |tree| {
        unpack_layers(store, &image.layers, tree, &UnpackOptions::default())
    })
}
