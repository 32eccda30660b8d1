//! Warm-pool targets: a pure function from the pool's numbers, the configured targets and the
//! instance's limits to what the reconciler should do. Knob names and meanings follow the AWS VPC
//! CNI (`WARM_ENI_TARGET`, `WARM_IP_TARGET`, `MINIMUM_IP_TARGET`, `MAX_ENI`,
//! `WARM_PREFIX_TARGET`) so its users find what they know.
//!
//! A *slot* is what one ENI holds per secondary address: one IP, or one /28 prefix in prefix mode.
//! Warm prefixes are counted in addresses (16 per prefix); the pool hands out addresses densely
//! (a prefix fills before the next is used), which makes that the count of wholly free prefixes.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use underway_cloud::InstanceLimits;
use underway_cloud::limits::ADDRESSES_PER_PREFIX;

/// The configured targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Targets {
    /// Whole ENIs' worth of free slots to keep (used when neither IP target is set).
    pub warm_eni_target: u32,
    /// Free addresses to keep; when set (or `minimum_ip_target` is), replaces `warm_eni_target`.
    /// 0 means unset, as in the AWS VPC CNI (settings carried over keep their meaning).
    pub warm_ip_target: Option<u32>,
    /// Addresses to hold in all, used or not. 0 means unset, as in the AWS VPC CNI.
    pub minimum_ip_target: Option<u32>,
    /// At most this many ENIs (the instance type may allow fewer).
    pub max_eni: Option<u32>,
    /// Hand out addresses from /28 prefixes instead of secondary IPs.
    pub prefix_mode: bool,
    /// Prefix mode: free prefixes to keep (used when neither IP target is set).
    pub warm_prefix_target: u32,
    /// Pods this node can ever run (kubelet's max pods): no target grows the pool past it (an
    /// address beyond it could never be used, and it is the subnet's). Unset (or 0): with
    /// Kubernetes, the Node's `status.capacity.pods`; standalone, no bound.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pods: Option<u32>,
}

impl Default for Targets {
    fn default() -> Self {
        Targets {
            warm_eni_target: 1,
            warm_ip_target: None,
            minimum_ip_target: None,
            max_eni: None,
            prefix_mode: false,
            warm_prefix_target: 1,
            max_pods: None,
        }
    }
}

/// The pool's numbers, in addresses (not slots).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub enis: u32,
    /// Addresses the pool holds (primary ENI addresses excluded).
    pub total: u32,
    pub assigned: u32,
    /// Released, not yet reusable.
    pub cooling: u32,
    /// Slots still unused on the attached ENIs (IPs, or prefixes in prefix mode).
    pub free_slots_on_enis: u32,
}

impl PoolStats {
    pub fn free(&self) -> u32 {
        self.total.saturating_sub(self.assigned + self.cooling)
    }
}

/// Why the pool cannot reach its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// All ENIs the instance (or `max_eni`) allows are attached and full.
    EnisPerInstance,
}

/// What the reconciler should do; deficits come before releases (never both).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Slots to add to ENIs already attached.
    pub grow: u32,
    /// New ENIs to create and attach, with the slots each is created with.
    pub new_enis: Vec<u32>,
    /// Free addresses (IP mode) or wholly free prefixes (prefix mode) to give back.
    pub release: u32,
    /// Set when the target is out of reach.
    pub limited: Option<Limit>,
}

impl Targets {
    fn per_slot(&self) -> u32 {
        if self.prefix_mode { ADDRESSES_PER_PREFIX } else { 1 }
    }

    /// IP-target mode: either IP target set to more than 0 (0 is unset, as in the AWS VPC CNI).
    pub fn ip_targets(&self) -> bool {
        self.warm_ip_target.unwrap_or(0) > 0 || self.minimum_ip_target.unwrap_or(0) > 0
    }

    /// ENIs this node may have.
    pub fn max_enis(&self, limits: &InstanceLimits) -> u32 {
        self.max_eni.map_or(limits.enis, |m| m.min(limits.enis))
    }

    /// Addresses the pool can ever hold on this instance.
    pub fn capacity(&self, limits: &InstanceLimits) -> u32 {
        self.max_enis(limits) * limits.slots_per_eni() * self.per_slot()
    }

