//! EC2 at its worst, on the test world: 3 ENI-mode nodes, 30 pods added in bursts while the
//! strict front throttles 30 % of requests, fails 5 % with 5xx, adds 200 ms to each, resets 2 %
//! of connections after LocalStack acted, and hides new ENIs for a second. Every pod must be
//! networked (pings; an ADD that timed out waiting for EC2 is retried as the runtime does, at
//! most 3 failed attempts in a run), no ipamd may crash, no address may be held twice (EC2 vs the stores vs the
//! hosts), no ENI of the cluster may be left untracked, and each node's requests stay within the
//! budget it was given. The figures go to docs/reliability.md.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::Filter;
use underway_tests::cni::{address, cni, conf};
use underway_tests::front::{Fault, Faults, Outcome, Rule, simulate_faults};
use underway_tests::ipamd::{IpamdProcess, bin_path};
use underway_tests::netns::TempNs;
use underway_tests::world::{Node, World};

const NODES: usize = 3;
const PODS_PER_NODE: usize = 10;
/// ipamd's own per-node budget (its default; `cloud.rate_budget`).
const MUTATING_QPS: f64 = 2.0;
const MUTATING_BURST: f64 = 10.0;

struct Pod {
    node: usize,
    ns: TempNs,
    addr: Ipv4Addr,
}

