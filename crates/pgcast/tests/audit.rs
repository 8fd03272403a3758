//! The audit trail: every audited action lands in `pgcast.audit_log` with who, what channel and
//! from where, and the application role cannot change or remove it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::test]
async fn audited_actions_are_written_and_the_log_is_append_only() {
    let pg = Pg::start("audit").await;
    pg.publish(
        "CREATE ROLE clinic_app LOGIN; CREATE TABLE visits (id int PRIMARY KEY, tenant_id int)",
        &["visits"],
    )
    .await;
    let mut config = config(&pg);
    config.audit_app_roles = vec!["clinic_app".into()];
    let server = start_server(config).await;

    let user = token_with(json!({"role": "service_role", "sub": "u-42", "tenant_id": 9}), 600);
    let mut client = Client::connect(server.addr, Some(&user), true).await;
    assert_eq!(
        client.join("realtime:ward", json!([binding("*", "visits", None)]), None).await["status"],
        "ok"
    );
    let refused = client.join("realtime:bad", json!([binding("*", "visits", Some("nope=eq.1"))]), None).await;
    assert_eq!(refused["status"], "error");
    client.join("realtime:forged", json!([]), Some("not-a-jwt")).await;
    let r = client.push("realtime:ward", "access_token", json!({"access_token": user})).await;
    client.reply(&r).await;
    let r = client
        .push("realtime:ward", "presence", json!({"type": "presence", "event": "track", "payload": {}}))
        .await;
    client.reply(&r).await;
    let r = client.push("realtime:ward", "phx_leave", json!({})).await;
    client.reply(&r).await;
    let broadcast = format!(
        "POST /api/broadcast HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        token("service_role", 60),
        r#"{"messages":[{"topic":"ward","event":"e","payload":{}}]}"#.len(),
        r#"{"messages":[{"topic":"ward","event":"e","payload":{}}]}"#
    );
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(broadcast.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    }

    let sql = pg.client().await;
    let expected = [
        "connect",
        "join",
        "join_refused",
        "auth_failure",
        "token_refresh",
        "presence_track",
        "leave",
        "server_broadcast",
    ];
    let deadline = Instant::now() + DEADLINE;
    let rows = loop {
        let rows = sql
            .query("SELECT action, user_id, role, tenant, channel, client_addr, detail FROM pgcast.audit_log ORDER BY id", &[])
            .await
            .unwrap();
        let actions: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        if expected.iter().all(|a| actions.iter().any(|x| x == a)) {
            break rows;
        }
        assert!(Instant::now() < deadline, "audit log has {actions:?}, expected all of {expected:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let join = rows.iter().find(|r| r.get::<_, String>(0) == "join").unwrap();
    assert_eq!(join.get::<_, Option<String>>(1).as_deref(), Some("u-42"));
    assert_eq!(join.get::<_, Option<String>>(2).as_deref(), Some("service_role"));
    assert_eq!(join.get::<_, Option<String>>(3).as_deref(), Some("9"));
    assert_eq!(join.get::<_, Option<String>>(4).as_deref(), Some("realtime:ward"));
    assert_eq!(join.get::<_, Option<String>>(5).as_deref(), Some("127.0.0.1"));
    let refusal = rows.iter().find(|r| r.get::<_, String>(0) == "join_refused").unwrap();
    assert!(refusal.get::<_, Option<String>>(6).unwrap().contains("has no column"));
    let failure = rows.iter().find(|r| r.get::<_, String>(0) == "auth_failure").unwrap();
    assert!(!failure.get::<_, Option<String>>(6).unwrap().contains("not-a-jwt"), "tokens are never recorded");

    // The application role can read and append, never change or remove.
    sql.batch_execute("SET ROLE clinic_app").await.unwrap();
    let count: i64 = sql.query_one("SELECT count(*) FROM pgcast.audit_log", &[]).await.unwrap().get(0);
    assert!(count >= expected.len() as i64);
    sql.batch_execute("INSERT INTO pgcast.audit_log (at, action) VALUES (now(), 'app_note')").await.unwrap();
    for statement in [
        "UPDATE pgcast.audit_log SET user_id = 'someone-else'",
        "DELETE FROM pgcast.audit_log",
        "TRUNCATE pgcast.audit_log",
    ] {
        let err = sql.batch_execute(statement).await.expect_err(statement);
        let message = err.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
        assert!(
            message.contains("permission denied") || message.contains("append-only"),
            "{statement}: {message}"
        );
    }
    // Even the owner cannot rewrite history without disabling the trigger.
    sql.batch_execute("RESET ROLE").await.unwrap();
    let err = sql.batch_execute("DELETE FROM pgcast.audit_log").await.unwrap_err();
    assert!(err.as_db_error().unwrap().message().contains("append-only"));
}
