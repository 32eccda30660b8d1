//! A stand-in for the few Kubernetes API paths ipamd uses, for process-level tests (no real API
//! server runs on these machines). It serves JSON objects from maps — Nodes, UnderwayPools,
//! Leases — accepts Events, and records every request line so a test can assert what ipamd asked.
//!
//! Semantics kept: a Node list honours `fieldSelector=metadata.name=<n>` (and only that
//! selector) and `limit` (with `remainingItemCount`; no continuation); a watch stays open and sends nothing; a Lease write must carry the resourceVersion
//! it read (else 409); unknown paths are 404 Status objects. Nothing else of Kubernetes is here.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

#[derive(Default)]
struct Objects {
    nodes: BTreeMap<String, Value>,
    pools: BTreeMap<String, Value>,
    leases: BTreeMap<String, Value>,
    events: Vec<Value>,
    requests: Vec<String>,
    version: u64,
}

type Shared = Arc<Mutex<Objects>>;

/// A running stand-in. Dropping it stops the server.
pub struct FakeApiServer {
    pub port: u16,
    objects: Shared,
    task: JoinHandle<()>,
    /// The kubeconfig [`FakeApiServer::in_ns`] wrote (removed on drop).
    kubeconfig: Option<std::path::PathBuf>,
}

fn status(code: u16, reason: &str, message: String) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": message, "reason": reason, "code": code}),
    )
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes()).into_owned().collect()
}

impl FakeApiServer {
    /// Serves on `listener` (which may have been bound inside a node's namespace).
    pub fn start_on(listener: std::net::TcpListener) -> std::io::Result<Self> {
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let objects: Shared = Arc::default();
        let app = Router::new().fallback(handle).with_state(objects.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeApiServer { port, objects, task, kubeconfig: None })
    }

    /// Serves on 127.0.0.1 inside network namespace `ns` and writes a kubeconfig naming it, for a
    /// process started in that namespace ([`FakeApiServer::kubeconfig_path`]).
    pub fn in_ns(ns: &str) -> Result<Self, crate::HarnessError> {
        let listener = crate::netns::in_ns(ns, || std::net::TcpListener::bind("127.0.0.1:0"))??;
        let mut api = Self::start_on(listener)?;
        let path = std::env::temp_dir().join(format!("underway-kubeconfig-{}-{}", std::process::id(), api.port));
        std::fs::write(&path, api.kubeconfig("127.0.0.1"))?;
        api.kubeconfig = Some(path);
        Ok(api)
    }

    /// The kubeconfig file [`FakeApiServer::in_ns`] wrote.
    pub fn kubeconfig_path(&self) -> String {
        self.kubeconfig.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
    }

    /// A kubeconfig naming this server (plain HTTP on the listener's port, a dummy token).
    pub fn kubeconfig(&self, host: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: http://{host}:{port}\n\
             users:\n- name: t\n  user:\n    token: test\ncontexts:\n- name: t\n  context:\n    cluster: t\n    user: t\n\
             current-context: t\n",
            port = self.port
        )
    }

    pub fn put_node(&self, node: Value) {
        let name = node["metadata"]["name"].as_str().expect("a named node").to_string();
        self.objects.lock().expect("objects").nodes.insert(name, node);
    }

    pub fn put_pool(&self, pool: Value) {
        let name = pool["metadata"]["name"].as_str().expect("a named pool").to_string();
        self.objects.lock().expect("objects").pools.insert(name, pool);
    }

    /// The Lease `name`, as last written.
    pub fn lease(&self, name: &str) -> Option<Value> {
        self.objects.lock().expect("objects").leases.get(name).cloned()
    }

    pub fn events(&self) -> Vec<Value> {
        self.objects.lock().expect("objects").events.clone()
    }

    /// Every request so far, as `METHOD /path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.objects.lock().expect("objects").requests.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(p) = &self.kubeconfig {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn handle(State(objects): State<Shared>, method: Method, uri: Uri, body: Bytes) -> Response {
    let line = format!("{method} {}", uri.path_and_query().map(|p| p.as_str()).unwrap_or_default());
    let q = query(&uri);
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    if method == Method::GET && path == ["api", "v1", "nodes"] && q.contains_key("watch") {
        objects.lock().expect("objects").requests.push(line);
        // A watch that stays open and reports nothing (until the client goes away).
        let body = Body::from_stream(futures_util::stream::pending::<Result<Bytes, std::io::Error>>());
        return Response::builder().status(200).body(body).expect("a response");
    }
    let (code, out) = {
        let mut o = objects.lock().expect("objects");
        o.requests.push(line);
        o.version += 1;
        let version = o.version.to_string();
        answer(&mut o, &method, &path, &q, body, version)
    };
    Response::builder()
        .status(StatusCode::from_u16(code).expect("a status"))
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&out).expect("JSON")))
        .expect("a response")
}

