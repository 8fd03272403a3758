//! The Socket.IO adapter (namespace `/`, over Engine.IO): reads a client's packets into
//! requests for the session core — CONNECT with its token, `join` / `leave` of rooms,
//! `access_token` — and renders the core's answers as CONNECT replies, `connect_error`, acks
//! and `error` events.
//!
//! A room is a core channel named `realtime:<room>`, so a server broadcast to topic `T` reaches
//! Socket.IO members of room `T` and Phoenix members of channel `T` alike. A room a channel rule
//! of the policy file could match is decided by those rules (as a private channel); any other
//! room is public. The byte layouts are `protocol::socketio`'s.
//!
//! Connection state recovery (`recovery.rs`): the CONNECT reply carries a `pid`; a session
//! whose transport is lost is parked under it, and a CONNECT bringing it back with its last
//! `offset` resumes that session — the events it missed first, then the reply.

use std::sync::Arc;

use serde_json::{json, Value};

use super::recovery::{Parked, Recovery, Sent, START};
use super::{
    channel_name, check_topic, Core, JoinError, JoinRequest, JoinedChannel, Protocol, Rules, Session,
    TokenError,
};
use crate::audit::{Action, AuditEvent};
use crate::auth::Claims;
use crate::outbound::{close_code, Frames, Outbound};
use crate::protocol::socketio::{
    connect_error, decode_sio, packet_message, recoverable_event, SioKind, SioPacket,
};
use crate::rooms::TableBinding;
use crate::transport::{Incoming, Transport, TransportError};

/// The Socket.IO protocol state of one connection.
pub struct SocketIo {
    /// The token the connection authenticates with: CONNECT's `auth.token`, else the
    /// handshake's (`Authorization: Bearer`, `?token=`); replaced by `access_token`.
    token: Option<Box<str>>,
    connected: bool,
    /// A binary packet waiting for its attachments, and how many have come.
    partial: Option<Box<(SioPacket, usize)>>,
    recovery: Arc<Recovery>,
    /// The session's ids once connected.
    ids: Option<Box<Ids>>,
    /// The last events written, for recovery (made by the first).
    sent: Option<Box<Sent>>,
}

/// A connected session's ids: `sid` (the client's `socket.id`) and `pid`, the private id it
/// recovers the session with (empty when recovery is off).
struct Ids {
    sid: Box<str>,
    pid: Box<str>,
}

impl Drop for SocketIo {
    /// A session that did not park is no longer under its `pid`.
    fn drop(&mut self) {
        if let Some(ids) = &self.ids {
            if !ids.pid.is_empty() {
                self.recovery.forget(&ids.pid);
            }
        }
    }
}

impl SocketIo {
    /// `handshake_token`: the token the Engine.IO handshake carried, if any.
    pub fn new(handshake_token: Option<String>, recovery: Arc<Recovery>) -> SocketIo {
        SocketIo {
            token: handshake_token.map(String::into_boxed_str),
            connected: false,
            partial: None,
            recovery,
            ids: None,
            sent: None,
        }
    }

    /// The offset an event that is not itself recoverable carries: the last one written, so
    /// the client's idea of where it is stays true.
    fn last_offset(&self) -> &str {
        self.sent.as_deref().map_or(START, Sent::last_offset)
    }
}

/// Why a token cannot be used, in Socket.IO's words.
fn token_problem(error: &TokenError) -> String {
    match error {
        TokenError::Missing => {
            "no token: pass it as auth.token, an Authorization: Bearer header or the token query parameter"
                .into()
        }
        TokenError::Invalid { error, .. } => format!("invalid token: {error}"),
    }
}

/// How a refused join reads: policy refusals as "Access denied: …".
fn refusal(error: &JoinError) -> String {
    match error {
        JoinError::Token(token) => token_problem(token),
        JoinError::PrivateChannelDenied { .. }
        | JoinError::PublicChannelsDisabled
        | JoinError::MayNotRead { .. } => {
            format!("Access denied: {error}")
        }
        other => other.to_string(),
    }
}

