//! The limiter as the HTTP layer (and later the replication layer) sees it: decisions by policy
//! name, policy reloads, and the periodic refill-and-reclaim pass that also feeds the gauges.
//!
//! It owns the effects the pure core avoids: it reads the clock once per decision, bumps
//! counters, and swaps policy sets atomically so that a request sees one consistent set.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use arc_swap::ArcSwap;

use crate::escrow::{self, Escrow, Shortfall};
use crate::replication::{Loan, Replicator};

use crate::bucket::{Micros, Outcome, Rate};
use crate::clock::Clock;
use crate::crdt::ReplicaId;
use crate::metrics::{Metrics, PolicyCounters, PolicyLabels, ResultLabels};
use crate::policy::{InternalPolicy, Mode, Policy, PolicyErrors, PolicyIds, PolicySet};
use crate::store::{PolicyId, Store, SweepReport};

/// Why a well-formed request could not be decided.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    #[error("unknown policy `{0}`")]
    UnknownPolicy(String),
    #[error(
        "cost {cost} is above the capacity of policy `{policy}` for this key ({capacity}): it could never be granted"
    )]
    CostAboveCapacity {
        policy: String,
        cost: u64,
        capacity: u64,
    },
}

/// A decision and the rate it was made under (for the response headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    pub rate: Rate,
}

/// The policies in force and their counter handles, swapped as one on reload.
#[derive(Debug)]
struct Active {
    set: PolicySet,
    /// Some policy is `strict` (replication then carries escrow state every round).
    any_strict: bool,
    /// Indexed by [`PolicyId`].
    counters: Vec<Option<PolicyCounters>>,
}

/// Decisions per policy over the last minute, sampled by each sweep.
#[derive(Debug, Default)]
struct RejectionWindow {
    /// (time, allowed so far, rejected so far), oldest first.
    samples: VecDeque<(Micros, u64, u64)>,
}

const REJECTION_WINDOW_US: Micros = 60_000_000;

impl RejectionWindow {
    fn record(&mut self, now: Micros, allowed: u64, rejected: u64) -> f64 {
        self.samples.push_back((now, allowed, rejected));
        while self
            .samples
            .front()
            .is_some_and(|&(t, ..)| now.saturating_sub(t) > REJECTION_WINDOW_US)
        {
            self.samples.pop_front();
        }
        let (_, allowed0, rejected0) = self.samples.front().copied().unwrap_or_default();
        let rejected = rejected.saturating_sub(rejected0);
        let total = rejected + allowed.saturating_sub(allowed0);
        if total == 0 {
            0.0
        } else {
            rejected as f64 / total as f64
        }
    }
}

/// Everything needed to build a [`Limiter`].
#[derive(Debug)]
pub struct LimiterOptions {
    pub node_id: String,
    pub replica: ReplicaId,
    pub default_rate: Rate,
    pub clock: Arc<dyn Clock>,
    pub shards: usize,
    /// Remember which buckets change, for delta replication to peers.
    pub track_changes: bool,
}

/// A verdict, and for a refused `strict` request what a loan could still pay.
type VerdictOrShortfall = (Verdict, Option<Shortfall>);

#[derive(Debug)]
pub struct Limiter {
    node_id: String,
    store: Store,
    default_rate: Rate,
    ids: PolicyIds,
    active: ArcSwap<Active>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    windows: Mutex<HashMap<PolicyId, RejectionWindow>>,
    last_sweep: AtomicU64,
    started: Micros,
    ready: AtomicBool,
    /// Decides `strict` policies once replication is on (see [`Limiter::enable_escrow`]).
    escrow: OnceLock<Arc<Escrow>>,
    /// Borrows for `strict` requests this replica's share cannot pay (see
    /// [`Limiter::enable_loans`]). Weak: the replicator holds this limiter.
    lenders: OnceLock<Weak<Replicator>>,
    /// Policies registered by Envoy's rate limit service (`crate::rls`), kept across reloads
    /// of the policies file. Held while a new set is built and swapped in, so that a reload and
    /// a registration never undo each other.
    internal: Mutex<Vec<InternalPolicy>>,
}

