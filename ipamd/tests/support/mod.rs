//! Shared pieces of ipamd's tests on the test world.

#![allow(dead_code)]

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use underway_tests::ipamd::bin_path;

use aws_sdk_ec2::types::Filter;
use underway_api::{AddRequest, Allocation, AttachmentKey, Request, Response};
use underway_tests::ipamd::IpamdProcess;
use underway_tests::world::{Node, World};

pub const IPAMD: &str = env!("CARGO_BIN_EXE_underway-ipamd");

/// Timings short enough for tests; top-level keys only (tables may follow).
pub const FAST: &str = "cooldown_ms = 1000\nadd_wait_ms = 10000\nreconcile_interval_ms = 500\n";

pub async fn world(instance_type: &str) -> (World, Arc<Node>) {
    let w = World::create().await.unwrap();
    let n = w.add_node(instance_type).await.unwrap();
    w.start_sync_loop(Duration::from_millis(200));
    (w, n)
}

pub fn start(w: &World, n: &Node, extra: &str) -> IpamdProcess {
    IpamdProcess::start(w, n, Path::new(IPAMD), extra).unwrap()
}

pub fn key(c: &str) -> AttachmentKey {
    AttachmentKey { network: "underway".into(), container_id: c.into(), ifname: "eth0".into() }
}

pub fn add(p: &IpamdProcess, c: &str) -> Response {
    p.call(&Request::Add(AddRequest {
        key: key(c),
        netns: format!("/var/run/netns/{c}"),
        pod_namespace: Some("default".into()),
        pod_name: Some(c.into()),
    }))
    .unwrap()
}

pub fn added(r: Response) -> Allocation {
    match r {
        Response::Added(a) => a,
        other => panic!("expected an address, got {other:?}"),
    }
}

/// Adds `n` pods named `<prefix>-<i>` in parallel; returns (name, answer) in order.
pub fn add_parallel(p: &IpamdProcess, prefix: &str, n: usize) -> Vec<(String, Response)> {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let name = format!("{prefix}-{i}");
                s.spawn(move || {
                    let r = add(p, &name);
                    (name, r)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The value of one Prometheus sample whose line starts with `series` (name and labels).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(series)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

/// The node's ENIs as EC2 has them: (id, device index, secondary addresses).
pub async fn enis_in_ec2(w: &World, n: &Node) -> Vec<(String, u32, Vec<Ipv4Addr>)> {
    let out = w
        .ec2()
        .client
        .describe_network_interfaces()
        .filters(Filter::builder().name("attachment.instance-id").values(&n.instance_id).build())
        .send()
        .await
        .unwrap();
    let mut v: Vec<_> = out
        .network_interfaces()
        .iter()
        .map(|ni| {
            let primary = ni.private_ip_address().unwrap_or_default();
            let secondary = ni
                .private_ip_addresses()
                .iter()
                .filter_map(|a| a.private_ip_address())
                .filter(|a| *a != primary)
                .filter_map(|a| a.parse().ok())
                .collect();
            let dev = ni.attachment().and_then(|a| a.device_index()).unwrap_or(-1) as u32;
            (ni.network_interface_id().unwrap().to_string(), dev, secondary)
        })
        .collect();
    v.sort_by_key(|e| e.1);
    v
}

pub fn status(p: &IpamdProcess) -> underway_api::StatusReply {
    match p.call(&Request::Status).unwrap() {
        Response::Status(s) => s,
        other => panic!("{other:?}"),
    }
}

/// Polls `f` every 200 ms until it holds or `limit` passes; panics with `what`.
pub fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while t.elapsed() < limit {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("not within {limit:?}: {what}");
}

/// Runs the CNI plugin inside the node's namespace; returns (exit code, stdout JSON).
pub fn cni(node_ns: &str, command: &str, id: &str, netns: &str, conf: &str) -> (i32, Value) {
    let bin = bin_path("underway").unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_ns])
        .arg(&bin)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs([
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
            ("CNI_ARGS", &format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={id}")),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(conf.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let raw = String::from_utf8_lossy(&out.stdout);
    let v = if raw.trim().is_empty() { Value::Null } else { serde_json::from_str(&raw).unwrap() };
    (out.status.code().unwrap_or(-1), v)
}

pub fn conf(p: &IpamdProcess) -> String {
    json!({"cniVersion": "1.0.0", "name": "underway", "type": "underway", "ipamdSocket": p.socket}).to_string()
}

pub fn address(result: &Value) -> Ipv4Addr {
    let a = result["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no address in {result}"));
    a.split('/').next().unwrap().parse().unwrap()
}
