//! The replicated state of one token bucket: a join-semilattice.
//!
//! A token bucket is not a plain G-Counter: refill is a function of time and the bucket clamps at
//! its capacity, so "tokens added minus tokens consumed" over-counts the refill a full bucket
//! throws away. The state here separates the two:
//!
//! * each replica's consumption is its own [`Component`] counter (`consumed`), which only that
//!   replica increments: the G-Counter part. A component also carries its *incarnation*, the
//!   instant its owner started counting in it, so everything it counts happened after that;
//! * the clamp is a *claim*: an instant (`epoch`) at which one replica (`rebaser`) saw the bucket
//!   full, listing, per component it knew, how much of its consumption that fullness accounts
//!   for (`absorbed`).
//!
//! The level at `t` is the least of
//!
//! * the claim's bound, `C + r·(t − epoch) − Σ outstanding`, where a listed component's
//!   outstanding tokens are `consumed − absorbed`, a component the claim does not list counts in
//!   full if it started after the epoch, and not at all if it started before (the claimant did
//!   not know it: it had not heard of it yet, or had forgotten the bucket);
//! * one bound per incarnation `s`, `C + r·(t − s) − Σ consumed of the components started at or
//!   after s` (and, when `s` is at or before the claim's epoch, `− Σ outstanding of the listed
//!   components started before s`, spent after the epoch): true of any token bucket whatever
//!   happened before `s`, since those tokens were all spent after `s`;
//! * and the capacity.
//!
//! Every incarnation bound is at least the textbook level of the consumption the state knows, so
//! none of them can refuse a client that bucket would admit; the claim is the only term that may,
//! and only for what its claimant had not heard of. This is what makes a bucket forgotten by a
//! sweep harmless: a replica that spends on it again starts from a claim that knows nothing, which
//! leaves the other replicas' components to their incarnation bounds instead of counting their
//! whole history as debt. The bounds, with an argument per rule, are derived in `docs/crdt.md`.
//!
//! Merge takes, per component, the larger `consumed`, and of the two claims the one with the later
//! `(epoch, rebaser)`, with its `absorbed` values: never a mix of two claims. Two replicas that
//! claim concurrently each absorbed their own view against the *same* stretch of refill; combining
//! both would forgive tokens that were never refilled. Both parts are maxima over total orders, so
//! merge is commutative, associative and idempotent.
//!
//! A replica whose component a newer claim does not list starts a new incarnation: its later
//! spending then counts against that claim, and its earlier spending stays bounded from its old
//! incarnation. Components whose owner has moved on are dropped at the next claim, which absorbs
//! them in full. A replica never drops its current component: it holds the count other replicas'
//! claims are made against.

use smallvec::SmallVec;

use crate::bucket::{Micros, Outcome, Rate};

/// Identifies one run of one replica. A restarted process is a new replica: what its previous
/// life consumed stays in the merged state under the old id until it is refilled.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct ReplicaId(pub u64);

/// The `absorbed` of a component the state's claim does not list.
pub const UNLISTED: u64 = u64::MAX;

/// One replica's consumption of one bucket in one incarnation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Component {
    pub replica: ReplicaId,
    /// When this replica started counting in this component: everything it counts was spent
    /// after this instant.
    pub incarnation: Micros,
    /// Tokens this replica admitted for this bucket in this incarnation. Only the replica itself
    /// increments it.
    pub consumed: u64,
    /// How much of `consumed` the state's claim counts as refilled, or [`UNLISTED`] when the
    /// claim does not list this component. Part of the claim, not of the counter: it is taken
    /// from whichever claim wins a merge. Never exceeds `consumed`.
    pub absorbed: u64,
}

impl Component {
    #[inline]
    fn key(&self) -> (ReplicaId, Micros) {
        (self.replica, self.incarnation)
    }

    /// Whether the state's claim lists this component.
    #[inline]
    pub fn is_listed(&self) -> bool {
        self.absorbed != UNLISTED
    }

