//! ipamd's configuration: one typed struct with defaults, read from a TOML file with
//! `UNDERWAY_*` environment overrides, and validated before anything starts. Every error names the
//! field it is about.
//!
//! Environment overrides use `__` between levels: `UNDERWAY_CLUSTER=demo`,
//! `UNDERWAY_TARGETS__WARM_IP_TARGET=5`, `UNDERWAY_CLOUD__ENDPOINT=http://127.0.0.1:4566`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;
use ipnet::Ipv4Net;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use underway_cloud::aws::Ec2Config;

use crate::error::IpamdError;
use crate::targets::Targets;

/// How this node gets its pod addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Secondary IPs (or /28 prefixes) on ENIs attached to the node.
    Eni,
    /// The node owns a pod CIDR; the VPC routes it to the node.
    VpcRoute,
}

/// VPC-route mode: the node's pod CIDR and the route tables that carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct VpcRouteConfig {
    /// This node's pod CIDR (standalone only: with Kubernetes it is the Node's `spec.podCIDR`, and
    /// an UnderwayPool must not set it). It must lie outside every VPC CIDR block (AWS refuses a
    /// route inside the VPC unless it is a whole subnet to an interface), e.g. in 100.64.0.0/10.
    pub pod_cidr: Option<Ipv4Net>,
    /// Route tables to keep "pod CIDR → this node's primary ENI" in. Empty: the table associated
    /// with the node's subnet, else the VPC's main table. Each must carry the tag
    /// `underway.io/cluster = <cluster>` (ipamd refuses an untagged table before any change).
    pub route_tables: Vec<String>,
    /// Routes a table may hold (AWS: 50 by default, up to 1,000). LocalStack enforces none.
    pub route_table_capacity: u32,
    /// The cluster's pod CIDRs (outside every VPC block): the route GC only ever deletes routes
    /// inside it.
    pub cluster_cidr: Option<Ipv4Net>,
    /// How often the routes are checked again.
    pub check_interval_ms: u64,
}

impl Default for VpcRouteConfig {
    fn default() -> Self {
        VpcRouteConfig {
            pod_cidr: None,
            route_tables: Vec::new(),
            route_table_capacity: 50,
            cluster_cidr: None,
            check_interval_ms: 60_000,
        }
    }
}

/// The node's CNI configuration, which ipamd installs once it serves (so a kubelet keeps the node
/// NotReady until pod networking works, as the AWS VPC CNI does).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CniInstallConfig {
    /// The runtime's CNI config directory (e.g. /etc/cni/net.d). `None`: ipamd installs nothing.
    pub conf_dir: Option<PathBuf>,
    /// The conflist to install there (its file name is kept).
    pub conflist: Option<PathBuf>,
}

/// A named node pool: what a node that selects it runs with. The same type is the `[pools.<name>]`
/// table of the config file and the spec of the cluster-scoped `UnderwayPool` custom resource (a
/// node picks it by the label `kubernetes.pool_label`); `underway-ipamd crd` prints its definition.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "underway.dev",
    version = "v1alpha1",
    kind = "UnderwayPool",
    plural = "underwaypools",
    shortname = "uwpool",
    doc = "A node pool's network settings: mode, targets, ENI subnets and security groups, VPC route tables.",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#
)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    pub mode: Mode,
    #[serde(default)]
    pub targets: Targets,
    #[serde(default)]
    pub eni: EniConfig,
    #[serde(default)]
    pub vpc_route: VpcRouteConfig,
}

/// Where the node learns who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentitySource {
    /// The instance metadata service (IMDSv2).
    Imds,
    /// A fixed instance id; the rest comes from EC2 (tests, or nodes without IMDS). ENI MACs come
    /// from the EC2 API then, which must report well-formed ones.
    Static,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    pub source: IdentitySource,
    /// IMDS endpoint override (default: the SDK's, `AWS_EC2_METADATA_SERVICE_ENDPOINT`).
    pub imds_endpoint: Option<String>,
    /// The instance id (`source = "static"` only).
    pub instance_id: Option<String>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig { source: IdentitySource::Imds, imds_endpoint: None, instance_id: None }
    }
}

/// Who translates pods' traffic to the world outside the VPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnatMode {
    /// This node: to its primary ENI's primary address (which the internet gateway maps to the
    /// instance's public address).
    Node,
    /// Something outside the node (a NAT gateway): pod addresses leave untranslated.
    External,
}

/// Port randomisation of the node's SNAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnatRandom {
    FullyRandom,
    Random,
    None,
}

/// underway's nftables table on the node: pod egress SNAT and anti-spoofing on pod veths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressConfig {
    /// Install the table (both parts). Off only when something else does both.
    pub enabled: bool,
    pub snat: SnatMode,
    /// Destinations never translated besides the VPC's blocks and (VPC-route mode) the cluster's
    /// pod CIDR: peered networks, on-premises ranges. Each must be an IPv4 CIDR.
    pub exclude: Vec<String>,
    pub random: SnatRandom,
    /// How often the VPC's CIDR blocks are read again (a block added later is exempt without a
    /// restart).
    pub refresh_ms: u64,
    /// NodePort and hostPort reach pods on secondary ENIs (their replies leave by the primary
    /// ENI). Needs `snat = "node"`.
    pub node_port: bool,
    /// The single mark bit underway sets (masked, other bits kept). Not one kube-proxy (0x4000,
    /// 0x8000) or Calico (its default 0xffff0000 mask) uses; Cilium's identity marks (0x0f00,
    /// 0xf000 …, Cilium #21330) clash with 0x100–0x800 and 0x1000+ in some modes: keep 0x80.
    pub mark: u32,
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            enabled: true,
            snat: SnatMode::Node,
            exclude: Vec::new(),
            random: SnatRandom::FullyRandom,
            refresh_ms: 60_000,
            node_port: true,
            mark: 0x80,
        }
    }
}

