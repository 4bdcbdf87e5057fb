//! What a run measures while it goes (lock-free counters, a per-second timeline, sharded latency
//! histograms) and what it reports: [`Progress`] during the run, [`Summary`] at the end.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The outcome of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 200 (RLS: `overall_code` OK): the limiter granted the tokens.
    Allowed,
    /// 429 (RLS: OVER_LIMIT): the limiter refused.
    Rejected,
    /// Anything else: no answer, or an answer that is not a decision.
    Error(ErrorKind),
}

/// Why a request counted as an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ErrorKind {
    /// The connection was refused or could not be made (with failover on: on every target).
    Connect,
    /// No answer within the request timeout.
    Timeout,
    /// The connection broke, or the answer could not be read.
    Transport,
    /// An HTTP status other than 200 and 429 (e.g. 401 without the API key, 400 for a bad policy).
    Status(u16),
    /// RLS: a gRPC status other than 0 (16 without the API key, 3 for a request refused as
    /// invalid).
    Grpc(u32),
    /// RLS: an answer that is not a gRPC reply with a decision (no `grpc-status`, a broken
    /// frame, an `overall_code` of UNKNOWN).
    Malformed,
    /// Still outstanding when the run gave up waiting for answers.
    Abandoned,
}

impl ErrorKind {
    fn label(self) -> String {
        match self {
            ErrorKind::Connect => "connect".into(),
            ErrorKind::Timeout => "timeout".into(),
            ErrorKind::Transport => "transport".into(),
            ErrorKind::Status(code) => format!("http {code}"),
            ErrorKind::Grpc(code) => format!("grpc {code}"),
            ErrorKind::Malformed => "malformed".into(),
            ErrorKind::Abandoned => "abandoned".into(),
        }
    }
}

/// A snapshot during the run, handed to `on_progress`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    #[serde(with = "secs")]
    pub elapsed: Duration,
    /// Requests sent so far (answered or not).
    pub sent: u64,
    pub allowed: u64,
    pub rejected: u64,
    pub errors: u64,
    /// Open loop: requests due but not sent (in-flight bound reached).
    pub missed: u64,
    /// The profile's rate now; 0 in closed loop.
    pub target_rate: f64,
    /// Requests sent per second over the last second.
    pub achieved_rps: f64,
    /// The run's duration bound, to draw a bar against.
    #[serde(with = "secs")]
    pub duration: Duration,
}

/// Latency percentiles in microseconds. Open loop measures from when each request was due, so
/// time spent waiting behind a slow server counts (no coordinated omission); closed loop from
/// when it was sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    /// Requests the percentiles are over (answered ones: decisions, and error statuses or
    /// malformed answers).
    pub count: u64,
}

/// Counts for one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetCounts {
    /// The normalised base URL.
    pub target: String,
    /// Requests whose final attempt went to this target.
    pub requests: u64,
    pub allowed: u64,
    pub rejected: u64,
    pub errors: u64,
    /// Requests moved from this target to another because it refused the connection.
    pub failed_over: u64,
}

/// Counts for one second of the run, by when the requests were sent (due, in open loop).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecondCounts {
    /// Seconds since the start: this entry covers `[second, second + 1)`.
    pub second: u64,
    pub sent: u64,
    pub allowed: u64,
    pub rejected: u64,
    pub errors: u64,
    pub missed: u64,
    /// The profile's mean rate over this second; 0 in closed loop.
    pub target_rate: f64,
}

/// The result of a run. `requests = allowed + rejected + errors` always holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub requests: u64,
    pub allowed: u64,
    pub rejected: u64,
    pub errors: u64,
    /// Errors by kind (`connect`, `timeout`, `transport`, `http 401`, `grpc 16`, `malformed`,
    /// `abandoned`).
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Open loop: requests due that could not be sent because `max_in_flight` were
    /// outstanding (the generator or the server fell behind). Not part of `requests`.
    pub missed: u64,
    /// Time spent sending (from the start to the stop, not waiting for the last answers).
    #[serde(with = "secs")]
    pub elapsed: Duration,
    /// Whether the run was cut short by the caller (Ctrl-C).
    pub cancelled: bool,
    pub latency: Percentiles,
    /// Open loop: how late requests left the generator after their due time (its own timer and
    /// scheduling delay, included in `latency`). Large values mean the generator, not the
    /// server, fell behind. Zero in closed loop.
    pub send_lag: Percentiles,
    pub per_target: Vec<TargetCounts>,
    pub timeline: Vec<SecondCounts>,
}

