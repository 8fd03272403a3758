//! The Supabase Realtime (Phoenix channels) adapter: reads a client's frames (`phx_join`,
//! `phx_leave`, `access_token`, `broadcast`, `presence`, `heartbeat`, realtime-js's binary
//! broadcasts) into requests for the session core, and renders the core's answers as Phoenix
//! replies, `system` messages and `phx_close`.
//!
//! The byte layouts are `protocol::phoenix`'s; the decisions (who may join, what a resume
//! gets) are the core's. This is the mapping between the two.

use serde_json::{json, Map, Value};

use super::{channel_name, JoinError, JoinRequest, JoinedChannel, Protocol, Rules, Session, MAX_TOPIC_BYTES};
use crate::protocol::phoenix::{self, decode_binary_push, Frame};
use crate::protocol::BroadcastPayload;
use crate::transport::{Incoming, Transport, TransportError};

/// The Phoenix protocol, with the serializer the connection asked for (`vsn`).
pub struct Phoenix {
    pub vsn: phoenix::Vsn,
}

impl Protocol for Phoenix {
    async fn frame<T: Transport>(
        session: &mut Session<Phoenix, T>,
        frame: Incoming,
    ) -> Result<(), TransportError> {
        match frame {
            Incoming::Text(text) => session.handle_text(text.as_str()).await,
            Incoming::Binary(bytes) => session.handle_binary(&bytes).await,
            _ => Ok(()),
        }
    }

    async fn rate_notice<T: Transport>(
        session: &mut Session<Phoenix, T>,
        reason: &str,
    ) -> Result<(), TransportError> {
        session.send_phoenix_error(reason).await
    }

    async fn channel_closed<T: Transport>(
        session: &mut Session<Phoenix, T>,
        topic: &str,
        channel: Box<JoinedChannel>,
        reason: String,
    ) -> Result<(), TransportError> {
        session.send_channel_closed(topic, channel.join_ref.as_deref(), reason).await
    }
}

impl<T: Transport> Session<Phoenix, T> {
    fn vsn(&self) -> phoenix::Vsn {
        self.protocol.vsn
    }

    async fn send_text(&mut self, text: String) -> Result<(), TransportError> {
        self.transport.send(axum::extract::ws::Message::Text(text.into())).await
    }

    async fn reply(&mut self, to: &Frame, status: &str, response: Value) -> Result<(), TransportError> {
        let text = phoenix::reply(self.vsn(), to, status, response);
        self.send_text(text).await
    }

    async fn reply_error(&mut self, to: &Frame, reason: impl Into<String>) -> Result<(), TransportError> {
        let reason = reason.into();
        tracing::info!(
            session = self.core.id(),
            topic = %crate::text::clip(&to.topic, MAX_TOPIC_BYTES),
            event = %crate::text::clip(&to.event, crate::text::NAME_CHARS),
            reason = %reason,
            "refused"
        );
        self.reply(to, "error", json!({ "reason": reason })).await
    }

    /// `phx_error` on the `phoenix` topic: for what concerns the connection, not a channel.
    async fn send_phoenix_error(&mut self, reason: &str) -> Result<(), TransportError> {
        let text =
            phoenix::encode(self.vsn(), None, None, "phoenix", "phx_error", &json!({ "reason": reason }));
        self.send_text(text).await
    }

    /// A frame that could not be read: `phx_error` with the reason (the connection stays open
    /// unless the client keeps sending them).
    async fn malformed(&mut self, reason: &str) -> Result<(), TransportError> {
        if self.core.strike() {
            return Ok(());
        }
        tracing::info!(session = self.core.id(), reason, "bad frame");
        self.send_phoenix_error(reason).await
    }

    async fn handle_text(&mut self, text: &str) -> Result<(), TransportError> {
        let frame = match phoenix::decode(self.vsn(), text) {
            Ok(frame) => frame,
            Err(e) => return self.malformed(&e.to_string()).await,
        };
        if frame.topic == "phoenix" {
            return match frame.event.as_str() {
                "heartbeat" => self.reply(&frame, "ok", json!({})).await,
                other => {
                    let other = crate::text::clip(other, crate::text::NAME_CHARS);
                    self.reply_error(&frame, format!("unknown event {other} on topic phoenix")).await
                }
            };
        }
        match frame.event.as_str() {
            "phx_join" => self.join(frame).await,
            _ if !self.core.is_joined(&frame.topic) => {
                self.reply_error(&frame, super::SendError::NotJoined.to_string()).await
            }
            "phx_leave" => {
                self.core.leave(&frame.topic);
                self.reply(&frame, "ok", json!({})).await?;
                let close = phoenix::encode(
                    self.vsn(),
                    frame.join_ref.as_deref(),
                    None,
                    &frame.topic,
                    "phx_close",
                    &json!({}),
                );
                self.send_text(close).await
            }
            "access_token" => self.refresh_token(frame).await,
            "broadcast" => self.broadcast(frame).await,
            "presence" => self.presence(frame).await,
            other => {
                let reason = format!("unknown event {}", crate::text::clip(other, crate::text::NAME_CHARS));
                self.reply_error(&frame, reason).await
            }
        }
    }

