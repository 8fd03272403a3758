//! What the database says about types and published tables: the type catalog used to render
//! values, and the columns of each table in the publication, used to validate subscriptions.
//!
//! Lookups are cached briefly; a miss always asks PostgreSQL again so a table added with
//! `ALTER PUBLICATION ... ADD TABLE` is usable at once. This module never streams changes.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::value::ValueKind;
use crate::db::{Db, DbError};

/// How long a positive table lookup is reused before asking PostgreSQL again.
const TABLE_CACHE_TTL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct TypeInfo {
    pub name: String,
    pub kind: ValueKind,
}

/// Every type in `pg_type`, by oid.
#[derive(Debug, Default)]
pub struct TypeCatalog {
    types: HashMap<u32, TypeInfo>,
}

struct PgTypeRow {
    oid: u32,
    name: String,
    category: u8,
    element: u32,
    base: u32,
}

impl TypeCatalog {
    pub fn get(&self, oid: u32) -> Option<&TypeInfo> {
        self.types.get(&oid)
    }

    /// The built-in types pgcast renders specially, for tests that run without a database.
    pub fn builtin() -> TypeCatalog {
        let rows = [
            (16, "bool", b'B', 0),
            (20, "int8", b'N', 0),
            (21, "int2", b'N', 0),
            (23, "int4", b'N', 0),
            (25, "text", b'S', 0),
            (114, "json", b'U', 0),
            (700, "float4", b'N', 0),
            (701, "float8", b'N', 0),
            (1007, "_int4", b'A', 23),
            (1009, "_text", b'A', 25),
            (1043, "varchar", b'S', 0),
            (1082, "date", b'D', 0),
            (1114, "timestamp", b'D', 0),
            (1184, "timestamptz", b'D', 0),
            (1700, "numeric", b'N', 0),
            (2950, "uuid", b'U', 0),
            (3802, "jsonb", b'U', 0),
        ];
        let rows = rows
            .iter()
            .map(|&(oid, name, category, element)| PgTypeRow {
                oid,
                name: name.to_string(),
                category,
                element,
                base: 0,
            })
            .collect();
        TypeCatalog::from_rows(rows)
    }

    fn from_rows(rows: Vec<PgTypeRow>) -> TypeCatalog {
        let by_oid: HashMap<u32, &PgTypeRow> = rows.iter().map(|r| (r.oid, r)).collect();
        let types = rows
            .iter()
            .map(|row| (row.oid, TypeInfo { name: row.name.clone(), kind: kind_of(row.oid, &by_oid, 0) }))
            .collect();
        TypeCatalog { types }
    }
}

/// Rendering kind of a type: by oid for the built-ins whose JSON form differs from a string,
/// element-wise for arrays, the base type's for domains.
fn kind_of(oid: u32, by_oid: &HashMap<u32, &PgTypeRow>, depth: u8) -> ValueKind {
    match oid {
        20 | 21 | 23 | 26 => return ValueKind::Integer,
        700 | 701 => return ValueKind::Float,
        1700 => return ValueKind::Numeric,
        16 => return ValueKind::Bool,
        114 | 3802 => return ValueKind::Json,
        1184 => return ValueKind::TimestampTz,
        1114 => return ValueKind::Timestamp,
        2950 => return ValueKind::Uuid,
        _ => {}
    }
    let Some(row) = by_oid.get(&oid) else { return ValueKind::Text };
    if depth > 8 {
        return ValueKind::Text;
    }
    if row.base != 0 {
        return kind_of(row.base, by_oid, depth + 1);
    }
    if row.category == b'A' && row.element != 0 {
        return ValueKind::Array(Box::new(kind_of(row.element, by_oid, depth + 1)));
    }
    ValueKind::Text
}

/// A table in the publication and its columns, as a subscription sees it.
#[derive(Debug)]
pub struct PublishedTable {
    pub schema: String,
    pub name: String,
    pub columns: Vec<TableColumn>,
}

