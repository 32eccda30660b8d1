//! The test world: a VPC fabric around LocalStack's EC2 control plane.
//!
//! LocalStack keeps EC2 *state* only. This module makes that state real on this machine:
//! - a **node** is a network namespace backed by a LocalStack instance; each ENI EC2 says is attached
//!   to it appears there as `eth<device index>` (a veth) with a MAC derived from the ENI id
//!   ([`mac_for`]; LocalStack's own MACs are malformed), and vanishes when detached;
//! - each node has an **IMDSv2** server at 169.254.169.254:80 inside its namespace (and on a
//!   loopback port for the test process), serving from EC2 state, and an **EC2 endpoint** at
//!   `http://169.254.169.250:4566` inside its namespace that forwards to the account's strict EC2 front (then LocalStack) on loopback;
//! - one **router** namespace holds the far end of every ENI link. It routes each address EC2 says
//!   an ENI owns (primary, secondary, /28 prefixes) to that ENI's link, and each route-table
//!   destination to its target instance's primary ENI (or the target ENI), by a permanent neighbour
//!   entry to the ENI's MAC, as the VPC delivers frames to ENIs. An nftables set per link drops a
//!   packet whose source the arriving ENI does not own, unless the ENI's source/destination check
//!   is off: the VPC rule that makes policy routing necessary.
//!
//! [`World::sync`] applies EC2 state on demand; [`World::start_sync_loop`] polls it. The router
//! applies the routes of every route table of the VPC (subnet associations are not modelled; for
//! one destination the main table wins). Traffic never leaves the namespaces.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ec2::types::Filter;
use ipnet::Ipv4Net;
use tokio::task::JoinHandle;

use crate::HarnessError;
use crate::fixture::Ec2Fixture;
use crate::imds::FakeImds;
use crate::localstack::{Account, LocalStack};
use crate::netns;

/// Where a node finds its metadata service and EC2, inside its namespace.
pub const IMDS_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const EC2_PROXY_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 250);
pub const EC2_PROXY_PORT: u16 = 4566;
const NS_PREFIX: &str = "uwt-";
const NFT_TABLE: &str = "uwvpc";

/// A MAC for an ENI, derived from its id (FNV-1a), locally administered and unicast.
pub fn mac_for(eni_id: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in eni_id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    let b = h.to_be_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

/// The VPC router's address in a subnet: its first host.
fn first_host(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

pub fn mac_string(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

// ---------------------------------------------------------------------------------------------
// EC2 state as the fabric sees it, and the pure plan derived from it.

/// An ENI as the fabric needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniView {
    pub id: String,
    pub subnet_id: String,
    pub primary_ip: Ipv4Addr,
    pub secondary_ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Ipv4Net>,
    pub instance_id: Option<String>,
    pub device_index: u32,
    pub source_dest_check: bool,
    pub security_groups: Vec<String>,
}

impl EniView {
    pub fn mac(&self) -> String {
        mac_string(mac_for(&self.id))
    }
    /// Every address the VPC delivers to this ENI.
    pub fn owned(&self) -> Vec<Ipv4Net> {
        let mut v: Vec<Ipv4Net> = std::iter::once(self.primary_ip)
            .chain(self.secondary_ips.iter().copied())
            .map(|a| Ipv4Net::new(a, 32).expect("/32"))
            .collect();
        v.extend(self.prefixes.iter().copied());
        v
    }
}

/// A route-table route "destination → instance or ENI".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpcRoute {
    pub destination: Ipv4Net,
    pub instance_id: Option<String>,
    pub eni_id: Option<String>,
    pub main_table: bool,
}

/// One look at EC2.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub vpc_id: String,
    pub vpc_cidrs: Vec<Ipv4Net>,
    pub subnets: BTreeMap<String, Ipv4Net>,
    pub enis: Vec<EniView>,
    pub routes: Vec<VpcRoute>,
    /// Instance id → state name.
    pub instances: BTreeMap<String, String>,
}

/// A router-side route: destination → router link, via the ENI's primary address (whose
/// neighbour entry is the ENI's MAC).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouterRoute {
    pub link: String,
    pub via: Ipv4Addr,
}

