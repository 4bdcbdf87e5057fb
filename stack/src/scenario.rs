//! A load scenario on a running [`Stack`], measured from every side.
//!
//! While the phases of a [`Profile`] run one after the other (each one a run of the project's
//! load generator against every replica, with failover), three things happen in parallel:
//! - the HPA simulator (`metrics_adapter::hpa_sim`) syncs `deploy/base/limiter/hpa.yaml`
//!   against the metrics adapter every 15 s of scenario time, as the controller would;
//! - a sampler asks Prometheus, every few seconds of scenario time, for the request rate (fleet
//!   and per pod), the rejected share, token depletion and usage, replication lag per peer and
//!   target health, and polls `/api/v1/alerts` to note when each alert went pending, firing
//!   and resolved;
//! - optionally, one replica is SIGKILLed at a given scenario time.
//!
//! Scenario time is simulated time: real time multiplied by the stack's time scale, so that a
//! compressed run reads like an uncompressed one. Rates are never compressed (see
//! [`crate::timescale`]).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use metrics_adapter::hpa_sim::{self, HpaSimulator, SyncRecord};
pub use openclaw_loadgen::Summary;
use openclaw_loadgen::{Drive, Keys, Plan, Progress, RateProfile, Spread};
use serde_json::Value;
use tokio::sync::watch;

use crate::deployment::{Event, EventKind};
use crate::kube_state::HpaState;
use crate::prometheus::{LIMITER_JOB, PromApi};
use crate::stack::Stack;
use crate::timescale::{TimeScale, format_duration};
use crate::witness;
use crate::{Error, Result};

/// The per-pod request rate the HPA targets (`averageValue: "800"` in `hpa.yaml`).
pub const HPA_TARGET_PER_POD: f64 = 800.0;
/// Requests per second on each hot key in the overload phase, at least: 1.8 times the default
/// policy's refill (1000 tokens/s), so a full bucket drains in 1.25 s.
pub const HOT_KEY_RATE: f64 = 1800.0;

/// Load of one phase (the load generator's; the witnesses run beside it throughout).
#[derive(Debug, Clone, PartialEq)]
pub struct Load {
    /// Requests per second, all pods together (the Service spreads them over the ready pods).
    pub rate: f64,
    pub keys: Keys,
}

/// One phase of a scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub name: String,
    /// What it is for, in words (goes into the report).
    pub purpose: String,
    /// Scenario (simulated) time.
    pub duration: Duration,
    /// `None`: no load from the load generator.
    pub load: Option<Load>,
}

/// A named sequence of phases, and the witness clients that run through all of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    pub phases: Vec<Phase>,
    pub witness: witness::Plan,
}

/// The profiles `--profile` accepts.
pub const PROFILES: &[(&str, &str)] = &[
    (
        "standard",
        "baseline 2m, spike 2m, overload on hot keys 7m, load stopped 9m (20 min of scenario time)",
    ),
    (
        "quick",
        "baseline 1m, spike 1.5m, overload on hot keys 6m, load stopped 7m (15.5 min of scenario time; for compressed tests)",
    ),
];

/// The spike's total rate, as a multiple of the HPA target times the starting replicas: 1.3 x
/// 800 x 3 = 3120/s asks for ceil(3.9) = 4 pods, 780/s each, 2.5 % under the target, so that
/// the usual noise of a measured rate (a percent or two) does not tip the HPA's ceil to a fifth
/// pod and the per-pod rate settles within 10 % of the target. (More would not show more: five
/// debug-built pods sharing two hot keys at 3900/s saturate a 2-core machine, and a starved
/// machine measures itself, not the limiter.)
pub const SPIKE_FACTOR: f64 = 1.3;

