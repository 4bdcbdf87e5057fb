//! The HTTP surface: the `external.metrics.k8s.io/v1beta1` API plus health and `/metrics`.
//!
//! [`router`] has every route and no authentication, so tests (and the auth layer, which wraps
//! it in `main`) can drive it in-process. Every answer is JSON whatever `Accept` says (the HPA
//! asks for protobuf first and accepts JSON); every failure is a `metav1.Status`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    APIGroup, APIGroupList, APIResource, APIResourceList, GroupVersionForDiscovery, ListMeta, Time,
};
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::cache::{Cache, Lookup};
use crate::config::{ConfigStore, OnEmpty, OnNan, Rule, SeriesPolicy};
use crate::metrics::Metrics;
use crate::prometheus::{Prometheus, QueryResult};
use crate::promql::{equal_matcher, is_prometheus_label_name, matchers_for};
use crate::quantity::Decimal;
use crate::selector::{Requirement, Selector, validate_namespace};
use crate::status::status_response;
use crate::{Error, Result};

pub const GROUP: &str = "external.metrics.k8s.io";
pub const VERSION: &str = "v1beta1";
pub const GROUP_VERSION: &str = "external.metrics.k8s.io/v1beta1";

/// `external.metrics.k8s.io/v1beta1` `ExternalMetricValueList`, field names as upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalMetricValueList {
    pub kind: String,
    pub api_version: String,
    pub metadata: ListMeta,
    pub items: Vec<ExternalMetricValue>,
}

/// One value of an external metric. `window` is seconds (upstream `WindowSeconds *int64
/// json:"window,omitempty"`); `timestamp` is RFC 3339, whole seconds, UTC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalMetricValue {
    pub metric_name: String,
    pub metric_labels: BTreeMap<String, String>,
    pub timestamp: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<i64>,
    pub value: Quantity,
}

impl ExternalMetricValueList {
    pub fn new(items: Vec<ExternalMetricValue>) -> Self {
        ExternalMetricValueList {
            kind: "ExternalMetricValueList".to_owned(),
            api_version: GROUP_VERSION.to_owned(),
            metadata: ListMeta::default(),
            items,
        }
    }
}

/// Everything a request needs; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub config: ConfigStore,
    pub prometheus: Prometheus,
    pub cache: Arc<Cache<Arc<QueryResult>>>,
    pub metrics: Arc<Metrics>,
    ready: ReadyCheck,
}

/// What `/readyz` asks (e.g. "has the auth layer read its ConfigMap?"). Prometheus is *not*
/// part of readiness: an unready adapter makes the aggregator answer 503 for every call, while
/// a ready one explains a Prometheus outage in each Status.
#[derive(Clone)]
struct ReadyCheck(Arc<dyn Fn() -> bool + Send + Sync>);

impl std::fmt::Debug for ReadyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadyCheck")
    }
}

impl AppState {
    pub fn new(config: ConfigStore, prometheus: Prometheus, metrics: Arc<Metrics>) -> Self {
        metrics.set_configured(config.get().rules.len());
        AppState {
            config,
            prometheus,
            cache: Arc::new(Cache::new(4096)),
            metrics,
            ready: ReadyCheck(Arc::new(|| true)),
        }
    }

    /// Makes `/readyz` answer 503 while `check` says no.
    pub fn set_ready_check(&mut self, check: impl Fn() -> bool + Send + Sync + 'static) {
        self.ready = ReadyCheck(Arc::new(check));
    }
}

/// All routes, unauthenticated.
pub fn router(state: AppState) -> Router {
    Router::new()
        // Every discovery path with and without a trailing slash, as kube-apiserver serves
        // them (the official Python client asks for `/apis/` and `/version/`).
        .route("/apis", get(api_group_list))
        .route("/apis/", get(api_group_list))
        .route("/apis/external.metrics.k8s.io", get(api_group))
        .route("/apis/external.metrics.k8s.io/", get(api_group))
        .route(
            "/apis/external.metrics.k8s.io/v1beta1",
            get(api_resource_list),
        )
        .route(
            "/apis/external.metrics.k8s.io/v1beta1/",
            get(api_resource_list),
        )
        .route(
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/{metric}",
            get(list),
        )
        .route("/openapi/v2", get(openapi_v2))
        .route("/openapi/v3", get(openapi_v3))
        .route("/version", get(version))
        .route("/version/", get(version))
        .route("/healthz", get(ok))
        .route("/livez", get(ok))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

fn json<T: Serialize>(code: StatusCode, body: &T) -> Response {
    let mut response = (code, Json(body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (code, reason) = self.status();
        if code.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, "request refused");
        }
        status_response(code, reason, self.to_string())
    }
}

