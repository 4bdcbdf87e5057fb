//! `GET|POST /rate` and `POST /rate/batch`: parse and validate the request completely, then
//! decide. Nothing touches a bucket until the whole request is known to be valid.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use openclaw_common::wire::{BatchResponse, Decision};
use serde_json::{Map, Value};

use super::error::ApiError;
use super::{AppState, MAX_BATCH, MAX_BODY_BYTES, MAX_KEY_BYTES};
use crate::policy::{DEFAULT_POLICY, valid_policy_name};
use crate::service::Verdict;

/// Header naming the client when the request has no `key`.
pub const CLIENT_ID_HEADER: &str = "x-client-id";

/// One validated decision request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionInput {
    pub key: String,
    pub policy: String,
    pub cost: u64,
}

/// `GET /rate?key=&policy=&cost=` or `POST /rate` with the same fields as JSON (or in the query
/// when the body is empty).
pub async fn rate(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let fallback_key = FallbackKey::of(&request);
    let (parts, body) = request.into_parts();
    let fields = if parts.method == Method::POST {
        let body = read_body(&parts.headers, body).await?;
        if body.is_empty() {
            query_fields(parts.uri.query())?
        } else {
            if parts.uri.query().is_some_and(|q| !q.is_empty()) {
                return Err(ApiError::InvalidQuery(
                    "send the fields either in the query string or in the JSON body, not both"
                        .into(),
                ));
            }
            json_fields(&body)?
        }
    } else {
        query_fields(parts.uri.query())?
    };
    let input = fields.validate("", fallback_key)?;
    let verdict = state
        .limiter
        .decide_with_loans(&input.policy, &input.key, input.cost)
        .await?;
    Ok(decision_response(&input.policy, verdict))
}

/// `POST /rate/batch` with `{"requests": [{key, policy, cost}, ...]}`: one independent decision
/// per item, in order. If any item is invalid, none is decided.
pub async fn batch(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let fallback_key = FallbackKey::of(&request);
    let (parts, body) = request.into_parts();
    let body = read_body(&parts.headers, body).await?;
    let document: Value = parse_json(&body)?;
    let Value::Object(mut root) = document else {
        return Err(ApiError::InvalidBatch(
            "expected a JSON object with `requests`".into(),
        ));
    };
    if let Some(field) = root.keys().find(|k| *k != "requests") {
        return Err(ApiError::UnknownField(format!(
            "unknown field `{field}` (expected `requests`)"
        )));
    }
    let Some(Value::Array(items)) = root.remove("requests") else {
        return Err(ApiError::InvalidBatch(
            "`requests` must be a list of decision requests".into(),
        ));
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(ApiError::InvalidBatch(format!(
            "`requests` must hold 1 to {MAX_BATCH} items, got {}",
            items.len()
        )));
    }
    let mut inputs = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("requests[{i}].");
        let Value::Object(map) = item else {
            return Err(ApiError::InvalidBatch(format!("{at}: expected an object")));
        };
        inputs.push(Fields::from_json(map)?.validate(&at, fallback_key.clone())?);
    }
    let requests: Vec<(&str, &str, u64)> = inputs
        .iter()
        .map(|i| (i.policy.as_str(), i.key.as_str(), i.cost))
        .collect();
    let verdicts = state
        .limiter
        .decide_all_with_loans(&requests)
        .await
        .map_err(|(i, e)| match ApiError::from(e) {
            ApiError::Decide(e) => ApiError::InvalidBatch(format!("requests[{i}]: {e}")),
            other => other,
        })?;
    let decisions = inputs
        .iter()
        .zip(verdicts)
        .map(|(input, verdict)| decision_body(&input.policy, verdict))
        .collect();
    Ok(Json(BatchResponse { decisions }).into_response())
}

/// The JSON body of one decision.
pub fn decision_body(policy: &str, verdict: Verdict) -> Decision {
    let outcome = verdict.outcome;
    Decision {
        allowed: outcome.allowed,
        limit: outcome.limit,
        remaining: outcome.remaining,
        reset_after_ms: outcome.reset_after_us.div_ceil(1000),
        retry_after_ms: outcome.retry_after_us.div_ceil(1000),
        policy: policy.to_owned(),
    }
}

/// 200 or 429 with the decision body and the IETF `RateLimit` / `RateLimit-Policy` fields
/// (draft-ietf-httpapi-ratelimit-headers): the quota `q` per window `w` seconds, the remaining
/// `r` and the seconds `t` until the bucket is full again. 429 adds `Retry-After` in seconds.
fn decision_response(policy: &str, verdict: Verdict) -> Response {
    let body = decision_body(policy, verdict);
    let status = if body.allowed {
        StatusCode::OK
    } else {
        StatusCode::TOO_MANY_REQUESTS
    };
    let window_s = verdict.rate.interval_ms().div_ceil(1000).max(1);
    let reset_s = body.reset_after_ms.div_ceil(1000);
    let mut response = (status, Json(&body)).into_response();
    let headers = response.headers_mut();
    // Policy names are restricted to characters that need no escaping in a structured string.
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(name, value);
        }
    };
    set(
        "ratelimit-policy",
        format!("\"{policy}\";q={};w={window_s}", body.limit),
    );
    set(
        "ratelimit",
        format!("\"{policy}\";r={};t={reset_s}", body.remaining),
    );
    if !body.allowed {
        set(
            "retry-after",
            body.retry_after_ms.div_ceil(1000).max(1).to_string(),
        );
    }
    response
}

/// Where the client id comes from when a request names none: `X-Client-Id`, else the caller's
/// address. Kept unresolved (no string built) until a request turns out to need it.
#[derive(Debug, Clone)]
struct FallbackKey {
    header: Option<HeaderValue>,
    caller: Option<SocketAddr>,
}

