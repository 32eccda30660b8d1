//! The RPC handlers: what ipamd answers the CNI binary. Add waits a bounded time for an address
//! and is answered only once its assignment is on disk; Del of an unknown attachment is success.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use underway_api::{
    AddRequest, Allocation, ApiError, AttachmentKey, ErrorKind, GcRequest, POD_GATEWAY, Request, Response, StatusReply,
};

use tokio::sync::mpsc;

use crate::clock::unix_ms;
use crate::k8s::events::FailedAdd;
use crate::metrics::Metrics;
use crate::pool::{Lease, PoolError};
use crate::state::{Book, NodeState};
use crate::store::PodRecord;

/// Attachments found in use on the host but unknown to the store (it was lost) are held under
/// this network, keyed by their host veth name, until their owner's DEL or a GC matches them.
pub const RECOVERED: &str = "recovered";

pub fn recovered_key(veth: &str) -> AttachmentKey {
    AttachmentKey { network: RECOVERED.into(), container_id: veth.into(), ifname: String::new() }
}

/// Counts an Add waiting for an address while it lives (the reconciler sees it as demand).
struct Waiting<'a>(&'a NodeState);

impl<'a> Waiting<'a> {
    fn new(state: &'a NodeState) -> Self {
        state.change(|b| b.waiting += 1);
        Waiting(state)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.change(|b| b.waiting = b.waiting.saturating_sub(1));
    }
}

pub struct Service {
    pub state: Arc<NodeState>,
    pub metrics: Arc<Metrics>,
    pub add_wait: Duration,
    /// Pod MTU: the config's, or the pool's once the Kubernetes pool is known.
    pub mtu: AtomicU32,
    pub veth_prefix: String,
    /// Failed Adds go here, for an Event on their pod (Kubernetes only; never waited for).
    pub events: Option<mpsc::Sender<FailedAdd>>,
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error(ApiError { kind, message: message.into() })
}

impl Service {
    pub async fn handle(&self, req: Request) -> Response {
        match req {
            Request::Add(a) => {
                let t = Instant::now();
                // The pod's names are copied only when an Event could use them.
                let pod = self.events.as_ref().and_then(|_| a.pod_namespace.clone().zip(a.pod_name.clone()));
                let r = self.add(a).await;
                if let (Response::Error(e), Some((namespace, name)), Some(tx)) = (&r, pod, &self.events) {
                    // Full channel: the Event is dropped, never the answer delayed.
                    let _ = tx.try_send(FailedAdd { namespace, name, kind: e.kind, message: e.message.clone() });
                }
                self.metrics.observe_add(t.elapsed(), matches!(r, Response::Added(_)));
                r
            }
            Request::Del(k) => self.del(k).await,
            Request::Check(k) => self.check(&k),
            Request::Status => self.status(),
            Request::Gc(g) => self.gc(g).await,
        }
    }

    /// The key this attachment is held under: its own, or the recovered one of its host veth.
    fn resolve(&self, b: &Book, key: &AttachmentKey) -> Option<AttachmentKey> {
        if b.pool.lease_of(key).is_some() {
            return Some(key.clone());
        }
        let veth = underway_routes::host_veth_name(&self.veth_prefix, &key.container_id, &key.ifname);
        let r = recovered_key(&veth);
        b.pool.lease_of(&r).is_some().then_some(r)
    }

    fn allocation(&self, l: &Lease) -> Allocation {
        Allocation {
            address: l.address,
            prefix_len: 32,
            gateway: POD_GATEWAY,
            route_table: l.route_table,
            eni: Some(l.eni.clone()),
            mtu: Some(self.mtu.load(Ordering::Relaxed)),
        }
    }

