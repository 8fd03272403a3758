//! The server's lifecycle: wires capture -> router -> sessions together, serves HTTP, and shuts
//! everything down in order (mini-redis's `server.rs`).
//!
//! Start-up: ensure the publication and slot, load the type catalog, bind the listener, start
//! the router, the replication stream and the HTTP server. Shutdown: stop accepting, close every
//! client with a reason, stop the stream, let the router drain, then confirm the last handled LSN
//! on the slot.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::audit::AuditLog;
use crate::auth::Verifier;
use crate::broadcast::Hub;
use crate::capture::catalog::Catalog;
use crate::capture::publication::{self, PublicationError};
use crate::capture::replication::{self, ReplicationSource, ReplicationStatus};
use crate::capture::{format_lsn, Progress};
use crate::config::{CaptureMode, Config};
use crate::db::{Db, DbError};
use crate::log::History;
use crate::outbound::{Frames, Outbound};
use crate::presence::Presence;
use crate::protocol::{self, PerWire};
use crate::router::index::Subscription;
use crate::router::policy::{Policy, PolicyError};
use crate::router::{self, index::Index};
use crate::shutdown::{self, Shutdown, ShutdownTrigger};

/// Transactions buffered between capture and router.
const ROUTER_QUEUE: usize = 256;
/// How long shutdown waits for clients to take their close frames.
const SESSION_DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Publication(#[from] PublicationError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("metrics: {0}")]
    Metrics(String),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Retention(#[from] crate::capture::retention::RetentionError),
    #[error("invalid socketio.tables: {0}")]
    SocketIoTables(String),
}

/// `[[socketio.tables]]` against the publication: a column a room template or filter names
/// must exist; a table not published yet is a warning (`pgcast tables add` can follow).
async fn check_socketio_tables(config: &Config, catalog: &Catalog) -> Result<(), ServerError> {
    let routes = &config.socketio.tables;
    for route in (0..).map_while(|i| routes.get(i)) {
        let (schema, table) = (&route.schema, &route.table);
        match catalog.published_table(schema, table).await? {
            None => tracing::warn!(
                table = %format!("{schema}.{table}"),
                "socketio.tables names a table that is not in the publication: its rooms get no changes until `pgcast tables add`"
            ),
            Some(published) => {
                if let Some(column) = route.columns().find(|c| published.column(c).is_none()) {
                    return Err(ServerError::SocketIoTables(format!(
                        "table {schema}.{table} has no column {column:?} (named by a room template or filter)"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Everything a request or a session needs, shared.
pub struct AppState {
    pub config: Config,
    pub verifier: Verifier,
    pub db: Arc<Db>,
    pub catalog: Arc<Catalog>,
    pub index: Arc<RwLock<Index>>,
    pub policy: Arc<Policy>,
    pub hub: Hub,
    pub presence: Presence,
    /// Row-level security checks, when a table is in RLS mode.
    pub rls: Option<Arc<crate::rls::RlsChecker>>,
    /// Recent changes for resuming clients; the router appends under this lock.
    pub history: Arc<tokio::sync::Mutex<History>>,
    pub audit: AuditLog,
    pub replication: Arc<ReplicationStatus>,
    pub progress: Arc<Progress>,
    pub shutdown: Shutdown,
    pub metrics: PrometheusHandle,
    next_subscription: AtomicU64,
    /// Open connections per user, for `max_connections_per_user`.
    users: Mutex<HashMap<String, usize>>,
    stopping: AtomicBool,
    /// WebSocket connections that have presented no valid token yet.
    pub unauthenticated: Arc<AtomicUsize>,
    active_sessions: AtomicUsize,
    sessions_idle: Notify,
}

impl AppState {
    pub fn next_subscription_id(&self) -> u64 {
        self.next_subscription.fetch_add(1, Ordering::Relaxed)
    }

    pub fn index_insert(&self, subscriptions: &[Arc<Subscription>]) {
        let mut index = self.index.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        for sub in subscriptions {
            index.insert(sub.clone());
        }
    }

    pub fn index_remove(&self, subscriptions: &[Arc<Subscription>]) {
        let mut index = self.index.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        for sub in subscriptions {
            index.remove(sub);
        }
    }

    /// Queues a `presence_diff` for every reader of `topic`, encoded once per wire format.
    pub fn deliver_presence_diff(&self, topic: &str, diff: &serde_json::Value) {
        let mut encoded = PerWire::default();
        for session in self.hub.readers(topic) {
            let message = encoded
                .get_or_encode(session.wire, |wire| Some(protocol::push(wire, topic, "presence_diff", diff)));
            if let Some(message) = message {
                session.deliver(Outbound { frames: Frames::One(message), commit_time_micros: 0 });
            }
        }
    }

    /// Counts a connection for `user`; `false` (and not counted) when at the limit.
    pub fn user_connected(&self, user: &str) -> bool {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let count = users.entry(user.to_string()).or_insert(0);
        if *count >= self.config.max_connections_per_user {
            return false;
        }
        *count += 1;
        true
    }

    pub fn user_disconnected(&self, user: &str) {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = users.get_mut(user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                users.remove(user);
            }
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Counts a session in; the guard counts it out when the session ends.
    pub fn session_guard(self: &Arc<Self>) -> SessionGuard {
        self.active_sessions.fetch_add(1, Ordering::AcqRel);
        SessionGuard { state: self.clone() }
    }
}

pub struct SessionGuard {
    state: Arc<AppState>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.state.active_sessions.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.state.sessions_idle.notify_waiters();
        }
    }
}

/// A started server. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    trigger: ShutdownTrigger,
    http: JoinHandle<()>,
    replication: JoinHandle<u64>,
    router: JoinHandle<()>,
    upkeep: JoinHandle<()>,
    keeper: JoinHandle<()>,
    /// Fired last, after sessions recorded their leaves, so the audit writer flushes them.
    audit_trigger: ShutdownTrigger,
    audit_writer: JoinHandle<()>,
}

/// The process-wide Prometheus recorder (installed once; tests start several servers).
fn metrics_handle() -> Result<PrometheusHandle, ServerError> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut slot = HANDLE.lock().map_err(|_| ServerError::Metrics("recorder lock poisoned".into()))?;
    if let Some(handle) = slot.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Prefix("pgcast_commit_to_".into()),
            &[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
        )
        .map_err(|e| ServerError::Metrics(e.to_string()))?
        .install_recorder()
        .map_err(|e| ServerError::Metrics(e.to_string()))?;
    *slot = Some(handle.clone());
    Ok(handle)
}

pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    let metrics = metrics_handle()?;
    let db = Arc::new(Db::new(&config.database_url));
    let trigger_mode = config.capture == CaptureMode::Trigger;
    if !trigger_mode {
        let created = publication::ensure(&db, &config.publication, &config.slot).await?;
        if created {
            tracing::info!(slot = %config.slot, "streaming starts from now: the slot was just created");
        }
    }
    let catalog = Arc::new(Catalog::new(db.clone(), &config.publication, trigger_mode));
    catalog.reload_types().await?;
    let policy = match &config.policy {
        Some(path) => Policy::load(path, &catalog).await?,
        None => Policy::deny_all(),
    };
    for ((schema, table), table_policy) in policy.tables() {
        if !table_policy.replica_identity_full {
            tracing::warn!(
                table = %format!("{schema}.{table}"),
                "table has a row policy but not REPLICA IDENTITY FULL: DELETEs and rows leaving a \
                 subscriber's view cannot be checked against the policy and are not delivered \
                 (ALTER TABLE ... REPLICA IDENTITY FULL)"
            );
        }
    }
    check_socketio_tables(&config, &catalog).await?;
    crate::audit::ensure_table(&db, &config.audit_app_roles).await?;
    let (audit, audit_events) = AuditLog::new();
    let (audit_trigger, audit_shutdown) = shutdown::channel();
    let audit_writer = tokio::spawn(crate::audit::run_writer(audit_events, db.clone(), audit_shutdown));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: config.listen, source })?;

    let (trigger, shutdown) = shutdown::channel();
    let progress = Progress::new();
    let rls = if policy.tables().any(|(_, t)| t.mode == crate::router::policy::Mode::Rls) {
        crate::rls::ensure_function(&db).await?;
        // Its own connection: RLS checks are on the routing path and must not queue behind
        // catalog, audit or history-slot queries.
        Some(Arc::new(crate::rls::RlsChecker::new(Arc::new(Db::new(&config.database_url)))))
    } else {
        None
    };
    // Where history starts: re-read from the history slot, or from the outbox.
    let (epoch, history_start, retained, outbox_cursor) = if trigger_mode {
        let start = crate::capture::outbox::start(&db, &catalog).await?;
        progress.mark_handled(start.cursor);
        (start.epoch, start.history_start, start.history, start.cursor)
    } else {
        let rebuilt =
            crate::capture::retention::rebuild(&db, &catalog, &config.slot, &config.publication).await?;
        (rebuilt.epoch, rebuilt.start, rebuilt.transactions, 0)
    };
    let mut restored = History::new(epoch, config.retention, history_start);
    for tx in retained {
        restored.append(Arc::new(tx), crate::clock::now_micros(), &progress);
    }
    let history = Arc::new(tokio::sync::Mutex::new(restored));
    let index = Arc::new(RwLock::new(Index::default()));
    let status = Arc::new(ReplicationStatus::default());
    let state = Arc::new(AppState {
        verifier: Verifier::new(&config.jwt_secret, config.jwt_nbf_leeway_secs),
        db: db.clone(),
        catalog: catalog.clone(),
        index: index.clone(),
        policy: Arc::new(policy),
        hub: Hub::new(config.retention.max_age, config.broadcast_history, config.outbound_queue),
        presence: Presence::default(),
        history: history.clone(),
        rls: rls.clone(),
        audit,
        replication: status.clone(),
        progress: progress.clone(),
        shutdown: shutdown.clone(),
        metrics,
        next_subscription: AtomicU64::new(1),
        users: Mutex::new(HashMap::new()),
        stopping: AtomicBool::new(false),
        unauthenticated: Arc::new(AtomicUsize::new(0)),
        active_sessions: AtomicUsize::new(0),
        sessions_idle: Notify::new(),
        config,
    });

    let (changes_tx, changes_rx) = mpsc::channel(ROUTER_QUEUE);
    let router = tokio::spawn(router::run(changes_rx, index, history, progress.clone(), rls));
    let replication = if trigger_mode {
        tokio::spawn(crate::capture::outbox::run(
            state.config.database_url.clone(),
            Arc::new(Db::new(&state.config.database_url)),
            catalog,
            changes_tx,
            progress,
            status,
            state.config.retention,
            outbox_cursor,
            shutdown.clone(),
        ))
    } else {
        let source = ReplicationSource {
            database_url: state.config.database_url.clone(),
            slot: state.config.slot.clone(),
            publication: state.config.publication.clone(),
        };
        tokio::spawn(replication::run(source, catalog, changes_tx, progress, status, shutdown.clone()))
    };

    let app = crate::http::routes(state.clone());
    let limits = crate::accept::Limits {
        header_timeout: state.config.http_header_timeout,
        max_pending: state.config.max_pending_connections,
        max_pending_per_ip: state.config.max_pending_connections_per_ip,
    };
    let http = tokio::spawn(crate::accept::serve(listener, app, limits, shutdown.clone()));
    let keeper = if trigger_mode {
        tokio::spawn(async {})
    } else {
        let keeper = crate::capture::retention::Keeper {
            // Its own connection: advancing the slot decodes WAL and may take a while.
            db: Arc::new(Db::new(&state.config.database_url)),
            slot: state.config.slot.clone(),
            progress: state.progress.clone(),
        };
        tokio::spawn(keeper.run(shutdown.clone()))
    };
    let upkeep = tokio::spawn(upkeep(state.clone(), shutdown));
    tracing::info!(listen = %addr, "pgcast listening");
    Ok(RunningServer {
        addr,
        state,
        trigger,
        http,
        replication,
        router,
        upkeep,
        keeper,
        audit_trigger,
        audit_writer,
    })
}

/// Keeps gauges fresh and runs the exporter's upkeep.
async fn upkeep(state: Arc<AppState>, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        update_gauges(&state);
        state.hub.prune();
        metrics::gauge!("pgcast_broadcast_history_bytes").set(state.hub.history_bytes() as f64);
        state.metrics.run_upkeep();
        ticks += 1;
        if ticks.is_multiple_of(TRIM_EVERY_TICKS) {
            tokio::task::spawn_blocking(give_back_free_memory);
        }
    }
}

/// Upkeep ticks (seconds) between two [`give_back_free_memory`] calls.
const TRIM_EVERY_TICKS: u64 = 5;

/// Hands the allocator's free pages back to the system. glibc keeps what was freed inside its
/// heaps (a join storm's transient buffers, a burst's queues) mapped for good, so without this
/// the process stays at its peak and memory per connection depends on what happened before;
/// `malloc_trim` releases every whole free page, also in the middle of a heap. Off the
/// runtime's threads: it walks the heaps (measured: 0.1-0.2 ms, 2 ms once, with 10,100
/// connections at 2,000 commits/s; the fanout's latency did not move).
fn give_back_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only takes glibc's own heap locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub fn update_gauges(state: &AppState) {
    let handled = state.progress.handled();
    let server_end = state.replication.server_wal_end();
    metrics::gauge!("pgcast_replication_lag_bytes").set(server_end.saturating_sub(handled) as f64);
    metrics::gauge!("pgcast_replication_connected").set(if state.replication.is_connected() {
        1.0
    } else {
        0.0
    });
    let subscriptions = state.index.read().map(|i| i.len()).unwrap_or(0);
    metrics::gauge!("pgcast_subscriptions").set(subscriptions as f64);
    metrics::gauge!("pgcast_unauthenticated_connections")
        .set(state.unauthenticated.load(Ordering::Relaxed) as f64);
}

impl RunningServer {
    /// Graceful shutdown; returns the LSN the slot was confirmed at.
    pub async fn shutdown(self) -> u64 {
        tracing::info!("shutting down");
        self.state.stopping.store(true, Ordering::Release);
        self.trigger.trigger();
        let _ = self.http.await;
        // Sessions see the signal and close with a reason; give them a moment to do so.
        let drain = async {
            while self.state.active_sessions.load(Ordering::Acquire) > 0 {
                let idle = self.state.sessions_idle.notified();
                if self.state.active_sessions.load(Ordering::Acquire) == 0 {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), idle).await;
            }
        };
        let _ = tokio::time::timeout(SESSION_DRAIN, drain).await;
        let _ = self.replication.await;
        // The replication task dropped its sender: the router drains what it has and stops.
        let _ = self.router.await;
        let _ = self.upkeep.await;
        let _ = self.keeper.await;
        let trigger_mode = self.state.config.capture == CaptureMode::Trigger;
        if !trigger_mode {
            let history_slot = crate::capture::retention::history_slot_name(&self.state.config.slot);
            let floor = self.state.progress.confirmable();
            if let Err(e) = publication::confirm_slot(&self.state.db, &history_slot, floor).await {
                tracing::warn!(error = %e, "could not advance the history slot at shutdown");
            }
        }
        self.audit_trigger.trigger();
        let _ = self.audit_writer.await;
        let handled = self.state.progress.handled();
        if handled > 0 && self.state.config.capture == CaptureMode::Replication {
            confirm_with_retry(&self.state, handled).await;
        }
        if handled > 0 && self.state.config.capture == CaptureMode::Trigger {
            let saved = match self.state.db.client().await {
                Ok(client) => client
                    .execute("UPDATE pgcast.outbox_cursor SET xid = $1::text::xid8", &[&handled.to_string()])
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = saved {
                tracing::warn!(error = %e, "could not save the outbox cursor; the last changes will be sent again");
            }
        }
        tracing::info!(lsn = %format_lsn(handled), "stopped");
        handled
    }
}

/// The walsender may take a moment to release the slot after the stream closed.
async fn confirm_with_retry(state: &AppState, lsn: u64) {
    for attempt in 0..20 {
        match publication::confirm_slot(&state.db, &state.config.slot, lsn).await {
            Ok(()) => return,
            Err(e) if attempt == 19 => {
                tracing::warn!(error = %e, "could not confirm the final LSN; it will be re-streamed");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
