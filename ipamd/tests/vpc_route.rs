//! VPC-route mode on the test world: real ipamd processes, the real CNI binary, LocalStack's
//! route tables behind the strict EC2 front (routes inside the VPC refused as AWS refuses them),
//! and the router namespace forwarding each route-table destination to its target ENI. Needs
//! root and the workspace's binaries.

mod support;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use underway_api::{ErrorKind, Request, Response};
use underway_tests::netns::TempNs;
use underway_tests::world::{Node, World};

async fn source_dest_check(w: &World, n: &Node) -> bool {
    node_enis(w, n).await[0].source_dest_check().unwrap()
}

async fn add_route(w: &World, table: &str, cidr: &str, instance: &str) {
    w.ec2()
        .client
        .create_route()
        .route_table_id(table)
        .destination_cidr_block(cidr)
        .instance_id(instance)
        .send()
        .await
        .unwrap();
}

/// A VPC-route config; the cluster's range (egress SNAT needs one) is 100.64.0.0/16 unless `more`
/// names one, or the pod CIDR's /16 when it lies elsewhere (the refusal cases).
fn routed(cidr: &str, more: &str) -> String {
    let cluster = match cidr.parse::<ipnet::Ipv4Net>() {
        _ if more.contains("cluster_cidr") => String::new(),
        Ok(c) if "100.64.0.0/16".parse::<ipnet::Ipv4Net>().unwrap().contains(&c) => {
            "cluster_cidr = \"100.64.0.0/16\"\n".into()
        }
        Ok(c) => format!("cluster_cidr = \"{}\"\n", ipnet::Ipv4Net::new(c.addr(), 16).unwrap().trunc()),
        Err(_) => String::new(),
    };
    format!("{FAST}mode = \"vpc-route\"\n[vpc_route]\npod_cidr = \"{cidr}\"\n{cluster}{more}")
}

/// Pings `addr` from `ns`, a few times: the test world applies new EC2 state every 200 ms, as
/// a VPC propagates it, so the first packet may come before the fabric knows the address.
fn reach(ns: &TempNs, addr: Ipv4Addr) -> bool {
    (0..5).any(|_| ns.sh(&format!("ping -c 1 -W 1 {addr}")).0)
}

/// A pod on `node` through the CNI binary; returns its namespace and address.
fn pod(n: &Node, p: &underway_tests::ipamd::IpamdProcess, name: &str) -> (TempNs, Ipv4Addr) {
    let ns = TempNs::new(name).unwrap();
    let (code, v) = cni(&n.ns, "ADD", name, &ns.path().display().to_string(), &conf(p));
    assert_eq!(code, 0, "{v}");
    let a = address(&v);
    (ns, a)
}

