//! SQLite backend (embedded default). One connection is owned by one thread and fed through a
//! bounded queue: writes are serialized, so partition versions become visible in the order they
//! are assigned (DESIGN 13.1) without extra locking, and async callers never block a runtime
//! thread on SQLite. WAL with `synchronous=FULL`: an acknowledged push survives a power cut.

use std::collections::{BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use shared::sync::{Cursor, Push, Rows, SlotGroup};
use shared::{
    ActorId, CatalogUpdate, EscrowRow, HlcStamp, OrderId, PriceEntry, PriceKey, Sku, Slot, SlotKey, SlotRow, StoreId,
};
use tokio::sync::{mpsc, oneshot};

use super::codec::{
    self, invariant, parse_actor, parse_order, parse_reason, parse_sku, parse_store, price_partition, store_partition,
    to_i64, to_u64, CatalogColumns, EscrowColumns, EscrowId, PriceColumns, SlotColumns, StampColumns, CHAIN,
    CLOUD_ESCROW_KINDS,
};
use super::plan::{self, CatalogKey, Pulled, PulledRow, Versions};
use super::{
    Allocation, CancelOutcome, CancelReason, CloudWrites, CreateOutcome, HeldPrice, NewOrder, OrderRecord, Page,
    PriceWrite, Principal, SecurityEvent, Storage, StorageError, StoreStatus, SyncReport, WritesApplied,
    SCHEMA_VERSION,
};
use crate::orders::OrderState;

/// `PRAGMA application_id` of a cloud-sync database: "SECS" (the edge ledger is "SEDG").
pub const APPLICATION_ID: i32 = 0x5345_4353;

/// Requests waiting for the database thread. When full, callers wait for room (backpressure
/// on the HTTP handlers) rather than queueing without bound.
const QUEUE_CAPACITY: usize = 256;

/// Schema migrations, applied in order; `PRAGMA user_version` counts how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: stores, sync state, replicated rows, HQ bookkeeping.
    "
    CREATE TABLE stores (
        id           TEXT    PRIMARY KEY,
        token_sha256 BLOB    NOT NULL UNIQUE,
        created_ms   INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE admins (
        name         TEXT    PRIMARY KEY,
        token_sha256 BLOB    NOT NULL UNIQUE,
        created_ms   INTEGER NOT NULL
    ) STRICT;

    -- One version counter per partition ('chain', 'store:{id}'), bumped by every write.
    CREATE TABLE counters (partition TEXT PRIMARY KEY, version INTEGER NOT NULL) STRICT, WITHOUT ROWID;
    INSERT INTO counters (partition, version) VALUES ('chain', 0);

    -- The cloud's HLC: the last stamp issued or observed.
    CREATE TABLE clock (id INTEGER PRIMARY KEY CHECK (id = 0), wall INTEGER NOT NULL, logical INTEGER NOT NULL) STRICT;
    INSERT INTO clock (id, wall, logical) VALUES (0, 0, 0);

    -- PN-counter slots; partition 'store:{store}'.
    CREATE TABLE stock_slots (
        store   TEXT    NOT NULL,
        sku     TEXT    NOT NULL,
        actor   TEXT    NOT NULL,
        inc     INTEGER NOT NULL CHECK (inc >= 0),
        dec     INTEGER NOT NULL CHECK (dec >= 0),
        version INTEGER NOT NULL,
        PRIMARY KEY (store, sku, actor)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX stock_slots_by_version ON stock_slots (store, version);
    CREATE INDEX stock_slots_by_sku ON stock_slots (sku);

    -- LWW price registers; amount NULL = withdrawn. partition = the scope's partition.
    CREATE TABLE prices (
        sku         TEXT    NOT NULL,
        scope       TEXT    NOT NULL,
        slot        TEXT    NOT NULL,
        amount      INTEGER,
        currency    TEXT,
        win_from    INTEGER,
        win_until   INTEGER,
        hlc_wall    INTEGER NOT NULL,
        hlc_logical INTEGER NOT NULL,
        actor       TEXT    NOT NULL,
        partition   TEXT    NOT NULL,
        version     INTEGER NOT NULL,
        PRIMARY KEY (sku, scope, slot)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX prices_by_version ON prices (partition, version);

    -- Per-field LWW catalog, all in partition 'chain'; value = postcard CatalogField.
    CREATE TABLE catalog (
        sku         TEXT    NOT NULL,
        field       TEXT    NOT NULL,
        value       BLOB    NOT NULL,
        hlc_wall    INTEGER NOT NULL,
        hlc_logical INTEGER NOT NULL,
        actor       TEXT    NOT NULL,
        version     INTEGER NOT NULL,
        PRIMARY KEY (sku, field)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX catalog_by_version ON catalog (version);

    CREATE TABLE sync_state (
        store         TEXT    PRIMARY KEY,
        head_version  INTEGER NOT NULL DEFAULT 0,
        acked_version INTEGER NOT NULL DEFAULT 0,
        cursor_chain  INTEGER NOT NULL DEFAULT 0,
        cursor_store  INTEGER NOT NULL DEFAULT 0,
        last_seen_ms  INTEGER,
        refused_rows  INTEGER NOT NULL DEFAULT 0
    ) STRICT;

    CREATE TABLE security_events (
        id     INTEGER PRIMARY KEY,
        at_ms  INTEGER NOT NULL,
        store  TEXT,
        kind   TEXT    NOT NULL,
        detail TEXT    NOT NULL
    ) STRICT;

    -- AUTOINCREMENT: an id is never reused, so a stale confirmation cannot hit a newer hold.
    CREATE TABLE held_prices (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        sku        TEXT    NOT NULL,
        scope      TEXT    NOT NULL,
        slot       TEXT    NOT NULL,
        amount     INTEGER,
        currency   TEXT,
        win_from   INTEGER,
        win_until  INTEGER,
        reason     TEXT    NOT NULL,
        held_at_ms INTEGER NOT NULL
    ) STRICT;

    -- CloudWrites::op_id already applied, with the first stamp they were given.
    CREATE TABLE applied_ops (
        op_id         TEXT    PRIMARY KEY,
        applied_ms    INTEGER NOT NULL,
        stamp_wall    INTEGER,
        stamp_logical INTEGER
    ) STRICT;
    ",
    // 2: online pickup orders (DESIGN 5, 13.5), in the store's partition.
    "
    -- shared::escrow::EscrowRow: 'granted' and 'fulfilled' are the store's, 'released' and
    -- 'reservation' the cloud's. order_id is '' for granted and released; units holds the
    -- granted or released count or the reservation's units (0 for fulfilled).
    CREATE TABLE escrow_rows (
        store     TEXT    NOT NULL,
        sku       TEXT    NOT NULL,
        kind      TEXT    NOT NULL CHECK (kind IN ('granted', 'released', 'reservation', 'fulfilled')),
        order_id  TEXT    NOT NULL,
        units     INTEGER NOT NULL CHECK (units >= 0),
        seq       INTEGER NOT NULL CHECK (seq >= 0),
        cancelled INTEGER NOT NULL CHECK (cancelled IN (0, 1)),
        version   INTEGER NOT NULL,
        PRIMARY KEY (store, sku, kind, order_id)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX escrow_rows_by_version ON escrow_rows (store, version);

    -- Online orders: the replicated header (postcard shared::OrderHeader; its version is in the
    -- store's partition, 0 only inside the creating transaction), then what only the cloud keeps.
    CREATE TABLE orders (
        order_id       TEXT    PRIMARY KEY,
        store          TEXT    NOT NULL,
        header         BLOB    NOT NULL,
        version        INTEGER NOT NULL,
        created_ms     INTEGER NOT NULL,
        expires_ms     INTEGER NOT NULL,
        pickup_code    TEXT    NOT NULL,
        cancel_reason  TEXT    CHECK (cancel_reason IN ('cancelled', 'expired')),
        cancelled_ms   INTEGER,
        handed_over_ms INTEGER
    ) STRICT;
    CREATE INDEX orders_by_version ON orders (store, version);
    CREATE INDEX orders_by_store ON orders (store, created_ms);
    CREATE INDEX orders_due ON orders (expires_ms) WHERE cancel_reason IS NULL AND handed_over_ms IS NULL;
    ",
    // 3: per (store, sku), the sum of every reservation's units and the last seq given, kept by
    // the transaction that writes a reservation (the only writer of either), so an order's
    // creation reads one row per line instead of the SKU's whole reservation history.
    "
    CREATE TABLE escrow_totals (
        store    TEXT    NOT NULL,
        sku      TEXT    NOT NULL,
        reserved INTEGER NOT NULL CHECK (reserved >= 0),
        last_seq INTEGER NOT NULL CHECK (last_seq >= 0),
        PRIMARY KEY (store, sku)
    ) STRICT, WITHOUT ROWID;
    INSERT INTO escrow_totals (store, sku, reserved, last_seq)
        SELECT store, sku, sum(units), max(seq) FROM escrow_rows WHERE kind = 'reservation' GROUP BY store, sku;
    ",
    // 4: the actor of the ledger each store last synced with, so its pending rows are what
    // that ledger would pull.
    "ALTER TABLE sync_state ADD COLUMN ledger_actor TEXT;",
];

const _: () = assert!(MIGRATIONS.len() as i64 == SCHEMA_VERSION, "one migration per schema version");

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Clone it freely: every clone talks to the same database thread.
#[derive(Clone)]
pub struct SqliteStorage {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for SqliteStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStorage").finish_non_exhaustive()
    }
}

impl SqliteStorage {
    /// Opens (creating if needed) the database file; [`Storage::migrate`] creates the schema.
    pub fn open(path: &Path) -> Result<SqliteStorage, StorageError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StorageError::Task(format!(
                "{}: the file system refused WAL mode (got {mode}); use a local disk",
                path.display()
            )));
        }
        // Stock and money: a commit reaches the disk before the store hears "acknowledged".
        conn.pragma_update(None, "synchronous", "FULL")?;
        let (jobs, queue) = mpsc::channel(QUEUE_CAPACITY);
        std::thread::Builder::new()
            .name("cloud-sqlite".into())
            .spawn(move || serve(conn, queue))
            .map_err(|e| StorageError::Task(format!("cannot start the SQLite thread: {e}")))?;
        Ok(SqliteStorage { jobs })
    }

    /// Runs `f` on the database thread and waits for its answer.
    async fn call<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StorageError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            // The caller may have gone away (a cancelled request): nobody to tell.
            let _ = reply.send(f(conn));
        });
        self.jobs.send(job).await.map_err(|_| StorageError::Task("the SQLite thread has stopped".into()))?;
        answer.await.map_err(|_| StorageError::Task("the SQLite thread dropped the request (it panicked)".into()))?
    }

    /// One write transaction. IMMEDIATE takes the write lock at once, so a transaction never
    /// fails half-way on a lock upgrade.
    async fn write<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction) -> Result<T, StorageError> + Send + 'static,
    {
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    /// One consistent read.
    async fn read<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction) -> Result<T, StorageError> + Send + 'static,
    {
        self.call(move |conn| {
            let tx = conn.transaction()?;
            f(&tx)
        })
        .await
    }
}