impl Profile {
    /// A profile by name, for a Deployment starting at `replicas` pods.
    ///
    /// Rates are totals, spread by the Service over the ready pods: the per-pod rate falls as
    /// the HPA adds pods. The witness clients (4 keys at 80 % of a 20/s limit, 1 at 180 %,
    /// 100 requests/s) run throughout and count toward every phase's total. Baseline: half the
    /// HPA's 800 req/s per pod over 10 000 keys (nobody near a limit). Spike: 1.3 times the
    /// target per starting pod ([`SPIKE_FACTOR`]), so the HPA must add pods. Overload: the same
    /// rate, all of it on a few hot keys, each asked for about 1800 tokens/s against a refill of
    /// 1000/s, so their buckets empty within about a second and stay empty (token usage alerts,
    /// rejections, depletion near 1). Bucket refill is never compressed: at 1200/s a bucket
    /// would take 5 real seconds to drain, 150 s of scenario time at x30, too much of a
    /// compressed phase. Then only the witnesses: the HPA comes back down to its minimum after
    /// its 5-minute stabilization window, at most 20 % per minute, pods leaving under the
    /// witnesses' load.
    pub fn named(name: &str, replicas: usize) -> Result<Profile> {
        let (baseline, spike, overload, stopped) = match name {
            "standard" => (120, 120, 420, 540),
            "quick" => (60, 90, 360, 420),
            other => {
                let names: Vec<&str> = PROFILES.iter().map(|(n, _)| *n).collect();
                return Err(Error::Other(format!(
                    "unknown profile {other:?}: choose one of {}",
                    names.join(", ")
                )));
            }
        };
        let witness = witness::Plan::standard(4, 1);
        let n = replicas.max(1) as f64;
        let main = |total: f64| (total - witness.rate()).max(50.0);
        let spike_rate = main(SPIKE_FACTOR * HPA_TARGET_PER_POD * n);
        // Each hot key is asked for at least HOT_KEY_RATE, so that it stays above its refill
        // even when a busy machine delivers only part of the load.
        let hot = ((spike_rate / HOT_KEY_RATE).floor() as u32).max(1);
        let phase = |name: &str, purpose: &str, secs: u64, load: Option<Load>| Phase {
            name: name.to_owned(),
            purpose: purpose.to_owned(),
            duration: Duration::from_secs(secs),
            load,
        };
        Ok(Profile {
            name: name.to_owned(),
            phases: vec![
                phase(
                    "baseline",
                    "half the HPA target per starting pod over 10 000 keys: nothing should happen",
                    baseline,
                    Some(Load {
                        rate: main(0.5 * HPA_TARGET_PER_POD * n),
                        keys: Keys::Many { count: 10_000 },
                    }),
                ),
                phase(
                    "spike",
                    "1.3x the HPA target per starting pod over 10 000 keys: the HPA scales up \
                     and the per-pod rate falls back under the target",
                    spike,
                    Some(Load {
                        rate: spike_rate,
                        keys: Keys::Many { count: 10_000 },
                    }),
                ),
                phase(
                    "overload",
                    "the same rate on a few hot keys, about 1800 req/s each against a refill \
                     of 1000/s: their buckets drain, token alerts fire, requests are rejected",
                    overload,
                    Some(Load {
                        rate: spike_rate,
                        keys: Keys::Hot {
                            count: hot,
                            share: 1.0,
                        },
                    }),
                ),
                phase(
                    "stopped",
                    "only the witnesses: alerts resolve, the HPA scales down after its \
                     stabilization window, pods leave under the witnesses' load",
                    stopped,
                    None,
                ),
            ],
            witness,
        })
    }

    /// Scenario time of the whole profile.
    pub fn total(&self) -> Duration {
        self.phases.iter().map(|p| p.duration).sum()
    }

    /// Start and end (scenario seconds) of each phase.
    pub fn bounds(&self) -> Vec<(f64, f64)> {
        let mut t = 0.0;
        self.phases
            .iter()
            .map(|p| {
                let start = t;
                t += p.duration.as_secs_f64();
                (start, t)
            })
            .collect()
    }
}

/// Kill one replica at a scenario time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kill {
    pub replica: usize,
    pub at: Duration,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub profile: Profile,
    pub kill: Option<Kill>,
    /// The HPA manifest to simulate instead of [`DEFAULT_HPA`], relative to the repository.
    pub hpa_manifest: Option<PathBuf>,
    /// Kustomize patches of the HPA manifest, applied in order before simulating (e.g.
    /// `deploy/components/scale-on-depletion/hpa.yaml`), as paths relative to the repository.
    pub hpa_patches: Vec<PathBuf>,
    /// Progress lines on stderr.
    pub progress: bool,
}

/// One phase as it ran.
#[derive(Debug, Clone)]
pub struct PhaseOutcome {
    pub phase: Phase,
    /// Scenario seconds.
    pub start_s: f64,
    pub end_s: f64,
    /// Total request rate asked for (req/s), 0 without load.
    pub rate: f64,
    /// The load generator's summary (None without load).
    pub summary: Option<Summary>,
}

/// Prometheus' view at one instant: series name -> value (see [`Sampler`] for the names).
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Scenario seconds.
    pub t: f64,
    pub values: BTreeMap<String, f64>,
}

impl Sample {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.get(name).copied()
    }
}

/// One alert (name and labels) from when it went pending until it resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertSpan {
    pub name: String,
    pub severity: String,
    /// The labels that tell instances apart (pod, peer, policy...), `k=v` joined by commas.
    pub labels: String,
    /// Scenario seconds: Prometheus' `activeAt` (when the condition started to hold).
    pub pending_at: f64,
    /// First poll that saw it firing.
    pub firing_at: Option<f64>,
    /// First poll that no longer saw it.
    pub resolved_at: Option<f64>,
    /// The value Prometheus last rendered for it.
    pub last_value: String,
}

/// The kill, as it happened.
#[derive(Debug, Clone)]
pub struct KillOutcome {
    pub replica: usize,
    pub node_id: String,
    pub pid: u32,
    pub api: String,
    /// Scenario seconds.
    pub at_s: f64,
}

