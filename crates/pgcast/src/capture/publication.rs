//! The publication and the replication slot: created when missing, and the `pgcast tables`
//! administration (add, remove, list).
//!
//! Everything here is plain SQL over the [`Db`] connection; streaming is `replication`'s job.

use crate::db::{Db, DbError};

use super::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum PublicationError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("table {0} does not exist")]
    NoSuchTable(String),
    #[error("table name {0:?} is not of the form table or schema.table")]
    BadTableName(String),
    #[error(
        "PostgreSQL has wal_level={0}; logical replication needs wal_level=logical \
         (set it in postgresql.conf and restart PostgreSQL)"
    )]
    WalLevel(String),
    #[error("{action}: {message}")]
    Sql { action: String, message: String },
}

fn sql_error(action: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PublicationError {
    let action = action.into();
    move |e| PublicationError::Sql {
        action,
        message: e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string()),
    }
}

/// Quotes an identifier for SQL (`"my ""table"""`).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Splits `schema.table` (default schema `public`).
pub fn split_table_name(name: &str) -> Result<(String, String), PublicationError> {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        [table] if !table.is_empty() => Ok(("public".into(), table.to_string())),
        [schema, table] if !schema.is_empty() && !table.is_empty() => {
            Ok((schema.to_string(), table.to_string()))
        }
        _ => Err(PublicationError::BadTableName(name.into())),
    }
}

/// Creates the publication (empty) and the pgoutput slot if they do not exist yet. Returns
/// whether the slot was created now.
pub async fn ensure(db: &Db, publication: &str, slot: &str) -> Result<bool, PublicationError> {
    ensure_publication(db, publication).await?;
    let client = db.client().await?;
    let slot_exists = client
        .query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .map_err(sql_error("looking up the replication slot"))?
        .is_some();
    if !slot_exists {
        client
            .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot])
            .await
            .map_err(sql_error(format!("creating replication slot {slot}")))?;
        tracing::info!(slot, "created logical replication slot");
    }
    Ok(!slot_exists)
}

/// Creates the publication (empty) if it does not exist, after checking `wal_level`.
pub async fn ensure_publication(db: &Db, publication: &str) -> Result<(), PublicationError> {
    let client = db.client().await?;
    let wal_level: String =
        client.query_one("SHOW wal_level", &[]).await.map_err(sql_error("reading wal_level"))?.get(0);
    if wal_level != "logical" {
        return Err(PublicationError::WalLevel(wal_level));
    }
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication])
        .await
        .map_err(sql_error("looking up the publication"))?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!("CREATE PUBLICATION {}", quote_ident(publication)))
            .await
            .map_err(sql_error(format!("creating publication {publication}")))?;
        tracing::info!(publication, "created empty publication");
    }
    Ok(())
}

/// Moves the slot's confirmed position forward to `lsn` after the stream was closed (the final
/// acknowledgement at shutdown). Never moves it backwards.
pub async fn confirm_slot(db: &Db, slot: &str, lsn: Lsn) -> Result<(), PublicationError> {
    let client = db.client().await?;
    let target = super::format_lsn(lsn);
    client
        .execute(
            "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn) FROM pg_replication_slots \
             WHERE slot_name = $1 AND confirmed_flush_lsn < $2::text::pg_lsn",
            &[&slot, &target],
        )
        .await
        .map_err(sql_error(format!("confirming slot {slot} at {target}")))?;
    Ok(())
}

pub async fn add_table(db: &Db, publication: &str, name: &str) -> Result<String, PublicationError> {
    let (schema, table) = split_table_name(name)?;
    let client = db.client().await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = $2", &[&schema, &table])
        .await
        .map_err(sql_error("looking up the table"))?
        .is_some();
    if !exists {
        return Err(PublicationError::NoSuchTable(format!("{schema}.{table}")));
    }
    let published = client
        .query_opt(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &schema, &table],
        )
        .await
        .map_err(sql_error("looking up the publication"))?
        .is_some();
    let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
    if !published {
        client
            .batch_execute(&format!("ALTER PUBLICATION {} ADD TABLE {qualified}", quote_ident(publication)))
            .await
            .map_err(sql_error(format!("adding {schema}.{table}")))?;
    }
    Ok(format!("{schema}.{table}"))
}

pub async fn remove_table(db: &Db, publication: &str, name: &str) -> Result<String, PublicationError> {
    let (schema, table) = split_table_name(name)?;
    let client = db.client().await?;
    let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
    client
        .batch_execute(&format!("ALTER PUBLICATION {} DROP TABLE {qualified}", quote_ident(publication)))
        .await
        .map_err(sql_error(format!("removing {schema}.{table}")))?;
    Ok(format!("{schema}.{table}"))
}

/// Published tables as `(schema.table, replica identity)`.
pub async fn list_tables(db: &Db, publication: &str) -> Result<Vec<(String, String)>, PublicationError> {
    let client = db.client().await?;
    let rows = client
        .query(
            "SELECT p.schemaname || '.' || p.tablename, \
             CASE c.relreplident WHEN 'd' THEN 'default' WHEN 'f' THEN 'full' \
                  WHEN 'i' THEN 'index' ELSE 'nothing' END \
             FROM pg_publication_tables p \
             JOIN pg_namespace n ON n.nspname = p.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
             WHERE p.pubname = $1 ORDER BY 1",
            &[&publication],
        )
        .await
        .map_err(sql_error("listing published tables"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_default_to_public_and_reject_extra_dots() {
        assert_eq!(split_table_name("a").unwrap(), ("public".into(), "a".into()));
        assert_eq!(split_table_name("s.a").unwrap(), ("s".into(), "a".into()));
        assert!(split_table_name("a.b.c").is_err());
        assert!(split_table_name(".a").is_err());
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
