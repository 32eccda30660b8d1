//! The address pool as pure data: ENIs, their addresses (and /28 prefixes), and who holds what.
//! No I/O and no clock: callers pass `now` (milliseconds on any monotonic scale), so every rule
//! is table-tested.
//!
//! Rules: an attachment holds at most one address (assigning again returns the same one); a
//! released address cools down before it can be handed out again; an address being returned to
//! the cloud is never handed out (Cilium #13412); addresses are handed out densely (lowest device
//! index, then lowest address) so that prefixes fill one at a time.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use underway_api::AttachmentKey;

use crate::targets::PoolStats;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    Free,
    Assigned(AttachmentKey),
    /// Released; reusable from `until`.
    Cooling {
        until: u64,
    },
    /// Being unassigned in the cloud: never handed out.
    Releasing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eni {
    pub id: String,
    pub device_index: u32,
    /// The policy route table of a secondary ENI (`None` for the primary).
    pub route_table: Option<u32>,
    pub prefixes: Vec<Ipv4Net>,
    pub slots: BTreeMap<Ipv4Addr, Slot>,
}

/// An address handed to an attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub eni: String,
    pub route_table: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("no free address ({free_later} cooling, {releasing} being released)")]
    Empty { free_later: u32, releasing: u32 },
    #[error("unknown ENI {0}")]
    UnknownEni(String),
    #[error("address {0} is already in the pool")]
    Duplicate(Ipv4Addr),
}

#[derive(Debug, Clone, Default)]
pub struct Pool {
    enis: BTreeMap<u32, Eni>,
    held: BTreeMap<AttachmentKey, Ipv4Addr>,
    pub cooldown_ms: u64,
}

impl Pool {
    pub fn new(cooldown_ms: u64) -> Self {
        Pool { cooldown_ms, ..Pool::default() }
    }

    pub fn enis(&self) -> impl Iterator<Item = &Eni> {
        self.enis.values()
    }

    pub fn add_eni(&mut self, id: &str, device_index: u32, route_table: Option<u32>) {
        self.enis.entry(device_index).or_insert_with(|| Eni {
            id: id.to_string(),
            device_index,
            route_table,
            prefixes: Vec::new(),
            slots: BTreeMap::new(),
        });
    }

    fn eni_mut(&mut self, id: &str) -> Result<&mut Eni, PoolError> {
        self.enis.values_mut().find(|e| e.id == id).ok_or_else(|| PoolError::UnknownEni(id.to_string()))
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        self.enis.values().any(|e| e.slots.contains_key(&ip))
    }

    /// Adds free addresses to an ENI.
    pub fn add_addresses(&mut self, eni: &str, ips: &[Ipv4Addr]) -> Result<(), PoolError> {
        if let Some(ip) = ips.iter().find(|ip| self.contains(**ip)) {
            return Err(PoolError::Duplicate(*ip));
        }
        let e = self.eni_mut(eni)?;
        for ip in ips {
            e.slots.insert(*ip, Slot::Free);
        }
        Ok(())
    }

    /// Adds a /28 prefix: its 16 addresses become free.
    pub fn add_prefix(&mut self, eni: &str, prefix: Ipv4Net) -> Result<(), PoolError> {
        let ips: Vec<Ipv4Addr> = prefix.hosts().chain([prefix.network(), prefix.broadcast()]).collect();
        self.add_addresses(eni, &ips)?;
        self.eni_mut(eni)?.prefixes.push(prefix);
        Ok(())
    }

    /// The address an attachment holds, if any.
    pub fn lease_of(&self, key: &AttachmentKey) -> Option<Lease> {
        let ip = self.held.get(key)?;
        self.enis.values().find(|e| e.slots.contains_key(ip)).map(|e| Lease {
            address: *ip,
            eni: e.id.clone(),
            route_table: e.route_table,
        })
    }

    /// Hands out an address (the same one again for the same attachment).
    pub fn assign(&mut self, key: &AttachmentKey, now: u64) -> Result<Lease, PoolError> {
        if let Some(l) = self.lease_of(key) {
            return Ok(l);
        }
        self.expire(now);
        for e in self.enis.values_mut() {
            if let Some((ip, slot)) = e.slots.iter_mut().find(|(_, s)| **s == Slot::Free) {
                *slot = Slot::Assigned(key.clone());
                self.held.insert(key.clone(), *ip);
                return Ok(Lease { address: *ip, eni: e.id.clone(), route_table: e.route_table });
            }
        }
        let s = self.stats();
        Err(PoolError::Empty { free_later: s.cooling, releasing: self.count(|s| *s == Slot::Releasing) })
    }

