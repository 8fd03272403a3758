//! A group of clients run by one process, and the line protocol that lets the coordinator run
//! several such groups as child processes (`pgcast-bench worker`) when one process could not
//! hold all the sockets (the per-process open-file cap).
//!
//! The coordinator sends a [`WorkerSpec`], then [`Command`]s; the group answers with
//! [`Report`]s: `ready` once every client is connected and joined (or has failed), a `stage`
//! result after each `finish` (once every client has what it should have, or the drain time is
//! up), and `final` on `stop`. In a child process these are JSON lines on stdin and stdout (the
//! spec first); in-process the same values travel over channels. Standard input closing means
//! stop, so a worker never outlives its coordinator for long.
//!
//! This module generates no load itself; it only connects, counts and reports.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command as ProcessCommand};
use tokio::sync::{mpsc, watch};

use crate::client::{self, ClientSpec, Shape, Shared, Standing};
use crate::histogram::Histogram;

/// A run of consecutive clients with one shape; a scenario is a list of these, and client `i`
/// (global index) belongs to the segment that covers it. [`Shape::OwnRows`] clients subscribe to
/// user ids 0, 1, ... in their segment's order.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Segment {
    pub shape: Shape,
    pub count: usize,
}

/// Which clients a worker runs and how they connect.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub id: usize,
    pub server: SocketAddr,
    pub jwt_secret: String,
    /// Global index of the first client, and how many.
    pub first: usize,
    pub count: usize,
    pub segments: Vec<Segment>,
    #[serde(default)]
    pub protocol: crate::client::Protocol,
    pub broadcast_topic: String,
    /// Client `i` connects from 127.0.0.(1 + i % source_ips).
    pub source_ips: u8,
    pub heartbeat_secs: u64,
    pub connect_concurrency: usize,
    pub token_ttl_secs: u64,
    /// Print progress on stderr while connecting.
    pub progress: bool,
}

/// What each client should have received by the end of a stage.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Expectation {
    /// Rows committed for user id k (own-rows clients).
    pub rows_per_user: Vec<u64>,
    /// Rows committed in all (table-wide clients).
    pub rows_total: u64,
    /// Broadcasts sent (broadcast clients).
    pub broadcasts: u64,
    /// Time from which a client's completion is measured (µs since the epoch).
    pub reference_us: u64,
    /// How long to wait for stragglers.
    pub drain_secs: f64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    Finish(Expectation),
    Stop,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Connections {
    pub requested: u64,
    pub connected: u64,
    pub joined: u64,
    pub connect_errors: u64,
    pub connect_retries: u64,
    pub join_errors: u64,
}

impl Connections {
    pub fn add(&mut self, other: &Connections) {
        self.requested += other.requested;
        self.connected += other.connected;
        self.joined += other.joined;
        self.connect_errors += other.connect_errors;
        self.connect_retries += other.connect_retries;
        self.join_errors += other.join_errors;
    }
}

/// One stage as seen by one worker (or merged across workers).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageResult {
    pub deliveries: u64,
    pub expected: u64,
    pub missing: u64,
    pub extra: u64,
    /// Clients that should have received something, and those that received all of it.
    pub clients_expecting: u64,
    pub clients_complete: u64,
    pub first_received_us: Option<u64>,
    pub last_received_us: Option<u64>,
    /// Delivery latency: receive time minus the sender's `sent_at_us`.
    pub latency: Histogram,
    /// Per complete client: its last delivery minus the stage's reference time.
    pub completion: Histogram,
    pub protocol_errors: u64,
    pub disconnects: u64,
    /// Milliseconds the worker waited after `finish` for stragglers.
    pub drain_ms: u64,
}

impl StageResult {
    pub fn merge(&mut self, other: &StageResult) {
        self.deliveries += other.deliveries;
        self.expected += other.expected;
        self.missing += other.missing;
        self.extra += other.extra;
        self.clients_expecting += other.clients_expecting;
        self.clients_complete += other.clients_complete;
        self.first_received_us = min_opt(self.first_received_us, other.first_received_us);
        self.last_received_us = self.last_received_us.max(other.last_received_us);
        self.latency.merge(&other.latency);
        self.completion.merge(&other.completion);
        self.protocol_errors += other.protocol_errors;
        self.disconnects += other.disconnects;
        self.drain_ms = self.drain_ms.max(other.drain_ms);
    }
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FinalResult {
    pub connections: Connections,
    /// Clients still connected (and joined) when the bench stopped them.
    pub held: u64,
    pub disconnects: u64,
    pub protocol_errors: u64,
    pub problems: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "report", rename_all = "snake_case")]
