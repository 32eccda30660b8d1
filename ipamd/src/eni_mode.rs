//! ENI mode: the pool's addresses are secondary IPs (or /28 prefixes) on ENIs attached to the
//! node. This module carries out what [`crate::targets`] decides, through the cloud seam:
//! grow attached ENIs, create an ENI *with* its first addresses, attach it at the next free
//! device index, wait (bounded) for its link, set it up, and only then offer its addresses;
//! release surplus addresses through the release handshake; delete this node's leaked ENIs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use ipnet::Ipv4Net;
use underway_cloud::{
    AddressCount, Attachment, Cloud, CloudError, CreateEni, Eni as CloudEni, InstanceLimits, LimitKind, Subnet,
    TAG_CLUSTER, eni_tags,
};

use crate::clock::unix_ms;
use crate::config::Config;
use crate::error::{IpamdError, Result};
use crate::host::HostPods;
use crate::metrics::Metrics;
use crate::node::{EniLink, Node};
use crate::reconcile::{Source, Step};
use crate::state::{Blocker, NodeState};
use underway_cloud::Instance;

pub struct EniMode<C, N> {
    cloud: Arc<C>,
    /// The node's side effects: its links and its pods' veths.
    node_ops: Arc<N>,
    cfg: Arc<Config>,
    node: Instance,
    limits: InstanceLimits,
    metrics: Arc<Metrics>,
    /// Attached ENIs as last seen (assign diffs against these).
    known: BTreeMap<String, CloudEni>,
    subnets: BTreeMap<String, Subnet>,
    /// Subnets that reported no free addresses, skipped until the time (Unix ms).
    paused: BTreeMap<String, u64>,
    /// Attached ENIs whose link is not set up yet: id → device index and since when.
    pending: BTreeMap<String, Pending>,
    /// ENIs whose last assign has an unknown fate (a 5xx, a lost reply, a refusal at the limit)
    /// and that EC2 has not been asked about since: nothing more is asked of them until it has
    /// (an assign on a stale count goes past the ENI's limit: found by the fault test).
    unsettled: BTreeSet<String>,
    /// An ENI this process created whose attach was throttled or failed before acting: the next
    /// new ENI is this one (creating another each time, and deleting the last, spent the budget
    /// three times over while EC2 throttled; found by the in-memory EC2).
    spare: Option<CloudEni>,
    /// Device indexes of every ENI EC2 had attached at its last full read of the instance (sync
    /// or re-check), and whether that read still stands. Attaches this process made since are in
    /// `known`/`pending`; the read stops standing when an attach fails in a way that may have
    /// acted or that names another attachment. A new ENI then costs no describe for its index:
    /// at thousands of nodes the account's describe refill is the scarcer budget.
    attached_at_read: BTreeSet<u32>,
    indexes_stand: bool,
    /// Attached ENIs of this cluster whose delete-on-termination is not set yet (the call after
    /// the attach was throttled or failed, or a process stopped in between): id → attachment.
    unprotected: BTreeMap<String, String>,
    last_protect: Option<Instant>,
    /// When each subnet's free count was read (`subnets` holds it, less what this node took since).
    subnets_read: BTreeMap<String, Instant>,
    /// The subnets matching `eni.subnet_tags`, and when they were looked up.
    tagged: Option<(Vec<String>, Instant)>,
    /// The subnets whose count was read from EC2 in the step under way.
    read_this_step: BTreeSet<String>,
    last_gc: Option<Instant>,
    /// Subnets EC2 refused an assign asked with no count read: read before the next ask.
    read_first: BTreeSet<String>,
    last_recheck: Option<Instant>,
    /// Since when the pool has held more free slots than its IP targets want
    /// ([`crate::targets::hold_release`]).
    surplus_since: Option<Instant>,
    /// Each periodic describe's interval times a factor drawn anew each time
    /// ([`crate::clock::jitter`]).
    gc_jitter: f64,
    recheck_jitter: f64,
}

/// How often the missing delete-on-termination calls are asked again.
const PROTECT_EVERY: Duration = Duration::from_secs(30);

/// An attached ENI waiting for its link.
#[derive(Debug, Clone, Copy)]
struct Pending {
    device_index: u32,
    since: Instant,
}

impl Pending {
    fn new(device_index: u32) -> Self {
        Pending { device_index, since: Instant::now() }
    }
}

fn slot_count(prefix_mode: bool, n: u32) -> AddressCount {
    if prefix_mode { AddressCount::prefixes(n) } else { AddressCount::ips(n) }
}

impl<C: Cloud + 'static, N: Node + 'static> EniMode<C, N> {
    pub fn new(
        cloud: Arc<C>,
        cfg: Arc<Config>,
        node: Instance,
        node_ops: Arc<N>,
        limits: InstanceLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        EniMode {
            cloud,
            node_ops,
            cfg,
            node,
            limits,
            metrics,
            known: BTreeMap::new(),
            subnets: BTreeMap::new(),
            paused: BTreeMap::new(),
            pending: BTreeMap::new(),
            unsettled: BTreeSet::new(),
            spare: None,
            attached_at_read: BTreeSet::new(),
            indexes_stand: false,
            unprotected: BTreeMap::new(),
            last_protect: None,
            subnets_read: BTreeMap::new(),
            tagged: None,
            read_this_step: BTreeSet::new(),
            last_gc: None,
            surplus_since: None,
            read_first: BTreeSet::new(),
            last_recheck: None,
            gc_jitter: crate::clock::jitter(),
            recheck_jitter: crate::clock::jitter(),
        }
    }

    fn table_of(&self, device_index: u32) -> Option<u32> {
        (device_index > 0).then(|| self.cfg.eni.route_table_base + device_index)
    }

    fn prefix_mode(&self) -> bool {
        self.cfg.targets.prefix_mode
    }

    async fn subnet(&mut self, id: &str) -> Result<Subnet> {
        if let Some(s) = self.subnets.get(id) {
            return Ok(s.clone());
        }
        let s = self.cloud.subnets(&[id.to_string()]).await?.into_iter().next().ok_or_else(|| {
            IpamdError::Cloud(CloudError::NotFound { op: "DescribeSubnets", code: "404".into(), message: id.into() })
        })?;
        self.subnets.insert(id.to_string(), s.clone());
        Ok(s)
    }

    /// Waits (bounded) for the ENI's link, then sets the link and its route table up.
    async fn setup_link(&mut self, eni: &CloudEni, device_index: u32) -> Result<String> {
        let subnet = self.subnet(&eni.subnet_id).await?;
        let link = EniLink {
            device_index,
            table: self.table_of(device_index).expect("secondary ENI"),
            mtu: self.cfg.eni.mtu,
            subnet: subnet.cidr,
        };
        self.node_ops.setup_eni(eni, link, Duration::from_millis(self.cfg.eni.link_wait_ms)).await
    }

