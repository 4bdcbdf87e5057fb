//! Every bucket this replica knows, in a sharded hash table.
//!
//! The hot path hashes (policy, key) once, locks one of many shards for a few dozen nanoseconds,
//! and runs the pure [`BucketState`] arithmetic under that lock. Nothing here reads a clock or
//! does I/O: callers pass `now`. Buckets exist only while they hold consumption; the periodic
//! [`Store::sweep`] drops buckets that have refilled, so idle clients cost no memory.

use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use compact_str::CompactString;
use hashbrown::HashTable;

use crate::bucket::{Micros, Outcome, Rate};
use crate::crdt::{BucketState, ReplicaId};

/// Stable number of a policy name for the life of the process (survives reloads).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct PolicyId(pub u32);

/// One bucket. Boxed in the table so the table's slots stay 8 bytes: a half-empty table after
/// growth then wastes pointers, not whole entries.
///
/// 88 bytes, so that with glibc's 8-byte chunk header it takes a 96-byte chunk; at 96 bytes it
/// took 112 (memory per active key 131 B instead of 115, and decisions over 100k keys about 5 %
/// slower, docs/benchmarks.md section 9). So the incarnation this replica counts in is not stored
/// here: it is the latest of its own components in `state`
/// ([`BucketState::latest_incarnation_of`]), unless `fresh` says to start a new one.
#[derive(Debug)]
struct Entry {
    policy: PolicyId,
    /// Where this bucket's latest local change is listed, if it is: `Table::changed[listed_at]`
    /// while `listed_round` is `Table::round`. Trusted only if that listing names this
    /// bucket, so neither the round's wrapping nor an index past `u16` can mix buckets up.
    listed_round: u8,
    listed_at: u16,
    /// This replica's next spending on the bucket starts a new incarnation, after all of its own
    /// the state holds: set when the bucket is adopted from a peer or a snapshot, or a merge
    /// brings back a later component of this replica's, from before it forgot the bucket.
    /// Those counters are only what a peer had heard of them, possibly less than this replica
    /// counted: spending counted on top of one would be hidden by the merge's maximum.
    fresh: bool,
    key: CompactString,
    state: BucketState,
}

// glibc adds an 8-byte header and rounds to 16: 88 bytes take a 96-byte chunk, 96 would take 112.
const _: () = assert!(
    std::mem::size_of::<Entry>() <= 88,
    "an entry must fit a 96-byte malloc chunk"
);

/// A merge refused by [`Store::merge_bounded`]; the store is left as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeRefused {
    /// The bucket would hold more components than allowed.
    TooManyComponents,
    /// The bucket is new here and the store holds its most buckets already.
    StoreFull,
}

/// What [`Store::merge_bounded`] may let a merge do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeBounds {
    /// Most components a bucket may hold after the merge.
    pub max_components: usize,
    /// Most buckets the store may hold for a merge to add one.
    pub max_buckets: usize,
}

impl MergeBounds {
    pub const NONE: Self = Self {
        max_components: usize::MAX,
        max_buckets: usize::MAX,
    };
}

/// Padded so that two shards' locks never share a cache line.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Shard {
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashTable<Box<Entry>>,
    /// Buckets changed by local decisions since the last drain, each as it was after its latest
    /// local change, each listed once (unless a round lists more than `u16::MAX` in one shard:
    /// a bucket may then be listed again, its later state after its earlier one).
    changed: Vec<Change>,
    /// Drains so far, wrapping ([`Entry::listed_round`]).
    round: u8,
}

impl Entry {
    /// A bucket not listed as changed this round (`round`: the table's).
    fn unlisted(
        policy: PolicyId,
        key: &str,
        state: BucketState,
        fresh: bool,
        round: u8,
    ) -> Box<Entry> {
        Box::new(Entry {
            policy,
            listed_round: round.wrapping_sub(1),
            listed_at: u16::MAX,
            fresh,
            key: CompactString::from(key),
            state,
        })
    }
}

/// A bucket changed by a local decision: policy, key, state after the change.
pub type Change = (PolicyId, CompactString, BucketState);

