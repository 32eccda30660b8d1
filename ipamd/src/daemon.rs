//! Start-up and shutdown. ipamd answers from its store at once; identity, the cloud and the
//! first sync happen in the background, and the status line says which one it waits for.

use std::future::Future;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use underway_cloud::aws::Ec2Cloud;
use underway_cloud::stats::CallStats;
use underway_cloud::{Discovery, RouteTables};

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
pub(crate) struct Shared {
    pub(crate) state: Arc<NodeState>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) service: Arc<Service>,
    pub(crate) calls: Arc<OnceLock<Arc<CallStats>>>,
    pub(crate) max_enis: Arc<OnceLock<u32>>,
    pub(crate) node: Arc<OnceLock<Instance>>,
    pub(crate) effective: Arc<OnceLock<Arc<Config>>>,
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
    let trim = tokio::spawn(crate::memory::trim_loop());
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
    trim.abort();
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
        match k8s::join::join_cluster(&sh, cfg, client, cloud.clone(), events, stop.clone()).await {
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
    let node = (|| identity::node_info(&*cloud, &instance_id, &macs))
        .retry(retry_policy())
        .notify(waiting(state, format!("instance {instance_id} from EC2")))
        .await
        .expect("retried forever");
    let (limits, from) = (|| identity::limits(&*cloud, &node.instance_type))
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
