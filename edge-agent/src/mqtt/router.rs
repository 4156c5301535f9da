//! Routes what arrives over MQTT: device envelopes (status, events, acks) to the registry and,
//! for RFID readers, to presence; Impinj JSON on its configured topics to presence. Anything
//! malformed, oversized, of an unknown version or from a device not on the allow-list is
//! refused with a log line and a counter, and never stops the rest. Exit-gate alarms are
//! published on `se/v1/{store}/hub/alarm`. Reads on counting zones also feed the zone cycle
//! counter; each cycle it closes goes to the count task (`rfid::count`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use firmware_proto as fp;
use rumqttc::{AsyncClient, QoS};
use shared::{DeviceId, StoreId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::link::Incoming;
use super::topics::{self, DeviceKind, DeviceTopic, Leaf};
use crate::devices::registry::{Changes, Heard, Now, Registry, Seen};
use crate::labels::planner::AckStage;
use crate::labels::runtime::{LabelInput, SentAs};
use crate::ledger::LedgerReader;
use crate::rfid::cycle::{Closed, CycleCount, CycleCounter};
use crate::rfid::impinj;
use crate::rfid::presence::{Presence, PresenceEvent, Sighting, TagRead, Zone};

/// Why messages were refused, counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RouterStats {
    pub accepted: u64,
    pub refused_topic: u64,
    pub refused_oversized: u64,
    pub refused_payload: u64,
    pub quarantined: u64,
    pub impinj_events: u64,
    pub impinj_refused: u64,
    pub tag_reads: u64,
    pub reader_overflows: u64,
    pub exit_alarms: u64,
    /// Label acks and check-ins dropped because the label task was behind (retries cover them).
    pub label_inputs_dropped: u64,
    /// Zone cycles closed and handed to the count task.
    pub cycle_counts: u64,
    /// Zone cycles that ended but were not counted for a problem (reads lost, start not seen);
    /// empty windows and the window running at start-up are not problems and not counted here.
    pub cycles_not_counted: u64,
    /// Zone cycles dropped because the count task was behind (the next cycle counts again).
    pub cycle_counts_dropped: u64,
}

pub struct Router {
    pub store: StoreId,
    pub max_payload: usize,
    pub registry: Registry,
    /// Shared with the lanes, which record the tags in their zones as sold with a sale.
    pub presence: Arc<Mutex<Presence>>,
    /// Where sold EPCs are looked up for the exit gate (none: every tag there alarms).
    pub sold: Option<LedgerReader>,
    /// Impinj topic -> reader id.
    pub impinj: HashMap<String, DeviceId>,
    /// Where label check-ins and acks go, when labels are configured.
    pub labels: Option<mpsc::Sender<LabelInput>>,
    pub stats: RouterStats,
    /// Where the router publishes its counters and the device registry once a second, for
    /// `storectl devices` and the metrics.
    pub board: Option<super::MqttBoard>,
    /// Where changed registry entries are sent to be saved (`devices.db`), when it could be
    /// opened.
    pub persist: Option<mpsc::Sender<Changes>>,
    last_persist_ms: u64,
    /// Zone cycle counts in progress, and where closed ones go (the count task).
    pub cycles: CycleCounter,
    pub counts: Option<mpsc::Sender<CycleCount>>,
    /// Reader names, shared by every zone and tag of the reader (no allocation per read).
    readers: HashSet<Arc<str>>,
    /// The last device topic and what it parsed to.
    last_topic: Option<(String, DeviceTopic)>,
    /// The reader of the last tag reads (one of `readers`).
    last_reader: Option<Arc<str>>,
    started: Instant,
}

/// Registry changes are saved at most this often (the file is a cache; a device's next
/// message restores whatever a crash lost).
pub const PERSIST_EVERY_MS: u64 = 2_000;

/// What the router asks its task to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    Publish { topic: String, payload: Vec<u8> },
}

