//! The Supabase Realtime (Phoenix) protocol with a raw WebSocket client: join, leave, heartbeat,
//! every filter operator, and every error path, in both serializers.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const SCHEMA: &str = "
CREATE TABLE appointments (
    id bigint PRIMARY KEY, patient_id int, provider_id int, status text, starts_at timestamptz
);
ALTER TABLE appointments REPLICA IDENTITY FULL;
CREATE TABLE unpublished (id int PRIMARY KEY);
";

const QUIET: Duration = Duration::from_millis(400);

async fn setup(name: &str) -> (Pg, pgcast::server::RunningServer) {
    let pg = Pg::start(name).await;
    pg.publish(SCHEMA, &["appointments"]).await;
    let server = start_server(config(&pg)).await;
    (pg, server)
}

fn service() -> String {
    token("service_role", 600)
}

#[tokio::test]
async fn heartbeat_join_and_leave_in_both_serializers() {
    let (pg, server) = setup("join").await;
    for v2 in [false, true] {
        let mut client = Client::connect(server.addr, Some(&service()), v2).await;
        let r = client.push("phoenix", "heartbeat", json!({})).await;
        let reply = client.reply(&r).await;
        assert_eq!(reply["payload"], json!({"status": "ok", "response": {}}));
        assert_eq!(reply["topic"], "phoenix");

        let b = binding("INSERT", "appointments", Some("patient_id=eq.7"));
        let reply = client.join("realtime:mine", json!([b]), None).await;
        assert_eq!(reply["status"], "ok");
        // The reply echoes each binding with a server-assigned id, which realtime-js matches.
        let bound = &reply["response"]["postgres_changes"][0];
        assert_eq!(
            (&bound["event"], &bound["table"], &bound["filter"]),
            (&b["event"], &b["table"], &b["filter"])
        );
        let id = bound["id"].as_u64().expect("numeric id");
        let system = client.expect("system message", |v| v["event"] == "system").await;
        assert_eq!(system["payload"]["status"], "ok");
        assert_eq!(system["payload"]["extension"], "postgres_changes");

        pg.exec(&format!(
            "INSERT INTO appointments VALUES ({}, 7, 1, 'booked', now())",
            if v2 { 2 } else { 1 }
        ))
        .await;
        let changes = client.changes(1, DEADLINE).await;
        assert_eq!(changes[0]["ids"], json!([id]));
        assert_eq!(changes[0]["data"]["record"]["patient_id"], 7);

        let r = client.push("realtime:mine", "phx_leave", json!({})).await;
        assert_eq!(client.reply(&r).await["payload"]["status"], "ok");
        client.expect("phx_close", |v| v["event"] == "phx_close" && v["topic"] == "realtime:mine").await;
        pg.exec("INSERT INTO appointments VALUES (100, 7, 1, 'booked', now())").await;
        client.expect_no_change(QUIET).await;
        pg.exec("DELETE FROM appointments WHERE id = 100").await;
    }
}

