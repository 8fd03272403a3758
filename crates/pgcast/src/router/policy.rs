//! Row policies and channel authorization, read from the policy file (`PGCAST_POLICY`), compiled
//! once at start-up against the database's tables, and bound to a subscriber's claims at join.
//!
//! A table policy is a list of `allow` rules: which roles, under which conditions over row
//! columns and JWT claims (`patient_id = claims.sub and tenant_id = claims.tenant_id`), receive
//! rows in which shape (`full`, `keys`, or an allow-list of `columns`). Default deny: a table
//! without a policy streams to `service_role` only; a role without a rule gets nothing.
//! Binding substitutes the claims, so evaluating a rule per change is a few typed comparisons,
//! with no lookups; rules with an equality condition also feed the subscription index.
//!
//! Channel rules say which private channel topics (`patient:{claims.sub}`, `tenant:{claims.tenant_id}:*`)
//! a role may read (receive broadcast and presence) and write (send broadcast, track presence).
//!
//! This module does not deliver anything and never touches the database after start-up.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::filter::{Filter, Op};
use crate::auth::{Claims, SERVICE_ROLE};
use crate::capture::catalog::{Catalog, PublishedTable, TableDefinition};
use crate::capture::value::ValueKind;
use crate::capture::{Change, ChangeKind, Relation, Row};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid policy file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("policy for {table}: {message}")]
    Table { table: String, message: String },
    #[error("channel rule {topic:?}: {message}")]
    Channel { topic: String, message: String },
    #[error("checking table {table}: {message}")]
    Catalog { table: String, message: String },
}

// ---- file format ------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    /// Claims policies may name besides `sub` and `role`, with their JSON type.
    #[serde(default)]
    claims: HashMap<String, String>,
    #[serde(default)]
    tables: HashMap<String, TableFile>,
    #[serde(default)]
    channels: ChannelsFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    /// Conditions added to every rule of the table (tenant isolation).
    tenant: Option<String>,
    /// `policy` (default: evaluated in-process) or `rls` (PostgreSQL decides).
    mode: Option<String>,
    #[serde(default)]
    allow: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    role: Option<String>,
    roles: Option<Vec<String>>,
    when: Option<String>,
    /// `full` (default), `keys` or `columns`.
    shape: Option<String>,
    columns: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelsFile {
    /// Whether channels joined without `config.private` are open to any valid token (as in
    /// Supabase). Default true.
    public: Option<bool>,
    #[serde(default)]
    allow: Vec<ChannelRuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelRuleFile {
    topic: String,
    role: Option<String>,
    roles: Option<Vec<String>>,
    #[serde(default)]
    read: bool,
    #[serde(default)]
    write: bool,
}

// ---- compiled policy --------------------------------------------------------------------------

/// How a table's visibility is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Rules in the policy file, evaluated in-process.
    Policy,
    /// PostgreSQL row-level security, asked per change with the subscribers' claims.
    Rls,
}

/// What of a row a subscriber receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    Full,
    /// Primary key, event type and the names of changed columns.
    Keys,
    /// Only these columns (the primary key is always included).
    Columns(Vec<String>),
}

/// A shape with a process-wide id, so payloads are serialized once per distinct shape.
#[derive(Debug, PartialEq)]
pub struct ShapeSpec {
    pub id: u32,
    pub shape: Shape,
    pub primary_key: Arc<[String]>,
}

/// Shape id 0 is the full row without a policy (service role).
pub const FULL_SHAPE_ID: u32 = 0;
/// Shape id 1 is "this row left your view": primary key only.
pub const LEFT_VIEW_SHAPE_ID: u32 = 1;

#[derive(Debug, Clone)]
enum Operand {
    Claim(String),
    Literal(String),
}

#[derive(Debug, Clone)]
struct Condition {
    column: String,
    kind: ValueKind,
    op: Op,
    operand: Operand,
}

#[derive(Debug)]
struct Rule {
    roles: Vec<String>,
    conditions: Vec<Condition>,
    shape: Arc<ShapeSpec>,
}

