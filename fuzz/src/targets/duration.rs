//! Go durations (`config::GoDuration`), read from every duration key of the configuration.
//! Properties: no panic; what parses is in Go's grammar (checked by a separate recogniser)
//! and what is in the grammar parses unless out of range; formatting a parsed value parses
//! back to it; a duration of several components is the sum of its parts; a minus sign
//! negates; and every i64 of nanoseconds formats to a string that parses back to it.

use praefect::config::{DurationError, GoDuration};

use crate::engine::{fnv, Target};

pub const TARGET: Target = Target {
    name: "duration",
    about: "GoDuration::parse against Go's grammar, format/parse round trips, sums and signs",
    check,
    dictionary,
    max_len: 256,
};

fn dictionary() -> Vec<Vec<u8>> {
    [
        "ns",
        "us",
        "µs",
        "μs",
        "ms",
        "s",
        "m",
        "h",
        ".",
        "-",
        "+",
        "0",
        "1.5",
        "9223372036854775807ns",
        "9223372036854775808ns",
        "2562047h47m16.854775807s",
        "2562047h47m16.854775808s",
        "0.000000000000000000001",
        "99999999999999999999",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

const UNITS: &[&str] = &["ns", "us", "µs", "μs", "ms", "s", "m", "h"];

/// Go's grammar, recognised separately from the parser: `[+-]?` then `0`, or components of
/// digits with an optional fraction (at least one digit) and a unit. Returns the components'
/// texts (without the sign), or None when the text is not in the grammar.
fn components(text: &str) -> Option<Vec<&str>> {
    let unsigned = text
        .strip_prefix('-')
        .or_else(|| text.strip_prefix('+'))
        .unwrap_or(text);
    if unsigned == "0" {
        return Some(vec![unsigned]);
    }
    if unsigned.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    let mut rest = unsigned;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let number = &rest[..number_end];
        let dots = number.matches('.').count();
        if dots > 1 || number.len() == dots {
            return None;
        }
        let after = &rest[number_end..];
        let unit = UNITS
            .iter()
            .filter(|u| after.starts_with(*u))
            .max_by_key(|u| u.len())?;
        let end = number_end + unit.len();
        // The unit runs to the next digit or dot: "1hh" is the unknown unit "hh".
        if rest[end..]
            .chars()
            .next()
            .is_some_and(|c| !c.is_ascii_digit() && c != '.')
        {
            return None;
        }
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    Some(out)
}

/// Nanoseconds per unit, from Go's `unitMap`.
fn unit_nanos(unit: &str) -> i128 {
    match unit {
        "ns" => 1,
        "us" | "µs" | "μs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        other => panic!("not a unit: {other:?}"),
    }
}

/// The exact value of a text in the grammar whose components have no fraction (None for
/// fractions, which Go rounds its own way, and for numbers past 20 digits).
fn whole_value(text: &str, parts: &[&str]) -> Option<i128> {
    let mut total: i128 = 0;
    for part in parts {
        if *part == "0" {
            return Some(0);
        }
        let digits = part.find(|c: char| !c.is_ascii_digit())?;
        let (number, unit) = part.split_at(digits);
        if unit.starts_with('.') || number.len() > 20 {
            return None;
        }
        total += number.parse::<i128>().ok()? * unit_nanos(unit);
    }
    Some(if text.starts_with('-') { -total } else { total })
}

fn class(result: &Result<GoDuration, DurationError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(DurationError::Invalid(_)) => "invalid",
        Err(DurationError::MissingUnit(_)) => "missing unit",
        Err(DurationError::UnknownUnit { .. }) => "unknown unit",
        Err(DurationError::Overflow(_)) => "overflow",
    }
}

fn round_trips(value: GoDuration) {
    let text = value.to_string();
    assert!(
        components(&text).is_some(),
        "{} formats as {text:?}, outside Go's grammar",
        value.as_nanos()
    );
    assert_eq!(
        GoDuration::parse(&text),
        Ok(value),
        "{} formats as {text:?}",
        value.as_nanos()
    );
}

fn check(input: &[u8]) -> String {
    let mut raw = [0u8; 8];
    let n = input.len().min(8);
    raw[..n].copy_from_slice(&input[..n]);
    round_trips(GoDuration::from_nanos(i64::from_le_bytes(raw)));

    let text = String::from_utf8_lossy(input);
    let result = GoDuration::parse(&text);
    let grammar = components(&text);
    match (&result, &grammar) {
        (Ok(_), None) => panic!("{text:?} parsed but is not in Go's grammar"),
        (Err(DurationError::Overflow(_)), Some(_)) | (Ok(_), Some(_)) | (Err(_), None) => {}
        (Err(err), Some(_)) => panic!("{text:?} is in Go's grammar, yet: {err}"),
    }
    if let Ok(value) = result {
        round_trips(value);
    }
    if let Some(expected) = grammar
        .as_deref()
        .and_then(|parts| whole_value(&text, parts))
    {
        match i64::try_from(expected) {
            Ok(nanos) => assert_eq!(result, Ok(GoDuration::from_nanos(nanos)), "{text:?}"),
            Err(_) => assert!(
                matches!(result, Err(DurationError::Overflow(_))),
                "{text:?} is out of range, yet {result:?}"
            ),
        }
    }
    if let Some(parts) = grammar.filter(|p| p.len() >= 2) {
        // A sum of two parts split where the input's hash says.
        let cut = 1 + (fnv(input) as usize) % (parts.len() - 1);
        let (a, b) = (parts[..cut].concat(), parts[cut..].concat());
        let negative = text.starts_with('-');
        if let (Ok(a), Ok(b)) = (GoDuration::parse(&a), GoDuration::parse(&b)) {
            let sum = i128::from(a.as_nanos()) + i128::from(b.as_nanos());
            // The sum may leave i64 (an overflow), except -2^63 ns for a negative text.
            let expected = i64::try_from(if negative { -sum } else { sum }).ok();
            match expected {
                Some(nanos) => assert_eq!(
                    result.as_ref().ok().map(|d| d.as_nanos()),
                    Some(nanos),
                    "{text:?} is not the sum of {a} and {b}"
                ),
                None => assert!(
                    matches!(result, Err(DurationError::Overflow(_))),
                    "{text:?}: the sum of its parts overflows, yet {result:?}"
                ),
            }
        }
    }
    if !text.starts_with(['-', '+']) {
        if let Ok(value) = result {
            let negated = GoDuration::parse(&format!("-{text}"));
            assert_eq!(negated, Ok(GoDuration::from_nanos(-value.as_nanos())));
        }
    }
    // Outcome: the result and the shape of the text, so that the pool keeps one input of
    // each shape (sign, number of components, fractions, last unit).
    let shape = match components(&text) {
        Some(parts) => format!(
            "{}{}/{}/{}",
            text.chars()
                .next()
                .filter(|c| "+-".contains(*c))
                .unwrap_or(' '),
            parts.len().min(4),
            parts.iter().any(|p| p.contains('.')),
            parts.last().map_or("", |p| p
                .trim_start_matches(|c: char| c.is_ascii_digit() || c == '.'))
        ),
        None => String::from("not go"),
    };
    format!("{}/{shape}", class(&result))
}