/// One change to a pod, on the scenario clock (see [`crate::deployment::EventKind`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PodEvent {
    /// Scenario seconds (negative: before the scenario started, while the stack came up).
    pub t: f64,
    /// Empty for a change of the desired count.
    pub pod: String,
    pub kind: EventKind,
}

/// Desired, running and ready pods after each change, on the scenario clock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplicaCounts {
    pub t: f64,
    pub desired: usize,
    /// Pods with a live process (starting, ready, not ready, terminating).
    pub running: usize,
    /// Pods in the Service.
    pub ready: usize,
}

/// Everything a report needs.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub profile: Profile,
    pub time_scale: f64,
    pub replicas: usize,
    pub started: SystemTime,
    /// Real time the scenario took (without starting and stopping the stack).
    pub wall: Duration,
    pub stack_startup: Duration,
    pub listening: Vec<String>,
    pub scrape_interval: Duration,
    /// The PromQL of the adapter's two metrics, as loaded.
    pub adapter_queries: Vec<(String, String)>,
    /// What the HPA was simulated from: the manifest and its patches, as paths.
    pub hpa_source: String,
    pub hpa_min_replicas: i32,
    pub hpa_max_replicas: i32,
    pub phases: Vec<PhaseOutcome>,
    pub samples: Vec<Sample>,
    /// HPA syncs; `at_s` is scenario seconds.
    pub syncs: Vec<SyncRecord>,
    pub alerts: Vec<AlertSpan>,
    pub kill: Option<KillOutcome>,
    /// Every change to the Deployment and its pods, and the counts they give.
    pub pod_events: Vec<PodEvent>,
    pub replica_counts: Vec<ReplicaCounts>,
    /// What the witness clients sent and got (real seconds since `witness_start_s`).
    pub witness: Option<witness::Record>,
    /// Scenario seconds at which the witnesses started.
    pub witness_start_s: f64,
    /// Cut short by Ctrl-C.
    pub cancelled: bool,
    /// How well Prometheus kept up, over the whole scenario.
    pub health: Health,
}

/// Whether the measurements can be trusted: an overloaded machine makes scrapes time out and
/// rule evaluations skip, which resets alerts' `for` and leaves holes in the rates.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Health {
    /// Scrapes of limiter targets that failed (killed replicas included).
    pub failed_scrapes: Option<f64>,
    pub scrapes: Option<f64>,
    /// The slowest limiter scrape, seconds (the timeout is the scrape interval, at most 10 s).
    pub slowest_scrape_s: Option<f64>,
    /// Rule group evaluations Prometheus skipped because the previous one ran late.
    pub missed_evaluations: Option<f64>,
}

impl Outcome {
    /// The largest desired replica count and the first scenario time it was set.
    pub fn peak_desired(&self) -> Option<(i32, f64)> {
        let max = self.syncs.iter().map(|s| s.desired).max()?;
        let at = self.syncs.iter().find(|s| s.desired == max)?.at_s;
        Some((max, at))
    }

    /// Spans of alert `name`.
    pub fn alert(&self, name: &str) -> Vec<&AlertSpan> {
        self.alerts.iter().filter(|a| a.name == name).collect()
    }

    /// The phase a scenario time falls in.
    pub fn phase_at(&self, t: f64) -> Option<&PhaseOutcome> {
        // The first phase also owns the instant the scenario starts (before its own start).
        self.phases.iter().find(|p| t < p.end_s)
    }
}

/// Shared state for progress lines.
#[derive(Debug, Default)]
struct Status {
    phase: String,
    phase_index: usize,
    phase_start: f64,
    phase_length: f64,
    load: Option<Progress>,
    desired: Option<i32>,
    note: String,
}

/// The HPA manifest simulated unless another is given.
pub const DEFAULT_HPA: &str = "deploy/base/limiter/hpa.yaml";

/// The simulated HPA: `manifest` ([`DEFAULT_HPA`] when `None`; e.g. the operations guide's own,
/// `tests/fixtures/operations-guide-hpa.yaml`) of the repository at `config_dir` with `patches`
/// (paths relative to it) applied in order, starting at `replicas`; and a description of what
/// it was built from, for the report.
pub fn hpa_simulator(
    config_dir: &Path,
    manifest: Option<&Path>,
    patches: &[PathBuf],
    replicas: i32,
) -> Result<(HpaSimulator, String)> {
    let read = |relative: &Path| {
        let path = config_dir.join(relative);
        std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))
    };
    let manifest_path = manifest.unwrap_or(Path::new(DEFAULT_HPA));
    let manifest = read(manifest_path)?;
    let mut source = manifest_path.display().to_string();
    let mut overrides = hpa_sim::Overrides::default();
    for patch in patches {
        overrides.patches.push(read(patch)?);
        source.push_str(&format!(" + {}", patch.display()));
    }
    let sim = HpaSimulator::from_manifest_with(&manifest, &overrides, replicas)
        .map_err(|e| Error::Other(format!("{source}: {e}")))?;
    Ok((sim, source))
}