fn serve(mut conn: Connection, mut queue: mpsc::Receiver<Job>) {
    while let Some(job) = queue.blocking_recv() {
        // A panicking request must not take every later one down with the thread: its
        // transaction rolled back while unwinding, and its caller sees the reply dropped.
        if std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut conn))).is_err() {
            tracing::error!("A cloud-sync SQLite request panicked; serving the next one");
        }
    }
}

// ---- schema ----

fn migrate(conn: &mut Connection) -> Result<(), StorageError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
    let app_id: i32 = tx.pragma_query_value(None, "application_id", |r| r.get(0))?;
    let found: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let tables: i64 = tx.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
    if app_id != APPLICATION_ID && !(app_id == 0 && found == 0 && tables == 0) {
        return Err(codec::corrupt(
            "database identity",
            format!(
                "application_id {app_id:#x} is not a cloud-sync database ({APPLICATION_ID:#x}); refusing to touch it"
            ),
        ));
    }
    if found > SCHEMA_VERSION {
        return Err(StorageError::TooNew { found, known: SCHEMA_VERSION });
    }
    let from = usize::try_from(found).map_err(|_| codec::corrupt("schema version", found))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(from) {
        tx.execute_batch(sql)?;
        tracing::info!(schema_version = i + 1, "cloud-sync SQLite schema migrated");
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

// ---- versions and clock ----

/// Reads the counters of `parts` (creating missing ones). The IMMEDIATE transaction already
/// holds the only write lock, so nobody else bumps them before commit.
fn lock_partitions(tx: &Transaction, parts: &BTreeSet<String>) -> Result<Versions, StorageError> {
    let mut create =
        tx.prepare_cached("INSERT INTO counters (partition, version) VALUES (?1, 0) ON CONFLICT DO NOTHING")?;
    let mut read = tx.prepare_cached("SELECT version FROM counters WHERE partition = ?1")?;
    let mut heads = Vec::with_capacity(parts.len());
    for p in parts {
        create.execute([p])?;
        let v: i64 = read.query_row([p], |r| r.get(0))?;
        heads.push((p.clone(), to_u64(&format!("version counter of {p}"), v)?));
    }
    Ok(Versions::new(heads))
}

fn save_versions(tx: &Transaction, versions: &Versions) -> Result<(), StorageError> {
    let mut stmt = tx.prepare_cached("UPDATE counters SET version = ?2 WHERE partition = ?1")?;
    for (p, v) in versions.moved() {
        stmt.execute(params![p, to_i64(p, v)?])?;
    }
    Ok(())
}

fn load_clock(tx: &Transaction) -> Result<shared::Hlc, StorageError> {
    let (wall, logical): (i64, i64) =
        tx.query_row("SELECT wall, logical FROM clock WHERE id = 0", [], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let logical = u32::try_from(logical).map_err(|_| codec::corrupt("cloud clock", logical))?;
    Ok(plan::cloud_clock(to_u64("cloud clock", wall)?, logical))
}

fn save_clock(tx: &Transaction, clock: &shared::Hlc) -> Result<(), StorageError> {
    let (wall, logical) = clock.last();
    tx.execute(
        "UPDATE clock SET wall = ?1, logical = ?2 WHERE id = 0",
        params![to_i64("cloud clock", wall)?, i64::from(logical)],
    )?;
    Ok(())
}

/// Raises the clock row to `stamp` when it is ahead, so later cloud stamps order after it.
fn observe_clock(tx: &Transaction, stamp: &HlcStamp) -> Result<(), StorageError> {
    tx.execute(
        "UPDATE clock SET wall = ?1, logical = ?2 WHERE id = 0 AND (wall < ?1 OR (wall = ?1 AND logical < ?2))",
        params![to_i64("observed stamp", stamp.wall_ms)?, i64::from(stamp.logical)],
    )?;
    Ok(())
}

// ---- rows ----

fn stamp_at(row: &Row, first: usize) -> rusqlite::Result<StampColumns> {
    Ok(StampColumns { wall: row.get(first)?, logical: row.get(first + 1)?, actor: row.get(first + 2)? })
}

fn slot_at(row: &Row, first: usize) -> rusqlite::Result<SlotColumns> {
    Ok(SlotColumns {
        store: row.get(first)?,
        sku: row.get(first + 1)?,
        actor: row.get(first + 2)?,
        inc: row.get(first + 3)?,
        dec: row.get(first + 4)?,
    })
}

fn price_at(row: &Row, first: usize) -> rusqlite::Result<PriceColumns> {
    Ok(PriceColumns {
        sku: row.get(first)?,
        scope: row.get(first + 1)?,
        slot: row.get(first + 2)?,
        amount: row.get(first + 3)?,
        currency: row.get(first + 4)?,
        win_from: row.get(first + 5)?,
        win_until: row.get(first + 6)?,
    })
}

fn catalog_at(row: &Row, first: usize) -> rusqlite::Result<CatalogColumns> {
    Ok(CatalogColumns { sku: row.get(first)?, field: row.get(first + 1)?, value: row.get(first + 2)? })
}

const SLOT_COLUMNS: &str = "store, sku, actor, inc, dec";
const PRICE_COLUMNS: &str = "sku, scope, slot, amount, currency, win_from, win_until, hlc_wall, hlc_logical, actor";
const CATALOG_COLUMNS: &str = "sku, field, value, hlc_wall, hlc_logical, actor";

fn price_entry(row: &Row) -> Result<PriceEntry, StorageError> {
    price_at(row, 0)?.entry(stamp_at(row, 7)?)
}

fn catalog_update(row: &Row) -> Result<CatalogUpdate, StorageError> {
    catalog_at(row, 0)?.update(stamp_at(row, 3)?)
}

const ESCROW_COLUMNS: &str = "store, sku, kind, order_id, units, seq, cancelled";

fn escrow_at(row: &Row, first: usize) -> rusqlite::Result<EscrowColumns> {
    Ok(EscrowColumns {
        store: row.get(first)?,
        sku: row.get(first + 1)?,
        kind: row.get(first + 2)?,
        order_id: row.get(first + 3)?,
        units: row.get(first + 4)?,
        seq: row.get(first + 5)?,
        cancelled: row.get(first + 6)?,
    })
}

fn escrow_row(row: &Row) -> Result<EscrowRow, StorageError> {
    escrow_at(row, 0)?.row()
}

/// Collects a query's rows through a fallible decoder (rusqlite's `query_map` cannot return
/// our error type).
fn collect<T>(
    stmt: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
    decode: impl Fn(&Row) -> Result<T, StorageError>,
) -> Result<Vec<T>, StorageError> {
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(decode(row)?);
    }
    Ok(out)
}

fn load_slots<'a>(
    tx: &Transaction,
    keys: impl IntoIterator<Item = &'a SlotKey>,
) -> Result<HashMap<SlotKey, Slot>, StorageError> {
    let mut stmt =
        tx.prepare_cached("SELECT inc, dec FROM stock_slots WHERE store = ?1 AND sku = ?2 AND actor = ?3")?;
    let mut out = HashMap::new();
    for key in keys {
        let found: Option<(i64, i64)> = stmt
            .query_row(params![key.store.as_str(), key.sku.as_str(), key.actor.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        if let Some((inc, dec)) = found {
            let what = format!("stock slot {key}");
            out.insert(key.clone(), Slot { inc: to_u64(&what, inc)?, dec: to_u64(&what, dec)? });
        }
    }
    Ok(out)
}

/// Merges pushed slots in one statement a row: an upsert taking the per-field max that only
/// writes (and only takes a version) when a field grows, the same rule as `Slot::merge`. This
/// is the hot path of a store's push (tens of thousands of rows after a day offline).
fn merge_slot_groups(tx: &Transaction, groups: &[SlotGroup], versions: &mut Versions) -> Result<(), StorageError> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO stock_slots (store, sku, actor, inc, dec, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (store, sku, actor) DO UPDATE
            SET inc = max(inc, excluded.inc), dec = max(dec, excluded.dec), version = excluded.version
          WHERE excluded.inc > inc OR excluded.dec > dec",
    )?;
    for group in groups {
        let partition = store_partition(&group.store);
        for s in &group.slots {
            let count = |v: u64| {
                i64::try_from(v).map_err(|_| {
                    StorageError::Corrupt(format!(
                        "stock slot {}/{}/{}: count {v} is out of range",
                        group.store, s.sku, group.actor
                    ))
                })
            };
            let version = to_i64("version", versions.peek(&partition)?)?;
            let (store, sku, actor) = (group.store.as_str(), s.sku.as_str(), group.actor.as_str());
            if stmt.execute(params![store, sku, actor, count(s.inc)?, count(s.dec)?, version])? > 0 {
                versions.next(&partition)?;
            }
        }
    }
    Ok(())
}

fn write_slots(tx: &Transaction, rows: &[SlotRow], versions: &mut Versions) -> Result<(), StorageError> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO stock_slots (store, sku, actor, inc, dec, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (store, sku, actor) DO UPDATE SET inc = excluded.inc, dec = excluded.dec, version = excluded.version",
    )?;
    for row in rows {
        let version = versions.next(&store_partition(&row.key.store))?;
        let c = SlotColumns::of(row)?;
        stmt.execute(params![c.store, c.sku, c.actor, c.inc, c.dec, to_i64("version", version)?])?;
    }
    Ok(())
}

