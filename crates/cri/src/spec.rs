//! The OCI runtime spec of a container, built from its CRI config and its image, the way
//! containerd's CRI plugin builds it (args from entrypoint/cmd, env merge, user, capabilities,
//! resources, masked paths, seccomp).

use std::collections::BTreeMap;

use image::ImageConfig;
use k8s_cri::v1 as cri;
use serde_json::{json, Value};
use tonic::Status;

/// The capabilities containerd and Docker give a container by default.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability up to Linux 6.1 (`privileged` containers).
pub const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Syscalls the RuntimeDefault seccomp profile refuses (EPERM); everything else is allowed.
/// A deny-list rather than Docker's allow-list: the VM is the isolation boundary, and this
/// blocks what a container never needs (kernel modules, kexec, keyrings, bpf, perf, ptrace of
/// other processes' memory, clock and swap changes).
pub const RUNTIME_DEFAULT_DENY: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "move_pages",
    "nfsservctl",
    "open_by_handle_at",
    "perf_event_open",
    "personality",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "sysfs",
    "_sysctl",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// args: the CRI command replaces the image's entrypoint, CRI args replace its cmd (Docker's
/// and containerd's rule).
pub fn process_args(
    config: &cri::ContainerConfig,
    image: &ImageConfig,
) -> Result<Vec<String>, Status> {
    let mut args = if config.command.is_empty() {
        let mut a = image.entrypoint.clone();
        if config.args.is_empty() {
            a.extend(image.cmd.iter().cloned());
        } else {
            a.extend(config.args.iter().cloned());
        }
        a
    } else {
        let mut a = config.command.clone();
        a.extend(config.args.iter().cloned());
        a
    };
    args.retain(|_| true);
    if args.is_empty() {
        return Err(invalid(
            "no command: the image has no entrypoint or cmd and the container config none",
        ));
    }
    Ok(args)
}

/// Image env, then config envs (the latter win), plus PATH and HOSTNAME defaults.
pub fn process_env(
    config: &cri::ContainerConfig,
    image: &ImageConfig,
    hostname: &str,
) -> Vec<String> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut put = |k: &str, v: &str| {
        if !env.contains_key(k) {
            order.push(k.to_owned());
        }
        env.insert(k.to_owned(), v.to_owned());
    };
    put(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    if !hostname.is_empty() {
        put("HOSTNAME", hostname);
    }
    for e in &image.env {
        let (k, v) = e.split_once('=').unwrap_or((e, ""));
        put(k, v);
    }
    for kv in &config.envs {
        if !kv.key.is_empty() {
            put(&kv.key, &kv.value);
        }
    }
    order
        .into_iter()
        .map(|k| format!("{k}={}", env.get(&k).cloned().unwrap_or_default()))
        .collect()
}

/// The user: CRI run_as_user/group, else the image's numeric `User`. Names need the image's
/// /etc/passwd, which hyperd does not read yet: refused with a clear error.
pub fn process_user(
    sc: Option<&cri::LinuxContainerSecurityContext>,
    image: &ImageConfig,
) -> Result<Value, Status> {
    let (mut uid, mut gid) = (0u32, None::<u32>);
    let image_user = image.user.trim();
    if !image_user.is_empty() {
        let (u, g) = image_user.split_once(':').unwrap_or((image_user, ""));
        uid = u.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "image user {u:?} is a name; hyperd needs a numeric user (set runAsUser)"
            ))
        })?;
        if !g.is_empty() {
            gid = Some(g.parse().map_err(|_| {
                Status::invalid_argument(format!("image group {g:?} is not numeric"))
            })?);
        }
    }
    let mut groups: Vec<u32> = Vec::new();
    if let Some(sc) = sc {
        if !sc.run_as_username.is_empty() {
            return Err(invalid(format!(
                "runAsUserName {:?}: user names are not supported, give a numeric user",
                sc.run_as_username
            )));
        }
        if let Some(u) = &sc.run_as_user {
            uid = u32::try_from(u.value).map_err(|_| invalid("runAsUser out of range"))?;
            if gid.is_none() && !image_user.is_empty() {
                gid = None;
            }
        }
        if let Some(g) = &sc.run_as_group {
            gid = Some(u32::try_from(g.value).map_err(|_| invalid("runAsGroup out of range"))?);
        }
        for g in &sc.supplemental_groups {
            groups.push(u32::try_from(*g).map_err(|_| invalid("supplemental group out of range"))?);
        }
    }
    Ok(json!({"uid": uid, "gid": gid.unwrap_or(0), "additionalGids": groups}))
}

