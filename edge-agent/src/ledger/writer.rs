//! The one task that writes the ledger. Callers send commands over a bounded channel; the
//! writer drains whatever is waiting (up to `batch_max`) into one IMMEDIATE transaction, so a
//! whole batch costs one fsync (group commit), and replies to each caller only after the
//! commit returned: an acknowledged command is durable. If the commit fails, every caller of
//! that batch gets the error and nothing of the batch is applied.
//!
//! It runs on a dedicated OS thread because rusqlite is blocking; the channel is tokio's, so
//! async callers await without blocking a runtime worker.
//!
//! Online orders (issue 7) ride on the same transactions: after the batch's events, the writer
//! tops up the online allocation of every SKU the batch moved (the policy's grants are events
//! of their own, in the same transaction), then checks those SKUs for pickup orders their
//! stock no longer covers and, once committed, raises the shortage alert.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rusqlite::{params, CachedStatement, Connection, OptionalExtension, TransactionBehavior};
use shared::sync::{Cursor, Rows};
use shared::{ActorId, CatalogUpdate, ClockJump, Hlc, HlcStamp, OrderId, PriceEntry, Sku, Slot, StoreId};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::chain::{event_hash, Hash};
use super::command::{Command, EventBody, IdempotencyKey, Rejection, StoreContext};
use super::{online, order_views, projection, LedgerError, WallClock};
use crate::orders::{OnlinePolicy, ShortageAlert};

/// The result of a command: its place in the log and what was recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub seq: u64,
    pub stamp: HlcStamp,
    pub body: EventBody,
    /// True when the idempotency key had been seen: this is the first result, nothing changed.
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("command refused: {0}")]
    Rejected(#[from] Rejection),
    /// The batch could not be made durable (disk full, I/O error); nothing of it was applied,
    /// so a retry with the same key is safe.
    #[error("ledger write failed, nothing applied: {0}")]
    Failed(String),
    #[error("the ledger writer has stopped")]
    Closed,
}

/// What the writer is asked to do.
enum Request {
    /// Append an event. The body was validated on the caller's task (off the writer thread);
    /// a count is completed by the writer. A body refused by validation still comes here, so
    /// that a retry of a command applied earlier gets its first result, not today's refusal.
    Event {
        key: IdempotencyKey,
        body: Result<EventBody, Rejection>,
        /// A handover's pickup code: checked by the writer against the order, never recorded.
        code: Option<String>,
        reply: oneshot::Sender<Result<Applied, SubmitError>>,
    },
    /// Save (or with `None` clear) a lane's basket in progress: state, not an event.
    SaveBasket { lane: String, basket: Option<Vec<u8>>, reply: oneshot::Sender<Result<(), SubmitError>> },
    /// The outcome of one sync exchange: the cloud's acknowledgement and cursor, and the page of
    /// rows it sent as a `SyncMerge` event, all in one transaction.
    Sync {
        ack: SyncAck,
        merge: Option<(IdempotencyKey, Result<EventBody, Rejection>)>,
        reply: oneshot::Sender<Result<Option<Applied>, SubmitError>>,
    },
}

/// A page of cloud rows to merge: the cursor it was pulled from, the rows accepted, and the
/// rows refused with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedPage {
    pub from: Cursor,
    pub rows: Rows,
    pub refused: Vec<String>,
}

/// What a sync answer moves: the store's push position, its pull cursor, and the cloud's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncAck {
    /// The store's own version the cloud holds: the next push starts after it.
    pub acked_version: u64,
    /// How far the request this answers pushed (its push's `to_version`, or the pushed version
    /// when it pushed nothing): the store never counts as pushed more than it sent, whatever
    /// the cloud holds from an earlier life of this store.
    pub pushed_to: u64,
    /// Where the store has now merged the cloud's rows up to.
    pub cursor: Cursor,
    pub cloud_time: HlcStamp,
    /// The answer left nothing to pull: a new ledger has caught up once and stops asking for
    /// its own slots back.
    pub caught_up: bool,
}

/// The outcome of one request within a committed batch. One per request, dropped as soon as
/// the replies are sent; boxing the large variant would cost an allocation per sale instead.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    Event(Result<Applied, Rejection>),
    Saved,
}

/// What a committed batch did besides answering its requests.
#[derive(Default)]
struct Aftermath {
    /// Shortage alerts to raise (the batch left more orders of these SKUs uncovered).
    alerts: Vec<ShortageAlert>,
    grants: u64,
    handovers: u64,
    new_orders: usize,
    /// Time the COMMIT took (WAL frames written and, with FULL, synced).
    commit_micros: u64,
}

/// Cheap to clone; the writer stops once every handle is dropped and the queue is drained.
#[derive(Clone)]
pub struct LedgerHandle {
    tx: mpsc::Sender<Request>,
    ctx: Arc<StoreContext>,
    stats: Arc<Counters>,
    changes: broadcast::Sender<Change>,
    alerts: broadcast::Sender<ShortageAlert>,
    policy: Arc<OnlinePolicy>,
}

/// A committed change others react to (the label planner re-renders the SKU's labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A price register or catalog field of this SKU changed.
    Product(shared::Sku),
}

/// Changes buffered per subscriber; one that falls further behind gets `Lagged` and must
/// re-read the projections.
pub const CHANGE_QUEUE: usize = 4096;

/// Shortage alerts buffered per subscriber (a lagging one gets `Lagged`; the journal and the
/// metrics have every alert regardless).
pub const ALERT_QUEUE: usize = 256;

/// Running totals of the writer, for metrics and benchmarks.
#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    commands: AtomicU64,
    events: AtomicU64,
    failed_batches: AtomicU64,
    busy_micros: AtomicU64,
    commit_micros: AtomicU64,
    /// Batches by duration, one count per bucket of [`BATCH_BUCKETS_MICROS`] (the last: above).
    batch_buckets: [AtomicU64; BATCH_BUCKETS_MICROS.len() + 1],
    online_grants: AtomicU64,
    handovers: AtomicU64,
    shortage_alerts: AtomicU64,
    /// A gauge: pickup orders whose units the store does not have, now.
    orders_at_risk: AtomicU64,
}

