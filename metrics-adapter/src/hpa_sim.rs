//! An HPA simulator: the HorizontalPodAutoscaler controller's loop for one HPA manifest, run
//! against a real external metrics API (this adapter, or any other) instead of a cluster.
//!
//! Every sync it does what the controller does for External metrics: one list call per metric,
//! `GET {base}/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric}?labelSelector=..`,
//! with the selector printed and escaped as client-go does ([`list_path`]); the sum of the
//! items' milli-values; then the arithmetic of [`crate::hpa`] (tolerance, `Value` vs
//! `AverageValue`, the max over metrics, a failing metric freezing scale-down, stabilization
//! windows, `behavior` policies, min/max). The Deployment is assumed to follow at once: the
//! count decided at one sync is the current (and ready) count at the next.
//!
//! Time is simulated seconds passed in by the caller ([`HpaSimulator::sync`]) or derived from
//! a compressed clock ([`run`]), so a 300 s stabilization window can take 10 s of real time
//! in a test. The fetch is separate from the arithmetic ([`HpaSimulator::sync_with`],
//! [`HpaSimulator::decide_from_readings`]), so the arithmetic is tested without a network.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use serde::Deserialize;

use crate::hpa::{self, History, Spec};
use crate::hpa_manifest::{ExternalMetric, HpaManifest, validate_range};
use crate::quantity::{Milli, parse_quantity_milli};
use crate::{Error, Result};

/// The API path every list call starts with.
pub const EXTERNAL_METRICS_PATH: &str = "/apis/external.metrics.k8s.io/v1beta1";

/// What the HPA controller's metrics client sends as `Accept` (contract item 9).
pub const ACCEPT: &str = "application/vnd.kubernetes.protobuf, */*";

/// Changes to the manifest before simulating, e.g. what a kustomize overlay does.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Patches applied in order (see [`HpaManifest::parse_with_patches`]).
    pub patches: Vec<String>,
    pub min_replicas: Option<i32>,
    pub max_replicas: Option<i32>,
    /// The namespace of the list calls, when the manifest has none or it should be replaced.
    pub namespace: Option<String>,
}

/// One HPA as the controller holds it: the manifest, the scale's current count, and the
/// recommendations and scale events the controller remembers between syncs.
#[derive(Debug, Clone)]
pub struct HpaSimulator {
    name: String,
    namespace: String,
    spec: Spec,
    metrics: Vec<ExternalMetric>,
    current: i32,
    /// `None` until the first sync, which seeds it as `recordInitialRecommendation` does.
    history: Option<History>,
}

/// What one metric's list call gave and what the controller made of it.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricReading {
    pub name: String,
    /// The `labelSelector` sent (`""`: none sent).
    pub selector: String,
    /// The target as written, e.g. `AverageValue 800`.
    pub target: String,
    /// The usage read (sum of the items, in units), or why there is none.
    pub value: std::result::Result<f64, String>,
    /// usage / target (AverageValue: usage / (target x current)), when the metric was read.
    pub usage_ratio: Option<f64>,
    /// The ratio was inside the tolerance band, so the proposal is the current count.
    pub within_tolerance: bool,
    /// The replica count this metric asks for, when it was read.
    pub proposal: Option<i32>,
}

/// One controller sync.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncRecord {
    /// Simulated seconds since the start.
    pub at_s: f64,
    /// The scale's replicas when the sync began.
    pub current: i32,
    pub metrics: Vec<MetricReading>,
    /// The largest proposal over the metrics (the current count when no decision was made).
    pub proposed: i32,
    /// After the stabilization windows.
    pub stabilized: i32,
    /// The replica count set (the current count when no decision was made).
    pub desired: i32,
    /// The controller's condition reason for the outcome, e.g. `ScaleUpLimit`,
    /// `ScaleDownStabilized`, `DesiredWithinRange`, or `FailedGetExternalMetric: <why>` when a
    /// failing metric kept the controller from deciding.
    pub reason: String,
}

impl HpaSimulator {
    /// From an `autoscaling/v2` HorizontalPodAutoscaler manifest, starting at
    /// `initial_replicas`, clamped to minReplicas..maxReplicas as the controller's first sync
    /// would (`TooFewReplicas` / `TooManyReplicas`).
    pub fn from_manifest(yaml: &str, initial_replicas: i32) -> Result<Self> {
        HpaSimulator::from_manifest_with(yaml, &Overrides::default(), initial_replicas)
    }