/// Capability sets from the defaults plus the config's add/drop ("ALL" understood).
pub fn capabilities(sc: Option<&cri::LinuxContainerSecurityContext>) -> Result<Value, Status> {
    let mut caps: Vec<String> = DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
    let mut ambient: Vec<String> = Vec::new();
    if let Some(sc) = sc {
        if sc.privileged {
            caps = ALL_CAPS.iter().map(|s| s.to_string()).collect();
        }
        if let Some(c) = &sc.capabilities {
            let norm = |s: &str| {
                let up = s.to_ascii_uppercase();
                if up.starts_with("CAP_") || up == "ALL" {
                    up
                } else {
                    format!("CAP_{up}")
                }
            };
            for a in &c.add_capabilities {
                let a = norm(a);
                if a == "ALL" {
                    caps = ALL_CAPS.iter().map(|s| s.to_string()).collect();
                } else if !ALL_CAPS.contains(&a.as_str()) {
                    return Err(invalid(format!("unknown capability {a}")));
                } else if !caps.contains(&a) {
                    caps.push(a);
                }
            }
            for d in &c.drop_capabilities {
                let d = norm(d);
                if d == "ALL" {
                    caps.clear();
                } else {
                    caps.retain(|x| *x != d);
                }
            }
            for a in &c.add_ambient_capabilities {
                let a = norm(a);
                if !ALL_CAPS.contains(&a.as_str()) {
                    return Err(invalid(format!("unknown capability {a}")));
                }
                if !caps.contains(&a) {
                    caps.push(a.clone());
                }
                ambient.push(a);
            }
        }
    }
    Ok(json!({
        "bounding": caps, "effective": caps, "permitted": caps,
        "inheritable": ambient, "ambient": ambient,
    }))
}

/// OCI linux.resources from CRI resources (0 / empty means unset).
pub fn resources(r: Option<&cri::LinuxContainerResources>) -> Value {
    let Some(r) = r else { return json!({}) };
    let mut cpu = serde_json::Map::new();
    if r.cpu_shares > 0 {
        cpu.insert("shares".into(), json!(r.cpu_shares));
    }
    if r.cpu_quota > 0 {
        cpu.insert("quota".into(), json!(r.cpu_quota));
    }
    if r.cpu_period > 0 {
        cpu.insert("period".into(), json!(r.cpu_period));
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.insert("cpus".into(), json!(r.cpuset_cpus));
    }
    if !r.cpuset_mems.is_empty() {
        cpu.insert("mems".into(), json!(r.cpuset_mems));
    }
    let mut out = serde_json::Map::new();
    if !cpu.is_empty() {
        out.insert("cpu".into(), Value::Object(cpu));
    }
    if r.memory_limit_in_bytes > 0 {
        let mut mem = json!({"limit": r.memory_limit_in_bytes});
        if r.memory_swap_limit_in_bytes > 0 {
            mem["swap"] = json!(r.memory_swap_limit_in_bytes);
        }
        out.insert("memory".into(), mem);
    }
    if !r.unified.is_empty() {
        out.insert("unified".into(), json!(r.unified));
    }
    Value::Object(out)
}

