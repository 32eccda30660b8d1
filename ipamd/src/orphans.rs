//! The orphan sweep (issue 14, item 5): containerd 1.6/1.7 never send CNI GC, and a node that
//! reboots without the runtime's DEL leaves assignments whose pod is gone for good. An assignment
//! is reclaimed once it is older than the grace period, its host veth is gone, and its network
//! namespace is gone too (or was never recorded: stores before format 2). A DEL that comes later
//! finds nothing and succeeds, as any DEL of an unknown attachment does.
//!
//! The grace period covers an ADD in flight: ipamd answers before the CNI binary makes the veth.

use std::collections::BTreeSet;
use std::time::Duration;

use underway_api::AttachmentKey;

use crate::clock::unix_ms;
use crate::service::RECOVERED;
use crate::state::{Book, NodeState};

/// What the sweep knows of one assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub key: AttachmentKey,
    /// Unix ms; 0 when unknown (the oldest possible).
    pub assigned_at: u64,
    pub netns: Option<String>,
}

/// The assignments to reclaim: past `grace_ms`, no host veth, no netns. A recovered entry (a pod
/// found on the host that the store did not know) is keyed by its veth: reclaimed once the veth
/// is gone.
pub fn orphans(
    held: &[Held],
    host_veths: &BTreeSet<String>,
    netns_exists: impl Fn(&str) -> bool,
    veth_prefix: &str,
    now_ms: u64,
    grace_ms: u64,
) -> Vec<AttachmentKey> {
    held.iter()
        .filter(|h| {
            if h.key.network == RECOVERED {
                return !host_veths.contains(&h.key.container_id);
            }
            let veth = underway_routes::host_veth_name(veth_prefix, &h.key.container_id, &h.key.ifname);
            now_ms.saturating_sub(h.assigned_at) >= grace_ms
                && !host_veths.contains(&veth)
                && !h.netns.as_deref().is_some_and(&netns_exists)
        })
        .map(|h| h.key.clone())
        .collect()
}

fn held(b: &Book) -> Vec<Held> {
    b.pool
        .held()
        .map(|(k, _)| {
            let rec = b.pods.get(k);
            Held {
                key: k.clone(),
                assigned_at: rec.map_or(0, |r| r.assigned_at),
                netns: rec.and_then(|r| r.netns.clone()),
            }
        })
        .collect()
}

/// One sweep: reads the host's veths, reclaims the orphans (into cooldown) in one state change
/// and records what it reclaimed. Returns how many.
pub async fn sweep(state: &NodeState, veth_prefix: &str, grace_ms: u64) -> crate::error::Result<usize> {
    let veths: BTreeSet<String> = crate::host::host_pods(veth_prefix).await?.into_iter().map(|(v, _)| v).collect();
    let now = unix_ms();
    let (reclaimed, g) = state.change(|b| {
        // Decided and applied under one lock: an Add or DEL in between cannot be overtaken.
        let keys = orphans(&held(b), &veths, |p| std::path::Path::new(p).exists(), veth_prefix, now, grace_ms);
        let mut out = Vec::new();
        for k in keys {
            if let Some(a) = b.pool.release(&k, now) {
                b.pods.remove(&k);
                out.push(format!("{a} ({}/{} {})", k.network, k.container_id, k.ifname));
            }
        }
        out
    });
    if reclaimed.is_empty() {
        return Ok(0);
    }
    state.commit(g).await?;
    state.wake.notify_one();
    state.record_error(format!(
        "reclaimed {} assignments whose pod is gone (no veth, no netns, older than {grace_ms} ms): {}",
        reclaimed.len(),
        reclaimed.join(", ")
    ));
    Ok(reclaimed.len())
}

/// Sweeps every `grace_ms / 4` (between 1 s and 60 s) for as long as the task lives.
pub async fn run(state: std::sync::Arc<NodeState>, veth_prefix: String, grace_ms: u64, reclaimed: impl Fn(usize)) {
    let every = Duration::from_millis((grace_ms / 4).clamp(1_000, 60_000));
    loop {
        tokio::time::sleep(every).await;
        match sweep(&state, &veth_prefix, grace_ms).await {
            Ok(0) => {}
            Ok(n) => reclaimed(n),
            Err(e) => tracing::warn!("orphan sweep: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(net: &str, c: &str) -> AttachmentKey {
        AttachmentKey {
            network: net.into(),
            container_id: c.into(),
            ifname: if net == RECOVERED { "" } else { "eth0" }.into(),
        }
    }

    fn veth(c: &str) -> String {
        underway_routes::host_veth_name("uw", c, "eth0")
    }

    #[test]
    fn only_old_assignments_without_veth_or_netns_are_reclaimed() {
        let now = 10_000_000;
        let grace = 600_000;
        let h = |c: &str, age: u64, netns: Option<&str>| Held {
            key: key("underway", c),
            assigned_at: now - age,
            netns: netns.map(str::to_string),
        };
        let live_ns = "/run/netns/alive";
        // (case, held, host veths, reclaimed?)
        let cases: Vec<(&str, Held, Vec<String>, bool)> = vec![
            ("gone: old, no veth, netns gone", h("a", grace, Some("/run/netns/gone")), vec![], true),
            ("gone: old, no veth, netns never recorded", h("b", grace + 1, None), vec![], true),
            ("young: an ADD may still be making the veth", h("c", grace - 1, Some("/run/netns/gone")), vec![], false),
            ("veth still there", h("d", grace * 2, Some("/run/netns/gone")), vec![veth("d")], false),
            ("netns still there (veth deleted by hand)", h("e", grace * 2, Some(live_ns)), vec![], false),
            ("another pod's veth does not count", h("f", grace, None), vec![veth("x")], true),
        ];
        for (name, held, veths, want) in cases {
            let veths: BTreeSet<String> = veths.into_iter().collect();
            let got = orphans(std::slice::from_ref(&held), &veths, |p| p == live_ns, "uw", now, grace);
            assert_eq!(!got.is_empty(), want, "{name}");
        }
    }

    #[test]
    fn a_recovered_entry_goes_with_its_veth() {
        let held = vec![
            Held { key: key(RECOVERED, "uwaaaa"), assigned_at: 0, netns: None },
            Held { key: key(RECOVERED, "uwbbbb"), assigned_at: 0, netns: None },
        ];
        let veths: BTreeSet<String> = ["uwaaaa".to_string()].into();
        assert_eq!(orphans(&held, &veths, |_| false, "uw", 5, 600_000), vec![key(RECOVERED, "uwbbbb")]);
    }
}