fn load_prices<'a>(
    tx: &Transaction,
    keys: impl IntoIterator<Item = &'a PriceKey>,
) -> Result<HashMap<PriceKey, PriceEntry>, StorageError> {
    let mut stmt =
        tx.prepare_cached(&format!("SELECT {PRICE_COLUMNS} FROM prices WHERE sku = ?1 AND scope = ?2 AND slot = ?3"))?;
    let mut out = HashMap::new();
    for key in keys {
        let key_params = params![key.sku.as_str(), key.scope.to_string(), key.slot.as_str()];
        for entry in collect(&mut stmt, key_params, price_entry)? {
            out.insert(entry.key.clone(), entry);
        }
    }
    Ok(out)
}

fn write_prices(tx: &Transaction, entries: &[PriceEntry], versions: &mut Versions) -> Result<(), StorageError> {
    let mut stmt = tx.prepare_cached(&format!(
        "INSERT OR REPLACE INTO prices ({PRICE_COLUMNS}, partition, version)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
    ))?;
    for e in entries {
        let partition = price_partition(&e.key.scope);
        let version = versions.next(&partition)?;
        let p = PriceColumns::of(&e.key, e.value.as_ref())?;
        let s = StampColumns::of(&e.stamp)?;
        stmt.execute(params![
            p.sku,
            p.scope,
            p.slot,
            p.amount,
            p.currency,
            p.win_from,
            p.win_until,
            s.wall,
            s.logical,
            s.actor,
            partition,
            to_i64("version", version)?
        ])?;
    }
    Ok(())
}

fn load_catalog<'a>(
    tx: &Transaction,
    keys: impl IntoIterator<Item = &'a CatalogKey>,
) -> Result<HashMap<CatalogKey, CatalogUpdate>, StorageError> {
    let mut stmt =
        tx.prepare_cached(&format!("SELECT {CATALOG_COLUMNS} FROM catalog WHERE sku = ?1 AND field = ?2"))?;
    let mut out = HashMap::new();
    for (sku, field) in keys {
        for update in collect(&mut stmt, params![sku.as_str(), field], catalog_update)? {
            out.insert(plan::catalog_key(&update), update);
        }
    }
    Ok(out)
}