impl Protocol for SocketIo {
    async fn frame<T: Transport>(
        session: &mut Session<SocketIo, T>,
        frame: Incoming,
    ) -> Result<(), TransportError> {
        match frame {
            Incoming::Text(text) => {
                if session.protocol.partial.is_some() {
                    session.protocol_error("a text packet came while binary attachments were due");
                    return Ok(());
                }
                match decode_sio(text.as_str()) {
                    Ok(packet) if packet.attachments > 0 => {
                        session.protocol.partial = Some(Box::new((packet, 0)));
                        Ok(())
                    }
                    Ok(packet) => session.packet(packet).await,
                    Err(e) => {
                        session.protocol_error(&format!("invalid Socket.IO packet: {e}"));
                        Ok(())
                    }
                }
            }
            Incoming::Binary(_) => {
                let Some(mut partial) = session.protocol.partial.take() else {
                    session.protocol_error("a binary message came that no packet announced");
                    return Ok(());
                };
                partial.1 += 1;
                if partial.1 < partial.0.attachments {
                    session.protocol.partial = Some(partial);
                    return Ok(());
                }
                // No event pgcast answers takes binary arguments: the packet is handled (and
                // refused by name) without them.
                session.packet(partial.0).await
            }
            _ => Ok(()),
        }
    }

    async fn rate_notice<T: Transport>(
        session: &mut Session<SocketIo, T>,
        reason: &str,
    ) -> Result<(), TransportError> {
        session.emit("error", &json!(reason)).await
    }

    async fn channel_closed<T: Transport>(
        session: &mut Session<SocketIo, T>,
        _topic: &str,
        _channel: Box<JoinedChannel>,
        reason: String,
    ) -> Result<(), TransportError> {
        // One token for the whole connection: when it expires, delivery ends for every room.
        session.core.cut_off(close_code::TOKEN_EXPIRED, reason);
        Ok(())
    }

    async fn closing<T: Transport>(session: &mut Session<SocketIo, T>, code: u16, reason: &str) {
        if !session.protocol.connected {
            let _ = session.send_packet(&connect_error("/", reason)).await;
            return;
        }
        let _ = session.emit("error", &json!(reason)).await;
        // Going away, a slow consumer or a lost heartbeat: the client should come back (a
        // transport close makes socket.io-client reconnect). Anything else is the server
        // ending this client's session ("io server disconnect": it does not reconnect).
        if !matches!(code, close_code::GOING_AWAY | close_code::SLOW_CONSUMER | close_code::HEARTBEAT_TIMEOUT)
        {
            let _ = session.send_packet(&SioPacket::new(SioKind::Disconnect, "/", None)).await;
        }
    }

    fn outgoing(&mut self, batch: &[Outbound]) {
        if self.connected && self.recovery.enabled() {
            let messages = batch.iter().flat_map(|entry| match &entry.frames {
                Frames::One(message) => std::slice::from_ref(message),
                Frames::Run(run) => &run[..],
            });
            self.sent.get_or_insert_default().record(messages.cloned(), self.recovery.window());
        }
    }

    fn park(&mut self, core: Core) -> Option<Core> {
        // Cut off for a reason of the server's: nothing to come back to (a session taken over
        // by a recovering connection parks for it).
        let cut_off = core.handle.kick_code().is_some_and(|code| code != close_code::REPLACED);
        if !self.connected || !self.recovery.enabled() || cut_off {
            return Some(core);
        }
        let Some(ids) = self.ids.take() else { return Some(core) };
        let Ids { sid, pid } = *ids;
        self.recovery.park(pid, Parked::new(core, sid, self.sent.take(), self.token.take()));
        None
    }
}

