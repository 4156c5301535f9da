//! The store's side of cloud sync: one task that, on an interval and on demand, pushes the
//! store's unacknowledged changes from the outbox and pulls the cloud's rows by cursor, page by
//! page, until both sides are caught up. Every answer is applied through the ledger writer in
//! one transaction (acknowledged version, cursor and the merged page), so a restart resumes
//! exactly where the last durable answer left off, and nothing local is dropped whatever the
//! cloud does: a change leaves the outbox only when an answer says the cloud holds it.

pub mod client;
pub mod page_size;
pub mod screen;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use shared::sync::{SyncRequest, MAX_PAGE_ROWS};
use shared::{HlcStamp, StoreId};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::CloudSection;
use crate::devices::serial::next_backoff;
use crate::ledger::{LedgerHandle, LedgerReader, MergedPage, SyncAck};
use client::{ExchangeBytes, ExchangeError, SyncClient};
use page_size::PageSize;

/// Most pages one session moves before it yields to the interval (a runaway guard: a day
/// offline at 100k SKUs is a handful of pages).
const MAX_PAGES_PER_SESSION: usize = 10_000;

/// What the sync task reports (for `storectl status` and metrics).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SyncStatus {
    pub last_success_ms: Option<u64>,
    pub last_attempt_ms: Option<u64>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub pushed_rows: u64,
    pub pulled_rows: u64,
    /// Cloud rows this store refused to merge (another store's slot, an invalid price).
    pub refused_rows: u64,
    pub sessions: u64,
    /// Rows per sync page in use: `configured_page_rows`, or fewer for an hour after the cloud
    /// refused pages as too large (its `server.max_body_bytes`).
    pub page_rows: u32,
    pub configured_page_rows: u32,
    /// Pages the cloud refused as too large (413), each sent again in halves.
    pub pages_too_large: u64,
}

pub type SharedStatus = Arc<Mutex<SyncStatus>>;

/// Handles to a running sync task.
#[derive(Clone)]
pub struct SyncControl {
    pub status: SharedStatus,
    /// Notify to sync now instead of at the next interval.
    pub now: Arc<Notify>,
}

/// What one session moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionReport {
    /// Exchanges the cloud answered (pages it refused as too large not counted).
    pub exchanges: usize,
    /// Pages the cloud refused as too large (413), each sent again in halves.
    pub pages_too_large: usize,
    pub pushed_rows: usize,
    pub pulled_rows: usize,
    pub refused_rows: usize,
    pub bytes: ExchangeBytes,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    #[error("ledger: {0}")]
    Ledger(String),
    #[error("the cloud acknowledged nothing of the push ({from}, {to}]; it holds up to {acked}")]
    NoProgress { from: u64, to: u64, acked: u64 },
}

impl SessionError {
    pub fn code(&self) -> &'static str {
        match self {
            SessionError::Exchange(e) => e.code(),
            SessionError::Ledger(_) => "SYNC_LEDGER",
            SessionError::NoProgress { .. } => "SYNC_NO_PROGRESS",
        }
    }
}

