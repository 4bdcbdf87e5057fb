//! The replicated state of one token bucket: a join-semilattice.
//!
//! A token bucket is not a plain G-Counter: refill is a function of time and the bucket clamps at
//! its capacity, so "tokens added minus tokens consumed" over-counts the refill a full bucket
//! throws away. The state here separates the two:
//!
//! * each replica's consumption is its own [`Component`]: a counter only that replica increments
//!   (`consumed`), the G-Counter part;
//! * the clamp is an *epoch*: an instant at which the bucket was known to be full, together with,
//!   per component, how much of its consumption that fullness already accounts for (`absorbed`).
//!
//! The level at time `t` is then `min(C, C + refill(t - epoch) - Σ (consumed - absorbed))`.
//! Whenever a replica sees the bucket full it *rebases*: epoch := now, absorbed := consumed.
//! On one replica this is exactly the textbook bucket (property-tested against
//! [`crate::bucket::ReferenceBucket`]).
//!
//! Merge takes the later epoch, and per replica the component with the higher incarnation, or for
//! the same incarnation the larger `consumed` and the larger `absorbed`. Every part is a max, so
//! merge is commutative, associative and idempotent. Consumption a rebasing replica had not seen
//! stays outstanding after the rebase, so concurrency can only make a view more conservative,
//! except for what replicas admit concurrently before they hear of each other (the bound is
//! derived in `docs/crdt.md`).
//!
//! Incarnations let a replica forget a bucket (idle full buckets hold no memory) and start
//! counting again from zero later: its new component has a later incarnation and replaces the
//! old one everywhere, and the old one no longer matters because it was fully refilled.

use smallvec::SmallVec;

use crate::bucket::{Micros, Outcome, Rate};

/// Identifies one run of one replica. A restarted process is a new replica: what its previous
/// life consumed stays in the merged state under the old id until it is refilled.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ReplicaId(pub u64);

/// One replica's consumption of one bucket.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Component {
    pub replica: ReplicaId,
    /// When this replica started counting for this bucket. A later incarnation replaces an
    /// earlier one in merges.
    pub incarnation: Micros,
    /// Tokens this replica has admitted for this bucket in this incarnation. Only the replica
    /// itself increments it.
    pub consumed: u64,
    /// How much of `consumed` the bucket's epoch already counts as refilled. Any replica that
    /// rebases raises it; it never exceeds `consumed`.
    pub absorbed: u64,
}

impl Component {
    #[inline]
    fn outstanding(&self) -> u64 {
        self.consumed - self.absorbed
    }

    fn join(&mut self, other: &Component) {
        debug_assert_eq!(self.replica, other.replica);
        if other.incarnation > self.incarnation {
            *self = *other;
        } else if other.incarnation == self.incarnation {
            self.consumed = self.consumed.max(other.consumed);
            self.absorbed = self.absorbed.max(other.absorbed);
        }
    }
}

/// The mergeable state of one (policy, key) bucket.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct BucketState {
    /// An instant at which the bucket was full, counting `absorbed` tokens as refilled.
    epoch: Micros,
    /// Sorted by replica id, at most one per replica. One inline slot: a single-node bucket
    /// needs no second allocation.
    components: SmallVec<[Component; 1]>,
}

impl BucketState {
    /// A full bucket that nobody has spent from yet.
    pub fn full_at(now: Micros) -> Self {
        Self {
            epoch: now,
            components: SmallVec::new(),
        }
    }

    /// Rebuild a state from its parts (snapshots and peers). Components are sorted and
    /// deduplicated by merging, and `absorbed` is capped at `consumed`, so any input yields a
    /// valid state.
    pub fn from_parts(epoch: Micros, components: impl IntoIterator<Item = Component>) -> Self {
        let mut state = Self::full_at(epoch);
        for mut component in components {
            component.absorbed = component.absorbed.min(component.consumed);
            state.join_component(&component);
        }
        state
    }

    pub fn epoch(&self) -> Micros {
        self.epoch
    }

    pub fn components(&self) -> &[Component] {
        &self.components
    }

    /// Tokens spent and not yet counted as refilled at the epoch.
    #[inline]
    fn outstanding(&self) -> i128 {
        self.components
            .iter()
            .map(|c| i128::from(c.outstanding()))
            .sum()
    }

    /// The bucket's level at `now`, in the scaled units of [`Rate`]. Negative when replicas
    /// together admitted more than the bucket held (possible only in `shared` mode).
    #[inline]
    pub fn level_scaled_at(&self, rate: Rate, now: Micros) -> i128 {
        let since_epoch = i128::from(now) - i128::from(self.epoch);
        let unclamped = rate.full_scaled() + rate.refill_scaled(since_epoch)
            - self.outstanding() * rate.tokens_scaled(1);
        unclamped.min(rate.full_scaled())
    }

    /// Whether everything spent has been refilled by `now`.
    #[inline]
    pub fn is_full_at(&self, rate: Rate, now: Micros) -> bool {
        self.level_scaled_at(rate, now) >= rate.full_scaled()
    }

    /// If the bucket is full at `now`, move the epoch to `now`: the refill it accrued while full
    /// is discarded, as a real bucket discards it. Without this, credit would pile up beyond the
    /// capacity.
    #[inline]
    pub fn rebase_if_full_at(&mut self, rate: Rate, now: Micros) {
        if now > self.epoch && self.is_full_at(rate, now) {
            self.epoch = now;
            for component in &mut self.components {
                component.absorbed = component.consumed;
            }
        }
    }

