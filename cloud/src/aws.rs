//! The seam on AWS EC2, through aws-sdk-ec2.
//!
//! Every call goes through [`Ec2Cloud::call`]: each attempt takes a token from the rate budget,
//! throttles and transient failures are retried with jittered backoff (the SDK's own retries are
//! off, so no attempt bypasses the budget), the final error is mapped to a [`CloudError`] and
//! every attempt's outcome is counted.

use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    AttributeBooleanValue, Filter, InstanceType, NetworkInterfaceAttachmentChanges, ResourceType, Tag, TagSpecification,
};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::budget::{ApiClass, BudgetConfig};
use crate::error::{CloudError, Result};
use crate::limits::{InstanceLimits, LimitsSource, static_limits};
use crate::pace::{Pacer, RetryPolicy};
use crate::stats::CallStats;
use crate::types::*;
use crate::{Discovery, Interfaces, RouteTables};

/// How to reach EC2 and how hard to push it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ec2Config {
    /// Region; `None` takes it from the environment or IMDS.
    pub region: Option<String>,
    /// Endpoint override (LocalStack: `http://127.0.0.1:4566`); `None` is the real EC2.
    pub endpoint: Option<String>,
    pub rate_budget: BudgetConfig,
    /// Attempts per call, the first included (SDK standard retry mode).
    pub max_attempts: u32,
    /// First retry delay; the SDK backs off exponentially with jitter from there.
    pub initial_backoff_ms: u64,
    /// Time limit of one attempt and of one call with its retries.
    pub attempt_timeout_ms: u64,
    pub call_timeout_ms: u64,
}

impl Default for Ec2Config {
    fn default() -> Self {
        Ec2Config {
            region: None,
            endpoint: None,
            rate_budget: BudgetConfig::default(),
            max_attempts: 4,
            initial_backoff_ms: 500,
            attempt_timeout_ms: 10_000,
            call_timeout_ms: 40_000,
        }
    }
}

impl Ec2Config {
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.rate_budget.validate()?;
        if self.max_attempts == 0 {
            return Err("cloud.max_attempts must be at least 1".into());
        }
        if self.attempt_timeout_ms == 0 || self.call_timeout_ms < self.attempt_timeout_ms {
            return Err("cloud.call_timeout_ms must be at least cloud.attempt_timeout_ms, both > 0".into());
        }
        if let Some(e) = &self.endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(format!("cloud.endpoint must be an http(s) URL, got {e:?}"));
        }
        Ok(())
    }
}

/// The EC2 implementation of the seam.
#[derive(Debug, Clone)]
pub struct Ec2Cloud {
    client: Client,
    /// The node's budget, retries and statistics (`crate::pace`, shared with other clouds).
    pacer: Pacer,
}