/// The seccomp section for a CRI profile.
pub fn seccomp(
    profile: Option<&cri::SecurityProfile>,
    privileged: bool,
) -> Result<Option<Value>, Status> {
    use cri::security_profile::ProfileType;
    let Some(p) = profile else { return Ok(None) };
    if privileged {
        return Ok(None);
    }
    match ProfileType::try_from(p.profile_type) {
        Ok(ProfileType::Unconfined) => Ok(None),
        Ok(ProfileType::RuntimeDefault) => Ok(Some(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": RUNTIME_DEFAULT_DENY, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
        }))),
        Ok(ProfileType::Localhost) => {
            let path = std::path::Path::new(&p.localhost_ref);
            if !path.is_absolute() {
                return Err(invalid(format!(
                    "localhost seccomp profile {:?} is not an absolute path",
                    p.localhost_ref
                )));
            }
            let text = std::fs::read(path)
                .map_err(|e| invalid(format!("seccomp profile {}: {e}", path.display())))?;
            let v: Value = serde_json::from_slice(&text)
                .map_err(|e| invalid(format!("seccomp profile {}: {e}", path.display())))?;
            Ok(Some(v))
        }
        Err(_) => Err(invalid(format!(
            "unknown seccomp profile type {}",
            p.profile_type
        ))),
    }
}

