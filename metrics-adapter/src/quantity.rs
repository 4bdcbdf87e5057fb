//! Kubernetes `resource.Quantity`: the exact decimal arithmetic and canonical text the HPA reads.
//!
//! Prometheus answers with decimal strings (`"0.8"`, `"1e-05"`, `"NaN"`); the HPA reads each
//! item's value with `MilliValue()`, which rounds *away from zero* to a whole milli-unit. So we
//! never go through `f64` arithmetic on the serving path: [`Decimal`] keeps values exactly (to
//! 10^-12, anything finer rounds away from zero), aggregation adds decimals, and [`Milli`] is what
//! is served, formatted exactly as `Quantity.String()` formats a DecimalSI quantity
//! (`800m`, `1500m`, `2k`, `0`). Values the HPA could not represent (NaN, ±Inf, beyond an
//! `int64` of milli-units) are refused with an error rather than served as garbage, the
//! `-9223372036854775808m` that some Go adapters serve for NaN.

use std::cmp::Ordering;
use std::fmt;

use crate::{Error, Result};

/// Picos per unit: the fixed-point scale of [`Decimal`].
const SCALE: i128 = 1_000_000_000_000;
/// Picos per milli-unit.
const PICOS_PER_MILLI: i128 = 1_000_000_000;

/// An exact, finite decimal with 12 fractional digits (a pico-unit fixed point in an `i128`).
///
/// Parsing rounds digits finer than 10^-12 away from zero, so a tiny positive value never becomes
/// zero (the HPA's `MilliValue` would round it up to `1m`; so do we).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Decimal(i128);

impl Decimal {
    pub const ZERO: Decimal = Decimal(0);

    /// Parses a Prometheus sample value (`"12.5"`, `"1e-05"`, `"-3"`, `"NaN"`, `"+Inf"`).
    ///
    /// Returns [`Error::NonFinite`] for NaN and infinities and [`Error::QuantityRange`] for
    /// values too large for the HPA (see [`Milli`]).
    pub fn parse_sample(text: &str) -> Result<Decimal> {
        let t = text.trim();
        match t.to_ascii_lowercase().as_str() {
            "nan" | "+nan" | "-nan" => return Err(Error::NonFinite(t.to_owned())),
            "inf" | "+inf" | "-inf" | "infinity" | "+infinity" | "-infinity" => {
                return Err(Error::NonFinite(t.to_owned()));
            }
            _ => {}
        }
        parse_decimal(t).ok_or_else(|| Error::BadSample(t.to_owned()))?
    }

    /// Converts a configured `f64` (e.g. `on_empty: {value: 0.5}`) through its shortest decimal
    /// text, so `0.1` is exactly one tenth and not `0.1000000000000000055…`.
    pub fn from_f64(v: f64) -> Result<Decimal> {
        if !v.is_finite() {
            return Err(Error::NonFinite(v.to_string()));
        }
        Decimal::parse_sample(&format!("{v}"))
    }

    /// Exact sum; an overflow of the (very wide) fixed point is a range error.
    pub fn checked_add(self, other: Decimal) -> Result<Decimal> {
        self.0
            .checked_add(other.0)
            .map(Decimal)
            .ok_or_else(|| Error::QuantityRange("sum overflows".to_owned()))
    }

    /// The value rounded away from zero to whole milli-units, as `Quantity.MilliValue()` does.
    pub fn to_milli(self) -> Result<Milli> {
        let whole = self.0 / PICOS_PER_MILLI;
        let rem = self.0 % PICOS_PER_MILLI;
        let milli = match rem.cmp(&0) {
            Ordering::Greater => whole + 1,
            Ordering::Less => whole - 1,
            Ordering::Equal => whole,
        };
        i64::try_from(milli)
            .map(Milli)
            .map_err(|_| Error::QuantityRange(self.to_string()))
    }

    /// Approximate value, for display and for the HPA's float ratios.
    pub fn to_f64(self) -> f64 {
        // Split to keep precision for large values.
        (self.0 / SCALE) as f64 + (self.0 % SCALE) as f64 / SCALE as f64
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let int = abs / SCALE as u128;
        let frac = abs % SCALE as u128;
        if frac == 0 {
            write!(f, "{sign}{int}")
        } else {
            let digits = format!("{frac:012}");
            write!(f, "{sign}{int}.{}", digits.trim_end_matches('0'))
        }
    }
}

