//! Engine.IO v4 and Socket.IO v5 framing (the default `socket.io-parser` encoding): frames in,
//! packets out, and back. Pure functions, no I/O, no state; what a packet *means* is the
//! session's business.
//!
//! Layering, receiving side:
//!
//! * a WebSocket text frame is one Engine.IO packet: [`decode_text`]; a WebSocket binary frame
//!   is one binary message: [`decode_binary`]; an HTTP long-polling body is several packets
//!   joined by `\x1e`, binary ones as `b` + base64: [`decode_payload`].
//! * the text of an [`EnginePacket::Message`] is one Socket.IO packet: [`decode_sio`].
//! * a `BINARY_EVENT` / `BINARY_ACK` announces `attachments` buffers, which arrive as the next
//!   that many binary messages; hand them to [`reconstruct`] (collecting them, and refusing a
//!   text message in between, is the session's job).
//!
//! Sending side: [`deconstruct`] (only if there are binary buffers), [`encode_sio`], wrap the
//! text in [`EnginePacket::Message`], then [`encode_text`] (WebSocket; buffers go as raw
//! binary frames) or [`encode_payload`] (polling; buffers as [`EnginePacket::BinaryMessage`]).
//!
//! Binary data: `serde_json::Value` has no bytes type, so buffers are never put inside a
//! `Value`. A [`BinaryLeaf`] names the place of a buffer in the packet data with an RFC 6901
//! JSON pointer (usable with [`Value::pointer`]); in the data that place holds `null`.
//! [`reconstruct`] turns the wire placeholders `{"_placeholder":true,"num":N}` into such
//! leaves, [`deconstruct`] turns leaves into placeholders.
//!
//! Where this is stricter than the JavaScript reference (all of it is traffic that reference
//! clients never send):
//!
//! * an empty Socket.IO packet is an error (JS reads it as `CONNECT /`);
//! * the attachment count must be ASCII digits (JS accepts `5-`), at most [`MAX_ATTACHMENTS`]
//!   (the JS decoder's default `maxAttachments`);
//! * `EVENT`, `ACK`, `BINARY_*` and `CONNECT_ERROR` must carry a payload (the protocol says it
//!   is mandatory; the JS decoder lets a missing one through);
//! * a namespace may not contain control characters; an ack id must fit a `u64`;
//! * placeholders must reference every attachment exactly once, with integral indices;
//! * Engine.IO `close`, `upgrade` and `noop` may not carry data (JS ignores it).

use std::fmt::Write as _;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde_json::Value;

/// Most binary attachments one Socket.IO packet may announce (decoding) or carry (encoding).
/// Same as the JavaScript decoder's default `maxAttachments`, so peers using it accept what we
/// send.
pub const MAX_ATTACHMENTS: usize = 10;

/// Event names the JavaScript parser refuses in a received `EVENT` / `BINARY_EVENT`
/// ([`decode_sio`] refuses them too).
pub const RESERVED_EVENTS: [&str; 6] =
    ["connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener"];

/// Separates packets in an HTTP long-polling payload.
pub const RECORD_SEPARATOR: char = '\x1e';

/// Standard alphabet, padded on output, padding optional on input.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why received bytes are not a valid packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty packet")]
    Empty,
    #[error("unknown packet type {0:?}")]
    UnknownPacketType(char),
    #[error("invalid base64 in binary packet")]
    InvalidBase64,
    #[error("payload not allowed for this packet type")]
    PayloadNotAllowed,
    #[error("payload required for this packet type")]
    MissingPayload,
    #[error("invalid attachment count")]
    InvalidAttachmentCount,
    #[error("too many attachments (at most {})", MAX_ATTACHMENTS)]
    TooManyAttachments,
    #[error("invalid namespace")]
    InvalidNamespace,
    #[error("invalid ack id")]
    InvalidAckId,
    #[error("invalid JSON payload: {0}")]
    InvalidJson(String),
    #[error("invalid payload: {0}")]
    InvalidPayload(&'static str),
    #[error("reserved event name {0:?}")]
    ReservedEventName(String),
    #[error("invalid attachment placeholder")]
    InvalidPlaceholder,
    #[error("expected {expected} attachments, got {got}")]
    AttachmentCountMismatch { expected: usize, got: usize },
}

/// Why packets cannot be encoded as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("text contains the record separator (0x1e) and cannot go in a polling payload")]
    RecordSeparator,
    #[error("binary attachments are only allowed in EVENT and ACK packets")]
    BinaryNotAllowed,
    #[error("too many attachments (at most {})", MAX_ATTACHMENTS)]
    TooManyAttachments,
    #[error("attachment pointer {0:?} does not resolve inside the packet data")]
    InvalidPointer(String),
    #[error("packet data already holds a placeholder, or attachment pointers overlap")]
    PlaceholderConflict,
}

/// An event to namespace `/` as one Engine.IO message frame: `42[<event>,<argument>]`, with the
/// argument already serialized JSON (shared bytes are built once for every recipient).
pub fn event_message(event: &str, argument_json: &str) -> axum::extract::ws::Message {
    let mut text = String::with_capacity(8 + event.len() + argument_json.len());
    text.push_str("42[");
    crate::json::write_string(event, &mut text);
    text.push(',');
    text.push_str(argument_json);
    text.push(']');
    axum::extract::ws::Message::Text(text.into())
}

/// An event that can be recovered (`42[<event>,<argument>,"<offset>"]`): socket.io-client keeps
/// the last argument of every event as its offset when recovery is on, and hands it back on
/// reconnecting. Offsets are ASCII letters, digits and `.`.
pub fn recoverable_event(
    event: &str,
    argument_json: &str,
    offset: impl std::fmt::Display,
) -> axum::extract::ws::Message {
    use std::fmt::Write;
    let mut text = String::with_capacity(40 + event.len() + argument_json.len());
    text.push_str("42[");
    crate::json::write_string(event, &mut text);
    text.push(',');
    text.push_str(argument_json);
    // Writing to a String cannot fail.
    let _ = write!(text, ",\"{offset}\"]");
    axum::extract::ws::Message::Text(text.into())
}

/// A recoverable event whose argument is bytes: the `BINARY_EVENT` packet with a placeholder
/// (`451-[<event>,{"_placeholder":true,"num":0},"<offset>"]`) and the attachment frame.
pub fn binary_event(
    event: &str,
    bytes: &[u8],
    offset: impl std::fmt::Display,
) -> [axum::extract::ws::Message; 2] {
    use std::fmt::Write;
    let mut text = String::with_capacity(64 + event.len());
    text.push_str("451-[");
    crate::json::write_string(event, &mut text);
    let _ = write!(text, ",{{\"_placeholder\":true,\"num\":0}},\"{offset}\"]");
    [
        axum::extract::ws::Message::Text(text.into()),
        axum::extract::ws::Message::Binary(bytes::Bytes::copy_from_slice(bytes)),
    ]
}

