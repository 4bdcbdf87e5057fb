//! Who may spend which share of a `strict` policy: the allocation protocol, as pure state
//! machines (time and messages are arguments; the runtime in [`super`] does the I/O).
//!
//! The replicated part is [`Control`], a join-semilattice sent in every peer message and answer:
//! the latest [`Allocation`] (a max register by [`Version`]) and one [`Record`] per replica (a
//! max register by `seq`, written only by that replica: what it has acknowledged, whether it has
//! retired, its demand). [`Node`] is one replica's view and what it may use.
//!
//! The rules (docs/crdt.md, "strict mode", has the argument):
//! * A replica that sees a newer allocation lowers what it uses to the smaller of its old and new
//!   share, and only then acknowledges it.
//! * It uses its new share in full once every (non-retired) member, and every replica it hears
//!   from, has acknowledged that exact allocation. So at any moment no replica uses more than its share of one allocation that
//!   everyone has lowered to: the shares in use sum to at most the whole.
//! * Shares are leases: a replica uses its share only until `lease` after sending a round that
//!   every other member answered. The proposer drops a member only after hearing nothing from it
//!   for `lease + guard` (plus a little, [`Node::receive`]) while it could hear anyone: by then
//!   the member has stopped spending, if clocks differ by less than `guard`. A replica whose lease ran out drops its shares to zero and takes a share again only
//!   from a newer allocation.
//! * The proposer is the lowest live member of the current allocation, and proposes only while a
//!   majority of the members is live; the first allocation waits until every discovered peer has
//!   answered.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::demand::Asked;
use super::share::{Ppm, WHOLE};
use crate::bucket::{Micros, Rate};

/// Orders allocations: by number, then by proposer (two proposers of the same number cannot
/// both win).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    pub number: u64,
    pub proposer: u64,
}

/// Shares of every strict policy among the members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub version: Version,
    pub members: BTreeSet<u64>,
    /// Policy name -> member -> share.
    pub shares: BTreeMap<String, BTreeMap<u64, Ppm>>,
}

impl Allocation {
    pub fn share(&self, policy: &str, replica: u64) -> Ppm {
        self.shares
            .get(policy)
            .and_then(|s| s.get(&replica))
            .copied()
            .unwrap_or(0)
    }

    /// Members, shares and sums are consistent (checked on everything received from a peer).
    pub fn validate(&self) -> Result<(), String> {
        const MAX_MEMBERS: usize = 1024;
        const MAX_POLICIES: usize = 1024;
        if self.members.len() > MAX_MEMBERS || self.shares.len() > MAX_POLICIES {
            return Err("allocation too large".into());
        }
        for (policy, shares) in &self.shares {
            let mut sum: u64 = 0;
            for (replica, &share) in shares {
                if !self.members.contains(replica) {
                    return Err(format!("share of policy {policy} for a non-member"));
                }
                sum += u64::from(share);
            }
            if sum > u64::from(WHOLE) {
                return Err(format!("shares of policy {policy} sum to {sum} ppm"));
            }
        }
        Ok(())
    }
}

/// What one replica says about itself. Only that replica writes it; `seq` orders its writes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// The allocation it has lowered to and acknowledged.
    pub acked: Option<Version>,
    /// It has left (SIGTERM) and will never spend again.
    pub retired: bool,
    /// Tokens it was asked for over the last demand window ([`Params::demand_window_us`]), per
    /// strict policy (admitted or not).
    pub demand: BTreeMap<String, u64>,
    /// Requests behind `demand` (what its counting noise depends on). Absent from replicas
    /// of an earlier version: their token counts stand in.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, u64>,
    /// Its lease ran out while this allocation was current: it spends nothing until a newer
    /// one, which the proposer therefore issues.
    pub expired: Option<Version>,
    /// The replica this one's process took over from (its snapshot directory's lock, which
    /// the kernel released when that process died: `crate::lineage`). That replica never
    /// spends again: it counts as retired. Absent from replicas of an earlier version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supersedes: Option<u64>,
}

/// The replicated control state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    pub allocation: Option<Allocation>,
    pub records: BTreeMap<u64, Record>,
}

