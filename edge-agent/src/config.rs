//! The daemon's configuration file: TOML, every key known (an unknown key is an error, not a
//! silent typo), every error naming the file, the key and what was expected. The commented
//! default lives in `default-config.toml` and is what `print-default-config` prints.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use shared::{Currency, DeviceId, StoreId};

use crate::devices::plain_scanner::Suffix;

/// The commented default configuration (`edge-agent print-default-config`).
pub const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub store: StoreSection,
    #[serde(default)]
    pub ledger: LedgerSection,
    #[serde(default)]
    pub clock: ClockSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub runtime: RuntimeSection,
    /// MQTT devices (labels, RFID readers, device health). Absent: no MQTT at all.
    pub mqtt: Option<MqttSection>,
    #[serde(default)]
    pub rfid: RfidSection,
    /// Electronic shelf labels (over MQTT). Absent: no labels.
    pub labels: Option<LabelsSection>,
    /// What every lane of this store charges when a shelf label and the system disagree.
    #[serde(default)]
    pub lane: LanePolicySection,
    /// Self-checkout lanes of this store.
    #[serde(default)]
    pub lanes: Vec<LaneSection>,
    /// Devices on serial ports (scanners, scales, lane displays).
    #[serde(default)]
    pub serial: Vec<SerialSection>,
    /// The cloud this store syncs with. Absent: the store runs alone (it sells, counts and
    /// relabels all the same; its changes wait in the outbox).
    pub cloud: Option<CloudSection>,
    /// The local control socket `storectl` talks to.
    #[serde(default)]
    pub control: ControlSection,
    /// Prometheus metrics. Absent: none served.
    pub metrics: Option<MetricsSection>,
    /// Online pickup orders: how much of each SKU to keep granted to the online channel.
    /// Absent (or `enabled = false`): the store grants nothing.
    #[serde(default)]
    pub online: crate::orders::OnlinePolicy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Where `GET /metrics` is served, e.g. `127.0.0.1:9464` (keep it local or firewalled).
    pub listen: std::net::SocketAddr,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    /// Where the socket lives; default `control.sock` in the data folder. Under systemd,
    /// `/run/edge-agent/control.sock` (the unit's RuntimeDirectory).
    pub socket: Option<PathBuf>,
    /// Group owning the socket (mode 0660): members may run `storectl` writes.
    pub group: Option<String>,
}

