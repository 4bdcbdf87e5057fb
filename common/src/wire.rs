//! JSON bodies of the limiter's decision API, as clients see them.

use serde::{Deserialize, Serialize};

/// One rate-limit decision: the body of `/rate` (200 or 429) and each item of a batch answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Whether the tokens were granted (and consumed).
    pub allowed: bool,
    /// The policy's capacity: the most tokens a key can hold.
    pub limit: u64,
    /// Whole tokens left after this decision.
    pub remaining: u64,
    /// Milliseconds until the bucket is full again if nothing else is spent.
    pub reset_after_ms: u64,
    /// Milliseconds until this request's cost would be granted; 0 when allowed.
    pub retry_after_ms: u64,
    /// The policy the decision was made under.
    pub policy: String,
}

/// A request for one decision, as sent in a JSON body or a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateRequest {
    /// Client id; the server falls back to `X-Client-Id`, then the caller's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Policy name; `default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Tokens to spend; 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<u64>,
}

/// `POST /rate/batch` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRequest {
    pub requests: Vec<RateRequest>,
}

/// `POST /rate/batch` answer: one decision per request, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResponse {
    pub decisions: Vec<Decision>,
}

/// Every 4xx and 5xx from the limiter has this body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_cost`, `unknown_policy`.
    pub code: String,
    /// What is wrong, for a person.
    pub message: String,
}
