//! The wire API between the CNI binary and ipamd.
//!
//! One request and one answer per connection, each a single JSON object on one line, over ipamd's
//! unix socket (root-only). Every message carries [`API_VERSION`]; a peer of another version is
//! refused with [`ErrorKind::VersionMismatch`] rather than misread. This crate has no async
//! runtime and no cloud SDK, so the CNI binary that links it stays small; [`client::call`] is a
//! blocking client with a deadline.

pub mod client;

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change of the messages below.
pub const API_VERSION: u32 = 1;
/// Where ipamd listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/underway/ipamd.sock";
/// The pods' default gateway: link-local, answered by a permanent neighbour entry on the host veth.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// What identifies one attachment: CNI's (network, container id, ifname).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AttachmentKey {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddRequest {
    #[serde(flatten)]
    pub key: AttachmentKey,
    pub netns: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRequest {
    pub network: String,
    /// Every attachment the runtime still has; ipamd releases the network's others.
    pub valid: Vec<AttachmentKey>,
}

/// A request from the CNI binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Assign an address (durably) to an attachment; idempotent for the same key.
    Add(AddRequest),
    /// Release an attachment's address; an unknown key is success (`found: false`).
    Del(AttachmentKey),
    /// Does ipamd still hold this attachment's address?
    Check(AttachmentKey),
    /// Can ipamd allocate now?
    Status,
    Gc(GcRequest),
}

/// The address handed to a pod and how to wire it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub address: Ipv4Addr,
    /// Always 32 for the pod's own address; the pod reaches everything via [`POD_GATEWAY`].
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// The policy route table of the secondary ENI owning the address; `None` for the primary
    /// ENI and VPC-route mode (no `from` rule needed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_table: Option<u32>,
    /// The ENI owning the address (ENI mode), for logs and CHECK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eni: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    pub ready: bool,
    /// What ipamd waits for, in one line, when not ready or unable to allocate.
    pub reason: String,
    pub free: u32,
    pub assigned: u32,
}

/// Why a request failed. The CNI binary turns these into its error codes and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// ipamd has not finished starting (identity, cloud, store).
    NotReady,
    /// No free address within the wait; the message says why (limits, subnet, throttling).
    PoolEmpty,
    SubnetExhausted,
    EniLimitReached,
    Throttled,
    RouteTableFull,
    /// Another live owner's route holds this node's pod CIDR (VPC-route mode; never overwritten).
    RouteConflict,
    /// ipamd holds no address for this attachment (CHECK).
    UnknownAttachment,
    VersionMismatch,
    BadRequest,
    Internal,
    /// A kind this build does not know (a newer ipamd): read as a retryable failure, not garbage.
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

/// ipamd's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Added(Allocation),
    Released { found: bool },
    Checked(Allocation),
    Status(StatusReply),
    Collected { released: Vec<Ipv4Addr> },
    Error(ApiError),
}

/// A message on the wire: the version beside the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub version: u32,
    #[serde(flatten)]
    pub body: T,
}

/// Errors of encoding and decoding a line.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("peer speaks API version {got}, this side {API_VERSION}")]
    Version { got: u32 },
}

/// One message as one line (ends with `\n`).
pub fn encode<T: Serialize>(body: &T) -> String {
    let mut s = serde_json::to_string(&Envelope { version: API_VERSION, body }).expect("wire types serialise");
    s.push('\n');
    s
}

