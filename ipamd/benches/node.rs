//! ipamd on the test world: EC2 calls per 100 pods, RSS with 250 assignments, restart → serving.
//!
//! `cargo bench -p underway-ipamd --bench node` (root; release build; LocalStack is started by
//! the harness when `UNDERWAY_LOCALSTACK_ENDPOINT` is unset). Each figure is printed beside its
//! target as a ratio. A measurement, not a test: `cargo test` does not run it.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;
use underway_api::{Request, Response};
use underway_tests::ipamd::{MUTATING, calls_by_operation as calls};

/// A `/proc/<pid>/status` figure in KiB (`VmRSS`, `RssAnon`, `RssFile`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(&format!("{field}:"))).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// "anonymous X MiB + file-backed Y MiB": what the process allocated, and the binary's and
/// libraries' pages it has mapped (clean, shared with the page cache).
fn split(pid: u32) -> String {
    let mib = |f| status_kib(pid, f) as f64 / 1024.0;
    format!("anonymous {:.1} MiB + file-backed {:.1} MiB", mib("RssAnon"), mib("RssFile"))
}

/// `n` pods, 25 at a time in parallel.
fn pods(p: &underway_tests::ipamd::IpamdProcess, prefix: &str, n: usize) {
    for chunk in 0..n.div_ceil(25) {
        let k = (n - chunk * 25).min(25);
        for (c, r) in add_parallel(p, &format!("{prefix}{chunk:02}"), k) {
            assert!(matches!(r, Response::Added(_)), "{c}: {r:?}");
        }
    }
}

async fn ec2_calls_for_100_pods(instance_type: &str, extra: &str) -> (f64, f64, String) {
    let (w, n) = world(instance_type).await;
    let p = start(&w, &n, &format!("{FAST}{extra}"));
    p.wait_ready(0, Duration::from_secs(60)).unwrap();
    pods(&p, "p", 100);
    eventually(Duration::from_secs(30), "the pool settles", || status(&p).reason == "serving");
    std::thread::sleep(Duration::from_secs(2));
    let c = calls(&p.http_get(61780, "/metrics").unwrap());
    let mutating: f64 = c.iter().filter(|(op, _)| MUTATING.contains(&op.as_str())).map(|(_, n)| n).sum();
    let describe: f64 = c.iter().filter(|(op, _)| !MUTATING.contains(&op.as_str())).map(|(_, n)| n).sum();
    let detail = c.iter().map(|(op, n)| format!("{op} {n}")).collect::<Vec<_>>().join(", ");
    (mutating, describe, detail)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    println!("## EC2 calls for 100 pods from an empty node (target: ≤ 10 mutating)");
    for (ty, extra, label) in [
        ("m5.4xlarge", "", "default targets (warm_eni_target = 1)"),
        ("m5.4xlarge", "[targets]\nwarm_ip_target = 10\n", "warm_ip_target = 10"),
        ("m5.24xlarge", "", "default targets (warm_eni_target = 1)"),
    ] {
        let (m, d, detail) = ec2_calls_for_100_pods(ty, extra).await;
        println!("{ty}, {label}: {m} mutating (ratio to target {:.2}), {d} describe — {detail}", m / 10.0);
    }

    println!("\n## RSS with 250 assignments and restart → serving (targets: ≤ 20 MiB, ≤ 200 ms)");
    let (w, n) = world("m5.24xlarge").await;
    let mut p = start(&w, &n, &format!("{FAST}[targets]\nwarm_ip_target = 10\n"));
    p.wait_ready(10, Duration::from_secs(60)).unwrap();
    let idle = rss_kib(p.pid().unwrap());
    pods(&p, "r", 250);
    std::thread::sleep(Duration::from_secs(2));
    let full = rss_kib(p.pid().unwrap());
    println!(
        "RSS: {:.1} MiB idle, {:.1} MiB with 250 assignments (ratio to 20 MiB: {:.2}; {})",
        idle as f64 / 1024.0,
        full as f64 / 1024.0,
        full as f64 / 1024.0 / 20.0,
        split(p.pid().unwrap())
    );
    let mut first = Vec::new();
    let mut synced = Vec::new();
    for _ in 0..5 {
        p.kill9();
        let t = Instant::now();
        p.spawn().unwrap();
        while !matches!(p.call(&Request::Check(key("r00-0"))), Ok(Response::Checked(_))) {
            std::thread::sleep(Duration::from_millis(2));
        }
        first.push(t.elapsed());
        while status(&p).reason != "serving" {
            std::thread::sleep(Duration::from_millis(5));
        }
        synced.push(t.elapsed());
    }
    first.sort();
    synced.sort();
    let med = |v: &[Duration]| v[v.len() / 2].as_secs_f64() * 1000.0;
    println!(
        "restart (SIGKILL) → answering from the store: median {:.0} ms of 5 (ratio to 200 ms: {:.2}); → synced with EC2 and the host: median {:.0} ms",
        med(&first),
        med(&first) / 200.0,
        med(&synced)
    );
    let rss_after = rss_kib(p.pid().unwrap());
    println!("RSS after the restarts (250 assignments from the store): {:.1} MiB", rss_after as f64 / 1024.0);

    drop(p);
    drop(w);

    println!("\n## RSS with the Kubernetes side on, by cluster size (target: ≤ 20 MiB, not growing with the cluster)");
    for nodes in [10, 5000] {
        let (rss, parts, requests) = rss_with_kubernetes(nodes).await;
        println!(
            "{nodes} Nodes: RSS {:.1} MiB with its Node watched, the Lease held and 250 assignments (ratio to 20 MiB: {:.2}; {parts}); {requests} API requests",
            rss as f64 / 1024.0,
            rss as f64 / 1024.0 / 20.0
        );
    }
}

/// ipamd with its Kubernetes side against a stand-in API server holding `nodes` Nodes: its RSS
/// (KiB) with 250 assignments, its split, and how many requests it made.
async fn rss_with_kubernetes(nodes: usize) -> (u64, String, usize) {
    let (w, n) = world("m5.24xlarge").await;
    let api = underway_tests::apiserver::FakeApiServer::in_ns(&n.ns).unwrap();
    for i in 0..nodes {
        api.put_node(serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": format!("node-{i}"), "resourceVersion": "1", "labels": {"underway.dev/pool": "general"}},
            "spec": {"podCIDR": format!("10.{}.{}.0/24", 100 + i / 256, i % 256)}}));
    }
    api.put_pool(serde_json::json!({"apiVersion": "underway.dev/v1alpha1", "kind": "UnderwayPool",
        "metadata": {"name": "general"}, "spec": {"mode": "eni", "targets": {"warm_ip_target": 10}}}));
    let extra = format!("{FAST}[kubernetes]\nenabled = true\nnode_name = \"node-7\"\n");
    let kc = api.kubeconfig_path();
    let env = [("KUBECONFIG", kc.as_str())];
    let p =
        underway_tests::ipamd::IpamdProcess::start_with_env(&w, &n, std::path::Path::new(IPAMD), &extra, &env).unwrap();
    p.wait_ready(10, Duration::from_secs(60)).unwrap();
    pods(&p, "k", 250);
    std::thread::sleep(Duration::from_secs(6)); // a Lease round or two
    let rss = rss_kib(p.pid().unwrap());
    let parts = split(p.pid().unwrap());
    (rss, parts, api.requests().len())
}