fn write_catalog(tx: &Transaction, updates: &[CatalogUpdate], versions: &mut Versions) -> Result<(), StorageError> {
    let mut stmt = tx.prepare_cached(&format!(
        "INSERT OR REPLACE INTO catalog ({CATALOG_COLUMNS}, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
    ))?;
    for u in updates {
        let version = versions.next(CHAIN)?;
        let c = CatalogColumns::of(u)?;
        let s = StampColumns::of(&u.stamp)?;
        stmt.execute(params![c.sku, c.field, c.value, s.wall, s.logical, s.actor, to_i64("version", version)?])?;
    }
    Ok(())
}

/// Merges prices and catalog fields by LWW and writes those that win.
fn merge_registers(
    tx: &Transaction,
    prices: &[PriceEntry],
    catalog: &[CatalogUpdate],
    versions: &mut Versions,
) -> Result<(), StorageError> {
    let current = load_prices(tx, prices.iter().map(|p| &p.key))?;
    write_prices(tx, &plan::merge_prices(&current, prices), versions)?;
    let keys: Vec<CatalogKey> = catalog.iter().map(plan::catalog_key).collect();
    let current = load_catalog(tx, &keys)?;
    write_catalog(tx, &plan::merge_catalog(&current, catalog), versions)
}

// ---- push ----

/// [`SyncReport`] owned, to cross to the database thread.
struct Report {
    store: StoreId,
    sender: ActorId,
    push: Option<Push>,
    head_version: u64,
    cursor: Cursor,
    max_stamp: Option<HlcStamp>,
    now_ms: u64,
}

fn merge_push(tx: &Transaction, rows: &Rows, now_ms: u64) -> Result<(), StorageError> {
    let mut versions = lock_partitions(tx, &plan::partitions_of(rows))?;
    merge_slot_groups(tx, &rows.stock, &mut versions)?;
    merge_registers(tx, &rows.prices, &rows.catalog, &mut versions)?;
    merge_escrow(tx, &rows.escrow, &mut versions, now_ms)?;
    save_versions(tx, &versions)
}

/// Records what the store said about itself; returns its acknowledged version.
fn record_sync(tx: &Transaction, r: &Report) -> Result<u64, StorageError> {
    let acked: Option<i64> = tx
        .query_row("SELECT acked_version FROM sync_state WHERE store = ?1", [r.store.as_str()], |row| row.get(0))
        .optional()?;
    let acked = to_u64(&format!("acked version of {}", r.store), acked.unwrap_or(0))?;
    let acked = plan::next_acked(acked, r.push.as_ref());
    tx.prepare_cached(
        "INSERT INTO sync_state (store, head_version, acked_version, cursor_chain, cursor_store, last_seen_ms,
                                 ledger_actor)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (store) DO UPDATE SET head_version = excluded.head_version,
             acked_version = excluded.acked_version, cursor_chain = excluded.cursor_chain,
             cursor_store = excluded.cursor_store, last_seen_ms = excluded.last_seen_ms,
             ledger_actor = excluded.ledger_actor",
    )?
    .execute(params![
        r.store.as_str(),
        to_i64("head version", r.head_version)?,
        to_i64("acked version", acked)?,
        to_i64("cursor", r.cursor.chain)?,
        to_i64("cursor", r.cursor.store)?,
        to_i64("time", r.now_ms)?,
        r.sender.as_str()
    ])?;
    Ok(acked)
}

fn push(tx: &Transaction, r: &Report) -> Result<u64, StorageError> {
    if let Some(p) = &r.push {
        merge_push(tx, &p.rows, r.now_ms)?;
    }
    let acked = record_sync(tx, r)?;
    if let Some(stamp) = &r.max_stamp {
        observe_clock(tx, stamp)?;
    }
    Ok(acked)
}

// ---- pull ----

/// The store partition above `after`: its slots (less the store's own unless `own` is None)
/// and its store-scope prices, in version order.
fn store_rows(
    tx: &Transaction,
    store: &StoreId,
    after: u64,
    own: Option<&ActorId>,
    limit: usize,
) -> Result<Vec<Pulled>, StorageError> {
    let after = to_i64("cursor", after)?;
    let lim = to_i64("limit", limit as u64)?;
    let mut slots = tx.prepare_cached(&format!(
        "SELECT {SLOT_COLUMNS}, version FROM stock_slots
          WHERE store = ?1 AND version > ?2 AND (?3 IS NULL OR actor <> ?3) ORDER BY version LIMIT ?4"
    ))?;
    let own = own.map(|a| a.as_str());
    let mut out = collect(&mut slots, params![store.as_str(), after, own, lim], |row| {
        Ok(Pulled { version: to_u64("version", row.get(5)?)?, row: PulledRow::Slot(slot_at(row, 0)?.row()?) })
    })?;
    out.extend(price_rows(tx, &store_partition(store), after, lim)?);
    let mut escrow = tx.prepare_cached(&format!(
        "SELECT {ESCROW_COLUMNS}, version FROM escrow_rows
          WHERE store = ?1 AND version > ?2 AND (?3 OR kind IN (?4, ?5)) ORDER BY version LIMIT ?6"
    ))?;
    let [released, reservation] = CLOUD_ESCROW_KINDS;
    let include_own = own.is_none();
    out.extend(collect(&mut escrow, params![store.as_str(), after, include_own, released, reservation, lim], |row| {
        Ok(Pulled { version: to_u64("version", row.get(7)?)?, row: PulledRow::Escrow(escrow_at(row, 0)?.row()?) })
    })?);
    let mut orders = tx.prepare_cached(
        "SELECT order_id, store, header, version FROM orders WHERE store = ?1 AND version > ?2 ORDER BY version LIMIT ?3",
    )?;
    out.extend(collect(&mut orders, params![store.as_str(), after, lim], |row| {
        let (id, store, bytes): (String, String, Vec<u8>) = (row.get(0)?, row.get(1)?, row.get(2)?);
        Ok(Pulled {
            version: to_u64("version", row.get(3)?)?,
            row: PulledRow::Order(codec::header_of(&id, &store, &bytes)?),
        })
    })?);
    Ok(plan::in_version_order(out, limit))
}

fn price_rows(tx: &Transaction, partition: &str, after: i64, limit: i64) -> Result<Vec<Pulled>, StorageError> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {PRICE_COLUMNS}, version FROM prices WHERE partition = ?1 AND version > ?2 ORDER BY version LIMIT ?3"
    ))?;
    collect(&mut stmt, params![partition, after, limit], |row| {
        Ok(Pulled { version: to_u64("version", row.get(10)?)?, row: PulledRow::Price(price_entry(row)?) })
    })
}

fn chain_rows(tx: &Transaction, after: u64, limit: usize) -> Result<Vec<Pulled>, StorageError> {
    let after = to_i64("cursor", after)?;
    let lim = to_i64("limit", limit as u64)?;
    let mut out = price_rows(tx, CHAIN, after, lim)?;
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {CATALOG_COLUMNS}, version FROM catalog WHERE version > ?1 ORDER BY version LIMIT ?2"
    ))?;
    out.extend(collect(&mut stmt, params![after, lim], |row| {
        Ok(Pulled { version: to_u64("version", row.get(6)?)?, row: PulledRow::Catalog(catalog_update(row)?) })
    })?);
    Ok(plan::in_version_order(out, limit))
}

