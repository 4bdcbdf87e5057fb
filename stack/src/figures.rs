//! The figures a scenario is judged by, computed from its [`Outcome`] (pure: the report prints
//! them, the end-to-end tests assert on them):
//!
//! - **per-pod rate after each scale-up settles** against the HPA's target (or load / pods when
//!   the HPA is at its maximum);
//! - **time from an HPA decision to a ready pod** for every scale-up (and from a kill to the
//!   pod ready again);
//! - **refusals of under-limit clients** (the witnesses), overall and around every join and
//!   leave;
//! - **hot-key admissions against the textbook bucket** around every join and leave, within the
//!   `shared` bounds of docs/crdt.md;
//! - **scale-down only after the stabilization window**;
//! - **`HPAReplicaStuck`** silent.

use std::time::Duration;

use crate::deployment::EventKind;
use crate::scenario::{HPA_TARGET_PER_POD, Outcome, ReplicaCounts};
use crate::witness::Tally;

/// Per-pod rate within this share of its expectation once settled.
pub const PER_POD_TOLERANCE: f64 = 0.10;
/// The HPA's scale-down stabilization window (deploy/base/limiter/hpa.yaml), scenario seconds.
pub const STABILIZATION_S: f64 = 300.0;
/// Sync interval and the delivery of a message on loopback: `D` of docs/crdt.md.
pub const REPLICATION_DELAY: Duration = Duration::from_millis(100);
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// A membership change's window: from this long before it (real time)...
pub const CHANGE_BEFORE: Duration = Duration::from_secs(1);
/// ...to this long after.
pub const CHANGE_AFTER: Duration = Duration::from_secs(3);

/// The per-pod rate over one stretch with the Deployment settled above its starting size.
#[derive(Debug, Clone, PartialEq)]
pub struct SettledRate {
    /// Scenario seconds: the stretch measured (after one rate window from the last change).
    pub from_s: f64,
    pub to_s: f64,
    pub pods: usize,
    /// Median over the samples of the fleet rate divided by the ready pods.
    pub per_pod: f64,
    /// What it should be: the HPA target, or fleet / pods when the HPA is at its maximum.
    pub expected: f64,
    /// The largest distance of one pod's own rate from `per_pod`, as a share of it.
    pub pod_spread: f64,
    pub samples: usize,
}

impl SettledRate {
    pub fn deviation(&self) -> f64 {
        (self.per_pod - self.expected).abs() / self.expected
    }

    pub fn ok(&self) -> bool {
        self.deviation() <= PER_POD_TOLERANCE
    }
}

/// From an HPA decision (or a kill) to the pods ready.
#[derive(Debug, Clone, PartialEq)]
pub struct ToReady {
    /// Scenario seconds of the decision (or kill).
    pub at_s: f64,
    /// What was asked: `3 -> 5`, or `kill -9 limiter-2`.
    pub what: String,
    /// Scenario seconds until as many pods were ready as asked; `None`: never.
    pub after_s: Option<f64>,
}

/// One join or leave, and what the witnesses saw around it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub at_s: f64,
    pub pod: String,
    /// `joined` (ready), `leaving` (SIGTERM), `left` (exited), `killed`, `restarted` (ready
    /// after a restart), `not ready` and `ready again` (the readiness probe).
    pub what: &'static str,
    /// Scenario seconds of the window.
    pub from_s: f64,
    pub to_s: f64,
    /// Most pods running in the window (the `N` of the bounds).
    pub pods: usize,
    /// Under-limit witness refusals in the window.
    pub under_limit_refused: u64,
    /// The hot witness keys together.
    pub hot: Tally,
    /// Over-admission allowed: `C + r·T + O` for the window.
    pub upper: f64,
    /// Under-admission allowed: ideal − `U`.
    pub lower: f64,
}

impl Change {
    pub fn ok(&self) -> bool {
        self.under_limit_refused == 0
            && (self.hot.admitted as f64) <= self.upper
            && (self.hot.admitted as f64) >= self.lower
    }
}

/// A scale-down and the recommendations of the window before it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleDown {
    pub at_s: f64,
    pub from: i32,
    pub to: i32,
    /// The highest recommendation in the stabilization window before it.
    pub highest_in_window: i32,
    /// Scenario seconds since the last recommendation of `from` or more.
    pub since_last_high_s: f64,
}

impl ScaleDown {
    pub fn ok(&self) -> bool {
        self.highest_in_window <= self.to
    }
}

