//! This node's settings from the cluster: the pool its label names (an `UnderwayPool`, else the
//! config file's `[pools.<name>]`) and, in VPC-route mode, its `spec.podCIDR`.
//!
//! [`effective`] is the pure part (Node + pool → config); [`resolve`] watches the Node (by a field
//! selector on its name) until the config is complete, and [`watch_changes`] keeps watching to
//! report a label or pod CIDR that changed under a running ipamd.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};

use crate::config::{Config, Mode, PoolSpec, UnderwayPool};
use crate::error::{IpamdError, Result};

/// What ipamd reads of its Node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeView {
    /// The value of the pool label, if the node has one.
    pub pool: Option<String>,
    /// The node's IPv4 pod CIDR (`spec.podCIDRs`, else `spec.podCIDR`), if one is allocated.
    pub pod_cidr: Option<Ipv4Net>,
    /// Pods the kubelet runs at most (`status.capacity.pods`): bounds the warm pool unless
    /// `targets.max_pods` is set.
    pub max_pods: Option<u32>,
}

/// Reads a Node. A pod CIDR that does not parse as IPv4 is ignored (dual-stack lists carry IPv6
/// ones too).
pub fn view(node: &Node, pool_label: &str) -> NodeView {
    let pool = node.metadata.labels.as_ref().and_then(|l| l.get(pool_label)).cloned();
    let spec = node.spec.as_ref();
    let cidrs = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    let single = spec.and_then(|s| s.pod_cidr.clone());
    let pod_cidr = cidrs.iter().chain(single.iter()).find_map(|c| c.parse::<Ipv4Net>().ok());
    let max_pods = node
        .status
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("pods"))
        .and_then(|q| q.0.parse::<u32>().ok());
    NodeView { pool, pod_cidr, max_pods }
}

/// The effective config, or what it still waits for.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved {
    Ready(Box<Config>),
    /// VPC-route mode and the Node has no IPv4 pod CIDR yet (the controller-manager allocates it
    /// after the Node registers).
    WaitPodCidr,
}

/// Applies the Node's view and its pool (the `UnderwayPool` named by the label, when one exists)
/// over the base config, and validates the result. Errors name the object and field at fault.
pub fn effective(base: &Config, node_name: &str, node: &NodeView, cr: Option<&UnderwayPool>) -> Result<Resolved> {
    let mut cfg = base.clone();
    if let Some(name) = &node.pool {
        let label = &base.kubernetes.pool_label;
        let spec: PoolSpec = match (cr, base.pools.get(name)) {
            (Some(cr), _) => {
                if cr.spec.vpc_route.pod_cidr.is_some() {
                    return Err(IpamdError::Config {
                        field: format!("UnderwayPool {name}: spec.vpc_route.pod_cidr"),
                        reason: "a pool is shared by many nodes; each node's pod CIDR is its Node's spec.podCIDR"
                            .into(),
                    });
                }
                cr.spec.clone()
            }
            (None, Some(p)) => p.clone(),
            (None, None) => {
                let have: Vec<&String> = base.pools.keys().collect();
                return Err(IpamdError::Config {
                    field: "kubernetes.pool_label".into(),
                    reason: format!(
                        "Node {node_name} has the label {label}={name}, but there is no UnderwayPool {name:?} \
                         and no [pools.{name}] in the config file (which has {have:?})"
                    ),
                });
            }
        };
        cfg.pools.insert(name.clone(), spec);
        cfg.pool = Some(name.clone());
        cfg.select_pool()?;
    }
    if cfg.targets.max_pods.unwrap_or(0) == 0 {
        cfg.targets.max_pods = node.max_pods;
    }
    if cfg.mode == Mode::VpcRoute {
        match (node.pod_cidr, cfg.vpc_route.pod_cidr) {
            (Some(c), _) => cfg.vpc_route.pod_cidr = Some(c),
            (None, Some(_)) => {} // set in the file: a node outside the controller's allocation
            (None, None) => return Ok(Resolved::WaitPodCidr),
        }
    }
    cfg.validate().map_err(|e| match e {
        IpamdError::Config { field, reason } if cr.is_some() && node.pool.is_some() => {
            // The object's own path: `spec.<section>.<field>` (the file's pools say `pools.<name>.`).
            let name = node.pool.as_deref().unwrap_or_default();
            let field = match field.strip_prefix(&format!("pools.{name}.")) {
                Some(f) => format!("spec.{f}"),
                None => field,
            };
            IpamdError::Config { field: format!("UnderwayPool {name}: {field}"), reason }
        }
        e => e,
    })?;
    Ok(Resolved::Ready(Box::new(cfg)))
}

