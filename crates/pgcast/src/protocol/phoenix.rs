//! Phoenix channels framing as spoken by Supabase Realtime clients: serializer `vsn=1.0.0` (a JSON
//! object `{join_ref, ref, topic, event, payload}`) and `vsn=2.0.0` (a JSON array
//! `[join_ref, ref, topic, event, payload]`).
//!
//! Wire formats only: frames in, frames out. What a join or a message *means* is the session's
//! business.

use serde_json::Value;

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

#[cfg(test)]
mod tests {
    use super::*;
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
}