impl Control {
    /// The join: the later allocation, and per replica the later record. Returns whether
    /// anything changed.
    pub fn join(&mut self, other: &Control) -> bool {
        let mut changed = false;
        if let Some(theirs) = &other.allocation {
            let newer = self
                .allocation
                .as_ref()
                .is_none_or(|ours| theirs.version > ours.version);
            if newer {
                self.allocation = Some(theirs.clone());
                changed = true;
            }
        }
        for (&replica, theirs) in &other.records {
            let ours = self.records.entry(replica).or_default();
            if theirs.seq > ours.seq {
                *ours = theirs.clone();
                changed = true;
            }
        }
        changed
    }

    pub fn validate(&self) -> Result<(), String> {
        const MAX_RECORDS: usize = 4096;
        if self.records.len() > MAX_RECORDS {
            return Err("too many replica records".into());
        }
        if let Some(allocation) = &self.allocation {
            allocation.validate()?;
            if allocation.version.number > MAX_COUNTER {
                return Err(format!(
                    "allocation number {} is beyond any a cluster reaches",
                    allocation.version.number
                ));
            }
        }
        if let Some(replica) = self
            .records
            .iter()
            .find_map(|(&replica, r)| (r.supersedes == Some(replica)).then_some(replica))
        {
            return Err(format!(
                "record of {replica:016x} says it supersedes itself"
            ));
        }
        if let Some((replica, record)) = self.records.iter().find(|(_, r)| r.seq > MAX_COUNTER) {
            return Err(format!(
                "record of {replica:016x} at seq {}, beyond any a replica reaches",
                record.seq
            ));
        }
        Ok(())
    }
}

/// Allocation numbers and record sequence numbers count up by one per change (a few a second);
/// 2^53 is millions of years away. One beyond it came from a peer that is not playing the
/// protocol (it would overflow the `+ 1` that follows, or freeze the counter): refused.
pub const MAX_COUNTER: u64 = 1 << 53;

/// Timing and fairness of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// How long a replica may spend after sending a round every member answered.
    pub lease_us: Micros,
    /// Clock-skew guard: shares of a silent member are reassigned after `lease + guard`.
    pub guard_us: Micros,
    /// At most one new allocation this often.
    pub rebalance_us: Micros,
    /// Share every live member keeps whatever its demand, so new traffic is served at once.
    pub floor: Ppm,
    /// A new allocation for demand alone only when a share would move by more than this...
    pub hysteresis: Ppm,
    /// ...plus this many standard deviations of the counting noise in the demand it follows.
    pub significance: u32,
    /// Demand is counted over this long (see [`super::demand`]).
    pub demand_window_us: Micros,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            lease_us: 1_000_000,
            guard_us: 500_000,
            rebalance_us: 1_000_000,
            floor: 20_000,
            hysteresis: 50_000,
            significance: 3,
            demand_window_us: 4_000_000,
        }
    }
}

/// One replica's protocol state.
#[derive(Debug, Clone)]
pub struct Node {
    pub me: u64,
    pub params: Params,
    pub control: Control,
    /// What this replica may use now, per policy (absent = 0).
    usable: BTreeMap<String, Ppm>,
    raised_on: Option<Version>,
    /// After a lease ran out: only allocations newer than this may raise shares again.
    expired_at_version: Option<Version>,
    lease_until: Micros,
    /// When a valid message or answer from each replica last arrived, moved later by the time
    /// this replica heard from no one at all (see [`Node::receive`]).
    heard: BTreeMap<u64, Micros>,
    /// When a valid message or answer from any peer last arrived.
    heard_any: Option<Micros>,
    /// When this replica first learned of each replica with a record in the control state
    /// (relayed by others, perhaps before hearing from it, or without ever hearing it).
    learned: BTreeMap<u64, Micros>,
    last_proposal: Option<Micros>,
}