    /// Releases an attachment's address into cooldown; `None` when it held none.
    pub fn release(&mut self, key: &AttachmentKey, now: u64) -> Option<Ipv4Addr> {
        let ip = self.held.remove(key)?;
        let until = now + self.cooldown_ms;
        for e in self.enis.values_mut() {
            if let Some(s) = e.slots.get_mut(&ip) {
                *s = Slot::Cooling { until };
            }
        }
        Some(ip)
    }

    /// Ends the cooldowns that are over.
    pub fn expire(&mut self, now: u64) {
        for s in self.enis.values_mut().flat_map(|e| e.slots.values_mut()) {
            if matches!(s, Slot::Cooling { until } if *until <= now) {
                *s = Slot::Free;
            }
        }
    }

    /// Picks up to `n` free addresses (highest first, so the dense low end stays) and marks them
    /// releasing; returns them by ENI. Only free addresses are ever picked.
    pub fn begin_release(&mut self, n: u32) -> BTreeMap<String, Vec<Ipv4Addr>> {
        let mut out: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
        let mut left = n;
        for e in self.enis.values_mut().rev() {
            for (ip, s) in e.slots.iter_mut().rev() {
                if left == 0 {
                    return out;
                }
                if *s == Slot::Free {
                    *s = Slot::Releasing;
                    out.entry(e.id.clone()).or_default().push(*ip);
                    left -= 1;
                }
            }
        }
        out
    }

    /// The cloud took them back: forget them.
    pub fn finish_release(&mut self, ips: &[Ipv4Addr]) {
        for e in self.enis.values_mut() {
            e.slots.retain(|ip, s| !(ips.contains(ip) && *s == Slot::Releasing));
        }
    }

    /// The cloud refused: they are free again.
    pub fn abort_release(&mut self, ips: &[Ipv4Addr]) {
        for e in self.enis.values_mut() {
            for (ip, s) in e.slots.iter_mut() {
                if ips.contains(ip) && *s == Slot::Releasing {
                    *s = Slot::Free;
                }
            }
        }
    }

    /// Releases every attachment of `network` not in `valid` (CNI GC).
    pub fn gc(&mut self, network: &str, valid: &[AttachmentKey], now: u64) -> Vec<Ipv4Addr> {
        let stale: Vec<AttachmentKey> =
            self.held.keys().filter(|k| k.network == network && !valid.contains(k)).cloned().collect();
        stale.iter().filter_map(|k| self.release(k, now)).collect()
    }

    fn count(&self, f: impl Fn(&Slot) -> bool) -> u32 {
        self.enis.values().flat_map(|e| e.slots.values()).filter(|s| f(s)).count() as u32
    }

    /// The numbers [`crate::targets`] decides on. `slots_per_eni` is the instance's limit.
    pub fn stats_with(&self, slots_per_eni: u32, prefix_mode: bool) -> PoolStats {
        let mut s = self.stats();
        s.free_slots_on_enis = self
            .enis
            .values()
            .map(|e| {
                let used = if prefix_mode { e.prefixes.len() as u32 } else { e.slots.len() as u32 };
                slots_per_eni.saturating_sub(used)
            })
            .sum();
        s
    }