/// The whole config.json for a container.
pub fn build(
    config: &cri::ContainerConfig,
    image: &ImageConfig,
    pod_hostname: &str,
) -> Result<Vec<u8>, Status> {
    let linux = config.linux.as_ref();
    let sc = linux.and_then(|l| l.security_context.as_ref());
    let privileged = sc.is_some_and(|s| s.privileged);
    let cwd = if !config.working_dir.is_empty() {
        config.working_dir.clone()
    } else if !image.working_dir.is_empty() {
        image.working_dir.clone()
    } else {
        "/".to_owned()
    };
    if !cwd.starts_with('/') {
        return Err(invalid(format!("working dir {cwd:?} is not absolute")));
    }
    let mut process = json!({
        "terminal": config.tty,
        "args": process_args(config, image)?,
        "env": process_env(config, image, pod_hostname),
        "cwd": cwd,
        "user": process_user(sc, image)?,
        "capabilities": capabilities(sc)?,
        "noNewPrivileges": sc.is_some_and(|s| s.no_new_privs),
    });
    if config.tty {
        process["consoleSize"] = json!({"height": 24, "width": 80});
    }
    let mut linux_json = json!({
        "resources": resources(linux.and_then(|l| l.resources.as_ref())),
    });
    if let Some(sc) = sc {
        if !privileged {
            linux_json["maskedPaths"] = json!(sc.masked_paths);
            linux_json["readonlyPaths"] = json!(sc.readonly_paths);
        }
        if let Some(profile) = seccomp(sc.seccomp.as_ref(), privileged)? {
            linux_json["seccomp"] = profile;
        }
    }
    // As containerd's CRI does on cgroup v2: the container's own cgroup at /sys/fs/cgroup, in
    // a cgroup namespace, read-only unless privileged, so that runtimes inside (the JVM, Go's
    // automaxprocs) see their limits.
    if !privileged {
        linux_json["namespaces"] = json!([{"type": "cgroup"}]);
    }
    let cgroup_access = if privileged { "rw" } else { "ro" };
    let spec = json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": sc.is_some_and(|s| s.readonly_rootfs)},
        "hostname": pod_hostname,
        "process": process,
        "mounts": [{
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", cgroup_access],
        }],
        "linux": linux_json,
    });
    serde_json::to_vec(&spec).map_err(|e| Status::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/docker-entrypoint.sh".into()],
            cmd: vec!["nginx".into(), "-g".into()],
            env: vec!["PATH=/usr/bin".into(), "A=image".into()],
            working_dir: "/srv".into(),
            user: "101:102".into(),
            ..Default::default()
        }
    }

    #[test]
    fn containers_see_their_own_cgroup() {
        let mut c = cri::ContainerConfig {
            command: vec!["sh".into()],
            ..Default::default()
        };
        let spec: Value = serde_json::from_slice(&build(&c, &image(), "pod").unwrap()).unwrap();
        assert_eq!(spec["mounts"][0]["destination"], "/sys/fs/cgroup");
        assert_eq!(spec["mounts"][0]["type"], "cgroup");
        assert!(spec["mounts"][0]["options"]
            .as_array()
            .unwrap()
            .contains(&json!("ro")));
        assert_eq!(spec["linux"]["namespaces"], json!([{"type": "cgroup"}]));
        // Privileged: the VM's whole cgroup tree, writable, no cgroup namespace.
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                privileged: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        let spec: Value = serde_json::from_slice(&build(&c, &image(), "pod").unwrap()).unwrap();
        assert!(spec["mounts"][0]["options"]
            .as_array()
            .unwrap()
            .contains(&json!("rw")));
        assert!(spec["linux"].get("namespaces").is_none());
    }

    #[test]
    fn args_follow_docker_rules() {
        let mut c = cri::ContainerConfig::default();
        assert_eq!(
            process_args(&c, &image()).unwrap(),
            ["/docker-entrypoint.sh", "nginx", "-g"]
        );
        c.args = vec!["x".into()];
        assert_eq!(
            process_args(&c, &image()).unwrap(),
            ["/docker-entrypoint.sh", "x"]
        );
        c.command = vec!["sh".into()];
        assert_eq!(process_args(&c, &image()).unwrap(), ["sh", "x"]);
        assert!(process_args(&cri::ContainerConfig::default(), &ImageConfig::default()).is_err());
    }

    #[test]
    fn env_user_caps() {
        let c = cri::ContainerConfig {
            envs: vec![cri::KeyValue {
                key: "A".into(),
                value: "config".into(),
            }],
            ..Default::default()
        };
        let env = process_env(&c, &image(), "pod");
        assert!(env.contains(&"A=config".to_owned()));
        assert!(env.contains(&"PATH=/usr/bin".to_owned()));
        assert!(env.contains(&"HOSTNAME=pod".to_owned()));
        let u = process_user(None, &image()).unwrap();
        assert_eq!(
            (u["uid"].as_u64(), u["gid"].as_u64()),
            (Some(101), Some(102))
        );
        let named = ImageConfig {
            user: "nginx".into(),
            ..Default::default()
        };
        assert!(process_user(None, &named).is_err());
        let sc = cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 1000 }),
            capabilities: Some(cri::Capability {
                add_capabilities: vec!["NET_ADMIN".into()],
                drop_capabilities: vec!["CAP_NET_RAW".into()],
                add_ambient_capabilities: vec![],
            }),
            ..Default::default()
        };
        assert_eq!(process_user(Some(&sc), &image()).unwrap()["uid"], 1000);
        let caps = capabilities(Some(&sc)).unwrap();
        let b: Vec<&str> = caps["bounding"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(b.contains(&"CAP_NET_ADMIN") && !b.contains(&"CAP_NET_RAW"));
    }

    #[test]
    fn resources_and_seccomp() {
        let r = cri::LinuxContainerResources {
            cpu_quota: 50000,
            cpu_period: 100000,
            memory_limit_in_bytes: 1 << 26,
            ..Default::default()
        };
        let v = resources(Some(&r));
        assert_eq!(v["cpu"]["quota"], 50000);
        assert_eq!(v["memory"]["limit"], 1 << 26);
        let rd = cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        };
        let s = seccomp(Some(&rd), false).unwrap().unwrap();
        assert_eq!(s["defaultAction"], "SCMP_ACT_ALLOW");
        assert!(seccomp(Some(&rd), true).unwrap().is_none());
        let bad = cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Localhost as i32,
            localhost_ref: "relative.json".into(),
        };
        assert!(seccomp(Some(&bad), false).is_err());
    }
}
