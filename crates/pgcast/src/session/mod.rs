//! One client connection speaking the Supabase Realtime protocol: its joined channels, its
//! bounded outbound queue, the batching writer, heartbeat and token-expiry deadlines.
//!
//! The router hands a session pre-serialized messages through [`SessionHandle::deliver`]; when
//! the queue is full the session is cut off with a reason instead of growing memory. Replies to
//! the client's own frames are written directly, so they are never stuck behind a backlog.
//!
//! What a frame looks like on the wire is `protocol::phoenix`'s business; who receives which
//! change is the router's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::audit::{Action, AuditEvent};
use crate::auth::{AuthError, Claims, Identity};
use crate::capture::Transaction;
use crate::log::{Position, ResyncReason};
use crate::protocol::phoenix::{self, Frame};
use crate::protocol::Wire;
use crate::router::index::{Index, Subscription};
use crate::router::policy::ChannelAccess;
use crate::router::Fanout;
use crate::server::AppState;

mod messages;
mod queue;
mod subscribe;
pub mod supervise;

use queue::{PushError, Queue};

/// Most frames taken from the queue for one flush (a larger transaction goes whole).
const WRITE_BATCH: usize = 64;
/// Batch capacity kept between writes.
const IDLE_BATCH: usize = 4;
/// How long a close frame may take to reach a client before the socket is dropped anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// WebSocket close codes pgcast uses.
pub mod close_code {
    pub const GOING_AWAY: u16 = 1001;
    pub const TOO_BIG: u16 = 1009;
    /// The client did not read fast enough and its queue filled.
    pub const SLOW_CONSUMER: u16 = 4000;
    pub const HEARTBEAT_TIMEOUT: u16 = 4001;
    /// The client kept sending frames that could not be read.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// The client kept sending faster than `max_messages_per_second`.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// The connection presented no valid token within `auth_timeout_secs`.
    pub const AUTH_TIMEOUT: u16 = 4002;
    /// The user already has as many connections as allowed.
    pub const TOO_MANY_CONNECTIONS: u16 = 4003;
}

/// A message on its way to one or more connections: the bytes are shared, not copied.
#[derive(Clone, Debug)]
pub struct Outbound {
    pub frames: Frames,
    /// Commit time of the change(s) it carries (µs since the Unix epoch), for the latency
    /// metric; 0 for messages that carry no change.
    pub commit_time_micros: i64,
}

/// What one queue entry writes: cloning either shares the bytes.
#[derive(Clone, Debug)]
pub enum Frames {
    /// A text or binary frame.
    One(Message),
    /// A multi-change transaction's frames for this session, in order; sessions that get the
    /// same sequence share it (see `router::runs`).
    Run(Arc<[Message]>),
}

impl Frames {
    fn len(&self) -> usize {
        match self {
            Frames::One(_) => 1,
            Frames::Run(run) => run.len(),
        }
    }
}

/// The router's view of a session: where to put messages, and how to cut it off.
#[derive(Debug)]
pub struct SessionHandle {
    pub id: u64,
    /// The wire format: all the router and the hub know of the connection's protocol.
    pub wire: Wire,
    queue: Queue,
    kick_reason: Mutex<Option<(u16, String)>>,
    kick: Notify,
}

impl SessionHandle {
    /// A handle with no connection behind it, for tests of what producers queue.
    #[cfg(test)]
    pub fn detached(capacity: usize) -> Arc<SessionHandle> {
        Arc::new(SessionHandle {
            id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
            wire: Wire::PhoenixV2,
            queue: Queue::new(capacity),
            kick_reason: Mutex::new(None),
            kick: Notify::new(),
        })
    }

    /// Everything queued so far (tests).
    #[cfg(test)]
    pub fn take_queued(&self) -> Vec<Outbound> {
        let mut out = Vec::new();
        self.queue.take(&mut out, usize::MAX);
        out
    }

    /// Queues a message; if the queue is full the session is cut off (it will be closed with a
    /// reason) and `false` is returned.
    pub fn deliver(&self, message: Outbound) -> bool {
        match self.queue.try_push(message) {
            Ok(()) => true,
            Err(PushError::Full) => {
                self.kick(
                    close_code::SLOW_CONSUMER,
                    format!("slow consumer: more than {} messages queued", self.queue.capacity()),
                );
                false
            }
            Err(PushError::Closed) => false,
        }
    }

    /// How a kicked session ends (counted as a slow consumer if that was the reason).
    fn kicked(&self) -> Ending {
        let (code, reason) = self
            .kick_reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or((close_code::GOING_AWAY, "closed by server".into()));
        if code == close_code::SLOW_CONSUMER {
            metrics::counter!("pgcast_slow_consumers_total").increment(1);
        }
        Ending::Close(code, reason)
    }

    fn is_kicked(&self) -> bool {
        self.kick_reason.lock().map(|r| r.is_some()).unwrap_or(true)
    }

    /// Asks the session to close with `code` and `reason` (the first reason wins).
    pub fn kick(&self, code: u16, reason: String) {
        if let Ok(mut slot) = self.kick_reason.lock() {
            if slot.is_none() {
                *slot = Some((code, reason));
                self.kick.notify_one();
            }
        }
    }
}

/// The metrics every batch written updates, looked up once: at hundreds of thousands of writes
/// a second the registry lookup behind `metrics::counter!` cost more than the update itself.
/// (Sessions only run once the server has installed its recorder.)
struct WriteMeters {
    sent: metrics::Counter,
    commit_to_send: metrics::Histogram,
}

