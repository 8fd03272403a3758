//! Runs a scenario end to end: starts (or finds) the server, spreads the clients over worker
//! groups (in-process, or child processes past the per-process socket budget), reads the
//! server's memory and CPU from /proc, drives each stage's load, collects what every client
//! received, and assembles the [`Report`].
//!
//! Scenarios differ only in their client segments and their [`Load`]; the definitions with
//! their defaults live in `main.rs`. Nothing here asserts a figure: it measures and reports.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::client::Shape;
use crate::histogram::Histogram;
use crate::load::{self, BroadcastPlan, CommitPlan, Sent, Via};
use crate::report::{
    BurstTimes, ConnectionsReport, Cpu, Errors, Memory, Percentiles, Report, ServerInfo, ServerShares,
    StageReport,
};
use crate::target::{self, Target, TargetOptions};
use crate::worker::{Command, Expectation, FinalResult, Report as WorkerReport, Segment, StageResult};
use crate::worker::{WorkerHandle, WorkerSpec};

/// What a scenario does once every client is held.
#[derive(Debug, Clone)]
pub enum Load {
    /// Nothing: hold the connections this long.
    Hold(Duration),
    Commits(CommitPlan),
    /// One stage per rate (broadcasts per second), each `duration` long; stops after the first
    /// stage that is not sustained when `stop_when_unsustained`.
    Broadcasts {
        rates: Vec<f64>,
        duration: Duration,
        via: Via,
        body: String,
        stop_when_unsustained: bool,
        /// A stage whose p99 latency exceeds this is not sustained (a backlog is building).
        sustain_p99_ms: f64,
    },
    Burst {
        rows: u32,
        body: String,
    },
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub segments: Vec<Segment>,
    pub load: Load,
    pub parameters: Value,
}

/// How clients are run, independent of the scenario.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub target: TargetOptions,
    pub protocol: crate::client::Protocol,
    pub clients_per_process: usize,
    /// Niceness of the client processes; above 0 the clients run in worker processes.
    pub client_nice: i32,
    pub source_ips: u8,
    pub connect_concurrency: usize,
    pub heartbeat_secs: u64,
    pub drain_secs: f64,
    pub settle_secs: f64,
}

const BROADCAST_TOPIC: &str = "bench-broadcast";

fn log(message: impl AsRef<str>) {
    eprintln!("[pgcast-bench] {}", message.as_ref());
}

pub async fn run(scenario: Scenario, options: RunOptions) -> anyhow::Result<Report> {
    let started_at_unix = pgcast::auth::now_secs();
    log(match options.target.server_url.as_deref() {
        Some(url) => format!("{}: using the server at {url}", scenario.name),
        None => format!("{}: starting a private PostgreSQL and pgcast", scenario.name),
    });
    // Before the server is spawned, so that it inherits the raised limit too.
    target::raise_open_file_limit();
    let target = Target::start(&options.target).await?;
    if let Some(dir) = target.dir() {
        log(format!("server {} (pid {:?}), files in {}", target.server, target.pid, dir.display()));
    }
    let result = run_on(&scenario, &options, &target, started_at_unix).await;
    target.shutdown().await;
    result
}

struct Reading {
    at: Instant,
    cpu: Option<f64>,
}

fn read(target: &Target) -> Reading {
    Reading { at: Instant::now(), cpu: target.pid.and_then(target::cpu_secs) }
}

fn cpu_between(a: &Reading, b: &Reading) -> (Option<f64>, Option<f64>) {
    let secs = match (a.cpu, b.cpu) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let wall = b.at.duration_since(a.at).as_secs_f64();
    (secs, secs.map(|s| if wall > 0.0 { s / wall } else { 0.0 }))
}

