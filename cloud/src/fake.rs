//! An in-memory EC2 for unit tests and the simulator (issue 17): instances, ENIs, addresses,
//! prefixes, subnets and route tables, refusing what AWS refuses with AWS's error codes (the rules
//! the strict EC2 front of `tests/` enforces on LocalStack), the account's two token buckets on
//! tokio's clock (so a paused clock drives them), and optional latency, failures before acting and
//! lost replies after acting.
//!
//! Limits per instance type come from the embedded table ([`crate::limits::static_limits`]).
//! Address picking is EC2's: never an address another interface of the subnet holds, never one
//! of the five AWS reserves; /28 prefixes aligned and clear of every address in use.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::time::Instant;

use crate::budget::{ApiClass, BucketConfig};
use crate::error::{CloudError, LimitKind, Result};
use crate::limits::{InstanceLimits, LimitsSource, static_limits};
use crate::types::*;
use crate::{Discovery, Interfaces, RouteTables};

/// EC2's account-wide buckets (per region): mutating 50 / 5 per s, describe 100 / 20 per s.
pub const ACCOUNT_MUTATING: BucketConfig = BucketConfig { qps: 5.0, burst: 50 };
pub const ACCOUNT_DESCRIBE: BucketConfig = BucketConfig { qps: 20.0, burst: 100 };

/// How strict and how unreliable the fake is.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    pub mutating: BucketConfig,
    pub describe: BucketConfig,
    /// Added to every call (on tokio's clock).
    pub latency: Duration,
    /// Share of calls refused with a 5xx before acting.
    pub fail_rate: f64,
    /// Share of mutating calls that act and then lose their reply (a 5xx after acting).
    pub lost_reply_rate: f64,
    /// Routes per route table (AWS's default quota: 50).
    pub routes_per_table: usize,
    pub seed: u64,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            mutating: ACCOUNT_MUTATING,
            describe: ACCOUNT_DESCRIBE,
            latency: Duration::ZERO,
            fail_rate: 0.0,
            lost_reply_rate: 0.0,
            routes_per_table: 50,
            seed: 1,
        }
    }
}

