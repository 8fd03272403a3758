//! The audit trail: who connected, authenticated, joined, was refused, left, refreshed a token,
//! tracked presence or broadcast from the server, when and from where.
//!
//! [`AuditLog::record`] never waits: it emits a JSON log line (target `audit`) and queues the
//! event for the writer, which inserts batches into `pgcast.audit_log` off the hot path. The
//! table is created by pgcast and made append-only (triggers refuse UPDATE, DELETE and
//! TRUNCATE; application roles get SELECT and INSERT only). Events carry ids, never row
//! contents or tokens.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use crate::auth::{Claims, Identity};
use crate::capture::publication::quote_ident;
use crate::db::{Db, DbError};
use crate::shutdown::Shutdown;

/// Events queued for the writer; beyond this they are dropped (and counted), never waited for.
const QUEUE: usize = 10_000;
/// Rows per INSERT.
const BATCH: usize = 500;
/// Events kept while the database is unreachable; the oldest are dropped past this.
const BACKLOG: usize = 50_000;

/// Characters kept of each client-supplied field (a joined topic is at most 255 bytes; a refused
/// join's topic can be anything): a record and its log line stay bounded.
const CHANNEL_CHARS: usize = 300;
const DETAIL_CHARS: usize = 1000;
const CLAIM_CHARS: usize = 255;

