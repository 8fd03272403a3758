//! Socket.IO connection state recovery (socket.io 4.6's `connectionStateRecovery`): a connected
//! session whose transport is lost is *parked* — its core keeps its rooms, subscriptions and
//! outbound queue, so changes and broadcasts keep arriving for it — for the recovery window.
//! A client that comes back within it with the `pid` and the last `offset` it read gets what it
//! missed, in order, before the CONNECT reply, and its rooms as they were.
//!
//! What was written but lost in flight is served from [`Sent`]: the last events written to the
//! connection, shared bytes (the same copy every recipient got), at most `SENT_MAX` of them
//! and none older than the window. An offset that is not there (older, or from another
//! process) cannot be served exactly, so the client gets a fresh session (`recovered` false)
//! instead: never a silent gap.
//!
//! A client that comes back while the server still thinks its old transport alive (a cut
//! long-poll is only noticed at the ping timeout) takes that session over: the old transport
//! is dropped (`close_code::REPLACED`), the session parks, and the new connection recovers it.
//!
//! Not here: the wire (`protocol::socketio`: offsets on events), the decisions of the CONNECT
//! packet (`socketio.rs`). In memory, one process: a restarted server recovers nobody.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::ws::Message;
use tokio::time::Instant;

use super::Core;
use crate::outbound::{close_code, SessionHandle};
use crate::protocol::socketio::offset_of;

/// How long a recovering connection waits for the session it takes over to park.
const TAKEOVER_WAIT: Duration = Duration::from_secs(2);

/// Most events kept per connection for recovery.
pub const SENT_MAX: usize = 1024;

/// The offset of a connection that has received no event yet.
pub const START: &str = "0";

/// The last events written to one connection, oldest first; a binary event is followed by
/// its attachment.
#[derive(Default)]
pub struct Sent {
    events: VecDeque<(Instant, Message)>,
    /// Whether an event was dropped from the front: a client that read nothing cannot be
    /// served then.
    trimmed: bool,
    /// The last event recorded was a binary one whose attachment comes next.
    attachment_due: bool,
}

impl Sent {
    /// Records the events of what was taken to be written (and binary events' attachments);
    /// other frames (replies, errors) are not recovered. Called once per batch: this runs for
    /// every member of a room on every broadcast, so it reads one clock and parses nothing.
    pub fn record(&mut self, messages: impl Iterator<Item = Message>, window: Duration) {
        let now = Instant::now();
        while self.events.front().is_some_and(|(at, _)| now.duration_since(*at) > window)
            && self.drop_oldest()
        {}
        for message in messages {
            let (event, binary_event) = match &message {
                // What `recoverable_event` and `binary_event` write: they end with an offset.
                Message::Text(text) => {
                    let text = text.as_str();
                    (text.starts_with("42[") || text.starts_with("451-["), text.starts_with("451-["))
                }
                Message::Binary(_) if self.attachment_due => (false, false),
                _ => continue,
            };
            self.attachment_due = binary_event;
            if event || matches!(message, Message::Binary(_)) {
                // Room is made before the push: the buffer never grows past SENT_MAX (pushing
                // first doubled it, for every member of a busy room).
                while self.events.len() >= SENT_MAX && self.drop_oldest() {}
                self.events.push_back((now, message));
            }
        }
    }

    /// Drops the oldest event (with its attachment), unless only the newest is left: its offset
    /// is the one an `error` event repeats. Returns whether one was dropped.
    fn drop_oldest(&mut self) -> bool {
        if self.events.iter().skip(1).all(|(_, m)| matches!(m, Message::Binary(_))) {
            return false;
        }
        self.events.pop_front();
        // An attachment goes with its event.
        while self.events.front().is_some_and(|(_, m)| matches!(m, Message::Binary(_))) {
            self.events.pop_front();
        }
        self.trimmed = true;
        true
    }

    /// The offset of the newest event written, [`START`] before any.
    pub fn last_offset(&self) -> &str {
        self.events.iter().rev().find_map(|(_, m)| offset_of(m)).unwrap_or(START)
    }

