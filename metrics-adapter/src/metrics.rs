//! The adapter's own Prometheus series, served on `/metrics`.
//!
//! Names live here and only here. Labels are bounded: `metric` is a configured rule name (or
//! `unknown`), `code` an HTTP status, `outcome`/`result` small fixed sets; never a selector,
//! a namespace or a query text.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// List calls served, by `metric` and `code`. Counter.
pub const REQUESTS: &str = "openclaw_adapter_requests";
/// Latency of list calls, by `metric`. Histogram (seconds).
pub const REQUEST_DURATION: &str = "openclaw_adapter_request_duration_seconds";
/// Queries sent to Prometheus, by `metric` and `outcome`
/// (`success` | `error` | `timeout` | `bad_response`). Counter.
pub const PROMETHEUS_QUERIES: &str = "openclaw_adapter_prometheus_queries";
/// Latency of Prometheus queries, by `metric`. Histogram (seconds).
pub const PROMETHEUS_QUERY_DURATION: &str = "openclaw_adapter_prometheus_query_duration_seconds";
/// Result-cache lookups, by `metric` and `result` (`hit` | `miss` | `coalesced`). Counter.
pub const CACHE_LOOKUPS: &str = "openclaw_adapter_cache_lookups";
/// Config reload attempts, by `result` (`success` | `failure`). Counter.
pub const CONFIG_RELOADS: &str = "openclaw_adapter_config_reloads";
/// 1 when the last attempt to load the config succeeded, else 0. Gauge.
pub const CONFIG_LAST_RELOAD_SUCCESSFUL: &str = "openclaw_adapter_config_last_reload_successful";
/// Number of configured external metrics. Gauge.
pub const CONFIGURED_METRICS: &str = "openclaw_adapter_configured_metrics";
/// Build metadata, `version` label, value 1. Gauge.
pub const BUILD_INFO: &str = "openclaw_adapter_build_info";

/// Every series of the adapter, registered once at startup.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    request_duration: Family<Labels, Histogram>,
    prometheus_queries: Family<Labels, Counter>,
    prometheus_duration: Family<Labels, Histogram>,
    cache_lookups: Family<Labels, Counter>,
    config_reloads: Family<Labels, Counter>,
    config_ok: Gauge,
    configured_metrics: Gauge,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~8 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let request_duration = Family::<Labels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let prometheus_queries = Family::<Labels, Counter>::default();
        let prometheus_duration = Family::<Labels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let cache_lookups = Family::<Labels, Counter>::default();
        let config_reloads = Family::<Labels, Counter>::default();
        let config_ok = Gauge::default();
        let configured_metrics = Gauge::default();
        let build_info = Family::<Labels, Gauge>::default();
        build_info
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())])
            .set(1);

        registry.register(
            REQUESTS,
            "External metric list calls served, by metric and HTTP code",
            requests.clone(),
        );
        registry.register(
            REQUEST_DURATION,
            "Latency of external metric list calls",
            request_duration.clone(),
        );
        registry.register(
            PROMETHEUS_QUERIES,
            "Queries sent to Prometheus, by metric and outcome",
            prometheus_queries.clone(),
        );
        registry.register(
            PROMETHEUS_QUERY_DURATION,
            "Latency of Prometheus queries",
            prometheus_duration.clone(),
        );
        registry.register(
            CACHE_LOOKUPS,
            "Result cache lookups, by metric and result (hit, miss, coalesced)",
            cache_lookups.clone(),
        );
        registry.register(
            CONFIG_RELOADS,
            "Config reload attempts, by result",
            config_reloads.clone(),
        );
        registry.register(
            CONFIG_LAST_RELOAD_SUCCESSFUL,
            "1 if the last config load succeeded",
            config_ok.clone(),
        );
        registry.register(
            CONFIGURED_METRICS,
            "External metrics currently configured",
            configured_metrics.clone(),
        );
        registry.register(BUILD_INFO, "Build metadata", build_info);
        config_ok.set(1);

        Metrics {
            registry,
            requests,
            request_duration,
            prometheus_queries,
            prometheus_duration,
            cache_lookups,
            config_reloads,
            config_ok,
            configured_metrics,
        }
    }

    pub fn shared() -> Arc<Metrics> {
        Arc::new(Metrics::new())
    }

    pub fn request(&self, metric: &str, code: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&vec![
                ("metric", metric.to_owned()),
                ("code", code.to_string()),
            ])
            .inc();
        self.request_duration
            .get_or_create(&vec![("metric", metric.to_owned())])
            .observe(elapsed.as_secs_f64());
    }

    pub fn prometheus_query(&self, metric: &str, outcome: &'static str, elapsed: Duration) {
        self.prometheus_queries
            .get_or_create(&vec![
                ("metric", metric.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
        self.prometheus_duration
            .get_or_create(&vec![("metric", metric.to_owned())])
            .observe(elapsed.as_secs_f64());
    }

    pub fn cache_lookup(&self, metric: &str, result: &'static str) {
        self.cache_lookups
            .get_or_create(&vec![
                ("metric", metric.to_owned()),
                ("result", result.to_owned()),
            ])
            .inc();
    }

    /// Records a config load attempt (startup or reload).
    pub fn config_reload(&self, ok: bool, configured: usize) {
        let result = if ok { "success" } else { "failure" };
        self.config_reloads
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
        self.config_ok.set(i64::from(ok));
        if ok {
            self.configured_metrics
                .set(i64::try_from(configured).unwrap_or(i64::MAX));
        }
    }

    pub fn set_configured(&self, configured: usize) {
        self.configured_metrics
            .set(i64::try_from(configured).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_exposed_with_its_name() {
        let m = Metrics::new();
        m.request("x", 200, Duration::from_millis(1));
        m.prometheus_query("x", "timeout", Duration::from_millis(1));
        m.cache_lookup("x", "hit");
        m.config_reload(false, 0);
        let text = m.encode();
        for name in [
            "openclaw_adapter_requests_total{metric=\"x\",code=\"200\"} 1",
            "openclaw_adapter_prometheus_queries_total{metric=\"x\",outcome=\"timeout\"} 1",
            "openclaw_adapter_cache_lookups_total{metric=\"x\",result=\"hit\"} 1",
            "openclaw_adapter_config_reloads_total{result=\"failure\"} 1",
            "openclaw_adapter_config_last_reload_successful 0",
            "openclaw_adapter_build_info{version=",
            "openclaw_adapter_request_duration_seconds_bucket",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
