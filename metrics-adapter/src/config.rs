//! The rules file: which external metrics exist and the PromQL behind each.
//!
//! Loading reads everything, checks everything and reports every problem at once, each with
//! the rule's name and a `file:line:column` position, so a typo is caught by `check-config` (or
//! at reload, where the last good config stays in force) and never served. Unknown keys are
//! errors: a misspelt `on_emtpy` must not silently fall back to a default.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;

use crate::promql::Query;
use crate::quantity::Decimal;
use crate::{Error, Result};

/// The configuration compiled into the binary, used when `--config` is not given.
pub const DEFAULT_YAML: &str = include_str!("../config/default.yaml");

/// Bounds on per-rule settings, so a typo like `timeout: 2h` is caught.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_CACHE_TTL: Duration = Duration::from_secs(3600);

/// What to serve when the query returns no series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnEmpty {
    /// A 404 `NotFound` Status naming the final PromQL (the HPA then holds scale-down). Default.
    Error,
    /// `items: []` (what the Go adapters do; the HPA treats it as an error too).
    Empty,
    /// One item with this value (e.g. 0 when absence truly means zero).
    Value(Decimal),
}

/// What to do with NaN or ±Inf samples (they are never served as such).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnNan {
    /// Drop those series; if none is left, `on_empty` applies. Default.
    Skip,
    /// A 500 Status naming the final PromQL.
    Error,
    /// Replace the value with this one.
    Value(Decimal),
}

/// How several series become items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesPolicy {
    /// One item: the exact sum. Its labels are those all series share. Default.
    Sum,
    /// One item: the largest series, with its labels.
    Max,
    /// One item per series, with its labels (the HPA sums them; kubectl shows each).
    PerSeries,
}

/// One external metric, ready to serve.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub description: String,
    pub query: Query,
    pub on_empty: OnEmpty,
    pub on_nan: OnNan,
    pub series: SeriesPolicy,
    /// Bound on the whole Prometheus round trip, waiting for a query slot included.
    pub timeout: Duration,
    /// How long an answer is reused; zero disables the cache (concurrent calls still share one
    /// query).
    pub cache_ttl: Duration,
    /// The `window` reported with each item (the query's longest range unless configured).
    pub window: Option<Duration>,
    /// Labels an HPA selector may constrain. Any other key is a 400, never silently ignored.
    pub selectable_labels: BTreeSet<String>,
    /// When set, `LABEL="<request namespace>"` is injected into every vector selector.
    pub namespace_label: Option<String>,
}

impl Rule {
    /// The labels a selector may constrain, for messages: `a, b` or `none`.
    pub fn selectable_labels_text(&self) -> String {
        if self.selectable_labels.is_empty() {
            "none".to_owned()
        } else {
            let labels: Vec<&str> = self.selectable_labels.iter().map(String::as_str).collect();
            labels.join(", ")
        }
    }
}

/// A complete, valid configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub rules: BTreeMap<String, Arc<Rule>>,
}

impl Config {
    /// Parses and validates `text`; `origin` names the file in messages.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config> {
        let mut errors = Vec::new();
        let top: RawTop = match serde_norway::from_str(text) {
            Ok(top) => top,
            Err(e) => {
                let at = e
                    .location()
                    .map(|l| format!("{origin}:{}:{}", l.line(), l.column()))
                    .unwrap_or_else(|| origin.to_owned());
                return Err(Error::Config(vec![format!("{at}: {e}")]));
            }
        };
        let locator = Locator { text, origin };

        let defaults: RawDefaults = match top.defaults {
            None => RawDefaults::default(),
            Some(v) => match serde_norway::from_value(v) {
                Ok(d) => d,
                Err(e) => {
                    errors.push(format!(
                        "{}: defaults: {e}",
                        locator.key_position("defaults")
                    ));
                    RawDefaults::default()
                }
            },
        };
        let base = Settings::from_defaults(&defaults, &locator, &mut errors);

        if top.rules.is_empty() {
            errors.push(format!(
                "{}: no rules: at least one external metric must be configured (an empty \
                 discovery list makes clients warn and the HPA has nothing to read)",
                locator.key_position("rules")
            ));
        }

