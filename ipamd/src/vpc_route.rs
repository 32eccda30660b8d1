//! VPC-route mode: the node owns a pod CIDR; the VPC routes it to the node. This source keeps
//! "pod CIDR → this instance" in every configured route table and hands addresses out of the
//! CIDR locally (the same pool, store, cooldown and RPC as ENI mode; one pseudo-ENI named after
//! the CIDR holds them).
//!
//! Ownership rules: a route for the CIDR that points elsewhere is replaced only when its target
//! instance is gone (terminated, or unknown to EC2) or is this node's own primary ENI; a live
//! conflict is reported naming both and left alone (flannel #186 overwrote other clusters'
//! routes). Source/destination check is turned off on the primary *ENI*, not the instance
//! (kubernetes #92783). A table's capacity is enforced here because LocalStack enforces none.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use underway_cloud::{Cloud, CloudError, RouteTable, RouteTarget, Vpc};

use crate::config::Config;
use crate::error::{IpamdError, Result};
use crate::metrics::Metrics;
use crate::reconcile::{Source, Step};
use crate::state::{Blocker, NodeState};
use underway_cloud::Instance;

pub struct VpcRouteMode<C> {
    cloud: Arc<C>,
    cfg: Arc<Config>,
    node: Instance,
    cidr: Ipv4Net,
    vpc: Option<Vpc>,
    tables: Vec<String>,
    /// The routes are in place in every table (addresses are offered only then).
    routed: bool,
    last_check: Option<Instant>,
    metrics: Arc<Metrics>,
}

/// What the pool calls the pod CIDR's pseudo-ENI.
pub fn pool_name(cidr: &Ipv4Net) -> String {
    format!("pod-cidr-{cidr}")
}

