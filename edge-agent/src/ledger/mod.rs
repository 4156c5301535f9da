//! The store's durable truth: an append-only, hash-chained event log in SQLite (WAL,
//! `synchronous=FULL`) with projections (stock slots, price registers, catalog fields, the
//! online allocation and pickup orders, and the outbox view over them) updated in the same
//! transaction as each event.
//!
//! [`Ledger::open`] opens and migrates the file; [`Ledger::start_writer`] hands the connection
//! to the single writer thread ([`writer`]); [`LedgerReader`] reads on separate connections
//! without blocking the writer, and also serves `storectl` read-only with the daemon down.

pub mod allocation;
pub mod chain;
pub mod command;
mod online;
pub mod order_views;
pub mod projection;
pub mod schema;
pub mod verify;
pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension};
use shared::sync::{Cursor, Push};
use shared::{ActorId, CatalogItem, Currency, Gtin, Hlc, OrderId, PriceEntry, Sku, Slot, StoreId};

use crate::orders::{AtRiskReport, OnlinePolicy, OnlineRow, OrderList, OrderSummary, StatusFilter};

pub use command::{Command, EventBody, IdempotencyKey, Rejection, SaleLine, StoreContext, Tender};
pub use verify::{ChainBreak, VerifyReport};
pub use writer::{Applied, Change, LedgerHandle, MergedPage, SubmitError, SyncAck, WriterStats, WriterThread};

/// File name of the ledger inside the data folder.
pub const LEDGER_FILE: &str = "ledger.db";

/// Source of wall-clock milliseconds (injectable so tests can boot "in 1970").
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot open {path}: {source}; check that the folder exists and the service user may write to it")]
    CannotOpen { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a readable SQLite database ({detail}); restore it from a backup or move it aside")]
    NotADatabase { path: PathBuf, detail: String },
    #[error("{path} is a SQLite database of another application (application_id {found:#x}), not a store-edge ledger; refusing to touch it")]
    Foreign { path: PathBuf, found: i32 },
    #[error("{path} has ledger schema version {found}, newer than this build knows ({known}); upgrade edge-agent")]
    TooNew { path: PathBuf, found: i64, known: i64 },
    #[error("{path} has ledger schema version {found}, older than this build reads ({known}); start edge-agent once to migrate it")]
    TooOld { path: PathBuf, found: i64, known: i64 },
    #[error("{path} is the ledger of store {found}, but this agent is configured as store {expected}")]
    WrongStore { path: PathBuf, found: String, expected: String },
    #[error("ledger data is corrupt{}: {detail}", seq.map(|s| format!(" at event {s}")).unwrap_or_default())]
    Corrupt { seq: Option<u64>, detail: String },
    #[error("ledger SQLite error: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl LedgerError {
    /// Whether the file itself is unusable (as opposed to a passing I/O failure).
    pub fn is_bad_file(&self) -> bool {
        matches!(
            self,
            LedgerError::NotADatabase { .. }
                | LedgerError::Foreign { .. }
                | LedgerError::TooNew { .. }
                | LedgerError::WrongStore { .. }
                | LedgerError::Corrupt { .. }
        )
    }
}

/// How to open a store's ledger.
#[derive(Clone)]
pub struct LedgerOptions {
    pub store: StoreId,
    pub currency: Currency,
    pub max_skew_ms: u64,
    pub jump_warn_ms: u64,
    pub batch_max: usize,
    pub queue_capacity: usize,
    pub clock: WallClock,
    /// How the writer keeps the online allocation topped up (off by default).
    pub online: OnlinePolicy,
}

impl LedgerOptions {
    pub fn new(store: StoreId, currency: Currency) -> LedgerOptions {
        LedgerOptions {
            store,
            currency,
            max_skew_ms: 300_000,
            jump_warn_ms: 60_000,
            batch_max: 1024,
            queue_capacity: 8192,
            clock: writer::shared_clock(),
            online: OnlinePolicy::default(),
        }
    }
}

/// An opened, migrated ledger, not yet writing.
pub struct Ledger {
    path: PathBuf,
    writer: writer::Writer,
}

impl Ledger {
    pub fn path_in(data_dir: &Path) -> PathBuf {
        data_dir.join(LEDGER_FILE)
    }