impl Node {
    pub fn new(me: u64, params: Params) -> Self {
        let mut control = Control::default();
        control.records.insert(
            me,
            Record {
                seq: 1,
                ..Record::default()
            },
        );
        Self {
            me,
            params,
            control,
            usable: BTreeMap::new(),
            raised_on: None,
            expired_at_version: None,
            lease_until: 0,
            heard: BTreeMap::new(),
            heard_any: None,
            learned: BTreeMap::new(),
            last_proposal: None,
        }
    }

    pub fn usable(&self, policy: &str) -> Ppm {
        self.usable.get(policy).copied().unwrap_or(0)
    }

    pub fn usable_shares(&self) -> &BTreeMap<String, Ppm> {
        &self.usable
    }

    pub fn lease_until(&self) -> Micros {
        self.lease_until
    }

    pub fn allocation(&self) -> Option<&Allocation> {
        self.control.allocation.as_ref()
    }

    fn record_mut(&mut self) -> &mut Record {
        let record = self.control.records.entry(self.me).or_default();
        record.seq += 1;
        record
    }

    fn my_record(&self) -> Option<&Record> {
        self.control.records.get(&self.me)
    }

    pub fn is_retired(&self) -> bool {
        self.my_record().is_some_and(|r| r.retired)
    }

    /// Merge a peer's control state (from a message it sent or an answer it gave) and note that
    /// it is alive.
    pub fn receive(&mut self, from: u64, control: &Control, now: Micros) {
        if from != self.me {
            // Silence counts against a peer only while this replica could hear: a peer it did
            // not hear while it heard no one may have been spending all along, renewing its
            // lease with members this replica was cut off from (found by the simulated
            // cluster: a proposer back from a partition dropped a replica it had not heard
            // for 2.5 s, which had renewed its lease with the others until 0.9 s before, and
            // raised its own share over it). Time beyond `isolation` with no message from
            // anyone is taken off every peer's silence.
            if let Some(last) = self.heard_any {
                let excess = now.saturating_sub(last).saturating_sub(self.isolation_us());
                if excess > 0 {
                    for heard in self.heard.values_mut().chain(self.learned.values_mut()) {
                        *heard = (*heard + excess).min(now);
                    }
                }
            }
            self.heard_any = Some(self.heard_any.map_or(now, |last| last.max(now)));
            let heard = self.heard.entry(from).or_insert(0);
            *heard = (*heard).max(now);
        }
        // Our own record is ours alone: a peer's copy of it is never newer than ours.
        let mut theirs = control.clone();
        theirs.records.remove(&self.me);
        self.control.join(&theirs);
        for &replica in self.control.records.keys() {
            if replica != self.me {
                self.learned.entry(replica).or_insert(now);
            }
        }
        // A member this replica has never heard from counts as heard from now: its silence
        // starts when this replica learns of it, not before. Otherwise a proposer that was
        // cut off while a replica joined would drop that member at once, without waiting out
        // its lease, and raise over a share still in use (found by the simulated cluster: a
        // replica partitioned while another restarted dropped the restarted one on its return
        // and took 67 % while the other still spent 11 % of an allocation it had not seen).
        if let Some(allocation) = &self.control.allocation {
            for &member in &allocation.members {
                if member != self.me {
                    self.heard.entry(member).or_insert(now);
                }
            }
        }
    }

    /// Publish this replica's demand (tokens asked for over the last demand window, per policy).
    pub fn set_demand(&mut self, asked: BTreeMap<String, Asked>) {
        let demand: BTreeMap<String, u64> =
            asked.iter().map(|(p, a)| (p.clone(), a.tokens)).collect();
        let requests: BTreeMap<String, u64> =
            asked.iter().map(|(p, a)| (p.clone(), a.requests)).collect();
        if self
            .my_record()
            .is_some_and(|r| r.demand == demand && r.requests == requests)
        {
            return;
        }
        let record = self.record_mut();
        record.demand = demand;
        record.requests = requests;
    }

    /// A gap in everything heard up to this long is not taken off a peer's silence (a peer
    /// sends every sync round, so a connected replica hears someone many times in it); so a
    /// peer counts as gone only after `lease + guard + isolation` of silence.
    fn isolation_us(&self) -> Micros {
        self.params.guard_us / 5
    }

