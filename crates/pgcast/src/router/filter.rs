//! postgres_changes subscription filters (Supabase's syntax: `col=[not.]op.value` conditions
//! separated by commas, all of which must hold) and event kinds, parsed against the table's
//! column types at join time and evaluated against rows. A filter is understood exactly or
//! refused: never read in a way that silently matches nothing.
//!
//! Parsing is where bad input is rejected with a reason; evaluation never fails.

use std::cmp::Ordering;

use crate::capture::catalog::PublishedTable;
use crate::capture::value::{Scalar, ValueKind};
use crate::capture::{ChangeKind, Relation, Row, Value};
use crate::text::{clip, escape, NAME_CHARS};

/// Which change kinds a subscription wants (`event` in the join config). `*` means the row
/// events (INSERT, UPDATE, DELETE), as in Supabase, which never sends `TRUNCATE`: a client gets
/// truncations only from a binding with `event: "TRUNCATE"` (strict clients such as the Python
/// `realtime` package reject a message type they do not know).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventFilter {
    All,
    Only(ChangeKind),
}

impl EventFilter {
    pub fn parse(event: &str) -> Result<EventFilter, String> {
        match event {
            "*" => Ok(EventFilter::All),
            "INSERT" => Ok(EventFilter::Only(ChangeKind::Insert)),
            "UPDATE" => Ok(EventFilter::Only(ChangeKind::Update)),
            "DELETE" => Ok(EventFilter::Only(ChangeKind::Delete)),
            "TRUNCATE" => Ok(EventFilter::Only(ChangeKind::Truncate)),
            other => Err(format!(
                "unknown event {:?}: expected INSERT, UPDATE, DELETE, * or TRUNCATE",
                crate::text::clip(other, 64)
            )),
        }
    }

    pub fn accepts(self, kind: ChangeKind) -> bool {
        match self {
            EventFilter::All => kind != ChangeKind::Truncate,
            EventFilter::Only(k) => k == kind,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    In,
    /// `is.null`, `is.true`, `is.false`, `is.unknown` (SQL `IS`).
    Is(IsValue),
    /// SQL `LIKE` (`%` any run, `_` one character, `\` escapes; `*` stands for `%`, as in
    /// PostgREST).
    Like,
    /// `ILIKE`: `like` ignoring case.
    ILike,
    /// SQL `IS DISTINCT FROM`: unequal, with NULL distinct from every value.
    IsDistinct,
}

/// What `is.` tests for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsValue {
    Null,
    True,
    False,
    /// A NULL boolean.
    Unknown,
}

/// A parsed filter condition: `column` compared with typed operands, or its negation
/// (`not.`). A binding's filter is a list of them, all of which must hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub column: String,
    pub op: Op,
    /// `not.`: the comparison must not hold (a NULL still never passes a comparison, as in SQL).
    pub negated: bool,
    pub kind: ValueKind,
    /// One operand, the list for `in`, none for `is`.
    pub operands: Vec<Scalar>,
}

/// Most conditions in one filter.
const MAX_CONDITIONS: usize = 16;
/// Longest `like` pattern: matching costs its length times the value's, on every change.
const MAX_PATTERN_CHARS: usize = 128;

impl Filter {
    /// Parses a binding's filter, Supabase's syntax: conditions `col=[not.]op.value` separated
    /// by commas (not inside parentheses, double quotes, or escaped as `\,`), all of which
    /// must hold. Refusals name the filter's [`shape`], never its values: they are logged and
    /// audited, and values are often patient ids.
    pub fn parse_all(text: &str, table: &PublishedTable) -> Result<Vec<Filter>, String> {
        let parts = split_conditions(text)?;
        if parts.len() > MAX_CONDITIONS {
            return Err(format!("invalid filter: more than {MAX_CONDITIONS} conditions"));
        }
        let filters = parts.iter().map(|part| Filter::parse(part, table)).collect::<Result<Vec<_>, _>>()?;
        if filters.is_empty() {
            return Err("invalid filter: no condition".into());
        }
        Ok(filters)
    }

