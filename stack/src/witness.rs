//! Witness clients: a few keys of a policy of their own, sent at fixed rates through the
//! Service for the whole scenario, each request's send time and decision kept, so that what the
//! replicas decided can be compared, key by key, with the textbook token bucket fed the same
//! arrivals, across every join and leave of the Deployment (the load generator counts
//! decisions over all keys together, which says nothing about one client).
//!
//! - **Under-limit** keys, each at a fixed share of its limit below 1: the textbook bucket
//!   admits every request, and so must the replicas (docs/crdt.md: a replica refuses only for
//!   consumption that happened). Any refusal is a failure.
//! - **Hot** keys, above their limit: the replicas admit about what the textbook bucket admits,
//!   within the `shared` bounds of docs/crdt.md.
//!
//! The policy is small ([`POLICY`]: 100 tokens refilled over 5 s) so that about a hundred
//! requests per second make the point. Requests go round-robin to the Service's endpoints at
//! the moment each leaves, as the load generator's do.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openclaw_loadgen::Endpoints;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The witnesses' policy: name, capacity, refill interval (ms). 100 tokens refilled over 5 s
/// (20/s): an under-limit key at 80 % (16/s) keeps its bucket near full, so it is refused only
/// if replicas count about 100 tokens it never spent (a join or leave counting consumption
/// twice), not for a replication delay of a second or two on a busy machine (a replica may
/// refuse for what the others admitted within one replication delay, docs/crdt.md).
pub const POLICY: (&str, u64, u64) = ("witness", 100, 5000);

/// One witness key.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub key: String,
    /// Requests per second.
    pub rate: f64,
    /// Under its limit (every request must be admitted) or hot.
    pub hot: bool,
}

/// The witnesses of a scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub policy: String,
    pub capacity: u64,
    pub refill_interval: Duration,
    pub keys: Vec<Key>,
}

impl Plan {
    /// `under` keys at 80 % of their limit and `hot` keys at 180 %.
    pub fn standard(under: usize, hot: usize) -> Plan {
        let (policy, capacity, refill_ms) = POLICY;
        let limit = capacity as f64 * 1000.0 / refill_ms as f64;
        let mut keys = Vec::new();
        for i in 0..under {
            keys.push(Key {
                key: format!("under-{i}"),
                rate: 0.8 * limit,
                hot: false,
            });
        }
        for i in 0..hot {
            keys.push(Key {
                key: format!("hot-{i}"),
                rate: 1.8 * limit,
                hot: true,
            });
        }
        Plan {
            policy: policy.to_owned(),
            capacity,
            refill_interval: Duration::from_millis(refill_ms),
            keys,
        }
    }

    /// Requests per second, all keys together.
    pub fn rate(&self) -> f64 {
        self.keys.iter().map(|k| k.rate).sum()
    }

    /// Tokens per second.
    pub fn refill_rate(&self) -> f64 {
        self.capacity as f64 / self.refill_interval.as_secs_f64()
    }
}

/// What one request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Rejected,
    /// No decision (no endpoint, connection refused, timeout, other status).
    Error,
}

/// One request: which key, when it left (real seconds since the start), what it got.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrival {
    pub key: usize,
    pub sent_s: f64,
    pub decision: Decision,
}

/// Everything the witnesses saw.
#[derive(Debug, Clone)]
pub struct Record {
    pub plan: Plan,
    /// When the witnesses started.
    pub start: Instant,
    /// By send time.
    pub arrivals: Vec<Arrival>,
}

/// Sends until `stop` turns true.
pub async fn run(
    plan: Plan,
    endpoints: Endpoints,
    http: reqwest::Client,
    mut stop: watch::Receiver<bool>,
) -> Record {
    let start = Instant::now();
    let arrivals: Arc<Mutex<Vec<Arrival>>> = Arc::default();
    let mut senders = JoinSet::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for (index, key) in plan.keys.iter().enumerate() {
        let period = Duration::from_secs_f64(1.0 / key.rate);
        // Keys out of phase with each other.
        let offset = period.mul_f64(index as f64 / plan.keys.len().max(1) as f64);
        let query = format!("/rate?key={}&policy={}", key.key, plan.policy);
        let (endpoints, http, arrivals, next) = (
            endpoints.clone(),
            http.clone(),
            arrivals.clone(),
            next.clone(),
        );
        let mut stop = stop.clone();
        senders.spawn(async move {
            let mut ticker = tokio::time::interval_at((start + offset).into(), period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut requests = JoinSet::new();
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                let sent_s = start.elapsed().as_secs_f64();
                let targets = endpoints.current();
                let target = (!targets.is_empty()).then(|| {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    targets[i % targets.len()].clone()
                });
                let (http, arrivals, query) = (http.clone(), arrivals.clone(), query.clone());
                requests.spawn(async move {
                    let decision = match target {
                        None => Decision::Error,
                        Some(t) => match http.get(format!("{t}{query}")).send().await {
                            Ok(r) if r.status() == 200 => Decision::Allowed,
                            Ok(r) if r.status() == 429 => Decision::Rejected,
                            _ => Decision::Error,
                        },
                    };
                    arrivals
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Arrival {
                            key: index,
                            sent_s,
                            decision,
                        });
                });
                // Reap finished requests as we go.
                while requests.try_join_next().is_some() {}
            }
            while requests.join_next().await.is_some() {}
        });
    }
    let _ = stop.wait_for(|s| *s).await;
    while senders.join_next().await.is_some() {}
    let mut arrivals = std::mem::take(&mut *arrivals.lock().unwrap_or_else(|p| p.into_inner()));
    arrivals.sort_by(|a, b| a.sent_s.total_cmp(&b.sent_s));
    Record {
        plan,
        start,
        arrivals,
    }
}

