//! The whole configuration surface of `pgcast serve`, validated once at start-up.
//!
//! Values come from, in order of precedence: command-line flags, `PGCAST_*` environment variables
//! (both through [`ConfigOverrides`], which the CLI fills), the TOML file given with `--config`,
//! then defaults. A bad or missing value is a [`ConfigError`] whose message names the key.
//!
//! This module does not connect to anything; it only checks shape and ranges.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:4000";
pub const DEFAULT_PUBLICATION: &str = "pgcast";
pub const DEFAULT_SLOT: &str = "pgcast";
pub const DEFAULT_OUTBOUND_QUEUE: usize = 1024;
/// Default `write_coalesce_ms`.
pub const DEFAULT_WRITE_COALESCE_MS: u64 = 1;
pub const DEFAULT_HEARTBEAT_TIMEOUT_SECS: u64 = 60;
/// Default `sse_keepalive_secs`.
pub const DEFAULT_SSE_KEEPALIVE_SECS: u64 = 15;
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024;
pub const DEFAULT_MAX_MESSAGES_PER_SECOND: u32 = 100;
pub const DEFAULT_MAX_CHANNELS_PER_CONNECTION: usize = 100;
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 50;
pub const DEFAULT_HISTORY_MAX_CHANGES: usize = 10_000;
pub const DEFAULT_HISTORY_MAX_AGE_SECS: u64 = 600;
pub const DEFAULT_JWT_NBF_LEEWAY_SECS: u64 = 5;
pub const DEFAULT_AUTH_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS: usize = 1000;
pub const DEFAULT_HTTP_HEADER_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_MAX_PENDING_CONNECTIONS: usize = 10_000;
pub const DEFAULT_MAX_PENDING_CONNECTIONS_PER_IP: usize = 100;
pub const DEFAULT_BROADCAST_HISTORY_MAX_BYTES: usize = 64 * 1024 * 1024;
pub const DEFAULT_BROADCAST_HISTORY_TOPIC_MAX_BYTES: usize = 1024 * 1024;
const MIN_JWT_SECRET_LEN: usize = 16;

/// A configuration value that is missing or wrong; the message names the key and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("{key} is required (set it in the config file, as {env}, or with --{flag})")]
    Missing { key: &'static str, env: &'static str, flag: &'static str },
    #[error("invalid {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Values given on the command line or in the environment; `None` means "not given".
#[derive(Debug, Default, Clone)]
pub struct ConfigOverrides {
    pub database_url: Option<String>,
    pub listen: Option<String>,
    pub jwt_secret: Option<String>,
    pub publication: Option<String>,
    pub slot: Option<String>,
    pub policy: Option<PathBuf>,
    pub capture: Option<String>,
}

/// How changes are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureMode {
    /// Logical replication from a pgoutput slot (needs `wal_level=logical` and REPLICATION).
    Replication,
    /// Triggers writing an outbox table (`pgcast tables add NAME --mode trigger`).
    Trigger,
}

/// The TOML file's shape. Unknown keys are an error so a typo is not silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    database_url: Option<String>,
    listen: Option<String>,
    jwt_secret: Option<String>,
    publication: Option<String>,
    slot: Option<String>,
    policy: Option<PathBuf>,
    capture: Option<String>,
    audit_app_roles: Option<Vec<String>>,
    outbound_queue: Option<usize>,
    write_coalesce_ms: Option<u64>,
    heartbeat_timeout_secs: Option<u64>,
    sse_keepalive_secs: Option<u64>,
    max_message_bytes: Option<usize>,
    max_messages_per_second: Option<u32>,
    max_channels_per_connection: Option<usize>,
    max_connections_per_user: Option<usize>,
    history_max_changes: Option<usize>,
    history_max_age_secs: Option<u64>,
    jwt_nbf_leeway_secs: Option<u64>,
    auth_timeout_secs: Option<u64>,
    max_unauthenticated_connections: Option<usize>,
    http_header_timeout_secs: Option<u64>,
    max_pending_connections: Option<usize>,
    max_pending_connections_per_ip: Option<usize>,
    broadcast_history_max_bytes: Option<usize>,
    broadcast_history_topic_max_bytes: Option<usize>,
    socketio: Option<FileSocketIo>,
}

/// The file's `[socketio]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSocketIo {
    path: Option<String>,
    ping_interval_ms: Option<u64>,
    ping_timeout_ms: Option<u64>,
    recovery_max_disconnection_secs: Option<u64>,
    connect_rooms: Option<Vec<String>>,
    tables: Option<Vec<crate::rooms::FileTable>>,
}