/// One sync participant: the HTTP client, the ledger to read from and write through.
pub struct Syncer {
    store: StoreId,
    client: SyncClient,
    reader: Arc<Mutex<LedgerReader>>,
    handle: LedgerHandle,
    /// Rows per page (at most `MAX_PAGE_ROWS`): smaller for a while after the cloud refused a
    /// page as too large, so a store whose changes outgrew the cloud's body limit still syncs.
    page_size: Mutex<PageSize>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Syncer {
    pub fn new(
        store: StoreId,
        client: SyncClient,
        reader: Arc<Mutex<LedgerReader>>,
        handle: LedgerHandle,
        page_rows: u32,
    ) -> Syncer {
        let page_rows = page_rows.clamp(1, MAX_PAGE_ROWS);
        Syncer { store, client, reader, handle, page_size: Mutex::new(PageSize::new(page_rows)) }
    }

    /// Rows per page in use (the configured size, or less after a 413).
    pub fn page_rows(&self) -> u32 {
        self.page_size().current()
    }

    /// Rows per page as configured (`[cloud] page_rows`).
    pub fn configured_page_rows(&self) -> u32 {
        self.page_size().configured()
    }

    fn page_size(&self) -> std::sync::MutexGuard<'_, PageSize> {
        self.page_size.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&LedgerReader) -> Result<T, crate::ledger::LedgerError> + Send + 'static,
    ) -> Result<T, SessionError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let reader = reader.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&reader)
        })
        .await
        .map_err(|e| SessionError::Ledger(e.to_string()))?
        .map_err(|e| SessionError::Ledger(e.to_string()))
    }

    /// Pushes and pulls page by page until the cloud holds every local change read at the
    /// start of each exchange and no cloud rows are left beyond the cursor: it ends after an
    /// exchange that pushed nothing and left nothing to pull, unless merging that answer made
    /// changes to push (an online order's reservation makes the store top its grant up), which
    /// go out in the same session.
    pub async fn session(&self) -> Result<SessionReport, SessionError> {
        let mut report = SessionReport::default();
        let mut quiet = false;
        for _ in 0..MAX_PAGES_PER_SESSION {
            let page_rows = self.page_size().rows(std::time::Instant::now());
            let (position, push, actor) =
                self.read(move |r| Ok((r.sync_position()?, r.push_page(page_rows)?, r.actor()?))).await?;
            if quiet && push.is_none() {
                return Ok(report);
            }
            let request = SyncRequest {
                store: self.store.clone(),
                sent_at: HlcStamp { wall_ms: now_ms(), logical: 0, actor },
                // What HQ sees as this store's lag: versions merged from the cloud are not ours
                // to push, so with nothing pending the store is at what the cloud holds.
                head_version: if push.is_some() { position.head_version } else { position.pushed_version },
                push,
                cursor: position.cursor,
                max_rows: page_rows,
                include_own_slots: !position.bootstrapped,
            };
            let (answer, bytes) = match self.client.exchange(&request).await {
                Ok(answered) => answered,
                Err(ExchangeError::Refused { status: 413, message }) => {
                    // Nothing was applied: the same changes go again, in a page half the size
                    // (kept for an hour; then full pages are tried again). A single row too
                    // large ends the session with the cloud's refusal.
                    let Some(smaller) = self.page_size().refused(page_rows, std::time::Instant::now()) else {
                        return Err(ExchangeError::Refused { status: 413, message }.into());
                    };
                    tracing::warn!(
                        store_id = %self.store,
                        rows = page_rows,
                        retry_rows = smaller,
                        cloud_said = %message,
                        error_code = "SYNC_PAGE_TOO_LARGE",
                        "The cloud refused a sync page as too large; sending smaller pages (raise the cloud's server.max_body_bytes or lower [cloud] page_rows)"
                    );
                    report.pages_too_large += 1;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            report.exchanges += 1;
            report.bytes.sent += bytes.sent;
            report.bytes.received += bytes.received;
            let (rows, refused) = screen::screen(&self.store, answer.rows);
            for reason in &refused {
                tracing::warn!(store_id = %self.store, error_code = "SYNC_ROW_REFUSED", reason = %reason, "Refused a row from the cloud");
            }
            report.pulled_rows += rows.len();
            report.refused_rows += refused.len();
            let page = (!rows.is_empty() || !refused.is_empty()).then_some(MergedPage {
                from: position.cursor,
                rows,
                refused,
            });
            let ack = SyncAck {
                acked_version: answer.acked_version,
                pushed_to: request.push.as_ref().map_or(position.pushed_version, |p| p.to_version),
                cursor: answer.next_cursor,
                cloud_time: answer.cloud_time,
                caught_up: !answer.more,
            };
            self.handle.apply_sync(ack, page).await.map_err(|e| SessionError::Ledger(e.to_string()))?;
            match &request.push {
                Some(p) if answer.acked_version == position.pushed_version => {
                    return Err(SessionError::NoProgress {
                        from: p.from_version,
                        to: p.to_version,
                        acked: answer.acked_version,
                    });
                }
                Some(p) => report.pushed_rows += p.rows.len(),
                None => {}
            }
            quiet = request.push.is_none() && !answer.more;
        }
        Ok(report)
    }
}

/// Starts the sync task when a `[cloud]` section is configured.
pub fn start(
    cloud: &CloudSection,
    store: &StoreId,
    data_dir: &std::path::Path,
    handle: &LedgerHandle,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<SyncControl, String> {
    let token = cloud.read_token()?;
    let client = SyncClient::new(&cloud.url, store, token, Duration::from_millis(cloud.timeout_ms))?;
    let reader = LedgerReader::open(data_dir).map_err(|e| e.to_string())?;
    let syncer = Syncer::new(store.clone(), client, Arc::new(Mutex::new(reader)), handle.clone(), cloud.page_rows);
    let status = SyncStatus {
        page_rows: syncer.page_rows(),
        configured_page_rows: syncer.configured_page_rows(),
        ..SyncStatus::default()
    };
    let control = SyncControl { status: Arc::new(Mutex::new(status)), now: Arc::new(Notify::new()) };
    let timing = Timing {
        interval: Duration::from_millis(cloud.interval_ms),
        backoff_min: Duration::from_millis(cloud.backoff_min_ms),
        backoff_max: Duration::from_millis(cloud.backoff_max_ms),
    };
    tasks.spawn(run(syncer, timing, control.clone(), stop.clone()));
    Ok(control)
}

#[derive(Debug, Clone, Copy)]
struct Timing {
    interval: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
}

async fn run(syncer: Syncer, timing: Timing, control: SyncControl, stop: CancellationToken) {
    tracing::info!(store_id = %syncer.store, endpoint = syncer.client.endpoint(), "Cloud sync started");
    let mut backoff = Duration::ZERO;
    let mut failing_with: Option<&'static str> = None;
    loop {
        let started = now_ms();
        let outcome = tokio::select! {
            outcome = syncer.session() => outcome,
            () = stop.cancelled() => break,
        };
        let wait = {
            let mut status = control.status.lock().unwrap_or_else(|p| p.into_inner());
            status.last_attempt_ms = Some(started);
            status.sessions += 1;
            // After either outcome: a session that ends on a 413 has made pages smaller too.
            status.page_rows = syncer.page_rows();
            status.configured_page_rows = syncer.configured_page_rows();
            match outcome {
                Ok(report) => {
                    status.last_success_ms = Some(now_ms());
                    status.consecutive_failures = 0;
                    status.last_error = None;
                    status.pushed_rows += report.pushed_rows as u64;
                    status.pulled_rows += report.pulled_rows as u64;
                    status.refused_rows += report.refused_rows as u64;
                    status.pages_too_large += report.pages_too_large as u64;
                    if failing_with.take().is_some() {
                        tracing::info!(store_id = %syncer.store, "Cloud sync works again");
                    }
                    if report.pushed_rows + report.pulled_rows > 0 {
                        tracing::info!(
                            store_id = %syncer.store,
                            pushed_rows = report.pushed_rows,
                            pulled_rows = report.pulled_rows,
                            exchanges = report.exchanges,
                            bytes_sent = report.bytes.sent,
                            bytes_received = report.bytes.received,
                            "Synced with the cloud"
                        );
                    }
                    backoff = Duration::ZERO;
                    timing.interval
                }
                Err(e) => {
                    status.consecutive_failures += 1;
                    status.last_error = Some(e.to_string());
                    // One journal line per state change, not one per retry.
                    if failing_with != Some(e.code()) {
                        tracing::warn!(
                            store_id = %syncer.store,
                            error_code = e.code(),
                            error = %e,
                            "Cloud sync failed; local changes stay in the outbox and sync retries with backoff"
                        );
                        failing_with = Some(e.code());
                    }
                    backoff = next_backoff(backoff, timing.backoff_min, timing.backoff_max);
                    backoff
                }
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = control.now.notified() => {}
            () = stop.cancelled() => break,
        }
    }
    // DESIGN 9: one bounded final sync, so the last changes reach the cloud before a planned
    // stop (a reboot for an update); a cloud that does not answer in time leaves them in the
    // outbox for the next start.
    match tokio::time::timeout(FINAL_SYNC, syncer.session()).await {
        Ok(Ok(report)) => tracing::info!(
            store_id = %syncer.store,
            pushed_rows = report.pushed_rows,
            pulled_rows = report.pulled_rows,
            "Final sync before stopping"
        ),
        Ok(Err(e)) => tracing::info!(store_id = %syncer.store, error = %e,
            "Final sync before stopping failed; local changes wait in the outbox for the next start"),
        Err(_) => tracing::info!(store_id = %syncer.store,
            "Final sync before stopping did not finish in time; local changes wait in the outbox for the next start"),
    }
    tracing::info!(store_id = %syncer.store, "Cloud sync stopped");
}

/// How long the final sync at shutdown may take (well inside the shutdown deadline).
const FINAL_SYNC: Duration = Duration::from_secs(3);
