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
    assert_eq!(health["capture"]["connected"], true);
    assert_eq!(
        health["capture"]["mode"],
        if capture_mode() == CaptureMode::Trigger { "trigger" } else { "replication" }
    );
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
    if replication_only("changes_to_unpublished_tables_do_not_hold_wal_back") {
        return;
    }
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
async fn graceful_shutdown_closes_clients_with_a_reason_and_saves_its_progress() {
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
    if capture_mode() == CaptureMode::Trigger {
        let cursor_ok: bool = sql
            .query_one("SELECT xid >= (SELECT max(xid) FROM pgcast.outbox) FROM pgcast.outbox_cursor", &[])
            .await
            .unwrap()
            .get(0);
        assert!(cursor_ok, "the outbox cursor is saved past the last handled transaction after shutdown");
        return;
    }
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

#[tokio::test]
async fn tables_command_adds_lists_and_removes() {
    let pg = Pg::start("tablescli").await;
    pg.exec(SCHEMA).await;
    let url = pg.url();
    let env = [("PGCAST_DATABASE_URL", url.as_str())];
    let run = |args: &'static [&'static str]| {
        let env = env.map(|(k, v)| (k.to_string(), v.to_string()));
        tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgcast"));
            cmd.args(args).envs(env);
            let out = cmd.output().expect("run pgcast");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        })
    };
    let (code, out, _) = run(&["tables", "add", "visits"]).await.unwrap();
    assert_eq!(code, Some(0));
    assert!(out.contains("public.visits is in publication pgcast"), "{out}");
    let (_, out, _) = run(&["tables", "list"]).await.unwrap();
    assert_eq!(out.trim(), "public.visits\treplica identity default");
    let (code, _, err) = run(&["tables", "add", "missing_table"]).await.unwrap();
    assert_eq!(code, Some(1));
    assert!(err.contains("table public.missing_table does not exist"), "{err}");
    let (code, _, _) = run(&["tables", "remove", "visits"]).await.unwrap();
    assert_eq!(code, Some(0));
    let (_, out, _) = run(&["tables", "list"]).await.unwrap();
    assert_eq!(out.trim(), "");
}

/// `pgcast serve` as a child process logging at debug level to a pipe; its port once ready.
async fn serve_with_debug_logs(pg: &Pg) -> (tokio::process::Child, u16) {
    let port = free_port();
    let server = serve_command(&pg.url(), port)
        .env("PGCAST_LOG", "debug")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_ready(&format!("http://127.0.0.1:{port}")).await;
    (server, port)
}

/// Stops the server with SIGTERM and returns everything it logged; it must exit cleanly.
async fn stop_and_read_logs(mut server: tokio::process::Child) -> String {
    use tokio::io::AsyncReadExt;
    unsafe { libc::kill(server.id().unwrap() as i32, libc::SIGTERM) };
    let mut stderr = String::new();
    server.stderr.take().unwrap().read_to_string(&mut stderr).await.unwrap();
    assert!(server.wait().await.unwrap().success(), "clean exit on SIGTERM");
    stderr
}

