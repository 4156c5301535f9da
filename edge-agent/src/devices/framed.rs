//! A `firmware-proto` session with one framed serial device (scanner, scale or lane display):
//! the HELLO handshake (an incompatible firmware is refused, naming version or schema), a
//! link-level ack for every message that needs one, duplicates (a device re-sending after a
//! lost ack) acknowledged again but handed on once, and the hub's own messages to the device
//! (lane display updates) kept in a small window and re-sent until acked.
//!
//! [`Session`] is the pure protocol state; [`run`] does the I/O around it.

use std::collections::VecDeque;
use std::time::Instant;

use firmware_proto as fp;
use firmware_proto::link::{Dedup, Due, Outbox, Seen};
use shared::DeviceId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::plain_scanner::DoubleReadFilter;
use super::serial::{LinkEvent, SerialLink};
use crate::config::SerialKind;
use crate::lane::{Display, LaneInput, MessageCode, WeightReading};
use crate::ledger::Tender;

/// Hub messages in flight to one device before it must ack.
pub const WINDOW: usize = 8;
/// Display updates waiting for room in the window: a full redraw (every line, its void, the
/// total, a message) fits. Past this they are dropped and the lane asked for one redraw.
pub const PENDING_MAX: usize = 2 * crate::lane::MAX_LINES + 112;
const RETRY_AFTER_MS: u64 = 300;
const MAX_ATTEMPTS: u8 = 10;

#[derive(Debug, Clone)]
pub struct FramedSettings {
    pub device_id: DeviceId,
    pub kind: SerialKind,
    pub double_read_window_ms: u64,
}

/// What the session asks its runner to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write this envelope to the device.
    Send(Box<fp::Envelope>),
    /// Hand this to the lane.
    Lane(LaneInput),
}

pub struct Session {
    settings: FramedSettings,
    /// The hub side's boot id for this connection: a new one on every (re)connection, so the
    /// device's duplicate detection starts afresh with the hub's sequence numbers.
    hub_boot: u32,
    /// The device's boot id once its HELLO was accepted on this connection.
    peer: Option<u32>,
    dedup: Dedup,
    outbox: Outbox<fp::Body, WINDOW>,
    pending: VecDeque<fp::Body>,
    doubles: DoubleReadFilter,
    /// Seq of the last weight applied from the current device boot: an older weight that
    /// arrives late (a resend overtaken by a newer reading) is not applied (SPEC "latest wins").
    last_weight_seq: Option<u32>,
    /// A redraw was asked of the lane and has not started yet: ask once, not per overflow.
    redraw_requested: bool,
    /// The device stopped acking; its display is redrawn once it is heard from again.
    stalled: bool,
    pub refused_frames: u64,
}

fn expected_kind(kind: SerialKind) -> fp::DeviceKind {
    match kind {
        SerialKind::Scanner => fp::DeviceKind::Scanner,
        SerialKind::Scale => fp::DeviceKind::Scale,
        SerialKind::Lane => fp::DeviceKind::Lane,
    }
}

