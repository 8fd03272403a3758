//! The `pgcast` command line: `serve`, `demo`, `tables` and `token`.
//!
//! The binary's edge: parses arguments, sets up logging, runs, and turns errors into one clear
//! line and an exit status (2 for configuration errors). `anyhow` lives here only.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pgcast::config::{Config, ConfigOverrides};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "pgcast",
    version,
    about = "Real-time PostgreSQL changes over WebSocket (Supabase Realtime protocol)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server against an existing PostgreSQL.
    Serve(ServeArgs),
    /// Start a private PostgreSQL with a demo table and run the server on it.
    Demo(DemoArgs),
    /// Manage which tables are streamed (the publication).
    Tables {
        #[command(flatten)]
        db: DbArgs,
        #[command(subcommand)]
        action: TablesAction,
    },
    /// Print a signed HS256 token for testing clients.
    Token(TokenArgs),
    /// Serve the Engine.IO/Socket.IO conformance fixture (echo handlers at /engine.io/ and
    /// /socket.io/, pingInterval 300 ms, pingTimeout 200 ms) for the upstream protocol suites.
    Conformance {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:3000")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file; flags and PGCAST_* variables override its values.
    #[arg(long, env = "PGCAST_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "PGCAST_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Address to listen on [default: 127.0.0.1:4000].
    #[arg(long, env = "PGCAST_LISTEN")]
    listen: Option<String>,
    /// Secret that client JWTs are signed with (HS256).
    #[arg(long, env = "PGCAST_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Publication to stream [default: pgcast].
    #[arg(long, env = "PGCAST_PUBLICATION")]
    publication: Option<String>,
    /// Logical replication slot [default: pgcast].
    #[arg(long, env = "PGCAST_SLOT")]
    slot: Option<String>,
    /// Row policy and channel authorization file (TOML) [default: only service_role sees rows].
    #[arg(long, env = "PGCAST_POLICY")]
    policy: Option<PathBuf>,
    /// How changes are captured: replication (default) or trigger.
    #[arg(long, env = "PGCAST_CAPTURE")]
    capture: Option<String>,
}

#[derive(Args)]
struct DemoArgs {
    /// Where the demo cluster keeps its data.
    #[arg(long, default_value = ".pgcast-demo")]
    dir: PathBuf,
    /// Port of the demo PostgreSQL.
    #[arg(long, default_value_t = 54329)]
    pg_port: u16,
    /// Address the server listens on.
    #[arg(long, default_value = "127.0.0.1:4000")]
    listen: String,
    /// Row policy and channel authorization file [default: the built-in copy of
    /// examples/policy.toml].
    #[arg(long)]
    policy: Option<PathBuf>,
    /// TOML configuration file for everything the demo does not set itself (limits,
    /// `[socketio]`, ...); the database, listen address, secret and policy stay the demo's.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct DbArgs {
    #[arg(long, env = "PGCAST_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    #[arg(long, env = "PGCAST_PUBLICATION", default_value = "pgcast")]
    publication: String,
}

#[derive(Subcommand)]
enum TablesAction {
    /// Capture a table (`name` or `schema.name`): add it to the publication, or with
    /// `--mode trigger` install the outbox capture trigger.
    Add {
        table: String,
        #[arg(long, default_value = "replication", value_parser = ["replication", "trigger"])]
        mode: String,
    },
    /// Stop capturing a table.
    Remove {
        table: String,
        #[arg(long, default_value = "replication", value_parser = ["replication", "trigger"])]
        mode: String,
    },
    /// List published tables and their replica identity.
    List,
}

#[derive(Args)]
struct TokenArgs {
    #[arg(long, env = "PGCAST_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    #[arg(long, default_value = "authenticated")]
    role: String,
    #[arg(long)]
    sub: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
}

