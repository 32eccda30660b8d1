//! The pod datapath in throwaway namespaces (root): a "node" namespace plays the host, a "pod"
//! namespace the container. Both are removed even when a test fails.

use std::net::Ipv4Addr;

use underway_tests::netns::TempNs;

use underway_routes::{
    PodSpec, Replace, check_pod, gc_host_veths, host_veth_name, make_veth, pod_veth_name, pod_veths, setup_pod,
    teardown_attachment, teardown_pod, teardown_veth,
};

type Netns = TempNs;

fn spec(addr: [u8; 4], table: Option<u32>) -> PodSpec {
    PodSpec {
        network: "underway".into(),
        attachment: host_veth_name("uw", &format!("container-{addr:?}"), "eth0"),
        host_veth: host_veth_name("uw", &format!("container-{addr:?}"), "eth0"),
        ifname: "eth0".into(),
        address: Ipv4Addr::from(addr),
        gateway: Ipv4Addr::new(169, 254, 1, 1),
        mtu: 1500,
        route_table: table,
    }
}

/// Another attachment (of `container`) given `a`'s address: an address handed out twice.
fn same_address(a: &PodSpec, container: &str) -> PodSpec {
    let veth = host_veth_name("uw", container, "eth0");
    PodSpec { host_veth: veth.clone(), attachment: veth, ..a.clone() }
}

#[tokio::test]
async fn setup_pings_both_ways_and_teardown_leaves_nothing() {
    let node = Netns::new("node").unwrap();
    let pod = Netns::new("pod").unwrap();
    assert!(node.sh("ip link set lo up && ip addr add 10.99.1.1/32 dev lo && sysctl -qw net.ipv4.ip_forward=1").0);
    let s = spec([10, 99, 0, 5], None);
    setup_pod(Some(&node.path()), &pod.path(), &s).await.unwrap();

    let (_, addrs) = pod.sh("ip -4 -br addr show eth0");
    assert!(addrs.contains("10.99.0.5/32"), "{addrs}");
    let (_, neigh) = pod.sh("ip neigh show 169.254.1.1");
    assert!(neigh.contains("PERMANENT"), "{neigh}");
    let (_, routes) = pod.sh("ip route");
    assert!(routes.contains("default via 169.254.1.1 dev eth0"), "{routes}");
    assert!(pod.sh("ping -c1 -W2 10.99.1.1").0, "pod → node");
    assert!(node.sh("ping -c1 -W2 10.99.0.5").0, "node → pod");
    let (_, rules) = node.sh("ip rule");
    assert!(rules.contains("512:\tfrom all to 10.99.0.5 lookup main"), "every pod: the to rule: {rules}");
    assert!(!rules.contains("from 10.99.0.5 lookup"), "primary ENI / VPC-route: no from rule: {rules}");

    // ADD again is idempotent (the stale veth is replaced).
    setup_pod(Some(&node.path()), &pod.path(), &s).await.unwrap();
    assert!(node.sh("ping -c1 -W2 10.99.0.5").0);

    teardown_pod(Some(&node.path()), &s).await.unwrap();
    let (_, links) = node.sh("ip -br link");
    assert!(!links.contains(&s.host_veth), "{links}");
    let (_, plinks) = pod.sh("ip -br link");
    assert!(!plinks.contains("eth0"), "{plinks}");
    let (_, routes) = node.sh("ip route");
    assert!(!routes.contains("10.99.0.5"), "{routes}");
    // Teardown again, and with the pod netns gone, is fine.
    teardown_pod(Some(&node.path()), &s).await.unwrap();
    drop(pod);
    teardown_pod(Some(&node.path()), &s).await.unwrap();
}

