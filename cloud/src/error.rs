//! The seam's one error type. Callers decide on the variant, never on a message string.

use std::fmt;

/// Which limit a `LimitReached` error reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// The instance has as many ENIs attached as its type allows (AttachmentLimitExceeded).
    EnisPerInstance,
    /// The ENI holds as many addresses or prefixes as the type allows
    /// (PrivateIpAddressLimitExceeded).
    AddressesPerEni,
    /// The subnet has no free addresses (InsufficientFreeAddressesInSubnet).
    SubnetAddresses,
    /// The subnet has no free contiguous /28 for a prefix (InsufficientCidrBlocks).
    SubnetPrefixes,
    /// The route table is full (RouteLimitExceeded).
    RoutesPerTable,
    /// The account or region cannot hold more ENIs (NetworkInterfaceLimitExceeded).
    EnisPerRegion,
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LimitKind::EnisPerInstance => "ENIs per instance",
            LimitKind::AddressesPerEni => "addresses per ENI",
            LimitKind::SubnetAddresses => "free addresses in the subnet",
            LimitKind::SubnetPrefixes => "free /28 prefixes in the subnet",
            LimitKind::RoutesPerTable => "routes per route table",
            LimitKind::EnisPerRegion => "ENIs per region",
        })
    }
}

/// Errors of the cloud seam. `op` is the API operation (e.g. `AssignPrivateIpAddresses`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudError {
    /// The request was refused before any API call: `arg` names the argument at fault.
    #[error("invalid request: {arg}: {reason}")]
    InvalidRequest { arg: &'static str, reason: String },
    /// The cloud throttled the call (after the SDK's own retries).
    #[error("{op}: throttled by the cloud ({code})")]
    Throttled { op: &'static str, code: String },
    /// A quota or capacity limit was reached.
    #[error("{op}: limit reached: {limit} ({code}: {message})")]
    LimitReached { op: &'static str, limit: LimitKind, code: String, message: String },
    /// The named resource does not exist.
    #[error("{op}: not found ({code}: {message})")]
    NotFound { op: &'static str, code: String, message: String },
    /// The resource is in use (an attached ENI, a route that exists already).
    #[error("{op}: in use ({code}: {message})")]
    InUse { op: &'static str, code: String, message: String },
    /// A failure worth retrying later: timeouts, 5xx, connection errors, incorrect state.
    #[error("{op}: transient failure: {message}")]
    Transient { op: &'static str, message: String },
    /// Anything else: bad credentials, malformed parameters. Retrying will not help.
    #[error("{op}: {code}: {message}")]
    Fatal { op: &'static str, code: String, message: String },
}

impl CloudError {
    pub fn invalid(arg: &'static str, reason: impl Into<String>) -> Self {
        CloudError::InvalidRequest { arg, reason: reason.into() }
    }

    /// The short outcome label used for call counting and metrics.
    pub fn outcome(&self) -> Outcome {
        match self {
            CloudError::InvalidRequest { .. } => Outcome::Invalid,
            CloudError::Throttled { .. } => Outcome::Throttled,
            CloudError::LimitReached { .. } => Outcome::Limit,
            CloudError::NotFound { .. } => Outcome::NotFound,
            CloudError::InUse { .. } => Outcome::InUse,
            CloudError::Transient { .. } => Outcome::Transient,
            CloudError::Fatal { .. } => Outcome::Fatal,
        }
    }

    /// Classifies an EC2 error code. `status` is the HTTP status when there was a response.
    pub fn from_code(op: &'static str, code: &str, message: &str, status: Option<u16>) -> Self {
        let (code_s, message) = (code.to_string(), message.to_string());
        let limit = |limit| CloudError::LimitReached { op, limit, code: code_s.clone(), message: message.clone() };
        match code {
            "RequestLimitExceeded"
            | "Throttling"
            | "ThrottlingException"
            | "RequestThrottled"
            | "RequestThrottledException"
            | "TooManyRequestsException"
            | "SlowDown"
            | "EC2ThrottledException"
            | "PriorRequestNotComplete" => CloudError::Throttled { op, code: code_s },
            "AttachmentLimitExceeded" => limit(LimitKind::EnisPerInstance),
            "PrivateIpAddressLimitExceeded" | "PrefixLimitExceeded" => limit(LimitKind::AddressesPerEni),
            "InsufficientFreeAddressesInSubnet" => limit(LimitKind::SubnetAddresses),
            "InsufficientCidrBlocks" => limit(LimitKind::SubnetPrefixes),
            "RouteLimitExceeded" => limit(LimitKind::RoutesPerTable),
            "NetworkInterfaceLimitExceeded" => limit(LimitKind::EnisPerRegion),
            "InvalidNetworkInterface.InUse"
            | "RouteAlreadyExists"
            | "DependencyViolation"
            | "InvalidIPAddress.InUse"
            | "ResourceInUse" => CloudError::InUse { op, code: code_s, message },
            "IncorrectState"
            | "IncorrectInstanceState"
            | "InternalError"
            | "InternalFailure"
            | "ServiceUnavailable"
            | "Unavailable"
            | "InsufficientInstanceCapacity" => CloudError::Transient { op, message: format!("{code}: {message}") },
            c if c.ends_with(".NotFound") || c == "InvalidRoute.NotFound" => {
                CloudError::NotFound { op, code: code_s, message }
            }
            _ if status.is_some_and(|s| s >= 500) => {
                CloudError::Transient { op, message: format!("{code}: {message}") }
            }
            _ => CloudError::Fatal { op, code: code_s, message },
        }
    }
}

/// The outcome of one cloud call, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Ok,
    Invalid,
    Throttled,
    Limit,
    NotFound,
    InUse,
    Transient,
    Fatal,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Invalid => "invalid",
            Outcome::Throttled => "throttled",
            Outcome::Limit => "limit",
            Outcome::NotFound => "not_found",
            Outcome::InUse => "in_use",
            Outcome::Transient => "transient",
            Outcome::Fatal => "fatal",
        }
    }
}

pub type Result<T, E = CloudError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_variants() {
        let table: &[(&str, Option<u16>, Outcome)] = &[
            ("RequestLimitExceeded", Some(503), Outcome::Throttled),
            ("Throttling", Some(400), Outcome::Throttled),
            ("AttachmentLimitExceeded", Some(400), Outcome::Limit),
            ("PrivateIpAddressLimitExceeded", Some(400), Outcome::Limit),
            ("InsufficientFreeAddressesInSubnet", Some(400), Outcome::Limit),
            ("InsufficientCidrBlocks", Some(400), Outcome::Limit),
            ("RouteLimitExceeded", Some(400), Outcome::Limit),
            ("InvalidNetworkInterfaceID.NotFound", Some(400), Outcome::NotFound),
            ("InvalidRoute.NotFound", Some(400), Outcome::NotFound),
            ("InvalidRouteTableID.NotFound", Some(400), Outcome::NotFound),
            ("InvalidNetworkInterface.InUse", Some(400), Outcome::InUse),
            ("RouteAlreadyExists", Some(400), Outcome::InUse),
            ("IncorrectState", Some(400), Outcome::Transient),
            ("InternalError", Some(500), Outcome::Transient),
            ("SomethingNew", Some(503), Outcome::Transient),
            ("UnauthorizedOperation", Some(403), Outcome::Fatal),
            ("InvalidParameterValue", Some(400), Outcome::Fatal),
        ];
        for (code, status, want) in table {
            let got = CloudError::from_code("Op", code, "m", *status);
            assert_eq!(got.outcome(), *want, "{code}");
        }
    }

    #[test]
    fn limit_kinds_are_specific() {
        let e = CloudError::from_code("AttachNetworkInterface", "AttachmentLimitExceeded", "x", Some(400));
        assert!(matches!(e, CloudError::LimitReached { limit: LimitKind::EnisPerInstance, .. }));
        let e = CloudError::from_code("AssignPrivateIpAddresses", "InsufficientCidrBlocks", "x", Some(400));
        assert!(matches!(e, CloudError::LimitReached { limit: LimitKind::SubnetPrefixes, .. }));
    }
}
