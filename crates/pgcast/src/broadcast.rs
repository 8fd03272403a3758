//! Channel membership and client-to-channel broadcast (Supabase Realtime's `broadcast`).
//!
//! The [`Hub`] knows, per topic, which sessions joined and whether they may receive; a
//! broadcast is serialized once per serializer and the shared bytes go to every receiving
//! member's bounded queue (vsn 2.0.0 members get realtime-js's binary user-broadcast frame).
//! Presence state lives in `presence`; postgres_changes never pass through here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::Bytes;
use serde_json::Value;

use crate::json::write_string;
use crate::protocol::phoenix::{self, Vsn};
use crate::session::{Frames, Outbound, SessionHandle};

/// A member's standing on one topic.
#[derive(Debug, Clone)]
pub struct Member {
    pub session: Arc<SessionHandle>,
    /// May receive broadcasts and presence.
    pub can_read: bool,
    /// `config.broadcast.self`: receives its own broadcasts.
    pub receive_own: bool,
}

/// A broadcast's user payload as it arrived: JSON, or bytes from a binary frame.
#[derive(Debug, Clone)]
pub enum BroadcastPayload {
    Json(Value),
    Binary(Bytes),
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
    members: HashMap<u64, Member>,
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
        Topic { members: HashMap::new(), seq: start, floor: start, recent: VecDeque::new(), bytes: 0 }
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
}

/// Why a broadcast resume cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BroadcastResync {
    #[error("broadcast epoch {0} is not the current one (the server restarted)")]
    Epoch(String),
    #[error("broadcast {0} is older than the broadcasts kept for this topic")]
    TooOld(u64),
}

/// realtime-js binary frame kinds (lib/serializer.js).
pub const KIND_USER_BROADCAST_PUSH: u8 = 3;
pub const KIND_USER_BROADCAST: u8 = 4;
const ENCODING_BINARY: u8 = 0;
const ENCODING_JSON: u8 = 1;

