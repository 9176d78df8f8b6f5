//! The parts of OCI / Docker v2 schema 2 manifests and indexes the image store reads.

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, DigestError};

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker v2 schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Every manifest type a pull accepts.
pub const ACCEPTED: &[&str] = &[OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

/// Errors from reading a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not valid JSON of the expected shape.
    #[error("malformed manifest")]
    Json(#[from] serde_json::Error),
    /// A descriptor's digest is invalid.
    #[error("manifest has an invalid digest")]
    Digest(#[from] DigestError),
    /// Neither an index nor an image manifest.
    #[error("unsupported manifest media type `{0}`")]
    UnsupportedMediaType(String),
    /// An image manifest without config.
    #[error("image manifest has no config descriptor")]
    NoConfig,
}

/// A platform in an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture (`amd64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// Variant (`v8`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// Digest of the referenced content.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Platform (index entries only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations (`org.opencontainers.image.ref.name` in OCI layouts).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

impl Descriptor {
    /// The parsed digest.
    pub fn digest(&self) -> Result<Digest, DigestError> {
        self.digest.parse()
    }
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// A parsed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    /// An index / manifest list.
    Index(Vec<Descriptor>),
    /// A single-platform image manifest.
    Image {
        /// The config blob.
        config: Descriptor,
        /// Layers, bottom first.
        layers: Vec<Descriptor>,
    },
}

impl Manifest {
    /// Parse manifest JSON; the kind comes from `mediaType`, or from the fields present.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let raw: Raw = serde_json::from_slice(bytes)?;
        let is_index = match raw.media_type.as_deref() {
            Some(OCI_INDEX | DOCKER_LIST) => true,
            Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
            Some(other) => return Err(ManifestError::UnsupportedMediaType(other.to_string())),
            None => raw.manifests.is_some(),
        };
        if is_index {
            let manifests = raw.manifests.unwrap_or_default();
            for m in &manifests {
                m.digest()?;
            }
            return Ok(Manifest::Index(manifests));
        }
        let config = raw.config.ok_or(ManifestError::NoConfig)?;
        config.digest()?;
        let layers = raw.layers.unwrap_or_default();
        for l in &layers {
            l.digest()?;
        }
        Ok(Manifest::Image { config, layers })
    }
}

/// The linux/amd64 entry of an index, if any.
pub fn select_linux_amd64(manifests: &[Descriptor]) -> Option<&Descriptor> {
    manifests.iter().find(|m| {
        m.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn parses_docker_and_oci_manifests() {
        let docker = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
            "config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{D1}","size":10}},
            "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{D2}","size":20}}]}}"#
        );
        let Manifest::Image { config, layers } = Manifest::parse(docker.as_bytes()).unwrap() else {
            panic!("expected an image manifest")
        };
        assert_eq!(config.digest, D1);
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].size, 20);
        // OCI manifests may omit mediaType.
        let oci =
            format!(r#"{{"schemaVersion":2,"config":{{"digest":"{D1}","size":1}},"layers":[]}}"#);
        assert!(matches!(
            Manifest::parse(oci.as_bytes()).unwrap(),
            Manifest::Image { .. }
        ));
    }

    #[test]
    fn index_selects_linux_amd64() {
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":2,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let Manifest::Index(entries) = Manifest::parse(index.as_bytes()).unwrap() else {
            panic!("expected an index")
        };
        assert_eq!(select_linux_amd64(&entries).unwrap().digest, D2);
        assert!(select_linux_amd64(&entries[..1]).is_none());
    }

    #[test]
    fn rejects_bad_manifests() {
        assert!(matches!(Manifest::parse(b"{"), Err(ManifestError::Json(_))));
        assert!(matches!(
            Manifest::parse(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v1+json"}"#
            ),
            Err(ManifestError::UnsupportedMediaType(_))
        ));
        assert!(matches!(
            Manifest::parse(br#"{"schemaVersion":2,"layers":[]}"#),
            Err(ManifestError::NoConfig)
        ));
        assert!(matches!(
            Manifest::parse(br#"{"config":{"digest":"sha256:zz","size":1}}"#),
            Err(ManifestError::Digest(_))
        ));
    }
}