/// Runs `options.profile` on `stack`; `cancel` (Ctrl-C) ends it early with what was measured.
pub async fn run(
    stack: &mut Stack,
    options: &Options,
    cancel: impl std::future::Future<Output = ()> + Send,
) -> Result<Outcome> {
    let scale = stack.options.time_scale;
    let k = scale.factor();
    let replicas = stack.deployment.status().desired;
    if let Some(kill) = options.kill
        && kill.replica >= replicas
    {
        return Err(Error::Other(format!(
            "cannot kill replica {}: the stack started {replicas} (0 to {})",
            kill.replica,
            replicas.saturating_sub(1)
        )));
    }
    let (mut sim, hpa_source) = hpa_simulator(
        &stack.options.config_dir,
        options.hpa_manifest.as_deref(),
        &options.hpa_patches,
        replicas as i32,
    )?;
    let (hpa_min_replicas, hpa_max_replicas) = (sim.spec().min_replicas, sim.spec().max_replicas);
    let adapter_queries = stack.adapter_queries()?;
    // The adapter's helper installs ring as rustls' provider (see `Prometheus::start`).
    let http = hpa_sim::http_client(Duration::from_secs(10))
        .map_err(|e| Error::Other(format!("HTTP client: {e}")))?;

    let prom = stack.prometheus.api().clone();
    let adapter_url = stack.adapter_url.clone();
    let deployment = &stack.deployment;
    let kube_state = &stack.kube_state;
    let endpoints = deployment.endpoints().clone();
    let profile = options.profile.clone();
    let total = profile.total().as_secs_f64();
    let status = Arc::new(Mutex::new(Status::default()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let started = SystemTime::now();
    let start = Instant::now();
    let now_s = move || start.elapsed().as_secs_f64() * k;

    // The phases, one after the other; then everything else stops.
    let load = {
        let status = status.clone();
        let endpoints = endpoints.clone();
        let stop_rx = stop_rx.clone();
        let stop_tx = &stop_tx;
        async move {
            let mut outcomes = Vec::new();
            let mut cancelled = false;
            let mut cancel = std::pin::pin!(cancel);
            for (index, phase) in profile.phases.iter().enumerate() {
                let start_s = now_s();
                {
                    let mut s = lock(&status);
                    s.phase = phase.name.clone();
                    s.phase_index = index;
                    s.phase_start = start_s;
                    s.phase_length = phase.duration.as_secs_f64();
                    s.load = None;
                }
                let real = scale.to_real(phase.duration);
                let (rate, summary) = match &phase.load {
                    Some(load) => {
                        let rate = load.rate;
                        let plan = Plan {
                            endpoints: Some(endpoints.clone()),
                            drive: Drive::OpenLoop(RateProfile::Constant(rate)),
                            keys: load.keys,
                            spread: Spread::RoundRobin,
                            duration: real,
                            failover: true,
                            seed: 0x0C1A_3000_5EED ^ index as u64,
                            ..Plan::default()
                        };
                        let status = status.clone();
                        let summary = openclaw_loadgen::run(
                            &plan,
                            move |p: &Progress| lock(&status).load = Some(p.clone()),
                            &mut cancel,
                        )
                        .await
                        .map_err(|e| Error::Other(format!("phase {}: {e}", phase.name)));
                        match summary {
                            Ok(s) => {
                                cancelled |= s.cancelled;
                                (rate, Some(s))
                            }
                            Err(e) => {
                                let _ = stop_tx.send(true);
                                return Err(e);
                            }
                        }
                    }
                    None => {
                        tokio::select! {
                            _ = tokio::time::sleep(real) => {}
                            _ = &mut cancel => cancelled = true,
                        }
                        (0.0, None)
                    }
                };
                outcomes.push(PhaseOutcome {
                    phase: phase.clone(),
                    start_s,
                    end_s: now_s(),
                    rate,
                    summary,
                });
                if cancelled {
                    break;
                }
            }
            let _ = stop_tx.send(true);
            drop(stop_rx);
            Ok((outcomes, cancelled))
        }
    };

    // The HPA, syncing against the adapter.
    let hpa = {
        let status = status.clone();
        let stop = stopped(stop_rx.clone());
        let http = &http;
        let adapter_url = &adapter_url;
        let sim = &mut sim;
        async move {
            hpa_sim::run(
                sim,
                http,
                adapter_url,
                k,
                // The scale's spec.replicas: the Deployment follows, and kube-state-metrics
                // shows the HPA's status.
                move |r: &SyncRecord| {
                    lock(&status).desired = Some(r.desired);
                    deployment.scale(r.desired.max(0) as usize);
                    kube_state.set_hpa(HpaState {
                        desired: r.desired,
                        min: hpa_min_replicas,
                        max: hpa_max_replicas,
                        scaling_active: r.metrics.iter().all(|m| m.value.is_ok()),
                    });
                },
                stop,
            )
            .await
        }
    };

    // The witness clients, through the Service, for the whole scenario.
    let witness_start_s = now_s();
    let witness = witness::run(
        profile.witness.clone(),
        endpoints.clone(),
        http.clone(),
        stop_rx.clone(),
    );

    // Prometheus' view and its alerts.
    let sampler = {
        let stop_rx = stop_rx.clone();
        let sampler = Sampler::new(prom.clone(), scale, started);
        async move { sampler.run(now_s, stop_rx).await }
    };

    // The kill.
    let kill_task = {
        let status = status.clone();
        let mut stop_rx = stop_rx.clone();
        async move {
            let kill = options.kill?;
            tokio::select! {
                _ = tokio::time::sleep(scale.to_real(kill.at)) => {}
                _ = stop_rx.wait_for(|s| *s) => return None,
            }
            let at_s = now_s();
            let node_id = format!("limiter-{}", kill.replica);
            match deployment.kill(&node_id).await {
                Ok(killed) => {
                    lock(&status).note =
                        format!("killed {node_id} (pid {}) at {}", killed.pid, minsec(at_s));
                    Some(KillOutcome {
                        replica: kill.replica,
                        node_id,
                        pid: killed.pid,
                        api: killed.api,
                        at_s,
                    })
                }
                Err(e) => {
                    lock(&status).note = format!("kill failed: {e}");
                    None
                }
            }
        }
    };

    // Progress on stderr.
    let progress = {
        let status = status.clone();
        let mut stop_rx = stop_rx.clone();
        let show = options.progress;
        let phases = options.profile.phases.len();
        async move {
            if !show {
                return;
            }
            let tty = std::io::stderr().is_terminal();
            let every = if tty {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(10)
            };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop_rx.wait_for(|s| *s) => break,
                }
                let line = progress_line(&lock(&status), now_s(), total, phases, k);
                let mut err = std::io::stderr().lock();
                if tty {
                    let _ = write!(err, "\r\x1b[2K{line}");
                } else {
                    let _ = writeln!(err, "{line}");
                }
                let _ = err.flush();
            }
            if tty {
                eprintln!();
            }
        }
    };

    let (load, syncs, (samples, alerts), kill, (), witness) =
        tokio::join!(load, hpa, sampler, kill_task, progress, witness);
    let (phases, cancelled) = load?;
    let (pod_events, replica_counts) = pod_timeline(&deployment.events(), start, k);
    let health = Sampler::new(prom, scale, started)
        .health(start.elapsed())
        .await;
    Ok(Outcome {
        profile: options.profile.clone(),
        time_scale: k,
        replicas,
        started,
        wall: start.elapsed(),
        stack_startup: stack.startup,
        listening: stack.listening_lines(),
        scrape_interval: scale.scrape_interval(),
        adapter_queries,
        hpa_source,
        hpa_min_replicas,
        hpa_max_replicas,
        phases,
        samples,
        syncs,
        alerts,
        kill,
        pod_events,
        replica_counts,
        witness: Some(witness),
        witness_start_s,
        cancelled,
        health,
    })
}

