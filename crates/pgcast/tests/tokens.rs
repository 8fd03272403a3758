//! Every token check the README promises, end to end: a token that is malformed, wrongly signed,
//! signed with another algorithm, expired, not yet valid or without `exp` is refused with a
//! reason naming the problem, at join and at `access_token` refresh, and nothing is delivered
//! on its behalf; extreme claim values are refused or saturate, never crash the session.

mod common;

use common::*;
use serde_json::{json, Value};

const SCHEMA: &str = "CREATE TABLE visits (id int PRIMARY KEY, patient_id int)";

async fn setup(name: &str) -> (Pg, pgcast::server::RunningServer) {
    start_with(name, SCHEMA, &["visits"], |_| {}).await
}

fn signed(claims: Value) -> String {
    pgcast::auth::sign(SECRET, &claims).expect("sign")
}

fn now() -> u64 {
    pgcast::auth::now_secs()
}

fn bindings() -> Value {
    json!([binding("*", "visits", None)])
}

#[tokio::test]
async fn each_bad_access_token_is_refused_at_join_with_its_reason() {
    let (pg, server) = setup("bad-tokens").await;
    let mut client = Client::connect(server.addr, None, true).await;
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &json!({"role": "service_role", "exp": now() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign HS512");
    let forged = pgcast::auth::sign(
        "another-secret-of-enough-length",
        &json!({"role": "service_role", "exp": now() + 600}),
    )
    .expect("sign");
    let cases = [
        ("garbage".to_string(), "invalid access_token: token is malformed (not a JWT)"),
        (forged, "invalid access_token: token signature is invalid"),
        (hs512, "invalid access_token: token must be signed with HS256"),
        (
            signed(json!({"role": "service_role", "exp": now() - 1})),
            "invalid access_token: token has expired",
        ),
        (
            signed(json!({"role": "service_role", "exp": now() + 600, "nbf": now() + 300})),
            "invalid access_token: token is not valid yet (nbf)",
        ),
        (signed(json!({"role": "service_role"})), "invalid access_token: token is missing the exp claim"),
        (
            signed(json!({"role": "service_role", "exp": "never"})),
            "invalid access_token: token claim exp must be a number of seconds since 1970",
        ),
    ];
    for (i, (token, reason)) in cases.iter().enumerate() {
        let reply = client.join(&format!("realtime:bad-{i}"), bindings(), Some(token)).await;
        assert_eq!(reply["status"], "error", "case {i}: {reply}");
        assert_eq!(reply["response"]["reason"], *reason, "case {i}");
    }
    // Nothing is delivered on behalf of any of them; a good token on the same connection works.
    let reply = client.join("realtime:good", bindings(), Some(&token("service_role", 600))).await;
    assert_eq!(reply["status"], "ok");
    pg.exec("INSERT INTO visits VALUES (1, 7)").await;
    let change = client.expect("the change", |v| v["event"] == "postgres_changes").await;
    assert_eq!(change["topic"], "realtime:good", "only the good channel receives");
}

#[tokio::test]
async fn a_token_not_yet_valid_is_refused_at_refresh_and_stops_delivery() {
    let (pg, server) = setup("nbf-refresh").await;
    let mut client = Client::connect(server.addr, None, true).await;
    let reply = client.join("realtime:r", bindings(), Some(&token("service_role", 600))).await;
    assert_eq!(reply["status"], "ok");
    let later = signed(json!({"role": "service_role", "exp": now() + 600, "nbf": now() + 300}));
    client.push("realtime:r", "access_token", json!({"access_token": later})).await;
    let system =
        client.expect("the refusal", |v| v["event"] == "system" && v["payload"]["status"] == "error").await;
    assert_eq!(system["payload"]["message"], "invalid access_token: token is not valid yet (nbf)");
    client.expect("phx_close", |v| v["event"] == "phx_close").await;
    pg.exec("INSERT INTO visits VALUES (1, 7)").await;
    client.expect_no_change(std::time::Duration::from_millis(500)).await;
}

#[tokio::test]
async fn a_clock_skew_inside_the_nbf_leeway_is_accepted() {
    let (_pg, server) = start_with("nbf-leeway", SCHEMA, &["visits"], |c| c.jwt_nbf_leeway_secs = 30).await;
    let mut client = Client::connect(server.addr, None, true).await;
    let skewed = signed(json!({"role": "service_role", "exp": now() + 600, "nbf": now() + 20}));
    assert_eq!(client.join("realtime:s", bindings(), Some(&skewed)).await["status"], "ok");
}

#[tokio::test]
async fn an_exp_near_u64_max_neither_panics_at_join_nor_at_refresh() {
    let (pg, server) = setup("huge-exp").await;
    let forever = signed(json!({"role": "service_role", "exp": u64::MAX}));
    let float_forever = signed(json!({"role": "service_role", "exp": 1e300}));
    let mut client = Client::connect(server.addr, None, true).await;
    let reply = client.join("realtime:f", bindings(), Some(&forever)).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let r = client.push("realtime:f", "access_token", json!({"access_token": float_forever})).await;
    assert_eq!(client.reply(&r).await["payload"]["status"], "ok");
    // The session is alive and delivering, and no session task died on the way.
    pg.exec("INSERT INTO visits VALUES (1, 7)").await;
    assert_eq!(client.changes(1, DEADLINE).await.len(), 1);
    let r = client.push("phoenix", "heartbeat", json!({})).await;
    assert_eq!(client.reply(&r).await["payload"]["status"], "ok");
    assert_eq!(metric(server.addr.port(), "pgcast_session_panics_total").await, 0.0);
}

/// The HTTP refusal of a WebSocket upgrade to `/realtime/v1/websocket?{query}`: status, the
/// content type and the JSON body.
async fn refused_upgrade(addr: std::net::SocketAddr, query: &str) -> (u16, String, Value) {
    let url = format!("ws://{addr}/realtime/v1/websocket?{query}");
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let kind = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
            let body = response.body().as_deref().unwrap_or_default();
            let json = serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
            (response.status().as_u16(), kind.to_string(), json)
        }
        other => panic!("expected an HTTP refusal, got {:?}", other.map(|_| "a connection")),
    }
}

#[tokio::test]
async fn an_invalid_apikey_is_refused_at_the_handshake_with_401_and_a_json_error() {
    let (_pg, server) = setup("handshake").await;
    let expired = token("service_role", -5);
    let later = signed(json!({"role": "service_role", "exp": now() + 600, "nbf": now() + 300}));
    let garbage = "g".repeat(30_000);
    let cases = [
        (garbage.as_str(), "invalid apikey: token is malformed (not a JWT)"),
        (expired.as_str(), "invalid apikey: token has expired"),
        (later.as_str(), "invalid apikey: token is not valid yet (nbf)"),
        ("", "invalid apikey: no token: pass it as the apikey query parameter or the join's access_token"),
    ];
    for (apikey, reason) in cases {
        let (status, kind, body) = refused_upgrade(server.addr, &format!("vsn=2.0.0&apikey={apikey}")).await;
        assert_eq!((status, kind.as_str()), (401, "application/json"), "{reason}");
        assert_eq!(body, json!({"error": reason}));
    }
    // A valid apikey connects, and no refused handshake left a session behind.
    let mut client = Client::connect(server.addr, Some(&token("service_role", 600)), true).await;
    assert_eq!(client.join("realtime:ok", bindings(), None).await["status"], "ok");
    assert_eq!(metric(server.addr.port(), "pgcast_connections").await, 1.0);
}
