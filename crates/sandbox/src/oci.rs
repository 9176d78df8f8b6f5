//! Adapting the OCI spec the front end built to the pod's VM.
//!
//! - `linux.namespaces`: every container gets a new mount namespace, joins the pod's ipc and
//!   uts namespaces (made by the agent's `CreateSandbox`), and the pod's pid namespace when the
//!   pod shares one (else a new one). A `network` entry is dropped: the pod's network is the
//!   VM's, which every container shares. A new cgroup namespace is kept when asked for.
//! - `mounts`: copied files, the pod's resolv.conf and /etc/hostname are bind-mounted from the
//!   agent's file store; they replace spec mounts with the same destination.
//! - `process` is kept as the template of exec processes.

use serde_json::{json, Map, Value};

use crate::error::{Result, SandboxError};
use crate::record::{GuestMount, PodNamespaces};

/// The spec to send to the agent, and what the manager keeps from it.
#[derive(Debug)]
pub struct PreparedSpec {
    /// The rewritten spec.
    pub json: Vec<u8>,
    /// `process`, the exec template.
    pub process: Value,
    /// `root.readonly`.
    pub root_readonly: bool,
}

fn invalid(msg: impl Into<String>) -> SandboxError {
    SandboxError::InvalidSpec(msg.into())
}

/// Rewrites `spec_json` for the pod (see the module documentation).
pub fn prepare(
    spec_json: &[u8],
    ns: &PodNamespaces,
    mounts: &[GuestMount],
) -> Result<PreparedSpec> {
    let mut spec: Value =
        serde_json::from_slice(spec_json).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let obj = spec
        .as_object_mut()
        .ok_or_else(|| invalid("the spec is not a JSON object"))?;
    let process = obj
        .get("process")
        .filter(|p| p.is_object())
        .cloned()
        .ok_or_else(|| invalid("process is missing"))?;
    match process.get("args").and_then(Value::as_array) {
        Some(a) if !a.is_empty() && a.iter().all(Value::is_string) => {}
        _ => return Err(invalid("process.args must be a non-empty list of strings")),
    }
    let root_readonly = obj
        .get("root")
        .and_then(|r| r.get("readonly"))
        .and_then(Value::as_bool)
        .unwrap_or(false);

    // Namespaces.
    let linux = obj
        .entry("linux")
        .or_insert_with(|| Value::Object(Map::new()));
    let linux = linux
        .as_object_mut()
        .ok_or_else(|| invalid("linux is not an object"))?;
    let wants_cgroup_ns = linux
        .get("namespaces")
        .and_then(Value::as_array)
        .is_some_and(|l| l.iter().any(|n| n["type"] == "cgroup"));
    let mut namespaces = vec![json!({"type": "mount"})];
    namespaces.push(match &ns.pid {
        Some(path) => json!({"type": "pid", "path": path}),
        None => json!({"type": "pid"}),
    });
    namespaces.push(json!({"type": "ipc", "path": ns.ipc}));
    namespaces.push(json!({"type": "uts", "path": ns.uts}));
    if wants_cgroup_ns {
        namespaces.push(json!({"type": "cgroup"}));
    }
    linux.insert("namespaces".into(), Value::Array(namespaces));

    // Mounts.
    let existing = match obj.remove("mounts") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(invalid("mounts is not a list")),
    };
    let ours = |dest: &str| mounts.iter().any(|m| same_path(&m.container_path, dest));
    let mut all: Vec<Value> = existing
        .into_iter()
        .filter(|m| !m["destination"].as_str().is_some_and(ours))
        .collect();
    for m in mounts {
        let access = if m.read_only { "ro" } else { "rw" };
        all.push(if m.guest_path.is_empty() {
            json!({
                "destination": m.container_path,
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", access],
            })
        } else {
            json!({
                "destination": m.container_path,
                "type": "bind",
                "source": m.guest_path,
                "options": ["rbind", access],
            })
        });
    }
    obj.insert("mounts".into(), Value::Array(all));

    let json = serde_json::to_vec(&spec).map_err(|e| invalid(e.to_string()))?;
    Ok(PreparedSpec {
        json,
        process,
        root_readonly,
    })
}

