//! Kubernetes label selectors, as the HPA sends them in `?labelSelector=`.
//!
//! A port of `k8s.io/apimachinery/pkg/labels.Parse`, rule for rule: its lexer (keywords `in` and
//! `notin`, which are also valid keys and values), its grammar (comma-separated `k=v`, `k==v`,
//! `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k` (exists) and `!k` (does not exist); `()` and the
//! gaps in `(a,,b)` are the empty value), its validation of keys and values and its error
//! messages, so a selector is accepted or refused here exactly as kube-apiserver would, in the
//! same words. `k>n` / `k<n` parse upstream but mean nothing for Prometheus' string labels, so
//! they are refused with a clear message rather than silently ignored. Sizes are bounded so a
//! hostile selector costs nothing. What a requirement means on Prometheus series is
//! `promql::matchers_for`.

use std::collections::BTreeSet;
use std::fmt;

use crate::{Error, Result};

/// Longest selector accepted, in bytes.
pub const MAX_SELECTOR_BYTES: usize = 4096;
/// Most requirements accepted in one selector.
pub const MAX_REQUIREMENTS: usize = 32;
/// Most values accepted in one `in`/`notin` set.
pub const MAX_SET_VALUES: usize = 64;

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Requirement {
    Equals {
        key: String,
        value: String,
    },
    NotEquals {
        key: String,
        value: String,
    },
    In {
        key: String,
        values: BTreeSet<String>,
    },
    NotIn {
        key: String,
        values: BTreeSet<String>,
    },
    Exists {
        key: String,
    },
    DoesNotExist {
        key: String,
    },
}

impl Requirement {
    pub fn key(&self) -> &str {
        match self {
            Requirement::Equals { key, .. }
            | Requirement::NotEquals { key, .. }
            | Requirement::In { key, .. }
            | Requirement::NotIn { key, .. }
            | Requirement::Exists { key }
            | Requirement::DoesNotExist { key } => key,
        }
    }
}

/// A parsed selector: requirements sorted, so equal selectors are equal values (and cache keys).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector that matches everything (no `labelSelector` parameter).
    pub fn everything() -> Self {
        Selector::default()
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Parses `labelSelector` exactly as `labels.Parse` does (same grammar, same validation,
    /// same messages); errors are [`Error::BadSelector`] (a 400). Two deliberate differences,
    /// both refusals: the size bounds above, and a NUL byte, which ends the input for
    /// Kubernetes' lexer (the rest would be silently dropped).
    pub fn parse(input: &str) -> Result<Selector> {
        if input.len() > MAX_SELECTOR_BYTES {
            return Err(bad(format!(
                "selector is {} bytes; at most {MAX_SELECTOR_BYTES} are accepted",
                input.len()
            )));
        }
        if let Some(at) = input.find('\0') {
            return Err(bad(format!(
                "NUL byte at position {at}: Kubernetes' parser would stop reading there and \
                 ignore the rest of the selector, so it is refused"
            )));
        }
        let mut parser = Parser {
            tokens: lex(input),
            pos: 0,
        };
        let mut requirements = parser.parse()?;
        // Canonical order: by key (as upstream prints), then by requirement.
        requirements.sort_by(|a, b| a.key().cmp(b.key()).then_with(|| a.cmp(b)));
        requirements.dedup();
        Ok(Selector { requirements })
    }
}

impl fmt::Display for Selector {
    /// The canonical text form (as `labels.Selector.String()` would print it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |vs: &BTreeSet<String>| vs.iter().cloned().collect::<Vec<_>>().join(",");
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::Equals { key, value } => write!(f, "{key}={value}")?,
                Requirement::NotEquals { key, value } => write!(f, "{key}!={value}")?,
                Requirement::In { key, values } => write!(f, "{key} in ({})", join(values))?,
                Requirement::NotIn { key, values } => write!(f, "{key} notin ({})", join(values))?,
                Requirement::Exists { key } => write!(f, "{key}")?,
                Requirement::DoesNotExist { key } => write!(f, "!{key}")?,
            }
        }
        Ok(())
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::BadSelector(msg.into())
}

