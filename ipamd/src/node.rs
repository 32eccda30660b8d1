//! The node seam (issue 17): the side effects on the node that the reconciler performs — waiting
//! for an attached ENI's link and setting it up, reading the pods' veths — behind a small trait
//! beside the cloud's. [`Kernel`] is the node itself (netlink, IMDS); [`MemoryNode`] lets unit
//! tests and the simulator run ipamd's reconciler with neither a kernel nor a cloud.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use underway_cloud::Eni as CloudEni;
use underway_routes::EniSpec;

use crate::error::{IpamdError, Result};
use crate::host::HostPods;
use crate::identity::Macs;

/// What setting up an attached ENI's link needs besides the ENI.
#[derive(Debug, Clone, Copy)]
pub struct EniLink {
    pub device_index: u32,
    pub table: u32,
    pub mtu: u32,
    pub subnet: ipnet::Ipv4Net,
}

pub trait Node: Send + Sync {
    /// Waits up to `wait` for the link of an attached ENI, then sets it and its route table up;
    /// returns the link's name.
    fn setup_eni(&self, eni: &CloudEni, link: EniLink, wait: Duration) -> impl Future<Output = Result<String>> + Send;
    /// The pod veths on the node (`veth_prefix`) and the addresses each routes.
    fn pods(&self, veth_prefix: &str) -> impl Future<Output = Result<HostPods>> + Send;
}

/// The node itself: links through rtnetlink, MACs from IMDS (or, with a static identity, from
/// the ENI as EC2 reported it).
pub struct Kernel {
    pub macs: Macs,
}

impl Node for Kernel {
    async fn setup_eni(&self, eni: &CloudEni, link: EniLink, wait: Duration) -> Result<String> {
        let deadline = tokio::time::Instant::now() + wait;
        let ns = underway_routes::netns::handle_in(None)?;
        let mut mac = None;
        loop {
            if mac.is_none() {
                mac = self.macs.mac_of(eni).await?;
            }
            if let Some(m) = mac
                && underway_routes::eni::link_by_mac(&ns.handle, m).await?.is_some()
            {
                let spec = EniSpec {
                    mac: m,
                    mtu: link.mtu,
                    table: link.table,
                    primary_ip: eni.primary_ip,
                    subnet: link.subnet.network(),
                    subnet_prefix: link.subnet.prefix_len(),
                };
                return Ok(underway_routes::setup_eni(None, &spec).await?);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(IpamdError::Routes(underway_routes::RoutesError::Missing(format!(
                    "the link of {} (device {}, MAC {}) after {} ms",
                    eni.id,
                    link.device_index,
                    mac.map(|m| underway_routes::pod::mac_string(&m)).unwrap_or_else(|| "not yet in IMDS".into()),
                    wait.as_millis()
                ))));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn pods(&self, veth_prefix: &str) -> Result<HostPods> {
        crate::host::host_pods(veth_prefix).await
    }
}

/// A node in memory: every attached ENI's link appears at once unless the test holds it back;
/// pods are what the test (or the simulator) puts there.
#[derive(Debug, Default)]
pub struct MemoryNode {
    /// ENIs whose link does not appear (a driver that never brings it up).
    pub missing_links: Mutex<BTreeSet<String>>,
    /// While set, no ENI not set up before gets its link.
    pub hold_new_links: std::sync::atomic::AtomicBool,
    /// ENIs whose link was set up, by link name.
    pub links: Mutex<Vec<(String, String)>>,
    pub veths: Mutex<HostPods>,
    /// How many of the next reads of the host's pods fail (a netlink error).
    pub fail_pods: std::sync::atomic::AtomicU32,
}

impl Node for MemoryNode {
    async fn setup_eni(&self, eni: &CloudEni, link: EniLink, wait: Duration) -> Result<String> {
        let held = self.hold_new_links.load(std::sync::atomic::Ordering::Relaxed)
            && !self.links.lock().expect("links").iter().any(|(e, _)| e == &eni.id);
        if held || self.missing_links.lock().expect("links").contains(&eni.id) {
            tokio::time::sleep(wait).await;
            return Err(IpamdError::Routes(underway_routes::RoutesError::Missing(format!(
                "the link of {} (device {}) after {} ms",
                eni.id,
                link.device_index,
                wait.as_millis()
            ))));
        }
        let name = format!("eth{}", link.device_index);
        let mut links = self.links.lock().expect("links");
        if !links.iter().any(|(e, _)| e == &eni.id) {
            links.push((eni.id.clone(), name.clone()));
        }
        Ok(name)
    }

    async fn pods(&self, _veth_prefix: &str) -> Result<HostPods> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.fail_pods.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1)).is_ok() {
            return Err(IpamdError::Routes(underway_routes::RoutesError::Missing(
                "the host's pod veths (injected)".into(),
            )));
        }
        Ok(self.veths.lock().expect("veths").clone())
    }
}
