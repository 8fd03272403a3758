//! What a connection must do to be kept, and how long it may take: a complete request head
//! within `http_header_timeout_secs` (and only so many connections waiting to send one), and
//! for a WebSocket without a valid `apikey`, a join with a valid token within
//! `auth_timeout_secs` (and only so many such connections at once).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn setup(
    name: &str,
    tune: impl FnOnce(&mut pgcast::config::Config),
) -> (Pg, pgcast::server::RunningServer) {
    start_with(name, "CREATE TABLE t (id int PRIMARY KEY)", &["t"], tune).await
}

/// Reads until the server closes the connection (EOF or reset); how long that took.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn a_connection_that_never_completes_its_request_head_is_closed() {
    let (_pg, server) = setup("header-timeout", |c| c.http_header_timeout = Duration::from_secs(1)).await;
    // One that sends nothing, and one that trickles a header byte every 300 ms.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut trickle = TcpStream::connect(server.addr).await.unwrap();
    let trickling = tokio::spawn(async move {
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa" {
            if trickle.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        closed_within(&mut trickle, Duration::from_secs(10)).await
    });
    let silent_after = closed_within(&mut silent, Duration::from_secs(10)).await;
    assert!(
        silent_after.is_some_and(|d| d < Duration::from_secs(5)),
        "silent socket open after {silent_after:?}"
    );
    let trickle_after = trickling.await.unwrap();
    assert!(trickle_after.is_some(), "the trickling socket was never closed");
    // A complete request is served as before.
    let (status, _) = http_get(&format!("http://{}/ready", server.addr)).await.expect("a response");
    assert_eq!(status, 200);
}

#[tokio::test]
async fn connections_waiting_for_a_request_head_are_bounded() {
    let (_pg, server) = setup("pending", |c| {
        c.max_pending_connections = 5;
        c.http_header_timeout = Duration::from_secs(30);
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // Let the server accept them all before the one past the bound.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(server.addr).await.unwrap();
    let closed = closed_within(&mut extra, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "a sixth connection without a request was kept");
    // Once the idle ones go, requests are served again; a WebSocket holds no pending slot.
    drop(idle);
    let deadline = Instant::now() + DEADLINE;
    while http_get(&format!("http://{}/ready", server.addr)).await.map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut sockets = Vec::new();
    for _ in 0..8 {
        sockets.push(Client::connect(server.addr, Some(&token("service_role", 600)), true).await);
    }
    let (status, _) = http_get(&format!("http://{}/ready", server.addr)).await.expect("a response");
    assert_eq!(status, 200, "eight open WebSockets do not count as pending");
}

/// A TCP connection to `server` from the loopback address `source`.
async fn connect_from(source: [u8; 4], server: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((std::net::Ipv4Addr::from(source), 0).into()).unwrap();
    socket.connect(server).await.unwrap()
}

#[tokio::test]
async fn one_address_cannot_take_every_pending_place() {
    let (_pg, server) = setup("pending-per-ip", |c| {
        c.max_pending_connections_per_ip = 3;
        c.http_header_timeout = Duration::from_secs(30);
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(connect_from([127, 0, 0, 2], server.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fourth = connect_from([127, 0, 0, 2], server.addr).await;
    assert!(
        closed_within(&mut fourth, Duration::from_secs(5)).await.is_some(),
        "a fourth from one address was kept"
    );
    // Another address is served while the first one's places are taken.
    let mut other = connect_from([127, 0, 0, 3], server.addr).await;
    other.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    other.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[tokio::test]
async fn a_websocket_without_a_valid_token_is_closed_after_the_auth_timeout() {
    let (_pg, server) = setup("auth-timeout", |c| c.auth_timeout = Duration::from_secs(1)).await;
    let started = Instant::now();
    let mut idle = Client::connect(server.addr, None, true).await;
    let mut joins = Client::connect(server.addr, None, true).await;
    assert_eq!(joins.join("realtime:t", json!([]), Some(&token("service_role", 600))).await["status"], "ok");
    let close = idle.expect("the close", |v| v["event"] == "__close").await;
    assert_eq!(close["code"], 4002);
    assert_eq!(
        close["reason"],
        "no valid token within 1s: connect with an apikey or join with an access_token"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The one that joined with a token stays, past the timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = joins.push("phoenix", "heartbeat", json!({})).await;
    assert_eq!(joins.reply(&r).await["payload"]["status"], "ok");
}

#[tokio::test]
async fn websockets_without_a_token_are_bounded_in_number() {
    let (_pg, server) = setup("unauthenticated", |c| c.max_unauthenticated_connections = 3).await;
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(Client::connect(server.addr, None, true).await);
    }
    let url = format!("ws://{}/realtime/v1/websocket?vsn=2.0.0", server.addr);
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).to_string();
            assert!(body.contains("too many connections without a token (at most 3)"), "{body}");
        }
        other => panic!("expected 503, got {:?}", other.map(|_| "a connection")),
    }
    // With an apikey there is no such bound; and one that authenticates frees its place.
    let _with_key = Client::connect(server.addr, Some(&token("service_role", 600)), true).await;
    assert_eq!(
        waiting[0].join("realtime:t", json!([]), Some(&token("service_role", 600))).await["status"],
        "ok"
    );
    let deadline = Instant::now() + DEADLINE;
    let _admitted = loop {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(&url).await {
            break ws;
        }
        assert!(Instant::now() < deadline, "the authenticated connection's place was never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(metric(server.addr.port(), "pgcast_unauthenticated_connections").await, 3.0);
}

#[tokio::test]
async fn a_server_broadcast_body_is_read_only_after_the_token_and_only_for_so_long() {
    let (_pg, server) = setup("body", |c| c.http_header_timeout = Duration::from_secs(1)).await;
    let head = |auth: &str| {
        format!(
            "POST /api/broadcast HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{{"
        )
    };
    // No token: refused at once, without waiting for the megabyte announced.
    let mut anonymous = TcpStream::connect(server.addr).await.unwrap();
    anonymous.write_all(head("").as_bytes()).await.unwrap();
    let mut response = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), anonymous.read(&mut response))
        .await
        .expect("an answer")
        .unwrap();
    let response = String::from_utf8_lossy(&response[..n]).to_string();
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    // A valid token with a body that never comes: 408 after the timeout.
    let auth = format!("Authorization: Bearer {}\r\n", token("service_role", 60));
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    stalled.write_all(head(&auth).as_bytes()).await.unwrap();
    let mut response = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut response))
        .await
        .expect("an answer")
        .unwrap();
    let response = String::from_utf8_lossy(&response[..n]).to_string();
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("request body not received within 1s"), "{response}");
}
