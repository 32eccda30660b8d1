//! Typed requests and results of the seam: what ipamd knows of instances, ENIs, subnets and routes.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::error::{CloudError, Result};

/// Tags as EC2 keeps them (key → value).
pub type Tags = BTreeMap<String, String>;

/// An EC2 instance as `DescribeInstances` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub instance_type: String,
    pub availability_zone: String,
    pub vpc_id: String,
    pub subnet_id: String,
    pub security_groups: Vec<String>,
    /// The ENI at device index 0.
    pub primary_eni: String,
    pub primary_ip: Option<Ipv4Addr>,
    /// `pending`, `running`, `terminated`...
    pub state: String,
}

/// A VPC and its IPv4 CIDR blocks (primary first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vpc {
    pub id: String,
    pub cidrs: Vec<Ipv4Net>,
}

impl Vpc {
    pub fn contains(&self, net: &Ipv4Net) -> bool {
        self.cidrs.iter().any(|c| c.contains(net))
    }
}

/// A subnet with its free address count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub id: String,
    pub vpc_id: String,
    pub cidr: Ipv4Net,
    pub availability_zone: String,
    pub available_addresses: u32,
    pub tags: Tags,
}

impl Subnet {
    /// The VPC router's address in this subnet: the first host (AWS reserves it for that).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr.network()).wrapping_add(1))
    }
}

/// An ENI's attachment to an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub id: String,
    pub instance_id: String,
    pub device_index: u32,
    /// `attaching`, `attached`, `detaching`, `detached`.
    pub status: String,
    pub delete_on_termination: bool,
}

/// An elastic network interface and the addresses it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eni {
    pub id: String,
    pub subnet_id: String,
    pub vpc_id: String,
    /// The MAC as the API reports it. LocalStack's are malformed: never trust this to find a link
    /// without checking it parses (see [`Eni::mac`]).
    pub mac_raw: String,
    pub description: String,
    pub primary_ip: Ipv4Addr,
    pub secondary_ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Ipv4Net>,
    pub attachment: Option<Attachment>,
    /// `available`, `in-use`, `attaching`, `detaching`...
    pub status: String,
    pub source_dest_check: bool,
    pub security_groups: Vec<String>,
    pub tags: Tags,
}

impl Eni {
    /// The MAC, when the API gave a well-formed one.
    pub fn mac(&self) -> Option<[u8; 6]> {
        parse_mac(&self.mac_raw)
    }

    /// True when the ENI is attached or on its way (never delete such an ENI).
    pub fn in_use(&self) -> bool {
        self.attachment.as_ref().is_some_and(|a| a.status != "detached") || self.status == "in-use"
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// How many addresses to add: secondary IPv4 addresses or /28 prefixes, never both in one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressCount {
    pub ips: u32,
    pub prefixes: u32,
}

impl AddressCount {
    pub fn ips(n: u32) -> Self {
        AddressCount { ips: n, prefixes: 0 }
    }
    pub fn prefixes(n: u32) -> Self {
        AddressCount { ips: 0, prefixes: n }
    }
    pub fn is_zero(&self) -> bool {
        self.ips == 0 && self.prefixes == 0
    }

    /// Refuses a count EC2 cannot serve in one call. `arg` names the argument in the error.
    pub fn validate(&self, arg: &'static str, allow_zero: bool) -> Result<()> {
        if self.ips > 0 && self.prefixes > 0 {
            return Err(CloudError::invalid(arg, "secondary IPs and prefixes cannot be asked for in one call"));
        }
        if !allow_zero && self.is_zero() {
            return Err(CloudError::invalid(arg, "asks for 0 addresses"));
        }
        Ok(())
    }
}

/// What a create-ENI call asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateEni {
    pub subnet_id: String,
    pub security_groups: Vec<String>,
    pub description: String,
    pub tags: Tags,
    /// Addresses created with the ENI, in the same call.
    pub initial: AddressCount,
}

/// What an assign call added (the new addresses only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    pub ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Ipv4Net>,
}