/// The textbook token bucket (full at the start, continuous refill): for each arrival of one
/// key (sorted by time, cost 1), whether it admits it.
pub fn ideal_admissions(arrivals: &[f64], capacity: f64, rate: f64) -> Vec<bool> {
    let mut level = capacity;
    let mut last = arrivals.first().copied().unwrap_or(0.0);
    arrivals
        .iter()
        .map(|&t| {
            level = (level + rate * (t - last).max(0.0)).min(capacity);
            last = t;
            if level >= 1.0 {
                level -= 1.0;
                true
            } else {
                false
            }
        })
        .collect()
}

/// Per key, in a window of real seconds `[from, to)`: (arrivals with a decision, admitted,
/// admitted by the textbook bucket fed every decided arrival of the run, refused).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    pub decided: u64,
    pub admitted: u64,
    pub ideal: u64,
    pub refused: u64,
    pub errors: u64,
}

impl Record {
    /// The tally of key `index` over `[from, to)` (real seconds since the start).
    pub fn tally(&self, index: usize, from: f64, to: f64) -> Tally {
        let mine: Vec<&Arrival> = self
            .arrivals
            .iter()
            .filter(|a| a.key == index && a.decision != Decision::Error)
            .collect();
        let times: Vec<f64> = mine.iter().map(|a| a.sent_s).collect();
        let ideal = ideal_admissions(&times, self.plan.capacity as f64, self.plan.refill_rate());
        let mut t = Tally::default();
        for (a, ideal) in mine.iter().zip(ideal) {
            if a.sent_s < from || a.sent_s >= to {
                continue;
            }
            t.decided += 1;
            match a.decision {
                Decision::Allowed => t.admitted += 1,
                Decision::Rejected => t.refused += 1,
                Decision::Error => {}
            }
            t.ideal += u64::from(ideal);
        }
        t.errors = self
            .arrivals
            .iter()
            .filter(|a| {
                a.key == index && a.decision == Decision::Error && a.sent_s >= from && a.sent_s < to
            })
            .count() as u64;
        t
    }

    /// Refusals of under-limit keys: (key, real seconds since the start).
    pub fn under_limit_refusals(&self) -> Vec<(String, f64)> {
        self.arrivals
            .iter()
            .filter(|a| a.decision == Decision::Rejected && !self.plan.keys[a.key].hot)
            .map(|a| (self.plan.keys[a.key].key.clone(), a.sent_s))
            .collect()
    }

    pub fn hot_keys(&self) -> impl Iterator<Item = (usize, &Key)> {
        self.plan.keys.iter().enumerate().filter(|(_, k)| k.hot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_textbook_bucket_admits_capacity_then_the_refill() {
        // 10 tokens, 10 per second, 100 requests in one second: 10 + about 10.
        let times: Vec<f64> = (0..100).map(|i| f64::from(i) * 0.01).collect();
        let admitted = ideal_admissions(&times, 10.0, 10.0)
            .iter()
            .filter(|a| **a)
            .count();
        assert!((19..=20).contains(&admitted), "{admitted}");
        // Under the limit: everything.
        let slow: Vec<f64> = (0..100).map(|i| f64::from(i) * 0.125).collect();
        assert!(ideal_admissions(&slow, 10.0, 10.0).iter().all(|a| *a));
    }

    #[test]
    fn a_tally_compares_each_key_with_its_own_ideal_bucket() {
        let plan = Plan {
            policy: "w".into(),
            capacity: 2,
            refill_interval: Duration::from_secs(1),
            keys: vec![
                Key {
                    key: "a".into(),
                    rate: 10.0,
                    hot: true,
                },
                Key {
                    key: "b".into(),
                    rate: 1.0,
                    hot: false,
                },
            ],
        };
        let arrival = |key, sent_s, decision| Arrival {
            key,
            sent_s,
            decision,
        };
        let record = Record {
            plan,
            start: Instant::now(),
            arrivals: vec![
                arrival(0, 0.0, Decision::Allowed),
                arrival(0, 0.1, Decision::Allowed),
                arrival(0, 0.2, Decision::Allowed),
                arrival(1, 0.3, Decision::Rejected),
                arrival(0, 0.4, Decision::Error),
            ],
        };
        let t = record.tally(0, 0.0, 1.0);
        assert_eq!((t.decided, t.admitted, t.ideal, t.errors), (3, 3, 2, 1));
        assert_eq!(record.under_limit_refusals(), [("b".to_owned(), 0.3)]);
    }
}
