//! The label task: owns the [`Planner`] and, shared with the lanes, the [`TillPrices`]. It
//! renders each bound SKU's content from the ledger's projections, re-renders on every
//! committed price or catalog change, sends due render commands over MQTT in bounded batches
//! (one per tick, so a chain-wide change of tens of thousands of labels never floods the
//! broker), and tracks the labels' staged acks and check-ins. It tells the till the price every
//! label of a SKU confirmed showing, which is what holds an increase back (see `sequencing`);
//! an increase whose deadline passes is logged with the labels still showing something else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use firmware_proto as fp;
use rumqttc::{AsyncClient, QoS};
use shared::{effective_price, DeviceId, Money, PriceSlot, PriceVersion, Sku, StoreId, Unit};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::planner::{AckStage, LabelContent, Planner, PlannerConfig};
use super::sequencing::{ShelfPrice, TillPrices};
use super::shelf::ShelfPrices;
use crate::ledger::{Change, LedgerReader};
use crate::mqtt::topics::{self, DeviceKind, Leaf};

/// What labels tell the hub, routed here from MQTT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelInput {
    CheckIn {
        label: DeviceId,
        shown_hash: u64,
        sent: SentAs,
    },
    Ack {
        label: DeviceId,
        command_id: u32,
        stage: AckStage,
        shown_hash: Option<u64>,
        sent: SentAs,
    },
    /// Send every label (of one SKU, or all) its content again (`storectl labels repush`).
    Repush {
        sku: Option<Sku>,
    },
}

/// What the label task shows the control API and metrics, refreshed every second.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LabelsView {
    pub labels: usize,
    pub stages: super::planner::StageCounts,
    /// Label messages dropped as older than one already handled.
    pub stale_inputs: u64,
    /// Render commands sent, by why.
    pub sends: super::planner::SendCounts,
    /// The id of the last command decided, as of `stages`: every later decision has a higher one.
    pub last_command_id: u32,
}

pub type LabelsBoard = Arc<Mutex<LabelsView>>;

/// Where a label's message stands in what it sent: its boot and sequence number. A broker may
/// deliver a device's messages on different topics out of order (rumqttd keeps one log per
/// subscription), so an older check-in ("I show nothing") can arrive after a newer ack; the
/// task drops what is older than the newest it has seen from that boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentAs {
    pub boot: u32,
    pub seq: u32,
}

impl LabelInput {
    fn label_and_sent(&self) -> Option<(&DeviceId, SentAs)> {
        match self {
            LabelInput::CheckIn { label, sent, .. } | LabelInput::Ack { label, sent, .. } => Some((label, *sent)),
            LabelInput::Repush { .. } => None,
        }
    }
}

/// The newest message seen from each label.
#[derive(Debug, Default)]
struct NewestSeen(HashMap<DeviceId, SentAs>);

impl NewestSeen {
    /// False for a message older than one already seen from the same label and boot (a new
    /// boot starts over); otherwise records it as the newest.
    fn admit(&mut self, label: &DeviceId, sent: SentAs) -> bool {
        match self.0.get(label) {
            Some(newest) if newest.boot == sent.boot && sent.seq < newest.seq => false,
            _ => {
                self.0.insert(label.clone(), sent);
                true
            }
        }
    }
}

/// Label inputs waiting for the task; the router drops (and counts) past this, as a label
/// checks in again and unacked commands are retried.
pub const INPUT_QUEUE: usize = 65_536;

pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Renders what the labels of `sku` should show now, from the projections.
pub fn render(reader: &LedgerReader, store: &StoreId, sku: &Sku, at_ms: u64) -> Option<(LabelContent, PriceVersion)> {
    let entries = reader.prices(sku).ok()?;
    let effective = effective_price(&entries, sku, store, at_ms)?;
    let value = effective.value.as_ref()?;
    let item = reader.catalog_item(sku).ok().flatten();
    let name = item.as_ref().and_then(|i| i.name.as_ref().map(|n| n.value.clone())).unwrap_or_else(|| sku.to_string());
    let unit = item.as_ref().and_then(|i| i.unit.as_ref().map(|u| u.value)).unwrap_or(Unit::Piece);
    let (price, promo) = if effective.key.slot == PriceSlot::Promotion {
        let regular: Vec<_> = entries.iter().filter(|e| e.key.slot == PriceSlot::Regular).cloned().collect();
        let regular = effective_price(&regular, sku, store, at_ms).and_then(|e| e.value.as_ref().map(|v| v.amount));
        (regular.unwrap_or(value.amount), Some((value.amount, value.window.map_or(u64::MAX, |w| w.until_ms))))
    } else {
        (value.amount, None)
    };
    let unit_price = (unit == Unit::Gram).then(|| (value.amount, "kg".to_owned()));
    Some((LabelContent { sku: sku.clone(), name, price, promo, unit_price }, effective.version()))
}

/// The labels not showing what they should, refreshed every second by the label task.
pub type Mismatches = Arc<Mutex<Vec<(DeviceId, Sku)>>>;

