//! The host's side of the truth: pods whose veths exist on the node. Both modes check the
//! store's assignments against it at sync.

use crate::error::Result;
use crate::service::recovered_key;
use crate::state::NodeState;

/// Matches the store's assignments against the pods on the host.
pub async fn sync_host(state: &NodeState, veth_prefix: &str) -> Result<()> {
    let veths = underway_routes::pod_veths(None, veth_prefix).await?;
    let on_host: std::collections::BTreeSet<String> = veths.iter().map(|(v, _)| v.clone()).collect();
    let ((recovered, orphaned), g) = state.change(|b| {
        let mut recovered = Vec::new();
        for (veth, addrs) in &veths {
            for a in addrs {
                let held = b.pool.held().any(|(_, ip)| ip == a);
                if !held && b.pool.assign_address(&recovered_key(veth), *a).is_ok() {
                    recovered.push(format!("{a} on {veth}"));
                }
            }
        }
        let orphaned = b
            .pool
            .held()
            .filter(|(k, _)| {
                let veth = underway_routes::host_veth_name(veth_prefix, &k.container_id, &k.ifname);
                k.network != crate::service::RECOVERED && !on_host.contains(&veth)
            })
            .count();
        (recovered, orphaned)
    });
    if !recovered.is_empty() {
        state.record_error(format!(
            "pods on the host that the store did not know, held until their DEL or GC: {}",
            recovered.join(", ")
        ));
    }
    if orphaned > 0 {
        tracing::info!("{orphaned} assignments have no host veth; they wait for the runtime's DEL or GC");
    }
    state.commit(g).await
}
