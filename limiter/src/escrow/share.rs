//! A replica's private sub-bucket of a `strict` policy: capacity `u·C`, refilled at `u·r`, where
//! `u` is this replica's current share (in parts per million) and changes over time.
//!
//! Pure arithmetic, time is an argument. The rules that keep a share change from creating
//! tokens (docs/crdt.md, "strict mode"):
//!
//! * between changes the sub-bucket is a textbook bucket of capacity `u·C` and rate `u·r`;
//! * a share that shrinks clamps the level to the new capacity;
//! * a share that grows leaves the level where it is: the new part starts empty and fills at the
//!   new rate.
//!
//! A sub-bucket nobody has touched for a while is settled lazily by replaying the share history
//! since it was last touched. A key this replica has no sub-bucket for (never seen, or dropped
//! when full) starts at [`ShareHistory::fresh_level`]: the lowest level any sub-bucket of it could
//! have now, which is what one emptied an interval ago would have refilled to since.
//!
//! Units: a level of `L` is `L / (interval_us · WHOLE)` tokens, so refill over `dt` µs at share
//! `u` is exactly `u · C · dt` and nothing rounds.

use crate::bucket::{Micros, Outcome, Rate};

/// Shares are parts per million of a policy's capacity and refill.
pub type Ppm = u32;
/// A whole policy.
pub const WHOLE: Ppm = 1_000_000;

/// History kept beyond the longest interval: a sub-bucket untouched for longer than this (the
/// sweep settles every sub-bucket each second, so only a stalled sweep gets here) is treated as
/// empty, which can only under-admit.
const HISTORY_SLACK_US: Micros = 10_000_000;

/// The share of one policy over time, oldest first. The first entry is the share this replica
/// started with (0: a new replica owns nothing until an allocation includes it).
#[derive(Debug, Clone)]
pub struct ShareHistory {
    changes: Vec<(Micros, Ppm)>,
    /// Entries older than `longest interval + slack` are dropped (keeping the one in force).
    keep_us: Micros,
}

impl ShareHistory {
    /// A policy this replica holds no share of yet, as of `now`.
    pub fn new(now: Micros, longest_interval_us: Micros) -> Self {
        Self {
            changes: vec![(now, 0)],
            keep_us: longest_interval_us + HISTORY_SLACK_US,
        }
    }

    /// The share in force now.
    pub fn current(&self) -> Ppm {
        self.changes.last().map_or(0, |&(_, u)| u)
    }

    /// When the history starts (older sub-buckets are treated as empty).
    fn start(&self) -> Micros {
        self.changes.first().map_or(0, |&(t, _)| t)
    }

    /// Set the share from `at` on. Change times strictly increase, and a caller must stamp a
    /// change later than every settle that happened before it (the runtime uses `now + 1` under
    /// its write lock): replay treats a change at or before a bucket's `at` as already applied.
    pub fn set(&mut self, at: Micros, share: Ppm) {
        let share = share.min(WHOLE);
        if share == self.current() {
            return;
        }
        let last = self.changes.last().map_or(0, |&(t, _)| t);
        let at = at.max(last + 1);
        self.changes.push((at, share));
        self.trim(at);
    }

    fn trim(&mut self, now: Micros) {
        let horizon = now.saturating_sub(self.keep_us);
        // Keep the last change at or before the horizon: it says what was in force there.
        let first_kept = self
            .changes
            .iter()
            .rposition(|&(t, _)| t <= horizon)
            .unwrap_or(0);
        if first_kept > 0 {
            self.changes.drain(..first_kept);
        }
    }

    /// The level of a key this replica holds no sub-bucket for: what a sub-bucket emptied one
    /// interval ago holds at `now`, replaying the shares since. No sub-bucket of the key can
    /// hold less: one dropped within the interval was full when dropped, and one dropped (or
    /// never created) earlier held at least nothing an interval ago. At least the smallest
    /// capacity of the interval (refill at shares of at least `u` for a whole interval reaches
    /// `u·C`), and more right after a share grew: the part refilled since counts.
    pub fn fresh_level(&self, rate: Rate, now: Micros) -> i128 {
        let mut bucket = SubBucket {
            level: 0,
            at: now.saturating_sub(interval_us(rate)),
        };
        self.settle(&mut bucket, rate, now);
        bucket.level
    }