#[tokio::test]
async fn a_secondary_eni_address_gets_its_rules() {
    let node = Netns::new("node").unwrap();
    let pod = Netns::new("pod").unwrap();
    let s = spec([10, 99, 0, 6], Some(101));
    setup_pod(Some(&node.path()), &pod.path(), &s).await.unwrap();
    let (_, rules) = node.sh("ip rule");
    assert!(rules.contains("512:\tfrom all to 10.99.0.6 lookup main"), "{rules}");
    assert!(rules.contains("1536:\tfrom 10.99.0.6 lookup 101"), "{rules}");
    // The rules route (a rule without an action matches and fails every lookup with EINVAL).
    assert!(
        node.sh("sysctl -qw net.ipv4.ip_forward=1 && ip link add tst0 type veth peer name tst1 && ip link set tst0 up && ip route add default dev tst0 table 101")
            .0
    );
    let (ok, to_pod) = node.sh("ip route get 10.99.0.6 2>&1");
    assert!(ok && to_pod.contains(&s.host_veth), "to the pod through main: {to_pod}");
    let (ok, from_pod) = node.sh(&format!("ip route get 192.0.2.1 from 10.99.0.6 iif {} 2>&1", s.host_veth));
    assert!(
        ok && from_pod.contains("dev tst0") && from_pod.contains("table 101"),
        "from the pod through 101: {from_pod}"
    );
    setup_pod(Some(&node.path()), &pod.path(), &s).await.unwrap();
    let (_, rules) = node.sh("ip rule");
    assert_eq!(rules.matches("10.99.0.6").count(), 2, "no duplicate rules: {rules}");
    teardown_pod(Some(&node.path()), &s).await.unwrap();
    let (_, rules) = node.sh("ip rule");
    assert!(!rules.contains("10.99.0.6"), "{rules}");
}

#[tokio::test]
async fn a_failed_setup_leaves_no_veth() {
    let node = Netns::new("node").unwrap();
    let pod = Netns::new("pod").unwrap();
    // An interface named like the pod's already in the pod netns makes the set-up fail.
    assert!(pod.sh("ip link add eth0 type veth peer name eth0p").0);
    let s = spec([10, 99, 0, 7], None);
    let e = setup_pod(Some(&node.path()), &pod.path(), &s).await.unwrap_err();
    assert!(e.to_string().contains("with eth0 in the pod netns"), "{e}");
    let (_, links) = node.sh("ip -br link");
    assert!(!links.contains(&s.host_veth), "half-made veth left: {links}");
    let (_, plinks) = pod.sh("ip -br link");
    assert_eq!(plinks.lines().count(), 3, "only lo and the test's own veth pair: {plinks}");
}

#[tokio::test]
async fn check_names_the_missing_piece_and_gc_and_veth_teardown_clean_up() {
    let node = Netns::new("node").unwrap();
    let pod = Netns::new("pod").unwrap();
    let s = spec([10, 99, 0, 8], Some(102));
    let links = setup_pod(Some(&node.path()), &pod.path(), &s).await.unwrap();
    assert_eq!(links.host_mac.len(), 17);
    check_pod(Some(&node.path()), &pod.path(), &s).await.unwrap();

    let cases: [(&str, &Netns, &str); 4] = [
        ("ip rule del priority 1536", &node, "rule 1536"),
        ("ip rule del priority 512", &node, "rule 512"),
        ("ip neigh del 169.254.1.1 dev eth0", &pod, "neighbour"),
        ("ip route del default", &pod, "default route"),
    ];
    for (cmd, ns, want) in cases {
        assert!(ns.sh(cmd).0, "{cmd}");
        let e = check_pod(Some(&node.path()), &pod.path(), &s).await.unwrap_err();
        assert!(e.to_string().contains(want), "after {cmd:?}: {e}");
        setup_pod(Some(&node.path()), &pod.path(), &s).await.unwrap();
        check_pod(Some(&node.path()), &pod.path(), &s).await.unwrap();
    }

    // Teardown by veth name alone finds the address from the host route and removes its rules.
    teardown_veth(Some(&node.path()), &s.host_veth).await.unwrap();
    let (_, rules) = node.sh("ip rule");
    assert!(!rules.contains("10.99.0.8"), "{rules}");
    assert!(check_pod(Some(&node.path()), &pod.path(), &s).await.is_err());

    // GC removes this network's veths that are not kept, and only those (the alias says whose).
    let keep = spec([10, 99, 0, 9], None);
    let drop_ = spec([10, 99, 0, 10], Some(103));
    let pod2 = Netns::new("pod").unwrap();
    setup_pod(Some(&node.path()), &pod.path(), &keep).await.unwrap();
    setup_pod(Some(&node.path()), &pod2.path(), &drop_).await.unwrap();
    let kept = std::collections::BTreeSet::from([keep.host_veth.clone()]);
    assert!(
        gc_host_veths(Some(&node.path()), "uw", "another", &kept).await.unwrap().is_empty(),
        "not another network's"
    );
    let removed = gc_host_veths(Some(&node.path()), "uw", "underway", &kept).await.unwrap();
    assert_eq!(removed, vec![drop_.host_veth.clone()]);
    check_pod(Some(&node.path()), &pod.path(), &keep).await.unwrap();
    let (_, rules) = node.sh("ip rule");
    assert!(!rules.contains("10.99.0.10"), "{rules}");
}