fn same_path(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// The `process` object of an exec: the container's process with `cmd` as its arguments and
/// no terminal.
pub fn exec_process(template: &Value, cmd: &[String]) -> Result<Vec<u8>> {
    if cmd.is_empty() {
        return Err(SandboxError::InvalidArgument("the command is empty".into()));
    }
    let mut p = match template {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    p.insert("args".into(), json!(cmd));
    p.insert("terminal".into(), Value::Bool(false));
    p.remove("consoleSize");
    if !p.contains_key("cwd") {
        p.insert("cwd".into(), json!("/"));
    }
    serde_json::to_vec(&Value::Object(p)).map_err(|e| invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(pid: bool) -> PodNamespaces {
        PodNamespaces {
            ipc: "/proc/7/ns/ipc".into(),
            uts: "/proc/7/ns/uts".into(),
            pid: pid.then(|| "/proc/7/ns/pid".into()),
            resolv_conf: None,
            hostname_file: None,
            store_root: None,
        }
    }

    const SPEC: &str = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs","readonly":true},
        "process":{"args":["sh"],"env":["PATH=/bin"],"cwd":"/w","terminal":true,"user":{"uid":1,"gid":1}},
        "mounts":[{"destination":"/etc/hosts","type":"bind","source":"/host/hosts","options":["rbind"]},
                  {"destination":"/proc","type":"proc","source":"proc"}],
        "linux":{"namespaces":[{"type":"network","path":"/var/run/netns/x"},{"type":"pid"},
                 {"type":"cgroup"},{"type":"mount"}],"resources":{"memory":{"limit":1000}}}}"#;

    #[test]
    fn namespaces_and_mounts_are_rewritten() {
        let mounts = vec![
            GuestMount {
                container_path: "/etc/hosts/".into(),
                guest_path: "/run/files/c/c1/hosts".into(),
                read_only: true,
                host_path: "/var/lib/kubelet/hosts".into(),
            },
            GuestMount {
                container_path: "/scratch".into(),
                guest_path: String::new(),
                read_only: false,
                host_path: "/tmp/empty".into(),
            },
        ];
        let p = prepare(SPEC.as_bytes(), &ns(true), &mounts).unwrap();
        assert!(p.root_readonly);
        assert_eq!(p.process["cwd"], "/w");
        let v: Value = serde_json::from_slice(&p.json).unwrap();
        let namespaces = v["linux"]["namespaces"].as_array().unwrap();
        let types: Vec<&str> = namespaces
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["mount", "pid", "ipc", "uts", "cgroup"]);
        assert_eq!(namespaces[1]["path"], "/proc/7/ns/pid");
        assert_eq!(namespaces[2]["path"], "/proc/7/ns/ipc");
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 1000);
        let m = v["mounts"].as_array().unwrap();
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(m[0]["destination"], "/proc");
        assert_eq!(m[1]["source"], "/run/files/c/c1/hosts");
        assert_eq!(m[1]["options"][1], "ro");
        assert_eq!(m[2]["type"], "tmpfs");
        assert_eq!(m[2]["options"][2], "rw");

        let p = prepare(SPEC.as_bytes(), &ns(false), &[]).unwrap();
        let v: Value = serde_json::from_slice(&p.json).unwrap();
        assert!(v["linux"]["namespaces"][1].get("path").is_none());
        assert_eq!(v["mounts"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn minimal_spec_gets_a_linux_section() {
        let p = prepare(br#"{"process":{"args":["true"]}}"#, &ns(false), &[]).unwrap();
        let v: Value = serde_json::from_slice(&p.json).unwrap();
        assert_eq!(v["linux"]["namespaces"].as_array().unwrap().len(), 4);
        assert!(!p.root_readonly);
    }

    #[test]
    fn bad_specs_are_refused() {
        for bad in [
            &b"nope"[..],
            b"[]",
            br#"{"root":{}}"#,
            br#"{"process":{"args":[]}}"#,
            br#"{"process":{"args":[1]}}"#,
            br#"{"process":{"args":["a"]},"linux":3}"#,
            br#"{"process":{"args":["a"]},"mounts":{}}"#,
        ] {
            assert!(
                prepare(bad, &ns(false), &[]).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn exec_process_replaces_args_and_terminal() {
        let tpl = json!({"args":["sleep","1"],"env":["A=1"],"terminal":true,"consoleSize":{"height":1,"width":1}});
        let v: Value =
            serde_json::from_slice(&exec_process(&tpl, &["echo".into(), "hi".into()]).unwrap())
                .unwrap();
        assert_eq!(v["args"], json!(["echo", "hi"]));
        assert_eq!(v["env"], json!(["A=1"]));
        assert_eq!(v["terminal"], false);
        assert_eq!(v["cwd"], "/");
        assert!(v.get("consoleSize").is_none());
        assert!(exec_process(&tpl, &[]).is_err());
    }
}
