//! Where `now` comes from. The model never reads a clock; the service reads one of these once
//! per decision and passes the time down.
//!
//! Replicas compare each other's timestamps (claim epochs, incarnations), so two things matter
//! beyond reading the time cheaply:
//!
//! * **The system clock's corrections are followed.** NTP (or an operator) steps and slews the
//!   system clock; a replica that read it once at start would drift away from its peers for as
//!   long as it runs. [`WallClock::resync`], called every few milliseconds by the server, moves
//!   the clock forward at once and backward at most a tenth as fast as time passes, so it never
//!   jumps back by more than a tenth of the resync period.
//! * **Replicas share the fastest clock within the guard.** A peer whose clock is ahead of ours
//!   by `δ` stamps its claims `δ` in our future: read on our clock, they hold `r·δ` fewer tokens
//!   than they do, and a client under its limit is refused. [`follow_peer`] moves this clock
//!   forward to the peer's (a hybrid logical clock's rule), so every replica runs on the fastest
//!   clock and offsets cancel up to the network delay; a peer ahead by more than the guard is
//!   refused instead. The lead decays by 1 % of elapsed time when no peer is ahead, so the
//!   cluster follows its fastest clock back when that one is corrected.
//! * **The odd one out moves to the majority's clock.** Beyond the guard two replicas cannot
//!   tell whose clock is wrong, but when a strict majority of the cluster is beyond it on one
//!   side, this replica's is (`Replicator::follow_clock`). Behind them, it takes a lead past the
//!   guard; ahead of them, it runs behind its system clock ([`Clock::fall_behind`]), slowed to
//!   an eighth of its pace until it gets there, never stepped back.

use std::fmt::Debug;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bucket::Micros;

pub trait Clock: Send + Sync + Debug + 'static {
    /// Microseconds since the UNIX epoch, on the cluster's shared timeline.
    fn now(&self) -> Micros;

    /// Run `ahead_us` further ahead (a peer's clock is that far ahead of this one), up to
    /// `max_lead_us` ahead of the system clock. Clocks that cannot move (tests') ignore it.
    fn catch_up(&self, _ahead_us: Micros, _max_lead_us: Micros) {}

    /// Follow the system clock's corrections (the server calls it every few milliseconds).
    fn resync(&self) {}

    /// How far this clock runs ahead of the system clock to keep up with its peers.
    fn lead_us(&self) -> Micros {
        0
    }

    /// Run at least `behind_us` behind the system clock: a majority of the cluster runs that
    /// far behind it, so the system clock is the fast one. Never by stepping back: the clock
    /// slows to an eighth of its pace until it gets there (claim epochs and incarnations are
    /// compared as instants, and a replica's must not go back). Clocks that cannot move
    /// (tests') ignore it.
    fn fall_behind(&self, _behind_us: Micros) {}

    /// How far this clock is set to run behind the system clock ([`Clock::fall_behind`]), before
    /// the lead; it gets there at an eighth of the pace of time.
    fn lag_us(&self) -> Micros {
        0
    }

    /// The system clock as this clock follows it: no lead, no lag. What peers' offsets are
    /// measured against.
    fn system_now(&self) -> Micros {
        self.now()
    }

    /// Microseconds that never jump: the system clock's reading at start advanced by the
    /// monotonic clock only, with no correction and no lead. For what a replica measures on its
    /// own and never compares with a peer's stamps: `strict` mode's leases and sub-bucket refill,
    /// whose bound a forward step of the clock would break (a step of `Δ` refills `r·Δ`).
    fn steady_now(&self) -> Micros {
        self.now()
    }
}

/// How far a peer's time is ahead of this replica's (negative: behind).
pub type OffsetUs = i64;

/// A peer's timestamp was further ahead of this replica's clock than the guard allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("peer clock {ahead_us} µs ahead of this replica's (guard {guard_us} µs)")]
pub struct ClockAhead {
    pub ahead_us: Micros,
    pub guard_us: Micros,
}

/// Check a peer's send time against this replica's clock and follow it: a peer ahead by at most
/// `guard_us` moves this clock forward to it, up to `max_lead_us` ahead of the system clock (the
/// guard, unless a majority of the cluster is further ahead: `Replicator::follow_clock`); one
/// further ahead is refused. Returns the offset seen (peer minus local, before catching up),
/// for the per-peer offset gauge.
pub fn follow_peer(
    clock: &dyn Clock,
    peer_time: Micros,
    guard_us: Micros,
    max_lead_us: Micros,
) -> Result<OffsetUs, ClockAhead> {
    let now = clock.now();
    let offset = peer_time as i128 - now as i128;
    let offset = offset.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
    if offset > 0 {
        let ahead_us = offset as Micros;
        if ahead_us > guard_us {
            return Err(ClockAhead { ahead_us, guard_us });
        }
        clock.catch_up(ahead_us, max_lead_us);
    }
    Ok(offset)
}

/// How far a clock runs ahead of its system clock to keep up with the fastest peer.
#[derive(Debug, Default)]
pub struct Lead(AtomicU64);