fn write_meters() -> &'static WriteMeters {
    static METERS: std::sync::OnceLock<WriteMeters> = std::sync::OnceLock::new();
    METERS.get_or_init(|| WriteMeters {
        sent: metrics::counter!("pgcast_messages_sent_total"),
        commit_to_send: metrics::histogram!("pgcast_commit_to_send_seconds"),
    })
}

/// A channel this connection has joined.
struct JoinedChannel {
    join_ref: Option<Box<str>>,
    /// The join's `postgres_changes` bindings, kept (as compact JSON, not as parsed maps: this
    /// stays in memory for every joined channel) to re-bind them when the token changes.
    bindings: Option<Box<str>>,
    subscriptions: Vec<Arc<Subscription>>,
    /// Who joined, for audit records and the expiry: not every claim (see `Identity`).
    identity: Identity,
    expires_at: Instant,
    private: bool,
    access: ChannelAccess,
    /// `config.broadcast.ack`: broadcasts are acknowledged with a reply.
    ack: bool,
    /// `config.presence.key`; without one a key is generated when the connection first tracks
    /// presence (most joins never do, and each would otherwise hold a key it never uses).
    presence_key: Option<Box<str>>,
    /// Whether `presence_state` was sent (it must precede diffs for the client to apply them).
    presence_synced: bool,
}

static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

pub struct Session {
    handle: Arc<SessionHandle>,
    state: Arc<AppState>,
    socket: WebSocket,
    peer: SocketAddr,
    /// Kept for joins without their own `access_token`; boxed, without a String's spare room.
    apikey: Option<Box<str>>,
    /// Boxed: a map allocates room for several entries at once, and most connections join one
    /// or two channels.
    channels: HashMap<String, Box<JoinedChannel>>,
    /// Client frames per second (`max_messages_per_second`).
    limiter: DefaultDirectRateLimiter,
    /// The user this connection counts against (`max_connections_per_user`), once known.
    counted_user: Option<String>,
    /// Frames dropped over the rate and malformed frames; allocated by the first of either, so
    /// well-behaved connections carry no more than the pointer.
    penalties: Option<Box<Penalties>>,
    /// Until a token is verified (boxed: most connections bring a valid `apikey`).
    unauthenticated: Option<Box<Unauthenticated>>,
}

/// A WebSocket that has presented no valid token yet: counted in
/// `AppState::unauthenticated` while it lives, with the time by which it must present one.
pub struct Unauthenticated {
    count: Arc<AtomicUsize>,
    deadline: Instant,
}

impl Unauthenticated {
    /// Counts one more unauthenticated connection, unless `max` are open already.
    pub fn admit(count: &Arc<AtomicUsize>, max: usize, within: Duration) -> Option<Unauthenticated> {
        count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Unauthenticated { count: count.clone(), deadline: Instant::now() + within })
    }
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Malformed frames within `MALFORMED_WINDOW` that disconnect a client.
const MAX_MALFORMED: u32 = 10;
const MALFORMED_WINDOW: Duration = Duration::from_secs(60);
/// Frames dropped over the rate within a second that disconnect a client: the rate itself
/// (it sent twice what it may), but never fewer than this.
const MIN_DROPS_BEFORE_CUT: u32 = 10;

/// A connection's record of frames it should not have sent.
struct Penalties {
    /// Start of the current one-second window of dropped frames, and how many were dropped.
    drops_since: Instant,
    dropped: u32,
    malformed_since: Instant,
    malformed: u32,
}

impl Penalties {
    fn new(now: Instant) -> Penalties {
        Penalties { drops_since: now, dropped: 0, malformed_since: now, malformed: 0 }
    }

    /// Counts a frame dropped over the rate; `true` when it is the first of its window.
    fn dropped_frame(&mut self, now: Instant) -> bool {
        if now.duration_since(self.drops_since) >= Duration::from_secs(1) {
            self.drops_since = now;
            self.dropped = 0;
        }
        self.dropped += 1;
        self.dropped == 1
    }

    /// Counts a malformed frame; returns how many fell in the current window.
    fn malformed_frame(&mut self, now: Instant) -> u32 {
        if now.duration_since(self.malformed_since) >= MALFORMED_WINDOW {
            self.malformed_since = now;
            self.malformed = 0;
        }
        self.malformed += 1;
        self.malformed
    }
}

/// Why the session loop ended: how to close the socket, if at all.
enum Ending {
    /// The server closes: a Close frame with this code and reason.
    Close(u16, String),
    /// The client sent a Close frame: the WebSocket library queued the reply (RFC 6455 5.5.1),
    /// which must still be flushed, or the client sees the connection drop (1006).
    ClosedByClient,
    Gone,
}

impl Session {
    /// A session for an upgraded connection. `unauthenticated` is given when the connection
    /// brought no (valid) `apikey`: it counts against `max_unauthenticated_connections` until
    /// a join verifies a token, and the connection is closed if none does in `auth_timeout`.
    pub fn new(
        socket: WebSocket,
        state: Arc<AppState>,
        peer: SocketAddr,
        wire: Wire,
        apikey: Option<String>,
        unauthenticated: Option<Unauthenticated>,
    ) -> Session {
        let apikey = apikey.map(String::into_boxed_str);
        let handle = Arc::new(SessionHandle {
            id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
            wire,
            queue: Queue::new(state.config.outbound_queue),
            kick_reason: Mutex::new(None),
            kick: Notify::new(),
        });
        let rate = NonZeroU32::new(state.config.max_messages_per_second).unwrap_or(NonZeroU32::MIN);
        let limiter = RateLimiter::direct(Quota::per_second(rate));
        // Counted here and uncounted in `Drop`: exactly once, however the session ends.
        metrics::gauge!("pgcast_connections").increment(1.0);
        Session {
            handle,
            state,
            socket,
            peer,
            apikey,
            channels: HashMap::new(),
            limiter,
            counted_user: None,
            penalties: None,
            unauthenticated: unauthenticated.map(Box::new),
        }
    }

