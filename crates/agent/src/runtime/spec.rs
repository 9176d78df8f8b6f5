//! The OCI runtime spec, as far as this runtime supports it, and the [`ChildPlan`] built from it.
//!
//! The plan holds every C string and pointer array the cloned child needs, so the child (a copy
//! of a multi-threaded process) does not allocate between `clone` and `execve`.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use super::ContainerError;

/// Host device nodes bind-mounted into the container's /dev.
pub const DEV_NODES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// What the container's process runs as and with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
}

/// The parts of an OCI spec this runtime applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerConfig {
    pub process: ProcessConfig,
    pub hostname: Option<String>,
    /// root.readonly.
    pub readonly_root: bool,
    /// Spec sections present but not applied yet (logged at create).
    pub ignored: Vec<&'static str>,
}

fn no_nul(what: &str, s: &str) -> Result<(), ContainerError> {
    if s.contains('\0') {
        return Err(ContainerError::InvalidSpec(format!(
            "{what} contains a NUL byte"
        )));
    }
    Ok(())
}

impl ContainerConfig {
    /// Parses and validates a config.json.
    pub fn from_json(json: &[u8]) -> Result<ContainerConfig, ContainerError> {
        let spec: Spec =
            serde_json::from_slice(json).map_err(|e| ContainerError::InvalidSpec(e.to_string()))?;
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| ContainerError::InvalidSpec("process is missing".into()))?;
        if process.terminal() == Some(true) {
            return Err(ContainerError::Unimplemented("process.terminal (tty)"));
        }
        let args = process.args().clone().unwrap_or_default();
        if args.is_empty() || args[0].is_empty() {
            return Err(ContainerError::InvalidSpec("process.args is empty".into()));
        }
        for a in &args {
            no_nul("process.args", a)?;
        }
        let env = process.env().clone().unwrap_or_default();
        for e in &env {
            no_nul("process.env", e)?;
            if !e.contains('=') {
                return Err(ContainerError::InvalidSpec(format!(
                    "process.env entry {e:?} has no '='"
                )));
            }
        }
        let cwd = process.cwd().clone();
        if !cwd.is_absolute() {
            return Err(ContainerError::InvalidSpec(format!(
                "process.cwd {} is not absolute",
                cwd.display()
            )));
        }
        let user = process.user();
        let hostname = spec.hostname().clone().filter(|h| !h.is_empty());
        if let Some(h) = &hostname {
            no_nul("hostname", h)?;
            if h.len() > 64 {
                return Err(ContainerError::InvalidSpec(
                    "hostname is longer than 64 bytes".into(),
                ));
            }
        }
        let mut ignored = Vec::new();
        if spec.mounts().as_ref().is_some_and(|m| !m.is_empty()) {
            ignored.push("mounts (only the default /proc, /sys, /dev are mounted)");
        }
        if process.capabilities().is_some() {
            ignored.push("process.capabilities");
        }
        if process.rlimits().is_some() {
            ignored.push("process.rlimits");
        }
        if process.no_new_privileges().is_some() {
            ignored.push("process.noNewPrivileges");
        }
        if let Some(linux) = spec.linux() {
            if linux.resources().is_some() {
                ignored.push("linux.resources (cgroups)");
            }
            if linux.seccomp().is_some() {
                ignored.push("linux.seccomp");
            }
            if linux.namespaces().is_some() {
                ignored.push("linux.namespaces (always new pid, mount, uts, ipc)");
            }
            if linux.masked_paths().is_some() || linux.readonly_paths().is_some() {
                ignored.push("linux.maskedPaths / readonlyPaths");
            }
            if linux.sysctl().is_some() {
                ignored.push("linux.sysctl");
            }
        }
        Ok(ContainerConfig {
            ignored,
            process: ProcessConfig {
                args,
                env,
                cwd,
                uid: user.uid(),
                gid: user.gid(),
                additional_gids: user.additional_gids().clone().unwrap_or_default(),
                umask: user.umask(),
            },
            hostname,
            readonly_root: spec
                .root()
                .as_ref()
                .and_then(|r| r.readonly())
                .unwrap_or(false),
        })
    }

    /// PATH from the process environment, or the usual default.
    fn path_var(&self) -> &str {
        self.process
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    }

    /// Where `execve` is tried, in order: args[0] if it has a slash, else each PATH entry.
    pub fn exec_candidates(&self) -> Vec<String> {
        let arg0 = &self.process.args[0];
        if arg0.contains('/') {
            return vec![arg0.clone()];
        }
        self.path_var()
            .split(':')
            .filter(|dir| !dir.is_empty())
            .map(|dir| format!("{}/{arg0}", dir.trim_end_matches('/')))
            .collect()
    }
}

fn cstring(bytes: &[u8]) -> CString {
    // Callers validated the absence of NUL bytes; an interior NUL would truncate, not panic.
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    CString::new(&bytes[..end]).unwrap_or_default()
}

fn path_c(p: &Path) -> CString {
    cstring(p.as_os_str().as_bytes())
}

/// A NULL-terminated pointer array over owned C strings.
pub struct CStringArray {
    _strings: Vec<CString>,
    ptrs: Vec<*const libc::c_char>,
}

impl CStringArray {
    fn new(items: &[String]) -> CStringArray {
        let strings: Vec<CString> = items.iter().map(|s| cstring(s.as_bytes())).collect();
        let mut ptrs: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        CStringArray {
            _strings: strings,
            ptrs,
        }
    }

    pub fn as_ptr(&self) -> *const *const libc::c_char {
        self.ptrs.as_ptr()
    }
}

/// A bind mount of a host device node onto an empty file in the container's /dev.
pub struct DevNode {
    pub host: CString,
    pub target: CString,
}

