//! The rate budget: one token bucket per API class, shared by every call this process makes.
//!
//! EC2 meters mutating and describe calls in separate buckets per account (mutating: 5 tokens/s
//! refill, bucket of 50). Every node of a cluster spends from the same account, so a node's default
//! budget stays well below that. The bucket is a small piece of arithmetic over `tokio::time`, so
//! tests drive it with tokio's paused clock instead of the wall clock.

use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Which EC2 bucket a call draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiClass {
    Mutating,
    Describe,
}

/// Refill rate and burst of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// Tokens added per second.
    pub qps: f64,
    /// Bucket size: how many calls may go at once after a quiet spell.
    pub burst: u32,
}

/// The budget for both classes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    pub mutating: BucketConfig,
    pub describe: BucketConfig,
    /// Adapt each bucket's rate to the account's (AIMD): halve it, and drop the saved burst, on
    /// every throttled answer; add a twentieth of the configured rate back on every answered
    /// call, never above it. Every node spends from one account's budget, and thousands of
    /// fixed per-node rates sum far above its refill (issue 17; the simulator's figures are in
    /// docs/benchmarks.md). Off by default: under the fault test's random throttling (30 % of
    /// calls, whatever the rate) it drove a node's describe rate to its floor and the node's Adds
    /// past their wait; a random throttle is not a full bucket, and AIMD cannot tell them apart.
    pub adaptive: bool,
    /// How many nodes spend from the account (the cluster's size, or more when other clusters
    /// or tools share it). When set, a throttled answer drops its class (and a throttled
    /// describe the mutating class too) to this node's share of the account's refill
    /// (`account`), its next token at the node's phase of one share's interval (drawn once,
    /// the same for both classes, so a node's describes come before its mutating call in the
    /// same order across the cluster; a call throttled at its share gets its token back within
    /// a quarter interval, up to three in a row, then a new random phase);
    /// once the account has not
    /// throttled the class for 30 share intervals (10 minutes to 4 hours), each answered call
    /// raises the rate by 5 % up to the configured one. A node that is never throttled keeps its
    /// configured rate. In a wave of thousands of nodes, a fixed or halving rate cannot learn
    /// its share from the handful of mutating calls each node makes. Measured in the simulator
    /// (docs/benchmarks.md). Unset here, ipamd's Kubernetes side sets it from the cluster's
    /// Node count (`kubernetes.node_count_interval_ms`); standalone, nothing does.
    pub share_of: Option<u32>,
    /// The account's refill rates the share is taken from (EC2's defaults: 5 mutating and 20
    /// describe calls per second).
    pub account: AccountRates,
}

/// An account's refill rates per class (calls per second).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccountRates {
    pub mutating_qps: f64,
    pub describe_qps: f64,
}

impl Default for AccountRates {
    fn default() -> Self {
        AccountRates { mutating_qps: 5.0, describe_qps: 20.0 }
    }
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            mutating: BucketConfig { qps: 2.0, burst: 10 },
            describe: BucketConfig { qps: 5.0, burst: 20 },
            adaptive: false,
            share_of: None,
            account: AccountRates::default(),
        }
    }
}

impl BudgetConfig {
    /// Refuses buckets that could never hand out a token; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, b) in [("mutating", &self.mutating), ("describe", &self.describe)] {
            if !(b.qps.is_finite() && b.qps > 0.0) {
                return Err(format!("rate_budget.{name}.qps must be a positive number, got {}", b.qps));
            }
            if b.burst == 0 {
                return Err(format!("rate_budget.{name}.burst must be at least 1"));
            }
        }
        if self.adaptive && self.share_of.is_some() {
            return Err("rate_budget.adaptive and rate_budget.share_of are two policies: set one".into());
        }
        if self.share_of == Some(0) {
            return Err("rate_budget.share_of must be at least 1 (the nodes spending from the account)".into());
        }
        for (name, q) in [("mutating_qps", self.account.mutating_qps), ("describe_qps", self.account.describe_qps)] {
            if !(q.is_finite() && q > 0.0) {
                return Err(format!("rate_budget.account.{name} must be a positive number, got {q}"));
            }
        }
        Ok(())
    }
}

