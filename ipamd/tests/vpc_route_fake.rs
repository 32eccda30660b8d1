//! VPC-route mode's reconciler without a cloud or a kernel (issue 17): `VpcRouteMode` against the
//! in-memory EC2 and node. The route table's capacity is the limit of this mode: what happens at
//! node 51 of a 50-route table.

use std::sync::{Arc, OnceLock};

use underway_cloud::fake::{FakeConfig, FakeEc2};
use underway_cloud::{RouteTables, RouteTarget, TAG_CLUSTER, Tags};
use underway_ipamd::config::{Config, Mode};
use underway_ipamd::metrics::Metrics;
use underway_ipamd::node::MemoryNode;
use underway_ipamd::pool::Pool;
use underway_ipamd::reconcile::Source;
use underway_ipamd::state::{Blocker, Book, NodeState, Status};
use underway_ipamd::store::Store;
use underway_ipamd::vpc_route::VpcRouteMode;

/// A VPC (10.0.0.0/16) with a /20 subnet and its main route table tagged for cluster c1.
fn cluster_vpc() -> (Arc<FakeEc2>, underway_cloud::Vpc, underway_cloud::Subnet, String) {
    let ec2 = Arc::new(FakeEc2::new(FakeConfig::default()));
    let vpc = ec2.add_vpc(&["10.0.0.0/16".parse().unwrap()]);
    let subnet = ec2.add_subnet(&vpc.id, "10.0.0.0/20".parse().unwrap(), Tags::new());
    let table = ec2.tables()[0].id.clone();
    ec2.tag_table(&table, TAG_CLUSTER, "c1");
    (ec2, vpc, subnet, table)
}

/// A VPC-route source for `node` on `table`, pod CIDR `cidr` (in 100.64.0.0/16), its state in
/// `dir`, starting empty; with the in-memory node it reads pods from.
fn route_node(
    ec2: &Arc<FakeEc2>,
    node: underway_cloud::Instance,
    table: &str,
    cidr: &str,
    dir: &std::path::Path,
) -> (VpcRouteMode<FakeEc2, MemoryNode>, Arc<NodeState>, Arc<MemoryNode>) {
    let mut cfg =
        Config { cluster: "c1".into(), state_dir: dir.to_path_buf(), mode: Mode::VpcRoute, ..Config::default() };
    cfg.vpc_route.pod_cidr = Some(cidr.parse().unwrap());
    cfg.vpc_route.route_tables = vec![table.to_string()];
    cfg.vpc_route.cluster_cidr = Some("100.64.0.0/16".parse().unwrap());
    cfg.validate().unwrap();
    let state = Arc::new(NodeState::new(
        Store::open(dir).unwrap(),
        Book {
            mode: Mode::VpcRoute,
            pool: Pool::new(0),
            pods: Default::default(),
            waiting: 0,
            deleted_veths: Default::default(),
        },
        Status::default(),
    ));
    let metrics = Arc::new(Metrics::new(state.clone(), Arc::new(OnceLock::new()), Arc::new(OnceLock::new())));
    let host = Arc::new(MemoryNode::default());
    let src = VpcRouteMode::new(ec2.clone(), Arc::new(cfg), node, host.clone(), metrics).unwrap();
    (src, state, host)
}