    fn is_live(&self, replica: u64, now: Micros) -> bool {
        replica == self.me
            || self.heard.get(&replica).is_some_and(|&t| {
                now.saturating_sub(t)
                    < self.params.lease_us + self.params.guard_us + self.isolation_us()
            })
    }

    /// It said it left, or a process that took over from it said so ([`Node::supersede`]).
    fn is_retired_replica(&self, replica: u64) -> bool {
        self.control
            .records
            .get(&replica)
            .is_some_and(|r| r.retired)
            || self
                .control
                .records
                .values()
                .any(|r| r.supersedes == Some(replica))
    }

    /// Forget the replicas gone for good: those that retired (they said they left) or that a
    /// process taking over their snapshot directory superseded, once they are no member of the
    /// allocation this replica holds and not heard from for as long as a silent replica counts
    /// as live. Every process start is a new replica with a record, relayed to every replica:
    /// without this a cluster living through rolling updates carried every replica it ever had
    /// in each message, and past 4096 ([`Control::validate`]) its peers refused every message.
    ///
    /// Safe because a gone replica never spends again and nothing about it is consulted once it
    /// is out of the allocation: the proposer, the lease and the raise look at members, at
    /// replicas heard from recently, and at records not yet known for that long (which a
    /// retired or superseded record never holds back). A lagging peer may relay a forgotten
    /// record again; it is still retired or superseded, and is forgotten again here.
    ///
    /// A replica that crashed with neither a successor nor a goodbye (a node lost with its pod)
    /// is not recognisably gone from its record, and its record stays (docs/crdt.md).
    fn forget_departed(&mut self, now: Micros) {
        let superseded: BTreeSet<u64> = self
            .control
            .records
            .values()
            .filter_map(|r| r.supersedes)
            .collect();
        let members = self.control.allocation.as_ref().map(|a| &a.members);
        let gone: Vec<u64> = self
            .control
            .records
            .iter()
            .filter(|&(&replica, record)| {
                replica != self.me
                    && (record.retired || superseded.contains(&replica))
                    && members.is_none_or(|m| !m.contains(&replica))
                    && !self.is_live(replica, now)
            })
            .map(|(&replica, _)| replica)
            .collect();
        for replica in gone {
            self.control.records.remove(&replica);
            self.heard.remove(&replica);
            self.learned.remove(&replica);
        }
    }

    /// Members whose answers a lease needs and whose acknowledgements a raise needs.
    fn active_members(&self) -> Vec<u64> {
        self.control.allocation.as_ref().map_or_else(Vec::new, |a| {
            a.members
                .iter()
                .copied()
                .filter(|&m| !self.is_retired_replica(m))
                .collect()
        })
    }

    /// A round sent at `sent_at` was answered by `answered` (after their answers were merged
    /// and [`Node::step`] ran): renew the lease if every other active member is among them.
    pub fn round_answered(&mut self, sent_at: Micros, answered: &BTreeSet<u64>) {
        let Some(allocation) = &self.control.allocation else {
            return;
        };
        // An answer may have brought a newer allocation: renew only once `step` has lowered to
        // it, so a renewed lease never covers a share someone else may be given.
        let acked = self.my_record().and_then(|r| r.acked);
        if !allocation.members.contains(&self.me) || acked != Some(allocation.version) {
            return;
        }
        let all = self
            .active_members()
            .into_iter()
            .all(|m| m == self.me || answered.contains(&m));
        if all {
            self.lease_until = self.lease_until.max(sent_at + self.params.lease_us);
        }
    }

    /// Say that `predecessor`, the replica whose process this one took over from, is gone for
    /// good (`crate::lineage`: its lock was released, so its process has exited): peers count
    /// it as retired at once, instead of waiting out its lease while every lease needs its
    /// answers. Called before this replica sends anything.
    pub fn supersede(&mut self, predecessor: u64) {
        if predecessor != self.me {
            self.record_mut().supersedes = Some(predecessor);
        }
    }

    /// Leave: stop spending for good and say so.
    pub fn retire(&mut self) -> Vec<(String, Ppm)> {
        let changes = self.lower_all_to_zero();
        self.record_mut().retired = true;
        changes
    }

