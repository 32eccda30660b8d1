//! Prometheus metrics (text format, prometheus-client). Counters and the Add histogram are
//! updated as things happen; pool, ENI and EC2-call figures are read from the live state at
//! scrape time by one collector, so they can never drift from what ipamd holds.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use underway_cloud::stats::CallStats;

use crate::pool::{BlockKind, Pool};
use crate::state::NodeState;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    add_seconds: Family<Labels, Histogram>,
    reconcile_seconds: Family<Labels, Histogram>,
    cloud_call_seconds: Family<Labels, Histogram>,
    reconcile_runs: Family<Labels, Counter>,
    enis_deleted: Counter,
    route_table_routes: Family<Labels, Gauge>,
    route_table_capacity: Gauge,
    lease_held: Gauge,
    cluster_gc_deleted: Family<Labels, Counter>,
    orphans_reclaimed: Counter,
    adds_undone: Counter,
}

/// What the collector reads at scrape time.
#[derive(Debug)]
struct Live {
    state: Arc<NodeState>,
    calls: Arc<OnceLock<Arc<CallStats>>>,
    max_enis: Arc<OnceLock<u32>>,
}

impl Metrics {
    pub fn new(state: Arc<NodeState>, calls: Arc<OnceLock<Arc<CallStats>>>, max_enis: Arc<OnceLock<u32>>) -> Self {
        let mut registry = Registry::with_prefix("underway");
        let add_seconds =
            Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 16)));
        registry.register("add_seconds", "Time ipamd took to answer an Add, by result", add_seconds.clone());
        let reconcile_seconds =
            Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16)));
        registry.register(
            "reconcile_seconds",
            "Time one reconciler run took (sync or step, cloud calls included), by result",
            reconcile_seconds.clone(),
        );
        let cloud_call_seconds =
            Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.002, 2.0, 14)));
        registry.register(
            "cloud_call_seconds",
            "Time one cloud API attempt took (retries are attempts of their own), by operation",
            cloud_call_seconds.clone(),
        );
        let reconcile_runs = Family::<Labels, Counter>::default();
        registry.register("reconcile_runs", "Reconciler runs, by result", reconcile_runs.clone());
        let enis_deleted = Counter::default();
        registry.register("leaked_enis_deleted", "Detached ENIs of this node deleted by GC", enis_deleted.clone());
        let route_table_routes = Family::<Labels, Gauge>::default();
        registry.register(
            "route_table_routes",
            "VPC-route mode: routes in each kept route table (the local route not counted)",
            route_table_routes.clone(),
        );
        let route_table_capacity = Gauge::default();
        registry.register(
            "route_table_capacity",
            "VPC-route mode: routes a table may hold (vpc_route.route_table_capacity)",
            route_table_capacity.clone(),
        );
        let lease_held = Gauge::default();
        registry.register(
            "cluster_gc_lease_held",
            "1 while this ipamd holds the Lease that runs the cluster-wide GC (Kubernetes only)",
            lease_held.clone(),
        );
        let cluster_gc_deleted = Family::<Labels, Counter>::default();
        registry.register(
            "cluster_gc_deleted",
            "ENIs and VPC routes of gone nodes deleted by the cluster-wide GC, by kind",
            cluster_gc_deleted.clone(),
        );
        let orphans_reclaimed = Counter::default();
        registry.register(
            "orphans_reclaimed",
            "Assignments reclaimed because their pod's veth and netns were gone past orphan_grace_ms",
            orphans_reclaimed.clone(),
        );
        let adds_undone = Counter::default();
        registry.register(
            "adds_undone",
            "Adds given back because the CNI binary went away before the answer reached it",
            adds_undone.clone(),
        );
        registry.register_collector(Box::new(Live { state, calls, max_enis }));
        Metrics {
            registry,
            add_seconds,
            reconcile_seconds,
            cloud_call_seconds,
            reconcile_runs,
            enis_deleted,
            route_table_routes,
            route_table_capacity,
            lease_held,
            cluster_gc_deleted,
            orphans_reclaimed,
            adds_undone,
        }
    }

    pub fn orphans_reclaimed(&self, n: usize) {
        self.orphans_reclaimed.inc_by(n as u64);
    }

    pub fn add_undone(&self) {
        self.adds_undone.inc();
    }

    pub fn observe_add(&self, took: Duration, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.add_seconds.get_or_create(&vec![("result", result.to_string())]).observe(took.as_secs_f64());
    }

    pub fn lease_held(&self, held: bool) {
        self.lease_held.set(i64::from(held));
    }

    /// `kind`: `eni` or `route`.
    pub fn cluster_gc_deleted(&self, kind: &str, n: usize) {
        self.cluster_gc_deleted.get_or_create(&vec![("kind", kind.to_string())]).inc_by(n as u64);
    }

    pub fn reconcile_run(&self, result: &str, took: Duration) {
        let labels = vec![("result", result.to_string())];
        self.reconcile_runs.get_or_create(&labels).inc();
        self.reconcile_seconds.get_or_create(&labels).observe(took.as_secs_f64());
    }

    /// The observer the cloud's call statistics report each attempt's duration to.
    pub fn cloud_latency_observer(&self) -> underway_cloud::stats::LatencyObserver {
        let family = self.cloud_call_seconds.clone();
        Box::new(move |op, secs| family.get_or_create(&vec![("operation", op.to_string())]).observe(secs))
    }

    pub fn route_table(&self, table: &str, routes: usize, capacity: u32) {
        self.route_table_routes.get_or_create(&vec![("table", table.to_string())]).set(routes as i64);
        self.route_table_capacity.set(i64::from(capacity));
    }

    pub fn eni_deleted(&self) {
        self.enis_deleted.inc();
    }

    /// The Prometheus text exposition (0.0.4, what `/metrics` says it serves).
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        text_004(&out)
    }
}

