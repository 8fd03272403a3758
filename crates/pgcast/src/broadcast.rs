//! Channel membership and client-to-channel broadcast (Supabase Realtime's `broadcast`).
//!
//! The [`Hub`] knows, per topic, which sessions joined and whether they may receive; a
//! broadcast is serialized once per serializer and the shared bytes go to every receiving
//! member's bounded queue (vsn 2.0.0 members get realtime-js's binary user-broadcast frame).
//! Presence state lives in `presence`; postgres_changes never pass through here.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::Bytes;
use serde_json::Value;

use crate::capture::value::write_json_string;
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

/// Recent broadcasts kept per topic for resuming members.
const RECENT_PER_TOPIC: usize = 1000;

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
    event: Arc<str>,
    payload: BroadcastPayload,
    at: Instant,
}

#[derive(Default)]
struct Topic {
    members: HashMap<u64, Member>,
    /// Sequence of the last broadcast on this topic (1, 2, ...).
    seq: u64,
    recent: VecDeque<Recent>,
}

/// Topic -> members, sequence and recent broadcasts.
pub struct Hub {
    topics: RwLock<HashMap<Arc<str>, Topic>>,
    /// Broadcast history lives in memory: a new server is a new epoch.
    epoch: String,
    max_age: Duration,
}

/// Why a broadcast resume cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BroadcastResync {
    #[error("broadcast epoch {0:?} is not the current one (the server restarted)")]
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
    pub fn new(max_age: Duration) -> Hub {
        Hub { topics: RwLock::new(HashMap::new()), epoch: crate::demo::random_secret(), max_age }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn join(&self, topic: &Arc<str>, member: Member) {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        topics.entry(topic.clone()).or_default().members.insert(member.session.id, member);
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
        let state = topics.entry(topic.clone()).or_default();
        let can_read = member.can_read;
        state.members.insert(member.session.id, member);
        if epoch != self.epoch {
            return Err(BroadcastResync::Epoch(epoch.to_string()));
        }
        let oldest_kept = state.recent.front().map(|r| r.seq).unwrap_or(state.seq + 1);
        if seq + 1 < oldest_kept && seq < state.seq {
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
        topics.get(topic).and_then(|t| t.members.get(&session)).is_some_and(|m| m.receive_own)
    }

    pub fn leave(&self, topic: &str, session: u64) {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = topics.get_mut(topic) {
            state.members.remove(&session);
            if state.members.is_empty() && state.recent.is_empty() {
                topics.remove(topic);
            }
        }
    }

    /// Members allowed to read `topic`, for presence delivery.
    pub fn readers(&self, topic: &str) -> Vec<Arc<SessionHandle>> {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        topics
            .get(topic)
            .map(|t| t.members.values().filter(|m| m.can_read).map(|m| m.session.clone()).collect())
            .unwrap_or_default()
    }

    /// Drops broadcasts past their age, and topics with neither members nor history.
    pub fn prune(&self) {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let max_age = self.max_age;
        topics.retain(|_, state| {
            while state.recent.front().is_some_and(|r| r.at.elapsed() > max_age) {
                state.recent.pop_front();
            }
            !state.members.is_empty() || !state.recent.is_empty()
        });
    }

    /// Sends a broadcast to every reader of `topic` (the sender only if it asked for its own).
    /// Returns how many connections it was queued for.
    pub fn broadcast(
        &self,
        topic: &str,
        sender: Option<u64>,
        event: &str,
        payload: &BroadcastPayload,
    ) -> usize {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let state = match topics.get_mut(topic) {
            Some(state) => state,
            None => topics.entry(Arc::from(topic)).or_default(),
        };
        state.seq += 1;
        let seq = state.seq;
        state.recent.push_back(Recent {
            seq,
            event: Arc::from(event),
            payload: payload.clone(),
            at: Instant::now(),
        });
        while state.recent.len() > RECENT_PER_TOPIC {
            state.recent.pop_front();
        }
        let stamp = Stamp { seq, epoch: &self.epoch };
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
                    let Some(message) = encode_broadcast(member.session.vsn, topic, event, payload, stamp)
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
        metrics::counter!("pgcast_broadcasts_total").increment(1);
        metrics::counter!("pgcast_broadcast_deliveries_total").increment(delivered as u64);
        delivered
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
        write_json_string(self.epoch, &mut meta);
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
    payload: &BroadcastPayload,
    stamp: Stamp<'_>,
) -> Option<Message> {
    let meta = stamp.meta_json();
    if vsn == Vsn::V2 && topic.len() <= 255 && event.len() <= 255 && meta.len() <= 255 {
        let (encoding, body): (u8, Bytes) = match payload {
            BroadcastPayload::Json(value) => (ENCODING_JSON, Bytes::from(value.to_string())),
            BroadcastPayload::Binary(bytes) => (ENCODING_BINARY, bytes.clone()),
        };
        let mut frame = Vec::with_capacity(5 + topic.len() + event.len() + meta.len() + body.len());
        frame.extend([KIND_USER_BROADCAST, topic.len() as u8, event.len() as u8, meta.len() as u8, encoding]);
        frame.extend(topic.as_bytes());
        frame.extend(event.as_bytes());
        frame.extend(meta.as_bytes());
        frame.extend(&body);
        return Some(Message::Binary(frame.into()));
    }
    let BroadcastPayload::Json(value) = payload else { return None };
    let mut body = String::from("{\"type\":\"broadcast\",\"event\":");
    write_json_string(event, &mut body);
    body.push_str(",\"payload\":");
    body.push_str(&value.to_string());
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
            encode_broadcast(Vsn::V2, "realtime:r", "ev", &BroadcastPayload::Json(json!({"a": 1})), STAMP)
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
            encode_broadcast(Vsn::V1, "realtime:r", "ev", &BroadcastPayload::Json(json!({"a": 1})), STAMP)
        else {
            panic!("text frame expected")
        };
        let v: Value = serde_json::from_str(text.as_str()).unwrap();
        assert_eq!(
            v["payload"],
            json!({"type": "broadcast", "event": "ev", "payload": {"a": 1}, "meta": {"seq": 7, "epoch": "e"}})
        );
        assert!(encode_broadcast(Vsn::V1, "t", "e", &BroadcastPayload::Binary(Bytes::new()), STAMP).is_none());
    }
}
