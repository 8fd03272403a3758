//! Every supported type, NULLs, TOAST, wide rows, replica identities, DELETE and TRUNCATE, checked
//! end to end: the `record` a client receives must equal what PostgreSQL's own `to_jsonb` renders.

mod common;

use std::time::Duration;

use futures_util::StreamExt;

use common::*;
use serde_json::{json, Value};

const SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('calm', 'anxious');
CREATE TABLE everything (
    id bigserial PRIMARY KEY,
    small int2, normal int4, big int8, exact numeric, approx float8, flag bool,
    label text, name varchar(20), ident uuid, at timestamptz, local_at timestamp, day date,
    doc json, docb jsonb, ints int4[], texts text[], feeling mood, amount numeric(10,2)
);
CREATE TABLE edges (
    id int8 PRIMARY KEY, at timestamptz, local_at timestamp, day date, approx float8, single float4,
    clock timetz, span interval, ats timestamptz[]
);
CREATE TABLE notes (id int PRIMARY KEY, title text, body text);
CREATE TABLE notes_full (id int PRIMARY KEY, title text, body text);
ALTER TABLE notes_full REPLICA IDENTITY FULL;
ALTER TABLE notes ALTER COLUMN body SET STORAGE EXTERNAL;
ALTER TABLE notes_full ALTER COLUMN body SET STORAGE EXTERNAL;
";

async fn setup(name: &str) -> (Pg, pgcast::server::RunningServer, Client) {
    let pg = Pg::start(name).await;
    pg.publish(SCHEMA, &["everything", "edges", "notes", "notes_full"]).await;
    let server = start_server(config(&pg)).await;
    let mut client = Client::connect(server.addr, Some(&token("service_role", 600)), true).await;
    let reply = client
        .join(
            "realtime:all",
            json!([
                binding("*", "everything", None),
                binding("*", "edges", None),
                binding("*", "notes", None),
                binding("*", "notes_full", None)
            ]),
            None,
        )
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    (pg, server, client)
}

async fn to_jsonb(pg: &Pg, table: &str, id: i64) -> Value {
    let row = pg
        .client()
        .await
        .query_one(&format!("SELECT to_jsonb(t)::text FROM {table} t WHERE id = $1"), &[&id])
        .await
        .expect("to_jsonb");
    serde_json::from_str(&row.get::<_, String>(0)).expect("json")
}

async fn one_change(client: &mut Client) -> Value {
    let changes = client.changes(1, DEADLINE).await;
    assert_eq!(changes.len(), 1, "expected one change");
    changes[0]["data"].clone()
}

#[tokio::test]
async fn every_type_renders_like_to_jsonb() {
    let (pg, _server, mut client) = setup("types").await;
    pg.exec(
        "INSERT INTO everything (small, normal, big, exact, approx, flag, label, name, ident, at, local_at, day,
                                 doc, docb, ints, texts, feeling, amount)
         VALUES (-3, 2147483647, 9007199254740993, 12345678901234567890.123456789, 1.5e-7, true,
                 E'quote \" backslash \\\\ newline \\n tab \\t unicode é', 'short',
                 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '2024-05-01 09:30:00.123456+02', '2024-05-01 09:30:00',
                 '2024-05-01', '{\"b\": [1, 2], \"a\": null}', '{\"b\": [1, 2], \"a\": null}',
                 '{1,NULL,3}', '{\"a b\",\"c,d\",NULL,\"\"}', 'anxious', 12.5)",
    )
    .await;
    let data = one_change(&mut client).await;
    assert_eq!(data["type"], "INSERT");
    assert_eq!(data["record"], to_jsonb(&pg, "everything", 1).await);
    let types: Vec<&str> =
        data["columns"].as_array().unwrap().iter().map(|c| c["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "int8",
            "int2",
            "int4",
            "int8",
            "numeric",
            "float8",
            "bool",
            "text",
            "varchar",
            "uuid",
            "timestamptz",
            "timestamp",
            "date",
            "json",
            "jsonb",
            "_int4",
            "_text",
            "mood",
            "numeric"
        ]
    );
    assert!(data["commit_timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(data["errors"], Value::Null);

    // All NULLs, and the special float/numeric values.
    pg.exec("INSERT INTO everything (id) VALUES (2)").await;
    assert_eq!(one_change(&mut client).await["record"], to_jsonb(&pg, "everything", 2).await);
    pg.exec("INSERT INTO everything (id, exact, approx) VALUES (3, 'NaN', '-Infinity')").await;
    assert_eq!(one_change(&mut client).await["record"], to_jsonb(&pg, "everything", 3).await);
}

/// The text of the number a message's `record` carries under `key` (numbers hold no `,` or `}`).
fn raw_number<'a>(message: &'a str, key: &str) -> &'a str {
    let record = &message[message.find("\"record\":").expect("a record")..];
    let at =
        record.find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("{key} in {record}")) + key.len() + 3;
    let end = record[at..].find([',', '}']).expect("end of number");
    &record[at..at + end]
}

