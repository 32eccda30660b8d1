//! The node's own nftables table, `ip underway`: egress SNAT for pods and anti-spoofing on pod
//! veths. Every rule underway needs lives in this one table, replaced atomically (one `nft -f`
//! transaction: create, delete, define), never in chains other software shares: a policy
//! engine's `ACCEPT` in a shared chain cannot skip them (AWS VPC CNI #263), and a restart leaves
//! exactly one copy.
//!
//! ```text
//! table ip underway
//!   set exempt: the VPC's CIDR blocks, the cluster's pod CIDRs (VPC-route mode), exclusions
//!   chain antispoof (filter, prerouting, priority raw):
//!     iifname "<prefix>*" fib saddr . iif oif missing counter drop
//!   chain node_port (filter, prerouting, priority mangle)  [snat = node, node_port]
//!     iifname "<primary>" ct state new fib daddr type local ct mark set ct mark | <mark>
//!   chain route_main (filter, prerouting, priority dstnat + 10)  [snat = node]
//!     iifname "<prefix>*" ct state new ip daddr != @exempt ct mark set ct mark | <mark>
//!     iifname "<prefix>*" ct mark & <mark> == <mark> meta mark set meta mark | <mark>
//!   chain egress (nat, postrouting, priority srcnat)      [snat = node only]
//!     iifname "<prefix>*" oifname "<primary>" ip daddr != @exempt counter snat to <primary ip> fully-random
//! ```
//!
//! The SNAT decision reads the destination in postrouting, after every DNAT of prerouting
//! (kube-proxy's Service rules): a Service whose endpoints lie outside the VPC is translated, one
//! inside it is not (AWS VPC CNI #1910, #3205 decide before the DNAT). So does the choice of the
//! primary ENI for a pod's connection (`route_main`, after dstnat, before routing): decided on the
//! ClusterIP instead, a secondary-ENI pod's packet to an endpoint in the VPC left by eth0 with its
//! own address, untranslated, and the VPC's source check dropped it (found by the ClusterIP test). Anti-spoofing is the strict
//! reverse-path test as nftables does it: a packet from a pod veth must come from an address
//! routed back through that same veth (its pod's), whatever `rp_filter` the node's `all` says.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

use crate::netns::on_thread_in;
use crate::{Result, RoutesError};

pub const TABLE: &str = "underway";
/// The default of [`EgressSpec::mark`]: packets carrying it use the main table (rule
/// [`RULE_MARK_MAIN`]): a secondary-ENI pod's traffic to the internet leaves by the primary ENI,
/// where it is translated, instead of by its own ENI (whose address the internet gateway does not
/// translate), and so do its NodePort replies. The AWS VPC CNI's bit.
pub const MAIN_MARK: u32 = 0x80;
/// Priority of `fwmark 0x80/0x80 lookup main`: after the `to <pod>` rules (512), before the
/// `from <pod>` rules (1536).
pub const RULE_MARK_MAIN: u32 = 1024;

/// Port randomisation of the SNAT (nftables' flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnatRandom {
    FullyRandom,
    Random,
    None,
}

/// What the table holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressSpec {
    /// Host veth prefix of the pods (`iifname "<prefix>*"`).
    pub veth_prefix: String,
    /// The primary ENI's link and address: SNAT applies to traffic leaving by it, to that address.
    /// `None`: no SNAT (a NAT gateway translates: `snat = "external"`).
    pub snat: Option<(String, Ipv4Addr)>,
    /// Destinations never translated.
    pub exempt: Vec<Ipv4Net>,
    pub random: SnatRandom,
    /// NodePort/hostPort for pods on secondary ENIs: connections arriving by the primary link for
    /// a local address are marked, and the pod's replies follow the main table back out of it
    /// (with the SNAT's primary link; otherwise they leave by the pod's ENI with the node's
    /// address as source, and the VPC's source check drops them).
    pub node_port: bool,
    /// The one bit underway uses (packet and connection mark): set with a masked OR, so other
    /// bits (kube-proxy's 0x4000, a policy engine's) are kept.
    pub mark: u32,
}

fn check_name(field: &'static str, s: &str) -> Result<()> {
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') {
        return Err(RoutesError::Invalid { field, reason: format!("{s:?} is not an interface name nft can take") });
    }
    Ok(())
}