async fn api_group_list() -> Response {
    json(
        StatusCode::OK,
        &APIGroupList {
            groups: vec![group()],
        },
    )
}

async fn api_group() -> Response {
    json(StatusCode::OK, &group())
}

fn group() -> APIGroup {
    let version = GroupVersionForDiscovery {
        group_version: GROUP_VERSION.to_owned(),
        version: VERSION.to_owned(),
    };
    APIGroup {
        name: GROUP.to_owned(),
        preferred_version: Some(version.clone()),
        server_address_by_client_cidrs: None,
        versions: vec![version],
    }
}

async fn api_resource_list(State(state): State<AppState>) -> Response {
    let config = state.config.get();
    let resources = config
        .rules
        .keys()
        .map(|name| APIResource {
            name: name.clone(),
            singular_name: String::new(),
            namespaced: true,
            kind: "ExternalMetricValueList".to_owned(),
            verbs: vec!["get".to_owned()],
            categories: None,
            group: None,
            short_names: None,
            storage_version_hash: None,
            version: None,
        })
        .collect();
    json(
        StatusCode::OK,
        &APIResourceList {
            group_version: GROUP_VERSION.to_owned(),
            resources,
        },
    )
}

#[derive(Debug, Deserialize)]
struct ListParams {
    #[serde(rename = "labelSelector")]
    label_selector: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    Path((namespace, metric)): Path<(String, String)>,
    params: std::result::Result<Query<ListParams>, QueryRejection>,
) -> Response {
    let started = Instant::now();
    let config = state.config.get();
    // Bounded label: configured names only.
    let metric_label = if config.rule(&metric).is_some() {
        metric.as_str()
    } else {
        "unknown"
    };
    let result = async {
        let Query(params) = params.map_err(|e| Error::BadSelector(e.body_text()))?;
        let selector = Selector::parse(params.label_selector.as_deref().unwrap_or(""))?;
        validate_namespace(&namespace)?;
        let rule = config
            .rule(&metric)
            .cloned()
            .ok_or_else(|| Error::UnknownMetric {
                metric: metric.clone(),
                configured: config.names(),
            })?;
        external_metric(&state, &rule, &namespace, &selector)
            .await
            .map(|e| e.list)
    }
    .await;
    let response = match result {
        Ok(list) => json(StatusCode::OK, &list),
        Err(e) => e.into_response(),
    };
    state
        .metrics
        .request(metric_label, response.status().as_u16(), started.elapsed());
    response
}

/// One evaluated external metric, with every intermediate step (for `explain`).
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub promql: String,
    pub result: Arc<QueryResult>,
    pub list: ExternalMetricValueList,
    pub lookup: Lookup,
}

/// The PromQL a request runs: the rule's query with the selector (and, if the rule says so,
/// the namespace) injected.
///
/// A selector may constrain the rule's `selectable_labels` with any operator: the SRE listed
/// the labels by which narrowing every series of the query means something (a `decision`
/// narrowing of a ratio whose numerator has no `decision` label would serve a wrong number).
/// Any other label may only be named by `!k`, "has no such label", which Kubernetes defines for
/// every label and which Prometheus decides: `k=""` is injected, so on a label no series has it
/// narrows nothing (a 200, not a 400), and series that do carry it are excluded. Everything
/// else is a 400, never silently ignored.
pub fn final_promql(rule: &Rule, namespace: &str, selector: &Selector) -> Result<String> {
    for r in &selector.requirements {
        let key = r.key();
        if rule.selectable_labels.contains(key) {
            continue;
        }
        let absent = matches!(r, Requirement::DoesNotExist { .. });
        if absent && is_prometheus_label_name(key) {
            continue;
        }
        let allowed = rule.selectable_labels_text();
        return Err(Error::BadSelector(if absent {
            format!(
                "!{key}: {key:?} cannot be a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*), so \
                 it cannot be written as a matcher (external metric {:?}: selectable labels: \
                 {allowed})",
                rule.name
            )
        } else {
            format!(
                "external metric {:?} cannot be narrowed by label {key:?} (selectable labels: \
                 {allowed}; any other label only as !label, \"does not exist\")",
                rule.name
            )
        }));
    }
    let mut matchers = matchers_for(selector);
    if let Some(label) = &rule.namespace_label {
        matchers.push(equal_matcher(label, namespace));
    }
    Ok(rule.query.with_matchers(&matchers))
}

