//! Time compression: the same system, K times faster, for tests.
//!
//! With a time scale K > 1 every *duration that the system waits for* is divided by K, so that
//! one real second stands for K seconds of the uncompressed world:
//!
//! - Prometheus' scrape and rule evaluation interval: 15 s (the ServiceMonitors in `deploy/`)
//!   divided by K, at least [`MIN_INTERVAL`] (0.5 s): up to K = 30 the compression is exact.
//! - In every rule of `alerts/rules/*.yaml`: `for:` divided by K, at least 2 evaluation
//!   intervals (a `for` shorter than that is one evaluation, no longer a duration); every range
//!   window (`rate(x[1m])`, subquery ranges and steps) and `offset` divided by K, at least 4
//!   scrape intervals (so that `rate()` keeps the 4 samples per window the rules were written
//!   for at a 15 s scrape, and survives one missed scrape).
//! - In the metrics adapter's config: the range windows of every query (same rule and floor)
//!   and `cache_ttl` (a served value is reused for at most 5 s / K).
//! - The HPA simulator's sync period, stabilization windows and policy periods (its own
//!   `time_scale`), and the scenario's phase durations and sampling period.
//!
//! Not compressed, because they are not waits but rates or magnitudes: request rates (800
//! requests per second per pod stays 800 per real second), token bucket refill (1000 tokens
//! per second), alert thresholds expressed in seconds (`token_bucket_refill_delay > 5`,
//! replication lag > 5 s: values of a gauge, not durations of the rule), the limiter's own sync
//! and anti-entropy intervals, and the adapter's query timeout (a bound on one round trip).
//!
//! With K = 1 nothing is rewritten: Prometheus loads `alerts/rules/*.yaml` themselves and the
//! adapter its default config unchanged.

use std::time::Duration;

use promql_parser::parser::{self, Expr};
use promql_parser::util::visitor::{ExprVisitorMut, walk_expr_mut};
use serde_norway::Value;

use crate::{Error, Result};

/// The scrape interval of `deploy/`'s ServiceMonitors, which the rules' windows assume.
pub const PRODUCTION_SCRAPE_INTERVAL: Duration = Duration::from_secs(15);
/// The shortest scrape and evaluation interval the stack uses (a few loopback targets and a few
/// dozen rules cost Prometheus little even twice a second).
pub const MIN_INTERVAL: Duration = Duration::from_millis(500);
/// Range windows keep at least this many scrape intervals.
pub const MIN_SAMPLES_PER_WINDOW: u32 = 4;
/// `for:` keeps at least this many evaluation intervals.
pub const MIN_EVALUATIONS_PER_HOLD: u32 = 2;

/// How much faster than real time the stack runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeScale {
    k: f64,
}

impl TimeScale {
    /// Real time.
    pub const REAL: TimeScale = TimeScale { k: 1.0 };

    /// `k` simulated seconds per real second; `k` >= 1 and finite.
    pub fn new(k: f64) -> Result<TimeScale> {
        if !(k.is_finite() && (1.0..=1000.0).contains(&k)) {
            return Err(Error::Other(format!(
                "time scale {k} out of range: 1 (real time) to 1000"
            )));
        }
        Ok(TimeScale { k })
    }

    pub fn factor(&self) -> f64 {
        self.k
    }

    pub fn is_real_time(&self) -> bool {
        self.k == 1.0
    }

    /// Prometheus' scrape and evaluation interval.
    pub fn scrape_interval(&self) -> Duration {
        whole_millis(PRODUCTION_SCRAPE_INTERVAL.div_f64(self.k)).max(MIN_INTERVAL)
    }

    /// A range window (or offset) of a query.
    pub fn window(&self, d: Duration) -> Duration {
        if self.is_real_time() || d.is_zero() {
            return d;
        }
        whole_millis(d.div_f64(self.k)).max(self.scrape_interval() * MIN_SAMPLES_PER_WINDOW)
    }

