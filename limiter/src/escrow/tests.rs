//! Strict mode in a simulated cluster: 3 to 5 replicas running the real protocol ([`Node`]) and
//! sub-buckets ([`SubBucket`]) over a simulated network that delays, drops and cuts messages,
//! with crashes, restarts (as new replicas), graceful leaves and clock offsets. After every step
//! the shares that replicas could spend from sum to at most the whole; at the end, the tokens
//! admitted across the cluster never exceed `C + r·T` over any window.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use proptest::prelude::*;

use super::demand::DemandMeter;
use super::protocol::{Control, Node, Params};
use super::share::{LoanAsk, Ppm, ShareHistory, SubBucket, WHOLE, capacity, cost_units, plan_pool};
use crate::bucket::{Micros, Rate, ReferenceBucket};

const MS: Micros = 1_000;
const SYNC: Micros = 50 * MS;
const ANSWER_TIMEOUT: Micros = 200 * MS;
const POLICY: &str = "strict";
/// 100 tokens per 10 s: shares move (within a second or two) much faster than a bucket refills,
/// so a share change that created tokens would show as excess.
const CAPACITY: u64 = 100;
const INTERVAL_MS: u64 = 10_000;
/// Keys that see a request now and then: their sub-buckets are dropped when full and created
/// again, so fresh sub-buckets after share changes are exercised.
const COLD_KEYS: [&str; 8] = ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7"];

fn rate() -> Rate {
    Rate::try_new(CAPACITY, INTERVAL_MS).unwrap()
}

/// A tiny deterministic generator (the schedule comes from proptest's seed).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug)]
struct Replica {
    rate: Rate,
    node: Node,
    history: ShareHistory,
    buckets: HashMap<&'static str, SubBucket>,
    alive: bool,
    /// Local clock = simulated time + offset.
    offset: Micros,
    next_round: Micros,
    /// Open rounds: sent_at (local) -> (answered by, deadline in simulated time).
    rounds: VecDeque<(Micros, BTreeSet<u64>, Micros)>,
    answered_last_round: BTreeSet<u64>,
    asked: DemandMeter,
}

impl Replica {
    fn new(id: u64, now: Micros, offset: Micros, rate: Rate) -> Self {
        Self {
            rate,
            node: Node::new(id, Params::default()),
            history: ShareHistory::new(now + offset, 3_600_000_000),
            buckets: HashMap::new(),
            alive: true,
            offset,
            next_round: now,
            rounds: VecDeque::new(),
            answered_last_round: BTreeSet::new(),
            asked: DemandMeter::new(now + offset, Params::default().demand_window_us, 500 * MS),
        }
    }

    fn local(&self, t: Micros) -> Micros {
        t + self.offset
    }

    fn apply(&mut self, changes: Vec<(String, Ppm)>, t: Micros) {
        let at = self.local(t) + 1;
        for (policy, share) in changes {
            assert_eq!(policy, POLICY);
            self.history.set(at, share);
        }
    }

    /// What this replica could spend from now.
    fn effective_share(&self, t: Micros) -> Ppm {
        if !self.alive || self.local(t) >= self.node.lease_until() {
            0
        } else {
            self.history.current()
        }
    }

    /// The runtime's once-a-second pass: settle, and drop what a fresh sub-bucket would equal.
    fn sweep(&mut self, t: Micros) {
        let now = self.local(t);
        let (history, rate) = (&self.history, self.rate);
        self.buckets.retain(|_, bucket| {
            history.settle(bucket, rate, now);
            !bucket.is_reclaimable(history, rate, now)
        });
    }

    fn policies(&self) -> [(String, Rate); 1] {
        [(POLICY.to_owned(), self.rate)]
    }

    /// One request of `cost` tokens from this replica's own share: whether it was admitted,
    /// and otherwise the units it lacks (everything while the lease has lapsed).
    fn decide_cost(&mut self, key: &'static str, cost: u64, t: Micros) -> (bool, i128) {
        self.asked.record(POLICY, cost);
        let now = self.local(t);
        let (history, rate) = (&self.history, self.rate);
        let bucket = self
            .buckets
            .entry(key)
            .or_insert_with(|| SubBucket::fresh(history, rate, now));
        if now >= self.node.lease_until() {
            return (false, cost_units(rate, cost));
        }
        let allowed = bucket.try_spend(history, rate, cost, now).allowed;
        (allowed, bucket.shortfall(rate, cost))
    }

    fn lease_holds(&self, t: Micros) -> bool {
        self.alive && self.local(t) < self.node.lease_until()
    }

    /// The lender's side of a loan (`Escrow::lend`): nothing unless the lease holds.
    fn lend(&mut self, key: &'static str, ask: LoanAsk, t: Micros) -> (i128, i128) {
        let now = self.local(t);
        let lease = self.lease_holds(t);
        let (history, rate) = (&self.history, self.rate);
        let bucket = self
            .buckets
            .entry(key)
            .or_insert_with(|| SubBucket::fresh(history, rate, now));
        if !lease {
            history.settle(bucket, rate, now);
            return (0, bucket.level);
        }
        bucket.lend(history, rate, ask, now)
    }

    /// Level now, settled.
    fn level(&mut self, key: &'static str, t: Micros) -> i128 {
        let now = self.local(t);
        let (history, rate) = (&self.history, self.rate);
        let bucket = self
            .buckets
            .entry(key)
            .or_insert_with(|| SubBucket::fresh(history, rate, now));
        history.settle(bucket, rate, now);
        bucket.level
    }

