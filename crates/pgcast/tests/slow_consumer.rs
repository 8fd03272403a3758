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
