//! `strict` mode: escrow. Each replica decides a strict policy's requests from a private
//! sub-bucket holding its share of the policy's capacity and refill ([`share`]); the shares are
//! allocated by the protocol in [`protocol`], whose state travels with every replication message.
//! Only refill creates tokens and the shares in use never sum above the whole, so a cluster
//! admits at most `C + r·T` over any period `T`, whatever the replicas do not yet know about each
//! other (docs/crdt.md, "strict mode", derives it and states the clock-skew guard).
//!
//! Every instant here is on [`Clock::steady_now`], never on the cluster clock decisions use:
//! a clock that steps forward by `Δ` (following NTP or a faster peer) would refill every
//! sub-bucket by `u_i·r·Δ` and shorten every silence, and strict mode's bound allows neither.
//!
//! This module is the runtime around the pure parts: it reads the clock, holds the locks, and
//! measures demand. Lock order: `node`, then `shares`, then a bucket shard. A decision takes
//! `shares` for reading, so a share change (under the write lock) waits for decisions in flight,
//! and what the node acknowledges afterwards is in force for every later decision.

pub mod demand;
pub mod protocol;
pub mod share;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde::Serialize;

use self::demand::DemandMeter;
use self::protocol::{Control, Node, Params};
use self::share::{LoanAsk, Ppm, ShareHistory, SubBucket, WHOLE, cost_units};
use crate::bucket::{MAX_INTERVAL_MS, Micros, Outcome, Rate};
use crate::clock::Clock;
use crate::crdt::ReplicaId;
use crate::policy::{Mode, PolicySet};
use crate::store::PolicyId;
use crate::store::SweepReport;

const SHARDS: usize = 64;
/// Demand is published this often (counted over the protocol's demand window).
const DEMAND_SLOT_US: Micros = 500_000;

type Keys = HashMap<Box<str>, SubBucket, foldhash::fast::RandomState>;

/// Escrow state of one replica.
#[derive(Debug)]
pub struct Escrow {
    clock: Arc<dyn Clock>,
    node: Mutex<Node>,
    /// Per strict policy name: this replica's share over time.
    shares: RwLock<HashMap<String, ShareHistory>>,
    /// Mirror of the node's lease, read by every decision.
    lease_until: AtomicU64,
    buckets: Box<[Mutex<HashMap<PolicyId, Keys>>]>,
    /// Tokens asked for per policy.
    asked: Mutex<DemandMeter>,
    /// Keys whose last loan fell short: (when, units the whole cluster held at most then).
    dry: Mutex<HashMap<(PolicyId, Box<str>), DryNote>>,
}

/// (When, units the whole cluster held at most then.)
type DryNote = (Micros, i128);

/// What a refused strict request lacks, for a loan from peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    /// Units (`share::cost_units`) this replica lacks for the request.
    pub units: i128,
    /// The request's whole cost in units.
    pub needed: i128,
    /// This replica's sub-bucket level (spendable or not: a lapsed lease spends none of it).
    pub own_level: i128,
    /// Its capacity while its lease holds (0 otherwise): a lender evens out with it.
    pub room: i128,
}

/// What `/status` shows about escrow.
#[derive(Debug, Clone, Serialize)]
pub struct EscrowStatus {
    pub replica: String,
    pub allocation: Option<u64>,
    pub proposer: Option<String>,
    pub members: Vec<String>,
    /// Shares this replica uses now, as fractions of each policy.
    pub usable: BTreeMap<String, f64>,
    /// How much longer this replica's lease runs: 0 without one (never granted, or run out),
    /// when it spends no strict share.
    pub lease_remaining_ms: i64,
    pub sub_buckets: usize,
}

impl Escrow {
    pub fn new(replica: ReplicaId, params: Params, clock: Arc<dyn Clock>) -> Self {
        let now = clock.steady_now();
        Self {
            clock,
            node: Mutex::new(Node::new(replica.0, params)),
            asked: Mutex::new(DemandMeter::new(
                now,
                params.demand_window_us,
                DEMAND_SLOT_US,
            )),
            shares: RwLock::default(),
            lease_until: AtomicU64::new(0),
            buckets: (0..SHARDS).map(|_| Mutex::default()).collect(),
            dry: Mutex::default(),
        }
    }