pub const DEFAULT_SOCKETIO_PATH: &str = "/socket.io/";
/// Socket.IO's own defaults.
pub const DEFAULT_SOCKETIO_PING_INTERVAL_MS: u64 = 25_000;
pub const DEFAULT_SOCKETIO_PING_TIMEOUT_MS: u64 = 20_000;
/// socket.io's `connectionStateRecovery.maxDisconnectionDuration` default: two minutes.
pub const DEFAULT_SOCKETIO_RECOVERY_SECS: u64 = 120;

/// The Socket.IO endpoint (`[socketio]` in the file).
#[derive(Debug, Clone)]
pub struct SocketIoConfig {
    /// Where `socket.io-client`'s `path` option points (default `/socket.io/`); served with
    /// and without the trailing slash.
    pub path: String,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// How long a session whose transport was lost is kept for its client to recover
    /// (`recovery_max_disconnection_secs`; zero: no recovery, no `pid`).
    pub recovery_window: Duration,
    /// Rooms every connection joins when it connects, as templates over its token's claims
    /// (`user:{claims.sub}`); a template naming a claim the token lacks is skipped.
    pub connect_rooms: Vec<String>,
    /// `[[socketio.tables]]`: rooms and subscriptions fed by table changes.
    pub tables: crate::rooms::TableRoutes,
}

impl SocketIoConfig {
    fn load(file: Option<FileSocketIo>) -> Result<SocketIoConfig, ConfigError> {
        let file = file.unwrap_or_default();
        let path = file.path.unwrap_or_else(|| DEFAULT_SOCKETIO_PATH.to_string());
        if !path.starts_with('/') || path.contains(['?', '#', '{', '}', '*']) || path.len() > 200 {
            return Err(ConfigError::Invalid {
                key: "socketio.path",
                message: format!("{path:?} must be an absolute URL path without '?', '#', '{{', '}}' or '*'"),
            });
        }
        let millis = |key: &'static str, value: Option<u64>, default: u64| {
            let value = value.unwrap_or(default);
            if value == 0 || value > 3_600_000 {
                return Err(ConfigError::Invalid { key, message: "must be 1..=3600000 milliseconds".into() });
            }
            Ok(Duration::from_millis(value))
        };
        let ping_interval =
            millis("socketio.ping_interval_ms", file.ping_interval_ms, DEFAULT_SOCKETIO_PING_INTERVAL_MS)?;
        let ping_timeout =
            millis("socketio.ping_timeout_ms", file.ping_timeout_ms, DEFAULT_SOCKETIO_PING_TIMEOUT_MS)?;
        let recovery_secs = file.recovery_max_disconnection_secs.unwrap_or(DEFAULT_SOCKETIO_RECOVERY_SECS);
        if recovery_secs > 3600 {
            return Err(ConfigError::Invalid {
                key: "socketio.recovery_max_disconnection_secs",
                message: "must be 0..=3600 seconds (0 turns recovery off)".into(),
            });
        }
        Ok(SocketIoConfig {
            path,
            ping_interval,
            ping_timeout,
            recovery_window: Duration::from_secs(recovery_secs),
            connect_rooms: file.connect_rooms.unwrap_or_default(),
            tables: crate::rooms::TableRoutes::compile(file.tables.unwrap_or_default())
                .map_err(|message| ConfigError::Invalid { key: "socketio.tables", message })?,
        })
    }
}

