//! Differential model test of `shared` mode: replicas running the real [`Store`] (decisions,
//! merges, sweeps, change tracking) over a simulated network, checked against the textbook token
//! bucket fed the same arrivals.
//!
//! One proptest case is one scenario: 2 to 5 replicas, a few keys each with its own request
//! stream (periodic or Poisson, 10 % to 200 % of its limit, cost 1 or 5; spread over replicas,
//! sticky to one, or sticky with strays), sync rounds and once-a-second sweeps at independent
//! phases, messages delayed, lost, duplicated and reordered, anti-entropy rounds, replicas that
//! restart (as a new replica that pulls its peers' state first, as `/ready` waits for) or
//! leave, and wall clocks offset from each other within the guard. Everything is driven by one
//! seed, so a failure replays exactly; proptest shrinks it and keeps the shrunk case in
//! `differential.proptest-regressions` beside this file.
//!
//! The checker, for every key after every request, with `C`, `r` the key's capacity and rate and
//! `U`, `O` the bounds of `docs/crdt.md`:
//!
//! * **no refusal without consumption**: a refused request found the textbook bucket fed what the
//!   cluster actually admitted (at true times) holding less than `cost + U`;
//! * **against the ideal**: for clients under their limit by more than the replication delay
//!   (load below `I / (I + D)`), the tokens admitted are at least what [`ReferenceBucket`]
//!   admitted of the same arrivals, minus `U`;
//! * **overshoot**: over every window of length `T`, the cluster admitted at most `C + r·T + O`.
//!
//! with
//!
//! * `U = (N - 1)·(C + r·D) + r·δ`: a replica refuses only for consumption that happened,
//!   counting what others admitted within `D` before it heard of it (`D` the longest time an
//!   admission takes to reach every peer: the sync interval plus the network delay, or the
//!   anti-entropy interval plus the delay when messages can be lost); `δ` is what remains of clock
//!   offsets once replicas follow the fastest clock (the network delay);
//! * `O = (1 + b)·(N - 1)·(C + r·D) + crashes·(C + r·s) + r·δ`: what replicas admit before
//!   hearing of each other, once more per decision on a bucket the deciding replica had swept
//!   while a peer held it (`b`), plus, per replica that dies, what it admitted and never sent
//!   (one sync interval `s`).
//!
//! What the simulation does not run: the HTTP transport, HMAC and JSON of `replication.rs`
//! (covered by `tests/replication.rs` and the end-to-end tests); a message here carries the
//! bucket states through [`BucketState::from_parts`], as the peer decoder does.
//!
//! `PROPTEST_CASES` sets how many scenarios run (64 by default; `scripts/differential.sh` runs
//! many more); `DIFF_DEBUG=<key index>` prints every decision on that key with the deciding
//! replica's state.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::atomic::{AtomicU64, Ordering};

use openclaw_limiter::bucket::{Micros, Rate, ReferenceBucket};
use openclaw_limiter::clock::{Clock, Lead, follow_peer};
use openclaw_limiter::crdt::{BucketState, ReplicaId};
use openclaw_limiter::replication::MAX_COMPONENTS_PER_BUCKET;
use openclaw_limiter::store::{PolicyId, Store};
use proptest::prelude::*;

const MS: Micros = 1_000;
const SECOND: Micros = 1_000_000;
/// Simulated wall-clock start: an ordinary UNIX time in µs.
const T0: Micros = 1_780_000_000 * SECOND;
const POLICY: PolicyId = PolicyId(0);
const SWEEP_PERIOD: Micros = SECOND;
/// `OPENCLAW_CLOCK_SKEW_GUARD_MS`'s default.
const CLOCK_GUARD: Micros = 500 * MS;

/// SplitMix64: the whole run's randomness comes from the scenario's seed.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// An exponential gap with the given mean (Poisson arrivals).
    fn exponential(&mut self, mean: f64) -> Micros {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (-(1.0 - u).ln() * mean).max(1.0) as Micros
    }
}

#[derive(Debug, Clone, Copy)]
enum Arrivals {
    /// One request every period, starting at a phase within the first period.
    Periodic {
        phase_permille: u64,
    },
    Poisson,
}

