//! Turning a join's `postgres_changes` bindings into [`Subscription`]s: validated against the
//! publication, the table's columns and the subscriber's row policy.
//!
//! Every refusal is a reason the client can act on. This module decides nothing about delivery.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::auth::{Claims, SERVICE_ROLE};
use crate::capture::catalog::PublishedTable;
use crate::log::Position;
use crate::rooms::TableBinding;
use crate::router::filter::{EventFilter, Filter};
use crate::router::index::Subscription;
use crate::router::policy::BoundPolicy;
use crate::server::AppState;

use crate::outbound::SessionHandle;

/// PostgreSQL's identifier length (NAMEDATALEN - 1).
const MAX_NAME_BYTES: usize = 63;

/// Subscriptions for every binding, and the join reply's `postgres_changes` (each binding echoed
/// with its server id). All or nothing: the first invalid binding refuses the join.
pub async fn subscribe(
    state: &AppState,
    handle: &Arc<SessionHandle>,
    topic: &Arc<str>,
    bindings: &[Value],
    claims: &Claims,
    min_position: Option<Position>,
) -> Result<(Vec<Arc<Subscription>>, Vec<Value>), String> {
    let mut subscriptions = Vec::with_capacity(bindings.len());
    let mut response = Vec::with_capacity(bindings.len());
    for binding in bindings {
        let mut sub = parse_binding(state, handle, binding, topic, claims).await?;
        sub.min_position = min_position;
        let mut echoed = binding.clone();
        if let Value::Object(map) = &mut echoed {
            map.insert("id".into(), json!(sub.binding_id));
        }
        response.push(echoed);
        subscriptions.push(Arc::new(sub));
    }
    Ok((subscriptions, response))
}

/// Validates one `{event, schema, table, filter}` binding against the publication.
async fn parse_binding(
    state: &AppState,
    handle: &Arc<SessionHandle>,
    binding: &Value,
    topic: &Arc<str>,
    claims: &Claims,
) -> Result<Subscription, String> {
    let field = |name: &str| binding.get(name).and_then(Value::as_str);
    let event_text = field("event").ok_or("each postgres_changes binding needs an event")?;
    let events = EventFilter::parse(event_text)?;
    let schema = field("schema").unwrap_or("public").to_string();
    let table = field("table").filter(|t| !t.is_empty() && *t != "*").map(str::to_string);
    // Names go into replies, log lines and audit rows: longer ones cannot be PostgreSQL names
    // (63 bytes) anyway.
    for (what, name) in [("schema", Some(&schema)), ("table", table.as_ref())] {
        if let Some(name) = name.filter(|n| n.len() > MAX_NAME_BYTES || n.chars().any(char::is_control)) {
            return Err(format!(
                "{what} name {} is not a PostgreSQL name (at most {MAX_NAME_BYTES} bytes, no control characters)",
                crate::text::clip(name, crate::text::NAME_CHARS)
            ));
        }
    }
    let filter_text = field("filter").filter(|f| !f.is_empty());
    if events == EventFilter::Only(crate::capture::ChangeKind::Truncate) && filter_text.is_some() {
        return Err("a TRUNCATE binding takes no filter: a truncation has no row to test".into());
    }
    let catalog = &state.catalog;
    let filters = match &table {
        Some(name) => {
            let published = published_table(state, &schema, name).await?;
            filter_text.map(|f| Filter::parse_all(f, &published)).transpose()?.unwrap_or_default()
        }
        None => {
            if claims.role != SERVICE_ROLE {
                return Err(format!(
                    "role {:?} must name a table to subscribe to postgres_changes",
                    claims.role
                ));
            }
            if filter_text.is_some() {
                return Err("a filter needs a table".into());
            }
            let any = catalog
                .schema_has_tables(&schema)
                .await
                .map_err(|e| format!("cannot check schema {schema}: {e}"))?;
            if !any {
                return Err(format!(
                    "schema {schema} has no tables in publication {:?}",
                    state.config.publication
                ));
            }
            Vec::new()
        }
    };
    let policy = match &table {
        Some(name) => state.policy.bind(&schema, name, claims)?,
        None => None,
    };
    if let (Some(policy), Some(name)) = (&policy, &table) {
        check_rls_role(state, policy, &schema, name).await?;
    }
    if let Some(policy) = &policy {
        for filter in &filters {
            if !policy.can_filter_on(&filter.column) {
                return Err(format!(
                    "filter on column {:?} is not allowed: role {:?} may not see it",
                    filter.column, claims.role
                ));
            }
            if !policy.can_match(filter) {
                return Err(format!(
                    "filter {} can never match a row role {:?} may see",
                    crate::router::filter::shape(filter_text.unwrap_or_default()),
                    claims.role
                ));
            }
        }
    }
    let binding_id =
        binding_id(event_text, &schema, table.as_deref().unwrap_or("*"), filter_text.unwrap_or(""));
    Ok(Subscription {
        id: state.next_subscription_id(),
        session: handle.clone(),
        topic: topic.clone(),
        binding_id,
        schema,
        table,
        events,
        filters: filters.into(),
        policy,
        min_position: None,
        event: None,
    })
}

