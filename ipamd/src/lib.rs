//! underway's node IPAM daemon.
//!
//! - [`config`]: one typed, validated configuration;
//! - [`pool`] (pure data) and [`targets`] (pure decisions): the warm pool;
//! - [`store`]: the durable snapshot; [`state`]: the shared book with group commit;
//! - [`service`] + [`server`]: the RPC the CNI binary calls;
//! - [`reconcile`] + [`eni_mode`] / [`vpc_route`]: the pool's two address sources, through the
//!   cloud seam; [`host`]: the pods the node itself shows; [`orphans`]: assignments whose pod is
//!   gone without a DEL;
//! - [`egress`]: the node's nftables table (pod egress SNAT, anti-spoofing);
//! - [`node`]: the node seam (links, veths) beside the cloud's;
//! - [`identity`]: who the node is; [`metrics`] + [`http`]: what it shows;
//! - [`k8s`] (optional): own Node, UnderwayPool, Events, the Lease for the cluster-wide GC in [`gc`];
//! - [`daemon`]: start-up and shutdown.

pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod egress;
pub mod eni_mode;
pub mod error;
pub mod gc;
pub mod host;
pub mod http;
pub mod identity;
pub mod install;
pub mod k8s;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod operator;
pub mod orphans;
pub mod pool;
pub mod reconcile;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
pub mod targets;
pub mod vpc_route;
