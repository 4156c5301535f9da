//! The service's configuration file: TOML, every key known (an unknown key is an error, not a
//! silent typo), every error naming the file, the key path and what was expected, the way
//! `edge-agent` does it. [`DEFAULT_CONFIG`] is the commented default `print-default-config`
//! prints; `check-config` accepts it as it is.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use shared::sync::MAX_PAGE_ROWS;

/// The commented default configuration (`cloud-sync print-default-config`).
pub const DEFAULT_CONFIG: &str = r#"# cloud-sync configuration: the endpoint every store syncs with, and the HQ API.
# Every key is optional except [storage]; an unknown key is an error (check-config names it).

[server]
# Address to listen on. Put TLS termination (or a load balancer) in front when it is not loopback.
listen = "127.0.0.1:8750"
# Largest request body accepted, in bytes; a larger one is refused with 413 before it is read.
# A sync push carries at most 20000 rows (a few MB), a catalog import at most 100000 rows.
max_body_bytes = 33554432

[storage]
# "sqlite" (embedded, one service process) or "postgres" (several processes on one database).
backend = "sqlite"
# SQLite: the database file (created by `cloud-sync migrate`).
path = "/var/lib/cloud-sync/cloud.db"
# PostgreSQL: a libpq conninfo, e.g. "host=/run/postgresql dbname=cloud user=cloud-sync"
# or "postgresql://cloud-sync@db.internal/cloud". Set it instead of `path` with backend = "postgres".
# url = "host=/run/postgresql dbname=cloud user=cloud-sync"

[sync]
# A store stamp further ahead of the cloud's clock than this is refused (409), naming the skew.
max_skew_ms = 300000
# Most rows in one pulled page (at most 20000); the store pulls again while `more` is set.
page_rows = 20000

[prices]
# An HQ price change is held for confirmation when it drops the price by more than this percent
# against the current price of the same register (or, for a new register, the effective price)...
hold_decrease_pct = 60
# ...or raises it by more than this percent.
hold_increase_pct = 100

[orders]
# An online pickup order not picked up within this many minutes of its creation expires: the
# cloud cancels it (reason "expired") and its units go back to the store. HQ may give an order
# its own window ("pickup_window_minutes" in POST /v1/hq/orders). At most 525600 (a year).
pickup_window_minutes = 2880
# How often the service looks for expired orders, in seconds.
expiry_sweep_seconds = 60

[log]
# A tracing filter: error, warn, info, debug, trace, or e.g. "cloud_sync=debug,warn".
# RUST_LOG overrides it. Logs go to journald when systemd starts the service, stderr otherwise.
level = "info"
"#;

/// Largest `server.max_body_bytes` accepted (1 GiB).
pub const MAX_BODY_BYTES_LIMIT: usize = 1 << 30;
/// Longest pickup window, in minutes (a year), in the configuration and in an order request.
pub const MAX_PICKUP_WINDOW_MINUTES: u64 = 525_600;
/// Longest interval between expiry sweeps, in seconds (a day).
pub const MAX_EXPIRY_SWEEP_SECONDS: u64 = 86_400;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerSection,
    pub storage: StorageSection,
    #[serde(default)]
    pub sync: SyncSection,
    #[serde(default)]
    pub prices: PricesSection,
    #[serde(default)]
    pub orders: OrdersSection,
    #[serde(default)]
    pub log: LogSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection { listen: SocketAddr::from(([127, 0, 0, 1], 8750)), max_body_bytes: 32 << 20 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    pub backend: Backend,
    /// SQLite database file.
    pub path: Option<PathBuf>,
    /// PostgreSQL conninfo; may carry a password, so it is redacted in `Debug`.
    pub url: Option<String>,
}

impl std::fmt::Debug for StorageSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageSection")
            .field("backend", &self.backend)
            .field("path", &self.path)
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncSection {
    pub max_skew_ms: u64,
    pub page_rows: u32,
}