impl Ec2Cloud {
    /// Loads credentials and region from the default chain (env, profile, IMDS) and applies `cfg`.
    pub async fn connect(cfg: &Ec2Config) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(r) = &cfg.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some(e) = &cfg.endpoint {
            loader = loader.endpoint_url(e);
        }
        Self::from_sdk_config(&loader.load().await, cfg)
    }

    /// Builds on an SDK config made elsewhere (tests give a replay HTTP client this way).
    pub fn from_sdk_config(sdk: &SdkConfig, cfg: &Ec2Config) -> Self {
        // Retries are ours (`call`): each attempt spends from the rate budget.
        let retry = RetryConfig::disabled();
        let timeouts = TimeoutConfig::builder()
            .operation_attempt_timeout(Duration::from_millis(cfg.attempt_timeout_ms))
            .operation_timeout(Duration::from_millis(cfg.attempt_timeout_ms))
            .build();
        let mut conf = aws_sdk_ec2::config::Builder::from(sdk).retry_config(retry).timeout_config(timeouts);
        if let Some(e) = &cfg.endpoint {
            conf = conf.endpoint_url(e);
        }
        Ec2Cloud {
            client: Client::from_conf(conf.build()),
            pacer: Pacer::new(
                cfg.rate_budget,
                RetryPolicy {
                    max_attempts: cfg.max_attempts,
                    initial_backoff: Duration::from_millis(cfg.initial_backoff_ms),
                    call_timeout: Duration::from_millis(cfg.call_timeout_ms),
                },
            ),
        }
    }

    /// Calls made so far, by operation and outcome.
    pub fn stats(&self) -> &Arc<CallStats> {
        self.pacer.stats()
    }

    /// The node's rate budget (ipamd's Kubernetes side sets its share from the cluster's size).
    pub fn budget(&self) -> &crate::budget::RateBudget {
        self.pacer.budget()
    }

    /// One call: every attempt takes a token from the rate budget first (the SDK's own retries
    /// would bypass it, and a throttled account is exactly when the budget matters), throttles and
    /// transient failures are retried with jittered exponential backoff (backon) up to
    /// `max_attempts`, all within `call_timeout_ms`. `send` makes one attempt; a mutating request
    /// that must be idempotent across attempts carries its own ClientToken.
    async fn call<T, E, F, Fut>(&self, op: &'static str, class: ApiClass, send: F) -> Result<T>
    where
        F: Fn() -> Fut + Send,
        Fut: Future<Output = std::result::Result<T, SdkError<E>>> + Send,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        self.call_with(op, class, true, send).await
    }

    /// [`Self::call`] for a request that is not safe to repeat when its fate is unknown
    /// (`retry_transient = false`): only throttling (EC2 did nothing) is retried. A transient
    /// failure — a 5xx, a connection closed without an answer — may have followed EC2 acting, and a
    /// second AttachNetworkInterface of the same ENI is refused by AWS (the device index is in
    /// use): the caller reads EC2's state instead (found by the fault test's lost replies).
    async fn call_with<T, E, F, Fut>(
        &self,
        op: &'static str,
        class: ApiClass,
        retry_transient: bool,
        send: F,
    ) -> Result<T>
    where
        F: Fn() -> Fut + Send,
        Fut: Future<Output = std::result::Result<T, SdkError<E>>> + Send,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let attempt = move || {
            let sent = send();
            async move { sent.await.map_err(|e| map_sdk_error(op, e)) }
        };
        self.pacer.call(op, class, retry_transient, attempt).await
    }

    /// Refused before any call: counted as an invalid outcome of `op`.
    fn refuse<T>(&self, op: &'static str, e: CloudError) -> Result<T> {
        self.pacer.refuse(op, e)
    }

    async fn describe_enis(&self, filters: Vec<Filter>, ids: Vec<String>) -> Result<Vec<Eni>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let req = self
                .client
                .describe_network_interfaces()
                .set_filters((!filters.is_empty()).then(|| filters.clone()))
                .set_network_interface_ids((!ids.is_empty()).then(|| ids.clone()))
                .set_next_token(token.clone());
            let page = self.call("DescribeNetworkInterfaces", ApiClass::Describe, || req.clone().send()).await?;
            for ni in page.network_interfaces() {
                out.push(eni_from(ni)?);
            }
            token = page.next_token().filter(|t| !t.is_empty()).map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        Ok(out)
    }

    async fn describe_subnets(&self, ids: Vec<String>, filters: Vec<Filter>) -> Result<Vec<Subnet>> {
        let req = self
            .client
            .describe_subnets()
            .set_subnet_ids((!ids.is_empty()).then_some(ids))
            .set_filters((!filters.is_empty()).then_some(filters));
        let out = self.call("DescribeSubnets", ApiClass::Describe, || req.clone().send()).await?;
        out.subnets()
            .iter()
            .map(|s| {
                Ok(Subnet {
                    id: s.subnet_id().unwrap_or_default().to_string(),
                    vpc_id: s.vpc_id().unwrap_or_default().to_string(),
                    cidr: parse_net("DescribeSubnets", s.cidr_block())?,
                    availability_zone: s.availability_zone().unwrap_or_default().to_string(),
                    available_addresses: s.available_ip_address_count().unwrap_or(0).max(0) as u32,
                    tags: tags_from(s.tags()),
                })
            })
            .collect()
    }

    async fn describe_route_tables(&self, ids: Vec<String>, filters: Vec<Filter>) -> Result<Vec<RouteTable>> {
        let req = self
            .client
            .describe_route_tables()
            .set_route_table_ids((!ids.is_empty()).then_some(ids))
            .set_filters((!filters.is_empty()).then_some(filters));
        let out = self.call("DescribeRouteTables", ApiClass::Describe, || req.clone().send()).await?;
        out.route_tables().iter().map(route_table_from).collect()
    }

    fn check_route_args(
        &self,
        op: &'static str,
        vpc: &Vpc,
        table_id: &str,
        dest: Ipv4Net,
        target: &RouteTarget,
    ) -> Result<()> {
        let checked = check_id("table_id", table_id, "rtb-")
            .and_then(|_| match target {
                RouteTarget::Instance(id) => check_id("target", id, "i-"),
                RouteTarget::Eni(id) => check_id("target", id, "eni-"),
                RouteTarget::Other(id) => {
                    Err(CloudError::invalid("target", format!("{id}: underway routes only to an instance or an ENI")))
                }
            })
            .and_then(|_| {
                // AWS refuses a route more specific than the VPC's local route unless it is a whole
                // subnet to an interface (VPC User Guide, route tables); underway routes pod CIDRs
                // that lie outside every VPC block, and nothing that overlaps one.
                match vpc.cidrs.iter().find(|b| b.contains(&dest.network()) || dest.contains(&b.network())) {
                    None => Ok(()),
                    Some(b) => Err(CloudError::invalid(
                        "destination",
                        format!("{dest} overlaps the VPC {}'s block {b}: AWS refuses such a route", vpc.id),
                    )),
                }
            });
        checked.or_else(|e| self.refuse(op, e))
    }
}

