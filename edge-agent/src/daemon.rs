//! The daemon's life: open the ledger, start the writer and the device and lane tasks, wait for
//! SIGTERM or SIGINT, then shut down in order (stop the device tasks, drain the writer, close
//! SQLite) within a deadline. A second
//! signal during shutdown forces an immediate exit.

use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::ledger::{Ledger, LedgerError, LedgerHandle, LedgerOptions};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Mqtt(crate::mqtt::broker::BrokerError),
    #[error("cloud sync: {0}")]
    Sync(String),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("the ledger writer did not drain within {0:?}; exiting anyway (SQLite's WAL keeps committed data)")]
    ShutdownTimeout(Duration),
}

pub fn ledger_options(config: &Config) -> LedgerOptions {
    let mut opts = LedgerOptions::new(config.store.id.clone(), config.store.currency);
    opts.max_skew_ms = config.clock.max_skew_ms;
    opts.jump_warn_ms = config.clock.jump_warn_ms;
    opts.batch_max = config.ledger.batch_max;
    opts.queue_capacity = config.ledger.queue_capacity;
    opts
}

/// Runs until a signal; returns after a clean shutdown.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;

    let opts = ledger_options(&config);
    let ledger = Ledger::open(&config.ledger.data_dir, &opts)?;
    let (handle, writer) = ledger.start_writer(opts.queue_capacity)?;
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let deadline = config.labels.as_ref().map_or(0, |l| l.increase_deadline_ms);
    let till = std::sync::Arc::new(std::sync::Mutex::new(crate::labels::sequencing::TillPrices::new(deadline)));
    let presence = crate::mqtt::presence(&config);
    let started = crate::devices::wiring::start(&config, &handle, &till, &presence, &tasks, &stop)
        .map_err(DaemonError::from)
        .and_then(|()| {
            // Read by `storectl labels mismatch` once the control socket exists (issue 6).
            let mismatches = crate::labels::runtime::Mismatches::default();
            crate::mqtt::start(&config, &handle, &till, &presence, &mismatches, &tasks, &stop)
                .map_err(DaemonError::Mqtt)
        })
        .and_then(|_mqtt_started| match &config.cloud {
            Some(cloud) => crate::sync::start(cloud, &config.store.id, &config.ledger.data_dir, &handle, &tasks, &stop)
                .map(Some)
                .map_err(DaemonError::Sync),
            None => Ok(None),
        });
    let sync_control = match started {
        Ok(control) => control,
        Err(e) => {
            stop.cancel();
            tasks.close();
            tasks.wait().await;
            drop(handle);
            writer.join();
            return Err(e);
        }
    };
    tracing::info!(
        store_id = %config.store.id,
        data_dir = %config.ledger.data_dir.display(),
        lanes = config.lanes.len(),
        serial_devices = config.serial.len(),
        mqtt = config.mqtt.is_some(),
        cloud = config.cloud.as_ref().map(|c| c.url.as_str()).unwrap_or("none"),
        "edge-agent ready"
    );

    // SIGUSR1: sync with the cloud now (until `storectl sync now` has the control socket).
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(DaemonError::Signals)?;
    let stopping = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = usr1.recv() => match &sync_control {
                Some(control) => control.now.notify_one(),
                None => tracing::info!("SIGUSR1 asks for a cloud sync, but no [cloud] section is configured"),
            },
        }
    };
    tracing::info!(
        signal = stopping,
        "Shutting down: draining the ledger writer (send the signal again to force exit)"
    );
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("Second signal: exiting now without waiting for the ledger writer");
        std::process::exit(130);
    });

    // Stop intake: device and lane tasks end (a lane mid-commit finishes its ledger call).
    stop.cancel();
    tasks.close();
    let deadline = Duration::from_millis(config.ledger.shutdown_timeout_ms);
    if tokio::time::timeout(deadline, tasks.wait()).await.is_err() {
        tracing::warn!(still_running = tasks.len(), "Device tasks did not stop in time; draining the ledger anyway");
    }
    shutdown(handle, writer, deadline).await
}

/// Stops intake by dropping the daemon's handle, then waits for the writer to finish the
/// queued commands and close SQLite.
async fn shutdown(
    handle: LedgerHandle,
    writer: crate::ledger::WriterThread,
    deadline: Duration,
) -> Result<(), DaemonError> {
    drop(handle);
    let join = tokio::task::spawn_blocking(move || writer.join());
    match tokio::time::timeout(deadline, join).await {
        Ok(_) => {
            tracing::info!("edge-agent stopped cleanly");
            Ok(())
        }
        Err(_) => Err(DaemonError::ShutdownTimeout(deadline)),
    }
}