fn pull(
    tx: &Transaction,
    store: &StoreId,
    cursor: Cursor,
    max: usize,
    own: Option<&ActorId>,
) -> Result<Page, StorageError> {
    let store_rows = store_rows(tx, store, cursor.store, own, plan::store_read_limit(max))?;
    let chain_rows = match plan::chain_read_limit(&store_rows, max) {
        Some(limit) => chain_rows(tx, cursor.chain, limit)?,
        None => Vec::new(),
    };
    let mut counter = tx.prepare_cached("SELECT version FROM counters WHERE partition = ?1")?;
    let mut version_of = |partition: &str| -> Result<u64, StorageError> {
        let v: Option<i64> = counter.query_row([partition], |r| r.get(0)).optional()?;
        to_u64("counter", v.unwrap_or(0))
    };
    let heads = Cursor { store: version_of(&store_partition(store))?, chain: version_of(CHAIN)? };
    Ok(plan::page(cursor, store_rows, chain_rows, max, heads))
}

/// Rows the ledger `store` last synced with would pull at `cursor`: every slot but that
/// ledger's own, so a store that started a new ledger or restored a backup counts its earlier
/// ledgers' slots as pending until it has pulled them.
fn pending_rows(
    tx: &Transaction,
    store: &StoreId,
    cursor: Cursor,
    ledger: Option<&ActorId>,
) -> Result<u64, StorageError> {
    // Before its first sync that ledger is not known: the slots of all the store's ledgers are
    // left out.
    let n: i64 = tx
        .prepare_cached(
            "SELECT (SELECT count(*) FROM stock_slots WHERE store = ?1 AND version > ?2
                        AND CASE WHEN ?8 IS NULL THEN actor <> ?3 AND substr(actor, 1, length(?3) + 1) <> ?3 || ':'
                                 ELSE actor <> ?8 END)
              + (SELECT count(*) FROM prices WHERE partition = ?4 AND version > ?2)
              + (SELECT count(*) FROM prices WHERE partition = 'chain' AND version > ?5)
              + (SELECT count(*) FROM catalog WHERE version > ?5)
              + (SELECT count(*) FROM escrow_rows WHERE store = ?1 AND version > ?2 AND kind IN (?6, ?7))
              + (SELECT count(*) FROM orders WHERE store = ?1 AND version > ?2)",
        )?
        .query_row(
            params![
                store.as_str(),
                to_i64("cursor", cursor.store)?,
                ActorId::for_store(store).as_str(),
                store_partition(store),
                to_i64("cursor", cursor.chain)?,
                CLOUD_ESCROW_KINDS[0],
                CLOUD_ESCROW_KINDS[1],
                ledger.map(ActorId::as_str)
            ],
            |r| r.get(0),
        )?;
    to_u64("pending rows", n)
}

// ---- HQ writes ----

/// The first stamp of an op applied before, if `op_id` was; claims it otherwise.
fn claim_op(tx: &Transaction, op_id: &str, now_ms: u64) -> Result<Option<Option<HlcStamp>>, StorageError> {
    let claimed = tx
        .prepare_cached("INSERT INTO applied_ops (op_id, applied_ms) VALUES (?1, ?2) ON CONFLICT DO NOTHING")?
        .execute(params![op_id, to_i64("time", now_ms)?])?;
    if claimed == 1 {
        return Ok(None);
    }
    let (wall, logical): (Option<i64>, Option<i64>) =
        tx.query_row("SELECT stamp_wall, stamp_logical FROM applied_ops WHERE op_id = ?1", [op_id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let stamp = match (wall, logical) {
        (Some(wall), Some(logical)) => Some(
            StampColumns { wall, logical, actor: ActorId::cloud().as_str().to_owned() }
                .stamp(&format!("applied op {op_id}"))?,
        ),
        _ => None,
    };
    Ok(Some(stamp))
}

fn apply(tx: &Transaction, writes: &CloudWrites, now_ms: u64) -> Result<WritesApplied, StorageError> {
    if let Some(op_id) = &writes.op_id {
        if let Some(stamp) = claim_op(tx, op_id, now_ms)? {
            return Ok(WritesApplied { replayed: true, stamp });
        }
    }
    let mut versions = lock_partitions(tx, &plan::writes_partitions(writes))?;
    let stamped = if writes.prices.is_empty() && writes.catalog.is_empty() {
        plan::Stamped::default()
    } else {
        let mut clock = load_clock(tx)?;
        let stamped = plan::stamp_writes(&mut clock, writes, now_ms);
        save_clock(tx, &clock)?;
        stamped
    };
    merge_registers(tx, &stamped.prices, &stamped.catalog, &mut versions)?;
    let keys: Vec<SlotKey> = writes.stock.iter().map(plan::cloud_slot_key).collect();
    let current = load_slots(tx, &keys)?;
    write_slots(tx, &plan::apply_movements(&current, &writes.stock)?, &mut versions)?;
    save_versions(tx, &versions)?;
    if let (Some(op_id), Some(first)) = (&writes.op_id, &stamped.first) {
        tx.execute(
            "UPDATE applied_ops SET stamp_wall = ?2, stamp_logical = ?3 WHERE op_id = ?1",
            params![op_id, to_i64("stamp", first.wall_ms)?, i64::from(first.logical)],
        )?;
    }
    Ok(WritesApplied { replayed: false, stamp: stamped.first })
}

fn held_from(row: &Row) -> Result<HeldPrice, StorageError> {
    let id: i64 = row.get(0)?;
    Ok(HeldPrice {
        id,
        write: price_at(row, 1)?.write()?,
        reason: row.get(8)?,
        held_at_ms: to_u64(&format!("held price {id}"), row.get(9)?)?,
    })
}

const HELD_COLUMNS: &str = "id, sku, scope, slot, amount, currency, win_from, win_until, reason, held_at_ms";

fn confirm_held(tx: &Transaction, id: i64, now_ms: u64) -> Result<Option<WritesApplied>, StorageError> {
    let mut stmt = tx.prepare_cached(&format!("DELETE FROM held_prices WHERE id = ?1 RETURNING {HELD_COLUMNS}"))?;
    let held = collect(&mut stmt, [id], held_from)?;
    match held.into_iter().next() {
        Some(h) => {
            let writes = CloudWrites { prices: vec![h.write], ..CloudWrites::default() };
            Ok(Some(apply(tx, &writes, now_ms)?))
        }
        None => Ok(None),
    }
}

// ---- online allocation and orders ----

/// The stored rows of `ids`, each found by primary key (those never written are absent).
fn load_escrow_ids(tx: &Transaction, ids: &[EscrowId]) -> Result<Vec<EscrowRow>, StorageError> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {ESCROW_COLUMNS} FROM escrow_rows WHERE store = ?1 AND sku = ?2 AND kind = ?3 AND order_id = ?4"
    ))?;
    let mut out = Vec::new();
    for id in ids {
        out.extend(collect(&mut stmt, params![id.store, id.sku, id.kind, id.order_id], escrow_row)?);
    }
    Ok(out)
}

/// The `escrow_totals` rows `(sku, reserved, last_seq)` of `store`'s `skus` (none for a SKU
/// never reserved).
fn load_totals(tx: &Transaction, store: &StoreId, skus: &[Sku]) -> Result<Vec<(Sku, u64, u64)>, StorageError> {
    let mut stmt =
        tx.prepare_cached("SELECT sku, reserved, last_seq FROM escrow_totals WHERE store = ?1 AND sku = ?2")?;
    let mut out = Vec::with_capacity(skus.len());
    for sku in skus {
        out.extend(collect(&mut stmt, [store.as_str(), sku.as_str()], |r| {
            let what = format!("reservation totals of {store}/{sku}");
            Ok((parse_sku(&what, r.get(0)?)?, to_u64(&what, r.get(1)?)?, to_u64(&what, r.get(2)?)?))
        })?);
    }
    Ok(out)
}

