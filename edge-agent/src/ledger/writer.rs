//! The one task that writes the ledger. Callers send commands over a bounded channel; the
//! writer drains whatever is waiting (up to `batch_max`) into one IMMEDIATE transaction, so a
//! whole batch costs one fsync (group commit), and replies to each caller only after the
//! commit returned: an acknowledged command is durable. If the commit fails, every caller of
//! that batch gets the error and nothing of the batch is applied.
//!
//! It runs on a dedicated OS thread because rusqlite is blocking; the channel is tokio's, so
//! async callers await without blocking a runtime worker.

use std::collections::BTreeMap;
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use shared::{CatalogUpdate, ClockJump, Hlc, HlcStamp, PriceEntry, Slot, SlotKey};
use tokio::sync::{mpsc, oneshot};

use super::chain::{event_hash, Hash};
use super::command::{Command, EventBody, IdempotencyKey, Rejection, StoreContext};
use super::{projection, LedgerError, WallClock};

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

struct Request {
    key: IdempotencyKey,
    command: Command,
    reply: oneshot::Sender<Result<Applied, SubmitError>>,
}

/// Cheap to clone; the writer stops once every handle is dropped and the queue is drained.
#[derive(Clone)]
pub struct LedgerHandle {
    tx: mpsc::Sender<Request>,
}

impl LedgerHandle {
    /// Submits a command and waits until it is durable (or refused). Waits for room when the
    /// queue is full: backpressure, never a silent drop.
    pub async fn submit(&self, key: IdempotencyKey, command: Command) -> Result<Applied, SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request { key, command, reply }).await.map_err(|_| SubmitError::Closed)?;
        rx.await.map_err(|_| SubmitError::Closed)?
    }

    /// For callers outside a tokio runtime.
    pub fn blocking_submit(&self, key: IdempotencyKey, command: Command) -> Result<Applied, SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.tx.blocking_send(Request { key, command, reply }).map_err(|_| SubmitError::Closed)?;
        rx.blocking_recv().map_err(|_| SubmitError::Closed)?
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
            tracing::error!("Ledger writer thread panicked");
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
}

pub(super) fn spawn(writer: Writer, queue_capacity: usize) -> Result<(LedgerHandle, WriterThread), LedgerError> {
    let (tx, rx) = mpsc::channel(queue_capacity.max(1));
    let thread = std::thread::Builder::new()
        .name("ledger-writer".into())
        .spawn(move || writer.run(rx))
        .map_err(|e| LedgerError::Corrupt { seq: None, detail: format!("cannot start the writer thread: {e}") })?;
    Ok((LedgerHandle { tx }, WriterThread(thread)))
}

/// A write planned by a command, applied after its event row is in.
enum Effect {
    Slot(SlotKey, Slot),
    Price(PriceEntry),
    Catalog(CatalogUpdate),
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(self.batch_max);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < self.batch_max {
                match rx.try_recv() {
                    Ok(req) => batch.push(req),
                    Err(_) => break,
                }
            }
            let started = std::time::Instant::now();
            match self.apply_batch(&batch) {
                Ok(results) => {
                    tracing::trace!(batch = batch.len(), micros = started.elapsed().as_micros() as u64, "Ledger batch committed");
                    for (req, result) in batch.drain(..).zip(results) {
                        let _ = req.reply.send(result.map_err(SubmitError::Rejected));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, batch = batch.len(), "Ledger batch failed; nothing of it was applied");
                    let msg = e.to_string();
                    for req in batch.drain(..) {
                        let _ = req.reply.send(Err(SubmitError::Failed(msg.clone())));
                    }
                }
            }
        }
        tracing::info!(next_seq = self.head.next_seq, "Ledger writer drained and stopped");
    }

    fn apply_batch(&mut self, batch: &[Request]) -> Result<Vec<Result<Applied, Rejection>>, LedgerError> {
        let mut head = self.head.clone();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut results = Vec::with_capacity(batch.len());
        for req in batch {
            let outcome = match req.command.validate(&self.ctx) {
                Err(rejection) => Err(rejection),
                Ok(body) => match plan(&tx, &self.ctx, body, self.hlc.actor())? {
                    Err(rejection) => Err(rejection),
                    Ok((body, effects)) => {
                        let (stamp, jump) = self.hlc.stamp((self.clock)());
                        report_jump(jump);
                        Ok(append(&tx, &mut head, &req.key, body, effects, stamp)?)
                    }
                },
            };
            results.push(outcome);
        }
        let (wall, logical) = self.hlc.last();
        let mut meta = tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?;
        meta.execute(params!["hlc_wall", wall as i64])?;
        meta.execute(params!["hlc_logical", i64::from(logical)])?;
        meta.execute(params!["change_version", head.change_version as i64])?;
        meta.execute(params!["head_seq", head.next_seq as i64 - 1])?;
        meta.execute(params!["head_hash", head.hash.to_vec()])?;
        drop(meta);
        tx.commit()?;
        self.head = head;
        Ok(results)
    }
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

