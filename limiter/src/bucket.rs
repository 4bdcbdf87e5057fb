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

/// Largest capacity a policy may have. With the interval bound below, `capacity * interval_us`
/// fits comfortably in 64 bits, which keeps the hot path's divisions 64-bit.
pub const MAX_CAPACITY: u64 = 1_000_000_000;
/// Longest refill interval a policy may have: one hour.
pub const MAX_INTERVAL_MS: u64 = 3_600_000;

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

    /// Whole tokens in a scaled level, rounded down; a negative level (debt) counts as 0.
    #[inline]
    pub fn whole_tokens(&self, level_scaled: i128) -> u64 {
        if level_scaled <= 0 {
            0
        } else {
            // level <= capacity * interval_us <= MAX_CAPACITY * MAX_INTERVAL_US < 2^63.
            (level_scaled.min(self.full_scaled()) as u64) / self.interval_us
        }
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
    // A bucket's scaled units fit an i64 (MAX_CAPACITY x MAX_INTERVAL_MS in µs < 2^63), whose
    // conversion to f64 is one instruction; an i128's is a library call. Escrow sub-buckets
    // count in finer units and may take the slow path.
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
        assert!(Rate::try_new(MAX_CAPACITY, MAX_INTERVAL_MS).is_ok());
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
