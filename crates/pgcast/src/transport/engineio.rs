//! Engine.IO v4, the transport under Socket.IO: a session (`sid`) that starts on HTTP
//! long-polling or directly on a WebSocket, upgrades from polling to a WebSocket (`2probe` /
//! `3probe` / `5`), and is kept alive by the server's pings (`2`, answered `3`).
//!
//! Shape: the HTTP handler ([`Engines::handle`]) never touches a session's state; it hands each
//! request (a poll, a posted payload, an upgraded WebSocket) to the session's task through a
//! small channel and answers with what the task replies. The task owns [`EngineTransport`],
//! which implements [`Transport`]: the session loop reads Engine.IO *messages* from it (the
//! Socket.IO packets) and feeds it complete Engine.IO packets (`4…` text, raw binary), which it
//! writes as WebSocket frames or joins with `\x1e` into the next poll's response. Everything
//! buffered is bounded by `max_payload`; a client that stops polling is cut off.
//!
//! What a message means is the protocol adapter's business; this knows packets, not events.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::Message;
use axum::extract::FromRequestParts;
use axum::http::{header, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::websocket::{WebSocketTransport, WebSocketUpgrade};
use super::{Incoming, Transport, TransportError, CLOSE_TIMEOUT};
use crate::outbound::Outbound;
use crate::protocol::socketio::{self as codec, EnginePacket};

/// How long a client's close over polling waits for the poll it may have in flight.
const CLOSE_RACE: Duration = Duration::from_millis(50);

/// Engine.IO settings (Socket.IO's names and defaults).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// Largest polling body or WebSocket message accepted, and the most bytes buffered for a
    /// client between polls.
    pub max_payload: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(20),
            max_payload: 1_000_000,
        }
    }
}

/// What the handshake request carried, for whoever runs the session (authentication, audit).
#[derive(Debug, Clone)]
pub struct Handshake {
    pub sid: Box<str>,
    pub peer: SocketAddr,
    pub query: HashMap<String, String>,
    /// The `Authorization` header, if it was valid text.
    pub authorization: Option<String>,
}

/// Starts whatever runs a new Engine.IO session (a Socket.IO session, an echo loop), or says
/// why it cannot (503 to a polling handshake; a WebSocket is closed).
pub type Spawn = Arc<dyn Fn(EngineTransport, Handshake) -> Result<(), String> + Send + Sync>;

/// Engine.IO's error codes and messages, as its reference server sends them (400, JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EngineError {
    UnknownTransport,
    UnknownSid,
    BadHandshakeMethod,
    BadRequest,
    UnsupportedProtocolVersion,
}