/// Reads one line back, checking the version first so that a newer peer's unknown message is
/// reported as a version mismatch, not as garbage.
pub fn decode<T: for<'de> Deserialize<'de>>(line: &str) -> Result<T, WireError> {
    #[derive(Deserialize)]
    struct VersionOnly {
        version: u32,
    }
    let v: VersionOnly = serde_json::from_str(line)?;
    if v.version != API_VERSION {
        return Err(WireError::Version { got: v.version });
    }
    let env: Envelope<T> = serde_json::from_str(line)?;
    Ok(env.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AttachmentKey {
        AttachmentKey { network: "underway".into(), container_id: "abc123".into(), ifname: "eth0".into() }
    }

    #[test]
    fn every_request_and_response_round_trips() {
        let reqs = vec![
            Request::Add(AddRequest {
                key: key(),
                netns: "/var/run/netns/x".into(),
                pod_namespace: Some("default".into()),
                pod_name: Some("web".into()),
            }),
            Request::Del(key()),
            Request::Check(key()),
            Request::Status,
            Request::Gc(GcRequest { network: "underway".into(), valid: vec![key()] }),
        ];
        for r in reqs {
            let line = encode(&r);
            assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'), "one line: {line}");
            assert_eq!(decode::<Request>(&line).unwrap(), r);
        }
        let alloc = Allocation {
            address: Ipv4Addr::new(10, 0, 1, 5),
            prefix_len: 32,
            gateway: POD_GATEWAY,
            route_table: Some(101),
            eni: Some("eni-1".into()),
            mtu: Some(9001),
        };
        let resps = vec![
            Response::Added(alloc.clone()),
            Response::Released { found: false },
            Response::Checked(alloc),
            Response::Status(StatusReply { ready: false, reason: "waiting for IMDS".into(), free: 0, assigned: 0 }),
            Response::Collected { released: vec![Ipv4Addr::new(10, 0, 1, 6)] },
            Response::Error(ApiError { kind: ErrorKind::SubnetExhausted, message: "subnet-1 has 0 free".into() }),
        ];
        for r in resps {
            assert_eq!(decode::<Response>(&encode(&r)).unwrap(), r);
        }
    }

    #[test]
    fn the_wire_form_is_stable() {
        let line = encode(&Request::Del(key()));
        assert_eq!(
            line,
            "{\"version\":1,\"op\":\"del\",\"network\":\"underway\",\"container_id\":\"abc123\",\"ifname\":\"eth0\"}\n"
        );
    }

    #[test]
    fn an_error_kind_from_a_newer_ipamd_is_read_as_other() {
        let r: Response =
            decode("{\"version\":1,\"result\":\"error\",\"kind\":\"quota_of_the_future\",\"message\":\"m\"}").unwrap();
        assert_eq!(r, Response::Error(ApiError { kind: ErrorKind::Other, message: "m".into() }));
        let r: Response =
            decode("{\"version\":1,\"result\":\"error\",\"kind\":\"route_conflict\",\"message\":\"m\"}").unwrap();
        assert_eq!(r, Response::Error(ApiError { kind: ErrorKind::RouteConflict, message: "m".into() }));
    }

    #[test]
    fn another_version_is_refused_before_the_body_is_read() {
        let e = decode::<Request>("{\"version\":2,\"op\":\"teleport\"}").unwrap_err();
        assert!(matches!(e, WireError::Version { got: 2 }), "{e}");
        let e = decode::<Request>("{\"version\":1,\"op\":\"teleport\"}").unwrap_err();
        assert!(matches!(e, WireError::Malformed(_)), "{e}");
        assert!(decode::<Request>("not json").is_err());
    }
}

/// Property tests of the wire decoder: whatever arrives on the socket, no panic; a line is either
/// refused (malformed, or another version) or decodes to a value that encodes back to itself.
/// `UNDERWAY_FUZZ_CASES` sets the case count (tests/torture runs many more).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn cases() -> u32 {
        std::env::var("UNDERWAY_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
    }

    fn key() -> impl Strategy<Value = AttachmentKey> {
        ("\\PC{0,20}", "\\PC{0,70}", "\\PC{0,16}").prop_map(|(network, container_id, ifname)| AttachmentKey {
            network,
            container_id,
            ifname,
        })
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (key(), "\\PC{0,40}", proptest::option::of("\\PC{0,10}"), proptest::option::of("\\PC{0,10}")).prop_map(
                |(key, netns, pod_namespace, pod_name)| Request::Add(AddRequest {
                    key,
                    netns,
                    pod_namespace,
                    pod_name
                })
            ),
            key().prop_map(Request::Del),
            key().prop_map(Request::Check),
            Just(Request::Status),
            ("\\PC{0,10}", proptest::collection::vec(key(), 0..4))
                .prop_map(|(network, valid)| Request::Gc(GcRequest { network, valid })),
        ]
    }

    /// Valid lines cut, spliced and bit-flipped, and plain garbage.
    fn line() -> impl Strategy<Value = String> {
        prop_oneof![
            (request(), any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<u8>()).prop_map(
                |(r, cut, at, b)| {
                    let mut bytes = encode(&r).into_bytes();
                    let n = bytes.len();
                    bytes[at.index(n)] ^= b;
                    bytes.truncate(cut.index(n + 1).max(1));
                    String::from_utf8_lossy(&bytes).into_owned()
                }
            ),
            request().prop_map(|r| encode(&r).replace("\"version\":1", "\"version\":2")),
            any::<String>(),
            "\\{\"version\":1,\"op\":\"[a-z]{0,6}\"(,\"[a-z_]{1,12}\":(null|1|\"x\"|\\[\\]|\\{\\})){0,4}\\}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn any_line_is_refused_or_round_trips(l in line()) {
            match decode::<Request>(&l) {
                Ok(r) => prop_assert_eq!(decode::<Request>(&encode(&r)).unwrap(), r),
                Err(WireError::Version { got }) => prop_assert_ne!(got, API_VERSION),
                Err(WireError::Malformed(_)) => {}
            }
            // The CNI side reads answers with the same decoder.
            if let Ok(r) = decode::<Response>(&l) {
                prop_assert_eq!(decode::<Response>(&encode(&r)).unwrap(), r);
            }
        }

        #[test]
        fn every_request_round_trips(r in request()) {
            prop_assert_eq!(decode::<Request>(&encode(&r)).unwrap(), r);
        }
    }
}
