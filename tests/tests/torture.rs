//! R1, the kill storm (issue 14): two nodes of the test world in ENI mode, CNI clients running the
//! real binary as a runtime does (ADD; on failure DEL until it succeeds; DEL of live pods, retried
//! until it succeeds), and ipamd SIGKILLed at random moments — 5 % of restarts with the store
//! deleted, 5 % with it truncated at a random byte. After every restart the clients are paused
//! (in-flight operations finish) and the invariants are checked against ipamd's API and the host;
//! at the end also against EC2, with a ping from every pod.
//!
//! `UNDERWAY_TORTURE_KILLS` (default 50, tests/run) and `UNDERWAY_TORTURE_SEED` (default: the
//! clock, printed) set the run; tests/torture runs 1,000 kills. Needs root and LocalStack.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use underway_api::{AttachmentKey, Request, Response};
use underway_tests::cni::{address, cni, conf};
use underway_tests::ipamd::{IpamdProcess, bin_path};
use underway_tests::netns::TempNs;
use underway_tests::world::World;

/// xorshift64*: a seed fixes the whole schedule of choices (not the OS's timing).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 > 1.0 - p
    }
}

struct LivePod {
    node: usize,
    id: String,
    ns: TempNs,
    addr: Ipv4Addr,
}

#[derive(Default)]
struct Counts {
    adds_ok: AtomicU64,
    adds_failed: AtomicU64,
    dels: AtomicU64,
    del_retries: AtomicU64,
}

fn key(id: &str) -> AttachmentKey {
    AttachmentKey { network: "underway".into(), container_id: id.into(), ifname: "eth0".into() }
}

/// A runtime's DEL: retried until it succeeds (ipamd may be down for a moment).
fn del_until_ok(node_ns: &str, id: &str, netns: &str, c: &str, counts: &Counts) {
    for i in 0.. {
        let (code, v) = cni(node_ns, "DEL", id, netns, c);
        if code == 0 {
            return;
        }
        counts.del_retries.fetch_add(1, Ordering::Relaxed);
        assert!(i < 600, "DEL {id} never succeeded: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pool's addresses by state, from `/v1/addresses`.
fn slots(p: &IpamdProcess) -> BTreeMap<Ipv4Addr, String> {
    let v: Value = serde_json::from_str(&p.http_get(61781, "/v1/addresses").unwrap()).unwrap();
    let mut out = BTreeMap::new();
    for eni in v.as_array().unwrap() {
        for (a, s) in eni["slots"].as_object().unwrap() {
            let state = match s {
                Value::String(s) => s.clone(),
                Value::Object(o) => o.keys().next().cloned().unwrap_or_default(),
                other => other.to_string(),
            };
            out.insert(a.parse().unwrap(), state);
        }
    }
    out
}

fn held(p: &IpamdProcess) -> Vec<(Ipv4Addr, String)> {
    let v: Value = serde_json::from_str(&p.http_get(61781, "/v1/assignments").unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let who =
                format!("{}/{}", a["key"]["network"].as_str().unwrap(), a["key"]["container_id"].as_str().unwrap());
            (a["address"].as_str().unwrap().parse().unwrap(), who)
        })
        .collect()
}

/// The /32 host routes to pod veths on a node.
fn routed(node_ns: &str) -> BTreeMap<Ipv4Addr, String> {
    let out = underway_tests::netns::exec(node_ns, &["ip", "-4", "route", "show", "scope", "link"]).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let dev = w.iter().position(|x| *x == "dev").and_then(|i| w.get(i + 1))?;
            (dev.starts_with("uw")).then(|| Some((w[0].parse().ok()?, dev.to_string())))?
        })
        .collect()
}