    /// Targets that can never be met on this instance type, each with its numbers (AWS VPC CNI
    /// #1872: a pool that never fills and never says why). Empty when all can be met.
    pub fn unreachable(&self, limits: &InstanceLimits) -> Vec<String> {
        let cap = self.capacity(limits);
        let mut out = Vec::new();
        let mut check = |name: &str, want: u32| {
            if want > cap {
                out.push(format!(
                    "{name} = {want} can never be met: this instance holds at most {cap} addresses ({} ENIs × {} slots × {})",
                    self.max_enis(limits),
                    limits.slots_per_eni(),
                    self.per_slot()
                ));
            }
        };
        if let Some(w) = self.warm_ip_target {
            check("warm_ip_target", w);
        }
        if let Some(m) = self.minimum_ip_target {
            check("minimum_ip_target", m);
        }
        if !self.ip_targets() && !self.prefix_mode {
            check("warm_eni_target", self.warm_eni_target * limits.slots_per_eni());
        }
        if self.max_eni == Some(0) {
            out.push("max_eni = 0 leaves no ENI to hold pod addresses".into());
        }
        out
    }

    /// The decision for `s` on an instance with `limits`.
    pub fn decide(&self, s: &PoolStats, limits: &InstanceLimits) -> Decision {
        let per_slot = self.per_slot();
        let slots_per_eni = limits.slots_per_eni();
        // How many addresses the pool should hold, and how many of its free ones it may keep.
        let (mut want_total, keep_free) = if self.ip_targets() {
            let warm = self.warm_ip_target.unwrap_or(0);
            let want = (s.assigned + s.cooling + warm).max(self.minimum_ip_target.unwrap_or(0));
            (want, want.saturating_sub(s.assigned + s.cooling))
        } else {
            let warm = if self.prefix_mode {
                self.warm_prefix_target * per_slot
            } else {
                self.warm_eni_target * slots_per_eni
            };
            (s.assigned + s.cooling + warm, warm)
        };
        // Never more than the node's pods can use, plus what is cooling (the kubelet counts
        // running pods only: a deleted pod's cooling address does not free a pod's place), and
        // what is held already is kept.
        if let Some(max) = self.max_pods.filter(|m| *m > 0) {
            want_total = want_total.min((max + s.cooling).max(s.assigned + s.cooling));
        }
        let mut d = Decision::default();
        if want_total > s.total {
            let mut need_slots = (want_total - s.total).div_ceil(per_slot);
            d.grow = need_slots.min(s.free_slots_on_enis);
            need_slots -= d.grow;
            let room = self.max_enis(limits).saturating_sub(s.enis);
            while need_slots > 0 && (d.new_enis.len() as u32) < room {
                // Without IP targets a new ENI comes full of secondary IPs, as in the AWS VPC CNI;
                // prefixes come as many as needed (each takes 16 addresses from the subnet), and
                // so does anything up to max pods.
                let bounded = self.max_pods.is_some_and(|m| m > 0);
                let first = if self.ip_targets() || self.prefix_mode || bounded {
                    need_slots.min(slots_per_eni)
                } else {
                    slots_per_eni
                };
                d.new_enis.push(first);
                need_slots = need_slots.saturating_sub(first);
            }
            if need_slots > 0 {
                d.limited = Some(Limit::EnisPerInstance);
            }
        } else if self.ip_targets() && s.free() > keep_free {
            let surplus = (s.free() - keep_free).min(s.total.saturating_sub(self.minimum_ip_target.unwrap_or(0)));
            d.release = surplus / per_slot;
        }
        d
    }
}

