//! One SQL connection to PostgreSQL for catalog queries, health checks and administration,
//! re-established on demand after PostgreSQL restarts.
//!
//! This is not a pool and not on the hot path: fanout never waits on it. Replication uses its
//! own connection (see `capture::replication`).

use std::sync::Arc;

use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
}

pub struct Db {
    url: String,
    client: Mutex<Option<Arc<Client>>>,
}

impl Db {
    pub fn new(url: &str) -> Db {
        Db { url: url.to_string(), client: Mutex::new(None) }
    }

    /// A live client, connecting first if there is none or the last one was closed.
    pub async fn client(&self) -> Result<Arc<Client>, DbError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            if !client.is_closed() {
                return Ok(client.clone());
            }
        }
        let (client, connection) =
            tokio_postgres::connect(&self.url, NoTls).await.map_err(DbError::Connect)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "SQL connection closed");
            }
        });
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Runs `SELECT 1`; used by `/health`.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }
}
