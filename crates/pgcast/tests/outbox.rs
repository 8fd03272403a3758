//! Trigger/outbox capture mode: the same event shape, positions and guarantees as replication,
//! for databases without logical replication.

mod common;

use std::time::Duration;

use common::*;
use pgcast::config::CaptureMode;
use serde_json::{json, Value};

const SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('calm', 'anxious');
CREATE TABLE everything (
    id bigserial PRIMARY KEY, small int2, big int8, exact numeric, approx float8, flag bool, label text,
    ident uuid, at timestamptz, local_at timestamp, day date, doc json, docb jsonb, ints int4[],
    texts text[], feeling mood
);
CREATE TABLE ticks (id int PRIMARY KEY, note text);
";

async fn setup(name: &str) -> (Pg, pgcast::server::RunningServer) {
    let pg = Pg::start(name).await;
    pg.exec(SCHEMA).await;
    capture(&pg).await;
    let server = start_server(trigger_config(&pg)).await;
    (pg, server)
}

async fn capture(pg: &Pg) {
    let db = pgcast::db::Db::new(&pg.url());
    for table in ["everything", "ticks"] {
        pgcast::capture::outbox::add_table(&db, "public", table).await.expect("install trigger");
    }
}

fn trigger_config(pg: &Pg) -> pgcast::config::Config {
    let mut config = config(pg);
    config.capture = CaptureMode::Trigger;
    config
}

/// The record ids of received changes, in order.
fn ids(changes: &[Value]) -> Vec<i64> {
    changes.iter().map(|c| c["data"]["record"]["id"].as_i64().unwrap()).collect()
}

async fn subscribe(server_addr: std::net::SocketAddr, table: &str, resume: Option<&Value>) -> Client {
    let mut client = Client::connect(server_addr, Some(&token("service_role", 600)), true).await;
    let mut config = json!({"postgres_changes": [binding("*", table, None)]});
    if let Some(resume) = resume {
        config["resume"] = resume.clone();
    }
    let r = client.push("realtime:t", "phx_join", json!({"config": config})).await;
    let reply = client.reply(&r).await;
    assert_eq!(reply["payload"]["status"], "ok", "{reply}");
    client
}

#[tokio::test]
async fn trigger_mode_renders_every_type_like_to_jsonb_with_whole_old_rows() {
    let (pg, server) = setup("outboxtypes").await;
    let mut client = subscribe(server.addr, "everything", None).await;
    // The writing session's settings must not change what clients receive.
    pg.exec(
        "SET datestyle = 'SQL, DMY'; SET timezone = 'Asia/Kolkata';
         INSERT INTO everything (small, big, exact, approx, flag, label, ident, at, local_at, day, doc, docb,
                                 ints, texts, feeling)
         VALUES (-3, 9007199254740993, 12.50, 1.5e-7, true, E'quote \" and \\\\', 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11',
                 '2024-05-01 09:30:00.123456+02', '2024-05-01 09:30:00', '2024-05-01', '{\"b\": 1}', '{\"b\": 1}',
                 '{1,NULL,3}', '{\"a b\",NULL}', 'calm')",
    )
    .await;
    let changes = client.changes(1, DEADLINE).await;
    let data = &changes[0]["data"];
    let expected: Value = {
        let row =
            pg.client().await.query_one("SELECT to_jsonb(e)::text FROM everything e", &[]).await.unwrap();
        serde_json::from_str(&row.get::<_, String>(0)).unwrap()
    };
    assert_eq!(data["record"], expected);
    assert_eq!(data["type"], "INSERT");
    assert!(data["pgcast"]["position"].is_string());

    pg.exec("UPDATE everything SET label = 'changed'").await;
    pg.exec("DELETE FROM everything").await;
    let changes = client.changes(2, DEADLINE).await;
    assert_eq!(changes[0]["data"]["old_record"]["label"], expected["label"], "old rows are whole");
    assert_eq!(changes[1]["data"]["type"], "DELETE");
    assert_eq!(changes[1]["data"]["old_record"]["ident"], expected["ident"]);
}

#[tokio::test]
async fn rows_wider_than_notify_allows_and_late_committing_transactions_are_not_lost() {
    let (pg, server) = setup("outboxorder").await;
    let mut client = subscribe(server.addr, "ticks", None).await;
    let wide = "x".repeat(20_000);
    pg.exec(&format!("INSERT INTO ticks VALUES (1, '{wide}')")).await;
    let got = client.changes(1, DEADLINE).await;
    assert_eq!(got[0]["data"]["record"]["note"].as_str().map(str::len), Some(20_000));

    // A transaction that started first but commits last gets a lower outbox id than rows read
    // before it commits; it must still be delivered.
    let early = pg.client().await;
    early.batch_execute("BEGIN; INSERT INTO ticks VALUES (2, 'early')").await.unwrap();
    pg.exec("INSERT INTO ticks VALUES (3, 'late')").await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // a poll or two while 2 is open
    early.batch_execute("COMMIT").await.unwrap();
    let ids = ids(&client.changes(2, DEADLINE).await);
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, [2, 3], "both delivered, none skipped: {ids:?}");
}