    /// [`HpaSimulator::from_manifest`] with patches and min/max/namespace overrides applied.
    ///
    /// A scale target at 0 replicas is refused: the controller does not autoscale it
    /// (`ScalingDisabled`), so there would be nothing to simulate.
    pub fn from_manifest_with(
        yaml: &str,
        overrides: &Overrides,
        initial_replicas: i32,
    ) -> Result<Self> {
        let patches: Vec<&str> = overrides.patches.iter().map(String::as_str).collect();
        let manifest = HpaManifest::parse_with_patches(yaml, &patches)?;
        let mut spec = manifest.spec;
        if let Some(min) = overrides.min_replicas {
            spec.min_replicas = min;
        }
        if let Some(max) = overrides.max_replicas {
            spec.max_replicas = max;
        }
        validate_range(&spec)?;
        let namespace = overrides
            .namespace
            .clone()
            .or(manifest.namespace)
            .unwrap_or_else(|| "default".to_owned());
        crate::selector::validate_namespace(&namespace)?;
        if initial_replicas <= 0 {
            return Err(Error::Hpa(format!(
                "initial replicas {initial_replicas}: the controller does not autoscale a target \
                 scaled to zero (ScalingDisabled); start at 1 or more"
            )));
        }
        Ok(HpaSimulator {
            name: manifest.name,
            namespace,
            current: initial_replicas.clamp(spec.min_replicas.max(1), spec.max_replicas),
            spec,
            metrics: manifest.metrics,
            history: None,
        })
    }

    /// The HPA's `metadata.name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace of the list calls.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The controller's sync period, in simulated time.
    pub fn sync_period(&self) -> Duration {
        Duration::from_secs(hpa::SYNC_PERIOD_SECONDS.unsigned_abs())
    }

    /// The scale's replicas now (what the last sync decided).
    pub fn current_replicas(&self) -> i32 {
        self.current
    }

    /// minReplicas, maxReplicas and behavior, after overrides.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// The External metrics, in manifest order.
    pub fn metrics(&self) -> &[ExternalMetric] {
        &self.metrics
    }

    /// The path and query of each metric's list call, in manifest order.
    pub fn list_paths(&self) -> Vec<String> {
        self.metrics
            .iter()
            .map(|m| list_path(&self.namespace, &m.name, &m.selector))
            .collect()
    }

    /// One controller sync at simulated time `now_s`, reading the metrics from the external
    /// metrics API at `adapter_base_url` (plain HTTP or whatever `client` is built for).
    pub async fn sync(
        &mut self,
        client: &reqwest::Client,
        adapter_base_url: &str,
        now_s: f64,
    ) -> SyncRecord {
        let base = adapter_base_url.trim_end_matches('/');
        self.sync_with(now_s, |path| reqwest_get(client, format!("{base}{path}")))
            .await
    }

    /// One sync with `get` doing each list call: it receives the path and query (see
    /// [`list_path`]) and answers the HTTP status and body, or a transport error.
    pub async fn sync_with<F, Fut>(&mut self, now_s: f64, mut get: F) -> SyncRecord
    where
        F: FnMut(String) -> Fut,
        Fut: Future<Output = std::result::Result<(u16, Vec<u8>), String>>,
    {
        let mut usages = Vec::with_capacity(self.metrics.len());
        // The controller reads no metric while the count is outside min..max or at zero.
        if self.current > 0
            && (self.spec.min_replicas..=self.spec.max_replicas).contains(&self.current)
        {
            for path in self.list_paths() {
                let usage = match get(path).await {
                    Ok((status, body)) => read_list_answer(status, &body),
                    Err(e) => Err(format!(
                        "unable to fetch metrics from external metrics API: {e}"
                    )),
                };
                usages.push(usage);
            }
        }
        self.decide_from_readings(now_s, &usages)
    }

