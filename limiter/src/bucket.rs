//! Token-bucket arithmetic, exact and allocation-free.
//!
//! A bucket holds up to `capacity` tokens and refills `capacity` tokens per `interval`,
//! continuously. Everything here works in *scaled* units so that no float ever rounds a decision:
//! a level of `L` scaled units is `L / interval_us` tokens, and refill over `dt` microseconds is
//! exactly `capacity * dt` scaled units. All functions are pure; time is always an argument.

use std::fmt;

/// Microseconds on the replica's wall clock (since the UNIX epoch). Replicas compare these, so
/// they are wall-clock time, not a process-local monotonic clock.
pub type Micros = u64;

/// Largest capacity a policy may have.
pub const MAX_CAPACITY: u64 = 1_000_000_000;
/// Longest refill interval a policy may have: 366 days, so that a quota per day, week, month
/// (30 days) or year (365 days, as envoyproxy/ratelimit counts them) fits, with a day to spare.
///
/// What the bounds mean for the arithmetic: a full bucket is `capacity * interval_us` scaled
/// units, at most 10^9 x 3.16 x 10^13 ≈ 3.2 x 10^22 (< 2^75), so scaled levels live in `i128`,
/// with room to spare: a refill over any `u64` span of microseconds, or `u64::MAX` tokens, is
/// below 2^110. A full bucket fits 64 bits only while `capacity * interval_us < 2^64`
/// (e.g. 1000 tokens per year, or 10^9 tokens per 5 hours): [`Rate::whole_tokens`] divides in
/// 64 bits when the level fits and in 128 bits otherwise, [`Rate::time_to_refill_us`] in 128
/// bits, exact either way; [`depleted_ppm`] converts to `f64` from 64 bits when it can. Results
/// fit 64 bits: whole tokens are at most `capacity`, times of refill saturate at `u64::MAX` µs.
pub const MAX_INTERVAL_MS: u64 = 366 * 24 * 3_600_000;

/// How fast a bucket refills and how much it holds.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    capacity: u64,
    interval_us: u64,
}

/// Why a [`Rate`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("capacity must be between 1 and {MAX_CAPACITY}, got {0}")]
    Capacity(u64),
    #[error("refill interval must be between 1 and {MAX_INTERVAL_MS} ms, got {0}")]
    Interval(u64),
}

impl Rate {
    /// `capacity` tokens, refilled in full every `interval_ms` milliseconds.
    pub fn try_new(capacity: u64, interval_ms: u64) -> Result<Self, RateError> {
        if !(1..=MAX_CAPACITY).contains(&capacity) {
            return Err(RateError::Capacity(capacity));
        }
        if !(1..=MAX_INTERVAL_MS).contains(&interval_ms) {
            return Err(RateError::Interval(interval_ms));
        }
        Ok(Self {
            capacity,
            interval_us: interval_ms * 1000,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn interval_ms(&self) -> u64 {
        self.interval_us / 1000
    }

    /// Tokens added per second.
    pub fn fill_rate_per_second(&self) -> f64 {
        self.capacity as f64 * 1_000_000.0 / self.interval_us as f64
    }

    /// A full bucket, in scaled units.
    #[inline]
    pub fn full_scaled(&self) -> i128 {
        i128::from(self.capacity) * i128::from(self.interval_us)
    }

    /// `tokens` whole tokens, in scaled units.
    #[inline]
    pub fn tokens_scaled(&self, tokens: u64) -> i128 {
        i128::from(tokens) * i128::from(self.interval_us)
    }

    /// Refill over `dt_us` microseconds (negative when the clock runs backwards), scaled.
    #[inline]
    pub fn refill_scaled(&self, dt_us: i128) -> i128 {
        i128::from(self.capacity) * dt_us
    }

    /// The most tokens a bucket of this rate can admit from `from` to `to` (microseconds, `to`
    /// not before `from`): a full bucket at `from` plus the refill until `to`, saturating.
    /// Not on the decision path: it bounds what a peer's component may claim.
    pub fn most_admitted_between(&self, from: Micros, to: Micros) -> u64 {
        let refill = u128::from(self.capacity) * u128::from(to.saturating_sub(from))
            / u128::from(self.interval_us);
        u64::try_from(refill)
            .unwrap_or(u64::MAX)
            .saturating_add(self.capacity)
    }

    /// Whole tokens in a scaled level, rounded down; a negative level (debt) counts as 0.
    #[inline]
    pub fn whole_tokens(&self, level_scaled: i128) -> u64 {
        if level_scaled <= 0 {
            return 0;
        }
        // 0 < level <= capacity * interval_us, so the quotient is at most `capacity`.
        let level = level_scaled.min(self.full_scaled()).unsigned_abs();
        match u64::try_from(level) {
            Ok(level) => level / self.interval_us,
            Err(_) => self.whole_tokens_wide(level),
        }
    }

    /// [`Rate::whole_tokens`] of a level beyond 64 bits (large capacities over long intervals):
    /// out of line, so that every decision's inlined code keeps one 64-bit division.
    #[cold]
    #[inline(never)]
    fn whole_tokens_wide(&self, level: u128) -> u64 {
        (level / u128::from(self.interval_us)) as u64
    }

    /// Microseconds of refill needed to add `deficit_scaled`, rounded up.
    #[inline]
    pub fn time_to_refill_us(&self, deficit_scaled: i128) -> u64 {
        if deficit_scaled <= 0 {
            return 0;
        }
        let capacity = i128::from(self.capacity);
        let us = (deficit_scaled + capacity - 1) / capacity;
        u64::try_from(us).unwrap_or(u64::MAX)
    }
}

impl fmt::Debug for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} tokens / {} ms", self.capacity, self.interval_ms())
    }
}

