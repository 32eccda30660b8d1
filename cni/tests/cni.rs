//! The real `underway` binary, run as a runtime runs it, inside a throwaway node namespace, against
//! an in-test ipamd speaking the real wire API. Needs root.

mod support;

use std::process::Command;

use serde_json::{Value, json};
use support::FakeIpamd;
use underway_tests::netns::TempNs;

const BIN: &str = env!("CARGO_BIN_EXE_underway");

struct Run {
    status: i32,
    json: Value,
    raw: String,
}

/// Runs the plugin inside `node` (or this namespace) with a clean environment.
fn cni(node: Option<&TempNs>, env: &[(&str, &str)], stdin: &str) -> Run {
    let mut cmd = match node {
        Some(n) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &n.0, BIN]);
            c
        }
        None => Command::new(BIN),
    };
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).envs(env.iter().copied());
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = if raw.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&raw).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {raw:?}"))
    };
    Run { status: out.status.code().unwrap_or(-1), json, raw }
}

fn conf(version: &str, ipamd: &FakeIpamd) -> String {
    json!({ "cniVersion": version, "name": "underway", "type": "underway", "ipamdSocket": ipamd.socket, "mtu": 1500 })
        .to_string()
}

fn env<'a>(command: &'a str, id: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
        ("CNI_ARGS", pod_args(if id == "c0ffee01" { "web-0" } else { id })),
    ]
}

/// CNI_ARGS as containerd writes them for pod `default/<name>` (each container its own pod, unless
/// a test says otherwise: the host veth is named per pod).
fn pod_args(name: &str) -> &'static str {
    Box::leak(format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}").into_boxed_str())
}

fn node() -> TempNs {
    let n = TempNs::new("node").expect("needs root");
    assert!(n.sh("ip link set lo up && ip addr add 10.99.1.1/32 dev lo && sysctl -qw net.ipv4.ip_forward=1").0);
    n
}

fn host_veths(node: &TempNs) -> usize {
    node.sh("ip -br link").1.lines().filter(|l| l.starts_with("uw")).count()
}

#[test]
fn add_check_del_cycle() {
    let ipamd = FakeIpamd::start();
    let node = node();
    let pod = TempNs::new("pod").unwrap();
    let netns = pod.path().display().to_string();
    let c = conf("1.1.0", &ipamd);

    let r = cni(Some(&node), &env("ADD", "c0ffee01", &netns), &c);
    assert_eq!(r.status, 0, "{}", r.raw);
    assert_eq!(r.json["cniVersion"], "1.1.0");
    assert_eq!(r.json["ips"][0]["address"], "10.99.0.10/32");
    assert_eq!(r.json["ips"][0]["gateway"], "169.254.1.1");
    assert!(r.json["ips"][0].get("version").is_none(), "no version field in 1.x");
    assert_eq!(r.json["interfaces"][1]["sandbox"], netns.as_str());
    assert_eq!(r.json["interfaces"][1]["name"], "eth0");
    assert_eq!(r.json["routes"][0]["dst"], "0.0.0.0/0");
    let req = ipamd.state.lock().unwrap().requests[0].clone();
    match req {
        underway_api::Request::Add(a) => {
            assert_eq!(a.pod_namespace.as_deref(), Some("default"));
            assert_eq!(a.pod_name.as_deref(), Some("web-0"));
            assert_eq!(a.netns, netns);
        }
        other => panic!("{other:?}"),
    }
    assert!(pod.sh("ping -c1 -W2 10.99.1.1").0, "pod → node");
    assert!(node.sh("ping -c1 -W2 10.99.0.10").0, "node → pod");
    let r_add = r.json.clone();

    assert_eq!(cni(Some(&node), &env("CHECK", "c0ffee01", &netns), &c).status, 0);
    // CHECK with the runtime's cached result as prevResult: this pod's is accepted, another's not.
    let with_prev = |prev: &Value| {
        let mut v: Value = serde_json::from_str(&c).unwrap();
        v["prevResult"] = prev.clone();
        v.to_string()
    };
    assert_eq!(cni(Some(&node), &env("CHECK", "c0ffee01", &netns), &with_prev(&r.json)).status, 0);
    let mut other = r.json.clone();
    other["ips"][0]["address"] = json!("10.99.0.99/32");
    let bad = cni(Some(&node), &env("CHECK", "c0ffee01", &netns), &with_prev(&other));
    assert_eq!((bad.status, bad.json["code"].as_u64()), (1, Some(7)), "{}", bad.raw);
    assert!(bad.raw.contains("prevResult") && bad.raw.contains("10.99.0.10/32"), "{}", bad.raw);
    let mut two = r.json.clone();
    two["interfaces"][0]["sandbox"] = json!(netns);
    let bad = cni(Some(&node), &env("CHECK", "c0ffee01", &netns), &with_prev(&two));
    assert!(bad.raw.contains("2 interfaces in a sandbox"), "{}", bad.raw);
    // DEL accepts the prevResult too (it is what the runtime passes).
    assert!(pod.sh("ip neigh del 169.254.1.1 dev eth0").0);
    let r = cni(Some(&node), &env("CHECK", "c0ffee01", &netns), &c);
    assert_eq!(r.status, 1);
    assert!(r.json["details"].as_str().unwrap().contains("neighbour"), "{}", r.raw);
    let r = cni(Some(&node), &env("CHECK", "unknown01", &netns), &c);
    assert_eq!(r.json["code"], 3, "ipamd holds nothing for it: {}", r.raw);

    let r = cni(Some(&node), &env("DEL", "c0ffee01", &netns), &with_prev(&r_add));
    assert_eq!((r.status, r.raw.as_str()), (0, ""), "DEL prints nothing");
    assert_eq!(ipamd.assigned(), 0);
    assert_eq!(host_veths(&node), 0);
    assert_eq!(cni(Some(&node), &env("DEL", "c0ffee01", &netns), &c).status, 0, "DEL twice");
}

