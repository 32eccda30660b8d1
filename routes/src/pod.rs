//! Pod set-up and teardown: the veth, the pod's /32 and link-local gateway, the host route and,
//! for an address of a secondary ENI, the policy rules.
//!
//! ```text
//! pod netns:  <ifname> 10.0.1.5/32, 169.254.1.1 dev <ifname> scope link,
//!             default via 169.254.1.1, neigh 169.254.1.1 lladdr <host veth MAC> PERMANENT
//! host:       <host veth> up (alias underway/<network>/<attachment id>), 10.0.1.5/32 dev <host veth>
//!             scope link, rule 512: to 10.0.1.5 lookup main (every pod),
//!             [secondary ENI] rule 1536: from 10.0.1.5 lookup <table>
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::netns::{Ns, handle_in};
use crate::{Result, RoutesError};

/// Priority of the `to <pod> lookup main` rule (before the `from` rules).
pub const RULE_TO_POD: u32 = 512;
/// Priority of the `from <pod> lookup <ENI table>` rule.
pub const RULE_FROM_POD: u32 = 1536;
pub const MAIN_TABLE: u32 = 254;
const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
/// The loopback device's index, the same in every network namespace.
const LOOPBACK_INDEX: u32 = 1;

/// What to build for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// The CNI network the pod belongs to and the attachment's id ([`host_veth_name`]): written
    /// into the host veth's alias (`underway/<network>/<attachment>`), so a GC of one network never
    /// touches another's veths, and a DEL never removes a veth that now belongs to another
    /// sandbox of the same pod (same [`pod_veth_name`]).
    pub network: String,
    pub attachment: String,
    pub host_veth: String,
    pub ifname: String,
    pub address: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    /// The secondary ENI's route table; `None` for the primary ENI and VPC-route mode.
    pub route_table: Option<u32>,
}

/// The MACs of the two ends, for the CNI result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLinks {
    pub host_mac: String,
    pub pod_mac: String,
}

pub fn mac_string(mac: &[u8]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The attachment's id: `prefix` + FNV-1a of (container id, ifname), 15 bytes, the same for the
/// same attachment every time. It is the host veth's name when the runtime does not say which pod
/// the sandbox is for, and it is written into every host veth's alias
/// (`underway/<network>/<id>`), so DEL, GC and ipamd find an attachment's veth whatever its name.
pub fn host_veth_name(prefix: &str, container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in container_id.bytes().chain(std::iter::once(b'/')).chain(ifname.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    let hex = format!("{h:016x}");
    let keep = 15usize.saturating_sub(prefix.len()).min(hex.len());
    format!("{prefix}{}", &hex[..keep])
}

/// The host veth's name as policy engines compute it from the pod: `prefix` + the first 11 hex
/// digits of sha1("<namespace>.<pod>") (Calico's `interfacePrefix` naming, also the AWS network
/// policy agent's). Only for the pod's first interface (`eth0`): a second attachment of the same
/// pod would get the same name. Otherwise, and when the runtime does not pass the pod
/// (K8S_POD_NAMESPACE, K8S_POD_NAME), [`host_veth_name`].
pub fn pod_veth_name(prefix: &str, pod: Option<(&str, &str)>, container_id: &str, ifname: &str) -> String {
    match pod {
        Some((namespace, name)) if ifname == "eth0" && !namespace.is_empty() && !name.is_empty() => {
            use sha1::Digest;
            let digest = sha1::Sha1::digest(format!("{namespace}.{name}").as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            format!("{prefix}{}", &hex[..11])
        }
        _ => host_veth_name(prefix, container_id, ifname),
    }
}

/// Checks an interface name as the kernel would take it.
pub fn check_ifname(field: &'static str, name: &str) -> Result<()> {
    let bad = |reason: &str| Err(RoutesError::Invalid { field, reason: format!("{name:?} {reason}") });
    if name.is_empty() || name.len() > 15 {
        return bad("must be 1 to 15 bytes");
    }
    if name == "." || name == ".." || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return bad("has a character an interface name cannot have");
    }
    Ok(())
}

/// The link named `name`, if there is one (ENODEV is "none").
async fn link_message(h: &Handle, name: &str) -> Result<Option<rtnetlink::packet_route::link::LinkMessage>> {
    match h.link().get().match_name(name.to_string()).execute().try_next().await {
        Ok(found) => Ok(found),
        Err(e) => {
            let e = RoutesError::Netlink { op: format!("get link {name}"), source: e };
            if e.errno() == Some(ENODEV) { Ok(None) } else { Err(e) }
        }
    }
}

/// The index and MAC of the link named `name`, if there is one.
async fn link(h: &Handle, name: &str) -> Result<Option<(u32, Vec<u8>)>> {
    Ok(link_message(h, name).await?.map(|m| {
        let mac = m.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(mac) => Some(mac.clone()),
            _ => None,
        });
        (m.header.index, mac.unwrap_or_default())
    }))
}

