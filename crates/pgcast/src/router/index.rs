//! The subscription index: table -> (equality-filter column -> value -> subscriptions), plus
//! the subscriptions a change must be tested against one by one (no filter or a range filter).
//!
//! Matching a change costs one hash lookup per filtered column in use on that table, not a scan
//! of every subscriber. The index holds no connections' state beyond their handles.

use std::collections::HashMap;
use std::sync::Arc;

use crate::capture::{Change, ChangeKind, Row};
use crate::outbound::SessionHandle;

use super::filter::{EventFilter, Filter};
use super::policy::{BoundPolicy, Visibility};

pub type SubscriptionId = u64;

/// One postgres_changes binding of one joined channel.
#[derive(Debug)]
pub struct Subscription {
    pub id: SubscriptionId,
    pub session: Arc<SessionHandle>,
    /// The channel topic, e.g. `realtime:room1`.
    pub topic: Arc<str>,
    /// The id returned in the join reply; realtime-js matches `ids` of each message against it.
    pub binding_id: u32,
    pub schema: String,
    /// `None` subscribes to every published table of the schema.
    pub table: Option<String>,
    pub events: EventFilter,
    /// Conditions a row must meet, all of them (a binding's `filter`, a Socket.IO room's or
    /// subscription's equalities).
    pub filters: Box<[Filter]>,
    /// What the subscriber's role may see; `None` for the service role (everything).
    pub policy: Option<BoundPolicy>,
    /// A resumed subscription already has everything up to here.
    pub min_position: Option<crate::log::Position>,
    /// Set for a Socket.IO room or subscription fed by `[[socketio.tables]]`: changes go out
    /// as this named event instead of a `postgres_changes` message on `topic`.
    pub event: Option<Arc<crate::protocol::TableEvent>>,
}

impl Subscription {
    /// What a connection gets one message per change for: its channel, or for a table event
    /// the route, whichever of the route's rooms matched (each change reaches it once).
    pub fn group(&self) -> &Arc<str> {
        match &self.event {
            Some(event) => &event.group,
            None => &self.topic,
        }
    }

    /// The (column, value key) the index files this subscription under: its own equality
    /// filter, else its policy's pinned column; `None` when it must be tested one by one.
    pub fn index_key(&self) -> Option<(String, String)> {
        let by_filter = self.filters.iter().find_map(|f| f.eq_key().map(|k| (f.column.clone(), k)));
        by_filter.or_else(|| {
            let condition = self.policy.as_ref()?.index_condition()?;
            Some((condition.column.clone(), condition.eq_key()?))
        })
    }

    /// What this subscription receives of `change` (its table already matched by the index).
    pub fn visibility(&self, change: &Change) -> Visibility {
        let event_ok = match change.kind {
            ChangeKind::Truncate => self.events.accepts(ChangeKind::Truncate),
            // A row leaving the view arrives as a DELETE, so UPDATE and DELETE bindings qualify.
            ChangeKind::Update => {
                self.events.accepts(ChangeKind::Update) || self.events.accepts(ChangeKind::Delete)
            }
            kind => self.events.accepts(kind),
        };
        if !event_ok {
            return Visibility::Hidden;
        }
        if let Some(policy) = &self.policy {
            let visibility = policy.visibility(change, &self.filters);
            return match visibility {
                Visibility::Visible(_) if !self.events.accepts(change.kind) => Visibility::Hidden,
                Visibility::LeftView(_)
                    if !self.events.accepts(ChangeKind::Delete)
                        && !self.events.accepts(ChangeKind::Update) =>
                {
                    Visibility::Hidden
                }
                other => other,
            };
        }
        if !self.events.accepts(change.kind) {
            return Visibility::Hidden;
        }
        if change.kind == ChangeKind::Truncate {
            // A truncation has no row to test a filter against (and a TRUNCATE binding with a
            // filter is refused at join).
            return if self.filters.is_empty() { Visibility::Visible(None) } else { Visibility::Hidden };
        }
        let passes = match filter_row(change) {
            _ if self.filters.is_empty() => true,
            Some(row) => self.filters.iter().all(|f| f.matches(&change.relation, row)),
            None => false,
        };
        if passes {
            Visibility::Visible(None)
        } else {
            Visibility::Hidden
        }
    }
}