    /// Parses one condition `col=[not.]op.value` against the table's columns.
    pub fn parse(text: &str, table: &PublishedTable) -> Result<Filter, String> {
        let invalid = |problem: String| format!("invalid filter {}: {problem}", shape(text));
        let (column, rest) =
            text.split_once('=').ok_or_else(|| invalid("expected column=operator.value".into()))?;
        let column = column.trim();
        let rest = rest.trim();
        let (negated, rest) = match rest.strip_prefix("not.") {
            Some(rest) => (true, rest),
            None => (false, rest),
        };
        let (op_text, value) =
            rest.split_once('.').ok_or_else(|| invalid("expected column=operator.value".into()))?;
        let op = match op_text {
            "eq" => Op::Eq,
            "neq" => Op::Neq,
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "in" => Op::In,
            "like" => Op::Like,
            "ilike" => Op::ILike,
            "isdistinct" => Op::IsDistinct,
            "is" => Op::Is(match value {
                "null" => IsValue::Null,
                "true" => IsValue::True,
                "false" => IsValue::False,
                "unknown" => IsValue::Unknown,
                _ => return Err(invalid("is takes null, true, false or unknown".into())),
            }),
            "match" | "imatch" => {
                return Err(invalid(format!(
                    "operator {op_text} (regular expressions) is not supported: use like or ilike"
                )))
            }
            other => {
                return Err(invalid(format!(
                    "unknown operator {} (use eq, neq, lt, lte, gt, gte, in, is, like, ilike or isdistinct, any of them after not.)",
                    clip(other, NAME_CHARS)
                )))
            }
        };
        Filter::typed(column, op, negated, value, table).map_err(invalid)
    }

    /// `column = value`, `value` as PostgreSQL text (a Socket.IO room's or subscription's
    /// equality), checked against the column's type like a parsed filter.
    pub fn equal(column: &str, value: &str, table: &PublishedTable) -> Result<Filter, String> {
        Filter::typed_raw(column, Op::Eq, false, vec![value.to_string()], table).map_err(|problem| {
            format!("invalid filter {}: {problem}", shape(&format!("{column}=eq.{value}")))
        })
    }

    /// `column op value` against the table's columns, `value` as written in a filter (quoted
    /// or not); the error is the problem only.
    fn typed(
        column: &str,
        op: Op,
        negated: bool,
        value: &str,
        table: &PublishedTable,
    ) -> Result<Filter, String> {
        let raw = match op {
            Op::In => parse_in_list(value)?,
            Op::Is(_) => Vec::new(),
            _ => vec![unquote(value)?],
        };
        Filter::typed_raw(column, op, negated, raw, table)
    }