    /// Tokens this component counts against a claim made at `epoch`: what the claim did not
    /// absorb of a listed component; all of an unlisted one started after the claim; nothing of
    /// an unlisted one started before it (its incarnation bound covers it instead).
    #[inline]
    fn outstanding_since(&self, epoch: Micros) -> u64 {
        if self.is_listed() {
            self.consumed - self.absorbed
        } else if self.incarnation >= epoch {
            self.consumed
        } else {
            0
        }
    }
}

/// The `absorbed` of one component under one claim, from two copies of it: a copy that lists it
/// wins over one that does not (a replica drops components that no longer matter).
#[inline]
fn join_absorbed(a: u64, b: u64) -> u64 {
    match (a, b) {
        (UNLISTED, x) | (x, UNLISTED) => x,
        (a, b) => a.max(b),
    }
}

/// The mergeable state of one (policy, key) bucket.
#[derive(PartialEq, Eq, Debug)]
pub struct BucketState {
    /// An instant at which `rebaser` saw the bucket full, counting the listed components'
    /// `absorbed` tokens as refilled.
    epoch: Micros,
    rebaser: ReplicaId,
    /// Sorted by (replica, incarnation), unique. One inline slot: a single-node bucket needs no
    /// second allocation.
    components: SmallVec<[Component; 1]>,
}

impl Clone for BucketState {
    fn clone(&self) -> Self {
        Self {
            epoch: self.epoch,
            rebaser: self.rebaser,
            components: self.components.clone(),
        }
    }

    /// Reuses `self`'s components' room: a bucket several replicas spend on keeps its
    /// components on the heap, and the store copies its state after every local decision when
    /// it tracks changes (`Store::decide`).
    fn clone_from(&mut self, source: &Self) {
        self.epoch = source.epoch;
        self.rebaser = source.rebaser;
        self.components.clone_from(&source.components);
    }
}

impl BucketState {
    /// A full bucket that nobody has spent from yet. Its claim lists nothing: merged with a
    /// state that knows more, it leaves that state's components to their incarnation bounds.
    pub fn full_at(now: Micros) -> Self {
        Self {
            epoch: now,
            rebaser: ReplicaId::default(),
            components: SmallVec::new(),
        }
    }

    /// Rebuild a state from its parts (snapshots and peers). Components are sorted and
    /// deduplicated (duplicates merged), and a listed `absorbed` is capped at `consumed`, so any
    /// input yields a valid state.
    pub fn from_parts(
        epoch: Micros,
        rebaser: ReplicaId,
        components: impl IntoIterator<Item = Component>,
    ) -> Self {
        let mut state = Self {
            epoch,
            rebaser,
            components: SmallVec::new(),
        };
        for mut component in components {
            if component.is_listed() {
                component.absorbed = component.absorbed.min(component.consumed);
            }
            match state.find(component.key()) {
                Ok(i) => {
                    let existing = &mut state.components[i];
                    existing.consumed = existing.consumed.max(component.consumed);
                    existing.absorbed = join_absorbed(existing.absorbed, component.absorbed);
                }
                Err(i) => state.components.insert(i, component),
            }
        }
        state
    }

    pub fn epoch(&self) -> Micros {
        self.epoch
    }

    pub fn rebaser(&self) -> ReplicaId {
        self.rebaser
    }

    /// The first component that claims more consumption than its owner can have admitted by
    /// `latest`: from its incarnation on, the owner admits only while its own view, which
    /// always holds its current component, has the tokens, and that view is at most the
    /// incarnation's bound `C + r·(t − incarnation) − consumed` (module docs). So an honest
    /// component never exceeds [`Rate::most_admitted_between`] its incarnation and the owner's
    /// clock, which the clock guard keeps at or before `latest`.
    pub fn implausible_component(&self, rate: Rate, latest: Micros) -> Option<&Component> {
        self.components
            .iter()
            .find(|c| c.consumed > rate.most_admitted_between(c.incarnation, latest))
    }

    pub fn components(&self) -> &[Component] {
        &self.components
    }

    #[inline]
    fn find(&self, key: (ReplicaId, Micros)) -> Result<usize, usize> {
        self.components.binary_search_by_key(&key, Component::key)
    }

