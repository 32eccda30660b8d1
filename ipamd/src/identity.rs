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

/// The rest from EC2: the instance as `DescribeInstances` reports it, which must be running.
pub async fn node_info<C: Discovery>(cloud: &C, instance_id: &str) -> Result<Instance> {
    let i = cloud.instance(instance_id).await?;
    if i.state != "running" && i.state != "pending" {
        return Err(IpamdError::Identity(format!("instance {instance_id} is {}", i.state)));
    }
    Ok(i)
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