#[derive(Debug, Clone, Copy)]
enum Routing {
    /// A random replica per request.
    Spread,
    /// The replicas in turn, as a round-robin load balancer sends them.
    InTurn,
    /// Always the home replica (another one while it is down).
    Sticky,
    /// The home replica, and a random one for `percent` of the requests.
    StickyStrays { percent: u64 },
}

#[derive(Debug, Clone)]
struct KeySpec {
    capacity: u64,
    interval_ms: u64,
    cost: u64,
    /// Offered load as a percentage of the key's limit (tokens per second).
    load_percent: u64,
    arrivals: Arrivals,
    routing: Routing,
}

impl KeySpec {
    fn rate(&self) -> Rate {
        Rate::try_new(self.capacity, self.interval_ms).expect("valid rate")
    }
    /// Mean gap between requests.
    fn mean_gap_us(&self) -> f64 {
        let tokens_per_us = self.capacity as f64 / (self.interval_ms * MS) as f64;
        self.cost as f64 / (tokens_per_us * self.load_percent as f64 / 100.0)
    }
}

#[derive(Debug, Clone)]
struct Scenario {
    seed: u64,
    replicas: usize,
    keys: Vec<KeySpec>,
    duration_ms: u64,
    sync_ms: u64,
    anti_entropy_ms: u64,
    max_delay_ms: u64,
    loss_percent: u64,
    duplicate_percent: u64,
    /// Each replica's wall clock minus true time, in µs.
    clock_offsets_us: Vec<i64>,
    /// (at ms, replica): the replica dies and a new one (new id, empty) takes its place.
    restarts: Vec<(u64, usize)>,
    /// (at ms, replica): the replica leaves for good.
    departures: Vec<(u64, usize)>,
}

/// A scenario's skew bound, the largest offset between two clocks.
fn skew_us(scenario: &Scenario) -> Micros {
    let max = scenario.clock_offsets_us.iter().max().copied().unwrap_or(0);
    let min = scenario.clock_offsets_us.iter().min().copied().unwrap_or(0);
    (max - min).unsigned_abs()
}

fn key_spec() -> impl Strategy<Value = KeySpec> {
    (
        prop_oneof![
            Just((10u64, 1000u64)),
            Just((100, 1000)),
            Just((5, 200)),
            Just((20, 5000))
        ],
        prop_oneof![3 => Just(1u64), 1 => Just(5u64)],
        10..=200u64,
        prop_oneof![
            (0..1000u64).prop_map(|phase_permille| Arrivals::Periodic { phase_permille }),
            Just(Arrivals::Poisson),
        ],
        prop_oneof![
            Just(Routing::Spread),
            Just(Routing::InTurn),
            Just(Routing::Sticky),
            (5..=30u64).prop_map(|percent| Routing::StickyStrays { percent }),
        ],
    )
        .prop_map(
            |((capacity, interval_ms), cost, load_percent, arrivals, routing)| KeySpec {
                capacity,
                interval_ms,
                cost: cost.min(capacity),
                load_percent,
                arrivals,
                routing,
            },
        )
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (2..=5usize).prop_flat_map(|replicas| {
        (
            any::<u64>(),
            Just(replicas),
            proptest::collection::vec(key_spec(), 1..=4),
            prop_oneof![Just(10u64), Just(50)],
            prop_oneof![2 => Just(0u64), 1 => 1..=20u64],
            prop_oneof![2 => Just(0u64), 1 => 1..=20u64],
            prop_oneof![2 => Just(0u64), 1 => 1..=20u64],
            proptest::collection::vec(
                prop_oneof![2 => Just(0i64), 1 => -50_000..=50_000i64],
                replicas,
            ),
            proptest::collection::vec((1_000..15_000u64, 0..replicas), 0..=2),
            proptest::collection::vec((1_000..15_000u64, 0..replicas), 0..=1),
        )
            .prop_map(
                |(
                    seed,
                    replicas,
                    keys,
                    sync_ms,
                    max_delay_ms,
                    loss_percent,
                    duplicate_percent,
                    clock_offsets_us,
                    restarts,
                    departures,
                )| Scenario {
                    seed,
                    replicas,
                    keys,
                    duration_ms: 16_000,
                    sync_ms,
                    anti_entropy_ms: 1_000,
                    max_delay_ms,
                    loss_percent,
                    duplicate_percent,
                    clock_offsets_us,
                    restarts,
                    // Keep at least two replicas up: departures of all but one are a different
                    // scenario (a single node is the textbook bucket, tested in crdt.rs).
                    departures: if replicas > 2 { departures } else { Vec::new() },
                },
            )
    })
}

