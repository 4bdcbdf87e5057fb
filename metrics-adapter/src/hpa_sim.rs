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
/// real time since the first sync times `time_scale` (at least 1: values below 1 and
/// non-finite ones count as 1), so stabilization windows and policy periods shrink with it: at
/// 30, the 300 s scale-down window passes in 10 s.
///
/// Each sync is stamped with the time it was due (the interval's tick), rounded to the
/// millisecond, not with when the runtime got to it. Syncs are then exactly one period apart,
/// or more when one was late (the next is due a full period after the late one, as the
/// controller requeues an HPA a full period after processing it), never less: a scale event
/// one period old has always left a policy period of the same length, as in a cluster (so
/// deploy/'s HPA goes 2 -> 6 -> 12 in two syncs). Stamping with the measured time would let
/// a millisecond of scheduling jitter decide that boundary.
///
/// Real time is tokio's clock, so a test with paused time runs a long simulation instantly.
/// `stop` also cancels a sync in flight (its list calls are dropped; the simulator keeps the
/// state of the previous sync).
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
    let mut ticker = tokio::time::interval(sim.sync_period().div_f64(scale));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut start = None;
    let mut records = Vec::new();
    tokio::pin!(stop);
    loop {
        let due = tokio::select! {
            biased;
            () = &mut stop => break,
            due = ticker.tick() => due,
        };
        let start = *start.get_or_insert(due);
        let now_s = (due.duration_since(start).as_secs_f64() * scale * 1000.0).round() / 1000.0;
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

/// A plain-HTTP client for [`HpaSimulator::sync`] and [`run`]: no proxy, bounded connect and
/// request time (`timeout`), and ring installed as rustls' provider in case a workspace build
/// unified a TLS feature into reqwest.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(timeout.min(Duration::from_secs(2)))
        .timeout(timeout)
        .build()
        .map_err(|e| Error::Hpa(format!("cannot build the HTTP client: {e}")))
}

/// List calls over HTTPS, for an adapter serving TLS: the server certificate must chain to the
/// CA in a PEM file (e.g. what `serve --tls-self-signed-ca-out` wrote). Uses kube's client
/// (rustls on ring), which the adapter already carries for delegated auth, so plain-HTTP
/// reqwest stays free of TLS features. No client credentials are sent: use it against
/// `--authentication none`.
#[derive(Clone)]
pub struct HttpsLister {
    client: kube::Client,
}

impl fmt::Debug for HttpsLister {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpsLister").finish_non_exhaustive()
    }
}