async fn need_link(h: &Handle, name: &str, where_: &str) -> Result<(u32, Vec<u8>)> {
    link(h, name).await?.ok_or_else(|| RoutesError::Missing(format!("link {name} in {where_}")))
}

fn ok_if_exists(r: Result<()>) -> Result<()> {
    match r {
        Err(e) if e.errno() == Some(EEXIST) => Ok(()),
        other => other,
    }
}

/// The veth pair of an attachment: everything of a pod's datapath that needs no address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethSpec {
    /// See [`PodSpec::network`] and [`PodSpec::attachment`]: written into the host veth's alias.
    pub network: String,
    pub attachment: String,
    pub host_veth: String,
    pub ifname: String,
    pub mtu: u32,
}

impl PodSpec {
    /// The veth pair this pod's datapath starts from.
    pub fn veth(&self) -> VethSpec {
        VethSpec {
            network: self.network.clone(),
            attachment: self.attachment.clone(),
            host_veth: self.host_veth.clone(),
            ifname: self.ifname.clone(),
            mtu: self.mtu,
        }
    }
}

/// A pod's veth pair, both ends up, without an address yet: the first half of [`setup_pod`],
/// which the CNI plugin makes while ipamd answers (it needs nothing from ipamd), then
/// [`finish`](Self::finish)es with the address or [`discard`](Self::discard)s.
pub struct PodVeth {
    host: Ns,
    pod: Ns,
    veth: VethSpec,
    host_index: u32,
    host_mac: Vec<u8>,
    pod_index: u32,
    pod_mac: Vec<u8>,
}

impl std::fmt::Debug for PodVeth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodVeth").field("veth", &self.veth).field("host_index", &self.host_index).finish()
    }
}

/// Which host veth of the same name [`make_veth`] may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// Only this attachment's (an earlier, interrupted ADD of it); another's is
    /// [`RoutesError::Occupied`]. For a veth made before the pod's address is known: a refused
    /// ADD must not cut off an older sandbox of the same pod.
    OnlyOurs,
    /// Any (an older sandbox's of the same pod: policy-engine names are per pod), with the rules
    /// of the addresses it routed.
    Any,
}

/// Makes an attachment's veth pair: the host end in `host` (`None`: this process's namespace), the
/// pod end in `pod_netns` under its final name, both up, the host end's alias naming the
/// attachment. A host veth of the same name is replaced first as `replace` allows, with the
/// rules of the addresses it routed. On failure whatever was made is removed again.
pub async fn make_veth(host: Option<&Path>, pod_netns: &Path, v: &VethSpec, replace: Replace) -> Result<PodVeth> {
    check_ifname("host_veth", &v.host_veth)?;
    check_ifname("ifname", &v.ifname)?;
    let host = handle_in(host)?;
    let pod = handle_in(Some(pod_netns))?;
    let h = &host.handle;
    if let Some(l) = link_message(h, &v.host_veth).await? {
        let index = l.header.index;
        // Ours by its alias (or, made before aliases were written, by its name).
        let owner = veth_of(l, "");
        let ours = owner
            .as_ref()
            .is_some_and(|o| o.attachment == v.attachment && o.network.as_deref().is_none_or(|n| n == v.network));
        if !ours && replace == Replace::OnlyOurs {
            let owner =
                owner.map_or("unknown".into(), |o| format!("{}/{}", o.network.unwrap_or_default(), o.attachment));
            return Err(RoutesError::Occupied { veth: v.host_veth.clone(), owner });
        }
        remove_link(h, &v.host_veth, Some(index), None).await?;
    }
    match make(&host, &pod, v).await {
        Ok((host_index, host_mac, pod_index, pod_mac)) => {
            Ok(PodVeth { host, pod, veth: v.clone(), host_index, host_mac, pod_index, pod_mac })
        }
        Err(e) => {
            let _ = remove_veth(&host.handle, &v.host_veth, None).await;
            Err(e)
        }
    }
}

