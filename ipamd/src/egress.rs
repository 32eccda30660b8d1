//! Keeps underway's nftables table on the node (`underway_routes::egress`): installed once the
//! node is known, the VPC's CIDR blocks read again every `egress.refresh_ms` (IMDS, or EC2 with a
//! static identity) and the table replaced when they change, removed by `uninstall`.

use std::time::Duration;

use ipnet::Ipv4Net;
use underway_cloud::{Discovery, Instance};
use underway_routes::egress::{EgressSpec, SnatRandom};

use crate::config::{self, Config, Mode, SnatMode};
use crate::error::{IpamdError, Result};
use crate::identity::Macs;
use crate::state::NodeState;

/// The destinations never translated: the VPC's blocks, the cluster's VPC-route pod range
/// (`vpc_route.cluster_cidr`, in either mode: an ENI-mode node's pods talk to VPC-route pods with
/// their own addresses too; a VPC-route node without it falls back to its own pod CIDR) and the
/// exclusions. A pure function of the config and what the VPC has.
pub fn exempt(cfg: &Config, vpc_cidrs: &[Ipv4Net]) -> Vec<Ipv4Net> {
    let mut out: Vec<Ipv4Net> = vpc_cidrs.to_vec();
    match (cfg.mode, cfg.vpc_route.cluster_cidr) {
        (_, Some(c)) => out.push(c),
        (Mode::VpcRoute, None) => out.extend(cfg.vpc_route.pod_cidr),
        (Mode::Eni, None) => {}
    }
    out.extend(cfg.egress.exclusions());
    out.sort();
    out.dedup();
    out
}

/// The table for this node.
pub fn spec(cfg: &Config, primary: Option<(String, std::net::Ipv4Addr)>, vpc_cidrs: &[Ipv4Net]) -> EgressSpec {
    EgressSpec {
        veth_prefix: cfg.veth_prefix.clone(),
        snat: if cfg.egress.snat == SnatMode::Node { primary } else { None },
        exempt: exempt(cfg, vpc_cidrs),
        random: match cfg.egress.random {
            config::SnatRandom::FullyRandom => SnatRandom::FullyRandom,
            config::SnatRandom::Random => SnatRandom::Random,
            config::SnatRandom::None => SnatRandom::None,
        },
        node_port: cfg.egress.node_port,
        mark: cfg.egress.mark,
    }
}

/// The VPC's CIDR blocks as the node sees them now.
pub async fn vpc_cidrs<C: Discovery>(cloud: &C, node: &Instance, macs: &Macs) -> Result<Vec<Ipv4Net>> {
    match macs {
        Macs::Imds(imds) => {
            let id = imds.identity().await?;
            id.primary()
                .map(|p| p.vpc_cidrs.clone())
                .ok_or_else(|| IpamdError::Identity("IMDS names no primary interface".into()))
        }
        Macs::Api => Ok(cloud.vpc(&node.vpc_id).await?.cidrs),
    }
}

/// Reads what the table depends on and replaces the table only when that changed from
/// `installed` (a replacement restarts its counters, the anti-spoofing drops among them).
async fn install_once<C: Discovery>(
    cfg: &Config,
    cloud: &C,
    node: &Instance,
    macs: &Macs,
    installed: Option<&EgressSpec>,
) -> Result<(EgressSpec, Option<String>)> {
    let cidrs = vpc_cidrs(cloud, node, macs).await?;
    let primary = match node.primary_ip {
        Some(ip) => underway_routes::egress::link_with_address(None, ip).await?.map(|l| (l, ip)),
        None => None,
    };
    if cfg.egress.snat == SnatMode::Node && primary.is_none() {
        return Err(IpamdError::Identity(format!(
            "egress: no link on this node holds the primary address {:?}",
            node.primary_ip
        )));
    }
    let s = spec(cfg, primary, &cidrs);
    // The primary ENI's rp_filter is checked every pass (a node agent may reset it); a failure
    // is reported on its own and does not make the table be installed again.
    let rp = |s: &EgressSpec| match &s.snat {
        Some((link, _)) => underway_routes::egress::loose_rp_filter(None, link)
            .err()
            .map(|e| format!("loose rp_filter on {link} (replies to secondary-ENI pods' translated traffic): {e}")),
        None => None,
    };
    if installed == Some(&s) {
        let warn = rp(&s);
        return Ok((s, warn));
    }
    underway_routes::egress::apply(None, &s)?;
    if s.snat.is_some() {
        underway_routes::egress::ensure_main_rule(None, cfg.egress.mark).await?;
    } else {
        underway_routes::egress::remove_main_rule(None).await?;
    }
    let warn = rp(&s);
    Ok((s, warn))
}