impl<T: Transport> Session<SocketIo, T> {
    /// The client broke the protocol: the connection is closed (as Socket.IO does).
    fn protocol_error(&mut self, reason: &str) {
        tracing::info!(session = self.core.id(), reason, "bad Socket.IO packet");
        metrics::counter!("pgcast_malformed_frames_total", "protocol" => "socketio").increment(1);
        self.core.cut_off(close_code::INVALID_PAYLOAD, reason.to_string());
    }

    async fn send_packet(&mut self, packet: &SioPacket) -> Result<(), TransportError> {
        self.transport.send(packet_message(packet)).await
    }

    /// Emits an event of the server's own (`error`): with the last offset when recovery is on,
    /// since the client takes any string last argument for one.
    async fn emit(&mut self, event: &str, argument: &Value) -> Result<(), TransportError> {
        let argument = argument.to_string();
        let message = if self.protocol.recovery.enabled() && self.protocol.connected {
            recoverable_event(event, &argument, self.protocol.last_offset())
        } else {
            crate::protocol::socketio::event_message(event, &argument)
        };
        self.transport.send(message).await
    }

    async fn ack(&mut self, id: Option<u64>, argument: Value) -> Result<(), TransportError> {
        let Some(id) = id else { return Ok(()) };
        let mut packet = SioPacket::new(SioKind::Ack, "/", Some(json!([argument])));
        packet.id = Some(id);
        self.send_packet(&packet).await
    }

    /// A refused request: the `{error}` ack if one was asked for, and an `error` event.
    async fn refuse(&mut self, ack: Option<u64>, reason: &str) -> Result<(), TransportError> {
        self.ack(ack, json!({ "error": reason })).await?;
        self.emit("error", &json!(reason)).await
    }

    async fn packet(&mut self, packet: SioPacket) -> Result<(), TransportError> {
        if packet.nsp != "/" {
            if packet.kind == SioKind::Connect {
                let refusal = connect_error(&packet.nsp, "Invalid namespace");
                return self.send_packet(&refusal).await;
            }
            self.protocol_error("a packet for a namespace that is not connected");
            return Ok(());
        }
        match packet.kind {
            SioKind::Connect => self.connect(packet.data).await,
            SioKind::Disconnect => {
                self.core.leave_all();
                self.protocol.connected = false;
                Ok(())
            }
            SioKind::Event | SioKind::BinaryEvent => {
                if !self.protocol.connected {
                    self.protocol_error("an event before CONNECT");
                    return Ok(());
                }
                let Some(Value::Array(args)) = packet.data else { return Ok(()) };
                self.event(args, packet.id).await
            }
            // Acks of the client's: pgcast asks for none.
            SioKind::Ack | SioKind::BinaryAck => Ok(()),
            SioKind::ConnectError => {
                self.protocol_error("CONNECT_ERROR is the server's to send");
                Ok(())
            }
        }
    }

    async fn connect(&mut self, auth: Option<Value>) -> Result<(), TransportError> {
        if self.protocol.connected {
            self.protocol_error("CONNECT on a namespace already connected");
            return Ok(());
        }
        let field = |name: &str| auth.as_ref().and_then(|a| a.get(name)).and_then(Value::as_str);
        let given = field("token");
        let token = given.map(Box::from).or_else(|| self.protocol.token.clone());
        let claims = match self.core.verify_token(token.as_deref()) {
            Ok(claims) => claims,
            Err(error) => {
                metrics::counter!("pgcast_auth_failures_total", "protocol" => "socketio").increment(1);
                let reason = token_problem(&error);
                self.core.audit(AuditEvent::new(Action::AuthFailure).detail(reason.clone()));
                tracing::info!(session = self.core.id(), reason = %reason, "connect refused");
                let refusal = connect_error("/", &reason);
                return self.send_packet(&refusal).await;
            }
        };
        if let (Some(pid), true) = (field("pid"), self.protocol.recovery.enabled()) {
            if self.restore(pid, field("offset"), &claims, token.clone()).await? {
                return Ok(());
            }
        }
        if let Err(error) = self.core.authenticated(&claims) {
            let reason = error.to_string();
            let refusal = connect_error("/", &reason);
            self.send_packet(&refusal).await?;
            if let Some(code) = error.cuts_off() {
                self.core.cut_off(code, reason);
            }
            return Ok(());
        }
        self.protocol.token = token;
        self.protocol.connected = true;
        let sid: Box<str> = crate::random::hex_id().into();
        let pid: Box<str> =
            if self.protocol.recovery.enabled() { crate::random::hex_id().into() } else { "".into() };
        self.send_packet(&connect_reply(&sid, &pid)).await?;
        if !pid.is_empty() {
            self.protocol.recovery.connected(&pid, &self.core.handle);
        }
        self.protocol.ids = Some(Box::new(Ids { sid, pid }));
        let rooms: Vec<String> =
            self.core.state.config.socketio.connect_rooms.iter().filter_map(|t| expand(t, &claims)).collect();
        for room in rooms {
            if let Err(reason) = self.join_room(&room).await {
                self.emit("error", &json!(reason)).await?;
            }
        }
        Ok(())
    }

