//! postgres_changes subscription filters (`col=op.value`, Supabase's syntax) and event kinds,
//! parsed against the table's column types at join time and evaluated against rows.
//!
//! Parsing is where bad input is rejected with a reason; evaluation never fails.

use std::cmp::Ordering;

use crate::capture::catalog::PublishedTable;
use crate::capture::value::{Scalar, ValueKind};
use crate::capture::{ChangeKind, Relation, Row};
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
}

/// A parsed filter: `column` compared with typed operands.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub column: String,
    pub op: Op,
    pub kind: ValueKind,
    /// One operand, or the list for `in`.
    pub operands: Vec<Scalar>,
}

impl Filter {
    /// Parses `col=op.value` against the table's columns. Refusals name the filter's
    /// [`shape`], never its values: they are logged and audited, and values are often patient
    /// ids.
    pub fn parse(text: &str, table: &PublishedTable) -> Result<Filter, String> {
        let invalid = |problem: String| format!("invalid filter {}: {problem}", shape(text));
        let (column, rest) =
            text.split_once('=').ok_or_else(|| invalid("expected column=operator.value".into()))?;
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
            other => {
                return Err(invalid(format!(
                    "unknown operator {} (use eq, neq, lt, lte, gt, gte or in)",
                    clip(other, NAME_CHARS)
                )))
            }
        };
        Filter::typed(column, op, value, table).map_err(invalid)
    }

    /// `column = value`, `value` as PostgreSQL text (a Socket.IO room's or subscription's
    /// equality), checked against the column's type like a parsed filter.
    pub fn equal(column: &str, value: &str, table: &PublishedTable) -> Result<Filter, String> {
        Filter::typed(column, Op::Eq, value, table).map_err(|problem| {
            format!("invalid filter {}: {problem}", shape(&format!("{column}=eq.{value}")))
        })
    }

    /// `column op value` against the table's columns; the error is the problem only.
    fn typed(column: &str, op: Op, value: &str, table: &PublishedTable) -> Result<Filter, String> {
        let col = table.column(column).ok_or_else(|| {
            format!("table {}.{} has no column {}", table.schema, table.name, clip(column, NAME_CHARS))
        })?;
        if !col.kind.is_filterable() {
            return Err(format!("column {column:?} has type {} which cannot be filtered", col.type_name));
        }
        let raw_operands = if op == Op::In { parse_in_list(value)? } else { vec![value.to_string()] };
        let operands = raw_operands
            .iter()
            .map(|raw| {
                col.kind.parse_scalar(raw).ok_or_else(|| format!("a value is not a valid {}", col.type_name))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Filter { column: column.to_string(), op, kind: col.kind.clone(), operands })
    }

    /// The equality key, when the filter is `eq` (used by the index).
    pub fn eq_key(&self) -> Option<String> {
        match (self.op, self.operands.as_slice()) {
            (Op::Eq, [one]) => Some(one.index_key()),
            _ => None,
        }
    }

    /// Whether `row` passes. As in SQL, a comparison with NULL (or a column the row does not
    /// carry, such as a non-key column of a key-only old row) is never true.
    pub fn matches(&self, relation: &Relation, row: &Row) -> bool {
        let Some(index) = relation.column_index(&self.column) else { return false };
        let Some(text) = row.text(index) else { return false };
        let Some(value) = self.kind.parse_scalar(text) else { return false };
        self.accepts_scalar(&value)
    }

    /// Whether a (non-NULL) column value passes.
    pub fn accepts_scalar(&self, value: &Scalar) -> bool {
        let cmp = |operand: &Scalar| value.compare(operand);
        let first = self.operands.first().and_then(cmp);
        match self.op {
            Op::Eq => first == Some(Ordering::Equal),
            Op::Neq => matches!(first, Some(Ordering::Less | Ordering::Greater)),
            Op::Lt => first == Some(Ordering::Less),
            Op::Lte => matches!(first, Some(Ordering::Less | Ordering::Equal)),
            Op::Gt => first == Some(Ordering::Greater),
            Op::Gte => matches!(first, Some(Ordering::Greater | Ordering::Equal)),
            Op::In => self.operands.iter().any(|o| cmp(o) == Some(Ordering::Equal)),
        }
    }
}

/// What a filter looks like without its values, for messages and logs: `patient_id=eq.…`,
/// `status=in.(…)`; names clipped and escaped.
pub fn shape(text: &str) -> String {
    let Some((column, rest)) = text.split_once('=') else {
        return format!("of {} bytes without '='", text.len());
    };
    let column = escape(column, NAME_CHARS);
    match rest.split_once('.') {
        Some(("in", _)) => format!("{column}=in.(…)"),
        Some((op, _)) => format!("{column}={}.…", escape(op, NAME_CHARS)),
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
        assert!(err("id=like.5").contains("unknown operator"));
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
    }

    #[test]
    fn events_parse_and_match() {
        assert!(EventFilter::parse("*").unwrap().accepts(ChangeKind::Delete));
        assert!(!EventFilter::parse("INSERT").unwrap().accepts(ChangeKind::Update));
        assert!(EventFilter::parse("insert").is_err());
    }
}
