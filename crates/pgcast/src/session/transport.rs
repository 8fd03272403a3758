//! A session's transport: frames in, frames out, and how the connection is closed. The WebSocket
//! (axum's) is the one transport today; Engine.IO's long-polling and SSE are the next.
//!
//! Bytes only: what a frame means is the protocol adapter's business, and what is sent when is
//! the session's. A transport error means the connection is gone; its detail is only logged.

use std::future::Future;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::SinkExt;

/// How long a close frame may take to reach a client before the connection is dropped anyway.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the client sent.
#[derive(Debug)]
pub enum Incoming {
    Text(Utf8Bytes),
    Binary(Bytes),
    /// A frame with nothing for the protocol (a WebSocket ping or pong, answered by the
    /// library): it still counts against the rate limit.
    Control,
    /// The client is closing the connection.
    Close,
    /// The client sent a frame larger than the limit; the connection cannot continue.
    TooBig,
    /// The connection is gone (closed without a close frame, or broken).
    Gone,
}

/// The connection could not be written: it is gone.
#[derive(Debug, thiserror::Error)]
#[error("connection lost: {0}")]
pub struct TransportError(#[source] Box<dyn std::error::Error + Send + Sync>);

/// Frames in and out of one client connection.
pub trait Transport: Send {
    /// The next frame from the client.
    fn recv(&mut self) -> impl Future<Output = Incoming> + Send;

    /// Queues a frame for the next flush.
    fn feed(&mut self, message: Message) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Writes everything fed.
    fn flush(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Closes the connection with `code` and `reason`, waiting (within [`CLOSE_TIMEOUT`]) for
    /// the client to take it.
    fn close(&mut self, code: u16, reason: &str) -> impl Future<Output = ()> + Send;

    /// The client closed: flush what the transport owes it in reply.
    fn closed_by_client(&mut self) -> impl Future<Output = ()> + Send;

    /// Feeds and flushes one frame.
    fn send(&mut self, message: Message) -> impl Future<Output = Result<(), TransportError>> + Send {
        async move {
            self.feed(message).await?;
            self.flush().await
        }
    }
}

/// A WebSocket upgraded by axum.
pub struct WebSocketTransport {
    socket: WebSocket,
}

impl WebSocketTransport {
    pub fn new(socket: WebSocket) -> WebSocketTransport {
        WebSocketTransport { socket }
    }
}

fn lost(error: axum::Error) -> TransportError {
    TransportError(error.into_inner())
}

impl Transport for WebSocketTransport {
    async fn recv(&mut self) -> Incoming {
        match self.socket.recv().await {
            Some(Ok(Message::Text(text))) => Incoming::Text(text),
            Some(Ok(Message::Binary(bytes))) => Incoming::Binary(bytes),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Incoming::Control,
            Some(Ok(Message::Close(_))) => Incoming::Close,
            None => Incoming::Gone,
            Some(Err(e)) => {
                let error = e.into_inner();
                if matches!(error.downcast_ref(), Some(tungstenite::Error::Capacity(_))) {
                    return Incoming::TooBig;
                }
                tracing::debug!(error = %error, "socket error");
                Incoming::Gone
            }
        }
    }

    async fn feed(&mut self, message: Message) -> Result<(), TransportError> {
        self.socket.feed(message).await.map_err(lost)
    }

    async fn flush(&mut self) -> Result<(), TransportError> {
        self.socket.flush().await.map_err(lost)
    }

    async fn send(&mut self, message: Message) -> Result<(), TransportError> {
        self.socket.send(message).await.map_err(lost)
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame { code, reason: reason.into() };
        // Boxed: its state would otherwise sit in every connection's task all its life.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, Box::pin(close_handshake(&mut self.socket, frame))).await;
    }

    async fn closed_by_client(&mut self) {
        // The WebSocket library queued the reply to the client's Close (RFC 6455 5.5.1): it must
        // still be flushed, or the client sees the connection drop (1006).
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.socket.flush()).await;
    }
}

/// Sends a Close frame and waits for the client's (RFC 6455 7.1.1), discarding what it sent
/// before it. Closing a socket with unread bytes makes the kernel reset the connection, and the
/// reset can destroy the close frame (with its reason) before the client reads it; a flooding
/// client always has unread bytes.
async fn close_handshake(socket: &mut WebSocket, frame: CloseFrame) -> Result<(), axum::Error> {
    socket.send(Message::Close(Some(frame))).await?;
    while let Some(Ok(message)) = socket.recv().await {
        if matches!(message, Message::Close(_)) {
            break;
        }
    }
    Ok(())
}
