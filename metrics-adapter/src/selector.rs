//! Kubernetes label selectors, as the HPA sends them in `?labelSelector=`.
//!
//! The grammar is that of `k8s.io/apimachinery/pkg/labels.Parse`: comma-separated requirements
//! `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k` (exists) and `!k` (does not exist),
//! with keys and values validated as Kubernetes validates them. `k>n` / `k<n` parse upstream
//! but mean nothing for Prometheus labels, so they are refused with a clear message rather than
//! silently ignored. Sizes are bounded so a hostile selector costs nothing.

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

    /// Parses `labelSelector`; errors are [`Error::BadSelector`] (a 400).
    pub fn parse(input: &str) -> Result<Selector> {
        if input.len() > MAX_SELECTOR_BYTES {
            return Err(bad(format!(
                "selector is {} bytes; at most {MAX_SELECTOR_BYTES} are accepted",
                input.len()
            )));
        }
        let mut parser = Parser {
            s: input.as_bytes(),
            pos: 0,
            text: input,
        };
        let mut requirements = Vec::new();
        parser.skip_ws();
        if parser.at_end() {
            return Ok(Selector::everything());
        }
        loop {
            if requirements.len() == MAX_REQUIREMENTS {
                return Err(bad(format!("more than {MAX_REQUIREMENTS} requirements")));
            }
            requirements.push(parser.requirement()?);
            parser.skip_ws();
            if parser.at_end() {
                break;
            }
            parser.expect(b',')?;
        }
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

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    text: &'a str,
}

impl Parser<'_> {
    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn err_here(&self, what: &str) -> Error {
        let found = match self.peek() {
            None => "end of selector".to_owned(),
            Some(_) => {
                let rest: String = self.text[self.pos..].chars().take(12).collect();
                format!("{rest:?}")
            }
        };
        bad(format!("{what} at position {}, found {found}", self.pos))
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err_here(&format!("expected '{}'", c as char)))
        }
    }

    /// A bare word: anything up to whitespace or a delimiter.
    fn word(&mut self) -> &str {
        self.skip_ws();
        let start = self.pos;
        while let Some(c) = self.peek() {
            if matches!(
                c,
                b' ' | b'\t' | b'\n' | b'\r' | b',' | b'(' | b')' | b'=' | b'!' | b'<' | b'>'
            ) {
                break;
            }
            self.pos += 1;
        }
        &self.text[start..self.pos]
    }

    fn key(&mut self) -> Result<String> {
        let start = self.pos;
        let key = self.word().to_owned();
        if key.is_empty() {
            self.pos = start;
            self.skip_ws();
            return Err(self.err_here("expected a label key"));
        }
        validate_label_key(&key)?;
        Ok(key)
    }

    fn value(&mut self) -> Result<String> {
        let value = self.word().to_owned();
        validate_label_value(&value)?;
        Ok(value)
    }

    fn requirement(&mut self) -> Result<Requirement> {
        self.skip_ws();
        if self.peek() == Some(b'!') {
            self.pos += 1;
            let key = self.key()?;
            return Ok(Requirement::DoesNotExist { key });
        }
        let key = self.key()?;
        self.skip_ws();
        match self.peek() {
            None | Some(b',') => Ok(Requirement::Exists { key }),
            Some(b'=') => {
                self.pos += 1;
                if self.peek() == Some(b'=') {
                    self.pos += 1;
                }
                let value = self.value()?;
                Ok(Requirement::Equals { key, value })
            }
            Some(b'!') => {
                self.pos += 1;
                if self.peek() != Some(b'=') {
                    return Err(self.err_here("expected '=' after '!'"));
                }
                self.pos += 1;
                let value = self.value()?;
                Ok(Requirement::NotEquals { key, value })
            }
            Some(b'<' | b'>') => Err(bad(format!(
                "operator '{}' on {key:?} is not supported: Prometheus labels are strings; \
                 use =, ==, !=, in, notin, exists or !exists",
                self.peek().map(char::from).unwrap_or('?')
            ))),
            Some(_) => {
                let word_start = self.pos;
                let op = self.word().to_owned();
                match op.as_str() {
                    "in" | "notin" => {
                        let values = self.set()?;
                        Ok(if op == "in" {
                            Requirement::In { key, values }
                        } else {
                            Requirement::NotIn { key, values }
                        })
                    }
                    _ => {
                        self.pos = word_start;
                        Err(self.err_here(&format!(
                            "expected an operator (=, ==, !=, in, notin) after key {key:?}"
                        )))
                    }
                }
            }
        }
    }

    fn set(&mut self) -> Result<BTreeSet<String>> {
        self.expect(b'(')?;
        let mut values = BTreeSet::new();
        loop {
            if values.len() == MAX_SET_VALUES {
                return Err(bad(format!("more than {MAX_SET_VALUES} values in a set")));
            }
            let value = self.value()?;
            values.insert(value);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b')') => {
                    self.pos += 1;
                    break;
                }
                _ => return Err(self.err_here("expected ',' or ')' in a value set")),
            }
        }
        if values.len() == 1 && values.contains("") {
            // `k in ()`: upstream refuses an empty set.
            return Err(bad("'in' and 'notin' need at least one value"));
        }
        Ok(values)
    }
}

/// Label keys: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters
/// (`[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`).
pub(crate) fn validate_label_key(key: &str) -> Result<()> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let ok = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !ok {
            return Err(bad(format!(
                "invalid label key {key:?}: the prefix must be a DNS subdomain"
            )));
        }
    }
    if name.is_empty() || !is_label_name_or_value(name) {
        return Err(bad(format!(
            "invalid label key {key:?}: a name must be 63 characters or less, start and end with \
             an alphanumeric character, and contain only alphanumerics, '-', '_' or '.'"
        )));
    }
    Ok(())
}

/// Label values: empty, or a name as in [`validate_label_key`].
pub(crate) fn validate_label_value(value: &str) -> Result<()> {
    if value.is_empty() || is_label_name_or_value(value) {
        Ok(())
    } else {
        Err(bad(format!(
            "invalid label value {value:?}: must be 63 characters or less, start and end with an \
             alphanumeric character, and contain only alphanumerics, '-', '_' or '.'"
        )))
    }
}

fn is_label_name_or_value(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() <= 63
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
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
    fn malformed_selectors_are_bad_requests_with_a_position() {
        for bad in [
            "a=b=c", "a in b", "a in (b", "a in ()", "=b", "a b", "a,", ",a", "a!b", "a=(b)",
            "a=\"b\"", "-a=b", "a=b-", "a=${x}", "a='b'", "a=b}", "a=b\u{0}", "a/=b", "/a=b",
            "A_B/c=d", "a=b c",
        ] {
            match Selector::parse(bad) {
                Err(Error::BadSelector(msg)) => assert!(!msg.is_empty(), "{bad}"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
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
