//! SDK replay tests: EC2 responses as AWS documents them, for what LocalStack cannot produce.
//! Each test names the LocalStack gap it covers. No network: the SDK talks to a replay client.

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::config::{Credentials, SharedCredentialsProvider};
use aws_smithy_http_client::test_util::{ReplayEvent, StaticReplayClient};
use aws_smithy_types::body::SdkBody;
use underway_cloud::aws::{Ec2Cloud, Ec2Config};
use underway_cloud::*;

const NS: &str = r#"xmlns="http://ec2.amazonaws.com/doc/2016-11-15/""#;

fn ok(body: String) -> ReplayEvent {
    event(200, body)
}

fn error(status: u16, code: &str) -> ReplayEvent {
    event(
        status,
        format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code><Message>{code} (as documented)</Message></Error></Errors><RequestID>4f6c7e5e</RequestID></Response>"#
        ),
    )
}

fn event(status: u16, body: String) -> ReplayEvent {
    ReplayEvent::new(
        http::Request::builder().uri("https://ec2.us-east-1.amazonaws.com/").body(SdkBody::empty()).unwrap(),
        http::Response::builder().status(status).header("content-type", "text/xml").body(SdkBody::from(body)).unwrap(),
    )
}

fn cloud(events: Vec<ReplayEvent>, max_attempts: u32) -> (Ec2Cloud, StaticReplayClient) {
    let replay = StaticReplayClient::new(events);
    let sdk = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new("AKID", "secret", None, None, "test")))
        .http_client(replay.clone())
        .build();
    let cfg = Ec2Config { max_attempts, initial_backoff_ms: 1, ..Ec2Config::default() };
    (Ec2Cloud::from_sdk_config(&sdk, &cfg), replay)
}

/// The form-encoded bodies of the requests the SDK sent.
fn bodies(replay: &StaticReplayClient) -> Vec<String> {
    replay
        .actual_requests()
        .map(|r| String::from_utf8_lossy(r.body().bytes().expect("in-memory body")).into_owned())
        .collect()
}

fn eni_xml(prefixes: &[&str]) -> String {
    let items: String = prefixes.iter().map(|p| format!("<item><ipv4Prefix>{p}</ipv4Prefix></item>")).collect();
    format!(
        "<networkInterfaceId>eni-0a1b2c3d4e5f60001</networkInterfaceId><subnetId>subnet-0a1b2c3d</subnetId>\
         <vpcId>vpc-0a1b2c3d</vpcId><description>underway</description><macAddress>02:1a:2b:3c:4d:5e</macAddress>\
         <privateIpAddress>10.0.1.10</privateIpAddress><sourceDestCheck>true</sourceDestCheck><status>pending</status>\
         <groupSet><item><groupId>sg-0a1b2c3d</groupId><groupName>nodes</groupName></item></groupSet>\
         <privateIpAddressesSet><item><privateIpAddress>10.0.1.10</privateIpAddress><primary>true</primary></item></privateIpAddressesSet>\
         <ipv4PrefixSet>{items}</ipv4PrefixSet><tagSet/>"
    )
}

fn known_eni(prefixes: &[&str]) -> Eni {
    Eni {
        id: "eni-0a1b2c3d4e5f60001".into(),
        subnet_id: "subnet-0a1b2c3d".into(),
        vpc_id: "vpc-0a1b2c3d".into(),
        mac_raw: "02:1a:2b:3c:4d:5e".into(),
        description: String::new(),
        primary_ip: "10.0.1.10".parse().unwrap(),
        secondary_ips: vec![],
        prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
        attachment: None,
        status: "in-use".into(),
        source_dest_check: true,
        security_groups: vec![],
        tags: Tags::new(),
    }
}

