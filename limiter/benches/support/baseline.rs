//! The bare handler of the shape of the limiter's `GET /rate`, with no limiter behind it: the
//! baseline of the HTTP benchmarks. Shared by `examples/baseline_server.rs` (served over TCP by
//! `scripts/bench-http.sh`) and `benches/router.rs` (driven in-process), so both measure the
//! same code.
//!
//! It does the work any handler of that shape must do: parse the query string the same way
//! (`serde_urlencoded` into pairs, cost as digits), serialize the same JSON body
//! (`openclaw_common::wire::Decision`) and format the same `RateLimit` / `RateLimit-Policy`
//! header fields. What it leaves out is what the comparison measures: the policy lookup, the
//! bucket store, the request-metrics and auth middleware, and the router's fallbacks.

use axum::Router;
use axum::extract::RawQuery;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use openclaw_common::wire::{Decision, ErrorBody, ErrorDetail};

/// Every answer reports a refill window of one second, as the limiter's default policy has.
const WINDOW_S: u64 = 1;

/// `GET /rate` answering 200 with `limit` as the capacity (pass the limiter's
/// `BUCKET_CAPACITY` so both send bodies and header fields of the same length).
pub fn router(limit: u64) -> Router {
    let limit = limit.max(1);
    Router::new().route("/rate", get(move |query| rate(query, limit)))
}

async fn rate(RawQuery(query): RawQuery, limit: u64) -> Response {
    let pairs: Vec<(String, String)> =
        match serde_urlencoded::from_str(query.as_deref().unwrap_or("")) {
            Ok(pairs) => pairs,
            Err(e) => return bad_request(format!("malformed query string: {e}")),
        };
    let (mut key, mut policy, mut cost) = (None, None, None);
    for (name, value) in pairs {
        match name.as_str() {
            "key" => key = Some(value),
            "policy" => policy = Some(value),
            "cost" => cost = Some(value),
            other => return bad_request(format!("unknown query parameter `{other}`")),
        }
    }
    if key.is_none_or(|k| k.is_empty()) {
        return bad_request("key is missing".into());
    }
    let cost = match cost.as_deref().map(str::parse::<u64>) {
        None => 1,
        Some(Ok(cost)) if cost >= 1 => cost,
        Some(_) => return bad_request("cost must be a whole number of tokens, at least 1".into()),
    };
    let policy = policy.unwrap_or_else(|| "default".to_owned());
    let body = Decision {
        allowed: true,
        limit,
        remaining: limit - cost.min(limit),
        reset_after_ms: 1,
        retry_after_ms: 0,
        policy,
    };
    let reset_s = body.reset_after_ms.div_ceil(1000);
    let policy_field = format!("\"{}\";q={};w={WINDOW_S}", body.policy, body.limit);
    let ratelimit_field = format!("\"{}\";r={};t={reset_s}", body.policy, body.remaining);
    let mut response = (StatusCode::OK, Json(&body)).into_response();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::try_from(policy_field) {
        headers.insert("ratelimit-policy", value);
    }
    if let Ok(value) = HeaderValue::try_from(ratelimit_field) {
        headers.insert("ratelimit", value);
    }
    response
}

fn bad_request(message: String) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: "invalid_query".into(),
            message,
        },
    };
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}