    /// The events written after `offset` (with their attachments), or `None` when that cannot
    /// be told exactly.
    pub fn after(&self, offset: Option<&str>) -> Option<Vec<Message>> {
        let offset = offset.unwrap_or(START);
        if offset == START {
            return (!self.trimmed).then(|| self.events.iter().map(|(_, m)| m.clone()).collect());
        }
        let at = self.events.iter().rposition(|(_, m)| offset_of(m) == Some(offset))?;
        // The attachment of the event at `offset` was read with it.
        let rest = self.events.iter().skip(at + 1).skip_while(|(_, m)| matches!(m, Message::Binary(_)));
        Some(rest.map(|(_, m)| m.clone()).collect())
    }
}

/// A parked session: its core (still a member of its rooms, still queueing), what was written
/// to it, and who it is.
pub struct Parked {
    pub core: Core,
    pub sid: Box<str>,
    pub sent: Option<Box<Sent>>,
    pub token: Option<Box<str>>,
    at: Instant,
}

impl Parked {
    pub fn new(core: Core, sid: Box<str>, sent: Option<Box<Sent>>, token: Option<Box<str>>) -> Parked {
        Parked { core, sid, sent, token, at: Instant::now() }
    }
}

/// A `pid`'s session: connected, or parked.
enum Slot {
    Live(Weak<SessionHandle>),
    Parked(Box<Parked>),
}

/// The Socket.IO endpoint's sessions by `pid`: the connected ones (to take over) and the
/// parked ones.
pub struct Recovery {
    window: Duration,
    slots: Mutex<HashMap<Box<str>, Slot>>,
}

impl Recovery {
    /// `window`: how long a session stays parked (`socketio.recovery_max_disconnection_secs`);
    /// zero turns recovery off.
    pub fn new(window: Duration) -> Recovery {
        Recovery { window, slots: Mutex::new(HashMap::new()) }
    }

