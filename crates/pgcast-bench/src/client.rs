//! One simulated client: a WebSocket connection from a chosen 127.0.0.x source address that
//! speaks the Supabase Realtime protocol (vsn 2.0.0 array frames), joins one channel with a
//! subscription shape, heartbeats like realtime-js, and counts what it receives.
//!
//! A delivery is any frame carrying `"sent_at_us":<n>` (a bench row in `postgres_changes`, or a
//! bench broadcast, JSON text or realtime-js binary frame): it is found by a byte scan, not a
//! JSON parse, so the client stays cheap at hundreds of thousands of frames per second, and its
//! latency (now - sent_at_us, same machine clock) goes into the process's shared histogram.
//! Control frames (replies, `system`, `phx_error`, `phx_close`) are parsed as JSON.
//!
//! This is not a realtime-js replacement: no reconnect, no resume, one channel per connection.
//!
//! With [`Protocol::SocketIo`] the client speaks Socket.IO v5 over an Engine.IO v4 WebSocket
//! instead (what `socket.io-client` with `transports: ['websocket']` sends): CONNECT, one room
//! joined with `join` (or the bench table's `subscribe:bench` filter), pongs to the server's
//! pings; a delivery is found the same way.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::histogram::Recorder;

/// The table the bench writes and subscribes to.
pub const TABLE: &str = "bench_rows";
/// Bytes that mark a delivery; the number after it is the sender's clock in µs.
const SENT_MARK: &[u8] = b"\"sent_at_us\":";
const CONNECT_ATTEMPTS: u32 = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Distinct problem texts kept per process (the rest are counted under "other").
const MAX_PROBLEM_KINDS: usize = 50;

/// The protocol the clients speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Supabase Realtime (Phoenix channels, vsn 2.0.0).
    #[default]
    Phoenix,
    /// Socket.IO v5 over an Engine.IO v4 WebSocket.
    Socketio,
}

/// The spawned server's config for Socket.IO clients: the bench table's changes as the event
/// `bench` to room `bench_rows` (table-wide) and to the `subscribe:bench` filter `{user}`
/// (own rows).
pub const SOCKETIO_SERVER_CONFIG: &[&str] = &[
    "[[socketio.tables]]",
    "table = \"public.bench_rows\"",
    "event = \"bench\"",
    "key = \"row\"",
    "rooms = [\"bench_rows\"]",
    "subscribe = \"subscribe:bench\"",
    "filters = { user = \"user_id\" }",
];

/// What a client subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// `postgres_changes` on the bench table filtered to its own rows: `user_id=eq.<k>`.
    OwnRows,
    /// `postgres_changes` on the whole bench table.
    TableWide,
    /// The bench broadcast topic (no postgres_changes).
    Broadcast,
    /// Connected, no channel joined.
    None,
}

pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// A client's standing, as seen by the process that runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Standing {
    Pending = 0,
    /// Connected and joined (or just connected, for [`Shape::None`]).
    Held = 1,
    /// Never connected or never joined.
    Failed = 2,
    /// Was held, then the connection ended before the bench stopped it.
    Lost = 3,
}

/// Per-client counters, read by the process's stage accounting. A cache line each: clients on
/// different threads must not contend on their neighbours' counters.
#[derive(Default)]
#[repr(align(64))]
pub struct ClientSlot {
    standing: AtomicU8,
    pub received: AtomicU64,
    pub last_received_us: AtomicU64,
}

impl ClientSlot {
    pub fn standing(&self) -> Standing {
        match self.standing.load(Ordering::Acquire) {
            1 => Standing::Held,
            2 => Standing::Failed,
            3 => Standing::Lost,
            _ => Standing::Pending,
        }
    }

    fn set(&self, standing: Standing) {
        self.standing.store(standing as u8, Ordering::Release);
    }
}

