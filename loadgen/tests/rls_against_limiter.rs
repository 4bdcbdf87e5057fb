//! `ShouldRateLimit` calls from the load generator against the real `openclaw-limiter` binary's
//! gRPC listener on 127.0.0.1 (build it first: `cargo build -p openclaw-limiter`, same profile
//! as the tests), with an RLS rules file: the counts must be what the rule allows, and what the
//! limiter itself counted on `/metrics`.

use std::collections::HashMap;
use std::time::Duration;

use openclaw_e2e::{Service, http_client, spawn_limiter};
use openclaw_loadgen::rls::Entry;
use openclaw_loadgen::{Api, Drive, Keys, Plan, Progress, RlsCall, Summary, run};

const API_KEY: &str = "loadgen-rls-test-secret";
/// Five calls per client and hour: nothing refills during the test.
const RULES: &str = "domain: edge
descriptors:
  - key: client_id
    rate_limit: {unit: hour, requests_per_unit: 5}
";
const PER_CLIENT: u64 = 5;

fn run_plan(plan: &Plan) -> Summary {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(plan, |_: &Progress| {}, std::future::pending()))
        .expect("a valid plan")
}

fn rls_counter(service: &Service, code: &str) -> u64 {
    let text = http_client()
        .get(format!("{}/metrics", service.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let series = format!("openclaw_rls_requests_total{{code=\"{code}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

/// A limiter serving `RULES` over gRPC with an API key, and its gRPC URL.
fn limiter_with_rules(dir: &tempfile::TempDir) -> (Service, String) {
    let rules = dir.path().join("edge.yaml");
    std::fs::write(&rules, RULES).unwrap();
    let service = spawn_limiter(&[
        ("OPENCLAW_RLS_CONFIG", rules.to_str().unwrap()),
        ("OPENCLAW_GRPC_LISTEN", "127.0.0.1:0"),
        ("OPENCLAW_API_KEY", API_KEY),
    ]);
    let grpc = service
        .url_of("grpc")
        .expect("the limiter prints `listening grpc=...`")
        .to_owned();
    (service, grpc)
}

fn call(value: Option<&str>, connections: usize) -> Api {
    Api::Rls(RlsCall {
        domain: "edge".into(),
        descriptors: vec![vec![Entry {
            key: "client_id".into(),
            value: value.map(str::to_owned),
        }]],
        connections,
    })
}

#[test]
fn rls_calls_are_allowed_up_to_the_rule_then_refused_as_the_limiter_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (service, grpc) = limiter_with_rules(&dir);

    // One client, 2 connections x 4 streams: 5 allowed, the other 35 refused.
    let plan = Plan {
        targets: vec![grpc],
        api: call(Some("bench"), 2),
        drive: Drive::ClosedLoop { connections: 8 },
        max_requests: Some(40),
        duration: Duration::from_secs(30),
        api_key: Some(API_KEY.into()),
        ..Plan::default()
    };
    let summary = run_plan(&plan);
    assert_eq!(
        (
            summary.requests,
            summary.allowed,
            summary.rejected,
            summary.errors
        ),
        (40, PER_CLIENT, 40 - PER_CLIENT, 0),
        "{summary:#?}"
    );
    assert_eq!(summary.latency.count, 40, "{summary:#?}");

    // The client id from the request's key: each of 4 keys gets its own 5.
    let keys = Keys::Many { count: 4 };
    let spread = Plan {
        api: call(None, 1),
        keys,
        max_requests: Some(100),
        ..plan.clone()
    };
    let summary = run_plan(&spread);
    let mut asked: HashMap<String, u64> = HashMap::new();
    let mut key = String::new();
    for seq in 0..100 {
        keys.key_for(spread.seed, seq, &mut key);
        *asked.entry(key.clone()).or_default() += 1;
    }
    let expected: u64 = asked.values().map(|&n| n.min(PER_CLIENT)).sum();
    assert_eq!(asked.len(), 4, "{asked:?}");
    assert_eq!(
        (summary.allowed, summary.rejected, summary.errors),
        (expected, 100 - expected, 0),
        "{summary:#?}"
    );

    // The limiter decided exactly what the generator counted.
    assert_eq!(rls_counter(&service, "ok"), PER_CLIENT + expected);
    assert_eq!(
        rls_counter(&service, "over_limit"),
        40 - PER_CLIENT + 100 - expected
    );
}

#[test]
fn rls_calls_without_the_api_key_are_grpc_errors_not_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let (service, grpc) = limiter_with_rules(&dir);
    let plan = Plan {
        targets: vec![grpc],
        api: call(Some("bench"), 1),
        drive: Drive::ClosedLoop { connections: 2 },
        max_requests: Some(6),
        duration: Duration::from_secs(30),
        ..Plan::default()
    };
    let summary = run_plan(&plan);
    assert_eq!(
        (summary.requests, summary.errors, summary.allowed),
        (6, 6, 0),
        "{summary:#?}"
    );
    assert_eq!(
        summary.errors_by_kind.get("grpc 16"),
        Some(&6),
        "UNAUTHENTICATED: {summary:#?}"
    );
    assert_eq!(rls_counter(&service, "unauthenticated"), 6);
    assert_eq!(rls_counter(&service, "ok"), 0);
}
