//! A session that panics ends alone: the panic is caught and counted, and everything the session
//! held (its connection count, subscriptions, channels, the user's connection slot) is released,
//! so the same user can connect again and everyone else is untouched.
//!
//! The panic is injected (`Config::panic_on_join_topic`, not settable by users): no client input
//! is known to panic a session any more, and this proves the containment for the next bug.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const PANICS: u32 = 5;

async fn wait_metric(port: u16, name: &str, want: f64) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let value = metric(port, name).await;
        if value == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {value}, expected {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_panicking_session_releases_everything_it_held() {
    expect_session_panics(PANICS);
    let (pg, server) = start_with("panics", "CREATE TABLE t (id int PRIMARY KEY)", &["t"], |c| {
        c.max_connections_per_user = 2;
        c.panic_on_join_topic = Some("realtime:boom".into());
    })
    .await;
    let port = server.addr.port();
    let mut neighbour = Client::connect(server.addr, Some(&token("service_role", 600)), true).await;
    assert_eq!(neighbour.join("realtime:ok", json!([binding("*", "t", None)]), None).await["status"], "ok");
    wait_metric(port, "pgcast_connections", 1.0).await;

    let user = token_with(json!({"role": "service_role", "sub": "u1"}), 600);
    for _ in 0..PANICS {
        let mut doomed = Client::connect(server.addr, Some(&user), true).await;
        doomed
            .push(
                "realtime:boom",
                "phx_join",
                json!({"config": {"postgres_changes": [binding("*", "t", None)]}}),
            )
            .await;
        // The panicked session's socket is dropped: the client sees its connection end.
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut doomed.ws)).await
        {}
        wait_metric(port, "pgcast_connections", 1.0).await;
    }
    assert_eq!(metric(port, "pgcast_session_panics_total").await, f64::from(PANICS));
    assert_eq!(pgcast::session::supervise::panics_caught(), u64::from(PANICS));
    wait_metric(port, "pgcast_subscriptions", 1.0).await;
    wait_metric(port, "pgcast_channels", 1.0).await;

    // Five panics at a limit of two: the user's slots were all given back.
    let mut again = Client::connect(server.addr, Some(&user), true).await;
    assert_eq!(again.join("realtime:fine", json!([binding("*", "t", None)]), None).await["status"], "ok");
    let mut twice = Client::connect(server.addr, Some(&user), true).await;
    assert_eq!(twice.join("realtime:fine", json!([]), None).await["status"], "ok");

    pg.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(neighbour.changes(1, DEADLINE).await.len(), 1, "the neighbour never noticed");
    assert_eq!(again.changes(1, DEADLINE).await.len(), 1);
}