    /// Opens (or creates) the ledger in `data_dir` and restores the chain head and the HLC, so
    /// no sequence number or stamp is ever issued twice.
    pub fn open(data_dir: &Path, opts: &LedgerOptions) -> Result<Ledger, LedgerError> {
        let path = Self::path_in(data_dir);
        let (conn, actor) = schema::open_for_writing(&path, &opts.store)?;
        // Values read back from the file are checked, not cast: a hand-edited ledger must be
        // refused with the reason, never panic or make the writer reuse a sequence number.
        let corrupt = |detail: String| LedgerError::Corrupt { seq: None, detail };
        let meta_u64 = |key: &str| -> Result<u64, LedgerError> {
            let v =
                conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get::<_, i64>(0)).optional()?;
            u64::try_from(v.unwrap_or(0)).map_err(|_| corrupt(format!("meta {key} is negative")))
        };
        let last: Option<(i64, Vec<u8>)> = conn
            .query_row("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let (last_seq, hash) = match last {
            Some((seq, hash)) => {
                let seq = u64::try_from(seq).map_err(|_| corrupt(format!("event sequence {seq} is negative")))?;
                let hash: chain::Hash = hash
                    .try_into()
                    .map_err(|_| LedgerError::Corrupt { seq: Some(seq), detail: "hash is not 32 bytes".into() })?;
                (seq, hash)
            }
            None => (0, chain::GENESIS),
        };
        let recorded_head = meta_u64("head_seq")?;
        let recorded_hash: Option<Vec<u8>> =
            conn.query_row("SELECT value FROM meta WHERE key = 'head_hash'", [], |r| r.get(0)).optional()?;
        if recorded_head != last_seq || (last_seq > 0 && recorded_hash.as_deref() != Some(&hash[..])) {
            return Err(LedgerError::Corrupt {
                seq: Some(last_seq.min(recorded_head) + 1),
                detail: format!(
                    "the event log ends at {last_seq} but the ledger recorded its head at {recorded_head}; \
                     refusing to append (run `storectl ledger verify` and restore from a backup)"
                ),
            });
        }
        let next_seq = last_seq.checked_add(1).ok_or_else(|| corrupt("event sequence exhausted".into()))?;
        let head = writer::Head { next_seq, hash, change_version: meta_u64("change_version")? };
        let logical =
            u32::try_from(meta_u64("hlc_logical")?).map_err(|_| corrupt("meta hlc_logical is out of range".into()))?;
        let wall = meta_u64("hlc_wall")?;
        if wall > i64::MAX as u64 / 2 {
            return Err(corrupt(format!("meta hlc_wall {wall} is not a plausible time")));
        }
        let hlc = Hlc::resume(actor, opts.max_skew_ms, wall, logical).with_jump_threshold(opts.jump_warn_ms);
        // Which pickup orders are at risk already, so the first commit alerts only on new ones.
        // As of the writer's time: the wall clock, never behind the last stamp (a dead RTC).
        let now_ms = i64::try_from((opts.clock)().max(wall)).unwrap_or(i64::MAX);
        let at_risk = order_views::at_risk(&conn, &opts.store, now_ms)?
            .skus
            .into_iter()
            .map(|s| (s.sku, s.orders.into_iter().collect()))
            .collect();
        let escrow_seen = allocation::any_rows(&conn)?;
        tracing::info!(path = %path.display(), next_seq, "Ledger opened");
        Ok(Ledger {
            path,
            writer: writer::Writer {
                conn,
                head,
                hlc,
                ctx: StoreContext { store: opts.store.clone(), currency: opts.currency },
                clock: opts.clock.clone(),
                batch_max: opts.batch_max.max(1),
                own_slots: writer::OwnSlots::default(),
                synchronous: "FULL",
                policy: opts.online.clone(),
                at_risk,
                escrow_seen,
            },
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands the connection to the writer thread.
    pub fn start_writer(self, queue_capacity: usize) -> Result<(LedgerHandle, WriterThread), LedgerError> {
        writer::spawn(self.writer, queue_capacity)
    }
}

/// This store's sync state as committed in `meta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SyncPosition {
    /// Own changes up to here are held by the cloud.
    pub pushed_version: u64,
    /// Cloud rows up to here are merged.
    pub cursor: Cursor,
    /// The latest local change version.
    pub head_version: u64,
    /// This ledger has caught up with the cloud once (until then it asks for its own slots).
    pub bootstrapped: bool,
}

/// The actor the ledger was bound to when it was created (`meta.actor`).
fn meta_actor(conn: &Connection) -> Result<ActorId, LedgerError> {
    let actor: String = conn.query_row("SELECT value FROM meta WHERE key = 'actor'", [], |r| r.get(0))?;
    ActorId::new(actor).map_err(|e| LedgerError::Corrupt { seq: None, detail: format!("meta actor: {e}") })
}

fn sync_position(conn: &Connection) -> Result<SyncPosition, LedgerError> {
    let meta = |key: &str| -> Result<u64, LedgerError> {
        let v: Option<i64> = conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?;
        u64::try_from(v.unwrap_or(0))
            .map_err(|_| LedgerError::Corrupt { seq: None, detail: format!("meta {key} is negative") })
    };
    Ok(SyncPosition {
        pushed_version: meta("pushed_version")?,
        cursor: Cursor { chain: meta("cursor_chain")?, store: meta("cursor_store")? },
        head_version: meta("change_version")?,
        bootstrapped: meta("bootstrapped")? == 1,
    })
}

/// Stock of one SKU as the ledger sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StockView {
    pub store: String,
    pub sku: String,
    pub on_hand: i64,
    pub slots: Vec<(String, Slot)>,
}