impl Table {
    /// List `entry`'s state as changed this round, or bring its listing up to date. Copying the
    /// state here, where the decision has it in cache, spares the drain a lookup per bucket
    /// (two cache misses each over a large store: 1.7 % of a replica's CPU under load,
    /// docs/benchmarks.md section 10).
    fn list_change(changed: &mut Vec<Change>, round: u8, entry: &mut Entry) {
        if entry.listed_round == round
            && let Some((policy, key, state)) = changed.get_mut(usize::from(entry.listed_at))
            && *policy == entry.policy
            && *key == entry.key
        {
            state.clone_from(&entry.state);
            return;
        }
        entry.listed_round = round;
        entry.listed_at = u16::try_from(changed.len()).unwrap_or(u16::MAX);
        changed.push((entry.policy, entry.key.clone(), entry.state.clone()));
    }
}

/// What one pass of [`Store::sweep`] saw of one policy's buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicyUsage {
    /// Buckets holding consumption (not full).
    pub active: u64,
    /// Whole tokens in the most depleted active bucket, if any.
    pub min_available: Option<u64>,
}

/// The result of one [`Store::sweep`].
#[derive(Debug, Clone, Default)]
pub struct SweepReport {
    /// Buckets dropped because they were full again, or their policy is gone.
    pub reclaimed: usize,
    pub usage: Vec<(PolicyId, PolicyUsage)>,
}

impl SweepReport {
    /// Count one bucket of `policy` that is not full and holds `available` whole tokens.
    pub fn record_active(&mut self, policy: PolicyId, available: u64) {
        let usage = match self.usage.iter_mut().find(|(p, _)| *p == policy) {
            Some((_, usage)) => usage,
            None => {
                self.usage.push((policy, PolicyUsage::default()));
                &mut self.usage.last_mut().expect("just pushed").1
            }
        };
        usage.active += 1;
        usage.min_available = Some(usage.min_available.map_or(available, |m| m.min(available)));
    }
}

#[derive(Debug)]
pub struct Store {
    shards: Box<[Shard]>,
    shard_mask: usize,
    hasher: foldhash::fast::FixedState,
    replica: ReplicaId,
    len: AtomicUsize,
    /// Whether to remember which buckets changed (only replication needs it).
    track_changes: bool,
}

impl Store {
    /// The size of one bucket's entry (its table slot and allocator chunk header not included).
    pub const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

    /// An empty store for `replica`. `shards` is rounded up to a power of two.
    pub fn new(replica: ReplicaId, shards: usize) -> Self {
        let shards = shards.max(1).next_power_of_two();
        Self {
            shards: (0..shards).map(|_| Shard::default()).collect(),
            shard_mask: shards - 1,
            hasher: foldhash::fast::FixedState::with_seed(replica.0),
            replica,
            len: AtomicUsize::new(0),
            track_changes: false,
        }
    }

    /// Remember which buckets local decisions change, for [`Store::drain_changes`].
    pub fn with_change_tracking(mut self) -> Self {
        self.track_changes = true;
        self
    }

    pub fn replica(&self) -> ReplicaId {
        self.replica
    }