/// Parses `[+-]digits[.digits][(e|E)[+-]digits]` exactly into picos. `None`: not a number.
/// `Some(Err)`: a number too large to hold.
fn parse_decimal(t: &str) -> Option<Result<Decimal>> {
    let (negative, rest) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i32>().ok()?),
        None => (rest, 0),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, f),
        None => (mantissa, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    if !int_part
        .bytes()
        .chain(frac_part.bytes())
        .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // All digits as one string; the decimal point sits `point` digits from the left.
    let digits: String = int_part.chars().chain(frac_part.chars()).collect();
    let digits = digits.trim_start_matches('0');
    // Exponent of the least significant digit: value = digits * 10^(exp - frac_len).
    let low_exp = i64::from(exp) - frac_part.len() as i64;
    // We want picos: digits * 10^(low_exp + 12).
    let shift = low_exp + 12;
    let mut value: i128 = 0;
    let mut sticky = false;
    if shift >= 0 {
        for b in digits.bytes() {
            value = value.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
        }
        for _ in 0..shift {
            if value == 0 {
                break;
            }
            value = match value.checked_mul(10) {
                Some(v) => v,
                None => return Some(Err(Error::QuantityRange(t.to_owned()))),
            };
        }
    } else {
        // Drop the last `-shift` digits, remembering whether any was non-zero.
        let drop = usize::try_from(-shift).unwrap_or(usize::MAX);
        let keep = digits.len().saturating_sub(drop);
        let (kept, dropped) = digits.split_at(keep);
        sticky = dropped.bytes().any(|b| b != b'0');
        for b in kept.bytes() {
            value = match value
                .checked_mul(10)
                .and_then(|v| v.checked_add(i128::from(b - b'0')))
            {
                Some(v) => v,
                None => return Some(Err(Error::QuantityRange(t.to_owned()))),
            };
        }
    }
    if sticky {
        value += 1; // away from zero; the sign is applied below
    }
    Some(Ok(Decimal(if negative { -value } else { value })))
}

/// A value in whole milli-units, the unit the HPA computes in. Its `Display` is the canonical
/// Kubernetes DecimalSI text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Milli(pub i64);

impl Milli {
    /// Wraps the canonical text in k8s-openapi's `Quantity`.
    pub fn to_quantity(self) -> k8s_openapi::apimachinery::pkg::api::resource::Quantity {
        k8s_openapi::apimachinery::pkg::api::resource::Quantity(self.to_string())
    }

    pub fn to_f64(self) -> f64 {
        self.0 as f64 / 1000.0
    }
}

impl fmt::Display for Milli {
    /// `Quantity.CanonicalizeBytes` for DecimalSI: strip factors of ten into the exponent, then
    /// step the exponent down to a multiple of three and pick its SI suffix.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("0");
        }
        let mut amount = i128::from(self.0);
        let mut exponent: i32 = -3;
        while amount % 10 == 0 {
            amount /= 10;
            exponent += 1;
        }
        // Go's `%` keeps the dividend's sign; `rem_euclid` gives the same classes here.
        match exponent.rem_euclid(3) {
            1 => {
                amount *= 10;
                exponent -= 1;
            }
            2 => {
                amount *= 100;
                exponent -= 2;
            }
            _ => {}
        }
        let suffix = match exponent {
            -3 => "m",
            0 => "",
            3 => "k",
            6 => "M",
            9 => "G",
            12 => "T",
            15 => "P",
            18 => "E",
            // Unreachable for an i64 of milli-units (at most ~9.2e15 units); keep it total.
            e => return write!(f, "{amount}e{e}"),
        };
        write!(f, "{amount}{suffix}")
    }
}

