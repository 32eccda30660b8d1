//! The node's state shared by the RPC server, the reconciler and the HTTP endpoints: the pool and
//! its pod records behind one lock, a generation counter for durability (group commit), the
//! status line, and the recent errors.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::sync::Notify;
use underway_api::AttachmentKey;

use crate::error::Result;
use crate::pool::Pool;
use crate::store::{PodRecord, Snapshot, Store};

/// The pool and who holds what, changed only under the lock.
#[derive(Debug)]
pub struct Book {
    /// The mode the pool's addresses come from (recorded in the store).
    pub mode: crate::config::Mode,
    pub pool: Pool,
    pub pods: BTreeMap<AttachmentKey, PodRecord>,
    /// Adds waiting for an address right now (the reconciler counts them as demand).
    pub waiting: u32,
    /// Host veths of pods whose DEL was answered: a host check that read the host before the DEL
    /// must not mark their addresses held again (issue 14: found by the kill storm).
    pub deleted_veths: Tombstones,
}

/// The last [`Tombstones::KEEP`] host veth names whose pod was deleted (names are unique per
/// container, so a name once deleted never belongs to a new pod).
#[derive(Debug, Default)]
pub struct Tombstones {
    order: std::collections::VecDeque<String>,
    set: std::collections::BTreeSet<String>,
}

impl Tombstones {
    pub const KEEP: usize = 4096;

    pub fn insert(&mut self, veth: String) {
        if self.set.insert(veth.clone()) {
            self.order.push_back(veth);
            if self.order.len() > Self::KEEP
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }

    pub fn contains(&self, veth: &str) -> bool {
        self.set.contains(veth)
    }
}

impl Book {
    /// Takes `mode` as the pool's mode. A store of the other mode is dropped when no pod holds
    /// one of its addresses (returns what was done) and refused while pods do: switching a
    /// node's mode needs a drain.
    pub fn adopt(&mut self, mode: crate::config::Mode, cooldown_ms: u64) -> Result<Option<String>, String> {
        if self.mode == mode {
            return Ok(None);
        }
        let held = self.pool.held().count();
        if held > 0 {
            return Err(format!(
                "this node holds {held} pod addresses in {:?} mode; switching it to {mode:?} while pods hold \
                 addresses is refused: drain the node (or delete its pods) first",
                self.mode
            ));
        }
        let was = self.mode;
        *self = Book {
            mode,
            pool: crate::pool::Pool::new(cooldown_ms),
            pods: Default::default(),
            waiting: self.waiting,
            deleted_veths: Default::default(),
        };
        Ok(Some(format!("the store was in {was:?} mode with no pods; starting afresh")))
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            mode: Some(self.mode),
            enis: self.pool.blocks().cloned().collect(),
            pods: self.pods.values().cloned().collect(),
        }
    }
}

/// Why the pool cannot grow right now (what a failed Add reports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum Blocker {
    NotReady(String),
    SubnetExhausted(String),
    EniLimitReached(String),
    Throttled(String),
    RouteTableFull(String),
    /// Another owner's route for this node's pod CIDR (never overwritten).
    RouteConflict(String),
    Cloud(String),
}

impl Blocker {
    /// The kind a failed Add (and its pod's Event) reports for this blocker: the one place the
    /// two are matched.
    pub fn kind(&self) -> underway_api::ErrorKind {
        use underway_api::ErrorKind;
        match self {
            Blocker::NotReady(_) => ErrorKind::NotReady,
            Blocker::SubnetExhausted(_) => ErrorKind::SubnetExhausted,
            Blocker::EniLimitReached(_) => ErrorKind::EniLimitReached,
            Blocker::Throttled(_) => ErrorKind::Throttled,
            Blocker::RouteTableFull(_) => ErrorKind::RouteTableFull,
            Blocker::RouteConflict(_) => ErrorKind::RouteConflict,
            Blocker::Cloud(_) => ErrorKind::PoolEmpty,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Blocker::NotReady(m)
            | Blocker::SubnetExhausted(m)
            | Blocker::EniLimitReached(m)
            | Blocker::Throttled(m)
            | Blocker::RouteTableFull(m)
            | Blocker::RouteConflict(m)
            | Blocker::Cloud(m) => m,
        }
    }
}

/// What ipamd is doing, in one line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// The pool was reconciled with the cloud at least once.
    pub synced: bool,
    /// The pool came from a valid store (Adds are served from it before the cloud answers).
    pub from_store: bool,
    /// What start-up still waits for.
    pub waiting_for: Option<String>,
    /// What keeps the pool from reaching its target.
    pub blocker: Option<Blocker>,
    /// Growth under way that an Add may be waiting for (ENIs attached, their links not up yet).
    pub growing: Option<String>,
}

