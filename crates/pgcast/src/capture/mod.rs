//! Change capture: PostgreSQL -> typed [`Transaction`]s of [`Change`]s, in commit order.
//!
//! `replication` streams pgoutput from a logical replication slot, `decode` turns its messages
//! into the types below, `value` renders column values as JSON, and `catalog` answers what the
//! database says about tables, columns and types.
//!
//! Capture never decides who receives a change; it hands whole transactions to the router and
//! learns through [`Progress`] how far the router has handled them.

pub mod catalog;
pub mod decode;
pub mod outbox;
pub mod publication;
pub mod replication;
pub mod retention;
pub mod value;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::json::write_string;
use value::ValueKind;

/// A PostgreSQL WAL position.
pub type Lsn = u64;

/// Formats an LSN as PostgreSQL does (`16/B374D848`).
pub fn format_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// One committed transaction, with its changes in the order PostgreSQL applied them.
#[derive(Debug, Clone)]
pub struct Transaction {
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: once handled, the slot may be confirmed up to here.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_micros: i64,
    pub changes: Vec<Change>,
}

/// A single row change (or a table truncation).
#[derive(Debug, Clone)]
pub struct Change {
    pub relation: Arc<Relation>,
    pub kind: ChangeKind,
    /// The new row for INSERT and UPDATE.
    pub new: Option<Row>,
    /// The old row for UPDATE and DELETE: key columns only unless the table has
    /// `REPLICA IDENTITY FULL`; `None` for an UPDATE that did not change the key.
    pub old: Option<Row>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Insert => "INSERT",
            ChangeKind::Update => "UPDATE",
            ChangeKind::Delete => "DELETE",
            ChangeKind::Truncate => "TRUNCATE",
        }
    }
}

/// A table as described by pgoutput's Relation message, with each column's type resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `d` default (primary key), `f` full, `i` index, `n` nothing.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    /// `pg_type.typname`, e.g. `int4`, `timestamptz`, `_text`; realtime-js converts by it.
    pub type_name: String,
    pub kind: ValueKind,
    /// Part of the replica identity (usually the primary key).
    pub is_key: bool,
}

impl Relation {
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// One column value of a row as pgoutput sent it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// A TOASTed value the UPDATE did not change: PostgreSQL does not send it again.
    UnchangedToast,
    /// PostgreSQL's text output of the value.
    Text(Box<str>),
}

/// Column values aligned with [`Relation::columns`].
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub values: Vec<Value>,
}

impl Row {
    /// Writes the row as a JSON object in column order, only the replica identity columns when
    /// `keys_only`. Columns whose value is an unchanged TOAST value are left out (the payload
    /// names them separately).
    pub fn write_json(&self, relation: &Relation, keys_only: bool, out: &mut String) {
        self.write_json_where(relation, |column| !keys_only || column.is_key, out);
    }

    /// Writes the columns `include` admits as a JSON object, in column order.
    pub fn write_json_where(&self, relation: &Relation, include: impl Fn(&Column) -> bool, out: &mut String) {
        out.push('{');
        let mut first = true;
        for (column, value) in relation.columns.iter().zip(&self.values) {
            if matches!(value, Value::UnchangedToast) || !include(column) {
                continue;
            }
            if !first {
                out.push(',');
            }
            first = false;
            write_string(&column.name, out);
            out.push(':');
            match value {
                Value::Null => out.push_str("null"),
                Value::Text(text) => column.kind.write_json(text, out),
                Value::UnchangedToast => {}
            }
        }
        out.push('}');
    }

    /// Text of the named column, `None` for NULL, unchanged TOAST or a missing column.
    pub fn text(&self, index: usize) -> Option<&str> {
        match self.values.get(index) {
            Some(Value::Text(text)) => Some(text),
            _ => None,
        }
    }
}

/// How far the router has handled the stream: capture confirms the slot up to this LSN and no
/// further, so a change is never acknowledged to PostgreSQL before it was routed.
#[derive(Debug, Default)]
pub struct Progress {
    handled: AtomicU64,
    /// 0, or the commit LSN of the oldest transaction the history retains: the history slot is
    /// not advanced past it, so a restart can read it again.
    hold: AtomicU64,
}

impl Progress {
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress::default())
    }

    /// Records that every transaction ending at or before `lsn` has been routed.
    pub fn mark_handled(&self, lsn: Lsn) {
        self.handled.fetch_max(lsn, Ordering::AcqRel);
    }

    pub fn handled(&self) -> Lsn {
        self.handled.load(Ordering::Acquire)
    }

    /// Sets (or with `None` lifts) the hold of the retained history.
    pub fn hold(&self, oldest_retained_commit: Option<Lsn>) {
        self.hold.store(oldest_retained_commit.unwrap_or(0), Ordering::Release);
    }

    /// How far the history slot may be advanced now: handled, but not past the history's hold.
    pub fn confirmable(&self) -> Lsn {
        self.confirmable_with(self.handled())
    }

    /// [`Progress::confirmable`] for a given handled position.
    pub fn confirmable_with(&self, handled: Lsn) -> Lsn {
        match self.hold.load(Ordering::Acquire) {
            0 => handled,
            hold => handled.min(hold),
        }
    }
}
