//! Where `now` comes from. The model never reads a clock; the service reads one of these once
//! per decision and passes the time down.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bucket::Micros;

pub trait Clock: Send + Sync + Debug + 'static {
    /// Microseconds since the UNIX epoch, never decreasing.
    fn now(&self) -> Micros;
}

/// Wall-clock time that never steps backwards: the wall clock read once at start, advanced by
/// the monotonic clock. Replicas compare these stamps, so they must be wall time; a process
/// must never see its own time go back, so they advance monotonically. The monotonic part is
/// `quanta` (the TSC, calibrated; the OS clock where the TSC cannot be trusted): every decision
/// reads it, and it costs a few nanoseconds where the OS clock costs about twenty in a VM.
#[derive(Debug)]
pub struct WallClock {
    origin_wall: Micros,
    clock: quanta::Clock,
    origin: quanta::Instant,
}

impl WallClock {
    pub fn new() -> Self {
        let origin_wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as Micros)
            .unwrap_or(0);
        let clock = quanta::Clock::new();
        let origin = clock.now();
        Self {
            origin_wall,
            clock,
            origin,
        }
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
        let elapsed = self.clock.now().saturating_duration_since(self.origin);
        self.origin_wall + elapsed.as_micros() as Micros
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
