//! The rules AWS enforces and LocalStack does not. Each rule is a pure function of the request and
//! a view of EC2's state (table-tested below); [`evaluate`] builds the view by asking LocalStack
//! directly (uncounted, unthrottled: the front keeps no copy of state LocalStack has).

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::Filter;
use ipnet::Ipv4Net;
use underway_cloud::limits::{InstanceLimits, static_limits};

use super::wire::Params;

/// A rule of AWS's that the front enforces. Its name appears in the record and the run's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    /// A route more specific than the VPC's local route that is not a whole subnet to an ENI.
    RouteInsideVpc,
    /// A route whose target is an instance with more than one network interface.
    RouteInstanceTarget,
    /// A table already holding its capacity of routes.
    RouteLimit,
    /// CreateRoute for a destination the table has.
    RouteExists,
    /// More ENIs than the instance type allows.
    EniLimit,
    /// An attachment at a device index the instance uses.
    DeviceIndexInUse,
    /// More IPv4 addresses on an ENI than its instance type allows.
    AddressLimit,
    /// More addresses than the subnet has free.
    SubnetCapacity,
    /// Unassigning an address the ENI does not have (a retry after a lost reply does this).
    AddressNotAssigned,
    /// Over the account's request rate.
    RequestRate,
}

impl Rule {
    pub const ALL: [Rule; 10] = [
        Rule::RouteInsideVpc,
        Rule::RouteInstanceTarget,
        Rule::RouteLimit,
        Rule::RouteExists,
        Rule::EniLimit,
        Rule::DeviceIndexInUse,
        Rule::AddressLimit,
        Rule::SubnetCapacity,
        Rule::AddressNotAssigned,
        Rule::RequestRate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rule::RouteInsideVpc => "route-inside-vpc",
            Rule::RouteInstanceTarget => "route-instance-target",
            Rule::RouteLimit => "route-limit",
            Rule::RouteExists => "route-exists",
            Rule::EniLimit => "eni-limit",
            Rule::DeviceIndexInUse => "device-index-in-use",
            Rule::AddressLimit => "address-limit",
            Rule::SubnetCapacity => "subnet-capacity",
            Rule::AddressNotAssigned => "address-not-assigned",
            Rule::RequestRate => "request-rate",
        }
    }
}

/// What the front answers instead of LocalStack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rule: Rule,
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

fn refuse(rule: Rule, code: &'static str, message: String) -> Refusal {
    Refusal { rule, status: 400, code, message }
}

/// The most IPv4 addresses any instance type lets one ENI hold (the largest types: 50). An ENI
/// that is not attached yet has no type, so CreateNetworkInterface is held to this.
pub const MAX_IPV4_PER_ENI_ANY_TYPE: usize = 50;

// ------------------------------------------------------------------------------------------------
// Routes

/// A route's target as the request names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Instance(String),
    Eni(String),
    NatGateway(String),
    /// A gateway, peering, transit gateway…: not checked further here.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRequest {
    pub table: String,
    pub destination: Ipv4Net,
    pub target: Target,
    /// CreateRoute (true) or ReplaceRoute (false).
    pub create: bool,
}

/// What the route rules need to know of EC2.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableView {
    pub vpc_cidrs: Vec<Ipv4Net>,
    pub subnet_cidrs: Vec<Ipv4Net>,
    /// Destinations of the table's routes, the VPC's `local` routes left out.
    pub routes: Vec<Ipv4Net>,
    /// Network interfaces attached to the target instance, when the target is an instance.
    pub instance_interfaces: Option<usize>,
}

