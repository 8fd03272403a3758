//! Wire formats spoken to clients. Only framing lives here: no decisions about who receives what.
//!
//! The router, the broadcast hub and presence know a connection's format only as a [`Wire`],
//! and cache what they encode per wire ([`PerWire`]): each distinct message is encoded once per
//! format, never per connection. Every byte layout is in the format's own module.

use std::sync::Arc;

use axum::extract::ws::Message;

use crate::capture::ChangeKind;
use crate::log::Position;
use crate::outbound::Frames;

pub mod phoenix;
pub mod socketio;
pub mod sse;

/// The wire format of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Wire {
    /// Supabase Realtime, Phoenix serializer `1.0.0` (JSON objects).
    PhoenixV1,
    /// Supabase Realtime, Phoenix serializer `2.0.0` (JSON arrays, binary user broadcasts).
    PhoenixV2,
    /// Socket.IO v5 over Engine.IO v4, namespace `/`: a push is an event named for what it
    /// carries, its payload the first argument.
    SocketIo,
    /// Server-Sent Events: a table's changes, each with its place as the event `id`.
    Sse,
}

impl Wire {
    pub const COUNT: usize = 4;
    pub const ALL: [Wire; Wire::COUNT] = [Wire::PhoenixV1, Wire::PhoenixV2, Wire::SocketIo, Wire::Sse];

    /// Its place in per-wire tables (`PerWire`, meters).
    pub fn slot(self) -> usize {
        match self {
            Wire::PhoenixV1 => 0,
            Wire::PhoenixV2 => 1,
            Wire::SocketIo => 2,
            Wire::Sse => 3,
        }
    }

    /// The protocol's name in metrics labels.
    pub fn protocol(self) -> &'static str {
        match self {
            Wire::PhoenixV1 | Wire::PhoenixV2 => "phoenix",
            Wire::SocketIo => "socketio",
            Wire::Sse => "sse",
        }
    }

    /// The Phoenix serializer this wire speaks (`V2` for a wire that is not Phoenix: never
    /// asked of one by the code that holds it).
    pub fn vsn(self) -> phoenix::Vsn {
        match self {
            Wire::PhoenixV1 => phoenix::Vsn::V1,
            Wire::PhoenixV2 | Wire::SocketIo | Wire::Sse => phoenix::Vsn::V2,
        }
    }
}

impl From<phoenix::Vsn> for Wire {
    fn from(vsn: phoenix::Vsn) -> Wire {
        match vsn {
            phoenix::Vsn::V1 => Wire::PhoenixV1,
            phoenix::Vsn::V2 => Wire::PhoenixV2,
        }
    }
}

/// One message (or run of frames) per wire format, encoded when a member of that format first
/// needs it; `None` when the format cannot carry it (a binary payload to a JSON-only format).
pub struct PerWire<T = Message>([Option<Option<T>>; Wire::COUNT]);

impl<T> Default for PerWire<T> {
    fn default() -> Self {
        PerWire([None, None, None, None])
    }
}

impl<T: Clone> PerWire<T> {
    pub fn get_or_encode(&mut self, wire: Wire, encode: impl FnOnce(Wire) -> Option<T>) -> Option<T> {
        self.0[wire.slot()].get_or_insert_with(|| encode(wire)).clone()
    }
}

/// A broadcast's user payload as a client or the HTTP API sent it: JSON, or bytes (from
/// realtime-js's binary frame or an `application/octet-stream` body).
#[derive(Debug, Clone, PartialEq)]
pub enum BroadcastPayload {
    Json(serde_json::Value),
    Binary(bytes::Bytes),
}

