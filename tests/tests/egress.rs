//! Issue 15, egress: pods reach the internet host through the VPC's internet gateway, which
//! translates only addresses EC2 maps to a public one (here: each node's primary address, by an
//! Elastic IP). A pod's own address (a secondary IP, a VPC-route address) has none: underway's
//! SNAT to the node's primary address is what makes it work. Negative control: a node configured
//! with `egress.snat = "external"` (and no NAT gateway) cannot reach it, and the gateway counts
//! the drops; with a NAT gateway it can. Hosts inside the VPC (a second CIDR block, also one
//! added while ipamd runs) see pods' own addresses; a peered range is translated unless excluded.
//! Needs root and LocalStack.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use underway_tests::cni::{address, cni, conf};
use underway_tests::internet::{Internet, connect_from, seen_from, serve_peer_address};
use underway_tests::ipamd::{IpamdProcess, bin_path};
use underway_tests::kube_proxy::{SHAPES, cluster_ips};
use underway_tests::netns::TempNs;
use underway_tests::world::{Node, World};

fn ipamd(w: &World, n: &Node, cfg: &str) -> IpamdProcess {
    let p = IpamdProcess::start(w, n, &bin_path("underway-ipamd").unwrap(), cfg).unwrap();
    p.wait_ready(1, Duration::from_secs(90)).unwrap_or_else(|e| panic!("{e}\n{}", p.log_text()));
    p
}

/// The node's primary ENI and address.
async fn primary(w: &World, n: &Node) -> (String, Ipv4Addr) {
    let ec2 = aws_sdk_ec2::Client::new(&w.account().direct_sdk_config());
    let out = ec2
        .describe_network_interfaces()
        .filters(aws_sdk_ec2::types::Filter::builder().name("attachment.instance-id").values(&n.instance_id).build())
        .send()
        .await
        .unwrap();
    let ni = out
        .network_interfaces()
        .iter()
        .find(|ni| ni.attachment().and_then(|a| a.device_index()) == Some(0))
        .expect("a primary ENI");
    (ni.network_interface_id().unwrap().to_string(), ni.private_ip_address().unwrap().parse().unwrap())
}

struct Pod {
    ns: TempNs,
    addr: Ipv4Addr,
}