/// The whole table as one `nft -f` transaction (creates it if missing, deletes it, defines it).
pub fn ruleset(spec: &EgressSpec) -> Result<String> {
    check_name("veth_prefix", &spec.veth_prefix)?;
    let mut exempt: Vec<Ipv4Net> = spec.exempt.iter().map(|n| n.trunc()).collect();
    exempt.sort();
    exempt.dedup();
    let pods = format!("{}*", spec.veth_prefix);
    let mut s = format!("table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    s += "  set exempt {\n    type ipv4_addr\n    flags interval\n    auto-merge\n";
    if !exempt.is_empty() {
        let elems: Vec<String> = exempt.iter().map(|n| n.to_string()).collect();
        s += &format!("    elements = {{ {} }}\n", elems.join(", "));
    }
    s += "  }\n";
    s += "  chain antispoof {\n    type filter hook prerouting priority raw; policy accept;\n";
    s += &format!(
        "    iifname \"{pods}\" fib saddr . iif oif missing counter drop comment \"pod source not its own\"\n"
    );
    s += "  }\n";
    if let Some((link, addr)) = &spec.snat {
        check_name("primary_link", link)?;
        let flags = match spec.random {
            SnatRandom::FullyRandom => " fully-random",
            SnatRandom::Random => " random",
            SnatRandom::None => "",
        };
        // Traffic that will be translated must leave by the primary ENI: marked for the main table
        // before the routing decision (the `from <pod>` rule would send it out of its own ENI).
        // Connections a pod opens to a translated destination, and (node_port) connections that
        // arrive by the primary link for a local address, are marked in conntrack; every packet of
        // such a connection from a pod veth then carries the mark and takes the main table (rule
        // 1024) out of the primary ENI. Replies to connections opened from elsewhere (another
        // node's pod pinging this one) are untouched and leave by the pod's own ENI.
        // NodePort/hostPort: decided before kube-proxy's DNAT, while the destination is still the
        // node's own address.
        if spec.node_port {
            s += "  chain node_port {\n    type filter hook prerouting priority mangle; policy accept;\n";
            s += &format!(
                "    iifname \"{link}\" ct state new fib daddr type local ct mark set ct mark | {mark:#x} comment \"NodePort, hostPort\"\n",
                mark = spec.mark
            );
            s += "  }\n";
        }
        // A pod's own connections: decided after the DNAT (a filter chain after dstnat, still
        // before the routing decision), on the destination the packet will really go to: a
        // ClusterIP whose endpoint is in the VPC keeps the pod's ENI, one outside it does not.
        s += "  chain route_main {\n    type filter hook prerouting priority dstnat + 10; policy accept;\n";
        s += &format!(
            "    iifname \"{pods}\" ct state new ip daddr != @exempt ct mark set ct mark | {mark:#x} comment \"egress by the primary ENI\"\n",
            mark = spec.mark
        );
        s += &format!(
            "    iifname \"{pods}\" ct mark & {mark:#x} == {mark:#x} meta mark set meta mark | {mark:#x} comment \"by the primary ENI\"\n",
            mark = spec.mark
        );
        s += "  }\n";
        s += "  chain egress {\n    type nat hook postrouting priority srcnat; policy accept;\n";
        s += &format!(
            "    iifname \"{pods}\" oifname \"{link}\" ip daddr != @exempt counter snat ip to {addr}{flags} comment \"pod egress\"\n"
        );
        s += "  }\n";
    }
    s += "}\n";
    Ok(s)
}

fn nft(host: Option<&Path>, args: &[&str], stdin: Option<String>) -> Result<String> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let what = format!("nft {}", args.join(" "));
    let w = what.clone();
    // A child spawned from a thread inside the namespace runs in it.
    let out = on_thread_in(host, move || -> std::io::Result<std::process::Output> {
        let mut child = Command::new("nft")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(text) = stdin {
            child.stdin.take().expect("piped").write_all(text.as_bytes())?;
        }
        drop(child.stdin.take());
        child.wait_with_output()
    })?
    .map_err(|source| RoutesError::Netns { path: format!("{w} (is nftables installed?)"), source })?;
    if !out.status.success() {
        return Err(RoutesError::Invalid {
            field: "nftables",
            reason: format!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs (or replaces) the table in the namespace at `host` (`None`: this one).
pub fn apply(host: Option<&Path>, spec: &EgressSpec) -> Result<()> {
    nft(host, &["-f", "-"], Some(ruleset(spec)?)).map(|_| ())
}

/// Loose reverse-path filtering (2) on the primary ENI's link, and only there: a pod's translated
/// traffic comes back by it, de-translated to the pod's address, and the reverse path of a
/// secondary-ENI pod's address is its own ENI (rule 1536), so a strict check (Amazon Linux's
/// default, 1) drops every reply. Pod veths stay strict (and the antispoof chain checks them).
/// Reads first and writes only when needed, so it can run on every refresh (a node agent that
/// reset it is corrected) and a read-only /proc/sys with the value already loose (the link's or
/// `all`'s: the kernel uses the larger) is not an error.
pub fn loose_rp_filter(host: Option<&Path>, link: &str) -> Result<()> {
    check_name("primary_link", link)?;
    let key = format!("net/ipv4/conf/{link}/rp_filter");
    let loose = |k: &str| crate::netns::sysctl_read(host, k).is_ok_and(|v| v.trim() == "2");
    if loose(&key) {
        return Ok(());
    }
    match crate::netns::sysctl_in(host, &key, "2") {
        Err(_) if loose("net/ipv4/conf/all/rp_filter") => Ok(()),
        r => r,
    }
}

/// Removes the table; absent is fine.
pub fn remove(host: Option<&Path>) -> Result<()> {
    nft(host, &["-f", "-"], Some(format!("table ip {TABLE}\ndelete table ip {TABLE}\n"))).map(|_| ())
}

/// The table as nft lists it (for tests and `uninstall`'s report), empty when absent.
pub fn listing(host: Option<&Path>) -> Result<String> {
    match nft(host, &["list", "table", "ip", TABLE], None) {
        Ok(s) => Ok(s),
        Err(RoutesError::Invalid { reason, .. }) if reason.contains("No such file") => Ok(String::new()),
        Err(e) => Err(e),
    }
}

fn mark_rule(r: &rtnetlink::packet_route::rule::RuleMessage) -> bool {
    use rtnetlink::packet_route::rule::RuleAttribute;
    r.attributes.contains(&RuleAttribute::Priority(RULE_MARK_MAIN))
        && r.attributes.iter().any(|a| matches!(a, RuleAttribute::FwMark(_)))
}

/// Adds `fwmark <mark>/<mark> lookup main` (priority 1024), replacing one with another mark.
pub async fn ensure_main_rule(host: Option<&Path>, mark: u32) -> Result<()> {
    use futures::TryStreamExt;
    use rtnetlink::IpVersion;
    use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute};
    let ns = crate::netns::handle_in(host)?;
    let h = &ns.handle;
    let rules: Vec<_> =
        h.rule().get(IpVersion::V4).execute().try_collect().await.map_err(RoutesError::netlink("list rules"))?;
    let same = |r: &rtnetlink::packet_route::rule::RuleMessage| {
        mark_rule(r)
            && r.attributes.contains(&RuleAttribute::FwMark(mark))
            && r.attributes.contains(&RuleAttribute::FwMask(mark))
    };
    if rules.iter().any(same) {
        return Ok(());
    }
    for r in rules.into_iter().filter(mark_rule) {
        h.rule().del(r).execute().await.map_err(RoutesError::netlink("delete the old fwmark rule"))?;
    }
    let mut add = h
        .rule()
        .add()
        .v4()
        .fw_mark(mark)
        .table_id(crate::pod::MAIN_TABLE)
        .action(RuleAction::ToTable)
        .priority(RULE_MARK_MAIN);
    add.message_mut().attributes.push(RuleAttribute::FwMask(mark));
    add.execute().await.map_err(RoutesError::netlink(format!("rule fwmark {mark:#x}/{mark:#x} lookup main")))
}

/// Removes that rule; absent is fine.
pub async fn remove_main_rule(host: Option<&Path>) -> Result<()> {
    use futures::TryStreamExt;
    use rtnetlink::IpVersion;
    let ns = crate::netns::handle_in(host)?;
    let h = &ns.handle;
    let rules: Vec<_> =
        h.rule().get(IpVersion::V4).execute().try_collect().await.map_err(RoutesError::netlink("list rules"))?;
    for r in rules.into_iter().filter(mark_rule) {
        h.rule().del(r).execute().await.map_err(RoutesError::netlink("delete the fwmark rule"))?;
    }
    Ok(())
}

/// Packets the anti-spoofing rule dropped so far.
pub fn spoof_drops(host: Option<&Path>) -> Result<u64> {
    let l = listing(host)?;
    Ok(l.lines()
        .find(|x| x.contains("fib saddr . iif oif missing"))
        .and_then(|x| x.split("packets ").nth(1))
        .and_then(|x| x.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

/// The link that holds `addr` in the namespace at `host` (the primary ENI's, for its address).
pub async fn link_with_address(host: Option<&Path>, addr: Ipv4Addr) -> Result<Option<String>> {
    use futures::TryStreamExt;
    use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
    use rtnetlink::packet_route::link::LinkAttribute;
    let ns = crate::netns::handle_in(host)?;
    let addrs: Vec<AddressMessage> =
        ns.handle.address().get().execute().try_collect().await.map_err(RoutesError::netlink("list addresses"))?;
    let Some(idx) = addrs
        .iter()
        .find(|m| {
            m.attributes.iter().any(|a| matches!(a, AddressAttribute::Address(std::net::IpAddr::V4(v)) if *v == addr))
        })
        .map(|m| m.header.index)
    else {
        return Ok(None);
    };
    let mut s = ns.handle.link().get().match_index(idx).execute();
    let m = s.try_next().await.map_err(RoutesError::netlink("get link"))?;
    Ok(m.and_then(|m| {
        m.attributes.into_iter().find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n) } else { None })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> EgressSpec {
        EgressSpec {
            veth_prefix: "uw".into(),
            snat: Some(("eth0".into(), "10.0.1.10".parse().unwrap())),
            exempt: vec!["10.0.0.0/16".parse().unwrap(), "100.64.0.0/16".parse().unwrap()],
            random: SnatRandom::FullyRandom,
            node_port: true,
            mark: MAIN_MARK,
        }
    }

    #[test]
    fn one_table_replaced_atomically_with_snat_after_dnat_and_antispoofing() {
        let r = ruleset(&spec()).unwrap();
        assert!(r.starts_with("table ip underway\ndelete table ip underway\ntable ip underway {"), "{r}");
        assert!(r.contains("elements = { 10.0.0.0/16, 100.64.0.0/16 }"), "{r}");
        assert!(r.contains("type nat hook postrouting priority srcnat"), "{r}");
        assert!(
            r.contains(
                "iifname \"uw*\" oifname \"eth0\" ip daddr != @exempt counter snat ip to 10.0.1.10 fully-random"
            ),
            "{r}"
        );
        assert!(r.contains("iifname \"uw*\" fib saddr . iif oif missing counter drop"), "{r}");
        assert_eq!(r.matches("table ip underway {").count(), 1);
    }

    #[test]
    fn knobs_change_exactly_their_part() {
        // (case, edit, must contain, must not contain)
        type Edit = fn(&mut EgressSpec);
        let cases: Vec<(&str, Edit, &str, &str)> = vec![
            ("external: no SNAT chain, anti-spoofing stays", |s| s.snat = None, "fib saddr", "snat"),
            ("random", |s| s.random = SnatRandom::Random, "10.0.1.10 random", "fully-random"),
            ("no randomisation", |s| s.random = SnatRandom::None, "to 10.0.1.10 comment", "random"),
            ("no exemptions: an empty set", |s| s.exempt.clear(), "auto-merge\n  }", "elements"),
            ("no NodePort support", |s| s.node_port = false, "egress by the primary ENI", "NodePort"),
            (
                "another mark bit",
                |s| s.mark = 0x100,
                "ct mark & 0x100 == 0x100 meta mark set meta mark | 0x100",
                "0x80",
            ),
            (
                "host bits and duplicates are folded",
                |s| s.exempt = vec!["10.0.3.7/16".parse().unwrap(), "10.0.0.0/16".parse().unwrap()],
                "elements = { 10.0.0.0/16 }",
                "10.0.3.7",
            ),
        ];
        for (name, edit, want, not) in cases {
            let mut s = spec();
            edit(&mut s);
            let r = ruleset(&s).unwrap();
            assert!(r.contains(want), "{name}: {r}");
            assert!(!r.contains(not), "{name}: {r}");
        }
    }

    #[test]
    fn names_nft_cannot_take_are_refused() {
        let mut s = spec();
        s.veth_prefix = "u\"w".into();
        assert!(ruleset(&s).unwrap_err().to_string().contains("veth_prefix"));
        let mut s = spec();
        s.snat = Some(("eth0; drop".into(), "10.0.1.10".parse().unwrap()));
        assert!(ruleset(&s).unwrap_err().to_string().contains("primary_link"));
    }
}
