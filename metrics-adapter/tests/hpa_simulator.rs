//! The HPA simulator against the real adapter binary: `sync` reads what the adapter serves and
//! sends the list calls exactly as the HPA controller does.
//!
//! The adapter is the real `openclaw-metrics-adapter serve --plain-http` (started with the e2e
//! harness's `spawn_adapter`), running the shipped rules (`config/default.yaml`, answer cache
//! off so a changed answer shows at the next sync). Between the simulator and the adapter sits
//! a recording forwarder that keeps each request's raw target and `Accept` header, so the test
//! sees the exact bytes of `labelSelector`. Prometheus is a double, as in `tests/contract.rs`:
//! a real HTTP server on 127.0.0.1:0 answering `/api/v1/query` in the documented Prometheus
//! API shape, with values chosen by the test and every query recorded. The workspace's e2e
//! tests run the adapter against Debian's real Prometheus; here the point is the simulator's
//! requests and arithmetic, which need exact values.
//!
//! The manifests are read from the repository at test time: deploy/base/limiter/hpa.yaml (the
//! default HPA, request rate alone) and, where two metrics are the point (the exact list calls
//! for both, a failing metric, the max over metrics), that file with the opt-in component's
//! patch deploy/components/scale-on-depletion/hpa.yaml applied.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing;
use http::StatusCode;
use metrics_adapter::hpa_sim::{self, HpaSimulator, SyncRecord};
use serde_json::json;

/// Values the Prometheus double serves, by the metric its query reads; `None`: no series.
#[derive(Clone, Default)]
struct FakePrometheus {
    requests: Arc<Mutex<Option<&'static str>>>,
    depletion: Arc<Mutex<Option<&'static str>>>,
    queries: Arc<Mutex<Vec<String>>>,
}

async fn prom_query(
    State(fake): State<FakePrometheus>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let query = params.get("query").cloned().unwrap_or_default();
    fake.queries.lock().unwrap().push(query.clone());
    // The depletion query reads openclaw_requests_total too (as its denominator): recognise it
    // by its own counter first.
    let value = if query.contains("openclaw_bucket_depletion_total") {
        *fake.depletion.lock().unwrap()
    } else if query.contains("openclaw_requests_total") {
        *fake.requests.lock().unwrap()
    } else {
        *fake.depletion.lock().unwrap()
    };
    let result: Vec<_> = value
        .into_iter()
        .map(|v| json!({"metric": {}, "value": [1767323045.5, v]}))
        .collect();
    axum::Json(json!({"status": "success", "data": {"resultType": "vector", "result": result}}))
        .into_response()
}

/// What reached the adapter through the recording forwarder.
#[derive(Clone)]
struct Recorder {
    upstream: String,
    client: reqwest::Client,
    seen: Arc<Mutex<Vec<(String, String)>>>,
}

