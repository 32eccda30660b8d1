//! Every seam operation against LocalStack (started by the harness), with the error paths
//! LocalStack does produce. Each test has its own LocalStack account.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use underway_cloud::aws::{Ec2Cloud, Ec2Config};
use underway_cloud::*;
use underway_tests::fixture::Ec2Fixture;
use underway_tests::localstack::LocalStack;

async fn world() -> (Ec2Fixture, Ec2Cloud) {
    let account = LocalStack::shared().account();
    let fx = Ec2Fixture::create(&account).await;
    let cfg = Ec2Config { max_attempts: 2, initial_backoff_ms: 50, ..Ec2Config::default() };
    let cloud = Ec2Cloud::from_sdk_config(&account.sdk_config(), &cfg);
    (fx, cloud)
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

#[tokio::test]
async fn discovery_of_instance_vpc_subnets_and_limits() {
    let (fx, cloud) = world().await;
    let id = fx.run_instance("m5.large").await;

    let inst = cloud.instance(&id).await.unwrap();
    assert_eq!(inst.instance_type, "m5.large");
    assert_eq!(inst.vpc_id, fx.vpc_id);
    assert_eq!(inst.subnet_id, fx.subnet_id);
    assert_eq!(inst.security_groups, vec![fx.security_group.clone()]);
    assert!(inst.primary_eni.starts_with("eni-"), "{inst:?}");
    assert_eq!(inst.state, "running");

    let vpc = cloud.vpc(&fx.vpc_id).await.unwrap();
    assert_eq!(vpc.cidrs, vec![net("10.0.0.0/16")]);

    fx.client.create_tags().resources(&fx.subnet_id).tags(tag("underway.io/pods", "yes")).send().await.unwrap();
    let subnets = cloud.subnets(std::slice::from_ref(&fx.subnet_id)).await.unwrap();
    assert_eq!(subnets.len(), 1);
    assert_eq!(subnets[0].cidr, net(&fx.subnet_cidr));
    assert!(subnets[0].available_addresses > 16_000, "{:?}", subnets[0]);
    let tagged = cloud
        .subnets_by_tags(&fx.vpc_id, &Tags::from([("underway.io/pods".to_string(), "yes".to_string())]))
        .await
        .unwrap();
    assert_eq!(tagged.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), vec![fx.subnet_id.as_str()]);

    let enis = cloud.enis_of_instance(&id).await.unwrap();
    assert_eq!(enis.len(), 1);
    assert_eq!(enis[0].id, inst.primary_eni);
    assert_eq!(enis[0].attachment.as_ref().unwrap().device_index, 0);
    assert_eq!(Some(enis[0].primary_ip), inst.primary_ip);

    let (limits, source) = cloud.instance_limits("m5.large").await.unwrap();
    assert_eq!(source, LimitsSource::Api);
    assert_eq!((limits.enis, limits.ipv4_per_eni), (3, 10));
    assert_eq!(limits.max_pods_secondary_ips(), 29);
    assert!(cloud.instance_limits("x9.nonexistent").await.is_err());

    let e = cloud.instance("i-0000000000000000f").await.unwrap_err();
    assert!(matches!(e, CloudError::NotFound { .. }), "{e:?}");
}

fn tag(k: &str, v: &str) -> aws_sdk_ec2::types::Tag {
    aws_sdk_ec2::types::Tag::builder().key(k).value(v).build()
}

