//! Pull images over the OCI distribution API (`oci-client`) into the [`ContentStore`].
//!
//! Manifests are fetched raw and checked against their digest here (and against the reference's
//! digest, when it has one); indexes and manifest lists are resolved to linux/amd64. Config and
//! layer blobs stream into the store, which verifies each digest and size before the blob becomes
//! visible; blobs already present are not fetched again, and concurrent pulls of the same blob
//! wait for the one download.

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::Client;

use crate::digest::{Digest, DigestError};
use crate::manifest::{self, Descriptor, Manifest, ManifestError};
use crate::reference::Reference;
use crate::store::{ContentStore, StoreError};

/// Errors from a pull.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The registry refused or failed a request.
    #[error("registry request for {reference} failed")]
    Registry {
        /// The image being pulled.
        reference: String,
        /// The cause.
        #[source]
        source: OciDistributionError,
    },
    /// Reading the blob stream failed.
    #[error("downloading {digest} failed")]
    Download {
        /// The blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The manifest does not hash to the digest it was fetched by or announced with.
    #[error("manifest digest mismatch: expected {expected}, got {actual}")]
    ManifestDigestMismatch {
        /// The expected digest.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },
    /// The manifest could not be read.
    #[error("bad manifest for {reference}")]
    Manifest {
        /// The image.
        reference: String,
        /// The cause.
        #[source]
        source: ManifestError,
    },
    /// The index has no linux/amd64 image.
    #[error("{0} has no linux/amd64 image")]
    NoMatchingPlatform(String),
    /// An index points to another index.
    #[error("index for {0} points to another index")]
    NestedIndex(String),
    /// A digest from the registry is invalid.
    #[error("registry sent an invalid digest")]
    Digest(#[from] DigestError),
    /// Storing content failed (including digest or size mismatches).
    #[error("storing pulled content failed")]
    Store(#[from] StoreError),
    /// A blocking task panicked or was cancelled.
    #[error("blocking task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// Registry credentials (the CRI AuthConfig forms that map onto HTTP auth).
#[derive(Clone, Default)]
pub enum Auth {
    /// No credentials.
    #[default]
    Anonymous,
    /// Username and password (also what a CRI `auth` field decodes to).
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// A bearer / identity / registry token.
    Bearer(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Anonymous => write!(f, "Anonymous"),
            Auth::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Auth::Bearer(_) => write!(f, "Bearer(<redacted>)"),
        }
    }
}

/// A CRI `AuthConfig` that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The `auth` field is not base64 of `user:password`.
    #[error("auth field is not base64-encoded `username:password`")]
    BadAuthField,
}

impl Auth {
    /// From the fields of a CRI `AuthConfig`: a registry token or identity token wins, then
    /// username/password, then the `auth` field (base64 `user:password`); all empty is anonymous.
    pub fn from_cri(
        username: &str,
        password: &str,
        auth: &str,
        identity_token: &str,
        registry_token: &str,
    ) -> Result<Auth, AuthError> {
        use base64::Engine as _;
        if !registry_token.is_empty() {
            return Ok(Auth::Bearer(registry_token.to_string()));
        }
        if !identity_token.is_empty() {
            return Ok(Auth::Bearer(identity_token.to_string()));
        }
        if !username.is_empty() || !password.is_empty() {
            return Ok(Auth::Basic {
                username: username.to_string(),
                password: password.to_string(),
            });
        }
        if !auth.is_empty() {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| AuthError::BadAuthField)?;
            let s = String::from_utf8(decoded).map_err(|_| AuthError::BadAuthField)?;
            let (u, p) = s.split_once(':').ok_or(AuthError::BadAuthField)?;
            return Ok(Auth::Basic {
                username: u.to_string(),
                password: p.to_string(),
            });
        }
        Ok(Auth::Anonymous)
    }

    fn to_registry_auth(&self) -> RegistryAuth {
        match self {
            Auth::Anonymous => RegistryAuth::Anonymous,
            Auth::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Auth::Bearer(t) => RegistryAuth::Bearer(t.clone()),
        }
    }
}

/// Puller settings.
#[derive(Debug, Clone, Default)]
pub struct PullConfig {
    /// Registries (`host:port`) spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Mirrors per registry (`docker.io` -> `["mirror.local:5000"]`), tried in order before the
    /// registry itself. The image keeps its original name.
    pub mirrors: std::collections::BTreeMap<String, Vec<String>>,
}

/// Progress of a pull, published through a `tokio::sync::watch` channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullProgress {
    /// Blobs (config and layers) the image has.
    pub blobs_total: usize,
    /// Blobs present so far (downloaded or already there).
    pub blobs_done: usize,
    /// Bytes of all blobs.
    pub bytes_total: u64,
    /// Bytes present so far.
    pub bytes_done: u64,
}

