//! Reading containerd's bundle: the OCI spec, its annotations, netns, resources and mounts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sandbox::{FileToCopy, PodResources};
use serde_json::{Map, Value};

use crate::error::ShimError;

/// The bundle's `config.json`.
pub fn read_spec(bundle: &Path) -> Result<Value, ShimError> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| ShimError::Io {
        what: "reading",
        path: path.clone(),
        source: e,
    })?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ShimError::InvalidArgument(format!("{}: {e}", path.display())))?;
    if !v.is_object() {
        return Err(ShimError::InvalidArgument(format!(
            "{} is not a JSON object",
            path.display()
        )));
    }
    Ok(v)
}

/// The spec's annotations (empty if none).
pub fn annotations(spec: &Value) -> Map<String, Value> {
    spec.get("annotations")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

/// Annotations as strings.
pub fn string_map(a: &Map<String, Value>) -> BTreeMap<String, String> {
    a.iter()
        .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
        .collect()
}

/// The path of the network namespace the spec joins, if any.
pub fn netns_path(spec: &Value) -> Option<PathBuf> {
    spec.pointer("/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|n| n.get("type").and_then(Value::as_str) == Some("network"))?
        .get("path")?
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// The pod's resources from containerd's sandbox annotations.
pub fn pod_resources(a: &Map<String, Value>) -> PodResources {
    let num = |k: &str| {
        a.get(k)
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<i64>().ok())
    };
    PodResources {
        cpu_quota_us: num("io.kubernetes.cri.sandbox-cpu-quota").filter(|q| *q > 0),
        cpu_period_us: num("io.kubernetes.cri.sandbox-cpu-period")
            .and_then(|p| u64::try_from(p).ok())
            .filter(|p| *p > 0),
        cpu_shares: num("io.kubernetes.cri.sandbox-cpu-shares").and_then(|p| u64::try_from(p).ok()),
        memory_limit_bytes: num("io.kubernetes.cri.sandbox-memory")
            .and_then(|p| u64::try_from(p).ok())
            .filter(|m| *m > 0),
    }
}

/// The limits of the spec's own container (`linux.resources`): what sizes the VM of a task
/// that has one to itself (`ctr run`).
pub fn container_resources(spec: &Value) -> PodResources {
    let int = |p: &str| spec.pointer(p).and_then(Value::as_i64);
    let uint = |p: &str| spec.pointer(p).and_then(Value::as_u64);
    PodResources {
        cpu_quota_us: int("/linux/resources/cpu/quota").filter(|q| *q > 0),
        cpu_period_us: uint("/linux/resources/cpu/period").filter(|p| *p > 0),
        cpu_shares: uint("/linux/resources/cpu/shares"),
        memory_limit_bytes: uint("/linux/resources/memory/limit").filter(|m| *m > 0),
    }
}

/// `pod`, with each value it lacks taken from `container`.
pub fn or_container(pod: PodResources, container: PodResources) -> PodResources {
    let (cpu_quota_us, cpu_period_us) = if pod.cpu_quota_us.is_some() {
        (pod.cpu_quota_us, pod.cpu_period_us)
    } else {
        (container.cpu_quota_us, container.cpu_period_us)
    };
    PodResources {
        cpu_quota_us,
        cpu_period_us,
        cpu_shares: pod.cpu_shares.or(container.cpu_shares),
        memory_limit_bytes: pod.memory_limit_bytes.or(container.memory_limit_bytes),
    }
}

/// Takes the host bind mounts out of the spec and returns them as files to copy into the
/// guest (CRI's /etc/hosts, /etc/resolv.conf, /etc/hostname, volumes). The sandbox's
/// `/dev/shm` is dropped: the guest provides its own.
pub fn take_bind_mounts(spec: &mut Value) -> Vec<FileToCopy> {
    let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    let mut kept = Vec::new();
    for m in mounts.drain(..) {
        let is_bind = m.get("type").and_then(Value::as_str) == Some("bind")
            || m.get("options")
                .and_then(Value::as_array)
                .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"));
        if !is_bind {
            kept.push(m);
            continue;
        }
        let dest = m.get("destination").and_then(Value::as_str).unwrap_or("");
        let source = m.get("source").and_then(Value::as_str).unwrap_or("");
        if dest.is_empty() || source.is_empty() || dest == "/dev/shm" {
            continue;
        }
        let read_only = m
            .get("options")
            .and_then(Value::as_array)
            .is_some_and(|o| o.iter().any(|x| x == "ro"));
        let name: String = dest
            .trim_matches('/')
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        files.push(FileToCopy {
            guest_relative_path: format!("m{}-{}", files.len(), name),
            host_source: PathBuf::from(source),
            mode: None,
            read_only,
            container_path: dest.to_owned(),
        });
    }
    *mounts = kept;
    files
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_standalone_task_sizes_its_vm_from_its_own_limits() {
        let spec = json!({"linux": {"resources": {
            "memory": {"limit": 1_073_741_824u64},
            "cpu": {"quota": 150000, "period": 100000, "shares": 1024}
        }}});
        let c = container_resources(&spec);
        assert_eq!(c.memory_limit_bytes, Some(1 << 30));
        assert_eq!(
            (c.cpu_quota_us, c.cpu_period_us),
            (Some(150_000), Some(100_000))
        );
        assert_eq!(c.cpu_shares, Some(1024));
        // Unlimited values (-1, 0) and a spec without resources give nothing.
        let none = container_resources(&json!({"linux": {"resources": {
            "memory": {"limit": -1}, "cpu": {"quota": -1, "period": 0}
        }}}));
        assert_eq!(none, PodResources::default());
        assert_eq!(container_resources(&json!({})), PodResources::default());
        // The pod's annotations win; what they lack comes from the container.
        let pod = PodResources {
            memory_limit_bytes: Some(256 << 20),
            ..Default::default()
        };
        let merged = or_container(pod, c);
        assert_eq!(merged.memory_limit_bytes, Some(256 << 20));
        assert_eq!(merged.cpu_quota_us, Some(150_000));
        assert_eq!(merged.cpu_period_us, Some(100_000));
    }

    #[test]
    fn reads_netns_resources_and_binds() {
        let mut spec = json!({
            "annotations": {"io.kubernetes.cri.sandbox-cpu-quota": "150000",
                            "io.kubernetes.cri.sandbox-cpu-period": "100000",
                            "io.kubernetes.cri.sandbox-memory": "268435456"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind", "ro"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm", "options": ["rbind"]}
            ]
        });
        assert_eq!(
            netns_path(&spec),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        let r = pod_resources(&annotations(&spec));
        assert_eq!(r.cpu_quota_us, Some(150_000));
        assert_eq!(r.memory_limit_bytes, Some(256 << 20));
        let files = take_bind_mounts(&mut spec);
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].container_path, "/etc/hosts");
        assert!(files[0].read_only);
        assert_eq!(spec["mounts"].as_array().unwrap().len(), 1);
        assert_eq!(netns_path(&json!({})), None);
    }
}