        let mut rules = BTreeMap::new();
        for (index, value) in top.rules.into_iter().enumerate() {
            let raw: RawRule = match serde_norway::from_value(value.clone()) {
                Ok(r) => r,
                Err(e) => {
                    let name = value.get("name").and_then(|n| n.as_str()).unwrap_or("");
                    errors.push(format!(
                        "{}: rule {}: {e}",
                        locator.rule_position(index, name),
                        describe(index, name)
                    ));
                    continue;
                }
            };
            let before = errors.len();
            let rule = compile_rule(index, raw, &base, &locator, &mut errors);
            if let Some(rule) = rule {
                if rules.contains_key(&rule.name) {
                    errors.push(format!(
                        "{}: rule {}: duplicate name; each external metric must be defined once",
                        locator.rule_position(index, &rule.name),
                        describe(index, &rule.name)
                    ));
                } else if errors.len() == before {
                    rules.insert(rule.name.clone(), Arc::new(rule));
                }
            }
        }
        if errors.is_empty() {
            Ok(Config { rules })
        } else {
            Err(Error::Config(errors))
        }
    }

    /// Reads and validates a file.
    pub fn from_file(path: &std::path::Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_yaml(&text, &path.display().to_string())
    }

    /// The embedded default configuration.
    pub fn embedded_default() -> Config {
        Config::from_yaml(DEFAULT_YAML, "config/default.yaml (embedded)")
            .expect("the embedded default config is valid (a unit test checks it)")
    }

    pub fn rule(&self, name: &str) -> Option<&Arc<Rule>> {
        self.rules.get(name)
    }

    /// Comma-separated rule names, for messages.
    pub fn names(&self) -> String {
        self.rules.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// The live configuration, swapped whole on a successful reload.
#[derive(Debug, Clone)]
pub struct ConfigStore {
    current: Arc<RwLock<Arc<Config>>>,
}

impl ConfigStore {
    pub fn new(config: Config) -> Self {
        ConfigStore {
            current: Arc::new(RwLock::new(Arc::new(config))),
        }
    }

    /// The config in force (cheap: an `Arc` clone under a short read lock).
    pub fn get(&self) -> Arc<Config> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn replace(&self, config: Config) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
    }
}

