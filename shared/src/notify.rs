//! systemd service notifications (sd_notify(3)) for both daemons, so `Type=notify` and
//! `WatchdogSec=` in `systemd/*.service` mean what they say: READY once the daemon serves,
//! STOPPING when shutdown begins, and watchdog pings from the daemon's main loop. The one part
//! of `shared` that does I/O, compiled only with the `notify` feature. Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing; a failed
//! send is logged, never fatal: the daemon serves the store with or without a supervisor.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

/// Shortest ping interval, however small `WATCHDOG_USEC` is: the loop must not spin.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(1);

/// Set while watchdog pings fail, so a missing socket is logged once, not at every ping.
static PING_FAILING: AtomicBool = AtomicBool::new(false);

/// Tells systemd the daemon is ready, with a one-line status for `systemctl status`.
pub fn ready(status: &str) {
    send("READY=1", &[NotifyState::Ready, NotifyState::Status(&one_line(status))]);
}

/// Tells systemd shutdown has begun (the watchdog no longer applies; `TimeoutStopSec` does).
pub fn stopping(status: &str) {
    send("STOPPING=1", &[NotifyState::Stopping, NotifyState::Status(&one_line(status))]);
}

/// One watchdog ping.
pub fn watchdog_ping() {
    match sd_notify::notify(&[NotifyState::Watchdog]) {
        Ok(()) => {
            if PING_FAILING.swap(false, Ordering::Relaxed) {
                tracing::info!("systemd watchdog pings go through again");
            }
        }
        Err(e) => {
            if !PING_FAILING.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    error = %e,
                    error_code = "SD_NOTIFY",
                    "Cannot ping the systemd watchdog; systemd will restart the service if this lasts"
                );
            }
        }
    }
}

fn send(what: &str, state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(message_sent = what, error = %e, error_code = "SD_NOTIFY", "Cannot notify systemd");
    }
}

/// A status line holds no newline (it would end the notification's field).
fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

/// When to ping: every half of `WATCHDOG_USEC`, when systemd asks this process for pings
/// (`WATCHDOG_PID`, when present, names us). Without it, [`Watchdog::due`] never completes.
pub struct Watchdog {
    interval: Option<tokio::time::Interval>,
}

impl Watchdog {
    /// Reads `WATCHDOG_USEC` and `WATCHDOG_PID`; call inside the runtime.
    pub fn from_env() -> Watchdog {
        let period = ping_period(sd_notify::watchdog_enabled());
        if let Some(every) = period {
            tracing::info!(
                every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
                "Pinging the systemd watchdog"
            );
        }
        let interval = period.map(|every| {
            let mut interval = tokio::time::interval(every);
            // After a stall, ping once and carry on; a burst of late pings proves nothing.
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        });
        Watchdog { interval }
    }

    /// Completes when the next ping is due (at once the first time); never without a watchdog.
    /// Cancel-safe, for `tokio::select!`.
    pub async fn due(&mut self) {
        match &mut self.interval {
            Some(interval) => {
                interval.tick().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// Half the watchdog timeout systemd gave us; none for a timeout of zero (systemd never sends
/// one, but a hand-set variable might).
fn ping_period(timeout: Option<Duration>) -> Option<Duration> {
    timeout.filter(|t| !t.is_zero()).map(|t| (t / 2).max(MIN_PING_INTERVAL))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_at_half_the_timeout_and_never_spin() {
        assert_eq!(ping_period(Some(Duration::from_secs(30))), Some(Duration::from_secs(15)));
        assert_eq!(ping_period(Some(Duration::from_micros(400_000))), Some(Duration::from_millis(200)));
        assert_eq!(ping_period(Some(Duration::from_micros(1))), Some(MIN_PING_INTERVAL));
        assert_eq!(ping_period(Some(Duration::ZERO)), None);
        assert_eq!(ping_period(None), None);
    }

    #[test]
    fn a_status_stays_on_one_line() {
        assert_eq!(one_line("ready\nSTOPPING=1"), "ready STOPPING=1");
    }
}