fn map_sdk_error<E>(op: &'static str, err: SdkError<E>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(se) => CloudError::from_code(
            op,
            se.err().code().unwrap_or("Unknown"),
            se.err().message().unwrap_or_default(),
            Some(se.raw().status().as_u16()),
        ),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            CloudError::Transient { op, message: DisplayErrorContext(&err).to_string() }
        }
        _ => CloudError::Fatal { op, code: "SdkError".into(), message: DisplayErrorContext(&err).to_string() },
    }
}

/// A ClientToken unique to one logical request (EC2 allows up to 64 ASCII characters).
fn client_token() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("underway-{}-{nanos}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

fn filter(name: &str, values: impl IntoIterator<Item = impl Into<String>>) -> Filter {
    Filter::builder().name(name).set_values(Some(values.into_iter().map(Into::into).collect())).build()
}

fn tag_filters(tags: &Tags) -> Vec<Filter> {
    tags.iter().map(|(k, v)| filter(&format!("tag:{k}"), [v.clone()])).collect()
}

fn tags_from(tags: &[Tag]) -> Tags {
    tags.iter().filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or_default().to_string()))).collect()
}

fn malformed(op: &'static str, what: &str, value: Option<&str>) -> CloudError {
    CloudError::Fatal { op, code: "MalformedResponse".into(), message: format!("{what}: {value:?}") }
}

fn parse_ip(op: &'static str, s: Option<&str>) -> Result<Ipv4Addr> {
    s.and_then(|v| v.parse().ok()).ok_or_else(|| malformed(op, "IPv4 address", s))
}

fn parse_net(op: &'static str, s: Option<&str>) -> Result<Ipv4Net> {
    s.and_then(|v| v.parse().ok()).ok_or_else(|| malformed(op, "IPv4 CIDR", s))
}

fn eni_from(ni: &aws_sdk_ec2::types::NetworkInterface) -> Result<Eni> {
    const OP: &str = "DescribeNetworkInterfaces";
    let primary_ip = parse_ip(OP, ni.private_ip_address())?;
    let mut secondary_ips = Vec::new();
    for a in ni.private_ip_addresses() {
        let ip = parse_ip(OP, a.private_ip_address())?;
        if ip != primary_ip && a.primary() != Some(true) {
            secondary_ips.push(ip);
        }
    }
    let prefixes = ni.ipv4_prefixes().iter().map(|p| parse_net(OP, p.ipv4_prefix())).collect::<Result<_>>()?;
    Ok(Eni {
        id: ni.network_interface_id().unwrap_or_default().to_string(),
        subnet_id: ni.subnet_id().unwrap_or_default().to_string(),
        vpc_id: ni.vpc_id().unwrap_or_default().to_string(),
        mac_raw: ni.mac_address().unwrap_or_default().to_string(),
        description: ni.description().unwrap_or_default().to_string(),
        primary_ip,
        secondary_ips,
        prefixes,
        attachment: ni.attachment().and_then(|a| {
            Some(Attachment {
                id: a.attachment_id()?.to_string(),
                instance_id: a.instance_id().unwrap_or_default().to_string(),
                device_index: a.device_index().unwrap_or(0).max(0) as u32,
                status: a.status().map(|s| s.as_str().to_string()).unwrap_or_default(),
                delete_on_termination: a.delete_on_termination().unwrap_or(false),
            })
        }),
        status: ni.status().map(|s| s.as_str().to_string()).unwrap_or_default(),
        source_dest_check: ni.source_dest_check().unwrap_or(true),
        security_groups: ni.groups().iter().filter_map(|g| g.group_id().map(str::to_string)).collect(),
        tags: tags_from(ni.tag_set()),
    })
}