impl Config {
    /// The control socket's path.
    pub fn control_socket(&self) -> PathBuf {
        self.control.socket.clone().unwrap_or_else(|| self.ledger.data_dir.join("control.sock"))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudSection {
    /// Base URL of cloud-sync, `https://...` (or `http://` on a trusted network).
    pub url: String,
    /// File holding this store's bearer token, as `cloud-sync store add` printed it. Keep it
    /// readable by the service user only.
    pub token_file: PathBuf,
    /// Sync this often when everything is fine.
    #[serde(default = "default_sync_interval")]
    pub interval_ms: u64,
    /// Give up on one exchange after this long (a slow cloud counts as down).
    #[serde(default = "default_sync_timeout")]
    pub timeout_ms: u64,
    /// First retry delay after a failure; doubles (with jitter) up to `backoff_max_ms`.
    #[serde(default = "default_backoff_min")]
    pub backoff_min_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// Most rows per push and per pulled page.
    #[serde(default = "default_page_rows")]
    pub page_rows: u32,
}

fn default_sync_interval() -> u64 {
    30_000
}
fn default_sync_timeout() -> u64 {
    30_000
}
fn default_backoff_min() -> u64 {
    1_000
}
fn default_backoff_max() -> u64 {
    300_000
}
fn default_page_rows() -> u32 {
    shared::sync::MAX_PAGE_ROWS
}

impl CloudSection {
    /// The token, trimmed; an error names the file.
    pub fn read_token(&self) -> Result<String, String> {
        let text = std::fs::read_to_string(&self.token_file)
            .map_err(|e| format!("cannot read the cloud token file {}: {e}", self.token_file.display()))?;
        let token = text.trim().to_owned();
        if token.is_empty() || token.contains(char::is_whitespace) {
            return Err(format!("cloud token file {} must hold one token on one line", self.token_file.display()));
        }
        Ok(token)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let url = self.url.trim_end_matches('/');
        let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
        if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
            return Err(("cloud.url".into(), format!("must be an http:// or https:// URL, got {:?}", self.url)));
        }
        if !(100..=600_000).contains(&self.timeout_ms) {
            return Err((
                "cloud.timeout_ms".into(),
                format!("must be between 100 and 600000, got {}", self.timeout_ms),
            ));
        }
        if !(100..=86_400_000).contains(&self.interval_ms) {
            return Err((
                "cloud.interval_ms".into(),
                format!("must be between 100 and 86400000, got {}", self.interval_ms),
            ));
        }
        if self.backoff_min_ms == 0 || self.backoff_min_ms > self.backoff_max_ms {
            return Err((
                "cloud.backoff_min_ms".into(),
                format!(
                    "must be above 0 and at most backoff_max_ms ({}), got {}",
                    self.backoff_max_ms, self.backoff_min_ms
                ),
            ));
        }
        if !(1..=shared::sync::MAX_PAGE_ROWS).contains(&self.page_rows) {
            return Err((
                "cloud.page_rows".into(),
                format!("must be between 1 and {}, got {}", shared::sync::MAX_PAGE_ROWS, self.page_rows),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    /// The store's broker, `mqtt://host:port`, or `mqtts://host:port` for TLS (then `ca_file`
    /// is required). Absent: an embedded broker on `embedded_listen`. Also accepted as `url`.
    #[serde(alias = "url")]
    pub broker: Option<String>,
    /// TLS: PEM file of the CA certificate(s) the broker's certificate must chain to (for a
    /// publicly signed broker, the system bundle such as `/etc/ssl/certs/ca-certificates.crt`).
    pub ca_file: Option<PathBuf>,
    /// TLS client authentication: this hub's certificate chain and private key (PEM), both or
    /// neither.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    #[serde(default = "default_embedded_listen")]
    pub embedded_listen: std::net::SocketAddr,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Client id at the broker; default `edge-agent-{store}`.
    pub client_id: Option<String>,
    /// Largest payload accepted from a device, in bytes; larger ones are refused and counted.
    #[serde(default = "default_max_payload")]
    pub max_payload: usize,
    /// When not empty, only these devices are adopted; others are quarantined and reported.
    #[serde(default)]
    pub allow_list: Vec<DeviceId>,
    /// A device not heard from for this long is offline.
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout_ms: u64,
}

impl std::fmt::Debug for MqttSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSection")
            .field("broker", &self.broker)
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

fn default_embedded_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 1883))
}
fn default_max_payload() -> usize {
    65_536
}
fn default_heartbeat_timeout() -> u64 {
    60_000
}

impl MqttSection {
    /// Whether the broker is reached over TLS (`mqtts://`).
    pub fn broker_tls(&self) -> bool {
        self.broker.as_deref().is_some_and(|u| u.starts_with("mqtts://"))
    }

    /// `(host, port)` of the broker to connect to (the embedded one when none is configured).
    pub fn broker_address(&self) -> Result<(String, u16), String> {
        let Some(url) = &self.broker else {
            return Ok((self.embedded_listen.ip().to_string(), self.embedded_listen.port()));
        };
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("mqtts://"))
            .ok_or_else(|| format!("{url:?} does not start with mqtt:// or mqtts://"))?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| format!("{url:?} has no :port"))?;
        let port: u16 = port.parse().map_err(|_| format!("{url:?} has no valid port"))?;
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        Ok((host.trim_start_matches('[').trim_end_matches(']').to_owned(), port))
    }
}

