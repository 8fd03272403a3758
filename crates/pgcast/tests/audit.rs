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

/// Rows of `pgcast.audit_log` as (action, channel, sanitized, detail), once `done` holds.
async fn audit_rows(
    sql: &tokio_postgres::Client,
    done: impl Fn(&[(String, Option<String>, bool, Option<String>)]) -> bool,
) -> Vec<(String, Option<String>, bool, Option<String>)> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let rows: Vec<_> = sql
            .query("SELECT action, channel, sanitized, detail FROM pgcast.audit_log ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        if done(&rows) {
            return rows;
        }
        assert!(Instant::now() < deadline, "audit log never complete: {rows:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_hostile_frame_followed_by_a_normal_join_leaves_both_recorded() {
    let (pg, server) =
        start_with("audit-nul", "CREATE TABLE visits (id int PRIMARY KEY)", &["visits"], |_| {}).await;
    let mut client = Client::connect(server.addr, Some(&token("service_role", 600)), true).await;
    // PostgreSQL refuses U+0000 in a text column: this used to stop the audit trail for good.
    let reply = client.join("realtime:ward\u{0}x", json!([]), None).await;
    assert_eq!(reply["status"], "error");
    assert_eq!(client.join("realtime:ward", json!([]), None).await["status"], "ok");
    let sql = pg.client().await;
    let rows = audit_rows(&sql, |rows| rows.iter().any(|r| r.0 == "join")).await;
    let refused = rows.iter().find(|r| r.0 == "join_refused").expect("the hostile join is recorded");
    assert_eq!(refused.1.as_deref(), Some("realtime:ward\u{FFFD}x"), "NUL replaced, the rest kept");
    assert!(rows.iter().any(|r| r.0 == "join" && r.1.as_deref() == Some("realtime:ward")));
}

#[tokio::test]
async fn a_record_postgresql_refuses_is_written_sanitized_and_later_records_go_on() {
    let (pg, server) =
        start_with("audit-refused", "CREATE TABLE visits (id int PRIMARY KEY)", &["visits"], |_| {}).await;
    // Constraints standing in for whatever PostgreSQL may refuse in a record some day.
    pg.exec(
        "ALTER TABLE pgcast.audit_log ADD CONSTRAINT printable CHECK (channel ~ '^[ -~]*$');
         ALTER TABLE pgcast.audit_log ADD CONSTRAINT allowed CHECK (channel NOT LIKE '%forbidden%')",
    )
    .await;
    let mut client = Client::connect(server.addr, Some(&token("service_role", 600)), true).await;
    for topic in ["realtime:café", "realtime:forbidden", "realtime:after"] {
        assert_eq!(client.join(topic, json!([]), None).await["status"], "ok", "{topic}");
    }
    let sql = pg.client().await;
    let rows = audit_rows(&sql, |rows| rows.iter().any(|r| r.1.as_deref() == Some("realtime:after"))).await;
    let joins: Vec<_> = rows.iter().filter(|r| r.0 == "join").collect();
    assert_eq!(joins.len(), 3, "every join is recorded: {joins:#?}");
    assert_eq!(
        (joins[0].1.as_deref(), joins[0].2),
        (Some("realtime:caf\\u{e9}"), true),
        "escaped to ASCII and flagged"
    );
    assert_eq!((joins[1].1.as_deref(), joins[1].2), (None, true), "written bare and flagged");
    assert!(joins[1].3.as_deref().unwrap_or("").contains("SQLSTATE 23514"), "{:?}", joins[1]);
    assert_eq!((joins[2].1.as_deref(), joins[2].2), (Some("realtime:after"), false), "later records go on");
    assert!(metric(server.addr.port(), "pgcast_audit_sanitized_total").await >= 2.0);
}

#[tokio::test]
async fn events_recorded_while_postgresql_is_down_are_written_when_it_is_back() {
    let (mut pg, server) =
        start_with("audit-outage", "CREATE TABLE visits (id int PRIMARY KEY)", &["visits"], |_| {}).await;
    let user = token_with(json!({"role": "service_role", "sub": "during-outage"}), 600);
    let mut client = Client::connect(server.addr, Some(&user), true).await;
    pg.cluster.stop().await.expect("stop PostgreSQL");
    // A join without bindings needs no query: it is decided and audited while the database is gone.
    assert_eq!(client.join("realtime:while-down", json!([]), None).await["status"], "ok");
    // The writer keeps retrying on its own (backoff 0.2, 0.4, 0.8 s...), with no later event to
    // wake it: it used to wait for the next event before it tried again.
    let deadline = Instant::now() + DEADLINE;
    while metric(server.addr.port(), "pgcast_audit_write_failures_total").await < 3.0 {
        assert!(Instant::now() < deadline, "the audit writer stopped retrying while PostgreSQL was down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pg.cluster.start_server().await.expect("restart PostgreSQL");
    let sql = pg.client().await;
    let rows =
        audit_rows(&sql, |rows| rows.iter().any(|r| r.1.as_deref() == Some("realtime:while-down"))).await;
    let join = rows.iter().find(|r| r.1.as_deref() == Some("realtime:while-down")).unwrap();
    assert_eq!((join.0.as_str(), join.2), ("join", false), "written as it was, once PostgreSQL was back");
}