impl Limiter {
    /// A limiter with only the `default` policy.
    pub fn new(options: LimiterOptions) -> Self {
        let ids = PolicyIds::default();
        let metrics = Metrics::new();
        let set = PolicySet::single(options.default_rate, &ids);
        let active = Active::build(set, &metrics);
        let now = options.clock.now();
        let limiter = Self {
            node_id: options.node_id,
            store: if options.track_changes {
                Store::new(options.replica, options.shards).with_change_tracking()
            } else {
                Store::new(options.replica, options.shards)
            },
            default_rate: options.default_rate,
            ids,
            active: ArcSwap::from_pointee(active),
            clock: options.clock,
            metrics,
            windows: Mutex::default(),
            last_sweep: AtomicU64::new(now),
            started: now,
            ready: AtomicBool::new(false),
            escrow: OnceLock::new(),
            lenders: OnceLock::new(),
            internal: Mutex::default(),
        };
        limiter.publish_policy_gauges();
        limiter
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn now(&self) -> Micros {
        self.clock.now()
    }

    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    pub fn started(&self) -> Micros {
        self.started
    }

    /// Whether some policy in force is `strict`.
    pub fn has_strict_policies(&self) -> bool {
        self.active.load().any_strict
    }

    /// The policies in force now.
    pub fn policies(&self) -> PolicySet {
        self.active.load().set.clone()
    }

    /// Decide `strict` policies from this replica's escrow share from now on. Without it (a
    /// single replica, no peers) a strict policy is the exact textbook bucket, which never
    /// overshoots either.
    pub fn enable_escrow(&self, escrow: Arc<Escrow>) {
        let _ = self.escrow.set(escrow);
    }

    pub fn escrow(&self) -> Option<&Arc<Escrow>> {
        self.escrow.get()
    }

    /// Let [`Limiter::decide_with_loans`] borrow from peers through `replicator`.
    pub fn enable_loans(&self, replicator: Weak<Replicator>) {
        let _ = self.lenders.set(replicator);
    }

    /// Like [`Limiter::decide`], and a `strict` request this replica's share cannot pay is paid
    /// with tokens borrowed from its peers' shares when they hold them (docs/crdt.md, "strict
    /// mode", loans): the request then waits for up to one loan timeout per peer asked.
    /// `shared` policies decide exactly as [`Limiter::decide`].
    pub async fn decide_with_loans(
        &self,
        policy: &str,
        key: &str,
        cost: u64,
    ) -> Result<Verdict, DecideError> {
        // Without a strict policy (the usual case) this is `decide` and nothing more.
        let strict = self.escrow.get().is_some() && {
            let active = self.active.load();
            active.any_strict && active.lookup(policy)?.0.mode == Mode::Strict
        };
        let lenders = self.lenders.get().and_then(Weak::upgrade);
        match lenders {
            Some(lenders) if strict => {
                let mut verdicts = self
                    .decide_all_with(&[(policy, key, cost)], &lenders)
                    .await
                    .map_err(|(_, e)| e)?;
                Ok(verdicts.pop().expect("one request, one verdict"))
            }
            _ => self.decide(policy, key, cost),
        }
    }

    /// [`Limiter::decide_all`], with loans for `strict` requests as in
    /// [`Limiter::decide_with_loans`].
    pub async fn decide_all_with_loans(
        &self,
        requests: &[(&str, &str, u64)],
    ) -> Result<Vec<Verdict>, (usize, DecideError)> {
        match self.lenders.get().and_then(Weak::upgrade) {
            Some(lenders) if self.escrow.get().is_some() && self.has_strict_policies() => {
                self.decide_all_with(requests, &lenders).await
            }
            _ => self.decide_all(requests),
        }
    }

    async fn decide_all_with(
        &self,
        requests: &[(&str, &str, u64)],
        lenders: &Arc<Replicator>,
    ) -> Result<Vec<Verdict>, (usize, DecideError)> {
        let active = self.active.load_full();
        let verdicts = self.decide_all_in(&active, requests)?;
        let escrow = self.escrow.get().expect("checked by the callers");
        let mut decided = Vec::with_capacity(verdicts.len());
        for (&(policy, key, cost), (verdict, shortfall)) in requests.iter().zip(verdicts) {
            let (policy, counters) = active.lookup(policy).expect("checked above");
            let outcome = match shortfall {
                None => verdict.outcome,
                Some(shortfall) => {
                    let rate = verdict.rate;
                    let loan = lenders.borrow(&policy.name, key, rate, shortfall).await;
                    // Also with nothing lent: loans other requests for this key took
                    // meanwhile may have filled this replica's sub-bucket (a lender evens both
                    // out, so one loan pays for many requests), and a request refused while
                    // the tokens it lacked sit here would be refused under the limit.
                    let mut outcome =
                        escrow.spend_with_loan(policy.id, &policy.name, key, rate, cost, loan.lent);
                    lenders.even_out(policy, key, rate, shortfall.room, loan.even_out);
                    if !outcome.allowed
                        && let Some(peers_held) = loan.peers_held
                    {
                        let held = peers_held.saturating_add(shortfall.own_level);
                        escrow.note_dry(policy.id, key, held);
                        outcome.retry_after_us = outcome
                            .retry_after_us
                            .min(escrow::cluster_wait_us(rate, shortfall.needed - held));
                    }
                    outcome
                }
            };
            counters.count(&outcome, cost);
            decided.push(Verdict {
                outcome,
                rate: verdict.rate,
            });
        }
        Ok(decided)
    }

    /// The escrow and the policy, when `policy` is `strict` and decided by the escrow (a
    /// replica with peers); `None` for `shared` policies and for strict ones on a lone
    /// replica, which are the textbook bucket.
    fn escrowed(&self, policy: &str) -> Option<(&Arc<Escrow>, Arc<Policy>)> {
        let escrow = self.escrow.get()?;
        let active = self.active.load();
        let policy = active.set.get(policy)?;
        (policy.mode == Mode::Strict).then(|| (escrow, policy.clone()))
    }

    // Strict decisions in steps, for Envoy's rate limit service (`crate::rls`): it checks
    // every bucket of a request before it spends from any (all or nothing), so it cannot use
    // `decide_with_loans`, which spends as it goes. It asks `strict_shortfall` of each strict
    // bucket, `borrow`s what one lacks before it takes its locks, checks with `peek_with_loan`,
    // spends with `spend_with_loan`, and hands each loan back with `settle_loan`. For a
    // `shared` policy these are `peek` and `decide`, and nothing is ever lent.

    /// What a loan from peers must pay for `cost` tokens of `key` now, for a `strict` policy
    /// decided by the escrow (nothing is spent; the cost counts as demand, as a decision's
    /// does). `None` for a `shared` policy, without peers to lend, when this replica's share
    /// pays, or when a recent loan showed the cluster cannot.
    pub fn strict_shortfall(&self, policy: &str, key: &str, cost: u64) -> Option<Shortfall> {
        let (escrow, policy) = self.escrowed(policy)?;
        let rate = policy.rate_for(key);
        let shortfall = escrow.shortfall(policy.id, &policy.name, key, rate, cost)?;
        self.lenders.get().and_then(Weak::upgrade)?;
        Some(shortfall)
    }

    /// Borrow a [`Limiter::strict_shortfall`] from peers (see [`Replicator::borrow`]); `None`
    /// without peers to lend. The units lent are this request's: pass them to
    /// [`Limiter::spend_with_loan`], then to [`Limiter::settle_loan`]. Callable from any
    /// runtime (the gRPC workers'): the loan runs on the replicator's.
    pub async fn borrow(&self, policy: &str, key: &str, shortfall: Shortfall) -> Option<Loan> {
        let lenders = self.lenders.get().and_then(Weak::upgrade)?;
        let (_, policy) = self.escrowed(policy)?;
        let rate = policy.rate_for(key);
        Some(
            lenders
                .borrow_at_home(&policy.name, key, rate, shortfall)
                .await,
        )
    }

    /// [`Limiter::peek`] with `lent` units borrowed for this request (0: none).
    pub fn peek_with_loan(
        &self,
        policy: &str,
        key: &str,
        cost: u64,
        lent: i128,
    ) -> Result<Verdict, DecideError> {
        match self.escrowed(policy) {
            Some((escrow, policy)) if lent > 0 => {
                let rate = policy.rate_for(key);
                let cost = cost.min(rate.capacity());
                let outcome = escrow.peek_with_loan(policy.id, &policy.name, key, rate, cost, lent);
                Ok(Verdict { outcome, rate })
            }
            _ => self.peek(policy, key, cost).map(|(verdict, _)| verdict),
        }
    }

    /// Spend `cost` tokens of `key` from this replica's share and `lent` units borrowed for
    /// this request (0: none); a refusal keeps the loan in the sub-bucket, up to its capacity.
    /// Unlike [`Limiter::decide`], a strict decision here does not count as demand (its
    /// [`Limiter::strict_shortfall`] did). A `shared` policy decides as [`Limiter::decide`].
    pub fn spend_with_loan(
        &self,
        policy: &str,
        key: &str,
        cost: u64,
        lent: i128,
    ) -> Result<Verdict, DecideError> {
        let Some((escrow, strict)) = self.escrowed(policy) else {
            return self.decide(policy, key, cost);
        };
        let rate = strict.rate_for(key);
        if cost > rate.capacity() {
            return Err(DecideError::CostAboveCapacity {
                policy: strict.name.clone(),
                cost,
                capacity: rate.capacity(),
            });
        }
        let outcome = escrow.spend_with_loan(strict.id, &strict.name, key, rate, cost, lent);
        let active = self.active.load();
        if let Ok((_, counters)) = active.lookup(policy) {
            counters.count(&outcome, cost);
        }
        Ok(Verdict { outcome, rate })
    }

    /// After a request that borrowed for `key`: a loan the request never spent (refused for
    /// another bucket) stays in this replica's sub-bucket up to its capacity (tokens lost are
    /// lost for good, which only refuses); the sub-buckets of peers not asked are evened out
    /// in the background; and a refusal after every peer answered is noted, so that requests
    /// on the key are refused without asking until refill could pay them
    /// (docs/crdt.md, loans).
    pub fn settle_loan(
        &self,
        policy: &str,
        key: &str,
        shortfall: Shortfall,
        loan: Loan,
        spent: bool,
        allowed: bool,
    ) {
        let (Some(lenders), Some((escrow, policy))) = (
            self.lenders.get().and_then(Weak::upgrade),
            self.escrowed(policy),
        ) else {
            return;
        };
        let rate = policy.rate_for(key);
        if !spent && loan.lent > 0 {
            escrow.take_balance(policy.id, &policy.name, key, rate, loan.lent);
        }
        lenders.even_out(&policy, key, rate, shortfall.room, loan.even_out);
        if !allowed && let Some(peers_held) = loan.peers_held {
            escrow.note_dry(
                policy.id,
                key,
                peers_held.saturating_add(shortfall.own_level),
            );
        }
    }

    /// One decision, by the policy's mode.
    #[inline]
    fn decide_one(
        &self,
        policy: &Policy,
        key: &str,
        rate: Rate,
        cost: u64,
        now: Micros,
    ) -> Outcome {
        if policy.mode == Mode::Strict
            && let Some(escrow) = self.escrow.get()
        {
            return escrow.decide(policy.id, &policy.name, key, rate, cost);
        }
        self.store.decide(policy.id, key, rate, cost, now)
    }

    /// Readiness is a latch: set once start-up recovery is done.
    pub fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Spend `cost` tokens of `key` under `policy` if its bucket holds them.
    #[inline]
    pub fn decide(&self, policy: &str, key: &str, cost: u64) -> Result<Verdict, DecideError> {
        let active = self.active.load();
        let (policy, counters) = active.lookup(policy)?;
        let rate = policy.rate_for(key);
        if cost > rate.capacity() {
            return Err(DecideError::CostAboveCapacity {
                policy: policy.name.clone(),
                cost,
                capacity: rate.capacity(),
            });
        }
        let outcome = self.decide_one(policy, key, rate, cost, self.clock.now());
        counters.count(&outcome, cost);
        Ok(Verdict { outcome, rate })
    }

    /// Decide several requests against one consistent policy set. Every request is checked
    /// before any is decided, so an invalid one (its index is returned) changes nothing.
    pub fn decide_all(
        &self,
        requests: &[(&str, &str, u64)],
    ) -> Result<Vec<Verdict>, (usize, DecideError)> {
        let active = self.active.load();
        let verdicts = self.decide_all_in(&active, requests)?;
        Ok(requests
            .iter()
            .zip(verdicts)
            .map(|(&(policy, _, cost), (verdict, _))| {
                let (_, counters) = active.lookup(policy).expect("checked above");
                counters.count(&verdict.outcome, cost);
                verdict
            })
            .collect())
    }

    /// The requests' verdicts (not yet counted), each refused `strict` one with what a loan
    /// could still pay.
    fn decide_all_in(
        &self,
        active: &Active,
        requests: &[(&str, &str, u64)],
    ) -> Result<Vec<VerdictOrShortfall>, (usize, DecideError)> {
        for (i, &(policy, key, cost)) in requests.iter().enumerate() {
            let (policy, _) = active.lookup(policy).map_err(|e| (i, e))?;
            let capacity = policy.rate_for(key).capacity();
            if cost > capacity {
                let policy = policy.name.clone();
                return Err((
                    i,
                    DecideError::CostAboveCapacity {
                        policy,
                        cost,
                        capacity,
                    },
                ));
            }
        }
        let now = self.clock.now();
        Ok(requests
            .iter()
            .map(|&(policy, key, cost)| {
                let (policy, _) = active.lookup(policy).expect("checked above");
                let rate = policy.rate_for(key);
                let (outcome, shortfall) = match self.escrow.get() {
                    Some(escrow) if policy.mode == Mode::Strict => {
                        escrow.decide_or_shortfall(policy.id, &policy.name, key, rate, cost)
                    }
                    _ => (self.store.decide(policy.id, key, rate, cost, now), None),
                };
                (Verdict { outcome, rate }, shortfall)
            })
            .collect())
    }

    /// What a decision for `cost` would see, without spending.
    pub fn peek(&self, policy: &str, key: &str, cost: u64) -> Result<(Verdict, bool), DecideError> {
        let active = self.active.load();
        let (policy, _) = active.lookup(policy)?;
        let rate = policy.rate_for(key);
        let cost = cost.min(rate.capacity());
        let outcome = match self.escrow.get() {
            Some(escrow) if policy.mode == Mode::Strict => {
                escrow.peek(policy.id, &policy.name, key, rate, cost)
            }
            _ => self
                .store
                .peek(policy.id, key, rate, cost, self.clock.now()),
        };
        Ok((
            Verdict { outcome, rate },
            self.store.contains(policy.id, key),
        ))
    }

    /// Replace the policies with those in `text` (a policies file), keeping the current ones if
    /// it has any problem. Buckets of policies that remain keep their state.
    pub fn reload_policies(&self, text: &str) -> Result<(), PolicyErrors> {
        let result = PolicySet::from_yaml(text, self.default_rate, &self.ids);
        let outcome = if result.is_ok() { "success" } else { "failure" };
        self.metrics
            .policy_reloads
            .get_or_create(&ResultLabels { result: outcome })
            .inc();
        self.metrics.policy_reload_ok.set(i64::from(result.is_ok()));
        let internal = self.internal.lock().unwrap_or_else(|p| p.into_inner());
        self.install(result?.with_internal(&internal, &self.ids));
        Ok(())
    }

    /// Replace the internal policies (see [`crate::policy::Policy::internal`]) with `policies`,
    /// keeping those of the policies file. Buckets of policies that remain keep their state;
    /// the sweep drops those of policies that went. A policy that remains with another mode
    /// changes mode as one of the policies file does on reload.
    pub fn set_internal_policies(&self, policies: Vec<InternalPolicy>) {
        let mut internal = self.internal.lock().unwrap_or_else(|p| p.into_inner());
        *internal = policies;
        let set = self.active.load().set.with_internal(&internal, &self.ids);
        self.install(set);
    }

    /// Swap `set` in and update the per-policy series.
    fn install(&self, set: PolicySet) {
        let previous = self
            .active
            .swap(Arc::new(Active::build(set, &self.metrics)));
        let current = self.active.load();
        for gone in previous
            .set
            .iter()
            .filter(|p| current.set.get(&p.name).is_none())
        {
            self.metrics.forget_policy(&gone.name);
        }
        self.publish_policy_gauges();
    }

    fn publish_policy_gauges(&self) {
        for policy in self.active.load().set.iter() {
            let labels = PolicyLabels {
                policy: policy.name.clone(),
            };
            self.metrics
                .capacity
                .get_or_create(&labels)
                .set(policy.rate.capacity() as i64);
            self.metrics
                .fill_rate
                .get_or_create(&labels)
                .set(policy.rate.fill_rate_per_second());
        }
    }

    /// One refill-and-reclaim pass: drop buckets that are full again, then publish per-policy
    /// usage gauges and the rejection ratio. Runs every second from a background task.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now();
        let active = self.active.load_full();
        let mut report = self.store.sweep(now, |id, key| {
            active.set.by_id(id).map(|policy| policy.rate_for(key))
        });
        let reclaimed = self.sweep_escrow(&active, &mut report);
        self.publish_usage(now, &active, &report);
        report.reclaimed + reclaimed
    }

