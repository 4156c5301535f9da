//! `cloud-sync`: the service every store syncs with, plus the HQ API. `serve` runs it;
//! `check-config` validates a file (exit 64 naming the offending key), `print-default-config`
//! prints a commented default, `migrate` creates or upgrades the database, `store add` and
//! `admin add` create credentials and print their token once.
//!
//! Exit codes (sysexits.h): 0 ok, 64 usage or configuration, 65 data (a store or credential
//! that exists already, a database from a newer build), 69 unavailable (the database cannot be
//! reached, the listen address cannot be bound), 70 internal.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use cloud_sync::auth::Token;
use cloud_sync::config::{Backend, Config, DEFAULT_CONFIG};
use cloud_sync::expiry;
use cloud_sync::http::{self, Settings};
use cloud_sync::storage::postgres::PostgresStorage;
use cloud_sync::storage::sqlite::SqliteStorage;
use cloud_sync::storage::{Storage, StorageError};
use shared::StoreId;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// sysexits.h codes, so scripts and systemd can tell a bad config from a dead database.
mod exit {
    pub const USAGE: u8 = 64;
    pub const DATAERR: u8 = 65;
    pub const UNAVAILABLE: u8 = 69;
    pub const SOFTWARE: u8 = 70;
}

/// Requests in flight get this long to finish after SIGTERM; a second signal exits at once.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// Set once the log subscriber is installed.
static LOGGING: AtomicBool = AtomicBool::new(false);

const DEFAULT_CONFIG_PATH: &str = "/etc/cloud-sync/config.toml";

use shared::notify;