/// Runs a rule for a namespace and selector: cache, Prometheus, then the rule's policies.
pub async fn external_metric(
    state: &AppState,
    rule: &Arc<Rule>,
    namespace: &str,
    selector: &Selector,
) -> Result<Evaluation> {
    let promql = final_promql(rule, namespace, selector)?;
    let key = format!("{}\u{0}{promql}", rule.name);
    let (result, lookup) = state
        .cache
        .get_or_fetch(&key, rule.cache_ttl, || {
            let prometheus = state.prometheus.clone();
            let (name, promql, timeout) = (rule.name.clone(), promql.clone(), rule.timeout);
            async move {
                prometheus
                    .query(&name, &promql, timeout)
                    .await
                    .map(Arc::new)
            }
        })
        .await;
    state.metrics.cache_lookup(&rule.name, lookup.as_str());
    let result = result?;
    let items = items(rule, &promql, &result)?;
    Ok(Evaluation {
        promql,
        result,
        list: ExternalMetricValueList::new(items),
        lookup,
    })
}

/// Applies a rule's NaN, empty and multi-series policies to a Prometheus answer (pure).
pub fn items(rule: &Rule, promql: &str, result: &QueryResult) -> Result<Vec<ExternalMetricValue>> {
    struct Point<'a> {
        labels: &'a BTreeMap<String, String>,
        timestamp: f64,
        value: Decimal,
    }
    let mut points = Vec::with_capacity(result.samples.len());
    for s in &result.samples {
        let value = match Decimal::parse_sample(&s.value) {
            Ok(v) => v,
            Err(Error::NonFinite(_)) => match rule.on_nan {
                OnNan::Skip => continue,
                OnNan::Value(v) => v,
                OnNan::Error => {
                    return Err(Error::NanResult {
                        metric: rule.name.clone(),
                        promql: promql.to_owned(),
                    });
                }
            },
            Err(e) => return Err(e),
        };
        points.push(Point {
            labels: &s.labels,
            timestamp: s.timestamp,
            value,
        });
    }
    let window = rule
        .window
        .map(|w| i64::try_from(w.as_secs()).unwrap_or(i64::MAX));
    let item = |labels: BTreeMap<String, String>,
                timestamp: f64,
                value: Decimal|
     -> Result<ExternalMetricValue> {
        Ok(ExternalMetricValue {
            metric_name: rule.name.clone(),
            metric_labels: labels,
            timestamp: to_time(timestamp),
            window,
            value: value.to_milli()?.to_quantity(),
        })
    };
    if points.is_empty() {
        return match rule.on_empty {
            OnEmpty::Error => Err(Error::EmptyResult {
                metric: rule.name.clone(),
                promql: promql.to_owned(),
            }),
            OnEmpty::Empty => Ok(Vec::new()),
            OnEmpty::Value(v) => Ok(vec![item(BTreeMap::new(), result.evaluated_at, v)?]),
        };
    }
    let latest = points.iter().map(|p| p.timestamp).fold(f64::MIN, f64::max);
    match rule.series {
        SeriesPolicy::Sum => {
            let mut total = Decimal::ZERO;
            for p in &points {
                total = total.checked_add(p.value)?;
            }
            // Labels every series agrees on (all of them when there is one series).
            let mut common = points[0].labels.clone();
            for p in &points[1..] {
                common.retain(|k, v| p.labels.get(k) == Some(v));
            }
            Ok(vec![item(common, latest, total)?])
        }
        SeriesPolicy::Max => {
            let best = points
                .iter()
                .max_by_key(|p| p.value)
                .expect("points is not empty");
            Ok(vec![item(best.labels.clone(), best.timestamp, best.value)?])
        }
        SeriesPolicy::PerSeries => {
            points.sort_by(|a, b| a.labels.cmp(b.labels));
            points
                .iter()
                .map(|p| item(p.labels.clone(), p.timestamp, p.value))
                .collect()
        }
    }
}

