//! The system under test: either a private PostgreSQL plus a `pgcast serve` child process that
//! the bench starts (and kills on exit), or an existing server named by flags. Either way it
//! prepares the bench table and knows the server's pid for `/proc` readings (RSS, CPU time).
//!
//! This module does not generate load and does not interpret results.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgcast::local_postgres::LocalPostgres;
use tokio::process::{Child, Command};

use crate::client::TABLE;
use crate::http;

/// How the bench reaches the server, from the command line.
#[derive(Debug, Clone)]
pub struct TargetOptions {
    pub pgcast_bin: Option<PathBuf>,
    pub server_url: Option<String>,
    pub database_url: Option<String>,
    pub server_pid: Option<u32>,
    pub jwt_secret: Option<String>,
    pub publication: String,
    pub trigger_capture: bool,
    /// Extra lines for the spawned server's configuration file.
    pub server_config: Vec<String>,
    pub server_log_level: String,
}

pub struct Target {
    pub server: SocketAddr,
    pub database_url: String,
    pub jwt_secret: String,
    pub pid: Option<u32>,
    /// `spawned` or `external`.
    pub mode: &'static str,
    server_child: Option<Child>,
    postgres: Option<LocalPostgres>,
    dir: Option<PathBuf>,
}

/// Makes a child process receive SIGKILL when the bench dies, however it dies.
pub fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Raises this process's open-file limit to its hard limit (children inherit it, the spawned
/// server included) and returns the limit now in force.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    limit.rlim_cur
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A random 32-character secret from the kernel's random source.
fn random_secret() -> anyhow::Result<String> {
    let bytes = std::fs::read("/proc/sys/kernel/random/uuid").context("reading a random uuid")?;
    let mut secret: String =
        String::from_utf8_lossy(&bytes).chars().filter(|c| c.is_ascii_hexdigit()).collect();
    secret.insert_str(0, "bench-");
    Ok(secret)
}

impl Target {
    pub async fn start(options: &TargetOptions) -> anyhow::Result<Target> {
        match &options.server_url {
            Some(url) => Target::external(options, url).await,
            None => Target::spawn(options).await,
        }
    }

    async fn external(options: &TargetOptions, url: &str) -> anyhow::Result<Target> {
        let (Some(database_url), Some(jwt_secret)) = (&options.database_url, &options.jwt_secret) else {
            bail!("--server-url needs --database-url and --jwt-secret (and --server-pid for memory and CPU)");
        };
        let host = url
            .trim_start_matches("ws://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let server = host
            .to_socket_addrs()
            .with_context(|| format!("resolving {host}"))?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("{host} has no IPv4 address"))?;
        prepare_table(database_url, &options.publication, options.trigger_capture).await?;
        wait_ready(server, Duration::from_secs(30)).await?;
        Ok(Target {
            server,
            database_url: database_url.clone(),
            jwt_secret: jwt_secret.clone(),
            pid: options.server_pid,
            mode: "external",
            server_child: None,
            postgres: None,
            dir: None,
        })
    }

    async fn spawn(options: &TargetOptions) -> anyhow::Result<Target> {
        let bin = match &options.pgcast_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe().context("locating pgcast-bench")?.with_file_name("pgcast"),
        };
        if !bin.is_file() {
            bail!(
                "pgcast binary not found at {}; build it (cargo build --bins) or pass --pgcast-bin",
                bin.display()
            );
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("pgcast-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut target = Target {
            server: "127.0.0.1:0".parse().context("placeholder address")?,
            database_url: String::new(),
            jwt_secret: random_secret()?,
            pid: None,
            mode: "spawned",
            server_child: None,
            postgres: None,
            dir: Some(dir.clone()),
        };
        let postgres = LocalPostgres::start(&dir.join("pg"), free_port()?)
            .await
            .context("starting the private PostgreSQL")?;
        target.database_url = postgres.url();
        target.postgres = Some(postgres);
        prepare_table(&target.database_url, &options.publication, options.trigger_capture).await?;

        let config_path = dir.join("pgcast.toml");
        let mut config = vec![
            // One connection per distinct `sub` already, but allow reuse of subs across runs.
            "max_connections_per_user = 1000000".to_string(),
            "max_messages_per_second = 1000000".to_string(),
            "heartbeat_timeout_secs = 120".to_string(),
        ];
        config.extend(options.server_config.iter().cloned());
        std::fs::write(&config_path, config.join("\n") + "\n").context("writing the server config")?;

        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse().context("listen address")?;
        let log_path = dir.join("pgcast.log");
        let log = std::fs::File::create(&log_path).context("creating the server log")?;
        let mut command = Command::new(&bin);
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("PGCAST_DATABASE_URL", &target.database_url)
            .env("PGCAST_LISTEN", listen.to_string())
            .env("PGCAST_JWT_SECRET", &target.jwt_secret)
            .env("PGCAST_PUBLICATION", &options.publication)
            .env("PGCAST_CAPTURE", if options.trigger_capture { "trigger" } else { "replication" })
            .env("PGCAST_LOG", &options.server_log_level)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("server log handle")?)
            .stderr(log)
            .kill_on_drop(true);
        die_with_parent(&mut command);
        let child = command.spawn().with_context(|| format!("starting {}", bin.display()))?;
        target.pid = child.id();
        target.server = listen;
        target.server_child = Some(child);
        if let Err(e) = wait_ready(listen, Duration::from_secs(60)).await {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            bail!("{e:#}; server log ends:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        Ok(target)
    }

    /// Where the spawned server's log and PostgreSQL live (removed on exit).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Stops the spawned server (SIGTERM, then SIGKILL after 10 s) and PostgreSQL.
    pub async fn shutdown(mut self) {
        if let Some(mut child) = self.server_child.take() {
            if let Some(pid) = child.id() {
                // SAFETY: plain syscall on our own child's pid.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
        if let Some(mut postgres) = self.postgres.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), postgres.stop()).await;
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // Children die with their handles (kill_on_drop, LocalPostgres's Drop); then the files go.
        self.server_child.take();
        self.postgres.take();
        if let Some(dir) = self.dir.take() {
            std::thread::sleep(Duration::from_millis(300));
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Creates the bench table if missing and captures it (publication, or outbox trigger).
async fn prepare_table(database_url: &str, publication: &str, trigger: bool) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS public.{TABLE} (
                 id bigserial PRIMARY KEY,
                 user_id bigint NOT NULL,
                 sent_at_us bigint NOT NULL,
                 body text NOT NULL DEFAULT ''
             )"
        ))
        .await
        .context("creating the bench table")?;
    let db = pgcast::db::Db::new(database_url);
    if trigger {
        pgcast::capture::outbox::add_table(&db, "public", TABLE)
            .await
            .context("installing the outbox trigger")?;
    } else {
        pgcast::capture::publication::ensure_publication(&db, publication).await.context("publication")?;
        pgcast::capture::publication::add_table(&db, publication, TABLE)
            .await
            .context("adding the bench table to the publication")?;
    }
    Ok(())
}

async fn wait_ready(server: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok((200, _)) = http::get(server, "/ready").await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("server at {server} was not ready within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resident memory of a process in KiB (`VmRSS` in /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system, all threads) of a process in seconds, from /proc/<pid>/stat.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    Some((utime + stime) / ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_rss_and_cpu_time() {
        let pid = std::process::id();
        assert!(rss_kib(pid).is_some_and(|kib| kib > 0));
        assert!(cpu_secs(pid).is_some_and(|s| s >= 0.0));
        assert_eq!(rss_kib(u32::MAX), None);
    }
}