    /// The `for:` of an alert.
    pub fn hold(&self, d: Duration) -> Duration {
        if self.is_real_time() || d.is_zero() {
            return d;
        }
        whole_millis(d.div_f64(self.k)).max(self.scrape_interval() * MIN_EVALUATIONS_PER_HOLD)
    }

    /// A plain wait (a cache lifetime, a period): divided by K, no floor.
    pub fn wait(&self, d: Duration) -> Duration {
        d.div_f64(self.k)
    }

    /// Real time for a span of simulated time.
    pub fn to_real(&self, simulated: Duration) -> Duration {
        simulated.div_f64(self.k)
    }

    /// Simulated time for a span of real time.
    pub fn to_simulated(&self, real: Duration) -> Duration {
        real.mul_f64(self.k)
    }

    /// A PromQL expression with its range windows, subquery steps and offsets compressed.
    pub fn promql(&self, expr: &str) -> Result<String> {
        let mut ast = parser::parse(expr)
            .map_err(|e| Error::Other(format!("cannot parse PromQL `{expr}`: {e}")))?;
        if self.is_real_time() {
            return Ok(ast.to_string());
        }
        let mut visitor = Compressor { scale: *self };
        let _ = walk_expr_mut(&mut visitor, &mut ast);
        Ok(ast.to_string())
    }

    /// A Prometheus rule file (`groups: [{rules: [{expr, for, ...}]}]`) with every `expr` and
    /// `for:` compressed; everything else (names, labels, annotations) unchanged.
    pub fn rule_file(&self, yaml: &str, origin: &str) -> Result<String> {
        let mut doc: Value = serde_norway::from_str(yaml)
            .map_err(|e| Error::Other(format!("{origin}: not YAML: {e}")))?;
        let groups = doc
            .get_mut("groups")
            .and_then(Value::as_sequence_mut)
            .ok_or_else(|| Error::Other(format!("{origin}: no `groups` list")))?;
        for group in groups {
            if let Some(interval) = group.get_mut("interval") {
                let d = duration_value(interval, origin)?;
                *interval =
                    Value::String(format_duration(self.hold(d).max(self.scrape_interval())));
            }
            let Some(rules) = group.get_mut("rules").and_then(Value::as_sequence_mut) else {
                continue;
            };
            for rule in rules {
                if let Some(Value::String(expr)) = rule.get_mut("expr") {
                    *expr = self
                        .promql(expr)
                        .map_err(|e| Error::Other(format!("{origin}: {e}")))?;
                }
                if let Some(hold) = rule.get_mut("for") {
                    let d = duration_value(hold, origin)?;
                    *hold = Value::String(format_duration(self.hold(d)));
                }
                if let Some(keep) = rule.get_mut("keep_firing_for") {
                    let d = duration_value(keep, origin)?;
                    *keep = Value::String(format_duration(self.hold(d)));
                }
            }
        }
        let body =
            serde_norway::to_string(&doc).map_err(|e| Error::Other(format!("{origin}: {e}")))?;
        Ok(format!(
            "# Generated by openclaw-stack from {origin} at time scale {}: every `for` and range\n\
             # window divided by it (see stack/src/timescale.rs). Do not edit; edit the source.\n{body}",
            self.k
        ))
    }