async fn run_on(
    scenario: &Scenario,
    options: &RunOptions,
    target: &Target,
    started_at_unix: u64,
) -> anyhow::Result<Report> {
    let rss_before = target.pid.and_then(target::rss_kib);
    let begin = read(target);
    let clients: usize = scenario.segments.iter().map(|s| s.count).sum();
    // Leave room for the process's other files (PostgreSQL connections, pipes, libraries).
    let open_files = target::raise_open_file_limit();
    let per_process = options.clients_per_process.min(open_files.saturating_sub(500) as usize).max(1);
    let processes = clients.div_ceil(per_process).max(1);
    let in_process = processes == 1 && options.client_nice == 0;
    log(format!(
        "connecting {clients} clients from {} source addresses in {processes} {}",
        options.source_ips,
        match (in_process, options.client_nice) {
            (true, _) => "process (in-process)".to_string(),
            (false, 0) => "worker processes".to_string(),
            (false, nice) => format!("worker process(es) at nice {nice}"),
        }
    ));
    let mut workers = Vec::with_capacity(processes);
    for id in 0..processes {
        let first = clients * id / processes;
        let spec = WorkerSpec {
            id,
            server: target.server,
            jwt_secret: target.jwt_secret.clone(),
            first,
            count: clients * (id + 1) / processes - first,
            segments: scenario.segments.clone(),
            protocol: options.protocol,
            broadcast_topic: BROADCAST_TOPIC.into(),
            source_ips: options.source_ips,
            heartbeat_secs: options.heartbeat_secs,
            connect_concurrency: options.connect_concurrency,
            token_ttl_secs: 24 * 3600,
            progress: clients >= 2000,
        };
        workers.push(if in_process {
            WorkerHandle::in_process(spec)
        } else {
            WorkerHandle::child(spec, options.client_nice).await?
        });
    }
    let connect_started = Instant::now();
    let ready_within = Duration::from_secs(120) + Duration::from_millis(20 * clients as u64);
    let mut ready = crate::worker::Connections::default();
    for worker in &mut workers {
        match worker.next_report(ready_within).await? {
            WorkerReport::Ready(c) => ready.add(&c),
            other => bail!("worker {} sent {other:?} before ready", worker.id),
        }
    }
    let seconds_to_connect = connect_started.elapsed().as_secs_f64();
    log(format!(
        "{} of {} joined ({} connect errors, {} join errors) in {seconds_to_connect:.1} s",
        ready.joined, ready.requested, ready.connect_errors, ready.join_errors
    ));
    tokio::time::sleep(Duration::from_secs_f64(options.settle_secs)).await;
    let rss_held = target.pid.and_then(target::rss_kib);
    let server_reported = match crate::http::get(target.server, "/metrics").await {
        Ok((200, page)) => crate::http::metric(&page, "pgcast_connections"),
        _ => None,
    };
    if let (Some(before), Some(held)) = (rss_before, rss_held) {
        log(format!(
            "server RSS {:.1} MiB before, {:.1} MiB with {} clients held",
            before as f64 / 1024.0,
            held as f64 / 1024.0,
            ready.joined
        ));
    }

    let mut stages = Vec::new();
    let mut send_errors = 0;
    let mut problems: BTreeMap<String, u64> = BTreeMap::new();
    let mut all_latency = Histogram::default();
    let users =
        scenario.segments.iter().filter(|s| s.shape == Shape::OwnRows).map(|s| s.count).sum::<usize>();
    let table_wide =
        scenario.segments.iter().filter(|s| s.shape == Shape::TableWide).map(|s| s.count).sum::<usize>();
    let broadcast_members =
        scenario.segments.iter().filter(|s| s.shape == Shape::Broadcast).map(|s| s.count).sum::<usize>();
    match &scenario.load {
        Load::Hold(duration) => {
            log(format!("holding the connections for {:.0} s", duration.as_secs_f64()));
            tokio::time::sleep(*duration).await;
        }
        Load::Commits(plan) => {
            log(format!(
                "committing {} rows/s ({} per commit) for {:.0} s to {users} own-rows and {table_wide} table-wide subscribers",
                plan.rate * f64::from(plan.rows_per_commit),
                plan.rows_per_commit,
                plan.duration.as_secs_f64()
            ));
            let before = read(target);
            let buckets_before = server_buckets(target).await;
            let sent = load::drive_commits(&target.database_url, plan).await?;
            let expectation = Expectation {
                rows_per_user: sent.rows_per_user.clone(),
                rows_total: sent.rows,
                broadcasts: 0,
                reference_us: sent.started_us,
                drain_secs: options.drain_secs,
            };
            let result = finish(&mut workers, expectation, options.drain_secs).await?;
            let after = read(target);
            let name = format!("commits {}/s", plan.rate);
            let mut stage =
                stage_report(name, Some(plan.rate), &sent, &result, cpu_between(&before, &after), 0);
            log(format!("{} deliveries, {} missing", stage.deliveries, stage.missing));
            server_view(&mut stage, &buckets_before, &server_buckets(target).await);
            collect_send_problems(&sent, &mut send_errors, &mut problems);
            all_latency.merge(&result.latency);
            stages.push(stage);
        }
        Load::Broadcasts { rates, duration, via, body, stop_when_unsustained, sustain_p99_ms } => {
            let claims = json!({"role": "service_role", "sub": "bench-sender", "exp": pgcast::auth::now_secs() + 24 * 3600});
            let token =
                pgcast::auth::sign(&target.jwt_secret, &claims).context("signing the sender token")?;
            for rate in rates {
                log(format!(
                    "broadcasting {rate}/s for {:.0} s to {broadcast_members} members (offered {:.0} deliveries/s)",
                    duration.as_secs_f64(),
                    rate * broadcast_members as f64
                ));
                let plan = BroadcastPlan {
                    rate: *rate,
                    duration: *duration,
                    topic: BROADCAST_TOPIC.into(),
                    via: *via,
                    body: body.clone(),
                };
                let before = read(target);
                let sent = load::drive_broadcasts(target.server, &token, &plan).await?;
                let expectation = Expectation {
                    broadcasts: sent.sent,
                    reference_us: sent.started_us,
                    drain_secs: options.drain_secs,
                    ..Default::default()
                };
                let result = finish(&mut workers, expectation, options.drain_secs).await?;
                let after = read(target);
                let mut stage = stage_report(
                    format!("broadcast {rate}/s"),
                    Some(*rate),
                    &sent,
                    &result,
                    cpu_between(&before, &after),
                    0,
                );
                let offered = if sent.secs() > 0.0 {
                    (sent.sent * broadcast_members as u64) as f64 / sent.secs()
                } else {
                    0.0
                };
                let sustained = stage.missing == 0
                    && stage.disconnects == 0
                    && stage.send_errors == 0
                    && stage.deliveries > 0
                    && stage.deliveries_per_sec.unwrap_or(0.0) >= 0.95 * offered
                    && stage.latency_ms.as_ref().is_some_and(|l| l.p99 <= *sustain_p99_ms);
                stage.sustained = Some(sustained);
                log(format!(
                    "{:.0} deliveries/s (offered {offered:.0}), {} missing, p99 {} ms: {}",
                    stage.deliveries_per_sec.unwrap_or(0.0),
                    stage.missing,
                    stage.latency_ms.as_ref().map(|l| l.p99.to_string()).unwrap_or_else(|| "-".into()),
                    if sustained { "sustained" } else { "not sustained" }
                ));
                collect_send_problems(&sent, &mut send_errors, &mut problems);
                all_latency.merge(&result.latency);
                stages.push(stage);
                if !sustained && *stop_when_unsustained {
                    break;
                }
            }
        }
        Load::Burst { rows, body } => {
            log(format!(
                "one transaction of {rows} rows to {users} own-rows and {table_wide} table-wide subscribers"
            ));
            let before = read(target);
            let buckets_before = server_buckets(target).await;
            let burst = load::drive_burst(&target.database_url, *rows, users as u64, body).await?;
            let expectation = Expectation {
                rows_per_user: burst.sent.rows_per_user.clone(),
                rows_total: burst.sent.rows,
                broadcasts: 0,
                reference_us: burst.commit_sent_us,
                drain_secs: options.drain_secs,
            };
            let result = finish(&mut workers, expectation, options.drain_secs).await?;
            let after = read(target);
            // Rows carry the time before the INSERT; report latency from COMMIT.
            let offset = burst.commit_sent_us.saturating_sub(burst.insert_started_us);
            let mut stage = stage_report(
                format!("burst {rows} rows"),
                None,
                &burst.sent,
                &result,
                cpu_between(&before, &after),
                offset,
            );
            stage.sent_per_sec = None;
            server_view(&mut stage, &buckets_before, &server_buckets(target).await);
            stage.burst = Some(BurstTimes {
                insert_ms: offset as f64 / 1000.0,
                commit_ms: burst.commit_done_us.saturating_sub(burst.commit_sent_us) as f64 / 1000.0,
            });
            if result.clients_complete == result.clients_expecting {
                stage.time_to_all_ms = Some(result.completion.max as f64 / 1000.0);
            }
            // Deliveries per second from COMMIT to the last delivery.
            stage.deliveries_per_sec = result.last_received_us.and_then(|last| {
                let secs = last.saturating_sub(burst.commit_sent_us) as f64 / 1e6;
                (secs > 0.0).then(|| result.deliveries as f64 / secs)
            });
            log(format!(
                "{} of {} subscribers complete; every subscriber had all its rows {} ms after COMMIT",
                result.clients_complete,
                result.clients_expecting,
                stage.time_to_all_ms.map(|t| format!("{t:.1}")).unwrap_or_else(|| "(not reached)".into())
            ));
            all_latency.merge(&result.latency.shifted_down(offset));
            stages.push(stage);
        }
    }

    let rss_end = target.pid.and_then(target::rss_kib);
    let mut last = FinalResult::default();
    for worker in &workers {
        worker.send(Command::Stop).await?;
    }
    for worker in &mut workers {
        match worker.next_report(Duration::from_secs(60)).await? {
            WorkerReport::Final(result) => {
                last.connections.add(&result.connections);
                last.held += result.held;
                last.disconnects += result.disconnects;
                last.protocol_errors += result.protocol_errors;
                for (problem, n) in result.problems {
                    *last.problems.entry(problem).or_insert(0) += n;
                }
            }
            other => bail!("worker {} sent {other:?} instead of its final report", worker.id),
        }
    }
    for worker in workers {
        worker.wait().await;
    }
    let end = read(target);
    for (problem, n) in last.problems {
        *problems.entry(problem).or_insert(0) += n;
    }

    let (cpu_secs, cpu_cores) = cpu_between(&begin, &end);
    let joined = last.connections.joined;
    let missing: u64 = stages.iter().map(|s| s.missing).sum();
    let errors = Errors {
        connect: last.connections.connect_errors,
        join: last.connections.join_errors,
        protocol: last.protocol_errors,
        send: send_errors,
        missing,
        total: last.connections.connect_errors
            + last.connections.join_errors
            + last.protocol_errors
            + send_errors
            + missing,
    };
    let deliveries_per_sec = stages.iter().filter_map(|s| s.deliveries_per_sec).reduce(f64::max);
    let max_sustained = matches!(scenario.load, Load::Broadcasts { .. }).then(|| {
        stages
            .iter()
            .filter(|s| s.sustained == Some(true))
            .filter_map(|s| s.deliveries_per_sec)
            .fold(0.0, f64::max)
    });
    Ok(Report {
        scenario: scenario.name.to_string(),
        started_at_unix,
        parameters: scenario.parameters.clone(),
        server: ServerInfo { mode: target.mode.into(), address: target.server.to_string(), pid: target.pid },
        connections: ConnectionsReport {
            requested: clients as u64,
            established: last.connections.connected,
            joined,
            held: last.held,
            server_reported,
            connect_retries: last.connections.connect_retries,
            worker_processes: processes,
            source_ips: options.source_ips,
            seconds_to_connect,
        },
        memory: Memory {
            server_rss_before_kib: rss_before,
            server_rss_held_kib: rss_held,
            server_rss_end_kib: rss_end,
            rss_per_connection_bytes: match (rss_before, rss_held) {
                (Some(before), Some(held)) if joined > 0 => Some(held.saturating_sub(before) * 1024 / joined),
                _ => None,
            },
        },
        cpu: Cpu {
            server_cpu_secs: cpu_secs,
            wall_secs: end.at.duration_since(begin.at).as_secs_f64(),
            server_cpu_cores: cpu_cores,
        },
        latency_ms: Percentiles::of(&all_latency),
        deliveries: stages.iter().map(|s| s.deliveries).sum(),
        deliveries_per_sec,
        max_sustained_deliveries_per_sec: max_sustained,
        stages,
        errors,
        disconnects: last.disconnects,
        problems,
    })
}