impl EngineError {
    fn response(self) -> Response {
        let (code, message) = match self {
            EngineError::UnknownTransport => (0, "Transport unknown"),
            EngineError::UnknownSid => (1, "Session ID unknown"),
            EngineError::BadHandshakeMethod => (2, "Bad handshake method"),
            EngineError::BadRequest => (3, "Bad request"),
            EngineError::UnsupportedProtocolVersion => (5, "Unsupported protocol version"),
        };
        let body = serde_json::json!({ "code": code, "message": message }).to_string();
        (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

/// A request handed to a session's task.
enum Request2Session {
    /// A `GET`: answered with the next payload.
    Poll(oneshot::Sender<PollReply>),
    /// A `POST`: its body, answered once the packets are taken. Boxed: the channel allocates
    /// room for 32 requests per session up front, and every variant is a pointer this way.
    Post(Box<(bytes::Bytes, oneshot::Sender<PostReply>)>),
    /// A WebSocket opened with this session's `sid`: the upgrade probe.
    Upgrade(Box<WebSocketTransport>),
    /// The client sent what ends the session (a body over `max_payload`).
    Abort,
}

// A pointer and a tag: what every session's request channel holds room for 32 of.
const _: () = assert!(std::mem::size_of::<Request2Session>() <= 16);

enum PollReply {
    Payload(String),
    /// A second poll while one is waiting (400; the session is closed).
    Duplicate,
    /// The session moved to a WebSocket (400 "Bad request").
    Upgraded,
}

enum PostReply {
    Ok,
    /// The payload could not be read (the session is closed).
    Invalid,
    Upgraded,
}

/// What the HTTP side keeps of a session.
struct Shared {
    /// How HTTP requests reach the session's task; none for a session opened on a WebSocket,
    /// which never takes one (its polls are refused, a second WebSocket closed), so it holds
    /// no channel.
    requests: Option<mpsc::Sender<Request2Session>>,
    /// Whether the session is on its WebSocket (polling requests are refused).
    upgraded: std::sync::atomic::AtomicBool,
    /// When the session is dead unless a pong came: a request arriving after it is refused
    /// even if the session's timer has not fired yet.
    dead_at: Mutex<Option<Instant>>,
}

/// Every Engine.IO session of one endpoint (`/socket.io/`), by `sid`.
pub struct Engines {
    config: EngineConfig,
    sessions: Mutex<HashMap<Box<str>, Arc<Shared>>>,
    spawn: Spawn,
}

impl Engines {
    pub fn new(config: EngineConfig, spawn: Spawn) -> Arc<Engines> {
        Arc::new(Engines { config, sessions: Mutex::new(HashMap::new()), spawn })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Sessions open now.
    pub fn len(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, sid: &str) -> Option<Arc<Shared>> {
        self.sessions.lock().ok()?.get(sid).cloned()
    }

    fn remove(&self, sid: &str) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.remove(sid);
        }
    }

    /// Answers one HTTP request to the endpoint (any method), as engine.io's `verify` orders
    /// the checks: transport, sid, method, protocol version.
    pub async fn handle(self: &Arc<Engines>, peer: SocketAddr, request: Request<Body>) -> Response {
        let (mut parts, body) = request.into_parts();
        if parts.method == Method::OPTIONS {
            return cors(StatusCode::NO_CONTENT.into_response());
        }
        let query: HashMap<String, String> =
            axum::extract::Query::try_from_uri(&parts.uri).map(|q| q.0).unwrap_or_default();
        let websocket = match query.get("transport").map(String::as_str) {
            Some("polling") => false,
            Some("websocket") => true,
            _ => return cors(EngineError::UnknownTransport.response()),
        };
        let upgrade = if websocket {
            match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
                Ok(upgrade) => Some(upgrade),
                Err(_) => return cors(EngineError::BadRequest.response()),
            }
        } else {
            None
        };
        if let Some(sid) = query.get("sid") {
            let Some(shared) = self.lookup(sid) else { return cors(EngineError::UnknownSid.response()) };
            let dead = shared.dead_at.lock().ok().and_then(|d| *d).is_some_and(|at| Instant::now() >= at);
            if dead {
                return cors(EngineError::UnknownSid.response());
            }
            return match upgrade {
                Some(upgrade) => self.upgrade_existing(shared, upgrade),
                None if shared.upgraded.load(std::sync::atomic::Ordering::Acquire) => {
                    cors(EngineError::BadRequest.response())
                }
                None if parts.method == Method::GET => cors(poll(&shared).await),
                None if parts.method == Method::POST => cors(self.post(&shared, body).await),
                None => cors(EngineError::BadRequest.response()),
            };
        }
        if parts.method != Method::GET {
            return cors(EngineError::BadHandshakeMethod.response());
        }
        if query.get("EIO").map(String::as_str) != Some("4") {
            return cors(EngineError::UnsupportedProtocolVersion.response());
        }
        let authorization =
            parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
        let sid: Box<str> = crate::random::hex_id().into();
        let handshake = Handshake { sid: sid.clone(), peer, query, authorization };
        match upgrade {
            Some(upgrade) => self.open_websocket(handshake, upgrade),
            None => self.open_polling(handshake),
        }
    }

    /// Registers a session: with a request channel when it starts on long-polling, upgraded
    /// (and without one) when it starts on a WebSocket.
    fn register(
        self: &Arc<Engines>,
        sid: &str,
        polling: bool,
    ) -> (Arc<Shared>, Option<mpsc::Receiver<Request2Session>>) {
        let (tx, rx) = if polling {
            let (tx, rx) = mpsc::channel(4);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let shared = Arc::new(Shared {
            requests: tx,
            upgraded: std::sync::atomic::AtomicBool::new(!polling),
            dead_at: Mutex::new(None),
        });
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.insert(sid.into(), shared.clone());
        }
        (shared, rx)
    }

    fn open_packet(&self, sid: &str, upgrades: bool) -> String {
        let upgrades: &[&str] = if upgrades { &["websocket"] } else { &[] };
        let open = serde_json::json!({
            "sid": sid,
            "upgrades": upgrades,
            "pingInterval": self.config.ping_interval.as_millis() as u64,
            "pingTimeout": self.config.ping_timeout.as_millis() as u64,
            "maxPayload": self.config.max_payload,
        });
        let mut text = String::new();
        codec::encode_text(&EnginePacket::Open(open.to_string()), &mut text);
        text
    }

    /// A polling handshake: the open packet is this request's body; the session starts now.
    fn open_polling(self: &Arc<Engines>, handshake: Handshake) -> Response {
        let (shared, rx) = self.register(&handshake.sid, true);
        let body = self.open_packet(&handshake.sid, true);
        let transport =
            EngineTransport::new(self.clone(), shared, rx, handshake.sid.clone(), Mode::polling());
        if let Err(reason) = (self.spawn)(transport, handshake) {
            let body = serde_json::json!({ "code": 503, "message": reason }).to_string();
            let refused =
                (StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "application/json")], body);
            return cors(refused.into_response());
        }
        cors(text_response(body))
    }

    /// A WebSocket-only session: the open packet is its first frame.
    fn open_websocket(self: &Arc<Engines>, handshake: Handshake, upgrade: WebSocketUpgrade) -> Response {
        let engines = self.clone();
        let max = self.config.max_payload;
        upgrade.on_upgrade(max, move |mut socket| async move {
            let open = engines.open_packet(&handshake.sid, false);
            if socket.send(Message::Text(open.into())).await.is_err() {
                return;
            }
            let (shared, rx) = engines.register(&handshake.sid, false);
            let sid = handshake.sid.clone();
            let transport = EngineTransport::new(engines.clone(), shared, rx, sid, Mode::WebSocket(socket));
            // Refused: dropping the transport closes its WebSocket.
            let _ = (engines.spawn)(transport, handshake);
        })
    }

    /// A WebSocket for an existing session: the probe of an upgrade. A session that already has
    /// its WebSocket gets this one accepted and closed at once (as engine.io does).
    fn upgrade_existing(&self, shared: Arc<Shared>, upgrade: WebSocketUpgrade) -> Response {
        upgrade.on_upgrade(self.config.max_payload, move |mut socket| async move {
            if shared.upgraded.load(std::sync::atomic::Ordering::Acquire) {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
            let Some(requests) = &shared.requests else {
                let _ = socket.send(Message::Close(None)).await;
                return;
            };
            if let Err(mpsc::error::SendError(Request2Session::Upgrade(mut socket))) =
                requests.send(Request2Session::Upgrade(Box::new(socket))).await
            {
                let _ = socket.send(Message::Close(None)).await;
            }
        })
    }

    async fn post(&self, shared: &Shared, body: Body) -> Response {
        let Some(requests) = &shared.requests else { return EngineError::BadRequest.response() };
        let max = self.config.max_payload;
        let bytes = match axum::body::to_bytes(body, max).await {
            Ok(bytes) => bytes,
            Err(_) => {
                // Too large (or cut off): the session cannot continue, as in engine.io.
                let _ = requests.send(Request2Session::Abort).await;
                return StatusCode::PAYLOAD_TOO_LARGE.into_response();
            }
        };
        let (tx, rx) = oneshot::channel();
        if requests.send(Request2Session::Post(Box::new((bytes, tx)))).await.is_err() {
            return EngineError::UnknownSid.response();
        }
        match rx.await {
            Ok(PostReply::Ok) => {
                ([(header::CONTENT_TYPE, "text/html"), (header::CACHE_CONTROL, "no-store")], "ok")
                    .into_response()
            }
            Ok(PostReply::Upgraded) => EngineError::BadRequest.response(),
            Ok(PostReply::Invalid) | Err(_) => EngineError::BadRequest.response(),
        }
    }
}

