//! pgoutput over a logical replication slot, through the `pgwire-replication` client.
//!
//! [`run`] streams from the slot's confirmed position, decodes each transaction and hands it to
//! the router over a bounded channel (so a slow router slows the stream, never grows memory).
//! The slot is confirmed only up to what the router reports as handled ([`Progress`]). When the
//! connection fails (PostgreSQL restarting, network) it reconnects with exponential backoff and
//! resumes from the slot, so committed changes are never skipped: at worst a transaction handled
//! but not yet confirmed is streamed again.
//!
//! Keepalives and standby status updates are answered by the client's background task even when
//! the router is slow.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgwire_replication::{Lsn as WireLsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::mpsc;

use super::catalog::Catalog;
use super::decode::{DecodeError, Decoded, Decoder};
use super::{format_lsn, Lsn, Progress, Transaction};
use crate::shutdown::Shutdown;

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often the handled position is passed to the client (which sends it within its status
/// interval).
const PROGRESS_TICK: Duration = Duration::from_millis(200);
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("invalid database URL for replication: {0}")]
    Url(String),
    #[error("replication stream: {0}")]
    Stream(#[from] pgwire_replication::PgWireError),
    #[error("decoding pgoutput: {0}")]
    Decode(#[from] DecodeError),
    #[error("reloading the type catalog: {0}")]
    Catalog(#[from] crate::db::DbError),
    #[error("the router stopped")]
    RouterGone,
}

/// What `/health` and `/metrics` show about the stream.
#[derive(Debug, Default)]
pub struct ReplicationStatus {
    connected: AtomicBool,
    /// The server's WAL end as of the last message: how far there is to read.
    server_wal_end: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ReplicationStatus {
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub fn server_wal_end(&self) -> Lsn {
        self.server_wal_end.load(Ordering::Acquire)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    pub(crate) fn set_connected(&self, connected: bool, error: Option<String>) {
        self.connected.store(connected, Ordering::Release);
        if let Ok(mut last) = self.last_error.lock() {
            *last = error;
        }
    }
}

/// Where to stream from and with which names.
pub struct ReplicationSource {
    pub database_url: String,
    pub slot: String,
    pub publication: String,
}

impl ReplicationSource {
    fn client_config(&self) -> Result<ReplicationConfig, ReplicationError> {
        let config: tokio_postgres::Config = self
            .database_url
            .parse()
            .map_err(|e: tokio_postgres::Error| ReplicationError::Url(e.to_string()))?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or("postgres").to_string();
        let password =
            config.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
        let database = config.get_dbname().unwrap_or(&user).to_string();
        Ok(ReplicationConfig::new(host, user, password, database, &self.slot, self.publication.as_str())
            .with_port(port)
            .with_start_lsn(WireLsn::ZERO)
            // Values are rendered from PostgreSQL's text output; pin the formats it depends on.
            .with_options("-c datestyle=ISO,MDY -c timezone=UTC -c intervalstyle=postgres")
            .with_status_interval(STATUS_INTERVAL)
            .with_wakeup_interval(Duration::from_secs(5))
            .with_buffer_size(1024)
            .with_application_name("pgcast"))
    }
}

/// Streams until shutdown, reconnecting on failure. Returns the LSN up to which everything was
/// handled, for the final slot confirmation.
pub async fn run(
    source: ReplicationSource,
    catalog: Arc<Catalog>,
    router: mpsc::Sender<Transaction>,
    progress: Arc<Progress>,
    status: Arc<ReplicationStatus>,
    mut shutdown: Shutdown,
) -> Lsn {
    let mut backoff = BACKOFF_START;
    while !shutdown.is_triggered() {
        let outcome = tokio::select! {
            outcome = stream_once(&source, &catalog, &router, &progress, &status) => outcome,
            _ = shutdown.wait() => break,
        };
        status.set_connected(false, outcome.as_ref().err().map(|e| e.to_string()));
        match outcome {
            Ok(streamed) => {
                if streamed {
                    backoff = BACKOFF_START;
                }
            }
            Err(ReplicationError::RouterGone) => break,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "replication interrupted");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait() => break,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    status.set_connected(false, None);
    progress.handled()
}

/// One replication session. `Ok(true)` when it ended after streaming normally.
async fn stream_once(
    source: &ReplicationSource,
    catalog: &Catalog,
    router: &mpsc::Sender<Transaction>,
    progress: &Progress,
    status: &ReplicationStatus,
) -> Result<bool, ReplicationError> {
    let mut types = catalog.reload_types().await?;
    let mut client = ReplicationClient::connect(source.client_config()?).await?;
    status.set_connected(true, None);
    tracing::info!(slot = %source.slot, publication = %source.publication, "replication streaming");
    let mut decoder = Decoder::new();
    // End LSN of the last transaction given to the router; everything up to it must be handled
    // before an idle keepalive position may be confirmed.
    let mut last_sent_end: Lsn = 0;
    let mut in_transaction = false;
    let mut tick = tokio::time::interval(PROGRESS_TICK);
    loop {
        let event = tokio::select! {
            event = client.recv() => event?,
            _ = tick.tick() => {
                let handled = progress.handled();
                if handled > 0 {
                    client.update_applied_lsn(WireLsn::from_u64(handled));
                }
                continue;
            }
        };
        let Some(event) = event else { return Ok(true) };
        match event {
            ReplicationEvent::Begin { .. } => {
                decoder.begin();
                in_transaction = true;
            }
            ReplicationEvent::XLogData { data, wal_end, .. } => {
                status.server_wal_end.fetch_max(wal_end.as_u64(), Ordering::AcqRel);
                loop {
                    match decoder.decode(&data, &types) {
                        Ok(Decoded::Nothing) => break,
                        Ok(Decoded::Transaction(tx)) => {
                            last_sent_end = tx.end_lsn;
                            router.send(tx).await.map_err(|_| ReplicationError::RouterGone)?;
                            break;
                        }
                        Err(DecodeError::UnknownType(oid)) => {
                            let reloaded = catalog.reload_types().await?;
                            if reloaded.get(oid).is_none() {
                                return Err(DecodeError::UnknownType(oid).into());
                            }
                            types = reloaded;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            ReplicationEvent::Commit { lsn, end_lsn, commit_time_micros } => {
                in_transaction = false;
                let tx = decoder.commit(lsn.as_u64(), end_lsn.as_u64(), commit_time_micros)?;
                metrics::counter!("pgcast_transactions_captured_total").increment(1);
                metrics::counter!("pgcast_changes_captured_total").increment(tx.changes.len() as u64);
                last_sent_end = tx.end_lsn;
                router.send(tx).await.map_err(|_| ReplicationError::RouterGone)?;
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                let wal_end = wal_end.as_u64();
                status.server_wal_end.fetch_max(wal_end, Ordering::AcqRel);
                // Nothing in flight: WAL up to the server's position holds nothing for us (other
                // tables, vacuum), so confirm it and let PostgreSQL recycle it.
                if !in_transaction && progress.handled() >= last_sent_end {
                    progress.mark_handled(wal_end);
                }
            }
            ReplicationEvent::Message { .. } => {}
            ReplicationEvent::StoppedAt { reached } => {
                tracing::info!(lsn = %format_lsn(reached.as_u64()), "replication stopped");
                return Ok(true);
            }
        }
    }
}