    async fn add(&self, req: AddRequest) -> Response {
        let deadline = Instant::now() + self.add_wait;
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            // Arm the wake-up before looking, so a free address that appears in between is not missed.
            let freed = self.state.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let (r, generation) = self.state.change(|b| {
                let key = self.resolve(b, &req.key).unwrap_or_else(|| req.key.clone());
                let r = b.pool.assign(&key, unix_ms());
                if r.is_ok() && !b.pods.contains_key(&key) {
                    b.pods.insert(
                        key.clone(),
                        PodRecord {
                            key,
                            namespace: req.pod_namespace.clone(),
                            name: req.pod_name.clone(),
                            assigned_at: unix_ms(),
                            netns: Some(req.netns.clone()),
                        },
                    );
                }
                r
            });
            match r {
                Ok(lease) => {
                    drop(waiting.take());
                    self.state.wake.notify_one();
                    if let Err(e) = self.state.commit(generation).await {
                        // Not durable: give it back rather than answer with an address a restart would forget.
                        let (_, g) = self.state.change(|b| {
                            if let Some(k) = self.resolve(b, &req.key) {
                                b.pool.release(&k, 0);
                                b.pods.remove(&k);
                            }
                        });
                        let _ = self.state.commit(g).await;
                        self.state.record_error(format!("add {}: {e}", req.key.container_id));
                        return error(ErrorKind::Internal, format!("cannot record the assignment durably: {e}"));
                    }
                    return Response::Added(self.allocation(&lease));
                }
                Err(PoolError::Empty { free_later, releasing }) => {
                    let now = Instant::now();
                    if now >= deadline {
                        drop(waiting.take());
                        return self.empty_error(free_later, releasing);
                    }
                    if waiting.is_none() {
                        waiting = Some(Waiting::new(&self.state));
                    }
                    self.state.wake.notify_one();
                    // Cooldowns end by the clock, without a signal: look again at least every 250 ms.
                    let nap = (deadline - now).min(Duration::from_millis(250));
                    tokio::select! {
                        _ = freed.as_mut() => {}
                        _ = tokio::time::sleep(nap) => {}
                    }
                }
                Err(e) => return error(ErrorKind::Internal, e.to_string()),
            }
        }
    }

    fn empty_error(&self, free_later: u32, releasing: u32) -> Response {
        let st = self.state.status();
        let waited = format!("no free address after {} ms", self.add_wait.as_millis());
        let extra = if free_later + releasing > 0 {
            format!(" ({free_later} cooling, {releasing} being returned)")
        } else {
            String::new()
        };
        let (kind, why) = match (&st.waiting_for, &st.blocker) {
            (Some(w), _) => (ErrorKind::NotReady, format!("ipamd is not ready: waiting for {w}")),
            (None, Some(b)) => (b.kind(), b.message().to_string()),
            (None, None) => (ErrorKind::PoolEmpty, "the pool is still growing".to_string()),
        };
        error(kind, format!("{waited}{extra}: {why}"))
    }

    async fn del(&self, key: AttachmentKey) -> Response {
        let (found, g) = self.state.change(|b| {
            let Some(k) = self.resolve(b, &key) else { return false };
            b.pods.remove(&k);
            b.pool.release(&k, unix_ms()).is_some()
        });
        if found {
            if let Err(e) = self.state.commit(g).await {
                return error(ErrorKind::Internal, format!("cannot record the release durably: {e}"));
            }
            self.state.wake.notify_one();
        }
        Response::Released { found }
    }

    fn check(&self, key: &AttachmentKey) -> Response {
        let lease = self.state.read(|b| self.resolve(b, key).and_then(|k| b.pool.lease_of(&k)));
        match lease {
            Some(l) => Response::Checked(self.allocation(&l)),
            None => error(
                ErrorKind::UnknownAttachment,
                format!("ipamd holds no address for container {} ifname {}", key.container_id, key.ifname),
            ),
        }
    }

    fn status(&self) -> Response {
        let st = self.state.status();
        let (s, _) = self.state.change(|b| {
            b.pool.expire(unix_ms());
            b.pool.stats()
        });
        // Ready means an Add can succeed now: not with an empty pool that something blocks.
        let ready = st.ready() && !(s.free() == 0 && st.blocker.is_some());
        Response::Status(StatusReply { ready, reason: st.line(), free: s.free(), assigned: s.assigned })
    }

    async fn gc(&self, req: GcRequest) -> Response {
        let now = unix_ms();
        let mut valid_veths: std::collections::BTreeSet<String> = req
            .valid
            .iter()
            .map(|k| underway_routes::host_veth_name(&self.veth_prefix, &k.container_id, &k.ifname))
            .collect();
        // A recovered entry (a pod the store had forgotten) may belong to any network: it is
        // released only once its veth is gone from the host, never on one network's list alone.
        match crate::host::host_pods(&self.veth_prefix).await {
            Ok(pods) => valid_veths.extend(pods.into_iter().map(|(v, _)| v)),
            Err(e) => return error(ErrorKind::Internal, format!("GC cannot read the host's pod veths: {e}")),
        }
        let (released, g) = self.state.change(|b| {
            let mut out: Vec<Ipv4Addr> = b.pool.gc(&req.network, &req.valid, now);
            let stale: Vec<AttachmentKey> = b
                .pool
                .held()
                .map(|(k, _)| k)
                .filter(|k| k.network == RECOVERED && !valid_veths.contains(&k.container_id))
                .cloned()
                .collect();
            out.extend(stale.iter().filter_map(|k| b.pool.release(k, now)));
            let held: std::collections::BTreeSet<AttachmentKey> = b.pool.held().map(|(k, _)| k.clone()).collect();
            b.pods.retain(|k, _| held.contains(k));
            out
        });
        if let Err(e) = self.state.commit(g).await {
            return error(ErrorKind::Internal, format!("cannot record the GC durably: {e}"));
        }
        self.state.wake.notify_one();
        Response::Collected { released }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;
    use crate::pool::Pool;
    use crate::state::{Blocker, Status};
    use crate::store::Store;

    /// A service over an empty pool whose growth a full subnet blocks, in a temp store.
    fn service(dir: &std::path::Path) -> (Service, mpsc::Receiver<FailedAdd>) {
        let book = Book { mode: Mode::Eni, pool: Pool::new(0), pods: Default::default(), waiting: 0 };
        let status = Status {
            synced: true,
            blocker: Some(Blocker::SubnetExhausted("subnet subnet-1 has no free addresses".into())),
            ..Status::default()
        };
        let state = Arc::new(NodeState::new(Store::open(dir).unwrap(), book, status));
        let metrics = Arc::new(Metrics::new(state.clone(), Default::default(), Default::default()));
        let (tx, rx) = mpsc::channel(1);
        let svc = Service {
            state,
            metrics,
            add_wait: Duration::ZERO,
            mtu: AtomicU32::new(9001),
            veth_prefix: "uw".into(),
            events: Some(tx),
        };
        (svc, rx)
    }

    fn add(pod: Option<(&str, &str)>) -> Request {
        Request::Add(AddRequest {
            key: AttachmentKey { network: "n".into(), container_id: "c1".into(), ifname: "eth0".into() },
            netns: "/var/run/netns/x".into(),
            pod_namespace: pod.map(|p| p.0.into()),
            pod_name: pod.map(|p| p.1.into()),
        })
    }

    #[tokio::test]
    async fn a_failed_add_of_a_pod_is_passed_on_for_an_event() {
        let dir = std::env::temp_dir().join(format!("underway-service-{}", std::process::id()));
        let (svc, mut rx) = service(&dir);
        let r = svc.handle(add(Some(("shop", "cart-1")))).await;
        let Response::Error(e) = r else { panic!("{r:?}") };
        assert_eq!(e.kind, ErrorKind::SubnetExhausted);
        let f = rx.try_recv().expect("an event to publish");
        assert_eq!((f.namespace.as_str(), f.name.as_str(), f.kind), ("shop", "cart-1", ErrorKind::SubnetExhausted));
        assert_eq!(f.message, e.message);
        // Without the pod's names (a runtime that sends no CNI_ARGS) there is nothing to attach it to.
        svc.handle(add(None)).await;
        assert!(rx.try_recv().is_err());
        // A full channel drops the event; the answer still comes.
        svc.handle(add(Some(("shop", "cart-2")))).await;
        let r = svc.handle(add(Some(("shop", "cart-3")))).await;
        assert!(matches!(r, Response::Error(_)));
        assert_eq!(rx.try_recv().unwrap().name, "cart-2");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