    fn take_balance(&mut self, key: &'static str, units: i128, t: Micros) {
        let now = self.local(t);
        let (history, rate) = (&self.history, self.rate);
        let bucket = self
            .buckets
            .entry(key)
            .or_insert_with(|| SubBucket::fresh(history, rate, now));
        bucket.take_balance(history, rate, units, now);
    }

    /// The room this replica offers a loan: its capacity while its lease holds.
    fn room(&self, t: Micros) -> i128 {
        if self.lease_holds(t) {
            SubBucket::capacity_now(&self.history, self.rate)
        } else {
            0
        }
    }

    fn spend_with_loan(&mut self, key: &'static str, cost: u64, loan: i128, t: Micros) -> bool {
        let now = self.local(t);
        let lease = self.lease_holds(t);
        let (history, rate) = (&self.history, self.rate);
        let bucket = self
            .buckets
            .entry(key)
            .or_insert_with(|| SubBucket::fresh(history, rate, now));
        bucket
            .spend_with_loan(history, rate, cost, loan, lease, now)
            .allowed
    }
}

#[derive(Debug)]
enum Payload {
    Push { sent_at: Micros },
    Answer { sent_at: Micros },
}

#[derive(Debug)]
struct Message {
    deliver_at: Micros,
    from: usize,
    to: usize,
    control: Control,
    payload: Payload,
}

#[derive(Debug, Clone)]
struct Faults {
    drop_percent: u64,
    max_delay_ms: u64,
    /// (start ms, end ms, replica index cut off from the others).
    partitions: Vec<(u64, u64, usize)>,
    /// (at ms, replica index, restart).
    crashes: Vec<(u64, usize, Option<Restart>)>,
    /// (at ms, replica index): SIGTERM.
    leaves: Vec<(u64, usize)>,
    /// Now and then a burst on one key at one replica.
    bursts: bool,
}

/// A crashed replica's process starts again this many ms later, and says it takes over from the
/// dead one (as one restarting on the same snapshot directory does: `lineage`) or not.
type Restart = (u64, bool);

struct Cluster {
    rate: Rate,
    replicas: Vec<Replica>,
    network: Vec<Message>,
    rng: Rng,
    faults: Faults,
    /// Per key: (simulated time, tokens) of every admission.
    admitted: BTreeMap<&'static str, Vec<(Micros, u64)>>,
    next_id: u64,
    /// Refused requests borrow from peers (`Replicator::borrow`); loans are instantaneous,
    /// and an answer is lost (the lender has lent, the borrower never hears) as often as a
    /// message is dropped.
    loans: bool,
}

impl Cluster {
    fn new(n: usize, seed: u64, faults: Faults) -> Self {
        Self::with_rate(n, seed, faults, rate())
    }

    fn with_rate(n: usize, seed: u64, faults: Faults, rate: Rate) -> Self {
        let mut rng = Rng(seed | 1);
        let replicas = (0..n)
            .map(|i| {
                let offset = rng.below(200 * MS); // clocks up to 200 ms apart
                Replica::new(1000 + i as u64 * 7, 0, offset, rate)
            })
            .collect();
        Self {
            rate,
            replicas,
            network: Vec::new(),
            rng,
            faults,
            admitted: BTreeMap::new(),
            next_id: 5000,
            loans: true,
        }
    }

    /// A request of `cost` at replica `i`, paid from its share and, short of that, from loans
    /// as `Replicator::borrow` asks for them: one peer that holds it all (largest share first),
    /// else a part from each when together they held enough. Records the admission.
    fn decide(&mut self, i: usize, key: &'static str, cost: u64, t: Micros) -> bool {
        let (allowed, shortfall) = self.replicas[i].decide_cost(key, cost, t);
        let allowed =
            allowed || (self.loans && shortfall > 0 && self.borrow(i, key, cost, shortfall, t));
        if allowed {
            self.admitted.entry(key).or_default().push((t, cost));
        }
        allowed
    }

