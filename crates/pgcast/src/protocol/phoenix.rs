//! Phoenix channels framing as spoken by Supabase Realtime clients: serializer `vsn=1.0.0` (a JSON
//! object `{join_ref, ref, topic, event, payload}`) and `vsn=2.0.0` (a JSON array
//! `[join_ref, ref, topic, event, payload]`).
//!
//! Wire formats only: frames in, frames out. What a join or a message *means* is the session's
//! business.

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::Bytes;
use serde_json::Value;

use super::{Body, BroadcastPayload};
use crate::json::write_string;

/// The serializer a connection negotiated with `?vsn=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Vsn {
    V1,
    V2,
}

impl Vsn {
    pub fn parse(text: Option<&str>) -> Result<Vsn, String> {
        match text {
            None | Some("1.0.0") => Ok(Vsn::V1),
            Some("2.0.0") => Ok(Vsn::V2),
            Some(other) => Err(format!("unsupported vsn {other:?}: use 1.0.0 or 2.0.0")),
        }
    }
}

/// A client frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Value,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    #[error("malformed message: {0}")]
    Json(String),
    #[error("malformed message: expected {0}")]
    Shape(&'static str),
}

/// Refs arrive as strings from realtime-js but Phoenix allows any JSON scalar.
fn ref_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

pub fn decode(vsn: Vsn, text: &str) -> Result<Frame, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|e| FrameError::Json(e.to_string()))?;
    match vsn {
        Vsn::V1 => {
            let Value::Object(mut map) = value else {
                return Err(FrameError::Shape("a JSON object {topic, event, payload, ref}"));
            };
            let topic = match map.remove("topic") {
                Some(Value::String(t)) => t,
                _ => return Err(FrameError::Shape("a string topic")),
            };
            let event = match map.remove("event") {
                Some(Value::String(e)) => e,
                _ => return Err(FrameError::Shape("a string event")),
            };
            Ok(Frame {
                join_ref: ref_text(map.get("join_ref")),
                msg_ref: ref_text(map.get("ref")),
                topic,
                event,
                payload: map.remove("payload").unwrap_or(Value::Null),
            })
        }
        Vsn::V2 => {
            let Value::Array(items) = value else {
                return Err(FrameError::Shape("a JSON array [join_ref, ref, topic, event, payload]"));
            };
            let Ok([join_ref, msg_ref, topic, event, payload]) = <[Value; 5]>::try_from(items) else {
                return Err(FrameError::Shape("5 elements [join_ref, ref, topic, event, payload]"));
            };
            let (Value::String(topic), Value::String(event)) = (topic, event) else {
                return Err(FrameError::Shape("string topic and event"));
            };
            Ok(Frame {
                join_ref: ref_text(Some(&join_ref)),
                msg_ref: ref_text(Some(&msg_ref)),
                topic,
                event,
                payload,
            })
        }
    }
}

/// Encodes a frame whose payload is already serialized JSON (`payload_json`), so a payload shared
/// by many connections is serialized once.
pub fn encode_raw(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload_json: &str,
) -> String {
    let mut out = String::with_capacity(payload_json.len() + topic.len() + event.len() + 64);
    let write_opt = |value: Option<&str>, out: &mut String| match value {
        Some(v) => write_string(v, out),
        None => out.push_str("null"),
    };
    match vsn {
        Vsn::V1 => {
            out.push_str("{\"topic\":");
            write_string(topic, &mut out);
            out.push_str(",\"event\":");
            write_string(event, &mut out);
            out.push_str(",\"payload\":");
            out.push_str(payload_json);
            out.push_str(",\"ref\":");
            write_opt(msg_ref, &mut out);
            out.push_str(",\"join_ref\":");
            write_opt(join_ref, &mut out);
            out.push('}');
        }
        Vsn::V2 => {
            out.push('[');
            write_opt(join_ref, &mut out);
            out.push(',');
            write_opt(msg_ref, &mut out);
            out.push(',');
            write_string(topic, &mut out);
            out.push(',');
            write_string(event, &mut out);
            out.push(',');
            out.push_str(payload_json);
            out.push(']');
        }
    }
    out
}

pub fn encode(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &Value,
) -> String {
    encode_raw(vsn, join_ref, msg_ref, topic, event, &payload.to_string())
}

/// `phx_reply` to the frame `to`: `{status, response}`.
pub fn reply(vsn: Vsn, to: &Frame, status: &str, response: Value) -> String {
    let payload = serde_json::json!({ "status": status, "response": response });
    encode(vsn, to.join_ref.as_deref(), to.msg_ref.as_deref(), &to.topic, "phx_reply", &payload)
}

