//! Named rate-limit policies: what a bucket holds and how fast it refills, per policy and per key.
//!
//! The `default` policy comes from `BUCKET_CAPACITY` / `REFILL_INTERVAL_MS` (the operations
//! guide's variables). A YAML file (`OPENCLAW_POLICIES`) adds named policies and per-key
//! overrides. Loading validates everything and reports every problem at once, with its path in
//! the file, so one run of the service (or `--check-policies`) shows an SRE all of them.
//!
//! ```yaml
//! policies:
//!   default:                      # replaces the env-var default when present
//!     capacity: 1000
//!     refill_interval_ms: 1000
//!   search:
//!     capacity: 50
//!     refill_interval_ms: 1000
//!     mode: strict                # shared (default) | strict
//!     overrides:
//!       partner-42: { capacity: 500, refill_interval_ms: 1000 }
//!   api-daily:
//!     capacity: 1000
//!     unit: day                   # instead of refill_interval_ms: second .. year (UNITS)
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use compact_str::CompactString;
use serde_norway::Value;

use crate::bucket::{MAX_CAPACITY, MAX_INTERVAL_MS, Rate};
use crate::store::PolicyId;

/// Name of the policy used when a request names none.
pub const DEFAULT_POLICY: &str = "default";
/// Longest policy name accepted (names become metric label values).
pub const MAX_POLICY_NAME_BYTES: usize = 63;
/// At most this many policies: every policy adds labelled series to `/metrics`.
pub const MAX_POLICIES: usize = 256;
/// The names a policy's `unit` may take instead of `refill_interval_ms`, and their length in
/// milliseconds (envoyproxy/ratelimit's; shared with the rules' clients through
/// `openclaw-common`).
pub use openclaw_common::UNITS;

/// How replicas share a policy's limit. On one replica both are the textbook token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every replica decides from its merged view; may overshoot while deltas are in flight.
    Shared,
    /// Every replica decides from its own share of capacity and refill; never overshoots.
    Strict,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::Strict => "strict",
        }
    }
}

/// One named policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub id: PolicyId,
    pub name: String,
    pub rate: Rate,
    pub mode: Mode,
    overrides: HashMap<CompactString, Rate, foldhash::fast::RandomState>,
    /// Registered by another part of the limiter (Envoy's rate limit service, `crate::rls`),
    /// not by the policies file: a reload of the file keeps it.
    pub internal: bool,
}

impl Policy {
    /// The rate for `key`: its override if it has one, else the policy's.
    #[inline]
    pub fn rate_for(&self, key: &str) -> Rate {
        if self.overrides.is_empty() {
            return self.rate;
        }
        self.overrides.get(key).copied().unwrap_or(self.rate)
    }

    /// The largest capacity any key of this policy has.
    pub fn max_capacity(&self) -> u64 {
        self.overrides
            .values()
            .map(Rate::capacity)
            .fold(self.rate.capacity(), u64::max)
    }

    pub fn overrides(&self) -> impl Iterator<Item = (&str, Rate)> {
        self.overrides.iter().map(|(k, r)| (k.as_str(), *r))
    }
}

/// A policy registered by another part of the limiter than the policies file (Envoy's rate
/// limit service: one per rule, `crate::rls`). Its name contains a `:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalPolicy {
    pub name: String,
    pub rate: Rate,
    pub mode: Mode,
}

/// Gives each policy name a number that stays the same across reloads, so buckets survive a
/// reload that keeps their policy.
#[derive(Debug, Default)]
pub struct PolicyIds {
    ids: Mutex<HashMap<String, PolicyId>>,
}

impl PolicyIds {
    pub fn id_of(&self, name: &str) -> PolicyId {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let next = PolicyId(ids.len() as u32);
        *ids.entry(name.to_owned()).or_insert(next)
    }
}

/// Every policy in force, looked up by name on each request.
#[derive(Debug, Clone)]
pub struct PolicySet {
    policies: Vec<Arc<Policy>>,
    by_name: HashMap<String, usize, foldhash::fast::RandomState>,
    /// Index into `policies` by [`PolicyId`]: ids are small and dense.
    by_id: Vec<Option<usize>>,
}

impl PolicySet {
    #[inline]
    pub fn get(&self, name: &str) -> Option<&Arc<Policy>> {
        self.by_name.get(name).map(|&i| &self.policies[i])
    }