    /// Offers an attached, set-up ENI's addresses to the pool.
    /// Makes an ENI's addresses free, except those a running pod's veth routes: those are marked
    /// held in the same change, so no Add can take them in between.
    /// `running` is the host's pod veths, read by the caller just before (once per batch).
    fn offer(&self, state: &NodeState, eni: &CloudEni, device_index: u32, running: &HostPods) {
        let table = self.table_of(device_index);
        let (recovered, _) = state.change(|b| {
            let r = b.pool.sync_eni(&eni.id, device_index, table, &eni.secondary_ips, &eni.prefixes);
            if !r.dropped_assigned.is_empty() {
                let lost: Vec<String> =
                    r.dropped_assigned.iter().map(|(a, k)| format!("{a} ({})", k.container_id)).collect();
                state.record_error(format!("{}: EC2 no longer has assigned addresses {}", eni.id, lost.join(", ")));
            }
            if !r.conflicts.is_empty() {
                state.record_error(format!(
                    "{}: EC2 reports {:?} on another ENI as well; not used",
                    eni.id, r.conflicts
                ));
            }
            if !r.dropped.is_empty() {
                tracing::info!("{}: dropped {} addresses EC2 no longer has", eni.id, r.dropped.len());
            }
            crate::host::mark_running(b, running)
        });
        crate::host::report_recovered(state, &recovered);
        state.freed.notify_waiters();
    }