    /// The arithmetic of one sync: `usages` holds, per External metric in manifest order, the
    /// sum of the items' milli-values or the error the list call ended in. Updates the current
    /// count and the controller's memory.
    pub fn decide_from_readings(
        &mut self,
        now_s: f64,
        usages: &[std::result::Result<i64, String>],
    ) -> SyncRecord {
        let current = self.current;
        let history = self
            .history
            .get_or_insert_with(|| History::fresh(now_s, current));
        let out_of_range =
            current == 0 || current < self.spec.min_replicas || current > self.spec.max_replicas;
        let tol = self.spec.tolerances();
        let mut readings = Vec::with_capacity(self.metrics.len());
        let mut proposals = Vec::with_capacity(self.metrics.len());
        for (i, m) in self.metrics.iter().enumerate() {
            let usage = if out_of_range {
                Err("not read: the replica count is outside minReplicas..maxReplicas".to_owned())
            } else {
                usages
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| Err("no reading given".to_owned()))
            };
            let mut reading = MetricReading {
                name: m.name.clone(),
                selector: m.selector.clone(),
                target: m.target_text.clone(),
                value: usage.clone().map(|u| Milli(u).to_f64()),
                usage_ratio: None,
                within_tolerance: false,
                proposal: None,
            };
            match usage {
                Ok(u) => {
                    // The Deployment follows at once: status replicas and ready pods are the
                    // current count.
                    let p = hpa::external_proposal(u, m.target, current, current, tol);
                    reading.usage_ratio = Some(p.usage_ratio);
                    reading.within_tolerance = p.within_tolerance;
                    reading.proposal = Some(p.replicas);
                    proposals.push(Ok(p.replicas));
                }
                Err(e) => proposals.push(Err(format!("{}: {e}", m.name))),
            }
            readings.push(reading);
        }
        let proposed = if out_of_range {
            Ok(current)
        } else {
            hpa::combine(&proposals, current)
        };
        let record = match proposed {
            Ok(proposed) => {
                let d = hpa::decide(&self.spec, current, proposed, now_s, history);
                SyncRecord {
                    at_s: now_s,
                    current,
                    metrics: readings,
                    proposed,
                    stabilized: d.stabilized,
                    desired: d.replicas,
                    reason: d.reason,
                }
            }
            // The controller returns before normalizing: nothing is recorded, nothing moves.
            Err(e) => SyncRecord {
                at_s: now_s,
                current,
                metrics: readings,
                proposed: current,
                stabilized: current,
                desired: current,
                reason: format!("FailedGetExternalMetric: {e}"),
            },
        };
        self.current = record.desired;
        record
    }
}

/// `GET` path and query of one list call, as client-go builds it:
/// `/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric}`, plus
/// `?labelSelector=` with the selector escaped by Go's `url.QueryEscape` (space `+`, `(`
/// `%28`, `,` `%2C`, `=` `%3D`, `!` `%21`) when the selector is not empty.
pub fn list_path(namespace: &str, metric: &str, selector: &str) -> String {
    let mut path = format!("{EXTERNAL_METRICS_PATH}/namespaces/{namespace}/{metric}");
    if !selector.is_empty() {
        path.push_str("?labelSelector=");
        path.push_str(&go_query_escape(selector));
    }
    path
}

/// Go's `url.QueryEscape`: everything but `[A-Za-z0-9-_.~]` percent-encoded (upper-case hex),
/// space as `+`.
pub fn go_query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b));
            }
            b' ' => out.push('+'),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 15)]));
            }
        }
    }
    out
}

#[derive(Deserialize)]
struct ListBody {
    #[serde(default)]
    items: Vec<ListItem>,
}

#[derive(Deserialize)]
struct ListItem {
    value: String,
}

#[derive(Deserialize)]
struct StatusBody {
    #[serde(default)]
    message: String,
}

/// What the controller makes of a list call's answer (contract item 10): the sum of the
/// items' `MilliValue()`; no items is an error; a non-2xx answer is an error carrying the
/// `Status` message.
pub fn read_list_answer(status: u16, body: &[u8]) -> std::result::Result<i64, String> {
    if !(200..300).contains(&status) {
        let message = serde_json::from_slice::<StatusBody>(body)
            .ok()
            .map(|s| s.message)
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
        return Err(format!(
            "unable to fetch metrics from external metrics API: {message} (HTTP {status})"
        ));
    }
    let list: ListBody = serde_json::from_slice(body)
        .map_err(|e| format!("unable to decode the ExternalMetricValueList: {e}"))?;
    if list.items.is_empty() {
        return Err("no metrics returned from external metrics API".to_owned());
    }
    let mut sum: i64 = 0;
    for item in &list.items {
        let milli = parse_quantity_milli(&item.value).map_err(|e| e.to_string())?;
        sum = sum.saturating_add(milli.0);
    }
    Ok(sum)
}