/// (host index, host MAC, pod index, pod MAC) of the pair made.
async fn make(host: &Ns, pod: &Ns, v: &VethSpec) -> Result<(u32, Vec<u8>, u32, Vec<u8>)> {
    let (h, p) = (&host.handle, &pod.handle);
    // Both ends are made by one RTM_NEWLINK, the pod's directly in the pod netns under its final
    // name: moving a link between namespaces afterwards costs the kernel a synchronize_net (about
    // 18 ms here, most of an ADD). (Up it cannot be made there: the kernel opens the peer before
    // the pair is joined and refuses, ENOTCONN.)
    let peer = LinkUnspec::new_with_name(&v.ifname).mtu(v.mtu).setns_by_fd(pod.file.as_raw_fd()).build();
    let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(v.host_veth.clone())
        .mtu(v.mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    h.link()
        .add(veth)
        .execute()
        .await
        .map_err(RoutesError::netlink(format!("create veth {} with {} in the pod netns", v.host_veth, v.ifname)))?;
    let (pidx, pod_mac) = need_link(p, &v.ifname, "pod netns").await?;
    p.link()
        .set(LinkUnspec::new_with_index(pidx).up().build())
        .execute()
        .await
        .map_err(RoutesError::netlink("pod link up"))?;
    // The loopback device is index 1 in every network namespace.
    if let Err(e) = p.link().set(LinkUnspec::new_with_index(LOOPBACK_INDEX).up().build()).execute().await {
        let e = RoutesError::Netlink { op: "pod lo up".into(), source: e };
        if e.errno() != Some(ENODEV) {
            return Err(e);
        }
    }
    let (hidx, host_mac) = need_link(h, &v.host_veth, "host").await?;
    let mut up = LinkUnspec::new_with_index(hidx).up().build();
    up.attributes.push(LinkAttribute::IfAlias(veth_alias(&v.network, &v.attachment)));
    h.link().set(up).execute().await.map_err(RoutesError::netlink("host veth up"))?;
    Ok((hidx, host_mac, pidx, pod_mac))
}

impl PodVeth {
    /// Gives the pod `spec`'s address, routes, neighbour and rules (the veth must be `spec`'s).
    /// On failure the veth is removed, and the address's rules only once its host route was
    /// this pod's (before, they can only be another pod's: [`RoutesError::InUse`]).
    pub async fn finish(self, spec: &PodSpec) -> Result<PodLinks> {
        if spec.host_veth != self.veth.host_veth || spec.ifname != self.veth.ifname {
            let _ = self.discard().await;
            return Err(RoutesError::Invalid {
                field: "host_veth",
                reason: format!("{}/{} is not the veth made for it", spec.host_veth, spec.ifname),
            });
        }
        let h = &self.host.handle;
        // Until the host route is this pod's, the address's rules (if any) are another pod's:
        // only the veth goes (the pod side made so far goes with it).
        if let Err(e) = self.wire(spec).await {
            let _ = remove_link(h, &spec.host_veth, Some(self.host_index), None).await;
            return Err(e);
        }
        if let Err(e) = self.rules(spec).await {
            let _ = remove_link(h, &spec.host_veth, Some(self.host_index), Some(spec.address)).await;
            return Err(e);
        }
        Ok(PodLinks { host_mac: mac_string(&self.host_mac), pod_mac: mac_string(&self.pod_mac) })
    }

    /// Removes the veth pair (nothing was routed through it yet).
    pub async fn discard(self) -> Result<()> {
        remove_link(&self.host.handle, &self.veth.host_veth, Some(self.host_index), None).await
    }

    /// The pod side, then the host route (exclusive: refused if another pod holds the address).
    async fn wire(&self, spec: &PodSpec) -> Result<()> {
        let (h, p) = (&self.host.handle, &self.pod.handle);
        let (hidx, pidx) = (self.host_index, self.pod_index);
        if spec.mtu != self.veth.mtu {
            // Made before ipamd said which MTU (the conflist sets none): both ends follow it.
            p.link()
                .set(LinkUnspec::new_with_index(pidx).mtu(spec.mtu).build())
                .execute()
                .await
                .map_err(RoutesError::netlink("pod link mtu"))?;
            h.link()
                .set(LinkUnspec::new_with_index(hidx).mtu(spec.mtu).build())
                .execute()
                .await
                .map_err(RoutesError::netlink("host veth mtu"))?;
        }
        ok_if_exists(
            p.address()
                .add(pidx, IpAddr::V4(spec.address), 32)
                .execute()
                .await
                .map_err(RoutesError::netlink(format!("add {}/32 in the pod", spec.address))),
        )?;
        let gw_route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(spec.gateway, 32)
            .output_interface(pidx)
            .scope(RouteScope::Link)
            .build();
        p.route().add(gw_route).replace().execute().await.map_err(RoutesError::netlink("pod route to the gateway"))?;
        let default = RouteMessageBuilder::<Ipv4Addr>::new().gateway(spec.gateway).output_interface(pidx).build();
        p.route().add(default).replace().execute().await.map_err(RoutesError::netlink("pod default route"))?;
        p.neighbours()
            .add(pidx, IpAddr::V4(spec.gateway))
            .link_layer_address(&self.host_mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(RoutesError::netlink("pod neighbour for the gateway"))?;

        let host_route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(spec.address, 32)
            .output_interface(hidx)
            .scope(RouteScope::Link)
            .build();
        // Created exclusively: if the address already leads to another pod's veth (handed out
        // twice, or another ADD racing for it) this fails, naming the holder, before this pod
        // takes any of its traffic (issue 14, item 1).
        if let Err(e) = h.route().add(host_route).execute().await.map_err(RoutesError::netlink("host route to the pod"))
        {
            if e.errno() == Some(EEXIST) {
                refuse_if_held(h, spec).await?;
            }
            return Err(e);
        }
        Ok(())
    }

    /// The host's rules for the address, once its host route is this pod's.
    async fn rules(&self, spec: &PodSpec) -> Result<()> {
        let h = &self.host.handle;
        // Every pod: traffic *to* it is delivered locally even when the sender's own `from` rule
        // would send it out through a secondary ENI (a secondary-ENI pod answering a primary one).
        ok_if_exists(
            h.rule()
                .add()
                .v4()
                .destination_prefix(spec.address, 32)
                .table_id(MAIN_TABLE)
                .action(RuleAction::ToTable)
                .priority(RULE_TO_POD)
                .execute()
                .await
                .map_err(RoutesError::netlink("rule to pod lookup main")),
        )?;
        if let Some(table) = spec.route_table {
            ok_if_exists(
                h.rule()
                    .add()
                    .v4()
                    .source_prefix(spec.address, 32)
                    .table_id(table)
                    .action(RuleAction::ToTable)
                    .priority(RULE_FROM_POD)
                    .execute()
                    .await
                    .map_err(RoutesError::netlink(format!("rule from pod lookup {table}"))),
            )?;
        }
        Ok(())
    }
}

/// Builds the pod's datapath ([`make_veth`], then [`PodVeth::finish`]). `host` is the node's
/// namespace (`None`: this process's own). On failure, whatever was made is removed again
/// before the error is returned.
pub async fn setup_pod(host: Option<&Path>, pod_netns: &Path, spec: &PodSpec) -> Result<PodLinks> {
    make_veth(host, pod_netns, &spec.veth(), Replace::Any).await?.finish(spec).await
}

/// The link another pod's host route for `address` goes through, if there is one (a route through
/// a link lives only as long as the link is up, so the holder is live).
async fn route_holder(h: &Handle, address: Ipv4Addr, own: &str) -> Result<Option<String>> {
    let routes: Vec<RouteMessage> =
        h.route().get(route_dump()).execute().try_collect().await.map_err(RoutesError::netlink("list routes"))?;
    let oifs = routes.iter().filter(|r| {
        r.header.destination_prefix_length == 32
            && r.header.table == MAIN_TABLE as u8
            && r.attributes.contains(&RouteAttribute::Destination(RouteAddress::Inet(address)))
    });
    for r in oifs {
        let Some(idx) = r.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None })
        else {
            continue;
        };
        let mut s = h.link().get().match_index(idx).execute();
        let name = match s.try_next().await {
            Ok(Some(m)) => m
                .attributes
                .iter()
                .find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None })
                .unwrap_or_else(|| format!("link {idx}")),
            _ => continue,
        };
        if name != own {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

async fn refuse_if_held(h: &Handle, spec: &PodSpec) -> Result<()> {
    match route_holder(h, spec.address, &spec.host_veth).await? {
        Some(holder) => Err(RoutesError::InUse { address: spec.address, holder }),
        None => Ok(()),
    }
}

fn route_dump() -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new().build()
}

