//! The strict EC2 front: an HTTP reverse proxy between every SDK client of the tests and
//! LocalStack, as strict as AWS where LocalStack is lenient, and a fault injector.
//!
//! One front per LocalStack account (per test world): the account's request buckets are shared by
//! every node of the test, as EC2 meters them per account and region. For each request it
//! 1. adds the configured latency and draws the seeded faults (throttle, 5xx, a connection reset
//!    before LocalStack saw the request);
//! 2. takes a token from the account's bucket for the action's class (over budget: HTTP 503
//!    `RequestLimitExceeded`);
//! 3. checks AWS's rules ([`rules`]) against LocalStack's state, read directly (uncounted);
//! 4. picks free addresses for a request that asks for a count (LocalStack picks at random and
//!    can hand one address to two ENIs; EC2 never does) and forwards it; replays the first answer for a repeated `ClientToken` (EC2's
//!    idempotency, which LocalStack lacks); hides ENIs created within the eventual-consistency
//!    window from DescribeNetworkInterfaces; and may reset the connection *after* LocalStack acted
//!    (the reply lost, the change made).
//!
//! Every request is recorded (time, action, node, outcome) for the test, and — when
//! `UNDERWAY_FRONT_LOG` names a file — appended to it as one JSON line, so `tests/run` can report
//! the whole run and fail on any refusal a test did not ask to provoke ([`Front::provoke`]).

pub mod addresses;
pub mod rules;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_ec2::Client;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

pub use rules::{Refusal, Rule};
use wire::Params;

/// The run-wide log of every front's requests (set by `tests/run`).
pub const LOG_ENV: &str = "UNDERWAY_FRONT_LOG";

/// One token bucket of EC2's request-rate metering.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub size: f64,
    /// Tokens per second.
    pub refill: f64,
}

/// EC2's request throttling (EC2 API reference, "Request throttling", the token-bucket table for
/// the default account): mutating actions a bucket of 50 refilled at 5 per second; non-mutating
/// (Describe*) 100 refilled at 20 per second; per account and region.
pub const AWS_MUTATING: Bucket = Bucket { size: 50.0, refill: 5.0 };
pub const AWS_NON_MUTATING: Bucket = Bucket { size: 100.0, refill: 20.0 };

/// Seeded faults. Shares are probabilities per request, drawn in this order.
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    pub seed: u64,
    /// Answer 503 `RequestLimitExceeded` although the bucket had room.
    pub throttle: f64,
    /// Answer 500 `InternalError` or 503 `Unavailable`.
    pub server_error: f64,
    /// Close the connection without an answer, before forwarding.
    pub reset_before: f64,
    /// Forward, let LocalStack act, then close the connection without an answer.
    pub reset_after: f64,
    /// Added to every request.
    pub latency: Duration,
    /// When not empty, the faults above hit only these actions (e.g. "ModifyNetworkInterfaceAttribute").
    pub actions: Vec<String>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            seed: 1,
            throttle: 0.0,
            server_error: 0.0,
            reset_before: 0.0,
            reset_after: 0.0,
            latency: Duration::ZERO,
            actions: Vec::new(),
        }
    }
}

/// What a test may set. The rules themselves cannot be turned off.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontConfig {
    /// Routes per table (VPC quota "routes per route table", 50 by default).
    pub route_table_capacity: usize,
    pub mutating: Bucket,
    pub non_mutating: Bucket,
    /// How long an ENI just created stays invisible to DescribeNetworkInterfaces.
    pub invisible_after_create: Duration,
    pub faults: Faults,
}

impl Default for FrontConfig {
    fn default() -> Self {
        FrontConfig {
            route_table_capacity: 50,
            mutating: AWS_MUTATING,
            non_mutating: AWS_NON_MUTATING,
            invisible_after_create: Duration::ZERO,
            faults: Faults::default(),
        }
    }
}