/// An instance that no longer exists for routing purposes.
pub(crate) async fn gone<C: Cloud>(cloud: &C, instance_id: &str) -> Result<bool> {
    match cloud.instance(instance_id).await {
        Ok(i) => Ok(matches!(i.state.as_str(), "terminated" | "shutting-down")),
        Err(CloudError::NotFound { .. }) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// Routes that count against a table's capacity (the VPC's own `local` routes do not).
fn counted(t: &RouteTable) -> usize {
    t.routes.iter().filter(|r| !matches!(&r.target, RouteTarget::Other(o) if o == "local")).count()
}

impl<C: Cloud + 'static> VpcRouteMode<C> {
    pub fn new(cloud: Arc<C>, cfg: Arc<Config>, node: Instance, metrics: Arc<Metrics>) -> Result<Self> {
        let cidr = cfg.vpc_route.pod_cidr.ok_or_else(|| IpamdError::Config {
            field: "vpc_route.pod_cidr".into(),
            reason: "required in vpc-route mode".into(),
        })?;
        Ok(VpcRouteMode {
            cloud,
            cfg,
            node,
            cidr,
            vpc: None,
            tables: Vec::new(),
            routed: false,
            last_check: None,
            metrics,
        })
    }

    fn me(&self) -> RouteTarget {
        RouteTarget::Instance(self.node.id.clone())
    }

    /// Makes sure one table sends the pod CIDR to this instance; a blocker when it cannot.
    async fn ensure(&self, vpc: &Vpc, table_id: &str) -> Result<Option<Blocker>> {
        let t = self.cloud.route_table(table_id).await?;
        self.metrics.route_table(table_id, counted(&t), self.cfg.vpc_route.route_table_capacity);
        let me = self.me();
        let current = t.routes.iter().find(|r| r.destination == self.cidr);
        match current {
            Some(r) if r.points_to(&me) => return Ok(None),
            Some(r) => {
                let ours = match &r.target {
                    RouteTarget::Instance(i) => *i == self.node.id || gone(&*self.cloud, i).await?,
                    RouteTarget::Eni(e) => *e == self.node.primary_eni,
                    RouteTarget::Other(_) => false,
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
        Ok(blocker)
    }

    /// Puts the CIDR's addresses in the pool (all hosts; the pods' gateway is link-local).
    fn offer(&self, state: &NodeState) {
        let hosts: Vec<std::net::Ipv4Addr> = self.cidr.hosts().collect();
        let name = pool_name(&self.cidr);
        state.change(|b| {
            let r = b.pool.sync_eni(&name, 0, None, &hosts, &[]);
            if !r.dropped_assigned.is_empty() {
                state.record_error(format!(
                    "{} assignments lay outside {}: dropped",
                    r.dropped_assigned.len(),
                    self.cidr
                ));
            }
        });
        state.freed.notify_waiters();
    }
}

impl<C: Cloud + 'static> Source for VpcRouteMode<C> {
    async fn sync(&mut self, state: &NodeState) -> Result<()> {
        let vpc = self.cloud.vpc(&self.node.vpc_id).await?;
        if !vpc.contains(&self.cidr) {
            return Err(IpamdError::Config {
                field: "vpc_route.pod_cidr".into(),
                reason: format!("{} is outside the VPC's blocks {:?}", self.cidr, vpc.cidrs),
            });
        }
        // Pod addresses must never be handed out by the subnet to ENIs as well.
        for sub in self.cloud.subnets(std::slice::from_ref(&self.node.subnet_id)).await? {
            if sub.cidr.contains(&self.cidr.network()) || self.cidr.contains(&sub.cidr.network()) {
                return Err(IpamdError::Config {
                    field: "vpc_route.pod_cidr".into(),
                    reason: format!("{} overlaps the node's subnet {} ({})", self.cidr, sub.id, sub.cidr),
                });
            }
        }
        self.vpc = Some(vpc);
        self.tables = if self.cfg.vpc_route.route_tables.is_empty() {
            vec![self.cloud.route_table_for_subnet(&self.node.vpc_id, &self.node.subnet_id).await?.id]
        } else {
            self.cfg.vpc_route.route_tables.clone()
        };
        let primary = self.cloud.eni(&self.node.primary_eni).await?;
        if primary.source_dest_check {
            self.cloud.set_source_dest_check(&self.node.primary_eni, false).await?;
            tracing::info!("source/destination check off on {}", self.node.primary_eni);
        }
        // Assignments in the store stay whatever the routes say; new ones wait for the routes.
        let held = state.read(|b| b.pool.enis().count());
        match self.ensure_all().await? {
            None => {
                self.routed = true;
                self.offer(state);
            }
            Some(b) => {
                state.record_error(b.message().to_string());
                if held > 0 {
                    self.offer(state);
                }
            }
        }
        state.flush().await?;
        crate::host::sync_host(state, &self.cfg.veth_prefix).await
    }

    async fn step(&mut self, state: &NodeState) -> Result<Step> {
        state.change(|b| b.pool.expire(crate::clock::unix_ms()));
        let due = !self.routed
            || self
                .last_check
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(self.cfg.vpc_route.check_interval_ms));
        if !due {
            return Ok(Step::default());
        }
        let blocker = self.ensure_all().await?;
        if blocker.is_none() && !self.routed {
            self.routed = true;
            self.offer(state);
        }
        Ok(Step { blocker, again: false })
    }

    async fn shutdown(&mut self, _state: &NodeState) {
        if !self.cfg.vpc_route.remove_routes_on_shutdown {
            return;
        }
        for t in &self.tables {
            match self.cloud.route_table(t).await {
                Ok(rt) if rt.routes.iter().any(|r| r.destination == self.cidr && r.points_to(&self.me())) => {
                    match self.cloud.delete_route(t, self.cidr).await {
                        Ok(()) => tracing::info!("{t}: removed {} on shutdown", self.cidr),
                        Err(e) => tracing::warn!("{t}: removing {} on shutdown: {e}", self.cidr),
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("{t}: {e}"),
            }
        }
    }
}

/// The route GC: in each table, routes inside `cluster_cidr` whose target instance is terminated
/// or unknown are deleted. Returns what was deleted, as lines. Never touches a route outside the
/// cluster's CIDR or one that points to a live instance or to anything but an instance.
pub async fn gc_routes<C: Cloud>(cloud: &C, tables: &[String], cluster_cidr: Ipv4Net) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for t in tables {
        let rt = cloud.route_table(t).await?;
        for r in rt.routes.iter().filter(|r| cluster_cidr.contains(&r.destination)) {
            if let RouteTarget::Instance(i) = &r.target
                && gone(cloud, i).await?
            {
                cloud.delete_route(t, r.destination).await?;
                out.push(format!("{t}: deleted {} → {i} (instance gone)", r.destination));
            }
        }
    }
    Ok(out)
}
