//! The test world itself: nodes, ENI hot-plug, IMDS, the router's forwarding and source check.
//! Addresses are assigned by hand through the EC2 API (no underway code). Needs root.

use std::net::Ipv4Addr;
use std::time::Duration;

use aws_sdk_ec2::types::{AttributeBooleanValue, Filter};
use underway_cloud::imds::ImdsIdentity;
use underway_tests::netns;
use underway_tests::world::{Node, World, mac_for, mac_string};

fn ping(node: &Node, addr: &str) -> bool {
    node.exec(&["ping", "-c", "1", "-W", "1", addr]).map(|o| o.status.success()).unwrap_or(false)
}

fn sh(node: &Node, cmd: &str) {
    let out = node.exec(&["sh", "-c", cmd]).unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Creates an ENI with `secondary` extra addresses and attaches it at `device`; returns
/// (eni id, primary, secondaries).
async fn attach_new_eni(world: &World, node: &Node, device: i32, secondary: i32) -> (String, String, Vec<String>) {
    let fx = world.ec2();
    let eni = fx
        .client
        .create_network_interface()
        .subnet_id(&fx.subnet_id)
        .groups(&fx.security_group)
        .secondary_private_ip_address_count(secondary)
        .send()
        .await
        .unwrap();
    let ni = eni.network_interface().unwrap();
    let id = ni.network_interface_id().unwrap().to_string();
    let primary = ni.private_ip_address().unwrap().to_string();
    let others = ni
        .private_ip_addresses()
        .iter()
        .filter_map(|a| a.private_ip_address())
        .filter(|a| *a != primary)
        .map(str::to_string)
        .collect();
    fx.client
        .attach_network_interface()
        .network_interface_id(&id)
        .instance_id(&node.instance_id)
        .device_index(device)
        .send()
        .await
        .unwrap();
    (id, primary, others)
}

async fn primary_eni(world: &World, node: &Node) -> (String, String) {
    let out = world
        .ec2()
        .client
        .describe_network_interfaces()
        .filters(Filter::builder().name("attachment.instance-id").values(&node.instance_id).build())
        .send()
        .await
        .unwrap();
    let ni =
        out.network_interfaces().iter().find(|n| n.attachment().and_then(|a| a.device_index()) == Some(0)).unwrap();
    (ni.network_interface_id().unwrap().to_string(), ni.private_ip_address().unwrap().to_string())
}

async fn set_source_dest_check(world: &World, eni: &str, on: bool) {
    world
        .ec2()
        .client
        .modify_network_interface_attribute()
        .network_interface_id(eni)
        .source_dest_check(AttributeBooleanValue::builder().value(on).build())
        .send()
        .await
        .unwrap();
    world.sync().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_forwards_by_owner_and_enforces_the_source_check() {
    let world = World::create().await.unwrap();
    let a = world.add_node("m5.large").await.unwrap();
    let b = world.add_node("m5.large").await.unwrap();
    let (a_eni0, a_ip) = primary_eni(&world, &a).await;
    let (_, b_ip) = primary_eni(&world, &b).await;
    assert!(ping(&b, &a_ip), "host to host across the router");
    assert!(ping(&a, &b_ip));

    let (_, eth1_primary, secondaries) = attach_new_eni(&world, &a, 1, 1).await;
    world.sync().await.unwrap();
    let sec = &secondaries[0];
    // What ipamd does for a secondary ENI, by hand: up, address, loose rp_filter.
    sh(
        &a,
        &format!(
            "ip link set eth1 up && ip addr add {sec}/32 dev eth1 && sysctl -qw net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.eth1.rp_filter=2"
        ),
    );

    // The reply leaves through eth0 (main table) with a source eth0's ENI does not own: dropped.
    let drops = world.source_check_drops().unwrap();
    assert!(!ping(&b, sec), "reply through the wrong ENI must be dropped");
    assert!(world.source_check_drops().unwrap() > drops, "the router's source check dropped it");

    // Policy routing sends it out through eth1, whose ENI owns it: answered.
    sh(
        &a,
        &format!(
            "ip route add default via 10.0.0.1 dev eth1 onlink table 101 && ip rule add from {sec} lookup 101 priority 1000"
        ),
    );
    assert!(ping(&b, sec), "reply through the owning ENI passes");
    let _ = eth1_primary;

    sh(&a, &format!("ip rule del from {sec} lookup 101 priority 1000"));
    assert!(!ping(&b, sec), "without the rule it is dropped again");

    // Source/destination check off on eth0's ENI lifts the drop.
    set_source_dest_check(&world, &a_eni0, false).await;
    assert!(ping(&b, sec), "no source check on eth0 any more");
    set_source_dest_check(&world, &a_eni0, true).await;
    assert!(!ping(&b, sec));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vpc_route_to_an_instance_makes_its_cidr_reachable() {
    let world = World::create().await.unwrap();
    let a = world.add_node("m5.large").await.unwrap();
    let b = world.add_node("m5.large").await.unwrap();
    let (a_eni0, _) = primary_eni(&world, &a).await;
    sh(&a, "ip addr add 100.64.200.5/32 dev lo");
    set_source_dest_check(&world, &a_eni0, false).await;

    let fx = world.ec2();
    let tables = fx
        .client
        .describe_route_tables()
        .filters(Filter::builder().name("vpc-id").values(&fx.vpc_id).build())
        .filters(Filter::builder().name("association.main").values("true").build())
        .send()
        .await
        .unwrap();
    let main = tables.route_tables()[0].route_table_id().unwrap().to_string();
    assert!(!ping(&b, "100.64.200.5"), "no route yet");
    fx.client
        .create_route()
        .route_table_id(&main)
        .destination_cidr_block("100.64.200.0/24")
        .instance_id(&a.instance_id)
        .send()
        .await
        .unwrap();
    world.sync().await.unwrap();
    assert!(ping(&b, "100.64.200.5"), "the route sends the CIDR to node A");

    fx.client.delete_route().route_table_id(&main).destination_cidr_block("100.64.200.0/24").send().await.unwrap();
    world.sync().await.unwrap();
    assert!(!ping(&b, "100.64.200.5"), "deleting the route cuts it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_plug_and_imds_follow_ec2() {
    let world = World::create().await.unwrap();
    let a = world.add_node("m5.large").await.unwrap();
    world.start_sync_loop(Duration::from_millis(300));
    let (eni, primary, secondaries) = attach_new_eni(&world, &a, 1, 2).await;

    // The sync loop makes eth1 appear, with the derived MAC, within a bounded time.
    let mut seen = String::new();
    for _ in 0..50 {
        seen = String::from_utf8_lossy(&a.exec(&["ip", "-br", "link", "show", "eth1"]).unwrap().stdout).into_owned();
        if !seen.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen.contains(&mac_string(mac_for(&eni))), "eth1 with the ENI's MAC: {seen:?}");

    // IMDS (from the test process's loopback) matches EC2 for every path.
    let id = ImdsIdentity::with_endpoint(&a.imds.endpoint()).unwrap().identity().await.unwrap();
    assert_eq!(id.instance_id, a.instance_id);
    assert_eq!(id.instance_type, "m5.large");
    assert_eq!(id.availability_zone, "us-east-1a");
    assert_eq!(id.interfaces.len(), 2);
    let i1 = &id.interfaces[1];
    assert_eq!(
        (i1.device_number, i1.interface_id.as_str(), i1.mac.clone()),
        (1, eni.as_str(), mac_string(mac_for(&eni)))
    );
    let mut want: Vec<Ipv4Addr> = vec![primary.parse().unwrap()];
    want.extend(secondaries.iter().map(|s| s.parse::<Ipv4Addr>().unwrap()));
    assert_eq!(i1.local_ipv4s, want);
    assert_eq!(i1.subnet_id, world.ec2().subnet_id);
    assert_eq!(i1.vpc_id, world.ec2().vpc_id);
    assert_eq!(i1.subnet_cidr.to_string(), world.ec2().subnet_cidr);
    assert_eq!(i1.vpc_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(), vec![world.ec2().vpc_cidr.clone()]);
    assert_eq!(i1.security_groups, vec![world.ec2().security_group.clone()]);
    let (eni0, ip0) = primary_eni(&world, &a).await;
    assert_eq!(id.interfaces[0].interface_id, eni0);
    assert_eq!(id.primary_mac, mac_string(mac_for(&eni0)));
    assert_eq!(id.interfaces[0].local_ipv4s, vec![ip0.parse::<Ipv4Addr>().unwrap()]);
    let raw = aws_config::imds::Client::builder().endpoint(a.imds.endpoint()).unwrap().build();
    assert_eq!(String::from(raw.get("/latest/meta-data/local-ipv4").await.unwrap()), ip0);
    let mac_leaf = format!("/latest/meta-data/network/interfaces/macs/{}/mac", i1.mac);
    assert_eq!(String::from(raw.get(mac_leaf).await.unwrap()), i1.mac);

    // Inside the node: IMDS at 169.254.169.254 (IMDSv1 refused), EC2 at the node's endpoint.
    let (imds_in, ec2_in) = (a.imds_endpoint_in_ns(), a.ec2_endpoint_in_ns());
    let account = world.account().clone();
    let instance = a.instance_id.clone();
    let (inside, v1, described) = netns::in_ns(&a.ns, move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("169.254.169.254:80").unwrap();
        s.write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut v1 = String::new();
        s.read_to_string(&mut v1).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let id = ImdsIdentity::with_endpoint(&imds_in).unwrap().identity().await.unwrap();
            let mut cfg = account.sdk_config().into_builder();
            cfg.set_endpoint_url(Some(ec2_in));
            let client = aws_sdk_ec2::Client::new(&cfg.build());
            let out = client.describe_instances().instance_ids(&instance).send().await.unwrap();
            (id, v1, out.reservations().len())
        })
    })
    .unwrap();
    assert_eq!(inside, id, "the in-namespace IMDS serves the same identity");
    assert!(v1.starts_with("HTTP/1.1 401"), "IMDSv2 without a token is refused: {v1}");
    assert_eq!(described, 1, "EC2 reachable from inside the node");

    // Detach: the interface disappears, IMDS forgets it.
    let att = world.ec2().client.describe_network_interfaces().network_interface_ids(&eni).send().await.unwrap();
    let att_id = att.network_interfaces()[0].attachment().unwrap().attachment_id().unwrap().to_string();
    world.ec2().client.detach_network_interface().attachment_id(att_id).send().await.unwrap();
    let mut gone = false;
    for _ in 0..50 {
        gone = !a.exec(&["ip", "link", "show", "eth1"]).unwrap().status.success();
        if gone {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "eth1 vanished after detach");
    let id = ImdsIdentity::with_endpoint(&a.imds.endpoint()).unwrap().identity().await.unwrap();
    assert_eq!(id.interfaces.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_leaves_no_namespace_link_or_process() {
    let root_links_before = netns::ip(&["-br", "link"]).unwrap().stdout;
    let world = World::create().await.unwrap();
    world.add_node("m5.large").await.unwrap();
    world.add_node("m5.large").await.unwrap();
    world.start_sync_loop(Duration::from_millis(200));
    let names = world.namespaces();
    assert_eq!(names.len(), 3);
    let listed = netns::list_ns();
    assert!(names.iter().all(|n| listed.contains(n)));
    let id = world.id().to_string();
    drop(world);

    let listed = netns::list_ns();
    assert!(names.iter().all(|n| !listed.contains(n)), "namespaces left: {listed:?}");
    assert_eq!(netns::ip(&["-br", "link"]).unwrap().stdout, root_links_before, "no link in the root namespace");
    let procs = std::process::Command::new("pgrep").args(["-f", &id]).output().unwrap();
    assert!(procs.stdout.is_empty(), "processes left: {}", String::from_utf8_lossy(&procs.stdout));
}
