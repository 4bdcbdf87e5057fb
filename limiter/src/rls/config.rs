//! Descriptor rules in envoyproxy/ratelimit's own YAML format, read unchanged so that a user
//! migrating keeps their files (`OPENCLAW_RLS_CONFIG`: one file, or a directory of them).
//!
//! ```yaml
//! domain: edge
//! descriptors:
//!   - key: remote_address
//!     rate_limit: {unit: second, requests_per_unit: 10}
//!   - key: api_key
//!     value: "partner-*"           # `*` matches any run of characters
//!     rate_limit: {unit: day, requests_per_unit: 1000, name: partner_daily}
//!     descriptors:                 # nested: matched against the request's next entry
//!       - key: path
//!         rate_limit: {unlimited: true}
//!     shadow_mode: true            # counted, always answered OK
//! ```
//!
//! Matching follows the reference (`GetLimit` in its `config_impl.go`): a request descriptor's
//! entries walk the tree one level per entry; at each level an entry matches, in this order, the
//! child with its key and exactly its value, else the first child (in file order) with its key
//! and a wildcard value that matches, else the child with its key and no value. The rule that
//! applies is the one on the node reached by the *last* entry; a descriptor with more or fewer
//! entries than the rule's depth gets none. One deliberate difference: the reference compares
//! `key + "_" + value` strings, so `key: a, value: b*` also matches an entry `a_b=c`; here keys
//! are compared as keys.
//!
//! One OpenClaw extension, optional: `mode: strict` (or `shared`, the default) in a rule's
//! `rate_limit`, decided as a policy of that mode (docs/rls.md, "What replicas promise").
//!
//! Validation reports every problem at once, each with its file and its place in the file
//! (`descriptors[1].descriptors[0].rate_limit.unit`). Stricter than the reference in two ways,
//! both about mistakes the reference ignores silently: a field in the wrong place (the reference
//! checks field names against one global list), and a missing `requests_per_unit` (the
//! reference reads it as 0: every request refused; write `0` to mean that).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_norway::Value;

use crate::bucket::{MAX_CAPACITY, Rate};
use crate::policy::{InternalPolicy, Mode, UNITS};

/// At most this many rules over all files: each limited rule is a policy with its own labelled
/// series on `/metrics`.
pub const MAX_RULES: usize = 1024;

/// The reference's units (`RateLimitResponse.RateLimit.Unit`), with its lengths
/// ([`crate::policy::UNITS`]: a month is 30 days, a year 365).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    const ALL: [Unit; 7] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ];

    /// As the reference reads it: the enum name in any case (`second`, `SECOND`, `Second`).
    pub fn parse(name: &str) -> Option<Unit> {
        Self::ALL
            .into_iter()
            .find(|unit| unit.name().eq_ignore_ascii_case(name))
    }

    /// The lower-case name, as in [`UNITS`].
    pub fn name(self) -> &'static str {
        UNITS[self as usize].0
    }

    pub fn millis(self) -> u64 {
        UNITS[self as usize].1
    }

    /// The protobuf enum value (`envoy.service.ratelimit.v3.RateLimitResponse.RateLimit.Unit`).
    pub fn proto(self) -> i32 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 2,
            Unit::Hour => 3,
            Unit::Day => 4,
            Unit::Month => 5,
            Unit::Year => 6,
            Unit::Week => 7,
        }
    }

    pub fn from_proto(value: i32) -> Option<Unit> {
        Self::ALL.into_iter().find(|unit| unit.proto() == value)
    }
}

/// What a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `unlimited: true`: answered OK without touching a bucket.
    Unlimited,
    /// A token bucket of `requests_per_unit` refilled over `unit`; 0 refuses everything.
    PerUnit { requests_per_unit: u32, unit: Unit },
}

impl Limit {
    /// The bucket's rate; `None` for unlimited and for 0 requests per unit (no bucket).
    pub fn rate(self) -> Option<Rate> {
        match self {
            Limit::PerUnit {
                requests_per_unit,
                unit,
            } if requests_per_unit > 0 => {
                Rate::try_new(u64::from(requests_per_unit), unit.millis()).ok()
            }
            _ => None,
        }
    }
}

/// One `rate_limit` of a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub domain: String,
    /// The reference's full key of the rule (`domain.key_value.key2`): stable across reloads
    /// and replicas with the same files, so it names the rule's policy and metric label.
    pub path: String,
    /// `rls:` and [`Rule::path`]: the internal policy holding this rule's buckets.
    policy: String,
    pub limit: Limit,
    /// `rate_limit.name` (empty if unset): what `replaces` refers to; returned in
    /// `current_limit.name`.
    pub name: String,
    pub replaces: Vec<String>,
    pub shadow_mode: bool,
    pub detailed_metric: bool,
    /// `rate_limit.mode` (an OpenClaw extension; `shared` when absent): how replicas share
    /// the rule's buckets, as a policy's `mode` in the policies file.
    pub mode: Mode,
}