/// The route rules, in the order AWS reports them.
pub fn check_route(req: &RouteRequest, view: &TableView, capacity: usize) -> Result<(), Refusal> {
    // VPC User Guide, "Route tables" → "Routes to IPv4 and IPv6 addresses more specific than the
    // local route": the destination "must match the entire IPv4 or IPv6 CIDR block of a subnet in
    // your VPC", and the target "must be a network interface, a NAT gateway or a Gateway Load
    // Balancer endpoint". A destination that contains a VPC block (0.0.0.0/0, 10.0.0.0/8) is less
    // specific than the local route and allowed: the local route wins by longest prefix.
    if let Some(block) = view.vpc_cidrs.iter().find(|b| b.contains(&req.destination)) {
        if !view.subnet_cidrs.contains(&req.destination) {
            return Err(refuse(
                Rule::RouteInsideVpc,
                "InvalidParameterValue",
                format!(
                    "The destination CIDR block {} is more specific than the VPC's local route {block} and does not match the CIDR block of a subnet in the VPC",
                    req.destination
                ),
            ));
        }
        if !matches!(req.target, Target::Eni(_) | Target::NatGateway(_)) {
            return Err(refuse(
                Rule::RouteInsideVpc,
                "InvalidParameterValue",
                format!(
                    "A route to subnet CIDR {} inside the VPC's local route {block} can target only a network interface, a NAT gateway or a Gateway Load Balancer endpoint",
                    req.destination
                ),
            ));
        }
    }
    // EC2 API reference, CreateRoute, InstanceId: "The operation fails if you specify an instance
    // ID unless exactly one network interface is attached."
    if let (Target::Instance(id), Some(n)) = (&req.target, view.instance_interfaces)
        && n > 1
    {
        return Err(refuse(
            Rule::RouteInstanceTarget,
            "InvalidInstanceID",
            format!(
                "There are multiple interfaces attached to instance '{id}'. Please specify an interface ID for the operation instead."
            ),
        ));
    }
    if req.create {
        // CreateRoute: "RouteAlreadyExists: a route for the specified destination already exists".
        if view.routes.contains(&req.destination) {
            return Err(refuse(
                Rule::RouteExists,
                "RouteAlreadyExists",
                format!("The route identified by {} already exists.", req.destination),
            ));
        }
        // VPC quotas: "Routes per route table (non-propagated routes)": 50 by default.
        if view.routes.len() >= capacity {
            return Err(refuse(
                Rule::RouteLimit,
                "RouteLimitExceeded",
                format!("The maximum number of routes has been reached for {} ({capacity}).", req.table),
            ));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// ENIs and addresses

/// What the attach rules need to know of EC2 (limits: the cloud crate's table, else the
/// emulator's DescribeInstanceTypes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachView {
    pub instance_type: String,
    pub limits: Option<InstanceLimits>,
    /// Device indexes in use on the instance.
    pub devices: Vec<u32>,
    /// IPv4 addresses on the ENI being attached, its primary included.
    pub eni_addresses: usize,
}

pub fn check_attach(device_index: u32, view: &AttachView) -> Result<(), Refusal> {
    if view.devices.contains(&device_index) {
        return Err(refuse(
            Rule::DeviceIndexInUse,
            "InvalidParameterValue",
            format!("Instance already has an interface attached at device index '{device_index}'."),
        ));
    }
    let Some(l) = view.limits else { return Ok(()) };
    // EC2 User Guide, "Maximum IP addresses per network interface": network interfaces per
    // instance type; AttachmentLimitExceeded past it.
    if view.devices.len() >= l.enis as usize {
        return Err(refuse(
            Rule::EniLimit,
            "AttachmentLimitExceeded",
            format!(
                "Interface count {} exceeds the limit for {} ({} network interfaces).",
                view.devices.len() + 1,
                view.instance_type,
                l.enis
            ),
        ));
    }
    if view.eni_addresses > l.ipv4_per_eni as usize {
        return Err(refuse(
            Rule::AddressLimit,
            "PrivateIpAddressLimitExceeded",
            format!(
                "The network interface has {} private IPv4 addresses; {} allows {} per interface.",
                view.eni_addresses, view.instance_type, l.ipv4_per_eni
            ),
        ));
    }
    Ok(())
}

/// What the address rules need to know of EC2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignView {
    /// IPv4 addresses on the ENI now, its primary included.
    pub current: usize,
    /// IPv4 per ENI for the attached instance's type; `None` when unattached (the largest type's).
    pub per_eni: Option<(String, u32)>,
    /// The subnet's AvailableIpAddressCount.
    pub subnet_free: Option<i64>,
}

pub fn check_assign(requested: usize, view: &AssignView) -> Result<(), Refusal> {
    let (limit, of) = match &view.per_eni {
        Some((t, n)) => (*n as usize, t.clone()),
        None => (MAX_IPV4_PER_ENI_ANY_TYPE, "any instance type".to_string()),
    };
    // AssignPrivateIpAddresses: "the number of secondary IP addresses that you can assign to an
    // instance varies by instance type" → PrivateIpAddressLimitExceeded.
    if view.current + requested > limit {
        return Err(refuse(
            Rule::AddressLimit,
            "PrivateIpAddressLimitExceeded",
            format!(
                "Number of private addresses will exceed limit: {} + {requested} > {limit} for {of}.",
                view.current
            ),
        ));
    }
    if let Some(free) = view.subnet_free
        && (requested as i64) > free
    {
        return Err(refuse(
            Rule::SubnetCapacity,
            "InsufficientFreeAddressesInSubnet",
            format!(
                "The specified subnet does not have enough free addresses to satisfy the request ({requested} asked, {free} free)."
            ),
        ));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Building the views from LocalStack

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

fn addresses_of(ni: &aws_sdk_ec2::types::NetworkInterface) -> usize {
    ni.private_ip_addresses().len().max(usize::from(ni.private_ip_address().is_some()))
}

async fn instance_type(c: &Client, id: &str) -> Option<String> {
    let out = c.describe_instances().instance_ids(id).send().await.ok()?;
    let i = out.reservations().iter().flat_map(|r| r.instances()).find(|i| i.instance_id() == Some(id))?;
    i.instance_type().map(|t| t.as_str().to_string())
}

/// A type's limits: the cloud crate's table, else LocalStack's DescribeInstanceTypes (realistic
/// network figures), so no type of a test goes unchecked.
async fn limits_of(c: &Client, instance_type: &str) -> Option<InstanceLimits> {
    if let Some(l) = static_limits(instance_type) {
        return Some(l);
    }
    let out = c
        .describe_instance_types()
        .instance_types(aws_sdk_ec2::types::InstanceType::from(instance_type))
        .send()
        .await
        .ok()?;
    let t = out.instance_types().first()?;
    let n = t.network_info()?;
    // An attach without NetworkCardIndex goes to card 0, which holds its own maximum (EC2 User
    // Guide, "Network cards"): past it, AttachmentLimitExceeded, whatever the instance's total.
    let all = u32::try_from(n.maximum_network_interfaces()?).ok()?;
    let card0 = n
        .network_cards()
        .iter()
        .find(|c| c.network_card_index() == Some(0))
        .and_then(|c| u32::try_from(c.maximum_network_interfaces()?).ok());
    Some(InstanceLimits {
        enis: card0.map_or(all, |c| c.min(all)),
        ipv4_per_eni: u32::try_from(n.ipv4_addresses_per_interface()?).ok()?,
        ipv6_per_eni: u32::try_from(n.ipv6_addresses_per_interface().unwrap_or(0)).unwrap_or(0),
        vcpus: t.v_cpu_info().and_then(|v| v.default_v_cpus()).and_then(|v| u32::try_from(v).ok()).unwrap_or(0),
    })
}

async fn enis_of_instance(c: &Client, id: &str) -> Vec<aws_sdk_ec2::types::NetworkInterface> {
    c.describe_network_interfaces()
        .filters(filter("attachment.instance-id", id))
        .send()
        .await
        .map(|o| o.network_interfaces().to_vec())
        .unwrap_or_default()
}

async fn eni(c: &Client, id: &str) -> Option<aws_sdk_ec2::types::NetworkInterface> {
    let out = c.describe_network_interfaces().network_interface_ids(id).send().await.ok()?;
    out.network_interfaces().first().cloned()
}

async fn subnet_free(c: &Client, id: &str) -> Option<i64> {
    let out = c.describe_subnets().subnet_ids(id).send().await.ok()?;
    out.subnets().first().and_then(|s| s.available_ip_address_count()).map(i64::from)
}

async fn table_view(c: &Client, req: &RouteRequest) -> Option<TableView> {
    let tables = c.describe_route_tables().route_table_ids(&req.table).send().await.ok()?;
    let t = tables.route_tables().first()?;
    let vpc_id = t.vpc_id()?;
    let vpcs = c.describe_vpcs().vpc_ids(vpc_id).send().await.ok()?;
    let mut view = TableView::default();
    for v in vpcs.vpcs() {
        for a in v.cidr_block_association_set() {
            let live = a.cidr_block_state().and_then(|s| s.state()).is_none_or(|s| s.as_str() == "associated");
            if let (true, Some(Ok(n))) = (live, a.cidr_block().map(str::parse::<Ipv4Net>))
                && !view.vpc_cidrs.contains(&n)
            {
                view.vpc_cidrs.push(n);
            }
        }
        if let Some(Ok(n)) = v.cidr_block().map(str::parse::<Ipv4Net>)
            && !view.vpc_cidrs.contains(&n)
        {
            view.vpc_cidrs.push(n);
        }
    }
    let subnets = c.describe_subnets().filters(filter("vpc-id", vpc_id)).send().await.ok()?;
    view.subnet_cidrs = subnets.subnets().iter().filter_map(|s| s.cidr_block()?.parse().ok()).collect();
    view.routes = t
        .routes()
        .iter()
        .filter(|r| r.gateway_id() != Some("local"))
        .filter_map(|r| r.destination_cidr_block()?.parse().ok())
        .collect();
    if let Target::Instance(id) = &req.target {
        view.instance_interfaces = Some(enis_of_instance(c, id).await.len());
    }
    Some(view)
}

fn route_request(p: &Params, create: bool) -> Option<RouteRequest> {
    let destination: Ipv4Net = p.get("DestinationCidrBlock")?.parse().ok()?;
    let target = if let Some(i) = p.get("InstanceId") {
        Target::Instance(i.to_string())
    } else if let Some(e) = p.get("NetworkInterfaceId") {
        Target::Eni(e.to_string())
    } else if let Some(n) = p.get("NatGatewayId") {
        Target::NatGateway(n.to_string())
    } else {
        Target::Other
    };
    Some(RouteRequest { table: p.get("RouteTableId")?.to_string(), destination, target, create })
}

/// Checks one request against every rule that applies to its action. `None`: forward it. A view
/// that cannot be built (an id LocalStack does not know) forwards too: LocalStack answers
/// NotFound itself.
pub async fn evaluate(c: &Client, p: &Params, route_capacity: usize) -> Option<Refusal> {
    match p.action() {
        a @ ("CreateRoute" | "ReplaceRoute") => {
            let req = route_request(p, a == "CreateRoute")?;
            let view = table_view(c, &req).await?;
            check_route(&req, &view, route_capacity).err()
        }
        "AttachNetworkInterface" => {
            let instance = p.get("InstanceId")?;
            let device = u32::try_from(p.number("DeviceIndex")?).ok()?;
            let itype = instance_type(c, instance).await?;
            let attached = enis_of_instance(c, instance).await;
            let target = eni(c, p.get("NetworkInterfaceId")?).await?;
            let view = AttachView {
                limits: limits_of(c, &itype).await,
                instance_type: itype,
                devices: attached
                    .iter()
                    .filter_map(|n| n.attachment()?.device_index())
                    .map(|d| d.max(0) as u32)
                    .collect(),
                eni_addresses: addresses_of(&target),
            };
            check_attach(device, &view).err()
        }
        "AssignPrivateIpAddresses" => {
            let target = eni(c, p.get("NetworkInterfaceId")?).await?;
            let requested = p.number("SecondaryPrivateIpAddressCount").map(|n| n.max(0) as usize).unwrap_or(0)
                + p.list("PrivateIpAddress").len();
            if requested == 0 {
                return None; // prefixes: LocalStack ignores them; the replay tests cover them
            }
            let per_eni = match target.attachment().and_then(|a| a.instance_id()) {
                Some(i) => {
                    let t = instance_type(c, i).await?;
                    limits_of(c, &t).await.map(|l| (t, l.ipv4_per_eni))
                }
                None => None,
            };
            let view = AssignView {
                current: addresses_of(&target),
                per_eni,
                subnet_free: match target.subnet_id() {
                    Some(s) => subnet_free(c, s).await,
                    None => None,
                },
            };
            check_assign(requested, &view).err()
        }
        "UnassignPrivateIpAddresses" => {
            // EC2 API reference, UnassignPrivateIpAddresses: the addresses must be secondary
            // addresses of the interface; others are refused (LocalStack ignores them).
            let target = eni(c, p.get("NetworkInterfaceId")?).await?;
            let has: Vec<&str> = target.private_ip_addresses().iter().filter_map(|a| a.private_ip_address()).collect();
            let missing: Vec<&str> = p.list("PrivateIpAddress").into_iter().filter(|a| !has.contains(a)).collect();
            (!missing.is_empty()).then(|| {
                refuse(
                    Rule::AddressNotAssigned,
                    "InvalidParameterValue",
                    format!(
                        "Some of the specified addresses are not assigned to interface {}: {}",
                        target.network_interface_id().unwrap_or_default(),
                        missing.join(", ")
                    ),
                )
            })
        }
        "CreateNetworkInterface" => {
            // The ENI's addresses: its primary (named or not), the listed ones, and a count.
            let listed =
                p.0.keys().filter(|k| k.starts_with("PrivateIpAddresses.") && k.ends_with(".PrivateIpAddress")).count();
            let secondary = p.number("SecondaryPrivateIpAddressCount").map(|n| n.max(0) as usize).unwrap_or(0);
            let total = listed.max(1) + secondary;
            let view = AssignView { current: 0, per_eni: None, subnet_free: subnet_free(c, p.get("SubnetId")?).await };
            check_assign(total, &view).err()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn view(routes: &[&str], interfaces: Option<usize>) -> TableView {
        TableView {
            vpc_cidrs: vec![net("10.0.0.0/16"), net("10.1.0.0/16")],
            subnet_cidrs: vec![net("10.0.0.0/18"), net("10.1.0.0/24")],
            routes: routes.iter().map(|r| net(r)).collect(),
            instance_interfaces: interfaces,
        }
    }

    fn route(dest: &str, target: Target) -> RouteRequest {
        RouteRequest { table: "rtb-1".into(), destination: net(dest), target, create: true }
    }

    #[test]
    fn route_rules_follow_the_vpc_guide() {
        let i = || Target::Instance("i-1".into());
        let e = || Target::Eni("eni-1".into());
        type Case = (RouteRequest, TableView, Option<(Rule, &'static str)>);
        let cases: Vec<Case> = vec![
            // Inside the primary block, not a subnet: refused whatever the target.
            (route("10.0.128.0/24", i()), view(&[], Some(1)), Some((Rule::RouteInsideVpc, "InvalidParameterValue"))),
            (route("10.0.128.0/24", e()), view(&[], None), Some((Rule::RouteInsideVpc, "InvalidParameterValue"))),
            // Inside a secondary block too.
            (route("10.1.5.0/24", e()), view(&[], None), Some((Rule::RouteInsideVpc, "InvalidParameterValue"))),
            // A whole subnet: an ENI may take it, an instance may not.
            (route("10.0.0.0/18", e()), view(&[], None), None),
            (route("10.0.0.0/18", i()), view(&[], Some(1)), Some((Rule::RouteInsideVpc, "InvalidParameterValue"))),
            (route("10.0.0.0/18", Target::NatGateway("nat-1".into())), view(&[], None), None),
            // Outside every block: fine to an instance with one interface, not with two.
            (route("100.64.1.0/24", i()), view(&[], Some(1)), None),
            (route("100.64.1.0/24", i()), view(&[], Some(2)), Some((Rule::RouteInstanceTarget, "InvalidInstanceID"))),
            (route("100.64.1.0/24", e()), view(&[], None), None),
            // Less specific than the local route: allowed (the local route wins).
            (route("0.0.0.0/0", Target::Other), view(&[], None), None),
            (route("10.0.0.0/8", Target::Other), view(&[], None), None),
            // Duplicates and capacity (3 here).
            (
                route("100.64.1.0/24", e()),
                view(&["100.64.1.0/24"], None),
                Some((Rule::RouteExists, "RouteAlreadyExists")),
            ),
            (
                route("100.64.4.0/24", e()),
                view(&["100.64.1.0/24", "100.64.2.0/24", "100.64.3.0/24"], None),
                Some((Rule::RouteLimit, "RouteLimitExceeded")),
            ),
            (route("100.64.4.0/24", e()), view(&["100.64.1.0/24", "100.64.2.0/24"], None), None),
        ];
        for (req, v, want) in cases {
            let got = check_route(&req, &v, 3).err().map(|r| (r.rule, r.code));
            assert_eq!(got, want, "{req:?} with {v:?}");
        }
        // ReplaceRoute neither counts nor minds the existing destination.
        let mut replace = route("100.64.1.0/24", e());
        replace.create = false;
        assert_eq!(check_route(&replace, &view(&["100.64.1.0/24", "1.0.0.0/8", "2.0.0.0/8"], None), 3), Ok(()));
    }

    fn limits(enis: u32, ipv4: u32) -> Option<InstanceLimits> {
        Some(InstanceLimits { enis, ipv4_per_eni: ipv4, ipv6_per_eni: ipv4, vcpus: 2 })
    }

    #[test]
    fn attach_rules_use_the_types_limits() {
        let v = |devices: &[u32], addrs: usize, l| AttachView {
            instance_type: "t3.medium".into(),
            limits: l,
            devices: devices.to_vec(),
            eni_addresses: addrs,
        };
        let cases = [
            (1, v(&[0], 1, limits(3, 6)), None),
            (2, v(&[0, 1], 6, limits(3, 6)), None),
            (1, v(&[0, 1], 1, limits(3, 6)), Some(Rule::DeviceIndexInUse)),
            (3, v(&[0, 1, 2], 1, limits(3, 6)), Some(Rule::EniLimit)),
            (1, v(&[0], 7, limits(3, 6)), Some(Rule::AddressLimit)),
            (9, v(&[0, 1, 2, 3, 4], 60, None), None),
        ];
        for (dev, view, want) in cases {
            assert_eq!(check_attach(dev, &view).err().map(|r| r.rule), want, "device {dev} {view:?}");
        }
    }

    #[test]
    fn address_rules_count_the_primary_and_the_subnet() {
        let v = |current, per: Option<u32>, free| AssignView {
            current,
            per_eni: per.map(|n| ("t3.medium".to_string(), n)),
            subnet_free: free,
        };
        let cases = [
            (5, v(1, Some(6), Some(100)), None),
            (6, v(1, Some(6), Some(100)), Some(Rule::AddressLimit)),
            (1, v(6, Some(6), Some(100)), Some(Rule::AddressLimit)),
            (49, v(1, None, Some(100)), None),
            (50, v(1, None, Some(100)), Some(Rule::AddressLimit)),
            (5, v(1, Some(6), Some(4)), Some(Rule::SubnetCapacity)),
            (4, v(1, Some(6), Some(4)), None),
            (4, v(1, Some(6), None), None),
        ];
        for (n, view, want) in cases {
            assert_eq!(check_assign(n, &view).err().map(|r| r.rule), want, "{n} more on {view:?}");
        }
    }

    #[test]
    fn requests_name_their_route_target() {
        let p = Params::parse(
            b"Action=CreateRoute&RouteTableId=rtb-1&DestinationCidrBlock=100.64.0.0%2F24&NetworkInterfaceId=eni-9",
            None,
        );
        let r = route_request(&p, true).unwrap();
        assert_eq!(r.target, Target::Eni("eni-9".into()));
        assert_eq!(r.destination, net("100.64.0.0/24"));
        assert!(route_request(&Params::parse(b"Action=CreateRoute&RouteTableId=rtb-1", None), true).is_none());
    }
}