/// What the fabric should look like.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Per node index: device index → ENI.
    pub links: BTreeMap<usize, BTreeMap<u32, EniView>>,
    pub routes: BTreeMap<Ipv4Net, RouterRoute>,
    /// Router link → (ENI primary, MAC) for its permanent neighbour entry.
    pub neighbours: BTreeMap<String, (Ipv4Addr, String)>,
    /// Router link → sources it may send from; links absent here have no source check.
    pub source_check: BTreeMap<String, Vec<Ipv4Net>>,
    pub gateways: BTreeSet<Ipv4Addr>,
}

/// The router-side name of node `node`'s link at `device`.
pub fn router_link(node: usize, device: u32) -> String {
    format!("n{node}e{device}")
}

/// The node's end of a new ENI's link while it waits in the router's namespace.
fn arriving_link(node: usize, device: u32) -> String {
    format!("a{node}e{device}")
}

/// Derives the fabric from EC2 state. `nodes` maps instance id → node index.
pub fn plan(snap: &Snapshot, nodes: &BTreeMap<String, usize>) -> Plan {
    let mut p = Plan::default();
    let mut by_eni: BTreeMap<&str, (String, Ipv4Addr)> = BTreeMap::new();
    let mut primary_of: BTreeMap<&str, &str> = BTreeMap::new();
    for eni in &snap.enis {
        let Some(node) = eni.instance_id.as_ref().and_then(|i| nodes.get(i)) else { continue };
        let link = router_link(*node, eni.device_index);
        p.links.entry(*node).or_default().insert(eni.device_index, eni.clone());
        p.neighbours.insert(link.clone(), (eni.primary_ip, eni.mac()));
        for net in eni.owned() {
            p.routes.insert(net, RouterRoute { link: link.clone(), via: eni.primary_ip });
        }
        if eni.source_dest_check {
            p.source_check.insert(link.clone(), eni.owned());
        }
        if eni.device_index == 0 {
            primary_of.insert(eni.instance_id.as_deref().unwrap_or_default(), &eni.id);
        }
        by_eni.insert(&eni.id, (link, eni.primary_ip));
    }
    // Main-table routes first, so that for one destination the main table wins.
    let mut routes: Vec<&VpcRoute> = snap.routes.iter().collect();
    routes.sort_by_key(|r| !r.main_table);
    for r in routes {
        let eni = match (&r.eni_id, &r.instance_id) {
            (Some(e), _) => Some(e.as_str()),
            (None, Some(i)) if snap.instances.get(i).is_some_and(|s| s == "running") => {
                primary_of.get(i.as_str()).copied()
            }
            _ => None,
        };
        if let Some((link, via)) = eni.and_then(|e| by_eni.get(e)) {
            p.routes.entry(r.destination).or_insert(RouterRoute { link: link.clone(), via: *via });
        }
    }
    p.gateways = snap.subnets.values().copied().map(first_host).collect();
    p
}