impl Status {
    pub fn ready(&self) -> bool {
        self.synced || self.from_store
    }

    pub fn line(&self) -> String {
        match (&self.waiting_for, &self.blocker) {
            (Some(w), _) => format!("waiting for {w}"),
            (None, Some(b)) => b.message().to_string(),
            (None, None) if self.synced => "serving".into(),
            (None, None) => "starting".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorEntry {
    pub at_ms: u64,
    pub what: String,
}

const ERRORS_KEPT: usize = 32;

pub struct NodeState {
    book: Mutex<Book>,
    generation: AtomicU64,
    durable: AtomicU64,
    write: std::sync::Arc<tokio::sync::Mutex<()>>,
    store: Store,
    status: Mutex<Status>,
    errors: Mutex<VecDeque<ErrorEntry>>,
    /// Signalled when free addresses may have appeared (Adds waiting for one wake up).
    pub freed: Notify,
    /// Signalled when the pool may need the reconciler.
    pub wake: Notify,
    /// When the reconciler last finished a sync attempt or a step (unix ms); 0 until it runs.
    progress: AtomicU64,
}

/// Whether the reconciler is alive: never started (start-up still waits, which readiness
/// reports), or it finished something within `bound_ms`.
pub fn healthy(progress_ms: u64, now_ms: u64, bound_ms: u64) -> Result<(), String> {
    if progress_ms == 0 || now_ms.saturating_sub(progress_ms) <= bound_ms {
        Ok(())
    } else {
        Err(format!(
            "the reconciler has not finished a step for {} s (bound {} s): stalled or dead",
            (now_ms - progress_ms) / 1000,
            bound_ms / 1000
        ))
    }
}

impl std::fmt::Debug for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeState")
    }
}

impl NodeState {
    pub fn new(store: Store, book: Book, status: Status) -> Self {
        NodeState {
            book: Mutex::new(book),
            generation: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            write: std::sync::Arc::new(tokio::sync::Mutex::new(())),
            store,
            status: Mutex::new(status),
            errors: Mutex::new(VecDeque::new()),
            freed: Notify::new(),
            wake: Notify::new(),
            progress: AtomicU64::new(0),
        }
    }

    /// The reconciler finished a sync attempt or a step.
    pub fn touch(&self) {
        self.progress.store(crate::clock::unix_ms().max(1), Ordering::Relaxed);
    }

    /// When the reconciler last made progress (unix ms; 0 before it ran).
    pub fn progress_ms(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }

    /// Reads the book.
    pub fn read<R>(&self, f: impl FnOnce(&Book) -> R) -> R {
        f(&self.book.lock().expect("book lock"))
    }

    /// Changes the book; returns the result and the generation to [`commit`](Self::commit).
    pub fn change<R>(&self, f: impl FnOnce(&mut Book) -> R) -> (R, u64) {
        let mut b = self.book.lock().expect("book lock");
        let r = f(&mut b);
        let g = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        (r, g)
    }

    /// Returns once generation `g` (and every earlier one) is on disk. Concurrent callers share
    /// one write: whoever takes the lock first saves the latest state, covering the others.
    pub async fn commit(&self, g: u64) -> Result<()> {
        if self.durable.load(Ordering::SeqCst) >= g {
            return Ok(());
        }
        // Owned, and moved into the blocking save: a commit whose future is dropped (a task
        // aborted at shutdown, a timeout) keeps the lock until its save is done, so a later
        // commit's newer snapshot cannot land before this older one and be overwritten by it.
        let w = self.write.clone().lock_owned().await;
        if self.durable.load(Ordering::SeqCst) >= g {
            return Ok(());
        }
        let (snap, at) = {
            let b = self.book.lock().expect("book lock");
            (b.snapshot(), self.generation.load(Ordering::SeqCst))
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let _w = w;
            store.save(&snap)
        })
        .await
        .map_err(|e| crate::error::IpamdError::Store { path: "spawn".into(), reason: e.to_string() })??;
        self.durable.fetch_max(at, Ordering::SeqCst);
        Ok(())
    }

    /// Saves now whatever the book holds.
    pub async fn flush(&self) -> Result<()> {
        self.commit(self.generation.load(Ordering::SeqCst).max(1)).await
    }

    pub fn status(&self) -> Status {
        self.status.lock().expect("status lock").clone()
    }

