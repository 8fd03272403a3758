//! The history slot: how the history of recent changes survives a server restart.
//!
//! Besides the streaming slot (confirmed as soon as changes are routed, so PostgreSQL is never
//! held back and shuts down promptly), pgcast keeps a second, never-streamed logical slot,
//! `<slot>_history`, whose confirmed position trails at the oldest change the history retains.
//! A [`Keeper`] advances it as the history is pruned, so the WAL kept for pgcast is bounded by
//! the retention setting even when no client is connected. At start-up [`rebuild`] peeks the
//! history slot up to the streaming slot's position and returns those transactions, which
//! refill the history without being delivered again.
//!
//! The cost: PostgreSQL keeps the retention window's WAL on disk, decodes it once more when the
//! history slot is advanced (once a second) and when a server starts. The epoch (a random id
//! stored in `pgcast.history_epoch`) changes when the history slot is (re)created, i.e. when
//! history is reset.

use std::sync::Arc;
use std::time::Duration;

use super::catalog::Catalog;
use super::decode::{DecodeError, Decoded, Decoder};
use super::publication::{self, PublicationError};
use super::{format_lsn, Lsn, Progress, Transaction};
use crate::db::{Db, DbError};
use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Publication(#[from] PublicationError),
    #[error("rebuilding history from slot {slot}: {source}")]
    Decode { slot: String, source: DecodeError },
}

pub fn history_slot_name(slot: &str) -> String {
    format!("{slot}_history")
}

/// What a server starts with: the epoch, where history begins, and the retained transactions.
pub struct Rebuilt {
    pub epoch: String,
    /// Changes before this were not retained: resuming from earlier needs a resync.
    pub start: Lsn,
    pub transactions: Vec<Transaction>,
}

/// Creates the history slot if missing (a new epoch then), and reads the retained window.
pub async fn rebuild(
    db: &Db,
    catalog: &Catalog,
    slot: &str,
    publication_name: &str,
) -> Result<Rebuilt, RetentionError> {
    let history_slot = history_slot_name(slot);
    let client = db.client().await?;
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS pgcast;
             CREATE TABLE IF NOT EXISTS pgcast.history_epoch (slot text PRIMARY KEY, epoch text NOT NULL,
                                                               created_at timestamptz NOT NULL DEFAULT now());",
        )
        .await
        .map_err(DbError::Query)?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&history_slot])
        .await
        .map_err(DbError::Query)?
        .is_some();
    if !exists {
        client
            .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&history_slot])
            .await
            .map_err(DbError::Query)?;
        client
            .execute("DELETE FROM pgcast.history_epoch WHERE slot = $1", &[&history_slot])
            .await
            .map_err(DbError::Query)?;
        tracing::info!(slot = %history_slot, "created the history slot: history starts now");
    }
    let epoch: String = match client
        .query_opt("SELECT epoch FROM pgcast.history_epoch WHERE slot = $1", &[&history_slot])
        .await
        .map_err(DbError::Query)?
    {
        Some(row) => row.get(0),
        None => {
            let epoch = crate::random::hex_id();
            client
                .execute(
                    "INSERT INTO pgcast.history_epoch (slot, epoch) VALUES ($1, $2)",
                    &[&history_slot, &epoch],
                )
                .await
                .map_err(DbError::Query)?;
            epoch
        }
    };
    let lsns = client
        .query_one(
            "SELECT (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1),
                    (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $2)",
            &[&history_slot, &slot],
        )
        .await
        .map_err(DbError::Query)?;
    let start = parse_lsn(lsns.get::<_, Option<String>>(0).as_deref()).unwrap_or(0);
    let streaming_from = parse_lsn(lsns.get::<_, Option<String>>(1).as_deref()).unwrap_or(0);
    let mut transactions = Vec::new();
    if streaming_from > start {
        let rows = client
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, NULL,
                     'proto_version', '1', 'publication_names', $3)",
                &[&history_slot, &format_lsn(streaming_from), &publication_name],
            )
            .await
            .map_err(DbError::Query)?;
        let mut types = catalog.reload_types().await?;
        let mut decoder = Decoder::new();
        for row in rows {
            let data: Vec<u8> = row.get(0);
            loop {
                match decoder.decode(&data, &types) {
                    Ok(Decoded::Transaction(tx)) => {
                        transactions.push(tx);
                        break;
                    }
                    Ok(Decoded::Nothing) => break,
                    Err(DecodeError::UnknownType(oid)) => {
                        let reloaded = catalog.reload_types().await?;
                        if reloaded.get(oid).is_none() {
                            return Err(RetentionError::Decode {
                                slot: history_slot,
                                source: DecodeError::UnknownType(oid),
                            });
                        }
                        types = reloaded;
                    }
                    Err(source) => return Err(RetentionError::Decode { slot: history_slot, source }),
                }
            }
        }
    }
    tracing::info!(
        slot = %history_slot,
        from = %format_lsn(start),
        to = %format_lsn(streaming_from),
        transactions = transactions.len(),
        "history rebuilt"
    );
    Ok(Rebuilt { epoch, start, transactions })
}

fn parse_lsn(text: Option<&str>) -> Option<Lsn> {
    let (hi, lo) = text?.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Advances the history slot to the history's floor, once a second and at shutdown.
pub struct Keeper {
    pub db: Arc<Db>,
    pub slot: String,
    pub progress: Arc<Progress>,
}

impl Keeper {
    pub async fn run(self, mut shutdown: Shutdown) {
        let history_slot = history_slot_name(&self.slot);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut advanced: Lsn = 0;
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.wait() => true,
            };
            let floor = self.progress.confirmable();
            if floor > advanced {
                match publication::confirm_slot(&self.db, &history_slot, floor).await {
                    Ok(()) => advanced = floor,
                    Err(e) => tracing::debug!(error = %e, "history slot not advanced this time"),
                }
            }
            if stopping {
                return;
            }
        }
    }
}
