//! The MQTT side of the hub: the link to the store's broker (or an embedded one), topic names,
//! and the router that turns device messages into registry updates and RFID presence.

pub mod broker;
pub mod carry;
pub mod link;
pub mod router;
pub mod tls;
pub mod topics;

use std::collections::{HashMap, HashSet};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::devices::registry::Registry;
use crate::labels::planner::PlannerConfig;
use crate::labels::runtime::{read_bindings, LabelTask};
use crate::labels::sequencing::TillPrices;
use crate::ledger::{LedgerHandle, LedgerReader};
use crate::rfid::presence::{Presence, PresenceConfig};

/// The RFID presence the router feeds and the lanes read, as configured.
pub fn presence(config: &Config) -> Arc<Mutex<Presence>> {
    let defaults = PresenceConfig::default();
    Arc::new(Mutex::new(Presence::new(
        PresenceConfig {
            dedup_window_ms: config.rfid.dedup_window_ms.unwrap_or(defaults.dedup_window_ms),
            depart_after_ms: config.rfid.depart_after_ms.unwrap_or(defaults.depart_after_ms),
            max_tags: defaults.max_tags,
        },
        config.rfid.exit_zones().unwrap_or_default(),
    )))
}

/// What the router last published about the MQTT side (refreshed once a second).
#[derive(Debug, Clone, Default)]
pub struct MqttSnapshot {
    pub stats: router::RouterStats,
    pub devices: Vec<(shared::DeviceId, crate::devices::registry::DeviceInfo)>,
    /// Devices not on the allow-list, with how many messages each sent.
    pub quarantined: Vec<(shared::DeviceId, u64)>,
}

pub type MqttBoard = Arc<Mutex<MqttSnapshot>>;

/// What the rest of the daemon can reach of a running MQTT side.
#[derive(Clone)]
pub struct MqttHandles {
    pub board: MqttBoard,
    /// Whether the hub's MQTT connection is up.
    pub connected: tokio::sync::watch::Receiver<bool>,
    pub labels: Option<LabelHandles>,
}

/// The label task's board and its input queue (for `storectl labels status|repush`).
#[derive(Clone)]
pub struct LabelHandles {
    pub board: crate::labels::runtime::LabelsBoard,
    pub inputs: tokio::sync::mpsc::Sender<crate::labels::runtime::LabelInput>,
}

