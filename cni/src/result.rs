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

/// CHECK's test of the prevResult the runtime cached for this attachment (spec: the plugin checks
/// its own part of it): it must hold this pod's address on a sandbox interface named `ifname` in
/// `netns`, and exactly one interface in a sandbox. Returns why it does not.
pub fn check_prev(prev: &Value, ifname: &str, netns: &str, alloc: &Allocation) -> Result<(), String> {
    let ifaces = prev["interfaces"].as_array().ok_or("it has no interfaces")?;
    let sandboxed: Vec<usize> = (0..ifaces.len()).filter(|i| ifaces[*i].get("sandbox").is_some()).collect();
    let [pod] = sandboxed[..] else {
        return Err(format!("it has {} interfaces in a sandbox, underway makes exactly one", sandboxed.len()));
    };
    if ifaces[pod]["name"].as_str() != Some(ifname) || ifaces[pod]["sandbox"].as_str() != Some(netns) {
        return Err(format!(
            "its sandbox interface is {} in {}, not {ifname} in {netns}",
            ifaces[pod]["name"], ifaces[pod]["sandbox"]
        ));
    }
    let want = format!("{}/{}", alloc.address, alloc.prefix_len);
    let ips = prev["ips"].as_array().ok_or("it has no ips")?;
    if !ips
        .iter()
        .any(|ip| ip["address"].as_str() == Some(want.as_str()) && ip["interface"].as_u64() == Some(pod as u64))
    {
        return Err(format!("it does not give {want} to the sandbox interface (ipamd holds {want} for this pod)"));
    }
    Ok(())
}