#[derive(Debug)]
enum Event {
    Request {
        key: usize,
    },
    Sync {
        replica: usize,
        generation: u64,
    },
    AntiEntropy {
        replica: usize,
        generation: u64,
    },
    Sweep {
        replica: usize,
        generation: u64,
    },
    Deliver {
        to: usize,
        generation: u64,
        sent_at: Micros,
        states: Vec<(usize, BucketState)>,
    },
    Restart {
        replica: usize,
    },
    Depart {
        replica: usize,
    },
}

/// A replica's clock as production runs it: its system clock (true time plus an offset) plus
/// the lead it takes from peers ahead of it ([`follow_peer`], [`Lead`]).
#[derive(Debug)]
struct SimClock {
    /// True time, set by the simulation before the replica acts.
    now: AtomicU64,
    offset_us: i64,
    lead: Lead,
}

impl Clock for SimClock {
    fn now(&self) -> Micros {
        self.now
            .load(Ordering::Relaxed)
            .saturating_add_signed(self.offset_us)
            + self.lead.get()
    }

    fn catch_up(&self, ahead_us: Micros, max_lead_us: Micros) {
        self.lead.catch_up(ahead_us, max_lead_us);
    }
}

struct Replica {
    store: Store,
    up: bool,
    /// Incremented at each restart: events and messages of an earlier life are dropped.
    generation: u64,
    clock: SimClock,
}

impl Replica {
    /// This replica's clock at true time `now`.
    fn local(&self, now: Micros) -> Micros {
        self.clock.now.store(now, Ordering::Relaxed);
        self.clock.now()
    }
}

/// The textbook bucket fed what the cluster actually admitted, at true times. It goes below
/// zero when replicas together admit more than it holds: that is the overshoot.
#[derive(Debug, Clone)]
struct Truth {
    capacity: f64,
    per_us: f64,
    level: f64,
    at: Micros,
    /// The largest `admitted(s, now] - r·(now - s)` over windows ending at the last admission:
    /// never above `C + O` by the overshoot bound.
    window_excess: f64,
}

impl Truth {
    fn new(spec: &KeySpec) -> Self {
        let capacity = spec.capacity as f64;
        Self {
            capacity,
            per_us: capacity / (spec.interval_ms * MS) as f64,
            level: capacity,
            at: T0,
            window_excess: 0.0,
        }
    }

    fn level_at(&self, now: Micros) -> f64 {
        (self.level + self.per_us * now.saturating_sub(self.at) as f64).min(self.capacity)
    }

    fn admit(&mut self, cost: u64, now: Micros) {
        let elapsed = now.saturating_sub(self.at) as f64;
        self.level = self.level_at(now) - cost as f64;
        self.window_excess = (self.window_excess - self.per_us * elapsed).max(0.0) + cost as f64;
        self.at = now;
    }
}

/// Per key: what the cluster and the textbook bucket admitted.
#[derive(Debug, Default, Clone)]
struct Tally {
    requests: u64,
    admitted: u64,
    ideal: u64,
    /// Requests the ideal bucket admitted and the cluster refused.
    refused_under_limit: u64,
    /// Decisions on a replica that held no bucket for the key (it had swept it, or never heard of
    /// it) while another replica held one: the claim such a decision makes knows nothing of the
    /// others' latest tokens.
    blind: u64,
    worst_under: i64,
    worst_over: i64,
}

