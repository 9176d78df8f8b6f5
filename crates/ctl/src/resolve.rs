//! Resolving what the user typed (a unique id prefix, or a name) to one pod, container or image, the way
//! crictl and docker do. Pure: the candidates come from List* calls made elsewhere.

use std::fmt;

/// What a candidate is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pod,
    Container,
    Image,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Pod => "pod",
            Kind::Container => "container",
            Kind::Image => "image",
        })
    }
}

/// One object that a query may name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub kind: Kind,
    /// The full id (`sha256:` prefixes are ignored when matching).
    pub id: String,
    /// Names that match only exactly: pod and container metadata names, image tags.
    pub names: Vec<String>,
    /// A container's pod id.
    pub pod: Option<String>,
}

/// Why a query did not resolve to exactly one candidate.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// Nothing was asked for.
    #[error("an empty id matches nothing")]
    Empty,
    /// No id starts with the query and no name equals it.
    #[error("no {kinds} matches '{query}'")]
    NotFound { query: String, kinds: String },
    /// More than one candidate matches; `matches` lists them as `kind id`.
    #[error("'{query}' is ambiguous: it matches {}", .matches.join(", "))]
    Ambiguous { query: String, matches: Vec<String> },
}

/// Strips the digest algorithm, so that `sha256:ab12` and `ab12` name the same id.
pub fn bare_id(id: &str) -> &str {
    id.strip_prefix("sha256:").unwrap_or(id)
}

/// The 13-character id shown in tables.
pub fn short_id(id: &str) -> &str {
    let bare = bare_id(id);
    match bare.char_indices().nth(13) {
        Some((i, _)) => &bare[..i],
        None => bare,
    }
}

