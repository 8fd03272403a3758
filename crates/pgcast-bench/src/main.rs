//! `pgcast-bench`: the project's load generator. It opens many WebSocket clients speaking the
//! Supabase Realtime protocol against pgcast, drives commits and broadcasts, and reports
//! connections held, server memory per connection, commit-to-client latency percentiles,
//! deliveries per second, errors and the server's CPU time, as JSON (`--out`) and a table.
//!
//! This file is the binary's edge: the command line, the scenario definitions with their
//! defaults, and turning errors into a message and an exit status (`anyhow` throughout, as a
//! binary). The hidden `worker` subcommand is how the bench re-executes itself to hold more
//! sockets than one process may open.
//!
//! It is not a correctness test of pgcast (the integration tests are) and it asserts no
//! figure; it only measures, on loopback, with bounded counts and durations.

mod client;
mod histogram;
mod http;
mod load;
mod report;
mod scenario;
mod target;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::client::Shape;
use crate::load::{CommitPlan, Via};
use crate::scenario::{Load, RunOptions, Scenario};
use crate::target::TargetOptions;
use crate::worker::Segment;

#[derive(Parser)]
#[command(name = "pgcast-bench", version, about = "Load generator and measurements for pgcast")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Memory per connection: many clients connect, join and stay idle (heartbeats only).
    IdleConnections(IdleArgs),
    /// Commit-to-client latency: commits at a fixed rate fanned out to own-rows subscribers
    /// (filter user_id=eq.<k>) plus table-wide subscribers.
    Fanout(FanoutArgs),
    /// One broadcast topic with many members; raises the broadcast rate stage by stage to find
    /// the highest delivery rate sustained without loss.
    Broadcast(BroadcastArgs),
    /// One large transaction: time until every subscriber has all of its rows.
    Burst(BurstArgs),
    /// Internal: runs a share of the clients for a coordinating pgcast-bench (JSON lines on
    /// stdin and stdout).
    #[command(hide = true)]
    Worker,
}

#[derive(Args, Clone)]
struct IdleArgs {
    /// Connections to open.
    #[arg(long, default_value_t = 19_000)]
    clients: usize,
    /// What each connection subscribes to.
    #[arg(long, value_enum, default_value = "own-rows")]
    shape: Shape,
    /// How long to hold the connections once all are joined.
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args, Clone)]
struct FanoutArgs {
    /// Own-rows subscribers (client k subscribes to user_id=eq.k).
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Table-wide subscribers (every row).
    #[arg(long, default_value_t = 100)]
    table_wide: usize,
    /// Commits per second.
    #[arg(long, default_value_t = 2_000.0)]
    rate: f64,
    #[arg(long, default_value_t = 30.0)]
    duration_secs: f64,
    #[arg(long, default_value_t = 1)]
    rows_per_commit: u32,
    /// PostgreSQL connections the commits are spread over.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args, Clone)]
struct BroadcastArgs {
    /// Members of the broadcast topic.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Broadcasts per second, one stage per value (comma-separated), each --duration-secs long.
    #[arg(long, value_delimiter = ',', default_value = "20,50,100,150,200")]
    rate: Vec<f64>,
    #[arg(long, default_value_t = 5.0)]
    duration_secs: f64,
    /// How the broadcasts are sent.
    #[arg(long, value_enum, default_value = "ws")]
    via: Via,
    /// Run every stage even after one is not sustained.
    #[arg(long)]
    keep_going: bool,
    /// A stage is sustained when nothing is missing, deliveries keep up with 95% of the offered
    /// rate, and p99 latency stays within this (a growing backlog shows here first).
    #[arg(long, default_value_t = 500.0)]
    sustain_p99_ms: f64,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args, Clone)]
struct BurstArgs {
    /// Own-rows subscribers (rows are spread over their user ids).
    #[arg(long, default_value_t = 1_000)]
    clients: usize,
    /// Table-wide subscribers (receive every row).
    #[arg(long, default_value_t = 10)]
    table_wide: usize,
    /// Rows in the one transaction.
    #[arg(long, default_value_t = 50_000)]
    rows: u32,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args, Clone)]