/// The table's columns, or why it cannot be subscribed to.
async fn published_table(state: &AppState, schema: &str, table: &str) -> Result<Arc<PublishedTable>, String> {
    state
        .catalog
        .published_table(schema, table)
        .await
        .map_err(|e| format!("cannot check table {schema}.{table}: {e}"))?
        .ok_or_else(|| {
            format!(
                "table {schema}.{table} is not in publication {:?}: add it with `pgcast tables add {schema}.{table}`",
                state.config.publication
            )
        })
}

/// The database role a table in row-level security mode checks rows as must exist.
async fn check_rls_role(
    state: &AppState,
    policy: &BoundPolicy,
    schema: &str,
    table: &str,
) -> Result<(), String> {
    let Some(identity) = policy.rls.as_ref() else { return Ok(()) };
    let exists = state
        .db
        .client()
        .await
        .map_err(|e| format!("cannot check role {:?}: {e}", identity.role))?
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&identity.role])
        .await
        .map_err(|e| format!("cannot check role {:?}: {e}", identity.role))?
        .is_some();
    if !exists {
        return Err(format!(
            "table {schema}.{table} uses row-level security, which needs a database role {:?}",
            identity.role
        ));
    }
    Ok(())
}

/// Subscriptions for a Socket.IO room's or subscription's `[[socketio.tables]]` bindings,
/// each bound to the member's row policy. A route whose table the member may not read, or
/// whose equality can never match a row it may see, is skipped: rooms say who is interested,
/// policies say who may see what. A table not published or a value of the wrong type refuses
/// the join.
pub async fn subscribe_tables(
    state: &AppState,
    handle: &Arc<SessionHandle>,
    topic: &Arc<str>,
    bindings: &[TableBinding],
    claims: &Claims,
    min_position: Option<Position>,
) -> Result<Vec<Arc<Subscription>>, String> {
    let mut subscriptions = Vec::with_capacity(bindings.len());
    for binding in bindings {
        let Some(route) = state.config.socketio.tables.get(binding.route) else {
            return Err(format!("internal error: no socketio.tables route {}", binding.route));
        };
        let (schema, table) = (&route.schema, &route.table);
        let published = published_table(state, schema, table).await?;
        let filters = binding
            .equal
            .iter()
            .map(|(column, value)| Filter::equal(column, value, &published))
            .collect::<Result<Box<[Filter]>, String>>()?;
        let policy = match state.policy.bind(schema, table, claims) {
            Ok(policy) => policy,
            Err(reason) => {
                tracing::debug!(session = handle.id, %topic, reason, "room route skipped by policy");
                continue;
            }
        };
        if let Some(policy) = &policy {
            check_rls_role(state, policy, schema, table).await?;
            if !filters.iter().all(|f| policy.can_filter_on(&f.column) && policy.can_match(f)) {
                tracing::debug!(session = handle.id, %topic, "room route can match no row the member may see");
                continue;
            }
        }
        subscriptions.push(Arc::new(Subscription {
            id: state.next_subscription_id(),
            session: handle.clone(),
            topic: topic.clone(),
            binding_id: route.event.binding_id,
            schema: schema.clone(),
            table: Some(table.clone()),
            events: EventFilter::All,
            filters,
            policy,
            min_position,
            event: Some(route.event.clone()),
        }));
    }
    Ok(subscriptions)
}

/// A stable id for a binding's parameters, so identical bindings on different connections share
/// one id (and therefore one serialized message). 31 bits, safe as a JavaScript number.
fn binding_id(event: &str, schema: &str, table: &str, filter: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for part in [event, schema, table, filter] {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= byte as u32;
            hash = hash.wrapping_mul(0x0100_0193);
        }
    }
    // realtime-js treats id 0 as "no id", so never return it.
    (hash & 0x7fff_ffff).max(1)
}