async fn poll(shared: &Shared) -> Response {
    let Some(requests) = &shared.requests else { return EngineError::BadRequest.response() };
    let (tx, rx) = oneshot::channel();
    if requests.send(Request2Session::Poll(tx)).await.is_err() {
        return EngineError::UnknownSid.response();
    }
    match rx.await {
        Ok(PollReply::Payload(body)) => text_response(body),
        Ok(PollReply::Duplicate) => StatusCode::BAD_REQUEST.into_response(),
        Ok(PollReply::Upgraded) => EngineError::BadRequest.response(),
        // The session ended while this poll waited: what it would have said last.
        Err(_) => text_response("1".to_string()),
    }
}

fn text_response(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=UTF-8"), (header::CACHE_CONTROL, "no-store")], body)
        .into_response()
}

/// Engine.IO clients run in browsers on other origins (the seed apps' dev servers).
fn cors(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET,POST,OPTIONS"));
    headers
        .insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization,content-type"));
    response
}

/// How the session reaches its client now. Unboxed: most sessions end on the WebSocket and
/// keep it for their whole life.
#[allow(clippy::large_enum_variant)]
enum Mode {
    Polling {
        /// Packets waiting for the next poll, joined by the record separator.
        out: String,
        /// A poll waiting for packets.
        waiting: Option<oneshot::Sender<PollReply>>,
    },
    WebSocket(WebSocketTransport),
}

