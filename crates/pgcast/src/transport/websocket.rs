//! The plain WebSocket transport (axum's), as the Supabase Realtime endpoint speaks it: one
//! protocol frame per WebSocket message, RFC 6455 close handshake in both directions.

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;

use super::{Incoming, Transport, TransportError, CLOSE_TIMEOUT};

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