    fn lower_all_to_zero(&mut self) -> Vec<(String, Ppm)> {
        let changes: Vec<(String, Ppm)> = self
            .usable
            .iter()
            .filter(|&(_, &u)| u > 0)
            .map(|(p, _)| (p.clone(), 0))
            .collect();
        self.usable.clear();
        changes
    }

    /// Advance the protocol at `now`. `policies`: the strict policies in force here and their
    /// rates;
    /// `all_peers_answered`: every peer discovery lists has answered recently (for the first
    /// allocation). Returns the share changes to apply, in order, BEFORE anything this node
    /// says (its record) is sent to a peer.
    pub fn step(
        &mut self,
        now: Micros,
        policies: &[(String, Rate)],
        all_peers_answered: bool,
    ) -> Vec<(String, Ppm)> {
        let mut changes = Vec::new();
        if self.is_retired() {
            return changes;
        }
        self.forget_departed(now);
        // 1. A lease that ran out: stop, and wait for a newer allocation.
        let expired = self.control.allocation.as_ref().map(|a| a.version);
        if now >= self.lease_until
            && (self.raised_on.is_some() || !self.usable.is_empty())
            && expired.is_some()
        {
            changes.extend(self.lower_all_to_zero());
            self.expired_at_version = expired;
            self.raised_on = None;
            self.record_mut().expired = expired;
        }
        // 2. Propose, if this replica is the proposer and something should change.
        if let Some(next) = self.proposal(now, policies, all_peers_answered) {
            self.control.allocation = Some(next);
            self.last_proposal = Some(now);
        }
        // 3. A newer allocation: lower to min(old, new), then acknowledge.
        if let Some(allocation) = self.control.allocation.clone() {
            let acked = self.my_record().and_then(|r| r.acked);
            if acked.is_none_or(|v| allocation.version > v) {
                let mut lowered = BTreeMap::new();
                for (policy, &u) in &self.usable {
                    let new = u.min(allocation.share(policy, self.me));
                    if new != u {
                        changes.push((policy.clone(), new));
                    }
                    if new > 0 {
                        lowered.insert(policy.clone(), new);
                    }
                }
                self.usable = lowered;
                self.record_mut().acked = Some(allocation.version);
            }
            // 4. Everyone has lowered to it: use it in full (while the lease holds).
            let version = allocation.version;
            let can_raise = self.raised_on != Some(version)
                && self.expired_at_version.is_none_or(|v| version > v)
                && allocation.members.contains(&self.me)
                && now < self.lease_until
                && self
                    .active_members()
                    .iter()
                    .all(|m| self.control.records.get(m).and_then(|r| r.acked) == Some(version))
                // And every replica this one hears from, member or not: one that another
                // proposer's allocation still gives a share must have lowered to this one first.
                && self.heard.keys().all(|&r| {
                    !self.is_live(r, now)
                        || self.is_retired_replica(r)
                        || self.control.records.get(&r).and_then(|rec| rec.acked) == Some(version)
                })
                // And every replica it has only heard of, for as long as a silent member counts
                // as live: one may spend under an allocation this replica never held (found
                // by the simulated cluster: a proposer cut off while a crashed replica's
                // successor joined the others came back with a newer allocation without it,
                // raised over the share the successor, cut off in turn, still spent).
                && self.control.records.iter().all(|(&r, rec)| {
                    r == self.me
                        || self.heard.contains_key(&r)
                        || self.is_retired_replica(r)
                        || rec.acked == Some(version)
                        || self.learned.get(&r).is_none_or(|&t| {
                            now.saturating_sub(t)
                                >= self.params.lease_us + self.params.guard_us + self.isolation_us()
                        })
                });
            if can_raise {
                let mut full = BTreeMap::new();
                for (policy, shares) in &allocation.shares {
                    let share = shares.get(&self.me).copied().unwrap_or(0);
                    if share != self.usable(policy) {
                        changes.push((policy.clone(), share));
                    }
                    if share > 0 {
                        full.insert(policy.clone(), share);
                    }
                }
                for (policy, &u) in &self.usable {
                    if u > 0 && !full.contains_key(policy) {
                        changes.push((policy.clone(), 0));
                    }
                }
                self.usable = full;
                self.raised_on = Some(version);
            }
        }
        changes
    }

