//! The strict EC2 front: every rule refuses what AWS refuses (and lets through what AWS allows),
//! the account's buckets throttle, ENIs can be invisible for a while, and the faults do what they
//! say — each against LocalStack, with the raw SDK (no underway code).

use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::Filter;
use underway_tests::fixture::Ec2Fixture;
use underway_tests::front::{Bucket, Fault, Outcome, Rule};
use underway_tests::localstack::{Account, LocalStack};

/// A client of the account through its front, with the SDK's retries as given.
fn client(account: &Account, attempts: u32) -> Client {
    let retry =
        if attempts <= 1 { RetryConfig::disabled() } else { RetryConfig::standard().with_max_attempts(attempts) };
    Client::from_conf(aws_sdk_ec2::config::Builder::from(&account.sdk_config()).retry_config(retry).build())
}

/// The EC2 error code of a failed call, and its HTTP status.
fn code<T: std::fmt::Debug, E: ProvideErrorMetadata + std::fmt::Debug>(
    r: Result<T, SdkError<E, aws_sdk_ec2::config::http::HttpResponse>>,
) -> (String, u16) {
    let e = r.expect_err("the front refuses this");
    let status = e.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
    (e.code().unwrap_or("(no code)").to_string(), status)
}

async fn setup() -> (Account, Ec2Fixture, Client) {
    let account = LocalStack::shared().account();
    let fx = Ec2Fixture::create(&account).await;
    let c = client(&account, 1);
    (account, fx, c)
}

async fn primary_eni(c: &Client, instance: &str) -> String {
    let out = c
        .describe_network_interfaces()
        .filters(Filter::builder().name("attachment.instance-id").values(instance).build())
        .send()
        .await
        .unwrap();
    out.network_interfaces()
        .iter()
        .find(|n| n.attachment().and_then(|a| a.device_index()) == Some(0))
        .and_then(|n| n.network_interface_id())
        .unwrap()
        .to_string()
}

async fn new_eni(c: &Client, fx: &Ec2Fixture, secondaries: i32) -> String {
    let out = c
        .create_network_interface()
        .subnet_id(&fx.subnet_id)
        .groups(&fx.security_group)
        .secondary_private_ip_address_count(secondaries)
        .send()
        .await
        .unwrap();
    out.network_interface().and_then(|n| n.network_interface_id()).unwrap().to_string()
}

#[tokio::test]
async fn routes_more_specific_than_the_vpc_are_refused_unless_a_whole_subnet_to_an_interface() {
    let (account, fx, c) = setup().await;
    account.front.provoke(Rule::RouteInsideVpc);
    let i = fx.run_instance("m5.large").await;
    let eni = primary_eni(&c, &i).await;
    let rtb = fx.route_table().await;
    let create = |dest: &str| c.create_route().route_table_id(&rtb).destination_cidr_block(dest);

    // A node's /24 inside the VPC (what VPC-route mode used to ask for): refused to an instance
    // and to an interface alike.
    assert_eq!(code(create("10.0.128.0/24").instance_id(&i).send().await).0, "InvalidParameterValue");
    assert_eq!(code(create("10.0.128.0/24").network_interface_id(&eni).send().await).0, "InvalidParameterValue");
    // A whole subnet's CIDR may go to an interface, not to an instance.
    assert_eq!(code(create(&fx.subnet_cidr).instance_id(&i).send().await).0, "InvalidParameterValue");
    create(&fx.subnet_cidr).network_interface_id(&eni).send().await.expect("a subnet CIDR to an ENI is valid");
    // Outside the VPC: to the instance (one interface) or its ENI.
    create("100.64.1.0/24").instance_id(&i).send().await.expect("outside the VPC, one interface");
    create("100.64.2.0/24").network_interface_id(&eni).send().await.expect("outside the VPC, an ENI");
    // Less specific than the local route is no overlap AWS refuses.
    create("0.0.0.0/0").network_interface_id(&eni).send().await.expect("a default route");
    let refused: Vec<_> =
        account.front.records().into_iter().filter(|r| matches!(r.outcome, Outcome::Refused { .. })).collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert!(account.front.unprovoked().is_empty());
}