    fn typed_raw(
        column: &str,
        op: Op,
        negated: bool,
        raw_operands: Vec<String>,
        table: &PublishedTable,
    ) -> Result<Filter, String> {
        let col = table.column(column).ok_or_else(|| {
            format!("table {}.{} has no column {}", table.schema, table.name, clip(column, NAME_CHARS))
        })?;
        if !col.kind.is_filterable() {
            return Err(format!("column {column:?} has type {} which cannot be filtered", col.type_name));
        }
        match op {
            Op::Like | Op::ILike if col.kind != ValueKind::Text => {
                return Err(format!(
                    "like and ilike apply to text columns; {column:?} has type {}",
                    col.type_name
                ));
            }
            Op::Is(IsValue::True | IsValue::False | IsValue::Unknown) if col.kind != ValueKind::Bool => {
                return Err(format!(
                    "is.true, is.false and is.unknown apply to boolean columns; {column:?} has type {}",
                    col.type_name
                ));
            }
            _ => {}
        }
        if matches!(op, Op::Like | Op::ILike)
            && raw_operands.iter().any(|p| p.chars().count() > MAX_PATTERN_CHARS)
        {
            return Err(format!("a like pattern is at most {MAX_PATTERN_CHARS} characters"));
        }
        let operands = raw_operands
            .iter()
            .map(|raw| match op {
                // A pattern is text whatever it looks like.
                Op::Like | Op::ILike => Some(Scalar::Text(raw.clone())),
                _ => col.kind.parse_scalar(raw),
            })
            .map(|scalar| scalar.ok_or_else(|| format!("a value is not a valid {}", col.type_name)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Filter { column: column.to_string(), op, negated, kind: col.kind.clone(), operands })
    }

    /// The equality key, when the filter is `eq` (used by the index).
    pub fn eq_key(&self) -> Option<String> {
        match (self.op, self.negated, self.operands.as_slice()) {
            (Op::Eq, false, [one]) => Some(one.index_key()),
            _ => None,
        }
    }

    /// Whether `row` passes. As in SQL, a comparison with NULL is never true, negated or not
    /// (`is` and `isdistinct` are the tests that see NULL); a column the row does not carry
    /// (a TOASTed value an UPDATE left unchanged) passes nothing.
    pub fn matches(&self, relation: &Relation, row: &Row) -> bool {
        let Some(index) = relation.column_index(&self.column) else { return false };
        match row.values.get(index) {
            Some(Value::Text(text)) => {
                self.kind.parse_scalar(text).is_some_and(|value| self.accepts_scalar(&value))
            }
            Some(Value::Null) => self.accepts_null(),
            _ => false,
        }
    }

    /// Whether a NULL column value passes.
    fn accepts_null(&self) -> bool {
        let holds = match self.op {
            Op::Is(IsValue::Null | IsValue::Unknown) | Op::IsDistinct => true,
            Op::Is(_) => false,
            _ => return false,
        };
        holds != self.negated
    }

    /// Whether a (non-NULL) column value passes.
    pub fn accepts_scalar(&self, value: &Scalar) -> bool {
        let cmp = |operand: &Scalar| value.compare(operand);
        let first = self.operands.first().and_then(cmp);
        let holds = match self.op {
            Op::Eq => first == Some(Ordering::Equal),
            Op::Neq => matches!(first, Some(Ordering::Less | Ordering::Greater)),
            Op::Lt => first == Some(Ordering::Less),
            Op::Lte => matches!(first, Some(Ordering::Less | Ordering::Equal)),
            Op::Gt => first == Some(Ordering::Greater),
            Op::Gte => matches!(first, Some(Ordering::Greater | Ordering::Equal)),
            Op::In => self.operands.iter().any(|o| cmp(o) == Some(Ordering::Equal)),
            Op::Is(IsValue::Null | IsValue::Unknown) => false,
            Op::Is(IsValue::True) => matches!(value, Scalar::Bool(true)),
            Op::Is(IsValue::False) => matches!(value, Scalar::Bool(false)),
            Op::IsDistinct => first != Some(Ordering::Equal),
            Op::Like | Op::ILike => match (value, self.operands.first()) {
                (Scalar::Text(text), Some(Scalar::Text(pattern))) => {
                    like(text, pattern, self.op == Op::ILike)
                }
                _ => false,
            },
        };
        // A comparison that cannot be made (NaN) is not true, and so not false either.
        let comparable = match self.op {
            Op::Eq | Op::Neq | Op::Lt | Op::Lte | Op::Gt | Op::Gte | Op::IsDistinct => first.is_some(),
            _ => true,
        };
        comparable && holds != self.negated
    }
}

/// Splits a filter into its conditions at commas outside parentheses and double quotes and
/// not escaped (`\,`); each is trimmed, empty ones are dropped (as Supabase does).
fn split_conditions(text: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let (mut depth, mut quoted) = (0usize, false);
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                // Kept for the value's own unquoting, which reads the escape.
                current.push(c);
                current.extend(chars.next());
            }
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            '(' if !quoted => {
                depth += 1;
                current.push(c);
            }
            ')' if !quoted => {
                depth = depth.saturating_sub(1);
                current.push(c);
            }
            ',' if !quoted && depth == 0 => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    if quoted {
        return Err("invalid filter: a quoted value is not closed".into());
    }
    parts.push(current);
    Ok(parts.into_iter().map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect())
}