#[tokio::test]
async fn eni_lifecycle_create_attach_detach_delete() {
    let (fx, cloud) = world().await;
    let id = fx.run_instance("m5.large").await;
    let tags = eni_tags("test-cluster", &id, 1_700_000_000);
    let eni = cloud
        .create_eni(&CreateEni {
            subnet_id: fx.subnet_id.clone(),
            security_groups: vec![fx.security_group.clone()],
            description: "underway test".into(),
            tags: tags.clone(),
            initial: AddressCount::ips(2),
        })
        .await
        .unwrap();
    assert_eq!(eni.secondary_ips.len(), 2, "first addresses come with the create call: {eni:?}");
    assert_eq!(eni.tags, tags);
    assert_eq!(eni.security_groups, vec![fx.security_group.clone()]);
    assert!(!eni.in_use());
    assert_eq!(cloud.stats().calls("CreateNetworkInterface"), 1);
    assert_eq!(cloud.stats().calls("AssignPrivateIpAddresses"), 0);

    let found = cloud.enis_by_tags(&Tags::from([(TAG_INSTANCE.to_string(), id.clone())])).await.unwrap();
    assert_eq!(found.iter().map(|e| &e.id).collect::<Vec<_>>(), vec![&eni.id]);

    let attachment = cloud.attach_eni(&eni.id, &id, 1).await.unwrap();
    let now = cloud.eni(&eni.id).await.unwrap();
    let a = now.attachment.clone().expect("attached");
    assert_eq!((a.id.as_str(), a.instance_id.as_str(), a.device_index), (attachment.as_str(), id.as_str(), 1));
    // Delete-on-termination is a call of its own; LocalStack accepts it but does not always keep
    // the flag, so the request itself is checked in replay.rs (attach_then_delete_on_termination).
    cloud.set_delete_on_termination(&eni.id, &attachment).await.unwrap();
    assert_eq!(cloud.stats().snapshot().get(&("ModifyNetworkInterfaceAttribute", Outcome::Ok)), Some(&1));
    assert_eq!(cloud.enis_of_instance(&id).await.unwrap().len(), 2);

    // An attached ENI is never deleted, whatever the cloud would allow (LocalStack would).
    let e = cloud.delete_eni(&eni.id).await.unwrap_err();
    assert!(matches!(e, CloudError::InUse { .. }), "{e:?}");
    assert!(cloud.eni(&eni.id).await.is_ok(), "still there");

    cloud.detach_eni(&attachment, false).await.unwrap();
    assert!(!cloud.eni(&eni.id).await.unwrap().in_use());
    cloud.delete_eni(&eni.id).await.unwrap();
    let e = cloud.eni(&eni.id).await.unwrap_err();
    assert!(matches!(e, CloudError::NotFound { .. }), "{e:?}");
    let e = cloud.delete_eni(&eni.id).await.unwrap_err();
    assert!(matches!(e, CloudError::NotFound { .. }), "{e:?}");
    let e = cloud.attach_eni("eni-0123456789abcdef0", &id, 2).await.unwrap_err();
    assert!(matches!(e, CloudError::NotFound { .. }), "{e:?}");
}

#[tokio::test]
async fn addresses_assign_returns_only_new_ones_and_unassign() {
    let (fx, cloud) = world().await;
    let id = fx.run_instance("m5.large").await;
    let inst = cloud.instance(&id).await.unwrap();
    let before = cloud.eni(&inst.primary_eni).await.unwrap();

    let added = cloud.assign(&before, AddressCount::ips(3)).await.unwrap();
    assert_eq!(added.ips.len(), 3, "LocalStack answers with every address; only the new are returned: {added:?}");
    assert!(added.prefixes.is_empty());
    assert!(!added.ips.contains(&before.primary_ip));

    let after = cloud.eni(&inst.primary_eni).await.unwrap();
    for ip in &added.ips {
        assert!(after.secondary_ips.contains(ip), "{ip} on the ENI");
    }
    let added2 = cloud.assign(&after, AddressCount::ips(2)).await.unwrap();
    assert_eq!(added2.ips.len(), 2);
    assert!(added2.ips.iter().all(|ip| !added.ips.contains(ip)));

    cloud.unassign_ips(&inst.primary_eni, &added.ips[..2]).await.unwrap();
    let last = cloud.eni(&inst.primary_eni).await.unwrap();
    assert_eq!(last.secondary_ips.len(), 3);
    assert!(!last.secondary_ips.contains(&added.ips[0]));

    cloud.set_source_dest_check(&inst.primary_eni, false).await.unwrap();
    assert!(!cloud.eni(&inst.primary_eni).await.unwrap().source_dest_check);
    cloud.set_source_dest_check(&inst.primary_eni, true).await.unwrap();
    assert!(cloud.eni(&inst.primary_eni).await.unwrap().source_dest_check);
}

