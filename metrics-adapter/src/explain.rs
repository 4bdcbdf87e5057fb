//! `explain`: every step from an HPA's metric to the replica count, for an SRE.
//!
//! For each external metric (one given on the command line, or every external metric of an
//! HPA manifest) it shows the rule, the final PromQL after selector injection, Prometheus' raw
//! answer, the exact `ExternalMetricValueList` (or Status) the API would serve, the usage the
//! HPA would read, and then the HPA's arithmetic: per-metric proposal with the tolerance band,
//! the max over metrics, stabilization and rate limits, as a freshly started controller would
//! compute them. The same functions serve the API ([`crate::api::items`]) and the HPA math
//! ([`crate::hpa`]), so what `explain` prints is what production does.

use std::fmt::Write as _;
use std::future::Future;

use crate::api::{ExternalMetricValueList, final_promql, items};
use crate::config::{Config, OnEmpty, OnNan, Rule, SeriesPolicy};
use crate::hpa::{self, History, Target};
use crate::hpa_manifest::HpaManifest;
use crate::prometheus::QueryResult;
use crate::quantity::{Milli, parse_quantity_milli};
use crate::selector::Selector;
use crate::{Error, Result};

/// What to explain.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// A metric to explain on its own (ignored when an HPA manifest is given).
    pub metric: Option<String>,
    /// Namespace of the request (the HPA's namespace overrides it when the manifest has one).
    pub namespace: String,
    /// `labelSelector` for `metric`.
    pub selector: String,
    /// An `autoscaling/v2` HorizontalPodAutoscaler, as YAML.
    pub hpa_yaml: Option<String>,
    /// The scale's current replicas (defaults to the manifest's `status.currentReplicas`).
    pub current_replicas: Option<i32>,
    /// Ready pods, for `Value` targets (defaults to the current replicas).
    pub ready_replicas: Option<i32>,
}

/// One external metric to evaluate.
#[derive(Debug, Clone)]
struct MetricStep {
    name: String,
    selector: Selector,
    target: Option<(String, Target)>,
}