impl Rule {
    /// The internal policy holding this rule's buckets.
    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// The `rule` label of the metrics: the rule's name, else its full key.
    pub fn label(&self) -> &str {
        if self.name.is_empty() {
            &self.path
        } else {
            &self.name
        }
    }
}

/// One level of the descriptor tree: the children by key.
#[derive(Debug, Default)]
struct Node {
    rule: Option<usize>,
    /// `share_threshold: true` on a wildcard descriptor: its value pattern. Every value it
    /// matches shares one bucket (the pattern stands for the value in the bucket key).
    shared_pattern: Option<String>,
    children: HashMap<String, Children, foldhash::fast::RandomState>,
}

/// The children of a node that share one key.
#[derive(Debug, Default)]
struct Children {
    by_value: HashMap<String, usize, foldhash::fast::RandomState>,
    /// Wildcard values split on `*`, in file order, with their node.
    wildcards: Vec<(Vec<String>, usize)>,
    /// The child with this key and no value.
    any_value: Option<usize>,
}

/// What the rules say about one request descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    UnknownDomain,
    NoRule,
    Rule(usize, &'a Rule),
}

/// Every rule in force, by domain.
#[derive(Debug, Default)]
pub struct RlsConfig {
    domains: HashMap<String, usize, foldhash::fast::RandomState>,
    nodes: Vec<Node>,
    rules: Vec<Rule>,
}

/// Every problem found in the rate limit configuration, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlsConfigErrors(pub Vec<String>);

impl fmt::Display for RlsConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} problem{}:", if n == 1 { "" } else { "s" })?;
        for error in &self.0 {
            write!(f, "\n  - {error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RlsConfigErrors {}

/// The files of `OPENCLAW_RLS_CONFIG`, read: (name for messages, text). A directory gives its
/// `.yaml` and `.yml` files in name order, leaving out hidden entries (a Kubernetes ConfigMap
/// volume keeps its bookkeeping in `..data` and `..<timestamp>`); it does not recurse.
pub fn read_files(path: &Path) -> Result<Vec<(String, String)>, RlsConfigErrors> {
    let read = |file: &Path| {
        std::fs::read_to_string(file)
            .map(|text| (file.display().to_string(), text))
            .map_err(|e| format!("{}: cannot read: {e}", file.display()))
    };
    let metadata = std::fs::metadata(path)
        .map_err(|e| RlsConfigErrors(vec![format!("{}: {e}", path.display())]))?;
    if !metadata.is_dir() {
        return read(path)
            .map(|f| vec![f])
            .map_err(|e| RlsConfigErrors(vec![e]));
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| RlsConfigErrors(vec![format!("{}: {e}", path.display())]))?;
    let mut names: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.starts_with('.')
                && (name.ends_with(".yaml") || name.ends_with(".yml"))
                && p.is_file()
        })
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(RlsConfigErrors(vec![format!(
            "{}: no .yaml or .yml file in this directory",
            path.display()
        )]));
    }
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for name in names {
        match read(&name) {
            Ok(file) => files.push(file),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(RlsConfigErrors(errors))
    }
}

impl RlsConfig {
    /// Read and validate `OPENCLAW_RLS_CONFIG` (a file or a directory).
    pub fn load(path: &Path) -> Result<Self, RlsConfigErrors> {
        Self::from_files(&read_files(path)?)
    }