struct Sim<'a> {
    scenario: &'a Scenario,
    rng: Rng,
    replicas: Vec<Replica>,
    next_replica_id: u64,
    events: BinaryHeap<Reverse<(Micros, u64, usize)>>,
    payloads: BTreeMap<usize, Event>,
    sequence: u64,
    ideal: Vec<ReferenceBucket>,
    truth: Vec<Truth>,
    tally: Vec<Tally>,
    crashes: u64,
    keys: Vec<String>,
}

impl<'a> Sim<'a> {
    fn new(scenario: &'a Scenario) -> Self {
        let mut sim = Self {
            scenario,
            rng: Rng(scenario.seed),
            replicas: Vec::new(),
            next_replica_id: 1,
            events: BinaryHeap::new(),
            payloads: BTreeMap::new(),
            sequence: 0,
            ideal: scenario
                .keys
                .iter()
                .map(|k| ReferenceBucket::new_at(k.rate(), T0))
                .collect(),
            truth: scenario.keys.iter().map(Truth::new).collect(),
            tally: vec![Tally::default(); scenario.keys.len()],
            crashes: 0,
            keys: (0..scenario.keys.len())
                .map(|i| format!("client-{i}"))
                .collect(),
        };
        for i in 0..scenario.replicas {
            let store = sim.new_store();
            sim.replicas.push(Replica {
                store,
                up: true,
                generation: 0,
                clock: SimClock {
                    now: AtomicU64::new(T0),
                    offset_us: scenario.clock_offsets_us[i],
                    lead: Lead::default(),
                },
            });
            sim.schedule_replica_timers(i, T0);
        }
        for (key, spec) in scenario.keys.iter().enumerate() {
            let first = match spec.arrivals {
                Arrivals::Periodic { phase_permille } => {
                    (spec.mean_gap_us() * phase_permille as f64 / 1000.0) as Micros
                }
                Arrivals::Poisson => sim.rng.exponential(spec.mean_gap_us()),
            };
            sim.schedule(T0 + first, Event::Request { key });
        }
        for &(at_ms, replica) in &scenario.restarts {
            sim.schedule(T0 + at_ms * MS, Event::Restart { replica });
        }
        for &(at_ms, replica) in &scenario.departures {
            sim.schedule(T0 + at_ms * MS, Event::Depart { replica });
        }
        sim
    }

    fn new_store(&mut self) -> Store {
        let id = ReplicaId(self.next_replica_id);
        self.next_replica_id += 1;
        Store::new(id, 4).with_change_tracking()
    }

    fn schedule(&mut self, at: Micros, event: Event) {
        self.sequence += 1;
        self.payloads.insert(self.sequence as usize, event);
        self.events
            .push(Reverse((at, self.sequence, self.sequence as usize)));
    }

    /// Sync, anti-entropy and sweep timers at independent phases.
    fn schedule_replica_timers(&mut self, replica: usize, from: Micros) {
        let generation = self.replicas[replica].generation;
        let sync = self.scenario.sync_ms * MS;
        let anti_entropy = self.scenario.anti_entropy_ms * MS;
        let phase = self.rng.below(sync);
        self.schedule(
            from + phase,
            Event::Sync {
                replica,
                generation,
            },
        );
        let phase = self.rng.below(anti_entropy);
        self.schedule(
            from + phase,
            Event::AntiEntropy {
                replica,
                generation,
            },
        );
        let phase = self.rng.below(SWEEP_PERIOD);
        self.schedule(
            from + phase,
            Event::Sweep {
                replica,
                generation,
            },
        );
    }

    /// Whether an event scheduled for `replica` in its life `generation` still applies (it is
    /// up and has not restarted since).
    fn is_current(&self, replica: usize, generation: u64) -> bool {
        let r = &self.replicas[replica];
        r.up && r.generation == generation
    }

    fn rate_of(&self, key: usize) -> Rate {
        self.scenario.keys[key].rate()
    }

    fn key_index(&self, key: &str) -> usize {
        self.keys.iter().position(|k| k == key).expect("known key")
    }