    /// The incarnation of `me`'s component that started last, or 0 if the state holds none of
    /// `me`'s. A replica's components are contiguous and sorted by incarnation, and its latest
    /// one is never dropped (a claim drops only a component followed by a later one of the same
    /// replica, and a join only adds), so once `me` has spent on a bucket this is the
    /// incarnation it counts in, unless a merge brought back a later one of its own from
    /// before it forgot the bucket: `Store::merge_bounded` watches for that.
    #[inline]
    pub fn latest_incarnation_of(&self, me: ReplicaId) -> Micros {
        match self.components.as_slice() {
            // The common case, one decision's path: one replica spends here.
            [only] if only.replica == me => only.incarnation,
            all => {
                let end = all.partition_point(|c| c.replica <= me);
                match end.checked_sub(1).map(|last| &all[last]) {
                    Some(c) if c.replica == me => c.incarnation,
                    _ => 0,
                }
            }
        }
    }

    /// The bucket's level at `now`, in the scaled units of [`Rate`]: the least of the claim's
    /// bound, every incarnation's bound and the capacity (module docs). Negative when replicas
    /// together admitted more than the bucket held (possible only in `shared` mode).
    #[inline]
    pub fn level_scaled_at(&self, rate: Rate, now: Micros) -> i128 {
        let full = rate.full_scaled();
        let unit = rate.tokens_scaled(1);
        let now = i128::from(now);
        let outstanding: i128 = self
            .components
            .iter()
            .map(|c| i128::from(c.outstanding_since(self.epoch)))
            .sum();
        let mut level =
            full.min(full + rate.refill_scaled(now - i128::from(self.epoch)) - outstanding * unit);
        if let [only] = self.components.as_slice() {
            // The common case (one replica spends on the bucket): one incarnation bound.
            let bound = full + rate.refill_scaled(now - i128::from(only.incarnation))
                - i128::from(only.consumed) * unit;
            return level.min(bound);
        }
        for c in &self.components {
            let mut since: i128 = self
                .components
                .iter()
                .filter(|d| d.incarnation >= c.incarnation)
                .map(|d| i128::from(d.consumed))
                .sum();
            // An incarnation at or before the claim also sees the tokens the claim lists as
            // spent after it (its epoch) in components started earlier: they too were spent
            // after `s`. Without them, a component the claim does not list (its owner spent
            // on the bucket while the claimant had not heard of it) was bounded as if nothing
            // else had been spent since its incarnation, and its tokens were forgiven.
            if c.incarnation <= self.epoch {
                since += self
                    .components
                    .iter()
                    .filter(|d| d.incarnation < c.incarnation && d.is_listed())
                    .map(|d| i128::from(d.consumed - d.absorbed))
                    .sum::<i128>();
            }
            let bound = full + rate.refill_scaled(now - i128::from(c.incarnation)) - since * unit;
            level = level.min(bound);
        }
        level
    }

    /// Whether everything spent has been refilled by `now`.
    #[inline]
    pub fn is_full_at(&self, rate: Rate, now: Micros) -> bool {
        self.level_scaled_at(rate, now) >= rate.full_scaled()
    }

    /// If the bucket is full at `now`, `me` claims it: the refill it accrued while full is
    /// discarded, as a real bucket discards it, and every component it knows is absorbed.
    /// Components whose owner has moved on to a newer incarnation are dropped: absorbed, they no
    /// longer count anywhere. Returns whether it claimed.
    #[inline]
    pub fn rebase_if_full_at(&mut self, rate: Rate, now: Micros, me: ReplicaId) -> bool {
        if now <= self.epoch || !self.is_full_at(rate, now) {
            return false;
        }
        self.claim_at(now, me);
        true
    }

    /// Claim the bucket, known to be full at `now` (after `epoch`), for `me`. The level stays
    /// the capacity: every incarnation bound was at least that, and the claim's bound is now
    /// exactly that.
    #[inline]
    fn claim_at(&mut self, now: Micros, me: ReplicaId) {
        self.epoch = now;
        self.rebaser = me;
        if let [only] = self.components.as_mut_slice() {
            // The common case, kept short (one decision's path): nothing follows it, so it is
            // not closed.
            only.absorbed = only.consumed;
            return;
        }
        // Sorted by (replica, incarnation): a component followed by one of the same replica is
        // closed.
        let mut i = 0;
        while i < self.components.len() {
            let closed = self
                .components
                .get(i + 1)
                .is_some_and(|next| next.replica == self.components[i].replica);
            if closed {
                self.components.remove(i);
            } else {
                let c = &mut self.components[i];
                c.absorbed = c.consumed;
                i += 1;
            }
        }
    }

