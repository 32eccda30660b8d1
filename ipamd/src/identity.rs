//! Who this node is: the instance, its VPC, subnet, security groups and primary ENI, and how to
//! find an ENI's MAC (to find its link when EC2 attaches it).
//!
//! IMDS is the node's own authority on MACs; the EC2 API's MAC is used only with a static
//! identity (and LocalStack's are malformed, which `Eni::mac` rejects).

use underway_cloud::imds::ImdsIdentity;
use underway_cloud::{Discovery, Instance, parse_mac};

use crate::config::{IdentityConfig, IdentitySource};
use crate::error::{IpamdError, Result};

/// Where MACs come from.
pub enum Macs {
    Imds(ImdsIdentity),
    Api,
}

/// Reads the instance id (and region, with IMDS) before the cloud client exists.
pub async fn instance_id(cfg: &IdentityConfig) -> Result<(String, Option<String>, Macs)> {
    match cfg.source {
        IdentitySource::Static => Ok((cfg.instance_id.clone().unwrap_or_default(), None, Macs::Api)),
        IdentitySource::Imds => {
            let imds = match &cfg.imds_endpoint {
                Some(e) => ImdsIdentity::with_endpoint(e)?,
                None => ImdsIdentity::new(),
            };
            let id = imds.identity().await?;
            Ok((id.instance_id, Some(id.region), Macs::Imds(imds)))
        }
    }
}

/// The rest: from IMDS when the node has it (the instance answering is running; its type,
/// zone, VPC, subnet, security groups and primary ENI are all there), else (a static identity)
/// the instance as `DescribeInstances` reports it, which must be running. Each describe before
/// a new node's first mutating call waits for the node's share of the account's describes in a
/// wave of thousands of nodes, and the calls of nodes that describe longer than their phase
/// bunch (docs/benchmarks.md): this one, and the limits' (see [`limits`]), cost none.
pub async fn node_info<C: Discovery>(cloud: &C, instance_id: &str, macs: &Macs) -> Result<Instance> {
    if let Macs::Imds(imds) = macs {
        let id = imds.identity().await?;
        let p = id
            .primary()
            .ok_or_else(|| IpamdError::Identity(format!("IMDS names no primary interface (mac {})", id.primary_mac)))?;
        return Ok(Instance {
            id: id.instance_id.clone(),
            instance_type: id.instance_type.clone(),
            availability_zone: id.availability_zone.clone(),
            vpc_id: p.vpc_id.clone(),
            subnet_id: p.subnet_id.clone(),
            security_groups: p.security_groups.clone(),
            primary_eni: p.interface_id.clone(),
            primary_ip: p.local_ipv4s.first().copied(),
            state: "running".into(),
        });
    }
    let i = cloud.instance(instance_id).await?;
    if i.state != "running" && i.state != "pending" {
        return Err(IpamdError::Identity(format!("instance {instance_id} is {}", i.state)));
    }
    Ok(i)
}

/// The instance type's limits: the generated table (every type EC2 listed when it was made,
/// network card 0's ENIs where a type has several cards), else `DescribeInstanceTypes` (a type
/// newer than the table). As the AWS VPC CNI does; the API first cost every node a describe
/// before its first mutating call.
pub async fn limits<C: Discovery>(
    cloud: &C,
    instance_type: &str,
) -> Result<(underway_cloud::InstanceLimits, underway_cloud::LimitsSource)> {
    match underway_cloud::limits::static_limits(instance_type) {
        Some(l) => Ok((l, underway_cloud::LimitsSource::StaticTable)),
        None => Ok(cloud.instance_limits(instance_type).await?),
    }
}

impl Macs {
    /// The MAC of an attached ENI (`eni` as EC2 reported it), once the node knows it (`None`
    /// until then).
    pub async fn mac_of(&self, eni: &underway_cloud::Eni) -> Result<Option<[u8; 6]>> {
        match self {
            Macs::Imds(imds) => {
                let id = imds.identity().await?;
                Ok(id.interfaces.iter().find(|i| i.interface_id == eni.id).and_then(|i| parse_mac(&i.mac)))
            }
            Macs::Api => match eni.mac() {
                Some(m) => Ok(Some(m)),
                None => Err(IpamdError::Identity(format!(
                    "EC2 reports a malformed MAC {:?} for {}; use identity source \"imds\"",
                    eni.mac_raw, eni.id
                ))),
            },
        }
    }
}