/// Parses a Kubernetes Quantity string (`"500m"`, `"2k"`, `"1.5"`, `"1Ki"`, `"1e3"`) to milli-units,
/// rounding away from zero as `MilliValue()` does. Used for HPA targets in `explain`.
pub fn parse_quantity_milli(text: &str) -> Result<Milli> {
    let t = text.trim();
    let bad = || Error::BadQuantity(t.to_owned());
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    if number.is_empty() {
        return Err(bad());
    }
    let base = match parse_decimal(number) {
        Some(Ok(d)) => d,
        Some(Err(e)) => return Err(e),
        None => return Err(bad()),
    };
    let scaled = |mul: i128, exp10: i32| -> Result<Decimal> {
        let mut v = base
            .0
            .checked_mul(mul)
            .ok_or_else(|| Error::QuantityRange(t.to_owned()))?;
        if exp10 >= 0 {
            for _ in 0..exp10 {
                v = v
                    .checked_mul(10)
                    .ok_or_else(|| Error::QuantityRange(t.to_owned()))?;
            }
            Ok(Decimal(v))
        } else {
            // Only reached for n/u suffixes on values that are already exact in picos.
            let Some(div) = 10i128.checked_pow(exp10.unsigned_abs()) else {
                // Smaller than a pico-unit: only its sign survives (rounded away from zero).
                return Ok(Decimal(v.signum()));
            };
            let (q, r) = (v / div, v % div);
            Ok(Decimal(if r > 0 {
                q + 1
            } else if r < 0 {
                q - 1
            } else {
                q
            }))
        }
    };
    let value = match suffix {
        "" => base,
        "n" => scaled(1, -9)?,
        "u" => scaled(1, -6)?,
        "m" => scaled(1, -3)?,
        "k" => scaled(1, 3)?,
        "M" => scaled(1, 6)?,
        "G" => scaled(1, 9)?,
        "T" => scaled(1, 12)?,
        "P" => scaled(1, 15)?,
        "E" => scaled(1, 18)?,
        "Ki" => scaled(1 << 10, 0)?,
        "Mi" => scaled(1 << 20, 0)?,
        "Gi" => scaled(1 << 30, 0)?,
        "Ti" => scaled(1 << 40, 0)?,
        "Pi" => scaled(1 << 50, 0)?,
        "Ei" => scaled(1 << 60, 0)?,
        s if s.starts_with(['e', 'E']) => {
            let exp: i32 = s[1..].parse().map_err(|_| bad())?;
            scaled(1, exp)?
        }
        _ => return Err(bad()),
    };
    value.to_milli()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(sample: &str) -> String {
        Decimal::parse_sample(sample)
            .unwrap()
            .to_milli()
            .unwrap()
            .to_string()
    }

    #[test]
    fn golden_canonical_quantities_match_kubernetes() {
        let cases = [
            ("0.8", "800m"),
            ("1.5", "1500m"),
            ("2000", "2k"),
            ("0.0001", "1m"),
            ("0", "0"),
            ("-0", "0"),
            ("1", "1"),
            ("10", "10"),
            ("100", "100"),
            ("1000", "1k"),
            ("1500", "1500"),
            ("0.001", "1m"),
            ("0.01", "10m"),
            ("0.1", "100m"),
            ("0.123", "123m"),
            ("0.1234", "124m"),
            ("-0.8", "-800m"),
            ("-0.0001", "-1m"),
            ("-2000", "-2k"),
            ("-1.5", "-1500m"),
            ("1e-05", "1m"),
            ("1e-20", "1m"),
            ("1.5e+10", "15G"),
            ("2e6", "2M"),
            ("1000000000000", "1T"),
            ("1500000000000000", "1500T"),
            ("9000000000000000", "9P"),
            ("123456789.5", "123456789500m"),
            ("42.000", "42"),
            ("0.30000000000000004", "301m"),
        ];
        for (sample, want) in cases {
            assert_eq!(served(sample), want, "sample {sample}");
        }
    }

    #[test]
    fn nan_and_infinities_are_refused_never_served() {
        for s in ["NaN", "+Inf", "-Inf", "nan", "inf"] {
            assert!(
                matches!(Decimal::parse_sample(s), Err(Error::NonFinite(_))),
                "{s}"
            );
        }
        assert!(Decimal::from_f64(f64::NAN).is_err());
    }

    #[test]
    fn values_beyond_what_the_hpa_can_hold_are_a_range_error() {
        let huge = Decimal::parse_sample("1e17").unwrap();
        assert!(matches!(huge.to_milli(), Err(Error::QuantityRange(_))));
        assert!(matches!(
            Decimal::parse_sample("1e300"),
            Err(Error::QuantityRange(_))
        ));
    }

    #[test]
    fn garbage_samples_are_rejected() {
        for s in ["", "abc", "1.2.3", "--1", "1e", "e5", "0x10", "."] {
            assert!(Decimal::parse_sample(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn sums_are_exact_decimals() {
        let a = Decimal::parse_sample("0.1").unwrap();
        let b = Decimal::parse_sample("0.2").unwrap();
        assert_eq!(
            a.checked_add(b).unwrap().to_milli().unwrap().to_string(),
            "300m"
        );
    }

    #[test]
    fn configured_floats_use_their_shortest_decimal_text() {
        assert_eq!(Decimal::from_f64(0.1).unwrap().to_string(), "0.1");
        assert_eq!(
            Decimal::from_f64(-2.5)
                .unwrap()
                .to_milli()
                .unwrap()
                .to_string(),
            "-2500m"
        );
    }

    #[test]
    fn quantity_strings_parse_to_milli_values_like_milli_value() {
        let cases = [
            ("500m", 500),
            ("2k", 2_000_000),
            ("1.5", 1500),
            ("1", 1000),
            ("1Ki", 1_024_000),
            ("1e3", 1_000_000),
            ("100u", 1),
            ("1n", 1),
            ("-100u", -1),
            ("0", 0),
            ("800m", 800),
        ];
        for (text, want) in cases {
            assert_eq!(parse_quantity_milli(text).unwrap(), Milli(want), "{text}");
        }
        for bad in ["", "m", "1x", "1.2.3k", "k1"] {
            assert!(parse_quantity_milli(bad).is_err(), "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn formatted_quantities_parse_back_to_the_same_milli_value(m in -9_000_000_000_000_000i64..9_000_000_000_000_000i64) {
            let text = Milli(m).to_string();
            proptest::prop_assert_eq!(parse_quantity_milli(&text).unwrap(), Milli(m));
        }

        #[test]
        fn rounding_never_moves_toward_zero(v in -1.0e12f64..1.0e12f64) {
            let milli = Decimal::from_f64(v).unwrap().to_milli().unwrap().0 as f64;
            if v > 0.0 { proptest::prop_assert!(milli >= v * 1000.0 - 1e-3 * v.abs().max(1.0)); }
            if v < 0.0 { proptest::prop_assert!(milli <= v * 1000.0 + 1e-3 * v.abs().max(1.0)); }
        }
    }
}
