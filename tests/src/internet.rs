//! The internet around the test world's VPC (issue 15): an **internet gateway** namespace behind
//! the router and an **internet host** beyond it.
//!
//! ```text
//! router ──(169.254.200.1/30 ↔ .2)── igw ──(198.51.100.1/24 ↔ .10)── internet host
//!        ──(169.254.201.1/30 ↔ .2)── NAT gateway (optional, `nat_gateway`)
//!        ──(169.254.<n>.1/30 ↔ .2)── hosts (`host`: a peered network's, a secondary VPC block's)
//! ```
//!
//! The router sends everything it has no VPC route for to the gateway (the VPC route table's
//! `0.0.0.0/0 → igw-…`, which [`Internet::attach`] creates in EC2). The gateway translates 1:1,
//! as AWS's does, only private addresses that EC2 maps to a public one (an Elastic IP's
//! association); a packet from any other private address is dropped and counted. The host runs a
//! TCP server on port 80 that answers each connection with the address it sees.
//!
//! LocalStack hands out Elastic IPs in 127.0.0.0/8; the gateway and the host route them like any
//! other address (`route_localnet`, and the host's local route for 127/8 narrowed to 127.0.0.1).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Ipv4Addr;

use crate::HarnessError;
use crate::netns;
use crate::world::World;

pub const HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

pub struct Internet {
    pub igw_ns: String,
    pub host_ns: String,
    router_ns: String,
    world: String,
    direct: aws_sdk_ec2::Client,
    /// Namespaces added later (NAT gateway, hosts behind the router) and their router links.
    extra: std::sync::Mutex<Vec<(String, String)>>,
}

impl Internet {
    /// Builds the gateway and the host beside `w`'s router, and the VPC's default route in EC2.
    pub async fn attach(w: &World) -> Result<Internet, HarnessError> {
        let (igw_ns, host_ns) = (format!("{}-igw", w.id()), format!("{}-inet", w.id()));
        let router = w.router_ns().to_string();
        for ns in [&igw_ns, &host_ns] {
            netns::add_ns(ns)?;
            netns::ip_in(ns, &["link", "set", "lo", "up"])?;
            for (k, v) in [
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv4.conf.all.route_localnet", "1"),
                ("net.ipv4.conf.default.route_localnet", "1"),
            ] {
                netns::sysctl(ns, k, v)?;
            }
        }
        let sh = |ns: &str, cmd: &str| -> Result<(), HarnessError> {
            let o = netns::exec(ns, &["sh", "-c", cmd])?;
            if o.status.success() {
                Ok(())
            } else {
                Err(HarnessError::Command(format!("{ns}: {cmd}: {}", String::from_utf8_lossy(&o.stderr))))
            }
        };
        sh(
            &router,
            &format!(
                "ip link add rigw type veth peer name vpc netns {igw_ns} && ip addr add 169.254.200.1/30 dev rigw \
                 && ip link set rigw up && ip route replace default via 169.254.200.2"
            ),
        )?;
        sh(
            &igw_ns,
            &format!(
                "ip addr add 169.254.200.2/30 dev vpc && ip link set vpc up && ip route add 10.0.0.0/8 via 169.254.200.1 \
                 && ip route add 100.64.0.0/10 via 169.254.200.1 \
                 && ip link add out type veth peer name eth0 netns {host_ns} && ip addr add 198.51.100.1/24 dev out \
                 && ip link set out up"
            ),
        )?;
        sh(
            &host_ns,
            "ip addr add 198.51.100.10/24 dev eth0 && ip link set eth0 up && ip route add default via 198.51.100.1 \
             && ip route del 127.0.0.0/8 dev lo table local",
        )?;
        // The VPC's side in EC2: a gateway and the main table's default route to it.
        let direct = aws_sdk_ec2::Client::new(&w.account().direct_sdk_config());
        let igw = direct.create_internet_gateway().send().await.map_err(cmd_err)?;
        let igw_id = igw.internet_gateway().and_then(|g| g.internet_gateway_id()).unwrap_or_default().to_string();
        direct
            .attach_internet_gateway()
            .internet_gateway_id(&igw_id)
            .vpc_id(&w.ec2().vpc_id)
            .send()
            .await
            .map_err(cmd_err)?;
        let main = w.main_route_table().await?;
        direct
            .create_route()
            .route_table_id(&main)
            .destination_cidr_block("0.0.0.0/0")
            .gateway_id(&igw_id)
            .send()
            .await
            .map_err(cmd_err)?;
        let net = Internet {
            igw_ns,
            host_ns,
            router_ns: router,
            world: w.id().to_string(),
            direct,
            extra: Default::default(),
        };
        net.serve()?;
        net.refresh().await?;
        Ok(net)
    }