    /// Spend `cost` tokens at `now` if the bucket holds them, counting them in `me`'s component
    /// `*incarnation`. A rejected request changes nothing but the claim (which does not change
    /// the level).
    ///
    /// `*incarnation` moves to a new instant (never before `now` nor the claim) when the claim
    /// does not list the current one and it started before the claim: spending counted there
    /// would escape the claim. 0 means none yet, or none this replica can still count in: the
    /// new one then starts after every incarnation of `me` the state holds. A component is never
    /// dropped here: a replica that dropped its own absorbed component, and then lost the claim
    /// that absorbed it to a concurrent one, would have hidden what it spent (measured: at 2x
    /// the limit spread over three replicas, every request was admitted).
    #[inline]
    pub fn try_consume_at(
        &mut self,
        rate: Rate,
        me: ReplicaId,
        incarnation: &mut Micros,
        cost: u64,
        now: Micros,
    ) -> Outcome {
        // One level computation: a claim (if full) leaves the level at the capacity.
        let level = self.level_scaled_at(rate, now);
        if level >= rate.full_scaled() && now > self.epoch {
            self.claim_at(now, me);
        }
        let allowed = level >= rate.tokens_scaled(cost);
        if !allowed {
            return Outcome::describe(rate, level, false, cost);
        }
        let current = match self.components.as_slice() {
            // The common case without the binary search's loop: one replica spends here.
            [only] if only.key() == (me, *incarnation) => Ok(0),
            _ => self.find((me, *incarnation)),
        };
        let moves_on = match current {
            Ok(i) => {
                let c = &self.components[i];
                !c.is_listed() && c.incarnation < self.epoch
            }
            Err(_) => *incarnation == 0 || *incarnation < self.epoch,
        };
        let slot = if moves_on {
            // The old component stays: its tokens were spent, and its incarnation bound (and
            // any claim that lists it) still counts them.
            let earliest = now.max(self.epoch);
            // After every incarnation of `me` the state holds: one adopted from a peer may be
            // later than `now` if this clock stepped back since.
            let previous = match *incarnation {
                0 => self.latest_incarnation_of(me),
                previous => previous,
            };
            *incarnation = match previous {
                0 => earliest,
                previous => earliest.max(previous.saturating_add(1)),
            };
            self.find((me, *incarnation))
        } else {
            current
        };
        match slot {
            Ok(i) => self.components[i].consumed += cost,
            Err(i) => self.components.insert(
                i,
                Component {
                    replica: me,
                    incarnation: *incarnation,
                    consumed: cost,
                    absorbed: UNLISTED,
                },
            ),
        }
        Outcome::describe(rate, level - rate.tokens_scaled(cost), true, cost)
    }

    /// What a decision for `cost` would see at `now`, without spending.
    pub fn peek_at(&self, rate: Rate, cost: u64, now: Micros) -> Outcome {
        let level = self.level_scaled_at(rate, now);
        Outcome::describe(rate, level, level >= rate.tokens_scaled(cost), cost)
    }