fn route_table_from(t: &aws_sdk_ec2::types::RouteTable) -> Result<RouteTable> {
    let mut routes = Vec::new();
    for r in t.routes() {
        // Prefix-list and IPv6 routes have no IPv4 destination: not ours to look at.
        let Some(dest) = r.destination_cidr_block().and_then(|d| d.parse().ok()) else { continue };
        let target = if let Some(i) = r.instance_id() {
            RouteTarget::Instance(i.to_string())
        } else if let Some(e) = r.network_interface_id() {
            RouteTarget::Eni(e.to_string())
        } else {
            RouteTarget::Other(
                [r.gateway_id(), r.nat_gateway_id(), r.transit_gateway_id(), r.vpc_peering_connection_id()]
                    .into_iter()
                    .flatten()
                    .next()
                    .unwrap_or("unknown")
                    .to_string(),
            )
        };
        routes.push(Route {
            destination: dest,
            target,
            via_eni: r.network_interface_id().map(str::to_string),
            state: r.state().map(|s| s.as_str().to_string()).unwrap_or_default(),
        });
    }
    Ok(RouteTable {
        id: t.route_table_id().unwrap_or_default().to_string(),
        vpc_id: t.vpc_id().unwrap_or_default().to_string(),
        main: t.associations().iter().any(|a| a.main() == Some(true)),
        subnets: t.associations().iter().filter_map(|a| a.subnet_id().map(str::to_string)).collect(),
        routes,
        tags: tags_from(t.tags()),
    })
}

fn one<T>(op: &'static str, what: &str, mut items: Vec<T>) -> Result<T> {
    match items.len() {
        0 => Err(CloudError::NotFound { op, code: "Empty".into(), message: format!("{what} not found") }),
        _ => Ok(items.swap_remove(0)),
    }
}

