//! The conformance server (`pgcast conformance`): pgcast's Engine.IO transport and Socket.IO
//! framing wired to the echo handlers that the upstream protocol test suites
//! (socketio/engine.io-protocol and socketio/socket.io-protocol, `test-suite/`) are written
//! against, with their settings: pingInterval 300 ms, pingTimeout 200 ms, maxPayload 1,000,000,
//! namespaces `/` and `/custom`.
//!
//! - `/engine.io/`: every message is sent back, text or binary.
//! - `/socket.io/`: on each namespace connect the server emits `auth` with the CONNECT payload;
//!   on `/`, `message` is answered with `message-back` and the same arguments (binary
//!   attachments included), and `message-with-ack` is acknowledged with its arguments.
//!
//! A test fixture, not an application: no database, no tokens, no policies. It exists so the
//! suites exercise the same transport and codec the Socket.IO endpoint runs on.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::Message;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::routing::any;
use axum::Router;
use serde_json::{json, Value};

use crate::protocol::socketio::{connect_error, decode_sio, packet_message, SioKind, SioPacket};
use crate::transport::engineio::{EngineConfig, EngineTransport, Engines, Handshake, Spawn};
use crate::transport::{Incoming, Transport};

/// The suites' settings.
pub fn engine_config() -> EngineConfig {
    EngineConfig {
        ping_interval: Duration::from_millis(300),
        ping_timeout: Duration::from_millis(200),
        max_payload: 1_000_000,
    }
}

/// How long a Socket.IO client may take to connect to a namespace (the suites' reference
/// server: `connectTimeout: 1000`).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

/// The router serving both suites.
pub fn routes() -> Router {
    let engine_echo: Spawn = Arc::new(|transport, _handshake| {
        tokio::spawn(engine_echo(transport));
        Ok(())
    });
    let socketio_echo: Spawn = Arc::new(|transport, handshake| {
        tokio::spawn(socketio_echo(transport, handshake));
        Ok(())
    });
    let engine = Engines::new(engine_config(), engine_echo);
    let socketio = Engines::new(engine_config(), socketio_echo);
    let endpoint = |engines: Arc<Engines>| {
        any(move |ConnectInfo(peer): ConnectInfo<SocketAddr>, request: Request<Body>| {
            let engines = engines.clone();
            async move { engines.handle(peer, request).await }
        })
    };
    Router::new().route("/engine.io/", endpoint(engine)).route("/socket.io/", endpoint(socketio))
}

/// Serves the suites on `listen` until the process is stopped.
pub async fn serve(listen: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "conformance server listening (/engine.io/, /socket.io/)");
    // The server's own accept loop (HTTP/1.1 on plain TCP), which the WebSocket transport
    // takes its stream back from; never shut down: the process is stopped.
    let limits = crate::accept::Limits {
        header_timeout: Duration::from_secs(10),
        max_pending: 1024,
        max_pending_per_ip: 1024,
    };
    let (_trigger, shutdown) = crate::shutdown::channel();
    crate::accept::serve(listener, routes(), limits, shutdown).await;
    Ok(())
}

/// Engine.IO echo: every message back as it came.
async fn engine_echo(mut transport: EngineTransport) {
    loop {
        let message = match transport.recv().await {
            Incoming::Text(text) => Message::Text(format!("4{}", text.as_str()).into()),
            Incoming::Binary(bytes) => Message::Binary(bytes),
            Incoming::Control => continue,
            Incoming::Close => return transport.closed_by_client().await,
            Incoming::TooBig | Incoming::Gone | Incoming::Invalid(_) => return,
        };
        if transport.send(message).await.is_err() {
            return;
        }
    }
}

/// A Socket.IO packet with its binary attachments, as one unit to send.
fn engine_messages(packet: &SioPacket, attachments: Vec<axum::body::Bytes>) -> Vec<Message> {
    let mut messages = vec![packet_message(packet)];
    messages.extend(attachments.into_iter().map(Message::Binary));
    messages
}

