//! The reconciler: one task that brings the pool to its targets. It wakes on demand (an Add that
//! found the pool empty, a Del) or on its interval, waits a short window so a burst of changes is
//! decided on once, and runs one step of the address source. Errors back off exponentially
//! (backon) and say what blocks the pool in the status line.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use underway_cloud::{CloudError, LimitKind};

use crate::config::Config;
use crate::error::{IpamdError, Result};
use crate::metrics::Metrics;
use crate::state::{Blocker, NodeState};

/// What one step found.
#[derive(Debug, Default)]
pub struct Step {
    /// What keeps the pool from its target, if anything.
    pub blocker: Option<Blocker>,
    /// The step changed the pool and more may be needed: run again soon.
    pub again: bool,
}

/// Where the pool's addresses come from (ENI mode; VPC-route mode follows).
pub trait Source: Send {
    /// Makes the pool match the cloud and the host (at start, and after a restart).
    fn sync(&mut self, state: &NodeState) -> impl Future<Output = Result<()>> + Send;
    /// One decision and what it implies. Nothing a source makes is undone on a graceful stop: a
    /// restart must find the node's ENIs and routes as they were (pods keep running meanwhile).
    fn step(&mut self, state: &NodeState) -> impl Future<Output = Result<Step>> + Send;
}

fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// What an error means for the pool, for the status line and a failed Add: the one place a cloud
/// failure becomes a blocker (and, through [`Blocker::kind`], what a pod is told).
pub fn blocker_of(e: &IpamdError) -> Blocker {
    match e {
        IpamdError::Cloud(CloudError::Throttled { op, .. }) => {
            Blocker::Throttled(format!("EC2 is throttling {op}; ipamd backs off and retries"))
        }
        IpamdError::Cloud(c @ CloudError::LimitReached { limit, .. }) => match limit {
            LimitKind::RoutesPerTable => Blocker::RouteTableFull(c.to_string()),
            LimitKind::SubnetAddresses | LimitKind::SubnetPrefixes => Blocker::SubnetExhausted(c.to_string()),
            LimitKind::EnisPerInstance | LimitKind::AddressesPerEni | LimitKind::EnisPerRegion => {
                Blocker::EniLimitReached(c.to_string())
            }
        },
        IpamdError::Cloud(c @ CloudError::InUse { code, .. }) if code == "RouteAlreadyExists" => {
            Blocker::RouteConflict(c.to_string())
        }
        other => Blocker::Cloud(other.to_string()),
    }
}

fn result_label(e: &IpamdError) -> &'static str {
    match e {
        IpamdError::Cloud(CloudError::Throttled { .. }) => "throttled",
        IpamdError::Cloud(CloudError::LimitReached { .. }) => "limit",
        IpamdError::Cloud(_) => "cloud_error",
        IpamdError::Routes(_) => "datapath_error",
        _ => "error",
    }
}