/// A writable overlay over the rootfs, its upper layer on a tmpfs private to the container.
pub struct OverlayPlan {
    /// Where the child mounts its tmpfs (the same agent path for every container: each child
    /// mounts it in its own mount namespace).
    pub scratch: CString,
    pub upper: CString,
    pub work: CString,
    /// The overlay mount point: the container's root.
    pub merged: CString,
    /// `lowerdir=...,upperdir=...,workdir=...`.
    pub options: CString,
}

/// Everything the child needs, prepared in the parent.
pub struct ChildPlan {
    /// The container's root before pivot_root: the rootfs directory (bind-mounted onto itself),
    /// or the overlay's merged directory.
    pub rootfs: CString,
    pub overlay: Option<OverlayPlan>,
    pub proc_dir: CString,
    pub sys_dir: CString,
    pub dev_dir: CString,
    pub pts_dir: CString,
    pub shm_dir: CString,
    pub ptmx_link: CString,
    pub dev_links: Vec<(CString, CString)>,
    pub dev_nodes: Vec<DevNode>,
    pub hostname: Option<CString>,
    pub read_only: bool,
    pub cwd: CString,
    pub argv: CStringArray,
    pub envp: CStringArray,
    pub exec_candidates: Vec<CString>,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
    pub umask: Option<libc::mode_t>,
}

impl ChildPlan {
    /// `overlay_scratch`: where the child mounts the overlay's tmpfs, `None` for no overlay.
    /// The caller checked that the paths hold no `,`, `:` or `\\` (overlay option syntax).
    pub fn new(
        config: &ContainerConfig,
        rootfs: &Path,
        read_only: bool,
        overlay_scratch: Option<&Path>,
    ) -> ChildPlan {
        let overlay = overlay_scratch.map(|scratch| {
            let upper = scratch.join("upper");
            let work = scratch.join("work");
            let options = format!(
                "lowerdir={},upperdir={},workdir={}",
                rootfs.display(),
                upper.display(),
                work.display()
            );
            OverlayPlan {
                scratch: path_c(scratch),
                upper: path_c(&upper),
                work: path_c(&work),
                merged: path_c(&scratch.join("merged")),
                options: cstring(options.as_bytes()),
            }
        });
        let merged = overlay_scratch.map(|s| s.join("merged"));
        let rootfs = merged.as_deref().unwrap_or(rootfs);
        let under = |rel: &str| path_c(&rootfs.join(rel));
        let dev_nodes = DEV_NODES
            .iter()
            .map(|name| DevNode {
                host: path_c(&Path::new("/dev").join(name)),
                target: under(&format!("dev/{name}")),
            })
            .collect();
        let dev_links = [
            ("/proc/self/fd", "dev/fd"),
            ("/proc/self/fd/0", "dev/stdin"),
            ("/proc/self/fd/1", "dev/stdout"),
            ("/proc/self/fd/2", "dev/stderr"),
        ]
        .iter()
        .map(|(target, link)| (cstring(target.as_bytes()), under(link)))
        .collect();
        let p = &config.process;
        ChildPlan {
            rootfs: path_c(rootfs),
            overlay,
            proc_dir: under("proc"),
            sys_dir: under("sys"),
            dev_dir: under("dev"),
            pts_dir: under("dev/pts"),
            shm_dir: under("dev/shm"),
            ptmx_link: under("dev/ptmx"),
            dev_links,
            dev_nodes,
            hostname: config.hostname.as_deref().map(|h| cstring(h.as_bytes())),
            read_only: read_only || config.readonly_root,
            cwd: path_c(&p.cwd),
            argv: CStringArray::new(&p.args),
            envp: CStringArray::new(&p.env),
            exec_candidates: config
                .exec_candidates()
                .iter()
                .map(|c| cstring(OsStr::new(c).as_bytes()))
                .collect(),
            uid: p.uid,
            gid: p.gid,
            groups: p.additional_gids.clone(),
            umask: p.umask,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(process: &str) -> Vec<u8> {
        format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs","readonly":true}},"hostname":"h1","process":{process}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn parses_process() {
        let c = ContainerConfig::from_json(&spec(
            r#"{"args":["sh","-c","x"],"env":["PATH=/bin:/usr/bin","A=b"],"cwd":"/tmp","user":{"uid":1000,"gid":100,"additionalGids":[5]}}"#,
        ))
        .unwrap();
        assert_eq!(c.process.args, ["sh", "-c", "x"]);
        assert_eq!((c.process.uid, c.process.gid), (1000, 100));
        assert_eq!(c.process.additional_gids, [5]);
        assert_eq!(c.hostname.as_deref(), Some("h1"));
        assert!(c.readonly_root);
        assert_eq!(c.exec_candidates(), ["/bin/sh", "/usr/bin/sh"]);
        assert!(c.ignored.is_empty());
    }

    #[test]
    fn rejects_bad_specs() {
        for (json, what) in [
            (b"not json".to_vec(), "garbage"),
            (br#"{"ociVersion":"1.0.2"}"#.to_vec(), "no process"),
            (spec(r#"{"args":[],"cwd":"/"}"#), "empty args"),
            (spec(r#"{"args":["sh"],"cwd":"rel"}"#), "relative cwd"),
            (
                spec(r#"{"args":["sh"],"cwd":"/","env":["NOEQUALS"]}"#),
                "env",
            ),
            (spec(r#"{"args":["a\u0000b"],"cwd":"/"}"#), "nul"),
        ] {
            assert!(
                matches!(
                    ContainerConfig::from_json(&json),
                    Err(ContainerError::InvalidSpec(_))
                ),
                "{what}"
            );
        }
    }
}