type NodeStream = Pin<Box<dyn Stream<Item = std::result::Result<Node, watcher::Error>> + Send>>;

/// The watch of this one Node.
pub fn watch(client: kube::Client, name: &str) -> NodeStream {
    let nodes: Api<Node> = Api::all(client);
    let cfg = watcher::Config::default().fields(&super::node_selector(name));
    watcher(nodes, cfg).default_backoff().applied_objects().boxed()
}

/// Looks up the Node's pool (if labelled) and computes the effective config.
async fn settle(client: &kube::Client, base: &Config, name: &str, node: &NodeView) -> Result<Resolved> {
    let cr = match &node.pool {
        Some(p) => Api::<UnderwayPool>::all(client.clone())
            .get_opt(p)
            .await
            .map_err(|e| IpamdError::Kube(format!("UnderwayPool {p}: {e}")))?,
        None => None,
    };
    effective(base, name, node, cr.as_ref())
}

/// Watches the Node until the effective config is complete. `waiting` hears what it waits for
/// (an unreachable API server, a missing pool, a pod CIDR not yet allocated); a wrong pool is
/// looked up again every `retry`. Returns the config, what it was made from, and the watch.
pub async fn resolve(
    client: kube::Client,
    base: &Config,
    retry: Duration,
    waiting: impl Fn(String),
) -> Result<(Config, NodeView, NodeStream)> {
    let name = base.kubernetes.node_name.clone().unwrap_or_default();
    let mut stream = watch(client.clone(), &name);
    let mut latest: Option<NodeView> = None;
    let mut failed = false;
    loop {
        if let Some(v) = &latest {
            match settle(&client, base, &name, v).await {
                Ok(Resolved::Ready(cfg)) => return Ok((*cfg, v.clone(), stream)),
                Ok(Resolved::WaitPodCidr) => {
                    failed = false;
                    waiting(format!("spec.podCIDR of Node {name} (vpc-route mode)"));
                }
                Err(e) => {
                    failed = true;
                    waiting(format!("a usable pool for Node {name}: {e}"));
                }
            }
        }
        tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(n)) => latest = Some(view(&n, &base.kubernetes.pool_label)),
                Some(Err(e)) => waiting(format!("Node {name} from the API server: {e}")),
                None => return Err(IpamdError::Kube(format!("the watch of Node {name} ended"))),
            },
            _ = tokio::time::sleep(retry), if failed => {}
        }
    }
}

/// What changed on the Node since ipamd took its settings, as a message; `None` if nothing that
/// matters did. A running ipamd does not switch pools or pod CIDRs under its pods.
pub fn change(was: &NodeView, now: &NodeView, label: &str, mode: Mode) -> Option<String> {
    if was.pool != now.pool {
        return Some(format!(
            "the label {label} changed from {:?} to {:?}: ipamd keeps its pool until it restarts (drain the node, \
             then restart ipamd)",
            was.pool, now.pool
        ));
    }
    if mode == Mode::VpcRoute && now.pod_cidr.is_some() && was.pod_cidr != now.pod_cidr {
        return Some(format!(
            "spec.podCIDR changed from {:?} to {:?}: ipamd keeps the one it routes until it restarts",
            was.pod_cidr, now.pod_cidr
        ));
    }
    None
}