impl Default for SyncSection {
    fn default() -> Self {
        SyncSection { max_skew_ms: 300_000, page_rows: MAX_PAGE_ROWS }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricesSection {
    pub hold_decrease_pct: u32,
    pub hold_increase_pct: u32,
}

impl Default for PricesSection {
    fn default() -> Self {
        PricesSection { hold_decrease_pct: 60, hold_increase_pct: 100 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrdersSection {
    pub pickup_window_minutes: u64,
    pub expiry_sweep_seconds: u64,
}

impl Default for OrdersSection {
    fn default() -> Self {
        OrdersSection { pickup_window_minutes: 2_880, expiry_sweep_seconds: 60 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// A tracing filter: `info`, `debug`, `cloud_sync=debug,warn`...
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection { level: "info".into() }
    }
}

/// A configuration problem: which file, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}{message}", file.display(), key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: Option<String>,
    pub message: String,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            key: None,
            message: format!("cannot read the configuration file: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates; `file` only names the source in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let err = |key: Option<String>, message: String| ConfigError { file: file.to_owned(), key, message };
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.message().trim_end().to_owned();
            let location = inner
                .span()
                .map(|span| {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            // serde_path_to_error's path already ends with an unknown key's own name.
            err((path != ".").then_some(path), format!("{message}{location}"))
        })?;
        config.validate().map_err(|(key, message)| err(Some(key.to_owned()), message))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        let s = &self.server;
        if !(1_024..=MAX_BODY_BYTES_LIMIT).contains(&s.max_body_bytes) {
            return Err((
                "server.max_body_bytes",
                format!("must be between 1024 and {MAX_BODY_BYTES_LIMIT}, got {}", s.max_body_bytes),
            ));
        }
        let st = &self.storage;
        match st.backend {
            Backend::Sqlite => {
                match &st.path {
                    None => return Err(("storage.path", "backend \"sqlite\" needs the database file path".into())),
                    Some(p) if p.as_os_str().is_empty() => return Err(("storage.path", "must not be empty".into())),
                    Some(_) => {}
                }
                if st.url.is_some() {
                    return Err((
                        "storage.url",
                        "is only used with backend = \"postgres\"; remove it or change the backend".into(),
                    ));
                }
            }
            Backend::Postgres => {
                match &st.url {
                    None => return Err(("storage.url", "backend \"postgres\" needs a conninfo".into())),
                    Some(u) if u.trim().is_empty() => return Err(("storage.url", "must not be empty".into())),
                    Some(_) => {}
                }
                if st.path.is_some() {
                    return Err((
                        "storage.path",
                        "is only used with backend = \"sqlite\"; remove it or change the backend".into(),
                    ));
                }
            }
        }
        if !(1..=86_400_000).contains(&self.sync.max_skew_ms) {
            return Err((
                "sync.max_skew_ms",
                format!("must be between 1 and 86400000 (a day), got {}", self.sync.max_skew_ms),
            ));
        }
        if !(1..=MAX_PAGE_ROWS).contains(&self.sync.page_rows) {
            return Err((
                "sync.page_rows",
                format!("must be between 1 and {MAX_PAGE_ROWS}, got {}", self.sync.page_rows),
            ));
        }
        if self.prices.hold_decrease_pct > 100 {
            return Err((
                "prices.hold_decrease_pct",
                format!("must be between 0 and 100, got {}", self.prices.hold_decrease_pct),
            ));
        }
        if self.prices.hold_increase_pct > 100_000 {
            return Err((
                "prices.hold_increase_pct",
                format!("must be between 0 and 100000, got {}", self.prices.hold_increase_pct),
            ));
        }
        if !(1..=MAX_PICKUP_WINDOW_MINUTES).contains(&self.orders.pickup_window_minutes) {
            return Err((
                "orders.pickup_window_minutes",
                format!(
                    "must be between 1 and {MAX_PICKUP_WINDOW_MINUTES} (a year), got {}",
                    self.orders.pickup_window_minutes
                ),
            ));
        }
        if !(1..=MAX_EXPIRY_SWEEP_SECONDS).contains(&self.orders.expiry_sweep_seconds) {
            return Err((
                "orders.expiry_sweep_seconds",
                format!(
                    "must be between 1 and {MAX_EXPIRY_SWEEP_SECONDS} (a day), got {}",
                    self.orders.expiry_sweep_seconds
                ),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(("log.level", format!("not a valid filter ({e}); use error, warn, info, debug or trace")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    const SQLITE: &str = "[storage]\nbackend = \"sqlite\"\npath = \"/tmp/x.db\"\n";

    #[test]
    fn the_default_config_is_accepted() {
        let c = parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(c.server.max_body_bytes, 32 << 20);
        assert_eq!(c.storage.backend, Backend::Sqlite);
        assert_eq!(c.sync.page_rows, MAX_PAGE_ROWS);
        assert_eq!((c.prices.hold_decrease_pct, c.prices.hold_increase_pct), (60, 100));
        assert_eq!((c.orders.pickup_window_minutes, c.orders.expiry_sweep_seconds), (2880, 60));
    }

    #[test]
    fn defaults_fill_missing_sections() {
        let c = parse(SQLITE).unwrap();
        assert_eq!(c.server.listen, SocketAddr::from(([127, 0, 0, 1], 8750)));
        assert_eq!(c.sync.max_skew_ms, 300_000);
        assert_eq!(c.log.level, "info");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(&format!("{SQLITE}[server]\nlisen = \"127.0.0.1:1\"\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("server.lisen"), "{e}");
        let e = parse(&format!("{SQLITE}[server]\nlisten = \"nowhere\"\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("server.listen"), "{e}");
        assert!(e.to_string().contains("line 5"), "{e}");
        let e = parse(&format!("{SQLITE}[sync]\npage_rows = 20001\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("sync.page_rows"), "{e}");
        let e = parse(&format!("{SQLITE}[sync]\nmax_skew_ms = -1\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("sync.max_skew_ms"), "{e}");
        let e = parse(&format!("{SQLITE}[prices]\nhold_decrease_pct = 101\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("prices.hold_decrease_pct"), "{e}");
        let e = parse(&format!("{SQLITE}[orders]\npickup_window_minutes = 0\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("orders.pickup_window_minutes"), "{e}");
        let e = parse(&format!("{SQLITE}[orders]\nexpiry_sweep_seconds = 86401\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("orders.expiry_sweep_seconds"), "{e}");
        let e = parse(&format!("{SQLITE}[orders]\npickup_window = 5\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("orders.pickup_window"), "{e}");
        let e = parse(&format!("{SQLITE}[log]\nlevel = \"info,,=[\"\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("log.level"), "{e}");
        let e = parse("[storage]\nbackend = \"mysql\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("storage.backend"), "{e}");
        let e = parse("[storage]\nbackend = \"sqlite\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("storage.path"), "{e}");
        let e = parse("[storage]\nbackend = \"postgres\"\npath = \"/x\"\nurl = \"host=/tmp\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("storage.path"), "{e}");
        let e = parse("[storage]\nbackend = \"postgres\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("storage.url"), "{e}");
        let e = parse("[server]\n").unwrap_err();
        assert!(e.message.contains("storage"), "{e}");
        let e = parse(&format!("bogus = 1\n{SQLITE}")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("bogus"), "{e}");
        let e = parse("[storage\n").unwrap_err();
        assert!(e.to_string().starts_with("test.toml: "), "{e}");
    }

    #[test]
    fn the_postgres_password_is_redacted() {
        let c = parse("[storage]\nbackend = \"postgres\"\nurl = \"postgresql://u:hunter2@db/cloud\"\n").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