fn answer(
    o: &mut Objects,
    method: &Method,
    path: &[&str],
    q: &BTreeMap<String, String>,
    mut body: Value,
    version: String,
) -> (u16, Value) {
    match (method.as_str(), path) {
        ("GET", ["api", "v1", "nodes"]) => {
            let only = q.get("fieldSelector").and_then(|s| s.strip_prefix("metadata.name="));
            if q.contains_key("fieldSelector") && only.is_none() {
                return status(400, "BadRequest", "only metadata.name= is supported here".into());
            }
            let mut items: Vec<Value> =
                o.nodes.values().filter(|n| only.is_none_or(|x| n["metadata"]["name"] == x)).cloned().collect();
            let mut meta = json!({"resourceVersion": version});
            // A page of `limit`, saying how many remain (a continue token is given but not served).
            if let Some(limit) = q.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0)
                && items.len() > limit
            {
                meta["remainingItemCount"] = json!(items.len() - limit);
                meta["continue"] = json!("not-served-here");
                items.truncate(limit);
            }
            (200, json!({"apiVersion": "v1", "kind": "NodeList", "metadata": meta, "items": items}))
        }
        ("GET", ["apis", "underway.dev", "v1alpha1", "underwaypools", name]) => match o.pools.get(*name) {
            Some(p) => (200, p.clone()),
            None => status(404, "NotFound", format!("underwaypools.underway.dev \"{name}\" not found")),
        },
        ("GET", ["apis", "coordination.k8s.io", "v1", "namespaces", _, "leases", name]) => match o.leases.get(*name) {
            Some(l) => (200, l.clone()),
            None => status(404, "NotFound", format!("leases.coordination.k8s.io \"{name}\" not found")),
        },
        ("POST", ["apis", "coordination.k8s.io", "v1", "namespaces", _, "leases"]) => {
            let name = body["metadata"]["name"].as_str().unwrap_or_default().to_string();
            if o.leases.contains_key(&name) {
                return status(409, "AlreadyExists", format!("leases.coordination.k8s.io \"{name}\" already exists"));
            }
            body["metadata"]["resourceVersion"] = json!(version);
            o.leases.insert(name, body.clone());
            (201, body)
        }
        ("PUT", ["apis", "coordination.k8s.io", "v1", "namespaces", _, "leases", name]) => {
            let current = o.leases.get(*name).map(|l| l["metadata"]["resourceVersion"].clone());
            if current != Some(body["metadata"]["resourceVersion"].clone()) {
                return status(409, "Conflict", format!("Operation cannot be fulfilled on leases \"{name}\""));
            }
            body["metadata"]["resourceVersion"] = json!(version);
            o.leases.insert(name.to_string(), body.clone());
            (200, body)
        }
        ("POST", ["apis", "events.k8s.io", "v1", "namespaces", _, "events"])
        | ("PATCH", ["apis", "events.k8s.io", "v1", "namespaces", _, "events", _]) => {
            o.events.push(body.clone());
            (if method == Method::POST { 201 } else { 200 }, body)
        }
        _ => status(404, "NotFound", format!("{method} /{} is not served here", path.join("/"))),
    }
}