/// Syncs (retrying until it works), then runs steps until `stop` turns true.
pub async fn run<S: Source>(
    mut src: S,
    state: Arc<NodeState>,
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut delays = backoff();
    state.touch();
    loop {
        let synced = src.sync(&state).await;
        state.touch();
        match synced {
            Ok(()) => break,
            Err(e) => {
                state.record_error(format!("sync with the cloud: {e}"));
                state.set_status(|s| s.waiting_for = Some(format!("the first sync with the cloud ({e})")));
                tokio::select! {
                    _ = tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(30))) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
    state.set_status(|s| {
        s.synced = true;
        s.waiting_for = None;
    });
    state.freed.notify_waiters();
    tracing::info!("pool synced with the cloud; serving");
    match crate::install::install(&cfg.cni) {
        Ok(Some(p)) => tracing::info!("installed the CNI config {}", p.display()),
        Ok(None) => {}
        Err(e) => state.record_error(format!("installing the CNI config: {e}")),
    }
    let mut delays = backoff();
    let interval = Duration::from_millis(cfg.reconcile_interval_ms);
    let window = Duration::from_millis(cfg.reconcile_min_interval_ms);
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = state.wake.notified() => {}
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => return,
            }
            tokio::time::sleep(window).await;
        }
        first = false;
        let started = std::time::Instant::now();
        let stepped = src.step(&state).await;
        state.touch();
        match stepped {
            Ok(step) => {
                metrics.reconcile_run("ok", started.elapsed());
                delays = backoff();
                let before = state.status().blocker.map(|b| std::mem::discriminant(&b));
                state.set_status(|s| s.blocker = step.blocker.clone());
                if step.blocker.as_ref().is_some_and(|b| Some(std::mem::discriminant(b)) != before) {
                    // Nothing can change until something does: waiting Adds look at the new
                    // reason. Only when the reason is new: a waiting Add wakes the reconciler
                    // again, and the two would otherwise keep each other busy.
                    state.freed.notify_waiters();
                }
                if step.again {
                    state.wake.notify_one();
                }
            }
            Err(e) => {
                metrics.reconcile_run(result_label(&e), started.elapsed());
                let b = blocker_of(&e);
                state.record_error(format!("reconcile: {e}"));
                state.set_status(|s| s.blocker = Some(b));
                state.freed.notify_waiters();
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(30))).await;
                state.wake.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use underway_api::ErrorKind;

    /// A source that is always blocked (as while the node waits for its EC2 budget), counting
    /// its steps.
    struct Blocked(Arc<std::sync::atomic::AtomicU32>);

    impl Source for Blocked {
        async fn sync(&mut self, _: &NodeState) -> Result<()> {
            Ok(())
        }
        async fn step(&mut self, _: &NodeState) -> Result<Step> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Step { blocker: Some(Blocker::Throttled("budget".into())), again: false })
        }
    }

    /// One Add waiting as the service's does (wakes the reconciler, sleeps on `freed` or 250 ms)
    /// beside an always-blocked source: the two used to wake each other every 20 ms (a step
    /// with a blocker woke the Adds, each Add woke the reconciler), about 500 steps in 10 s;
    /// found by the simulator, where it cost most of a 1,000-node run's time.
    #[tokio::test(start_paused = true)]
    async fn a_blocked_pool_and_a_waiting_add_do_not_keep_each_other_busy() {
        let dir = std::env::temp_dir().join(format!("underway-reconcile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = Arc::new(Config { cluster: "c".into(), state_dir: dir.clone(), ..Config::default() });
        let store = crate::store::Store::open(&dir).unwrap();
        let (book, _, _) = crate::daemon::load(&cfg, &store).unwrap();
        let state = Arc::new(NodeState::new(store, book, crate::state::Status::default()));
        let metrics = Arc::new(Metrics::new(
            state.clone(),
            Arc::new(std::sync::OnceLock::new()),
            Arc::new(std::sync::OnceLock::new()),
        ));
        let steps = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(run(Blocked(steps.clone()), state.clone(), cfg, metrics, stop_rx));
        let add = {
            let state = state.clone();
            tokio::spawn(async move {
                loop {
                    let freed = state.freed.notified();
                    state.wake.notify_one();
                    tokio::select! {
                        _ = freed => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
            })
        };
        tokio::time::sleep(Duration::from_secs(10)).await;
        let n = steps.load(std::sync::atomic::Ordering::Relaxed);
        add.abort();
        let _ = stop_tx.send(true);
        let _ = task.await;
        let _ = std::fs::remove_dir_all(&dir);
        // One step per 250 ms wake-up of the Add, give or take the first.
        assert!(n <= 45, "{n} steps in 10 s");
        assert!(n >= 30, "{n} steps in 10 s: the waiting Add must still drive steps");
    }

    #[test]
    fn each_cloud_failure_reaches_the_pod_as_its_own_kind() {
        let limit = |limit| {
            IpamdError::Cloud(CloudError::LimitReached { op: "X", limit, code: "C".into(), message: "m".into() })
        };
        let cases = [
            (limit(LimitKind::RoutesPerTable), ErrorKind::RouteTableFull),
            (limit(LimitKind::SubnetAddresses), ErrorKind::SubnetExhausted),
            (limit(LimitKind::SubnetPrefixes), ErrorKind::SubnetExhausted),
            (limit(LimitKind::EnisPerInstance), ErrorKind::EniLimitReached),
            (limit(LimitKind::AddressesPerEni), ErrorKind::EniLimitReached),
            (
                IpamdError::Cloud(CloudError::Throttled { op: "CreateRoute", code: "RequestLimitExceeded".into() }),
                ErrorKind::Throttled,
            ),
            (
                IpamdError::Cloud(CloudError::InUse {
                    op: "CreateRoute",
                    code: "RouteAlreadyExists".into(),
                    message: "m".into(),
                }),
                ErrorKind::RouteConflict,
            ),
            (IpamdError::Cloud(CloudError::Transient { op: "X", message: "m".into() }), ErrorKind::PoolEmpty),
        ];
        for (e, want) in cases {
            assert_eq!(blocker_of(&e).kind(), want, "{e}");
        }
    }
}