/// `{ids, data}`: the payload realtime-js expects for `postgres_changes`, `data` serialized
/// once per change and shared by every message that carries it.
pub fn change(vsn: Vsn, topic: &str, ids: &[u32], data: &str) -> Message {
    use std::fmt::Write as _;
    let mut body = String::with_capacity(data.len() + 32);
    body.push_str("{\"ids\":[");
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        let _ = write!(body, "{id}");
    }
    body.push_str("],\"data\":");
    body.push_str(data);
    body.push('}');
    Message::Text(encode_raw(vsn, None, None, topic, "postgres_changes", &body).into())
}

/// realtime-js binary frame kinds (lib/serializer.js).
const KIND_USER_BROADCAST_PUSH: u8 = 3;
const KIND_USER_BROADCAST: u8 = 4;
const ENCODING_BINARY: u8 = 0;
const ENCODING_JSON: u8 = 1;

/// The broadcast a member receives, with its place (`meta = {seq, epoch}`, which realtime-js
/// shows as the message's `meta`): JSON `broadcast` for vsn 1.0.0, the binary user-broadcast
/// frame for vsn 2.0.0 (JSON when the topic or event is too long for its one-byte lengths).
/// `None` for a binary payload to vsn 1.0.0, which cannot carry it.
pub fn broadcast(
    vsn: Vsn,
    topic: &str,
    event: &str,
    body: Body<'_>,
    seq: u64,
    epoch: &str,
) -> Option<Message> {
    let mut meta = format!("{{\"seq\":{seq},\"epoch\":");
    write_string(epoch, &mut meta);
    meta.push('}');
    if vsn == Vsn::V2 && topic.len() <= 255 && event.len() <= 255 && meta.len() <= 255 {
        let (encoding, bytes): (u8, &[u8]) = match body {
            Body::Json(text) => (ENCODING_JSON, text.as_bytes()),
            Body::Binary(bytes) => (ENCODING_BINARY, bytes),
        };
        let mut frame = Vec::with_capacity(5 + topic.len() + event.len() + meta.len() + bytes.len());
        frame.extend([KIND_USER_BROADCAST, topic.len() as u8, event.len() as u8, meta.len() as u8, encoding]);
        frame.extend(topic.as_bytes());
        frame.extend(event.as_bytes());
        frame.extend(meta.as_bytes());
        frame.extend(bytes);
        return Some(Message::Binary(frame.into()));
    }
    let Body::Json(json) = body else { return None };
    let mut payload = String::from("{\"type\":\"broadcast\",\"event\":");
    write_string(event, &mut payload);
    payload.push_str(",\"payload\":");
    payload.push_str(json);
    payload.push_str(",\"meta\":");
    payload.push_str(&meta);
    payload.push('}');
    let text: Utf8Bytes = encode_raw(vsn, None, None, topic, "broadcast", &payload).into();
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
    use crate::random::XorShift;
    use serde_json::json;

    #[test]
    fn v1_and_v2_frames_decode_to_the_same_frame() {
        let v1 = decode(
            Vsn::V1,
            r#"{"topic":"realtime:a","event":"phx_join","payload":{"x":1},"ref":"2","join_ref":"2"}"#,
        )
        .unwrap();
        let v2 = decode(Vsn::V2, r#"["2","2","realtime:a","phx_join",{"x":1}]"#).unwrap();
        assert_eq!(v1, v2);
        assert_eq!(v1.msg_ref.as_deref(), Some("2"));
    }

    #[test]
    fn malformed_frames_say_what_was_expected() {
        assert!(matches!(decode(Vsn::V1, "{nope"), Err(FrameError::Json(_))));
        assert_eq!(
            decode(Vsn::V1, "[1]"),
            Err(FrameError::Shape("a JSON object {topic, event, payload, ref}"))
        );
        assert!(decode(Vsn::V2, r#"[null,null,"t"]"#).is_err());
        assert!(decode(Vsn::V2, r#"[null,null,1,"e",{}]"#).is_err());
    }

    #[test]
    fn encoded_frames_are_valid_json_in_both_serializers() {
        let payload = json!({"a": "b\"c"});
        let v1: Value =
            serde_json::from_str(&encode(Vsn::V1, Some("1"), None, "t\"x", "e", &payload)).unwrap();
        assert_eq!(
            v1,
            json!({"topic": "t\"x", "event": "e", "payload": payload, "ref": null, "join_ref": "1"})
        );
        let v2: Value = serde_json::from_str(&encode(Vsn::V2, None, Some("3"), "t", "e", &payload)).unwrap();
        assert_eq!(v2, json!([null, "3", "t", "e", payload]));
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
            broadcast(Vsn::V2, "realtime:r", "ev", Body::Json(r#"{"a":1}"#), 7, "e")
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
            broadcast(Vsn::V1, "realtime:r", "ev", Body::Json(r#"{"a":1}"#), 7, "e")
        else {
            panic!("text frame expected")
        };
        let v: Value = serde_json::from_str(text.as_str()).unwrap();
        assert_eq!(
            v["payload"],
            json!({"type": "broadcast", "event": "ev", "payload": {"a": 1}, "meta": {"seq": 7, "epoch": "e"}})
        );
        assert!(broadcast(Vsn::V1, "t", "e", Body::Binary(&[]), 7, "e").is_none());
    }

    #[test]
    fn change_messages_list_their_binding_ids_before_the_shared_data() {
        let Message::Text(text) = change(Vsn::V2, "realtime:t", &[3, 9], "{}") else { panic!("text") };
        assert_eq!(text.as_str(), r#"[null,null,"realtime:t","postgres_changes",{"ids":[3,9],"data":{}}]"#);
    }

    fn has_float(value: &Value) -> bool {
        match value {
            Value::Number(n) => n.is_f64(),
            Value::Array(items) => items.iter().any(has_float),
            Value::Object(map) => map.values().any(has_float),
            _ => false,
        }
    }

    /// Client frames (both serializers and realtime-js's binary push) decode without panicking
    /// whatever the bytes, and what decodes encodes back to the same frame.
    #[test]
    fn fuzz_client_frames_never_panic_and_round_trip() {
        const SEEDS: &[&str] = &[
            r#"["1","1","realtime:room","phx_join",{"config":{"postgres_changes":[{"event":"*","schema":"public","table":"t","filter":"id=eq.1"}],"private":true},"access_token":"x"}]"#,
            r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"7"}"#,
            r#"[null,"3","realtime:a","broadcast",{"type":"broadcast","event":"e","payload":{"a":[1,2,{"b":null}]}}]"#,
            r#"{"topic":"realtime:a","event":"presence","payload":{"event":"track","payload":{"k":"v"}},"ref":null,"join_ref":"1"}"#,
            r#"["1","2","realtime:a","access_token",{"access_token":"\u0000\"x"}]"#,
        ];
        const ALPHABET: &[u8] = b"[]{},:\"\\01null truefalse-realtime:phx_";
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        let mut decoded = 0;
        for round in 0..100_000 {
            let mut input = SEEDS[rng.below(SEEDS.len())].as_bytes().to_vec();
            if round % 10 == 0 {
                input = (0..rng.below(80)).map(|_| rng.next() as u8).collect();
            }
            for _ in 0..=rng.below(4) {
                let at = rng.below(input.len() + 1);
                match rng.below(5) {
                    0 => input.insert(at, ALPHABET[rng.below(ALPHABET.len())]),
                    1 => input.insert(at, rng.next() as u8),
                    2 if at < input.len() => {
                        input.remove(at);
                    }
                    3 => input.truncate(at),
                    _ => {
                        let other = SEEDS[rng.below(SEEDS.len())].as_bytes();
                        input.splice(at..at, other[rng.below(other.len())..].iter().copied());
                    }
                }
            }
            // realtime-js's binary push: any bytes.
            let _ = decode_binary_push(&input);
            let text = String::from_utf8_lossy(&input);
            for vsn in [Vsn::V1, Vsn::V2] {
                let Ok(frame) = decode(vsn, &text) else { continue };
                decoded += 1;
                let encoded = encode(
                    vsn,
                    frame.join_ref.as_deref(),
                    frame.msg_ref.as_deref(),
                    &frame.topic,
                    &frame.event,
                    &frame.payload,
                );
                let again =
                    decode(vsn, &encoded).unwrap_or_else(|e| panic!("{encoded:?} does not decode: {e}"));
                if !has_float(&frame.payload) {
                    assert_eq!(again, frame, "{text:?}");
                } else {
                    assert_eq!((&again.topic, &again.event), (&frame.topic, &frame.event));
                }
            }
        }
        assert!(decoded > 10_000, "the mutations reach the decoders' success paths ({decoded})");
    }
}
