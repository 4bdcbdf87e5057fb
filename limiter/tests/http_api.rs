//! The decision API driven through the router with `oneshot`: every route, every kind of bad
//! input, and the promise that bad input never changes state.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use openclaw_common::wire::{BatchResponse, Decision, ErrorBody};
use openclaw_limiter::bucket::Rate;
use openclaw_limiter::clock::ManualClock;
use openclaw_limiter::crdt::ReplicaId;
use openclaw_limiter::http::{AppState, MAX_BODY_BYTES, MAX_KEY_BYTES, router};
use openclaw_limiter::service::{Limiter, LimiterOptions};
use serde_json::{Value, json};
use tower::ServiceExt;

struct Harness {
    limiter: Arc<Limiter>,
    clock: Arc<ManualClock>,
    app: Router,
}

/// A limiter whose `default` policy holds 10 tokens and refills them in one second, plus a
/// `tiny` policy of 2 tokens with an override for key `vip`.
fn harness(api_key: Option<&str>) -> Harness {
    let clock = Arc::new(ManualClock::at(1_700_000_000_000_000));
    let limiter = Arc::new(Limiter::new(LimiterOptions {
        node_id: "test-node".into(),
        replica: ReplicaId(7),
        default_rate: Rate::try_new(10, 1000).unwrap(),
        clock: clock.clone(),
        shards: 8,
        track_changes: false,
    }));
    limiter
        .reload_policies(
            "policies:\n  tiny:\n    capacity: 2\n    refill_interval_ms: 1000\n    overrides:\n      vip: {capacity: 20, refill_interval_ms: 1000}\n",
        )
        .unwrap();
    limiter.mark_ready();
    let app = router(AppState {
        limiter: limiter.clone(),
        api_key: api_key.map(Arc::from),
        replicator: None,
        discovery: None,
        snapshots: None,
    });
    Harness {
        limiter,
        clock,
        app,
    }
}

impl Harness {
    async fn send(&self, request: Request<Body>) -> Response<Body> {
        self.app.clone().oneshot(request).await.unwrap()
    }

    async fn get(&self, uri: &str) -> Response<Body> {
        self.send(Request::get(uri).body(Body::empty()).unwrap())
            .await
    }

    async fn post_json(&self, uri: &str, body: impl Into<Body>) -> Response<Body> {
        let request = Request::post(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.into())
            .unwrap();
        self.send(request).await
    }

    fn remaining(&self, policy: &str, key: &str) -> u64 {
        self.limiter
            .peek(policy, key, 1)
            .unwrap()
            .0
            .outcome
            .remaining
    }
}

async fn json_of(response: Response<Body>) -> Value {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {bytes:?}"))
}

async fn decision_of(response: Response<Body>) -> Decision {
    serde_json::from_value(json_of(response).await).unwrap()
}

/// Asserts the one error shape and returns its code.
async fn error_code(response: Response<Body>, status: StatusCode) -> String {
    if response.status() != status {
        let got = response.status();
        panic!("expected {status}, got {got}: {}", json_of(response).await);
    }
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    let body: ErrorBody = serde_json::from_value(json_of(response).await).unwrap();
    assert!(!body.error.message.is_empty());
    body.error.code
}

fn header_str<'a>(response: &'a Response<Body>, name: &str) -> &'a str {
    response.headers()[name].to_str().unwrap()
}

#[tokio::test]
async fn allowed_request_reports_the_bucket_in_body_and_headers() {
    let h = harness(None);
    let response = h.get("/rate?key=alice&cost=3").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header_str(&response, "ratelimit-policy"),
        "\"default\";q=10;w=1"
    );
    assert_eq!(header_str(&response, "ratelimit"), "\"default\";r=7;t=1");
    assert!(response.headers().get(header::RETRY_AFTER).is_none());
    let decision = decision_of(response).await;
    assert_eq!(
        decision,
        Decision {
            allowed: true,
            limit: 10,
            remaining: 7,
            reset_after_ms: 300,
            retry_after_ms: 0,
            policy: "default".into()
        }
    );
}