impl Discovery for Ec2Cloud {
    async fn instance(&self, instance_id: &str) -> Result<Instance> {
        const OP: &str = "DescribeInstances";
        if let Err(e) = check_id("instance_id", instance_id, "i-") {
            return self.refuse(OP, e);
        }
        let out = self
            .call(OP, ApiClass::Describe, || self.client.describe_instances().instance_ids(instance_id).send())
            .await?;
        let inst = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(instance_id))
            .ok_or_else(|| CloudError::NotFound {
                op: OP,
                code: "Empty".into(),
                message: format!("{instance_id} not found"),
            })?;
        let primary = inst
            .network_interfaces()
            .iter()
            .find(|n| n.attachment().and_then(|a| a.device_index()) == Some(0))
            .and_then(|n| n.network_interface_id())
            .unwrap_or_default();
        Ok(Instance {
            id: instance_id.to_string(),
            instance_type: inst.instance_type().map(|t| t.as_str().to_string()).unwrap_or_default(),
            availability_zone: inst.placement().and_then(|p| p.availability_zone()).unwrap_or_default().to_string(),
            vpc_id: inst.vpc_id().unwrap_or_default().to_string(),
            subnet_id: inst.subnet_id().unwrap_or_default().to_string(),
            security_groups: inst.security_groups().iter().filter_map(|g| g.group_id().map(str::to_string)).collect(),
            primary_eni: primary.to_string(),
            primary_ip: inst.private_ip_address().and_then(|s| s.parse().ok()),
            state: inst.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default(),
        })
    }

    async fn vpc(&self, vpc_id: &str) -> Result<Vpc> {
        const OP: &str = "DescribeVpcs";
        if let Err(e) = check_id("vpc_id", vpc_id, "vpc-") {
            return self.refuse(OP, e);
        }
        let out = self.call(OP, ApiClass::Describe, || self.client.describe_vpcs().vpc_ids(vpc_id).send()).await?;
        let v = one(OP, vpc_id, out.vpcs().to_vec())?;
        let mut cidrs: Vec<Ipv4Net> = Vec::new();
        if let Some(c) = v.cidr_block() {
            cidrs.push(parse_net(OP, Some(c))?);
        }
        for a in v.cidr_block_association_set() {
            let live = a.cidr_block_state().and_then(|s| s.state()).is_none_or(|s| s.as_str() == "associated");
            if let (true, Some(c)) = (live, a.cidr_block()) {
                let net = parse_net(OP, Some(c))?;
                if !cidrs.contains(&net) {
                    cidrs.push(net);
                }
            }
        }
        Ok(Vpc { id: vpc_id.to_string(), cidrs })
    }

    async fn subnets(&self, ids: &[String]) -> Result<Vec<Subnet>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        if let Err(e) = ids.iter().try_for_each(|i| check_id("ids", i, "subnet-")) {
            return self.refuse("DescribeSubnets", e);
        }
        self.describe_subnets(ids.to_vec(), Vec::new()).await
    }

    async fn subnets_by_tags(&self, vpc_id: &str, tags: &Tags) -> Result<Vec<Subnet>> {
        if tags.is_empty() {
            return self.refuse("DescribeSubnets", CloudError::invalid("tags", "at least one tag is needed"));
        }
        let mut filters = tag_filters(tags);
        filters.push(filter("vpc-id", [vpc_id]));
        self.describe_subnets(Vec::new(), filters).await
    }

    async fn eni(&self, eni_id: &str) -> Result<Eni> {
        if let Err(e) = check_id("eni_id", eni_id, "eni-") {
            return self.refuse("DescribeNetworkInterfaces", e);
        }
        one("DescribeNetworkInterfaces", eni_id, self.describe_enis(Vec::new(), vec![eni_id.to_string()]).await?)
    }

    async fn enis_of_instance(&self, instance_id: &str) -> Result<Vec<Eni>> {
        if let Err(e) = check_id("instance_id", instance_id, "i-") {
            return self.refuse("DescribeNetworkInterfaces", e);
        }
        let mut enis = self.describe_enis(vec![filter("attachment.instance-id", [instance_id])], Vec::new()).await?;
        enis.sort_by_key(|e| e.attachment.as_ref().map_or(u32::MAX, |a| a.device_index));
        Ok(enis)
    }

    async fn enis_by_tags(&self, tags: &Tags) -> Result<Vec<Eni>> {
        if tags.is_empty() {
            return self.refuse("DescribeNetworkInterfaces", CloudError::invalid("tags", "at least one tag is needed"));
        }
        self.describe_enis(tag_filters(tags), Vec::new()).await
    }

    async fn instance_limits(&self, instance_type: &str) -> Result<(InstanceLimits, LimitsSource)> {
        const OP: &str = "DescribeInstanceTypes";
        if instance_type.is_empty() {
            return self.refuse(OP, CloudError::invalid("instance_type", "is empty"));
        }
        let req = self.client.describe_instance_types().instance_types(InstanceType::from(instance_type));
        let api = self.call(OP, ApiClass::Describe, || req.clone().send()).await.map(|out| {
            out.instance_types().first().and_then(|t| {
                let n = t.network_info()?;
                // ipamd attaches every ENI on network card 0 (no NetworkCardIndex): on a type with
                // several cards (c6in.32xlarge: 16 interfaces as two cards of 8) card 0's maximum
                // is the bound, not the instance's.
                let all = n.maximum_network_interfaces()?;
                let card0 = n
                    .network_cards()
                    .iter()
                    .find(|c| c.network_card_index() == Some(0))
                    .and_then(|c| c.maximum_network_interfaces());
                Some(InstanceLimits {
                    enis: card0.map_or(all, |c| c.min(all)).max(0) as u32,
                    ipv4_per_eni: n.ipv4_addresses_per_interface()?.max(0) as u32,
                    ipv6_per_eni: n.ipv6_addresses_per_interface().unwrap_or(0).max(0) as u32,
                    vcpus: t.v_cpu_info().and_then(|v| v.default_v_cpus()).unwrap_or(0).max(0) as u32,
                })
            })
        });
        match (api, static_limits(instance_type)) {
            (Ok(Some(l)), _) => Ok((l, LimitsSource::Api)),
            (_, Some(l)) => Ok((l, LimitsSource::StaticTable)),
            (Err(e), None) => Err(e),
            (Ok(None), None) => Err(CloudError::NotFound {
                op: OP,
                code: "UnknownInstanceType".into(),
                message: format!("no network limits known for {instance_type}"),
            }),
        }
    }
}

