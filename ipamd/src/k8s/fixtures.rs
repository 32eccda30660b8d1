//! A stand-in API server for tests: a tower-test mock behind a real `kube::Client`. A test sees
//! each HTTP request the client sends (method, path, decoded query, JSON body) and answers it
//! with the JSON the API server would send.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::Value;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Reply = tower_test::mock::SendResponse<Response<Body>>;

/// One request as the API server received it.
#[derive(Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub body: Value,
    reply: Reply,
}

impl Seen {
    /// Answers with `status` and a JSON body.
    pub fn answer(self, status: u16, body: Value) {
        let bytes = serde_json::to_vec(&body).expect("JSON");
        let resp = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(bytes))
            .expect("a response");
        self.reply.send_response(resp);
    }

    /// Answers a watch with these events, one JSON line each, then ends the stream.
    pub fn answer_watch(self, events: &[Value]) {
        let mut bytes = Vec::new();
        for e in events {
            bytes.extend(serde_json::to_vec(e).expect("JSON"));
            bytes.push(b'\n');
        }
        let resp = Response::builder().status(200).body(Body::from(bytes)).expect("a response");
        self.reply.send_response(resp);
    }

    /// `METHOD /path` (the query aside), for short assertions.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

pub struct ApiServer(Handle);

/// A client whose every request comes to the returned [`ApiServer`].
pub fn client() -> (kube::Client, ApiServer) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(svc, "default"), ApiServer(handle))
}

impl ApiServer {
    /// The next request. Fails the test if none comes within 10 s (a hang guard, not a timing).
    pub async fn next(&mut self) -> Seen {
        let (req, reply) = tokio::time::timeout(Duration::from_secs(10), self.0.next_request())
            .await
            .expect("a request within 10 s")
            .expect("the client is alive");
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.expect("a body");
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("a JSON body") };
        let query = form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes()).into_owned().collect();
        Seen { method: parts.method.to_string(), path: parts.uri.path().to_string(), query, body, reply }
    }
}

/// The API server's 404 Status for `kind` `name`.
pub fn not_found(kind: &str, name: &str) -> Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{kind} \"{name}\" not found"), "reason": "NotFound",
        "details": {"name": name, "kind": kind}, "code": 404
    })
}

/// The API server's 409 Status (a write lost to a concurrent one).
pub fn conflict(kind: &str, name: &str) -> Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("Operation cannot be fulfilled on {kind} \"{name}\": the object has been modified"),
        "reason": "Conflict", "details": {"name": name, "kind": kind}, "code": 409
    })
}

/// A config with the Kubernetes side on for node `node-a` in cluster `c1`, plus `extra`
/// `UNDERWAY_*` variables.
pub fn config(extra: &[(&str, &str)]) -> crate::config::Config {
    let base = [
        ("UNDERWAY_CLUSTER", "c1"),
        ("UNDERWAY_KUBERNETES__ENABLED", "true"),
        ("UNDERWAY_KUBERNETES__NODE_NAME", "node-a"),
    ];
    let env: Vec<(String, String)> = base.iter().chain(extra).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    crate::config::Config::load(None, &env).expect("a valid config")
}

/// An UnderwayPool object as the API server returns it.
pub fn pool_cr(name: &str, spec: Value) -> Value {
    serde_json::json!({"apiVersion": "underway.dev/v1alpha1", "kind": "UnderwayPool",
                       "metadata": {"name": name, "resourceVersion": "7"}, "spec": spec})
}