/// Reads what the command needs (a count's observed stock, current slots) and plans its
/// writes, refusing it if a write would overflow. Nothing is written here.
fn plan(
    conn: &Connection,
    ctx: &StoreContext,
    body: EventBody,
    actor: &shared::ActorId,
) -> Result<Result<(EventBody, Vec<Effect>), Rejection>, LedgerError> {
    let body = match body {
        EventBody::Count { sku, counted, .. } => {
            let seen = projection::on_hand(conn, &ctx.store, &sku)?;
            let Some(movement) = counted.checked_sub(seen) else {
                return Ok(Err(Rejection::new(format!("count of {sku}: movement from {seen} to {counted} overflows"))));
            };
            EventBody::Count { sku, counted, seen, movement }
        }
        other => other,
    };
    let mut slots: BTreeMap<SlotKey, Slot> = BTreeMap::new();
    for (sku, movement) in body.stock_movements() {
        let key = SlotKey { store: ctx.store.clone(), sku: sku.clone(), actor: actor.clone() };
        let current = match slots.get(&key) {
            Some(s) => *s,
            None => projection::slot(conn, &key)?,
        };
        match current.apply(movement) {
            Some(next) => slots.insert(key, next),
            None => return Ok(Err(Rejection::new(format!("stock of {sku} would overflow with a movement of {movement}")))),
        };
    }
    let effects = slots.into_iter().map(|(k, s)| Effect::Slot(k, s)).collect();
    Ok(Ok((body, effects)))
}

/// Appends the event (or finds the first one with this key) and applies its effects.
fn append(
    conn: &Connection,
    head: &mut Head,
    key: &IdempotencyKey,
    body: EventBody,
    mut effects: Vec<Effect>,
    stamp: HlcStamp,
) -> Result<Applied, LedgerError> {
    let encoded = body.encode();
    let seq = head.next_seq;
    let hash = event_hash(&head.hash, seq, &stamp, body.kind(), key.as_str(), &encoded);
    let inserted = conn
        .prepare_cached(
            "INSERT INTO events (seq, hlc_wall, hlc_logical, actor, kind, idem_key, body, prev_hash, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (idem_key) DO NOTHING",
        )?
        .execute(params![
            seq as i64,
            stamp.wall_ms as i64,
            i64::from(stamp.logical),
            stamp.actor.as_str(),
            body.kind(),
            key.as_str(),
            encoded,
            head.hash.to_vec(),
            hash.to_vec()
        ])?;
    if inserted == 0 {
        return replay(conn, key);
    }
    head.next_seq += 1;
    head.hash = hash;
    match &body {
        EventBody::PriceChange { key, value } => {
            effects.push(Effect::Price(PriceEntry { key: key.clone(), value: value.clone(), stamp: stamp.clone() }))
        }
        EventBody::CatalogChange { sku, field } => {
            effects.push(Effect::Catalog(CatalogUpdate { sku: sku.clone(), field: field.clone(), stamp: stamp.clone() }))
        }
        _ => {}
    }
    for effect in effects {
        let version = head.change_version + 1;
        let changed = match effect {
            Effect::Slot(key, slot) => projection::write_slot(conn, &key, slot, version).map(|_| true)?,
            Effect::Price(entry) => projection::merge_price(conn, &entry, version)?,
            Effect::Catalog(update) => projection::merge_catalog(conn, &update, version)?,
        };
        if changed {
            head.change_version = version;
        }
    }
    Ok(Applied { seq, stamp, body, replayed: false })
}

fn replay(conn: &Connection, key: &IdempotencyKey) -> Result<Applied, LedgerError> {
    let found = conn
        .prepare_cached("SELECT seq, hlc_wall, hlc_logical, actor, body FROM events WHERE idem_key = ?1")?
        .query_row(params![key.as_str()], |r| Ok((r.get::<_, i64>(0)?, projection::stamp_from(r, 1), r.get::<_, Vec<u8>>(4)?)))
        .optional()?;
    let Some((seq, stamp, body)) = found else {
        return Err(LedgerError::Corrupt { seq: None, detail: format!("idempotency key {} conflicts but has no event", key.as_str()) });
    };
    let body = EventBody::decode(&body).map_err(|detail| LedgerError::Corrupt { seq: Some(seq as u64), detail })?;
    Ok(Applied { seq: seq as u64, stamp: stamp?, body, replayed: true })
}

pub(super) fn shared_clock() -> WallClock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    })
}