/// Counters shared by every client of one process.
pub struct Shared {
    pub slots: Box<[ClientSlot]>,
    pub latency: Recorder,
    /// The first delivery's time (the last one's is the latest of the slots', kept there: a
    /// shared "latest" would be written on every delivery by every thread).
    pub first_received_us: AtomicU64,
    pub connected: AtomicU64,
    pub connect_errors: AtomicU64,
    pub connect_retries: AtomicU64,
    pub join_errors: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub disconnects: AtomicU64,
    /// Problem text -> occurrences (join refusals, error replies, close reasons).
    pub problems: Mutex<BTreeMap<String, u64>>,
    pub connect_gate: Semaphore,
    pub stop: watch::Receiver<bool>,
}

impl Shared {
    pub fn new(clients: usize, connect_concurrency: usize, stop: watch::Receiver<bool>) -> Shared {
        Shared {
            slots: (0..clients).map(|_| ClientSlot::default()).collect(),
            latency: Recorder::default(),
            first_received_us: AtomicU64::new(u64::MAX),
            connected: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            connect_retries: AtomicU64::new(0),
            join_errors: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            problems: Mutex::new(BTreeMap::new()),
            connect_gate: Semaphore::new(connect_concurrency.max(1)),
            stop,
        }
    }

    pub fn problem(&self, text: String) {
        let mut problems = self.problems.lock().unwrap_or_else(|p| p.into_inner());
        let key = if problems.len() < MAX_PROBLEM_KINDS || problems.contains_key(&text) {
            text
        } else {
            "other".to_string()
        };
        *problems.entry(key).or_insert(0) += 1;
    }

    fn delivered(&self, slot: &ClientSlot, sent_us: u64) {
        let now = now_us();
        self.latency.record(now.saturating_sub(sent_us));
        slot.received.fetch_add(1, Ordering::Relaxed);
        slot.last_received_us.store(now, Ordering::Relaxed);
        crate::histogram::lower_to(&self.first_received_us, now);
    }

    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }
}

/// Everything one client needs to connect and join.
pub struct ClientSpec {
    /// Index into the process's slots.
    pub slot: usize,
    pub protocol: Protocol,
    pub shape: Shape,
    /// The user id whose rows an [`Shape::OwnRows`] client subscribes to.
    pub user: u64,
    pub source: Ipv4Addr,
    pub server: SocketAddr,
    pub token: String,
    pub broadcast_topic: String,
    pub heartbeat: Duration,
    /// First heartbeat after this long, so clients do not heartbeat in lockstep.
    pub heartbeat_offset: Duration,
}

type Ws = WebSocketStream<TcpStream>;

/// Small buffers on the client side too: 18,000 connections in one process must stay cheap.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
}

pub fn websocket_url(protocol: Protocol, server: SocketAddr, token: &str) -> String {
    match protocol {
        Protocol::Phoenix => format!("ws://{server}/realtime/v1/websocket?apikey={token}&vsn=2.0.0"),
        Protocol::Socketio => format!("ws://{server}/socket.io/?EIO=4&transport=websocket&token={token}"),
    }
}

/// Opens a WebSocket from `source` (port chosen by the kernel) to `server`.
pub async fn open(
    protocol: Protocol,
    source: Option<Ipv4Addr>,
    server: SocketAddr,
    token: &str,
) -> Result<Ws, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    if let Some(source) = source {
        socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).map_err(|e| format!("bind {source}: {e}"))?;
    }
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(server))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let url = websocket_url(protocol, server, token);
    let (ws, _) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config())),
    )
    .await
    .map_err(|_| "WebSocket handshake timed out".to_string())?
    .map_err(|e| format!("WebSocket handshake: {e}"))?;
    Ok(ws)
}

