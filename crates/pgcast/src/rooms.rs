//! Socket.IO rooms and subscriptions fed by table changes: the config file's
//! `[[socketio.tables]]`, compiled at start-up into [`TableRoutes`], and what a room or a
//! subscribe event means in terms of them ([`TableBinding`]: a route and equalities on its
//! columns).
//!
//! A route says which rooms are interested in a table's changes (`appointment:{id}`,
//! `provider:{provider_id}`, `calendar`) and how they are named and shaped on the wire
//! (`appointment:updated` with `{operation, appointment}`). It never says who may see a row:
//! the session binds each route to its member's row policy. This module checks only shape;
//! tables and columns are checked against the publication when a room is joined.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::protocol::TableEvent;

/// Events a client may not use as a subscribe event: the adapter's own.
const RESERVED_EVENTS: [&str; 3] = ["join", "leave", "access_token"];

/// One `[[socketio.tables]]` entry as the file has it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTable {
    /// `schema.table`, or `table` in `public`.
    table: String,
    /// The event name for every operation (`appointment:updated`)...
    event: Option<String>,
    /// ...or per operation (`{insert = "appointment:created", ...}`), over `event`.
    events: Option<FileEvents>,
    /// The key the row goes under in the event's argument (default `record`).
    key: Option<String>,
    /// Room templates: literal text with at most one `{column}` (`provider:{provider_id}`).
    #[serde(default)]
    rooms: Vec<String>,
    /// A client event that subscribes to this table server-side (`subscribe:appointments`).
    subscribe: Option<String>,
    /// The event that ends it (default: `un` + the subscribe event).
    unsubscribe: Option<String>,
    /// The subscribe event's argument fields → the columns they must equal
    /// (`{date = "date", doctorId = "doctor_id"}`).
    #[serde(default)]
    filters: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEvents {
    insert: Option<String>,
    update: Option<String>,
    delete: Option<String>,
}

/// A room template: `prefix{column}suffix`, or literal text (`calendar`).
#[derive(Debug, Clone, PartialEq)]
struct Template {
    prefix: String,
    column: Option<String>,
    suffix: String,
}

impl Template {
    fn parse(text: &str) -> Result<Template, String> {
        if text.is_empty() || text.chars().any(char::is_control) || text.contains('*') {
            return Err(format!(
                "room template {text:?} must be non-empty, without '*' or control characters"
            ));
        }
        let Some(open) = text.find('{') else {
            if text.contains('}') {
                return Err(format!("room template {text:?} has a '}}' without its '{{'"));
            }
            return Ok(Template { prefix: text.to_string(), column: None, suffix: String::new() });
        };
        let close = text[open..]
            .find('}')
            .map(|i| open + i)
            .ok_or_else(|| format!("room template {text:?} has an unclosed '{{'"))?;
        let column = &text[open + 1..close];
        let suffix = &text[close + 1..];
        if column.is_empty() || !column.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "room template {text:?}: {{{column}}} must name a column (letters, digits, '_'); rooms from claims are socketio.connect_rooms"
            ));
        }
        if suffix.contains(['{', '}']) {
            return Err(format!("room template {text:?} has more than one placeholder (at most one column)"));
        }
        Ok(Template {
            prefix: text[..open].to_string(),
            column: Some(column.to_string()),
            suffix: suffix.to_string(),
        })
    }

    /// The equality `room` means under this template, `Some(None)` for a literal match.
    fn matches(&self, room: &str) -> Option<Option<(String, String)>> {
        let Some(column) = &self.column else {
            return (room == self.prefix).then_some(None);
        };
        let value = room.strip_prefix(self.prefix.as_str())?.strip_suffix(self.suffix.as_str())?;
        (!value.is_empty()).then(|| Some((column.clone(), value.to_string())))
    }
}

/// The server-side subscription of a route.
#[derive(Debug)]
pub struct Subscribe {
    pub event: String,
    pub unsubscribe: String,
    /// Argument field → column.
    pub filters: Vec<(String, String)>,
}

