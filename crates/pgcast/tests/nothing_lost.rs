//! Nothing lost: 10,000 changes committed at a steady rate while the server is killed with SIGKILL
//! twice and PostgreSQL is restarted once; every subscriber ends with exactly the sequence it is
//! entitled to, in commit order, with no gap and no duplicate. Subscribers: a raw resuming client
//! (this file) and three clients of the TypeScript SDK (clients/js, run by Node): all rows, and
//! two filtered to one shard each. Both capture modes.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
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
    serve_command(pg_url, port)
        .env("PGCAST_CONFIG", config.join("pgcast.toml"))
        .env("PGCAST_CAPTURE", capture)
        .env("PGCAST_LOG", std::env::var("NOTHING_LOST_LOG").unwrap_or("error".into()))
        .spawn()
        .expect("spawn pgcast")
}

/// Up to ten ids of `expected` missing from `got`, and up to ten `got` has twice.
fn gaps(expected: &[i64], got: &[i64]) -> (Vec<i64>, Vec<i64>) {
    let missing = expected.iter().filter(|i| !got.contains(i)).copied().take(10).collect();
    let mut seen = std::collections::HashSet::new();
    let dupes = got.iter().filter(|i| !seen.insert(**i)).copied().take(10).collect();
    (missing, dupes)
}

/// Ids each SDK follower received, by follower name, fed from the Node process's stdout.
type Followed = Arc<Mutex<HashMap<String, Vec<i64>>>>;

/// SDK followers: name, filter, and the ids (1..=TOTAL) each is entitled to.
fn followers() -> Vec<(&'static str, Option<&'static str>, Vec<i64>)> {
    vec![
        ("all", None, (1..=TOTAL).collect()),
        ("shard0", Some("shard=eq.0"), (1..=TOTAL).filter(|i| i % 3 == 0).collect()),
        ("shard1", Some("shard=eq.1"), (1..=TOTAL).filter(|i| i % 3 == 1).collect()),
    ]
}

/// Starts the SDK followers (clients/js/test/e2e/follow.mjs) and returns once all have joined.
async fn start_sdk_followers(addr: std::net::SocketAddr, followed: Followed) -> Child {
    use tokio::io::AsyncBufReadExt;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = root.join("clients/js/test/e2e/follow.mjs");
    assert!(
        root.join("clients/js/dist/index.js").exists(),
        "the SDK is not built: run `npm ci && npm run build` in clients/js (scripts/test.sh does)"
    );
    let specs: Vec<Value> =
        followers().iter().map(|(name, filter, _)| json!({"name": name, "filter": filter})).collect();
    let mut child = tokio::process::Command::new("node")
        .arg(script)
        .arg(format!("ws://{addr}"))
        .arg(token("service_role", 3600))
        .arg(Value::from(specs).to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node (scripts/test.sh installs Node.js)");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let joined = Arc::new(AtomicI64::new(0));
    let joined_count = joined.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let event: Value =
                serde_json::from_str(&line).unwrap_or_else(|_| panic!("follower said {line:?}"));
            let name = event["c"].as_str().unwrap_or_default().to_string();
            if let Some(id) = event["id"].as_i64() {
                followed.lock().unwrap().entry(name).or_default().push(id);
            } else if event["subscribed"] == true {
                joined_count.fetch_add(1, Ordering::Relaxed);
            } else if event.get("resync").is_some() || event.get("error").is_some() {
                // Recorded as an impossible id so the comparison fails with the reason printed.
                eprintln!("SDK follower {name}: {event}");
                followed.lock().unwrap().entry(name).or_default().push(-1);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while joined.load(Ordering::Relaxed) < followers().len() as i64 {
        assert!(Instant::now() < deadline, "the SDK followers did not all join");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
}

/// A client that keeps reconnecting and resuming until it has `TOTAL` ids.
async fn resuming_client(
    addr: std::net::SocketAddr,
    received: Arc<AtomicI64>,
    joined: Arc<AtomicBool>,
) -> Vec<i64> {
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
                Some("phx_reply") if frame["payload"]["status"] == "ok" => {
                    joined.store(true, Ordering::Relaxed)
                }
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
    pg.exec("CREATE TABLE ticks (id bigint PRIMARY KEY, shard int NOT NULL)").await;
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
    let joined = Arc::new(AtomicBool::new(false));
    let client = tokio::spawn(resuming_client(addr, received.clone(), joined.clone()));
    let followed: Followed = Arc::default();
    let _node = start_sdk_followers(addr, followed.clone()).await;
    // Everyone subscribes before the first commit.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !joined.load(Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "the resuming client never joined");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

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
                "INSERT INTO ticks SELECT g, g % 3 FROM generate_series({next}, {}) g ON CONFLICT DO NOTHING",
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
        let (missing, dupes) = gaps(&expected, &ids);
        panic!("{capture}: {} received, missing {missing:?}, duplicated {dupes:?}", ids.len());
    }

    // The SDK followers: each exactly its own rows, in order.
    let count = |name: &str| followed.lock().unwrap().get(name).map_or(0, Vec::len);
    let deadline = Instant::now() + Duration::from_secs(120);
    for (name, _, expected) in followers() {
        while count(name) < expected.len() {
            assert!(
                Instant::now() < deadline,
                "{capture}: SDK follower {name} has {} of {}",
                count(name),
                expected.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A duplicate would arrive right behind the last row: give it the time a live change takes.
    pg.exec("INSERT INTO ticks VALUES (0, 0)").await;
    for (name, expected) in [("all", TOTAL as usize + 1), ("shard0", (TOTAL / 3) as usize + 1)] {
        while count(name) < expected {
            assert!(Instant::now() < deadline, "{capture}: SDK follower {name} never saw the closing row");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for (name, _, mut expected) in followers() {
        if name != "shard1" {
            expected.push(0);
        }
        let got = followed.lock().unwrap().get(name).cloned().unwrap_or_default();
        if got != expected {
            let (missing, dupes) = gaps(&expected, &got);
            panic!(
                "{capture}: SDK follower {name}: {} received, missing {missing:?}, duplicated {dupes:?}",
                got.len()
            );
        }
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