/// What a decision (or a peek) found, in the units a client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// The bucket's capacity.
    pub limit: u64,
    /// Whole tokens left after the decision.
    pub remaining: u64,
    /// Microseconds until the bucket would be full if nothing else is spent.
    pub reset_after_us: u64,
    /// Microseconds until the requested cost would be granted; 0 when allowed.
    pub retry_after_us: u64,
    /// How empty the bucket was when asked, in millionths: 0 full, 1 000 000 empty; always
    /// 1 000 000 for a rejected request (its bucket could not pay). In strict mode, of this
    /// replica's share of the bucket. What `openclaw_token_depletion_rate` averages
    /// (`metrics::PolicyCounters::count`).
    pub depleted_ppm: u32,
}

/// `1 - before / full` in millionths, for a bucket holding `before` of `full` (any one unit).
#[inline]
pub fn depleted_ppm(before: i128, full: i128) -> u32 {
    if full <= 0 {
        return 1_000_000;
    }
    let missing = full - before.clamp(0, full);
    if missing == 0 {
        return 0;
    }
    // Most buckets' scaled units fit an i64, whose conversion to f64 is one instruction; an
    // i128's is a library call. Large capacities over long intervals (a full bucket above 2^63,
    // see MAX_INTERVAL_MS) and escrow sub-buckets, which count in finer units, may take it.
    // Either way the ratio is within 2^-52 of exact, far below one millionth.
    let empty = match (i64::try_from(missing), i64::try_from(full)) {
        (Ok(missing), Ok(full)) => missing as f64 / full as f64,
        _ => missing as f64 / full as f64,
    };
    (empty * 1e6 + 0.5) as u32
}

impl Outcome {
    /// Describe a bucket at `level_scaled` after a decision for `cost` tokens.
    #[inline]
    pub fn describe(rate: Rate, level_scaled: i128, allowed: bool, cost: u64) -> Self {
        let retry_after_us = if allowed {
            0
        } else {
            rate.time_to_refill_us(rate.tokens_scaled(cost) - level_scaled)
        };
        // A rejected request counts as an empty bucket: it could not pay (and no division on
        // the path every request of a client over its limit takes).
        let depleted_ppm = if allowed {
            depleted_ppm(level_scaled + rate.tokens_scaled(cost), rate.full_scaled())
        } else {
            1_000_000
        };
        Self {
            allowed,
            limit: rate.capacity(),
            remaining: rate.whole_tokens(level_scaled),
            reset_after_us: rate.time_to_refill_us(rate.full_scaled() - level_scaled),
            retry_after_us,
            depleted_ppm,
        }
    }
}

/// The textbook token bucket for one client, kept here as the reference the CRDT is tested
/// against (and as the documentation of what "exactly a token bucket" means).
#[derive(Debug, Clone)]
pub struct ReferenceBucket {
    rate: Rate,
    level_scaled: i128,
    at: Micros,
}

impl ReferenceBucket {
    /// A full bucket at `now`.
    pub fn new_at(rate: Rate, now: Micros) -> Self {
        Self {
            rate,
            level_scaled: rate.full_scaled(),
            at: now,
        }
    }

    fn refill_to(&mut self, now: Micros) {
        if now > self.at {
            let refill = self.rate.refill_scaled(i128::from(now - self.at));
            self.level_scaled = (self.level_scaled + refill).min(self.rate.full_scaled());
            self.at = now;
        }
    }

