//! `underway-sim` (issue 17, a first cut): N nodes in one process, each running ipamd's real
//! pool, targets, reconciler loop (`reconcile::run`) and budget and retry code (`cloud::pace`)
//! against one account's in-memory EC2 (`cloud::fake`: AWS's rules, the account's buckets) and
//! an in-memory node, on tokio's paused clock. Every node wants P pods at once (a scale-up
//! wave); an Add waits for the pool as ipamd's does. Prints the time until every pod has an
//! address, its ratio to the floor the account's mutating bucket allows, the calls made and
//! throttled, and the simulator's peak memory per node.
//!
//! `cargo run --example sim -- [nodes] [pods per node] [ips|prefix|route] [instance type] [fixed|adaptive|share]`
//! (defaults 100, 110, ips, m5.4xlarge, share. `route` is VPC-route mode: each node a /24 of
//! 100.64.0.0/10 and one route in the VPC's main table, whose quota (50 routes, AWS's default)
//! is the limit: nodes past it stay without addresses, and the run reports them with the
//! reason ipamd gives. The last word is the budget policy. `fixed` is the per-node
//! bucket without adaptation, the baseline; `adaptive` halves on a throttle and adds back on
//! an answer (AIMD); `share` drops to the node's share of the account's refill, the node count
//! known, on the first throttle). State directories go to /dev/shm (tmpfs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use underway_api::AttachmentKey;
use underway_cloud::TAG_CLUSTER;
use underway_cloud::fake::{ACCOUNT_MUTATING, FakeConfig, FakeEc2};
use underway_cloud::limits::static_limits;
use underway_cloud::pace::{Paced, Pacer, RetryPolicy};
use underway_cloud::{Instance, Tags};
use underway_ipamd::config::{Config, Mode};
use underway_ipamd::eni_mode::EniMode;
use underway_ipamd::metrics::Metrics;
use underway_ipamd::node::MemoryNode;
use underway_ipamd::pool::Pool;
use underway_ipamd::state::{Book, NodeState, Status};
use underway_ipamd::store::Store;
use underway_ipamd::vpc_route::VpcRouteMode;

struct Args {
    nodes: u32,
    pods: u32,
    prefix: bool,
    route: bool,
    instance_type: String,
    policy: String,
}

fn args() -> Args {
    let a: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    Args {
        nodes: a.first().and_then(|v| v.parse().ok()).unwrap_or(100),
        pods: a.get(1).and_then(|v| v.parse().ok()).unwrap_or(110),
        prefix: a.get(2).is_some_and(|m| m == "prefix"),
        route: a.get(2).is_some_and(|m| m == "route"),
        instance_type: a.get(3).cloned().unwrap_or_else(|| "m5.4xlarge".into()),
        policy: a.get(4).cloned().unwrap_or_else(|| "share".into()),
    }
}

/// The fewest mutating calls one node needs before all its `pods` have addresses, as ipamd
/// makes them: one assign on the primary ENI, then per further ENI a create (with its first
/// addresses) and an attach. Each attach's delete-on-termination (a second call in EC2 and in
/// the in-memory one) is not on that path: while pods wait and its budget is short, ipamd makes
/// it after their addresses; it is counted in the mutating calls all the same.
fn floor_calls(pods: u32, slots: u32, per_slot: u32) -> u32 {
    let need = pods.div_ceil(per_slot);
    let more_enis = need.saturating_sub(slots).div_ceil(slots);
    1 + 2 * more_enis
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    rt.block_on(run(a));
}