impl Mode {
    fn polling() -> Mode {
        Mode::Polling { out: String::new(), waiting: None }
    }
}

/// One Engine.IO session, as its task sees it: a [`Transport`] of Engine.IO messages.
pub struct EngineTransport {
    engines: Arc<Engines>,
    shared: Arc<Shared>,
    sid: Box<str>,
    requests: Option<mpsc::Receiver<Request2Session>>,
    mode: Mode,
    /// A WebSocket probing an upgrade (`2probe` answered, `5` not yet received).
    probe: Option<Box<WebSocketTransport>>,
    /// Messages taken from a posted payload, not yet returned by `recv`.
    stash: VecDeque<Incoming>,
    /// Packets that waited for a poll when the session upgraded, to go over the WebSocket.
    carry: VecDeque<Message>,
    next_ping: Instant,
    /// Set when a ping is out: the session ends at this time unless a pong comes.
    pong_due: Option<Instant>,
}

impl Drop for EngineTransport {
    fn drop(&mut self) {
        self.engines.remove(&self.sid);
    }
}

impl EngineTransport {
    fn new(
        engines: Arc<Engines>,
        shared: Arc<Shared>,
        requests: Option<mpsc::Receiver<Request2Session>>,
        sid: Box<str>,
        mode: Mode,
    ) -> EngineTransport {
        let next_ping = Instant::now() + engines.config.ping_interval;
        EngineTransport {
            engines,
            shared,
            sid,
            requests,
            mode,
            probe: None,
            stash: VecDeque::new(),
            carry: VecDeque::new(),
            next_ping,
            pong_due: None,
        }
    }

    pub fn sid(&self) -> &str {
        &self.sid
    }

    fn config(&self) -> &EngineConfig {
        &self.engines.config
    }

    fn pong(&mut self) {
        self.pong_due = None;
        self.next_ping = Instant::now() + self.config().ping_interval;
        if let Ok(mut dead) = self.shared.dead_at.lock() {
            *dead = None;
        }
    }

