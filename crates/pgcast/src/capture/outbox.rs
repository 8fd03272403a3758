//! Trigger/outbox capture, for databases where logical replication is not available (managed
//! PostgreSQL without replication rights).
//!
//! `pgcast tables add NAME --mode trigger` installs a trigger that writes each row change into
//! `pgcast.outbox` in the same transaction, with the row's values as PostgreSQL's text output
//! (the same form pgoutput sends, so decoding and rendering are shared), and `NOTIFY`s
//! `pgcast_outbox` only as a wake-up: nothing rides in the notification, so its 8000-byte limit
//! does not matter and nothing is lost while pgcast is down.
//!
//! [`run`] reads the outbox in transaction order: only rows of transactions older than every
//! running one (`xid < pg_snapshot_xmin(pg_current_snapshot())`) are read, by (xid, id), so a
//! transaction that commits late can never be skipped. It wakes on NOTIFY, and polls every
//! second anyway, which covers a dropped LISTEN connection. Positions are (xid, index); the
//! cursor of handled transactions is kept in `pgcast.outbox_cursor`, and rows stay in the outbox
//! for the retention window (they are the history a restarted server resumes clients from), then
//! are pruned.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::AsyncMessage;

use super::catalog::Catalog;
use super::publication::quote_ident;
use super::replication::ReplicationStatus;
use super::{Change, ChangeKind, Column, Progress, Relation, Row, Transaction, Value};
use crate::db::{Db, DbError};
use crate::log::Retention;
use crate::shutdown::Shutdown;

const CHANNEL: &str = "pgcast_outbox";
const BATCH: i64 = 1000;
const POLL: Duration = Duration::from_secs(1);

/// Creates the outbox, its cursor and the capture functions (idempotent).
pub async fn install(db: &Db) -> Result<(), DbError> {
    db.client()
        .await?
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS pgcast;
             CREATE TABLE IF NOT EXISTS pgcast.outbox (
                 id bigserial PRIMARY KEY,
                 xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
                 at timestamptz NOT NULL DEFAULT clock_timestamp(),
                 schema_name text NOT NULL,
                 table_name text NOT NULL,
                 op char(1) NOT NULL,
                 new_values text[],
                 old_values text[]
             );
             CREATE INDEX IF NOT EXISTS outbox_xid_id ON pgcast.outbox (xid, id);
             CREATE TABLE IF NOT EXISTS pgcast.outbox_cursor (
                 one int PRIMARY KEY DEFAULT 1 CHECK (one = 1),
                 xid xid8 NOT NULL
             );
             -- Values as text output, in the formats pgcast renders from (like its replication
             -- session), whatever the writing session's settings.
             CREATE OR REPLACE FUNCTION pgcast.capture() RETURNS trigger LANGUAGE plpgsql
                 SET datestyle = 'ISO, MDY' SET timezone = 'UTC' SET intervalstyle = 'postgres'
                 SET extra_float_digits = 1 AS $$
             DECLARE
                 cols text;
                 newv text[];
                 oldv text[];
             BEGIN
                 SELECT string_agg(format('($1).%I::text', attname), ',' ORDER BY attnum) INTO cols
                   FROM pg_attribute WHERE attrelid = TG_RELID AND attnum > 0 AND NOT attisdropped;
                 IF TG_OP IN ('INSERT', 'UPDATE') THEN
                     EXECUTE format('SELECT ARRAY[%s]::text[]', cols) USING NEW INTO newv;
                 END IF;
                 IF TG_OP IN ('UPDATE', 'DELETE') THEN
                     EXECUTE format('SELECT ARRAY[%s]::text[]', cols) USING OLD INTO oldv;
                 END IF;
                 INSERT INTO pgcast.outbox (schema_name, table_name, op, new_values, old_values)
                     VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, left(TG_OP, 1), newv, oldv);
                 PERFORM pg_notify('pgcast_outbox', '');
                 RETURN NULL;
             END $$;
             CREATE OR REPLACE FUNCTION pgcast.capture_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO pgcast.outbox (schema_name, table_name, op) VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'T');
                 PERFORM pg_notify('pgcast_outbox', '');
                 RETURN NULL;
             END $$;",
        )
        .await?;
    Ok(())
}