pub enum Report {
    Ready(Connections),
    Stage(StageResult),
    Final(FinalResult),
}

/// The shape and own-rows user id of global client `index`.
pub fn shape_of(segments: &[Segment], index: usize) -> (Shape, u64) {
    let mut start = 0;
    for segment in segments {
        if index < start + segment.count {
            return (segment.shape, (index - start) as u64);
        }
        start += segment.count;
    }
    (Shape::None, 0)
}

/// Runs the clients of `spec` and answers commands until `stop` (or the command channel closes).
pub async fn run(
    spec: WorkerSpec,
    mut commands: mpsc::Receiver<Command>,
    reports: mpsc::Sender<Report>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared::new(spec.count, spec.connect_concurrency, stop_rx));
    let exp = pgcast::auth::now_secs() + spec.token_ttl_secs;
    let mut tasks = tokio::task::JoinSet::new();
    for slot in 0..spec.count {
        let index = spec.first + slot;
        let (shape, user) = shape_of(&spec.segments, index);
        let claims = json!({"role": "service_role", "sub": format!("bench-{index}"), "exp": exp});
        let token = pgcast::auth::sign(&spec.jwt_secret, &claims).context("signing a client token")?;
        let period = spec.heartbeat_secs.max(1) * 1000;
        // Spread first heartbeats evenly over one period (golden-ratio stride).
        let offset_ms = (index as u64).wrapping_mul(2_654_435_761) % period;
        let client = ClientSpec {
            slot,
            protocol: spec.protocol,
            shape,
            user,
            source: Ipv4Addr::new(127, 0, 0, 1 + (index % usize::from(spec.source_ips.max(1))) as u8),
            server: spec.server,
            token,
            broadcast_topic: spec.broadcast_topic.clone(),
            heartbeat: Duration::from_millis(period),
            heartbeat_offset: Duration::from_millis(offset_ms),
        };
        tasks.spawn(client::run(client, shared.clone()));
    }

    // Ready once every client has settled.
    let started = Instant::now();
    let mut last_progress = Instant::now();
    loop {
        let pending = shared.slots.iter().filter(|s| s.standing() == Standing::Pending).count();
        if pending == 0 {
            break;
        }
        if spec.progress && last_progress.elapsed() >= Duration::from_secs(2) {
            last_progress = Instant::now();
            eprintln!(
                "  worker {}: {}/{} settled after {:.0}s",
                spec.id,
                spec.count - pending,
                spec.count,
                started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if reports.send(Report::Ready(connections(&spec, &shared))).await.is_err() {
        bail!("coordinator went away");
    }

    let mut seen_protocol_errors = 0;
    let mut seen_disconnects = 0;
    while let Some(command) = commands.recv().await {
        match command {
            Command::Finish(expectation) => {
                let mut result = finish_stage(&spec, &shared, &expectation).await;
                let protocol_errors = shared.protocol_errors.load(Ordering::Relaxed);
                let disconnects = shared.disconnects.load(Ordering::Relaxed);
                result.protocol_errors = protocol_errors - seen_protocol_errors;
                result.disconnects = disconnects - seen_disconnects;
                (seen_protocol_errors, seen_disconnects) = (protocol_errors, disconnects);
                if reports.send(Report::Stage(result)).await.is_err() {
                    break;
                }
            }
            Command::Stop => break,
        }
    }
    let held = shared.slots.iter().filter(|s| s.standing() == Standing::Held).count() as u64;
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    let problems = shared.problems.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let result = FinalResult {
        connections: connections(&spec, &shared),
        held,
        disconnects: shared.disconnects.load(Ordering::Relaxed),
        protocol_errors: shared.protocol_errors.load(Ordering::Relaxed),
        problems,
    };
    let _ = reports.send(Report::Final(result)).await;
    Ok(())
}

fn connections(spec: &WorkerSpec, shared: &Shared) -> Connections {
    let joined =
        shared.slots.iter().filter(|s| matches!(s.standing(), Standing::Held | Standing::Lost)).count();
    Connections {
        requested: spec.count as u64,
        connected: shared.connected.load(Ordering::Relaxed),
        joined: joined as u64,
        connect_errors: shared.connect_errors.load(Ordering::Relaxed),
        connect_retries: shared.connect_retries.load(Ordering::Relaxed),
        join_errors: shared.join_errors.load(Ordering::Relaxed),
    }
}

/// Waits until every joined client has what `expectation` says (or the drain time is up), then
/// accounts the stage and resets the per-stage counters.
async fn finish_stage(spec: &WorkerSpec, shared: &Shared, expectation: &Expectation) -> StageResult {
    let expected_of = |slot: usize| -> u64 {
        match shape_of(&spec.segments, spec.first + slot) {
            (Shape::OwnRows, user) => expectation.rows_per_user.get(user as usize).copied().unwrap_or(0),
            (Shape::TableWide, _) => expectation.rows_total,
            (Shape::Broadcast, _) => expectation.broadcasts,
            (Shape::None, _) => 0,
        }
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(expectation.drain_secs.max(0.0));
    loop {
        let waiting = shared.slots.iter().enumerate().any(|(i, slot)| {
            slot.standing() == Standing::Held && slot.received.load(Ordering::Relaxed) < expected_of(i)
        });
        if !waiting || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut result = StageResult { drain_ms: started.elapsed().as_millis() as u64, ..Default::default() };
    let mut completions = Vec::new();
    let mut last_received = 0;
    for (i, slot) in shared.slots.iter().enumerate() {
        let received = slot.received.swap(0, Ordering::Relaxed);
        let last = slot.last_received_us.swap(0, Ordering::Relaxed);
        last_received = last_received.max(last);
        if !matches!(slot.standing(), Standing::Held | Standing::Lost) {
            continue;
        }
        let expected = expected_of(i);
        result.deliveries += received;
        result.expected += expected;
        result.missing += expected.saturating_sub(received);
        result.extra += received.saturating_sub(expected);
        if expected > 0 {
            result.clients_expecting += 1;
            if received >= expected {
                result.clients_complete += 1;
                completions.push(last.saturating_sub(expectation.reference_us));
            }
        }
    }
    result.completion = Histogram::from_values(completions);
    result.latency = shared.latency.take();
    let first = shared.first_received_us.swap(u64::MAX, Ordering::Relaxed);
    result.first_received_us = (first != u64::MAX).then_some(first);
    result.last_received_us = (last_received != 0).then_some(last_received);
    result
}

/// `pgcast-bench worker`: the spec on the first stdin line, commands after it, reports on stdout.
pub async fn serve_stdio() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines.next_line().await?.context("no worker spec on standard input")?;
    let spec: WorkerSpec = serde_json::from_str(&first).context("worker spec is not valid JSON")?;
    let (command_tx, command_rx) = mpsc::channel(16);
    let (report_tx, mut report_rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let command = match lines.next_line().await {
                Ok(Some(line)) => match serde_json::from_str::<Command>(&line) {
                    Ok(command) => command,
                    Err(e) => {
                        eprintln!("worker: ignoring a bad command ({e}): {line}");
                        continue;
                    }
                },
                // The coordinator is gone or done: stop.
                Ok(None) | Err(_) => Command::Stop,
            };
            let stop = matches!(command, Command::Stop);
            if command_tx.send(command).await.is_err() || stop {
                break;
            }
        }
    });
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(report) = report_rx.recv().await {
            let mut line = serde_json::to_vec(&report)?;
            line.push(b'\n');
            stdout.write_all(&line).await?;
            stdout.flush().await?;
        }
        anyhow::Ok(())
    });
    run(spec, command_rx, report_tx).await?;
    writer.await.context("report writer panicked")??;
    Ok(())
}

