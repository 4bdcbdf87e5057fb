//! The Prometheus HTTP API client: instant queries, bounded in time and in concurrency.
//!
//! Each query holds one of `max_concurrent` slots; waiting for a slot counts against the
//! rule's timeout, so a Prometheus that hangs costs each caller at most that bound and never
//! piles up unbounded requests. Prometheus is told the same timeout (`timeout=` parameter) so
//! it stops evaluating when we stop waiting. Every failure becomes a precise [`Error`]:
//! unreachable, HTTP or API error (with Prometheus' own message), timeout, or a body we cannot
//! read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::quantity::Decimal;
use crate::{Error, Result};

/// Largest response body accepted from Prometheus.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// One sample of an instant query's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Series labels (`__name__` removed: it is not a Kubernetes label).
    pub labels: BTreeMap<String, String>,
    /// Evaluation time, Unix seconds.
    pub timestamp: f64,
    /// The value as Prometheus wrote it (`"0.8"`, `"NaN"`).
    pub value: String,
}

/// An instant query's answer.
#[derive(Debug, Clone)]
pub struct QueryResult {
    /// `vector` or `scalar`.
    pub result_type: String,
    pub samples: Vec<Sample>,
    /// The body exactly as received, for `explain`.
    pub raw: Bytes,
    /// When the query was answered (Unix seconds), used when no sample carries a time.
    pub evaluated_at: f64,
}