/// A layer of a pulled image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layer {
    /// Digest of the (compressed) blob.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
}

/// What a pull produced; every digest named here is in the content store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The reference pulled.
    pub reference: Reference,
    /// Digest of the index / manifest list the reference resolved to, if any.
    pub index_digest: Option<Digest>,
    /// Digest of the platform image manifest.
    pub manifest_digest: Digest,
    /// Digest of the image config (the image id).
    pub config_digest: Digest,
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    /// Bytes downloaded by this pull (blobs already present are not counted).
    pub downloaded_bytes: u64,
}

impl PulledImage {
    /// The repo digest CRI reports: the digest the reference resolves to (the index's if any).
    pub fn repo_digest(&self) -> Digest {
        self.index_digest
            .clone()
            .unwrap_or_else(|| self.manifest_digest.clone())
    }

    /// Compressed size of the layers.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// oci-client checks a manifest fetched by digest itself: report its mismatch as ours.
fn manifest_error(name: &str, source: OciDistributionError) -> PullError {
    if let OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
        expected,
        actual,
    }) = &source
    {
        if let (Ok(expected), Ok(actual)) = (expected.parse(), actual.parse()) {
            return PullError::ManifestDigestMismatch { expected, actual };
        }
    }
    PullError::Registry {
        reference: name.to_string(),
        source,
    }
}

/// Pulls images into a content store.
pub struct Puller {
    /// Shared by anonymous pulls (keeps connections and anonymous tokens).
    client: Client,
    protocol: ClientProtocol,
    mirrors: std::collections::BTreeMap<String, Vec<String>>,
    store: ContentStore,
}

/// How many blobs of one image download at once.
const PARALLEL_BLOBS: usize = 3;