    /// Bring `bucket` to `now`, replaying every share change since it was last settled.
    pub fn settle(&self, bucket: &mut SubBucket, rate: Rate, now: Micros) {
        if now <= bucket.at {
            return;
        }
        if bucket.at < self.start() {
            // Older than the history: we cannot know how far it refilled; empty is safe.
            bucket.level = 0;
            bucket.at = self.start();
        }
        // The first change after the bucket was last settled; the one before it was in force.
        let next = self.changes.partition_point(|&(t, _)| t <= bucket.at);
        let first = next.saturating_sub(1);
        let mut share = self.changes[first].1;
        let mut level = bucket.level;
        let mut at = bucket.at;
        for &(change_at, next) in &self.changes[first + 1..] {
            if change_at > now {
                break;
            }
            level = refill(rate, share, level, change_at - at);
            at = change_at;
            share = next;
            level = level.min(capacity(rate, share));
        }
        bucket.level = refill(rate, share, level, now - at);
        bucket.at = now;
    }
}

/// What a borrower asks a lender for (see [`SubBucket::lend`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoanAsk {
    /// Units it lacks for the request waiting on the loan (0: only evening out).
    pub wanted: i128,
    /// The whole level, when it is less than `wanted` (the borrower pools several loans).
    pub partial: bool,
    /// The borrower's capacity while its lease holds, else 0 (no evening out).
    pub room: i128,
    /// What the borrower's sub-bucket keeps once the request is paid.
    pub kept: i128,
}

/// One key's private sub-bucket on this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubBucket {
    /// In units of `1 / (interval_us · WHOLE)` tokens; never negative, never above the capacity
    /// of the share in force at `at`.
    pub level: i128,
    pub at: Micros,
}

impl SubBucket {
    /// A sub-bucket for a key with no recent spending on this replica.
    pub fn fresh(history: &ShareHistory, rate: Rate, now: Micros) -> Self {
        Self {
            level: history.fresh_level(rate, now),
            at: now,
        }
    }

    /// Spend `cost` at `now` if the sub-bucket holds it (after settling it to `now`).
    pub fn try_spend(
        &mut self,
        history: &ShareHistory,
        rate: Rate,
        cost: u64,
        now: Micros,
    ) -> Outcome {
        history.settle(self, rate, now);
        let needed = cost_units(rate, cost);
        let allowed = self.level >= needed;
        if allowed {
            self.level -= needed;
        }
        self.describe(rate, history.current(), allowed, cost)
    }

    /// The units this sub-bucket lacks for `cost` at `now` (settle it first): 0 when it holds
    /// them. What a replica asks its peers to lend (see [`SubBucket::spend_with_loan`]).
    pub fn shortfall(&self, rate: Rate, cost: u64) -> i128 {
        (cost_units(rate, cost) - self.level).max(0)
    }

    /// Lend to a peer that lacks `ask.wanted` units, at `now`. When the level holds them: those
    /// and, if the borrower has room (its capacity, 0 for none), as much more as leaves both
    /// sub-buckets equally full once the borrower has spent (it keeps `ask.kept` of its own).
    /// Else, with `ask.partial`, the whole level; else nothing. Returns `(lent, level before
    /// lending)`. A loan of nothing wanted only evens out the two sub-buckets.
    ///
    /// The units leave this sub-bucket for good; the borrower spends them or keeps what fits
    /// its capacity, so a loan moves tokens and never makes any (docs/crdt.md, "strict mode",
    /// loans). Evening out the levels is what keeps refill from being lost: every sub-bucket's
    /// fill ratio rises at the same pace (`r/C`), so sub-buckets equally full are full at the
    /// same moment, and no share's refill is thrown away while another's bucket is short.
    /// Only a replica whose lease holds may lend.
    pub fn lend(
        &mut self,
        history: &ShareHistory,
        rate: Rate,
        ask: LoanAsk,
        now: Micros,
    ) -> (i128, i128) {
        history.settle(self, rate, now);
        let before = self.level;
        let wanted = ask.wanted.max(0);
        let lent = if before >= wanted {
            let own = capacity(rate, history.current());
            let spare = before - wanted;
            // Equal fill ratios after the loan: (before − lent) / own = (kept + lent − wanted)
            // / room, so lent = wanted + (spare · room − kept · own) / (own + room).
            // Approximate is fine (any amount between `wanted` and `before` is safe); f64 keeps
            // the products in range.
            let extra = if ask.room > 0 && own + ask.room > 0 {
                let (spare_f, room, own, kept) = (
                    spare as f64,
                    ask.room as f64,
                    own as f64,
                    ask.kept.max(0) as f64,
                );
                (((spare_f * room - kept * own) / (own + room)) as i128).clamp(0, spare)
            } else {
                0
            };
            wanted + extra
        } else if ask.partial {
            before.max(0)
        } else {
            0
        };
        self.level -= lent;
        (lent, before)
    }

