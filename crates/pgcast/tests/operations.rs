//! Operations: health, readiness, metrics, graceful shutdown, WAL not held back, and the CLI's
//! configuration errors.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SCHEMA: &str = "
CREATE TABLE visits (id int PRIMARY KEY, note text);
CREATE TABLE scratch (id serial PRIMARY KEY, junk text);
";

#[tokio::test]
async fn health_ready_and_metrics_report_the_pipeline() {
    let pg = Pg::start("ops").await;
    pg.publish(SCHEMA, &["visits"]).await;
    let server = start_server(config(&pg)).await;
    let base = format!("http://{}", server.addr);

    let (status, body) = http_get(&format!("{base}/health")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["database"]["ok"], true);
    assert_eq!(health["replication"]["connected"], true);
    assert_eq!(http_get(&format!("{base}/ready")).await.unwrap().0, 200);

    let mut client = Client::connect(server.addr, Some(&token("service_role", 600)), true).await;
    client.join("realtime:v", json!([binding("*", "visits", None)]), None).await;
    pg.exec("INSERT INTO visits VALUES (1, 'x')").await;
    assert_eq!(client.changes(1, DEADLINE).await.len(), 1);

    let (status, metrics) = http_get(&format!("{base}/metrics")).await.unwrap();
    assert_eq!(status, 200);
    for name in [
        "pgcast_connections",
        "pgcast_channels",
        "pgcast_subscriptions",
        "pgcast_changes_captured_total",
        "pgcast_messages_sent_total",
        "pgcast_replication_lag_bytes",
        "pgcast_commit_to_send_seconds_bucket",
    ] {
        assert!(metrics.lines().any(|l| l.starts_with(name)), "missing {name} in\n{metrics}");
    }
}

#[tokio::test]
async fn changes_to_unpublished_tables_do_not_hold_wal_back() {
    let pg = Pg::start("walheld").await;
    pg.publish(SCHEMA, &["visits"]).await;
    let _server = start_server(config(&pg)).await;
    pg.exec("INSERT INTO scratch (junk) SELECT repeat('x', 1000) FROM generate_series(1, 5000)").await;
    let sql = pg.client().await;
    let target: String = sql.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let caught_up: bool = sql
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'pgcast'",
                &[&target],
            )
            .await
            .unwrap()
            .get(0);
        if caught_up {
            break;
        }
        assert!(Instant::now() < deadline, "slot stayed behind {target}: WAL is held back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn graceful_shutdown_closes_clients_with_a_reason_and_confirms_the_slot() {
    let pg = Pg::start("shutdown").await;
    pg.publish(SCHEMA, &["visits"]).await;
    let server = start_server(config(&pg)).await;
    let mut client = Client::connect(server.addr, Some(&token("service_role", 600)), false).await;
    client.join("realtime:v", json!([binding("*", "visits", None)]), None).await;
    pg.exec("INSERT INTO visits VALUES (1, 'x'); INSERT INTO visits VALUES (2, 'y');").await;
    assert_eq!(client.changes(2, DEADLINE).await.len(), 2);
    let sql = pg.client().await;
    let last_commit: String = sql.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);

    let shutdown = tokio::spawn(server.shutdown());
    let close = client.expect("close frame", |v| v["event"] == "__close").await;
    assert_eq!(close["code"], 1001);
    assert_eq!(close["reason"], "server shutting down");
    let confirmed = shutdown.await.unwrap();
    assert!(confirmed > 0);
    let slot_ok: bool = sql
        .query_one(
            "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'pgcast'",
            &[&last_commit],
        )
        .await
        .unwrap()
        .get(0);
    assert!(slot_ok, "the slot is confirmed past the last handled commit after shutdown");
}

fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgcast"));
    cmd.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run pgcast");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn configuration_errors_print_one_line_and_exit_2() {
    let (code, stderr) = run_cli(&["serve"], &[("PGCAST_JWT_SECRET", "0123456789abcdef0123")]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("PGCAST_DATABASE_URL"), "{stderr}");

    let env = [
        ("PGCAST_DATABASE_URL", "postgres://u@127.0.0.1:1/db"),
        ("PGCAST_JWT_SECRET", "0123456789abcdef0123"),
    ];
    let (code, stderr) = run_cli(&["serve", "--listen", "not-an-address"], &env);
    assert_eq!((code, stderr.trim().lines().count()), (2, 1), "{stderr}");
    assert!(stderr.contains("invalid listen"), "{stderr}");

    let (code, stderr) =
        run_cli(&["serve"], &[("PGCAST_DATABASE_URL", "postgres://u@h/db"), ("PGCAST_JWT_SECRET", "short")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("jwt_secret"), "{stderr}");

    let (code, stderr) = run_cli(&["serve", "--config", "/nonexistent/pgcast.toml"], &env);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot read config file"), "{stderr}");
}