/// Whether a surplus of `release` slots (from [`Targets::decide`]) goes back now, given when
/// the surplus began (`since`) and how long it must last (`hold`): the slots to release now
/// and when the surplus (still) began. A step with no surplus forgets it, so under pod churn,
/// where an Add takes back the address whose cooldown just ended, nothing is given back.
pub fn hold_release(release: u32, since: Option<Instant>, now: Instant, hold: Duration) -> (u32, Option<Instant>) {
    match since {
        _ if release == 0 => (0, None),
        _ if hold.is_zero() => (release, None),
        None => (0, Some(now)),
        Some(t) if now.saturating_duration_since(t) >= hold => (release, None),
        Some(t) => (0, Some(t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M5_LARGE: InstanceLimits = InstanceLimits { enis: 3, ipv4_per_eni: 10, ipv6_per_eni: 10, vcpus: 2 };

    fn stats(enis: u32, total: u32, assigned: u32, cooling: u32, free_slots: u32) -> PoolStats {
        PoolStats { enis, total, assigned, cooling, free_slots_on_enis: free_slots }
    }

    fn ip(warm: Option<u32>, min: Option<u32>) -> Targets {
        Targets { warm_ip_target: warm, minimum_ip_target: min, ..Targets::default() }
    }

    #[test]
    fn decisions_table() {
        // (name, targets, stats, expected decision)
        let d =
            |grow, new_enis: &[u32], release, limited| Decision { grow, new_enis: new_enis.to_vec(), release, limited };
        let cases: Vec<(&str, Targets, PoolStats, Decision)> = vec![
            (
                "fresh node, default warm ENI: fill the primary",
                Targets::default(),
                stats(1, 0, 0, 0, 9),
                d(9, &[], 0, None),
            ),
            ("primary full and free: nothing to do", Targets::default(), stats(1, 9, 0, 0, 0), d(0, &[], 0, None)),
            (
                "one pod on a full primary: a whole new ENI",
                Targets::default(),
                stats(1, 9, 1, 0, 0),
                d(0, &[9], 0, None),
            ),
            (
                "warm ENI target 0 and nothing used",
                Targets { warm_eni_target: 0, ..Targets::default() },
                stats(1, 0, 0, 0, 9),
                d(0, &[], 0, None),
            ),
            ("warm IP 5 on a fresh node", ip(Some(5), None), stats(1, 0, 0, 0, 9), d(5, &[], 0, None)),
            ("warm IP 5, 3 used of 5: add 3", ip(Some(5), None), stats(1, 5, 3, 0, 4), d(3, &[], 0, None)),
            ("warm IP 5, 9 used of 9: new ENI with 5", ip(Some(5), None), stats(1, 9, 9, 0, 0), d(0, &[5], 0, None)),
            ("warm IP 2, 8 free: release 6", ip(Some(2), None), stats(1, 8, 0, 0, 1), d(0, &[], 6, None)),
            ("cooling counts as held: no release of it", ip(Some(2), None), stats(1, 8, 0, 6, 1), d(0, &[], 0, None)),
            (
                "minimum 12 with warm 0: grow past one ENI",
                ip(Some(0), Some(12)),
                stats(1, 0, 0, 0, 9),
                d(9, &[3], 0, None),
            ),
            ("minimum 12 holds at 12 free", ip(Some(0), Some(12)), stats(2, 12, 0, 0, 6), d(0, &[], 0, None)),
            (
                "minimum 4, warm 1, 10 free: release down to 4",
                ip(Some(1), Some(4)),
                stats(2, 10, 0, 0, 8),
                d(0, &[], 6, None),
            ),
            (
                "all ENIs full: limited",
                ip(Some(5), None),
                stats(3, 27, 27, 0, 0),
                d(0, &[], 0, Some(Limit::EnisPerInstance)),
            ),
            (
                "max_eni 2 caps growth",
                Targets { max_eni: Some(2), ..ip(Some(5), None) },
                stats(2, 18, 18, 0, 0),
                d(0, &[], 0, Some(Limit::EnisPerInstance)),
            ),
            (
                "partly reachable: one ENI then limited",
                ip(Some(20), None),
                stats(2, 18, 18, 0, 0),
                d(0, &[9], 0, Some(Limit::EnisPerInstance)),
            ),
            (
                "prefix mode: one warm prefix",
                Targets { prefix_mode: true, ..Targets::default() },
                stats(1, 0, 0, 0, 9),
                d(1, &[], 0, None),
            ),
            (
                "prefix mode: 16 used of 32: a whole prefix free",
                Targets { prefix_mode: true, ..Targets::default() },
                stats(1, 32, 16, 0, 7),
                d(0, &[], 0, None),
            ),
            (
                "prefix mode: 17 used of 32: no prefix wholly free",
                Targets { prefix_mode: true, ..Targets::default() },
                stats(1, 32, 17, 0, 7),
                d(1, &[], 0, None),
            ),
            (
                "prefix mode: 20 used of 32 keeps 16 warm",
                Targets { prefix_mode: true, ..Targets::default() },
                stats(1, 32, 20, 0, 7),
                d(1, &[], 0, None),
            ),
            (
                "prefix mode with warm IP 20: 2 prefixes",
                Targets { prefix_mode: true, ..ip(Some(20), None) },
                stats(1, 0, 0, 0, 9),
                d(2, &[], 0, None),
            ),
            (
                "max pods 3 with 3 held: no more (it asked for two more ENIs' worth)",
                Targets { max_pods: Some(3), ..Targets::default() },
                stats(1, 3, 3, 0, 6),
                d(0, &[], 0, None),
            ),
            (
                "max pods 20 bounds warm IP 5: a new ENI with 2, not 5",
                Targets { max_pods: Some(20), ..ip(Some(5), None) },
                stats(2, 18, 17, 0, 0),
                d(0, &[2], 0, None),
            ),
            (
                "max pods 20, 18 running and 2 cooling: room for the 2 pods still admitted",
                Targets { max_pods: Some(20), ..ip(Some(2), None) },
                stats(3, 20, 18, 2, 7),
                d(2, &[], 0, None),
            ),
            (
                "max pods below what is held: nothing given back for it",
                Targets { max_pods: Some(4), ..ip(Some(2), None) },
                stats(1, 6, 5, 0, 3),
                d(0, &[], 0, None),
            ),
            (
                "max pods 0 is unset",
                Targets { max_pods: Some(0), ..Targets::default() },
                stats(1, 9, 1, 0, 0),
                d(0, &[9], 0, None),
            ),
            (
                "warm_ip_target 0 is unset: a whole ENI, as with no IP target",
                ip(Some(0), None),
                stats(1, 9, 1, 0, 0),
                d(0, &[9], 0, None),
            ),
            (
                "minimum_ip_target 0 and warm 0 are unset: no release of the warm ENI",
                ip(Some(0), Some(0)),
                stats(2, 18, 1, 0, 0),
                d(0, &[], 0, None),
            ),
            (
                "prefix mode, primary full: a new ENI with the one prefix needed, not 9",
                Targets { prefix_mode: true, ..Targets::default() },
                stats(1, 144, 144, 0, 0),
                d(0, &[1], 0, None),
            ),
            (
                "prefix mode release whole prefixes only",
                Targets { prefix_mode: true, ..ip(Some(4), None) },
                stats(1, 48, 0, 0, 6),
                d(0, &[], 2, None),
            ),
        ];
        for (name, t, s, want) in cases {
            assert_eq!(t.decide(&s, &M5_LARGE), want, "{name}");
        }
    }

    #[test]
    fn never_grows_and_releases_at_once_and_never_past_capacity() {
        let t = ip(Some(7), Some(10));
        for enis in 1..=3 {
            for total in 0..=enis * 9 {
                for assigned in 0..=total {
                    let s = stats(enis, total, assigned, 0, enis * 9 - total);
                    let d = t.decide(&s, &M5_LARGE);
                    let grows = d.grow > 0 || !d.new_enis.is_empty();
                    assert!(!(grows && d.release > 0), "{s:?} → {d:?}");
                    assert!(enis + d.new_enis.len() as u32 <= 3, "{s:?} → {d:?}");
                    assert!(d.grow <= s.free_slots_on_enis, "{s:?} → {d:?}");
                    assert!(d.release <= s.free(), "never releases an assigned or cooling address: {s:?} → {d:?}");
                    let after = s.total + d.grow + d.new_enis.iter().sum::<u32>() - d.release;
                    assert!(
                        after >= 10.min(t.capacity(&M5_LARGE)) || d.limited.is_some(),
                        "minimum kept: {s:?} → {d:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn unreachable_targets_are_reported_with_numbers() {
        assert!(Targets::default().unreachable(&M5_LARGE).is_empty());
        let msgs = ip(Some(40), None).unreachable(&M5_LARGE);
        assert_eq!(msgs.len(), 1);
        assert!(msgs[0].contains("warm_ip_target = 40") && msgs[0].contains("at most 27"), "{msgs:?}");
        let msgs = Targets { max_eni: Some(1), ..ip(None, Some(12)) }.unreachable(&M5_LARGE);
        assert!(msgs[0].contains("minimum_ip_target = 12") && msgs[0].contains("at most 9"), "{msgs:?}");
        let msgs = Targets { warm_eni_target: 4, ..Targets::default() }.unreachable(&M5_LARGE);
        assert!(msgs[0].contains("warm_eni_target"), "{msgs:?}");
        assert!(
            Targets { prefix_mode: true, ..ip(Some(400), None) }.unreachable(&M5_LARGE).is_empty(),
            "27 prefixes hold 432"
        );
        assert!(!Targets { max_eni: Some(0), ..Targets::default() }.unreachable(&M5_LARGE).is_empty());
    }

    #[test]
    fn a_surplus_goes_back_only_once_it_has_lasted_the_hold() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let hold = Duration::from_secs(30);
        // (name, surplus, since, now, hold, expected)
        type Case = (&'static str, u32, Option<Instant>, Instant, Duration, (u32, Option<Instant>));
        let cases: Vec<Case> = vec![
            ("no surplus, none held", 0, None, at(0), hold, (0, None)),
            ("a surplus appears: held from now", 2, None, at(5), hold, (0, Some(at(5)))),
            ("still held", 2, Some(at(5)), at(34), hold, (0, Some(at(5)))),
            ("lasted the hold: all of it goes", 3, Some(at(5)), at(35), hold, (3, None)),
            ("gone before the hold (an Add took it): forgotten", 0, Some(at(5)), at(20), hold, (0, None)),
            ("back again later: held anew", 1, None, at(21), hold, (0, Some(at(21)))),
            ("no hold: at once", 4, None, at(0), Duration::ZERO, (4, None)),
        ];
        for (name, release, since, now, hold, want) in cases {
            assert_eq!(hold_release(release, since, now, hold), want, "{name}");
        }
    }
}
