//! Start-up and shutdown. ipamd answers from its store at once; identity, the cloud and the
//! first sync happen in the background, and the status line says which one it waits for.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use underway_cloud::aws::Ec2Cloud;
use underway_cloud::stats::CallStats;
use underway_cloud::{Discovery, RouteTables};

use crate::cluster_gc;
use crate::config::{Config, Mode};
use crate::eni_mode::EniMode;
use crate::error::{IpamdError, Result};
use crate::http::{self, Http};
use crate::identity;
use crate::k8s;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::reconcile;
use crate::server;
use crate::service::Service;
use crate::state::{Book, NodeState, Status};
use crate::store::{Loaded, Store};
use crate::vpc_route::VpcRouteMode;
use underway_cloud::Instance;

/// The store's content as the starting book, whether it was usable, and what to log about it.
/// Standalone, the configured mode is adopted at once (a refused switch stops start-up); with
/// Kubernetes the mode is the pool's, known only later, so the stored mode stands until then.
pub fn load(cfg: &Config, store: &Store) -> Result<(Book, bool, Option<String>)> {
    let empty = Book {
        mode: cfg.mode,
        pool: Pool::new(cfg.cooldown_ms),
        pods: Default::default(),
        waiting: 0,
        deleted_veths: Default::default(),
    };
    let (mut book, from_store, note) = match store.load()? {
        Loaded::Fresh => (empty, false, None),
        Loaded::Ok(s) => {
            let pool = Pool::from_blocks(cfg.cooldown_ms, s.enis);
            let pods = s.pods.into_iter().map(|p| (p.key.clone(), p)).collect();
            (
                Book { mode: s.mode.unwrap_or(Mode::Eni), pool, pods, waiting: 0, deleted_veths: Default::default() },
                true,
                None,
            )
        }
        Loaded::Corrupt { reason, kept } => (
            empty,
            false,
            Some(format!(
                "the store was corrupt ({reason}); kept it as {} and rebuilding from EC2 and the host",
                kept.display()
            )),
        ),
    };
    if cfg.kubernetes.enabled {
        return Ok((book, from_store, note));
    }
    match book.adopt(cfg.mode, cfg.cooldown_ms) {
        Ok(None) => Ok((book, from_store, note)),
        Ok(Some(afresh)) => Ok((book, false, Some(afresh))),
        Err(reason) => Err(IpamdError::Config { field: "mode".into(), reason }),
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
}

/// What the background start-up shares with the parts already serving.
struct Shared {
    state: Arc<NodeState>,
    metrics: Arc<Metrics>,
    service: Arc<Service>,
    calls: Arc<OnceLock<Arc<CallStats>>>,
    max_enis: Arc<OnceLock<u32>>,
    node: Arc<OnceLock<Instance>>,
    effective: Arc<OnceLock<Arc<Config>>>,
}

/// Runs ipamd until `shutdown` completes; then saves the store and removes the socket.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let cfg = Arc::new(cfg);
    underway_routes::netns::set_proc_sys(cfg.proc_sys.clone());
    let store = Store::open(&cfg.state_dir)?;
    // Held until run returns: a second ipamd stops here, before the socket or the store.
    let _lock = store.lock()?;
    let (book, from_store, note) = load(&cfg, &store)?;
    let assigned = book.pool.held().count();
    let status = Status { from_store, waiting_for: Some("the node's identity".into()), ..Status::default() };
    let state = Arc::new(NodeState::new(store, book, status));
    if let Some(c) = note {
        state.record_error(c);
    }
    let calls: Arc<OnceLock<Arc<CallStats>>> = Arc::default();
    let max_enis: Arc<OnceLock<u32>> = Arc::default();
    let metrics = Arc::new(Metrics::new(state.clone(), calls.clone(), max_enis.clone()));
    let listener = server::bind(&cfg.socket)?;
    let (events_tx, events_rx) = match cfg.kubernetes.enabled && cfg.kubernetes.events {
        true => {
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    let service = Arc::new(Service {
        state: state.clone(),
        metrics: metrics.clone(),
        add_wait: Duration::from_millis(cfg.add_wait_ms),
        mtu: AtomicU32::new(cfg.eni.mtu),
        veth_prefix: cfg.veth_prefix.clone(),
        events: events_tx,
    });
    let guard = server::Guard { read_timeout: Duration::from_millis(cfg.rpc_read_timeout_ms) };
    let rpc = tokio::spawn(server::serve(listener, service.clone(), guard));
    let sweep = (cfg.orphan_grace_ms > 0).then(|| {
        let m = metrics.clone();
        tokio::spawn(crate::orphans::run(state.clone(), cfg.veth_prefix.clone(), cfg.orphan_grace_ms, move |n| {
            m.orphans_reclaimed(n)
        }))
    });
    let node: Arc<OnceLock<Instance>> = Arc::default();
    let effective: Arc<OnceLock<Arc<Config>>> = Arc::default();
    http::start(Http {
        state: state.clone(),
        metrics: metrics.clone(),
        config: cfg.clone(),
        effective: effective.clone(),
        node: node.clone(),
    })
    .await?;
    tracing::info!(
        socket = %cfg.socket.display(),
        "serving; {assigned} assignments from the store{}",
        if from_store { "" } else { " (none usable: starting empty)" }
    );
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let shared = Shared { state: state.clone(), metrics, service, calls, max_enis, node, effective };
    let mut bg = tokio::spawn(background(cfg.clone(), shared, events_rx, stop));
    shutdown.await;
    tracing::info!("shutting down");
    rpc.abort();
    if let Some(s) = sweep {
        s.abort();
    }
    let _ = stop_tx.send(true);
    // The source undoes what must not outlive it (VPC routes, the Lease); start-up still
    // retrying just ends.
    if tokio::time::timeout(Duration::from_secs(20), &mut bg).await.is_err() {
        bg.abort();
    }
    state.flush().await?;
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

/// A closure for backon's `notify`: the status names what start-up waits for.
fn waiting(state: &Arc<NodeState>, what: String) -> impl Fn(&IpamdError, Duration) + use<> {
    let st = state.clone();
    move |e: &IpamdError, d: Duration| {
        st.set_status(|s| s.waiting_for = Some(format!("{what}: {e} (retry in {} ms)", d.as_millis())));
        st.record_error(format!("{what}: {e}"));
    }
}

async fn background(
    cfg: Arc<Config>,
    sh: Shared,
    events: Option<tokio::sync::mpsc::Receiver<k8s::events::FailedAdd>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let state = &sh.state;
    let source = match cfg.identity.source {
        crate::config::IdentitySource::Imds => "the node's identity from IMDS",
        crate::config::IdentitySource::Static => "the node's identity",
    };
    let (instance_id, region, macs) = (|| identity::instance_id(&cfg.identity))
        .retry(retry_policy())
        .notify(waiting(state, source.to_string()))
        .await
        .expect("retried forever");
    let mut ec2 = cfg.cloud.clone();
    if ec2.region.is_none() {
        ec2.region = region;
    }
    let cloud = Arc::new(Ec2Cloud::connect(&ec2).await);
    cloud.stats().observe_latency_with(sh.metrics.cloud_latency_observer());
    let _ = sh.calls.set(cloud.stats().clone());
    let mut gc = None;
    let cfg = if cfg.kubernetes.enabled {
        let client = (|| k8s::client())
            .retry(retry_policy())
            .notify(waiting(state, "a Kubernetes client".into()))
            .await
            .expect("retried forever");
        match join_cluster(&sh, cfg, client, cloud.clone(), events, stop.clone()).await {
            Some((c, g)) => {
                gc = g;
                c
            }
            None => return,
        }
    } else {
        cfg
    };
    let _ = sh.effective.set(cfg.clone());
    state.set_status(|s| s.waiting_for = Some(format!("instance {instance_id} from EC2")));
    let node = (|| identity::node_info(&*cloud, &instance_id))
        .retry(retry_policy())
        .notify(waiting(state, format!("instance {instance_id} from EC2")))
        .await
        .expect("retried forever");
    let (limits, from) = (|| async { cloud.instance_limits(&node.instance_type).await.map_err(Into::into) })
        .retry(retry_policy())
        .notify(waiting(state, format!("the limits of {}", node.instance_type)))
        .await
        .expect("retried forever");
    let _ = sh.max_enis.set(cfg.targets.max_enis(&limits));
    tracing::info!(
        "node {} ({}, {} ENIs × {} IPv4, from {from:?}) in {} / {}",
        node.id,
        node.instance_type,
        limits.enis,
        limits.ipv4_per_eni,
        node.vpc_id,
        node.subnet_id
    );
    for m in if cfg.mode == Mode::Eni { cfg.targets.unreachable(&limits) } else { Vec::new() } {
        state.record_error(format!("target unreachable on {}: {m}", node.instance_type));
    }
    let _ = sh.node.set(node.clone());
    // Ends with this task (the table itself stays: pods keep their egress across a restart).
    let _egress = cfg.egress.enabled.then(|| {
        AbortOnDrop(tokio::spawn(crate::egress::run(cfg.clone(), cloud.clone(), node.clone(), sh.state.clone())))
    });
    state.set_status(|s| s.waiting_for = Some("the first sync with EC2".into()));
    let (state, metrics) = (sh.state.clone(), sh.metrics.clone());
    match cfg.mode {
        Mode::Eni => {
            let kernel = Arc::new(crate::node::Kernel { macs });
            let src = EniMode::new(cloud, cfg.clone(), node, kernel, limits, metrics.clone());
            reconcile::run(src, state, cfg, metrics, stop).await;
        }
        Mode::VpcRoute => {
            match VpcRouteMode::new(cloud, cfg.clone(), node, Arc::new(crate::node::Kernel { macs }), metrics.clone()) {
                Ok(src) => reconcile::run(src, state, cfg, metrics, stop).await,
                Err(e) => state.set_status(|s| s.waiting_for = Some(format!("a valid configuration: {e}"))),
            }
        }
    }
    // The elected GC gives its Lease up once stopped.
    if let Some(g) = gc {
        let _ = g.await;
    }
}

/// `uninstall` in VPC-route mode: this node's routes, which a graceful stop keeps, deleted from
/// its tables (the configured ones, else its subnet's). Who the node is comes from IMDS (or the
/// static identity), as at start-up, without retrying.
pub async fn remove_node_routes(cfg: &Config) -> Result<Vec<String>> {
    use crate::vpc_route::PodRoutes;
    let which = match (cfg.vpc_route.pod_cidr, cfg.vpc_route.cluster_cidr) {
        (Some(c), _) => PodRoutes::Exactly(c),
        (None, Some(c)) => PodRoutes::Within(c),
        (None, None) => {
            return Err(IpamdError::Config {
                field: "vpc_route.cluster_cidr".into(),
                reason: "uninstall needs vpc_route.pod_cidr or vpc_route.cluster_cidr to know which routes are the node's pod routes".into(),
            });
        }
    };
    let (instance_id, region, _) = identity::instance_id(&cfg.identity).await?;
    let mut ec2 = cfg.cloud.clone();
    if ec2.region.is_none() {
        ec2.region = region;
    }
    let cloud = Ec2Cloud::connect(&ec2).await;
    let node = cloud.instance(&instance_id).await?;
    let tables = if cfg.vpc_route.route_tables.is_empty() {
        vec![cloud.route_table_for_subnet(&node.vpc_id, &node.subnet_id).await?.id]
    } else {
        cfg.vpc_route.route_tables.clone()
    };
    crate::vpc_route::remove_node_routes(&cloud, &cfg.cluster, &node, &tables, &which).await
}

/// With Kubernetes: the effective config from the Node and its pool, the stored pool's mode
/// checked against it, and the cluster-side tasks started (Node watch, Events, elected GC).
/// `None` when start-up cannot go on (the status says why).
async fn join_cluster(
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
    let gc = cfg.kubernetes.gc.enabled.then(|| {
        let g = &cfg.kubernetes.gc;
        let holder = k8s::lease::Holder {
            namespace: g.lease_namespace.clone(),
            name: g.lease_name.clone(),
            me: name.clone(),
            duration: Duration::from_secs(g.lease_duration_s.into()),
        };
        let scope = cluster_gc::Scope::of(&cfg);
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
    scope: cluster_gc::Scope,
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
            match cluster_gc::run(&*cloud, &scope).await {
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
    use crate::k8s::fixtures::{self, Seen, pool_cr};
    use aws_config::{BehaviorVersion, Region, SdkConfig};
    use serde_json::json;
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
        let join = join_cluster(sh, Arc::new(base), client, cloud(), events, stop);
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
        let mut saw = (false, false, false);
        while !(saw.0 && saw.1 && saw.2) {
            let s = api.next().await;
            match (s.method.as_str(), s.path.as_str()) {
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
        let scope = cluster_gc::Scope { cluster: "c1".into(), leak_grace_ms: 0, routes: None };
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