impl Lead {
    #[inline]
    pub fn get(&self) -> Micros {
        self.0.load(Ordering::Relaxed)
    }

    /// Add `ahead_us`, never beyond `max_us`.
    pub fn catch_up(&self, ahead_us: Micros, max_us: Micros) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |lead| {
                Some(lead.saturating_add(ahead_us).min(max_us.max(lead)))
            });
    }

    /// Raise to `target` if below it.
    pub fn raise_to(&self, target: Micros) {
        self.0.fetch_max(target, Ordering::AcqRel);
    }

    /// Shrink by 1 % of `elapsed_us`: the cluster follows its fastest clock back when that one
    /// is corrected.
    pub fn decay(&self, elapsed_us: Micros) {
        let step = elapsed_us / 100;
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |lead| {
                Some(lead.saturating_sub(step))
            });
    }
}

/// Wall-clock time for production: the system clock's reading, advanced by the monotonic clock
/// between resyncs. The monotonic part is `quanta` (the TSC, calibrated; the OS clock where the
/// TSC cannot be trusted): every decision reads it, and it costs a few nanoseconds where the OS
/// clock costs about twenty in a VM.
#[derive(Debug)]
pub struct WallClock {
    clock: quanta::Clock,
    origin: quanta::Instant,
    /// The system clock's time at `origin`, never corrected (`Clock::steady_now`).
    origin_system: Micros,
    /// The system clock's time at `origin`, as of the last resync.
    base: AtomicU64,
    /// Monotonic µs since `origin` at the last resync.
    resynced_at: AtomicU64,
    lead: Lead,
    /// How far behind the system clock a majority of the cluster runs ([`Clock::fall_behind`];
    /// a [`Lead`] the other way: it decays the same).
    lag: Lead,
    /// While the clock falls behind: `K` such that it reads at least `K + elapsed / 8`, the
    /// line it slows down along from where it was (so it never steps back).
    slew_floor: AtomicU64,
    /// The last correction applied (system minus ours, before applying), for tests and logs.
    last_correction: AtomicI64,
}

fn system_now() -> Micros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as Micros)
        .unwrap_or(0)
}

impl WallClock {
    pub fn new() -> Self {
        Self::with_monotonic(quanta::Clock::new())
    }

    /// On `clock` as the monotonic clock (a mock one in tests).
    fn with_monotonic(clock: quanta::Clock) -> Self {
        let origin = clock.now();
        let origin_system = system_now();
        Self {
            base: AtomicU64::new(origin_system),
            origin_system,
            clock,
            origin,
            resynced_at: AtomicU64::new(0),
            lead: Lead::default(),
            lag: Lead::default(),
            slew_floor: AtomicU64::new(0),
            last_correction: AtomicI64::new(0),
        }
    }

    /// The reading `elapsed` µs after `origin`.
    #[inline]
    fn now_at(&self, elapsed: Micros) -> Micros {
        let line = self.base.load(Ordering::Relaxed) + elapsed + self.lead.get();
        // Acquire: a lag is published after its floor.
        let lag = self.lag.0.load(Ordering::Acquire);
        if lag == 0 {
            return line;
        }
        line.saturating_sub(lag)
            .max(self.slew_floor.load(Ordering::Relaxed) + (elapsed >> 3))
    }

    #[inline]
    fn elapsed(&self) -> Micros {
        self.clock
            .now()
            .saturating_duration_since(self.origin)
            .as_micros() as Micros
    }

    fn resync_to(&self, system: Micros) {
        let elapsed = self.elapsed();
        let since = elapsed.saturating_sub(self.resynced_at.swap(elapsed, Ordering::Relaxed));
        let target = system.saturating_sub(elapsed);
        let base = self.base.load(Ordering::Relaxed);
        let correction = target as i64 - base as i64;
        self.last_correction.store(correction, Ordering::Relaxed);
        let next = if target >= base {
            target
        } else {
            base - (base - target).min(since / 10)
        };
        self.base.store(next, Ordering::Relaxed);
        self.lead.decay(since);
        self.lag.decay(since);
    }

    /// The system clock's reading minus this clock's at the last resync (µs, before the lead).
    pub fn last_correction_us(&self) -> i64 {
        self.last_correction.load(Ordering::Relaxed)
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for WallClock {
    #[inline]
    fn now(&self) -> Micros {
        self.now_at(self.elapsed())
    }

    fn catch_up(&self, ahead_us: Micros, max_lead_us: Micros) {
        self.lead.catch_up(ahead_us, max_lead_us);
    }

    /// Follow the system clock: forward at once, backward at most a tenth of the time elapsed
    /// since the last resync (so this clock never steps back by more than that). Also lets the
    /// lead over the system clock decay. Call it often (the server does every 10 ms).
    fn resync(&self) {
        self.resync_to(system_now());
    }

    fn lead_us(&self) -> Micros {
        self.lead.get()
    }

    fn fall_behind(&self, behind_us: Micros) {
        if self.lag.get() >= behind_us {
            return;
        }
        // From where the clock reads now, at an eighth of the pace, until the line it falls
        // back to catches up: the floor first, then the lag (readers that see the lag see it).
        let elapsed = self.elapsed();
        let floor = self.now_at(elapsed).saturating_sub(elapsed >> 3);
        self.slew_floor.fetch_max(floor, Ordering::Release);
        self.lag.raise_to(behind_us);
    }

    fn lag_us(&self) -> Micros {
        self.lag.get()
    }

    fn system_now(&self) -> Micros {
        self.base.load(Ordering::Relaxed) + self.elapsed()
    }

    #[inline]
    fn steady_now(&self) -> Micros {
        self.origin_system + self.elapsed()
    }
}

/// A clock that moves only when told to: for tests.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn at(now: Micros) -> Self {
        Self(AtomicU64::new(now))
    }