    /// The host's TCP server on port 80: each connection gets the peer's address and is closed.
    fn serve(&self) -> Result<(), HarnessError> {
        serve_peer_address(&self.host_ns)
    }

    /// Private → public, as EC2 maps them now (Elastic IP associations).
    pub async fn public_ips(&self) -> Result<BTreeMap<Ipv4Addr, Ipv4Addr>, HarnessError> {
        let out = self.direct.describe_addresses().send().await.map_err(cmd_err)?;
        Ok(out
            .addresses()
            .iter()
            .filter_map(|a| Some((a.private_ip_address()?.parse().ok()?, a.public_ip()?.parse().ok()?)))
            .collect())
    }

    /// Reloads the gateway's translations from EC2.
    pub async fn refresh(&self) -> Result<(), HarnessError> {
        let map = self.public_ips().await?;
        let mut r = String::from("table ip igw\ndelete table ip igw\ntable ip igw {\n");
        let privs: Vec<String> = map.keys().map(|a| a.to_string()).collect();
        r += "  set mapped {\n    type ipv4_addr\n";
        if !privs.is_empty() {
            r += &format!("    elements = {{ {} }}\n", privs.join(", "));
        }
        r += "  }\n  chain gate {\n    type filter hook forward priority 0; policy accept;\n";
        r += "    iifname \"vpc\" ip saddr != @mapped counter drop comment \"untranslated\"\n  }\n";
        r += "  chain inbound {\n    type nat hook prerouting priority dstnat; policy accept;\n";
        for (p, q) in &map {
            r += &format!("    iifname \"out\" ip daddr {q} dnat to {p}\n");
        }
        r += "  }\n  chain outbound {\n    type nat hook postrouting priority srcnat; policy accept;\n";
        for (p, q) in &map {
            r += &format!("    oifname \"out\" ip saddr {p} snat to {q}\n");
        }
        r += "  }\n}\n";
        netns::nft(&self.igw_ns, &r)?;
        // The host reaches the public addresses through the gateway.
        for q in map.values() {
            netns::ip_in(&self.host_ns, &["route", "replace", &format!("{q}/32"), "via", "198.51.100.1"])?;
        }
        Ok(())
    }

    /// Associates a new Elastic IP with `private_ip` on `eni` (an instance's public address).
    pub async fn elastic_ip(&self, eni: &str, private_ip: Ipv4Addr) -> Result<Ipv4Addr, HarnessError> {
        let a =
            self.direct.allocate_address().domain(aws_sdk_ec2::types::DomainType::Vpc).send().await.map_err(cmd_err)?;
        self.direct
            .associate_address()
            .allocation_id(a.allocation_id().unwrap_or_default())
            .network_interface_id(eni)
            .private_ip_address(private_ip.to_string())
            .send()
            .await
            .map_err(cmd_err)?;
        self.refresh().await?;
        a.public_ip().and_then(|p| p.parse().ok()).ok_or_else(|| HarnessError::Command("no public IP".into()))
    }