/// Installs the table, then keeps it in step with the VPC's blocks for as long as the task lives.
/// Failures are recorded (pods still get addresses; their traffic outside the VPC is what fails).
pub async fn run<C: Discovery>(
    cfg: std::sync::Arc<Config>,
    cloud: std::sync::Arc<C>,
    node: Instance,
    state: std::sync::Arc<NodeState>,
) {
    let mut current: Option<EgressSpec> = None;
    let mut macs: Option<Macs> = None;
    loop {
        if macs.is_none() {
            match crate::identity::instance_id(&cfg.identity).await {
                Ok((_, _, m)) => macs = Some(m),
                Err(e) => state.record_error(format!("egress: {e}")),
            }
        }
        let r = match &macs {
            Some(m) => install_once(&cfg, &*cloud, &node, m, current.as_ref()).await,
            None => Err(IpamdError::Identity("the node's identity is not known yet".into())),
        };
        match r {
            Ok((s, warn)) => {
                if let Some(w) = warn {
                    state.record_error(format!("egress: {w}"));
                }
                if current.as_ref().is_some_and(|c| c.exempt != s.exempt) {
                    tracing::info!("egress: the VPC's blocks changed; exempt now {:?}", s.exempt);
                } else if current.is_none() {
                    tracing::info!("egress: table installed (snat {:?}, exempt {:?})", s.snat, s.exempt);
                }
                current = Some(s);
            }
            Err(e) => state.record_error(format!("egress: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(cfg.egress.refresh_ms)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: Mode) -> Config {
        let mut c = Config { cluster: "c".into(), mode, ..Config::default() };
        c.vpc_route.pod_cidr = Some("100.64.1.0/24".parse().unwrap());
        c.egress.exclude = vec!["192.168.0.0/16".into()];
        c
    }

    #[test]
    fn exempt_ranges_by_mode() {
        let vpc: Vec<Ipv4Net> = vec!["10.0.0.0/16".parse().unwrap(), "10.1.0.0/16".parse().unwrap()];
        let n = |s: &str| s.parse::<Ipv4Net>().unwrap();
        // (case, config, exempt)
        let mut routed_cluster = cfg(Mode::VpcRoute);
        routed_cluster.vpc_route.cluster_cidr = Some(n("100.64.0.0/16"));
        let cases = vec![
            (
                "ENI mode: the VPC and the exclusions",
                cfg(Mode::Eni),
                vec![n("10.0.0.0/16"), n("10.1.0.0/16"), n("192.168.0.0/16")],
            ),
            (
                "VPC-route: also the cluster's pod CIDR",
                routed_cluster,
                vec![n("10.0.0.0/16"), n("10.1.0.0/16"), n("100.64.0.0/16"), n("192.168.0.0/16")],
            ),
        ];
        for (name, c, want) in cases {
            assert_eq!(exempt(&c, &vpc), want, "{name}");
        }
    }

    #[test]
    fn external_mode_has_no_snat() {
        let mut c = cfg(Mode::Eni);
        let p = Some(("eth0".to_string(), "10.0.1.10".parse().unwrap()));
        assert!(spec(&c, p.clone(), &[]).snat.is_some());
        c.egress.snat = SnatMode::External;
        assert!(spec(&c, p, &[]).snat.is_none());
    }
}