/// A cheap-to-clone handle to one Prometheus server.
#[derive(Debug, Clone)]
pub struct Prometheus {
    http: reqwest::Client,
    query_url: String,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Prometheus {
    /// `base_url` like `http://prometheus.monitoring.svc:9090` (a path prefix is kept).
    pub fn new(base_url: &str, max_concurrent: usize, metrics: Arc<Metrics>) -> Result<Self> {
        let base = base_url.trim_end_matches('/');
        if !base.starts_with("http://") {
            return Err(Error::Config(vec![format!(
                "--prometheus-url {base_url:?} must start with http:// (reach an HTTPS-only \
                 Prometheus through its in-cluster HTTP port or a proxy sidecar)"
            )]));
        }
        // When the workspace's test builds unify a rustls feature into reqwest, a client needs a
        // process-wide crypto provider: ring, as everywhere here (a no-op if already installed).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Error::Config(vec![format!("cannot build the HTTP client: {e}")]))?;
        Ok(Prometheus {
            http,
            query_url: format!("{base}/api/v1/query"),
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            metrics,
        })
    }

    /// Runs an instant query within `timeout` (slot wait included), counting the outcome
    /// under `metric`.
    pub async fn query(
        &self,
        metric: &str,
        promql: &str,
        timeout: Duration,
    ) -> Result<QueryResult> {
        let started = Instant::now();
        let result =
            match tokio::time::timeout(timeout, self.query_unbounded(promql, timeout)).await {
                Ok(r) => r,
                Err(_) => Err(Error::Timeout(timeout)),
            };
        let outcome = match &result {
            Ok(_) => "success",
            Err(Error::Timeout(_)) => "timeout",
            Err(Error::PrometheusGarbage(_)) => "bad_response",
            Err(_) => "error",
        };
        self.metrics
            .prometheus_query(metric, outcome, started.elapsed());
        if let Err(e) = &result {
            tracing::warn!(metric, promql, error = %e, "Prometheus query failed");
        }
        result
    }

    async fn query_unbounded(&self, promql: &str, timeout: Duration) -> Result<QueryResult> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Error::Prometheus("client is shutting down".to_owned()))?;
        let prom_timeout = format!("{}ms", timeout.as_millis().max(1));
        let response = self
            .http
            .get(&self.query_url)
            .query(&[("query", promql), ("timeout", prom_timeout.as_str())])
            .send()
            .await
            .map_err(|e| {
                Error::Prometheus(format!(
                    "{} unreachable: {}",
                    self.query_url,
                    error_chain(&e)
                ))
            })?;
        let status = response.status();
        let raw = read_limited(response).await?;
        parse_response(status, raw)
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Bytes> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| Error::Prometheus(format!("reading the answer: {}", error_chain(&e))))?
    {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(Error::PrometheusGarbage(format!(
                "answer larger than {MAX_BODY_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[derive(Deserialize)]
struct Envelope {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct VectorSample {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

/// Interprets a `/api/v1/query` answer (pure, so garbage handling is unit-tested).
pub fn parse_response(status: reqwest::StatusCode, raw: Bytes) -> Result<QueryResult> {
    let snippet = || {
        let s = String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned();
        if s.is_empty() {
            "(empty body)".to_owned()
        } else {
            s
        }
    };
    let envelope: Envelope = match serde_json::from_slice(&raw) {
        Ok(e) => e,
        Err(e) if status.is_success() => {
            return Err(Error::PrometheusGarbage(format!(
                "{e}; body starts with {:?}",
                snippet()
            )));
        }
        Err(_) => return Err(Error::Prometheus(format!("HTTP {status}: {}", snippet()))),
    };
    if envelope.status != "success" {
        return Err(Error::Prometheus(format!(
            "HTTP {status}, {}: {}",
            envelope.error_type.as_deref().unwrap_or("error"),
            envelope.error.as_deref().unwrap_or("(no message)")
        )));
    }
    let data = envelope
        .data
        .ok_or_else(|| Error::PrometheusGarbage("status success without data".to_owned()))?;
    let evaluated_at = now_unix();
    let samples = match data.result_type.as_str() {
        "vector" => {
            let items: Vec<VectorSample> = serde_json::from_value(data.result)
                .map_err(|e| Error::PrometheusGarbage(format!("vector result: {e}")))?;
            items
                .into_iter()
                .map(|s| {
                    let mut labels = s.metric;
                    labels.remove("__name__");
                    Sample {
                        labels,
                        timestamp: s.value.0,
                        value: s.value.1,
                    }
                })
                .collect()
        }
        "scalar" => {
            let (ts, value): (f64, String) = serde_json::from_value(data.result)
                .map_err(|e| Error::PrometheusGarbage(format!("scalar result: {e}")))?;
            vec![Sample {
                labels: BTreeMap::new(),
                timestamp: ts,
                value,
            }]
        }
        other => {
            return Err(Error::PrometheusGarbage(format!(
                "result type {other:?}; an external metric needs a vector or a scalar"
            )));
        }
    };
    for s in &samples {
        // Validate now so a garbage value is reported as a bad answer, not later as a NaN.
        if let Err(Error::BadSample(v)) = Decimal::parse_sample(&s.value) {
            return Err(Error::PrometheusGarbage(format!(
                "sample value {v:?} is not a number"
            )));
        }
        if !s.timestamp.is_finite() {
            return Err(Error::PrometheusGarbage(format!(
                "sample timestamp {} is not finite",
                s.timestamp
            )));
        }
    }
    Ok(QueryResult {
        result_type: data.result_type,
        samples,
        raw,
        evaluated_at,
    })
}

pub(crate) fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    fn parse(status: u16, body: &str) -> Result<QueryResult> {
        parse_response(
            StatusCode::from_u16(status).unwrap(),
            Bytes::from(body.to_owned()),
        )
    }

    #[test]
    fn vector_answers_become_samples_without_the_metric_name() {
        let r = parse(
            200,
            r#"{"status":"success","data":{"resultType":"vector","result":[
                {"metric":{"__name__":"x","policy":"default"},"value":[1700000000.5,"0.8"]},
                {"metric":{},"value":[1700000000.5,"NaN"]}]}}"#,
        )
        .unwrap();
        assert_eq!(r.samples.len(), 2);
        assert_eq!(
            r.samples[0].labels.get("policy").map(String::as_str),
            Some("default")
        );
        assert!(!r.samples[0].labels.contains_key("__name__"));
        assert_eq!(r.samples[0].value, "0.8");
        assert_eq!(r.samples[1].value, "NaN");
    }

    #[test]
    fn scalar_answers_are_one_unlabelled_sample() {
        let r = parse(
            200,
            r#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"2"]}}"#,
        )
        .unwrap();
        assert_eq!(
            r.samples,
            vec![Sample {
                labels: BTreeMap::new(),
                timestamp: 1_700_000_000.0,
                value: "2".into()
            }]
        );
    }

    #[test]
    fn prometheus_api_errors_keep_prometheus_message() {
        let e = parse(
            400,
            r#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&e, Error::Prometheus(m) if m.contains("bad_data") && m.contains("parse error at char 5")),
            "{e}"
        );
        let e = parse(
            503,
            r#"{"status":"error","errorType":"unavailable","error":"not ready"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("not ready"));
    }

    #[test]
    fn garbage_answers_are_reported_as_such() {
        for body in [
            "",
            "<html>proxy error</html>",
            r#"{"status":"success"}"#,
            r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#,
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"abc"]}]}}"#,
            r#"{"status":"success","data":{"resultType":"vector","result":{"x":1}}}"#,
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1]}]}}"#,
        ] {
            let e = parse(200, body).unwrap_err();
            assert!(matches!(e, Error::PrometheusGarbage(_)), "{body}: {e:?}");
        }
        assert!(
            matches!(parse(502, "Bad Gateway").unwrap_err(), Error::Prometheus(m) if m.contains("502"))
        );
    }

    #[tokio::test]
    async fn an_unreachable_prometheus_is_a_prompt_error_not_a_hang() {
        // A port that was just free: connection refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = Prometheus::new(&format!("http://127.0.0.1:{port}"), 4, Metrics::shared()).unwrap();
        let started = std::time::Instant::now();
        let e = p
            .query("m", "up", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::Prometheus(ref m) if m.contains("unreachable")),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_silent_prometheus_times_out_within_the_bound() {
        // Accepts connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let metrics = Metrics::shared();
        let p = Prometheus::new(&format!("http://{addr}"), 4, metrics.clone()).unwrap();
        let started = std::time::Instant::now();
        let e = p
            .query("m", "up", Duration::from_millis(300))
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(matches!(e, Error::Timeout(_)), "{e}");
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(1500),
            "{took:?}"
        );
        assert!(metrics.encode().contains("outcome=\"timeout\"} 1"));
        hold.abort();
    }

    #[test]
    fn urls_without_a_scheme_are_refused() {
        assert!(Prometheus::new("prometheus:9090", 1, Metrics::shared()).is_err());
    }
}