/// The coordinator's end of one worker, in-process or child.
pub struct WorkerHandle {
    pub id: usize,
    commands: mpsc::Sender<Command>,
    reports: mpsc::Receiver<Report>,
    child: Option<Child>,
}

impl WorkerHandle {
    /// Runs the worker as a task of this process.
    pub fn in_process(spec: WorkerSpec) -> WorkerHandle {
        let (command_tx, command_rx) = mpsc::channel(16);
        let (report_tx, report_rx) = mpsc::channel(16);
        let id = spec.id;
        tokio::spawn(async move {
            if let Err(e) = run(spec, command_rx, report_tx).await {
                eprintln!("worker {id}: {e:#}");
            }
        });
        WorkerHandle { id, commands: command_tx, reports: report_rx, child: None }
    }

    /// Runs the worker as `<this executable> worker`, at CPU niceness `nice`.
    pub async fn child(spec: WorkerSpec, nice: i32) -> anyhow::Result<WorkerHandle> {
        let exe = std::env::current_exe().context("locating the pgcast-bench executable")?;
        let mut command = ProcessCommand::new(exe);
        command.arg("worker").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        crate::target::die_with_parent(&mut command);
        if nice > 0 {
            // SAFETY: setpriority is async-signal-safe and changes only the (child) process
            // calling it; the threads it starts after exec inherit the value.
            unsafe {
                command.pre_exec(move || {
                    if libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.kill_on_drop(true).spawn().context("starting a worker process")?;
        let mut stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let id = spec.id;
        let mut first = serde_json::to_vec(&spec)?;
        first.push(b'\n');
        stdin.write_all(&first).await.context("sending the worker its spec")?;
        let (command_tx, mut command_rx) = mpsc::channel::<Command>(16);
        let (report_tx, report_rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(command) = command_rx.recv().await {
                let Ok(mut line) = serde_json::to_vec(&command) else { break };
                line.push(b'\n');
                if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Report>(&line) {
                    Ok(report) => {
                        if report_tx.send(report).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("worker {id}: unreadable report ({e}): {line}"),
                }
            }
        });
        Ok(WorkerHandle { id, commands: command_tx, reports: report_rx, child: Some(child) })
    }

    pub async fn send(&self, command: Command) -> anyhow::Result<()> {
        self.commands.send(command).await.map_err(|_| anyhow::anyhow!("worker {} has exited", self.id))
    }

    pub async fn next_report(&mut self, within: Duration) -> anyhow::Result<Report> {
        match tokio::time::timeout(within, self.reports.recv()).await {
            Ok(Some(report)) => Ok(report),
            Ok(None) => bail!("worker {} exited without reporting", self.id),
            Err(_) => bail!("worker {} did not report within {within:?}", self.id),
        }
    }

    /// Waits for a child worker to exit (it does after its final report).
    pub async fn wait(mut self) {
        if let Some(child) = self.child.as_mut() {
            if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                let _ = child.start_kill();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_take_the_shape_of_their_segment() {
        let segments =
            [Segment { shape: Shape::OwnRows, count: 3 }, Segment { shape: Shape::TableWide, count: 2 }];
        assert_eq!(shape_of(&segments, 0), (Shape::OwnRows, 0));
        assert_eq!(shape_of(&segments, 2), (Shape::OwnRows, 2));
        assert_eq!(shape_of(&segments, 3), (Shape::TableWide, 0));
        assert_eq!(shape_of(&segments, 5), (Shape::None, 0));
    }

    #[test]
    fn commands_and_reports_round_trip_as_json_lines() {
        let line =
            serde_json::to_string(&Command::Finish(Expectation { rows_total: 3, ..Default::default() }))
                .expect("serialize");
        assert!(line.starts_with(r#"{"cmd":"finish""#), "{line}");
        assert!(matches!(serde_json::from_str(&line), Ok(Command::Finish(e)) if e.rows_total == 3));
        let line = serde_json::to_string(&Report::Ready(Connections { joined: 2, ..Default::default() }))
            .expect("serialize");
        assert!(matches!(serde_json::from_str(&line), Ok(Report::Ready(c)) if c.joined == 2));
    }

    #[test]
    fn a_stage_report_with_latencies_round_trips() {
        let latency = Histogram::from_values([175, 300, 163_660]);
        let stage = StageResult { deliveries: 3, latency: latency.clone(), ..Default::default() };
        let line = serde_json::to_string(&Report::Stage(stage)).expect("serialize");
        match serde_json::from_str(&line) {
            Ok(Report::Stage(back)) => assert_eq!(back.latency, latency),
            other => panic!("{other:?} from {line}"),
        }
    }
}