fn save_totals(tx: &Transaction, store: &StoreId, totals: &[(Sku, u64, u64)]) -> Result<(), StorageError> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO escrow_totals (store, sku, reserved, last_seq) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (store, sku) DO UPDATE SET reserved = excluded.reserved, last_seq = excluded.last_seq",
    )?;
    for (sku, reserved, last_seq) in totals {
        let what = format!("reservation totals of {store}/{sku}");
        stmt.execute(params![store.as_str(), sku.as_str(), to_i64(&what, *reserved)?, to_i64(&what, *last_seq)?])?;
    }
    Ok(())
}

/// Every stored row of `store`'s `skus` (all its SKUs when `None`).
fn load_escrow(tx: &Transaction, store: &StoreId, skus: Option<&[Sku]>) -> Result<Vec<EscrowRow>, StorageError> {
    match skus {
        None => {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {ESCROW_COLUMNS} FROM escrow_rows WHERE store = ?1 ORDER BY sku, kind, order_id"
            ))?;
            collect(&mut stmt, [store.as_str()], escrow_row)
        }
        Some(skus) => {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {ESCROW_COLUMNS} FROM escrow_rows WHERE store = ?1 AND sku = ?2 ORDER BY kind, order_id"
            ))?;
            let mut out = Vec::new();
            for sku in skus {
                out.extend(collect(&mut stmt, [store.as_str(), sku.as_str()], escrow_row)?);
            }
            Ok(out)
        }
    }
}

/// Writes escrow rows, each with the version given beside it.
fn write_escrow(tx: &Transaction, rows: &[(EscrowRow, u64)]) -> Result<(), StorageError> {
    let mut stmt = tx.prepare_cached(&format!(
        "INSERT INTO escrow_rows ({ESCROW_COLUMNS}, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (store, sku, kind, order_id) DO UPDATE
            SET units = excluded.units, seq = excluded.seq, cancelled = excluded.cancelled, version = excluded.version"
    ))?;
    for (row, version) in rows {
        let c = EscrowColumns::of(row)?;
        stmt.execute(params![
            c.store,
            c.sku,
            c.kind,
            c.order_id,
            c.units,
            c.seq,
            c.cancelled,
            to_i64("version", *version)?
        ])?;
    }
    Ok(())
}

/// Merges a store's `Granted` and `Fulfilled` rows; each row that changes takes its own
/// version. The first `Fulfilled` row of one of an order's lines (a key the order reserves)
/// tells the cloud it was handed over; one naming another SKU is kept as the merge rules say,
/// but hands nothing over.
fn merge_escrow(
    tx: &Transaction,
    rows: &[EscrowRow],
    versions: &mut Versions,
    now_ms: u64,
) -> Result<(), StorageError> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<EscrowId> = rows.iter().map(EscrowId::of).collect();
    let changed = plan::merge_escrow(load_escrow_ids(tx, &ids)?, rows)?;
    let mut numbered = Vec::with_capacity(changed.len());
    for row in changed {
        let version = versions.next(&store_partition(&row.key().store))?;
        numbered.push((row, version));
    }
    write_escrow(tx, &numbered)?;
    let mut handed_over = tx.prepare_cached(
        "UPDATE orders SET handed_over_ms = ?4
          WHERE order_id = ?1 AND store = ?2 AND handed_over_ms IS NULL
            AND EXISTS (SELECT 1 FROM escrow_rows
                         WHERE store = ?2 AND sku = ?3 AND kind = 'reservation' AND order_id = ?1)",
    )?;
    for (row, _) in &numbered {
        if let EscrowRow::Fulfilled { key, order } = row {
            let at = to_i64("time", now_ms)?;
            handed_over.execute(params![order.as_str(), key.store.as_str(), key.sku.as_str(), at])?;
        }
    }
    Ok(())
}

const ORDER_COLUMNS: &str = "order_id, store, header, pickup_code, cancel_reason, cancelled_ms, handed_over_ms";

fn order_record(row: &Row) -> Result<OrderRecord, StorageError> {
    let (id, store, bytes): (String, String, Vec<u8>) = (row.get(0)?, row.get(1)?, row.get(2)?);
    let what = format!("order {id}");
    let header = codec::header_of(&id, &store, &bytes)?;
    let time = |v: Option<i64>| v.map(|v| to_u64(&what, v)).transpose();
    Ok(OrderRecord {
        header,
        pickup_code: row.get(3)?,
        cancel_reason: parse_reason(&what, row.get(4)?)?,
        cancelled_at_ms: time(row.get(5)?)?,
        handed_over_at_ms: time(row.get(6)?)?,
    })
}

fn load_order(tx: &Transaction, order: &OrderId) -> Result<Option<OrderRecord>, StorageError> {
    let mut stmt = tx.prepare_cached(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = ?1"))?;
    Ok(collect(&mut stmt, [order.as_str()], order_record)?.into_iter().next())
}

/// Under the partition lock, claims the order id and reserves every line; a short order leaves
/// neither the claim nor a reservation behind.
fn create_order(tx: &Transaction, new: &NewOrder) -> Result<CreateOutcome, StorageError> {
    let h = &new.header;
    let partition = store_partition(&h.store);
    let mut versions = lock_partitions(tx, &BTreeSet::from([partition.clone()]))?;
    let claimed = tx
        .prepare_cached(
            "INSERT INTO orders (order_id, store, header, version, created_ms, expires_ms, pickup_code)
             VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6) ON CONFLICT (order_id) DO NOTHING",
        )?
        .execute(params![
            h.order.as_str(),
            h.store.as_str(),
            codec::header_bytes(h)?,
            h.created_at_ms,
            h.expires_at_ms,
            new.pickup_code
        ])?;
    if claimed == 0 {
        let stored = load_order(tx, &h.order)?
            .ok_or_else(|| invariant(format!("order {} is claimed but not found", h.order)))?;
        let same = plan::same_order(&stored.header, h);
        return Ok(if same { CreateOutcome::Replayed(stored) } else { CreateOutcome::Conflict(stored) });
    }
    let skus: Vec<Sku> = h.lines.iter().map(|l| l.sku.clone()).collect();
    let rows = load_escrow_ids(tx, &plan::reserve_ids(h))?;
    let bases = plan::reserve_bases(h, rows, load_totals(tx, &h.store, &skus)?)?;
    match plan::reserve_order(&bases, h)? {
        Err(short) => {
            tx.execute("DELETE FROM orders WHERE order_id = ?1", [h.order.as_str()])?;
            Ok(CreateOutcome::Short(short))
        }
        Ok(reserved) => {
            let version = versions.next(&partition)?;
            write_escrow(tx, &reserved.rows.into_iter().map(|r| (r, version)).collect::<Vec<_>>())?;
            save_totals(tx, &h.store, &reserved.totals)?;
            tx.execute(
                "UPDATE orders SET version = ?2 WHERE order_id = ?1",
                params![h.order.as_str(), to_i64("version", version)?],
            )?;
            save_versions(tx, &versions)?;
            Ok(CreateOutcome::Created(OrderRecord {
                header: h.clone(),
                pickup_code: new.pickup_code.clone(),
                cancel_reason: None,
                cancelled_at_ms: None,
                handed_over_at_ms: None,
            }))
        }
    }
}