    /// Validate files given as (name, text). Every problem is reported, each with its file.
    pub fn from_files(files: &[(String, String)]) -> Result<Self, RlsConfigErrors> {
        let mut config = RlsConfig::default();
        let mut errors = Vec::new();
        let mut domain_files: HashMap<String, &str> = HashMap::new();
        for (file, text) in files {
            let mut problems = Vec::new();
            config.add_file(text, &mut problems);
            if let Some(domain) = domain_of(text) {
                if let Some(first) = domain_files.get(&domain) {
                    problems.push(format!(
                        "domain: `{domain}` is also the domain of {first} (one file per domain)"
                    ));
                } else {
                    domain_files.insert(domain, file);
                }
            }
            errors.extend(problems.into_iter().map(|p| format!("{file}: {p}")));
        }
        if config.rules.len() > MAX_RULES {
            errors.push(format!(
                "{} rate limits defined, at most {MAX_RULES} allowed",
                config.rules.len()
            ));
        }
        let mut policies: HashMap<String, &str> = HashMap::new();
        for rule in &config.rules {
            if let Some(other) = policies.insert(rule.policy().to_owned(), &rule.domain)
                && other != rule.domain
            {
                errors.push(format!(
                    "domains `{other}` and `{}` both have a rule with the full key `{}`: rename one",
                    rule.domain, rule.path
                ));
            }
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(RlsConfigErrors(errors))
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.domains.keys().map(String::as_str)
    }

    pub fn has_domain(&self, domain: &str) -> bool {
        self.domains.contains_key(domain)
    }

    /// The internal policies of the rules that hold buckets.
    pub fn policies(&self) -> Vec<InternalPolicy> {
        self.rules
            .iter()
            .filter_map(|rule| {
                Some(InternalPolicy {
                    name: rule.policy().to_owned(),
                    rate: rule.limit.rate()?,
                    mode: rule.mode,
                })
            })
            .collect()
    }

    /// The rule for a request descriptor's entries (key, value), as the reference finds it.
    pub fn lookup<'a, 'e>(
        &'a self,
        domain: &str,
        entries: impl ExactSizeIterator<Item = (&'e str, &'e str)>,
    ) -> Lookup<'a> {
        self.lookup_sharing(domain, entries, |_, _| {})
    }

    /// [`RlsConfig::lookup`], also telling `shared(i, pattern)` for each entry `i` matched by
    /// a wildcard with `share_threshold` (its bucket key uses the pattern, not the value).
    pub fn lookup_sharing<'a, 'e>(
        &'a self,
        domain: &str,
        entries: impl ExactSizeIterator<Item = (&'e str, &'e str)>,
        mut shared: impl FnMut(usize, &'a str),
    ) -> Lookup<'a> {
        let Some(&root) = self.domains.get(domain) else {
            return Lookup::UnknownDomain;
        };
        let last = entries.len().saturating_sub(1);
        let mut node = &self.nodes[root];
        for (i, (key, value)) in entries.enumerate() {
            let Some(children) = node.children.get(key) else {
                return Lookup::NoRule;
            };
            let next = children
                .by_value
                .get(value)
                .copied()
                .or_else(|| {
                    children
                        .wildcards
                        .iter()
                        .find(|(parts, _)| wildcard_match(parts, value))
                        .map(|&(_, node)| node)
                })
                .or(children.any_value);
            let Some(next) = next else {
                return Lookup::NoRule;
            };
            node = &self.nodes[next];
            if let Some(pattern) = &node.shared_pattern {
                shared(i, pattern);
            }
            if i == last {
                return match node.rule {
                    Some(rule) => Lookup::Rule(rule, &self.rules[rule]),
                    None => Lookup::NoRule,
                };
            }
            if node.children.is_empty() {
                return Lookup::NoRule;
            }
        }
        Lookup::NoRule
    }

    fn new_node(&mut self) -> usize {
        self.nodes.push(Node::default());
        self.nodes.len() - 1
    }

    fn add_file(&mut self, text: &str, errors: &mut Vec<String>) {
        let document: Value = match serde_norway::from_str(text) {
            Ok(value) => value,
            Err(e) => {
                errors.push(format!("not valid YAML: {e}"));
                return;
            }
        };
        let Value::Mapping(root) = &document else {
            errors.push(format!(
                "expected a map with `domain` and `descriptors`, got {}",
                kind(&document)
            ));
            return;
        };
        for (field, _) in root {
            if !matches!(field.as_str(), Some("domain" | "descriptors")) {
                errors.push(format!(
                    "{}: unknown field (expected domain, descriptors)",
                    path_part(field)
                ));
            }
        }
        let domain = match root.get("domain") {
            Some(Value::String(d)) if !d.is_empty() => d.clone(),
            Some(Value::String(_)) | Some(Value::Null) | None => {
                errors.push(
                    "domain: missing or empty (the config file cannot have an empty domain)".into(),
                );
                return;
            }
            Some(other) => {
                errors.push(format!("domain: expected a string, got {}", kind(other)));
                return;
            }
        };
        if self.domains.contains_key(&domain) {
            // Reported by `from_files`, which knows the other file.
            return;
        }
        let root_node = self.new_node();
        self.domains.insert(domain.clone(), root_node);
        self.add_descriptors(
            &domain,
            root_node,
            &domain,
            "descriptors",
            root.get("descriptors"),
            errors,
        );
    }

