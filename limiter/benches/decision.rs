//! What one in-process decision costs, against the `governor` crate's keyed limiter measured in
//! the same run with the same keys and the same quota (1000 tokens per second, burst 1000).
//!
//! Three key distributions:
//! * `hot_key`: every decision on one key. It is asked millions of times a second, far above its
//!   1000/s, so nearly every decision is a rejection (for both limiters).
//! * `100k_keys`, `1M_keys`: uniform over that many keys, every key already holding a bucket.
//!   Each key comes back once per pass over the key set (milliseconds apart), long enough to
//!   refill the one token it spent, so nearly every decision is allowed.
//!
//! Three subjects per case:
//! * `limiter`: [`Limiter::decide`], what an HTTP request pays below the HTTP layer: policy
//!   lookup, clock read, sharded store, per-policy counters (256 shards, [`WallClock`]);
//! * `store`: [`Store::decide`] with the time read from the same clock on every call;
//! * `governor`: `RateLimiter::keyed(Quota::per_second(1000))`, `check_key`: governor's default
//!   keyed limiter (DashMap, SipHash, quanta clock).
//!
//! The keys each decision uses are laid out in memory in the order they are asked for, as a
//! request's key arrives in a fresh buffer, while the buckets were created in another random
//! order: the table lookups are as cache-unfriendly as under real traffic, the key bytes are not.
//! Each case prints the share of decisions that were allowed, so the setup can be checked.
//!
//! `sweep/…` times one refill-and-reclaim pass ([`Limiter::sweep`], run every second on the
//! same runtime as requests) over 44k buckets that have all refilled, as after one second of
//! 58k requests/s spread over 100k keys in `scripts/bench-http.sh`: requests wait that long.
//!
//! A last group splits the hot-key decision into parts: reading [`WallClock`] alone, and
//! [`Store::decide`] with a fixed time (no clock read), so that `limiter - store` is the
//! service layer (policy lookup, counters) and `store - store_fixed_now` the clock.
//!
//! Run: `cargo bench -p openclaw-limiter --bench decision`. Without `--bench` (as under
//! `cargo test --benches`) criterion runs every case once, on 1000-fold fewer keys.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkGroup, Criterion, measurement::WallTime};
use governor::{Quota, RateLimiter};
use openclaw_limiter::bucket::Rate;
use openclaw_limiter::clock::{Clock, WallClock};
use openclaw_limiter::crdt::ReplicaId;
use openclaw_limiter::service::{Limiter, LimiterOptions};
use openclaw_limiter::store::{PolicyId, Store};

/// The quota both limiters enforce per key: 1000 tokens per second, burst 1000.
const TOKENS_PER_SECOND: u32 = 1000;
/// The shard count the binary uses (`main.rs`).
const SHARDS: usize = 256;

/// A client id of a typical length (14 bytes).
fn key_name(i: usize) -> String {
    format!("client-{i:07}")
}

/// splitmix64: a deterministic, dependency-free source of shuffles.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `0..n` in a random order (Fisher-Yates).
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order
    }
}

/// One benchmark case: the keys that will be asked for, in the order they will be asked for,
/// and the order in which their buckets are created beforehand.
struct Case {
    name: &'static str,
    /// Keys in request order, each allocated in that order.
    stream: Vec<String>,
    /// Keys in the order their buckets are created before measuring (empty for the hot key:
    /// its bucket is created by the warm-up).
    populate: Vec<String>,
}

impl Case {
    fn hot_key() -> Self {
        Self {
            name: "hot_key",
            stream: vec![key_name(0)],
            populate: Vec::new(),
        }
    }

    fn uniform(name: &'static str, keys: usize, seed: u64) -> Self {
        let mut rng = SplitMix(seed);
        let populate = rng.permutation(keys).into_iter().map(key_name).collect();
        let stream = rng.permutation(keys).into_iter().map(key_name).collect();
        Self {
            name,
            stream,
            populate,
        }
    }
}

/// Cycles through a case's keys: one index bump and one predictable branch per decision.
struct Keys<'a> {
    stream: &'a [String],
    next: usize,
}

impl<'a> Keys<'a> {
    fn new(stream: &'a [String]) -> Self {
        Self { stream, next: 0 }
    }

    #[inline(always)]
    fn next(&mut self) -> &'a str {
        let key = &self.stream[self.next];
        self.next += 1;
        if self.next == self.stream.len() {
            self.next = 0;
        }
        key
    }
}

/// Counts decisions and admissions, to print the allowed share after each subject.
#[derive(Default)]
struct Tally {
    decisions: u64,
    allowed: u64,
}

impl Tally {
    #[inline(always)]
    fn record(&mut self, allowed: bool) {
        self.decisions += 1;
        self.allowed += u64::from(allowed);
    }

    fn report(&self, case: &str, subject: &str) {
        if self.decisions > 0 {
            println!(
                "{case}/{subject}: {:.2}% of {} decisions allowed",
                100.0 * self.allowed as f64 / self.decisions as f64,
                self.decisions
            );
        }
    }
}