/// Inserts rows 1..=5 with patient_id = id * 10 and starts_at one hour apart, then checks which
/// ids each filter delivers.
#[tokio::test]
async fn every_filter_operator_compares_by_column_type() {
    let (pg, server) = setup("filters").await;
    let cases: [(&str, &[i64]); 19] = [
        ("patient_id=eq.30", &[3]),
        ("patient_id=neq.30", &[1, 2, 4, 5]),
        ("patient_id=lt.30", &[1, 2]),
        ("patient_id=lte.30", &[1, 2, 3]),
        ("patient_id=gt.30", &[4, 5]),
        ("patient_id=gte.30", &[3, 4, 5]),
        ("patient_id=in.(10,50,70)", &[1, 5]),
        ("status=eq.s3", &[3]),
        ("status=in.(s1,\"s4\")", &[1, 4]),
        ("starts_at=gt.2024-01-01T03:00:00+00:00", &[4, 5]),
        // Conditions separated by commas must all hold (this was once read as one value).
        ("patient_id=eq.20,status=eq.s2", &[2]),
        ("patient_id=eq.20,status=eq.s3", &[]),
        ("patient_id=gt.10, status=in.(s2,s3,s5)", &[2, 3, 5]),
        ("status=not.in.(s1,s2)", &[3, 4, 5]),
        ("status=like.s%,patient_id=not.gte.30", &[1, 2]),
        ("status=ilike.S4", &[4]),
        ("status=isdistinct.s1", &[2, 3, 4, 5]),
        ("status=not.is.null,patient_id=lt.30", &[1, 2]),
        ("status=eq.\"s5\"", &[5]),
    ];
    let mut clients = Vec::new();
    for (filter, _) in &cases {
        let mut client = Client::connect(server.addr, Some(&service()), true).await;
        let reply =
            client.join("realtime:f", json!([binding("*", "appointments", Some(filter))]), None).await;
        assert_eq!(reply["status"], "ok", "{filter}: {reply}");
        clients.push(client);
    }
    for id in 1..=5 {
        pg.exec(&format!(
            "INSERT INTO appointments VALUES ({id}, {}, 1, 's{id}', '2024-01-01 00:00:00+00'::timestamptz + interval '{id} hours')",
            id * 10
        ))
        .await;
    }
    for ((filter, expected), client) in cases.iter().zip(clients.iter_mut()) {
        let got: Vec<i64> = client
            .changes(expected.len(), DEADLINE)
            .await
            .iter()
            .map(|c| c["data"]["record"]["id"].as_i64().unwrap())
            .collect();
        assert_eq!(&got, expected, "{filter}");
        client.expect_no_change(QUIET).await;
    }
}

#[tokio::test]
async fn events_and_filters_apply_to_update_and_delete() {
    let (pg, server) = setup("events").await;
    let mut updates = Client::connect(server.addr, Some(&service()), false).await;
    updates
        .join("realtime:u", json!([binding("UPDATE", "appointments", Some("provider_id=eq.2"))]), None)
        .await;
    let mut deletes = Client::connect(server.addr, Some(&service()), false).await;
    deletes
        .join("realtime:d", json!([binding("DELETE", "appointments", Some("provider_id=eq.2"))]), None)
        .await;
    pg.exec("INSERT INTO appointments VALUES (1, 1, 2, 'booked', now())").await;
    pg.exec("UPDATE appointments SET status = 'seen' WHERE id = 1").await;
    pg.exec("DELETE FROM appointments WHERE id = 1").await;
    let u = updates.changes(1, DEADLINE).await;
    assert_eq!(u[0]["data"]["type"], "UPDATE");
    assert_eq!(u[0]["data"]["old_record"]["status"], "booked");
    updates.expect_no_change(QUIET).await;
    let d = deletes.changes(1, DEADLINE).await;
    assert_eq!(d[0]["data"]["type"], "DELETE");
    assert_eq!(d[0]["data"]["old_record"]["provider_id"], 2, "filter applied to the old row of a DELETE");
    deletes.expect_no_change(QUIET).await;
}