/// A read-only connection to a ledger: for projections beside the writer, and for storectl.
pub struct LedgerReader {
    conn: Connection,
    store: StoreId,
}

/// One event as stored, for export.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EventRow {
    pub seq: u64,
    pub hlc_wall_ms: u64,
    pub hlc_logical: u32,
    pub actor: String,
    pub kind: String,
    pub idem_key: String,
    pub body: EventBody,
    pub hash: String,
}

impl LedgerReader {
    pub fn open(data_dir: &Path) -> Result<LedgerReader, LedgerError> {
        LedgerReader::open_file(&Ledger::path_in(data_dir))
    }

    /// Opens a ledger file by its own path (a backup, say).
    pub fn open_file(path: &Path) -> Result<LedgerReader, LedgerError> {
        let conn = schema::open_read_only(path)?;
        let store: String = conn.query_row("SELECT value FROM meta WHERE key = 'store'", [], |r| r.get(0))?;
        let store = StoreId::new(store).map_err(|e| LedgerError::Corrupt { seq: None, detail: e.to_string() })?;
        Ok(LedgerReader { conn, store })
    }

    pub fn store(&self) -> &StoreId {
        &self.store
    }

    pub fn stock(&self, sku: &Sku) -> Result<StockView, LedgerError> {
        let slots = projection::slots_of(&self.conn, &self.store, sku)?;
        let on_hand = projection::on_hand(&self.conn, &self.store, sku)?;
        Ok(StockView {
            store: self.store.to_string(),
            sku: sku.to_string(),
            on_hand,
            slots: slots.into_iter().map(|(a, s)| (a.to_string(), s)).collect(),
        })
    }

    pub fn prices(&self, sku: &Sku) -> Result<Vec<PriceEntry>, LedgerError> {
        projection::prices_of(&self.conn, sku)
    }

    pub fn catalog_item(&self, sku: &Sku) -> Result<Option<CatalogItem>, LedgerError> {
        projection::catalog_item(&self.conn, sku)
    }

    pub fn skus_by_gtin(&self, gtin: &Gtin) -> Result<Vec<Sku>, LedgerError> {
        projection::skus_by_gtin(&self.conn, gtin)
    }