#[tokio::test]
async fn an_instance_target_needs_an_instance_with_one_interface() {
    let (account, fx, c) = setup().await;
    account.front.provoke(Rule::RouteInstanceTarget);
    let i = fx.run_instance("m5.large").await;
    let rtb = fx.route_table().await;
    let second = new_eni(&c, &fx, 0).await;
    c.attach_network_interface().network_interface_id(&second).instance_id(&i).device_index(1).send().await.unwrap();
    let r = c.create_route().route_table_id(&rtb).destination_cidr_block("100.64.0.0/24").instance_id(&i).send().await;
    assert_eq!(code(r), ("InvalidInstanceID".to_string(), 400));
    let primary = primary_eni(&c, &i).await;
    c.create_route()
        .route_table_id(&rtb)
        .destination_cidr_block("100.64.0.0/24")
        .network_interface_id(&primary)
        .send()
        .await
        .expect("the primary ENI as target is what AWS asks for");
}

#[tokio::test]
async fn a_table_holds_its_capacity_and_one_route_per_destination() {
    let (account, fx, c) = setup().await;
    account.front.configure(|cfg| cfg.route_table_capacity = 3);
    let i = fx.run_instance("m5.large").await;
    let eni = primary_eni(&c, &i).await;
    let rtb = fx.route_table().await;
    let create = |n: u8| {
        c.create_route()
            .route_table_id(&rtb)
            .destination_cidr_block(format!("100.64.{n}.0/24"))
            .network_interface_id(&eni)
    };
    for n in 0..3 {
        create(n).send().await.unwrap();
    }
    account.front.provoke(Rule::RouteExists);
    account.front.provoke(Rule::RouteLimit);
    assert_eq!(code(create(2).send().await).0, "RouteAlreadyExists");
    assert_eq!(code(create(3).send().await), ("RouteLimitExceeded".to_string(), 400));
    // A replace is neither a duplicate nor a new route.
    c.replace_route()
        .route_table_id(&rtb)
        .destination_cidr_block("100.64.0.0/24")
        .network_interface_id(&eni)
        .send()
        .await
        .expect("ReplaceRoute in a full table");
    c.delete_route().route_table_id(&rtb).destination_cidr_block("100.64.0.0/24").send().await.unwrap();
    create(3).send().await.expect("room again after a delete");
    assert!(account.front.unprovoked().is_empty());
    let refused =
        account.front.records().into_iter().filter(|r| matches!(r.outcome, Outcome::Refused { provoked: true, .. }));
    assert_eq!(refused.count(), 2, "both refusals recorded as provoked");
}

