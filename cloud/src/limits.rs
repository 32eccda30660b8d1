//! Instance network limits and the max-pods formulas.
//!
//! The live source is `DescribeInstanceTypes`; [`static_limits`] is the fallback when that call is
//! not allowed or fails (figures from the EC2 instance-type documentation).

use serde::{Deserialize, Serialize};

/// What one instance type allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceLimits {
    /// ENIs per instance, the primary included.
    pub enis: u32,
    /// IPv4 addresses per ENI, the ENI's primary address included.
    pub ipv4_per_eni: u32,
    pub ipv6_per_eni: u32,
    pub vcpus: u32,
}

/// Where a set of limits came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LimitsSource {
    Api,
    StaticTable,
}

/// Addresses in one /28 prefix.
pub const ADDRESSES_PER_PREFIX: u32 = 16;

impl InstanceLimits {
    /// Secondary addresses (or prefix slots) one ENI can hold.
    pub fn slots_per_eni(&self) -> u32 {
        self.ipv4_per_eni.saturating_sub(1)
    }

    /// Max pods with secondary IPs: ENIs × (IPs per ENI − 1) + 2 (the two host-network pods).
    pub fn max_pods_secondary_ips(&self) -> u32 {
        self.enis * self.slots_per_eni() + 2
    }

    /// Max pods with /28 prefixes: ENIs × (IPs per ENI − 1) × 16 + 2, capped at 110 for instances
    /// with at most 30 vCPUs and at 250 above (the EKS recommendation).
    pub fn max_pods_prefixes(&self) -> u32 {
        let raw = self.enis * self.slots_per_eni() * ADDRESSES_PER_PREFIX + 2;
        let cap = if self.vcpus <= 30 { 110 } else { 250 };
        raw.min(cap)
    }
}

#[path = "limits_table.rs"]
mod generated;

/// The embedded table's limits for a type, if it knows the type: `enis` is what network card 0
/// holds (ipamd attaches there). ~1,400 types, generated from public dumps of
/// DescribeInstanceTypes by `cloud/limits/generate` (its header names the sources).
pub fn static_limits(instance_type: &str) -> Option<InstanceLimits> {
    let t = generated::TABLE;
    let i = t.binary_search_by(|r| r.0.cmp(instance_type)).ok()?;
    let (_, _, card0, _, ipv4_per_eni, ipv6_per_eni, vcpus) = t[i];
    Some(InstanceLimits { enis: card0, ipv4_per_eni, ipv6_per_eni, vcpus })
}

/// Rows of the embedded table: (type, ENIs per instance, on card 0, network cards).
pub fn static_cards(instance_type: &str) -> Option<(u32, u32, u32)> {
    let t = generated::TABLE;
    let i = t.binary_search_by(|r| r.0.cmp(instance_type)).ok()?;
    Some((t[i].1, t[i].2, t[i].3))
}

/// Every type the table knows, sorted.
pub fn static_types() -> impl Iterator<Item = &'static str> {
    generated::TABLE.iter().map(|r| r.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_pods_figures() {
        // (type, secondary-IP formula, prefix formula)
        let table = [
            ("m5.large", 29, 110),
            ("c5.18xlarge", 737, 250),
            ("t3.nano", 4, 34),
            ("t3.medium", 17, 110),
            ("m5.4xlarge", 234, 110),
            ("m5.8xlarge", 234, 250),
        ];
        for (ty, ips, prefixes) in table {
            let l = static_limits(ty).unwrap_or_else(|| panic!("{ty} missing"));
            assert_eq!(l.max_pods_secondary_ips(), ips, "{ty} secondary");
            assert_eq!(l.max_pods_prefixes(), prefixes, "{ty} prefixes");
        }
    }

    #[test]
    fn unknown_type() {
        assert_eq!(static_limits("x9.huge"), None);
    }

    /// The generated table against itself and against figures checked by hand in the EC2 User
    /// Guide ("Maximum IP addresses per network interface"): sorted and unique (the lookup is a
    /// binary search), every row sane, card 0 never above the instance's total, and the types
    /// the hand-written table held before still say the same.
    #[test]
    fn the_generated_table_is_consistent() {
        let t = generated::TABLE;
        assert!(t.len() >= 1300, "{} types", t.len());
        assert!(t.windows(2).all(|w| w[0].0 < w[1].0), "sorted, unique");
        for &(ty, enis, card0, cards, ipv4, _, _) in t {
            assert!(enis >= 1 && card0 >= 1 && card0 <= enis && cards >= 1 && ipv4 >= 1, "{ty}");
            assert!(cards > 1 || card0 == enis, "{ty}: one card holds them all");
        }
        let known: [(&str, u32, u32, u32); 10] = [
            ("t3.nano", 2, 2, 2),
            ("t3.medium", 3, 6, 2),
            ("m5.large", 3, 10, 2),
            ("m5.4xlarge", 8, 30, 16),
            ("m5.24xlarge", 15, 50, 96),
            ("c5.18xlarge", 15, 50, 72),
            ("r5.2xlarge", 4, 15, 8),
            ("c6in.32xlarge", 8, 50, 128),
            ("p4d.24xlarge", 15, 50, 96),
            ("d3.xlarge", 4, 3, 4),
        ];
        for (ty, enis, ipv4, vcpus) in known {
            let l = static_limits(ty).unwrap_or_else(|| panic!("{ty} missing"));
            assert_eq!((l.enis, l.ipv4_per_eni, l.vcpus), (enis, ipv4, vcpus), "{ty}");
        }
        assert_eq!(static_cards("c6in.32xlarge"), Some((8, 8, 2)), "two cards of 8: card 0 holds 8");
        assert_eq!(static_cards("p4d.24xlarge").map(|c| c.2), Some(4));
    }
}
