//! Test harness: a private PostgreSQL per test, a pgcast server in-process (or as a child
//! process), tokens, and a raw WebSocket client that waits on conditions with deadlines.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
pub use pgcast::config::CaptureMode;
use pgcast::config::{Config, ConfigOverrides};
use pgcast::local_postgres::LocalPostgres;
use pgcast::server::RunningServer;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-0123456789abcdef";
pub const DEADLINE: Duration = Duration::from_secs(15);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A free TCP port on loopback (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

pub fn test_dir(name: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("pgcast-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

pub fn token(role: &str, ttl_secs: i64) -> String {
    token_with(json!({ "role": role }), ttl_secs)
}

pub fn token_with(mut claims: Value, ttl_secs: i64) -> String {
    claims["exp"] = json!(pgcast::auth::now_secs() as i64 + ttl_secs);
    pgcast::auth::sign(SECRET, &claims).expect("sign")
}

/// A PostgreSQL cluster for one test, removed when dropped.
pub struct Pg {
    pub cluster: LocalPostgres,
    dir: PathBuf,
}

impl Pg {
    pub async fn start(name: &str) -> Pg {
        let dir = test_dir(name);
        let cluster = LocalPostgres::start(&dir, free_port()).await.expect("start PostgreSQL");
        Pg { cluster, dir }
    }

    pub fn url(&self) -> String {
        self.cluster.url()
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client.batch_execute("SET TimeZone = 'UTC'").await.expect("set tz");
        client
    }

    pub async fn exec(&self, sql: &str) {
        self.client().await.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// Creates the tables and captures them in the suite's capture mode ([`capture_mode`]): in
    /// publication `pgcast`, or with the outbox trigger.
    pub async fn publish(&self, schema_sql: &str, tables: &[&str]) {
        self.exec(schema_sql).await;
        let db = pgcast::db::Db::new(&self.url());
        match capture_mode() {
            CaptureMode::Replication => {
                pgcast::capture::publication::ensure_publication(&db, "pgcast").await.expect("publication");
                for table in tables {
                    pgcast::capture::publication::add_table(&db, "pgcast", table).await.expect("add table");
                }
            }
            CaptureMode::Trigger => {
                for table in tables {
                    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
                    pgcast::capture::outbox::add_table(&db, schema, name).await.expect("install trigger");
                }
            }
        }
    }
}

/// Session panics a test expects (only `session_panics` expects any): every other test fails
/// if a session of its server panicked, even though the server caught it.
static EXPECTED_SESSION_PANICS: AtomicU32 = AtomicU32::new(0);

pub fn expect_session_panics(count: u32) {
    EXPECTED_SESSION_PANICS.store(count, Ordering::Relaxed);
}

impl Drop for Pg {
    fn drop(&mut self) {
        let caught = pgcast::session::supervise::panics_caught();
        let expected = u64::from(EXPECTED_SESSION_PANICS.load(Ordering::Relaxed));
        if caught > expected && !std::thread::panicking() {
            panic!("{caught} session(s) panicked during this test (see the `session panicked` log lines)");
        }
        let dir = self.dir.clone();
        // Give the postmaster a moment to exit before its files go.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            let _ = std::fs::remove_dir_all(dir);
        });
    }
}

/// The capture mode the suite runs in: `PGCAST_TEST_CAPTURE=trigger` runs the mode-independent
/// tests again over the outbox trigger (scripts/test.sh does both passes).
pub fn capture_mode() -> CaptureMode {
    match std::env::var("PGCAST_TEST_CAPTURE").as_deref() {
        Ok("trigger") => CaptureMode::Trigger,
        Ok("replication") | Err(_) => CaptureMode::Replication,
        Ok(other) => panic!("PGCAST_TEST_CAPTURE={other:?}: expected replication or trigger"),
    }
}

/// `PGCAST_CAPTURE` for a server started as a child process.
pub fn capture_name() -> &'static str {
    match capture_mode() {
        CaptureMode::Replication => "replication",
        CaptureMode::Trigger => "trigger",
    }
}

/// For tests of replication-only machinery (slots, replica identity, TOAST): true, with a note
/// on stderr, when the suite runs in trigger mode, so the test returns early.
pub fn replication_only(test: &str) -> bool {
    let skip = capture_mode() != CaptureMode::Replication;
    if skip {
        eprintln!("{test}: replication-only, skipped in trigger mode");
    }
    skip
}

pub fn config(pg: &Pg) -> Config {
    let mut config = Config::load(
        None,
        ConfigOverrides {
            database_url: Some(pg.url()),
            listen: Some("127.0.0.1:0".into()),
            jwt_secret: Some(SECRET.into()),
            ..Default::default()
        },
    )
    .expect("config");
    config.capture = capture_mode();
    config
}

/// A private PostgreSQL with `schema_sql` run and `tables` published, and a server on the test
/// configuration as `tune` leaves it.
pub async fn start_with(
    name: &str,
    schema_sql: &str,
    tables: &[&str],
    tune: impl FnOnce(&mut Config),
) -> (Pg, RunningServer) {
    let pg = Pg::start(name).await;
    pg.publish(schema_sql, tables).await;
    let mut config = config(&pg);
    tune(&mut config);
    (pg, start_server(config).await)
}

/// `pgcast serve` as a child process (the binary these tests were built with) on `port`, for
/// tests that kill, restart or read the logs of a real process: the suite's capture mode,
/// warnings only, killed when dropped. Callers add or override settings before `spawn()`
/// (`.env("PGCAST_LOG", "debug")`, `.env("PGCAST_CONFIG", path)`, `.stderr(...)`).
pub fn serve_command(database_url: &str, port: u16) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgcast"));
    command
        .arg("serve")
        .env("PGCAST_DATABASE_URL", database_url)
        .env("PGCAST_LISTEN", format!("127.0.0.1:{port}"))
        .env("PGCAST_JWT_SECRET", SECRET)
        .env("PGCAST_CAPTURE", capture_name())
        .env("PGCAST_LOG", "warn")
        .kill_on_drop(true);
    command
}

