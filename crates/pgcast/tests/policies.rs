//! Who sees what: roles × rows × operations under a policy file, tenant isolation, PHI-minimal
//! shapes, rows leaving a view, forged filters, and claims changing on token refresh.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const SCHEMA: &str = "
CREATE TABLE appointments (
    id bigint PRIMARY KEY, tenant_id int NOT NULL, patient_id text NOT NULL,
    provider_id text NOT NULL, status text NOT NULL DEFAULT 'booked', notes text
);
ALTER TABLE appointments REPLICA IDENTITY FULL;
CREATE TABLE internal_notes (id int PRIMARY KEY, body text);
";

const POLICY: &str = r#"
[claims]
tenant_id = "integer"

[tables.appointments]
tenant = "tenant_id = claims.tenant_id"

[[tables.appointments.allow]]
role = "patient"
when = "patient_id = claims.sub"

[[tables.appointments.allow]]
role = "provider"
when = "provider_id = claims.sub"
columns = ["patient_id", "provider_id", "status"]

[[tables.appointments.allow]]
role = "admin"

[[tables.appointments.allow]]
role = "bot"
shape = "keys"
"#;

const QUIET: Duration = Duration::from_millis(500);

fn who(role: &str, sub: &str, tenant: i64) -> String {
    token_with(json!({"role": role, "sub": sub, "tenant_id": tenant}), 600)
}