    async fn join(&mut self, frame: Frame) -> Result<(), TransportError> {
        let payload = &frame.payload;
        let flag = |pointer: &str| payload.pointer(pointer).and_then(Value::as_bool).unwrap_or(false);
        let request = JoinRequest {
            topic: &frame.topic,
            join_ref: frame.join_ref.as_deref(),
            access_token: payload.get("access_token").and_then(Value::as_str),
            bindings: match payload.pointer("/config/postgres_changes") {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(items)) => Ok(items.clone()),
                Some(_) => Err(JoinError::BindingsNotAnArray),
            },
            tables: Vec::new(),
            rules: if flag("/config/private") { Rules::Private } else { Rules::Public },
            resume: parse_resume(payload).map_err(JoinError::InvalidResume),
            broadcast_resume: parse_broadcast_resume(payload).map_err(JoinError::InvalidResume),
            receive_own: flag("/config/broadcast/self"),
            ack: flag("/config/broadcast/ack"),
            presence_enabled: flag("/config/presence/enabled"),
            presence_key: payload.pointer("/config/presence/key").and_then(Value::as_str),
        };
        let joined = match self.core.join(request).await {
            Ok(joined) => joined,
            Err(error) => {
                // A client that keeps sending unusable topics is cut off without a reply.
                if matches!(error, JoinError::InvalidTopic(_)) && self.core.handle.is_kicked() {
                    return Ok(());
                }
                self.reply_error(&frame, error.to_string()).await?;
                if let Some(code) = error.cuts_off() {
                    self.core.cut_off(code, error.to_string());
                }
                return Ok(());
            }
        };
        self.reply(&frame, "ok", json!({ "postgres_changes": joined.bindings })).await?;
        let vsn = self.vsn();
        let join_ref = frame.join_ref.as_deref();
        if joined.has_changes {
            let payload = json!({
                "message": "Subscribed to PostgreSQL",
                "status": "ok",
                "extension": "postgres_changes",
                "channel": channel_name(&frame.topic),
                "pgcast": { "position": joined.head.to_string(), "epoch": joined.epoch },
            });
            self.send_text(phoenix::encode(vsn, join_ref, None, &frame.topic, "system", &payload)).await?;
        }
        if let Some(replay) = joined.replay {
            let outcome = match replay {
                Ok(messages) => {
                    let replayed = self.feed_all(messages).await?;
                    self.transport.flush().await?;
                    Ok(format!("resumed: {replayed} missed changes replayed"))
                }
                Err(reason) => Err(reason.to_string()),
            };
            self.send_resume_notice(&frame, None, outcome, &joined.epoch).await?;
        }
        if let Some(replay) = joined.broadcast_replay {
            let epoch = self.core.state.hub.epoch().to_string();
            let outcome = match replay {
                Ok(messages) => {
                    let replayed = self.feed_all(messages).await?;
                    Ok(format!("resumed: {replayed} missed broadcasts replayed"))
                }
                Err(reason) => Err(reason.to_string()),
            };
            self.send_resume_notice(&frame, Some("broadcast"), outcome, &epoch).await?;
        }
        if joined.presence_enabled {
            self.sync_presence(&frame.topic).await?;
        }
        Ok(())
    }

    /// Feeds replayed messages (written before anything queued live); returns how many.
    async fn feed_all(&mut self, messages: Vec<axum::extract::ws::Message>) -> Result<usize, TransportError> {
        let count = messages.len();
        for message in messages {
            self.transport.feed(message).await?;
        }
        Ok(count)
    }

    /// The `system` message (`extension: "pgcast"`) that ends a resume: `ok` with what was
    /// replayed, or `resync_required` with the reason and the current epoch.
    async fn send_resume_notice(
        &mut self,
        frame: &Frame,
        scope: Option<&str>,
        outcome: Result<String, String>,
        epoch: &str,
    ) -> Result<(), TransportError> {
        let topic = frame.topic.as_str();
        let (status, message) = match outcome {
            Ok(message) => ("ok", message),
            Err(reason) => ("resync_required", format!("resync required: {reason}")),
        };
        let mut payload = json!({
            "message": message,
            "status": status,
            "extension": "pgcast",
            "channel": channel_name(topic),
            "epoch": epoch,
        });
        if let Some(scope) = scope {
            payload["scope"] = json!(scope);
        }
        let text = phoenix::encode(self.vsn(), frame.join_ref.as_deref(), None, topic, "system", &payload);
        self.send_text(text).await
    }

    /// Tells the client a channel is closed by the server: a `system` error, then `phx_close`.
    async fn send_channel_closed(
        &mut self,
        topic: &str,
        join_ref: Option<&str>,
        message: String,
    ) -> Result<(), TransportError> {
        let payload = json!({
            "message": message,
            "status": "error",
            "extension": "system",
            "channel": channel_name(topic),
        });
        let vsn = self.vsn();
        self.send_text(phoenix::encode(vsn, join_ref, None, topic, "system", &payload)).await?;
        self.send_text(phoenix::encode(vsn, join_ref, None, topic, "phx_close", &json!({}))).await
    }

    /// `access_token`: the channel continues under the new token, or is closed with the reason.
    async fn refresh_token(&mut self, frame: Frame) -> Result<(), TransportError> {
        let Some(token) = frame.payload.get("access_token").and_then(Value::as_str) else {
            return self.reply_error(&frame, "access_token payload needs an access_token string").await;
        };
        match self.core.refresh(&frame.topic, token).await {
            Ok(()) => self.reply(&frame, "ok", json!({})).await,
            Err(error) => {
                let Some(channel) = self.core.leave(&frame.topic) else { return Ok(()) };
                self.send_channel_closed(&frame.topic, channel.join_ref.as_deref(), error.to_string()).await
            }
        }
    }

    async fn broadcast(&mut self, frame: Frame) -> Result<(), TransportError> {
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
    ) -> Result<(), TransportError> {
        match self.core.broadcast(&frame.topic, event, payload) {
            Ok(true) => self.reply(frame, "ok", json!({})).await,
            Ok(false) => Ok(()),
            Err(error) => self.reply_error(frame, error.to_string()).await,
        }
    }

    /// A binary frame: realtime-js sends user broadcasts this way with vsn 2.0.0.
    async fn handle_binary(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
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

    async fn presence(&mut self, frame: Frame) -> Result<(), TransportError> {
        let key = match self.core.presence_key(&frame.topic) {
            Ok(key) => key,
            Err(error) => return self.reply_error(&frame, error.to_string()).await,
        };
        match frame.payload.get("event").and_then(Value::as_str) {
            Some("track") => {
                let meta = match frame.payload.get("payload") {
                    Some(Value::Object(meta)) => meta.clone(),
                    None | Some(Value::Null) => Map::new(),
                    Some(_) => return self.reply_error(&frame, "presence payload must be an object").await,
                };
                // The client applies diffs only after a state: send it first if it was not.
                self.sync_presence(&frame.topic).await?;
                self.core.track(&frame.topic, &key, meta);
                self.reply(&frame, "ok", json!({})).await
            }
            Some("untrack") => {
                self.core.untrack(&frame.topic);
                self.reply(&frame, "ok", json!({})).await
            }
            other => {
                let reason = format!("unknown presence event {other:?}: use track or untrack");
                self.reply_error(&frame, reason).await
            }
        }
    }

    /// Sends `presence_state` once per join, if the member may read the channel.
    async fn sync_presence(&mut self, topic: &str) -> Result<(), TransportError> {
        let Some((join_ref, state)) = self.core.presence_state_due(topic) else { return Ok(()) };
        let text = phoenix::encode(self.vsn(), join_ref.as_deref(), None, topic, "presence_state", &state);
        self.send_text(text).await
    }
}