    /// The escrow's part of a sweep: its sub-buckets (their usage goes into `report`) and the
    /// strict-mode gauges.
    fn sweep_escrow(&self, active: &Active, report: &mut SweepReport) -> usize {
        let Some(escrow) = self.escrow.get() else {
            return 0;
        };
        let reclaimed = escrow.sweep(&active.set, report);
        let m = &self.metrics;
        if !active.any_strict {
            m.strict_lease_remaining.clear();
            m.strict_share.clear();
            return reclaimed;
        }
        let (usable, lease_remaining_ms) = escrow.shares_and_lease();
        m.strict_lease_remaining
            .get_or_create(&Vec::new())
            .set(lease_remaining_ms.max(0) as f64 / 1e3);
        for policy in active.set.iter() {
            let labels = PolicyLabels {
                policy: policy.name.clone(),
            };
            if policy.mode == Mode::Strict {
                let share = usable.get(&policy.name).copied().unwrap_or(0.0);
                m.strict_share.get_or_create(&labels).set(share);
            } else {
                // A reload may have turned a strict policy into a shared one.
                m.strict_share.remove(&labels);
            }
        }
        reclaimed
    }

    /// The same pass, yielding to other tasks every few shards. A pass over many buckets takes
    /// milliseconds; run in one go on a runtime worker, it would hold up every request queued
    /// on that worker for as long (measured: p99 of `/rate` went from well under 1 ms to 3 ms).
    pub async fn sweep_yielding(&self) -> usize {
        const SHARDS_PER_YIELD: usize = 4;
        let now = self.clock.now();
        let active = self.active.load_full();
        let mut report = SweepReport::default();
        for index in 0..self.store.shard_count() {
            self.store.sweep_shard(
                index,
                now,
                |id, key| active.set.by_id(id).map(|policy| policy.rate_for(key)),
                &mut report,
            );
            if index % SHARDS_PER_YIELD == SHARDS_PER_YIELD - 1 {
                tokio::task::yield_now().await;
            }
        }
        let reclaimed = self.sweep_escrow(&active, &mut report);
        self.publish_usage(now, &active, &report);
        report.reclaimed + reclaimed
    }

