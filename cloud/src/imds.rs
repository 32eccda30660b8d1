//! The node's identity from the instance metadata service (IMDSv2), through aws-config's client.
//!
//! The endpoint is the SDK's: `AWS_EC2_METADATA_SERVICE_ENDPOINT` overrides it (the test world
//! gives each node its own), or [`ImdsIdentity::with_endpoint`].

use std::net::Ipv4Addr;

use aws_config::imds::client::Client;
use aws_config::imds::client::error::ImdsError;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::error::{CloudError, Result};
use crate::types::parse_mac;

const OP: &str = "IMDS";
const BASE: &str = "/latest/meta-data";

/// One interface as IMDS describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImdsInterface {
    pub mac: String,
    pub device_number: u32,
    pub interface_id: String,
    pub subnet_id: String,
    pub subnet_cidr: Ipv4Net,
    pub vpc_id: String,
    pub vpc_cidrs: Vec<Ipv4Net>,
    pub security_groups: Vec<String>,
    /// The primary address first.
    pub local_ipv4s: Vec<Ipv4Addr>,
    pub ipv4_prefixes: Vec<Ipv4Net>,
}

/// Who this node is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceIdentity {
    pub instance_id: String,
    pub instance_type: String,
    pub availability_zone: String,
    pub region: String,
    pub primary_mac: String,
    /// By device number.
    pub interfaces: Vec<ImdsInterface>,
}

impl InstanceIdentity {
    pub fn primary(&self) -> Option<&ImdsInterface> {
        self.interfaces.iter().find(|i| i.mac == self.primary_mac)
    }
}

/// Reads identity from IMDS.
#[derive(Debug, Clone)]
pub struct ImdsIdentity {
    client: Client,
}

fn map_err(path: &str, e: ImdsError) -> CloudError {
    match &e {
        ImdsError::ErrorResponse(r) if r.response().status().as_u16() == 404 => {
            CloudError::NotFound { op: OP, code: "404".into(), message: path.to_string() }
        }
        _ => CloudError::Transient {
            op: OP,
            message: format!("{path}: {}", aws_sdk_ec2::error::DisplayErrorContext(&e)),
        },
    }
}

fn parse<T: std::str::FromStr>(path: &str, v: &str) -> Result<T> {
    v.trim().parse().map_err(|_| CloudError::Fatal {
        op: OP,
        code: "MalformedResponse".into(),
        message: format!("{path}: {v:?}"),
    })
}

fn lines(v: &str) -> impl Iterator<Item = &str> {
    v.lines().map(str::trim).filter(|l| !l.is_empty())
}

impl ImdsIdentity {
    /// The SDK's default endpoint resolution (environment, profile, then 169.254.169.254).
    pub fn new() -> Self {
        ImdsIdentity { client: Client::builder().max_attempts(3).build() }
    }

    pub fn with_endpoint(endpoint: &str) -> Result<Self> {
        let b = Client::builder()
            .max_attempts(3)
            .endpoint(endpoint)
            .map_err(|e| CloudError::invalid("endpoint", format!("{endpoint}: {e}")))?;
        Ok(ImdsIdentity { client: b.build() })
    }

    async fn get(&self, path: &str) -> Result<String> {
        let full = format!("{BASE}/{path}");
        self.client.get(full.clone()).await.map(String::from).map_err(|e| map_err(&full, e))
    }

    /// A path that may be absent (404 → `None`).
    async fn get_opt(&self, path: &str) -> Result<Option<String>> {
        match self.get(path).await {
            Ok(v) => Ok(Some(v)),
            Err(CloudError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn interface(&self, mac: &str) -> Result<ImdsInterface> {
        let p = |leaf: &str| format!("network/interfaces/macs/{mac}/{leaf}");
        let nets = |v: Option<String>| -> Result<Vec<Ipv4Net>> {
            v.as_deref().map(lines).into_iter().flatten().map(|l| parse(&p("…"), l)).collect()
        };
        Ok(ImdsInterface {
            mac: mac.to_string(),
            device_number: parse(&p("device-number"), &self.get(&p("device-number")).await?)?,
            interface_id: self.get(&p("interface-id")).await?.trim().to_string(),
            subnet_id: self.get(&p("subnet-id")).await?.trim().to_string(),
            subnet_cidr: parse(&p("subnet-ipv4-cidr-block"), &self.get(&p("subnet-ipv4-cidr-block")).await?)?,
            vpc_id: self.get(&p("vpc-id")).await?.trim().to_string(),
            vpc_cidrs: nets(Some(self.get(&p("vpc-ipv4-cidr-blocks")).await?))?,
            security_groups: self
                .get_opt(&p("security-group-ids"))
                .await?
                .map(|v| lines(&v).map(str::to_string).collect())
                .unwrap_or_default(),
            local_ipv4s: lines(&self.get(&p("local-ipv4s")).await?)
                .map(|l| parse(&p("local-ipv4s"), l))
                .collect::<Result<_>>()?,
            ipv4_prefixes: nets(self.get_opt(&p("ipv4-prefix")).await?)?,
        })
    }

    /// Reads the whole identity: instance, placement, and every interface.
    pub async fn identity(&self) -> Result<InstanceIdentity> {
        let availability_zone = self.get("placement/availability-zone").await?.trim().to_string();
        let region = match self.get_opt("placement/region").await? {
            Some(r) => r.trim().to_string(),
            None => availability_zone.trim_end_matches(|c: char| c.is_ascii_alphabetic()).to_string(),
        };
        let primary_mac = self.get("mac").await?.trim().to_ascii_lowercase();
        if parse_mac(&primary_mac).is_none() {
            return Err(CloudError::Fatal {
                op: OP,
                code: "MalformedResponse".into(),
                message: format!("mac: {primary_mac:?}"),
            });
        }
        let mut interfaces = Vec::new();
        for entry in lines(&self.get("network/interfaces/macs/").await?) {
            interfaces.push(self.interface(entry.trim_end_matches('/')).await?);
        }
        interfaces.sort_by_key(|i| i.device_number);
        Ok(InstanceIdentity {
            instance_id: self.get("instance-id").await?.trim().to_string(),
            instance_type: self.get("instance-type").await?.trim().to_string(),
            availability_zone,
            region,
            primary_mac,
            interfaces,
        })
    }
}

impl Default for ImdsIdentity {
    fn default() -> Self {
        Self::new()
    }
}