    /// A packet from the client (either transport). `None`: nothing for the session.
    fn client_packet(&mut self, packet: EnginePacket) -> Result<Option<Incoming>, ()> {
        match packet {
            EnginePacket::Message(text) => Ok(Some(Incoming::Text(text.into()))),
            EnginePacket::BinaryMessage(bytes) => Ok(Some(Incoming::Binary(bytes.into()))),
            EnginePacket::Pong(_) => {
                self.pong();
                Ok(Some(Incoming::Control))
            }
            EnginePacket::Close => Ok(Some(Incoming::Close)),
            EnginePacket::Noop => Ok(None),
            // Only the server pings; open and upgrade are not the client's to send here.
            EnginePacket::Ping(_) | EnginePacket::Open(_) | EnginePacket::Upgrade => Err(()),
        }
    }

    /// Takes one request from the HTTP side.
    async fn request(&mut self, request: Request2Session) -> Option<Incoming> {
        match request {
            Request2Session::Poll(reply) => {
                let Mode::Polling { out, waiting } = &mut self.mode else {
                    let _ = reply.send(PollReply::Upgraded);
                    return None;
                };
                if let Some(first) = waiting.take() {
                    // Two polls at once: a broken client; engine.io closes the session.
                    let _ = first.send(PollReply::Payload("1".into()));
                    let _ = reply.send(PollReply::Duplicate);
                    return Some(Incoming::Gone);
                }
                if self.probe.is_some() {
                    // Upgrading: the poll is released so the client can switch.
                    let _ = reply.send(PollReply::Payload("6".into()));
                } else if out.is_empty() {
                    *waiting = Some(reply);
                } else {
                    let _ = reply.send(PollReply::Payload(std::mem::take(out)));
                }
                None
            }
            Request2Session::Post(post) => {
                let (body, reply) = *post;
                if !matches!(self.mode, Mode::Polling { .. }) {
                    let _ = reply.send(PostReply::Upgraded);
                    return None;
                }
                let packets =
                    std::str::from_utf8(&body).ok().and_then(|text| codec::decode_payload(text).ok());
                let Some(packets) = packets else {
                    let _ = reply.send(PostReply::Invalid);
                    return Some(Incoming::Gone);
                };
                let mut closed = false;
                for packet in packets {
                    match self.client_packet(packet) {
                        Ok(Some(Incoming::Close)) => closed = true,
                        Ok(Some(incoming)) => self.stash.push_back(incoming),
                        Ok(None) => {}
                        Err(()) => {
                            let _ = reply.send(PostReply::Invalid);
                            return Some(Incoming::Gone);
                        }
                    }
                }
                let _ = reply.send(PostReply::Ok);
                if closed {
                    self.stash.push_back(Incoming::Close);
                    // The client closes: its waiting poll is released with a noop. The poll and
                    // the close travel on two HTTP connections, so the poll may arrive just
                    // after: it is given a moment, and answered the same way.
                    let waiting = match &mut self.mode {
                        Mode::Polling { waiting, .. } => waiting.take(),
                        Mode::WebSocket(_) => None,
                    };
                    match waiting {
                        Some(waiting) => {
                            let _ = waiting.send(PollReply::Payload("6".into()));
                        }
                        None => {
                            let late =
                                tokio::time::timeout(CLOSE_RACE, next_request(&mut self.requests)).await;
                            if let Ok(Some(Request2Session::Poll(poll))) = late {
                                let _ = poll.send(PollReply::Payload("6".into()));
                            }
                        }
                    }
                }
                self.stash.pop_front()
            }
            Request2Session::Abort => Some(Incoming::Gone),
            Request2Session::Upgrade(mut socket) => {
                if self.probe.is_some() || matches!(self.mode, Mode::WebSocket(_)) {
                    let _ = socket.send(Message::Close(None)).await;
                } else {
                    self.probe = Some(socket);
                }
                None
            }
        }
    }

