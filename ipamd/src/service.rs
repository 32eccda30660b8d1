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
        self.handle_from(req, std::future::pending()).await.0
    }

    /// Answers `req` for a client that may go away: `gone` resolves when it hung up, and an Add
    /// still waiting for an address then stops. Also returns, for an Add that made a new
    /// assignment, its key: the caller gives it back ([`Service::undo_add`]) when the answer
    /// cannot be delivered (issue 14, item 5).
    pub async fn handle_from(
        &self,
        req: Request,
        gone: impl std::future::Future<Output = ()>,
    ) -> (Response, Option<AttachmentKey>) {
        match req {
            Request::Add(a) => {
                let t = Instant::now();
                // The pod's names are copied only when an Event could use them.
                let pod = self.events.as_ref().and_then(|_| a.pod_namespace.clone().zip(a.pod_name.clone()));
                let (r, created) = self.add(a, gone).await;
                if let (Response::Error(e), Some((namespace, name)), Some(tx)) = (&r, pod, &self.events) {
                    // Full channel: the Event is dropped, never the answer delayed.
                    let _ = tx.try_send(FailedAdd { namespace, name, kind: e.kind, message: e.message.clone() });
                }
                self.metrics.observe_add(t.elapsed(), matches!(r, Response::Added(_)));
                (r, created)
            }
            Request::Del(k) => (self.del(k).await, None),
            Request::Check(k) => (self.check(&k), None),
            Request::Status => (self.status(), None),
            Request::Gc(g) => (self.gc(g).await, None),
        }
    }

    /// Gives back an assignment an Add made whose answer never reached its client (so no pod can
    /// be using it): free again at once, no cooldown.
    pub async fn undo_add(&self, key: &AttachmentKey) {
        let (undone, g) = self.state.change(|b| {
            b.pods.remove(key);
            let a = b.pool.release(key, 0);
            // Its cooldown ended long ago: free now.
            b.pool.expire(unix_ms());
            a
        });
        let Some(address) = undone else { return };
        self.metrics.add_undone();
        if let Err(e) = self.state.commit(g).await {
            tracing::warn!("undo of an unanswered add: {e}");
        }
        self.state.wake.notify_one();
        self.state.record_error(format!(
            "add of container {} ({address}) undone: the CNI binary went away before the answer reached it",
            key.container_id
        ));
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
            eni: l.eni().map(str::to_string),
            mtu: Some(self.mtu.load(Ordering::Relaxed)),
        }
    }

    async fn add(
        &self,
        req: AddRequest,
        gone: impl std::future::Future<Output = ()>,
    ) -> (Response, Option<AttachmentKey>) {
        let deadline = Instant::now() + self.add_wait;
        let mut waiting: Option<Waiting<'_>> = None;
        tokio::pin!(gone);
        loop {
            // Arm the wake-up before looking, so a free address that appears in between is not missed.
            let freed = self.state.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let ((r, created), generation) = self.state.change(|b| {
                let key = self.resolve(b, &req.key).unwrap_or_else(|| req.key.clone());
                let existed = b.pool.lease_of(&key).is_some();
                let r = b.pool.assign(&key, unix_ms());
                let created = (r.is_ok() && !existed).then(|| key.clone());
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
                (r, created)
            });
            match r {
                Ok(lease) => {
                    drop(waiting.take());
                    self.state.wake.notify_one();
                    if let Err(e) = self.state.commit(generation).await {
                        // Not durable: give it back rather than answer with an address a restart would forget.
                        let (_, g) = self.state.change(|b| {
                            if let Some(k) = self.resolve(b, &req.key) {
                                // Never used by a pod: free at once (its cooldown ended long ago).
                                b.pool.release(&k, 0);
                                b.pool.expire(unix_ms());
                                b.pods.remove(&k);
                            }
                        });
                        let _ = self.state.commit(g).await;
                        self.state.record_error(format!("add {}: {e}", req.key.container_id));
                        let r = error(ErrorKind::Internal, format!("cannot record the assignment durably: {e}"));
                        return (r, None);
                    }
                    return (Response::Added(self.allocation(&lease)), created);
                }
                Err(PoolError::Empty { free_later, releasing }) => {
                    let now = Instant::now();
                    if now >= deadline {
                        drop(waiting.take());
                        return (self.empty_error(free_later, releasing), None);
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
                        _ = gone.as_mut() => {
                            // Nobody to answer: stop waiting (and stop counting as demand).
                            return (error(ErrorKind::Internal, "the CNI binary went away while waiting"), None);
                        }
                    }
                }
                Err(e) => return (error(ErrorKind::Internal, e.to_string()), None),
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
            (None, None) => (ErrorKind::PoolEmpty, self.growing(crate::clock::unix_ms())),
        };
        error(kind, format!("{waited}{extra}: {why}"))
    }

    /// Why an empty pool with no blocker is still empty: its growth is under way (what the
    /// reconciler last said was, e.g. an ENI waiting for its link), and the reconciler's last
    /// failure during this Add's wait or as long before it (a throttled or failed EC2 call, say)
    /// when there was one. "Still growing" alone gave no reason. `now` in Unix ms.
    fn growing(&self, now: u64) -> String {
        let growing = match self.state.status().growing {
            Some(g) => format!("the pool is still growing ({g})"),
            None => "the pool is still growing".to_string(),
        };
        let since = now.saturating_sub(2 * self.add_wait.as_millis() as u64);
        // The reconciler's own (its steps and syncs), not the other tasks' that share the list.
        let reconciler = |w: &str| w.starts_with("reconcile: ") || w.starts_with("sync with the cloud: ");
        match self.state.errors().into_iter().rev().find(|e| e.at_ms >= since && reconciler(&e.what)) {
            Some(e) => format!(
                "{growing}; the reconciler's last failure, {:.1} s ago: {}",
                now.saturating_sub(e.at_ms) as f64 / 1000.0,
                e.what
            ),
            None => growing,
        }
    }

    async fn del(&self, key: AttachmentKey) -> Response {
        // The CNI binary removed the veth before calling: remember it, so that a host check
        // reading the host before that cannot bring the pod back as "recovered".
        let veth = underway_routes::host_veth_name(&self.veth_prefix, &key.container_id, &key.ifname);
        let (found, g) = self.state.change(|b| {
            b.deleted_veths.insert(veth);
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
        let book = Book {
            mode: Mode::Eni,
            pool: Pool::new(0),
            pods: Default::default(),
            waiting: 0,
            deleted_veths: Default::default(),
        };
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

    /// An Add that times out on an empty pool with no blocker names what is under way and the
    /// reconciler's last failure within twice its wait ("the pool is still growing" alone gave
    /// no reason); another task's failure, or an older one, is not named. The window is checked
    /// at chosen times (no sleeps); one Add checks the reason reaches its answer.
    #[tokio::test]
    async fn an_add_that_times_out_while_the_pool_grows_names_the_last_failure() {
        let dir = std::env::temp_dir().join(format!("underway-service-growing-{}", std::process::id()));
        let (mut svc, _rx) = service(&dir);
        svc.add_wait = Duration::from_secs(1);
        svc.state.set_status(|s| s.blocker = None);
        let last = |svc: &Service| svc.state.errors().last().unwrap().at_ms;
        assert_eq!(svc.growing(crate::clock::unix_ms()), "the pool is still growing");
        svc.state.record_error("egress: reading the VPC's CIDR blocks: timed out");
        assert_eq!(svc.growing(last(&svc)), "the pool is still growing", "another task's failure");
        svc.state.record_error("reconcile: AssignPrivateIpAddresses: throttled by the cloud (RequestLimitExceeded)");
        let at = last(&svc);
        let named = svc.growing(at + 2_000);
        assert_eq!(
            named,
            "the pool is still growing; the reconciler's last failure, 2.0 s ago: \
             reconcile: AssignPrivateIpAddresses: throttled by the cloud (RequestLimitExceeded)"
        );
        assert_eq!(svc.growing(at + 2_001), "the pool is still growing", "older than twice the wait");
        svc.state.set_status(|s| s.growing = Some("eni-1 at device 2 waiting for its link for 3 s".into()));
        assert_eq!(
            svc.growing(at + 3_000),
            "the pool is still growing (eni-1 at device 2 waiting for its link for 3 s)"
        );
        // The Add's answer carries it.
        svc.add_wait = Duration::from_millis(50);
        let Response::Error(e) = svc.handle(add(None)).await else { panic!("an empty pool") };
        assert_eq!(e.kind, ErrorKind::PoolEmpty);
        assert!(
            e.message.starts_with("no free address after 50 ms: the pool is still growing (eni-1"),
            "{}",
            e.message
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn held(svc: &Service) -> usize {
        svc.state.read(|b| b.pool.held().count())
    }

    /// Issue 14, item 5: a CNI binary that dies (or gives up) while its Add waits for an address
    /// must not leave an assignment no pod will ever use or release.
    #[tokio::test]
    async fn an_add_whose_client_hung_up_while_waiting_takes_nothing() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("underway-service-gone-{}", std::process::id()));
        let (mut svc, _rx) = service(&dir);
        svc.add_wait = Duration::from_secs(20);
        svc.state.set_status(|s| s.blocker = None);
        let svc = Arc::new(svc);
        let sock = dir.join("ipamd.sock");
        let listener = crate::server::bind(&sock).unwrap();
        let guard = crate::server::Guard { read_timeout: Duration::from_secs(5) };
        let server = tokio::spawn(crate::server::serve(listener, svc.clone(), guard));
        let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        client.write_all(underway_api::encode(&add(None)).as_bytes()).unwrap();
        // The Add is waiting (the pool is empty) when its client goes away.
        while svc.state.read(|b| b.waiting) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(client);
        tokio::time::sleep(Duration::from_millis(100)).await;
        svc.state.change(|b| {
            b.pool.add_eni("eni-0", 0, None);
            b.pool.add_addresses("eni-0", &["10.0.0.5".parse().unwrap()]).unwrap();
        });
        svc.state.freed.notify_waiters();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(held(&svc), 0, "nothing assigned for a client that is gone");
        assert_eq!(svc.state.read(|b| b.waiting), 0, "no longer counted as demand");
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An answer that could not be delivered is undone, but only for an assignment that Add made:
    /// a repeated Add of a pod that already holds its address returns nothing to undo.
    #[tokio::test]
    async fn only_a_new_assignment_is_offered_for_undoing() {
        let dir = std::env::temp_dir().join(format!("underway-service-undo-{}", std::process::id()));
        let (svc, _rx) = service(&dir);
        svc.state.change(|b| {
            b.pool.add_eni("eni-0", 0, None);
            b.pool.add_addresses("eni-0", &["10.0.0.5".parse().unwrap()]).unwrap();
        });
        let (r, created) = svc.handle_from(add(None), std::future::pending()).await;
        assert!(matches!(r, Response::Added(_)), "{r:?}");
        let key = created.expect("a new assignment");
        let (r, again) = svc.handle_from(add(None), std::future::pending()).await;
        assert!(matches!(r, Response::Added(_)) && again.is_none(), "the same pod again: nothing to undo");
        svc.undo_add(&key).await;
        assert_eq!(held(&svc), 0);
        assert!(svc.state.read(|b| b.pool.is_free("10.0.0.5".parse().unwrap()) && b.pods.is_empty()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Issue 14, torture: the state directory's disk is full. Add fails with a clear error and
    /// leaves nothing behind (the address is free again, no pod recorded); once space is freed,
    /// the next Add succeeds without a restart. Once the store's file exists, a full disk no
    /// longer stops Adds: saves overwrite its preallocated slots. A real tmpfs of 1 MiB (needs root).
    #[tokio::test]
    async fn a_full_disk_fails_add_cleanly_and_recovers_when_space_returns() {
        let dir = std::env::temp_dir().join(format!("underway-diskfull-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount a tmpfs (root needed)");
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _u = Unmount(dir.clone());
        let state_dir = dir.join("state");
        let (svc, _rx) = service(&state_dir);
        svc.state.set_status(|s| s.blocker = None);
        svc.state.change(|b| {
            b.pool.add_eni("eni-0", 0, None);
            b.pool.add_addresses("eni-0", &["10.0.0.5".parse().unwrap()]).unwrap();
        });
        // Fill the disk.
        let filler = dir.join("filler");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&filler).unwrap();
            while f.write_all(&[0u8; 4096]).is_ok() {}
            let _ = f.sync_all();
        }
        let r = svc.handle(add(None)).await;
        let Response::Error(e) = r else { panic!("{r:?}") };
        assert_eq!(e.kind, ErrorKind::Internal);
        assert!(
            e.message.contains("cannot record the assignment durably") && e.message.contains("No space left"),
            "{}",
            e.message
        );
        assert_eq!(held(&svc), 0, "no assignment kept");
        assert!(svc.state.read(|b| b.pods.is_empty() && b.pool.is_free("10.0.0.5".parse().unwrap())));
        let names: Vec<_> = std::fs::read_dir(&state_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(!names.iter().any(|n| n.to_string_lossy().ends_with(".tmp")), "no partial file left: {names:?}");
        // Space again: the same Add succeeds, durably.
        std::fs::remove_file(&filler).unwrap();
        let r = svc.handle(add(None)).await;
        assert!(matches!(r, Response::Added(_)), "{r:?}");
        match crate::store::Store::open(&state_dir).unwrap().load().unwrap() {
            crate::store::Loaded::Ok(s) => assert_eq!(s.pods.len(), 1),
            other => panic!("{other:?}"),
        }
        // Full again: the next pod's Add is recorded in place, in the file's other slot.
        svc.state.change(|b| b.pool.add_addresses("eni-0", &["10.0.0.6".parse().unwrap()]).unwrap());
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&filler).unwrap();
            while f.write_all(&[0u8; 4096]).is_ok() {}
            let _ = f.sync_all();
        }
        let mut second = add(None);
        if let Request::Add(a) = &mut second {
            a.key.container_id = "c2".into();
        }
        let r = svc.handle(second).await;
        assert!(matches!(r, Response::Added(_)), "{r:?}");
        match crate::store::Store::open(&state_dir).unwrap().load().unwrap() {
            crate::store::Loaded::Ok(s) => assert_eq!(s.pods.len(), 2),
            other => panic!("{other:?}"),
        }
    }
}
