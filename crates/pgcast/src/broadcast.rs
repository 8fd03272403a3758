//! Channel membership and client-to-channel broadcast (Supabase Realtime's `broadcast`).
//!
//! The [`Hub`] knows, per topic, which sessions joined and whether they may receive; a
//! broadcast's payload is serialized once, encoded once per wire format (`protocol`), and the
//! shared bytes go to every receiving member's bounded queue — or, on a topic of at least
//! [`FEED_MIN_MEMBERS`], into the topic's feed (`outbound::feed`) once, each member flagged
//! to take it from there when its writer next runs.
//! Presence state lives in `presence`; postgres_changes never pass through here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::ws::Message;
use bytes::Bytes;

use crate::outbound::feed::{self, Feed, Membership};
use crate::outbound::{close_code, Frames, Outbound, SessionHandle};
use crate::protocol::BroadcastPayload;
use crate::protocol::{self, Body, PerWire, Place, Wire};

/// Members from which a topic's broadcasts go through a feed instead of every member's queue.
/// Below it the queue push is as cheap and the feed's entries would be memory for nothing; a
/// topic stays fed once it is (switching back and forth could reorder a member's messages).
pub const FEED_MIN_MEMBERS: usize = 64;

/// A member's standing on one topic.
#[derive(Debug, Clone)]
pub struct Member {
    pub session: Arc<SessionHandle>,
    /// May receive broadcasts and presence.
    pub can_read: bool,
    /// `config.broadcast.self`: receives its own broadcasts.
    pub receive_own: bool,
}

/// A member as the hub keeps it: with its place in the topic's feed, once the topic has one
/// (and if it may read).
#[derive(Debug)]
struct Seat {
    member: Member,
    feed: Option<Arc<Membership>>,
}

/// A payload serialized once, for every member's frame and for the history: JSON text takes
/// far less memory than the parsed tree it came from, and its size is what the budget counts.
#[derive(Debug, Clone)]
pub enum Serialized {
    Json(Arc<str>),
    Binary(Bytes),
}

impl Serialized {
    pub fn new(payload: &BroadcastPayload) -> Serialized {
        match payload {
            BroadcastPayload::Json(value) => Serialized::Json(Arc::from(value.to_string())),
            BroadcastPayload::Binary(bytes) => Serialized::Binary(bytes.clone()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Serialized::Json(text) => text.len(),
            Serialized::Binary(bytes) => bytes.len(),
        }
    }

    fn body(&self) -> Body<'_> {
        match self {
            Serialized::Json(text) => Body::Json(text),
            Serialized::Binary(bytes) => Body::Binary(bytes),
        }
    }
}

/// Recent broadcasts kept per topic for resuming members (besides the byte budget).
const RECENT_PER_TOPIC: usize = 1000;
/// Bytes a kept broadcast costs besides its payload and event name (the entry, the index).
const RECENT_OVERHEAD: usize = 96;

/// Bytes of broadcast history kept in memory (`broadcast_history_max_bytes`,
/// `broadcast_history_topic_max_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryBudget {
    pub max_bytes: usize,
    pub topic_max_bytes: usize,
}

#[derive(Debug, Clone)]
struct Recent {
    seq: u64,
    /// Order of arrival over all topics: the global budget evicts the oldest first.
    arrival: u64,
    event: Arc<str>,
    payload: Serialized,
    at: Instant,
}

impl Recent {
    fn cost(&self) -> usize {
        self.payload.len() + self.event.len() + RECENT_OVERHEAD
    }
}

struct Topic {
    members: HashMap<u64, Seat>,
    /// Members per wire format (a feed entry is encoded for the formats in use).
    wires: [usize; Wire::COUNT],
    /// The topic's feed, made when it first broadcasts with `FEED_MIN_MEMBERS` members.
    feed: Option<Arc<Feed>>,
    /// Sequence of the last broadcast on this topic.
    seq: u64,
    /// Broadcasts up to this sequence are not kept (evicted, or sent before the topic's state
    /// was made): a resume from before it must resync.
    floor: u64,
    recent: VecDeque<Recent>,
    bytes: usize,
}

