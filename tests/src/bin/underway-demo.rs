//! `underway-demo`: the README's first command. A VPC on LocalStack with two ENI-mode nodes and
//! two VPC-route nodes, one real ipamd per node (standalone: its own socket, state dir and IMDS),
//! three pods per node made by the real CNI binary, every pod pinging every other pod, and a
//! table of what happened. Ends with one summary line (`UNDERWAY-DEMO ok ...` or
//! `UNDERWAY-DEMO failed ...`) and removes everything it made, also on Ctrl-C.
//!
//! Needs root (namespaces) and the workspace's binaries (`deploy/local/demo` builds them).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use underway_api::{AttachmentKey, Request, Response};
use underway_tests::cni::{address, cni, conf};
use underway_tests::ipamd::{IpamdProcess, MUTATING, bin_path, calls_by_operation};
use underway_tests::localstack::LocalStack;
use underway_tests::netns::TempNs;
use underway_tests::world::{Node, World};

/// (instance type, mode, pod CIDR). d3.xlarge ENIs hold 2 secondary addresses each, so the third
/// pod of an ENI-mode node lands on a secondary ENI.
const NODES: [(&str, &str, &str); 4] = [
    ("d3.xlarge", "eni", ""),
    ("d3.xlarge", "eni", ""),
    ("m5.large", "vpc-route", "100.64.1.0/24"),
    ("m5.large", "vpc-route", "100.64.2.0/24"),
];
const PODS_PER_NODE: usize = 3;
struct Pod {
    node: usize,
    name: String,
    ns: TempNs,
    address: std::net::Ipv4Addr,
    via: String,
}

fn config(mode: &str, cidr: &str) -> String {
    let common = "cooldown_ms = 5000\nadd_wait_ms = 20000\n";
    match mode {
        "eni" => format!("{common}[targets]\nwarm_ip_target = 1\n[vpc_route]\ncluster_cidr = \"100.64.0.0/16\"\n"),
        _ => format!(
            "{common}mode = \"vpc-route\"\n[vpc_route]\npod_cidr = \"{cidr}\"\ncluster_cidr = \"100.64.0.0/16\"\n"
        ),
    }
}

fn mutating_calls(p: &IpamdProcess) -> u64 {
    let m = p.http_get(61780, "/metrics").unwrap_or_default();
    calls_by_operation(&m).iter().filter(|(op, _)| MUTATING.contains(&op.as_str())).map(|(_, n)| n).sum::<f64>() as u64
}

fn reach(ns: &TempNs, addr: std::net::Ipv4Addr) -> bool {
    (0..3).any(|_| ns.sh(&format!("ping -c 1 -W 1 {addr}")).0)
}

/// The tools the demo's world runs, named when one is missing (a missing `ping` would otherwise
/// look like a network that does not work).
fn check_tools() -> Result<(), String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for (tool, package) in
        [("ip", "iproute2"), ("nft", "nftables"), ("ping", "iputils-ping"), ("nsenter", "util-linux")]
    {
        if !std::env::split_paths(&path).any(|d| d.join(tool).is_file()) {
            return Err(format!("`{tool}` is not on PATH: install {package} (deploy/local/demo installs it as root)"));
        }
    }
    Ok(())
}