    /// The level in scaled units as of the last request: what outcomes round to whole tokens
    /// and microseconds, for tests that compare to the unit.
    pub fn level_scaled(&self) -> i128 {
        self.level_scaled
    }

    /// Spend `cost` tokens at `now` if the bucket holds them.
    pub fn try_consume_at(&mut self, cost: u64, now: Micros) -> Outcome {
        self.refill_to(now);
        let allowed = self.level_scaled >= self.rate.tokens_scaled(cost);
        if allowed {
            self.level_scaled -= self.rate.tokens_scaled(cost);
        }
        Outcome::describe(self.rate, self.level_scaled, allowed, cost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_rejects_out_of_range_parameters() {
        assert_eq!(Rate::try_new(0, 1000), Err(RateError::Capacity(0)));
        assert_eq!(
            Rate::try_new(MAX_CAPACITY + 1, 1000),
            Err(RateError::Capacity(MAX_CAPACITY + 1))
        );
        assert_eq!(Rate::try_new(10, 0), Err(RateError::Interval(0)));
        assert_eq!(
            Rate::try_new(10, MAX_INTERVAL_MS + 1),
            Err(RateError::Interval(MAX_INTERVAL_MS + 1))
        );
        assert!(Rate::try_new(MAX_CAPACITY, MAX_INTERVAL_MS).is_ok());
    }

    const HOUR_US: Micros = 3_600_000_000;
    const DAY_US: Micros = 24 * HOUR_US;
    const YEAR_MS: u64 = 365 * 86_400_000;

    #[test]
    fn the_interval_bound_holds_a_year_with_a_day_to_spare() {
        assert_eq!(MAX_INTERVAL_MS, 366 * 86_400_000);
        assert!(Rate::try_new(1000, 86_400_000).is_ok());
        assert!(Rate::try_new(MAX_CAPACITY, YEAR_MS).is_ok());
    }

    #[test]
    fn a_per_day_bucket_drained_at_noon_holds_exactly_a_quarter_six_hours_later() {
        let rate = Rate::try_new(1000, 86_400_000).unwrap();
        let noon = 12 * HOUR_US;
        let mut bucket = ReferenceBucket::new_at(rate, 0);
        let drained = bucket.try_consume_at(1000, noon);
        assert!(drained.allowed);
        assert_eq!((drained.remaining, drained.reset_after_us), (0, DAY_US));
        // One token every 86.4 s: 249 and a bit just before 18:00, exactly 250 at 18:00.
        let before = bucket.try_consume_at(250, noon + 6 * HOUR_US - 1);
        assert!(!before.allowed);
        assert_eq!((before.remaining, before.retry_after_us), (249, 1));
        let at_six = bucket.try_consume_at(251, noon + 6 * HOUR_US);
        assert!(!at_six.allowed);
        assert_eq!(at_six.remaining, 250);
        assert_eq!(at_six.retry_after_us, 86_400_000);
        assert_eq!(at_six.reset_after_us, 18 * HOUR_US);
        let spent = bucket.try_consume_at(250, noon + 6 * HOUR_US);
        assert!(spent.allowed);
        assert_eq!((spent.remaining, spent.reset_after_us), (0, DAY_US));
    }

    #[test]
    fn a_per_year_bucket_reports_remaining_reset_and_retry_after_exactly() {
        // 1000 per 365 days: one token every 31 536 s.
        let rate = Rate::try_new(1000, YEAR_MS).unwrap();
        let year_us = YEAR_MS * 1000;
        let mut bucket = ReferenceBucket::new_at(rate, 0);
        let drained = bucket.try_consume_at(1000, 0);
        assert_eq!((drained.remaining, drained.reset_after_us), (0, year_us));
        let refused = bucket.try_consume_at(1, 0);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_us, 31_536_000_000);
        // 30 days later: 82.19 tokens; 100 need 36.5 days of refill, 6.5 more.
        let later = bucket.try_consume_at(100, 30 * DAY_US);
        assert!(!later.allowed);
        assert_eq!(later.remaining, 82);
        assert_eq!(later.reset_after_us, 335 * DAY_US);
        assert_eq!(later.retry_after_us, 6 * DAY_US + 12 * HOUR_US);

        // 10^9 per 365 days, a full bucket far above 64 bits: after one day, 2 739 726.03.
        let rate = Rate::try_new(MAX_CAPACITY, YEAR_MS).unwrap();
        let mut bucket = ReferenceBucket::new_at(rate, 0);
        assert!(bucket.try_consume_at(MAX_CAPACITY, 0).allowed);
        let refused = bucket.try_consume_at(2_739_727, DAY_US);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 2_739_726);
        assert_eq!(refused.reset_after_us, 364 * DAY_US);
        // The missing 0.97 token refills in 30 672 µs, rounded up.
        assert_eq!(refused.retry_after_us, 30_672);
        assert!(bucket.try_consume_at(2_739_726, DAY_US).allowed);
    }