impl Puller {
    /// A puller writing into `store`.
    pub fn new(store: ContentStore, config: &PullConfig) -> Puller {
        let protocol = if config.insecure_registries.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(config.insecure_registries.clone())
        };
        Puller {
            client: Self::make_client(&protocol),
            protocol,
            mirrors: config.mirrors.clone(),
            store,
        }
    }

    fn make_client(protocol: &ClientProtocol) -> Client {
        Client::new(ClientConfig {
            protocol: protocol.clone(),
            ..Default::default()
        })
    }

    /// The store pulls write into.
    pub fn store(&self) -> &ContentStore {
        &self.store
    }

    /// Pull `reference` (resolving an index to linux/amd64) with `auth`.
    pub async fn pull(&self, reference: &Reference, auth: &Auth) -> Result<PulledImage, PullError> {
        self.pull_with_progress(reference, auth, None).await
    }

    /// [`Puller::pull`], publishing progress on `progress`.
    pub async fn pull_with_progress(
        &self,
        reference: &Reference,
        auth: &Auth,
        progress: Option<&tokio::sync::watch::Sender<PullProgress>>,
    ) -> Result<PulledImage, PullError> {
        // oci-client keeps the first credentials it sees per registry: a pull with credentials
        // gets a client of its own so that each pull is checked with exactly its own.
        let own;
        let client = match auth {
            Auth::Anonymous => &self.client,
            _ => {
                own = Self::make_client(&self.protocol);
                &own
            }
        };
        let mut endpoints: Vec<&str> = self
            .mirrors
            .get(reference.registry())
            .map(|m| m.iter().map(String::as_str).collect())
            .unwrap_or_default();
        endpoints.push(reference.registry());
        let mut last = None;
        for (i, endpoint) in endpoints.iter().enumerate() {
            let ctx = PullCtx {
                client,
                store: &self.store,
                progress,
            };
            match Self::pull_with(ctx, reference, auth, endpoint).await {
                Ok(img) => return Ok(img),
                Err(e) if i + 1 < endpoints.len() => {
                    log::warn!("pull of {reference} from mirror {endpoint} failed: {e}");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| PullError::NoMatchingPlatform(reference.to_string())))
    }

    async fn pull_with(
        ctx: PullCtx<'_>,
        reference: &Reference,
        auth: &Auth,
        endpoint: &str,
    ) -> Result<PulledImage, PullError> {
        let auth = auth.to_registry_auth();
        let oci_ref = match (reference.digest(), reference.tag()) {
            (Some(d), _) => oci_client::Reference::with_digest(
                endpoint.to_string(),
                reference.repository().to_string(),
                d.to_string(),
            ),
            (None, tag) => oci_client::Reference::with_tag(
                endpoint.to_string(),
                reference.repository().to_string(),
                tag.unwrap_or(crate::reference::DEFAULT_TAG).to_string(),
            ),
        };
        let name = reference.to_string();
        let (bytes, digest) = ctx
            .fetch_manifest(&oci_ref, &auth, reference.digest(), &name)
            .await?;
        let parsed = Manifest::parse(&bytes).map_err(|source| PullError::Manifest {
            reference: name.clone(),
            source,
        })?;
        let (index_digest, manifest_digest, config, layers) = match parsed {
            Manifest::Image { config, layers } => (None, digest, config, layers),
            Manifest::Index(entries) => {
                let entry = manifest::select_linux_amd64(&entries)
                    .ok_or_else(|| PullError::NoMatchingPlatform(name.clone()))?;
                let want = entry.digest()?;
                let by_digest = oci_ref.clone_with_digest(want.to_string());
                let (bytes, mdigest) = ctx
                    .fetch_manifest(&by_digest, &auth, Some(&want), &name)
                    .await?;
                match Manifest::parse(&bytes).map_err(|source| PullError::Manifest {
                    reference: name.clone(),
                    source,
                })? {
                    Manifest::Image { config, layers } => (Some(digest), mdigest, config, layers),
                    Manifest::Index(_) => return Err(PullError::NestedIndex(name)),
                }
            }
        };
        if let Some(p) = ctx.progress {
            p.send_modify(|p| {
                p.blobs_total = layers.len() + 1;
                p.bytes_total = config.size + layers.iter().map(|l| l.size).sum::<u64>();
            });
        }
        let mut out_layers = Vec::with_capacity(layers.len());
        for layer in &layers {
            out_layers.push(Layer {
                digest: layer.digest()?,
                media_type: layer.media_type.clone(),
                size: layer.size,
            });
        }
        let mut fetches = Vec::with_capacity(layers.len() + 1);
        for desc in std::iter::once(&config).chain(layers.iter()) {
            fetches.push(ctx.fetch_blob(&oci_ref, desc, &name));
        }
        let sizes: Vec<u64> = futures_util::stream::iter(fetches)
            .buffered(PARALLEL_BLOBS)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let downloaded = sizes.iter().sum();
        Ok(PulledImage {
            reference: reference.clone(),
            index_digest,
            manifest_digest,
            config_digest: config.digest()?,
            layers: out_layers,
            downloaded_bytes: downloaded,
        })
    }
}

