//! Go-style duration strings ("500ms", "30s", "1m", "168h", "1h30m", "-1s", "0").
//!
//! Praefect's configuration is read by Go, whose `time.ParseDuration` accepts a sign and a
//! sequence of decimal numbers (with optional fraction) each followed by a unit. Operators'
//! existing files use that syntax, so we accept exactly it (crates such as `humantime` accept
//! a different, wider language and no negative values, which `verification_interval` needs).

use std::fmt;
use std::time::Duration as StdDuration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A signed duration with nanosecond resolution, the same range as Go's `time.Duration`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoDuration(i64);

const NANOS_PER_UNIT: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Why a duration string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("invalid duration {0:?}")]
    Invalid(String),
    #[error("missing unit in duration {0:?}")]
    MissingUnit(String),
    #[error("unknown unit {unit:?} in duration {input:?}")]
    UnknownUnit { unit: String, input: String },
    #[error("duration {0:?} is out of range")]
    Overflow(String),
}

impl GoDuration {
    pub const ZERO: GoDuration = GoDuration(0);

    pub const fn from_nanos(nanos: i64) -> Self {
        GoDuration(nanos)
    }

    pub const fn from_secs(secs: i64) -> Self {
        GoDuration(secs * 1_000_000_000)
    }

    pub const fn from_millis(millis: i64) -> Self {
        GoDuration(millis * 1_000_000)
    }

    pub const fn as_nanos(self) -> i64 {
        self.0
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    /// The duration as a std Duration; negative values become zero.
    pub fn to_std(self) -> StdDuration {
        StdDuration::from_nanos(self.0.max(0) as u64)
    }

    /// Parses Go's duration syntax.
    pub fn parse(input: &str) -> Result<Self, DurationError> {
        let invalid = || DurationError::Invalid(input.to_string());
        let (negative, mut rest) = match input.as_bytes().first() {
            Some(b'-') => (true, &input[1..]),
            Some(b'+') => (false, &input[1..]),
            _ => (false, input),
        };
        if rest == "0" {
            return Ok(GoDuration(0));
        }
        if rest.is_empty() {
            return Err(invalid());
        }
        let mut total: u128 = 0;
        while !rest.is_empty() {
            let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            let int_part = &rest[..int_len];
            rest = &rest[int_len..];
            let mut frac_part = "";
            if let Some(after_dot) = rest.strip_prefix('.') {
                let frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
                frac_part = &after_dot[..frac_len];
                rest = &after_dot[frac_len..];
            }
            if int_part.is_empty() && frac_part.is_empty() {
                return Err(invalid());
            }
            let unit_len = rest
                .char_indices()
                .find(|(_, c)| c.is_ascii_digit() || *c == '.')
                .map_or(rest.len(), |(i, _)| i);
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            if unit.is_empty() {
                return Err(DurationError::MissingUnit(input.to_string()));
            }
            let scale = NANOS_PER_UNIT
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, scale)| *scale)
                .ok_or_else(|| DurationError::UnknownUnit {
                    unit: unit.to_string(),
                    input: input.to_string(),
                })?;
            let overflow = || DurationError::Overflow(input.to_string());
            let whole: u128 = if int_part.is_empty() {
                0
            } else {
                int_part.parse().map_err(|_| overflow())?
            };
            let mut value = whole.checked_mul(scale).ok_or_else(overflow)?;
            // The fraction contributes scale * 0.frac, truncated like Go does. Digits past
            // the 18th cannot change a nanosecond count (the largest unit is 3.6e12 ns) and
            // would overflow `frac_value * scale`, so they are ignored.
            let mut divisor: u128 = 1;
            let mut frac_value: u128 = 0;
            for digit in frac_part.bytes().take(18) {
                divisor *= 10;
                frac_value = frac_value * 10 + u128::from(digit - b'0');
            }
            value = value
                .checked_add(frac_value * scale / divisor)
                .ok_or_else(overflow)?;
            total = total.checked_add(value).ok_or_else(overflow)?;
            if total > i64::MAX as u128 + u128::from(negative) {
                return Err(overflow());
            }
        }
        let nanos = if negative {
            (total as i128).wrapping_neg() as i64
        } else {
            total as i64
        };
        Ok(GoDuration(nanos))
    }
}

