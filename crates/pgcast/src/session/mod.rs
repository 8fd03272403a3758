//! One client connection, split the way centrifuge splits a client from its transports and
//! protocols:
//!
//! - the **core** ([`Core`], here and in `join.rs`, `messages.rs`): joined channels, policies,
//!   limits, resume, what the connection holds in shared state and its release. It decides and
//!   records (metrics, audit); it writes nothing to the client.
//! - the **protocol adapter** (a [`Protocol`]; `phoenix.rs` for Supabase Realtime): reads client
//!   frames into requests for the core and renders the core's answers and refusals as frames.
//! - the **transport** (`crate::transport`: a WebSocket, or Engine.IO's polling and WebSocket):
//!   frames in, frames out, close.
//!
//! [`Session`] ties the three together and runs the connection: the bounded outbound queue the
//! router and the hub fill (see `outbound`), the batching writer, the heartbeat, token-expiry
//! and auth deadlines, and the rate limit every client frame is counted against before it is
//! parsed. Replies to the client's own frames are written directly, so they are never stuck
//! behind a backlog. Who receives which change is the router's business.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use crate::audit::AuditEvent;
use crate::auth::Identity;
use crate::outbound::{close_code, Outbound, SessionHandle};
use crate::protocol::Wire;
use crate::router::index::Subscription;
use crate::router::policy::ChannelAccess;
use crate::server::AppState;

pub mod error;
mod join;
mod messages;
pub mod phoenix;
pub mod recovery;
pub mod socketio;
pub mod sse;
mod subscribe;
pub mod supervise;

use crate::transport::{Incoming, Transport, TransportError};
pub use error::{JoinError, RefreshError, SendError, TokenError, TokenSource};
pub use join::{JoinRequest, Joined, Rules};

/// Most frames taken from the queue for one flush (a larger transaction goes whole).
const WRITE_BATCH: usize = 64;
/// A write of more frames than this marks a busy connection: the buffers its writes grew (the
/// batch, the transport's) are kept for the next write, and the queue's kept too, until it has
/// been quiet for [`TRIM_AFTER`]. Growing and freeing them on every write of a busy connection
/// cost a tenth of a room broadcast's CPU (allocator locks contended between the threads), and
/// a queue that must grow slows the hub that pushes one broadcast to every member. Smaller
/// writes give the batch and the transport's buffer back at once: held even for a second,
/// every idle connection's leftovers fragmented the heap (+0.6 KiB per idle connection).
const BUSY_WRITE_FRAMES: usize = 4;
/// Batch capacity kept between small writes.
const IDLE_BATCH: usize = 4;
/// How long a connection is quiet (nothing written) before what it kept is given back.
const TRIM_AFTER: Duration = Duration::from_secs(1);

/// The metrics every batch written updates, looked up once: at hundreds of thousands of writes
/// a second the registry lookup behind `metrics::counter!` cost more than the update itself.
/// (Sessions only run once the server has installed its recorder.)
struct WriteMeters {
    sent: metrics::Counter,
    commit_to_send: metrics::Histogram,
}

fn write_meters(wire: Wire) -> &'static WriteMeters {
    static METERS: std::sync::OnceLock<[WriteMeters; Wire::COUNT]> = std::sync::OnceLock::new();
    let meters = METERS.get_or_init(|| {
        Wire::ALL.map(|wire| WriteMeters {
            sent: metrics::counter!("pgcast_messages_sent_total", "protocol" => wire.protocol()),
            commit_to_send: metrics::histogram!("pgcast_commit_to_send_seconds"),
        })
    });
    &meters[wire.slot()]
}

/// A channel (a Phoenix channel, a Socket.IO room) this connection has joined.
pub struct JoinedChannel {
    /// The protocol's reference for this membership (Phoenix: the `join_ref`), echoed on what
    /// the server sends about the channel.
    pub join_ref: Option<Box<str>>,
    /// The join's `postgres_changes` bindings, kept (as compact JSON, not as parsed maps: this
    /// stays in memory for every joined channel) to re-bind them when the token changes.
    bindings: Option<Box<str>>,
    /// The `[[socketio.tables]]` bindings of a Socket.IO room or subscription, kept likewise.
    tables: Box<[crate::rooms::TableBinding]>,
    subscriptions: Vec<Arc<Subscription>>,
    /// Who joined, for audit records and the expiry: not every claim (see `Identity`).
    identity: Identity,
    expires_at: Instant,
    rules: Rules,
    access: ChannelAccess,
    /// `config.broadcast.ack`: broadcasts are acknowledged with a reply.
    ack: bool,
    /// `config.presence.key`; without one a key is generated when the connection first tracks
    /// presence (most joins never do, and each would otherwise hold a key it never uses).
    presence_key: Option<Box<str>>,
    /// Whether `presence_state` was sent (it must precede diffs for the client to apply them).
    presence_synced: bool,
}