    #[test]
    fn max_capacity_over_366_days_does_not_overflow() {
        let rate = Rate::try_new(MAX_CAPACITY, MAX_INTERVAL_MS).unwrap();
        let interval_us = MAX_INTERVAL_MS * 1000;
        let full = rate.full_scaled();
        assert_eq!(full, 31_622_400_000_000_000_000_000);
        assert!(
            full > i128::from(u64::MAX),
            "the 128-bit paths are the ones tested"
        );
        // Level: a textbook bucket drained, half refilled, then full again.
        let mut bucket = ReferenceBucket::new_at(rate, 0);
        let drained = bucket.try_consume_at(MAX_CAPACITY, 0);
        assert_eq!(
            (drained.remaining, drained.reset_after_us),
            (0, interval_us)
        );
        assert_eq!(drained.depleted_ppm, 0);
        let half = bucket.try_consume_at(1, 183 * DAY_US);
        assert_eq!(half.remaining, MAX_CAPACITY / 2 - 1);
        // The token just spent refills in 31 622.4 µs, rounded up.
        assert_eq!(half.reset_after_us, 183 * DAY_US + 31_623);
        assert_eq!(half.depleted_ppm, 500_000);
        let full_again = bucket.try_consume_at(MAX_CAPACITY, 549 * DAY_US);
        assert!(full_again.allowed);
        // whole_tokens: at most the capacity, exact at the edges, 0 for debt.
        assert_eq!(rate.whole_tokens(full), MAX_CAPACITY);
        assert_eq!(rate.whole_tokens(full - 1), MAX_CAPACITY - 1);
        assert_eq!(rate.whole_tokens(full * 1000), MAX_CAPACITY);
        assert_eq!(rate.whole_tokens(rate.tokens_scaled(5) - 1), 4);
        assert_eq!(rate.whole_tokens(-full), 0);
        // time_to_refill_us: a whole interval, one microsecond, and a saturated absurd cost.
        assert_eq!(rate.time_to_refill_us(full), interval_us);
        assert_eq!(rate.time_to_refill_us(1), 1);
        assert_eq!(rate.time_to_refill_us(full + 1), interval_us + 1);
        assert_eq!(
            rate.time_to_refill_us(rate.tokens_scaled(u64::MAX)),
            u64::MAX
        );
        // depleted_ppm: from a full bucket's 3.2e22 units down to one token in 10^9.
        assert_eq!(depleted_ppm(full, full), 0);
        assert_eq!(depleted_ppm(0, full), 1_000_000);
        assert_eq!(depleted_ppm(-full, full), 1_000_000);
        assert_eq!(depleted_ppm(rate.tokens_scaled(250_000_000), full), 750_000);
        assert_eq!(depleted_ppm(full - rate.tokens_scaled(1_000), full), 1);
        assert_eq!(depleted_ppm(full - rate.tokens_scaled(1), full), 0);
    }

    #[test]
    fn reference_bucket_refills_continuously_not_stepwise() {
        let rate = Rate::try_new(10, 1000).unwrap(); // one token per 100 ms
        let mut bucket = ReferenceBucket::new_at(rate, 0);
        assert!(bucket.try_consume_at(10, 0).allowed);
        let empty = bucket.try_consume_at(1, 50_000);
        assert!(!empty.allowed);
        assert_eq!(empty.retry_after_us, 50_000);
        assert!(bucket.try_consume_at(1, 100_000).allowed);
        assert_eq!(bucket.try_consume_at(1, 250_000).remaining, 0);
    }

    #[test]
    fn outcome_reports_time_to_full_and_to_retry() {
        let rate = Rate::try_new(1000, 1000).unwrap();
        let mut bucket = ReferenceBucket::new_at(rate, 0);
        let spent = bucket.try_consume_at(600, 0);
        assert_eq!(spent.remaining, 400);
        assert_eq!(spent.reset_after_us, 600_000);
        let refused = bucket.try_consume_at(500, 0);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_us, 100_000);
        assert_eq!(refused.remaining, 400);
    }
}