/// The deployment's events on the scenario clock (`start` is scenario time 0), and the
/// desired / running / ready counts after each.
pub fn pod_timeline(
    events: &[Event],
    start: Instant,
    k: f64,
) -> (Vec<PodEvent>, Vec<ReplicaCounts>) {
    let t_of = |at: Instant| match at.checked_duration_since(start) {
        Some(d) => d.as_secs_f64() * k,
        None => -(start.duration_since(at).as_secs_f64() * k),
    };
    let mut out = Vec::new();
    let mut counts = Vec::new();
    let mut desired = 0;
    let mut running = std::collections::BTreeSet::new();
    let mut ready = std::collections::BTreeSet::new();
    for e in events {
        match &e.kind {
            EventKind::Scaled(_, to) => desired = *to,
            EventKind::Created | EventKind::Restarted => {
                running.insert(e.pod.clone());
            }
            EventKind::Ready => {
                ready.insert(e.pod.clone());
            }
            EventKind::NotReady | EventKind::Terminating | EventKind::Killed => {
                ready.remove(&e.pod);
            }
            EventKind::Stopped(_) | EventKind::Crashed(_) => {
                ready.remove(&e.pod);
                running.remove(&e.pod);
            }
            EventKind::Listening => {}
        }
        let t = t_of(e.at);
        out.push(PodEvent {
            t,
            pod: e.pod.clone(),
            kind: e.kind.clone(),
        });
        let c = ReplicaCounts {
            t,
            desired,
            running: running.len(),
            ready: ready.len(),
        };
        if counts.last().is_none_or(|l: &ReplicaCounts| {
            (l.desired, l.running, l.ready) != (c.desired, c.running, c.ready)
        }) {
            counts.push(c);
        }
    }
    (out, counts)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `12m05s`.
pub fn minsec(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}m{:02}s", s / 60, s % 60)
}