/// The lexer's tokens (`labels.Token`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    End,
    ClosedPar,
    Comma,
    DoesNotExist,
    DoubleEquals,
    Equals,
    GreaterThan,
    Identifier(String),
    In,
    LessThan,
    NotEquals,
    NotIn,
    OpenPar,
}

impl Token {
    /// The literal, as upstream's messages quote it (`''` at the end).
    fn literal(&self) -> &str {
        match self {
            Token::End => "",
            Token::ClosedPar => ")",
            Token::Comma => ",",
            Token::DoesNotExist => "!",
            Token::DoubleEquals => "==",
            Token::Equals => "=",
            Token::GreaterThan => ">",
            Token::Identifier(s) => s,
            Token::In => "in",
            Token::LessThan => "<",
            Token::NotEquals => "!=",
            Token::NotIn => "notin",
            Token::OpenPar => "(",
        }
    }

    fn symbol(s: &str) -> Option<Token> {
        Some(match s {
            ")" => Token::ClosedPar,
            "," => Token::Comma,
            "!" => Token::DoesNotExist,
            "==" => Token::DoubleEquals,
            "=" => Token::Equals,
            ">" => Token::GreaterThan,
            "<" => Token::LessThan,
            "!=" => Token::NotEquals,
            "(" => Token::OpenPar,
            _ => return None,
        })
    }
}