/// A bucket that refuses when empty (EC2 throttles; it does not queue).
#[derive(Debug)]
struct Bucket {
    cfg: BucketConfig,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(cfg: BucketConfig) -> Self {
        Bucket { cfg, level: f64::from(cfg.burst), at: Instant::now() }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.level = (self.level + now.saturating_duration_since(self.at).as_secs_f64() * self.cfg.qps)
            .min(f64::from(self.cfg.burst));
        self.at = now;
        if self.level >= 1.0 {
            self.level -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Calls as the account saw them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeCounts {
    /// Calls by action, throttled ones included.
    pub calls: BTreeMap<&'static str, u64>,
    pub mutating: u64,
    pub describe: u64,
    pub throttled_mutating: u64,
    pub throttled_describe: u64,
    /// Calls refused by a rule (a limit, a conflict, an unknown id), by AWS's error code.
    pub refused: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct SubnetState {
    subnet: Subnet,
    used: BTreeSet<Ipv4Addr>,
    /// Where the next search for a free address starts (a thousand nodes' ENIs would otherwise
    /// make every pick walk past every used address).
    cursor: u32,
}

#[derive(Debug, Default)]
struct World {
    /// The failure rates now (from the config; a test may change them).
    fail_rate: f64,
    lost_reply_rate: f64,
    vpcs: BTreeMap<String, Vpc>,
    subnets: BTreeMap<String, SubnetState>,
    instances: BTreeMap<String, Instance>,
    enis: BTreeMap<String, Eni>,
    /// Instance id → the ids of the ENIs attached to it (an index over `enis`' attachments).
    attached: BTreeMap<String, BTreeSet<String>>,
    /// (tag key, value) → the ids of the ENIs that carry it (EC2 filters by tag server-side).
    tagged: BTreeMap<(String, String), BTreeSet<String>>,
    tables: BTreeMap<String, RouteTable>,
    next: u64,
    rng: u64,
    counts: FakeCounts,
    /// Refusals queued by a test, by action: the next call of it gets the error (before acting).
    queued: BTreeMap<&'static str, VecDeque<CloudError>>,
}

impl World {
    fn id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}-{:017x}", self.next)
    }

    fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    fn subnet(&mut self, op: &'static str, id: &str) -> Result<&mut SubnetState> {
        self.subnets.get_mut(id).ok_or_else(|| not_found(op, "InvalidSubnetID.NotFound", id))
    }

    fn eni(&self, op: &'static str, id: &str) -> Result<&Eni> {
        self.enis.get(id).ok_or_else(|| not_found(op, "InvalidNetworkInterfaceID.NotFound", id))
    }

    /// The ENIs attached to `instance_id`.
    fn on_instance<'a>(&'a self, instance_id: &str) -> impl Iterator<Item = &'a Eni> + 'a {
        self.attached.get(instance_id).into_iter().flatten().filter_map(|id| self.enis.get(id))
    }

    fn limits_of_eni(&self, eni: &Eni) -> Option<InstanceLimits> {
        let a = eni.attachment.as_ref()?;
        static_limits(&self.instances.get(&a.instance_id)?.instance_type)
    }

    /// `n` free addresses of a subnet, in address order from where the last pick ended, wrapping
    /// around (EC2 picks at random; order does not matter to callers, and determinism helps the
    /// table tests).
    fn pick(&mut self, op: &'static str, subnet_id: &str, n: usize) -> Result<Vec<Ipv4Addr>> {
        let s = self.subnet(op, subnet_id)?;
        let (first, last) = usable(s.subnet.cidr);
        if first > last {
            // Below a /29 no address is usable (EC2 has no subnet below /28 at all).
            return Err(limit(op, LimitKind::SubnetAddresses, "InsufficientFreeAddressesInSubnet", subnet_id));
        }
        let start = s.cursor.clamp(first, last);
        let out: Vec<Ipv4Addr> =
            (start..=last).chain(first..start).map(Ipv4Addr::from).filter(|a| !s.used.contains(a)).take(n).collect();
        if out.len() < n {
            return Err(limit(op, LimitKind::SubnetAddresses, "InsufficientFreeAddressesInSubnet", subnet_id));
        }
        s.used.extend(&out);
        s.cursor = out.last().map_or(start, |a| u32::from(*a).saturating_add(1));
        Ok(out)
    }

    /// `n` aligned /28s of a subnet clear of every used address.
    fn pick_prefixes(&mut self, op: &'static str, subnet_id: &str, n: usize) -> Result<Vec<Ipv4Net>> {
        let s = self.subnet(op, subnet_id)?;
        let mut out = Vec::new();
        // The subnet's /28s from the one the last pick ended at, wrapping around.
        let (net, bcast) = (u32::from(s.subnet.cidr.network()), u32::from(s.subnet.cidr.broadcast()));
        let count = (u64::from(bcast - net) + 1) / 16;
        let from = u64::from(s.cursor.clamp(net, bcast) - net) / 16;
        for i in (from..count).chain(0..from) {
            if out.len() == n {
                break;
            }
            let lo = net + (i * 16) as u32;
            let hi = lo + 15;
            let (first, last) = usable(s.subnet.cidr);
            if lo >= first && hi <= last && (lo..=hi).all(|a| !s.used.contains(&Ipv4Addr::from(a))) {
                out.push(Ipv4Net::new(Ipv4Addr::from(lo), 28).expect("a /28"));
            }
        }
        if out.len() < n {
            return Err(limit(op, LimitKind::SubnetPrefixes, "InsufficientCidrBlocks", subnet_id));
        }
        for p in &out {
            s.used.extend(p.hosts().chain([p.network(), p.broadcast()]));
        }
        s.cursor = out.last().map_or(s.cursor, |p| u32::from(p.broadcast()).saturating_add(1));
        Ok(out)
    }

    fn free(&mut self, subnet_id: &str, ips: &[Ipv4Addr], prefixes: &[Ipv4Net]) {
        if let Some(s) = self.subnets.get_mut(subnet_id) {
            for a in ips {
                s.used.remove(a);
            }
            for p in prefixes {
                for a in u32::from(p.network())..=u32::from(p.broadcast()) {
                    s.used.remove(&Ipv4Addr::from(a));
                }
            }
        }
    }

    fn available(&self, s: &SubnetState) -> u32 {
        let (first, last) = usable(s.subnet.cidr);
        (last - first + 1).saturating_sub(s.used.len() as u32)
    }
}

/// The addresses of a subnet AWS lets interfaces hold: not the network address, the next three,
/// nor the last.
fn usable(cidr: Ipv4Net) -> (u32, u32) {
    (u32::from(cidr.network()) + 4, u32::from(cidr.broadcast()) - 1)
}

fn not_found(op: &'static str, code: &str, what: &str) -> CloudError {
    CloudError::NotFound { op, code: code.into(), message: format!("'{what}' does not exist") }
}

fn limit(op: &'static str, limit: LimitKind, code: &str, message: impl Into<String>) -> CloudError {
    CloudError::LimitReached { op, limit, code: code.into(), message: message.into() }
}

fn refused(op: &'static str, code: &str, message: impl Into<String>) -> CloudError {
    CloudError::from_code(op, code, &message.into(), Some(400))
}

/// The in-memory EC2 of one account and region.
#[derive(Debug)]
pub struct FakeEc2 {
    cfg: FakeConfig,
    world: Mutex<World>,
    buckets: Mutex<(Bucket, Bucket)>,
}

impl FakeEc2 {
    pub fn new(cfg: FakeConfig) -> Self {
        let buckets = Mutex::new((Bucket::new(cfg.mutating), Bucket::new(cfg.describe)));
        let world = Mutex::new(World {
            rng: cfg.seed | 1,
            fail_rate: cfg.fail_rate,
            lost_reply_rate: cfg.lost_reply_rate,
            ..World::default()
        });
        FakeEc2 { cfg, world, buckets }
    }

    /// A VPC with these CIDR blocks, and its main route table.
    pub fn add_vpc(&self, cidrs: &[Ipv4Net]) -> Vpc {
        let mut w = self.world.lock().expect("world");
        let id = w.id("vpc");
        let vpc = Vpc { id: id.clone(), cidrs: cidrs.to_vec() };
        w.vpcs.insert(id.clone(), vpc.clone());
        let rtb = w.id("rtb");
        let routes = cidrs
            .iter()
            .map(|c| Route {
                destination: *c,
                target: RouteTarget::Other("local".into()),
                via_eni: None,
                state: "active".into(),
            })
            .collect();
        w.tables.insert(
            rtb.clone(),
            RouteTable { id: rtb, vpc_id: id, main: true, subnets: vec![], routes, tags: Tags::new() },
        );
        vpc
    }

