//! Addresses the way EC2 picks them: never one another interface of the subnet holds. LocalStack
//! picks at random without looking (two ENIs, even on two nodes, can get the same address: the
//! router then delivers one pod's traffic to another node). For a request that asks for a count,
//! the front picks free addresses itself and asks LocalStack for exactly those.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::Filter;
use ipnet::Ipv4Net;

use super::wire::Params;

/// `n` addresses of `subnet` that are not in `used`, skipping what AWS reserves (the network
/// address, the next three, and the last). `None` when the subnet has too few.
pub fn pick(subnet: Ipv4Net, used: &BTreeSet<Ipv4Addr>, n: usize, rng: &mut fastrand::Rng) -> Option<Vec<Ipv4Addr>> {
    let first = u32::from(subnet.network()) + 4;
    let last = u32::from(subnet.broadcast()).checked_sub(1)?;
    if first > last {
        return None;
    }
    let free: Vec<Ipv4Addr> = (first..=last).map(Ipv4Addr::from).filter(|a| !used.contains(a)).collect();
    if free.len() < n {
        return None;
    }
    let mut out = BTreeSet::new();
    while out.len() < n {
        out.insert(free[rng.usize(..free.len())]);
    }
    Some(out.into_iter().collect())
}

/// Every address an interface of `subnet_id` holds.
async fn used_in(c: &Client, subnet_id: &str) -> Option<BTreeSet<Ipv4Addr>> {
    let out = c
        .describe_network_interfaces()
        .filters(Filter::builder().name("subnet-id").values(subnet_id).build())
        .send()
        .await
        .ok()?;
    Some(
        out.network_interfaces()
            .iter()
            .flat_map(|n| {
                n.private_ip_addresses()
                    .iter()
                    .filter_map(|a| a.private_ip_address())
                    .chain(n.private_ip_address())
                    .filter_map(|a| a.parse().ok())
            })
            .collect(),
    )
}

async fn cidr_of(c: &Client, subnet_id: &str) -> Option<Ipv4Net> {
    let out = c.describe_subnets().subnet_ids(subnet_id).send().await.ok()?;
    out.subnets().first()?.cidr_block()?.parse().ok()
}

/// Rewrites a count into explicit, free addresses (AssignPrivateIpAddresses,
/// CreateNetworkInterface). `None`: leave the request as it is (no count, or a view that cannot
/// be had — LocalStack then answers as it would).
pub async fn explicit(c: &Client, p: &Params) -> Option<Params> {
    let count = p.number("SecondaryPrivateIpAddressCount").filter(|n| *n > 0)? as usize;
    let mut out = p.clone();
    out.0.remove("SecondaryPrivateIpAddressCount");
    let mut rng = fastrand::Rng::new();
    match p.action() {
        "AssignPrivateIpAddresses" => {
            let eni = c
                .describe_network_interfaces()
                .network_interface_ids(p.get("NetworkInterfaceId")?)
                .send()
                .await
                .ok()?
                .network_interfaces()
                .first()?
                .clone();
            let subnet = eni.subnet_id()?;
            let picked = pick(cidr_of(c, subnet).await?, &used_in(c, subnet).await?, count, &mut rng)?;
            for (i, a) in picked.iter().enumerate() {
                out.0.insert(format!("PrivateIpAddress.{}", i + 1), a.to_string());
            }
        }
        "CreateNetworkInterface" => {
            if p.get("PrivateIpAddress").is_some() || p.0.keys().any(|k| k.starts_with("PrivateIpAddresses.")) {
                return None;
            }
            let subnet = p.get("SubnetId")?;
            // The primary too: LocalStack would pick it at random as well.
            let picked = pick(cidr_of(c, subnet).await?, &used_in(c, subnet).await?, count + 1, &mut rng)?;
            for (i, a) in picked.iter().enumerate() {
                out.0.insert(format!("PrivateIpAddresses.{}.PrivateIpAddress", i + 1), a.to_string());
                out.0.insert(format!("PrivateIpAddresses.{}.Primary", i + 1), (i == 0).to_string());
            }
        }
        _ => return None,
    }
    Some(out)
}