fn progress_line(s: &Status, now: f64, total: f64, phases: usize, k: f64) -> String {
    let in_phase = now - s.phase_start;
    let mut line = format!(
        "[{}/{phases} {}] {}/{} | scenario {}/{}",
        s.phase_index + 1,
        s.phase,
        minsec(in_phase),
        minsec(s.phase_length),
        minsec(now),
        minsec(total),
    );
    if k != 1.0 {
        line.push_str(&format!(" (x{k})"));
    }
    if let Some(p) = &s.load {
        line.push_str(&format!(
            " | {:.0} req/s sent, {} allowed, {} rejected, {} errors",
            p.achieved_rps, p.allowed, p.rejected, p.errors
        ));
    }
    if let Some(d) = s.desired {
        line.push_str(&format!(" | HPA desired {d}"));
    }
    if !s.note.is_empty() {
        line.push_str(&format!(" | {}", s.note));
    }
    line
}

/// Samples Prometheus and tracks its alerts.
///
/// Series names in [`Sample::values`]:
/// - `rps`: fleet decisions per second (`sum(openclaw:requests:rate1m)`), `rps:allowed`,
///   `rps:rejected`, and `rps:pod=NAME` per replica;
/// - `rejected_ratio`: `max(openclaw:requests_rejected:ratio_rate1m)` (share of decisions
///   rejected, 0 when there is traffic and nothing is rejected, absent without traffic);
/// - `depletion`: `max(openclaw:token_depletion_rate:ratio)`;
/// - `usage`: `max(openclaw:token_bucket_usage:ratio)`;
/// - `lag:POD->PEER`: `openclaw_replication_lag_seconds`;
/// - `up:POD`: `up{job="openclaw-limiter"}`.
#[derive(Debug, Clone)]
pub struct Sampler {
    prom: PromApi,
    scale: TimeScale,
    /// The wall-clock time of scenario time 0.
    started: SystemTime,
}

impl Sampler {
    pub fn new(prom: PromApi, scale: TimeScale, started: SystemTime) -> Sampler {
        Sampler {
            prom,
            scale,
            started,
        }
    }

    /// The wall-clock time of scenario time `t`.
    fn wall(&self, t: f64) -> SystemTime {
        self.started + self.scale.to_real(Duration::from_secs_f64(t.max(0.0)))
    }

    /// Every 5 s of scenario time (at least every scrape interval), until `stop`.
    pub async fn run(
        &self,
        now_s: impl Fn() -> f64,
        mut stop: watch::Receiver<bool>,
    ) -> (Vec<Sample>, Vec<AlertSpan>) {
        let every = self
            .scale
            .wait(Duration::from_secs(5))
            .max(self.scale.scrape_interval());
        let mut samples = Vec::new();
        let mut alerts = AlertTracker::default();
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            samples.push(self.sample(now_s()).await);
            self.poll_alerts(&mut alerts, &now_s).await;
        }
        // One last look after the load, so alerts that resolved at the very end are seen.
        samples.push(self.sample(now_s()).await);
        self.poll_alerts(&mut alerts, &now_s).await;
        (samples, alerts.finish())
    }

    /// Scrape and rule evaluation health over the last `real` seconds.
    pub async fn health(&self, real: Duration) -> Health {
        let d = format!("{}s", real.as_secs() + 5);
        let job = format!("job=\"{LIMITER_JOB}\"");
        let q = |q: String| async move { self.prom.scalar(&q).await.ok().flatten() };
        Health {
            failed_scrapes: q(format!(
                "sum(count_over_time(up{{{job}}}[{d}])) - sum(sum_over_time(up{{{job}}}[{d}]))"
            ))
            .await,
            scrapes: q(format!("sum(count_over_time(up{{{job}}}[{d}]))")).await,
            slowest_scrape_s: q(format!(
                "max(max_over_time(scrape_duration_seconds{{{job}}}[{d}]))"
            ))
            .await,
            missed_evaluations: q(format!(
                "sum(increase(prometheus_rule_group_iterations_missed_total{{job=\"prometheus\"}}[{d}]))"
            ))
            .await,
        }
    }

    /// Asks for the active alerts; the poll counts as made when the answer arrived (the state
    /// it describes is at most that old).
    async fn poll_alerts(&self, alerts: &mut AlertTracker, now_s: &impl Fn() -> f64) {
        if let Ok(active) = self.prom.alerts().await {
            let t = now_s();
            alerts.observe(t, &active, |at| self.scenario_time(at));
        }
    }

    /// Scenario seconds of an RFC 3339 time from Prometheus.
    fn scenario_time(&self, rfc3339: &str) -> Option<f64> {
        let at = humantime::parse_rfc3339_weak(rfc3339.trim_end_matches('Z'))
            .or_else(|_| humantime::parse_rfc3339(rfc3339))
            .ok()?;
        let real = match at.duration_since(self.started) {
            Ok(after) => after.as_secs_f64(),
            Err(before) => -before.duration().as_secs_f64(),
        };
        Some(real * self.scale.factor())
    }

    /// One sample at scenario time `t`: every query is evaluated at that instant, however long
    /// the queries take to answer.
    pub async fn sample(&self, t: f64) -> Sample {
        let at = Some(self.wall(t));
        let window = format_duration(self.scale.window(Duration::from_secs(60)));
        let mut values = BTreeMap::new();
        let single = [
            ("rps", "sum(openclaw:requests:rate1m)".to_owned()),
            (
                "rps:allowed",
                "sum(openclaw:requests:rate1m{decision=\"allowed\"})".to_owned(),
            ),
            (
                "rps:rejected",
                "sum(openclaw:requests:rate1m{decision=\"rejected\"})".to_owned(),
            ),
            (
                "rejected_ratio",
                "max(openclaw:requests_rejected:ratio_rate1m)".to_owned(),
            ),
            (
                "depletion",
                "max(openclaw:token_depletion_rate:ratio)".to_owned(),
            ),
            ("usage", "max(openclaw:token_bucket_usage:ratio)".to_owned()),
        ];
        for (name, q) in single {
            if let Ok(Some(v)) = self.prom.scalar_at(&q, at).await {
                values.insert(name.to_owned(), v);
            }
        }
        let per_pod = format!(
            "sum by (pod) (rate(openclaw_requests_total{{job=\"{LIMITER_JOB}\"}}[{window}]))"
        );
        if let Ok(v) = self.prom.vector_at(&per_pod, at).await {
            for (labels, value) in v {
                values.insert(format!("rps:pod={}", label(&labels, "pod")), value);
            }
        }
        let lag = format!("openclaw_replication_lag_seconds{{job=\"{LIMITER_JOB}\"}}");
        if let Ok(v) = self.prom.vector_at(&lag, at).await {
            for (labels, value) in v {
                values.insert(
                    format!("lag:{}->{}", label(&labels, "pod"), label(&labels, "peer")),
                    value,
                );
            }
        }
        if let Ok(v) = self
            .prom
            .vector_at(&format!("up{{job=\"{LIMITER_JOB}\"}}"), at)
            .await
        {
            for (labels, value) in v {
                values.insert(format!("up:{}", label(&labels, "pod")), value);
            }
        }
        Sample { t, values }
    }
}