pub struct LabelTask {
    pub store: StoreId,
    pub planner: Planner,
    pub reader: LedgerReader,
    pub till: Arc<Mutex<TillPrices>>,
    pub client: AsyncClient,
    pub mismatches: Mismatches,
    /// Stage counts for `storectl labels status` and metrics, refreshed every second.
    pub board: LabelsBoard,
    /// The price each SKU's labels were last rendered with.
    rendered: HashMap<Sku, (Money, PriceVersion)>,
    /// The prices the labels confirmed showing, told to the till as they change.
    shelf: ShelfPrices,
    /// The newest message seen from each label, to drop older ones delivered late.
    newest: NewestSeen,
    /// Label messages dropped as older than one already handled.
    pub stale_inputs: u64,
    hub_boot: u32,
    started: Instant,
}

impl LabelTask {
    pub fn new(
        store: StoreId,
        bindings: Vec<(DeviceId, Sku)>,
        config: PlannerConfig,
        reader: LedgerReader,
        till: Arc<Mutex<TillPrices>>,
        client: AsyncClient,
        mismatches: Mismatches,
    ) -> LabelTask {
        let mut planner = Planner::new(config);
        for (label, sku) in bindings {
            planner.bind(label, sku);
        }
        LabelTask {
            store,
            planner,
            reader,
            till,
            client,
            mismatches,
            board: LabelsBoard::default(),
            rendered: HashMap::new(),
            shelf: ShelfPrices::default(),
            newest: NewestSeen::default(),
            stale_inputs: 0,
            hub_boot: rand::random(),
            started: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Re-renders `sku` and tells its labels.
    fn refresh(&mut self, sku: &Sku) {
        let now = self.now_ms();
        let Some((content, version)) = render(&self.reader, &self.store, sku, wall_ms()) else { return };
        let price = (content.promo.map_or(content.price, |p| p.0), version);
        self.shelf.rendered(sku, content.hash(), ShelfPrice { regular: content.price, promo: content.promo });
        if let Ok(mut till) = self.till.lock() {
            till.on_rendered(sku, price.clone());
        }
        self.rendered.insert(sku.clone(), price);
        let labels: Vec<DeviceId> = self.planner.labels_of(sku).cloned().collect();
        for label in labels {
            self.planner.set_content(&label, content.clone(), now);
        }
        self.confirm_if_shown(sku);
    }

    fn expected_hash(&self, sku: &Sku) -> Option<u64> {
        render(&self.reader, &self.store, sku, wall_ms()).map(|(c, _)| c.hash())
    }

    /// Tells the till the price every label of `sku` now shows.
    fn confirm_if_shown(&mut self, sku: &Sku) {
        if self.planner.settled(sku) {
            if let (Some(price), Ok(mut till)) = (self.rendered.get(sku), self.till.lock()) {
                till.on_labels_confirmed(sku, price.clone());
                tracing::debug!(sku = %sku, price = %price.0, "Every label shows the price");
            }
        }
    }

    /// Tells the till when the prices the labels of `label`'s SKU confirmed showing changed.
    fn shelf_shows(&mut self, label: &DeviceId) {
        let Some(sku) = self.planner.sku_of(label).cloned() else { return };
        if self.shelf.shows(label, &sku, self.planner.displayed(label)) {
            let prices = self.shelf.prices(&sku);
            if let Ok(mut till) = self.till.lock() {
                till.set_shelf(&sku, prices);
            }
        }
    }

    /// Whether `input` is older than a message already handled from the same label and boot.
    fn is_stale(&mut self, input: &LabelInput) -> bool {
        match input.label_and_sent() {
            Some((label, sent)) => !self.newest.admit(label, sent),
            None => false,
        }
    }

    fn repush(&mut self, sku: Option<Sku>) {
        let skus: Vec<Sku> = match sku {
            Some(s) => vec![s],
            None => self.planner.skus().cloned().collect(),
        };
        let mut labels = 0;
        for sku in &skus {
            let of_sku: Vec<DeviceId> = self.planner.labels_of(sku).cloned().collect();
            for label in &of_sku {
                self.planner.forget_displayed(label);
            }
            labels += of_sku.len();
            self.refresh(sku);
        }
        tracing::info!(labels, skus = skus.len(), "Labels repushed on request");
    }

    fn on_input(&mut self, input: LabelInput) {
        if self.is_stale(&input) {
            self.stale_inputs += 1;
            return;
        }
        let now = self.now_ms();
        match input {
            LabelInput::CheckIn { label, shown_hash, .. } => {
                self.planner.on_check_in(&label, shown_hash, now);
                self.shelf_shows(&label);
            }
            // A repush forgets what labels were confirmed to show, not what they show: the
            // till keeps honouring it until they confirm something else.
            LabelInput::Repush { sku } => self.repush(sku),
            LabelInput::Ack { label, command_id, stage, shown_hash, .. } => {
                let settled = self.planner.on_ack(&label, command_id, stage, shown_hash, now);
                self.shelf_shows(&label);
                if settled {
                    if let Some(sku) = self.planner.sku_of(&label).cloned() {
                        self.confirm_if_shown(&sku);
                    }
                }
            }
        }
    }

    async fn send_due(&mut self) {
        let now = self.now_ms();
        for cmd in self.planner.next_batch(now) {
            let c = &cmd.content;
            let body = fp::Body::LabelRender(fp::LabelRender {
                content_hash: cmd.hash,
                name: fp::truncated_str(&c.name),
                price_minor: c.price.minor,
                currency: fp::truncated_str(c.price.currency.code()),
                promo: c.promo.map(|(p, until)| fp::Promo { price_minor: p.minor, until_ms: until }),
                unit_price: c
                    .unit_price
                    .as_ref()
                    .map(|(p, per)| fp::UnitPrice { price_minor: p.minor, per: fp::truncated_str(per) }),
                expires_ms: 0,
            });
            let payload = match fp::Envelope::new(cmd.label.as_str(), self.hub_boot, cmd.command_id, body)
                .map_err(|e| e.to_string())
                .and_then(|env| fp::payload::encode_vec(&env).map_err(|e| e.to_string()))
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(device_id = %cmd.label, device_kind = "esl", error = %e, error_code = "LABEL_ENCODE", "Cannot encode a label command");
                    continue;
                }
            };
            let topic = topics::device(&self.store, DeviceKind::Esl, &cmd.label, Leaf::Cmd);
            if let Err(e) = self.client.publish(topic, QoS::AtLeastOnce, false, payload).await {
                tracing::error!(device_id = %cmd.label, device_kind = "esl", error = %e, error_code = "LABEL_SEND", "Label command not queued");
            }
        }
        let passed = match self.till.lock() {
            // The till's clock is wall time (lanes look prices up at wall time).
            Ok(mut till) => till.poll(wall_ms()),
            Err(_) => Vec::new(),
        };
        for p in passed {
            let hash = self.expected_hash(&p.sku);
            let lagging: Vec<String> = self
                .planner
                .mismatches(|s| if s == &p.sku { hash } else { None })
                .into_iter()
                .map(|(l, _)| l.to_string())
                .collect();
            tracing::warn!(sku = %p.sku, lagging = ?lagging, error_code = "LABELS_LAGGING",
                "Price increase deadline passed: the till charges it now; these labels still show the old price");
        }
    }