/// The /32 destinations routed through link `idx` (the pods behind a host veth).
async fn addresses_via(h: &Handle, idx: u32) -> Result<Vec<Ipv4Addr>> {
    let routes: Vec<RouteMessage> =
        h.route().get(route_dump()).execute().try_collect().await.map_err(RoutesError::netlink("list routes"))?;
    Ok(routes
        .iter()
        .filter(|r| r.header.destination_prefix_length == 32 && r.attributes.contains(&RouteAttribute::Oif(idx)))
        .filter_map(|r| {
            r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                _ => None,
            })
        })
        .collect())
}

/// Verifies every piece `setup_pod` makes; the error names the first missing one.
pub async fn check_pod(host: Option<&Path>, pod_netns: &Path, spec: &PodSpec) -> Result<()> {
    let host = handle_in(host)?;
    let pod = handle_in(Some(pod_netns))?;
    let (h, p) = (&host.handle, &pod.handle);
    let (hidx, host_mac) = need_link(h, &spec.host_veth, "host").await?;
    let mut s = p.link().get().match_name(spec.ifname.clone()).execute();
    let pl = match s.try_next().await {
        Ok(Some(m)) => m,
        _ => return Err(RoutesError::Missing(format!("interface {} in the pod netns", spec.ifname))),
    };
    if !pl.header.flags.contains(LinkFlags::Up) {
        return Err(RoutesError::Missing(format!("interface {} is down", spec.ifname)));
    }
    let pidx = pl.header.index;
    let addrs: Vec<_> = p
        .address()
        .get()
        .set_link_index_filter(pidx)
        .execute()
        .try_collect()
        .await
        .map_err(RoutesError::netlink("list pod addresses"))?;
    let has_addr = addrs.iter().any(|a| {
        a.header.prefix_len == 32 && a.attributes.contains(&AddressAttribute::Address(IpAddr::V4(spec.address)))
    });
    if !has_addr {
        return Err(RoutesError::Missing(format!("address {}/32 on {}", spec.address, spec.ifname)));
    }
    let routes: Vec<RouteMessage> =
        p.route().get(route_dump()).execute().try_collect().await.map_err(RoutesError::netlink("list pod routes"))?;
    let default = routes.iter().any(|r| {
        r.header.destination_prefix_length == 0
            && r.attributes.contains(&RouteAttribute::Gateway(RouteAddress::Inet(spec.gateway)))
            && r.attributes.contains(&RouteAttribute::Oif(pidx))
    });
    if !default {
        return Err(RoutesError::Missing(format!("default route via {} in the pod", spec.gateway)));
    }
    let neighs: Vec<_> =
        p.neighbours().get().execute().try_collect().await.map_err(RoutesError::netlink("list pod neighbours"))?;
    let neigh = neighs.iter().any(|n| {
        n.header.ifindex == pidx
            && n.header.state == NeighbourState::Permanent
            && n.attributes.contains(&NeighbourAttribute::Destination(NeighbourAddress::Inet(spec.gateway)))
            && n.attributes.contains(&NeighbourAttribute::LinkLayerAddress(host_mac.clone()))
    });
    if !neigh {
        return Err(RoutesError::Missing(format!("permanent neighbour {} → host veth MAC in the pod", spec.gateway)));
    }
    if !addresses_via(h, hidx).await?.contains(&spec.address) {
        return Err(RoutesError::Missing(format!("host route {}/32 dev {}", spec.address, spec.host_veth)));
    }
    let rules: Vec<RuleMessage> =
        h.rule().get(IpVersion::V4).execute().try_collect().await.map_err(RoutesError::netlink("list rules"))?;
    let pod_rules: Vec<&RuleMessage> = rules.iter().filter(|r| is_pod_rule(r, spec.address)).collect();
    let has = |prio: u32, t: u32| {
        pod_rules.iter().any(|r| {
            r.attributes.contains(&RuleAttribute::Priority(prio))
                && r.header.action == RuleAction::ToTable
                && (r.attributes.contains(&RuleAttribute::Table(t)) || u32::from(r.header.table) == t)
        })
    };
    if !has(RULE_TO_POD, MAIN_TABLE) {
        return Err(RoutesError::Missing(format!("rule {RULE_TO_POD}: to {} lookup main", spec.address)));
    }
    if let Some(table) = spec.route_table
        && !has(RULE_FROM_POD, table)
    {
        return Err(RoutesError::Missing(format!("rule {RULE_FROM_POD}: from {} lookup {table}", spec.address)));
    }
    Ok(())
}

