//! Image references (`busybox`, `busybox:1.36`, `host:5000/ns/app@sha256:...`) with Docker Hub defaults.

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

/// The registry used when a reference names none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag used when a reference has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// Errors from parsing an image reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// The reference is empty.
    #[error("image reference is empty")]
    Empty,
    /// Bad registry host.
    #[error("invalid registry host `{0}`")]
    InvalidRegistry(String),
    /// A path component breaks the repository grammar.
    #[error("invalid repository path component `{component}` in `{reference}` (lowercase letters, digits and single separators . _ __ - only)")]
    InvalidComponent {
        /// The offending component.
        component: String,
        /// The whole reference.
        reference: String,
    },
    /// The repository name has uppercase letters.
    #[error("repository name `{0}` must be lowercase")]
    Uppercase(String),
    /// The repository name is too long.
    #[error("repository name `{0}` is longer than 255 characters")]
    NameTooLong(String),
    /// Bad tag.
    #[error("invalid tag `{0}` (at most 128 of [A-Za-z0-9_.-], not starting with . or -)")]
    InvalidTag(String),
    /// Bad digest.
    #[error("invalid digest in image reference")]
    InvalidDigest(#[from] DigestError),
}

/// A fully qualified image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parse `s`, applying the Docker Hub defaults (`docker.io`, `library/`, `:latest`).
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        s.parse()
    }

    /// The registry host, with port if any (`docker.io`, `localhost:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path (`library/busybox`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any. A reference with neither tag nor digest gets `latest`.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if any.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// `registry/repository`, the name without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The same reference pinned to `digest`, without tag (`name@digest`: a CRI repo digest).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn looks_like_registry(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost"
}

fn valid_registry(host: &str) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        // IPv6 literal: [::1]:5000
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(port) => ("x", Some(port)),
                None => return false,
            },
        }
    } else {
        match host.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        if port.parse::<u32>().map_or(true, |p| p > 65535) {
            return false;
        }
    }
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d.parse::<Digest>()?)),
            None => (s, None),
        };
        // A tag is a ':' after the last '/'.
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(colon) if last_slash.is_none_or(|sl| colon > sl) => {
                (&rest[..colon], Some(&rest[colon + 1..]))
            }
            _ => (rest, None),
        };
        if name.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (registry, mut repository) = match name.split_once('/') {
            Some((first, path)) if looks_like_registry(first) => {
                if !valid_registry(first) {
                    return Err(ReferenceError::InvalidRegistry(first.to_string()));
                }
                (first.to_string(), path.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" || registry == "registry-1.docker.io" {
            DEFAULT_REGISTRY.to_string()
        } else {
            registry
        };
        if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        if repository.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ReferenceError::Uppercase(repository));
        }
        for component in repository.split('/') {
            if !valid_component(component) {
                return Err(ReferenceError::InvalidComponent {
                    component: component.to_string(),
                    reference: s.to_string(),
                });
            }
        }
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(ReferenceError::NameTooLong(repository));
        }
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(ReferenceError::InvalidTag(t.to_string()));
            }
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn full(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    #[test]
    fn docker_hub_defaults() {
        assert_eq!(full("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(full("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(full("bitnami/redis"), "docker.io/bitnami/redis:latest");
        assert_eq!(
            full("docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            full("index.docker.io/library/busybox:1"),
            "docker.io/library/busybox:1"
        );
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/busybox");
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.digest(), None);
        assert_eq!(r.name(), "docker.io/library/busybox");
    }

    #[test]
    fn registry_with_port_and_digest() {
        let r = Reference::parse(&format!("host:5000/ns/app@{D}")).unwrap();
        assert_eq!(r.registry(), "host:5000");
        assert_eq!(r.repository(), "ns/app");
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().to_string(), D);
        assert_eq!(r.to_string(), format!("host:5000/ns/app@{D}"));
    }

    #[test]
    fn tag_and_digest_together() {
        let r = Reference::parse(&format!("localhost:5000/app:v1@{D}")).unwrap();
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.digest().unwrap().to_string(), D);
        assert_eq!(r.with_digest(r.digest().unwrap().clone()).tag(), None);
    }

    #[test]
    fn registry_detection() {
        assert_eq!(
            Reference::parse("localhost/app").unwrap().registry(),
            "localhost"
        );
        assert_eq!(
            Reference::parse("quay.io/coreos/etcd:v3")
                .unwrap()
                .registry(),
            "quay.io"
        );
        assert_eq!(
            Reference::parse("127.0.0.1:5000/a").unwrap().repository(),
            "a"
        );
        assert_eq!(
            Reference::parse("[::1]:5000/a").unwrap().registry(),
            "[::1]:5000"
        );
        // "ns" has no dot, colon or localhost: it is a Docker Hub namespace.
        assert_eq!(Reference::parse("ns/app").unwrap().registry(), "docker.io");
    }

    #[test]
    fn separators_in_components() {
        assert!(Reference::parse("ns/a.b_c__d---e/f-g").is_ok());
        for bad in ["a..b", "a___b", "-a", "a-", "a_.b", "_a"] {
            assert!(
                matches!(
                    Reference::parse(bad),
                    Err(ReferenceError::InvalidComponent { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn errors_are_specific() {
        assert_eq!(Reference::parse(""), Err(ReferenceError::Empty));
        assert_eq!(Reference::parse(":tag"), Err(ReferenceError::Empty));
        assert!(matches!(
            Reference::parse("BusyBox"),
            Err(ReferenceError::Uppercase(_))
        ));
        assert!(matches!(
            Reference::parse("busybox:"),
            Err(ReferenceError::InvalidTag(_))
        ));
        assert!(matches!(
            Reference::parse("busybox:-x"),
            Err(ReferenceError::InvalidTag(_))
        ));
        assert!(matches!(
            Reference::parse(&format!("busybox:{}", "a".repeat(129))),
            Err(ReferenceError::InvalidTag(_))
        ));
        assert!(matches!(
            Reference::parse("busybox@sha256:abc"),
            Err(ReferenceError::InvalidDigest(_))
        ));
        assert!(matches!(
            Reference::parse("host:99999/app"),
            Err(ReferenceError::InvalidRegistry(_))
        ));
        assert!(matches!(
            Reference::parse("ho_st.io/app"),
            Err(ReferenceError::InvalidRegistry(_))
        ));
        assert!(matches!(
            Reference::parse("a//b"),
            Err(ReferenceError::InvalidComponent { .. })
        ));
        assert!(matches!(
            Reference::parse(&format!("ns/{}", "a".repeat(260))),
            Err(ReferenceError::NameTooLong(_))
        ));
    }
}
