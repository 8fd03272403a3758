//! The Server-Sent Events adapter: one table's changes, one way, for clients that only listen
//! (a browser's `EventSource`, `curl -N`). The subscription is the request's (`schema`,
//! `table`, `event`, `filter`), joined by the HTTP handler before the stream starts so that a
//! refusal is an HTTP status; this adapter writes what the stream opens with — `retry`, a
//! resume's missed changes or `resync_required`, then `ready` — and what it closes with.
//!
//! Nothing is read from an event stream: the client's only signal is leaving. The byte layouts
//! are `protocol::sse`'s.

use axum::extract::ws::Message;
use serde_json::json;

use super::{Joined, JoinedChannel, Protocol, Session};
use crate::log::ResyncReason;
use crate::outbound::close_code;
use crate::protocol::sse;
use crate::transport::{Incoming, Transport, TransportError};

/// How long a browser waits before reconnecting a stream that ended.
const RETRY_MS: u64 = 2000;

/// An event stream's protocol state: what it opens with, until written.
pub struct Sse {
    opening: Vec<Message>,
}

impl Sse {
    /// The stream for a subscription the core accepted: `joined` tells whether it resumed
    /// (`Last-Event-ID`) and from where live changes follow.
    pub fn new(joined: Joined, schema: &str, table: &str) -> Sse {
        let mut opening = vec![sse::retry(RETRY_MS)];
        let head = sse::event_id(&joined.epoch, joined.head);
        let resumed = match joined.replay {
            None => None,
            Some(Ok(missed)) => {
                let count = missed.len();
                opening.extend(missed);
                Some(count)
            }
            Some(Err(reason)) => {
                // The client's place moves to the head: a later reconnect resumes from here.
                let data = resync(&reason);
                opening.push(sse::named("resync_required", &data.to_string(), Some(&head)));
                None
            }
        };
        let ready = json!({
            "schema": schema,
            "table": table,
            "epoch": joined.epoch,
            "position": joined.head.to_string(),
            "resumed": resumed,
        });
        // Its id is the head: a client that receives nothing else still resumes exactly.
        opening.push(sse::named("ready", &ready.to_string(), Some(&head)));
        Sse { opening }
    }
}

fn resync(reason: &ResyncReason) -> serde_json::Value {
    json!({ "reason": reason.to_string() })
}

impl Protocol for Sse {
    async fn frame<T: Transport>(
        _session: &mut Session<Sse, T>,
        _frame: Incoming,
    ) -> Result<(), TransportError> {
        Ok(())
    }

    async fn rate_notice<T: Transport>(
        _session: &mut Session<Sse, T>,
        _reason: &str,
    ) -> Result<(), TransportError> {
        Ok(())
    }

    async fn channel_closed<T: Transport>(
        session: &mut Session<Sse, T>,
        _topic: &str,
        _channel: Box<JoinedChannel>,
        reason: String,
    ) -> Result<(), TransportError> {
        // The stream's one subscription ended (its token expired): so does the stream.
        session.core.cut_off(close_code::TOKEN_EXPIRED, reason);
        Ok(())
    }

    async fn closing<T: Transport>(session: &mut Session<Sse, T>, code: u16, reason: &str) {
        let data = json!({ "code": code, "reason": reason });
        let _ = session.transport.send(sse::named("closing", &data.to_string(), None)).await;
    }

    async fn start<T: Transport>(session: &mut Session<Sse, T>) -> Result<(), TransportError> {
        for message in std::mem::take(&mut session.protocol.opening) {
            session.transport.feed(message).await?;
        }
        session.transport.flush().await
    }
}
