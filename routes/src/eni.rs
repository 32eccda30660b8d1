//! ENI set-up on the node: what ipamd does when EC2 attaches an ENI and its link appears.
//!
//! ```text
//! ethN (found by MAC) mtu M up, <ENI primary>/32, rp_filter=2 (loose)
//! table T: <subnet> dev ethN scope link; default via <subnet's first host> dev ethN
//! ```
//! Pods on the ENI reach table T through their `from <pod> lookup T` rule (see `pod.rs`).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteMessage, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::netns::{handle_in, sysctl_in, sysctl_read};
use crate::{Result, RoutesError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniSpec {
    pub mac: [u8; 6],
    pub mtu: u32,
    pub table: u32,
    pub primary_ip: Ipv4Addr,
    pub subnet: Ipv4Addr,
    pub subnet_prefix: u8,
}

impl EniSpec {
    /// The VPC router's address in the subnet: its first host.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet) + 1)
    }
}

/// The link whose MAC is `mac`: (index, name).
pub async fn link_by_mac(h: &Handle, mac: [u8; 6]) -> Result<Option<(u32, String)>> {
    let links: Vec<_> = h.link().get().execute().try_collect().await.map_err(RoutesError::netlink("list links"))?;
    Ok(links.into_iter().find_map(|l| {
        let has = l.attributes.iter().any(|a| matches!(a, LinkAttribute::Address(m) if m.as_slice() == mac));
        let name =
            l.attributes.iter().find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None });
        if has { name.map(|n| (l.header.index, n)) } else { None }
    }))
}

fn table_routes(table: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new().table_id(table).build()
}

/// Sets up the ENI's link and route table; returns the link's name. Idempotent.
pub async fn setup_eni(host: Option<&Path>, spec: &EniSpec) -> Result<String> {
    if spec.table == 0 || spec.table == 254 || spec.table == 255 || spec.subnet_prefix > 30 {
        return Err(RoutesError::Invalid {
            field: "table",
            reason: format!("{spec:?}: table must not be 0, main or local; subnet at most /30"),
        });
    }
    let ns = handle_in(host)?;
    let h = &ns.handle;
    let mac = crate::pod::mac_string(&spec.mac);
    let (idx, name) =
        link_by_mac(h, spec.mac).await?.ok_or_else(|| RoutesError::Missing(format!("a link with MAC {mac}")))?;
    h.link()
        .set(LinkUnspec::new_with_index(idx).mtu(spec.mtu).up().build())
        .execute()
        .await
        .map_err(RoutesError::netlink(format!("{name} up, mtu {}", spec.mtu)))?;
    // The kernel uses max(all, link): with `all` already loose (2) the link's own value does not
    // matter, and a container without a writable /proc/sys (ipamd unprivileged, with the node's
    // init container having set `all`) need not write it.
    if let Err(e) = sysctl_in(host, &format!("net/ipv4/conf/{name}/rp_filter"), "2") {
        let all = sysctl_read(host, "net/ipv4/conf/all/rp_filter").unwrap_or_default();
        if all.trim() != "2" {
            return Err(e);
        }
    }
    match h
        .address()
        .add(idx, IpAddr::V4(spec.primary_ip), 32)
        .execute()
        .await
        .map_err(RoutesError::netlink(format!("{}/32 on {name}", spec.primary_ip)))
    {
        Err(e) if e.errno() == Some(17) => {}
        r => r?,
    }
    let subnet = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(spec.subnet, spec.subnet_prefix)
        .output_interface(idx)
        .scope(RouteScope::Link)
        .table_id(spec.table)
        .build();
    h.route()
        .add(subnet)
        .replace()
        .execute()
        .await
        .map_err(RoutesError::netlink(format!("subnet route in table {}", spec.table)))?;
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(spec.gateway())
        .output_interface(idx)
        .table_id(spec.table)
        .build();
    h.route()
        .add(default)
        .replace()
        .execute()
        .await
        .map_err(RoutesError::netlink(format!("default route in table {}", spec.table)))?;
    Ok(name)
}

/// Empties the ENI's route table and removes its primary address from the link (if the link is
/// still there). Anything missing is fine.
pub async fn teardown_eni(host: Option<&Path>, spec: &EniSpec) -> Result<()> {
    let ns = handle_in(host)?;
    let h = &ns.handle;
    let routes: Vec<RouteMessage> = h
        .route()
        .get(table_routes(spec.table))
        .execute()
        .try_collect()
        .await
        .map_err(RoutesError::netlink("list routes"))?;
    for r in routes.into_iter().filter(|r| route_table(r) == spec.table) {
        match h
            .route()
            .del(r)
            .execute()
            .await
            .map_err(RoutesError::netlink(format!("delete a route of table {}", spec.table)))
        {
            Err(e) if e.errno() == Some(3) => {}
            res => res?,
        }
    }
    if let Some((idx, _)) = link_by_mac(h, spec.mac).await? {
        let addrs: Vec<_> = h
            .address()
            .get()
            .set_link_index_filter(idx)
            .set_address_filter(IpAddr::V4(spec.primary_ip))
            .execute()
            .try_collect()
            .await
            .map_err(RoutesError::netlink("list addresses"))?;
        for a in addrs {
            h.address().del(a).execute().await.map_err(RoutesError::netlink("delete the ENI's primary address"))?;
        }
    }
    Ok(())
}

fn route_table(r: &RouteMessage) -> u32 {
    use rtnetlink::packet_route::route::RouteAttribute;
    r.attributes
        .iter()
        .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
        .unwrap_or(u32::from(r.header.table))
}

/// The routes of a table as (destination, prefix length), for checks.
pub async fn table_destinations(host: Option<&Path>, table: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
    let ns = handle_in(host)?;
    let routes: Vec<RouteMessage> = ns
        .handle
        .route()
        .get(table_routes(table))
        .execute()
        .try_collect()
        .await
        .map_err(RoutesError::netlink("list routes"))?;
    Ok(routes
        .iter()
        .filter(|r| route_table(r) == table)
        .map(|r| {
            let d = r
                .attributes
                .iter()
                .find_map(|a| if let RouteAttribute::Destination(RouteAddress::Inet(d)) = a { Some(*d) } else { None });
            (d.unwrap_or(Ipv4Addr::UNSPECIFIED), r.header.destination_prefix_length)
        })
        .collect())
}
