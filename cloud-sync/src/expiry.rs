//! Online orders not picked up by their `expires_at` are cancelled by the cloud, with the reason
//! `expired` kept beside them (the replicated state only learns `cancelled`, and the store gives
//! the units back to its free stock). A task in `serve` sweeps on an interval; each order is
//! cancelled in its own transaction under its store's partition lock, so several service
//! processes sweeping at once cancel each order once (and count and log it once: only the
//! cancellation that changed it says so), and an order handed over meanwhile is left alone. A
//! sweep stops between orders when the service shuts down: what is left is due at the next.

use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::storage::{CancelOutcome, CancelReason, Storage, StorageError};

/// Orders looked at per storage read; a sweep reads again while a batch comes back full.
pub const SWEEP_BATCH: u32 = 500;

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Orders cancelled as expired.
    pub expired: usize,
    /// Orders found handed over (or cancelled) by the time their turn came: left as they are.
    pub skipped: usize,
}

/// Cancels every order due at `now_ms`, oldest expiry first, until `stop` is cancelled (checked
/// between orders, so a shutdown waits for one transaction at most).
pub async fn sweep<S: Storage>(storage: &S, now_ms: u64, stop: &CancellationToken) -> Result<Sweep, StorageError> {
    let mut done = Sweep::default();
    loop {
        let due = storage.due_orders(now_ms, SWEEP_BATCH).await?;
        let before = done.expired;
        for order in &due {
            if stop.is_cancelled() {
                return Ok(done);
            }
            match storage.cancel_order(order, CancelReason::Expired, now_ms).await? {
                CancelOutcome::Cancelled { record, changed: true } => {
                    tracing::info!(order_id = %order, store_id = %record.header.store, "Online order expired: not picked up in time");
                    done.expired += 1;
                }
                // Cancelled by HQ or by another sweeper since it was read as due.
                CancelOutcome::Cancelled { changed: false, .. } | CancelOutcome::NotFound => done.skipped += 1,
                CancelOutcome::AlreadyFulfilled { record, .. } => {
                    tracing::info!(order_id = %order, store_id = %record.header.store, "Expired order was handed over: left as it is");
                    done.skipped += 1;
                }
            }
        }
        // A full batch may hide more; one that expired nothing would only be read again.
        if due.len() < SWEEP_BATCH as usize || done.expired == before {
            return Ok(done);
        }
    }
}

/// Sweeps every `every` until `stop` is cancelled. A failed sweep is logged and retried at the
/// next tick (the database may be back by then).
pub async fn run<S: Storage>(storage: S, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match sweep(&storage, crate::http::now_ms(), &stop).await {
            Ok(s) if s.expired > 0 => tracing::info!(expired = s.expired, "Expired online orders cancelled"),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, error_code = "ORDER_EXPIRY", "Cannot expire online orders; retrying at the next sweep")
            }
        }
    }
}
