//! Issue 15, NodePort: a VPC host connects to a node's NodePort that kube-proxy DNATs to a pod on
//! a secondary ENI, with externalTrafficPolicy=Local (no SNAT: the pod answers the client's own
//! address). The reply must leave by the primary ENI; by the pod's ENI, with the node's address
//! as source (kube-proxy's DNAT undone), the VPC's source check drops it. kube-proxy is played in
//! its three shapes (iptables-legacy, iptables-nft, native nftables), each beside a Calico-like
//! `mangle PREROUTING -j ACCEPT`. Negative control: `egress.node_port = false`. Needs root.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use underway_tests::cni::{address, chain, cni, conf};
use underway_tests::ipamd::{IpamdProcess, bin_path};
use underway_tests::kube_proxy::{Rules, SHAPES, node_port};
use underway_tests::netns::TempNs;
use underway_tests::world::World;

fn serve(ns: &str) {
    underway_tests::internet::serve_peer_address(ns).unwrap();
}

fn connect(ns: &str, to: SocketAddr) -> Option<String> {
    underway_tests::internet::connect_from(ns, to)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodeport_reaches_a_secondary_eni_pod_in_every_kube_proxy_shape() {
    let w = World::create().await.unwrap();
    let a = w.add_node("m5.large").await.unwrap();
    let client = w.add_node("m5.large").await.unwrap();
    w.start_sync_loop(Duration::from_millis(200));
    let bin = bin_path("underway-ipamd").unwrap();
    let cfg = |node_port: bool| {
        format!(
            "cooldown_ms = 1000\nadd_wait_ms = 15000\n[targets]\nwarm_ip_target = 12\n[egress]\nnode_port = {node_port}\n"
        )
    };
    let mut d = IpamdProcess::start(&w, &a, &bin, &cfg(false)).unwrap();
    d.wait_ready(12, Duration::from_secs(90)).unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    // Pods until one is on the secondary ENI (it has a `from` rule).
    let mut pods = Vec::new();
    let pod = loop {
        let ns = TempNs::new("np").unwrap();
        let id = format!("np{}", pods.len());
        let (code, v) = cni(&a.ns, "ADD", &id, &ns.path().display().to_string(), &conf(&d));
        assert_eq!(code, 0, "{v}");
        let addr = address(&v);
        let rules = String::from_utf8_lossy(&a.exec(&["ip", "rule"]).unwrap().stdout).to_string();
        pods.push(ns);
        if rules.contains(&format!("from {addr} lookup")) {
            break addr;
        }
        assert!(pods.len() < 13, "no pod landed on the secondary ENI");
    };
    serve(&pods.last().unwrap().0);
    let (a_ip, client_ip) = (a.primary_ip().unwrap(), client.primary_ip().unwrap());
    let target = SocketAddr::from((a_ip, 30080));
    let Rules { install, remove } = node_port("nftables", 30080, pod);
    assert!(a.exec(&["sh", "-c", &install]).unwrap().status.success(), "{install}");
    // Negative control: without NodePort support the reply leaves by eth1 as the node's address.
    // Per-link counters on the node say which ENI a packet left by (the router's source-check
    // counters restart whenever the fabric is re-applied, so they only back this up).
    let tx = |l: &str| -> u64 {
        let p = format!("/sys/class/net/{l}/statistics/tx_packets");
        String::from_utf8_lossy(&a.exec(&["cat", &p]).unwrap().stdout).trim().parse().unwrap()
    };
    let eth1 = tx("eth1");
    assert_eq!(connect(&client.ns, target), None, "without node_port the NodePort fails");
    assert!(tx("eth1") > eth1, "its reply left by the pod's ENI (eth1), where the source check drops it");
    assert!(a.exec(&["sh", "-c", &remove]).unwrap().status.success());
    // With it (ipamd restarted with the option; the table is replaced).
    d.stop();
    std::fs::write(
        &d.config,
        std::fs::read_to_string(&d.config).unwrap().replace("node_port = false", "node_port = true"),
    )
    .unwrap();
    d.spawn().unwrap();
    d.wait_ready(0, Duration::from_secs(60)).unwrap();
    // The table is in place once ipamd serves its first step; give it a moment.
    let t = std::time::Instant::now();
    while !String::from_utf8_lossy(&a.exec(&["nft", "list", "table", "ip", "underway"]).unwrap().stdout)
        .contains("NodePort")
    {
        assert!(t.elapsed() < Duration::from_secs(20), "the NodePort rules never appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
    for shape in SHAPES {
        let Rules { install, remove } = node_port(shape, 30080, pod);
        assert!(a.exec(&["sh", "-c", &install]).unwrap().status.success(), "{shape}: {install}");
        let eth1 = tx("eth1");
        assert_eq!(
            connect(&client.ns, target).as_deref(),
            Some(client_ip.to_string().as_str()),
            "{shape}: the pod answers the client, and sees its address"
        );
        assert_eq!(tx("eth1"), eth1, "{shape}: nothing of it left by eth1");
        assert!(a.exec(&["sh", "-c", &remove]).unwrap().status.success(), "{shape}: {remove}");
    }

    // hostPort: the conflist as deploy/k8s ships it (underway → portmap), with the test's probe
    // last, checking the prevResult it is handed. Pods until one is on the secondary ENI.
    let record = std::env::temp_dir().join(format!("underway-probe-{}.jsonl", std::process::id()));
    let conflist = json!({
        "cniVersion": "1.0.0", "name": "underway",
        "plugins": [
            { "type": "underway", "ipamdSocket": d.socket },
            { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true },
            { "type": "underway-probe", "record": record },
        ]
    });
    let runtime = json!({ "portMappings": [{ "hostPort": 18080, "containerPort": 80, "protocol": "tcp" }] });
    let (hp, result) = (0..13)
        .find_map(|i| {
            let ns = TempNs::new("hp").unwrap();
            let id = format!("hp{i}");
            let r = chain(None, &a.ns, "ADD", &id, &ns.path().display().to_string(), &conflist, &runtime, None)
                .unwrap_or_else(|e| panic!("chained ADD {id}: {e:?}"));
            let rules = String::from_utf8_lossy(&a.exec(&["ip", "rule"]).unwrap().stdout).to_string();
            let on_eth1 = rules.contains(&format!("from {} lookup", address(&r)));
            pods.push(ns);
            on_eth1.then_some((id, r))
        })
        .expect("a chained pod on the secondary ENI");
    let hp_ns = pods.last().unwrap().path().display().to_string();
    serve(&pods.last().unwrap().0);
    let seen: Vec<serde_json::Value> =
        std::fs::read_to_string(&record).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let last = seen.last().unwrap();
    assert_eq!(last["prevResult"]["ips"], result["ips"], "the probe saw underway's addresses, passed on by portmap");
    assert_eq!(last["prevResult"]["interfaces"][1]["sandbox"], hp_ns.as_str());
    let eth1 = tx("eth1");
    assert_eq!(
        connect(&client.ns, SocketAddr::from((a_ip, 18080))).as_deref(),
        Some(client_ip.to_string().as_str()),
        "the hostPort answers the client through the chained portmap"
    );
    assert_eq!(tx("eth1"), eth1, "hostPort: nothing of it left by eth1");
    // The probe refuses a prevResult that is not this pod's (its negative control).
    let mut wrong = result.clone();
    wrong["interfaces"][1]["sandbox"] = json!("/var/run/netns/another");
    let probe_only = json!({ "cniVersion": "1.0.0", "name": "underway", "plugins": [conflist["plugins"][2]] });
    let e = chain(None, &a.ns, "CHECK", &hp, &hp_ns, &probe_only, &runtime, Some(&wrong)).unwrap_err();
    assert_eq!(e.1, 1, "{e:?}");
    // CHECK through underway and the probe: Debian's portmap (1.1.1) fails CHECK on an IPv4-only
    // node ("could not check ipv6 dnat": it looks for the ip6tables chain its ADD never made);
    // kubelet and containerd never send CHECK.
    let mut no_portmap = conflist.clone();
    no_portmap["plugins"].as_array_mut().unwrap().remove(1);
    chain(None, &a.ns, "CHECK", &hp, &hp_ns, &no_portmap, &runtime, Some(&result))
        .unwrap_or_else(|e| panic!("CHECK {e:?}"));
    chain(None, &a.ns, "DEL", &hp, &hp_ns, &conflist, &runtime, Some(&result)).unwrap_or_else(|e| panic!("DEL {e:?}"));
    let commands: Vec<String> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["command"].as_str().unwrap().to_string())
        .collect();
    assert!(commands.ends_with(&["CHECK".into(), "CHECK".into(), "DEL".into()]), "{commands:?}");
    let nat = String::from_utf8_lossy(&a.exec(&["iptables", "-t", "nat", "-S"]).unwrap().stdout).to_string();
    assert!(!nat.contains(&format!("{}:80", address(&result))), "portmap's DEL removed the mapping: {nat}");
    let _ = std::fs::remove_file(&record);
}