    /// A namespace `<world>-<tag>` linked to the router by `r<tag>` (169.254.<net>.1/30 on the
    /// router, .2 on its `vpc` end), forwarding, with loose checks; returns its name.
    fn behind_router(&self, tag: &str, net: u8) -> Result<String, HarnessError> {
        let ns = format!("{}-{tag}", self.world);
        let link = format!("r{tag}");
        netns::add_ns(&ns)?;
        self.extra.lock().unwrap().push((ns.clone(), link.clone()));
        netns::ip_in(&ns, &["link", "set", "lo", "up"])?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.all.send_redirects", "0"),
        ] {
            netns::sysctl(&ns, k, v)?;
        }
        let r = &self.router_ns;
        netns::ip_in(r, &["link", "add", &link, "type", "veth", "peer", "name", "vpc", "netns", &ns])?;
        netns::ip_in(r, &["addr", "add", &format!("169.254.{net}.1/30"), "dev", &link])?;
        netns::ip_in(r, &["link", "set", &link, "up"])?;
        netns::sysctl(r, &format!("net.ipv4.conf.{link}.rp_filter"), "0")?;
        netns::ip_in(&ns, &["addr", "add", &format!("169.254.{net}.2/30"), "dev", "vpc"])?;
        netns::ip_in(&ns, &["link", "set", "vpc", "up"])?;
        netns::ip_in(&ns, &["route", "add", "default", "via", &format!("169.254.{net}.1")])?;
        Ok(ns)
    }

    /// A host at `addr` in its own namespace behind the router, which routes `range` to it: a
    /// peered network's host, or one in a VPC CIDR block that has no node. It runs the same
    /// peer-address server as the internet host. Returns its namespace.
    pub fn host(&self, tag: &str, net: u8, addr: Ipv4Addr, range: ipnet::Ipv4Net) -> Result<String, HarnessError> {
        let ns = self.behind_router(tag, net)?;
        netns::ip_in(&ns, &["addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
        netns::ip_in(&self.router_ns, &["route", "replace", &range.to_string(), "via", &format!("169.254.{net}.2")])?;
        serve_peer_address(&ns)?;
        Ok(ns)
    }

    /// A NAT gateway, as a VPC's private subnet uses one (`egress.snat = "external"`): created in
    /// EC2 with a new Elastic IP in the world's subnet, and the main table's default route moved
    /// to it. Its namespace translates every forwarded packet to the gateway's private address
    /// (which the internet gateway maps to the Elastic IP); the router sends the VPC's default
    /// traffic to it and what it sends on to the internet gateway. Returns its public address.
    pub async fn nat_gateway(&self, w: &World) -> Result<Ipv4Addr, HarnessError> {
        let a =
            self.direct.allocate_address().domain(aws_sdk_ec2::types::DomainType::Vpc).send().await.map_err(cmd_err)?;
        let nat = self
            .direct
            .create_nat_gateway()
            .subnet_id(&w.ec2().subnet_id)
            .allocation_id(a.allocation_id().unwrap_or_default())
            .send()
            .await
            .map_err(cmd_err)?;
        let nat = nat.nat_gateway().ok_or_else(|| cmd_err("no NAT gateway"))?;
        let addr = nat.nat_gateway_addresses().first().ok_or_else(|| cmd_err("the NAT gateway has no address"))?;
        let (private, public): (Ipv4Addr, Ipv4Addr) = (
            addr.private_ip().and_then(|p| p.parse().ok()).ok_or_else(|| cmd_err("no private IP"))?,
            addr.public_ip().and_then(|p| p.parse().ok()).ok_or_else(|| cmd_err("no public IP"))?,
        );
        let main = w.main_route_table().await?;
        self.direct
            .replace_route()
            .route_table_id(&main)
            .destination_cidr_block("0.0.0.0/0")
            .nat_gateway_id(nat.nat_gateway_id().unwrap_or_default())
            .send()
            .await
            .map_err(cmd_err)?;
        let ns = self.behind_router("nat", 201)?;
        netns::ip_in(&ns, &["addr", "add", &format!("{private}/32"), "dev", "lo"])?;
        netns::nft(
            &ns,
            &format!(
                "table ip natgw {{
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
                     ip saddr != {private} counter snat to {private}
  }}
}}
"
            ),
        )?;
        // The router: the VPC's default route to the NAT gateway; what the NAT gateway sends on,
        // and the traffic to its own address, as the public subnet's table says.
        let r = &self.router_ns;
        netns::ip_in(r, &["route", "replace", &format!("{private}/32"), "via", "169.254.201.2"])?;
        netns::ip_in(r, &["route", "replace", "default", "via", "169.254.200.2", "table", "201"])?;
        // Only what it translated: the replies it sends back to the pods take the main table.
        netns::ip_in(
            r,
            &["rule", "add", "from", &private.to_string(), "iif", "rnat", "lookup", "201", "priority", "100"],
        )?;
        netns::ip_in(r, &["route", "replace", "default", "via", "169.254.201.2"])?;
        self.refresh().await?;
        Ok(public)
    }

    /// The gateways' and the router's rules and counters, for a failure message.
    pub fn diagnose(&self) -> String {
        let mut out = String::new();
        let mut run = |ns: &str, argv: &[&str]| {
            if let Ok(o) = netns::exec(ns, argv) {
                let (o, e) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
                out += &format!("== {ns}: {}\n{o}{e}", argv.join(" "));
            }
        };
        run(&self.router_ns, &["ip", "rule"]);
        run(&self.router_ns, &["ip", "route", "show", "table", "all"]);
        run(&self.igw_ns, &["nft", "list", "ruleset"]);
        for (ns, _) in self.extra.lock().unwrap().iter() {
            run(ns, &["nft", "list", "ruleset"]);
            run(ns, &["ip", "-s", "link"]);
        }
        out
    }

    /// Packets from private addresses without a public one that the gateway dropped.
    pub fn untranslated_drops(&self) -> u64 {
        let o = netns::exec(&self.igw_ns, &["nft", "list", "chain", "ip", "igw", "gate"]).ok();
        o.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .and_then(|l| {
                l.split("packets ").nth(1).and_then(|x| x.split_whitespace().next()).and_then(|n| n.parse().ok())
            })
            .unwrap_or(0)
    }
}