/// What an address-changing request that EC2 carried out did, for the front's log: `eni-… +a,b`
/// (assigned, the primary first for a new ENI) or `eni-… -a,b` (unassigned). `None` for others.
pub fn trail(sent: &Params, reply: &str) -> Option<String> {
    let values = |prefix: &str, suffix: &str| -> Vec<String> {
        sent.0.iter().filter(|(k, _)| k.starts_with(prefix) && k.ends_with(suffix)).map(|(_, v)| v.clone()).collect()
    };
    let (sign, mut addrs) = match sent.action() {
        "AssignPrivateIpAddresses" => ('+', values("PrivateIpAddress.", "")),
        "UnassignPrivateIpAddresses" => ('-', values("PrivateIpAddress.", "")),
        "CreateNetworkInterface" => ('+', values("PrivateIpAddresses.", ".PrivateIpAddress")),
        _ => return None,
    };
    addrs.extend(values("Ipv4Prefix.", ""));
    if addrs.is_empty() {
        // A count LocalStack filled itself: the reply lists what it gave.
        addrs = super::wire::all_texts(reply, "privateIpAddress");
    }
    let eni = sent
        .get("NetworkInterfaceId")
        .map(str::to_string)
        .or_else(|| super::wire::first_text(reply, "networkInterfaceId").map(str::to_string))
        .unwrap_or_default();
    Some(format!("{eni} {sign}{}", addrs.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_are_free_distinct_and_outside_what_aws_reserves() {
        let subnet: Ipv4Net = "10.0.0.0/28".parse().unwrap();
        let used: BTreeSet<Ipv4Addr> = ["10.0.0.4", "10.0.0.5"].iter().map(|a| a.parse().unwrap()).collect();
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..100 {
            let p = pick(subnet, &used, 9, &mut rng).unwrap();
            assert_eq!(p.len(), 9);
            assert_eq!(p.iter().collect::<BTreeSet<_>>().len(), 9);
            for a in &p {
                let last = u8::try_from(u32::from(*a) & 0xff).unwrap();
                assert!((6..=14).contains(&last), "{a}");
            }
        }
        assert_eq!(pick(subnet, &used, 10, &mut rng), None, "11 usable, 2 used: 9 free");
    }

    #[test]
    fn the_trail_names_the_eni_and_each_address() {
        let p = |pairs: &[(&str, &str)]| Params(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        let assign = p(&[
            ("Action", "AssignPrivateIpAddresses"),
            ("NetworkInterfaceId", "eni-1"),
            ("PrivateIpAddress.1", "10.0.0.7"),
            ("PrivateIpAddress.2", "10.0.0.9"),
        ]);
        assert_eq!(trail(&assign, "").as_deref(), Some("eni-1 +10.0.0.7,10.0.0.9"));
        let unassign = p(&[
            ("Action", "UnassignPrivateIpAddresses"),
            ("NetworkInterfaceId", "eni-1"),
            ("PrivateIpAddress.1", "10.0.0.7"),
        ]);
        assert_eq!(trail(&unassign, "").as_deref(), Some("eni-1 -10.0.0.7"));
        let create = p(&[
            ("Action", "CreateNetworkInterface"),
            ("PrivateIpAddresses.1.PrivateIpAddress", "10.0.0.5"),
            ("PrivateIpAddresses.1.Primary", "true"),
        ]);
        let reply = "<x><networkInterfaceId>eni-2</networkInterfaceId></x>";
        assert_eq!(trail(&create, reply).as_deref(), Some("eni-2 +10.0.0.5"));
        let counted = p(&[("Action", "AssignPrivateIpAddresses"), ("NetworkInterfaceId", "eni-1")]);
        let reply = "<a><privateIpAddress>10.0.0.8</privateIpAddress><privateIpAddress>10.0.0.6</privateIpAddress></a>";
        assert_eq!(trail(&counted, reply).as_deref(), Some("eni-1 +10.0.0.8,10.0.0.6"));
        assert_eq!(trail(&p(&[("Action", "DescribeSubnets")]), ""), None);
    }
}