/// A host veth of underway's: its name, the network and attachment id its alias names (an alias
/// without an id, written before ids were, means the name is the id), and its link index.
struct HostVeth {
    name: String,
    network: Option<String>,
    attachment: String,
    index: u32,
}

/// The host veths named `prefix…` that underway made (their alias says so; a 15-byte name without
/// an alias is one made before aliases were written).
async fn host_veths(h: &Handle, prefix: &str) -> Result<Vec<HostVeth>> {
    let links: Vec<_> = h.link().get().execute().try_collect().await.map_err(RoutesError::netlink("list links"))?;
    Ok(links.into_iter().filter_map(|l| veth_of(l, prefix)).collect())
}

fn veth_of(l: rtnetlink::packet_route::link::LinkMessage, prefix: &str) -> Option<HostVeth> {
    let name = l.attributes.iter().find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None });
    let alias =
        l.attributes.iter().find_map(|a| if let LinkAttribute::IfAlias(n) = a { Some(n.clone()) } else { None });
    let name = name.filter(|n| n.starts_with(prefix))?;
    let (network, attachment) = match alias.as_deref() {
        Some(alias) => {
            let (net, id) = parse_alias(alias)?;
            (Some(net.to_string()), id.unwrap_or(&name).to_string())
        }
        None if name.len() == 15 => (None, name.clone()),
        None => return None,
    };
    Some(HostVeth { name, network, attachment, index: l.header.index })
}

