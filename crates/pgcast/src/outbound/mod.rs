//! What producers (the router, the broadcast hub, presence) hand to a connection, and the handle
//! they hand it through: shared, pre-encoded bytes ([`Outbound`]) pushed onto a bounded queue
//! that never waits ([`SessionHandle::deliver`]); a full queue cuts the connection off with a
//! reason instead of growing memory.
//!
//! A leaf below the router and the session: it knows nothing of protocols beyond the
//! [`Wire`] a connection speaks, and nothing of how a session reads or writes its socket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::Message;
use tokio::sync::Notify;

use crate::protocol::Wire;

pub mod feed;
mod queue;

pub use queue::{PushError, Queue};

/// Close codes pgcast ends connections with (WebSocket's; other transports render the reason).
pub mod close_code {
    pub const GOING_AWAY: u16 = 1001;
    pub const TOO_BIG: u16 = 1009;
    /// The client broke the WebSocket protocol (RFC 6455 7.4.1).
    pub const PROTOCOL_ERROR: u16 = 1002;
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
    /// The connection's token expired (Socket.IO: one token for every room).
    pub const TOKEN_EXPIRED: u16 = 4004;
    /// A recovering Socket.IO connection took this session over (its transport is dropped,
    /// the session goes on there). Any later reason overrides it.
    pub const REPLACED: u16 = 4005;
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
    pub fn len(&self) -> usize {
        match self {
            Frames::One(_) => 1,
            Frames::Run(run) => run.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

/// The producers' view of a session: where to put messages, and how to cut it off.
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
    /// A handle with a new session id and an empty queue of `capacity` frames.
    pub fn new(wire: Wire, capacity: usize) -> SessionHandle {
        SessionHandle {
            id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
            wire,
            queue: Queue::new(capacity),
            kick_reason: Mutex::new(None),
            kick: Notify::new(),
        }
    }

    /// A handle with no connection behind it, for tests of what producers queue.
    #[cfg(test)]
    pub fn detached(capacity: usize) -> Arc<SessionHandle> {
        Arc::new(SessionHandle::new(Wire::PhoenixV2, capacity))
    }

    /// Everything queued so far (tests).
    #[cfg(test)]
    pub fn take_queued(&self) -> Vec<Outbound> {
        let mut out = Vec::new();
        self.queue.take(&mut out, usize::MAX);
        out
    }

    /// The queue the session's writer drains.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Queues a message; if the queue is full the session is cut off (it will be closed with a
    /// reason) and `false` is returned.
    pub fn deliver(&self, message: Outbound) -> bool {
        self.queued(self.queue.try_push(message))
    }

    /// Whether a push was taken; a full queue cuts the session off.
    fn queued(&self, pushed: Result<(), PushError>) -> bool {
        match pushed {
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

    /// Queues a marker for a topic feed's new entries (see `feed`); like [`deliver`], a full
    /// queue cuts the session off and `false` is returned.
    ///
    /// [`deliver`]: SessionHandle::deliver
    pub fn notify_feed(&self, membership: Arc<feed::Membership>) -> bool {
        self.queued(self.queue.notify_feed(membership))
    }

    /// How a kicked session ends: the code and reason it is closed with (counted as a slow
    /// consumer if that was the reason).
    pub fn kicked(&self) -> (u16, String) {
        let (code, reason) = self
            .kick_reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or((close_code::GOING_AWAY, "closed by server".into()));
        if code == close_code::SLOW_CONSUMER {
            metrics::counter!("pgcast_slow_consumers_total").increment(1);
        }
        (code, reason)
    }

    /// The code the session was asked to close with, if it was.
    pub fn kick_code(&self) -> Option<u16> {
        self.kick_reason
            .lock()
            .map(|r| r.as_ref().map(|(code, _)| *code))
            .unwrap_or(Some(close_code::GOING_AWAY))
    }

    pub fn is_kicked(&self) -> bool {
        self.kick_reason.lock().map(|r| r.is_some()).unwrap_or(true)
    }

    /// Asks the session to close with `code` and `reason` (the first reason wins, but for
    /// `REPLACED`: a cut-off after it, such as an overflowing queue, still counts).
    pub fn kick(&self, code: u16, reason: String) {
        if let Ok(mut slot) = self.kick_reason.lock() {
            let replaceable = slot.as_ref().is_none_or(|(code, _)| *code == close_code::REPLACED);
            if replaceable {
                let first = slot.is_none();
                *slot = Some((code, reason));
                if first {
                    self.kick.notify_one();
                }
            }
        }
    }

    /// Whether the session was only asked to move to another connection (`REPLACED`): then
    /// the request is withdrawn and `true` returned, so the connection taking it over runs it.
    pub fn take_over(&self) -> bool {
        let Ok(mut slot) = self.kick_reason.lock() else { return false };
        match &*slot {
            Some((code, _)) if *code == close_code::REPLACED => {
                *slot = None;
                true
            }
            None => true,
            Some(_) => false,
        }
    }

    /// Resolves once the session is asked to close.
    pub async fn kick_requested(&self) {
        self.kick.notified().await
    }
}
