//! Per-pod records in the state directory: what DEL needs (the network configuration used for
//! ADD, the CNI arguments, the runtime config, the ADD result) and the finished
//! [`PodNetwork`]. Written before ADD runs, so that DEL always has the configuration, even
//! after a crash in the middle of ADD; replaced atomically (temp file, fsync, rename).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::guest::PodNetwork;

/// Version of the record layout.
const VERSION: u32 = 1;

/// Errors from reading and writing pod records.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A record or the directory could not be read or written.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A record is not valid JSON of the expected shape.
    #[error("corrupt network state {}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// One pod's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PodState {
    pub version: u32,
    pub pod_id: String,
    /// The namespace file.
    pub netns: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The network configuration list used for ADD, in `.conflist` form.
    pub config: Value,
    /// `CNI_ARGS`.
    pub cni_args: String,
    /// Runtime arguments by capability (`portMappings`).
    pub runtime_config: Map<String, Value>,
    /// The final ADD result, once ADD succeeded.
    pub result: Option<Value>,
    /// The finished setup, once everything succeeded.
    pub network: Option<PodNetwork>,
}

impl PodState {
    pub fn new(
        pod_id: &str,
        netns: &Path,
        ifname: &str,
        config: Value,
        cni_args: String,
        runtime_config: Map<String, Value>,
    ) -> PodState {
        PodState {
            version: VERSION,
            pod_id: pod_id.to_string(),
            netns: netns.to_path_buf(),
            ifname: ifname.to_string(),
            config,
            cni_args,
            runtime_config,
            result: None,
            network: None,
        }
    }
}

/// The records of one directory, one `<pod id>.json` each.
#[derive(Debug, Clone)]
pub(crate) struct StateDir {
    dir: PathBuf,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl StateDir {
    pub fn new(dir: PathBuf) -> StateDir {
        StateDir { dir }
    }

    /// The record file of `pod_id`.
    pub fn path(&self, pod_id: &str) -> PathBuf {
        self.dir.join(format!("{pod_id}.json"))
    }

    /// The record of `pod_id`, if any.
    pub fn load(&self, pod_id: &str) -> Result<Option<PodState>, StateError> {
        let path = self.path(pod_id);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Corrupt { path, source })
    }

    /// Writes the record atomically.
    pub fn store(&self, state: &PodState) -> Result<(), StateError> {
        fs::create_dir_all(&self.dir).map_err(io_err("create", &self.dir))?;
        let path = self.path(&state.pod_id);
        let tmp = self.dir.join(format!(".{}.json.tmp", state.pod_id));
        let bytes = serde_json::to_vec_pretty(state).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("write", &tmp)(e));
        }
        fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
        // Make the rename itself durable; failing that is not worth failing the pod.
        if let Err(e) = File::open(&self.dir).and_then(|d| d.sync_all()) {
            log::debug!("cannot sync {}: {e}", self.dir.display());
        }
        Ok(())
    }

    /// Deletes the record; a missing one is fine.
    pub fn remove(&self, pod_id: &str) -> Result<(), StateError> {
        let path = self.path(pod_id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// The pod ids that have a record, sorted.
    pub fn list(&self) -> Result<Vec<String>, StateError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read", &self.dir)(e)),
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("read", &self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = name.strip_suffix(".json") {
                if crate::request::valid_pod_id(id) {
                    ids.push(id.to_string());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn store_load_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path().join("state"));
        assert_eq!(sd.load("p1").unwrap(), None);
        assert!(sd.list().unwrap().is_empty());
        let mut st = PodState::new(
            "p1",
            Path::new("/run/x/p1"),
            "eth0",
            json!({"name": "n"}),
            "IgnoreUnknown=1".into(),
            Map::new(),
        );
        sd.store(&st).unwrap();
        st.result = Some(json!({"cniVersion": "1.0.0"}));
        sd.store(&st).unwrap();
        assert_eq!(sd.load("p1").unwrap(), Some(st));
        fs::write(dir.path().join("state/notes.txt"), "x").unwrap();
        assert_eq!(sd.list().unwrap(), ["p1"]);
        sd.remove("p1").unwrap();
        sd.remove("p1").unwrap();
        assert_eq!(sd.load("p1").unwrap(), None);
        fs::write(dir.path().join("state/p2.json"), "{").unwrap();
        assert!(matches!(sd.load("p2"), Err(StateError::Corrupt { .. })));
    }
}