    #[inline]
    pub fn by_id(&self, id: PolicyId) -> Option<&Arc<Policy>> {
        let index = (*self.by_id.get(id.0 as usize)?)?;
        Some(&self.policies[index])
    }

    /// Policies sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.policies.iter()
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Only the `default` policy, from the environment.
    pub fn single(default: Rate, ids: &PolicyIds) -> Self {
        Self::from_specs(
            vec![(
                DEFAULT_POLICY.to_owned(),
                default,
                Mode::Shared,
                HashMap::default(),
            )],
            ids,
        )
    }

    /// Parse and validate a policies file. `default` is the env-var default policy, used unless
    /// the file defines its own. Every problem is returned, each naming its place in the file.
    pub fn from_yaml(text: &str, default: Rate, ids: &PolicyIds) -> Result<Self, PolicyErrors> {
        let mut errors = Vec::new();
        let document: Value = match serde_norway::from_str(text) {
            Ok(value) => value,
            Err(e) => return Err(PolicyErrors(vec![format!("not valid YAML: {e}")])),
        };
        let mut specs = Vec::new();
        match &document {
            Value::Mapping(root) => {
                for (field, _) in root.iter() {
                    if field.as_str() != Some("policies") {
                        errors.push(format!(
                            "{}: unknown field (expected `policies`)",
                            path_part(field)
                        ));
                    }
                }
                match root.get("policies") {
                    Some(Value::Mapping(policies)) => {
                        for (name, spec) in policies {
                            if let Some(policy) = parse_policy(name, spec, &mut errors) {
                                specs.push(policy);
                            }
                        }
                    }
                    Some(Value::Null) | None => {
                        errors.push("policies: missing (a map of policy name to policy)".into())
                    }
                    Some(other) => errors.push(format!(
                        "policies: expected a map of policy name to policy, got {}",
                        kind(other)
                    )),
                }
            }
            Value::Null => errors.push("the file is empty (expected `policies:`)".into()),
            other => errors.push(format!(
                "expected a map with `policies:`, got {}",
                kind(other)
            )),
        }
        if specs.len() > MAX_POLICIES {
            errors.push(format!(
                "policies: {} defined, at most {MAX_POLICIES} allowed",
                specs.len()
            ));
        }
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        if !specs.iter().any(|(name, ..)| name == DEFAULT_POLICY) {
            specs.push((
                DEFAULT_POLICY.to_owned(),
                default,
                Mode::Shared,
                HashMap::default(),
            ));
        }
        Ok(Self::from_specs(specs, ids))
    }

    /// The same policies from the file, with `internal` in place of the internal policies this
    /// set had. Internal names contain a `:`, which no policy in the file may (see
    /// [`valid_policy_name`]), so the two never collide; and no `/rate` request can name one.
    /// An internal policy has no overrides.
    pub fn with_internal(&self, internal: &[InternalPolicy], ids: &PolicyIds) -> Self {
        let mut policies: Vec<Arc<Policy>> = self
            .policies
            .iter()
            .filter(|p| !p.internal)
            .cloned()
            .collect();
        policies.extend(internal.iter().map(|internal| {
            let name = &internal.name;
            debug_assert!(name.contains(':'), "internal policy names contain a `:`");
            Arc::new(Policy {
                id: ids.id_of(name),
                name: name.clone(),
                rate: internal.rate,
                mode: internal.mode,
                overrides: HashMap::default(),
                internal: true,
            })
        }));
        Self::from_policies(policies)
    }

    fn from_specs(specs: Vec<Spec>, ids: &PolicyIds) -> Self {
        let policies: Vec<Arc<Policy>> = specs
            .into_iter()
            .map(|(name, rate, mode, overrides)| {
                Arc::new(Policy {
                    id: ids.id_of(&name),
                    name,
                    rate,
                    mode,
                    overrides,
                    internal: false,
                })
            })
            .collect();
        Self::from_policies(policies)
    }

    fn from_policies(mut policies: Vec<Arc<Policy>>) -> Self {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        let by_name = policies
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        let mut by_id = Vec::new();
        for (i, policy) in policies.iter().enumerate() {
            let slot = policy.id.0 as usize;
            if by_id.len() <= slot {
                by_id.resize(slot + 1, None);
            }
            by_id[slot] = Some(i);
        }
        Self {
            policies,
            by_name,
            by_id,
        }
    }
}

