//! The HTTP side: Prometheus text on `/metrics`, and JSON introspection under `/v1/` (ENIs,
//! addresses, assignments, effective config, status, recent errors). Both listen on loopback by
//! default; neither changes anything.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::config::Config;
use crate::error::{IpamdError, Result};
use crate::metrics::Metrics;
use crate::pool::{Block, BlockKind, Pool};
use crate::state::{ErrorEntry, NodeState, Status};
use crate::store::PodRecord;
use underway_cloud::Instance;

#[derive(Clone)]
pub struct Http {
    pub state: Arc<NodeState>,
    pub metrics: Arc<Metrics>,
    /// The config as read from the file and environment.
    pub config: Arc<Config>,
    /// The config in force once the Node and its pool were applied (Kubernetes), if different.
    pub effective: Arc<std::sync::OnceLock<Arc<Config>>>,
    pub node: Arc<std::sync::OnceLock<Instance>>,
}

#[derive(Serialize)]
struct EniView {
    id: String,
    device_index: u32,
    route_table: Option<u32>,
    prefixes: Vec<ipnet::Ipv4Net>,
    free: u32,
    assigned: u32,
    cooling: u32,
    releasing: u32,
}

#[derive(Serialize)]
struct StatusView {
    ready: bool,
    line: String,
    #[serde(flatten)]
    status: Status,
    node: Option<Instance>,
}

async fn metrics(State(h): State<Http>) -> ([(&'static str, &'static str); 1], String) {
    ([("content-type", "text/plain; version=0.0.4")], h.metrics.render())
}

async fn status(State(h): State<Http>) -> Json<StatusView> {
    let st = h.state.status();
    Json(StatusView { ready: st.ready(), line: st.line(), status: st, node: h.node.get().cloned() })
}

async fn enis(State(h): State<Http>) -> Json<Vec<EniView>> {
    Json(h.state.read(|b| {
        b.pool
            .enis()
            .map(|e| {
                let (free, assigned, cooling, releasing) = Pool::eni_counts(e);
                EniView {
                    id: e.id.clone(),
                    device_index: e.device_index,
                    route_table: e.route_table,
                    prefixes: e.prefixes.clone(),
                    free,
                    assigned,
                    cooling,
                    releasing,
                }
            })
            .collect()
    }))
}

async fn addresses(State(h): State<Http>) -> Json<Vec<Block>> {
    Json(h.state.read(|b| b.pool.blocks().cloned().collect()))
}

#[derive(Serialize)]
struct AssignmentView {
    address: std::net::Ipv4Addr,
    #[serde(flatten)]
    pod: PodRecord,
}

async fn assignments(State(h): State<Http>) -> Json<Vec<AssignmentView>> {
    Json(h.state.read(|b| {
        b.pool
            .held()
            .map(|(k, a)| AssignmentView {
                address: *a,
                pod: b.pods.get(k).cloned().unwrap_or(PodRecord {
                    key: k.clone(),
                    namespace: None,
                    name: None,
                    assigned_at: 0,
                    netns: None,
                }),
            })
            .collect()
    }))
}

#[derive(Serialize)]
struct RouteView {
    address: std::net::Ipv4Addr,
    /// `namespace/name`, when the runtime said.
    pod: Option<String>,
    eni: Option<String>,
    /// The table the pod's own traffic uses: its ENI's (`from <pod>` rule) or `main`.
    table: String,
    /// The host veth routing the address on the node now (`None`: no host route).
    host_veth: Option<String>,
    /// Whether that veth is this assignment's attachment (`false`: another pod's veth routes it).
    veth_matches: Option<bool>,
}