fn is_whitespace(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_special(c: u8) -> bool {
    matches!(c, b'=' | b'!' | b'(' | b')' | b',' | b'>' | b'<')
}

/// `labels.Lexer`: identifiers run to whitespace or a special symbol; special symbols are read
/// greedily as long as they form a token (`==`, `!=`); `in` and `notin` are keywords.
fn lex(text: &str) -> Vec<Token> {
    let s = text.as_bytes();
    let mut tokens = Vec::new();
    let mut pos = 0;
    loop {
        while pos < s.len() && is_whitespace(s[pos]) {
            pos += 1;
        }
        if pos == s.len() {
            tokens.push(Token::End);
            return tokens;
        }
        let start = pos;
        if is_special(s[pos]) {
            // Every single special symbol is a token; a second one extends it only into `==`
            // or `!=`.
            pos += 1;
            if pos < s.len() && is_special(s[pos]) && Token::symbol(&text[start..=pos]).is_some() {
                pos += 1;
            }
            tokens.push(Token::symbol(&text[start..pos]).expect("a special symbol"));
        } else {
            while pos < s.len() && !is_special(s[pos]) && !is_whitespace(s[pos]) {
                pos += 1;
            }
            tokens.push(match &text[start..pos] {
                "in" => Token::In,
                "notin" => Token::NotIn,
                word => Token::Identifier(word.to_owned()),
            });
        }
    }
}

/// Where a token is read: in `Values`, the keywords `in` and `notin` are identifiers
/// (`in in (notin)` is a valid selector).
#[derive(Clone, Copy, PartialEq)]
enum Context {
    KeyAndOperator,
    Values,
}

/// An operator as parsed, before `>`/`<` are refused.
#[derive(Clone, Copy, PartialEq)]
enum Op {
    Exists,
    DoesNotExist,
    Equals,
    NotEquals,
    In,
    NotIn,
    GreaterThan,
    LessThan,
}

/// `labels.Parser`, rule for rule.
struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn lookahead(&self, context: Context) -> Token {
        let token = self.tokens[self.pos.min(self.tokens.len() - 1)].clone();
        match (context, token) {
            (Context::Values, Token::In) => Token::Identifier("in".to_owned()),
            (Context::Values, Token::NotIn) => Token::Identifier("notin".to_owned()),
            (_, token) => token,
        }
    }

    fn consume(&mut self, context: Context) -> Token {
        let token = self.lookahead(context);
        self.pos += 1;
        token
    }

    fn parse(&mut self) -> Result<Vec<Requirement>> {
        let mut requirements = Vec::new();
        loop {
            match self.lookahead(Context::Values) {
                Token::Identifier(_) | Token::DoesNotExist => {
                    if requirements.len() == MAX_REQUIREMENTS {
                        return Err(bad(format!("more than {MAX_REQUIREMENTS} requirements")));
                    }
                    let (key, op, values) = self
                        .requirement()
                        .map_err(|e| bad(format!("unable to parse requirement: {e}")))?;
                    requirements.push(to_requirement(key, op, values)?);
                    match self.consume(Context::Values) {
                        Token::End => return Ok(requirements),
                        Token::Comma => {
                            let next = self.lookahead(Context::Values);
                            if !matches!(next, Token::Identifier(_) | Token::DoesNotExist) {
                                return Err(bad(format!(
                                    "found '{}', expected: identifier after ','",
                                    next.literal()
                                )));
                            }
                        }
                        other => {
                            return Err(bad(format!(
                                "found '{}', expected: ',' or 'end of string'",
                                other.literal()
                            )));
                        }
                    }
                }
                Token::End => return Ok(requirements),
                other => {
                    return Err(bad(format!(
                        "found '{}', expected: !, identifier, or 'end of string'",
                        other.literal()
                    )));
                }
            }
        }
    }

    /// One requirement: key, operator and values, validated as `NewRequirement` does.
    fn requirement(&mut self) -> std::result::Result<(String, Op, BTreeSet<String>), String> {
        let (key, inferred) = self.key_and_infer_operator()?;
        if let Some(op) = inferred {
            return Ok((key, op, BTreeSet::new()));
        }
        let op = self.operator()?;
        let values = match op {
            Op::In | Op::NotIn => self.values()?,
            _ => self.exact_value()?,
        };
        // `values.List()`: the sorted set, indexed in messages as `values[i][key]`.
        let errors: Vec<String> = values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let errs = label_value_errors(v);
                (!errs.is_empty()).then(|| {
                    format!(
                        "values[{i}][{key}]: Invalid value: {v:?}: {}",
                        errs.join("; ")
                    )
                })
            })
            .collect();
        match errors.len() {
            0 => Ok((key, op, values)),
            1 => Err(errors.into_iter().next().unwrap_or_default()),
            _ => Err(format!("[{}]", errors.join(", "))),
        }
    }

    fn key_and_infer_operator(&mut self) -> std::result::Result<(String, Option<Op>), String> {
        let mut op = None;
        let mut token = self.consume(Context::Values);
        if token == Token::DoesNotExist {
            op = Some(Op::DoesNotExist);
            token = self.consume(Context::Values);
        }
        let Token::Identifier(key) = token else {
            return Err(format!("found '{}', expected: identifier", token.literal()));
        };
        let errs = qualified_name_errors(&key);
        if !errs.is_empty() {
            return Err(format!(
                "<nil>: Invalid value: {key:?}: {}",
                errs.join("; ")
            ));
        }
        if op.is_none() && matches!(self.lookahead(Context::Values), Token::End | Token::Comma) {
            op = Some(Op::Exists);
        }
        Ok((key, op))
    }

    fn operator(&mut self) -> std::result::Result<Op, String> {
        Ok(match self.consume(Context::KeyAndOperator) {
            Token::In => Op::In,
            Token::Equals | Token::DoubleEquals => Op::Equals,
            Token::GreaterThan => Op::GreaterThan,
            Token::LessThan => Op::LessThan,
            Token::NotIn => Op::NotIn,
            Token::NotEquals => Op::NotEquals,
            other => {
                return Err(format!(
                    "found '{}', expected: in, notin, =, ==, !=, gt, lt",
                    other.literal()
                ));
            }
        })
    }

    /// `(a,b)`; `()` is the set of the empty value, as upstream parses it.
    fn values(&mut self) -> std::result::Result<BTreeSet<String>, String> {
        let open = self.consume(Context::Values);
        if open != Token::OpenPar {
            return Err(format!("found '{}' expected: '('", open.literal()));
        }
        match self.lookahead(Context::Values) {
            Token::Identifier(_) | Token::Comma => {
                let values = self.identifiers_list()?;
                // identifiers_list only returns before a ')'.
                self.consume(Context::Values);
                Ok(values)
            }
            Token::ClosedPar => {
                self.consume(Context::Values);
                Ok(BTreeSet::from([String::new()]))
            }
            other => Err(format!(
                "found '{}', expected: ',', ')' or identifier",
                other.literal()
            )),
        }
    }

    /// `parseIdentifiersList`: empty values where commas leave them (`(,a)`, `(a,,b)`, `(a,)`).
    fn identifiers_list(&mut self) -> std::result::Result<BTreeSet<String>, String> {
        let mut values = BTreeSet::new();
        loop {
            if values.len() > MAX_SET_VALUES {
                return Err(format!("more than {MAX_SET_VALUES} values in a set"));
            }
            match self.consume(Context::Values) {
                Token::Identifier(value) => {
                    values.insert(value);
                    if values.len() > MAX_SET_VALUES {
                        return Err(format!("more than {MAX_SET_VALUES} values in a set"));
                    }
                    match self.lookahead(Context::Values) {
                        Token::Comma => continue,
                        Token::ClosedPar => return Ok(values),
                        other => {
                            return Err(format!(
                                "found '{}', expected: ',' or ')'",
                                other.literal()
                            ));
                        }
                    }
                }
                Token::Comma => {
                    if values.is_empty() {
                        values.insert(String::new());
                    }
                    match self.lookahead(Context::Values) {
                        Token::ClosedPar => {
                            values.insert(String::new());
                            return Ok(values);
                        }
                        Token::Comma => {
                            self.consume(Context::Values);
                            values.insert(String::new());
                        }
                        _ => {}
                    }
                }
                other => {
                    return Err(format!(
                        "found '{}', expected: ',', or identifier",
                        other.literal()
                    ));
                }
            }
        }
    }

    fn exact_value(&mut self) -> std::result::Result<BTreeSet<String>, String> {
        if matches!(self.lookahead(Context::Values), Token::End | Token::Comma) {
            return Ok(BTreeSet::from([String::new()]));
        }
        match self.consume(Context::Values) {
            Token::Identifier(value) => Ok(BTreeSet::from([value])),
            other => Err(format!("found '{}', expected: identifier", other.literal())),
        }
    }
}

