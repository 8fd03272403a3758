//! Column values as pgoutput sends them (PostgreSQL's text output) rendered as JSON the way
//! `to_jsonb` renders them, and compared with filter values by their column's type.
//!
//! This module knows value formats only; it does not know tables, filters or subscribers.

use std::cmp::Ordering;

use crate::json::write_string;

/// How values of one PostgreSQL type are rendered and compared. Derived from `pg_type` once per
/// type (see [`crate::capture::catalog`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueKind {
    /// int2, int4, int8, oid: text output is a JSON number.
    Integer,
    /// float4, float8: a JSON number in plain decimal notation (as `to_jsonb` prints it), except
    /// NaN and ±Infinity which become strings.
    Float,
    /// numeric: a JSON number, except NaN and ±Infinity which become strings.
    Numeric,
    Bool,
    /// json and jsonb: the text is already JSON.
    Json,
    /// timestamptz: ISO 8601 with `T` and a `+HH:MM` offset (` BC` kept after it).
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
    /// Microseconds since the Unix epoch, UTC (`i128::MAX`/`MIN` for ±infinity).
    Instant(i128),
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
                "NaN" | "Infinity" | "-Infinity" => write_string(text, out),
                _ if *self == ValueKind::Float => write_float(text, out),
                _ => out.push_str(text),
            },
            // Output functions print `t`; a `::text` cast (trigger capture) prints `true`.
            ValueKind::Bool => out.push_str(if text == "t" || text == "true" { "true" } else { "false" }),
            ValueKind::Json => out.push_str(text),
            ValueKind::TimestampTz => write_iso_timestamp(text, true, out),
            ValueKind::Timestamp => write_iso_timestamp(text, false, out),
            ValueKind::Uuid | ValueKind::Text => write_string(text, out),
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

/// `2024-01-02 03:04:05.5+05:30` -> `"2024-01-02T03:04:05.5+05:30"`, `+00` -> `+00:00`, and
/// `4713-01-01 00:00:00+00 BC` -> `"4713-01-01T00:00:00+00:00 BC"`, as `to_jsonb` does.
/// `infinity` and `-infinity` pass through as strings.
fn write_iso_timestamp(text: &str, with_zone: bool, out: &mut String) {
    let (core, era) = match text.strip_suffix(" BC") {
        Some(core) => (core, " BC"),
        None => (text, ""),
    };
    let Some(space) = core.find(' ') else {
        write_string(text, out);
        return;
    };
    out.push('"');
    out.push_str(&core[..space]);
    out.push('T');
    let rest = &core[space + 1..];
    out.push_str(rest);
    if with_zone {
        // The zone is the last `+` or `-` after the time; PostgreSQL prints `+HH`, `+HH:MM` or
        // `+HH:MM:SS`. to_jsonb always prints at least `+HH:MM`.
        if matches!(rest.rfind(['+', '-']), Some(z) if rest.len() - z == 3) {
            out.push_str(":00");
        }
    }
    out.push_str(era);
    out.push('"');
}

/// A float's text output as `to_jsonb` renders it: to_jsonb goes through `numeric`, so the
/// shortest digits PostgreSQL prints are written in plain decimal notation (`1e+300` becomes a 1
/// and 300 zeros, `1.5e-07` becomes `0.00000015`) and `-0` becomes `0`.
fn write_float(text: &str, out: &mut String) {
    if text == "-0" {
        out.push('0');
        return;
    }
    let Some((mantissa, exponent)) = text.split_once(['e', 'E']) else {
        out.push_str(text);
        return;
    };
    let Ok(exponent) = exponent.parse::<i64>() else {
        // Not PostgreSQL float output; keep it valid JSON.
        write_string(text, out);
        return;
    };
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: String = whole.chars().chain(fraction.chars()).collect();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        write_string(text, out);
        return;
    }
    // Where the decimal point falls in `digits` once the exponent is applied.
    let point = whole.len() as i64 + exponent;
    out.push_str(sign);
    if point <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', point.unsigned_abs() as usize));
        out.push_str(digits.trim_end_matches('0'));
    } else if point as usize >= digits.len() {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', point as usize - digits.len()));
    } else {
        let (int_part, frac_part) = digits.split_at(point as usize);
        out.push_str(int_part);
        let frac_part = frac_part.trim_end_matches('0');
        if !frac_part.is_empty() {
            out.push('.');
            out.push_str(frac_part);
        }
    }
}