#[tokio::test]
async fn two_identical_bindings_on_one_channel_share_one_message() {
    let (pg, server) = setup("dupes").await;
    let mut client = Client::connect(server.addr, Some(&service()), true).await;
    let b = binding("*", "appointments", None);
    let reply = client.join("realtime:x", json!([b, b, binding("INSERT", "appointments", None)]), None).await;
    let ids: Vec<u64> = reply["response"]["postgres_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids[0], ids[1]);
    assert_ne!(ids[0], ids[2]);
    pg.exec("INSERT INTO appointments VALUES (1, 1, 1, 'x', now())").await;
    let changes = client.changes(2, Duration::from_secs(2)).await;
    assert_eq!(changes.len(), 1, "one message for both matching ids: {changes:#?}");
    let mut got: Vec<u64> =
        changes[0]["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    got.sort();
    let mut want = vec![ids[0], ids[2]];
    want.sort();
    assert_eq!(got, want);
}

async fn join_error(client: &mut Client, bindings: Value, token: Option<&str>) -> String {
    let reply = client.join("realtime:e", bindings, token).await;
    assert_eq!(reply["status"], "error", "{reply}");
    reply["response"]["reason"].as_str().expect("a reason").to_string()
}

#[tokio::test]
async fn every_error_path_gets_a_reason_and_the_connection_survives() {
    let (pg, server) = setup("errors").await;
    let mut client = Client::connect(server.addr, Some(&service()), false).await;

    client.send_raw("{not json").await;
    let notice = client.expect("phx_error", |v| v["event"] == "phx_error").await;
    assert!(notice["payload"]["reason"].as_str().unwrap().starts_with("malformed message"), "{notice}");
    client.send_raw("[1,2,3]").await;
    client.expect("phx_error for wrong shape", |v| v["event"] == "phx_error").await;

    let reason = join_error(&mut client, json!([binding("UPSERT", "appointments", None)]), None).await;
    assert!(reason.contains("unknown event"), "{reason}");
    let reason =
        join_error(&mut client, json!([binding("*", "appointments", Some("patient_id=regex.3"))]), None)
            .await;
    assert!(reason.contains("unknown operator"), "{reason}");
    let reason =
        join_error(&mut client, json!([binding("*", "appointments", Some("patient_id=like.3"))]), None).await;
    assert!(reason.contains("like and ilike apply to text columns"), "{reason}");
    let reason = join_error(
        &mut client,
        json!([binding("*", "appointments", Some("status=eq.s1,patient_id=eq.x"))]),
        None,
    )
    .await;
    assert!(reason.contains("invalid filter patient_id=eq.…: a value is not a valid int4"), "{reason}");
    let reason =
        join_error(&mut client, json!([binding("*", "appointments", Some("nope=eq.3"))]), None).await;
    assert!(reason.contains("has no column"), "{reason}");
    let reason =
        join_error(&mut client, json!([binding("*", "appointments", Some("patient_id=eq.x"))]), None).await;
    assert!(reason.contains("not a valid int4"), "{reason}");
    let reason = join_error(&mut client, json!([binding("*", "unpublished", None)]), None).await;
    assert!(reason.contains("not in publication"), "{reason}");
    let reason = join_error(&mut client, json!([binding("*", "no_such_table", None)]), None).await;
    assert!(reason.contains("not in publication"), "{reason}");

    let expired = token("service_role", -10);
    let reason = join_error(&mut client, json!([binding("*", "appointments", None)]), Some(&expired)).await;
    assert_eq!(reason, "invalid access_token: token has expired");
    let forged = pgcast::auth::sign(
        "some-other-secret-entirely",
        &json!({"role": "service_role", "exp": 4102444800u64}),
    )
    .unwrap();
    let reason = join_error(&mut client, json!([binding("*", "appointments", None)]), Some(&forged)).await;
    assert_eq!(reason, "invalid access_token: token signature is invalid");
    let reason = join_error(&mut client, json!([binding("*", "appointments", None)]), Some("garbage")).await;
    assert_eq!(reason, "invalid access_token: token is malformed (not a JWT)");
    let reason = join_error(
        &mut client,
        json!([binding("*", "appointments", None)]),
        Some(&token("authenticated", 60)),
    )
    .await;
    assert!(reason.contains("no policy allows it"), "{reason}");

    let r = client.push("realtime:never-joined", "broadcast", json!({})).await;
    assert!(client.reply(&r).await["payload"]["response"]["reason"]
        .as_str()
        .unwrap()
        .contains("unmatched topic"));
    let r = client.push("phoenix", "dance", json!({})).await;
    assert_eq!(client.reply(&r).await["payload"]["status"], "error");

    // After all that, the same connection still joins and receives.
    let reply = client.join("realtime:ok", json!([binding("*", "appointments", None)]), None).await;
    assert_eq!(reply["status"], "ok");
    let r = client.push("realtime:ok", "shout", json!({})).await;
    assert!(client.reply(&r).await["payload"]["response"]["reason"]
        .as_str()
        .unwrap()
        .contains("unknown event"));
    pg.exec("INSERT INTO appointments VALUES (1, 1, 1, 'x', now())").await;
    assert_eq!(client.changes(1, DEADLINE).await.len(), 1);
}

#[tokio::test]
async fn a_tokenless_join_is_refused_and_a_bad_vsn_is_refused() {
    let (_pg, server) = setup("apikey").await;
    let mut anonymous = Client::connect(server.addr, None, true).await;
    let reason = join_error(&mut anonymous, json!([]), None).await;
    assert!(reason.starts_with("no token"), "{reason}");
    let url = format!("ws://{}/realtime/v1/websocket?vsn=9.9.9", server.addr);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).to_string();
            assert_eq!(response.status(), 400);
            assert!(body.contains("unsupported vsn"), "{body}");
        }
        other => panic!("expected an HTTP 400 refusal, got {:?}", other.map(|_| "a connection")),
    }
}