/// The topic and `phx_join` payload for a shape.
pub fn join_frame(shape: Shape, user: u64, broadcast_topic: &str) -> Option<(String, Value)> {
    let (topic, bindings) = match shape {
        Shape::None => return None,
        Shape::OwnRows => (
            format!("realtime:user-{user}"),
            json!([{"event": "*", "schema": "public", "table": TABLE, "filter": format!("user_id=eq.{user}")}]),
        ),
        Shape::TableWide => {
            (format!("realtime:{TABLE}"), json!([{"event": "*", "schema": "public", "table": TABLE}]))
        }
        Shape::Broadcast => (format!("realtime:{broadcast_topic}"), json!([])),
    };
    let payload = json!({
        "config": {
            "broadcast": {"ack": false, "self": false},
            "presence": {"key": ""},
            "postgres_changes": bindings,
            "private": false
        }
    });
    Some((topic, payload))
}

/// The `sent_at_us` a frame carries, if it is a bench delivery.
pub fn sent_at(frame: &[u8]) -> Option<u64> {
    // Every delivery is searched: a SIMD substring search keeps the bench's own CPU use (which
    // competes with the server on a shared machine) low.
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(SENT_MARK));
    let start = FINDER.find(frame)? + SENT_MARK.len();
    let digits = frame[start..].iter().take_while(|b| b.is_ascii_digit());
    let mut value: u64 = 0;
    let mut any = false;
    for b in digits {
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

/// A parsed control frame: `(ref, topic, event, payload)`.
fn control(frame: &[u8]) -> Option<(Option<String>, String, String, Value)> {
    let Value::Array(mut parts) = serde_json::from_slice::<Value>(frame).ok()? else { return None };
    if parts.len() != 5 {
        return None;
    }
    let payload = parts.pop()?;
    let event = parts.pop()?.as_str()?.to_string();
    let topic = parts.pop()?.as_str()?.to_string();
    let msg_ref = parts.pop()?.as_str().map(str::to_string);
    Some((msg_ref, topic, event, payload))
}

fn reason(payload: &Value) -> String {
    payload
        .pointer("/response/reason")
        .or_else(|| payload.get("reason"))
        .or_else(|| payload.get("message"))
        .and_then(Value::as_str)
        .unwrap_or("(no reason given)")
        .to_string()
}

const JOIN_REF: &str = "1";

/// What a control frame means for the client.
enum Control {
    Joined,
    JoinRefused(String),
    Problem(String),
    Nothing,
}

fn classify(frame: &[u8]) -> Control {
    let Some((msg_ref, _topic, event, payload)) = control(frame) else { return Control::Nothing };
    let status = payload.get("status").and_then(Value::as_str).unwrap_or("");
    match event.as_str() {
        "phx_reply" if msg_ref.as_deref() == Some(JOIN_REF) => {
            if status == "ok" {
                Control::Joined
            } else {
                Control::JoinRefused(reason(&payload))
            }
        }
        "phx_reply" if status != "ok" => Control::Problem(format!("error reply: {}", reason(&payload))),
        "phx_error" => Control::Problem(format!("phx_error: {}", reason(&payload))),
        "system" if status == "error" => Control::Problem(format!("system error: {}", reason(&payload))),
        "phx_close" => Control::Problem("channel closed by the server".into()),
        _ => Control::Nothing,
    }
}

/// Runs one client until the process is told to stop or the connection ends.
pub async fn run(spec: ClientSpec, shared: Arc<Shared>) {
    let slot = &shared.slots[spec.slot];
    let mut ws = match connect_with_retries(&spec, &shared).await {
        Ok(ws) => ws,
        Err(problem) => {
            shared.connect_errors.fetch_add(1, Ordering::Relaxed);
            shared.problem(format!("connect failed: {problem}"));
            slot.set(Standing::Failed);
            return;
        }
    };
    shared.connected.fetch_add(1, Ordering::Relaxed);
    if spec.protocol == Protocol::Socketio {
        return run_socketio(spec, shared.clone(), ws).await;
    }
    let mut stop = shared.stop.clone();
    let join = join_frame(spec.shape, spec.user, &spec.broadcast_topic);
    let mut join_deadline = None;
    if let Some((topic, payload)) = &join {
        let frame = json!([JOIN_REF, JOIN_REF, topic, "phx_join", payload]).to_string();
        if let Err(e) = ws.send(Message::Text(frame.into())).await {
            shared.join_errors.fetch_add(1, Ordering::Relaxed);
            shared.problem(format!("join not sent: {e}"));
            slot.set(Standing::Failed);
            return;
        }
        join_deadline = Some(tokio::time::Instant::now() + JOIN_TIMEOUT);
    } else {
        slot.set(Standing::Held);
    }
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + spec.heartbeat_offset + spec.heartbeat,
        spec.heartbeat,
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeats: u64 = 0;
    // Made once, not per message: re-registering a watch waiter on every frame costs the bench
    // CPU that the server (on the same machine) would otherwise have.
    let stopped = stop.changed();
    tokio::pin!(stopped);
    let ending: Option<String> = loop {
        tokio::select! {
            incoming = ws.next() => {
                let bytes: &[u8] = match &incoming {
                    Some(Ok(Message::Text(text))) => text.as_bytes(),
                    Some(Ok(Message::Binary(bytes))) => bytes,
                    Some(Ok(Message::Close(frame))) => {
                        break Some(match frame {
                            Some(f) => format!("closed by server: {} {}", u16::from(f.code), f.reason),
                            None => "closed by server".to_string(),
                        });
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => break Some(format!("socket error: {e}")),
                    None => break Some("connection ended".into()),
                };
                if let Some(sent) = sent_at(bytes) {
                    shared.delivered(slot, sent);
                    continue;
                }
                if !matches!(incoming, Some(Ok(Message::Text(_)))) {
                    continue;
                }
                match classify(bytes) {
                    Control::Joined => {
                        join_deadline = None;
                        slot.set(Standing::Held);
                    }
                    Control::JoinRefused(why) => {
                        shared.join_errors.fetch_add(1, Ordering::Relaxed);
                        shared.problem(format!("join refused: {why}"));
                        slot.set(Standing::Failed);
                        return;
                    }
                    Control::Problem(what) => {
                        shared.protocol_errors.fetch_add(1, Ordering::Relaxed);
                        shared.problem(what);
                    }
                    Control::Nothing => {}
                }
            }
            _ = heartbeat.tick() => {
                heartbeats += 1;
                let frame = format!("[null,\"h{heartbeats}\",\"phoenix\",\"heartbeat\",{{}}]");
                if let Err(e) = ws.send(Message::Text(frame.into())).await {
                    break Some(format!("heartbeat not sent: {e}"));
                }
            }
            _ = sleep_until_opt(join_deadline) => {
                shared.join_errors.fetch_add(1, Ordering::Relaxed);
                shared.problem(format!("no join reply within {JOIN_TIMEOUT:?}"));
                slot.set(Standing::Failed);
                return;
            }
            _ = &mut stopped => break None,
        }
    };
    finish(ending, slot, &shared, &mut ws).await;
}

/// The Socket.IO event that joins a shape's room or filter (ack id 1); `None`: nothing to join.
pub fn socketio_join(shape: Shape, user: u64, broadcast_topic: &str) -> Option<String> {
    match shape {
        Shape::None => None,
        Shape::OwnRows => Some(format!("421[\"subscribe:bench\",{{\"user\":{user}}}]")),
        Shape::TableWide => Some("421[\"join\",\"bench_rows\"]".into()),
        Shape::Broadcast => Some(format!("421[\"join\",{}]", json!(broadcast_topic))),
    }
}

/// What a Socket.IO frame (an Engine.IO text message) means for the client.
fn classify_socketio(frame: &str) -> SocketIoFrame {
    match frame.as_bytes() {
        [b'2', ..] if frame == "2" => SocketIoFrame::Ping,
        // Engine.IO's open packet: CONNECT to namespace `/` (the token was in the handshake).
        [b'0', ..] => SocketIoFrame::Open,
        [b'4', b'0', ..] => SocketIoFrame::Connected,
        [b'4', b'4', ..] => SocketIoFrame::Refused(frame[2..].to_string()),
        [b'4', b'3', b'1', ..] => {
            if frame.contains("\"ok\":true") {
                SocketIoFrame::Joined
            } else {
                SocketIoFrame::Refused(frame[3..].to_string())
            }
        }
        [b'4', b'1', ..] => SocketIoFrame::Problem("disconnected by the server".into()),
        [b'4', b'2', ..] if frame.starts_with("42[\"error\"") => {
            SocketIoFrame::Problem(frame[2..].to_string())
        }
        _ => SocketIoFrame::Nothing,
    }
}

enum SocketIoFrame {
    Open,
    Ping,
    Connected,
    Joined,
    Refused(String),
    Problem(String),
    Nothing,
}

/// [`run`] for a Socket.IO client: CONNECT (the token went in the handshake), the shape's
/// join, pongs; deliveries counted as for Phoenix.
async fn run_socketio(spec: ClientSpec, shared: Arc<Shared>, mut ws: Ws) {
    let slot = &shared.slots[spec.slot];
    let mut stop = shared.stop.clone();
    let stopped = stop.changed();
    tokio::pin!(stopped);
    let mut join_deadline = Some(tokio::time::Instant::now() + JOIN_TIMEOUT);
    let ending: Option<String> = loop {
        tokio::select! {
            incoming = ws.next() => {
                let text = match &incoming {
                    Some(Ok(Message::Text(text))) => text.as_str(),
                    Some(Ok(Message::Close(_))) => break Some("closed by server".into()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => break Some(format!("socket error: {e}")),
                    None => break Some("connection ended".into()),
                };
                if let Some(sent) = sent_at(text.as_bytes()) {
                    shared.delivered(slot, sent);
                    continue;
                }
                let reply = match classify_socketio(text) {
                    SocketIoFrame::Open => Some("40".to_string()),
                    SocketIoFrame::Ping => Some("3".to_string()),
                    SocketIoFrame::Nothing => None,
                    SocketIoFrame::Connected => match socketio_join(spec.shape, spec.user, &spec.broadcast_topic) {
                        Some(join) => Some(join),
                        None => {
                            join_deadline = None;
                            slot.set(Standing::Held);
                            None
                        }
                    },
                    SocketIoFrame::Joined => {
                        join_deadline = None;
                        slot.set(Standing::Held);
                        None
                    }
                    SocketIoFrame::Refused(why) => {
                        shared.join_errors.fetch_add(1, Ordering::Relaxed);
                        shared.problem(format!("join refused: {why}"));
                        slot.set(Standing::Failed);
                        return;
                    }
                    SocketIoFrame::Problem(what) => {
                        shared.protocol_errors.fetch_add(1, Ordering::Relaxed);
                        shared.problem(what);
                        None
                    }
                };
                if let Some(reply) = reply {
                    if let Err(e) = ws.send(Message::Text(reply.into())).await {
                        break Some(format!("send failed: {e}"));
                    }
                }
            }
            _ = sleep_until_opt(join_deadline) => {
                shared.join_errors.fetch_add(1, Ordering::Relaxed);
                shared.problem(format!("no join ack within {JOIN_TIMEOUT:?}"));
                slot.set(Standing::Failed);
                return;
            }
            _ = &mut stopped => break None,
        }
    };
    finish(ending, slot, &shared, &mut ws).await;
}

/// How a client's loop ended: lost (not stopped by the bench) or closed politely.
async fn finish(ending: Option<String>, slot: &ClientSlot, shared: &Shared, ws: &mut Ws) {
    match ending {
        Some(why) if !shared.stopping() => {
            if slot.standing() == Standing::Held {
                slot.set(Standing::Lost);
                shared.disconnects.fetch_add(1, Ordering::Relaxed);
            } else {
                shared.join_errors.fetch_add(1, Ordering::Relaxed);
                slot.set(Standing::Failed);
            }
            shared.problem(why);
        }
        _ => {
            // Stopped by the bench: close politely but do not wait for the server.
            let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
        }
    }
}

async fn connect_with_retries(spec: &ClientSpec, shared: &Shared) -> Result<Ws, String> {
    let Ok(_permit) = shared.connect_gate.acquire().await else {
        return Err("bench is shutting down".into());
    };
    let mut last = String::new();
    for attempt in 0..CONNECT_ATTEMPTS {
        if attempt > 0 {
            shared.connect_retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
        }
        match open(spec.protocol, Some(spec.source), spec.server, &spec.token).await {
            Ok(ws) => return Ok(ws),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_are_recognised_in_text_and_binary_frames() {
        let change = br#"[null,null,"realtime:t","postgres_changes",{"data":{"record":{"id":1,"user_id":3,"sent_at_us":1700000000123456,"body":"x"}}}]"#;
        assert_eq!(sent_at(change), Some(1_700_000_000_123_456));
        let mut binary = vec![4, 10, 5, 3, 1];
        binary.extend(b"realtime:bbench{}{\"sent_at_us\":42,\"seq\":1}");
        assert_eq!(sent_at(&binary), Some(42));
        assert_eq!(sent_at(br#"["1","1","realtime:t","phx_reply",{"status":"ok"}]"#), None);
        assert_eq!(sent_at(br#"{"sent_at_us":"#), None);
    }

    #[test]
    fn socketio_frames_are_classified_and_joins_written() {
        assert!(matches!(classify_socketio("2"), SocketIoFrame::Ping));
        assert!(matches!(classify_socketio("40{\"sid\":\"a\",\"pid\":\"b\"}"), SocketIoFrame::Connected));
        assert!(matches!(classify_socketio("431[{\"ok\":true}]"), SocketIoFrame::Joined));
        assert!(matches!(classify_socketio("431[{\"error\":\"no\"}]"), SocketIoFrame::Refused(_)));
        assert!(matches!(classify_socketio("44{\"message\":\"invalid token\"}"), SocketIoFrame::Refused(_)));
        assert!(matches!(classify_socketio("42[\"error\",\"slow\",\"0\"]"), SocketIoFrame::Problem(_)));
        assert!(matches!(classify_socketio("0{\"sid\":\"x\"}"), SocketIoFrame::Open));
        assert!(matches!(classify_socketio("6"), SocketIoFrame::Nothing));
        assert_eq!(
            socketio_join(Shape::OwnRows, 7, "t").as_deref(),
            Some("421[\"subscribe:bench\",{\"user\":7}]")
        );
        assert_eq!(socketio_join(Shape::Broadcast, 0, "b-1").as_deref(), Some("421[\"join\",\"b-1\"]"));
        assert_eq!(socketio_join(Shape::None, 0, "t"), None);
    }

    #[test]
    fn control_frames_are_classified() {
        assert!(matches!(
            classify(br#"["1","1","realtime:t","phx_reply",{"status":"ok","response":{}}]"#),
            Control::Joined
        ));
        assert!(matches!(
            classify(br#"["1","1","realtime:t","phx_reply",{"status":"error","response":{"reason":"no"}}]"#),
            Control::JoinRefused(r) if r == "no"
        ));
        assert!(matches!(
            classify(br#"[null,"h1","phoenix","phx_reply",{"status":"error","response":{"reason":"rate"}}]"#),
            Control::Problem(_)
        ));
        assert!(matches!(
            classify(br#"[null,"h1","phoenix","phx_reply",{"status":"ok","response":{}}]"#),
            Control::Nothing
        ));
    }
}
