//! The config examples in deploy/config are ones ipamd accepts, with the meaning they claim.

use underway_ipamd::config::{Config, Mode};

fn load(name: &str, env: &[(&str, &str)]) -> Config {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config").join(name);
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Config::load(Some(&path), &env).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn the_shipped_configs_load() {
    let eni = load("ipamd-eni.toml", &[]);
    assert_eq!((eni.mode, eni.targets.warm_ip_target, eni.targets.minimum_ip_target), (Mode::Eni, Some(5), Some(10)));
    assert!(eni.cni.conf_dir.is_some(), "the DaemonSet installs the conflist through ipamd");
    let pools = load("ipamd-pools.toml", &[]);
    assert_eq!(pools.mode, Mode::Eni);
    let routed = load("ipamd-pools.toml", &[("UNDERWAY_POOL", "routed")]);
    assert_eq!(routed.mode, Mode::VpcRoute);
    assert_eq!(routed.vpc_route.pod_cidr, Some("10.0.128.0/24".parse().unwrap()));
}