/// Starts the MQTT side when the config has an `[mqtt]` section: the embedded broker if no
/// broker is named, the link task, and the router. Returns the router's board when MQTT runs.
pub fn start(
    config: &Config,
    ledger: &LedgerHandle,
    till: &Arc<Mutex<TillPrices>>,
    presence: &Arc<Mutex<Presence>>,
    mismatches: &crate::labels::runtime::Mismatches,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<Option<MqttHandles>, broker::BrokerError> {
    let Some(m) = &config.mqtt else { return Ok(None) };
    if m.broker.is_none() {
        broker::start_embedded(m.embedded_listen, m.max_payload)?;
    }
    let (host, port) = m.broker_address().map_err(broker::BrokerError::Config)?;
    let tls = m.tls_config().map_err(|e| broker::BrokerError::Config(format!("mqtt.{}: {e}", e.key)))?;
    let store = config.store.id.clone();
    let mut subscriptions = topics::hub_subscriptions(&store);
    subscriptions.extend(config.rfid.impinj.iter().map(|s| s.topic.clone()));
    let link = link::spawn(
        link::LinkSettings {
            host,
            port,
            client_id: m.client_id.clone().unwrap_or_else(|| format!("edge-agent-{store}")),
            credentials: m.username.clone().zip(m.password.clone()),
            max_payload: m.max_payload,
            state_topic: topics::hub_state(&store),
            subscriptions,
            tls,
        },
        tasks,
        stop.child_token(),
    );
    let connected = link.connected.clone();
    let allow: HashSet<_> = m.allow_list.iter().cloned().collect();
    let mut registry = Registry::new((!allow.is_empty()).then_some(allow), m.heartbeat_timeout_ms);
    let persist = open_registry(&config.ledger.data_dir, &mut registry, tasks);
    let impinj: HashMap<_, _> = config.rfid.impinj.iter().map(|s| (s.topic.clone(), s.reader.clone())).collect();
    let mut router = router::Router::new(store.clone(), m.max_payload, registry, presence.clone(), impinj);
    router.persist = persist;
    router.sold =
        Some(LedgerReader::open(&config.ledger.data_dir).map_err(|e| broker::BrokerError::Config(e.to_string()))?);
    let zones = config.rfid.count_zones();
    if !zones.is_empty() {
        tracing::info!(zones = zones.len(), "RFID counting zones: each inventory cycle becomes a stock count");
        router.cycles = crate::rfid::cycle::CycleCounter::new(zones);
        let (tx, rx) = tokio::sync::mpsc::channel(crate::rfid::count::COUNT_QUEUE);
        router.counts = Some(tx);
        let task = crate::rfid::count::CountTask {
            store: store.clone(),
            reader: LedgerReader::open(&config.ledger.data_dir)
                .map_err(|e| broker::BrokerError::Config(e.to_string()))?,
            ledger: ledger.clone(),
            client: Some(link.client.clone()),
        };
        tasks.spawn(task.run(rx, stop.child_token()));
    }
    let mut labels = None;
    if let Some(l) = &config.labels {
        let text = std::fs::read_to_string(&l.bindings)
            .map_err(|e| broker::BrokerError::Config(format!("labels.bindings {}: {e}", l.bindings.display())))?;
        let bindings = read_bindings(&text)
            .map_err(|e| broker::BrokerError::Config(format!("labels.bindings {}: {e}", l.bindings.display())))?;
        let reader =
            LedgerReader::open(&config.ledger.data_dir).map_err(|e| broker::BrokerError::Config(e.to_string()))?;
        let (tx, rx) = tokio::sync::mpsc::channel(crate::labels::runtime::INPUT_QUEUE);
        router.labels = Some(tx.clone());
        tracing::info!(labels = bindings.len(), "Shelf labels bound");
        let planner =
            PlannerConfig { batch_max: l.batch_max, retry_base_ms: l.retry_after_ms, ..PlannerConfig::default() };
        let task =
            LabelTask::new(store, bindings, planner, reader, till.clone(), link.client.clone(), mismatches.clone());
        let board = crate::labels::runtime::LabelsBoard::default();
        let mut task = task;
        task.board = board.clone();
        labels = Some(LabelHandles { board, inputs: tx });
        tasks.spawn(task.run(rx, ledger.subscribe(), stop.child_token()));
    }
    let board = MqttBoard::default();
    router.board = Some(board.clone());
    // On a thread of its own, so the link keeps reading while the router works (`own_thread`).
    let router =
        crate::own_thread::spawn("mqtt-router", router::run(router, link.incoming, link.client, stop.child_token()))
            .map_err(broker::BrokerError::Thread)?;
    // The daemon waits for its tasks at shutdown; this one ends once the router has saved the
    // registry's last changes.
    tasks.spawn(async move {
        if router.await.is_err() {
            tracing::error!(
                error_code = "MQTT_ROUTER_STOPPED",
                "The MQTT router stopped unexpectedly (see the panic above); device messages are no longer handled"
            );
        }
    });
    Ok(Some(MqttHandles { board, connected, labels }))
}

/// Restores the device registry from its file and starts the file's writer. The file is a
/// cache: when it cannot be opened at all (the folder is not writable) the hub runs without it.
fn open_registry(
    data_dir: &std::path::Path,
    registry: &mut Registry,
    tasks: &TaskTracker,
) -> Option<tokio::sync::mpsc::Sender<crate::devices::registry::Changes>> {
    use crate::devices::registry_store::RegistryStore;
    match RegistryStore::open(data_dir) {
        Ok((store, loaded)) => {
            let (devices, quarantined, skipped) = (loaded.devices.len(), loaded.quarantined.len(), loaded.skipped);
            let released = registry.restore(loaded.devices, loaded.quarantined);
            tracing::info!(
                devices,
                quarantined,
                released,
                skipped,
                "Device registry restored (devices offline until heard)"
            );
            Some(crate::devices::registry_store::spawn_writer(store, tasks))
        }
        Err(e) => {
            tracing::error!(error = %e, error_code = "REGISTRY_OPEN",
                "Cannot open the device registry file; devices are known only as they speak until a restart");
            None
        }
    }
}
