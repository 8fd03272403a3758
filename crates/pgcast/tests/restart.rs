//! Nothing committed is lost from the slot: the server is killed with SIGKILL while rows are
//! committed, and PostgreSQL is restarted under a running server.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use pgcast::capture::catalog::TypeCatalog;
use pgcast::capture::decode::{Decoded, Decoder};
use pgcast::capture::{ChangeKind, Value};
use serde_json::json;
use tokio::process::Child;

const SCHEMA: &str = "CREATE TABLE ticks (id bigint PRIMARY KEY, at timestamptz DEFAULT now());";

fn spawn_server(pg: &Pg, port: u16) -> Child {
    // Replication only: the test kills the server to see what the slot kept.
    serve_command(&pg.url(), port)
        .env("PGCAST_CAPTURE", "replication")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn pgcast")
}

/// Ids of rows inserted into `ticks` that are still in the slot, unconsumed. Waits for the
/// slot to be released first (a killed client's walsender notices on its next send).
async fn ids_left_in_slot(pg: &Pg) -> Vec<i64> {
    let client = pg.client().await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let active: bool = client
            .query_one("SELECT active FROM pg_replication_slots WHERE slot_name = 'pgcast'", &[])
            .await
            .expect("slot")
            .get(0);
        if !active {
            break;
        }
        assert!(Instant::now() < deadline, "slot stayed active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = client
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('pgcast', NULL, NULL, \
             'proto_version', '1', 'publication_names', 'pgcast')",
            &[],
        )
        .await
        .expect("peek slot");
    let types = TypeCatalog::builtin();
    let mut decoder = Decoder::new();
    let mut ids = Vec::new();
    for row in rows {
        let data: Vec<u8> = row.get(0);
        if let Decoded::Transaction(tx) = decoder.decode(&data, &types).expect("decode peeked change") {
            for change in tx.changes.iter().filter(|c| c.kind == ChangeKind::Insert) {
                if let Some(Value::Text(id)) = change.new.as_ref().map(|r| &r.values[0]) {
                    ids.push(id.parse().unwrap());
                }
            }
        }
    }
    ids
}

#[tokio::test]
async fn kill_9_during_commits_loses_nothing_from_the_slot() {
    if replication_only("kill_9_during_commits_loses_nothing_from_the_slot") {
        return;
    }
    let pg = Pg::start("kill9").await;
    pg.publish(SCHEMA, &["ticks"]).await;
    let port = free_port();
    let mut server = spawn_server(&pg, port);
    wait_ready(&format!("http://127.0.0.1:{port}")).await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut client = Client::connect(addr, Some(&token("service_role", 600)), true).await;
    assert_eq!(
        client.join("realtime:t", json!([binding("INSERT", "ticks", None)]), None).await["status"],
        "ok"
    );

    const TOTAL: i64 = 400;
    let writer_pg = pg.client().await;
    let writer = tokio::spawn(async move {
        for id in 1..=TOTAL {
            writer_pg.execute("INSERT INTO ticks (id) VALUES ($1)", &[&id]).await.expect("insert");
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });

    // Receive some, then kill the server mid-stream.
    let received: Vec<i64> = client
        .changes(50, DEADLINE)
        .await
        .iter()
        .map(|c| c["data"]["record"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(received, (1..=50).collect::<Vec<_>>(), "delivered in commit order without gaps");
    server.start_kill().expect("SIGKILL");
    server.wait().await.expect("reaped");
    writer.await.expect("writer");

    // Everything not yet delivered is still in the slot: the server confirmed nothing it had
    // not handled. (At-least-once: some delivered ids may also still be there.)
    let left = ids_left_in_slot(&pg).await;
    let last_delivered = *received.last().unwrap();
    for id in last_delivered + 1..=TOTAL {
        assert!(left.contains(&id), "id {id} was committed but is gone from the slot");
    }

    // A new server picks up where the slot stands: it captures every remaining change and then
    // confirms the slot past them.
    let mut server = spawn_server(&pg, port);
    wait_ready(&format!("http://127.0.0.1:{port}")).await;
    let deadline = Instant::now() + DEADLINE;
    while metric(port, "pgcast_changes_captured_total").await < left.len() as f64 {
        assert!(
            Instant::now() < deadline,
            "restarted server did not capture the {} changes left",
            left.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sql = pg.client().await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let row = sql
            .query_one(
                "SELECT confirmed_flush_lsn >= pg_current_wal_insert_lsn() - 1024 FROM pg_replication_slots \
                 WHERE slot_name = 'pgcast'",
                &[],
            )
            .await
            .expect("slot position");
        if row.get::<_, bool>(0) {
            break;
        }
        assert!(Instant::now() < deadline, "slot was never confirmed past the handled changes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut client = Client::connect(addr, Some(&token("service_role", 600)), true).await;
    client.join("realtime:t", json!([binding("INSERT", "ticks", None)]), None).await;
    pg.exec("INSERT INTO ticks (id) VALUES (1000)").await;
    let live = client.changes(1, DEADLINE).await;
    assert_eq!(live[0]["data"]["record"]["id"], 1000);
    server.start_kill().ok();
}

#[tokio::test]
async fn postgres_restart_under_a_running_server_is_survived() {
    let mut pg = Pg::start("pgrestart").await;
    pg.publish(SCHEMA, &["ticks"]).await;
    let server = start_server(config(&pg)).await;
    let base = format!("http://{}", server.addr);
    let mut client = Client::connect(server.addr, Some(&token("service_role", 600)), false).await;
    client.join("realtime:t", json!([binding("*", "ticks", None)]), None).await;
    pg.exec("INSERT INTO ticks (id) VALUES (1)").await;
    assert_eq!(client.changes(1, DEADLINE).await.len(), 1);

    pg.cluster.stop().await.expect("stop PostgreSQL");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (status, body) = http_get(&format!("{base}/health")).await.unwrap();
        if status == 503 && body.contains("\"connected\":false") {
            break;
        }
        assert!(Instant::now() < deadline, "health never reported the capture's outage: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pg.cluster.start_server().await.expect("restart PostgreSQL");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(&format!("{base}/health")).await.map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "server never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The same client connection, never dropped, receives changes again. Row 1 may arrive a
    // second time if PostgreSQL stopped before the slot was confirmed past it (at-least-once
    // until positions and resume exist), but nothing is skipped and order holds.
    pg.exec("INSERT INTO ticks (id) VALUES (2)").await;
    let mut ids = Vec::new();
    while ids.last() != Some(&2) {
        let changes = client.changes(1, DEADLINE).await;
        assert!(!changes.is_empty(), "row 2 never arrived after the restart; got {ids:?}");
        ids.push(changes[0]["data"]["record"]["id"].as_i64().unwrap());
    }
    assert!(ids.iter().all(|&id| id == 1 || id == 2) && ids.windows(2).all(|w| w[0] <= w[1]), "{ids:?}");
    ids.retain(|&id| id == 2);
    assert_eq!(ids, [2]);
    server.shutdown().await;
}