#[derive(Parser)]
#[command(name = "cloud-sync", version, about = "store-edge cloud: the store sync endpoint and the HQ API")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve until SIGTERM or SIGINT (creates or upgrades the schema first).
    Serve {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Check a configuration file; exit 64 naming the offending key if it is wrong.
    CheckConfig {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Print a commented default configuration that check-config accepts.
    PrintDefaultConfig,
    /// Create or upgrade the database schema.
    Migrate {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Manage stores.
    Store {
        #[command(subcommand)]
        command: StoreCmd,
    },
    /// Manage HQ admin credentials.
    Admin {
        #[command(subcommand)]
        command: AdminCmd,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Register a store and print its bearer token (once: only its SHA-256 is kept).
    Add {
        store: String,
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Create an HQ admin credential and print its bearer token (once: only its SHA-256 is kept).
    Add {
        name: String,
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

/// Why a command failed, and so its exit code.
#[derive(Debug)]
enum Failure {
    Usage(String),
    Data(String),
    Unavailable(String),
    Internal(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Usage(_) => exit::USAGE,
            Failure::Data(_) => exit::DATAERR,
            Failure::Unavailable(_) => exit::UNAVAILABLE,
            Failure::Internal(_) => exit::SOFTWARE,
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::Usage(m) | Failure::Data(m) | Failure::Unavailable(m) | Failure::Internal(m) => m,
        }
    }

    fn error_code(&self) -> &'static str {
        match self {
            Failure::Usage(_) => "USAGE",
            Failure::Data(_) => "DATA",
            Failure::Unavailable(_) => "UNAVAILABLE",
            Failure::Internal(_) => "INTERNAL",
        }
    }
}

impl From<StorageError> for Failure {
    fn from(e: StorageError) -> Failure {
        match e {
            StorageError::StoreExists(_)
            | StorageError::AdminExists(_)
            | StorageError::TooNew { .. }
            | StorageError::Corrupt(_)
            | StorageError::Overflow { .. } => Failure::Data(e.to_string()),
            StorageError::Sqlite(_) | StorageError::Postgres(_) => Failure::Unavailable(e.to_string()),
            StorageError::Task(_) | StorageError::Invariant(_) => Failure::Internal(e.to_string()),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors.
            return if e.use_stderr() { ExitCode::from(exit::USAGE) } else { ExitCode::SUCCESS };
        }
    };
    let serving = matches!(cli.command, Cmd::Serve { .. });
    let result = match cli.command {
        Cmd::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            Ok(())
        }
        Cmd::CheckConfig { config } => load(&config).map(|_| println!("{}: configuration is valid", config.display())),
        Cmd::Serve { config } => load(&config).and_then(|c| {
            init_logging(&c.log.level);
            runtime(true)?.block_on(serve(c))
        }),
        Cmd::Migrate { config } => load(&config).and_then(|c| {
            init_logging(&c.log.level);
            runtime(false)?.block_on(migrate(c))
        }),
        Cmd::Store { command: StoreCmd::Add { store, config } } => load(&config).and_then(|c| {
            let store = StoreId::new(store).map_err(|e| Failure::Usage(e.to_string()))?;
            init_logging(&c.log.level);
            runtime(false)?.block_on(add_store(c, store))
        }),
        Cmd::Admin { command: AdminCmd::Add { name, config } } => load(&config).and_then(|c| {
            check_admin_name(&name)?;
            init_logging(&c.log.level);
            runtime(false)?.block_on(add_admin(c, name))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if serving && LOGGING.load(Ordering::Relaxed) {
                // The service's own log (the journal under systemd) says why it stopped.
                tracing::error!(error = failure.message(), error_code = failure.error_code(), "cloud-sync stopped");
            } else {
                eprintln!("error: {}", failure.message());
            }
            ExitCode::from(failure.code())
        }
    }
}

fn load(path: &Path) -> Result<Config, Failure> {
    Config::load(path).map_err(|e| Failure::Usage(e.to_string()))
}

fn check_admin_name(name: &str) -> Result<(), Failure> {
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b)) {
        return Err(Failure::Usage(format!(
            "invalid admin name {:?}: 1 to 64 ASCII letters, digits, '-', '_', '.', '@'",
            name.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

fn runtime(multi_thread: bool) -> Result<tokio::runtime::Runtime, Failure> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all().build().map_err(|e| Failure::Internal(format!("cannot start the async runtime: {e}")))
}

/// Logs to journald when systemd started us (`JOURNAL_STREAM` is set), so
/// `journalctl -u cloud-sync STORE_ID=s1` works; human-readable lines on stderr otherwise.
fn init_logging(level: &str) {
    LOGGING.store(true, Ordering::Relaxed);
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // No prefix: a field `store_id` becomes the journal field STORE_ID.
        if let Ok(journald) = tracing_journald::layer().map(|l| l.with_field_prefix(None)) {
            let _ = tracing_subscriber::registry().with(filter).with(journald).try_init();
            return;
        }
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .try_init();
}

/// Opens the configured backend and runs `$body` with it bound to `$s` (the storage trait is
/// generic, so each backend gets its own copy of the body).
macro_rules! with_storage {
    ($config:expr, |$s:ident| $body:expr) => {
        match $config.storage.backend {
            Backend::Sqlite => {
                let path = $config.storage.path.as_deref().unwrap_or(Path::new(""));
                let $s = SqliteStorage::open(path)
                    .map_err(|e| Failure::Unavailable(format!("cannot open {}: {e}", path.display())))?;
                $body
            }
            Backend::Postgres => {
                let url = $config.storage.url.as_deref().unwrap_or("");
                let $s = PostgresStorage::connect(url)
                    .await
                    .map_err(|e| Failure::Unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
                $body
            }
        }
    };
}

async fn migrate(config: Config) -> Result<(), Failure> {
    with_storage!(config, |storage| storage.migrate().await?);
    println!("database schema is up to date");
    Ok(())
}

async fn add_store(config: Config, store: StoreId) -> Result<(), Failure> {
    let token = Token::generate();
    with_storage!(config, |storage| {
        storage.migrate().await?;
        storage.add_store(&store, token.sha256(), http::now_ms()).await.map_err(|e| match e {
            StorageError::StoreExists(_) => {
                Failure::Data(format!("store {store} already exists; its token is unchanged"))
            }
            other => other.into(),
        })?
    });
    reveal(&token, &format!("store {store} added"))
}

async fn add_admin(config: Config, name: String) -> Result<(), Failure> {
    let token = Token::generate();
    with_storage!(config, |storage| {
        storage.migrate().await?;
        storage.add_admin(&name, token.sha256(), http::now_ms()).await.map_err(|e| match e {
            StorageError::AdminExists(_) => {
                Failure::Data(format!("admin credential {name} already exists; its token is unchanged"))
            }
            other => other.into(),
        })?
    });
    reveal(&token, &format!("HQ admin credential {name} added"))
}

/// Prints a new token alone on stdout (for scripts), and what it is on stderr.
fn reveal(token: &Token, what: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", token.reveal())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::Internal(format!("cannot print the token: {e}")))?;
    eprintln!("{what}. Its bearer token is printed above, this once: only its SHA-256 is kept.");
    Ok(())
}

async fn serve(config: Config) -> Result<(), Failure> {
    with_storage!(config, |storage| run(storage, &config).await)
}

async fn run<S: Storage>(storage: S, config: &Config) -> Result<(), Failure> {
    storage.migrate().await?;
    // Signal handlers first: a SIGTERM right after the address is announced must not kill us.
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| Failure::Internal(format!("cannot handle SIGTERM: {e}")))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| Failure::Internal(format!("cannot handle SIGINT: {e}")))?;
    let listen = config.server.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Failure::Unavailable(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener.local_addr().map_err(|e| Failure::Internal(format!("no local address: {e}")))?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}").and_then(|()| out.flush());
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %addr,
        backend = ?config.storage.backend,
        "cloud-sync serving"
    );
    notify::ready(&format!("Serving on {addr} ({:?} storage)", config.storage.backend));
    let mut watchdog = notify::Watchdog::from_env();
    let shutdown = async move {
        // Polled by the server itself, so the pings stop if it hangs.
        let name = loop {
            tokio::select! {
                _ = sigterm.recv() => break "SIGTERM",
                _ = sigint.recv() => break "SIGINT",
                () = watchdog.due() => notify::watchdog_ping(),
            }
        };
        notify::stopping(&format!("Shutting down on {name}: finishing requests in flight"));
        tracing::info!(signal = name, "Shutting down: finishing requests in flight");
        tokio::spawn(async move {
            let why = tokio::select! {
                _ = tokio::time::sleep(SHUTDOWN_DEADLINE) => "requests still in flight after the deadline",
                _ = sigterm.recv() => "second signal",
                _ = sigint.recv() => "second signal",
            };
            tracing::error!(reason = why, error_code = "SHUTDOWN_FORCED", "Forced exit");
            std::process::exit(i32::from(exit::SOFTWARE));
        });
    };
    // Online orders not picked up in time are cancelled as expired, every sweep interval.
    let stop_sweeping = CancellationToken::new();
    let sweeper = tokio::spawn(expiry::run(
        storage.clone(),
        Duration::from_secs(config.orders.expiry_sweep_seconds),
        stop_sweeping.clone(),
    ));
    let router = http::router(storage, Settings::from_config(config));
    let served = http::serve(listener, router, shutdown).await;
    stop_sweeping.cancel();
    if let Err(e) = sweeper.await {
        tracing::error!(error = %e, "The order expiry task failed");
    }
    served.map_err(|e| Failure::Internal(format!("server failed: {e}")))?;
    tracing::info!("cloud-sync stopped");
    Ok(())
}
