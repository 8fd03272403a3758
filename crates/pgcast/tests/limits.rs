//! Per-connection and per-user limits: each violation gets its own error and touches nobody
//! else's connection.

mod common;

use common::*;
use serde_json::json;

async fn setup(
    name: &str,
    tune: impl FnOnce(&mut pgcast::config::Config),
) -> (Pg, pgcast::server::RunningServer) {
    start_with(name, "CREATE TABLE t (id int PRIMARY KEY)", &["t"], tune).await
}

/// Frames the server sent within `quiet` of each other, and how the connection ended if it did.
async fn drain(
    client: &mut Client,
    quiet: std::time::Duration,
) -> (Vec<serde_json::Value>, Option<serde_json::Value>) {
    let mut frames = Vec::new();
    while let Some(v) = client.next(quiet).await {
        if v["event"] == "__close" {
            return (frames, Some(v));
        }
        frames.push(v);
    }
    (frames, None)
}

/// Sends `count` copies of `text` as fast as the socket takes them; stops if the server closes.
async fn flood(client: &mut Client, text: &str, count: usize) {
    use futures_util::SinkExt;
    for _ in 0..count {
        let frame = tokio_tungstenite::tungstenite::Message::Text(text.into());
        if client.ws.feed(frame).await.is_err() {
            return;
        }
    }
    let _ = client.ws.flush().await;
}

const QUIET: std::time::Duration = std::time::Duration::from_millis(600);

