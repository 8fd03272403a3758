//! The load the bench drives into the system: commits into PostgreSQL at a chosen rate, one
//! large transaction, and broadcasts on a topic at a chosen rate (over a WebSocket push or the
//! REST endpoint). Every row and broadcast carries `sent_at_us`, the bench's clock just before
//! it was sent, which clients compare with their clock on arrival (same machine, same clock).
//!
//! Senders follow a fixed schedule (message n is due at start + n / rate); when they fall
//! behind they send what is due at once rather than silently lowering the rate, and the
//! achieved rate is reported. This module measures nothing on the receiving side.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, now_us};
use crate::http::HttpConnection;

/// Error texts kept per driver.
const MAX_ERROR_SAMPLES: usize = 5;

#[derive(Debug, Default)]
pub struct Sent {
    /// Commits (or broadcasts) that succeeded.
    pub sent: u64,
    /// Rows in those commits.
    pub rows: u64,
    pub errors: u64,
    pub error_samples: BTreeMap<String, u64>,
    /// Rows committed per user id (index), for the own-rows expectation.
    pub rows_per_user: Vec<u64>,
    pub started_us: u64,
    pub ended_us: u64,
}

impl Sent {
    pub fn secs(&self) -> f64 {
        self.ended_us.saturating_sub(self.started_us) as f64 / 1e6
    }

    fn error(&mut self, text: String) {
        self.errors += 1;
        if self.error_samples.len() < MAX_ERROR_SAMPLES || self.error_samples.contains_key(&text) {
            *self.error_samples.entry(text).or_insert(0) += 1;
        }
    }
}

async fn connect_db(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.context("connecting to PostgreSQL")?;
    tokio::spawn(connection);
    Ok(client)
}

/// Inserts `$5` rows whose user ids continue a global row counter `$1` modulo `$4` users.
const INSERT: &str = "INSERT INTO public.bench_rows (user_id, sent_at_us, body) \
     SELECT ($1::bigint + g) % $4::bigint, $2::bigint, $3::text FROM generate_series(0, $5::int - 1) g";

#[derive(Debug, Clone)]
pub struct CommitPlan {
    pub rate: f64,
    pub duration: Duration,
    pub rows_per_commit: u32,
    /// Own-rows subscribers: row n belongs to user n % users.
    pub users: u64,
    pub writers: usize,
    pub body: String,
}

/// Commits at `plan.rate` for `plan.duration`, each an autocommit INSERT stamped just before
/// it is sent, spread over `plan.writers` connections.
pub async fn drive_commits(database_url: &str, plan: &CommitPlan) -> anyhow::Result<Sent> {
    let total = (plan.rate * plan.duration.as_secs_f64()).round() as u64;
    let users = plan.users.max(1);
    let rows_per_user: Arc<Vec<AtomicU64>> = Arc::new((0..users).map(|_| AtomicU64::new(0)).collect());
    let next = Arc::new(AtomicU64::new(0));
    let outcome = Arc::new(Mutex::new(Sent::default()));
    let start = Instant::now() + Duration::from_millis(50);
    let started_us = now_us() + 50_000;
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..plan.writers.max(1) {
        let client = connect_db(database_url).await?;
        let statement = client.prepare(INSERT).await.context("preparing the bench INSERT")?;
        let (next, outcome, rows_per_user, plan) =
            (next.clone(), outcome.clone(), rows_per_user.clone(), plan.clone());
        writers.spawn(async move {
            let rpc = plan.rows_per_commit.max(1);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 / plan.rate)).await;
                let first_row = (n * u64::from(rpc)) as i64;
                let sent = now_us() as i64;
                let result = client
                    .execute(&statement, &[&first_row, &sent, &plan.body, &(users as i64), &(rpc as i32)])
                    .await;
                let mut outcome = outcome.lock().unwrap_or_else(|p| p.into_inner());
                match result {
                    Ok(rows) => {
                        outcome.sent += 1;
                        outcome.rows += rows;
                        for row in 0..u64::from(rpc) {
                            let user = (first_row as u64 + row) % users;
                            rows_per_user[user as usize].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => outcome.error(format!("commit failed: {e}")),
                }
            }
        });
    }
    while writers.join_next().await.is_some() {}
    let mut sent = std::mem::take(&mut *outcome.lock().unwrap_or_else(|p| p.into_inner()));
    sent.started_us = started_us;
    sent.ended_us = now_us();
    sent.rows_per_user = rows_per_user.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    Ok(sent)
}

/// One transaction of `rows` rows, all stamped before the INSERT.
#[derive(Debug, Default)]
pub struct Burst {
    pub sent: Sent,
    /// Before the INSERT (the rows' `sent_at_us`), before COMMIT, after COMMIT returned.
    pub insert_started_us: u64,
    pub commit_sent_us: u64,
    pub commit_done_us: u64,
}

pub async fn drive_burst(database_url: &str, rows: u32, users: u64, body: &str) -> anyhow::Result<Burst> {
    let users = users.max(1);
    let client = connect_db(database_url).await?;
    let statement = client.prepare(INSERT).await.context("preparing the bench INSERT")?;
    client.batch_execute("BEGIN").await?;
    let insert_started_us = now_us();
    let inserted = client
        .execute(&statement, &[&0i64, &(insert_started_us as i64), &body, &(users as i64), &(rows as i32)])
        .await
        .context("inserting the burst")?;
    let commit_sent_us = now_us();
    client.batch_execute("COMMIT").await.context("committing the burst")?;
    let commit_done_us = now_us();
    let mut rows_per_user = vec![0u64; users as usize];
    for row in 0..u64::from(rows) {
        rows_per_user[(row % users) as usize] += 1;
    }
    Ok(Burst {
        sent: Sent {
            sent: 1,
            rows: inserted,
            rows_per_user,
            started_us: insert_started_us,
            ended_us: commit_done_us,
            ..Default::default()
        },
        insert_started_us,
        commit_sent_us,
        commit_done_us,
    })
}