fn label(labels: &serde_json::Map<String, Value>, name: &str) -> String {
    labels
        .get(name)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// Turns successive `/api/v1/alerts` answers into spans.
#[derive(Debug, Default)]
pub struct AlertTracker {
    open: BTreeMap<(String, String), AlertSpan>,
    closed: Vec<AlertSpan>,
}

/// Labels that are the same on every alert of the stack or only repeat the rule: left out of
/// the span's label summary.
/// (`instance` only repeats `pod` here.)
const COMMON_LABELS: &[&str] = &["alertname", "severity", "namespace", "job", "instance"];

impl AlertTracker {
    /// One poll answered at scenario time `t`; `to_t` converts Prometheus' `activeAt` to
    /// scenario time.
    pub fn observe(&mut self, t: f64, active: &[Value], to_t: impl Fn(&str) -> Option<f64>) {
        let mut seen = Vec::new();
        for a in active {
            let labels = a["labels"].as_object().cloned().unwrap_or_default();
            let name = label(&labels, "alertname");
            let summary: Vec<String> = labels
                .iter()
                .filter(|(k, _)| !COMMON_LABELS.contains(&k.as_str()))
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect();
            let key = (name.clone(), summary.join(","));
            let state = a["state"].as_str().unwrap_or_default();
            let value = a["value"].as_str().unwrap_or_default().to_owned();
            let pending_at = a["activeAt"].as_str().and_then(&to_t).unwrap_or(t);
            let span = self.open.entry(key.clone()).or_insert_with(|| AlertSpan {
                name,
                severity: label(&labels, "severity"),
                labels: key.1.clone(),
                pending_at,
                firing_at: None,
                resolved_at: None,
                last_value: String::new(),
            });
            if state == "firing" && span.firing_at.is_none() {
                span.firing_at = Some(t);
            }
            span.last_value = value;
            seen.push(key);
        }
        let gone: Vec<_> = self
            .open
            .keys()
            .filter(|k| !seen.contains(k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(mut span) = self.open.remove(&key) {
                span.resolved_at = Some(t);
                self.closed.push(span);
            }
        }
    }

    /// Every span, resolved or still open, by the time it went pending.
    pub fn finish(mut self) -> Vec<AlertSpan> {
        self.closed.extend(self.open.into_values());
        self.closed.sort_by(|a, b| {
            a.pending_at
                .total_cmp(&b.pending_at)
                .then_with(|| a.name.cmp(&b.name))
        });
        self.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn repository() -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
    }

    #[test]
    fn the_simulated_hpa_is_the_deployed_one_with_the_patches_asked_for() {
        let (default, source) = hpa_simulator(&repository(), None, &[], 3).unwrap();
        assert_eq!(source, "deploy/base/limiter/hpa.yaml");
        let names: Vec<&str> = default.metrics().iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["openclaw_requests_per_second"]);

        let patches = [
            PathBuf::from("deploy/overlays/production/hpa.yaml"),
            PathBuf::from("deploy/components/scale-on-depletion/hpa.yaml"),
        ];
        let (patched, source) = hpa_simulator(&repository(), None, &patches, 3).unwrap();
        assert_eq!(
            source,
            "deploy/base/limiter/hpa.yaml + deploy/overlays/production/hpa.yaml + \
             deploy/components/scale-on-depletion/hpa.yaml"
        );
        let names: Vec<&str> = patched.metrics().iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "openclaw_requests_per_second",
                "openclaw_token_depletion_rate"
            ]
        );
        // Production raises the floor to one replica per zone.
        assert_eq!(patched.spec().min_replicas, 3);

        let missing = [PathBuf::from("deploy/components/no-such/hpa.yaml")];
        let Err(e) = hpa_simulator(&repository(), None, &missing, 3) else {
            panic!("a missing patch was accepted");
        };
        assert!(e.to_string().contains("no-such/hpa.yaml"), "{e}");
    }

    #[test]
    fn profiles_put_the_spike_above_the_hpa_target_and_the_baseline_below() {
        let p = Profile::named("standard", 3).unwrap();
        assert_eq!(p.total(), Duration::from_secs(1200));
        let w = p.witness.rate();
        let total: Vec<f64> = p
            .phases
            .iter()
            .map(|ph| ph.load.as_ref().map_or(0.0, |l| l.rate) + w)
            .collect();
        // Per starting pod: baseline under the target, spike and overload above it.
        assert!((total[0] / 3.0 - 400.0).abs() < 1.0, "{total:?}");
        assert!(total[1] / 3.0 > HPA_TARGET_PER_POD);
        assert_eq!(total[1], total[2]);
        assert_eq!(total[3], w);
        // The spike asks for 4 pods at 780/s, 2.5 % under the target: a percent of noise
        // in the measured rate does not make it 5.
        let pods = (total[1] / HPA_TARGET_PER_POD).ceil();
        assert_eq!(pods, 4.0);
        assert!((total[1] * 1.02 / HPA_TARGET_PER_POD).ceil() == 4.0);
        assert!(total[1] / pods >= 0.9 * HPA_TARGET_PER_POD);
        // Overload: each hot key is asked for more than its bucket refills (1000/s).
        let Some(Load {
            keys: Keys::Hot { count, share },
            rate,
        }) = p.phases[2].load.clone()
        else {
            panic!("overload is on hot keys");
        };
        assert!(rate * share / f64::from(count) > 1000.0);
        assert!(Profile::named("nope", 3).is_err());
        assert_eq!(p.bounds()[1], (120.0, 240.0));
    }

    #[test]
    fn the_pod_timeline_counts_desired_running_and_ready_after_each_event() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let e = |ms, pod: &str, kind| Event {
            at: at(ms),
            pod: pod.into(),
            kind,
        };
        let events = [
            e(0, "", EventKind::Scaled(1, 2)),
            e(10, "limiter-1", EventKind::Created),
            e(20, "limiter-1", EventKind::Listening),
            e(30, "limiter-1", EventKind::Ready),
            e(40, "limiter-1", EventKind::Killed),
            e(45, "limiter-1", EventKind::Crashed("signal: 9".into())),
            e(50, "limiter-1", EventKind::Restarted),
            e(60, "limiter-1", EventKind::Ready),
        ];
        let (events, counts) = pod_timeline(&events, start, 10.0);
        assert!((events[3].t - 0.3).abs() < 1e-9);
        let triples: Vec<(usize, usize, usize)> = counts
            .iter()
            .map(|c| (c.desired, c.running, c.ready))
            .collect();
        assert_eq!(
            triples,
            [
                (2, 0, 0),
                (2, 1, 0),
                (2, 1, 1),
                (2, 1, 0),
                (2, 0, 0),
                (2, 1, 0),
                (2, 1, 1)
            ]
        );
    }

    #[test]
    fn alert_polls_become_spans_from_pending_through_firing_to_resolved() {
        let mut tracker = AlertTracker::default();
        let alert = |state: &str| {
            json!({"labels": {"alertname": "TokenBucketHighUsage", "severity": "warning",
                              "namespace": "openclaw", "policy": "default"},
                   "state": state, "activeAt": "x", "value": "1e+00"})
        };
        tracker.observe(10.0, &[alert("pending")], |_| Some(8.0));
        tracker.observe(20.0, &[alert("pending")], |_| Some(8.0));
        tracker.observe(130.0, &[alert("firing")], |_| Some(8.0));
        tracker.observe(300.0, &[], |_| None);
        tracker.observe(310.0, &[alert("pending")], |_| Some(305.0));
        let spans = tracker.finish();
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].labels, "policy=default");
        assert_eq!(spans[0].pending_at, 8.0);
        assert_eq!(spans[0].firing_at, Some(130.0));
        assert_eq!(spans[0].resolved_at, Some(300.0));
        assert_eq!(spans[1].pending_at, 305.0);
        assert_eq!(spans[1].resolved_at, None);
    }
}