async fn demo(started: Instant) -> Result<bool, String> {
    check_tools()?;
    let ipamd = bin_path("underway-ipamd").map_err(|e| e.to_string())?;
    bin_path("underway").map_err(|e| e.to_string())?;
    println!("LocalStack: starting (installed into its venv on first use) ...");
    let ls = tokio::task::spawn_blocking(|| LocalStack::shared().endpoint.clone()).await.map_err(|e| e.to_string())?;
    println!("LocalStack: {ls}");
    let world = World::create().await.map_err(|e| e.to_string())?;
    let mut nodes: Vec<Arc<Node>> = Vec::new();
    for (ty, _, _) in NODES {
        nodes.push(world.add_node(ty).await.map_err(|e| e.to_string())?);
    }
    world.start_sync_loop(Duration::from_millis(200));
    let mut daemons = Vec::new();
    for (i, (n, (_, mode, cidr))) in nodes.iter().zip(NODES).enumerate() {
        let p = IpamdProcess::start(&world, n, &ipamd, &config(mode, cidr)).map_err(|e| e.to_string())?;
        let free = if mode == "eni" { 1 } else { 254 };
        p.wait_ready(free, Duration::from_secs(90)).map_err(|e| format!("node {i}: {e}"))?;
        println!("node{i}: {} {} {mode}: ipamd serving", n.instance_id, n.instance_type);
        daemons.push(p);
    }
    let mut pods = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for j in 0..PODS_PER_NODE {
            let name = format!("demo-n{i}-p{j}");
            let ns = TempNs::new(&format!("n{i}p{j}")).map_err(|e| e.to_string())?;
            let (code, v) = cni(&n.ns, "ADD", &name, &ns.path().display().to_string(), &conf(&daemons[i]));
            if code != 0 {
                return Err(format!("ADD {name}: {v}"));
            }
            let key = AttachmentKey { network: "underway".into(), container_id: name.clone(), ifname: "eth0".into() };
            let via = match daemons[i].call(&Request::Check(key)) {
                Ok(Response::Checked(a)) => match (a.eni, a.route_table) {
                    (Some(e), Some(t)) => format!("{e} (secondary ENI, table {t})"),
                    (Some(e), None) => format!("{e} (primary ENI)"),
                    (None, _) => "VPC route → this node".to_string(),
                },
                other => return Err(format!("CHECK {name}: {other:?}")),
            };
            pods.push(Pod { node: i, name, ns, address: address(&v), via });
        }
    }
    // The fabric applies new EC2 state every 200 ms, as a VPC propagates it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let results: Vec<Vec<bool>> = std::thread::scope(|s| {
        let hs: Vec<_> = pods
            .iter()
            .map(|src| {
                let pods = &pods;
                s.spawn(move || pods.iter().map(|dst| dst.name == src.name || reach(&src.ns, dst.address)).collect())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let pairs = pods.len() * (pods.len() - 1);
    let ok = results.iter().flatten().filter(|b| **b).count() - pods.len();

    println!("\n{:<6} {:<10} {:<12} {:<15} ENI / route", "node", "mode", "pod", "address");
    for p in &pods {
        println!(
            "{:<6} {:<10} {:<12} {:<15} {}",
            format!("node{}", p.node),
            NODES[p.node].1,
            p.name[5..].to_string(),
            p.address,
            p.via
        );
    }
    println!("\nping matrix (row pings column; . ok, X failed):");
    print!("{:>8}", "");
    for j in 0..pods.len() {
        print!("{:>3}", j);
    }
    println!();
    for (i, row) in results.iter().enumerate() {
        print!("{:>8}", format!("{i} n{}", pods[i].node));
        for (j, r) in row.iter().enumerate() {
            print!(
                "{:>3}",
                if i == j {
                    "-"
                } else if *r {
                    "."
                } else {
                    "X"
                }
            );
        }
        println!();
    }
    let traffic = cluster_traffic(&world, &nodes, &pods).await?;
    let calls: Vec<u64> = daemons.iter().map(mutating_calls).collect();
    println!("\nEC2 mutating calls per node: {calls:?}");
    // Every call went through the strict EC2 front (AWS's rules and the account's buckets).
    let front = world.account().front.clone();
    let refused = front.unprovoked().len();
    println!(
        "EC2 front: {} requests, {refused} refused by an AWS rule, busiest second {} mutating (account budget 50 + 5/s)",
        front.records().len(),
        front.peak(true, std::time::Duration::from_secs(1))
    );
    let on_secondary = (0..2).all(|n| pods.iter().any(|p| p.node == n && p.via.contains("secondary")));
    for mut d in daemons {
        d.stop();
    }
    drop(pods);
    drop(world);
    let all_ok = ok == pairs && on_secondary && refused == 0 && traffic.ok();
    println!(
        "UNDERWAY-DEMO {} nodes=4 pods={} pings={ok}/{pairs} secondary_eni_pods={} internet={}/3 clusterip={} nodeport={} ec2_mutating_calls={} ec2_refused={refused} seconds={:.0}",
        if all_ok { "ok" } else { "failed" },
        NODES.len() * PODS_PER_NODE,
        if on_secondary { "yes" } else { "no" },
        traffic.internet,
        if traffic.cluster_ip { "ok" } else { "failed" },
        if traffic.node_port { "ok" } else { "failed" },
        calls.iter().sum::<u64>(),
        started.elapsed().as_secs_f64()
    );
    Ok(all_ok)
}

/// What the cluster-traffic part showed.
struct Traffic {
    internet: usize,
    cluster_ip: bool,
    node_port: bool,
}

impl Traffic {
    fn ok(&self) -> bool {
        self.internet == 3 && self.cluster_ip && self.node_port
    }
}

/// An internet gateway and host beside the VPC (each node's primary address gets an Elastic
/// IP); one line per kind of pod reaching the host, a ClusterIP and a NodePort answered by a pod
/// on a secondary ENI (kube-proxy's rules played by hand, in nftables).
async fn cluster_traffic(world: &World, nodes: &[Arc<Node>], pods: &[Pod]) -> Result<Traffic, String> {
    use underway_tests::internet::{Internet, connect_from, seen_from, serve_peer_address};
    let e = |e: underway_tests::HarnessError| e.to_string();
    let net = Internet::attach(world).await.map_err(e)?;
    let ec2 = aws_sdk_ec2::Client::new(&world.account().direct_sdk_config());
    let mut public = Vec::new();
    for n in nodes {
        let out = ec2
            .describe_network_interfaces()
            .filters(
                aws_sdk_ec2::types::Filter::builder().name("attachment.instance-id").values(&n.instance_id).build(),
            )
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let ni = out
            .network_interfaces()
            .iter()
            .find(|ni| ni.attachment().and_then(|a| a.device_index()) == Some(0))
            .ok_or("no primary ENI")?;
        let ip = ni.private_ip_address().unwrap_or_default().parse().map_err(|_| "bad address")?;
        public.push(net.elastic_ip(ni.network_interface_id().unwrap_or_default(), ip).await.map_err(e)?);
    }
    println!("\ninternet (198.51.100.10 behind the VPC's internet gateway, which translates Elastic IPs only):");
    let mut internet = 0;
    let kinds = [
        ("primary-ENI pod", pods.iter().find(|p| p.via.contains("primary"))),
        ("secondary-ENI pod", pods.iter().find(|p| p.via.contains("secondary"))),
        ("VPC-route pod", pods.iter().find(|p| p.via.contains("VPC route"))),
    ];
    for (kind, pod) in kinds {
        let Some(p) = pod else { continue };
        let seen = seen_from(&p.ns.0);
        let ok = seen.as_deref() == Some(public[p.node].to_string().as_str());
        internet += usize::from(ok);
        println!(
            "  {kind:<18} {:<12} {:<15} → seen as {} (node{}'s public address {}) {}",
            &p.name[5..],
            p.address,
            seen.as_deref().unwrap_or("nothing"),
            p.node,
            public[p.node],
            if ok { "ok" } else { "FAILED" }
        );
    }
    // A pod on node0's secondary ENI serves; node0 plays kube-proxy for a NodePort and node2
    // (VPC-route) for a ClusterIP, both to that pod.
    let server = pods.iter().find(|p| p.node == 0 && p.via.contains("secondary")).ok_or("no secondary-ENI pod")?;
    serve_peer_address(&server.ns.0).map_err(e)?;
    let rules = |dnat: &str| {
        format!("nft 'table ip kube-proxy {{\nchain nat {{\ntype nat hook prerouting priority dstnat;\n{dnat}\n}}\n}}'")
    };
    let n0 = nodes[0].primary_ip().map_err(e)?;
    let np = rules(&format!("tcp dport 30080 fib daddr type local dnat to {}:80", server.address));
    nodes[0].exec(&["sh", "-c", &np]).map_err(e)?;
    let client = pods.iter().find(|p| p.node == 2).ok_or("no pod on node2")?;
    let cip = rules(&format!("ip daddr 172.20.0.10 tcp dport 80 dnat to {}:80", server.address));
    nodes[2].exec(&["sh", "-c", &cip]).map_err(e)?;
    let via_cluster_ip = connect_from(&client.ns.0, std::net::SocketAddr::from(([172, 20, 0, 10], 80)));
    let cluster_ip = via_cluster_ip.as_deref() == Some(client.address.to_string().as_str());
    let from = nodes[1].primary_ip().map_err(e)?;
    let via_node_port = connect_from(&nodes[1].ns, std::net::SocketAddr::from((n0, 30080)));
    let node_port = via_node_port.as_deref() == Some(from.to_string().as_str());
    println!(
        "  ClusterIP 172.20.0.10:80 from {} on node2 → {} on node0's secondary ENI: answered, seeing {} {}",
        client.address,
        server.address,
        via_cluster_ip.as_deref().unwrap_or("nothing"),
        if cluster_ip { "ok" } else { "FAILED" }
    );
    println!(
        "  NodePort {n0}:30080 from node1 ({from}) → {}: answered, seeing {} {}",
        server.address,
        via_node_port.as_deref().unwrap_or("nothing"),
        if node_port { "ok" } else { "FAILED" }
    );
    Ok(Traffic { internet, cluster_ip, node_port })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> ExitCode {
    let started = Instant::now();
    tokio::select! {
        r = demo(started) => match r {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("underway-demo: {e}");
                println!("UNDERWAY-DEMO failed error={e:?}");
                ExitCode::FAILURE
            }
        },
        _ = tokio::signal::ctrl_c() => {
            // Dropping the demo's future has torn down its namespaces, links and daemons; the
            // LocalStack this process started ends with it (watchdog).
            eprintln!("underway-demo: interrupted; everything it made is removed");
            ExitCode::from(130)
        }
    }
}
