//! The host's side of the truth: pods whose veths exist on the node. Both modes check the
//! store's assignments against it at sync, and every time addresses are offered: an address a
//! running pod's veth routes is marked held (as *recovered*) in the same state change that makes
//! it free, so no Add can take it in between (issue 14, item 1).

use std::net::Ipv4Addr;

use crate::error::Result;
use crate::service::recovered_key;
use crate::state::{Book, NodeState};

/// Pod veths on the host, each as its attachment's id (`underway_routes::host_veth_name` of
/// container id and ifname, read from the veth's alias: the veth itself may be named per pod),
/// and the addresses each routes. ipamd names a pod's veth by this id everywhere.
pub type HostPods = Vec<(String, Vec<Ipv4Addr>)>;

/// Reads the host's pod veths (`veth_prefix`).
pub async fn host_pods(veth_prefix: &str) -> Result<HostPods> {
    Ok(underway_routes::pod_veths(None, veth_prefix).await?)
}

/// Marks every address a host veth routes that is free in the pool as held by that veth's
/// recovered key. Returns what it marked ("<addr> on <veth>").
pub fn mark_running(b: &mut Book, pods: &HostPods) -> Vec<String> {
    let mut recovered = Vec::new();
    // A veth whose pod's DEL was answered after the host was read is gone already.
    for (veth, addrs) in pods.iter().filter(|(v, _)| !b.deleted_veths.contains(v)) {
        for a in addrs {
            // Only a free address: a cooling one was just released (its veth about to go).
            if b.pool.is_free(*a) && b.pool.assign_address(&recovered_key(veth), *a).is_ok() {
                recovered.push(format!("{a} on {veth}"));
            }
        }
    }
    recovered
}

/// Reports pods on the host that the store did not know (they are held until their DEL or GC).
pub fn report_recovered(state: &NodeState, recovered: &[String]) {
    if !recovered.is_empty() {
        state.record_error(format!(
            "pods on the host that the store did not know, held until their DEL or GC: {}",
            recovered.join(", ")
        ));
    }
}

/// Matches the store's assignments against the pods on the host (`veths`, as the sync read them).
pub async fn sync_host(state: &NodeState, veth_prefix: &str, veths: &HostPods) -> Result<()> {
    let on_host: std::collections::BTreeSet<String> = veths.iter().map(|(v, _)| v.clone()).collect();
    let ((recovered, orphaned), g) = state.change(|b| {
        let recovered = mark_running(b, veths);
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
    report_recovered(state, &recovered);
    if orphaned > 0 {
        tracing::info!("{orphaned} assignments have no host veth; they wait for the runtime's DEL or GC");
    }
    state.commit(g).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;
    use crate::pool::Pool;

    /// Found by the kill storm: a restarted ipamd read the host (the pod's veth still there), the
    /// pod's DEL then removed the veth and was answered "not found" (the store was lost), and the
    /// offer marked the address held for the gone veth: held until the next GC or orphan sweep.
    #[test]
    fn a_veth_deleted_after_the_host_was_read_is_not_recovered() {
        let mut b = Book {
            mode: Mode::Eni,
            pool: Pool::new(0),
            pods: Default::default(),
            waiting: 0,
            deleted_veths: Default::default(),
        };
        b.pool.add_eni("eni-0", 0, None);
        let (a, c): (Ipv4Addr, Ipv4Addr) = ("10.0.0.5".parse().unwrap(), "10.0.0.6".parse().unwrap());
        b.pool.add_addresses("eni-0", &[a, c]).unwrap();
        let read: HostPods = vec![("uwgone".into(), vec![a]), ("uwlive".into(), vec![c])];
        b.deleted_veths.insert("uwgone".into()); // the DEL, answered in between
        assert_eq!(mark_running(&mut b, &read), vec!["10.0.0.6 on uwlive".to_string()]);
        assert!(b.pool.is_free(a), "the deleted pod's address stays free");
    }
}