#[tokio::test]
async fn logs_are_json_lines_without_row_contents_or_tokens() {
    let pg = Pg::start("logs").await;
    pg.publish(SCHEMA, &["visits"]).await;
    let (server, port) = serve_with_debug_logs(&pg).await;
    let service = token("service_role", 600);
    let mut client =
        Client::connect(format!("127.0.0.1:{port}").parse().unwrap(), Some(&service), true).await;
    client.join("realtime:v", json!([binding("*", "visits", None)]), None).await;
    client.join("realtime:bad", json!([]), Some("not-a-token")).await;
    pg.exec("INSERT INTO visits VALUES (1, 'PHI-diagnosis-do-not-log')").await;
    assert_eq!(client.changes(1, DEADLINE).await.len(), 1);
    let stderr = stop_and_read_logs(server).await;
    assert!(stderr.lines().count() > 3, "{stderr}");
    for line in stderr.lines() {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    assert!(!stderr.contains("PHI-diagnosis"), "row contents leaked into logs");
    assert!(!stderr.contains(&service) && !stderr.contains("not-a-token"), "a token leaked into logs");
    assert!(!stderr.contains(SECRET), "the JWT secret leaked into logs");
    assert!(stderr.contains("\"topic\":\"realtime:v\""), "joins are logged with ids");
}

#[tokio::test]
async fn client_supplied_text_is_logged_and_audited_as_a_bounded_prefix() {
    let pg = Pg::start("hostile-logs").await;
    pg.publish(SCHEMA, &["visits"]).await;
    let (server, port) = serve_with_debug_logs(&pg).await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();

    // Tokenless joins of 200 KB topics, and topics with control characters (NUL among them).
    let huge_topic = format!("realtime:{}", "x".repeat(200_000));
    let mut anonymous = Client::connect(addr, None, true).await;
    for _ in 0..5 {
        let reply = anonymous.join(&huge_topic, json!([]), None).await;
        assert_eq!(reply["response"]["reason"], "invalid topic: longer than 255 bytes (200009 bytes)");
    }
    let reply = anonymous.join("realtime:a\u{0}b", json!([]), None).await;
    assert!(reply["response"]["reason"].as_str().unwrap().contains("control characters"), "{reply}");
    let reply = anonymous.join("realtime:", json!([]), None).await;
    assert_eq!(reply["response"]["reason"], "invalid topic: you must provide a topic name");

    // Filters and names carrying patient ids, and a 200 KB event name on a joined channel.
    let mut client = Client::connect(addr, Some(&token("service_role", 600)), true).await;
    for filter in
        ["nope=eq.PATIENT-4711", "id=eq.PATIENT-4711", "id=in.(1,PATIENT-4711)", "id=zz.PATIENT-4711"]
    {
        let reply = client.join("realtime:v", json!([binding("*", "visits", Some(filter))]), None).await;
        let reason = reply["response"]["reason"].as_str().unwrap();
        assert!(!reason.contains("PATIENT-4711"), "{filter}: {reason}");
    }
    let reply = client.join("realtime:v", json!([binding("*", &"t".repeat(100_000), None)]), None).await;
    assert!(reply["response"]["reason"].as_str().unwrap().len() < 300, "a long table name is clipped");
    assert_eq!(client.join("realtime:v", json!([binding("*", "visits", None)]), None).await["status"], "ok");
    let r = client.push("realtime:v", &"e".repeat(200_000), json!({})).await;
    assert!(client.reply(&r).await["payload"]["response"]["reason"].as_str().unwrap().len() < 300);

    let sql = pg.client().await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let refused: i64 = sql
            .query_one(
                "SELECT count(*) FROM pgcast.audit_log WHERE action IN ('join_refused', 'auth_failure')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if refused >= 6 {
            break;
        }
        assert!(Instant::now() < deadline, "refusals not audited: {refused}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let row = sql
        .query_one(
            "SELECT max(length(channel)), max(length(detail)), bool_or(detail LIKE '%PATIENT-4711%')
             FROM pgcast.audit_log",
            &[],
        )
        .await
        .unwrap();
    let (channel, detail, leaked): (Option<i32>, Option<i32>, Option<bool>) =
        (row.get(0), row.get(1), row.get(2));
    assert!(
        channel.unwrap_or(0) <= 330 && detail.unwrap_or(0) <= 1030,
        "audit fields {channel:?}, {detail:?}"
    );
    assert_ne!(leaked, Some(true), "a filter value reached the audit log");

    let stderr = stop_and_read_logs(server).await;
    let longest = stderr.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2000, "a log line of {longest} bytes");
    assert!(stderr.len() < 100_000, "{} bytes of log for a few dozen frames", stderr.len());
    assert!(!stderr.contains("PATIENT-4711"), "a filter value reached the log");
}

#[tokio::test]
async fn the_example_policy_compiles_against_the_example_schema() {
    let pg = Pg::start("examples").await;
    pg.publish(pgcast::demo::DEMO_SCHEMA, &pgcast::demo::DEMO_TABLES).await;
    let dir = test_dir("examples-policy");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("policy.toml"), pgcast::demo::DEMO_POLICY).unwrap();
    let mut config = config(&pg);
    config.policy = Some(dir.join("policy.toml"));
    let server = start_server(config).await;
    let patient = token_with(json!({"role": "patient", "sub": "7", "tenant_id": 1}), 600);
    let mut client = Client::connect(server.addr, None, true).await;
    let payload = json!({"config": {"private": true, "postgres_changes": [binding("*", "queue_entries", None)]}, "access_token": patient});
    let r = client.push("realtime:patient:7", "phx_join", payload).await;
    assert_eq!(client.reply(&r).await["payload"]["status"], "ok");
    pg.exec("INSERT INTO appointments (id, tenant_id, patient_id, provider_id, starts_at) VALUES (1, 1, 7, 3, now());
             INSERT INTO queue_entries (tenant_id, appointment_id, patient_id, position) VALUES (1, 1, 7, 2)")
        .await;
    let got = client.changes(1, DEADLINE).await;
    assert_eq!(got[0]["data"]["record"], json!({"id": 1, "position": 2, "state": "waiting"}));
}