    fn stats(&self) -> PoolStats {
        PoolStats {
            enis: self.enis.len() as u32,
            total: self.count(|s| *s != Slot::Releasing),
            assigned: self.count(|s| matches!(s, Slot::Assigned(_))),
            cooling: self.count(|s| matches!(s, Slot::Cooling { .. })),
            free_slots_on_enis: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: &str) -> AttachmentKey {
        AttachmentKey { network: "underway".into(), container_id: c.into(), ifname: "eth0".into() }
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    fn pool() -> Pool {
        let mut p = Pool::new(30_000);
        p.add_eni("eni-0", 0, None);
        p.add_eni("eni-1", 1, Some(101));
        p.add_addresses("eni-1", &[ip(21), ip(20)]).unwrap();
        p.add_addresses("eni-0", &[ip(11), ip(10)]).unwrap();
        p
    }

    #[test]
    fn dense_idempotent_assignment_and_cooldown() {
        let mut p = pool();
        let a = p.assign(&key("a"), 0).unwrap();
        assert_eq!(
            (a.address, a.eni.as_str(), a.route_table),
            (ip(10), "eni-0", None),
            "lowest device, lowest address"
        );
        assert_eq!(p.assign(&key("a"), 5).unwrap(), a, "same attachment, same address");
        assert_eq!(p.assign(&key("b"), 0).unwrap().address, ip(11));
        let c = p.assign(&key("c"), 0).unwrap();
        assert_eq!((c.address, c.route_table), (ip(20), Some(101)), "then the secondary ENI, with its table");

        assert_eq!(p.release(&key("a"), 1_000), Some(ip(10)));
        assert_eq!(p.release(&key("a"), 1_000), None, "releasing twice is nothing");
        assert_eq!(p.assign(&key("d"), 2_000).unwrap().address, ip(21), "10 is cooling");
        let e = p.assign(&key("e"), 30_999).unwrap_err();
        assert_eq!(e, PoolError::Empty { free_later: 1, releasing: 0 });
        assert_eq!(p.assign(&key("e"), 31_000).unwrap().address, ip(10), "reusable after the cooldown");
    }

    #[test]
    fn an_address_being_released_is_never_handed_out() {
        let mut p = pool();
        p.assign(&key("a"), 0).unwrap();
        let picked = p.begin_release(2);
        assert_eq!(picked, BTreeMap::from([("eni-1".to_string(), vec![ip(21), ip(20)])]), "highest free first");
        assert_eq!(p.assign(&key("b"), 0).unwrap().address, ip(11));
        assert!(matches!(p.assign(&key("c"), 0), Err(PoolError::Empty { releasing: 2, .. })));
        p.abort_release(&[ip(20)]);
        assert_eq!(p.assign(&key("c"), 0).unwrap().address, ip(20));
        p.finish_release(&[ip(21), ip(20)]);
        assert!(p.lease_of(&key("c")).is_some(), "an assigned address is never dropped by finish_release");
        assert_eq!(p.stats().total, 3);
    }

    #[test]
    fn begin_release_takes_only_free_addresses() {
        let mut p = pool();
        p.assign(&key("a"), 0).unwrap();
        p.assign(&key("b"), 0).unwrap();
        p.release(&key("b"), 0);
        let picked: Vec<Ipv4Addr> = p.begin_release(10).into_values().flatten().collect();
        assert_eq!(picked.len(), 2, "neither the assigned nor the cooling address: {picked:?}");
        assert!(!picked.contains(&ip(10)) && !picked.contains(&ip(11)));
    }

    #[test]
    fn prefixes_gc_stats_and_duplicates() {
        let mut p = Pool::new(0);
        p.add_eni("eni-0", 0, None);
        p.add_prefix("eni-0", "10.0.1.16/28".parse().unwrap()).unwrap();
        assert_eq!(
            p.stats_with(9, true),
            PoolStats { enis: 1, total: 16, assigned: 0, cooling: 0, free_slots_on_enis: 8 }
        );
        assert_eq!(p.assign(&key("a"), 0).unwrap().address, Ipv4Addr::new(10, 0, 1, 16));
        assert_eq!(
            p.add_addresses("eni-0", &[Ipv4Addr::new(10, 0, 1, 20)]),
            Err(PoolError::Duplicate(Ipv4Addr::new(10, 0, 1, 20)))
        );
        assert_eq!(p.add_addresses("eni-9", &[ip(1)]), Err(PoolError::UnknownEni("eni-9".into())));
        p.assign(&key("b"), 0).unwrap();
        let other = AttachmentKey { network: "other".into(), ..key("c") };
        p.assign(&other, 0).unwrap();
        let released = p.gc("underway", &[key("b")], 0);
        assert_eq!(released, vec![Ipv4Addr::new(10, 0, 1, 16)], "only the stale attachment of this network");
        assert!(p.lease_of(&other).is_some());
        assert_eq!(p.stats_with(9, true).assigned, 2);
    }
}
