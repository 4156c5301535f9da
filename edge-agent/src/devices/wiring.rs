//! Starts the tasks of every configured lane and serial device: one task per lane (owning its
//! state machine and its read-only ledger connection), one per serial port (owning the port),
//! one per device protocol session. All run on the daemon's task tracker under its stop token.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::plain_scanner::PlainConfig;
use super::serial::{self, SerialSettings};
use super::{framed, plain_task};
use crate::config::{Config, SerialKind, SerialMode};
use crate::labels::sequencing::TillPrices;
use crate::lane::runtime::{LaneTask, DISPLAY_QUEUE, LANE_QUEUE};
use crate::ledger::{LedgerError, LedgerHandle, LedgerReader};
use crate::rfid::presence::Presence;

pub fn start(
    config: &Config,
    ledger: &LedgerHandle,
    till: &Arc<Mutex<TillPrices>>,
    presence: &Arc<Mutex<Presence>>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<(), LedgerError> {
    for lane_cfg in &config.lanes {
        let reader = LedgerReader::open(&config.ledger.data_dir)?;
        let (lane_tx, lane_rx) = mpsc::channel(LANE_QUEUE);
        let (display_tx, display_rx) = mpsc::channel(DISPLAY_QUEUE);
        let lane = LaneTask::new(
            lane_cfg.id.clone(),
            config.store.id.clone(),
            config.store.currency,
            reader,
            ledger.clone(),
            display_tx,
        )
        .with_till(till.clone())
        .with_policy(config.lane.charge)
        .with_rfid(presence.clone(), crate::config::parse_zones(&lane_cfg.rfid_zones).unwrap_or_default());
        // Every journal line of a lane or device carries STORE_ID, LANE_ID (and DEVICE_ID,
        // DEVICE_KIND) from its task's span, so a technician can filter by any of them.
        let lane_span = tracing::info_span!("lane", store_id = %config.store.id, lane_id = %lane_cfg.id);
        tasks.spawn(lane.run(lane_rx, stop.child_token()).instrument(lane_span));
        let mut display_rx = Some(display_rx);
        for dev in config.serial.iter().filter(|d| d.lane == lane_cfg.id) {
            let span = tracing::info_span!(
                "device",
                store_id = %config.store.id,
                lane_id = %lane_cfg.id,
                device_id = %dev.id,
                device_kind = dev.kind.as_str()
            );
            let _in_device = span.enter();
            let link = serial::spawn(
                SerialSettings {
                    device_id: dev.id.to_string(),
                    path: dev.path.clone(),
                    baud: dev.baud,
                    backoff_min: Duration::from_millis(250),
                    backoff_max: Duration::from_secs(10),
                },
                tasks,
                stop.child_token(),
            );
            match (dev.kind, dev.mode) {
                (SerialKind::Scanner, SerialMode::Plain) => {
                    let settings = plain_task::PlainScannerSettings {
                        device_id: dev.id.to_string(),
                        parser: PlainConfig { suffix: dev.suffix, gap_ms: dev.gap_ms },
                        ack_nak: dev.ack_nak,
                        double_read_window_ms: lane_cfg.double_read_window_ms,
                    };
                    tasks.spawn(plain_task::run(link, settings, lane_tx.clone(), stop.child_token()).in_current_span());
                }
                (kind, _) => {
                    let display = if kind == SerialKind::Lane { display_rx.take() } else { None };
                    let session = framed::FramedSettings {
                        device_id: dev.id.clone(),
                        kind,
                        double_read_window_ms: lane_cfg.double_read_window_ms,
                    };
                    tasks.spawn(
                        framed::run(link, session, lane_tx.clone(), display, stop.child_token()).in_current_span(),
                    );
                }
            }
        }
        if let Some(mut rx) = display_rx {
            // A lane without a display device: its updates have nowhere to go.
            let lane_id = lane_cfg.id.clone();
            let stop = stop.child_token();
            tasks.spawn(async move {
                tracing::info!(lane_id = %lane_id, "Lane has no display device configured; display updates are logged at debug level");
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        d = rx.recv() => match d {
                            Some(d) => tracing::debug!(lane_id = %lane_id, update = ?d, "Lane display update"),
                            None => return,
                        },
                    }
                }
            });
        }
    }
    Ok(())
}
