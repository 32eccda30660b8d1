//! The ADD result, written in the version the config asks for.

use serde_json::{Value, json};
use underway_api::Allocation;
use underway_routes::PodLinks;

use crate::config::version_rank;

/// The result JSON: two interfaces (host veth, pod interface), the pod's /32 with the link-local
/// gateway, and the default route. 0.3.x/0.4.0 carry `version: "4"` on each IP; 1.x do not.
pub fn add_result(
    cni_version: &str,
    host_veth: &str,
    ifname: &str,
    netns: &str,
    links: &PodLinks,
    alloc: &Allocation,
) -> Value {
    let mut ip = json!({
        "address": format!("{}/{}", alloc.address, alloc.prefix_len),
        "gateway": alloc.gateway.to_string(),
        "interface": 1,
    });
    if version_rank(cni_version) < version_rank("1.0.0") {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": cni_version,
        "interfaces": [
            { "name": host_veth, "mac": links.host_mac },
            { "name": ifname, "mac": links.pod_mac, "sandbox": netns },
        ],
        "ips": [ip],
        "routes": [{ "dst": "0.0.0.0/0", "gw": alloc.gateway.to_string() }],
        "dns": {},
    })
}

pub fn version_result(cni_version: &str) -> Value {
    json!({ "cniVersion": cni_version, "supportedVersions": crate::config::SUPPORTED })
}