    /// A CONNECT bringing back the `pid` of a parked session: if it is there, not cut off
    /// while parked, of the same user, and holds `offset`, this connection takes its core
    /// over — the events after `offset` and those queued meanwhile first, then the CONNECT
    /// reply with the same ids. `false`: the client gets a fresh session instead.
    async fn restore(
        &mut self,
        pid: &str,
        offset: Option<&str>,
        claims: &Claims,
        token: Option<Box<str>>,
    ) -> Result<bool, TransportError> {
        let fresh = |reason: &str| {
            tracing::info!(session = self.core.id(), reason, "Socket.IO session not recovered");
            metrics::counter!("pgcast_socketio_recoveries_total", "result" => "fresh").increment(1);
            Ok(false)
        };
        let Some(mut parked) = self.protocol.recovery.take(pid).await else {
            return fresh("no session parked under that pid (never, expired, or another server)");
        };
        if !parked.core.handle.take_over() {
            return fresh("cut off while parked (its queue overflowed)");
        }
        if parked.core.counted_user.as_deref() != claims.sub.as_deref() {
            // Not this client's to end: it stays parked for its own.
            self.protocol.recovery.park(pid.into(), parked);
            return fresh("the token is another user's");
        }
        let missed = match parked.sent.as_deref() {
            Some(sent) => sent.after(offset),
            None => (offset.unwrap_or(START) == START).then(Vec::new),
        };
        let Some(missed) = missed else {
            return fresh("the offset is older than the events held");
        };
        // This connection goes on as the parked session; its own fresh core is released.
        std::mem::swap(&mut self.core, &mut parked.core);
        self.core.peer = parked.core.peer;
        let Parked { core: unused, sid, sent, token: parked_token, .. } = parked;
        drop(unused);
        self.protocol.sent = sent;
        self.protocol.connected = true;
        // Under its pid before anything is written: if this transport fails too, the session
        // parks again with what it was sent.
        self.protocol.recovery.connected(pid, &self.core.handle);
        self.protocol.ids = Some(Box::new(Ids { sid: sid.clone(), pid: pid.into() }));
        let replayed = missed.len();
        for message in missed {
            self.transport.feed(message).await?;
        }
        // Then what was queued while it was parked, written as the session writes any batch
        // (and flushed with the missed events).
        let mut queued = Vec::new();
        self.core.handle.queue().take(&mut queued, usize::MAX);
        self.protocol.outgoing(&queued);
        // A long replay keeps no buffer: the CONNECT reply's flush right after gives it back.
        self.write_batch(&mut queued).await?;
        self.send_packet(&connect_reply(&sid, pid)).await?;
        metrics::counter!("pgcast_socketio_recoveries_total", "result" => "recovered").increment(1);
        self.core
            .audit(AuditEvent::new(Action::Connect).claims(Some(claims)).detail("recovered".to_string()));
        tracing::info!(session = self.core.id(), replayed, "Socket.IO session recovered");
        let changed = token != parked_token;
        self.protocol.token = token;
        if changed {
            // A new token: the rooms go on under its claims.
            self.rebind(claims).await?;
        }
        Ok(true)
    }