    pub fn enabled(&self) -> bool {
        !self.window.is_zero()
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// A session connected under `pid`.
    pub fn connected(&self, pid: &str, handle: &Arc<SessionHandle>) {
        self.lock().insert(pid.into(), Slot::Live(Arc::downgrade(handle)));
    }

    /// The session connected under `pid` ended for good.
    pub fn forget(&self, pid: &str) {
        let mut slots = self.lock();
        if matches!(slots.get(pid), Some(Slot::Live(_))) {
            slots.remove(pid);
        }
    }

    pub fn park(&self, pid: Box<str>, parked: Parked) {
        tracing::info!(session = parked.core.id(), "Socket.IO session parked for recovery");
        let replaced = self.lock().insert(pid, Slot::Parked(Box::new(parked)));
        metrics::gauge!("pgcast_socketio_parked_sessions").increment(1.0);
        drop(replaced);
    }

    /// Takes the session parked as `pid`, unless it is gone or past the window. A session
    /// still connected under `pid` is taken over: its transport is dropped and, once it has
    /// parked (within `TAKEOVER_WAIT`), it is taken.
    pub async fn take(&self, pid: &str) -> Option<Parked> {
        let deadline = Instant::now() + TAKEOVER_WAIT;
        loop {
            let slot = {
                let mut slots = self.lock();
                match slots.get(pid) {
                    Some(Slot::Parked(_)) => slots.remove(pid),
                    Some(Slot::Live(handle)) => match handle.upgrade() {
                        Some(handle) => {
                            handle.kick(close_code::REPLACED, "replaced by a recovering connection".into());
                            None
                        }
                        None => slots.remove(pid),
                    },
                    None => return None,
                }
            };
            match slot {
                Some(Slot::Parked(parked)) => {
                    metrics::gauge!("pgcast_socketio_parked_sessions").decrement(1.0);
                    return (parked.at.elapsed() <= self.window).then_some(*parked);
                }
                Some(Slot::Live(_)) => return None,
                None if Instant::now() >= deadline => return None,
                None => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Ends the sessions parked longer than the window (their cores release what they hold
    /// when dropped, outside the lock).
    pub fn sweep(&self) {
        let expired: Vec<Slot> = {
            let mut slots = self.lock();
            let gone: Vec<Box<str>> = slots
                .iter()
                .filter(|(_, slot)| matches!(slot, Slot::Parked(p) if p.at.elapsed() > self.window))
                .map(|(pid, _)| pid.clone())
                .collect();
            gone.iter().filter_map(|pid| slots.remove(pid)).collect()
        };
        for slot in &expired {
            if let Slot::Parked(parked) = slot {
                tracing::info!(session = parked.core.id(), "parked Socket.IO session expired");
            }
        }
        metrics::gauge!("pgcast_socketio_parked_sessions").decrement(expired.len() as f64);
        drop(expired);
    }

    /// Ends every parked session (server shutdown).
    pub fn clear(&self) {
        let all: Vec<Slot> = self.lock().drain().map(|(_, slot)| slot).collect();
        drop(all);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Slot>> {
        self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::socketio::recoverable_event;

    fn event(offset: &str) -> Message {
        recoverable_event("e", "{}", offset)
    }

    fn offsets(messages: &[Message]) -> Vec<&str> {
        messages.iter().filter_map(offset_of).collect()
    }

    #[test]
    fn the_events_after_an_offset_are_served_and_an_unknown_offset_is_not() {
        let window = Duration::from_secs(60);
        let mut sent = Sent::default();
        assert_eq!(sent.last_offset(), START);
        assert_eq!(sent.after(None).map(|m| m.len()), Some(0));
        sent.record(["a1", "a2", "a3"].into_iter().map(event), window);
        sent.record(std::iter::once(Message::Text("43[{\"a\":1}]".into())), window);
        sent.record(std::iter::once(Message::Binary(vec![1].into())), window);
        assert_eq!(sent.last_offset(), "a3", "an ack, or bytes no event announced, are not recorded");
        assert_eq!(sent.after(Some("a2")).map(|m| m.len()), Some(1));
        assert_eq!(offsets(&sent.after(Some("a1")).unwrap()), ["a2", "a3"]);
        assert_eq!(offsets(&sent.after(Some("a3")).unwrap()), Vec::<&str>::new());
        assert_eq!(offsets(&sent.after(None).unwrap()), ["a1", "a2", "a3"]);
        assert!(sent.after(Some("zz")).is_none());
    }

    #[test]
    fn past_its_bound_the_oldest_go_and_a_client_that_read_nothing_is_not_served() {
        let mut sent = Sent::default();
        sent.record((0..SENT_MAX + 5).map(|i| event(&format!("o{i}"))), Duration::from_secs(60));
        assert_eq!(sent.events.len(), SENT_MAX);
        assert!(
            sent.events.capacity() < 2 * SENT_MAX,
            "room made before each push: the buffer never doubles"
        );
        assert!(sent.after(Some("o0")).is_none(), "dropped from the front");
        assert!(sent.after(None).is_none(), "from the start is no longer exact");
        let last = format!("o{}", SENT_MAX + 3);
        assert_eq!(offsets(&sent.after(Some(&last)).unwrap()).len(), 1);
    }

    #[test]
    fn a_binary_event_is_kept_and_served_with_its_attachment() {
        let window = Duration::from_secs(60);
        let mut sent = Sent::default();
        let [text, attachment] = crate::protocol::socketio::binary_event("file", &[1, 2, 3], "b1");
        sent.record([event("b0"), text].into_iter(), window);
        // The attachment in the next batch, then stray bytes.
        sent.record([attachment.clone(), Message::Binary(vec![9].into()), event("b2")].into_iter(), window);
        assert_eq!(sent.last_offset(), "b2");
        let after_b0 = sent.after(Some("b0")).unwrap();
        assert_eq!(after_b0.len(), 3, "the binary event, its attachment (not the stray bytes), b2");
        assert_eq!(after_b0[1], attachment);
        assert_eq!(offsets(&sent.after(Some("b1")).unwrap()), ["b2"], "b1's attachment was read with it");
    }

    #[test]
    fn offsets_are_read_only_from_frames_that_end_with_one() {
        assert_eq!(offset_of(&event("0000000001A2B3C4.00000003.1f")), Some("0000000001A2B3C4.00000003.1f"));
        assert_eq!(offset_of(&Message::Text("42[\"e\",\"text with spaces\"]".into())), None);
        assert_eq!(offset_of(&Message::Text("42[\"e\",{\"x\":\"y\"}]".into())), None);
        assert_eq!(offset_of(&Message::Text("43[\"a1\"]".into())), None);
        assert_eq!(offset_of(&Message::Binary(vec![1, 2].into())), None);
    }
}
