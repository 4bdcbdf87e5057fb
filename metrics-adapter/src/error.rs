//! The crate's one error type. Each variant knows which `metav1.Status` it becomes (see
//! [`Error::status`]), so the HTTP layer never guesses a code.

use std::time::Duration;

use http::StatusCode;

/// Result with the crate's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the adapter, from a bad selector to a Prometheus outage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path names a metric that no rule defines. 404 `NotFound`.
    #[error("the server could not find the external metric {metric:?} (configured: {configured})")]
    UnknownMetric { metric: String, configured: String },

    /// The namespace in the path is not a valid Kubernetes namespace name. 400 `BadRequest`.
    #[error("invalid namespace {0:?}: must be a DNS-1123 label")]
    BadNamespace(String),

    /// `labelSelector` does not parse, uses an unsupported operator, or constrains a label the
    /// rule does not allow. 400 `BadRequest`.
    #[error("invalid labelSelector: {0}")]
    BadSelector(String),

    /// The query returned no series and the rule says that is an error. 404 `NotFound`, with
    /// the final PromQL in the message so the SRE can see why.
    #[error(
        "no data for external metric {metric:?}: Prometheus returned no series for {promql}. \
         If absence means zero, set `on_empty: {{value: 0}}` on the rule"
    )]
    EmptyResult { metric: String, promql: String },

    /// Every series was NaN or infinite and the rule says that is an error. 500.
    #[error(
        "external metric {metric:?}: query {promql} returned only NaN/Inf values, which the HPA \
         cannot use. Set `on_nan: skip` or `on_nan: {{value: 0}}` on the rule to choose otherwise"
    )]
    NanResult { metric: String, promql: String },

    /// Prometheus could not be reached or answered with an HTTP or API error. 500.
    #[error("Prometheus query failed: {0}")]
    Prometheus(String),

    /// Prometheus answered 200 with a body we cannot read. 500.
    #[error("Prometheus answered with an unreadable body: {0}")]
    PrometheusGarbage(String),

    /// The per-rule timeout elapsed (waiting for a query slot included). 500 `ServerTimeout`.
    #[error("Prometheus query timed out after {0:?}")]
    Timeout(Duration),

    /// A sample is NaN or infinite.
    #[error("value {0} is not finite")]
    NonFinite(String),

    /// A sample is not a decimal number.
    #[error("value {0:?} is not a number")]
    BadSample(String),

    /// A value too large for an int64 of milli-units, which is what the HPA computes with.
    #[error("value {0} is too large for a Kubernetes quantity in milli-units")]
    QuantityRange(String),

    /// A string is not a Kubernetes quantity.
    #[error("{0:?} is not a Kubernetes quantity")]
    BadQuantity(String),

    /// The configuration is invalid; every problem is listed, one per line.
    #[error("invalid configuration:\n{}", .0.join("\n"))]
    Config(Vec<String>),

    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// An HPA manifest given to `explain` is not usable.
    #[error("HPA manifest: {0}")]
    Hpa(String),
}

impl Error {
    /// The HTTP status and `metav1.StatusReason` this error is served as.
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            Error::UnknownMetric { .. } | Error::EmptyResult { .. } => {
                (StatusCode::NOT_FOUND, "NotFound")
            }
            Error::BadNamespace(_) | Error::BadSelector(_) => {
                (StatusCode::BAD_REQUEST, "BadRequest")
            }
            Error::Timeout(_) => (StatusCode::INTERNAL_SERVER_ERROR, "ServerTimeout"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
        }
    }
}

/// Cached query outcomes are shared between concurrent callers, so errors must be cloneable;
/// `std::io::Error` is not, so it is rebuilt from its kind and message.
impl Clone for Error {
    fn clone(&self) -> Self {
        match self {
            Error::UnknownMetric { metric, configured } => Error::UnknownMetric {
                metric: metric.clone(),
                configured: configured.clone(),
            },
            Error::BadNamespace(s) => Error::BadNamespace(s.clone()),
            Error::BadSelector(s) => Error::BadSelector(s.clone()),
            Error::EmptyResult { metric, promql } => Error::EmptyResult {
                metric: metric.clone(),
                promql: promql.clone(),
            },
            Error::NanResult { metric, promql } => Error::NanResult {
                metric: metric.clone(),
                promql: promql.clone(),
            },
            Error::Prometheus(s) => Error::Prometheus(s.clone()),
            Error::PrometheusGarbage(s) => Error::PrometheusGarbage(s.clone()),
            Error::Timeout(d) => Error::Timeout(*d),
            Error::NonFinite(s) => Error::NonFinite(s.clone()),
            Error::BadSample(s) => Error::BadSample(s.clone()),
            Error::QuantityRange(s) => Error::QuantityRange(s.clone()),
            Error::BadQuantity(s) => Error::BadQuantity(s.clone()),
            Error::Config(v) => Error::Config(v.clone()),
            Error::Io { path, source } => Error::Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::Hpa(s) => Error::Hpa(s.clone()),
        }
    }
}