    /// The metrics adapter's rules file with each query's windows and every `cache_ttl`
    /// compressed (and a `window:` if a rule sets one).
    pub fn adapter_config(&self, yaml: &str, origin: &str) -> Result<String> {
        let mut doc: Value = serde_norway::from_str(yaml)
            .map_err(|e| Error::Other(format!("{origin}: not YAML: {e}")))?;
        if let Some(defaults) = doc.get_mut("defaults") {
            self.compress_ttl(defaults, origin)?;
        }
        let rules = doc
            .get_mut("rules")
            .and_then(Value::as_sequence_mut)
            .ok_or_else(|| Error::Other(format!("{origin}: no `rules` list")))?;
        for rule in rules {
            if let Some(Value::String(query)) = rule.get_mut("query") {
                *query = self
                    .promql(query)
                    .map_err(|e| Error::Other(format!("{origin}: {e}")))?;
            }
            if let Some(window) = rule.get_mut("window") {
                let d = duration_value(window, origin)?;
                *window = Value::String(format_duration(self.window(d)));
            }
            self.compress_ttl(rule, origin)?;
        }
        let body =
            serde_norway::to_string(&doc).map_err(|e| Error::Other(format!("{origin}: {e}")))?;
        Ok(format!(
            "# Generated by openclaw-stack from {origin} at time scale {}: range windows and\n\
             # cache_ttl divided by it (see stack/src/timescale.rs). Do not edit; edit the source.\n{body}",
            self.k
        ))
    }

    fn compress_ttl(&self, map: &mut Value, origin: &str) -> Result<()> {
        if let Some(ttl) = map.get_mut("cache_ttl") {
            let d = duration_value(ttl, origin)?;
            *ttl = Value::String(format_duration(self.wait(d)));
        }
        Ok(())
    }
}

struct Compressor {
    scale: TimeScale,
}

impl ExprVisitorMut for Compressor {
    type Error = std::convert::Infallible;

    fn pre_visit(&mut self, expr: &mut Expr) -> std::result::Result<bool, Self::Error> {
        match expr {
            Expr::MatrixSelector(m) => {
                m.range = self.scale.window(m.range);
                compress_offset(&mut m.vs.offset, self.scale);
            }
            Expr::VectorSelector(vs) => compress_offset(&mut vs.offset, self.scale),
            Expr::Subquery(s) => {
                s.range = self.scale.window(s.range);
                if let Some(step) = s.step.as_mut() {
                    *step = whole_millis(self.scale.wait(*step)).max(self.scale.scrape_interval());
                }
                compress_offset(&mut s.offset, self.scale);
            }
            _ => {}
        }
        Ok(true)
    }
}

fn compress_offset(offset: &mut Option<promql_parser::parser::Offset>, scale: TimeScale) {
    use promql_parser::parser::Offset;
    if let Some(o) = offset.as_mut() {
        *o = match o {
            Offset::Pos(d) => Offset::Pos(scale.window(*d)),
            Offset::Neg(d) => Offset::Neg(scale.window(*d)),
        };
    }
}

/// Rounded to whole milliseconds (at least 1 ms when not zero), the resolution of Prometheus'
/// durations.
fn whole_millis(d: Duration) -> Duration {
    if d.is_zero() {
        return d;
    }
    Duration::from_millis((d.as_secs_f64() * 1000.0).round().max(1.0) as u64)
}

fn duration_value(v: &Value, origin: &str) -> Result<Duration> {
    let text = v
        .as_str()
        .ok_or_else(|| Error::Other(format!("{origin}: duration {v:?} is not a string")))?;
    parse_duration(text).map_err(|e| Error::Other(format!("{origin}: {e}")))
}

/// `90s`, `2m`, `500ms`: Prometheus' duration syntax.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let t = text.trim();
    if t.trim_start_matches('0').is_empty() || ["0s", "0ms", "0m", "0h"].contains(&t) {
        return Ok(Duration::ZERO);
    }
    promql_parser::util::parse_duration(t).map_err(|e| format!("bad duration {text:?}: {e}"))
}