    fn live(&self) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|&i| self.replicas[i].up)
            .collect()
    }

    /// Send `states` from `from` to every other live replica, through the lossy network.
    fn send(&mut self, from: usize, now: Micros, states: Vec<(usize, BucketState)>) {
        if states.is_empty() {
            return;
        }
        let sent_at = self.replicas[from].local(now);
        for to in self.live() {
            if to == from {
                continue;
            }
            let copies = if self.rng.chance(self.scenario.duplicate_percent) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                if self.rng.chance(self.scenario.loss_percent) {
                    continue;
                }
                let delay = self.rng.below(self.scenario.max_delay_ms * MS + 1);
                let generation = self.replicas[to].generation;
                let states = states.iter().map(|(k, s)| (*k, wire(s))).collect();
                self.schedule(
                    now + delay,
                    Event::Deliver {
                        to,
                        generation,
                        sent_at,
                        states,
                    },
                );
            }
        }
    }

    fn route(&mut self, key: usize) -> usize {
        let live = self.live();
        let home = key % self.scenario.replicas;
        if let Routing::InTurn = self.scenario.keys[key].routing {
            return live[self.tally[key].requests as usize % live.len()];
        }
        let pick_random = match self.scenario.keys[key].routing {
            Routing::Spread | Routing::InTurn => true,
            Routing::Sticky => false,
            Routing::StickyStrays { percent } => self.rng.chance(percent),
        };
        if pick_random || !self.replicas[home].up {
            live[self.rng.below(live.len() as u64) as usize]
        } else {
            home
        }
    }

    /// The longest time an admission takes to reach every peer (`D`).
    fn delay_bound_us(&self) -> Micros {
        let delay = self.scenario.max_delay_ms * MS;
        if self.scenario.loss_percent > 0 {
            self.scenario.anti_entropy_ms * MS + delay
        } else {
            self.scenario.sync_ms * MS + delay
        }
    }

    /// Whether the key's clients stay under their limit by more than the replication delay: at
    /// load `ρ`, each request of the textbook bucket finds at least `I·(1/ρ - 1)` of refill to
    /// spare on average, which must cover the `D` (plus a skew) by which a claim can count a
    /// peer's last tokens late (docs/crdt.md): `ρ < I / (I + D + skew)`.
    fn under_limit_by_the_delay(&self, key: usize) -> bool {
        let spec = &self.scenario.keys[key];
        let interval = (spec.interval_ms * MS) as f64;
        let slack = (self.delay_bound_us() + skew_us(self.scenario)) as f64;
        (spec.load_percent as f64) < 100.0 * interval / (interval + slack)
    }

    fn bounds(&self, key: usize) -> (i64, i64) {
        let spec = &self.scenario.keys[key];
        let rate = spec.rate();
        let n = self.scenario.replicas as f64;
        let per_us = spec.capacity as f64 / (spec.interval_ms * MS) as f64;
        let delay = self.scenario.max_delay_ms * MS;
        let d = self.delay_bound_us();
        let unseen = (n - 1.0) * (rate.capacity() as f64 + per_us * d as f64);
        let lost = self.crashes as f64
            * (rate.capacity() as f64 + per_us * (self.scenario.sync_ms * MS) as f64);
        // A claim that knows nothing of the others' latest tokens leaves them to their
        // incarnation bounds: what they had admitted within D that it had not heard of is not
        // charged again (docs/crdt.md, "Over-admission").
        let blind = self.tally[key].blind as f64 * unseen;
        // Replicas follow the fastest clock: what remains of an offset is the network delay
        // of the message they followed it by.
        let skew = per_us * skew_us(self.scenario).min(delay) as f64;
        let under = (unseen + skew).ceil() as i64;
        let over = (unseen + lost + blind + skew).ceil() as i64;
        (under, over)
    }

    fn request(&mut self, key: usize, now: Micros) -> Result<(), String> {
        let spec = self.scenario.keys[key].clone();
        let replica = self.route(key);
        let local = self.replicas[replica].local(now);
        let held = |r: &Replica| r.up && r.store.contains(POLICY, &self.keys[key]);
        if !held(&self.replicas[replica])
            && self
                .replicas
                .iter()
                .enumerate()
                .any(|(i, r)| i != replica && held(r))
        {
            self.tally[key].blind += 1;
        }
        let ours = self.replicas[replica].store.decide(
            POLICY,
            &self.keys[key],
            spec.rate(),
            spec.cost,
            local,
        );
        let ideal = self.ideal[key].try_consume_at(spec.cost, now);
        if std::env::var("DIFF_DEBUG").is_ok_and(|k| k == key.to_string()) {
            let mut state = None;
            self.replicas[replica].store.for_each(|_, k, s| {
                if k == self.keys[key] {
                    state = Some(s.clone())
                }
            });
            eprintln!(
                "{} ms r{replica}: ours {} ideal {} state {state:?}",
                (now - T0) as f64 / 1000.0,
                ours.allowed,
                ideal.allowed
            );
        }
        let (under, over) = self.bounds(key);
        let checked_against_ideal = self.under_limit_by_the_delay(key);
        let truth = &mut self.truth[key];
        let real_level = truth.level_at(now);
        let tally = &mut self.tally[key];
        tally.requests += 1;
        if ours.allowed {
            tally.admitted += spec.cost;
            truth.admit(spec.cost, now);
        }
        if ideal.allowed {
            tally.ideal += spec.cost;
            if !ours.allowed {
                tally.refused_under_limit += 1;
            }
        }
        let diff = tally.admitted as i64 - tally.ideal as i64;
        tally.worst_over = tally
            .worst_over
            .max(truth.window_excess.ceil() as i64 - spec.capacity as i64);
        tally.worst_under = tally.worst_under.max(-diff);
        let context = || {
            format!(
                "key {key} ({spec:?}) at {} ms on replica {replica}: ours {ours:?}, ideal {}, \
                 level of what the cluster admitted {real_level:.3}; {tally:?}",
                (now - T0) / MS,
                ideal.allowed,
            )
        };
        // A refusal only for consumption that happened: the textbook bucket fed what the
        // cluster admitted held at most `cost + U`.
        if !ours.allowed && real_level >= (spec.cost as i64 + under) as f64 {
            return Err(format!(
                "refused with the bucket holding more than cost + U ({under}): {}",
                context()
            ));
        }
        // Never more than `C + r·T + O` over any window.
        if truth.window_excess > (spec.capacity as i64 + over) as f64 + 1e-6 {
            return Err(format!(
                "admitted {:.3} above the rate over a window, more than C + O ({} + {over}): {}",
                truth.window_excess,
                spec.capacity,
                context()
            ));
        }
        // Against the textbook bucket fed the same arrivals, for clients under their limit by
        // more than the replication delay. Closer to it, a claim made before hearing of a peer's
        // last tokens counts them from the claim, up to `r·D` of refill late, and at cost =
        // capacity that can cost a whole request each time (the first check above still bounds
        // every refusal); above it, which request of a contended bucket gets a token depends on
        // microseconds.
        if checked_against_ideal && -diff > under {
            return Err(format!(
                "admitted {} vs ideal {} (at most {under} below): {}",
                tally.admitted,
                tally.ideal,
                context()
            ));
        }
        let gap = match spec.arrivals {
            Arrivals::Periodic { .. } => spec.mean_gap_us() as Micros,
            Arrivals::Poisson => self.rng.exponential(spec.mean_gap_us()),
        };
        self.schedule(now + gap.max(1), Event::Request { key });
        Ok(())
    }

    fn run(mut self) -> Result<Vec<Tally>, String> {
        let end = T0 + self.scenario.duration_ms * MS;
        while let Some(Reverse((now, _, id))) = self.events.pop() {
            if now > end {
                break;
            }
            let event = self
                .payloads
                .remove(&id)
                .expect("payload of a scheduled event");
            match event {
                Event::Request { key } => self.request(key, now)?,
                Event::Sync {
                    replica,
                    generation,
                } => {
                    if !self.is_current(replica, generation) {
                        continue;
                    }
                    let states = self.changes(replica);
                    self.send(replica, now, states);
                    self.schedule(
                        now + self.scenario.sync_ms * MS,
                        Event::Sync {
                            replica,
                            generation,
                        },
                    );
                }
                Event::AntiEntropy {
                    replica,
                    generation,
                } => {
                    if !self.is_current(replica, generation) {
                        continue;
                    }
                    let states = self.everything(replica);
                    self.send(replica, now, states);
                    let next = now + self.scenario.anti_entropy_ms * MS;
                    self.schedule(
                        next,
                        Event::AntiEntropy {
                            replica,
                            generation,
                        },
                    );
                }
                Event::Sweep {
                    replica,
                    generation,
                } => {
                    if !self.is_current(replica, generation) {
                        continue;
                    }
                    let r = &self.replicas[replica];
                    let local = r.local(now);
                    let rates: Vec<Rate> = (0..self.keys.len()).map(|k| self.rate_of(k)).collect();
                    let keys = self.keys.clone();
                    r.store.sweep(local, |_, key| {
                        keys.iter().position(|k| k == key).map(|i| rates[i])
                    });
                    self.schedule(
                        now + SWEEP_PERIOD,
                        Event::Sweep {
                            replica,
                            generation,
                        },
                    );
                }
                Event::Deliver {
                    to,
                    generation,
                    sent_at,
                    states,
                } => {
                    if !self.is_current(to, generation) {
                        continue;
                    }
                    let r = &self.replicas[to];
                    r.local(now);
                    if follow_peer(&r.clock, sent_at, CLOCK_GUARD, CLOCK_GUARD).is_err() {
                        continue;
                    }
                    self.merge_into(to, now, &states);
                }
                Event::Restart { replica } => {
                    if !self.replicas[replica].up || self.live().len() < 2 {
                        continue;
                    }
                    // Dies: whatever it admitted since its last sync round is lost.
                    self.crashes += 1;
                    let store = self.new_store();
                    let r = &mut self.replicas[replica];
                    r.store = store;
                    r.generation += 1;
                    // Starts empty and pulls every live peer's state before serving.
                    for peer in self.live() {
                        if peer != replica {
                            let states = self.everything(peer);
                            self.merge_into(replica, now, &states);
                        }
                    }
                    self.schedule_replica_timers(replica, now);
                }
                Event::Depart { replica } => {
                    if self.replicas[replica].up && self.live().len() > 2 {
                        // A graceful leave: its last changes go out first.
                        let states = self.changes(replica);
                        self.send(replica, now, states);
                        self.replicas[replica].up = false;
                    }
                }
            }
        }
        Ok(self.tally)
    }

    /// What the replica's decisions changed since its last round (a delta round's content).
    fn changes(&self, replica: usize) -> Vec<(usize, BucketState)> {
        let mut states = Vec::new();
        self.replicas[replica].store.drain_changes(&mut states);
        states
            .into_iter()
            .map(|(_, k, s)| (self.key_index(&k), s))
            .collect()
    }

    fn everything(&self, replica: usize) -> Vec<(usize, BucketState)> {
        let mut states = Vec::new();
        self.replicas[replica]
            .store
            .for_each(|_, key, state| states.push((key.to_owned(), state.clone())));
        states
            .into_iter()
            .map(|(k, s)| (self.key_index(&k), s))
            .collect()
    }

    fn merge_into(&self, to: usize, now: Micros, states: &[(usize, BucketState)]) {
        let r = &self.replicas[to];
        let local = r.local(now);
        for (key, state) in states {
            // What the peer listener checks before merging (`Replicator::apply`): an honest
            // replica's state must always pass, or the check would drop real consumption.
            assert!(
                state.components().len() <= MAX_COMPONENTS_PER_BUCKET,
                "an honest state of {} components would be refused",
                state.components().len()
            );
            if let Some(component) =
                state.implausible_component(self.rate_of(*key), local + CLOCK_GUARD)
            {
                panic!("an honest component would be refused as implausible: {component:?}");
            }
            r.store
                .merge(POLICY, &self.keys[*key], state, self.rate_of(*key), local);
        }
    }
}