/// What became of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// LocalStack answered with this HTTP status.
    Forwarded(u16),
    /// The first answer for this ClientToken was replayed.
    Replayed,
    /// A rule refused it; `provoked` when the test asked for that rule.
    Refused { rule: Rule, code: String, provoked: bool },
    /// A fault the test configured.
    Fault(Fault),
    /// LocalStack could not be reached.
    UpstreamError(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    Throttle,
    ServerError,
    /// A 503 `Unavailable` (recorded as `ServerError`).
    Unavailable,
    ResetBefore,
    ResetAfter,
    Invisible,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::Throttle => "throttle",
            Fault::ServerError | Fault::Unavailable => "server-error",
            Fault::ResetBefore => "reset-before",
            Fault::ResetAfter => "reset-after",
            Fault::Invisible => "invisible",
        }
    }
}

/// One request as the front saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Milliseconds since the front started.
    pub at_ms: u64,
    pub action: String,
    pub node: String,
    pub mutating: bool,
    pub outcome: Outcome,
}

/// A token bucket on the wall clock.
#[derive(Debug)]
struct Tokens {
    cfg: Bucket,
    level: f64,
    at: Instant,
}

impl Tokens {
    fn new(cfg: Bucket) -> Self {
        Tokens { cfg, level: cfg.size, at: Instant::now() }
    }
    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * self.cfg.refill).min(self.cfg.size);
        self.at = now;
        if self.level >= 1.0 {
            self.level -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Shared {
    account: String,
    /// The test (libtest names its threads after them) or program that started the front.
    test: String,
    upstream: String,
    direct: Client,
    started: Instant,
    cfg: Mutex<FrontConfig>,
    mutating: Mutex<Tokens>,
    non_mutating: Mutex<Tokens>,
    rng: Mutex<fastrand::Rng>,
    /// ENI id → when it was created (for the eventual-consistency window).
    created: Mutex<HashMap<String, Instant>>,
    /// (action, ClientToken) → the first successful answer.
    idempotent: Mutex<HashMap<(String, String), (u16, Bytes)>>,
    provoked: Mutex<BTreeSet<Rule>>,
    /// Requests that pick addresses go one at a time (two must not pick the same free ones).
    alloc: tokio::sync::Mutex<()>,
    records: Mutex<Vec<Record>>,
    log: Option<Mutex<std::fs::File>>,
}

/// A running front. Dropping it stops it.
pub struct Front {
    shared: Arc<Shared>,
    endpoint: String,
    rt: tokio::runtime::Handle,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front").field("endpoint", &self.endpoint).field("account", &self.shared.account).finish()
    }
}

/// Why a connection was closed without an answer.
#[derive(Debug)]
struct Reset;
impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by the front (fault injection)")
    }
}
impl std::error::Error for Reset {}