/// The run's report fails on an unprovoked refusal, and only on one. (A live unprovoked refusal
/// would fail the whole `tests/run`, so this one is written into a log of its own.)
#[test]
fn the_run_report_fails_on_an_unprovoked_refusal_only() {
    let bin = underway_tests::ipamd::bin_path("underway-front-report").unwrap();
    let dir = std::env::temp_dir().join(format!("underway-front-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let line = |outcome: &str, rule: Option<&str>, provoked: bool| {
        serde_json::json!({"t_ms": 1000, "account": "111111111111", "node": "node0", "action": "CreateRoute",
                           "mutating": true, "outcome": outcome, "rule": rule, "provoked": provoked, "test": "t"})
        .to_string()
    };
    let run = |lines: &[String]| {
        let p = dir.join("log");
        std::fs::write(&p, lines.join("\n")).unwrap();
        let out = std::process::Command::new(&bin).arg(&p).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string())
    };
    let ok = line("forwarded", None, false);
    let provoked = line("refused:route-limit", Some("route-limit"), true);
    let unprovoked = line("refused:route-limit:UNPROVOKED", Some("route-limit"), false);
    let (pass, text) = run(&[ok.clone(), provoked.clone()]);
    assert!(pass, "{text}");
    assert!(text.contains("unprovoked refusals: 0") && text.contains("2 requests"), "{text}");
    let (pass, text) = run(&[ok, provoked, unprovoked]);
    assert!(!pass, "{text}");
    assert!(text.contains("UNPROVOKED 111111111111 CreateRoute from node0 (t): refused by route-limit"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn enis_and_addresses_are_held_to_the_instance_types_limits() {
    let (account, fx, c) = setup().await;
    for r in [Rule::EniLimit, Rule::DeviceIndexInUse, Rule::AddressLimit] {
        account.front.provoke(r);
    }
    // t3.medium: 3 network interfaces, 6 IPv4 addresses each (the cloud crate's table).
    let i = fx.run_instance("t3.medium").await;
    let primary = primary_eni(&c, &i).await;
    let attach =
        |eni: &str, dev: i32| c.attach_network_interface().network_interface_id(eni).instance_id(&i).device_index(dev);
    let e1 = new_eni(&c, &fx, 0).await;
    let e2 = new_eni(&c, &fx, 0).await;
    let e3 = new_eni(&c, &fx, 0).await;
    attach(&e1, 1).send().await.unwrap();
    assert_eq!(code(attach(&e2, 1).send().await).0, "InvalidParameterValue", "device index 1 is taken");
    attach(&e2, 2).send().await.unwrap();
    assert_eq!(code(attach(&e3, 3).send().await).0, "AttachmentLimitExceeded");

    let assign =
        |n: i32| c.assign_private_ip_addresses().network_interface_id(&primary).secondary_private_ip_address_count(n);
    assert_eq!(code(assign(6).send().await).0, "PrivateIpAddressLimitExceeded", "1 + 6 > 6");
    assign(5).send().await.expect("1 + 5 = 6");
    assert_eq!(code(assign(1).send().await).0, "PrivateIpAddressLimitExceeded");
    // An unattached ENI is held to the largest type's 50.
    let r = c.create_network_interface().subnet_id(&fx.subnet_id).secondary_private_ip_address_count(50).send().await;
    assert_eq!(code(r).0, "PrivateIpAddressLimitExceeded");
    // An ENI with more addresses than the type allows cannot be attached to it.
    let big = new_eni(&c, &fx, 9).await;
    let other = fx.run_instance("t3.medium").await;
    let r = c.attach_network_interface().network_interface_id(&big).instance_id(&other).device_index(1).send().await;
    assert_eq!(code(r).0, "PrivateIpAddressLimitExceeded");
    // A type missing from the table (t8i.medium, newer than the table's source: 6 IPv4 per ENI)
    // is held to the emulator's DescribeInstanceTypes figures rather than left unchecked.
    assert!(underway_cloud::limits::static_limits("t8i.medium").is_none(), "pick another type for this case");
    let t8 = fx.run_instance("t8i.medium").await;
    let p8 = primary_eni(&c, &t8).await;
    let assign8 =
        |n: i32| c.assign_private_ip_addresses().network_interface_id(&p8).secondary_private_ip_address_count(n);
    assert_eq!(code(assign8(6).send().await).0, "PrivateIpAddressLimitExceeded", "1 + 6 > 6");
    assign8(5).send().await.expect("1 + 5 = 6");
    assert!(account.front.unprovoked().is_empty());
}

#[tokio::test]
async fn a_subnet_gives_no_more_addresses_than_it_has_free() {
    let (account, fx, c) = setup().await;
    account.front.provoke(Rule::SubnetCapacity);
    let (subnet, free) = fx.subnet("10.0.200.0/28").await;
    assert_eq!(free, 11, "a /28 has 16 addresses, AWS reserves 5");
    // LocalStack hangs on a full subnet; the front answers as AWS does instead.
    let r = c.create_network_interface().subnet_id(&subnet).secondary_private_ip_address_count(11).send().await;
    assert_eq!(code(r).0, "InsufficientFreeAddressesInSubnet", "12 asked, 11 free");
    let eni =
        c.create_network_interface().subnet_id(&subnet).secondary_private_ip_address_count(4).send().await.unwrap();
    let eni = eni.network_interface().and_then(|n| n.network_interface_id()).unwrap().to_string();
    let r =
        c.assign_private_ip_addresses().network_interface_id(&eni).secondary_private_ip_address_count(7).send().await;
    assert_eq!(code(r).0, "InsufficientFreeAddressesInSubnet", "7 asked, 6 free");
    c.assign_private_ip_addresses()
        .network_interface_id(&eni)
        .secondary_private_ip_address_count(6)
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn the_accounts_buckets_throttle_with_503_and_refill() {
    let (account, _fx, c) = setup().await;
    account.front.provoke(Rule::RequestRate);
    // A refill too slow to matter within the test: exactly the bucket's 4 get through, however
    // long each call takes (no timing in the assertion; refilling is the bucket's unit test).
    account.front.configure(|cfg| cfg.non_mutating = Bucket { size: 4.0, refill: 0.001 });
    let mut throttled = 0;
    for _ in 0..8 {
        if let Err(e) = c.describe_vpcs().send().await {
            assert_eq!(e.code(), Some("RequestLimitExceeded"));
            assert_eq!(e.raw_response().map(|r| r.status().as_u16()), Some(503));
            throttled += 1;
        }
    }
    assert_eq!(throttled, 4, "a bucket of 4 lets 4 of 8 through");
    // The SDK's standard retry mode backs off on RequestLimitExceeded and gets through a small,
    // quickly refilled bucket.
    account.front.configure(|cfg| cfg.non_mutating = Bucket { size: 1.0, refill: 20.0 });
    let patient = client(&account, 8);
    for _ in 0..6 {
        patient.describe_vpcs().send().await.expect("retried past the throttle");
    }
}

#[tokio::test]
async fn an_eni_just_created_is_invisible_for_the_configured_time() {
    let (account, fx, c) = setup().await;
    account.front.configure(|cfg| cfg.invisible_after_create = Duration::from_millis(1500));
    let eni = new_eni(&c, &fx, 1).await;
    let r = c.describe_network_interfaces().network_interface_ids(&eni).send().await;
    assert_eq!(code(r).0, "InvalidNetworkInterfaceID.NotFound");
    let listed = c
        .describe_network_interfaces()
        .filters(Filter::builder().name("subnet-id").values(&fx.subnet_id).build())
        .send()
        .await
        .unwrap();
    assert!(listed.network_interfaces().iter().all(|n| n.network_interface_id() != Some(eni.as_str())));
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let r = c.describe_network_interfaces().network_interface_ids(&eni).send().await.unwrap();
    assert_eq!(r.network_interfaces().len(), 1);
}

#[tokio::test]
async fn faults_throttle_fail_and_reset_as_configured() {
    let (account, fx, c) = setup().await;
    let direct = Client::new(&account.direct_sdk_config());
    account.front.configure(|cfg| cfg.faults.throttle = 1.0);
    assert_eq!(code(c.describe_vpcs().send().await), ("RequestLimitExceeded".to_string(), 503));
    account.front.configure(|cfg| {
        cfg.faults.throttle = 0.0;
        cfg.faults.server_error = 1.0;
    });
    let (code5, status) = code(c.describe_vpcs().send().await);
    assert!(matches!((code5.as_str(), status), ("InternalError", 500) | ("Unavailable", 503)), "{code5} {status}");
    account.front.configure(|cfg| {
        cfg.faults.server_error = 0.0;
        cfg.faults.reset_before = 1.0;
    });
    let e = c.describe_vpcs().send().await.expect_err("reset");
    assert!(matches!(e, SdkError::DispatchFailure(_) | SdkError::ResponseError(_)), "{e:?}");

    // Reset after LocalStack acted: the change is made, the reply lost.
    account.front.configure(|cfg| {
        cfg.faults.reset_before = 0.0;
        cfg.faults.reset_after = 1.0;
    });
    let eni = {
        account.front.configure(|cfg| cfg.faults.reset_after = 0.0);
        let e = new_eni(&c, &fx, 0).await;
        account.front.configure(|cfg| cfg.faults.reset_after = 1.0);
        e
    };
    let r =
        c.assign_private_ip_addresses().network_interface_id(&eni).secondary_private_ip_address_count(2).send().await;
    assert!(r.is_err(), "the reply was lost");
    let seen = direct.describe_network_interfaces().network_interface_ids(&eni).send().await.unwrap();
    assert_eq!(seen.network_interfaces()[0].private_ip_addresses().len(), 3, "yet EC2 assigned the two addresses");

    // The SDK's retry of CreateNetworkInterface carries the same ClientToken: EC2 answers with the
    // first result, so one ENI exists however many replies were lost.
    let before = direct.describe_network_interfaces().send().await.unwrap().network_interfaces().len();
    let retrying = client(&account, 3);
    let made = retrying
        .create_network_interface()
        .subnet_id(&fx.subnet_id)
        .client_token("underway-front-test-1")
        .send()
        .await
        .expect("the retry gets the first answer");
    let after = direct.describe_network_interfaces().send().await.unwrap().network_interfaces().len();
    assert_eq!(after, before + 1, "one ENI for one token");
    assert!(made.network_interface().is_some());

    let s = account.front.summary();
    assert!(s.contains_key("fault:throttle") && s.contains_key("fault:server-error"), "{s:?}");
    assert!(s["fault:reset-before"] >= 1 && s["fault:reset-after"] >= 2 && s["replayed"] >= 1, "{s:?}");
    assert!(account.front.records().iter().any(|r| r.outcome == Outcome::Fault(Fault::ResetAfter)
        && r.action == "CreateNetworkInterface"
        && r.node == "test"));
}

/// EC2 never gives one address to two interfaces; LocalStack picks at random without looking
/// (a suite run once saw a duplicate; across nodes it sends one pod's traffic to another node).
/// The front asks LocalStack for free addresses by name instead of a count.
#[tokio::test]
async fn no_address_is_given_to_two_interfaces() {
    let (account, fx, c) = setup().await;
    let direct = Client::new(&account.direct_sdk_config());
    let (subnet, _) = fx.subnet("10.0.201.0/26").await;
    let mut enis = Vec::new();
    for _ in 0..5 {
        let e =
            c.create_network_interface().subnet_id(&subnet).secondary_private_ip_address_count(5).send().await.unwrap();
        enis.push(e.network_interface().and_then(|n| n.network_interface_id()).unwrap().to_string());
    }
    for e in &enis {
        c.assign_private_ip_addresses()
            .network_interface_id(e)
            .secondary_private_ip_address_count(4)
            .send()
            .await
            .unwrap();
    }
    // 5 × (1 + 5 + 4) = 50 of the /26's 59 usable addresses.
    let out = direct
        .describe_network_interfaces()
        .filters(Filter::builder().name("subnet-id").values(&subnet).build())
        .send()
        .await
        .unwrap();
    let mut seen = std::collections::BTreeMap::new();
    for ni in out.network_interfaces() {
        for a in ni.private_ip_addresses() {
            let ip = a.private_ip_address().unwrap().to_string();
            if let Some(other) = seen.insert(ip.clone(), ni.network_interface_id().unwrap().to_string()) {
                panic!("{ip} on {other} and {:?}", ni.network_interface_id());
            }
        }
    }
    assert_eq!(seen.len(), 50, "{seen:?}");
    let net: ipnet::Ipv4Net = "10.0.201.0/26".parse().unwrap();
    assert!(seen.keys().all(|a| net.contains(&a.parse::<std::net::Ipv4Addr>().unwrap())));
}