    async fn finish_pending(&mut self, state: &NodeState) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let running = self.node_ops.pods(&self.cfg.veth_prefix).await?;
        for (id, p) in self.pending.clone() {
            let idx = p.device_index;
            let eni = self.known.get(&id).cloned().expect("pending ENIs are known");
            match self.setup_link(&eni, idx).await {
                Ok(_) => {
                    self.offer(state, &eni, idx, &running);
                    self.pending.remove(&id);
                    tracing::info!("{id} at device {idx} is set up; its {} addresses serve", eni.secondary_ips.len());
                }
                // A link that never comes must not hold the node forever (issue 14, item 7).
                Err(e) if p.since.elapsed() >= Duration::from_millis(self.cfg.eni.pending_give_up_ms) => {
                    self.give_up(state, &eni, &running, &e).await?;
                }
                // Still within the bound: the other pending ENIs and the rest of the step go on.
                Err(e) => state.record_error(format!("{id} at device {idx}: {e}; waiting")),
            }
        }
        Ok(())
    }

    /// Detaches and deletes a pending ENI whose link never appeared, unless a pod on the host
    /// routes one of its addresses (then its link existed: it is kept and reported).
    async fn give_up(&mut self, state: &NodeState, eni: &CloudEni, running: &HostPods, why: &IpamdError) -> Result<()> {
        let bound = self.cfg.eni.pending_give_up_ms;
        let used: Vec<String> = running
            .iter()
            .filter(|(_, addrs)| addrs.iter().any(|a| eni.secondary_ips.contains(a)))
            .map(|(v, _)| v.clone())
            .collect();
        if !used.is_empty() {
            state.record_error(format!(
                "{}: no link after {bound} ms ({why}), but pods on {} use its addresses: kept",
                eni.id,
                used.join(", ")
            ));
            return Ok(());
        }
        if let Some(a) = &eni.attachment {
            match self.cloud.detach_eni(&a.id, false).await {
                Ok(()) | Err(CloudError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.pending.remove(&eni.id);
        self.known.remove(&eni.id);
        self.unprotected.remove(&eni.id);
        // Detaching takes EC2 a moment; the delete is retried briefly, then left to the
        // leaked-ENI GC (the ENI is detached, tagged for this node, older than its grace).
        let mut deleted = false;
        for _ in 0..10 {
            match self.cloud.delete_eni(&eni.id).await {
                Ok(()) | Err(CloudError::NotFound { .. }) => {
                    deleted = true;
                    break;
                }
                Err(CloudError::InUse { .. }) => tokio::time::sleep(Duration::from_millis(500)).await,
                Err(e) => {
                    tracing::warn!("{}: delete after giving up: {e}", eni.id);
                    break;
                }
            }
        }
        if deleted {
            self.metrics.eni_deleted();
        }
        // Its device index is free only once EC2 has finished the detach: read the instance
        // again before the next attach.
        self.indexes_stand = false;
        state.record_error(format!(
            "gave up on {}: its link did not appear within {bound} ms ({why}); detached and {}",
            eni.id,
            if deleted { "deleted" } else { "left for the leaked-ENI GC to delete" }
        ));
        Ok(())
    }

    /// How long a subnet's free count, and the tag lookup of subnets, is trusted: the re-check
    /// interval (stretched with `share_of`). Between reads the count is lowered by what this node
    /// takes; when no subnet has room by that count it is read again at once, and a subnet that
    /// others emptied meanwhile is refused by EC2 (InsufficientFreeAddressesInSubnet), which
    /// pauses it. Reading it before every growth step cost each node of a 2,500-node wave ~9 of
    /// the account's describes (docs/benchmarks.md).
    fn subnet_max_age(&self) -> Duration {
        self.cfg.periodic_describes(self.cloud.share_of()).1
    }

    /// The subnets `ids` with their free counts: read from EC2 (one call for all) when a count is
    /// older than [`subnet_max_age`](Self::subnet_max_age) or none has `need` free addresses.
    async fn subnet_counts(&mut self, ids: &[String], need: u32) -> Result<Vec<Subnet>> {
        let max_age = self.subnet_max_age();
        let stale = ids.iter().any(|id| self.subnets_read.get(id).is_none_or(|t| t.elapsed() >= max_age));
        let now_ms = unix_ms();
        let paused = |id: &String| self.paused.get(id).is_some_and(|u| *u > now_ms);
        let short = ids
            .iter()
            .filter(|id| !paused(id))
            .all(|id| self.subnets.get(id).is_none_or(|s| s.available_addresses < need));
        if !ids.is_empty() && (stale || short) {
            let now = Instant::now();
            for s in self.cloud.subnets(ids).await? {
                self.subnets_read.insert(s.id.clone(), now);
                self.read_this_step.insert(s.id.clone());
                self.read_first.remove(&s.id);
                self.subnets.insert(s.id.clone(), s);
            }
        }
        Ok(ids.iter().filter_map(|id| self.subnets.get(id).cloned()).collect())
    }

    /// This node took `addresses` of the subnet (its count is lowered until the next read).
    fn took(&mut self, subnet: &str, addresses: u32) {
        if let Some(s) = self.subnets.get_mut(subnet) {
            s.available_addresses = s.available_addresses.saturating_sub(addresses);
        }
    }

    /// The subnets a new ENI may go to: configured, matched by tags (looked up again after the
    /// max age), or the node's own.
    async fn candidate_subnets(&mut self) -> Result<Vec<String>> {
        let e = &self.cfg.eni;
        if !e.subnets.is_empty() {
            return Ok(e.subnets.clone());
        }
        if e.subnet_tags.is_empty() {
            return Ok(vec![self.node.subnet_id.clone()]);
        }
        if let Some((ids, at)) = &self.tagged
            && at.elapsed() < self.subnet_max_age()
        {
            return Ok(ids.clone());
        }
        let found = self.cloud.subnets_by_tags(&self.node.vpc_id, &e.subnet_tags).await?;
        let now = Instant::now();
        let mut ids = Vec::new();
        for s in found.into_iter().filter(|s| s.availability_zone == self.node.availability_zone) {
            ids.push(s.id.clone());
            self.subnets_read.insert(s.id.clone(), now);
            self.read_this_step.insert(s.id.clone());
            self.subnets.insert(s.id.clone(), s);
        }
        // An empty match is looked up again next time (a subnet tagged meanwhile is seen).
        self.tagged = (!ids.is_empty()).then(|| (ids.clone(), now));
        Ok(ids)
    }

    /// The subnet for a new ENI: the configured one with the most free addresses, not paused.
    async fn pick_subnet(&mut self, need: u32) -> Result<std::result::Result<Subnet, Blocker>> {
        let ids = self.candidate_subnets().await?;
        let subs = self.subnet_counts(&ids, need).await?;
        let now = unix_ms();
        let mut why = Vec::new();
        let mut best: Option<Subnet> = None;
        for s in subs {
            if let Some(until) = self.paused.get(&s.id).filter(|u| **u > now) {
                why.push(format!("{} paused for {} s after it ran out", s.id, (until - now) / 1000));
            } else if s.available_addresses < need {
                why.push(format!("{} has {} free addresses", s.id, s.available_addresses));
            } else if best.as_ref().is_none_or(|b| s.available_addresses > b.available_addresses) {
                best = Some(s);
            }
        }
        Ok(best.ok_or_else(|| {
            if why.is_empty() {
                why.push(format!("no subnet matches {:?}", self.cfg.eni.subnet_tags));
            }
            Blocker::SubnetExhausted(format!("subnet exhausted: {}", why.join("; ")))
        }))
    }

    /// EC2 refused `what` for lack of addresses in the subnet. Asked on a count read in this
    /// step, the subnet is paused; asked on a kept count (others took from the subnet since), the
    /// count is dropped instead and the next step reads it and asks for what is there; asked
    /// with no count (a first growth, asked blind), the count is read before the next ask.
    fn refused_by_subnet(&mut self, subnet: &str, what: &str) -> String {
        if self.read_this_step.contains(subnet) {
            self.pause(subnet);
            format!("subnet exhausted: {subnet} refused {what}; paused")
        } else if !self.subnets.contains_key(subnet) {
            self.read_first.insert(subnet.to_string());
            format!("subnet exhausted: {subnet} refused {what} asked before its count was read; reading it")
        } else {
            self.subnets_read.remove(subnet);
            format!("subnet exhausted: {subnet} refused {what} on an older count; reading it again")
        }
    }

    fn pause(&mut self, subnet: &str) {
        self.paused.insert(subnet.to_string(), unix_ms() + self.cfg.eni.subnet_pause_ms);
        self.subnets_read.remove(subnet);
    }

    fn per_slot(&self) -> u32 {
        if self.prefix_mode() { underway_cloud::limits::ADDRESSES_PER_PREFIX } else { 1 }
    }

    /// Adds up to `n` slots to attached ENIs, lowest device first; returns how many it added.
    async fn grow(&mut self, state: &NodeState, mut n: u32) -> Result<(u32, Option<Blocker>)> {
        // An earlier assign's fate is read from EC2 before anything more is asked (a failed read
        // fails the step: the ENI is not assigned to on a count that may be stale).
        let asked = n;
        for id in self.unsettled.clone() {
            n = n.saturating_sub(self.settle(state, &id).await?);
        }
        if n == 0 {
            return Ok((asked, None));
        }
        let slots = self.limits.slots_per_eni();
        let prefix_mode = self.prefix_mode();
        // Room on an ENI is what EC2 counts, not only what the pool uses: an address EC2 gave
        // twice (quarantined, never in the pool) still fills a slot, and AWS refuses an assign
        // past the type's limit (PrivateIpAddressLimitExceeded; found by the strict front).
        let rooms: Vec<(String, u32)> = state.read(|b| {
            b.pool
                .enis()
                .map(|e| {
                    let in_pool = if prefix_mode { e.prefixes.len() } else { e.slots.len() };
                    let in_ec2 = self
                        .known
                        .get(&e.id)
                        .map_or(0, |k| if prefix_mode { k.prefixes.len() } else { k.secondary_ips.len() });
                    (e.id.clone(), slots.saturating_sub(in_pool.max(in_ec2) as u32))
                })
                .filter(|(_, room)| *room > 0)
                .collect()
        });
        // Never ask a subnet for more than it has by the last count (a full subnet hangs
        // LocalStack and wastes a call on AWS); the count is read again when it is old or short.
        // A subnet whose count this node has not read (its first growth on an ENI of the
        // subnet) is asked blind: EC2 refuses an assign the subnet cannot fill as a whole, and
        // a refusal has the count read before the next ask. The read cost each node of a wave
        // one of the account's describes before its first mutating call, at its share of the
        // describe refill (docs/benchmarks.md).
        let mut subnet_ids: Vec<String> = rooms
            .iter()
            .filter_map(|(id, _)| self.known.get(id).map(|k| k.subnet_id.clone()))
            .filter(|s| self.subnets.contains_key(s) || self.read_first.contains(s))
            .collect();
        subnet_ids.sort();
        subnet_ids.dedup();
        let mut free_in: BTreeMap<String, u32> = self
            .subnet_counts(&subnet_ids, self.per_slot())
            .await?
            .into_iter()
            .map(|s| (s.id, s.available_addresses))
            .collect();
        let mut blocker = None;
        for (id, room) in rooms {
            if n == 0 {
                break;
            }
            let Some(known) = self.known.get(&id).cloned() else { continue };
            let left = free_in.entry(known.subnet_id.clone()).or_insert(u32::MAX);
            let free = *left / self.per_slot();
            if self.paused.get(&known.subnet_id).is_some_and(|u| *u > unix_ms()) || free == 0 {
                blocker = Some(Blocker::SubnetExhausted(format!(
                    "subnet exhausted: {} (of {}) has no free {}",
                    known.subnet_id,
                    id,
                    if prefix_mode { "/28" } else { "address" }
                )));
                continue;
            }
            let count = n.min(room).min(free);
            *left -= count * self.per_slot();
            match self.cloud.assign(&known, slot_count(prefix_mode, count)).await {
                Ok(a) => {
                    self.took(&known.subnet_id, count * self.per_slot());
                    let k = self.known.get_mut(&id).expect("known");
                    k.secondary_ips.extend(&a.ips);
                    k.prefixes.extend(&a.prefixes);
                    let (r, g) = state.change(|b| -> std::result::Result<(), crate::pool::PoolError> {
                        let (dup, new): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) =
                            a.ips.iter().partition(|ip| b.pool.contains(**ip));
                        for ip in &dup {
                            b.pool.quarantine(*ip);
                            state.record_error(format!("EC2 gave {id} {ip}, which another ENI holds; not used"));
                        }
                        b.pool.add_addresses(&id, &new)?;
                        for p in &a.prefixes {
                            b.pool.add_prefix(&id, *p)?;
                        }
                        Ok(())
                    });
                    if let Err(e) = r {
                        state.record_error(format!("{id}: {e}"));
                    }
                    state.commit(g).await?;
                    state.freed.notify_waiters();
                    n = n.saturating_sub(count);
                }
                Err(CloudError::LimitReached {
                    limit: LimitKind::SubnetAddresses | LimitKind::SubnetPrefixes, ..
                }) => {
                    blocker =
                        Some(Blocker::SubnetExhausted(self.refused_by_subnet(&known.subnet_id, "more addresses")));
                }
                // The ENI may hold more than ipamd knows: this assign (its fate unknown: a 5xx or
                // a lost reply; the cloud layer does not repeat it) or an earlier one acted in EC2
                // without ipamd hearing. Learn what EC2 has (those addresses are free: no Add ever
                // got them) instead of waiting for the periodic re-check; the next step decides.
                Err(
                    e @ (CloudError::LimitReached { limit: LimitKind::AddressesPerEni, .. }
                    | CloudError::Transient { .. }),
                ) => {
                    self.unsettled.insert(id.clone());
                    match self.settle(state, &id).await? {
                        0 => return Err(e.into()),
                        learned => n = n.saturating_sub(learned),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok((asked - n, blocker))
    }

    /// Reads an unsettled ENI from EC2: it may hold more than ipamd knows (an assign acted without
    /// ipamd hearing). What EC2 gave is offered (free: no Add ever got it). Returns the slots
    /// learned; an ENI that is gone or no longer known is simply settled.
    async fn settle(&mut self, state: &NodeState, id: &str) -> Result<u32> {
        let Some(known) = self.known.get(id).cloned() else {
            self.unsettled.remove(id);
            return Ok(0);
        };
        let fresh = match self.cloud.eni(id).await {
            Ok(f) => f,
            Err(CloudError::NotFound { .. }) => {
                self.unsettled.remove(id);
                return Ok(0);
            }
            Err(e) => return Err(e.into()),
        };
        self.unsettled.remove(id);
        let prefix_mode = self.prefix_mode();
        let slots = |e: &CloudEni| if prefix_mode { e.prefixes.len() } else { e.secondary_ips.len() };
        let learned = slots(&fresh).saturating_sub(slots(&known)) as u32;
        if learned == 0 {
            return Ok(0);
        }
        if !self.pending.contains_key(id) {
            let idx = fresh.attachment.as_ref().map_or(0, |a| a.device_index);
            let running = self.node_ops.pods(&self.cfg.veth_prefix).await?;
            self.offer(state, &fresh, idx, &running);
        }
        state.record_error(format!(
            "{id}: EC2 holds {} addresses, ipamd knew {}: an assign's reply was lost; learned them",
            fresh.secondary_ips.len(),
            known.secondary_ips.len()
        ));
        self.known.insert(id.to_string(), fresh);
        Ok(learned)
    }

    /// Creates an ENI with `first` slots, attaches it, sets it up and offers its addresses.
    async fn new_eni(&mut self, state: &NodeState, first: u32) -> Result<Option<Blocker>> {
        self.first_sweep(state).await?;
        // Before creating: a failed describe must not leave a new ENI behind, detached. An ENI
        // the read finds attached and untracked is adopted, and is this step's new ENI (creating
        // one more went past the type's ENI limit: found by the lost-reply test).
        let tracked = self.pending.len();
        let used = self.device_indexes(state).await?;
        if self.pending.len() > tracked {
            return Ok(None);
        }
        if let Some(spare) = self.spare.take() {
            let count = spare.secondary_ips.len() + spare.prefixes.len();
            return self.attach_new(state, spare, &used, count as u32).await;
        }
        // A new ENI takes an address of the subnet for itself (its primary) besides its slots:
        // asking for all the subnet has is refused (InsufficientFreeAddressesInSubnet; found by
        // the in-memory EC2, which counts as AWS does).
        let subnet = match self.pick_subnet(self.per_slot() + 1).await? {
            Ok(s) => s,
            Err(b) => return Ok(Some(b)),
        };
        let count = first.min((subnet.available_addresses - 1) / self.per_slot()).max(1);
        let sgs = if self.cfg.eni.security_groups.is_empty() {
            self.node.security_groups.clone()
        } else {
            self.cfg.eni.security_groups.clone()
        };
        let req = CreateEni {
            subnet_id: subnet.id.clone(),
            security_groups: sgs,
            description: format!("underway pod ENI of {}", self.node.id),
            tags: eni_tags(&self.cfg.cluster, &self.node.id, unix_ms() / 1000),
            initial: slot_count(self.prefix_mode(), count),
        };
        let eni = match self.cloud.create_eni(&req).await {
            Ok(e) => {
                self.took(&subnet.id, count * self.per_slot() + 1);
                e
            }
            Err(CloudError::LimitReached { limit: LimitKind::SubnetAddresses | LimitKind::SubnetPrefixes, .. }) => {
                return Ok(Some(Blocker::SubnetExhausted(self.refused_by_subnet(&subnet.id, "a new ENI"))));
            }
            Err(e) => return Err(e.into()),
        };
        self.attach_new(state, eni, &used, count).await
    }

    /// Attaches a new (or spare) ENI at the lowest free device index and waits for its link.
    async fn attach_new(
        &mut self,
        state: &NodeState,
        mut eni: CloudEni,
        used: &[u32],
        count: u32,
    ) -> Result<Option<Blocker>> {
        let idx = (1..).find(|i| !used.contains(i)).expect("a free index");
        let attachment = match self.cloud.attach_eni(&eni.id, &self.node.id, idx).await {
            Ok(a) => a,
            // Throttled on every try (or no token from the node's budget): EC2 did nothing, as
            // no try of an attach is repeated after a 5xx. The ENI is the next step's, with no
            // describe (at its share of the account a node meets this after most creates).
            Err(e @ CloudError::Throttled { op: "AttachNetworkInterface", .. }) => {
                self.spare = Some(eni);
                return Err(e.into());
            }
            Err(e) => {
                // The attach may have happened all the same (a lost reply): never leave the ENI
                // untracked; the instance's device indexes are read again before the next
                // attach. Detached after a 5xx, it is kept for the next step.
                self.indexes_stand = false;
                let keep = matches!(e, CloudError::Transient { .. });
                if self.settle_failed_attach(state, &eni, keep).await {
                    return Ok(None);
                }
                return Err(e.into());
            }
        };
        eni.attachment = Some(Attachment {
            id: attachment.clone(),
            instance_id: self.node.id.clone(),
            device_index: idx,
            status: "attached".into(),
            delete_on_termination: false,
        });
        tracing::info!("created {} in {} with {count} slots, attached at device {idx}", eni.id, eni.subnet_id);
        self.pending.insert(eni.id.clone(), Pending::new(idx));
        if self.protect_now(state) {
            self.protect(state, &eni.id, &attachment).await;
        } else {
            self.unprotected.insert(eni.id.clone(), attachment);
        }
        self.known.insert(eni.id.clone(), eni);
        Ok(None)
    }

    /// Device indexes in use on this node: the ENIs ipamd knows or waits for, and every ENI EC2
    /// had attached at its last read of the instance. That read is made again when it no longer
    /// stands (an attach failed in a way that may have acted); an ENI of this cluster that EC2
    /// has attached but ipamd lost track of is adopted then: waiting for its link, then in the pool.
    async fn device_indexes(&mut self, state: &NodeState) -> Result<Vec<u32>> {
        let mut used: Vec<u32> = self
            .known
            .values()
            .filter_map(|e| e.attachment.as_ref().map(|a| a.device_index))
            .chain(self.pending.values().map(|p| p.device_index))
            .collect();
        if self.indexes_stand {
            used.extend(&self.attached_at_read);
            return Ok(used);
        }
        let enis = self.cloud.enis_of_instance(&self.node.id).await?;
        self.saw_attached(&enis);
        used.extend(&self.attached_at_read);
        self.adopt_strays(state, enis).await;
        Ok(used)
    }

    /// Makes the next new ENI read the instance's device indexes again, as after an attach
    /// whose fate is unknown (for tests that stage such an attach in the cloud directly).
    pub fn forget_device_indexes(&mut self) {
        self.indexes_stand = false;
    }

    /// Adopts the ENIs of this cluster that EC2 has attached to this node and ipamd does not
    /// track (an attach whose answer was lost, and whose read failed too): waiting for their
    /// link, then in the pool. Every full read of the instance does this, or a stray would stand
    /// in the read's device indexes untracked and the pool would plan past the type's ENI limit
    /// (found by the lost-reply test once the read stopped preceding every new ENI).
    async fn adopt_strays(&mut self, state: &NodeState, enis: Vec<CloudEni>) {
        for e in enis {
            let Some(idx) = self.ours_attached(&e).map(|a| a.device_index) else { continue };
            if !self.known.contains_key(&e.id) && !self.pending.contains_key(&e.id) {
                state.record_error(format!("{} is attached at device {idx} but was not tracked: adopted", e.id));
                self.adopt(state, e, idx).await;
            }
        }
    }

    /// The attachment of a secondary ENI of this cluster that EC2 has attached and is not
    /// detaching (one on its way off, a give-up's detach, is neither a stray nor to protect).
    fn ours_attached<'e>(&self, e: &'e CloudEni) -> Option<&'e Attachment> {
        e.attachment.as_ref().filter(|a| {
            a.device_index > 0 && !a.status.starts_with("detach") && e.tags.get(TAG_CLUSTER) == Some(&self.cfg.cluster)
        })
    }

    /// This cluster's attached ENIs that EC2 would not delete with the instance (an earlier
    /// process stopped between an attach and its delete-on-termination; a call answered
    /// NotFound before EC2 caught up with the attach): asked again by `protect_again`.
    fn note_unprotected(&mut self, enis: &[CloudEni]) {
        for e in enis {
            if let Some(a) = self.ours_attached(e).filter(|a| !a.delete_on_termination) {
                self.unprotected.entry(e.id.clone()).or_insert_with(|| a.id.clone());
            }
        }
    }

    /// A full read of the instance's ENIs: the device indexes taken, which stand until an attach
    /// fails in a way that may have acted.
    fn saw_attached(&mut self, enis: &[CloudEni]) {
        self.attached_at_read = enis.iter().filter_map(|e| e.attachment.as_ref().map(|a| a.device_index)).collect();
        self.indexes_stand = true;
    }

    /// Tracks an ENI EC2 has attached to this node without ipamd hearing of it (an attach whose
    /// answer was lost): waiting for its link, then in the pool. The attach's second step (delete
    /// on termination) never ran for it: done now, or the ENI would outlive the instance.
    async fn adopt(&mut self, state: &NodeState, eni: underway_cloud::Eni, idx: u32) {
        if self.spare.as_ref().is_some_and(|s| s.id == eni.id) {
            self.spare = None;
        }
        if let Some(a) = eni.attachment.as_ref().filter(|a| !a.delete_on_termination) {
            self.protect(state, &eni.id, &a.id).await;
        }
        self.pending.insert(eni.id.clone(), Pending::new(idx));
        self.known.insert(eni.id.clone(), eni);
    }

    /// Whether delete-on-termination is set now: when a mutating call can go at once, or no pod
    /// waits for an address. At its share of a busy account a node waits for every token, and
    /// the pods' next ENI comes first (the leak GC covers an ENI whose instance ends meanwhile).
    fn protect_now(&self, state: &NodeState) -> bool {
        self.cloud.mutating_wait().is_zero() || state.read(|b| b.waiting) == 0
    }

    /// Asks again for the delete-on-termination still missing, at most every [`PROTECT_EVERY`]
    /// (a refusal that lasts, say an IAM policy without the action, must not spend the account's
    /// refill every step): first in a step when no pod waits (an error further on must not skip
    /// it), and after the step's growth when [`protect_now`](Self::protect_now) says the token is
    /// not the pods' (asked first in the step, the token at hand went to it instead of the next
    /// ENI: the simulated 2,500-node wave 1.51× → 1.71× the floor).
    async fn protect_again(&mut self, state: &NodeState, after_growth: bool) {
        let now = if after_growth { self.protect_now(state) } else { state.read(|b| b.waiting) == 0 };
        if self.unprotected.is_empty()
            || self.last_protect.is_some_and(|t| t.elapsed() < PROTECT_EVERY)
            || !now
            || self.cloud.mutating_wait() > Duration::from_millis(self.cfg.cloud.call_timeout_ms)
        {
            return;
        }
        self.last_protect = Some(Instant::now());
        for (eni, attachment) in self.unprotected.clone() {
            self.protect(state, &eni, &attachment).await;
        }
    }

    /// Lets EC2 delete an attached ENI with the instance: the second mutating call of every attach.
    /// Not fatal: a call that fails (throttled: the node's budget or the account's) is made again
    /// by `protect_again`; meanwhile an instance that ends leaves the ENI detached and tagged,
    /// and the cluster GC deletes it.
    async fn protect(&mut self, state: &NodeState, eni: &str, attachment: &str) {
        match self.cloud.set_delete_on_termination(eni, attachment).await {
            Ok(()) | Err(CloudError::NotFound { .. }) => {
                self.unprotected.remove(eni);
            }
            Err(e) => {
                if self.unprotected.insert(eni.to_string(), attachment.to_string()).is_none() {
                    state.record_error(format!(
                        "{eni}: delete on termination not set ({e}); asked again in later steps"
                    ));
                }
            }
        }
    }

    /// After a failed attach: an ENI EC2 has attached to this node is adopted (true); one it has
    /// not is deleted. EC2 is eventually consistent, so "not found" is asked again a few times;
    /// what cannot be settled is left to the leak GC (the ENI is tagged) and recorded.
    async fn settle_failed_attach(&mut self, state: &NodeState, eni: &CloudEni, keep: bool) -> bool {
        let eni_id = eni.id.as_str();
        for _ in 0..8 {
            match self.cloud.eni(eni_id).await {
                Ok(e) => match e.attachment.as_ref().map(|a| (a.instance_id.clone(), a.device_index)) {
                    Some((i, idx)) if i == self.node.id => {
                        state.record_error(format!(
                            "{eni_id}: the attach failed, yet EC2 has it attached at device {idx}: adopted"
                        ));
                        self.adopt(state, e, idx).await;
                        return true;
                    }
                    Some(_) => {}
                    // Detached: a failure that did not act. Kept for the next step to attach
                    // (a 5xx), or deleted (a refusal the next attach would meet again).
                    None if keep => {
                        self.spare = Some(e);
                        return false;
                    }
                    None => match self.cloud.delete_eni(eni_id).await {
                        // NotFound: a retried delete whose first answer was lost.
                        Ok(()) | Err(CloudError::NotFound { .. }) => return false,
                        Err(CloudError::InUse { .. }) => {}
                        Err(d) => {
                            state.record_error(format!(
                                "{eni_id}: attach failed and delete failed ({d}); GC will retry"
                            ));
                            return false;
                        }
                    },
                },
                Err(CloudError::NotFound { .. }) => {}
                Err(d) => {
                    state
                        .record_error(format!("{eni_id}: attach failed and its state is unknown ({d}); GC will retry"));
                    return false;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        state.record_error(format!("{eni_id}: attach failed and it could not be settled; GC will retry"));
        false
    }

    /// Gives `n` free slots back through the release handshake: picked addresses are never handed
    /// out; the cloud's answer forgets them, or frees them again.
    /// Gives up to `n` free slots back; returns how many addresses were picked (0: none could
    /// be, and nothing is written).
    async fn release(&mut self, state: &NodeState, n: u32) -> Result<usize> {
        let prefix_mode = self.prefix_mode();
        // Per ENI: the prefixes (prefix mode) and every address that goes back.
        let (picked, g) = state.change(|b| -> Vec<(String, Vec<Ipv4Net>, Vec<Ipv4Addr>)> {
            if prefix_mode {
                let picked = b.pool.begin_release_prefixes(n);
                picked
                    .into_iter()
                    .map(|(e, ps)| {
                        let ips = ps.iter().flat_map(|p| crate::pool::prefix_addresses(*p)).collect();
                        (e, ps, ips)
                    })
                    .collect()
            } else {
                b.pool.begin_release(n).into_iter().map(|(e, ips)| (e, Vec::new(), ips)).collect()
            }
        });
        let count = picked.iter().map(|(_, _, ips)| ips.len()).sum();
        if count == 0 {
            return Ok(0);
        }
        // On disk before EC2 is asked: a process stopped after the unassign acted must not leave
        // a store that offers these addresses as free (issue 14; found by the kill storm).
        state.commit(g).await?;
        self.carry_out_release(state, picked).await?;
        Ok(count)
    }

    /// Finishes releases an earlier process (or a step whose confirmation failed) began: EC2 is
    /// read first (an unassign that acted after all is only recorded: asking again would be
    /// refused), the rest is unassigned again; never offered in between.
    async fn resume_releases(&mut self, state: &NodeState) -> Result<()> {
        let open = state.read(|b| b.pool.releasing());
        if open.is_empty() {
            return Ok(());
        }
        // Each release is finished as it was begun, whatever the mode is now (a node switched
        // between secondary IPs and prefixes with a release open): a releasing prefix by prefix,
        // a releasing address outside every releasing prefix by address.
        let mut again = Vec::new();
        for (eni, (prefixes, ips)) in open {
            let (held_ips, held_prefixes) = match self.cloud.eni(&eni).await {
                Ok(now) => (now.secondary_ips, now.prefixes),
                Err(CloudError::NotFound { .. }) => (Vec::new(), Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let (in_prefixes, single): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) =
                ips.iter().partition(|a| prefixes.iter().any(|p| p.contains(*a)));
            let (gone_p, still_p): (Vec<Ipv4Net>, Vec<Ipv4Net>) =
                prefixes.iter().partition(|p| !held_prefixes.contains(p));
            let (mut gone, still_in_prefixes): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) =
                in_prefixes.iter().partition(|a| gone_p.iter().any(|p| p.contains(*a)));
            let (gone_single, still_single): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) =
                single.iter().partition(|a| !held_ips.contains(a));
            gone.extend(gone_single);
            if !gone.is_empty() {
                self.forget_released(state, &eni, &gone, &gone_p).await?;
            }
            if !still_p.is_empty() {
                again.push((eni.clone(), still_p, still_in_prefixes));
            }
            if !still_single.is_empty() {
                again.push((eni, Vec::new(), still_single));
            }
        }
        if !again.is_empty() {
            tracing::info!("finishing {} releases begun before", again.iter().map(|p| p.2.len()).sum::<usize>());
        }
        self.carry_out_release(state, again).await
    }

    /// EC2 took these back: out of the pool and of ipamd's view of the ENI, durably.
    async fn forget_released(
        &mut self,
        state: &NodeState,
        eni: &str,
        ips: &[Ipv4Addr],
        prefixes: &[Ipv4Net],
    ) -> Result<()> {
        let (_, g) = state.change(|b| {
            b.pool.finish_release(ips);
            b.pool.finish_release_prefixes(prefixes);
        });
        if let Some(k) = self.known.get_mut(eni) {
            k.secondary_ips.retain(|a| !ips.contains(a));
            k.prefixes.retain(|p| !prefixes.contains(p));
        }
        state.commit(g).await
    }

    /// Unassigns what was picked (marked releasing, on disk) and records the outcome.
    async fn carry_out_release(
        &mut self,
        state: &NodeState,
        picked: Vec<(String, Vec<Ipv4Net>, Vec<Ipv4Addr>)>,
    ) -> Result<()> {
        for (eni, prefixes, ips) in picked {
            let r = if prefixes.is_empty() {
                self.cloud.unassign_ips(&eni, &ips).await
            } else {
                self.cloud.unassign_prefixes(&eni, &prefixes).await
            };
            let (gone_ips, gone_prefixes) = match r {
                Ok(()) => (ips.clone(), prefixes.clone()),
                Err(e) => {
                    // The reply may be lost after EC2 acted: ask EC2 what the ENI still has before
                    // anything is offered again (issue 14, item 3). What it no longer has is gone;
                    // the rest stays releasing, never free: the unassign may still be on its way
                    // (a deadline passed while it was sent) and act after this read. A later
                    // step's `resume_releases` finishes them.
                    let Ok(now) = self.cloud.eni(&eni).await else {
                        state.record_error(format!("{eni}: unassign failed ({e}) and EC2 cannot say what it did; the addresses stay out of use until a later step finishes the release"));
                        return Err(e.into());
                    };
                    let gone_prefixes: Vec<Ipv4Net> =
                        prefixes.iter().copied().filter(|p| !now.prefixes.contains(p)).collect();
                    // Prefix mode: an address is gone with its prefix (EC2 lists prefixes, not
                    // their addresses); otherwise one by one.
                    let gone_ips: Vec<Ipv4Addr> = if prefixes.is_empty() {
                        ips.iter().copied().filter(|a| !now.secondary_ips.contains(a)).collect()
                    } else {
                        gone_prefixes.iter().flat_map(|p| crate::pool::prefix_addresses(*p)).collect()
                    };
                    if gone_ips.is_empty() && gone_prefixes.is_empty() {
                        return Err(e.into());
                    }
                    state.record_error(format!(
                        "{eni}: unassign reported {e}, yet EC2 released {} addresses: not offered again",
                        gone_ips.len()
                    ));
                    (gone_ips, gone_prefixes)
                }
            };
            self.forget_released(state, &eni, &gone_ips, &gone_prefixes).await?;
        }
        Ok(())
    }

    /// The periodic re-check against EC2 (issue 14, item 3): one DescribeNetworkInterfaces of the
    /// instance (through the rate budget), and each set-up ENI's pool made to match it again —
    /// addresses EC2 no longer has are dropped (assigned ones reported), addresses it has that the
    /// pool lacks are added (a running pod's marked held). What changed is recorded.
    async fn recheck(&mut self, state: &NodeState) -> Result<()> {
        let before = state.read(|b| b.pool.enis().map(|e| (e.id.clone(), e.slots.len())).collect::<BTreeMap<_, _>>());
        let enis = self.cloud.enis_of_instance(&self.node.id).await?;
        let running = self.node_ops.pods(&self.cfg.veth_prefix).await?;
        self.saw_attached(&enis);
        self.note_unprotected(&enis);
        let mut strays = Vec::new();
        for e in enis {
            let Some(idx) = e.attachment.as_ref().map(|a| a.device_index) else { continue };
            if !self.known.contains_key(&e.id) && !self.pending.contains_key(&e.id) {
                strays.push(e);
                continue;
            }
            if self.pending.contains_key(&e.id) || !before.contains_key(&e.id) {
                continue; // not offered yet: finish_pending takes it
            }
            self.known.insert(e.id.clone(), e.clone());
            self.offer(state, &e, idx, &running);
        }
        self.adopt_strays(state, strays).await;
        let after = state.read(|b| b.pool.enis().map(|e| (e.id.clone(), e.slots.len())).collect::<BTreeMap<_, _>>());
        if after != before {
            state.record_error(format!("re-check against EC2 repaired the pool: {before:?} → {after:?}"));
        }
        Ok(())
    }

    /// Deletes ENIs this cluster made for this node that have stayed detached past the grace.
    async fn gc_leaked(&mut self, state: &NodeState) -> Result<()> {
        self.gc_detached(state, self.cfg.eni.leak_grace_ms).await
    }

    /// The first leak sweep of this process. It comes before this process creates any ENI, so
    /// every detached ENI tagged for this node is an earlier run's, cut off between create and
    /// attach (a crash): deleted now, not after `leak_grace_ms`; an earlier run's
    /// attach still in flight makes the delete fail, and the ENI is adopted once the instance's
    /// ENIs are read again. Made before this process's first create (a crash loop leaves at most
    /// one ENI behind, and a regional ENI quota an earlier run filled is freed before a create
    /// it would refuse), else at the end of the first step; a sweep that failed is made again.
    /// Not in `sync`: there its describe sat between a new node and its first mutating call,
    /// at the node's share of a wave's describes (docs/benchmarks.md).
    async fn first_sweep(&mut self, state: &NodeState) -> Result<()> {
        if self.last_gc.is_none() {
            self.gc_detached(state, 0).await?;
            self.last_gc = Some(Instant::now());
        }
        Ok(())
    }

    /// Deletes this node's detached ENIs created at least `grace_ms` ago.
    async fn gc_detached(&mut self, state: &NodeState, grace_ms: u64) -> Result<()> {
        let now = unix_ms();
        for e in self.cloud.enis_by_tags(&self.cfg.node_tags(&self.node.id)).await? {
            if !crate::gc::detached_past_grace(&e, now, grace_ms) {
                continue;
            }
            let deleted = self.cloud.delete_eni(&e.id).await;
            if matches!(deleted, Ok(()) | Err(CloudError::NotFound { .. }))
                && self.spare.as_ref().is_some_and(|s| s.id == e.id)
            {
                self.spare = None;
            }
            match deleted {
                Ok(()) => {
                    self.metrics.eni_deleted();
                    tracing::info!("deleted leaked ENI {} (detached past the grace)", e.id);
                }
                Err(err) => state.record_error(format!("GC of leaked ENI {}: {err}", e.id)),
            }
        }
        Ok(())
    }
}

impl<C: Cloud + 'static, N: Node + 'static> Source for EniMode<C, N> {
    async fn sync(&mut self, state: &NodeState) -> Result<()> {
        // One describe: the leak sweep waits for the first create or the first step's end
        // (`first_sweep`).
        let enis = self.cloud.enis_of_instance(&self.node.id).await?;
        self.saw_attached(&enis);
        self.note_unprotected(&enis);
        // One look at the host for the whole sync: each offer marks the running pods' addresses.
        let running = self.node_ops.pods(&self.cfg.veth_prefix).await?;
        let mut seen = Vec::new();
        self.known.clear();
        for e in enis {
            let Some(idx) = e.attachment.as_ref().map(|a| a.device_index) else { continue };
            seen.push(idx);
            self.known.insert(e.id.clone(), e.clone());
            if idx > 0
                && let Err(err) = self.setup_link(&e, idx).await
            {
                state.record_error(format!("{} at device {idx}: {err}; its addresses wait", e.id));
                self.pending.entry(e.id.clone()).or_insert_with(|| Pending::new(idx));
                continue;
            }
            self.offer(state, &e, idx, &running);
        }
        let (lost, g) = state.change(|b| {
            let gone: Vec<u32> = b.pool.enis().map(|e| e.device_index).filter(|i| !seen.contains(i)).collect();
            gone.into_iter().flat_map(|i| b.pool.remove_eni_at(i)).collect::<Vec<_>>()
        });
        if !lost.is_empty() {
            state.record_error(format!("ENIs detached while ipamd was away took {} assigned addresses", lost.len()));
        }
        self.last_recheck = Some(Instant::now());
        state.commit(g).await?;
        crate::host::sync_host(state, &self.cfg.veth_prefix, &running).await
    }

    async fn step(&mut self, state: &NodeState) -> Result<Step> {
        self.read_this_step.clear();
        self.protect_again(state, false).await;
        self.finish_pending(state).await?;
        // Not fatal to the step: the addresses stay out of use meanwhile, and growth goes on.
        if let Err(e) = self.resume_releases(state).await {
            state.record_error(format!("finishing an earlier release: {e}"));
        }
        let ((mut stats, waiting), _) = state.change(|b| {
            b.pool.expire(unix_ms());
            (b.pool.stats_with(self.limits.slots_per_eni(), self.prefix_mode()), b.waiting)
        });
        stats.assigned += waiting;
        stats.enis += self.pending.len() as u32;
        let mut d = self.cfg.targets.decide(&stats, &self.limits);
        // The hold is settled here, before anything can fail the step: a step that grew (no
        // surplus) must forget an older surplus even when its growth then fails.
        let held_since = self.surplus_since;
        let release;
        (release, self.surplus_since) = crate::targets::hold_release(
            d.release,
            self.surplus_since,
            Instant::now(),
            Duration::from_millis(self.cfg.release_hold_ms),
        );
        let mut blocker = None;
        let mut acted = false;
        // Growth whose mutating call the node's budget would refuse anyway (no token before
        // the call's deadline) waits for a later step without spending describes on it: with
        // thousands of nodes sharing one account those are the scarcer budget.
        let wait = self.cloud.mutating_wait();
        if (d.grow > 0 || !d.new_enis.is_empty()) && wait > Duration::from_millis(self.cfg.cloud.call_timeout_ms) {
            blocker = Some(Blocker::Throttled(format!(
                "this node's EC2 budget: its next mutating call in {} s (cloud.rate_budget)",
                wait.as_secs()
            )));
            (d.grow, d.new_enis) = (0, Vec::new());
        }
        if d.grow > 0 {
            let (added, b) = self.grow(state, d.grow).await?;
            blocker = b;
            acted = added > 0;
        }
        for first in &d.new_enis {
            if let Some(b) = self.new_eni(state, *first).await? {
                blocker = Some(b);
                break;
            }
            acted = true;
        }
        if !self.pending.is_empty()
            && let Err(e) = self.finish_pending(state).await
        {
            // The hold that ended in this step stays ended: the next step releases.
            if release > 0 {
                self.surplus_since = held_since;
            }
            return Err(e);
        }
        if d.limited.is_some() && blocker.is_none() {
            let max = self.cfg.targets.max_enis(&self.limits);
            blocker = Some(Blocker::EniLimitReached(format!(
                "ENI limit reached: {} allows {max} ENIs × {} addresses each{}, all in use",
                self.node.instance_type,
                self.limits.slots_per_eni() * self.per_slot(),
                self.cfg.targets.max_eni.map(|m| format!(" (max_eni = {m})")).unwrap_or_default()
            )));
        }
        // What was picked, not what was asked: after a switch out of prefix mode a prefix's
        // free addresses count as surplus yet go back only with their prefix, and a step that
        // picks nothing must not hold the re-check off for ever.
        let released = if release > 0 { self.release(state, release).await? } else { 0 };
        self.protect_again(state, true).await;
        let (gc_every, recheck_every) = self.cfg.periodic_describes(self.cloud.share_of());
        if self.last_gc.is_none() {
            self.first_sweep(state).await?;
        } else if self.last_gc.is_some_and(|t| t.elapsed() >= gc_every.mul_f64(self.gc_jitter)) {
            self.last_gc = Some(Instant::now());
            self.gc_jitter = crate::clock::jitter();
            self.gc_leaked(state).await?;
        }
        // Not in a step that changed EC2: a describe right after a change may not show it yet.
        if !acted
            && released == 0
            && self.last_recheck.is_none_or(|t| t.elapsed() >= recheck_every.mul_f64(self.recheck_jitter))
        {
            self.last_recheck = Some(Instant::now());
            self.recheck_jitter = crate::clock::jitter();
            self.recheck(state).await?;
        }
        // What an Add that times out meanwhile is told is under way.
        let under_way: Vec<String> = self
            .pending
            .iter()
            .map(|(id, p)| {
                format!("{id} at device {} waiting for its link for {} s", p.device_index, p.since.elapsed().as_secs())
            })
            .collect();
        state.set_status(|s| s.growing = (!under_way.is_empty()).then(|| under_way.join(", ")));
        Ok(Step { blocker, again: acted && d.limited.is_none() })
    }
}