/// Issue 14, item 1: an address handed out twice must not move a running pod's traffic to the
/// second pod (the host route was `replace`d onto the new veth). The second ADD fails, naming the
/// first pod's veth, and leaves the first pod's route and rules as they were.
#[tokio::test]
async fn an_address_routed_to_a_running_pod_is_refused_to_another() {
    let node = Netns::new("node").unwrap();
    let first = Netns::new("pod").unwrap();
    let second = Netns::new("pod").unwrap();
    assert!(node.sh("ip link set lo up && ip addr add 10.99.1.1/32 dev lo").0);
    let a = spec([10, 99, 0, 9], Some(102));
    setup_pod(Some(&node.path()), &first.path(), &a).await.unwrap();
    let b = same_address(&a, "another-container");
    let e = setup_pod(Some(&node.path()), &second.path(), &b).await.unwrap_err();
    assert!(matches!(e, underway_routes::RoutesError::InUse { .. }), "{e}");
    assert!(e.to_string().contains(&a.host_veth), "names the holder: {e}");
    let (_, links) = node.sh("ip -br link");
    assert!(!links.contains(&b.host_veth), "no half-made veth: {links}");
    let (_, route) = node.sh("ip route get 10.99.0.9");
    assert!(route.contains(&a.host_veth), "the first pod keeps its traffic: {route}");
    let (_, rules) = node.sh("ip rule");
    assert!(rules.contains("512:\tfrom all to 10.99.0.9 lookup main"), "{rules}");
    assert!(rules.contains("1536:\tfrom 10.99.0.9 lookup 102"), "the first pod's rules stay: {rules}");
    assert!(node.sh("ping -c1 -W2 10.99.0.9").0, "node → first pod");
    // Once the first pod is gone, the address can be set up for the second.
    teardown_pod(Some(&node.path()), &a).await.unwrap();
    setup_pod(Some(&node.path()), &second.path(), &b).await.unwrap();
    let (_, route) = node.sh("ip route get 10.99.0.9");
    assert!(route.contains(&b.host_veth), "{route}");
}