/// `config.resume: {position, epoch}` of a join: where a returning client left off.
fn parse_resume(payload: &Value) -> Result<Option<(String, crate::log::Position)>, String> {
    let Some(resume) = payload.pointer("/config/resume").filter(|v| !v.is_null()) else { return Ok(None) };
    if resume.get("position").is_none() && resume.get("epoch").is_none() {
        // Only `resume.broadcast` was given.
        return Ok(None);
    }
    let position =
        resume.get("position").and_then(Value::as_str).ok_or("config.resume needs a position string")?;
    let epoch = resume.get("epoch").and_then(Value::as_str).ok_or("config.resume needs an epoch string")?;
    Ok(Some((epoch.to_string(), position.parse()?)))
}

/// `config.resume.broadcast: {seq, epoch}`: the last broadcast a returning client received.
fn parse_broadcast_resume(payload: &Value) -> Result<Option<(u64, String)>, String> {
    let Some(resume) = payload.pointer("/config/resume/broadcast").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let seq =
        resume.get("seq").and_then(Value::as_u64).ok_or("config.resume.broadcast needs a numeric seq")?;
    let epoch =
        resume.get("epoch").and_then(Value::as_str).ok_or("config.resume.broadcast needs an epoch")?;
    Ok(Some((seq, epoch.to_string())))
}