    pub async fn run(
        mut self,
        mut inputs: mpsc::Receiver<LabelInput>,
        mut changes: broadcast::Receiver<Change>,
        stop: CancellationToken,
    ) {
        let skus: Vec<Sku> = self.planner.skus().cloned().collect();
        for sku in &skus {
            self.refresh(sku);
        }
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut status = tokio::time::interval(Duration::from_secs(1));
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.send_due().await,
                _ = status.tick() => {
                    let list = self.planner.mismatched();
                    if let Ok(mut m) = self.mismatches.lock() {
                        *m = list;
                    }
                    let view = LabelsView {
                        labels: self.planner.labels_len(),
                        stages: self.planner.counts(),
                        stale_inputs: self.stale_inputs,
                        sends: self.planner.sends.clone(),
                        last_command_id: self.planner.last_command_id(),
                    };
                    if let Ok(mut b) = self.board.lock() {
                        *b = view;
                    }
                }
                input = inputs.recv() => match input {
                    Some(i) => self.on_input(i),
                    None => return,
                },
                change = changes.recv() => match change {
                    Ok(Change::Product(sku)) => self.refresh(&sku),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, error_code = "LABELS_LAGGED", "Label planner fell behind the ledger; re-rendering every label");
                        for sku in &skus {
                            self.refresh(sku);
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}

/// Reads `label,sku` bindings (a header line, then one label per line); errors name the line.
pub fn read_bindings(text: &str) -> Result<Vec<(DeviceId, Sku)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (n == 0 && line.eq_ignore_ascii_case("label,sku")) {
            continue;
        }
        let (label, sku) = line.split_once(',').ok_or_else(|| format!("line {}: expected label,sku", n + 1))?;
        let label = DeviceId::new(label.trim()).map_err(|e| format!("line {}: {e}", n + 1))?;
        let sku = Sku::new(sku.trim()).map_err(|e| format!("line {}: {e}", n + 1))?;
        out.push((label, sku));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_message_from_the_same_boot_is_not_admitted() {
        let mut seen = NewestSeen::default();
        let label = DeviceId::new("milk-1").unwrap();
        let at = |boot, seq| SentAs { boot, seq };
        assert!(seen.admit(&label, at(7, 10)), "an ack, delivered first");
        assert!(!seen.admit(&label, at(7, 3)), "the check-in sent before it, delivered late");
        assert!(seen.admit(&label, at(7, 11)));
        assert!(seen.admit(&label, at(8, 1)), "a new boot starts over");
        assert!(seen.admit(&DeviceId::new("milk-2").unwrap(), at(7, 1)), "per label");
    }

    #[test]
    fn bindings_name_the_bad_line() {
        let ok = read_bindings("label,sku\nesl-1,MILK\n\n# aisle 3\nesl-2, BREAD\n").unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(read_bindings("label,sku\nesl-1 MILK\n").unwrap_err(), "line 2: expected label,sku");
        assert!(read_bindings("esl 1,MILK\n").unwrap_err().starts_with("line 1: invalid device id"));
    }
}
