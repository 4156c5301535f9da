//! The one-command demo (`cargo run --release -p e2e-tests --bin demo`): a cloud and two stores
//! with simulated labels, lanes and an RFID reader, all real pieces run in one process, play a
//! short scripted day and say in plain words what happens, then print a summary. It exists so a
//! newcomer sees the whole system work in a minute, and so CI proves that it still does.

pub mod cloud;
pub mod report;
pub mod script;
pub mod store;

use std::future::Future;
use std::time::{Duration, Instant};

use shared::{Currency, Money};

/// The demo's currency (the fixture's stores are in euros).
pub fn eur() -> Currency {
    Currency::new("EUR").expect("EUR is a currency")
}

/// `1.29 EUR`.
pub fn money(minor: i64) -> String {
    Money::new(minor, eur()).to_string()
}

/// Prints narration lines with the time since the demo started.
#[derive(Debug, Clone, Copy)]
pub struct Narrator {
    started: Instant,
}

impl Narrator {
    pub fn new() -> Narrator {
        Narrator { started: Instant::now() }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// One line of what happens.
    pub fn say(&self, text: impl AsRef<str>) {
        println!("[{:5.1}s] {}", self.started.elapsed().as_secs_f64(), text.as_ref());
    }

    /// A detail under the last line.
    pub fn detail(&self, text: impl AsRef<str>) {
        println!("         {}", text.as_ref());
    }
}

impl Default for Narrator {
    fn default() -> Self {
        Narrator::new()
    }
}

/// How long one step may wait for its condition before the demo calls it a failure.
pub const STEP_WAIT: Duration = Duration::from_secs(30);

/// Polls `cond` every 100 ms until it holds; an error naming `what` after [`STEP_WAIT`].
/// Returns how long it took.
pub async fn until<F, Fut>(what: &str, mut cond: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if cond().await {
            return Ok(started.elapsed());
        }
        if started.elapsed() > STEP_WAIT {
            anyhow::bail!("timed out after {} s waiting until {what}", STEP_WAIT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