#[test]
fn results_are_written_in_the_asked_version() {
    let ipamd = FakeIpamd::start();
    let node = node();
    for (i, v) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"].into_iter().enumerate() {
        let pod = TempNs::new("pod").unwrap();
        let netns = pod.path().display().to_string();
        let id = format!("ver{i}");
        let r = cni(Some(&node), &env("ADD", &id, &netns), &conf(v, &ipamd));
        assert_eq!(r.status, 0, "{v}: {}", r.raw);
        assert_eq!(r.json["cniVersion"], v);
        assert_eq!(r.json["ips"][0].get("version").is_some(), v.starts_with('0'), "{v}: {}", r.raw);
        assert_eq!(cni(Some(&node), &env("DEL", &id, &netns), &conf(v, &ipamd)).status, 0);
    }
    assert_eq!(ipamd.assigned(), 0);
}

#[test]
fn del_variants_succeed_and_ipamd_down_is_try_again_later() {
    let mut ipamd = FakeIpamd::start();
    let node = node();
    let c = conf("1.1.0", &ipamd);
    // Empty CNI_NETNS (containerd's second DEL on RemovePodSandbox).
    assert_eq!(cni(Some(&node), &env("DEL", "never-added", ""), &c).status, 0);

    // The netns is gone before DEL: the veth went with it, the address is still released.
    let pod = TempNs::new("pod").unwrap();
    let netns = pod.path().display().to_string();
    assert_eq!(cni(Some(&node), &env("ADD", "gone01", &netns), &c).status, 0);
    drop(pod);
    assert_eq!(cni(Some(&node), &env("DEL", "gone01", &netns), &c).status, 0);
    assert_eq!(ipamd.assigned(), 0);

    // ipamd down: the datapath is removed all the same, and the runtime is told to retry.
    let pod = TempNs::new("pod").unwrap();
    let netns = pod.path().display().to_string();
    assert_eq!(cni(Some(&node), &env("ADD", "down01", &netns), &c).status, 0);
    ipamd.stop();
    let r = cni(Some(&node), &env("DEL", "down01", &netns), &c);
    assert_eq!((r.status, r.json["code"].as_u64()), (1, Some(11)), "{}", r.raw);
    assert!(r.json["details"].as_str().unwrap().contains("ipamd.sock"), "{}", r.raw);
    assert_eq!(host_veths(&node), 0, "veth removed before the error");
}

