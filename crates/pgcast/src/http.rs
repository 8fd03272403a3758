//! HTTP endpoints: the WebSocket upgrade at `/realtime/v1/websocket`, and `/health`, `/ready`,
//! `/metrics` for operators.
//!
//! Handlers here only translate HTTP to calls on the session and state; no protocol logic.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::audit::{Action, AuditEvent};
use crate::auth::{Claims, SERVICE_ROLE};
use crate::capture::format_lsn;
use crate::config::CaptureMode;
use crate::protocol::phoenix::Vsn;
use crate::protocol::BroadcastPayload;
use crate::protocol::Wire;
use crate::server::{update_gauges, AppState};
use crate::session::phoenix::Phoenix;
use crate::session::recovery::Recovery;
use crate::session::socketio::SocketIo;
use crate::session::sse::Sse;
use crate::session::{Core, JoinError, JoinRequest, Rules, Session, Unauthenticated};
use crate::transport::engineio::{EngineConfig, Engines, Spawn};
use crate::transport::sse::SseTransport;
use crate::transport::websocket::WebSocketUpgrade;

pub fn routes(state: Arc<AppState>) -> Router {
    let engines = socketio_engines(&state);
    let socketio = any(move |ConnectInfo(peer): ConnectInfo<SocketAddr>, request: axum::extract::Request| {
        let engines = engines.clone();
        async move { engines.handle(peer, request).await }
    });
    let path = state.config.socketio.path.trim_end_matches('/').to_string();
    Router::new()
        .route(&format!("{path}/"), socketio.clone())
        .route(if path.is_empty() { "/" } else { &path }, socketio)
        .route("/realtime/v1/websocket", get(websocket))
        .route("/realtime/v1/sse", get(sse))
        .route("/realtime/v1/api/broadcast", post(broadcast))
        .route("/api/broadcast", post(broadcast))
        .route("/realtime/v1/api/broadcast/{topic}/events/{event}", post(broadcast_one))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// The Socket.IO endpoint's Engine.IO sessions; each runs a session core with the Socket.IO
/// adapter. A new session counts as unauthenticated until its CONNECT brings a valid token.
fn socketio_engines(state: &Arc<AppState>) -> Arc<Engines> {
    let config = EngineConfig {
        ping_interval: state.config.socketio.ping_interval,
        ping_timeout: state.config.socketio.ping_timeout,
        max_payload: state.config.max_message_bytes,
    };
    let recovery = Arc::new(Recovery::new(state.config.socketio.recovery_window));
    if recovery.enabled() {
        tokio::spawn(sweep_parked(recovery.clone(), state.shutdown.clone()));
    }
    let state = state.clone();
    let spawn: Spawn = Arc::new(move |transport, handshake| {
        if state.is_stopping() {
            return Err("server shutting down".into());
        }
        let token = handshake
            .authorization
            .as_deref()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::to_string)
            .or_else(|| handshake.query.get("token").cloned());
        // Without a valid token in the handshake the session counts as unauthenticated until
        // its CONNECT brings one (socket.io-client sends `auth` there), like a WebSocket without
        // an `apikey` on the Supabase endpoint.
        let verified = token.as_deref().is_some_and(|t| state.verifier.verify(t).is_ok());
        let unauthenticated = if verified {
            None
        } else {
            let max = state.config.max_unauthenticated_connections;
            let within = state.config.auth_timeout;
            let Some(slot) = Unauthenticated::admit(&state.unauthenticated, max, within) else {
                metrics::counter!("pgcast_connections_refused_total", "reason" => "unauthenticated")
                    .increment(1);
                return Err(format!("too many connections without a token (at most {max})"));
            };
            Some(slot)
        };
        let guard = state.session_guard();
        let core = Core::new(state.clone(), handshake.peer, Wire::SocketIo, None, unauthenticated);
        // A combinator, not an async block: a block would keep the captured parts and the
        // session's future side by side for the connection's life.
        use futures_util::FutureExt;
        let session = Session::new(core, SocketIo::new(token, recovery.clone()), transport);
        tokio::spawn(crate::session::supervise::run(session).map(move |()| drop(guard)));
        Ok(())
    });
    Engines::new(config, spawn)
}

/// Ends parked Socket.IO sessions past the recovery window, once a second; all of them at
/// shutdown.
async fn sweep_parked(recovery: Arc<Recovery>, mut shutdown: crate::shutdown::Shutdown) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => recovery.sweep(),
            _ = shutdown.wait() => {
                recovery.clear();
                return;
            }
        }
    }
}