/// How broadcasts reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// A `broadcast` push from a client that joined the topic (ack off, self off).
    Ws,
    /// `POST /api/broadcast` with a service_role token, due messages batched per request.
    Rest,
}

#[derive(Debug, Clone)]
pub struct BroadcastPlan {
    pub rate: f64,
    pub duration: Duration,
    pub topic: String,
    pub via: Via,
    pub body: String,
}

fn broadcast_payload(seq: u64, body: &str) -> Value {
    json!({"sent_at_us": now_us(), "seq": seq, "body": body})
}

/// Sends broadcasts on `plan.topic` at `plan.rate` for `plan.duration`.
pub async fn drive_broadcasts(server: SocketAddr, token: &str, plan: &BroadcastPlan) -> anyhow::Result<Sent> {
    let total = (plan.rate * plan.duration.as_secs_f64()).round() as u64;
    let mut outcome = Sent::default();
    let topic = format!("realtime:{}", plan.topic);
    let mut sender = match plan.via {
        Via::Ws => {
            let mut ws = client::open(client::Protocol::Phoenix, None, server, token)
                .await
                .map_err(anyhow::Error::msg)?;
            let (join_topic, payload) = client::join_frame(client::Shape::Broadcast, 0, &plan.topic)
                .context("broadcast join frame")?;
            ws.send(Message::Text(json!(["1", "1", join_topic, "phx_join", payload]).to_string().into()))
                .await?;
            // Wait for the join reply before sending.
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let frame = tokio::time::timeout_at(deadline, ws.next())
                    .await
                    .context("no join reply for the broadcast sender")?
                    .context("broadcast sender connection closed")??;
                if let Message::Text(text) = frame {
                    let value: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                    if value[3] == "phx_reply" && value[1] == "1" {
                        if value[4]["status"] != "ok" {
                            anyhow::bail!("broadcast sender's join was refused: {}", value[4]);
                        }
                        break;
                    }
                }
            }
            let (sink, mut stream) = ws.split();
            // Error replies (rate limits, refusals) come back on the same socket.
            let replies = Arc::new(Mutex::new(Vec::<String>::new()));
            let seen = replies.clone();
            tokio::spawn(async move {
                while let Some(Ok(frame)) = stream.next().await {
                    if let Message::Text(text) = frame {
                        if text.contains("\"error\"") {
                            seen.lock().unwrap_or_else(|p| p.into_inner()).push(text.to_string());
                        }
                    }
                }
            });
            Sender::Ws { sink, replies }
        }
        Via::Rest => Sender::Rest(HttpConnection::open(server).await?),
    };
    let start = Instant::now() + Duration::from_millis(50);
    outcome.started_us = now_us() + 50_000;
    let mut n = 0u64;
    while n < total {
        let due = ((start.elapsed().as_secs_f64() * plan.rate).floor() as u64 + 1).min(total);
        if Instant::now() < start || n >= due {
            tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 / plan.rate)).await;
            continue;
        }
        let batch: Vec<Value> = (n..due).map(|seq| broadcast_payload(seq, &plan.body)).collect();
        let count = batch.len() as u64;
        n = due;
        match sender.send(&topic, &plan.topic, token, batch).await {
            Ok(()) => outcome.sent += count,
            Err(e) => {
                for _ in 0..count {
                    outcome.error(format!("broadcast not sent: {e:#}"));
                }
            }
        }
    }
    outcome.ended_us = now_us();
    if let Sender::Ws { mut sink, replies } = sender {
        // Let error replies to the last pushes arrive.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = sink.close().await;
        let replies = std::mem::take(&mut *replies.lock().unwrap_or_else(|p| p.into_inner()));
        for reply in replies {
            outcome.sent = outcome.sent.saturating_sub(1);
            outcome.error(format!("broadcast refused: {reply}"));
        }
    }
    Ok(outcome)
}

type WsSink =
    futures_util::stream::SplitSink<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, Message>;

enum Sender {
    Ws { sink: WsSink, replies: Arc<Mutex<Vec<String>>> },
    Rest(HttpConnection),
}

impl Sender {
    async fn send(
        &mut self,
        topic: &str,
        sub_topic: &str,
        token: &str,
        payloads: Vec<Value>,
    ) -> anyhow::Result<()> {
        match self {
            Sender::Ws { sink, .. } => {
                for (i, payload) in payloads.into_iter().enumerate() {
                    let frame = json!([
                        "1",
                        format!("b{i}"),
                        topic,
                        "broadcast",
                        {"type": "broadcast", "event": "bench", "payload": payload}
                    ]);
                    sink.feed(Message::Text(frame.to_string().into())).await?;
                }
                sink.flush().await?;
                Ok(())
            }
            Sender::Rest(http) => {
                let messages: Vec<Value> = payloads
                    .into_iter()
                    .map(|payload| json!({"topic": sub_topic, "event": "bench", "payload": payload}))
                    .collect();
                let body = json!({ "messages": messages }).to_string();
                let auth = format!("Bearer {token}");
                let headers = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
                let (status, answer) =
                    http.request("POST", "/api/broadcast", &headers, body.as_bytes()).await?;
                if status != 202 {
                    anyhow::bail!("REST broadcast answered {status}: {answer}");
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_insert_names_the_bench_table() {
        use crate::client::TABLE;
        assert!(INSERT.contains(TABLE));
    }
}