    fn add_descriptors(
        &mut self,
        domain: &str,
        parent: usize,
        parent_key: &str,
        at: &str,
        list: Option<&Value>,
        errors: &mut Vec<String>,
    ) {
        let items = match list {
            None | Some(Value::Null) => return,
            Some(Value::Sequence(items)) => items,
            Some(other) => {
                errors.push(format!(
                    "{at}: expected a list of descriptors, got {}",
                    kind(other)
                ));
                return;
            }
        };
        for (i, item) in items.iter().enumerate() {
            let at = format!("{at}[{i}]");
            let Value::Mapping(fields) = item else {
                errors.push(format!("{at}: expected a map, got {}", kind(item)));
                continue;
            };
            for (field, _) in fields {
                match field.as_str() {
                    Some(
                        "key" | "value" | "rate_limit" | "descriptors" | "shadow_mode"
                        | "detailed_metric" | "value_to_metric" | "metadata" | "share_threshold",
                    ) => {}
                    Some("quota_mode") => errors.push(format!(
                        "{at}.quota_mode: not supported (in the reference it changes when a \
                         request is over its limit; OpenClaw does not implement it)"
                    )),
                    _ => errors.push(format!(
                        "{at}.{}: unknown field (expected key, value, rate_limit, descriptors, \
                         shadow_mode, detailed_metric, share_threshold)",
                        path_part(field)
                    )),
                }
            }
            let key = match fields.get("key") {
                Some(Value::String(k)) if !k.is_empty() => k.clone(),
                None | Some(Value::Null) | Some(Value::String(_)) => {
                    errors.push(format!(
                        "{at}.key: missing or empty (a descriptor has a key)"
                    ));
                    continue;
                }
                Some(other) => {
                    errors.push(format!("{at}.key: expected a string, got {}", kind(other)));
                    continue;
                }
            };
            let value = match fields.get("value") {
                None | Some(Value::Null) => String::new(),
                Some(v) => match scalar_text(v) {
                    Some(text) => text,
                    None => {
                        errors.push(format!("{at}.value: expected a string, got {}", kind(v)));
                        continue;
                    }
                },
            };
            let flag = |name: &str, errors: &mut Vec<String>| match fields.get(name) {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    errors.push(format!(
                        "{at}.{name}: expected true or false, got {}",
                        show(other)
                    ));
                    false
                }
            };
            let shadow_mode = flag("shadow_mode", errors);
            let detailed_metric = flag("detailed_metric", errors);
            let _ = flag("value_to_metric", errors);
            let share_threshold = flag("share_threshold", errors);
            if share_threshold && !value.contains('*') {
                errors.push(format!(
                    "{at}.share_threshold: can only be used with a wildcard value (containing `*`), got value `{value}`"
                ));
            }
            let full_key = if value.is_empty() {
                format!("{parent_key}.{key}")
            } else {
                format!("{parent_key}.{key}_{value}")
            };
            let child = self.new_node();
            if share_threshold && value.contains('*') {
                self.nodes[child].shared_pattern = Some(value.clone());
            }
            let children = self.nodes[parent].children.entry(key.clone()).or_default();
            let duplicate = if value.is_empty() {
                children.any_value.replace(child).is_some()
            } else if value.contains('*') {
                let parts: Vec<String> = value.split('*').map(str::to_owned).collect();
                let duplicate = children.wildcards.iter().any(|(p, _)| *p == parts);
                children.wildcards.push((parts, child));
                duplicate
            } else {
                children.by_value.insert(value.clone(), child).is_some()
            };
            if duplicate {
                errors.push(format!(
                    "{at}: duplicate descriptor (key `{key}`, value `{value}`): the composite key `{full_key}` is already defined at this level"
                ));
            }
            if let Some(spec) = fields.get("rate_limit")
                && let Some(RateLimitSpec {
                    limit,
                    name,
                    replaces,
                    mode,
                }) = parse_rate_limit(&format!("{at}.rate_limit"), spec, errors)
            {
                self.nodes[child].rule = Some(self.rules.len());
                self.rules.push(Rule {
                    domain: domain.to_owned(),
                    policy: format!("rls:{full_key}"),
                    path: full_key.clone(),
                    limit,
                    name,
                    replaces,
                    shadow_mode,
                    detailed_metric,
                    mode,
                });
            }
            self.add_descriptors(
                domain,
                child,
                &full_key,
                &format!("{at}.descriptors"),
                fields.get("descriptors"),
                errors,
            );
        }
    }
}

/// A valid `rate_limit` block.
struct RateLimitSpec {
    limit: Limit,
    name: String,
    replaces: Vec<String>,
    mode: Mode,
}