/// Validated configuration for one server.
#[derive(Clone)]
pub struct Config {
    pub database_url: String,
    pub listen: SocketAddr,
    pub jwt_secret: String,
    pub publication: String,
    pub slot: String,
    pub capture: CaptureMode,
    /// The row policy and channel authorization file; `None` means default deny (only
    /// `service_role` receives changes).
    pub policy: Option<PathBuf>,
    /// Database roles of the application that may read and append to `pgcast.audit_log`.
    pub audit_app_roles: Vec<String>,
    /// Messages a connection may have queued before it is cut off as too slow.
    pub outbound_queue: usize,
    /// A lone message for a connection that wrote less than this long ago is held until this
    /// long has passed, so a busy connection gets several messages per write (zero: write each
    /// as soon as it is queued).
    pub write_coalesce: Duration,
    /// A client that sends nothing (not even a heartbeat) for this long is disconnected.
    pub heartbeat_timeout: Duration,
    /// Server-Sent Events: a keep-alive comment this often (at most half the heartbeat
    /// timeout, which an event stream's keep-alives stand in for).
    pub sse_keepalive: Duration,
    /// Largest client frame accepted; larger frames close the connection with a reason.
    pub max_message_bytes: usize,
    /// Client frames per second per connection (burst of the same size); more are refused.
    pub max_messages_per_second: u32,
    /// Channels one connection may have joined at once.
    pub max_channels_per_connection: usize,
    /// Connections one user (`sub`) may have at once.
    pub max_connections_per_user: usize,
    /// How much history resuming clients can be served from (and how much WAL is kept for it).
    pub retention: crate::log::Retention,
    /// Seconds a token's `nbf` may lie in the future and still be accepted (clock skew).
    pub jwt_nbf_leeway_secs: u64,
    /// A WebSocket that has presented no valid token (no valid `apikey`, no successful join) is
    /// closed after this long.
    pub auth_timeout: Duration,
    /// WebSocket connections without a valid token at once; more are refused at the upgrade.
    pub max_unauthenticated_connections: usize,
    /// Time a client has to send a complete request head (the upgrade included) after it
    /// connects or after its previous request; then the connection is closed.
    pub http_header_timeout: Duration,
    /// Connections that have not yet sent a complete request head; more are closed at accept.
    pub max_pending_connections: usize,
    /// The same from one client address.
    pub max_pending_connections_per_ip: usize,
    /// Bytes of broadcast payloads kept for resuming members, over all topics and per topic;
    /// the oldest are evicted first.
    pub broadcast_history: crate::broadcast::HistoryBudget,
    pub socketio: SocketIoConfig,
    /// Test-only fault injection: a session that joins this topic panics (see
    /// `tests/session_panics.rs`). Not settable from the file, environment or flags.
    #[doc(hidden)]
    pub panic_on_join_topic: Option<String>,
}