#[tokio::test]
async fn edge_values_render_exactly_like_to_jsonb() {
    let (pg, _server, mut client) = setup("edges").await;
    let rows = [
        "(1, '4713-01-01 00:00:00+00 BC', '4713-01-01 00:00:00 BC', '4713-01-01 BC', 1e300, 3.4e38,
          '24:00:00-15:59', '1 year 2 mons -3 days 04:05:06.5', '{\"0044-03-15 12:00:00+00 BC\",infinity}')",
        "(2, '294276-12-31 23:59:59.999999+00', '294276-12-31 23:59:59.999999', '5874897-12-31', 1.5e-7, 1e-45,
          '00:00+00', '-178000000 years', '{}')",
        "(3, 'infinity', '-infinity', 'infinity', '-0', 'NaN', '12:34:56.5+05:30', '0', NULL)",
        "(4, '-infinity', 'infinity', '-infinity', 0.30000000000000004, '-Infinity', NULL, NULL,
          '{\"1999-12-31 23:59:59.5+00\"}')",
        "(5, '0001-01-01 00:00:00+00', '0001-12-31 23:59:59 BC', '0001-01-01 BC', 1.2345678901234568e17, 1.1,
          NULL, NULL, NULL)",
    ];
    for (i, row) in rows.iter().enumerate() {
        pg.exec(&format!("INSERT INTO edges VALUES {row}")).await;
        let (text, message) = loop {
            let frame = tokio::time::timeout(DEADLINE, client.ws.next()).await.expect("a change in time");
            if let tokio_tungstenite::tungstenite::Message::Text(text) =
                frame.expect("a frame").expect("a message")
            {
                let message: Value = serde_json::from_str(&text).unwrap();
                if message[3] == "postgres_changes" {
                    break (text.to_string(), message);
                }
            }
        };
        let id = i as i64 + 1;
        let expected = to_jsonb(&pg, "edges", id).await;
        assert_eq!(message[4]["data"]["record"], expected, "row {id}");
        // Equal as JSON values is not enough for numbers: the digits must be to_jsonb's too.
        for column in ["approx", "single"] {
            let sql = format!("SELECT to_jsonb({column})::text FROM edges WHERE id = $1");
            let want: String = pg.client().await.query_one(&sql, &[&id]).await.unwrap().get(0);
            assert_eq!(raw_number(&text, column), want, "row {id}, {column}");
        }
    }
}

#[tokio::test]
async fn wide_rows_and_unchanged_toast_values() {
    if replication_only("wide_rows_and_unchanged_toast_values") {
        return;
    }
    let (pg, _server, mut client) = setup("toast").await;
    // 20 kB of text stored out of line (STORAGE EXTERNAL), so PostgreSQL TOASTs it.
    let body: String = (0..20_000).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
    for table in ["notes", "notes_full"] {
        pg.exec(&format!("INSERT INTO {table} VALUES (1, 'first', '{body}')")).await;
        let insert = one_change(&mut client).await;
        assert_eq!(
            insert["record"]["body"].as_str().map(str::len),
            Some(20_000),
            "{table}: wide row in full"
        );

        pg.exec(&format!("UPDATE {table} SET title = 'second' WHERE id = 1")).await;
        let update = one_change(&mut client).await;
        assert_eq!(update["type"], "UPDATE");
        assert_eq!(update["record"]["title"], "second");
        if table == "notes" {
            // REPLICA IDENTITY DEFAULT: the unchanged TOAST value is not re-sent; it is named,
            // not rendered as garbage, and the old record is the key.
            assert_eq!(update["record"].get("body"), None, "{update}");
            assert_eq!(update["unchanged_toast"], json!(["body"]));
            assert_eq!(update["old_record"], json!({"id": 1}));
        } else {
            // REPLICA IDENTITY FULL: the old row carries the value, so the new record is whole.
            assert_eq!(update["record"]["body"].as_str().map(str::len), Some(20_000));
            assert_eq!(update["old_record"]["title"], "first");
            assert_eq!(update.get("unchanged_toast"), None);
        }
    }
}