#[tokio::test]
async fn frames_over_the_rate_are_dropped_unread_with_one_notice() {
    let (_pg, server) = setup("rate", |c| c.max_messages_per_second = 20).await;
    let mut bursty = Client::connect(server.addr, Some(&token("authenticated", 600)), true).await;
    let mut calm = Client::connect(server.addr, Some(&token("authenticated", 600)), true).await;
    flood(&mut bursty, r#"["1","1","phoenix","heartbeat",{}]"#, 25).await;
    let (frames, closed) = drain(&mut bursty, QUIET).await;
    assert_eq!(closed, None, "a burst a little over the rate is not cut off");
    let replies = frames.iter().filter(|v| v["event"] == "phx_reply").count();
    assert!((20..25).contains(&replies), "{replies} replies: the burst's allowance, not more");
    assert!(frames.iter().all(|v| v["event"] != "phx_reply" || v["payload"]["status"] == "ok"));
    let notices: Vec<_> = frames.iter().filter(|v| v["event"] == "phx_error").collect();
    assert_eq!(notices.len(), 1, "one notice for the dropped frames, not one each: {notices:?}");
    assert_eq!(
        notices[0]["payload"]["reason"],
        "rate limit exceeded: at most 20 messages per second; frames are dropped"
    );
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let r = bursty.push("phoenix", "heartbeat", json!({})).await;
    assert_eq!(bursty.reply(&r).await["payload"]["status"], "ok", "served again once under the rate");
    let r = calm.push("phoenix", "heartbeat", json!({})).await;
    assert_eq!(calm.reply(&r).await["payload"]["status"], "ok", "other connections are not limited");
}

#[tokio::test]
async fn a_client_that_keeps_flooding_is_disconnected() {
    let (_pg, server) = setup("flood", |c| c.max_messages_per_second = 20).await;
    let mut flooder = Client::connect(server.addr, Some(&token("authenticated", 600)), true).await;
    flood(&mut flooder, r#"["1","1","phoenix","heartbeat",{}]"#, 500).await;
    let (frames, closed) = drain(&mut flooder, QUIET).await;
    let closed = closed.expect("the flooder is disconnected");
    assert_eq!(closed["code"], 1008);
    assert_eq!(closed["reason"], "rate limit exceeded: more than twice 20 messages per second");
    assert!(frames.len() < 30, "{} frames answered before the cut", frames.len());
}

#[tokio::test]
async fn malformed_frames_count_against_the_rate_and_a_stream_of_them_disconnects() {
    let (_pg, server) = setup("garbage", |c| c.max_messages_per_second = 5).await;
    // Under the malformed-frame limit but over the rate: only the rate's worth is parsed.
    let mut sloppy = Client::connect(server.addr, Some(&token("authenticated", 600)), true).await;
    flood(&mut sloppy, "{not json", 8).await;
    let (frames, closed) = drain(&mut sloppy, QUIET).await;
    assert_eq!(closed, None);
    let reasons: Vec<&str> = frames.iter().filter_map(|v| v["payload"]["reason"].as_str()).collect();
    let parsed = reasons.iter().filter(|r| r.starts_with("malformed message")).count();
    let limited = reasons.iter().filter(|r| r.starts_with("rate limit exceeded")).count();
    assert!((5..8).contains(&parsed) && limited == 1, "{reasons:?}");

    // 2,000 bad frames in one burst: the connection is closed after ten, not answered 2,000 times.
    let (_pg, server) = setup("garbage-burst", |_| {}).await;
    let mut hostile = Client::connect(server.addr, Some(&token("authenticated", 600)), true).await;
    flood(&mut hostile, "[1,2,3]", 2000).await;
    let (frames, closed) = drain(&mut hostile, QUIET).await;
    let closed = closed.expect("the sender of garbage is disconnected");
    assert_eq!(closed["code"], 1007);
    assert_eq!(closed["reason"], "too many malformed frames: 10 within 60s");
    assert!(frames.len() < 10, "{} notices before the cut", frames.len());
    let mut other = Client::connect(server.addr, Some(&token("authenticated", 600)), true).await;
    let r = other.push("phoenix", "heartbeat", json!({})).await;
    assert_eq!(other.reply(&r).await["payload"]["status"], "ok", "the server is fine for everyone else");
}

#[tokio::test]
async fn joined_channels_per_connection_are_limited() {
    let (_pg, server) = setup("channels", |c| c.max_channels_per_connection = 2).await;
    let mut client = Client::connect(server.addr, Some(&token("authenticated", 600)), true).await;
    assert_eq!(client.join("realtime:a", json!([]), None).await["status"], "ok");
    assert_eq!(client.join("realtime:b", json!([]), None).await["status"], "ok");
    let reply = client.join("realtime:c", json!([]), None).await;
    assert_eq!(reply["response"]["reason"], "too many channels: at most 2 per connection");
    let r = client.push("realtime:a", "phx_leave", json!({})).await;
    client.reply(&r).await;
    assert_eq!(client.join("realtime:c", json!([]), None).await["status"], "ok", "room again after leaving");
}

#[tokio::test]
async fn connections_per_user_are_limited() {
    let (pg, server) = setup("users", |c| c.max_connections_per_user = 2).await;
    let same_user = token_with(json!({"role": "service_role", "sub": "u1"}), 600);
    let mut first = Client::connect(server.addr, Some(&same_user), true).await;
    let mut second = Client::connect(server.addr, Some(&same_user), true).await;
    for client in [&mut first, &mut second] {
        assert_eq!(client.join("realtime:t", json!([binding("*", "t", None)]), None).await["status"], "ok");
    }
    let mut third = Client::connect(server.addr, Some(&same_user), true).await;
    let reply = third.join("realtime:t", json!([binding("*", "t", None)]), None).await;
    assert_eq!(reply["response"]["reason"], "too many connections for this user: at most 2");
    let close = third.expect("close", |v| v["event"] == "__close").await;
    assert_eq!(close["code"], 4003);

    let mut other_user = Client::connect(server.addr, Some(&token("service_role", 600)), true).await;
    assert_eq!(other_user.join("realtime:t", json!([]), None).await["status"], "ok");
    pg.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(first.changes(1, DEADLINE).await.len(), 1, "the user's other connections keep working");

    // A connection that ends frees its place.
    drop(second);
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let mut again = Client::connect(server.addr, Some(&same_user), true).await;
        if again.join("realtime:t", json!([]), None).await["status"] == "ok" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the closed connection's place was never freed");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