/// Tells every worker the stage is over and merges their accounts of it.
async fn finish(
    workers: &mut [WorkerHandle],
    expectation: Expectation,
    drain_secs: f64,
) -> anyhow::Result<StageResult> {
    for worker in workers.iter() {
        worker.send(Command::Finish(expectation.clone())).await?;
    }
    let within = Duration::from_secs_f64(drain_secs) + Duration::from_secs(60);
    let mut merged = StageResult::default();
    for worker in workers.iter_mut() {
        match worker.next_report(within).await? {
            WorkerReport::Stage(result) => merged.merge(&result),
            other => bail!("worker {} sent {other:?} instead of a stage report", worker.id),
        }
    }
    Ok(merged)
}

fn collect_send_problems(sent: &Sent, send_errors: &mut u64, problems: &mut BTreeMap<String, u64>) {
    *send_errors += sent.errors;
    for (problem, n) in &sent.error_samples {
        *problems.entry(problem.clone()).or_insert(0) += n;
    }
}

fn stage_report(
    name: String,
    target_rate: Option<f64>,
    sent: &Sent,
    result: &StageResult,
    (cpu_secs, cpu_cores): (Option<f64>, Option<f64>),
    latency_offset_us: u64,
) -> StageReport {
    let send_secs = sent.secs();
    let deliveries_per_sec = result.last_received_us.and_then(|last| {
        let secs = last.saturating_sub(sent.started_us) as f64 / 1e6;
        (secs > 0.0).then(|| result.deliveries as f64 / secs)
    });
    StageReport {
        name,
        target_rate,
        sent: sent.sent,
        rows: sent.rows,
        sent_per_sec: (send_secs > 0.0).then(|| sent.sent as f64 / send_secs),
        send_secs,
        send_errors: sent.errors,
        deliveries: result.deliveries,
        deliveries_expected: result.expected,
        missing: result.missing,
        extra: result.extra,
        clients_expecting: result.clients_expecting,
        clients_complete: result.clients_complete,
        deliveries_per_sec,
        latency_ms: Percentiles::of(&result.latency.shifted_down(latency_offset_us)),
        completion_ms: Percentiles::of(&result.completion),
        time_to_all_ms: None,
        burst: None,
        server_cpu_secs: cpu_secs,
        server_cpu_cores: cpu_cores,
        server_cpu_us_per_delivery: cpu_secs
            .filter(|_| result.deliveries > 0)
            .map(|secs| secs * 1e6 / result.deliveries as f64),
        protocol_errors: result.protocol_errors,
        disconnects: result.disconnects,
        drain_ms: result.drain_ms,
        sustained: None,
        server_commit_to_send: None,
        server_commit_to_route: None,
    }
}