/// Each held address with the ENI and table its traffic uses, and the host veth that routes it
/// (read from the node now: a pod whose route is missing shows here).
async fn routes(State(h): State<Http>) -> Json<Vec<RouteView>> {
    let prefix = h.effective.get().unwrap_or(&h.config).veth_prefix.clone();
    // address → (attachment id, veth name) of the host veth that routes it now.
    let on_host: std::collections::BTreeMap<std::net::Ipv4Addr, (String, String)> =
        underway_routes::pod_veths_named(None, &prefix)
            .await
            .unwrap_or_default()
            .into_iter()
            .flat_map(|(id, name, addrs)| addrs.into_iter().map(move |a| (a, (id.clone(), name.clone()))))
            .collect();
    Json(h.state.read(|b| {
        b.pool
            .held()
            .map(|(k, a)| {
                let block =
                    b.pool.blocks().find(|e| e.slots.contains_key(a) || e.prefixes.iter().any(|p| p.contains(a)));
                let eni = block.filter(|e| e.kind == BlockKind::Eni);
                let rec = b.pods.get(k);
                RouteView {
                    address: *a,
                    pod: rec.and_then(|r| Some(format!("{}/{}", r.namespace.as_ref()?, r.name.as_ref()?))),
                    eni: eni.map(|e| e.id.clone()),
                    table: block.and_then(|e| e.route_table).map_or("main".into(), |t| t.to_string()),
                    host_veth: on_host.get(a).map(|(_, name)| name.clone()),
                    // The veth routing the address is this attachment's (not another pod's).
                    veth_matches: on_host.get(a).map(|(id, _)| {
                        let ours = underway_routes::host_veth_name(&prefix, &k.container_id, &k.ifname);
                        *id == ours || (k.network == crate::service::RECOVERED && *id == k.container_id)
                    }),
                }
            })
            .collect()
    }))
}

async fn config(State(h): State<Http>) -> Json<Config> {
    Json((**h.effective.get().unwrap_or(&h.config)).clone())
}

/// Liveness: 200 while the reconciler makes progress within `health_stall_ms`, else 503 with why.
async fn healthz(State(h): State<Http>) -> (axum::http::StatusCode, String) {
    match crate::state::healthy(h.state.progress_ms(), crate::clock::unix_ms(), h.config.health_stall_ms) {
        Ok(()) => (axum::http::StatusCode::OK, "ok\n".into()),
        Err(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn errors(State(h): State<Http>) -> Json<Vec<ErrorEntry>> {
    Json(h.state.errors())
}

/// Binds both listeners now (so a port in use fails start-up) and serves them in the background.
pub async fn start(h: Http) -> Result<()> {
    let metrics_app = Router::new().route("/metrics", get(metrics)).with_state(h.clone());
    let intro_app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/enis", get(enis))
        .route("/v1/addresses", get(addresses))
        .route("/v1/assignments", get(assignments))
        .route("/v1/routes", get(routes))
        .route("/v1/config", get(config))
        .route("/v1/errors", get(errors))
        .route("/healthz", get(healthz))
        .with_state(h.clone());
    for (addr, app) in [(h.config.metrics_listen, metrics_app), (h.config.introspection_listen, intro_app)] {
        if let Some(addr) = addr {
            let l = bind(addr).await?;
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).await {
                    tracing::error!("http on {addr}: {e}");
                }
            });
        }
    }
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(IpamdError::io(format!("listen on {addr}")))
}

/// `underway-ipamd health`: one GET of `/healthz` on `introspection_listen` (blocking, 5 s);
/// without an introspection listener, the socket answering a status request is the test.
pub fn health(cfg: &Config) -> std::result::Result<String, String> {
    let Some(addr) = cfg.introspection_listen else {
        return underway_api::client::call(
            &cfg.socket,
            &underway_api::Request::Status,
            std::time::Duration::from_secs(5),
        )
        .map(|_| "ok (the socket answers; introspection is off)".to_string())
        .map_err(|e| e.to_string());
    };
    let (code, body) = http_get(addr, "/healthz")?;
    if code == 200 { Ok(body.trim().to_string()) } else { Err(body.trim().to_string()) }
}

/// One HTTP/1.1 GET of ipamd's own loopback listener (blocking, 5 s; `Connection: close`, so
/// the body is what follows the headers): (status code, body). For the commands that read a
/// running ipamd (`health`, the operator's views).
pub fn http_get(addr: SocketAddr, path: &str) -> std::result::Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .map_err(|e| format!("{addr}: {e} (is ipamd running?)"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| format!("{addr}{path}: {e}"))?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("{addr}{path}: no HTTP answer"))?;
    let code =
        head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| format!("{addr}{path}: {head}"))?;
    Ok((code, body.to_string()))
}