/// An ADD given an address another pod holds, whose pod side fails before its host route is
/// refused (here: the pod end vanishes, as when the runtime tears the sandbox down mid-ADD), must
/// leave the holder's rules alone: until the host route is this pod's, the address's rules are
/// the holder's. (Found by review: the failure path removed the address's rules whatever step
/// failed, which the route dump before each ADD used to shield.)
#[tokio::test]
async fn a_failed_add_of_a_held_address_leaves_the_holders_rules() {
    let node = Netns::new("node").unwrap();
    let (first, second) = (Netns::new("pod").unwrap(), Netns::new("pod").unwrap());
    assert!(node.sh("ip link set lo up && ip addr add 10.99.1.1/32 dev lo").0);
    let a = spec([10, 99, 0, 11], Some(103));
    setup_pod(Some(&node.path()), &first.path(), &a).await.unwrap();
    let b = same_address(&a, "another-container-2");
    let made = make_veth(Some(&node.path()), &second.path(), &b.veth(), Replace::OnlyOurs).await.unwrap();
    assert!(second.sh("ip link del eth0").0, "the pod end goes (and the host end with it)");
    made.finish(&b).await.expect_err("the pod side cannot be made");
    let (_, rules) = node.sh("ip rule");
    assert!(rules.contains("512:\tfrom all to 10.99.0.11 lookup main"), "the holder's rules stay: {rules}");
    assert!(rules.contains("1536:\tfrom 10.99.0.11 lookup 103"), "{rules}");
    check_pod(Some(&node.path()), &first.path(), &a).await.unwrap();
    teardown_pod(Some(&node.path()), &a).await.unwrap();
}

/// Issue 15: host veths named per pod, as policy engines compute them (prefix + sha1 of
/// "<namespace>.<pod>"), so a newer sandbox of the same pod gets the same name. Its ADD replaces
/// the older sandbox's veth (with that address's rules); the older sandbox's DEL, which comes
/// later, must leave the newer one's veth alone; ipamd's view (`pod_veths`) names attachments, not
/// veths; GC keeps by attachment.
#[tokio::test]
async fn a_newer_sandbox_of_the_same_pod_keeps_its_veth_through_the_older_ones_del() {
    let node = Netns::new("node").unwrap();
    let (old_ns, new_ns) = (Netns::new("pod").unwrap(), Netns::new("pod").unwrap());
    assert!(node.sh("ip link set lo up && ip addr add 10.99.1.1/32 dev lo").0);
    let name = pod_veth_name("uw", Some(("shop", "cart-0")), "sandbox-old", "eth0");
    let sandbox = |c: &str, addr: [u8; 4]| PodSpec {
        attachment: host_veth_name("uw", c, "eth0"),
        host_veth: name.clone(),
        ..spec(addr, Some(102))
    };
    let (old, new) = (sandbox("sandbox-old", [10, 99, 0, 21]), sandbox("sandbox-new", [10, 99, 0, 22]));
    setup_pod(Some(&node.path()), &old_ns.path(), &old).await.unwrap();
    setup_pod(Some(&node.path()), &new_ns.path(), &new).await.unwrap();
    let (_, rules) = node.sh("ip rule");
    assert!(!rules.contains("10.99.0.21"), "the older sandbox's rules went with its veth: {rules}");
    let seen = pod_veths(Some(&node.path()), "uw").await.unwrap();
    assert_eq!(seen, vec![(new.attachment.clone(), vec![Ipv4Addr::new(10, 99, 0, 22)])]);
    // The older sandbox's DEL: nothing of its own is left, and the newer veth stays.
    let removed = teardown_attachment(Some(&node.path()), "uw", &name, &old.attachment).await.unwrap();
    assert_eq!(removed, None);
    check_pod(Some(&node.path()), &new_ns.path(), &new).await.unwrap();
    assert!(node.sh("ping -c1 -W2 10.99.0.22").0, "the newer sandbox still answers");
    // GC keeps by attachment id, whatever the veth is called.
    let keep = std::collections::BTreeSet::from([new.attachment.clone()]);
    assert!(gc_host_veths(Some(&node.path()), "uw", "underway", &keep).await.unwrap().is_empty());
    // Its own DEL removes it, also when the DEL does not know the pod (found by its alias).
    let legacy = host_veth_name("uw", "sandbox-new", "eth0");
    let removed = teardown_attachment(Some(&node.path()), "uw", &legacy, &new.attachment).await.unwrap();
    assert_eq!(removed, Some(name.clone()));
    assert!(!node.sh("ip -br link").1.contains(&name));
    let (_, rules) = node.sh("ip rule");
    assert!(!rules.contains("10.99.0.22"), "{rules}");
}
