//! `edge-agent`: the store daemon. `run` serves, `check-config` validates a file (exit 64 and
//! the offending key when it is wrong), `print-default-config` prints a commented default.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_agent::config::{Config, DEFAULT_CONFIG};
use edge_agent::daemon::{self, DaemonError};
use edge_agent::ledger::LedgerError;
use edge_agent::telemetry;

/// sysexits.h codes, so scripts and systemd can tell a bad config from a bad disk.
mod exit {
    pub const USAGE: u8 = 64;
    pub const DATAERR: u8 = 65;
    pub const SOFTWARE: u8 = 70;
    pub const CANTCREAT: u8 = 73;
    pub const TEMPFAIL: u8 = 75;
}

#[derive(Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "store-edge store daemon: devices, ledger and cloud sync for one store"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon until SIGTERM or SIGINT.
    Run {
        #[arg(long, short, default_value = "/etc/edge-agent/config.toml")]
        config: PathBuf,
    },
    /// Check a configuration file; exit 64 naming the offending key if it is wrong.
    CheckConfig {
        #[arg(long, short, default_value = "/etc/edge-agent/config.toml")]
        config: PathBuf,
    },
    /// Print a commented default configuration that check-config accepts.
    PrintDefaultConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Cmd::CheckConfig { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: configuration is valid", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(exit::USAGE)
            }
        },
        Cmd::Run { config: path } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(exit::USAGE);
                }
            };
            let sink = telemetry::init(&config.log.level);
            tracing::info!(version = env!("CARGO_PKG_VERSION"), log_sink = ?sink, "edge-agent starting");
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.runtime.worker_threads)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "Cannot start the async runtime");
                    return ExitCode::from(exit::SOFTWARE);
                }
            };
            match runtime.block_on(daemon::run(config, path)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, error_code = error_code(&e), "edge-agent stopped with an error");
                    ExitCode::from(match &e {
                        DaemonError::Ledger(LedgerError::CannotOpen { .. }) => exit::CANTCREAT,
                        DaemonError::Ledger(l) if l.is_bad_file() => exit::DATAERR,
                        DaemonError::AlreadyRunning(_) => exit::TEMPFAIL,
                        _ => exit::SOFTWARE,
                    })
                }
            }
        }
    }
}

fn error_code(e: &DaemonError) -> &'static str {
    match e {
        DaemonError::Ledger(LedgerError::CannotOpen { .. }) => "LEDGER_CANNOT_OPEN",
        DaemonError::Ledger(l) if l.is_bad_file() => "LEDGER_BAD_FILE",
        DaemonError::Ledger(_) => "LEDGER_IO",
        DaemonError::Signals(_) => "SIGNALS",
        DaemonError::Mqtt(_) => "MQTT_BROKER",
        DaemonError::Sync(_) => "SYNC_CONFIG",
        DaemonError::AlreadyRunning(_) => "ALREADY_RUNNING",
        DaemonError::Control(_) => "CONTROL_SOCKET",
        DaemonError::Metrics(..) => "METRICS_LISTEN",
        DaemonError::ShutdownTimeout(_) => "SHUTDOWN_TIMEOUT",
    }
}
