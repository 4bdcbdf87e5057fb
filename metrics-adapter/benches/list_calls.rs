//! What an external metric list call costs.
//!
//! 1. Load over real HTTP (keep-alive connections on loopback) against the adapter router served
//!    in-process, with a real Prometheus (Debian's `/usr/bin/prometheus`, scraping itself):
//!    - cached list calls (`cache_ttl: 60s`): requests/s and p50/p99 at 4 concurrent clients;
//!      target p99 < 2 ms;
//!    - uncached list calls (`cache_ttl: 0s`) against the same PromQL asked of Prometheus
//!      directly, one at a time: the difference is the adapter's overhead.
//! 2. Criterion: the in-process cost of a cached list call (`oneshot` through the router).
//!
//! Run: `cargo bench -p openclaw-metrics-adapter --bench list_calls`
//! (`LOAD_SECONDS=N` sets each load phase's length, default 5). Under `cargo test --benches`
//! it runs a short smoke version.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use criterion::Criterion;
use http::Request;
use metrics_adapter::api::{AppState, router};
use metrics_adapter::config::{Config, ConfigStore};
use metrics_adapter::metrics::Metrics;
use metrics_adapter::prometheus::Prometheus as PromClient;
use openclaw_e2e::{Prometheus, wait_until};
use tower::ServiceExt;

const CONFIG: &str = r#"
rules:
  - name: cached
    query: sum(up)
    cache_ttl: 60s
    selectable_labels: [job]
  - name: uncached
    query: sum(up)
    cache_ttl: 0s
    selectable_labels: [job]
"#;
const PROMQL: &str = "sum(up{job=\"prometheus\"})";
const CACHED: &str = "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/cached?labelSelector=job%3Dprometheus";
const UNCACHED: &str = "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/uncached?labelSelector=job%3Dprometheus";

struct Stats {
    requests: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

fn stats(mut latencies: Vec<Duration>, elapsed: Duration) -> Stats {
    latencies.sort();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p).ceil() as usize)
            .saturating_sub(1)
            .min(latencies.len() - 1)]
    };
    let mean = latencies.iter().sum::<Duration>() / latencies.len() as u32;
    Stats {
        requests: latencies.len(),
        elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
        mean,
    }
}

fn show(name: &str, s: &Stats) {
    println!(
        "{name:<44} {:>8.0} req/s  mean {:>7.3} ms  p50 {:>7.3} ms  p99 {:>7.3} ms  ({} requests)",
        s.requests as f64 / s.elapsed.as_secs_f64(),
        s.mean.as_secs_f64() * 1e3,
        s.p50.as_secs_f64() * 1e3,
        s.p99.as_secs_f64() * 1e3,
        s.requests
    );
}

/// `clients` keep-alive clients calling `url` in a loop for `length`.
async fn load(url: String, clients: usize, length: Duration) -> Stats {
    let started = Instant::now();
    let until = started + length;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::builder().no_proxy().build().unwrap();
                let mut lat = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    let r = http.get(&url).send().await.expect("request");
                    assert!(r.status().is_success(), "{url}: {}", r.status());
                    let _ = r.bytes().await.expect("body");
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    stats(all, started.elapsed())
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let length = if full {
        Duration::from_secs(
            std::env::var("LOAD_SECONDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(5),
        )
    } else {
        Duration::from_millis(200)
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let prometheus = Prometheus::start(&[], &[]);
    wait_until(
        Duration::from_secs(30),
        "Prometheus to scrape itself",
        || {
            prometheus
                .vector(PROMQL)
                .ok()
                .filter(|v| !v.is_empty())
                .map(|_| ())
        },
    );
    let metrics = Metrics::shared();
    let state = AppState::new(
        ConfigStore::new(Config::from_yaml(CONFIG, "bench").unwrap()),
        PromClient::new(&prometheus.url(), 8, metrics.clone()).unwrap(),
        metrics,
    );
    let app = router(state);
    let served = app.clone();
    let adapter = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, served).await });
        format!("http://{addr}")
    });

    println!(
        "\n== HTTP load on loopback (2-core machine; client, adapter and Prometheus share it)"
    );
    let cached = rt.block_on(load(format!("{adapter}{CACHED}"), 4, length));
    show("adapter, cached list call, 4 clients", &cached);
    let direct_url = format!(
        "{}/api/v1/query?query={}",
        prometheus.url(),
        urlencode(PROMQL)
    );
    let direct = rt.block_on(load(direct_url, 1, length));
    show("Prometheus directly, same PromQL, 1 client", &direct);
    let uncached = rt.block_on(load(format!("{adapter}{UNCACHED}"), 1, length));
    show("adapter, uncached list call, 1 client", &uncached);
    println!(
        "uncached overhead over Prometheus: mean {:+.3} ms, p99 {:+.3} ms; cached p99 {:.3} ms (target < 2 ms: {})",
        (uncached.mean.as_secs_f64() - direct.mean.as_secs_f64()) * 1e3,
        (uncached.p99.as_secs_f64() - direct.p99.as_secs_f64()) * 1e3,
        cached.p99.as_secs_f64() * 1e3,
        if cached.p99 < Duration::from_millis(2) {
            "met"
        } else {
            "MISSED"
        }
    );

    let mut c = Criterion::default().configure_from_args();
    let app = Arc::new(app);
    c.bench_function("in-process cached list call (oneshot)", |b| {
        b.to_async(&rt).iter(|| {
            let app = (*app).clone();
            async move {
                let r = app
                    .oneshot(Request::get(CACHED).body(Body::empty()).unwrap())
                    .await
                    .unwrap();
                assert!(r.status().is_success());
                axum::body::to_bytes(r.into_body(), usize::MAX)
                    .await
                    .unwrap()
            }
        })
    });
    c.final_summary();
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