    pub fn advance_us(&self, us: Micros) {
        self.0.fetch_add(us, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Micros {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_system_clock_stepped_forward_is_followed_at_once() {
        let clock = WallClock::new();
        let before = clock.now();
        clock.resync_to(system_now() + 2_000_000);
        assert!(clock.now() + 10_000 >= before + 2_000_000);
    }

    #[test]
    fn the_steady_clock_takes_neither_corrections_nor_leads() {
        let clock = WallClock::new();
        let before = clock.steady_now();
        clock.resync_to(system_now() + 2_000_000);
        clock.catch_up(400_000, 500_000);
        let after = clock.steady_now();
        assert!(
            after >= before && after < before + 1_000_000,
            "{before} -> {after}"
        );
        // The monotonic and system clocks may disagree by a little (calibration): 10 ms of slack.
        assert!(clock.now() + 10_000 >= after + 2_400_000);
    }

    #[test]
    fn a_system_clock_stepped_back_is_followed_slowly_never_by_a_jump() {
        let clock = WallClock::new();
        clock.resync_to(system_now());
        let before = clock.now();
        // The system clock is corrected back by 2 s; a resync right away may take back at most a
        // tenth of the (tiny) time since the last one.
        clock.resync_to(system_now() - 2_000_000);
        assert!(clock.now() + 1_000 >= before, "stepped back");
        assert!(clock.last_correction_us() <= -1_999_000);
    }

    #[test]
    fn a_peer_within_the_guard_pulls_this_clock_forward_and_one_beyond_it_is_refused() {
        // A monotonic clock that stands still: the offset is exact however long the test thread
        // waits between two readings (on a busy CI machine it waited 2 ms, and a real clock had
        // moved on by then).
        let (monotonic, _mock) = quanta::Clock::mock();
        let clock = WallClock::with_monotonic(monotonic);
        let now = clock.now();
        let offset = follow_peer(&clock, now + 200_000, 500_000, 500_000).unwrap();
        assert_eq!(offset, 200_000);
        assert!(clock.now() >= now + 200_000);
        assert!(clock.lead_us() >= 199_000);
        // Behind: nothing moves.
        let lead = clock.lead_us();
        assert!(follow_peer(&clock, clock.now() - 100_000, 500_000, 500_000).unwrap() < 0);
        assert_eq!(clock.lead_us(), lead);
        // Far ahead: refused, nothing moves.
        let refused = follow_peer(&clock, clock.now() + 900_000, 500_000, 500_000).unwrap_err();
        assert!(refused.ahead_us >= 899_000);
        assert_eq!(clock.lead_us(), lead);
    }

    #[test]
    fn a_clock_falling_behind_slows_down_and_never_steps_back() {
        let (monotonic, mock) = quanta::Clock::mock();
        let clock = WallClock::with_monotonic(monotonic);
        let start = clock.now();
        clock.fall_behind(2_000_000);
        assert_eq!(clock.lag_us(), 2_000_000);
        // Slowed to an eighth of its pace (no step back), until 2 s at 7/8 of the pace have
        // gone by: 2.29 s.
        let mut last = clock.now();
        assert_eq!(last, start);
        for _ in 0..228 {
            mock.increment(std::time::Duration::from_millis(10));
            let now = clock.now();
            assert!(now >= last, "stepped back");
            assert!(
                now - last <= 1_250,
                "{} µs in 10 ms: not slowed",
                now - last
            );
            last = now;
        }
        // Then at its pace again, 2 s behind where it would have been.
        mock.increment(std::time::Duration::from_millis(100));
        let elapsed = clock.elapsed();
        assert_eq!(clock.now(), start + elapsed - 2_000_000);
        // Falling behind less than it is changes nothing.
        clock.fall_behind(1_000_000);
        assert_eq!(clock.now(), start + elapsed - 2_000_000);
        assert_eq!(clock.system_now(), start + elapsed);
    }

    #[test]
    fn the_lead_never_exceeds_the_guard_and_decays() {
        let lead = Lead::default();
        lead.catch_up(400, 500);
        lead.catch_up(400, 500);
        assert_eq!(lead.get(), 500);
        lead.decay(10_000);
        assert_eq!(lead.get(), 400);
    }
}
