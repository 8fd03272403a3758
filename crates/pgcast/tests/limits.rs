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

#[tokio::test]
async fn message_rate_is_limited_per_connection() {
    let (_pg, server) = setup("rate", |c| c.max_messages_per_second = 5).await;
    let mut flooder = Client::connect(server.addr, Some(&token("authenticated", 600)), true).await;
    let mut calm = Client::connect(server.addr, Some(&token("authenticated", 600)), true).await;
    let mut refs = Vec::new();
    for _ in 0..20 {
        refs.push(flooder.push("phoenix", "heartbeat", json!({})).await);
    }
    let (mut ok, mut limited) = (0, 0);
    for r in &refs {
        let reply = flooder.reply(r).await;
        match reply["payload"]["status"].as_str() {
            Some("ok") => ok += 1,
            _ => {
                assert_eq!(
                    reply["payload"]["response"]["reason"],
                    "rate limit exceeded: at most 5 messages per second"
                );
                limited += 1;
            }
        }
    }
    assert!(ok >= 5 && limited >= 10, "ok {ok}, limited {limited}");
    let r = calm.push("phoenix", "heartbeat", json!({})).await;
    assert_eq!(calm.reply(&r).await["payload"]["status"], "ok", "other connections are not limited");
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