/// Deletes this network's host veths (by their alias) whose attachment id is not in `keep`, with
/// their pods' rules. Returns the names removed.
pub async fn gc_host_veths(
    host: Option<&Path>,
    prefix: &str,
    network: &str,
    keep: &std::collections::BTreeSet<String>,
) -> Result<Vec<String>> {
    let host = handle_in(host)?;
    let h = &host.handle;
    let mut removed = Vec::new();
    // Only this network's veths: the prefix alone would reach other networks' and any link
    // someone named alike.
    for v in host_veths(h, prefix).await? {
        if v.network.as_deref() == Some(network) && !keep.contains(&v.attachment) {
            remove_veth(h, &v.name, None).await?;
            removed.push(v.name);
        }
    }
    Ok(removed)
}

/// The alias a host veth of `network` for `attachment` carries.
pub fn veth_alias(network: &str, attachment: &str) -> String {
    format!("underway/{network}/{attachment}")
}

/// (network, attachment id) of an alias `underway/<network>[/<attachment>]`; `None` if the alias
/// is not underway's.
fn parse_alias(alias: &str) -> Option<(&str, Option<&str>)> {
    let rest = alias.strip_prefix("underway/")?;
    Some(match rest.split_once('/') {
        Some((net, id)) => (net, Some(id)),
        None => (rest, None),
    })
}

