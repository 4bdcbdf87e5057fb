//! PromQL: parse rule queries once at load, and inject the HPA's selector into the AST.
//!
//! Injection works on the parsed query: every vector selector (inside `rate(...[1m])`,
//! subqueries, both sides of a division, …) gets the selector's requirements as extra label
//! matchers, and the query is printed back from the AST. Values are never pasted into query
//! text, and `in`/`notin` sets become regex alternations whose values are escaped with the
//! same rules as Go's `regexp.QuoteMeta`, so `a.b` matches only `a.b`.

use std::time::Duration;

use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::Expr;
use promql_parser::parser::value::ValueType;
use promql_parser::util::visitor::{ExprVisitorMut, walk_expr_mut};

use crate::selector::{Requirement, Selector};

/// A rule's query, parsed and checked.
#[derive(Debug, Clone)]
pub struct Query {
    /// The query as the SRE wrote it.
    pub source: String,
    expr: Expr,
    /// Number of vector selectors (where injected matchers go).
    pub selectors: usize,
    /// The longest range (`[1m]`, subquery range) in the query: the natural `window` to report.
    pub longest_range: Option<Duration>,
}

impl Query {
    /// Parses and checks a query: it must yield an instant vector or a scalar.
    /// The error is promql-parser's message plus, where it can be found, a 0-based byte offset.
    pub fn parse(source: &str) -> Result<Query, (String, Option<usize>)> {
        let expr = promql_parser::parser::parse(source)
            .map_err(|msg| (msg.clone(), locate_error(source, &msg)))?;
        match expr.value_type() {
            ValueType::Vector | ValueType::Scalar => {}
            other => {
                return Err((
                    format!(
                        "the query yields a {other}; it must yield an instant vector or a scalar"
                    ),
                    None,
                ));
            }
        }
        let mut stats = Stats::default();
        let mut probe = expr.clone();
        let _ = walk_expr_mut(&mut stats, &mut probe);
        Ok(Query {
            source: source.to_owned(),
            expr,
            selectors: stats.selectors,
            longest_range: stats.longest_range,
        })
    }

    /// The query with `matchers` added to every vector selector, printed as PromQL.
    pub fn with_matchers(&self, matchers: &[Matcher]) -> String {
        if matchers.is_empty() {
            return self.expr.to_string();
        }
        let mut expr = self.expr.clone();
        let mut injector = Injector { matchers };
        let _ = walk_expr_mut(&mut injector, &mut expr);
        expr.to_string()
    }

    /// The query as printed from its AST (normalized spacing), without injection.
    pub fn normalized(&self) -> String {
        self.expr.to_string()
    }
}

#[derive(Default)]
struct Stats {
    selectors: usize,
    longest_range: Option<Duration>,
}

impl Stats {
    fn range(&mut self, d: Duration) {
        self.longest_range = Some(self.longest_range.map_or(d, |cur| cur.max(d)));
    }
}

impl ExprVisitorMut for Stats {
    type Error = std::convert::Infallible;

    fn pre_visit(&mut self, expr: &mut Expr) -> Result<bool, Self::Error> {
        match expr {
            Expr::VectorSelector(_) => self.selectors += 1,
            Expr::MatrixSelector(m) => {
                self.selectors += 1;
                self.range(m.range);
            }
            Expr::Subquery(s) => self.range(s.range),
            _ => {}
        }
        Ok(true)
    }
}

struct Injector<'a> {
    matchers: &'a [Matcher],
}

impl Injector<'_> {
    fn add(&self, ms: &mut promql_parser::label::Matchers) {
        if ms.or_matchers.is_empty() {
            ms.matchers.extend(self.matchers.iter().cloned());
        } else {
            // `{a="1" or b="2"}`: each alternative must also satisfy the selector.
            for group in &mut ms.or_matchers {
                group.extend(self.matchers.iter().cloned());
            }
        }
    }
}

impl ExprVisitorMut for Injector<'_> {
    type Error = std::convert::Infallible;

    fn pre_visit(&mut self, expr: &mut Expr) -> Result<bool, Self::Error> {
        match expr {
            Expr::VectorSelector(vs) => self.add(&mut vs.matchers),
            Expr::MatrixSelector(m) => self.add(&mut m.vs.matchers),
            _ => {}
        }
        Ok(true)
    }
}