impl Front {
    /// Starts a front for `account` (its access key id) in front of LocalStack at `upstream`, on
    /// its own thread and runtime (so a test's blocking code never stalls it), listening on a
    /// free loopback port for requests of `"test"` (the test process itself).
    pub fn start(account: &str, upstream: &str, direct: aws_config::SdkConfig) -> std::io::Result<Front> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let handle = rt.handle().clone();
        std::thread::Builder::new().name(format!("ec2-front-{account}")).spawn(move || {
            let _ = rt.block_on(stop_rx);
            rt.shutdown_background();
        })?;
        let log = std::env::var_os(LOG_ENV)
            .and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok().map(Mutex::new));
        let cfg = FrontConfig::default();
        let shared = Arc::new(Shared {
            account: account.to_string(),
            test: std::thread::current()
                .name()
                .map(str::to_string)
                .unwrap_or_else(|| std::env::args().next().unwrap_or_default()),
            upstream: upstream.trim_start_matches("http://").trim_end_matches('/').to_string(),
            direct: Client::new(&direct),
            started: Instant::now(),
            mutating: Mutex::new(Tokens::new(cfg.mutating)),
            non_mutating: Mutex::new(Tokens::new(cfg.non_mutating)),
            rng: Mutex::new(fastrand::Rng::with_seed(cfg.faults.seed)),
            cfg: Mutex::new(cfg),
            created: Mutex::default(),
            idempotent: Mutex::default(),
            provoked: Mutex::default(),
            alloc: tokio::sync::Mutex::new(()),
            records: Mutex::default(),
            log,
        });
        let mut front = Front { shared, endpoint: String::new(), rt: handle, stop: Mutex::new(Some(stop_tx)) };
        front.endpoint = front.endpoint_for("test")?;
        Ok(front)
    }

    /// The endpoint the test process uses.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A new loopback endpoint whose requests are recorded as `node`'s (same account, same
    /// buckets).
    pub fn endpoint_for(&self, node: &str) -> std::io::Result<String> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        l.set_nonblocking(true)?;
        let shared = self.shared.clone();
        let node = node.to_string();
        let _guard = self.rt.enter();
        let l = tokio::net::TcpListener::from_std(l)?;
        self.rt.spawn(serve(l, shared, node));
        Ok(format!("http://{addr}"))
    }

    /// Changes the configuration (buckets start full again when they change; the fault RNG is
    /// reseeded when the seed changes).
    pub fn configure(&self, f: impl FnOnce(&mut FrontConfig)) {
        let mut cfg = self.shared.cfg.lock().expect("cfg");
        let before = cfg.clone();
        f(&mut cfg);
        if cfg.mutating != before.mutating {
            *self.shared.mutating.lock().expect("bucket") = Tokens::new(cfg.mutating);
        }
        if cfg.non_mutating != before.non_mutating {
            *self.shared.non_mutating.lock().expect("bucket") = Tokens::new(cfg.non_mutating);
        }
        if cfg.faults.seed != before.faults.seed {
            *self.shared.rng.lock().expect("rng") = fastrand::Rng::with_seed(cfg.faults.seed);
        }
    }

    pub fn config(&self) -> FrontConfig {
        self.shared.cfg.lock().expect("cfg").clone()
    }

    /// Declares that this test provokes `rule` on purpose: its refusals are recorded as provoked
    /// and do not fail the run.
    pub fn provoke(&self, rule: Rule) {
        self.shared.provoked.lock().expect("provoked").insert(rule);
    }

    /// Every request so far.
    pub fn records(&self) -> Vec<Record> {
        self.shared.records.lock().expect("records").clone()
    }

    /// Refusals by rule that the test did not provoke.
    pub fn unprovoked(&self) -> Vec<Record> {
        self.records().into_iter().filter(|r| matches!(r.outcome, Outcome::Refused { provoked: false, .. })).collect()
    }

    /// The most requests of a class (mutating or not) that reached LocalStack within any window
    /// of `window` (refused and faulted requests not counted: they did not spend the budget).
    pub fn peak(&self, mutating: bool, window: Duration) -> usize {
        let times: Vec<u64> = self
            .records()
            .iter()
            .filter(|r| {
                r.mutating == mutating && matches!(r.outcome, Outcome::Forwarded(_) | Outcome::Fault(Fault::ResetAfter))
            })
            .map(|r| r.at_ms)
            .collect();
        peak_in_window(&times, window.as_millis() as u64)
    }

    /// Counts by outcome label (`forwarded`, `refused:<rule>`, `fault:<kind>`, …).
    pub fn summary(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for r in self.records() {
            *m.entry(outcome_label(&r.outcome)).or_insert(0) += 1;
        }
        m
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.lock().expect("stop").take() {
            let _ = tx.send(());
        }
    }
}

/// The fault one request gets, drawn all at once when it arrives (always five draws), so the n-th
/// request of a run meets the same fate whatever the interleaving of concurrent requests.
pub fn plan_faults(rng: &mut fastrand::Rng, f: &Faults) -> Option<Fault> {
    let d: [f64; 4] = [rng.f64(), rng.f64(), rng.f64(), rng.f64()];
    let coin = rng.bool();
    if d[0] < f.reset_before {
        Some(Fault::ResetBefore)
    } else if d[1] < f.throttle {
        Some(Fault::Throttle)
    } else if d[2] < f.server_error {
        Some(if coin { Fault::ServerError } else { Fault::Unavailable })
    } else if d[3] < f.reset_after {
        Some(Fault::ResetAfter)
    } else {
        None
    }
}

/// The faults the first `n` requests of a front with `f` meet (what a test can plan with).
pub fn simulate_faults(f: &Faults, n: usize) -> Vec<Option<Fault>> {
    let mut rng = fastrand::Rng::with_seed(f.seed);
    (0..n).map(|_| plan_faults(&mut rng, f)).collect()
}

