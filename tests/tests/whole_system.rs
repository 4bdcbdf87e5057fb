//! The whole system on 127.0.0.1, 30 times faster than real time: the limiter Deployment and
//! its Service played by `openclaw-stack` (real limiter processes found by each other through a
//! shared peers file, started and stopped to the HPA's count, restarted when killed, the load
//! on the ready ones), Debian's Prometheus scraping them and evaluating (compressed copies of)
//! the rules of `alerts/rules/`, the real metrics adapter serving the external metrics API from
//! that Prometheus, the HPA controller's algorithm on `deploy/base/limiter/hpa.yaml` against the
//! adapter, and the project's load generator (`openclaw-stack`'s `quick` scenario: baseline,
//! spike above 800 req/s per pod, overload on hot keys, load stopped; witness clients
//! throughout).
//!
//! What runs for real and what is simulated: every process is the real binary; the HPA is
//! simulated because no Kubernetes API server runs here (the simulator reads the adapter exactly
//! as the controller does and applies the controller's arithmetic, `metrics_adapter::hpa_sim`);
//! the Deployment's controllers (ReplicaSet, kubelet, endpoints) are the stack's
//! (`stack/src/deployment.rs`).
//!
//! Time compression (stack/src/timescale.rs): scrape and evaluation every 0.5 s, every `for`
//! and range window divided by 30 (`[1m]` -> `[2s]`, `for: 2m` -> `4s`), the HPA's 15 s sync
//! and 300 s stabilization window likewise. Request rates and bucket refill are real, so a hot
//! bucket takes its real time to drain (1.25 s at 1800 requests/s: 37 s of scenario time); the
//! overload phase is long enough for that plus the alert's `for`.
//!
//! The two scenario tests take about 40 s each (a 15.5-minute scenario at x30 plus start and
//! stop), the two Deployment tests about 15 s each. They hold a lock file so that only one stack
//! runs at a time: two at once on this 2-core machine (3000 requests/s each to debug builds)
//! starve the limiters into client timeouts. A fifth test runs `openclaw-stack up` as a user
//! would and stops it with Ctrl-C. Needs `cargo build --workspace --bins` (debug) and
//! `/usr/bin/prometheus`.

use std::fs::File;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metrics_adapter::hpa_sim::SyncRecord;
use openclaw_e2e::{ChildGuard, http_client, parse_listening, wait_until, workspace_bin};
use openclaw_stack::deployment::{EventKind, Phase};
use openclaw_stack::figures::{Figures, SettledRate};
use openclaw_stack::process::Group;
use openclaw_stack::scenario::{self, Kill, Outcome, Profile};
use openclaw_stack::stack::{Options, Stack, default_config_dir};
use openclaw_stack::timescale::TimeScale;
use serde_json::Value;

const SCALE: f64 = 30.0;
const REPLICAS: usize = 3;
const RPS: &str = "openclaw_requests_per_second";
/// Scenario seconds one poll or sync may be late by, from scheduling on a busy machine (2 s of
/// real time).
const JITTER_S: f64 = 2.0 * SCALE;

/// Only one stack at a time: both tests load the two cores fully.
fn one_stack_at_a_time() -> File {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("whole_system.lock");
    let file = File::create(&path).expect("lock file");
    file.lock().expect("lock the whole-system lock file");
    file
}

fn options(work: &Path) -> Options {
    let limiter = workspace_bin("openclaw-limiter");
    workspace_bin("openclaw-metrics-adapter");
    let bin_dir = limiter.parent().expect("target dir").to_path_buf();
    let mut options = Options::new(default_config_dir(), bin_dir, work.to_path_buf());
    options.replicas = REPLICAS;
    options.time_scale = TimeScale::new(SCALE).expect("time scale");
    // Children in the test's process group: the test runner's timeout kill reaches them too.
    options.group = Group::Inherit;
    options
}

/// Where a test's report goes: kept after the run (also when it fails) for a look.
/// Writes the report of `outcome` to `target/tmp/whole_system-TEST/` (kept after a failure, so
/// write it before asserting) and returns the directory.
fn write_report(outcome: &Outcome, test: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("whole_system-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    openclaw_stack::report::write(
        outcome,
        &dir,
        "cargo nextest run -p openclaw-e2e --test whole_system",
    )
    .unwrap();
    eprintln!("report: {}", dir.join("report.md").display());
    dir
}

fn phase<'a>(o: &'a Outcome, name: &str) -> &'a scenario::PhaseOutcome {
    o.phases
        .iter()
        .find(|p| p.phase.name == name)
        .unwrap_or_else(|| panic!("no phase {name}"))
}

/// The RPS metric as the HPA read it at a sync, with the replicas it proposed.
fn rps_reading(s: &SyncRecord) -> Option<(f64, i32)> {
    let m = s.metrics.iter().find(|m| m.name == RPS)?;
    Some((*m.value.as_ref().ok()?, m.proposal?))
}

