//! Drops at scale: 1,000 clients whose connections are cut at random every few seconds while
//! changes stream; every client ends with every change exactly once, in order. The replay time
//! after reconnecting is printed (Socket.IO, for scale: 84.55% delivered under drops without its
//! recovery feature, replay p99 4.58 s with it).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const CLIENTS: usize = 1000;
const CHANGES: i64 = 600;

/// One client: subscribes, and whenever its connection is cut reconnects and resumes. Returns
/// the ids it received and how long each resume took (reconnect to the `resumed` notice).
async fn client(
    addr: std::net::SocketAddr,
    token: String,
    seed: u64,
    joined: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
) -> (Vec<i64>, Vec<Duration>) {
    let mut first_join = true;
    let mut rng = seed | 1;
    let mut next_random = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut ids = Vec::with_capacity(CHANGES as usize);
    let mut from: Option<Value> = None;
    let mut replays = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_frames: Vec<String> = Vec::new();
    while (ids.len() as i64) < CHANGES {
        assert!(
            Instant::now() < deadline,
            "client stuck at {} of {CHANGES}; from {from:?}; last connection: {last_frames:#?}",
            ids.len()
        );
        last_frames.clear();
        let started = Instant::now();
        let url = format!("ws://{addr}/realtime/v1/websocket?vsn=2.0.0&apikey={token}");
        let Ok((ws, _)) = tokio_tungstenite::connect_async(url).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut client = Client::from_ws(ws, true);
        let mut config = json!({"postgres_changes": [binding("INSERT", "ticks", None)]});
        let resuming = from.is_some();
        if let Some(from) = &from {
            config["resume"] = from.clone();
        }
        client.push("realtime:ticks", "phx_join", json!({"config": config})).await;
        // Stay connected for 1-4 s, then cut the connection abruptly.
        let cut_at = Instant::now() + Duration::from_millis(1000 + next_random() % 3000);
        while Instant::now() < cut_at && (ids.len() as i64) < CHANGES {
            let Some(frame) = client.next(cut_at.saturating_duration_since(Instant::now())).await else {
                break;
            };
            if frame["event"] != "postgres_changes" {
                last_frames.push(frame.to_string());
            }
            match frame["event"].as_str() {
                Some("postgres_changes") => {
                    let data = &frame["payload"]["data"];
                    let id = data["record"]["id"].as_i64().unwrap();
                    if id != ids.len() as i64 + 1 {
                        panic!(
                            "gap or repeat: got {id} after {} (resuming {resuming}, from {from:?}, at {}); frames this connection: {last_frames:#?}",
                            ids.len(),
                            data["pgcast"]
                        );
                    }
                    last_frames.push(format!("change {id} {}", data["pgcast"]["position"]));
                    ids.push(id);
                    from = Some(data["pgcast"].clone());
                }
                // Where the subscription starts: resume from here if nothing arrives first.
                Some("system") if frame["payload"]["extension"] == "postgres_changes" && from.is_none() => {
                    from = Some(frame["payload"]["pgcast"].clone());
                }
                Some("system") if frame["payload"]["extension"] == "pgcast" => {
                    assert_eq!(frame["payload"]["status"], "ok", "{frame}");
                    if resuming {
                        replays.push(started.elapsed());
                    }
                }
                Some("phx_reply") if frame["payload"]["status"] != "ok" => panic!("join refused: {frame}"),
                Some("phx_reply") if first_join => {
                    first_join = false;
                    joined.fetch_add(1, Ordering::Relaxed);
                }
                Some("__close") => break,
                _ => {}
            }
        }
        drop(client);
    }
    done.fetch_add(1, Ordering::Relaxed);
    (ids, replays)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_cut_at_random_receive_everything_exactly_once() {
    let pg = Pg::start("dropsatscale").await;
    pg.publish("CREATE TABLE ticks (id bigint PRIMARY KEY)", &["ticks"]).await;
    let mut config = config(&pg);
    config.max_connections_per_user = CLIENTS * 2;
    let server = start_server(config).await;
    let token = token("service_role", 3600);
    let done = Arc::new(AtomicUsize::new(0));
    let joined = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let seed = 0x9E37_79B9 * (i as u64 + 1);
        clients.push(tokio::spawn(client(server.addr, token.clone(), seed, joined.clone(), done.clone())));
    }
    // A client joining without a position starts from live: wait until all have joined.
    let deadline = Instant::now() + Duration::from_secs(60);
    while joined.load(Ordering::Relaxed) < CLIENTS {
        assert!(Instant::now() < deadline, "only {} clients joined", joined.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let sql = pg.client().await;
    for id in 1..=CHANGES {
        sql.execute("INSERT INTO ticks VALUES ($1)", &[&id]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wait = Instant::now() + Duration::from_secs(90);
    while done.load(Ordering::Relaxed) < CLIENTS {
        if Instant::now() > wait {
            let (_, metrics) = http_get(&format!("http://{}/metrics", server.addr)).await.unwrap();
            let lines: Vec<&str> = metrics.lines().filter(|l| !l.starts_with('#')).collect();
            let history = server.state.history.lock().await.len();
            panic!(
                "{} of {CLIENTS} done; history {history}; metrics:\n{}",
                done.load(Ordering::Relaxed),
                lines.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut replays = Vec::new();
    let mut complete = 0;
    for handle in clients {
        let (ids, times) = handle.await.unwrap();
        assert_eq!(ids, (1..=CHANGES).collect::<Vec<_>>(), "a client lost, doubled or reordered changes");
        complete += 1;
        replays.extend(times);
    }
    replays.sort();
    println!(
        "{complete}/{CLIENTS} clients received {CHANGES}/{CHANGES} changes (100%) in {:.1} s; {} resumes, \
         replay (reconnect to caught up) p50 {:?} p99 {:?} max {:?}",
        started.elapsed().as_secs_f64(),
        replays.len(),
        percentile(&replays, 0.5),
        percentile(&replays, 0.99),
        replays.last().copied().unwrap_or_default()
    );
    assert!(replays.len() > CLIENTS, "clients were cut and resumed many times");
}