/// `text` as a text column can hold it: NUL replaced, at most `max_chars` (see `text::storable`).
fn bounded(text: &str, max_chars: usize) -> String {
    crate::text::storable(text, max_chars).unwrap_or_else(|| text.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Connect,
    AuthFailure,
    Join,
    JoinRefused,
    Leave,
    TokenRefresh,
    PresenceTrack,
    ServerBroadcast,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Connect => "connect",
            Action::AuthFailure => "auth_failure",
            Action::Join => "join",
            Action::JoinRefused => "join_refused",
            Action::Leave => "leave",
            Action::TokenRefresh => "token_refresh",
            Action::PresenceTrack => "presence_track",
            Action::ServerBroadcast => "server_broadcast",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub at: SystemTime,
    pub action: Action,
    pub user_id: Option<String>,
    pub role: Option<String>,
    pub tenant: Option<String>,
    pub channel: Option<String>,
    pub client_addr: Option<String>,
    /// A reason (for refusals and failures); never row contents or tokens.
    pub detail: Option<String>,
}

impl AuditEvent {
    pub fn new(action: Action) -> AuditEvent {
        AuditEvent {
            at: SystemTime::now(),
            action,
            user_id: None,
            role: None,
            tenant: None,
            channel: None,
            client_addr: None,
            detail: None,
        }
    }

    pub fn claims(self, claims: Option<&Claims>) -> AuditEvent {
        self.identity(claims.map(Claims::identity).as_ref())
    }

    pub fn identity(mut self, identity: Option<&Identity>) -> AuditEvent {
        if let Some(identity) = identity {
            self.user_id = identity.sub.as_deref().map(|sub| bounded(sub, CLAIM_CHARS));
            self.role = Some(bounded(&identity.role, CLAIM_CHARS));
            self.tenant = identity.tenant.as_deref().map(|tenant| bounded(tenant, CLAIM_CHARS));
        }
        self
    }

    pub fn channel(mut self, topic: &str) -> AuditEvent {
        self.channel = Some(bounded(topic, CHANNEL_CHARS));
        self
    }

    pub fn peer(mut self, peer: Option<SocketAddr>) -> AuditEvent {
        self.client_addr = peer.map(|p| p.ip().to_string());
        self
    }

    /// This record with every client-supplied text field as printable ASCII (`\u{..}` escapes),
    /// for a record PostgreSQL refused as it was.
    fn escaped(&self) -> AuditEvent {
        let ascii = |field: &Option<String>| field.as_deref().map(|text| text.escape_default().to_string());
        AuditEvent {
            user_id: ascii(&self.user_id),
            role: ascii(&self.role),
            tenant: ascii(&self.tenant),
            channel: ascii(&self.channel),
            client_addr: self.client_addr.clone(),
            detail: ascii(&self.detail),
            ..AuditEvent::new(self.action)
        }
        .at(self.at)
    }

    fn at(mut self, at: SystemTime) -> AuditEvent {
        self.at = at;
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> AuditEvent {
        self.detail = Some(bounded(&detail.into(), DETAIL_CHARS));
        self
    }
}

/// The handle sessions and handlers record through.
#[derive(Clone)]
pub struct AuditLog {
    queue: mpsc::Sender<AuditEvent>,
}

impl AuditLog {
    pub fn new() -> (AuditLog, mpsc::Receiver<AuditEvent>) {
        let (queue, rx) = mpsc::channel(QUEUE);
        (AuditLog { queue }, rx)
    }

    /// Logs the event as a JSON line and queues it for the table; never blocks.
    pub fn record(&self, event: AuditEvent) {
        tracing::info!(
            target: "audit",
            action = event.action.as_str(),
            user = event.user_id.as_deref().unwrap_or(""),
            role = event.role.as_deref().unwrap_or(""),
            tenant = event.tenant.as_deref().unwrap_or(""),
            channel = event.channel.as_deref().unwrap_or(""),
            client = event.client_addr.as_deref().unwrap_or(""),
            detail = event.detail.as_deref().unwrap_or(""),
            "audit"
        );
        if self.queue.try_send(event).is_err() {
            metrics::counter!("pgcast_audit_dropped_total").increment(1);
        }
    }
}

/// Creates `pgcast.audit_log` if missing, append-only, readable and appendable by `app_roles`.
pub async fn ensure_table(db: &Db, app_roles: &[String]) -> Result<(), DbError> {
    let client = db.client().await?;
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS pgcast;
             CREATE TABLE IF NOT EXISTS pgcast.audit_log (
                 id bigserial PRIMARY KEY,
                 at timestamptz NOT NULL,
                 action text NOT NULL,
                 user_id text,
                 role text,
                 tenant text,
                 channel text,
                 client_addr text,
                 detail text
             );
             -- Set on a record PostgreSQL refused as it was and that was written with its
             -- client-supplied fields replaced (added after the first release: IF NOT EXISTS).
             ALTER TABLE pgcast.audit_log ADD COLUMN IF NOT EXISTS sanitized boolean NOT NULL DEFAULT false;
             CREATE INDEX IF NOT EXISTS audit_log_at ON pgcast.audit_log (at);
             CREATE OR REPLACE FUNCTION pgcast.audit_log_is_append_only() RETURNS trigger
                 LANGUAGE plpgsql AS $$
                 BEGIN RAISE EXCEPTION 'pgcast.audit_log is append-only: % is not allowed', TG_OP; END $$;
             CREATE OR REPLACE TRIGGER audit_log_no_update_or_delete
                 BEFORE UPDATE OR DELETE ON pgcast.audit_log
                 FOR EACH ROW EXECUTE FUNCTION pgcast.audit_log_is_append_only();
             CREATE OR REPLACE TRIGGER audit_log_no_truncate
                 BEFORE TRUNCATE ON pgcast.audit_log
                 FOR EACH STATEMENT EXECUTE FUNCTION pgcast.audit_log_is_append_only();
             REVOKE ALL ON pgcast.audit_log FROM PUBLIC;",
        )
        .await?;
    for role in app_roles {
        let role = quote_ident(role);
        client
            .batch_execute(&format!(
                "GRANT USAGE ON SCHEMA pgcast TO {role};
                 REVOKE ALL ON pgcast.audit_log FROM {role};
                 GRANT SELECT, INSERT ON pgcast.audit_log TO {role};
                 GRANT USAGE ON SEQUENCE pgcast.audit_log_id_seq TO {role};"
            ))
            .await?;
    }
    Ok(())
}

/// Writes queued events in batches until shutdown, then flushes what is left.
///
/// A batch PostgreSQL cannot be reached for is kept and retried with backoff. A batch it
/// refuses because of what a record holds (a data or constraint error) never blocks the ones
/// after it: its records are written one by one, and one refused alone is written again with
/// its text fields replaced and `sanitized` set (see [`write_isolated`]).
pub async fn run_writer(mut rx: mpsc::Receiver<AuditEvent>, db: std::sync::Arc<Db>, mut shutdown: Shutdown) {
    let mut pending: Vec<AuditEvent> = Vec::new();
    let mut retry = Duration::from_millis(200);
    loop {
        let stopping = if pending.is_empty() {
            tokio::select! {
                count = rx.recv_many(&mut pending, BATCH) => count == 0,
                _ = shutdown.wait() => true,
            }
        } else {
            // Events wait for a retry (its backoff has run): write them now, with whatever else
            // is queued, instead of waiting for the next event (which may never come).
            let mut closed = false;
            while pending.len() < BACKLOG {
                match rx.try_recv() {
                    Ok(event) => pending.push(event),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            closed || shutdown.is_triggered()
        };
        if stopping {
            // Take what is queued without waiting for more.
            while let Ok(event) = rx.try_recv() {
                pending.push(event);
            }
        }
        while !pending.is_empty() {
            let take = pending.len().min(BATCH);
            let written = match insert(&db, &pending[..take], false).await {
                Err(e) if refused_for_content(&e) => write_isolated(&db, &pending[..take]).await,
                other => other.map(|()| take).map_err(|e| (0, e)),
            };
            match written {
                Ok(count) => {
                    pending.drain(..count);
                    retry = Duration::from_millis(200);
                }
                Err((count, e)) => {
                    // What was written before PostgreSQL went away leaves the queue; the rest
                    // waits for the retry.
                    pending.drain(..count);
                    tracing::warn!(error = %e, pending = pending.len(), "audit log write failed; retrying");
                    metrics::counter!("pgcast_audit_write_failures_total").increment(1);
                    if pending.len() > BACKLOG {
                        let excess = pending.len() - BACKLOG;
                        pending.drain(..excess);
                        metrics::counter!("pgcast_audit_dropped_total").increment(excess as u64);
                    }
                    if stopping {
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = shutdown.wait() => {}
                    }
                    retry = (retry * 2).min(Duration::from_secs(10));
                    break;
                }
            }
        }
        if stopping && pending.is_empty() {
            return;
        }
    }
}

/// Whether PostgreSQL refused the statement for what a record holds (SQLSTATE class 22 data
/// exception, 23 integrity constraint, 54 program limit), not because it is unreachable or the
/// table is unusable for every record (permissions, a missing table), which a retry may fix.
fn refused_for_content(error: &DbError) -> bool {
    let DbError::Query(e) = error else { return false };
    e.as_db_error().is_some_and(|db| matches!(&db.code().code()[..2], "22" | "23" | "54"))
}

/// Writes `events` one by one after their batch was refused. A record refused on its own is
/// written again with every client-supplied text field escaped to plain ASCII and
/// `sanitized = true`, and if even that is refused, as the bare action and time with a note
/// saying why: the trail shows that something happened, when, and that it was altered. Returns
/// how many records were dealt with; an `Err` carries that count when PostgreSQL became
/// unreachable part-way.
async fn write_isolated(db: &Db, events: &[AuditEvent]) -> Result<usize, (usize, DbError)> {
    for (done, event) in events.iter().enumerate() {
        let refused = match insert(db, std::slice::from_ref(event), false).await {
            Ok(()) => continue,
            Err(e) if refused_for_content(&e) => e,
            Err(e) => return Err((done, e)),
        };
        let code = sqlstate(&refused);
        tracing::error!(action = event.action.as_str(), sqlstate = %code, "audit record refused by PostgreSQL; writing it sanitized");
        metrics::counter!("pgcast_audit_sanitized_total").increment(1);
        let escaped = event.escaped();
        match insert(db, std::slice::from_ref(&escaped), true).await {
            Ok(()) => continue,
            Err(e) if refused_for_content(&e) => {}
            Err(e) => return Err((done, e)),
        }
        let bare = AuditEvent::new(event.action)
            .at(event.at)
            .detail(format!("record refused by PostgreSQL (SQLSTATE {code}); its fields were dropped"));
        match insert(db, std::slice::from_ref(&bare), true).await {
            Ok(()) => {}
            Err(e) if refused_for_content(&e) => {
                tracing::error!(
                    action = event.action.as_str(),
                    "audit record could not be written in any form"
                );
                metrics::counter!("pgcast_audit_dropped_total").increment(1);
            }
            Err(e) => return Err((done, e)),
        }
    }
    Ok(events.len())
}

fn sqlstate(error: &DbError) -> String {
    match error {
        DbError::Query(e) => e.as_db_error().map(|db| db.code().code().to_string()).unwrap_or_default(),
        DbError::Connect(_) => String::new(),
    }
}

async fn insert(db: &Db, events: &[AuditEvent], sanitized: bool) -> Result<(), DbError> {
    let client = db.client().await?;
    let column = |f: fn(&AuditEvent) -> Option<String>| events.iter().map(f).collect::<Vec<_>>();
    let at: Vec<SystemTime> = events.iter().map(|e| e.at).collect();
    let action: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    client
        .execute(
            "INSERT INTO pgcast.audit_log (at, action, user_id, role, tenant, channel, client_addr, detail, sanitized)
             SELECT *, $9 FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],
                                      $6::text[], $7::text[], $8::text[])",
            &[
                &at,
                &action,
                &column(|e| e.user_id.clone()),
                &column(|e| e.role.clone()),
                &column(|e| e.tenant.clone()),
                &column(|e| e.channel.clone()),
                &column(|e| e.client_addr.clone()),
                &column(|e| e.detail.clone()),
                &sanitized,
            ],
        )
        .await?;
    metrics::counter!("pgcast_audit_written_total").increment(events.len() as u64);
    Ok(())
}
