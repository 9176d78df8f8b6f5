//! The runtime-relevant fields of an image config (OCI / Docker `config` object).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What CRI's ImageSpec / ImageStatus needs from an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Default arguments.
    pub cmd: Vec<String>,
    /// Environment, `KEY=value`.
    pub env: Vec<String>,
    /// Working directory.
    pub working_dir: String,
    /// User (`uid`, `uid:gid`, or a name).
    pub user: String,
    /// Exposed ports (`80/tcp`), sorted.
    pub exposed_ports: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Stop signal, if set.
    pub stop_signal: String,
    /// Architecture (`amd64`).
    pub architecture: String,
    /// OS (`linux`).
    pub os: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawImage {
    architecture: String,
    os: String,
    config: Option<RawConfig>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct RawConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    labels: Option<BTreeMap<String, String>>,
    stop_signal: Option<String>,
}

impl ImageConfig {
    /// Parse config blob JSON.
    pub fn parse(bytes: &[u8]) -> Result<ImageConfig, serde_json::Error> {
        let raw: RawImage = serde_json::from_slice(bytes)?;
        let c = raw.config.unwrap_or_default();
        Ok(ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
            exposed_ports: c.exposed_ports.unwrap_or_default().into_keys().collect(),
            labels: c.labels.unwrap_or_default(),
            stop_signal: c.stop_signal.unwrap_or_default(),
            architecture: raw.architecture,
            os: raw.os,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_style_config() {
        let c = ImageConfig::parse(
            br#"{"architecture":"amd64","os":"linux","config":{
              "Entrypoint":["/init"],"Cmd":["-v"],"Env":["PATH=/bin","A=b"],
              "WorkingDir":"/srv","User":"1000:1000",
              "ExposedPorts":{"443/tcp":{},"80/tcp":{}},
              "Labels":{"org.example":"x"},"StopSignal":"SIGINT"},
              "rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        assert_eq!(c.entrypoint, vec!["/init"]);
        assert_eq!(c.cmd, vec!["-v"]);
        assert_eq!(c.env, vec!["PATH=/bin", "A=b"]);
        assert_eq!(c.working_dir, "/srv");
        assert_eq!(c.user, "1000:1000");
        assert_eq!(c.exposed_ports, vec!["443/tcp", "80/tcp"]);
        assert_eq!(c.labels.get("org.example").map(String::as_str), Some("x"));
        assert_eq!(c.stop_signal, "SIGINT");
        assert_eq!((c.architecture.as_str(), c.os.as_str()), ("amd64", "linux"));
    }

    #[test]
    fn null_and_missing_fields_are_empty() {
        let c = ImageConfig::parse(br#"{"config":{"Cmd":null,"Env":null}}"#).unwrap();
        assert_eq!(c, ImageConfig::default());
        assert!(ImageConfig::parse(b"[1]").is_err());
    }
}