/// Parses `YYYY-MM-DD[ T]HH:MM[:SS[.ffffff]][Z|±HH[:MM[:SS]]][ BC]` (or a bare date) into
/// microseconds since the Unix epoch; `infinity` and `-infinity` sort after and before every
/// time. Without a zone the time is taken as UTC, which is what the replication session's
/// `TimeZone=UTC` makes PostgreSQL print anyway. Wide (`i128`): PostgreSQL's range ends in year
/// 294276, whose microseconds since 1970 do not fit an `i64`. Text that is not a time, or a year
/// far outside PostgreSQL's range (a filter operand), is `None`, never an overflow.
pub fn parse_timestamp(text: &str) -> Option<i128> {
    let t = text.trim();
    match t {
        "infinity" => return Some(i128::MAX),
        "-infinity" => return Some(i128::MIN),
        _ => {}
    }
    let (t, bc) = match t.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (t, false),
    };
    let (date, rest) = match t.find([' ', 'T']) {
        Some(i) => (&t[..i], &t[i + 1..]),
        None => (t, ""),
    };
    let mut parts = date.splitn(3, '-');
    let year: i64 = parts.next()?.parse().ok()?;
    let month: u32 = parts.next()?.parse().ok()?;
    let day: u32 = parts.next()?.parse().ok()?;
    if !(0..=MAX_YEAR).contains(&year) || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // 1 BC is year 0 of the proleptic Gregorian calendar, 2 BC is -1.
    let year = if bc { 1 - year } else { year };
    let days = i128::from(days_from_civil(year, month, day));
    let (time, offset_secs) = split_zone(rest)?;
    let mut micros: i128 = 0;
    if !time.is_empty() {
        let mut hms = time.splitn(3, ':');
        let h: i128 = hms.next()?.parse().ok()?;
        let m: i128 = hms.next()?.parse().ok()?;
        let (s, frac) = match hms.next() {
            Some(sec) => match sec.split_once('.') {
                Some((s, f)) => (s.parse::<i128>().ok()?, f),
                None => (sec.parse::<i128>().ok()?, ""),
            },
            None => (0, ""),
        };
        if !(0..=24).contains(&h)
            || !(0..=59).contains(&m)
            || !(0..=60).contains(&s)
            || frac.len() > 6
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let frac_micros: i128 = if frac.is_empty() { 0 } else { format!("{frac:0<6}").parse().ok()? };
        micros = ((h * 60 + m) * 60 + s) * 1_000_000 + frac_micros;
    }
    Some(days * 86_400_000_000 + micros - i128::from(offset_secs) * 1_000_000)
}

/// Far past PostgreSQL's own range (294276 AD, 4713 BC): a guard against absurd operands only.
const MAX_YEAR: i64 = 10_000_000;

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
    if !(0..=99).contains(&h) || !(0..=59).contains(&m) || !(0..=59).contains(&s) {
        return None;
    }
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
        write_string(text, out);
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
    fn bc_and_far_future_timestamps_render_like_to_jsonb() {
        // Each expected string is what PostgreSQL 15's to_jsonb printed for the value.
        let tz = ValueKind::TimestampTz;
        assert_eq!(json(&tz, "4713-01-01 00:00:00+00 BC"), "\"4713-01-01T00:00:00+00:00 BC\"");
        assert_eq!(json(&tz, "4713-01-01 05:53:28+05:53:28 BC"), "\"4713-01-01T05:53:28+05:53:28 BC\"");
        assert_eq!(json(&tz, "294276-12-31 23:59:59.999999+00"), "\"294276-12-31T23:59:59.999999+00:00\"");
        assert_eq!(json(&tz, "-infinity"), "\"-infinity\"");
        let local = ValueKind::Timestamp;
        assert_eq!(json(&local, "0044-03-15 12:00:00 BC"), "\"0044-03-15T12:00:00 BC\"");
        assert_eq!(json(&local, "294276-12-31 23:59:59.999999"), "\"294276-12-31T23:59:59.999999\"");
    }

    #[test]
    fn floats_render_in_plain_decimal_like_to_jsonb() {
        let float = ValueKind::Float;
        assert_eq!(json(&float, "1.5e-07"), "0.00000015");
        assert_eq!(json(&float, "1.2345678901234568e+17"), "123456789012345680");
        assert_eq!(json(&float, "1e+300"), format!("1{}", "0".repeat(300)));
        assert_eq!(json(&float, "-2.5e-05"), "-0.000025");
        assert_eq!(json(&float, "-0"), "0");
        assert_eq!(json(&float, "0.30000000000000004"), "0.30000000000000004");
        assert_eq!(json(&float, "3.4e+38"), format!("34{}", "0".repeat(37)));
        // Numeric output is already plain decimal and is kept digit for digit.
        assert_eq!(json(&ValueKind::Numeric, "0.00000000000000000001"), "0.00000000000000000001");
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
    fn edge_timestamps_parse_in_order_without_overflow() {
        let bc = parse_timestamp("4713-01-01 00:00:00+00 BC").unwrap();
        let ad = parse_timestamp("0001-01-01 00:00:00+00").unwrap();
        let one_bc = parse_timestamp("0001-12-31 23:59:59+00 BC").unwrap();
        assert!(bc < one_bc && one_bc < ad);
        assert_eq!(ad - one_bc, 1_000_000, "1 BC is followed directly by 1 AD");
        let top = parse_timestamp("294276-12-31 23:59:59.999999+00").unwrap();
        assert!(top > i128::from(i64::MAX), "past an i64 of microseconds since 1970");
        assert!(parse_timestamp("infinity").unwrap() > top);
        assert!(parse_timestamp("-infinity").unwrap() < bc);
        assert_eq!(parse_timestamp("99999999999999-01-01"), None);
        assert_eq!(parse_timestamp("2024-01-01 99999999999:00"), None);
        assert_eq!(parse_timestamp("2024-01-01 10:00+99999999999"), None);
    }

    #[test]
    fn index_keys_unify_integral_numbers() {
        assert_eq!(Scalar::Integer(5).index_key(), Scalar::Number(5.0).index_key());
        assert_ne!(Scalar::Integer(5).index_key(), Scalar::Text("5".into()).index_key());
    }
}