    /// Buckets currently held.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    fn hash(&self, policy: PolicyId, key: &str) -> u64 {
        self.hasher.hash_one((policy.0, key))
    }

    #[inline]
    fn shard(&self, hash: u64) -> &Shard {
        // The table uses the low bits (slot) and the top 7 bits (tag) of the hash; pick the
        // shard from bits in between so that neither is correlated with the shard.
        &self.shards[(hash >> 32) as usize & self.shard_mask]
    }

    /// Spend `cost` tokens of (policy, key) at `now` if its bucket holds them.
    #[inline]
    pub fn decide(
        &self,
        policy: PolicyId,
        key: &str,
        rate: Rate,
        cost: u64,
        now: Micros,
    ) -> Outcome {
        let hash = self.hash(policy, key);
        let shard = self.shard(hash);
        let mut guard = shard
            .table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Table {
            entries,
            changed,
            round,
        } = &mut *guard;
        if let Some(entry) = entries.find_mut(hash, |e| e.policy == policy && e.key == key) {
            let mut incarnation = match entry.fresh {
                true => 0,
                false => entry.state.latest_incarnation_of(self.replica),
            };
            let outcome =
                entry
                    .state
                    .try_consume_at(rate, self.replica, &mut incarnation, cost, now);
            if outcome.allowed {
                entry.fresh = false;
                if self.track_changes {
                    Table::list_change(changed, *round, entry);
                }
            }
            return outcome;
        }
        let mut state = BucketState::full_at(now);
        let mut incarnation = 0;
        let outcome = state.try_consume_at(rate, self.replica, &mut incarnation, cost, now);
        if outcome.allowed {
            let mut entry = Entry::unlisted(policy, key, state, false, *round);
            if self.track_changes {
                Table::list_change(changed, *round, &mut entry);
            }
            entries.insert_unique(hash, entry, |e| self.hash(e.policy, &e.key));
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    /// The shard holding `hash`, locked. A panic while holding a shard lock cannot leave a
    /// bucket half-updated (updates are single assignments), so a poisoned lock is usable.
    #[inline]
    fn lock(&self, hash: u64) -> std::sync::MutexGuard<'_, Table> {
        self.shard(hash)
            .table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// What a decision for `cost` tokens would see at `now`, without spending anything.
    pub fn peek(&self, policy: PolicyId, key: &str, rate: Rate, cost: u64, now: Micros) -> Outcome {
        let hash = self.hash(policy, key);
        let table = self.lock(hash);
        match table
            .entries
            .find(hash, |e| e.policy == policy && e.key == key)
        {
            Some(entry) => entry.state.peek_at(rate, cost, now),
            None => BucketState::full_at(now).peek_at(rate, cost, now),
        }
    }

    /// A copy of the state of (policy, key), if it has a bucket in memory.
    pub fn state(&self, policy: PolicyId, key: &str) -> Option<BucketState> {
        let hash = self.hash(policy, key);
        let table = self.lock(hash);
        table
            .entries
            .find(hash, |e| e.policy == policy && e.key == key)
            .map(|e| e.state.clone())
    }

    /// Whether (policy, key) currently has a bucket in memory.
    pub fn contains(&self, policy: PolicyId, key: &str) -> bool {
        let hash = self.hash(policy, key);
        let table = self.lock(hash);
        table
            .entries
            .find(hash, |e| e.policy == policy && e.key == key)
            .is_some()
    }

    /// Merge a bucket state received from a peer or read from a snapshot, then rebase it at
    /// `now` if it is full. Returns whether the local state changed.
    ///
    /// A bucket this replica holds no entry for is adopted as it comes, components of this
    /// replica's earlier incarnations included: whatever they still owe stays owed. If this
    /// replica spends on it, it counts in a new incarnation.
    pub fn merge(
        &self,
        policy: PolicyId,
        key: &str,
        remote: &BucketState,
        rate: Rate,
        now: Micros,
    ) -> bool {
        self.merge_bounded(policy, key, remote, rate, now, MergeBounds::NONE)
            .unwrap_or(false)
    }

    /// [`Store::merge`], unless the merged bucket would hold more than `max_components`
    /// components, or the bucket is new here and the store holds `max_buckets` already: then
    /// the store stays as it was and the merge is refused. Bounds what a peer can make one
    /// bucket, and the store, hold over many messages, each within its bounds on its own.
    /// (Local decisions are not bounded: a client is never refused for memory.)
    pub fn merge_bounded(
        &self,
        policy: PolicyId,
        key: &str,
        remote: &BucketState,
        rate: Rate,
        now: Micros,
        bounds: MergeBounds,
    ) -> Result<bool, MergeRefused> {
        let max_components = bounds.max_components;
        let hash = self.hash(policy, key);
        let mut table = self.lock(hash);
        if let Some(entry) = table
            .entries
            .find_mut(hash, |e| e.policy == policy && e.key == key)
        {
            let before = entry.state.clone();
            let counting_in = entry.state.latest_incarnation_of(self.replica);
            // No claim before joining: what arrives was spent before now, and a claim made
            // without it would count it from now, a refill late.
            entry.state.join(remote);
            if entry.state.components().len() > max_components {
                entry.state = before;
                return Err(MergeRefused::TooManyComponents);
            }
            if entry.state.latest_incarnation_of(self.replica) != counting_in {
                entry.fresh = true;
            }
            entry.state.rebase_if_full_at(rate, now, self.replica);
            return Ok(entry.state != before);
        }
        if remote.components().len() > max_components {
            return Err(MergeRefused::TooManyComponents);
        }
        if remote.is_full_at(rate, now) {
            return Ok(false);
        }
        if self.len() >= bounds.max_buckets {
            return Err(MergeRefused::StoreFull);
        }
        let entry = Entry::unlisted(policy, key, remote.clone(), true, table.round);
        table
            .entries
            .insert_unique(hash, entry, |e| self.hash(e.policy, &e.key));
        self.len.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Visit every bucket, one shard at a time (that shard's decisions wait meanwhile).
    pub fn for_each(&self, mut visit: impl FnMut(PolicyId, &str, &BucketState)) {
        for shard in self.shards.iter() {
            let table = shard.table.lock().unwrap_or_else(|p| p.into_inner());
            for entry in table.entries.iter() {
                visit(entry.policy, &entry.key, &entry.state);
            }
        }
    }

    /// Visit the buckets of shards `from..` until at least `at_least` were visited (whole shards
    /// only: a page of the state ends at a shard boundary). Returns the next shard to visit, or
    /// `None` after the last one. Shards are stable (a key's shard never changes), so paging
    /// through them visits every bucket that exists throughout, once.
    pub fn for_each_page(
        &self,
        from: usize,
        at_least: usize,
        mut visit: impl FnMut(PolicyId, &str, &BucketState),
    ) -> Option<usize> {
        let mut visited = 0;
        for (index, shard) in self.shards.iter().enumerate().skip(from) {
            if visited >= at_least {
                return Some(index);
            }
            let table = shard.table.lock().unwrap_or_else(|p| p.into_inner());
            for entry in table.entries.iter() {
                visit(entry.policy, &entry.key, &entry.state);
            }
            visited += table.entries.len();
        }
        None
    }

    /// Append to `out` every bucket changed by a local decision since the last call, as it was
    /// after its latest local change (merges since then are peers' news, which they have), and
    /// forget the changes. Requires [`Store::with_change_tracking`].
    pub fn drain_changes(&self, out: &mut Vec<Change>) {
        for shard in self.shards.iter() {
            let mut table = shard.table.lock().unwrap_or_else(|p| p.into_inner());
            table.round = table.round.wrapping_add(1);
            // Moves the listings and keeps the shard's room for the next round's.
            out.append(&mut table.changed);
        }
    }

    /// How many shards [`Store::sweep_shard`] takes.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Drop every bucket that is full at `now` (or whose policy `rate_of` no longer knows), and
    /// report what the others hold. `rate_of(policy, key)` gives the rate in force for a key.
    /// Locks one shard at a time, so decisions on other shards proceed while it runs.
    pub fn sweep(
        &self,
        now: Micros,
        rate_of: impl Fn(PolicyId, &str) -> Option<Rate>,
    ) -> SweepReport {
        let mut report = SweepReport::default();
        for index in 0..self.shard_count() {
            self.sweep_shard(index, now, &rate_of, &mut report);
        }
        report
    }

    /// [`Store::sweep`] for one shard, adding to `report`: callers that must not hold a thread
    /// for a whole pass (the server's sweeper) yield between shards. The dropped buckets are
    /// freed after the shard's lock is released, so decisions wait only for the scan.
    pub fn sweep_shard(
        &self,
        index: usize,
        now: Micros,
        rate_of: impl Fn(PolicyId, &str) -> Option<Rate>,
        report: &mut SweepReport,
    ) {
        let dropped: Vec<Box<Entry>> = {
            let mut table = self.shards[index]
                .table
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let mut usage_of = |entry: &Entry, available: u64| {
                report.record_active(entry.policy, available);
            };
            table
                .entries
                .extract_if(|entry| {
                    let Some(rate) = rate_of(entry.policy, &entry.key) else {
                        return true;
                    };
                    if entry.state.is_full_at(rate, now) {
                        return true;
                    }
                    usage_of(
                        entry,
                        rate.whole_tokens(entry.state.level_scaled_at(rate, now)),
                    );
                    false
                })
                .collect()
        };
        self.len.fetch_sub(dropped.len(), Ordering::Relaxed);
        report.reclaimed += dropped.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: PolicyId = PolicyId(0);

    fn rate() -> Rate {
        Rate::try_new(10, 1000).unwrap()
    }

    #[test]
    fn keys_and_policies_have_separate_buckets() {
        let store = Store::new(ReplicaId(1), 4);
        assert!(store.decide(P, "a", rate(), 10, 0).allowed);
        assert!(!store.decide(P, "a", rate(), 1, 0).allowed);
        assert!(store.decide(P, "b", rate(), 10, 0).allowed);
        assert!(store.decide(PolicyId(1), "a", rate(), 10, 0).allowed);
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn peek_spends_nothing_and_creates_no_bucket() {
        let store = Store::new(ReplicaId(1), 4);
        assert_eq!(store.peek(P, "a", rate(), 1, 0).remaining, 10);
        assert!(store.is_empty());
        store.decide(P, "a", rate(), 4, 0);
        assert_eq!(store.peek(P, "a", rate(), 1, 0).remaining, 6);
        assert_eq!(store.peek(P, "a", rate(), 1, 0).remaining, 6);
    }

    #[test]
    fn sweep_reclaims_refilled_buckets_and_reports_the_rest() {
        let store = Store::new(ReplicaId(1), 4);
        store.decide(P, "small", rate(), 1, 0);
        store.decide(P, "big", rate(), 9, 0);
        store.decide(PolicyId(7), "orphan", rate(), 1, 0);
        // 0.5 s later "small" has refilled; "big" holds 1 + 5 tokens; policy 7 was removed.
        let report = store.sweep(500_000, |p, _| (p == P).then(rate));
        assert_eq!(report.reclaimed, 2);
        assert_eq!(store.len(), 1);
        assert!(store.contains(P, "big"));
        assert_eq!(
            report.usage,
            vec![(
                P,
                PolicyUsage {
                    active: 1,
                    min_available: Some(6)
                }
            )]
        );
        // After it refills, it goes too, and a fresh decision starts from a full bucket.
        store.sweep(1_000_000, |_, _| Some(rate()));
        assert!(store.is_empty());
        assert_eq!(store.decide(P, "big", rate(), 1, 1_000_000).remaining, 9);
    }

    #[test]
    fn changes_are_drained_once_and_only_when_tracked() {
        let untracked = Store::new(ReplicaId(1), 4);
        untracked.decide(P, "a", rate(), 1, 0);
        let mut drained = Vec::new();
        untracked.drain_changes(&mut drained);
        assert!(drained.is_empty());

        let store = Store::new(ReplicaId(1), 4).with_change_tracking();
        store.decide(P, "a", rate(), 1, 0);
        store.decide(P, "a", rate(), 1, 0);
        store.decide(P, "b", rate(), 1, 0);
        assert!(!store.decide(P, "c", rate(), 11, 0).allowed);
        let consumed = |drained: &[Change]| {
            let mut keys: Vec<(String, u64)> = drained
                .iter()
                .map(|(_, key, state)| (key.to_string(), state.components()[0].consumed))
                .collect();
            keys.sort();
            keys
        };
        store.drain_changes(&mut drained);
        assert_eq!(consumed(&drained), [("a".into(), 2), ("b".into(), 1)]);
        drained.clear();
        store.drain_changes(&mut drained);
        assert!(drained.is_empty(), "drained twice: {drained:?}");
        // The next round lists a bucket again, as it is after its latest change.
        store.decide(P, "a", rate(), 3, 0);
        store.decide(P, "a", rate(), 1, 0);
        store.drain_changes(&mut drained);
        assert_eq!(consumed(&drained), [("a".into(), 6)]);
    }

    #[test]
    fn a_bucket_is_listed_once_per_round_whatever_the_rounds_wrapping() {
        let store = Store::new(ReplicaId(1), 1).with_change_tracking();
        let mut drained = Vec::new();
        // "a" is listed in round 0, then the round counter wraps back to 0 while "b" and "c"
        // take the listings: "a"'s old place names another bucket, which must stay untouched.
        store.decide(P, "a", rate(), 1, 0);
        store.drain_changes(&mut drained);
        for round in 1..=u32::from(u8::MAX) {
            store.decide(P, "b", rate(), 0, u64::from(round));
            drained.clear();
            store.drain_changes(&mut drained);
        }
        store.decide(P, "b", rate(), 1, 1_000);
        store.decide(P, "a", rate(), 1, 1_000);
        store.decide(P, "a", rate(), 1, 1_000);
        drained.clear();
        store.drain_changes(&mut drained);
        let listed: Vec<(String, u64)> = drained
            .iter()
            .map(|(_, key, state)| (key.to_string(), state.components()[0].consumed))
            .collect();
        assert_eq!(listed, [("b".into(), 1), ("a".into(), 3)]);
    }

    #[test]
    fn merging_a_peer_state_shares_its_consumption() {
        let a = Store::new(ReplicaId(1), 4);
        let b = Store::new(ReplicaId(2), 4);
        a.decide(P, "k", rate(), 6, 0);
        let mut exported = Vec::new();
        a.for_each(|policy, key, state| exported.push((policy, key.to_owned(), state.clone())));
        for (policy, key, state) in &exported {
            assert!(b.merge(*policy, key, state, rate(), 0));
            assert!(
                !b.merge(*policy, key, state, rate(), 0),
                "merging twice changes nothing"
            );
        }
        assert_eq!(b.peek(P, "k", rate(), 1, 0).remaining, 4);
        assert!(!b.decide(P, "k", rate(), 5, 0).allowed);
    }

    #[test]
    fn a_forgotten_bucket_echoed_back_full_is_not_held_again() {
        let a = Store::new(ReplicaId(1), 4);
        a.decide(P, "k", rate(), 5, 0);
        let mut old = None;
        a.for_each(|_, _, state| old = Some(state.clone()));
        a.sweep(1_000_000, |_, _| Some(rate()));
        assert!(a.is_empty());
        // A peer echoes the old state back after a partition: it is full by now, so nothing is held.
        assert!(!a.merge(P, "k", &old.unwrap(), rate(), 1_000_000));
        assert!(a.is_empty());
    }

    #[test]
    fn an_own_component_brought_back_by_a_merge_is_never_counted_in_again() {
        use crate::crdt::{Component, UNLISTED};
        let a = Store::new(ReplicaId(1), 4);
        // Before forgetting the bucket, A counted 5 tokens in its incarnation at 10 s; a peer
        // heard of 3 of them.
        let heard = BucketState::from_parts(
            10_000_000,
            ReplicaId(0),
            [Component {
                replica: ReplicaId(1),
                incarnation: 10_000_000,
                consumed: 3,
                absorbed: UNLISTED,
            }],
        );
        // A spends again from a clock that reads earlier (stepped back), then hears the copy.
        assert!(a.decide(P, "k", rate(), 2, 9_000_000).allowed);
        a.merge(P, "k", &heard, rate(), 10_400_000);
        assert!(a.decide(P, "k", rate(), 1, 10_500_000).allowed);
        let mut components = Vec::new();
        a.for_each(|_, _, s| components = s.components().to_vec());
        let copy = components
            .iter()
            .find(|c| c.incarnation == 10_000_000)
            .expect("the copy stays");
        assert_eq!(
            copy.consumed, 3,
            "spent on top of a peer's copy of an old counter: {components:?}"
        );
        assert!(
            components.iter().any(|c| c.replica == ReplicaId(1)
                && c.incarnation > 10_000_000
                && c.consumed == 1),
            "{components:?}"
        );
    }

    #[test]
    fn spending_on_an_adopted_bucket_uses_a_fresh_incarnation() {
        let a = Store::new(ReplicaId(1), 4);
        let b = Store::new(ReplicaId(2), 4);
        a.decide(P, "k", rate(), 3, 1_000);
        let mut state = None;
        a.for_each(|_, _, s| state = Some(s.clone()));
        b.merge(P, "k", &state.unwrap(), rate(), 1_000);
        b.decide(P, "k", rate(), 2, 2_000);
        let mut components = Vec::new();
        b.for_each(|_, _, s| components = s.components().to_vec());
        assert_eq!(components.len(), 2);
        assert!(
            components
                .iter()
                .any(|c| c.replica == ReplicaId(2) && c.incarnation == 2_000)
        );
        assert_eq!(b.peek(P, "k", rate(), 1, 2_000).remaining, 5);
    }
}
