//! Network configurations: finding the one to use in the config directory, parsing `.conflist`
//! and single-plugin `.conf`/`.json` files, and building each plugin's stdin.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::CniError;

/// CNI spec versions whose results this crate reads (0.3.0 through 1.1.0 share the result
/// layout it needs: interfaces, ips with an interface index, routes, dns).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// File name extensions of configuration files, as libcni reads them.
const EXTENSIONS: &[&str] = &["conflist", "conf", "json"];

/// A network configuration list: a name, a spec version and the chain of plugins.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfigList {
    /// The network name (`name`), injected into every plugin's configuration.
    pub name: String,
    /// The spec version (`cniVersion`), injected into every plugin's configuration.
    pub cni_version: String,
    /// The plugins in ADD order.
    pub plugins: Vec<PluginConfig>,
    /// The file it came from.
    pub source: PathBuf,
}

/// One plugin of a list: its `type` and the rest of its configuration as written.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// The plugin binary's name (`type`).
    pub plugin_type: String,
    raw: Map<String, Value>,
}

impl PluginConfig {
    fn parse(raw: Map<String, Value>) -> Result<PluginConfig, String> {
        let plugin_type = match raw.get("type") {
            Some(Value::String(t)) => t.clone(),
            Some(_) => return Err("plugin \"type\" is not a string".into()),
            None => return Err("plugin has no \"type\"".into()),
        };
        if plugin_type.is_empty()
            || plugin_type == "."
            || plugin_type == ".."
            || plugin_type.contains(['/', '\0'])
        {
            return Err(format!("invalid plugin type {plugin_type:?}"));
        }
        Ok(PluginConfig { plugin_type, raw })
    }