    /// The least upper bound of two states: commutative, associative, idempotent.
    pub fn join(&mut self, other: &BucketState) {
        let mine = (self.epoch, self.rebaser);
        let theirs = (other.epoch, other.rebaser);
        // Counters: the larger `consumed` per component. A component new to this side is
        // unlisted here until the claim is settled below.
        for component in &other.components {
            match self.find(component.key()) {
                Ok(i) => {
                    let c = &mut self.components[i];
                    c.consumed = c.consumed.max(component.consumed);
                }
                Err(i) => self.components.insert(
                    i,
                    Component {
                        absorbed: UNLISTED,
                        ..*component
                    },
                ),
            }
        }
        // The claim: one claim, never a mix. The same claim on both sides: a copy that lists a
        // component wins over one that dropped it.
        if theirs > mine {
            self.epoch = other.epoch;
            self.rebaser = other.rebaser;
            for c in &mut self.components {
                c.absorbed = match other.find(c.key()) {
                    Ok(i) => other.components[i].absorbed,
                    Err(_) => UNLISTED,
                };
            }
        } else if theirs == mine {
            for c in &mut self.components {
                if let Ok(i) = other.find(c.key()) {
                    c.absorbed = join_absorbed(c.absorbed, other.components[i].absorbed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::bucket::{MAX_CAPACITY, MAX_INTERVAL_MS, ReferenceBucket};

    const A: ReplicaId = ReplicaId(1);
    const B: ReplicaId = ReplicaId(2);

    fn rate() -> Rate {
        Rate::try_new(10, 1000).unwrap()
    }

    #[test]
    fn full_bucket_discards_refill_it_cannot_hold() {
        let mut state = BucketState::full_at(0);
        // Idle for 10 s: without the rebase the epoch would grant 100 tokens of credit.
        assert!(
            state
                .try_consume_at(rate(), A, &mut 0, 10, 10_000_000)
                .allowed
        );
        assert!(
            !state
                .try_consume_at(rate(), A, &mut 0, 1, 10_000_000)
                .allowed
        );
    }

    /// The differential test's seed 4988498738651359059 (two replicas, a 5-token bucket refilled
    /// in 200 ms, requests of 5 at 115 % of the limit), cut to its merge: B saw the bucket full
    /// at 0 and spent 5 in a new component; A, not having heard of it, saw it full 1.128 ms
    /// later, spent 5, and its claim (the later one) wins the merge without listing B's
    /// component. 226 ms after A's epoch the textbook bucket holds 5 − 10 + 5.65 = 0.65 tokens.
    /// On the old code every bound said full: B's incarnation bound counted only B's tokens and
    /// the claim none of them, so B's 5 were forgiven and the cluster admitted a request beyond
    /// its bound.
    #[test]
    fn tokens_a_claim_did_not_list_are_not_forgiven_by_its_epoch() {
        let rate = Rate::try_new(5, 200).unwrap();
        let b_saw_full = 10_000_000;
        let epoch = b_saw_full + 1_128;
        let merged = BucketState::from_parts(
            epoch,
            A,
            [
                // A's component, a second old: 10 spent before its claim (absorbed), 5 after.
                Component {
                    replica: A,
                    incarnation: b_saw_full - 1_000_000,
                    consumed: 15,
                    absorbed: 10,
                },
                // B's, started when it saw the bucket full, unknown to A's claim.
                Component {
                    replica: B,
                    incarnation: b_saw_full,
                    consumed: 5,
                    absorbed: UNLISTED,
                },
            ],
        );
        let at = epoch + 226_000;
        let level = merged.level_scaled_at(rate, at);
        assert!(!merged.is_full_at(rate, at));
        assert!(
            level < rate.tokens_scaled(1),
            "level {} tokens, textbook 0.65",
            level as f64 / rate.tokens_scaled(1) as f64
        );
        // Never below the textbook level either: 0.65 tokens.
        assert!(level * 100 >= rate.tokens_scaled(1) * 64);
    }

    #[test]
    fn rejected_request_leaves_the_level_unchanged() {
        let mut state = BucketState::full_at(0);
        state.try_consume_at(rate(), A, &mut 0, 8, 0);
        let before = state.level_scaled_at(rate(), 1);
        assert!(!state.try_consume_at(rate(), A, &mut 0, 5, 1).allowed);
        assert_eq!(state.level_scaled_at(rate(), 1), before);
    }

    #[test]
    fn merged_replicas_share_one_limit() {
        let mut a = BucketState::full_at(0);
        let mut b = BucketState::full_at(0);
        assert!(a.try_consume_at(rate(), A, &mut 0, 6, 0).allowed);
        assert!(b.try_consume_at(rate(), B, &mut 0, 3, 0).allowed);
        a.join(&b);
        b.join(&a);
        assert_eq!(a, b);
        assert_eq!(a.peek_at(rate(), 1, 0).remaining, 1);
        assert!(!a.try_consume_at(rate(), A, &mut 0, 2, 0).allowed);
    }

    #[test]
    fn consumption_a_claimant_had_not_heard_of_is_bounded_from_its_incarnation() {
        // A spends 5 at 1.99 s; B has not heard of it, finds its own view full at 2 s, claims
        // and spends 1. Merged: A's tokens are not in B's claim, but they were spent after
        // A's incarnation, and that bound still holds them: 10 - 5 + 0.1 refilled - 1 = 4.1.
        let (mut a, mut b) = (BucketState::full_at(0), BucketState::full_at(0));
        a.try_consume_at(rate(), A, &mut 0, 5, 1_990_000);
        b.try_consume_at(rate(), B, &mut 0, 1, 2_000_000);
        a.join(&b);
        assert_eq!(a.peek_at(rate(), 1, 2_000_000).remaining, 4);
        // Long refilled consumption the claimant did not know costs nothing: the textbook 9.
        let (mut a, mut b) = (BucketState::full_at(0), BucketState::full_at(0));
        a.try_consume_at(rate(), A, &mut 0, 5, 0);
        b.try_consume_at(rate(), B, &mut 0, 1, 2_000_000);
        a.join(&b);
        assert_eq!(a.peek_at(rate(), 1, 2_000_000).remaining, 9);
    }

    #[test]
    fn a_new_incarnation_counts_afresh_and_the_old_one_keeps_what_it_owes() {
        let mut old = BucketState::full_at(0);
        old.try_consume_at(rate(), A, &mut 0, 7, 0);
        // A forgot the bucket (say its view was full) and spends again in a new incarnation,
        // while B still holds the old component: nothing A spent is lost in the merge.
        let mut fresh = BucketState::full_at(100_000);
        fresh.try_consume_at(rate(), A, &mut 100_000, 2, 100_000);
        fresh.join(&old);
        assert_eq!(fresh.components().len(), 2);
        // The fresh claim lists nothing of the old incarnation; its own bound holds it: the
        // textbook 10 - 7 + 1 refilled - 2 = 2.
        assert_eq!(fresh.peek_at(rate(), 1, 100_000).remaining, 2);
    }

    #[test]
    fn concurrent_claims_forgive_at_most_what_each_had_not_heard_of() {
        // Ten tokens refilled at one per second. A and B each admit 5 at t = 0 without hearing
        // of each other for 5 s; at t = 5 s each sees its own view full, claims, and admits 1
        // more. One textbook bucket: 10 - 10 + 5 refilled - 2 = 3. Each claim absorbed its own
        // 5 against the same refill: merged, at most the 5 the winner had not heard of is
        // forgiven (the overshoot bound of docs/crdt.md counts it), never more.
        let slow = Rate::try_new(10, 10_000).unwrap();
        let (mut a, mut b) = (BucketState::full_at(0), BucketState::full_at(0));
        let (mut ia, mut ib) = (0, 0);
        a.try_consume_at(slow, A, &mut ia, 5, 0);
        b.try_consume_at(slow, B, &mut ib, 5, 0);
        a.try_consume_at(slow, A, &mut ia, 1, 5_000_000);
        b.try_consume_at(slow, B, &mut ib, 1, 5_000_000);
        a.join(&b);
        let remaining = a.peek_at(slow, 1, 5_000_000).remaining;
        assert!((3..=3 + 5).contains(&remaining), "{remaining}");
        // Had they heard of each other before claiming, the merged view is the textbook one.
        let (mut a, mut b) = (BucketState::full_at(0), BucketState::full_at(0));
        let (mut ia, mut ib) = (0, 0);
        a.try_consume_at(slow, A, &mut ia, 5, 0);
        b.try_consume_at(slow, B, &mut ib, 5, 0);
        a.join(&b);
        b.join(&a);
        a.try_consume_at(slow, A, &mut ia, 1, 5_000_000);
        b.try_consume_at(slow, B, &mut ib, 1, 5_000_000);
        a.join(&b);
        assert_eq!(a.peek_at(slow, 1, 5_000_000).remaining, 3);
    }

    #[test]
    fn from_parts_repairs_invalid_input() {
        let state = BucketState::from_parts(
            0,
            ReplicaId(0),
            [
                Component {
                    replica: B,
                    incarnation: 1,
                    consumed: 2,
                    absorbed: 9,
                },
                Component {
                    replica: A,
                    incarnation: 1,
                    consumed: 1,
                    absorbed: 0,
                },
                Component {
                    replica: A,
                    incarnation: 1,
                    consumed: 3,
                    absorbed: 0,
                },
            ],
        );
        assert_eq!(state.components().len(), 2);
        assert_eq!(state.components()[0].replica, A);
        assert_eq!(state.components()[0].consumed, 3);
        assert_eq!(state.components()[1].absorbed, 2);
    }

    /// A random history of operations on a few replicas, each replica with its own copy.
    #[derive(Debug, Clone)]
    enum Op {
        Consume {
            replica: usize,
            cost: u64,
            advance_us: u64,
        },
        Sync {
            from: usize,
            to: usize,
        },
        /// The replica drops the bucket if it is full, as the reclamation sweep does.
        Forget {
            replica: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..3usize, 1..=10u64, 0..400_000u64)
                .prop_map(|(replica, cost, advance_us)| Op::Consume { replica, cost, advance_us }),
            1 => (0..3usize, 0..3usize).prop_map(|(from, to)| Op::Sync { from, to }),
            1 => (0..3usize).prop_map(|replica| Op::Forget { replica }),
        ]
    }

    /// Replays a history; returns every state any replica held along the way.
    fn replay(ops: &[Op]) -> Vec<BucketState> {
        let mut replicas = vec![BucketState::full_at(0); 3];
        let mut incarnations = [0; 3];
        let mut seen = replicas.clone();
        let mut now = 0;
        for op in ops {
            match *op {
                Op::Consume {
                    replica,
                    cost,
                    advance_us,
                } => {
                    now += advance_us;
                    let id = ReplicaId(replica as u64);
                    replicas[replica].try_consume_at(
                        rate(),
                        id,
                        &mut incarnations[replica],
                        cost,
                        now,
                    );
                    seen.push(replicas[replica].clone());
                }
                Op::Sync { from, to } => {
                    let sent = replicas[from].clone();
                    replicas[to].join(&sent);
                    seen.push(replicas[to].clone());
                }
                Op::Forget { replica } => {
                    if replicas[replica].is_full_at(rate(), now) {
                        replicas[replica] = BucketState::full_at(now);
                        incarnations[replica] = 0;
                    }
                }
            }
        }
        seen
    }

    fn states() -> impl Strategy<Value = Vec<BucketState>> {
        proptest::collection::vec(op(), 0..40).prop_map(|ops| replay(&ops))
    }

    const DAY_MS: u64 = 86_400_000;
    const YEAR_MS: u64 = 365 * DAY_MS;

    /// A rate and requests (cost, then µs since the previous one) to replay on it: half the
    /// cases small buckets refilled within 2 s, as the service mostly sees; the rest long
    /// intervals (an hour to the longest) and capacities up to the largest, where a full bucket
    /// no longer fits 64 bits, with costs up to the capacity and gaps from microseconds to more
    /// than an interval.
    fn rate_and_requests() -> impl Strategy<Value = (u64, u64, Vec<(u64, u64)>)> {
        let small = (1..=50u64, 1..=2_000u64).prop_flat_map(|(capacity, interval_ms)| {
            let requests = proptest::collection::vec((0..=60u64, 0..3_000_000u64), 1..200)
                .prop_map(move |requests| {
                    requests
                        .into_iter()
                        .map(|(cost, advance)| (cost.clamp(1, capacity), advance))
                        .collect()
                });
            (Just(capacity), Just(interval_ms), requests)
        });
        let long = prop_oneof![
            Just((1_000, DAY_MS)),
            Just((MAX_CAPACITY, YEAR_MS)),
            Just((MAX_CAPACITY, MAX_INTERVAL_MS)),
            (1..=MAX_CAPACITY, 3_600_000..=MAX_INTERVAL_MS),
        ]
        .prop_flat_map(|(capacity, interval_ms)| {
            let interval_us = interval_ms * 1000;
            let cost = prop_oneof![1..=capacity.min(60), 1..=capacity];
            let advance = prop_oneof![0..3_000_000u64, 0..=interval_us + interval_us / 2];
            (
                Just(capacity),
                Just(interval_ms),
                proptest::collection::vec((cost, advance), 1..200),
            )
        });
        prop_oneof![small, long]
    }

    #[test]
    fn one_replica_and_the_textbook_bucket_agree_at_1000_per_day_and_a_billion_per_year() {
        const HOUR_US: u64 = 3_600_000_000;
        for (capacity, interval_ms) in [
            (1_000, DAY_MS),
            (MAX_CAPACITY, YEAR_MS),
            (MAX_CAPACITY, MAX_INTERVAL_MS),
        ] {
            let rate = Rate::try_new(capacity, interval_ms).unwrap();
            let mut state = BucketState::full_at(0);
            let mut reference = ReferenceBucket::new_at(rate, 0);
            let mut incarnation = 0;
            // Drained at noon, then a quarter, a tenth and a little at a time over the next days.
            let mut now = 12 * HOUR_US;
            let mut steps = vec![(capacity, 0)];
            for _ in 0..3 {
                steps.extend([
                    (capacity / 4, 6 * HOUR_US),
                    (capacity / 10 + 1, 1),
                    (1, 1_000_000),
                    (capacity / 3, 2 * 24 * HOUR_US + 7),
                    (capacity, 400 * 24 * HOUR_US),
                    (capacity, 0),
                ]);
            }
            for (cost, advance_us) in steps {
                now += advance_us;
                let cost = cost.max(1);
                let ours = state.try_consume_at(rate, A, &mut incarnation, cost, now);
                let theirs = reference.try_consume_at(cost, now);
                assert_eq!(ours, theirs, "{rate:?} at {now} us, cost {cost}");
                // To the scaled unit: outcomes round a level to whole tokens and microseconds.
                assert_eq!(
                    state.level_scaled_at(rate, now),
                    reference.level_scaled(),
                    "{rate:?} at {now} us"
                );
            }
        }
    }

    fn joined(a: &BucketState, b: &BucketState) -> BucketState {
        let mut out = a.clone();
        out.join(b);
        out
    }

    proptest! {
        #[test]
        fn merge_is_commutative(states in states(), i in any::<prop::sample::Index>(), j in any::<prop::sample::Index>()) {
            let (a, b) = (i.get(&states), j.get(&states));
            prop_assert_eq!(joined(a, b), joined(b, a));
        }

        #[test]
        fn merge_is_associative(
            states in states(),
            i in any::<prop::sample::Index>(),
            j in any::<prop::sample::Index>(),
            k in any::<prop::sample::Index>(),
        ) {
            let (a, b, c) = (i.get(&states), j.get(&states), k.get(&states));
            prop_assert_eq!(joined(&joined(a, b), c), joined(a, &joined(b, c)));
        }

        #[test]
        fn merge_is_idempotent(states in states(), i in any::<prop::sample::Index>()) {
            let a = i.get(&states);
            prop_assert_eq!(&joined(a, a), a);
        }

        #[test]
        fn one_replica_is_exactly_the_textbook_bucket(
            (capacity, interval_ms, requests) in rate_and_requests(),
        ) {
            let rate = Rate::try_new(capacity, interval_ms).unwrap();
            let mut state = BucketState::full_at(0);
            let mut reference = ReferenceBucket::new_at(rate, 0);
            let mut now = 0;
            let mut incarnation = 0;
            for (cost, advance_us) in requests {
                now += advance_us;
                let ours = state.try_consume_at(rate, A, &mut incarnation, cost, now);
                let theirs = reference.try_consume_at(cost, now);
                prop_assert_eq!(ours, theirs, "at {} us, cost {}", now, cost);
                prop_assert_eq!(state.level_scaled_at(rate, now), reference.level_scaled());
            }
        }
    }
}