    pub fn event_count(&self) -> Result<u64, LedgerError> {
        Ok(self.conn.query_row("SELECT count(*) FROM events", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Rows of this store's own writes not yet acknowledged by the cloud.
    pub fn outbox_depth(&self) -> Result<u64, LedgerError> {
        Ok(self.conn.query_row("SELECT count(*) FROM outbox", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// The event with this idempotency key, if any: `(seq, kind)`.
    pub fn event_by_key(&self, key: &str) -> Result<Option<(u64, EventBody)>, LedgerError> {
        let row: Option<(i64, Vec<u8>)> = self
            .conn
            .query_row("SELECT seq, body FROM events WHERE idem_key = ?1", [key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        row.map(|(seq, body)| {
            EventBody::decode(&body)
                .map(|b| (seq as u64, b))
                .map_err(|detail| LedgerError::Corrupt { seq: Some(seq as u64), detail })
        })
        .transpose()
    }

    /// Verifies one consistent snapshot, even while the writer appends.
    /// Whether this EPC left with a sale.
    pub fn is_sold(&self, epc: &[u8]) -> Result<bool, LedgerError> {
        Ok(self.conn.query_row("SELECT 1 FROM sold_epcs WHERE epc = ?1", [epc], |_| Ok(())).optional()?.is_some())
    }

    /// The saved basket in progress of a lane, if any.
    pub fn lane_basket(&self, lane: &str) -> Result<Option<Vec<u8>>, LedgerError> {
        Ok(self.conn.query_row("SELECT basket FROM lane_baskets WHERE lane = ?1", [lane], |r| r.get(0)).optional()?)
    }

    /// Every event in sequence order, from one snapshot, handed to `each` (which may stop the
    /// walk by returning an error).
    pub fn for_each_event<E: From<LedgerError>>(
        &self,
        mut each: impl FnMut(EventRow) -> Result<(), E>,
    ) -> Result<(), E> {
        let snapshot = self.conn.unchecked_transaction().map_err(LedgerError::from)?;
        let mut stmt = snapshot
            .prepare("SELECT seq, hlc_wall, hlc_logical, actor, kind, idem_key, body, hash FROM events ORDER BY seq")
            .map_err(LedgerError::from)?;
        let mut rows = stmt.query([]).map_err(LedgerError::from)?;
        while let Some(row) = rows.next().map_err(LedgerError::from)? {
            let seq: i64 = row.get(0).map_err(LedgerError::from)?;
            let corrupt = |detail: String| LedgerError::Corrupt { seq: u64::try_from(seq).ok(), detail };
            let stamp = projection::stamp_from(row, 1)?;
            let body: Vec<u8> = row.get(6).map_err(LedgerError::from)?;
            let hash: Vec<u8> = row.get(7).map_err(LedgerError::from)?;
            each(EventRow {
                seq: u64::try_from(seq).map_err(|_| corrupt(format!("negative sequence {seq}")))?,
                hlc_wall_ms: stamp.wall_ms,
                hlc_logical: stamp.logical,
                actor: stamp.actor.to_string(),
                kind: row.get(4).map_err(LedgerError::from)?,
                idem_key: row.get(5).map_err(LedgerError::from)?,
                body: EventBody::decode(&body).map_err(corrupt)?,
                hash: chain::hex(&hash),
            })?;
        }
        Ok(())
    }

    /// SQLite's own consistency check of the file (pages, indexes): `Ok(())` or what is wrong.
    pub fn integrity_check(&self) -> Result<Result<(), String>, LedgerError> {
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        let lines: Vec<String> = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(if lines == ["ok"] { Ok(()) } else { Err(lines.join("; ")) })
    }

    /// Writes a consistent copy of the ledger to `target` while the daemon keeps writing
    /// (`VACUUM INTO` reads one snapshot). Refuses to overwrite an existing file. The copy is
    /// marked as a backup ([`schema::mark_as_backup`]: a ledger restored from it writes as a
    /// new actor and catches up with the cloud first) before it takes its name, so a copy
    /// under `target` is always a marked one; a failed attempt leaves no file there.
    pub fn backup_to(&self, target: &Path) -> Result<(), LedgerError> {
        let exists = |path: &Path| LedgerError::CannotOpen {
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the backup file exists already; choose a new name",
            ),
        };
        if target.exists() {
            return Err(exists(target));
        }
        let mut partial = target.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let partial_text = partial.to_str().ok_or_else(|| LedgerError::CannotOpen {
            path: target.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path is not valid UTF-8"),
        })?;
        // Left over from an attempt that died: only ever an unmarked, unnamed copy.
        let journal = PathBuf::from(format!("{partial_text}-journal"));
        let _ = std::fs::remove_file(&partial);
        let _ = std::fs::remove_file(&journal);
        let written = self
            .conn
            .execute("VACUUM INTO ?1", [partial_text])
            .map_err(LedgerError::from)
            .and_then(|_| schema::mark_as_backup(&partial))
            .and_then(|_| {
                // On disk before it takes its name (the mark's commit syncs it too, under the
                // default `synchronous`; this does not depend on that).
                std::fs::File::open(&partial)
                    .and_then(|f| f.sync_all())
                    .map_err(|source| LedgerError::CannotOpen { path: partial.clone(), source })
            })
            // A link, not a rename: it fails if a file took the name meanwhile, never replaces
            // it. A file system without hard links (a FAT backup stick) gets a rename after a
            // last check that the name is free.
            .and_then(|_| match std::fs::hard_link(&partial, target) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(exists(target)),
                Err(_) if target.exists() => Err(exists(target)),
                Err(_) => std::fs::rename(&partial, target)
                    .map_err(|source| LedgerError::CannotOpen { path: target.to_owned(), source }),
            });
        let _ = std::fs::remove_file(&partial);
        written?;
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        // The new name on disk too.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| LedgerError::CannotOpen { path: dir.to_owned(), source })?;
        Ok(())
    }

    /// Where this store stands with the cloud, as committed.
    pub fn sync_position(&self) -> Result<SyncPosition, LedgerError> {
        sync_position(&self.conn)
    }

    /// The actor this ledger writes with (its own slots, its stamps).
    pub fn actor(&self) -> Result<ActorId, LedgerError> {
        meta_actor(&self.conn)
    }

    /// The next page of this store's own changes the cloud has not acknowledged, at most
    /// `max_rows` rows (a page may end inside no version: each change has its own), or `None`
    /// when everything is acknowledged. Read from one snapshot.
    pub fn push_page(&self, max_rows: u32) -> Result<Option<Push>, LedgerError> {
        let snapshot = self.conn.unchecked_transaction()?;
        let position = sync_position(&snapshot)?;
        let cutoff: Option<i64> = snapshot
            .query_row(
                "SELECT version FROM outbox ORDER BY version LIMIT 1 OFFSET ?1",
                [i64::from(max_rows.max(1)) - 1],
                |r| r.get(0),
            )
            .optional()?;
        let to = match cutoff {
            Some(v) => u64::try_from(v)
                .map_err(|_| LedgerError::Corrupt { seq: None, detail: format!("negative change version {v}") })?,
            None => position.head_version,
        };
        if to <= position.pushed_version {
            return Ok(None);
        }
        let rows = projection::own_rows(&snapshot, &self.store, position.pushed_version, to)?;
        if rows.is_empty() && cutoff.is_none() {
            // Versions moved only by merges of other actors' rows: nothing of ours to send.
            return Ok(None);
        }
        Ok(Some(Push { from_version: position.pushed_version, to_version: to, rows }))
    }

    pub fn verify(&self) -> Result<Result<VerifyReport, ChainBreak>, LedgerError> {
        let snapshot = self.conn.unchecked_transaction()?;
        verify::verify(&snapshot)
    }

    /// The pickup orders `filter` keeps (statuses as of `now_ms`), from one snapshot.
    pub fn orders(&self, filter: StatusFilter, now_ms: i64) -> Result<OrderList, LedgerError> {
        let snapshot = self.conn.unchecked_transaction()?;
        order_views::list(&snapshot, &self.store, filter, now_ms)
    }

    /// One pickup order, if it has reached this store.
    pub fn order(&self, order: &OrderId, now_ms: i64) -> Result<Option<OrderSummary>, LedgerError> {
        let snapshot = self.conn.unchecked_transaction()?;
        order_views::one(&snapshot, &self.store, order, now_ms)
    }

    /// The pickup orders whose units the store does not have on hand, as of `now_ms` (which
    /// orders keep their cover depends on the pickup deadlines).
    pub fn orders_at_risk(&self, now_ms: i64) -> Result<AtRiskReport, LedgerError> {
        let snapshot = self.conn.unchecked_transaction()?;
        order_views::at_risk(&snapshot, &self.store, now_ms)
    }

    /// The online allocation of one SKU or of all that have one; with `policy`, also the target,
    /// the safety stock and what is free to grant.
    pub fn online_status(
        &self,
        sku: Option<&Sku>,
        policy: Option<&OnlinePolicy>,
    ) -> Result<Vec<OnlineRow>, LedgerError> {
        let snapshot = self.conn.unchecked_transaction()?;
        order_views::online(&snapshot, &self.store, sku, policy)
    }
}
