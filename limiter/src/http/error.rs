//! The one error type of the decision API. Every 4xx and 5xx leaves through here, so every bad
//! input gets the same JSON shape (`{"error": {"code", "message"}}`). 4xx carry their message
//! and are not logged as errors; 5xx answer with a generic message and are logged.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use openclaw_common::wire::{ErrorBody, ErrorDetail};

use crate::service::DecideError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidQuery(String),
    #[error("{0}")]
    InvalidKey(String),
    #[error("{0}")]
    InvalidCost(String),
    #[error("{0}")]
    InvalidPolicy(String),
    #[error("{0}")]
    UnknownField(String),
    #[error("{0}")]
    InvalidBatch(String),
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error(transparent)]
    Decide(#[from] DecideError),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// Stable machine-readable code (also the `reason` label of `openclaw_bad_requests_total`).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidQuery(_) => "invalid_query",
            ApiError::InvalidKey(_) => "invalid_key",
            ApiError::InvalidCost(_) => "invalid_cost",
            ApiError::InvalidPolicy(_) => "invalid_policy",
            ApiError::UnknownField(_) => "unknown_field",
            ApiError::InvalidBatch(_) => "invalid_batch",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Decide(DecideError::UnknownPolicy(_)) => "unknown_policy",
            ApiError::Decide(DecideError::CostAboveCapacity { .. }) => "cost_above_capacity",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Conflict(_) => "not_configured",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// Whether the caller sent something malformed (counted by reason in the metrics).
    pub fn is_bad_input(&self) -> bool {
        self.status().is_client_error()
            && !matches!(
                self,
                ApiError::Unauthorized | ApiError::NotFound(_) | ApiError::MethodNotAllowed
            )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
            "internal error; see the limiter's log".to_owned()
        } else {
            tracing::debug!(error = %self, code = self.code(), "bad request");
            self.to_string()
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message,
            },
        };
        let mut response = (status, Json(body)).into_response();
        if self.is_bad_input() {
            response
                .extensions_mut()
                .insert(super::BadInput(self.code()));
        }
        if matches!(self, ApiError::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