    fn id(&self) -> u64 {
        self.handle.id
    }

    /// Runs the connection until the client leaves, is cut off, or the server shuts down.
    pub async fn run(mut self) {
        tracing::info!(session = self.handle.id, peer = %self.peer, "client connected");
        // The kick and shutdown are watched here, outside `serve`: a client that stopped reading
        // leaves `serve` blocked in a socket write, and must still be cut off. Watched once, they
        // are registered once, not again on every message the loop writes.
        let handle = self.handle.clone();
        let mut shutdown = self.state.shutdown.clone();
        let ending = tokio::select! {
            biased;
            _ = handle.kick.notified() => handle.kicked(),
            _ = shutdown.wait() => Ending::Close(close_code::GOING_AWAY, "server shutting down".into()),
            ending = self.serve() => ending,
        };
        // Released before the close frame, so other members see this one leave at once; `Drop`
        // releases again (a no-op then) for a session that ends by panicking.
        self.release();
        match &ending {
            Ending::Close(code, reason) => {
                tracing::info!(session = self.handle.id, code, reason = %reason, "closing client");
                let frame = CloseFrame { code: *code, reason: reason.as_str().into() };
                // Boxed: its state would otherwise sit in every connection's task all its life.
                let _ =
                    tokio::time::timeout(CLOSE_TIMEOUT, Box::pin(close_handshake(&mut self.socket, frame)))
                        .await;
            }
            Ending::ClosedByClient => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.socket.flush()).await;
            }
            Ending::Gone => {}
        }
        tracing::info!(session = self.handle.id, "client disconnected");
    }

    /// Gives back everything the session holds in shared state: queued messages, channels
    /// (subscriptions, hub membership, presence), the per-user slot. Idempotent.
    fn release(&mut self) {
        self.handle.queue.close();
        self.leave_all();
        if let Some(user) = self.counted_user.take() {
            self.state.user_disconnected(&user);
        }
    }

    async fn serve(&mut self) -> Ending {
        let heartbeat_timeout = self.state.config.heartbeat_timeout;
        let mut heartbeat_deadline = Instant::now() + heartbeat_timeout;
        let handle = self.handle.clone();
        // Grows on demand and is trimmed after each write: idle connections hold no batch.
        let mut batch: Vec<Outbound> = Vec::new();
        let coalesce = self.state.config.write_coalesce;
        // When the last batch was written: a connection written to within `coalesce` is busy.
        let mut last_write: Option<Instant> = None;
        // One timer for the heartbeat and the earliest token expiry, re-armed only when that
        // deadline moves: not on every wake, which under load is thousands a second.
        let timer = tokio::time::sleep_until(heartbeat_deadline);
        tokio::pin!(timer);
        loop {
            let expiry = self.channels.values().map(|c| c.expires_at).min();
            let auth = self.unauthenticated.as_ref().map(|u| u.deadline);
            let next = [expiry, auth].into_iter().flatten().fold(heartbeat_deadline, Instant::min);
            if timer.deadline() != next {
                timer.as_mut().reset(next);
            }
            tokio::select! {
                biased;
                _ = handle.queue.pop_many(&mut batch, WRITE_BATCH) => {
                    // A connection keeping up with a steady stream (a dashboard taking every
                    // change) gets its messages one at a time; if it wrote within the window it
                    // waits out the rest of it, so what arrives meanwhile shares this write: a
                    // write's cost is the syscall (and, on loopback, the receiver's kernel
                    // work), not the bytes. A connection that found a backlog is written at
                    // once: the backlog is its batch, and a timer per lagging connection would
                    // only slow a saturated server further.
                    if matches!(batch.as_slice(), [only] if only.frames.len() == 1) {
                        if let Some(hold) = last_write.map(|at| at + coalesce).filter(|h| *h > Instant::now()) {
                            // Boxed: only held connections carry a timer, not every idle task.
                            Box::pin(tokio::time::sleep_until(hold)).await;
                            handle.queue.take(&mut batch, WRITE_BATCH - 1);
                        }
                    }
                    if self.write_batch(&mut batch).await.is_err() {
                        return Ending::Gone;
                    }
                    last_write = Some(Instant::now());
                    batch.shrink_to(IDLE_BATCH);
                }
                incoming = self.socket.recv() => {
                    heartbeat_deadline = Instant::now() + heartbeat_timeout;
                    match incoming {
                        Some(Ok(Message::Close(_))) => return Ending::ClosedByClient,
                        None => return Ending::Gone,
                        Some(Ok(message)) => {
                            // Boxed, like the other client-frame handlers: their state
                            // machines are large and would otherwise sit in every idle
                            // connection's task.
                            if Box::pin(self.handle_frame(message)).await.is_err() {
                                return Ending::Gone;
                            }
                            // Cut off for what it sent: close now, not after what is buffered.
                            if handle.is_kicked() {
                                return handle.kicked();
                            }
                        }
                        Some(Err(e)) => {
                            let error = e.into_inner();
                            if matches!(error.downcast_ref(), Some(tungstenite::Error::Capacity(_))) {
                                return Ending::Close(
                                    close_code::TOO_BIG,
                                    format!("message larger than {} bytes", self.state.config.max_message_bytes),
                                );
                            }
                            tracing::debug!(session = self.handle.id, error = %error, "socket error");
                            return Ending::Gone;
                        }
                    }
                }
                _ = &mut timer => {
                    if self.unauthenticated.as_ref().is_some_and(|u| Instant::now() >= u.deadline) {
                        let within = self.state.config.auth_timeout.as_secs();
                        return Ending::Close(
                            close_code::AUTH_TIMEOUT,
                            format!("no valid token within {within}s: connect with an apikey or join with an access_token"),
                        );
                    }
                    if Instant::now() >= heartbeat_deadline {
                        return Ending::Close(
                            close_code::HEARTBEAT_TIMEOUT,
                            format!("no heartbeat for {}s", heartbeat_timeout.as_secs()),
                        );
                    }
                    if Box::pin(self.expire_channels()).await.is_err() {
                        return Ending::Gone;
                    }
                }
            }
        }
    }

    /// Feeds a batch of queued messages and flushes once.
    async fn write_batch(&mut self, batch: &mut Vec<Outbound>) -> Result<(), axum::Error> {
        let oldest = batch.iter().map(|m| m.commit_time_micros).min().unwrap_or(0);
        let count: usize = batch.iter().map(|m| m.frames.len()).sum();
        for entry in batch.drain(..) {
            match entry.frames {
                Frames::One(message) => self.socket.feed(message).await?,
                Frames::Run(run) => {
                    for message in run.iter() {
                        self.socket.feed(message.clone()).await?;
                    }
                }
            }
        }
        self.socket.flush().await?;
        let meters = write_meters();
        meters.sent.increment(count as u64);
        if oldest > 0 {
            let now = crate::clock::now_micros();
            meters.commit_to_send.record((now - oldest).max(0) as f64 / 1e6);
        }
        Ok(())
    }

    async fn send_text(&mut self, text: String) -> Result<(), axum::Error> {
        self.socket.send(Message::Text(text.into())).await
    }

    async fn reply(&mut self, to: &Frame, status: &str, response: Value) -> Result<(), axum::Error> {
        let text = phoenix::reply(self.handle.wire.vsn(), to, status, response);
        self.send_text(text).await
    }

    async fn reply_error(&mut self, to: &Frame, reason: impl Into<String>) -> Result<(), axum::Error> {
        let reason = reason.into();
        tracing::info!(
            session = self.handle.id,
            topic = %crate::text::clip(&to.topic, MAX_TOPIC_BYTES),
            event = %crate::text::clip(&to.event, crate::text::NAME_CHARS),
            reason = %reason,
            "refused"
        );
        self.reply(to, "error", json!({ "reason": reason })).await
    }

    /// An error that cannot be a reply (the frame could not be read): sent as `phx_error` on the
    /// `phoenix` topic; the connection stays open.
    async fn send_error_notice(&mut self, reason: &str) -> Result<(), axum::Error> {
        tracing::info!(session = self.handle.id, reason, "bad frame");
        self.send_phoenix_error(reason).await
    }

    /// `phx_error` on the `phoenix` topic: for what concerns the connection, not a channel.
    async fn send_phoenix_error(&mut self, reason: &str) -> Result<(), axum::Error> {
        let text = phoenix::encode(
            self.handle.wire.vsn(),
            None,
            None,
            "phoenix",
            "phx_error",
            &json!({ "reason": reason }),
        );
        self.send_text(text).await
    }

    /// One client frame, valid or not: counted against the rate limit before any of it is
    /// parsed, so a flood of garbage costs no more than a flood of heartbeats.
    async fn handle_frame(&mut self, message: Message) -> Result<(), axum::Error> {
        if self.limiter.check().is_err() {
            return self.over_rate().await;
        }
        match message {
            Message::Text(text) => self.handle_text(text.as_str()).await,
            Message::Binary(bytes) => self.handle_binary(&bytes).await,
            // Pings are answered by the WebSocket library; they count against the rate only.
            _ => Ok(()),
        }
    }

    /// A frame over `max_messages_per_second`: dropped unread. The first drop in a second
    /// gets a `phx_error` notice; a client that sends twice its rate within a second (it is
    /// not slowing down) is disconnected.
    async fn over_rate(&mut self) -> Result<(), axum::Error> {
        metrics::counter!("pgcast_rate_limited_total").increment(1);
        let rate = self.state.config.max_messages_per_second;
        let now = Instant::now();
        let penalties = self.penalties.get_or_insert_with(|| Box::new(Penalties::new(now)));
        let first_in_window = penalties.dropped_frame(now);
        if penalties.dropped >= rate.max(MIN_DROPS_BEFORE_CUT) {
            let reason = format!("rate limit exceeded: more than twice {rate} messages per second");
            self.handle.kick(close_code::POLICY_VIOLATION, reason);
            return Ok(());
        }
        if !first_in_window {
            return Ok(());
        }
        tracing::info!(session = self.handle.id, "rate limit exceeded; frames dropped");
        let reason = format!("rate limit exceeded: at most {rate} messages per second; frames are dropped");
        self.send_phoenix_error(&reason).await
    }

    /// A frame that could not be read: `phx_error` with the reason.
    async fn malformed(&mut self, reason: &str) -> Result<(), axum::Error> {
        if self.strike() {
            return Ok(());
        }
        self.send_error_notice(reason).await
    }

    /// Counts a malformed frame (or an unusable topic); a client that keeps sending them
    /// (`MAX_MALFORMED` within `MALFORMED_WINDOW`) is cut off, and `true` says so.
    fn strike(&mut self) -> bool {
        let now = Instant::now();
        let penalties = self.penalties.get_or_insert_with(|| Box::new(Penalties::new(now)));
        if penalties.malformed_frame(now) < MAX_MALFORMED {
            return false;
        }
        let reason =
            format!("too many malformed frames: {MAX_MALFORMED} within {}s", MALFORMED_WINDOW.as_secs());
        self.handle.kick(close_code::INVALID_PAYLOAD, reason);
        true
    }

    async fn handle_text(&mut self, text: &str) -> Result<(), axum::Error> {
        let frame = match phoenix::decode(self.handle.wire.vsn(), text) {
            Ok(frame) => frame,
            Err(e) => return self.malformed(&e.to_string()).await,
        };
        if frame.topic == "phoenix" {
            return match frame.event.as_str() {
                "heartbeat" => self.reply(&frame, "ok", json!({})).await,
                other => {
                    let other = crate::text::clip(other, crate::text::NAME_CHARS);
                    self.reply_error(&frame, format!("unknown event {other} on topic phoenix")).await
                }
            };
        }
        match frame.event.as_str() {
            "phx_join" => self.join(frame).await,
            _ if !self.channels.contains_key(&frame.topic) => {
                self.reply_error(&frame, "unmatched topic: join the channel first").await
            }
            "phx_leave" => {
                self.leave(&frame.topic);
                self.reply(&frame, "ok", json!({})).await?;
                let close = phoenix::encode(
                    self.handle.wire.vsn(),
                    frame.join_ref.as_deref(),
                    None,
                    &frame.topic,
                    "phx_close",
                    &json!({}),
                );
                self.send_text(close).await
            }
            "access_token" => self.refresh_token(frame).await,
            "broadcast" => self.broadcast(frame).await,
            "presence" => self.presence(frame).await,
            other => {
                let reason = format!("unknown event {}", crate::text::clip(other, crate::text::NAME_CHARS));
                self.reply_error(&frame, reason).await
            }
        }
    }

    /// Resolves the token for a join: the join's `access_token`, else the connection's `apikey`.
    fn verify_token(&self, access_token: Option<&str>) -> Result<Claims, String> {
        match (access_token, self.apikey.as_deref()) {
            (Some(token), _) => {
                self.state.verifier.verify(token).map_err(|e| format!("invalid access_token: {e}"))
            }
            (None, Some(apikey)) => {
                self.state.verifier.verify(apikey).map_err(|e| format!("invalid apikey: {e}"))
            }
            (None, None) => Err(AuthError::Missing.to_string()),
        }
    }

    async fn join(&mut self, frame: Frame) -> Result<(), axum::Error> {
        // Before anything about the join is logged or audited: the topic is the client's text.
        if let Err(reason) = check_topic(&frame.topic) {
            metrics::counter!("pgcast_joins_refused_total").increment(1);
            // Audited as a bounded prefix (`AuditEvent::channel`), like every client field.
            self.audit(AuditEvent::new(Action::JoinRefused).channel(&frame.topic).detail(reason.clone()));
            if self.strike() {
                return Ok(());
            }
            return self.reply_error(&frame, reason).await;
        }
        // Joining a topic again replaces the previous membership, as in Phoenix.
        if self.channels.contains_key(&frame.topic) {
            self.leave(&frame.topic);
        }
        let access_token = frame.payload.get("access_token").and_then(Value::as_str);
        let claims = match self.verify_token(access_token) {
            Ok(claims) => {
                // A verified token: the connection is no longer unauthenticated.
                self.unauthenticated = None;
                claims
            }
            Err(reason) => {
                metrics::counter!("pgcast_auth_failures_total").increment(1);
                self.audit(AuditEvent::new(Action::AuthFailure).channel(&frame.topic).detail(reason.clone()));
                return self.reply_error(&frame, reason).await;
            }
        };
        if self.channels.len() >= self.state.config.max_channels_per_connection {
            let reason = format!(
                "too many channels: at most {} per connection",
                self.state.config.max_channels_per_connection
            );
            return self.refuse_join(&frame, &claims, reason).await;
        }
        if let (None, Some(user)) = (&self.counted_user, &claims.sub) {
            if !self.state.user_connected(user) {
                let reason = format!(
                    "too many connections for this user: at most {}",
                    self.state.config.max_connections_per_user
                );
                self.refuse_join(&frame, &claims, reason.clone()).await?;
                self.handle.kick(close_code::TOO_MANY_CONNECTIONS, reason);
                return Ok(());
            }
            self.counted_user = Some(user.clone());
        }
        let bindings = match frame.payload.pointer("/config/postgres_changes") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items.clone(),
            Some(_) => {
                let reason = "config.postgres_changes must be an array";
                return self.refuse_join(&frame, &claims, reason.into()).await;
            }
        };
        let private = frame.payload.pointer("/config/private").and_then(Value::as_bool).unwrap_or(false);
        let access = self.state.policy.channel_access(channel_name(&frame.topic), private, &claims);
        if !access.read && !access.write {
            let reason = if private {
                format!(
                    "role {:?} is not allowed to join private channel {:?}",
                    claims.role,
                    channel_name(&frame.topic)
                )
            } else {
                "public channels are disabled: join with config.private = true".to_string()
            };
            return self.reply_error(&frame, reason).await;
        }
        if !bindings.is_empty() && !access.read {
            let reason =
                format!("role {:?} may not read channel {:?}", claims.role, channel_name(&frame.topic));
            return self.refuse_join(&frame, &claims, reason).await;
        }
        let topic: Arc<str> = Arc::from(frame.topic.as_str());
        let resume = match parse_resume(&frame.payload) {
            Ok(resume) => resume,
            Err(reason) => return self.refuse_join(&frame, &claims, reason).await,
        };
        // A resuming subscription never receives a change at or before its position live
        // (a restarted server streams the last changes again).
        let floor = resume.as_ref().map(|(_, position)| *position);
        let (subscriptions, response) =
            match subscribe::subscribe(&self.state, &self.handle, &topic, &bindings, &claims, floor).await {
                Ok(result) => result,
                Err(reason) => return self.refuse_join(&frame, &claims, reason).await,
            };
        // Snapshot the history and go live under the history lock: the router appends and
        // routes under it too, so every change is either in the snapshot or delivered live.
        let history = self.state.history.lock().await;
        // Where this subscription starts: everything after `head` reaches it (replayed or live),
        // so a client that receives nothing before its next reconnect can resume from here.
        let head = (history.head(), history.epoch().to_string());
        let replay =
            resume.as_ref().map(|(epoch, position)| (history.since(epoch, *position), head.1.clone()));
        self.state.index_insert(&subscriptions);
        drop(history);
        let config = |pointer: &str| frame.payload.pointer(pointer);
        let receive_own = config("/config/broadcast/self").and_then(Value::as_bool).unwrap_or(false);
        let ack = config("/config/broadcast/ack").and_then(Value::as_bool).unwrap_or(false);
        let presence_enabled = config("/config/presence/enabled").and_then(Value::as_bool).unwrap_or(false);
        let presence_key = config("/config/presence/key")
            .and_then(Value::as_str)
            .filter(|key| !key.is_empty())
            .map(Box::from);
        let member =
            crate::broadcast::Member { session: self.handle.clone(), can_read: access.read, receive_own };
        let broadcast_replay = match parse_broadcast_resume(&frame.payload) {
            Ok(Some((seq, epoch))) => Some(self.state.hub.join_resuming(&topic, member, seq, &epoch)),
            Ok(None) => {
                self.state.hub.join(&topic, member);
                None
            }
            Err(reason) => {
                self.state.index_remove(&subscriptions);
                return self.refuse_join(&frame, &claims, reason).await;
            }
        };
        let expires_at = claims.expires_at();
        tracing::info!(
            session = self.handle.id,
            topic = %frame.topic,
            role = %claims.role,
            user = claims.sub.as_deref().unwrap_or(""),
            bindings = subscriptions.len(),
            "joined"
        );
        let identity = claims.identity();
        self.audit(AuditEvent::new(Action::Join).identity(Some(&identity)).channel(&frame.topic));
        let has_changes = !subscriptions.is_empty();
        self.channels.insert(
            frame.topic.clone(),
            Box::new(JoinedChannel {
                join_ref: frame.join_ref.as_deref().map(Box::from),
                bindings: (!bindings.is_empty()).then(|| Value::from(bindings).to_string().into_boxed_str()),
                subscriptions,
                identity,
                expires_at,
                private,
                access,
                ack,
                presence_key,
                presence_synced: false,
            }),
        );
        metrics::gauge!("pgcast_channels").increment(1.0);
        if self.state.config.panic_on_join_topic.as_deref() == Some(frame.topic.as_str()) {
            // Fault injection for tests/session_panics.rs: a panic once the join holds
            // everything a join takes (subscriptions, hub membership, the user's slot).
            panic!("fault injection: panic_on_join_topic {:?}", frame.topic);
        }
        self.reply(&frame, "ok", json!({ "postgres_changes": response })).await?;
        if has_changes {
            let payload = json!({
                "message": "Subscribed to PostgreSQL",
                "status": "ok",
                "extension": "postgres_changes",
                "channel": channel_name(&frame.topic),
                "pgcast": { "position": head.0.to_string(), "epoch": head.1 },
            });
            let text = phoenix::encode(
                self.handle.wire.vsn(),
                frame.join_ref.as_deref(),
                None,
                &frame.topic,
                "system",
                &payload,
            );
            self.send_text(text).await?;
        }
        if let Some((result, epoch)) = replay {
            self.replay(&frame, result, &epoch).await?;
        }
        if let Some(result) = broadcast_replay {
            self.replay_broadcasts(&frame, result).await?;
        }
        if presence_enabled {
            self.sync_presence(&frame.topic).await?;
        }
        Ok(())
    }

    /// Sends the broadcasts a resuming member missed, or tells it to resync them.
    async fn replay_broadcasts(
        &mut self,
        frame: &Frame,
        result: Result<Vec<Message>, crate::broadcast::BroadcastResync>,
    ) -> Result<(), axum::Error> {
        let epoch = self.state.hub.epoch().to_string();
        let outcome = match result {
            Ok(messages) => {
                let replayed = messages.len();
                for message in messages {
                    self.socket.feed(message).await?;
                }
                Ok(format!("resumed: {replayed} missed broadcasts replayed"))
            }
            Err(reason) => Err(reason.to_string()),
        };
        self.send_resume_notice(frame, Some("broadcast"), outcome, &epoch).await
    }

    /// The `system` message (`extension: "pgcast"`) that ends a resume: `ok` with what was
    /// replayed, or `resync_required` with the reason and the current epoch.
    async fn send_resume_notice(
        &mut self,
        frame: &Frame,
        scope: Option<&str>,
        outcome: Result<String, String>,
        epoch: &str,
    ) -> Result<(), axum::Error> {
        let topic = frame.topic.as_str();
        let (status, message) = match outcome {
            Ok(message) => ("ok", message),
            Err(reason) => ("resync_required", format!("resync required: {reason}")),
        };
        let mut payload = json!({
            "message": message,
            "status": status,
            "extension": "pgcast",
            "channel": channel_name(topic),
            "epoch": epoch,
        });
        if let Some(scope) = scope {
            payload["scope"] = json!(scope);
        }
        let text = phoenix::encode(
            self.handle.wire.vsn(),
            frame.join_ref.as_deref(),
            None,
            topic,
            "system",
            &payload,
        );
        self.send_text(text).await
    }

    /// Sends a resuming channel what it missed (written before anything queued live), or tells
    /// it to resync.
    async fn replay(
        &mut self,
        frame: &Frame,
        entries: Result<Vec<(Position, Arc<Transaction>, usize)>, ResyncReason>,
        epoch: &str,
    ) -> Result<(), axum::Error> {
        let topic = frame.topic.as_str();
        let entries = match entries {
            Ok(entries) => entries,
            Err(reason) => {
                metrics::counter!("pgcast_resyncs_total").increment(1);
                return self.send_resume_notice(frame, None, Err(reason.to_string()), epoch).await;
            }
        };
        let subscriptions = self.channels.get(topic).map(|c| c.subscriptions.clone()).unwrap_or_default();
        let mut index = Index::default();
        for sub in subscriptions {
            index.insert(sub);
        }
        let index = std::sync::RwLock::new(index);
        let mut fanout = Fanout::default();
        let mut messages = Vec::new();
        for (position, tx, i) in &entries {
            let mut collect = |_: &Arc<SessionHandle>, message: Message| {
                messages.push(message);
                true
            };
            let rls = self.state.rls.as_deref();
            fanout.route(tx, &tx.changes[*i], *position, epoch, &index, rls, &mut collect).await;
        }
        let replayed = messages.len();
        for message in messages {
            self.socket.feed(message).await?;
        }
        self.socket.flush().await?;
        metrics::counter!("pgcast_replayed_total").increment(replayed as u64);
        let message = format!("resumed: {replayed} missed changes replayed");
        self.send_resume_notice(frame, None, Ok(message), epoch).await
    }

    async fn refuse_join(
        &mut self,
        frame: &Frame,
        claims: &Claims,
        reason: String,
    ) -> Result<(), axum::Error> {
        metrics::counter!("pgcast_joins_refused_total").increment(1);
        self.audit(
            AuditEvent::new(Action::JoinRefused)
                .claims(Some(claims))
                .channel(&frame.topic)
                .detail(reason.clone()),
        );
        self.reply_error(frame, reason).await
    }

    /// Records an audit event with this connection's address.
    fn audit(&self, event: AuditEvent) {
        self.state.audit.record(event.peer(Some(self.peer)));
    }

    fn leave(&mut self, topic: &str) {
        let Some(channel) = self.channels.remove(topic) else { return };
        self.audit(AuditEvent::new(Action::Leave).identity(Some(&channel.identity)).channel(topic));
        self.state.index_remove(&channel.subscriptions);
        self.state.hub.leave(topic, self.handle.id);
        if let Some(diff) = self.state.presence.untrack(topic, self.handle.id) {
            self.state.deliver_presence_diff(topic, &diff);
        }
        metrics::gauge!("pgcast_channels").decrement(1.0);
        tracing::info!(session = self.handle.id, topic, "left");
    }

    fn leave_all(&mut self) {
        let topics: Vec<String> = self.channels.keys().cloned().collect();
        for topic in topics {
            self.leave(&topic);
        }
    }

    /// Tells the client a channel is closed by the server: a `system` error, then `phx_close`.
    async fn close_channel(&mut self, topic: &str, message: String) -> Result<(), axum::Error> {
        let join_ref = self.channels.get(topic).and_then(|c| c.join_ref.clone());
        self.leave(topic);
        let payload = json!({
            "message": message,
            "status": "error",
            "extension": "system",
            "channel": channel_name(topic),
        });
        let vsn = self.handle.wire.vsn();
        self.send_text(phoenix::encode(vsn, join_ref.as_deref(), None, topic, "system", &payload)).await?;
        self.send_text(phoenix::encode(vsn, join_ref.as_deref(), None, topic, "phx_close", &json!({}))).await
    }

    /// `access_token`: the channel continues under the new token. Its subscriptions are bound
    /// again with the new claims, so a changed `sub`, role or tenant takes effect at once.
    async fn refresh_token(&mut self, frame: Frame) -> Result<(), axum::Error> {
        let Some(token) = frame.payload.get("access_token").and_then(Value::as_str) else {
            return self.reply_error(&frame, "access_token payload needs an access_token string").await;
        };
        let claims = match self.state.verifier.verify(token) {
            Ok(claims) => claims,
            Err(e) => {
                metrics::counter!("pgcast_auth_failures_total").increment(1);
                let reason = format!("invalid access_token: {e}");
                self.audit(AuditEvent::new(Action::AuthFailure).channel(&frame.topic).detail(reason.clone()));
                return self.close_channel(&frame.topic, reason).await;
            }
        };
        let Some(channel) = self.channels.get(&frame.topic) else { return Ok(()) };
        let access = self.state.policy.channel_access(channel_name(&frame.topic), channel.private, &claims);
        if !access.admits(channel.bindings.is_some()) {
            let message =
                format!("role {:?} may not stay on channel {:?}", claims.role, channel_name(&frame.topic));
            return self.close_channel(&frame.topic, message).await;
        }
        let topic: Arc<str> = Arc::from(frame.topic.as_str());
        // Written by `join` from parsed JSON, so it parses.
        let bindings: Vec<Value> =
            channel.bindings.as_deref().and_then(|b| serde_json::from_str(b).ok()).unwrap_or_default();
        let subscriptions =
            match subscribe::subscribe(&self.state, &self.handle, &topic, &bindings, &claims, None).await {
                Ok((subscriptions, _)) => subscriptions,
                Err(reason) => return self.close_channel(&frame.topic, reason).await,
            };
        let Some(channel) = self.channels.get_mut(&frame.topic) else { return Ok(()) };
        self.state.index_remove(&channel.subscriptions);
        self.state.index_insert(&subscriptions);
        channel.subscriptions = subscriptions;
        channel.expires_at = claims.expires_at();
        channel.identity = claims.identity();
        channel.access = access;
        let receive_own = self.state.hub.receives_own(&frame.topic, self.handle.id);
        self.state.hub.join(
            &topic,
            crate::broadcast::Member { session: self.handle.clone(), can_read: access.read, receive_own },
        );
        self.audit(AuditEvent::new(Action::TokenRefresh).claims(Some(&claims)).channel(&frame.topic));
        self.reply(&frame, "ok", json!({})).await
    }

    async fn expire_channels(&mut self) -> Result<(), axum::Error> {
        let now = Instant::now();
        let expired: Vec<String> =
            self.channels.iter().filter(|(_, c)| c.expires_at <= now).map(|(t, _)| t.clone()).collect();
        for topic in expired {
            let exp = self.channels.get(&topic).map(|c| c.identity.exp).unwrap_or(0);
            let ago = crate::auth::now_secs().saturating_sub(exp);
            self.close_channel(&topic, format!("Token has expired {ago} seconds ago")).await?;
        }
        Ok(())
    }
}