/// The offset a [`recoverable_event`] or [`binary_event`] frame ends with; `None` for any other
/// frame.
pub fn offset_of(message: &axum::extract::ws::Message) -> Option<&str> {
    let axum::extract::ws::Message::Text(text) = message else { return None };
    let text = text.as_str();
    let body = text.strip_prefix("42[").or_else(|| text.strip_prefix("451-["))?.strip_suffix("\"]")?;
    let start = body.rfind(",\"")? + 2;
    let offset = &body[start..];
    (!offset.is_empty() && offset.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')).then_some(offset)
}

/// A Socket.IO packet as one Engine.IO message frame (`4` + the packet; attachments, if any,
/// follow as binary frames).
pub fn packet_message(packet: &SioPacket) -> axum::extract::ws::Message {
    axum::extract::ws::Message::Text(format!("4{}", encode_sio(packet)).into())
}

/// `CONNECT_ERROR` for namespace `nsp` with `{message}`, as socket.io-client reads it.
pub fn connect_error(nsp: &str, message: &str) -> SioPacket {
    SioPacket::new(SioKind::ConnectError, nsp, Some(serde_json::json!({ "message": message })))
}

// ---------------------------------------------------------------------------------------------
// Engine.IO
// ---------------------------------------------------------------------------------------------

/// One Engine.IO v4 packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnginePacket {
    /// `0` + handshake JSON (kept as text, not parsed).
    Open(String),
    /// `1`.
    Close,
    /// `2` + optional data (`2probe` during upgrade). Decoding never yields `Some("")`.
    Ping(Option<String>),
    /// `3` + optional data (`3probe`). Decoding never yields `Some("")`.
    Pong(Option<String>),
    /// `4` + text.
    Message(String),
    /// A binary message: a raw WebSocket binary frame, or `b` + base64 in text.
    BinaryMessage(Vec<u8>),
    /// `5`.
    Upgrade,
    /// `6`.
    Noop,
}

/// Decodes one Engine.IO packet from a WebSocket text frame (also one packet of a polling
/// payload). Like the reference parser, `b` + base64 is accepted here as a binary message.
pub fn decode_text(frame: &str) -> Result<EnginePacket, DecodeError> {
    let mut chars = frame.chars();
    let kind = chars.next().ok_or(DecodeError::Empty)?;
    let data = chars.as_str();
    let optional = || (!data.is_empty()).then(|| data.to_owned());
    let bare = |packet| {
        if data.is_empty() {
            Ok(packet)
        } else {
            Err(DecodeError::PayloadNotAllowed)
        }
    };
    match kind {
        '0' => Ok(EnginePacket::Open(data.to_owned())),
        '1' => bare(EnginePacket::Close),
        '2' => Ok(EnginePacket::Ping(optional())),
        '3' => Ok(EnginePacket::Pong(optional())),
        '4' => Ok(EnginePacket::Message(data.to_owned())),
        '5' => bare(EnginePacket::Upgrade),
        '6' => bare(EnginePacket::Noop),
        'b' => BASE64.decode(data).map(EnginePacket::BinaryMessage).map_err(|_| DecodeError::InvalidBase64),
        other => Err(DecodeError::UnknownPacketType(other)),
    }
}

/// Decodes a WebSocket binary frame. In v4 the whole frame is the message (no type byte), so
/// this cannot fail; size limits are the transport's.
pub fn decode_binary(frame: &[u8]) -> EnginePacket {
    EnginePacket::BinaryMessage(frame.to_vec())
}

/// Appends the text form of `packet` to `out`: type digit + data. A `BinaryMessage` is written
/// as `b` + base64 (the polling form); on a WebSocket send its bytes as a binary frame instead.
pub fn encode_text(packet: &EnginePacket, out: &mut String) {
    let (kind, data) = match packet {
        EnginePacket::Open(data) => ('0', Some(data.as_str())),
        EnginePacket::Close => ('1', None),
        EnginePacket::Ping(data) => ('2', data.as_deref()),
        EnginePacket::Pong(data) => ('3', data.as_deref()),
        EnginePacket::Message(data) => ('4', Some(data.as_str())),
        EnginePacket::Upgrade => ('5', None),
        EnginePacket::Noop => ('6', None),
        EnginePacket::BinaryMessage(bytes) => {
            out.push('b');
            BASE64.encode_string(bytes, out);
            return;
        }
    };
    out.push(kind);
    out.push_str(data.unwrap_or(""));
}

/// Decodes an HTTP long-polling body: packets separated by `\x1e`. Fails on the first invalid
/// packet (an empty body is an empty packet, hence an error).
pub fn decode_payload(body: &str) -> Result<Vec<EnginePacket>, DecodeError> {
    body.split(RECORD_SEPARATOR).map(decode_text).collect()
}