    pub fn add_subnet(&self, vpc_id: &str, cidr: Ipv4Net, tags: Tags) -> Subnet {
        let mut w = self.world.lock().expect("world");
        let id = w.id("subnet");
        let subnet = Subnet {
            id: id.clone(),
            vpc_id: vpc_id.into(),
            cidr,
            availability_zone: "us-east-1a".into(),
            available_addresses: 0,
            tags,
        };
        w.subnets.insert(id, SubnetState { subnet: subnet.clone(), used: BTreeSet::new(), cursor: 0 });
        subnet
    }

    /// A running instance of `instance_type` with its primary ENI (one address) in the subnet.
    pub fn add_instance(&self, instance_type: &str, subnet_id: &str) -> Instance {
        let mut w = self.world.lock().expect("world");
        let vpc_id = w.subnets[subnet_id].subnet.vpc_id.clone();
        let id = w.id("i");
        let eni_id = w.id("eni");
        let ip = w.pick("RunInstances", subnet_id, 1).expect("a free address for the instance")[0];
        let mac = mac_of(w.next);
        let att = w.id("eni-attach");
        w.enis.insert(
            eni_id.clone(),
            Eni {
                id: eni_id.clone(),
                subnet_id: subnet_id.into(),
                vpc_id: vpc_id.clone(),
                mac_raw: mac,
                description: String::new(),
                primary_ip: ip,
                secondary_ips: vec![],
                prefixes: vec![],
                attachment: Some(Attachment {
                    id: att,
                    instance_id: id.clone(),
                    device_index: 0,
                    status: "attached".into(),
                    delete_on_termination: true,
                }),
                status: "in-use".into(),
                source_dest_check: true,
                security_groups: vec!["sg-0000000000000000a".into()],
                tags: Tags::new(),
            },
        );
        w.attached.entry(id.clone()).or_default().insert(eni_id.clone());
        let inst = Instance {
            id: id.clone(),
            instance_type: instance_type.into(),
            availability_zone: "us-east-1a".into(),
            vpc_id,
            subnet_id: subnet_id.into(),
            security_groups: vec!["sg-0000000000000000a".into()],
            primary_eni: eni_id,
            primary_ip: Some(ip),
            state: "running".into(),
        };
        w.instances.insert(id, inst.clone());
        inst
    }

    /// Tags a route table (underway changes only tables tagged for its cluster).
    pub fn tag_table(&self, table_id: &str, key: &str, value: &str) {
        let mut w = self.world.lock().expect("world");
        if let Some(t) = w.tables.get_mut(table_id) {
            t.tags.insert(key.into(), value.into());
        }
    }

    /// The next call of `op` fails with `e`, before acting.
    pub fn fail_next(&self, op: &'static str, e: CloudError) {
        self.world.lock().expect("world").queued.entry(op).or_default().push_back(e);
    }

    /// Changes the failure rates from now on (a calm spell after a storm).
    pub fn set_rates(&self, fail_rate: f64, lost_reply_rate: f64) {
        let mut w = self.world.lock().expect("world");
        (w.fail_rate, w.lost_reply_rate) = (fail_rate, lost_reply_rate);
    }

    pub fn counts(&self) -> FakeCounts {
        self.world.lock().expect("world").counts.clone()
    }

    /// Every ENI, as EC2 holds it.
    pub fn all_enis(&self) -> Vec<Eni> {
        self.world.lock().expect("world").enis.values().cloned().collect()
    }

    pub fn tables(&self) -> Vec<RouteTable> {
        self.world.lock().expect("world").tables.values().cloned().collect()
    }

