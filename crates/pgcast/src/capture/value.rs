//! Column values as pgoutput sends them (PostgreSQL's text output) rendered as JSON the way
//! `to_jsonb` renders them, and compared with filter values by their column's type.
//!
//! This module knows value formats only; it does not know tables, filters or subscribers.

use std::cmp::Ordering;
use std::fmt::Write as _;

/// How values of one PostgreSQL type are rendered and compared. Derived from `pg_type` once per
/// type (see [`crate::capture::catalog`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueKind {
    /// int2, int4, int8, oid: text output is a JSON number.
    Integer,
    /// float4, float8: a JSON number, except NaN and ±Infinity which become strings.
    Float,
    /// numeric: a JSON number, except NaN and ±Infinity which become strings.
    Numeric,
    Bool,
    /// json and jsonb: the text is already JSON.
    Json,
    /// timestamptz: ISO 8601 with `T` and a `+HH:MM` offset.
    TimestampTz,
    /// timestamp without time zone: ISO 8601 with `T`.
    Timestamp,
    /// uuid: compared case-insensitively.
    Uuid,
    /// Everything else (text, varchar, date, time, enums, money, ...): a JSON string.
    Text,
    /// An array of the element kind, rendered as a (nested) JSON array.
    Array(Box<ValueKind>),
}

/// A filter operand or a column value parsed for comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Integer(i64),
    Number(f64),
    Bool(bool),
    /// Microseconds since the Unix epoch, UTC.
    Instant(i64),
    Text(String),
}

impl ValueKind {
    /// Whether `eq`/`lt`/... filters can be applied to columns of this kind.
    pub fn is_filterable(&self) -> bool {
        !matches!(self, ValueKind::Json | ValueKind::Array(_))
    }

    /// Parses text (PostgreSQL output or a filter operand) into a comparable value.
    pub fn parse_scalar(&self, text: &str) -> Option<Scalar> {
        match self {
            ValueKind::Integer => text.trim().parse().ok().map(Scalar::Integer),
            ValueKind::Float | ValueKind::Numeric => {
                let t = text.trim();
                match t {
                    "NaN" => Some(Scalar::Number(f64::NAN)),
                    "Infinity" => Some(Scalar::Number(f64::INFINITY)),
                    "-Infinity" => Some(Scalar::Number(f64::NEG_INFINITY)),
                    _ => t.parse().ok().map(Scalar::Number),
                }
            }
            ValueKind::Bool => match text.trim().to_ascii_lowercase().as_str() {
                "t" | "true" | "yes" | "on" | "1" => Some(Scalar::Bool(true)),
                "f" | "false" | "no" | "off" | "0" => Some(Scalar::Bool(false)),
                _ => None,
            },
            ValueKind::TimestampTz => parse_timestamp(text).map(Scalar::Instant),
            ValueKind::Timestamp => parse_timestamp(text).map(Scalar::Instant),
            ValueKind::Uuid => Some(Scalar::Text(text.trim().to_ascii_lowercase())),
            ValueKind::Text => Some(Scalar::Text(text.to_string())),
            ValueKind::Json | ValueKind::Array(_) => None,
        }
    }

    /// Appends `text` (PostgreSQL's text output for this kind) to `out` as JSON.
    pub fn write_json(&self, text: &str, out: &mut String) {
        match self {
            ValueKind::Integer => out.push_str(text),
            ValueKind::Float | ValueKind::Numeric => match text {
                "NaN" | "Infinity" | "-Infinity" => write_json_string(text, out),
                _ => out.push_str(text),
            },
            // Output functions print `t`; a `::text` cast (trigger capture) prints `true`.
            ValueKind::Bool => out.push_str(if text == "t" || text == "true" { "true" } else { "false" }),
            ValueKind::Json => out.push_str(text),
            ValueKind::TimestampTz => write_iso_timestamp(text, true, out),
            ValueKind::Timestamp => write_iso_timestamp(text, false, out),
            ValueKind::Uuid | ValueKind::Text => write_json_string(text, out),
            ValueKind::Array(element) => write_array(text, element, out),
        }
    }
}