#[tokio::test]
async fn routes_ensure_replace_delete() {
    let (fx, cloud) = world().await;
    let a = fx.run_instance("m5.large").await;
    let b = fx.run_instance("m5.large").await;
    let vpc = cloud.vpc(&fx.vpc_id).await.unwrap();

    let main = cloud.route_table_for_subnet(&fx.vpc_id, &fx.subnet_id).await.unwrap();
    assert!(main.main, "no association: the main table {main:?}");
    let table = fx.route_table().await;
    fx.client.associate_route_table().route_table_id(&table).subnet_id(&fx.subnet_id).send().await.unwrap();
    let assoc = cloud.route_table_for_subnet(&fx.vpc_id, &fx.subnet_id).await.unwrap();
    assert_eq!(assoc.id, table);
    assert_eq!(assoc.subnets, vec![fx.subnet_id.clone()]);

    // Pod CIDRs lie outside every VPC block (AWS refuses a route inside the VPC's local route
    // unless it is a whole subnet to an interface: the front enforces it).
    let pods = net("100.64.1.0/24");
    let to_a = RouteTarget::Instance(a.clone());
    assert_eq!(cloud.ensure_route(&vpc, &table, pods, &to_a).await.unwrap(), RouteChange::Created);
    assert_eq!(cloud.ensure_route(&vpc, &table, pods, &to_a).await.unwrap(), RouteChange::Unchanged);
    let r = cloud.route_table(&table).await.unwrap();
    let route = r.routes.iter().find(|r| r.destination == pods).expect("route");
    assert!(route.points_to(&to_a), "{route:?}");

    // Pointing elsewhere: reported with the current target, left alone.
    let to_b = RouteTarget::Instance(b.clone());
    let e = cloud.ensure_route(&vpc, &table, pods, &to_b).await.unwrap_err();
    assert!(matches!(&e, CloudError::InUse { message, .. } if message.contains(&a)), "{e:?}");
    assert!(
        cloud.route_table(&table).await.unwrap().routes.iter().any(|r| r.destination == pods && r.points_to(&to_a))
    );

    cloud.replace_route(&vpc, &table, pods, &to_b).await.unwrap();
    let r = cloud.route_table(&table).await.unwrap();
    assert!(r.routes.iter().any(|r| r.destination == pods && r.points_to(&to_b)), "{r:?}");

    let primary_b = cloud.instance(&b).await.unwrap().primary_eni;
    let eni_target = RouteTarget::Eni(primary_b.clone());
    let other = net("100.64.2.0/24");
    assert_eq!(cloud.ensure_route(&vpc, &table, other, &eni_target).await.unwrap(), RouteChange::Created);
    assert_eq!(cloud.ensure_route(&vpc, &table, other, &eni_target).await.unwrap(), RouteChange::Unchanged);

    cloud.delete_route(&table, pods).await.unwrap();
    assert!(!cloud.route_table(&table).await.unwrap().routes.iter().any(|r| r.destination == pods));
    let e = cloud.delete_route(&table, pods).await.unwrap_err();
    assert!(matches!(e, CloudError::NotFound { .. }), "unknown route: {e:?}");
    let e = cloud.route_table("rtb-0123456789abcdef0").await.unwrap_err();
    assert!(matches!(e, CloudError::NotFound { .. }), "{e:?}");
}