/// A payload already serialized: JSON text, or bytes (realtime-js binary broadcasts).
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    Json(&'a str),
    Binary(&'a [u8]),
}

/// A `postgres_changes` message: `data` (serialized once per change and shape) for the
/// bindings `ids` of a channel `topic`, the change at `position` of `epoch`.
pub fn change(wire: Wire, topic: &str, ids: &[u32], data: &str, position: Position, epoch: &str) -> Message {
    match wire {
        Wire::Sse => sse::change(data, position, epoch),
        Wire::PhoenixV1 | Wire::PhoenixV2 => phoenix::change(wire.vsn(), topic, ids, data),
        Wire::SocketIo => {
            let mut payload = String::from("{\"ids\":");
            payload.push_str(&serde_json::Value::from(ids).to_string());
            payload.push_str(",\"data\":");
            payload.push_str(data);
            payload.push('}');
            socketio::event_message("postgres_changes", &payload)
        }
    }
}

/// A table change as a named event (Socket.IO rooms fed by `[[socketio.tables]]`): the event
/// name for each operation and the key the row goes under (`{operation, appointment}`).
#[derive(Debug)]
pub struct TableEvent {
    /// Shared by every subscription of this route, whatever room it came from: a connection
    /// in several of the route's rooms gets each change once.
    pub group: Arc<str>,
    /// The same for every subscription of the route, so their messages are encoded once.
    pub binding_id: u32,
    pub insert: Box<str>,
    pub update: Box<str>,
    pub delete: Box<str>,
    pub key: Box<str>,
}

impl TableEvent {
    /// The event name for an operation (a row leaving a member's view is a DELETE to it).
    pub fn name(&self, kind: ChangeKind) -> &str {
        match kind {
            ChangeKind::Insert => &self.insert,
            ChangeKind::Update => &self.update,
            ChangeKind::Delete | ChangeKind::Truncate => &self.delete,
        }
    }
}

/// A table change as the event `name` with `data` (`payload::event_data`) as its argument, and
/// (Socket.IO) its recovery offset: the change's position and the route, unique among what one
/// connection receives.
pub fn table_event(
    wire: Wire,
    topic: &str,
    name: &str,
    data: &str,
    position: Position,
    route: u32,
) -> Message {
    match wire {
        // Only the Socket.IO adapter makes such subscriptions.
        Wire::Sse => sse::named(name, data, None),
        Wire::SocketIo => socketio::recoverable_event(name, data, format_args!("c{position}.{route:x}")),
        // Only the Socket.IO adapter makes such subscriptions; a Phoenix member would get the
        // event as a push on its channel.
        Wire::PhoenixV1 | Wire::PhoenixV2 => match serde_json::from_str::<serde_json::Value>(data) {
            Ok(payload) => push(wire, topic, name, &payload),
            Err(_) => push(wire, topic, name, &serde_json::Value::Null),
        },
    }
}

/// A broadcast's place: its sequence on the topic, the hub's epoch, and its arrival number over
/// all topics (Socket.IO's recovery offset: unique among what one connection receives).
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    pub seq: u64,
    pub epoch: &'a str,
    pub arrival: u64,
}

/// A broadcast `event` on `topic` at `place`, as the frames one queue entry writes; `None` when
/// this wire cannot carry `body`.
pub fn broadcast(wire: Wire, topic: &str, event: &str, body: Body<'_>, place: Place<'_>) -> Option<Frames> {
    let Place { seq, epoch, arrival } = place;
    match wire {
        Wire::PhoenixV1 | Wire::PhoenixV2 => {
            phoenix::broadcast(wire.vsn(), topic, event, body, seq, epoch).map(Frames::One)
        }
        // The room's members get the event with the payload as its argument: bytes as a binary
        // attachment (socket.io-client hands the handler an ArrayBuffer).
        Wire::SocketIo => match body {
            Body::Json(json) => {
                Some(Frames::One(socketio::recoverable_event(event, json, format_args!("b{arrival:x}"))))
            }
            Body::Binary(bytes) => {
                let [text, attachment] = socketio::binary_event(event, bytes, format_args!("b{arrival:x}"));
                Some(Frames::Run(Arc::from([text, attachment])))
            }
        },
        // An event stream carries a table's changes only.
        Wire::Sse => None,
    }
}

/// A push that is not a reply (`presence_diff`, ...): `event` with a JSON `payload`.
pub fn push(wire: Wire, topic: &str, event: &str, payload: &serde_json::Value) -> Message {
    match wire {
        Wire::PhoenixV1 | Wire::PhoenixV2 => {
            Message::Text(phoenix::encode(wire.vsn(), None, None, topic, event, payload).into())
        }
        Wire::SocketIo => socketio::event_message(event, &payload.to_string()),
        Wire::Sse => sse::named(event, &payload.to_string(), None),
    }
}