    async fn event(&mut self, args: Vec<Value>, ack: Option<u64>) -> Result<(), TransportError> {
        let name = args.first().and_then(Value::as_str).unwrap_or_default().to_string();
        let argument = args.get(1).and_then(Value::as_str);
        match name.as_str() {
            "join" | "leave" | "access_token" if argument.is_none() => {
                let reason = format!("{name} needs a string argument");
                self.refuse(ack, &reason).await
            }
            "join" => {
                let room = argument.unwrap_or_default().to_string();
                match self.join_room(&room).await {
                    Ok(()) => self.ack(ack, json!({ "ok": true })).await,
                    Err(reason) => self.refuse(ack, &reason).await,
                }
            }
            "leave" => {
                let room = argument.unwrap_or_default();
                let answer = match self.core.leave(&format!("realtime:{room}")) {
                    Some(_) => json!({ "ok": true }),
                    None => {
                        json!({ "error": format!("not in room {}", crate::text::clip(room, crate::text::NAME_CHARS)) })
                    }
                };
                self.ack(ack, answer).await
            }
            "access_token" => {
                let token = argument.unwrap_or_default().to_string();
                self.refresh(&token, ack).await
            }
            other => {
                let state = self.core.state.clone();
                let routes = &state.config.socketio.tables;
                if let Some((route, _)) = routes.subscription(other) {
                    let answer = match routes.bind_subscribe(route, args.get(1)) {
                        Ok(binding) => self.join_channel(other, vec![binding], Rules::RowsOnly).await,
                        Err(reason) => Err(reason),
                    };
                    return match answer {
                        Ok(()) => self.ack(ack, json!({ "ok": true })).await,
                        Err(reason) => self.refuse(ack, &reason).await,
                    };
                }
                if let Some(subscribe) = routes.unsubscription(other) {
                    let topic = format!("realtime:{}", subscribe.event);
                    let event = subscribe.event.clone();
                    let answer = match self.core.leave(&topic) {
                        Some(_) => json!({ "ok": true }),
                        None => json!({ "error": format!("not subscribed: emit {event} first") }),
                    };
                    return self.ack(ack, answer).await;
                }
                let reason = format!("unknown event {}", crate::text::clip(other, crate::text::NAME_CHARS));
                self.refuse(ack, &reason).await
            }
        }
    }

    /// Joins a room as a core channel, with the table changes `[[socketio.tables]]` routes to
    /// it; `Err` is the refusal as the client reads it.
    async fn join_room(&mut self, room: &str) -> Result<(), String> {
        let routes = &self.core.state.config.socketio.tables;
        if routes.reserved(room) {
            self.core.strike();
            let shown = crate::text::clip(room, crate::text::NAME_CHARS);
            return Err(format!("room {shown} is the name of a subscribe event: emit it instead of joining"));
        }
        let tables = routes.for_room(room);
        // A room a channel rule could match is the rules'; any other is public.
        let rules = if self.core.state.policy.governs(room) { Rules::Private } else { Rules::Public };
        self.join_channel(room, tables, rules).await
    }

    /// Joins `name` (a room, or a subscribe event's channel) as the core channel
    /// `realtime:<name>` receiving `tables`.
    async fn join_channel(
        &mut self,
        room: &str,
        tables: Vec<TableBinding>,
        rules: Rules,
    ) -> Result<(), String> {
        let topic = format!("realtime:{room}");
        if let Err(reason) = check_topic(&topic) {
            self.core.strike();
            return Err(reason);
        }
        let token = self.protocol.token.clone();
        let request = JoinRequest {
            topic: &topic,
            join_ref: None,
            access_token: token.as_deref(),
            bindings: Ok(Vec::new()),
            tables,
            rules,
            resume: Ok(None),
            broadcast_resume: Ok(None),
            receive_own: false,
            ack: false,
            presence_enabled: false,
            presence_key: None,
        };
        match self.core.join(request).await {
            Ok(_) => Ok(()),
            Err(error) => {
                if let Some(code) = error.cuts_off() {
                    self.core.cut_off(code, error.to_string());
                }
                Err(refusal(&error))
            }
        }
    }

