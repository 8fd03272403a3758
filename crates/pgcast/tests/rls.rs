//! RLS mode: PostgreSQL's own row-level security decides who receives a change, with the
//! subscriber's role and claims, one query per change for all candidates.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const SCHEMA: &str = "
CREATE ROLE authenticated NOLOGIN;
CREATE TABLE messages (id int PRIMARY KEY, patient_id text NOT NULL, body text);
ALTER TABLE messages ENABLE ROW LEVEL SECURITY;
GRANT SELECT ON messages TO authenticated;
CREATE POLICY own_messages ON messages FOR SELECT TO authenticated
    USING (patient_id = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
";

const POLICY: &str = r#"
[tables.messages]
mode = "rls"

[[tables.messages.allow]]
role = "authenticated"
"#;

fn patient(sub: &str) -> String {
    token_with(json!({"role": "authenticated", "sub": sub}), 600)
}

#[tokio::test]
async fn postgres_row_level_security_decides_who_receives_a_change() {
    let pg = Pg::start("rls").await;
    pg.publish(SCHEMA, &["messages"]).await;
    let dir = test_dir("rls-policy");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("policy.toml"), POLICY).unwrap();
    let mut config = config(&pg);
    config.policy = Some(dir.join("policy.toml"));
    let server = start_server(config).await;

    let mut clients = Vec::new();
    for sub in ["p1", "p2"] {
        let mut client = Client::connect(server.addr, None, true).await;
        let reply =
            client.join("realtime:m", json!([binding("*", "messages", None)]), Some(&patient(sub))).await;
        assert_eq!(reply["status"], "ok", "{reply}");
        clients.push(client);
    }
    let mut ghost = Client::connect(server.addr, None, true).await;
    let no_role = token_with(json!({"role": "ghost", "sub": "x"}), 600);
    let reply = ghost.join("realtime:m", json!([binding("*", "messages", None)]), Some(&no_role)).await;
    assert!(reply["response"]["reason"].as_str().unwrap().contains("no rule"), "{reply}");

    pg.exec("INSERT INTO messages VALUES (1, 'p1', 'for p1'), (2, 'p2', 'for p2'), (3, 'p1', 'again p1')")
        .await;
    let p1: Vec<i64> = clients[0]
        .changes(2, DEADLINE)
        .await
        .iter()
        .map(|c| c["data"]["record"]["id"].as_i64().unwrap())
        .collect();
    let p2: Vec<i64> = clients[1]
        .changes(1, DEADLINE)
        .await
        .iter()
        .map(|c| c["data"]["record"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!((p1, p2), (vec![1, 3], vec![2]));
    for client in clients.iter_mut() {
        client.expect_no_change(Duration::from_millis(400)).await;
    }

    // Reassigning a row makes it visible to its new owner only.
    pg.exec("UPDATE messages SET patient_id = 'p2' WHERE id = 3").await;
    let got = clients[1].changes(1, DEADLINE).await;
    assert_eq!(got[0]["data"]["record"]["id"], 3);
    clients[0].expect_no_change(Duration::from_millis(400)).await;

    // A deleted row cannot be checked any more: DELETEs carry the primary key only.
    pg.exec("DELETE FROM messages WHERE id = 2").await;
    let deleted = clients[1].changes(1, DEADLINE).await;
    assert_eq!(deleted[0]["data"]["old_record"], json!({"id": 2}));

    // Cost of the check, for the notes: one query per change for all candidates.
    let (_, metrics) = http_get(&format!("http://{}/metrics", server.addr)).await.unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let (sum, count) = (value("pgcast_rls_check_seconds_sum"), value("pgcast_rls_check_seconds_count"));
    assert!(count >= 4.0, "one check per INSERT/UPDATE change: {metrics}");
    println!("RLS check: {count} changes, mean {:.3} ms per change", sum / count * 1000.0);
}

/// Not a pass/fail test: measures RLS mode against the same rule evaluated in-process, for the
/// notes. Run with `cargo test --test rls -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn rls_cost_compared_with_in_process_policy() {
    const PATIENTS: usize = 20;
    const ROWS: usize = 400;
    let in_process = r#"
[tables.messages]
[[tables.messages.allow]]
role = "authenticated"
when = "patient_id = claims.sub"
"#;
    for (mode, policy) in [("rls", POLICY), ("in-process", in_process)] {
        let pg = Pg::start(&format!("rlscost-{mode}")).await;
        pg.publish(SCHEMA, &["messages"]).await;
        let dir = test_dir("rlscost-policy");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("policy.toml"), policy).unwrap();
        let mut config = config(&pg);
        config.policy = Some(dir.join("policy.toml"));
        let server = start_server(config).await;
        let mut clients = Vec::new();
        for i in 0..PATIENTS {
            let mut client = Client::connect(server.addr, None, true).await;
            let reply = client
                .join("realtime:m", json!([binding("*", "messages", None)]), Some(&patient(&format!("p{i}"))))
                .await;
            assert_eq!(reply["status"], "ok");
            clients.push(client);
        }
        let started = std::time::Instant::now();
        pg.exec(&format!(
            "INSERT INTO messages SELECT g, 'p' || (g % {PATIENTS}), 'x' FROM generate_series(1, {ROWS}) g"
        ))
        .await;
        let mut total = 0;
        for client in clients.iter_mut() {
            total += client.changes(ROWS / PATIENTS, Duration::from_secs(60)).await.len();
        }
        let elapsed = started.elapsed();
        assert_eq!(total, ROWS);
        println!(
            "{mode}: {ROWS} changes x {PATIENTS} candidate subscribers, all delivered in {:.1} ms = {:.3} ms per change",
            elapsed.as_secs_f64() * 1000.0,
            elapsed.as_secs_f64() * 1000.0 / ROWS as f64
        );
    }
}