/// Upper bounds of the batch-duration histogram, in microseconds (a commit with its fsync).
pub const BATCH_BUCKETS_MICROS: [u64; 10] = [250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 500_000];

/// A snapshot of the writer's totals since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriterStats {
    /// Transactions committed (one fsync each).
    pub batches: u64,
    /// Commands answered from committed batches (new events, replays and refusals).
    pub commands: u64,
    /// New events appended.
    pub events: u64,
    pub failed_batches: u64,
    /// Time spent applying and committing batches (the rest is waiting for work).
    pub busy_micros: u64,
    /// Of `busy_micros`, the time spent in COMMIT (writing the WAL and waiting for the fsync).
    pub commit_micros: u64,
    /// Batches per duration bucket (not cumulative); the last counts those above every bound.
    pub batch_buckets: [u64; BATCH_BUCKETS_MICROS.len() + 1],
    /// Grants the top-up policy made to the online channel.
    pub online_grants: u64,
    /// Online orders handed over.
    pub handovers: u64,
    /// Shortage alerts raised (a commit left more pickup orders without cover).
    pub shortage_alerts: u64,
    /// Pickup orders at risk now.
    pub orders_at_risk: u64,
}

impl LedgerHandle {
    /// Submits a command and waits until it is durable (or refused). Waits for room when the
    /// queue is full: backpressure, never a silent drop.
    pub async fn submit(&self, key: IdempotencyKey, command: Command) -> Result<Applied, SubmitError> {
        let body = command.validate(&self.ctx);
        let code = pickup_code(command);
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request::Event { key, body, code, reply }).await.map_err(|_| SubmitError::Closed)?;
        rx.await.map_err(|_| SubmitError::Closed)?
    }

    /// Saves a lane's basket in progress (or clears it with `None`), durable on return.
    pub async fn save_basket(&self, lane: &str, basket: Option<Vec<u8>>) -> Result<(), SubmitError> {
        let (reply, rx) = oneshot::channel();
        let req = Request::SaveBasket { lane: lane.to_owned(), basket, reply };
        self.tx.send(req).await.map_err(|_| SubmitError::Closed)?;
        rx.await.map_err(|_| SubmitError::Closed)?
    }

    /// Records a sync answer: the acknowledged push version and the new cursor, and merges the
    /// page of cloud rows (if any) as one `SyncMerge` event, durable on return. Applying the same
    /// page twice changes nothing (its key is derived from the cursors).
    pub async fn apply_sync(&self, ack: SyncAck, page: Option<MergedPage>) -> Result<Option<Applied>, SubmitError> {
        let merge = page.map(|MergedPage { from, rows, refused }| {
            let to = ack.cursor;
            let key = IdempotencyKey::new(format!("sync:{}.{}-{}.{}", from.chain, from.store, to.chain, to.store));
            (key.expect("cursor keys are short and printable"), Ok(EventBody::SyncMerge { from, to, rows, refused }))
        });
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request::Sync { ack, merge, reply }).await.map_err(|_| SubmitError::Closed)?;
        rx.await.map_err(|_| SubmitError::Closed)?
    }

    /// For callers outside a tokio runtime.
    pub fn blocking_submit(&self, key: IdempotencyKey, command: Command) -> Result<Applied, SubmitError> {
        let body = command.validate(&self.ctx);
        let code = pickup_code(command);
        let (reply, rx) = oneshot::channel();
        self.tx.blocking_send(Request::Event { key, body, code, reply }).map_err(|_| SubmitError::Closed)?;
        rx.blocking_recv().map_err(|_| SubmitError::Closed)?
    }

    /// Committed changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Shortage alerts from now on: each time a commit leaves more pickup orders of a SKU
    /// without cover (also in the journal as `ORDERS_AT_RISK`, and in the metrics).
    pub fn subscribe_alerts(&self) -> broadcast::Receiver<ShortageAlert> {
        self.alerts.subscribe()
    }

    /// The online allocation policy the writer applies.
    pub fn online_policy(&self) -> &OnlinePolicy {
        &self.policy
    }

    pub fn stats(&self) -> WriterStats {
        let c = &self.stats;
        WriterStats {
            batches: c.batches.load(Ordering::Relaxed),
            commands: c.commands.load(Ordering::Relaxed),
            events: c.events.load(Ordering::Relaxed),
            failed_batches: c.failed_batches.load(Ordering::Relaxed),
            busy_micros: c.busy_micros.load(Ordering::Relaxed),
            commit_micros: c.commit_micros.load(Ordering::Relaxed),
            batch_buckets: std::array::from_fn(|i| c.batch_buckets[i].load(Ordering::Relaxed)),
            online_grants: c.online_grants.load(Ordering::Relaxed),
            handovers: c.handovers.load(Ordering::Relaxed),
            shortage_alerts: c.shortage_alerts.load(Ordering::Relaxed),
            orders_at_risk: c.orders_at_risk.load(Ordering::Relaxed),
        }
    }

    /// Commands waiting for the writer.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// The writer's running thread; [`WriterThread::join`] waits until it has closed SQLite.
pub struct WriterThread(std::thread::JoinHandle<()>);

impl WriterThread {
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!(error_code = "LEDGER_WRITER_PANIC", "Ledger writer thread panicked");
        }
    }

    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

/// What the chain and projections look like after the last committed batch.
#[derive(Debug, Clone)]
pub(super) struct Head {
    pub next_seq: u64,
    pub hash: Hash,
    pub change_version: u64,
}

pub(super) struct Writer {
    pub conn: Connection,
    pub head: Head,
    pub hlc: Hlc,
    pub ctx: StoreContext,
    pub clock: WallClock,
    pub batch_max: usize,
    pub own_slots: OwnSlots,
    /// The connection's current `PRAGMA synchronous`.
    pub synchronous: &'static str,
    pub policy: OnlinePolicy,
    /// Per SKU, the pickup orders its stock does not cover, as of the last commit: an alert is
    /// raised when a commit adds to a SKU's set.
    pub at_risk: BTreeMap<Sku, BTreeSet<OrderId>>,
    /// The ledger holds allocation rows (until it does, no order can be at risk: skip the check).
    pub escrow_seen: bool,
}