impl Scalar {
    /// Orders two values of the same kind; `None` when they cannot be compared (NaN, mixed).
    pub fn compare(&self, other: &Scalar) -> Option<Ordering> {
        match (self, other) {
            (Scalar::Integer(a), Scalar::Integer(b)) => Some(a.cmp(b)),
            (Scalar::Number(a), Scalar::Number(b)) => a.partial_cmp(b),
            (Scalar::Integer(a), Scalar::Number(b)) => (*a as f64).partial_cmp(b),
            (Scalar::Number(a), Scalar::Integer(b)) => a.partial_cmp(&(*b as f64)),
            (Scalar::Bool(a), Scalar::Bool(b)) => Some(a.cmp(b)),
            (Scalar::Instant(a), Scalar::Instant(b)) => Some(a.cmp(b)),
            (Scalar::Text(a), Scalar::Text(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
            _ => None,
        }
    }

    /// A key for hash lookups of equality filters: equal scalars have equal keys.
    pub fn index_key(&self) -> String {
        match self {
            Scalar::Integer(i) => format!("i{i}"),
            // Integral floats share the integer key so `id=eq.5` finds a numeric 5.0.
            Scalar::Number(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => format!("i{}", *n as i64),
            Scalar::Number(n) => format!("n{n}"),
            Scalar::Bool(b) => format!("b{b}"),
            Scalar::Instant(t) => format!("t{t}"),
            Scalar::Text(s) => format!("s{s}"),
        }
    }
}

/// Appends `s` as a JSON string literal.
pub fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0x00..=0x1f => None,
            _ => continue,
        };
        out.push_str(&s[start..i]);
        match escape {
            Some(e) => out.push_str(e),
            None => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// `2024-01-02 03:04:05.5+05:30` -> `"2024-01-02T03:04:05.5+05:30"`, `+00` -> `+00:00`,
/// as `to_jsonb` does. Special values (`infinity`, BC dates) pass through as strings.
fn write_iso_timestamp(text: &str, with_zone: bool, out: &mut String) {
    let Some(space) = text.find(' ') else {
        write_json_string(text, out);
        return;
    };
    if text.ends_with(" BC") {
        write_json_string(text, out);
        return;
    }
    out.push('"');
    out.push_str(&text[..space]);
    out.push('T');
    let rest = &text[space + 1..];
    if with_zone {
        // The zone is the last `+` or `-` after the time; PostgreSQL prints `+HH`, `+HH:MM` or
        // `+HH:MM:SS`. to_jsonb always prints at least `+HH:MM`.
        match rest.rfind(['+', '-']) {
            Some(z) if rest.len() - z == 3 => {
                out.push_str(rest);
                out.push_str(":00");
            }
            _ => out.push_str(rest),
        }
    } else {
        out.push_str(rest);
    }
    out.push('"');
}

/// Parses `YYYY-MM-DD[ T]HH:MM[:SS[.ffffff]][Z|±HH[:MM[:SS]]]` (or a bare date) into
/// microseconds since the Unix epoch. Without a zone the time is taken as UTC, which is what the
/// replication session's `TimeZone=UTC` makes PostgreSQL print anyway.
pub fn parse_timestamp(text: &str) -> Option<i64> {
    let t = text.trim();
    let (date, rest) = match t.find([' ', 'T']) {
        Some(i) => (&t[..i], &t[i + 1..]),
        None => (t, ""),
    };
    let mut parts = date.splitn(3, '-');
    let year: i64 = parts.next()?.parse().ok()?;
    let month: u32 = parts.next()?.parse().ok()?;
    let day: u32 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let (time, offset_secs) = split_zone(rest)?;
    let mut micros: i64 = 0;
    if !time.is_empty() {
        let mut hms = time.splitn(3, ':');
        let h: i64 = hms.next()?.parse().ok()?;
        let m: i64 = hms.next()?.parse().ok()?;
        let (s, frac) = match hms.next() {
            Some(sec) => match sec.split_once('.') {
                Some((s, f)) => (s.parse::<i64>().ok()?, f),
                None => (sec.parse::<i64>().ok()?, ""),
            },
            None => (0, ""),
        };
        if h > 24 || m > 59 || s > 60 || frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let frac_micros: i64 = if frac.is_empty() { 0 } else { format!("{frac:0<6}").parse().ok()? };
        micros = ((h * 60 + m) * 60 + s) * 1_000_000 + frac_micros;
    }
    Some(days * 86_400_000_000 + micros - offset_secs * 1_000_000)
}

/// Splits `HH:MM:SS.f+05:30` into the time and the zone offset in seconds.
fn split_zone(rest: &str) -> Option<(&str, i64)> {
    if let Some(time) = rest.strip_suffix('Z') {
        return Some((time, 0));
    }
    let Some(z) = rest.rfind(['+', '-']) else { return Some((rest, 0)) };
    let sign = if rest.as_bytes()[z] == b'-' { -1 } else { 1 };
    let mut fields = rest[z + 1..].split(':');
    let h: i64 = fields.next()?.parse().ok()?;
    let m: i64 = fields.next().map(str::parse).transpose().ok()?.unwrap_or(0);
    let s: i64 = fields.next().map(str::parse).transpose().ok()?.unwrap_or(0);
    Some((&rest[..z], sign * (h * 3600 + m * 60 + s)))
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Renders a PostgreSQL array literal (`{1,2,NULL}`, `{"a b","c\"d"}`, `{{1,2},{3,4}}`) as a JSON
/// array, each element rendered by `element`. Malformed input is rendered as a JSON string rather
/// than as broken JSON.
fn write_array(text: &str, element: &ValueKind, out: &mut String) {
    // Arrays with explicit bounds (`[0:1]={1,2}`) start with the dimension decoration.
    let body = match text.find('=') {
        Some(eq) if text.starts_with('[') => &text[eq + 1..],
        _ => text,
    };
    let mark = out.len();
    if parse_array(body.as_bytes(), &mut 0, element, out).is_none() {
        out.truncate(mark);
        write_json_string(text, out);
    }
}

fn parse_array(bytes: &[u8], pos: &mut usize, element: &ValueKind, out: &mut String) -> Option<()> {
    if bytes.get(*pos) != Some(&b'{') {
        return None;
    }
    *pos += 1;
    out.push('[');
    if bytes.get(*pos) == Some(&b'}') {
        *pos += 1;
        out.push(']');
        return Some(());
    }
    loop {
        match bytes.get(*pos)? {
            b'{' => parse_array(bytes, pos, element, out)?,
            b'"' => {
                *pos += 1;
                let mut value = Vec::new();
                loop {
                    match *bytes.get(*pos)? {
                        b'\\' => {
                            value.push(*bytes.get(*pos + 1)?);
                            *pos += 2;
                        }
                        b'"' => {
                            *pos += 1;
                            break;
                        }
                        b => {
                            value.push(b);
                            *pos += 1;
                        }
                    }
                }
                element.write_json(std::str::from_utf8(&value).ok()?, out);
            }
            _ => {
                let start = *pos;
                while !matches!(bytes.get(*pos)?, b',' | b'}') {
                    *pos += 1;
                }
                let raw = std::str::from_utf8(&bytes[start..*pos]).ok()?.trim();
                if raw == "NULL" {
                    out.push_str("null");
                } else {
                    element.write_json(raw, out);
                }
            }
        }
        match bytes.get(*pos)? {
            b',' => {
                out.push(',');
                *pos += 1;
            }
            b'}' => {
                *pos += 1;
                out.push(']');
                return Some(());
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(kind: &ValueKind, text: &str) -> String {
        let mut out = String::new();
        kind.write_json(text, &mut out);
        out
    }

    #[test]
    fn scalars_render_like_to_jsonb() {
        assert_eq!(json(&ValueKind::Integer, "-42"), "-42");
        assert_eq!(json(&ValueKind::Numeric, "12.50"), "12.50");
        assert_eq!(json(&ValueKind::Numeric, "NaN"), "\"NaN\"");
        assert_eq!(json(&ValueKind::Float, "-Infinity"), "\"-Infinity\"");
        assert_eq!(json(&ValueKind::Bool, "t"), "true");
        assert_eq!(json(&ValueKind::Text, "a\"b\\c\nd\u{1}"), r#""a\"b\\c\nd\u0001""#);
        assert_eq!(json(&ValueKind::Json, r#"{"a": 1}"#), r#"{"a": 1}"#);
    }

    #[test]
    fn timestamps_render_with_t_and_full_offset() {
        assert_eq!(
            json(&ValueKind::TimestampTz, "2024-01-02 03:04:05.123+00"),
            "\"2024-01-02T03:04:05.123+00:00\""
        );
        assert_eq!(
            json(&ValueKind::TimestampTz, "2024-01-02 03:04:05-03:30"),
            "\"2024-01-02T03:04:05-03:30\""
        );
        assert_eq!(json(&ValueKind::Timestamp, "2024-01-02 03:04:05"), "\"2024-01-02T03:04:05\"");
        assert_eq!(json(&ValueKind::TimestampTz, "infinity"), "\"infinity\"");
    }

    #[test]
    fn arrays_render_nested_with_nulls_and_quotes() {
        let ints = ValueKind::Array(Box::new(ValueKind::Integer));
        assert_eq!(json(&ints, "{1,2,NULL}"), "[1,2,null]");
        assert_eq!(json(&ints, "{{1,2},{3,4}}"), "[[1,2],[3,4]]");
        assert_eq!(json(&ints, "{}"), "[]");
        assert_eq!(json(&ints, "[0:1]={5,6}"), "[5,6]");
        let texts = ValueKind::Array(Box::new(ValueKind::Text));
        assert_eq!(json(&texts, r#"{"a b","c\"d",NULL,"NULL",x}"#), r#"["a b","c\"d",null,"NULL","x"]"#);
        assert_eq!(json(&texts, "{unterminated"), "\"{unterminated\"");
    }

    #[test]
    fn timestamps_compare_across_zones() {
        let a = parse_timestamp("2024-01-02 03:00:00+00").unwrap();
        let b = parse_timestamp("2024-01-02T05:30:00+02:30").unwrap();
        let c = parse_timestamp("2024-01-02T03:00:00Z").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(parse_timestamp("1970-01-01"), Some(0));
        assert_eq!(parse_timestamp("1970-01-01 00:00:01.5"), Some(1_500_000));
        assert_eq!(parse_timestamp("not a time"), None);
    }

    #[test]
    fn index_keys_unify_integral_numbers() {
        assert_eq!(Scalar::Integer(5).index_key(), Scalar::Number(5.0).index_key());
        assert_ne!(Scalar::Integer(5).index_key(), Scalar::Text("5".into()).index_key());
    }
}