/// A token bucket. Waiters reserve their token at once (the balance may go negative), so calls are
/// served in arrival order and nobody starves.
#[derive(Debug)]
pub struct TokenBucket {
    cfg: BucketConfig,
    adaptive: bool,
    /// Where in one share interval the next token comes when the bucket drops to its share
    /// (0 to 1): drawn once per node and the same for both classes ([`RateBudget`]).
    phase: f64,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    level: f64,
    at: Instant,
    /// The rate now (the configured one unless adapted down).
    qps: f64,
    /// This node's share of the account's refill (calls per second), when the budget shares.
    share: Option<f64>,
    /// When the account last throttled this class (sharing budgets: the rate stays at the share
    /// until [`QUIET`] has passed since).
    throttled_at: Option<Instant>,
    /// Throttled answers in a row (fixed buckets: how far the next token is pushed back).
    throttles: u32,
    /// Whether a token was taken since the last drop to the share (or one was still waiting to
    /// be used when it came): a throttled answer before one was is a call sent before the drop,
    /// which the drop already answered.
    reserved_since_drop: bool,
    /// Calls throttled at the share that got their token back since a call was last answered:
    /// after [`GIVE_BACKS`] of them, a new phase (a give-back per throttle would let a node
    /// retry at several times its share for as long as the account stays busy).
    gave_back: u8,
}