#[tokio::test]
async fn delete_with_each_replica_identity() {
    if replication_only("delete_with_each_replica_identity") {
        return;
    }
    let (pg, _server, mut client) = setup("delete").await;
    pg.exec("INSERT INTO notes VALUES (1, 't', 'b'); INSERT INTO notes_full VALUES (1, 't', 'b')").await;
    client.changes(2, DEADLINE).await;

    pg.exec("DELETE FROM notes WHERE id = 1").await;
    let delete = one_change(&mut client).await;
    assert_eq!(delete["type"], "DELETE");
    assert_eq!(delete["old_record"], json!({"id": 1}));
    assert_eq!(delete.get("record"), None);

    pg.exec("DELETE FROM notes_full WHERE id = 1").await;
    assert_eq!(one_change(&mut client).await["old_record"], json!({"id": 1, "title": "t", "body": "b"}));

    // UPDATE that changes the key with DEFAULT identity: the old key is reported.
    pg.exec("INSERT INTO notes VALUES (5, 't', 'b')").await;
    client.changes(1, DEADLINE).await;
    pg.exec("UPDATE notes SET id = 6 WHERE id = 5").await;
    let moved = one_change(&mut client).await;
    assert_eq!((moved["old_record"].clone(), moved["record"]["id"].clone()), (json!({"id": 5}), json!(6)));
}

#[tokio::test]
async fn truncate_reaches_only_bindings_that_ask_for_it() {
    let (pg, _server, mut client) = setup("truncate").await;
    // TRUNCATE reaches only a binding that asks for it: Supabase never sends it to `*`.
    let reply = client.join("realtime:truncations", json!([binding("TRUNCATE", "notes", None)]), None).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let reply =
        client.join("realtime:bad", json!([binding("TRUNCATE", "notes", Some("id=eq.1"))]), None).await;
    assert_eq!(
        reply["response"]["reason"],
        "a TRUNCATE binding takes no filter: a truncation has no row to test"
    );
    pg.exec("TRUNCATE notes; INSERT INTO notes VALUES (7, 't', 'b')").await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let message = client.expect("a change", |v| v["event"] == "postgres_changes").await;
        let data = &message["payload"]["data"];
        seen.push((message["topic"].clone(), data["type"].clone(), data["table"].clone()));
    }
    assert_eq!(
        seen,
        [
            (json!("realtime:truncations"), json!("TRUNCATE"), json!("notes")),
            (json!("realtime:all"), json!("INSERT"), json!("notes")),
        ],
        "the `*` binding got the insert after the truncation, and not the truncation"
    );
}

#[tokio::test]
async fn one_transaction_arrives_in_commit_order() {
    let (pg, _server, mut client) = setup("order").await;
    pg.exec(
        "BEGIN; INSERT INTO notes VALUES (1, 'a', 'x'); UPDATE notes SET title = 'b' WHERE id = 1;
         INSERT INTO notes VALUES (2, 'c', 'y'); DELETE FROM notes WHERE id = 1; COMMIT;",
    )
    .await;
    let changes = client.changes(4, DEADLINE).await;
    let kinds: Vec<&str> = changes.iter().map(|c| c["data"]["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["INSERT", "UPDATE", "INSERT", "DELETE"]);
    client.expect_no_change(Duration::from_millis(300)).await;
}