/// Runs `explain` with `fetch` answering PromQL (the real Prometheus in the binary, canned
/// answers in the golden tests). Returns the report.
pub async fn explain<F, Fut>(config: &Config, req: &Request, fetch: F) -> Result<String>
where
    F: Fn(String, std::time::Duration) -> Fut,
    Fut: Future<Output = Result<QueryResult>>,
{
    let mut out = String::new();
    let (steps, hpa) = match &req.hpa_yaml {
        Some(yaml) => {
            let hpa = HpaManifest::parse(yaml)?;
            for note in &hpa.ignored {
                let _ = writeln!(out, "-- {note}");
            }
            let steps = hpa
                .metrics
                .iter()
                .map(|m| {
                    Ok(MetricStep {
                        name: m.name.clone(),
                        selector: Selector::parse(&m.selector)?,
                        target: Some((m.target_text.clone(), m.target)),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (steps, Some(hpa))
        }
        None => {
            let name = req
                .metric
                .clone()
                .ok_or_else(|| Error::Hpa("give --metric, or --hpa with a manifest".to_owned()))?;
            (
                vec![MetricStep {
                    name,
                    selector: Selector::parse(&req.selector)?,
                    target: None,
                }],
                None,
            )
        }
    };
    let namespace = hpa
        .as_ref()
        .and_then(|h| h.namespace.clone())
        .unwrap_or_else(|| req.namespace.clone());

    let mut usages: Vec<(MetricStep, std::result::Result<Milli, String>)> = Vec::new();
    for step in steps {
        let usage = explain_metric(config, &namespace, &step, &fetch, &mut out).await;
        usages.push((step, usage));
    }

    if let Some(hpa) = hpa {
        explain_hpa(&hpa, req, &usages, &mut out)?;
    }
    Ok(out)
}

async fn explain_metric<F, Fut>(
    config: &Config,
    namespace: &str,
    step: &MetricStep,
    fetch: &F,
    out: &mut String,
) -> std::result::Result<Milli, String>
where
    F: Fn(String, std::time::Duration) -> Fut,
    Fut: Future<Output = Result<QueryResult>>,
{
    let selector_text = if step.selector.is_empty() {
        "(none: everything)".to_owned()
    } else {
        step.selector.to_string()
    };
    let _ = writeln!(
        out,
        "== External metric {} in namespace {namespace}, selector {selector_text}",
        step.name
    );
    let Some(rule) = config.rule(&step.name) else {
        let e = Error::UnknownMetric {
            metric: step.name.clone(),
            configured: config.names(),
        };
        served_error(&e, out);
        return Err(e.to_string());
    };
    describe_rule(rule, out);
    let promql = match final_promql(rule, namespace, &step.selector) {
        Ok(p) => p,
        Err(e) => {
            served_error(&e, out);
            return Err(e.to_string());
        }
    };
    let _ = writeln!(out, "Final PromQL:\n  {promql}");
    let answer = fetch(promql.clone(), rule.timeout).await;
    let result = match answer {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(out, "Prometheus: {e}");
            served_error(&e, out);
            return Err(e.to_string());
        }
    };
    let _ = writeln!(
        out,
        "Prometheus answered ({} series):\n  {}",
        result.samples.len(),
        String::from_utf8_lossy(&result.raw).trim()
    );
    match items(rule, &promql, &result) {
        Ok(items) => {
            let list = ExternalMetricValueList::new(items);
            let body = serde_json::to_string_pretty(&list).unwrap_or_default();
            let _ = writeln!(out, "Served (HTTP 200):\n{}", indent(&body));
            if list.items.is_empty() {
                let _ = writeln!(
                    out,
                    "HPA reads: no items, an error (\"no metrics returned\"): it holds scale-down"
                );
                return Err("no metrics returned".to_owned());
            }
            let mut sum: i64 = 0;
            for item in &list.items {
                sum = sum.saturating_add(
                    parse_quantity_milli(&item.value.0)
                        .map(|m| m.0)
                        .unwrap_or(0),
                );
            }
            let _ = writeln!(
                out,
                "HPA reads: usage {} (sum over {} item{})",
                Milli(sum),
                list.items.len(),
                if list.items.len() == 1 { "" } else { "s" }
            );
            Ok(Milli(sum))
        }
        Err(e) => {
            served_error(&e, out);
            Err(e.to_string())
        }
    }
}

fn describe_rule(rule: &Rule, out: &mut String) {
    let on_empty = match rule.on_empty {
        OnEmpty::Error => "error".to_owned(),
        OnEmpty::Empty => "empty list".to_owned(),
        OnEmpty::Value(v) => format!("value {v}"),
    };
    let on_nan = match rule.on_nan {
        OnNan::Skip => "skip".to_owned(),
        OnNan::Error => "error".to_owned(),
        OnNan::Value(v) => format!("value {v}"),
    };
    let series = match rule.series {
        SeriesPolicy::Sum => "sum",
        SeriesPolicy::Max => "max",
        SeriesPolicy::PerSeries => "per_series",
    };
    let selectable = rule.selectable_labels_text();
    let _ = writeln!(
        out,
        "Rule: {}\n  timeout {:?}, cache_ttl {:?}, on_empty {on_empty}, on_nan {on_nan}, series {series}, \
         window {}, selectable labels: {selectable}{}",
        rule.query.source.trim(),
        rule.timeout,
        rule.cache_ttl,
        rule.window
            .map_or("none".to_owned(), |w| format!("{}s", w.as_secs())),
        rule.namespace_label
            .as_ref()
            .map_or(String::new(), |l| format!(", namespace label {l}")),
    );
}

fn served_error(e: &Error, out: &mut String) {
    let (code, reason) = e.status();
    let body =
        serde_json::to_string_pretty(&crate::status::status_body(code, reason, e.to_string()))
            .unwrap_or_default();
    let _ = writeln!(out, "Served (HTTP {}):\n{}", code.as_u16(), indent(&body));
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn explain_hpa(
    hpa: &HpaManifest,
    req: &Request,
    usages: &[(MetricStep, std::result::Result<Milli, String>)],
    out: &mut String,
) -> Result<()> {
    let current = req
        .current_replicas
        .or(hpa.status_current_replicas)
        .ok_or_else(|| {
            Error::Hpa(
                "give --current-replicas (the manifest has no status.currentReplicas)".to_owned(),
            )
        })?;
    let ready = req.ready_replicas.unwrap_or(current);
    let hpa_spec = &hpa.spec;
    let tol = hpa_spec.tolerances();
    let _ = writeln!(
        out,
        "== HPA {}: current replicas {current}, ready {ready}, minReplicas {}, maxReplicas {}, tolerance -{}/+{}",
        hpa.name, hpa_spec.min_replicas, hpa_spec.max_replicas, tol.scale_down, tol.scale_up,
    );
    let mut proposals = Vec::new();
    for (step, usage) in usages {
        let Some((target_text, target)) = &step.target else {
            continue;
        };
        match usage {
            Ok(usage) => {
                let p = hpa::external_proposal(usage.0, *target, current, ready, tol);
                let how = match target {
                    hpa::Target::Value(_) if current == 0 => format!("ceil({:.4})", p.usage_ratio),
                    hpa::Target::Value(_) => format!("ceil({:.4} x {ready} ready)", p.usage_ratio),
                    hpa::Target::AverageValue(t) => format!("ceil({} / {})", usage, Milli(*t)),
                };
                let verdict = if p.within_tolerance {
                    "within tolerance: keep current".to_owned()
                } else {
                    how
                };
                let _ = writeln!(
                    out,
                    "{}: usage {usage}, target {target_text}: ratio {:.4}, {verdict} -> {} replicas",
                    step.name, p.usage_ratio, p.replicas
                );
                proposals.push(Ok(p.replicas));
            }
            Err(e) => {
                let _ = writeln!(out, "{}: failed ({e})", step.name);
                proposals.push(Err(format!("{}: {e}", step.name)));
            }
        }
    }
    let proposed = match hpa::combine(&proposals, current) {
        Ok(p) => p,
        Err(e) => {
            let _ = writeln!(out, "No decision: {e}. The HPA keeps {current} replicas.");
            return Ok(());
        }
    };
    let _ = writeln!(out, "Largest proposal: {proposed}");
    let mut history = History::fresh(0.0, current);
    let d = hpa::decide(hpa_spec, current, proposed, 0.0, &mut history);
    let windows = if hpa_spec.behavior.is_none() {
        format!(
            "no spec.behavior, so the controller's original rules: the highest recommendation of the last {}s",
            hpa_spec.scale_down_window_seconds()
        )
    } else {
        format!(
            "scale-up window {}s, scale-down window {}s",
            hpa_spec.scale_up_window_seconds(),
            hpa_spec.scale_down_window_seconds()
        )
    };
    let _ = writeln!(
        out,
        "Stabilization ({windows}, as a freshly started controller that has seen only the current count): {}",
        d.stabilized
    );
    let limits = if hpa_spec.behavior.is_none() {
        " (no spec.behavior: at most max(2 x current, 4) up per sync)"
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "Rate limits and min/max{limits}: {} ({})",
        d.replicas, d.reason
    );
    let _ = writeln!(
        out,
        "=> The HPA would set {} replicas (now {current}).",
        d.replicas
    );
    let eventual = proposed.clamp(hpa_spec.min_replicas, hpa_spec.max_replicas);
    if d.stabilized > proposed && eventual < current {
        let _ = writeln!(
            out,
            "   It would go down to {eventual} once the metrics have asked for it for {}s.",
            hpa_spec.scale_down_window_seconds()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prometheus::parse_response;
    use bytes::Bytes;

    fn config() -> Config {
        Config::embedded_default()
    }

    fn answer(samples: &[(&str, &str)]) -> Result<QueryResult> {
        let result: Vec<String> = samples
            .iter()
            .map(|(labels, v)| {
                format!(r#"{{"metric":{{{labels}}},"value":[1767323045.123,"{v}"]}}"#)
            })
            .collect();
        let body = format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{}]}}}}"#,
            result.join(",")
        );
        parse_response(reqwest::StatusCode::OK, Bytes::from(body))
    }

    /// Canned Prometheus: answers by the metric named in the query.
    fn canned(
        rps: &'static str,
        depletion: &'static str,
    ) -> impl Fn(String, std::time::Duration) -> std::future::Ready<Result<QueryResult>> {
        move |promql: String, _| {
            // The depletion query divides by openclaw_requests_total too: its own counter first.
            let v = if promql.contains("openclaw_bucket_depletion_total") {
                depletion
            } else if promql.contains("openclaw_requests_total") {
                rps
            } else {
                depletion
            };
            std::future::ready(if v == "down" {
                Err(Error::Prometheus(
                    "http://127.0.0.1:9/api/v1/query unreachable: connection refused".into(),
                ))
            } else if v == "empty" {
                answer(&[])
            } else {
                answer(&[("", v)])
            })
        }
    }

    fn hpa(metrics: &str, behavior: &str) -> String {
        format!(
            "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata:\n  name: limiter\n  namespace: edge\n\
             spec:\n  scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: limiter}}\n  minReplicas: 2\n  maxReplicas: 20\n\
             {behavior}  metrics:\n{metrics}"
        )
    }

    const RPS_VALUE_1K: &str = "  - type: External\n    external:\n      metric: {name: openclaw_requests_per_second, selector: {matchLabels: {policy: default}}}\n      target: {type: Value, value: 1k}\n";
    const DEPLETION_AVG_200M: &str = "  - type: External\n    external:\n      metric: {name: openclaw_token_depletion_rate}\n      target: {type: AverageValue, averageValue: 200m}\n";

    async fn run(req: Request, rps: &'static str, depletion: &'static str) -> String {
        explain(&config(), &req, canned(rps, depletion))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn golden_single_metric_shows_promql_raw_answer_and_items() {
        let req = Request {
            metric: Some("openclaw_requests_per_second".into()),
            namespace: "default".into(),
            selector: "policy=default".into(),
            ..Default::default()
        };
        let out = run(req, "812.5", "0").await;
        let want = r#"== External metric openclaw_requests_per_second in namespace default, selector policy=default
Rule: sum(rate(openclaw_requests_total[1m]))
  timeout 2s, cache_ttl 5s, on_empty error, on_nan skip, series sum, window 60s, selectable labels: app, decision, policy
Final PromQL:
  sum(rate(openclaw_requests_total{policy="default"}[1m]))
Prometheus answered (1 series):
  {"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1767323045.123,"812.5"]}]}}
Served (HTTP 200):
  {
    "kind": "ExternalMetricValueList",
    "apiVersion": "external.metrics.k8s.io/v1beta1",
    "metadata": {},
    "items": [
      {
        "metricName": "openclaw_requests_per_second",
        "metricLabels": {},
        "timestamp": "2026-01-02T03:04:05Z",
        "window": 60,
        "value": "812500m"
      }
    ]
  }
HPA reads: usage 812500m (sum over 1 item)
"#;
        assert_eq!(out, want);
    }

    #[tokio::test]
    async fn golden_value_target_scales_up_by_the_ratio_within_the_behavior_policies() {
        // 2500 rps against 1k on 2 ready pods: ceil(2.5 * 2) = 5; +4 pods / +100% allows 6.
        let behavior = "  behavior:\n    scaleUp: {stabilizationWindowSeconds: 0}\n";
        let req = Request {
            hpa_yaml: Some(hpa(RPS_VALUE_1K, behavior)),
            current_replicas: Some(2),
            ..Default::default()
        };
        let out = run(req, "2500", "0").await;
        let tail = out.split("== HPA").nth(1).unwrap();
        assert_eq!(
            tail,
            " limiter: current replicas 2, ready 2, minReplicas 2, maxReplicas 20, tolerance -0.1/+0.1
openclaw_requests_per_second: usage 2500, target Value 1k: ratio 2.5000, ceil(2.5000 x 2 ready) -> 5 replicas
Largest proposal: 5
Stabilization (scale-up window 0s, scale-down window 300s, as a freshly started controller that has seen only the current count): 5
Rate limits and min/max: 5 (DesiredWithinRange)
=> The HPA would set 5 replicas (now 2).
"
        );
        assert!(out.contains("selector policy=default"));
        assert!(out.contains("{policy=\"default\"}"));
    }

    #[tokio::test]
    async fn golden_without_behavior_the_controller_doubles_at_most_or_adds_four() {
        // The same numbers with no spec.behavior: the controller's original limit max(2 x 2, 4)
        // = 4, not the documented default policies' 6.
        let req = Request {
            hpa_yaml: Some(hpa(RPS_VALUE_1K, "")),
            current_replicas: Some(2),
            ..Default::default()
        };
        let out = run(req, "2500", "0").await;
        let tail = out.split("== HPA").nth(1).unwrap();
        assert_eq!(
            tail,
            " limiter: current replicas 2, ready 2, minReplicas 2, maxReplicas 20, tolerance -0.1/+0.1
openclaw_requests_per_second: usage 2500, target Value 1k: ratio 2.5000, ceil(2.5000 x 2 ready) -> 5 replicas
Largest proposal: 5
Stabilization (no spec.behavior, so the controller's original rules: the highest recommendation of the last 300s, as a freshly started controller that has seen only the current count): 5
Rate limits and min/max (no spec.behavior: at most max(2 x current, 4) up per sync): 4 (ScaleUpLimit)
=> The HPA would set 4 replicas (now 2).
"
        );
    }

    #[tokio::test]
    async fn golden_tolerance_band_keeps_the_current_count() {
        // 1050 rps against 1k: ratio 1.05 is inside +-0.1.
        let req = Request {
            hpa_yaml: Some(hpa(RPS_VALUE_1K, "")),
            current_replicas: Some(4),
            ..Default::default()
        };
        let out = run(req, "1050", "0").await;
        assert!(
            out.contains("ratio 1.0500, within tolerance: keep current -> 4 replicas"),
            "{out}"
        );
        assert!(
            out.contains("=> The HPA would set 4 replicas (now 4)."),
            "{out}"
        );
    }

    #[tokio::test]
    async fn golden_average_value_divides_by_the_per_pod_target() {
        // Depletion 0.9 against 200m per pod on 3: ratio 0.9/(0.2*3) = 1.5 -> ceil(900m/200m) = 5.
        let req = Request {
            hpa_yaml: Some(hpa(DEPLETION_AVG_200M, "")),
            current_replicas: Some(3),
            ..Default::default()
        };
        let out = run(req, "0", "0.9").await;
        assert!(out.contains("openclaw_token_depletion_rate: usage 900m, target AverageValue 200m: ratio 1.5000, ceil(900m / 200m) -> 5 replicas"), "{out}");
        assert!(
            out.contains("=> The HPA would set 5 replicas (now 3)."),
            "{out}"
        );
    }

    #[tokio::test]
    async fn golden_several_metrics_take_the_largest_proposal() {
        // RPS asks for ceil(3.0 * 4) = 12, depletion ceil(0.5/0.2) = 3: 12 wins, and without
        // behavior max(2 x 4, 4) allows 8.
        let metrics = format!("{RPS_VALUE_1K}{DEPLETION_AVG_200M}");
        let req = Request {
            hpa_yaml: Some(hpa(&metrics, "")),
            current_replicas: Some(4),
            ..Default::default()
        };
        let out = run(req, "3000", "0.5").await;
        assert!(out.contains("-> 12 replicas"), "{out}");
        assert!(out.contains("-> 3 replicas"), "{out}");
        assert!(out.contains("Largest proposal: 12"), "{out}");
        assert!(out.contains("up per sync): 8 (ScaleUpLimit)"), "{out}");
        assert!(
            out.contains("=> The HPA would set 8 replicas (now 4)."),
            "{out}"
        );
    }

    #[tokio::test]
    async fn golden_scale_down_is_held_by_the_stabilization_window() {
        let req = Request {
            hpa_yaml: Some(hpa(RPS_VALUE_1K, "")),
            current_replicas: Some(10),
            ..Default::default()
        };
        let out = run(req, "1000", "0").await;
        // ratio 1.0 on 10 pods... use a low value instead:
        assert!(out.contains("-> 10 replicas"), "{out}");
        let req = Request {
            hpa_yaml: Some(hpa(RPS_VALUE_1K, "")),
            current_replicas: Some(10),
            ..Default::default()
        };
        let out = run(req, "200", "0").await;
        assert!(
            out.contains("ratio 0.2000, ceil(0.2000 x 10 ready) -> 2 replicas"),
            "{out}"
        );
        assert!(
            out.contains("the highest recommendation of the last 300s"),
            "{out}"
        );
        assert!(
            out.contains("=> The HPA would set 10 replicas (now 10)."),
            "{out}"
        );
        assert!(
            out.contains("It would go down to 2 once the metrics have asked for it for 300s."),
            "{out}"
        );
        // With a zero window it goes straight to the proposal (floored by minReplicas 2).
        let behavior = "  behavior:\n    scaleDown: {stabilizationWindowSeconds: 0}\n";
        let req = Request {
            hpa_yaml: Some(hpa(RPS_VALUE_1K, behavior)),
            current_replicas: Some(10),
            ..Default::default()
        };
        let out = run(req, "200", "0").await;
        assert!(
            out.contains("=> The HPA would set 2 replicas (now 10)."),
            "{out}"
        );
    }

    #[tokio::test]
    async fn a_failing_metric_freezes_scale_down_but_lets_scale_up_through() {
        let metrics = format!("{RPS_VALUE_1K}{DEPLETION_AVG_200M}");
        let req = Request {
            hpa_yaml: Some(hpa(&metrics, "")),
            current_replicas: Some(4),
            ..Default::default()
        };
        let out = run(req.clone(), "100", "down").await;
        assert!(out.contains("Served (HTTP 500)"), "{out}");
        assert!(out.contains("No decision:"), "{out}");
        assert!(out.contains("The HPA keeps 4 replicas."), "{out}");
        let out = run(req, "3000", "empty").await;
        assert!(out.contains("Served (HTTP 404)"), "{out}");
        assert!(
            out.contains("=> The HPA would set 8 replicas (now 4)."),
            "{out}"
        );
    }

    #[tokio::test]
    async fn unknown_metrics_and_disallowed_selectors_show_the_status_that_would_be_served() {
        let req = Request {
            metric: Some("nope".into()),
            namespace: "default".into(),
            ..Default::default()
        };
        let out = run(req, "1", "1").await;
        assert!(
            out.contains("Served (HTTP 404)") && out.contains("\"reason\": \"NotFound\""),
            "{out}"
        );
        let req = Request {
            metric: Some("openclaw_token_depletion_rate".into()),
            namespace: "default".into(),
            selector: "decision=allowed".into(),
            ..Default::default()
        };
        let out = run(req, "1", "1").await;
        assert!(
            out.contains("Served (HTTP 400)")
                && out.contains("cannot be narrowed by label \\\"decision\\\""),
            "{out}"
        );
    }

    #[tokio::test]
    async fn bad_manifests_are_reported() {
        let req = Request {
            hpa_yaml: Some("kind: [".into()),
            ..Default::default()
        };
        assert!(explain(&config(), &req, canned("1", "1")).await.is_err());
        let req = Request {
            hpa_yaml: Some(hpa(RPS_VALUE_1K, "")),
            ..Default::default()
        };
        let e = explain(&config(), &req, canned("1", "1"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("--current-replicas"), "{e}");
    }
}