fn cancel_order(
    tx: &Transaction,
    order: &OrderId,
    reason: CancelReason,
    now_ms: u64,
) -> Result<CancelOutcome, StorageError> {
    let Some(record) = load_order(tx, order)? else { return Ok(CancelOutcome::NotFound) };
    let h = &record.header;
    let partition = store_partition(&h.store);
    let mut versions = lock_partitions(tx, &BTreeSet::from([partition.clone()]))?;
    let escrows = plan::escrows_of(h, load_escrow_ids(tx, &plan::order_row_ids(h))?)?;
    let rows = match plan::cancel_order(&escrows, h)? {
        Err(skus) => return Ok(CancelOutcome::AlreadyFulfilled { record, skus }),
        Ok(rows) => rows,
    };
    let flagged = !rows.is_empty();
    if flagged {
        let version = versions.next(&partition)?;
        write_escrow(tx, &rows.into_iter().map(|r| (r, version)).collect::<Vec<_>>())?;
        save_versions(tx, &versions)?;
    }
    let reasoned = tx.execute(
        "UPDATE orders SET cancel_reason = ?2, cancelled_ms = ?3 WHERE order_id = ?1 AND cancel_reason IS NULL",
        params![order.as_str(), reason.as_str(), to_i64("time", now_ms)?],
    )?;
    let record =
        load_order(tx, order)?.ok_or_else(|| invariant(format!("order {order} vanished while being cancelled")))?;
    Ok(CancelOutcome::Cancelled { record, changed: flagged || reasoned > 0 })
}

fn allocations(tx: &Transaction, store: &StoreId, skus: Option<&[Sku]>) -> Result<Vec<Allocation>, StorageError> {
    let rows = load_escrow(tx, store, skus)?;
    let escrows = plan::escrows(store, skus.unwrap_or_default().iter().cloned(), rows)?;
    let mut slots = tx.prepare_cached("SELECT inc, dec FROM stock_slots WHERE store = ?1 AND sku = ?2")?;
    let mut out = Vec::with_capacity(escrows.len());
    for (sku, escrow) in escrows {
        let what = format!("stock slot {store}/{sku}");
        let counts = collect(&mut slots, [store.as_str(), sku.as_str()], |r| {
            Ok(Slot { inc: to_u64(&what, r.get(0)?)?, dec: to_u64(&what, r.get(1)?)? })
        })?;
        out.push(Allocation { escrow, on_hand: counts.iter().map(|s| s.value()).sum() });
    }
    Ok(out)
}

// ---- reads for HQ ----

fn status_from(tx: &Transaction, row: &Row) -> Result<StoreStatus, StorageError> {
    let store = parse_store("store", row.get(0)?)?;
    let what = format!("sync state of {store}");
    let last_seen: Option<i64> = row.get(2)?;
    let cursor = Cursor { chain: to_u64(&what, row.get(5)?)?, store: to_u64(&what, row.get(6)?)? };
    let ledger_actor: Option<String> = row.get(8)?;
    let ledger_actor = ledger_actor.map(|a| parse_actor(&what, a)).transpose()?;
    Ok(StoreStatus {
        created_at_ms: to_u64(&what, row.get(1)?)?,
        last_seen_ms: last_seen.map(|v| to_u64(&what, v)).transpose()?,
        head_version: to_u64(&what, row.get(3)?)?,
        acked_version: to_u64(&what, row.get(4)?)?,
        cursor,
        pending_rows: pending_rows(tx, &store, cursor, ledger_actor.as_ref())?,
        ledger_actor,
        refused_rows: to_u64(&what, row.get(7)?)?,
        store,
    })
}

fn stores(tx: &Transaction) -> Result<Vec<StoreStatus>, StorageError> {
    let mut stmt = tx.prepare_cached(
        "SELECT s.id, s.created_ms, y.last_seen_ms, coalesce(y.head_version, 0), coalesce(y.acked_version, 0),
                coalesce(y.cursor_chain, 0), coalesce(y.cursor_store, 0), coalesce(y.refused_rows, 0), y.ledger_actor
           FROM stores s LEFT JOIN sync_state y ON y.store = s.id ORDER BY s.id",
    )?;
    collect(&mut stmt, [], |row| status_from(tx, row))
}

fn slots_where(tx: &Transaction, filter: &str, key: &str) -> Result<Vec<SlotRow>, StorageError> {
    let mut stmt = tx
        .prepare_cached(&format!("SELECT {SLOT_COLUMNS} FROM stock_slots WHERE {filter} ORDER BY store, sku, actor"))?;
    collect(&mut stmt, [key], |row| slot_at(row, 0)?.row())
}

impl Storage for SqliteStorage {
    async fn migrate(&self) -> Result<(), StorageError> {
        self.call(migrate).await
    }

    async fn add_store(&self, store: &StoreId, token_sha256: [u8; 32], now_ms: u64) -> Result<(), StorageError> {
        let store = store.clone();
        self.write(move |tx| {
            let added = tx.execute(
                "INSERT INTO stores (id, token_sha256, created_ms) VALUES (?1, ?2, ?3) ON CONFLICT (id) DO NOTHING",
                params![store.as_str(), &token_sha256[..], to_i64("time", now_ms)?],
            )?;
            if added == 0 {
                return Err(StorageError::StoreExists(store));
            }
            lock_partitions(tx, &BTreeSet::from([store_partition(&store)]))?;
            tx.execute("INSERT INTO sync_state (store) VALUES (?1) ON CONFLICT DO NOTHING", [store.as_str()])?;
            Ok(())
        })
        .await
    }

    async fn add_admin(&self, name: &str, token_sha256: [u8; 32], now_ms: u64) -> Result<(), StorageError> {
        let name = name.to_owned();
        self.write(move |tx| {
            let added = tx.execute(
                "INSERT INTO admins (name, token_sha256, created_ms) VALUES (?1, ?2, ?3) ON CONFLICT (name) DO NOTHING",
                params![name, &token_sha256[..], to_i64("time", now_ms)?],
            )?;
            if added == 0 {
                return Err(StorageError::AdminExists(name));
            }
            Ok(())
        })
        .await
    }

    async fn authenticate(&self, token_sha256: [u8; 32]) -> Result<Option<Principal>, StorageError> {
        self.read(move |tx| {
            let hash = &token_sha256[..];
            let store: Option<String> =
                tx.query_row("SELECT id FROM stores WHERE token_sha256 = ?1", [hash], |r| r.get(0)).optional()?;
            if let Some(id) = store {
                return Ok(Some(Principal::Store(parse_store("store", id)?)));
            }
            let admin: Option<String> =
                tx.query_row("SELECT name FROM admins WHERE token_sha256 = ?1", [hash], |r| r.get(0)).optional()?;
            Ok(admin.map(Principal::Admin))
        })
        .await
    }

    async fn push(&self, report: SyncReport<'_>) -> Result<u64, StorageError> {
        let report = Report {
            store: report.store.clone(),
            sender: report.sender,
            push: report.push.cloned(),
            head_version: report.head_version,
            cursor: report.cursor,
            max_stamp: report.max_stamp.cloned(),
            now_ms: report.now_ms,
        };
        self.write(move |tx| push(tx, &report)).await
    }

    async fn pull(
        &self,
        store: &StoreId,
        cursor: Cursor,
        max_rows: u32,
        leave_out: Option<ActorId>,
    ) -> Result<Page, StorageError> {
        let store = store.clone();
        let max = max_rows.min(shared::sync::MAX_PAGE_ROWS) as usize;
        self.read(move |tx| pull(tx, &store, cursor, max, leave_out.as_ref())).await
    }