struct CommonArgs {
    /// Write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The pgcast binary to spawn [default: `pgcast` next to this executable].
    #[arg(long)]
    pgcast_bin: Option<PathBuf>,
    /// Use a running server (ws://host:port) instead of spawning one; needs --database-url and
    /// --jwt-secret, and --server-pid for memory and CPU figures.
    #[arg(long)]
    server_url: Option<String>,
    /// PostgreSQL the server streams from (with --server-url); the bench creates its table
    /// there and commits into it.
    #[arg(long)]
    database_url: Option<String>,
    /// Process id of the server (with --server-url), for RSS and CPU time from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// HS256 secret the server verifies tokens with (with --server-url).
    #[arg(long)]
    jwt_secret: Option<String>,
    /// Publication the bench table is added to.
    #[arg(long, default_value = "pgcast")]
    publication: String,
    /// Capture the bench table with the outbox trigger instead of logical replication.
    #[arg(long)]
    trigger_capture: bool,
    /// `outbound_queue` of the spawned server [default: the server's default].
    #[arg(long)]
    outbound_queue: Option<usize>,
    /// The protocol the clients speak: Supabase Realtime, or Socket.IO over a WebSocket (the
    /// spawned server then routes the bench table to room `bench_rows` and `subscribe:bench`).
    #[arg(long, value_enum, default_value = "phoenix")]
    protocol: crate::client::Protocol,
    /// Extra `key = value` line for the spawned server's config file (repeatable).
    #[arg(long = "server-setting")]
    server_settings: Vec<String>,
    /// PGCAST_LOG of the spawned server (its log is written to a file).
    #[arg(long, default_value = "warn")]
    server_log_level: String,
    /// Clients per process; past this the bench runs worker child processes (each process may
    /// open at most 20,000 files).
    #[arg(long, default_value_t = 18_000)]
    clients_per_process: usize,
    /// CPU niceness (1-19) of the client processes. The clients then always run in worker
    /// processes at this lower priority, standing in for clients on other machines: on one
    /// machine they otherwise take CPU from the server they measure. The coordinator (which
    /// drives PostgreSQL), PostgreSQL and the server keep normal priority.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    client_nice: i32,
    /// Client i connects from 127.0.0.(1 + i % N), so no source address runs out of ports.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=254))]
    source_ips: u8,
    /// WebSocket handshakes in flight per process.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Heartbeat period of every client (realtime-js uses 25 s).
    #[arg(long, default_value_t = 25)]
    heartbeat_secs: u64,
    /// How long to wait after a stage for deliveries still on their way.
    #[arg(long, default_value_t = 10.0)]
    drain_secs: f64,
    /// Pause after all clients joined before reading the server's RSS.
    #[arg(long, default_value_t = 2.0)]
    settle_secs: f64,
    /// Filler text in each row and broadcast.
    #[arg(long, default_value_t = 32)]
    payload_bytes: usize,
}

impl CommonArgs {
    fn options(&self) -> RunOptions {
        let mut server_config = self.server_settings.clone();
        if let Some(queue) = self.outbound_queue {
            server_config.push(format!("outbound_queue = {queue}"));
        }
        if self.protocol == crate::client::Protocol::Socketio {
            // Last: a `[[table]]` header takes every line after it.
            server_config.extend(crate::client::SOCKETIO_SERVER_CONFIG.iter().map(|l| l.to_string()));
        }
        RunOptions {
            protocol: self.protocol,
            target: TargetOptions {
                pgcast_bin: self.pgcast_bin.clone(),
                server_url: self.server_url.clone(),
                database_url: self.database_url.clone(),
                server_pid: self.server_pid,
                jwt_secret: self.jwt_secret.clone(),
                publication: self.publication.clone(),
                trigger_capture: self.trigger_capture,
                server_config,
                server_log_level: self.server_log_level.clone(),
            },
            clients_per_process: self.clients_per_process,
            client_nice: self.client_nice,
            source_ips: self.source_ips,
            connect_concurrency: self.connect_concurrency,
            heartbeat_secs: self.heartbeat_secs,
            drain_secs: self.drain_secs,
            settle_secs: self.settle_secs,
        }
    }

    fn body(&self) -> String {
        "x".repeat(self.payload_bytes)
    }