    /// A frame on the probing WebSocket. `Err`: the probe failed (it is dropped).
    ///
    /// Like everything `recv` awaits, cancel-safe: the loop drops `recv` whenever its queue
    /// has something to write, so no state is held across an await but in `self`.
    async fn probe_frame(&mut self, frame: Incoming) -> Result<(), ()> {
        let packet = match frame {
            Incoming::Text(text) => codec::decode_text(text.as_str()).map_err(|_| ())?,
            Incoming::Control => return Ok(()),
            _ => return Err(()),
        };
        match packet {
            EnginePacket::Ping(Some(data)) if data == "probe" => {
                if let Mode::Polling { waiting, .. } = &mut self.mode {
                    if let Some(waiting) = waiting.take() {
                        let _ = waiting.send(PollReply::Payload("6".into()));
                    }
                }
                let Some(probe) = &mut self.probe else { return Err(()) };
                probe.send(Message::Text("3probe".into())).await.map_err(|_| ())
            }
            EnginePacket::Upgrade => {
                let Some(probe) = self.probe.take() else { return Err(()) };
                if let Mode::Polling { out, waiting } =
                    std::mem::replace(&mut self.mode, Mode::WebSocket(*probe))
                {
                    if let Some(waiting) = waiting {
                        let _ = waiting.send(PollReply::Payload("6".into()));
                    }
                    // What waited for a poll goes over the WebSocket, packet by packet.
                    for packet in codec::decode_payload(&out).unwrap_or_default() {
                        self.carry.push_back(match packet {
                            EnginePacket::BinaryMessage(bytes) => Message::Binary(bytes.into()),
                            other => {
                                let mut text = String::new();
                                codec::encode_text(&other, &mut text);
                                Message::Text(text.into())
                            }
                        });
                    }
                }
                self.shared.upgraded.store(true, std::sync::atomic::Ordering::Release);
                Ok(())
            }
            _ => Err(()),
        }
    }

    /// Writes what was buffered for polling when the session upgraded; a message leaves
    /// `carry` only once the socket took it.
    async fn drain_carry(&mut self) -> Result<(), TransportError> {
        let Mode::WebSocket(socket) = &mut self.mode else { return Ok(()) };
        // Fed frames are the socket's to write from then on (a cancelled flush leaves them
        // queued there for the next one).
        while let Some(message) = self.carry.pop_front() {
            socket.feed(message).await?;
        }
        socket.flush().await
    }

    /// The ping timer fired: a ping goes out, or (one was out) the session is dead.
    async fn ping_due(&mut self) -> Result<(), TransportError> {
        if self.pong_due.is_some() {
            return Err(TransportError("ping timeout".into()));
        }
        let due = Instant::now() + self.config().ping_timeout;
        // The ping counts as out once written (a cancelled write is tried again).
        self.send(Message::Text("2".into())).await?;
        self.pong_due = Some(due);
        if let Ok(mut dead) = self.shared.dead_at.lock() {
            *dead = Some(due);
        }
        Ok(())
    }
}

/// The next HTTP request for the session (pending forever for a session without a channel;
/// `None` once the endpoint dropped it).
async fn next_request(requests: &mut Option<mpsc::Receiver<Request2Session>>) -> Option<Request2Session> {
    match requests {
        Some(requests) => requests.recv().await,
        None => std::future::pending().await,
    }
}

