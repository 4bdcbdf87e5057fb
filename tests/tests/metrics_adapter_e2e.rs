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
use openclaw_e2e::{Prometheus, Service, http_client, wait_until};
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
        let prometheus = Prometheus::start(&[openclaw_e2e::host_port(&limiter_url)], &[]);

        // The shipped rules, with the cache off (so each call is a fresh query to compare) and
        // a short timeout (so the outage test is quick).
        let yaml = DEFAULT_YAML
            .replace("timeout: 2s", "timeout: 1s")
            .replace("cache_ttl: 5s", "cache_ttl: 0s");
        assert_ne!(
            yaml, DEFAULT_YAML,
            "the default config changed shape; update this test"
        );
        let config = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(config.path(), yaml).unwrap();
        let adapter = Service::spawn(
            "openclaw-metrics-adapter",
            &[
                "serve",
                "--plain-http",
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                "0",
                "--authentication",
                "none",
                "--prometheus-url",
                &prometheus.url(),
                "--config",
                config.path().to_str().unwrap(),
            ],
            &[],
            Duration::from_secs(20),
        );
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
    fn compare(&self, metric: &str, selector: &str, promql: &str) -> (String, String) {
        let query = if selector.is_empty() {
            String::new()
        } else {
            format!("?labelSelector={selector}")
        };
        wait_until(Duration::from_secs(20), "a stable comparison", || {
            let before = self.direct(promql)?;
            let (status, body, _) = self.adapter_get(&format!("{LIST}/{metric}{query}"));
            assert_eq!(status, 200, "{metric}?{selector}: {body}");
            let after = self.direct(promql)?;
            (before == after).then(|| {
                (
                    before,
                    body["items"][0]["value"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
        })
    }
}

#[test]
fn the_adapter_serves_what_prometheus_answers_and_selectors_narrow_it() {
    let s = Stack::start();

    let (direct, served) = s.compare(
        m::EXTERNAL_REQUESTS_PER_SECOND,
        "",
        &format!("sum(rate({}[1m]))", m::REQUESTS_TOTAL),
    );
    assert_eq!(served, direct);

    // Both decisions occur (capacity 5/s per key, ~10 requests/s per key).
    wait_until(
        Duration::from_secs(30),
        "rejections to show in Prometheus",
        || {
            s.direct(&format!(
                "sum(rate({}{{decision=\"rejected\"}}[1m]))",
                m::REQUESTS_TOTAL
            ))
        },
    );
    for decision in ["allowed", "rejected"] {
        let promql = format!(
            "sum(rate({}{{decision=\"{decision}\"}}[1m]))",
            m::REQUESTS_TOTAL
        );
        let (direct, served) = s.compare(
            m::EXTERNAL_REQUESTS_PER_SECOND,
            &format!("decision%3D{decision}"),
            &promql,
        );
        assert_eq!(served, direct, "decision={decision}");
    }
    // A narrower selector serves less than the whole.
    let (_, all) = s.compare(
        m::EXTERNAL_REQUESTS_PER_SECOND,
        "",
        &format!("sum(rate({}[1m]))", m::REQUESTS_TOTAL),
    );
    let (_, allowed) = s.compare(
        m::EXTERNAL_REQUESTS_PER_SECOND,
        "decision%3Dallowed",
        &format!(
            "sum(rate({}{{decision=\"allowed\"}}[1m]))",
            m::REQUESTS_TOTAL
        ),
    );
    let milli = |q: &str| {
        metrics_adapter::quantity::parse_quantity_milli(q)
            .unwrap()
            .0
    };
    assert!(
        milli(&allowed) < milli(&all),
        "allowed {allowed} should be below all {all}"
    );

    // `in` with an escaped alternation, and a policy that does not exist.
    let (direct, served) = s.compare(
        m::EXTERNAL_REQUESTS_PER_SECOND,
        "decision%20in%20(allowed,rejected),policy%3Ddefault",
        &format!(
            "sum(rate({}{{decision=~\"allowed|rejected\",policy=\"default\"}}[1m]))",
            m::REQUESTS_TOTAL
        ),
    );
    assert_eq!(served, direct);
    let (status, body, _) = s.adapter_get(&format!(
        "{LIST}/{}?labelSelector=policy%3Dno-such-policy",
        m::EXTERNAL_REQUESTS_PER_SECOND
    ));
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["kind"], "Status");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("policy=\"no-such-policy\""),
        "{body}"
    );

    // The depletion ratio, exactly as the shipped rule writes it.
    let depletion = format!(
        "sum(rate({}[1m])) / sum(max by (policy) ({}) * max by (policy) ({}))",
        m::TOKENS_CONSUMED_TOTAL,
        m::TOKEN_BUCKET_FILL_RATE,
        m::ACTIVE_BUCKETS
    );
    let (direct, served) = s.compare(m::EXTERNAL_TOKEN_DEPLETION_RATE, "", &depletion);
    assert_eq!(served, direct);
    let (status, body, _) = s.adapter_get(&format!("{LIST}/{}", m::EXTERNAL_TOKEN_DEPLETION_RATE));
    assert_eq!(status, 200);
    assert_eq!(body["items"][0]["window"], 60);
    assert!(
        body["items"][0]["timestamp"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
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