impl From<StdDuration> for GoDuration {
    fn from(value: StdDuration) -> Self {
        GoDuration(i64::try_from(value.as_nanos()).unwrap_or(i64::MAX))
    }
}

/// Formats like Go's `Duration.String()`: "1h30m0s", "500ms", "0s".
impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0;
        if nanos == 0 {
            return f.write_str("0s");
        }
        let sign = if nanos < 0 { "-" } else { "" };
        let abs = nanos.unsigned_abs();
        if abs < 1_000_000_000 {
            let (value, unit) = if abs < 1_000 {
                return write!(f, "{sign}{abs}ns");
            } else if abs < 1_000_000 {
                (abs as f64 / 1e3, "µs")
            } else {
                (abs as f64 / 1e6, "ms")
            };
            return write!(f, "{sign}{value}{unit}");
        }
        let hours = abs / 3_600_000_000_000;
        let minutes = (abs / 60_000_000_000) % 60;
        let secs = abs % 60_000_000_000;
        let secs_text = if secs.is_multiple_of(1_000_000_000) {
            format!("{}", secs / 1_000_000_000)
        } else {
            let text = format!("{:.9}", secs as f64 / 1e9);
            text.trim_end_matches('0').to_string()
        };
        f.write_str(sign)?;
        if hours > 0 {
            write!(f, "{hours}h{minutes}m")?;
        } else if minutes > 0 {
            write!(f, "{minutes}m")?;
        }
        write!(f, "{secs_text}s")
    }
}

impl std::str::FromStr for GoDuration {
    type Err = DurationError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        GoDuration::parse(text)
    }
}

/// A string in Go's syntax, or a bare TOML integer. Go Praefect decodes durations through
/// `UnmarshalText` with the value's literal text, whatever its TOML type: so `0` (what
/// Omnibus writes for `verification_interval: 0`) is accepted as zero, and any other integer
/// is refused for its missing unit, exactly as Go refuses it.
impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = GoDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"30s\" or \"1m30s\"")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<GoDuration, E> {
                GoDuration::parse(text).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<GoDuration, E> {
                self.visit_str(&value.to_string())
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<GoDuration, E> {
                self.visit_str(&value.to_string())
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> i64 {
        GoDuration::parse(text).unwrap().as_nanos()
    }

    #[test]
    fn parses_go_syntax() {
        assert_eq!(parse("0"), 0);
        assert_eq!(parse("500ms"), 500_000_000);
        assert_eq!(parse("30s"), 30_000_000_000);
        assert_eq!(parse("1m"), 60_000_000_000);
        assert_eq!(parse("168h"), 168 * 3_600_000_000_000);
        assert_eq!(parse("1h30m"), 5_400_000_000_000);
        assert_eq!(parse("1.5h"), 5_400_000_000_000);
        assert_eq!(parse("-1s"), -1_000_000_000);
        assert_eq!(parse("+2us"), 2_000);
        assert_eq!(parse("3µs"), 3_000);
        assert_eq!(parse("10ns"), 10);
        assert_eq!(parse(".5s"), 500_000_000);
        // Long fractions are truncated, never overflow (this panicked in debug builds).
        assert_eq!(parse("0.99999999999999999999999999h"), 3_599_999_999_999);
        assert_eq!(parse("1.000000000000000000000000001ns"), 1);
        assert_eq!(parse("1h1m1s1ms"), 3_661_001_000_000);
    }

    #[test]
    fn rejects_what_go_rejects() {
        for bad in ["", "1", "s", "1x", "1.s.", "-", "1hh", "10 s", "1e3s"] {
            assert!(GoDuration::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(matches!(
            GoDuration::parse("1x"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(
            GoDuration::parse("99999999999h"),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(GoDuration::from_secs(0).to_string(), "0s");
        assert_eq!(GoDuration::from_secs(90 * 60).to_string(), "1h30m0s");
        assert_eq!(GoDuration::from_secs(168 * 3600).to_string(), "168h0m0s");
        assert_eq!(GoDuration::from_millis(500).to_string(), "500ms");
        assert_eq!(GoDuration::from_millis(1500).to_string(), "1.5s");
        assert_eq!(GoDuration::from_secs(-60).to_string(), "-1m0s");
        for text in ["1h30m0s", "500ms", "1m0s", "2.5s"] {
            assert_eq!(GoDuration::parse(text).unwrap().to_string(), text);
        }
    }
}