/// The invariants that hold whenever no operation is in flight.
fn check(procs: &[IpamdProcess], nodes: &[String], live: &[LivePod], when: &str) -> Vec<String> {
    let mut v = Vec::new();
    let mut owner: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for (i, p) in procs.iter().enumerate() {
        for (a, who) in held(p) {
            if let Some(other) = owner.insert(a, format!("node{i}/{who}")) {
                v.push(format!("{when}: {a} held twice: {other} and node{i}/{who}"));
            }
        }
        let pool = slots(p);
        for (a, veth) in routed(&nodes[i]) {
            if pool.get(&a).map(String::as_str) == Some("free") {
                v.push(format!("{when}: node{i}: {a} is free in the pool but routed to {veth}"));
            }
        }
    }
    for pod in live {
        match procs[pod.node].call(&Request::Check(key(&pod.id))) {
            Ok(Response::Checked(a)) if a.address == pod.addr => {}
            other => v.push(format!("{when}: {} (ADD succeeded with {}) now: {other:?}", pod.id, pod.addr)),
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_storm() {
    let kills: u64 = std::env::var("UNDERWAY_TORTURE_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let seed: u64 = std::env::var("UNDERWAY_TORTURE_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    }) | 1;
    eprintln!("TORTURE seed={seed} kills={kills}");
    let w = World::create().await.unwrap();
    // Bursts of restarts are throttled as EC2 would; ipamd retries within its budget.
    w.account().front.provoke(underway_tests::front::Rule::RequestRate);
    let nodes = [w.add_node("m5.xlarge").await.unwrap(), w.add_node("m5.xlarge").await.unwrap()];
    w.start_sync_loop(Duration::from_millis(200));
    // No release hold: a kill lands in releases too (a restart forgets a surplus's hold, so with
    // one the storm would release next to nothing).
    let cfg = "cooldown_ms = 500\nrelease_hold_ms = 0\nadd_wait_ms = 8000\nreconcile_interval_ms = 500\n[targets]\nwarm_ip_target = 4\n";
    let bin = bin_path("underway-ipamd").unwrap();
    let mut procs: Vec<IpamdProcess> = nodes.iter().map(|n| IpamdProcess::start(&w, n, &bin, cfg).unwrap()).collect();
    for p in &procs {
        p.wait_ready(4, Duration::from_secs(90)).unwrap_or_else(|e| panic!("{e}\n{}", p.log_text()));
    }
    let confs: Vec<String> = procs.iter().map(conf).collect();
    let node_ns: Vec<String> = nodes.iter().map(|n| n.ns.clone()).collect();
    let live: Mutex<Vec<LivePod>> = Mutex::new(Vec::new());
    let gate = RwLock::new(());
    let stop = AtomicBool::new(false);
    let counts = Counts::default();
    let violations: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut restart_ms: Vec<u64> = Vec::new();
    let mut rng = Rng(seed);
    let worker_seeds: Vec<u64> = (0..6).map(|_| rng.next() | 1).collect();
    std::thread::scope(|s| {
        for (wi, wseed) in worker_seeds.iter().enumerate() {
            let (live, gate, stop, counts) = (&live, &gate, &stop, &counts);
            let (confs, node_ns) = (&confs, &node_ns);
            let mut r = Rng(*wseed);
            s.spawn(move || {
                let node = wi % 2;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let _op = gate.read().unwrap();
                    let mine = live.lock().unwrap().iter().filter(|p| p.node == node).count();
                    if mine < 4 || (mine < 20 && r.chance(0.6)) {
                        n += 1;
                        let id = format!("t{wi}-{n}");
                        let ns = TempNs::new(&format!("t{wi}")).unwrap();
                        let path = ns.path().display().to_string();
                        let (code, v) = cni(&node_ns[node], "ADD", &id, &path, &confs[node]);
                        if code == 0 {
                            counts.adds_ok.fetch_add(1, Ordering::Relaxed);
                            live.lock().unwrap().push(LivePod { node, id, ns, addr: address(&v) });
                        } else {
                            counts.adds_failed.fetch_add(1, Ordering::Relaxed);
                            // What a runtime does after a failed ADD.
                            del_until_ok(&node_ns[node], &id, &path, &confs[node], counts);
                        }
                    } else {
                        let pod = {
                            let mut l = live.lock().unwrap();
                            let idx: Vec<usize> = (0..l.len()).filter(|i| l[*i].node == node).collect();
                            l.remove(idx[r.below(idx.len() as u64) as usize])
                        };
                        del_until_ok(
                            &node_ns[node],
                            &pod.id,
                            &pod.ns.path().display().to_string(),
                            &confs[node],
                            counts,
                        );
                        counts.dels.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        for k in 0..kills {
            std::thread::sleep(Duration::from_millis(50 + rng.below(300)));
            let i = rng.below(2) as usize;
            let p = &mut procs[i];
            p.kill9();
            let store = p.dir.join("state/ipamd-state");
            let roll = rng.below(100);
            if roll < 5 {
                let _ = std::fs::remove_file(&store);
            } else if roll < 10
                && let Ok(bytes) = std::fs::read(&store)
            {
                // Damage that loses the store (a header cut short). Truncating into the newest
                // slot would drop a snapshot whose Adds were answered: the disk does not do that
                // to fdatasync'd data, and a torn write (power loss mid-save) only damages a
                // snapshot no Add was answered from (store.rs's tests cover that fallback).
                std::fs::write(&store, &bytes[..rng.below(bytes.len().min(4096) as u64) as usize]).unwrap();
            }
            let t = Instant::now();
            p.spawn().unwrap();
            p.wait_ready(0, Duration::from_secs(90)).unwrap_or_else(|e| panic!("kill {k}: {e}\n{}", p.log_text()));
            restart_ms.push(t.elapsed().as_millis() as u64);
            let _quiet = gate.write().unwrap();
            let found = check(&procs, &node_ns, &live.lock().unwrap(), &format!("after kill {k}"));
            violations.lock().unwrap().extend(found);
        }
        stop.store(true, Ordering::Relaxed);
    });
    // The end: every DEL'd address free again (after the cooldown), EC2 and the pools agree, every
    // pod that got an address has a working network.
    std::thread::sleep(Duration::from_millis(1500));
    let live = live.into_inner().unwrap();
    let mut v = violations.into_inner().unwrap();
    v.extend(check(&procs, &node_ns, &live, "at the end"));
    let ec2 = aws_sdk_ec2::Client::new(&w.account().direct_sdk_config());
    let tagged = ec2
        .describe_network_interfaces()
        .filters(aws_sdk_ec2::types::Filter::builder().name("tag:underway.io/cluster").values(w.id()).build())
        .send()
        .await
        .unwrap();
    let mut tracked = BTreeSet::new();
    for (i, p) in procs.iter().enumerate() {
        let enis: Value = serde_json::from_str(&p.http_get(61781, "/v1/enis").unwrap()).unwrap();
        tracked.extend(enis.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()));
        let want: BTreeSet<Ipv4Addr> = live.iter().filter(|p| p.node == i).map(|p| p.addr).collect();
        let holders = held(p);
        let have: BTreeSet<Ipv4Addr> = holders.iter().map(|(a, _)| *a).collect();
        for (a, who) in holders.iter().filter(|(a, _)| !want.contains(a)) {
            v.push(format!("at the end: node{i} holds {a} for {who}, no live pod has it"));
        }
        for a in want.difference(&have) {
            v.push(format!("at the end: node{i}: a live pod's {a} is not held"));
        }
        let pool: BTreeSet<Ipv4Addr> = slots(p).into_keys().collect();
        let inst = &nodes[i].instance_id;
        let out = ec2
            .describe_network_interfaces()
            .filters(aws_sdk_ec2::types::Filter::builder().name("attachment.instance-id").values(inst).build())
            .send()
            .await
            .unwrap();
        for ni in out.network_interfaces() {
            let primary = ni.private_ip_address().unwrap_or_default();
            for a in ni.private_ip_addresses().iter().filter_map(|a| a.private_ip_address()) {
                let a: Ipv4Addr = a.parse().unwrap();
                if a.to_string() != primary && !pool.contains(&a) {
                    v.push(format!(
                        "at the end: {a} is assigned in EC2 to {:?} but not in node{i}'s pool",
                        ni.network_interface_id()
                    ));
                }
            }
        }
    }
    for ni in tagged.network_interfaces() {
        let id = ni.network_interface_id().unwrap_or_default().to_string();
        if !tracked.contains(&id) {
            v.push(format!("at the end: {id} of this cluster is tracked by no ipamd ({:?})", ni.status()));
        }
    }
    for pod in &live {
        let ok = (0..4).any(|_| {
            underway_tests::netns::exec(&pod.ns.0, &["ping", "-c", "1", "-W", "1", "10.0.0.1"])
                .is_ok_and(|o| o.status.success())
        });
        if !ok {
            v.push(format!("at the end: {} ({}) cannot reach the VPC", pod.id, pod.addr));
        }
    }
    restart_ms.sort_unstable();
    let pct = |q: f64| restart_ms.get(((restart_ms.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
    eprintln!(
        "TORTURE seed={seed} kills={kills} adds_ok={} adds_failed={} dels={} del_retries={} live={} violations={} restart_ms p50={} p99={} max={}",
        counts.adds_ok.load(Ordering::Relaxed),
        counts.adds_failed.load(Ordering::Relaxed),
        counts.dels.load(Ordering::Relaxed),
        counts.del_retries.load(Ordering::Relaxed),
        live.len(),
        v.len(),
        pct(0.5),
        pct(0.99),
        restart_ms.last().copied().unwrap_or(0)
    );
    assert!(v.is_empty(), "{} violations (seed {seed}):\n{}", v.len(), v.join("\n"));
    assert!(counts.adds_ok.load(Ordering::Relaxed) > kills / 2, "the clients made progress");
}