fn describe_syncs(o: &Outcome) -> String {
    o.syncs
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls, while the scenario runs, until the adapter serves `metric` with the same value that
/// Prometheus gives for the adapter's PromQL at a moment when Prometheus' own answer is stable
/// (taken before and after the adapter call), with at least `min_value`. Returns (Prometheus,
/// adapter). rate() moves with the evaluation time and the adapter may serve an answer cached
/// for up to 5 s / 15, so single comparisons may differ; a consistently different answer never
/// matches and fails at the deadline.
fn compare_adapter_with_prometheus(
    adapter: String,
    prometheus: String,
    metric: &'static str,
    promql: String,
    min_value: f64,
    deadline: Duration,
) -> JoinHandle<Result<(f64, f64), String>> {
    std::thread::spawn(move || {
        let http = http_client();
        let direct = || -> Option<f64> {
            let body: Value = http
                .get(format!("{prometheus}/api/v1/query"))
                .query(&[("query", promql.as_str())])
                .send()
                .ok()?
                .json()
                .ok()?;
            body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
        };
        let served = || -> Option<f64> {
            let body: Value = http
                .get(format!(
                    "{adapter}/apis/external.metrics.k8s.io/v1beta1/namespaces/openclaw/{metric}"
                ))
                .send()
                .ok()?
                .json()
                .ok()?;
            let q = body["items"][0]["value"].as_str()?;
            let milli = metrics_adapter::quantity::parse_quantity_milli(q).ok()?.0;
            Some(milli as f64 / 1000.0)
        };
        let until = Instant::now() + deadline;
        let mut last = String::from("nothing compared yet");
        while Instant::now() < until {
            if let (Some(before), Some(value), Some(after)) = (direct(), served(), direct()) {
                let stable = (before - after).abs() <= 0.005 * before;
                if before >= min_value && stable && (value - before).abs() <= 0.01 * before {
                    return Ok((before, value));
                }
                last = format!("Prometheus {before} then {after}, adapter {value}");
            }
            // Polling interval, not a synchronization: each attempt re-reads both sides.
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "the adapter never served {metric} equal to Prometheus' `{promql}` (>= {min_value}) \
             within {deadline:?}; last: {last}"
        ))
    })
}