/// Unix seconds to a whole-second `Time` (the sample's time, truncated as `metav1.Time` is).
fn to_time(unix: f64) -> Time {
    let secs = unix.floor();
    let ts = if (0.0..253_402_300_799.0).contains(&secs) {
        Timestamp::from_second(secs as i64).unwrap_or(Timestamp::UNIX_EPOCH)
    } else {
        Timestamp::UNIX_EPOCH
    };
    Time(ts)
}

/// A minimal Swagger 2.0 document for our one path: enough for the aggregator to merge and
/// for `kubectl` to read, with nothing that could contradict the real schema.
async fn openapi_v2() -> Response {
    let doc = serde_json::json!({
        "swagger": "2.0",
        "info": {"title": "openclaw-metrics-adapter", "version": VERSION},
        "paths": {
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/{metric}": {
                "get": {
                    "description": "list the values of an external metric",
                    "operationId": "listExternalMetricsV1beta1NamespacedMetric",
                    "produces": ["application/json"],
                    "schemes": ["https"],
                    "tags": ["external_metrics_v1beta1"],
                    "parameters": [
                        {"name": "namespace", "in": "path", "required": true, "type": "string"},
                        {"name": "metric", "in": "path", "required": true, "type": "string"},
                        {"name": "labelSelector", "in": "query", "type": "string", "uniqueItems": true}
                    ],
                    "responses": {
                        "200": {"description": "OK", "schema": {"$ref": "#/definitions/io.k8s.metrics.pkg.apis.external_metrics.v1beta1.ExternalMetricValueList"}},
                        "401": {"description": "Unauthorized"}
                    }
                }
            }
        },
        "definitions": {
            "io.k8s.metrics.pkg.apis.external_metrics.v1beta1.ExternalMetricValueList": {
                "type": "object",
                "required": ["items"],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    "items": {"type": "array", "items": {"$ref": "#/definitions/io.k8s.metrics.pkg.apis.external_metrics.v1beta1.ExternalMetricValue"}}
                },
                "x-kubernetes-group-version-kind": [{"group": GROUP, "kind": "ExternalMetricValueList", "version": VERSION}]
            },
            "io.k8s.metrics.pkg.apis.external_metrics.v1beta1.ExternalMetricValue": {
                "type": "object",
                "required": ["metricName", "metricLabels", "timestamp", "value"],
                "properties": {
                    "metricName": {"type": "string"},
                    "metricLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "timestamp": {"type": "string", "format": "date-time"},
                    "window": {"type": "integer", "format": "int64"},
                    "value": {"type": "string"}
                }
            }
        }
    });
    json(StatusCode::OK, &doc)
}

/// No OpenAPI v3 document: 404 (the aggregator then skips this service for v3).
async fn openapi_v3() -> Response {
    status_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        "this server publishes no OpenAPI v3 document",
    )
}

/// `/version`, which generic API servers serve and client discovery (e.g. the Python client's
/// dynamic client) reads first.
async fn version() -> Response {
    let v = env!("CARGO_PKG_VERSION");
    let (major, minor) = {
        let mut parts = v.split('.');
        (parts.next().unwrap_or("0"), parts.next().unwrap_or("0"))
    };
    json(
        StatusCode::OK,
        &k8s_openapi::apimachinery::pkg::version::Info {
            build_date: String::new(),
            compiler: "rustc".to_owned(),
            emulation_major: None,
            emulation_minor: None,
            git_commit: String::new(),
            git_tree_state: String::new(),
            git_version: format!("v{v}"),
            go_version: String::new(),
            major: major.to_owned(),
            min_compatibility_major: None,
            min_compatibility_minor: None,
            minor: minor.to_owned(),
            platform: format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
        },
    )
}

async fn ok() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Response {
    if (state.ready.0)() {
        "ok".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: authentication configuration not loaded yet",
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut response = state.metrics.encode().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

async fn not_found(uri: axum::http::Uri) -> Response {
    status_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!(
            "the server could not find the requested resource {}",
            uri.path()
        ),
    )
}

async fn method_not_allowed() -> Response {
    status_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "only GET is supported",
    )
}