/// The session core: what one connection holds and may do, whatever its protocol.
pub struct Core {
    handle: Arc<SessionHandle>,
    state: Arc<AppState>,
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

/// A connection that has presented no valid token yet: counted in `AppState::unauthenticated`
/// while it lives, with the time by which it must present one.
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

/// What the rate limit says of one client frame.
enum Admission {
    /// Within the rate: handle it.
    Admitted,
    /// Over the rate: dropped unread; the first drop in a second is told to the client.
    Dropped { notice: Option<String> },
}

impl Core {
    /// The core of a new connection. `unauthenticated` is given when the connection brought no
    /// (valid) `apikey`: it counts against `max_unauthenticated_connections` until a join
    /// verifies a token, and the connection is closed if none does in `auth_timeout`.
    pub fn new(
        state: Arc<AppState>,
        peer: SocketAddr,
        wire: Wire,
        apikey: Option<String>,
        unauthenticated: Option<Unauthenticated>,
    ) -> Core {
        let handle = Arc::new(SessionHandle::new(wire, state.config.outbound_queue));
        // Validated by the config (at least 1); the floor only keeps this total.
        let rate = NonZeroU32::new(state.config.max_messages_per_second).unwrap_or(NonZeroU32::MIN);
        let limiter = RateLimiter::direct(Quota::per_second(rate));
        // Counted here and uncounted in `Drop`: exactly once, however the session ends.
        metrics::gauge!("pgcast_connections").increment(1.0);
        metrics::gauge!("pgcast_connections_by_protocol", "protocol" => wire.protocol()).increment(1.0);
        Core {
            handle,
            state,
            peer,
            apikey: apikey.map(String::into_boxed_str),
            channels: HashMap::new(),
            limiter,
            counted_user: None,
            penalties: None,
            unauthenticated: unauthenticated.map(Box::new),
        }
    }

    pub fn id(&self) -> u64 {
        self.handle.id
    }

    pub fn wire(&self) -> Wire {
        self.handle.wire
    }

    /// Whether `topic` is joined.
    pub fn is_joined(&self, topic: &str) -> bool {
        self.channels.contains_key(topic)
    }

    /// Counts one client frame, valid or not, against the rate limit before any of it is
    /// parsed, so a flood of garbage costs no more than a flood of heartbeats. A client that
    /// sends twice its rate within a second (it is not slowing down) is cut off.
    fn admit_frame(&mut self) -> Admission {
        if self.limiter.check().is_ok() {
            return Admission::Admitted;
        }
        metrics::counter!("pgcast_rate_limited_total").increment(1);
        let rate = self.state.config.max_messages_per_second;
        let now = Instant::now();
        let penalties = self.penalties.get_or_insert_with(|| Box::new(Penalties::new(now)));
        let first_in_window = penalties.dropped_frame(now);
        if penalties.dropped >= rate.max(MIN_DROPS_BEFORE_CUT) {
            let reason = format!("rate limit exceeded: more than twice {rate} messages per second");
            self.handle.kick(close_code::POLICY_VIOLATION, reason);
            return Admission::Dropped { notice: None };
        }
        if !first_in_window {
            return Admission::Dropped { notice: None };
        }
        tracing::info!(session = self.handle.id, "rate limit exceeded; frames dropped");
        let notice = format!("rate limit exceeded: at most {rate} messages per second; frames are dropped");
        Admission::Dropped { notice: Some(notice) }
    }

