//! The bench's result: one JSON document (`--out`) and the same figures as a table on stdout.
//!
//! Only presentation lives here: the numbers are computed by the scenario runner. Times are
//! milliseconds, memory KiB (per connection in bytes), CPU seconds of the server process.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::histogram::Histogram;

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub started_at_unix: u64,
    pub parameters: Value,
    pub server: ServerInfo,
    pub connections: ConnectionsReport,
    pub memory: Memory,
    pub cpu: Cpu,
    pub stages: Vec<StageReport>,
    /// Delivery latency over every stage (for `burst`, measured from COMMIT).
    pub latency_ms: Option<Percentiles>,
    pub deliveries: u64,
    /// The best stage's delivery rate.
    pub deliveries_per_sec: Option<f64>,
    /// `broadcast`: the highest delivery rate of a stage that lost nothing and kept up.
    pub max_sustained_deliveries_per_sec: Option<f64>,
    pub errors: Errors,
    /// Held connections that ended before the bench stopped them.
    pub disconnects: u64,
    /// Problem text (refusals, error replies, close reasons, failed sends) -> occurrences.
    pub problems: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct ServerInfo {
    /// `spawned` (private PostgreSQL + `pgcast serve` started by the bench) or `external`.
    pub mode: String,
    pub address: String,
    pub pid: Option<u32>,
}

