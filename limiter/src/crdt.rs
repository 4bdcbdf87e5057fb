//! The replicated state of one token bucket: a join-semilattice.
//!
//! A token bucket is not a plain G-Counter: refill is a function of time and the bucket clamps at
//! its capacity, so "tokens added minus tokens consumed" over-counts the refill a full bucket
//! throws away. The state here separates the two:
//!
//! * each replica's consumption is its own [`Component`] counter (`consumed`), which only that
//!   replica increments: the G-Counter part;
//! * the clamp is a *rebase*: an instant (`epoch`) at which one replica (`rebaser`) saw the bucket
//!   full, with, per component, how much of its consumption that fullness accounts for
//!   (`absorbed`).
//!
//! The level at time `t` is `min(C, C + refill(t - epoch) - Σ (consumed - absorbed))`. Whenever a
//! replica sees the bucket full it rebases: epoch := now, rebaser := itself, absorbed :=
//! consumed. On one replica this is exactly the textbook bucket (property-tested against
//! [`crate::bucket::ReferenceBucket`]).
//!
//! Merge takes, per component, the larger `consumed`, and for the rebase as a whole the one with
//! the later `(epoch, rebaser)`: never a mix of two rebases. Two replicas that rebase
//! concurrently each absorbed their own view's consumption against the *same* stretch of refill;
//! combining both claims would forgive tokens that were never refilled. Keeping one claim leaves
//! whatever its rebaser had not seen outstanding, so a merged view is never more generous than the
//! truth beyond what replicas admitted before hearing of each other (bounded in `docs/crdt.md`).
//! Both parts are maxima over total orders, so merge is commutative, associative and idempotent.
//!
//! Components are keyed by (replica, incarnation). A replica that forgot a bucket (idle full
//! buckets hold no memory) and spends on it again counts in a new incarnation, so its new counts
//! never hide behind the old ones in a max, and the old component keeps whatever it still owes.

use smallvec::SmallVec;

use crate::bucket::{Micros, Outcome, Rate};

/// Identifies one run of one replica. A restarted process is a new replica: what its previous
/// life consumed stays in the merged state under the old id until it is refilled.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct ReplicaId(pub u64);

/// One replica's consumption of one bucket in one incarnation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Component {
    pub replica: ReplicaId,
    /// When this replica started counting for this bucket (again).
    pub incarnation: Micros,
    /// Tokens this replica admitted for this bucket in this incarnation. Only the replica itself
    /// increments it.
    pub consumed: u64,
    /// How much of `consumed` the state's rebase counts as refilled. Part of the rebase, not of
    /// the counter: it is taken from whichever rebase wins a merge. Never exceeds `consumed`.
    pub absorbed: u64,
}

impl Component {
    #[inline]
    fn key(&self) -> (ReplicaId, Micros) {
        (self.replica, self.incarnation)
    }

    #[inline]
    fn outstanding(&self) -> u64 {
        self.consumed - self.absorbed
    }
}

/// The mergeable state of one (policy, key) bucket.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct BucketState {
    /// An instant at which `rebaser` saw the bucket full, counting `absorbed` tokens as refilled.
    epoch: Micros,
    rebaser: ReplicaId,
    /// Sorted by (replica, incarnation), unique. One inline slot: a single-node bucket needs no
    /// second allocation.
    components: SmallVec<[Component; 1]>,
}

impl BucketState {
    /// A full bucket that nobody has spent from yet.
    pub fn full_at(now: Micros) -> Self {
        Self {
            epoch: now,
            rebaser: ReplicaId::default(),
            components: SmallVec::new(),
        }
    }

