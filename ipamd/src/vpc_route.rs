//! VPC-route mode: the node owns a pod CIDR outside every VPC CIDR block; the VPC routes it to
//! the node's primary ENI. This source keeps "pod CIDR → primary ENI" in every configured route
//! table and hands addresses out of the CIDR locally (the same pool, store, cooldown and RPC as
//! ENI mode; one pseudo-ENI named after the CIDR holds them).
//!
//! Valid on AWS (VPC User Guide, route tables): a route more specific than the VPC's local route
//! must match a whole subnet and target an interface, so a pod CIDR inside the VPC cannot be
//! routed at all; outside every block it can, to the primary ENI (an instance target is refused
//! once the instance has a second interface — kubernetes #92783). Source/destination check is
//! turned off on that ENI.
//!
//! Ownership rules: a route for the CIDR that points elsewhere is replaced only when its target
//! (instance or ENI) is gone, or is this node itself (an older instance target of ours); a live
//! conflict is reported naming both and left alone (flannel #186 overwrote other clusters'
//! routes). Only tables tagged `underway.io/cluster = <cluster>` are touched (the IAM policy
//! grants route changes on those alone). Routes outlive the daemon: a graceful stop (every
//! rolling update) keeps them, `underway-ipamd uninstall` removes them, and the cluster GC removes
//! those of nodes that are gone.

use std::sync::Arc;

use tokio::time::Instant;

use ipnet::Ipv4Net;
use underway_cloud::{Cloud, Route, RouteTable, RouteTarget, TAG_CLUSTER, Vpc};

use crate::config::Config;
use crate::error::{IpamdError, Result};
use crate::metrics::Metrics;
use crate::node::Node;
use crate::reconcile::{Source, Step};
use crate::state::{Blocker, NodeState};
use underway_cloud::Instance;

pub struct VpcRouteMode<C, N> {
    cloud: Arc<C>,
    /// The node's side effects (its pods' veths).
    node_ops: Arc<N>,
    cfg: Arc<Config>,
    node: Instance,
    cidr: Ipv4Net,
    vpc: Option<Vpc>,
    tables: Vec<String>,
    /// The routes are in place in every table (addresses are offered only then).
    routed: bool,
    last_check: Option<Instant>,
    /// The next check's interval times this ([`crate::clock::jitter`]).
    check_jitter: f64,
    /// What the last look at the tables found in the way (kept between looks).
    blocked: Option<Blocker>,
    /// The primary ENI's source/destination check is known to be off.
    source_check_off: bool,
    metrics: Arc<Metrics>,
}