#[derive(Debug)]
pub struct TablePolicy {
    pub mode: Mode,
    rls_delete_shape: Option<Arc<ShapeSpec>>,
    pub primary_key: Arc<[String]>,
    pub replica_identity_full: bool,
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct ChannelRule {
    /// Topic pattern, `{claims.x}` placeholders, optional trailing `*`.
    topic: String,
    roles: Vec<String>,
    read: bool,
    write: bool,
}

/// The compiled policy file.
#[derive(Debug, Default)]
pub struct Policy {
    tables: HashMap<(String, String), TablePolicy>,
    channel_rules: Vec<ChannelRule>,
    public_channels: bool,
    declared_claims: Vec<String>,
}

/// A rule bound to one subscriber's claims: conditions are plain filters now.
#[derive(Debug)]
pub struct BoundRule {
    conditions: Vec<Filter>,
    pub shape: Arc<ShapeSpec>,
}

/// What a subscription may see of a table.
#[derive(Debug)]
pub struct BoundPolicy {
    pub mode: Mode,
    pub rules: Vec<BoundRule>,
    pub primary_key: Arc<[String]>,
    /// In RLS mode: the database role and claims PostgreSQL checks visibility with.
    pub rls: Option<Arc<RlsIdentity>>,
    /// In RLS mode: the primary-key-only shape DELETEs are sent in (the row is gone, so
    /// PostgreSQL cannot be asked about it).
    rls_delete_shape: Option<Arc<ShapeSpec>>,
}

/// Who PostgreSQL checks row-level security for: `SET ROLE role` and `request.jwt.claims`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct RlsIdentity {
    pub role: String,
    pub claims: String,
}

/// What one change means for one subscriber.
#[derive(Debug, Clone)]
pub enum Visibility {
    /// Send the change in this shape (`None`: full row, no policy).
    Visible(Option<Arc<ShapeSpec>>),
    /// The row was visible before this UPDATE and is not any more: send its primary key only.
    LeftView(Arc<[String]>),
    /// RLS mode: visible in this shape if PostgreSQL's row-level security lets `identity` select
    /// the row.
    NeedsRls(Arc<ShapeSpec>, Arc<RlsIdentity>),
    Hidden,
}

impl Policy {
    /// No file: default deny (only `service_role` receives changes), public channels open.
    pub fn deny_all() -> Policy {
        Policy { public_channels: true, ..Policy::default() }
    }

