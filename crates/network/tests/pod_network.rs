//! Pod networks with Debian's real CNI plugins in real network namespaces (root).

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{can_run, ip_json, nat_rules_mentioning, nsenter, TestEnv};
use network::{
    format_mac, CniError, GuestRoute, Netns, NetworkConfig, NetworkError, NetworkManager,
};
use serde_json::{json, Value};

fn eth0_of(netns: &std::path::Path) -> Value {
    ip_json(netns, &["addr", "show", "dev", "eth0"])[0].clone()
}

fn global_v4(link: &Value) -> (IpAddr, u8) {
    let a = link["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["family"] == "inet" && a["scope"] == "global")
        .unwrap();
    (
        a["local"].as_str().unwrap().parse().unwrap(),
        u8::try_from(a["prefixlen"].as_u64().unwrap()).unwrap(),
    )
}

#[test]
fn setup_teardown_two_pods() {
    if !can_run() {
        return;
    }
    let env = TestEnv::new(11);
    env.write_default_conflist();
    env.mgr.status().unwrap();

    let req_a = env.request_with_port("a", 18011);
    let a = env.mgr.setup(&req_a).unwrap();
    let ns_a = env.mgr.netns_path(&req_a.pod_id);
    assert_eq!(a.netns, ns_a);
    assert_eq!(a.tap, "tap0");
    Netns::open(&ns_a).expect("the netns file is a network namespace");

    // eth0 as the plugins left it, seen through nsenter.
    let eth0 = eth0_of(&ns_a);
    let (ip, prefix) = global_v4(&eth0);
    assert_eq!(prefix, 24);
    assert!(
        ip.to_string().starts_with(&format!("10.88.{}.", env.idx)),
        "{ip}"
    );
    assert_eq!(a.pod_ip, Some(ip));
    assert!(a.additional_ips.is_empty());
    assert_eq!(a.interface.name, "eth0");
    assert_eq!(a.interface.addresses, vec![(ip, 24)]);
    assert_eq!(
        format_mac(&a.interface.mac),
        eth0["address"].as_str().unwrap()
    );
    assert_eq!(u64::from(a.interface.mtu), eth0["mtu"].as_u64().unwrap());
    let gw: IpAddr = env.gateway().parse().unwrap();
    assert!(
        a.routes.contains(&GuestRoute {
            destination: "0.0.0.0/0".into(),
            gateway: Some(gw),
        }),
        "{:?}",
        a.routes
    );
    assert!(
        a.routes.iter().all(|r| r.destination != "10.88.11.0/24"),
        "connected routes are the guest kernel's: {:?}",
        a.routes
    );

    // The tap, up with eth0's MTU, and the redirect both ways.
    let tap = ip_json(&ns_a, &["link", "show", "dev", "tap0"])[0].clone();
    assert_eq!(tap["mtu"], eth0["mtu"]);
    assert!(
        tap["flags"].as_array().unwrap().contains(&json!("UP")),
        "{tap}"
    );
    let tap_addrs = ip_json(&ns_a, &["addr", "show", "dev", "tap0"])[0]["addr_info"].clone();
    assert_eq!(tap_addrs, json!([]), "the tap has no address of its own");
    let f = nsenter(&ns_a, &["tc", "filter", "show", "dev", "eth0", "ingress"]);
    assert!(f.contains("mirred") && f.contains("tap0"), "{f}");
    let f = nsenter(&ns_a, &["tc", "filter", "show", "dev", "tap0", "ingress"]);
    assert!(f.contains("mirred") && f.contains("eth0"), "{f}");

    // The host side: the lease, the veth on the bridge, portmap's and ipMasq's rules.
    assert_eq!(env.reservations(), vec![ip.to_string()]);
    assert_eq!(env.bridge_ports(), 1);
    let rules = nat_rules_mentioning(&req_a.pod_id);
    assert!(rules.iter().any(|r| r.contains("18011")), "{rules:#?}");

    // The record serves recovery; a second setup is refused.
    assert_eq!(env.mgr.pod_network(&req_a.pod_id).unwrap(), Some(a.clone()));
    assert_eq!(env.mgr.pods().unwrap(), vec![req_a.pod_id.clone()]);
    assert!(matches!(
        env.mgr.setup(&req_a),
        Err(NetworkError::AlreadyExists(_))
    ));

    // A second pod gets another address.
    let req_b = env.request("b");
    let b = env.mgr.setup(&req_b).unwrap();
    assert_ne!(b.pod_ip, a.pod_ip);
    assert_ne!(b.interface.mac, a.interface.mac);
    assert_eq!(env.reservations().len(), 2);
    assert_eq!(env.bridge_ports(), 2);

    // Teardown releases everything of pod a, and only that.
    env.mgr.teardown(&req_a.pod_id).unwrap();
    assert!(!ns_a.exists());
    assert_eq!(env.reservations(), vec![b.pod_ip.unwrap().to_string()]);
    assert_eq!(env.bridge_ports(), 1);
    assert!(nat_rules_mentioning(&req_a.pod_id).is_empty());
    assert_eq!(env.mgr.pod_network(&req_a.pod_id).unwrap(), None);
    env.mgr.teardown(&req_a.pod_id).unwrap();

    env.mgr.teardown(&req_b.pod_id).unwrap();
    env.mgr.teardown(&req_b.pod_id).unwrap();
    assert!(env.reservations().is_empty());
    assert_eq!(env.bridge_ports(), 0);
    assert!(env.netns_files().is_empty());
    assert!(env.mgr.pods().unwrap().is_empty());
}

#[test]
fn failing_plugin_reports_its_message_and_leaves_nothing() {
    if !can_run() {
        return;
    }
    let env = TestEnv::new(12);
    env.write_fake_plugin(
        "hnt-fail",
        r#"if [ "$CNI_COMMAND" = ADD ]; then
  echo '{"cniVersion":"1.0.0","code":111,"msg":"synthetic failure from hnt-fail","details":"test"}'
  exit 1
fi"#,
    );
    env.write_conflist(vec![
        env.bridge_plugin(),
        json!({"type": "hnt-fail", "capabilities": {"portMappings": true}, "answer": 42}),
    ]);
    let req = env.request_with_port("a", 18012);
    let err = env.mgr.setup(&req).unwrap_err();
    assert!(
        err.to_string().contains("synthetic failure from hnt-fail"),
        "{err}"
    );
    match &err {
        NetworkError::Cni(CniError::Plugin {
            plugin, code, msg, ..
        }) => {
            assert_eq!(plugin, "hnt-fail");
            assert_eq!(*code, 111);
            assert_eq!(msg, "synthetic failure from hnt-fail");
        }
        e => panic!("unexpected error {e:?}"),
    }

    // What the plugin was given: the exec protocol.
    let stdin: Value =
        serde_json::from_str(&env.fake_log("hnt-fail", "ADD", "stdin").unwrap()).unwrap();
    assert_eq!(stdin["name"], env.net_name.as_str());
    assert_eq!(stdin["cniVersion"], "1.0.0");
    assert_eq!(stdin["answer"], 42);
    assert_eq!(
        stdin["runtimeConfig"],
        json!({"portMappings": [{"hostPort": 18012, "containerPort": 80, "protocol": "tcp"}]})
    );
    let prev = &stdin["prevResult"];
    assert_eq!(prev["cniVersion"], "1.0.0");
    assert!(prev["ips"][0]["address"]
        .as_str()
        .unwrap()
        .starts_with("10.88.12."));
    let add_env = env.fake_log("hnt-fail", "ADD", "env").unwrap();
    let netns = env.mgr.netns_path(&req.pod_id);
    for line in [
        "CNI_COMMAND=ADD".to_string(),
        format!("CNI_CONTAINERID={}", req.pod_id),
        format!("CNI_NETNS={}", netns.display()),
        "CNI_IFNAME=eth0".to_string(),
        format!(
            "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=hn-test;K8S_POD_NAME=pod-a;\
             K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID=uid-a",
            req.pod_id
        ),
        format!("CNI_PATH={}:/usr/lib/cni", env.fake_bin.display()),
    ] {
        assert!(add_env.lines().any(|l| l == line), "{line} in\n{add_env}");
    }

    // The rollback ran DEL through the chain (no result to pass: ADD failed).
    let del: Value =
        serde_json::from_str(&env.fake_log("hnt-fail", "DEL", "stdin").unwrap()).unwrap();
    assert!(del.get("prevResult").is_none(), "{del}");
    assert!(env.netns_files().is_empty());
    assert!(env.reservations().is_empty());
    assert_eq!(env.bridge_ports(), 0);
    assert!(env.mgr.pods().unwrap().is_empty());
    env.mgr.teardown(&req.pod_id).unwrap();
}

#[test]
fn teardown_passes_the_cached_result_and_tolerates_a_missing_netns() {
    if !can_run() {
        return;
    }
    let env = TestEnv::new(13);
    // A pass-through plugin: its result is its prevResult.
    env.write_fake_plugin(
        "hnt-log",
        r#"if [ "$CNI_COMMAND" = ADD ]; then
  python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["prevResult"]))' "$log.stdin"
fi"#,
    );
    // Without ipMasq: bridge removes its masquerade rules on DEL only when it can still find
    // the addresses in the namespace, so they would outlive this test (a plugin limitation).
    env.write_conflist(vec![
        env.bridge_plugin_masq(false),
        json!({"type": "hnt-log"}),
    ]);
    let req = env.request("a");
    let net = env.mgr.setup(&req).unwrap();
    let ip = net.pod_ip.unwrap().to_string();
    assert_eq!(env.reservations(), vec![ip.clone()]);

    // The namespace vanishes behind the manager's back (say, a reboot).
    let ns = env.mgr.netns_path(&req.pod_id);
    nix::mount::umount2(&ns, nix::mount::MntFlags::MNT_DETACH).unwrap();
    std::fs::remove_file(&ns).unwrap();
    // And the configuration directory changes: DEL must use the recorded one.
    std::fs::remove_file(env.conf_dir.join("10-test.conflist")).unwrap();

    env.mgr.teardown(&req.pod_id).unwrap();
    assert!(env.reservations().is_empty(), "the lease is released");
    let del: Value =
        serde_json::from_str(&env.fake_log("hnt-log", "DEL", "stdin").unwrap()).unwrap();
    assert_eq!(
        del["prevResult"]["ips"][0]["address"],
        format!("{ip}/24").as_str()
    );
    let del_env = env.fake_log("hnt-log", "DEL", "env").unwrap();
    assert!(!del_env.contains("CNI_NETNS="), "{del_env}");
    env.mgr.teardown(&req.pod_id).unwrap();
}