impl Summary {
    /// Requests per second over the sending time.
    pub fn achieved_rps(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.requests as f64 / secs
        } else {
            0.0
        }
    }
}

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Default)]
struct Counts {
    sent: AtomicU64,
    allowed: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
    missed: AtomicU64,
}

#[derive(Debug, Default)]
struct TargetSlot {
    counts: Counts,
    failed_over: AtomicU64,
}

/// Histograms are sharded so concurrent recorders rarely meet on one lock.
const SHARDS: usize = 8;
/// Latencies above this (µs) are recorded as this: a minute is far beyond any request timeout.
const MAX_LATENCY_US: u64 = 60_000_000;

/// Shared by every task of a run.
#[derive(Debug)]
pub(crate) struct Recorder {
    total: Counts,
    targets: Vec<TargetSlot>,
    seconds: Vec<Counts>,
    errors_by_kind: Mutex<BTreeMap<ErrorKind, u64>>,
    latency: Vec<Mutex<Histogram<u64>>>,
    send_lag: Vec<Mutex<Histogram<u64>>>,
}

fn histograms() -> Vec<Mutex<Histogram<u64>>> {
    (0..SHARDS)
        .map(|_| {
            Mutex::new(
                Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds"),
            )
        })
        .collect()
}

fn record(shards: &[Mutex<Histogram<u64>>], seq: u64, value: Duration) {
    let us = (value.as_micros() as u64).clamp(1, MAX_LATENCY_US);
    shards[seq as usize % SHARDS]
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .saturating_record(us);
}

fn percentiles(shards: &[Mutex<Histogram<u64>>]) -> Percentiles {
    let mut merged = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid bounds");
    for shard in shards {
        let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        merged.add(&*shard).expect("same bounds");
    }
    if merged.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        p50_us: merged.value_at_quantile(0.50),
        p90_us: merged.value_at_quantile(0.90),
        p99_us: merged.value_at_quantile(0.99),
        p999_us: merged.value_at_quantile(0.999),
        max_us: merged.max(),
        mean_us: merged.mean(),
        count: merged.len(),
    }
}

impl Recorder {
    pub(crate) fn new(targets: usize, duration: Duration) -> Self {
        let seconds = duration.as_secs() as usize + 1;
        Self {
            total: Counts::default(),
            targets: (0..targets).map(|_| TargetSlot::default()).collect(),
            seconds: (0..seconds).map(|_| Counts::default()).collect(),
            errors_by_kind: Mutex::new(BTreeMap::new()),
            latency: histograms(),
            send_lag: histograms(),
        }
    }

    fn second(&self, at: Duration) -> &Counts {
        let i = (at.as_secs() as usize).min(self.seconds.len() - 1);
        &self.seconds[i]
    }

    /// A request is leaving now; `at` is when it was due (open loop) or sent.
    pub(crate) fn sent(&self, at: Duration) {
        self.total.sent.fetch_add(1, Relaxed);
        self.second(at).sent.fetch_add(1, Relaxed);
    }

    /// A request due at `at` was not sent: too many in flight.
    pub(crate) fn missed(&self, at: Duration) {
        self.total.missed.fetch_add(1, Relaxed);
        self.second(at).missed.fetch_add(1, Relaxed);
    }

    pub(crate) fn failed_over(&self, target: usize) {
        self.targets[target].failed_over.fetch_add(1, Relaxed);
    }

