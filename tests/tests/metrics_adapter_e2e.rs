//! The metrics adapter end to end: a real `openclaw-limiter` under traffic, a real Prometheus
//! (Debian's) scraping it every second, and the real `openclaw-metrics-adapter` binary serving
//! the shipped default rules over plain HTTP with `--authentication=none` (TLS and delegated
//! auth are covered by the adapter crate's `tls_*` / `auth_*` tests).
//!
//! Needs `cargo build --workspace --bins` and `/usr/bin/prometheus` (`apt-get install -y prometheus`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metrics_adapter::config::DEFAULT_YAML;
use metrics_adapter::quantity::Decimal;
use openclaw_common::metric_names as m;
use openclaw_e2e::{Prometheus, Service, http_client, spawn_adapter, wait_until};
use serde_json::Value;

const LIST: &str = "/apis/external.metrics.k8s.io/v1beta1/namespaces/default";
/// Per-rule timeout in the adapter config of these tests.
const TIMEOUT: Duration = Duration::from_secs(1);

/// Limiter + Prometheus + adapter, and a bounded traffic generator.
struct Stack {
    // Field order is drop order: stop traffic first, then the processes.
    _traffic: Traffic,
    adapter: Service,
    prometheus: Prometheus,
    _limiter: Service,
    _config: tempfile::NamedTempFile,
}

