//! Logging: structured fields to journald when systemd started us (`JOURNAL_STREAM` is set),
//! so `journalctl -u edge-agent STORE_ID=s1` works; human-readable lines on stderr otherwise.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Where log lines went, for the first log line to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSink {
    Journald,
    Stderr,
}

/// Installs the global subscriber with `level` as the filter (`RUST_LOG` overrides it).
pub fn init(level: &str) -> LogSink {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // No prefix: a field `store_id` becomes the journal field STORE_ID.
        if let Ok(journald) = tracing_journald::layer().map(|l| l.with_field_prefix(None)) {
            let _ = tracing_subscriber::registry().with(filter).with(journald).try_init();
            return LogSink::Journald;
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
    LogSink::Stderr
}