/// Keeps the Node watched; each change that matters goes to `report`.
pub async fn watch_changes(
    mut stream: NodeStream,
    mut was: NodeView,
    label: String,
    mode: Mode,
    report: impl Fn(String),
) {
    while let Some(ev) = stream.next().await {
        if let Ok(n) = ev {
            let now = view(&n, &label);
            if let Some(m) = change(&was, &now, &label, mode) {
                report(m);
            }
            was = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::fixtures::{self, config as base, not_found, pool_cr};
    use serde_json::{Value, json};

    fn node(labels: Value, spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": "node-a", "resourceVersion": "41", "labels": labels}, "spec": spec})
    }

    fn cr(name: &str, spec: Value) -> UnderwayPool {
        serde_json::from_value(pool_cr(name, spec)).unwrap()
    }

    fn v(pool: Option<&str>, cidr: Option<&str>) -> NodeView {
        NodeView { pool: pool.map(Into::into), pod_cidr: cidr.map(|c| c.parse().unwrap()), max_pods: None }
    }

    #[test]
    fn view_reads_the_label_and_the_first_ipv4_pod_cidr() {
        let n: Node = serde_json::from_value(node(
            json!({"underway.dev/pool": "big", "other": "x"}),
            json!({"podCIDR": "fd00::/64", "podCIDRs": ["fd00::/64", "10.200.3.0/24"]}),
        ))
        .unwrap();
        assert_eq!(view(&n, "underway.dev/pool"), v(Some("big"), Some("10.200.3.0/24")));
        assert_eq!(view(&n, "example.com/pool"), v(None, Some("10.200.3.0/24")));
        let bare: Node = serde_json::from_value(json!({"metadata": {"name": "n"}})).unwrap();
        assert_eq!(view(&bare, "underway.dev/pool"), NodeView::default());
        let with_capacity: Node = serde_json::from_value(
            json!({"metadata": {"name": "n"}, "status": {"capacity": {"pods": "29", "cpu": "2"}}}),
        )
        .unwrap();
        assert_eq!(view(&with_capacity, "underway.dev/pool").max_pods, Some(29));
    }

    #[test]
    fn effective_config_table() {
        let file_pools =
            base(&[("UNDERWAY_POOLS__GPU__MODE", "eni"), ("UNDERWAY_POOLS__GPU__TARGETS__WARM_IP_TARGET", "3")]);
        let routed = cr(
            "routed",
            json!({"mode": "vpc-route", "vpc_route": {"route_tables": ["rtb-0a1"], "cluster_cidr": "10.200.0.0/16"}}),
        );
        let enis = cr("gpu", json!({"mode": "eni", "targets": {"warm_ip_target": 9}, "eni": {"mtu": 1500}}));
        let with_cidr = cr("routed", json!({"mode": "vpc-route", "vpc_route": {"pod_cidr": "10.9.0.0/24"}}));
        let bad = cr("gpu", json!({"mode": "eni", "targets": {"max_eni": 0}}));
        let ready = |r: Result<Resolved>| match r {
            Ok(Resolved::Ready(c)) => *c,
            other => panic!("{other:?}"),
        };
        // No label: the file's settings.
        let c = ready(effective(&file_pools, "node-a", &v(None, None), None));
        assert_eq!((c.mode, c.pool.clone()), (Mode::Eni, None));
        // The Node's pod capacity bounds the pool, unless the config sets max_pods itself.
        let capped = NodeView { max_pods: Some(29), ..v(None, None) };
        assert_eq!(ready(effective(&file_pools, "node-a", &capped, None)).targets.max_pods, Some(29));
        let mut own = file_pools.clone();
        own.targets.max_pods = Some(17);
        assert_eq!(ready(effective(&own, "node-a", &capped, None)).targets.max_pods, Some(17));
        // The label names a CR: the CR wins over a file pool of the same name.
        let c = ready(effective(&file_pools, "node-a", &v(Some("gpu"), None), Some(&enis)));
        assert_eq!((c.targets.warm_ip_target, c.eni.mtu, c.pool.as_deref()), (Some(9), 1500, Some("gpu")));
        // No CR: the file's [pools.gpu].
        let c = ready(effective(&file_pools, "node-a", &v(Some("gpu"), None), None));
        assert_eq!(c.targets.warm_ip_target, Some(3));
        // VPC-route: the Node's pod CIDR; none yet means wait.
        let c = ready(effective(&file_pools, "node-a", &v(Some("routed"), Some("10.200.3.0/24")), Some(&routed)));
        assert_eq!(c.mode, Mode::VpcRoute);
        assert_eq!(c.vpc_route.pod_cidr, Some("10.200.3.0/24".parse().unwrap()));
        assert_eq!(c.vpc_route.route_tables, vec!["rtb-0a1".to_string()]);
        assert_eq!(
            effective(&file_pools, "node-a", &v(Some("routed"), None), Some(&routed)).unwrap(),
            Resolved::WaitPodCidr
        );
        // Errors name the object and the field.
        let e = effective(&file_pools, "node-a", &v(Some("nope"), None), None).unwrap_err().to_string();
        assert!(
            e.contains("kubernetes.pool_label") && e.contains("underway.dev/pool=nope") && e.contains("gpu"),
            "{e}"
        );
        let e = effective(&file_pools, "node-a", &v(Some("routed"), Some("10.200.3.0/24")), Some(&with_cidr));
        let e = e.unwrap_err().to_string();
        assert!(e.contains("UnderwayPool routed: spec.vpc_route.pod_cidr"), "{e}");
        let e = effective(&file_pools, "node-a", &v(Some("gpu"), None), Some(&bad)).unwrap_err().to_string();
        assert!(e.contains("UnderwayPool gpu: spec.targets.max_eni"), "{e}");
    }

    #[test]
    fn changes_that_matter() {
        let l = "underway.dev/pool";
        let was = v(Some("a"), Some("10.1.0.0/24"));
        assert_eq!(change(&was, &was.clone(), l, Mode::VpcRoute), None);
        assert!(change(&was, &v(Some("b"), Some("10.1.0.0/24")), l, Mode::Eni).unwrap().contains("\"b\""));
        assert!(change(&was, &v(Some("a"), Some("10.1.1.0/24")), l, Mode::VpcRoute).is_some());
        assert_eq!(change(&was, &v(Some("a"), Some("10.1.1.0/24")), l, Mode::Eni), None, "ENI mode has no pod CIDR");
    }

    /// The list that starts a watch of node-a: only that node, by a field selector.
    fn assert_node_list(s: &fixtures::Seen) {
        assert_eq!(s.line(), "GET /api/v1/nodes");
        assert_eq!(s.query.get("fieldSelector").map(String::as_str), Some("metadata.name=node-a"));
        assert!(!s.query.contains_key("labelSelector") && !s.query.contains_key("watch"), "{:?}", s.query);
    }

    fn list(items: Vec<Value>) -> Value {
        json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "42"}, "items": items})
    }

    #[tokio::test]
    async fn resolve_reads_its_node_then_its_pool() {
        let (client, mut api) = fixtures::client();
        let cfg = base(&[]);
        let task = tokio::spawn(async move {
            resolve(client, &cfg, Duration::from_secs(60), |_| {}).await.map(|(c, v, _)| (c, v))
        });
        let s = api.next().await;
        assert_node_list(&s);
        s.answer(200, list(vec![node(json!({"underway.dev/pool": "routed"}), json!({"podCIDR": "10.200.3.0/24"}))]));
        let s = api.next().await;
        assert_eq!(s.line(), "GET /apis/underway.dev/v1alpha1/underwaypools/routed");
        s.answer(200, pool_cr("routed", json!({"mode": "vpc-route", "vpc_route": {"route_tables": ["rtb-0a1"], "cluster_cidr": "10.200.0.0/16"}})));
        let (c, seen) = task.await.unwrap().unwrap();
        assert_eq!(seen, v(Some("routed"), Some("10.200.3.0/24")));
        assert_eq!(c.mode, Mode::VpcRoute);
        assert_eq!(c.vpc_route.pod_cidr, Some("10.200.3.0/24".parse().unwrap()));
        assert_eq!(c.vpc_route.route_tables, vec!["rtb-0a1".to_string()]);
    }

    #[tokio::test]
    async fn resolve_waits_for_the_pod_cidr_on_the_watch() {
        let (client, mut api) = fixtures::client();
        let cfg = base(&[("UNDERWAY_MODE", "vpc-route"), ("UNDERWAY_VPC_ROUTE__CLUSTER_CIDR", "10.200.0.0/16")]);
        let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let h = heard.clone();
        let task = tokio::spawn(async move {
            resolve(client, &cfg, Duration::from_secs(60), move |w| h.lock().unwrap().push(w)).await.map(|(c, _, _)| c)
        });
        let s = api.next().await;
        assert_node_list(&s);
        s.answer(200, list(vec![node(json!({}), json!({}))]));
        let s = api.next().await;
        assert_eq!(s.line(), "GET /api/v1/nodes");
        assert_eq!(s.query.get("watch").map(String::as_str), Some("true"));
        assert_eq!(s.query.get("fieldSelector").map(String::as_str), Some("metadata.name=node-a"));
        assert_eq!(s.query.get("resourceVersion").map(String::as_str), Some("42"), "the watch resumes the list");
        assert_eq!(heard.lock().unwrap().as_slice(), ["spec.podCIDR of Node node-a (vpc-route mode)"]);
        let mut later = node(json!({}), json!({"podCIDR": "10.200.7.0/24"}));
        later["metadata"]["resourceVersion"] = json!("43");
        s.answer_watch(&[json!({"type": "MODIFIED", "object": later})]);
        let c = task.await.unwrap().unwrap();
        assert_eq!(c.vpc_route.pod_cidr, Some("10.200.7.0/24".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_missing_pool_is_named_and_looked_up_again() {
        let (client, mut api) = fixtures::client();
        let cfg = base(&[]);
        let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let h = heard.clone();
        let task = tokio::spawn(async move {
            resolve(client, &cfg, Duration::from_millis(50), move |w| h.lock().unwrap().push(w))
                .await
                .map(|(c, _, _)| c)
        });
        api.next().await.answer(200, list(vec![node(json!({"underway.dev/pool": "gpu"}), json!({}))]));
        // The watch request and the pool lookups interleave; the watch is held open, unanswered.
        let mut held_watch = None;
        let mut lookups = 0;
        loop {
            let s = api.next().await;
            if s.query.contains_key("watch") {
                held_watch = Some(s);
                continue;
            }
            assert_eq!(s.line(), "GET /apis/underway.dev/v1alpha1/underwaypools/gpu");
            lookups += 1;
            if lookups == 1 {
                s.answer(404, not_found("underwaypools.underway.dev", "gpu"));
            } else {
                s.answer(200, pool_cr("gpu", json!({"mode": "eni", "targets": {"warm_ip_target": 2}})));
                break;
            }
        }
        let c = task.await.unwrap().unwrap();
        assert_eq!((c.pool.as_deref(), c.targets.warm_ip_target), (Some("gpu"), Some(2)));
        let heard = heard.lock().unwrap();
        assert!(
            heard[0].contains("underway.dev/pool=gpu") && heard[0].contains("no UnderwayPool \"gpu\""),
            "{heard:?}"
        );
        drop(held_watch);
    }
}