/// Sends a Close frame and waits for the client's (RFC 6455 7.1.1), discarding what it sent
/// before it. Closing a socket with unread bytes makes the kernel reset the connection, and the
/// reset can destroy the close frame (with its reason) before the client reads it; a flooding
/// client always has unread bytes.
async fn close_handshake(socket: &mut WebSocket, frame: CloseFrame) -> Result<(), axum::Error> {
    socket.send(Message::Close(Some(frame))).await?;
    while let Some(Ok(message)) = socket.recv().await {
        if matches!(message, Message::Close(_)) {
            break;
        }
    }
    Ok(())
}

impl Drop for Session {
    /// However the session ends (returned, cut off, or unwinding from a panic), what it holds is
    /// released and it stops counting as a connection.
    fn drop(&mut self) {
        self.release();
        metrics::gauge!("pgcast_connections").decrement(1.0);
    }
}

/// `config.resume: {position, epoch}` of a join: where a returning client left off.
fn parse_resume(payload: &Value) -> Result<Option<(String, Position)>, String> {
    let Some(resume) = payload.pointer("/config/resume").filter(|v| !v.is_null()) else { return Ok(None) };
    if resume.get("position").is_none() && resume.get("epoch").is_none() {
        // Only `resume.broadcast` was given.
        return Ok(None);
    }
    let position =
        resume.get("position").and_then(Value::as_str).ok_or("config.resume needs a position string")?;
    let epoch = resume.get("epoch").and_then(Value::as_str).ok_or("config.resume needs an epoch string")?;
    Ok(Some((epoch.to_string(), position.parse()?)))
}