    fn borrow(
        &mut self,
        i: usize,
        key: &'static str,
        cost: u64,
        shortfall: i128,
        t: Micros,
    ) -> bool {
        let Some(allocation) = self.replicas[i].node.allocation().cloned() else {
            return false;
        };
        let mut lenders: Vec<(Ppm, usize)> = (0..self.replicas.len())
            .filter(|&j| j != i && self.replicas[j].alive && !self.cut(i, j, t))
            .filter(|&j| allocation.members.contains(&self.replicas[j].node.me))
            .map(|j| (allocation.share(POLICY, self.replicas[j].node.me), j))
            .collect();
        lenders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut quotes: HashMap<usize, i128> = HashMap::new();
        let room = self.replicas[i].room(t);
        let ask = LoanAsk {
            wanted: shortfall,
            partial: false,
            room,
            kept: 0,
        };
        for (n, &(_, j)) in lenders.iter().enumerate() {
            let (lent, level) = self.replicas[j].lend(key, ask, t);
            if self.rng.chance(self.faults.drop_percent) {
                continue; // the answer is lost: lent, never received
            }
            quotes.insert(j, level);
            if lent > 0 {
                let allowed = self.replicas[i].spend_with_loan(key, cost, lent, t);
                // Then, off the request's path, even out with the peers not asked yet: each
                // evens out with this replica and its lender as one group, and this replica
                // passes its lender the lender's part.
                let mut group = vec![i, j];
                for &(_, k) in &lenders[n + 1..] {
                    if room == 0 {
                        break;
                    }
                    let group_room: i128 = group.iter().map(|&g| self.replicas[g].room(t)).sum();
                    let group_kept: i128 =
                        group.iter().map(|&g| self.replicas[g].level(key, t)).sum();
                    let ask = LoanAsk {
                        wanted: 0,
                        partial: false,
                        room: group_room,
                        kept: group_kept,
                    };
                    let (lent, _) = self.replicas[k].lend(key, ask, t);
                    if self.rng.chance(self.faults.drop_percent) {
                        continue;
                    }
                    let ratio = (group_kept + lent) as f64 / group_room as f64;
                    let mut left = lent;
                    for &g in &group {
                        let want = ((ratio * self.replicas[g].room(t) as f64) as i128
                            - self.replicas[g].level(key, t))
                        .clamp(0, left);
                        self.replicas[g].take_balance(key, want, t);
                        left -= want;
                    }
                    self.replicas[i].take_balance(key, left, t);
                    group.push(k);
                }
                return allowed;
            }
        }
        let mut lent = 0;
        let needed = cost_units(self.rate, cost);
        let own = (needed - shortfall, room);
        let quoted: Vec<(i128, i128)> = lenders
            .iter()
            .map(|&(share, j)| {
                (
                    quotes.get(&j).copied().unwrap_or(0),
                    capacity(self.rate, share),
                )
            })
            .collect();
        if let Some(plan) = plan_pool(own, &quoted, needed) {
            for (&(_, j), wanted) in lenders.iter().zip(plan) {
                if wanted <= 0 {
                    continue;
                }
                let ask = LoanAsk {
                    wanted,
                    partial: true,
                    room: 0,
                    kept: 0,
                };
                let (part, _) = self.replicas[j].lend(key, ask, t);
                if !self.rng.chance(self.faults.drop_percent) {
                    lent += part;
                }
            }
        }
        lent > 0 && self.replicas[i].spend_with_loan(key, cost, lent, t)
    }

    fn cut(&self, a: usize, b: usize, t: Micros) -> bool {
        self.faults.partitions.iter().any(|&(start, end, who)| {
            (start * MS..end * MS).contains(&t) && (a == who) != (b == who)
        })
    }

    fn send(&mut self, from: usize, to: usize, payload: Payload, t: Micros) {
        if self.rng.chance(self.faults.drop_percent) || self.cut(from, to, t) {
            return;
        }
        let delay = self.rng.below(self.faults.max_delay_ms * MS + 1) + 100;
        let control = self.replicas[from].node.control.clone();
        self.network.push(Message {
            deliver_at: t + delay,
            from,
            to,
            control,
            payload,
        });
    }

    fn deliver(&mut self, t: Micros) {
        let (due, pending): (Vec<Message>, Vec<Message>) =
            self.network.drain(..).partition(|m| m.deliver_at <= t);
        self.network = pending;
        for message in due {
            let to = message.to;
            if !self.replicas[to].alive || self.cut(message.from, to, t) {
                continue;
            }
            let from_id = self.replicas[message.from].node.me;
            let now = self.replicas[to].local(t);
            self.replicas[to]
                .node
                .receive(from_id, &message.control, now);
            match message.payload {
                Payload::Push { sent_at } => {
                    self.send(to, message.from, Payload::Answer { sent_at }, t);
                }
                Payload::Answer { sent_at } => {
                    let replica = &mut self.replicas[to];
                    if let Some(round) = replica.rounds.iter_mut().find(|r| r.0 == sent_at) {
                        round.1.insert(from_id);
                        let answered = round.1.clone();
                        // As the runtime does: merge, step, then count the answers.
                        let changes = replica.node.step(now, &replica.policies(), false);
                        replica.apply(changes, t);
                        replica.node.round_answered(sent_at, &answered);
                    }
                }
            }
        }
    }

    fn round(&mut self, i: usize, t: Micros) {
        let peers: Vec<usize> = (0..self.replicas.len())
            .filter(|&j| j != i && self.replicas[j].alive)
            .collect();
        let peer_ids: BTreeSet<u64> = peers.iter().map(|&j| self.replicas[j].node.me).collect();
        let replica = &mut self.replicas[i];
        let now = replica.local(t);
        if let Some(demand) = replica.asked.publish_if_due(now) {
            replica.node.set_demand(demand);
        }
        // Discovery lists the live replicas; "answered" = each answered the last round.
        let all_answered = peer_ids.is_subset(&replica.answered_last_round);
        let changes = replica.node.step(now, &replica.policies(), all_answered);
        replica.apply(changes, t);
        // Close rounds past their deadline.
        while replica.rounds.front().is_some_and(|r| r.2 <= t) {
            let (_, answered, _) = replica.rounds.pop_front().unwrap();
            replica.answered_last_round = answered;
        }
        if peers.is_empty() {
            replica.node.round_answered(now, &BTreeSet::new());
        }
        replica
            .rounds
            .push_back((now, BTreeSet::new(), t + ANSWER_TIMEOUT));
        replica.next_round = t + SYNC;
        for j in peers {
            self.send(i, j, Payload::Push { sent_at: now }, t);
        }
    }

    fn check_shares(&self, t: Micros) {
        let total: u64 = self
            .replicas
            .iter()
            .map(|r| u64::from(r.effective_share(t)))
            .sum();
        assert!(
            total <= u64::from(WHOLE),
            "at {} ms the spendable shares sum to {total} ppm: {:?}",
            t / MS,
            self.replicas
                .iter()
                .map(|r| (
                    r.node.me,
                    r.alive,
                    r.effective_share(t),
                    r.node.allocation().map(|a| a.version)
                ))
                .collect::<Vec<_>>()
        );
    }