/// The next frame of an optional WebSocket (pending forever without one).
async fn next_frame(socket: &mut Option<Box<WebSocketTransport>>) -> Incoming {
    match socket {
        Some(socket) => socket.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_ws_frame(mode: &mut Mode) -> Incoming {
    match mode {
        Mode::WebSocket(socket) => socket.recv().await,
        Mode::Polling { .. } => std::future::pending().await,
    }
}

impl Transport for EngineTransport {
    async fn recv(&mut self) -> Incoming {
        loop {
            if let Some(incoming) = self.stash.pop_front() {
                return incoming;
            }
            if !self.carry.is_empty() && self.drain_carry().await.is_err() {
                return Incoming::Gone;
            }
            let deadline = self.pong_due.unwrap_or(self.next_ping);
            tokio::select! {
                biased;
                frame = next_frame(&mut self.probe) => {
                    // A failed (or closed) probe only ends the probe; the session goes on
                    // polling. Dropped here, or its closed socket would be ready forever.
                    if self.probe_frame(frame).await.is_err() {
                        self.probe = None;
                    }
                }
                frame = next_ws_frame(&mut self.mode) => {
                    let packet = match frame {
                        Incoming::Text(text) => codec::decode_text(text.as_str()),
                        Incoming::Binary(bytes) => Ok(codec::decode_binary(&bytes)),
                        Incoming::Control => continue,
                        ended => return ended,
                    };
                    match packet.map_err(|_| ()).and_then(|p| self.client_packet(p)) {
                        Ok(Some(incoming)) => return incoming,
                        Ok(None) => {}
                        // An invalid packet closes the session, as in engine.io.
                        Err(()) => return Incoming::Gone,
                    }
                }
                request = next_request(&mut self.requests) => {
                    match request {
                        Some(request) => {
                            if let Some(incoming) = self.request(request).await {
                                return incoming;
                            }
                        }
                        None => return Incoming::Gone,
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if self.ping_due().await.is_err() {
                        return Incoming::Gone;
                    }
                }
            }
        }
    }

    async fn feed(&mut self, message: Message) -> Result<(), TransportError> {
        if !self.carry.is_empty() {
            self.drain_carry().await?;
        }
        let max = self.config().max_payload;
        match &mut self.mode {
            Mode::WebSocket(socket) => socket.feed(message).await,
            Mode::Polling { out, .. } => {
                if !out.is_empty() {
                    out.push(codec::RECORD_SEPARATOR);
                }
                match message {
                    Message::Text(text) => out.push_str(text.as_str()),
                    Message::Binary(bytes) => {
                        out.push('b');
                        base64::engine::general_purpose::STANDARD.encode_string(&bytes, out);
                    }
                    _ => {}
                }
                if out.len() > max {
                    // The client stopped polling; what it missed cannot be held.
                    return Err(TransportError("polling client fell behind".into()));
                }
                Ok(())
            }
        }
    }

    async fn write_batch(&mut self, batch: &mut Vec<Outbound>) -> Result<(), TransportError> {
        if !self.carry.is_empty() {
            self.drain_carry().await?;
        }
        // On its WebSocket, the batch goes as the WebSocket writes one (queued, one writev);
        // only polling gathers it message by message.
        if let Mode::WebSocket(socket) = &mut self.mode {
            return socket.write_batch(batch).await;
        }
        super::feed_batch(self, batch).await
    }

    fn trim(&mut self) {
        if let Mode::WebSocket(socket) = &mut self.mode {
            socket.trim();
        }
    }

    async fn flush(&mut self) -> Result<(), TransportError> {
        match &mut self.mode {
            Mode::WebSocket(socket) => socket.flush().await,
            Mode::Polling { out, waiting } => {
                if !out.is_empty() {
                    if let Some(waiting) = waiting.take() {
                        let _ = waiting.send(PollReply::Payload(std::mem::take(out)));
                    }
                }
                Ok(())
            }
        }
    }

    async fn close(&mut self, _code: u16, _reason: &str) {
        // Engine.IO has no close codes: the protocol told the client why before this.
        match &mut self.mode {
            Mode::WebSocket(socket) => {
                let close = async {
                    let _ = socket.send(Message::Text("1".into())).await;
                    let _ = socket.send(Message::Close(None)).await;
                };
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
            }
            Mode::Polling { .. } => {
                let _ = self.feed(Message::Text("1".into())).await;
                let _ = self.flush().await;
                // A client that polls within the close timeout reads the close packet.
                let wait = async {
                    while let Mode::Polling { out, .. } = &self.mode {
                        if out.is_empty() {
                            break;
                        }
                        match next_request(&mut self.requests).await {
                            Some(Request2Session::Poll(reply)) => {
                                if let Mode::Polling { out, .. } = &mut self.mode {
                                    let _ = reply.send(PollReply::Payload(std::mem::take(out)));
                                }
                            }
                            Some(_) => {}
                            None => break,
                        }
                    }
                };
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, wait).await;
            }
        }
    }

    async fn closed_by_client(&mut self) {
        if let Mode::WebSocket(socket) = &mut self.mode {
            socket.closed_by_client().await;
        }
    }
}