    async fn record_refusal(
        &self,
        store: Option<&StoreId>,
        kind: &str,
        detail: &str,
        rows: u64,
        security: bool,
        now_ms: u64,
    ) -> Result<(), StorageError> {
        let (store, kind, detail) = (store.cloned(), kind.to_owned(), detail.to_owned());
        self.write(move |tx| {
            let at = to_i64("time", now_ms)?;
            if let Some(s) = &store {
                tx.execute(
                    "INSERT INTO sync_state (store, refused_rows) VALUES (?1, ?2)
                     ON CONFLICT (store) DO UPDATE SET refused_rows = refused_rows + excluded.refused_rows",
                    params![s.as_str(), to_i64("refused rows", rows)?],
                )?;
            }
            if security {
                tx.execute(
                    "INSERT INTO security_events (at_ms, store, kind, detail) VALUES (?1, ?2, ?3, ?4)",
                    params![at, store.as_ref().map(|s| s.as_str()), kind, detail],
                )?;
            }
            Ok(())
        })
        .await
    }

    async fn security_events(&self, limit: u32) -> Result<Vec<SecurityEvent>, StorageError> {
        self.read(move |tx| {
            let mut stmt =
                tx.prepare_cached("SELECT at_ms, store, kind, detail FROM security_events ORDER BY id DESC LIMIT ?1")?;
            collect(&mut stmt, [i64::from(limit)], |row| {
                let store: Option<String> = row.get(1)?;
                Ok(SecurityEvent {
                    at_ms: to_u64("security event time", row.get(0)?)?,
                    store: store.map(|s| parse_store("security event store", s)).transpose()?,
                    kind: row.get(2)?,
                    detail: row.get(3)?,
                })
            })
        })
        .await
    }

    async fn apply(&self, writes: &CloudWrites, now_ms: u64) -> Result<WritesApplied, StorageError> {
        let writes = writes.clone();
        self.write(move |tx| apply(tx, &writes, now_ms)).await
    }

    async fn hold_price(&self, write: &PriceWrite, reason: &str, now_ms: u64) -> Result<i64, StorageError> {
        let p = PriceColumns::of(&write.key, write.value.as_ref())?;
        let reason = reason.to_owned();
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO held_prices (sku, scope, slot, amount, currency, win_from, win_until, reason, held_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    p.sku,
                    p.scope,
                    p.slot,
                    p.amount,
                    p.currency,
                    p.win_from,
                    p.win_until,
                    reason,
                    to_i64("time", now_ms)?
                ],
            )?;
            Ok(tx.last_insert_rowid())
        })
        .await
    }

    async fn held_prices(&self) -> Result<Vec<HeldPrice>, StorageError> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(&format!("SELECT {HELD_COLUMNS} FROM held_prices ORDER BY id"))?;
            collect(&mut stmt, [], held_from)
        })
        .await
    }

    async fn confirm_held(&self, id: i64, now_ms: u64) -> Result<Option<WritesApplied>, StorageError> {
        self.write(move |tx| confirm_held(tx, id, now_ms)).await
    }

    async fn prices_of(&self, sku: &Sku) -> Result<Vec<PriceEntry>, StorageError> {
        let sku = sku.clone();
        self.read(move |tx| {
            let mut stmt =
                tx.prepare_cached(&format!("SELECT {PRICE_COLUMNS} FROM prices WHERE sku = ?1 ORDER BY scope, slot"))?;
            collect(&mut stmt, [sku.as_str()], price_entry)
        })
        .await
    }

    async fn catalog_of(&self, sku: &Sku) -> Result<Vec<CatalogUpdate>, StorageError> {
        let sku = sku.clone();
        self.read(move |tx| {
            let mut stmt =
                tx.prepare_cached(&format!("SELECT {CATALOG_COLUMNS} FROM catalog WHERE sku = ?1 ORDER BY field"))?;
            collect(&mut stmt, [sku.as_str()], catalog_update)
        })
        .await
    }

    async fn stock_of_sku(&self, sku: &Sku) -> Result<Vec<SlotRow>, StorageError> {
        let sku = sku.clone();
        self.read(move |tx| slots_where(tx, "sku = ?1", sku.as_str())).await
    }

    async fn stock_of_store(&self, store: &StoreId) -> Result<Vec<SlotRow>, StorageError> {
        let store = store.clone();
        self.read(move |tx| slots_where(tx, "store = ?1", store.as_str())).await
    }

    async fn stores(&self) -> Result<Vec<StoreStatus>, StorageError> {
        self.read(stores).await
    }

    async fn store_exists(&self, store: &StoreId) -> Result<bool, StorageError> {
        let store = store.clone();
        self.read(move |tx| {
            Ok(tx.query_row("SELECT EXISTS (SELECT 1 FROM stores WHERE id = ?1)", [store.as_str()], |r| r.get(0))?)
        })
        .await
    }

    async fn known_skus(&self, skus: &[Sku]) -> Result<Vec<Sku>, StorageError> {
        let skus = skus.to_vec();
        self.read(move |tx| {
            let mut stmt = tx.prepare_cached("SELECT EXISTS (SELECT 1 FROM catalog WHERE sku = ?1)")?;
            let mut known = Vec::new();
            for sku in skus {
                if stmt.query_row([sku.as_str()], |r| r.get::<_, bool>(0))? {
                    known.push(sku);
                }
            }
            Ok(known)
        })
        .await
    }

    async fn create_order(&self, order: &NewOrder) -> Result<CreateOutcome, StorageError> {
        let order = order.clone();
        self.write(move |tx| create_order(tx, &order)).await
    }

    async fn cancel_order(
        &self,
        order: &OrderId,
        reason: CancelReason,
        now_ms: u64,
    ) -> Result<CancelOutcome, StorageError> {
        let order = order.clone();
        self.write(move |tx| cancel_order(tx, &order, reason, now_ms)).await
    }

    async fn order(&self, order: &OrderId) -> Result<Option<OrderRecord>, StorageError> {
        let order = order.clone();
        self.read(move |tx| load_order(tx, &order)).await
    }

    async fn store_orders(
        &self,
        store: &StoreId,
        state: Option<OrderState>,
        limit: u32,
    ) -> Result<Vec<OrderRecord>, StorageError> {
        let store = store.clone();
        self.read(move |tx| {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {ORDER_COLUMNS} FROM orders WHERE store = ?1 AND {}
                  ORDER BY created_ms DESC, order_id DESC LIMIT ?2",
                codec::order_state_sql(state)
            ))?;
            collect(&mut stmt, params![store.as_str(), i64::from(limit)], order_record)
        })
        .await
    }

    async fn due_orders(&self, now_ms: u64, limit: u32) -> Result<Vec<OrderId>, StorageError> {
        self.read(move |tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT order_id FROM orders
                  WHERE cancel_reason IS NULL AND handed_over_ms IS NULL AND expires_ms <= ?1
                  ORDER BY expires_ms, order_id LIMIT ?2",
            )?;
            collect(&mut stmt, params![to_i64("time", now_ms)?, i64::from(limit)], |r| {
                parse_order("due order", r.get(0)?)
            })
        })
        .await
    }

    async fn allocations(&self, store: &StoreId, skus: Option<&[Sku]>) -> Result<Vec<Allocation>, StorageError> {
        let (store, skus) = (store.clone(), skus.map(<[Sku]>::to_vec));
        self.read(move |tx| allocations(tx, &store, skus.as_deref())).await
    }
}