/// The router's nftables ruleset for a plan: one set of owned sources per checked link.
pub fn nft_ruleset(p: &Plan) -> String {
    let mut s = format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\ntable inet {NFT_TABLE} {{\n");
    for (link, nets) in &p.source_check {
        let elems: Vec<String> =
            nets.iter().map(|n| if n.prefix_len() == 32 { n.addr().to_string() } else { n.to_string() }).collect();
        s += &format!("  set own_{link} {{\n    type ipv4_addr; flags interval;\n");
        if !elems.is_empty() {
            s += &format!("    elements = {{ {} }}\n", elems.join(", "));
        }
        s += "  }\n";
    }
    s += "  chain source_check {\n    type filter hook forward priority 0; policy accept;\n";
    for link in p.source_check.keys() {
        s += &format!("    iifname \"{link}\" ip saddr != @own_{link} counter drop\n");
    }
    s += "  }\n}\n";
    s
}

/// IMDS paths of one node from its ENIs (by device index).
pub fn imds_paths(
    instance_id: &str,
    instance_type: &str,
    az: &str,
    links: &BTreeMap<u32, EniView>,
    snap: &Snapshot,
) -> BTreeMap<String, String> {
    let m = "/latest/meta-data";
    let mut p = BTreeMap::new();
    let mut put = |k: String, v: String| {
        p.insert(format!("{m}/{k}"), v);
    };
    put("instance-id".into(), instance_id.into());
    put("instance-type".into(), instance_type.into());
    put("placement/availability-zone".into(), az.into());
    put("placement/region".into(), az.trim_end_matches(|c: char| c.is_ascii_alphabetic()).into());
    let join = |v: Vec<String>| v.join("\n");
    for eni in links.values() {
        let mac = eni.mac();
        if eni.device_index == 0 {
            put("mac".into(), mac.clone());
            put("local-ipv4".into(), eni.primary_ip.to_string());
        }
        let i = format!("network/interfaces/macs/{mac}");
        put(format!("{i}/device-number"), eni.device_index.to_string());
        put(format!("{i}/interface-id"), eni.id.clone());
        put(format!("{i}/mac"), mac.clone());
        put(format!("{i}/subnet-id"), eni.subnet_id.clone());
        if let Some(c) = snap.subnets.get(&eni.subnet_id) {
            put(format!("{i}/subnet-ipv4-cidr-block"), c.to_string());
        }
        put(format!("{i}/vpc-id"), snap.vpc_id.clone());
        put(format!("{i}/vpc-ipv4-cidr-blocks"), join(snap.vpc_cidrs.iter().map(|c| c.to_string()).collect()));
        put(format!("{i}/security-group-ids"), join(eni.security_groups.clone()));
        let ips = std::iter::once(eni.primary_ip).chain(eni.secondary_ips.iter().copied());
        put(format!("{i}/local-ipv4s"), join(ips.map(|a| a.to_string()).collect()));
        if !eni.prefixes.is_empty() {
            put(format!("{i}/ipv4-prefix"), join(eni.prefixes.iter().map(|n| n.to_string()).collect()));
        }
    }
    p
}

// ---------------------------------------------------------------------------------------------
// The running world.

/// A node of the world.
pub struct Node {
    pub index: usize,
    pub ns: String,
    pub instance_id: String,
    pub instance_type: String,
    pub availability_zone: String,
    /// The IMDS for the test process (loopback of the root namespace).
    pub imds: FakeImds,
    proxy: JoinHandle<()>,
    ec2_delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Node {
    /// The node's primary address (on its eth0, the primary ENI's link).
    pub fn primary_ip(&self) -> Result<Ipv4Addr, HarnessError> {
        let out = self.exec(&["ip", "-4", "-o", "addr", "show", "eth0"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| HarnessError::Command(format!("node {}: no address on eth0: {text}", self.index)))
    }

    /// The IMDS endpoint as seen from inside the node's namespace.
    pub fn imds_endpoint_in_ns(&self) -> String {
        format!("http://{IMDS_ADDR}")
    }
    /// The EC2 endpoint as seen from inside the node's namespace.
    pub fn ec2_endpoint_in_ns(&self) -> String {
        format!("http://{EC2_PROXY_ADDR}:{EC2_PROXY_PORT}")
    }
    /// Makes the node's EC2 endpoint stall each new connection this long before forwarding it
    /// (a slow EC2, as the node sees it); 0 ends the stall.
    pub fn set_ec2_delay(&self, d: Duration) {
        self.ec2_delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }
    /// Runs a command inside the node's namespace.
    pub fn exec(&self, argv: &[&str]) -> Result<std::process::Output, HarnessError> {
        netns::exec(&self.ns, argv)
    }
}

#[derive(Default)]
struct Applied {
    links: BTreeMap<usize, BTreeMap<u32, String>>,
    routes: BTreeMap<Ipv4Net, RouterRoute>,
    neighbours: BTreeMap<String, (Ipv4Addr, String)>,
    nft: String,
    gateways: BTreeSet<Ipv4Addr>,
}

struct Inner {
    id: String,
    account: Account,
    ec2: Ec2Fixture,
    /// LocalStack itself: the world plays the cloud, so its reads bypass the front.
    direct: aws_sdk_ec2::Client,
    router_ns: String,
    nodes: Mutex<Vec<Arc<Node>>>,
    applied: Mutex<Applied>,
    sync_lock: tokio::sync::Mutex<()>,
}

/// A VPC world. Dropping it tears everything down: namespaces, links, servers, the sync loop.
pub struct World {
    inner: Arc<Inner>,
    poller: Mutex<Option<JoinHandle<()>>>,
}

fn ec2_err(e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Ec2(e.to_string())
}

/// Deletes namespaces left by test processes that no longer run (killed before their teardown).
pub fn reap_orphans() {
    for ns in netns::list_ns() {
        let Some(pid) =
            ns.strip_prefix(NS_PREFIX).and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            netns::del_ns(&ns);
        }
    }
}

impl World {
    /// A new world in a fresh LocalStack account: VPC 10.0.0.0/16, subnet 10.0.0.0/18, a router.
    pub async fn create() -> Result<World, HarnessError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        reap_orphans();
        let id = format!("{NS_PREFIX}{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let account = LocalStack::shared().account();
        let ec2 = Ec2Fixture::create(&account).await;
        let router_ns = format!("{id}-router");
        let inner = Arc::new(Inner {
            id,
            direct: aws_sdk_ec2::Client::new(&account.direct_sdk_config()),
            account,
            ec2,
            router_ns: router_ns.clone(),
            nodes: Mutex::new(Vec::new()),
            applied: Mutex::new(Applied::default()),
            sync_lock: tokio::sync::Mutex::new(()),
        });
        let world = World { inner, poller: Mutex::new(None) };
        // An install step of VPC-route mode: the tables ipamd may change carry the cluster's tag.
        let main = world.main_route_table().await?;
        world.tag_for_cluster(&main).await?;
        netns::add_ns(&router_ns)?;
        netns::ip_in(&router_ns, &["link", "set", "lo", "up"])?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
        ] {
            netns::sysctl(&router_ns, k, v)?;
        }
        Ok(world)
    }

    /// The world's id, which is also the cluster name its ipamd processes use.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The VPC's main route table (tagged for the world's cluster at creation).
    pub async fn main_route_table(&self) -> Result<String, HarnessError> {
        let o = self
            .inner
            .direct
            .describe_route_tables()
            .filters(Filter::builder().name("vpc-id").values(&self.inner.ec2.vpc_id).build())
            .filters(Filter::builder().name("association.main").values("true").build())
            .send()
            .await
            .map_err(ec2_err)?;
        o.route_tables()
            .first()
            .and_then(|t| t.route_table_id())
            .map(str::to_string)
            .ok_or_else(|| HarnessError::Ec2("the VPC has no main route table".into()))
    }

    /// Tags a route table `underway.io/cluster = <world id>`, as a user tags the cluster's tables.
    pub async fn tag_for_cluster(&self, table: &str) -> Result<(), HarnessError> {
        let tag = aws_sdk_ec2::types::Tag::builder().key(underway_cloud::TAG_CLUSTER).value(&self.inner.id).build();
        self.inner.ec2.client.create_tags().resources(table).tags(tag).send().await.map_err(ec2_err)?;
        Ok(())
    }

    /// A new route table in the VPC, tagged for the world's cluster.
    pub async fn cluster_route_table(&self) -> Result<String, HarnessError> {
        let t = self.inner.ec2.route_table().await;
        self.tag_for_cluster(&t).await?;
        Ok(t)
    }
    pub fn account(&self) -> &Account {
        &self.inner.account
    }
    pub fn ec2(&self) -> &Ec2Fixture {
        &self.inner.ec2
    }
    pub fn router_ns(&self) -> &str {
        &self.inner.router_ns
    }
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.inner.nodes.lock().expect("nodes").clone()
    }
    pub fn node(&self, index: usize) -> Arc<Node> {
        self.nodes()[index].clone()
    }

    /// Runs an instance and makes its node namespace, IMDS and EC2 endpoint; then syncs.
    pub async fn add_node(&self, instance_type: &str) -> Result<Arc<Node>, HarnessError> {
        let inner = &self.inner;
        let instance_id = inner.ec2.run_instance(instance_type).await;
        let index = inner.nodes.lock().expect("nodes").len();
        let ns = format!("{}-node{index}", inner.id);
        netns::add_ns(&ns)?;
        netns::ip_in(&ns, &["link", "set", "lo", "up"])?;
        for a in [IMDS_ADDR, EC2_PROXY_ADDR] {
            netns::ip_in(&ns, &["addr", "add", &format!("{a}/32"), "dev", "lo"])?;
        }
        // An EKS node forwards (kubelet's and the runtime's set-up do this on a real one), and
        // filters reverse paths strictly, as Amazon Linux 2's EKS AMI does (a new namespace
        // starts with it off, which would hide a reply path that only works loose).
        netns::sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        netns::sysctl(&ns, "net.ipv4.conf.all.rp_filter", "1")?;
        netns::sysctl(&ns, "net.ipv4.conf.default.rp_filter", "1")?;
        let (imds_in_ns, proxy_in_ns) = netns::in_ns(&ns, || {
            (
                std::net::TcpListener::bind((IMDS_ADDR, 80)),
                std::net::TcpListener::bind((EC2_PROXY_ADDR, EC2_PROXY_PORT)),
            )
        })?;
        let imds = FakeImds::start_on(std::net::TcpListener::bind("127.0.0.1:0")?, vec![imds_in_ns?], BTreeMap::new())?;
        let ec2_delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        // The node's EC2 calls reach the account's front under the node's name.
        let front = inner.account.front.endpoint_for(&format!("node{index}"))?;
        let proxy = spawn_proxy(proxy_in_ns?, front.trim_start_matches("http://").to_string(), ec2_delay_ms.clone())?;
        let node = Arc::new(Node {
            index,
            ns,
            instance_id,
            instance_type: instance_type.to_string(),
            availability_zone: "us-east-1a".into(),
            imds,
            proxy,
            ec2_delay_ms,
        });
        inner.nodes.lock().expect("nodes").push(node.clone());
        self.sync().await?;
        Ok(node)
    }

    /// Reads EC2 and applies it to the fabric now.
    pub async fn sync(&self) -> Result<(), HarnessError> {
        sync(&self.inner).await
    }

    /// Polls EC2 every `every` and applies changes (an ENI attached in EC2 appears within about
    /// that long). Errors are logged to stderr and retried on the next tick.
    pub fn start_sync_loop(&self, every: Duration) {
        let inner = self.inner.clone();
        let h = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = sync(&inner).await {
                    eprintln!("test world {}: sync: {e}", inner.id);
                }
            }
        });
        if let Some(old) = self.poller.lock().expect("poller").replace(h) {
            old.abort();
        }
    }

    /// Stops the polling [`start_sync_loop`](Self::start_sync_loop) began (a benchmark whose
    /// node needs no more ENIs keeps its cores for what it measures).
    pub fn stop_sync_loop(&self) {
        if let Some(old) = self.poller.lock().expect("poller").take() {
            old.abort();
        }
    }

    /// Packets the router dropped for a foreign source address (all links).
    pub fn source_check_drops(&self) -> Result<u64, HarnessError> {
        let out = netns::exec(&self.inner.router_ns, &["nft", "list", "chain", "inet", NFT_TABLE, "source_check"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .split("counter packets ")
            .skip(1)
            .filter_map(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
            .sum())
    }

    /// Names of every namespace this world made.
    pub fn namespaces(&self) -> Vec<String> {
        std::iter::once(self.inner.router_ns.clone()).chain(self.nodes().iter().map(|n| n.ns.clone())).collect()
    }

    /// Tears down now (also done on drop).
    pub fn teardown(&self) {
        if let Some(h) = self.poller.lock().expect("poller").take() {
            h.abort();
        }
        for n in self.nodes() {
            n.proxy.abort();
        }
        for ns in self.namespaces() {
            netns::del_ns(&ns);
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Forwards TCP connections accepted on `listener` (bound in a node namespace) to `target`
/// (LocalStack on the root namespace's loopback).
fn spawn_proxy(
    listener: std::net::TcpListener,
    target: String,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
) -> Result<JoinHandle<()>, HarnessError> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    Ok(tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            let delay = Duration::from_millis(delay_ms.load(Ordering::SeqCst));
            conns.spawn(async move {
                tokio::time::sleep(delay).await;
                if let Ok(mut out) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
            while conns.try_join_next().is_some() {}
        }
    }))
}

async fn snapshot(c: &aws_sdk_ec2::Client, ec2: &Ec2Fixture) -> Result<Snapshot, HarnessError> {
    let vpc_filter = || Filter::builder().name("vpc-id").values(&ec2.vpc_id).build();
    let mut snap = Snapshot { vpc_id: ec2.vpc_id.clone(), ..Snapshot::default() };
    let vpcs = c.describe_vpcs().vpc_ids(&ec2.vpc_id).send().await.map_err(ec2_err)?;
    for v in vpcs.vpcs() {
        for a in v.cidr_block_association_set() {
            let live = a.cidr_block_state().and_then(|s| s.state()).is_none_or(|s| s.as_str() == "associated");
            if let (true, Some(Ok(n))) = (live, a.cidr_block().map(str::parse::<Ipv4Net>)) {
                snap.vpc_cidrs.push(n);
            }
        }
        if snap.vpc_cidrs.is_empty()
            && let Some(Ok(n)) = v.cidr_block().map(str::parse::<Ipv4Net>)
        {
            snap.vpc_cidrs.push(n);
        }
    }
    let subnets = c.describe_subnets().filters(vpc_filter()).send().await.map_err(ec2_err)?;
    for s in subnets.subnets() {
        if let (Some(id), Some(Ok(n))) = (s.subnet_id(), s.cidr_block().map(str::parse::<Ipv4Net>)) {
            snap.subnets.insert(id.to_string(), n);
        }
    }
    let insts = c.describe_instances().filters(vpc_filter()).send().await.map_err(ec2_err)?;
    for i in insts.reservations().iter().flat_map(|r| r.instances()) {
        if let Some(id) = i.instance_id() {
            let state = i.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default();
            snap.instances.insert(id.to_string(), state);
        }
    }
    let enis = c.describe_network_interfaces().filters(vpc_filter()).send().await.map_err(ec2_err)?;
    for ni in enis.network_interfaces() {
        let Some(primary_ip) = ni.private_ip_address().and_then(|s| s.parse().ok()) else { continue };
        let att = ni.attachment().filter(|a| a.status().is_none_or(|s| s.as_str() != "detached"));
        snap.enis.push(EniView {
            id: ni.network_interface_id().unwrap_or_default().to_string(),
            subnet_id: ni.subnet_id().unwrap_or_default().to_string(),
            primary_ip,
            secondary_ips: ni
                .private_ip_addresses()
                .iter()
                .filter_map(|a| a.private_ip_address()?.parse().ok())
                .filter(|a| *a != primary_ip)
                .collect(),
            prefixes: ni.ipv4_prefixes().iter().filter_map(|p| p.ipv4_prefix()?.parse().ok()).collect(),
            instance_id: att.and_then(|a| a.instance_id()).map(str::to_string),
            device_index: att.and_then(|a| a.device_index()).unwrap_or(0).max(0) as u32,
            source_dest_check: ni.source_dest_check().unwrap_or(true),
            security_groups: ni.groups().iter().filter_map(|g| g.group_id().map(str::to_string)).collect(),
        });
    }
    let tables = c.describe_route_tables().filters(vpc_filter()).send().await.map_err(ec2_err)?;
    for t in tables.route_tables() {
        let main = t.associations().iter().any(|a| a.main() == Some(true));
        for r in t.routes() {
            let Some(Ok(destination)) = r.destination_cidr_block().map(str::parse::<Ipv4Net>) else { continue };
            if r.instance_id().is_none() && r.network_interface_id().is_none() {
                continue;
            }
            snap.routes.push(VpcRoute {
                destination,
                instance_id: r.instance_id().map(str::to_string),
                eni_id: r.network_interface_id().map(str::to_string),
                main_table: main,
            });
        }
    }
    Ok(snap)
}

async fn sync(inner: &Arc<Inner>) -> Result<(), HarnessError> {
    let _one_at_a_time = inner.sync_lock.lock().await;
    let snap = snapshot(&inner.direct, &inner.ec2).await?;
    let nodes = inner.nodes.lock().expect("nodes").clone();
    let by_instance: BTreeMap<String, usize> = nodes.iter().map(|n| (n.instance_id.clone(), n.index)).collect();
    let p = plan(&snap, &by_instance);
    for n in &nodes {
        let links = p.links.get(&n.index).cloned().unwrap_or_default();
        n.imds.set_paths(imds_paths(&n.instance_id, &n.instance_type, &n.availability_zone, &links, &snap));
    }
    let inner2 = inner.clone();
    tokio::task::spawn_blocking(move || apply(&inner2, &nodes, &p, &snap))
        .await
        .map_err(|e| HarnessError::Command(format!("sync task: {e}")))?
}

fn apply(inner: &Inner, nodes: &[Arc<Node>], p: &Plan, snap: &Snapshot) -> Result<(), HarnessError> {
    let mut guard = inner.applied.lock().expect("applied");
    let applied = &mut *guard;
    let router = &inner.router_ns;
    // Links: remove what EC2 no longer attaches, add what it newly does.
    let mut arriving = Vec::new();
    for n in nodes {
        let want = p.links.get(&n.index).cloned().unwrap_or_default();
        let have = applied.links.entry(n.index).or_default();
        for (dev, eni) in have.clone() {
            if want.get(&dev).map(|e| &e.id) != Some(&eni) {
                let _ = netns::ip_in(&n.ns, &["link", "del", &format!("eth{dev}")]);
                have.remove(&dev);
                applied.neighbours.remove(&router_link(n.index, dev));
                applied.routes.retain(|_, r| r.link != router_link(n.index, dev));
            }
        }
        let have = applied.links.entry(n.index).or_default();
        for (dev, eni) in &want {
            if have.contains_key(dev) {
                continue;
            }
            // The pair is made whole inside the router and its node end moved to the node only
            // once the router routes and admits the ENI's addresses (below): on EC2 an ENI's
            // addresses are reachable by the time the instance's OS sees the device, and ipamd
            // serves them as soon as it does.
            let (tmp, rl) = (arriving_link(n.index, *dev), router_link(n.index, *dev));
            // Left by a pass that failed: the waiting end, or a moved one whose set-up failed
            // (deleting either end of a pair deletes both).
            let _ = netns::ip_in(router, &["link", "del", &tmp]);
            let _ = netns::ip_in(&n.ns, &["link", "del", &format!("eth{dev}")]);
            let mac = eni.mac();
            netns::ip_in(router, &["link", "add", &tmp, "address", &mac, "type", "veth", "peer", "name", &rl])?;
            netns::ip_in(router, &["link", "set", &rl, "up"])?;
            netns::sysctl(router, &format!("net.ipv4.conf.{rl}.proxy_arp"), "1")?;
            netns::sysctl(router, &format!("net.ipv4.neigh.{rl}.proxy_delay"), "0")?;
            netns::sysctl(router, &format!("net.ipv4.conf.{rl}.rp_filter"), "0")?;
            arriving.push((n.clone(), *dev, eni.clone()));
        }
    }
    // Gateways on the router's loopback: it answers ARP for them on every link.
    let mut lines = Vec::new();
    for g in p.gateways.difference(&applied.gateways) {
        lines.push(format!("addr replace {g}/32 dev lo"));
    }
    for (link, (ip, mac)) in &p.neighbours {
        if applied.neighbours.get(link) != Some(&(*ip, mac.clone())) {
            lines.push(format!("neigh replace {ip} lladdr {mac} dev {link} nud permanent"));
        }
    }
    for (dest, r) in &p.routes {
        if applied.routes.get(dest) != Some(r) {
            if dest.addr() == r.via && dest.prefix_len() == 32 {
                lines.push(format!("route replace {dest} dev {} proto static", r.link));
            } else {
                lines.push(format!("route replace {dest} via {} dev {} onlink proto static", r.via, r.link));
            }
        }
    }
    netns::ip_batch(router, &lines)?;
    let stale: Vec<String> =
        applied.routes.keys().filter(|d| !p.routes.contains_key(d)).map(|d| format!("route del {d}")).collect();
    let _ = netns::ip_batch(router, &stale); // a route may have gone with its link already
    let nft = nft_ruleset(p);
    if nft != applied.nft {
        netns::nft(router, &nft)?;
        applied.nft = nft;
    }
    for (n, dev, eni) in arriving {
        let eth = format!("eth{dev}");
        netns::ip_in(router, &["link", "set", &arriving_link(n.index, dev), "netns", &n.ns, "name", &eth])?;
        if dev == 0 {
            // The primary interface is configured by the instance's OS (DHCP on AWS).
            let cidr = snap
                .subnets
                .get(&eni.subnet_id)
                .copied()
                .unwrap_or_else(|| Ipv4Net::new(eni.primary_ip, 16).expect("/16"));
            let gw = first_host(cidr).to_string();
            netns::ip_in(&n.ns, &["link", "set", &eth, "up"])?;
            netns::ip_in(&n.ns, &["addr", "add", &format!("{}/{}", eni.primary_ip, cidr.prefix_len()), "dev", &eth])?;
            netns::ip_in(&n.ns, &["route", "add", "default", "via", &gw, "dev", &eth])?;
        }
        // Recorded once whole: a link whose set-up failed is made again on the next pass.
        applied.links.entry(n.index).or_default().insert(dev, eni.id.clone());
    }
    applied.routes = p.routes.clone();
    applied.neighbours = p.neighbours.clone();
    applied.gateways = p.gateways.clone();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eni(id: &str, inst: Option<&str>, dev: u32, primary: [u8; 4], secondary: &[[u8; 4]], check: bool) -> EniView {
        EniView {
            id: id.into(),
            subnet_id: "subnet-1".into(),
            primary_ip: primary.into(),
            secondary_ips: secondary.iter().map(|a| Ipv4Addr::from(*a)).collect(),
            prefixes: vec![],
            instance_id: inst.map(str::to_string),
            device_index: dev,
            source_dest_check: check,
            security_groups: vec![],
        }
    }

    fn snap() -> Snapshot {
        Snapshot {
            vpc_id: "vpc-1".into(),
            vpc_cidrs: vec!["10.0.0.0/16".parse().unwrap()],
            subnets: BTreeMap::from([("subnet-1".to_string(), "10.0.0.0/18".parse().unwrap())]),
            enis: vec![
                eni("eni-a0", Some("i-a"), 0, [10, 0, 0, 10], &[], true),
                eni("eni-a1", Some("i-a"), 1, [10, 0, 0, 20], &[[10, 0, 0, 21]], true),
                eni("eni-b0", Some("i-b"), 0, [10, 0, 0, 30], &[], false),
                eni("eni-free", None, 0, [10, 0, 0, 40], &[], true),
            ],
            routes: vec![
                VpcRoute {
                    destination: "10.0.128.0/24".parse().unwrap(),
                    instance_id: Some("i-b".into()),
                    eni_id: None,
                    main_table: false,
                },
                VpcRoute {
                    destination: "10.0.129.0/24".parse().unwrap(),
                    instance_id: Some("i-gone".into()),
                    eni_id: None,
                    main_table: true,
                },
            ],
            instances: BTreeMap::from([
                ("i-a".into(), "running".into()),
                ("i-b".into(), "running".into()),
                ("i-gone".into(), "terminated".into()),
            ]),
        }
    }

    #[test]
    fn plan_routes_owned_addresses_to_their_eni_and_vpc_routes_to_the_instance() {
        let nodes = BTreeMap::from([("i-a".to_string(), 0), ("i-b".to_string(), 1)]);
        let p = plan(&snap(), &nodes);
        assert_eq!(p.links[&0].keys().copied().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(p.links[&1].len(), 1);
        let r = |s: &str| p.routes.get(&s.parse::<Ipv4Net>().unwrap()).cloned();
        assert_eq!(r("10.0.0.21/32"), Some(RouterRoute { link: "n0e1".into(), via: [10, 0, 0, 20].into() }));
        assert_eq!(r("10.0.0.10/32").unwrap().link, "n0e0");
        assert_eq!(r("10.0.128.0/24"), Some(RouterRoute { link: "n1e0".into(), via: [10, 0, 0, 30].into() }));
        assert_eq!(r("10.0.129.0/24"), None, "a route to a terminated instance is a black hole");
        assert_eq!(r("10.0.0.40/32"), None, "an unattached ENI receives nothing");
        assert!(p.source_check.contains_key("n0e1"));
        assert!(!p.source_check.contains_key("n1e0"), "source/dest check off: no rule");
        assert_eq!(p.gateways, BTreeSet::from([Ipv4Addr::new(10, 0, 0, 1)]));
    }

    #[test]
    fn nft_ruleset_has_one_set_and_rule_per_checked_link() {
        let nodes = BTreeMap::from([("i-a".to_string(), 0), ("i-b".to_string(), 1)]);
        let rs = nft_ruleset(&plan(&snap(), &nodes));
        assert!(rs.contains("set own_n0e1 {"), "{rs}");
        assert!(rs.contains("elements = { 10.0.0.20, 10.0.0.21 }"), "{rs}");
        assert!(rs.contains("iifname \"n0e1\" ip saddr != @own_n0e1 counter drop"), "{rs}");
        assert!(!rs.contains("n1e0"), "{rs}");
    }

    #[test]
    fn macs_are_stable_valid_and_distinct() {
        assert_eq!(mac_for("eni-123"), mac_for("eni-123"));
        assert_ne!(mac_for("eni-123"), mac_for("eni-124"));
        let m = mac_for("eni-0abc");
        assert_eq!(m[0] & 0x03, 0x02, "locally administered unicast");
        assert_eq!(mac_string(m).len(), 17);
    }
}