    /// Spend `cost` tokens for `replica` at `now` if the bucket holds them. A rejected request
    /// changes nothing but the rebase (which does not change the level).
    ///
    /// `new_incarnation` is called only when `replica` has no component yet; it must return a
    /// stamp later than any incarnation this replica used before for this bucket.
    #[inline]
    pub fn try_consume_at(
        &mut self,
        rate: Rate,
        replica: ReplicaId,
        new_incarnation: impl FnOnce() -> Micros,
        cost: u64,
        now: Micros,
    ) -> Outcome {
        self.rebase_if_full_at(rate, now);
        let level = self.level_scaled_at(rate, now);
        let allowed = level >= rate.tokens_scaled(cost);
        if !allowed {
            return Outcome::describe(rate, level, false, cost);
        }
        match self
            .components
            .binary_search_by_key(&replica, |c| c.replica)
        {
            Ok(i) => self.components[i].consumed += cost,
            Err(i) => self.components.insert(
                i,
                Component {
                    replica,
                    incarnation: new_incarnation(),
                    consumed: cost,
                    absorbed: 0,
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

    fn join_component(&mut self, other: &Component) {
        match self
            .components
            .binary_search_by_key(&other.replica, |c| c.replica)
        {
            Ok(i) => self.components[i].join(other),
            Err(i) => self.components.insert(i, *other),
        }
    }

    /// The least upper bound of two states: commutative, associative, idempotent.
    pub fn join(&mut self, other: &BucketState) {
        self.epoch = self.epoch.max(other.epoch);
        for component in &other.components {
            self.join_component(component);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::bucket::ReferenceBucket;

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
                .try_consume_at(rate(), A, || 1, 10, 10_000_000)
                .allowed
        );
        assert!(!state.try_consume_at(rate(), A, || 1, 1, 10_000_000).allowed);
    }

    #[test]
    fn rejected_request_leaves_the_level_unchanged() {
        let mut state = BucketState::full_at(0);
        state.try_consume_at(rate(), A, || 1, 8, 0);
        let before = state.level_scaled_at(rate(), 1);
        assert!(!state.try_consume_at(rate(), A, || 1, 5, 1).allowed);
        assert_eq!(state.level_scaled_at(rate(), 1), before);
    }

    #[test]
    fn merged_replicas_share_one_limit() {
        let mut a = BucketState::full_at(0);
        let mut b = BucketState::full_at(0);
        assert!(a.try_consume_at(rate(), A, || 1, 6, 0).allowed);
        assert!(b.try_consume_at(rate(), B, || 1, 3, 0).allowed);
        a.join(&b);
        b.join(&a);
        assert_eq!(a, b);
        assert_eq!(a.peek_at(rate(), 1, 0).remaining, 1);
        assert!(!a.try_consume_at(rate(), A, || 1, 2, 0).allowed);
    }

    #[test]
    fn consumption_unseen_by_a_rebasing_replica_stays_outstanding() {
        let mut a = BucketState::full_at(0);
        let mut b = BucketState::full_at(0);
        a.try_consume_at(rate(), A, || 1, 5, 0);
        // B has not heard of A's 5 tokens and rebases at 2 s, when its own view is full.
        b.try_consume_at(rate(), B, || 1, 1, 2_000_000);
        a.join(&b);
        assert_eq!(a.peek_at(rate(), 1, 2_000_000).remaining, 4);
    }

    #[test]
    fn later_incarnation_replaces_a_forgotten_component() {
        let mut old = BucketState::full_at(0);
        old.try_consume_at(rate(), A, || 1, 7, 0);
        // A forgot the bucket when it was full again, and starts anew with a later incarnation.
        let mut fresh = BucketState::full_at(5_000_000);
        fresh.try_consume_at(rate(), A, || 5_000_000, 2, 5_000_000);
        fresh.join(&old);
        assert_eq!(fresh.components().len(), 1);
        assert_eq!(fresh.components()[0].consumed, 2);
        assert_eq!(fresh.peek_at(rate(), 1, 5_000_000).remaining, 8);
    }

    #[test]
    fn from_parts_repairs_invalid_input() {
        let state = BucketState::from_parts(
            0,
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
                    replicas[replica].try_consume_at(rate(), id, || now, cost, now);
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
                    }
                }
            }
        }
        seen
    }

    fn states() -> impl Strategy<Value = Vec<BucketState>> {
        proptest::collection::vec(op(), 0..40).prop_map(|ops| replay(&ops))
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
            capacity in 1..=50u64,
            interval_ms in 1..=2_000u64,
            requests in proptest::collection::vec((0..=60u64, 0..3_000_000u64), 1..200),
        ) {
            let rate = Rate::try_new(capacity, interval_ms).unwrap();
            let mut state = BucketState::full_at(0);
            let mut reference = ReferenceBucket::new_at(rate, 0);
            let mut now = 0;
            for (cost, advance_us) in requests {
                now += advance_us;
                let cost = cost.clamp(1, capacity);
                let ours = state.try_consume_at(rate, A, || now, cost, now);
                let theirs = reference.try_consume_at(cost, now);
                prop_assert_eq!(ours, theirs, "at {} us, cost {}", now, cost);
            }
        }
    }
}