    /// Counts a malformed frame (or an unusable topic); a client that keeps sending them
    /// (`MAX_MALFORMED` within `MALFORMED_WINDOW`) is cut off, and `true` says so.
    pub fn strike(&mut self) -> bool {
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

    /// Cuts the connection off with `code` and `reason` once the frame being handled is done.
    pub fn cut_off(&self, code: u16, reason: String) {
        self.handle.kick(code, reason);
    }

    /// Records an audit event with this connection's address.
    fn audit(&self, event: AuditEvent) {
        self.state.audit.record(event.peer(Some(self.peer)));
    }

    /// Gives back everything the connection holds in shared state: queued messages, channels
    /// (subscriptions, hub membership, presence), the per-user slot. Idempotent.
    fn release(&mut self) {
        self.handle.queue().close();
        self.leave_all();
        if let Some(user) = self.counted_user.take() {
            self.state.user_disconnected(&user);
        }
    }
}

impl Drop for Core {
    /// However the session ends (returned, cut off, or unwinding from a panic), what it holds is
    /// released and it stops counting as a connection.
    fn drop(&mut self) {
        self.release();
        metrics::gauge!("pgcast_connections").decrement(1.0);
        metrics::gauge!("pgcast_connections_by_protocol", "protocol" => self.handle.wire.protocol())
            .decrement(1.0);
    }
}

/// A protocol adapter: reads the client's frames into requests for the core and renders what
/// the core answers. Implemented once per wire protocol, on the session it drives.
pub trait Protocol: Send + Sized {
    /// One client frame (text or binary), already admitted by the rate limit.
    fn frame<T: Transport>(
        session: &mut Session<Self, T>,
        frame: Incoming,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Frames over the rate are being dropped: tells the client (once a second at most).
    fn rate_notice<T: Transport>(
        session: &mut Session<Self, T>,
        reason: &str,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// The server closed a channel (its token expired): tells the client why. The core has
    /// left the channel already; `channel` is the membership it had.
    fn channel_closed<T: Transport>(
        session: &mut Session<Self, T>,
        topic: &str,
        channel: Box<JoinedChannel>,
        reason: String,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// The server is about to close the connection with `code` and `reason`: what the protocol
    /// says first (the transport's close follows; a WebSocket carries the reason itself).
    fn closing<T: Transport>(
        _session: &mut Session<Self, T>,
        _code: u16,
        _reason: &str,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// What the protocol writes before anything queued (an event stream's opening).
    fn start<T: Transport>(
        _session: &mut Session<Self, T>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        async { Ok(()) }
    }

    /// Queued messages were taken to be written to the transport (Socket.IO keeps recent
    /// events for recovery). Once per batch.
    fn outgoing(&mut self, _batch: &[Outbound]) {}

    /// The transport is lost while the client may come back: the protocol may keep the core
    /// (Socket.IO parks it for recovery) and return `None`, or hand it back to be released.
    fn park(&mut self, core: Core) -> Option<Core> {
        Some(core)
    }
}

/// Why the session loop ended: how to close the connection, if at all.
enum Ending {
    /// The server closes, with this code and reason.
    Close(u16, String),
    /// The client closed; the transport may still owe it a reply.
    ClosedByClient,
    Gone,
    /// The protocol gave the session another core (a recovered Socket.IO session): the loop
    /// goes on with that core's queue.
    Adopted,
}

impl Ending {
    /// Whether the client lost its transport rather than leaving or being cut off: it may
    /// come back for what it missed.
    fn lost_transport(&self) -> bool {
        matches!(
            self,
            Ending::Gone
                | Ending::ClosedByClient
                | Ending::Close(close_code::HEARTBEAT_TIMEOUT | close_code::REPLACED, _)
        )
    }
}

/// A connection: the core, driven by a protocol adapter over a transport.
pub struct Session<P, T> {
    pub(crate) core: Core,
    pub(crate) protocol: P,
    pub(crate) transport: T,
}

impl<P: Protocol, T: Transport> Session<P, T> {
    pub fn new(core: Core, protocol: P, transport: T) -> Session<P, T> {
        Session { core, protocol, transport }
    }

    pub fn id(&self) -> u64 {
        self.core.handle.id
    }

    /// Runs the connection until the client leaves, is cut off, or the server shuts down.
    ///
    /// This future is most of what an idle connection's task holds for its whole life, so it
    /// is kept small. The session goes to the heap once, here: an `async fn` taking it by value
    /// keeps room for the argument *and* for the local it is moved into (measured: 568 bytes
    /// twice, and twice again in the ending), where a box costs a pointer. What runs only once
    /// (the opening, the ending) is boxed as well, so its state takes room only while it runs.
    pub fn run(self) -> impl Future<Output = ()> + Send {
        Box::new(self).drive()
    }

    async fn drive(mut self: Box<Self>) {
        tracing::info!(session = self.core.handle.id, peer = %self.core.peer, "client connected");
        let start = Box::pin(P::start(&mut self));
        let ending = match start.await {
            Ok(()) => self.watch().await,
            Err(_) => Ending::Gone,
        };
        let end = Box::pin(self.end(ending));
        end.await;
    }

    /// Serves the connection while watching for a kick and for the server's shutdown.
    ///
    /// They are watched here, outside `serve`: a client that stopped reading leaves `serve`
    /// blocked in a socket write, and must still be cut off. Watched once, they are
    /// registered once, not again on every message the loop writes (and again only when the
    /// session adopts another core).
    async fn watch(&mut self) -> Ending {
        loop {
            let handle = self.core.handle.clone();
            let mut shutdown = self.core.state.shutdown.clone();
            let serve = self.serve();
            tokio::pin!(serve);
            let ending = loop {
                tokio::select! {
                    biased;
                    _ = handle.kick_requested() => {
                        // A take-over withdrawn when this connection recovered the session
                        // (`SessionHandle::take_over`): not a request to close.
                        if !handle.is_kicked() {
                            continue;
                        }
                        let (code, reason) = handle.kicked();
                        break Ending::Close(code, reason);
                    }
                    _ = shutdown.wait() => break Ending::Close(close_code::GOING_AWAY, "server shutting down".into()),
                    ending = &mut serve => break ending,
                }
            };
            if !matches!(ending, Ending::Adopted) {
                return ending;
            }
        }
    }

    /// Ends the connection as `ending` says: parks it for a client that may come back, or
    /// releases what it holds and closes the transport.
    async fn end(mut self: Box<Self>, ending: Ending) {
        if ending.lost_transport() {
            let Session { core, mut protocol, mut transport } = *self;
            let id = core.handle.id;
            match protocol.park(core) {
                None => {
                    if matches!(ending, Ending::ClosedByClient) {
                        transport.closed_by_client().await;
                    }
                    tracing::info!(session = id, "client disconnected; session parked");
                    return;
                }
                Some(core) => *self = Session { core, protocol, transport },
            }
        }
        // Released before the close frame, so other members see this one leave at once; `Drop`
        // releases again (a no-op then) for a session that ends by panicking.
        self.core.release();
        match &ending {
            Ending::Close(code, reason) => {
                tracing::info!(session = self.core.handle.id, code, reason = %reason, "closing client");
                let _ = tokio::time::timeout(
                    crate::transport::CLOSE_TIMEOUT,
                    P::closing(&mut self, *code, reason),
                )
                .await;
                self.transport.close(*code, reason).await;
            }
            Ending::ClosedByClient => self.transport.closed_by_client().await,
            Ending::Gone | Ending::Adopted => {}
        }
        tracing::info!(session = self.core.handle.id, "client disconnected");
    }

    async fn serve(&mut self) -> Ending {
        let heartbeat_timeout = self.core.state.config.heartbeat_timeout;
        let mut heartbeat_deadline = Instant::now() + heartbeat_timeout;
        let handle = self.core.handle.clone();
        // Grows on demand and is trimmed after each write: idle connections hold no batch.
        let mut batch: Vec<Outbound> = Vec::new();
        let coalesce = self.core.state.config.write_coalesce;
        // When the last batch was written: a connection written to within `coalesce` is busy.
        let mut last_write: Option<Instant> = None;
        // When the buffers are next looked at for giving back (after a write; see TRIM_AFTER).
        let mut trim_at: Option<Instant> = None;
        // One timer for the heartbeat and the earliest token expiry, re-armed only when that
        // deadline moves: not on every wake, which under load is thousands a second.
        let timer = tokio::time::sleep_until(heartbeat_deadline);
        tokio::pin!(timer);
        loop {
            let expiry = self.core.channels.values().map(|c| c.expires_at).min();
            let auth = self.core.unauthenticated.as_ref().map(|u| u.deadline);
            let next = [expiry, auth, trim_at].into_iter().flatten().fold(heartbeat_deadline, Instant::min);
            if timer.deadline() != next {
                timer.as_mut().reset(next);
            }
            tokio::select! {
                biased;
                _ = handle.queue().pop_many(&mut batch, WRITE_BATCH) => {
                    // Recorded as soon as taken from the queue: if the transport fails, or this
                    // future is dropped (a take-over) before they are written, a recovering
                    // client still gets them.
                    self.taken(&batch);
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
                            let held = batch.len();
                            handle.queue().take(&mut batch, WRITE_BATCH - 1);
                            self.taken(&batch[held..]);
                        }
                    }
                    let Ok(busy) = self.write_batch(&mut batch).await else {
                        return Ending::Gone;
                    };
                    let now = Instant::now();
                    last_write = Some(now);
                    if busy {
                        trim_at.get_or_insert(now + TRIM_AFTER);
                    } else {
                        batch.shrink_to(IDLE_BATCH);
                        if trim_at.is_none() {
                            handle.queue().trim();
                        }
                    }
                }
                incoming = self.transport.recv() => {
                    heartbeat_deadline = Instant::now() + heartbeat_timeout;
                    let frame = match incoming {
                        Incoming::Close => return Ending::ClosedByClient,
                        Incoming::Gone => return Ending::Gone,
                        Incoming::TooBig => {
                            let max = self.core.state.config.max_message_bytes;
                            return Ending::Close(close_code::TOO_BIG, format!("message larger than {max} bytes"));
                        }
                        Incoming::Invalid(error) => {
                            return Ending::Close(error.close_code(), format!("protocol error: {error}"));
                        }
                        frame => frame,
                    };
                    let handled = match self.core.admit_frame() {
                        // Control frames count against the rate only.
                        Admission::Admitted if matches!(frame, Incoming::Control) => Ok(()),
                        // Boxed, like the other client-frame handlers: their state machines
                        // are large and would otherwise sit in every idle connection's task.
                        Admission::Admitted => Box::pin(P::frame(self, frame)).await,
                        Admission::Dropped { notice: Some(notice) } => {
                            Box::pin(P::rate_notice(self, &notice)).await
                        }
                        Admission::Dropped { notice: None } => Ok(()),
                    };
                    if handled.is_err() {
                        return Ending::Gone;
                    }
                    // Cut off for what it sent: close now, not after what is buffered.
                    if handle.is_kicked() {
                        let (code, reason) = handle.kicked();
                        return Ending::Close(code, reason);
                    }
                    if !Arc::ptr_eq(&handle, &self.core.handle) {
                        return Ending::Adopted;
                    }
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    if trim_at.is_some_and(|at| now >= at) {
                        // Written to since it was armed: look again a quiet period after that.
                        let busy_until = last_write.map(|w| w + TRIM_AFTER).filter(|t| *t > now);
                        trim_at = busy_until;
                        if busy_until.is_none() {
                            batch = Vec::new();
                            self.transport.trim();
                            handle.queue().trim();
                        }
                    }
                    if self.core.unauthenticated.as_ref().is_some_and(|u| now >= u.deadline) {
                        let within = self.core.state.config.auth_timeout.as_secs();
                        return Ending::Close(
                            close_code::AUTH_TIMEOUT,
                            format!("no valid token within {within}s: connect with an apikey or join with an access_token"),
                        );
                    }
                    if now >= heartbeat_deadline {
                        return Ending::Close(
                            close_code::HEARTBEAT_TIMEOUT,
                            format!("no heartbeat for {}s", heartbeat_timeout.as_secs()),
                        );
                    }
                    if expiry.is_some_and(|at| now >= at) && Box::pin(self.expire_channels()).await.is_err() {
                        return Ending::Gone;
                    }
                }
            }
        }
    }

    /// Messages taken from the queue to be written: the protocol may keep them (recovery).
    fn taken(&mut self, batch: &[Outbound]) {
        if !batch.is_empty() {
            self.protocol.outgoing(batch);
        }
    }

    /// Feeds a batch of queued messages and flushes once; returns whether it was a busy
    /// connection's write (more than [`BUSY_WRITE_FRAMES`]), whose transport keeps its buffer
    /// for the next.
    async fn write_batch(&mut self, batch: &mut Vec<Outbound>) -> Result<bool, TransportError> {
        let oldest = batch.iter().map(|m| m.commit_time_micros).min().unwrap_or(0);
        let count: usize = batch.iter().map(|m| m.frames.len()).sum();
        let busy = count > BUSY_WRITE_FRAMES;
        self.transport.write_batch(batch).await?;
        if !busy {
            self.transport.trim();
        }
        let meters = write_meters(self.core.handle.wire);
        meters.sent.increment(count as u64);
        if oldest > 0 {
            let now = crate::clock::now_micros();
            meters.commit_to_send.record((now - oldest).max(0) as f64 / 1e6);
        }
        Ok(busy)
    }

    /// Closes every channel whose token has expired, telling the client why.
    async fn expire_channels(&mut self) -> Result<(), TransportError> {
        for (topic, reason) in self.core.expired() {
            if let Some(channel) = self.core.leave(&topic) {
                P::channel_closed(self, &topic, channel, reason).await?;
            }
        }
        Ok(())
    }
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