impl Hub {
    pub fn new(max_age: Duration, budget: HistoryBudget) -> Hub {
        Hub { topics: RwLock::new(Topics::default()), epoch: crate::random::hex_id(), max_age, budget }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn join(&self, topic: &Arc<str>, member: Member) {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        topics.topic(topic, Some(topic)).members.insert(member.session.id, member);
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
        let vsn = member.session.vsn;
        let state = topics.topic(topic, Some(topic));
        let can_read = member.can_read;
        state.members.insert(member.session.id, member);
        if epoch != self.epoch {
            return Err(BroadcastResync::Epoch(crate::text::clip(epoch, crate::text::NAME_CHARS)));
        }
        if seq < state.floor {
            return Err(BroadcastResync::TooOld(seq));
        }
        if !can_read {
            return Ok(Vec::new());
        }
        let stamp = |r: &Recent| Stamp { seq: r.seq, epoch: &self.epoch };
        Ok(state
            .recent
            .iter()
            .filter(|r| r.seq > seq)
            .filter_map(|r| encode_broadcast(vsn, topic, &r.event, &r.payload, stamp(r)))
            .collect())
    }

    /// Whether the member asked for its own broadcasts (`config.broadcast.self`).
    pub fn receives_own(&self, topic: &str, session: u64) -> bool {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        topics.map.get(topic).and_then(|t| t.members.get(&session)).is_some_and(|m| m.receive_own)
    }

    pub fn leave(&self, topic: &str, session: u64) {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = topics.map.get_mut(topic) {
            state.members.remove(&session);
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
            .map(|t| t.members.values().filter(|m| m.can_read).map(|m| m.session.clone()).collect())
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
        let first_kept = state.recent.is_empty();
        state.recent.push_back(recent);
        state.bytes += cost;
        topics.bytes += cost;
        topics.high_water = topics.high_water.max(seq);
        if first_kept {
            let name = topics.map.get_key_value(topic).expect("made above").0.clone();
            topics.oldest.insert(arrival, name);
        }
        let delivered = Self::deliver(topics, topic, sender, Stamp { seq, epoch: &self.epoch });
        self.evict_past_budget(topics, topic);
        metrics::counter!("pgcast_broadcasts_total").increment(1);
        metrics::counter!("pgcast_broadcast_deliveries_total").increment(delivered as u64);
        delivered
    }

    /// Queues `topic`'s newest broadcast for every reader, encoded once per serializer.
    fn deliver(topics: &Topics, topic: &str, sender: Option<u64>, stamp: Stamp<'_>) -> usize {
        let Some(state) = topics.map.get(topic) else { return 0 };
        let Some(recent) = state.recent.back() else { return 0 };
        let mut encoded: [Option<Message>; 2] = [None, None];
        let mut delivered = 0;
        for member in state.members.values() {
            if !member.can_read || (Some(member.session.id) == sender && !member.receive_own) {
                continue;
            }
            let slot = usize::from(member.session.vsn == Vsn::V2);
            let message = match &encoded[slot] {
                Some(message) => message.clone(),
                None => {
                    let vsn = member.session.vsn;
                    let Some(message) = encode_broadcast(vsn, topic, &recent.event, &recent.payload, stamp)
                    else {
                        // Binary payloads cannot be carried by the JSON-object serializer.
                        continue;
                    };
                    encoded[slot] = Some(message.clone());
                    message
                }
            };
            if member.session.deliver(Outbound { frames: Frames::One(message), commit_time_micros: 0 }) {
                delivered += 1;
            }
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

/// A broadcast's place on its topic: realtime-js shows it as the message's `meta`.
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    pub seq: u64,
    pub epoch: &'a str,
}

impl Stamp<'_> {
    fn meta_json(&self) -> String {
        let mut meta = format!("{{\"seq\":{},\"epoch\":", self.seq);
        write_string(self.epoch, &mut meta);
        meta.push('}');
        meta
    }
}

/// The frame a member receives: JSON `broadcast` for vsn 1.0.0, the binary user-broadcast frame
/// for vsn 2.0.0 (JSON when the topic or event is too long for its one-byte lengths).
pub fn encode_broadcast(
    vsn: Vsn,
    topic: &str,
    event: &str,
    payload: &Serialized,
    stamp: Stamp<'_>,
) -> Option<Message> {
    let meta = stamp.meta_json();
    if vsn == Vsn::V2 && topic.len() <= 255 && event.len() <= 255 && meta.len() <= 255 {
        let (encoding, body): (u8, &[u8]) = match payload {
            Serialized::Json(text) => (ENCODING_JSON, text.as_bytes()),
            Serialized::Binary(bytes) => (ENCODING_BINARY, bytes),
        };
        let mut frame = Vec::with_capacity(5 + topic.len() + event.len() + meta.len() + body.len());
        frame.extend([KIND_USER_BROADCAST, topic.len() as u8, event.len() as u8, meta.len() as u8, encoding]);
        frame.extend(topic.as_bytes());
        frame.extend(event.as_bytes());
        frame.extend(meta.as_bytes());
        frame.extend(body);
        return Some(Message::Binary(frame.into()));
    }
    let Serialized::Json(json) = payload else { return None };
    let mut body = String::from("{\"type\":\"broadcast\",\"event\":");
    write_string(event, &mut body);
    body.push_str(",\"payload\":");
    body.push_str(json);
    body.push_str(",\"meta\":");
    body.push_str(&meta);
    body.push('}');
    let text: Utf8Bytes = phoenix::encode_raw(vsn, None, None, topic, "broadcast", &body).into();
    Some(Message::Text(text))
}

/// A client's binary user-broadcast push (kind 3).
#[derive(Debug, PartialEq)]
pub struct BinaryPush {
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: BroadcastPayload,
}

impl PartialEq for BroadcastPayload {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (BroadcastPayload::Json(a), BroadcastPayload::Json(b)) => a == b,
            (BroadcastPayload::Binary(a), BroadcastPayload::Binary(b)) => a == b,
            _ => false,
        }
    }
}

/// Decodes `[3, join_ref_len, ref_len, topic_len, event_len, meta_len, encoding, ...]`.
pub fn decode_binary_push(frame: &[u8]) -> Result<BinaryPush, String> {
    let header = frame.get(..7).ok_or("binary frame shorter than its 7-byte header")?;
    if header[0] != KIND_USER_BROADCAST_PUSH {
        return Err(format!("unsupported binary frame kind {}", header[0]));
    }
    let lengths = [header[1], header[2], header[3], header[4], header[5]].map(usize::from);
    let mut offset = 7;
    let mut fields = Vec::with_capacity(5);
    for len in lengths {
        let bytes = frame.get(offset..offset + len).ok_or("binary frame truncated")?;
        fields.push(std::str::from_utf8(bytes).map_err(|_| "binary frame field is not UTF-8")?.to_string());
        offset += len;
    }
    let body = &frame[offset..];
    let payload = match header[6] {
        ENCODING_BINARY => BroadcastPayload::Binary(Bytes::copy_from_slice(body)),
        ENCODING_JSON => BroadcastPayload::Json(
            serde_json::from_slice(body).map_err(|e| format!("binary frame JSON payload: {e}"))?,
        ),
        other => return Err(format!("unknown payload encoding {other}")),
    };
    let non_empty = |s: &String| (!s.is_empty()).then(|| s.clone());
    Ok(BinaryPush {
        join_ref: non_empty(&fields[0]),
        msg_ref: non_empty(&fields[1]),
        topic: fields[2].clone(),
        event: fields[3].clone(),
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const STAMP: Stamp<'static> = Stamp { seq: 7, epoch: "e" };

    fn json_payload(value: Value) -> Serialized {
        Serialized::new(&BroadcastPayload::Json(value))
    }

    const KIB: usize = 1024;

    fn hub(max_bytes: usize, topic_max_bytes: usize) -> Hub {
        Hub::new(Duration::from_secs(600), HistoryBudget { max_bytes, topic_max_bytes })
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
        let aged =
            Hub::new(Duration::ZERO, HistoryBudget { max_bytes: KIB * 1024, topic_max_bytes: KIB * 1024 });
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

    fn push(payload_encoding: u8, body: &[u8]) -> Vec<u8> {
        let (join_ref, msg_ref, topic, event) = ("1", "2", "realtime:room", "cursor");
        let mut frame = vec![3, 1, 1, topic.len() as u8, event.len() as u8, 0, payload_encoding];
        frame.extend(join_ref.bytes().chain(msg_ref.bytes()).chain(topic.bytes()).chain(event.bytes()));
        frame.extend(body);
        frame
    }

    #[test]
    fn binary_pushes_decode_with_json_or_binary_payloads() {
        let decoded = decode_binary_push(&push(1, br#"{"x":1}"#)).unwrap();
        assert_eq!(decoded.topic, "realtime:room");
        assert_eq!(decoded.event, "cursor");
        assert_eq!(decoded.msg_ref.as_deref(), Some("2"));
        assert_eq!(decoded.payload, BroadcastPayload::Json(json!({"x": 1})));
        let decoded = decode_binary_push(&push(0, &[0, 159, 146])).unwrap();
        assert_eq!(decoded.payload, BroadcastPayload::Binary(Bytes::from_static(&[0, 159, 146])));
    }

    #[test]
    fn malformed_binary_pushes_are_errors() {
        assert!(decode_binary_push(&[3, 1]).is_err());
        assert!(decode_binary_push(&[9, 0, 0, 0, 0, 0, 1]).unwrap_err().contains("kind 9"));
        assert!(decode_binary_push(&[3, 200, 0, 0, 0, 0, 1]).unwrap_err().contains("truncated"));
        assert!(decode_binary_push(&push(1, b"{nope")).is_err());
        assert!(decode_binary_push(&push(7, b"")).unwrap_err().contains("encoding 7"));
    }

    #[test]
    fn v2_members_get_the_binary_user_broadcast_frame() {
        let Some(Message::Binary(frame)) =
            encode_broadcast(Vsn::V2, "realtime:r", "ev", &json_payload(json!({"a": 1})), STAMP)
        else {
            panic!("binary frame expected")
        };
        let meta = br#"{"seq":7,"epoch":"e"}"#;
        assert_eq!(&frame[..5], &[4, 10, 2, meta.len() as u8, 1]);
        assert_eq!(&frame[5..15], b"realtime:r");
        assert_eq!(&frame[15..17], b"ev");
        assert_eq!(&frame[17..17 + meta.len()], meta);
        assert_eq!(&frame[17 + meta.len()..], br#"{"a":1}"#);
        let Some(Message::Text(text)) =
            encode_broadcast(Vsn::V1, "realtime:r", "ev", &json_payload(json!({"a": 1})), STAMP)
        else {
            panic!("text frame expected")
        };
        let v: Value = serde_json::from_str(text.as_str()).unwrap();
        assert_eq!(
            v["payload"],
            json!({"type": "broadcast", "event": "ev", "payload": {"a": 1}, "meta": {"seq": 7, "epoch": "e"}})
        );
        assert!(encode_broadcast(Vsn::V1, "t", "e", &Serialized::Binary(Bytes::new()), STAMP).is_none());
    }
}