    /// Add `units` a peer lent to even out with this sub-bucket (no request waits on them),
    /// up to its capacity.
    pub fn take_balance(&mut self, history: &ShareHistory, rate: Rate, units: i128, now: Micros) {
        history.settle(self, rate, now);
        self.level = (self.level + units.max(0)).min(capacity(rate, history.current()).max(0));
    }

    /// This sub-bucket's capacity now: the room it offers a loan to even out with a lender.
    pub fn capacity_now(history: &ShareHistory, rate: Rate) -> i128 {
        capacity(rate, history.current())
    }

    /// Spend `cost` from this sub-bucket's level (only when `own` is true: this replica's lease
    /// holds) plus `loan` units lent by peers for this request. Refused when both together fall
    /// short; whatever of the loan is not spent stays here up to this sub-bucket's capacity,
    /// and the rest is lost (which can only under-admit).
    pub fn spend_with_loan(
        &mut self,
        history: &ShareHistory,
        rate: Rate,
        cost: u64,
        loan: i128,
        own: bool,
        now: Micros,
    ) -> Outcome {
        history.settle(self, rate, now);
        let needed = cost_units(rate, cost);
        let usable = if own { self.level } else { 0 };
        let allowed = usable + loan >= needed;
        let left = if allowed { loan - needed } else { loan };
        self.level = (self.level + left).clamp(0, capacity(rate, history.current()).max(0));
        let share = if own { history.current() } else { 0 };
        self.describe(rate, share, allowed, cost)
    }

    /// What a client sees: limit is the policy's capacity (the global limit), remaining and
    /// the times are this replica's share of it.
    pub fn describe(&self, rate: Rate, share: Ppm, allowed: bool, cost: u64) -> Outcome {
        let unit = i128::from(interval_us(rate)) * i128::from(WHOLE);
        let per_us = i128::from(rate.capacity()) * i128::from(share);
        let time_to = |deficit: i128| -> u64 {
            if deficit <= 0 {
                0
            } else if per_us == 0 {
                // No share now: nothing refills until an allocation gives this replica one.
                interval_us(rate)
            } else {
                u64::try_from(deficit.saturating_add(per_us - 1) / per_us).unwrap_or(u64::MAX)
            }
        };
        let depleted_ppm = if allowed {
            crate::bucket::depleted_ppm(self.level + cost_units(rate, cost), capacity(rate, share))
        } else {
            1_000_000
        };
        Outcome {
            allowed,
            limit: rate.capacity(),
            depleted_ppm,
            remaining: u64::try_from(self.level.max(0) / unit).unwrap_or(0),
            reset_after_us: time_to(capacity(rate, share) - self.level),
            retry_after_us: if allowed {
                0
            } else {
                time_to(cost_units(rate, cost) - self.level)
            },
        }
    }

    /// When not full: how much of the policy's capacity this sub-bucket's level stands for,
    /// in whole tokens (its fill ratio times the capacity). `None` when full. With no share it
    /// holds nothing of nothing: 0.
    pub fn available_of_capacity(&self, share: Ppm, rate: Rate) -> Option<u64> {
        let full = capacity(rate, share);
        if full > 0 && self.level >= full {
            return None;
        }
        if full <= 0 {
            return Some(0);
        }
        let ratio = self.level.clamp(0, full) as f64 / full as f64;
        Some((ratio * rate.capacity() as f64).floor() as u64)
    }