/// A parsed requirement as ours; `>`/`<` (valid upstream, on integers) mean nothing for
/// Prometheus' string labels, so they are refused rather than silently ignored.
fn to_requirement(key: String, op: Op, values: BTreeSet<String>) -> Result<Requirement> {
    let single = |values: BTreeSet<String>| values.into_iter().next().unwrap_or_default();
    Ok(match op {
        Op::Exists => Requirement::Exists { key },
        Op::DoesNotExist => Requirement::DoesNotExist { key },
        Op::Equals => Requirement::Equals {
            key,
            value: single(values),
        },
        Op::NotEquals => Requirement::NotEquals {
            key,
            value: single(values),
        },
        Op::In => Requirement::In { key, values },
        Op::NotIn => Requirement::NotIn { key, values },
        Op::GreaterThan | Op::LessThan => {
            let symbol = if op == Op::GreaterThan { '>' } else { '<' };
            return Err(bad(format!(
                "operator '{symbol}' on {key:?} is not supported: Prometheus labels are strings; \
                 use =, ==, !=, in, notin, exists or !exists"
            )));
        }
    })
}

const QUALIFIED_NAME_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const QUALIFIED_NAME_MSG: &str = "must consist of alphanumeric characters, '-', '_' or '.', and \
                                  must start and end with an alphanumeric character";
const DNS1123_SUBDOMAIN_FMT: &str =
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case \
                                     alphanumeric characters, '-' or '.', and must start and end \
                                     with an alphanumeric character";
