//! A topic's broadcast feed: for a topic with many members, a broadcast is appended here once
//! (encoded once per wire its members speak) and each member's writer takes the entries it has
//! not written yet, from a cursor of its own, when it next writes. The producer touches a
//! member only to flag it (one atomic swap) and, if it was not flagged already, to queue one
//! marker ([`Queue::notify_feed`](super::Queue)); the writer expands the marker into every
//! entry past its cursor. So a member that lags behind a fast topic costs the producer a flag,
//! not a queue push per broadcast (ten thousand pushes per broadcast were the room broadcast's
//! largest cost, cache misses on every member's queue).
//!
//! Bounded: a feed keeps its last `capacity` entries. A member still flagged whose cursor is
//! about to be overrun is cut off as a slow consumer by the producer, as a full queue is.
//!
//! Not here: who is a member and which topics have a feed (`broadcast::Hub`), encoding
//! (`protocol`). Postgres changes, replies and presence go through the queue as before.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Frames, Outbound};
use crate::protocol::Wire;

/// One broadcast, as each wire of the topic's members writes it (`None`: no member speaks it,
/// or the wire cannot carry it).
#[derive(Debug)]
pub struct Entry {
    pub frames: [Option<Frames>; Wire::COUNT],
    /// The session that sent it, if a member did: skipped for it unless it asked for its own.
    pub sender: Option<u64>,
}

#[derive(Debug)]
pub struct Feed {
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    entries: VecDeque<Entry>,
    /// The number of the entry after the newest (the first entry is number `next - len`).
    next: u64,
}

impl Feed {
    pub fn new(capacity: usize) -> Feed {
        Feed { capacity: capacity.max(1), state: Mutex::new(State::default()) }
    }

    /// Appends an entry (dropping the oldest past the capacity); returns the number of the
    /// oldest entry still kept, below which a member's cursor has been overrun.
    pub fn append(&self, entry: Entry) -> u64 {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.entries.push_back(entry);
        state.next += 1;
        while state.entries.len() > self.capacity {
            state.entries.pop_front();
        }
        state.next - state.entries.len() as u64
    }

    /// The number the next entry will have: a member joining now starts there.
    pub fn next(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).next
    }

    /// Entries kept at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// One member's place in a topic's feed, shared by the producer (which flags it) and the
/// member's writer (which reads from it).
#[derive(Debug)]
pub struct Membership {
    feed: Arc<Feed>,
    session: u64,
    wire: Wire,
    receive_own: bool,
    /// A marker is queued for this membership and not yet expanded.
    pending: AtomicBool,
    /// The number of the next entry this member has not been handed.
    cursor: AtomicU64,
    /// The member left (or was replaced): a marker still queued expands to nothing.
    left: AtomicBool,
}

impl Membership {
    /// A membership starting after everything in `feed` now (call it where no entry can be
    /// appended meanwhile: the hub holds its topic lock).
    pub fn new(feed: &Arc<Feed>, session: u64, wire: Wire, receive_own: bool) -> Membership {
        Membership {
            feed: Arc::clone(feed),
            session,
            wire,
            receive_own,
            pending: AtomicBool::new(false),
            cursor: AtomicU64::new(feed.next()),
            left: AtomicBool::new(false),
        }
    }

    /// Flags the membership after an append; `true` if it was not flagged, so the caller
    /// queues a marker. A member that was flagged already may have been overrun: the caller
    /// asks [`Membership::overrun`] with what [`Feed::append`] returned.
    pub fn flag(&self) -> bool {
        !self.pending.swap(true, Ordering::AcqRel)
    }

    /// Whether entries this member was not handed have been dropped from the feed.
    pub fn overrun(&self, oldest: u64) -> bool {
        self.cursor.load(Ordering::Acquire) < oldest
    }

    /// Whether it gets its own broadcasts (`config.broadcast.self`).
    pub fn receive_own(&self) -> bool {
        self.receive_own
    }

    pub fn leave(&self) {
        self.left.store(true, Ordering::Release);
    }

    /// The number the feed's next entry will have (where a marker is sealed).
    pub fn feed_end(&self) -> u64 {
        self.feed.next()
    }