async fn two_nodes() -> (World, Arc<Node>, Arc<Node>) {
    let w = World::create().await.unwrap();
    let a = w.add_node("m5.large").await.unwrap();
    let b = w.add_node("m5.large").await.unwrap();
    w.start_sync_loop(Duration::from_millis(200));
    (w, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_routed_nodes_pods_ping_restart_is_idempotent_graceful_stop_keeps_routes() {
    let (w, a, b) = two_nodes().await;
    let main = main_table(&w).await;
    let (eni_a, eni_b) = (primary_eni(&w, &a).await, primary_eni(&w, &b).await);
    let gc = "cluster_cidr = \"100.64.0.0/16\"\n";
    let mut pa = start(&w, &a, &routed("100.64.1.0/24", gc));
    let mut pb = start(&w, &b, &routed("100.64.2.0/24", gc));
    pa.wait_ready(254, Duration::from_secs(60)).unwrap();
    pb.wait_ready(254, Duration::from_secs(60)).unwrap();
    assert_eq!(
        routes(&w, &main).await,
        vec![("100.64.1.0/24".to_string(), eni_a.clone()), ("100.64.2.0/24".to_string(), eni_b.clone())],
        "each pod CIDR, outside the VPC, to its node's primary ENI"
    );
    assert!(!source_dest_check(&w, &a).await && !source_dest_check(&w, &b).await, "off on both primary ENIs");

    let (na, addr_a) = pod(&a, &pa, "ra");
    let (nb, addr_b) = pod(&b, &pb, "rb");
    assert!("100.64.1.0/24".parse::<ipnet::Ipv4Net>().unwrap().contains(&addr_a), "{addr_a}");
    assert!("100.64.2.0/24".parse::<ipnet::Ipv4Net>().unwrap().contains(&addr_b), "{addr_b}");
    assert!(reach(&na, addr_b), "pod A → pod B through the VPC route");
    assert!(reach(&nb, addr_a), "pod B → pod A");
    let rules = String::from_utf8_lossy(&a.exec(&["ip", "rule"]).unwrap().stdout).to_string();
    assert!(!rules.contains(&format!("from {addr_a} lookup")), "no from rule in VPC-route mode: {rules}");

    // A crash and a restart change nothing in EC2: no new route call, the same single route.
    pa.kill9();
    pa.spawn().unwrap();
    pa.wait_ready(253, Duration::from_secs(60)).unwrap();
    let m = pa.http_get(61780, "/metrics").unwrap();
    for op in ["CreateRoute", "ReplaceRoute", "DeleteRoute", "ModifyNetworkInterfaceAttribute"] {
        assert!(!m.contains(&format!("operation=\"{op}\"")), "{op} after a restart:\n{m}");
    }
    assert_eq!(routes(&w, &main).await.len(), 2);
    assert!(reach(&na, addr_b), "still reachable after the restart");

    // A graceful stop (a rolling update) keeps B's route: A's pod pings B's pod throughout the
    // stop and the restart, and no request ever deleted or replaced a route.
    let pinger = {
        let ns_path = na.path().display().to_string();
        std::thread::spawn(move || {
            let out = std::process::Command::new("nsenter")
                .arg(format!("--net={ns_path}"))
                .args(["ping", "-q", "-c", "40", "-i", "0.2", "-W", "1", &addr_b.to_string()])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).to_string()
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(pb.stop(), "clean exit:\n{}", pb.log_text());
    assert!(routes(&w, &main).await.contains(&("100.64.2.0/24".to_string(), eni_b.clone())), "kept on SIGTERM");
    pb.spawn().unwrap();
    pb.wait_ready(253, Duration::from_secs(60)).unwrap();
    let summary = pinger.join().unwrap();
    let received: u32 = summary
        .split(" received")
        .next()
        .and_then(|s| s.rsplit(", ").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("ping summary: {summary}"));
    assert!(received >= 37, "at most 3 of 40 pings lost across a graceful restart: {summary}");
    let touched: Vec<_> = w
        .account()
        .front
        .records()
        .into_iter()
        .filter(|r| {
            r.node == format!("node{}", b.index) && ["DeleteRoute", "ReplaceRoute"].contains(&r.action.as_str())
        })
        .collect();
    assert!(touched.is_empty(), "the route never left the table: {touched:?}");

    // `uninstall` removes B's own route (and only B's).
    let out = pb.run_cmd(&["uninstall"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(routes(&w, &main).await, vec![("100.64.1.0/24".to_string(), eni_a.clone())]);
    assert!(pb.stop());

    // SIGKILL leaves A's route; the GC removes it once A is gone.
    pa.kill9();
    let out = pa.run_cmd(&["gc-routes", "--table", &main]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 stale routes"), "A still runs: its route stays");
    w.ec2().terminate(&a.instance_id).await;
    let out = pa.run_cmd(&["gc-routes", "--table", &main]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("deleted 100.64.1.0/24"), "{text}");
    assert!(routes(&w, &main).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_routes_are_taken_over_live_ones_left_alone_capacity_tags_and_several_tables() {
    let w = World::create().await.unwrap();
    let n = w.add_node("m5.large").await.unwrap();
    let me = primary_eni(&w, &n).await;
    let main = main_table(&w).await;
    let gone = w.ec2().run_instance("m5.large").await;
    let alive = w.ec2().run_instance("m5.large").await;
    add_route(&w, &main, "100.64.30.0/24", &gone).await;
    add_route(&w, &main, "100.64.31.0/24", &alive).await;
    w.ec2().terminate(&gone).await;

    // A pod CIDR inside the VPC can never be routed on AWS: refused before any route call, and
    // the status line says why, naming the field and the VPC's block.
    let mut p = start(&w, &n, &routed("10.0.128.0/24", ""));
    eventually(Duration::from_secs(30), "the VPC overlap in the status line", || {
        matches!(p.call(&Request::Status), Ok(Response::Status(s))
            if s.reason.contains("vpc_route.pod_cidr") && s.reason.contains("10.0.0.0/16") && s.reason.contains("AWS refuses"))
    });
    let m = p.http_get(61780, "/metrics").unwrap();
    assert!(!m.contains("operation=\"CreateRoute\""), "no route call:\n{m}");
    let status = p.run_cmd(&["status"]).unwrap();
    assert!(!status.status.success(), "status exits non-zero while not ready");
    assert!(p.stop());

    // An untagged table is refused by name before any change.
    let untagged = w.ec2().route_table().await;
    let mut p = start(&w, &n, &routed("100.64.32.0/24", &format!("route_tables = [\"{untagged}\"]\n")));
    eventually(
        Duration::from_secs(30),
        "the untagged table in the status line",
        || matches!(p.call(&Request::Status), Ok(Response::Status(s)) if s.reason.contains(&untagged) && s.reason.contains("underway.io/cluster")),
    );
    assert!(routes(&w, &untagged).await.is_empty());
    assert!(p.stop());

    // A route whose instance is terminated is taken over (to this node's primary ENI).
    let mut p = start(&w, &n, &routed("100.64.30.0/24", ""));
    p.wait_ready(254, Duration::from_secs(60)).unwrap();
    assert!(routes(&w, &main).await.contains(&("100.64.30.0/24".into(), me.clone())));
    assert!(p.stop());

    // A live instance's route is reported, naming both, and left alone; Add says why, as a
    // route conflict.
    let mut p = start(&w, &n, &routed("100.64.31.0/24", "").replace("add_wait_ms = 10000", "add_wait_ms = 1000"));
    eventually(
        Duration::from_secs(30),
        "the conflict in the status line",
        || matches!(p.call(&Request::Status), Ok(Response::Status(s)) if s.reason.contains(&alive) && s.reason.contains(&n.instance_id)),
    );
    match add(&p, "x") {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::RouteConflict, "{e:?}");
            assert!(e.message.contains(&alive), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(routes(&w, &main).await.contains(&("100.64.31.0/24".into(), alive.clone())), "untouched");
    assert!(p.stop());

    // Capacity 2, and the table holds two routes already (30 kept across the stop, 31; the local
    // route does not count). STATUS is not ready: an Add cannot succeed, and says RouteTableFull.
    let mut p = start(
        &w,
        &n,
        &routed("100.64.32.0/24", "route_table_capacity = 2\n").replace("add_wait_ms = 10000", "add_wait_ms = 1000"),
    );
    eventually(
        Duration::from_secs(30),
        "a full table in the status line",
        || matches!(p.call(&Request::Status), Ok(Response::Status(s)) if !s.ready && s.reason.contains("route table full")),
    );
    match add(&p, "y") {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::RouteTableFull, "{e:?}");
            assert!(e.message.contains(&main) && e.message.contains("capacity"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    assert!(!routes(&w, &main).await.iter().any(|(d, _)| d == "100.64.32.0/24"));
    let m = p.http_get(61780, "/metrics").unwrap();
    assert!(!m.contains("operation=\"CreateRoute\""), "no call past the capacity:\n{m}");
    assert_eq!(sample(&m, &format!("underway_route_table_routes{{table=\"{main}\"}}")), Some(2.0), "{m}");
    assert_eq!(sample(&m, "underway_route_table_capacity"), Some(2.0), "{m}");
    assert!(p.stop());

    // Several (tagged) tables kept in step.
    let extra = w.cluster_route_table().await.unwrap();
    let p = start(&w, &n, &routed("100.64.33.0/24", &format!("route_tables = [\"{main}\", \"{extra}\"]\n")));
    p.wait_ready(254, Duration::from_secs(60)).unwrap();
    for t in [&main, &extra] {
        assert!(routes(&w, t).await.contains(&("100.64.33.0/24".into(), me.clone())), "{t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_eni_pool_and_a_routed_pool_reach_each_other_and_a_mode_switch_is_refused() {
    let (w, a, b) = two_nodes().await;
    let pools = "[pools.enis]\nmode = \"eni\"\ntargets = { warm_ip_target = 2 }\n\
                 [pools.routed]\nmode = \"vpc-route\"\nvpc_route = { pod_cidr = \"100.64.40.0/24\", cluster_cidr = \"100.64.0.0/16\" }\n";
    let mut pa = start(&w, &a, &format!("{FAST}pool = \"enis\"\n{pools}"));
    let pb = start(&w, &b, &format!("{FAST}pool = \"routed\"\n{pools}"));
    pa.wait_ready(2, Duration::from_secs(60)).unwrap();
    pb.wait_ready(254, Duration::from_secs(60)).unwrap();
    let (na, addr_a) = pod(&a, &pa, "ea");
    let (nb, addr_b) = pod(&b, &pb, "vb");
    assert!(!"100.64.40.0/24".parse::<ipnet::Ipv4Net>().unwrap().contains(&addr_a), "A's pod has an ENI address");
    if !reach(&na, addr_b) {
        let sh = |ns: &str, c: &str| {
            String::from_utf8_lossy(&underway_tests::netns::exec(ns, &["sh", "-c", c]).unwrap().stdout).to_string()
        };
        panic!(
            "ENI-mode pod {addr_a} → VPC-route pod {addr_b} fails\nrouter:\n{}\nA:\n{}\nB:\n{}",
            sh(w.router_ns(), "ip route; nft list ruleset | grep -E 'counter|elements'"),
            sh(&a.ns, "ip route; ip rule"),
            sh(&b.ns, "ip route; ip rule; ip -br addr")
        );
    }
    assert!(reach(&nb, addr_a), "VPC-route pod → ENI-mode pod");

    // Node A holds a pod in ENI mode: moving it to the routed pool is refused, naming why.
    assert!(pa.stop());
    let text = std::fs::read_to_string(&pa.config).unwrap().replace("pool = \"enis\"", "pool = \"routed\"");
    std::fs::write(&pa.config, text).unwrap();
    pa.spawn().unwrap();
    let status = pa.wait_exit(Duration::from_secs(20)).expect("ipamd refuses to start");
    assert!(!status.success());
    let log = pa.log_text();
    assert!(log.contains("mode") && log.contains("while pods hold addresses is refused"), "{log}");
}