#[test]
fn load_reaches_prometheus_and_the_adapter_the_hpa_scales_up_on_the_spike_and_back_down_and_token_usage_alerts_fire_and_resolve()
 {
    let _serial = one_stack_at_a_time();
    let work = tempfile::tempdir().unwrap();
    let rt = openclaw_stack::runtime().unwrap();
    let mut stack = rt.block_on(Stack::up(options(work.path()))).unwrap();
    let profile = Profile::named("quick", REPLICAS).unwrap();
    let load_real_s: f64 = profile.phases[..3]
        .iter()
        .map(|p| p.duration.as_secs_f64())
        .sum::<f64>()
        / SCALE;

    // 1. While load runs: the adapter serves what Prometheus computes from the limiters.
    let promql = stack
        .adapter_query(RPS)
        .expect("the adapter has the RPS rule");
    let comparison = compare_adapter_with_prometheus(
        stack.adapter_url.clone(),
        stack.prometheus.url().to_owned(),
        RPS,
        promql.clone(),
        // Half the baseline (1200 req/s): the load has clearly arrived.
        600.0,
        Duration::from_secs_f64(load_real_s),
    );
    let outcome = rt
        .block_on(scenario::run(
            &mut stack,
            &scenario::Options {
                profile,
                kill: None,
                progress: false,
                hpa_manifest: None,
                hpa_patches: Vec::new(),
            },
            std::future::pending(),
        ))
        .unwrap();
    // The report first, so that a failing assertion leaves it to look at.
    let report = write_report(&outcome, "causal_chain");
    let (direct, served) = comparison
        .join()
        .expect("comparison thread")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        (served - direct).abs() <= 0.01 * direct,
        "{promql}: {direct} vs {served}"
    );

    // 2. Every decision the load generator got back is in Prometheus' counters.
    let sent = |f: fn(&scenario::Summary) -> u64| -> u64 {
        outcome
            .phases
            .iter()
            .filter_map(|p| p.summary.as_ref())
            .map(f)
            .sum()
    };
    let (allowed, rejected, errors) = (
        sent(|s| s.allowed),
        sent(|s| s.rejected),
        sent(|s| s.errors),
    );
    assert!(rejected > 0, "the overload rejected nothing");
    let prometheus = stack.prometheus.url().to_owned();
    let http = http_client();
    // Pods that left took their series with them: each series' last value over the run, not
    // the sum now. Policy `default` only (the witnesses have their own).
    let run_s = (outcome.wall.as_secs() + 10).to_string();
    let last_values = format!(
        "max_over_time(openclaw_requests_total{{job=\"openclaw-limiter\",policy=\"default\"}}[{run_s}s])"
    );
    let counters = format!("sum by (decision) ({last_values})");
    let query = |promql: &str| -> Option<Value> {
        http.get(format!("{prometheus}/api/v1/query"))
            .query(&[("query", promql)])
            .send()
            .ok()?
            .json()
            .ok()
    };
    // Polled until it fits; a failure says what Prometheus last held, per pod, so that a short
    // count can be told apart from a long one and from a pod that stopped being scraped.
    let until = Instant::now() + Duration::from_secs(20);
    let counted = loop {
        let body = query(&counters);
        let mut counts = (0u64, 0u64);
        for s in body
            .as_ref()
            .and_then(|b| b["data"]["result"].as_array())
            .into_iter()
            .flatten()
        {
            let v: f64 = s["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            match s["metric"]["decision"].as_str() {
                Some("allowed") => counts.0 = v as u64,
                Some("rejected") => counts.1 = v as u64,
                _ => {}
            }
        }
        // A request that timed out on the client may still have been decided.
        let fits = |seen: u64, got: u64| got >= seen && got <= seen + errors;
        if fits(allowed, counts.0) && fits(rejected, counts.1) {
            break counts;
        }
        if Instant::now() >= until {
            let by_pod = query(&format!("max by (pod, decision) ({last_values})"));
            panic!(
                "Prometheus' decision counters never matched the load generator's within 20 s: \
                 generator allowed {allowed}, rejected {rejected}, errors {errors}; Prometheus \
                 allowed {}, rejected {}; per pod: {}\npods:\n{}\nPrometheus' health: {:?}",
                counts.0,
                counts.1,
                by_pod.map_or_else(
                    || "no answer".to_owned(),
                    |b| b["data"]["result"].to_string()
                ),
                outcome
                    .pod_events
                    .iter()
                    .map(|e| format!("{:.1} s {} {:?}", e.t, e.pod, e.kind))
                    .collect::<Vec<_>>()
                    .join("\n"),
                outcome.health,
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // No request was lost to the Deployment's changes: none refused a connection on every pod,
    // none broke on a pod that left. Timeouts are the machine at the overload's peak (two
    // cores for four debug-built pods, Prometheus and the generator): a few percent at most.
    let by_kind = |kind: &str| -> u64 {
        outcome
            .phases
            .iter()
            .filter_map(|p| p.summary.as_ref())
            .map(|s| s.errors_by_kind.get(kind).copied().unwrap_or(0))
            .sum()
    };
    assert_eq!(
        (by_kind("connect"), by_kind("transport")),
        (0, 0),
        "requests lost to pods coming and going"
    );
    assert!(errors <= allowed / 30, "{errors} errors: {counted:?}");

    // 3. The HPA: the request rate it read through the adapter rose above 800 per pod during
    //    the spike and it scaled up; it came back down only after the 5-minute window.
    let baseline = phase(&outcome, "baseline");
    let spike = phase(&outcome, "spike");
    let overload = phase(&outcome, "overload");
    let stopped = phase(&outcome, "stopped");
    let under_load: Vec<(f64, i32)> = outcome
        .syncs
        .iter()
        .filter(|s| s.at_s >= spike.start_s && s.at_s < overload.end_s)
        .filter_map(rps_reading)
        .collect();
    let (peak_rps, peak_proposal) = under_load
        .iter()
        .copied()
        .fold((0.0, 0), |a, b| (f64::max(a.0, b.0), a.1.max(b.1)));
    assert!(
        peak_rps > 800.0 * REPLICAS as f64,
        "the HPA never read more than 800 req/s per pod: {peak_rps}\n{}",
        describe_syncs(&outcome)
    );
    assert!(
        peak_proposal > REPLICAS as i32,
        "the request rate never asked for more than {REPLICAS} replicas\n{}",
        describe_syncs(&outcome)
    );
    // At the end of the baseline (half the target per pod), the request rate alone asks for
    // no more than the minimum.
    let (rps, proposal) = outcome
        .syncs
        .iter()
        .filter(|s| s.at_s > baseline.start_s + 30.0 && s.at_s < baseline.end_s)
        .filter_map(rps_reading)
        .next_back()
        .unwrap_or_else(|| {
            panic!(
                "no sync read the rate at baseline\n{}",
                describe_syncs(&outcome)
            )
        });
    assert!(
        rps > 0.0 && rps < 800.0 * REPLICAS as f64 && proposal <= 2,
        "at baseline the request rate alone asked for {proposal} ({rps} req/s)"
    );
    let (peak, peak_at) = outcome.peak_desired().unwrap();
    assert!(
        peak >= peak_proposal,
        "peak desired {peak} < {peak_proposal}"
    );
    assert!(peak_at < overload.end_s, "peaked only at {peak_at}");
    // The first scale-down after the peak honours the 300 s window: no sync in the 300 s
    // before it recommended as many replicas as were then running.
    let down = outcome
        .syncs
        .iter()
        .find(|s| s.at_s > peak_at && s.desired < s.current)
        .unwrap_or_else(|| {
            panic!(
                "the HPA never scaled down after the peak\n{}",
                describe_syncs(&outcome)
            )
        });
    let last_high = outcome
        .syncs
        .iter()
        .filter(|s| s.at_s < down.at_s && s.proposed >= down.current)
        .map(|s| s.at_s)
        .fold(f64::MIN, f64::max);
    assert!(
        down.at_s - last_high >= 300.0 - JITTER_S,
        "scaled down {} -> {} at {} s, only {} s after a recommendation of {}",
        down.current,
        down.desired,
        down.at_s,
        down.at_s - last_high,
        down.current
    );
    assert!(
        down.at_s > stopped.start_s,
        "scaled down at {} s, before the load stopped at {} s\n{}",
        down.at_s,
        stopped.start_s,
        describe_syncs(&outcome)
    );
    let last = outcome.syncs.last().unwrap();
    assert!(last.desired < peak, "still {} at the end", last.desired);

    // 4. Alerts: TokenBucketHighUsage did not fire before the hot keys, fired under the
    //    overload after its `for` (2m / 15), and resolved once the load stopped.
    // (The witness clients' hot key keeps its own policy's bucket drained all along: those
    // spans are `policy=witness`.)
    let spans: Vec<_> = outcome
        .alert("TokenBucketHighUsage")
        .into_iter()
        .filter(|a| a.labels.contains("policy=default"))
        .collect();
    assert!(
        spans
            .iter()
            .all(|a| a.pending_at >= overload.start_s - JITTER_S),
        "TokenBucketHighUsage pending before the overload: {spans:?}"
    );
    let fired = spans
        .iter()
        .find(|a| a.firing_at.is_some())
        .unwrap_or_else(|| {
            panic!(
                "TokenBucketHighUsage never fired: {:?}\nPrometheus health: {:?}",
                outcome.alerts, outcome.health
            )
        });
    let firing_at = fired.firing_at.unwrap();
    assert!(
        firing_at - fired.pending_at >= 120.0 - JITTER_S,
        "fired before its `for`: {fired:?}"
    );
    assert!(
        firing_at <= overload.end_s + JITTER_S,
        "fired only after the overload: {fired:?}"
    );
    let resolved = fired
        .resolved_at
        .unwrap_or_else(|| panic!("TokenBucketHighUsage never resolved: {fired:?}"));
    assert!(
        resolved >= overload.end_s - JITTER_S && resolved <= stopped.start_s + 120.0,
        "resolved at {resolved}, the load stopped at {}",
        stopped.start_s
    );

    // 5. The Deployment followed the HPA: pods started for the scale-up became ready, the
    //    per-pod rate came back to the target, and pods left after the window; the witnesses
    //    saw no under-limit refusal and hot-key admissions within the bounds at every change.
    let figures = Figures::of(&outcome);
    let scale_up = figures
        .to_ready
        .iter()
        .find(|r| !r.what.starts_with("kill"))
        .unwrap_or_else(|| panic!("no scale-up: {:?}", outcome.pod_events));
    let after = scale_up
        .after_s
        .unwrap_or_else(|| panic!("the scale-up never had its pods ready: {scale_up:?}"));
    // Start, pull from peers, first probe: seconds, not the minutes of a stuck rollout.
    assert!(after <= 120.0, "{scale_up:?}");
    let peak_pods = outcome
        .replica_counts
        .iter()
        .map(|c| c.ready)
        .max()
        .unwrap_or(0);
    assert_eq!(peak_pods, peak as usize, "{:?}", outcome.replica_counts);
    let end = outcome.replica_counts.last().unwrap();
    assert_eq!(
        (end.desired, end.running, end.ready),
        (
            last.desired as usize,
            last.desired as usize,
            last.desired as usize
        ),
        "the Deployment did not follow the HPA down: {:?}",
        outcome.replica_counts
    );
    assert!(
        figures.under_limit_refusals.is_empty(),
        "clients under their limit were refused: {:?}",
        figures.under_limit_refusals
    );
    let joins = figures
        .changes
        .iter()
        .filter(|c| c.what == "joined")
        .count();
    let leaves = figures.changes.iter().filter(|c| c.what == "left").count();
    assert!(joins >= 1 && leaves >= 1, "{:?}", figures.changes);
    for c in &figures.changes {
        assert!(c.ok(), "hot-key admissions out of bounds around {c:?}");
    }
    assert!(
        !figures.scale_downs.is_empty() && figures.scale_downs.iter().all(|d| d.ok()),
        "{:?}",
        figures.scale_downs
    );
    assert_eq!(figures.hpa_stuck_fired, 0, "{:?}", outcome.alerts);
    // Per pod after the scale-up settled: at most 10 % above the target (the HPA's pods took
    // the load), and at most 10 % below when the load generator delivered what it was asked
    // (otherwise the machine, not the stack, set the rate: say so).
    let delivered = overload
        .summary
        .as_ref()
        .map_or(0.0, |s| s.achieved_rps() / overload.rate);
    let answered_p50_ms = overload
        .summary
        .as_ref()
        .map_or(f64::INFINITY, |s| s.latency.p50_us as f64 / 1e3);
    match figures.settled.first() {
        Some(settled) => check_settled_per_pod_rate(settled, delivered, answered_p50_ms),
        // The sampler (Prometheus queries every scrape interval, 15 scenario seconds) has no
        // sample in the stretch when the machine cannot keep up: seen in CI, with the load
        // generator at 86 % of the overload's rate, 114 timeouts, and samples at 243 s and
        // 578 s, none within the settled stretch from 271 s. Then the machine set the rate, and
        // there is nothing to hold to the band; with the rate delivered, there must be one.
        None if delivered < 0.95 => eprintln!(
            "the load generator delivered {:.0} % of the overload's rate and the sampler saw no \
             settled stretch after the scale-up: the per-pod rate is not measured ({:?})",
            delivered * 100.0,
            outcome.replica_counts
        ),
        None => panic!(
            "no settled stretch after the scale-up: {:?}",
            outcome.replica_counts
        ),
    }

    // 6. The report.
    for (file, _) in openclaw_stack::report::PLOTS {
        let svg = std::fs::read_to_string(report.join(file)).unwrap();
        assert!(svg.starts_with("<svg"), "{file}");
    }
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    for expected in [
        format!("peak desired **{peak}**"),
        "`TokenBucketHighUsage`".to_owned(),
        "## Targets".to_owned(),
        "| zero refusals of clients under their limit across every join and leave | 0 refusals"
            .to_owned(),
        "## The Deployment".to_owned(),
        format!("| {} |", scale_up.what),
        "| joined |".to_owned(),
        "| left |".to_owned(),
    ] {
        assert!(
            md.contains(&expected),
            "report.md lacks {expected:?}:\n{md}"
        );
    }
    let replicas = std::fs::read_to_string(report.join("replicas.svg")).unwrap();
    assert!(replicas.contains("ready (in the Service)"));
    let per_pod = std::fs::read_to_string(report.join("per-pod.svg")).unwrap();
    assert!(per_pod.contains("HPA target 800/pod"));
    let witness = std::fs::read_to_string(report.join("witness.svg")).unwrap();
    assert!(witness.contains("admitted - ideal bucket"));
    rt.block_on(stack.shutdown());
}

#[test]
fn a_replica_killed_mid_spike_is_restarted_the_survivors_keep_answering_and_the_report_shows_it() {
    let _serial = one_stack_at_a_time();
    let work = tempfile::tempdir().unwrap();
    let rt = openclaw_stack::runtime().unwrap();
    let mut stack = rt.block_on(Stack::up(options(work.path()))).unwrap();
    let victim = REPLICAS - 1;
    let victim_api = stack.deployment.status().pods[victim].api.clone().unwrap();
    let outcome = rt
        .block_on(scenario::run(
            &mut stack,
            &scenario::Options {
                profile: Profile::named("quick", REPLICAS).unwrap(),
                kill: Some(Kill {
                    replica: victim,
                    at: Duration::from_secs(120),
                }),
                progress: false,
                hpa_manifest: None,
                hpa_patches: Vec::new(),
            },
            std::future::pending(),
        ))
        .unwrap();
    // The report first, so that a failing assertion leaves it to look at.
    let report = write_report(&outcome, "kill");
    let kill = outcome.kill.clone().expect("the replica was killed");
    assert_eq!(kill.node_id, "limiter-2");
    assert_eq!(kill.api, victim_api);
    let spike = phase(&outcome, "spike");
    let overload = phase(&outcome, "overload");
    assert!(spike.start_s <= kill.at_s && kill.at_s < spike.end_s);

    // The stack restarted it, as the kubelet would: after the back-off (10 s / 30), at a new
    // address, and the Service took it back once its readiness probe passed.
    let after_kill = |kind: fn(&EventKind) -> bool| {
        outcome
            .pod_events
            .iter()
            .find(|e| e.pod == kill.node_id && e.t >= kill.at_s && kind(&e.kind))
            .map(|e| e.t)
    };
    let restarted = after_kill(|k| *k == EventKind::Restarted)
        .unwrap_or_else(|| panic!("never restarted: {:?}", outcome.pod_events));
    let ready = after_kill(|k| *k == EventKind::Ready)
        .unwrap_or_else(|| panic!("never ready again: {:?}", outcome.pod_events));
    assert!(
        restarted - kill.at_s >= 10.0 - 1.0,
        "restarted {} s after the kill, before the back-off",
        restarted - kill.at_s
    );
    assert!(
        ready > restarted && ready - kill.at_s <= 120.0,
        "ready again at {ready}"
    );
    let figures = Figures::of(&outcome);
    let back = figures
        .to_ready
        .iter()
        .find(|r| r.what == "kill -9 limiter-2")
        .unwrap();
    assert!(back.after_s.is_some(), "{back:?}");

    // The load generator: requests in flight on the killed pod may fail; the survivors and then
    // the restarted pod answer everything else, and none found no pod at all. What was in
    // flight on the killed pod is lost, and on 2 cores running debug builds at 3000 requests/s
    // the moment of the kill (a pod dying, one joining, Prometheus, the adapter) also times a
    // few percent out: 356 of 7646 (4.7 %) in one CI run. The bound is 10 %: survivors that
    // stopped answering would fail a third of the spike and more.
    let spike_summary = spike.summary.as_ref().unwrap();
    assert!(
        spike_summary.errors <= spike_summary.requests / 10
            && !spike_summary.errors_by_kind.contains_key("connect"),
        "{} of {} requests failed in the spike: {:?}",
        spike_summary.errors,
        spike_summary.requests,
        spike_summary.errors_by_kind
    );
    let later = overload.summary.as_ref().unwrap();
    assert_eq!(
        later.errors_by_kind.get("connect"),
        None,
        "requests found no pod to go to: {:?}",
        later.errors_by_kind
    );
    let status_api = |t: &openclaw_stack::loadgen::TargetCounts| t.target.clone();
    let new_api = later
        .per_target
        .iter()
        .filter(|t| t.allowed > 0)
        .map(status_api)
        .filter(|t| !victim_api.ends_with(t.trim_start_matches("http://")))
        .count();
    assert!(
        new_api >= REPLICAS,
        "the restarted pod took no load: {:?}",
        later.per_target
    );
    for t in &later.per_target {
        if victim_api.ends_with(t.target.trim_start_matches("http://")) {
            assert_eq!(t.requests, 0, "the dead address answered: {t:?}");
        }
    }
    // No under-limit client was refused across the kill and the restart.
    assert!(
        figures.under_limit_refusals.is_empty(),
        "{:?}",
        figures.under_limit_refusals
    );
    // Back before its `for`: the target-down alert never fired.
    assert!(
        outcome
            .alert("OpenClawLimiterTargetDown")
            .iter()
            .all(|a| a.firing_at.is_none()),
        "{:?}",
        outcome.alerts
    );
    // The HPA kept reading its metrics.
    assert!(
        outcome
            .syncs
            .iter()
            .filter(|s| s.at_s > kill.at_s)
            .all(|s| s.metrics.iter().all(|m| m.value.is_ok())),
        "a metric failed after the kill\n{}",
        describe_syncs(&outcome)
    );

    // The report tells the story.
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    for expected in [
        "## The kill",
        "`limiter-2`",
        "SIGKILL",
        "restarted `limiter-2` at",
        "ready again at",
        "| kill -9 limiter-2 |",
        "| killed |",
        "| restarted |",
    ] {
        assert!(md.contains(expected), "report.md lacks {expected:?}:\n{md}");
    }
    let lag = std::fs::read_to_string(report.join("replication-lag.svg")).unwrap();
    assert!(lag.contains("kill -9 limiter-2"));
    rt.block_on(stack.shutdown());
}

/// A stack of `replicas` pods whose buckets refill over an hour (so what was spent stays
/// visible) and whose pods exchange deltas only every minute: a consumption a pod did not
/// report by itself reaches the others only by the join pull or the leave hand-over.
fn quiet_options(work: &Path, replicas: usize) -> Options {
    let mut o = options(work);
    o.replicas = replicas;
    o.limiter_env = vec![
        ("REFILL_INTERVAL_MS".into(), "3600000".into()),
        ("OPENCLAW_SYNC_INTERVAL_MS".into(), "60000".into()),
        ("OPENCLAW_ANTI_ENTROPY_INTERVAL_MS".into(), "60000".into()),
        ("OPENCLAW_SNAPSHOT_INTERVAL_S".into(), "1".into()),
    ];
    o
}

/// `remaining` of `key` on the pod at `api`.
fn remaining(http: &reqwest::blocking::Client, api: &str, key: &str) -> Option<u64> {
    let status: Value = http
        .get(format!("{api}/status?key={key}"))
        .send()
        .ok()?
        .json()
        .ok()?;
    status["bucket"]["remaining"].as_u64()
}

#[test]
fn the_stack_follows_a_desired_count_a_new_pod_joins_with_its_peers_state_and_takes_load_and_a_leaving_pod_hands_over()
 {
    let _serial = one_stack_at_a_time();
    let work = tempfile::tempdir().unwrap();
    let rt = openclaw_stack::runtime().unwrap();
    let stack = rt
        .block_on(Stack::up(quiet_options(work.path(), 2)))
        .unwrap();
    let http = http_client();
    let deployment = &stack.deployment;
    let api = |name: &str| {
        deployment
            .status()
            .pod(name)
            .and_then(|p| p.api.clone())
            .unwrap_or_else(|| panic!("no {name}: {:?}", deployment.status()))
    };
    assert_eq!(deployment.endpoints().current().len(), 2);

    // Spent before the new pod exists: it must pull it before /ready.
    let spent = http
        .get(format!(
            "{}/rate?key=before-join&cost=300",
            api("limiter-0")
        ))
        .send()
        .unwrap();
    assert_eq!(spent.status(), 200);

    // Scale up: limiter-2 starts, pulls, turns ready, enters the Service, the peers file and
    // Prometheus' targets (with the pods' app label).
    deployment.scale(3);
    let status = rt
        .block_on(
            deployment.wait_for("3 pods ready", Duration::from_secs(30), |s| {
                s.settled() && s.desired == 3
            }),
        )
        .unwrap();
    let new = status.pod("limiter-2").expect("the new pod is limiter-2");
    let new_api = new.api.clone().unwrap();
    assert_eq!(new.phase, Phase::Ready);
    assert!(
        deployment
            .endpoints()
            .current()
            .iter()
            .any(|e| new_api.ends_with(e.trim_start_matches("http://"))),
        "the Service lacks the new pod: {:?}",
        deployment.endpoints().current()
    );
    let peers = std::fs::read_to_string(deployment.template().peers_file()).unwrap();
    assert!(peers.contains(new.peer.as_deref().unwrap()), "{peers}");
    let left = remaining(&http, &new_api, "before-join").unwrap();
    assert!(
        left <= 700,
        "the new pod turned ready without its peers' state: {left} tokens left"
    );
    let prometheus = stack.prometheus.url().to_owned();
    wait_until(
        Duration::from_secs(20),
        "Prometheus to scrape limiter-2 with app=openclaw",
        || {
            let body: Value = http
                .get(format!("{prometheus}/api/v1/query"))
                .query(&[(
                    "query",
                    "up{job=\"openclaw-limiter\",app=\"openclaw\",pod=\"limiter-2\"}",
                )])
                .send()
                .ok()?
                .json()
                .ok()?;
            (body["data"]["result"][0]["value"][1].as_str()? == "1").then_some(())
        },
    );

    // The load goes to it: a short run through the Service.
    let plan = openclaw_stack::loadgen::Plan {
        endpoints: Some(deployment.endpoints().clone()),
        drive: openclaw_stack::loadgen::Drive::OpenLoop(
            openclaw_stack::loadgen::RateProfile::Constant(300.0),
        ),
        duration: Duration::from_secs(1),
        ..openclaw_stack::loadgen::Plan::default()
    };
    let summary = rt
        .block_on(openclaw_stack::loadgen::run(
            &plan,
            |_| {},
            std::future::pending(),
        ))
        .unwrap();
    assert_eq!(summary.errors, 0, "{summary:?}");
    let on_new = summary
        .per_target
        .iter()
        .find(|t| new_api.ends_with(t.target.trim_start_matches("http://")))
        .map_or(0, |t| t.requests);
    assert!(
        (80..=120).contains(&on_new),
        "the new pod got {on_new} of 300 requests: {:?}",
        summary.per_target
    );

    // The operations guide's own HPA (its apiVersion aside: tests/fixtures/) against this
    // stack's adapter and Prometheus: both metrics narrowed by the pods' `app` label, read (the
    // requests just sent included), and a decision made rather than FailedGetExternalMetric.
    let (mut guide, _) = scenario::hpa_simulator(
        &default_config_dir(),
        Some(Path::new("tests/fixtures/operations-guide-hpa.yaml")),
        &[],
        3,
    )
    .unwrap();
    let client = metrics_adapter::hpa_sim::http_client(Duration::from_secs(5)).unwrap();
    let record = rt.block_on(guide.sync(&client, &stack.adapter_url, 0.0));
    assert_eq!(record.metrics.len(), 2, "{record:?}");
    for reading in &record.metrics {
        assert_eq!(reading.selector, "app=openclaw", "{record:?}");
        assert!(
            reading.value.is_ok(),
            "the guide's HPA could not read: {record:?}"
        );
    }
    assert!(
        !record.reason.starts_with("FailedGetExternalMetric"),
        "{record:?}"
    );

    // Spent on the pod that will leave (the newest ready goes first), then scale down: SIGTERM,
    // it hands its changes over, exits, leaves the peers file and the targets.
    let spent = http
        .get(format!("{new_api}/rate?key=on-the-leaver&cost=600"))
        .send()
        .unwrap();
    assert_eq!(spent.status(), 200);
    deployment.scale(2);
    let status = rt
        .block_on(
            deployment.wait_for("limiter-2 gone", Duration::from_secs(40), |s| {
                s.pods.len() == 2 && s.pod("limiter-2").is_none()
            }),
        )
        .unwrap();
    let stopped = deployment
        .events()
        .into_iter()
        .find(|e| e.pod == "limiter-2" && matches!(e.kind, EventKind::Stopped(_)))
        .unwrap();
    assert_eq!(
        stopped.kind,
        EventKind::Stopped("exit status: 0".into()),
        "limiter-2 did not stop cleanly"
    );
    for p in &status.pods {
        let api = p.api.clone().unwrap();
        let left = remaining(&http, &api, "on-the-leaver").unwrap();
        assert!(
            left <= 401,
            "{} lost what limiter-2 spent before leaving: {left} tokens left",
            p.name
        );
    }
    let peers = std::fs::read_to_string(deployment.template().peers_file()).unwrap();
    assert!(!peers.contains(new.peer.as_deref().unwrap()), "{peers}");
    assert_eq!(deployment.endpoints().current().len(), 2);
    rt.block_on(stack.shutdown());
}

#[test]
fn a_killed_pod_is_restarted_after_the_back_off_from_its_snapshot_directory_and_rejoins_the_service()
 {
    let _serial = one_stack_at_a_time();
    let work = tempfile::tempdir().unwrap();
    let rt = openclaw_stack::runtime().unwrap();
    let stack = rt
        .block_on(Stack::up(quiet_options(work.path(), 2)))
        .unwrap();
    let http = http_client();
    let deployment = &stack.deployment;
    let before = deployment.status().pod("limiter-1").cloned().unwrap();
    let old_api = before.api.clone().unwrap();
    let spent = http
        .get(format!("{old_api}/rate?key=kept&cost=500"))
        .send()
        .unwrap();
    assert_eq!(spent.status(), 200);
    // A periodic snapshot (every second here) holds it.
    let snapshots = deployment.template().snapshot_dir("limiter-1");
    let since = std::time::SystemTime::now();
    wait_until(
        Duration::from_secs(10),
        "a snapshot after the spend",
        || {
            std::fs::read_dir(&snapshots)
                .ok()?
                .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
                .any(|m| m > since)
                .then_some(())
        },
    );

    let killed = rt.block_on(deployment.kill("limiter-1")).unwrap();
    assert_eq!(killed.pid, before.pid);
    // Out of the Service at once, restarted after the back-off, in it again once ready.
    rt.block_on(
        deployment.wait_for("limiter-1 crashed", Duration::from_secs(5), |s| {
            s.pod("limiter-1")
                .is_some_and(|p| p.phase == Phase::Crashed)
                && s.ready() == 1
        }),
    )
    .unwrap();
    assert_eq!(deployment.endpoints().current().len(), 1);
    let status = rt
        .block_on(
            deployment.wait_for("limiter-1 ready again", Duration::from_secs(30), |s| {
                s.pod("limiter-1")
                    .is_some_and(|p| p.phase == Phase::Ready && p.restarts == 1)
            }),
        )
        .unwrap();
    let again = status.pod("limiter-1").unwrap();
    assert_ne!(again.pid, before.pid);
    let new_api = again.api.clone().unwrap();
    assert_ne!(new_api, old_api);
    assert_eq!(deployment.endpoints().current().len(), 2);
    let events = deployment.events();
    let at = |kind: EventKind| {
        events
            .iter()
            .find(|e| e.pod == "limiter-1" && e.kind == kind)
            .map(|e| e.at)
            .unwrap()
    };
    let waited = at(EventKind::Restarted) - at(EventKind::Killed);
    // 10 s of scenario time at x30.
    assert!(
        waited >= Duration::from_millis(300),
        "restarted after {waited:?}"
    );
    // Its own snapshot directory: the restarted process restored what it had spent.
    let log = std::fs::read_to_string(work.path().join("logs/limiter-1.log")).unwrap();
    let restore = log
        .lines()
        .rfind(|l| l.contains("snapshot restored"))
        .unwrap_or_else(|| panic!("no snapshot restore in the log:\n{log}"));
    assert!(restore.contains("limiter-1"), "{restore}");
    let left = remaining(&http, &new_api, "kept").unwrap();
    assert!(
        left <= 501,
        "the restarted pod forgot its consumption: {left} left"
    );
    rt.block_on(stack.shutdown());
}

/// `openclaw-stack up` as a user runs it; on drop (also on panic) SIGTERM, so the stack stops
/// its children, then SIGKILL to any child it listed that is still alive, in case it hung.
struct UpCommand {
    stack: ChildGuard,
    children: Vec<u32>,
}

impl Drop for UpCommand {
    fn drop(&mut self) {
        self.stack.terminate(Duration::from_secs(20));
        for &pid in &self.children {
            // Positive process ids only, and only live ones: procps' `kill -KILL -PGID` (without
            // `--`) signals every process (-1), and a reaped pid may have been reused.
            if pid > 1 && alive(pid) {
                let _ = std::process::Command::new("kill")
                    .args(["-s", "KILL", "--", &pid.to_string()])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
}

/// The process ids in the stack's table on stderr (`limiter-0  http://...  14597  peer ...`).
fn table_pids(log: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| {
            ["limiter-", "prometheus ", "metrics-adapter "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
        .collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[test]
fn the_up_command_prints_where_everything_listens_and_ctrl_c_stops_every_process() {
    let mut cmd = std::process::Command::new(workspace_bin("openclaw-stack"));
    cmd.args(["up", "--time-scale", "30", "--replicas", "3"]);
    let mut up = UpCommand {
        stack: ChildGuard::spawn("openclaw-stack", cmd),
        children: Vec::new(),
    };
    let lines = up.stack.stdout_lines();
    let mut listening = Vec::new();
    let until = Instant::now() + Duration::from_secs(60);
    while listening.len() < 5 {
        let left = until.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => listening.extend(parse_listening(&line)),
            Err(e) => panic!(
                "{} listening lines before {e:?}:\n{}",
                listening.len(),
                up.stack.log_tail(40)
            ),
        }
    }
    let url = |name: &str| {
        listening
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, u)| u.clone())
            .unwrap_or_else(|| panic!("no `listening {name}=` in {listening:?}"))
    };
    // The table follows the listening lines on stderr.
    up.children = wait_until(Duration::from_secs(10), "the table of processes", || {
        let pids = table_pids(&up.stack.log());
        (pids.len() == 5).then_some(pids)
    });

    // Everything answers, and the replicas are peered: 600 tokens spent on limiter-0 are
    // missing on limiter-2.
    let http = http_client();
    let spent = http
        .get(format!("{}/rate?key=alice&cost=600", url("limiter-0")))
        .send()
        .unwrap();
    assert_eq!(spent.status(), 200);
    wait_until(
        Duration::from_secs(10),
        "limiter-2 to see limiter-0's consumption",
        || {
            let status: Value = http
                .get(format!("{}/status?key=alice", url("limiter-2")))
                .send()
                .ok()?
                .json()
                .ok()?;
            (status["bucket"]["remaining"].as_u64()? < 1000).then_some(())
        },
    );
    // rate() needs two scrapes: poll until the adapter has a value to serve.
    wait_until(
        Duration::from_secs(30),
        "the adapter to serve openclaw_requests_per_second",
        || {
            http.get(format!(
                "{}/apis/external.metrics.k8s.io/v1beta1/namespaces/openclaw/{RPS}",
                url("metrics-adapter")
            ))
            .send()
            .ok()
            .filter(|r| r.status() == 200)
            .map(|_| ())
        },
    );
    let targets: Value = http
        .get(format!("{}/api/v1/targets", url("prometheus")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let jobs: Vec<(&str, &str)> = targets["data"]["activeTargets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["labels"]["job"].as_str().unwrap_or_default(),
                t["health"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    for job in ["openclaw-limiter", "openclaw-metrics-adapter", "prometheus"] {
        assert!(
            jobs.iter().any(|(j, h)| *j == job && *h == "up"),
            "{job} not scraped: {jobs:?}"
        );
    }

    // Ctrl-C: the stack stops every child cleanly, then exits.
    let pid = up.stack.id();
    assert!(pid > 1, "no process id for the stack");
    let sent = std::process::Command::new("kill")
        .args(["-s", "INT", "--", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    wait_until(
        Duration::from_secs(40),
        "the stack to exit after SIGINT",
        || up.stack.has_exited().then_some(()),
    );
    let log = up.stack.log();
    for name in [
        "limiter-0",
        "limiter-1",
        "limiter-2",
        "prometheus",
        "metrics-adapter",
    ] {
        assert!(
            log.contains(&format!("  {name}: exit status: 0")),
            "{name} did not exit cleanly:\n{log}"
        );
    }
    for child in &up.children {
        assert!(!alive(*child), "process {child} outlived the stack");
    }
}

/// The per-pod rate over the first stretch settled after the scale-up, with the load generator
/// having delivered `delivered` of the overload's rate, answered in `answered_p50_ms` (median).
fn check_settled_per_pod_rate(settled: &SettledRate, delivered: f64, answered_p50_ms: f64) {
    assert!(
        settled.per_pod <= settled.expected * 1.1,
        "per-pod rate above the target after the scale-up: {settled:?}"
    );
    // A stretch the sampler saw once or twice says little: on a loaded 2-core machine the
    // sampler (Prometheus queries every scrape interval, 15 scenario seconds) can fall behind,
    // and one x30 sample of a 2 s rate window is noise (seen in CI: one sample, 522/s at 4
    // pods, while the load generator delivered its rate). Such a stretch is reported, not held
    // to the band.
    // Nor is a stretch whose requests waited in queues: answers at a median of 300 ms (a
    // quiet run answers in 5 ms) mean the machine was short of CPU for everything, the sampler
    // included (seen in CI: 3 samples, pods 67 % apart, 385/s at 5 pods, with the rate
    // delivered).
    if delivered >= 0.95 && answered_p50_ms <= 100.0 && settled.samples >= 3 {
        // The HPA sets whole pods: settled at n pods, the per-pod rate lies between
        // target·(n-1)/n (fewer pods would have done) and the target, each give or take its
        // 10 % tolerance. At x30 the 2 s rate windows are noisy enough that the HPA sometimes
        // takes 5 pods for a load 4 carry at 780/s (seen in CI: 5 pods at 702/s), so this test
        // holds the figure to that band; the report, and the 20-minute real-time run in
        // docs/reports, hold it to the issue's ±10 % of the target.
        let n = settled.pods as f64;
        let (low, high) = (
            settled.expected * (n - 1.0) / n * 0.9,
            settled.expected * 1.1,
        );
        assert!(
            (low..=high).contains(&settled.per_pod),
            "per-pod rate outside what {n} pods allow ({low:.0} to {high:.0}): {settled:?}"
        );
    } else {
        eprintln!(
            "the load generator delivered {:.0} % of the overload's rate, answered at a median \
             of {answered_p50_ms:.1} ms, and the sampler saw the stretch {} times: per-pod \
             {settled:?} not held to the lower bound",
            delivered * 100.0,
            settled.samples
        );
    }
}