    /// Reads and compiles the policy file against the database's tables.
    pub async fn load(path: &Path, catalog: &Catalog) -> Result<Policy, PolicyError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| PolicyError::Read { path: display.clone(), source })?;
        Policy::compile(&text, &display, catalog).await
    }

    pub async fn compile(text: &str, origin: &str, catalog: &Catalog) -> Result<Policy, PolicyError> {
        let file: PolicyFile = toml::from_str(text)
            .map_err(|e| PolicyError::Parse { path: origin.to_string(), message: e.message().to_string() })?;
        let mut declared_claims = vec!["sub".to_string(), "role".to_string()];
        for (claim, kind) in &file.claims {
            if !["text", "integer", "number", "boolean", "array"].contains(&kind.as_str()) {
                return Err(PolicyError::Parse {
                    path: origin.to_string(),
                    message: format!(
                        "claim {claim:?} has unknown type {kind:?} (text, integer, number, boolean, array)"
                    ),
                });
            }
            declared_claims.push(claim.clone());
        }
        let mut tables = HashMap::new();
        let mut next_shape_id = LEFT_VIEW_SHAPE_ID + 1;
        let mut names: Vec<&String> = file.tables.keys().collect();
        names.sort();
        for name in names {
            let table_file = &file.tables[name];
            let (schema, table) = match name.split_once('.') {
                Some((s, t)) => (s.to_string(), t.to_string()),
                None => ("public".to_string(), name.clone()),
            };
            let qualified = format!("{schema}.{table}");
            let definition = catalog
                .table_definition(&schema, &table)
                .await
                .map_err(|e| PolicyError::Catalog { table: qualified.clone(), message: e.to_string() })?
                .ok_or_else(|| PolicyError::Table {
                    table: qualified.clone(),
                    message: "no such table".into(),
                })?;
            let policy =
                compile_table(&qualified, table_file, definition, &declared_claims, &mut next_shape_id)?;
            tables.insert((schema, table), policy);
        }
        let mut channel_rules = Vec::new();
        for rule in file.channels.allow {
            let roles = roles_of(rule.role, rule.roles)
                .map_err(|message| PolicyError::Channel { topic: rule.topic.clone(), message })?;
            for placeholder in placeholders(&rule.topic) {
                if !declared_claims.contains(&placeholder) {
                    return Err(PolicyError::Channel {
                        topic: rule.topic.clone(),
                        message: format!("names claim {placeholder:?}, which is not declared in [claims]"),
                    });
                }
            }
            if !rule.read && !rule.write {
                return Err(PolicyError::Channel {
                    topic: rule.topic,
                    message: "allows neither read nor write".into(),
                });
            }
            channel_rules.push(ChannelRule { topic: rule.topic, roles, read: rule.read, write: rule.write });
        }
        Ok(Policy {
            tables,
            channel_rules,
            public_channels: file.channels.public.unwrap_or(true),
            declared_claims,
        })
    }

    /// Tables with a policy, for start-up checks.
    pub fn tables(&self) -> impl Iterator<Item = (&(String, String), &TablePolicy)> {
        self.tables.iter()
    }

    pub fn table(&self, schema: &str, name: &str) -> Option<&TablePolicy> {
        self.tables.get(&(schema.to_string(), name.to_string()))
    }

    /// What a subscriber with `claims` may see of a table: `Ok(None)` for the service role (all
    /// rows, full), an error naming why not.
    pub fn bind(&self, schema: &str, table: &str, claims: &Claims) -> Result<Option<BoundPolicy>, String> {
        if claims.role == SERVICE_ROLE {
            return Ok(None);
        }
        let Some(policy) = self.tables.get(&(schema.to_string(), table.to_string())) else {
            return Err(format!(
                "role {:?} may not receive changes of {schema}.{table}: no policy allows it (only {SERVICE_ROLE} can)",
                claims.role
            ));
        };
        let mut rules = Vec::new();
        for rule in policy.rules.iter().filter(|r| r.roles.contains(&claims.role)) {
            let mut conditions = Vec::with_capacity(rule.conditions.len());
            for condition in &rule.conditions {
                conditions.push(bind_condition(condition, claims)?);
            }
            rules.push(BoundRule { conditions, shape: rule.shape.clone() });
        }
        if rules.is_empty() {
            return Err(format!(
                "role {:?} may not receive changes of {schema}.{table}: no rule in the policy allows it",
                claims.role
            ));
        }
        let (rls, rls_delete_shape) = match policy.mode {
            Mode::Policy => (None, None),
            Mode::Rls => {
                let claims_json = serde_json::Value::Object(claims.all.clone()).to_string();
                let identity = RlsIdentity { role: claims.role.clone(), claims: claims_json };
                (Some(Arc::new(identity)), policy.rls_delete_shape.clone())
            }
        };
        Ok(Some(BoundPolicy {
            mode: policy.mode,
            rules,
            primary_key: policy.primary_key.clone(),
            rls,
            rls_delete_shape,
        }))
    }

    /// Whether `claims` may join `topic` (`realtime:` prefix removed) as private, and with which
    /// rights. Public channels are open to any valid token unless the file says otherwise.
    pub fn channel_access(&self, sub_topic: &str, private: bool, claims: &Claims) -> ChannelAccess {
        if claims.role == SERVICE_ROLE {
            return ChannelAccess { read: true, write: true };
        }
        if !private {
            return if self.public_channels {
                ChannelAccess { read: true, write: true }
            } else {
                ChannelAccess { read: false, write: false }
            };
        }
        let mut access = ChannelAccess { read: false, write: false };
        for rule in self.channel_rules.iter().filter(|r| r.roles.contains(&claims.role)) {
            if topic_matches(&rule.topic, sub_topic, claims) {
                access.read |= rule.read;
                access.write |= rule.write;
            }
        }
        access
    }

    /// Whether some channel rule's topic pattern could match `sub_topic` for some claims: a
    /// Socket.IO room such a rule names is decided by the rules (as a private channel is),
    /// any other room is public. A `{claims.…}` placeholder stands for one or more characters
    /// without `:` or `*`, as in [`topic_matches`].
    pub fn governs(&self, sub_topic: &str) -> bool {
        self.channel_rules.iter().any(|rule| pattern_could_match(&rule.topic, sub_topic))
    }

    pub fn public_channels(&self) -> bool {
        self.public_channels
    }

    pub fn declared_claims(&self) -> &[String] {
        &self.declared_claims
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelAccess {
    pub read: bool,
    pub write: bool,
}

impl ChannelAccess {
    /// Whether a member may stay on the channel; one that receives postgres_changes needs read.
    pub fn admits(&self, receives_changes: bool) -> bool {
        if receives_changes {
            self.read
        } else {
            self.read || self.write
        }
    }
}

fn roles_of(role: Option<String>, roles: Option<Vec<String>>) -> Result<Vec<String>, String> {
    let mut all: Vec<String> = roles.unwrap_or_default();
    all.extend(role);
    if all.is_empty() {
        return Err("names no role (set role = \"...\" or roles = [...])".into());
    }
    Ok(all)
}

fn compile_table(
    qualified: &str,
    file: &TableFile,
    definition: TableDefinition,
    declared_claims: &[String],
    next_shape_id: &mut u32,
) -> Result<TablePolicy, PolicyError> {
    let err = |message: String| PolicyError::Table { table: qualified.to_string(), message };
    let mode = match file.mode.as_deref() {
        None | Some("policy") => Mode::Policy,
        Some("rls") => Mode::Rls,
        Some(other) => return Err(err(format!("unknown mode {other:?} (policy or rls)"))),
    };
    if definition.primary_key.is_empty() {
        return Err(err("has no primary key; policies need one to name rows".into()));
    }
    let primary_key: Arc<[String]> = definition.primary_key.clone().into();
    let tenant = match &file.tenant {
        Some(text) => parse_conditions(text, &definition.table, declared_claims).map_err(err)?,
        None => Vec::new(),
    };
    if file.allow.is_empty() {
        return Err(err("has no [[allow]] rules; remove the table to stream it to service_role only".into()));
    }
    let mut rules = Vec::new();
    for rule in &file.allow {
        let roles = roles_of(rule.role.clone(), rule.roles.clone()).map_err(err)?;
        let mut conditions = tenant.clone();
        if let Some(when) = &rule.when {
            conditions.extend(parse_conditions(when, &definition.table, declared_claims).map_err(err)?);
        }
        let shape = match (rule.shape.as_deref(), &rule.columns) {
            (None | Some("full"), None) => Shape::Full,
            (Some("keys"), None) => Shape::Keys,
            (None | Some("columns"), Some(columns)) => {
                for column in columns {
                    if definition.table.column(column).is_none() {
                        return Err(err(format!("columns names unknown column {column:?}")));
                    }
                }
                Shape::Columns(columns.clone())
            }
            (Some(shape @ ("full" | "keys")), Some(_)) => {
                return Err(err(format!("shape {shape:?} does not take a columns list")))
            }
            (Some(other), _) => return Err(err(format!("unknown shape {other:?} (full, keys or columns)"))),
        };
        if mode == Mode::Rls && (rule.when.is_some() || file.tenant.is_some()) {
            return Err(err(
                "mode = \"rls\" takes no `when` or `tenant`: PostgreSQL's policies decide".into()
            ));
        }
        let spec = Arc::new(ShapeSpec { id: *next_shape_id, shape, primary_key: primary_key.clone() });
        *next_shape_id += 1;
        rules.push(Rule { roles, conditions, shape: spec });
    }
    let rls_delete_shape = (mode == Mode::Rls).then(|| {
        let spec = ShapeSpec { id: *next_shape_id, shape: Shape::Keys, primary_key: primary_key.clone() };
        *next_shape_id += 1;
        Arc::new(spec)
    });
    Ok(TablePolicy {
        mode,
        rls_delete_shape,
        primary_key,
        replica_identity_full: definition.replica_identity_full,
        rules,
    })
}

/// Parses `col = claims.sub and col2 in claims.ids and status != 'cancelled'`.
fn parse_conditions(
    text: &str,
    table: &PublishedTable,
    declared_claims: &[String],
) -> Result<Vec<Condition>, String> {
    let mut conditions = Vec::new();
    for part in split_and(text) {
        let part = part.trim();
        let (column, op, rhs) = split_condition(part).ok_or_else(|| {
            format!(
                "cannot read condition {part:?}: expected `column = claims.name` or `column <op> 'value'`"
            )
        })?;
        let col = table
            .column(column)
            .ok_or_else(|| format!("condition {part:?} names unknown column {column:?}"))?;
        if !col.kind.is_filterable() {
            return Err(format!(
                "condition {part:?}: column {column:?} ({}) cannot be compared",
                col.type_name
            ));
        }
        let operand = if let Some(claim) = rhs.strip_prefix("claims.") {
            if !declared_claims.iter().any(|c| c == claim) {
                return Err(format!(
                    "condition {part:?} names claim {claim:?}, which is not declared in [claims]"
                ));
            }
            Operand::Claim(claim.to_string())
        } else {
            let literal = rhs.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')).unwrap_or(rhs);
            if op == Op::In {
                return Err(format!("condition {part:?}: `in` takes a claim holding a list"));
            }
            if col.kind.parse_scalar(literal).is_none() {
                return Err(format!("condition {part:?}: {literal:?} is not a valid {}", col.type_name));
            }
            Operand::Literal(literal.to_string())
        };
        conditions.push(Condition { column: column.to_string(), kind: col.kind.clone(), op, operand });
    }
    Ok(conditions)
}

fn split_and(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = text;
    loop {
        let lower = rest.to_ascii_lowercase();
        match lower.find(" and ") {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + 5..];
            }
            None => {
                parts.push(rest);
                return parts;
            }
        }
    }
}

