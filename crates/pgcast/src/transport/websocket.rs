//! The WebSocket (RFC 6455, server side) of both endpoints: the upgrade handshake, then frames
//! straight over the connection's `TcpStream`. The Supabase endpoint's session uses it as its
//! transport (one protocol frame per WebSocket message); Engine.IO runs over it once a session
//! is on a WebSocket (`engineio.rs`). The close handshake in both directions.
//!
//! Own code rather than tungstenite's (which axum wraps) for what an idle connection costs:
//! tungstenite keeps a read buffer, a write buffer that never shrinks, two waker proxies and a
//! 368-byte stream for every connection, about 1.3 KiB of the ~6 KiB an idle connection held
//! (heaptrack, 2026-12-03). Here a connection holds no buffer while idle: it waits for the
//! socket to become readable and only then reads, into memory it gives back once the frames
//! are taken; what it writes goes out with one `writev` per flush, frame headers beside the
//! shared payloads, never copied into a buffer. Framing itself is `frame.rs`.
//!
//! Not here: what the frames mean (the protocol adapters) or when to write (the session).

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use axum::extract::ws::{Message, Utf8Bytes};
use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::net::TcpStream;

use super::frame::{self, opcode, FrameError, Header};
use super::{Incoming, Transport, TransportError, CLOSE_TIMEOUT};
use crate::outbound::{Frames, Outbound};

/// Bytes read at a time while no frame is known to need more.
const READ_CHUNK: usize = 1024;
/// Most bytes read at a time into a large frame.
const MAX_READ_CHUNK: usize = 64 * 1024;
/// Frame payloads handed to one `writev` (each takes a header slice too: 2 × this ≤ IOV_MAX).
const WRITE_SLICES: usize = 64;
/// Frames fed without a flush before they are written anyway.
const MAX_FED: usize = 1024;

/// The RFC 6455 handshake's GUID.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A request to upgrade to a WebSocket, checked as RFC 6455 4.2.1 requires (refusals with
/// the statuses and texts axum's extractor used).
pub struct WebSocketUpgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

fn refuse(status: StatusCode, text: &'static str) -> Response {
    (status, text).into_response()
}

fn header_contains(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|v| v.split(',').any(|part| part.trim().eq_ignore_ascii_case(token)))
    })
}