    /// The answer to a request sent (due) at `at`, last tried on `target`, `latency` after `at`.
    pub(crate) fn finished(
        &self,
        seq: u64,
        at: Duration,
        target: usize,
        outcome: Outcome,
        latency: Option<Duration>,
    ) {
        let bump = |c: &Counts| match outcome {
            Outcome::Allowed => c.allowed.fetch_add(1, Relaxed),
            Outcome::Rejected => c.rejected.fetch_add(1, Relaxed),
            Outcome::Error(_) => c.errors.fetch_add(1, Relaxed),
        };
        bump(&self.total);
        bump(self.second(at));
        let slot = &self.targets[target].counts;
        slot.sent.fetch_add(1, Relaxed);
        bump(slot);
        if let Outcome::Error(kind) = outcome {
            *self
                .errors_by_kind
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(kind)
                .or_default() += 1;
        }
        if let Some(latency) = latency {
            record(&self.latency, seq, latency);
        }
    }

    /// Open loop: request `seq` left `lag` after it was due.
    pub(crate) fn lag(&self, seq: u64, lag: Duration) {
        record(&self.send_lag, seq, lag);
    }

    pub(crate) fn total_sent(&self) -> u64 {
        self.total.sent.load(Relaxed)
    }

    pub(crate) fn finished_count(&self) -> u64 {
        self.total.allowed.load(Relaxed)
            + self.total.rejected.load(Relaxed)
            + self.total.errors.load(Relaxed)
    }

    /// Counts requests still outstanding as abandoned errors, so that the totals add up.
    pub(crate) fn abandon_outstanding(&self) {
        let outstanding = self.total_sent().saturating_sub(self.finished_count());
        if outstanding > 0 {
            self.total.errors.fetch_add(outstanding, Relaxed);
            *self
                .errors_by_kind
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(ErrorKind::Abandoned)
                .or_default() += outstanding;
        }
    }

    pub(crate) fn progress(
        &self,
        elapsed: Duration,
        duration: Duration,
        target_rate: f64,
        achieved_rps: f64,
    ) -> Progress {
        Progress {
            elapsed,
            sent: self.total.sent.load(Relaxed),
            allowed: self.total.allowed.load(Relaxed),
            rejected: self.total.rejected.load(Relaxed),
            errors: self.total.errors.load(Relaxed),
            missed: self.total.missed.load(Relaxed),
            target_rate,
            achieved_rps,
            duration,
        }
    }

    pub(crate) fn summary(
        &self,
        bases: &[String],
        elapsed: Duration,
        cancelled: bool,
        rate_over: impl Fn(Duration, Duration) -> f64,
    ) -> Summary {
        let latency = percentiles(&self.latency);
        let seconds = (elapsed.as_secs_f64().ceil() as usize).clamp(1, self.seconds.len());
        let timeline = self.seconds[..seconds]
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let from = Duration::from_secs(i as u64);
                SecondCounts {
                    second: i as u64,
                    sent: c.sent.load(Relaxed),
                    allowed: c.allowed.load(Relaxed),
                    rejected: c.rejected.load(Relaxed),
                    errors: c.errors.load(Relaxed),
                    missed: c.missed.load(Relaxed),
                    target_rate: rate_over(from, (from + Duration::from_secs(1)).min(elapsed)),
                }
            })
            .collect();
        let per_target = bases
            .iter()
            .zip(&self.targets)
            .map(|(base, slot)| TargetCounts {
                target: base.clone(),
                requests: slot.counts.sent.load(Relaxed),
                allowed: slot.counts.allowed.load(Relaxed),
                rejected: slot.counts.rejected.load(Relaxed),
                errors: slot.counts.errors.load(Relaxed),
                failed_over: slot.failed_over.load(Relaxed),
            })
            .collect();
        let allowed = self.total.allowed.load(Relaxed);
        let rejected = self.total.rejected.load(Relaxed);
        let errors = self.total.errors.load(Relaxed);
        Summary {
            requests: allowed + rejected + errors,
            allowed,
            rejected,
            errors,
            errors_by_kind: self
                .errors_by_kind
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(kind, n)| (kind.label(), *n))
                .collect(),
            missed: self.total.missed.load(Relaxed),
            elapsed,
            cancelled,
            latency,
            send_lag: percentiles(&self.send_lag),
            per_target,
            timeline,
        }
    }
}