    fn parameters(&self) -> serde_json::Value {
        json!({
            "capture": if self.trigger_capture { "trigger" } else { "replication" },
            "protocol": self.protocol,
            "outbound_queue": self.outbound_queue,
            "server_settings": self.server_settings,
            "clients_per_process": self.clients_per_process,
            "client_nice": self.client_nice,
            "source_ips": self.source_ips,
            "heartbeat_secs": self.heartbeat_secs,
            "drain_secs": self.drain_secs,
            "payload_bytes": self.payload_bytes,
        })
    }
}

fn secs(value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value).with_context(|| format!("{value} is not a duration in seconds"))
}

fn scenario_of(command: &Command) -> anyhow::Result<(Scenario, &CommonArgs)> {
    Ok(match command {
        Command::IdleConnections(a) => (
            Scenario {
                name: "idle-connections",
                segments: vec![Segment { shape: a.shape, count: a.clients }],
                load: Load::Hold(secs(a.duration_secs)?),
                parameters: json!({"clients": a.clients, "shape": a.shape, "duration_secs": a.duration_secs, "common": a.common.parameters()}),
            },
            &a.common,
        ),
        Command::Fanout(a) => (
            Scenario {
                name: "fanout",
                segments: vec![
                    Segment { shape: Shape::OwnRows, count: a.clients },
                    Segment { shape: Shape::TableWide, count: a.table_wide },
                ],
                load: Load::Commits(CommitPlan {
                    rate: a.rate,
                    duration: secs(a.duration_secs)?,
                    rows_per_commit: a.rows_per_commit,
                    users: a.clients as u64,
                    writers: a.writers,
                    body: a.common.body(),
                }),
                parameters: json!({
                    "clients": a.clients, "table_wide": a.table_wide, "rate": a.rate,
                    "duration_secs": a.duration_secs, "rows_per_commit": a.rows_per_commit,
                    "writers": a.writers, "common": a.common.parameters(),
                }),
            },
            &a.common,
        ),
        Command::Broadcast(a) => (
            Scenario {
                name: "broadcast",
                segments: vec![Segment { shape: Shape::Broadcast, count: a.clients }],
                load: Load::Broadcasts {
                    rates: a.rate.clone(),
                    duration: secs(a.duration_secs)?,
                    via: a.via,
                    body: a.common.body(),
                    stop_when_unsustained: !a.keep_going,
                    sustain_p99_ms: a.sustain_p99_ms,
                },
                parameters: json!({
                    "clients": a.clients, "rates": a.rate, "duration_secs": a.duration_secs,
                    "via": a.via, "keep_going": a.keep_going, "sustain_p99_ms": a.sustain_p99_ms,
                    "common": a.common.parameters(),
                }),
            },
            &a.common,
        ),
        Command::Burst(a) => (
            Scenario {
                name: "burst",
                segments: vec![
                    Segment { shape: Shape::OwnRows, count: a.clients },
                    Segment { shape: Shape::TableWide, count: a.table_wide },
                ],
                load: Load::Burst { rows: a.rows, body: a.common.body() },
                parameters: json!({
                    "clients": a.clients, "table_wide": a.table_wide, "rows": a.rows,
                    "common": a.common.parameters(),
                }),
            },
            &a.common,
        ),
        Command::Worker => anyhow::bail!("worker is not a scenario"),
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if matches!(cli.command, Command::Worker) {
        return worker::serve_stdio().await;
    }
    let (scenario, common) = scenario_of(&cli.command)?;
    if let Load::Commits(plan) = &scenario.load {
        anyhow::ensure!(plan.rate > 0.0, "--rate must be positive");
    }
    if let Load::Broadcasts { rates, .. } = &scenario.load {
        anyhow::ensure!(rates.iter().all(|r| *r > 0.0), "--rate values must be positive");
    }
    secs(common.drain_secs).context("--drain-secs")?;
    secs(common.settle_secs).context("--settle-secs")?;
    let options = common.options();
    let out = common.out.clone();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    // On a signal the run is dropped, which stops the server, PostgreSQL and the workers.
    let report = tokio::select! {
        report = scenario::run(scenario, options) => report?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; server and workers stopped"),
        _ = terminate.recv() => anyhow::bail!("terminated; server and workers stopped"),
    };
    print!("{}", report.table());
    if let Some(path) = out {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("[pgcast-bench] report written to {}", path.display());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgcast-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
