//! An `autoscaling/v2` HorizontalPodAutoscaler manifest, read the way the HPA controller reads
//! the object: min/max replicas, `behavior` with the API server's defaults filled in, and each
//! External metric with its target and the exact `labelSelector` text the controller sends.
//!
//! `explain` (one sync, in-process) and the HPA simulator ([`crate::hpa_sim`], many syncs over
//! HTTP) both start here, so they cannot disagree about what a manifest means.

use k8s_openapi::api::autoscaling::v2::{HPAScalingRules, HorizontalPodAutoscaler, MetricTarget};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::Value;

use crate::hpa::{Behavior, PolicyKind, ScalingPolicy, ScalingRules, SelectPolicy, Spec, Target};
use crate::quantity::parse_quantity_milli;
use crate::selector::{validate_label_key, validate_label_value};
use crate::{Error, Result};

/// One `type: External` entry of `spec.metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalMetric {
    /// `external.metric.name`: the path segment of the list call.
    pub name: String,
    /// `labels.Selector.String()` of `external.metric.selector`, as the controller puts it in
    /// `?labelSelector=`; empty when there is no selector (the parameter is then left out).
    pub selector: String,
    pub target: Target,
    /// The target as written, e.g. `AverageValue 800`, for people.
    pub target_text: String,
}

/// What the controller uses of an HPA manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct HpaManifest {
    pub name: String,
    /// `metadata.namespace`, when the manifest names one.
    pub namespace: Option<String>,
    pub spec: Spec,
    /// The External metrics, in manifest order.
    pub metrics: Vec<ExternalMetric>,
    /// Metrics of other types (Resource, Pods, Object, ContainerResource), which this adapter
    /// does not serve: one sentence each, for reports.
    pub ignored: Vec<String>,
    /// `status.currentReplicas`, when the manifest is a live object with a status.
    pub status_current_replicas: Option<i32>,
}

impl HpaManifest {
    /// Reads an `autoscaling/v2` HorizontalPodAutoscaler (YAML or JSON text).
    pub fn parse(yaml: &str) -> Result<HpaManifest> {
        HpaManifest::parse_with_patches(yaml, &[])
    }

    /// Reads `yaml` with kustomize-style patches applied in order (e.g.
    /// `deploy/overlays/production/hpa.yaml`, which raises `minReplicas`). Every list in an
    /// HPA's spec is atomic (`+listType=atomic`), so a strategic merge patch of an HPA is a JSON
    /// merge patch (RFC 7386): maps merge, lists and scalars replace, `null` deletes. A patch
    /// naming a different kind or object is refused rather than silently applied.
    pub fn parse_with_patches(yaml: &str, patches: &[&str]) -> Result<HpaManifest> {
        let mut doc = yaml_value(yaml, "the HPA manifest")?;
        for (i, patch) in patches.iter().enumerate() {
            let patch = yaml_value(patch, &format!("patch {}", i + 1))?;
            for field in [
                &["kind"][..],
                &["metadata", "name"],
                &["metadata", "namespace"],
            ] {
                let (base, theirs) = (lookup(&doc, field), lookup(&patch, field));
                if let (Some(base), Some(theirs)) = (base, theirs)
                    && base != theirs
                {
                    return Err(Error::Hpa(format!(
                        "patch {} is for {} {theirs}, the manifest has {base}",
                        i + 1,
                        field.join(".")
                    )));
                }
            }
            merge_patch(&mut doc, &patch);
        }
        let hpa: HorizontalPodAutoscaler = serde_json::from_value(doc).map_err(|e| {
            Error::Hpa(format!(
                "not an autoscaling/v2 HorizontalPodAutoscaler: {e}"
            ))
        })?;
        HpaManifest::from_object(&hpa)
    }