fn split_condition(part: &str) -> Option<(&str, Op, &str)> {
    if let Some(i) = part.to_ascii_lowercase().find(" in ") {
        return Some((part[..i].trim(), Op::In, part[i + 4..].trim()));
    }
    for (token, op) in
        [("!=", Op::Neq), ("<=", Op::Lte), (">=", Op::Gte), ("=", Op::Eq), ("<", Op::Lt), (">", Op::Gt)]
    {
        if let Some(i) = part.find(token) {
            let (column, rhs) = (part[..i].trim(), part[i + token.len()..].trim());
            if column.is_empty() || rhs.is_empty() || column.contains(' ') {
                return None;
            }
            return Some((column, op, rhs));
        }
    }
    None
}

/// Claim value as text(s) for a typed comparison.
fn claim_texts(claims: &Claims, name: &str) -> Option<Vec<String>> {
    let value = match name {
        "role" => return Some(vec![claims.role.clone()]),
        "sub" => return claims.sub.clone().map(|s| vec![s]),
        other => claims.all.get(other)?,
    };
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    match value {
        Value::Array(items) => items.iter().map(scalar).collect(),
        other => scalar(other).map(|s| vec![s]),
    }
}

fn bind_condition(condition: &Condition, claims: &Claims) -> Result<Filter, String> {
    let texts = match &condition.operand {
        Operand::Literal(text) => vec![text.clone()],
        Operand::Claim(name) => claim_texts(claims, name)
            .ok_or_else(|| format!("token lacks claim {name:?}, which the policy needs"))?,
    };
    let operands = texts
        .iter()
        .map(|t| {
            condition.kind.parse_scalar(t).ok_or_else(|| {
                format!("token claim value {t:?} cannot be compared with column {:?}", condition.column)
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if condition.op != Op::In && operands.len() != 1 {
        return Err(format!("token claim for column {:?} must be a single value", condition.column));
    }
    Ok(Filter {
        column: condition.column.clone(),
        op: condition.op,
        negated: false,
        kind: condition.kind.clone(),
        operands,
    })
}

fn placeholders(pattern: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = pattern;
    while let Some(start) = rest.find("{claims.") {
        let Some(end) = rest[start..].find('}') else { break };
        out.push(rest[start + 8..start + end].to_string());
        rest = &rest[start + end + 1..];
    }
    out
}

/// `patient:{claims.sub}` against `patient:7` for sub 7; a trailing `*` matches any rest.
fn pattern_could_match(pattern: &str, topic: &str) -> bool {
    match pattern.find("{claims.") {
        None => match pattern.strip_suffix('*') {
            Some(prefix) => topic.starts_with(prefix),
            None => topic == pattern,
        },
        Some(start) => {
            let Some(end) = pattern[start..].find('}') else { return false };
            let (literal, rest) = (&pattern[..start], &pattern[start + end + 1..]);
            let Some(after) = topic.strip_prefix(literal) else { return false };
            // The placeholder takes 1..n characters of `after` that are not ':' or '*'.
            let run = after.find([':', '*']).unwrap_or(after.len());
            (1..=run).filter(|n| after.is_char_boundary(*n)).any(|n| pattern_could_match(rest, &after[n..]))
        }
    }
}

fn topic_matches(pattern: &str, topic: &str, claims: &Claims) -> bool {
    let mut expanded = String::with_capacity(pattern.len());
    let mut rest = pattern;
    while let Some(start) = rest.find("{claims.") {
        let Some(end) = rest[start..].find('}') else { return false };
        expanded.push_str(&rest[..start]);
        let name = &rest[start + 8..start + end];
        match claim_texts(claims, name) {
            // A claim value containing `:` or `*` could widen the match; refuse it.
            Some(values) if values.len() == 1 && !values[0].contains([':', '*']) => {
                expanded.push_str(&values[0])
            }
            _ => return false,
        }
        rest = &rest[start + end + 1..];
    }
    expanded.push_str(rest);
    match expanded.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => topic == expanded,
    }
}

impl BoundPolicy {
    /// Whether some rule admits the row; returns that rule's shape.
    fn admit(&self, relation: &Relation, row: &Row) -> Option<&Arc<ShapeSpec>> {
        self.rules
            .iter()
            .find(|rule| rule.conditions.iter().all(|c| c.matches(relation, row)))
            .map(|r| &r.shape)
    }

    /// Visibility of a change for a subscriber whose own filter is `filter`.
    pub fn visibility(&self, change: &Change, filters: &[Filter]) -> Visibility {
        let relation = &change.relation;
        let passes_filter = |row: &Row| filters.iter().all(|f| f.matches(relation, row));
        if let (Some(identity), Some(delete_shape)) = (&self.rls, &self.rls_delete_shape) {
            // RLS mode: the filter narrows, PostgreSQL decides. A deleted row cannot be
            // checked any more, so DELETEs go out with the primary key only.
            let (row, shape) = match change.kind {
                ChangeKind::Insert | ChangeKind::Update => (change.new.as_ref(), &self.rules[0].shape),
                ChangeKind::Delete => (change.old.as_ref(), delete_shape),
                ChangeKind::Truncate => (None, delete_shape),
            };
            return match row {
                Some(row) if passes_filter(row) && change.kind == ChangeKind::Delete => {
                    Visibility::Visible(Some(shape.clone()))
                }
                Some(row) if passes_filter(row) => Visibility::NeedsRls(shape.clone(), identity.clone()),
                _ => Visibility::Hidden,
            };
        }
        match change.kind {
            ChangeKind::Insert => match change.new.as_ref() {
                Some(new) if passes_filter(new) => match self.admit(relation, new) {
                    Some(shape) => Visibility::Visible(Some(shape.clone())),
                    None => Visibility::Hidden,
                },
                _ => Visibility::Hidden,
            },
            ChangeKind::Update => {
                let Some(new) = change.new.as_ref() else { return Visibility::Hidden };
                let now = self.admit(relation, new);
                if let (Some(shape), true) = (now, passes_filter(new)) {
                    return Visibility::Visible(Some(shape.clone()));
                }
                // Not visible now: if it was visible before (needs the old row, i.e. REPLICA
                // IDENTITY FULL), and the policy is what hides it, tell the subscriber it left.
                match change.old.as_ref() {
                    Some(old)
                        if now.is_none() && passes_filter(old) && self.admit(relation, old).is_some() =>
                    {
                        Visibility::LeftView(self.primary_key.clone())
                    }
                    _ => Visibility::Hidden,
                }
            }
            ChangeKind::Delete => match change.old.as_ref() {
                Some(old) if passes_filter(old) => match self.admit(relation, old) {
                    Some(shape) => Visibility::Visible(Some(shape.clone())),
                    None => Visibility::Hidden,
                },
                _ => Visibility::Hidden,
            },
            // A truncation has no rows to check: only the service role receives it.
            ChangeKind::Truncate => Visibility::Hidden,
        }
    }

    /// Columns this subscriber may filter on: those visible under every one of its rules.
    pub fn can_filter_on(&self, column: &str) -> bool {
        self.rules.iter().all(|rule| match &rule.shape.shape {
            Shape::Full => true,
            Shape::Keys => rule.shape.primary_key.iter().any(|k| k == column),
            Shape::Columns(columns) => {
                columns.iter().any(|c| c == column) || rule.shape.primary_key.iter().any(|k| k == column)
            }
        })
    }

    /// Whether a filter can ever pass together with the policy: `false` when every rule pins
    /// the filtered column (`col = value`) to a value the filter rejects.
    pub fn can_match(&self, filter: &Filter) -> bool {
        self.rules.iter().any(|rule| {
            let pinned =
                rule.conditions.iter().find(|c| c.column == filter.column && c.op == Op::Eq && !c.negated);
            match pinned.and_then(|c| c.operands.first()) {
                Some(value) => filter.accepts_scalar(value),
                None => true,
            }
        })
    }

    /// The equality condition to index the subscription by, when there is exactly one rule and
    /// it pins a column. The rule's own conditions come after the table's tenant conditions and
    /// are the more selective (one patient rather than a whole clinic), so the last one wins.
    pub fn index_condition(&self) -> Option<&Filter> {
        match self.rules.as_slice() {
            [rule] => rule.conditions.iter().rev().find(|c| c.eq_key().is_some()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::catalog::TableColumn;

    fn claims(role: &str, sub: &str, extra: Value) -> Claims {
        let mut all = serde_json::Map::new();
        if let Value::Object(map) = extra {
            all = map;
        }
        Claims { role: role.into(), sub: Some(sub.into()), exp: u64::MAX, all }
    }

    fn table() -> PublishedTable {
        let col = |name: &str, kind| TableColumn { name: name.into(), type_name: "int4".into(), kind };
        PublishedTable {
            schema: "public".into(),
            name: "appointments".into(),
            columns: vec![
                col("id", ValueKind::Integer),
                col("patient_id", ValueKind::Integer),
                col("tenant_id", ValueKind::Integer),
            ],
        }
    }

    #[test]
    fn a_rule_governs_every_room_its_pattern_could_match() {
        assert!(pattern_could_match("patient:{claims.sub}", "patient:42"));
        assert!(pattern_could_match("patient:{claims.sub}", "patient:someone-else"));
        assert!(!pattern_could_match("patient:{claims.sub}", "patient:"));
        assert!(!pattern_could_match("patient:{claims.sub}", "patient:4:2"), "a claim holds no ':'");
        assert!(pattern_could_match("ward:*", "ward:3"));
        assert!(pattern_could_match("t:{claims.tenant_id}:queue", "t:7:queue"));
        assert!(!pattern_could_match("t:{claims.tenant_id}:queue", "t:7:visits"));
        assert!(pattern_could_match("calendar", "calendar"));
        assert!(!pattern_could_match("calendar", "calendars"));
        assert!(!pattern_could_match("broken:{claims.sub", "broken:1"));
    }

    #[test]
    fn conditions_parse_and_unknown_names_are_rejected() {
        let declared = vec!["sub".to_string(), "role".to_string(), "tenant_id".to_string()];
        let parsed =
            parse_conditions("patient_id = claims.sub AND tenant_id = claims.tenant_id", &table(), &declared)
                .unwrap();
        assert_eq!(parsed.len(), 2);
        let err = parse_conditions("nope = claims.sub", &table(), &declared).unwrap_err();
        assert!(err.contains("unknown column"), "{err}");
        let err = parse_conditions("patient_id = claims.clinic", &table(), &declared).unwrap_err();
        assert!(err.contains("not declared"), "{err}");
        let err = parse_conditions("patient_id ~ 3", &table(), &declared).unwrap_err();
        assert!(err.contains("cannot read condition"), "{err}");
        let err = parse_conditions("patient_id = 'x'", &table(), &declared).unwrap_err();
        assert!(err.contains("not a valid int4"), "{err}");
    }

    #[test]
    fn claims_bind_into_typed_filters() {
        let declared = vec!["sub".to_string(), "role".to_string(), "clinics".to_string()];
        let conds = parse_conditions("tenant_id in claims.clinics", &table(), &declared).unwrap();
        let bound =
            bind_condition(&conds[0], &claims("provider", "9", serde_json::json!({"clinics": [1, 2]})))
                .unwrap();
        assert_eq!(bound.operands.len(), 2);
        let err = bind_condition(&conds[0], &claims("provider", "9", serde_json::json!({}))).unwrap_err();
        assert!(err.contains("lacks claim"), "{err}");
    }

    #[test]
    fn topic_patterns_expand_claims_and_refuse_widening_values() {
        let c = claims("patient", "7", serde_json::json!({"tenant_id": 3}));
        assert!(topic_matches("patient:{claims.sub}", "patient:7", &c));
        assert!(!topic_matches("patient:{claims.sub}", "patient:8", &c));
        assert!(topic_matches("tenant:{claims.tenant_id}:*", "tenant:3:room", &c));
        assert!(!topic_matches("tenant:{claims.tenant_id}:*", "tenant:33:room", &c));
        let sneaky = claims("patient", "*", serde_json::json!({}));
        assert!(!topic_matches("patient:{claims.sub}", "patient:*", &sneaky));
    }
}
