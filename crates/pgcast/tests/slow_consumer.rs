//! The write path to clients. A client that stops reading is cut off with a reason once its
//! bounded queue fills (even if it never reads again), while clients reading normally on the
//! same table receive everything, with their latency measured against a run without the stalled
//! client. A busy connection's writes are coalesced, without loss or reordering.

mod common;

use common::*;
use serde_json::json;

/// The tests of this file count slow consumers and connections in the process-wide metrics
/// every server of the process shares, so they run one after another.
static METRICS_SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_others_are_not() {
    // The metrics and connection counts read here are the process's: one test at a time, each
    // counting from where the one before left them.
    let _serial = METRICS_SERIAL.lock().await;
    // The default queue: a smaller one can cut a client that reads, when the outbox reader
    // (trigger mode) hands over a thousand rows at once.
    let (pg, server) =
        start_with("slow", "CREATE TABLE feed (id int PRIMARY KEY, body text)", &["feed"], |c| {
            c.outbound_queue = 1024
        })
        .await;
    let slow_before = metric(server.addr.port(), "pgcast_slow_consumers_total").await;
    let service = token("service_role", 600);

    let mut slow = Client::connect_small_buffer(server.addr, &service).await;
    slow.join("realtime:feed", json!([binding("*", "feed", None)]), None).await;
    let mut fast = Client::connect(server.addr, Some(&service), true).await;
    fast.join("realtime:feed", json!([binding("*", "feed", None)]), None).await;

    // ~12 MB of changes in transactions of 50 rows, paced: more than the server's socket send
    // buffer (4 MB at most here) plus 1,024 queued messages of 2 KB, in bursts a reading client
    // absorbs.
    const ROWS: usize = 6000;
    let writer_pg = pg.client().await;
    let writer = tokio::spawn(async move {
        for start in (1..=ROWS).step_by(50) {
            let sql = format!(
                "INSERT INTO feed SELECT g, repeat(md5(g::text), 64) FROM generate_series({start}, {}) g",
                start + 49
            );
            writer_pg.batch_execute(&sql).await.expect("insert batch");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    });
    let fast_reader = tokio::spawn(async move { fast.changes(ROWS, DEADLINE * 2).await.len() });

    // Once it is cut off, the slow client reads: what was already queued, then a close frame
    // with the reason (the server tries to deliver it for a couple of seconds, so the client
    // starts reading as soon as the cut is seen, whatever the reading client is doing).
    let port = server.addr.port();
    let deadline = std::time::Instant::now() + DEADLINE * 2;
    while metric(port, "pgcast_slow_consumers_total").await < slow_before + 1.0 {
        assert!(std::time::Instant::now() < deadline, "the slow client was never cut off");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut got: Vec<i64> = Vec::new();
    let mut from = None;
    let close = loop {
        let frame = slow.next(DEADLINE).await.expect("frames until the close");
        if frame["event"] == "postgres_changes" {
            let data = &frame["payload"]["data"];
            got.push(data["record"]["id"].as_i64().unwrap());
            from = Some(data["pgcast"].clone());
        }
        if frame["event"] == "__close" {
            break frame;
        }
    };
    assert_eq!(close["code"], 4000, "{close}");
    assert!(close["reason"].as_str().unwrap().starts_with("slow consumer"), "{close}");
    assert!(got.len() < ROWS, "it was cut off before the end");
    writer.await.expect("writer");
    assert_eq!(fast_reader.await.expect("reader"), ROWS, "the reading client gets every change");

    // Because of resume it loses nothing: it comes back from its last position.
    let from = from.expect("it received something before the cut");
    let mut back = Client::connect(server.addr, Some(&service), true).await;
    let payload = json!({"config": {
        "postgres_changes": [binding("*", "feed", None)],
        "resume": {"position": from["position"], "epoch": from["epoch"]},
    }});
    let r = back.push("realtime:feed", "phx_join", payload).await;
    assert_eq!(back.reply(&r).await["payload"]["status"], "ok");
    let rest = back.changes(ROWS - got.len(), DEADLINE * 2).await;
    got.extend(rest.iter().map(|c| c["data"]["record"]["id"].as_i64().unwrap()));
    assert_eq!(got, (1..=ROWS as i64).collect::<Vec<_>>(), "every change exactly once across the cut");

    let (_, metrics) = http_get(&format!("http://{}/metrics", server.addr)).await.unwrap();
    assert!(metrics.contains("pgcast_slow_consumers_total 1"), "{metrics}");
}

/// Latencies (µs, commit to receipt) of the changes one reader got with id in `from..to`.
fn latencies(samples: &[(i64, i64)], from: i64, to: i64) -> Vec<i64> {
    samples.iter().filter(|(id, _)| (from..to).contains(id)).map(|(_, micros)| *micros).collect()
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A raw frame's integer field, found without parsing the whole (large) frame.
fn field(text: &str, name: &str) -> Option<i64> {
    let start = text.find(&format!("\"{name}\":"))? + name.len() + 3;
    let digits: String = text[start..].chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Writes rows `after+1..=after+count`, 250 a second, 8 KB each, stamped with the commit-side
/// clock; returns the last id.
async fn write_rows(writer: &tokio_postgres::Client, after: i64, count: i64) -> i64 {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(4));
    for id in after + 1..=after + count {
        tick.tick().await;
        writer
            .execute(
                "INSERT INTO feed VALUES ($1, (extract(epoch FROM clock_timestamp()) * 1000000)::int8, \
                 repeat('x', 8192))",
                &[&(id as i32)],
            )
            .await
            .expect("insert");
    }
    after + count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_cut_off_while_the_others_latency_holds() {
    // The metrics and connection counts read here are the process's: one test at a time.
    let _serial = METRICS_SERIAL.lock().await;
    use futures_util::StreamExt;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio_tungstenite::tungstenite::Message;

    let schema = "CREATE TABLE feed (id int PRIMARY KEY, sent_us int8 NOT NULL, body text)";
    // Room for the few transactions the outbox reader (trigger mode) may hand over at once.
    let (pg, server) = start_with("stalled", schema, &["feed"], |c| c.outbound_queue = 256).await;
    let port = server.addr.port();
    let service = token("service_role", 600);

    // Readers record (id, commit-to-receipt µs) for every change, from the raw frames.
    const READERS: usize = 10;
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut readers = Vec::new();
    let mut counts = Vec::new();
    for _ in 0..READERS {
        let count = Arc::new(std::sync::atomic::AtomicI64::new(0));
        counts.push(count.clone());
        let mut client = Client::connect(server.addr, Some(&service), true).await;
        client.join("realtime:feed", json!([binding("INSERT", "feed", None)]), None).await;
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let frame = tokio::select! {
                    frame = client.ws.next() => frame,
                    _ = stop.notified() => break,
                };
                let Some(Ok(Message::Text(text))) = frame else { break };
                let now = pgcast::clock::now_micros();
                if let (Some(id), Some(sent)) = (field(&text, "id"), field(&text, "sent_us")) {
                    samples.push((id, now - sent));
                    count.store(samples.len() as i64, std::sync::atomic::Ordering::Relaxed);
                }
            }
            samples
        }));
    }

    let writer = pg.client().await;
    let mut next_id = 0i64;
    // Unloaded: every client reads.
    next_id = write_rows(&writer, next_id, 500).await;
    let unloaded_end = next_id + 1;

    // Loaded: a client that stops reading joins; write until the server has cut it off.
    let slow_before = metric(port, "pgcast_slow_consumers_total").await;
    let mut stalled = Client::connect_small_buffer(server.addr, &service).await;
    stalled.join("realtime:feed", json!([binding("INSERT", "feed", None)]), None).await;
    let with_stalled = metric(port, "pgcast_connections").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(port, "pgcast_slow_consumers_total").await < slow_before + 1.0 {
        assert!(Instant::now() < deadline, "the stalled client was never cut off");
        next_id = write_rows(&writer, next_id, 50).await;
    }
    // Cut off means gone: its connection is closed even though it never reads again.
    while metric(port, "pgcast_connections").await > with_stalled - 1.0 {
        assert!(
            Instant::now() < deadline,
            "the stalled connection was never closed: {} connections",
            metric(port, "pgcast_connections").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    next_id = write_rows(&writer, next_id, 100).await;
    let loaded_end = next_id + 1;

    // Every reader got every row, then compare latencies.
    let deadline = Instant::now() + DEADLINE;
    let got = || counts.iter().map(|c| c.load(std::sync::atomic::Ordering::Relaxed)).collect::<Vec<_>>();
    while got().iter().any(|&n| n < loaded_end - 1) {
        assert!(Instant::now() < deadline, "readers did not get all {} rows: {:?}", loaded_end - 1, got());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.notify_waiters();
    let mut unloaded = Vec::new();
    let mut loaded = Vec::new();
    for reader in readers {
        let samples = reader.await.expect("reader");
        assert_eq!(samples.len() as i64, loaded_end - 1, "each reader receives every change");
        unloaded.extend(latencies(&samples, 1, unloaded_end));
        loaded.extend(latencies(&samples, unloaded_end, loaded_end));
    }
    unloaded.sort_unstable();
    loaded.sort_unstable();
    let (p50_u, p99_u) = (percentile(&unloaded, 0.5), percentile(&unloaded, 0.99));
    let (p50_l, p99_l) = (percentile(&loaded, 0.5), percentile(&loaded, 0.99));
    println!(
        "readers' commit-to-client latency, {READERS} readers: unloaded p50 {:.2} ms p99 {:.2} ms ({} samples); \
         with a stalled client until it was cut off p50 {:.2} ms p99 {:.2} ms ({} samples)",
        p50_u as f64 / 1000.0,
        p99_u as f64 / 1000.0,
        unloaded.len(),
        p50_l as f64 / 1000.0,
        p99_l as f64 / 1000.0,
        loaded.len(),
    );
    // Loosely: a shared 2-core machine running debug builds is noisy.
    assert!(p99_l <= 2 * p99_u + 20_000, "p99 {p99_l} µs with a stalled client vs {p99_u} µs without");
}

/// A connection written to moments ago that gets one new message holds the write until the
/// coalescing window has passed (what arrives meanwhile shares it); nothing is lost or
/// reordered by the hold.
#[tokio::test]
async fn a_busy_connection_holds_a_lone_message_for_the_coalescing_window_without_reordering() {
    // The metrics and connection counts read here are the process's: one test at a time.
    let _serial = METRICS_SERIAL.lock().await;
    use std::time::{Duration, Instant};

    const WINDOW: Duration = Duration::from_millis(400);
    let (pg, server) = start_with("coalesce", "CREATE TABLE ticks (id int PRIMARY KEY)", &["ticks"], |c| {
        c.write_coalesce = WINDOW
    })
    .await;
    let service = token("service_role", 600);
    let mut client = Client::connect(server.addr, Some(&service), true).await;
    client.join("realtime:ticks", json!([binding("INSERT", "ticks", None)]), None).await;
    let writer = pg.client().await;
    let ids = |changes: &[serde_json::Value]| -> Vec<i64> {
        changes.iter().map(|c| c["data"]["record"]["id"].as_i64().expect("id")).collect()
    };

    // The first change goes out at once (nothing was written before it) ...
    let started = Instant::now();
    writer.execute("INSERT INTO ticks VALUES (1)", &[]).await.expect("insert 1");
    assert_eq!(ids(&client.changes(1, DEADLINE).await), [1]);
    // ... the next one, committed right after, is the only message queued, so it waits for the
    // window since that write (which came after `started`): it cannot arrive before
    // `started + WINDOW`.
    writer.execute("INSERT INTO ticks VALUES (2)", &[]).await.expect("insert 2");
    assert_eq!(ids(&client.changes(1, DEADLINE).await), [2]);
    let second_at = started.elapsed();
    assert!(
        second_at >= WINDOW,
        "the second write came {second_at:?} after the first change, inside the window"
    );
    // Several committed at once while a write is held: all of them, in commit order.
    for id in 3..=6 {
        writer.execute("INSERT INTO ticks VALUES ($1)", &[&id]).await.expect("insert");
    }
    assert_eq!(ids(&client.changes(4, DEADLINE).await), [3, 4, 5, 6], "every change, in commit order");
}

/// A transaction far larger than `outbound_queue` is one entry in each subscriber's queue: the
/// reading table-wide clients get every row of it, in order, and nobody is cut off.
#[tokio::test]
async fn a_transaction_larger_than_the_queue_reaches_reading_clients_whole() {
    // The metrics and connection counts read here are the process's: one test at a time.
    let _serial = METRICS_SERIAL.lock().await;
    let (pg, server) =
        start_with("bigtx", "CREATE TABLE bulk (id int PRIMARY KEY, body text)", &["bulk"], |c| {
            c.outbound_queue = 16
        })
        .await;
    let slow_before = metric(server.addr.port(), "pgcast_slow_consumers_total").await;
    let service = token("service_role", 600);
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = Client::connect(server.addr, Some(&service), true).await;
        client.join("realtime:bulk", json!([binding("INSERT", "bulk", None)]), None).await;
        clients.push(client);
    }

    const ROWS: i64 = 2000;
    pg.exec(&format!("INSERT INTO bulk SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g")).await;
    pg.exec(&format!("INSERT INTO bulk VALUES ({}, 'after')", ROWS + 1)).await;
    for client in &mut clients {
        let got: Vec<i64> = client
            .changes(ROWS as usize + 1, DEADLINE)
            .await
            .iter()
            .map(|c| c["data"]["record"]["id"].as_i64().expect("id"))
            .collect();
        assert_eq!(got, (1..=ROWS + 1).collect::<Vec<_>>(), "every row, in commit order");
    }
    let slow = metric(server.addr.port(), "pgcast_slow_consumers_total").await;
    assert_eq!(slow, slow_before, "nobody was cut off");
}