async fn websocket(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    if state.is_stopping() {
        return (StatusCode::SERVICE_UNAVAILABLE, "server shutting down").into_response();
    }
    let wire = match Vsn::parse(params.get("vsn").map(String::as_str)) {
        Ok(vsn) => Wire::from(vsn),
        Err(reason) => return (StatusCode::BAD_REQUEST, reason).into_response(),
    };
    // A given apikey is checked now, as Supabase does: an invalid one gets 401 with a JSON
    // error instead of a connection held open. Without one the connection is unauthenticated
    // until a join brings a token, and only so many may be.
    let apikey = params.get("apikey").cloned();
    let (identity, unauthenticated) = match apikey.as_deref() {
        Some(key) => match state.verifier.verify(key) {
            Ok(claims) => (Some(claims.identity()), None),
            Err(e) => {
                metrics::counter!("pgcast_auth_failures_total", "protocol" => "phoenix").increment(1);
                let reason = format!("invalid apikey: {e}");
                state
                    .audit
                    .record(AuditEvent::new(Action::AuthFailure).peer(Some(peer)).detail(reason.clone()));
                return http_error(StatusCode::UNAUTHORIZED, reason);
            }
        },
        None => {
            let max = state.config.max_unauthenticated_connections;
            match Unauthenticated::admit(&state.unauthenticated, max, state.config.auth_timeout) {
                Some(slot) => (None, Some(slot)),
                None => {
                    metrics::counter!("pgcast_connections_refused_total", "reason" => "unauthenticated")
                        .increment(1);
                    let reason = format!(
                        "too many connections without a token (at most {max}): connect with an apikey"
                    );
                    return http_error(StatusCode::SERVICE_UNAVAILABLE, reason);
                }
            }
        }
    };
    // Recorded here rather than in the upgraded task, which would keep the identity's room
    // for the connection's whole life.
    state.audit.record(AuditEvent::new(Action::Connect).identity(identity.as_ref()).peer(Some(peer)));
    drop(identity);
    let guard = state.session_guard();
    let max = state.config.max_message_bytes;
    upgrade.on_upgrade(max, move |socket| {
        // A combinator, not an async block: a block would keep what it captured (the state,
        // the apikey) beside the session's future for the connection's whole life.
        use futures_util::FutureExt;
        let session = Session::new(
            Core::new(state, peer, wire, apikey, unauthenticated),
            Phoenix { vsn: wire.vsn() },
            socket,
        );
        crate::session::supervise::run(session).map(move |()| drop(guard))
    })
}