/// What the internet host says it saw, for a TCP connection from inside namespace `ns` (`None`
/// when no connection was made within 3 s).
pub fn seen_from(ns: &str) -> Option<String> {
    connect_from(ns, std::net::SocketAddr::from((HOST, 80)))
}

/// Connects from inside namespace `ns` to `to` and returns what the server wrote (`None` when no
/// connection was made or nothing came within 3 s).
pub fn connect_from(ns: &str, to: std::net::SocketAddr) -> Option<String> {
    netns::in_ns(ns, move || -> Option<String> {
        let mut s = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(3)).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(3))).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out.trim().to_string())
    })
    .ok()
    .flatten()
}

/// A TCP server on port 80 inside namespace `ns` that answers each connection with the address it
/// sees, for as long as the process lives.
pub fn serve_peer_address(ns: &str) -> Result<(), HarnessError> {
    let listener = netns::in_ns(ns, || std::net::TcpListener::bind("0.0.0.0:80"))??;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let peer = s.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
            let _ = s.write_all(format!("{peer}\n").as_bytes());
        }
    });
    Ok(())
}

fn cmd_err(e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Command(format!("EC2: {e}"))
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = netns::exec(&self.router_ns, &["ip", "link", "del", "rigw"]);
        for (ns, link) in self.extra.lock().unwrap().drain(..) {
            let _ = netns::exec(&self.router_ns, &["ip", "link", "del", &link]);
            netns::del_ns(&ns);
        }
        let _ = netns::exec(&self.router_ns, &["ip", "rule", "del", "priority", "100"]);
        netns::del_ns(&self.host_ns);
        netns::del_ns(&self.igw_ns);
    }
}