type Spec = (
    String,
    Rate,
    Mode,
    HashMap<CompactString, Rate, foldhash::fast::RandomState>,
);

/// Every problem found in a policies file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<String>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} problem{}:", if n == 1 { "" } else { "s" })?;
        for error in &self.0 {
            write!(f, "\n  - {error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// Whether `name` may name a policy: it becomes a Prometheus label value and a JSON string.
pub fn valid_policy_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_POLICY_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn parse_policy(name: &Value, spec: &Value, errors: &mut Vec<String>) -> Option<Spec> {
    let Some(name) = name.as_str() else {
        errors.push(format!(
            "policies: policy names must be strings, got {}",
            show(name)
        ));
        return None;
    };
    let at = format!("policies.{name}");
    let before = errors.len();
    if !valid_policy_name(name) {
        errors.push(format!(
            "{at}: invalid name (1 to {MAX_POLICY_NAME_BYTES} of A-Z a-z 0-9 - _ .)"
        ));
    }
    let Value::Mapping(fields) = spec else {
        errors.push(format!(
            "{at}: expected a map with capacity and refill_interval_ms, got {}",
            kind(spec)
        ));
        return None;
    };
    for (field, _) in fields {
        if !matches!(
            field.as_str(),
            Some("capacity" | "refill_interval_ms" | "unit" | "mode" | "overrides")
        ) {
            errors.push(format!(
                "{at}.{}: unknown field (expected capacity, refill_interval_ms or unit, mode, overrides)",
                path_part(field)
            ));
        }
    }
    let rate = parse_rate(&at, spec, errors);
    let mode = match fields.get("mode") {
        None => Some(Mode::Shared),
        Some(v) => match v.as_str() {
            Some("shared") => Some(Mode::Shared),
            Some("strict") => Some(Mode::Strict),
            _ => {
                errors.push(format!(
                    "{at}.mode: expected `shared` or `strict`, got {}",
                    show(v)
                ));
                None
            }
        },
    };
    let mut overrides = HashMap::default();
    match fields.get("overrides") {
        None | Some(Value::Null) => {}
        Some(Value::Mapping(entries)) => {
            for (key, value) in entries {
                let Some(key) = key.as_str() else {
                    errors.push(format!(
                        "{at}.overrides: keys must be strings, got {}",
                        show(key)
                    ));
                    continue;
                };
                let key_at = format!("{at}.overrides.{key}");
                if key.is_empty() || key.len() > crate::http::MAX_KEY_BYTES {
                    errors.push(format!(
                        "{key_at}: a client key must be 1 to {} bytes",
                        crate::http::MAX_KEY_BYTES
                    ));
                }
                match value {
                    Value::Mapping(fields) => {
                        for (field, _) in fields {
                            if !matches!(
                                field.as_str(),
                                Some("capacity" | "refill_interval_ms" | "unit")
                            ) {
                                errors.push(format!(
                                    "{key_at}.{}: unknown field (expected capacity, refill_interval_ms or unit)",
                                    path_part(field)
                                ));
                            }
                        }
                        if let Some(rate) = parse_rate(&key_at, value, errors) {
                            overrides.insert(CompactString::from(key), rate);
                        }
                    }
                    other => errors.push(format!(
                        "{key_at}: expected a map with capacity and refill_interval_ms, got {}",
                        kind(other)
                    )),
                }
            }
        }
        Some(other) => errors.push(format!(
            "{at}.overrides: expected a map of client key to limits, got {}",
            kind(other)
        )),
    }
    if errors.len() > before {
        return None;
    }
    Some((name.to_owned(), rate?, mode?, overrides))
}

fn parse_rate(at: &str, spec: &Value, errors: &mut Vec<String>) -> Option<Rate> {
    let capacity = whole_number(
        at,
        "capacity",
        spec.get("capacity"),
        1,
        MAX_CAPACITY,
        errors,
    );
    let interval = match (spec.get("refill_interval_ms"), spec.get("unit")) {
        (Some(_), Some(_)) => {
            errors.push(format!(
                "{at}: refill_interval_ms and unit both set (give one)"
            ));
            None
        }
        (None, Some(unit)) => {
            let ms = unit
                .as_str()
                .and_then(|name| UNITS.iter().find(|(n, _)| *n == name))
                .map(|&(_, ms)| ms);
            if ms.is_none() {
                errors.push(format!(
                    "{at}.unit: expected one of {}, got {}",
                    unit_names(),
                    show(unit)
                ));
            }
            ms
        }
        (Some(interval), None) => whole_number(
            at,
            "refill_interval_ms",
            Some(interval),
            1,
            MAX_INTERVAL_MS,
            errors,
        ),
        (None, None) => {
            errors.push(format!(
                "{at}.refill_interval_ms: missing (a whole number from 1 to {MAX_INTERVAL_MS}, or a `unit`: {})",
                unit_names()
            ));
            None
        }
    };
    Rate::try_new(capacity?, interval?).ok()
}

fn unit_names() -> String {
    let names: Vec<&str> = UNITS.iter().map(|&(name, _)| name).collect();
    names.join(", ")
}

fn whole_number(
    at: &str,
    field: &str,
    value: Option<&Value>,
    min: u64,
    max: u64,
    errors: &mut Vec<String>,
) -> Option<u64> {
    match value {
        None => errors.push(format!(
            "{at}.{field}: missing (a whole number from {min} to {max})"
        )),
        Some(v) => match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => return Some(n),
            _ => errors.push(format!(
                "{at}.{field}: must be a whole number from {min} to {max}, got {}",
                show(v)
            )),
        },
    }
    None
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a map",
        Value::Tagged(_) => "a tagged value",
    }
}