    /// Spends the account's budget, waits the latency, and draws the configured failure; then
    /// runs `act` on the world. A lost reply acts and then fails.
    async fn call<T>(&self, op: &'static str, class: ApiClass, act: impl FnOnce(&mut World) -> Result<T>) -> Result<T> {
        if !self.cfg.latency.is_zero() {
            tokio::time::sleep(self.cfg.latency).await;
        }
        let allowed = {
            let mut b = self.buckets.lock().expect("buckets");
            match class {
                ApiClass::Mutating => b.0.take(),
                ApiClass::Describe => b.1.take(),
            }
        };
        let mut w = self.world.lock().expect("world");
        *w.counts.calls.entry(op).or_default() += 1;
        let mutating = class == ApiClass::Mutating;
        if mutating {
            w.counts.mutating += 1
        } else {
            w.counts.describe += 1
        }
        if !allowed {
            if mutating {
                w.counts.throttled_mutating += 1
            } else {
                w.counts.throttled_describe += 1
            }
            return Err(CloudError::Throttled { op, code: "RequestLimitExceeded".into() });
        }
        if let Some(e) = w.queued.get_mut(op).and_then(VecDeque::pop_front) {
            return Err(e);
        }
        let (fail_rate, lost_reply_rate) = (w.fail_rate, w.lost_reply_rate);
        if w.chance(fail_rate) {
            return Err(CloudError::Transient { op, message: "InternalError: injected before acting".into() });
        }
        let lost = mutating && w.chance(lost_reply_rate);
        let r = act(&mut w);
        if let Err(e) = &r {
            let code = match e {
                CloudError::LimitReached { code, .. }
                | CloudError::NotFound { code, .. }
                | CloudError::InUse { code, .. }
                | CloudError::Fatal { code, .. } => code.clone(),
                other => format!("{:?}", other.outcome()),
            };
            *w.counts.refused.entry(code).or_default() += 1;
        }
        match r {
            Ok(_) if lost => {
                Err(CloudError::Transient { op, message: "InternalError: reply lost after acting".into() })
            }
            r => r,
        }
    }
}

fn mac_of(n: u64) -> String {
    let b = n.to_be_bytes();
    format!("02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[3], b[4], b[5], b[6], b[7])
}

fn tags_match(have: &Tags, want: &Tags) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// Addresses (primary included) and prefixes an ENI holds, as AWS counts them against the
/// type's per-ENI limit.
fn slots_used(e: &Eni) -> u32 {
    1 + e.secondary_ips.len() as u32 + e.prefixes.len() as u32
}

impl Discovery for FakeEc2 {
    async fn instance(&self, instance_id: &str) -> Result<Instance> {
        const OP: &str = "DescribeInstances";
        self.call(OP, ApiClass::Describe, |w| {
            w.instances
                .get(instance_id)
                .cloned()
                .ok_or_else(|| not_found(OP, "InvalidInstanceID.NotFound", instance_id))
        })
        .await
    }

    async fn vpc(&self, vpc_id: &str) -> Result<Vpc> {
        const OP: &str = "DescribeVpcs";
        self.call(OP, ApiClass::Describe, |w| {
            w.vpcs.get(vpc_id).cloned().ok_or_else(|| not_found(OP, "InvalidVpcID.NotFound", vpc_id))
        })
        .await
    }

    async fn subnets(&self, ids: &[String]) -> Result<Vec<Subnet>> {
        const OP: &str = "DescribeSubnets";
        self.call(OP, ApiClass::Describe, |w| {
            ids.iter()
                .map(|id| {
                    let s = w.subnets.get(id).ok_or_else(|| not_found(OP, "InvalidSubnetID.NotFound", id))?;
                    Ok(Subnet { available_addresses: w.available(s), ..s.subnet.clone() })
                })
                .collect()
        })
        .await
    }

    async fn subnets_by_tags(&self, vpc_id: &str, tags: &Tags) -> Result<Vec<Subnet>> {
        self.call("DescribeSubnets", ApiClass::Describe, |w| {
            Ok(w.subnets
                .values()
                .filter(|s| s.subnet.vpc_id == vpc_id && tags_match(&s.subnet.tags, tags))
                .map(|s| Subnet { available_addresses: w.available(s), ..s.subnet.clone() })
                .collect())
        })
        .await
    }

    async fn eni(&self, eni_id: &str) -> Result<Eni> {
        const OP: &str = "DescribeNetworkInterfaces";
        self.call(OP, ApiClass::Describe, |w| w.eni(OP, eni_id).cloned()).await
    }

    async fn enis_of_instance(&self, instance_id: &str) -> Result<Vec<Eni>> {
        self.call("DescribeNetworkInterfaces", ApiClass::Describe, |w| {
            let mut v: Vec<Eni> = w.on_instance(instance_id).cloned().collect();
            v.sort_by_key(|e| e.attachment.as_ref().map(|a| a.device_index));
            Ok(v)
        })
        .await
    }

    async fn enis_by_tags(&self, tags: &Tags) -> Result<Vec<Eni>> {
        self.call("DescribeNetworkInterfaces", ApiClass::Describe, |w| {
            // The narrowest tag's ENIs, checked against the rest.
            let narrowest = tags
                .iter()
                .map(|(k, v)| w.tagged.get(&(k.clone(), v.clone())).map_or(0, BTreeSet::len))
                .zip(tags.iter())
                .min_by_key(|(n, _)| *n)
                .map(|(_, kv)| kv);
            Ok(match narrowest {
                Some((k, v)) => w
                    .tagged
                    .get(&(k.clone(), v.clone()))
                    .into_iter()
                    .flatten()
                    .filter_map(|id| w.enis.get(id))
                    .filter(|e| tags_match(&e.tags, tags))
                    .cloned()
                    .collect(),
                None => w.enis.values().cloned().collect(),
            })
        })
        .await
    }

    async fn instance_limits(&self, instance_type: &str) -> Result<(InstanceLimits, LimitsSource)> {
        const OP: &str = "DescribeInstanceTypes";
        self.call(OP, ApiClass::Describe, |_| {
            static_limits(instance_type).map(|l| (l, LimitsSource::Api)).ok_or_else(|| {
                refused(OP, "InvalidInstanceType", format!("The instance type '{instance_type}' does not exist"))
            })
        })
        .await
    }
}

impl Interfaces for FakeEc2 {
    async fn create_eni(&self, req: &CreateEni) -> Result<Eni> {
        const OP: &str = "CreateNetworkInterface";
        req.initial.validate("initial", true)?;
        self.call(OP, ApiClass::Mutating, |w| {
            let vpc_id = w.subnet(OP, &req.subnet_id)?.subnet.vpc_id.clone();
            // The primary first, then the secondaries or prefixes, all or nothing.
            let primary = w.pick(OP, &req.subnet_id, 1)?[0];
            let secondary = match w.pick(OP, &req.subnet_id, req.initial.ips as usize) {
                Ok(s) => s,
                Err(e) => {
                    w.free(&req.subnet_id, &[primary], &[]);
                    return Err(e);
                }
            };
            let prefixes = match w.pick_prefixes(OP, &req.subnet_id, req.initial.prefixes as usize) {
                Ok(p) => p,
                Err(e) => {
                    let mut all = secondary.clone();
                    all.push(primary);
                    w.free(&req.subnet_id, &all, &[]);
                    return Err(e);
                }
            };
            let id = w.id("eni");
            let eni = Eni {
                id: id.clone(),
                subnet_id: req.subnet_id.clone(),
                vpc_id,
                mac_raw: mac_of(w.next),
                description: req.description.clone(),
                primary_ip: primary,
                secondary_ips: secondary,
                prefixes,
                attachment: None,
                status: "available".into(),
                source_dest_check: true,
                security_groups: req.security_groups.clone(),
                tags: req.tags.clone(),
            };
            for (k, v) in &eni.tags {
                w.tagged.entry((k.clone(), v.clone())).or_default().insert(id.clone());
            }
            w.enis.insert(id, eni.clone());
            Ok(eni)
        })
        .await
    }

    async fn attach_eni(&self, eni_id: &str, instance_id: &str, device_index: u32) -> Result<String> {
        const OP: &str = "AttachNetworkInterface";
        self.call(OP, ApiClass::Mutating, |w| {
            let inst = w
                .instances
                .get(instance_id)
                .cloned()
                .ok_or_else(|| not_found(OP, "InvalidInstanceID.NotFound", instance_id))?;
            let eni = w.eni(OP, eni_id)?.clone();
            if eni.attachment.is_some() {
                return Err(refused(OP, "InvalidNetworkInterface.InUse", format!("{eni_id} is already attached")));
            }
            if eni.vpc_id != inst.vpc_id {
                return Err(refused(OP, "InvalidParameterValue", "the ENI and the instance are in different VPCs"));
            }
            let lim = static_limits(&inst.instance_type).unwrap_or(InstanceLimits {
                enis: 1,
                ipv4_per_eni: 1,
                ipv6_per_eni: 0,
                vcpus: 1,
            });
            let on: Vec<u32> =
                w.on_instance(instance_id).filter_map(|e| e.attachment.as_ref().map(|a| a.device_index)).collect();
            if on.contains(&device_index) {
                return Err(refused(
                    OP,
                    "InvalidParameterValue",
                    format!(
                        "Instance '{instance_id}' already has an interface attached at device index '{device_index}'"
                    ),
                ));
            }
            if on.len() as u32 >= lim.enis {
                return Err(limit(
                    OP,
                    LimitKind::EnisPerInstance,
                    "AttachmentLimitExceeded",
                    format!("Interface count {} exceeds the limit for {}", on.len() + 1, inst.instance_type),
                ));
            }
            if slots_used(&eni) > lim.ipv4_per_eni {
                return Err(limit(
                    OP,
                    LimitKind::AddressesPerEni,
                    "PrivateIpAddressLimitExceeded",
                    format!("{eni_id} holds more addresses than {} allows", inst.instance_type),
                ));
            }
            let att = w.id("eni-attach");
            let e = w.enis.get_mut(eni_id).expect("checked");
            e.attachment = Some(Attachment {
                id: att.clone(),
                instance_id: instance_id.into(),
                device_index,
                status: "attached".into(),
                delete_on_termination: false,
            });
            e.status = "in-use".into();
            w.attached.entry(instance_id.to_string()).or_default().insert(eni_id.to_string());
            Ok(att)
        })
        .await
    }

    async fn detach_eni(&self, attachment_id: &str, _force: bool) -> Result<()> {
        const OP: &str = "DetachNetworkInterface";
        self.call(OP, ApiClass::Mutating, |w| {
            let e = w
                .enis
                .values_mut()
                .find(|e| e.attachment.as_ref().is_some_and(|a| a.id == attachment_id))
                .ok_or_else(|| not_found(OP, "InvalidAttachmentID.NotFound", attachment_id))?;
            if e.attachment.as_ref().is_some_and(|a| a.device_index == 0) {
                return Err(refused(OP, "OperationNotPermitted", "The primary network interface cannot be detached"));
            }
            let was = e.attachment.take().map(|a| a.instance_id);
            e.status = "available".into();
            let id = e.id.clone();
            if let Some(set) = was.and_then(|i| w.attached.get_mut(&i)) {
                set.remove(&id);
            }
            Ok(())
        })
        .await
    }

    async fn set_delete_on_termination(&self, eni_id: &str, attachment_id: &str) -> Result<()> {
        const OP: &str = "ModifyNetworkInterfaceAttribute";
        self.call(OP, ApiClass::Mutating, |w| {
            w.eni(OP, eni_id)?;
            match w.enis.get_mut(eni_id).and_then(|e| e.attachment.as_mut()).filter(|a| a.id == attachment_id) {
                Some(a) => {
                    a.delete_on_termination = true;
                    Ok(())
                }
                None => Err(not_found(OP, "InvalidAttachmentID.NotFound", attachment_id)),
            }
        })
        .await
    }

    async fn delete_eni(&self, eni_id: &str) -> Result<()> {
        const OP: &str = "DeleteNetworkInterface";
        self.call(OP, ApiClass::Mutating, |w| {
            let e = w.eni(OP, eni_id)?.clone();
            if e.attachment.is_some() {
                return Err(refused(
                    OP,
                    "InvalidNetworkInterface.InUse",
                    format!("Interface {eni_id} is currently in use"),
                ));
            }
            let mut ips = e.secondary_ips.clone();
            ips.push(e.primary_ip);
            w.free(&e.subnet_id, &ips, &e.prefixes);
            w.enis.remove(eni_id);
            for (k, v) in &e.tags {
                if let Some(set) = w.tagged.get_mut(&(k.clone(), v.clone())) {
                    set.remove(eni_id);
                }
            }
            Ok(())
        })
        .await
    }

    async fn set_source_dest_check(&self, eni_id: &str, enabled: bool) -> Result<()> {
        const OP: &str = "ModifyNetworkInterfaceAttribute";
        self.call(OP, ApiClass::Mutating, |w| {
            w.eni(OP, eni_id)?;
            w.enis.get_mut(eni_id).expect("checked").source_dest_check = enabled;
            Ok(())
        })
        .await
    }

    async fn assign(&self, known: &Eni, count: AddressCount) -> Result<Assigned> {
        const OP: &str = "AssignPrivateIpAddresses";
        count.validate("count", false)?;
        self.call(OP, ApiClass::Mutating, |w| {
            let e = w.eni(OP, &known.id)?.clone();
            if let Some(lim) = w.limits_of_eni(&e)
                && slots_used(&e) + count.ips + count.prefixes > lim.ipv4_per_eni
            {
                let (code, what) = if count.prefixes > 0 {
                    ("PrefixLimitExceeded", "prefixes")
                } else {
                    ("PrivateIpAddressLimitExceeded", "private addresses")
                };
                return Err(limit(
                    OP,
                    LimitKind::AddressesPerEni,
                    code,
                    format!(
                        "Number of {what} will exceed limit: {} + {} > {}",
                        slots_used(&e),
                        count.ips + count.prefixes,
                        lim.ipv4_per_eni
                    ),
                ));
            }
            let ips = w.pick(OP, &e.subnet_id, count.ips as usize)?;
            let prefixes = match w.pick_prefixes(OP, &e.subnet_id, count.prefixes as usize) {
                Ok(p) => p,
                Err(err) => {
                    w.free(&e.subnet_id, &ips, &[]);
                    return Err(err);
                }
            };
            let m = w.enis.get_mut(&known.id).expect("checked");
            m.secondary_ips.extend(&ips);
            m.prefixes.extend(&prefixes);
            Ok(Assigned { ips, prefixes })
        })
        .await
    }

    async fn unassign_ips(&self, eni_id: &str, ips: &[Ipv4Addr]) -> Result<()> {
        const OP: &str = "UnassignPrivateIpAddresses";
        self.call(OP, ApiClass::Mutating, |w| {
            let e = w.eni(OP, eni_id)?.clone();
            if let Some(a) = ips.iter().find(|a| !e.secondary_ips.contains(a)) {
                return Err(refused(
                    OP,
                    "InvalidParameterValue",
                    format!("Some of the specified addresses are not assigned to interface {eni_id}: {a}"),
                ));
            }
            w.enis.get_mut(eni_id).expect("checked").secondary_ips.retain(|a| !ips.contains(a));
            w.free(&e.subnet_id, ips, &[]);
            Ok(())
        })
        .await
    }

    async fn unassign_prefixes(&self, eni_id: &str, prefixes: &[Ipv4Net]) -> Result<()> {
        const OP: &str = "UnassignPrivateIpAddresses";
        self.call(OP, ApiClass::Mutating, |w| {
            let e = w.eni(OP, eni_id)?.clone();
            if let Some(p) = prefixes.iter().find(|p| !e.prefixes.contains(p)) {
                return Err(refused(
                    OP,
                    "InvalidParameterValue",
                    format!("Some of the specified prefixes are not assigned to interface {eni_id}: {p}"),
                ));
            }
            w.enis.get_mut(eni_id).expect("checked").prefixes.retain(|p| !prefixes.contains(p));
            w.free(&e.subnet_id, &[], prefixes);
            Ok(())
        })
        .await
    }
}

impl RouteTables for FakeEc2 {
    async fn route_table(&self, table_id: &str) -> Result<RouteTable> {
        const OP: &str = "DescribeRouteTables";
        self.call(OP, ApiClass::Describe, |w| {
            w.tables.get(table_id).cloned().ok_or_else(|| not_found(OP, "InvalidRouteTableID.NotFound", table_id))
        })
        .await
    }

    async fn route_table_for_subnet(&self, vpc_id: &str, subnet_id: &str) -> Result<RouteTable> {
        const OP: &str = "DescribeRouteTables";
        self.call(OP, ApiClass::Describe, |w| {
            let of_vpc = || w.tables.values().filter(|t| t.vpc_id == vpc_id);
            of_vpc()
                .find(|t| t.subnets.iter().any(|s| s == subnet_id))
                .or_else(|| of_vpc().find(|t| t.main))
                .cloned()
                .ok_or_else(|| not_found(OP, "InvalidRouteTableID.NotFound", vpc_id))
        })
        .await
    }

    async fn ensure_route(
        &self,
        vpc: &Vpc,
        table_id: &str,
        destination: Ipv4Net,
        target: &RouteTarget,
    ) -> Result<RouteChange> {
        const OP: &str = "CreateRoute";
        self.call(OP, ApiClass::Mutating, |w| {
            let route = route_to(w, OP, vpc, destination, target)?;
            let max = self.cfg.routes_per_table;
            let t =
                w.tables.get_mut(table_id).ok_or_else(|| not_found(OP, "InvalidRouteTableID.NotFound", table_id))?;
            if let Some(r) = t.routes.iter().find(|r| r.destination == destination) {
                return if r.points_to(target) {
                    Ok(RouteChange::Unchanged)
                } else {
                    Err(refused(
                        OP,
                        "RouteAlreadyExists",
                        format!("The route identified by {destination} already exists ({:?})", r.target),
                    ))
                };
            }
            // The quota counts the routes added, not the VPC's local ones.
            if t.routes.iter().filter(|r| r.target != RouteTarget::Other("local".into())).count() >= max {
                return Err(limit(
                    OP,
                    LimitKind::RoutesPerTable,
                    "RouteLimitExceeded",
                    format!("The maximum number of routes ({max}) has been reached for {table_id}"),
                ));
            }
            t.routes.push(route);
            Ok(RouteChange::Created)
        })
        .await
    }

    async fn replace_route(&self, vpc: &Vpc, table_id: &str, destination: Ipv4Net, target: &RouteTarget) -> Result<()> {
        const OP: &str = "ReplaceRoute";
        self.call(OP, ApiClass::Mutating, |w| {
            let route = route_to(w, OP, vpc, destination, target)?;
            let t =
                w.tables.get_mut(table_id).ok_or_else(|| not_found(OP, "InvalidRouteTableID.NotFound", table_id))?;
            let r = t
                .routes
                .iter_mut()
                .find(|r| r.destination == destination)
                .ok_or_else(|| not_found(OP, "InvalidRoute.NotFound", &destination.to_string()))?;
            *r = route;
            Ok(())
        })
        .await
    }

    async fn delete_route(&self, table_id: &str, destination: Ipv4Net) -> Result<()> {
        const OP: &str = "DeleteRoute";
        self.call(OP, ApiClass::Mutating, |w| {
            let t =
                w.tables.get_mut(table_id).ok_or_else(|| not_found(OP, "InvalidRouteTableID.NotFound", table_id))?;
            let before = t.routes.len();
            t.routes.retain(|r| r.destination != destination);
            if t.routes.len() == before {
                return Err(not_found(OP, "InvalidRoute.NotFound", &destination.to_string()));
            }
            Ok(())
        })
        .await
    }
}

/// A route AWS accepts: its destination outside every CIDR block of the VPC, its target an ENI
/// that exists, or an instance with exactly one ENI (AWS refuses an instance target with more).
fn route_to(w: &World, op: &'static str, vpc: &Vpc, destination: Ipv4Net, target: &RouteTarget) -> Result<Route> {
    if vpc.cidrs.iter().any(|c| c.contains(&destination)) {
        return Err(refused(
            op,
            "InvalidParameterValue",
            format!(
                "The destination CIDR block {destination} is equal to or more specific than one of this VPC's CIDR blocks"
            ),
        ));
    }
    let via_eni = match target {
        RouteTarget::Eni(id) => Some(w.eni(op, id)?.id.clone()),
        RouteTarget::Instance(id) => {
            let on: Vec<&Eni> = w.on_instance(id).collect();
            match on.as_slice() {
                [] => return Err(not_found(op, "InvalidInstanceID.NotFound", id)),
                [one] => Some(one.id.clone()),
                _ => {
                    return Err(refused(
                        op,
                        "InvalidInstanceID",
                        format!(
                            "There are multiple interfaces attached to instance '{id}'. Please specify an interface ID for the operation instead."
                        ),
                    ));
                }
            }
        }
        RouteTarget::Other(_) => None,
    };
    Ok(Route { destination, target: target.clone(), via_eni, state: "active".into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(cfg: FakeConfig) -> (FakeEc2, Vpc, Subnet, Instance) {
        let ec2 = FakeEc2::new(cfg);
        let vpc = ec2.add_vpc(&["10.0.0.0/16".parse().unwrap()]);
        let subnet = ec2.add_subnet(&vpc.id, "10.0.0.0/24".parse().unwrap(), Tags::new());
        let node = ec2.add_instance("t3.medium", &subnet.id); // 3 ENIs × 6 IPv4
        (ec2, vpc, subnet, node)
    }

    fn create(subnet: &Subnet, initial: AddressCount) -> CreateEni {
        CreateEni {
            subnet_id: subnet.id.clone(),
            security_groups: vec![],
            description: String::new(),
            tags: eni_tags("c1", "i-1", 0),
            initial,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refuses_what_aws_refuses_with_its_codes() {
        let (ec2, vpc, subnet, node) = world(FakeConfig::default());
        let primary = ec2.eni(&node.primary_eni).await.unwrap();
        let got = ec2.assign(&primary, AddressCount::ips(5)).await.unwrap();
        assert_eq!(got.ips.len(), 5);
        let primary = ec2.eni(&node.primary_eni).await.unwrap();
        let e = ec2.assign(&primary, AddressCount::ips(1)).await.unwrap_err();
        assert!(
            matches!(&e, CloudError::LimitReached { limit: LimitKind::AddressesPerEni, code, .. } if code == "PrivateIpAddressLimitExceeded"),
            "{e}"
        );

        let eni = ec2.create_eni(&create(&subnet, AddressCount::ips(2))).await.unwrap();
        let e = ec2.attach_eni(&eni.id, &node.id, 0).await.unwrap_err();
        assert!(e.to_string().contains("device index"), "{e}");
        let att = ec2.attach_eni(&eni.id, &node.id, 1).await.unwrap();
        let dot = |e: Eni| e.attachment.expect("attached").delete_on_termination;
        assert!(!dot(ec2.eni(&eni.id).await.unwrap()), "an attach leaves delete-on-termination off, as EC2 does");
        ec2.set_delete_on_termination(&eni.id, &att).await.unwrap();
        assert!(dot(ec2.eni(&eni.id).await.unwrap()));
        assert!(matches!(ec2.delete_eni(&eni.id).await, Err(CloudError::InUse { .. })));
        let third = ec2.create_eni(&create(&subnet, AddressCount::default())).await.unwrap();
        ec2.attach_eni(&third.id, &node.id, 2).await.unwrap();
        let fourth = ec2.create_eni(&create(&subnet, AddressCount::default())).await.unwrap();
        let e = ec2.attach_eni(&fourth.id, &node.id, 3).await.unwrap_err();
        assert!(matches!(e, CloudError::LimitReached { limit: LimitKind::EnisPerInstance, .. }), "{e}");
        ec2.detach_eni(&att, false).await.unwrap();
        ec2.delete_eni(&eni.id).await.unwrap();
        assert!(matches!(ec2.eni(&eni.id).await, Err(CloudError::NotFound { .. })));

        let e = ec2.unassign_ips(&node.primary_eni, &["10.0.0.250".parse().unwrap()]).await.unwrap_err();
        assert!(matches!(&e, CloudError::Fatal { code, .. } if code == "InvalidParameterValue"), "{e}");

        // Routes: not inside the VPC, not to an instance with several ENIs, 50 at most.
        let table = ec2.route_table_for_subnet(&vpc.id, &subnet.id).await.unwrap();
        let to = RouteTarget::Eni(node.primary_eni.clone());
        let e = ec2.ensure_route(&vpc, &table.id, "10.0.8.0/24".parse().unwrap(), &to).await.unwrap_err();
        assert!(e.to_string().contains("more specific than one of this VPC's CIDR blocks"), "{e}");
        let e = ec2
            .ensure_route(&vpc, &table.id, "100.64.0.0/24".parse().unwrap(), &RouteTarget::Instance(node.id.clone()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("multiple interfaces"), "{e}");
        let dst: Ipv4Net = "100.64.0.0/24".parse().unwrap();
        assert_eq!(ec2.ensure_route(&vpc, &table.id, dst, &to).await.unwrap(), RouteChange::Created);
        assert_eq!(ec2.ensure_route(&vpc, &table.id, dst, &to).await.unwrap(), RouteChange::Unchanged);
        let other = RouteTarget::Eni(third.id.clone());
        assert!(matches!(ec2.ensure_route(&vpc, &table.id, dst, &other).await, Err(CloudError::InUse { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn addresses_are_never_given_twice_and_the_subnet_runs_out() {
        let (ec2, _vpc, subnet, node) = world(FakeConfig::default());
        let mut seen = BTreeSet::from([node.primary_ip.unwrap()]);
        let mut made = 0;
        loop {
            match ec2.create_eni(&create(&subnet, AddressCount::ips(9))).await {
                Ok(e) => {
                    made += 1;
                    for a in e.secondary_ips.iter().chain([&e.primary_ip]) {
                        assert!(seen.insert(*a), "{a} given twice");
                        assert!(subnet.cidr.contains(a));
                    }
                }
                Err(e) => {
                    assert!(matches!(e, CloudError::LimitReached { limit: LimitKind::SubnetAddresses, .. }), "{e}");
                    break;
                }
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // 256 − 5 reserved − the node's address = 250 = 25 ENIs of 10.
        assert_eq!(made, 25);
        let s = &ec2.subnets(std::slice::from_ref(&subnet.id)).await.unwrap()[0];
        assert_eq!(s.available_addresses, 0);
        // A subnet with no usable address at all (a /30) is a refusal too, not a panic.
        let tiny = ec2.add_subnet(&subnet.vpc_id, "10.0.9.0/30".parse().unwrap(), Tags::new());
        let e = ec2.create_eni(&create(&tiny, AddressCount::ips(1))).await.unwrap_err();
        assert!(matches!(e, CloudError::LimitReached { limit: LimitKind::SubnetAddresses, .. }), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn prefixes_are_aligned_and_clear_of_used_addresses() {
        let (ec2, _vpc, subnet, _node) = world(FakeConfig::default());
        let eni = ec2.create_eni(&create(&subnet, AddressCount::prefixes(3))).await.unwrap();
        for p in &eni.prefixes {
            assert_eq!(p.prefix_len(), 28);
            assert!(!p.contains(&eni.primary_ip) && !p.contains(&Ipv4Addr::new(10, 0, 0, 4)), "{p}");
        }
        ec2.unassign_prefixes(&eni.id, &eni.prefixes[..1]).await.unwrap();
        assert_eq!(ec2.eni(&eni.id).await.unwrap().prefixes.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_account_bucket_throttles_and_refills_on_the_clock() {
        let (ec2, _vpc, subnet, _node) = world(FakeConfig::default());
        let req = create(&subnet, AddressCount::default());
        let mut ok = 0;
        for _ in 0..60 {
            if ec2.create_eni(&req).await.is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, 50, "the burst");
        let c = ec2.counts();
        assert_eq!((c.mutating, c.throttled_mutating), (60, 10));
        tokio::time::advance(Duration::from_secs(2)).await;
        let again = futures_count(&ec2, &req, 12).await;
        assert_eq!(again, 10, "5 per second for 2 s");
    }

    async fn futures_count(ec2: &FakeEc2, req: &CreateEni, n: usize) -> usize {
        let mut ok = 0;
        for _ in 0..n {
            if ec2.create_eni(req).await.is_ok() {
                ok += 1;
            }
        }
        ok
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_reply_acts_and_a_failure_before_does_not() {
        let (ec2, _vpc, subnet, node) = world(FakeConfig { lost_reply_rate: 1.0, ..FakeConfig::default() });
        let primary = ec2.eni(&node.primary_eni).await.unwrap();
        let e = ec2.assign(&primary, AddressCount::ips(2)).await.unwrap_err();
        assert!(matches!(e, CloudError::Transient { .. }));
        assert_eq!(ec2.eni(&node.primary_eni).await.unwrap().secondary_ips.len(), 2, "it acted");
        let (ec2, ..) = world(FakeConfig { fail_rate: 1.0, ..FakeConfig::default() });
        assert!(ec2.create_eni(&create(&subnet, AddressCount::ips(1))).await.is_err());
        assert!(ec2.all_enis().len() == 1, "only the node's primary");
    }
}
