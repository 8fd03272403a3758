//! A client that stops reading is cut off with a reason once its bounded queue fills, while a
//! client reading normally on the same table receives everything.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_others_are_not() {
    let pg = Pg::start("slow").await;
    pg.publish("CREATE TABLE feed (id int PRIMARY KEY, body text)", &["feed"]).await;
    let mut config = config(&pg);
    config.outbound_queue = 64;
    let server = start_server(config).await;
    let service = token("service_role", 600);

    let mut slow = Client::connect_small_buffer(server.addr, &service).await;
    slow.join("realtime:feed", json!([binding("*", "feed", None)]), None).await;
    let mut fast = Client::connect(server.addr, Some(&service), true).await;
    fast.join("realtime:feed", json!([binding("*", "feed", None)]), None).await;

    // ~6 MB of changes in transactions of 50 rows, paced: more than the server's socket send
    // buffer (4 MB at most here) plus a 64-message queue, in bursts a reading client absorbs.
    const ROWS: usize = 3000;
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
    let received = fast.changes(ROWS, DEADLINE * 2).await;
    writer.await.expect("writer");
    assert_eq!(received.len(), ROWS, "the reading client gets every change");

    // Now the slow client reads: what was already queued, then a close frame with the reason.
    let close = slow.expect("close frame", |v| v["event"] == "__close").await;
    assert_eq!(close["code"], 4000, "{close}");
    assert!(close["reason"].as_str().unwrap().starts_with("slow consumer"), "{close}");

    let (_, metrics) = http_get(&format!("http://{}/metrics", server.addr)).await.unwrap();
    assert!(metrics.contains("pgcast_slow_consumers_total 1"), "{metrics}");
}