fn add(n: &Node, p: &IpamdProcess, name: &str) -> Pod {
    let ns = TempNs::new(name).unwrap();
    let (code, v) = cni(&n.ns, "ADD", name, &ns.path().display().to_string(), &conf(p));
    assert_eq!(code, 0, "ADD {name}: {v}");
    Pod { addr: address(&v), ns }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pods_of_both_modes_reach_the_internet_as_their_node() {
    let w = World::create().await.unwrap();
    let eni_node = w.add_node("m5.large").await.unwrap();
    let routed_node = w.add_node("m5.large").await.unwrap();
    let external_node = w.add_node("m5.large").await.unwrap();
    w.start_sync_loop(Duration::from_millis(200));
    let net = Internet::attach(&w).await.unwrap();
    // A second CIDR block of the VPC, with a host in it (no node there): inside the VPC, so pods
    // reach it with their own addresses.
    let ec2 = aws_sdk_ec2::Client::new(&w.account().direct_sdk_config());
    ec2.associate_vpc_cidr_block().vpc_id(&w.ec2().vpc_id).cidr_block("10.3.0.0/16").send().await.unwrap();
    let in_block = Ipv4Addr::new(10, 3, 1, 10);
    net.host("blk", 210, in_block, "10.3.1.0/24".parse().unwrap()).unwrap();
    w.sync().await.unwrap(); // IMDS lists the block before ipamd first reads it
    let fast = "cooldown_ms = 1000\nadd_wait_ms = 15000\n";
    // 12 warm addresses: the primary ENI holds 9, so a second ENI (eth1) serves too.
    let e = ipamd(&w, &eni_node, &format!("{fast}[targets]\nwarm_ip_target = 12\n"));
    let r = ipamd(
        &w,
        &routed_node,
        &format!(
            "{fast}mode = \"vpc-route\"\n[vpc_route]\npod_cidr = \"100.64.7.0/24\"\ncluster_cidr = \"100.64.0.0/16\"\n"
        ),
    );
    let x = ipamd(&w, &external_node, &format!("{fast}[egress]\nsnat = \"external\"\n"));
    let mut public = Vec::new();
    for n in [&eni_node, &routed_node, &external_node] {
        let (eni, ip) = primary(&w, n).await;
        public.push(net.elastic_ip(&eni, ip).await.unwrap());
    }
    // The ENI node's pods until one is on eth1 (a secondary ENI: its own policy table).
    let mut pods = Vec::new();
    let mut on_eth1 = None;
    for i in 0..12 {
        let p = add(&eni_node, &e, &format!("e{i}"));
        let rules = String::from_utf8_lossy(&eni_node.exec(&["ip", "rule"]).unwrap().stdout).to_string();
        let secondary = rules.contains(&format!("from {} lookup", p.addr));
        pods.push(p);
        if secondary {
            on_eth1 = Some(pods.len() - 1);
            break;
        }
    }
    let eth1 = on_eth1.expect("a pod on the secondary ENI");
    let eth0 = 0;
    w.sync().await.unwrap(); // the test world's router has caught up with EC2 (it polls)
    for (what, p) in [("a primary-ENI pod", &pods[eth0]), ("a secondary-ENI pod", &pods[eth1])] {
        assert_eq!(seen_from(&p.ns.0).as_deref(), Some(public[0].to_string().as_str()), "{what} ({})", p.addr);
    }
    let rp = add(&routed_node, &r, "r0");
    w.sync().await.unwrap();
    assert_eq!(seen_from(&rp.ns.0).as_deref(), Some(public[1].to_string().as_str()), "a VPC-route pod ({})", rp.addr);
    assert_eq!(net.untranslated_drops(), 0, "nothing untranslated reached the gateway");
    // The host in the VPC's second block sees each pod's own address; the secondary-ENI pod's
    // packets arrive by its ENI's link (the router's side of eth1).
    let rx = |link: &str| router_rx(&w, link);
    let eth1_link = underway_tests::world::router_link(eni_node.index, 1);
    let to_block = SocketAddr::from((in_block, 80));
    for (what, p) in [("eth0 pod", &pods[eth0]), ("eth1 pod", &pods[eth1]), ("VPC-route pod", &rp)] {
        let before = rx(&eth1_link);
        assert_eq!(connect_from(&p.ns.0, to_block), Some(p.addr.to_string()), "{what}: its own address in the VPC");
        // A TCP exchange is at least 3 packets (SYN, ACK, FIN); a stray neighbour probe is 1.
        let by_eth1 = rx(&eth1_link) >= before + 3;
        assert_eq!(by_eth1, std::ptr::eq(p, &pods[eth1]), "{what}: arrived by eth1's link: {by_eth1}");
    }
    // The negative control: no SNAT on the node, no NAT gateway → the gateway drops it.
    let xp = add(&external_node, &x, "x0");
    assert_eq!(seen_from(&xp.ns.0), None, "an untranslated pod address cannot reach the internet");
    assert!(net.untranslated_drops() > 0, "and the gateway counted the drop");
    // The node itself reaches the internet as itself (its own traffic is not the table's).
    assert_eq!(seen_from(&eni_node.ns).as_deref(), Some(public[0].to_string().as_str()));
    // `external` is for a VPC whose private subnets send the internet to a NAT gateway: with one,
    // the same pod gets out, as the NAT gateway's public address.
    let nat_public = net.nat_gateway(&w).await.unwrap();
    let seen = seen_from(&xp.ns.0);
    assert_eq!(seen, Some(nat_public.to_string()), "external: through the NAT gateway\n{}", net.diagnose());
}

/// Packets the router received on `link` (its side of a node's ENI).
fn router_rx(w: &World, link: &str) -> u64 {
    let o =
        underway_tests::netns::exec(w.router_ns(), &["cat", &format!("/sys/class/net/{link}/statistics/rx_packets")]);
    String::from_utf8_lossy(&o.unwrap().stdout).trim().parse().unwrap()
}

/// The SNAT is decided on the destination after kube-proxy's DNAT: a ClusterIP whose endpoint is
/// outside the VPC (here: the internet host) is translated for a secondary-ENI pod (the AWS VPC
/// CNI decides before the DNAT, #1910). An `egress.exclude` range is not translated (the gateway
/// then drops it). A CIDR block added to the VPC while ipamd runs becomes exempt without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snat_follows_dnat_exclusions_and_vpc_blocks_added_later() {
    let w = World::create().await.unwrap();
    let n = w.add_node("m5.large").await.unwrap();
    let ex = w.add_node("m5.large").await.unwrap();
    w.start_sync_loop(Duration::from_millis(200));
    let net = Internet::attach(&w).await.unwrap();
    let fast = "cooldown_ms = 1000\nadd_wait_ms = 15000\n";
    let mut d = ipamd(&w, &n, &format!("{fast}[targets]\nwarm_ip_target = 12\n[egress]\nrefresh_ms = 1000\n"));
    let x = ipamd(&w, &ex, &format!("{fast}[egress]\nexclude = [\"192.168.0.0/16\"]\n"));
    // A peered network beyond the router (outside the VPC's blocks).
    let peer_host = Ipv4Addr::new(192, 168, 50, 10);
    net.host("peer", 211, peer_host, "192.168.0.0/16".parse().unwrap()).unwrap();
    let mut public = Vec::new();
    for node in [&n, &ex] {
        let (eni, ip) = primary(&w, node).await;
        public.push(net.elastic_ip(&eni, ip).await.unwrap());
    }
    let mut pods = Vec::new();
    let pod = loop {
        let p = add(&n, &d, &format!("c{}", pods.len()));
        let rules = String::from_utf8_lossy(&n.exec(&["ip", "rule"]).unwrap().stdout).to_string();
        let secondary = rules.contains(&format!("from {} lookup", p.addr));
        pods.push(p);
        if secondary {
            break pods.last().unwrap();
        }
        assert!(pods.len() < 13, "no pod on the secondary ENI");
    };
    // A pod on the other node, serving the address it sees (a Service's endpoint in the VPC).
    let xp = add(&ex, &x, "x0");
    serve_peer_address(&xp.ns.0).unwrap();
    // The router routes what EC2 holds as of one pass that began after the last Add (the test
    // world's fabric follows EC2 by polling; EC2's own takes effect with the reply).
    w.sync().await.unwrap();
    // kube-proxy in each shape: ClusterIP 172.20.0.10:80 → the internet host (outside the VPC:
    // translated, decided after the DNAT) and 172.20.0.11:80 → the pod on the other node (inside:
    // the pod's own address).
    let (outside, inside) = (SocketAddr::from(([172, 20, 0, 10], 80)), SocketAddr::from(([172, 20, 0, 11], 80)));
    for shape in SHAPES {
        let services = [
            (outside, SocketAddr::from((underway_tests::internet::HOST, 80))),
            (inside, SocketAddr::from((xp.addr, 80))),
        ];
        let rules = cluster_ips(shape, &services);
        assert!(n.exec(&["sh", "-c", &rules.install]).unwrap().status.success(), "{shape}: {}", rules.install);
        let public_seen = connect_from(&pod.ns.0, outside);
        assert_eq!(
            public_seen.as_deref(),
            Some(public[0].to_string().as_str()),
            "{shape}: a ClusterIP outside the VPC"
        );
        let pod_seen = connect_from(&pod.ns.0, inside);
        assert_eq!(
            pod_seen,
            Some(pod.addr.to_string()),
            "{shape}: a ClusterIP on another node ({}), the pod's own address\n{}\n{}",
            xp.addr,
            rules.install,
            net.diagnose()
        );
        assert!(n.exec(&["sh", "-c", &rules.remove]).unwrap().status.success(), "{shape}: {}", rules.remove);
    }
    // An excluded range (the peered network) keeps the pod's address; without the exclusion the
    // node translates it like any destination outside the VPC.
    let to_peer = SocketAddr::from((peer_host, 80));
    assert_eq!(connect_from(&xp.ns.0, to_peer), Some(xp.addr.to_string()), "excluded: the pod's own address");
    assert_eq!(connect_from(&pod.ns.0, to_peer), Some(n.primary_ip().unwrap().to_string()), "not excluded: SNAT");
    // A block added to the VPC is exempt within refresh_ms.
    let ec2 = aws_sdk_ec2::Client::new(&w.account().direct_sdk_config());
    ec2.associate_vpc_cidr_block().vpc_id(&w.ec2().vpc_id).cidr_block("10.2.0.0/16").send().await.unwrap();
    let t = std::time::Instant::now();
    loop {
        let table =
            String::from_utf8_lossy(&n.exec(&["nft", "list", "set", "ip", "underway", "exempt"]).unwrap().stdout)
                .to_string();
        if table.contains("10.2.0.0/16") {
            assert!(table.contains("10.0.0.0/16"), "{table}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the new block never became exempt: {table}");
        std::thread::sleep(Duration::from_millis(250));
    }
    net.host("blk", 212, Ipv4Addr::new(10, 2, 1, 10), "10.2.1.0/24".parse().unwrap()).unwrap();
    let eth1_link = underway_tests::world::router_link(n.index, 1);
    let before = router_rx(&w, &eth1_link);
    let seen = connect_from(&pod.ns.0, SocketAddr::from(([10, 2, 1, 10], 80)));
    assert_eq!(seen, Some(pod.addr.to_string()), "the new block's host sees the pod's own address");
    assert!(router_rx(&w, &eth1_link) > before, "arriving by the pod's ENI (eth1)");

    // Restarts change nothing: the node's rules (underway's table without counter values, the
    // policy rules, every route table) come back the same after each of three restarts.
    let rules = || {
        let sh = "nft -s list table ip underway; ip rule; ip route show table all | grep -v '^local\\|^broadcast'";
        String::from_utf8_lossy(&n.exec(&["sh", "-c", sh]).unwrap().stdout).to_string()
    };
    d.wait_ready(12, Duration::from_secs(60)).unwrap(); // the pool at its target: nothing left to grow
    let first = rules();
    assert!(first.contains("table ip underway") && first.contains("lookup main"), "{first}");
    for round in 1..=3 {
        d.stop();
        d.spawn().unwrap();
        d.wait_ready(0, Duration::from_secs(60)).unwrap();
        let t = std::time::Instant::now();
        let mut now = rules();
        while now != first && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(200));
            now = rules();
        }
        assert_eq!(now, first, "after restart {round}");
    }
    // `uninstall` takes the table and the fwmark rule away.
    d.stop();
    let out = d.run_cmd(&["uninstall"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = rules();
    assert!(!after.contains("table ip underway") && !after.contains("fwmark"), "{after}");
}