    /// Rebuild a state from its parts (snapshots and peers). Components are sorted and
    /// deduplicated (duplicates merged), and `absorbed` is capped at `consumed`, so any input
    /// yields a valid state.
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
            component.absorbed = component.absorbed.min(component.consumed);
            match state.find(component.key()) {
                Ok(i) => {
                    let existing = &mut state.components[i];
                    existing.consumed = existing.consumed.max(component.consumed);
                    existing.absorbed = existing.absorbed.max(component.absorbed);
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

    pub fn components(&self) -> &[Component] {
        &self.components
    }

    #[inline]
    fn find(&self, key: (ReplicaId, Micros)) -> Result<usize, usize> {
        self.components.binary_search_by_key(&key, Component::key)
    }

    /// Tokens spent and not counted as refilled by the rebase.
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

    /// If the bucket is full at `now`, `me` rebases it: the refill it accrued while full is
    /// discarded, as a real bucket discards it. Without this, credit would pile up beyond the
    /// capacity.
    #[inline]
    pub fn rebase_if_full_at(&mut self, rate: Rate, now: Micros, me: ReplicaId) {
        if now > self.epoch && self.is_full_at(rate, now) {
            self.epoch = now;
            self.rebaser = me;
            for component in &mut self.components {
                component.absorbed = component.consumed;
            }
        }
    }

    /// Spend `cost` tokens at `now` if the bucket holds them, counting them in the component
    /// `(me, incarnation)`. A rejected request changes nothing but the rebase (which does not
    /// change the level).
    #[inline]
    pub fn try_consume_at(
        &mut self,
        rate: Rate,
        me: ReplicaId,
        incarnation: Micros,
        cost: u64,
        now: Micros,
    ) -> Outcome {
        self.rebase_if_full_at(rate, now, me);
        let level = self.level_scaled_at(rate, now);
        let allowed = level >= rate.tokens_scaled(cost);
        if !allowed {
            return Outcome::describe(rate, level, false, cost);
        }
        match self.find((me, incarnation)) {
            Ok(i) => self.components[i].consumed += cost,
            Err(i) => self.components.insert(
                i,
                Component {
                    replica: me,
                    incarnation,
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

    /// The least upper bound of two states: commutative, associative, idempotent.
    pub fn join(&mut self, other: &BucketState) {
        let mine = (self.epoch, self.rebaser);
        let theirs = (other.epoch, other.rebaser);
        // Counters: the larger `consumed` per component.
        for component in &other.components {
            match self.find(component.key()) {
                Ok(i) => {
                    let c = &mut self.components[i];
                    c.consumed = c.consumed.max(component.consumed);
                }
                Err(i) => self.components.insert(
                    i,
                    Component {
                        absorbed: 0,
                        ..*component
                    },
                ),
            }
        }
        // The rebase: one claim, never a mix. Same claim on both sides: identical absorbed
        // values (a replica rebases at most once per instant); max keeps this idempotent anyway.
        if theirs > mine {
            self.epoch = other.epoch;
            self.rebaser = other.rebaser;
            for c in &mut self.components {
                c.absorbed = match other.find(c.key()) {
                    Ok(i) => other.components[i].absorbed,
                    Err(_) => 0,
                };
            }
        } else if theirs == mine {
            for c in &mut self.components {
                if let Ok(i) = other.find(c.key()) {
                    c.absorbed = c.absorbed.max(other.components[i].absorbed);
                }
            }
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
        assert!(state.try_consume_at(rate(), A, 1, 10, 10_000_000).allowed);
        assert!(!state.try_consume_at(rate(), A, 1, 1, 10_000_000).allowed);
    }

    #[test]
    fn rejected_request_leaves_the_level_unchanged() {
        let mut state = BucketState::full_at(0);
        state.try_consume_at(rate(), A, 1, 8, 0);
        let before = state.level_scaled_at(rate(), 1);
        assert!(!state.try_consume_at(rate(), A, 1, 5, 1).allowed);
        assert_eq!(state.level_scaled_at(rate(), 1), before);
    }

    #[test]
    fn merged_replicas_share_one_limit() {
        let mut a = BucketState::full_at(0);
        let mut b = BucketState::full_at(0);
        assert!(a.try_consume_at(rate(), A, 1, 6, 0).allowed);
        assert!(b.try_consume_at(rate(), B, 1, 3, 0).allowed);
        a.join(&b);
        b.join(&a);
        assert_eq!(a, b);
        assert_eq!(a.peek_at(rate(), 1, 0).remaining, 1);
        assert!(!a.try_consume_at(rate(), A, 1, 2, 0).allowed);
    }

    #[test]
    fn consumption_unseen_by_a_rebasing_replica_stays_outstanding() {
        let mut a = BucketState::full_at(0);
        let mut b = BucketState::full_at(0);
        a.try_consume_at(rate(), A, 1, 5, 0);
        // B has not heard of A's 5 tokens and rebases at 2 s, when its own view is full.
        b.try_consume_at(rate(), B, 1, 1, 2_000_000);
        a.join(&b);
        assert_eq!(a.peek_at(rate(), 1, 2_000_000).remaining, 4);
    }

    #[test]
    fn a_new_incarnation_counts_afresh_and_the_old_one_keeps_what_it_owes() {
        let mut old = BucketState::full_at(0);
        old.try_consume_at(rate(), A, 1, 7, 0);
        // A forgot the bucket (say its view was full) and spends again in a new incarnation,
        // while B still holds the old component: nothing A spent is lost in the merge.
        let mut fresh = BucketState::full_at(100_000);
        fresh.try_consume_at(rate(), A, 100_000, 2, 100_000);
        fresh.join(&old);
        assert_eq!(fresh.components().len(), 2);
        // Both incarnations count from the later epoch (100 ms): 10 - 7 - 2 = 1 (conservative by
        // the one token refilled between 0 and 100 ms).
        assert_eq!(fresh.peek_at(rate(), 1, 100_000).remaining, 1);
    }

    #[test]
    fn concurrent_rebases_do_not_both_spend_the_same_refill() {
        // Ten tokens refilled at one per second. A and B each admit 5 at t = 0 without hearing
        // of each other; at t = 5 s each sees its own view full, rebases, and admits 1 more.
        let slow = Rate::try_new(10, 10_000).unwrap();
        let (mut a, mut b) = (BucketState::full_at(0), BucketState::full_at(0));
        a.try_consume_at(slow, A, 1, 5, 0);
        b.try_consume_at(slow, B, 1, 5, 0);
        a.try_consume_at(slow, A, 1, 1, 5_000_000);
        b.try_consume_at(slow, B, 1, 1, 5_000_000);
        a.join(&b);
        // One textbook bucket: 10 - 10 + 5 refilled - 2 = 3. Keeping one rebase's claim leaves
        // the other side's 5 outstanding: 3 exactly (unioning both claims would say 8).
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
                    replicas[replica].try_consume_at(rate(), id, incarnations[replica], cost, now);
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
                        incarnations[replica] = now + 1;
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
                let ours = state.try_consume_at(rate, A, 1, cost, now);
                let theirs = reference.try_consume_at(cost, now);
                prop_assert_eq!(ours, theirs, "at {} us, cost {}", now, cost);
            }
        }
    }
}