fn parse_rate_limit(at: &str, spec: &Value, errors: &mut Vec<String>) -> Option<RateLimitSpec> {
    let Value::Mapping(fields) = spec else {
        errors.push(format!(
            "{at}: expected a map with unit and requests_per_unit, got {}",
            kind(spec)
        ));
        return None;
    };
    let before = errors.len();
    for (field, _) in fields {
        if !matches!(
            field.as_str(),
            Some("unit" | "requests_per_unit" | "unlimited" | "name" | "replaces" | "mode")
        ) {
            errors.push(format!(
                "{at}.{}: unknown field (expected unit, requests_per_unit, unlimited, name, replaces, mode)",
                path_part(field)
            ));
        }
    }
    let name = match fields.get("name") {
        None | Some(Value::Null) => String::new(),
        Some(v) => scalar_text(v).unwrap_or_else(|| {
            errors.push(format!("{at}.name: expected a string, got {}", kind(v)));
            String::new()
        }),
    };
    let unlimited = match fields.get("unlimited") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            errors.push(format!(
                "{at}.unlimited: expected true or false, got {}",
                show(other)
            ));
            false
        }
    };
    let unit = match fields.get("unit") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let unit = v.as_str().and_then(Unit::parse);
            if unit.is_none() && !unlimited {
                errors.push(format!(
                    "{at}.unit: invalid rate limit unit {} (expected second, minute, hour, day, week, month or year)",
                    show(v)
                ));
            }
            unit
        }
    };
    // OpenClaw's extension: the reference has no modes (and would refuse the field).
    let mode = match fields.get("mode") {
        None | Some(Value::Null) => Mode::Shared,
        Some(v) => match v.as_str() {
            Some("shared") => Mode::Shared,
            Some("strict") => Mode::Strict,
            _ => {
                errors.push(format!(
                    "{at}.mode: expected `shared` or `strict`, got {}",
                    show(v)
                ));
                Mode::Shared
            }
        },
    };
    if unlimited && fields.get("mode").is_some_and(|v| !v.is_null()) {
        errors.push(format!(
            "{at}.mode: has no bucket to share when unlimited (remove it)"
        ));
    }
    let mut replaces = Vec::new();
    match fields.get("replaces") {
        None | Some(Value::Null) => {}
        Some(Value::Sequence(items)) => {
            for (i, item) in items.iter().enumerate() {
                match item.get("name").and_then(scalar_text) {
                    Some(other) if !other.is_empty() => {
                        if other == name {
                            errors.push(format!(
                                "{at}.replaces[{i}]: replaces should not contain the name of the same descriptor (`{name}`)"
                            ));
                        }
                        replaces.push(other);
                    }
                    _ => errors.push(format!(
                        "{at}.replaces[{i}]: expected `name: <rate limit name>` (an empty replaces entry is not allowed)"
                    )),
                }
                if let Value::Mapping(m) = item {
                    for (field, _) in m {
                        if field.as_str() != Some("name") {
                            errors.push(format!(
                                "{at}.replaces[{i}].{}: unknown field (expected name)",
                                path_part(field)
                            ));
                        }
                    }
                }
            }
        }
        Some(other) => errors.push(format!(
            "{at}.replaces: expected a list of `name:` entries, got {}",
            kind(other)
        )),
    }
    let limit = if unlimited {
        if unit.is_some() {
            errors.push(format!(
                "{at}.unit: should not specify a rate limit unit when unlimited"
            ));
        }
        Limit::Unlimited
    } else {
        let requests_per_unit = match fields.get("requests_per_unit") {
            None | Some(Value::Null) => {
                errors.push(format!(
                    "{at}.requests_per_unit: missing (the reference reads a missing value as 0, \
                     refusing every request: write 0 if that is what you mean)"
                ));
                None
            }
            Some(v) => match v.as_u64() {
                Some(n) if n <= MAX_CAPACITY => Some(n as u32),
                _ => {
                    errors.push(format!(
                        "{at}.requests_per_unit: must be a whole number from 0 to {MAX_CAPACITY}, got {}",
                        show(v)
                    ));
                    None
                }
            },
        };
        if fields.get("unit").is_none_or(Value::is_null) {
            errors.push(format!(
                "{at}.unit: missing (second, minute, hour, day, week, month or year)"
            ));
        }
        match (requests_per_unit, unit) {
            (Some(requests_per_unit), Some(unit)) => Limit::PerUnit {
                requests_per_unit,
                unit,
            },
            _ => return None,
        }
    };
    (errors.len() == before).then_some(RateLimitSpec {
        limit,
        name,
        replaces,
        mode,
    })
}