/// Prometheus' duration syntax: `1m30s`, `4s`, `250ms`.
pub fn format_duration(d: Duration) -> String {
    promql_parser::util::display_duration(&d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(k: f64) -> TimeScale {
        TimeScale::new(k).unwrap()
    }

    #[test]
    fn intervals_windows_and_holds_shrink_by_k_down_to_their_floors() {
        assert_eq!(TimeScale::REAL.scrape_interval(), Duration::from_secs(15));
        assert_eq!(k(15.0).scrape_interval(), Duration::from_secs(1));
        assert_eq!(k(30.0).scrape_interval(), Duration::from_millis(500));
        assert_eq!(k(100.0).scrape_interval(), Duration::from_millis(500));
        assert_eq!(
            k(30.0).window(Duration::from_secs(60)),
            Duration::from_secs(2)
        );
        assert_eq!(
            k(60.0).window(Duration::from_secs(60)),
            Duration::from_secs(2)
        );
        assert_eq!(k(5.0).scrape_interval(), Duration::from_secs(3));
        assert_eq!(
            k(15.0).window(Duration::from_secs(60)),
            Duration::from_secs(4)
        );
        assert_eq!(
            k(15.0).window(Duration::from_secs(300)),
            Duration::from_secs(20)
        );
        assert_eq!(
            k(15.0).hold(Duration::from_secs(120)),
            Duration::from_secs(8)
        );
        assert_eq!(
            k(120.0).hold(Duration::from_secs(120)),
            Duration::from_secs(1)
        );
        assert_eq!(
            TimeScale::REAL.window(Duration::from_secs(60)),
            Duration::from_secs(60)
        );
        assert!(TimeScale::new(0.5).is_err());
        assert!(TimeScale::new(f64::NAN).is_err());
    }

    #[test]
    fn promql_windows_are_rewritten_in_the_ast_and_nothing_else_changes() {
        let q = "sum by (namespace, policy) (rate(openclaw_requests_total{job=\"openclaw-limiter\"}[1m])) \
                 / max(avg_over_time(up[5m:30s] offset 2m))";
        let out = k(15.0).promql(q).unwrap();
        assert!(
            out.contains("openclaw_requests_total{job=\"openclaw-limiter\"}[4s]"),
            "{out}"
        );
        assert!(out.contains("[20s:2s]"), "{out}");
        assert!(out.contains("offset 8s"), "{out}");
        assert!(out.contains("by (namespace, policy)"), "{out}");
        // The output parses, and a real-time pass keeps the windows.
        parser::parse(&out).unwrap();
        assert!(TimeScale::REAL.promql(q).unwrap().contains("[1m]"));
    }

    #[test]
    fn a_rule_file_keeps_its_alerts_and_annotations_with_shorter_for_and_windows() {
        let yaml = "groups:\n  - name: g\n    rules:\n      - record: r:rate1m\n        expr: |\n          sum(rate(x[1m]))\n      - alert: A\n        expr: r:rate1m > 0.7\n        for: 2m\n        labels:\n          severity: warning\n        annotations:\n          summary: '{{ $value }} above 70%'\n";
        let out = k(15.0).rule_file(yaml, "t.yaml").unwrap();
        let doc: Value = serde_norway::from_str(&out).unwrap();
        let rules = &doc["groups"][0]["rules"];
        assert_eq!(rules[0]["expr"].as_str().unwrap(), "sum(rate(x[4s]))");
        assert_eq!(rules[1]["for"].as_str().unwrap(), "8s");
        assert_eq!(
            rules[1]["annotations"]["summary"].as_str().unwrap(),
            "{{ $value }} above 70%"
        );
    }

    #[test]
    fn the_adapter_config_gets_compressed_windows_and_cache_ttl() {
        let yaml = "defaults:\n  timeout: 2s\n  cache_ttl: 5s\nrules:\n  - name: m\n    query: sum(rate(a[1m])) / sum(b)\n    selectable_labels: [policy]\n";
        let out = k(10.0).adapter_config(yaml, "a.yaml").unwrap();
        let doc: Value = serde_norway::from_str(&out).unwrap();
        assert_eq!(doc["defaults"]["timeout"].as_str().unwrap(), "2s");
        assert_eq!(doc["defaults"]["cache_ttl"].as_str().unwrap(), "500ms");
        assert_eq!(
            doc["rules"][0]["query"].as_str().unwrap(),
            "sum(rate(a[6s])) / sum(b)"
        );
    }
}