/// Label matchers with the meaning of a Kubernetes selector (`labels.Requirement.Matches`) on
/// Prometheus series, where a label with an empty value does not exist: a series "has" `k`
/// when its `k` is not empty, and Prometheus matches a missing label as the empty value.
///
/// | Kubernetes | means | Prometheus |
/// | --- | --- | --- |
/// | `k=v`, `k==v` | has `k`, equal to v | `k="v"` |
/// | `k!=v` | lacks `k`, or not v | `k!="v"` (a missing label is "", not v) |
/// | `k in (a,b)` | has `k`, one of them | `k=~"a\|b"`, values escaped like Go's `regexp.QuoteMeta` |
/// | `k notin (a,b)` | lacks `k`, or none of them | `k!~"a\|b"` (a missing label matches neither) |
/// | `k` | has `k` | `k!=""` |
/// | `!k` | lacks `k` | `k=""` |
///
/// The empty value, which `k=`, `k in ()` and the gaps in `(a,,b)` name, is never a value a
/// series has, so: `k=` and `k in ()` match nothing (`k!="", k=""`); `k!=` and `k notin ()`
/// match everything (no matcher); `""` is dropped from `in`/`notin` sets otherwise (a naive
/// `k=~"a|"` would wrongly match series without `k`, and `k!~"a|"` wrongly exclude them).
pub fn matchers_for(selector: &Selector) -> Vec<Matcher> {
    let mut out = Vec::new();
    let nothing = |key: &str, out: &mut Vec<Matcher>| {
        out.push(Matcher::new(MatchOp::NotEqual, key, ""));
        out.push(Matcher::new(MatchOp::Equal, key, ""));
    };
    let present = |values: &std::collections::BTreeSet<String>| -> Vec<String> {
        values.iter().filter(|v| !v.is_empty()).cloned().collect()
    };
    for r in &selector.requirements {
        match r {
            Requirement::Equals { key, value } if value.is_empty() => nothing(key, &mut out),
            Requirement::Equals { key, value } => {
                out.push(Matcher::new(MatchOp::Equal, key, value));
            }
            Requirement::NotEquals { value, .. } if value.is_empty() => {}
            Requirement::NotEquals { key, value } => {
                out.push(Matcher::new(MatchOp::NotEqual, key, value));
            }
            Requirement::In { key, values } => {
                let values = present(values);
                if values.is_empty() {
                    nothing(key, &mut out);
                } else {
                    let alt = alternation(values.iter().map(String::as_str));
                    out.push(Matcher::new(MatchOp::Re(anchored(&alt)), key, &alt));
                }
            }
            Requirement::NotIn { key, values } => {
                let values = present(values);
                if !values.is_empty() {
                    let alt = alternation(values.iter().map(String::as_str));
                    out.push(Matcher::new(MatchOp::NotRe(anchored(&alt)), key, &alt));
                }
            }
            Requirement::Exists { key } => out.push(Matcher::new(MatchOp::NotEqual, key, "")),
            Requirement::DoesNotExist { key } => out.push(Matcher::new(MatchOp::Equal, key, "")),
        }
    }
    out
}

/// A Prometheus label name as Prometheus 2 validates them (`[a-zA-Z_][a-zA-Z0-9_]*`): the only
/// selector keys a matcher can name.
pub fn is_prometheus_label_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.first()
        .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// `namespace="ns"`-style matcher for rules that scope their query to the request namespace.
pub fn equal_matcher(label: &str, value: &str) -> Matcher {
    Matcher::new(MatchOp::Equal, label, value)
}

fn alternation<'a>(values: impl Iterator<Item = &'a str>) -> String {
    values.map(quote_meta).collect::<Vec<_>>().join("|")
}

/// Prometheus anchors regex matchers; the in-memory regex mirrors that (it is only used if
/// someone evaluates the matcher locally; Prometheus compiles the printed text itself).
fn anchored(pattern: &str) -> regex::Regex {
    regex::Regex::new(&format!("^(?:{pattern})$"))
        .unwrap_or_else(|_| regex::Regex::new("^$").expect("literal regex"))
}