fn rate() -> Rate {
    Rate::try_new(u64::from(TOKENS_PER_SECOND), 1000).expect("valid rate")
}

fn bench_case(group: &mut BenchmarkGroup<'_, WallTime>, case: &Case) {
    let clock = Arc::new(WallClock::new());
    let limiter = Limiter::new(LimiterOptions {
        node_id: "bench".into(),
        replica: ReplicaId(1),
        default_rate: rate(),
        clock: clock.clone(),
        shards: SHARDS,
        track_changes: false,
    });
    let store = Store::new(ReplicaId(1), SHARDS);
    let quota = Quota::per_second(NonZeroU32::new(TOKENS_PER_SECOND).expect("non-zero"));
    let governor = RateLimiter::<String, _, _>::keyed(quota);
    let policy = PolicyId(0);

    for key in &case.populate {
        limiter.decide("default", key, 1).expect("valid decision");
        store.decide(policy, key, rate(), 1, clock.now());
        let _ = governor.check_key(key);
    }

    let mut tally = Tally::default();
    let mut keys = Keys::new(&case.stream);
    group.bench_function("limiter", |b| {
        b.iter(|| {
            let verdict = limiter.decide(black_box("default"), keys.next(), black_box(1));
            tally.record(verdict.as_ref().is_ok_and(|v| v.outcome.allowed));
            black_box(verdict)
        })
    });
    tally.report(case.name, "limiter");

    let mut tally = Tally::default();
    let mut keys = Keys::new(&case.stream);
    group.bench_function("store", |b| {
        b.iter(|| {
            let outcome = store.decide(policy, keys.next(), rate(), black_box(1), clock.now());
            tally.record(outcome.allowed);
            black_box(outcome)
        })
    });
    tally.report(case.name, "store");

    // governor's keys are `String`s, so it is handed the very `String` the stream holds.
    let mut tally = Tally::default();
    let mut next = 0;
    group.bench_function("governor", |b| {
        b.iter(|| {
            let key = &case.stream[next];
            next += 1;
            if next == case.stream.len() {
                next = 0;
            }
            let result = governor.check_key(key);
            tally.record(result.is_ok());
            black_box(result)
        })
    });
    tally.report(case.name, "governor");
}

/// One sweep over `buckets` refilled buckets, each created by a decision in the setup.
fn bench_sweep(criterion: &mut Criterion, scale: usize) {
    let buckets = 44_000 / scale;
    let mut group = criterion.benchmark_group("sweep");
    group.sample_size(10);
    let limiter = Limiter::new(LimiterOptions {
        node_id: "bench".into(),
        replica: ReplicaId(1),
        // Refills a spent token within a microsecond: every bucket is full again at the sweep.
        default_rate: Rate::try_new(1_000_000_000, 1000).expect("valid rate"),
        clock: Arc::new(WallClock::new()),
        shards: SHARDS,
        track_changes: false,
    });
    let keys: Vec<String> = SplitMix(3)
        .permutation(buckets)
        .into_iter()
        .map(key_name)
        .collect();
    // Between two sweeps the server handles a second of requests, which evicts the buckets
    // from the caches; writing a 256 MB buffer does the same here, in part: the buckets are
    // still allocated side by side, so this remains a lower bound of the pause in the server.
    let mut evict = vec![0u64; 256 << 20 >> 3];
    group.bench_function(format!("{buckets}_refilled_buckets"), |b| {
        b.iter_batched(
            || {
                for key in &keys {
                    limiter.decide("default", key, 1).expect("valid decision");
                }
                for (i, word) in evict.iter_mut().enumerate().step_by(8) {
                    *word = word.wrapping_add(i as u64);
                }
                black_box(&evict);
            },
            |()| black_box(limiter.sweep()),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// The hot-key decision in parts, to see where its time goes.
fn bench_parts(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("decision/hot_key_parts");
    let clock = WallClock::new();
    group.bench_function("wall_clock_now", |b| b.iter(|| black_box(clock.now())));
    let store = Store::new(ReplicaId(1), SHARDS);
    let key = key_name(0);
    let now = clock.now();
    let mut tally = Tally::default();
    group.bench_function("store_fixed_now", |b| {
        b.iter(|| {
            let outcome = store.decide(PolicyId(0), black_box(&key), rate(), black_box(1), now);
            tally.record(outcome.allowed);
            black_box(outcome)
        })
    });
    tally.report("hot_key_parts", "store_fixed_now");
    group.finish();
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not and wants a quick smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full { 1 } else { 1000 };
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    for case in [
        Case::hot_key(),
        Case::uniform("100k_keys", 100_000 / scale, 1),
        Case::uniform("1M_keys", 1_000_000 / scale, 2),
    ] {
        let mut group = criterion.benchmark_group(format!("decision/{}", case.name));
        bench_case(&mut group, &case);
        group.finish();
    }
    bench_parts(&mut criterion);
    bench_sweep(&mut criterion, scale);
    criterion.final_summary();
}