    /// The next allocation, if this replica should propose one now.
    fn proposal(
        &self,
        now: Micros,
        policies: &[(String, Rate)],
        all_peers_answered: bool,
    ) -> Option<Allocation> {
        if self
            .last_proposal
            .is_some_and(|t| now.saturating_sub(t) < self.params.rebalance_us)
        {
            return None;
        }
        let heard_live: BTreeSet<u64> = std::iter::once(self.me)
            .chain(self.heard.keys().copied())
            .filter(|&r| self.is_live(r, now) && !self.is_retired_replica(r))
            .collect();
        let Some(current) = &self.control.allocation else {
            // The first allocation: everyone discovery knows must be heard from, so two sides
            // of a partition cannot both start one.
            if !all_peers_answered || heard_live.first() != Some(&self.me) {
                return None;
            }
            return Some(self.allocate(
                Version {
                    number: 1,
                    proposer: self.me,
                },
                &heard_live,
                policies,
                None,
            ));
        };
        let active = self.active_members();
        if !active.contains(&self.me) {
            return None;
        }
        let live: Vec<u64> = active
            .iter()
            .copied()
            .filter(|&m| self.is_live(m, now))
            .collect();
        if live.first() != Some(&self.me) || live.len() * 2 <= active.len() {
            return None;
        }
        let dropping = live.len() < current.members.len();
        let fully_acked = active
            .iter()
            .all(|m| self.control.records.get(m).and_then(|r| r.acked) == Some(current.version));
        if !fully_acked && !dropping {
            return None;
        }
        // Live members, plus live replicas that are not members yet.
        let members: BTreeSet<u64> = live.iter().copied().chain(heard_live).collect();
        let next = self.allocate(
            Version {
                number: current.version.number + 1,
                proposer: self.me,
            },
            &members,
            policies,
            Some(current),
        );
        let waiting = live
            .iter()
            .any(|m| self.control.records.get(m).and_then(|r| r.expired) == Some(current.version));
        // `allocate` keeps a policy's current shares unless demand moved them significantly.
        let moved = waiting || next.members != current.members || next.shares != current.shares;
        moved.then_some(next)
    }

    /// Shares following demand, policy by policy ([`Node::split`]). A policy keeps the shares
    /// `current` gives it when the members are the same and demand does not say they are wrong.
    fn allocate(
        &self,
        version: Version,
        members: &BTreeSet<u64>,
        policies: &[(String, Rate)],
        current: Option<&Allocation>,
    ) -> Allocation {
        let same_members = current.filter(|c| &c.members == members);
        let shares = policies
            .iter()
            .map(|(policy, rate)| {
                let kept = same_members.and_then(|c| c.shares.get(policy));
                (policy.clone(), self.split(members, policy, *rate, kept))
            })
            .collect();
        Allocation {
            version,
            members: members.clone(),
            shares,
        }
    }