#[tokio::test]
async fn an_expiring_token_closes_its_channel_with_a_reason() {
    let (pg, server) = setup("expiry").await;
    let mut client = Client::connect(server.addr, None, true).await;
    let short = token("service_role", 2);
    let reply =
        client.join("realtime:short", json!([binding("*", "appointments", None)]), Some(&short)).await;
    assert_eq!(reply["status"], "ok");
    let system = client
        .expect("token expiry notice", |v| v["event"] == "system" && v["payload"]["status"] == "error")
        .await;
    assert!(system["payload"]["message"].as_str().unwrap().starts_with("Token has expired"), "{system}");
    client.expect("phx_close", |v| v["event"] == "phx_close").await;
    pg.exec("INSERT INTO appointments VALUES (1, 1, 1, 'x', now())").await;
    client.expect_no_change(QUIET).await;
}

#[tokio::test]
async fn access_token_refresh_extends_the_channel_and_a_bad_one_closes_it() {
    let (pg, server) = setup("refresh").await;
    let mut client = Client::connect(server.addr, None, false).await;
    let reply = client
        .join("realtime:r", json!([binding("*", "appointments", None)]), Some(&token("service_role", 2)))
        .await;
    assert_eq!(reply["status"], "ok");
    let r =
        client.push("realtime:r", "access_token", json!({"access_token": token("service_role", 600)})).await;
    assert_eq!(client.reply(&r).await["payload"]["status"], "ok");
    tokio::time::sleep(Duration::from_millis(2500)).await; // past the first token's expiry
    pg.exec("INSERT INTO appointments VALUES (1, 1, 1, 'x', now())").await;
    assert_eq!(client.changes(1, DEADLINE).await.len(), 1, "refreshed channel keeps delivering");

    client.push("realtime:r", "access_token", json!({"access_token": "garbage"})).await;
    let system = client.expect("refusal", |v| v["event"] == "system").await;
    assert!(system["payload"]["message"].as_str().unwrap().contains("invalid access_token"));
    client.expect("phx_close", |v| v["event"] == "phx_close").await;
}

#[tokio::test]
async fn a_client_close_frame_is_answered_with_a_close_frame() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    use tokio_tungstenite::tungstenite::Message;
    let (_pg, server) = setup("close").await;
    let mut client = Client::connect(server.addr, Some(&service()), true).await;
    assert_eq!(
        client.join("realtime:c", json!([binding("*", "appointments", None)]), None).await["status"],
        "ok"
    );
    let bye = CloseFrame { code: CloseCode::Normal, reason: "bye".into() };
    client.ws.send(Message::Close(Some(bye))).await.expect("send close");
    // RFC 6455 5.5.1: the server answers with a Close frame before it drops the connection; an
    // official client that gets none reports 1006 and channel errors on a normal close().
    loop {
        match tokio::time::timeout(DEADLINE, client.ws.next()).await.expect("an answer in time") {
            Some(Ok(Message::Text(_))) => continue, // sent before the close crossed
            Some(Ok(Message::Close(Some(frame)))) => break assert_eq!(frame.code, CloseCode::Normal),
            other => panic!("expected a Close frame, got {other:?}"),
        }
    }
    assert!(matches!(client.ws.next().await, None | Some(Err(_))), "then the connection ends");
}

#[tokio::test]
async fn oversized_frames_close_the_connection_with_a_reason() {
    let (_pg, server) = setup("oversize").await;
    let mut client = Client::connect(server.addr, Some(&service()), true).await;
    let huge = format!("[null,null,\"phoenix\",\"heartbeat\",{{\"x\":\"{}\"}}]", "a".repeat(2 * 1024 * 1024));
    client.send_raw(&huge).await;
    let close = client.expect("close frame", |v| v["event"] == "__close").await;
    assert_eq!(close["code"], 1009, "{close}");
    // The server is fine for everyone else.
    let mut other = Client::connect(server.addr, Some(&service()), true).await;
    let r = other.push("phoenix", "heartbeat", json!({})).await;
    assert_eq!(other.reply(&r).await["payload"]["status"], "ok");
}