impl Topic {
    /// A topic's state made now: it numbers on from `start` (the highest sequence the hub has
    /// issued), so a topic made again after it was dropped never reuses a number a client may
    /// hold, and a resume from before `start` cannot be taken for one with nothing missed.
    fn new(start: u64) -> Topic {
        Topic {
            members: HashMap::new(),
            wires: [0; Wire::COUNT],
            feed: None,
            seq: start,
            floor: start,
            recent: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Seats `member` (in place of its earlier seat, if it had one: a token refresh seats it
    /// again, and keeps its place in the feed, so what it was not handed yet still comes).
    fn seat(&mut self, member: Member) {
        let mut old = self.members.remove(&member.session.id);
        let kept = old
            .as_mut()
            .and_then(|old| old.feed.take_if(|m| member.can_read && m.receive_own() == member.receive_own));
        if let Some(old) = old {
            self.unseated(old);
        }
        let feed = kept.or_else(|| {
            self.feed.as_ref().filter(|_| member.can_read).map(|feed| {
                Arc::new(Membership::new(feed, member.session.id, member.session.wire, member.receive_own))
            })
        });
        self.wires[member.session.wire.slot()] += 1;
        self.members.insert(member.session.id, Seat { member, feed });
    }

    fn unseat(&mut self, session: u64) {
        if let Some(old) = self.members.remove(&session) {
            self.unseated(old);
        }
    }

    fn unseated(&mut self, seat: Seat) {
        self.wires[seat.member.session.wire.slot()] -= 1;
        if let Some(membership) = seat.feed {
            membership.leave();
        }
    }

    /// Gives the topic its feed, and every reader its place in it.
    fn start_feed(&mut self, capacity: usize) -> Arc<Feed> {
        let feed = Arc::new(Feed::new(capacity));
        for seat in self.members.values_mut().filter(|s| s.member.can_read) {
            let member = &seat.member;
            seat.feed = Some(Arc::new(Membership::new(
                &feed,
                member.session.id,
                member.session.wire,
                member.receive_own,
            )));
        }
        self.feed = Some(Arc::clone(&feed));
        feed
    }
}

/// Every topic's state, and the history's accounting across them.
#[derive(Default)]
struct Topics {
    map: HashMap<Arc<str>, Topic>,
    /// The highest sequence issued on any topic.
    high_water: u64,
    next_arrival: u64,
    /// Bytes of history kept over all topics.
    bytes: usize,
    /// Each topic with history, by the arrival of its oldest kept broadcast: the global budget
    /// evicts from the first, in O(log topics).
    oldest: BTreeMap<u64, Arc<str>>,
}

impl Topics {
    /// `name`'s state, made if there is none (keyed by `shared` when the caller holds the name
    /// in an `Arc` already: a channel on every connection should not copy its topic here).
    fn topic(&mut self, name: &str, shared: Option<&Arc<str>>) -> &mut Topic {
        let start = self.high_water;
        // Looked up first: `entry` would need an owned key for every broadcast.
        if !self.map.contains_key(name) {
            let key = shared.cloned().unwrap_or_else(|| Arc::from(name));
            self.map.insert(key, Topic::new(start));
        }
        self.map.get_mut(name).expect("inserted above")
    }

    /// Drops `topic`'s oldest kept broadcast, keeping the accounting; `false` if it had none.
    fn evict_oldest_of(&mut self, name: &str) -> bool {
        let Some(topic) = self.map.get_mut(name) else { return false };
        let Some(gone) = topic.recent.pop_front() else { return false };
        let cost = gone.cost();
        topic.bytes -= cost;
        topic.floor = gone.seq;
        self.bytes -= cost;
        self.oldest.remove(&gone.arrival);
        if let Some(next) = topic.recent.front() {
            self.oldest.insert(next.arrival, Arc::clone(self.map.get_key_value(name).expect("present").0));
        }
        metrics::counter!("pgcast_broadcast_history_evicted_total").increment(1);
        true
    }
}

/// Topic -> members, sequence and recent broadcasts.
pub struct Hub {
    topics: RwLock<Topics>,
    /// Broadcast history lives in memory: a new server is a new epoch.
    epoch: String,
    max_age: Duration,
    budget: HistoryBudget,
    /// Entries a topic feed keeps: a member further behind is a slow consumer.
    feed_capacity: usize,
}

/// Why a broadcast resume cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BroadcastResync {
    #[error("broadcast epoch {0} is not the current one (the server restarted)")]
    Epoch(String),
    #[error("broadcast {0} is older than the broadcasts kept for this topic")]
    TooOld(u64),
}

impl Hub {
    /// `feed_capacity`: broadcasts a member of a large topic may fall behind before it is cut
    /// off (the outbound queue's capacity, so both paths allow the same lag).
    pub fn new(max_age: Duration, budget: HistoryBudget, feed_capacity: usize) -> Hub {
        Hub {
            topics: RwLock::new(Topics::default()),
            epoch: crate::random::hex_id(),
            max_age,
            budget,
            feed_capacity,
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn join(&self, topic: &Arc<str>, member: Member) {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        topics.topic(topic, Some(topic)).seat(member);
    }

    /// Joins and returns what the member missed after broadcast `seq` of `epoch`, encoded for
    /// it, atomically with respect to new broadcasts (so nothing is missed or doubled).
    pub fn join_resuming(
        &self,
        topic: &Arc<str>,
        member: Member,
        seq: u64,
        epoch: &str,
    ) -> Result<Vec<Message>, BroadcastResync> {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let wire = member.session.wire;
        let state = topics.topic(topic, Some(topic));
        let can_read = member.can_read;
        state.seat(member);
        if epoch != self.epoch {
            return Err(BroadcastResync::Epoch(crate::text::clip(epoch, crate::text::NAME_CHARS)));
        }
        if seq < state.floor {
            return Err(BroadcastResync::TooOld(seq));
        }
        if !can_read {
            return Ok(Vec::new());
        }
        Ok(state
            .recent
            .iter()
            .filter(|r| r.seq > seq)
            .filter_map(|r| {
                let place = Place { seq: r.seq, epoch: &self.epoch, arrival: r.arrival };
                protocol::broadcast(wire, topic, &r.event, r.payload.body(), place)
            })
            .flat_map(|frames| match frames {
                Frames::One(message) => vec![message],
                Frames::Run(run) => run.to_vec(),
            })
            .collect())
    }

    /// Whether the member asked for its own broadcasts (`config.broadcast.self`).
    pub fn receives_own(&self, topic: &str, session: u64) -> bool {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        topics.map.get(topic).and_then(|t| t.members.get(&session)).is_some_and(|s| s.member.receive_own)
    }

    pub fn leave(&self, topic: &str, session: u64) {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = topics.map.get_mut(topic) {
            state.unseat(session);
            if state.members.is_empty() && state.recent.is_empty() {
                topics.map.remove(topic);
            }
        }
    }

    /// Members allowed to read `topic`, for presence delivery.
    pub fn readers(&self, topic: &str) -> Vec<Arc<SessionHandle>> {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        topics
            .map
            .get(topic)
            .map(|t| {
                t.members.values().filter(|s| s.member.can_read).map(|s| s.member.session.clone()).collect()
            })
            .unwrap_or_default()
    }

    /// Bytes of broadcast history held, over all topics.
    pub fn history_bytes(&self) -> usize {
        self.topics.read().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// Drops broadcasts past their age, and topics with neither members nor history.
    pub fn prune(&self) {
        let mut guard = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let topics = &mut *guard;
        let max_age = self.max_age;
        let aged: Vec<Arc<str>> = topics
            .map
            .iter()
            .filter(|(_, t)| t.recent.front().is_some_and(|r| r.at.elapsed() > max_age))
            .map(|(name, _)| name.clone())
            .collect();
        for name in aged {
            while topics
                .map
                .get(&name)
                .and_then(|t| t.recent.front())
                .is_some_and(|r| r.at.elapsed() > max_age)
            {
                topics.evict_oldest_of(&name);
            }
        }
        topics.map.retain(|_, state| !state.members.is_empty() || !state.recent.is_empty());
    }

    /// Sends a broadcast to every reader of `topic` (the sender only if it asked for its own)
    /// and keeps it for resuming members within the history's limits. Returns how many
    /// connections it was queued for.
    pub fn broadcast(
        &self,
        topic: &str,
        sender: Option<u64>,
        event: &str,
        payload: &BroadcastPayload,
    ) -> usize {
        // Serialized outside the lock, once for every member and the history.
        let payload = Serialized::new(payload);
        let mut guard = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let topics = &mut *guard;
        let arrival = topics.next_arrival;
        topics.next_arrival += 1;
        let state = topics.topic(topic, None);
        state.seq += 1;
        let seq = state.seq;
        let recent = Recent { seq, arrival, event: Arc::from(event), payload, at: Instant::now() };
        let cost = recent.cost();
        // Through its feed once it has one, or has reached the size for one.
        let fed = state.feed.is_some() || state.members.len() >= FEED_MIN_MEMBERS;
        let first_kept = state.recent.is_empty();
        state.recent.push_back(recent);
        state.bytes += cost;
        topics.bytes += cost;
        topics.high_water = topics.high_water.max(seq);
        if first_kept {
            let name = topics.map.get_key_value(topic).expect("made above").0.clone();
            topics.oldest.insert(arrival, name);
        }
        let place = Place { seq, epoch: &self.epoch, arrival };
        let delivered = if fed {
            self.deliver_to_feed(topics, topic, sender, place)
        } else {
            Self::deliver(topics, topic, sender, place)
        };
        self.evict_past_budget(topics, topic);
        metrics::counter!("pgcast_broadcasts_total").increment(1);
        metrics::counter!("pgcast_broadcast_deliveries_total").increment(delivered as u64);
        delivered
    }

    /// Queues `topic`'s newest broadcast for every reader, encoded once per wire format.
    fn deliver(topics: &Topics, topic: &str, sender: Option<u64>, place: Place<'_>) -> usize {
        let Some(state) = topics.map.get(topic) else { return 0 };
        let Some(recent) = state.recent.back() else { return 0 };
        let mut encoded: PerWire<Frames> = PerWire::default();
        let mut delivered = 0;
        for Seat { member, .. } in state.members.values() {
            if !member.can_read || (Some(member.session.id) == sender && !member.receive_own) {
                continue;
            }
            let frames = encoded.get_or_encode(member.session.wire, |wire| {
                protocol::broadcast(wire, topic, &recent.event, recent.payload.body(), place)
            });
            // None: this member's format cannot carry the payload (binary to JSON-only).
            let Some(frames) = frames else { continue };
            if member.session.deliver(Outbound { frames, commit_time_micros: 0 }) {
                delivered += 1;
            }
        }
        delivered
    }

    /// `topic`'s newest broadcast into its feed, once per wire format in use; each reader is
    /// flagged, and gets a marker queued unless it has one waiting already. A reader still
    /// flagged that the feed has overrun is cut off as a slow consumer.
    fn deliver_to_feed(
        &self,
        topics: &mut Topics,
        topic: &str,
        sender: Option<u64>,
        place: Place<'_>,
    ) -> usize {
        let Some(state) = topics.map.get_mut(topic) else { return 0 };
        let feed = match &state.feed {
            Some(feed) => Arc::clone(feed),
            None => state.start_feed(self.feed_capacity),
        };
        let Some(recent) = state.recent.back() else { return 0 };
        let mut frames: [Option<Frames>; Wire::COUNT] = Default::default();
        for wire in Wire::ALL.into_iter().filter(|w| state.wires[w.slot()] > 0) {
            frames[wire.slot()] =
                protocol::broadcast(wire, topic, &recent.event, recent.payload.body(), place);
        }
        let carried = frames.each_ref().map(Option::is_some);
        let oldest = feed.append(feed::Entry { frames, sender });
        let mut delivered = 0;
        for Seat { member, feed: membership } in state.members.values() {
            let session = &member.session;
            if (Some(session.id) == sender && !member.receive_own) || !carried[session.wire.slot()] {
                continue;
            }
            let Some(membership) = membership else { continue };
            if membership.flag() {
                if !session.notify_feed(Arc::clone(membership)) {
                    continue;
                }
            } else if membership.overrun(oldest) {
                session.kick(
                    close_code::SLOW_CONSUMER,
                    format!("slow consumer: more than {} broadcasts behind", feed.capacity()),
                );
                continue;
            }
            delivered += 1;
        }
        delivered
    }

    /// Evicts oldest first: on `topic` past its count or byte limit, then on whichever topic
    /// holds the oldest broadcast while the history is past the global budget.
    fn evict_past_budget(&self, topics: &mut Topics, topic: &str) {
        while topics.map.get(topic).is_some_and(|t| {
            t.recent.len() > RECENT_PER_TOPIC
                || (t.bytes > self.budget.topic_max_bytes && !t.recent.is_empty())
        }) {
            topics.evict_oldest_of(topic);
        }
        while topics.bytes > self.budget.max_bytes {
            let Some(name) = topics.oldest.values().next().cloned() else { break };
            if !topics.evict_oldest_of(&name) {
                // Accounting and index disagree: never loop on it.
                topics.oldest.retain(|_, n| *n != name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const KIB: usize = 1024;

    fn hub(max_bytes: usize, topic_max_bytes: usize) -> Hub {
        Hub::new(Duration::from_secs(600), HistoryBudget { max_bytes, topic_max_bytes }, 1024)
    }

    /// A broadcast of about `kib` KiB (its cost with the entry overhead is a little more).
    fn send(hub: &Hub, topic: &str, kib: usize) {
        let payload = BroadcastPayload::Binary(Bytes::from(vec![0u8; kib * KIB]));
        hub.broadcast(topic, None, "e", &payload);
    }

    /// The sequences a member resuming after `seq` gets, or why it cannot.
    fn resume(hub: &Hub, topic: &str, seq: u64) -> Result<Vec<u64>, BroadcastResync> {
        let member = Member { session: SessionHandle::detached(16), can_read: true, receive_own: false };
        let messages = hub.join_resuming(&Arc::from(topic), member, seq, hub.epoch())?;
        Ok(messages
            .iter()
            .map(|m| {
                let Message::Binary(frame) = m else { panic!("binary frame expected") };
                let meta_at = 5 + frame[1] as usize + frame[2] as usize;
                let meta: Value =
                    serde_json::from_slice(&frame[meta_at..meta_at + frame[3] as usize]).unwrap();
                meta["seq"].as_u64().unwrap()
            })
            .collect())
    }

    /// The `seq` of each broadcast frame queued for `session`, in order (other frames: 0).
    fn queued_seqs(session: &SessionHandle) -> Vec<u64> {
        session
            .take_queued()
            .iter()
            .map(|o| match &o.frames {
                Frames::One(Message::Binary(frame)) => {
                    let meta_at = 5 + frame[1] as usize + frame[2] as usize;
                    let meta: Value =
                        serde_json::from_slice(&frame[meta_at..meta_at + frame[3] as usize]).unwrap();
                    meta["seq"].as_u64().unwrap()
                }
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn a_large_topic_broadcasts_through_its_feed_once_per_member_in_order_with_the_queue() {
        let hub = hub(1024 * KIB, 1024 * KIB);
        let topic: Arc<str> = Arc::from("realtime:room");
        let join = |receive_own| {
            let session = SessionHandle::detached(1024);
            hub.join(&topic, Member { session: session.clone(), can_read: true, receive_own });
            session
        };
        let members: Vec<_> = (0..FEED_MIN_MEMBERS).map(|_| join(false)).collect();
        let silent = SessionHandle::detached(16);
        hub.join(&topic, Member { session: silent.clone(), can_read: false, receive_own: false });
        let payload = BroadcastPayload::Binary(Bytes::from_static(b"x"));
        let sender = members[0].id;
        assert_eq!(hub.broadcast(&topic, Some(sender), "e", &payload), FEED_MIN_MEMBERS - 1);
        assert!(hub.topics.read().unwrap().map[&*topic].feed.is_some(), "the topic is fed");
        // A message queued directly between two broadcasts keeps its place.
        members[1]
            .deliver(Outbound { frames: Frames::One(Message::Text("direct".into())), commit_time_micros: 0 });
        hub.broadcast(&topic, Some(sender), "e", &payload);
        let late = join(false);
        hub.broadcast(&topic, None, "e", &payload);
        assert_eq!(queued_seqs(&members[1]), [1, 0, 2, 3], "once each, in order, the direct one between");
        assert_eq!(queued_seqs(&members[0]), [3], "its own only when it asked (config.broadcast.self)");
        assert_eq!(queued_seqs(&late), [3], "a member joining later starts after what was sent");
        assert!(silent.take_queued().is_empty(), "a member that may not read gets nothing");
        // Seated again (a token refresh) with a marker queued: the marker still hands it over.
        hub.broadcast(&topic, None, "e", &payload);
        hub.join(&topic, Member { session: members[3].clone(), can_read: true, receive_own: false });
        assert_eq!(queued_seqs(&members[3]), [1, 2, 3, 4], "nothing lost to the refresh");
        // Left with a marker queued: it expands to nothing.
        hub.broadcast(&topic, None, "e", &payload);
        hub.leave(&topic, members[2].id);
        assert!(queued_seqs(&members[2]).iter().all(|seq| *seq <= 3), "nothing after leaving");
    }

    #[test]
    fn a_member_the_feed_overruns_is_cut_off_as_a_slow_consumer() {
        let hub = Hub::new(
            Duration::from_secs(600),
            HistoryBudget { max_bytes: 1 << 20, topic_max_bytes: 1 << 20 },
            4,
        );
        let topic: Arc<str> = Arc::from("realtime:room");
        let members: Vec<_> = (0..FEED_MIN_MEMBERS)
            .map(|_| {
                let session = SessionHandle::detached(1024);
                hub.join(&topic, Member { session: session.clone(), can_read: true, receive_own: false });
                session
            })
            .collect();
        let payload = BroadcastPayload::Binary(Bytes::from_static(b"x"));
        for _ in 0..4 {
            hub.broadcast(&topic, None, "e", &payload);
            // Member 1 keeps up; member 0 never reads.
            assert_eq!(queued_seqs(&members[1]).len(), 1);
        }
        assert!(!members[1].is_kicked());
        assert!(!members[0].is_kicked(), "four behind fit a feed of four");
        hub.broadcast(&topic, None, "e", &payload);
        assert!(members[0].is_kicked());
        assert!(members[0].kicked().1.contains("slow consumer"), "{:?}", members[0].kicked());
    }

    #[test]
    fn a_topic_past_its_byte_budget_evicts_oldest_first_and_resumes_past_it_resync() {
        let hub = hub(1024 * KIB, 10 * KIB);
        for _ in 0..5 {
            send(&hub, "realtime:a", 4);
        }
        // 10 KiB per topic holds two 4 KiB broadcasts: 4 and 5 are kept, 1-3 are gone.
        assert_eq!(resume(&hub, "realtime:a", 3), Ok(vec![4, 5]));
        assert_eq!(resume(&hub, "realtime:a", 2), Err(BroadcastResync::TooOld(2)));
        assert!(hub.history_bytes() <= 10 * KIB);
        // One broadcast larger than the budget is delivered live but not kept.
        send(&hub, "realtime:a", 11);
        assert_eq!(resume(&hub, "realtime:a", 5), Err(BroadcastResync::TooOld(5)));
        assert_eq!(resume(&hub, "realtime:a", 6), Ok(vec![]));
    }

    #[test]
    fn the_global_budget_evicts_the_oldest_broadcast_of_any_topic() {
        let hub = hub(10 * KIB, 10 * KIB);
        send(&hub, "realtime:a", 4);
        send(&hub, "realtime:b", 4);
        send(&hub, "realtime:a", 4);
        // Three do not fit in 10 KiB: the oldest (a's first) went, b's stayed.
        assert_eq!(resume(&hub, "realtime:a", 0), Err(BroadcastResync::TooOld(0)));
        assert_eq!(resume(&hub, "realtime:a", 1), Ok(vec![2]));
        // b was made after a's first broadcast: it numbers on from there.
        assert_eq!(resume(&hub, "realtime:b", 1), Ok(vec![2]));
        assert!(hub.history_bytes() <= 10 * KIB);
        for _ in 0..100 {
            send(&hub, "realtime:c", 1);
        }
        assert!(hub.history_bytes() <= 10 * KIB, "{} bytes", hub.history_bytes());
        assert_eq!(resume(&hub, "realtime:b", 1), Err(BroadcastResync::TooOld(1)), "b's went too");
    }

    #[test]
    fn a_topic_made_again_numbers_on_and_refuses_resumes_from_before() {
        let hub = hub(1024 * KIB, 1024 * KIB);
        for _ in 0..3 {
            send(&hub, "realtime:a", 1);
        }
        // Nobody is on the topic and its history ages out: the topic's state is dropped.
        let aged = Hub::new(
            Duration::ZERO,
            HistoryBudget { max_bytes: KIB * 1024, topic_max_bytes: KIB * 1024 },
            1024,
        );
        for _ in 0..3 {
            send(&aged, "realtime:a", 1);
        }
        std::thread::sleep(Duration::from_millis(5));
        aged.prune();
        assert_eq!(aged.history_bytes(), 0);
        send(&aged, "realtime:a", 1);
        assert_eq!(resume(&aged, "realtime:a", 3), Ok(vec![4]), "numbering goes on from 3, not from 1");
        assert_eq!(resume(&aged, "realtime:a", 1), Err(BroadcastResync::TooOld(1)));
        assert_eq!(resume(&hub, "realtime:a", 0), Ok(vec![1, 2, 3]));
    }

    #[test]
    fn extreme_resume_numbers_neither_panic_nor_replay() {
        let hub = hub(1024 * KIB, 1024 * KIB);
        send(&hub, "realtime:a", 1);
        assert_eq!(resume(&hub, "realtime:a", u64::MAX), Ok(vec![]));
        let member = Member { session: SessionHandle::detached(16), can_read: true, receive_own: false };
        let long_epoch = "e".repeat(100_000);
        match hub.join_resuming(&Arc::from("realtime:a"), member, 0, &long_epoch) {
            Err(BroadcastResync::Epoch(shown)) => assert!(shown.len() < 100, "the epoch is clipped"),
            other => panic!("expected an epoch mismatch, got {other:?}"),
        }
    }
}