/// Sends `/rate` calls for a few keys (5 tokens/s each) until dropped, at most 2 minutes.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Traffic {
    fn start(limiter_url: String) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let http = http_client();
            let until = Instant::now() + Duration::from_secs(120);
            let mut i = 0u64;
            while !flag.load(Ordering::Relaxed) && Instant::now() < until {
                let key = format!("client-{}", i % 4);
                let _ = http
                    .get(format!(
                        "{limiter_url}/rate?key={key}&policy=default&cost=1"
                    ))
                    .send();
                i += 1;
                // Paces the load (~40 requests/s: some allowed, some rejected); not a synchronization.
                std::thread::sleep(Duration::from_millis(25));
            }
        });
        Traffic {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Stack {
    fn start() -> Stack {
        let limiter = Service::spawn(
            "openclaw-limiter",
            &["--listen", "127.0.0.1:0"],
            &[("BUCKET_CAPACITY", "5"), ("REFILL_INTERVAL_MS", "1000")],
            Duration::from_secs(20),
        );
        let limiter_url = limiter.url_of("api").unwrap_or(&limiter.url).to_owned();
        let traffic = Traffic::start(limiter_url.clone());
        // `app: openclaw` on every limiter series, as the ServiceMonitor's podTargetLabels put
        // the pods' `app` label there in a cluster (deploy/base/monitoring/servicemonitors.yaml).
        let prometheus = Prometheus::start_with_target_labels(
            &[openclaw_e2e::host_port(&limiter_url)],
            &[("app", "openclaw")],
            &[],
        );

        // The shipped rules, with the cache off (so each call is a fresh query to compare) and
        // a short timeout (so the outage test is quick).
        let yaml = DEFAULT_YAML
            .replace("timeout: 2s", "timeout: 1s")
            .replace("cache_ttl: 5s", "cache_ttl: 0s")
            // A rule whose value only changes at scrapes (no rate() extrapolation), so the
            // adapter's answer can be compared with Prometheus' exactly.
            + "\n  - name: e2e_requests_total\n    query: sum(openclaw_requests_total)\n    selectable_labels: [policy, decision, app]\n";
        assert_ne!(
            yaml, DEFAULT_YAML,
            "the default config changed shape; update this test"
        );
        let config = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(config.path(), yaml).unwrap();
        let adapter = spawn_adapter(&prometheus.url(), config.path(), true, &[]);
        let stack = Stack {
            _traffic: traffic,
            adapter,
            prometheus,
            _limiter: limiter,
            _config: config,
        };
        // rate() needs two scrapes with traffic in between.
        wait_until(
            Duration::from_secs(30),
            "Prometheus to have a request rate",
            || {
                let v = stack
                    .prometheus
                    .vector(&format!("sum(rate({}[1m]))", m::REQUESTS_TOTAL))
                    .ok()?;
                v.first().filter(|(_, value)| value != "0").map(|_| ())
            },
        );
        stack
    }

    fn adapter_get(&self, path_and_query: &str) -> (u16, Value, Duration) {
        let started = Instant::now();
        let r = http_client()
            .get(format!("{}{path_and_query}", self.adapter.url))
            .send()
            .expect("adapter reachable");
        let status = r.status().as_u16();
        let body = r.json().unwrap_or(Value::Null);
        (status, body, started.elapsed())
    }

    /// The single value Prometheus gives for `promql`, as the quantity the adapter should serve.
    fn direct(&self, promql: &str) -> Option<String> {
        let v = self.prometheus.vector(promql).ok()?;
        let (_, value) = v.first()?;
        Some(
            Decimal::parse_sample(value)
                .ok()?
                .to_milli()
                .ok()?
                .to_string(),
        )
    }

    /// Asks Prometheus, then the adapter, then Prometheus again, until both direct answers agree
    /// (no scrape landed in between), and returns (direct, served).
    fn served(&self, metric: &str, selector: &str) -> (u16, Value) {
        let query = if selector.is_empty() {
            String::new()
        } else {
            format!("?labelSelector={selector}")
        };
        let (status, body, _) = self.adapter_get(&format!("{LIST}/{metric}{query}"));
        (status, body)
    }

    /// Asks Prometheus, then the adapter, then Prometheus again, until both direct answers agree
    /// (no scrape landed in between), and returns (direct, served). For queries whose value
    /// only changes when a scrape lands.
    fn compare_exact(&self, metric: &str, selector: &str, promql: &str) -> (String, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = String::new();
        while Instant::now() < deadline {
            let before = self.direct(promql);
            let (status, body) = self.served(metric, selector);
            let after = self.direct(promql);
            let served = body["items"][0]["value"].as_str().map(str::to_owned);
            if status == 200
                && let (Some(b), Some(a), Some(v)) = (&before, &after, &served)
                && b == a
            {
                return (b.clone(), v.clone());
            }
            last = format!(
                "direct before {before:?}, adapter {status} {body}, direct after {after:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "no stable comparison of {metric}?{selector} with `{promql}` within 20s; last: {last}"
        );
    }

    /// For rate() queries, whose value moves with the evaluation time itself (extrapolation to
    /// the window's edges): the adapter's answer must lie between the direct answers taken just
    /// before and just after it (1m of slack for rounding up to milli-units). Between two
    /// samples the value moves one way; a sample landing (or leaving the window) between the
    /// three queries can jump it back (seen: 845m served between 859m and 847m), so a try that
    /// does not bracket is made again, up to five times: a wrong answer brackets none.
    fn compare_bracketed(&self, metric: &str, selector: &str, promql: &str) -> i64 {
        let milli = |q: &str| {
            metrics_adapter::quantity::parse_quantity_milli(q)
                .unwrap()
                .0
        };
        let mut tries = Vec::new();
        for _ in 0..5 {
            let before = self
                .direct(promql)
                .unwrap_or_else(|| panic!("Prometheus has no value for {promql}"));
            let (status, body) = self.served(metric, selector);
            let after = self
                .direct(promql)
                .unwrap_or_else(|| panic!("Prometheus has no value for {promql}"));
            assert_eq!(status, 200, "{metric}?{selector}: {body}");
            let served = milli(body["items"][0]["value"].as_str().unwrap());
            let (lo, hi) = (
                milli(&before).min(milli(&after)),
                milli(&before).max(milli(&after)),
            );
            if lo - 1 <= served && served <= hi + 1 {
                return served;
            }
            tries.push(format!("served {served}m outside [{lo}m, {hi}m]"));
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{metric}?{selector} from `{promql}`: {}", tries.join("; "))
    }
}

#[test]
fn the_adapter_serves_what_prometheus_answers_and_selectors_narrow_it() {
    let s = Stack::start();
    let total = |sel: &str| format!("sum({}{sel})", m::REQUESTS_TOTAL);

    // Exactly equal, with every selector operator, on a query that only moves at scrapes.
    wait_until(
        Duration::from_secs(30),
        "rejections to show in Prometheus",
        || s.direct(&total("{decision=\"rejected\"}")),
    );
    let milli = |q: &str| {
        metrics_adapter::quantity::parse_quantity_milli(q)
            .unwrap()
            .0
    };
    let (direct, served) = s.compare_exact("e2e_requests_total", "", &total(""));
    assert_eq!(served, direct);
    let all = milli(&served);
    for (selector, matchers) in [
        ("decision%3Dallowed", "{decision=\"allowed\"}"),
        ("decision%3D%3Drejected", "{decision=\"rejected\"}"),
        ("decision!%3Dallowed", "{decision!=\"allowed\"}"),
        (
            "decision%20in%20(allowed,rejected),policy%3Ddefault",
            "{decision=~\"allowed|rejected\",policy=\"default\"}",
        ),
        ("decision%20notin%20(rejected)", "{decision!~\"rejected\"}"),
        ("policy", "{policy!=\"\"}"),
        ("app%3Dopenclaw", "{app=\"openclaw\"}"),
        // A label no series has: `!k` holds for all of them (Kubernetes' meaning).
        ("!nosuchlabel", "{nosuchlabel=\"\"}"),
    ] {
        let (direct, served) = s.compare_exact("e2e_requests_total", selector, &total(matchers));
        assert_eq!(served, direct, "labelSelector={selector}");
    }
    // A narrower selector serves less than the whole.
    let (_, allowed) = s.compare_exact(
        "e2e_requests_total",
        "decision%3Dallowed",
        &total("{decision=\"allowed\"}"),
    );
    assert!(
        milli(&allowed) < all,
        "allowed {allowed} should be below all {all}m"
    );
    // `!policy`: no series lack the label, so nothing is left: a 404 that shows the PromQL.
    let (status, body) = s.served("e2e_requests_total", "!policy");
    assert_eq!(status, 404, "{body}");
    let (status, body) = s.served(m::EXTERNAL_REQUESTS_PER_SECOND, "policy%3Dno-such-policy");
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["kind"], "Status");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("policy=\"no-such-policy\""),
        "{body}"
    );

    // The shipped rules, compared with the same PromQL asked of Prometheus at the same moment.
    let rps = |sel: &str| format!("sum(rate({}{sel}[1m]))", m::REQUESTS_TOTAL);
    let all_rps = s.compare_bracketed(m::EXTERNAL_REQUESTS_PER_SECOND, "", &rps(""));
    assert!(all_rps > 0);
    let allowed_rps = s.compare_bracketed(
        m::EXTERNAL_REQUESTS_PER_SECOND,
        "decision%3Dallowed",
        &rps("{decision=\"allowed\"}"),
    );
    assert!(
        allowed_rps < all_rps,
        "allowed {allowed_rps}m vs all {all_rps}m"
    );
    s.compare_bracketed(
        m::EXTERNAL_REQUESTS_PER_SECOND,
        "decision%3Drejected",
        &rps("{decision=\"rejected\"}"),
    );
    let depletion = format!(
        "sum(rate({}[1m])) / sum(rate({}[1m]))",
        m::BUCKET_DEPLETION_TOTAL,
        m::REQUESTS_TOTAL
    );
    let ratio = s.compare_bracketed(m::EXTERNAL_TOKEN_DEPLETION_RATE, "", &depletion);
    // Some requests were rejected (above), so some met an empty bucket; the ratio is an average
    // of levels between 0 and 1.
    assert!(
        ratio > 0 && ratio <= 1000,
        "requests met drained buckets: {ratio}m"
    );
    let (status, body) = s.served(m::EXTERNAL_TOKEN_DEPLETION_RATE, "policy%3Ddefault");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["items"][0]["window"], 60);
    assert!(
        body["items"][0]["timestamp"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    // Selecting by a label the depletion rule does not allow is a 400, not silently ignored.
    let (status, body) = s.served(m::EXTERNAL_TOKEN_DEPLETION_RATE, "decision%3Dallowed");
    assert_eq!(status, 400, "{body}");
}

#[test]
fn a_stopped_prometheus_is_a_500_status_within_the_timeout_and_the_adapter_recovers() {
    let mut s = Stack::start();
    let path = format!("{LIST}/{}", m::EXTERNAL_REQUESTS_PER_SECOND);
    assert_eq!(s.adapter_get(&path).0, 200);

    s.prometheus.stop();
    let (status, body, took) = s.adapter_get(&path);
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["status"], "Failure");
    assert!(
        body["message"].as_str().unwrap().contains("Prometheus"),
        "{body}"
    );
    assert!(took < TIMEOUT + Duration::from_millis(500), "took {took:?}");
    // Discovery and health do not depend on Prometheus.
    assert_eq!(
        s.adapter_get("/apis/external.metrics.k8s.io/v1beta1").0,
        200
    );
    assert_eq!(s.adapter_get("/readyz").0, 200);

    s.prometheus.restart();
    wait_until(
        Duration::from_secs(30),
        "the adapter to serve again after Prometheus returned",
        || (s.adapter_get(&path).0 == 200).then_some(()),
    );
    let metrics = http_client()
        .get(format!("{}/metrics", s.adapter.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "openclaw_adapter_prometheus_queries_total{{metric=\"{}\",outcome=\"error\"}}",
            m::EXTERNAL_REQUESTS_PER_SECOND
        )),
        "{metrics}"
    );
}