async fn setup(name: &str) -> (Pg, pgcast::server::RunningServer) {
    let pg = Pg::start(name).await;
    pg.publish(SCHEMA, &["appointments", "internal_notes"]).await;
    let dir = test_dir(&format!("{name}-policy"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("policy.toml");
    std::fs::write(&path, POLICY).unwrap();
    let mut config = config(&pg);
    config.policy = Some(path);
    let server = start_server(config).await;
    (pg, server)
}

async fn subscriber(server: &pgcast::server::RunningServer, token: &str, filter: Option<&str>) -> Client {
    let mut client = Client::connect(server.addr, None, true).await;
    let reply =
        client.join("realtime:appts", json!([binding("*", "appointments", filter)]), Some(token)).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    client
}

async fn refused(
    server: &pgcast::server::RunningServer,
    token: &str,
    table: &str,
    filter: Option<&str>,
) -> String {
    let mut client = Client::connect(server.addr, None, true).await;
    let reply = client.join("realtime:appts", json!([binding("*", table, filter)]), Some(token)).await;
    assert_eq!(reply["status"], "error", "{reply}");
    reply["response"]["reason"].as_str().unwrap().to_string()
}

/// (type, id, record, old_record, left_view) of each change received.
async fn received(client: &mut Client, count: usize) -> Vec<Value> {
    let changes = client.changes(count, DEADLINE).await;
    assert_eq!(changes.len(), count, "expected {count} changes, got {changes:#?}");
    client.expect_no_change(QUIET).await;
    changes.into_iter().map(|c| c["data"].clone()).collect()
}

fn kinds(changes: &[Value]) -> Vec<String> {
    changes.iter().map(|c| c["type"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn roles_rows_and_operations_matrix() {
    let (pg, server) = setup("matrix").await;
    let mut patient = subscriber(&server, &who("patient", "p1", 1), None).await;
    let mut other_patient = subscriber(&server, &who("patient", "p2", 1), None).await;
    let mut same_sub_other_tenant = subscriber(&server, &who("patient", "p1", 2), None).await;
    let mut provider = subscriber(&server, &who("provider", "d1", 1), None).await;
    let mut admin = subscriber(&server, &who("admin", "a1", 1), None).await;
    let mut other_admin = subscriber(&server, &who("admin", "a2", 2), None).await;
    let mut bot = subscriber(&server, &who("bot", "b1", 1), None).await;

    pg.exec("INSERT INTO appointments VALUES (1, 1, 'p1', 'd1', 'booked', 'diagnosis: private')").await;
    pg.exec("INSERT INTO appointments VALUES (2, 2, 'p1', 'd1', 'booked', 'other clinic')").await;
    // Reassigned to another provider: leaves d1's view.
    pg.exec("UPDATE appointments SET provider_id = 'd2' WHERE id = 1").await;
    pg.exec("UPDATE appointments SET status = 'done' WHERE id = 1").await;
    pg.exec("DELETE FROM appointments WHERE id = 1").await;

    let p = received(&mut patient, 4).await;
    assert_eq!(kinds(&p), ["INSERT", "UPDATE", "UPDATE", "DELETE"]);
    assert_eq!(p[0]["record"]["notes"], "diagnosis: private", "full shape for own rows");
    assert!(p.iter().all(|c| c["record"]["id"] == 1 || c["old_record"]["id"] == 1));

    other_patient.expect_no_change(QUIET).await;

    let t2 = received(&mut same_sub_other_tenant, 1).await;
    assert_eq!((t2[0]["type"].as_str(), &t2[0]["record"]["id"]), (Some("INSERT"), &json!(2)));

    let d = received(&mut provider, 2).await;
    assert_eq!(d[0]["type"], "INSERT");
    assert_eq!(d[0]["record"], json!({"id": 1, "patient_id": "p1", "provider_id": "d1", "status": "booked"}));
    let names: Vec<&str> =
        d[0]["columns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["id", "patient_id", "provider_id", "status"], "hidden columns are not even named");
    assert_eq!(d[1]["type"], "DELETE", "a row leaving the view arrives as a DELETE");
    assert_eq!(d[1]["left_view"], true);
    assert_eq!(d[1]["old_record"], json!({"id": 1}), "with its primary key only");
    assert_eq!(d[1].get("record"), None);

    let a = received(&mut admin, 4).await;
    assert_eq!(kinds(&a), ["INSERT", "UPDATE", "UPDATE", "DELETE"]);
    assert_eq!(a[3]["old_record"]["notes"], "diagnosis: private");
    let a2 = received(&mut other_admin, 1).await;
    assert_eq!(a2[0]["record"]["id"], 2);

    let b = received(&mut bot, 4).await;
    assert_eq!(kinds(&b), ["INSERT", "UPDATE", "UPDATE", "DELETE"]);
    assert_eq!(b[0]["record"], json!({"id": 1}));
    assert_eq!(b[1]["changed_columns"], json!(["provider_id"]));
    assert_eq!(b[2]["changed_columns"], json!(["status"]));
    assert_eq!(b[3]["old_record"], json!({"id": 1}));
    assert!(b.iter().all(|c| !c.to_string().contains("diagnosis")), "keys shape carries no PHI");
}

#[tokio::test]
async fn filters_cannot_widen_or_probe_a_policy() {
    let (_pg, server) = setup("forged").await;
    let reason = refused(&server, &who("patient", "p1", 1), "appointments", Some("patient_id=eq.p2")).await;
    assert!(reason.contains("can never match"), "{reason}");
    let reason = refused(&server, &who("patient", "p1", 1), "appointments", Some("tenant_id=eq.2")).await;
    assert!(reason.contains("can never match"), "{reason}");
    let reason = refused(&server, &who("provider", "d1", 1), "appointments", Some("notes=eq.x")).await;
    assert!(reason.contains("may not see it"), "{reason}");
    let reason = refused(&server, &who("bot", "b1", 1), "appointments", Some("status=eq.done")).await;
    assert!(reason.contains("may not see it"), "{reason}");
    let reason = refused(&server, &who("nurse", "n1", 1), "appointments", None).await;
    assert!(reason.contains("no rule in the policy allows it"), "{reason}");
    let reason = refused(&server, &who("patient", "p1", 1), "internal_notes", None).await;
    assert!(reason.contains("no policy allows it"), "{reason}");
    let no_tenant = token_with(json!({"role": "patient", "sub": "p1"}), 600);
    let reason = refused(&server, &no_tenant, "appointments", None).await;
    assert!(reason.contains("lacks claim \"tenant_id\""), "{reason}");
    let mut schema_wide = Client::connect(server.addr, None, true).await;
    let reply = schema_wide
        .join("realtime:all", json!([{"event": "*", "schema": "public"}]), Some(&who("admin", "a", 1)))
        .await;
    assert!(reply["response"]["reason"].as_str().unwrap().contains("must name a table"), "{reply}");
}

#[tokio::test]
async fn a_filtered_subscription_is_narrowed_by_the_policy_too() {
    let (pg, server) = setup("narrow").await;
    let mut provider = subscriber(&server, &who("provider", "d1", 1), Some("status=eq.booked")).await;
    pg.exec("INSERT INTO appointments VALUES (1, 1, 'p1', 'd1', 'booked', null)").await;
    pg.exec("INSERT INTO appointments VALUES (2, 1, 'p2', 'd9', 'booked', null)").await;
    pg.exec("INSERT INTO appointments VALUES (3, 1, 'p3', 'd1', 'done', null)").await;
    let got = received(&mut provider, 1).await;
    assert_eq!(got[0]["record"]["id"], 1);
}

#[tokio::test]
async fn refreshing_the_token_rebinds_the_policy_to_the_new_claims() {
    let (pg, server) = setup("refresh").await;
    let mut client = subscriber(&server, &who("patient", "p2", 1), None).await;
    pg.exec("INSERT INTO appointments VALUES (1, 1, 'p1', 'd1', 'booked', null)").await;
    client.expect_no_change(QUIET).await;

    let r =
        client.push("realtime:appts", "access_token", json!({"access_token": who("patient", "p1", 1)})).await;
    assert_eq!(client.reply(&r).await["payload"]["status"], "ok");
    pg.exec("INSERT INTO appointments VALUES (2, 1, 'p1', 'd1', 'booked', null)").await;
    let got = received(&mut client, 1).await;
    assert_eq!(got[0]["record"]["id"], 2, "the new sub's rows now arrive");

    client.push("realtime:appts", "access_token", json!({"access_token": who("nurse", "n1", 1)})).await;
    let system = client.expect("channel closed", |v| v["event"] == "system").await;
    assert!(system["payload"]["message"].as_str().unwrap().contains("no rule"), "{system}");
    client.expect("phx_close", |v| v["event"] == "phx_close").await;
    pg.exec("INSERT INTO appointments VALUES (3, 1, 'p1', 'd1', 'booked', null)").await;
    client.expect_no_change(QUIET).await;
}

#[tokio::test]
async fn policy_errors_stop_the_server_at_start_up_with_a_reason() {
    let pg = Pg::start("badpolicy").await;
    pg.publish(SCHEMA, &["appointments"]).await;
    let dir = test_dir("badpolicy-files");
    std::fs::create_dir_all(&dir).unwrap();
    for (policy, expected) in [
        ("[tables.appointments]\n[[tables.appointments.allow]]\nrole = 'patient'\nwhen = 'nope = claims.sub'\n", "unknown column \"nope\""),
        ("[tables.appointments]\n[[tables.appointments.allow]]\nrole = 'patient'\nwhen = 'patient_id = claims.clinic'\n", "not declared"),
        ("[tables.missing]\n[[tables.missing.allow]]\nrole = 'x'\n", "no such table"),
        ("[tables.appointments]\n[[tables.appointments.allow]]\nrole = 'x'\nshape = 'everything'\n", "unknown shape"),
        ("[channels]\n[[channels.allow]]\ntopic = 'patient:{claims.mrn}'\nrole = 'patient'\nread = true\n", "not declared"),
        ("tables = 3", "invalid policy file"),
    ] {
        let path = dir.join("policy.toml");
        std::fs::write(&path, policy).unwrap();
        let mut config = config(&pg);
        config.policy = Some(path);
        let err = match pgcast::server::start(config).await {
            Ok(_) => panic!("policy {policy:?} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(expected), "{policy:?}: {err}");
    }
}