const LABEL_VALUE_FMT: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric \
                               characters, '-', '_' or '.', and must start and end with an \
                               alphanumeric character";

/// `validation.RegexError`, word for word.
fn regex_error(msg: &str, fmt: &str, examples: &[&str]) -> String {
    let mut out = format!("{msg} (e.g. ");
    for (i, example) in examples.iter().enumerate() {
        if i > 0 {
            out.push_str(" or ");
        }
        out.push_str(&format!("'{example}', "));
    }
    out.push_str(&format!("regex used for validation is '{fmt}')"));
    out
}

/// `validation.IsQualifiedName`: an optional DNS-subdomain prefix and '/', then a name of at
/// most 63 characters. Empty when valid.
fn qualified_name_errors(key: &str) -> Vec<String> {
    let name_regex_error = || {
        regex_error(
            QUALIFIED_NAME_MSG,
            QUALIFIED_NAME_FMT,
            &["MyName", "my.name", "123-abc"],
        )
    };
    let mut errors = Vec::new();
    let parts: Vec<&str> = key.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errors.push("prefix part must be non-empty".to_owned());
            } else {
                errors.extend(
                    dns1123_subdomain_errors(prefix)
                        .into_iter()
                        .map(|e| format!("prefix part {e}")),
                );
            }
            *name
        }
        _ => {
            return vec![format!(
                "a qualified name {} with an optional DNS subdomain prefix and '/' (e.g. \
                 'example.com/MyName')",
                name_regex_error()
            )];
        }
    };
    if name.is_empty() {
        errors.push("name part must be non-empty".to_owned());
    } else if name.len() > 63 {
        errors.push("name part must be no more than 63 characters".to_owned());
    }
    if !is_qualified_name_part(name) {
        errors.push(format!("name part {}", name_regex_error()));
    }
    errors
}

fn dns1123_subdomain_errors(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > 253 {
        errors.push("must be no more than 253 characters".to_owned());
    }
    let valid = value.split('.').all(|part| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !part.starts_with('-')
            && !part.ends_with('-')
    });
    if !valid {
        errors.push(regex_error(
            DNS1123_SUBDOMAIN_MSG,
            DNS1123_SUBDOMAIN_FMT,
            &["example.com"],
        ));
    }
    errors
}

/// `validation.IsValidLabelValue`: empty, or a qualified name part of at most 63 characters.
fn label_value_errors(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > 63 {
        errors.push("must be no more than 63 characters".to_owned());
    }
    if !value.is_empty() && !is_qualified_name_part(value) {
        errors.push(regex_error(
            LABEL_VALUE_MSG,
            LABEL_VALUE_FMT,
            &["MyValue", "my_value", "12345"],
        ));
    }
    errors
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, any length.
fn is_qualified_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A label key as Kubernetes validates it (for HPA manifests).
pub(crate) fn validate_label_key(key: &str) -> Result<()> {
    let errors = qualified_name_errors(key);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(bad(format!(
            "invalid label key {key:?}: {}",
            errors.join("; ")
        )))
    }
}

/// A label value as Kubernetes validates it (for HPA manifests).
pub(crate) fn validate_label_value(value: &str) -> Result<()> {
    let errors = label_value_errors(value);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(bad(format!(
            "invalid label value {value:?}: {}",
            errors.join("; ")
        )))
    }
}