/// A map key as it appears in an error's path.
fn path_part(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => show(other),
    }
}

fn show(value: &Value) -> String {
    match value {
        Value::String(s) => format!("`{s}`"),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => kind(other).to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_rate() -> Rate {
        Rate::try_new(1000, 1000).unwrap()
    }

    fn load(text: &str) -> Result<PolicySet, PolicyErrors> {
        PolicySet::from_yaml(text, default_rate(), &PolicyIds::default())
    }

    #[test]
    fn file_adds_policies_and_keeps_the_env_default() {
        let set = load(
            "policies:\n  search:\n    capacity: 50\n    refill_interval_ms: 2000\n    mode: strict\n    overrides:\n      partner-42: { capacity: 500, refill_interval_ms: 1000 }\n",
        )
        .unwrap();
        assert_eq!(set.len(), 2);
        let search = set.get("search").unwrap();
        assert_eq!(search.rate, Rate::try_new(50, 2000).unwrap());
        assert_eq!(search.mode, Mode::Strict);
        assert_eq!(
            search.rate_for("partner-42"),
            Rate::try_new(500, 1000).unwrap()
        );
        assert_eq!(search.rate_for("someone-else"), search.rate);
        assert_eq!(search.max_capacity(), 500);
        assert_eq!(set.get(DEFAULT_POLICY).unwrap().rate, default_rate());
    }

    #[test]
    fn file_may_replace_the_default_policy() {
        let set = load("policies:\n  default: { capacity: 5, refill_interval_ms: 10 }\n").unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(
            set.get(DEFAULT_POLICY).unwrap().rate,
            Rate::try_new(5, 10).unwrap()
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_place() {
        let errors = load(
            "policies:\n  search:\n    capacity: 0\n    refill_interval_ms: 1.5\n    mode: eventual\n  'bad name!':\n    capacity: 10\n    refill_interval_ms: 10\n    burst: 3\n  api:\n    overrides:\n      k: { capacity: -1, refill_interval_ms: 10 }\nextra: true\n",
        )
        .unwrap_err();
        let text = errors.to_string();
        for expected in [
            "extra: unknown field",
            "policies.search.capacity: must be a whole number from 1 to 1000000000, got 0",
            "policies.search.refill_interval_ms: must be a whole number from 1 to 31622400000, got 1.5",
            "policies.search.mode: expected `shared` or `strict`, got `eventual`",
            "policies.bad name!: invalid name",
            "policies.bad name!.burst: unknown field",
            "policies.api.capacity: missing",
            "policies.api.refill_interval_ms: missing",
            "policies.api.overrides.k.capacity: must be a whole number from 1 to 1000000000, got -1",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert_eq!(errors.0.len(), 9, "{text}");
    }

    #[test]
    fn malformed_yaml_and_wrong_shapes_are_errors_not_panics() {
        for text in [
            "",
            "policies: [1, 2]",
            "- a\n- b",
            "policies:\n  x: 3\n",
            ": : :",
            "policies:\n  x: {capacity: 1, refill_interval_ms: 1}\n  x: {capacity: 2, refill_interval_ms: 1}\n",
        ] {
            assert!(load(text).is_err(), "{text:?} should be rejected");
        }
    }

    #[test]
    fn a_policy_may_refill_over_a_day_a_year_or_the_longest_interval() {
        let set = load(&format!(
            "policies:\n  daily: {{capacity: 1000, refill_interval_ms: 86400000}}\n  yearly: {{capacity: 1000000000, refill_interval_ms: 31536000000}}\n  longest: {{capacity: 1000000000, refill_interval_ms: {MAX_INTERVAL_MS}}}\n"
        ))
        .unwrap();
        assert_eq!(set.get("daily").unwrap().rate.interval_ms(), 86_400_000);
        assert_eq!(
            set.get("yearly").unwrap().rate,
            Rate::try_new(MAX_CAPACITY, 365 * 86_400_000).unwrap()
        );
        assert_eq!(
            set.get("longest").unwrap().rate.interval_ms(),
            MAX_INTERVAL_MS
        );
        let errors = load(&format!(
            "policies:\n  x: {{capacity: 1, refill_interval_ms: {}}}\n",
            MAX_INTERVAL_MS + 1
        ))
        .unwrap_err();
        assert!(
            errors.0[0].contains("must be a whole number from 1 to 31622400000"),
            "{errors}"
        );
    }

    #[test]
    fn a_unit_names_envoy_ratelimits_lengths_instead_of_milliseconds() {
        let set = load(
            "policies:\n  api:\n    capacity: 1000\n    unit: day\n    overrides:\n      partner: {capacity: 5, unit: year}\n",
        )
        .unwrap();
        let api = set.get("api").unwrap();
        assert_eq!(api.rate, Rate::try_new(1000, 86_400_000).unwrap());
        assert_eq!(
            api.rate_for("partner"),
            Rate::try_new(5, 365 * 86_400_000).unwrap()
        );
        for (unit, seconds) in [
            ("second", 1),
            ("minute", 60),
            ("hour", 3_600),
            ("day", 86_400),
            ("week", 604_800),
            ("month", 2_592_000),
            ("year", 31_536_000),
        ] {
            let set = load(&format!("policies:\n  p: {{capacity: 1, unit: {unit}}}\n")).unwrap();
            assert_eq!(set.get("p").unwrap().rate.interval_ms(), seconds * 1000);
        }
    }

    #[test]
    fn an_unknown_or_doubled_unit_is_an_error_with_its_place() {
        let errors = load(
            "policies:\n  a: {capacity: 1, unit: fortnight}\n  b: {capacity: 1, unit: day, refill_interval_ms: 1000}\n  c: {capacity: 1, unit: 7}\n  d: {capacity: 1}\n",
        )
        .unwrap_err();
        let text = errors.to_string();
        for expected in [
            "policies.a.unit: expected one of second, minute, hour, day, week, month, year, got `fortnight`",
            "policies.b: refill_interval_ms and unit both set",
            "policies.c.unit: expected one of",
            "policies.d.refill_interval_ms: missing (a whole number from 1 to 31622400000, or a `unit`",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert_eq!(errors.0.len(), 4, "{text}");
    }

    #[test]
    fn policy_ids_survive_a_reload() {
        let ids = PolicyIds::default();
        let first = PolicySet::from_yaml(
            "policies:\n  b: {capacity: 1, refill_interval_ms: 1}\n",
            default_rate(),
            &ids,
        )
        .unwrap();
        let second = PolicySet::from_yaml("policies:\n  a: {capacity: 1, refill_interval_ms: 1}\n  b: {capacity: 2, refill_interval_ms: 1}\n", default_rate(), &ids).unwrap();
        assert_eq!(first.get("b").unwrap().id, second.get("b").unwrap().id);
        assert_ne!(second.get("a").unwrap().id, second.get("b").unwrap().id);
    }
}