/// Every figure of a scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    pub settled: Vec<SettledRate>,
    pub to_ready: Vec<ToReady>,
    pub changes: Vec<Change>,
    /// Under-limit witness refusals: (key, scenario seconds).
    pub under_limit_refusals: Vec<(String, f64)>,
    /// Witness requests that got no decision.
    pub witness_errors: u64,
    /// The hot witness keys over the whole run.
    pub hot_total: Tally,
    pub scale_downs: Vec<ScaleDown>,
    /// `HPAReplicaStuck` spans (pending, or worse).
    pub hpa_stuck: usize,
    pub hpa_stuck_fired: usize,
}

impl Figures {
    pub fn of(o: &Outcome) -> Figures {
        let witness = witness_figures(o);
        Figures {
            settled: settled_rates(o),
            to_ready: to_ready(o),
            changes: witness.0,
            under_limit_refusals: witness.1,
            witness_errors: witness.2,
            hot_total: witness.3,
            scale_downs: scale_downs(o),
            hpa_stuck: o.alert("HPAReplicaStuck").len(),
            hpa_stuck_fired: o
                .alert("HPAReplicaStuck")
                .iter()
                .filter(|a| a.firing_at.is_some())
                .count(),
        }
    }
}

/// The counts in force at scenario time `t`.
fn counts_at(o: &Outcome, t: f64) -> Option<ReplicaCounts> {
    o.replica_counts.iter().rev().find(|c| c.t <= t).copied()
}

fn settled_rates(o: &Outcome) -> Vec<SettledRate> {
    let start = o.replicas;
    let window = 60.0 + 2.0 * o.scrape_interval.as_secs_f64() * o.time_scale;
    let loaded: Vec<(f64, f64)> = o
        .phases
        .iter()
        .filter(|p| p.summary.is_some())
        .map(|p| (p.start_s, p.end_s))
        .collect();
    let mut out = Vec::new();
    for (i, c) in o.replica_counts.iter().enumerate() {
        let settled = c.desired == c.ready && c.running == c.ready && c.ready > start;
        if !settled {
            continue;
        }
        let end = o.replica_counts.get(i + 1).map_or(f64::MAX, |n| n.t);
        for &(p0, p1) in &loaded {
            let from = c.t.max(p0) + window;
            let to = end.min(p1);
            if to - from < window {
                continue;
            }
            let mut per_pod = Vec::new();
            let mut spread: f64 = 0.0;
            for s in o.samples.iter().filter(|s| s.t >= from && s.t <= to) {
                let Some(fleet) = s.get("rps") else { continue };
                let mean = fleet / c.ready as f64;
                per_pod.push(mean);
                for (name, v) in &s.values {
                    if name.starts_with("rps:pod=") && mean > 0.0 {
                        spread = spread.max((v - mean).abs() / mean);
                    }
                }
            }
            if per_pod.is_empty() {
                continue;
            }
            per_pod.sort_by(f64::total_cmp);
            let median = per_pod[per_pod.len() / 2];
            let at_max = c.desired as i32 >= o.hpa_max_replicas;
            out.push(SettledRate {
                from_s: from,
                to_s: to,
                pods: c.ready,
                per_pod: median,
                expected: if at_max { median } else { HPA_TARGET_PER_POD },
                pod_spread: spread,
                samples: per_pod.len(),
            });
        }
    }
    out
}

fn to_ready(o: &Outcome) -> Vec<ToReady> {
    let mut out = Vec::new();
    for e in &o.pod_events {
        let (want, what) = match &e.kind {
            EventKind::Scaled(from, to) if to > from && e.t >= 0.0 => {
                (*to, format!("{from} -> {to}"))
            }
            EventKind::Killed => {
                let before = counts_at(o, e.t - 1e-9).map_or(0, |c| c.ready);
                (before, format!("kill -9 {}", e.pod))
            }
            _ => continue,
        };
        let after_s = o
            .replica_counts
            .iter()
            .find(|c| c.t > e.t && c.ready >= want)
            .map(|c| c.t - e.t);
        out.push(ToReady {
            at_s: e.t,
            what,
            after_s,
        });
    }
    out
}

type WitnessFigures = (Vec<Change>, Vec<(String, f64)>, u64, Tally);

