//! Cluster-wide GC: what nodes that are gone left behind. One ipamd runs it at a time (the holder
//! of the Lease, see [`crate::k8s::lease`]); `underway-ipamd gc-cluster` runs it once by hand.
//!
//! - ENIs this cluster made (tag `underway.io/cluster`) that are detached, older than the grace,
//!   and whose instance (tag `underway.io/instance-id`) is terminated or unknown. A live node's
//!   own detached ENIs are left to that node's ipamd.
//! - VPC routes inside the cluster CIDR whose target (instance or ENI) is gone ([`gc_routes`]).

use ipnet::Ipv4Net;
use underway_cloud::{Cloud, Eni, TAG_CLUSTER, TAG_CREATED_AT, TAG_INSTANCE, Tags};

use crate::clock::unix_ms;
use crate::error::Result;
use crate::vpc_route::{gc_routes, gone};

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