fn reach(ns: &TempNs, addr: Ipv4Addr) -> bool {
    (0..4).any(|_| ns.sh(&format!("ping -c 1 -W 1 {addr}")).0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_pods_on_three_nodes_under_throttling_5xx_latency_and_lost_replies() {
    let w = World::create().await.unwrap();
    let mut nodes: Vec<Arc<Node>> = Vec::new();
    for _ in 0..NODES {
        // m5.large: 3 ENIs × 10 addresses, so 10 pods need a second ENI on every node.
        nodes.push(w.add_node("m5.large").await.unwrap());
    }
    w.start_sync_loop(Duration::from_millis(200));
    let front = &w.account().front;
    let mut faults = Faults {
        throttle: 0.30,
        server_error: 0.05,
        latency: Duration::from_millis(200),
        reset_after: 0.02,
        ..Faults::default()
    };
    // The n-th request meets the same fault whatever the interleaving: pick the first seed whose
    // first 40 requests (a run makes 60–120) hold the configured mix — about 30 % throttled, and
    // at least two 5xx and two replies lost after LocalStack acted — so every run opens each
    // window rather than leaving it to luck.
    faults.seed = (1..)
        .find(|&seed| {
            let plan = simulate_faults(&Faults { seed, ..faults.clone() }, 40);
            let count = |k: &[Fault]| plan.iter().filter(|x| x.is_some_and(|x| k.contains(&x))).count();
            (10..=14).contains(&count(&[Fault::Throttle]))
                && count(&[Fault::ServerError, Fault::Unavailable]) >= 2
                && count(&[Fault::ResetAfter]) >= 2
        })
        .unwrap();
    // A retried Unassign after a lost reply asks EC2 for addresses it already released, which AWS
    // refuses: a consequence of the injected faults, not a request ipamd makes on its own.
    front.provoke(Rule::AddressNotAssigned);
    front.configure(|c| {
        c.faults = faults.clone();
        c.invisible_after_create = Duration::from_secs(1);
    });
    let started = Instant::now();
    // The leak GC every 20 s (each wait jittered to 10–30 s): a lost reply's duplicate ENI is
    // deleted well within the check's 90 s below, even with a sweep or two throttled.
    let cfg = "cooldown_ms = 1000\nrelease_hold_ms = 0\nadd_wait_ms = 60000\n[targets]\nwarm_ip_target = 2\n[eni]\nleak_grace_ms = 20000\ngc_interval_ms = 20000\n";
    let ds: Vec<IpamdProcess> =
        nodes.iter().map(|n| IpamdProcess::start(&w, n, &bin_path("underway-ipamd").unwrap(), cfg).unwrap()).collect();
    for d in &ds {
        d.wait_ready(1, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    }

    // Bursts of 5 concurrent ADDs per node, all nodes at once. A failed ADD is handled as the
    // runtime does: DEL of that sandbox, then a new sandbox (up to RETRIES times). Standalone,
    // a node's fixed budget can push its next mutating token past an Add's wait after a streak
    // of the random throttles (docs/reliability.md: failed once so, 2026-12-03); such an ADD
    // must say why, and the runtime's next try must succeed.
    const RETRIES: usize = 2;
    let mut pods: Vec<Pod> = Vec::new();
    let mut failures = Vec::new();
    let mut retried = Vec::new();
    for burst in 0..PODS_PER_NODE / 5 {
        type Made = (usize, TempNs, i32, serde_json::Value, Vec<String>);
        let made: Vec<Made> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..NODES)
                .flat_map(|i| (0..5).map(move |j| (i, j)))
                .map(|(i, j)| {
                    let (n, d) = (&nodes[i], &ds[i]);
                    s.spawn(move || {
                        let name = format!("f{i}b{burst}p{j}");
                        let ns = TempNs::new(&name).unwrap();
                        let netns = ns.path().display().to_string();
                        let mut failed = Vec::new();
                        let mut id = name.clone();
                        loop {
                            let (code, v) = cni(&n.ns, "ADD", &id, &netns, &conf(d));
                            if code == 0 || failed.len() == RETRIES {
                                break (i, ns, code, v, failed);
                            }
                            // Only the budget's streak is retried: ipamd's answer that no address
                            // came within the wait (code 11, the pool still empty or the budget
                            // throttled), with its reason. Anything else fails the test at once.
                            let why = v["details"].as_str().unwrap_or_default();
                            assert!(
                                v["code"] == 11
                                    && (why.starts_with("PoolEmpty: no free address after ")
                                        || why.starts_with("Throttled: no free address after "))
                                    && why.split(" ms").nth(1).is_some_and(|r| r.len() > 10),
                                "node{i} {id}: an ADD failed otherwise than by timing out on an empty pool: {v}"
                            );
                            failed.push(format!("node{i} {id}: {v}"));
                            let (del, dv) = cni(&n.ns, "DEL", &id, &netns, &conf(d));
                            assert_eq!(del, 0, "node{i} {id}: DEL after a failed ADD: {dv}");
                            id = format!("{name}r{}", failed.len());
                        }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (node, ns, code, v, failed) in made {
            retried.extend(failed);
            if code == 0 {
                pods.push(Pod { node, addr: address(&v), ns });
            } else {
                failures.push(format!("node{node}: {v}"));
            }
        }
    }
    let networked_after = started.elapsed();
    assert!(failures.is_empty(), "every pod networked despite the faults (with the runtime's retries): {failures:?}");
    assert_eq!(pods.len(), NODES * PODS_PER_NODE);
    // Failed ADD attempts stay rare: a systematic failure is not hidden by the retries.
    assert!(retried.len() <= 3, "failed ADD attempts: {retried:#?}");

    // Every pod reaches a pod on another node.
    let unreachable: Vec<String> = pods
        .iter()
        .filter_map(|p| {
            let other = pods.iter().find(|q| q.node != p.node).unwrap();
            (!reach(&p.ns, other.addr)).then(|| format!("{} (node{}) → {}", p.addr, p.node, other.addr))
        })
        .collect();
    assert!(unreachable.is_empty(), "pods without a network: {unreachable:?}");

    // No ipamd crashed.
    for (i, d) in ds.iter().enumerate() {
        assert!(
            d.pid().is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists()),
            "node{i}: ipamd died\n{}",
            d.log_text()
        );
    }

    // No address held twice: across the pods, in EC2, and in the stores.
    let given: BTreeSet<Ipv4Addr> = pods.iter().map(|p| p.addr).collect();
    assert_eq!(given.len(), pods.len(), "an address given to two pods");
    let direct = aws_sdk_ec2::Client::new(&w.account().direct_sdk_config());
    let mut owner: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut node_of_eni: BTreeMap<String, String> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        let out = direct
            .describe_network_interfaces()
            .filters(Filter::builder().name("attachment.instance-id").values(&n.instance_id).build())
            .send()
            .await
            .unwrap();
        for ni in out.network_interfaces() {
            let id = ni.network_interface_id().unwrap().to_string();
            node_of_eni.insert(id.clone(), format!("node{i}"));
            for a in ni.private_ip_addresses() {
                let ip: Ipv4Addr = a.private_ip_address().unwrap().parse().unwrap();
                if let Some(other) = owner.insert(ip, id.clone()) {
                    panic!("{ip} is on {other} and {id} in EC2");
                }
            }
        }
    }
    let mut held_by_stores: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for (i, d) in ds.iter().enumerate() {
        let assignments: serde_json::Value =
            serde_json::from_str(&d.http_get(61781, "/v1/assignments").unwrap()).unwrap();
        for a in assignments.as_array().unwrap() {
            let ip: Ipv4Addr = a["address"].as_str().unwrap().parse().unwrap();
            assert!(held_by_stores.insert(ip), "{ip} held twice across the stores");
            let eni = owner.get(&ip).unwrap_or_else(|| panic!("node{i} holds {ip}, which no ENI has in EC2"));
            assert_eq!(node_of_eni[eni], format!("node{i}"), "{ip} is held by node{i} but EC2 has it on {eni}");
        }
    }
    assert_eq!(held_by_stores, given, "the stores hold exactly the pods' addresses");
    for p in &pods {
        let route = nodes[p.node].exec(&["ip", "route", "get", &p.addr.to_string()]).unwrap();
        assert!(
            String::from_utf8_lossy(&route.stdout).contains("dev uw"),
            "{}: the host routes it to a pod veth",
            p.addr
        );
    }

    // No ENI of the cluster left untracked: each is attached to its node and in that node's pool,
    // or (a lost reply's duplicate) deleted by the node's leak GC after the grace.
    let tracked = |i: usize| -> BTreeSet<String> {
        let v: serde_json::Value = serde_json::from_str(&ds[i].http_get(61781, "/v1/enis").unwrap()).unwrap();
        v.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let untracked = loop {
        let out = direct
            .describe_network_interfaces()
            .filters(Filter::builder().name("tag:underway.io/cluster").values(w.id()).build())
            .send()
            .await
            .unwrap();
        let untracked: Vec<String> = out
            .network_interfaces()
            .iter()
            .filter(|ni| {
                let id = ni.network_interface_id().unwrap();
                match node_of_eni.get(id) {
                    Some(node) => {
                        let i: usize = node.trim_start_matches("node").parse().unwrap();
                        !tracked(i).contains(id)
                    }
                    None => true,
                }
            })
            .map(|ni| format!("{} ({:?})", ni.network_interface_id().unwrap(), ni.status()))
            .collect();
        if untracked.is_empty() || Instant::now() > deadline {
            break untracked;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert!(untracked.is_empty(), "ENIs of the cluster no node tracks: {untracked:?}");

    // The faults happened, and no rule of AWS's was broken by ipamd.
    let s = front.summary();
    for k in ["fault:throttle", "fault:server-error", "fault:reset-after"] {
        assert!(s.get(k).copied().unwrap_or(0) > 0, "{k} never happened: {s:?}");
    }
    let unprovoked = front.unprovoked();
    assert!(unprovoked.is_empty(), "requests AWS would refuse: {unprovoked:?}");

    // Each node's mutating requests, all attempts counted, within its budget: in any window of
    // T seconds at most burst + qps × T reach EC2 (T = 1 s and 10 s).
    let records = front.records();
    let mut report = Vec::new();
    for i in 0..NODES {
        let node = format!("node{i}");
        let times: Vec<u64> = records
            .iter()
            .filter(|r| {
                r.node == node && r.mutating && !matches!(r.outcome, Outcome::Refused { rule: Rule::RequestRate, .. })
            })
            .map(|r| r.at_ms)
            .collect();
        for secs in [1u64, 10] {
            let peak = underway_tests::front::peak_in_window(&times, secs * 1000);
            let allowed = MUTATING_BURST + MUTATING_QPS * secs as f64;
            assert!(peak as f64 <= allowed, "{node}: {peak} mutating requests within {secs} s, budget {allowed}");
            report.push(format!("{node} peak {peak}/{secs}s"));
        }
    }
    let mutating = records.iter().filter(|r| r.mutating && r.node != "test").count();
    let describe = records.iter().filter(|r| !r.mutating && r.node != "test").count();
    let throttled =
        records.iter().filter(|r| r.node != "test" && matches!(r.outcome, Outcome::Fault(Fault::Throttle))).count();
    println!(
        "FAULTS seed={} pods={} retried_adds={} networked_s={:.1} requests={} mutating={} describe={} throttled={} outcomes={:?} {}",
        faults.seed,
        pods.len(),
        retried.len(),
        networked_after.as_secs_f64(),
        mutating + describe,
        mutating,
        describe,
        throttled,
        s,
        report.join(" ")
    );
}