/// Checks that a pod CIDR (or the cluster's) lies outside every VPC CIDR block: AWS refuses a
/// route more specific than the local route unless it is a whole subnet to an interface.
pub fn outside_vpc(field: &str, cidr: Ipv4Net, vpc: &Vpc) -> Result<()> {
    match vpc.cidrs.iter().find(|b| b.contains(&cidr.network()) || cidr.contains(&b.network())) {
        None => Ok(()),
        Some(b) => Err(IpamdError::Config {
            field: field.into(),
            reason: format!(
                "{cidr} overlaps the VPC's CIDR block {b} (the VPC {} has {}): AWS refuses a route inside the VPC unless it is a whole subnet to an interface; use a range outside every block, e.g. in 100.64.0.0/10",
                vpc.id,
                vpc.cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

/// Refuses a route table that is not tagged for this cluster (before any change to it).
pub fn tagged_for(table: &RouteTable, cluster: &str) -> Result<()> {
    match table.tags.get(TAG_CLUSTER) {
        Some(v) if v == cluster => Ok(()),
        other => Err(IpamdError::Config {
            field: "vpc_route.route_tables".into(),
            reason: format!(
                "route table {} is not tagged {TAG_CLUSTER}={cluster} ({}): underway changes only its cluster's tables, and the IAM policy allows route changes on those alone",
                table.id,
                match other {
                    Some(v) => format!("it says {v:?}"),
                    None => "no such tag".to_string(),
                }
            ),
        }),
    }
}

/// Routes that count against a table's capacity (the VPC's own `local` routes do not).
fn counted(t: &RouteTable) -> usize {
    t.routes.iter().filter(|r| !matches!(&r.target, RouteTarget::Other(o) if o == "local")).count()
}

impl<C: Cloud + 'static, N: Node + 'static> VpcRouteMode<C, N> {
    pub fn new(
        cloud: Arc<C>,
        cfg: Arc<Config>,
        node: Instance,
        node_ops: Arc<N>,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let cidr = cfg.vpc_route.pod_cidr.ok_or_else(|| IpamdError::Config {
            field: "vpc_route.pod_cidr".into(),
            reason: "required in vpc-route mode".into(),
        })?;
        Ok(VpcRouteMode {
            cloud,
            node_ops,
            cfg,
            node,
            cidr,
            vpc: None,
            tables: Vec::new(),
            routed: false,
            last_check: None,
            check_jitter: crate::clock::jitter(),
            blocked: None,
            source_check_off: false,
            metrics,
        })
    }

    fn me(&self) -> RouteTarget {
        RouteTarget::Eni(self.node.primary_eni.clone())
    }

    /// Makes sure one table sends the pod CIDR to this node's primary ENI; a blocker when it cannot.
    async fn ensure(&self, vpc: &Vpc, table_id: &str) -> Result<Option<Blocker>> {
        let t = self.cloud.route_table(table_id).await?;
        tagged_for(&t, &self.cfg.cluster)?;
        self.metrics.route_table(table_id, counted(&t), self.cfg.vpc_route.route_table_capacity);
        let me = self.me();
        let current = t.routes.iter().find(|r| r.destination == self.cidr);
        match current {
            // EC2 reports an ENI route with the instance it is attached to as well; what counts is
            // the ENI the route resolves to.
            Some(r) if r.points_to(&me) => return Ok(None),
            Some(r) => {
                let ours = match &r.target {
                    RouteTarget::Instance(i) if *i == self.node.id => true,
                    RouteTarget::Eni(e) if *e == self.node.primary_eni => true,
                    RouteTarget::Other(_) => false,
                    _ => crate::gc::target_gone(&*self.cloud, r).await?,
                };
                if !ours {
                    return Ok(Some(Blocker::RouteConflict(format!(
                        "route table {table_id} sends {} to {:?} (alive), not to this node {}: left alone",
                        self.cidr, r.target, self.node.id
                    ))));
                }
                tracing::info!("{table_id}: {} pointed to {:?} (gone or ours); replacing", self.cidr, r.target);
                self.cloud.replace_route(vpc, table_id, self.cidr, &me).await?;
            }
            None => {
                let cap = self.cfg.vpc_route.route_table_capacity as usize;
                if counted(&t) >= cap {
                    return Ok(Some(Blocker::RouteTableFull(format!(
                        "route table full: {table_id} holds {} routes, its capacity (vpc_route.route_table_capacity = {cap}); no route for {}",
                        counted(&t),
                        self.cidr
                    ))));
                }
                self.cloud.ensure_route(vpc, table_id, self.cidr, &me).await?;
                self.metrics.route_table(table_id, counted(&t) + 1, self.cfg.vpc_route.route_table_capacity);
                tracing::info!("{table_id}: {} → {}", self.cidr, self.node.id);
            }
        }
        Ok(None)
    }

    async fn ensure_all(&mut self) -> Result<Option<Blocker>> {
        let vpc = match &self.vpc {
            Some(v) => v.clone(),
            None => {
                let v = self.cloud.vpc(&self.node.vpc_id).await?;
                self.vpc = Some(v.clone());
                v
            }
        };
        let mut blocker = None;
        for t in self.tables.clone() {
            if let Some(b) = self.ensure(&vpc, &t).await? {
                blocker.get_or_insert(b);
            }
        }
        self.last_check = Some(Instant::now());
        self.check_jitter = crate::clock::jitter();
        Ok(blocker)
    }

    /// Puts the CIDR's addresses in the pool (all hosts; the pods' gateway is link-local), except
    /// those a running pod's veth routes: marked held in the same change.
    /// `running` is the host's pod veths, read by the caller just before.
    fn offer(&self, state: &NodeState, running: &crate::host::HostPods) {
        let hosts: Vec<std::net::Ipv4Addr> = self.cidr.hosts().collect();
        let (recovered, _) = state.change(|b| {
            let r = b.pool.sync_pod_cidr(self.cidr, &hosts);
            if !r.dropped_assigned.is_empty() {
                state.record_error(format!(
                    "{} assignments lay outside {}: dropped",
                    r.dropped_assigned.len(),
                    self.cidr
                ));
            }
            crate::host::mark_running(b, running)
        });
        crate::host::report_recovered(state, &recovered);
        state.freed.notify_waiters();
    }
}

impl<C: Cloud, N: Node> VpcRouteMode<C, N> {
    /// While the routes are not in place, the block keeps only the addresses pods hold: nothing
    /// unroutable is handed out (a free or cooling address would be, and a DEL's address cools
    /// into a free one). Everything comes back with [`offer`](Self::offer) once routed.
    fn withhold(&self, state: &NodeState) {
        use crate::pool::{BlockKind, Slot};
        state.change(|b| {
            let me = self.cidr.to_string();
            let Some(block) = b.pool.blocks().find(|x| x.kind == BlockKind::PodCidr && x.id == me) else { return };
            let held: Vec<std::net::Ipv4Addr> = block
                .slots
                .iter()
                .filter(|(_, s)| matches!(s, Slot::Assigned(_) | Slot::Releasing))
                .map(|(a, _)| *a)
                .collect();
            if held.len() < block.slots.len() {
                b.pool.sync_pod_cidr(self.cidr, &held);
            }
        });
    }
}

impl<C: Cloud + 'static, N: Node + 'static> Source for VpcRouteMode<C, N> {
    async fn sync(&mut self, state: &NodeState) -> Result<()> {
        // What an earlier attempt of this sync learnt is kept: a sync that failed half-way (a
        // throttled call) is retried from the top, and at a thousand nodes re-describing the VPC
        // and the primary ENI on each retry was most of the describes (the simulator: 8.7
        // DescribeVpcs per node).
        // The source/destination check first: its describe is then the node's only one before its
        // first mutating call. With the node's one phase for both call classes (cloud::budget)
        // that describe comes before the mutating token; with the VPC's and the table's reads
        // first, most of a wave's nodes made the call as soon as their describes were answered,
        // in the same stretch (the simulated 1,000-node wave: 49 % of mutating calls
        // throttled). The price: a node whose pod CIDR then proves unroutable (inside the VPC)
        // is left with the check off, though it routes nothing.
        if !self.source_check_off {
            let primary = self.cloud.eni(&self.node.primary_eni).await?;
            if primary.source_dest_check {
                self.cloud.set_source_dest_check(&self.node.primary_eni, false).await?;
                tracing::info!("source/destination check off on {}", self.node.primary_eni);
            }
            self.source_check_off = true;
        }
        if self.vpc.is_none() {
            let vpc = self.cloud.vpc(&self.node.vpc_id).await?;
            // Before any route call: a pod CIDR inside the VPC can never be routed on AWS.
            outside_vpc("vpc_route.pod_cidr", self.cidr, &vpc)?;
            if let Some(c) = self.cfg.vpc_route.cluster_cidr {
                outside_vpc("vpc_route.cluster_cidr", c, &vpc)?;
            }
            self.vpc = Some(vpc);
        }
        if self.tables.is_empty() {
            self.tables = if self.cfg.vpc_route.route_tables.is_empty() {
                vec![self.cloud.route_table_for_subnet(&self.node.vpc_id, &self.node.subnet_id).await?.id]
            } else {
                self.cfg.vpc_route.route_tables.clone()
            };
        }
        // Assignments in the store stay whatever the routes say; new ones wait for the routes.
        let held = state.read(|b| b.pool.blocks().count());
        let running = self.node_ops.pods(&self.cfg.veth_prefix).await?;
        self.blocked = self.ensure_all().await?;
        match self.blocked.clone() {
            None => {
                self.routed = true;
                self.offer(state, &running);
            }
            Some(b) => {
                state.record_error(b.message().to_string());
                // The stored pods keep their addresses; no new ones until the routes are there.
                if held > 0 {
                    self.withhold(state);
                }
            }
        }
        state.flush().await?;
        crate::host::sync_host(state, &self.cfg.veth_prefix, &running).await
    }

    async fn step(&mut self, state: &NodeState) -> Result<Step> {
        state.change(|b| b.pool.expire(crate::clock::unix_ms()));
        if !self.routed {
            self.withhold(state);
        }
        // A node the tables turned away (full, or its CIDR routed elsewhere) looks again on the
        // same interval as a routed one, not on every step: waiting Adds wake the reconciler,
        // and a describe per wake-up per stuck node would spend the account's describe budget
        // (the simulator's 60 nodes on a 50-route table: 5,000 describes in 30 minutes).
        // Not yet routed and nothing in the way (the last attempt failed after the look): at once.
        let due = (!self.routed && self.blocked.is_none())
            || self.last_check.is_none_or(|t| {
                t.elapsed() >= self.cfg.route_check_interval(self.cloud.share_of()).mul_f64(self.check_jitter)
            });
        if !due {
            return Ok(Step { blocker: self.blocked.clone(), again: false });
        }
        let blocker = self.ensure_all().await?;
        self.blocked = blocker.clone();
        if blocker.is_some() && self.routed {
            // The route went (replaced by another owner, deleted): no more new addresses.
            self.routed = false;
            self.withhold(state);
        }
        if blocker.is_none() && !self.routed {
            // Routed only once offered: a failed look at the host is retried by the next step
            // (it used to leave a routed node with an empty pool and no blocker until a restart).
            let running = self.node_ops.pods(&self.cfg.veth_prefix).await?;
            self.offer(state, &running);
            self.routed = true;
        }
        Ok(Step { blocker, again: false })
    }
}

/// Which destinations `uninstall` may delete: the node's pod CIDR, or any inside the cluster CIDR
/// (never a default route or another route that happens to point at the node).
#[derive(Debug, Clone, Copy)]
pub enum PodRoutes {
    Exactly(Ipv4Net),
    Within(Ipv4Net),
}

impl PodRoutes {
    fn contains(&self, d: &Ipv4Net) -> bool {
        match self {
            PodRoutes::Exactly(c) => c == d,
            PodRoutes::Within(c) => c.contains(d),
        }
    }
}

/// `uninstall` in VPC-route mode: deletes this node's own pod routes (to its primary ENI, or to
/// the instance) in each table tagged for `cluster`. Returns what was deleted, as lines.
pub async fn remove_node_routes<C: Cloud>(
    cloud: &C,
    cluster: &str,
    node: &Instance,
    tables: &[String],
    pod_routes: &PodRoutes,
) -> Result<Vec<String>> {
    let mine = [RouteTarget::Eni(node.primary_eni.clone()), RouteTarget::Instance(node.id.clone())];
    let mut out = Vec::new();
    for t in tables {
        let rt = cloud.route_table(t).await?;
        tagged_for(&rt, cluster)?;
        let ours = |r: &&Route| {
            (mine.contains(&r.target) || r.via_eni.as_deref() == Some(node.primary_eni.as_str()))
                && pod_routes.contains(&r.destination)
        };
        for r in rt.routes.iter().filter(ours) {
            cloud.delete_route(t, r.destination).await?;
            out.push(format!("{t}: deleted {} → {:?} (this node)", r.destination, r.target));
        }
    }
    Ok(out)
}