/// The `domain:` of a file, if it has a usable one (for the duplicate-domain check).
fn domain_of(text: &str) -> Option<String> {
    let document: Value = serde_norway::from_str(text).ok()?;
    match document.get("domain")? {
        Value::String(d) if !d.is_empty() => Some(d.clone()),
        _ => None,
    }
}

/// The reference's wildcard match: `parts` is the pattern split on `*`; the value must start
/// with the first part, end with the last, and hold the others in order between them.
pub fn wildcard_match(parts: &[String], value: &str) -> bool {
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
        return false;
    };
    if parts.len() == 1 {
        return first == value;
    }
    let fixed: usize = parts.iter().map(String::len).sum();
    if value.len() < fixed || !value.starts_with(first.as_str()) || !value.ends_with(last.as_str())
    {
        return false;
    }
    let mut rest = &value[first.len()..value.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part.as_str()) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// A scalar as the reference's YAML decoder reads it into a string field (`value: 1` is "1").
fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
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

    fn load(files: &[&str]) -> Result<RlsConfig, RlsConfigErrors> {
        let files: Vec<(String, String)> = files
            .iter()
            .enumerate()
            .map(|(i, text)| (format!("f{i}.yaml"), (*text).to_owned()))
            .collect();
        RlsConfig::from_files(&files)
    }

    fn rule_of<'a>(
        config: &'a RlsConfig,
        domain: &str,
        entries: &[(&str, &str)],
    ) -> Option<&'a Rule> {
        match config.lookup(domain, entries.iter().copied()) {
            Lookup::Rule(_, rule) => Some(rule),
            _ => None,
        }
    }

    /// The first example of envoyproxy/ratelimit's README ("Example 1"), unchanged.
    const README_EXAMPLE_1: &str = "
domain: mongo_cps
descriptors:
  - key: database
    value: users
    rate_limit:
      unit: second
      requests_per_unit: 500

  - key: database
    value: default
    rate_limit:
      unit: second
      requests_per_unit: 500
";

    /// The README's "Example 3" (a default and a more specific value).
    const README_EXAMPLE_3: &str = "
domain: edge_proxy_per_ip
descriptors:
  - key: remote_address
    rate_limit:
      unit: second
      requests_per_unit: 10

  # Black list IP
  - key: remote_address
    value: 50.0.0.5
    rate_limit:
      unit: second
      requests_per_unit: 0
";

    /// The README's "Example 2" (nested descriptors).
    const README_EXAMPLE_2: &str = "
domain: messaging
descriptors:
  # Only allow 5 marketing messages a day
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit:
          unit: day
          requests_per_unit: 5

  # Only allow 100 messages a day to any unique phone number
  - key: to_number
    rate_limit:
      unit: day
      requests_per_unit: 100