    /// Reads an already decoded object.
    pub fn from_object(hpa: &HorizontalPodAutoscaler) -> Result<HpaManifest> {
        let spec = hpa
            .spec
            .as_ref()
            .ok_or_else(|| Error::Hpa("no spec".to_owned()))?;
        let mut metrics = Vec::new();
        let mut ignored = Vec::new();
        for (i, m) in spec.metrics.iter().flatten().enumerate() {
            let Some(ext) = &m.external else {
                ignored.push(format!(
                    "spec.metrics[{i}] is of type {}: not served by this adapter, not evaluated",
                    m.type_
                ));
                continue;
            };
            let selector = label_selector_string(ext.metric.selector.as_ref()).map_err(|e| {
                Error::Hpa(format!("spec.metrics[{i}].external.metric.selector: {e}"))
            })?;
            let (target_text, target) = target_from(&ext.target)
                .map_err(|e| Error::Hpa(format!("spec.metrics[{i}].external.target: {e}")))?;
            metrics.push(ExternalMetric {
                name: ext.metric.name.clone(),
                selector,
                target,
                target_text,
            });
        }
        if metrics.is_empty() {
            return Err(Error::Hpa("the HPA has no External metrics".to_owned()));
        }
        let behavior = match &spec.behavior {
            None => None,
            Some(b) => Some(Behavior {
                scale_up: rules_from(b.scale_up.as_ref(), ScalingRules::default_scale_up())
                    .map_err(|e| Error::Hpa(format!("behavior.scaleUp: {e}")))?,
                scale_down: rules_from(b.scale_down.as_ref(), ScalingRules::default_scale_down())
                    .map_err(|e| Error::Hpa(format!("behavior.scaleDown: {e}")))?,
            }),
        };
        let spec = Spec {
            min_replicas: spec.min_replicas.unwrap_or(1),
            max_replicas: spec.max_replicas,
            behavior,
        };
        validate_range(&spec)?;
        Ok(HpaManifest {
            name: hpa
                .metadata
                .name
                .clone()
                .unwrap_or_else(|| "(unnamed)".to_owned()),
            namespace: hpa.metadata.namespace.clone(),
            spec,
            metrics,
            ignored,
            status_current_replicas: hpa.status.as_ref().and_then(|s| s.current_replicas),
        })
    }
}

/// What the API server's validation says of minReplicas and maxReplicas (0 is allowed as a
/// minimum only with the HPAScaleToZero feature gate; we accept it).
pub fn validate_range(spec: &Spec) -> Result<()> {
    if spec.min_replicas < 0 {
        return Err(Error::Hpa(format!(
            "minReplicas {} is negative",
            spec.min_replicas
        )));
    }
    if spec.max_replicas < 1 || spec.max_replicas < spec.min_replicas {
        return Err(Error::Hpa(format!(
            "maxReplicas {} must be at least 1 and at least minReplicas {}",
            spec.max_replicas, spec.min_replicas
        )));
    }
    Ok(())
}

fn yaml_value(text: &str, what: &str) -> Result<Value> {
    serde_norway::from_str(text).map_err(|e| Error::Hpa(format!("{what} is not YAML: {e}")))
}

fn lookup<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let Value::Object(target) = target else {
        unreachable!("made an object above")
    };
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// `metav1.LabelSelectorAsSelector(sel).String()`: the text the HPA controller sends as
/// `labelSelector`.
///
/// - no selector (`labels.Nothing()`) and an empty one (`labels.Everything()`) both print as
///   `""`, and the client then leaves the parameter out;
/// - `matchLabels` become `k=v` (one `=`), `In`/`NotIn` become `k in (a,b)` / `k notin (a,b)`
///   with the values sorted (duplicates kept, as `safeSort` keeps them), `Exists` is `k`,
///   `DoesNotExist` is `!k`;
/// - requirements are sorted by key (`sort.Sort(ByKey)`); for one key, `matchLabels` come
///   before `matchExpressions`, which keep their order (Go's insertion sort for up to 12
///   requirements is stable; beyond that Go's order for equal keys is unspecified);
/// - keys and values are validated as `labels.NewRequirement` does, and an unknown operator
///   is an error, as the controller's is (the metric then fails).
pub fn label_selector_string(sel: Option<&LabelSelector>) -> Result<String> {
    let Some(sel) = sel else {
        return Ok(String::new());
    };
    let mut reqs: Vec<(String, String)> = Vec::new();
    for (k, v) in sel.match_labels.iter().flatten() {
        validate_label_key(k)?;
        validate_label_value(v)?;
        reqs.push((k.clone(), format!("{k}={v}")));
    }
    for e in sel.match_expressions.iter().flatten() {
        validate_label_key(&e.key)?;
        let mut values = e.values.clone().unwrap_or_default();
        for v in &values {
            validate_label_value(v)?;
        }
        let text = match e.operator.as_str() {
            "In" | "NotIn" => {
                if values.is_empty() {
                    return Err(Error::BadSelector(format!(
                        "{}: for 'in', 'notin' operators, values set can't be empty",
                        e.key
                    )));
                }
                values.sort();
                let op = if e.operator == "In" { "in" } else { "notin" };
                format!("{} {op} ({})", e.key, values.join(","))
            }
            "Exists" | "DoesNotExist" => {
                if !values.is_empty() {
                    return Err(Error::BadSelector(format!(
                        "{}: values set must be empty for exists and does not exist",
                        e.key
                    )));
                }
                if e.operator == "Exists" {
                    e.key.clone()
                } else {
                    format!("!{}", e.key)
                }
            }
            other => {
                return Err(Error::BadSelector(format!(
                    "{other:?} is not a valid label selector operator"
                )));
            }
        };
        reqs.push((e.key.clone(), text));
    }
    // A stable sort by key: matchLabels were pushed first, expressions in manifest order.
    reqs.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(reqs
        .into_iter()
        .map(|(_, text)| text)
        .collect::<Vec<_>>()
        .join(","))
}