/// `GET /realtime/v1/sse?schema=&table=&event=&filter=`: one table's changes as Server-Sent
/// Events, under the token's policies. The subscription is joined before the response starts,
/// so a refusal is an HTTP status with a JSON `{error}`; `Last-Event-ID` (or `last_event_id=`)
/// resumes after the change it names.
async fn sse(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if state.is_stopping() {
        return http_error(StatusCode::SERVICE_UNAVAILABLE, "server shutting down".into());
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = bearer.or(params.get("apikey").map(String::as_str)) else {
        let reason = "no token: send Authorization: Bearer <JWT> or the apikey query parameter";
        return http_error(StatusCode::UNAUTHORIZED, reason.into());
    };
    let claims = match state.verifier.verify(token) {
        Ok(claims) => claims,
        Err(e) => {
            metrics::counter!("pgcast_auth_failures_total", "protocol" => "sse").increment(1);
            let reason = format!("invalid token: {e}");
            state.audit.record(AuditEvent::new(Action::AuthFailure).peer(Some(peer)).detail(reason.clone()));
            return http_error(StatusCode::UNAUTHORIZED, reason);
        }
    };
    let Some(table) = params.get("table").filter(|t| !t.is_empty()) else {
        return http_error(StatusCode::BAD_REQUEST, "table is required: ?table=<name>".into());
    };
    let schema = params.get("schema").map(String::as_str).unwrap_or("public");
    let event = params.get("event").map(String::as_str).unwrap_or("*");
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(params.get("last_event_id").map(String::as_str))
        .filter(|id| !id.is_empty());
    let resume = match last_event_id.map(crate::protocol::sse::parse_event_id).transpose() {
        Ok(resume) => resume,
        Err(reason) => return http_error(StatusCode::BAD_REQUEST, reason),
    };
    let mut binding = json!({ "event": event, "schema": schema, "table": table });
    if let Some(filter) = params.get("filter") {
        binding["filter"] = json!(filter);
    }
    let mut core = Core::new(state.clone(), peer, Wire::Sse, Some(token.to_string()), None);
    if let Err(error) = core.authenticated(&claims) {
        return http_error(StatusCode::TOO_MANY_REQUESTS, error.to_string());
    }
    let topic = format!("realtime:sse:{schema}.{table}");
    let request = JoinRequest {
        topic: &topic,
        join_ref: None,
        access_token: None,
        bindings: Ok(vec![binding]),
        tables: Vec::new(),
        rules: Rules::RowsOnly,
        resume: Ok(resume),
        broadcast_resume: Ok(None),
        receive_own: false,
        ack: false,
        presence_enabled: false,
        presence_key: None,
    };
    let joined = match core.join(request).await {
        Ok(joined) => joined,
        Err(error) => return http_error(sse_status(&error), error.to_string()),
    };
    let (transport, body) = SseTransport::new(state.config.sse_keepalive);
    let protocol = Sse::new(joined, schema, table);
    let guard = state.session_guard();
    use futures_util::FutureExt;
    tokio::spawn(
        crate::session::supervise::run(Session::new(core, protocol, transport)).map(move |()| drop(guard)),
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        // Proxies that buffer responses (nginx) would hold events back.
        .header("x-accel-buffering", "no")
        // A page of another origin may open the stream (the token is in the request, not in a
        // cookie), as it may open a WebSocket.
        .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")
        .body(body)
        .unwrap_or_else(|_| http_error(StatusCode::INTERNAL_SERVER_ERROR, "response not built".into()))
}

/// The HTTP status of a refused event stream.
fn sse_status(error: &JoinError) -> StatusCode {
    match error {
        JoinError::Token(_) => StatusCode::UNAUTHORIZED,
        JoinError::TooManyConnections(_) | JoinError::TooManyChannels(_) => StatusCode::TOO_MANY_REQUESTS,
        JoinError::PrivateChannelDenied { .. }
        | JoinError::PublicChannelsDisabled
        | JoinError::MayNotRead { .. } => StatusCode::FORBIDDEN,
        // The policy's refusals name the role; the rest is the request's (an unknown table, a
        // filter that cannot be read).
        JoinError::Binding(reason) if reason.contains("role ") => StatusCode::FORBIDDEN,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// Largest server-broadcast body (axum's default limit for a body read whole).
const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// A request body, read only after the token was checked (so an unauthenticated client cannot
/// make the server buffer it) and within the header timeout (so a body trickled byte by byte
/// cannot hold the connection).
async fn read_body(state: &AppState, body: axum::body::Body) -> Result<axum::body::Bytes, Response> {
    let within = state.config.http_header_timeout;
    match tokio::time::timeout(within, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(http_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY_BYTES} bytes, or cut off"),
        )),
        Err(_) => Err(http_error(
            StatusCode::REQUEST_TIMEOUT,
            format!("request body not received within {}s", within.as_secs()),
        )),
    }
}

fn http_error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// A `service_role` token from `Authorization: Bearer` or `apikey`, or the response refusing it.
fn service_claims(state: &AppState, headers: &HeaderMap) -> Result<Claims, (StatusCode, String)> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token = bearer.or_else(|| headers.get("apikey").and_then(|v| v.to_str().ok()));
    let Some(token) = token else {
        let message = "missing token: send Authorization: Bearer <service_role JWT>".to_string();
        return Err((StatusCode::UNAUTHORIZED, message));
    };
    let claims = state
        .verifier
        .verify(token)
        .map_err(|e| (StatusCode::UNAUTHORIZED, format!("invalid token: {e}")))?;
    if claims.role != SERVICE_ROLE {
        let message =
            format!("role {:?} may not broadcast over HTTP; use a {SERVICE_ROLE} token", claims.role);
        return Err((StatusCode::FORBIDDEN, message));
    }
    Ok(claims)
}

fn server_broadcast(
    state: &AppState,
    claims: &Claims,
    peer: Option<SocketAddr>,
    sub_topic: &str,
    event: &str,
    payload: &BroadcastPayload,
) -> usize {
    let topic = format!("realtime:{sub_topic}");
    let delivered = state.hub.broadcast(&topic, None, event, payload);
    state
        .audit
        .record(AuditEvent::new(Action::ServerBroadcast).claims(Some(claims)).channel(&topic).peer(peer));
    delivered
}

/// Server-side broadcast in Supabase's REST shape: `{messages: [{topic, event, payload, private}]}`,
/// with a `service_role` token as `Authorization: Bearer` or `apikey`.
async fn broadcast(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let claims = match service_claims(&state, &headers) {
        Ok(claims) => claims,
        Err((status, message)) => return http_error(status, message),
    };
    let body = match read_body(&state, body).await {
        Ok(body) => body,
        Err(refusal) => return refusal,
    };
    let parsed: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(e) => return http_error(StatusCode::BAD_REQUEST, format!("body is not JSON: {e}")),
    };
    let Some(messages) = parsed.get("messages").and_then(|m| m.as_array()) else {
        let message = "body must be {\"messages\": [{topic, event, payload}]}".to_string();
        return http_error(StatusCode::BAD_REQUEST, message);
    };
    let mut checked = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        let topic = message.get("topic").and_then(|t| t.as_str());
        let event = message.get("event").and_then(|e| e.as_str());
        let (Some(topic), Some(event)) = (topic, event) else {
            return http_error(
                StatusCode::BAD_REQUEST,
                format!("messages[{i}] needs string topic and event"),
            );
        };
        if let Err(reason) = crate::session::check_topic(&format!("realtime:{topic}")) {
            return http_error(StatusCode::BAD_REQUEST, format!("messages[{i}]: {reason}"));
        }
        let payload = BroadcastPayload::Json(message.get("payload").cloned().unwrap_or(json!({})));
        checked.push((topic, event, payload));
    }
    let delivered: usize = checked
        .iter()
        .map(|(topic, event, payload)| server_broadcast(&state, &claims, Some(peer), topic, event, payload))
        .sum();
    (StatusCode::ACCEPTED, Json(json!({ "messages": checked.len(), "deliveries": delivered })))
        .into_response()
}