/// A fixed bucket (neither adaptive nor sharing) pushes its next token back after each
/// throttled answer, by this much doubled per throttle in a row (with jitter, up to
/// [`BACKOFF_MAX`]); each answered call takes one doubling back. The node backs off as a whole: every
/// call and step of the class waits, where each call's own retries used to start again from
/// the call's first delay (the simulated 1,000-node wave without a share: 251 mutating
/// attempts per node, 95 % throttled; docs/benchmarks.md).
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How many calls throttled at the share in a row get their token back (within a quarter
/// interval) before the next gets a new phase. Unbounded, a node throttled on every try would
/// retry at about eight times its share while the account stayed busy; bounded at 1 or 2 (the
/// second within a whole interval), the simulated 5,000-node wave's last node came at
/// 1.24–1.26× the floor; at 3, 1.18× (unbounded: 1.14–1.16×).
const GIVE_BACKS: u8 = 3;

/// The lowest an adaptive rate goes, as a share of the configured one. Lower floors made the
/// simulator's 100-node wave slower, not calmer: a reservation at a tiny rate waits past the
/// call's deadline (0.0005: 4.8× the account's floor; 0.02: 1.54×; docs/benchmarks.md).
const MIN_SHARE: f64 = 0.02;

/// How long a sharing bucket stays at its share after the account's last throttle before its
/// rate rises again (×1.05 per answered call, up to the configured rate): this many of the
/// share's intervals, within [`QUIET_MIN`, `QUIET_MAX`]. Rising at once after each answer put
/// nodes above their share mid-wave, and the throttles that followed fell on the nodes still
/// waiting: the simulated 1,000-node wave's last node came at 2.0× the floor; staying at the
/// share, at 1.43× with no mutating call throttled; rising again after a fixed 10 quiet minutes
/// (shorter than that wave), at 2.1× (docs/benchmarks.md). A wave takes a node ~10 calls, each
/// one share interval apart; after it, a quiet account lets the rate come back.
const QUIET_INTERVALS: f64 = 30.0;
const QUIET_MIN: Duration = Duration::from_secs(600);
const QUIET_MAX: Duration = Duration::from_secs(4 * 3600);

impl TokenBucket {
    pub fn new(cfg: BucketConfig) -> Self {
        Self::with_adaptation(cfg, false)
    }

    pub fn with_adaptation(cfg: BucketConfig, adaptive: bool) -> Self {
        let state = BucketState {
            level: f64::from(cfg.burst),
            at: Instant::now(),
            qps: cfg.qps,
            share: None,
            throttled_at: None,
            throttles: 0,
            reserved_since_drop: true,
            gave_back: 0,
        };
        TokenBucket { cfg, adaptive, phase: fastrand::f64(), state: Mutex::new(state) }
    }

    /// Makes the bucket share the account (see [`BudgetConfig::share_of`]), or changes its share
    /// (the cluster grew or shrank): the rate comes down to it at the account's first throttle;
    /// a rate already below it (an earlier, smaller share) rises.
    pub fn set_share(&self, share: f64) {
        let mut st = self.state.lock().expect("bucket lock");
        self.refill(&mut st);
        let share = share.min(self.cfg.qps);
        st.share = Some(share);
        st.qps = st.qps.max(share);
    }

    /// Down to the share (never up to it), the saved burst dropped, and the next token at the
    /// node's phase of one share's interval: the nodes a wave throttled together come back
    /// spread over it instead of together. A bucket already at its share with less than a
    /// whole token saved is left alone: the token under way keeps its time.
    ///
    /// Within one interval, not one to two (an idle first interval cost prefix mode, one
    /// mutating call per node, a whole floor: the simulated 5,000-node wave took 2.19× it). That
    /// works because the phase is the node's, not the class's: a node's describe comes at the
    /// same fraction of the (four times shorter) describe interval, so before its mutating
    /// token, and the mutating calls come spread as the phases are. With a phase per class
    /// the calls of the nodes whose describes came late bunched (5,000 nodes: 2.6×, 24 % of
    /// mutating calls throttled); re-phasing a token under way on each throttled describe set
    /// the unlucky nodes back an interval each time (docs/benchmarks.md).
    fn to_share(&self, st: &mut BucketState, share: f64) {
        if st.qps > share || st.level > 1.0 {
            // Calls already sent when the drop comes are answered by it; a call still waiting
            // for its token (the level below 0) will be sent after, and its throttle is news.
            st.reserved_since_drop = st.level < 0.0;
            st.qps = st.qps.min(share);
            st.level = st.level.min(1.0) - self.phase;
        }
        st.throttled_at = Some(Instant::now());
    }

    fn refill(&self, st: &mut BucketState) {
        let now = Instant::now();
        st.level =
            (st.level + now.saturating_duration_since(st.at).as_secs_f64() * st.qps).min(f64::from(self.cfg.burst));
        st.at = now;
    }

    /// Takes one token and says how long the caller must wait before using it.
    pub fn reserve(&self) -> Duration {
        let mut st = self.state.lock().expect("bucket lock");
        self.refill(&mut st);
        st.level -= 1.0;
        st.reserved_since_drop = true;
        if st.level >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-st.level / st.qps) }
    }

    /// [`Self::reserve`], unless the wait would be longer than `max`: then nothing is taken.
    pub fn reserve_within(&self, max: Duration) -> Option<Duration> {
        let mut st = self.state.lock().expect("bucket lock");
        self.refill(&mut st);
        let wait = if st.level >= 1.0 { Duration::ZERO } else { Duration::from_secs_f64((1.0 - st.level) / st.qps) };
        if wait > max {
            return None;
        }
        st.level -= 1.0;
        st.reserved_since_drop = true;
        Some(wait)
    }

    /// What the cloud answered a call that used a token.
    pub fn observe(&self, throttled: bool) {
        let mut st = self.state.lock().expect("bucket lock");
        self.refill(&mut st);
        if !self.adaptive && st.share.is_none() {
            if !throttled {
                st.throttles = st.throttles.saturating_sub(1);
                return;
            }
            // Half the doubled delay, plus up to half again at random.
            let d = BACKOFF_FIRST.mul_f64(2f64.powi(st.throttles.min(16) as i32)).min(BACKOFF_MAX);
            let d = d.mul_f64(0.5 + 0.5 * fastrand::f64());
            st.throttles = st.throttles.saturating_add(1);
            // The longer of this push and what is already pending, not their sum: calls that
            // reserved before an earlier throttle was heard come back throttled too, and would
            // otherwise stack their pushes far past the cap (and past every call's deadline).
            st.level = st.level.min(-d.as_secs_f64() * st.qps);
            return;
        }
        if let Some(share) = st.share {
            if !throttled {
                st.gave_back = 0;
            }
            if throttled && st.qps > share {
                // The first throttle of the wave (or after the rate rose again).
                self.to_share(&mut st, share);
            } else if throttled && !st.reserved_since_drop {
                // A call that left before the drop, throttled with the one that caused it: the
                // drop set the node's phase for both. A give-back here would bring the next token
                // within a quarter interval and erase the phase.
                st.throttled_at = Some(Instant::now());
            } else if throttled && st.gave_back < GIVE_BACKS {
                // Throttled at its share: the nodes' random phases bunched and the account's
                // bucket ran dry for a moment. The call did not act, so its token comes back,
                // a little later (within a quarter of an interval, after any calls already
                // waiting) rather than a whole new phase of one to two intervals: in the
                // simulated 2,500-node wave the dozen nodes throttled so were its last, each a
                // share interval (500 s) or two late. At most GIVE_BACKS times until a call is
                // answered, then a new phase.
                st.level = st.level.min(0.0) + 1.0 - 0.25 * fastrand::f64();
                st.throttled_at = Some(Instant::now());
                st.gave_back += 1;
            } else if throttled {
                // At the share, not below: at its share a node collides with others now and
                // then (their phases are random), and a node halved below it would finish last
                // (a floor of a quarter share made the simulated 1,000-node wave 4.9× the
                // account's floor instead of 1.9×). The next token is phased anew, at random,
                // one to two intervals on.
                st.level = st.level.min(0.0) - fastrand::f64();
                st.throttled_at = Some(Instant::now());
            } else if st.throttled_at.is_none_or(|t| {
                t.elapsed() >= Duration::from_secs_f64(QUIET_INTERVALS / share).clamp(QUIET_MIN, QUIET_MAX)
            }) {
                st.qps = (st.qps * 1.05).min(self.cfg.qps);
            }
            return;
        }
        if throttled {
            st.qps = (st.qps / 2.0).max(self.cfg.qps * MIN_SHARE);
            st.level = st.level.min(0.0);
        } else {
            st.qps = (st.qps + self.cfg.qps / 20.0).min(self.cfg.qps);
        }
    }

    /// The account throttled a call of the other class: this one drops to its share too.
    fn account_busy(&self) {
        let mut st = self.state.lock().expect("bucket lock");
        if let Some(share) = st.share {
            self.refill(&mut st);
            self.to_share(&mut st, share);
        }
    }

    /// The rate now.
    pub fn rate(&self) -> f64 {
        self.state.lock().expect("bucket lock").qps
    }

    /// How long until a token would be free, taking nothing.
    pub fn wait(&self) -> Duration {
        let mut st = self.state.lock().expect("bucket lock");
        self.refill(&mut st);
        if st.level >= 1.0 { Duration::ZERO } else { Duration::from_secs_f64((1.0 - st.level) / st.qps) }
    }

    /// Waits for a token.
    pub async fn acquire(&self) {
        let wait = self.reserve();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Both buckets.
#[derive(Debug)]
pub struct RateBudget {
    mutating: TokenBucket,
    describe: TokenBucket,
    cfg: BudgetConfig,
    /// The nodes sharing the account now (0: not sharing).
    share_of: std::sync::atomic::AtomicU32,
}

impl RateBudget {
    pub fn new(cfg: BudgetConfig) -> Self {
        let adaptive = cfg.adaptive && cfg.share_of.is_none();
        let mut mutating = TokenBucket::with_adaptation(cfg.mutating, adaptive);
        let describe = TokenBucket::with_adaptation(cfg.describe, adaptive);
        // One phase for the node (see TokenBucket::to_share).
        mutating.phase = describe.phase;
        let b = RateBudget { mutating, describe, cfg, share_of: Default::default() };
        if let Some(n) = cfg.share_of {
            b.set_share_of(n);
        }
        b
    }

    /// Shares the account's refill with `n` nodes from now on (n ≥ 1): the count the cluster
    /// reports (ipamd's Kubernetes side reads its Node count), or `share_of` as configured. An
    /// adaptive budget (`rate_budget.adaptive`) keeps its own policy and ignores this.
    pub fn set_share_of(&self, n: u32) {
        if self.cfg.adaptive && self.cfg.share_of.is_none() {
            return;
        }
        let n = n.max(1);
        self.share_of.store(n, std::sync::atomic::Ordering::Relaxed);
        self.mutating.set_share(self.cfg.account.mutating_qps / f64::from(n));
        self.describe.set_share(self.cfg.account.describe_qps / f64::from(n));
    }

    /// The nodes this budget shares the account with, once known.
    pub fn share_of(&self) -> Option<u32> {
        match self.share_of.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    fn bucket(&self, class: ApiClass) -> &TokenBucket {
        match class {
            ApiClass::Mutating => &self.mutating,
            ApiClass::Describe => &self.describe,
        }
    }

    /// A token of `class` if one comes within `max` (then waits for it); `false` at once, taking
    /// nothing, when it would come later.
    pub async fn acquire_within(&self, class: ApiClass, max: Duration) -> bool {
        match self.bucket(class).reserve_within(max) {
            Some(wait) => {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                true
            }
            None => false,
        }
    }

    /// What the cloud answered (adapts the class's rate when the budget is adaptive).
    pub fn observe(&self, class: ApiClass, throttled: bool) {
        self.bucket(class).observe(throttled);
        // A throttled describe warns before this node's first mutating call: in a wave every
        // node describes first. (The other way round slowed the simulated wave by a third: a
        // node's describes sit on its critical path between mutating calls.)
        if throttled && class == ApiClass::Describe {
            self.mutating.account_busy();
        }
    }

    /// The class's rate now.
    pub fn rate(&self, class: ApiClass) -> f64 {
        self.bucket(class).rate()
    }

    /// How long until the class's next token, taking nothing.
    pub fn wait(&self, class: ApiClass) -> Duration {
        self.bucket(class).wait()
    }

    pub async fn acquire(&self, class: ApiClass) {
        match class {
            ApiClass::Mutating => self.mutating.acquire().await,
            ApiClass::Describe => self.describe.acquire().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill_rate() {
        let b = TokenBucket::new(BucketConfig { qps: 2.0, burst: 3 });
        let t0 = Instant::now();
        for _ in 0..3 {
            b.acquire().await;
        }
        assert_eq!(t0.elapsed(), Duration::ZERO, "the burst goes at once");
        b.acquire().await;
        assert_eq!(t0.elapsed(), Duration::from_millis(500));
        b.acquire().await;
        assert_eq!(t0.elapsed(), Duration::from_millis(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_refills_up_to_burst_only() {
        let b = TokenBucket::new(BucketConfig { qps: 1.0, burst: 2 });
        b.acquire().await;
        b.acquire().await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let t0 = Instant::now();
        b.acquire().await;
        b.acquire().await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
        b.acquire().await;
        assert_eq!(t0.elapsed(), Duration::from_secs(1), "no more than `burst` saved up");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_waiters_are_spaced_by_the_rate() {
        let budget = Arc::new(RateBudget::new(BudgetConfig {
            mutating: BucketConfig { qps: 5.0, burst: 1 },
            describe: BucketConfig { qps: 100.0, burst: 100 },
            ..BudgetConfig::default()
        }));
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let b = budget.clone();
                tokio::spawn(async move {
                    b.acquire(ApiClass::Mutating).await;
                    t0.elapsed()
                })
            })
            .collect();
        let mut done = Vec::new();
        for t in tasks {
            done.push(t.await.unwrap());
        }
        done.sort();
        // 1 at once, then one every 200 ms: the 10th at 1.8 s.
        assert_eq!(done[0], Duration::ZERO);
        assert_eq!(done[9], Duration::from_millis(1800));
        // The describe bucket is separate and untouched.
        let t1 = Instant::now();
        budget.acquire(ApiClass::Describe).await;
        assert_eq!(t1.elapsed(), Duration::ZERO);
    }

    /// `share_of`: untouched until the account throttles; then the node's share (5 calls/s over
    /// 100 nodes: 0.05/s) with the burst gone and the next token at a random point of one
    /// share's interval; a throttled describe brings the mutating class down before its first
    /// call; after 30 quiet share intervals answers climb back by 5 % each, never above the
    /// configured rate.
    #[tokio::test(start_paused = true)]
    async fn a_shared_budget_drops_to_its_share_when_the_account_throttles() {
        let cfg = BudgetConfig { share_of: Some(100), ..BudgetConfig::default() };
        let b = RateBudget::new(cfg);
        for _ in 0..5 {
            b.observe(ApiClass::Mutating, false);
        }
        assert_eq!(
            (b.rate(ApiClass::Mutating), b.rate(ApiClass::Describe)),
            (2.0, 5.0),
            "never throttled: as configured"
        );
        b.observe(ApiClass::Describe, true);
        assert_eq!(b.rate(ApiClass::Describe), 0.2, "describe: 20/s over 100 nodes");
        assert_eq!(b.rate(ApiClass::Mutating), 0.05, "mutating too, before its first call");
        // Both tokens at the node's one phase, within one interval of each class (5 s and
        // 20 s): its describe before its mutating call, as for every node of the cluster.
        let describe = b.describe.reserve();
        let wait = b.mutating.reserve();
        assert!(wait < Duration::from_secs(20), "burst dropped, within one interval: {wait:?}");
        assert!(
            (wait.as_secs_f64() - 4.0 * describe.as_secs_f64()).abs() < 1e-6,
            "one phase for both classes: describe {describe:?}, mutating {wait:?}"
        );
        // Another describe throttled while the mutating token is under way leaves it alone.
        tokio::time::advance(wait + Duration::from_secs(5)).await;
        let next = b.mutating.wait();
        b.observe(ApiClass::Describe, true);
        assert_eq!(b.mutating.wait(), next, "the token under way keeps its time");
        // A node's own throttle, not through a describe: the same phase.
        let own = RateBudget::new(cfg);
        own.observe(ApiClass::Mutating, true);
        let wait = own.mutating.reserve();
        assert!(wait < Duration::from_secs(20), "within one interval: {wait:?}");
        // Throttled again at its share (the nodes' phases bunched and the account's bucket ran
        // dry for a moment): the call's token comes back within a quarter of an interval, not
        // a whole new phase.
        tokio::time::advance(wait).await;
        own.observe(ApiClass::Mutating, true);
        let again = own.mutating.reserve();
        assert!(again <= Duration::from_secs(5), "the token back within 5 s of a 20 s interval: {again:?}");
        assert_eq!(own.rate(ApiClass::Mutating), 0.05);
        let mut last = again;
        for _ in 1..GIVE_BACKS {
            tokio::time::advance(last).await;
            own.observe(ApiClass::Mutating, true);
            last = own.mutating.reserve();
            assert!(last <= Duration::from_secs(5), "given back: {last:?}");
        }
        tokio::time::advance(last).await;
        own.observe(ApiClass::Mutating, true);
        let phased = own.mutating.reserve();
        assert!(phased > Duration::from_secs(20), "a new phase: {phased:?}");
        tokio::time::advance(phased).await;
        own.observe(ApiClass::Mutating, false);
        own.mutating.reserve();
        own.observe(ApiClass::Mutating, true);
        assert!(own.mutating.reserve() <= Duration::from_secs(25), "given back again after an answer");
        for _ in 0..3 {
            b.observe(ApiClass::Mutating, true);
        }
        assert_eq!(b.rate(ApiClass::Mutating), 0.05, "throttled at its share: stays at it, never below");
        // Answers while the account was throttling lately (within 30 share intervals: 600 s
        // here) keep the share; after that quiet spell each answer raises the rate again.
        b.observe(ApiClass::Mutating, false);
        assert_eq!(b.rate(ApiClass::Mutating), 0.05, "the wave may still be on");
        tokio::time::advance(Duration::from_secs(599)).await;
        b.observe(ApiClass::Mutating, false);
        assert_eq!(b.rate(ApiClass::Mutating), 0.05);
        tokio::time::advance(Duration::from_secs(1)).await;
        b.observe(ApiClass::Mutating, false);
        assert!((b.rate(ApiClass::Mutating) - 0.05 * 1.05).abs() < 1e-12);
        for _ in 0..200 {
            b.observe(ApiClass::Mutating, false);
        }
        assert_eq!(b.rate(ApiClass::Mutating), 2.0, "back to the configured rate, not above");
        assert!(BudgetConfig { share_of: Some(0), ..cfg }.validate().unwrap_err().contains("rate_budget.share_of"));
        assert!(BudgetConfig { adaptive: true, ..cfg }.validate().unwrap_err().contains("set one"));
    }

    /// Two calls in flight when the account first throttles, both throttled: the first answer
    /// drops the bucket to its share with the next token at the node's phase; the second,
    /// heard before any token was taken since, leaves that token where it is (a give-back
    /// brought it within a quarter interval, erasing the phase).
    #[tokio::test(start_paused = true)]
    async fn a_second_throttle_from_before_the_drop_keeps_the_phase() {
        for _ in 0..20 {
            let b = RateBudget::new(BudgetConfig { share_of: Some(100), ..BudgetConfig::default() });
            b.mutating.reserve();
            b.mutating.reserve();
            b.observe(ApiClass::Mutating, true);
            let phased = b.mutating.wait();
            b.observe(ApiClass::Mutating, true);
            assert_eq!(b.mutating.wait(), phased, "the in-flight call's throttle keeps the phase");
            // A call that took its token after the drop and is throttled gets it back as before.
            tokio::time::advance(b.mutating.reserve()).await;
            b.observe(ApiClass::Mutating, true);
            assert!(b.mutating.wait() <= Duration::from_secs(5), "given back: {:?}", b.mutating.wait());
        }
    }

    /// A call still waiting for its token when the drop comes is sent after it: its throttle is
    /// news (its token comes back sooner, as for any throttle at the share), not a call the drop
    /// already answered.
    #[tokio::test(start_paused = true)]
    async fn a_throttle_of_a_call_that_waited_through_the_drop_is_heard() {
        for _ in 0..20 {
            let b = RateBudget::new(BudgetConfig { share_of: Some(100), ..BudgetConfig::default() });
            // The burst used up, and one more call waiting for its token.
            while b.mutating.reserve().is_zero() {}
            b.observe(ApiClass::Mutating, true);
            let phased = b.mutating.wait();
            b.observe(ApiClass::Mutating, true);
            assert!(b.mutating.wait() < phased, "heard: {:?} after {phased:?}", b.mutating.wait());
        }
    }

    /// A fixed bucket backs off as a whole: each throttled answer in a row pushes the class's
    /// next token back twice as far (jittered to 50–100 %, at most a minute), whatever call it
    /// was; an answered call takes one doubling back and pushes nothing.
    #[tokio::test(start_paused = true)]
    async fn a_fixed_bucket_pushes_its_next_token_back_on_each_throttle_in_a_row() {
        let b = TokenBucket::new(BucketConfig { qps: 100.0, burst: 1 });
        let mut last = Duration::ZERO;
        for n in 0..10u32 {
            b.acquire().await;
            b.observe(true);
            let full = BACKOFF_FIRST.mul_f64(2f64.powi(n as i32)).min(BACKOFF_MAX);
            // The token's own refill (10 ms at 100/s) comes on top of the push.
            let wait = b.wait().saturating_sub(Duration::from_millis(10));
            assert!(wait >= full / 2 && wait <= full + Duration::from_millis(1), "throttle {n}: {wait:?} of {full:?}");
            last = wait;
            tokio::time::advance(b.wait()).await;
        }
        assert!(last >= BACKOFF_MAX / 2, "capped at a minute, not below half: {last:?}");
        assert_eq!(b.rate(), 100.0, "the rate itself is left alone");
        // Answers push nothing, and each takes one doubling back. After 10 throttles, 3
        // answers leave 7: the next throttle pushes by 2^7 × 0.5 s, capped at 60 s (8 now);
        // 5 answers more leave 3 (4 s), and 4 more leave none (0.5 s).
        for (answers, want) in [(3u32, BACKOFF_MAX), (5, Duration::from_secs(4)), (4, BACKOFF_FIRST)] {
            for _ in 0..answers {
                b.acquire().await;
                b.observe(false);
                assert!(b.wait() <= Duration::from_millis(10), "an answer pushes nothing: {:?}", b.wait());
                tokio::time::advance(b.wait()).await;
            }
            tokio::time::advance(Duration::from_secs(1)).await;
            b.acquire().await;
            b.observe(true);
            let wait = b.wait().saturating_sub(Duration::from_millis(10));
            assert!(wait >= want / 2 && wait <= want + Duration::from_millis(1), "{wait:?} of {want:?}");
            tokio::time::advance(b.wait()).await;
        }
    }

    /// Throttled answers heard together (calls that took their tokens before the first was
    /// heard) push the next token to the longest of their pushes, not their sum: never past
    /// the cap, so a call's deadline is not outrun by pushes alone.
    #[tokio::test(start_paused = true)]
    async fn throttles_heard_together_push_no_further_than_the_cap() {
        let b = TokenBucket::new(BucketConfig { qps: 100.0, burst: 100 });
        for _ in 0..20 {
            b.acquire().await;
            b.observe(true);
        }
        let wait = b.wait();
        assert!(wait >= BACKOFF_MAX / 2 && wait <= BACKOFF_MAX + Duration::from_millis(10), "{wait:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_adaptive_rate_halves_on_throttling_and_climbs_back() {
        let b = TokenBucket::with_adaptation(BucketConfig { qps: 2.0, burst: 10 }, true);
        b.observe(true);
        assert_eq!(b.rate(), 1.0);
        // The saved burst is gone: the next call waits for a token at the new rate.
        assert_eq!(b.reserve(), Duration::from_secs(1));
        for _ in 0..5 {
            b.observe(true);
        }
        assert_eq!(b.rate(), 2.0 * MIN_SHARE, "halved down to the floor");
        for _ in 0..100 {
            b.observe(false);
        }
        assert_eq!(b.rate(), 2.0, "never above the configured rate");
        // A token that would come after the caller's deadline is not taken.
        // (One token is owed: the next comes in 1 s at the full rate.)
        assert_eq!(b.reserve_within(Duration::from_millis(500)), None);
        assert_eq!(b.reserve_within(Duration::from_secs(1)), Some(Duration::from_secs(1)));
        let fixed = TokenBucket::new(BucketConfig { qps: 2.0, burst: 10 });
        fixed.observe(true);
        assert_eq!(fixed.rate(), 2.0);
    }

    /// The share can come after the budget is made (ipamd reads the cluster's Node count once
    /// it has joined) and change with the cluster; an adaptive budget keeps its own policy.
    #[tokio::test(start_paused = true)]
    async fn a_share_set_later_applies_from_the_next_throttle_and_follows_the_cluster() {
        let b = RateBudget::new(BudgetConfig::default());
        assert_eq!(b.share_of(), None);
        b.observe(ApiClass::Mutating, true);
        assert_eq!(b.rate(ApiClass::Mutating), 2.0, "not sharing: a throttle changes nothing");
        b.set_share_of(1000);
        assert_eq!(b.share_of(), Some(1000));
        assert_eq!(b.rate(ApiClass::Mutating), 2.0, "the configured rate until the account throttles");
        b.observe(ApiClass::Mutating, true);
        assert_eq!(b.rate(ApiClass::Mutating), 0.005, "5/s shared 1,000 ways");
        b.set_share_of(100);
        assert_eq!(b.rate(ApiClass::Mutating), 0.05, "the cluster shrank: up to the new share");
        b.set_share_of(0);
        assert_eq!(b.share_of(), Some(1), "at least this node");
        let adaptive = RateBudget::new(BudgetConfig { adaptive: true, ..BudgetConfig::default() });
        adaptive.set_share_of(1000);
        assert_eq!(adaptive.share_of(), None, "rate_budget.adaptive is its own policy");
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = BudgetConfig::default();
        assert!(c.validate().is_ok());
        c.mutating.qps = 0.0;
        assert!(c.validate().unwrap_err().contains("rate_budget.mutating.qps"));
        let mut c = BudgetConfig::default();
        c.describe.burst = 0;
        assert!(c.validate().unwrap_err().contains("rate_budget.describe.burst"));
    }
}