    /// Publish what a sweep saw: per-policy usage gauges and the rejection ratio.
    fn publish_usage(&self, now: Micros, active: &Active, report: &SweepReport) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        for policy in active.set.iter() {
            let labels = PolicyLabels {
                policy: policy.name.clone(),
            };
            let usage = report
                .usage
                .iter()
                .find(|(id, _)| *id == policy.id)
                .map(|(_, usage)| *usage)
                .unwrap_or_default();
            let capacity = policy.rate.capacity();
            let available = usage.min_available.unwrap_or(capacity).min(capacity);
            let m = &self.metrics;
            m.active_buckets
                .get_or_create(&labels)
                .set(usage.active as i64);
            m.tokens_available
                .get_or_create(&labels)
                .set(available as i64);
            m.current_usage
                .get_or_create(&labels)
                .set((capacity - available) as i64);
            if let Some(counters) = active.counters_of(policy.id) {
                let ratio = windows.entry(policy.id).or_default().record(
                    now,
                    counters.allowed.get(),
                    counters.rejected.get(),
                );
                m.rejection_rate.get_or_create(&labels).set(ratio);
            }
        }
        windows.retain(|id, _| active.set.by_id(*id).is_some());
        self.last_sweep.store(now, Ordering::Relaxed);
    }

    /// Prometheus exposition; gauges computed at scrape time are refreshed first.
    pub fn render_metrics(&self) -> String {
        let since_sweep = self
            .clock
            .now()
            .saturating_sub(self.last_sweep.load(Ordering::Relaxed));
        self.metrics.refill_delay.set(since_sweep as f64 / 1e6);
        self.metrics.encode()
    }

    /// Modes in use, for `/status`.
    pub fn modes(&self) -> Vec<Mode> {
        let mut modes: Vec<Mode> = self.active.load().set.iter().map(|p| p.mode).collect();
        modes.dedup();
        modes
    }
}