    /// One policy's shares among `members`: a floor `f` each, the rest `1 − n·f` split by
    /// weights `a_i` that sum to 1. With `c_i` the tokens member `i` was asked for over the
    /// demand window `W`, `N = Σ c_i`, `p_i = c_i / N` its part of the demand, and `ρ =
    /// min(1, N / (r·W))` the policy's load (demand over what its bucket refills in `W`):
    ///
    /// ```text
    /// a_i = ((1 + ρ)·p_i + (1 − ρ)/n) / 2        (1/n when N = 0)
    /// ```
    ///
    /// Over its limit a policy is split in proportion to demand. Under it, half of the room
    /// nobody asked for is split evenly, so a member whose demand the counts under-state still
    /// has room, and the other half in proportion, so the busiest member is not loaded much
    /// above the policy: a member with all the demand gets `(1 + ρ)/2 + (1 − ρ)/(2n)` of the
    /// rest, at least `0.75` of it for a policy at half its limit.
    ///
    /// Counts are noisy (a count `c` is uncertain by about `√c`), and a low-rate policy's are
    /// mostly noise: a client at 10 requests/s over three replicas shows each about 13 ± 4
    /// tokens in 4 s. So the split is the even one while the counts are consistent with an
    /// even spread: no member's target is further from `1/n` than the hysteresis plus
    /// `significance` standard deviations of what an even spread's counting noise does to it,
    /// `σ(a_i) = (1 + ρ)/(2n) · √((n − 1)/R)`, `R` the requests behind the `N` tokens (requests
    /// costing `k` tokens each make a token count `k` times as lumpy: it is the requests that
    /// are counted at random). Otherwise it follows the counts. Either way
    /// `kept` (the shares in force) stays unless some share would move by more than the
    /// hysteresis.
    fn split(
        &self,
        members: &BTreeSet<u64>,
        policy: &str,
        rate: Rate,
        kept: Option<&BTreeMap<u64, Ppm>>,
    ) -> BTreeMap<u64, Ppm> {
        /// Counts beyond this (a trillion tokens per window) are clamped, so the arithmetic
        /// below stays within u128.
        const MAX_COUNT: u64 = 1 << 40;
        /// Weights in parts per billion.
        const PPB: u128 = 1_000_000_000;
        let n = members.len().max(1) as u64;
        let floor = u64::from(self.params.floor).min(u64::from(WHOLE) / (2 * n));
        let rest = u128::from(u64::from(WHOLE) - floor * n);
        let asked: Vec<(u64, u64)> = members
            .iter()
            .map(|&m| {
                let c = self
                    .control
                    .records
                    .get(&m)
                    .and_then(|r| r.demand.get(policy))
                    .copied()
                    .unwrap_or(0);
                (m, c.min(MAX_COUNT))
            })
            .collect();
        // The counting noise is that of the requests (tokens stand in for a record that does
        // not say, which over-states it least for the usual cost of one).
        let requests: u64 = members
            .iter()
            .filter_map(|m| self.control.records.get(m))
            .map(|r| {
                r.requests
                    .get(policy)
                    .or_else(|| r.demand.get(policy))
                    .copied()
                    .unwrap_or(0)
                    .min(MAX_COUNT)
            })
            .sum();
        // Tokens times the interval in µs, so that r·W is an integer.
        let interval_us = u128::from(rate.interval_ms()) * 1000;
        let n = u128::from(n);
        let total = asked.iter().map(|&(_, c)| u128::from(c)).sum::<u128>() * interval_us;
        let refilled = u128::from(rate.capacity()) * u128::from(self.params.demand_window_us);
        let load = total * PPB / total.max(refilled).max(1);
        let share_of = |c: u64| -> Ppm {
            // Each part rounds down, so the weights sum to at most PPB and the shares to at
            // most the whole.
            let weight = match total {
                0 => PPB / n,
                _ => {
                    (PPB + load) * u128::from(c) * interval_us / (2 * total)
                        + (PPB - load) / (2 * n)
                }
            };
            (u128::from(floor) + rest * weight / PPB) as Ppm
        };
        let even = (u128::from(floor) + rest / n) as Ppm;
        let noise = rest as f64 * (1.0 + load as f64 / PPB as f64) / (2.0 * n as f64)
            * ((n - 1) as f64 / (requests as f64).max(1.0)).sqrt();
        let tolerance =
            f64::from(self.params.hysteresis) + f64::from(self.params.significance) * noise;
        let target: BTreeMap<u64, Ppm> = asked.iter().map(|&(m, c)| (m, share_of(c))).collect();
        let spread = target
            .values()
            .any(|&t| f64::from(t.abs_diff(even)) > tolerance);
        let chosen = if spread {
            target
        } else {
            members.iter().map(|&m| (m, even)).collect()
        };
        match kept {
            Some(kept)
                if chosen.iter().all(|(m, &u)| {
                    u.abs_diff(kept.get(m).copied().unwrap_or(0)) <= self.params.hysteresis
                }) =>
            {
                members
                    .iter()
                    .map(|m| (*m, kept.get(m).copied().unwrap_or(0)))
                    .collect()
            }
            _ => chosen,
        }
    }
}