#[tokio::test]
async fn exhausted_bucket_answers_429_with_retry_after_and_spends_nothing() {
    let h = harness(None);
    assert_eq!(
        h.get("/rate?key=bob&cost=10").await.status(),
        StatusCode::OK
    );
    h.clock.advance_us(150_000); // 1.5 tokens back
    let response = h.get("/rate?key=bob&cost=4").await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header_str(&response, "retry-after"), "1");
    let decision = decision_of(response).await;
    assert!(!decision.allowed);
    assert_eq!(decision.remaining, 1);
    assert_eq!(decision.retry_after_ms, 250);
    assert_eq!(
        h.remaining("default", "bob"),
        1,
        "a rejected request consumes nothing"
    );
}

#[tokio::test]
async fn post_with_json_body_decides_under_the_named_policy() {
    let h = harness(None);
    let response = h
        .post_json("/rate", r#"{"key":"carol","policy":"tiny","cost":2}"#)
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let decision = decision_of(response).await;
    assert_eq!(
        (decision.limit, decision.remaining, decision.policy.as_str()),
        (2, 0, "tiny")
    );
    let response = h
        .post_json("/rate", r#"{"key":"carol","policy":"tiny"}"#)
        .await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    // An empty POST body falls back to the query string.
    let response = h
        .send(Request::post("/rate?key=dave").body(Body::empty()).unwrap())
        .await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn per_key_override_applies_only_to_that_key() {
    let h = harness(None);
    let response = h.get("/rate?key=vip&policy=tiny&cost=15").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(decision_of(response).await.limit, 20);
    let code = error_code(
        h.get("/rate?key=other&policy=tiny&cost=15").await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(code, "cost_above_capacity");
}

#[tokio::test]
async fn key_falls_back_to_client_id_header_then_caller_address() {
    let h = harness(None);
    let request = Request::get("/rate?cost=4")
        .header("x-client-id", "svc-a")
        .body(Body::empty())
        .unwrap();
    assert_eq!(h.send(request).await.status(), StatusCode::OK);
    assert_eq!(h.remaining("default", "svc-a"), 6);

    let mut request = Request::get("/rate?cost=5").body(Body::empty()).unwrap();
    let addr: SocketAddr = "192.0.2.9:5555".parse().unwrap();
    request.extensions_mut().insert(ConnectInfo(addr));
    assert_eq!(h.send(request).await.status(), StatusCode::OK);
    assert_eq!(h.remaining("default", "192.0.2.9"), 5);

    // Neither: the request names nobody.
    let code = error_code(h.get("/rate").await, StatusCode::BAD_REQUEST).await;
    assert_eq!(code, "invalid_key");
}

#[tokio::test]
async fn batch_decides_each_item_in_order() {
    let h = harness(None);
    let body = json!({"requests": [
        {"key": "e", "cost": 6},
        {"key": "e", "cost": 6},
        {"key": "f", "policy": "tiny"},
    ]});
    let response = h.post_json("/rate/batch", body.to_string()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let batch: BatchResponse = serde_json::from_value(json_of(response).await).unwrap();
    let allowed: Vec<bool> = batch.decisions.iter().map(|d| d.allowed).collect();
    assert_eq!(allowed, [true, false, true]);
    assert_eq!(batch.decisions[2].policy, "tiny");
}

#[tokio::test]
async fn batch_with_one_bad_item_decides_nothing() {
    let h = harness(None);
    for (body, code) in [
        (
            json!({"requests": [{"key": "g", "cost": 5}, {"key": "g", "cost": 0}]}),
            "invalid_cost",
        ),
        (
            json!({"requests": [{"key": "g", "cost": 5}, {"key": "g", "policy": "nope"}]}),
            "invalid_batch",
        ),
        (
            json!({"requests": [{"key": "g", "cost": 5}, {"key": "g", "cost": 11}]}),
            "invalid_batch",
        ),
        (
            json!({"requests": [{"key": "g", "cost": 5}, 3]}),
            "invalid_batch",
        ),
        (json!({"requests": []}), "invalid_batch"),
        (
            json!({"requests": [{"key": "g"}], "extra": 1}),
            "unknown_field",
        ),
        (
            json!({"requests": (0..1001).map(|_| json!({"key": "g"})).collect::<Vec<_>>()}),
            "invalid_batch",
        ),
        (json!([1, 2]), "invalid_batch"),
    ] {
        let response = h.post_json("/rate/batch", body.to_string()).await;
        assert_eq!(
            error_code(response, StatusCode::BAD_REQUEST).await,
            code,
            "{body}"
        );
        assert_eq!(h.remaining("default", "g"), 10, "state changed by {body}");
    }
    assert!(h.limiter.store().is_empty());
}

#[tokio::test]
async fn bad_input_gets_one_error_shape_and_changes_nothing() {
    let h = harness(None);
    let long_key = "k".repeat(MAX_KEY_BYTES + 1);
    let get_cases: Vec<(String, StatusCode, &str)> = vec![
        (
            "/rate?key=a&cost=0".into(),
            StatusCode::BAD_REQUEST,
            "invalid_cost",
        ),
        (
            "/rate?key=a&cost=-1".into(),
            StatusCode::BAD_REQUEST,
            "invalid_cost",
        ),
        (
            "/rate?key=a&cost=1.5".into(),
            StatusCode::BAD_REQUEST,
            "invalid_cost",
        ),
        (
            "/rate?key=a&cost=abc".into(),
            StatusCode::BAD_REQUEST,
            "invalid_cost",
        ),
        (
            "/rate?key=a&cost=".into(),
            StatusCode::BAD_REQUEST,
            "invalid_cost",
        ),
        (
            "/rate?key=a&cost=99999999999999999999999".into(),
            StatusCode::BAD_REQUEST,
            "invalid_cost",
        ),
        (
            "/rate?key=a&cost=11".into(),
            StatusCode::BAD_REQUEST,
            "cost_above_capacity",
        ),
        ("/rate?key=".into(), StatusCode::BAD_REQUEST, "invalid_key"),
        (
            format!("/rate?key={long_key}"),
            StatusCode::BAD_REQUEST,
            "invalid_key",
        ),
        (
            "/rate?key=a%0Ab".into(),
            StatusCode::BAD_REQUEST,
            "invalid_key",
        ),
        (
            "/rate?key=a&policy=nope".into(),
            StatusCode::BAD_REQUEST,
            "unknown_policy",
        ),
        (
            "/rate?key=a&policy=bad%20name".into(),
            StatusCode::BAD_REQUEST,
            "invalid_policy",
        ),
        (
            "/rate?key=a&colour=red".into(),
            StatusCode::BAD_REQUEST,
            "unknown_field",
        ),
        (
            "/rate?key=a&key=b".into(),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        ("/nowhere".into(), StatusCode::NOT_FOUND, "not_found"),
    ];
    for (uri, status, code) in get_cases {
        assert_eq!(error_code(h.get(&uri).await, status).await, code, "{uri}");
    }
    let post_cases: Vec<(&str, Body, StatusCode, &str)> = vec![
        (
            "/rate",
            Body::from("{\"key\": "),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "/rate",
            Body::from("[1,2]"),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "/rate",
            Body::from(r#"{"key": 5}"#),
            StatusCode::BAD_REQUEST,
            "invalid_key",
        ),
        (
            "/rate",
            Body::from(r#"{"key": "a", "cost": "3"}"#),
            StatusCode::BAD_REQUEST,
            "invalid_cost",
        ),
        (
            "/rate",
            Body::from(r#"{"key": "a", "cost": 2.5}"#),
            StatusCode::BAD_REQUEST,
            "invalid_cost",
        ),
        (
            "/rate",
            Body::from(r#"{"key": "a", "cost": -3}"#),
            StatusCode::BAD_REQUEST,
            "invalid_cost",
        ),
        (
            "/rate",
            Body::from(r#"{"key": "a", "cost": true}"#),
            StatusCode::BAD_REQUEST,
            "invalid_cost",
        ),
        (
            "/rate",
            Body::from(r#"{"key": "a", "policy": 3}"#),
            StatusCode::BAD_REQUEST,
            "invalid_policy",
        ),
        (
            "/rate",
            Body::from(r#"{"key": "a", "kost": 3}"#),
            StatusCode::BAD_REQUEST,
            "unknown_field",
        ),
        (
            "/rate?key=a",
            Body::from(r#"{"key": "a"}"#),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "/rate",
            Body::from(format!(r#"{{"key": "{}"}}"#, "x".repeat(MAX_BODY_BYTES))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
    ];
    for (uri, body, status, code) in post_cases {
        assert_eq!(
            error_code(h.post_json(uri, body).await, status).await,
            code,
            "POST {uri}"
        );
    }
    let form = Request::post("/rate")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("key=a"))
        .unwrap();
    let code = error_code(h.send(form).await, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    assert_eq!(code, "unsupported_media_type");
    let delete = Request::delete("/rate?key=a").body(Body::empty()).unwrap();
    let code = error_code(h.send(delete).await, StatusCode::METHOD_NOT_ALLOWED).await;
    assert_eq!(code, "method_not_allowed");

    assert!(h.limiter.store().is_empty(), "bad input created buckets");
    assert_eq!(h.remaining("default", "a"), 10);
    let metrics = h.limiter.render_metrics();
    assert!(
        metrics.contains("openclaw_bad_requests_total{reason=\"invalid_cost\"} 10"),
        "{metrics}"
    );
}

#[tokio::test]
async fn status_describes_the_node_and_peeks_without_spending() {
    let h = harness(None);
    h.get("/rate?key=hal&cost=4").await;
    let status = json_of(h.get("/status").await).await;
    assert_eq!(status["node_id"], "test-node");
    assert_eq!(status["keys"], 1);
    assert_eq!(status["ready"], true);
    let names: Vec<&str> = status["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "tiny"]);
    assert_eq!(status["policies"][1]["overrides"], 1);

    for _ in 0..2 {
        let peek = json_of(h.get("/status?key=hal").await).await;
        assert_eq!(peek["bucket"]["remaining"], 6);
        assert_eq!(peek["bucket"]["held_in_memory"], true);
    }
    let fresh = json_of(h.get("/status?key=nobody&policy=tiny").await).await;
    assert_eq!(
        (
            fresh["bucket"]["remaining"].as_u64(),
            fresh["bucket"]["held_in_memory"].as_bool()
        ),
        (Some(2), Some(false))
    );
    assert!(
        !h.limiter
            .store()
            .contains(openclaw_limiter::store::PolicyId(1), "nobody")
    );

    assert_eq!(
        error_code(h.get("/status?policy=tiny").await, StatusCode::BAD_REQUEST).await,
        "invalid_key"
    );
    assert_eq!(
        error_code(
            h.get("/status?key=a&policy=nope").await,
            StatusCode::BAD_REQUEST
        )
        .await,
        "unknown_policy"
    );
    assert_eq!(
        error_code(h.get("/status?verbose=1").await, StatusCode::BAD_REQUEST).await,
        "unknown_field"
    );
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let h = harness(None);
    assert_eq!(h.get("/healthz").await.status(), StatusCode::OK);
    assert_eq!(h.get("/ready").await.status(), StatusCode::OK);

    let starting = Arc::new(Limiter::new(LimiterOptions {
        node_id: "starting".into(),
        replica: ReplicaId(8),
        default_rate: Rate::try_new(10, 1000).unwrap(),
        clock: Arc::new(ManualClock::at(0)),
        shards: 1,
        track_changes: false,
    }));
    let app = router(AppState {
        limiter: starting,
        api_key: None,
        replicator: None,
        discovery: None,
        snapshots: None,
    });
    let response = app
        .oneshot(Request::get("/ready").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);

    h.get("/rate?key=m").await;
    let response = h.get("/metrics").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(header_str(&response, "content-type").starts_with("application/openmetrics-text"));
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains("openclaw_requests_total{policy=\"default\",decision=\"allowed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("openclaw_http_request_duration_seconds_count{route=\"/rate\"} 1"),
        "{text}"
    );
    assert!(
        !text.contains("key=\"m\""),
        "client keys must never become labels"
    );
}

#[tokio::test]
async fn api_key_guards_decisions_but_not_probes_or_metrics() {
    let h = harness(Some("s3cret"));
    let code = error_code(h.get("/rate?key=a").await, StatusCode::UNAUTHORIZED).await;
    assert_eq!(code, "unauthorized");
    let wrong = Request::get("/rate?key=a")
        .header(header::AUTHORIZATION, "Bearer s3cres")
        .body(Body::empty())
        .unwrap();
    let response = h.send(wrong).await;
    assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        error_code(h.get("/status").await, StatusCode::UNAUTHORIZED).await,
        "unauthorized"
    );
    assert!(h.limiter.store().is_empty());

    let right = Request::get("/rate?key=a")
        .header(header::AUTHORIZATION, "Bearer s3cret")
        .body(Body::empty())
        .unwrap();
    assert_eq!(h.send(right).await.status(), StatusCode::OK);
    for open in ["/healthz", "/ready", "/metrics"] {
        assert_eq!(h.get(open).await.status(), StatusCode::OK, "{open}");
    }
}