/// The server's two latency histograms, cumulative buckets as scraped.
struct ServerBuckets {
    route: Vec<(f64, u64)>,
    send: Vec<(f64, u64)>,
}

/// Scrapes the server's commit-to-route and commit-to-send buckets (empty if `/metrics` fails).
async fn server_buckets(target: &Target) -> ServerBuckets {
    match crate::http::get(target.server, "/metrics").await {
        Ok((200, page)) => ServerBuckets {
            route: crate::http::histogram_buckets(&page, "pgcast_commit_to_route_seconds"),
            send: crate::http::histogram_buckets(&page, "pgcast_commit_to_send_seconds"),
        },
        _ => ServerBuckets { route: Vec::new(), send: Vec::new() },
    }
}

/// Fills in and logs the server's own view of the stage: its share of writes (and of routed
/// transactions) within a few bounds of the commit.
fn server_view(stage: &mut StageReport, before: &ServerBuckets, after: &ServerBuckets) {
    stage.server_commit_to_send = ServerShares::between(&before.send, &after.send);
    stage.server_commit_to_route = ServerShares::between(&before.route, &after.route);
    let shares = |view: &ServerShares| {
        let shares: Vec<String> = view
            .within
            .iter()
            .filter(|w| [1.0, 5.0, 20.0, 50.0].contains(&w.ms))
            .map(|w| format!("{:.1}% within {} ms", w.share * 100.0, w.ms))
            .collect();
        shares.join(", ")
    };
    if let Some(view) = &stage.server_commit_to_route {
        log(format!("server commit-to-route over {} transactions: {}", view.count, shares(view)));
    }
    if let Some(view) = &stage.server_commit_to_send {
        log(format!("server commit-to-send over {} writes: {}", view.count, shares(view)));
    }
}