impl std::fmt::Debug for Config {
    // Hand-written so the JWT secret and the database password never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("publication", &self.publication)
            .field("slot", &self.slot)
            .field("capture", &self.capture)
            .field("policy", &self.policy)
            .field("outbound_queue", &self.outbound_queue)
            .field("write_coalesce", &self.write_coalesce)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("sse_keepalive", &self.sse_keepalive)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_messages_per_second", &self.max_messages_per_second)
            .field("max_channels_per_connection", &self.max_channels_per_connection)
            .field("max_connections_per_user", &self.max_connections_per_user)
            .field("retention", &self.retention)
            .field("jwt_nbf_leeway_secs", &self.jwt_nbf_leeway_secs)
            .field("auth_timeout", &self.auth_timeout)
            .field("max_unauthenticated_connections", &self.max_unauthenticated_connections)
            .field("http_header_timeout", &self.http_header_timeout)
            .field("max_pending_connections", &self.max_pending_connections)
            .field("max_pending_connections_per_ip", &self.max_pending_connections_per_ip)
            .field("broadcast_history", &self.broadcast_history)
            .field("socketio", &self.socketio)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Reads the optional file, applies overrides and defaults, and validates everything.
    pub fn load(file: Option<&Path>, overrides: ConfigOverrides) -> Result<Config, ConfigError> {
        let from_file = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::ReadFile { path: path.into(), source })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::ParseFile {
                    path: path.into(),
                    message: e.message().to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        let database_url = overrides.database_url.or(from_file.database_url).ok_or(ConfigError::Missing {
            key: "database_url",
            env: "PGCAST_DATABASE_URL",
            flag: "database-url",
        })?;
        database_url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| ConfigError::Invalid { key: "database_url", message: e.to_string() })?;
        let listen_text = overrides.listen.or(from_file.listen).unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = listen_text.parse::<SocketAddr>().map_err(|_| ConfigError::Invalid {
            key: "listen",
            message: format!("{listen_text:?} is not an address like 127.0.0.1:4000"),
        })?;
        let jwt_secret = overrides.jwt_secret.or(from_file.jwt_secret).ok_or(ConfigError::Missing {
            key: "jwt_secret",
            env: "PGCAST_JWT_SECRET",
            flag: "jwt-secret",
        })?;
        if jwt_secret.len() < MIN_JWT_SECRET_LEN {
            return Err(ConfigError::Invalid {
                key: "jwt_secret",
                message: format!("must be at least {MIN_JWT_SECRET_LEN} characters"),
            });
        }
        let publication = overrides
            .publication
            .or(from_file.publication)
            .unwrap_or_else(|| DEFAULT_PUBLICATION.to_string());
        check_identifier("publication", &publication)?;
        let slot = overrides.slot.or(from_file.slot).unwrap_or_else(|| DEFAULT_SLOT.to_string());
        check_identifier("slot", &slot)?;
        if slot.len() > 55 {
            // pgcast also creates `<slot>_history`, which must fit PostgreSQL's 63 characters.
            return Err(ConfigError::Invalid {
                key: "slot",
                message: "must be at most 55 characters".into(),
            });
        }
        let policy = overrides.policy.or(from_file.policy);
        let capture = match overrides.capture.or(from_file.capture).as_deref() {
            None | Some("replication") => CaptureMode::Replication,
            Some("trigger") => CaptureMode::Trigger,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    key: "capture",
                    message: format!("{other:?} is not a capture mode (replication or trigger)"),
                })
            }
        };
        let outbound_queue = from_file.outbound_queue.unwrap_or(DEFAULT_OUTBOUND_QUEUE);
        if !(16..=1_000_000).contains(&outbound_queue) {
            return Err(ConfigError::Invalid {
                key: "outbound_queue",
                message: "must be between 16 and 1000000 messages".into(),
            });
        }
        let write_coalesce_ms = from_file.write_coalesce_ms.unwrap_or(DEFAULT_WRITE_COALESCE_MS);
        if write_coalesce_ms > 100 {
            return Err(ConfigError::Invalid {
                key: "write_coalesce_ms",
                message: "must be between 0 and 100 milliseconds".into(),
            });
        }
        let heartbeat_secs = from_file.heartbeat_timeout_secs.unwrap_or(DEFAULT_HEARTBEAT_TIMEOUT_SECS);
        if !(5..=3600).contains(&heartbeat_secs) {
            return Err(ConfigError::Invalid {
                key: "heartbeat_timeout_secs",
                message: "must be between 5 and 3600 seconds".into(),
            });
        }
        let sse_keepalive_secs = from_file.sse_keepalive_secs.unwrap_or(DEFAULT_SSE_KEEPALIVE_SECS);
        if !(1..=300).contains(&sse_keepalive_secs) {
            return Err(ConfigError::Invalid {
                key: "sse_keepalive_secs",
                message: format!("{sse_keepalive_secs} must be 1..=300 seconds"),
            });
        }
        let max_message_bytes = from_file.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
        if !(1024..=64 * 1024 * 1024).contains(&max_message_bytes) {
            return Err(ConfigError::Invalid {
                key: "max_message_bytes",
                message: "must be between 1024 and 67108864 bytes".into(),
            });
        }
        let max_messages_per_second =
            from_file.max_messages_per_second.unwrap_or(DEFAULT_MAX_MESSAGES_PER_SECOND);
        let max_channels_per_connection =
            from_file.max_channels_per_connection.unwrap_or(DEFAULT_MAX_CHANNELS_PER_CONNECTION);
        let max_connections_per_user =
            from_file.max_connections_per_user.unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_USER);
        for (key, value) in [
            ("max_messages_per_second", max_messages_per_second as usize),
            ("max_channels_per_connection", max_channels_per_connection),
            ("max_connections_per_user", max_connections_per_user),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid { key, message: "must be at least 1".into() });
            }
        }
        let history_max_changes = from_file.history_max_changes.unwrap_or(DEFAULT_HISTORY_MAX_CHANGES);
        if !(1..=10_000_000).contains(&history_max_changes) {
            return Err(ConfigError::Invalid {
                key: "history_max_changes",
                message: "must be between 1 and 10000000".into(),
            });
        }
        let history_max_age_secs = from_file.history_max_age_secs.unwrap_or(DEFAULT_HISTORY_MAX_AGE_SECS);
        if !(1..=7 * 24 * 3600).contains(&history_max_age_secs) {
            return Err(ConfigError::Invalid {
                key: "history_max_age_secs",
                message: "must be between 1 and 604800 (a week)".into(),
            });
        }
        let jwt_nbf_leeway_secs = from_file.jwt_nbf_leeway_secs.unwrap_or(DEFAULT_JWT_NBF_LEEWAY_SECS);
        if jwt_nbf_leeway_secs > 300 {
            return Err(ConfigError::Invalid {
                key: "jwt_nbf_leeway_secs",
                message: "must be between 0 and 300 seconds".into(),
            });
        }
        let auth_timeout_secs = from_file.auth_timeout_secs.unwrap_or(DEFAULT_AUTH_TIMEOUT_SECS);
        if !(1..=3600).contains(&auth_timeout_secs) {
            return Err(ConfigError::Invalid {
                key: "auth_timeout_secs",
                message: "must be between 1 and 3600 seconds".into(),
            });
        }
        let http_header_timeout_secs =
            from_file.http_header_timeout_secs.unwrap_or(DEFAULT_HTTP_HEADER_TIMEOUT_SECS);
        if !(1..=300).contains(&http_header_timeout_secs) {
            return Err(ConfigError::Invalid {
                key: "http_header_timeout_secs",
                message: "must be between 1 and 300 seconds".into(),
            });
        }
        let max_unauthenticated_connections =
            from_file.max_unauthenticated_connections.unwrap_or(DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS);
        let max_pending_connections =
            from_file.max_pending_connections.unwrap_or(DEFAULT_MAX_PENDING_CONNECTIONS);
        let max_pending_connections_per_ip =
            from_file.max_pending_connections_per_ip.unwrap_or(DEFAULT_MAX_PENDING_CONNECTIONS_PER_IP);
        for (key, value) in [
            ("max_unauthenticated_connections", max_unauthenticated_connections),
            ("max_pending_connections", max_pending_connections),
            ("max_pending_connections_per_ip", max_pending_connections_per_ip),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid { key, message: "must be at least 1".into() });
            }
        }
        let broadcast_history = crate::broadcast::HistoryBudget {
            max_bytes: from_file.broadcast_history_max_bytes.unwrap_or(DEFAULT_BROADCAST_HISTORY_MAX_BYTES),
            topic_max_bytes: from_file
                .broadcast_history_topic_max_bytes
                .unwrap_or(DEFAULT_BROADCAST_HISTORY_TOPIC_MAX_BYTES),
        };
        if broadcast_history.topic_max_bytes > broadcast_history.max_bytes {
            return Err(ConfigError::Invalid {
                key: "broadcast_history_topic_max_bytes",
                message: format!(
                    "must not exceed broadcast_history_max_bytes ({})",
                    broadcast_history.max_bytes
                ),
            });
        }
        let socketio = SocketIoConfig::load(from_file.socketio)?;
        Ok(Config {
            database_url,
            listen,
            jwt_secret,
            publication,
            slot,
            capture,
            policy,
            audit_app_roles: from_file.audit_app_roles.unwrap_or_default(),
            outbound_queue,
            write_coalesce: Duration::from_millis(write_coalesce_ms),
            heartbeat_timeout: Duration::from_secs(heartbeat_secs),
            sse_keepalive: Duration::from_secs(sse_keepalive_secs)
                .min(Duration::from_secs(heartbeat_secs) / 2),
            max_message_bytes,
            max_messages_per_second,
            max_channels_per_connection,
            max_connections_per_user,
            retention: crate::log::Retention {
                max_changes: history_max_changes,
                max_age: Duration::from_secs(history_max_age_secs),
            },
            jwt_nbf_leeway_secs,
            auth_timeout: Duration::from_secs(auth_timeout_secs),
            max_unauthenticated_connections,
            http_header_timeout: Duration::from_secs(http_header_timeout_secs),
            max_pending_connections,
            max_pending_connections_per_ip,
            broadcast_history,
            socketio,
            panic_on_join_topic: None,
        })
    }
}

