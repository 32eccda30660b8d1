//! Shared pieces of ipamd's tests on the test world.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[allow(unused_imports)] // not every test file (or the bench) runs the CNI binary
pub use underway_tests::cni::{address, cni, conf};

use aws_sdk_ec2::types::Filter;
use underway_api::{AddRequest, Allocation, AttachmentKey, Request, Response};
use underway_tests::ipamd::IpamdProcess;
use underway_tests::world::{Node, World};

pub const IPAMD: &str = env!("CARGO_BIN_EXE_underway-ipamd");

/// Timings short enough for tests; top-level keys only (tables may follow).
/// Short timings for tests: cooldowns and the release hold of 1 s instead of 30 (surplus goes back
/// within a test's patience), a reconcile every 500 ms.
pub const FAST: &str = "cooldown_ms = 1000\nrelease_hold_ms = 1000\nadd_wait_ms = 10000\nreconcile_interval_ms = 500\n";

pub async fn world(instance_type: &str) -> (World, Arc<Node>) {
    let w = World::create().await.unwrap();
    let n = w.add_node(instance_type).await.unwrap();
    w.start_sync_loop(Duration::from_millis(200));
    (w, n)
}

/// The ipamd binary to run: this build's, or `UNDERWAY_IPAMD_BIN` when set (the node bench
/// measures another profile's build with it, e.g. `--profile ipamd`).
pub fn ipamd_bin() -> std::path::PathBuf {
    std::env::var_os("UNDERWAY_IPAMD_BIN").map_or_else(|| Path::new(IPAMD).to_path_buf(), Into::into)
}

pub fn start(w: &World, n: &Node, extra: &str) -> IpamdProcess {
    IpamdProcess::start(w, n, &ipamd_bin(), extra).unwrap()
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

/// The node's ENIs as EC2 describes them (attached to its instance).
pub async fn node_enis(w: &World, n: &Node) -> Vec<aws_sdk_ec2::types::NetworkInterface> {
    let out = w
        .ec2()
        .client
        .describe_network_interfaces()
        .filters(Filter::builder().name("attachment.instance-id").values(&n.instance_id).build())
        .send()
        .await
        .unwrap();
    out.network_interfaces().to_vec()
}

/// The node's ENIs as EC2 has them: (id, device index, secondary addresses).
pub async fn enis_in_ec2(w: &World, n: &Node) -> Vec<(String, u32, Vec<Ipv4Addr>)> {
    let mut v: Vec<_> = node_enis(w, n)
        .await
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

/// (destination, target instance or ENI) of every route of a table that points to one.
pub async fn routes(w: &World, table: &str) -> Vec<(String, String)> {
    let o = w.ec2().client.describe_route_tables().route_table_ids(table).send().await.unwrap();
    let mut v: Vec<_> = o.route_tables()[0]
        .routes()
        .iter()
        .filter_map(|r| {
            let target = r.instance_id().or(r.network_interface_id())?;
            Some((r.destination_cidr_block()?.to_string(), target.to_string()))
        })
        .collect();
    v.sort();
    v
}

/// The VPC's main route table (tagged for the world's cluster).
pub async fn main_table(w: &World) -> String {
    w.main_route_table().await.unwrap()
}

/// The node's primary ENI (device 0).
pub async fn primary_eni(w: &World, n: &Node) -> String {
    let enis = node_enis(w, n).await;
    let p = enis.iter().find(|e| e.attachment().and_then(|a| a.device_index()) == Some(0)).expect("a primary ENI");
    p.network_interface_id().unwrap().to_string()
}

/// `promtool check metrics` (Debian's prometheus package) on a scrape: (clean, what it said).
pub fn promtool_check(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; deploy/local/prereqs installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}