fn target_from(t: &MetricTarget) -> std::result::Result<(String, Target), String> {
    match t.type_.as_str() {
        "Value" => {
            let q = t.value.as_ref().ok_or("type Value needs target.value")?;
            let m = parse_quantity_milli(&q.0).map_err(|e| e.to_string())?;
            Ok((format!("Value {q}", q = q.0), Target::Value(m.0)))
        }
        "AverageValue" => {
            let q = t
                .average_value
                .as_ref()
                .ok_or("type AverageValue needs target.averageValue")?;
            let m = parse_quantity_milli(&q.0).map_err(|e| e.to_string())?;
            Ok((
                format!("AverageValue {q}", q = q.0),
                Target::AverageValue(m.0),
            ))
        }
        other => Err(format!(
            "type {other:?} does not apply to External metrics (use Value or AverageValue)"
        )),
    }
}

/// `GenerateHPAScaleUpRules` / `GenerateHPAScaleDownRules`: what is absent takes the default.
fn rules_from(
    r: Option<&HPAScalingRules>,
    default: ScalingRules,
) -> std::result::Result<ScalingRules, String> {
    let Some(r) = r else { return Ok(default) };
    let mut rules = default;
    if let Some(w) = r.stabilization_window_seconds {
        rules.stabilization_window_seconds = w;
    }
    if let Some(p) = &r.select_policy {
        rules.select_policy = match p.as_str() {
            "Max" => SelectPolicy::Max,
            "Min" => SelectPolicy::Min,
            "Disabled" => SelectPolicy::Disabled,
            other => return Err(format!("selectPolicy {other:?}")),
        };
    }
    if let Some(ps) = &r.policies {
        rules.policies = ps
            .iter()
            .map(|p| {
                let kind = match p.type_.as_str() {
                    "Pods" => PolicyKind::Pods,
                    "Percent" => PolicyKind::Percent,
                    other => return Err(format!("policy type {other:?}")),
                };
                Ok(ScalingPolicy {
                    kind,
                    value: p.value,
                    period_seconds: p.period_seconds,
                })
            })
            .collect::<std::result::Result<_, _>>()?;
    }
    if let Some(t) = &r.tolerance {
        rules.tolerance = Some(
            parse_quantity_milli(&t.0)
                .map_err(|e| e.to_string())?
                .to_f64(),
        );
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.to_owned(),
            operator: op.to_owned(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).to_owned()).collect()),
        }
    }

    fn selector(labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_labels: (!labels.is_empty()).then(|| {
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect()
            }),
            match_expressions: (!exprs.is_empty()).then_some(exprs),
        }
    }

    #[test]
    fn no_selector_and_an_empty_selector_both_send_no_parameter() {
        assert_eq!(label_selector_string(None).unwrap(), "");
        assert_eq!(
            label_selector_string(Some(&LabelSelector::default())).unwrap(),
            ""
        );
    }

    #[test]
    fn every_operator_prints_as_apimachinery_prints_it_sorted_by_key() {
        let sel = selector(
            &[("zone", "eu-1"), ("app", "openclaw")],
            vec![
                expr("policy", "In", &["premium", "default", "free"]),
                expr("decision", "NotIn", &["rejected"]),
                expr("tier", "Exists", &[]),
                expr("canary", "DoesNotExist", &[]),
            ],
        );
        assert_eq!(
            label_selector_string(Some(&sel)).unwrap(),
            "app=openclaw,!canary,decision notin (rejected),policy in (default,free,premium),tier,zone=eu-1"
        );
    }

    #[test]
    fn one_key_keeps_match_labels_first_then_expressions_in_manifest_order() {
        let sel = selector(
            &[("policy", "default")],
            vec![
                expr("policy", "NotIn", &["free"]),
                expr("policy", "Exists", &[]),
                expr("decision", "In", &["allowed"]),
            ],
        );
        assert_eq!(
            label_selector_string(Some(&sel)).unwrap(),
            "decision in (allowed),policy=default,policy notin (free),policy"
        );
    }

    #[test]
    fn set_values_are_sorted_but_duplicates_are_kept() {
        let sel = selector(
            &[],
            vec![expr("decision", "In", &["rejected", "allowed", "allowed"])],
        );
        assert_eq!(
            label_selector_string(Some(&sel)).unwrap(),
            "decision in (allowed,allowed,rejected)"
        );
    }

    #[test]
    fn selectors_the_controller_refuses_are_errors() {
        for sel in [
            selector(&[], vec![expr("policy", "Gt", &["1"])]),
            selector(&[], vec![expr("policy", "In", &[])]),
            selector(&[], vec![expr("policy", "Exists", &["x"])]),
            selector(&[("bad key!", "v")], vec![]),
            selector(&[("policy", "not a value")], vec![]),
        ] {
            assert!(label_selector_string(Some(&sel)).is_err(), "{sel:?}");
        }
    }

    const BASE: &str = "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {name: h, namespace: edge}\n\
        spec:\n  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: d}\n  minReplicas: 2\n  maxReplicas: 15\n\
        \x20 metrics:\n  - type: Resource\n    resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}\n\
        \x20 - type: External\n    external:\n      metric: {name: m, selector: {matchLabels: {policy: default}}}\n      target: {type: AverageValue, averageValue: \"800\"}\n";

    #[test]
    fn a_manifest_without_behavior_keeps_it_absent_and_notes_other_metric_types() {
        let m = HpaManifest::parse(BASE).unwrap();
        assert_eq!(m.name, "h");
        assert_eq!(m.namespace.as_deref(), Some("edge"));
        assert_eq!((m.spec.min_replicas, m.spec.max_replicas), (2, 15));
        assert_eq!(m.spec.behavior, None);
        assert_eq!(m.ignored.len(), 1);
        assert_eq!(
            m.metrics,
            vec![ExternalMetric {
                name: "m".into(),
                selector: "policy=default".into(),
                target: Target::AverageValue(800_000),
                target_text: "AverageValue 800".into(),
            }]
        );
    }

    #[test]
    fn patches_merge_maps_and_replace_scalars_like_a_kustomize_overlay() {
        let patch = "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {name: h, namespace: edge}\nspec:\n  minReplicas: 3\n  behavior: {scaleDown: {stabilizationWindowSeconds: 60}}\n";
        let m = HpaManifest::parse_with_patches(BASE, &[patch]).unwrap();
        assert_eq!((m.spec.min_replicas, m.spec.max_replicas), (3, 15));
        let b = m.spec.behavior.unwrap();
        assert_eq!(b.scale_down.stabilization_window_seconds, 60);
        assert_eq!(
            b.scale_down.policies,
            ScalingRules::default_scale_down().policies
        );
        assert_eq!(b.scale_up, ScalingRules::default_scale_up());
        // Removing the selector with null.
        let m = HpaManifest::parse_with_patches(
            BASE,
            &["spec: {metrics: [{type: External, external: {metric: {name: m}, target: {type: Value, value: \"1\"}}}]}"],
        )
        .unwrap();
        assert_eq!(m.metrics[0].selector, "");
        assert_eq!(m.metrics[0].target, Target::Value(1000));
    }

    #[test]
    fn a_patch_for_another_object_or_an_impossible_range_is_refused() {
        let other =
            "kind: HorizontalPodAutoscaler\nmetadata: {name: other}\nspec: {minReplicas: 3}\n";
        let e = HpaManifest::parse_with_patches(BASE, &[other]).unwrap_err();
        assert!(e.to_string().contains("metadata.name"), "{e}");
        let e = HpaManifest::parse_with_patches(BASE, &["spec: {minReplicas: 20}"]).unwrap_err();
        assert!(e.to_string().contains("maxReplicas 15"), "{e}");
    }
}