impl EgressConfig {
    /// The exclusions, parsed (validation has checked them).
    pub fn exclusions(&self) -> Vec<ipnet::Ipv4Net> {
        self.exclude.iter().filter_map(|c| c.parse().ok()).collect()
    }
}

/// How new ENIs are made and set up (ENI mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EniConfig {
    /// Subnets for new ENIs, by id. Empty (and no `subnet_tags`): the node's own subnet.
    pub subnets: Vec<String>,
    /// Subnets for new ENIs, by tags (all must match), in the node's VPC and availability zone.
    pub subnet_tags: BTreeMap<String, String>,
    /// Security groups for new ENIs. Empty: those of the node's primary ENI.
    pub security_groups: Vec<String>,
    /// A secondary ENI at device index N gets policy route table `route_table_base + N`.
    pub route_table_base: u32,
    /// How long one step waits for an attached ENI's link to appear on the node.
    pub link_wait_ms: u64,
    /// An attached ENI whose link has not appeared for this long (since it was attached or
    /// adopted) is given up: detached, deleted (or left detached for the leaked-ENI GC) and
    /// recorded. At least `link_wait_ms`.
    pub pending_give_up_ms: u64,
    /// How long a subnet that reported no free addresses is skipped.
    pub subnet_pause_ms: u64,
    /// An ENI this cluster made for this node is deleted once it is detached and was created
    /// (its `underway.io/created-at` tag) at least this long ago.
    pub leak_grace_ms: u64,
    /// How often the leaked-ENI GC runs.
    pub gc_interval_ms: u64,
    /// How often the pool is compared with EC2 again (one DescribeNetworkInterfaces, through the
    /// rate budget) and repaired both ways.
    pub recheck_interval_ms: u64,
    /// MTU of ENI links and pod veths.
    pub mtu: u32,
}

impl Default for EniConfig {
    fn default() -> Self {
        EniConfig {
            subnets: Vec::new(),
            subnet_tags: BTreeMap::new(),
            security_groups: Vec::new(),
            route_table_base: 100,
            link_wait_ms: 60_000,
            pending_give_up_ms: 600_000,
            subnet_pause_ms: 600_000,
            leak_grace_ms: 300_000,
            gc_interval_ms: 60_000,
            recheck_interval_ms: 300_000,
            mtu: 9001,
        }
    }
}

/// The Kubernetes integration (off: ipamd runs standalone from this file alone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Talk to the API server (in-cluster service account, else `KUBECONFIG`).
    pub enabled: bool,
    /// This node's name (the DaemonSet passes `spec.nodeName`). Required when enabled.
    pub node_name: Option<String>,
    /// The Node label naming this node's pool: an UnderwayPool of that name, else `[pools.<name>]`.
    pub pool_label: String,
    /// Create an Event on a pod whose Add failed, with the reason.
    pub events: bool,
    /// How often the cluster's Node count is read (one list of one Node's metadata), so that
    /// the EC2 budget shares the account's refill with that many nodes
    /// (`cloud.rate_budget.share_of`, which wins when set; not with `rate_budget.adaptive`).
    /// 0: never.
    pub node_count_interval_ms: u64,
    pub gc: ClusterGcConfig,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            enabled: false,
            node_name: None,
            pool_label: "underway.dev/pool".into(),
            events: true,
            node_count_interval_ms: 60_000,
            gc: ClusterGcConfig::default(),
        }
    }
}

/// Cluster-wide GC (routes and ENIs of nodes that are gone), run by the one ipamd that holds a
/// coordination.k8s.io Lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterGcConfig {
    pub enabled: bool,
    pub lease_namespace: String,
    pub lease_name: String,
    /// A holder that has not renewed for this long loses the Lease.
    pub lease_duration_s: u32,
    /// How often the holder runs the GC.
    pub interval_ms: u64,
}

