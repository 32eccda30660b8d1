//! The shipped configs (the overlays' ipamd.toml, deploy/config's pools example) are ones ipamd
//! accepts, with the meaning they claim.

use underway_ipamd::config::{Config, Mode};

fn load(name: &str, env: &[(&str, &str)]) -> Config {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(name);
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Config::load(Some(&path), &env).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn the_shipped_configs_load() {
    let eni = load("overlays/eni/ipamd.toml", &[]);
    assert_eq!((eni.mode, eni.targets.warm_ip_target, eni.targets.minimum_ip_target), (Mode::Eni, Some(5), Some(10)));
    assert!(eni.cni.conf_dir.is_some(), "the DaemonSet installs the conflist through ipamd");
    // The VPC-route overlay's, with the DaemonSet's Kubernetes side on (the pod CIDR comes from
    // the Node): a VPC-route pool with its cluster range.
    let k8s = [("UNDERWAY_KUBERNETES__ENABLED", "true"), ("UNDERWAY_KUBERNETES__NODE_NAME", "ip-10-0-1-5")];
    let vr = load("overlays/vpc-route/ipamd.toml", &k8s);
    assert_eq!((vr.mode, vr.vpc_route.cluster_cidr), (Mode::VpcRoute, Some("100.64.0.0/16".parse().unwrap())));
    assert!(vr.cni.conf_dir.is_some());
    let pools = load("config/ipamd-pools.toml", &[]);
    assert_eq!(pools.mode, Mode::Eni);
    let routed = load("config/ipamd-pools.toml", &[("UNDERWAY_POOL", "routed")]);
    assert_eq!(routed.mode, Mode::VpcRoute);
    assert_eq!(routed.vpc_route.pod_cidr, Some("100.64.1.0/24".parse().unwrap()));
}

/// deploy/k8s/crd.yaml is what `underway-ipamd crd` prints from the Rust types today.
#[test]
fn the_committed_crd_is_generated_from_the_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/crd.yaml");
    let committed = std::fs::read_to_string(&path).unwrap();
    assert!(
        committed == underway_ipamd::k8s::crd_yaml(),
        "deploy/k8s/crd.yaml is stale: regenerate it with `underway-ipamd crd > deploy/k8s/crd.yaml`"
    );
}

/// The example UnderwayPools parse (unknown fields are refused) and give a node the settings
/// they claim.
#[test]
fn the_example_pools_apply_to_a_node() {
    use underway_ipamd::config::UnderwayPool;
    use underway_ipamd::k8s::node::{NodeView, Resolved, effective};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/examples/pools.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let pools: Vec<UnderwayPool> = serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pools.len(), 2);
    let base = load(
        "overlays/eni/ipamd.toml",
        &[("UNDERWAY_KUBERNETES__ENABLED", "true"), ("UNDERWAY_KUBERNETES__NODE_NAME", "ip-10-0-1-5.ec2.internal")],
    );
    let node = |pool: &str, cidr: Option<&str>| NodeView {
        pool: Some(pool.into()),
        pod_cidr: cidr.map(|c| c.parse().unwrap()),
        max_pods: None,
    };
    let Resolved::Ready(general) = effective(&base, "n", &node("general", None), Some(&pools[0])).unwrap() else {
        panic!("an ENI pool waits for nothing")
    };
    assert_eq!((general.mode, general.targets.warm_ip_target), (Mode::Eni, Some(5)));
    assert_eq!(general.eni.subnet_tags.get("underway.io/pods").map(String::as_str), Some("true"));
    let Resolved::Ready(routed) =
        effective(&base, "n", &node("routed", Some("10.244.7.0/24")), Some(&pools[1])).unwrap()
    else {
        panic!("the pod CIDR is there")
    };
    assert_eq!(routed.mode, Mode::VpcRoute);
    assert_eq!(routed.vpc_route.pod_cidr, Some("10.244.7.0/24".parse().unwrap()));
}