/// A value as a filter writes it: `"..."` (PostgREST's quoting: keeps `,()` and surrounding
/// spaces; `\` escapes the next character), or bare, where `\,` is a comma.
fn unquote(value: &str) -> Result<String, String> {
    let Some(inner) = value.strip_prefix('"') else {
        return Ok(value.replace("\\,", ","));
    };
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            '"' => {
                return if chars.as_str().is_empty() {
                    Ok(out)
                } else {
                    Err("text after a quoted value".into())
                };
            }
            c => out.push(c),
        }
    }
    Err("a quoted value is not closed".into())
}

/// SQL `LIKE`: `%` (or `*`) matches any run, `_` one character, `\` makes the next literal.
fn like(text: &str, pattern: &str, ignore_case: bool) -> bool {
    enum Token {
        Any,
        One,
        Char(char),
    }
    let fold = |c: char| if ignore_case { c.to_lowercase().next().unwrap_or(c) } else { c };
    let mut tokens = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        tokens.push(match c {
            '%' | '*' => Token::Any,
            '_' => Token::One,
            '\\' => Token::Char(fold(chars.next().unwrap_or('\\'))),
            c => Token::Char(fold(c)),
        });
    }
    let text: Vec<char> = text.chars().map(fold).collect();
    // reachable[j]: the first i characters can be matched by the first j tokens.
    let mut reachable = vec![false; tokens.len() + 1];
    reachable[0] = true;
    for j in 0..tokens.len() {
        if matches!(tokens[j], Token::Any) && reachable[j] {
            reachable[j + 1] = true;
        }
    }
    for c in text {
        if !reachable.contains(&true) {
            return false;
        }
        let mut next = vec![false; tokens.len() + 1];
        for j in 0..tokens.len() {
            match tokens[j] {
                Token::Any => next[j + 1] |= reachable[j + 1] || next[j],
                Token::One => next[j + 1] |= reachable[j],
                Token::Char(t) => next[j + 1] |= reachable[j] && t == c,
            }
        }
        reachable = next;
    }
    reachable[tokens.len()]
}

/// What a filter looks like without its values, for messages and logs: `patient_id=eq.…`,
/// `status=not.in.(…)`, several conditions by their shapes; names clipped and escaped.
pub fn shape(text: &str) -> String {
    match split_conditions(text) {
        Ok(parts) if parts.len() > 1 => {
            let shapes: Vec<String> = parts.iter().take(4).map(|p| shape_of_one(p)).collect();
            let more = if parts.len() > 4 { ",…" } else { "" };
            format!("{}{more}", shapes.join(","))
        }
        _ => shape_of_one(text),
    }
}

fn shape_of_one(text: &str) -> String {
    let Some((column, rest)) = text.split_once('=') else {
        return format!("of {} bytes without '='", text.len());
    };
    let column = escape(column.trim(), NAME_CHARS);
    let (not, rest) = match rest.trim().strip_prefix("not.") {
        Some(rest) => ("not.", rest),
        None => ("", rest.trim()),
    };
    match rest.split_once('.') {
        Some(("in", _)) => format!("{column}={not}in.(…)"),
        Some(("is", v @ ("null" | "true" | "false" | "unknown"))) => format!("{column}={not}is.{v}"),
        Some((op, _)) => format!("{column}={not}{}.…", escape(op, NAME_CHARS)),
        None => format!("{column}=…"),
    }
}

