//! A session's client-to-channel messages: `broadcast` (JSON, or realtime-js's binary
//! user-broadcast push) and `presence` (`track` / `untrack`), each checked against the channel's
//! write right before anything is delivered.

use serde_json::{json, Value};

use super::{channel_name, Session};
use crate::audit::{Action, AuditEvent};
use crate::protocol::phoenix::decode_binary_push;
use crate::protocol::phoenix::{self, Frame};
use crate::protocol::BroadcastPayload;

impl Session {
    pub(super) async fn broadcast(&mut self, frame: Frame) -> Result<(), axum::Error> {
        let Some(event) = frame.payload.get("event").and_then(Value::as_str).map(str::to_string) else {
            return self.reply_error(&frame, "broadcast payload needs {type, event, payload}").await;
        };
        let payload = BroadcastPayload::Json(frame.payload.get("payload").cloned().unwrap_or(json!({})));
        self.send_broadcast(&frame, &event, &payload).await
    }

    async fn send_broadcast(
        &mut self,
        frame: &Frame,
        event: &str,
        payload: &BroadcastPayload,
    ) -> Result<(), axum::Error> {
        let Some(channel) = self.channels.get(&frame.topic) else {
            return self.reply_error(frame, "unmatched topic: join the channel first").await;
        };
        if !channel.access.write {
            let reason = format!("not allowed to send on channel {:?}", channel_name(&frame.topic));
            return self.reply_error(frame, reason).await;
        }
        let ack = channel.ack;
        self.state.hub.broadcast(&frame.topic, Some(self.handle.id), event, payload);
        if ack {
            return self.reply(frame, "ok", json!({})).await;
        }
        Ok(())
    }

    /// A binary frame: realtime-js sends user broadcasts this way with vsn 2.0.0.
    pub(super) async fn handle_binary(&mut self, bytes: &[u8]) -> Result<(), axum::Error> {
        let push = match decode_binary_push(bytes) {
            Ok(push) => push,
            Err(reason) => return self.malformed(&format!("malformed binary frame: {reason}")).await,
        };
        let frame = Frame {
            join_ref: push.join_ref,
            msg_ref: push.msg_ref,
            topic: push.topic,
            event: "broadcast".into(),
            payload: Value::Null,
        };
        self.send_broadcast(&frame, &push.event, &push.payload).await
    }

    pub(super) async fn presence(&mut self, frame: Frame) -> Result<(), axum::Error> {
        let Some(channel) = self.channels.get_mut(&frame.topic) else {
            return self.reply_error(&frame, "unmatched topic: join the channel first").await;
        };
        if !channel.access.write {
            let reason = format!("not allowed to track presence on channel {:?}", channel_name(&frame.topic));
            return self.reply_error(&frame, reason).await;
        }
        let key = channel.presence_key.get_or_insert_with(|| crate::random::hex_id().into()).to_string();
        match frame.payload.get("event").and_then(Value::as_str) {
            Some("track") => {
                let meta = match frame.payload.get("payload") {
                    Some(Value::Object(meta)) => meta.clone(),
                    None | Some(Value::Null) => Default::default(),
                    Some(_) => return self.reply_error(&frame, "presence payload must be an object").await,
                };
                // The client applies diffs only after a state: send it first if it was not.
                self.sync_presence(&frame.topic).await?;
                let diff = self.state.presence.track(&frame.topic, self.handle.id, &key, meta);
                self.state.deliver_presence_diff(&frame.topic, &diff);
                let identity = self.channels.get(&frame.topic).map(|c| c.identity.clone());
                self.audit(
                    AuditEvent::new(Action::PresenceTrack).identity(identity.as_ref()).channel(&frame.topic),
                );
                self.reply(&frame, "ok", json!({})).await
            }
            Some("untrack") => {
                if let Some(diff) = self.state.presence.untrack(&frame.topic, self.handle.id) {
                    self.state.deliver_presence_diff(&frame.topic, &diff);
                }
                self.reply(&frame, "ok", json!({})).await
            }
            other => {
                let reason = format!("unknown presence event {other:?}: use track or untrack");
                self.reply_error(&frame, reason).await
            }
        }
    }

    /// Sends `presence_state` once per join, if the member may read the channel.
    pub(super) async fn sync_presence(&mut self, topic: &str) -> Result<(), axum::Error> {
        let Some(channel) = self.channels.get_mut(topic) else { return Ok(()) };
        if channel.presence_synced || !channel.access.read {
            return Ok(());
        }
        channel.presence_synced = true;
        let join_ref = channel.join_ref.clone();
        let state = self.state.presence.state(topic);
        let text = phoenix::encode(
            self.handle.wire.vsn(),
            join_ref.as_deref(),
            None,
            topic,
            "presence_state",
            &state,
        );
        self.send_text(text).await
    }
}