impl Router {
    pub fn new(
        store: StoreId,
        max_payload: usize,
        registry: Registry,
        presence: Arc<Mutex<Presence>>,
        impinj: HashMap<String, DeviceId>,
    ) -> Router {
        Router {
            store,
            max_payload,
            registry,
            presence,
            impinj,
            sold: None,
            labels: None,
            stats: RouterStats::default(),
            board: None,
            persist: None,
            last_persist_ms: 0,
            cycles: CycleCounter::default(),
            counts: None,
            readers: HashSet::new(),
            last_topic: None,
            last_reader: None,
            started: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn now(&self) -> Now {
        Now { mono_ms: self.now_ms(), wall_ms: crate::labels::runtime::wall_ms() }
    }

    /// Hands the registry's changes to the writer, unless it is still busy with earlier ones
    /// (then they wait for the next turn).
    fn persist_registry(&mut self) {
        let Some(tx) = &self.persist else { return };
        let changes = self.registry.take_changes();
        if changes.is_empty() {
            return;
        }
        if let Err(e) = tx.try_send(changes) {
            let changes = match e {
                mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => c,
            };
            self.registry.unsaved(changes);
        }
    }

    /// The last changes, at shutdown: waits for the writer to take them.
    pub async fn flush_registry(&mut self) {
        let Some(tx) = self.persist.take() else { return };
        let changes = self.registry.take_changes();
        if !changes.is_empty() && tx.send(changes).await.is_err() {
            tracing::warn!(
                error_code = "REGISTRY_WRITE",
                "The device registry writer is gone; the last changes are not saved"
            );
        }
    }

    pub fn handle(&mut self, msg: Incoming) -> Vec<Outbound> {
        let now = self.now_ms();
        let mut out = Vec::new();
        if msg.payload.len() > self.max_payload {
            self.stats.refused_oversized += 1;
            tracing::warn!(topic = %msg.topic, bytes = msg.payload.len(), max = self.max_payload, error_code = "MQTT_OVERSIZED",
                "Oversized MQTT payload refused");
            return out;
        }
        if let Some(reader) = self.impinj.get(&msg.topic).cloned() {
            let parsed = impinj::parse(&msg.payload);
            self.stats.impinj_events += parsed.reads.len() as u64 + parsed.other_events as u64;
            for e in &parsed.errors {
                self.stats.impinj_refused += 1;
                tracing::warn!(device_id = %reader, topic = %msg.topic, error = %e, error_code = "IMPINJ_REFUSED", "Impinj event refused");
            }
            let reads = parsed.reads.iter().map(|r| (r.antenna, r.epc.as_slice()));
            self.tag_reads(reader.as_str(), reads, now, &mut out);
            return out;
        }
        let topic = match self.device_topic(&msg.topic) {
            Ok(t) => t,
            Err(e) => {
                self.stats.refused_topic += 1;
                tracing::warn!(topic = %msg.topic, error = %e, error_code = "MQTT_TOPIC", "MQTT message on an unexpected topic refused");
                return out;
            }
        };
        self.device_message(&topic, &msg.payload, now, &mut out);
        // Kept for the next message: a device sends its stream on one topic.
        self.last_topic = Some((msg.topic, topic));
        out
    }

    /// The device topic named `name`: the last one parsed when it is the same (no parse, no
    /// allocation), else parsed.
    fn device_topic(&mut self, name: &str) -> Result<DeviceTopic, String> {
        match self.last_topic.take() {
            Some((last, topic)) if last == name => Ok(topic),
            _ => topics::parse(&self.store, name),
        }
    }

    /// A message on a device's topic.
    fn device_message(&mut self, topic: &DeviceTopic, payload: &[u8], now: u64, out: &mut Vec<Outbound>) {
        if topic.leaf == Leaf::Cmd {
            return; // the hub's own commands
        }
        // A reader's tag reads, the bulk of the traffic, are read in place; anything the fast
        // path does not take (other messages, and every malformed payload) gets the full
        // decoder and its verdict.
        if topic.kind == DeviceKind::Rfid {
            if let Some(batch) = fp::tag_reads::decode_tag_reads(payload) {
                let heard = Heard { boot_id: batch.boot_id, seq: batch.seq, body: None };
                if self.admit(topic, batch.device, heard) {
                    let reads = batch.reads().map(|r| (r.antenna, r.epc));
                    self.tag_reads(topic.device.as_str(), reads, now, out);
                }
                return;
            }
        }
        let env = match fp::payload::decode(payload) {
            Ok(env) => env,
            Err(e) => {
                self.stats.refused_payload += 1;
                tracing::warn!(device_id = %topic.device, device_kind = topic.kind.as_str(), error = %e, error_code = "MQTT_PAYLOAD",
                    "Device payload refused");
                return;
            }
        };
        let heard = Heard { boot_id: env.boot_id, seq: env.seq, body: Some(&env.body) };
        if !self.admit(topic, env.device.as_str(), heard) {
            return;
        }
        if topic.kind == DeviceKind::Esl {
            let sent = SentAs { boot: env.boot_id, seq: env.seq };
            let input = match &env.body {
                fp::Body::LabelCheckIn(c) => {
                    Some(LabelInput::CheckIn { label: topic.device.clone(), shown_hash: c.shown_hash, sent })
                }
                fp::Body::CommandAck(a) => Some(LabelInput::Ack {
                    label: topic.device.clone(),
                    command_id: a.of_seq,
                    stage: match a.stage {
                        fp::AckStage::Queued => AckStage::Queued,
                        fp::AckStage::Delivered => AckStage::Delivered,
                        fp::AckStage::Applied => AckStage::Applied,
                        fp::AckStage::Failed => AckStage::Failed,
                    },
                    shown_hash: a.content_hash,
                    sent,
                }),
                _ => None,
            };
            if let (Some(input), Some(labels)) = (input, &self.labels) {
                if labels.try_send(input).is_err() {
                    self.stats.label_inputs_dropped += 1;
                }
            }
        }
        if topic.kind == DeviceKind::Rfid {
            // By reference: a body is up to ~800 bytes (a full `TagReads`), not worth moving.
            match &env.body {
                fp::Body::TagReads(batch) => {
                    let reads = batch.reads.iter().map(|r| (r.antenna, r.epc.as_slice()));
                    self.tag_reads(topic.device.as_str(), reads, now, out);
                }
                fp::Body::ReaderStatus(s) => {
                    self.cycles.on_overflow(topic.device.as_str(), s.overflow);
                    if s.overflow > 0 {
                        self.stats.reader_overflows += u64::from(s.overflow);
                        tracing::warn!(device_id = %topic.device, overflow = s.overflow, error_code = "RFID_OVERFLOW", "RFID reader dropped reads");
                    }
                }
                fp::Body::InventoryCycle(c) => {
                    let closed =
                        self.cycles.on_cycle(topic.device.as_str(), env.boot_id, c.cycle_id, c.ended, &c.antennas);
                    self.cycles_closed(closed);
                }
                _ => {}
            }
        }
    }

    /// Whether a decoded message is taken: its envelope names the device of its topic, and the
    /// registry admits the device (not quarantined, room for it). Counts and logs the refusals.
    fn admit(&mut self, topic: &DeviceTopic, claimed: &str, heard: Heard<'_>) -> bool {
        if claimed != topic.device.as_str() {
            self.stats.refused_payload += 1;
            tracing::warn!(device_id = %topic.device, claimed = %claimed, error_code = "MQTT_DEVICE_MISMATCH",
                "Envelope names another device than its topic; refused");
            return false;
        }
        match self.registry.on_heard(topic.kind, &topic.device, heard, self.now()) {
            Seen::Quarantined { first_time } => {
                self.stats.quarantined += 1;
                if first_time {
                    tracing::warn!(device_id = %topic.device, device_kind = topic.kind.as_str(), error_code = "DEVICE_QUARANTINED",
                        "Unknown device quarantined (not on the allow-list)");
                }
                false
            }
            Seen::Refused => {
                self.stats.quarantined += 1;
                false
            }
            Seen::Adopted { came_online, new_boot } => {
                self.stats.accepted += 1;
                if came_online || new_boot {
                    tracing::info!(device_id = %topic.device, device_kind = topic.kind.as_str(), boot_id = heard.boot_id, "Device online");
                }
                true
            }
        }
    }

    /// The reader's shared name (kept for the next reads, up to one per registry entry).
    fn reader_name(&mut self, name: &str) -> Arc<str> {
        // A reader's batches come one after another: the last name first, without hashing.
        if let Some(last) = &self.last_reader {
            if **last == *name {
                return last.clone();
            }
        }
        let r = self.known_reader_name(name);
        self.last_reader = Some(r.clone());
        r
    }

    fn known_reader_name(&mut self, name: &str) -> Arc<str> {
        if let Some(r) = self.readers.get(name) {
            return r.clone();
        }
        let r: Arc<str> = name.into();
        if self.readers.len() < crate::devices::registry::MAX_DEVICES {
            self.readers.insert(r.clone());
        }
        r
    }

    /// One batch of a reader's tag reads, `(antenna, EPC)`: cycle counts, presence, exit alarms.
    /// Presence is locked once per batch; a read allocates nothing unless its tag is new.
    fn tag_reads<'r>(
        &mut self,
        reader: &str,
        reads: impl Iterator<Item = (u8, &'r [u8])> + Clone,
        now: u64,
        out: &mut Vec<Outbound>,
    ) {
        let reader = self.reader_name(reader);
        let counting = !self.cycles.is_empty();
        let wall = if counting { crate::labels::runtime::wall_ms() } else { 0 };
        let debug = tracing::enabled!(tracing::Level::DEBUG);
        let (mut closed, mut alarms) = (Closed::default(), Vec::new());
        {
            let Ok(mut presence) = self.presence.lock() else { return };
            presence.prefetch(reads.clone().map(|(_, epc)| epc));
            let sold = &self.sold;
            // A message's reads are mostly of one antenna: its zone is made once, not per read.
            let mut zone = Zone { reader: reader.clone(), antenna: 0 };
            for (antenna, epc) in reads {
                self.stats.tag_reads += 1;
                if counting {
                    closed.merge(self.cycles.on_read(&reader, antenna, epc, wall));
                }
                zone.antenna = antenna;
                let outcome = presence.on_read(TagRead { epc, zone: &zone, at_ms: now }, |e| {
                    sold.as_ref().is_some_and(|r| r.is_sold(e).unwrap_or(false))
                });
                if debug && matches!(outcome.sighting, Sighting::Arrived | Sighting::Moved { .. }) {
                    tracing::debug!(device_id = %reader, antenna, epc = ?epc, sighting = ?outcome.sighting, "RFID presence");
                }
                alarms.extend(outcome.alarm);
            }
        }
        self.cycles_closed(closed);
        for alarm in alarms {
            self.presence_event(alarm, out);
        }
    }

    /// Hands counted cycles to the count task; logs the ones not counted.
    fn cycles_closed(&mut self, closed: Closed) {
        if closed.counted.is_empty() && closed.skipped.is_empty() {
            return; // nearly every batch of reads
        }
        for s in closed.skipped {
            if s.reason.is_expected() {
                tracing::debug!(zone = %s.zone, cycle = %s.cycle, reason = %s.reason, "RFID zone cycle not counted");
                continue;
            }
            self.stats.cycles_not_counted += 1;
            tracing::warn!(zone = %s.zone, cycle = %s.cycle, reason = %s.reason, error_code = "RFID_CYCLE_NOT_COUNTED",
                "RFID zone cycle ended but is not counted");
        }
        for count in closed.counted {
            let Some(tx) = &self.counts else { continue };
            match tx.try_send(count) {
                Ok(()) => self.stats.cycle_counts += 1,
                Err(e) => {
                    self.stats.cycle_counts_dropped += 1;
                    let count = match e {
                        mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => c,
                    };
                    tracing::warn!(zone = %count.zone.name(), cycle = %count.cycle, error_code = "RFID_COUNT_DROPPED",
                        "RFID zone count dropped: the count task is behind (the zone's next cycle counts again)");
                }
            }
        }
    }

    fn presence_event(&mut self, event: PresenceEvent, out: &mut Vec<Outbound>) {
        match event {
            PresenceEvent::ExitAlarm { epc, zone, gtin, serial } => {
                self.stats.exit_alarms += 1;
                let epc_hex: String = epc.iter().map(|b| format!("{b:02X}")).collect();
                let gtin = gtin.map(|g| g.to_string());
                tracing::warn!(device_id = %zone.reader, antenna = zone.antenna, epc = %epc_hex, gtin = ?gtin, error_code = "EXIT_ALARM",
                    "Tagged item at the exit was not sold");
                let payload = serde_json::json!({
                    "alarm": "exit_unsold",
                    "reader": &*zone.reader,
                    "antenna": zone.antenna,
                    "epc_hex": epc_hex,
                    "gtin": gtin,
                    "serial": serial,
                });
                out.push(Outbound::Publish {
                    topic: topics::hub_alarm(&self.store),
                    payload: payload.to_string().into_bytes(),
                });
            }
            other => tracing::debug!(event = ?other, "RFID presence"),
        }
    }

    /// Liveness: devices whose heartbeats stopped, tags that departed.
    /// Copies the counters and the registry to the board (once a second: a copy of up to
    /// `MAX_DEVICES` entries is cheap at that rate and keeps the router free of locks).
    pub fn publish_board(&self) {
        let Some(board) = &self.board else { return };
        let snapshot = super::MqttSnapshot {
            stats: self.stats.clone(),
            devices: self.registry.devices().map(|(id, info)| (id.clone(), info.clone())).collect(),
            quarantined: self.registry.quarantined().map(|(id, n)| (id.clone(), *n)).collect(),
        };
        if let Ok(mut b) = board.lock() {
            *b = snapshot;
        }
    }

    pub fn tick(&mut self) {
        let now = self.now_ms();
        if now.saturating_sub(self.last_persist_ms) >= PERSIST_EVERY_MS {
            self.last_persist_ms = now;
            self.persist_registry();
        }
        for id in self.registry.poll(now) {
            tracing::warn!(device_id = %id, error_code = "DEVICE_OFFLINE", "Device offline (heartbeats stopped)");
        }
        let departed = match self.presence.lock() {
            Ok(mut p) => p.poll(now),
            Err(_) => Vec::new(),
        };
        for event in departed {
            tracing::debug!(event = ?event, "RFID presence");
        }
        if !self.cycles.is_empty() {
            let closed = self.cycles.poll(crate::labels::runtime::wall_ms());
            self.cycles_closed(closed);
        }
    }
}

/// Runs the router over the link's incoming messages until `stop`. The daemon runs it on a
/// thread of its own (`crate::own_thread`), beside the link's task on the shared runtime.
pub async fn run(
    mut router: Router,
    mut incoming: mpsc::Receiver<Vec<Incoming>>,
    client: AsyncClient,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let out = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => { router.tick(); router.publish_board(); Vec::new() }
            batch = incoming.recv() => match batch {
                Some(batch) => {
                    let mut out = Vec::new();
                    for m in batch {
                        out.extend(router.handle(m));
                    }
                    out
                }
                None => break,
            },
        };
        for o in out {
            let Outbound::Publish { topic, payload } = o;
            if let Err(e) = client.publish(topic, QoS::AtLeastOnce, false, payload).await {
                tracing::error!(error = %e, error_code = "MQTT_PUBLISH", "Cannot queue an MQTT publish");
            }
        }
    }
    router.flush_registry().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &str = "se/v1/s1/dev/rfid/gate-1/evt";