/// The largest number of sorted-or-not times within any window of `window_ms`.
pub fn peak_in_window(times: &[u64], window_ms: u64) -> usize {
    let mut t = times.to_vec();
    t.sort_unstable();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..t.len() {
        while t[hi] - t[lo] >= window_ms {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

pub fn outcome_label(o: &Outcome) -> String {
    match o {
        Outcome::Forwarded(s) if *s < 400 => "forwarded".into(),
        Outcome::Forwarded(s) => format!("forwarded:{s}"),
        Outcome::Replayed => "replayed".into(),
        Outcome::Refused { rule, provoked, .. } => {
            format!("refused:{}{}", rule.name(), if *provoked { "" } else { ":UNPROVOKED" })
        }
        Outcome::Fault(f) => format!("fault:{}", f.name()),
        Outcome::UpstreamError(_) => "upstream-error".into(),
    }
}

async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>, node: String) {
    while let Ok((tcp, _)) = listener.accept().await {
        let shared = shared.clone();
        let node = node.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(shared.clone(), node.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

fn xml_response(status: u16, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

fn request_id() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("front-{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

impl Shared {
    /// Records a request at the time it arrived (`at`), so windows count arrivals, not the
    /// moments LocalStack happened to answer.
    fn record(&self, at: Instant, action: &str, node: &str, mutating: bool, outcome: Outcome) {
        self.record_with(at, action, node, mutating, outcome, None)
    }

    /// A record whose log line also names what it did to addresses (`detail`): the trail a
    /// torture violation is explained from.
    fn record_with(
        &self,
        at: Instant,
        action: &str,
        node: &str,
        mutating: bool,
        outcome: Outcome,
        detail: Option<String>,
    ) {
        let at_ms = at.saturating_duration_since(self.started).as_millis() as u64;
        if let Some(log) = &self.log {
            let wall =
                (SystemTime::now() - at.elapsed()).duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
            let (rule, provoked) = match &outcome {
                Outcome::Refused { rule, provoked, .. } => (Some(rule.name()), *provoked),
                _ => (None, false),
            };
            let mut line = serde_json::json!({
                "t_ms": wall,
                "account": self.account,
                "node": node,
                "action": action,
                "mutating": mutating,
                "outcome": outcome_label(&outcome),
                "rule": rule,
                "provoked": provoked,
                "test": self.test,
            });
            if let Some(d) = detail {
                line["addresses"] = serde_json::Value::String(d);
            }
            if let Ok(mut f) = log.lock() {
                let _ = f.write_all(format!("{line}\n").as_bytes());
            }
        }
        self.records.lock().expect("records").push(Record {
            at_ms,
            action: action.to_string(),
            node: node.to_string(),
            mutating,
            outcome,
        });
    }

    fn refusal(&self, at: Instant, action: &str, node: &str, mutating: bool, r: Refusal) -> Response<Full<Bytes>> {
        let provoked = self.provoked.lock().expect("provoked").contains(&r.rule);
        if !provoked {
            eprintln!(
                "EC2 front ({}): refused {action} from {node}: {} {}: {}",
                self.account,
                r.rule.name(),
                r.code,
                r.message
            );
        }
        self.record(at, action, node, mutating, Outcome::Refused { rule: r.rule, code: r.code.to_string(), provoked });
        xml_response(r.status, wire::error_xml(r.code, &r.message, &request_id()))
    }
}

async fn handle(shared: Arc<Shared>, node: String, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Reset> {
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(|_| Reset)?.to_bytes();
    let params = Params::parse(&body, parts.uri.query());
    let action = params.action().to_string();
    let mutating = !wire::is_non_mutating(&action);
    let cfg = shared.cfg.lock().expect("cfg").clone();

    // 1. Latency and faults.
    if !cfg.faults.latency.is_zero() {
        tokio::time::sleep(cfg.faults.latency).await;
    }
    let targeted = cfg.faults.actions.is_empty() || cfg.faults.actions.contains(&action);
    let plan = plan_faults(&mut shared.rng.lock().expect("rng"), &cfg.faults).filter(|_| targeted);
    match plan {
        Some(Fault::ResetBefore) => {
            shared.record(arrived, &action, &node, mutating, Outcome::Fault(Fault::ResetBefore));
            return Err(Reset);
        }
        Some(Fault::Throttle) => {
            shared.record(arrived, &action, &node, mutating, Outcome::Fault(Fault::Throttle));
            return Ok(xml_response(
                503,
                wire::error_xml("RequestLimitExceeded", "Request limit exceeded.", &request_id()),
            ));
        }
        Some(f @ (Fault::ServerError | Fault::Unavailable)) => {
            shared.record(arrived, &action, &node, mutating, Outcome::Fault(Fault::ServerError));
            let (status, code) = if f == Fault::ServerError { (500, "InternalError") } else { (503, "Unavailable") };
            return Ok(xml_response(
                status,
                wire::error_xml(code, "An internal error has occurred (injected).", &request_id()),
            ));
        }
        _ => {}
    }

    // 2. The account's request buckets.
    let bucket = if mutating { &shared.mutating } else { &shared.non_mutating };
    if !bucket.lock().expect("bucket").take(Instant::now()) {
        let b = if mutating { cfg.mutating } else { cfg.non_mutating };
        return Ok(shared.refusal(
            arrived,
            &action,
            &node,
            mutating,
            Refusal {
                rule: Rule::RequestRate,
                status: 503,
                code: "RequestLimitExceeded",
                message: format!(
                    "Request limit exceeded: the account's {} bucket ({} tokens, {}/s) is empty.",
                    if mutating { "mutating" } else { "non-mutating" },
                    b.size,
                    b.refill
                ),
            },
        ));
    }

    // 3. EC2's idempotency: a repeated ClientToken gets the first answer.
    let token = params.get("ClientToken").map(|t| (action.clone(), t.to_string()));
    if let Some(key) = &token
        && let Some((status, bytes)) = shared.idempotent.lock().expect("idem").get(key).cloned()
    {
        shared.record(arrived, &action, &node, mutating, Outcome::Replayed);
        return Ok(Response::builder()
            .status(status)
            .header("content-type", "text/xml;charset=UTF-8")
            .body(Full::new(bytes))
            .expect("a valid response"));
    }

    // 4. AWS's rules.
    if let Some(r) = rules::evaluate(&shared.direct, &params, cfg.route_table_capacity).await {
        return Ok(shared.refusal(arrived, &action, &node, mutating, r));
    }

    // 5. Eventual consistency for a describe naming an ENI still invisible.
    let invisible = |id: &str| {
        shared.created.lock().expect("created").get(id).is_some_and(|t| t.elapsed() < cfg.invisible_after_create)
    };
    if action == "DescribeNetworkInterfaces"
        && let Some(id) = params.list("NetworkInterfaceId").into_iter().find(|id| invisible(id))
    {
        shared.record(arrived, &action, &node, mutating, Outcome::Fault(Fault::Invisible));
        return Ok(xml_response(
            400,
            wire::error_xml(
                "InvalidNetworkInterfaceID.NotFound",
                &format!("The networkInterface ID '{id}' does not exist"),
                &request_id(),
            ),
        ));
    }

    // 6. EC2 never gives an address another interface of the subnet holds; LocalStack picks at
    // random without looking. A count becomes explicit free addresses, one such request at a time.
    let _picking = match action.as_str() {
        "AssignPrivateIpAddresses" | "CreateNetworkInterface" => Some(shared.alloc.lock().await),
        _ => None,
    };
    let body = match &_picking {
        Some(_) => addresses::explicit(&shared.direct, &params).await.map_or(body, |p| Bytes::from(p.encode())),
        None => body,
    };
    let sent = Params::parse(&body, parts.uri.query());

    // 7. Forward.
    let (status, headers, bytes) = match forward(&shared.upstream, &parts, body).await {
        Ok(x) => x,
        Err(e) => {
            shared.record(arrived, &action, &node, mutating, Outcome::UpstreamError(e.clone()));
            return Ok(xml_response(503, wire::error_xml("Unavailable", &format!("upstream: {e}"), &request_id())));
        }
    };
    let mut bytes = bytes;
    if status == 200 {
        if action == "CreateNetworkInterface"
            && let Some(id) = wire::first_text(&String::from_utf8_lossy(&bytes), "networkInterfaceId")
        {
            shared.created.lock().expect("created").insert(id.to_string(), Instant::now());
        }
        if action == "DescribeNetworkInterfaces" && !cfg.invisible_after_create.is_zero() {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let kept = wire::drop_items(&text, "networkInterfaceSet", "networkInterfaceId", &|id| invisible(id));
            if kept.len() != text.len() {
                bytes = Bytes::from(kept);
            }
        }
        if let Some(key) = token {
            shared.idempotent.lock().expect("idem").insert(key, (status, bytes.clone()));
        }
    }
    let detail = (status == 200).then(|| addresses::trail(&sent, &String::from_utf8_lossy(&bytes))).flatten();
    if plan == Some(Fault::ResetAfter) {
        shared.record_with(arrived, &action, &node, mutating, Outcome::Fault(Fault::ResetAfter), detail);
        return Err(Reset);
    }
    shared.record_with(arrived, &action, &node, mutating, Outcome::Forwarded(status), detail);
    let mut resp = Response::builder().status(status);
    for (k, v) in headers.iter() {
        if !matches!(k.as_str(), "content-length" | "transfer-encoding" | "connection") {
            resp = resp.header(k, v);
        }
    }
    Ok(resp.body(Full::new(bytes)).expect("a valid response"))
}

/// One request to LocalStack over a fresh connection (it closes each one anyway).
async fn forward(
    upstream: &str,
    parts: &hyper::http::request::Parts,
    body: Bytes,
) -> Result<(u16, hyper::HeaderMap, Bytes), String> {
    let stream = tokio::net::TcpStream::connect(upstream).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut b =
        Request::builder().method(parts.method.clone()).uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    for (k, v) in parts.headers.iter() {
        // The body may have been rewritten: hyper sets its length.
        if !matches!(k.as_str(), "connection" | "content-length") {
            b = b.header(k, v);
        }
    }
    let req = b.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, headers, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_counts_the_busiest_window() {
        assert_eq!(peak_in_window(&[], 1000), 0);
        assert_eq!(
            peak_in_window(&[0, 100, 999, 1000, 1500, 1600, 1999], 1000),
            4,
            "999 and 1999 are a whole window apart"
        );
        assert_eq!(peak_in_window(&[5000, 0, 10], 1000), 2);
    }

    #[test]
    fn a_bucket_empties_and_refills() {
        let mut t = Tokens::new(Bucket { size: 2.0, refill: 10.0 });
        let now = t.at;
        assert!(t.take(now) && t.take(now));
        assert!(!t.take(now), "empty after its size");
        assert!(t.take(now + Duration::from_millis(100)), "one token after 100 ms at 10/s");
        assert!(!t.take(now + Duration::from_millis(100)));
        assert!(t.take(now + Duration::from_secs(10)) && t.take(now + Duration::from_secs(10)));
        assert!(!t.take(now + Duration::from_secs(10)), "never more than the size");
    }

    #[test]
    fn fault_plans_follow_the_shares_and_the_seed() {
        let f = Faults { seed: 7, throttle: 0.3, server_error: 0.05, reset_after: 0.02, ..Faults::default() };
        let a = simulate_faults(&f, 10_000);
        assert_eq!(a, simulate_faults(&f, 10_000), "the same seed, the same fates");
        let share = |k: &[Fault]| a.iter().filter(|x| x.is_some_and(|x| k.contains(&x))).count() as f64 / 1e4;
        assert!((share(&[Fault::Throttle]) - 0.3).abs() < 0.02);
        assert!((share(&[Fault::ServerError, Fault::Unavailable]) - 0.05 * 0.7).abs() < 0.01);
        assert!((share(&[Fault::ResetAfter]) - 0.02 * 0.7 * 0.95).abs() < 0.006);
        assert_eq!(share(&[Fault::ResetBefore]), 0.0);
        assert!(simulate_faults(&Faults::default(), 100).iter().all(Option::is_none), "no fault by default");
    }

    #[test]
    fn labels_name_unprovoked_refusals() {
        let o = Outcome::Refused { rule: Rule::RouteLimit, code: "RouteLimitExceeded".into(), provoked: false };
        assert_eq!(outcome_label(&o), "refused:route-limit:UNPROVOKED");
        assert_eq!(outcome_label(&Outcome::Forwarded(200)), "forwarded");
        assert_eq!(outcome_label(&Outcome::Forwarded(400)), "forwarded:400");
    }
}