#[derive(Debug)]
pub struct TableColumn {
    pub name: String,
    pub type_name: String,
    pub kind: ValueKind,
}

impl PublishedTable {
    pub fn column(&self, name: &str) -> Option<&TableColumn> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// (schema, table) -> when it was looked up, and what was found.
type TableCache = HashMap<(String, String), (Instant, Arc<PublishedTable>)>;

/// A table's definition as policies need it.
#[derive(Debug)]
pub struct TableDefinition {
    pub table: PublishedTable,
    pub primary_key: Vec<String>,
    pub replica_identity_full: bool,
}

pub struct Catalog {
    db: Arc<Db>,
    publication: String,
    /// Tables are captured by the `pgcast_capture` trigger instead of the publication.
    trigger_mode: bool,
    types: RwLock<Arc<TypeCatalog>>,
    tables: RwLock<TableCache>,
}

impl Catalog {
    pub fn new(db: Arc<Db>, publication: &str, trigger_mode: bool) -> Catalog {
        Catalog {
            db,
            publication: publication.to_string(),
            trigger_mode,
            types: RwLock::new(Arc::new(TypeCatalog::default())),
            tables: RwLock::new(HashMap::new()),
        }
    }

    /// The type catalog as last loaded.
    pub fn types(&self) -> Arc<TypeCatalog> {
        match self.types.read() {
            Ok(types) => types.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reloads every type from `pg_type` (at start-up and when a change names an unknown type).
    pub async fn reload_types(&self) -> Result<Arc<TypeCatalog>, DbError> {
        let client = self.db.client().await?;
        let rows = client
            .query(
                "SELECT oid::int8, typname::text, typcategory::text, typelem::int8, \
                 typbasetype::int8 FROM pg_type",
                &[],
            )
            .await?;
        let rows = rows
            .iter()
            .map(|row| PgTypeRow {
                oid: row.get::<_, i64>(0) as u32,
                name: row.get(1),
                category: row.get::<_, String>(2).bytes().next().unwrap_or(b'X'),
                element: row.get::<_, i64>(3) as u32,
                base: row.get::<_, i64>(4) as u32,
            })
            .collect();
        let catalog = Arc::new(TypeCatalog::from_rows(rows));
        match self.types.write() {
            Ok(mut types) => *types = catalog.clone(),
            Err(poisoned) => *poisoned.into_inner() = catalog.clone(),
        }
        Ok(catalog)
    }

    /// Name and rendering kind of a column type, reloading the catalog once for a type created
    /// after start-up; an unknown type renders as text.
    async fn resolve_type(
        &self,
        types: &mut Arc<TypeCatalog>,
        oid: u32,
    ) -> Result<(String, ValueKind), DbError> {
        if types.get(oid).is_none() {
            *types = self.reload_types().await?;
        }
        Ok(match types.get(oid) {
            Some(info) => (info.name.clone(), info.kind.clone()),
            None => (oid.to_string(), ValueKind::Text),
        })
    }

    /// The table if it is captured (in the publication, or with the capture trigger in trigger
    /// mode), with its columns; `None` if it is not.
    pub async fn published_table(
        &self,
        schema: &str,
        name: &str,
    ) -> Result<Option<Arc<PublishedTable>>, DbError> {
        let key = (schema.to_string(), name.to_string());
        if let Ok(tables) = self.tables.read() {
            if let Some((at, table)) = tables.get(&key) {
                if at.elapsed() < TABLE_CACHE_TTL {
                    return Ok(Some(table.clone()));
                }
            }
        }
        let client = self.db.client().await?;
        let rows = if self.trigger_mode {
            client
                .query(
                    "SELECT a.attname::text, a.atttypid::int8 FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     JOIN pg_trigger t ON t.tgrelid = c.oid AND t.tgname = 'pgcast_capture' \
                     JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                     WHERE n.nspname = $1 AND c.relname = $2 ORDER BY a.attnum",
                    &[&schema, &name],
                )
                .await?
        } else {
            client
                .query(
                    "SELECT a.attname::text, a.atttypid::int8 \
                     FROM pg_publication_tables p \
                     JOIN pg_namespace n ON n.nspname = p.schemaname \
                     JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
                     JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                     WHERE p.pubname = $1 AND p.schemaname = $2 AND p.tablename = $3 \
                     ORDER BY a.attnum",
                    &[&self.publication, &schema, &name],
                )
                .await?
        };
        if rows.is_empty() {
            return Ok(None);
        }
        let mut types = self.types();
        let mut columns = Vec::with_capacity(rows.len());
        for row in &rows {
            let (type_name, kind) = self.resolve_type(&mut types, row.get::<_, i64>(1) as u32).await?;
            columns.push(TableColumn { name: row.get(0), type_name, kind });
        }
        let table = Arc::new(PublishedTable { schema: key.0.clone(), name: key.1.clone(), columns });
        if let Ok(mut tables) = self.tables.write() {
            tables.insert(key, (Instant::now(), table.clone()));
        }
        Ok(Some(table))
    }

    /// Any table's columns, primary key and replica identity, published or not (for compiling
    /// policies at start-up). `None` if the table does not exist.
    pub async fn table_definition(
        &self,
        schema: &str,
        name: &str,
    ) -> Result<Option<TableDefinition>, DbError> {
        let client = self.db.client().await?;
        let Some(table) = client
            .query_opt(
                "SELECT c.oid::int8, c.relreplident::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&schema, &name],
            )
            .await?
        else {
            return Ok(None);
        };
        let oid: i64 = table.get(0);
        let replica_identity: String = table.get(1);
        let rows = client
            .query(
                "SELECT a.attname::text, a.atttypid::int8, \
                 coalesce(a.attnum = ANY(i.indkey::int2[]), false) \
                 FROM pg_attribute a \
                 LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
                 WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&oid],
            )
            .await?;
        let mut types = self.types();
        let mut columns = Vec::with_capacity(rows.len());
        let mut primary_key = Vec::new();
        for row in &rows {
            let (type_name, kind) = self.resolve_type(&mut types, row.get::<_, i64>(1) as u32).await?;
            let name: String = row.get(0);
            if row.get::<_, bool>(2) {
                primary_key.push(name.clone());
            }
            columns.push(TableColumn { name, type_name, kind });
        }
        Ok(Some(TableDefinition {
            table: PublishedTable { schema: schema.to_string(), name: name.to_string(), columns },
            primary_key,
            replica_identity_full: replica_identity == "f",
        }))
    }

    /// Whether any table of `schema` is in the publication (for schema-wide subscriptions).
    pub async fn schema_has_tables(&self, schema: &str) -> Result<bool, DbError> {
        let client = self.db.client().await?;
        let row = if self.trigger_mode {
            client
                .query_one(
                    "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE t.tgname = 'pgcast_capture' AND n.nspname = $1",
                    &[&schema],
                )
                .await?
        } else {
            client
                .query_one(
                    "SELECT count(*) FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2",
                    &[&self.publication, &schema],
                )
                .await?
        };
        Ok(row.get::<_, i64>(0) > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_and_domains_resolve_to_their_element_and_base_kinds() {
        let row = |oid, name: &str, category, element, base| PgTypeRow {
            oid,
            name: name.into(),
            category,
            element,
            base,
        };
        let catalog = TypeCatalog::from_rows(vec![
            row(23, "int4", b'N', 0, 0),
            row(1007, "_int4", b'A', 23, 0),
            row(90001, "positive_int", b'N', 0, 23),
            row(90002, "mood", b'E', 0, 0),
        ]);
        assert_eq!(catalog.get(1007).unwrap().kind, ValueKind::Array(Box::new(ValueKind::Integer)));
        assert_eq!(catalog.get(90001).unwrap().kind, ValueKind::Integer);
        assert_eq!(catalog.get(90002).unwrap().kind, ValueKind::Text);
        assert_eq!(catalog.get(1007).unwrap().name, "_int4");
    }
}