impl Default for ClusterGcConfig {
    fn default() -> Self {
        ClusterGcConfig {
            enabled: true,
            lease_namespace: "kube-system".into(),
            lease_name: "underway-cluster-gc".into(),
            lease_duration_s: 60,
            interval_ms: 300_000,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub mode: Mode,
    /// Tags every ENI this daemon creates, so GC finds only its own.
    pub cluster: String,
    pub identity: IdentityConfig,
    pub cloud: Ec2Config,
    /// The RPC socket for the CNI binary (0600, in a 0700 directory; a directory group or others
    /// can write is refused).
    pub socket: PathBuf,
    /// A connection's request must arrive within this.
    pub rpc_read_timeout_ms: u64,
    /// `/healthz` (and `underway-ipamd health`, the liveness probe) fails once the reconciler has
    /// finished no sync attempt or step for this long.
    pub health_stall_ms: u64,
    /// Where the durable store lives (0700; the state file 0600).
    pub state_dir: PathBuf,
    /// Where the node's sysctls are (`/proc/sys`); in the DaemonSet `/host/proc/sys`, with the
    /// node's `/proc/sys/net` mounted writable beneath it (the container's own is read-only).
    pub proc_sys: PathBuf,
    /// An assignment whose pod's host veth and network namespace are both gone is reclaimed once
    /// it is this old (the runtime's DEL never came: containerd 1.6/1.7 send no CNI GC). 0 turns
    /// the sweep off; otherwise at least 1000 (below a minute only for tests: an ADD in flight
    /// has its netns but not yet its veth).
    pub orphan_grace_ms: u64,
    pub targets: Targets,
    pub eni: EniConfig,
    pub vpc_route: VpcRouteConfig,
    pub cni: CniInstallConfig,
    pub egress: EgressConfig,
    pub kubernetes: KubernetesConfig,
    /// Named node pools, each with its mode, subnets, security groups and targets.
    pub pools: BTreeMap<String, PoolSpec>,
    /// The pool this node belongs to: its `mode`, `targets`, `eni` and `vpc_route` replace the
    /// top-level ones.
    pub pool: Option<String>,
    /// A released address is not handed out again for this long.
    pub cooldown_ms: u64,
    /// With IP targets, free addresses over the target go back to EC2 only once a surplus has
    /// lasted this long (0: at once). Under pod churn the surplus is the addresses whose
    /// cooldown just ended, and the next Add takes one again: giving it back at once cost an
    /// unassign and then an assign per pod (the AWS VPC CNI decreases its pool at most every
    /// 30 s for the same reason).
    pub release_hold_ms: u64,
    /// How long an Add waits for an address when the pool is empty.
    pub add_wait_ms: u64,
    /// Bursts of pool changes within this window are decided on once.
    pub reconcile_min_interval_ms: u64,
    /// The reconciler also runs this often with nothing to trigger it.
    pub reconcile_interval_ms: u64,
    /// Host veth prefix, as in the CNI conflist (`vethPrefix`): lets ipamd match host state.
    pub veth_prefix: String,
    /// Prometheus text on `GET /metrics`; `None` turns it off.
    pub metrics_listen: Option<SocketAddr>,
    /// JSON introspection on `GET /v1/...`; `None` turns it off. Keep it on loopback.
    pub introspection_listen: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Eni,
            cluster: String::new(),
            identity: IdentityConfig::default(),
            cloud: Ec2Config::default(),
            socket: PathBuf::from(underway_api::DEFAULT_SOCKET),
            rpc_read_timeout_ms: 10_000,
            health_stall_ms: 600_000,
            state_dir: PathBuf::from("/var/lib/underway"),
            orphan_grace_ms: 600_000,
            proc_sys: PathBuf::from("/proc/sys"),
            targets: Targets::default(),
            eni: EniConfig::default(),
            vpc_route: VpcRouteConfig::default(),
            cni: CniInstallConfig::default(),
            egress: EgressConfig::default(),
            kubernetes: KubernetesConfig::default(),
            pools: BTreeMap::new(),
            pool: None,
            cooldown_ms: 30_000,
            release_hold_ms: 30_000,
            add_wait_ms: 15_000,
            reconcile_min_interval_ms: 20,
            reconcile_interval_ms: 5_000,
            veth_prefix: "uw".into(),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 61780))),
            introspection_listen: Some(SocketAddr::from(([127, 0, 0, 1], 61781))),
        }
    }
}

/// A DNS-1123 subdomain: what Kubernetes accepts as most object names.
fn dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

fn invalid(field: &str, reason: impl Into<String>) -> IpamdError {
    IpamdError::Config { field: field.to_string(), reason: reason.into() }
}