/// Rows whose values locate equality-indexed subscriptions.
fn lookup_rows(change: &Change) -> impl Iterator<Item = &Row> {
    let (first, second) = match change.kind {
        ChangeKind::Insert => (change.new.as_ref(), None),
        ChangeKind::Update => (change.new.as_ref(), change.old.as_ref()),
        ChangeKind::Delete => (change.old.as_ref(), None),
        ChangeKind::Truncate => (None, None),
    };
    first.into_iter().chain(second)
}

/// The row filters apply to: the new row for INSERT/UPDATE, the old row for DELETE.
fn filter_row(change: &Change) -> Option<&Row> {
    match change.kind {
        ChangeKind::Insert | ChangeKind::Update => change.new.as_ref(),
        ChangeKind::Delete => change.old.as_ref(),
        ChangeKind::Truncate => None,
    }
}

type Bucket = HashMap<SubscriptionId, Arc<Subscription>>;

#[derive(Default)]
struct TableEntry {
    /// Subscriptions without an equality filter: each is tested against each change.
    scanned: Bucket,
    /// column -> value key -> subscriptions with `column=eq.value`.
    by_eq: HashMap<String, HashMap<String, Bucket>>,
}

impl TableEntry {
    fn is_empty(&self) -> bool {
        self.scanned.is_empty() && self.by_eq.is_empty()
    }
}

#[derive(Default)]
pub struct Index {
    /// schema -> table -> entry; the table is `*` for schema-wide subscriptions.
    tables: HashMap<String, HashMap<String, TableEntry>>,
    count: usize,
}

const ALL_TABLES: &str = "*";

impl Index {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn insert(&mut self, sub: Arc<Subscription>) {
        let table = sub.table.clone().unwrap_or_else(|| ALL_TABLES.into());
        let entry = self.tables.entry(sub.schema.clone()).or_default().entry(table).or_default();
        let previous = match sub.index_key() {
            Some((column, value_key)) => entry
                .by_eq
                .entry(column)
                .or_default()
                .entry(value_key)
                .or_default()
                .insert(sub.id, sub.clone()),
            None => entry.scanned.insert(sub.id, sub.clone()),
        };
        if previous.is_none() {
            self.count += 1;
        }
    }

    pub fn remove(&mut self, sub: &Subscription) {
        let table = sub.table.as_deref().unwrap_or(ALL_TABLES);
        let Some(schema) = self.tables.get_mut(&sub.schema) else { return };
        let Some(entry) = schema.get_mut(table) else { return };
        let removed = match sub.index_key() {
            Some((column, value_key)) => {
                let Some(values) = entry.by_eq.get_mut(&column) else { return };
                let Some(bucket) = values.get_mut(&value_key) else { return };
                let removed = bucket.remove(&sub.id).is_some();
                if bucket.is_empty() {
                    values.remove(&value_key);
                }
                if values.is_empty() {
                    entry.by_eq.remove(&column);
                }
                removed
            }
            None => entry.scanned.remove(&sub.id).is_some(),
        };
        if removed {
            self.count -= 1;
        }
        if entry.is_empty() {
            schema.remove(table);
        }
        if schema.is_empty() {
            self.tables.remove(&sub.schema);
        }
    }

    /// Every subscription that receives `change`, each once, with what it receives.
    pub fn matches(&self, change: &Change, out: &mut Vec<(Arc<Subscription>, Visibility)>) {
        let relation = &change.relation;
        let Some(schema) = self.tables.get(relation.schema.as_str()) else { return };
        for table in [relation.name.as_str(), ALL_TABLES] {
            let Some(entry) = schema.get(table) else { continue };
            let mut test = |sub: &Arc<Subscription>| match sub.visibility(change) {
                Visibility::Hidden => {}
                visibility => out.push((sub.clone(), visibility)),
            };
            entry.scanned.values().for_each(&mut test);
            // Equality-indexed subscriptions are found by the row's value. An UPDATE is looked
            // up by its new and its old value, so a row moving out of a view is still seen.
            let mut keys: Vec<(&str, String)> = Vec::new();
            for row in lookup_rows(change) {
                for column in entry.by_eq.keys() {
                    let Some(index) = relation.column_index(column) else { continue };
                    let Some(text) = row.text(index) else { continue };
                    let Some(value) = relation.columns[index].kind.parse_scalar(text) else { continue };
                    let key = (column.as_str(), value.index_key());
                    if !keys.contains(&key) {
                        keys.push(key);
                    }
                }
            }
            for (column, key) in keys {
                if let Some(bucket) = entry.by_eq.get(column).and_then(|values| values.get(&key)) {
                    bucket.values().for_each(&mut test);
                }
            }
        }
    }
}
