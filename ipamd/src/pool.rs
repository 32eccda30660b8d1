//! The address pool as pure data: blocks of addresses (an ENI's secondary addresses and /28
//! prefixes in ENI mode, the node's pod CIDR in VPC-route mode), and who holds what.
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
use serde::{Deserialize, Serialize};
use underway_api::AttachmentKey;

use crate::targets::PoolStats;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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

/// Where a block's addresses come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// An ENI's addresses and prefixes; the block's id is the ENI's.
    #[default]
    Eni,
    /// The node's pod CIDR, routed to it by the VPC's route tables; the block's id is the CIDR.
    PodCidr,
}

/// One block of the pool's addresses: an ENI's, or the node's pod CIDR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub id: String,
    /// Absent in stores written before the kind was recorded (all ENIs then, but VPC-route
    /// mode's `pod-cidr-…` pseudo-ENI, which the store's migration turns into a pod CIDR).
    #[serde(default)]
    pub kind: BlockKind,
    /// The ENI's device index (0 for a pod CIDR: the primary ENI's link carries it).
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
    /// The block's id (an ENI id, or a pod CIDR).
    pub block: String,
    pub kind: BlockKind,
    pub route_table: Option<u32>,
}

impl Lease {
    /// The ENI owning the address; `None` for a pod CIDR's.
    pub fn eni(&self) -> Option<&str> {
        (self.kind == BlockKind::Eni).then_some(self.block.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("no free address ({free_later} cooling, {releasing} being released)")]
    Empty { free_later: u32, releasing: u32 },
    #[error("unknown ENI {0}")]
    UnknownEni(String),
    #[error("address {0} is already in the pool")]
    Duplicate(Ipv4Addr),
    #[error("address {0} is not free")]
    NotFree(Ipv4Addr),
}

/// What [`Pool::sync_eni`] changed to match the cloud.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// In the cloud, not in the pool: added as free.
    pub added: Vec<Ipv4Addr>,
    /// In the pool, not in the cloud: dropped. Assigned ones are listed with their holder (their
    /// pods keep an address the node no longer owns: reported, never handed out again).
    pub dropped: Vec<Ipv4Addr>,
    pub dropped_assigned: Vec<(Ipv4Addr, AttachmentKey)>,
    /// Reported on this ENI and on another: never handed out (see [`Pool::quarantine`]).
    pub conflicts: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, Default)]
pub struct Pool {
    /// By device index (a pod CIDR's block sits at 0).
    enis: BTreeMap<u32, Block>,
    held: BTreeMap<AttachmentKey, Ipv4Addr>,
    /// Addresses the cloud reported on two ENIs at once. AWS never does; LocalStack does (it
    /// picks secondary addresses at random without checking the subnet). Never handed out.
    quarantined: std::collections::BTreeSet<Ipv4Addr>,
    pub cooldown_ms: u64,
}

impl Pool {
    pub fn new(cooldown_ms: u64) -> Self {
        Pool { cooldown_ms, ..Pool::default() }
    }

    /// A pool from stored blocks (assignments are rebuilt from their slots).
    pub fn from_blocks(cooldown_ms: u64, enis: Vec<Block>) -> Self {
        let mut p = Pool::new(cooldown_ms);
        for e in enis {
            for (ip, s) in &e.slots {
                if let Slot::Assigned(k) = s {
                    p.held.insert(k.clone(), *ip);
                }
            }
            p.enis.insert(e.device_index, e);
        }
        p
    }