/// Publication and slot names go into SQL and replication commands unquoted, so they are held to
/// PostgreSQL's rule for slot names: lower-case letters, digits and underscores, at most 63.
fn check_identifier(key: &'static str, value: &str) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            message: format!("{value:?} must be 1-63 characters of a-z, 0-9 and _"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overrides() -> ConfigOverrides {
        ConfigOverrides {
            database_url: Some("postgres://u@localhost/db".into()),
            jwt_secret: Some("0123456789abcdef0123".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_apply_when_only_required_values_are_given() {
        let config = Config::load(None, overrides()).unwrap();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.publication, "pgcast");
        assert_eq!(config.slot, "pgcast");
    }

    #[test]
    fn write_coalescing_defaults_to_a_millisecond_and_is_bounded() {
        assert_eq!(Config::load(None, overrides()).unwrap().write_coalesce, Duration::from_millis(1));
        let dir = std::env::temp_dir().join(format!("pgcast-coalesce-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pgcast.toml");
        std::fs::write(&path, "write_coalesce_ms = 0\n").unwrap();
        assert_eq!(Config::load(Some(&path), overrides()).unwrap().write_coalesce, Duration::ZERO);
        std::fs::write(&path, "write_coalesce_ms = 101\n").unwrap();
        let err = Config::load(Some(&path), overrides()).unwrap_err().to_string();
        assert!(err.starts_with("invalid write_coalesce_ms"), "{err}");
    }

    #[test]
    fn hardening_limits_have_defaults_and_bounds() {
        let config = Config::load(None, overrides()).unwrap();
        assert_eq!(config.jwt_nbf_leeway_secs, 5);
        assert_eq!(config.auth_timeout, Duration::from_secs(10));
        assert_eq!(config.http_header_timeout, Duration::from_secs(10));
        assert_eq!(config.broadcast_history.max_bytes, 64 * 1024 * 1024);
        let dir = std::env::temp_dir().join(format!("pgcast-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pgcast.toml");
        for (text, key) in [
            ("jwt_nbf_leeway_secs = 301\n", "jwt_nbf_leeway_secs"),
            ("auth_timeout_secs = 0\n", "auth_timeout_secs"),
            ("http_header_timeout_secs = 0\n", "http_header_timeout_secs"),
            ("max_pending_connections = 0\n", "max_pending_connections"),
            ("max_pending_connections_per_ip = 0\n", "max_pending_connections_per_ip"),
            ("max_unauthenticated_connections = 0\n", "max_unauthenticated_connections"),
            (
                "broadcast_history_max_bytes = 10\nbroadcast_history_topic_max_bytes = 11\n",
                "broadcast_history_topic_max_bytes",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Config::load(Some(&path), overrides()).unwrap_err().to_string();
            assert!(err.starts_with(&format!("invalid {key}")), "{text}: {err}");
        }
    }

    #[test]
    fn missing_database_url_names_the_env_var() {
        let err = Config::load(None, ConfigOverrides { database_url: None, ..overrides() })
            .unwrap_err()
            .to_string();
        assert!(err.contains("PGCAST_DATABASE_URL"), "{err}");
    }

    #[test]
    fn bad_listen_and_slot_are_rejected() {
        let err =
            Config::load(None, ConfigOverrides { listen: Some("nope".into()), ..overrides() }).unwrap_err();
        assert!(err.to_string().starts_with("invalid listen"), "{err}");
        let err =
            Config::load(None, ConfigOverrides { slot: Some("Bad-Slot".into()), ..overrides() }).unwrap_err();
        assert!(err.to_string().starts_with("invalid slot"), "{err}");
    }

    #[test]
    fn file_values_are_overridden_by_flags_and_unknown_keys_fail() {
        let dir = std::env::temp_dir().join(format!("pgcast-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pgcast.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:5000\"\nslot = \"from_file\"\n").unwrap();
        let config =
            Config::load(Some(&path), ConfigOverrides { slot: Some("from_flag".into()), ..overrides() })
                .unwrap();
        assert_eq!(config.listen.port(), 5000);
        assert_eq!(config.slot, "from_flag");
        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        let err = Config::load(Some(&path), overrides()).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn the_socketio_table_is_validated() {
        let config = Config::load(None, overrides()).unwrap();
        assert_eq!(config.socketio.path, "/socket.io/");
        assert_eq!(config.socketio.ping_interval, Duration::from_secs(25));
        let dir = std::env::temp_dir().join(format!("pgcast-config-sio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pgcast.toml");
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Config::load(Some(&path), overrides()).map_err(|e| e.to_string())
        };
        let config =
            load("[socketio]\npath = \"/api/socket\"\nconnect_rooms = [\"user:{claims.sub}\"]\n").unwrap();
        assert_eq!(config.socketio.path, "/api/socket");
        assert_eq!(config.socketio.connect_rooms, ["user:{claims.sub}"]);
        assert!(load("[socketio]\npath = \"api\"\n").unwrap_err().starts_with("invalid socketio.path"));
        let err = load("[socketio]\nping_interval_ms = 0\n").unwrap_err();
        assert!(err.starts_with("invalid socketio.ping_interval_ms"), "{err}");
        assert!(load("[socketio]\npth = \"/x\"\n").unwrap_err().contains("unknown field"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