#[test]
fn teardown_with_a_corrupt_record_uses_the_current_config() {
    if !can_run() {
        return;
    }
    let env = TestEnv::new(17);
    env.write_default_conflist();
    let req = env.request("a");
    let net = env.mgr.setup(&req).unwrap();
    assert_eq!(env.reservations().len(), 1);
    std::fs::write(env.state_dir.join(format!("{}.json", req.pod_id)), "{").unwrap();
    assert!(matches!(
        env.mgr.pod_network(&req.pod_id),
        Err(NetworkError::State(_))
    ));
    env.mgr.teardown(&req.pod_id).unwrap();
    assert!(env.reservations().is_empty());
    assert_eq!(env.bridge_ports(), 0);
    assert!(!net.netns.exists());
    assert!(env.mgr.pods().unwrap().is_empty());
}

#[test]
fn missing_plugin_and_status_reasons() {
    if !can_run() {
        return;
    }
    let env = TestEnv::new(14);
    let reason = env.mgr.status().unwrap_err();
    assert_eq!(
        reason,
        format!("no CNI config in {}", env.conf_dir.display())
    );
    let err = env.mgr.setup(&env.request("a")).unwrap_err();
    assert!(
        matches!(err, NetworkError::Cni(CniError::NoConfig { .. })),
        "{err}"
    );

    env.write_conflist(vec![
        env.bridge_plugin(),
        json!({"type": "hnt-nonexistent"}),
    ]);
    let reason = env.mgr.status().unwrap_err();
    assert!(
        reason.contains("hnt-nonexistent") && reason.contains("not found"),
        "{reason}"
    );
    let err = env.mgr.setup(&env.request("a")).unwrap_err();
    assert!(
        matches!(&err, NetworkError::Cni(CniError::PluginNotFound { plugin, .. }) if plugin == "hnt-nonexistent"),
        "{err}"
    );
    assert!(env.netns_files().is_empty());
    assert!(env.mgr.pods().unwrap().is_empty());

    // An invalid file is skipped for the next valid one.
    std::fs::write(env.conf_dir.join("05-broken.conflist"), "{").unwrap();
    env.write_default_conflist();
    env.mgr.status().unwrap();
}