    fn faults_at(&mut self, t: Micros) {
        let ms = t / MS;
        if !t.is_multiple_of(MS) {
            return;
        }
        for (at, who, restart) in self.faults.crashes.clone() {
            if at == ms && self.replicas[who].alive {
                self.replicas[who].alive = false;
            }
            if let Some((after, successor)) = restart
                && at + after == ms
                && !self.replicas[who].alive
            {
                // A restarted process is a new replica with nothing.
                self.next_id += 13;
                let offset = self.replicas[who].offset;
                let predecessor = self.replicas[who].node.me;
                self.replicas[who] = Replica::new(self.next_id, t, offset, self.rate);
                if successor {
                    self.replicas[who].node.supersede(predecessor);
                }
            }
        }
        for (at, who) in self.faults.leaves.clone() {
            if at == ms && self.replicas[who].alive {
                let changes = self.replicas[who].node.retire();
                self.replicas[who].apply(changes, t);
                self.round(who, t);
                self.replicas[who].alive = false;
            }
        }
    }

    /// Faults, deliveries and sync rounds due at `t`.    /// Faults, deliveries and sync rounds due at `t`.
    fn advance(&mut self, t: Micros) {
        self.faults_at(t);
        self.deliver(t);
        for i in 0..self.replicas.len() {
            if self.replicas[i].alive && self.replicas[i].next_round <= t {
                self.round(i, t);
            }
        }
    }

    /// One client's requests on `key`, each of one token at the replica it names (arrival
    /// times are whole milliseconds), until `duration`. Returns each request's verdict.
    fn serve(
        &mut self,
        key: &'static str,
        cost: u64,
        arrivals: &[(Micros, usize)],
        duration: Micros,
    ) -> Vec<bool> {
        let mut verdicts = Vec::with_capacity(arrivals.len());
        let mut t = 0;
        while t < duration {
            self.advance(t);
            while let Some(&(_, i)) = arrivals.get(verdicts.len()).filter(|a| a.0 <= t) {
                let allowed = self.replicas[i].alive && self.decide(i, key, cost, t);
                verdicts.push(allowed);
            }
            if t.is_multiple_of(1000 * MS) {
                for replica in &mut self.replicas {
                    replica.sweep(t);
                }
            }
            self.check_shares(t);
            t += MS;
        }
        verdicts
    }

    /// Run for `duration`, with `demand(i, rng)` deciding whether replica `i` gets a request in
    /// a given millisecond.
    fn run(&mut self, duration: Micros, demand: impl FnMut(Micros, usize, &mut Rng) -> bool) {
        self.run_from(0, duration, demand);
    }

    fn run_from(
        &mut self,
        start: Micros,
        duration: Micros,
        mut demand: impl FnMut(Micros, usize, &mut Rng) -> bool,
    ) {
        let mut t = start;
        while t < duration {
            self.advance(t);
            for i in 0..self.replicas.len() {
                if self.replicas[i].alive && demand(t, i, &mut self.rng) {
                    let key = if self.rng.chance(80) {
                        "hot"
                    } else {
                        COLD_KEYS[self.rng.below(COLD_KEYS.len() as u64) as usize]
                    };
                    self.decide(i, key, 1, t);
                }
                if t.is_multiple_of(1000 * MS) {
                    self.replicas[i].sweep(t);
                }
            }
            // Now and then a burst on one key at one replica: it drains that replica's
            // sub-bucket while the others' stay full (and get dropped by their sweeps).
            if self.faults.bursts && self.rng.chance(1) && self.rng.chance(40) {
                let i = self.rng.below(self.replicas.len() as u64) as usize;
                if self.replicas[i].alive {
                    for _ in 0..60 {
                        self.decide(i, "burst", 1, t);
                    }
                }
            }
            self.check_shares(t);
            t += MS;
        }
    }

    /// The most admitted for any key over any window, minus what a bucket allows there.
    fn worst_excess(&self) -> f64 {
        let capacity = self.rate.capacity() as f64;
        let r = capacity / (self.rate.interval_ms() as f64 * 1e3); // tokens per µs
        let mut worst = f64::NEG_INFINITY;
        for admitted in self.admitted.values() {
            let mut best_start = f64::NEG_INFINITY; // max over a of (r·t_a − admitted before a)
            let mut before = 0.0;
            for &(t, tokens) in admitted {
                best_start = best_start.max(r * t as f64 - before);
                before += tokens as f64;
                // Admitted in [t_a, t] = before − before_a; allowed = C + r (t − t_a).
                worst = worst.max(before - r * t as f64 + best_start - capacity);
            }
        }
        worst
    }

    fn admitted_between(&self, from: Micros, to: Micros) -> u64 {
        self.admitted
            .get("hot")
            .into_iter()
            .flatten()
            .filter(|&&(t, _)| (from..to).contains(&t))
            .map(|&(_, n)| n)
            .sum()
    }
}