impl FallbackKey {
    fn of(request: &Request) -> Self {
        Self {
            header: request.headers().get(CLIENT_ID_HEADER).cloned(),
            caller: request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| *addr),
        }
    }

    fn resolve(self) -> Result<Option<String>, ApiError> {
        if let Some(value) = self.header {
            let key = value.to_str().map_err(|_| {
                ApiError::InvalidKey(format!(
                    "the {CLIENT_ID_HEADER} header must be visible ASCII"
                ))
            })?;
            return Ok(Some(key.to_owned()));
        }
        Ok(self.caller.map(|addr| addr.ip().to_string()))
    }
}

async fn read_body(headers: &HeaderMap, body: Body) -> Result<bytes::Bytes, ApiError> {
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        let is_json = content_type
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .is_some_and(|v| v == "application/json" || v.ends_with("+json"));
        if !is_json {
            return Err(ApiError::UnsupportedMediaType(
                "send JSON (Content-Type: application/json)".into(),
            ));
        }
    }
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::BodyTooLarge {
            limit: MAX_BODY_BYTES,
        }),
        Err(e) => Err(ApiError::InvalidJson(format!(
            "could not read the body: {e}"
        ))),
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(format!("malformed JSON: {e}")))
}

fn json_fields(body: &[u8]) -> Result<Fields, ApiError> {
    match parse_json(body)? {
        Value::Object(map) => Fields::from_json(map),
        _ => Err(ApiError::InvalidJson(
            "expected a JSON object with key, policy, cost".into(),
        )),
    }
}

fn query_fields(query: Option<&str>) -> Result<Fields, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::InvalidQuery(format!("malformed query string: {e}")))?;
    let mut fields = Fields {
        from_query: true,
        ..Fields::default()
    };
    for (name, value) in pairs {
        let slot = match name.as_str() {
            "key" => &mut fields.key,
            "policy" => &mut fields.policy,
            "cost" => &mut fields.cost,
            other => {
                return Err(ApiError::UnknownField(format!(
                    "unknown query parameter `{other}` (expected key, policy, cost)"
                )));
            }
        };
        if slot.replace(Value::String(value)).is_some() {
            return Err(ApiError::InvalidQuery(format!(
                "`{name}` is given more than once"
            )));
        }
    }
    Ok(fields)
}

/// The three inputs as received, before validation. Query values arrive as strings.
#[derive(Debug, Default)]
struct Fields {
    key: Option<Value>,
    policy: Option<Value>,
    cost: Option<Value>,
    /// Query values are all strings, so a numeric string is a number there (and only there).
    from_query: bool,
}

impl Fields {
    fn from_json(mut map: Map<String, Value>) -> Result<Self, ApiError> {
        if let Some(field) = map
            .keys()
            .find(|k| !matches!(k.as_str(), "key" | "policy" | "cost"))
        {
            return Err(ApiError::UnknownField(format!(
                "unknown field `{field}` (expected key, policy, cost)"
            )));
        }
        // An explicit null means "not given", as an absent field does.
        let mut take = |name| map.remove(name).filter(|v: &Value| !v.is_null());
        Ok(Self {
            key: take("key"),
            policy: take("policy"),
            cost: take("cost"),
            from_query: false,
        })
    }

    fn validate(self, at: &str, fallback_key: FallbackKey) -> Result<DecisionInput, ApiError> {
        let key = match self.key {
            Some(Value::String(key)) => key,
            Some(other) => {
                return Err(ApiError::InvalidKey(format!(
                    "{at}key must be a string, got {}",
                    kind(&other)
                )));
            }
            None => fallback_key.resolve()?.ok_or_else(|| {
                ApiError::InvalidKey(format!(
                    "{at}key is missing: pass `key`, or an {CLIENT_ID_HEADER} header"
                ))
            })?,
        };
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(ApiError::InvalidKey(format!(
                "{at}key must be 1 to {MAX_KEY_BYTES} bytes, got {}",
                key.len()
            )));
        }
        if key.chars().any(char::is_control) {
            return Err(ApiError::InvalidKey(format!(
                "{at}key must not contain control characters"
            )));
        }
        let policy = match self.policy {
            None => DEFAULT_POLICY.to_owned(),
            Some(Value::String(policy)) if valid_policy_name(&policy) => policy,
            Some(Value::String(_)) => {
                return Err(ApiError::InvalidPolicy(format!(
                    "{at}policy must be 1 to 63 of A-Z a-z 0-9 - _ ."
                )));
            }
            Some(other) => {
                return Err(ApiError::InvalidPolicy(format!(
                    "{at}policy must be a string, got {}",
                    kind(&other)
                )));
            }
        };
        let cost = match self.cost {
            None => 1,
            Some(value) => parse_cost(&value, self.from_query).ok_or_else(|| {
                ApiError::InvalidCost(format!(
                    "{at}cost must be a whole number of tokens, at least 1, got {}",
                    match &value {
                        Value::String(s) => format!("`{s}`"),
                        other => other.to_string(),
                    }
                ))
            })?,
        };
        Ok(DecisionInput { key, policy, cost })
    }
}

fn parse_cost(value: &Value, from_query: bool) -> Option<u64> {
    let cost = match value {
        Value::Number(n) => n.as_u64()?,
        // From a query string: digits only (no sign, no decimal point, no spaces).
        Value::String(s)
            if from_query
                && !s.is_empty()
                && s.len() <= 20
                && s.bytes().all(|b| b.is_ascii_digit()) =>
        {
            s.parse().ok()?
        }
        _ => return None,
    };
    (cost >= 1).then_some(cost)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