    /// True when dropping this sub-bucket loses nothing: it is full, and a fresh one would be
    /// too. Settle it first.
    pub fn is_reclaimable(&self, history: &ShareHistory, rate: Rate, now: Micros) -> bool {
        let full = capacity(rate, history.current());
        self.level >= full && history.fresh_level(rate, now) >= full
    }
}

/// How much to ask each lender for when no one of them holds a request's shortfall but
/// together they may: amounts that leave every sub-bucket equally full once the request is
/// paid (so none sits full, losing its refill, while others are short). `own` is the
/// borrower's (level it may spend, capacity), `lenders` each lender's (level it said it held,
/// capacity), `needed` the request's cost in units. `None` when all of them together hold less
/// than `needed`. The amounts cover the shortfall exactly or a little more (rounding).
pub fn plan_pool(own: (i128, i128), lenders: &[(i128, i128)], needed: i128) -> Option<Vec<i128>> {
    let shortfall = needed - own.0.max(0);
    let held: i128 = lenders.iter().map(|&(level, _)| level.max(0)).sum();
    if shortfall <= 0 || held < shortfall {
        return None;
    }
    let capacity: f64 =
        own.1.max(0) as f64 + lenders.iter().map(|&(_, c)| c.max(0) as f64).sum::<f64>();
    // The fill ratio everyone ends at.
    let ratio = if capacity > 0.0 {
        ((own.0.max(0) + held - needed) as f64 / capacity).max(0.0)
    } else {
        0.0
    };
    let mut amounts: Vec<i128> = lenders
        .iter()
        .map(|&(level, cap)| {
            let keep = (ratio * cap.max(0) as f64) as i128;
            (level.max(0) - keep).clamp(0, level.max(0))
        })
        .collect();
    // Rounding (or lenders fuller than their capacity says) may leave the sum short: the rest
    // from whoever still has some, largest first.
    let mut missing = shortfall - amounts.iter().sum::<i128>();
    let mut order: Vec<usize> = (0..lenders.len()).collect();
    order.sort_by_key(|&j| std::cmp::Reverse(lenders[j].0 - amounts[j]));
    for j in order {
        if missing <= 0 {
            break;
        }
        let more = (lenders[j].0.max(0) - amounts[j]).min(missing);
        amounts[j] += more;
        missing -= more;
    }
    Some(amounts)
}

fn interval_us(rate: Rate) -> Micros {
    rate.interval_ms() * 1000
}

/// Capacity of a share `u` of `rate`, in sub-bucket units.
pub fn capacity(rate: Rate, share: Ppm) -> i128 {
    i128::from(share) * i128::from(rate.capacity()) * i128::from(interval_us(rate))
}

/// `cost` tokens in sub-bucket units. Any cost up to a policy's capacity fits (10^9 tokens over
/// 366 days: 3.2 x 10^28 units); one beyond about 5 x 10^18 tokens at the longest interval does
/// not fit an `i128` and saturates, which no level reaches, so it is refused.
pub fn cost_units(rate: Rate, cost: u64) -> i128 {
    (i128::from(cost) * i128::from(interval_us(rate))).saturating_mul(i128::from(WHOLE))
}