/// Gap: LocalStack accepts `Ipv4PrefixCount` and silently ignores it (no /28 prefixes at all).
#[tokio::test]
async fn prefix_delegation_create_and_assign() {
    let (cloud, replay) = cloud(
        vec![
            ok(format!(
                "<CreateNetworkInterfaceResponse {NS}><requestId>r1</requestId><networkInterface>{}</networkInterface></CreateNetworkInterfaceResponse>",
                eni_xml(&["10.0.1.16/28"])
            )),
            ok(format!(
                "<AssignPrivateIpAddressesResponse {NS}><requestId>r2</requestId><networkInterfaceId>eni-0a1b2c3d4e5f60001</networkInterfaceId>\
                 <assignedIpv4PrefixSet><item><ipv4Prefix>10.0.1.32/28</ipv4Prefix></item><item><ipv4Prefix>10.0.1.48/28</ipv4Prefix></item></assignedIpv4PrefixSet>\
                 </AssignPrivateIpAddressesResponse>"
            )),
        ],
        1,
    );
    let eni = cloud
        .create_eni(&CreateEni {
            subnet_id: "subnet-0a1b2c3d".into(),
            security_groups: vec!["sg-0a1b2c3d".into()],
            description: "underway".into(),
            tags: eni_tags("c1", "i-0a1b2c3d", 1),
            initial: AddressCount::prefixes(1),
        })
        .await
        .unwrap();
    assert_eq!(eni.prefixes, vec!["10.0.1.16/28".parse().unwrap()]);
    assert!(eni.secondary_ips.is_empty());

    let added = cloud.assign(&eni, AddressCount::prefixes(2)).await.unwrap();
    assert_eq!(added.prefixes, vec!["10.0.1.32/28".parse().unwrap(), "10.0.1.48/28".parse().unwrap()]);
    assert!(added.ips.is_empty());

    let sent = bodies(&replay);
    assert!(sent[0].contains("Action=CreateNetworkInterface") && sent[0].contains("Ipv4PrefixCount=1"), "{}", sent[0]);
    assert!(!sent[0].contains("SecondaryPrivateIpAddressCount"), "{}", sent[0]);
    assert!(sent[0].contains("TagSpecification.1.ResourceType=network-interface"), "tagged at creation: {}", sent[0]);
    assert!(
        sent[1].contains("Action=AssignPrivateIpAddresses") && sent[1].contains("Ipv4PrefixCount=2"),
        "{}",
        sent[1]
    );
}

/// Gap: LocalStack ignores prefixes, so releasing one can only be checked on the request.
#[tokio::test]
async fn unassign_prefixes_names_each_prefix() {
    let (cloud, replay) = cloud(
        vec![ok(format!(
            "<UnassignPrivateIpAddressesResponse {NS}><requestId>r</requestId><return>true</return></UnassignPrivateIpAddressesResponse>"
        ))],
        1,
    );
    cloud.unassign_prefixes("eni-0a1b2c3d4e5f60001", &["10.0.1.32/28".parse().unwrap()]).await.unwrap();
    let sent = bodies(&replay);
    assert!(sent[0].contains("Action=UnassignPrivateIpAddresses"), "{}", sent[0]);
    assert!(sent[0].contains("Ipv4Prefix.1=10.0.1.32%2F28"), "{}", sent[0]);
    assert!(!sent[0].contains("PrivateIpAddress.1"), "{}", sent[0]);
}

/// Gap: LocalStack does not keep the attachment's DeleteOnTermination flag reliably. An attach is
/// one call; delete-on-termination is a second, the caller's (ipamd makes it after each attach).
#[tokio::test]
async fn attach_then_delete_on_termination() {
    let (cloud, replay) = cloud(
        vec![
            ok(format!(
                "<AttachNetworkInterfaceResponse {NS}><requestId>r</requestId><attachmentId>eni-attach-0a1b2c3d</attachmentId><networkCardIndex>0</networkCardIndex></AttachNetworkInterfaceResponse>"
            )),
            ok(format!(
                "<ModifyNetworkInterfaceAttributeResponse {NS}><requestId>r</requestId><return>true</return></ModifyNetworkInterfaceAttributeResponse>"
            )),
        ],
        1,
    );
    let att = cloud.attach_eni("eni-0a1b2c3d4e5f60001", "i-0a1b2c3d", 2).await.unwrap();
    assert_eq!(att, "eni-attach-0a1b2c3d");
    assert_eq!(bodies(&replay).len(), 1, "the attach alone");
    cloud.set_delete_on_termination("eni-0a1b2c3d4e5f60001", &att).await.unwrap();
    let sent = bodies(&replay);
    assert!(sent[0].contains("DeviceIndex=2"), "{}", sent[0]);
    assert!(
        sent[1].contains("Attachment.AttachmentId=eni-attach-0a1b2c3d")
            && sent[1].contains("Attachment.DeleteOnTermination=true"),
        "{}",
        sent[1]
    );
}