async fn forward(State(rec): State<Recorder>, req: Request) -> Response {
    let target = req.uri().to_string();
    let accept = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    rec.seen
        .lock()
        .unwrap()
        .push((target.clone(), accept.clone()));
    let answer = rec
        .client
        .get(format!("{}{target}", rec.upstream))
        .header(http::header::ACCEPT, accept)
        .send()
        .await;
    match answer {
        Ok(a) => {
            let status = StatusCode::from_u16(a.status().as_u16()).unwrap();
            let body = a.bytes().await.unwrap_or_default();
            (status, Body::from(body)).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

struct Stack {
    prometheus: FakePrometheus,
    recorder: Recorder,
    /// The forwarder in front of the adapter: what the simulator is pointed at.
    url: String,
    /// Keeps the adapter process alive; it is killed on drop, also when the test panics.
    adapter: openclaw_e2e::Service,
    _dir: tempfile::TempDir,
}

impl Stack {
    fn ca_file(&self) -> std::path::PathBuf {
        self._dir.path().join("ca.pem")
    }
}

async fn stack() -> Stack {
    stack_with(true).await
}

/// With `plain_http` false the adapter serves TLS with a generated CA written to
/// `<dir>/ca.pem`; the forwarder is then unused.
async fn stack_with(plain_http: bool) -> Stack {
    let prometheus = FakePrometheus::default();
    let prom_url = serve(
        Router::new()
            .route("/api/v1/query", routing::get(prom_query))
            .with_state(prometheus.clone()),
    )
    .await;
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.yaml"))
            .unwrap();
    assert!(shipped.contains("cache_ttl: 5s"), "default.yaml changed");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rules.yaml");
    std::fs::write(&config, shipped.replace("cache_ttl: 5s", "cache_ttl: 0s")).unwrap();
    let ca = dir.path().join("ca.pem");
    let adapter = {
        let config = config.clone();
        let prom_url = prom_url.clone();
        let ca = ca.to_str().unwrap().to_owned();
        tokio::task::spawn_blocking(move || {
            let extra: &[&str] = if plain_http {
                &[]
            } else {
                &["--tls-self-signed-ca-out", &ca]
            };
            openclaw_e2e::spawn_adapter(&prom_url, &config, plain_http, extra)
        })
        .await
        .unwrap()
    };
    let recorder = Recorder {
        upstream: adapter.url.clone(),
        client: hpa_sim::http_client(Duration::from_secs(5)).unwrap(),
        seen: Arc::default(),
    };
    let url = serve(Router::new().fallback(forward).with_state(recorder.clone())).await;
    Stack {
        prometheus,
        recorder,
        url,
        adapter,
        _dir: dir,
    }
}

fn deploy_hpa() -> String {
    std::fs::read_to_string(deploy_hpa_path()).unwrap()
}

/// The default HPA with deploy/components/scale-on-depletion applied: requests, then depletion.
fn with_depletion(initial_replicas: i32) -> HpaSimulator {
    let overrides = hpa_sim::Overrides {
        patches: vec![std::fs::read_to_string(depletion_patch_path()).unwrap()],
        ..hpa_sim::Overrides::default()
    };
    let sim =
        HpaSimulator::from_manifest_with(&deploy_hpa(), &overrides, initial_replicas).unwrap();
    assert_eq!(sim.metrics().len(), 2, "the component lists both metrics");
    sim
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_reads_what_the_adapter_serves_with_the_controllers_exact_requests() {
    let s = stack().await;
    *s.prometheus.requests.lock().unwrap() = Some("1600");
    *s.prometheus.depletion.lock().unwrap() = Some("0.45");
    let client = hpa_sim::http_client(Duration::from_secs(5)).unwrap();
    let mut sim = with_depletion(3);

    let r = sim.sync(&client, &s.url, 0.0).await;
    assert_eq!(r.metrics[0].value, Ok(1600.0), "{r}");
    assert_eq!(r.metrics[1].value, Ok(0.45), "{r}");
    // 1600 / (800 x 3) = 0.67 -> ceil(1600 / 800) = 2; 0.45 / 0.9 = 0.5 -> ceil(0.5 x 3) = 2.
    assert_eq!(
        (r.metrics[0].proposal, r.metrics[1].proposal),
        (Some(2), Some(2))
    );
    // The controller has just seen 3: the scale-down window holds it.
    assert_eq!(
        (r.proposed, r.desired, r.reason.as_str()),
        (2, 3, "ScaleDownStabilized")
    );

    let seen = s.recorder.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            (
                "/apis/external.metrics.k8s.io/v1beta1/namespaces/openclaw/openclaw_requests_per_second?labelSelector=decision+in+%28allowed%2Crejected%29".to_owned(),
                "application/vnd.kubernetes.protobuf, */*".to_owned()
            ),
            (
                "/apis/external.metrics.k8s.io/v1beta1/namespaces/openclaw/openclaw_token_depletion_rate?labelSelector=policy".to_owned(),
                "application/vnd.kubernetes.protobuf, */*".to_owned()
            ),
        ]
    );
    // And the adapter understood the selectors as meant: they reached the PromQL.
    let queries = s.prometheus.queries.lock().unwrap().clone();
    assert_eq!(queries.len(), 2, "{queries:?}");
    assert!(
        queries[0].contains(r#"openclaw_requests_total{decision=~"allowed|rejected"}"#),
        "{}",
        queries[0]
    );
    // Depletion: both of its counters narrowed by the HPA's `policy` Exists selector.
    for series in [
        r#"openclaw_bucket_depletion_total{policy!=""}"#,
        r#"openclaw_requests_total{policy!=""}"#,
    ] {
        assert!(queries[1].contains(series), "{series} in {}", queries[1]);
    }

    // A spike: 16000 rps asks for 20; deploy's policies allow max(3 x 2, 3 + 4) = 7.
    *s.prometheus.requests.lock().unwrap() = Some("16000");
    let r = sim.sync(&client, &s.url, 15.0).await;
    assert_eq!(r.metrics[0].value, Ok(16000.0), "{r}");
    assert_eq!(
        (r.proposed, r.desired, r.reason.as_str()),
        (20, 7, "ScaleUpLimit")
    );

    // No series for depletion: the adapter answers 404 and the controller treats the metric as
    // failed; with the request metric asking for less, nothing moves.
    *s.prometheus.requests.lock().unwrap() = Some("800");
    *s.prometheus.depletion.lock().unwrap() = None;
    let r = sim.sync(&client, &s.url, 30.0).await;
    let e = r.metrics[1].value.as_ref().unwrap_err();
    assert!(e.contains("HTTP 404") && e.contains("no data"), "{e}");
    assert_eq!(r.desired, 7);
    assert!(
        r.reason.starts_with("FailedGetExternalMetric"),
        "{}",
        r.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_syncs_on_the_compressed_period_until_stopped() {
    let s = stack().await;
    *s.prometheus.requests.lock().unwrap() = Some("4000");
    *s.prometheus.depletion.lock().unwrap() = Some("0.1");
    let client = hpa_sim::http_client(Duration::from_secs(5)).unwrap();
    let mut sim = HpaSimulator::from_manifest(&deploy_hpa(), 2).unwrap();
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    let on_sync = move |_: &SyncRecord| {
        count_tx.send_modify(|n| *n += 1);
    };
    // Stop after the third sync, or after 20 s whatever happens (then the asserts fail).
    let stop = async move {
        let _ = tokio::time::timeout(Duration::from_secs(20), count_rx.wait_for(|n| *n >= 3)).await;
    };
    let records = hpa_sim::run(&mut sim, &client, &s.url, 30.0, on_sync, stop).await;
    assert_eq!(records.len(), 3, "{records:#?}");
    assert!(records.iter().all(|r| r.metrics.len() == 1), "{records:#?}");
    // A sync every 0.5 s of real time is 15 s of simulated time (loaded-machine slack: 3 s).
    for (i, r) in records.iter().enumerate() {
        let want = 15.0 * i as f64;
        assert!((r.at_s - want).abs() < 3.0, "sync {i} at {} s", r.at_s);
    }
    // 4000 rps asks for 5 replicas: 2 -> 5 at the first sync, then it stays.
    let path: Vec<i32> = records.iter().map(|r| r.desired).collect();
    assert_eq!(path, vec![5, 5, 5]);
    // The default HPA: one list call per sync, for the request rate.
    let seen = s.recorder.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter()
            .all(|(target, _)| target.contains("/openclaw_requests_per_second?")),
        "{seen:?}"
    );
}

/// Runs `openclaw-metrics-adapter simulate-hpa ARGS` to completion (killed if it outlives
/// 30 s) and returns its stdout lines.
async fn simulate_hpa_cli(args: &[&str]) -> Vec<String> {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_openclaw-metrics-adapter"))
        .arg("simulate-hpa")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("simulate-hpa did not exit within 30 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "simulate-hpa failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(str::to_owned).collect()
}

fn deploy_hpa_path() -> &'static str {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/base/limiter/hpa.yaml"
    )
}

fn depletion_patch_path() -> &'static str {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/components/scale-on-depletion/hpa.yaml"
    )
}

/// With `--patch`, as an SRE would simulate the HPA of an overlay using the depletion component.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_applies_patches_prints_one_line_per_sync_and_exits_after_the_duration() {
    let s = stack().await;
    *s.prometheus.requests.lock().unwrap() = Some("16000");
    *s.prometheus.depletion.lock().unwrap() = Some("0.45");
    let lines = simulate_hpa_cli(&[
        "--hpa",
        deploy_hpa_path(),
        "--patch",
        depletion_patch_path(),
        "--adapter-url",
        &s.url,
        "--initial-replicas",
        "2",
        "--time-scale",
        "30",
        "--duration",
        "1200ms",
    ])
    .await;
    assert!(
        lines[0].starts_with("HPA openclaw-hpa in namespace openclaw: minReplicas 2, maxReplicas 15, with behavior, 2 External metric(s); starting at 2 replicas; time scale 30"),
        "{lines:#?}"
    );
    let syncs: Vec<&String> = lines.iter().filter(|l| l.starts_with("t=")).collect();
    // Syncs at 0, 0.5 and 1.0 s of real time (a slow machine may miss the last).
    assert!((2..=3).contains(&syncs.len()), "{lines:#?}");
    assert!(
        syncs[0].starts_with("t=0.")
            && syncs[0].contains("current=2 | openclaw_requests_per_second{decision in (allowed,rejected)} = 16000 vs AverageValue 800: ratio 10.0000 -> 20")
            && syncs[0].contains("| openclaw_token_depletion_rate{policy} = 0.45 vs Value 900m: ratio 0.5000 -> 1")
            && syncs[0].ends_with("| proposed=20 desired=6 (ScaleUpLimit)"),
        "{}",
        syncs[0]
    );
    assert!(
        syncs[1].contains("current=6") && syncs[1].ends_with("desired=12 (ScaleUpLimit)"),
        "{}",
        syncs[1]
    );
    let done = lines.last().unwrap();
    assert!(
        done.starts_with(&format!("done: {} syncs", syncs.len())),
        "{done}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reaches_a_tls_adapter_with_its_ca_file() {
    let s = stack_with(false).await;
    *s.prometheus.requests.lock().unwrap() = Some("1600");
    assert!(s.adapter.url.starts_with("https://"), "{}", s.adapter.url);
    let ca = s.ca_file();
    let lines = simulate_hpa_cli(&[
        "--hpa",
        deploy_hpa_path(),
        "--adapter-url",
        &s.adapter.url,
        "--ca-file",
        ca.to_str().unwrap(),
        "--initial-replicas",
        "3",
        "--duration",
        "300ms",
    ])
    .await;
    let syncs: Vec<&String> = lines.iter().filter(|l| l.starts_with("t=")).collect();
    assert_eq!(syncs.len(), 1, "{lines:#?}");
    // The default HPA: the request rate alone. 1600 / (800 x 3) = 0.67 -> ceil(1600 / 800) = 2,
    // held at 3 by the scale-down window.
    assert!(
        syncs[0].contains("current=3 | openclaw_requests_per_second{decision in (allowed,rejected)} = 1600 vs AverageValue 800: ratio 0.6667 -> 2 | proposed=2")
            && syncs[0].ends_with("proposed=2 desired=3 (ScaleDownStabilized)")
            && !syncs[0].contains("depletion"),
        "{}",
        syncs[0]
    );
}
