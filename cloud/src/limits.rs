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

// (type, ENIs, IPv4 per ENI, IPv6 per ENI, vCPUs)
const TABLE: &[(&str, u32, u32, u32, u32)] = &[
    ("t3.nano", 2, 2, 2, 2),
    ("t3.micro", 2, 2, 2, 2),
    ("t3.small", 3, 4, 4, 2),
    ("t3.medium", 3, 6, 6, 2),
    ("t3.large", 3, 12, 12, 2),
    ("t3.xlarge", 4, 15, 15, 4),
    ("t3.2xlarge", 4, 15, 15, 8),
    ("m5.large", 3, 10, 10, 2),
    ("m5.xlarge", 4, 15, 15, 4),
    ("m5.2xlarge", 4, 15, 15, 8),
    ("m5.4xlarge", 8, 30, 30, 16),
    ("m5.8xlarge", 8, 30, 30, 32),
    ("m5.12xlarge", 8, 30, 30, 48),
    ("m5.16xlarge", 15, 50, 50, 64),
    ("m5.24xlarge", 15, 50, 50, 96),
    ("c5.large", 3, 10, 10, 2),
    ("c5.xlarge", 4, 15, 15, 4),
    ("c5.2xlarge", 4, 15, 15, 8),
    ("c5.4xlarge", 8, 30, 30, 16),
    ("c5.9xlarge", 8, 30, 30, 36),
    ("c5.12xlarge", 8, 30, 30, 48),
    ("c5.18xlarge", 15, 50, 50, 72),
    ("c5.24xlarge", 15, 50, 50, 96),
    ("r5.large", 3, 10, 10, 2),
    ("r5.xlarge", 4, 15, 15, 4),
    ("r5.2xlarge", 4, 15, 15, 8),
    ("r5.4xlarge", 8, 30, 30, 16),
    ("r5.8xlarge", 8, 30, 30, 32),
    ("r5.12xlarge", 8, 30, 30, 48),
    ("r5.16xlarge", 15, 50, 50, 64),
    ("r5.24xlarge", 15, 50, 50, 96),
];

/// The embedded table's limits for a type, if it knows the type.
pub fn static_limits(instance_type: &str) -> Option<InstanceLimits> {
    TABLE.iter().find(|r| r.0 == instance_type).map(|&(_, enis, ipv4_per_eni, ipv6_per_eni, vcpus)| InstanceLimits {
        enis,
        ipv4_per_eni,
        ipv6_per_eni,
        vcpus,
    })
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
}