/// Gap: LocalStack never throttles. The SDK's retry mode retries RequestLimitExceeded; when every
/// attempt is throttled the caller gets `Throttled`, and the outcome is counted.
#[tokio::test]
async fn throttling_is_retried_then_typed() {
    let assign_ok = format!(
        "<AssignPrivateIpAddressesResponse {NS}><requestId>r</requestId><networkInterfaceId>eni-0a1b2c3d4e5f60001</networkInterfaceId>\
         <assignedPrivateIpAddressesSet><item><privateIpAddress>10.0.1.11</privateIpAddress></item></assignedPrivateIpAddressesSet></AssignPrivateIpAddressesResponse>"
    );
    let (c, replay) = cloud(vec![error(503, "RequestLimitExceeded"), ok(assign_ok)], 3);
    let added = c.assign(&known_eni(&[]), AddressCount::ips(1)).await.unwrap();
    assert_eq!(added.ips, vec!["10.0.1.11".parse::<std::net::Ipv4Addr>().unwrap()]);
    assert_eq!(replay.actual_requests().count(), 2, "one retry after the throttle");

    let (c, replay) = cloud(
        vec![
            error(503, "RequestLimitExceeded"),
            error(503, "RequestLimitExceeded"),
            error(503, "RequestLimitExceeded"),
        ],
        3,
    );
    let e = c.assign(&known_eni(&[]), AddressCount::ips(1)).await.unwrap_err();
    assert!(matches!(&e, CloudError::Throttled { code, .. } if code == "RequestLimitExceeded"), "{e:?}");
    assert_eq!(replay.actual_requests().count(), 3);
    // Every attempt took its own budget token and is counted (the SDK's retries, which bypassed
    // the budget, are off).
    assert_eq!(c.stats().with_outcome(Outcome::Throttled), 3, "each attempt counted");
}

/// Gap: LocalStack enforces no ENI, per-ENI, subnet or route limits (and hangs on a full subnet).
#[tokio::test]
async fn every_limit_error_maps_to_its_kind() {
    let eni = known_eni(&[]);
    let (c, _) = cloud(vec![error(400, "AttachmentLimitExceeded")], 1);
    let e = c.attach_eni(&eni.id, "i-0a1b2c3d", 3).await.unwrap_err();
    assert!(matches!(e, CloudError::LimitReached { limit: LimitKind::EnisPerInstance, .. }), "{e:?}");

    let (c, _) = cloud(vec![error(400, "PrivateIpAddressLimitExceeded")], 1);
    let e = c.assign(&eni, AddressCount::ips(20)).await.unwrap_err();
    assert!(matches!(e, CloudError::LimitReached { limit: LimitKind::AddressesPerEni, .. }), "{e:?}");

    let (c, _) = cloud(vec![error(400, "InsufficientFreeAddressesInSubnet")], 1);
    let req = CreateEni {
        subnet_id: "subnet-0a1b2c3d".into(),
        security_groups: vec![],
        description: String::new(),
        tags: Tags::new(),
        initial: AddressCount::ips(9),
    };
    let e = c.create_eni(&req).await.unwrap_err();
    assert!(matches!(e, CloudError::LimitReached { limit: LimitKind::SubnetAddresses, .. }), "{e:?}");
    assert!(e.to_string().contains("free addresses in the subnet"), "{e}");

    let (c, _) = cloud(vec![error(400, "InsufficientCidrBlocks")], 1);
    let e = c.assign(&eni, AddressCount::prefixes(1)).await.unwrap_err();
    assert!(matches!(e, CloudError::LimitReached { limit: LimitKind::SubnetPrefixes, .. }), "{e:?}");

    let table = format!(
        "<DescribeRouteTablesResponse {NS}><requestId>r</requestId><routeTableSet><item><routeTableId>rtb-0a1b2c3d</routeTableId>\
         <vpcId>vpc-0a1b2c3d</vpcId><routeSet><item><destinationCidrBlock>10.0.0.0/16</destinationCidrBlock><gatewayId>local</gatewayId>\
         <state>active</state><origin>CreateRouteTable</origin></item></routeSet><associationSet/><tagSet/></item></routeTableSet></DescribeRouteTablesResponse>"
    );
    let (c, _) = cloud(vec![ok(table), error(400, "RouteLimitExceeded")], 1);
    let vpc = Vpc { id: "vpc-0a1b2c3d".into(), cidrs: vec!["10.0.0.0/16".parse().unwrap()] };
    let e = c
        .ensure_route(
            &vpc,
            "rtb-0a1b2c3d",
            "100.64.64.0/24".parse().unwrap(),
            &RouteTarget::Instance("i-0a1b2c3d".into()),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, CloudError::LimitReached { limit: LimitKind::RoutesPerTable, .. }), "{e:?}");
    assert_eq!(c.stats().with_outcome(Outcome::Limit), 1);
}

/// Gap: LocalStack always answers DescribeInstanceTypes; a real account may deny it (IAM).
#[tokio::test]
async fn instance_limits_fall_back_to_the_static_table() {
    let (c, _) = cloud(vec![error(403, "UnauthorizedOperation")], 1);
    let (limits, source) = c.instance_limits("c5.18xlarge").await.unwrap();
    assert_eq!(source, LimitsSource::StaticTable);
    assert_eq!(limits.max_pods_secondary_ips(), 737);

    let (c, _) = cloud(vec![error(403, "UnauthorizedOperation")], 1);
    let e = c.instance_limits("x9.unknown").await.unwrap_err();
    assert!(matches!(e, CloudError::Fatal { ref code, .. } if code == "UnauthorizedOperation"), "{e:?}");
}