/// Installs the capture triggers on a table.
pub async fn add_table(db: &Db, schema: &str, table: &str) -> Result<(), DbError> {
    install(db).await?;
    let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
    db.client()
        .await?
        .batch_execute(&format!(
            "CREATE OR REPLACE TRIGGER pgcast_capture AFTER INSERT OR UPDATE OR DELETE ON {qualified}
                 FOR EACH ROW EXECUTE FUNCTION pgcast.capture();
             CREATE OR REPLACE TRIGGER pgcast_capture_truncate AFTER TRUNCATE ON {qualified}
                 FOR EACH STATEMENT EXECUTE FUNCTION pgcast.capture_truncate();"
        ))
        .await?;
    Ok(())
}

pub async fn remove_table(db: &Db, schema: &str, table: &str) -> Result<(), DbError> {
    let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
    db.client()
        .await?
        .batch_execute(&format!(
            "DROP TRIGGER IF EXISTS pgcast_capture ON {qualified};
             DROP TRIGGER IF EXISTS pgcast_capture_truncate ON {qualified};"
        ))
        .await?;
    Ok(())
}

/// Tables with the capture trigger, as `schema.table`.
pub async fn list_tables(db: &Db) -> Result<Vec<String>, DbError> {
    let rows = db
        .client()
        .await?
        .query(
            "SELECT n.nspname || '.' || c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = 'pgcast_capture' ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Where the outbox stands at start-up: the epoch, the retained (already delivered)
/// transactions, and the cursor live delivery continues after.
pub struct Start {
    pub epoch: String,
    pub cursor: u64,
    /// Position floor: resuming from before the oldest retained transaction needs a resync.
    pub history_start: u64,
    pub history: Vec<Transaction>,
}

/// Reads the retained history (transactions up to the cursor) for a restarting server.
pub async fn start(db: &Db, catalog: &Catalog) -> Result<Start, DbError> {
    install(db).await?;
    let client = db.client().await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS pgcast.history_epoch (slot text PRIMARY KEY, epoch text NOT NULL,
                                                               created_at timestamptz NOT NULL DEFAULT now());",
        )
        .await?;
    let cursor = match client.query_opt("SELECT xid::text FROM pgcast.outbox_cursor", &[]).await? {
        Some(row) => row.get::<_, String>(0).parse().unwrap_or(0),
        None => {
            // First start: history begins now; what is already in the outbox is history.
            let row = client
                .query_one(
                    "INSERT INTO pgcast.outbox_cursor (xid) \
                     SELECT coalesce(max(xid), '0'::xid8) FROM pgcast.outbox RETURNING xid::text",
                    &[],
                )
                .await?;
            client.execute("DELETE FROM pgcast.history_epoch WHERE slot = 'outbox'", &[]).await?;
            row.get::<_, String>(0).parse().unwrap_or(0)
        }
    };
    let epoch: String = match client
        .query_opt("SELECT epoch FROM pgcast.history_epoch WHERE slot = 'outbox'", &[])
        .await?
    {
        Some(row) => row.get(0),
        None => {
            let epoch = crate::random::hex_id();
            client
                .execute("INSERT INTO pgcast.history_epoch (slot, epoch) VALUES ('outbox', $1)", &[&epoch])
                .await?;
            epoch
        }
    };
    let mut reader = Reader::default();
    let rows = reader.fetch(&client, catalog, 0, Some(cursor), i64::MAX).await?;
    let history_start = rows.first().map(|tx| tx.commit_lsn).unwrap_or(cursor + 1);
    Ok(Start { epoch, cursor, history_start, history: rows })
}

/// Relations built from the catalog, by table.
#[derive(Default)]
struct Reader {
    relations: HashMap<(String, String), Arc<Relation>>,
}

impl Reader {
    async fn relation(
        &mut self,
        catalog: &Catalog,
        schema: &str,
        table: &str,
    ) -> Result<Option<Arc<Relation>>, DbError> {
        let key = (schema.to_string(), table.to_string());
        if let Some(relation) = self.relations.get(&key) {
            return Ok(Some(relation.clone()));
        }
        let Some(definition) = catalog.table_definition(schema, table).await? else { return Ok(None) };
        let columns = definition
            .table
            .columns
            .iter()
            .map(|c| Column {
                name: c.name.clone(),
                type_oid: 0,
                type_name: c.type_name.clone(),
                kind: c.kind.clone(),
                is_key: definition.primary_key.contains(&c.name),
            })
            .collect();
        // The trigger captures whole old rows, like REPLICA IDENTITY FULL.
        let relation = Arc::new(Relation {
            oid: 0,
            schema: schema.to_string(),
            name: table.to_string(),
            replica_identity: b'f',
            columns,
        });
        self.relations.insert(key, relation.clone());
        Ok(Some(relation))
    }

    /// Complete transactions with `after < xid <= upto` (and below every running transaction),
    /// at most about `limit` rows, in (xid, id) order.
    async fn fetch(
        &mut self,
        client: &tokio_postgres::Client,
        catalog: &Catalog,
        after: u64,
        upto: Option<u64>,
        limit: i64,
    ) -> Result<Vec<Transaction>, DbError> {
        let upto = upto.map(|u| u.to_string()).unwrap_or_else(|| u64::MAX.to_string());
        let rows = client
            .query(
                // `o.xid` in ORDER BY: a bare `xid` would name the text output column and sort
                // "1001" before "999".
                "SELECT o.xid::text AS xid_text, (extract(epoch FROM o.at) * 1000000)::int8, \
                        o.schema_name, o.table_name, o.op, o.new_values, o.old_values \
                 FROM pgcast.outbox o \
                 WHERE o.xid > $1::text::xid8 AND o.xid <= $2::text::xid8 \
                   AND o.xid < pg_snapshot_xmin(pg_current_snapshot()) \
                 ORDER BY o.xid, o.id LIMIT $3",
                &[&after.to_string(), &upto, &limit],
            )
            .await?;
        let full = rows.len() as i64 == limit;
        let mut transactions: Vec<Transaction> = Vec::new();
        for row in &rows {
            let xid: u64 = row.get::<_, String>(0).parse().unwrap_or(0);
            let at: i64 = row.get(1);
            let schema: String = row.get(2);
            let table: String = row.get(3);
            let op: String = row.get(4);
            let Some(relation) = self.relation(catalog, &schema, &table).await? else { continue };
            let to_row = |values: Option<Vec<Option<String>>>| {
                values.map(|values| Row {
                    values: values
                        .into_iter()
                        .map(|v| v.map(|t| Value::Text(t.into())).unwrap_or(Value::Null))
                        .collect(),
                })
            };
            let new = to_row(row.get(5));
            let old = to_row(row.get(6));
            if [&new, &old]
                .iter()
                .any(|r| r.as_ref().is_some_and(|r| r.values.len() != relation.columns.len()))
            {
                // The table changed shape since the row was captured: reload and skip this row.
                self.relations.remove(&(schema.clone(), table.clone()));
                tracing::warn!(table = %format!("{schema}.{table}"), "outbox row does not match the table's columns; skipped");
                continue;
            }
            let kind = match op.as_str() {
                "I" => ChangeKind::Insert,
                "U" => ChangeKind::Update,
                "D" => ChangeKind::Delete,
                _ => ChangeKind::Truncate,
            };
            let change = Change { relation, kind, new, old };
            match transactions.last_mut() {
                Some(tx) if tx.commit_lsn == xid => {
                    tx.changes.push(change);
                    tx.commit_time_micros = at;
                }
                _ => transactions.push(Transaction {
                    commit_lsn: xid,
                    end_lsn: xid,
                    commit_time_micros: at,
                    changes: vec![change],
                }),
            }
        }
        // A full batch may end in the middle of a transaction: leave that one for next time,
        // unless it is the only one (then read the rest of it).
        if full && transactions.len() > 1 {
            transactions.pop();
        } else if full {
            if let Some(xid) = transactions.first().map(|tx| tx.commit_lsn) {
                return Box::pin(self.fetch(client, catalog, after, Some(xid), i64::MAX)).await;
            }
        }
        Ok(transactions)
    }
}

/// Reads the outbox until shutdown, handing transactions to the router, persisting the cursor
/// of handled ones and pruning past retention.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    database_url: String,
    db: Arc<Db>,
    catalog: Arc<Catalog>,
    router: mpsc::Sender<Transaction>,
    progress: Arc<Progress>,
    status: Arc<ReplicationStatus>,
    retention: Retention,
    mut cursor: u64,
    mut shutdown: Shutdown,
) -> u64 {
    let wake = Arc::new(Notify::new());
    let listener = tokio::spawn(listen(database_url, wake.clone(), shutdown.clone()));
    let mut reader = Reader::default();
    let mut saved = cursor;
    let mut prune_tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        let batch = match db.client().await {
            Ok(client) => reader.fetch(&client, &catalog, cursor, None, BATCH).await,
            Err(e) => Err(e),
        };
        match batch {
            Ok(transactions) => {
                status.set_connected(true, None);
                let more = !transactions.is_empty();
                for tx in transactions {
                    cursor = tx.commit_lsn;
                    metrics::counter!("pgcast_transactions_captured_total").increment(1);
                    metrics::counter!("pgcast_changes_captured_total").increment(tx.changes.len() as u64);
                    if router.send(tx).await.is_err() {
                        listener.abort();
                        return cursor;
                    }
                }
                let handled = progress.handled();
                if handled > saved {
                    if let Ok(client) = db.client().await {
                        if client
                            .execute(
                                "UPDATE pgcast.outbox_cursor SET xid = $1::text::xid8",
                                &[&handled.to_string()],
                            )
                            .await
                            .is_ok()
                        {
                            saved = handled;
                        }
                    }
                }
                if more {
                    continue;
                }
            }
            Err(e) => {
                status.set_connected(false, Some(e.to_string()));
                tracing::warn!(error = %e, "reading the outbox failed; retrying");
            }
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
            _ = prune_tick.tick() => prune(&db, retention, saved).await,
            _ = shutdown.wait() => break,
        }
    }
    listener.abort();
    status.set_connected(false, None);
    cursor
}

