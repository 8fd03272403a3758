//! HTTP endpoints: the WebSocket upgrade at `/realtime/v1/websocket`, and `/health`, `/ready`,
//! `/metrics` for operators.
//!
//! Handlers here only translate HTTP to calls on the session and state; no protocol logic.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::capture::format_lsn;
use crate::protocol::phoenix::Vsn;
use crate::server::{update_gauges, AppState};
use crate::session::Session;

/// Bytes the WebSocket reader buffers per connection; tungstenite's default (128 KiB) would
/// dominate per-connection memory.
const WS_READ_BUFFER: usize = 4096;

pub fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/realtime/v1/websocket", get(websocket))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
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
    let vsn = match Vsn::parse(params.get("vsn").map(String::as_str)) {
        Ok(vsn) => vsn,
        Err(reason) => return (StatusCode::BAD_REQUEST, reason).into_response(),
    };
    let apikey = params.get("apikey").cloned();
    let max = state.config.max_message_bytes;
    let guard = state.session_guard();
    upgrade
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let (session, queue) = Session::new(socket, state, peer, vsn, apikey);
            session.run(queue).await;
            drop(guard);
        })
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
    let body = json!({
        "status": if healthy { "ok" } else { "unhealthy" },
        "database": database,
        "replication": {
            "connected": replication.is_connected(),
            "slot": state.config.slot,
            "publication": state.config.publication,
            "server_wal_end": format_lsn(server_end),
            "handled_lsn": format_lsn(handled),
            "lag_bytes": server_end.saturating_sub(handled),
            "last_error": replication.last_error(),
        },
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
            Json(json!({ "ready": false, "reason": "replication not streaming" })),
        )
            .into_response();
    }
    (StatusCode::OK, Json(json!({ "ready": true }))).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    update_gauges(&state);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}