/// The veth pair is made while ipamd answers: an ADD ipamd refuses, or cannot answer, leaves no
/// veth behind (and no address: none was given); with no MTU in the conflist the pair takes the
/// one ipamd's answer carries (the fake's 1500), though it was made before the answer came.
#[test]
fn a_refused_or_unanswered_add_leaves_no_veth_and_the_pair_follows_ipamds_mtu() {
    let mut ipamd = FakeIpamd::start();
    let node = node();
    let pod = TempNs::new("pod").unwrap();
    let netns = pod.path().display().to_string();
    ipamd.state.lock().unwrap().not_ready = Some("the first sync with the cloud".into());
    let r = cni(Some(&node), &env("ADD", "refused01", &netns), &conf("1.1.0", &ipamd));
    assert_eq!((r.status, r.json["code"].as_u64()), (1, Some(11)), "{}", r.raw);
    assert!(r.json["details"].as_str().unwrap().contains("the first sync"), "{}", r.raw);
    assert_eq!(host_veths(&node), 0, "no veth left by a refused ADD");
    assert!(!pod.sh("ip -br link").1.contains("eth0"), "nor its pod end");

    ipamd.state.lock().unwrap().not_ready = None;
    let no_mtu = json!({ "cniVersion": "1.1.0", "name": "underway", "type": "underway", "ipamdSocket": ipamd.socket })
        .to_string();
    let r = cni(Some(&node), &env("ADD", "mtu01", &netns), &no_mtu);
    assert_eq!(r.status, 0, "{}", r.raw);
    assert!(pod.sh("ip link show eth0").1.contains("mtu 1500"), "{}", pod.sh("ip link show eth0").1);
    let host =
        node.sh("ip -br link").1.lines().find(|l| l.starts_with("uw")).unwrap().split('@').next().unwrap().to_string();
    assert!(node.sh(&format!("ip link show {host}")).1.contains("mtu 1500"), "the host end too");
    assert!(pod.sh("ping -c1 -W2 10.99.1.1").0, "wired: the pod reaches the node");
    assert_eq!(cni(Some(&node), &env("DEL", "mtu01", &netns), &no_mtu).status, 0);

    ipamd.stop();
    let r = cni(Some(&node), &env("ADD", "down02", &netns), &conf("1.1.0", &ipamd));
    assert_eq!((r.status, r.json["code"].as_u64()), (1, Some(11)), "{}", r.raw);
    assert_eq!(host_veths(&node), 0, "no veth left when ipamd is down");
}

#[test]
fn a_failure_after_the_rpc_leaves_no_veth_and_releases_the_address() {
    let ipamd = FakeIpamd::start();
    let node = node();
    let pod = TempNs::new("pod").unwrap();
    assert!(pod.sh("ip link add eth0 type veth peer name eth0p").0, "the pod's ifname is taken");
    let r = cni(Some(&node), &env("ADD", "fail01", &pod.path().display().to_string()), &conf("1.0.0", &ipamd));
    assert_eq!((r.status, r.json["code"].as_u64()), (1, Some(5)), "{}", r.raw);
    assert!(r.json["details"].as_str().unwrap().contains("eth0"), "{}", r.raw);
    assert_eq!(host_veths(&node), 0, "no half-made veth");
    assert_eq!(ipamd.assigned(), 0, "address released");
    let reqs = ipamd.state.lock().unwrap().requests.clone();
    assert!(matches!(reqs.last(), Some(underway_api::Request::Del(_))), "{reqs:?}");
}