/// Deletes handled rows past the retention window.
async fn prune(db: &Db, retention: Retention, handled: u64) {
    let Ok(client) = db.client().await else { return };
    let result = client
        .execute(
            "DELETE FROM pgcast.outbox WHERE xid <= $1::text::xid8 AND (
                 at < now() - make_interval(secs => $2)
                 OR id <= (SELECT id FROM pgcast.outbox ORDER BY id DESC OFFSET $3 LIMIT 1))",
            &[&handled.to_string(), &(retention.max_age.as_secs_f64()), &(retention.max_changes as i64)],
        )
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "pruning the outbox failed");
    }
}

/// Keeps a LISTEN connection and wakes the reader on each notification; reconnects with backoff.
async fn listen(database_url: String, wake: Arc<Notify>, mut shutdown: Shutdown) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if let Ok((client, mut connection)) =
            tokio_postgres::connect(&database_url, tokio_postgres::NoTls).await
        {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            let listening = async {
                client
                    .batch_execute(&format!("SET application_name = 'pgcast-listen'; LISTEN {CHANNEL}"))
                    .await
            };
            // Drive the connection while the LISTEN command runs.
            let mut listening = std::pin::pin!(listening);
            let ok = loop {
                tokio::select! {
                    result = &mut listening => break result.is_ok(),
                    message = messages.next() => if message.is_none() { break false },
                }
            };
            if ok {
                backoff = Duration::from_millis(200);
                loop {
                    tokio::select! {
                        message = messages.next() => match message {
                            Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => break,
                        },
                        _ = shutdown.wait() => return,
                    }
                }
                tracing::warn!("LISTEN connection lost; polling until it is back");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