fn faults() -> impl Strategy<Value = (usize, Faults)> {
    (3usize..=5).prop_flat_map(|n| {
        (
            Just(n),
            0u64..30,
            0u64..40,
            prop::collection::vec((0u64..8_000, 100u64..4_000, 0..n), 0..3),
            prop::collection::vec(
                (
                    0u64..8_000,
                    0..n,
                    prop::option::of((100u64..3_000, any::<bool>())),
                ),
                0..3,
            ),
            prop::collection::vec((0u64..8_000, 0..n), 0..2),
        )
            .prop_map(
                |(n, drop_percent, max_delay_ms, partitions, crashes, leaves)| {
                    let partitions = partitions
                        .into_iter()
                        .map(|(start, len, who)| (start, start + len, who))
                        .collect();
                    (
                        n,
                        Faults {
                            drop_percent,
                            max_delay_ms,
                            partitions,
                            crashes,
                            leaves,
                            bursts: true,
                        },
                    )
                },
            )
    })
}

/// 128 cases in CI; `PROPTEST_CASES` asks for more (a long run: `PROPTEST_CASES=5000`).
fn simulated_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(simulated_cases()))]

    /// The property: in strict mode the sum of admitted tokens never exceeds the global
    /// limit over any window, however messages, clocks and replicas misbehave (within the
    /// stated fault model: replicas are cut off whole, not in one direction only).
    #[test]
    fn strict_never_admits_more_than_the_bucket_over_any_window(
        (n, faults) in faults(),
        seed in any::<u64>(),
        skewed in any::<bool>(),
    ) {
        let mut cluster = Cluster::new(n, seed, faults);
        // 2x the limit (20 requests/s), spread evenly or mostly to one replica, which changes
        // every 2 s (so shares keep moving).
        cluster.run(10_000 * MS, |t, i, rng| {
            let busy = (t / (2_000 * MS)) as usize % n;
            let per_mille = if skewed { if i == busy { 18 } else { 1 } } else { 20 / n as u64 };
            rng.below(1000) < per_mille
        });
        let excess = cluster.worst_excess();
        prop_assert!(excess <= 1e-6, "admitted {excess} tokens over the bucket in some window");
    }
}

#[test]
fn skewed_steady_load_uses_at_least_90_percent_of_the_limit() {
    let faults = Faults {
        drop_percent: 0,
        max_delay_ms: 2,
        partitions: vec![],
        crashes: vec![],
        leaves: vec![],
        bursts: false,
    };
    let mut cluster = Cluster::new(3, 42, faults);
    // 40 requests/s, all to replica 0: four times the limit (the hot key gets 80 %).
    cluster.run(30_000 * MS, |_, i, rng| i == 0 && rng.below(1000) < 40);
    let hot_share = 0.8;
    // Steady state: after the first interval (a new cluster starts with empty sub-buckets).
    let admitted = cluster.admitted_between(12_000 * MS, 30_000 * MS) as f64;
    let utilization = admitted / (CAPACITY as f64 * 18.0 / 10.0);
    assert!(
        utilization >= 0.9,
        "utilization {utilization:.3} (hot key gets {hot_share} of the requests)"
    );
    let excess = cluster.worst_excess();
    assert!(
        excess <= 1e-6,
        "admitted {excess} tokens over the bucket in some window"
    );
}

#[test]
fn a_crashed_replicas_share_is_reassigned_after_lease_and_guard() {
    let faults = Faults {
        drop_percent: 0,
        max_delay_ms: 2,
        partitions: vec![],
        crashes: vec![(3_000, 2, None)],
        leaves: vec![],
        bursts: false,
    };
    let mut cluster = Cluster::new(3, 7, faults);
    cluster.run(16_000 * MS, |_, i, rng| i == 0 && rng.below(1000) < 40);
    let version_before = cluster.replicas[0].node.allocation().unwrap().version;
    let members = &cluster.replicas[0].node.allocation().unwrap().members;
    assert_eq!(
        members.len(),
        2,
        "the crashed replica was dropped: {members:?}"
    );
    assert!(version_before.number >= 2);
    // Spending resumed: the last 8 seconds were served at (nearly) the full rate.
    let admitted = cluster.admitted_between(8_000 * MS, 16_000 * MS) as f64;
    assert!(
        admitted >= 0.9 * 80.0,
        "admitted {admitted} in the last 8 s"
    );
    assert!(cluster.worst_excess() <= 1e-6);
}

/// A crashed replica's process restarted on its snapshot directory says it takes over from the
/// dead replica (`lineage`): the survivors stop needing the dead one's answers at once, so
/// their spending goes on through the crash; a process that cannot say so (no directory) is
/// waited out for `lease + guard` while nobody spends, then every sub-bucket starts empty.
#[test]
fn a_crashed_replica_restarted_as_its_successor_stops_nobodys_spending() {
    // Replica 0's clients at half the limit (10 tokens per second); replica 2 crashes at 3 s and
    // its process is back 100 ms later.
    let served_around_the_crash = |successor: bool| {
        let faults = Faults {
            drop_percent: 0,
            max_delay_ms: 2,
            partitions: vec![],
            crashes: vec![(3_000, 2, Some((100, successor)))],
            leaves: vec![],
            bursts: false,
        };
        let mut cluster = Cluster::new(3, 7, faults);
        cluster.run(8_000 * MS, |_, i, rng| i == 0 && rng.below(1000) < 6);
        assert!(cluster.worst_excess() <= 1e-6);
        cluster.admitted_between(3_000 * MS, 6_000 * MS)
    };
    let with_successor = served_around_the_crash(true);
    let without = served_around_the_crash(false);
    // About 14 asked for on the key in the 3 s after the crash (Poisson, 6 a second, 80 % of
    // them on it), against 10 tokens a second.
    eprintln!("with a successor {with_successor}, without {without}");
    assert!(
        with_successor >= 10 && without + 4 <= with_successor,
        "admitted in the 3 s after the crash: {with_successor} when the restarted process takes          over, {without} when it does not"
    );
}