#[test]
fn plugin_timeout_kills_and_rolls_back() {
    if !can_run() {
        return;
    }
    let env = TestEnv::with_timeout(15, Duration::from_secs(1));
    env.write_fake_plugin(
        "hnt-slow",
        r#"[ "$CNI_COMMAND" = ADD ] && exec sleep 60; exit 0"#,
    );
    env.write_conflist(vec![env.bridge_plugin(), json!({"type": "hnt-slow"})]);
    let start = Instant::now();
    let err = env.mgr.setup(&env.request("a")).unwrap_err();
    assert!(
        matches!(&err, NetworkError::Cni(CniError::Timeout { plugin, .. }) if plugin == "hnt-slow"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(env.netns_files().is_empty());
    assert!(env.reservations().is_empty());
    assert_eq!(env.bridge_ports(), 0);
}

#[test]
fn parallel_pods_get_distinct_addresses() {
    if !can_run() {
        return;
    }
    let env = TestEnv::new(16);
    env.write_default_conflist();
    let reqs: Vec<_> = (0..4).map(|i| env.request(&format!("p{i}"))).collect();
    let nets: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = reqs.iter().map(|r| s.spawn(|| env.mgr.setup(r))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    let mut ips: Vec<_> = nets.iter().map(|n| n.pod_ip.unwrap()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 4);
    assert_eq!(env.reservations().len(), 4);
    std::thread::scope(|s| {
        for r in &reqs {
            s.spawn(|| env.mgr.teardown(&r.pod_id).unwrap());
        }
    });
    assert!(env.reservations().is_empty());
    assert_eq!(env.bridge_ports(), 0);
}

#[test]
fn invalid_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mgr = NetworkManager::new(NetworkConfig {
        conf_dir: dir.path().join("net.d"),
        bin_dirs: vec![dir.path().join("bin")],
        netns_dir: dir.path().join("netns"),
        state_dir: dir.path().join("state"),
        plugin_timeout: Duration::from_secs(1),
    });
    for bad in ["", "../etc", "a/b", ".x", &"y".repeat(129)] {
        assert!(matches!(
            mgr.teardown(bad),
            Err(NetworkError::InvalidPodId(_))
        ));
        let req = network::PodNetworkRequest {
            pod_id: bad.to_string(),
            name: "n".into(),
            namespace: "ns".into(),
            uid: "u".into(),
            port_mappings: vec![],
        };
        assert!(matches!(
            mgr.setup(&req),
            Err(NetworkError::InvalidPodId(_))
        ));
    }
    let req = network::PodNetworkRequest {
        pod_id: "ok".into(),
        name: "a;b".into(),
        namespace: "ns".into(),
        uid: "u".into(),
        port_mappings: vec![],
    };
    assert!(matches!(
        mgr.setup(&req),
        Err(NetworkError::InvalidRequest(_))
    ));
    // Tearing down a pod never set up is fine.
    mgr.teardown("never-set-up").unwrap();
}