    fn router(allow: &[&str]) -> Router {
        let allow = (!allow.is_empty()).then(|| allow.iter().map(|d| DeviceId::new(*d).unwrap()).collect());
        let presence = Arc::new(Mutex::new(Presence::new(Default::default(), [])));
        Router::new(StoreId::new("s1").unwrap(), 65_536, Registry::new(allow, 60_000), presence, HashMap::new())
    }

    fn tag_reads(device: &str, epcs: &[[u8; 12]]) -> Vec<u8> {
        let mut reads = heapless::Vec::new();
        for epc in epcs {
            let read =
                fp::TagRead { epc: heapless::Vec::from_slice(epc).unwrap(), antenna: 1, rssi_cdbm: -4_000, count: 1 };
            reads.push(read).unwrap();
        }
        let env = fp::Envelope::new(device, 3, 1, fp::Body::TagReads(fp::TagReads { reads })).unwrap();
        fp::payload::encode_vec(&env).unwrap()
    }

    fn incoming(payload: Vec<u8>) -> Incoming {
        Incoming { topic: TOPIC.into(), payload: payload.into() }
    }

    fn tags_at_gate(r: &Router) -> usize {
        let zone = Zone { reader: "gate-1".into(), antenna: 1 };
        r.presence.lock().unwrap().tags_in(&zone).len()
    }