/// Every process start is a new replica with a record in the replicated control state, and
/// every replica relays every record it holds. A cluster living through rolling updates
/// (SIGTERM, then a new pod) and container restarts (a successor on the same snapshot
/// directory) must forget the replicas that left for good: otherwise each message carries
/// every replica the cluster ever had, and past 4096 of them (`Control::validate`) peers
/// refuse every message, and with them every bucket they carry. Here each of three replicas is
/// replaced every 1.2 s, alternately by a rolling update and by a crash and a successor, 60
/// times in all; the records stay those of the live replicas and the few just gone, the cluster
/// keeps allocating to its live replicas and serving, and never admits more than the bucket.
#[test]
fn replicas_that_left_for_good_are_forgotten_and_the_control_state_stays_small() {
    const REPLACEMENTS: u64 = 60;
    let mut leaves = Vec::new();
    let mut crashes = Vec::new();
    for k in 0..REPLACEMENTS {
        let (at, who) = (2_000 + k * 400, (k % 3) as usize);
        if k % 2 == 0 {
            // A rolling update: SIGTERM (the replica retires), then a new pod, a new replica.
            leaves.push((at, who));
            crashes.push((at + 1, who, Some((99, false))));
        } else {
            // The container restarted on its snapshot directory: a successor.
            crashes.push((at, who, Some((100, true))));
        }
    }
    let end_ms = 2_000 + REPLACEMENTS * 400 + 4_000;
    let faults = Faults {
        drop_percent: 0,
        max_delay_ms: 2,
        partitions: vec![],
        crashes,
        leaves,
        bursts: false,
    };
    let mut cluster = Cluster::new(3, 11, faults);
    cluster.run(end_ms * MS, |_, i, rng| i == 0 && rng.below(1000) < 6);
    assert!(cluster.worst_excess() <= 1e-6);
    let live: BTreeSet<u64> = cluster.replicas.iter().map(|r| r.node.me).collect();
    for replica in &cluster.replicas {
        let records: BTreeSet<u64> = replica.node.control.records.keys().copied().collect();
        eprintln!("replica {:x}: {} records", replica.node.me, records.len());
        assert!(
            records.len() <= 6,
            "replica {:x} holds {} records after {REPLACEMENTS} replacements: {records:x?}",
            replica.node.me,
            records.len()
        );
        assert!(
            records.is_superset(&live),
            "{records:x?} lacks one of {live:x?}"
        );
        let allocation = replica.node.allocation().expect("an allocation");
        assert_eq!(
            allocation.members, live,
            "the live replicas share the bucket"
        );
        replica.node.control.validate().unwrap();
    }
    // Still serving after the last replacement: the last 3 s at about the rate asked.
    let served = cluster.admitted_between((end_ms - 3_000) * MS, end_ms * MS);
    assert!(served >= 8, "admitted {served} in the last 3 s");
}

/// A uniform draw in [0, 1).
fn uniform(rng: &mut Rng) -> f64 {
    (rng.next() >> 11) as f64 / (1u64 << 53) as f64
}

/// Poisson arrivals at `per_second`, each at a replica drawn uniformly from `n`, rounded down to
/// the millisecond.
fn poisson_arrivals(
    per_second: f64,
    n: usize,
    duration: Micros,
    rng: &mut Rng,
) -> Vec<(Micros, usize)> {
    let mut arrivals = Vec::new();
    let mut t = 0.0;
    loop {
        t += -(1.0 - uniform(rng)).ln() * 1e6 / per_second;
        let at = t as Micros / MS * MS;
        if at >= duration {
            return arrivals;
        }
        arrivals.push((at, rng.below(n as u64) as usize));
    }
}

/// One arrival every `period` from a random phase, each at a replica drawn uniformly from `n`.
fn periodic_arrivals(
    period: Micros,
    n: usize,
    duration: Micros,
    rng: &mut Rng,
) -> Vec<(Micros, usize)> {
    let phase = rng.below(period / MS) * MS;
    (0..)
        .map(|k| phase + k * period)
        .take_while(|&at| at < duration)
        .map(|at| (at, rng.below(n as u64) as usize))
        .collect()
}

/// Strict mode's verdicts against the textbook bucket's on the same arrivals (fed from a full
/// bucket at 0), counting requests from `from` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VersusIdeal {
    requests: usize,
    ideal: usize,
    strict: usize,
    /// Admitted by the ideal bucket, refused by strict mode.
    missed: usize,
}

impl VersusIdeal {
    fn new(
        rate: Rate,
        cost: u64,
        arrivals: &[(Micros, usize)],
        verdicts: &[bool],
        from: Micros,
    ) -> Self {
        assert_eq!(arrivals.len(), verdicts.len());
        let mut ideal = ReferenceBucket::new_at(rate, 0);
        let mut counts = Self {
            requests: 0,
            ideal: 0,
            strict: 0,
            missed: 0,
        };
        for (&(at, _), &strict) in arrivals.iter().zip(verdicts) {
            let admits = ideal.try_consume_at(cost, at).allowed;
            if at < from {
                continue;
            }
            counts.requests += 1;
            counts.ideal += usize::from(admits);
            counts.strict += usize::from(strict);
            counts.missed += usize::from(admits && !strict);
        }
        counts
    }