impl Interfaces for Ec2Cloud {
    fn mutating_wait(&self) -> std::time::Duration {
        self.pacer.budget().wait(crate::budget::ApiClass::Mutating)
    }
    fn share_of(&self) -> Option<u32> {
        self.pacer.budget().share_of()
    }
    async fn create_eni(&self, req: &CreateEni) -> Result<Eni> {
        const OP: &str = "CreateNetworkInterface";
        let checked = check_id("subnet_id", &req.subnet_id, "subnet-")
            .and_then(|_| req.security_groups.iter().try_for_each(|g| check_id("security_groups", g, "sg-")))
            .and_then(|_| req.initial.validate("initial", true));
        if let Err(e) = checked {
            return self.refuse(OP, e);
        }
        let tags = (!req.tags.is_empty()).then(|| {
            TagSpecification::builder()
                .resource_type(ResourceType::NetworkInterface)
                .set_tags(Some(req.tags.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect()))
                .build()
        });
        let call = self
            .client
            .create_network_interface()
            .subnet_id(&req.subnet_id)
            .set_groups((!req.security_groups.is_empty()).then(|| req.security_groups.clone()))
            .description(&req.description)
            .set_tag_specifications(tags.map(|t| vec![t]))
            .set_secondary_private_ip_address_count((req.initial.ips > 0).then_some(req.initial.ips as i32))
            .set_ipv4_prefix_count((req.initial.prefixes > 0).then_some(req.initial.prefixes as i32))
            // One token for every attempt: a retry after a lost reply gets the same ENI back
            // (EC2's idempotency) instead of making a second one.
            .client_token(client_token());
        let out = self.call(OP, ApiClass::Mutating, || call.clone().send()).await?;
        let ni = out.network_interface().ok_or_else(|| malformed(OP, "network interface", None))?;
        eni_from(ni)
    }

    async fn attach_eni(&self, eni_id: &str, instance_id: &str, device_index: u32) -> Result<String> {
        const OP: &str = "AttachNetworkInterface";
        let checked = check_id("eni_id", eni_id, "eni-")
            .and_then(|_| check_id("instance_id", instance_id, "i-"))
            .and_then(|_| {
                if device_index == 0 {
                    Err(CloudError::invalid("device_index", "0 is the primary ENI's"))
                } else {
                    Ok(())
                }
            });
        if let Err(e) = checked {
            return self.refuse(OP, e);
        }
        let call = self
            .client
            .attach_network_interface()
            .network_interface_id(eni_id)
            .instance_id(instance_id)
            .device_index(device_index as i32);
        let out = self.call_with(OP, ApiClass::Mutating, false, || call.clone().send()).await?;
        Ok(out.attachment_id().ok_or_else(|| malformed(OP, "attachment id", None))?.to_string())
    }

    async fn set_delete_on_termination(&self, eni_id: &str, attachment_id: &str) -> Result<()> {
        const OP: &str = "ModifyNetworkInterfaceAttribute";
        if let Err(e) =
            check_id("eni_id", eni_id, "eni-").and_then(|_| check_id("attachment_id", attachment_id, "eni-attach-"))
        {
            return self.refuse(OP, e);
        }
        let change = NetworkInterfaceAttachmentChanges::builder()
            .attachment_id(attachment_id)
            .delete_on_termination(true)
            .build();
        let call = self.client.modify_network_interface_attribute().network_interface_id(eni_id).attachment(change);
        self.call(OP, ApiClass::Mutating, || call.clone().send()).await?;
        Ok(())
    }