/// The pickup code a command carries, kept apart from the recorded body.
fn pickup_code(command: Command) -> Option<String> {
    match command {
        Command::Handover { code, .. } => Some(code),
        _ => None,
    }
}

pub(super) fn spawn(writer: Writer, queue_capacity: usize) -> Result<(LedgerHandle, WriterThread), LedgerError> {
    let (tx, rx) = mpsc::channel(queue_capacity.max(1));
    let stats = Arc::new(Counters::default());
    let counters = stats.clone();
    let ctx = Arc::new(writer.ctx.clone());
    let policy = Arc::new(writer.policy.clone());
    let (changes, _) = broadcast::channel(CHANGE_QUEUE);
    let (alerts, _) = broadcast::channel(ALERT_QUEUE);
    let publish = changes.clone();
    let raise = alerts.clone();
    let replier = Replier::start()?;
    let thread = std::thread::Builder::new()
        .name("ledger-writer".into())
        .spawn(move || writer.run(rx, replier, &counters, &publish, &raise))
        .map_err(|e| LedgerError::Corrupt { seq: None, detail: format!("cannot start the writer thread: {e}") })?;
    Ok((LedgerHandle { tx, ctx, stats, changes, alerts, policy }, WriterThread(thread)))
}

impl Writer {
    fn run(
        mut self,
        mut rx: mpsc::Receiver<Request>,
        replier: Replier,
        counters: &Counters,
        changes: &broadcast::Sender<Change>,
        alerts: &broadcast::Sender<ShortageAlert>,
    ) {
        self.start_online(counters);
        let mut batch = Vec::with_capacity(self.batch_max);
        // Waits for the first request, then takes what else is queued, up to `batch_max`, in
        // one go: the queue's permits go back to the callers once per batch, not once per
        // request (no measurable change in `cargo bench -p edge-agent --bench ledger_append`;
        // the simpler loop).
        while rx.blocking_recv_many(&mut batch, self.batch_max) > 0 {
            let started = std::time::Instant::now();
            let outcome = self.apply_batch(&mut batch, false);
            let micros = started.elapsed().as_micros() as u64;
            counters.busy_micros.fetch_add(micros, Ordering::Relaxed);
            let bucket = BATCH_BUCKETS_MICROS.iter().position(|b| micros <= *b).unwrap_or(BATCH_BUCKETS_MICROS.len());
            counters.batch_buckets[bucket].fetch_add(1, Ordering::Relaxed);
            match outcome {
                Ok((results, aftermath)) => {
                    tracing::trace!(
                        batch = batch.len(),
                        micros = started.elapsed().as_micros() as u64,
                        "Ledger batch committed"
                    );
                    let new_events =
                        results.iter().filter(|r| matches!(r, Outcome::Event(Ok(a)) if !a.replayed)).count();
                    counters.batches.fetch_add(1, Ordering::Relaxed);
                    counters.commands.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    counters.events.fetch_add(new_events as u64 + aftermath.grants, Ordering::Relaxed);
                    self.after_commit(aftermath, counters, alerts);
                    for r in &results {
                        if let Outcome::Event(Ok(a)) = r {
                            match &a.body {
                                EventBody::PriceChange { key, .. } if !a.replayed => {
                                    let _ = changes.send(Change::Product(key.sku.clone()));
                                }
                                EventBody::CatalogChange { sku, .. } if !a.replayed => {
                                    let _ = changes.send(Change::Product(sku.clone()));
                                }
                                EventBody::SyncMerge { rows, .. } if !a.replayed => {
                                    let skus: std::collections::BTreeSet<&Sku> = rows
                                        .prices
                                        .iter()
                                        .map(|p| &p.key.sku)
                                        .chain(rows.catalog.iter().map(|c| &c.sku))
                                        .collect();
                                    for sku in skus {
                                        let _ = changes.send(Change::Product(sku.clone()));
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                    let answered = std::mem::replace(&mut batch, Vec::with_capacity(self.batch_max));
                    replier.deliver(Delivery::Committed(answered, results));
                }
                Err(e) => {
                    tracing::error!(error = %e, batch = batch.len(), error_code = "LEDGER_BATCH_FAILED", "Ledger batch failed; nothing of it was applied");
                    counters.failed_batches.fetch_add(1, Ordering::Relaxed);
                    let failed = std::mem::replace(&mut batch, Vec::with_capacity(self.batch_max));
                    replier.deliver(Delivery::Failed(failed, e.to_string()));
                }
            }
        }
        // Every caller has its answer before the writer counts as stopped.
        replier.finish();
        tracing::info!(next_seq = self.head.next_seq, "Ledger writer drained and stopped");
    }

    /// Before the first command: say which orders are at risk already (they were alerted before
    /// a restart, or arrived while the daemon was down) and top up every SKU the policy covers,
    /// since its target may have changed with the configuration.
    fn start_online(&mut self, counters: &Counters) {
        let at_risk: usize = self.at_risk.values().map(BTreeSet::len).sum();
        counters.orders_at_risk.store(at_risk as u64, Ordering::Relaxed);
        for (sku, orders) in &self.at_risk {
            let orders: Vec<&str> = orders.iter().map(OrderId::as_str).collect();
            tracing::warn!(
                store_id = %self.ctx.store,
                sku = %sku,
                orders = %orders.join(","),
                error_code = "ORDERS_AT_RISK",
                "Pickup orders are still at risk: their units are not in the store; restock, or ask HQ to contact the customers"
            );
        }
        if !self.policy.enabled {
            return;
        }
        match self.apply_batch(&mut [], true) {
            Ok((_, aftermath)) => {
                if aftermath.grants > 0 {
                    tracing::info!(grants = aftermath.grants, "Online allocation topped up at start");
                }
                counters.events.fetch_add(aftermath.grants, Ordering::Relaxed);
                counters.online_grants.fetch_add(aftermath.grants, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(
                error = %e,
                error_code = "ONLINE_TOP_UP_FAILED",
                "Topping up the online allocation at start failed; each SKU is topped up again when its stock or allocation next moves, and every SKU at the next start"
            ),
        }
    }

    /// After a commit: count what it did, raise its shortage alerts (journal, metrics, the
    /// alert channel), and say when orders arrived.
    fn after_commit(&self, aftermath: Aftermath, counters: &Counters, alerts: &broadcast::Sender<ShortageAlert>) {
        counters.online_grants.fetch_add(aftermath.grants, Ordering::Relaxed);
        counters.commit_micros.fetch_add(aftermath.commit_micros, Ordering::Relaxed);
        counters.handovers.fetch_add(aftermath.handovers, Ordering::Relaxed);
        let at_risk: usize = self.at_risk.values().map(BTreeSet::len).sum();
        counters.orders_at_risk.store(at_risk as u64, Ordering::Relaxed);
        if aftermath.new_orders > 0 {
            tracing::info!(store_id = %self.ctx.store, orders = aftermath.new_orders, "Online pickup orders received");
        }
        for alert in aftermath.alerts {
            counters.shortage_alerts.fetch_add(1, Ordering::Relaxed);
            let orders: Vec<&str> = alert.orders.iter().map(OrderId::as_str).collect();
            tracing::warn!(
                store_id = %self.ctx.store,
                sku = %alert.sku,
                shortfall = alert.shortfall,
                on_hand = alert.on_hand,
                promised = alert.promised,
                orders = %orders.join(","),
                error_code = "ORDERS_AT_RISK",
                "Stock on hand no longer covers units promised online (after sales, counts, adjustments, merged changes or new reservations): these pickup orders are at risk; restock, or ask HQ to contact the customers"
            );
            let _ = alerts.send(alert);
        }
    }

    /// Applies `batch` in one transaction. With `sweep`, also tops up every SKU the policy
    /// covers (at start); the same happens in the batch where a new ledger first catches up.
    /// Event bodies are taken out of their requests (an applied event's answer carries its
    /// body); only the reply channels are used after this.
    fn apply_batch(&mut self, batch: &mut [Request], sweep: bool) -> Result<(Vec<Outcome>, Aftermath), LedgerError> {
        // Money and stock are committed with synchronous=FULL (fsync before the reply). A batch
        // of basket saves only is committed with NORMAL: in WAL mode that survives a crash of
        // the daemon (the pages are in the OS), and a power cut can lose at most the last
        // changes of an open basket, never a sale; the next FULL commit syncs them too. This
        // keeps an fsync out of every scan at the lane.
        let durability =
            if sweep || batch.iter().any(|r| !matches!(r, Request::SaveBasket { .. })) { "FULL" } else { "NORMAL" };
        if durability != self.synchronous {
            self.conn.pragma_update(None, "synchronous", durability)?;
            self.synchronous = durability;
        }
        let mut head = self.head.clone();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Never behind the last stamp: a store clock reset by a dead battery must not make
        // expired orders collectable again.
        let now_ms = i64::try_from((self.clock)().max(self.hlc.last().0)).unwrap_or(i64::MAX);
        // The online checks cost nothing until the policy grants or allocation rows exist.
        let online = self.policy.enabled || self.escrow_seen;
        let was_bootstrapped = self.policy.enabled && bootstrapped(&tx)?;
        let mut results = Vec::with_capacity(batch.len());
        let mut aftermath = Aftermath::default();
        let mut touched: BTreeSet<Sku> = BTreeSet::new();
        let risk_now;
        let batch_slots;
        {
            let mut slots = BatchSlots::default();
            let cache = &self.own_slots;
            let mut insert_event = tx.prepare_cached(
                "INSERT INTO events (seq, hlc_wall, hlc_logical, actor, kind, idem_key, body, prev_hash, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (idem_key) DO NOTHING",
            )?;
            for req in batch.iter_mut() {
                let (key, body, code) = match req {
                    Request::Event { key, body, code, .. } => (&*key, body, code.as_deref()),
                    Request::Sync { ack, merge, .. } => {
                        if let Err(skew) = self.hlc.observe(&ack.cloud_time, (self.clock)()) {
                            // The cloud is the reference for time; a store clock far behind it
                            // (a dead RTC) must not stop sync. Stamps continue from our own.
                            tracing::warn!(error = %skew, error_code = "CLOCK_SKEW", "Cloud clock is far ahead of this store's clock");
                        }
                        write_sync_position(&tx, ack, &mut head)?;
                        match merge {
                            Some((key, body)) => (&*key, body, None),
                            None => {
                                results.push(Outcome::Saved);
                                continue;
                            }
                        }
                    }
                    Request::SaveBasket { lane, basket, .. } => {
                        match basket {
                            Some(bytes) => tx
                                .prepare_cached("INSERT OR REPLACE INTO lane_baskets (lane, basket) VALUES (?1, ?2)")?
                                .execute(params![&*lane, &*bytes])?,
                            None => tx
                                .prepare_cached("DELETE FROM lane_baskets WHERE lane = ?1")?
                                .execute(params![&*lane])?,
                        };
                        results.push(Outcome::Saved);
                        continue;
                    }
                };
                let body = match std::mem::replace(body, Err(Rejection(String::new()))) {
                    Ok(body) => body,
                    Err(rejection) => {
                        results.push(Outcome::Event(first_result_or(&tx, key, None, rejection)?));
                        continue;
                    }
                };
                let input = PlanInput { now_ms, code };
                let own = OwnView { store: &self.ctx.store, actor: self.hlc.actor(), committed: cache };
                // `Some` only where the writer completes the body (most events are as sent).
                let completed = match resolve(&tx, &own, &mut slots, &body, input)? {
                    Ok(completed) => completed,
                    Err(rejection) => {
                        results.push(Outcome::Event(first_result_or(&tx, key, Some(&body), rejection)?));
                        continue;
                    }
                };
                let event = completed.as_ref().unwrap_or(&body);
                let planned = match plan_slots(&tx, &own, &mut slots, event)? {
                    Ok(planned) => planned,
                    Err(rejection) => {
                        results.push(Outcome::Event(first_result_or(&tx, key, Some(&body), rejection)?));
                        continue;
                    }
                };
                let outcome = match append(&mut insert_event, &mut self.hlc, &self.clock, &mut head, key, event)? {
                    // Seen before (in an earlier batch or earlier in this one).
                    None => same_command(replay(&tx, key)?, key, &body),
                    Some((seq, stamp)) => {
                        slots.commit(planned);
                        let body = completed.unwrap_or(body);
                        apply_registers(&tx, &mut head, &body, &stamp)?;
                        if let EventBody::SyncMerge { rows, .. } = &body {
                            merge_cloud_rows(&tx, &mut head, rows, &self.ctx.store, self.hlc.actor())?;
                        }
                        aftermath.new_orders +=
                            online::apply(&tx, &mut head.change_version, &self.ctx.store, &body, seq)?;
                        aftermath.handovers += u64::from(matches!(body, EventBody::Handover { .. }));
                        self.escrow_seen |= body.carries_allocation();
                        if online || self.escrow_seen {
                            touched.extend(body.touched_skus().into_iter().cloned());
                        }
                        Ok(Applied { seq, stamp, body, replayed: false })
                    }
                };
                results.push(Outcome::Event(outcome));
            }
            slots.flush(&tx, &self.ctx, self.hlc.actor(), &mut head)?;
            batch_slots = slots;

            // Top up what moved. Never before a new ledger caught up with the cloud once: it
            // would not know the cloud's reservations, so its view of what is free is wrong.
            if self.policy.enabled && bootstrapped(&tx)? {
                let mut skus = touched.clone();
                if sweep || !was_bootstrapped {
                    skus.extend(online::sweep_candidates(&tx, &self.ctx.store, &self.policy)?);
                }
                for sku in &skus {
                    let Some(grant) = online::plan_grant(&tx, &self.ctx.store, &self.policy, sku)? else { continue };
                    let EventBody::Grant { granted, .. } = &grant else { continue };
                    let key = online::grant_key(sku, *granted)?;
                    if let Some((seq, _)) =
                        append(&mut insert_event, &mut self.hlc, &self.clock, &mut head, &key, &grant)?
                    {
                        online::apply(&tx, &mut head.change_version, &self.ctx.store, &grant, seq)?;
                        aftermath.grants += 1;
                        self.escrow_seen = true;
                    }
                }
            }

            // Then the orders those SKUs no longer cover (none before allocation rows exist:
            // `escrow_seen` is set at open and by every event that writes such rows).
            let mut risk = Vec::new();
            if self.escrow_seen {
                for sku in &touched {
                    let now = order_views::at_risk_of(&tx, &self.ctx.store, sku, now_ms)?.map(|(s, _)| s);
                    risk.push((sku.clone(), now));
                }
            }
            risk_now = risk;
        }
        let (wall, logical) = self.hlc.last();
        let mut meta = tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?;
        meta.execute(params!["hlc_wall", wall as i64])?;
        meta.execute(params!["hlc_logical", i64::from(logical)])?;
        meta.execute(params!["change_version", head.change_version as i64])?;
        meta.execute(params!["head_seq", head.next_seq as i64 - 1])?;
        meta.execute(params!["head_hash", head.hash.to_vec()])?;
        drop(meta);
        let committing = std::time::Instant::now();
        tx.commit()?;
        aftermath.commit_micros = committing.elapsed().as_micros() as u64;
        self.head = head;
        batch_slots.into_cache(&mut self.own_slots);
        for (sku, now) in risk_now {
            match now {
                None => {
                    self.at_risk.remove(&sku);
                }
                Some(info) => {
                    let orders: BTreeSet<OrderId> = info.orders.iter().cloned().collect();
                    let grew = self.at_risk.get(&sku).is_none_or(|before| !orders.is_subset(before));
                    if grew {
                        aftermath.alerts.push(ShortageAlert {
                            sku: info.sku,
                            on_hand: info.on_hand,
                            promised: info.promised,
                            shortfall: info.shortfall,
                            orders: info.orders,
                        });
                    }
                    self.at_risk.insert(sku, orders);
                }
            }
        }
        Ok((results, aftermath))
    }
}

/// Whether this ledger has caught up with the cloud once (`meta.bootstrapped`), as of `conn`.
fn bootstrapped(conn: &Connection) -> Result<bool, LedgerError> {
    let v: Option<i64> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'bootstrapped'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(v == Some(1))
}

/// Stamps, hashes and inserts one event after the chain head; `None` when its key was seen
/// before (nothing inserted; the caller replays the first result).
fn append(
    insert: &mut CachedStatement<'_>,
    hlc: &mut Hlc,
    clock: &WallClock,
    head: &mut Head,
    key: &IdempotencyKey,
    body: &EventBody,
) -> Result<Option<(u64, HlcStamp)>, LedgerError> {
    let (stamp, jump) = hlc.stamp(clock());
    report_jump(jump);
    let encoded = body.encode();
    let seq = head.next_seq;
    let hash = event_hash(&head.hash, seq, &stamp, body.kind(), key.as_str(), &encoded);
    let inserted = insert.execute(params![
        seq as i64,
        stamp.wall_ms as i64,
        i64::from(stamp.logical),
        stamp.actor.as_str(),
        body.kind(),
        key.as_str(),
        encoded,
        &head.hash[..],
        &hash[..]
    ])?;
    if inserted == 0 {
        return Ok(None);
    }
    head.next_seq += 1;
    head.hash = hash;
    Ok(Some((seq, stamp)))
}

fn report_jump(jump: Option<ClockJump>) {
    match jump {
        Some(ClockJump::Backwards { by_ms }) => tracing::warn!(
            by_ms,
            error_code = "CLOCK_BACKWARDS",
            "Wall clock is behind the last ledger stamp; stamps continue from the ledger (check the RTC battery and NTP)"
        ),
        Some(ClockJump::Forwards { by_ms }) => {
            tracing::warn!(by_ms, error_code = "CLOCK_JUMP", "Wall clock jumped forwards since the last ledger stamp")
        }
        None => {}
    }
}

/// Committed (or failed) batches waiting for the replier thread; when it is this far behind,
/// the writer waits for it before starting the next batch (backpressure, nothing dropped).
pub const REPLY_QUEUE: usize = 4;

/// What the replier thread hands back: a committed batch's requests with their outcomes (in
/// order), or a failed batch's requests with the error.
enum Delivery {
    Committed(Vec<Request>, Vec<Outcome>),
    Failed(Vec<Request>, String),
}

/// Answers callers off the writer thread. Waking a caller's task costs the sender a trip
/// through the async runtime's scheduler (and, when its workers are parked, a system call); with
/// a thousand callers per batch that was a tenth of the writer's time, spent while the next
/// batch waited. The writer hands each batch over only after its COMMIT returned, so no
/// caller hears of a command before it is durable; a batch is one message, in commit order.
struct Replier {
    queue: std::sync::mpsc::SyncSender<Delivery>,
    thread: std::thread::JoinHandle<()>,
}

impl Replier {
    fn start() -> Result<Replier, LedgerError> {
        let (queue, deliveries) = std::sync::mpsc::sync_channel::<Delivery>(REPLY_QUEUE);
        let thread = std::thread::Builder::new()
            .name("ledger-replier".into())
            .spawn(move || {
                for delivery in deliveries {
                    answer(delivery);
                }
            })
            .map_err(|e| LedgerError::Corrupt { seq: None, detail: format!("cannot start the replier thread: {e}") })?;
        Ok(Replier { queue, thread })
    }

    fn deliver(&self, delivery: Delivery) {
        // The replier only stops when this sender is dropped, so a refused send means it died
        // (a panic): answer here rather than leave callers waiting.
        if let Err(std::sync::mpsc::SendError(delivery)) = self.queue.send(delivery) {
            answer(delivery);
        }
    }

    /// Waits until every handed-over batch is answered.
    fn finish(self) {
        drop(self.queue);
        if self.thread.join().is_err() {
            tracing::error!(error_code = "LEDGER_WRITER_PANIC", "Ledger replier thread panicked");
        }
    }
}

/// Sends each caller of a batch its outcome.
fn answer(delivery: Delivery) {
    match delivery {
        Delivery::Committed(batch, results) => {
            for (req, result) in batch.into_iter().zip(results) {
                match (req, result) {
                    (Request::Event { reply, .. }, Outcome::Event(r)) => {
                        let _ = reply.send(r.map_err(SubmitError::Rejected));
                    }
                    (Request::SaveBasket { reply, .. }, _) => {
                        let _ = reply.send(Ok(()));
                    }
                    (Request::Event { reply, .. }, Outcome::Saved) => {
                        let _ = reply.send(Err(SubmitError::Failed("internal: outcome mismatch".into())));
                    }
                    (Request::Sync { reply, .. }, Outcome::Event(r)) => {
                        let _ = reply.send(r.map(Some).map_err(SubmitError::Rejected));
                    }
                    (Request::Sync { reply, .. }, Outcome::Saved) => {
                        let _ = reply.send(Ok(None));
                    }
                }
            }
        }
        Delivery::Failed(batch, msg) => {
            for req in batch {
                let failed = SubmitError::Failed(msg.clone());
                match req {
                    Request::Event { reply, .. } => {
                        let _ = reply.send(Err(failed));
                    }
                    Request::SaveBasket { reply, .. } => {
                        let _ = reply.send(Err(failed));
                    }
                    Request::Sync { reply, .. } => {
                        let _ = reply.send(Err(failed));
                    }
                }
            }
        }
    }
}

/// Most own slots the writer keeps in memory; past it the cache is emptied and refills from
/// SQLite on demand (about 100 bytes an entry: 200k entries stay near 20 MiB).
pub const OWN_SLOT_CACHE_MAX: usize = 200_000;

/// The store's own stock slots as committed. Only the writer changes them, so this copy is
/// exact, and a sale needs no SELECT to find the slot it moves.
#[derive(Default)]
pub(super) struct OwnSlots {
    /// Each slot with its row id (`None` while the slot has no row). foldhash (randomly
    /// seeded, not DoS-hardened like SipHash): SKUs come from the store's own lanes and from
    /// validated cloud pages, and the map is bounded by `OWN_SLOT_CACHE_MAX`.
    slots: HashMap<Sku, (Slot, Option<i64>), foldhash::fast::RandomState>,
}

/// The store's own slots touched by the current batch: read once, written once at the end of
/// the batch however many of its events move them (a popular SKU sold on every lane costs one
/// slot write per fsync, not one per sale). Dropped unapplied if the batch fails.
#[derive(Default)]
struct BatchSlots {
    /// Hashed, not ordered: a sale looks its SKU up twice (plan, commit), and a tree of string
    /// keys cost ~10 comparisons each time; `flush` writes in row-id order instead.
    slots: HashMap<Sku, BatchSlot, foldhash::fast::RandomState>,
}

/// One own slot within a batch: its value, its row id, and whether the batch changed it.
#[derive(Clone, Copy)]
struct BatchSlot {
    slot: Slot,
    id: Option<i64>,
    dirty: bool,
}

impl BatchSlots {
    fn get(&mut self, conn: &Connection, own: &OwnView<'_>, sku: &Sku) -> Result<Slot, LedgerError> {
        if let Some(entry) = self.slots.get(sku) {
            return Ok(entry.slot);
        }
        let (slot, id) = match own.committed.slots.get(sku) {
            Some(cached) => *cached,
            None => projection::slot_with_id(conn, own.store, sku, own.actor)?,
        };
        self.slots.insert(sku.clone(), BatchSlot { slot, id, dirty: false });
        Ok(slot)
    }

    /// Records the planned values; every planned slot was read through [`BatchSlots::get`].
    fn commit(&mut self, planned: Vec<(&Sku, Slot)>) {
        for (sku, slot) in planned {
            match self.slots.get_mut(sku) {
                Some(entry) => {
                    entry.slot = slot;
                    entry.dirty = true;
                }
                None => {
                    self.slots.insert(sku.clone(), BatchSlot { slot, id: None, dirty: true });
                }
            }
        }
    }

    fn flush(
        &mut self,
        conn: &Connection,
        ctx: &StoreContext,
        actor: &ActorId,
        head: &mut Head,
    ) -> Result<(), LedgerError> {
        // In row-id order (new rows last, by SKU): neighbouring rows share B-tree pages, and
        // the change versions come out in a deterministic order.
        let mut dirty: Vec<(&Sku, &mut BatchSlot)> = self.slots.iter_mut().filter(|(_, e)| e.dirty).collect();
        if dirty.is_empty() {
            return Ok(());
        }
        // (Row ids are positive; the SKU only breaks ties between new rows.)
        dirty.sort_unstable_by(|(a_sku, a), (b_sku, b)| {
            let (a_id, b_id) = (a.id.unwrap_or(i64::MAX), b.id.unwrap_or(i64::MAX));
            a_id.cmp(&b_id).then_with(|| a_sku.cmp(b_sku))
        });
        let mut update = projection::SlotWriter::new(conn)?;
        for (sku, entry) in dirty {
            head.change_version += 1;
            let key = (&ctx.store, sku, actor);
            entry.id = Some(update.write(key, entry.id, entry.slot, head.change_version)?);
        }
        Ok(())
    }

    /// After the commit: what this batch read or wrote is now the committed state.
    fn into_cache(self, cache: &mut OwnSlots) {
        if cache.slots.len() + self.slots.len() > OWN_SLOT_CACHE_MAX {
            cache.slots.clear();
        }
        cache.slots.extend(self.slots.into_iter().map(|(sku, e)| (sku, (e.slot, e.id))));
    }
}

/// Whose slots a batch moves (this store's, under the writer's actor) and their committed
/// values: borrowed, so planning a sale copies no id.
struct OwnView<'a> {
    store: &'a StoreId,
    actor: &'a ActorId,
    committed: &'a OwnSlots,
}

/// What resolving a command needs beyond the ledger: the batch's time, a handover's code.
#[derive(Clone, Copy)]
struct PlanInput<'a> {
    now_ms: i64,
    code: Option<&'a str>,
}

/// Reads what the command needs (a count's observed stock, an order's state) and completes
/// its body, or refuses it if the order does not allow it; a sync page loses the rows that
/// conflict with what the store holds (named as refused). `None`: the body is recorded as sent
/// (sales, receipts, prices...). Nothing is written here.
fn resolve(
    conn: &Connection,
    own: &OwnView<'_>,
    slots: &mut BatchSlots,
    body: &EventBody,
    input: PlanInput<'_>,
) -> Result<Result<Option<EventBody>, Rejection>, LedgerError> {
    Ok(Ok(Some(match body {
        EventBody::SyncMerge { from, to, rows, refused } => {
            let (mut rows, mut refused) = (rows.clone(), refused.clone());
            online::screen_page(conn, own.store, &mut rows, &mut refused)?;
            EventBody::SyncMerge { from: *from, to: *to, rows, refused }
        }
        EventBody::Handover { order, .. } => {
            match online::resolve_handover(conn, own.store, order, input.code, input.now_ms)? {
                Ok(body) => body,
                Err(refusal) => return Ok(Err(Rejection::new(refusal.to_string()))),
            }
        }
        EventBody::Pick { order, .. } => match online::resolve_pick(conn, own.store, order, input.now_ms)? {
            Ok(body) => body,
            Err(refusal) => return Ok(Err(Rejection::new(refusal.to_string()))),
        },
        EventBody::Count { sku, counted, .. } => {
            // Every actor's slot as stored, with our own slot as this batch left it.
            let others: i128 = projection::slots_of(conn, own.store, sku)?
                .iter()
                .filter(|(a, _)| a != own.actor)
                .map(|(_, s)| s.value())
                .sum();
            let seen =
                (others + slots.get(conn, own, sku)?.value()).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
            let Some(movement) = counted.checked_sub(seen) else {
                return Ok(Err(Rejection::new(format!("count of {sku}: movement from {seen} to {counted} overflows"))));
            };
            EventBody::Count { sku: sku.clone(), counted: *counted, seen, movement }
        }
        _ => return Ok(Ok(None)),
    })))
}

/// Own slots a body moves, with the values it leaves them at.
type PlannedSlots<'b> = Vec<(&'b Sku, Slot)>;

/// The own-slot values a resolved body leaves, or its refusal if one would overflow. Nothing
/// is written here.
fn plan_slots<'b>(
    conn: &Connection,
    own: &OwnView<'_>,
    slots: &mut BatchSlots,
    body: &'b EventBody,
) -> Result<Result<PlannedSlots<'b>, Rejection>, LedgerError> {
    let mut planned: Vec<(&Sku, Slot)> = Vec::new();
    for (sku, merged) in body.own_slot_merges(own.store, own.actor) {
        let current = match planned.iter().find(|(k, _)| *k == sku) {
            Some((_, s)) => *s,
            None => slots.get(conn, own, sku)?,
        };
        let next = current.merge(merged);
        match planned.iter_mut().find(|(k, _)| *k == sku) {
            Some(entry) => entry.1 = next,
            None if next != current => planned.push((sku, next)),
            None => {}
        }
    }
    for (sku, movement) in body.stock_movements() {
        let current = match planned.iter().find(|(k, _)| *k == sku) {
            Some((_, s)) => *s,
            None => slots.get(conn, own, sku)?,
        };
        let Some(next) = current.apply(movement) else {
            return Ok(Err(Rejection::new(format!("stock of {sku} would overflow with a movement of {movement}"))));
        };
        match planned.iter_mut().find(|(k, _)| *k == sku) {
            Some(entry) => entry.1 = next,
            None => planned.push((sku, next)),
        }
    }
    Ok(Ok(planned))
}

/// Price and catalog registers take the event's stamp and merge at once (they are rare).
fn apply_registers(conn: &Connection, head: &mut Head, body: &EventBody, stamp: &HlcStamp) -> Result<(), LedgerError> {
    let version = head.change_version + 1;
    let changed = match body {
        EventBody::PriceChange { key, value } => projection::merge_price(
            conn,
            &PriceEntry { key: key.clone(), value: value.clone(), stamp: stamp.clone() },
            version,
        )?,
        EventBody::CatalogChange { sku, field } => projection::merge_catalog(
            conn,
            &CatalogUpdate { sku: sku.clone(), field: field.clone(), stamp: stamp.clone() },
            version,
        )?,
        EventBody::EpcsSold { epcs } => {
            let mut insert = conn.prepare_cached("INSERT OR IGNORE INTO sold_epcs (epc, seq) VALUES (?1, ?2)")?;
            for epc in epcs {
                insert.execute(params![epc, head.next_seq as i64 - 1])?;
            }
            false
        }
        _ => false,
    };
    if changed {
        head.change_version = version;
    }
    Ok(())
}

/// Merges a page of cloud rows into the projections, each changed row taking the next change
/// version. The store's own slots are left to the batch's slot plan (see `plan`).
fn merge_cloud_rows(
    conn: &Connection,
    head: &mut Head,
    rows: &Rows,
    store: &StoreId,
    actor: &ActorId,
) -> Result<(), LedgerError> {
    for row in rows.slot_rows() {
        if row.key.store == *store && row.key.actor == *actor {
            continue;
        }
        if projection::merge_slot(conn, &row, head.change_version + 1)? {
            head.change_version += 1;
        }
    }
    for entry in &rows.prices {
        if projection::merge_price(conn, entry, head.change_version + 1)? {
            head.change_version += 1;
        }
    }
    for update in &rows.catalog {
        if projection::merge_catalog(conn, update, head.change_version + 1)? {
            head.change_version += 1;
        }
    }
    Ok(())
}

fn write_sync_position(conn: &Connection, ack: &SyncAck, head: &mut Head) -> Result<(), LedgerError> {
    let mut meta = conn.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?;
    let as_i64 = |v: u64| {
        i64::try_from(v)
            .map_err(|_| LedgerError::Corrupt { seq: None, detail: format!("sync version {v} exceeds i64") })
    };
    let mut cursor = ack.cursor;
    let mut caught_up = ack.caught_up;
    if ack.acked_version > head.change_version {
        // The cloud holds versions this ledger never issued: it was rebuilt (or restored from
        // an old backup). Our versions continue above the cloud's, so what we have is pushed
        // again, and we pull everything again, our own slots included, as a new ledger does.
        tracing::warn!(
            cloud_acked = ack.acked_version,
            local_head = head.change_version,
            error_code = "SYNC_LEDGER_BEHIND_CLOUD",
            "The cloud holds more of this store than its ledger; continuing versions above the cloud's and pulling everything again"
        );
        head.change_version = ack.acked_version;
        cursor = Cursor::default();
        caught_up = false;
        meta.execute(params!["bootstrapped", 0])?;
    }
    // Never more than this request sent: with the cloud ahead of a rebuilt ledger, a page's
    // answer names the cloud's old number, not what this page carried.
    meta.execute(params!["pushed_version", as_i64(ack.acked_version.min(ack.pushed_to))?])?;
    if caught_up {
        meta.execute(params!["bootstrapped", 1])?;
    }
    meta.execute(params!["cursor_chain", as_i64(cursor.chain)?])?;
    meta.execute(params!["cursor_store", as_i64(cursor.store)?])?;
    Ok(())
}

/// The first result of `key`, if it was ever applied.
fn first_result(conn: &Connection, key: &IdempotencyKey) -> Result<Option<Applied>, LedgerError> {
    let found = conn
        .prepare_cached("SELECT seq, hlc_wall, hlc_logical, actor, body FROM events WHERE idem_key = ?1")?
        .query_row(params![key.as_str()], |r| {
            Ok((r.get::<_, i64>(0)?, projection::stamp_from(r, 1), r.get::<_, Vec<u8>>(4)?))
        })
        .optional()?;
    let Some((seq, stamp, body)) = found else { return Ok(None) };
    let seq = u64::try_from(seq)
        .map_err(|_| LedgerError::Corrupt { seq: None, detail: format!("negative sequence {seq}") })?;
    let body = EventBody::decode(&body).map_err(|detail| LedgerError::Corrupt { seq: Some(seq), detail })?;
    Ok(Some(Applied { seq, stamp: stamp?, body, replayed: true }))
}

fn replay(conn: &Connection, key: &IdempotencyKey) -> Result<Applied, LedgerError> {
    first_result(conn, key)?.ok_or_else(|| LedgerError::Corrupt {
        seq: None,
        detail: format!("idempotency key {} conflicts but has no event", key.as_str()),
    })
}

/// A command refused now may have been applied before (a retry after the configuration
/// changed, or after stock moved): the first result wins over today's refusal, if the key's
/// event is this command (`request`, when it passed validation) and not another one.
fn first_result_or(
    conn: &Connection,
    key: &IdempotencyKey,
    request: Option<&EventBody>,
    rejection: Rejection,
) -> Result<Result<Applied, Rejection>, LedgerError> {
    match (first_result(conn, key)?, request) {
        (None, _) => Ok(Err(rejection)),
        (Some(first), Some(request)) => Ok(same_command(first, key, request)),
        (Some(first), None) => Ok(Ok(first)),
    }
}

/// The first result of a key, if the request is the same command (a genuine retry); a key
/// reused for another command (another order, another SKU, another kind) is refused, naming
/// the event the key already stands for.
fn same_command(first: Applied, key: &IdempotencyKey, request: &EventBody) -> Result<Applied, Rejection> {
    if first.body.same_command(request) {
        return Ok(first);
    }
    Err(Rejection::new(format!(
        "idempotency key {} already names event {} ({}); use a new key",
        key.as_str(),
        first.seq,
        first.body.describe()
    )))
}

pub(super) fn shared_clock() -> WallClock {
    Arc::new(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    })
}
