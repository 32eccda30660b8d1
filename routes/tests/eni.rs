//! ENI set-up in a throwaway node namespace (root): the link is found by MAC, configured, and
//! given its route table; teardown empties the table.

use std::net::Ipv4Addr;

use underway_routes::eni::table_destinations;
use underway_routes::{EniSpec, setup_eni, teardown_eni};
use underway_tests::netns::TempNs;

#[tokio::test]
async fn an_eni_link_is_found_by_mac_and_gets_its_table() {
    let node = TempNs::new("node").unwrap();
    assert!(node.sh("ip link add eth1 address 02:aa:bb:cc:dd:01 type veth peer name peer1").0);
    let spec = EniSpec {
        mac: [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01],
        mtu: 9001,
        table: 101,
        primary_ip: Ipv4Addr::new(10, 0, 5, 20),
        subnet: Ipv4Addr::new(10, 0, 0, 0),
        subnet_prefix: 18,
    };
    let p = node.path();
    assert_eq!(setup_eni(Some(&p), &spec).await.unwrap(), "eth1");
    assert_eq!(setup_eni(Some(&p), &spec).await.unwrap(), "eth1", "idempotent");
    let (_, link) = node.sh("ip link show eth1");
    assert!(link.contains("mtu 9001") && link.contains(",UP"), "{link}");
    assert_eq!(node.sh("cat /proc/sys/net/ipv4/conf/eth1/rp_filter").1.trim(), "2");
    assert!(node.sh("ip -4 addr show eth1").1.contains("10.0.5.20/32"));
    let (_, table) = node.sh("ip route show table 101");
    assert!(table.contains("default via 10.0.0.1 dev eth1"), "{table}");
    assert!(table.contains("10.0.0.0/18 dev eth1"), "{table}");
    let mut dests = table_destinations(Some(&p), 101).await.unwrap();
    dests.sort();
    assert_eq!(dests, vec![(Ipv4Addr::UNSPECIFIED, 0), (Ipv4Addr::new(10, 0, 0, 0), 18)]);
    let (_, main) = node.sh("ip route show table main");
    assert!(!main.contains("eth1"), "nothing in main: {main}");

    teardown_eni(Some(&p), &spec).await.unwrap();
    assert!(node.sh("ip route show table 101").1.trim().is_empty());
    assert!(!node.sh("ip -4 addr show eth1").1.contains("10.0.5.20"));
    teardown_eni(Some(&p), &spec).await.unwrap();

    let missing = EniSpec { mac: [2, 0, 0, 0, 0, 9], ..spec.clone() };
    let e = setup_eni(Some(&p), &missing).await.unwrap_err();
    assert!(e.to_string().contains("02:00:00:00:00:09"), "{e}");
    let bad = EniSpec { table: 254, ..spec };
    assert!(setup_eni(Some(&p), &bad).await.is_err(), "the main table is refused");
}