#[test]
fn version_status_and_gc() {
    // Podman calls VERSION with dummy values and may send no config.
    let r = cni(None, &[("CNI_COMMAND", "VERSION"), ("CNI_NETNS", "dummy"), ("CNI_PATH", "dummy")], "");
    assert_eq!(r.status, 0, "{}", r.raw);
    assert_eq!(r.json["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
    let r = cni(None, &[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.4.0"}"#);
    assert_eq!(r.json["cniVersion"], "0.4.0");

    let mut ipamd = FakeIpamd::start();
    let c = conf("1.1.0", &ipamd);
    assert_eq!(cni(None, &[("CNI_COMMAND", "STATUS")], &c).status, 0);
    ipamd.state.lock().unwrap().not_ready = Some("waiting for IMDS".into());
    let r = cni(None, &[("CNI_COMMAND", "STATUS")], &c);
    assert_eq!(r.json["code"], 50);
    assert!(r.raw.contains("waiting for IMDS"), "{}", r.raw);
    ipamd.state.lock().unwrap().not_ready = None;

    let node = node();
    let (p1, p2) = (TempNs::new("pod").unwrap(), TempNs::new("pod").unwrap());
    assert_eq!(cni(Some(&node), &env("ADD", "keep01", &p1.path().display().to_string()), &c).status, 0);
    assert_eq!(cni(Some(&node), &env("ADD", "stale01", &p2.path().display().to_string()), &c).status, 0);
    // Issue 14 item 6: another network's pod (same prefix) and a link someone named alike are
    // not this network's to collect.
    let p3 = TempNs::new("pod").unwrap();
    let mut other: Value = serde_json::from_str(&c).unwrap();
    other["name"] = json!("othernet");
    assert_eq!(
        cni(Some(&node), &env("ADD", "other01", &p3.path().display().to_string()), &other.to_string()).status,
        0
    );
    assert!(node.sh("ip link add uwlookalike0001 type veth peer name lookalikepeer").0);
    let mut gc: Value = serde_json::from_str(&c).unwrap();
    gc["cni.dev/valid-attachments"] = json!([{ "containerID": "keep01", "ifname": "eth0" }]);
    let r = cni(Some(&node), &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")], &gc.to_string());
    assert_eq!(r.status, 0, "{}", r.raw);
    assert_eq!(ipamd.assigned(), 2, "the stale attachment's address is released (othernet's is not)");
    assert_eq!(host_veths(&node), 3, "its veth removed; othernet's veth and the look-alike kept");
    assert!(p3.sh("ping -c1 -W2 10.99.1.1").0, "the other network's pod still works");
    assert!(node.sh("ip link del uwlookalike0001").0);
    assert_eq!(
        cni(Some(&node), &env("DEL", "other01", &p3.path().display().to_string()), &other.to_string()).status,
        0
    );
    assert!(p1.sh("ping -c1 -W2 10.99.1.1").0, "the kept pod still works");

    ipamd.stop();
    let r = cni(None, &[("CNI_COMMAND", "STATUS")], &c);
    assert_eq!(r.json["code"], 50, "ipamd down: {}", r.raw);
}

/// (environment overrides, stdin, expected code, text the message must contain)
type Case<'a> = (Vec<(&'a str, &'a str)>, String, u64, &'a str);

#[test]
fn malformed_input_is_refused_with_the_code_and_the_name_at_fault() {
    let ipamd = FakeIpamd::start();
    let good = json!({ "cniVersion": "1.1.0", "name": "underway", "type": "underway", "ipamdSocket": ipamd.socket });
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c.to_string()
    };
    let without = |k: &str| {
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove(k);
        c.to_string()
    };
    let netns = "/proc/self/ns/net";
    let long_id = "a".repeat(300);
    let fifo_dir = std::env::temp_dir().join(format!("underway-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&fifo_dir).unwrap();
    let fifo_path = fifo_dir.join("netns");
    let _ = std::fs::remove_file(&fifo_path);
    nix::unistd::mkfifo(&fifo_path, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let fifo = fifo_path.display().to_string();
    let g = good.to_string();
    let unset = "";
    // (env overrides, stdin, expected code, text the message must contain)
    let cases: Vec<Case> = vec![
        (vec![("CNI_COMMAND", "")], g.clone(), 4, "CNI_COMMAND"),
        (vec![("CNI_COMMAND", "EXPLODE")], g.clone(), 4, "CNI_COMMAND"),
        (vec![("CNI_CONTAINERID", "")], g.clone(), 4, "CNI_CONTAINERID"),
        (vec![("CNI_CONTAINERID", &long_id)], g.clone(), 4, "CNI_CONTAINERID"),
        (vec![("CNI_CONTAINERID", "bad/id")], g.clone(), 4, "CNI_CONTAINERID"),
        (vec![("CNI_CONTAINERID", "-leading")], g.clone(), 4, "CNI_CONTAINERID"),
        (vec![("CNI_IFNAME", "")], g.clone(), 4, "CNI_IFNAME"),
        (vec![("CNI_IFNAME", "a-very-long-ifname")], g.clone(), 4, "CNI_IFNAME"),
        (vec![("CNI_IFNAME", "eth/0")], g.clone(), 4, "CNI_IFNAME"),
        (vec![("CNI_NETNS", "")], g.clone(), 4, "CNI_NETNS"),
        (vec![("CNI_PATH", unset)], g.clone(), 4, "CNI_PATH"),
        (vec![("CNI_NETNS", "/var/run/netns/does-not-exist")], g.clone(), 4, "CNI_NETNS"),
        // Issue 14 item 8: a FIFO (hung the plugin on open), a file that is no namespace, a mount
        // namespace, and the namespace the plugin runs in (the host's got a pod's default route).
        (vec![("CNI_NETNS", &fifo)], g.clone(), 4, "not a namespace file"),
        (vec![("CNI_NETNS", "/etc/hostname")], g.clone(), 4, "not a namespace file"),
        (vec![("CNI_NETNS", "/proc/self/ns/mnt")], g.clone(), 4, "not a network namespace"),
        (vec![("CNI_NETNS", "/proc/self/ns/uts")], g.clone(), 4, "not a network namespace"),
        (vec![("CNI_NETNS", "/proc/self/ns/net")], g.clone(), 4, "the plugin runs in"),
        (vec![("CNI_COMMAND", "CHECK"), ("CNI_NETNS", "/proc/self/ns/net")], g.clone(), 4, "the plugin runs in"),
        // The host's (pid 1's): refused, whether as the plugin's own or as unreadable.
        (vec![("CNI_NETNS", "/proc/1/ns/net")], g.clone(), 4, "CNI_NETNS"),
        // The config before the namespace, as the reference plugins: an unknown version with a
        // missing netns is a version error (code 1), not an environment one.
        (vec![("CNI_NETNS", "/var/run/netns/does-not-exist")], with("cniVersion", json!("9.9.9")), 1, "cniVersion"),
        (vec![("CNI_ARGS", "K8S_POD_NAME")], g.clone(), 4, "CNI_ARGS"),
        (vec![("CNI_ARGS", "=x")], g.clone(), 4, "CNI_ARGS"),
        (vec![], "not json".into(), 6, "decode"),
        (vec![], "[1,2]".into(), 6, "not a JSON object"),
        (vec![], "".into(), 6, "decode"),
        (vec![], without("cniVersion"), 7, "cniVersion"),
        (vec![], with("cniVersion", json!("0.2.0")), 1, "cniVersion"),
        (vec![], with("cniVersion", json!("9.9.9")), 1, "cniVersion"),
        (vec![], with("cniVersion", json!(1)), 7, "cniVersion"),
        (vec![], without("name"), 7, "name"),
        (vec![], with("name", json!("bad name")), 7, "name"),
        (vec![], with("name", json!(7)), 7, "name"),
        (vec![], without("type"), 7, "type"),
        (vec![], with("type", json!("bridge")), 7, "type"),
        (vec![], with("mtu", json!("1500")), 7, "mtu"),
        (vec![], with("mtu", json!(10)), 7, "mtu"),
        (vec![], with("mtu", json!(-1)), 7, "mtu"),
        (vec![], with("ipamdSocket", json!("relative.sock")), 7, "ipamdSocket"),
        (vec![], with("ipamdSocket", json!(["a"])), 7, "ipamdSocket"),
        (vec![], with("vethPrefix", json!("toolong")), 7, "vethPrefix"),
        (vec![], with("logLevel", json!("loud")), 7, "logLevel"),
        (vec![], with("logFile", json!("rel.log")), 7, "logFile"),
        (vec![], with("ipamdTimeoutSeconds", json!(0)), 7, "ipamdTimeoutSeconds"),
        (vec![], with("runtimeConfig", json!("x")), 7, "runtimeConfig"),
        (vec![], with("prevResult", json!(3)), 7, "prevResult"),
        (vec![("CNI_COMMAND", "CHECK")], with("cniVersion", json!("0.3.1")), 1, "cniVersion"),
        (vec![("CNI_COMMAND", "STATUS")], with("cniVersion", json!("1.0.0")), 1, "cniVersion"),
        (vec![("CNI_COMMAND", "GC")], with("cni.dev/valid-attachments", json!("all")), 7, "cni.dev/valid-attachments"),
        (
            vec![("CNI_COMMAND", "GC")],
            with("cni.dev/valid-attachments", json!([{ "ifname": "eth0" }])),
            7,
            "containerID",
        ),
    ];
    assert!(cases.len() >= 30);
    for (overrides, stdin, want_code, want_text) in cases {
        let mut e = env("ADD", "c0ffee", netns);
        // STATUS/GC and the like run without the ADD variables; DEL-only quirks are tested above.
        for (k, v) in &overrides {
            e.retain(|(ek, _)| ek != k);
            e.push((k, v));
        }
        // Missing-variable cases: an empty CNI_COMMAND or CNI_PATH stands for "not set".
        let e: Vec<(&str, &str)> =
            e.into_iter().filter(|(k, v)| !((*k == "CNI_COMMAND" || *k == "CNI_PATH") && v.is_empty())).collect();
        let r = cni(None, &e, &stdin);
        assert_eq!(r.status, 1, "{overrides:?} {stdin}: {}", r.raw);
        assert_eq!(r.json["code"].as_u64(), Some(want_code), "{overrides:?} {stdin}: {}", r.raw);
        let text = format!("{} {}", r.json["msg"], r.json["details"]);
        assert!(text.contains(want_text), "{overrides:?} {stdin}: message must name {want_text}: {text}");
    }
    assert_eq!(ipamd.assigned(), 0, "refused input assigns nothing");
}

/// A conflist `underway → portmap` (Debian's containernetworking-plugins): portmap takes our
/// result as prevResult, maps a host port to the pod's address, and passes the result on.
#[test]
fn portmap_chains_after_underway() {
    let ipamd = FakeIpamd::start();
    let node = node();
    let pod = TempNs::new("pod").unwrap();
    let netns = pod.path().display().to_string();
    let r = cni(Some(&node), &env("ADD", "chain01", &netns), &conf("1.0.0", &ipamd));
    assert_eq!(r.status, 0, "{}", r.raw);
    let pod_ip = r.json["ips"][0]["address"].as_str().unwrap().trim_end_matches("/32").to_string();

    let portmap = |command: &str| {
        let conf = json!({
            "cniVersion": "1.0.0", "name": "underway", "type": "portmap",
            "capabilities": { "portMappings": true },
            "runtimeConfig": { "portMappings": [{ "hostPort": 18080, "containerPort": 80, "protocol": "tcp" }] },
            "prevResult": r.json,
        });
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &node.0, "/usr/lib/cni/portmap"]).env_clear();
        c.envs(env(command, "chain01", &netns)).env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        let mut child = c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = portmap("ADD");
    assert!(out.status.success(), "portmap ADD: {}", String::from_utf8_lossy(&out.stdout));
    let chained: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(chained["ips"], r.json["ips"], "portmap passes our result on");
    let (_, nat) = node.sh("iptables -t nat -S");
    assert!(nat.contains(&format!("--to-destination {pod_ip}:80")), "DNAT to the pod: {nat}");

    assert!(portmap("DEL").status.success());
    assert!(!node.sh("iptables -t nat -S").1.contains(&pod_ip));
    assert_eq!(cni(Some(&node), &env("DEL", "chain01", &netns), &conf("1.0.0", &ipamd)).status, 0);
}

/// An address of a secondary ENI: ADD adds the two policy rules; DEL, which knows only the host
/// veth's name, finds the address from the host route and removes them.
#[test]
fn a_secondary_eni_address_gets_rules_that_del_removes() {
    let ipamd = FakeIpamd::start();
    ipamd.state.lock().unwrap().route_table = Some(101);
    let node = node();
    let pod = TempNs::new("pod").unwrap();
    let netns = pod.path().display().to_string();
    let c = conf("1.1.0", &ipamd);
    assert_eq!(cni(Some(&node), &env("ADD", "sec01", &netns), &c).status, 0);
    let (_, rules) = node.sh("ip rule");
    assert!(rules.contains("512:\tfrom all to 10.99.0.10 lookup main"), "{rules}");
    assert!(rules.contains("1536:\tfrom 10.99.0.10 lookup 101"), "{rules}");
    assert_eq!(cni(Some(&node), &env("CHECK", "sec01", &netns), &c).status, 0);
    assert!(node.sh("ip rule del priority 1536").0);
    let r = cni(Some(&node), &env("CHECK", "sec01", &netns), &c);
    assert!(r.json["details"].as_str().unwrap().contains("rule 1536"), "{}", r.raw);

    assert_eq!(cni(Some(&node), &env("DEL", "sec01", &netns), &c).status, 0);
    let (_, rules) = node.sh("ip rule");
    assert!(!rules.contains("10.99.0.10"), "rules left after DEL: {rules}");
    assert_eq!(ipamd.assigned(), 0);
}

/// Issue 15: the host veth carries the name policy engines compute for the pod (`vethPrefix` +
/// sha1("default.web-0")[:11], here as sha1sum computes it). A newer sandbox of the same pod takes
/// the name; the older sandbox's DEL, which the runtime sends later, leaves it alone and still
/// releases its own address.
#[test]
fn the_host_veth_is_named_per_pod_and_an_older_sandboxs_del_spares_the_newer() {
    let ipamd = FakeIpamd::start();
    let node = node();
    let (old_pod, new_pod) = (TempNs::new("pod").unwrap(), TempNs::new("pod").unwrap());
    let (old_ns, new_ns) = (old_pod.path().display().to_string(), new_pod.path().display().to_string());
    let c = conf("1.1.0", &ipamd);
    let sha = Command::new("sh").args(["-c", "printf %s default.web-0 | sha1sum"]).output().unwrap();
    let want = format!("uw{}", &String::from_utf8_lossy(&sha.stdout)[..11]);
    let same_pod = |command: &'static str, id: &'static str, netns: &'static str| {
        let mut e = env(command, id, netns);
        e.retain(|(k, _)| *k != "CNI_ARGS");
        e.push(("CNI_ARGS", pod_args("web-0")));
        e
    };
    let (old_ns, new_ns): (&'static str, &'static str) = (Box::leak(old_ns.into()), Box::leak(new_ns.into()));
    let r = cni(Some(&node), &same_pod("ADD", "sandbox01", old_ns), &c);
    assert_eq!(r.status, 0, "{}", r.raw);
    assert_eq!(r.json["interfaces"][0]["name"], want.as_str());
    let old_ip = r.json["ips"][0]["address"].as_str().unwrap().trim_end_matches("/32").to_string();
    // The newer sandbox's ADD refused by ipamd leaves the older sandbox's veth (of the same
    // name) and its route as they were: the veth pair made while ipamd answers must not have
    // replaced it.
    ipamd.state.lock().unwrap().not_ready = Some("the first sync with the cloud".into());
    let r = cni(Some(&node), &same_pod("ADD", "sandbox02", new_ns), &c);
    assert_eq!((r.status, r.json["code"].as_u64()), (1, Some(11)), "{}", r.raw);
    assert!(node.sh(&format!("ping -c1 -W2 {old_ip}")).0, "the older sandbox still answers");
    assert_eq!(host_veths(&node), 1);
    ipamd.state.lock().unwrap().not_ready = None;
    let r = cni(Some(&node), &same_pod("ADD", "sandbox02", new_ns), &c);
    assert_eq!(r.status, 0, "{}", r.raw);
    let new_ip = r.json["ips"][0]["address"].as_str().unwrap().trim_end_matches("/32").to_string();
    assert_eq!(host_veths(&node), 1, "the older sandbox's veth was replaced");
    assert_eq!(ipamd.assigned(), 2);
    assert_eq!(cni(Some(&node), &same_pod("DEL", "sandbox01", old_ns), &c).status, 0);
    assert_eq!(ipamd.assigned(), 1, "the older sandbox's address is released");
    assert!(node.sh(&format!("ip -br link show {want}")).0, "the newer sandbox's veth stays");
    assert!(node.sh(&format!("ping -c1 -W2 {new_ip}")).0, "and its pod still answers");
    assert_eq!(cni(Some(&node), &same_pod("CHECK", "sandbox02", new_ns), &c).status, 0);
    // A pod made without the pod's name (as before veths were named per pod: its veth has the
    // attachment's name): CHECK with the name still finds it by the alias.
    let legacy_ns = TempNs::new("pod").unwrap();
    let legacy_path: &'static str = Box::leak(legacy_ns.path().display().to_string().into());
    let mut bare_add = env("ADD", "legacy01", legacy_path);
    bare_add.retain(|(k, _)| *k != "CNI_ARGS");
    assert_eq!(cni(Some(&node), &bare_add, &c).status, 0);
    let r = cni(Some(&node), &same_pod("CHECK", "legacy01", legacy_path), &c);
    assert_eq!(r.status, 0, "CHECK finds the attachment's veth by its alias: {}", r.raw);
    let mut bare_del = env("DEL", "legacy01", legacy_path);
    bare_del.retain(|(k, _)| *k != "CNI_ARGS");
    assert_eq!(cni(Some(&node), &bare_del, &c).status, 0);
    // A DEL without the pod's name still finds its veth (by the alias).
    let mut bare = env("DEL", "sandbox02", new_ns);
    bare.retain(|(k, _)| *k != "CNI_ARGS");
    assert_eq!(cni(Some(&node), &bare, &c).status, 0);
    assert_eq!(host_veths(&node), 0);
    assert_eq!(ipamd.assigned(), 0);
}
