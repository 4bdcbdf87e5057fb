//! `metav1.Status`: the one error body every Kubernetes client understands.
//!
//! The aggregator, kubectl and the HPA controller all decode failures as a `Status` object; a
//! plain-text or ad-hoc JSON error would surface to the SRE as "unknown error". Every non-2xx
//! answer of the adapter (including 401/403 from the auth layer) goes through here.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, Status};

/// Builds a `metav1.Status` failure body with `code` as both HTTP status and `code` field.
///
/// `reason` is a `metav1.StatusReason` such as `NotFound`, `BadRequest`, `Unauthorized`,
/// `Forbidden`, `InternalError`, `ServiceUnavailable`, `Timeout`.
pub fn status_body(code: StatusCode, reason: &str, message: impl Into<String>) -> Status {
    Status {
        code: Some(i32::from(code.as_u16())),
        details: None,
        message: Some(message.into()),
        metadata: ListMeta::default(),
        reason: Some(reason.to_owned()),
        status: Some("Failure".to_owned()),
    }
}

/// A complete HTTP response carrying a `metav1.Status` with `Content-Type: application/json`.
pub fn status_response(code: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    let body = status_body(code, reason, message);
    // `Status` serializes `kind` and `apiVersion` itself (it implements k8s_openapi::Resource).
    let json = serde_json::to_vec(&body).unwrap_or_else(|_| {
        br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"internal error","reason":"InternalError","code":500}"#.to_vec()
    });
    let mut response = (code, json).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_serializes_with_the_exact_upstream_shape() {
        let json =
            serde_json::to_value(status_body(StatusCode::NOT_FOUND, "NotFound", "nope")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "nope", "reason": "NotFound", "code": 404
            })
        );
    }

    #[test]
    fn status_response_is_json_with_the_same_code() {
        let response = status_response(StatusCode::FORBIDDEN, "Forbidden", "denied");
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }
}
