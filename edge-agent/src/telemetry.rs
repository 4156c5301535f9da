//! Logging: structured fields to journald when systemd started us (`JOURNAL_STREAM` is set),
//! so `journalctl -u edge-agent STORE_ID=s1` works; human-readable lines on stderr otherwise.
//! The filter sits behind a reload handle, so SIGHUP can change the level without a restart.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Where log lines went, for the first log line to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSink {
    Journald,
    Stderr,
}

/// The installed filter, and whether `RUST_LOG` chose it.
struct Installed {
    filter: reload::Handle<EnvFilter, Registry>,
    from_env: bool,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Why [`set_level`] left the filter as it was.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("RUST_LOG is set and takes precedence over [log] level; unset it in the service's environment to change the level by reload")]
    RustLogOverrides,
    #[error("this process did not install the log subscriber, so it cannot change its level")]
    NotInstalled,
    #[error("{level:?} is not a valid log filter: {message}")]
    BadFilter { level: String, message: String },
    #[error("cannot apply the log filter: {0}")]
    Reload(String),
}

/// Installs the global subscriber with `level` as the filter (`RUST_LOG` overrides it).
pub fn init(level: &str) -> LogSink {
    let (filter, from_env) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, true),
        Err(_) => (EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")), false),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let installed = || {
        let _ = INSTALLED.set(Installed { filter: handle.clone(), from_env });
    };
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // No prefix: a field `store_id` becomes the journal field STORE_ID.
        if let Ok(journald) = tracing_journald::layer().map(|l| l.with_field_prefix(None)) {
            if tracing_subscriber::registry().with(filter).with(journald).try_init().is_ok() {
                installed();
            }
            return LogSink::Journald;
        }
    }
    if tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .try_init()
        .is_ok()
    {
        installed();
    }
    LogSink::Stderr
}

/// Replaces the filter [`init`] installed with `level`, unless `RUST_LOG` chose it.
pub fn set_level(level: &str) -> Result<(), ReloadError> {
    let installed = INSTALLED.get().ok_or(ReloadError::NotInstalled)?;
    if installed.from_env {
        return Err(ReloadError::RustLogOverrides);
    }
    let filter = EnvFilter::try_new(level)
        .map_err(|e| ReloadError::BadFilter { level: level.to_owned(), message: e.to_string() })?;
    installed.filter.reload(filter).map_err(|e| ReloadError::Reload(e.to_string()))
}