#[tokio::test]
async fn transactions_are_read_in_numeric_xid_order_across_a_digit_boundary() {
    // Regression: the reader once sorted transaction ids as text, so when one batch held 999 and
    // 1001, 1001 came first and 999 was then dropped as already seen.
    let (pg, server) = setup("outboxxidorder").await;
    let mut client = subscribe(server.addr, "ticks", None).await;
    let sql = pg.client().await;
    let xid = |row: tokio_postgres::Row| row.get::<_, String>(0).parse::<u64>().unwrap();
    let mut current = xid(sql.query_one("SELECT pg_current_xact_id()::text", &[]).await.unwrap());
    let boundary = 10u64.pow(current.to_string().len() as u32);
    while current < boundary - 20 {
        current = xid(sql.query_one("SELECT pg_current_xact_id()::text", &[]).await.unwrap());
    }
    // An open transaction below the boundary holds the reader's fence while others commit past it.
    let mut early = pg.client().await;
    let early_tx = early.transaction().await.unwrap();
    let early_xid = xid(early_tx
        .query_one("INSERT INTO ticks VALUES (0, 'early') RETURNING pg_current_xact_id()::text", &[])
        .await
        .unwrap());
    assert!(early_xid < boundary, "{early_xid} < {boundary}");
    let mut id = 0;
    while current <= boundary {
        id += 1;
        current = xid(sql
            .query_one("INSERT INTO ticks VALUES ($1, 'late') RETURNING pg_current_xact_id()::text", &[&id])
            .await
            .unwrap());
    }
    early_tx.commit().await.unwrap();
    let ids = ids(&client.changes(id as usize + 1, DEADLINE).await);
    assert_eq!(
        ids,
        (0..=id as i64).collect::<Vec<_>>(),
        "xid order: {early_xid} first, then up to {current}"
    );
}

#[tokio::test]
async fn polling_takes_over_when_the_listen_connection_drops() {
    let (pg, server) = setup("outboxlisten").await;
    let mut client = subscribe(server.addr, "ticks", None).await;
    pg.exec(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pgcast-listen'",
    )
    .await;
    for id in 1..=3 {
        pg.exec(&format!("INSERT INTO ticks VALUES ({id}, 'n')")).await;
    }
    assert_eq!(client.changes(3, DEADLINE).await.len(), 3);
}

#[tokio::test]
async fn trigger_mode_resumes_across_a_killed_server_with_changes_made_while_it_was_down() {
    let pg = Pg::start("outboxrestart").await;
    pg.exec(SCHEMA).await;
    capture(&pg).await;
    let port = free_port();
    let spawn = || serve_command(&pg.url(), port).env("PGCAST_CAPTURE", "trigger").spawn().expect("spawn");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut server = spawn();
    wait_ready(&format!("http://{addr}")).await;
    let mut client = subscribe(addr, "ticks", None).await;
    pg.exec("INSERT INTO ticks VALUES (1, 'a'); INSERT INTO ticks VALUES (2, 'b');").await;
    let seen = client.changes(2, DEADLINE).await;
    let last = seen[1]["data"]["pgcast"].clone();
    drop(client);
    server.start_kill().unwrap();
    server.wait().await.unwrap();
    pg.exec("INSERT INTO ticks VALUES (3, 'c'); INSERT INTO ticks VALUES (4, 'd');").await;

    let mut server = spawn();
    wait_ready(&format!("http://{addr}")).await;
    let mut client = subscribe(addr, "ticks", Some(&last)).await;
    let ids = ids(&client.changes(2, DEADLINE).await);
    assert_eq!(ids, [3, 4], "what was committed while the server was down, exactly once");
    client.expect_no_change(Duration::from_millis(500)).await;
    server.start_kill().ok();
}

#[tokio::test]
async fn the_outbox_is_pruned_past_retention_and_the_cli_installs_triggers() {
    let pg = Pg::start("outboxprune").await;
    pg.exec(SCHEMA).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgcast"))
        .args(["tables", "add", "ticks", "--mode", "trigger"])
        .env("PGCAST_DATABASE_URL", pg.url())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list = std::process::Command::new(env!("CARGO_BIN_EXE_pgcast"))
        .args(["tables", "list"])
        .env("PGCAST_DATABASE_URL", pg.url())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "public.ticks\ttrigger");

    let mut config = trigger_config(&pg);
    config.retention.max_changes = 3;
    let _server = start_server(config).await;
    for id in 1..=10 {
        pg.exec(&format!("INSERT INTO ticks VALUES ({id}, 'n')")).await;
    }
    let sql = pg.client().await;
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let count: i64 = sql.query_one("SELECT count(*) FROM pgcast.outbox", &[]).await.unwrap().get(0);
        if count <= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "outbox still holds {count} rows past a retention of 3"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