#[tokio::test]
async fn impossible_requests_are_refused_before_any_call() {
    let (fx, cloud) = world().await;
    let id = fx.run_instance("m5.large").await;
    let inst = cloud.instance(&id).await.unwrap();
    let eni = cloud.eni(&inst.primary_eni).await.unwrap();
    let vpc = cloud.vpc(&fx.vpc_id).await.unwrap();
    let calls_before: u64 = cloud.stats().snapshot().values().sum();

    let cases: Vec<(&str, CloudError)> = vec![
        ("count", cloud.assign(&eni, AddressCount::ips(0)).await.unwrap_err()),
        ("count", cloud.assign(&eni, AddressCount { ips: 2, prefixes: 1 }).await.unwrap_err()),
        (
            "initial",
            cloud
                .create_eni(&CreateEni {
                    subnet_id: fx.subnet_id.clone(),
                    security_groups: vec![],
                    description: String::new(),
                    tags: Tags::new(),
                    initial: AddressCount { ips: 1, prefixes: 1 },
                })
                .await
                .unwrap_err(),
        ),
        (
            "subnet_id",
            cloud
                .create_eni(&CreateEni {
                    subnet_id: fx.vpc_id.clone(),
                    security_groups: vec![],
                    description: String::new(),
                    tags: Tags::new(),
                    initial: AddressCount::default(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "destination",
            cloud
                .ensure_route(&vpc, "rtb-0abc", net("10.0.200.0/24"), &RouteTarget::Instance(id.clone()))
                .await
                .unwrap_err(),
        ),
        (
            "target",
            cloud
                .ensure_route(&vpc, "rtb-0abc", net("100.64.0.0/24"), &RouteTarget::Instance(eni.id.clone()))
                .await
                .unwrap_err(),
        ),
        ("device_index", cloud.attach_eni(&eni.id, &id, 0).await.unwrap_err()),
        ("ips", cloud.unassign_ips(&eni.id, &[]).await.unwrap_err()),
        ("eni_id", cloud.unassign_ips("subnet-1", &[Ipv4Addr::new(10, 0, 0, 9)]).await.unwrap_err()),
        ("instance_id", cloud.enis_of_instance("eni-123").await.unwrap_err()),
    ];
    for (arg, e) in cases {
        match &e {
            CloudError::InvalidRequest { arg: got, .. } => assert_eq!(*got, arg, "{e}"),
            other => panic!("{arg}: expected InvalidRequest, got {other:?}"),
        }
        assert!(e.to_string().contains(arg), "message names the argument: {e}");
    }
    let snapshot = cloud.stats().snapshot();
    let made: u64 = snapshot.iter().filter(|((_, o), _)| *o != Outcome::Invalid).map(|(_, n)| n).sum();
    assert_eq!(made, calls_before, "no API call was made for a refused request: {snapshot:?}");
}

/// The static fallback table against the live source it stands in for: for every 20th type it
/// holds, LocalStack's DescribeInstanceTypes (moto's dump of the real one) gives the same IPv4 per
/// ENI and vCPUs, and its card 0 the same ENIs, as `instance_limits` reads them from the API.
#[tokio::test]
async fn the_static_table_agrees_with_describe_instance_types() {
    let (_fx, cloud) = world().await;
    let mut differ = Vec::new();
    let mut checked = 0;
    for ty in underway_cloud::limits::static_types().step_by(20) {
        let Some(table) = underway_cloud::limits::static_limits(ty) else { continue };
        // LocalStack does not know every type the table holds (those answer from the table).
        if let Ok((api, LimitsSource::Api)) = cloud.instance_limits(ty).await {
            checked += 1;
            let same = api.ipv4_per_eni == table.ipv4_per_eni
                && api.enis == table.enis
                && (table.vcpus == 0 || api.vcpus == table.vcpus);
            if !same {
                differ.push(format!("{ty}: api {api:?}, table {table:?}"));
            }
        }
    }
    assert!(checked >= 50, "only {checked} types compared");
    assert!(differ.len() * 20 <= checked, "more than 5 % differ ({} of {checked}): {differ:#?}", differ.len());
}