/// Encodes packets as an HTTP long-polling body, binary ones as `b` + base64. Fails if a text
/// packet contains the separator, which would let its content be read as further packets.
pub fn encode_payload(packets: &[EnginePacket]) -> Result<String, EncodeError> {
    let mut out = String::new();
    for (i, packet) in packets.iter().enumerate() {
        if i > 0 {
            out.push(RECORD_SEPARATOR);
        }
        let start = out.len();
        encode_text(packet, &mut out);
        if out[start..].contains(RECORD_SEPARATOR) {
            return Err(EncodeError::RecordSeparator);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Socket.IO
// ---------------------------------------------------------------------------------------------

/// Socket.IO v5 packet type; the discriminant is the wire digit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SioKind {
    Connect = 0,
    Disconnect = 1,
    Event = 2,
    Ack = 3,
    ConnectError = 4,
    BinaryEvent = 5,
    BinaryAck = 6,
}

impl SioKind {
    /// The kind written as `c`, if any.
    pub fn from_char(c: char) -> Option<SioKind> {
        Some(match c {
            '0' => SioKind::Connect,
            '1' => SioKind::Disconnect,
            '2' => SioKind::Event,
            '3' => SioKind::Ack,
            '4' => SioKind::ConnectError,
            '5' => SioKind::BinaryEvent,
            '6' => SioKind::BinaryAck,
            _ => return None,
        })
    }

    /// The wire digit.
    pub fn as_char(self) -> char {
        char::from(b'0' + self as u8)
    }

    /// `BinaryEvent` or `BinaryAck`: the packet announces an attachment count.
    pub fn is_binary(self) -> bool {
        matches!(self, SioKind::BinaryEvent | SioKind::BinaryAck)
    }
}

/// One Socket.IO v5 packet:
/// `<kind>[<attachments>-][<nsp>,][<id>][<JSON data>]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SioPacket {
    pub kind: SioKind,
    /// Namespace, `"/"` by default. Encoding writes it (followed by `,`) only when it is not
    /// `"/"` (or empty); it must then start with `/` and contain no `,`, or the receiver will
    /// misread the packet. Decoded namespaces always satisfy this.
    pub nsp: String,
    /// Acknowledgement id.
    pub id: Option<u64>,
    /// JSON payload, with wire placeholders for binary attachments. `Some(Value::Null)` is
    /// written as no payload, as the reference encoder does.
    pub data: Option<Value>,
    /// Number of binary attachments that follow; only meaningful for binary kinds (decoding
    /// sets 0 for the others, encoding ignores it for them).
    pub attachments: usize,
}

impl SioPacket {
    /// A packet without id or attachments.
    pub fn new(kind: SioKind, nsp: impl Into<String>, data: Option<Value>) -> SioPacket {
        SioPacket { kind, nsp: nsp.into(), id: None, data, attachments: 0 }
    }
}

/// Decodes the text of an Engine.IO message as a Socket.IO packet, with the checks of
/// `socket.io-parser` (`isPayloadValid`, attachment count, reserved event names) plus the
/// stricter ones listed in the module docs. A namespace is recognised only when the text after
/// the type (and attachment count) starts with `/`; it runs to the first `,` or the end.
/// JSON nesting is bounded by `serde_json`'s recursion limit (128).
pub fn decode_sio(text: &str) -> Result<SioPacket, DecodeError> {
    let mut chars = text.chars();
    let first = chars.next().ok_or(DecodeError::Empty)?;
    let kind = SioKind::from_char(first).ok_or(DecodeError::UnknownPacketType(first))?;
    let mut rest = chars.as_str();

    let mut attachments = 0;
    if kind.is_binary() {
        let (count, after) = rest.split_once('-').ok_or(DecodeError::InvalidAttachmentCount)?;
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(DecodeError::InvalidAttachmentCount);
        }
        // Only digits, so the only possible parse failure is overflow.
        attachments = count.parse().map_err(|_| DecodeError::TooManyAttachments)?;
        if attachments > MAX_ATTACHMENTS {
            return Err(DecodeError::TooManyAttachments);
        }
        rest = after;
    }

    let mut nsp = "/";
    if rest.starts_with('/') {
        (nsp, rest) = rest.split_once(',').unwrap_or((rest, ""));
        if nsp.chars().any(char::is_control) {
            return Err(DecodeError::InvalidNamespace);
        }
    }

    let mut id = None;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits > 0 {
        let (number, after) = rest.split_at_checked(digits).ok_or(DecodeError::InvalidAckId)?;
        id = Some(number.parse::<u64>().map_err(|_| DecodeError::InvalidAckId)?);
        rest = after;
    }

    let data = if rest.is_empty() {
        None
    } else {
        Some(serde_json::from_str::<Value>(rest).map_err(|e| DecodeError::InvalidJson(e.to_string()))?)
    };
    check_payload(kind, data.as_ref())?;

    Ok(SioPacket { kind, nsp: nsp.to_owned(), id, data, attachments })
}

fn check_payload(kind: SioKind, data: Option<&Value>) -> Result<(), DecodeError> {
    use DecodeError::{InvalidPayload, MissingPayload};
    match (kind, data) {
        (SioKind::Connect, None | Some(Value::Object(_))) => Ok(()),
        (SioKind::Connect, Some(_)) => Err(InvalidPayload("CONNECT data must be an object")),
        (SioKind::Disconnect, None) => Ok(()),
        (SioKind::Disconnect, Some(_)) => Err(DecodeError::PayloadNotAllowed),
        (SioKind::ConnectError, Some(Value::Object(_) | Value::String(_))) => Ok(()),
        (SioKind::ConnectError, Some(_)) => {
            Err(InvalidPayload("CONNECT_ERROR data must be an object or a string"))
        }
        (SioKind::Event | SioKind::BinaryEvent, Some(Value::Array(args))) => match args.first() {
            Some(Value::String(name)) if RESERVED_EVENTS.contains(&name.as_str()) => {
                Err(DecodeError::ReservedEventName(name.clone()))
            }
            Some(Value::String(_) | Value::Number(_)) => Ok(()),
            _ => Err(InvalidPayload("event name must be a string or a number")),
        },
        (SioKind::Event | SioKind::BinaryEvent, Some(_)) => {
            Err(InvalidPayload("EVENT data must be an array"))
        }
        (SioKind::Ack | SioKind::BinaryAck, Some(Value::Array(_))) => Ok(()),
        (SioKind::Ack | SioKind::BinaryAck, Some(_)) => Err(InvalidPayload("ACK data must be an array")),
        (_, None) => Err(MissingPayload),
    }
}

