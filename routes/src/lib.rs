//! The node datapath of underway, over rtnetlink.
//!
//! Every operation on a namespace goes through a netlink socket opened *in* that namespace
//! ([`netns::handle_in`]); no thread of the process stays in another namespace. Set-up and
//! teardown are symmetric and idempotent; teardown tolerates any missing piece.

pub mod egress;
pub mod eni;
pub mod netns;
pub mod pod;

pub use eni::{EniSpec, setup_eni, teardown_eni};
pub use pod::{
    PodLinks, PodSpec, PodVeth, Replace, VethSpec, attachment_veth, check_pod, gc_host_veths, host_veth_name,
    make_veth, pod_veth_name, pod_veths, pod_veths_named, setup_pod, teardown_attachment, teardown_pod, teardown_veth,
};

/// Errors of the datapath. `op` says what was being done, so a failure names its step.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("netns {path}: {source}")]
    Netns { path: String, source: std::io::Error },
    #[error("{op}: {source}")]
    Netlink { op: String, source: rtnetlink::Error },
    #[error("{0} not found")]
    Missing(String),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The pod's address is already routed to another live link: another pod holds it.
    #[error(
        "address {address} is already routed to {holder}, another pod's veth: refusing to take its traffic (the address was handed out twice?)"
    )]
    InUse { address: std::net::Ipv4Addr, holder: String },
    /// A host veth of the name wanted belongs to another attachment (an older sandbox of the
    /// same pod) and may be replaced only once the pod has its address.
    #[error("{veth} belongs to another attachment ({owner}): replaced only once ipamd has answered")]
    Occupied { veth: String, owner: String },
}

impl RoutesError {
    pub(crate) fn netlink(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RoutesError {
        let op = op.into();
        move |source| RoutesError::Netlink { op, source }
    }

    /// The errno of a netlink error (positive), if it is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RoutesError::Netlink { source: rtnetlink::Error::NetlinkError(m), .. } => m.raw_code().checked_neg(),
            _ => None,
        }
    }
}

pub type Result<T, E = RoutesError> = std::result::Result<T, E>;