impl Session {
    pub fn new(settings: FramedSettings, hub_boot: u32) -> Session {
        let doubles = DoubleReadFilter::new(settings.double_read_window_ms);
        Session {
            settings,
            hub_boot,
            peer: None,
            dedup: Dedup::new(),
            outbox: Outbox::new(RETRY_AFTER_MS, MAX_ATTEMPTS),
            pending: VecDeque::new(),
            doubles,
            last_weight_seq: None,
            redraw_requested: false,
            stalled: false,
            refused_frames: 0,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.peer.is_some()
    }

    /// The port closed or reopened: the device must HELLO again; the hub starts a new session
    /// (boot id `hub_boot`, sequence numbers from 1).
    pub fn reset(&mut self, hub_boot: u32) {
        self.hub_boot = hub_boot;
        self.peer = None;
        self.outbox = Outbox::new(RETRY_AFTER_MS, MAX_ATTEMPTS);
        self.pending.clear();
    }

    fn envelope(&mut self, body: fp::Body, seq: u32) -> Option<fp::Envelope> {
        match fp::Envelope::new(self.settings.device_id.as_str(), self.hub_boot, seq, body) {
            Ok(env) => Some(env),
            Err(e) => {
                tracing::error!(device_id = %self.settings.device_id, error = %e, error_code = "DEVICE_ID_TOO_LONG", "Cannot address the device (its id does not fit the protocol)");
                None
            }
        }
    }

    /// Sends a message that is not acked (handshake answers, acks), in the same sequence space
    /// as the reliable ones.
    fn unreliable(&mut self, body: fp::Body, out: &mut Vec<Action>) {
        let seq = self.outbox.take_seq();
        if let Some(env) = self.envelope(body, seq) {
            out.push(Action::Send(Box::new(env)));
        }
    }

    /// Handles one decoded envelope from the device.
    pub fn on_envelope(&mut self, env: fp::Envelope, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let id = &self.settings.device_id;
        if env.device.as_str() != id.as_str() {
            self.refused_frames += 1;
            tracing::warn!(device_id = %id, claimed = %env.device, error_code = "DEVICE_ID_MISMATCH",
                "Frame from a different device id on this port refused (check the wiring and config)");
            return out;
        }
        if let fp::Body::Hello(hello) = &env.body {
            let refusal = match fp::check_hello(hello) {
                Err(e) => Some((format!("{e}"), fp::RefuseReason::from(e))),
                Ok(()) if hello.kind != expected_kind(self.settings.kind) => Some((
                    format!("device says it is a {}, configured as {:?}", hello.kind.as_str(), self.settings.kind)
                        .to_lowercase(),
                    fp::RefuseReason::UnknownDevice,
                )),
                Ok(()) => None,
            };
            match refusal {
                Some((why, reason)) => {
                    self.refused_frames += 1;
                    self.peer = None;
                    tracing::error!(device_id = %id, firmware = %hello.firmware, reason = %why, error_code = "DEVICE_INCOMPATIBLE",
                        "Device refused: incompatible firmware");
                    self.unreliable(fp::Body::HelloRefused(fp::HelloRefused { reason }), &mut out);
                }
                None => {
                    // The same boot saying HELLO again (the link was reopened) keeps its
                    // duplicate window: a message it re-sends after a lost ack is still known.
                    if self.dedup.boot_id() != Some(env.boot_id) {
                        self.last_weight_seq = None;
                        self.dedup = Dedup::new();
                        tracing::info!(device_id = %id, firmware = %hello.firmware, boot_id = env.boot_id, "Device connected");
                    }
                    self.dedup.check(env.boot_id, env.seq);
                    self.peer = Some(env.boot_id);
                    self.stalled = false;
                    self.unreliable(fp::Body::HelloAck(fp::HelloAck { hub_time_ms: now_ms }), &mut out);
                    self.request_redraw(&mut out);
                }
            }
            return out;
        }
        let Some(peer) = self.peer else {
            self.refused_frames += 1;
            tracing::debug!(device_id = %id, message = env.body.name(), "Message before HELLO ignored");
            return out;
        };
        if env.boot_id != peer {
            self.refused_frames += 1;
            tracing::warn!(device_id = %id, error_code = "DEVICE_NO_HELLO", "Message from a new boot without HELLO ignored");
            return out;
        }
        if self.stalled {
            self.stalled = false;
            tracing::info!(device_id = %id, "Device acknowledging again");
            self.request_redraw(&mut out);
        }
        if let fp::Body::Ack(ack) = env.body {
            self.outbox.ack(ack.of_seq);
            self.fill_window(now_ms, &mut out);
            return out;
        }
        if env.body.needs_ack() {
            self.unreliable(fp::Body::Ack(fp::Ack { of_seq: env.seq }), &mut out);
        }
        match self.dedup.check(env.boot_id, env.seq) {
            Seen::Duplicate | Seen::Stale => return out,
            Seen::New | Seen::NewBoot => {}
        }
        if let fp::Body::Weight(_) = env.body {
            if self.last_weight_seq.is_some_and(|last| env.seq < last) {
                return out;
            }
            self.last_weight_seq = Some(env.seq);
        }
        if let Some(input) = self.lane_input_of(env.body, now_ms) {
            out.push(Action::Lane(input));
        }
        out
    }

    fn lane_input_of(&mut self, body: fp::Body, now_ms: u64) -> Option<LaneInput> {
        match (self.settings.kind, body) {
            (SerialKind::Scanner, fp::Body::Scan(scan)) => {
                if self.doubles.accept(&scan.data, now_ms) {
                    Some(LaneInput::Scan { data: scan.data.to_vec() })
                } else {
                    tracing::debug!(device_id = %self.settings.device_id, "Double read suppressed");
                    None
                }
            }
            (SerialKind::Scale, fp::Body::Weight(w)) => Some(LaneInput::Weight(WeightReading {
                grams: w.grams,
                stable: w.stable,
                under_zero: w.under_zero,
                over_capacity: w.over_capacity,
            })),
            (SerialKind::Lane, fp::Body::LaneInput(i)) => Some(match i {
                fp::LaneInput::StartBasket => LaneInput::StartBasket,
                fp::LaneInput::SetQuantity { line, quantity } => LaneInput::SetQuantity { line, quantity },
                fp::LaneInput::VoidLine { line } => LaneInput::VoidLine { line },
                fp::LaneInput::Tender(fp::TenderKind::Cash) => LaneInput::Tender(Tender::Cash),
                fp::LaneInput::Tender(fp::TenderKind::Card) => LaneInput::Tender(Tender::Card),
                fp::LaneInput::VoidBasket => LaneInput::VoidBasket,
            }),
            (_, fp::Body::Heartbeat(_)) => None,
            (kind, other) => {
                self.refused_frames += 1;
                tracing::warn!(device_id = %self.settings.device_id, message = other.name(), kind = ?kind, error_code = "UNEXPECTED_MESSAGE",
                    "Message not expected from this kind of device; ignored");
                None
            }
        }
    }

    /// Asks the lane to redraw the display, unless a redraw is already on its way.
    fn request_redraw(&mut self, out: &mut Vec<Action>) {
        if self.settings.kind == SerialKind::Lane && !self.redraw_requested {
            self.redraw_requested = true;
            out.push(Action::Lane(LaneInput::DisplayReconnected));
        }
    }

    /// Queues a lane display update for the device.
    pub fn on_display(&mut self, display: Display, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if display == Display::Cleared {
            self.redraw_requested = false; // a redraw (or a new basket) starts from a clear screen
        }
        if !self.is_ready() || self.stalled {
            return out; // redrawn in full once the device is heard from
        }
        if self.pending.len() >= PENDING_MAX {
            self.pending.clear();
            tracing::warn!(device_id = %self.settings.device_id, error_code = "DISPLAY_BEHIND", "Lane display fell behind; redrawing it");
            self.request_redraw(&mut out);
            return out;
        }
        self.pending.push_back(fp::Body::LaneDisplay(to_wire(display)));
        self.fill_window(now_ms, &mut out);
        out
    }

    fn fill_window(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        while let Some(body) = self.pending.pop_front() {
            match self.outbox.send(body.clone(), now_ms) {
                Ok(seq) => {
                    if let Some(env) = self.envelope(body, seq) {
                        out.push(Action::Send(Box::new(env)));
                    }
                }
                Err(_) => {
                    self.pending.push_front(body);
                    break;
                }
            }
        }
    }

    /// Re-sends what is overdue; a device that stops acking is considered gone.
    pub fn poll(&mut self, now_ms: u64) -> Vec<Action> {
        let mut due = Vec::new();
        self.outbox.poll(now_ms, |d| due.push(d));
        let mut out = Vec::new();
        for d in due {
            match d {
                Due::Resend { seq, item, .. } => {
                    if let Some(env) = self.envelope(item, seq) {
                        out.push(Action::Send(Box::new(env)));
                    }
                }
                Due::GaveUp { seq, .. } => {
                    tracing::warn!(device_id = %self.settings.device_id, seq, error_code = "DEVICE_NO_ACK",
                        "Device stopped acknowledging; its display is redrawn when it is heard from again");
                    // Start a new hub-side session (fresh sequence numbers under a new boot id)
                    // but keep listening: its inputs still count, and they prove it is back.
                    self.hub_boot = self.hub_boot.wrapping_add(1);
                    self.outbox = Outbox::new(RETRY_AFTER_MS, MAX_ATTEMPTS);
                    self.pending.clear();
                    self.stalled = true;
                    return out;
                }
            }
        }
        out
    }
}

fn to_wire(display: Display) -> fp::LaneDisplay {
    match display {
        Display::Line { line, text, quantity, amount } => fp::LaneDisplay::Line {
            line,
            text: fp::truncated_str(&text),
            quantity: quantity.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32,
            amount_minor: amount.minor,
        },
        Display::LineVoided { line } => fp::LaneDisplay::LineVoided { line },
        Display::Total { amount, items } => fp::LaneDisplay::Total {
            amount_minor: amount.minor,
            items,
            currency: fp::truncated_str(amount.currency.code()),
        },
        Display::Message { code, text } => fp::LaneDisplay::Message {
            code: match code {
                MessageCode::UnknownProduct => fp::LaneMessageCode::UnknownProduct,
                MessageCode::InvalidBarcode => fp::LaneMessageCode::InvalidBarcode,
                MessageCode::Discontinued => fp::LaneMessageCode::Discontinued,
                MessageCode::WaitForStableWeight => fp::LaneMessageCode::WaitForStableWeight,
                MessageCode::ScaleError => fp::LaneMessageCode::ScaleError,
                MessageCode::Info => fp::LaneMessageCode::Info,
                MessageCode::Error => fp::LaneMessageCode::Error,
            },
            text: fp::truncated_str(&text),
        },
        Display::Receipt { receipt_id, total } => {
            fp::LaneDisplay::Receipt { receipt_id: fp::truncated_str(&receipt_id), total_minor: total.minor }
        }
        Display::Cleared => fp::LaneDisplay::Cleared,
    }
}

/// Runs a framed device's session over its serial link until `stop`.
pub async fn run(
    mut link: SerialLink,
    settings: FramedSettings,
    lane: mpsc::Sender<LaneInput>,
    mut display: Option<mpsc::Receiver<Display>>,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let now_ms = || started.elapsed().as_millis() as u64;
    let id = settings.device_id.clone();
    let mut session = Session::new(settings, rand::random());
    let mut acc = fp::Accumulator::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(RETRY_AFTER_MS / 3));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let actions = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => session.poll(now_ms()),
            d = async { match display.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => match d {
                Some(d) => session.on_display(d, now_ms()),
                None => { display = None; Vec::new() }
            },
            ev = link.events.recv() => match ev {
                None => return,
                Some(LinkEvent::Connected) | Some(LinkEvent::Disconnected { .. }) => {
                    session.reset(rand::random());
                    acc = fp::Accumulator::new();
                    Vec::new()
                }
                Some(LinkEvent::Bytes(bytes)) => {
                    let mut decoded = Vec::new();
                    acc.feed(&bytes, |r| decoded.push(r));
                    let mut actions = Vec::new();
                    for r in decoded {
                        match r {
                            Ok(env) => actions.extend(session.on_envelope(env, now_ms())),
                            Err(e) => {
                                session.refused_frames += 1;
                                tracing::warn!(device_id = %id, error = %e, error_code = "FRAME_REFUSED", "Bad frame from device discarded");
                            }
                        }
                    }
                    actions
                }
            },
        };
        for action in actions {
            match action {
                Action::Send(env) => match fp::frame::encode_vec(&env) {
                    Ok(bytes) => {
                        if link.writes.send(bytes).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::error!(device_id = %id, error = %e, error_code = "DEVICE_ENCODE", "Cannot encode a frame for the device")
                    }
                },
                Action::Lane(input) => {
                    if lane.send(input).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(kind: SerialKind) -> Session {
        Session::new(FramedSettings { device_id: DeviceId::new("dev-1").unwrap(), kind, double_read_window_ms: 300 }, 7)
    }

    fn env(boot: u32, seq: u32, body: fp::Body) -> fp::Envelope {
        fp::Envelope::new("dev-1", boot, seq, body).unwrap()
    }

    fn hello(kind: fp::DeviceKind) -> fp::Body {
        fp::Body::Hello(fp::Hello::new(kind, "fw-2.1").unwrap())
    }

    fn sent(actions: &[Action]) -> Vec<fp::Body> {
        actions.iter().filter_map(|a| if let Action::Send(e) = a { Some(e.body.clone()) } else { None }).collect()
    }

    fn lane_inputs(actions: &[Action]) -> Vec<LaneInput> {
        actions.iter().filter_map(|a| if let Action::Lane(i) = a { Some(i.clone()) } else { None }).collect()
    }

    fn weight(grams: i32) -> fp::Body {
        fp::Body::Weight(fp::Weight { grams, stable: true, under_zero: false, over_capacity: false })
    }

    #[test]
    fn incompatible_firmware_is_refused_saying_why() {
        let mut s = session(SerialKind::Scale);
        let mut old = fp::Hello::new(fp::DeviceKind::Scale, "fw-0.9").unwrap();
        old.schema_hash ^= 1;
        let out = s.on_envelope(env(1, 1, fp::Body::Hello(old)), 0);
        assert!(matches!(
            &sent(&out)[..],
            [fp::Body::HelloRefused(fp::HelloRefused { reason: fp::RefuseReason::Schema { .. } })]
        ));
        let mut newer = fp::Hello::new(fp::DeviceKind::Scale, "fw-9").unwrap();
        newer.protocol_version = 9;
        let out = s.on_envelope(env(1, 2, fp::Body::Hello(newer)), 0);
        assert!(matches!(
            &sent(&out)[..],
            [fp::Body::HelloRefused(fp::HelloRefused { reason: fp::RefuseReason::ProtocolVersion { theirs: 9, .. } })]
        ));
        // A scanner on the scale's port is refused too, and nothing it says is used.
        let out = s.on_envelope(env(1, 3, hello(fp::DeviceKind::Scanner)), 0);
        assert!(matches!(&sent(&out)[..], [fp::Body::HelloRefused(_)]));
        assert!(s.on_envelope(env(1, 4, weight(100)), 0).is_empty(), "nothing before an accepted HELLO");
        assert!(!s.is_ready());
    }

    #[test]
    fn a_resend_after_a_reopened_link_is_still_a_duplicate() {
        let mut s = session(SerialKind::Scanner);
        s.on_envelope(env(1, 1, hello(fp::DeviceKind::Scanner)), 0);
        let scan = fp::Body::Scan(fp::Scan::new("", b"96385074").unwrap());
        assert_eq!(lane_inputs(&s.on_envelope(env(1, 2, scan.clone()), 0)).len(), 1);
        // The ack is lost as the cable is pulled; the device (same boot) says HELLO again and
        // re-sends the scan.
        s.reset(99);
        s.on_envelope(env(1, 3, hello(fp::DeviceKind::Scanner)), 2_000);
        let resent = s.on_envelope(env(1, 2, scan), 2_000);
        assert_eq!(sent(&resent), vec![fp::Body::Ack(fp::Ack { of_seq: 2 })]);
        assert!(lane_inputs(&resent).is_empty(), "sold once");
    }

    #[test]
    fn duplicates_are_acked_again_but_applied_once_and_old_weights_lose() {
        let mut s = session(SerialKind::Scale);
        let out = s.on_envelope(env(1, 1, hello(fp::DeviceKind::Scale)), 0);
        assert!(matches!(&sent(&out)[..], [fp::Body::HelloAck(_)]));
        let first = s.on_envelope(env(1, 2, weight(500)), 0);
        assert_eq!(sent(&first), vec![fp::Body::Ack(fp::Ack { of_seq: 2 })]);
        assert_eq!(lane_inputs(&first).len(), 1);
        let dup = s.on_envelope(env(1, 2, weight(500)), 0);
        assert_eq!(sent(&dup), vec![fp::Body::Ack(fp::Ack { of_seq: 2 })], "acked again");
        assert!(lane_inputs(&dup).is_empty(), "but not applied twice");
        assert_eq!(lane_inputs(&s.on_envelope(env(1, 4, weight(800)), 0)).len(), 1);
        // Seq 3 was resent and arrives after seq 4: an older reading, not applied.
        let late = s.on_envelope(env(1, 3, weight(650)), 0);
        assert_eq!(sent(&late), vec![fp::Body::Ack(fp::Ack { of_seq: 3 })]);
        assert!(lane_inputs(&late).is_empty());
    }

    #[test]
    fn display_updates_are_resent_until_acked_and_a_stalled_display_is_redrawn_when_heard_from() {
        let mut s = session(SerialKind::Lane);
        let out = s.on_envelope(env(1, 1, hello(fp::DeviceKind::Lane)), 0);
        assert_eq!(lane_inputs(&out), vec![LaneInput::DisplayReconnected], "a (re)connected display is redrawn");
        let out = s.on_display(Display::Cleared, 0);
        let seq = match &out[..] {
            [Action::Send(e)] => e.seq,
            other => panic!("{other:?}"),
        };
        assert!(s.poll(100).is_empty());
        assert!(matches!(&s.poll(RETRY_AFTER_MS + 1)[..], [Action::Send(e)] if e.seq == seq), "resent");
        assert!(s.on_envelope(env(1, 2, fp::Body::Ack(fp::Ack { of_seq: seq })), 400).is_empty());
        assert!(s.poll(10_000).is_empty(), "acked: not resent");
        s.on_display(Display::Cleared, 10_000);
        let mut now = 10_000;
        for _ in 0..MAX_ATTEMPTS {
            now += RETRY_AFTER_MS + 1;
            s.poll(now);
        }
        assert!(s.on_display(Display::Cleared, now).is_empty(), "nothing is sent to a device that stopped acking");
        // Its customer still presses pay: the input counts, and the display is redrawn.
        let out = s.on_envelope(env(1, 3, fp::Body::LaneInput(fp::LaneInput::Tender(fp::TenderKind::Card))), now);
        assert_eq!(lane_inputs(&out), vec![LaneInput::DisplayReconnected, LaneInput::Tender(Tender::Card)]);
    }
}