fn describe(index: usize, name: &str) -> String {
    if name.is_empty() {
        format!("#{}", index + 1)
    } else {
        format!("{name:?}")
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTop {
    #[serde(default)]
    defaults: Option<serde_norway::Value>,
    #[serde(default)]
    rules: Vec<serde_norway::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    timeout: Option<String>,
    cache_ttl: Option<String>,
    on_empty: Option<serde_norway::Value>,
    on_nan: Option<serde_norway::Value>,
    series: Option<RawSeries>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    query: String,
    #[serde(default)]
    description: String,
    timeout: Option<String>,
    cache_ttl: Option<String>,
    window: Option<String>,
    on_empty: Option<serde_norway::Value>,
    on_nan: Option<serde_norway::Value>,
    series: Option<RawSeries>,
    #[serde(default)]
    selectable_labels: Vec<String>,
    namespace_label: Option<String>,
}

/// `on_empty` / `on_nan`: one of `words`, or `{value: NUMBER}`.
fn policy_value(
    v: &serde_norway::Value,
    words: &[&'static str],
) -> std::result::Result<PolicyValue, String> {
    let expected = format!("expected one of {} or {{value: NUMBER}}", words.join(", "));
    match v {
        serde_norway::Value::String(s) => words
            .iter()
            .find(|w| **w == s.as_str())
            .map(|w| PolicyValue::Word(w))
            .ok_or_else(|| format!("{s:?}: {expected}")),
        serde_norway::Value::Mapping(m) => {
            if m.len() != 1 {
                return Err(expected);
            }
            let n = m.get("value").ok_or_else(|| expected.clone())?;
            let x = n
                .as_f64()
                .ok_or_else(|| format!("value {n:?} is not a number"))?;
            let d = Decimal::from_f64(x).map_err(|e| e.to_string())?;
            d.to_milli().map_err(|e| e.to_string())?;
            Ok(PolicyValue::Value(d))
        }
        other => Err(format!("{other:?}: {expected}")),
    }
}

enum PolicyValue {
    Word(&'static str),
    Value(Decimal),
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawSeries {
    Sum,
    Max,
    PerSeries,
}

/// Settings a rule inherits from `defaults`.
#[derive(Debug, Clone, Copy)]
struct Settings {
    timeout: Duration,
    cache_ttl: Duration,
    on_empty: OnEmpty,
    on_nan: OnNan,
    series: SeriesPolicy,
}

impl Settings {
    fn from_defaults(d: &RawDefaults, loc: &Locator<'_>, errors: &mut Vec<String>) -> Settings {
        let mut s = Settings {
            timeout: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(5),
            on_empty: OnEmpty::Error,
            on_nan: OnNan::Skip,
            series: SeriesPolicy::Sum,
        };
        let at = loc.key_position("defaults");
        s.apply(
            d.timeout.as_deref(),
            d.cache_ttl.as_deref(),
            d.on_empty.as_ref(),
            d.on_nan.as_ref(),
            d.series,
            &|msg| format!("{at}: defaults: {msg}"),
            errors,
        );
        s
    }

    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        timeout: Option<&str>,
        cache_ttl: Option<&str>,
        on_empty: Option<&serde_norway::Value>,
        on_nan: Option<&serde_norway::Value>,
        series: Option<RawSeries>,
        err: &dyn Fn(String) -> String,
        errors: &mut Vec<String>,
    ) {
        if let Some(t) = timeout {
            match parse_duration(t) {
                Ok(d) if d.is_zero() || d > MAX_TIMEOUT => errors.push(err(format!(
                    "timeout {t:?} must be above 0 and at most {MAX_TIMEOUT:?}"
                ))),
                Ok(d) => self.timeout = d,
                Err(e) => errors.push(err(format!("timeout: {e}"))),
            }
        }
        if let Some(t) = cache_ttl {
            match parse_duration(t) {
                Ok(d) if d > MAX_CACHE_TTL => errors.push(err(format!(
                    "cache_ttl {t:?} must be at most {MAX_CACHE_TTL:?}"
                ))),
                Ok(d) => self.cache_ttl = d,
                Err(e) => errors.push(err(format!("cache_ttl: {e}"))),
            }
        }
        if let Some(v) = on_empty {
            match policy_value(v, &["error", "empty"]) {
                Ok(PolicyValue::Word("empty")) => self.on_empty = OnEmpty::Empty,
                Ok(PolicyValue::Word(_)) => self.on_empty = OnEmpty::Error,
                Ok(PolicyValue::Value(d)) => self.on_empty = OnEmpty::Value(d),
                Err(e) => errors.push(err(format!("on_empty: {e}"))),
            }
        }
        if let Some(v) = on_nan {
            match policy_value(v, &["skip", "error"]) {
                Ok(PolicyValue::Word("error")) => self.on_nan = OnNan::Error,
                Ok(PolicyValue::Word(_)) => self.on_nan = OnNan::Skip,
                Ok(PolicyValue::Value(d)) => self.on_nan = OnNan::Value(d),
                Err(e) => errors.push(err(format!("on_nan: {e}"))),
            }
        }
        if let Some(s) = series {
            self.series = match s {
                RawSeries::Sum => SeriesPolicy::Sum,
                RawSeries::Max => SeriesPolicy::Max,
                RawSeries::PerSeries => SeriesPolicy::PerSeries,
            };
        }
    }
}

fn compile_rule(
    index: usize,
    raw: RawRule,
    base: &Settings,
    loc: &Locator<'_>,
    errors: &mut Vec<String>,
) -> Option<Rule> {
    let at = loc.rule_position(index, &raw.name);
    let who = describe(index, &raw.name);
    let err = |msg: String| format!("{at}: rule {who}: {msg}");
    let start = errors.len();

    if !valid_metric_name(&raw.name) {
        errors.push(err(format!(
            "name {:?} is not a valid external metric name: use 1-200 characters of [a-z0-9_.-], \
             starting with a letter (it is a URL path segment and a discovery resource name)",
            raw.name
        )));
    }

    let mut settings = *base;
    settings.apply(
        raw.timeout.as_deref(),
        raw.cache_ttl.as_deref(),
        raw.on_empty.as_ref(),
        raw.on_nan.as_ref(),
        raw.series,
        &err,
        errors,
    );

    let query = match Query::parse(&raw.query) {
        Ok(q) => Some(q),
        Err((msg, offset)) => {
            let (qat, _) = loc.query_position(index, &raw.name, &raw.query, offset);
            errors.push(format!("{qat}: rule {who}: query: {msg}"));
            None
        }
    };

    let mut selectable = BTreeSet::new();
    for label in &raw.selectable_labels {
        if !valid_label_name(label) {
            errors.push(err(format!(
                "selectable_labels: {label:?} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)"
            )));
        } else if !selectable.insert(label.clone()) {
            errors.push(err(format!("selectable_labels: {label:?} is listed twice")));
        }
    }
    if let Some(ns) = &raw.namespace_label
        && !valid_label_name(ns)
    {
        errors.push(err(format!(
            "namespace_label: {ns:?} is not a Prometheus label name"
        )));
    }
    if let Some(q) = &query
        && q.selectors == 0
        && (!selectable.is_empty() || raw.namespace_label.is_some())
    {
        errors.push(err(
            "selectable_labels/namespace_label are set but the query has no series \
                         selector to inject them into"
                .to_owned(),
        ));
    }
    let window = match raw.window.as_deref().map(parse_duration) {
        None => query.as_ref().and_then(|q| q.longest_range),
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            errors.push(err(format!("window: {e}")));
            None
        }
    };

    if errors.len() > start {
        return None;
    }
    Some(Rule {
        name: raw.name,
        description: raw.description,
        query: query?,
        on_empty: settings.on_empty,
        on_nan: settings.on_nan,
        series: settings.series,
        timeout: settings.timeout,
        cache_ttl: settings.cache_ttl,
        window,
        selectable_labels: selectable,
        namespace_label: raw.namespace_label,
    })
}

/// `500ms`, `2s`, `1m30s`: PromQL's duration syntax, which SREs already write in queries.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let t = text.trim();
    if !t.is_empty() && ["", "ms", "s", "m", "h"].contains(&t.trim_start_matches('0')) {
        return Ok(Duration::ZERO);
    }
    promql_parser::util::parse_duration(t)
        .map_err(|e| format!("{text:?} is not a duration like 500ms, 2s or 1m ({e})"))
}

fn valid_metric_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 200
        && b[0].is_ascii_lowercase()
        && b.iter().all(|&c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-')
        })
}

