//! kube-proxy's NAT rules as it writes them, in its three shapes (issue 15): iptables-legacy,
//! iptables-nft (the same rules through the nft backend) and native nftables (`table ip
//! kube-proxy`). Each is a shell command to run inside a node namespace and one that removes it.
//! With every NodePort comes a Calico-like `mangle PREROUTING -j ACCEPT` (first in the chain), to
//! show underway's rules do not depend on the order of rules in shared chains.

use std::net::{Ipv4Addr, SocketAddr};

pub const SHAPES: [&str; 3] = ["iptables-legacy", "iptables-nft", "nftables"];

/// What to run to install the rules, and to remove them again.
pub struct Rules {
    pub install: String,
    pub remove: String,
}

fn iptables_bin(shape: &str) -> Option<&'static str> {
    match shape {
        "iptables-legacy" => Some("iptables-legacy"),
        "iptables-nft" => Some("iptables-nft"),
        _ => None,
    }
}

/// A NodePort on every local address (externalTrafficPolicy=Local: DNAT only) to `pod`:80.
pub fn node_port(shape: &str, port: u16, pod: Ipv4Addr) -> Rules {
    match iptables_bin(shape) {
        Some(bin) => Rules {
            install: format!(
                "{bin} -t mangle -I PREROUTING -j ACCEPT && \
                 {bin} -t nat -A PREROUTING -p tcp --dport {port} -m addrtype --dst-type LOCAL -j DNAT --to-destination {pod}:80"
            ),
            remove: format!("{bin} -t mangle -F PREROUTING && {bin} -t nat -F PREROUTING"),
        },
        None => Rules {
            install: format!(
                "nft 'table ip kube-proxy {{\nchain mangle {{\ntype filter hook prerouting priority mangle - 5;\naccept\n}}\n\
                 chain nat {{\ntype nat hook prerouting priority dstnat;\ntcp dport {port} fib daddr type local dnat to {pod}:80\n}}\n}}'"
            ),
            remove: "nft delete table ip kube-proxy".into(),
        },
    }
}

/// ClusterIPs, each `(vip, endpoint)` with its one endpoint (DNAT in prerouting, where a pod's
/// packets meet it).
pub fn cluster_ips(shape: &str, services: &[(SocketAddr, SocketAddr)]) -> Rules {
    match iptables_bin(shape) {
        Some(bin) => Rules {
            install: services
                .iter()
                .map(|(vip, ep)| {
                    format!(
                        "{bin} -t nat -A PREROUTING -d {}/32 -p tcp --dport {} -j DNAT --to-destination {ep}",
                        vip.ip(),
                        vip.port()
                    )
                })
                .collect::<Vec<_>>()
                .join(" && "),
            remove: format!("{bin} -t nat -F PREROUTING"),
        },
        None => {
            let rules: String = services
                .iter()
                .map(|(vip, ep)| format!("ip daddr {} tcp dport {} dnat to {ep}\n", vip.ip(), vip.port()))
                .collect();
            Rules {
                install: format!(
                    "nft 'table ip kube-proxy {{\nchain nat {{\ntype nat hook prerouting priority dstnat;\n{rules}}}\n}}'"
                ),
                remove: "nft delete table ip kube-proxy".into(),
            }
        }
    }
}
