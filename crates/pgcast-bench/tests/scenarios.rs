//! Every scenario of pgcast-bench, run at a small scale against its own private PostgreSQL and
//! a spawned `pgcast serve`, produces a well-formed, plausible JSON report: every requested
//! connection held, deliveries made and none missing, latency percentiles in order, no errors.
//!
//! These tests check the tool, not pgcast's speed: no figure is asserted against a time.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// The pgcast binary the bench spawns by default (next to pgcast-bench in the target dir);
/// built here if `cargo build --bins` has not built it yet.
fn ensure_pgcast_binary() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_pgcast-bench"));
    let pgcast = bench.with_file_name("pgcast");
    if pgcast.is_file() {
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "pgcast", "--bin", "pgcast"]);
    if bench.parent().and_then(|p| p.file_name()).is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build for the pgcast binary");
    assert!(status.success() && pgcast.is_file(), "could not build {}", pgcast.display());
}

/// Runs `pgcast-bench <args> --out <file>` and returns the parsed report.
fn run_bench(name: &str, args: &[&str]) -> Value {
    ensure_pgcast_binary();
    let out =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-{name}-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let output = Command::new(env!("CARGO_BIN_EXE_pgcast-bench"))
        .args(args)
        .arg("--out")
        .arg(&out)
        .args(["--drain-secs", "15", "--settle-secs", "0.5"])
        .output()
        .expect("run pgcast-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "pgcast-bench {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("held"), "no table on stdout:\n{stdout}");
    let text = std::fs::read_to_string(&out).expect("report file written");
    let _ = std::fs::remove_file(&out);
    serde_json::from_str(&text).expect("report is JSON")
}

fn u(report: &Value, pointer: &str) -> u64 {
    report
        .pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{pointer} missing in {report:#}"))
}

/// Checks every scenario shares: all connections held, server figures present, no errors.
fn assert_plausible(report: &Value, scenario: &str, clients: u64) {
    assert_eq!(report["scenario"], scenario);
    for field in ["requested", "established", "joined", "held"] {
        assert_eq!(u(report, &format!("/connections/{field}")), clients, "connections.{field}");
    }
    assert_eq!(report["server"]["mode"], "spawned");
    assert!(u(report, "/memory/server_rss_before_kib") > 0);
    assert!(u(report, "/memory/server_rss_held_kib") > 0);
    assert!(report["memory"]["rss_per_connection_bytes"].is_u64());
    assert!(report["cpu"]["server_cpu_secs"].as_f64().is_some_and(|s| s >= 0.0));
    assert!(report["cpu"]["wall_secs"].as_f64().is_some_and(|s| s > 0.0));
    assert_eq!(u(report, "/errors/total"), 0, "errors: {:#}", report["problems"]);
    assert_eq!(u(report, "/disconnects"), 0);
}

/// Deliveries made, none missing or extra, percentiles ordered, in every stage.
fn assert_delivered(report: &Value) {
    let stages = report["stages"].as_array().expect("stages");
    assert!(!stages.is_empty());
    for stage in stages {
        assert!(u(stage, "/deliveries") > 0, "stage without deliveries: {stage:#}");
        assert_eq!(u(stage, "/deliveries"), u(stage, "/deliveries_expected"));
        assert_eq!((u(stage, "/missing"), u(stage, "/extra")), (0, 0));
        assert_eq!(u(stage, "/clients_complete"), u(stage, "/clients_expecting"));
        assert!(stage["deliveries_per_sec"].as_f64().is_some_and(|r| r > 0.0));
        assert_ordered(&stage["latency_ms"]);
    }
    assert_ordered(&report["latency_ms"]);
    assert!(u(report, "/deliveries") > 0);
}

fn assert_ordered(latency: &Value) {
    let p: Vec<f64> = ["p50", "p90", "p99", "p99_9", "max"]
        .iter()
        .map(|k| latency[*k].as_f64().unwrap_or_else(|| panic!("latency.{k} missing in {latency:#}")))
        .collect();
    assert!(p.windows(2).all(|w| w[0] <= w[1]), "percentiles out of order: {p:?}");
    assert!(p[0] >= 0.0);
}

#[test]
fn idle_connections_across_two_worker_processes_are_all_held() {
    let report = run_bench(
        "idle",
        &["idle-connections", "--clients", "20", "--duration-secs", "1", "--clients-per-process", "10"],
    );
    assert_plausible(&report, "idle-connections", 20);
    assert_eq!(u(&report, "/connections/worker_processes"), 2);
    assert_eq!(report["connections"]["server_reported"].as_f64(), Some(20.0));
    assert!(report["stages"].as_array().is_some_and(Vec::is_empty));
}

/// 20 own-rows and 2 table-wide subscribers, 200 commits: each row reaches three of them.
const SMALL_FANOUT: &[&str] =
    &["fanout", "--clients", "20", "--table-wide", "2", "--rate", "100", "--duration-secs", "2"];

/// With `--client-nice` the clients run in a worker process, whose stage report (latency
/// histogram included) travels back to the coordinator as a JSON line.
#[test]
fn fanout_delivers_every_commit_to_own_rows_and_table_wide_subscribers() {
    let report = run_bench("fanout", &[SMALL_FANOUT, &["--client-nice", "5"]].concat());
    assert_plausible(&report, "fanout", 22);
    assert_eq!(u(&report, "/parameters/common/client_nice"), 5);
    assert_delivered(&report);
    let stage = &report["stages"][0];
    // 200 rows: each reaches its one own-rows subscriber and both table-wide subscribers.
    assert_eq!(u(stage, "/rows"), 200);
    assert_eq!(u(stage, "/deliveries"), 200 + 2 * 200);
    // The server's own commit-to-send view over the stage: some writes, shares ascending to 1.
    let server = &stage["server_commit_to_send"];
    assert!(u(server, "/count") > 0, "{server}");
    let shares: Vec<f64> = server["within"]
        .as_array()
        .expect("within")
        .iter()
        .map(|w| w["share"].as_f64().expect("share"))
        .collect();
    assert!(shares.windows(2).all(|w| w[0] <= w[1]) && shares.last() == Some(&1.0), "{server}");
    // The capture's share: one routed transaction per commit.
    assert_eq!(u(stage, "/server_commit_to_route/count"), 200, "{}", stage["server_commit_to_route"]);
}

#[test]
fn broadcast_runs_each_rate_stage_and_reports_the_sustained_rate() {
    let report = run_bench(
        "broadcast",
        &["broadcast", "--clients", "20", "--rate", "20,50", "--duration-secs", "1", "--keep-going"],
    );
    assert_plausible(&report, "broadcast", 20);
    assert_delivered(&report);
    let stages = report["stages"].as_array().expect("stages");
    assert_eq!(stages.len(), 2);
    assert_eq!(u(&stages[1], "/deliveries"), 20 * u(&stages[1], "/sent"));
    assert!(report["max_sustained_deliveries_per_sec"].as_f64().is_some());
}

#[test]
fn broadcast_over_rest_reaches_every_member() {
    let report = run_bench(
        "broadcast-rest",
        &["broadcast", "--clients", "10", "--rate", "20", "--duration-secs", "1", "--via", "rest"],
    );
    assert_plausible(&report, "broadcast", 10);
    assert_delivered(&report);
}

#[test]
fn burst_reports_when_every_subscriber_had_all_rows() {
    let report = run_bench("burst", &["burst", "--clients", "20", "--table-wide", "2", "--rows", "400"]);
    assert_plausible(&report, "burst", 22);
    assert_delivered(&report);
    let stage = &report["stages"][0];
    assert_eq!(u(stage, "/deliveries"), 400 + 2 * 400);
    let all = stage["time_to_all_ms"].as_f64().expect("time_to_all_ms");
    assert!(all >= stage["completion_ms"]["p50"].as_f64().expect("completion p50"));
    assert!(stage["burst"]["insert_ms"].as_f64().is_some());
}

/// The Node baseline (seed 003's design: `ws` + LISTEN/NOTIFY), started by the bench like
/// pgcast; `npm ci` in its directory first (the test script does).
fn node_baseline() -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("baselines/node-ws-notify");
    assert!(
        dir.join("node_modules/ws").is_dir() && dir.join("node_modules/pg").is_dir(),
        "run `npm ci` in {} first",
        dir.display()
    );
    dir.join("serve").display().to_string()
}

#[test]
fn the_node_baseline_is_measured_by_the_same_scenarios() {
    let serve = node_baseline();
    let report = run_bench("baseline-fanout", &[SMALL_FANOUT, &["--pgcast-bin", &serve]].concat());
    assert_plausible(&report, "fanout", 22);
    assert_delivered(&report);
    assert_eq!(report["connections"]["server_reported"].as_f64(), Some(22.0));
    let stage = &report["stages"][0];
    assert_eq!(u(stage, "/deliveries"), 200 + 2 * 200);
    // It has neither of pgcast's latency histograms.
    assert!(stage["server_commit_to_send"].is_null() && stage["server_commit_to_route"].is_null());

    let report = run_bench(
        "baseline-broadcast",
        &["broadcast", "--clients", "10", "--rate", "20", "--duration-secs", "1", "--pgcast-bin", &serve],
    );
    assert_plausible(&report, "broadcast", 10);
    assert_delivered(&report);
}

#[test]
fn socketio_clients_are_measured_by_the_same_scenarios() {
    let report = run_bench("sio-fanout", &[SMALL_FANOUT, &["--protocol", "socketio"]].concat());
    assert_plausible(&report, "fanout", 22);
    assert_delivered(&report);
    assert_eq!(report["parameters"]["common"]["protocol"], "socketio");
    assert_eq!(u(&report["stages"][0], "/deliveries"), 200 + 2 * 200);

    let report = run_bench(
        "sio-broadcast",
        &["broadcast", "--clients", "10", "--rate", "20", "--duration-secs", "1", "--protocol", "socketio"],
    );
    assert_plausible(&report, "broadcast", 10);
    assert_delivered(&report);
}

/// Seed 000's design (`socket.io` + LISTEN/NOTIFY) measured with Socket.IO clients; `npm ci` in
/// its directory first (the test script does).
#[test]
fn the_node_socketio_baseline_is_measured_by_the_same_scenarios() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("baselines/node-socketio-notify");
    assert!(dir.join("node_modules/socket.io").is_dir(), "run `npm ci` in {} first", dir.display());
    let serve = dir.join("serve").display().to_string();
    let args = [SMALL_FANOUT, &["--protocol", "socketio", "--pgcast-bin", &serve]].concat();
    let report = run_bench("sio-baseline-fanout", &args);
    assert_plausible(&report, "fanout", 22);
    assert_delivered(&report);
    assert_eq!(u(&report["stages"][0], "/deliveries"), 200 + 2 * 200);

    let report = run_bench(
        "sio-baseline-broadcast",
        &[
            "broadcast",
            "--clients",
            "10",
            "--rate",
            "20",
            "--duration-secs",
            "1",
            "--via",
            "rest",
            "--protocol",
            "socketio",
            "--pgcast-bin",
            &serve,
        ],
    );
    assert_plausible(&report, "broadcast", 10);
    assert_delivered(&report);
}