    /// `predecessor`: the replica whose process this one took over from (`crate::lineage`), gone
    /// for good; peers count it as retired at once (`Node::supersede`).
    pub fn supersede(&self, predecessor: ReplicaId) {
        self.node().supersede(predecessor.0);
    }

    fn node(&self) -> MutexGuard<'_, Node> {
        self.node.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, HashMap<PolicyId, Keys>> {
        let hash = foldhash::fast::FixedState::default().hash_one(key);
        self.buckets[(hash as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Spend `cost` tokens of `key` from this replica's share of `policy` (no loans: see
    /// [`Escrow::decide_or_shortfall`]).
    pub fn decide(
        &self,
        policy_id: PolicyId,
        policy: &str,
        key: &str,
        rate: Rate,
        cost: u64,
    ) -> Outcome {
        self.decide_or_shortfall(policy_id, policy, key, rate, cost)
            .0
    }

    /// Like [`Escrow::decide`], and when refused, what borrowing from peers could still do:
    /// `Some(units this replica lacks)` unless a recent failed loan showed that the cluster
    /// cannot hold the cost yet ([`Escrow::note_dry`]).
    pub fn decide_or_shortfall(
        &self,
        policy_id: PolicyId,
        policy: &str,
        key: &str,
        rate: Rate,
        cost: u64,
    ) -> (Outcome, Option<Shortfall>) {
        self.asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(policy, cost);
        let (outcome, shortfall, own_level, room) =
            self.with_history_or_none(policy, |history, now, lease_ok| {
                // No allocation has reached this replica yet: all of it must be borrowed.
                let Some(history) = history else {
                    let empty = SubBucket { level: 0, at: now };
                    return (
                        empty.describe(rate, 0, false, cost),
                        cost_units(rate, cost),
                        0,
                        0,
                    );
                };
                let mut shard = self.shard(key);
                let keys = shard.entry(policy_id).or_default();
                let bucket = match keys.get_mut(key) {
                    Some(bucket) => bucket,
                    None => keys
                        .entry(key.into())
                        .or_insert_with(|| SubBucket::fresh(history, rate, now)),
                };
                if !lease_ok {
                    // The lease ran out: spend nothing of this share until the node has renewed
                    // it or given it up (see `tick`); a loan may still pay the whole cost.
                    history.settle(bucket, rate, now);
                    let level = bucket.level;
                    return (
                        bucket.describe(rate, 0, false, cost),
                        cost_units(rate, cost),
                        level,
                        0,
                    );
                }
                let outcome = bucket.try_spend(history, rate, cost, now);
                let room = SubBucket::capacity_now(history, rate);
                (outcome, bucket.shortfall(rate, cost), bucket.level, room)
            });
        if outcome.allowed {
            return (outcome, None);
        }
        let needed = cost_units(rate, cost);
        let shortfall = (!self.is_dry(policy_id, key, rate, needed)).then_some(Shortfall {
            units: shortfall,
            needed,
            own_level,
            room,
        });
        (outcome, shortfall)
    }

    /// What [`Escrow::decide_or_shortfall`] would find lacking for `cost` now, without
    /// spending: `None` when this replica's sub-bucket pays it, or when a recent failed loan
    /// showed the cluster cannot ([`Escrow::note_dry`]). The cost counts as asked, as a
    /// decision's does. For callers that check several buckets before spending any (Envoy's
    /// rate limit service: all or nothing), borrow, and then spend with
    /// [`Escrow::spend_with_loan`].
    pub fn shortfall(
        &self,
        policy_id: PolicyId,
        policy: &str,
        key: &str,
        rate: Rate,
        cost: u64,
    ) -> Option<Shortfall> {
        self.asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(policy, cost);
        let (units, own_level, room) =
            self.with_history_or_none(policy, |history, now, lease_ok| {
                let Some(history) = history else {
                    return (cost_units(rate, cost), 0, 0);
                };
                let bucket = self.settled(policy_id, key, history, rate, now);
                if !lease_ok {
                    return (cost_units(rate, cost), bucket.level, 0);
                }
                (
                    bucket.shortfall(rate, cost),
                    bucket.level,
                    SubBucket::capacity_now(history, rate),
                )
            });
        let needed = cost_units(rate, cost);
        (units > 0 && !self.is_dry(policy_id, key, rate, needed)).then_some(Shortfall {
            units,
            needed,
            own_level,
            room,
        })
    }

    /// Whether a recent failed loan for `key` showed that the whole cluster cannot hold
    /// `needed` units yet.
    fn is_dry(&self, policy_id: PolicyId, key: &str, rate: Rate, needed: i128) -> bool {
        let now = self.clock.steady_now();
        self.dry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(policy_id, Box::<str>::from(key)))
            .is_some_and(|&(at, held)| {
                held.saturating_add(cluster_refill(rate, now.saturating_sub(at))) < needed
            })
    }

    /// Lend part of `key`'s sub-bucket to a peer (see [`SubBucket::lend`]): nothing unless
    /// this replica's lease holds. Returns what was lent and the sub-bucket's
    /// level before (which the borrower adds up to decide whether several loans could do).
    pub fn lend(
        &self,
        policy_id: PolicyId,
        policy: &str,
        key: &str,
        rate: Rate,
        ask: LoanAsk,
    ) -> (i128, i128) {
        self.with_history_or_none(policy, |history, now, lease_ok| {
            let Some(history) = history else {
                return (0, 0);
            };
            let mut shard = self.shard(key);
            let keys = shard.entry(policy_id).or_default();
            let bucket = keys
                .entry(key.into())
                .or_insert_with(|| SubBucket::fresh(history, rate, now));
            if !lease_ok {
                history.settle(bucket, rate, now);
                return (0, bucket.level);
            }
            bucket.lend(history, rate, ask, now)
        })
    }

    /// Decide a request [`Escrow::decide_or_shortfall`] refused, now with `loan` units peers
    /// lent for it (see [`SubBucket::spend_with_loan`]).
    pub fn spend_with_loan(
        &self,
        policy_id: PolicyId,
        policy: &str,
        key: &str,
        rate: Rate,
        cost: u64,
        loan: i128,
    ) -> Outcome {
        self.with_history_or_none(policy, |history, now, lease_ok| {
            let mut shard = self.shard(key);
            let keys = shard.entry(policy_id).or_default();
            match history {
                Some(history) => {
                    let bucket = keys
                        .entry(key.into())
                        .or_insert_with(|| SubBucket::fresh(history, rate, now));
                    bucket.spend_with_loan(history, rate, cost, loan, lease_ok, now)
                }
                // No allocation has reached this replica: only the loan can pay, and nothing
                // of it can stay here.
                None => {
                    let allowed = loan >= cost_units(rate, cost);
                    SubBucket { level: 0, at: now }.describe(rate, 0, allowed, cost)
                }
            }
        })
    }

    /// Add `units` a peer lent only to even out with this replica's sub-bucket of `key` (see
    /// [`SubBucket::take_balance`]). A share of nothing (no allocation yet) keeps nothing.
    pub fn take_balance(
        &self,
        policy_id: PolicyId,
        policy: &str,
        key: &str,
        rate: Rate,
        units: i128,
    ) {
        self.with_history_or_none(policy, |history, now, _| {
            let Some(history) = history else {
                return;
            };
            let mut shard = self.shard(key);
            let keys = shard.entry(policy_id).or_default();
            keys.entry(key.into())
                .or_insert_with(|| SubBucket::fresh(history, rate, now))
                .take_balance(history, rate, units, now);
        });
    }

    /// This replica's level of `key` now (settled; a fresh sub-bucket's if it has none): what
    /// it keeps, in an evening-out loan.
    pub fn level(&self, policy_id: PolicyId, policy: &str, key: &str, rate: Rate) -> i128 {
        self.with_history_or_none(policy, |history, now, _| {
            let Some(history) = history else {
                return 0;
            };
            let bucket = self.settled(policy_id, key, history, rate, now);
            bucket.level
        })
    }

    /// A loan for `key` fell short and every replica that could hold a part of it said what
    /// it held: `held` units in all, at most, now (tokens lent to an evening out and perhaps
    /// still in transit included: `Replicator::in_transit`). Until refill could have brought
    /// that to a request's cost, such requests are refused without asking the peers again (the
    /// cluster refills at most at the policy's whole rate, so this refuses nothing loans could
    /// pay).
    pub fn note_dry(&self, policy_id: PolicyId, key: &str, held: i128) {
        let now = self.clock.steady_now();
        self.dry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((policy_id, key.into()), (now, held));
    }

    /// What a decision would see, without spending.
    pub fn peek(
        &self,
        policy_id: PolicyId,
        policy: &str,
        key: &str,
        rate: Rate,
        cost: u64,
    ) -> Outcome {
        self.with_history(policy, rate, cost, |history, now, lease_ok| {
            let bucket = self.settled(policy_id, key, history, rate, now);
            let share = if lease_ok { history.current() } else { 0 };
            let allowed = lease_ok && bucket.level >= share::cost_units(rate, cost);
            bucket.describe(rate, share, allowed, cost)
        })
    }

    /// What [`Escrow::spend_with_loan`] would decide with `loan` units lent, without spending.
    pub fn peek_with_loan(
        &self,
        policy_id: PolicyId,
        policy: &str,
        key: &str,
        rate: Rate,
        cost: u64,
        loan: i128,
    ) -> Outcome {
        self.with_history_or_none(policy, |history, now, lease_ok| {
            let Some(history) = history else {
                let allowed = loan >= cost_units(rate, cost);
                return SubBucket { level: 0, at: now }.describe(rate, 0, allowed, cost);
            };
            let bucket = self.settled(policy_id, key, history, rate, now);
            let own = if lease_ok { bucket.level } else { 0 };
            let share = if lease_ok { history.current() } else { 0 };
            let allowed = own + loan >= cost_units(rate, cost);
            bucket.describe(rate, share, allowed, cost)
        })
    }

    /// A copy of this replica's sub-bucket of `key`, settled at `now` (a fresh one's if it has
    /// none): what a peek, a shortfall or an evening-out sees, without changing anything.
    fn settled(
        &self,
        policy_id: PolicyId,
        key: &str,
        history: &ShareHistory,
        rate: Rate,
        now: Micros,
    ) -> SubBucket {
        let mut bucket = self
            .shard(key)
            .get(&policy_id)
            .and_then(|keys| keys.get(key))
            .copied()
            .unwrap_or_else(|| SubBucket::fresh(history, rate, now));
        history.settle(&mut bucket, rate, now);
        bucket
    }

    /// Run `decide` with this policy's share history, the time (read under the shares lock, so
    /// after every share change made before it) and whether the lease holds. A policy with no
    /// history yet (no allocation has reached this replica) grants nothing.
    fn with_history(
        &self,
        policy: &str,
        rate: Rate,
        cost: u64,
        decide: impl FnOnce(&ShareHistory, Micros, bool) -> Outcome,
    ) -> Outcome {
        let shares = self.shares.read().unwrap_or_else(|p| p.into_inner());
        let now = self.clock.steady_now();
        match shares.get(policy) {
            None => SubBucket { level: 0, at: now }.describe(rate, 0, false, cost),
            Some(history) => decide(history, now, now < self.lease_until.load(Ordering::Acquire)),
        }
    }

    /// [`Escrow::with_history`] for the loan paths, which also act before any allocation.
    fn with_history_or_none<T>(
        &self,
        policy: &str,
        act: impl FnOnce(Option<&ShareHistory>, Micros, bool) -> T,
    ) -> T {
        let shares = self.shares.read().unwrap_or_else(|p| p.into_inner());
        let now = self.clock.steady_now();
        let lease_ok = now < self.lease_until.load(Ordering::Acquire);
        act(shares.get(policy), now, lease_ok)
    }

    /// The members of the allocation this replica follows, with their shares of `policy`
    /// (largest first): whom to ask for a loan. Empty before any allocation.
    pub fn lenders(&self, policy: &str) -> Vec<(u64, Ppm)> {
        let node = self.node();
        let Some(allocation) = node.allocation() else {
            return Vec::new();
        };
        let mut members: Vec<(u64, Ppm)> = allocation
            .members
            .iter()
            .filter(|&&m| m != node.me)
            .map(|&m| (m, allocation.share(policy, m)))
            .collect();
        members.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        members
    }

    /// The control state to send to peers.
    pub fn control(&self) -> Control {
        self.node().control.clone()
    }

    /// Merge a peer's control state (it sent a message or answered one).
    pub fn receive(&self, from: u64, control: &Control) {
        let now = self.clock.steady_now();
        self.node().receive(from, control, now);
    }

    /// A round of messages sent at `sent_at` was answered by `answered`.
    pub fn round_answered(&self, sent_at: Micros, answered: &BTreeSet<u64>) {
        let mut node = self.node();
        node.round_answered(sent_at, answered);
        self.lease_until
            .store(node.lease_until(), Ordering::Release);
    }

    /// Advance the protocol: publish demand, follow allocations, propose one if this replica is
    /// the proposer. Called every sync round, before the round's messages are built.
    pub fn tick(&self, policies: &PolicySet, all_peers_answered: bool) {
        let strict: Vec<(String, Rate)> = policies
            .iter()
            .filter(|p| p.mode == Mode::Strict)
            .map(|p| (p.name.clone(), p.rate))
            .collect();
        let mut node = self.node();
        let now = self.clock.steady_now();
        let demand = self
            .asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .publish_if_due(now);
        if let Some(demand) = demand {
            node.set_demand(demand);
        }
        let changes = node.step(now, &strict, all_peers_answered);
        self.apply(&changes, &strict);
        self.lease_until
            .store(node.lease_until(), Ordering::Release);
    }

    /// Stop spending for good (SIGTERM): peers then drop this replica without waiting out its
    /// lease.
    pub fn retire(&self) {
        let mut node = self.node();
        let changes = node.retire();
        self.apply(&changes, &[]);
        self.lease_until.store(0, Ordering::Release);
    }

    /// Apply share changes; called with the node locked, before the node's new record can be
    /// sent anywhere.
    fn apply(&self, changes: &[(String, Ppm)], strict: &[(String, Rate)]) {
        let mut shares = self.shares.write().unwrap_or_else(|p| p.into_inner());
        // Stamped after every decision that has already read the clock (see `ShareHistory::set`).
        let at = self.clock.steady_now() + 1;
        // History is kept for the policy's own interval, not the longest one allowed (366
        // days): a policy reloaded to a longer interval finds a shorter history, which counts
        // older sub-buckets as empty (`ShareHistory`), the safe side.
        let keep_us = |policy: &str| {
            strict
                .iter()
                .find(|(name, _)| name == policy)
                .map_or(MAX_INTERVAL_MS, |(_, rate)| rate.interval_ms())
                .saturating_mul(1000)
        };
        for (name, _) in strict {
            shares
                .entry(name.clone())
                .or_insert_with(|| ShareHistory::new(at, keep_us(name)));
        }
        for (policy, share) in changes {
            shares
                .entry(policy.clone())
                .or_insert_with(|| ShareHistory::new(at, keep_us(policy)))
                .set(at, *share);
        }
    }

    /// Settle every sub-bucket and drop those a fresh one would equal. Returns how many were
    /// dropped; the sub-buckets that are not full are counted in `report` as the store's
    /// buckets are, with their level scaled to the policy's capacity (a sub-bucket half empty
    /// counts as half the capacity available, whatever this replica's share), so the usage
    /// gauges and the alerts on them read the same in strict mode as in shared mode.
    pub fn sweep(&self, policies: &PolicySet, report: &mut SweepReport) -> usize {
        let shares = self.shares.read().unwrap_or_else(|p| p.into_inner());
        let now = self.clock.steady_now();
        // A dry note is worth keeping for one interval at most: by then the cluster may hold
        // a whole bucket again.
        self.dry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(policy_id, _), (at, _)| {
                policies.by_id(*policy_id).is_some_and(|p| {
                    now.saturating_sub(*at) < p.rate.interval_ms().saturating_mul(1000)
                })
            });
        let mut reclaimed = 0;
        for shard in self.buckets.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|&policy_id, keys| {
                let Some(policy) = policies.by_id(policy_id) else {
                    reclaimed += keys.len();
                    return false;
                };
                let Some(history) = shares.get(&policy.name) else {
                    reclaimed += keys.len();
                    return false;
                };
                let before = keys.len();
                keys.retain(|key, bucket| {
                    let rate = policy.rate_for(key);
                    history.settle(bucket, rate, now);
                    if bucket.is_reclaimable(history, rate, now) {
                        return false;
                    }
                    if let Some(available) = bucket.available_of_capacity(history.current(), rate) {
                        report.record_active(policy_id, available);
                    }
                    true
                });
                reclaimed += before - keys.len();
                !keys.is_empty()
            });
        }
        reclaimed
    }

    /// Sub-buckets held now.
    pub fn len(&self) -> usize {
        self.buckets
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .map(HashMap::len)
                    .sum::<usize>()
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shares this replica may spend now, as fractions of each policy, and the
    /// milliseconds left on its lease (negative: lapsed). What the strict-mode gauges show.
    pub fn shares_and_lease(&self) -> (BTreeMap<String, f64>, i64) {
        let node = self.node();
        let now = self.clock.steady_now();
        (
            usable_fractions(&node),
            (node.lease_until() as i64 - now as i64) / 1000,
        )
    }

    pub fn status(&self) -> EscrowStatus {
        let sub_buckets = self.len();
        let (usable, lease_remaining_ms) = self.shares_and_lease();
        let node = self.node();
        let allocation = node.allocation();
        EscrowStatus {
            replica: format!("{:016x}", node.me),
            allocation: allocation.map(|a| a.version.number),
            proposer: allocation.map(|a| format!("{:016x}", a.version.proposer)),
            members: allocation.map_or_else(Vec::new, |a| {
                a.members.iter().map(|m| format!("{m:016x}")).collect()
            }),
            usable,
            lease_remaining_ms: lease_remaining_ms.max(0),
            sub_buckets,
        }
    }
}

/// The least time, in µs, before a whole policy could refill `units` (what a request lacked
/// across the cluster): the earliest a retry could succeed.
pub fn cluster_wait_us(rate: Rate, units: i128) -> Micros {
    let per_us = i128::from(rate.capacity()) * i128::from(WHOLE);
    if units <= 0 || per_us == 0 {
        return 0;
    }
    u64::try_from((units + per_us - 1) / per_us).unwrap_or(u64::MAX)
}

/// The most a whole policy refills in `elapsed` µs, in sub-bucket units.
fn cluster_refill(rate: Rate, elapsed: Micros) -> i128 {
    i128::from(rate.capacity())
        .saturating_mul(i128::from(WHOLE))
        .saturating_mul(i128::from(elapsed))
}

fn usable_fractions(node: &Node) -> BTreeMap<String, f64> {
    node.usable_shares()
        .iter()
        .map(|(p, &u)| (p.clone(), f64::from(u) / f64::from(WHOLE)))
        .collect()
}

#[cfg(test)]
mod tests;
