//! Joining the cluster at start-up (the effective config from the Node and its pool, the
//! stored pool's mode checked against it, the Node watch and Events started) and the elected
//! cluster-wide GC: the Kubernetes half of ipamd's start-up, which `daemon::run` calls only with
//! `kubernetes.enabled`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use underway_cloud::aws::Ec2Cloud;

use crate::config::Config;
use crate::daemon::Shared;
use crate::gc;
use crate::k8s;
use crate::metrics::Metrics;
use crate::state::NodeState;

/// With Kubernetes: the effective config from the Node and its pool, the stored pool's mode
/// checked against it, and the cluster-side tasks started (Node watch, Events, elected GC).
/// `None` when start-up cannot go on (the status says why).
pub(crate) async fn join_cluster(
    sh: &Shared,
    base: Arc<Config>,
    client: kube::Client,
    cloud: Arc<Ec2Cloud>,
    events: Option<tokio::sync::mpsc::Receiver<k8s::events::FailedAdd>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Option<(Arc<Config>, Option<tokio::task::JoinHandle<()>>)> {
    let state = &sh.state;
    let name = base.kubernetes.node_name.clone().unwrap_or_default();
    state.set_status(|s| s.waiting_for = Some(format!("Node {name} from the API server")));
    let st = state.clone();
    let report = move |w: String| {
        tracing::info!("waiting for {w}");
        st.set_status(|s| s.waiting_for = Some(w));
    };
    let (cfg, view, stream) = match k8s::node::resolve(client.clone(), &base, Duration::from_secs(10), report).await {
        Ok(r) => r,
        Err(e) => {
            state.set_status(|s| s.waiting_for = Some(format!("Node {name}: {e} (restart ipamd)")));
            state.record_error(e.to_string());
            return None;
        }
    };
    let (adopted, g) = state.change(|b| b.adopt(cfg.mode, cfg.cooldown_ms));
    match adopted {
        Err(reason) => {
            state.set_status(|s| s.waiting_for = Some(format!("a drain: {reason}")));
            state.record_error(reason);
            return None;
        }
        Ok(Some(afresh)) => {
            // Worth a word only if a store was there (a fresh one merely took the file's mode).
            if state.status().from_store {
                state.record_error(afresh);
            }
            state.set_status(|s| s.from_store = false);
            if let Err(e) = state.commit(g).await {
                state.record_error(e.to_string());
            }
        }
        Ok(None) => {}
    }
    state.set_status(|s| s.waiting_for = None);
    tracing::info!("Node {name}: pool {:?}, mode {:?}", cfg.pool, cfg.mode);
    sh.service.mtu.store(cfg.eni.mtu, Ordering::Relaxed);
    let (st, node) = (state.clone(), name.clone());
    let label = cfg.kubernetes.pool_label.clone();
    tokio::spawn(k8s::node::watch_changes(stream, view, label, cfg.mode, move |m| {
        let m = format!("Node {node}: {m}");
        tracing::warn!("{m}");
        st.record_error(m);
    }));
    if let Some(rx) = events {
        let (c, n) = (client.clone(), name.clone());
        tokio::spawn(async move { k8s::events::run(c, &n, rx).await });
    }
    let budget = &cfg.cloud.rate_budget;
    if cfg.kubernetes.node_count_interval_ms > 0 && budget.share_of.is_none() && !budget.adaptive {
        let (c, cl, st) = (client.clone(), cloud.clone(), state.clone());
        let every = Duration::from_millis(cfg.kubernetes.node_count_interval_ms);
        let share = move |n| cl.budget().set_share_of(n);
        tokio::spawn(k8s::cluster::share_by_node_count(c, every, share, move |e| st.record_error(e), stop.clone()));
    }
    let gc = cfg.kubernetes.gc.enabled.then(|| {
        let g = &cfg.kubernetes.gc;
        let holder = k8s::lease::Holder {
            namespace: g.lease_namespace.clone(),
            name: g.lease_name.clone(),
            me: name.clone(),
            duration: Duration::from_secs(g.lease_duration_s.into()),
        };
        let scope = gc::Scope::of(&cfg);
        let interval = Duration::from_millis(g.interval_ms);
        let gc =
            ElectedGc { client, holder, cloud, scope, interval, state: state.clone(), metrics: sh.metrics.clone() };
        tokio::spawn(elected_gc(gc, stop))
    });
    Some((Arc::new(cfg), gc))
}

/// The cluster-wide GC as one ipamd runs it: the Lease it competes for and what it collects.
struct ElectedGc {
    client: kube::Client,
    holder: k8s::lease::Holder,
    cloud: Arc<Ec2Cloud>,
    scope: gc::Scope,
    interval: Duration,
    state: Arc<NodeState>,
    metrics: Arc<Metrics>,
}

/// Every third of the Lease's duration: try to hold it; while held, run the cluster-wide GC every
/// `interval`. Never runs the GC without a Lease renewed in this round; gives it up when stopped.
async fn elected_gc(gc: ElectedGc, mut stop: tokio::sync::watch::Receiver<bool>) {
    let ElectedGc { client, holder, cloud, scope, interval, state, metrics } = gc;
    let mut held = false;
    let mut last: Option<tokio::time::Instant> = None;
    loop {
        let now_held = match k8s::lease::try_hold(&client, &holder).await {
            Ok(h) => h,
            Err(e) => {
                state.record_error(format!("cluster GC: {e}"));
                false
            }
        };
        if now_held != held {
            tracing::info!(
                "cluster GC: {} the Lease {}/{}",
                if now_held { "holding" } else { "not holding" },
                holder.namespace,
                holder.name
            );
        }
        held = now_held;
        metrics.lease_held(held);
        if held && last.is_none_or(|t| t.elapsed() >= interval) {
            last = Some(tokio::time::Instant::now());
            match gc::run(&*cloud, &scope).await {
                Ok(d) => {
                    d.lines().for_each(|l| tracing::info!("cluster GC: {l}"));
                    metrics.cluster_gc_deleted("eni", d.enis.len());
                    metrics.cluster_gc_deleted("route", d.routes.len());
                }
                Err(e) => state.record_error(format!("cluster GC: {e}")),
            }
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(holder.duration / 3) => {}
        }
    }
    if held && let Err(e) = k8s::lease::release(&client, &holder).await {
        tracing::warn!("cluster GC: giving up the Lease: {e}");
    }
    metrics.lease_held(false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;
    use crate::k8s::fixtures::{self, Seen, pool_cr};
    use crate::pool::Pool;
    use crate::service::Service;
    use crate::state::{Book, Status};
    use crate::store::Store;
    use aws_config::{BehaviorVersion, Region, SdkConfig};
    use serde_json::json;
    use std::sync::atomic::AtomicU32;
    use underway_api::{AddRequest, AttachmentKey, ErrorKind, Request, Response};
    use underway_cloud::aws::Ec2Config;

    struct Rig {
        sh: Shared,
        events: Option<tokio::sync::mpsc::Receiver<k8s::events::FailedAdd>>,
        dir: std::path::PathBuf,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// The parts `run` builds, over a store in `mode` with `held` pods, for `cfg`.
    fn rig(name: &str, cfg: &Config, mode: Mode, held: bool) -> Rig {
        let dir = std::env::temp_dir().join(format!("underway-daemon-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut pool = Pool::new(0);
        pool.add_eni("eni-0", 0, None);
        pool.add_addresses("eni-0", &["10.0.0.5".parse().unwrap()]).unwrap();
        if held {
            let key = AttachmentKey { network: "n".into(), container_id: "old".into(), ifname: "eth0".into() };
            pool.assign(&key, 0).unwrap();
        }
        let book = Book { mode, pool, pods: Default::default(), waiting: 0, deleted_veths: Default::default() };
        let status = Status { from_store: true, ..Status::default() };
        let state = Arc::new(NodeState::new(Store::open(&dir).unwrap(), book, status));
        let metrics = Arc::new(Metrics::new(state.clone(), Default::default(), Default::default()));
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let service = Arc::new(Service {
            state: state.clone(),
            metrics: metrics.clone(),
            add_wait: Duration::ZERO,
            mtu: AtomicU32::new(cfg.eni.mtu),
            veth_prefix: "uw".into(),
            events: Some(tx),
        });
        let sh = Shared {
            state,
            metrics,
            service,
            calls: Default::default(),
            max_enis: Default::default(),
            node: Default::default(),
            effective: Default::default(),
        };
        Rig { sh, events: Some(rx), dir }
    }

    /// A cloud with nothing behind it: a GC run against it fails at once, which shows it ran.
    fn cloud() -> Arc<Ec2Cloud> {
        let sdk = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url("http://127.0.0.1:9")
            .build();
        let cfg = Ec2Config { max_attempts: 1, ..Ec2Config::default() };
        Arc::new(Ec2Cloud::from_sdk_config(&sdk, &cfg))
    }

    fn node_list(pool: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "42"}, "items": [
            {"apiVersion": "v1", "kind": "Node",
             "metadata": {"name": "node-a", "resourceVersion": "41", "labels": {"underway.dev/pool": pool}},
             "spec": {"podCIDR": "10.244.7.0/24"}}]})
    }

    /// Answers the start-up requests: the Node list, then the pool. Returns the requests seen.
    async fn answer_startup(api: &mut fixtures::ApiServer, pool: &str, spec: serde_json::Value) -> Vec<String> {
        let s = api.next().await;
        let seen = vec![s.line()];
        s.answer(200, node_list(pool));
        let s = api.next().await;
        let mut seen = seen;
        seen.push(s.line());
        s.answer(200, pool_cr(pool, spec));
        seen
    }

    #[tokio::test]
    async fn the_pool_from_the_node_label_is_the_config_and_failures_become_events() {
        let (client, mut api) = fixtures::client();
        let base = fixtures::config(&[]);
        let mut rig = rig("join", &base, Mode::Eni, false);
        let events = rig.events.take();
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let sh = &rig.sh;
        let ec2 = cloud();
        let join = join_cluster(sh, Arc::new(base), client, ec2.clone(), events, stop);
        let server = async {
            let seen = answer_startup(
                &mut api,
                "general",
                json!({"mode": "eni", "eni": {"mtu": 1500}, "targets": {"warm_ip_target": 2}}),
            )
            .await;
            assert_eq!(seen, ["GET /api/v1/nodes", "GET /apis/underway.dev/v1alpha1/underwaypools/general"]);
        };
        let (joined, ()) = tokio::join!(join, server);
        let (cfg, _gc) = joined.expect("joined");
        assert_eq!((cfg.pool.as_deref(), cfg.targets.warm_ip_target), (Some("general"), Some(2)));
        assert_eq!(sh.service.mtu.load(Ordering::Relaxed), 1500, "pods get the pool's MTU");
        // An Add that fails for a pod: an Event on that pod. The Node watch and the Lease are
        // asked for meanwhile; a live holder keeps this ipamd out of the GC.
        let add = |c: &str| {
            Request::Add(AddRequest {
                key: AttachmentKey { network: "n".into(), container_id: c.into(), ifname: "eth0".into() },
                netns: "/var/run/netns/x".into(),
                pod_namespace: Some("shop".into()),
                pod_name: Some(format!("cart-{c}")),
            })
        };
        let r = sh.service.handle(add("1")).await;
        assert!(matches!(&r, Response::Added(a) if a.mtu == Some(1500)), "the pool's MTU: {r:?}");
        sh.state.set_status(|s| s.blocker = Some(crate::state::Blocker::EniLimitReached("all 3 ENIs are full".into())));
        let r = sh.service.handle(add("2")).await;
        assert!(matches!(&r, Response::Error(e) if e.kind == ErrorKind::EniLimitReached), "{r:?}");
        let mut held: Vec<Seen> = Vec::new();
        let mut saw = (false, false, false, false);
        while !(saw.0 && saw.1 && saw.2 && saw.3) {
            let s = api.next().await;
            match (s.method.as_str(), s.path.as_str()) {
                // The Nodes' count for the EC2 budget's share: one Node's metadata at most.
                ("GET", "/api/v1/nodes") if s.query.get("limit").is_some_and(|l| l == "1") => {
                    assert!(!s.query.contains_key("watch") && !s.query.contains_key("fieldSelector"), "{:?}", s.query);
                    s.answer(
                        200,
                        json!({"apiVersion": "v1", "kind": "NodeList",
                        "metadata": {"resourceVersion": "9", "continue": "c", "remainingItemCount": 2999},
                        "items": [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}]}),
                    );
                    saw.3 = true;
                }
                ("GET", "/api/v1/nodes") => {
                    assert_eq!(s.query.get("watch").map(String::as_str), Some("true"));
                    assert_eq!(s.query.get("fieldSelector").map(String::as_str), Some("metadata.name=node-a"));
                    saw.0 = true;
                    held.push(s);
                }
                ("GET", "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/underway-cluster-gc") => {
                    let renewed =
                        k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now());
                    s.answer(
                        200,
                        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": "underway-cluster-gc", "namespace": "kube-system", "resourceVersion": "3"},
                        "spec": {"holderIdentity": "node-b", "leaseDurationSeconds": 60, "renewTime": renewed}}),
                    );
                    saw.1 = true;
                }
                ("POST", "/apis/events.k8s.io/v1/namespaces/shop/events") => {
                    assert_eq!(s.body["reason"], "EniLimitReached");
                    assert_eq!(s.body["regarding"]["name"], "cart-2");
                    let b = s.body.clone();
                    s.answer(201, b);
                    saw.2 = true;
                }
                _ => panic!("unexpected request {} {:?}", s.line(), s.query),
            }
        }
        for _ in 0..100 {
            if ec2.budget().share_of().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(ec2.budget().share_of(), Some(3000), "the budget is shared by the cluster's 3,000 Nodes");
    }

    #[tokio::test]
    async fn a_pool_of_the_other_mode_waits_for_a_drain() {
        let (client, mut api) = fixtures::client();
        let base = fixtures::config(&[]);
        let rig = rig("drain", &base, Mode::Eni, true);
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let join = join_cluster(&rig.sh, Arc::new(base), client, cloud(), None, stop);
        let server = answer_startup(
            &mut api,
            "routed",
            json!({"mode": "vpc-route", "vpc_route": {"cluster_cidr": "10.244.0.0/16"}}),
        );
        let (joined, _) = tokio::join!(join, server);
        assert!(joined.is_none(), "start-up stops");
        let st = rig.sh.state.status();
        let w = st.waiting_for.unwrap_or_default();
        assert!(w.contains("a drain") && w.contains("1 pod addresses in Eni mode"), "{w}");
        assert_eq!(
            rig.sh.state.read(|b| (b.mode, b.pool.held().count())),
            (Mode::Eni, 1),
            "the pods keep their addresses"
        );
    }

    fn lease_json(holder: &str, renewed: k8s_openapi::jiff::Timestamp) -> serde_json::Value {
        let renewed = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(renewed);
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "underway-cluster-gc", "namespace": "kube-system", "resourceVersion": "5"},
               "spec": {"holderIdentity": holder, "leaseDurationSeconds": 3, "renewTime": renewed}})
    }

    #[tokio::test]
    async fn the_cluster_gc_runs_only_while_the_lease_is_held_and_gives_it_up_on_stop() {
        let (client, mut api) = fixtures::client();
        let rig = rig("gc", &fixtures::config(&[]), Mode::Eni, false);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let holder = k8s::lease::Holder {
            namespace: "kube-system".into(),
            name: "underway-cluster-gc".into(),
            me: "node-a".into(),
            duration: Duration::from_secs(3),
        };
        let scope = gc::Scope { cluster: "c1".into(), leak_grace_ms: 0, routes: None };
        let (state, metrics) = (rig.sh.state.clone(), rig.sh.metrics.clone());
        let gc =
            ElectedGc { client, holder, cloud: cloud(), scope, interval: Duration::from_secs(3600), state, metrics };
        let task = tokio::spawn(elected_gc(gc, stop));
        let gc_errors = || rig.sh.state.errors().iter().filter(|e| e.what.starts_with("cluster GC")).count();
        let path = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/underway-cluster-gc";
        // Round 1: node-b holds it and renews: no GC.
        let s = api.next().await;
        assert_eq!(s.line(), format!("GET {path}"));
        s.answer(200, lease_json("node-b", k8s_openapi::jiff::Timestamp::now()));
        // Round 2 (a third of the duration later): node-b stopped renewing; we take it over.
        let s = api.next().await;
        assert_eq!(gc_errors(), 0, "round 1 ran no GC");
        assert!(rig.sh.metrics.render().contains("underway_cluster_gc_lease_held 0"));
        let stale =
            k8s_openapi::jiff::Timestamp::now().checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(10)).unwrap();
        s.answer(200, lease_json("node-b", stale));
        let s = api.next().await;
        assert_eq!(s.line(), format!("PUT {path}"));
        assert_eq!(s.body["spec"]["holderIdentity"], "node-a");
        let b = s.body.clone();
        s.answer(200, b);
        // Holding: the GC runs (and fails against the empty cloud, which records it).
        let t = std::time::Instant::now();
        while gc_errors() == 0 {
            assert!(t.elapsed() < Duration::from_secs(20), "no GC run while holding");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(rig.sh.metrics.render().contains("underway_cluster_gc_lease_held 1"));
        // Stop (it lands in the pause after that run, so no round races it): the Lease is given
        // up, read then written without a holder.
        stop_tx.send(true).unwrap();
        let s = api.next().await;
        assert_eq!(s.line(), format!("GET {path}"));
        s.answer(200, lease_json("node-a", k8s_openapi::jiff::Timestamp::now()));
        let s = api.next().await;
        assert_eq!(s.line(), format!("PUT {path}"));
        assert!(s.body["spec"].get("holderIdentity").is_none(), "{}", s.body);
        let b = s.body.clone();
        s.answer(200, b);
        task.await.unwrap();
        assert!(rig.sh.metrics.render().contains("underway_cluster_gc_lease_held 0"));
    }
}