async fn run(a: Args) {
    let limits = static_limits(&a.instance_type).expect("a known instance type");
    let ec2 = Arc::new(FakeEc2::new(FakeConfig::default()));
    let vpc = ec2.add_vpc(&["10.0.0.0/8".parse().unwrap()]);
    let subnet = ec2.add_subnet(&vpc.id, "10.0.0.0/8".parse().unwrap(), Tags::new());
    let table = ec2.tables()[0].id.clone();
    ec2.tag_table(&table, TAG_CLUSTER, "sim");
    let mut states = Vec::new();
    let base = std::path::PathBuf::from(format!("/dev/shm/underway-sim-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let started = tokio::time::Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let last_ms = Arc::new(AtomicU64::new(0));
    let waited = Arc::new(AtomicU64::new(0));
    let networked = Arc::new(AtomicU64::new(0));
    let finish_s = Arc::new(std::sync::Mutex::new(Vec::<(u64, u32)>::new()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut pacers = Vec::new();
    for i in 0..a.nodes {
        let node: Instance = ec2.add_instance(&a.instance_type, &subnet.id);
        let dir = base.join(i.to_string());
        let mut cfg = Config { cluster: "sim".into(), state_dir: dir.clone(), ..Config::default() };
        cfg.targets.prefix_mode = a.prefix;
        if a.route {
            cfg.mode = Mode::VpcRoute;
            cfg.vpc_route.pod_cidr = Some(format!("100.{}.{}.0/24", 64 + i / 256, i % 256).parse().unwrap());
            cfg.vpc_route.cluster_cidr = Some("100.64.0.0/10".parse().unwrap());
            cfg.vpc_route.route_tables = vec![table.clone()];
        }
        match a.policy.as_str() {
            "fixed" => {}
            "adaptive" => cfg.cloud.rate_budget.adaptive = true,
            "share" => cfg.cloud.rate_budget.share_of = Some(a.nodes),
            p => panic!("unknown budget policy {p:?}: fixed, adaptive or share"),
        }
        cfg.validate().unwrap();
        let cfg = Arc::new(cfg);
        let state = Arc::new(NodeState::new(
            Store::open(&dir).unwrap(),
            Book {
                mode: cfg.mode,
                pool: Pool::new(cfg.cooldown_ms),
                pods: Default::default(),
                waiting: 0,
                deleted_veths: Default::default(),
            },
            Status::default(),
        ));
        let metrics = Arc::new(Metrics::new(state.clone(), Arc::new(OnceLock::new()), Arc::new(OnceLock::new())));
        let pacer = Pacer::new(
            cfg.cloud.rate_budget,
            RetryPolicy {
                max_attempts: cfg.cloud.max_attempts,
                initial_backoff: Duration::from_millis(cfg.cloud.initial_backoff_ms),
                call_timeout: Duration::from_millis(cfg.cloud.call_timeout_ms),
            },
        );
        pacers.push(pacer.clone());
        states.push(state.clone());
        let cloud = Arc::new(Paced::new(ec2.clone(), pacer));
        let host = Arc::new(MemoryNode::default());
        if a.route {
            let src = VpcRouteMode::new(cloud, cfg.clone(), node, host, metrics.clone()).unwrap();
            tokio::spawn(underway_ipamd::reconcile::run(src, state.clone(), cfg, metrics, stop_rx.clone()));
        } else {
            let src = EniMode::new(cloud, cfg.clone(), node, host, limits, metrics.clone());
            tokio::spawn(underway_ipamd::reconcile::run(src, state.clone(), cfg, metrics, stop_rx.clone()));
        }
        // The node's pods, all wanted at once; each Add waits for the pool as ipamd's does.
        let (done, last_ms, waited, networked) = (done.clone(), last_ms.clone(), waited.clone(), networked.clone());
        let finish_s = finish_s.clone();
        let pods = a.pods;
        tokio::spawn(async move {
            let mut got = 0;
            let mut counted_wait = false;
            while got < pods {
                let key =
                    AttachmentKey { network: "sim".into(), container_id: format!("p{got}"), ifname: "eth0".into() };
                let (r, _) = state.change(|b| b.pool.assign(&key, 0));
                if r.is_ok() {
                    got += 1;
                    networked.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if !counted_wait {
                    waited.fetch_add(u64::from(pods - got), Ordering::Relaxed);
                    counted_wait = true;
                }
                let want = pods - got;
                state.change(|b| b.waiting = want);
                state.wake.notify_one();
                tokio::select! {
                    _ = state.freed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
            state.change(|b| b.waiting = 0);
            done.fetch_add(1, Ordering::Relaxed);
            last_ms.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            finish_s.lock().unwrap().push((started.elapsed().as_secs(), i));
        });
    }
    // Until every node is done, or no pod got an address for 30 simulated minutes (a node that
    // can never get addresses, e.g. past the route table's quota), or 6 simulated hours. A line
    // of progress every 10 simulated minutes.
    let mut last_progress = (0, tokio::time::Instant::now());
    let mut next_report = Duration::from_secs(600);
    while done.load(Ordering::Relaxed) < u64::from(a.nodes) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let n = networked.load(Ordering::Relaxed);
        if n != last_progress.0 {
            last_progress = (n, tokio::time::Instant::now());
        }
        if started.elapsed() >= next_report {
            next_report += Duration::from_secs(600);
            let c = ec2.counts();
            eprintln!(
                "t={}s pods={n} nodes_done={} mutating={} (throttled {}) describe={} (throttled {})",
                started.elapsed().as_secs(),
                done.load(Ordering::Relaxed),
                c.mutating,
                c.throttled_mutating,
                c.describe,
                c.throttled_describe
            );
        }
        if started.elapsed() > Duration::from_secs(6 * 3600) {
            eprintln!("gave up after 6 h of simulated time");
            break;
        }
        if last_progress.1.elapsed() > Duration::from_secs(1800) {
            eprintln!("no pod got an address for 30 simulated minutes: stopping");
            break;
        }
    }
    // The nodes left without all their pods, and what ipamd says about each (its status reason).
    let mut stuck: std::collections::BTreeMap<String, (Vec<usize>, String)> = Default::default();
    for (i, s) in states.iter().enumerate() {
        if s.read(|b| b.waiting) > 0 {
            let line = s.status().line();
            let kind = line.split(':').next().unwrap_or_default().to_string();
            stuck.entry(kind).or_insert_with(|| (Vec::new(), line)).0.push(i);
        }
    }
    for (nodes, first) in stuck.values() {
        println!("STUCK {} nodes, e.g. node {}: {first}", nodes.len(), nodes[0]);
    }
    let _ = stop_tx.send(true);
    let wall = Duration::from_millis(last_ms.load(Ordering::Relaxed));
    let mut fin = finish_s.lock().unwrap().clone();
    fin.sort_unstable();
    if !fin.is_empty() {
        let q = |p: f64| fin[((fin.len() - 1) as f64 * p) as usize].0;
        println!("nodes networked by (s): p10 {} p50 {} p90 {} max {}", q(0.1), q(0.5), q(0.9), q(1.0));
        // SIM_TAIL=n: the calls (by operation and outcome, as the node's pacer counted them) of
        // the n nodes networked last and of the median one.
        let n: usize = std::env::var("SIM_TAIL").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        if n > 0 {
            let mid = fin[fin.len() / 2];
            for (t, i) in fin.iter().rev().take(n).chain(std::iter::once(&mid)) {
                println!("node {i} networked at {t} s: {:?}", pacers[*i as usize].stats().snapshot());
            }
        }
    }
    let c = ec2.counts();
    let per_slot = if a.prefix { 16 } else { 1 };
    // VPC-route mode: one CreateRoute per node, for the nodes the table can take.
    let need = if a.route {
        u64::from(a.nodes).min(FakeConfig::default().routes_per_table as u64)
    } else {
        u64::from(a.nodes) * u64::from(floor_calls(a.pods, limits.slots_per_eni(), per_slot))
    };
    let floor_s = need.saturating_sub(u64::from(ACCOUNT_MUTATING.burst)) as f64 / ACCOUNT_MUTATING.qps;
    let throttled_share = c.throttled_mutating as f64 / c.mutating.max(1) as f64;
    println!(
        "calls {:?}\nSIM nodes={} pods_per_node={} mode={} type={} budget={} networked_s={:.1} floor_s={:.1} ratio={} \
         mutating={} ({:.1}/node, floor {}) throttled_mutating={:.1}% describe={} throttled_describe={} \
         adds_waited={} refused={:?} peak_rss_per_node_kib={} nodes_done={} nodes_stuck={}",
        c.calls,
        a.nodes,
        a.pods,
        if a.route {
            "route"
        } else if a.prefix {
            "prefix"
        } else {
            "ips"
        },
        a.instance_type,
        a.policy,
        wall.as_secs_f64(),
        floor_s,
        if floor_s >= 1.0 { format!("{:.2}", wall.as_secs_f64() / floor_s) } else { "n/a (within the burst)".into() },
        c.mutating,
        c.mutating as f64 / f64::from(a.nodes),
        need,
        100.0 * throttled_share,
        c.describe,
        c.throttled_describe,
        waited.load(Ordering::Relaxed),
        c.refused,
        peak_rss_kib() / u64::from(a.nodes.max(1)),
        done.load(Ordering::Relaxed),
        stuck.values().map(|(n, _)| n.len()).sum::<usize>(),
    );
    drop(pacers);
    let _ = std::fs::remove_dir_all(&base);
}