impl HttpsLister {
    pub fn new(base_url: &str, ca_file: &std::path::Path, timeout: Duration) -> Result<Self> {
        let uri: http::Uri = base_url
            .trim_end_matches('/')
            .parse()
            .map_err(|e| Error::Hpa(format!("adapter URL {base_url:?}: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(Error::Hpa(format!(
                "adapter URL {base_url:?}: a CA file is for https:// URLs"
            )));
        }
        if !ca_file.is_file() {
            return Err(Error::Hpa(format!(
                "CA file {} does not exist",
                ca_file.display()
            )));
        }
        let mut config = kube::Config::new(uri);
        config.root_cert_file = Some(ca_file.to_path_buf());
        config.connect_timeout = Some(timeout.min(Duration::from_secs(2)));
        config.read_timeout = Some(timeout);
        config.reset_reader_on_write = true;
        // The controller's metrics client does not retry a list call within a sync.
        config.default_retry = false;
        let client = kube::Client::try_from(config)
            .map_err(|e| Error::Hpa(format!("cannot build the HTTPS client: {e}")))?;
        Ok(HttpsLister { client })
    }

    /// One list call: `path` as from [`list_path`].
    pub async fn get(&self, path: String) -> std::result::Result<(u16, Vec<u8>), String> {
        let request = http::Request::get(&path)
            .header(http::header::ACCEPT, ACCEPT)
            .body(Vec::new())
            .map_err(|e| format!("GET {path}: {e}"))?;
        match self.client.request_text(request).await {
            Ok(text) => Ok((200, text.into_bytes())),
            Err(kube::Error::Api(status)) => Ok((
                status.code,
                serde_json::json!({"kind": "Status", "message": status.message, "code": status.code})
                    .to_string()
                    .into_bytes(),
            )),
            Err(e) => Err(format!("GET {path}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn read_repo(rel: &str) -> String {
        let path = format!("{}/../{rel}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    }

    /// The default HPA: deploy/base/limiter/hpa.yaml, request rate alone.
    fn deploy_hpa() -> String {
        read_repo("deploy/base/limiter/hpa.yaml")
    }

    /// The opt-in component's patch, which adds the depletion metric to the default HPA.
    fn depletion_patch() -> String {
        read_repo("deploy/components/scale-on-depletion/hpa.yaml")
    }

    /// The default HPA with deploy/components/scale-on-depletion applied: both metrics,
    /// requests first.
    fn with_depletion(initial_replicas: i32) -> HpaSimulator {
        let overrides = Overrides {
            patches: vec![depletion_patch()],
            ..Overrides::default()
        };
        HpaSimulator::from_manifest_with(&deploy_hpa(), &overrides, initial_replicas).unwrap()
    }

    fn units(v: f64) -> std::result::Result<i64, String> {
        Ok((v * 1000.0).round() as i64)
    }

    fn failed() -> std::result::Result<i64, String> {
        Err("no metrics returned from external metrics API".to_owned())
    }

    #[test]
    fn list_calls_are_the_controllers_paths_with_the_selector_escaped_as_go_does() {
        // The default HPA lists the request metric alone.
        let sim = HpaSimulator::from_manifest(&deploy_hpa(), 2).unwrap();
        assert_eq!(sim.namespace(), "openclaw");
        assert_eq!(
            sim.list_paths(),
            vec![
                "/apis/external.metrics.k8s.io/v1beta1/namespaces/openclaw/openclaw_requests_per_second?labelSelector=decision+in+%28allowed%2Crejected%29",
            ]
        );
        // The component adds depletion after it, with the `policy` Exists selector.
        assert_eq!(
            with_depletion(2).list_paths(),
            vec![
                "/apis/external.metrics.k8s.io/v1beta1/namespaces/openclaw/openclaw_requests_per_second?labelSelector=decision+in+%28allowed%2Crejected%29",
                "/apis/external.metrics.k8s.io/v1beta1/namespaces/openclaw/openclaw_token_depletion_rate?labelSelector=policy",
            ]
        );
        assert_eq!(
            list_path("edge", "m", "!canary,app=x,tier notin (a,b)"),
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/edge/m?labelSelector=%21canary%2Capp%3Dx%2Ctier+notin+%28a%2Cb%29"
        );
        assert_eq!(
            list_path("edge", "m", ""),
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/edge/m"
        );
        assert_eq!(go_query_escape("a-b_c.d~e/f*g"), "a-b_c.d~e%2Ff%2Ag");
    }

    #[test]
    fn the_initial_count_is_clamped_to_the_manifest_range_and_overrides_apply() {
        let yaml = deploy_hpa();
        assert_eq!(
            HpaSimulator::from_manifest(&yaml, 1)
                .unwrap()
                .current_replicas(),
            2
        );
        assert_eq!(
            HpaSimulator::from_manifest(&yaml, 40)
                .unwrap()
                .current_replicas(),
            15
        );
        assert!(HpaSimulator::from_manifest(&yaml, 0).is_err());
        // The production overlay's patch raises the floor to 3.
        let patch = read_repo("deploy/overlays/production/hpa.yaml");
        let overrides = Overrides {
            patches: vec![patch.clone()],
            ..Overrides::default()
        };
        let sim = HpaSimulator::from_manifest_with(&yaml, &overrides, 2).unwrap();
        assert_eq!(
            (
                sim.current_replicas(),
                sim.spec().min_replicas,
                sim.spec().max_replicas,
                sim.metrics().len()
            ),
            (3, 3, 15, 1)
        );
        // Production with the depletion component (deploy/tests/targets/scale-on-depletion):
        // the floor stays 3 and the component's metric list replaces the base's.
        let overrides = Overrides {
            patches: vec![patch, depletion_patch()],
            ..Overrides::default()
        };
        let sim = HpaSimulator::from_manifest_with(&yaml, &overrides, 2).unwrap();
        assert_eq!((sim.current_replicas(), sim.spec().min_replicas), (3, 3));
        assert_eq!(
            sim.metrics()
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            vec![
                "openclaw_requests_per_second",
                "openclaw_token_depletion_rate"
            ]
        );
        let overrides = Overrides {
            max_replicas: Some(4),
            namespace: Some("edge".into()),
            ..Overrides::default()
        };
        let sim = HpaSimulator::from_manifest_with(&yaml, &overrides, 9).unwrap();
        assert_eq!((sim.current_replicas(), sim.namespace()), (4, "edge"));
        let overrides = Overrides {
            max_replicas: Some(1),
            ..Overrides::default()
        };
        assert!(HpaSimulator::from_manifest_with(&yaml, &overrides, 2).is_err());
    }

    /// deploy/'s HPA with the depletion component through a spike and its end, every 15 s,
    /// with hand-computed controller results: the policies, the max over two metrics and a
    /// failing metric. Requests: AverageValue 800; depletion: Value 900m; up: max(+100%, +4)
    /// per 15 s; down: 300 s window, then 20% per 60 s; 2..15 replicas.
    #[test]
    fn deploy_hpa_with_depletion_scales_by_its_policies_and_holds_on_a_failing_metric() {
        let mut sim = with_depletion(2);
        let mut records = Vec::new();
        for step in 0..=48 {
            let t = f64::from(step) * 15.0;
            let (rps, depletion) = match step {
                // Spike: 16000 rps asks for ceil(16000 / 800) = 20 replicas.
                0 | 2 => (units(16_000.0), units(0.5)),
                // The depletion metric fails, but the request metric wants more: scale up.
                1 => (units(16_000.0), failed()),
                // 12600 over 15 replicas: ratio 12600 / (800 x 15) = 1.05, within tolerance.
                3 => (units(12_600.0), units(0.5)),
                // Load gone, one metric failing: wants 2, so the controller holds (no record).
                8 => (units(1_600.0), failed()),
                // Both failing.
                26 => (failed(), failed()),
                // Load gone: 1600 rps asks for 2; depletion 0.1 / 0.9 x 15 -> ceil(1.67) = 2.
                _ => (units(1_600.0), units(0.1)),
            };
            records.push(sim.decide_from_readings(t, &[rps, depletion]));
        }
        let steps: Vec<(f64, i32, i32)> = records
            .iter()
            .filter(|r| r.desired != r.current)
            .map(|r| (r.at_s, r.current, r.desired))
            .collect();
        assert_eq!(
            steps,
            vec![
                // +max(100%, 4): 2 -> 6 -> 12, then maxReplicas.
                (0.0, 2, 6),
                (15.0, 6, 12),
                (30.0, 12, 15),
                // The last 15 was recommended at 45 s: held until 345 s, then 20% per minute
                // (truncated): 12, 9.6 -> 9, 7.2 -> 7, 5.6 -> 5, 4, 3.2 -> 3, 2.4 -> 2.
                (345.0, 15, 12),
                (405.0, 12, 9),
                (465.0, 9, 7),
                (525.0, 7, 5),
                (585.0, 5, 4),
                (645.0, 4, 3),
                (705.0, 3, 2),
            ]
        );
        let at = |t: f64| records.iter().find(|r| r.at_s == t).unwrap();
        let r = at(0.0);
        assert_eq!(
            (r.metrics[0].proposal, r.metrics[1].proposal),
            (Some(20), Some(2)) // 0.5 / 0.9 x 2 ready = 1.11 -> 2
        );
        assert_eq!((r.proposed, r.reason.as_str()), (20, "ScaleUpLimit"));
        let r = at(15.0);
        assert_eq!(r.reason, "ScaleUpLimit");
        assert!(r.metrics[1].value.is_err() && r.metrics[1].proposal.is_none());
        assert_eq!(at(30.0).reason, "TooManyReplicas");
        let r = at(45.0);
        assert!(r.metrics[0].within_tolerance);
        assert_eq!(r.metrics[0].proposal, Some(15));
        assert_eq!(r.metrics[1].proposal, Some(9)); // 0.5 / 0.9 x 15 = 8.33 -> 9
        assert_eq!((r.desired, r.reason.as_str()), (15, "DesiredWithinRange"));
        for t in [60.0, 330.0] {
            let r = at(t);
            assert_eq!(
                (r.proposed, r.stabilized, r.desired, r.reason.as_str()),
                (2, 15, 15, "ScaleDownStabilized"),
                "at {t}"
            );
        }
        let r = at(120.0);
        assert_eq!(r.desired, 15);
        assert!(
            r.reason.starts_with(
                "FailedGetExternalMetric: openclaw_token_depletion_rate: no metrics returned"
            ) && r.reason.contains("scale-down is held"),
            "{}",
            r.reason
        );
        let r = at(360.0);
        assert_eq!(
            (r.stabilized, r.desired, r.reason.as_str()),
            (2, 12, "ScaleDownLimit")
        );
        let r = at(390.0);
        assert_eq!(r.desired, 12);
        assert!(
            r.reason.starts_with("FailedGetExternalMetric"),
            "{}",
            r.reason
        );
        assert_eq!(at(705.0).reason, "DesiredWithinRange");
        assert_eq!(sim.current_replicas(), 2);
    }

    /// Why depletion is not in the default HPA. Clients at their limits keep the buckets their
    /// requests hit empty: depletion 1.0 against Value 0.9 is a ratio of 1.111, outside the
    /// 10% tolerance, whatever the replica count, while the request rate (1600/s, 2 replicas'
    /// worth) asks for fewer. Hand-computed, each sync proposes ceil(current x 10 / 9):
    /// 3 -> ceil(3.33) = 4 -> ceil(4.44) = 5 -> 6 -> 7 -> 8 -> 9 -> ceil(10.0) = 10
    /// -> ceil(11.11) = 12 -> ceil(13.33) = 14 -> ceil(15.56), capped at maxReplicas 15 (each
    /// step is within the +max(100%, 4) policy). Depletion then easing to 0.85 is a ratio of
    /// 0.944, inside the tolerance band, so the count stays at 15. The default HPA, on the
    /// same request rate, stays at its starting 3 (a proposal of 2 held by the 300 s window).
    #[test]
    fn depletion_ratchets_to_max_replicas_while_clients_run_at_their_limits() {
        let mut ratchet = with_depletion(3);
        let mut default = HpaSimulator::from_manifest(&deploy_hpa(), 3).unwrap();
        let mut path = Vec::new();
        let mut default_path = Vec::new();
        for step in 0..20 {
            let t = f64::from(step) * 15.0;
            let depletion = if step < 12 { 1.0 } else { 0.85 };
            let r = ratchet.decide_from_readings(t, &[units(1_600.0), units(depletion)]);
            assert_eq!(r.metrics[0].proposal, Some(2), "at {t}: requests ask for 2");
            path.push(r.desired);
            default_path.push(default.decide_from_readings(t, &[units(1_600.0)]).desired);
        }
        assert_eq!(
            path,
            vec![
                4, 5, 6, 7, 8, 9, 10, 12, 14, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15
            ]
        );
        assert_eq!(default_path, vec![3; 20]);
    }

    #[test]
    fn a_sync_without_a_decision_leaves_the_controllers_memory_as_it_was() {
        let mut sim = with_depletion(10);
        // The first sync seeds the window with the current count even when it fails, as
        // recordInitialRecommendation runs before the metrics are read.
        let r = sim.decide_from_readings(0.0, &[failed(), failed()]);
        assert_eq!(r.desired, 10);
        let seeded = sim.history.clone().unwrap();
        assert_eq!(seeded, History::fresh(0.0, 10));
        sim.decide_from_readings(15.0, &[units(1_600.0), failed()]);
        assert_eq!(sim.history.as_ref(), Some(&seeded));
        // A scale-up with one metric failing is a decision: it is recorded.
        let r = sim.decide_from_readings(30.0, &[units(16_000.0), failed()]);
        assert_eq!(r.desired, 15);
        let h = sim.history.as_ref().unwrap();
        assert_eq!(h.recommendations.len(), 2);
        assert_eq!(h.scale_up_events.len(), 1);
    }

    #[test]
    fn list_answers_are_summed_and_failures_carry_the_status_message() {
        let body = br#"{"kind":"ExternalMetricValueList","apiVersion":"external.metrics.k8s.io/v1beta1","metadata":{},
            "items":[{"metricName":"m","metricLabels":{},"timestamp":"2026-01-02T03:04:05Z","value":"800m"},
                     {"metricName":"m","metricLabels":{"a":"b"},"timestamp":"2026-01-02T03:04:05Z","window":60,"value":"2k"}]}"#;
        assert_eq!(read_list_answer(200, body), Ok(2_000_800));
        let empty = br#"{"kind":"ExternalMetricValueList","metadata":{},"items":[]}"#;
        assert_eq!(
            read_list_answer(200, empty),
            Err("no metrics returned from external metrics API".to_owned())
        );
        let status = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"no data for external metric","reason":"NotFound","code":404}"#;
        let e = read_list_answer(404, status).unwrap_err();
        assert!(
            e.contains("no data for external metric") && e.contains("HTTP 404"),
            "{e}"
        );
        assert!(
            read_list_answer(503, b"upstream down")
                .unwrap_err()
                .contains("upstream down")
        );
        assert!(read_list_answer(200, b"not json").is_err());
        assert!(read_list_answer(200, br#"{"items":[{"value":"lots"}]}"#).is_err());
    }

    fn list_body(value: &str) -> Vec<u8> {
        format!(
            r#"{{"kind":"ExternalMetricValueList","apiVersion":"external.metrics.k8s.io/v1beta1","metadata":{{}},"items":[{{"metricName":"m","metricLabels":{{}},"timestamp":"2026-01-02T03:04:05Z","value":"{value}"}}]}}"#
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn sync_asks_each_metric_in_manifest_order_and_decides_from_the_answers() {
        let mut sim = with_depletion(2);
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        let r = sim
            .sync_with(0.0, move |path: String| {
                log.lock().unwrap().push(path.clone());
                let answer = if path.contains("requests") {
                    Ok((200, list_body("4k")))
                } else {
                    Ok((
                        404,
                        br#"{"kind":"Status","message":"no data","code":404}"#.to_vec(),
                    ))
                };
                std::future::ready(answer)
            })
            .await;
        assert_eq!(*asked.lock().unwrap(), sim.list_paths());
        assert_eq!(r.metrics[0].value, Ok(4000.0));
        assert_eq!(r.metrics[0].proposal, Some(5));
        assert!(r.metrics[1].value.as_ref().unwrap_err().contains("no data"));
        // 5 is a scale-up, so the failing metric does not block it.
        assert_eq!((r.current, r.desired, sim.current_replicas()), (2, 5, 5));
        let line = r.to_string();
        assert!(
            line.starts_with("t=0.0s current=2 | openclaw_requests_per_second{decision in (allowed,rejected)} = 4000 vs AverageValue 800: ratio 2.5000 -> 5 | openclaw_token_depletion_rate{policy} failed: "),
            "{line}"
        );
        assert!(
            line.ends_with("| proposed=5 desired=5 (DesiredWithinRange)"),
            "{line}"
        );
        // A transport error is a failed metric too.
        let r = sim
            .sync_with(15.0, |_| {
                std::future::ready(Err("connection refused".to_owned()))
            })
            .await;
        assert_eq!(r.desired, 5);
        assert!(r.reason.contains("connection refused"), "{}", r.reason);
    }

    /// The compressed clock: tokio's paused time stands in for real time, so this runs in
    /// microseconds while `run` sees 12 s pass.
    #[tokio::test(start_paused = true)]
    async fn at_time_scale_30_the_300_s_scale_down_window_passes_in_10_s_of_real_time() {
        let mut sim = HpaSimulator::from_manifest(&deploy_hpa(), 2).unwrap();
        let start = tokio::time::Instant::now();
        let mut seen = Vec::new();
        let records = run_with(
            &mut sim,
            30.0,
            |path: String| {
                // The default HPA asks for the request rate alone: a spike at the first sync
                // only, then 1600 rps (2 replicas' worth).
                let answer = if !path.contains("/openclaw_requests_per_second?") {
                    Err(format!("the default HPA asked for {path}"))
                } else if start.elapsed() < Duration::from_millis(250) {
                    Ok((200, list_body("16k")))
                } else {
                    Ok((200, list_body("1600")))
                };
                std::future::ready(answer)
            },
            |r: &SyncRecord| seen.push((start.elapsed(), r.at_s, r.current, r.desired)),
            tokio::time::sleep(Duration::from_secs(12)),
        )
        .await;
        assert_eq!(records.len(), seen.len());
        assert!(
            (23..=25).contains(&records.len()),
            "{} syncs",
            records.len()
        );
        // One sync every 0.5 s of real time, 15 s of simulated time apart.
        for (i, (real, sim_s, _, _)) in seen.iter().enumerate() {
            let want = 0.5 * i as f64;
            assert!(
                (real.as_secs_f64() - want).abs() < 0.01,
                "sync {i} at {real:?}"
            );
            assert!((sim_s - 30.0 * want).abs() < 0.3, "sync {i} at {sim_s} s");
        }
        assert_eq!((seen[0].2, seen[0].3), (2, 6));
        let first_down = seen.iter().position(|s| s.3 < s.2).unwrap();
        let (real, sim_s, current, desired) = seen[first_down];
        // 300 simulated seconds after the spike's recommendation, 20% of 6 -> 4.8 -> 4.
        assert!((sim_s - 300.0).abs() < 0.3, "first scale-down at {sim_s} s");
        assert!(
            (real.as_secs_f64() - 10.0).abs() < 0.01,
            "first scale-down after {real:?} of real time"
        );
        assert_eq!((current, desired), (6, 4));
        assert!(
            seen[..first_down]
                .iter()
                .skip(1)
                .all(|s| s.2 == 6 && s.3 == 6)
        );
    }

    #[test]
    fn run_and_sync_futures_can_be_spawned_on_a_multi_threaded_runtime() {
        fn is_send<T: Send>(_: &T) {}
        let client = http_client(Duration::from_secs(1)).unwrap();
        let mut sim = HpaSimulator::from_manifest(&deploy_hpa(), 2).unwrap();
        is_send(&sim.sync(&client, "http://127.0.0.1:9", 0.0));
        is_send(&run(
            &mut sim,
            &client,
            "http://127.0.0.1:9",
            1.0,
            |_| {},
            async {},
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn stop_ends_the_run_even_while_a_list_call_hangs() {
        let mut sim = HpaSimulator::from_manifest(&deploy_hpa(), 3).unwrap();
        let records = run_with(
            &mut sim,
            1.0,
            |_| std::future::pending(),
            |_| {},
            tokio::time::sleep(Duration::from_secs(60)),
        )
        .await;
        assert!(records.is_empty());
        assert_eq!(sim.current_replicas(), 3);
    }
}
