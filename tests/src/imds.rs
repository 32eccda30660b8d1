//! An IMDSv2 server on loopback: `PUT /latest/api/token` hands out a token, every `GET` must carry
//! it (`X-aws-ec2-metadata-token`), and paths are served from a map. A path ending in `/` lists
//! its children, one a line, like the real service.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

type Paths = Arc<Mutex<BTreeMap<String, String>>>;

#[derive(Clone)]
struct Shared {
    paths: Paths,
    tokens: Arc<Mutex<Vec<String>>>,
}

/// A running fake IMDS. Dropping it stops the server.
pub struct FakeImds {
    pub addr: SocketAddr,
    paths: Paths,
    task: JoinHandle<()>,
}

impl FakeImds {
    /// Serves `paths` (keys like `/latest/meta-data/instance-id`) on 127.0.0.1 at a free port.
    pub async fn start(paths: BTreeMap<String, String>) -> std::io::Result<Self> {
        Self::start_on(std::net::TcpListener::bind("127.0.0.1:0")?, Vec::new(), paths)
    }

    /// Serves on `main` (whose address is [`FakeImds::addr`]) and on `more` listeners, which may
    /// have been bound inside another network namespace (e.g. 169.254.169.254:80 in a node).
    pub fn start_on(
        main: std::net::TcpListener,
        more: Vec<std::net::TcpListener>,
        paths: BTreeMap<String, String>,
    ) -> std::io::Result<Self> {
        let shared = Shared { paths: Arc::new(Mutex::new(paths)), tokens: Arc::default() };
        let addr = main.local_addr()?;
        let paths = shared.paths.clone();
        let app = Router::new().fallback(handle).with_state(shared);
        let mut listeners = Vec::new();
        for l in std::iter::once(main).chain(more) {
            l.set_nonblocking(true)?;
            listeners.push(TcpListener::from_std(l)?);
        }
        let task = tokio::spawn(async move {
            let serving = listeners.into_iter().map(|l| {
                let app = app.clone();
                tokio::spawn(async move {
                    let _ = axum::serve(l, app).await;
                })
            });
            let handles: Vec<_> = serving.collect();
            let _guard = AbortAll(handles);
            std::future::pending::<()>().await;
        });
        Ok(FakeImds { addr, paths, task })
    }

    /// The endpoint URL for `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the served paths (the node's metadata changed).
    pub fn set_paths(&self, paths: BTreeMap<String, String>) {
        *self.paths.lock().expect("paths lock") = paths;
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Aborts the serving tasks when the owning task is aborted.
struct AbortAll(Vec<JoinHandle<()>>);

impl Drop for AbortAll {
    fn drop(&mut self) {
        self.0.iter().for_each(JoinHandle::abort);
    }
}

fn reply(status: StatusCode, body: String) -> Response {
    Response::builder().status(status).body(Body::from(body)).expect("response")
}

async fn handle(State(s): State<Shared>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path();
    if method == Method::PUT && path == "/latest/api/token" {
        let Some(ttl) = headers.get("x-aws-ec2-metadata-token-ttl-seconds").cloned() else {
            return reply(StatusCode::BAD_REQUEST, "missing X-aws-ec2-metadata-token-ttl-seconds".into());
        };
        let mut tokens = s.tokens.lock().expect("tokens lock");
        let token = format!("token-{}-{}", tokens.len(), std::process::id());
        tokens.push(token.clone());
        let mut r = reply(StatusCode::OK, token);
        r.headers_mut().insert("x-aws-ec2-metadata-token-ttl-seconds", ttl);
        return r;
    }
    if method != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, String::new());
    }
    let token = headers.get("x-aws-ec2-metadata-token").and_then(|v| v.to_str().ok());
    if !token.is_some_and(|t| s.tokens.lock().expect("tokens lock").iter().any(|k| k == t)) {
        return reply(StatusCode::UNAUTHORIZED, String::new());
    }
    let paths = s.paths.lock().expect("paths lock");
    if let Some(v) = paths.get(path) {
        return reply(StatusCode::OK, v.clone());
    }
    if path.ends_with('/') {
        let mut children: Vec<String> = paths
            .keys()
            .filter_map(|k| k.strip_prefix(path))
            .map(|rest| match rest.split_once('/') {
                Some((dir, _)) => format!("{dir}/"),
                None => rest.to_string(),
            })
            .collect();
        children.dedup();
        if !children.is_empty() {
            return reply(StatusCode::OK, children.join("\n"));
        }
    }
    reply(StatusCode::NOT_FOUND, String::new())
}