    async fn detach_eni(&self, attachment_id: &str, force: bool) -> Result<()> {
        const OP: &str = "DetachNetworkInterface";
        if let Err(e) = check_id("attachment_id", attachment_id, "eni-attach-") {
            return self.refuse(OP, e);
        }
        let call = self.client.detach_network_interface().attachment_id(attachment_id).force(force);
        self.call(OP, ApiClass::Mutating, || call.clone().send()).await.map(|_| ())
    }

    async fn delete_eni(&self, eni_id: &str) -> Result<()> {
        const OP: &str = "DeleteNetworkInterface";
        // EC2 refuses to delete an attached ENI; LocalStack does not. Check, whatever the cloud does.
        let eni = self.eni(eni_id).await?;
        if eni.in_use() {
            let e = CloudError::InUse {
                op: OP,
                code: "InvalidNetworkInterface.InUse".into(),
                message: format!("{eni_id} is attached ({:?}); detach it first", eni.attachment),
            };
            return self.refuse(OP, e);
        }
        let call = self.client.delete_network_interface().network_interface_id(eni_id);
        self.call(OP, ApiClass::Mutating, || call.clone().send()).await.map(|_| ())
    }

    async fn set_source_dest_check(&self, eni_id: &str, enabled: bool) -> Result<()> {
        const OP: &str = "ModifyNetworkInterfaceAttribute";
        if let Err(e) = check_id("eni_id", eni_id, "eni-") {
            return self.refuse(OP, e);
        }
        let call = self
            .client
            .modify_network_interface_attribute()
            .network_interface_id(eni_id)
            .source_dest_check(AttributeBooleanValue::builder().value(enabled).build());
        self.call(OP, ApiClass::Mutating, || call.clone().send()).await.map(|_| ())
    }

    async fn assign(&self, known: &Eni, count: AddressCount) -> Result<Assigned> {
        const OP: &str = "AssignPrivateIpAddresses";
        if let Err(e) = check_id("eni", &known.id, "eni-").and_then(|_| count.validate("count", false)) {
            return self.refuse(OP, e);
        }
        let call = self
            .client
            .assign_private_ip_addresses()
            .network_interface_id(&known.id)
            .set_secondary_private_ip_address_count((count.ips > 0).then_some(count.ips as i32))
            .set_ipv4_prefix_count((count.prefixes > 0).then_some(count.prefixes as i32));
        // A count is not idempotent: repeated after a lost reply it assigns again (and past the
        // type's limit AWS refuses it). The caller reads the ENI instead.
        let out = self.call_with(OP, ApiClass::Mutating, false, || call.clone().send()).await?;
        let mut added = Assigned::default();
        for a in out.assigned_private_ip_addresses() {
            let ip = parse_ip(OP, a.private_ip_address())?;
            if ip != known.primary_ip && !known.secondary_ips.contains(&ip) && !added.ips.contains(&ip) {
                added.ips.push(ip);
            }
        }
        for p in out.assigned_ipv4_prefixes() {
            let net = parse_net(OP, p.ipv4_prefix())?;
            if !known.prefixes.contains(&net) && !added.prefixes.contains(&net) {
                added.prefixes.push(net);
            }
        }
        Ok(added)
    }

    async fn unassign_ips(&self, eni_id: &str, ips: &[Ipv4Addr]) -> Result<()> {
        const OP: &str = "UnassignPrivateIpAddresses";
        if let Err(e) = check_id("eni_id", eni_id, "eni-")
            .and_then(|_| if ips.is_empty() { Err(CloudError::invalid("ips", "asks for 0 addresses")) } else { Ok(()) })
        {
            return self.refuse(OP, e);
        }
        let call = self
            .client
            .unassign_private_ip_addresses()
            .network_interface_id(eni_id)
            .set_private_ip_addresses(Some(ips.iter().map(|i| i.to_string()).collect()));
        self.call(OP, ApiClass::Mutating, || call.clone().send()).await.map(|_| ())
    }