/// Go's `regexp.QuoteMeta`: escapes every RE2 metacharacter, so the value matches literally.
pub fn quote_meta(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Best-effort byte offset of a parse error, for messages like "line 3, column 17".
fn locate_error(source: &str, message: &str) -> Option<usize> {
    let quoted = |m: &str| -> Option<String> {
        let start = m.find('\'')? + 1;
        let end = start + m[start..].find('\'')?;
        Some(m[start..end].to_owned())
    };
    if message.starts_with("unknown function with name") || message.contains("in call to function")
    {
        let name = quoted(message)?;
        return source
            .find(&format!("{name}("))
            .or_else(|| source.find(&name));
    }
    if let Some(re) = message.strip_prefix("illegal regex for ") {
        return source.find(re);
    }
    if message.contains("end of input") {
        return Some(source.trim_end().len());
    }
    unbalanced_bracket(source).or_else(|| {
        // A trailing operator ("sum(x) /") is the most common "invalid promql query".
        let trimmed = source.trim_end();
        trimmed
            .ends_with(['+', '-', '*', '/', '%', '^', '=', '<', '>', ','])
            .then(|| trimmed.len() - 1)
    })
}

/// Offset of the first unmatched `(`/`[`/`{` or stray closer, skipping string literals.
fn unbalanced_bracket(source: &str) -> Option<usize> {
    let mut stack: Vec<(char, usize)> = Vec::new();
    let mut chars = source.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                let quote = c;
                while let Some((_, d)) = chars.next() {
                    if d == '\\' && quote != '`' {
                        chars.next();
                    } else if d == quote {
                        break;
                    }
                }
            }
            '#' => {
                // Comment to end of line.
                for (_, d) in chars.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
            }
            '(' | '[' | '{' => stack.push((c, i)),
            ')' | ']' | '}' => {
                let want = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                match stack.pop() {
                    Some((open, _)) if open == want => {}
                    _ => return Some(i),
                }
            }
            _ => {}
        }
    }
    stack.first().map(|&(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inject(query: &str, selector: &str) -> String {
        let q = Query::parse(query).unwrap();
        q.with_matchers(&matchers_for(&Selector::parse(selector).unwrap()))
    }

    #[test]
    fn selector_requirements_become_matchers_on_every_vector_selector() {
        assert_eq!(
            inject(
                "sum(rate(openclaw_tokens_consumed_total[1m])) / max(token_bucket_fill_rate * openclaw_active_buckets)",
                "policy=default"
            ),
            "sum(rate(openclaw_tokens_consumed_total{policy=\"default\"}[1m])) / max(token_bucket_fill_rate{policy=\"default\"} * openclaw_active_buckets{policy=\"default\"})"
        );
    }

    #[test]
    fn each_operator_maps_to_the_matching_prometheus_matcher() {
        assert_eq!(inject("foo", "a!=1"), "foo{a!=\"1\"}");
        assert_eq!(inject("foo", "a in (x,y)"), "foo{a=~\"x|y\"}");
        assert_eq!(inject("foo", "a notin (x)"), "foo{a!~\"x\"}");
        assert_eq!(inject("foo", "a"), "foo{a!=\"\"}");
        assert_eq!(inject("foo", "!a"), "foo{a=\"\"}");
        assert_eq!(inject("foo", "a==1"), "foo{a=\"1\"}");
    }

    #[test]
    fn the_empty_value_keeps_its_kubernetes_meaning() {
        // Nothing has `a` with an empty value.
        assert_eq!(inject("foo", "a="), "foo{a!=\"\",a=\"\"}");
        assert_eq!(inject("foo", "a in ()"), "foo{a!=\"\",a=\"\"}");
        assert_eq!(inject("foo", "a in (x,)"), "foo{a=~\"x\"}");
        // Everything lacks `a` or has it with another value.
        assert_eq!(inject("foo", "a!="), "foo");
        assert_eq!(inject("foo", "a notin ()"), "foo");
        assert_eq!(inject("foo", "a notin (,x)"), "foo{a!~\"x\"}");
    }

    #[test]
    fn prometheus_label_names_are_the_legacy_charset() {
        for ok in ["app", "_x", "a1_b"] {
            assert!(is_prometheus_label_name(ok), "{ok}");
        }
        for bad in ["", "1a", "app.kubernetes.io/name", "a-b"] {
            assert!(!is_prometheus_label_name(bad), "{bad}");
        }
    }

    #[test]
    fn regex_metacharacters_in_set_values_are_escaped() {
        assert_eq!(inject("foo", "a in (v1.2,x_y)"), "foo{a=~\"v1\\\\.2|x_y\"}");
        // The printed query parses back, and the regex matches only the literal value.
        let printed = inject("foo", "a in (v1.2)");
        let reparsed = promql_parser::parser::parse(&printed).unwrap();
        let Expr::VectorSelector(vs) = reparsed else {
            panic!()
        };
        let m = vs.matchers.matchers.iter().find(|m| m.name == "a").unwrap();
        assert!(m.is_match("v1.2"));
        assert!(!m.is_match("v1x2"));
    }

    #[test]
    fn matchers_reach_subqueries_or_groups_and_function_arguments() {
        assert_eq!(
            inject("max_over_time(rate(foo[1m])[5m:30s])", "a=1"),
            "max_over_time(rate(foo{a=\"1\"}[1m])[5m:30s])"
        );
        assert_eq!(
            inject("foo{b=\"2\" or c=\"3\"}", "a=1"),
            "foo{b=\"2\", a=\"1\" or c=\"3\", a=\"1\"}"
        );
        assert_eq!(
            inject("label_replace(foo, \"x\", \"$1\", \"y\", \"(.*)\")", "a=1"),
            "label_replace(foo{a=\"1\"}, \"x\", \"$1\", \"y\", \"(.*)\")"
        );
    }

    #[test]
    fn an_empty_selector_leaves_the_query_as_written() {
        assert_eq!(inject("sum(rate(foo[1m]))", ""), "sum(rate(foo[1m]))");
    }

    #[test]
    fn hostile_values_cannot_escape_the_string_literal() {
        // Selector validation refuses these already; injection must be safe on its own too.
        for value in ["x\"} or vector(1) #", "a\\\"b", "\n", "ü\"}"] {
            let q = Query::parse("foo").unwrap();
            let printed = q.with_matchers(&[Matcher::new(MatchOp::Equal, "a", value)]);
            let Expr::VectorSelector(vs) = promql_parser::parser::parse(&printed).unwrap() else {
                panic!("{printed} is no longer a single selector")
            };
            assert_eq!(vs.matchers.matchers[0].value, value);
        }
    }

    #[test]
    fn the_longest_range_is_the_reported_window() {
        let q = Query::parse("sum(rate(a[1m])) / sum(rate(b[5m]))").unwrap();
        assert_eq!(q.longest_range, Some(Duration::from_secs(300)));
        assert_eq!(Query::parse("foo").unwrap().longest_range, None);
        assert_eq!(q.selectors, 2);
    }

    #[test]
    fn parse_errors_carry_a_position_where_one_can_be_found() {
        assert_eq!(Query::parse("sum(rate(foo[1m])").unwrap_err().1, Some(3));
        assert_eq!(Query::parse("sum(nosuchfn(foo))").unwrap_err().1, Some(4));
        assert_eq!(Query::parse("sum(foo) /").unwrap_err().1, Some(9));
        assert_eq!(Query::parse("foo{a=~\"(\"}").unwrap_err().1, Some(8));
    }

    #[test]
    fn range_vectors_and_strings_are_refused_as_results() {
        assert!(
            Query::parse("foo[1m]")
                .unwrap_err()
                .0
                .contains("instant vector")
        );
        assert!(Query::parse("\"s\"").is_err());
        assert!(Query::parse("1 + 1").is_ok());
    }

    proptest::proptest! {
        #[test]
        fn any_equality_value_round_trips_through_the_printed_query(value in ".{0,40}") {
            let q = Query::parse("sum(rate(foo[1m]))").unwrap();
            let printed = q.with_matchers(&[Matcher::new(MatchOp::Equal, "a", &value)]);
            let reparsed = promql_parser::parser::parse(&printed).unwrap();
            proptest::prop_assert_eq!(reparsed.to_string(), printed);
            let mut values = Vec::new();
            let mut probe = reparsed;
            let mut collect = Collect(&mut values);
            let _ = walk_expr_mut(&mut collect, &mut probe);
            proptest::prop_assert_eq!(values, vec![value]);
        }

        #[test]
        fn set_alternations_match_exactly_their_literal_values(
            values in proptest::collection::btree_set("[a-zA-Z0-9]([a-zA-Z0-9._-]{0,10}[a-zA-Z0-9])?", 1..5),
            other in "[a-zA-Z0-9]([a-zA-Z0-9._-]{0,10}[a-zA-Z0-9])?",
        ) {
            let selector = Selector::parse(&format!("k in ({})", values.iter().cloned().collect::<Vec<_>>().join(","))).unwrap();
            let printed = Query::parse("foo").unwrap().with_matchers(&matchers_for(&selector));
            let Expr::VectorSelector(vs) = promql_parser::parser::parse(&printed).unwrap() else { panic!() };
            let m = &vs.matchers.matchers[0];
            for v in &values {
                proptest::prop_assert!(m.is_match(v), "{} should match {}", printed, v);
            }
            proptest::prop_assert_eq!(m.is_match(&other), values.contains(&other));
        }
    }

    struct Collect<'a>(&'a mut Vec<String>);

    impl ExprVisitorMut for Collect<'_> {
        type Error = std::convert::Infallible;
        fn pre_visit(&mut self, expr: &mut Expr) -> Result<bool, Self::Error> {
            if let Expr::MatrixSelector(m) = expr {
                self.0.extend(
                    m.vs.matchers
                        .matchers
                        .iter()
                        .filter(|m| m.name == "a")
                        .map(|m| m.value.clone()),
                );
            }
            Ok(true)
        }
    }

    #[test]
    fn quote_meta_matches_go() {
        assert_eq!(quote_meta(r"a.b*c\d"), r"a\.b\*c\\d");
        assert_eq!(quote_meta("plain-value_1"), "plain-value_1");
    }
}
