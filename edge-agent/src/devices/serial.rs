//! One task owns one serial port: it opens the configured path (a `/dev/serial/by-id/...`
//! name, so the right device is found whichever USB socket it is in), forwards what it reads,
//! writes what it is given, and when the device goes away (a read of 0 bytes or an error: after
//! a hang-up tokio-serial returns `Ok(0)` forever, so 0 must mean "gone" or the loop spins) it
//! closes the port and retries opening the path with capped exponential backoff and jitter,
//! until the device is plugged back in or the daemon stops.

use std::path::PathBuf;
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_serial::SerialPortBuilderExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bytes read at most per read call; also the largest chunk handed on.
pub const READ_CHUNK: usize = 512;
/// Chunks waiting for the device's parser; when full the link stops reading (backpressure:
/// the OS and the device buffer, nothing is silently dropped here).
pub const EVENT_QUEUE: usize = 256;
/// Writes waiting for the port; senders wait when it is full.
pub const WRITE_QUEUE: usize = 64;

#[derive(Debug, Clone)]
pub struct SerialSettings {
    pub device_id: String,
    pub path: PathBuf,
    pub baud: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    Connected,
    Bytes(Vec<u8>),
    Disconnected { reason: String },
}

/// The ends of a running link: its events, and a way to write to the device.
pub struct SerialLink {
    pub events: mpsc::Receiver<LinkEvent>,
    pub writes: mpsc::Sender<Vec<u8>>,
}

/// Starts the task owning the port on `tasks`; it ends when `stop` is cancelled or the link
/// is dropped.
pub fn spawn(settings: SerialSettings, tasks: &TaskTracker, stop: CancellationToken) -> SerialLink {
    let (event_tx, events) = mpsc::channel(EVENT_QUEUE);
    let (writes, write_rx) = mpsc::channel(WRITE_QUEUE);
    // In the caller's span (the device's, with its ids), so the link's journal lines carry them.
    tasks.spawn(tracing::Instrument::in_current_span(run(settings, event_tx, write_rx, stop)));
    SerialLink { events, writes }
}

/// Next backoff: doubled, capped, with up to 25% random jitter so that many links that lost
/// their devices together do not retry in lockstep.
pub fn next_backoff(current: Duration, min: Duration, max: Duration) -> Duration {
    let doubled = (current * 2).clamp(min, max);
    let jitter = rand::thread_rng().gen_range(0..=doubled.as_millis() as u64 / 4);
    doubled.saturating_sub(Duration::from_millis(jitter)).max(min)
}

async fn run(
    s: SerialSettings,
    events: mpsc::Sender<LinkEvent>,
    mut writes: mpsc::Receiver<Vec<u8>>,
    stop: CancellationToken,
) {
    let mut backoff = s.backoff_min;
    let mut logged_absent = false;
    loop {
        if stop.is_cancelled() || events.is_closed() {
            return;
        }
        let port = tokio_serial::new(s.path.to_string_lossy(), s.baud).open_native_async();
        let mut port = match port {
            Ok(p) => p,
            Err(e) => {
                if !logged_absent {
                    tracing::warn!(device_id = %s.device_id, path = %s.path.display(), error = %e, error_code = "SERIAL_OPEN",
                        "Serial device not available; retrying until it is plugged in");
                    logged_absent = true;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = next_backoff(backoff, s.backoff_min, s.backoff_max);
                continue;
            }
        };
        logged_absent = false;
        backoff = s.backoff_min;
        tracing::info!(device_id = %s.device_id, path = %s.path.display(), "Serial device connected");
        if events.send(LinkEvent::Connected).await.is_err() {
            return;
        }
        let mut buf = vec![0u8; READ_CHUNK];
        let reason = loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                read = port.read(&mut buf) => match read {
                    Ok(0) => break "the device hung up (read returned 0 bytes)".to_owned(),
                    Ok(n) => {
                        if events.send(LinkEvent::Bytes(buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => break format!("read failed: {e}"),
                },
                write = writes.recv() => match write {
                    Some(bytes) => {
                        if let Err(e) = port.write_all(&bytes).await {
                            break format!("write failed: {e}");
                        }
                    }
                    None => return,
                },
            }
        };
        drop(port);
        tracing::warn!(device_id = %s.device_id, path = %s.path.display(), reason = %reason, error_code = "SERIAL_LOST",
            "Serial link lost; retrying");
        if events.send(LinkEvent::Disconnected { reason }).await.is_err() {
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_below() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = min;
        for _ in 0..20 {
            let next = next_backoff(b, min, max);
            assert!(next >= min && next <= max);
            assert!(next >= (b * 2).min(max) * 3 / 4, "{next:?} after {b:?}");
            b = next;
        }
        assert!(b >= max * 3 / 4);
    }
}