/// Where a VPC route sends its traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteTarget {
    Instance(String),
    Eni(String),
    /// Anything else (internet gateway, `local`, NAT...): never ours to change.
    Other(String),
}

/// One route of a route table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub destination: Ipv4Net,
    pub target: RouteTarget,
    /// The ENI the route resolves to (EC2 reports it for instance targets too).
    pub via_eni: Option<String>,
    /// `active` or `blackhole` (the target is gone).
    pub state: String,
}

impl Route {
    /// True when the route sends its traffic to `target`.
    pub fn points_to(&self, target: &RouteTarget) -> bool {
        match target {
            RouteTarget::Eni(id) => self.via_eni.as_deref() == Some(id.as_str()) || &self.target == target,
            _ => &self.target == target,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTable {
    pub id: String,
    pub vpc_id: String,
    pub main: bool,
    pub subnets: Vec<String>,
    pub routes: Vec<Route>,
    pub tags: Tags,
}

/// What `ensure_route` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChange {
    Created,
    Unchanged,
}

/// Tag keys underway puts on every ENI it creates, so GC can find them (and only them).
pub const TAG_CLUSTER: &str = "underway.io/cluster";
pub const TAG_INSTANCE: &str = "underway.io/instance-id";
pub const TAG_CREATED_BY: &str = "underway.io/created-by";
pub const TAG_CREATED_AT: &str = "underway.io/created-at";
pub const CREATED_BY: &str = "underway-ipamd";

/// The creation tags of an ENI for `cluster` and the instance it is made for. `created_at` is in
/// Unix seconds.
pub fn eni_tags(cluster: &str, instance_id: &str, created_at: u64) -> Tags {
    Tags::from([
        (TAG_CLUSTER.to_string(), cluster.to_string()),
        (TAG_INSTANCE.to_string(), instance_id.to_string()),
        (TAG_CREATED_BY.to_string(), CREATED_BY.to_string()),
        (TAG_CREATED_AT.to_string(), created_at.to_string()),
    ])
}

/// Checks an id has its EC2 prefix (`eni-`, `subnet-`...), so a swapped argument fails before a call.
pub fn check_id(arg: &'static str, id: &str, prefix: &str) -> Result<()> {
    let rest = id.strip_prefix(prefix).filter(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_alphanumeric()));
    match rest {
        Some(_) => Ok(()),
        None => Err(CloudError::invalid(arg, format!("{id:?} is not a {prefix}… id"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(parse_mac("02:00:00:aa:0b:ff"), Some([2, 0, 0, 0xaa, 0x0b, 0xff]));
        assert_eq!(parse_mac("02:00:00:23302x:14202x:19602x"), None);
        assert_eq!(parse_mac("02:00:00:aa:0b"), None);
        assert_eq!(parse_mac("02:00:00:aa:0b:ff:01"), None);
    }

    #[test]
    fn counts() {
        assert!(AddressCount::ips(3).validate("count", false).is_ok());
        assert!(AddressCount::default().validate("initial", true).is_ok());
        let e = AddressCount::default().validate("count", false).unwrap_err();
        assert!(matches!(e, CloudError::InvalidRequest { arg: "count", .. }));
        let e = AddressCount { ips: 1, prefixes: 1 }.validate("count", true).unwrap_err();
        assert!(e.to_string().contains("count"), "{e}");
    }

    #[test]
    fn ids_and_gateway() {
        assert!(check_id("eni", "eni-0abc12", "eni-").is_ok());
        assert!(check_id("eni", "subnet-0abc12", "eni-").is_err());
        assert!(check_id("eni", "eni-", "eni-").is_err());
        let s = Subnet {
            id: "subnet-1".into(),
            vpc_id: "vpc-1".into(),
            cidr: "10.0.16.0/20".parse().unwrap(),
            availability_zone: "us-east-1a".into(),
            available_addresses: 1,
            tags: Tags::new(),
        };
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 0, 16, 1));
    }
}