/// Encodes a Socket.IO packet as the text of an Engine.IO message.
pub fn encode_sio(packet: &SioPacket) -> String {
    let mut out = String::new();
    out.push(packet.kind.as_char());
    if packet.kind.is_binary() {
        let _ = write!(out, "{}-", packet.attachments);
    }
    if !packet.nsp.is_empty() && packet.nsp != "/" {
        out.push_str(&packet.nsp);
        out.push(',');
    }
    if let Some(id) = packet.id {
        let _ = write!(out, "{id}");
    }
    match &packet.data {
        None | Some(Value::Null) => {}
        Some(data) => {
            let _ = write!(out, "{data}");
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Binary attachments
// ---------------------------------------------------------------------------------------------

/// A binary buffer inside Socket.IO packet data, at the RFC 6901 JSON `pointer` (e.g. `/1` for
/// the second event argument, `/1/file` for a field of it). In the data that place holds `null`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryLeaf {
    pub pointer: String,
    pub bytes: Vec<u8>,
}

impl BinaryLeaf {
    pub fn new(pointer: impl Into<String>, bytes: Vec<u8>) -> BinaryLeaf {
        BinaryLeaf { pointer: pointer.into(), bytes }
    }
}

/// Completes a decoded packet with the attachments that followed it. For a binary kind,
/// `buffers` must be exactly `packet.attachments` long and every placeholder
/// `{"_placeholder":true,"num":N}` must reference a distinct buffer, each buffer once. Each
/// placeholder is replaced by `null` and returned as a leaf (ordered by `num`); the packet
/// becomes a plain `Event` / `Ack` with 0 attachments, as in the reference decoder. A non-binary
/// packet takes no buffers and is left untouched. On error the packet is left untouched.
pub fn reconstruct(packet: &mut SioPacket, buffers: Vec<Vec<u8>>) -> Result<Vec<BinaryLeaf>, DecodeError> {
    let expected = if packet.kind.is_binary() { packet.attachments } else { 0 };
    if buffers.len() != expected {
        return Err(DecodeError::AttachmentCountMismatch { expected, got: buffers.len() });
    }
    if !packet.kind.is_binary() {
        return Ok(Vec::new());
    }
    let pointers = match &packet.data {
        Some(data) => placeholders(data, buffers.len())?,
        None if buffers.is_empty() => Vec::new(),
        None => return Err(DecodeError::InvalidPlaceholder),
    };
    if let Some(data) = packet.data.as_mut() {
        for pointer in &pointers {
            if let Some(slot) = data.pointer_mut(pointer) {
                *slot = Value::Null;
            }
        }
    }
    packet.kind = if packet.kind == SioKind::BinaryEvent { SioKind::Event } else { SioKind::Ack };
    packet.attachments = 0;
    Ok(pointers.into_iter().zip(buffers).map(|(pointer, bytes)| BinaryLeaf { pointer, bytes }).collect())
}

/// Prepares an `Event` / `Ack` carrying binary leaves for sending: puts placeholder `i` at the
/// pointer of `leaves[i]` (which must already exist in the data, e.g. as `null`), turns the
/// kind into `BinaryEvent` / `BinaryAck` with the attachment count, and returns the buffers to
/// send after the packet, in order. Without leaves the packet is returned unchanged. Fails if
/// the data already holds something that reads as a placeholder, or the pointers overlap.
pub fn deconstruct(
    mut packet: SioPacket,
    leaves: Vec<BinaryLeaf>,
) -> Result<(SioPacket, Vec<Vec<u8>>), EncodeError> {
    if leaves.is_empty() {
        return Ok((packet, Vec::new()));
    }
    packet.kind = match packet.kind {
        SioKind::Event | SioKind::BinaryEvent => SioKind::BinaryEvent,
        SioKind::Ack | SioKind::BinaryAck => SioKind::BinaryAck,
        _ => return Err(EncodeError::BinaryNotAllowed),
    };
    if leaves.len() > MAX_ATTACHMENTS {
        return Err(EncodeError::TooManyAttachments);
    }
    let mut buffers = Vec::with_capacity(leaves.len());
    for (num, leaf) in leaves.into_iter().enumerate() {
        let slot = match packet.data.as_mut() {
            Some(data) if !leaf.pointer.is_empty() => data.pointer_mut(&leaf.pointer),
            _ => None,
        };
        let Some(slot) = slot else { return Err(EncodeError::InvalidPointer(leaf.pointer)) };
        *slot = serde_json::json!({ "_placeholder": true, "num": num });
        buffers.push(leaf.bytes);
    }
    // What the receiver will see must be exactly our placeholders, each once.
    match &packet.data {
        Some(data) if placeholders(data, buffers.len()).is_ok() => {}
        _ => return Err(EncodeError::PlaceholderConflict),
    }
    packet.attachments = buffers.len();
    Ok((packet, buffers))
}

/// Pointers of the placeholders in `data`, indexed by `num`; each of `0..count` exactly once.
/// Iterative and linear in the size of `data`, so arbitrarily deep values cannot overflow the
/// stack: the walk records each node's parent and key, and spells out a pointer only for a
/// placeholder.
fn placeholders(data: &Value, count: usize) -> Result<Vec<String>, DecodeError> {
    const ROOT: usize = usize::MAX;
    let mut found: Vec<Option<String>> = vec![None; count];
    let mut path: Vec<(usize, Token<'_>)> = Vec::new();
    let mut stack: Vec<(&Value, usize)> = vec![(data, ROOT)];
    while let Some((value, node)) = stack.pop() {
        match value {
            Value::Object(map) if map.get("_placeholder") == Some(&Value::Bool(true)) => {
                let num =
                    map.get("num").and_then(placeholder_index).ok_or(DecodeError::InvalidPlaceholder)?;
                match found.get_mut(num) {
                    Some(slot) if slot.is_none() => *slot = Some(pointer_of(&path, node)),
                    _ => return Err(DecodeError::InvalidPlaceholder),
                }
            }
            Value::Object(map) => {
                for (key, child) in map {
                    path.push((node, Token::Key(key)));
                    stack.push((child, path.len() - 1));
                }
            }
            Value::Array(items) => {
                for (index, child) in items.iter().enumerate() {
                    path.push((node, Token::Index(index)));
                    stack.push((child, path.len() - 1));
                }
            }
            _ => {}
        }
    }
    found.into_iter().map(|p| p.ok_or(DecodeError::InvalidPlaceholder)).collect()
}

enum Token<'a> {
    Key(&'a str),
    Index(usize),
}

/// The RFC 6901 pointer of `node` in the parent-linked `path` of [`placeholders`].
fn pointer_of(path: &[(usize, Token<'_>)], mut node: usize) -> String {
    let mut tokens = Vec::new();
    while let Some((parent, token)) = path.get(node) {
        tokens.push(token);
        node = *parent;
    }
    let mut pointer = String::new();
    for token in tokens.into_iter().rev() {
        pointer.push('/');
        match token {
            Token::Index(index) => {
                let _ = write!(pointer, "{index}");
            }
            Token::Key(key) => {
                for c in key.chars() {
                    match c {
                        '~' => pointer.push_str("~0"),
                        '/' => pointer.push_str("~1"),
                        c => pointer.push(c),
                    }
                }
            }
        }
    }
    pointer
}

/// A placeholder's `num`: a non-negative integer (`0.0` counts, as in JavaScript).
fn placeholder_index(num: &Value) -> Option<usize> {
    if let Some(n) = num.as_u64() {
        return usize::try_from(n).ok();
    }
    let f = num.as_f64()?;
    if f >= 0.0 && f.fract() == 0.0 && f <= MAX_ATTACHMENTS as f64 {
        Some(f as usize)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::XorShift;
    use serde_json::json;

    fn sio(text: &str) -> SioPacket {
        match decode_sio(text) {
            Ok(packet) => packet,
            Err(e) => panic!("{text:?}: {e}"),
        }
    }

    fn packet(kind: SioKind, nsp: &str, id: Option<u64>, data: Option<Value>) -> SioPacket {
        SioPacket { kind, nsp: nsp.into(), id, data, attachments: 0 }
    }

    fn text(packet: &EnginePacket) -> String {
        let mut out = String::new();
        encode_text(packet, &mut out);
        out
    }

    // --- Engine.IO -------------------------------------------------------------------------

    #[test]
    fn engine_spec_examples() {
        let open = r#"0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#;
        let cases = [
            (open, EnginePacket::Open(open[1..].to_owned())),
            ("1", EnginePacket::Close),
            ("2", EnginePacket::Ping(None)),
            ("2probe", EnginePacket::Ping(Some("probe".into()))),
            ("3", EnginePacket::Pong(None)),
            ("3probe", EnginePacket::Pong(Some("probe".into()))),
            ("4hello", EnginePacket::Message("hello".into())),
            ("4", EnginePacket::Message(String::new())),
            ("4€ü", EnginePacket::Message("€ü".into())),
            ("5", EnginePacket::Upgrade),
            ("6", EnginePacket::Noop),
            ("bAQIDBA==", EnginePacket::BinaryMessage(vec![1, 2, 3, 4])),
            ("b", EnginePacket::BinaryMessage(Vec::new())),
        ];
        for (wire, expected) in cases {
            assert_eq!(decode_text(wire), Ok(expected.clone()), "{wire:?}");
            assert_eq!(text(&expected), wire);
        }
        assert_eq!(decode_text("bAQIDBA"), Ok(EnginePacket::BinaryMessage(vec![1, 2, 3, 4])));
        let open: Value = match decode_text(open) {
            Ok(EnginePacket::Open(json)) => serde_json::from_str(&json).unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(open["pingInterval"], 25000);
    }

    #[test]
    fn engine_binary_frame_is_a_message() {
        assert_eq!(decode_binary(&[1, 2, 3, 4]), EnginePacket::BinaryMessage(vec![1, 2, 3, 4]));
        assert_eq!(decode_binary(b"4hello"), EnginePacket::BinaryMessage(b"4hello".to_vec()));
    }

    #[test]
    fn polling_payloads() {
        use EnginePacket::*;
        assert_eq!(
            decode_payload("4hello\x1e4world"),
            Ok(vec![Message("hello".into()), Message("world".into())])
        );
        assert_eq!(
            decode_payload("4hello\x1e2\x1e4world"),
            Ok(vec![Message("hello".into()), Ping(None), Message("world".into())])
        );
        let mixed = vec![Message("hello".into()), BinaryMessage(vec![1, 2, 3, 4])];
        assert_eq!(decode_payload("4hello\x1ebAQIDBA=="), Ok(mixed.clone()));
        assert_eq!(encode_payload(&mixed).as_deref(), Ok("4hello\x1ebAQIDBA=="));
        assert_eq!(decode_payload(r#"42["hello"]"#), Ok(vec![Message(r#"2["hello"]"#.into())]));
        assert_eq!(encode_payload(&[]).as_deref(), Ok(""));
        assert_eq!(encode_payload(&[Noop]).as_deref(), Ok("6"));
    }

    #[test]
    fn engine_malformed() {
        assert_eq!(decode_text(""), Err(DecodeError::Empty));
        assert_eq!(decode_text("7"), Err(DecodeError::UnknownPacketType('7')));
        assert_eq!(decode_text("x4"), Err(DecodeError::UnknownPacketType('x')));
        assert_eq!(decode_text("é"), Err(DecodeError::UnknownPacketType('é')));
        assert_eq!(decode_text("b!!!"), Err(DecodeError::InvalidBase64));
        assert_eq!(decode_text("1x"), Err(DecodeError::PayloadNotAllowed));
        assert_eq!(decode_text("5probe"), Err(DecodeError::PayloadNotAllowed));
        assert_eq!(decode_payload(""), Err(DecodeError::Empty));
        assert_eq!(decode_payload("4a\x1e\x1e4b"), Err(DecodeError::Empty));
        assert_eq!(decode_payload("4a\x1e9"), Err(DecodeError::UnknownPacketType('9')));
        assert_eq!(
            encode_payload(&[EnginePacket::Message("a\x1e1".into())]),
            Err(EncodeError::RecordSeparator)
        );
        assert_eq!(DecodeError::UnknownPacketType('x').to_string(), "unknown packet type 'x'");
    }

    // --- Socket.IO -------------------------------------------------------------------------

    /// Examples from the protocol documents, after the Engine.IO `4` has been stripped.
    #[test]
    fn sio_spec_examples() {
        use SioKind::*;
        let placeholder = json!({"_placeholder": true, "num": 0});
        let cases = [
            ("0", packet(Connect, "/", None, None)),
            ("0/admin,", packet(Connect, "/admin", None, None)),
            ("0/admin,{\"token\":\"123\"}", packet(Connect, "/admin", None, Some(json!({"token": "123"})))),
            (
                "0{\"sid\":\"wZX3oN0bSVIhsaknAAAI\"}",
                packet(Connect, "/", None, Some(json!({"sid": "wZX3oN0bSVIhsaknAAAI"}))),
            ),
            ("1", packet(Disconnect, "/", None, None)),
            ("1/admin,", packet(Disconnect, "/admin", None, None)),
            ("2[\"hello\",\"world\"]", packet(Event, "/", None, Some(json!(["hello", "world"])))),
            ("2/admin,[\"bar\"]", packet(Event, "/admin", None, Some(json!(["bar"])))),
            ("212[\"foo\"]", packet(Event, "/", Some(12), Some(json!(["foo"])))),
            ("2/admin,13[\"foo\"]", packet(Event, "/admin", Some(13), Some(json!(["foo"])))),
            ("2/admin,1[\"tellme\"]", packet(Event, "/admin", Some(1), Some(json!(["tellme"])))),
            ("3/admin,13[\"bar\"]", packet(Ack, "/admin", Some(13), Some(json!(["bar"])))),
            ("312[]", packet(Ack, "/", Some(12), Some(json!([])))),
            (
                "4{\"message\":\"Not authorized\"}",
                packet(ConnectError, "/", None, Some(json!({"message": "Not authorized"}))),
            ),
            ("4\"Unauthorized\"", packet(ConnectError, "/", None, Some(json!("Unauthorized")))),
            ("2[1,\"a\",{}]", packet(Event, "/", None, Some(json!([1, "a", {}])))),
            (
                "51-[\"hello\",{\"_placeholder\":true,\"num\":0}]",
                SioPacket {
                    attachments: 1,
                    ..packet(BinaryEvent, "/", None, Some(json!(["hello", placeholder])))
                },
            ),
            (
                "61-/admin,13[{\"_placeholder\":true,\"num\":0}]",
                SioPacket {
                    attachments: 1,
                    ..packet(BinaryAck, "/admin", Some(13), Some(json!([placeholder])))
                },
            ),
            (
                "52-/admin,[\"baz\",{\"_placeholder\":true,\"num\":0},{\"_placeholder\":true,\"num\":1}]",
                SioPacket {
                    attachments: 2,
                    ..packet(
                        BinaryEvent,
                        "/admin",
                        None,
                        Some(json!(["baz", placeholder, {"_placeholder": true, "num": 1}])),
                    )
                },
            ),
        ];
        for (wire, expected) in cases {
            assert_eq!(sio(wire), expected, "{wire:?}");
            assert_eq!(encode_sio(&expected), wire);
        }
    }

    /// The full stack: Engine.IO frames as they appear on the wire.
    #[test]
    fn engine_then_sio() {
        for (frame, kind, nsp) in [
            ("40", SioKind::Connect, "/"),
            ("40/admin,{\"token\":\"123\"}", SioKind::Connect, "/admin"),
            ("42[\"hello\",\"world\"]", SioKind::Event, "/"),
            ("42/admin,13[\"foo\"]", SioKind::Event, "/admin"),
            ("43/admin,13[\"bar\"]", SioKind::Ack, "/admin"),
            ("44{\"message\":\"Not authorized\"}", SioKind::ConnectError, "/"),
            ("451-[\"hello\",{\"_placeholder\":true,\"num\":0}]", SioKind::BinaryEvent, "/"),
            ("461-/admin,13[{\"_placeholder\":true,\"num\":0}]", SioKind::BinaryAck, "/admin"),
        ] {
            let Ok(EnginePacket::Message(body)) = decode_text(frame) else { panic!("{frame:?}") };
            let packet = sio(&body);
            assert_eq!((packet.kind, packet.nsp.as_str()), (kind, nsp), "{frame:?}");
            assert_eq!(text(&EnginePacket::Message(encode_sio(&packet))), frame);
        }
        assert_eq!(sio("2/admin,13[\"foo\"]").id, Some(13));
    }

    #[test]
    fn sio_lenient_like_the_reference() {
        // Namespace without the trailing comma, id on any kind, leading zeros, whitespace.
        assert_eq!(sio("1/admin"), packet(SioKind::Disconnect, "/admin", None, None));
        assert_eq!(sio("0/admin,7"), packet(SioKind::Connect, "/admin", Some(7), None));
        assert_eq!(sio("2007[\"a\"]").id, Some(7));
        assert_eq!(sio("2 [\"a\"] ").data, Some(json!(["a"])));
        assert_eq!(sio("2/,[\"a\"]").nsp, "/");
        assert_eq!(sio("3[]").id, None);
        assert_eq!(sio(&format!("3{}[]", u64::MAX)).id, Some(u64::MAX));
        assert_eq!(sio("510-[\"a\"]").attachments, 10);
        assert_eq!(sio("50-[\"a\"]").attachments, 0);
    }

    #[test]
    fn sio_malformed() {
        use DecodeError::*;
        let err = |text: &str| decode_sio(text).expect_err(text);
        assert_eq!(err(""), Empty);
        assert_eq!(err("7"), UnknownPacketType('7'));
        assert_eq!(err("999"), UnknownPacketType('9'));
        assert_eq!(err("x"), UnknownPacketType('x'));
        // Attachment count (socket.io-parser test cases, plus bounds).
        for text in ["5", "51", "5a-", "51.23-", "5-[\"a\"]", "5+1-[\"a\"]", "6 1-[]"] {
            assert_eq!(err(text), InvalidAttachmentCount, "{text:?}");
        }
        assert_eq!(err("511-[\"a\"]"), TooManyAttachments);
        assert_eq!(err("599999999999999999999999999-[\"a\"]"), TooManyAttachments);
        assert_eq!(
            err(r#"53-["hello",{"_placeholder":true,"num":0}]"#.replace("53", "5111").as_str()),
            TooManyAttachments
        );
        // Ack ids.
        assert_eq!(err("218446744073709551616[\"a\"]"), InvalidAckId);
        // Namespace.
        assert_eq!(err("2/ad\x1emin,[\"a\"]"), InvalidNamespace);
        assert_eq!(err("2/ad\nmin,[\"a\"]"), InvalidNamespace);
        // JSON.
        assert!(matches!(err("442[\"some\",\"data\""), InvalidJson(_)));
        assert!(matches!(err("2/admin,\"invalid"), InvalidJson(_)));
        assert!(matches!(err("2[\"a\"]x"), InvalidJson(_)));
        assert!(matches!(err("2[\"a\"][\"b\"]"), InvalidJson(_)));
        assert!(matches!(err("2admin,[\"a\"]"), InvalidJson(_)));
        assert!(matches!(err("2 "), InvalidJson(_)));
        assert!(matches!(err(&format!("2{}", "[".repeat(100_000))), InvalidJson(_)));
        // Payload shapes (socket.io-parser test cases).
        assert!(matches!(err("0/admin,\"invalid\""), InvalidPayload(_)));
        assert!(matches!(err("0[]"), InvalidPayload(_)));
        assert_eq!(err("1/admin,{}"), PayloadNotAllowed);
        assert!(matches!(err("2/admin,{}"), InvalidPayload(_)));
        assert!(matches!(err("2[{\"toString\":\"foo\"}]"), InvalidPayload(_)));
        assert!(matches!(err("2[true,\"foo\"]"), InvalidPayload(_)));
        assert!(matches!(err("2[null,\"bar\"]"), InvalidPayload(_)));
        assert!(matches!(err("2[]"), InvalidPayload(_)));
        assert_eq!(err("2[\"connect\"]"), ReservedEventName("connect".into()));
        assert_eq!(err("2[\"disconnect\",\"123\"]"), ReservedEventName("disconnect".into()));
        assert_eq!(err("51-[\"newListener\"]"), ReservedEventName("newListener".into()));
        assert!(matches!(err("3{}"), InvalidPayload(_)));
        assert!(matches!(err("4[]"), InvalidPayload(_)));
        assert!(matches!(err("4null"), InvalidPayload(_)));
        for text in ["2", "2/admin,", "212", "3", "31", "4", "51-", "61-/a,1"] {
            assert_eq!(err(text), MissingPayload, "{text:?}");
        }
        assert_eq!(err("512-").to_string(), "too many attachments (at most 10)");
    }

    #[test]
    fn sio_encoding_details() {
        let mut p = packet(SioKind::Connect, "", None, Some(Value::Null));
        assert_eq!(encode_sio(&p), "0");
        p.kind = SioKind::BinaryEvent;
        p.attachments = 3; // written for binary kinds only
        p.data = Some(json!(["a"]));
        assert_eq!(encode_sio(&p), "53-[\"a\"]");
        p.kind = SioKind::Event;
        assert_eq!(encode_sio(&p), "2[\"a\"]");
        assert_eq!(SioKind::BinaryAck.as_char(), '6');
        assert_eq!(SioKind::from_char('4'), Some(SioKind::ConnectError));
        assert_eq!(SioKind::from_char('7'), None);
    }

    // --- Binary attachments ----------------------------------------------------------------

    #[test]
    fn reconstruct_and_deconstruct() {
        let wire =
            r#"52-/admin,7["baz",{"_placeholder":true,"num":1},{"a~/b":[{"_placeholder":true,"num":0}]}]"#;
        let mut p = sio(wire);
        let leaves = reconstruct(&mut p, vec![vec![1, 2], vec![3, 4]]).unwrap();
        assert_eq!(
            leaves,
            vec![BinaryLeaf::new("/2/a~0~1b/0", vec![1, 2]), BinaryLeaf::new("/1", vec![3, 4])]
        );
        assert_eq!(
            p,
            packet(SioKind::Event, "/admin", Some(7), Some(json!(["baz", null, {"a~/b": [null]}])))
        );
        assert!(p.data.as_ref().unwrap().pointer(&leaves[0].pointer).is_some());

        let (out, buffers) = deconstruct(p, leaves).unwrap();
        assert_eq!(buffers, vec![vec![1, 2], vec![3, 4]]);
        assert_eq!(out.kind, SioKind::BinaryEvent);
        assert_eq!(out.attachments, 2);
        assert_eq!(
            encode_sio(&out),
            r#"52-/admin,7["baz",{"_placeholder":true,"num":1},{"a~/b":[{"_placeholder":true,"num":0}]}]"#
        );
    }

    #[test]
    fn deconstruct_binary_ack_spec_example() {
        let ack = SioPacket { id: Some(15), ..packet(SioKind::Ack, "/", None, Some(json!(["bar", null]))) };
        let (out, buffers) = deconstruct(ack, vec![BinaryLeaf::new("/1", vec![1, 2, 3, 4])]).unwrap();
        assert_eq!(encode_sio(&out), r#"61-15["bar",{"_placeholder":true,"num":0}]"#);
        assert_eq!(buffers, vec![vec![1, 2, 3, 4]]);
        // Without leaves nothing changes.
        let event = packet(SioKind::Event, "/", None, Some(json!(["a"])));
        assert_eq!(deconstruct(event.clone(), Vec::new()), Ok((event, Vec::new())));
    }

    #[test]
    fn reconstruct_errors() {
        use DecodeError::*;
        let rec = |wire: &str, buffers: usize| reconstruct(&mut sio(wire), vec![vec![0]; buffers]);
        let ph = |num: &str| format!(r#"51-["a",{{"_placeholder":true,"num":{num}}}]"#);
        assert_eq!(rec(&ph("0"), 0), Err(AttachmentCountMismatch { expected: 1, got: 0 }));
        assert_eq!(rec(&ph("0"), 2), Err(AttachmentCountMismatch { expected: 1, got: 2 }));
        assert_eq!(rec("2[\"a\"]", 1), Err(AttachmentCountMismatch { expected: 0, got: 1 }));
        for num in ["1", "-1", "0.5", "\"0\"", "null", "1e300"] {
            assert_eq!(rec(&ph(num), 1), Err(InvalidPlaceholder), "{num}");
        }
        assert_eq!(rec(r#"51-["a",{"_placeholder":true}]"#, 1), Err(InvalidPlaceholder));
        assert_eq!(rec(r#"51-["a"]"#, 1), Err(InvalidPlaceholder)); // buffer never referenced
        let twice = r#"52-["a",{"_placeholder":true,"num":0},{"_placeholder":true,"num":0}]"#;
        assert_eq!(rec(twice, 2), Err(InvalidPlaceholder));
        assert_eq!(rec(r#"50-["a",{"_placeholder":true,"num":0}]"#, 0), Err(InvalidPlaceholder));
        // Accepted: integral float index, extra keys, non-placeholder look-alikes.
        assert!(rec(&ph("0.0"), 1).is_ok());
        assert!(rec(r#"51-["a",{"_placeholder":true,"num":0,"x":1},{"_placeholder":"yes"}]"#, 1).is_ok());
        // Plain packets keep look-alikes as plain JSON.
        let mut plain = sio(&ph("0").replacen("51-", "2", 1));
        assert_eq!(reconstruct(&mut plain, Vec::new()), Ok(Vec::new()));
        assert_eq!(plain.data.unwrap()[1]["_placeholder"], true);
        // A failed reconstruct leaves the packet as it was.
        let mut p = sio(twice);
        let before = p.clone();
        assert!(reconstruct(&mut p, vec![vec![0]; 2]).is_err());
        assert_eq!(p, before);
    }

    #[test]
    fn deconstruct_errors() {
        use EncodeError::*;
        let event = packet(SioKind::Event, "/", None, Some(json!(["a", null, {"k": null}])));
        let leaf = |p: &str| BinaryLeaf::new(p, vec![9]);
        let dec = |p: &SioPacket, leaves: Vec<BinaryLeaf>| deconstruct(p.clone(), leaves).map(|_| ());
        assert_eq!(
            dec(&packet(SioKind::Connect, "/", None, Some(json!({}))), vec![leaf("/x")]),
            Err(BinaryNotAllowed)
        );
        assert_eq!(dec(&event, vec![leaf("/1"); 11]), Err(TooManyAttachments));
        assert_eq!(dec(&event, vec![leaf("/5")]), Err(InvalidPointer("/5".into())));
        assert_eq!(dec(&event, vec![leaf("")]), Err(InvalidPointer(String::new())));
        assert_eq!(dec(&event, vec![leaf("1")]), Err(InvalidPointer("1".into())));
        assert_eq!(
            dec(&packet(SioKind::Event, "/", None, None), vec![leaf("/1")]),
            Err(InvalidPointer("/1".into()))
        );
        assert_eq!(dec(&event, vec![leaf("/1"), leaf("/1")]), Err(PlaceholderConflict));
        assert_eq!(dec(&event, vec![leaf("/2/k"), leaf("/2")]), Err(PlaceholderConflict));
        assert_eq!(dec(&event, vec![leaf("/2"), leaf("/2/num")]), Err(PlaceholderConflict));
        let lookalike =
            packet(SioKind::Event, "/", None, Some(json!(["a", null, {"_placeholder": true, "num": 0}])));
        assert_eq!(dec(&lookalike, vec![leaf("/1")]), Err(PlaceholderConflict));
        assert_eq!(dec(&event, vec![leaf("/1"), leaf("/2/k")]), Ok(()));
        assert_eq!(dec(&event, vec![leaf("/1"); MAX_ATTACHMENTS]).unwrap_err(), PlaceholderConflict);
    }

    #[test]
    fn deep_values_do_not_overflow_the_stack() {
        let mut deep = json!(null);
        for _ in 0..100_000 {
            deep = Value::Array(vec![deep]);
        }
        let event =
            packet(SioKind::Event, "/", None, Some(Value::Array(vec![json!("a"), Value::Null, deep])));
        let (mut out, buffers) = deconstruct(event, vec![BinaryLeaf::new("/1", vec![1])]).unwrap();
        assert_eq!(buffers.len(), 1);
        assert_eq!(reconstruct(&mut out, buffers).unwrap()[0].pointer, "/1");
        // serde_json drops nested values recursively; unwind it by hand to be safe.
        let mut value = out.data.take();
        while let Some(Value::Array(mut items)) = value {
            value = items.pop();
        }
    }

    // --- Fuzz ------------------------------------------------------------------------------

    const SEEDS: &[&str] = &[
        r#"0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#,
        "2probe",
        "3probe",
        "4hello\x1e4world",
        "4hello\x1e2\x1ebAQIDBA==",
        "5",
        "6",
        "40",
        "40/admin,{\"token\":\"123\"}",
        "42[\"hello\",\"world\"]",
        "42/admin,13[\"foo\"]",
        "43/admin,13[\"bar\"]",
        "44{\"message\":\"Not authorized\"}",
        "451-[\"hello\",{\"_placeholder\":true,\"num\":0}]",
        "461-/admin,13[{\"_placeholder\":true,\"num\":0}]",
        "52-/admin,[\"baz\",{\"_placeholder\":true,\"num\":0},{\"x\":{\"_placeholder\":true,\"num\":1}}]",
        "1/admin,",
        "212[\"foo\",1.5e3,-0,null,true,{\"a\":[]}]",
    ];

    const ALPHABET: &[u8] = b"0123456789-/,[]{}\":.eE+ bntfu\\\x1e_placeholdernum";

    fn mutate(rng: &mut XorShift) -> Vec<u8> {
        if rng.below(10) == 0 {
            let len = rng.below(64);
            return (0..len).map(|_| rng.next() as u8).collect();
        }
        let mut input = SEEDS[rng.below(SEEDS.len())].as_bytes().to_vec();
        for _ in 0..=rng.below(4) {
            let at = rng.below(input.len() + 1);
            match rng.below(7) {
                0 => input.insert(at, ALPHABET[rng.below(ALPHABET.len())]),
                1 => input.insert(at, rng.next() as u8),
                2 if at < input.len() => {
                    input.remove(at);
                }
                3 if at < input.len() => input[at] = ALPHABET[rng.below(ALPHABET.len())],
                4 => input.truncate(at),
                5 => {
                    let other = SEEDS[rng.below(SEEDS.len())].as_bytes();
                    let from = rng.below(other.len());
                    input.splice(at..at, other[from..].iter().copied());
                }
                _ => {
                    let digits = rng.next().to_string();
                    input.splice(at..at, digits.bytes().take(1 + rng.below(20)));
                }
            }
        }
        input
    }

    /// Equality up to float rounding: without its `float_roundtrip` feature serde_json may
    /// parse a printed float back one ULP off.
    fn same_value(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
                let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
                (x - y).abs() <= x.abs().max(y.abs()) * 1e-15
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
            }
            _ => a == b,
        }
    }

    fn same_packet(a: &SioPacket, b: &SioPacket) -> bool {
        let data = match (&a.data, &b.data) {
            (Some(x), Some(y)) => same_value(x, y),
            (x, y) => x == y,
        };
        data && SioPacket { data: None, ..a.clone() } == SioPacket { data: None, ..b.clone() }
    }

    #[test]
    fn fuzz_decoders_never_panic_and_round_trip() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let (mut ok_engine, mut ok_sio, mut ok_binary) = (0, 0, 0);
        for _ in 0..100_000 {
            let bytes = mutate(&mut rng);
            let input = String::from_utf8_lossy(&bytes);
            // Engine.IO decoders, then decode(encode(p)) == p.
            assert_eq!(decode_binary(&bytes), EnginePacket::BinaryMessage(bytes.clone()));
            if let Ok(p) = decode_text(&input) {
                ok_engine += 1;
                assert_eq!(decode_text(&text(&p)).as_ref(), Ok(&p), "{input:?}");
            }
            if let Ok(packets) = decode_payload(&input) {
                let body = encode_payload(&packets).expect("decoded text has no separator");
                assert_eq!(decode_payload(&body), Ok(packets), "{input:?}");
            }
            // Socket.IO, on the whole input and on an Engine.IO message body.
            for candidate in [&input[..], input.get(1..).unwrap_or("")] {
                let Ok(p) = decode_sio(candidate) else { continue };
                ok_sio += 1;
                let again = decode_sio(&encode_sio(&p)).expect("re-decodes");
                assert!(same_packet(&again, &p), "{candidate:?}: {again:?} != {p:?}");
                let count = if rng.below(4) == 0 { rng.below(12) } else { p.attachments };
                let buffers: Vec<Vec<u8>> = (0..count).map(|n| vec![n as u8; n]).collect();
                let mut plain = p.clone();
                let Ok(leaves) = reconstruct(&mut plain, buffers) else { continue };
                ok_binary += 1;
                let (again, buffers) = deconstruct(plain.clone(), leaves.clone()).expect("inverse");
                let mut back = sio(&encode_sio(&again));
                assert_eq!(reconstruct(&mut back, buffers), Ok(leaves), "{candidate:?}");
                assert!(same_packet(&back, &plain), "{candidate:?}");
            }
        }
        // The mutator must reach the interesting paths, not only errors.
        assert!(
            ok_engine > 10_000 && ok_sio > 10_000 && ok_binary > 1_000,
            "{ok_engine} {ok_sio} {ok_binary}"
        );
    }
}
