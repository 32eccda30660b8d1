//! The cluster-wide GC against LocalStack: it deletes this cluster's detached ENIs of instances
//! that are terminated or unknown, past the grace, and nothing else. (Who runs it, the Lease
//! holder, is tested with a mocked API server in `k8s::lease`; the route half in vpc_route.rs.)

use underway_cloud::aws::{Ec2Cloud, Ec2Config};
use underway_cloud::{AddressCount, CreateEni, Discovery, Interfaces, eni_tags};
use underway_ipamd::gc::{Scope, run};
use underway_tests::fixture::Ec2Fixture;
use underway_tests::localstack::LocalStack;

async fn eni(cloud: &Ec2Cloud, fx: &Ec2Fixture, cluster: &str, instance: &str, created_at: u64) -> String {
    let req = CreateEni {
        subnet_id: fx.subnet_id.clone(),
        security_groups: vec![fx.security_group.clone()],
        description: format!("{cluster} {instance}"),
        tags: eni_tags(cluster, instance, created_at),
        initial: AddressCount::default(),
    };
    cloud.create_eni(&req).await.unwrap().id
}

async fn exists(cloud: &Ec2Cloud, id: &str) -> bool {
    match cloud.eni(id).await {
        Ok(_) => true,
        Err(underway_cloud::CloudError::NotFound { .. }) => false,
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn only_detached_enis_of_gone_instances_of_this_cluster_past_the_grace() {
    let account = LocalStack::shared().account();
    let fx = Ec2Fixture::create(&account).await;
    let cloud = Ec2Cloud::from_sdk_config(&account.sdk_config(), &Ec2Config::default());
    let live = fx.run_instance("m5.large").await;
    let dead = fx.run_instance("m5.large").await;
    fx.terminate(&dead).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let old = now - 3600;
    let of_dead = eni(&cloud, &fx, "c1", &dead, old).await;
    let of_unknown = eni(&cloud, &fx, "c1", "i-0123456789abcdef0", old).await;
    let of_live = eni(&cloud, &fx, "c1", &live, old).await;
    let other_cluster = eni(&cloud, &fx, "c2", &dead, old).await;
    let too_young = eni(&cloud, &fx, "c1", &dead, now).await;
    // Attached to the live instance, though its tag names the dead one (never touch an in-use ENI).
    let attached = eni(&cloud, &fx, "c1", &dead, old).await;
    cloud.attach_eni(&attached, &live, 1).await.unwrap();

    let scope = Scope { cluster: "c1".into(), leak_grace_ms: 300_000, routes: None };
    let lines = run(&cloud, &scope).await.unwrap();
    assert_eq!((lines.enis.len(), lines.routes.len()), (2, 0), "{lines:?}");
    assert!(!exists(&cloud, &of_dead).await && !exists(&cloud, &of_unknown).await, "{lines:?}");
    for (what, id) in [
        ("a live instance's", &of_live),
        ("another cluster's", &other_cluster),
        ("a young", &too_young),
        ("an attached", &attached),
    ] {
        assert!(exists(&cloud, id).await, "{what} ENI {id} was deleted: {lines:?}");
    }
    // A second run finds nothing more.
    assert_eq!(run(&cloud, &scope).await.unwrap(), Default::default());
}