/// The host's pod veths (named `prefix…`, made by underway) as (attachment id, the pod addresses
/// routed through it): what the node's own state says is in use (ipamd checks its store against
/// it by attachment id, whatever the veth is named).
pub async fn pod_veths(host: Option<&Path>, prefix: &str) -> Result<Vec<(String, Vec<Ipv4Addr>)>> {
    Ok(pod_veths_named(host, prefix).await?.into_iter().map(|(id, _, addrs)| (id, addrs)).collect())
}

/// [`pod_veths`] with each veth's name: (attachment id, link name, addresses).
pub async fn pod_veths_named(host: Option<&Path>, prefix: &str) -> Result<Vec<(String, String, Vec<Ipv4Addr>)>> {
    let host = handle_in(host)?;
    let h = &host.handle;
    let mut out = Vec::new();
    for v in host_veths(h, prefix).await? {
        let addrs = addresses_via(h, v.index).await?;
        out.push((v.attachment, v.name, addrs));
    }
    Ok(out)
}

/// Removes the pod's datapath from the host side: its rules and its veth (the pod end, and the
/// routes on both, go with it). Anything already gone is fine; the pod netns may be gone too.
pub async fn teardown_pod(host: Option<&Path>, spec: &PodSpec) -> Result<()> {
    let host = handle_in(host)?;
    remove(&host.handle, spec).await
}

fn is_pod_rule(r: &RuleMessage, addr: Ipv4Addr) -> bool {
    let prio = r.attributes.iter().find_map(|a| if let RuleAttribute::Priority(p) = a { Some(*p) } else { None });
    let matches = |want: &RuleAttribute| r.attributes.iter().any(|a| a == want);
    match prio {
        Some(RULE_TO_POD) => r.header.dst_len == 32 && matches(&RuleAttribute::Destination(IpAddr::V4(addr))),
        Some(RULE_FROM_POD) => r.header.src_len == 32 && matches(&RuleAttribute::Source(IpAddr::V4(addr))),
        _ => false,
    }
}

async fn remove(h: &Handle, spec: &PodSpec) -> Result<()> {
    remove_veth(h, &spec.host_veth, Some(spec.address)).await
}

/// Removes a host veth and the rules of every pod address routed through it (and of `also`).
async fn remove_veth(h: &Handle, veth: &str, also: Option<Ipv4Addr>) -> Result<()> {
    let found = link(h, veth).await?.map(|(idx, _)| idx);
    remove_link(h, veth, found, also).await
}

/// Removes the link at index `found` (if any) and the rules of the addresses routed through it
/// (and of `also`). By index: a link of the same name made since it was looked up is not touched
/// (the index of a deleted link is gone: ENODEV, fine).
async fn remove_link(h: &Handle, veth: &str, found: Option<u32>, also: Option<Ipv4Addr>) -> Result<()> {
    let mut addrs: Vec<Ipv4Addr> = also.into_iter().collect();
    if let Some(idx) = found {
        addrs.extend(addresses_via(h, idx).await?);
    }
    let rules: Vec<RuleMessage> =
        h.rule().get(IpVersion::V4).execute().try_collect().await.map_err(RoutesError::netlink("list rules"))?;
    for r in rules.into_iter().filter(|r| addrs.iter().any(|a| is_pod_rule(r, *a))) {
        h.rule().del(r).execute().await.map_err(RoutesError::netlink("delete pod rule"))?;
    }
    if let Some(idx) = found {
        match h.link().del(idx).execute().await.map_err(RoutesError::netlink(format!("delete {veth}"))) {
            Err(e) if e.errno() == Some(ENODEV) => {}
            r => r?,
        }
    }
    Ok(())
}