    /// Of what the ideal bucket admits, the part strict mode admits too.
    fn kept(&self) -> f64 {
        1.0 - self.missed as f64 / self.ideal.max(1) as f64
    }
}

/// The positive root of `ρ·(e^θ − 1) = θ`: the decay rate of a Poisson-fed bucket's deficit
/// (Lundberg's exponent for cost-1 requests at `ρ` of the refill).
fn lundberg(load: f64) -> f64 {
    let (mut low, mut high) = (1e-12_f64, 64.0_f64);
    for _ in 0..200 {
        let mid = (low + high) / 2.0;
        if load * (mid.exp() - 1.0) < mid {
            low = mid;
        } else {
            high = mid;
        }
    }
    low
}

/// docs/crdt.md, "strict mode", utilization: the part of its requests a bucket of `tokens`
/// refuses at most, fed Poisson requests of one token at `load` of its refill:
/// `(1 − ρ)·q / (1 − ρ·q)` with `q = e^(−θ(ρ)·(B − 1))`.
fn refused_at_most(load: f64, tokens: f64) -> f64 {
    if load >= 1.0 {
        return 1.0;
    }
    let q = (-lundberg(load) * (tokens - 1.0)).exp().min(1.0);
    (1.0 - load) * q / (1.0 - load * q)
}

/// The brief's cluster: three replicas on a quiet network, 20 tokens per second, one client at
/// `load` of the limit whose requests each go to a random replica (Poisson, then periodic),
/// for two minutes. After the shares settle, strict mode refuses no more of what the ideal
/// bucket admits than the documented bound for the shares in force allows (plus three
/// standard deviations of a count with that mean, plus one, for a finite run), and at least
/// `kept` of it is admitted. Returns what each pattern kept.
fn assert_under_limit_bound(load: f64, kept: f64) -> Vec<(&'static str, VersusIdeal)> {
    const REPLICAS: usize = 3;
    const DURATION: Micros = 120_000 * MS;
    // The first allocation (under a second here), then the demand window (4 s), a rebalance
    // period (1 s) and one refill interval (1 s) for a grown share to fill.
    const SETTLED: Micros = 7_000 * MS;
    let rate = Rate::try_new(20, 1000).unwrap();
    let per_second = load * 20.0;
    let mut rng = Rng(2024);
    let patterns = [
        (
            "poisson",
            poisson_arrivals(per_second, REPLICAS, DURATION, &mut rng),
        ),
        (
            "periodic",
            periodic_arrivals(
                (1e6 / per_second) as Micros / MS * MS,
                REPLICAS,
                DURATION,
                &mut rng,
            ),
        ),
    ];
    let mut failures = Vec::new();
    let mut figures = Vec::new();
    for (pattern, arrivals) in patterns {
        let faults = Faults {
            drop_percent: 0,
            max_delay_ms: 2,
            partitions: vec![],
            crashes: vec![],
            leaves: vec![],
            bursts: false,
        };
        let mut cluster = Cluster::with_rate(REPLICAS, 11, faults, rate);
        let verdicts = cluster.serve("client", 1, &arrivals, DURATION);
        let whole = VersusIdeal::new(rate, 1, &arrivals, &verdicts, 0);
        let settled = VersusIdeal::new(rate, 1, &arrivals, &verdicts, SETTLED);
        let excess = cluster.worst_excess();
        assert!(
            excess <= 1e-6,
            "{pattern}: admitted {excess} tokens over the bucket in some window"
        );
        // The bound for the shares in force: each replica gets a third of the requests.
        let shares: Vec<f64> = cluster
            .replicas
            .iter()
            .map(|r| f64::from(r.history.current()) / f64::from(WHOLE))
            .collect();
        let spread = 1.0 / REPLICAS as f64;
        let bound: f64 = shares
            .iter()
            .map(|&u| spread * refused_at_most(load * spread / u, u * 20.0))
            .sum();
        let expected = bound * settled.ideal as f64;
        let allowed = expected + 3.0 * expected.sqrt() + 1.0;
        let line = format!(
            "{pattern} at {:.0} % of the limit: kept {:.2} % after {} s ({settled:?}), \
             bound {:.3} % refused ({allowed:.1} allowed), shares {shares:?}; whole run {whole:?}",
            100.0 * load,
            100.0 * settled.kept(),
            SETTLED / 1_000_000,
            100.0 * bound,
        );
        eprintln!("{line}");
        if settled.missed as f64 > allowed || settled.kept() < kept {
            failures.push(line);
        }
        figures.push((pattern, settled));
    }
    assert!(
        failures.is_empty(),
        "strict refused more of what the ideal bucket admits than the bound allows:\n{}",
        failures.join("\n")
    );
    figures
}

/// The brief's bug: on main, 22 % of a half-limit client's requests were refused (75 % and
/// 85 % kept here, with demand measured over 500 ms and shares jumping between 2 % and 96 %).
#[test]
fn a_client_at_half_its_limit_on_random_replicas_is_admitted_as_the_ideal_bucket_admits_it() {
    assert_under_limit_bound(0.5, 0.99);
}

/// At 90 % of the limit a third of the bucket per replica costs a few percent (the bound is
/// 4.3 % refused); measured, not a target.
#[test]
fn a_client_at_90_percent_of_its_limit_on_random_replicas_loses_no_more_than_the_bound() {
    assert_under_limit_bound(0.9, 0.0);
}

