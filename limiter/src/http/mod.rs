//! The decision API over HTTP (axum): routes, limits on input, bearer auth and request metrics.
//! Handlers are thin: they parse and validate, then call [`crate::service::Limiter`].

mod error;
mod ops;
mod rate;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

pub use error::ApiError;
pub use rate::{CLIENT_ID_HEADER, DecisionInput};

use crate::metrics::ReasonLabels;
use crate::service::Limiter;

/// Longest client key accepted, in bytes. Longer keys are refused, not truncated: two clients
/// must never share a bucket by accident.
pub const MAX_KEY_BYTES: usize = 256;
/// Largest request body accepted (a batch of [`MAX_BATCH`] short requests fits).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Most decisions in one batch request.
pub const MAX_BATCH: usize = 1000;

/// What every handler can reach.
#[derive(Clone, Debug)]
pub struct AppState {
    pub limiter: Arc<Limiter>,
    /// When set, `/rate`, `/rate/batch` and `/status` require `Authorization: Bearer <key>`.
    pub api_key: Option<Arc<str>>,
    /// Present when this replica has peers.
    pub replicator: Option<Arc<crate::replication::Replicator>>,
    /// How peers are found, for `/status`; present with replication.
    pub discovery: Option<Arc<crate::membership::DiscoveryStatus>>,
    /// Present when `OPENCLAW_SNAPSHOT_DIR` is set.
    pub snapshots: Option<Arc<crate::snapshot::Snapshots>>,
}

/// All routes. Health and metrics stay open when an API key is set: probes and Prometheus do
/// not carry it. The state is shared behind one `Arc`: axum clones it for every request (twice,
/// with the `observe` layer), and one reference count is cheaper than one per field.
pub fn router(state: AppState) -> Router {
    let state = Arc::new(state);
    let mut protected = Router::new()
        .route("/rate", get(rate::rate).post(rate::rate))
        .route("/rate/batch", post(rate::batch))
        .route("/status", get(ops::status))
        .route("/admin/snapshot", post(ops::snapshot_now));
    // Without a key there is nothing to check: no layer, no cost on the hot path.
    if state.api_key.is_some() {
        protected = protected.route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    }
    Router::new()
        .merge(protected)
        .route("/healthz", get(ops::healthz))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound(format!("{} {}", request.method(), request.uri().path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(expected) = &state.api_key {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), expected.as_bytes())) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

/// Compares without an early exit, so response time does not reveal how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Latency per route, and bad requests by reason.
async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    let histogram = state.limiter.metrics().route_latency(route).clone();
    let started = Instant::now();
    let response = next.run(request).await;
    histogram.observe(started.elapsed().as_secs_f64());
    if let Some(reason) = response.extensions().get::<BadInput>() {
        let metrics = state.limiter.metrics();
        metrics
            .bad_requests
            .get_or_create(&ReasonLabels { reason: reason.0 })
            .inc();
    }
    response
}

/// Marks a response as a refused bad input, with its reason (see [`ApiError::code`]).
#[derive(Clone, Copy, Debug)]
struct BadInput(&'static str);
