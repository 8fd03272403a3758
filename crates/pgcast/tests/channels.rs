//! Broadcast and presence with a raw client: server broadcast refusals, presence leaving when a
//! socket dies or stops heartbeating, and write rights on private channels.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn setup(
    name: &str,
    tune: impl FnOnce(&mut pgcast::config::Config),
) -> (Pg, pgcast::server::RunningServer) {
    let pg = Pg::start(name).await;
    pg.publish("CREATE TABLE t (id int PRIMARY KEY)", &[]).await;
    let mut config = config(&pg);
    tune(&mut config);
    let server = start_server(config).await;
    (pg, server)
}

async fn post(addr: std::net::SocketAddr, path: &str, auth: Option<&str>, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = auth.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split(' ').nth(1).unwrap().parse().unwrap();
    (status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

#[tokio::test]
async fn server_broadcast_needs_a_service_token_and_a_valid_body() {
    let (_pg, server) = setup("restbroadcast", |_| {}).await;
    let mut member = Client::connect(server.addr, Some(&token("authenticated", 600)), false).await;
    assert_eq!(member.join("realtime:ward", json!([]), None).await["status"], "ok");
    let body = r#"{"messages":[{"topic":"ward","event":"paged","payload":{"room":4}}]}"#;

    let (status, reply) = post(server.addr, "/api/broadcast", None, body).await;
    assert!(status == 401 && reply.contains("missing token"), "{status} {reply}");
    let (status, reply) = post(server.addr, "/api/broadcast", Some("garbage"), body).await;
    assert!(status == 401 && reply.contains("invalid token"), "{status} {reply}");
    let (status, reply) = post(server.addr, "/api/broadcast", Some(&token("authenticated", 60)), body).await;
    assert!(status == 403 && reply.contains("may not broadcast over HTTP"), "{status} {reply}");
    let service = token("service_role", 60);
    let (status, reply) = post(server.addr, "/api/broadcast", Some(&service), "{nope").await;
    assert!(status == 400 && reply.contains("not JSON"), "{status} {reply}");
    let (status, reply) =
        post(server.addr, "/api/broadcast", Some(&service), r#"{"messages":[{"topic":1}]}"#).await;
    assert!(status == 400 && reply.contains("messages[0]"), "{status} {reply}");
    member.expect_no_change(Duration::from_millis(200)).await;

    let (status, reply) = post(server.addr, "/realtime/v1/api/broadcast", Some(&service), body).await;
    assert_eq!(status, 202, "{reply}");
    let got = member.expect("broadcast", |v| v["event"] == "broadcast").await;
    assert_eq!(got["payload"]["event"], "paged");
    assert_eq!(got["payload"]["payload"], json!({"room": 4}));
    assert_eq!(got["payload"]["meta"]["seq"], 1);
}

/// Joins with presence enabled, returns the `presence_state` received, and tracks.
async fn track(client: &mut Client, topic: &str, key: &str) -> Value {
    let payload = json!({"config": {"presence": {"key": key, "enabled": true}}});
    let r = client.push(topic, "phx_join", payload).await;
    assert_eq!(client.reply(&r).await["payload"]["status"], "ok");
    let state = client.expect("presence_state", |v| v["event"] == "presence_state").await;
    let r = client
        .push(topic, "presence", json!({"type": "presence", "event": "track", "payload": {"k": key}}))
        .await;
    assert_eq!(client.reply(&r).await["payload"]["status"], "ok");
    state["payload"].clone()
}

async fn expect_leave(watcher: &mut Client, key: &str, within: Duration) -> Duration {
    let started = Instant::now();
    let deadline = started + within;
    while Instant::now() < deadline {
        if let Some(v) = watcher.next(deadline - Instant::now()).await {
            if v["event"] == "presence_diff" && v["payload"]["leaves"].get(key).is_some() {
                return started.elapsed();
            }
        }
    }
    panic!("{key} never left presence");
}

/// Without `config.presence.key` the server makes one up when the member first tracks, and keeps
/// it: tracking again updates the same entry instead of adding one.
#[tokio::test]
async fn a_member_without_a_presence_key_gets_one_stable_generated_key() {
    let (_pg, server) = setup("presencekey", |_| {}).await;
    let user = token("authenticated", 600);
    let mut member = Client::connect(server.addr, Some(&user), true).await;
    let r =
        member.push("realtime:keyless", "phx_join", json!({"config": {"presence": {"enabled": true}}})).await;
    assert_eq!(member.reply(&r).await["payload"]["status"], "ok");
    let mut keys = Vec::new();
    for round in 0..2 {
        let r = member
            .push(
                "realtime:keyless",
                "presence",
                json!({"type": "presence", "event": "track", "payload": {"round": round}}),
            )
            .await;
        assert_eq!(member.reply(&r).await["payload"]["status"], "ok");
        let diff = member
            .expect("own join diff", |v| {
                v["event"] == "presence_diff"
                    && v["payload"]["joins"].as_object().is_some_and(|joins| !joins.is_empty())
            })
            .await;
        let joins = diff["payload"]["joins"].as_object().expect("joins").clone();
        assert_eq!(joins.len(), 1, "{diff}");
        keys.extend(joins.keys().cloned());
    }
    assert!(!keys[0].is_empty(), "{keys:?}");
    assert_eq!(keys[0], keys[1], "the generated key is kept for the channel");
}

#[tokio::test]
async fn presence_is_left_when_a_socket_dies_or_stops_heartbeating() {
    let (_pg, server) = setup("presencegone", |c| c.heartbeat_timeout = Duration::from_secs(5)).await;
    let user = token("authenticated", 600);
    let mut watcher = Client::connect(server.addr, Some(&user), true).await;
    let state = track(&mut watcher, "realtime:lobby", "watcher").await;
    assert_eq!(state, json!({}), "state before anyone else tracked");

    // A socket that dies without a close frame.
    let mut dying = Client::connect(server.addr, Some(&user), true).await;
    let state = track(&mut dying, "realtime:lobby", "dying").await;
    assert!(state.get("watcher").is_some(), "a later member sees who is there: {state}");
    watcher
        .expect("dying joins", |v| {
            v["event"] == "presence_diff" && v["payload"]["joins"].get("dying").is_some()
        })
        .await;
    drop(dying);
    expect_leave(&mut watcher, "dying", DEADLINE).await;

    // A client that stays connected but stops sending anything, heartbeats included.
    let mut silent = Client::connect(server.addr, Some(&user), true).await;
    track(&mut silent, "realtime:lobby", "silent").await;
    let keep_alive = tokio::spawn(async move {
        // The watcher keeps heartbeating so only the silent one times out.
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if watcher.push("phoenix", "heartbeat", json!({})).await.is_empty() {
                break;
            }
            if let Some(v) = watcher.next(Duration::from_millis(10)).await {
                if v["event"] == "presence_diff" && v["payload"]["leaves"].get("silent").is_some() {
                    return watcher;
                }
            }
        }
        watcher
    });
    let watcher =
        tokio::time::timeout(Duration::from_secs(15), keep_alive).await.expect("silent never left").unwrap();
    drop(watcher);
    let close = silent.expect("heartbeat timeout close", |v| v["event"] == "__close").await;
    assert_eq!(close["code"], 4001, "{close}");
}

#[tokio::test]
async fn write_rights_on_private_channels_are_enforced_per_action() {
    let pg = Pg::start("privatewrite").await;
    let dir = test_dir("privatewrite-policy");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("policy.toml"),
        "[claims]\ntenant_id = \"integer\"\n[channels]\n[[channels.allow]]\ntopic = \"tenant:{claims.tenant_id}:*\"\nrole = \"patient\"\nread = true\n",
    )
    .unwrap();
    let mut config = config(&pg);
    config.policy = Some(dir.join("policy.toml"));
    let server = start_server(config).await;
    let patient = token_with(json!({"role": "patient", "sub": "7", "tenant_id": 3}), 600);
    let mut client = Client::connect(server.addr, Some(&patient), true).await;
    let join =
        |topic: &str| (topic.to_string(), json!({"config": {"private": true, "broadcast": {"ack": true}}}));
    let (topic, payload) = join("realtime:tenant:4:news");
    let r = client.push(&topic, "phx_join", payload).await;
    let reply = client.reply(&r).await;
    assert_eq!(
        reply["payload"]["response"]["reason"],
        "role \"patient\" is not allowed to join private channel \"tenant:4:news\""
    );
    let (topic, payload) = join("realtime:tenant:3:news");
    let r = client.push(&topic, "phx_join", payload).await;
    assert_eq!(client.reply(&r).await["payload"]["status"], "ok");
    let r = client.push(&topic, "broadcast", json!({"type": "broadcast", "event": "x", "payload": {}})).await;
    let reply: Value = client.reply(&r).await;
    assert_eq!(reply["payload"]["response"]["reason"], "not allowed to send on channel \"tenant:3:news\"");
    let r =
        client.push(&topic, "presence", json!({"type": "presence", "event": "track", "payload": {}})).await;
    let reply = client.reply(&r).await;
    assert_eq!(
        reply["payload"]["response"]["reason"],
        "not allowed to track presence on channel \"tenant:3:news\""
    );
    // A malformed binary frame is reported, the connection stays.
    client.ws.send(tokio_tungstenite::tungstenite::Message::Binary(vec![3, 9].into())).await.unwrap();
    let notice = client.expect("phx_error", |v| v["event"] == "phx_error").await;
    assert!(notice["payload"]["reason"].as_str().unwrap().starts_with("malformed binary frame"), "{notice}");
    let r = client.push("phoenix", "heartbeat", json!({})).await;
    assert_eq!(client.reply(&r).await["payload"]["status"], "ok");
}

#[tokio::test]
async fn broadcasts_carry_a_sequence_and_a_returning_member_gets_what_it_missed() {
    let (_pg, server) = setup("broadcastresume", |_| {}).await;
    let user = token("authenticated", 600);
    let service = token("service_role", 60);
    let send = |n: i64| {
        let body = format!(r#"{{"messages":[{{"topic":"room","event":"n","payload":{{"n":{n}}}}}]}}"#);
        let service = service.clone();
        async move { post(server.addr, "/api/broadcast", Some(&service), &body).await }
    };
    let mut member = Client::connect(server.addr, Some(&user), false).await;
    assert_eq!(member.join("realtime:room", json!([]), None).await["status"], "ok");
    for n in 1..=2 {
        assert_eq!(send(n).await.0, 202);
    }
    let mut last = json!(null);
    for n in 1..=2 {
        let got = member.expect("broadcast", |v| v["event"] == "broadcast").await;
        assert_eq!(got["payload"]["payload"]["n"], n);
        assert_eq!(got["payload"]["meta"]["seq"], n, "per-topic sequence");
        last = got["payload"]["meta"].clone();
    }
    drop(member);
    for n in 3..=4 {
        assert_eq!(send(n).await.0, 202);
    }
    let mut back = Client::connect(server.addr, Some(&user), false).await;
    let resume = json!({"config": {"resume": {"broadcast": {"seq": last["seq"], "epoch": last["epoch"]}}}});
    let r = back.push("realtime:room", "phx_join", resume).await;
    assert_eq!(back.reply(&r).await["payload"]["status"], "ok");
    for n in 3..=4 {
        let got = back.expect("missed broadcast", |v| v["event"] == "broadcast").await;
        assert_eq!(got["payload"]["payload"]["n"], n);
    }
    let notice =
        back.expect("resumed", |v| v["event"] == "system" && v["payload"]["scope"] == "broadcast").await;
    assert_eq!(notice["payload"]["status"], "ok", "{notice}");
    assert_eq!(send(5).await.0, 202);
    let live = back.expect("live broadcast", |v| v["event"] == "broadcast").await;
    assert_eq!(live["payload"]["meta"]["seq"], 5);

    let mut stale = Client::connect(server.addr, Some(&user), false).await;
    let resume = json!({"config": {"resume": {"broadcast": {"seq": 1, "epoch": "another-server"}}}});
    let r = stale.push("realtime:room", "phx_join", resume).await;
    stale.reply(&r).await;
    let notice =
        stale.expect("resync", |v| v["event"] == "system" && v["payload"]["scope"] == "broadcast").await;
    assert_eq!(notice["payload"]["status"], "resync_required", "{notice}");
}

#[tokio::test]
async fn broadcast_history_stays_within_its_byte_budget() {
    const MIB: usize = 1024 * 1024;
    let (_pg, server) = setup("broadcastbudget", |c| {
        c.broadcast_history = pgcast::broadcast::HistoryBudget { max_bytes: 4 * MIB, topic_max_bytes: MIB };
    })
    .await;
    let port = server.addr.port();
    // An anonymous client fills topics nobody else is on with 200 KB broadcasts, and leaves:
    // 8 MB sent, at most 4 MiB (1 MiB a topic) kept.
    let big = json!({"type": "broadcast", "event": "junk", "payload": {"x": "y".repeat(200_000)}});
    for topic in ["realtime:j1", "realtime:j2", "realtime:j3", "realtime:j4", "realtime:j5"] {
        let mut anonymous = Client::connect(server.addr, Some(&token("anon", 600)), true).await;
        let payload = json!({"config": {"broadcast": {"ack": true}}});
        let r = anonymous.push(topic, "phx_join", payload).await;
        assert_eq!(anonymous.reply(&r).await["payload"]["status"], "ok");
        for _ in 0..8 {
            let r = anonymous.push(topic, "broadcast", big.clone()).await;
            assert_eq!(anonymous.reply(&r).await["payload"]["status"], "ok");
        }
    }
    let deadline = Instant::now() + DEADLINE;
    loop {
        let held = metric(port, "pgcast_broadcast_history_bytes").await;
        if held > 0.0 && held <= (4 * MIB) as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "broadcast history holds {held} bytes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metric(port, "pgcast_broadcast_history_evicted_total").await >= 20.0);
    // A member resuming from before what was evicted is told to resync; one from what is kept
    // gets the rest.
    let epoch = {
        let mut probe = Client::connect(server.addr, Some(&token("anon", 600)), true).await;
        let resume = json!({"config": {"resume": {"broadcast": {"seq": 0, "epoch": "x"}}}});
        let r = probe.push("realtime:j5", "phx_join", resume).await;
        probe.reply(&r).await;
        let notice =
            probe.expect("resync", |v| v["event"] == "system" && v["payload"]["scope"] == "broadcast").await;
        notice["payload"]["epoch"].as_str().unwrap().to_string()
    };
    let mut returning = Client::connect(server.addr, Some(&token("anon", 600)), true).await;
    let resume = json!({"config": {"resume": {"broadcast": {"seq": 1, "epoch": epoch}}}});
    let r = returning.push("realtime:j5", "phx_join", resume).await;
    returning.reply(&r).await;
    let notice =
        returning.expect("resync", |v| v["event"] == "system" && v["payload"]["scope"] == "broadcast").await;
    assert_eq!(notice["payload"]["status"], "resync_required", "{notice}");
    assert!(notice["payload"]["message"].as_str().unwrap().contains("older than the broadcasts kept"));
    // vsn 1.0.0: broadcasts arrive as JSON text (2.0.0 members get binary frames).
    let mut recent = Client::connect(server.addr, Some(&token("anon", 600)), false).await;
    let resume = json!({"config": {"resume": {"broadcast": {"seq": 39, "epoch": epoch}}}});
    let r = recent.push("realtime:j5", "phx_join", resume).await;
    recent.reply(&r).await;
    let kept = recent.expect("the kept broadcast", |v| v["event"] == "broadcast").await;
    assert_eq!(kept["payload"]["meta"]["seq"], 40, "j5 numbers on after j1-j4's 32");
    let notice =
        recent.expect("resumed", |v| v["event"] == "system" && v["payload"]["scope"] == "broadcast").await;
    assert_eq!(notice["payload"]["status"], "ok", "{notice}");
}

/// Past `FEED_MIN_MEMBERS` a topic's broadcasts go through its feed: every member still gets
/// each broadcast once, in order, and in its place among what else the channel sends (a
/// presence diff queued between two broadcasts stays between them); a member joining later
/// starts after what was sent.
#[tokio::test]
async fn a_crowded_topic_delivers_each_broadcast_once_in_order_and_in_its_place() {
    let (_pg, server) = setup("crowd", |_| {}).await;
    let user = token("authenticated", 600);
    let service = token("service_role", 60);
    let topic = "realtime:crowd";
    let send = |n: i64| {
        let body = format!(r#"{{"messages":[{{"topic":"crowd","event":"n","payload":{{"n":{n}}}}}]}}"#);
        let service = service.clone();
        async move { post(server.addr, "/api/broadcast", Some(&service), &body).await }
    };
    let mut members = Vec::new();
    for _ in 0..pgcast::broadcast::FEED_MIN_MEMBERS + 4 {
        let mut member = Client::connect(server.addr, Some(&user), false).await;
        assert_eq!(member.join(topic, json!([]), None).await["status"], "ok");
        members.push(member);
    }
    for n in 1..=10 {
        assert_eq!(send(n).await.0, 202);
    }
    let mut tracker = Client::connect(server.addr, Some(&user), false).await;
    track(&mut tracker, topic, "front-desk").await;
    for n in 11..=20 {
        assert_eq!(send(n).await.0, 202);
    }
    let expected: Vec<i64> = (1..=10).chain([0]).chain(11..=20).collect();
    for (i, member) in members.iter_mut().enumerate() {
        let mut seen = Vec::new();
        while seen.len() < expected.len() {
            let got = member
                .expect("a broadcast or the presence diff", |v| {
                    v["event"] == "broadcast" || v["event"] == "presence_diff"
                })
                .await;
            seen.push(got["payload"]["payload"]["n"].as_i64().unwrap_or(0));
        }
        assert_eq!(seen, expected, "member {i}: once each, in order, the diff between 10 and 11");
    }
    // Nothing twice: a last broadcast is the next thing each member gets.
    assert_eq!(send(21).await.0, 202);
    for (i, member) in members.iter_mut().enumerate() {
        let got = member.expect("broadcast 21", |v| v["event"] == "broadcast").await;
        assert_eq!(got["payload"]["payload"]["n"], 21, "member {i}");
    }
    // The tracker joined after broadcast 10: it gets 11..20 only.
    for n in 11..=20 {
        let got = tracker.expect("broadcast", |v| v["event"] == "broadcast").await;
        assert_eq!(got["payload"]["payload"]["n"], n);
    }
}

/// A member of a crowded (fed) topic that stops reading is cut off as a slow consumer once the
/// feed (here 16 broadcasts, `outbound_queue`) has moved past what its socket took; the members
/// reading get every broadcast, in order.
#[tokio::test]
async fn a_stalled_member_of_a_crowded_topic_is_cut_off_and_the_readers_get_everything() {
    let (_pg, server) = setup("crowdslow", |c| c.outbound_queue = 16).await;
    let user = token("authenticated", 600);
    let service = token("service_role", 60);
    // 2,000 broadcasts of 4 KB: more than the server's socket send buffer (4 MB at most here)
    // and the feed together.
    const COUNT: i64 = 2000;
    let mut stalled = Client::connect_small_buffer(server.addr, &user).await;
    assert_eq!(stalled.join("realtime:crowd", json!([]), None).await["status"], "ok");
    let mut readers = Vec::new();
    for _ in 1..pgcast::broadcast::FEED_MIN_MEMBERS {
        let mut reader = Client::connect(server.addr, Some(&user), false).await;
        assert_eq!(reader.join("realtime:crowd", json!([]), None).await["status"], "ok");
        readers.push(tokio::spawn(async move {
            for n in 1..=COUNT {
                let got = reader.expect("broadcast", |v| v["event"] == "broadcast").await;
                assert_eq!(got["payload"]["payload"]["n"], n, "in order, none missing");
            }
        }));
    }
    let slow_before = metric(server.addr.port(), "pgcast_slow_consumers_total").await;
    let addr = server.addr;
    let sender = tokio::spawn(async move {
        let filler = "x".repeat(4000);
        for n in 1..=COUNT {
            let body = format!(
                r#"{{"messages":[{{"topic":"crowd","event":"n","payload":{{"n":{n},"filler":"{filler}"}}}}]}}"#
            );
            assert_eq!(post(addr, "/api/broadcast", Some(&service), &body).await.0, 202);
        }
    });
    // Once it is cut off the stalled member reads (the server tries to deliver the close for a
    // couple of seconds): what its socket held, then the close with the reason. No other test
    // of this file makes a slow consumer, so the process-wide count says it was this one.
    let deadline = std::time::Instant::now() + DEADLINE * 2;
    while metric(server.addr.port(), "pgcast_slow_consumers_total").await < slow_before + 1.0 {
        assert!(std::time::Instant::now() < deadline, "the stalled member was never cut off");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let close = loop {
        let frame = stalled.next(DEADLINE).await.expect("frames until the close");
        if frame["event"] == "__close" {
            break frame;
        }
    };
    assert_eq!(close["code"], 4000, "{close}");
    assert!(
        close["reason"].as_str().unwrap().starts_with("slow consumer: more than 16 broadcasts behind"),
        "{close}"
    );
    sender.await.expect("every broadcast accepted");
    for reader in readers {
        reader.await.expect("a reader got every broadcast");
    }
}
