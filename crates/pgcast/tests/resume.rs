//! Positions and resume: a client that rejoins with its last position receives what it missed,
//! in order, exactly once, then continues live; one that fell out of the history, or comes from
//! another epoch, is told to resync.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

async fn setup(
    name: &str,
    tune: impl FnOnce(&mut pgcast::config::Config),
) -> (Pg, pgcast::server::RunningServer) {
    let pg = Pg::start(name).await;
    pg.publish("CREATE TABLE ticks (id int PRIMARY KEY)", &["ticks"]).await;
    let mut config = config(&pg);
    tune(&mut config);
    let server = start_server(config).await;
    (pg, server)
}

/// Joins `*` on ticks, resuming from `from` (position, epoch) if given.
async fn join(client: &mut Client, from: Option<(&str, &str)>) {
    let mut config = json!({"postgres_changes": [binding("*", "ticks", None)]});
    if let Some((position, epoch)) = from {
        config["resume"] = json!({"position": position, "epoch": epoch});
    }
    let r = client.push("realtime:ticks", "phx_join", json!({"config": config})).await;
    assert_eq!(client.reply(&r).await["payload"]["status"], "ok");
}

/// (id, position, epoch) of each change received.
async fn ticks(client: &mut Client, count: usize) -> Vec<(i64, String, String)> {
    let changes = client.changes(count, DEADLINE).await;
    assert_eq!(changes.len(), count, "{changes:#?}");
    changes
        .iter()
        .map(|c| {
            let data = &c["data"];
            (
                data["record"]["id"].as_i64().unwrap(),
                data["pgcast"]["position"].as_str().unwrap().to_string(),
                data["pgcast"]["epoch"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_client_cut_for_five_seconds_resumes_with_no_gap_and_no_duplicate() {
    let (pg, server) = setup("resume5s", |_| {}).await;
    let service = token("service_role", 600);
    let mut client = Client::connect(server.addr, Some(&service), true).await;
    join(&mut client, None).await;
    pg.exec("INSERT INTO ticks VALUES (1); INSERT INTO ticks VALUES (2); INSERT INTO ticks VALUES (3);")
        .await;
    let seen = ticks(&mut client, 3).await;
    let positions: Vec<&String> = seen.iter().map(|t| &t.1).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "positions increase: {positions:?}");
    let (_, last_position, epoch) = seen[2].clone();
    drop(client);

    pg.exec("INSERT INTO ticks VALUES (4); BEGIN; INSERT INTO ticks VALUES (5); INSERT INTO ticks VALUES (6); COMMIT;").await;
    tokio::time::sleep(Duration::from_secs(5)).await; // the scenario: offline for 5 s

    let mut client = Client::connect(server.addr, Some(&service), true).await;
    join(&mut client, Some((&last_position, &epoch))).await;
    let missed: Vec<i64> = ticks(&mut client, 3).await.iter().map(|t| t.0).collect();
    assert_eq!(missed, [4, 5, 6]);
    let resumed = client
        .expect("resumed notice", |v| v["event"] == "system" && v["payload"]["extension"] == "pgcast")
        .await;
    assert_eq!(resumed["payload"]["status"], "ok", "{resumed}");
    pg.exec("INSERT INTO ticks VALUES (7)").await;
    assert_eq!(ticks(&mut client, 1).await[0].0, 7, "then live");
    client.expect_no_change(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn resuming_while_changes_stream_has_no_seam() {
    let (pg, server) = setup("seam", |_| {}).await;
    let service = token("service_role", 600);
    let writer_pg = pg.client().await;
    let writer = tokio::spawn(async move {
        for id in 1..=300 {
            writer_pg.execute("INSERT INTO ticks VALUES ($1)", &[&id]).await.unwrap();
            if id % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let mut received: Vec<i64> = Vec::new();
    let mut from: Option<(String, String)> = None;
    let mut trace = Vec::new();
    // Connect, take a few, drop the connection; again and again while the writer runs.
    while received.last() != Some(&300) {
        let mut client = Client::connect(server.addr, Some(&service), true).await;
        join(&mut client, from.as_ref().map(|(p, e)| (p.as_str(), e.as_str()))).await;
        let batch = client.changes(40, Duration::from_secs(2)).await;
        trace.push(format!("join from {from:?}"));
        for change in &batch {
            let data = &change["data"];
            trace.push(format!("{} {}", data["record"]["id"], data["pgcast"]["position"]));
            received.push(data["record"]["id"].as_i64().unwrap());
            from = Some((
                data["pgcast"]["position"].as_str().unwrap().to_string(),
                data["pgcast"]["epoch"].as_str().unwrap().to_string(),
            ));
        }
    }
    writer.await.unwrap();
    let first = received[0];
    let expected: Vec<i64> = (first..=300).collect();
    assert_eq!(received, expected, "every change exactly once, in order, across reconnects; {trace:#?}");
}

#[tokio::test]
async fn a_position_older_than_the_history_or_another_epoch_gets_resync_required() {
    let (pg, server) = setup("resync", |c| c.retention.max_changes = 5).await;
    let service = token("service_role", 600);
    let mut client = Client::connect(server.addr, Some(&service), true).await;
    join(&mut client, None).await;
    pg.exec("INSERT INTO ticks VALUES (1)").await;
    let (_, position, epoch) = ticks(&mut client, 1).await.remove(0);
    for id in 2..=12 {
        pg.exec(&format!("INSERT INTO ticks VALUES ({id})")).await;
    }
    // Once the server has routed all of them, nothing live is left in flight for the next joins.
    assert_eq!(ticks(&mut client, 11).await.last().map(|t| t.0), Some(12));
    drop(client);
    for (from, why) in [
        ((position.as_str(), epoch.as_str()), "older than the history"),
        ((position.as_str(), "other-epoch"), "is not the current epoch"),
    ] {
        let mut client = Client::connect(server.addr, Some(&service), true).await;
        join(&mut client, Some(from)).await;
        let system: Value = client
            .expect("resync_required", |v| v["event"] == "system" && v["payload"]["extension"] == "pgcast")
            .await;
        assert_eq!(system["payload"]["status"], "resync_required", "{system}");
        assert!(system["payload"]["message"].as_str().unwrap().contains(why), "{system}");
        assert_eq!(system["payload"]["epoch"], epoch.as_str());
        // Still subscribed live after the resync notice.
        client.expect_no_change(Duration::from_millis(200)).await;
    }

    let mut client = Client::connect(server.addr, Some(&service), true).await;
    let r = client
        .push(
            "realtime:ticks",
            "phx_join",
            json!({"config": {"resume": {"position": "nope", "epoch": epoch}}}),
        )
        .await;
    let reply = client.reply(&r).await;
    assert!(reply["payload"]["response"]["reason"].as_str().unwrap().contains("invalid position"), "{reply}");
}

fn spawn_server(pg: &Pg, port: u16, config_file: Option<&std::path::Path>) -> tokio::process::Child {
    let mut cmd = serve_command(&pg.url(), port);
    if let Some(path) = config_file {
        cmd.env("PGCAST_CONFIG", path);
    }
    cmd.spawn().expect("spawn pgcast")
}

#[tokio::test]
async fn history_survives_a_killed_server_and_what_was_committed_meanwhile_is_replayed() {
    let pg = Pg::start("durable").await;
    pg.publish("CREATE TABLE ticks (id int PRIMARY KEY)", &["ticks"]).await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let service = token("service_role", 600);

    let mut server = spawn_server(&pg, port, None);
    wait_ready(&base).await;
    let mut client = Client::connect(addr, Some(&service), true).await;
    join(&mut client, None).await;
    pg.exec("INSERT INTO ticks VALUES (1); INSERT INTO ticks VALUES (2); INSERT INTO ticks VALUES (3);")
        .await;
    let (_, position, epoch) = ticks(&mut client, 3).await.remove(2);
    drop(client);
    pg.exec("INSERT INTO ticks VALUES (4)").await; // missed while the client was away
    server.start_kill().unwrap();
    server.wait().await.unwrap();
    pg.exec("INSERT INTO ticks VALUES (5); INSERT INTO ticks VALUES (6);").await; // while the server is down

    let mut server = spawn_server(&pg, port, None);
    wait_ready(&base).await;
    let mut client = Client::connect(addr, Some(&service), true).await;
    join(&mut client, Some((&position, &epoch))).await;
    let replayed = ticks(&mut client, 3).await;
    let ids: Vec<i64> = replayed.iter().map(|t| t.0).collect();
    assert_eq!(ids, [4, 5, 6], "exactly what was missed, across the restart");
    assert!(replayed.iter().all(|t| t.2 == epoch), "the epoch is stable across restarts");
    let notice =
        client.expect("resumed", |v| v["event"] == "system" && v["payload"]["extension"] == "pgcast").await;
    assert_eq!(notice["payload"]["status"], "ok", "{notice}");
    pg.exec("INSERT INTO ticks VALUES (7)").await;
    assert_eq!(ticks(&mut client, 1).await[0].0, 7);
    server.start_kill().ok();
}

/// The history slot's confirmed position, and whether it has reached `target`.
async fn history_slot_at(sql: &tokio_postgres::Client, target: &str) -> bool {
    sql.query_one(
        "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'pgcast_history'",
        &[&target],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn wal_kept_for_history_stays_within_retention_with_no_client_connected() {
    if replication_only("wal_kept_for_history_stays_within_retention_with_no_client_connected") {
        return;
    }
    let (pg, server) = setup("walbound", |c| {
        c.retention.max_changes = 5;
        c.retention.max_age = Duration::from_secs(2);
    })
    .await;
    let sql = pg.client().await;
    let mut commits = Vec::new();
    for id in 1..=20 {
        sql.execute("INSERT INTO ticks VALUES ($1)", &[&id]).await.unwrap();
        let lsn: String = sql.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
        commits.push(lsn);
    }
    // By count: only the last 5 changes are retained, so the slot moves past the first 15.
    let deadline = std::time::Instant::now() + DEADLINE;
    while !history_slot_at(&sql, &commits[14]).await {
        assert!(std::time::Instant::now() < deadline, "history slot held more than 5 changes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!history_slot_at(&sql, &commits[19]).await, "the last 5 are still held for resuming clients");
    // By age: after 2 s nothing is retained, and the slot releases everything.
    let deadline = std::time::Instant::now() + DEADLINE;
    while !history_slot_at(&sql, &commits[19]).await {
        assert!(std::time::Instant::now() < deadline, "history slot held changes past their age");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let retained: i64 = sql
        .query_one(
            "SELECT (pg_current_wal_lsn() - min(restart_lsn))::bigint FROM pg_replication_slots \
             WHERE slot_name LIKE 'pgcast%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    println!("WAL retained behind pgcast's slots after the retention window: {retained} bytes");
    drop(server);
}
