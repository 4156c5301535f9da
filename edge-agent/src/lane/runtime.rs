//! The task that owns one lane: it runs the [`Lane`] state machine on inputs from the lane's
//! devices, looks products up on its own read-only ledger connection, persists the basket and
//! commits sales through the ledger writer, and sends display updates to the lane display.
//! Receipt ids are `{store}-{ledger sequence}`, so a retried commit shows the same receipt.

use std::time::{SystemTime, UNIX_EPOCH};

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::catalog::LedgerCatalog;
use super::{Basket, Display, Lane, LaneInput, LaneOutput};
use crate::labels::sequencing::TillPrices;
use crate::ledger::{Command, EventBody, IdempotencyKey, LedgerHandle, LedgerReader};
use crate::rfid::presence::{Presence, Zone};
use shared::{Currency, DeviceId, StoreId};

/// Inputs waiting for a lane; device tasks wait when it is full.
pub const LANE_QUEUE: usize = 256;
/// Display updates waiting for the lane display's link; the oldest are not dropped: the lane
/// waits, as a display that falls behind must still show the basket right.
pub const DISPLAY_QUEUE: usize = 256;
/// Version byte in front of a saved basket.
const BASKET_VERSION: u8 = 1;

pub fn encode_basket(basket: &Basket) -> Vec<u8> {
    postcard::to_extend(basket, vec![BASKET_VERSION]).expect("a Basket serialises into a Vec")
}

