//! A private PostgreSQL cluster started from the machine's installed binaries, for `pgcast demo`
//! and the integration tests.
//!
//! It finds `initdb` and `postgres` on `PATH` or under `/usr/lib/postgresql/*/bin`, creates a data
//! directory with `wal_level=logical`, and runs the server as a child process listening on
//! 127.0.0.1. PostgreSQL refuses to run as root, so when pgcast runs as root the cluster is run as
//! an unprivileged user (`postgres` if it exists, else `nobody`).
//!
//! This is not a production launcher: no tuning, no TLS, trust authentication on loopback only.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// Why the private cluster could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum LocalPostgresError {
    #[error(
        "PostgreSQL server binaries not found (looked for initdb and postgres on PATH and in \
         /usr/lib/postgresql/*/bin); install them with `apt-get install -y postgresql`"
    )]
    BinariesNotFound,
    #[error("running as root but no unprivileged user (`postgres` or `nobody`) exists to run PostgreSQL")]
    NoUnprivilegedUser,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("initdb failed ({status}): {stderr}")]
    Initdb { status: String, stderr: String },
    #[error("PostgreSQL did not accept connections within {0:?}; see {1}")]
    StartTimeout(Duration, PathBuf),
    #[error("PostgreSQL exited during start-up ({0}); see {1}")]
    Exited(String, PathBuf),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LocalPostgresError {
    let what = what.into();
    move |source| LocalPostgresError::Io { what, source }
}

/// A running private cluster. Dropping it kills the server immediately; call [`stop`] for a
/// clean shutdown.
///
/// [`stop`]: LocalPostgres::stop
pub struct LocalPostgres {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
}

impl LocalPostgres {
    /// Creates the cluster under `dir` if it does not exist yet and starts it on `port`.
    pub async fn start(dir: &Path, port: u16) -> Result<Self, LocalPostgresError> {
        let bin_dir = find_bin_dir().ok_or(LocalPostgresError::BinariesNotFound)?;
        let run_as = if unsafe_is_root() {
            Some(unprivileged_user().ok_or(LocalPostgresError::NoUnprivilegedUser)?)
        } else {
            None
        };
        let data_dir = dir.join("data");
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                .map_err(io_err(format!("chown {}", dir.display())))?;
        }
        let mut cluster = LocalPostgres { bin_dir, data_dir, port, run_as, child: None };
        if !cluster.data_dir.join("PG_VERSION").exists() {
            cluster.initdb().await?;
        }
        cluster.start_server().await?;
        Ok(cluster)
    }

    /// Connection string for the `postgres` superuser database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    async fn initdb(&self) -> Result<(), LocalPostgresError> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let out = cmd.output().await.map_err(io_err("running initdb"))?;
        if !out.status.success() {
            return Err(LocalPostgresError::Initdb {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// Starts (or restarts after [`stop`](Self::stop)) the server and waits until it accepts
    /// connections.
    pub async fn start_server(&mut self) -> Result<(), LocalPostgresError> {
        let log_path = self.data_dir.with_file_name("postgres.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(format!("opening {}", log_path.display())))?;
        let log_err = log.try_clone().map_err(io_err("cloning log handle"))?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1", "-k", ""])
            .args(["-c", "wal_level=logical", "-c", "max_wal_senders=10"])
            .args(["-c", "max_replication_slots=10", "-c", "fsync=off"])
            .args(["-c", "max_connections=200", "-c", "TimeZone=UTC"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(io_err("starting postgres"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(LocalPostgresError::Exited(status.to_string(), log_path));
            }
            if tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                return Err(LocalPostgresError::StartTimeout(Duration::from_secs(60), log_path));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.child = Some(child);
        Ok(())
    }

    /// Fast shutdown: PostgreSQL disconnects clients, checkpoints and exits.
    pub async fn stop(&mut self) -> Result<(), LocalPostgresError> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        if let Some(pid) = child.id() {
            // SAFETY: plain syscall on a pid we own as our child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        }
        child.wait().await.map_err(io_err("waiting for postgres to stop"))?;
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
            // Child processes of a root-started cluster must not inherit a HOME they cannot read.
            cmd.env("HOME", "/tmp");
        }
        cmd
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Some(pid) = child.id() {
                // Immediate shutdown so the postmaster also takes its backends down.
                // SAFETY: plain syscall on a pid we own as our child.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGQUIT) };
            }
        }
    }
}

fn unsafe_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn find_bin_dir() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    // Debian keeps the server binaries out of PATH; prefer the newest installed major version.
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|dir| has_both(dir))
        .collect();
    versions.sort_by_key(|dir| {
        dir.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(dir) = versions.pop() {
        return Some(dir);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|dir| has_both(dir))
}

/// uid and gid of `postgres`, else `nobody`, read from /etc/passwd.
fn unprivileged_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let lookup = |name: &str| {
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 4 || fields[0] != name {
                return None;
            }
            Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
        })
    };
    lookup("postgres").or_else(|| lookup("nobody"))
}
