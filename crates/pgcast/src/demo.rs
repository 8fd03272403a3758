//! `pgcast demo`: a private PostgreSQL with a small `appointments` table in the publication, and
//! a pgcast server on it, with instructions (and a service token) for connecting.
//!
//! This module prepares the demo database; serving is `server`'s job.

use std::path::Path;

use crate::capture::publication;
use crate::db::Db;
use crate::local_postgres::{LocalPostgres, LocalPostgresError};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Postgres(#[from] LocalPostgresError),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error(transparent)]
    Publication(#[from] publication::PublicationError),
}

/// The demo schema: the clinic tables of the seed apps (`examples/clinic.sql`).
pub const DEMO_SCHEMA: &str = include_str!("../../../examples/clinic.sql");
/// The demo's row policies and channel rules (`examples/policy.toml`).
pub const DEMO_POLICY: &str = include_str!("../../../examples/policy.toml");
/// Tables the demo publishes.
pub const DEMO_TABLES: [&str; 3] = ["appointments", "slot_reservations", "queue_entries"];

/// Starts (or reuses) the demo cluster under `dir` and prepares the demo table.
pub async fn prepare(dir: &Path, pg_port: u16, publication_name: &str) -> Result<LocalPostgres, DemoError> {
    let cluster = LocalPostgres::start(dir, pg_port).await?;
    let db = Db::new(&cluster.url());
    db.client().await?.batch_execute(DEMO_SCHEMA).await.map_err(crate::db::DbError::Query)?;
    publication::ensure(&db, publication_name, crate::config::DEFAULT_SLOT).await?;
    for table in DEMO_TABLES {
        publication::add_table(&db, publication_name, table).await?;
    }
    Ok(cluster)
}