    /// `access_token`: the connection continues under a new token; rooms the new claims may
    /// not stay in are left, each with an `error` event.
    async fn refresh(&mut self, token: &str, ack: Option<u64>) -> Result<(), TransportError> {
        let claims = match self.core.verify_token(Some(token)) {
            Ok(claims) => claims,
            Err(error) => {
                metrics::counter!("pgcast_auth_failures_total", "protocol" => "socketio").increment(1);
                let reason = token_problem(&error);
                self.core.audit(AuditEvent::new(Action::AuthFailure).detail(reason.clone()));
                return self.ack(ack, json!({ "error": reason })).await;
            }
        };
        self.rebind(&claims).await?;
        self.protocol.token = Some(token.into());
        self.ack(ack, json!({ "ok": true })).await
    }

    /// Every room goes on under `claims`; those they may not stay in are left, each with an
    /// `error` event.
    async fn rebind(&mut self, claims: &Claims) -> Result<(), TransportError> {
        let topics: Vec<String> = self.core.channels.keys().cloned().collect();
        for topic in topics {
            if let Err(error) = self.core.refresh_as(&topic, claims).await {
                self.core.leave(&topic);
                let reason = format!("left room {}: {error}", channel_name(&topic));
                self.emit("error", &json!(reason)).await?;
            }
        }
        Ok(())
    }
}

/// The CONNECT reply: `{sid}`, and `pid` when recovery is on.
fn connect_reply(sid: &str, pid: &str) -> SioPacket {
    let data = if pid.is_empty() { json!({ "sid": sid }) } else { json!({ "sid": sid, "pid": pid }) };
    SioPacket::new(SioKind::Connect, "/", Some(data))
}

/// A room template over the claims (`user:{claims.sub}`); `None` when a claim it names is
/// missing, not a single text or number, or holds `:` or `*` (which could widen the room).
fn expand(template: &str, claims: &Claims) -> Option<String> {
    let mut room = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{claims.") {
        let end = rest[start..].find('}')?;
        room.push_str(&rest[..start]);
        let name = &rest[start + 8..start + end];
        let value = match name {
            "role" => claims.role.clone(),
            "sub" => claims.sub.clone()?,
            other => match claims.all.get(other)? {
                Value::String(text) => text.clone(),
                Value::Number(n) => n.to_string(),
                _ => return None,
            },
        };
        if value.is_empty() || value.contains([':', '*']) {
            return None;
        }
        room.push_str(&value);
        rest = &rest[start + end + 1..];
    }
    room.push_str(rest);
    Some(room)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_rooms_expand_from_claims_and_skip_what_is_missing() {
        let mut all = serde_json::Map::new();
        all.insert("tenant_id".into(), json!(7));
        all.insert("clinic".into(), json!("a:b"));
        let claims = Claims { role: "admin".into(), sub: Some("u1".into()), exp: u64::MAX, all };
        assert_eq!(expand("user:{claims.sub}", &claims).as_deref(), Some("user:u1"));
        assert_eq!(expand("tenant:{claims.tenant_id}", &claims).as_deref(), Some("tenant:7"));
        assert_eq!(expand("{claims.role}s", &claims).as_deref(), Some("admins"));
        assert_eq!(expand("calendar", &claims).as_deref(), Some("calendar"));
        assert_eq!(expand("x:{claims.nope}", &claims), None);
        assert_eq!(expand("c:{claims.clinic}", &claims), None, "a ':' in a claim could widen the room");
        assert_eq!(expand("broken:{claims.sub", &claims), None);
    }
}