/// OpenMetrics text (what prometheus-client writes) as Prometheus text 0.0.4: a counter family
/// `x` has samples `x_total`, and in 0.0.4 its HELP and TYPE must name `x_total` too (promtool
/// reported every counter as having no help); no `# EOF`.
fn text_004(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out += renamed.as_deref().unwrap_or(line);
        out.push('\n');
    }
    out
}

fn gauge<'a>(
    enc: &mut DescriptorEncoder<'a>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        if labels.is_empty() {
            return ConstGauge::new(v).encode(m);
        }
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Live {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (rows, enis, assignments) = self.state.read(|b| {
            let mut rows = Vec::new();
            for e in b.pool.blocks() {
                let (free, assigned, cooling, releasing) = Pool::eni_counts(e);
                // An ENI's addresses by `eni`, VPC-route mode's by `pod_cidr`.
                let by = match e.kind {
                    BlockKind::Eni => "eni",
                    BlockKind::PodCidr => "pod_cidr",
                };
                for (state, n) in
                    [("free", free), ("assigned", assigned), ("cooling", cooling), ("releasing", releasing)]
                {
                    rows.push((vec![(by, e.id.clone()), ("state", state.to_string())], i64::from(n)));
                }
            }
            let prefixes: Vec<(Labels, i64)> =
                b.pool.enis().map(|e| (vec![("eni", e.id.clone())], e.prefixes.len() as i64)).collect();
            (rows, (b.pool.enis().count() as i64, prefixes), b.pool.held().count() as i64)
        });
        gauge(&mut enc, "pool_addresses", "Pool addresses by ENI (or pod CIDR) and state", rows)?;
        gauge(&mut enc, "pool_prefixes", "/28 prefixes held, by ENI", enis.1)?;
        gauge(&mut enc, "enis_attached", "ENIs in the pool", [(vec![], enis.0)])?;
        if let Some(max) = self.max_enis.get() {
            gauge(
                &mut enc,
                "enis_limit",
                "ENIs this instance may have (type and max_eni)",
                [(vec![], i64::from(*max))],
            )?;
        }
        gauge(&mut enc, "assignments", "Attachments holding an address", [(vec![], assignments)])?;
        let st = self.state.status();
        gauge(&mut enc, "ready", "1 when ipamd serves Adds", [(vec![], i64::from(st.ready()))])?;
        if let Some(calls) = self.calls.get() {
            let snap = calls.snapshot();
            let mut m = enc.encode_descriptor(
                "cloud_calls",
                "Cloud API calls by operation and outcome",
                None,
                MetricType::Counter,
            )?;
            for ((op, outcome), n) in &snap {
                let labels: Labels =
                    vec![("operation", op.to_string()), ("outcome", format!("{outcome:?}").to_lowercase())];
                ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
            }
            let throttled = calls.with_outcome(underway_cloud::Outcome::Throttled);
            let m = enc.encode_descriptor(
                "cloud_throttles",
                "Cloud calls refused for throttling",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(throttled).encode(m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_are_written_as_text_0_0_4_names_them() {
        let om = "# HELP a_runs Runs.\n# TYPE a_runs counter\na_runs_total{r=\"ok\"} 1\n\
                  # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n# EOF\n";
        assert_eq!(
            super::text_004(om),
            "# HELP a_runs_total Runs.\n# TYPE a_runs_total counter\na_runs_total{r=\"ok\"} 1\n\
             # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n"
        );
    }
}