    async fn unassign_prefixes(&self, eni_id: &str, prefixes: &[Ipv4Net]) -> Result<()> {
        const OP: &str = "UnassignPrivateIpAddresses";
        if let Err(e) = check_id("eni_id", eni_id, "eni-").and_then(|_| {
            if prefixes.is_empty() { Err(CloudError::invalid("prefixes", "asks for 0 prefixes")) } else { Ok(()) }
        }) {
            return self.refuse(OP, e);
        }
        let call = self
            .client
            .unassign_private_ip_addresses()
            .network_interface_id(eni_id)
            .set_ipv4_prefixes(Some(prefixes.iter().map(|p| p.to_string()).collect()));
        self.call(OP, ApiClass::Mutating, || call.clone().send()).await.map(|_| ())
    }
}

impl RouteTables for Ec2Cloud {
    async fn route_table(&self, table_id: &str) -> Result<RouteTable> {
        if let Err(e) = check_id("table_id", table_id, "rtb-") {
            return self.refuse("DescribeRouteTables", e);
        }
        one("DescribeRouteTables", table_id, self.describe_route_tables(vec![table_id.to_string()], Vec::new()).await?)
    }

    async fn route_table_for_subnet(&self, vpc_id: &str, subnet_id: &str) -> Result<RouteTable> {
        let checked = check_id("vpc_id", vpc_id, "vpc-").and_then(|_| check_id("subnet_id", subnet_id, "subnet-"));
        if let Err(e) = checked {
            return self.refuse("DescribeRouteTables", e);
        }
        let assoc = self.describe_route_tables(Vec::new(), vec![filter("association.subnet-id", [subnet_id])]).await?;
        if let Some(t) = assoc.into_iter().next() {
            return Ok(t);
        }
        let main = self
            .describe_route_tables(Vec::new(), vec![filter("vpc-id", [vpc_id]), filter("association.main", ["true"])])
            .await?;
        one("DescribeRouteTables", &format!("main route table of {vpc_id}"), main)
    }

    async fn ensure_route(
        &self,
        vpc: &Vpc,
        table_id: &str,
        destination: Ipv4Net,
        target: &RouteTarget,
    ) -> Result<RouteChange> {
        const OP: &str = "CreateRoute";
        self.check_route_args(OP, vpc, table_id, destination, target)?;
        let table = self.route_table(table_id).await?;
        if let Some(r) = table.routes.iter().find(|r| r.destination == destination) {
            if r.points_to(target) {
                return Ok(RouteChange::Unchanged);
            }
            let e = CloudError::InUse {
                op: OP,
                code: "RouteAlreadyExists".into(),
                message: format!("{destination} in {table_id} points to {:?} ({}), not {target:?}", r.target, r.state),
            };
            return self.refuse(OP, e);
        }
        let call = self.client.create_route().route_table_id(table_id).destination_cidr_block(destination.to_string());
        let call = match target {
            RouteTarget::Instance(i) => call.instance_id(i),
            RouteTarget::Eni(e) => call.network_interface_id(e),
            RouteTarget::Other(_) => unreachable!("refused by check_route_args"),
        };
        self.call(OP, ApiClass::Mutating, || call.clone().send()).await?;
        Ok(RouteChange::Created)
    }

    async fn replace_route(&self, vpc: &Vpc, table_id: &str, destination: Ipv4Net, target: &RouteTarget) -> Result<()> {
        const OP: &str = "ReplaceRoute";
        self.check_route_args(OP, vpc, table_id, destination, target)?;
        let call = self.client.replace_route().route_table_id(table_id).destination_cidr_block(destination.to_string());
        let call = match target {
            RouteTarget::Instance(i) => call.instance_id(i),
            RouteTarget::Eni(e) => call.network_interface_id(e),
            RouteTarget::Other(_) => unreachable!("refused by check_route_args"),
        };
        self.call(OP, ApiClass::Mutating, || call.clone().send()).await.map(|_| ())
    }

    async fn delete_route(&self, table_id: &str, destination: Ipv4Net) -> Result<()> {
        const OP: &str = "DeleteRoute";
        if let Err(e) = check_id("table_id", table_id, "rtb-") {
            return self.refuse(OP, e);
        }
        let call = self.client.delete_route().route_table_id(table_id).destination_cidr_block(destination.to_string());
        self.call(OP, ApiClass::Mutating, || call.clone().send()).await.map(|_| ())
    }
}