";

    #[test]
    fn readme_examples_load_and_match_as_the_readme_says() {
        let config = load(&[README_EXAMPLE_1, README_EXAMPLE_3, README_EXAMPLE_2]).unwrap();
        let users = rule_of(&config, "mongo_cps", &[("database", "users")]).unwrap();
        assert_eq!(
            users.limit,
            Limit::PerUnit {
                requests_per_unit: 500,
                unit: Unit::Second
            }
        );
        assert_eq!(users.path, "mongo_cps.database_users");
        assert_eq!(
            rule_of(&config, "mongo_cps", &[("database", "other")]),
            None
        );
        // Any address: 10/s; the black-listed one: 0.
        let any = rule_of(
            &config,
            "edge_proxy_per_ip",
            &[("remote_address", "10.0.0.1")],
        )
        .unwrap();
        assert_eq!(any.path, "edge_proxy_per_ip.remote_address");
        let black = rule_of(
            &config,
            "edge_proxy_per_ip",
            &[("remote_address", "50.0.0.5")],
        )
        .unwrap();
        assert_eq!(black.limit.rate(), None, "0 per unit holds no bucket");
        // Nested: marketing messages to a number 5/day; any message to a number 100/day.
        let marketing = rule_of(
            &config,
            "messaging",
            &[("message_type", "marketing"), ("to_number", "2061234567")],
        )
        .unwrap();
        assert_eq!(marketing.path, "messaging.message_type_marketing.to_number");
        assert_eq!(marketing.limit.rate(), Rate::try_new(5, 86_400_000).ok());
        let any_number = rule_of(&config, "messaging", &[("to_number", "2061234567")]).unwrap();
        assert_eq!(any_number.limit.rate(), Rate::try_new(100, 86_400_000).ok());
        // The descriptor must reach the rule's depth exactly.
        assert_eq!(
            rule_of(&config, "messaging", &[("message_type", "marketing")]),
            None
        );
        assert_eq!(
            rule_of(&config, "messaging", &[("to_number", "1"), ("extra", "x")]),
            None
        );
        assert_eq!(
            config.lookup("nope", [("a", "b")].into_iter()),
            Lookup::UnknownDomain
        );
    }

    #[test]
    fn exact_value_beats_wildcard_which_beats_any_value() {
        let config = load(&["
domain: d
descriptors:
  - key: path
    rate_limit: {unit: minute, requests_per_unit: 1, name: any}
  - key: path
    value: /api/*
    rate_limit: {unit: minute, requests_per_unit: 2, name: api}
  - key: path
    value: /api/*/admin
    rate_limit: {unit: minute, requests_per_unit: 3, name: admin}
  - key: path
    value: /api/health
    rate_limit: {unlimited: true, name: health}
"])
        .unwrap();
        let name = |v: &str| rule_of(&config, "d", &[("path", v)]).map(|r| r.name.as_str());
        assert_eq!(name("/api/health"), Some("health"));
        // File order among wildcards: `/api/*` comes first and matches `/api/x/admin` too.
        assert_eq!(name("/api/x/admin"), Some("api"));
        assert_eq!(name("/api/users"), Some("api"));
        assert_eq!(name("/other"), Some("any"));
        assert_eq!(name(""), Some("any"));
    }

    #[test]
    fn wildcards_match_like_the_reference() {
        let parts = |p: &str| p.split('*').map(str::to_owned).collect::<Vec<_>>();
        assert!(wildcard_match(&parts("foo*"), "foo"));
        assert!(wildcard_match(&parts("foo*"), "foobar"));
        assert!(!wildcard_match(&parts("foo*"), "fo"));
        assert!(wildcard_match(&parts("a*b*c"), "a-b-c"));
        assert!(wildcard_match(&parts("a*b*c"), "abc"));
        assert!(!wildcard_match(&parts("a*b*c"), "ac"));
        assert!(
            !wildcard_match(&parts("ab*ba"), "aba"),
            "the fixed parts must not overlap"
        );
        assert!(wildcard_match(&parts("*"), "anything"));
        assert!(wildcard_match(&parts("exact"), "exact"));
        assert!(!wildcard_match(&parts("exact"), "exactly"));
    }

    #[test]
    fn keys_are_compared_as_keys_not_as_joined_strings() {
        let config = load(&["
domain: d
descriptors:
  - key: a
    value: b*
    rate_limit: {unit: second, requests_per_unit: 1}
"])
        .unwrap();
        assert!(rule_of(&config, "d", &[("a", "bc")]).is_some());
        // The reference would match `a_b` + `_c` against `a_b*`.
        assert!(rule_of(&config, "d", &[("a_b", "c")]).is_none());
    }

    #[test]
    fn every_problem_is_reported_with_its_file_and_place() {
        let errors = load(&[
            "
domain: d
descriptors:
  - key: k
    rate_limit: {unit: fortnight, requests_per_unit: 5}
  - key: k
    value: v
    rate_limit: {unit: second}
    descriptors:
      - value: x
      - key: inner
        rate_limit: {unlimited: true, unit: second, name: me, replaces: [{name: me}, {}]}
  - key: k
    rate_limit: {unit: day, requests_per_unit: 2000000000, burst: 2}
  - key: q
    quota_mode: true
    requests_per_unit: 3
",
            "domain: d\n",
            "descriptors: []\n",
            "domain: [x\n",
        ])
        .unwrap_err();
        let text = errors.to_string();
        for expected in [
            "f0.yaml: descriptors[0].rate_limit.unit: invalid rate limit unit `fortnight`",
            "f0.yaml: descriptors[1].rate_limit.requests_per_unit: missing",
            "f0.yaml: descriptors[1].descriptors[0].key: missing or empty",
            "f0.yaml: descriptors[1].descriptors[1].rate_limit.replaces[0]: replaces should not contain the name of the same descriptor",
            "f0.yaml: descriptors[1].descriptors[1].rate_limit.replaces[1]: expected `name: <rate limit name>`",
            "f0.yaml: descriptors[1].descriptors[1].rate_limit.unit: should not specify a rate limit unit when unlimited",
            "f0.yaml: descriptors[2]: duplicate descriptor (key `k`, value ``)",
            "f0.yaml: descriptors[2].rate_limit.requests_per_unit: must be a whole number from 0 to 1000000000, got 2000000000",
            "f0.yaml: descriptors[2].rate_limit.burst: unknown field",
            "f0.yaml: descriptors[3].quota_mode: not supported",
            "f0.yaml: descriptors[3].requests_per_unit: unknown field",
            "f1.yaml: domain: `d` is also the domain of f0.yaml",
            "f2.yaml: domain: missing or empty",
            "f3.yaml: not valid YAML",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert_eq!(errors.0.len(), 14, "{text}");
    }

    #[test]
    fn a_rule_may_be_strict_and_is_shared_without_a_mode() {
        let config = load(&["
domain: d
descriptors:
  - key: plain
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: strict
    rate_limit: {unit: second, requests_per_unit: 2, mode: strict}
  - key: shared
    rate_limit: {unit: second, requests_per_unit: 3, mode: shared}
"])
        .unwrap();
        let mode = |key: &str| rule_of(&config, "d", &[(key, "v")]).unwrap().mode;
        assert_eq!(mode("plain"), Mode::Shared);
        assert_eq!(mode("strict"), Mode::Strict);
        assert_eq!(mode("shared"), Mode::Shared);
        let mut policies = config.policies();
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        let modes: Vec<(&str, Mode)> = policies.iter().map(|p| (p.name.as_str(), p.mode)).collect();
        assert_eq!(
            modes,
            [
                ("rls:d.plain", Mode::Shared),
                ("rls:d.shared", Mode::Shared),
                ("rls:d.strict", Mode::Strict)
            ]
        );
    }

    #[test]
    fn a_mode_other_than_shared_or_strict_is_an_error_with_its_place() {
        let errors = load(&["
domain: d
descriptors:
  - key: a
    rate_limit: {unit: second, requests_per_unit: 1, mode: eventual}
  - key: b
    descriptors:
      - key: c
        rate_limit: {unit: second, requests_per_unit: 1, mode: 3}
  - key: e
    rate_limit: {unlimited: true, mode: strict}
  - key: f
    mode: strict
    rate_limit: {unit: second, requests_per_unit: 1}
"])
        .unwrap_err();
        let text = errors.to_string();
        for expected in [
            "f0.yaml: descriptors[0].rate_limit.mode: expected `shared` or `strict`, got `eventual`",
            "f0.yaml: descriptors[1].descriptors[0].rate_limit.mode: expected `shared` or `strict`, got 3",
            "f0.yaml: descriptors[2].rate_limit.mode: has no bucket to share when unlimited",
            "f0.yaml: descriptors[3].mode: unknown field",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert_eq!(errors.0.len(), 4, "{text}");
    }

    #[test]
    fn share_threshold_needs_a_wildcard_value() {
        let errors = load(&[
            "domain: d\ndescriptors:\n  - key: k\n    value: exact\n    share_threshold: true\n    rate_limit: {unit: hour, requests_per_unit: 1}\n",
        ])
        .unwrap_err();
        assert!(
            errors.0[0]
                .contains("descriptors[0].share_threshold: can only be used with a wildcard value"),
            "{errors}"
        );
    }

    #[test]
    fn a_directory_gives_its_yaml_files_in_order_and_skips_hidden_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.yml"), "domain: b\n").unwrap();
        std::fs::write(dir.path().join("a.yaml"), "domain: a\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml").unwrap();
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), ": broken").unwrap();
        let files = read_files(dir.path()).unwrap();
        let names: Vec<&str> = files
            .iter()
            .map(|(n, _)| n.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(names, ["a.yaml", "b.yml"]);
        let config = RlsConfig::load(dir.path()).unwrap();
        assert!(config.has_domain("a") && config.has_domain("b"));
        let empty = tempfile::tempdir().unwrap();
        let errors = RlsConfig::load(empty.path()).unwrap_err();
        assert!(errors.0[0].contains("no .yaml or .yml file"), "{errors}");
    }

    #[test]
    fn units_read_in_any_case_and_map_to_the_protobuf_enum() {
        assert_eq!(Unit::parse("SECOND"), Some(Unit::Second));
        assert_eq!(Unit::parse("Day"), Some(Unit::Day));
        assert_eq!(Unit::parse("unknown"), None);
        assert_eq!(Unit::Week.proto(), 7);
        assert_eq!(Unit::from_proto(5), Some(Unit::Month));
        assert_eq!(Unit::from_proto(0), None);
        assert_eq!(Unit::Year.millis(), 365 * 86_400_000);
        for unit in Unit::ALL {
            assert_eq!(Unit::from_proto(unit.proto()), Some(unit));
            assert_eq!(Unit::parse(unit.name()), Some(unit));
        }
    }
}