fn witness_figures(o: &Outcome) -> WitnessFigures {
    let Some(w) = &o.witness else {
        return (Vec::new(), Vec::new(), 0, Tally::default());
    };
    let k = o.time_scale;
    let to_scenario = |real: f64| o.witness_start_s + real * k;
    let to_real = |scenario: f64| (scenario - o.witness_start_s) / k;
    let c = w.plan.capacity as f64;
    let r = w.plan.refill_rate();
    let hot_in = |from: f64, to: f64| {
        let mut t = Tally::default();
        for (i, _) in w.hot_keys() {
            let x = w.tally(i, from, to);
            t.decided += x.decided;
            t.admitted += x.admitted;
            t.ideal += x.ideal;
            t.refused += x.refused;
            t.errors += x.errors;
        }
        t
    };
    let hot_keys = w.hot_keys().count() as f64;
    let refusals: Vec<(String, f64)> = w
        .under_limit_refusals()
        .into_iter()
        .map(|(key, t)| (key, to_scenario(t)))
        .collect();
    let end_real = w.arrivals.last().map_or(0.0, |a| a.sent_s);
    let mut changes = Vec::new();
    let mut started_before: Vec<String> = Vec::new();
    let mut restarted: Vec<String> = Vec::new();
    for e in &o.pod_events {
        let what = match &e.kind {
            EventKind::Restarted => {
                restarted.push(e.pod.clone());
                continue;
            }
            EventKind::Ready if e.t < 0.0 => {
                started_before.push(e.pod.clone());
                continue;
            }
            EventKind::Ready if restarted.contains(&e.pod) => {
                restarted.retain(|p| *p != e.pod);
                "restarted"
            }
            EventKind::Ready if started_before.contains(&e.pod) => "ready again",
            EventKind::Ready => {
                started_before.push(e.pod.clone());
                "joined"
            }
            EventKind::NotReady => "not ready",
            EventKind::Terminating => "leaving",
            EventKind::Stopped(_) => "left",
            EventKind::Killed => "killed",
            _ => continue,
        };
        let from_real = (to_real(e.t) - CHANGE_BEFORE.as_secs_f64()).max(0.0);
        let to_real_ = (to_real(e.t) + CHANGE_AFTER.as_secs_f64()).min(end_real);
        if to_real_ <= from_real {
            continue;
        }
        let (from_s, to_s) = (to_scenario(from_real), to_scenario(to_real_));
        let pods = o
            .replica_counts
            .iter()
            .filter(|c| c.t <= to_s)
            .rev()
            .take_while(|c| c.t >= from_s)
            .map(|c| c.running)
            .chain(counts_at(o, from_s).map(|c| c.running))
            .max()
            .unwrap_or(1)
            .max(1);
        let killed = o
            .pod_events
            .iter()
            .filter(|x| x.kind == EventKind::Killed && x.t >= from_s - 1.0 && x.t <= to_s)
            .count() as f64;
        let hot = hot_in(from_real, to_real_);
        let d = REPLICATION_DELAY.as_secs_f64();
        let sync = SYNC_INTERVAL.as_secs_f64();
        let n1 = (pods - 1) as f64;
        let span = to_real_ - from_real;
        let over = n1 * (c + r * d) + killed * (c + r * sync);
        let upper = hot_keys * (c + r * span + over);
        let lower = hot.ideal as f64 - hot_keys * n1 * (c + r * d);
        let under_limit_refused = refusals
            .iter()
            .filter(|(_, t)| *t >= from_s && *t < to_s)
            .count() as u64;
        changes.push(Change {
            at_s: e.t,
            pod: e.pod.clone(),
            what,
            from_s,
            to_s,
            pods,
            under_limit_refused,
            hot,
            upper,
            lower,
        });
    }
    let errors = w
        .arrivals
        .iter()
        .filter(|a| a.decision == crate::witness::Decision::Error)
        .count() as u64;
    (changes, refusals, errors, hot_in(0.0, f64::MAX))
}

fn scale_downs(o: &Outcome) -> Vec<ScaleDown> {
    let mut out = Vec::new();
    for s in o.syncs.iter().filter(|s| s.desired < s.current) {
        // The controller keeps recommendations strictly younger than the window.
        let highest = o
            .syncs
            .iter()
            .filter(|x| x.at_s > s.at_s - STABILIZATION_S + 1e-6 && x.at_s <= s.at_s)
            .map(|x| x.proposed)
            .max()
            .unwrap_or(s.proposed);
        let last_high = o
            .syncs
            .iter()
            .filter(|x| x.at_s < s.at_s && x.proposed >= s.current)
            .map(|x| x.at_s)
            .fold(f64::MIN, f64::max);
        out.push(ScaleDown {
            at_s: s.at_s,
            from: s.current,
            to: s.desired,
            highest_in_window: highest,
            since_last_high_s: s.at_s - last_high,
        });
    }
    out
}