/// A state as the peer decoder rebuilds it from the wire.
fn wire(state: &BucketState) -> BucketState {
    BucketState::from_parts(
        state.epoch(),
        state.rebaser(),
        state.components().iter().copied(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn replicas_stay_within_the_bounds_of_the_textbook_bucket(scenario in scenario()) {
        match Sim::new(&scenario).run() {
            Ok(_) => {}
            Err(failure) => prop_assert!(false, "{failure}"),
        }
    }
}

/// The accuracy harness's `hot-uniform` pattern in the simulation: one hot key at twice its
/// limit, requests to the three replicas in turn. An earlier version of this design, whose
/// replicas dropped their own absorbed components, admitted every request here (and on real
/// processes).
#[test]
fn a_hot_key_sent_to_three_replicas_in_turn_at_twice_its_limit_holds_the_rate() {
    let scenario = Scenario {
        seed: 1,
        replicas: 3,
        keys: vec![KeySpec {
            capacity: 1000,
            interval_ms: 1000,
            cost: 1,
            load_percent: 200,
            arrivals: Arrivals::Periodic { phase_permille: 0 },
            routing: Routing::InTurn,
        }],
        duration_ms: 5_000,
        sync_ms: 50,
        anti_entropy_ms: 5_000,
        max_delay_ms: 1,
        loss_percent: 0,
        duplicate_percent: 0,
        clock_offsets_us: vec![0, 0, 0],
        restarts: vec![],
        departures: vec![],
    };
    let tally = Sim::new(&scenario)
        .run()
        .unwrap_or_else(|failure| panic!("{failure}"));
    // The checks above bound every window; over the whole run, what a textbook bucket allows:
    // C + r·T (1000 + 5000) plus the overshoot bound.
    let admitted = tally[0].admitted;
    assert!(admitted <= 6_000 + 2_102, "admitted {admitted}");
    assert!(
        admitted >= tally[0].ideal - 100,
        "admitted {admitted}: {:?}",
        tally[0]
    );
}

/// A scenario of one key, no faults, for the named regressions below.
fn one_key(replicas: usize, key: KeySpec, seed: u64) -> Scenario {
    Scenario {
        seed,
        replicas,
        keys: vec![key],
        duration_ms: 16_000,
        sync_ms: 10,
        anti_entropy_ms: 1_000,
        max_delay_ms: 0,
        loss_percent: 0,
        duplicate_percent: 0,
        clock_offsets_us: vec![0; replicas],
        restarts: vec![],
        departures: vec![],
    }
}

/// The first case this test found on the code before the incarnation bounds (admitted 33 of an
/// ideal 45): a claim after a sweep turned the other replica's whole history into debt. Kept by
/// name because proptest's saved seeds stop naming the same scenario when the strategy changes.
#[test]
fn a_sticky_client_at_30_percent_of_its_limit_is_never_refused_after_sweeps() {
    let key = KeySpec {
        capacity: 10,
        interval_ms: 1000,
        cost: 1,
        load_percent: 30,
        arrivals: Arrivals::Periodic {
            phase_permille: 285,
        },
        routing: Routing::Sticky,
    };
    let tally = Sim::new(&one_key(2, key, 0))
        .run()
        .unwrap_or_else(|failure| panic!("{failure}"));
    assert_eq!(tally[0].refused_under_limit, 0, "{:?}", tally[0]);
    assert_eq!(tally[0].admitted, tally[0].ideal);
}

/// Found on the first version of this design: a replica claimed before merging an arriving
/// state and so counted the tokens it carried a refill late; a client alone on one replica with
/// cost = capacity was refused at the edge of its refill.
#[test]
fn a_client_alone_on_one_replica_is_not_refused_by_a_peers_claim() {
    let key = KeySpec {
        capacity: 5,
        interval_ms: 200,
        cost: 5,
        load_percent: 42,
        arrivals: Arrivals::Poisson,
        routing: Routing::Sticky,
    };
    for seed in 0..20 {
        let tally = Sim::new(&one_key(2, key.clone(), seed))
            .run()
            .unwrap_or_else(|failure| panic!("seed {seed}: {failure}"));
        assert_eq!(
            tally[0].refused_under_limit, 0,
            "seed {seed}: {:?}",
            tally[0]
        );
    }
}