pub async fn start_server(config: Config) -> RunningServer {
    let server = pgcast::server::start(config).await.expect("start server");
    wait_ready(&format!("http://{}", server.addr)).await;
    server
}

/// Polls `/ready` until it answers 200.
pub async fn wait_ready(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if http_get(&format!("{base}/ready")).await.map(|(status, _)| status == 200).unwrap_or(false) {
            return;
        }
        assert!(Instant::now() < deadline, "server at {base} never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A minimal HTTP/1.1 GET (status, body) so tests need no HTTP client crate.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut stream = TcpStream::connect(host).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// One unlabelled value from the server's `/metrics` on `port` (0 if absent or unreachable).
pub async fn metric(port: u16, name: &str) -> f64 {
    let (_, body) = http_get(&format!("http://127.0.0.1:{port}/metrics")).await.unwrap_or_default();
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A raw Phoenix client speaking vsn 1.0.0 (JSON objects) unless `v2`.
pub struct Client {
    pub ws: Ws,
    pub v2: bool,
    next_ref: u32,
}

impl Client {
    pub async fn connect(addr: std::net::SocketAddr, apikey: Option<&str>, v2: bool) -> Client {
        let vsn = if v2 { "2.0.0" } else { "1.0.0" };
        let mut url = format!("ws://{addr}/realtime/v1/websocket?vsn={vsn}");
        if let Some(key) = apikey {
            url.push_str(&format!("&apikey={key}"));
        }
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("websocket connect");
        Client { ws, v2, next_ref: 0 }
    }

    pub fn from_ws(ws: Ws, v2: bool) -> Client {
        Client { ws, v2, next_ref: 0 }
    }

    /// Like [`Client::connect`] but with a tiny kernel receive buffer, so a client that stops
    /// reading backs up into the server quickly (as a stalled phone would).
    pub async fn connect_small_buffer(addr: std::net::SocketAddr, apikey: &str) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("tcp connect");
        let url = format!("ws://{addr}/realtime/v1/websocket?vsn=2.0.0&apikey={apikey}");
        let (ws, _) =
            tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await.expect("handshake");
        Client { ws, v2: true, next_ref: 0 }
    }

    /// Sends a frame and returns its ref.
    pub async fn push(&mut self, topic: &str, event: &str, payload: Value) -> String {
        self.next_ref += 1;
        let r = self.next_ref.to_string();
        let frame = if self.v2 {
            json!([r, r, topic, event, payload])
        } else {
            json!({"topic": topic, "event": event, "payload": payload, "ref": r, "join_ref": r})
        };
        self.send_raw(&frame.to_string()).await;
        r
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).await.expect("send");
    }

    /// Next text frame as `{topic, event, payload, ref}` whatever the serializer.
    pub async fn next(&mut self, within: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()??.ok()?;
            match msg {
                Message::Text(text) => {
                    let v: Value = serde_json::from_str(text.as_str()).expect("server sent valid JSON");
                    return Some(if self.v2 {
                        json!({"join_ref": v[0], "ref": v[1], "topic": v[2], "event": v[3], "payload": v[4]})
                    } else {
                        v
                    });
                }
                Message::Close(frame) => {
                    return Some(json!({
                        "event": "__close",
                        "code": frame.as_ref().map(|f| u16::from(f.code)),
                        "reason": frame.as_ref().map(|f| f.reason.to_string()),
                    }))
                }
                _ => continue,
            }
        }
    }

    /// Waits for a frame satisfying `pred`, skipping others; panics at the deadline.
    pub async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + DEADLINE;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match self.next(deadline - Instant::now()).await {
                Some(v) if pred(&v) => return v,
                Some(v) => seen.push(v),
                None => break,
            }
        }
        panic!("never received {what}; got {seen:#?}");
    }

    /// Waits for the reply to `msg_ref`.
    pub async fn reply(&mut self, msg_ref: &str) -> Value {
        self.expect(&format!("reply to {msg_ref}"), |v| v["event"] == "phx_reply" && v["ref"] == msg_ref)
            .await
    }

    /// Joins `topic` with postgres_changes bindings and returns the reply payload.
    pub async fn join(&mut self, topic: &str, bindings: Value, access_token: Option<&str>) -> Value {
        let mut payload = json!({
            "config": {"broadcast": {"ack": false, "self": false}, "presence": {"key": ""}, "postgres_changes": bindings, "private": false}
        });
        if let Some(token) = access_token {
            payload["access_token"] = json!(token);
        }
        let r = self.push(topic, "phx_join", payload).await;
        self.reply(&r).await["payload"].clone()
    }

    /// Collects postgres_changes `data` objects until `count` arrived or `within` passed.
    pub async fn changes(&mut self, count: usize, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < count && Instant::now() < deadline {
            match self.next(deadline - Instant::now()).await {
                Some(v) if v["event"] == "postgres_changes" => out.push(v["payload"].clone()),
                Some(_) => {}
                None => break,
            }
        }
        out
    }

    /// Asserts that no postgres_changes arrives within `quiet`.
    pub async fn expect_no_change(&mut self, quiet: Duration) {
        let got = self.changes(1, quiet).await;
        assert!(got.is_empty(), "expected no change, got {got:#?}");
    }
}

/// A binding in realtime-js's shape.
pub fn binding(event: &str, table: &str, filter: Option<&str>) -> Value {
    let mut b = json!({"event": event, "schema": "public", "table": table});
    if let Some(f) = filter {
        b["filter"] = json!(f);
    }
    b
}