fn refill(rate: Rate, share: Ppm, level: i128, dt_us: Micros) -> i128 {
    let added = i128::from(share) * i128::from(rate.capacity()) * i128::from(dt_us);
    (level + added).min(capacity(rate, share))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Micros = 1_000_000;

    fn rate() -> Rate {
        Rate::try_new(100, 1000).unwrap()
    }

    fn tokens(level: i128) -> f64 {
        level as f64 / (1e6 * 1e6)
    }

    #[test]
    fn a_new_replica_owns_nothing() {
        let history = ShareHistory::new(0, S);
        let mut bucket = SubBucket::fresh(&history, rate(), 5 * S);
        let outcome = bucket.try_spend(&history, rate(), 1, 5 * S);
        assert!(!outcome.allowed);
        assert_eq!(
            outcome.retry_after_us, S,
            "no share: retry after one interval"
        );
    }

    #[test]
    fn depletion_is_measured_against_this_replicas_share_not_the_whole_bucket() {
        let mut history = ShareHistory::new(0, S);
        history.set(0, WHOLE / 4); // 25 of the policy's 100 tokens
        let mut bucket = SubBucket::fresh(&history, rate(), 2 * S);
        // A full share reads 0, though it holds only a quarter of the bucket.
        let first = bucket.try_spend(&history, rate(), 5, 2 * S);
        assert_eq!((first.allowed, first.depleted_ppm), (true, 0));
        // 20 of 25 left: 20 % empty.
        let second = bucket.try_spend(&history, rate(), 20, 2 * S);
        assert_eq!((second.allowed, second.depleted_ppm), (true, 200_000));
        // Empty: 1, and refused.
        let third = bucket.try_spend(&history, rate(), 1, 2 * S);
        assert_eq!((third.allowed, third.depleted_ppm), (false, 1_000_000));
    }

    #[test]
    fn a_grown_share_starts_empty_and_fills_at_the_new_rate() {
        let mut history = ShareHistory::new(0, S);
        history.set(10 * S, WHOLE / 2);
        // Right after the grant: a fresh key holds nothing yet.
        assert_eq!(history.fresh_level(rate(), 10 * S), 0);
        let mut bucket = SubBucket::fresh(&history, rate(), 10 * S);
        // Half a second at half the rate: 25 tokens.
        history.settle(&mut bucket, rate(), 10 * S + S / 2);
        assert_eq!(tokens(bucket.level), 25.0);
        // After a whole interval at 50 %, fresh keys start with half the capacity.
        assert_eq!(tokens(history.fresh_level(rate(), 11 * S)), 50.0);
    }

    #[test]
    fn a_shrunk_share_clamps_the_level_at_the_moment_it_shrinks() {
        let mut history = ShareHistory::new(0, S);
        history.set(0, WHOLE);
        let mut bucket = SubBucket::fresh(&history, rate(), 0);
        assert!(bucket.try_spend(&history, rate(), 10, 2 * S).allowed); // 90 left
        history.set(3 * S, WHOLE / 10); // capacity 10: clamp to 10 at 3 s
        history.set(3 * S + S / 10, WHOLE); // back to whole; the new 90 starts empty
        // Settled lazily at 3.2 s: 10, then 0.1 s at 100 %/s = +10 -> 20.
        history.settle(&mut bucket, rate(), 3 * S + S / 5);
        assert_eq!(tokens(bucket.level), 20.0);
    }

    #[test]
    fn fresh_keys_never_hold_more_than_any_idle_bucket_could() {
        let mut history = ShareHistory::new(0, S);
        history.set(0, WHOLE);
        history.set(5 * S, WHOLE / 4);
        history.set(5 * S + S / 2, WHOLE);
        // A bucket full before the dip: clamped to 25 at 5 s, 75 by 6 s. One emptied at 5 s:
        // 12.5 at the dip's 25 %/s, then 50 at 100 %/s: 62.5, which is what a fresh key gets.
        let mut full = SubBucket {
            level: capacity(rate(), WHOLE),
            at: 4 * S,
        };
        history.settle(&mut full, rate(), 6 * S);
        assert_eq!(tokens(full.level), 75.0);
        let mut emptied = SubBucket {
            level: 0,
            at: 5 * S,
        };
        history.settle(&mut emptied, rate(), 6 * S);
        assert_eq!(tokens(emptied.level), 62.5);
        assert_eq!(history.fresh_level(rate(), 6 * S), emptied.level);
        // More than the dip's capacity, which the fresh level used to be: the refill since
        // the share grew back counts.
        assert!(history.fresh_level(rate(), 6 * S) > capacity(rate(), WHOLE / 4));
        // One interval after the dip ended, a fresh key is full.
        assert_eq!(
            tokens(history.fresh_level(rate(), 6 * S + S / 2 + 1)),
            100.0
        );
    }

    #[test]
    fn a_bucket_older_than_the_history_is_taken_as_empty() {
        let mut history = ShareHistory::new(0, S);
        history.set(0, WHOLE);
        let mut bucket = SubBucket { level: 0, at: 0 };
        // Many changes much later push the start of the history past the bucket.
        for i in 0..20u64 {
            history.set(100 * S + i * S, if i % 2 == 0 { WHOLE / 2 } else { WHOLE });
        }
        assert!(history.start() > 0);
        history.settle(&mut bucket, rate(), 200 * S);
        // Refilled since the history start only, at the last share: full at 100 % by now.
        assert_eq!(tokens(bucket.level), 100.0);
    }

    #[test]
    fn a_whole_share_of_a_billion_over_366_days_spends_and_refuses_without_overflow() {
        use crate::bucket::{MAX_CAPACITY, MAX_INTERVAL_MS};
        let rate = Rate::try_new(MAX_CAPACITY, MAX_INTERVAL_MS).unwrap();
        let interval_us = MAX_INTERVAL_MS * 1000;
        let mut history = ShareHistory::new(0, interval_us);
        history.set(0, WHOLE); // in force from 1 µs
        let mut bucket = SubBucket {
            level: capacity(rate, WHOLE),
            at: 1,
        };
        let spent = bucket.try_spend(&history, rate, MAX_CAPACITY / 2, 1);
        assert_eq!((spent.allowed, spent.remaining), (true, MAX_CAPACITY / 2));
        assert_eq!(spent.depleted_ppm, 0);
        assert_eq!(spent.reset_after_us, interval_us / 2);
        let refused = bucket.try_spend(&history, rate, MAX_CAPACITY, 1);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_us, interval_us / 2);
        // A cost no policy allows (the service refuses any above the capacity) saturates.
        let absurd = bucket.try_spend(&history, rate, u64::MAX, 1);
        assert!(!absurd.allowed);
        assert_eq!(absurd.retry_after_us, u64::MAX);
    }

    #[test]
    fn a_pooled_loan_leaves_every_sub_bucket_equally_full() {
        let t = |tokens: f64| (tokens * 1e12) as i128;
        let cap = t(10.0 / 3.0);
        // The borrower holds 1.59, the lenders 2.84 each; the request costs 5: 3.41 short,
        // more than either lender holds. Everyone ends at (1.59 + 5.68 − 5) / 10 full.
        let amounts = plan_pool((t(1.59), cap), &[(t(2.84), cap), (t(2.84), cap)], t(5.0)).unwrap();
        assert!(amounts.iter().sum::<i128>() >= t(5.0) - t(1.59));
        // Each keeps a third of the 2.27 left (all three have the same capacity).
        for amount in &amounts {
            assert!(
                (tokens(*amount) - (2.84 - 2.27 / 3.0)).abs() < 1e-6,
                "{amounts:?}"
            );
        }
        // Together too little: no plan.
        assert_eq!(
            plan_pool((t(1.0), cap), &[(t(1.0), cap), (t(2.0), cap)], t(5.0)),
            None
        );
        // Lenders whose capacity is gone (their share shrank) give what they hold: the
        // borrower keeps what is left over.
        let amounts = plan_pool((0, cap), &[(t(3.0), 0), (t(3.0), 0)], t(5.0)).unwrap();
        assert_eq!(amounts, [t(3.0), t(3.0)]);
    }

    #[test]
    fn outcome_reports_the_global_limit_and_this_replicas_remaining() {
        let mut history = ShareHistory::new(0, S);
        history.set(0, WHOLE / 4);
        let mut bucket = SubBucket::fresh(&history, rate(), 2 * S);
        assert_eq!(tokens(bucket.level), 25.0);
        let spent = bucket.try_spend(&history, rate(), 20, 2 * S);
        assert!(spent.allowed);
        assert_eq!((spent.limit, spent.remaining), (100, 5));
        let refused = bucket.try_spend(&history, rate(), 10, 2 * S);
        assert!(!refused.allowed);
        // 5 tokens missing at 25 tokens/s.
        assert_eq!(refused.retry_after_us, 200_000);
    }
}
