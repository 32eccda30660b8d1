//! Start-up and shutdown. ipamd answers from its store at once; identity, the cloud and the
//! first sync happen in the background, and the status line says which one it waits for.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use underway_cloud::Discovery;
use underway_cloud::aws::Ec2Cloud;
use underway_cloud::stats::CallStats;

use crate::config::{Config, Mode};
use crate::eni_mode::EniMode;
use crate::error::{IpamdError, Result};
use crate::http::{self, Http};
use crate::identity;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::reconcile;
use crate::server;
use crate::service::Service;
use crate::state::{Book, NodeState, Status};
use crate::store::{Loaded, Store};
use crate::vpc_route::VpcRouteMode;
use underway_cloud::Instance;

/// The store's content as the starting book, and whether it was usable. A store of the other
/// mode is refused while pods hold its addresses (switching a node's mode needs a drain).
fn load(cfg: &Config, store: &Store) -> Result<(Book, bool, Option<String>)> {
    let empty = Book { mode: cfg.mode, pool: Pool::new(cfg.cooldown_ms), pods: Default::default(), waiting: 0 };
    Ok(match store.load()? {
        Loaded::Fresh => (empty, false, None),
        Loaded::Ok(s) => {
            let stored = s.mode.unwrap_or(Mode::Eni);
            let pool = Pool::from_enis(cfg.cooldown_ms, s.enis);
            let held = pool.held().count();
            if stored != cfg.mode {
                if held > 0 {
                    return Err(IpamdError::Config {
                        field: "mode".into(),
                        reason: format!(
                            "this node holds {held} pod addresses in {stored:?} mode; switching it to {:?} while pods \
                             hold addresses is refused: drain the node (or delete its pods) first",
                            cfg.mode
                        ),
                    });
                }
                (empty, false, Some(format!("the store was in {stored:?} mode with no pods; starting afresh")))
            } else {
                let pods = s.pods.into_iter().map(|p| (p.key.clone(), p)).collect();
                (Book { mode: cfg.mode, pool, pods, waiting: 0 }, true, None)
            }
        }
        Loaded::Corrupt { reason, kept } => (
            empty,
            false,
            Some(format!(
                "the store was corrupt ({reason}); kept it as {} and rebuilding from EC2 and the host",
                kept.display()
            )),
        ),
    })
}

fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
}

/// Runs ipamd until `shutdown` completes; then saves the store and removes the socket.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let cfg = Arc::new(cfg);
    let store = Store::open(&cfg.state_dir)?;
    let (book, from_store, corrupt) = load(&cfg, &store)?;
    let assigned = book.pool.held().count();
    let status = Status { from_store, waiting_for: Some("the node's identity".into()), ..Status::default() };
    let state = Arc::new(NodeState::new(store, book, status));
    if let Some(c) = corrupt {
        state.record_error(c);
    }
    let calls: Arc<OnceLock<Arc<CallStats>>> = Arc::default();
    let max_enis: Arc<OnceLock<u32>> = Arc::default();
    let metrics = Arc::new(Metrics::new(state.clone(), calls.clone(), max_enis.clone()));
    let listener = server::bind(&cfg.socket)?;
    let service = Arc::new(Service {
        state: state.clone(),
        metrics: metrics.clone(),
        add_wait: Duration::from_millis(cfg.add_wait_ms),
        mtu: cfg.eni.mtu,
        veth_prefix: cfg.veth_prefix.clone(),
    });
    let rpc = tokio::spawn(server::serve(listener, service));
    let node: Arc<OnceLock<Instance>> = Arc::default();
    http::start(Http { state: state.clone(), metrics: metrics.clone(), config: cfg.clone(), node: node.clone() })
        .await?;
    tracing::info!(
        socket = %cfg.socket.display(),
        "serving; {assigned} assignments from the store{}",
        if from_store { "" } else { " (none usable: starting empty)" }
    );
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut bg = tokio::spawn(background(cfg.clone(), state.clone(), metrics, calls, max_enis, node, stop));
    shutdown.await;
    tracing::info!("shutting down");
    rpc.abort();
    let _ = stop_tx.send(true);
    // The source undoes what must not outlive it (VPC routes); start-up still retrying just ends.
    if tokio::time::timeout(Duration::from_secs(20), &mut bg).await.is_err() {
        bg.abort();
    }
    state.flush().await?;
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

async fn background(
    cfg: Arc<Config>,
    state: Arc<NodeState>,
    metrics: Arc<Metrics>,
    calls: Arc<OnceLock<Arc<CallStats>>>,
    max_enis: Arc<OnceLock<u32>>,
    node_cell: Arc<OnceLock<Instance>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let waiting = |what: String| {
        let st = state.clone();
        move |e: &crate::error::IpamdError, d: Duration| {
            st.set_status(|s| s.waiting_for = Some(format!("{what}: {e} (retry in {} ms)", d.as_millis())));
            st.record_error(format!("{what}: {e}"));
        }
    };
    let source = match cfg.identity.source {
        crate::config::IdentitySource::Imds => "the node's identity from IMDS",
        crate::config::IdentitySource::Static => "the node's identity",
    };
    let (instance_id, region, macs) = (|| identity::instance_id(&cfg.identity))
        .retry(retry_policy())
        .notify(waiting(source.to_string()))
        .await
        .expect("retried forever");
    let mut ec2 = cfg.cloud.clone();
    if ec2.region.is_none() {
        ec2.region = region;
    }
    let cloud = Arc::new(Ec2Cloud::connect(&ec2).await);
    let _ = calls.set(cloud.stats().clone());
    state.set_status(|s| s.waiting_for = Some(format!("instance {instance_id} from EC2")));
    let node = (|| identity::node_info(&*cloud, &instance_id))
        .retry(retry_policy())
        .notify(waiting(format!("instance {instance_id} from EC2")))
        .await
        .expect("retried forever");
    let (limits, from) = (|| async { cloud.instance_limits(&node.instance_type).await.map_err(Into::into) })
        .retry(retry_policy())
        .notify(waiting(format!("the limits of {}", node.instance_type)))
        .await
        .expect("retried forever");
    let _ = max_enis.set(cfg.targets.max_enis(&limits));
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
    let _ = node_cell.set(node.clone());
    state.set_status(|s| s.waiting_for = Some("the first sync with EC2".into()));
    match cfg.mode {
        Mode::Eni => {
            let src = EniMode::new(cloud, cfg.clone(), node, macs, limits, metrics.clone());
            reconcile::run(src, state, cfg, metrics, stop).await;
        }
        Mode::VpcRoute => match VpcRouteMode::new(cloud, cfg.clone(), node, metrics.clone()) {
            Ok(src) => reconcile::run(src, state, cfg, metrics, stop).await,
            Err(e) => state.set_status(|s| s.waiting_for = Some(format!("a valid configuration: {e}"))),
        },
    }
}