pub fn decode_basket(bytes: &[u8]) -> Result<Basket, String> {
    match bytes.split_first() {
        Some((&BASKET_VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| e.to_string()),
        Some((v, _)) => Err(format!("unknown basket format {v}")),
        None => Err("empty basket record".into()),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub struct LaneTask {
    pub lane: Lane,
    pub id: DeviceId,
    pub store: StoreId,
    pub catalog: LedgerCatalog,
    pub ledger: LedgerHandle,
    pub display: mpsc::Sender<Display>,
    /// Display updates were dropped because the display's queue was full: redraw when it drains.
    display_behind: bool,
    /// RFID presence and this lane's zones: tags that came into them during the basket are
    /// recorded as sold with its sale.
    rfid: Option<(Arc<Mutex<Presence>>, Vec<Zone>)>,
    /// The basket in progress (session, number) and the presence arrival mark taken when it
    /// started. A basket resumed after a restart counts from mark 0 (every tag still there).
    basket_mark: ((u64, u64), u64),
}

impl LaneTask {
    /// Builds the lane, resuming the basket saved in the ledger (a damaged record is logged and
    /// a fresh basket started, so a lane never stays down over it).
    pub fn new(
        id: DeviceId,
        store: StoreId,
        currency: Currency,
        reader: LedgerReader,
        ledger: LedgerHandle,
        display: mpsc::Sender<Display>,
    ) -> LaneTask {
        let restored = match reader.lane_basket(id.as_str()) {
            Ok(Some(bytes)) => match decode_basket(&bytes).and_then(|b| b.check(currency).map(|()| b)) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::error!(lane_id = %id, error = %e, error_code = "LANE_BASKET_DAMAGED", "Saved basket unreadable; starting a new one");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::error!(lane_id = %id, error = %e, error_code = "LANE_BASKET_UNREADABLE", "Cannot read the saved basket; starting a new one");
                None
            }
        };
        if let Some(b) = &restored {
            tracing::info!(lane_id = %id, basket = b.number, lines = b.lines.len(), "Lane basket resumed");
        }
        let lane = Lane::new(id.clone(), store.clone(), currency, restored, rand::random());
        let basket_mark = ((lane.basket().session, lane.basket().number), 0);
        LaneTask {
            basket_mark,
            lane,
            id,
            store,
            catalog: LedgerCatalog::new(reader),
            ledger,
            display,
            display_behind: false,
            rfid: None,
        }
    }

    /// Charges what the till may charge while label changes are pending (see `labels::sequencing`).
    pub fn with_till(mut self, till: Arc<Mutex<TillPrices>>) -> LaneTask {
        self.catalog = self.catalog.with_till(till);
        self
    }

    /// What the lane charges when a label shows less than the system (`[lane] charge`).
    pub fn with_policy(mut self, policy: crate::labels::sequencing::ChargePolicy) -> LaneTask {
        self.catalog = self.catalog.with_policy(policy);
        self
    }

    /// Records the tags present in `zones` as sold with each sale of this lane.
    pub fn with_rfid(mut self, presence: Arc<Mutex<Presence>>, zones: Vec<Zone>) -> LaneTask {
        if !zones.is_empty() {
            self.rfid = Some((presence, zones));
        }
        self
    }

    /// The tags in the lane's RFID zones now, bounded by the ledger's line limit.
    /// Notes when a new basket starts (after a sale or a voided basket), so that tags left at
    /// the lane by an earlier customer, such as a voided basket's, are not sold with this one.
    fn track_basket(&mut self) {
        let basket = self.lane.basket();
        let id = (basket.session, basket.number);
        if id != self.basket_mark.0 {
            let mark = match &self.rfid {
                Some((presence, _)) => presence.lock().map(|p| p.arrival_mark()).unwrap_or(0),
                None => 0,
            };
            self.basket_mark = (id, mark);
        }
    }

    fn tags_at_lane(&self) -> Vec<Vec<u8>> {
        let Some((presence, zones)) = &self.rfid else { return Vec::new() };
        let mark = self.basket_mark.1;
        let mut epcs: Vec<Vec<u8>> = match presence.lock() {
            Ok(p) => zones.iter().flat_map(|z| p.tags_arrived_since(z, mark)).collect(),
            Err(_) => return Vec::new(),
        };
        epcs.truncate(crate::ledger::command::MAX_LINES);
        epcs
    }

    /// Runs until `stop` or until every input sender is gone.
    pub async fn run(mut self, mut inputs: mpsc::Receiver<LaneInput>, stop: CancellationToken) {
        let resume = self.lane.resume();
        self.process(resume).await;
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let input = tokio::select! {
                _ = stop.cancelled() => return,
                input = inputs.recv() => match input { Some(i) => i, None => return },
                _ = tick.tick() => {
                    if !(self.display_behind && self.display.capacity() == self.display.max_capacity()) {
                        continue;
                    }
                    self.display_behind = false;
                    LaneInput::DisplayReconnected
                }
            };
            let out = self.lane.handle(input, now_ms(), &self.catalog);
            self.process(out).await;
            self.track_basket();
        }
    }

    /// Carries out the lane's outputs in order; the ledger's answers feed back in as inputs.
    /// The display is updated first and the basket saved right after (the lane waits for the
    /// save before its next input), so the customer sees a scan at once and a restart resumes
    /// every line whose save completed, which is all but a crash within that millisecond.
    async fn process(&mut self, outputs: Vec<LaneOutput>) {
        let mut queue = std::collections::VecDeque::from(outputs);
        while let Some(output) = queue.pop_front() {
            match output {
                LaneOutput::Display(d) => {
                    // Never wait on the display: its session may itself be waiting on this
                    // lane's input queue. A full queue means it is far behind: drop, redraw later.
                    if self.display.try_send(d).is_err() && !self.display_behind {
                        self.display_behind = true;
                        tracing::warn!(lane_id = %self.id, error_code = "DISPLAY_BEHIND", "Lane display queue full; it will be redrawn");
                    }
                }
                LaneOutput::Persist(basket) => {
                    if let Err(e) = self.ledger.save_basket(self.id.as_str(), Some(encode_basket(&basket))).await {
                        tracing::error!(lane_id = %self.id, error = %e, error_code = "LANE_BASKET_SAVE", "Basket not saved");
                    }
                }
                LaneOutput::Commit { key, lines, tender } => {
                    let key_text = key.clone();
                    let result = match IdempotencyKey::new(key) {
                        Ok(key) => self
                            .ledger
                            .submit(key, Command::Sale { lines: lines.clone(), tender })
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let answer = match result {
                        Ok(applied) => match &applied.body {
                            // A replay must be this basket's own sale: the key may name an older
                            // sale whose basket was edited after a failed commit.
                            EventBody::Sale { total, lines: sold, .. } if !applied.replayed || *sold == lines => {
                                record_sold_tags(&self.ledger, &self.id, &key_text, self.tags_at_lane()).await;
                                let receipt_id = format!("{}-{:08}", self.store, applied.seq);
                                tracing::info!(lane_id = %self.id, receipt_id = %receipt_id, total = %total, replayed = applied.replayed, "Sale committed");
                                LaneInput::Committed { key: key_text, receipt_id, total: *total }
                            }
                            other => LaneInput::CommitFailed {
                                reason: format!("the basket's key already names another {} event", other.kind()),
                                key_taken: true,
                            },
                        },
                        Err(reason) => LaneInput::CommitFailed { reason, key_taken: false },
                    };
                    if let LaneInput::CommitFailed { reason, .. } = &answer {
                        tracing::error!(lane_id = %self.id, error = %reason, error_code = "LANE_SALE_FAILED", "Sale not committed");
                    }
                    queue.extend(self.lane.handle(answer, now_ms(), &self.catalog));
                }
            }
        }
    }
}

/// Records `epcs` as sold with the sale `key` (idempotent: a retried sale records under the same
/// key), so the exit gate lets them pass.
async fn record_sold_tags(ledger: &LedgerHandle, lane: &DeviceId, key: &str, epcs: Vec<Vec<u8>>) {
    if epcs.is_empty() {
        return;
    }
    let count = epcs.len();
    let result = match IdempotencyKey::new(format!("{key}:epcs")) {
        Ok(k) => ledger.submit(k, Command::EpcsSold { epcs }).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(_) => tracing::info!(lane_id = %lane, tags = count, "Tagged items recorded as sold"),
        Err(e) => tracing::error!(lane_id = %lane, error = %e, error_code = "LANE_EPCS", "Sold tags not recorded"),
    }
}