/// Finds the one candidate that `query` names: an exact id first, then a unique id prefix, then a unique
/// exact name. A name shared by one pod and only containers of that pod (what `hyperctl run --name x`
/// creates) names the pod. `kinds` describes what was searched, for the not-found message ("pod or
/// container").
pub fn resolve<'a>(
    query: &str,
    candidates: &'a [Candidate],
    kinds: &str,
) -> Result<&'a Candidate, ResolveError> {
    let q = bare_id(query.trim());
    if q.is_empty() {
        return Err(ResolveError::Empty);
    }
    let ambiguous = |found: Vec<&Candidate>| ResolveError::Ambiguous {
        query: query.to_string(),
        matches: found
            .iter()
            .map(|c| format!("{} {}", c.kind, short_id(&c.id)))
            .collect(),
    };
    let exact: Vec<&Candidate> = candidates.iter().filter(|c| bare_id(&c.id) == q).collect();
    match exact.len() {
        1 => return Ok(exact[0]),
        0 => {}
        _ => return Err(ambiguous(exact)),
    }
    let prefixed: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| bare_id(&c.id).starts_with(q))
        .collect();
    match prefixed.len() {
        1 => return Ok(prefixed[0]),
        0 => {}
        _ => return Err(ambiguous(prefixed)),
    }
    let named: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.names.iter().any(|n| n == query.trim()))
        .collect();
    let pods: Vec<&&Candidate> = named.iter().filter(|c| c.kind == Kind::Pod).collect();
    if let [pod] = pods.as_slice() {
        let own = |c: &&Candidate| c.kind == Kind::Container && c.pod.as_deref() == Some(&pod.id);
        if named.iter().all(|c| c.kind == Kind::Pod || own(c)) {
            return Ok(pod);
        }
    }
    match named.len() {
        1 => Ok(named[0]),
        0 => Err(ResolveError::NotFound {
            query: query.to_string(),
            kinds: kinds.to_string(),
        }),
        _ => Err(ambiguous(named)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(kind: Kind, id: &str, name: &str) -> Candidate {
        Candidate {
            kind,
            id: id.into(),
            names: vec![name.into()],
            pod: None,
        }
    }

    fn in_pod(id: &str, name: &str, pod: &str) -> Candidate {
        Candidate {
            pod: Some(pod.into()),
            ..c(Kind::Container, id, name)
        }
    }

    fn set() -> Vec<Candidate> {
        vec![
            c(Kind::Pod, "abc123", "web"),
            c(Kind::Pod, "abd999", "db"),
            c(Kind::Container, "ff00aa", "web"),
            c(Kind::Container, "ff01bb", "sidecar"),
            c(
                Kind::Image,
                "sha256:0123456789abcdef",
                "docker.io/library/busybox:latest",
            ),
        ]
    }

    #[test]
    fn unique_prefix() {
        let s = set();
        assert_eq!(resolve("abc", &s, "x").unwrap().id, "abc123");
        assert_eq!(resolve("ff01", &s, "x").unwrap().kind, Kind::Container);
        assert_eq!(resolve("abd999", &s, "x").unwrap().kind, Kind::Pod);
    }

    #[test]
    fn image_ids_with_or_without_algorithm() {
        let s = set();
        assert_eq!(resolve("0123", &s, "x").unwrap().kind, Kind::Image);
        assert_eq!(resolve("sha256:0123", &s, "x").unwrap().kind, Kind::Image);
    }

    #[test]
    fn ambiguous_prefix_lists_matches() {
        let s = set();
        match resolve("ab", &s, "x") {
            Err(ResolveError::Ambiguous { matches, .. }) => {
                assert_eq!(matches, vec!["pod abc123", "pod abd999"])
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            resolve("ff", &s, "x"),
            Err(ResolveError::Ambiguous { .. })
        ));
    }

    #[test]
    fn exact_id_beats_longer_prefix_match() {
        let s = vec![c(Kind::Pod, "abc", "p"), c(Kind::Container, "abcdef", "q")];
        assert_eq!(resolve("abc", &s, "x").unwrap().kind, Kind::Pod);
    }

    #[test]
    fn names_match_exactly_and_only_after_ids() {
        let s = set();
        assert_eq!(resolve("db", &s, "x").unwrap().id, "abd999");
        assert_eq!(resolve("sidecar", &s, "x").unwrap().id, "ff01bb");
        assert!(matches!(
            resolve("side", &s, "x"),
            Err(ResolveError::NotFound { .. })
        ));
        // "web" names a pod and a container
        assert!(matches!(
            resolve("web", &s, "x"),
            Err(ResolveError::Ambiguous { .. })
        ));
        assert_eq!(
            resolve("docker.io/library/busybox:latest", &s, "x")
                .unwrap()
                .kind,
            Kind::Image
        );
        // an id prefix wins over a name
        let s = vec![c(Kind::Pod, "dbf00", "a"), c(Kind::Pod, "x", "db")];
        assert_eq!(resolve("db", &s, "x").unwrap().id, "dbf00");
    }

    #[test]
    fn a_name_shared_by_a_pod_and_its_containers_names_the_pod() {
        let s = vec![
            c(Kind::Pod, "p1", "job"),
            in_pod("c1", "job", "p1"),
            in_pod("c2", "job", "p1"),
        ];
        assert_eq!(resolve("job", &s, "x").unwrap().id, "p1");
        // a container of another pod with that name makes it ambiguous again
        let mut s = s;
        s.push(in_pod("c3", "job", "p2"));
        assert!(matches!(
            resolve("job", &s, "x"),
            Err(ResolveError::Ambiguous { .. })
        ));
        // two pods of that name: ambiguous
        let s = vec![c(Kind::Pod, "p1", "job"), c(Kind::Pod, "p2", "job")];
        assert!(matches!(
            resolve("job", &s, "x"),
            Err(ResolveError::Ambiguous { .. })
        ));
    }

    #[test]
    fn not_found_and_empty() {
        let s = set();
        assert_eq!(
            resolve("zz", &s, "pod or container")
                .unwrap_err()
                .to_string(),
            "no pod or container matches 'zz'"
        );
        assert_eq!(resolve("", &s, "x"), Err(ResolveError::Empty));
        assert_eq!(resolve("sha256:", &s, "x"), Err(ResolveError::Empty));
        assert!(resolve("abc", &[], "x").is_err());
    }

    #[test]
    fn short_ids() {
        assert_eq!(short_id("sha256:0123456789abcdef0123"), "0123456789abc");
        assert_eq!(short_id("abc"), "abc");
        assert_eq!(short_id("ééééééééééééééé"), "ééééééééééééé");
    }
}
