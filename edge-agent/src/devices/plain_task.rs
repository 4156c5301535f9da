//! Drives a plain-mode scanner: bytes from its serial link through the [`PlainScanner`]
//! parser and the double-read filter to the lane, with ACK/NAK answers for scanners that want
//! them. One line in the log per state change (connected, lost), not per read.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::plain_scanner::{DoubleReadFilter, PlainConfig, PlainEvent, PlainScanner, ACK, NAK};
use super::serial::{LinkEvent, SerialLink};
use crate::lane::LaneInput;

#[derive(Debug, Clone)]
pub struct PlainScannerSettings {
    pub device_id: String,
    pub parser: PlainConfig,
    pub ack_nak: bool,
    pub double_read_window_ms: u64,
}

pub async fn run(
    mut link: SerialLink,
    settings: PlainScannerSettings,
    lane: mpsc::Sender<LaneInput>,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let now_ms = || started.elapsed().as_millis() as u64;
    let mut parser = PlainScanner::new(settings.parser);
    let mut doubles = DoubleReadFilter::new(settings.double_read_window_ms);
    let mut events = Vec::new();
    loop {
        let deadline = parser.pending_deadline().map(|ms| started + Duration::from_millis(ms));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()).await }, if deadline.is_some() => {
                parser.poll(now_ms(), &mut events);
            }
            ev = link.events.recv() => match ev {
                None => return,
                Some(LinkEvent::Bytes(bytes)) => parser.feed(&bytes, now_ms(), &mut events),
                Some(LinkEvent::Connected | LinkEvent::Disconnected { .. }) => {}
            },
        }
        for event in events.drain(..) {
            let reply = match event {
                PlainEvent::Code(code) => {
                    if doubles.accept(&code.data, now_ms()) {
                        if lane.send(LaneInput::Scan { data: code.data }).await.is_err() {
                            return;
                        }
                    } else {
                        tracing::debug!(device_id = %settings.device_id, "Double read suppressed");
                    }
                    ACK
                }
                PlainEvent::Garbled { reason, bytes } => {
                    tracing::warn!(device_id = %settings.device_id, reason, bytes, error_code = "SCAN_GARBLED", "Unreadable scanner input discarded");
                    NAK
                }
            };
            if settings.ack_nak {
                let _ = link.writes.send(vec![reply]).await;
            }
        }
    }
}