impl MqttSection {
    /// The TLS settings fit the broker URL, and the files hold what they should (read now, so
    /// `check-config` and the start-up catch a missing or bad file, naming it).
    fn validate_tls(&self) -> Result<(), (String, String)> {
        let files = self.ca_file.is_some() || self.client_cert_file.is_some() || self.client_key_file.is_some();
        if !self.broker_tls() {
            if files {
                return Err((
                    "mqtt.broker".into(),
                    "TLS files are configured but the broker URL is not mqtts://host:port".into(),
                ));
            }
            return Ok(());
        }
        if self.ca_file.is_none() {
            return Err((
                "mqtt.ca_file".into(),
                "required with an mqtts:// broker: the CA certificate(s) in PEM".into(),
            ));
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err((
                "mqtt.client_key_file".into(),
                "give both mqtt.client_cert_file and mqtt.client_key_file, or neither".into(),
            ));
        }
        self.tls_config().map(|_| ()).map_err(|e| (format!("mqtt.{}", e.key), e.to_string()))
    }

    /// The rustls client configuration for an `mqtts://` broker (`None` for `mqtt://`).
    pub fn tls_config(&self) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, crate::mqtt::tls::TlsFileError> {
        match (&self.ca_file, self.broker_tls()) {
            (Some(ca), true) => {
                let client = self.client_cert_file.as_deref().zip(self.client_key_file.as_deref());
                crate::mqtt::tls::client_config(ca, client).map(Some)
            }
            _ => Ok(None),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelsSection {
    /// CSV of `label,sku` (header line first): which label shows which product.
    pub bindings: PathBuf,
    /// A price increase reaches the till once every label shows it, or after this long.
    #[serde(default = "default_increase_deadline")]
    pub increase_deadline_ms: u64,
    /// Most label commands sent per 100 ms tick.
    #[serde(default = "default_label_batch")]
    pub batch_max: usize,
    /// A command not acknowledged `applied` within this long is sent again (then after twice
    /// as long, up to two minutes). Raise it for label gateways that answer slowly: each
    /// retry re-tells a label what it may already show.
    #[serde(default = "default_label_retry")]
    pub retry_after_ms: u64,
}

fn default_label_retry() -> u64 {
    2_000
}

fn default_increase_deadline() -> u64 {
    30 * 60_000
}
fn default_label_batch() -> usize {
    500
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RfidSection {
    /// Impinj readers publishing IoT device interface JSON: the topic, and the reader id zones
    /// are named after.
    pub impinj: Vec<ImpinjSource>,
    /// Exit-gate zones, as `reader:antenna`: an unsold tag read there raises an alarm.
    pub exit_zones: Vec<String>,
    pub dedup_window_ms: Option<u64>,
    pub depart_after_ms: Option<u64>,
    /// Counting zones: each inventory cycle over one becomes a stock count of the products
    /// whose tags it read.
    pub count_zone: Vec<CountZoneSection>,
}

/// A counting zone: antennas of one reader that together see all of the store's stock of the
/// products they hold (a product seen by two zones would be counted by each, the last count
/// winning). Its cycle is the reader's own inventory cycle (the `inventory_cycle` message of
/// native readers), or with `cycle_seconds`, a window of that many seconds (readers that send
/// no cycle messages, such as Impinj readers publishing JSON).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountZoneSection {
    pub reader: DeviceId,
    pub antennas: Vec<u8>,
    pub cycle_seconds: Option<u64>,
    /// The products this zone holds all of the store's stock of: one not seen in a whole cycle
    /// is counted as 0 (its tags are gone), not left at what the ledger says.
    #[serde(default)]
    pub skus: Vec<shared::Sku>,
}

/// Most products one counting zone may hold.
pub const COUNT_ZONE_SKUS_MAX: usize = 10_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImpinjSource {
    pub topic: String,
    pub reader: DeviceId,
}

impl RfidSection {
    pub fn exit_zones(&self) -> Result<Vec<crate::rfid::presence::Zone>, (usize, String)> {
        parse_zones(&self.exit_zones)
    }

    /// The counting zones, as the cycle counter takes them.
    pub fn count_zones(&self) -> Vec<crate::rfid::cycle::CountZone> {
        self.count_zone
            .iter()
            .map(|z| crate::rfid::cycle::CountZone {
                reader: z.reader.to_string(),
                antennas: z.antennas.clone(),
                window_ms: z.cycle_seconds.map(|s| s.saturating_mul(1_000)),
                holds: z.skus.clone(),
            })
            .collect()
    }

    fn validate_count_zones(&self, mqtt: bool) -> Result<(), (String, String)> {
        let mut taken = std::collections::BTreeSet::new();
        let mut held: std::collections::BTreeMap<&shared::Sku, usize> = std::collections::BTreeMap::new();
        for (i, z) in self.count_zone.iter().enumerate() {
            let key = |field: &str| format!("rfid.count_zone[{i}].{field}");
            if !mqtt {
                return Err((
                    format!("rfid.count_zone[{i}]"),
                    "RFID readers talk over MQTT: add an [mqtt] section".into(),
                ));
            }
            if z.antennas.is_empty() || z.antennas.len() > 16 {
                return Err((key("antennas"), format!("must list 1 to 16 antenna ports, got {}", z.antennas.len())));
            }
            for a in &z.antennas {
                if !taken.insert((z.reader.clone(), *a)) {
                    return Err((key("antennas"), format!("{}:{a} is already in a counting zone", z.reader)));
                }
            }
            if z.skus.len() > COUNT_ZONE_SKUS_MAX {
                return Err((key("skus"), format!("at most {COUNT_ZONE_SKUS_MAX} products, got {}", z.skus.len())));
            }
            for sku in &z.skus {
                // Two zones holding all of a product's stock would zero each other's counts.
                if let Some(other) = held.insert(sku, i) {
                    let place = if other == i {
                        "twice in this list".to_owned()
                    } else {
                        format!("in rfid.count_zone[{other}].skus too")
                    };
                    return Err((key("skus"), format!("{sku} is {place}: a product is held by one counting zone")));
                }
            }
            match z.cycle_seconds {
                Some(s) if !(5..=86_400).contains(&s) => {
                    return Err((key("cycle_seconds"), format!("must be between 5 and 86400, got {s}")));
                }
                None if self.impinj.iter().any(|src| src.reader == z.reader) => {
                    return Err((
                        key("cycle_seconds"),
                        format!(
                            "{} is an Impinj reader, which sends no inventory-cycle messages: set cycle_seconds",
                            z.reader
                        ),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSection {
    /// Async worker threads. The ledger writer has a thread of its own, so on the usual 2-core
    /// store PC one worker leaves it a core: measured, that halves the lane's p99 latency
    /// against two workers (`cargo bench -p e2e-tests --bench lane_latency`).
    pub worker_threads: usize,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        RuntimeSection { worker_threads: 1 }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LanePolicySection {
    /// `system`: the system's price (an increase still waits for the labels, up to
    /// `labels.increase_deadline_ms`). `lower_of_shelf_and_system` (the default): never more than
    /// the lowest price a label of the product confirmed showing, as weights-and-measures
    /// (price accuracy) rules and customers expect; a label that missed a price increase keeps
    /// the old price charged until it shows the new one.
    pub charge: crate::labels::sequencing::ChargePolicy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaneSection {
    pub id: DeviceId,
    /// The same code read twice by one scanner within this window counts once.
    #[serde(default = "default_double_read_ms")]
    pub double_read_window_ms: u64,
    /// RFID zones at this lane (`reader:antenna`): tags read there when a sale is committed are
    /// recorded as sold with it, so the exit gate lets them pass.
    #[serde(default)]
    pub rfid_zones: Vec<String>,
}

/// Parses `reader:antenna` zone names.
pub fn parse_zones(zones: &[String]) -> Result<Vec<crate::rfid::presence::Zone>, (usize, String)> {
    zones
        .iter()
        .enumerate()
        .map(|(i, z)| {
            let (reader, antenna) = z.rsplit_once(':').ok_or((i, format!("{z:?} is not reader:antenna")))?;
            let antenna: u8 = antenna.parse().map_err(|_| (i, format!("{z:?}: antenna must be 0-255")))?;
            DeviceId::new(reader).map_err(|e| (i, e.to_string()))?;
            Ok(crate::rfid::presence::Zone { reader: reader.into(), antenna })
        })
        .collect()
}

fn default_double_read_ms() -> u64 {
    300
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialKind {
    Scanner,
    Scale,
    /// The lane's customer display and touch input.
    Lane,
}

impl SerialKind {
    /// As it appears in the journal (`DEVICE_KIND`) and the config.
    pub fn as_str(self) -> &'static str {
        match self {
            SerialKind::Scanner => "scanner",
            SerialKind::Scale => "scale",
            SerialKind::Lane => "lane",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialMode {
    /// The firmware-proto framing (COBS + CRC-32C); every kind speaks it.
    Framed,
    /// What off-the-shelf scanners send: the code and a suffix (scanners only).
    Plain,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSection {
    pub id: DeviceId,
    pub kind: SerialKind,
    /// The lane this device belongs to.
    pub lane: DeviceId,
    /// Prefer `/dev/serial/by-id/...`: stable whichever USB socket the device is in.
    pub path: PathBuf,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default = "default_mode")]
    pub mode: SerialMode,
    /// Plain mode: what ends a code.
    #[serde(default = "default_suffix")]
    pub suffix: Suffix,
    /// Plain mode: quiet time that ends a code without suffix.
    #[serde(default = "default_gap_ms")]
    pub gap_ms: u64,
    /// Plain mode: answer each code with ACK (0x06) or NAK (0x15).
    #[serde(default)]
    pub ack_nak: bool,
}

fn default_baud() -> u32 {
    9600
}
fn default_mode() -> SerialMode {
    SerialMode::Framed
}
fn default_suffix() -> Suffix {
    Suffix::Cr
}
fn default_gap_ms() -> u64 {
    50
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    pub id: StoreId,
    pub currency: Currency,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerSection {
    pub data_dir: PathBuf,
    pub batch_max: usize,
    pub queue_capacity: usize,
    pub shutdown_timeout_ms: u64,
}

impl Default for LedgerSection {
    fn default() -> Self {
        LedgerSection {
            data_dir: PathBuf::from("/var/lib/edge-agent"),
            batch_max: 1024,
            queue_capacity: 8192,
            shutdown_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockSection {
    pub max_skew_ms: u64,
    pub jump_warn_ms: u64,
}

impl Default for ClockSection {
    fn default() -> Self {
        ClockSection { max_skew_ms: 300_000, jump_warn_ms: 60_000 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// A tracing filter: `info`, `debug`, `edge_agent=debug,warn`...
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
            let message = inner.message().to_owned();
            let location = inner
                .span()
                .map(|span| {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            // serde_path_to_error's path already ends with an unknown key's own name.
            let key = path;
            err((key != ".").then_some(key), format!("{message}{location}"))
        })?;
        config.validate().map_err(|(key, message)| err(Some(key), message))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        self.validate_basics().map_err(|(k, m)| (k.to_owned(), m))?;
        self.online.validate()?;
        self.validate_devices()
    }

    fn validate_devices(&self) -> Result<(), (String, String)> {
        if let Some(cloud) = &self.cloud {
            cloud.validate()?;
        }
        if let Some(m) = &self.mqtt {
            m.broker_address().map_err(|e| ("mqtt.broker".to_owned(), e))?;
            if !(1_024..=1_048_576).contains(&m.max_payload) {
                return Err((
                    "mqtt.max_payload".into(),
                    format!("must be between 1024 and 1048576, got {}", m.max_payload),
                ));
            }
            if !(1_000..=86_400_000).contains(&m.heartbeat_timeout_ms) {
                return Err((
                    "mqtt.heartbeat_timeout_ms".into(),
                    format!("must be between 1000 and 86400000, got {}", m.heartbeat_timeout_ms),
                ));
            }
            if m.username.is_some() != m.password.is_some() {
                return Err(("mqtt.password".into(), "give both mqtt.username and mqtt.password, or neither".into()));
            }
            m.validate_tls()?;
        }
        self.rfid.exit_zones().map_err(|(i, e)| (format!("rfid.exit_zones[{i}]"), e))?;
        self.rfid.validate_count_zones(self.mqtt.is_some())?;
        if let Some(l) = &self.labels {
            if self.mqtt.is_none() {
                return Err(("labels".into(), "shelf labels talk over MQTT: add an [mqtt] section".into()));
            }
            if !(100..=120_000).contains(&l.retry_after_ms) {
                return Err((
                    "labels.retry_after_ms".into(),
                    format!("must be between 100 and 120000, got {}", l.retry_after_ms),
                ));
            }
            if !(1..=100_000).contains(&l.batch_max) {
                return Err(("labels.batch_max".into(), format!("must be between 1 and 100000, got {}", l.batch_max)));
            }
        }
        for (i, src) in self.rfid.impinj.iter().enumerate() {
            if src.topic.is_empty() || src.topic.contains(['+', '#']) {
                return Err((format!("rfid.impinj[{i}].topic"), "must be a topic name without wildcards".into()));
            }
            if self.mqtt.is_none() {
                return Err((
                    format!("rfid.impinj[{i}]"),
                    "Impinj readers publish over MQTT: add an [mqtt] section".into(),
                ));
            }
        }
        let mut ids = std::collections::BTreeSet::new();
        for (i, lane) in self.lanes.iter().enumerate() {
            if !ids.insert(lane.id.as_str()) {
                return Err((format!("lanes[{i}].id"), format!("{} is used twice", lane.id)));
            }
            parse_zones(&lane.rfid_zones).map_err(|(j, e)| (format!("lanes[{i}].rfid_zones[{j}]"), e))?;
            if lane.double_read_window_ms > 10_000 {
                return Err((
                    format!("lanes[{i}].double_read_window_ms"),
                    format!("must be at most 10000, got {}", lane.double_read_window_ms),
                ));
            }
        }
        for (i, dev) in self.serial.iter().enumerate() {
            let key = |field: &str| format!("serial[{i}].{field}");
            if !ids.insert(dev.id.as_str()) {
                return Err((key("id"), format!("{} is used twice", dev.id)));
            }
            if !self.lanes.iter().any(|l| l.id == dev.lane) {
                return Err((key("lane"), format!("no [[lanes]] entry has id {}", dev.lane)));
            }
            if dev.mode == SerialMode::Plain && dev.kind != SerialKind::Scanner {
                return Err((
                    key("mode"),
                    "only scanners have a plain mode; scales and lane displays are framed".into(),
                ));
            }
            if !(300..=4_000_000).contains(&dev.baud) {
                return Err((key("baud"), format!("{} is not a serial speed (300 to 4000000)", dev.baud)));
            }
            if dev.path.as_os_str().is_empty() {
                return Err((key("path"), "must not be empty".into()));
            }
            if !(5..=5_000).contains(&dev.gap_ms) {
                return Err((key("gap_ms"), format!("must be between 5 and 5000, got {}", dev.gap_ms)));
            }
            for kind in [SerialKind::Scale, SerialKind::Lane] {
                if dev.kind == kind && self.serial[..i].iter().any(|d| d.kind == kind && d.lane == dev.lane) {
                    return Err((
                        key("kind"),
                        format!("lane {} already has a {:?} device", dev.lane, kind).to_lowercase(),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_basics(&self) -> Result<(), (&'static str, String)> {
        let l = &self.ledger;
        if l.data_dir.as_os_str().is_empty() {
            return Err(("ledger.data_dir", "must not be empty".into()));
        }
        if !(1..=65_536).contains(&l.batch_max) {
            return Err(("ledger.batch_max", format!("must be between 1 and 65536, got {}", l.batch_max)));
        }
        if !(1..=1_048_576).contains(&l.queue_capacity) {
            return Err(("ledger.queue_capacity", format!("must be between 1 and 1048576, got {}", l.queue_capacity)));
        }
        if !(1..=64).contains(&self.runtime.worker_threads) {
            return Err((
                "runtime.worker_threads",
                format!("must be between 1 and 64, got {}", self.runtime.worker_threads),
            ));
        }
        if !(1..=86_400_000).contains(&self.clock.max_skew_ms) {
            return Err((
                "clock.max_skew_ms",
                format!("must be between 1 and 86400000 (a day), got {}", self.clock.max_skew_ms),
            ));
        }
        if !(1..=86_400_000).contains(&self.clock.jump_warn_ms) {
            return Err((
                "clock.jump_warn_ms",
                format!("must be between 1 and 86400000 (a day), got {}", self.clock.jump_warn_ms),
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

    #[test]
    fn the_default_config_is_accepted() {
        let c = parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(c.ledger.batch_max, 1024);
    }

    #[test]
    fn the_lane_charge_policy_defaults_to_the_lower_of_shelf_and_system() {
        use crate::labels::sequencing::ChargePolicy;
        let base = "[store]\nid = \"s1\"\ncurrency = \"EUR\"\n";
        assert_eq!(parse(base).unwrap().lane.charge, ChargePolicy::LowerOfShelfAndSystem);
        assert_eq!(parse(DEFAULT_CONFIG).unwrap().lane.charge, ChargePolicy::LowerOfShelfAndSystem);
        let system = parse(&format!("{base}[lane]\ncharge = \"system\"\n")).unwrap();
        assert_eq!(system.lane.charge, ChargePolicy::System);
        let e = parse(&format!("{base}[lane]\ncharge = \"highest\"\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("lane.charge"), "{e}");
    }

    #[test]
    fn the_online_section_is_off_by_default_and_names_its_bad_keys() {
        let base = "[store]\nid = \"s1\"\ncurrency = \"EUR\"\n";
        assert!(!parse(base).unwrap().online.enabled);
        assert!(!parse(DEFAULT_CONFIG).unwrap().online.enabled);
        let on = parse(&format!(
            "{base}[online]\nenabled = true\nsafety_stock = 2\n[[online.rule]]\ncategory = \"dairy\"\ntarget = 10\n"
        ))
        .unwrap();
        assert_eq!((on.online.safety_stock, on.online.rule[0].target), (2, Some(10)));
        let e = parse(&format!("{base}[online]\nenabled = true\n[[online.rule]]\ntarget = 3\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("online.rule[0]"), "{e}");
        let e = parse(&format!("{base}[online]\ntarget = -1\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("online.target"), "{e}");
        let e = parse(&format!("{base}[online]\ntraget = 1\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("online.traget"), "{e}");
    }

    #[test]
    fn counting_zones_are_checked() {
        let base = "[store]\nid = \"s1\"\ncurrency = \"EUR\"\n[mqtt]\n";
        let zone = |z: &str| parse(&format!("{base}[[rfid.count_zone]]\nreader = \"shelf-1\"\n{z}"));
        let ok = zone("antennas = [1, 2]\n").unwrap();
        assert_eq!(ok.rfid.count_zones()[0].window_ms, None);
        assert_eq!(zone("antennas = [1]\ncycle_seconds = 60\n").unwrap().rfid.count_zones()[0].window_ms, Some(60_000));
        let e = zone("antennas = []\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("rfid.count_zone[0].antennas"), "{e}");
        let e = zone("antennas = [1]\ncycle_seconds = 1\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("rfid.count_zone[0].cycle_seconds"), "{e}");
        let e = zone("antennas = [1]\n[[rfid.count_zone]]\nreader = \"shelf-1\"\nantennas = [2, 1]\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("rfid.count_zone[1].antennas"), "{e}");
        let e =
            zone("antennas = [1]\n[[rfid.impinj]]\ntopic = \"impinj/shelf-1\"\nreader = \"shelf-1\"\n").unwrap_err();
        assert!(e.key.as_deref() == Some("rfid.count_zone[0].cycle_seconds") && e.message.contains("Impinj"), "{e}");
        let held = zone("antennas = [1]\nskus = [\"MILK\", \"BREAD\"]\n").unwrap();
        let holds: Vec<String> = held.rfid.count_zones()[0].holds.iter().map(|s| s.to_string()).collect();
        assert_eq!(holds, ["MILK", "BREAD"]);
        let e = zone("antennas = [1]\nskus = [\"MILK\"]\n[[rfid.count_zone]]\nreader = \"shelf-1\"\nantennas = [2]\nskus = [\"MILK\"]\n")
            .unwrap_err();
        assert!(e.key.as_deref() == Some("rfid.count_zone[1].skus") && e.message.contains("count_zone[0]"), "{e}");
        let e = zone("antennas = [1]\nskus = [\"MILK\", \"MILK\"]\n").unwrap_err();
        assert!(e.key.as_deref() == Some("rfid.count_zone[0].skus") && e.message.contains("twice"), "{e}");
        let e = zone("antennas = [1]\nskus = [\"bad sku\"]\n").unwrap_err();
        assert!(e.message.contains("bad sku"), "an invalid SKU is named: {e}");
    }

    #[test]
    fn tls_settings_fit_the_broker_url_and_name_a_bad_file() {
        let base = "[store]\nid = \"s1\"\ncurrency = \"EUR\"\n[mqtt]\n";
        let e = parse(&format!("{base}url = \"mqtts://broker:8883\"\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("mqtt.ca_file"), "{e}");
        let e = parse(&format!("{base}broker = \"mqtt://broker:1883\"\nca_file = \"/x.pem\"\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("mqtt.broker"), "{e}");
        let e =
            parse(&format!("{base}url = \"mqtts://broker:8883\"\nca_file = \"/nonexistent/ca.pem\"\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("mqtt.ca_file"), "{e}");
        assert!(e.message.contains("/nonexistent/ca.pem: cannot read it"), "{e}");
        let e = parse(&format!(
            "{base}url = \"mqtts://broker:8883\"\nca_file = \"/x.pem\"\nclient_cert_file = \"/c.pem\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("mqtt.client_key_file"), "{e}");
        let m = parse(&format!("{base}url = \"mqtts://[::1]:8883\"\nca_file = \"/x.pem\"\n"));
        assert!(m.is_err(), "the CA file is read when the config is checked");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("[store]\nid = \"s1\"\ncurrency = \"EUR\"\n[ledger]\nbatch_mx = 3\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("ledger.batch_mx"), "{e}");
        let e = parse("[store]\nid = \"s1\"\ncurrency = \"EUR\"\n[ledger]\nbatch_max = \"many\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("ledger.batch_max"), "{e}");
        assert!(e.to_string().contains("line 5"), "{e}");
        let e = parse("[store]\nid = \"s 1\"\ncurrency = \"EUR\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("store.id"), "{e}");
        let e = parse("[store]\nid = \"s1\"\ncurrency = \"euro\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("store.currency"), "{e}");
        let e = parse("[store]\nid = \"s1\"\ncurrency = \"EUR\"\n[ledger]\nbatch_max = 0\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("ledger.batch_max"), "{e}");
        let e = parse("bogus = 1\n[store]\nid = \"s1\"\ncurrency = \"EUR\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("bogus"), "{e}");
        let e = parse("[ledger]\n").unwrap_err();
        assert!(e.message.contains("store"), "{e}");
        let lanes = "[store]\nid = \"s1\"\ncurrency = \"EUR\"\n[[lanes]]\nid = \"lane-1\"\n";
        let e = parse(&format!(
            "{lanes}[[serial]]\nid = \"sc\"\nkind = \"scanner\"\nlane = \"lane-2\"\npath = \"/dev/x\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("serial[0].lane"), "{e}");
        let e = parse(&format!(
            "{lanes}[[serial]]\nid = \"sc\"\nkind = \"printer\"\nlane = \"lane-1\"\npath = \"/dev/x\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("serial[0].kind"), "{e}");
        let e = parse(&format!("{lanes}[[serial]]\nid = \"sc\"\nkind = \"scale\"\nmode = \"plain\"\nlane = \"lane-1\"\npath = \"/dev/x\"\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("serial[0].mode"), "{e}");
        let e = parse("[store\n").unwrap_err();
        assert!(e.to_string().starts_with("test.toml: "), "{e}");
    }
}
