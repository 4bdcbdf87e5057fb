//! Operational routes: `/status`, `/healthz`, `/ready`, `/metrics`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use super::rate::decision_body;
use crate::policy::{DEFAULT_POLICY, Mode, valid_policy_name};

#[derive(Serialize)]
struct PolicyStatus<'a> {
    name: &'a str,
    capacity: u64,
    refill_interval_ms: u64,
    fill_rate_per_second: f64,
    mode: Mode,
    overrides: usize,
}

/// Node, policies, key count and (with `?key=&policy=`) one bucket, peeked without spending.
pub async fn status(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let limiter = &state.limiter;
    let mut key = None;
    let mut policy = None;
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
            .map_err(|e| ApiError::InvalidQuery(format!("malformed query string: {e}")))?;
    for (name, value) in pairs {
        match name.as_str() {
            "key" => key = Some(value),
            "policy" => policy = Some(value),
            other => {
                return Err(ApiError::UnknownField(format!(
                    "unknown query parameter `{other}` (expected key, policy)"
                )));
            }
        }
    }
    let bucket = match (key, policy) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(ApiError::InvalidKey(
                "to peek at a bucket, pass `key` (and optionally `policy`)".into(),
            ));
        }
        (Some(key), policy) => {
            let policy = policy.unwrap_or_else(|| DEFAULT_POLICY.to_owned());
            if key.is_empty() || key.len() > super::MAX_KEY_BYTES {
                return Err(ApiError::InvalidKey(format!(
                    "key must be 1 to {} bytes",
                    super::MAX_KEY_BYTES
                )));
            }
            if !valid_policy_name(&policy) {
                return Err(ApiError::InvalidPolicy(
                    "policy must be 1 to 63 of A-Z a-z 0-9 - _ .".into(),
                ));
            }
            let (verdict, held) = limiter.peek(&policy, &key, 1)?;
            let decision = decision_body(&policy, verdict);
            Some(json!({
                "key": key,
                "policy": policy,
                "limit": decision.limit,
                "remaining": decision.remaining,
                "reset_after_ms": decision.reset_after_ms,
                "held_in_memory": held,
            }))
        }
    };
    let policies = limiter.policies();
    let now = limiter.now();
    let mut body = json!({
        "node_id": limiter.node_id(),
        "replica_id": format!("{:016x}", limiter.store().replica().0),
        "version": env!("CARGO_PKG_VERSION"),
        "ready": limiter.is_ready(),
        "uptime_s": now.saturating_sub(limiter.started()) / 1_000_000,
        "topology": if state.replicator.is_some() { "replicated" } else { "single-node" },
        "peers": peer_list(&state, now, false),
        "inbound": peer_list(&state, now, true),
        "keys": limiter.store().len(),
        "policies": policies.iter().map(|p| PolicyStatus {
            name: &p.name,
            capacity: p.rate.capacity(),
            refill_interval_ms: p.rate.interval_ms(),
            fill_rate_per_second: p.rate.fill_rate_per_second(),
            mode: p.mode,
            overrides: p.overrides().count(),
        }).collect::<Vec<_>>(),
        "snapshot": match &state.snapshots {
            None => json!({ "enabled": false }),
            Some(snapshots) => json!({
                "enabled": true,
                "dir": snapshots.dir().display().to_string(),
                "age_s": snapshots.age_seconds(now),
            }),
        },
    });
    if let Some(discovery) = &state.discovery {
        body["discovery"] = serde_json::to_value(discovery.report()).unwrap_or_default();
    }
    if let Some(bucket) = bucket {
        body["bucket"] = bucket;
    }
    if let Some(escrow) = limiter.escrow()
        && limiter.has_strict_policies()
    {
        // strict mode: the allocation this replica follows and the shares it may spend now.
        body["escrow"] = serde_json::to_value(escrow.status()).unwrap_or_default();
    }
    Ok(Json(body).into_response())
}

/// Liveness: the process answers.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: a latch set once start-up recovery is done.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.limiter.is_ready() {
        Json(json!({ "status": "ready" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "starting" })),
        )
            .into_response()
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if let Some(replicator) = &state.replicator {
        replicator.publish_gauges();
    }
    if let Some(snapshots) = &state.snapshots {
        snapshots.publish_age(&state.limiter);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.limiter.render_metrics(),
    )
        .into_response()
}

/// `POST /admin/snapshot`: write a snapshot now and describe it. Admin calls need the API key:
/// without `OPENCLAW_API_KEY` they are refused rather than left open.
pub async fn snapshot_now(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    if state.api_key.is_none() {
        return Err(ApiError::Forbidden(
            "admin calls are disabled: set OPENCLAW_API_KEY to enable them".into(),
        ));
    }
    let Some(snapshots) = state.snapshots.clone() else {
        return Err(ApiError::Conflict(
            "snapshots are off: set OPENCLAW_SNAPSHOT_DIR".into(),
        ));
    };
    let limiter = state.limiter.clone();
    let info = tokio::task::spawn_blocking(move || snapshots.write(&limiter))
        .await
        .map_err(|e| ApiError::Internal(format!("snapshot task failed: {e}")))?
        .map_err(|e| ApiError::Internal(format!("snapshot failed: {e}")))?;
    Ok(Json(info).into_response())
}

/// Peers as `/status` shows them: the ones this replica sends to (by address, from discovery),
/// or the ones it has received state from (by node id).
fn peer_list(state: &AppState, now: u64, inbound: bool) -> Vec<serde_json::Value> {
    let Some(replicator) = &state.replicator else {
        return Vec::new();
    };
    replicator
        .peer_statuses()
        .into_iter()
        .filter(|p| p.address.starts_with("node:") == inbound)
        .map(|p| {
            json!({
                "address": (!inbound).then_some(&p.address),
                "node": p.node,
                "up": p.up,
                "last_contact_ms_ago": p.last_contact_us.map(|t| now.saturating_sub(t) / 1000),
                "replication_lag_ms": p.last_merge_us.map(|t| now.saturating_sub(t) / 1000),
                "last_error": p.last_error,
                "messages_sent": p.messages_sent,
                "messages_received": p.messages_received,
                // Beyond the clock guard, one way or the other (docs/crdt.md, "Clocks").
                "clock_separated": (!inbound).then(|| p.clock_separated()),
                // The newest protocol version it announced (docs/crdt.md, "The wire format"):
                // during a rolling upgrade, which peers still get the older form.
                "reads_version": (!inbound).then_some(p.reads_version),
            })
        })
        .collect()
}