fn valid_label_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && !name.starts_with("__")
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Finds where things are in the YAML text, for messages. serde values carry no spans, so this
/// looks for the `name:` line of each rule, which is unambiguous for hand-written files.
struct Locator<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Locator<'_> {
    fn line_of(&self, pred: impl Fn(&str) -> bool) -> Option<usize> {
        self.text.lines().position(pred).map(|i| i + 1)
    }

    fn key_position(&self, key: &str) -> String {
        let line = self.line_of(|l| l.starts_with(&format!("{key}:")));
        match line {
            Some(n) => format!("{}:{n}:1", self.origin),
            None => self.origin.to_owned(),
        }
    }

    /// Line of `name: NAME` for this rule, else of the index-th `- ` item under `rules:`.
    fn rule_line(&self, index: usize, name: &str) -> Option<usize> {
        if !name.is_empty() {
            let found = self.line_of(|l| {
                let t = l.trim_start().trim_start_matches("- ").trim_start();
                t.strip_prefix("name:")
                    .is_some_and(|v| v.trim().trim_matches(|c| c == '"' || c == '\'') == name)
            });
            if found.is_some() {
                return found;
            }
        }
        let rules_line = self.line_of(|l| l.starts_with("rules:"))?;
        let mut items = self
            .text
            .lines()
            .enumerate()
            .skip(rules_line)
            .filter(|(_, l)| l.trim_start().starts_with("- "))
            .filter(|(_, l)| l.len() - l.trim_start().len() <= 2);
        items.nth(index).map(|(i, _)| i + 1)
    }

    fn rule_position(&self, index: usize, name: &str) -> String {
        match self.rule_line(index, name) {
            Some(n) => format!("{}:{n}", self.origin),
            None => self.origin.to_owned(),
        }
    }

    /// `file:line:column` of a byte offset inside a rule's query (or of the query key).
    fn query_position(
        &self,
        index: usize,
        name: &str,
        query: &str,
        offset: Option<usize>,
    ) -> (String, Option<(usize, usize)>) {
        let lines: Vec<&str> = self.text.lines().collect();
        let start = self.rule_line(index, name).unwrap_or(1).saturating_sub(1);
        let Some(qline) = (start..lines.len()).find(|&i| {
            let t = lines[i].trim_start().trim_start_matches("- ").trim_start();
            t.starts_with("query:")
        }) else {
            return (self.rule_position(index, name), None);
        };
        let line = lines[qline];
        let after_key = line.find("query:").map(|i| i + "query:".len()).unwrap_or(0);
        let rest = &line[after_key..];
        let value_col = after_key + (rest.len() - rest.trim_start().len());
        let value = rest.trim();
        let offset = offset.unwrap_or(0).min(query.len());
        let (line_no, col) = if value.starts_with('|') || value.starts_with('>') || value.is_empty()
        {
            // Block scalar: the query starts on the next line at its indentation.
            let before = &query[..offset];
            let l = before.matches('\n').count();
            let c = before.rsplit('\n').next().map_or(0, str::len);
            let body = lines.get(qline + 1).copied().unwrap_or("");
            let indent = body.len() - body.trim_start().len();
            (qline + 2 + l, indent + c + 1)
        } else {
            let quote = usize::from(value.starts_with('"') || value.starts_with('\''));
            (qline + 1, value_col + quote + offset + 1)
        };
        (
            format!("{}:{line_no}:{col}", self.origin),
            Some((line_no, col)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(yaml: &str) -> Vec<String> {
        match Config::from_yaml(yaml, "rules.yaml") {
            Err(Error::Config(e)) => e,
            other => panic!("expected config errors, got {other:?}"),
        }
    }

    #[test]
    fn the_embedded_default_config_is_valid_and_serves_both_seed_metrics() {
        let c = Config::from_yaml(DEFAULT_YAML, "default.yaml").unwrap();
        use openclaw_common::metric_names as m;
        let rps = c.rule(m::EXTERNAL_REQUESTS_PER_SECOND).unwrap();
        let depletion = c.rule(m::EXTERNAL_TOKEN_DEPLETION_RATE).unwrap();
        assert!(rps.query.source.contains(m::REQUESTS_TOTAL));
        assert!(depletion.query.source.contains(m::BUCKET_DEPLETION_TOTAL));
        assert!(depletion.query.source.contains(m::REQUESTS_TOTAL));
        assert_eq!(rps.window, Some(Duration::from_secs(60)));
        assert!(rps.selectable_labels.contains("policy"));
    }

    #[test]
    fn a_full_rule_parses_with_every_option() {
        let c = Config::from_yaml(
            r#"
defaults:
  timeout: 3s
  cache_ttl: 0s
rules:
  - name: m1
    query: sum(rate(x[2m]))
    on_empty: {value: 0}
    on_nan: {value: 1.5}
    series: per_series
    timeout: 500ms
    window: 30s
    selectable_labels: [policy, decision]
    namespace_label: namespace
  - name: m2
    query: max(y)
    on_empty: empty
    on_nan: error
    series: max
"#,
            "t",
        )
        .unwrap();
        let m1 = c.rule("m1").unwrap();
        assert_eq!(m1.timeout, Duration::from_millis(500));
        assert_eq!(m1.cache_ttl, Duration::ZERO);
        assert_eq!(m1.on_empty, OnEmpty::Value(Decimal::ZERO));
        assert_eq!(
            m1.on_nan,
            OnNan::Value(Decimal::parse_sample("1.5").unwrap())
        );
        assert_eq!(m1.series, SeriesPolicy::PerSeries);
        assert_eq!(m1.window, Some(Duration::from_secs(30)));
        assert_eq!(m1.namespace_label.as_deref(), Some("namespace"));
        let m2 = c.rule("m2").unwrap();
        assert_eq!(m2.timeout, Duration::from_secs(3));
        assert_eq!(
            (m2.on_empty, m2.on_nan, m2.series),
            (OnEmpty::Empty, OnNan::Error, SeriesPolicy::Max)
        );
        assert_eq!(m2.window, None);
    }

    #[test]
    fn every_error_is_listed_with_rule_name_and_position() {
        let e = errors(
            r#"rules:
  - name: good
    query: sum(rate(x[1m]))
  - name: broken_query
    query: sum(rate(x[1m])
  - name: bad_options
    query: up
    timeout: forever
    selectable_labels: ["bad-label"]
  - name: typo
    query: up
    on_emtpy: error
"#,
        );
        assert_eq!(e.len(), 4, "{e:#?}");
        assert!(
            e[0].starts_with(
                "rules.yaml:5:15: rule \"broken_query\": query: unclosed left parenthesis"
            ),
            "{}",
            e[0]
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("rules.yaml:6: rule \"bad_options\": timeout")),
            "{e:#?}"
        );
        assert!(
            e.iter()
                .any(|m| m.contains("rule \"bad_options\": selectable_labels")),
            "{e:#?}"
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("rules.yaml:10: rule \"typo\"") && m.contains("on_emtpy")),
            "{e:#?}"
        );
    }

    #[test]
    fn block_scalar_queries_report_line_and_column_inside_the_block() {
        let e = errors("rules:\n  - name: m\n    query: |\n      sum(\n        nosuchfn(x))\n");
        assert!(
            e[0].starts_with("rules.yaml:5:9: rule \"m\": query: unknown function"),
            "{e:#?}"
        );
    }

    #[test]
    fn yaml_syntax_errors_carry_a_position() {
        let e = errors("rules:\n  - name: [unclosed\n");
        assert!(e[0].starts_with("rules.yaml:"), "{e:?}");
    }

    #[test]
    fn invalid_files_are_refused_with_a_reason() {
        assert!(errors("rules: []\n")[0].contains("no rules"));
        assert!(errors("").iter().any(|m| m.contains("no rules")));
        assert!(errors("rulez: []\n")[0].contains("unknown field"));
        assert!(
            errors("rules:\n  - name: a\n    query: up\n  - name: a\n    query: up\n")[0]
                .contains("duplicate")
        );
        assert!(
            errors("rules:\n  - name: ../etc\n    query: up\n")[0]
                .contains("not a valid external metric name")
        );
        assert!(errors("rules:\n  - name: UPPER\n    query: up\n")[0].contains("not a valid"));
        assert!(errors("rules:\n  - name: m\n    query: up[5m]\n")[0].contains("instant vector"));
        assert!(
            errors("rules:\n  - name: m\n    query: vector(1)\n    selectable_labels: [a]\n")[0]
                .contains("no series selector")
        );
        assert!(
            errors("rules:\n  - name: m\n    query: up\n    timeout: 0s\n")[0].contains("above 0")
        );
        assert!(
            errors("rules:\n  - name: m\n    query: up\n    on_empty: {value: .nan}\n")[0]
                .contains("on_empty")
        );
        assert!(
            errors("rules:\n  - name: m\n    query: up\n    series: avg\n")[0]
                .contains("unknown variant")
        );
        assert!(
            errors("defaults:\n  timeout: 1y\nrules:\n  - name: m\n    query: up\n")[0]
                .contains("defaults")
        );
        assert!(errors("rules:\n  - query: up\n")[0].contains("missing field `name`"));
    }
}