/// The accuracy harness's clients (docs/accuracy.md): a bucket of 10 tokens per second, each
/// request costing 5, at `load` of the limit, each request at a random one of three replicas,
/// Poisson then periodic, for two minutes; with or without loans. Returns, per pattern, the
/// verdicts after the shares settle against the ideal bucket's, and the worst excess over the
/// bucket in any window.
fn half_bucket_requests(load: f64, loans: bool) -> Vec<(&'static str, VersusIdeal, f64)> {
    const REPLICAS: usize = 3;
    const DURATION: Micros = 120_000 * MS;
    const SETTLED: Micros = 7_000 * MS;
    const COST: u64 = 5;
    let rate = Rate::try_new(10, 1000).unwrap();
    let per_second = load * 10.0 / COST as f64;
    let mut rng = Rng(77);
    let patterns = [
        (
            "poisson",
            poisson_arrivals(per_second, REPLICAS, DURATION, &mut rng),
        ),
        (
            "periodic",
            periodic_arrivals((1e6 / per_second) as Micros, REPLICAS, DURATION, &mut rng),
        ),
    ];
    patterns
        .into_iter()
        .map(|(pattern, arrivals)| {
            let faults = Faults {
                drop_percent: 0,
                max_delay_ms: 2,
                partitions: vec![],
                crashes: vec![],
                leaves: vec![],
                bursts: false,
            };
            let mut cluster = Cluster::with_rate(REPLICAS, 11, faults, rate);
            cluster.loans = loans;
            let verdicts = cluster.serve("client", COST, &arrivals, DURATION);
            let settled = VersusIdeal::new(rate, COST, &arrivals, &verdicts, SETTLED);
            let excess = cluster.worst_excess();
            eprintln!(
                "{pattern} at {:.0} % of the limit, loans {loans}: kept {:.2} % ({settled:?}), \
                 worst excess {excess:.6}",
                100.0 * load,
                100.0 * settled.kept()
            );
            (pattern, settled, excess)
        })
        .collect()
}

/// The measurement, strict mode: a client spending 5 of its 10 tokens once a second
/// on random replicas was refused 12 to 33 % of the time, since no replica's third of the
/// bucket (3.3 tokens) can ever pay 5. With loans, a replica short of tokens borrows the rest
/// from its peers' shares: it is admitted whenever the ideal bucket admits it (the first
/// seconds aside, while the first allocation fills).
#[test]
fn a_client_spending_half_its_bucket_per_request_on_random_replicas_is_admitted_as_the_ideal_bucket_admits_it()
 {
    for (pattern, settled, excess) in half_bucket_requests(0.5, true) {
        assert!(
            settled.kept() >= 0.99,
            "{pattern}: kept {:.2} % of what the ideal bucket admits: {settled:?}",
            100.0 * settled.kept()
        );
        assert!(
            excess <= 1e-6,
            "{pattern}: admitted {excess} over the bucket"
        );
    }
    // Without loans nothing of cost 5 is ever admitted: the test can tell.
    for (pattern, settled, _) in half_bucket_requests(0.5, false) {
        assert_eq!(settled.strict, 0, "{pattern}: {settled:?}");
    }
}

/// At 90 % of the limit the same client keeps nearly all it would get from one bucket: a
/// sub-bucket that is full while another is not loses its refill (docs/crdt.md), which is
/// what stands between loans and the ideal. Measured, and held to 97 %.
#[test]
fn a_client_spending_half_its_bucket_per_request_at_90_percent_loses_little_to_loans() {
    for (pattern, settled, excess) in half_bucket_requests(0.9, true) {
        assert!(
            settled.kept() >= 0.97,
            "{pattern}: kept {:.2} % of what the ideal bucket admits: {settled:?}",
            100.0 * settled.kept()
        );
        assert!(
            excess <= 1e-6,
            "{pattern}: admitted {excess} over the bucket"
        );
    }
}

#[test]
fn a_replica_without_a_lease_shows_none_left_not_the_time_since_the_epoch() {
    // Found in /status: a replica that never had a lease showed -1796609974139 ms (0 minus
    // the steady clock).
    let clock = std::sync::Arc::new(crate::clock::ManualClock::at(1_796_609_974_139_000));
    let escrow = super::Escrow::new(crate::crdt::ReplicaId(1), Params::default(), clock);
    assert_eq!(escrow.status().lease_remaining_ms, 0);
}

/// Found by `strict_never_admits_more_than_the_bucket_over_any_window` once restarted processes
/// could take over from the crashed replica: replica 0, cut off, proposed an allocation without
/// the crashed one; meanwhile the others gave its successor a share in theirs. Back, replica 0's
/// allocation (numbered higher) won, and replica 0 raised to it without waiting for the
/// successor, which it had never heard (and which was cut off in turn, still spending under
/// the others' allocation until its lease ran out). A replica now also waits for replicas it
/// has only heard of.
#[test]
fn a_replica_waits_for_a_successor_it_has_only_heard_of_before_raising() {
    let faults = Faults {
        drop_percent: 12,
        max_delay_ms: 11,
        partitions: vec![(3449, 5787, 0), (5112, 5851, 1)],
        crashes: vec![(2961, 1, Some((517, true)))],
        leaves: vec![(1288, 3)],
        bursts: true,
    };
    let n = 5;
    let mut cluster = Cluster::new(n, 18_143_377_027_945_839_230, faults);
    // Checks after every millisecond that the spendable shares sum to at most the whole.
    cluster.run(10_000 * MS, |_, _, rng| rng.below(1000) < 20 / n as u64);
    assert!(cluster.worst_excess() <= 1e-6);
}