    pub fn set_status(&self, f: impl FnOnce(&mut Status)) {
        let mut s = self.status.lock().expect("status lock");
        f(&mut s);
    }

    pub fn record_error(&self, what: impl Into<String>) {
        let what = what.into();
        tracing::warn!("{what}");
        let mut e = self.errors.lock().expect("errors lock");
        if e.len() == ERRORS_KEPT {
            e.pop_front();
        }
        e.push_back(ErrorEntry { at_ms: crate::clock::unix_ms(), what });
    }

    pub fn errors(&self) -> Vec<ErrorEntry> {
        self.errors.lock().expect("errors lock").iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;

    fn book(mode: Mode, held: bool) -> Book {
        let mut pool = Pool::new(0);
        pool.add_eni("eni-0", 0, None);
        pool.add_addresses("eni-0", &["10.0.0.5".parse().unwrap()]).unwrap();
        if held {
            let key = AttachmentKey { network: "n".into(), container_id: "c".into(), ifname: "eth0".into() };
            pool.assign(&key, 0).unwrap();
        }
        Book { mode, pool, pods: Default::default(), waiting: 0, deleted_veths: Default::default() }
    }

    #[test]
    fn adopting_a_mode() {
        let mut b = book(Mode::Eni, true);
        assert_eq!(b.adopt(Mode::Eni, 0), Ok(None), "same mode: kept");
        assert_eq!(b.pool.held().count(), 1);
        let e = b.adopt(Mode::VpcRoute, 0).unwrap_err();
        assert!(e.contains("holds 1 pod addresses in Eni mode") && e.contains("drain"), "{e}");
        assert_eq!((b.mode, b.pool.held().count()), (Mode::Eni, 1), "a refused switch changes nothing");
        let mut b = book(Mode::Eni, false);
        assert!(b.adopt(Mode::VpcRoute, 0).unwrap().unwrap().contains("starting afresh"));
        assert_eq!((b.mode, b.pool.blocks().count()), (Mode::VpcRoute, 0), "no pods: the other mode's pool is dropped");
    }
}

#[cfg(test)]
mod commit_tests {
    use super::*;
    use crate::config::Mode;

    /// A commit whose future is dropped while its save runs (shutdown aborts tasks) must not let
    /// a later commit's newer snapshot be overwritten by the older one: found by reading, the
    /// lock was released with the future while the blocking save went on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_commit_cannot_overwrite_a_later_one() {
        let dir = std::env::temp_dir().join(format!("underway-commit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // A large pool: its snapshot takes a while to serialise inside the blocking save.
        let mut pool = Pool::new(0);
        pool.add_eni("eni-0", 0, None);
        let ips: Vec<std::net::Ipv4Addr> = (0..200_000u32).map(|i| std::net::Ipv4Addr::from(0x0a00_0000 + i)).collect();
        pool.add_addresses("eni-0", &ips).unwrap();
        let book =
            Book { mode: Mode::Eni, pool, pods: Default::default(), waiting: 0, deleted_veths: Default::default() };
        let state = NodeState::new(Store::open(&dir).unwrap(), book, Status::default());
        let (_, g1) = state.change(|_| ());
        // Dropped after its first poll, which handed the large snapshot to the blocking save.
        let mut first = Box::pin(state.commit(g1));
        assert!(futures::poll!(&mut first).is_pending(), "the save is under way");
        drop(first);
        // A newer book, small: its save is quick.
        let (_, g2) = state.change(|b| {
            b.pool = Pool::new(0);
            b.pool.add_eni("eni-1", 1, Some(101));
        });
        state.commit(g2).await.unwrap();
        // Let the dropped save finish, whatever it does.
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        match Store::open(&dir).unwrap().load().unwrap() {
            crate::store::Loaded::Ok(s) => {
                let ids: Vec<&str> = s.enis.iter().map(|e| e.id.as_str()).collect();
                assert_eq!(ids, vec!["eni-1"], "the newer snapshot is the one on disk");
            }
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod health_tests {
    use super::healthy;

    #[test]
    fn health_is_progress_within_the_bound() {
        let cases = [
            (0, 1_000_000, 60_000, true),
            (1_000_000, 1_030_000, 60_000, true),
            (1_000_000, 1_060_000, 60_000, true),
            (1_000_000, 1_060_001, 60_000, false),
            (1_000_000, 900_000, 60_000, true),
        ];
        for (progress, now, bound, ok) in cases {
            assert_eq!(healthy(progress, now, bound).is_ok(), ok, "{progress} {now} {bound}");
        }
        assert!(healthy(1_000, 601_000, 300_000).unwrap_err().contains("600 s"));
    }
}