/// Tears an attachment down by its host veth, finding the pod's address from the host route (DEL
/// knows nothing else). `host_veth` is removed only if it is this attachment's (its alias names
/// `attachment`): a veth of the same name may belong to a newer sandbox of the same pod. If it is
/// not, this attachment's veth is looked for by its alias (a DEL without the pod's name, or an ADD
/// made under another name). Nothing found is fine. Returns the veth removed, if one was.
pub async fn teardown_attachment(
    host: Option<&Path>,
    prefix: &str,
    host_veth: &str,
    attachment: &str,
) -> Result<Option<String>> {
    let host = handle_in(host)?;
    let h = &host.handle;
    match find_attachment(h, prefix, host_veth, attachment).await? {
        Some(v) => {
            remove_link(h, &v.name, Some(v.index), None).await?;
            Ok(Some(v.name))
        }
        None => Ok(None),
    }
}

/// The host veth of `attachment`: `host_veth` if its alias names the attachment (one lookup by
/// name, the common case), else any of `prefix`'s veths whose alias does (a dump): a pod made
/// before veths were named per pod, or a DEL without the pod's name.
async fn find_attachment(h: &Handle, prefix: &str, host_veth: &str, attachment: &str) -> Result<Option<HostVeth>> {
    let named = link_message(h, host_veth).await?.and_then(|l| veth_of(l, prefix));
    Ok(match named.filter(|v| v.attachment == attachment) {
        Some(v) => Some(v),
        None => host_veths(h, prefix).await?.into_iter().find(|v| v.attachment == attachment),
    })
}

/// The name of `attachment`'s host veth now (see [`teardown_attachment`]), if it has one.
pub async fn attachment_veth(
    host: Option<&Path>,
    prefix: &str,
    host_veth: &str,
    attachment: &str,
) -> Result<Option<String>> {
    let host = handle_in(host)?;
    Ok(find_attachment(&host.handle, prefix, host_veth, attachment).await?.map(|v| v.name))
}

/// Tears down by host veth name alone, whoever's it is (tests and tools).
pub async fn teardown_veth(host: Option<&Path>, host_veth: &str) -> Result<()> {
    let host = handle_in(host)?;
    remove_veth(&host.handle, host_veth, None).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_short_stable_and_distinct() {
        let a = host_veth_name("uw", "f00dcafe0123456789abcdef", "eth0");
        assert_eq!(a, host_veth_name("uw", "f00dcafe0123456789abcdef", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("uw"));
        assert_ne!(a, host_veth_name("uw", "f00dcafe0123456789abcdef", "eth1"));
        assert_ne!(a, host_veth_name("uw", "f00dcafe0123456789abcdee", "eth0"));
        assert!(check_ifname("host_veth", &a).is_ok());
    }

    /// The name Calico and the AWS network policy agent compute: prefix + sha1("<ns>.<pod>")[:11]
    /// (`echo -n kube-system.coredns-5d78c9869d-abcde | sha1sum` → 4d5f75c480c…).
    #[test]
    fn policy_engine_veth_names() {
        let pod = Some(("kube-system", "coredns-5d78c9869d-abcde"));
        assert_eq!(pod_veth_name("eni", pod, "c1", "eth0"), "eni4d5f75c480c");
        assert_eq!(pod_veth_name("uw", pod, "c2", "eth0"), "uw4d5f75c480c", "the same for every sandbox");
        assert_eq!(pod_veth_name("uw", pod, "c1", "net1"), host_veth_name("uw", "c1", "net1"), "eth0 only");
        assert_eq!(pod_veth_name("uw", None, "c1", "eth0"), host_veth_name("uw", "c1", "eth0"));
        assert_eq!(pod_veth_name("uw", Some(("", "x")), "c1", "eth0"), host_veth_name("uw", "c1", "eth0"));
        assert!(check_ifname("host_veth", &pod_veth_name("abcd", pod, "c1", "eth0")).is_ok());
    }

    #[test]
    fn interface_names_are_checked() {
        for bad in ["", "a-name-longer-than-15", "a/b", "a b", ".", "x:1"] {
            assert!(check_ifname("ifname", bad).is_err(), "{bad:?}");
        }
        assert!(check_ifname("ifname", "eth0").is_ok());
    }
}