#[derive(Debug, Default, Serialize)]
pub struct ConnectionsReport {
    pub requested: u64,
    /// WebSocket handshakes completed.
    pub established: u64,
    /// Established and joined their channel (just established for shape `none`).
    pub joined: u64,
    /// Still open and joined when the bench ended the run.
    pub held: u64,
    /// `pgcast_connections` from the server's /metrics once all clients were held.
    pub server_reported: Option<f64>,
    pub connect_retries: u64,
    pub worker_processes: usize,
    pub source_ips: u8,
    pub seconds_to_connect: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Memory {
    pub server_rss_before_kib: Option<u64>,
    /// Once every client was connected and joined.
    pub server_rss_held_kib: Option<u64>,
    pub server_rss_end_kib: Option<u64>,
    /// (held - before) / joined connections.
    pub rss_per_connection_bytes: Option<u64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Cpu {
    /// Server user + system time from before the clients connected to the end of the run.
    pub server_cpu_secs: Option<f64>,
    pub wall_secs: f64,
    /// server_cpu_secs / wall_secs.
    pub server_cpu_cores: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct StageReport {
    pub name: String,
    /// Commits or broadcasts per second asked for.
    pub target_rate: Option<f64>,
    pub sent: u64,
    pub rows: u64,
    pub sent_per_sec: Option<f64>,
    pub send_secs: f64,
    pub send_errors: u64,
    pub deliveries: u64,
    pub deliveries_expected: u64,
    pub missing: u64,
    pub extra: u64,
    pub clients_expecting: u64,
    pub clients_complete: u64,
    /// Deliveries over the time from the first send to the last delivery.
    pub deliveries_per_sec: Option<f64>,
    pub latency_ms: Option<Percentiles>,
    /// Per subscriber: its last delivery after the reference (COMMIT for `burst`).
    pub completion_ms: Option<Percentiles>,
    /// `burst`: when the last subscriber had all its rows, after COMMIT was sent.
    pub time_to_all_ms: Option<f64>,
    pub burst: Option<BurstTimes>,
    pub server_cpu_secs: Option<f64>,
    pub server_cpu_cores: Option<f64>,
    /// Server CPU time per delivery (µs): the cost independent of how busy the client side is.
    pub server_cpu_us_per_delivery: Option<f64>,
    pub protocol_errors: u64,
    pub disconnects: u64,
    pub drain_ms: u64,
    /// `broadcast`: nothing missing, no disconnects or send errors, deliveries kept up with at
    /// least 95% of the offered rate, and p99 latency within `--sustain-p99-ms`.
    pub sustained: Option<bool>,
    /// The server's own view (its `pgcast_commit_to_send_seconds` histogram over this stage):
    /// commit to the socket write, without the client's share of the latency. `count` is the
    /// socket writes carrying changes (a write can carry several).
    pub server_commit_to_send: Option<ServerShares>,
    /// The capture's share (`pgcast_commit_to_route_seconds`): commit to the router taking the
    /// transaction. `count` is transactions.
    pub server_commit_to_route: Option<ServerShares>,
}

/// A server histogram over one stage: the share of events within each bound.
#[derive(Debug, Serialize)]
pub struct ServerShares {
    /// Events recorded during the stage.
    pub count: u64,
    /// Share of those writes made within each bound, bounds ascending.
    pub within: Vec<Within>,
}

#[derive(Debug, Serialize)]
pub struct Within {
    pub ms: f64,
    pub share: f64,
}

impl ServerShares {
    /// The difference between two scrapes of the cumulative buckets.
    pub fn between(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<ServerShares> {
        let at =
            |buckets: &[(f64, u64)], le: f64| buckets.iter().find(|(b, _)| *b == le).map_or(0, |(_, n)| *n);
        let count = at(after, f64::INFINITY).saturating_sub(at(before, f64::INFINITY));
        if count == 0 {
            return None;
        }
        let within = after
            .iter()
            .filter(|(le, _)| le.is_finite())
            .map(|(le, n)| Within {
                ms: le * 1000.0,
                share: n.saturating_sub(at(before, *le)) as f64 / count as f64,
            })
            .collect();
        Some(ServerShares { count, within })
    }
}

#[derive(Debug, Serialize)]
pub struct BurstTimes {
    /// The INSERT of every row (rows carry the time before it as `sent_at_us`).
    pub insert_ms: f64,
    pub commit_ms: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Errors {
    pub connect: u64,
    pub join: u64,
    /// Error replies, `phx_error`, `system` errors, channels closed by the server.
    pub protocol: u64,
    /// Failed commits and broadcasts.
    pub send: u64,
    /// Deliveries that never arrived (every stage).
    pub missing: u64,
    pub total: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
    pub mean: f64,
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

impl Percentiles {
    pub fn of(h: &Histogram) -> Option<Percentiles> {
        let q = |q: f64| h.quantile(q).map(ms);
        Some(Percentiles {
            count: h.count,
            min: ms(h.min),
            p50: q(0.5)?,
            p90: q(0.9)?,
            p99: q(0.99)?,
            p99_9: q(0.999)?,
            max: q(1.0)?,
            mean: (h.mean()? / 1000.0 * 1000.0).round() / 1000.0,
        })
    }
}

fn opt<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn kib(value: Option<u64>) -> String {
    value.map(|v| format!("{:.1} MiB", v as f64 / 1024.0)).unwrap_or_else(|| "-".into())
}

fn rate(value: Option<f64>) -> String {
    value.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into())
}

impl Report {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let c = &self.connections;
        let _ = writeln!(
            out,
            "pgcast-bench {}: server {} ({}, pid {})",
            self.scenario,
            self.server.address,
            self.server.mode,
            opt(self.server.pid)
        );
        let _ = writeln!(
            out,
            "connections   requested {}  established {}  joined {}  held {}  server says {}  ({} process(es), {} source IPs, {:.1} s to connect)",
            c.requested,
            c.established,
            c.joined,
            c.held,
            opt(c.server_reported),
            c.worker_processes,
            c.source_ips,
            c.seconds_to_connect
        );
        let m = &self.memory;
        let _ = writeln!(
            out,
            "server RSS    before {}  held {}  end {}  per connection {}",
            kib(m.server_rss_before_kib),
            kib(m.server_rss_held_kib),
            kib(m.server_rss_end_kib),
            m.rss_per_connection_bytes
                .map(|b| format!("{:.2} KiB ({b} bytes)", b as f64 / 1024.0))
                .unwrap_or_else(|| "-".into())
        );
        let _ = writeln!(
            out,
            "server CPU    {} s over {:.1} s wall ({} cores)",
            self.cpu.server_cpu_secs.map(|s| format!("{s:.2}")).unwrap_or_else(|| "-".into()),
            self.cpu.wall_secs,
            self.cpu.server_cpu_cores.map(|s| format!("{s:.2}")).unwrap_or_else(|| "-".into())
        );
        if !self.stages.is_empty() {
            let _ = writeln!(
                out,
                "\n{:<22} {:>8} {:>9} {:>11} {:>8} {:>6} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>7} {:>5}",
                "stage",
                "sent/s",
                "sent",
                "deliveries",
                "missing",
                "extra",
                "deliv/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "p99.9 ms",
                "max ms",
                "cores",
                "µs/del",
                "ok"
            );
            for s in &self.stages {
                let l = s.latency_ms.as_ref();
                let f = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    out,
                    "{:<22} {:>8} {:>9} {:>11} {:>8} {:>6} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>7} {:>5}",
                    s.name,
                    rate(s.sent_per_sec),
                    s.sent,
                    s.deliveries,
                    s.missing,
                    s.extra,
                    rate(s.deliveries_per_sec),
                    f(l.map(|l| l.p50)),
                    f(l.map(|l| l.p90)),
                    f(l.map(|l| l.p99)),
                    f(l.map(|l| l.p99_9)),
                    f(l.map(|l| l.max)),
                    s.server_cpu_cores.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into()),
                    s.server_cpu_us_per_delivery.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into()),
                    match s.sustained {
                        Some(true) => "yes",
                        Some(false) => "NO",
                        None => "",
                    }
                );
                if let Some(burst) = &s.burst {
                    let _ = writeln!(
                        out,
                        "  burst: insert {:.1} ms, commit {:.1} ms, every subscriber complete {} ms after COMMIT ({} of {} clients complete; per-client p50 {} ms)",
                        burst.insert_ms,
                        burst.commit_ms,
                        f(s.time_to_all_ms),
                        s.clients_complete,
                        s.clients_expecting,
                        f(s.completion_ms.as_ref().map(|c| c.p50))
                    );
                }
            }
        }
        if let Some(best) = self.max_sustained_deliveries_per_sec {
            let _ = writeln!(out, "\nmax sustained deliveries/s: {best:.0}");
        }
        let e = &self.errors;
        let _ = writeln!(
            out,
            "\nerrors        connect {}  join {}  protocol {}  send {}  missing {}  (total {});  disconnects {}",
            e.connect, e.join, e.protocol, e.send, e.missing, e.total, self.disconnects
        );
        for (problem, n) in self.problems.iter().take(10) {
            let _ = writeln!(out, "  {n} x {problem}");
        }
        out
    }
}