    /// The writer's side of a marker: every entry past the cursor (up to `until`, a seal),
    /// for this member's wire, as queue entries appended to `out`; returns whether entries
    /// past `until` are left. The flag is cleared first, so an entry appended during the
    /// read flags the member again (its marker then finds it, or finds nothing if this read
    /// took it: the cursor never hands an entry twice).
    pub fn expand(&self, out: &mut Vec<Outbound>, until: Option<u64>) -> bool {
        self.pending.store(false, Ordering::Release);
        if self.left.load(Ordering::Acquire) {
            return false;
        }
        let state = self.feed.state.lock().unwrap_or_else(|p| p.into_inner());
        let first = state.next - state.entries.len() as u64;
        let end = until.map_or(state.next, |until| until.min(state.next));
        let cursor = self.cursor.load(Ordering::Acquire).max(first);
        if cursor >= end {
            return end < state.next;
        }
        let skip = usize::try_from(cursor - first).unwrap_or(usize::MAX);
        let take = usize::try_from(end - cursor).unwrap_or(usize::MAX);
        for entry in state.entries.iter().skip(skip).take(take) {
            if entry.sender == Some(self.session) && !self.receive_own {
                continue;
            }
            if let Some(frames) = &entry.frames[self.wire.slot()] {
                out.push(Outbound { frames: frames.clone(), commit_time_micros: 0 });
            }
        }
        self.cursor.store(end, Ordering::Release);
        end < state.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ws::Message;

    fn entry(text: &str, sender: Option<u64>) -> Entry {
        let mut frames: [Option<Frames>; Wire::COUNT] = Default::default();
        frames[Wire::PhoenixV2.slot()] = Some(Frames::One(Message::Text(text.into())));
        Entry { frames, sender }
    }

    fn texts(out: &[Outbound]) -> Vec<String> {
        out.iter()
            .map(|o| match &o.frames {
                Frames::One(Message::Text(t)) => t.to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_member_gets_each_entry_after_its_join_once_in_order() {
        let feed = Arc::new(Feed::new(10));
        feed.append(entry("before", None));
        let member = Membership::new(&feed, 1, Wire::PhoenixV2, false);
        feed.append(entry("a", None));
        assert!(member.flag(), "the first append queues a marker");
        feed.append(entry("b", None));
        assert!(!member.flag(), "already flagged: no second marker");
        let mut out = Vec::new();
        assert!(!member.expand(&mut out, None));
        assert_eq!(texts(&out), ["a", "b"]);
        out.clear();
        member.expand(&mut out, None);
        assert!(out.is_empty(), "a stale marker hands nothing twice");
        feed.append(entry("c", None));
        assert!(member.flag(), "expanded: the next append queues a marker again");
        member.expand(&mut out, None);
        assert_eq!(texts(&out), ["c"]);
    }

    #[test]
    fn own_broadcasts_other_wires_and_left_members_get_nothing() {
        let feed = Arc::new(Feed::new(10));
        let sender = Membership::new(&feed, 7, Wire::PhoenixV2, false);
        let own = Membership::new(&feed, 7, Wire::PhoenixV2, true);
        let socketio = Membership::new(&feed, 8, Wire::SocketIo, false);
        let gone = Membership::new(&feed, 9, Wire::PhoenixV2, false);
        feed.append(entry("mine", Some(7)));
        gone.leave();
        let mut out = Vec::new();
        sender.expand(&mut out, None);
        socketio.expand(&mut out, None);
        gone.expand(&mut out, None);
        assert!(out.is_empty(), "own broadcast, no frames for its wire, left");
        own.expand(&mut out, None);
        assert_eq!(out.len(), 1, "config.broadcast.self");
    }

    #[test]
    fn a_sealed_marker_stops_at_its_seal_and_says_more_is_left() {
        let feed = Arc::new(Feed::new(10));
        let member = Membership::new(&feed, 1, Wire::PhoenixV2, false);
        feed.append(entry("a", None));
        let seal = member.feed_end();
        feed.append(entry("b", None));
        let mut out = Vec::new();
        assert!(member.expand(&mut out, Some(seal)), "b is past the seal");
        assert_eq!(texts(&out), ["a"]);
        assert!(!member.expand(&mut out, None));
        assert_eq!(texts(&out), ["a", "b"]);
    }

    #[test]
    fn a_lagging_member_is_overrun_past_the_capacity() {
        let feed = Arc::new(Feed::new(3));
        let member = Membership::new(&feed, 1, Wire::PhoenixV2, false);
        let mut oldest = 0;
        for n in 0..3 {
            oldest = feed.append(entry(&n.to_string(), None));
        }
        assert!(!member.overrun(oldest), "three kept, none missed");
        oldest = feed.append(entry("3", None));
        assert!(member.overrun(oldest));
        let mut out = Vec::new();
        member.expand(&mut out, None);
        assert_eq!(texts(&out), ["1", "2", "3"], "what is kept, never a duplicate");
    }
}
