//! The daemon's life: open the ledger, start the writer and the device and lane tasks, wait for
//! SIGTERM or SIGINT, then shut down in order (stop the device tasks, drain the writer, close
//! SQLite) within a deadline. A second
//! signal during shutdown forces an immediate exit. Under systemd it says READY, STOPPING and
//! pings the watchdog (`crate::notify`); SIGHUP re-reads the config file's `[log] level`.

use std::path::{Path, PathBuf};
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
    #[error("another edge-agent is already running on {0} (see `storectl status`); refusing to start a second one")]
    AlreadyRunning(PathBuf),
    #[error(transparent)]
    Control(crate::control::ControlError),
    #[error("metrics address {0}: {1}")]
    Metrics(std::net::SocketAddr, std::io::Error),
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
    opts.online = config.online.clone();
    opts
}

/// Runs until a signal; returns after a clean shutdown. `config_path` is where `config` was
/// read from: SIGHUP reads it again for the log level.
pub async fn run(config: Config, config_path: PathBuf) -> Result<(), DaemonError> {
    run_until(config, config_path, std::future::pending()).await
}

/// Like [`run`] (same signals, same shutdown), and also shuts down cleanly when `stop_when`
/// completes: for a store run inside another program, such as the demo (`e2e-tests`).
pub async fn run_until(
    config: Config,
    config_path: PathBuf,
    stop_when: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    let mut stop_when = std::pin::pin!(stop_when);
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    // Installed first, so `systemctl reload` during startup cannot kill the daemon.
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    // SIGUSR1: sync with the cloud now (`storectl sync now` does the same over the socket).
    // Installed before start-up so an early one does not kill the daemon (its default action).
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(DaemonError::Signals)?;

    // One daemon per data folder: a second one (a technician running it by hand next to the
    // service) would fight the first over the ledger's head and take its control socket.
    let _lock = lock_data_dir(&config.ledger.data_dir)?;
    let opts = ledger_options(&config);
    let ledger = Ledger::open(&config.ledger.data_dir, &opts)?;
    let (handle, writer) = ledger.start_writer(opts.queue_capacity)?;
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let deadline = config.labels.as_ref().map_or(0, |l| l.increase_deadline_ms);
    let till = std::sync::Arc::new(std::sync::Mutex::new(crate::labels::sequencing::TillPrices::new(deadline)));
    let presence = crate::mqtt::presence(&config);
    // The label task refreshes it; `storectl labels mismatch` reads it.
    let mismatches = crate::labels::runtime::Mismatches::default();
    let started = crate::devices::wiring::start(&config, &handle, &till, &presence, &tasks, &stop)
        .map_err(DaemonError::from)
        .and_then(|()| {
            crate::mqtt::start(&config, &handle, &till, &presence, &mismatches, &tasks, &stop)
                .map_err(DaemonError::Mqtt)
        })
        .and_then(|mqtt| match &config.cloud {
            Some(cloud) => crate::sync::start(cloud, &config.store.id, &config.ledger.data_dir, &handle, &tasks, &stop)
                .map(|sync| (mqtt, Some(sync)))
                .map_err(DaemonError::Sync),
            None => Ok((mqtt, None)),
        })
        .and_then(|(mqtt, sync)| {
            let control = crate::control::Control {
                store: config.store.id.clone(),
                currency: config.store.currency,
                data_dir: config.ledger.data_dir.clone(),
                ledger: handle.clone(),
                sync: sync.clone(),
                mismatches: config.labels.as_ref().map(|_| mismatches.clone()),
                mqtt,
                started_ms: crate::labels::runtime::wall_ms(),
            };
            if let Some(m) = &config.metrics {
                crate::metrics::start(control.clone(), m.listen, &tasks, &stop)
                    .map_err(|e| DaemonError::Metrics(m.listen, e))?;
            }
            crate::control::start(control, &config.control_socket(), config.control.group.as_deref(), &tasks, &stop)
                .map_err(DaemonError::Control)?;
            Ok(sync)
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

    shared::notify::ready(&format!(
        "Serving store {}: {} lanes, {} serial devices, MQTT {}, cloud {}",
        config.store.id,
        config.lanes.len(),
        config.serial.len(),
        if config.mqtt.is_some() { "on" } else { "off" },
        config.cloud.as_ref().map(|c| c.url.as_str()).unwrap_or("none"),
    ));
    let mut watchdog = shared::notify::Watchdog::from_env();
    let mut writer_lost = false;
    let stopping = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            () = &mut stop_when => break "a stop request",
            _ = usr1.recv() => {
                tracing::debug!(signal = "SIGUSR1", "Signal received");
                match &sync_control {
                    Some(control) => control.now.notify_one(),
                    None => tracing::info!("SIGUSR1 asks for a cloud sync, but no [cloud] section is configured"),
                }
            }
            _ = hup.recv() => {
                tracing::debug!(signal = "SIGHUP", "Signal received");
                reload_log_level(&config_path);
            }
            () = watchdog.due() => ping_watchdog(&writer, &mut writer_lost),
        }
    };
    shared::notify::stopping(&format!("Shutting down on {stopping}: draining the ledger writer"));
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

/// One systemd watchdog ping, unless the ledger writer thread has ended: without it nothing
/// can be sold or recorded, so the pings stop and systemd restarts the daemon.
fn ping_watchdog(writer: &crate::ledger::WriterThread, writer_lost: &mut bool) {
    if !writer.is_finished() {
        shared::notify::watchdog_ping();
    } else if !std::mem::replace(writer_lost, true) {
        tracing::error!(
            error_code = "LEDGER_WRITER_GONE",
            "The ledger writer thread has ended; withholding watchdog pings so systemd restarts the daemon"
        );
    }
}

/// SIGHUP: re-reads the config file and applies its `[log] level`. A file that does not load is
/// logged, naming the key as `check-config` does, and the level stays as it was. Other settings
/// take effect at the next start.
fn reload_log_level(path: &Path) {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(
                error = %e,
                error_code = "CONFIG_RELOAD",
                "Reload refused: the configuration file is invalid; the log level is unchanged"
            );
            return;
        }
    };
    let level = config.log.level;
    match crate::telemetry::set_level(&level) {
        // At warn when the new level hides info lines, so a reload is not silent (unless the
        // new filter hides this module's warnings too, e.g. `error` or another target only).
        Ok(()) if tracing::enabled!(tracing::Level::INFO) => {
            tracing::info!(log_filter = %level, "Log level now {level} (other settings apply at the next start)");
        }
        Ok(()) => tracing::warn!(log_filter = %level, "Log level now {level} (other settings apply at the next start)"),
        Err(e) => tracing::warn!(error = %e, log_filter = %level, error_code = "LOG_RELOAD", "Log level unchanged"),
    }
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

/// Takes an exclusive lock on `data_dir/edge-agent.lock` for the life of the returned file
/// (the kernel drops it when the process ends, however it ends).
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, DaemonError> {
    use std::os::fd::AsRawFd;
    let cannot = |source| DaemonError::Ledger(LedgerError::CannotOpen { path: data_dir.to_owned(), source });
    std::fs::create_dir_all(data_dir).map_err(cannot)?;
    let path = data_dir.join("edge-agent.lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(cannot)?;
    // SAFETY: flock on a file descriptor we own for as long as `file` lives.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        return Err(if err.kind() == std::io::ErrorKind::WouldBlock {
            DaemonError::AlreadyRunning(data_dir.to_owned())
        } else {
            cannot(err)
        });
    }
    Ok(file)
}
