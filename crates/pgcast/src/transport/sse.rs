//! A Server-Sent Events response body as a transport: frames out (already `text/event-stream`
//! text, shared bytes passed on without a copy), nothing in. The client's only signal is going
//! away, seen when the body is dropped; a keep-alive comment every `keep_alive`, busy or not,
//! is the stream's heartbeat (`Incoming::Control`), so an idle stream is neither closed by a
//! proxy nor by the session's heartbeat deadline.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::Message;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Incoming, Transport, TransportError};
use crate::protocol::sse::KEEP_ALIVE;

/// Chunks that may wait for the HTTP connection before a write waits for it.
const BODY_CHUNKS: usize = 64;

pub struct SseTransport {
    body: Option<mpsc::Sender<Bytes>>,
    pending: Vec<Bytes>,
    keep_alive: Duration,
    /// Kept here, not in `recv`'s future: `recv` is re-made every time the session wakes.
    next_keep_alive: Instant,
}

impl SseTransport {
    /// The transport and the response body it writes.
    pub fn new(keep_alive: Duration) -> (SseTransport, Body) {
        let (tx, mut rx) = mpsc::channel::<Bytes>(BODY_CHUNKS);
        let stream =
            futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|c| c.map(Ok::<_, Infallible>)));
        let transport = SseTransport {
            body: Some(tx),
            pending: Vec::new(),
            keep_alive,
            next_keep_alive: Instant::now() + keep_alive,
        };
        (transport, Body::from_stream(stream))
    }
}

fn gone() -> TransportError {
    TransportError("the client closed the event stream".into())
}

impl Transport for SseTransport {
    async fn recv(&mut self) -> Incoming {
        let Some(body) = self.body.clone() else { return Incoming::Gone };
        tokio::select! {
            _ = body.closed() => Incoming::Gone,
            _ = tokio::time::sleep_until(self.next_keep_alive) => {
                self.next_keep_alive = Instant::now() + self.keep_alive;
                // Not waited for: a stream too full to take a comment is not idle.
                match body.try_send(Bytes::from_static(KEEP_ALIVE)) {
                    Err(mpsc::error::TrySendError::Closed(_)) => Incoming::Gone,
                    _ => Incoming::Control,
                }
            }
        }
    }

    async fn feed(&mut self, message: Message) -> Result<(), TransportError> {
        let bytes = match message {
            Message::Text(text) => Bytes::from(text),
            Message::Binary(bytes) => bytes,
            _ => return Ok(()),
        };
        self.pending.push(bytes);
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), TransportError> {
        let Some(body) = &self.body else { return Err(gone()) };
        for chunk in self.pending.drain(..) {
            body.send(chunk).await.map_err(|_| gone())?;
        }
        self.pending.shrink_to(4);
        Ok(())
    }

    async fn close(&mut self, _code: u16, _reason: &str) {
        // What the protocol said last is in the body; ending it ends the response.
        self.body = None;
    }

    async fn closed_by_client(&mut self) {}
}