/// The operations guide's HPA (`tests/fixtures/operations-guide-hpa.yaml`), as an SRE
/// following the guide applies it, apiVersion aside: both metrics selected by `app: openclaw`.
/// Each list call is made as the HPA controller makes it (path, escaping, Accept header) and
/// read as it reads it; every metric must be served, and the controller must reach a decision.
#[test]
fn the_operations_guides_hpa_reads_both_metrics_narrowed_by_app() {
    use metrics_adapter::hpa_sim::{self, HpaSimulator};
    let s = Stack::start();
    let yaml = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/operations-guide-hpa.yaml"),
    )
    .unwrap();
    let mut hpa = HpaSimulator::from_manifest(&yaml, 3).unwrap();
    let paths = hpa.list_paths();
    assert_eq!(
        paths,
        [
            format!(
                "{LIST}/{}?labelSelector=app%3Dopenclaw",
                m::EXTERNAL_REQUESTS_PER_SECOND
            ),
            format!(
                "{LIST}/{}?labelSelector=app%3Dopenclaw",
                m::EXTERNAL_TOKEN_DEPLETION_RATE
            ),
        ]
    );
    let usages: Vec<Result<i64, String>> = paths
        .iter()
        .map(|path| {
            let r = http_client()
                .get(format!("{}{path}", s.adapter.url))
                .header("Accept", hpa_sim::ACCEPT)
                .send()
                .expect("adapter reachable");
            let status = r.status().as_u16();
            hpa_sim::read_list_answer(status, &r.bytes().unwrap())
        })
        .collect();
    for (path, usage) in paths.iter().zip(&usages) {
        assert!(usage.is_ok(), "{path}: {usage:?}");
    }
    assert!(usages[0].as_ref().is_ok_and(|u| *u > 0), "{usages:?}");
    let record = hpa.decide_from_readings(0.0, &usages);
    assert!(
        record.metrics.iter().all(|r| r.proposal.is_some()),
        "{record:?}"
    );
    assert!(
        !record.reason.starts_with("FailedGetExternalMetric"),
        "{record:?}"
    );

    // The narrowing is real: app="openclaw" is in the PromQL Prometheus runs (the same query
    // asked directly gives the same answer), and another app has no series.
    let rps = |sel: &str| format!("sum(rate({}{sel}[1m]))", m::REQUESTS_TOTAL);
    s.compare_bracketed(
        m::EXTERNAL_REQUESTS_PER_SECOND,
        "app%3Dopenclaw",
        &rps("{app=\"openclaw\"}"),
    );
    s.compare_bracketed(
        m::EXTERNAL_TOKEN_DEPLETION_RATE,
        "app%3Dopenclaw",
        &format!(
            "sum(rate({}{{app=\"openclaw\"}}[1m])) / sum(rate({}{{app=\"openclaw\"}}[1m]))",
            m::BUCKET_DEPLETION_TOTAL,
            m::REQUESTS_TOTAL
        ),
    );
    let (status, body) = s.served(m::EXTERNAL_REQUESTS_PER_SECOND, "app%3Dsomething-else");
    assert_eq!(status, 404, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("app=\"something-else\""),
        "{body}"
    );
}
