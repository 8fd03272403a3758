//! Nothing lost: 10,000 changes committed at a steady rate while the server is killed with SIGKILL
//! twice and PostgreSQL is restarted once; a resuming client ends with exactly the committed
//! sequence, in order, with no gap and no duplicate. Both capture modes.

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::process::Child;

const TOTAL: i64 = 10_000;
const PER_TRANSACTION: i64 = 10;

fn spawn(pg_url: &str, port: u16, capture: &str) -> Child {
    // History must cover the outages: the writer is faster than a reconnecting client.
    let config = test_dir(&format!("nothinglost-config-{capture}-{port}"));
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("pgcast.toml"), "history_max_changes = 50000\n").unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_pgcast"))
        .arg("serve")
        .env("PGCAST_CONFIG", config.join("pgcast.toml"))
        .env("PGCAST_DATABASE_URL", pg_url)
        .env("PGCAST_LISTEN", format!("127.0.0.1:{port}"))
        .env("PGCAST_JWT_SECRET", SECRET)
        .env("PGCAST_CAPTURE", capture)
        .env("PGCAST_LOG", std::env::var("NOTHING_LOST_LOG").unwrap_or("error".into()))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn pgcast")
}

/// A client that keeps reconnecting and resuming until it has `TOTAL` ids.
async fn resuming_client(addr: std::net::SocketAddr, received: Arc<AtomicI64>) -> Vec<i64> {
    let service = token("service_role", 3600);
    let mut ids = Vec::new();
    let mut from: Option<Value> = None;
    let deadline = Instant::now() + Duration::from_secs(240);
    while (ids.len() as i64) < TOTAL {
        assert!(Instant::now() < deadline, "only {} of {TOTAL} after 240 s", ids.len());
        let url = format!("ws://{addr}/realtime/v1/websocket?vsn=2.0.0&apikey={service}");
        let Ok(Ok((ws, _))) =
            tokio::time::timeout(Duration::from_secs(2), tokio_tungstenite::connect_async(url)).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut client = Client::from_ws(ws, true);
        let mut config = json!({"postgres_changes": [binding("INSERT", "ticks", None)]});
        if let Some(from) = &from {
            config["resume"] = from.clone();
        }
        client.push("realtime:ticks", "phx_join", json!({"config": config})).await;
        while let Some(frame) = client.next(Duration::from_secs(5)).await {
            match frame["event"].as_str() {
                Some("postgres_changes") => {
                    let data = &frame["payload"]["data"];
                    ids.push(data["record"]["id"].as_i64().unwrap());
                    received.store(ids.len() as i64, Ordering::Relaxed);
                    from = Some(data["pgcast"].clone());
                }
                Some("system") if frame["payload"]["status"] == "resync_required" => {
                    panic!("resync required: {frame}");
                }
                Some("__close") => break,
                _ => {}
            }
            if ids.len() as i64 == TOTAL {
                break;
            }
        }
    }
    ids
}

async fn run(capture: &str) {
    let mut pg = Pg::start(&format!("nothinglost-{capture}")).await;
    pg.exec("CREATE TABLE ticks (id bigint PRIMARY KEY)").await;
    let db = pgcast::db::Db::new(&pg.url());
    if capture == "trigger" {
        pgcast::capture::outbox::add_table(&db, "public", "ticks").await.unwrap();
    } else {
        pgcast::capture::publication::ensure_publication(&db, "pgcast").await.unwrap();
        pgcast::capture::publication::add_table(&db, "pgcast", "ticks").await.unwrap();
    }
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut server = spawn(&pg.url(), port, capture);
    wait_ready(&format!("http://{addr}")).await;

    let received = Arc::new(AtomicI64::new(0));
    let client = tokio::spawn(resuming_client(addr, received.clone()));
    // Let the client subscribe before the first commit.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let committed = Arc::new(AtomicI64::new(0));
    let url = pg.url();
    let writer_committed = committed.clone();
    let writer = tokio::spawn(async move {
        let mut next = 1;
        let mut client: Option<tokio_postgres::Client> = None;
        while next <= TOTAL {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((c, connection)) => {
                        tokio::spawn(connection);
                        Some(c)
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
            }
            let Some(c) = client.as_ref() else { continue };
            // Idempotent: a transaction retried after a lost acknowledgement changes nothing.
            let sql = format!(
                "INSERT INTO ticks SELECT g FROM generate_series({next}, {}) g ON CONFLICT DO NOTHING",
                next + PER_TRANSACTION - 1
            );
            if c.batch_execute(&sql).await.is_ok() {
                next += PER_TRANSACTION;
                writer_committed.store(next - 1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    let wait_committed = |n: i64| {
        let committed = committed.clone();
        let received = received.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while committed.load(Ordering::Relaxed) < n {
                assert!(
                    Instant::now() < deadline,
                    "writer stuck at {} (client has {})",
                    committed.load(Ordering::Relaxed),
                    received.load(Ordering::Relaxed)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // Kill the server twice and restart PostgreSQL once, while rows keep coming.
    for at in [2_000, 4_500] {
        wait_committed(at).await;
        server.start_kill().unwrap();
        server.wait().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        server = spawn(&pg.url(), port, capture);
        wait_ready(&format!("http://{addr}")).await;
    }
    wait_committed(7_000).await;
    tokio::time::timeout(Duration::from_secs(60), pg.cluster.stop())
        .await
        .expect("PostgreSQL did not stop within 60 s")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.cluster.start_server().await.unwrap();

    tokio::time::timeout(Duration::from_secs(120), writer)
        .await
        .unwrap_or_else(|_| panic!("writer stuck at {}", committed.load(Ordering::Relaxed)))
        .unwrap();
    let ids = tokio::time::timeout(Duration::from_secs(240), client)
        .await
        .unwrap_or_else(|_| panic!("client stuck at {} of {TOTAL}", received.load(Ordering::Relaxed)))
        .unwrap();
    let expected: Vec<i64> = (1..=TOTAL).collect();
    if ids != expected {
        let missing: Vec<i64> = expected.iter().filter(|i| !ids.contains(i)).copied().take(10).collect();
        let mut seen = std::collections::HashSet::new();
        let dupes: Vec<i64> = ids.iter().filter(|i| !seen.insert(**i)).copied().take(10).collect();
        panic!("{capture}: {} received, missing {missing:?}, duplicated {dupes:?}", ids.len());
    }
    server.start_kill().ok();
}

#[tokio::test]
async fn replication_mode_loses_nothing_across_kills_and_a_postgres_restart() {
    run("replication").await;
}

#[tokio::test]
async fn trigger_mode_loses_nothing_across_kills_and_a_postgres_restart() {
    run("trigger").await;
}