    /// Whether the plugin declares `capabilities: {"<name>": true}`.
    pub fn has_capability(&self, name: &str) -> bool {
        self.raw
            .get("capabilities")
            .and_then(|c| c.get(name))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// Parses `major.minor.patch`.
pub(crate) fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let version = (it.next()??, it.next()??, it.next().unwrap_or(Some(0))?);
    it.next().is_none().then_some(version)
}

impl NetworkConfigList {
    /// Parses a configuration list (`{"name", "cniVersion", "plugins": [...]}`).
    pub fn from_conflist(value: Value, source: &Path) -> Result<NetworkConfigList, CniError> {
        let invalid = |reason: String| CniError::InvalidConfig {
            path: source.to_path_buf(),
            reason,
        };
        let Value::Object(mut obj) = value else {
            return Err(invalid("not a JSON object".into()));
        };
        let (name, cni_version) = name_and_version(&obj).map_err(invalid)?;
        let plugins = match obj.remove("plugins") {
            Some(Value::Array(p)) => p,
            Some(_) => return Err(invalid("\"plugins\" is not an array".into())),
            None => return Err(invalid("no \"plugins\"".into())),
        };
        if plugins.is_empty() {
            return Err(invalid("no plugins in the list".into()));
        }
        let plugins = plugins
            .into_iter()
            .enumerate()
            .map(|(i, p)| match p {
                Value::Object(m) => {
                    PluginConfig::parse(m).map_err(|e| invalid(format!("plugin {i}: {e}")))
                }
                _ => Err(invalid(format!("plugin {i} is not a JSON object"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NetworkConfigList {
            name,
            cni_version,
            plugins,
            source: source.to_path_buf(),
        })
    }

    /// Parses a single plugin configuration (`.conf`) into a list of one, as libcni's
    /// `ConfListFromConf` does.
    pub fn from_conf(value: Value, source: &Path) -> Result<NetworkConfigList, CniError> {
        let invalid = |reason: String| CniError::InvalidConfig {
            path: source.to_path_buf(),
            reason,
        };
        let Value::Object(obj) = value else {
            return Err(invalid("not a JSON object".into()));
        };
        let (name, cni_version) = name_and_version(&obj).map_err(invalid)?;
        let plugin = PluginConfig::parse(obj).map_err(invalid)?;
        Ok(NetworkConfigList {
            name,
            cni_version,
            plugins: vec![plugin],
            source: source.to_path_buf(),
        })
    }

    /// Reads one configuration file: `.conflist` as a list, `.conf`/`.json` as a single plugin
    /// (or as a list when it has `plugins` and no `type`, a common misnaming).
    pub fn from_file(path: &Path) -> Result<NetworkConfigList, CniError> {
        let bytes = fs::read(path).map_err(|source| CniError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| CniError::InvalidConfig {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let is_list = path.extension().is_some_and(|e| e == "conflist")
            || (value.get("plugins").is_some() && value.get("type").is_none());
        if is_list {
            NetworkConfigList::from_conflist(value, path)
        } else {
            NetworkConfigList::from_conf(value, path)
        }
    }

    /// The list in `.conflist` form, as kept in a pod's state for DEL.
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("cniVersion".into(), self.cni_version.clone().into());
        obj.insert("name".into(), self.name.clone().into());
        obj.insert(
            "plugins".into(),
            Value::Array(
                self.plugins
                    .iter()
                    .map(|p| Value::Object(p.raw.clone()))
                    .collect(),
            ),
        );
        Value::Object(obj)
    }

    /// Whether DEL gets the cached result as `prevResult` (spec 0.4.0 and later).
    pub(crate) fn del_takes_prev_result(&self) -> bool {
        parse_version(&self.cni_version).is_some_and(|v| v >= (0, 4, 0))
    }

    /// The stdin of plugin `index`: its configuration with `name` and `cniVersion` of the list,
    /// `prevResult` when given, and `runtimeConfig` holding the runtime arguments whose
    /// capability the plugin declares.
    pub(crate) fn plugin_stdin(
        &self,
        index: usize,
        prev_result: Option<&Value>,
        runtime_config: &Map<String, Value>,
    ) -> Option<Vec<u8>> {
        let plugin = self.plugins.get(index)?;
        let mut conf = plugin.raw.clone();
        conf.insert("name".into(), self.name.clone().into());
        conf.insert("cniVersion".into(), self.cni_version.clone().into());
        match prev_result {
            Some(prev) => {
                conf.insert("prevResult".into(), prev.clone());
            }
            None => {
                conf.remove("prevResult");
            }
        }
        let rc: Map<String, Value> = runtime_config
            .iter()
            .filter(|(k, _)| plugin.has_capability(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        serde_json::to_vec(&Value::Object(conf)).ok()
    }
}

fn name_and_version(obj: &Map<String, Value>) -> Result<(String, String), String> {
    let name = match obj.get("name") {
        Some(Value::String(n)) if !n.is_empty() => n.clone(),
        _ => return Err("no \"name\"".into()),
    };
    let version = match obj.get("cniVersion") {
        Some(Value::String(v)) => v.clone(),
        _ => return Err("no \"cniVersion\"".into()),
    };
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(format!(
            "unsupported cniVersion {version:?} (supported: {})",
            SUPPORTED_VERSIONS.join(", ")
        ));
    }
    Ok((name, version))
}

/// The configuration files of `dir` in file name order.
pub(crate) fn config_files(dir: &Path) -> Result<Vec<PathBuf>, CniError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CniError::ReadConfig {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| CniError::ReadConfig {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e));
        if wanted && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The network to use: the first valid configuration file of `dir` in file name order.
/// Invalid files are skipped with a warning (as kubelet did); none valid is an error naming
/// why each was refused.
pub fn load_network(dir: &Path) -> Result<NetworkConfigList, CniError> {
    let files = config_files(dir)?;
    if files.is_empty() {
        return Err(CniError::NoConfig {
            dir: dir.to_path_buf(),
        });
    }
    let mut reasons = Vec::new();
    for file in files {
        match NetworkConfigList::from_file(&file) {
            Ok(list) => return Ok(list),
            Err(e) => {
                log::warn!("skipping CNI config: {e}");
                reasons.push(e.to_string());
            }
        }
    }
    Err(CniError::NoValidConfig {
        dir: dir.to_path_buf(),
        reasons: reasons.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn list() -> NetworkConfigList {
        NetworkConfigList::from_conflist(
            json!({
                "cniVersion": "1.0.0",
                "name": "net",
                "plugins": [
                    {"type": "bridge", "bridge": "br0", "ipam": {"type": "host-local"}},
                    {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
                ]
            }),
            Path::new("/x/10-net.conflist"),
        )
        .unwrap()
    }

    #[test]
    fn conflist_plugin_stdin() {
        let l = list();
        assert_eq!(l.plugins.len(), 2);
        assert_eq!(l.plugins[1].plugin_type, "portmap");
        assert!(l.plugins[1].has_capability("portMappings"));
        assert!(!l.plugins[0].has_capability("portMappings"));

        let mut rc = Map::new();
        rc.insert("portMappings".into(), json!([{"hostPort": 8080}]));
        rc.insert("bandwidth".into(), json!({}));
        let first: Value = serde_json::from_slice(&l.plugin_stdin(0, None, &rc).unwrap()).unwrap();
        assert_eq!(
            first,
            json!({"type": "bridge", "bridge": "br0", "ipam": {"type": "host-local"},
                   "name": "net", "cniVersion": "1.0.0"})
        );
        let prev = json!({"cniVersion": "1.0.0", "ips": []});
        let second: Value =
            serde_json::from_slice(&l.plugin_stdin(1, Some(&prev), &rc).unwrap()).unwrap();
        assert_eq!(second["prevResult"], prev);
        assert_eq!(
            second["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 8080}]})
        );
        assert_eq!(second["name"], "net");
        assert!(l.plugin_stdin(2, None, &rc).is_none());
    }

    #[test]
    fn round_trip_through_state_form() {
        let l = list();
        let again = NetworkConfigList::from_conflist(l.to_json(), &l.source).unwrap();
        assert_eq!(again, l);
    }

    #[test]
    fn single_conf() {
        let l = NetworkConfigList::from_conf(
            json!({"cniVersion": "0.4.0", "name": "n", "type": "ptp"}),
            Path::new("/x/a.conf"),
        )
        .unwrap();
        assert_eq!(l.plugins.len(), 1);
        assert_eq!(l.plugins[0].plugin_type, "ptp");
        assert!(l.del_takes_prev_result());
    }

    #[test]
    fn rejects_bad_configs() {
        let p = Path::new("/x/a.conflist");
        for bad in [
            json!([]),
            json!({"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}),
            json!({"name": "n", "plugins": [{"type": "bridge"}]}),
            json!({"name": "n", "cniVersion": "0.2.0", "plugins": [{"type": "bridge"}]}),
            json!({"name": "n", "cniVersion": "1.0.0", "plugins": []}),
            json!({"name": "n", "cniVersion": "1.0.0", "plugins": [{"bridge": "x"}]}),
            json!({"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "../sh"}]}),
            json!({"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": ".."}]}),
        ] {
            assert!(
                NetworkConfigList::from_conflist(bad.clone(), p).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("1.0.0"), Some((1, 0, 0)));
        assert_eq!(parse_version("0.4"), Some((0, 4, 0)));
        assert_eq!(parse_version("1.x.0"), None);
        assert_eq!(parse_version("1.0.0.0"), None);
        let mut l = list();
        l.cni_version = "0.3.1".into();
        assert!(!l.del_takes_prev_result());
    }

    #[test]
    fn directory_order_and_skipping() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_network(dir.path()),
            Err(CniError::NoConfig { .. })
        ));
        assert!(matches!(
            load_network(&dir.path().join("missing")),
            Err(CniError::NoConfig { .. })
        ));
        fs::write(dir.path().join("README"), "not a config").unwrap();
        fs::write(dir.path().join("05-broken.conflist"), "{").unwrap();
        let err = load_network(dir.path()).unwrap_err();
        assert!(matches!(err, CniError::NoValidConfig { .. }), "{err}");
        fs::write(
            dir.path().join("20-b.conf"),
            r#"{"cniVersion":"1.0.0","name":"b","type":"ptp"}"#,
        )
        .unwrap();
        fs::write(
            dir.path().join("10-a.json"),
            r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        let l = load_network(dir.path()).unwrap();
        assert_eq!(l.name, "a");
        assert_eq!(l.plugins[0].plugin_type, "bridge");
    }
}