    pub fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.enis.values()
    }

    /// The blocks that are ENIs (none in VPC-route mode).
    pub fn enis(&self) -> impl Iterator<Item = &Block> {
        self.enis.values().filter(|b| b.kind == BlockKind::Eni)
    }

    /// Every attachment and its address.
    pub fn held(&self) -> impl Iterator<Item = (&AttachmentKey, &Ipv4Addr)> {
        self.held.iter()
    }

    /// Makes the pool's view of one ENI match the cloud's: same device index and table, and the
    /// addresses (and prefixes) the cloud says it holds. Creates the ENI when it is new.
    pub fn sync_eni(
        &mut self,
        id: &str,
        device_index: u32,
        route_table: Option<u32>,
        ips: &[Ipv4Addr],
        prefixes: &[Ipv4Net],
    ) -> SyncReport {
        self.sync_block(BlockKind::Eni, id, device_index, route_table, ips, prefixes)
    }

    /// [`sync_eni`](Self::sync_eni) for VPC-route mode's one block: the pod CIDR's addresses.
    pub fn sync_pod_cidr(&mut self, cidr: Ipv4Net, hosts: &[Ipv4Addr]) -> SyncReport {
        self.sync_block(BlockKind::PodCidr, &cidr.to_string(), 0, None, hosts, &[])
    }

    fn sync_block(
        &mut self,
        kind: BlockKind,
        id: &str,
        device_index: u32,
        route_table: Option<u32>,
        ips: &[Ipv4Addr],
        prefixes: &[Ipv4Net],
    ) -> SyncReport {
        let mut report = SyncReport::default();
        if self.enis.get(&device_index).is_some_and(|e| e.id != id || e.kind != kind) {
            // Another block sat at this index: it is gone, and so are its assignments (reported,
            // not silently dropped: e.g. a pod CIDR changed under running pods).
            report.dropped_assigned = self.remove_eni_at(device_index);
        }
        self.add_block(kind, id, device_index, route_table);
        let mut want: Vec<Ipv4Addr> = ips.to_vec();
        for p in prefixes {
            want.extend(prefix_addresses(*p));
        }
        let elsewhere: Vec<Ipv4Addr> = want
            .iter()
            .copied()
            .filter(|ip| self.enis.iter().any(|(d, e)| *d != device_index && e.slots.contains_key(ip)))
            .collect();
        for ip in elsewhere {
            self.quarantine(ip);
            report.conflicts.push(ip);
        }
        let quarantined = self.quarantined.clone();
        let e = self.enis.get_mut(&device_index).expect("just added");
        e.route_table = route_table;
        e.prefixes = prefixes.to_vec();
        let gone: Vec<Ipv4Addr> = e
            .slots
            .iter()
            .filter(|(ip, s)| !want.contains(ip) || (quarantined.contains(ip) && !matches!(s, Slot::Assigned(_))))
            .map(|(ip, _)| *ip)
            .collect();
        // A release begun but not confirmed (ipamd stopped in between) stays releasing even if
        // EC2 still lists the address: the unassign may yet act (sent just before the stop), so
        // it is never offered again; the reconciler finishes the release (`releasing`).
        for ip in gone {
            match e.slots.remove(&ip) {
                Some(Slot::Assigned(k)) => {
                    self.held.remove(&k);
                    report.dropped_assigned.push((ip, k));
                }
                _ => report.dropped.push(ip),
            }
        }
        for ip in want.into_iter().filter(|ip| !quarantined.contains(ip)) {
            if let std::collections::btree_map::Entry::Vacant(v) = e.slots.entry(ip) {
                v.insert(Slot::Free);
                report.added.push(ip);
            }
        }
        report
    }

    /// Forgets the ENI at `device_index` (it was detached); returns its assignments, now lost.
    pub fn remove_eni_at(&mut self, device_index: u32) -> Vec<(Ipv4Addr, AttachmentKey)> {
        let Some(e) = self.enis.remove(&device_index) else { return Vec::new() };
        let mut lost = Vec::new();
        for (ip, s) in e.slots {
            if let Slot::Assigned(k) = s {
                self.held.remove(&k);
                lost.push((ip, k));
            }
        }
        lost
    }

    /// Records that `key` holds `ip` (host state found a pod using a free address).
    pub fn assign_address(&mut self, key: &AttachmentKey, ip: Ipv4Addr) -> Result<(), PoolError> {
        let slot = self.enis.values_mut().find_map(|e| e.slots.get_mut(&ip)).ok_or(PoolError::NotFree(ip))?;
        if *slot != Slot::Free && !matches!(slot, Slot::Cooling { .. }) {
            return Err(PoolError::NotFree(ip));
        }
        *slot = Slot::Assigned(key.clone());
        self.held.insert(key.clone(), ip);
        Ok(())
    }

    pub fn add_eni(&mut self, id: &str, device_index: u32, route_table: Option<u32>) {
        self.add_block(BlockKind::Eni, id, device_index, route_table);
    }

    fn add_block(&mut self, kind: BlockKind, id: &str, device_index: u32, route_table: Option<u32>) {
        self.enis.entry(device_index).or_insert_with(|| Block {
            id: id.to_string(),
            kind,
            device_index,
            route_table,
            prefixes: Vec::new(),
            slots: BTreeMap::new(),
        });
    }

    fn eni_mut(&mut self, id: &str) -> Result<&mut Block, PoolError> {
        self.enis.values_mut().find(|e| e.id == id).ok_or_else(|| PoolError::UnknownEni(id.to_string()))
    }

    /// The address is in the pool and free (not held, cooling or being released).
    pub fn is_free(&self, ip: Ipv4Addr) -> bool {
        self.enis.values().any(|e| e.slots.get(&ip) == Some(&Slot::Free))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.enis.values().any(|e| e.slots.contains_key(&ip))
    }

    /// Takes an address the cloud reports on two ENIs out of service: its free or cooling slots
    /// are removed (an assigned one stays with its pod) and it is never added again.
    pub fn quarantine(&mut self, ip: Ipv4Addr) {
        self.quarantined.insert(ip);
        for e in self.enis.values_mut() {
            if matches!(e.slots.get(&ip), Some(Slot::Free | Slot::Cooling { .. })) {
                e.slots.remove(&ip);
            }
        }
    }

    /// Adds free addresses to an ENI.
    pub fn add_addresses(&mut self, eni: &str, ips: &[Ipv4Addr]) -> Result<(), PoolError> {
        if let Some(ip) = ips.iter().find(|ip| self.contains(**ip)) {
            return Err(PoolError::Duplicate(*ip));
        }
        let quarantined = self.quarantined.clone();
        let e = self.eni_mut(eni)?;
        for ip in ips.iter().filter(|ip| !quarantined.contains(ip)) {
            e.slots.insert(*ip, Slot::Free);
        }
        Ok(())
    }

    /// Adds a /28 prefix: its 16 addresses become free.
    pub fn add_prefix(&mut self, eni: &str, prefix: Ipv4Net) -> Result<(), PoolError> {
        let ips: Vec<Ipv4Addr> = prefix_addresses(prefix).collect();
        self.add_addresses(eni, &ips)?;
        self.eni_mut(eni)?.prefixes.push(prefix);
        Ok(())
    }

    /// The address an attachment holds, if any.
    pub fn lease_of(&self, key: &AttachmentKey) -> Option<Lease> {
        let ip = self.held.get(key)?;
        self.enis.values().find(|e| e.slots.contains_key(ip)).map(|e| Lease {
            address: *ip,
            block: e.id.clone(),
            kind: e.kind,
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
                return Ok(Lease { address: *ip, block: e.id.clone(), kind: e.kind, route_table: e.route_table });
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
        if self.quarantined.contains(&ip) {
            self.quarantine(ip);
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
            let prefixes = &e.prefixes;
            for (ip, s) in e.slots.iter_mut().rev() {
                if left == 0 {
                    return out;
                }
                // An address of a prefix goes back only with its whole prefix (EC2 unassigns
                // prefixes, not their addresses): a node switched from prefix mode keeps them.
                if *s == Slot::Free && !prefixes.iter().any(|p| p.contains(ip)) {
                    *s = Slot::Releasing;
                    out.entry(e.id.clone()).or_default().push(*ip);
                    left -= 1;
                }
            }
        }
        out
    }

    /// Prefix mode: picks up to `n` prefixes whose 16 addresses are all free (last ENI and last
    /// prefix first) and marks their addresses releasing.
    pub fn begin_release_prefixes(&mut self, n: u32) -> BTreeMap<String, Vec<Ipv4Net>> {
        let mut out: BTreeMap<String, Vec<Ipv4Net>> = BTreeMap::new();
        let mut left = n;
        for e in self.enis.values_mut().rev() {
            for p in e.prefixes.iter().rev() {
                if left == 0 {
                    return out;
                }
                if prefix_addresses(*p).all(|ip| e.slots.get(&ip) == Some(&Slot::Free)) {
                    for ip in prefix_addresses(*p) {
                        e.slots.insert(ip, Slot::Releasing);
                    }
                    out.entry(e.id.clone()).or_default().push(*p);
                    left -= 1;
                }
            }
        }
        out
    }

    /// Releases begun and not finished (an earlier process stopped, or EC2 could not say what it
    /// did), by ENI: the prefixes whose addresses are all releasing (prefix mode) and every
    /// releasing address.
    pub fn releasing(&self) -> BTreeMap<String, (Vec<Ipv4Net>, Vec<Ipv4Addr>)> {
        let mut out = BTreeMap::new();
        for e in self.enis.values() {
            let ips: Vec<Ipv4Addr> =
                e.slots.iter().filter(|(_, s)| **s == Slot::Releasing).map(|(ip, _)| *ip).collect();
            if ips.is_empty() {
                continue;
            }
            let prefixes: Vec<Ipv4Net> = e
                .prefixes
                .iter()
                .copied()
                .filter(|p| prefix_addresses(*p).all(|ip| e.slots.get(&ip) == Some(&Slot::Releasing)))
                .collect();
            out.insert(e.id.clone(), (prefixes, ips));
        }
        out
    }

    /// The cloud took these prefixes back: forget them and their addresses.
    pub fn finish_release_prefixes(&mut self, prefixes: &[Ipv4Net]) {
        let ips: Vec<Ipv4Addr> = prefixes.iter().flat_map(|p| prefix_addresses(*p)).collect();
        self.finish_release(&ips);
        for e in self.enis.values_mut() {
            e.prefixes.retain(|p| !prefixes.contains(p));
        }
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

    /// Addresses in each state: (free, assigned, cooling, releasing) of one ENI.
    pub fn eni_counts(e: &Block) -> (u32, u32, u32, u32) {
        let mut c = (0, 0, 0, 0);
        for s in e.slots.values() {
            match s {
                Slot::Free => c.0 += 1,
                Slot::Assigned(_) => c.1 += 1,
                Slot::Cooling { .. } => c.2 += 1,
                Slot::Releasing => c.3 += 1,
            }
        }
        c
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            enis: self.enis.len() as u32,
            total: self.count(|s| *s != Slot::Releasing),
            assigned: self.count(|s| matches!(s, Slot::Assigned(_))),
            cooling: self.count(|s| matches!(s, Slot::Cooling { .. })),
            free_slots_on_enis: 0,
        }
    }
}

/// The 16 addresses of a /28 (AWS hands out all of them to pods).
pub(crate) fn prefix_addresses(prefix: Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    let base = u32::from(prefix.network());
    (0..(1u32 << (32 - prefix.prefix_len()))).map(move |i| Ipv4Addr::from(base + i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

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
            (a.address, a.block.as_str(), a.route_table),
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

    #[test]
    fn sync_with_the_cloud_adds_drops_and_reports() {
        let mut p = pool();
        p.assign(&key("a"), 0).unwrap(); // 10 on eni-0
        p.assign(&key("b"), 0).unwrap(); // 11 on eni-0
        // The cloud says eni-0 now holds 11 and 12 (10 vanished while its pod ran).
        let r = p.sync_eni("eni-0", 0, None, &[ip(11), ip(12)], &[]);
        assert_eq!(r.added, vec![ip(12)]);
        assert_eq!(r.dropped, Vec::<Ipv4Addr>::new());
        assert_eq!(r.dropped_assigned, vec![(ip(10), key("a"))]);
        assert!(p.lease_of(&key("a")).is_none(), "a lost address is never handed out or reported as held");
        assert_eq!(p.lease_of(&key("b")).unwrap().address, ip(11));
        // A different ENI at device 1 replaces the old one; its assignments are lost with it.
        p.assign(&key("c"), 0).unwrap(); // 12
        p.assign(&key("d"), 0).unwrap(); // 20 on eni-1
        let r = p.sync_eni("eni-9", 1, Some(101), &[ip(30)], &[]);
        assert_eq!(r.added, vec![ip(30)]);
        assert_eq!(r.dropped_assigned, vec![(ip(20), key("d"))], "reported, not silently dropped");
        assert!(p.lease_of(&key("d")).is_none());
        assert_eq!(p.enis().map(|e| e.id.as_str()).collect::<Vec<_>>(), vec!["eni-0", "eni-9"]);
        // Idempotent.
        assert_eq!(p.sync_eni("eni-9", 1, Some(101), &[ip(30)], &[]), SyncReport::default());
        let lost = p.remove_eni_at(0);
        assert_eq!(lost.iter().map(|(a, _)| *a).collect::<Vec<_>>(), vec![ip(11), ip(12)]);
        assert_eq!(p.held().count(), 0);
    }

    #[test]
    fn a_stored_pool_comes_back_with_its_assignments() {
        let mut p = pool();
        p.assign(&key("a"), 0).unwrap();
        p.assign(&key("b"), 0).unwrap();
        p.release(&key("b"), 100);
        let back = Pool::from_blocks(30_000, p.blocks().cloned().collect());
        assert_eq!(back.lease_of(&key("a")), p.lease_of(&key("a")));
        assert_eq!(back.stats(), p.stats());
        let mut back = back;
        assert_eq!(back.assign(&key("c"), 200).unwrap().address, ip(20), "11 still cools after the restart");
        back.assign_address(&key("h"), ip(21)).unwrap();
        assert_eq!(back.assign_address(&key("i"), ip(21)), Err(PoolError::NotFree(ip(21))));
        assert_eq!(back.assign_address(&key("i"), ip(99)), Err(PoolError::NotFree(ip(99))));
    }

    #[test]
    fn only_wholly_free_prefixes_are_released() {
        let mut p = Pool::new(0);
        p.add_eni("eni-0", 0, None);
        let (a, b): (Ipv4Net, Ipv4Net) = ("10.0.1.0/28".parse().unwrap(), "10.0.1.16/28".parse().unwrap());
        p.add_prefix("eni-0", a).unwrap();
        p.add_prefix("eni-0", b).unwrap();
        p.assign(&key("x"), 0).unwrap(); // 10.0.1.0, in prefix a
        assert_eq!(p.begin_release_prefixes(2), BTreeMap::from([("eni-0".to_string(), vec![b])]));
        assert!(matches!(p.assign(&key("y"), 0), Ok(l) if a.contains(&l.address)), "b's addresses are not handed out");
        p.finish_release_prefixes(&[b]);
        assert_eq!(p.enis().next().unwrap().prefixes, vec![a]);
        assert_eq!(p.stats().total, 16);
        // A secondary address beside the prefix (a node switched from secondary IPs): the only
        // one released by address; a prefix's addresses go back only with their prefix.
        let single: Ipv4Addr = "10.0.2.5".parse().unwrap();
        p.add_addresses("eni-0", &[single]).unwrap();
        let picked = p.begin_release(5);
        assert_eq!(picked, BTreeMap::from([("eni-0".to_string(), vec![single])]), "not a prefix's address");
        let (eni, ips) = picked.iter().next().unwrap();
        // A release not confirmed before a restart stays releasing though EC2 still lists the
        // address (its unassign may yet act): never offered again, listed to be finished.
        p.sync_eni("eni-0", 0, None, &[single], &[a]);
        assert_eq!(p.stats().free(), 14, "16 + 1 - x - y - the releasing one");
        assert_eq!(p.releasing(), BTreeMap::from([(eni.clone(), (vec![], ips.clone()))]));
        p.finish_release(ips);
        assert!(p.releasing().is_empty());
    }

    #[test]
    fn an_address_on_two_enis_is_never_handed_out() {
        let mut p = pool(); // eni-0: 10, 11; eni-1: 20, 21
        p.assign(&key("a"), 0).unwrap(); // 10
        // The cloud reports 10 (assigned) and 11 (free) on eni-1 as well.
        let r = p.sync_eni("eni-1", 1, Some(101), &[ip(20), ip(21), ip(10), ip(11)], &[]);
        assert_eq!(r.conflicts, vec![ip(10), ip(11)]);
        assert_eq!(p.lease_of(&key("a")).unwrap().address, ip(10), "the pod keeps its address");
        let mut got = BTreeSet::new();
        for c in ["b", "c", "d"] {
            if let Ok(l) = p.assign(&key(c), 0) {
                got.insert(l.address);
            }
        }
        assert_eq!(got, BTreeSet::from([ip(20), ip(21)]), "neither 10 nor 11 again");
        p.release(&key("a"), 0);
        p.sync_eni("eni-0", 0, None, &[ip(10), ip(11)], &[]);
        assert!(matches!(p.assign(&key("e"), 100_000), Err(PoolError::Empty { .. })), "10 stays out after its release");
        assert_eq!(p.add_addresses("eni-1", &[ip(12)]), Ok(()));
    }
}
