//! The leak rules and sweeps in one place (issue 17).
//!
//! Rules (pure or one lookup each):
//! - [`detached_past_grace`]: an ENI is a leak candidate once detached and older than the grace;
//!   the node's own sweep (`EniMode`, its tagged ENIs) and the cluster-wide one share it;
//! - [`gone`], [`target_gone`]: an instance that is terminated or unknown; a route whose target
//!   (instance, or ENI and the instance it is attached to) is gone. A blackhole alone is no proof.
//!
//! Sweeps:
//! - the node's own: in `EniMode` (it knows its spare ENI and in-flight attaches), by
//!   [`detached_past_grace`];
//! - [`gc_routes`]: VPC routes inside the cluster CIDR whose target is gone
//!   (`underway-ipamd gc-routes`);
//! - [`run`], cluster-wide: what nodes that are gone left behind. One ipamd runs it at a time
//!   (the holder of the Lease, see [`crate::k8s::lease`]); `underway-ipamd gc-cluster` runs it
//!   once by hand. ENIs this cluster made (tag `underway.io/cluster`) that are detached, older than
//!   the grace, and whose instance (tag `underway.io/instance-id`) is terminated or unknown (a
//!   live node's own detached ENIs are left to that node's ipamd); and [`gc_routes`].

use ipnet::Ipv4Net;
use underway_cloud::{Cloud, CloudError, Eni, Route, RouteTarget, TAG_CLUSTER, TAG_CREATED_AT, TAG_INSTANCE, Tags};

use crate::clock::unix_ms;
use crate::error::Result;
use crate::vpc_route::tagged_for;

/// What the GC looks at.
#[derive(Debug, Clone)]
pub struct Scope {
    pub cluster: String,
    /// ENIs detached for less than this since their creation are left alone (one may be on its
    /// way to being attached).
    pub leak_grace_ms: u64,
    /// VPC-route GC: the tables and the cluster CIDR inside which routes may be deleted.
    pub routes: Option<(Vec<String>, Ipv4Net)>,
}

impl Scope {
    /// What the config says: its cluster, ENI grace, and (with `vpc_route.cluster_cidr`) route tables.
    pub fn of(cfg: &crate::config::Config) -> Scope {
        Scope {
            cluster: cfg.cluster.clone(),
            leak_grace_ms: cfg.eni.leak_grace_ms,
            routes: cfg.vpc_route.cluster_cidr.map(|c| (cfg.vpc_route.route_tables.clone(), c)),
        }
    }
}

/// A leak candidate: detached (`available`, no live attachment) and created longer than
/// `grace_ms` ago (its `underway.io/created-at` tag; none counts as long ago). The node's own GC
/// and this cluster-wide one share the rule.
pub fn detached_past_grace(e: &Eni, now_ms: u64, grace_ms: u64) -> bool {
    let created_s: u64 = e.tags.get(TAG_CREATED_AT).and_then(|t| t.parse().ok()).unwrap_or(0);
    !e.in_use() && e.status == "available" && (now_ms / 1000).saturating_sub(created_s) >= grace_ms / 1000
}

/// What one run deleted, one line each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deleted {
    pub enis: Vec<String>,
    pub routes: Vec<String>,
}

impl Deleted {
    pub fn lines(&self) -> impl Iterator<Item = &String> {
        self.enis.iter().chain(&self.routes)
    }
}

/// Runs the GC once.
pub async fn run<C: Cloud>(cloud: &C, scope: &Scope) -> Result<Deleted> {
    let mut out = Deleted::default();
    let now = unix_ms();
    let tags = Tags::from([(TAG_CLUSTER.to_string(), scope.cluster.clone())]);
    for e in cloud.enis_by_tags(&tags).await? {
        if !detached_past_grace(&e, now, scope.leak_grace_ms) {
            continue;
        }
        let Some(instance) = e.tags.get(TAG_INSTANCE) else { continue };
        if gone(cloud, instance).await? {
            cloud.delete_eni(&e.id).await?;
            out.enis.push(format!("deleted ENI {} of instance {instance} (gone)", e.id));
        }
    }
    if let Some((tables, cidr)) = &scope.routes {
        out.routes = gc_routes(cloud, &scope.cluster, tables, *cidr).await?;
    }
    Ok(out)
}

/// An instance that no longer exists for routing purposes.
pub async fn gone<C: Cloud>(cloud: &C, instance_id: &str) -> Result<bool> {
    match cloud.instance(instance_id).await {
        Ok(i) => Ok(matches!(i.state.as_str(), "terminated" | "shutting-down")),
        Err(CloudError::NotFound { .. }) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// A route whose target no longer exists: an instance that is gone, or an ENI that is deleted,
/// detached, or attached to an instance that is gone.
pub async fn target_gone<C: Cloud>(cloud: &C, r: &Route) -> Result<bool> {
    // A blackhole alone is no proof: a stopped instance's routes are blackholes too.
    match &r.target {
        RouteTarget::Instance(i) => gone(cloud, i).await,
        RouteTarget::Eni(e) => match cloud.eni(e).await {
            Ok(eni) => match &eni.attachment {
                Some(a) if !a.instance_id.is_empty() => gone(cloud, &a.instance_id).await,
                _ => Ok(true),
            },
            Err(CloudError::NotFound { .. }) => Ok(true),
            Err(e) => Err(e.into()),
        },
        RouteTarget::Other(_) => Ok(false),
    }
}

/// The route GC: in each table tagged for `cluster`, routes inside `cluster_cidr` whose target
/// (instance or ENI) is gone are deleted. Returns what was deleted, as lines. Never touches a
/// route outside the cluster's CIDR, one that points to something alive, or anything but an
/// instance or ENI route.
pub async fn gc_routes<C: Cloud>(
    cloud: &C,
    cluster: &str,
    tables: &[String],
    cluster_cidr: Ipv4Net,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for t in tables {
        let rt = cloud.route_table(t).await?;
        tagged_for(&rt, cluster)?;
        for r in rt.routes.iter().filter(|r| cluster_cidr.contains(&r.destination)) {
            if !matches!(r.target, RouteTarget::Other(_)) && target_gone(cloud, r).await? {
                cloud.delete_route(t, r.destination).await?;
                out.push(format!("{t}: deleted {} → {:?} (target gone)", r.destination, r.target));
            }
        }
    }
    Ok(out)
}