impl Active {
    fn build(set: PolicySet, metrics: &Metrics) -> Self {
        let mut counters = Vec::new();
        for policy in set.iter() {
            let slot = policy.id.0 as usize;
            if counters.len() <= slot {
                counters.resize(slot + 1, None);
            }
            counters[slot] = Some(metrics.policy_counters(&policy.name));
        }
        let any_strict = set.iter().any(|p| p.mode == Mode::Strict);
        Self {
            set,
            counters,
            any_strict,
        }
    }

    fn counters_of(&self, id: PolicyId) -> Option<&PolicyCounters> {
        self.counters.get(id.0 as usize)?.as_ref()
    }

    #[inline]
    fn lookup(&self, name: &str) -> Result<(&crate::policy::Policy, &PolicyCounters), DecideError> {
        let policy = self
            .set
            .get(name)
            .ok_or_else(|| DecideError::UnknownPolicy(name.to_owned()))?;
        let counters = self
            .counters_of(policy.id)
            .expect("counters are built for every policy in the set");
        Ok((policy, counters))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn limiter(clock: Arc<ManualClock>) -> Limiter {
        Limiter::new(LimiterOptions {
            node_id: "test".into(),
            replica: ReplicaId(1),
            default_rate: Rate::try_new(10, 1000).unwrap(),
            clock,
            shards: 4,
            track_changes: false,
        })
    }

    #[test]
    fn reload_keeps_buckets_of_policies_that_remain() {
        let clock = Arc::new(ManualClock::at(1_000_000));
        let limiter = limiter(clock.clone());
        limiter.decide("default", "k", 7).unwrap();
        limiter
            .reload_policies("policies:\n  extra: {capacity: 5, refill_interval_ms: 1000}\n")
            .unwrap();
        assert_eq!(
            limiter.decide("default", "k", 1).unwrap().outcome.remaining,
            2
        );
        assert!(limiter.decide("extra", "k", 5).unwrap().outcome.allowed);
    }

    #[test]
    fn failed_reload_keeps_the_last_good_policies() {
        let clock = Arc::new(ManualClock::at(0));
        let limiter = limiter(clock);
        limiter
            .reload_policies("policies:\n  extra: {capacity: 5, refill_interval_ms: 1000}\n")
            .unwrap();
        assert!(
            limiter
                .reload_policies("policies:\n  extra: {capacity: 0}\n")
                .is_err()
        );
        assert!(limiter.decide("extra", "k", 5).is_ok());
        let text = limiter.render_metrics();
        assert!(
            text.contains("openclaw_policy_config_last_reload_successful 0"),
            "{text}"
        );
        assert!(
            text.contains("openclaw_policy_reloads_total{result=\"failure\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn sweep_publishes_usage_and_rejection_ratio() {
        let clock = Arc::new(ManualClock::at(0));
        let limiter = limiter(clock.clone());
        limiter.sweep();
        for _ in 0..3 {
            limiter.decide("default", "hot", 4).unwrap();
        }
        clock.advance_us(100_000); // one token refilled
        limiter.sweep();
        let text = limiter.render_metrics();
        for line in [
            "openclaw_active_buckets{policy=\"default\"} 1",
            "openclaw_tokens_available{policy=\"default\"} 3",
            "token_bucket_current_usage{policy=\"default\"} 7",
            "token_bucket_capacity{policy=\"default\"} 10",
            "token_bucket_fill_rate{policy=\"default\"} 10.0",
            "openclaw_requests_total{policy=\"default\",decision=\"allowed\"} 2",
            "openclaw_requests_total{policy=\"default\",decision=\"rejected\"} 1",
            "openclaw_tokens_consumed_total{policy=\"default\"} 8",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // No strict policy, no strict-mode series (a lease of 0 would read as lapsed).
        assert!(!text.contains("openclaw_strict_"), "{text}");
        let ratio = text
            .lines()
            .find(|l| l.starts_with("token_bucket_rejection_rate{policy=\"default\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap();
        assert!((ratio - 1.0 / 3.0).abs() < 1e-9, "{ratio}");
    }

    #[test]
    fn depletion_sums_how_empty_each_decision_found_its_bucket() {
        let limiter = limiter(Arc::new(ManualClock::at(0)));
        let depletion = |limiter: &Limiter| {
            let text = limiter.render_metrics();
            text.lines()
                .find(|l| l.starts_with("openclaw_bucket_depletion_total{policy=\"default\"}"))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no depletion series in\n{text}"))
        };
        // Capacity 10, no time passes: the first request meets a full bucket (0), the second 6 of
        // 10 tokens (0.4), the third 2, too few for its cost: rejected, it counts as empty (1).
        for _ in 0..3 {
            limiter.decide("default", "hot", 4).unwrap();
        }
        assert!(
            (depletion(&limiter) - 1.4).abs() < 1e-9,
            "{}",
            depletion(&limiter)
        );
        // Many clients far from their limits add nothing however many there are.
        let keys: Vec<String> = (0..100).map(|i| format!("client-{i}")).collect();
        let batch: Vec<(&str, &str, u64)> =
            keys.iter().map(|k| ("default", k.as_str(), 1)).collect();
        limiter.decide_all(&batch).unwrap();
        assert!(
            (depletion(&limiter) - 1.4).abs() < 1e-9,
            "{}",
            depletion(&limiter)
        );
        // Taking the last 2 tokens met 2 of 10 (0.8); the next request met an empty bucket (1).
        limiter.decide("default", "hot", 2).unwrap();
        limiter.decide("default", "hot", 1).unwrap();
        assert!(
            (depletion(&limiter) - 3.2).abs() < 1e-9,
            "{}",
            depletion(&limiter)
        );
    }

    #[test]
    fn cost_above_capacity_is_refused_before_touching_state() {
        let limiter = limiter(Arc::new(ManualClock::at(0)));
        assert!(matches!(
            limiter.decide("default", "k", 11),
            Err(DecideError::CostAboveCapacity {
                cost: 11,
                capacity: 10,
                ..
            })
        ));
        assert!(limiter.store().is_empty());
        assert_eq!(
            limiter.decide("nope", "k", 1),
            Err(DecideError::UnknownPolicy("nope".into()))
        );
    }
}