impl<S: Send + Sync> FromRequestParts<S> for WebSocketUpgrade {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Response> {
        if parts.method != Method::GET {
            return Err(refuse(StatusCode::METHOD_NOT_ALLOWED, "Request method must be `GET`"));
        }
        if !header_contains(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(refuse(StatusCode::BAD_REQUEST, "Connection header did not include 'upgrade'"));
        }
        if !header_contains(&parts.headers, header::UPGRADE, "websocket") {
            return Err(refuse(StatusCode::BAD_REQUEST, "`Upgrade` header did not include 'websocket'"));
        }
        if parts.headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v.as_bytes() != b"13") {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Version` header did not include '13'",
            ));
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return Err(refuse(StatusCode::BAD_REQUEST, "`Sec-WebSocket-Key` header missing"));
        };
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "WebSocket request couldn't be upgraded since no upgrade state was present",
            ));
        };
        Ok(WebSocketUpgrade { key, on_upgrade })
    }
}

impl WebSocketUpgrade {
    /// Answers `101 Switching Protocols`; once the connection is switched, `session` is given
    /// the WebSocket and the future it returns is spawned as the connection's task. That task
    /// is the session's future alone: the handshake's own state ends with it here.
    pub fn on_upgrade<F, Fut>(self, max_message_bytes: usize, session: F) -> Response
    where
        F: FnOnce(WebSocketTransport) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut hash = Sha1::new();
        hash.update(self.key.as_bytes());
        hash.update(ACCEPT_GUID);
        let accept = base64::engine::general_purpose::STANDARD.encode(hash.finalize());
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => return tracing::debug!(error = %e, "WebSocket upgrade failed"),
            };
            // The server's own connections are plain TCP (see `accept`): the stream itself is
            // taken back, with whatever the client sent after its request.
            match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => {
                    let socket =
                        WebSocketTransport::new(parts.io.into_inner(), parts.read_buf, max_message_bytes);
                    tokio::spawn(session(socket));
                }
                Err(_) => tracing::warn!("WebSocket upgrade on a connection that is not TCP; dropped"),
            }
        });
        let mut response = Response::new(axum::body::Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}

/// A message arriving in fragments (RFC 6455 5.4), kept only while one is.
struct Fragmented {
    opcode: u8,
    data: BytesMut,
}

/// A frame waiting to be written: its header and its payload (shared, not copied).
struct Out {
    head: [u8; frame::MAX_SERVER_HEADER],
    head_len: u8,
    payload: Bytes,
}

impl Out {
    fn new(opcode: u8, payload: Bytes) -> Out {
        let (head, head_len) = frame::server_header(opcode, payload.len());
        Out { head, head_len, payload }
    }

    fn len(&self) -> usize {
        self.head_len as usize + self.payload.len()
    }
}

/// One WebSocket connection.
pub struct WebSocketTransport {
    stream: TcpStream,
    /// Bytes read and not yet taken as frames; empty, with no capacity, between frames.
    read: BytesMut,
    /// A fragmented message's parts so far.
    fragmented: Option<Box<Fragmented>>,
    /// Payload bytes still to discard: the rest of a frame refused as too big (its reader is
    /// waiting for the client's Close behind it).
    skip: u64,
    /// Frames fed and not yet written, and how much of the first one is.
    out: VecDeque<Out>,
    written: usize,
    max_message: usize,
    /// The client's Close arrived (ours, in reply, is queued).
    peer_closed: bool,
}

fn lost(error: io::Error) -> TransportError {
    TransportError(Box::new(error))
}

impl WebSocketTransport {
    /// A WebSocket over `stream`, `early` being bytes the client sent right after its request.
    pub fn new(stream: TcpStream, early: Bytes, max_message: usize) -> WebSocketTransport {
        WebSocketTransport {
            stream,
            read: BytesMut::from(&early[..]),
            fragmented: None,
            skip: 0,
            out: VecDeque::new(),
            written: 0,
            max_message,
            peer_closed: false,
        }
    }

    /// Takes the next whole message or control frame from what was read, if there is one.
    fn take(&mut self) -> Option<Incoming> {
        loop {
            if self.skip > 0 {
                let n = self.read.len().min(usize::try_from(self.skip).unwrap_or(usize::MAX));
                let _ = self.read.split_to(n);
                self.skip -= n as u64;
                if self.skip > 0 {
                    self.release_read();
                    return None;
                }
            }
            let header = match frame::parse_header(&self.read) {
                Ok(Some(header)) => header,
                Ok(None) => {
                    self.release_read();
                    return None;
                }
                Err(e) => return Some(Incoming::Invalid(e)),
            };
            let sofar = self.fragmented.as_ref().map_or(0, |f| f.data.len() as u64);
            if !header.is_control() && header.len.saturating_add(sofar) > self.max_message as u64 {
                // Its payload is skipped as it arrives: the close handshake reads on behind it.
                let _ = self.read.split_to(header.header_len);
                self.skip = header.len;
                self.fragmented = None;
                return Some(Incoming::TooBig);
            }
            let total = header.header_len + header.len as usize;
            if self.read.len() < total {
                return None;
            }
            let mut payload = self.read.split_to(total).split_off(header.header_len);
            frame::apply_mask(&mut payload, header.mask, 0);
            if let Some(incoming) = self.frame(header, payload) {
                return Some(incoming);
            }
        }
    }

    /// Gives the read buffer's memory back once nothing in it is waiting.
    fn release_read(&mut self) {
        if self.read.is_empty() && self.read.capacity() > 0 {
            self.read = BytesMut::new();
        }
    }

    /// One complete frame: what it means for the session, or `None` for a fragment taken in.
    fn frame(&mut self, header: Header, payload: BytesMut) -> Option<Incoming> {
        let message = match header.opcode {
            opcode::PING => {
                self.out.push_back(Out::new(opcode::PONG, payload.freeze()));
                // Answered now, not with the next write (which may be a long way off). What
                // the socket does not take now goes with the next flush; a broken socket shows
                // on the next read.
                match self.write_some() {
                    Ok(()) => Transport::trim(self),
                    Err(e) => tracing::trace!(error = %e, "pong not written yet"),
                }
                return Some(Incoming::Control);
            }
            opcode::PONG => return Some(Incoming::Control),
            opcode::CLOSE => {
                let reply = match frame::parse_close(&payload) {
                    Ok(None) => Bytes::new(),
                    Ok(Some(_)) => payload.freeze(),
                    Err(e) => return Some(Incoming::Invalid(e)),
                };
                // RFC 6455 5.5.1: answered with a Close echoing the client's code.
                self.out.push_back(Out::new(opcode::CLOSE, reply));
                self.peer_closed = true;
                return Some(Incoming::Close);
            }
            opcode::CONTINUATION => {
                let Some(fragmented) = self.fragmented.as_mut() else {
                    return Some(Incoming::Invalid(FrameError::StrayContinuation));
                };
                fragmented.data.extend_from_slice(&payload);
                if !header.fin {
                    return None;
                }
                let whole = self.fragmented.take()?;
                (whole.opcode, whole.data)
            }
            kind => {
                if self.fragmented.is_some() {
                    return Some(Incoming::Invalid(FrameError::UnfinishedMessage));
                }
                if !header.fin {
                    self.fragmented = Some(Box::new(Fragmented { opcode: kind, data: payload }));
                    return None;
                }
                (kind, payload)
            }
        };
        Some(match message {
            (opcode::TEXT, data) => match Utf8Bytes::try_from(data.freeze()) {
                Ok(text) => Incoming::Text(text),
                Err(_) => Incoming::Invalid(FrameError::Utf8),
            },
            (_, data) => Incoming::Binary(data.freeze()),
        })
    }

    /// Reads what the socket has, waiting until it has something; `false` when the client
    /// has closed the connection or it broke.
    async fn fill(&mut self) -> bool {
        loop {
            // Polled in place rather than through `readable()`, whose future would take room
            // in every idle connection's task.
            if std::future::poll_fn(|cx| self.stream.poll_read_ready(cx)).await.is_err() {
                return false;
            }
            // Room for the frame being read (bounded), or a chunk: allocated only now that
            // there is something to read.
            let want = match frame::parse_header(&self.read) {
                Ok(Some(h)) if self.skip == 0 => usize::try_from(h.header_len as u64 + h.len)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(self.read.len()),
                _ => READ_CHUNK,
            };
            self.read.reserve(want.clamp(READ_CHUNK, MAX_READ_CHUNK));
            match self.stream.try_read_buf(&mut self.read) {
                Ok(0) => return false,
                Ok(_) => return true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.release_read();
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "socket error");
                    return false;
                }
            }
        }
    }

    /// Queues `message` as a frame for the next write.
    fn push(&mut self, message: Message) {
        let out = match message {
            Message::Text(text) => Out::new(opcode::TEXT, Bytes::from(text)),
            Message::Binary(data) => Out::new(opcode::BINARY, data),
            Message::Ping(data) => Out::new(opcode::PING, data),
            Message::Pong(data) => Out::new(opcode::PONG, data),
            Message::Close(frame) => {
                let payload = frame.map(|f| frame::close_payload(f.code, &f.reason)).unwrap_or_default();
                Out::new(opcode::CLOSE, payload.into())
            }
        };
        self.out.push_back(out);
    }

    /// Writes as much of what was fed as the socket takes now, without waiting. The queue keeps
    /// its capacity: [`Transport::trim`] gives it back (after a flush, after a small batch, and
    /// once a busy connection has been quiet).
    fn write_some(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); 2 * WRITE_SLICES];
            let mut n = 0;
            let mut skip = self.written;
            for out in self.out.iter().take(WRITE_SLICES) {
                let head = &out.head[..out.head_len as usize];
                for part in [head, &out.payload[..]] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    slices[n] = IoSlice::new(&part[skip..]);
                    skip = 0;
                    n += 1;
                }
            }
            let mut done = self.stream.try_write_vectored(&slices[..n])?;
            if done == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += self.written;
            while let Some(first) = self.out.front() {
                if done < first.len() {
                    break;
                }
                done -= first.len();
                self.out.pop_front();
            }
            self.written = done;
        }
        self.written = 0;
        Ok(())
    }

    async fn write_all(&mut self) -> Result<(), TransportError> {
        loop {
            match self.write_some() {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::future::poll_fn(|cx| self.stream.poll_write_ready(cx)).await.map_err(lost)?;
                }
                Err(e) => return Err(lost(e)),
            }
        }
    }

    /// Sends a Close frame and waits for the client's (RFC 6455 7.1.1), discarding what it
    /// sent before it. Closing a socket with unread bytes makes the kernel reset the
    /// connection, and the reset can destroy the close frame (with its reason) before the
    /// client reads it; a flooding client always has unread bytes.
    async fn close_handshake(&mut self, code: u16, reason: &str) -> Result<(), TransportError> {
        self.out.push_back(Out::new(opcode::CLOSE, frame::close_payload(code, reason).into()));
        self.write_all().await?;
        while !self.peer_closed {
            match self.recv().await {
                Incoming::Close | Incoming::Gone | Incoming::Invalid(_) => break,
                _ => {}
            }
        }
        Ok(())
    }
}

impl Transport for WebSocketTransport {
    async fn recv(&mut self) -> Incoming {
        loop {
            if let Some(incoming) = self.take() {
                return incoming;
            }
            if !self.fill().await {
                return Incoming::Gone;
            }
        }
    }

    async fn feed(&mut self, message: Message) -> Result<(), TransportError> {
        self.push(message);
        if self.out.len() >= MAX_FED {
            self.write_all().await?;
        }
        Ok(())
    }

    async fn write_batch(&mut self, batch: &mut Vec<Outbound>) -> Result<(), TransportError> {
        // Queued without an await between frames, so this future (part of every connection's
        // task) holds no iterator or message: the frames are written in one go below.
        for entry in batch.drain(..) {
            match entry.frames {
                Frames::One(message) => self.push(message),
                Frames::Run(run) => run.iter().for_each(|message| self.push(message.clone())),
            }
        }
        self.write_all().await
    }

    async fn flush(&mut self) -> Result<(), TransportError> {
        self.write_all().await?;
        // What is flushed outside a batch (replies) is small: nothing kept.
        self.trim();
        Ok(())
    }

    fn trim(&mut self) {
        if self.out.is_empty() {
            self.out = VecDeque::new();
        }
    }

    async fn close(&mut self, code: u16, reason: &str) {
        // Boxed: its state would otherwise sit in every connection's task all its life.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, Box::pin(self.close_handshake(code, reason))).await;
    }

    async fn closed_by_client(&mut self) {
        // The reply to the client's Close is queued: it must still go out, or the client sees
        // the connection drop (1006).
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.write_all()).await;
    }
}