#[tokio::test(start_paused = true)]
async fn the_51st_node_of_a_50_route_table_is_told_why_and_nothing_is_refused() {
    let (ec2, vpc, subnet, table) = cluster_vpc();
    let base = std::env::temp_dir().join(format!("underway-vpc-fake-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let mut outcomes = Vec::new();
    let mut last = None;
    let mut first_eni = String::new();
    for i in 0..51u32 {
        let node = ec2.add_instance("t3.medium", &subnet.id);
        if i == 0 {
            first_eni = node.primary_eni.clone();
        }
        let (mut src, state, host) =
            route_node(&ec2, node, &table, &format!("100.64.{i}.0/26"), &base.join(i.to_string()));
        src.sync(&state).await.unwrap();
        let step = src.step(&state).await.unwrap();
        outcomes.push((state.read(|b| b.pool.stats().free()), step.blocker));
        last = Some((src, state, host));
        // The account's describe bucket refills between nodes joining.
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
    }
    for (i, (free, blocker)) in outcomes.iter().take(50).enumerate() {
        assert_eq!((*free, blocker), (62, &None), "node {i}");
    }
    let (free, blocker) = &outcomes[50];
    assert_eq!(*free, 0, "no address is offered without a route");
    match blocker {
        Some(Blocker::RouteTableFull(m)) => {
            assert!(m.contains(&table) && m.contains("50 routes") && m.contains("100.64.50.0/26"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    let t = ec2.route_table(&table).await.unwrap();
    assert_eq!(t.routes.iter().filter(|r| matches!(r.target, RouteTarget::Eni(_))).count(), 50);
    assert!(ec2.counts().refused.is_empty(), "{:?}", ec2.counts());

    // Turned away, the 51st node looks at the table again only on its check interval (waiting
    // Adds wake the reconciler often), and says why meanwhile; once a route is gone it is routed.
    let (mut src, state, host) = last.unwrap();
    let describes = |e: &FakeEc2| e.counts().calls.get("DescribeRouteTables").copied().unwrap_or(0);
    let before = describes(&ec2);
    // (The interval is 60 s, each wait jittered to 30–90 s.)
    for _ in 0..29 {
        let step = src.step(&state).await.unwrap();
        assert!(matches!(step.blocker, Some(Blocker::RouteTableFull(_))), "{:?}", step.blocker);
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
    }
    assert_eq!(describes(&ec2), before, "no describe within the check interval");
    ec2.delete_route(&table, "100.64.0.0/26".parse().unwrap()).await.unwrap();
    tokio::time::advance(std::time::Duration::from_secs(62)).await;
    // The route goes in, but reading the host's pods fails once: the next step offers the
    // addresses (a node once left routed with an empty pool and no blocker until a restart).
    host.fail_pods.store(1, std::sync::atomic::Ordering::Relaxed);
    assert!(src.step(&state).await.is_err(), "the failed read of the host");
    assert_eq!(state.read(|b| b.pool.stats().free()), 0);
    let step = src.step(&state).await.unwrap();
    assert_eq!((step.blocker, state.read(|b| b.pool.stats().free())), (None, 62), "routed once there is room");
    assert_eq!(describes(&ec2), before + 2);
    // The pool's unit is the pod CIDR's block, not an ENI (metrics and /v1/enis show no ENI).
    let blocks = state.read(|b| (b.pool.enis().count(), b.pool.blocks().map(|x| (x.id.clone(), x.kind)).collect()));
    assert_eq!(blocks, (0, vec![("100.64.50.0/26".to_string(), underway_ipamd::pool::BlockKind::PodCidr)]));

    // Routed and serving a pod, then its CIDR is routed to another (live) node: the pod keeps its
    // address, and no new one is handed out while the route is not this node's (found by
    // reading: the free addresses stayed on offer, unreachable).
    let pod = underway_api::AttachmentKey { network: "n".into(), container_id: "p1".into(), ifname: "eth0".into() };
    let (leased, _) = state.change(|b| b.pool.assign(&pod, 0));
    let leased = leased.unwrap().address;
    ec2.replace_route(&vpc, &table, "100.64.50.0/26".parse().unwrap(), &RouteTarget::Eni(first_eni.clone()))
        .await
        .unwrap();
    tokio::time::advance(std::time::Duration::from_secs(91)).await;
    let step = src.step(&state).await.unwrap();
    assert!(matches!(step.blocker, Some(Blocker::RouteConflict(_))), "{:?}", step.blocker);
    assert_eq!(state.read(|b| (b.pool.stats().free(), b.pool.lease_of(&pod).map(|l| l.address))), (0, Some(leased)));
    // Released meanwhile, its address does not come back on offer either (after the cooldown).
    state.change(|b| b.pool.release(&pod, 0));
    tokio::time::advance(std::time::Duration::from_secs(5)).await;
    src.step(&state).await.unwrap();
    assert_eq!(state.read(|b| b.pool.stats().free()), 0);
    std::fs::remove_dir_all(&base).unwrap();
}

/// A new node's first mutating call (the source/destination check off) comes after one
/// describe, the primary ENI's, not after the VPC's and the route table's reads too: with the
/// node's one budget phase for both call classes a single describe comes before the mutating
/// token, and a wave's calls stay spread (the simulated 1,000-node wave with three describes
/// first: 49 % of mutating calls throttled).
#[tokio::test(start_paused = true)]
async fn a_new_nodes_first_mutating_call_comes_after_one_describe() {
    let (ec2, _, subnet, table) = cluster_vpc();
    let dir = std::env::temp_dir().join(format!("underway-vpc-fake-one-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let node = ec2.add_instance("t3.medium", &subnet.id);
    let (mut src, state, _host) = route_node(&ec2, node, &table, "100.64.7.0/26", &dir);
    // The VPC's read fails: by then the one mutating call is made, after one describe.
    ec2.fail_next("DescribeVpcs", underway_cloud::CloudError::Transient { op: "DescribeVpcs", message: "test".into() });
    assert!(src.sync(&state).await.is_err());
    let c = ec2.counts();
    assert_eq!(c.calls.get("ModifyNetworkInterfaceAttribute"), Some(&1), "{c:?}");
    assert_eq!(c.calls.get("DescribeNetworkInterfaces"), Some(&1), "{c:?}");
    assert_eq!(c.calls.get("DescribeRouteTables"), None, "{c:?}");
    // The retried sync keeps what it learnt: no second look at the ENI, no second change.
    src.sync(&state).await.unwrap();
    let c = ec2.counts();
    assert_eq!(
        (c.calls.get("ModifyNetworkInterfaceAttribute"), c.calls.get("DescribeNetworkInterfaces")),
        (Some(&1), Some(&1)),
        "{c:?}"
    );
    assert_eq!(state.read(|b| b.pool.stats().free()), 62);
    std::fs::remove_dir_all(&dir).unwrap();
}