/// A valid Kubernetes namespace (DNS-1123 label).
pub fn validate_namespace(ns: &str) -> Result<()> {
    let b = ns.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(Error::BadNamespace(ns.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(vs: &[&str]) -> BTreeSet<String> {
        vs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_operator_of_the_grammar_parses() {
        let s = Selector::parse("a=1, b==2,c!=3, d in (x, y), e notin (z), f, !g").unwrap();
        let want = vec![
            Requirement::Equals {
                key: "a".into(),
                value: "1".into(),
            },
            Requirement::Equals {
                key: "b".into(),
                value: "2".into(),
            },
            Requirement::NotEquals {
                key: "c".into(),
                value: "3".into(),
            },
            Requirement::In {
                key: "d".into(),
                values: set(&["x", "y"]),
            },
            Requirement::NotIn {
                key: "e".into(),
                values: set(&["z"]),
            },
            Requirement::Exists { key: "f".into() },
            Requirement::DoesNotExist { key: "g".into() },
        ];
        assert_eq!(s.requirements, want);
    }

    #[test]
    fn empty_selector_means_everything() {
        assert!(Selector::parse("").unwrap().is_empty());
        assert!(Selector::parse("   ").unwrap().is_empty());
    }

    #[test]
    fn empty_values_are_allowed_as_upstream_allows_them() {
        let s = Selector::parse("a=").unwrap();
        assert_eq!(
            s.requirements,
            vec![Requirement::Equals {
                key: "a".into(),
                value: "".into()
            }]
        );
    }

    #[test]
    fn prefixed_keys_parse() {
        assert!(Selector::parse("app.kubernetes.io/name=limiter").is_ok());
    }

    #[test]
    fn malformed_selectors_are_bad_requests() {
        for bad in [
            "a=b=c", "a in b", "a in (b", "=b", "a b", "a,", ",a", "a!b", "a=(b)", "a=\"b\"",
            "-a=b", "a=b-", "a=${x}", "a='b'", "a=b}", "a=b\u{0}", "a/=b", "/a=b", "A_B/c=d",
            "a=b c",
        ] {
            match Selector::parse(bad) {
                Err(Error::BadSelector(msg)) => assert!(!msg.is_empty(), "{bad}"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    /// Selectors `labels.Parse` accepts (kubernetes/apimachinery pkg/labels/selector.go),
    /// including the corners of its grammar: `in`/`notin` as keys and values, empty values in
    /// sets (`()` is the set of the empty value), a space after `!`.
    #[test]
    fn every_selector_kubernetes_accepts_is_accepted() {
        let cases: [(&str, Vec<Requirement>); 9] = [
            (
                "x in (foo,,baz),y,z notin ()",
                vec![
                    Requirement::In {
                        key: "x".into(),
                        values: set(&["", "baz", "foo"]),
                    },
                    Requirement::Exists { key: "y".into() },
                    Requirement::NotIn {
                        key: "z".into(),
                        values: set(&[""]),
                    },
                ],
            ),
            (
                "a in ( )",
                vec![Requirement::In {
                    key: "a".into(),
                    values: set(&[""]),
                }],
            ),
            (
                "a in (,)",
                vec![Requirement::In {
                    key: "a".into(),
                    values: set(&[""]),
                }],
            ),
            (
                "a notin (b,)",
                vec![Requirement::NotIn {
                    key: "a".into(),
                    values: set(&["", "b"]),
                }],
            ),
            ("in", vec![Requirement::Exists { key: "in".into() }]),
            (
                "notin=in",
                vec![Requirement::Equals {
                    key: "notin".into(),
                    value: "in".into(),
                }],
            ),
            (
                "in in (in,notin)",
                vec![Requirement::In {
                    key: "in".into(),
                    values: set(&["in", "notin"]),
                }],
            ),
            ("! a", vec![Requirement::DoesNotExist { key: "a".into() }]),
            (
                "a=,b!=",
                vec![
                    Requirement::Equals {
                        key: "a".into(),
                        value: "".into(),
                    },
                    Requirement::NotEquals {
                        key: "b".into(),
                        value: "".into(),
                    },
                ],
            ),
        ];
        for (text, want) in cases {
            match Selector::parse(text) {
                Ok(s) => assert_eq!(s.requirements, want, "{text}"),
                Err(e) => panic!("{text:?}: Kubernetes accepts it, this parser said {e}"),
            }
        }
        // A DNS-subdomain prefix is checked as a whole (at most 253 characters), not per label.
        let long_label_prefix = format!("{}.example.com/name", "a".repeat(70));
        assert!(Selector::parse(&long_label_prefix).is_ok());
    }

    /// The messages of `labels.Parse`, so a selector refused here reads as kube-apiserver
    /// would word it.
    #[test]
    fn errors_are_worded_as_kubernetes_words_them() {
        let message = |text: &str| match Selector::parse(text) {
            Err(Error::BadSelector(m)) => m,
            other => panic!("{text:?} gave {other:?}"),
        };
        for (text, want) in [
            (
                "a b",
                "unable to parse requirement: found 'b', expected: in, notin, =, ==, !=, gt, lt",
            ),
            ("a=b c", "found 'c', expected: ',' or 'end of string'"),
            ("a,", "found '', expected: identifier after ','"),
            (
                ",a",
                "found ',', expected: !, identifier, or 'end of string'",
            ),
            (
                "a in b",
                "unable to parse requirement: found 'b' expected: '('",
            ),
            (
                "a in (b",
                "unable to parse requirement: found '', expected: ',' or ')'",
            ),
            (
                "a!b",
                "unable to parse requirement: found '!', expected: in, notin, =, ==, !=, gt, lt",
            ),
            (
                "!",
                "unable to parse requirement: found '', expected: identifier",
            ),
            (
                "-a=b",
                "unable to parse requirement: <nil>: Invalid value: \"-a\": name part must consist of \
                 alphanumeric characters, '-', '_' or '.', and must start and end with an \
                 alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used \
                 for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')",
            ),
            (
                "a=b-",
                "unable to parse requirement: values[0][a]: Invalid value: \"b-\": a valid label \
                 must be an empty string or consist of alphanumeric characters, '-', '_' or '.', \
                 and must start and end with an alphanumeric character (e.g. 'MyValue',  or \
                 'my_value',  or '12345', regex used for validation is \
                 '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')",
            ),
        ] {
            assert_eq!(message(text), want, "{text:?}");
        }
        assert!(
            message("A_B/c=d").starts_with(
                "unable to parse requirement: <nil>: Invalid value: \"A_B/c\": prefix part a \
                 lowercase RFC 1123 subdomain"
            ),
            "{}",
            message("A_B/c=d")
        );
    }

    #[test]
    fn comparison_operators_are_refused_as_unsupported() {
        let err = Selector::parse("a>1").unwrap_err().to_string();
        assert!(err.contains("not supported"), "{err}");
        assert!(Selector::parse("a < 1").is_err());
    }

    #[test]
    fn huge_selectors_are_refused_cheaply() {
        let long = format!("a={}", "x".repeat(MAX_SELECTOR_BYTES));
        assert!(
            Selector::parse(&long)
                .unwrap_err()
                .to_string()
                .contains("bytes")
        );
        let many: Vec<String> = (0..=MAX_REQUIREMENTS).map(|i| format!("k{i}=v")).collect();
        assert!(Selector::parse(&many.join(",")).is_err());
        let values: Vec<String> = (0..=MAX_SET_VALUES).map(|i| format!("v{i}")).collect();
        assert!(Selector::parse(&format!("k in ({})", values.join(","))).is_err());
        let long_value = format!("a={}", "x".repeat(64));
        assert!(Selector::parse(&long_value).is_err());
    }

    #[test]
    fn selectors_print_canonically_and_reparse_equal() {
        let s = Selector::parse("z=1,a in (y,x),!b").unwrap();
        assert_eq!(s.to_string(), "a in (x,y),!b,z=1");
        assert_eq!(Selector::parse(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn namespaces_are_dns_labels() {
        assert!(validate_namespace("default").is_ok());
        assert!(validate_namespace("kube-system").is_ok());
        for bad in ["", "..", "a/b", "Default", "-a", "a-", &"a".repeat(64)] {
            assert!(validate_namespace(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_input_never_panics(s in ".{0,200}") {
            let _ = Selector::parse(&s);
        }
    }
}
