//! The `data` of a `postgres_changes` message, as realtime-js parses it:
//! `{schema, table, commit_timestamp, type, columns, record, old_record, errors}`.
//!
//! `data` is serialized once per change and shape and shared by every message that carries it;
//! the envelope around it (`{ids, data}` for Phoenix) is the wire format's (`protocol`).

use crate::capture::{Change, ChangeKind, Column, Transaction, Value};
use crate::json::write_string;

use super::policy::{Shape, ShapeSpec};
use crate::log::Position;

/// What of a change one group of subscribers receives.
#[derive(Debug, Clone, Copy)]
pub enum View<'a> {
    /// Whole rows (no policy, or a `full` rule).
    Full,
    /// A policy shape: `keys` or an allow-list of columns.
    Shaped(&'a ShapeSpec),
    /// The row left the subscriber's view: a DELETE carrying the primary key only.
    LeftView(&'a [String]),
}

impl View<'_> {
    /// The operation a change is to this view: a row leaving it is a DELETE.
    pub fn kind(&self, change: &Change) -> ChangeKind {
        if matches!(self, View::LeftView(_)) {
            ChangeKind::Delete
        } else {
            change.kind
        }
    }

    fn includes(&self, column: &Column) -> bool {
        match self {
            View::Full => true,
            View::Shaped(spec) => {
                spec.primary_key.contains(&column.name)
                    || match &spec.shape {
                        Shape::Full => true,
                        Shape::Keys => false,
                        Shape::Columns(columns) => columns.contains(&column.name),
                    }
            }
            View::LeftView(primary_key) => primary_key.contains(&column.name),
        }
    }
}

/// Serializes the `data` object of a change as `view` allows. `position` and `epoch` go in a
/// `pgcast` field realtime-js ignores and pgcast's SDK resumes from.
pub fn change_data(
    tx: &Transaction,
    change: &Change,
    view: View<'_>,
    position: Position,
    epoch: &str,
) -> String {
    let relation = &change.relation;
    let left_view = matches!(view, View::LeftView(_));
    let kind = view.kind(change);
    let mut out = String::with_capacity(256);
    out.push_str("{\"schema\":");
    write_string(&relation.schema, &mut out);
    out.push_str(",\"table\":");
    write_string(&relation.name, &mut out);
    out.push_str(",\"commit_timestamp\":\"");
    out.push_str(&format_utc_micros(tx.commit_time_micros));
    out.push_str("\",\"type\":\"");
    out.push_str(kind.as_str());
    out.push_str("\",\"columns\":[");
    let mut first = true;
    for column in relation.columns.iter().filter(|c| view.includes(c)) {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str("{\"name\":");
        write_string(&column.name, &mut out);
        out.push_str(",\"type\":");
        write_string(&column.type_name, &mut out);
        out.push('}');
    }
    out.push(']');
    if let (ChangeKind::Insert | ChangeKind::Update, Some(new)) = (kind, &change.new) {
        out.push_str(",\"record\":");
        new.write_json_where(relation, |c| view.includes(c), &mut out);
    }
    if matches!(kind, ChangeKind::Update | ChangeKind::Delete) {
        out.push_str(",\"old_record\":");
        // With REPLICA IDENTITY FULL the old row is complete; otherwise PostgreSQL sends the
        // key only (or nothing when an UPDATE kept the key, then the new row's key stands).
        let keys_only = relation.replica_identity != b'f' || change.old.is_none();
        match change.old.as_ref().or(change.new.as_ref()) {
            Some(old) => {
                old.write_json_where(relation, |c| view.includes(c) && (!keys_only || c.is_key), &mut out)
            }
            None => out.push_str("{}"),
        }
    }
    if left_view {
        out.push_str(",\"left_view\":true");
    }
    if let (View::Shaped(ShapeSpec { shape: Shape::Keys, .. }), ChangeKind::Update, Some(old), Some(new)) =
        (view, kind, &change.old, &change.new)
    {
        // Names of the columns this UPDATE changed (known when the old row is whole).
        if relation.replica_identity == b'f' {
            out.push_str(",\"changed_columns\":[");
            let mut first = true;
            for ((column, before), after) in relation.columns.iter().zip(&old.values).zip(&new.values) {
                if before == after || matches!(after, Value::UnchangedToast) {
                    continue;
                }
                if !first {
                    out.push(',');
                }
                first = false;
                write_string(&column.name, &mut out);
            }
            out.push(']');
        }
    }
    let unchanged: Vec<&str> = change
        .new
        .iter()
        .filter(|_| !left_view)
        .flat_map(|row| relation.columns.iter().zip(&row.values))
        .filter(|(column, value)| matches!(value, Value::UnchangedToast) && view.includes(column))
        .map(|(column, _)| column.name.as_str())
        .collect();
    if !unchanged.is_empty() {
        // Large values the UPDATE did not touch are not re-sent by PostgreSQL (unless the table
        // has REPLICA IDENTITY FULL); name them so a client knows to keep its copy.
        out.push_str(",\"unchanged_toast\":[");
        for (i, name) in unchanged.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_string(name, &mut out);
        }
        out.push(']');
    }
    out.push_str(",\"pgcast\":{\"position\":\"");
    out.push_str(&position.to_string());
    out.push_str("\",\"epoch\":");
    write_string(epoch, &mut out);
    out.push_str("},\"errors\":null}");
    out
}

/// A table change as a Socket.IO room event's argument: `{"operation": "UPDATE", <key>: row}`
/// (seed 000's `{operation, appointment}`), the row as `view` allows: the new row, or for a
/// DELETE (and a row leaving the view) the old row PostgreSQL sent.
pub fn event_data(change: &Change, view: View<'_>, key: &str) -> String {
    let relation = &change.relation;
    let kind = view.kind(change);
    let mut out = String::with_capacity(128);
    out.push_str("{\"operation\":\"");
    out.push_str(kind.as_str());
    out.push_str("\",");
    write_string(key, &mut out);
    out.push(':');
    let row = match kind {
        ChangeKind::Insert | ChangeKind::Update => change.new.as_ref(),
        ChangeKind::Delete | ChangeKind::Truncate => change.old.as_ref(),
    };
    match row {
        Some(row) => {
            // Without REPLICA IDENTITY FULL a DELETE's old row holds the key only.
            let keys_only = kind == ChangeKind::Delete && relation.replica_identity != b'f';
            row.write_json_where(relation, |c| view.includes(c) && (!keys_only || c.is_key), &mut out)
        }
        None => out.push_str("null"),
    }
    out.push('}');
    out
}

/// `2024-05-01T09:00:00.123Z` (millisecond precision, as Supabase Realtime sends it).
pub fn format_utc_micros(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let millis = micros.rem_euclid(1_000_000) / 1000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z", rem / 3600, (rem % 3600) / 60, rem % 60)
}

/// Inverse of days-from-civil (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::value::parse_timestamp;

    #[test]
    fn utc_formatting_round_trips_through_the_parser() {
        for text in ["1970-01-01T00:00:00.000Z", "2024-02-29T23:59:59.999Z", "1999-12-31T12:00:00.500Z"] {
            let micros = i64::try_from(parse_timestamp(text).unwrap()).unwrap();
            assert_eq!(format_utc_micros(micros), text);
        }
    }
}