#[derive(Clone, Copy)]
struct PullCtx<'a> {
    client: &'a Client,
    store: &'a ContentStore,
    progress: Option<&'a tokio::sync::watch::Sender<PullProgress>>,
}

impl PullCtx<'_> {
    /// Fetch a manifest, verify it against `expected` (when known) and store it.
    async fn fetch_manifest(
        &self,
        oci_ref: &oci_client::Reference,
        auth: &RegistryAuth,
        expected: Option<&Digest>,
        name: &str,
    ) -> Result<(Vec<u8>, Digest), PullError> {
        let (bytes, _registry_digest) = self
            .client
            .pull_manifest_raw(oci_ref, auth, manifest::ACCEPTED)
            .await
            .map_err(|source| manifest_error(name, source))?;
        let bytes = bytes.to_vec();
        let algorithm = expected.map_or(crate::digest::Algorithm::Sha256, |d| d.algorithm());
        let actual = Digest::compute(algorithm, &bytes);
        if let Some(expected) = expected {
            if *expected != actual {
                return Err(PullError::ManifestDigestMismatch {
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        let store = self.store.clone();
        let data = bytes.clone();
        let d = actual.clone();
        tokio::task::spawn_blocking(move || store.write_from(&d, &data[..])).await??;
        Ok((bytes, actual))
    }

    /// Download one blob into the store unless present. Returns the bytes downloaded.
    async fn fetch_blob(
        &self,
        oci_ref: &oci_client::Reference,
        desc: &Descriptor,
        name: &str,
    ) -> Result<u64, PullError> {
        let digest = desc.digest()?;
        let Some(mut ingest) = self.store.begin_async(&digest).await? else {
            self.advance(desc.size, true);
            return Ok(0);
        };
        ingest.expect_size(desc.size);
        let oci_desc = OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: i64::try_from(desc.size).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let mut stream = self
            .client
            .pull_blob_stream(oci_ref, &oci_desc)
            .await
            .map_err(|source| PullError::Registry {
                reference: name.to_string(),
                source,
            })?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| PullError::Download {
                digest: digest.clone(),
                source,
            })?;
            ingest.write_async(&chunk).await?;
            self.advance(chunk.len() as u64, false);
        }
        ingest.flush_async().await?;
        let size = tokio::task::spawn_blocking(move || ingest.commit()).await??;
        self.advance(0, true);
        Ok(size)
    }

    fn advance(&self, bytes: u64, blob_done: bool) {
        if let Some(p) = self.progress {
            p.send_modify(|p| {
                p.bytes_done += bytes;
                p.blobs_done += usize::from(blob_done);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(a: &Auth) -> Option<(&str, &str)> {
        match a {
            Auth::Basic { username, password } => Some((username, password)),
            _ => None,
        }
    }

    #[test]
    fn cri_auth_config_mapping() {
        assert!(matches!(
            Auth::from_cri("", "", "", "", ""),
            Ok(Auth::Anonymous)
        ));
        let a = Auth::from_cri("u", "p", "", "", "").unwrap();
        assert_eq!(basic(&a), Some(("u", "p")));
        // base64("alice:pa:ss") — the password may contain ':'.
        let a = Auth::from_cri("", "", "YWxpY2U6cGE6c3M=", "", "").unwrap();
        assert_eq!(basic(&a), Some(("alice", "pa:ss")));
        assert_eq!(
            Auth::from_cri("", "", "not base64!", "", "").err(),
            Some(AuthError::BadAuthField)
        );
        assert_eq!(
            Auth::from_cri("", "", "bm9jb2xvbg==", "", "").err(),
            Some(AuthError::BadAuthField)
        );
        assert!(
            matches!(Auth::from_cri("u", "p", "", "idtok", ""), Ok(Auth::Bearer(t)) if t == "idtok")
        );
        assert!(
            matches!(Auth::from_cri("u", "p", "", "idtok", "regtok"), Ok(Auth::Bearer(t)) if t == "regtok")
        );
    }
}