async fn reqwest_get(
    client: &reqwest::Client,
    url: String,
) -> std::result::Result<(u16, Vec<u8>), String> {
    let response = client
        .get(&url)
        .header(reqwest::header::ACCEPT, ACCEPT)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("GET {url}: reading the body: {e}"))?;
    Ok((status, body.to_vec()))
}

/// Runs syncs against `adapter_base_url` every `sync_period / time_scale` of real time until
/// `stop` resolves, calling `on_sync` after each; returns every sync. See [`run_with`].
pub async fn run(
    sim: &mut HpaSimulator,
    client: &reqwest::Client,
    adapter_base_url: &str,
    time_scale: f64,
    on_sync: impl FnMut(&SyncRecord) + Send,
    stop: impl Future<Output = ()> + Send,
) -> Vec<SyncRecord> {
    let base = adapter_base_url.trim_end_matches('/');
    run_with(
        sim,
        time_scale,
        |path| reqwest_get(client, format!("{base}{path}")),
        on_sync,
        stop,
    )
    .await
}

/// [`run`] with `get` doing the list calls (as in [`HpaSimulator::sync_with`]).
///
/// The first sync is at once; then one every `sync_period / time_scale` of real time (a sync
/// that takes longer delays the next, as the controller's work queue would). Simulated time is
/// real time since the start times `time_scale` (at least 1: values below 1 and non-finite ones
/// count as 1), so stabilization windows and policy periods shrink with it: at 30, the 300 s
/// scale-down window passes in 10 s. Real time is tokio's clock, so a test with paused time
/// runs a long simulation instantly. `stop` also cancels a sync in flight (its list calls are
/// dropped; the simulator keeps the state of the previous sync).
pub async fn run_with<F, Fut>(
    sim: &mut HpaSimulator,
    time_scale: f64,
    mut get: F,
    mut on_sync: impl FnMut(&SyncRecord) + Send,
    stop: impl Future<Output = ()> + Send,
) -> Vec<SyncRecord>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = std::result::Result<(u16, Vec<u8>), String>>,
{
    let scale = if time_scale.is_finite() && time_scale >= 1.0 {
        time_scale
    } else {
        1.0
    };
    let start = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(sim.sync_period().div_f64(scale));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut records = Vec::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            biased;
            () = &mut stop => break,
            _ = ticker.tick() => {}
        }
        let now_s = start.elapsed().as_secs_f64() * scale;
        let record = tokio::select! {
            biased;
            () = &mut stop => break,
            r = sim.sync_with(now_s, &mut get) => r,
        };
        on_sync(&record);
        records.push(record);
    }
    records
}

impl fmt::Display for MetricReading {
    /// `openclaw_requests_per_second{decision in (allowed,rejected)} = 1600 vs AverageValue 800:
    /// ratio 1.0000 -> 2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)?;
        if !self.selector.is_empty() {
            write!(f, "{{{}}}", self.selector)?;
        }
        match &self.value {
            Ok(v) => {
                write!(f, " = {v} vs {}", self.target)?;
                if let (Some(ratio), Some(p)) = (self.usage_ratio, self.proposal) {
                    let band = if self.within_tolerance {
                        " (within tolerance)"
                    } else {
                        ""
                    };
                    write!(f, ": ratio {ratio:.4}{band} -> {p}")?;
                }
                Ok(())
            }
            Err(e) => write!(f, " failed: {e}"),
        }
    }
}

impl fmt::Display for SyncRecord {
    /// One line: time, current count, each metric, the proposal, the decision and its reason.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t={:.1}s current={}", self.at_s, self.current)?;
        for m in &self.metrics {
            write!(f, " | {m}")?;
        }
        write!(
            f,
            " | proposed={} desired={} ({})",
            self.proposed, self.desired, self.reason
        )
    }
}