/// One compiled `[[socketio.tables]]` entry.
#[derive(Debug)]
pub struct TableRoute {
    pub schema: String,
    pub table: String,
    pub event: Arc<TableEvent>,
    rooms: Vec<Template>,
    pub subscribe: Option<Subscribe>,
}

impl TableRoute {
    /// The columns its room templates and subscribe filters name.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        let rooms = self.rooms.iter().filter_map(|t| t.column.as_deref());
        let filters = self.subscribe.iter().flat_map(|s| s.filters.iter().map(|(_, c)| c.as_str()));
        rooms.chain(filters)
    }
}

/// What a room or a subscription receives of one route: its changes where each `column`
/// equals its value (PostgreSQL text, typed when bound).
#[derive(Debug, Clone, PartialEq)]
pub struct TableBinding {
    pub route: usize,
    pub equal: Vec<(String, String)>,
}

/// Every route of the config, in file order.
#[derive(Debug, Default, Clone)]
pub struct TableRoutes(Arc<[TableRoute]>);

impl TableRoutes {
    /// Checks and compiles the file's entries; the error names the entry.
    pub fn compile(file: Vec<FileTable>) -> Result<TableRoutes, String> {
        let mut routes: Vec<TableRoute> = Vec::with_capacity(file.len());
        for (i, entry) in file.into_iter().enumerate() {
            let at = |message: String| format!("[{i}] (table {}): {message}", entry.table);
            let (schema, table) = match entry.table.split_once('.') {
                Some((schema, table)) => (schema.to_string(), table.to_string()),
                None => ("public".to_string(), entry.table.clone()),
            };
            if schema.is_empty() || table.is_empty() {
                return Err(at("table must be `schema.table` or `table`".into()));
            }
            let events = entry.events.unwrap_or_default();
            let name = |one: Option<String>, what: &str| {
                one.or_else(|| entry.event.clone())
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| at(format!("needs `event` (every operation) or `events.{what}`")))
            };
            let (insert, update, delete) = (
                name(events.insert, "insert")?,
                name(events.update, "update")?,
                name(events.delete, "delete")?,
            );
            let key = entry.key.unwrap_or_else(|| "record".into());
            if key.is_empty() || key == "operation" {
                return Err(at("key must be non-empty and not `operation`".into()));
            }
            let rooms =
                entry.rooms.iter().map(|t| Template::parse(t)).collect::<Result<Vec<_>, _>>().map_err(at)?;
            let subscribe = match entry.subscribe {
                Some(event) => {
                    if event.is_empty() || RESERVED_EVENTS.contains(&event.as_str()) {
                        return Err(at(format!(
                            "subscribe {event:?} is empty or one of pgcast's own events"
                        )));
                    }
                    let unsubscribe = entry.unsubscribe.unwrap_or_else(|| format!("un{event}"));
                    let taken = routes.iter().filter_map(|r| r.subscribe.as_ref()).any(|s| {
                        [&s.event, &s.unsubscribe].iter().any(|e| **e == event || **e == unsubscribe)
                    });
                    if taken || unsubscribe == event {
                        return Err(at(format!(
                            "subscribe {event:?} / unsubscribe {unsubscribe:?} is already used"
                        )));
                    }
                    Some(Subscribe { event, unsubscribe, filters: entry.filters.into_iter().collect() })
                }
                None if !entry.filters.is_empty() || entry.unsubscribe.is_some() => {
                    return Err(at("filters and unsubscribe belong to a subscribe event".into()));
                }
                None => None,
            };
            if rooms.is_empty() && subscribe.is_none() {
                return Err(at("needs rooms, a subscribe event, or both".into()));
            }
            let event = Arc::new(TableEvent {
                group: Arc::from(format!("socketio.tables[{i}]")),
                binding_id: i as u32 + 1,
                insert: insert.into(),
                update: update.into(),
                delete: delete.into(),
                key: key.into(),
            });
            routes.push(TableRoute { schema, table, event, rooms, subscribe });
        }
        Ok(TableRoutes(routes.into()))
    }

    pub fn get(&self, route: usize) -> Option<&TableRoute> {
        self.0.get(route)
    }

    /// What joining `room` subscribes to: one binding per template that matches it.
    pub fn for_room(&self, room: &str) -> Vec<TableBinding> {
        let mut bindings = Vec::new();
        for (route, entry) in self.0.iter().enumerate() {
            for template in &entry.rooms {
                if let Some(equal) = template.matches(room) {
                    let binding = TableBinding { route, equal: equal.into_iter().collect() };
                    if !bindings.contains(&binding) {
                        bindings.push(binding);
                    }
                }
            }
        }
        bindings
    }

    /// The route a subscribe event names.
    pub fn subscription(&self, event: &str) -> Option<(usize, &Subscribe)> {
        self.0
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.subscribe.as_ref().filter(|s| s.event == event).map(|s| (i, s)))
    }

    /// The subscribe event an unsubscribe event ends.
    pub fn unsubscription(&self, event: &str) -> Option<&Subscribe> {
        self.0.iter().filter_map(|r| r.subscribe.as_ref()).find(|s| s.unsubscribe == event)
    }

    /// A subscribe event's argument (`{date, doctorId}`, or none) as the route's equalities.
    /// A field the route does not know is refused (a misspelt filter would otherwise widen
    /// the subscription); `null` means no condition on that field.
    pub fn bind_subscribe(&self, route: usize, argument: Option<&Value>) -> Result<TableBinding, String> {
        let Some(subscribe) = self.get(route).and_then(|r| r.subscribe.as_ref()) else {
            return Err("internal error: no such subscription".into());
        };
        let known = || subscribe.filters.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>().join(", ");
        let fields = match argument {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(fields)) => fields.clone(),
            Some(_) => return Err(format!("{} takes an object of filters ({})", subscribe.event, known())),
        };
        let mut equal = Vec::new();
        for (field, value) in fields {
            let Some((_, column)) = subscribe.filters.iter().find(|(f, _)| *f == field) else {
                return Err(format!(
                    "{} has no filter {} (it has: {})",
                    subscribe.event,
                    crate::text::clip(&field, crate::text::NAME_CHARS),
                    known()
                ));
            };
            let text = match value {
                Value::Null => continue,
                Value::String(text) => text,
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => {
                    return Err(format!(
                        "{} filter {field} takes a string, number or boolean",
                        subscribe.event
                    ))
                }
            };
            equal.push((column.clone(), text));
        }
        Ok(TableBinding { route, equal })
    }

    /// Whether `room` is a subscribe event's name (its channel), which `join` may not take.
    pub fn reserved(&self, room: &str) -> bool {
        self.subscription(room).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(toml_text: &str) -> Result<TableRoutes, String> {
        #[derive(Deserialize)]
        struct File {
            tables: Vec<FileTable>,
        }
        let file: File = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        TableRoutes::compile(file.tables)
    }

    const SEED_000: &str = r#"
        [[tables]]
        table = "appointments"
        event = "appointment:updated"
        key = "appointment"
        rooms = ["appointment:{id}", "provider:{provider_id}", "calendar"]
        subscribe = "subscribe:appointments"
        filters = { date = "date", doctorId = "provider_id" }
    "#;

    #[test]
    fn rooms_match_templates_and_literals() {
        let routes = routes(SEED_000).unwrap();
        let route = routes.get(0).unwrap();
        assert_eq!((route.schema.as_str(), route.table.as_str()), ("public", "appointments"));
        assert_eq!(&*route.event.update, "appointment:updated");
        assert_eq!(
            routes.for_room("appointment:42"),
            [TableBinding { route: 0, equal: vec![("id".into(), "42".into())] }]
        );
        assert_eq!(
            routes.for_room("provider:7"),
            [TableBinding { route: 0, equal: vec![("provider_id".into(), "7".into())] }]
        );
        assert_eq!(routes.for_room("calendar"), [TableBinding { route: 0, equal: vec![] }]);
        assert!(routes.for_room("appointment:").is_empty());
        assert!(routes.for_room("calendars").is_empty());
        assert!(routes.for_room("lobby").is_empty());
    }

    #[test]
    fn subscribe_arguments_become_equalities_and_unknown_fields_are_refused() {
        let routes = routes(SEED_000).unwrap();
        let (route, subscribe) = routes.subscription("subscribe:appointments").unwrap();
        assert_eq!(subscribe.unsubscribe, "unsubscribe:appointments");
        assert!(routes.unsubscription("unsubscribe:appointments").is_some());
        let bound = routes
            .bind_subscribe(route, Some(&serde_json::json!({"date": "2026-02-13", "doctorId": 3})))
            .unwrap();
        assert_eq!(
            bound.equal,
            [("date".to_string(), "2026-02-13".to_string()), ("provider_id".into(), "3".into())]
        );
        assert!(routes.bind_subscribe(route, None).unwrap().equal.is_empty());
        assert!(routes
            .bind_subscribe(route, Some(&serde_json::json!({"doctorId": null})))
            .unwrap()
            .equal
            .is_empty());
        let err = routes.bind_subscribe(route, Some(&serde_json::json!({"doctor": 3}))).unwrap_err();
        assert!(err.contains("has no filter \"doctor\" (it has: date, doctorId)"), "{err}");
        assert!(routes.bind_subscribe(route, Some(&serde_json::json!([1]))).is_err());
        assert!(routes.reserved("subscribe:appointments"));
    }

    #[test]
    fn bad_entries_are_refused_with_the_entry_named() {
        let cases = [
            ("[[tables]]\ntable = \"a\"\nrooms = [\"x\"]\n", "needs `event`"),
            ("[[tables]]\ntable = \"a\"\nevent = \"e\"\n", "needs rooms, a subscribe event"),
            (
                "[[tables]]\ntable = \"a\"\nevent = \"e\"\nrooms = [\"a:{x}:{y}\"]\n",
                "more than one placeholder",
            ),
            (
                "[[tables]]\ntable = \"a\"\nevent = \"e\"\nrooms = [\"a:{claims.sub}\"]\n",
                "must name a column",
            ),
            ("[[tables]]\ntable = \"a\"\nevent = \"e\"\nrooms = [\"a:{x\"]\n", "unclosed"),
            ("[[tables]]\ntable = \"a\"\nevent = \"e\"\nsubscribe = \"join\"\n", "pgcast's own events"),
            (
                "[[tables]]\ntable = \"a\"\nevent = \"e\"\nrooms = [\"r\"]\nfilters = { a = \"b\" }\n",
                "belong to a subscribe",
            ),
            ("[[tables]]\ntable = \"a\"\nevent = \"e\"\nkey = \"operation\"\nrooms = [\"r\"]\n", "key must"),
            ("[[tables]]\ntable = \"a\"\nevnt = \"e\"\n", "unknown field"),
        ];
        for (text, expected) in cases {
            let err = routes(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
        let twice = "[[tables]]\ntable = \"a\"\nevent = \"e\"\nsubscribe = \"s\"\n[[tables]]\ntable = \"b\"\nevent = \"e\"\nsubscribe = \"s\"\n";
        assert!(routes(twice).unwrap_err().starts_with("[1] (table b)"));
    }

    #[test]
    fn per_operation_events_override_the_one_event() {
        let text = "[[tables]]\ntable = \"clinic.queue\"\nevent = \"queue:updated\"\nevents = { insert = \"queue:added\" }\nkey = \"queueItem\"\nrooms = [\"queue:{tenant_id}\"]\n";
        let routes = routes(text).unwrap();
        let event = &routes.get(0).unwrap().event;
        assert_eq!(
            (&*event.insert, &*event.update, &*event.delete),
            ("queue:added", "queue:updated", "queue:updated")
        );
        assert_eq!(routes.get(0).unwrap().schema, "clinic");
    }
}