/// An error that is the user's configuration, not a failure: exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PGCAST_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Demo(args) => demo(args).await,
        Command::Tables { db, action } => tables(db, action).await,
        Command::Token(args) => {
            let claims = token_claims(&args.role, args.sub.as_deref(), args.ttl);
            println!("{}", pgcast::auth::sign(&args.jwt_secret, &claims)?);
            Ok(())
        }
        Command::Conformance { listen } => {
            pgcast::conformance::serve(listen).await.with_context(|| format!("cannot serve on {listen}"))
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = ConfigOverrides {
        database_url: args.database_url,
        listen: args.listen,
        jwt_secret: args.jwt_secret,
        publication: args.publication,
        slot: args.slot,
        policy: args.policy,
        capture: args.capture,
    };
    let config = Config::load(args.config.as_deref(), overrides).map_err(|e| UsageError(e.to_string()))?;
    tracing::info!(config = ?config, "starting");
    let server = pgcast::server::start(config).await.context("cannot start")?;
    pgcast::server::wait_for_signal().await;
    server.shutdown().await;
    Ok(())
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let dir = std::path::absolute(&args.dir).context("resolving --dir")?;
    let mut cluster = pgcast::demo::prepare(&dir, args.pg_port, "pgcast").await?;
    let secret = pgcast::random::hex_id();
    let policy = match args.policy {
        Some(path) => path,
        None => {
            let path = dir.join("policy.toml");
            std::fs::write(&path, pgcast::demo::DEMO_POLICY).context("writing the demo policy")?;
            path
        }
    };
    let config = Config::load(
        args.config.as_deref(),
        ConfigOverrides {
            database_url: Some(cluster.url()),
            listen: Some(args.listen),
            jwt_secret: Some(secret.clone()),
            policy: Some(policy.clone()),
            ..Default::default()
        },
    )
    .map_err(|e| UsageError(e.to_string()))?;
    let server = pgcast::server::start(config).await.context("cannot start the server")?;
    let token = pgcast::auth::sign(&secret, &token_claims("service_role", None, 24 * 3600))?;
    let as_user = |role: &str, sub: &str| -> anyhow::Result<String> {
        let mut claims = token_claims(role, Some(sub), 24 * 3600);
        claims["tenant_id"] = json!(1);
        Ok(pgcast::auth::sign(&secret, &claims)?)
    };
    let patient = as_user("patient", "7")?;
    let provider = as_user("provider", "3")?;
    let ws = format!("ws://{}/realtime/v1", server.addr);
    println!("pgcast demo is running.");
    println!("  PostgreSQL:  {}   (data in {})", cluster.url(), dir.display());
    println!("  Realtime:    {ws}/websocket?apikey=<token>&vsn=2.0.0");
    println!(
        "  Socket.IO:   http://{}{}   (socket.io-client: io(URL, {{ auth: {{ token: TOKEN }} }}))",
        server.addr, server.state.config.socketio.path
    );
    println!("  Health:      http://{}/health   Metrics: http://{}/metrics", server.addr, server.addr);
    println!("  JWT secret:  {secret}");
    println!("  Policy:      {}", policy.display());
    println!("  Tokens (24 h):");
    println!("    service_role (every row):              {token}");
    println!("    patient 7 of clinic 1 (own rows):      {patient}");
    println!("    provider 3 of clinic 1 (no notes):     {provider}");
    println!("Subscribe with @supabase/realtime-js:");
    println!("  new RealtimeClient('{ws}', {{ params: {{ apikey: TOKEN }} }})");
    println!("    .channel('clinic').on('postgres_changes', {{ event: '*', schema: 'public', table: 'appointments' }}, console.log).subscribe()");
    println!("Then change a row:");
    println!(
        "  psql '{}' -c \"INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at) VALUES (1, 7, 3, now() + interval '1 day')\"",
        cluster.url()
    );
    println!("Stop with Ctrl-C.");
    println!(
        "{}",
        json!({
            "event": "demo_ready",
            "realtime_url": ws,
            "database_url": cluster.url(),
            "jwt_secret": secret,
            "service_token": token,
            "patient_token": patient,
            "provider_token": provider,
            "http": format!("http://{}", server.addr),
        })
    );
    pgcast::server::wait_for_signal().await;
    server.shutdown().await;
    cluster.stop().await?;
    Ok(())
}

async fn tables(db_args: DbArgs, action: TablesAction) -> anyhow::Result<()> {
    use pgcast::capture::publication;
    let url = db_args.database_url.ok_or_else(|| {
        UsageError("database_url is required (set PGCAST_DATABASE_URL or --database-url)".into())
    })?;
    let db = pgcast::db::Db::new(&url);
    let name = &db_args.publication;
    match action {
        TablesAction::Add { table, mode } if mode == "trigger" => {
            let (schema, table_name) = publication::split_table_name(&table)?;
            pgcast::capture::outbox::add_table(&db, &schema, &table_name).await?;
            println!("{schema}.{table_name} is captured by trigger into pgcast.outbox");
        }
        TablesAction::Add { table, .. } => {
            publication::ensure_publication(&db, name).await?;
            let added = publication::add_table(&db, name, &table).await?;
            println!("{added} is in publication {name}");
        }
        TablesAction::Remove { table, mode } if mode == "trigger" => {
            let (schema, table_name) = publication::split_table_name(&table)?;
            pgcast::capture::outbox::remove_table(&db, &schema, &table_name).await?;
            println!("{schema}.{table_name} is no longer captured by trigger");
        }
        TablesAction::Remove { table, .. } => {
            let removed = publication::remove_table(&db, name, &table).await?;
            println!("{removed} removed from publication {name}");
        }
        TablesAction::List => {
            for (table, identity) in publication::list_tables(&db, name).await? {
                println!("{table}\treplica identity {identity}");
            }
            for table in pgcast::capture::outbox::list_tables(&db).await? {
                println!("{table}\ttrigger");
            }
        }
    }
    Ok(())
}

fn token_claims(role: &str, sub: Option<&str>, ttl: u64) -> serde_json::Value {
    let mut claims = json!({ "role": role, "exp": pgcast::auth::now_secs() + ttl, "iss": "pgcast" });
    if let Some(sub) = sub {
        claims["sub"] = json!(sub);
    }
    claims
}