/// realtime-js `httpSend(event, payload)`: one message, JSON or binary body.
async fn broadcast_one(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((topic, event)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let claims = match service_claims(&state, &headers) {
        Ok(claims) => claims,
        Err((status, message)) => return http_error(status, message),
    };
    let body = match read_body(&state, body).await {
        Ok(body) => body,
        Err(refusal) => return refusal,
    };
    let binary =
        headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes() == b"application/octet-stream");
    let payload = if binary {
        BroadcastPayload::Binary(body)
    } else {
        match serde_json::from_slice(&body) {
            Ok(value) => BroadcastPayload::Json(value),
            Err(e) => return http_error(StatusCode::BAD_REQUEST, format!("body is not JSON: {e}")),
        }
    };
    if let Err(reason) = crate::session::check_topic(&format!("realtime:{topic}")) {
        return http_error(StatusCode::BAD_REQUEST, reason);
    }
    let delivered = server_broadcast(&state, &claims, Some(peer), &topic, &event, &payload);
    (StatusCode::ACCEPTED, Json(json!({ "deliveries": delivered }))).into_response()
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let database = match tokio::time::timeout(Duration::from_secs(2), state.db.ping()).await {
        Ok(Ok(())) => json!({ "ok": true }),
        Ok(Err(e)) => json!({ "ok": false, "error": e.to_string() }),
        Err(_) => json!({ "ok": false, "error": "timed out after 2s" }),
    };
    let replication = &state.replication;
    let handled = state.progress.handled();
    let server_end = replication.server_wal_end();
    let healthy = database["ok"] == true && replication.is_connected();
    let capture = match state.config.capture {
        CaptureMode::Replication => json!({
            "mode": "replication",
            "connected": replication.is_connected(),
            "slot": state.config.slot,
            "publication": state.config.publication,
            "server_wal_end": format_lsn(server_end),
            "handled_lsn": format_lsn(handled),
            "lag_bytes": server_end.saturating_sub(handled),
            "last_error": replication.last_error(),
        }),
        CaptureMode::Trigger => json!({
            "mode": "trigger",
            "connected": replication.is_connected(),
            "handled_xid": handled,
            "last_error": replication.last_error(),
        }),
    };
    let body = json!({
        "status": if healthy { "ok" } else { "unhealthy" },
        "database": database,
        "capture": capture,
    });
    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.is_stopping() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "ready": false, "reason": "shutting down" })))
            .into_response();
    }
    if !state.replication.is_connected() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": "capture not running" })),
        )
            .into_response();
    }
    (StatusCode::OK, Json(json!({ "ready": true }))).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    update_gauges(&state);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}