/// Socket.IO echo, with the suites' namespaces and handlers.
async fn socketio_echo(mut transport: EngineTransport, _handshake: Handshake) {
    let mut connected: HashSet<String> = HashSet::new();
    // A binary packet waiting for its attachments.
    let mut partial: Option<(SioPacket, Vec<axum::body::Bytes>)> = None;
    let connect_deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    loop {
        let incoming = if connected.is_empty() {
            match tokio::time::timeout_at(connect_deadline, transport.recv()).await {
                Ok(incoming) => incoming,
                Err(_) => return transport.close(1000, "connect timeout").await,
            }
        } else {
            transport.recv().await
        };
        let (packet, attachments) = match incoming {
            Incoming::Text(text) => {
                if partial.is_some() {
                    // A text packet while attachments are due: not Socket.IO.
                    return transport.close(1000, "attachments expected").await;
                }
                match decode_sio(text.as_str()) {
                    Ok(packet) if packet.attachments > 0 => {
                        partial = Some((packet, Vec::new()));
                        continue;
                    }
                    Ok(packet) => (packet, Vec::new()),
                    Err(_) => return transport.close(1000, "invalid packet").await,
                }
            }
            Incoming::Binary(bytes) => {
                let Some((packet, mut buffers)) = partial.take() else {
                    return transport.close(1000, "unexpected binary message").await;
                };
                buffers.push(bytes);
                if buffers.len() < packet.attachments {
                    partial = Some((packet, buffers));
                    continue;
                }
                (packet, buffers)
            }
            Incoming::Control => continue,
            Incoming::Close => return transport.closed_by_client().await,
            Incoming::TooBig | Incoming::Gone | Incoming::Invalid(_) => return,
        };
        let replies = match echo(&mut connected, packet, attachments) {
            Ok(replies) => replies,
            Err(()) => return transport.close(1000, "protocol error").await,
        };
        for (i, batch) in replies.into_iter().enumerate() {
            if i > 0 {
                // Each reply in its own flush, a moment apart: the suites read the CONNECT reply
                // and the `auth` event with two separate waits, and lose the second if both
                // arrive in one TCP read (an upstream race; the Node server hits it too).
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            for message in batch {
                if transport.feed(message).await.is_err() {
                    return;
                }
            }
            if transport.flush().await.is_err() {
                return;
            }
        }
    }
}

/// What the echo server answers to one packet: batches of frames, each flushed on its own.
/// `Err`: the client broke the protocol and the connection is closed.
#[allow(clippy::type_complexity)]
fn echo(
    connected: &mut HashSet<String>,
    packet: SioPacket,
    attachments: Vec<axum::body::Bytes>,
) -> Result<Vec<Vec<Message>>, ()> {
    let nsp = packet.nsp.clone();
    match packet.kind {
        SioKind::Connect => {
            if nsp != "/" && nsp != "/custom" {
                let refusal = connect_error(&nsp, "Invalid namespace");
                return Ok(vec![engine_messages(&refusal, Vec::new())]);
            }
            if !connected.insert(nsp.clone()) {
                return Err(());
            }
            let auth = packet.data.unwrap_or_else(|| json!({}));
            let reply = SioPacket::new(
                SioKind::Connect,
                nsp.clone(),
                Some(json!({ "sid": crate::random::hex_id() })),
            );
            let event = SioPacket::new(SioKind::Event, nsp, Some(json!(["auth", auth])));
            Ok(vec![engine_messages(&reply, Vec::new()), engine_messages(&event, Vec::new())])
        }
        SioKind::Disconnect => {
            connected.remove(&nsp);
            Ok(Vec::new())
        }
        SioKind::Event | SioKind::BinaryEvent => {
            if !connected.contains(&nsp) {
                return Err(());
            }
            let Some(Value::Array(mut args)) = packet.data else { return Err(()) };
            let name = args.first().and_then(Value::as_str).unwrap_or_default().to_string();
            let binary = !attachments.is_empty();
            match (nsp.as_str(), name.as_str()) {
                ("/", "message") => {
                    if let Some(first) = args.first_mut() {
                        *first = json!("message-back");
                    }
                    let kind = if binary { SioKind::BinaryEvent } else { SioKind::Event };
                    let mut reply = SioPacket::new(kind, nsp, Some(Value::Array(args)));
                    reply.attachments = attachments.len();
                    Ok(vec![engine_messages(&reply, attachments)])
                }
                ("/", "message-with-ack") => {
                    let Some(id) = packet.id else { return Ok(Vec::new()) };
                    if !args.is_empty() {
                        args.remove(0);
                    }
                    let kind = if binary { SioKind::BinaryAck } else { SioKind::Ack };
                    let mut reply = SioPacket::new(kind, nsp, Some(Value::Array(args)));
                    reply.id = Some(id);
                    reply.attachments = attachments.len();
                    Ok(vec![engine_messages(&reply, attachments)])
                }
                _ => Ok(Vec::new()),
            }
        }
        // Acks from the client: the echo server asks for none.
        SioKind::Ack | SioKind::BinaryAck => Ok(Vec::new()),
        SioKind::ConnectError => Err(()),
    }
}