/// `config.resume.broadcast: {seq, epoch}`: the last broadcast a returning client received.
fn parse_broadcast_resume(payload: &Value) -> Result<Option<(u64, String)>, String> {
    let Some(resume) = payload.pointer("/config/resume/broadcast").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let seq =
        resume.get("seq").and_then(Value::as_u64).ok_or("config.resume.broadcast needs a numeric seq")?;
    let epoch =
        resume.get("epoch").and_then(Value::as_str).ok_or("config.resume.broadcast needs an epoch")?;
    Ok(Some((seq, epoch.to_string())))
}

/// Longest topic a channel may have: what realtime-js's binary broadcast frame can carry (a
/// one-byte length), far above any real channel name.
pub const MAX_TOPIC_BYTES: usize = 255;

/// Whether `topic` can name a channel: at most [`MAX_TOPIC_BYTES`], no control characters, and
/// a name after `realtime:` (Supabase: "You must provide a topic name").
pub fn check_topic(topic: &str) -> Result<(), String> {
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(format!("invalid topic: longer than {MAX_TOPIC_BYTES} bytes ({} bytes)", topic.len()));
    }
    if topic.chars().any(char::is_control) {
        let shown = crate::text::clip(topic, crate::text::NAME_CHARS);
        return Err(format!("invalid topic {shown}: control characters are not allowed"));
    }
    if topic.is_empty() || topic == "realtime:" {
        return Err("invalid topic: you must provide a topic name".into());
    }
    Ok(())
}

/// `realtime:room1` -> `room1`.
pub(crate) fn channel_name(topic: &str) -> &str {
    topic.strip_prefix("realtime:").unwrap_or(topic)
}
