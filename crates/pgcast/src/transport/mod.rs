//! A session's transport: frames in, frames out, and how the connection is closed. A plain
//! WebSocket (`websocket`, the Supabase endpoint's), Engine.IO's (`engineio`: HTTP
//! long-polling upgraded to a WebSocket, for Socket.IO) and a Server-Sent Events response
//! body (`sse`: out only).
//!
//! Bytes only: what a frame means is the protocol adapter's business, and what is sent when is
//! the session's. A transport error means the connection is gone; its detail is only logged.

use std::future::Future;
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::Bytes;

use crate::outbound::{Frames, Outbound};

pub mod engineio;
pub mod frame;
pub mod sse;
pub mod websocket;

pub use websocket::WebSocketTransport;

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
    /// The client broke the WebSocket protocol (RFC 6455); the connection cannot continue and
    /// is closed with the error's code and reason.
    Invalid(frame::FrameError),
}

/// The connection could not be written: it is gone.
#[derive(Debug, thiserror::Error)]
#[error("connection lost: {0}")]
pub struct TransportError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

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

    /// Feeds a batch of queued messages, in order, and flushes once; `batch` is left empty.
    fn write_batch(
        &mut self,
        batch: &mut Vec<Outbound>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        feed_batch(self, batch)
    }

    /// Gives back the buffers writes grew, if nothing waits in them (the session calls it once
    /// the connection has been quiet for a moment; busy connections keep theirs).
    fn trim(&mut self) {}

    /// Feeds and flushes one frame.
    fn send(&mut self, message: Message) -> impl Future<Output = Result<(), TransportError>> + Send {
        async move {
            self.feed(message).await?;
            self.flush().await
        }
    }
}

/// [`Transport::write_batch`] message by message: each fed, then one flush.
pub(crate) async fn feed_batch<T: Transport + ?Sized>(
    transport: &mut T,
    batch: &mut Vec<Outbound>,
) -> Result<(), TransportError> {
    for entry in batch.drain(..) {
        match entry.frames {
            Frames::One(message) => transport.feed(message).await?,
            Frames::Run(run) => {
                for message in run.iter() {
                    transport.feed(message.clone()).await?;
                }
            }
        }
    }
    transport.flush().await
}