    /// Tag reads take the in-place decoder; what it does not take meets the same checks and
    /// counters as every other message.
    #[test]
    fn tag_reads_read_in_place_are_checked_like_any_message() {
        let mut r = router(&["gate-1", "gate-2"]);
        r.handle(incoming(tag_reads("gate-1", &[[1; 12], [2; 12]])));
        assert_eq!((r.stats.accepted, r.stats.tag_reads, tags_at_gate(&r)), (1, 2, 2));
        assert_eq!(r.registry.devices().count(), 1);

        // The envelope names another reader than its topic.
        r.handle(incoming(tag_reads("gate-2", &[[3; 12]])));
        assert_eq!((r.stats.refused_payload, r.stats.tag_reads), (1, 2));

        // Corrupted on the way: refused with the full decoder's verdict.
        let mut bad = tag_reads("gate-1", &[[4; 12]]);
        bad[10] ^= 0xff;
        r.handle(incoming(bad));
        assert_eq!((r.stats.refused_payload, r.stats.tag_reads), (2, 2));

        // Another reader's topic after the first (the last topic is kept, not reused for it),
        // then a topic of another store.
        let mut other = incoming(tag_reads("gate-2", &[[6; 12]]));
        other.topic = "se/v1/s1/dev/rfid/gate-2/evt".into();
        r.handle(other);
        assert_eq!((r.stats.accepted, r.stats.tag_reads, r.registry.devices().count()), (2, 3, 2));
        let mut foreign = incoming(tag_reads("gate-2", &[[7; 12]]));
        foreign.topic = "se/v1/s2/dev/rfid/gate-2/evt".into();
        r.handle(foreign);
        assert_eq!((r.stats.refused_topic, r.stats.tag_reads), (1, 3));

        // A reader not on the allow-list is quarantined, its reads not taken.
        let mut r = router(&["gate-9"]);
        r.handle(incoming(tag_reads("gate-1", &[[5; 12]])));
        assert_eq!((r.stats.quarantined, r.stats.tag_reads, tags_at_gate(&r)), (1, 0, 0));
    }
}