/// `(a,b,"c,d")` -> `["a", "b", "c,d"]`. Errors do not quote the list: it holds values.
fn parse_in_list(value: &str) -> Result<Vec<String>, String> {
    let inner =
        value.strip_prefix('(').and_then(|v| v.strip_suffix(')')).ok_or("the in list must be (a,b,...)")?;
    let mut items = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => current.extend(chars.next()),
            ',' if !quoted => items.push(std::mem::take(&mut current).trim().to_string()),
            c => current.push(c),
        }
    }
    if quoted {
        return Err("the in list has an unterminated quote".into());
    }
    items.push(current.trim().to_string());
    if items.iter().any(String::is_empty) {
        return Err("the in list has an empty item".into());
    }
    if items.len() > 100 {
        return Err("the in list has more than 100 values".into());
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::catalog::TableColumn;
    use crate::capture::{Column, Value};

    fn table() -> PublishedTable {
        let col = |name: &str, type_name: &str, kind| TableColumn {
            name: name.into(),
            type_name: type_name.into(),
            kind,
        };
        PublishedTable {
            schema: "public".into(),
            name: "appointments".into(),
            columns: vec![
                col("id", "int8", ValueKind::Integer),
                col("status", "text", ValueKind::Text),
                col("starts_at", "timestamptz", ValueKind::TimestampTz),
                col("meta", "jsonb", ValueKind::Json),
                col("active", "bool", ValueKind::Bool),
            ],
        }
    }

    fn relation() -> Relation {
        let table = table();
        Relation {
            oid: 1,
            schema: table.schema.clone(),
            name: table.name.clone(),
            replica_identity: b'd',
            columns: table
                .columns
                .iter()
                .map(|c| Column {
                    name: c.name.clone(),
                    type_oid: 0,
                    type_name: c.type_name.clone(),
                    kind: c.kind.clone(),
                    is_key: c.name == "id",
                })
                .collect(),
        }
    }

    fn row(id: &str, status: &str, starts_at: &str) -> Row {
        Row {
            values: vec![
                Value::Text(id.into()),
                Value::Text(status.into()),
                Value::Text(starts_at.into()),
                Value::Null,
            ],
        }
    }

    fn passes(filter: &str, r: &Row) -> bool {
        Filter::parse(filter, &table()).unwrap().matches(&relation(), r)
    }

    #[test]
    fn each_operator_compares_by_column_type() {
        let r = row("10", "booked", "2024-05-01 09:00:00+00");
        assert!(passes("id=eq.10", &r));
        assert!(!passes("id=eq.9", &r));
        assert!(passes("id=neq.9", &r));
        // Numeric, not lexicographic: "10" > "9".
        assert!(passes("id=gt.9", &r));
        assert!(passes("id=gte.10", &r));
        assert!(passes("id=lt.11", &r));
        assert!(passes("id=lte.10", &r));
        assert!(!passes("id=lt.10", &r));
        assert!(passes("id=in.(1,10,100)", &r));
        assert!(!passes("id=in.(1,100)", &r));
        assert!(passes("status=in.(\"cancel,led\",booked)", &r));
        assert!(passes("starts_at=gt.2024-05-01T08:30:00+00:00", &r));
        assert!(passes("starts_at=eq.2024-05-01T11:00:00+02:00", &r));
    }

    #[test]
    fn null_never_matches() {
        let r = Row { values: vec![Value::Text("1".into()), Value::Null, Value::Null, Value::Null] };
        assert!(!passes("status=eq.x", &r));
        assert!(!passes("status=neq.x", &r));
    }

    #[test]
    fn bad_filters_are_rejected_with_reasons() {
        let err = |f: &str| Filter::parse(f, &table()).unwrap_err();
        assert!(err("id").contains("expected column=operator.value"));
        assert!(err("id=regex.5").contains("unknown operator"));
        assert!(err("id=like.5").contains("apply to text columns"));
        assert!(err("status=is.true").contains("apply to boolean columns"));
        assert!(err("status=is.maybe").contains("is takes null, true, false or unknown"));
        assert!(err("status=match.^a").contains("not supported: use like or ilike"));
        assert!(err("status=eq.\"open").contains("not closed"));
        assert!(err("status=eq.\"open\"x").contains("text after a quoted value"));
        assert!(err(&format!("status=like.{}", "%a".repeat(65))).contains("at most 128 characters"));
        assert!(err("nope=eq.5").contains("has no column"));
        assert!(err("id=eq.abc").contains("not a valid int8"));
        assert!(err("meta=eq.{}").contains("cannot be filtered"));
        assert!(err("id=in.1,2").contains("must be (a,b,...)"));
    }

    #[test]
    fn refusals_name_the_shape_of_a_filter_never_its_values() {
        let err = |f: &str| Filter::parse(f, &table()).unwrap_err();
        for (filter, shape) in [
            ("id=eq.patient-4711", "id=eq.…"),
            ("id=in.(4711,\"x\")", "id=in.(…)"),
            ("id=in.4711", "id=in.(…)"),
            ("id=like.4711", "id=like.…"),
            ("id4711", "of 6 bytes without '='"),
        ] {
            let reason = err(filter);
            assert!(reason.starts_with(&format!("invalid filter {shape}: ")), "{filter}: {reason}");
            assert!(!reason.contains("4711"), "{filter}: the value is in {reason:?}");
        }
        let long = format!("{}=eq.1", "c".repeat(10_000));
        assert!(err(&long).len() < 300, "a long column name is clipped");
    }

    #[test]
    fn eq_filters_have_index_keys_and_others_do_not() {
        assert!(Filter::parse("id=eq.5", &table()).unwrap().eq_key().is_some());
        assert!(Filter::parse("id=gt.5", &table()).unwrap().eq_key().is_none());
        assert!(Filter::parse("id=not.eq.5", &table()).unwrap().eq_key().is_none());
    }

    fn all_pass(filter: &str, r: &Row) -> bool {
        let filters = Filter::parse_all(filter, &table()).unwrap();
        filters.iter().all(|f| f.matches(&relation(), r))
    }

    fn with_active(r: Row, active: Value) -> Row {
        let mut values = r.values;
        values.push(active);
        Row { values }
    }

    #[test]
    fn comma_separated_conditions_must_all_hold() {
        let r = row("10", "booked", "2024-05-01 09:00:00+00");
        // Read as one value before: it silently matched nothing.
        assert_eq!(Filter::parse_all("id=eq.10,status=eq.booked", &table()).unwrap().len(), 2);
        assert!(all_pass("id=eq.10,status=eq.booked", &r));
        assert!(!all_pass("id=eq.10,status=eq.open", &r));
        assert!(all_pass("id=gt.5, status=in.(open,booked)", &r), "spaces around a condition");
        assert!(all_pass("status=in.(open,booked),id=lte.10", &r), "commas in a list do not split");
        assert!(all_pass("id=eq.10,", &r), "an empty condition is dropped, as Supabase does");
        let many = vec!["id=gt.1"; 17].join(",");
        assert!(Filter::parse_all(&many, &table()).unwrap_err().contains("more than 16 conditions"));
        assert!(Filter::parse_all(" , ", &table()).unwrap_err().contains("no condition"));
        // The index takes the equality; the other conditions are tested on the row.
        let filters = Filter::parse_all("id=gt.1,status=eq.booked", &table()).unwrap();
        assert_eq!(filters.iter().filter_map(Filter::eq_key).count(), 1);
    }

    #[test]
    fn not_negates_any_operator_and_null_still_never_passes_a_comparison() {
        let r = row("10", "booked", "2024-05-01 09:00:00+00");
        assert!(all_pass("status=not.in.(draft,archived)", &r));
        assert!(!all_pass("status=not.in.(booked,archived)", &r));
        assert!(all_pass("id=not.gt.10", &r));
        assert!(!all_pass("id=not.eq.10", &r));
        assert!(all_pass("status=not.like.can%", &r));
        let null = Row { values: vec![Value::Text("1".into()), Value::Null, Value::Null, Value::Null] };
        assert!(!all_pass("status=not.eq.x", &null), "NOT (NULL = x) is not true");
        assert!(!all_pass("status=not.in.(x)", &null));
    }

    #[test]
    fn is_and_isdistinct_see_null() {
        let r = row("10", "booked", "2024-05-01 09:00:00+00");
        let null = Row { values: vec![Value::Text("1".into()), Value::Null, Value::Null, Value::Null] };
        assert!(all_pass("status=is.null", &null));
        assert!(!all_pass("status=is.null", &r));
        assert!(all_pass("status=not.is.null", &r));
        assert!(!all_pass("status=not.is.null", &null));
        assert!(all_pass("status=isdistinct.booked", &null), "NULL is distinct from a value");
        assert!(!all_pass("status=isdistinct.booked", &r));
        assert!(all_pass("status=isdistinct.open", &r));
        assert!(all_pass("status=not.isdistinct.booked", &r));
        assert!(!all_pass("status=not.isdistinct.booked", &null));
        let on = with_active(r.clone(), Value::Text("t".into()));
        let unknown = with_active(r.clone(), Value::Null);
        assert!(all_pass("active=is.true", &on));
        assert!(!all_pass("active=is.false", &on));
        assert!(all_pass("active=not.is.false", &on));
        assert!(all_pass("active=is.unknown", &unknown));
        assert!(!all_pass("active=is.true", &unknown));
        assert!(all_pass("active=not.is.true", &unknown), "IS NOT TRUE holds for NULL");
    }

    #[test]
    fn like_and_ilike_match_sql_patterns() {
        assert!(like("booked", "boo%", false));
        assert!(like("booked", "%ked", false));
        assert!(like("booked", "b_oked", false));
        assert!(like("booked", "b*d", false), "* stands for %, as in PostgREST");
        assert!(!like("booked", "Boo%", false));
        assert!(like("booked", "Boo%", true));
        assert!(like("50%", "50\\%", false), "an escaped % is literal");
        assert!(!like("500", "50\\%", false));
        assert!(like("", "%", false));
        assert!(!like("a", "", false));
        assert!(like("ÄBC", "äb_", true));
        let r = row("10", "Cancelled by patient", "2024-05-01 09:00:00+00");
        assert!(all_pass("status=ilike.*BY PATIENT", &r));
        assert!(!all_pass("status=like.*BY PATIENT", &r));
    }

    #[test]
    fn values_can_be_quoted_or_escaped_as_postgrest_and_supabase_write_them() {
        let r = row("10", "a, b (c)", "2024-05-01 09:00:00+00");
        assert!(all_pass("status=eq.\"a, b (c)\"", &r), "quoted: commas, parentheses, spaces kept");
        assert!(all_pass("status=eq.a\\, b (c)", &r), "\\, is a comma in a bare value");
        assert!(all_pass("status=in.(\"a, b (c)\",x),id=eq.10", &r));
        let spaced = row("10", "  padded ", "2024-05-01 09:00:00+00");
        assert!(all_pass("status=eq.\"  padded \"", &spaced));
        assert!(all_pass(
            "status=eq.\"quote \\\" inside\"",
            &row("1", "quote \" inside", "2024-05-01 09:00:00+00")
        ));
    }

    #[test]
    fn shapes_of_several_conditions_name_each_without_values() {
        let err = Filter::parse_all("id=eq.4711,status=not.in.(x),nope=eq.4711", &table()).unwrap_err();
        assert!(err.starts_with("invalid filter nope=eq.…: "), "{err}");
        assert_eq!(
            shape("id=eq.4711,status=not.in.(x),active=is.null"),
            "id=eq.…,status=not.in.(…),active=is.null"
        );
    }

    /// Filters built from the grammar's pieces (sometimes mutated byte by byte) never panic
    /// the parser or the matcher, and a refusal of an unmutated filter never repeats a value.
    #[test]
    fn fuzz_filters_never_panic_and_refusals_never_repeat_values() {
        let mut rng = crate::random::XorShift(0x5EED_F11E_u64 << 8 | 1);
        const SECRET: &str = "s3cr3t";
        let columns = ["id", "status", "starts_at", "meta", "active", "nope", ""];
        let ops = [
            "eq",
            "neq",
            "lt",
            "lte",
            "gt",
            "gte",
            "in",
            "is",
            "like",
            "ilike",
            "isdistinct",
            "match",
            "xx",
            "",
        ];
        let values = [
            "10",
            "booked",
            "null",
            "true",
            "unknown",
            "%bo_k*",
            "\"a, b\"",
            "(1,2,3)",
            "(\"x,y\",z)",
            "a\\,b",
            "\"open",
            "()",
            "(",
            "2024-05-01T00:00:00Z",
            "",
        ];
        let junk = ",()\"\\.=% *_ab1";
        let valid = [
            "id=eq.10",
            "status=not.in.(a,b)",
            "status=like.%bo_k*",
            "active=is.true",
            "status=is.null",
            "id=isdistinct.3",
            "status=eq.\"a, b\"",
            "starts_at=gt.2024-05-01T00:00:00Z",
        ];
        let rows = [
            row("10", "booked", "2024-05-01 09:00:00+00"),
            Row { values: vec![Value::Null, Value::Null, Value::Null, Value::Null, Value::Null] },
            with_active(row("-1", &"x".repeat(1000), "infinity"), Value::Text("f".into())),
            Row { values: vec![Value::UnchangedToast] },
        ];
        let (mut parsed, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let conditions = 1 + rng.below(4);
            let mut text = String::new();
            for n in 0..conditions {
                if n > 0 {
                    text.push_str([",", ", ", " ,", "\\,"][rng.below(4)]);
                }
                if rng.below(2) == 0 {
                    text.push_str(valid[rng.below(valid.len())]);
                    continue;
                }
                text.push_str(columns[rng.below(columns.len())]);
                text.push('=');
                if rng.below(3) == 0 {
                    text.push_str("not.");
                }
                text.push_str(ops[rng.below(ops.len())]);
                text.push('.');
                let value = values[rng.below(values.len())];
                if rng.below(4) == 0 {
                    text.push_str(&value.replace("a", SECRET));
                    text.push_str(SECRET);
                } else {
                    text.push_str(value);
                }
            }
            let mutated = rng.below(3) == 0;
            if mutated {
                for _ in 0..1 + rng.below(3) {
                    let at = rng.below(text.len() + 1);
                    if !text.is_char_boundary(at) {
                        continue;
                    }
                    if rng.below(2) == 0 && at < text.len() && text.is_char_boundary(at + 1) {
                        text.remove(at);
                    } else {
                        text.insert(at, junk.as_bytes()[rng.below(junk.len())] as char);
                    }
                }
            }
            match Filter::parse_all(&text, &table()) {
                Ok(filters) => {
                    parsed += 1;
                    for r in &rows {
                        for f in &filters {
                            f.matches(&relation(), r);
                            f.eq_key();
                        }
                    }
                }
                Err(reason) => {
                    refused += 1;
                    assert!(reason.len() < 1000, "{text:?}: a refusal of {} bytes", reason.len());
                    if !mutated {
                        assert!(!reason.contains(SECRET), "{text:?}: the value is in {reason:?}");
                    }
                }
            }
        }
        assert!(parsed > 2_000 && refused > 2_000, "{parsed} parsed, {refused} refused");
    }

    #[test]
    fn events_parse_and_match() {
        assert!(EventFilter::parse("*").unwrap().accepts(ChangeKind::Delete));
        assert!(!EventFilter::parse("INSERT").unwrap().accepts(ChangeKind::Update));
        assert!(EventFilter::parse("insert").is_err());
    }
}
