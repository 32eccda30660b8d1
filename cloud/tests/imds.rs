//! The IMDSv2 identity client against the harness's IMDSv2 server (tokens checked).

use std::collections::BTreeMap;

use underway_cloud::CloudError;
use underway_cloud::imds::ImdsIdentity;
use underway_tests::imds::FakeImds;

fn node_paths() -> BTreeMap<String, String> {
    let m = "/latest/meta-data";
    let mut p = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        p.insert(format!("{m}/{k}"), v.to_string());
    };
    put("instance-id", "i-0a1b2c3d4e5f");
    put("instance-type", "m5.large");
    put("placement/availability-zone", "us-east-1a");
    put("mac", "02:1a:2b:3c:4d:5e");
    for (mac, dev, eni, ips, prefix) in [
        ("02:1a:2b:3c:4d:5e", "0", "eni-0000000000000a", "10.0.1.10\n10.0.1.11", None),
        ("02:1a:2b:3c:4d:5f", "1", "eni-0000000000000b", "10.0.1.20", Some("10.0.1.32/28\n10.0.1.48/28")),
    ] {
        let i = format!("network/interfaces/macs/{mac}");
        put(&format!("{i}/device-number"), dev);
        put(&format!("{i}/interface-id"), eni);
        put(&format!("{i}/subnet-id"), "subnet-0a1b2c3d");
        put(&format!("{i}/subnet-ipv4-cidr-block"), "10.0.0.0/18");
        put(&format!("{i}/vpc-id"), "vpc-0a1b2c3d");
        put(&format!("{i}/vpc-ipv4-cidr-blocks"), "10.0.0.0/16\n100.64.0.0/16");
        put(&format!("{i}/security-group-ids"), "sg-1\nsg-2");
        put(&format!("{i}/local-ipv4s"), ips);
        if let Some(pfx) = prefix {
            put(&format!("{i}/ipv4-prefix"), pfx);
        }
    }
    p
}

#[tokio::test]
async fn identity_reads_instance_and_every_interface() {
    let imds = FakeImds::start(node_paths()).await.unwrap();
    let id = ImdsIdentity::with_endpoint(&imds.endpoint()).unwrap().identity().await.unwrap();
    assert_eq!(id.instance_id, "i-0a1b2c3d4e5f");
    assert_eq!(id.instance_type, "m5.large");
    assert_eq!(id.region, "us-east-1");
    assert_eq!(id.interfaces.len(), 2);
    let primary = id.primary().unwrap();
    assert_eq!(primary.device_number, 0);
    assert_eq!(primary.interface_id, "eni-0000000000000a");
    assert_eq!(
        primary.local_ipv4s,
        vec!["10.0.1.10".parse::<std::net::Ipv4Addr>().unwrap(), "10.0.1.11".parse().unwrap()]
    );
    assert_eq!(primary.vpc_cidrs.len(), 2);
    assert_eq!(primary.security_groups, vec!["sg-1", "sg-2"]);
    assert!(primary.ipv4_prefixes.is_empty());
    let second = &id.interfaces[1];
    assert_eq!((second.device_number, second.interface_id.as_str()), (1, "eni-0000000000000b"));
    assert_eq!(second.ipv4_prefixes.len(), 2);
}

#[tokio::test]
async fn missing_and_malformed_metadata_are_errors() {
    let mut paths = node_paths();
    paths.remove("/latest/meta-data/instance-type");
    let imds = FakeImds::start(paths).await.unwrap();
    let e = ImdsIdentity::with_endpoint(&imds.endpoint()).unwrap().identity().await.unwrap_err();
    assert!(matches!(&e, CloudError::NotFound { message, .. } if message.contains("instance-type")), "{e:?}");

    let mut paths = node_paths();
    paths.insert("/latest/meta-data/mac".into(), "02:00:00:23302x:14202x:19602x".into());
    imds.set_paths(paths);
    let e = ImdsIdentity::with_endpoint(&imds.endpoint()).unwrap().identity().await.unwrap_err();
    assert!(matches!(&e, CloudError::Fatal { message, .. } if message.contains("mac")), "{e:?}");
}

#[tokio::test]
async fn imdsv1_get_without_token_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let imds = FakeImds::start(node_paths()).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(imds.addr).await.unwrap();
    s.write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
}