/// A label value (what a pool's name is on the Node): 1–63 of [A-Za-z0-9._-], alphanumeric at
/// both ends.
fn label_value(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// The sections a pool sets, each checked on its own; `at` is where they live (`""` at the top
/// level, `pools.<name>.` in a pool), so every error names the field as the file spells it.
fn check_pool_sections(
    at: &str,
    mode: Mode,
    targets: &Targets,
    eni: &EniConfig,
    vpc_route: &VpcRouteConfig,
    pod_cidr_required: bool,
) -> Result<(), IpamdError> {
    check_targets(&format!("{at}targets."), targets)?;
    eni.check(&format!("{at}eni."))?;
    if mode == Mode::VpcRoute {
        vpc_route.check(&format!("{at}vpc_route."), pod_cidr_required)?;
    }
    Ok(())
}

fn check_targets(at: &str, t: &Targets) -> Result<(), IpamdError> {
    if t.max_eni == Some(0) {
        return Err(invalid(&format!("{at}max_eni"), "must be at least 1 (the primary ENI)"));
    }
    if t.prefix_mode && !t.ip_targets() && t.warm_prefix_target == 0 {
        return Err(invalid(&format!("{at}warm_prefix_target"), "0 with no IP target keeps no free address at all"));
    }
    Ok(())
}

impl EgressConfig {
    fn check(&self) -> Result<(), IpamdError> {
        for (i, c) in self.exclude.iter().enumerate() {
            if c.parse::<ipnet::Ipv4Net>().is_err() {
                return Err(invalid(&format!("egress.exclude[{i}]"), format!("{c:?} is not an IPv4 CIDR (a.b.c.d/n)")));
            }
        }
        if self.refresh_ms < 1_000 {
            return Err(invalid("egress.refresh_ms", "at least 1000"));
        }
        let m = self.mark;
        if m.count_ones() != 1 {
            return Err(invalid("egress.mark", format!("{m:#x}: exactly one bit")));
        }
        if m & 0xc000 != 0 {
            return Err(invalid("egress.mark", format!("{m:#x} is kube-proxy's (0x4000 masquerade, 0x8000 drop)")));
        }
        if m & 0xffff_0000 != 0 {
            return Err(invalid("egress.mark", format!("{m:#x} is inside Calico's default mark mask 0xffff0000")));
        }
        Ok(())
    }
}

impl EniConfig {
    /// Ranges and ids; `at` is the section's place (`eni.` or `pools.<name>.eni.`).
    fn check(&self, at: &str) -> Result<(), IpamdError> {
        let f = |field: &str| format!("{at}{field}");
        for s in &self.subnets {
            underway_cloud::check_id("subnets", s, "subnet-").map_err(|e| invalid(&f("subnets"), e.to_string()))?;
        }
        if !self.subnets.is_empty() && !self.subnet_tags.is_empty() {
            return Err(invalid(&f("subnet_tags"), "give subnets by id or by tags, not both"));
        }
        for g in &self.security_groups {
            underway_cloud::check_id("security_groups", g, "sg-")
                .map_err(|e| invalid(&f("security_groups"), e.to_string()))?;
        }
        if !(1..=30_000).contains(&self.route_table_base) {
            return Err(invalid(&f("route_table_base"), "must be within 1..=30000 (tables 253–255 are the kernel's)"));
        }
        if !(576..=9001).contains(&self.mtu) {
            return Err(invalid(&f("mtu"), format!("{} is outside 576..=9001", self.mtu)));
        }
        if self.pending_give_up_ms < self.link_wait_ms {
            return Err(invalid(&f("pending_give_up_ms"), "at least link_wait_ms"));
        }
        if self.recheck_interval_ms < 1_000 {
            return Err(invalid(&f("recheck_interval_ms"), "at least 1000 (each re-check is a describe call)"));
        }
        if self.gc_interval_ms == 0 {
            return Err(invalid(&f("gc_interval_ms"), "must be > 0"));
        }
        Ok(())
    }
}

impl VpcRouteConfig {
    /// The pod CIDR and its tables; `at` is the section's place. `pod_cidr_required`: this node
    /// runs standalone with this section (with Kubernetes the Node's `spec.podCIDR` fills it in
    /// before the effective config is validated again, `k8s::node::effective`).
    fn check(&self, at: &str, pod_cidr_required: bool) -> Result<(), IpamdError> {
        let f = |field: &str| format!("{at}{field}");
        match self.pod_cidr {
            None if pod_cidr_required => {
                return Err(invalid(&f("pod_cidr"), "required in vpc-route mode (standalone)"));
            }
            None => {}
            Some(c) if !(16..=28).contains(&c.prefix_len()) => {
                return Err(invalid(&f("pod_cidr"), format!("{c}: between /16 and /28")));
            }
            Some(c) if c.network() != c.addr() => {
                return Err(invalid(&f("pod_cidr"), format!("{c} has host bits set (did you mean {}?)", c.trunc())));
            }
            Some(c) if self.cluster_cidr.is_some_and(|cl| !cl.contains(&c)) => {
                return Err(invalid(&f("cluster_cidr"), format!("does not contain pod_cidr {c}")));
            }
            _ => {}
        }
        if !(1..=1000).contains(&self.route_table_capacity) {
            return Err(invalid(&f("route_table_capacity"), "1..=1000 (AWS allows at most 1,000 routes a table)"));
        }
        for t in &self.route_tables {
            underway_cloud::check_id("route_tables", t, "rtb-")
                .map_err(|e| invalid(&f("route_tables"), e.to_string()))?;
        }
        if self.check_interval_ms == 0 {
            return Err(invalid(&f("check_interval_ms"), "must be > 0"));
        }
        Ok(())
    }
}

impl Config {
    /// Defaults, then the file (when given), then `UNDERWAY_*` variables from `env`.
    pub fn load(file: Option<&Path>, env: &[(String, String)]) -> Result<Config, IpamdError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = file {
            if !f.exists() {
                return Err(invalid("--config", format!("{} does not exist", f.display())));
            }
            fig = fig.merge(Toml::file(f));
        }
        // The environment is passed in (not read here), so tests need not mutate the process's.
        // Only variables naming a config field count: other UNDERWAY_* variables (the CNI's, a
        // test harness's) are not ours.
        let fields = serde_json::to_value(Config::default()).expect("config serialises");
        let is_field = |path: &str| fields.get(path.split('.').next().unwrap_or_default()).is_some();
        for (k, v) in env {
            if let Some(rest) = k.strip_prefix("UNDERWAY_")
                && is_field(&rest.to_ascii_lowercase().replace("__", "."))
            {
                let path = rest.to_ascii_lowercase().replace("__", ".");
                let value: Value = v.parse().unwrap_or_else(|never| match never {});
                fig = fig.merge(Serialized::default(&path, value));
            }
        }
        let mut cfg: Config = fig.extract().map_err(|e| {
            let field = e.path.join(".");
            let field = if field.is_empty() { "config".to_string() } else { field };
            invalid(&field, e.kind.to_string())
        })?;
        if cfg.pool.is_some() {
            // The selected pool's sections replace the top-level ones here, yet those are the
            // settings of every node that selects none: checked all the same.
            check_pool_sections("", cfg.mode, &cfg.targets, &cfg.eni, &cfg.vpc_route, false)?;
        }
        cfg.select_pool()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies the selected pool's settings over the top-level ones.
    pub fn select_pool(&mut self) -> Result<(), IpamdError> {
        let Some(name) = &self.pool else { return Ok(()) };
        let Some(p) = self.pools.get(name).cloned() else {
            let have: Vec<&String> = self.pools.keys().collect();
            return Err(invalid("pool", format!("no pool named {name:?} (pools: {have:?})")));
        };
        self.mode = p.mode;
        self.targets = p.targets;
        self.eni = p.eni;
        self.vpc_route = p.vpc_route;
        Ok(())
    }

    /// Checks what types cannot: ranges, names and relations between fields.
    pub fn validate(&self) -> Result<(), IpamdError> {
        if self.cluster.is_empty()
            || self.cluster.len() > 63
            || !self.cluster.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(invalid("cluster", format!("{:?}: 1–63 characters of [A-Za-z0-9._-]", self.cluster)));
        }
        let id = &self.identity;
        match (id.source, &id.instance_id) {
            (IdentitySource::Static, None) => {
                return Err(invalid("identity.instance_id", "required with source = \"static\""));
            }
            (IdentitySource::Static, Some(i)) if underway_cloud::check_id("identity.instance_id", i, "i-").is_err() => {
                return Err(invalid("identity.instance_id", format!("{i:?} is not an i-… id")));
            }
            (IdentitySource::Imds, Some(_)) => {
                return Err(invalid("identity.instance_id", "only with source = \"static\" (IMDS knows it)"));
            }
            _ => {}
        }
        if let Some(e) = &id.imds_endpoint
            && !e.starts_with("http://")
        {
            return Err(invalid("identity.imds_endpoint", format!("{e:?} must be an http:// URL")));
        }
        self.cloud.validate().map_err(|m| {
            let field = m.split_whitespace().next().unwrap_or("cloud").to_string();
            let field = if field.starts_with("cloud.") { field } else { format!("cloud.{field}") };
            invalid(&field, m)
        })?;
        if !self.socket.is_absolute() {
            return Err(invalid("socket", format!("{} must be an absolute path", self.socket.display())));
        }
        if self.health_stall_ms < 10_000 {
            return Err(invalid("health_stall_ms", "at least 10000 (a step may wait on EC2 for a while)"));
        }
        self.egress.check()?;
        if !self.proc_sys.is_absolute() {
            return Err(invalid("proc_sys", format!("{} must be an absolute path", self.proc_sys.display())));
        }
        if self.orphan_grace_ms != 0 && self.orphan_grace_ms < 1_000 {
            return Err(invalid("orphan_grace_ms", "0 (off) or at least 1000"));
        }
        if self.rpc_read_timeout_ms == 0 {
            return Err(invalid("rpc_read_timeout_ms", "must be at least 1"));
        }
        if !self.state_dir.is_absolute() {
            return Err(invalid("state_dir", format!("{} must be an absolute path", self.state_dir.display())));
        }
        if self.release_hold_ms > 3_600_000 {
            return Err(invalid("release_hold_ms", "at most 3600000 (an hour); 0 gives a surplus back at once"));
        }
        if self.add_wait_ms > 120_000 {
            return Err(invalid("add_wait_ms", "at most 120000: the runtime gives up on the CNI call before that"));
        }
        if self.reconcile_interval_ms == 0 || self.reconcile_min_interval_ms > self.reconcile_interval_ms {
            return Err(invalid("reconcile_interval_ms", "must be > 0 and at least reconcile_min_interval_ms"));
        }
        if self.veth_prefix.is_empty()
            || self.veth_prefix.len() > 4
            || !self.veth_prefix.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(invalid("veth_prefix", format!("{:?}: 1–4 letters or digits", self.veth_prefix)));
        }
        // The pool's sections: this node's (named as its pool's when it selected one), then
        // every other pool of the file, so that a mistake in one is found on every node that
        // reads the file, not only on the nodes of that pool.
        let here = self.pool.as_ref().map_or(String::new(), |p| format!("pools.{p}."));
        check_pool_sections(&here, self.mode, &self.targets, &self.eni, &self.vpc_route, !self.kubernetes.enabled)?;
        for (name, p) in &self.pools {
            if !label_value(name) {
                return Err(invalid(
                    &format!("pools.{name}"),
                    "a pool's name must be a label value: 1–63 of [A-Za-z0-9._-], alphanumeric at both ends",
                ));
            }
            if self.pool.as_ref() != Some(name) {
                check_pool_sections(&format!("pools.{name}."), p.mode, &p.targets, &p.eni, &p.vpc_route, false)?;
                // The egress relation too (egress is the file's, the pool's pod CIDR each
                // node's): every node of the pool would refuse to start without it.
                if p.mode == Mode::VpcRoute
                    && self.egress.enabled
                    && self.egress.snat == SnatMode::Node
                    && p.vpc_route.cluster_cidr.is_none()
                {
                    return Err(invalid(
                        &format!("pools.{name}.vpc_route.cluster_cidr"),
                        "required in vpc-route mode with egress.snat = \"node\": traffic to other nodes' pods must \
                         keep its source address (set it to the range every node's pod CIDR comes from)",
                    ));
                }
            }
        }
        if self.mode == Mode::VpcRoute
            && self.egress.enabled
            && self.egress.snat == SnatMode::Node
            && self.vpc_route.pod_cidr.is_some()
            && self.vpc_route.cluster_cidr.is_none()
        {
            // (With Kubernetes and no pod CIDR yet, checked again on the effective config.)
            return Err(invalid(
                &format!("{here}vpc_route.cluster_cidr"),
                "required in vpc-route mode with egress.snat = \"node\": traffic to other nodes' pods must keep \
                 its source address (set it to the range every node's pod CIDR comes from)",
            ));
        }
        match (&self.cni.conf_dir, &self.cni.conflist) {
            (Some(_), None) => return Err(invalid("cni.conflist", "required with cni.conf_dir")),
            (None, Some(_)) => return Err(invalid("cni.conf_dir", "required with cni.conflist")),
            (Some(d), Some(f)) if !d.is_absolute() || !f.is_absolute() || f.file_name().is_none() => {
                return Err(invalid("cni", "conf_dir and conflist must be absolute paths"));
            }
            _ => {}
        }
        self.validate_kubernetes()?;
        if self.metrics_listen.is_some() && self.metrics_listen == self.introspection_listen {
            return Err(invalid("introspection_listen", "must differ from metrics_listen"));
        }
        Ok(())
    }

    fn validate_kubernetes(&self) -> Result<(), IpamdError> {
        let k = &self.kubernetes;
        if !k.enabled {
            return Ok(());
        }
        match &k.node_name {
            None => {
                return Err(invalid(
                    "kubernetes.node_name",
                    "required with kubernetes.enabled (the DaemonSet sets UNDERWAY_KUBERNETES__NODE_NAME from spec.nodeName)",
                ));
            }
            Some(n) if !dns_subdomain(n) => {
                return Err(invalid("kubernetes.node_name", format!("{n:?} is not a Kubernetes object name")));
            }
            _ => {}
        }
        let (prefix, name) = k.pool_label.rsplit_once('/').unwrap_or(("", &k.pool_label));
        if !label_value(name) || (k.pool_label.contains('/') && !dns_subdomain(prefix)) {
            return Err(invalid("kubernetes.pool_label", format!("{:?} is not a label key", k.pool_label)));
        }
        let gc = &k.gc;
        if gc.enabled {
            if !dns_subdomain(&gc.lease_namespace) || gc.lease_namespace.contains('.') {
                return Err(invalid(
                    "kubernetes.gc.lease_namespace",
                    format!("{:?} is not a namespace", gc.lease_namespace),
                ));
            }
            if !dns_subdomain(&gc.lease_name) {
                return Err(invalid("kubernetes.gc.lease_name", format!("{:?} is not an object name", gc.lease_name)));
            }
            if !(15..=3600).contains(&gc.lease_duration_s) {
                return Err(invalid("kubernetes.gc.lease_duration_s", "must be within 15..=3600"));
            }
            if gc.interval_ms < 1000 {
                return Err(invalid("kubernetes.gc.interval_ms", "at least 1000"));
            }
        }
        if k.node_count_interval_ms != 0 && k.node_count_interval_ms < 1000 {
            return Err(invalid("kubernetes.node_count_interval_ms", "0 (never) or at least 1000"));
        }
        Ok(())
    }

    /// The ENI mode's periodic describes (the leaked-ENI sweep, the drift re-check), as
    /// intervals. With `share_of` nodes sharing the account (the cloud's budget knows: from
    /// `rate_budget.share_of` or the cluster's Node count) they are stretched so that all the
    /// nodes' periodic describes together take at most a quarter of the account's describe
    /// refill: at the defaults (one sweep a minute, one re-check per 5 minutes: 0.02
    /// describes/s per node) 1,000 nodes alone would spend all of EC2's 20/s (docs/benchmarks.md).
    pub fn periodic_describes(&self, share_of: Option<u32>) -> (std::time::Duration, std::time::Duration) {
        let (gc, recheck) = (self.eni.gc_interval_ms as f64 / 1000.0, self.eni.recheck_interval_ms as f64 / 1000.0);
        let stretch = self.describe_stretch(1.0 / gc + 1.0 / recheck, share_of);
        (std::time::Duration::from_secs_f64(gc * stretch), std::time::Duration::from_secs_f64(recheck * stretch))
    }

    /// How much periodic describes of `per_node` a second (each node's) must stretch so that all
    /// `share_of` nodes together take at most a quarter of the account's describe refill; 1
    /// without `share_of` (a node alone cannot know the cluster's size).
    fn describe_stretch(&self, per_node: f64, share_of: Option<u32>) -> f64 {
        let b = &self.cloud.rate_budget;
        share_of.map_or(1.0, |n| (f64::from(n) * per_node / (0.25 * b.account.describe_qps)).max(1.0))
    }

    /// How often VPC-route mode looks at its route tables: the route re-check of a routed node,
    /// and the retry of a node the tables turned away (full, or the CIDR routed elsewhere).
    /// Stretched like [`periodic_describes`](Self::periodic_describes) with `share_of`: all the
    /// nodes' checks together at most a quarter of the account's describe refill.
    pub fn route_check_interval(&self, share_of: Option<u32>) -> std::time::Duration {
        let every = self.vpc_route.check_interval_ms as f64 / 1000.0;
        std::time::Duration::from_secs_f64(every * self.describe_stretch(1.0 / every, share_of))
    }

    /// The tags that mark this node's ENIs (GC looks for these).
    pub fn node_tags(&self, instance_id: &str) -> underway_cloud::Tags {
        underway_cloud::Tags::from([
            (underway_cloud::TAG_CLUSTER.to_string(), self.cluster.clone()),
            (underway_cloud::TAG_INSTANCE.to_string(), instance_id.to_string()),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_describes_stretch_with_the_nodes_sharing_the_account() {
        let c = Config::default();
        let secs = |share_of| {
            let (g, r) = c.periodic_describes(share_of);
            (g.as_secs(), r.as_secs())
        };
        // (case, share_of, (sweep, re-check) in seconds)
        let cases = [
            ("not sharing: as configured", None, (60, 300)),
            ("100 nodes: 2/s of periodic describes, under 5/s", Some(100), (60, 300)),
            ("250 nodes: exactly a quarter of 20/s", Some(250), (60, 300)),
            ("1,000 nodes: four times longer", Some(1000), (240, 1200)),
            ("5,000 nodes: twenty times", Some(5000), (1200, 6000)),
        ];
        for (name, share_of, want) in cases {
            assert_eq!(secs(share_of), want, "{name}");
        }
        // VPC-route mode's route check (one describe a minute per node): (share_of, seconds).
        for (share_of, want) in [(None, 60), (Some(300), 60), (Some(1000), 200), (Some(5000), 1000)] {
            assert_eq!(c.route_check_interval(share_of).as_secs(), want, "{share_of:?}");
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// A config file in the temp dir, removed when dropped.
    struct TempFile(PathBuf);

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn write(name: &str, text: &str) -> TempFile {
        let p = std::env::temp_dir().join(format!("underway-config-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        TempFile(p)
    }

    #[test]
    fn file_then_environment() {
        let f = write(
            "ok.toml",
            r#"
cluster = "prod"
socket = "/run/uw/ipamd.sock"
[identity]
source = "static"
instance_id = "i-0abc"
[targets]
warm_ip_target = 3
[eni]
subnets = ["subnet-1a"]
"#,
        );
        let c = Config::load(
            Some(&f.0),
            &env(&[("UNDERWAY_TARGETS__MINIMUM_IP_TARGET", "10"), ("UNDERWAY_COOLDOWN_MS", "5")]),
        )
        .unwrap();
        assert_eq!(c.cluster, "prod");
        assert_eq!(c.identity.source, IdentitySource::Static);
        assert_eq!(c.identity.instance_id.as_deref(), Some("i-0abc"));
        assert_eq!(c.targets.warm_ip_target, Some(3));
        assert_eq!(c.targets.minimum_ip_target, Some(10), "environment overrides");
        assert_eq!(c.cooldown_ms, 5);
        assert_eq!(c.eni.route_table_base, 100, "defaults fill the rest");
        assert_eq!(c.targets.warm_eni_target, 1);
    }

    #[test]
    fn every_error_names_its_field() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("", &[], "cluster"),
            ("cluster = \"a b\"", &[], "cluster"),
            ("cluster = \"c\"\nwarm = 1", &[], "warm"),
            ("cluster = \"c\"\n[targets]\nwarm_ip_target = -1", &[], "targets.warm_ip_target"),
            ("cluster = \"c\"\n[targets]\nmax_eni = 0", &[], "targets.max_eni"),
            ("cluster = \"c\"\nsocket = \"rel.sock\"", &[], "socket"),
            ("cluster = \"c\"\n[identity]\nsource = \"static\"", &[], "identity.instance_id"),
            ("cluster = \"c\"\n[identity]\nimds_endpoint = \"169.254.169.254\"", &[], "identity.imds_endpoint"),
            ("cluster = \"c\"\n[identity]\nsource = \"static\"\ninstance_id = \"vm-1\"", &[], "identity.instance_id"),
            ("cluster = \"c\"\n[eni]\nsubnets = [\"sg-1\"]", &[], "eni.subnets"),
            ("cluster = \"c\"\n[eni]\nmtu = 100", &[], "eni.mtu"),
            ("cluster = \"c\"\n[cloud]\nendpoint = \"localhost\"", &[], "cloud.endpoint"),
            ("cluster = \"c\"\n[cloud.rate_budget.mutating]\nqps = 0.0\nburst = 1", &[], "rate_budget.mutating.qps"),
            ("cluster = \"c\"", &[("UNDERWAY_ADD_WAIT_MS", "many")], "add_wait_ms"),
            ("cluster = \"c\"\nrelease_hold_ms = 86400000", &[], "release_hold_ms"),
            ("cluster = \"c\"", &[("UNDERWAY_VETH_PREFIX", "toolong")], "veth_prefix"),
            ("cluster = \"c\"\nproc_sys = \"proc/sys\"", &[], "proc_sys"),
            ("cluster = \"c\"\nmode = \"overlay\"", &[], "mode"),
            ("cluster = \"c\"\nmode = \"vpc-route\"", &[], "vpc_route.pod_cidr"),
            (
                "cluster = \"c\"\nmode = \"vpc-route\"\n[vpc_route]\npod_cidr = \"10.1.0.7/24\"",
                &[],
                "vpc_route.pod_cidr",
            ),
            (
                "cluster = \"c\"\nmode = \"vpc-route\"\n[vpc_route]\npod_cidr = \"10.1.0.0/24\"\ncluster_cidr = \"10.1.0.0/16\"\nroute_table_capacity = 1001",
                &[],
                "vpc_route.route_table_capacity",
            ),
            (
                "cluster = \"c\"\nmode = \"vpc-route\"\n[vpc_route]\npod_cidr = \"10.1.0.0/24\"\ncluster_cidr = \"10.2.0.0/16\"",
                &[],
                "vpc_route.cluster_cidr",
            ),
            ("cluster = \"c\"\npool = \"gpu\"\n[pools.cpu]\nmode = \"eni\"", &[], "no pool named \"gpu\""),
            (
                "cluster = \"c\"\nmode = \"vpc-route\"\n[vpc_route]\npod_cidr = \"100.64.1.0/24\"",
                &[],
                "vpc_route.cluster_cidr: required in vpc-route mode with egress.snat",
            ),
            ("cluster = \"c\"\n[egress]\nexclude = [\"192.168.0.0/16\", \"10.0.0/33\"]", &[], "egress.exclude[1]"),
            ("cluster = \"c\"\n[egress]\nsnat = \"nat-gateway\"", &[], "egress"),
            ("cluster = \"c\"\n[egress]\nmark = 16384", &[], "egress.mark"),
            ("cluster = \"c\"\n[egress]\nmark = 3", &[], "egress.mark"),
            ("cluster = \"c\"\n[egress]\nmark = 65536", &[], "egress.mark"),
            ("cluster = \"c\"\npool = \"r\"\n[pools.r]\nmode = \"vpc-route\"", &[], "pools.r.vpc_route.pod_cidr"),
            (
                "cluster = \"c\"\npool = \"e\"\n[pools.e]\nmode = \"eni\"\n[pools.r]\nmode = \"vpc-route\"",
                &[],
                "pools.r.vpc_route.cluster_cidr: required in vpc-route mode with egress.snat",
            ),
            (
                "cluster = \"c\"\npool = \"g\"\n[pools.g]\nmode = \"eni\"\n[pools.g.eni]\nmtu = 100",
                &[],
                "pools.g.eni.mtu",
            ),
            (
                "cluster = \"c\"\npool = \"g\"\n[pools.g]\nmode = \"eni\"\n[pools.g.targets]\nmax_eni = 0",
                &[],
                "pools.g.targets.max_eni",
            ),
            (
                "cluster = \"c\"\npool = \"cpu\"\n[pools.cpu]\nmode = \"eni\"\n[pools.gpu]\nmode = \"eni\"\neni = { mtu = 100 }",
                &[],
                "pools.gpu.eni.mtu",
            ),
            (
                "cluster = \"c\"\n[pools.routed]\nmode = \"vpc-route\"\nvpc_route = { pod_cidr = \"100.64.0.0/12\" }",
                &[],
                "pools.routed.vpc_route.pod_cidr: 100.64.0.0/12: between /16 and /28",
            ),
            ("cluster = \"c\"\n[pools.\"gpu pool\"]\nmode = \"eni\"", &[], "pools.gpu pool"),
            ("cluster = \"c\"\npool = \"g\"\n[eni]\nmtu = 100\n[pools.g]\nmode = \"eni\"", &[], "config: eni.mtu"),
            (
                "cluster = \"c\"\npool = \"g\"\n[pools.g]\nmode = \"eni\"\neni = { link_wait_ms = 700000 }",
                &[],
                "pools.g.eni.pending_give_up_ms: at least link_wait_ms",
            ),
            ("cluster = \"c\"\n[kubernetes]\nenabled = true", &[], "kubernetes.node_name"),
            (
                "cluster = \"c\"",
                &[("UNDERWAY_KUBERNETES__ENABLED", "true"), ("UNDERWAY_KUBERNETES__NODE_NAME", "Node_1")],
                "kubernetes.node_name",
            ),
            (
                "cluster = \"c\"\n[kubernetes]\nenabled = true\nnode_name = \"n1\"\npool_label = \"a/b/-c\"",
                &[],
                "kubernetes.pool_label",
            ),
            (
                "cluster = \"c\"\n[kubernetes]\nenabled = true\nnode_name = \"n1\"\ngc = { lease_duration_s = 5 }",
                &[],
                "kubernetes.gc.lease_duration_s",
            ),
            (
                "cluster = \"c\"\n[kubernetes]\nenabled = true\nnode_name = \"n1\"\ngc = { lease_namespace = \"kube.system\" }",
                &[],
                "kubernetes.gc.lease_namespace",
            ),
        ];
        for (i, (text, vars, field)) in cases.iter().enumerate() {
            let f = write(&format!("bad{i}.toml"), text);
            let e = Config::load(Some(&f.0), &env(vars)).expect_err(text);
            assert!(e.to_string().contains(field), "case {i} {text:?}: {e} should name {field}");
        }
        let e = Config::load(Some(Path::new("/nonexistent/u.toml")), &[]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/u.toml"), "{e}");
    }

    #[test]
    fn a_node_takes_its_pools_settings() {
        let f = write(
            "pools.toml",
            r#"
cluster = "c"
pool = "routed"
[pools.enis]
mode = "eni"
targets = { warm_ip_target = 4 }
eni = { subnets = ["subnet-1"] }
[pools.routed]
mode = "vpc-route"
vpc_route = { pod_cidr = "10.0.128.0/24", cluster_cidr = "10.0.128.0/17", route_tables = ["rtb-1"] }
"#,
        );
        let c = Config::load(Some(&f.0), &[]).unwrap();
        assert_eq!(c.mode, Mode::VpcRoute);
        assert_eq!(c.vpc_route.pod_cidr, Some("10.0.128.0/24".parse().unwrap()));
        assert_eq!(c.vpc_route.route_tables, vec!["rtb-1".to_string()]);
        let c = Config::load(Some(&f.0), &env(&[("UNDERWAY_POOL", "enis")])).unwrap();
        assert_eq!((c.mode, c.targets.warm_ip_target), (Mode::Eni, Some(4)));
        assert_eq!(c.eni.subnets, vec!["subnet-1".to_string()]);
    }

    #[test]
    fn with_kubernetes_the_pod_cidr_may_wait_for_the_node() {
        let env = env(&[
            ("UNDERWAY_CLUSTER", "c"),
            ("UNDERWAY_MODE", "vpc-route"),
            ("UNDERWAY_KUBERNETES__ENABLED", "true"),
            ("UNDERWAY_KUBERNETES__NODE_NAME", "ip-10-0-1-5.ec2.internal"),
        ]);
        let c = Config::load(None, &env).unwrap();
        assert_eq!((c.mode, c.vpc_route.pod_cidr), (Mode::VpcRoute, None));
        assert_eq!(c.kubernetes.pool_label, "underway.dev/pool");
        assert!(c.kubernetes.gc.enabled && c.kubernetes.events);
    }

    #[test]
    fn unrelated_variables_are_ignored() {
        let c = Config::load(
            None,
            &env(&[("UNDERWAY_CLUSTER", "x"), ("HOME", "/root"), ("UNDERWAY_LOCALSTACK_ENDPOINT", "http://x")]),
        )
        .unwrap();
        assert_eq!(c.cluster, "x");
    }
}
