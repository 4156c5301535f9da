//! PostgreSQL backend: the production database, shared by several stateless service processes.
//! What SQLite gets from having one writer this backend gets from row locks: every write locks
//! the counter rows of the partitions it touches (in name order, so two transactions never
//! deadlock) before reading anything it merges, and holds them to commit. So merges never lose
//! a concurrent update, and versions become visible in the order they were handed out: a
//! puller reading "versions above my cursor" never skips a row that commits late (DESIGN 13.1).
//!
//! Lock order, in every transaction: an op id or held price row, then partition counters by
//! name, then order rows, then the store's sync state, then the clock row (last, as it is every
//! process's hottest row). Every writer of an order row (its creation, its cancellation, a push
//! bringing its handover) or of a key's reservation totals (a creation) holds its store's
//! partition lock first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use shared::sync::{Cursor, Rows};
use shared::{
    ActorId, CatalogUpdate, EscrowRow, Hlc, HlcStamp, OrderId, PriceEntry, PriceKey, Sku, Slot, SlotKey, SlotRow,
    StoreId,
};
use tokio_postgres::{IsolationLevel, Row, Transaction};

use super::codec::{
    self, invariant, parse_actor, parse_order, parse_reason, parse_sku, parse_store, price_partition, store_partition,
    to_i64, to_u64, CatalogColumns, EscrowColumns, EscrowId, PriceColumns, SlotColumns, StampColumns, CHAIN,
    CLOUD_ESCROW_KINDS,
};
use super::pg_pool::Pool;
use super::plan::{self, CatalogKey, Pulled, PulledRow, Versions};
use super::{
    Allocation, CancelOutcome, CancelReason, CloudWrites, CreateOutcome, HeldPrice, NewOrder, OrderRecord, Page,
    PriceWrite, Principal, SecurityEvent, Storage, StorageError, StoreStatus, SyncReport, WritesApplied,
    SCHEMA_VERSION,
};
use crate::orders::OrderState;

/// Connections per service process. Each is a server process; a handful keeps the server's
/// `max_connections` comfortable with several service processes.
const POOL_SIZE: usize = 8;

/// Advisory lock key held while migrating ("SECS"), so two processes starting at once do not
/// both create the schema.
const MIGRATION_LOCK: i64 = 0x5345_4353;

/// Schema migrations, applied in order; `schema_version.version` counts how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: stores, sync state, replicated rows, HQ bookkeeping (same meaning as SQLite's). Text
    // compares bytewise ("C"), as in SQLite, so both backends list rows in the same order.
    r#"
    CREATE TABLE stores (
        id           TEXT COLLATE "C"   PRIMARY KEY,
        token_sha256 BYTEA  NOT NULL UNIQUE,
        created_ms   BIGINT NOT NULL
    );
    CREATE TABLE admins (
        name         TEXT COLLATE "C"   PRIMARY KEY,
        token_sha256 BYTEA  NOT NULL UNIQUE,
        created_ms   BIGINT NOT NULL
    );

    -- One version counter per partition ('chain', 'store:{id}'); its row lock orders writers.
    CREATE TABLE counters (partition TEXT COLLATE "C" PRIMARY KEY, version BIGINT NOT NULL);
    INSERT INTO counters (partition, version) VALUES ('chain', 0);

    -- The cloud's HLC: the last stamp issued or observed.
    CREATE TABLE clock (id SMALLINT PRIMARY KEY CHECK (id = 0), wall BIGINT NOT NULL, logical BIGINT NOT NULL);
    INSERT INTO clock (id, wall, logical) VALUES (0, 0, 0);

    CREATE TABLE stock_slots (
        store   TEXT COLLATE "C"   NOT NULL,
        sku     TEXT COLLATE "C"   NOT NULL,
        actor   TEXT COLLATE "C"   NOT NULL,
        inc     BIGINT NOT NULL CHECK (inc >= 0),
        dec     BIGINT NOT NULL CHECK (dec >= 0),
        version BIGINT NOT NULL,
        PRIMARY KEY (store, sku, actor)
    );
    CREATE INDEX stock_slots_by_version ON stock_slots (store, version);
    CREATE INDEX stock_slots_by_sku ON stock_slots (sku);

    CREATE TABLE prices (
        sku         TEXT COLLATE "C"   NOT NULL,
        scope       TEXT COLLATE "C"   NOT NULL,
        slot        TEXT COLLATE "C"   NOT NULL,
        amount      BIGINT,
        currency    TEXT,
        win_from    BIGINT,
        win_until   BIGINT,
        hlc_wall    BIGINT NOT NULL,
        hlc_logical BIGINT NOT NULL,
        actor       TEXT COLLATE "C"   NOT NULL,
        partition   TEXT COLLATE "C"   NOT NULL,
        version     BIGINT NOT NULL,
        PRIMARY KEY (sku, scope, slot)
    );
    CREATE INDEX prices_by_version ON prices (partition, version);

    CREATE TABLE catalog (
        sku         TEXT COLLATE "C"   NOT NULL,
        field       TEXT COLLATE "C"   NOT NULL,
        value       BYTEA  NOT NULL,
        hlc_wall    BIGINT NOT NULL,
        hlc_logical BIGINT NOT NULL,
        actor       TEXT COLLATE "C"   NOT NULL,
        version     BIGINT NOT NULL,
        PRIMARY KEY (sku, field)
    );
    CREATE INDEX catalog_by_version ON catalog (version);

    CREATE TABLE sync_state (
        store         TEXT COLLATE "C"   PRIMARY KEY,
        head_version  BIGINT NOT NULL DEFAULT 0,
        acked_version BIGINT NOT NULL DEFAULT 0,
        cursor_chain  BIGINT NOT NULL DEFAULT 0,
        cursor_store  BIGINT NOT NULL DEFAULT 0,
        last_seen_ms  BIGINT,
        refused_rows  BIGINT NOT NULL DEFAULT 0
    );

    CREATE TABLE security_events (
        id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at_ms  BIGINT NOT NULL,
        store  TEXT,
        kind   TEXT COLLATE "C"   NOT NULL,
        detail TEXT COLLATE "C"   NOT NULL
    );

    -- Identity ids are never reused, so a stale confirmation cannot hit a newer hold.
    CREATE TABLE held_prices (
        id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        sku        TEXT COLLATE "C"   NOT NULL,
        scope      TEXT COLLATE "C"   NOT NULL,
        slot       TEXT COLLATE "C"   NOT NULL,
        amount     BIGINT,
        currency   TEXT,
        win_from   BIGINT,
        win_until  BIGINT,
        reason     TEXT COLLATE "C"   NOT NULL,
        held_at_ms BIGINT NOT NULL
    );

    CREATE TABLE applied_ops (
        op_id         TEXT COLLATE "C"   PRIMARY KEY,
        applied_ms    BIGINT NOT NULL,
        stamp_wall    BIGINT,
        stamp_logical BIGINT
    );
    "#,
    // 2: online pickup orders (DESIGN 5, 13.5), in the store's partition (as SQLite's).
    r#"
    CREATE TABLE escrow_rows (
        store     TEXT COLLATE "C"   NOT NULL,
        sku       TEXT COLLATE "C"   NOT NULL,
        kind      TEXT COLLATE "C"   NOT NULL CHECK (kind IN ('granted', 'released', 'reservation', 'fulfilled')),
        order_id  TEXT COLLATE "C"   NOT NULL,
        units     BIGINT  NOT NULL CHECK (units >= 0),
        seq       BIGINT  NOT NULL CHECK (seq >= 0),
        cancelled BOOLEAN NOT NULL,
        version   BIGINT  NOT NULL,
        PRIMARY KEY (store, sku, kind, order_id)
    );
    CREATE INDEX escrow_rows_by_version ON escrow_rows (store, version);

    CREATE TABLE orders (
        order_id       TEXT COLLATE "C"   PRIMARY KEY,
        store          TEXT COLLATE "C"   NOT NULL,
        header         BYTEA  NOT NULL,
        version        BIGINT NOT NULL,
        created_ms     BIGINT NOT NULL,
        expires_ms     BIGINT NOT NULL,
        pickup_code    TEXT   NOT NULL,
        cancel_reason  TEXT   CHECK (cancel_reason IN ('cancelled', 'expired')),
        cancelled_ms   BIGINT,
        handed_over_ms BIGINT
    );
    CREATE INDEX orders_by_version ON orders (store, version);
    CREATE INDEX orders_by_store ON orders (store, created_ms);
    CREATE INDEX orders_due ON orders (expires_ms) WHERE cancel_reason IS NULL AND handed_over_ms IS NULL;
    "#,
    // 3: per (store, sku), the sum of every reservation's units and the last seq given (as
    // SQLite's), so an order's creation reads one row per line, not the SKU's history.
    r#"
    CREATE TABLE escrow_totals (
        store    TEXT COLLATE "C"   NOT NULL,
        sku      TEXT COLLATE "C"   NOT NULL,
        reserved BIGINT NOT NULL CHECK (reserved >= 0),
        last_seq BIGINT NOT NULL CHECK (last_seq >= 0),
        PRIMARY KEY (store, sku)
    );
    INSERT INTO escrow_totals (store, sku, reserved, last_seq)
        SELECT store, sku, sum(units), max(seq) FROM escrow_rows WHERE kind = 'reservation' GROUP BY store, sku;
    "#,
    // 4: the actor of the ledger each store last synced with (as SQLite's).
    "ALTER TABLE sync_state ADD COLUMN ledger_actor TEXT COLLATE \"C\";",
];

const _: () = assert!(MIGRATIONS.len() as i64 == SCHEMA_VERSION, "one migration per schema version");

/// Clone it freely: clones share one pool.
#[derive(Clone)]
pub struct PostgresStorage {
    pool: Arc<Pool>,
}

impl std::fmt::Debug for PostgresStorage {
    // The conninfo may carry a password: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStorage").finish_non_exhaustive()
    }
}

impl PostgresStorage {
    /// Connects once to check the server answers; further connections open as load needs them.
    pub async fn connect(conninfo: &str) -> Result<PostgresStorage, StorageError> {
        let pool = Arc::new(Pool::new(conninfo, POOL_SIZE));
        drop(pool.get().await?);
        Ok(PostgresStorage { pool })
    }
}

// ---- schema ----

async fn migrate(tx: &Transaction<'_>) -> Result<(), StorageError> {
    // Held to commit: a second process waits here, then finds the schema current.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (id SMALLINT PRIMARY KEY CHECK (id = 0), version BIGINT NOT NULL);
         INSERT INTO schema_version (id, version) VALUES (0, 0) ON CONFLICT DO NOTHING;",
    )
    .await?;
    let found: i64 = tx.query_one("SELECT version FROM schema_version WHERE id = 0", &[]).await?.try_get(0)?;
    if found > SCHEMA_VERSION {
        return Err(StorageError::TooNew { found, known: SCHEMA_VERSION });
    }
    let from = usize::try_from(found).map_err(|_| codec::corrupt("schema version", found))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(from) {
        tx.batch_execute(sql).await?;
        tracing::info!(schema_version = i + 1, "cloud-sync PostgreSQL schema migrated");
    }
    tx.execute("UPDATE schema_version SET version = $1 WHERE id = 0", &[&SCHEMA_VERSION]).await?;
    Ok(())
}

// ---- versions and clock ----

/// Locks the counter rows of `parts` (creating missing ones) in name order and reads their
/// heads. The locks are held to commit: every other writer of these partitions waits, so the
/// rows read next are current, and versions commit in the order they are handed out.
async fn lock_partitions(tx: &Transaction<'_>, parts: &BTreeSet<String>) -> Result<Versions, StorageError> {
    let stmt = tx
        .prepare(
            "INSERT INTO counters (partition, version) VALUES ($1, 0)
             ON CONFLICT (partition) DO UPDATE SET version = counters.version RETURNING version",
        )
        .await?;
    let mut heads = Vec::with_capacity(parts.len());
    for p in parts {
        let v: i64 = tx.query_one(&stmt, &[p]).await?.try_get(0)?;
        heads.push((p.clone(), to_u64(&format!("version counter of {p}"), v)?));
    }
    Ok(Versions::new(heads))
}

async fn save_versions(tx: &Transaction<'_>, versions: &Versions) -> Result<(), StorageError> {
    for (p, v) in versions.moved() {
        tx.execute("UPDATE counters SET version = $2 WHERE partition = $1", &[&p, &to_i64(p, v)?]).await?;
    }
    Ok(())
}

/// Locks the clock row (after any partition locks) and resumes the cloud HLC from it.
async fn lock_clock(tx: &Transaction<'_>) -> Result<Hlc, StorageError> {
    let row = tx.query_one("SELECT wall, logical FROM clock WHERE id = 0 FOR UPDATE", &[]).await?;
    let (wall, logical): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    let logical = u32::try_from(logical).map_err(|_| codec::corrupt("cloud clock", logical))?;
    Ok(plan::cloud_clock(to_u64("cloud clock", wall)?, logical))
}

async fn save_clock(tx: &Transaction<'_>, clock: &Hlc) -> Result<(), StorageError> {
    let (wall, logical) = clock.last();
    tx.execute(
        "UPDATE clock SET wall = $1, logical = $2 WHERE id = 0",
        &[&to_i64("cloud clock", wall)?, &i64::from(logical)],
    )
    .await?;
    Ok(())
}

/// Raises the clock row to `stamp` when it is ahead, so later cloud stamps order after it.
async fn observe_clock(tx: &Transaction<'_>, stamp: &HlcStamp) -> Result<(), StorageError> {
    tx.execute(
        "UPDATE clock SET wall = $1, logical = $2 WHERE id = 0 AND (wall < $1 OR (wall = $1 AND logical < $2))",
        &[&to_i64("observed stamp", stamp.wall_ms)?, &i64::from(stamp.logical)],
    )
    .await?;
    Ok(())
}

// ---- rows ----

fn stamp_at(row: &Row, first: usize) -> Result<StampColumns, StorageError> {
    Ok(StampColumns { wall: row.try_get(first)?, logical: row.try_get(first + 1)?, actor: row.try_get(first + 2)? })
}

fn slot_at(row: &Row, first: usize) -> Result<SlotColumns, StorageError> {
    Ok(SlotColumns {
        store: row.try_get(first)?,
        sku: row.try_get(first + 1)?,
        actor: row.try_get(first + 2)?,
        inc: row.try_get(first + 3)?,
        dec: row.try_get(first + 4)?,
    })
}

fn price_at(row: &Row, first: usize) -> Result<PriceColumns, StorageError> {
    Ok(PriceColumns {
        sku: row.try_get(first)?,
        scope: row.try_get(first + 1)?,
        slot: row.try_get(first + 2)?,
        amount: row.try_get(first + 3)?,
        currency: row.try_get(first + 4)?,
        win_from: row.try_get(first + 5)?,
        win_until: row.try_get(first + 6)?,
    })
}

const SLOT_COLUMNS: &str = "store, sku, actor, inc, dec";
const PRICE_COLUMNS: &str = "sku, scope, slot, amount, currency, win_from, win_until, hlc_wall, hlc_logical, actor";
const CATALOG_COLUMNS: &str = "sku, field, value, hlc_wall, hlc_logical, actor";

fn price_entry(row: &Row) -> Result<PriceEntry, StorageError> {
    price_at(row, 0)?.entry(stamp_at(row, 7)?)
}

fn catalog_update(row: &Row) -> Result<CatalogUpdate, StorageError> {
    let cols = CatalogColumns { sku: row.try_get(0)?, field: row.try_get(1)?, value: row.try_get(2)? };
    cols.update(stamp_at(row, 3)?)
}

fn version_at(row: &Row, idx: usize) -> Result<u64, StorageError> {
    to_u64("version", row.try_get(idx)?)
}

const ESCROW_COLUMNS: &str = "store, sku, kind, order_id, units, seq, cancelled";

fn escrow_at(row: &Row, first: usize) -> Result<EscrowColumns, StorageError> {
    Ok(EscrowColumns {
        store: row.try_get(first)?,
        sku: row.try_get(first + 1)?,
        kind: row.try_get(first + 2)?,
        order_id: row.try_get(first + 3)?,
        units: row.try_get(first + 4)?,
        seq: row.try_get(first + 5)?,
        cancelled: row.try_get(first + 6)?,
    })
}

/// The current slots among `keys`, in one round trip.
async fn load_slots(tx: &Transaction<'_>, keys: &[SlotKey]) -> Result<HashMap<SlotKey, Slot>, StorageError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let (stores, skus, actors): (Vec<&str>, Vec<&str>, Vec<&str>) =
        keys.iter().map(|k| (k.store.as_str(), k.sku.as_str(), k.actor.as_str())).collect();
    let rows = tx
        .query(
            &format!(
                "SELECT {SLOT_COLUMNS} FROM stock_slots
                  WHERE (store, sku, actor) IN (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))"
            ),
            &[&stores, &skus, &actors],
        )
        .await?;
    rows.iter().map(|r| slot_at(r, 0)?.row().map(|row| (row.key, row.slot))).collect()
}

/// The columns of a batch of slots, one array each (for `unnest`).
#[derive(Default)]
struct SlotArrays {
    store: Vec<String>,
    sku: Vec<String>,
    actor: Vec<String>,
    inc: Vec<i64>,
    dec: Vec<i64>,
    version: Vec<i64>,
}

impl SlotArrays {
    fn push(&mut self, c: SlotColumns, version: i64) {
        self.store.push(c.store);
        self.sku.push(c.sku);
        self.actor.push(c.actor);
        self.inc.push(c.inc);
        self.dec.push(c.dec);
        self.version.push(version);
    }
}

async fn write_slots(tx: &Transaction<'_>, rows: &[SlotRow], versions: &mut Versions) -> Result<(), StorageError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut a = SlotArrays::default();
    for row in rows {
        let version = to_i64("version", versions.next(&store_partition(&row.key.store))?)?;
        a.push(SlotColumns::of(row)?, version);
    }
    tx.execute(
        "INSERT INTO stock_slots (store, sku, actor, inc, dec, version)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[])
         ON CONFLICT (store, sku, actor) DO UPDATE SET inc = excluded.inc, dec = excluded.dec, version = excluded.version",
        &[&a.store, &a.sku, &a.actor, &a.inc, &a.dec, &a.version],
    )
    .await?;
    Ok(())
}

async fn load_prices(tx: &Transaction<'_>, keys: &[&PriceKey]) -> Result<HashMap<PriceKey, PriceEntry>, StorageError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let skus: Vec<&str> = keys.iter().map(|k| k.sku.as_str()).collect();
    let scopes: Vec<String> = keys.iter().map(|k| k.scope.to_string()).collect();
    let slots: Vec<&str> = keys.iter().map(|k| k.slot.as_str()).collect();
    let rows = tx
        .query(
            &format!(
                "SELECT {PRICE_COLUMNS} FROM prices
                  WHERE (sku, scope, slot) IN (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))"
            ),
            &[&skus, &scopes, &slots],
        )
        .await?;
    rows.iter().map(|r| price_entry(r).map(|e| (e.key.clone(), e))).collect()
}

/// The columns of a batch of price registers, one array each (for `unnest`).
#[derive(Default)]
struct PriceArrays {
    sku: Vec<String>,
    scope: Vec<String>,
    slot: Vec<String>,
    amount: Vec<Option<i64>>,
    currency: Vec<Option<String>>,
    win_from: Vec<Option<i64>>,
    win_until: Vec<Option<i64>>,
    wall: Vec<i64>,
    logical: Vec<i64>,
    actor: Vec<String>,
    partition: Vec<String>,
    version: Vec<i64>,
}

impl PriceArrays {
    fn push(&mut self, p: PriceColumns, s: StampColumns, partition: String, version: i64) {
        self.sku.push(p.sku);
        self.scope.push(p.scope);
        self.slot.push(p.slot);
        self.amount.push(p.amount);
        self.currency.push(p.currency);
        self.win_from.push(p.win_from);
        self.win_until.push(p.win_until);
        self.wall.push(s.wall);
        self.logical.push(s.logical);
        self.actor.push(s.actor);
        self.partition.push(partition);
        self.version.push(version);
    }
}

async fn write_prices(
    tx: &Transaction<'_>,
    entries: &[PriceEntry],
    versions: &mut Versions,
) -> Result<(), StorageError> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut a = PriceArrays::default();
    for e in entries {
        let partition = price_partition(&e.key.scope);
        let version = to_i64("version", versions.next(&partition)?)?;
        a.push(PriceColumns::of(&e.key, e.value.as_ref())?, StampColumns::of(&e.stamp)?, partition, version);
    }
    tx.execute(
        &format!(
            "INSERT INTO prices ({PRICE_COLUMNS}, partition, version)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::bigint[],
                                  $7::bigint[], $8::bigint[], $9::bigint[], $10::text[], $11::text[], $12::bigint[])
             ON CONFLICT (sku, scope, slot) DO UPDATE SET amount = excluded.amount, currency = excluded.currency,
                 win_from = excluded.win_from, win_until = excluded.win_until, hlc_wall = excluded.hlc_wall,
                 hlc_logical = excluded.hlc_logical, actor = excluded.actor, partition = excluded.partition,
                 version = excluded.version"
        ),
        &[
            &a.sku,
            &a.scope,
            &a.slot,
            &a.amount,
            &a.currency,
            &a.win_from,
            &a.win_until,
            &a.wall,
            &a.logical,
            &a.actor,
            &a.partition,
            &a.version,
        ],
    )
    .await?;
    Ok(())
}

async fn load_catalog(
    tx: &Transaction<'_>,
    keys: &[CatalogKey],
) -> Result<HashMap<CatalogKey, CatalogUpdate>, StorageError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let (skus, fields): (Vec<&str>, Vec<&str>) = keys.iter().map(|(sku, field)| (sku.as_str(), *field)).unzip();
    let rows = tx
        .query(
            &format!(
                "SELECT {CATALOG_COLUMNS} FROM catalog
                  WHERE (sku, field) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
            ),
            &[&skus, &fields],
        )
        .await?;
    rows.iter().map(|r| catalog_update(r).map(|u| (plan::catalog_key(&u), u))).collect()
}

/// The columns of a batch of catalog fields, one array each (for `unnest`).
#[derive(Default)]
struct CatalogArrays {
    sku: Vec<String>,
    field: Vec<String>,
    value: Vec<Vec<u8>>,
    wall: Vec<i64>,
    logical: Vec<i64>,
    actor: Vec<String>,
    version: Vec<i64>,
}

impl CatalogArrays {
    fn push(&mut self, c: CatalogColumns, s: StampColumns, version: i64) {
        self.sku.push(c.sku);
        self.field.push(c.field);
        self.value.push(c.value);
        self.wall.push(s.wall);
        self.logical.push(s.logical);
        self.actor.push(s.actor);
        self.version.push(version);
    }
}

async fn write_catalog(
    tx: &Transaction<'_>,
    updates: &[CatalogUpdate],
    versions: &mut Versions,
) -> Result<(), StorageError> {
    if updates.is_empty() {
        return Ok(());
    }
    let mut a = CatalogArrays::default();
    for u in updates {
        let version = to_i64("version", versions.next(CHAIN)?)?;
        a.push(CatalogColumns::of(u)?, StampColumns::of(&u.stamp)?, version);
    }
    tx.execute(
        &format!(
            "INSERT INTO catalog ({CATALOG_COLUMNS}, version)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bigint[], $5::bigint[], $6::text[], $7::bigint[])
             ON CONFLICT (sku, field) DO UPDATE SET value = excluded.value, hlc_wall = excluded.hlc_wall,
                 hlc_logical = excluded.hlc_logical, actor = excluded.actor, version = excluded.version"
        ),
        &[&a.sku, &a.field, &a.value, &a.wall, &a.logical, &a.actor, &a.version],
    )
    .await?;
    Ok(())
}

/// Merges prices and catalog fields by LWW and writes those that win.
async fn merge_registers(
    tx: &Transaction<'_>,
    prices: &[PriceEntry],
    catalog: &[CatalogUpdate],
    versions: &mut Versions,
) -> Result<(), StorageError> {
    let keys: Vec<&PriceKey> = prices.iter().map(|p| &p.key).collect();
    let current = load_prices(tx, &keys).await?;
    write_prices(tx, &plan::merge_prices(&current, prices), versions).await?;
    let keys: Vec<CatalogKey> = catalog.iter().map(plan::catalog_key).collect();
    let current = load_catalog(tx, &keys).await?;
    write_catalog(tx, &plan::merge_catalog(&current, catalog), versions).await
}

// ---- push ----

async fn merge_push(tx: &Transaction<'_>, rows: &Rows, now_ms: u64) -> Result<(), StorageError> {
    let mut versions = lock_partitions(tx, &plan::partitions_of(rows)).await?;
    let incoming: Vec<SlotRow> = rows.slot_rows().collect();
    let keys: Vec<SlotKey> = incoming.iter().map(|r| r.key.clone()).collect();
    let current = load_slots(tx, &keys).await?;
    write_slots(tx, &plan::merge_slots(&current, incoming), &mut versions).await?;
    merge_registers(tx, &rows.prices, &rows.catalog, &mut versions).await?;
    merge_escrow(tx, &rows.escrow, &mut versions, now_ms).await?;
    save_versions(tx, &versions).await
}

/// Records what the store said about itself; returns its acknowledged version. The row lock
/// taken here orders two concurrent syncs of one store, so `acked` never moves backwards.
async fn record_sync(tx: &Transaction<'_>, r: &SyncReport<'_>) -> Result<u64, StorageError> {
    let store = r.store.as_str();
    tx.execute("INSERT INTO sync_state (store) VALUES ($1) ON CONFLICT DO NOTHING", &[&store]).await?;
    let row = tx.query_one("SELECT acked_version FROM sync_state WHERE store = $1 FOR UPDATE", &[&store]).await?;
    let acked = to_u64(&format!("acked version of {store}"), row.try_get(0)?)?;
    let acked = plan::next_acked(acked, r.push);
    tx.execute(
        "UPDATE sync_state SET head_version = $2, acked_version = $3, cursor_chain = $4, cursor_store = $5,
                last_seen_ms = $6, ledger_actor = $7 WHERE store = $1",
        &[
            &store,
            &to_i64("head version", r.head_version)?,
            &to_i64("acked version", acked)?,
            &to_i64("cursor", r.cursor.chain)?,
            &to_i64("cursor", r.cursor.store)?,
            &to_i64("time", r.now_ms)?,
            &r.sender.as_str(),
        ],
    )
    .await?;
    Ok(acked)
}

async fn push(tx: &Transaction<'_>, r: &SyncReport<'_>) -> Result<u64, StorageError> {
    if let Some(p) = r.push {
        merge_push(tx, &p.rows, r.now_ms).await?;
    }
    let acked = record_sync(tx, r).await?;
    // Last, so the clock row (every process's hottest lock) is held only through the commit.
    if let Some(stamp) = r.max_stamp {
        observe_clock(tx, stamp).await?;
    }
    Ok(acked)
}

// ---- pull ----

async fn store_rows(
    tx: &Transaction<'_>,
    store: &StoreId,
    after: u64,
    own: Option<&ActorId>,
    limit: usize,
) -> Result<Vec<Pulled>, StorageError> {
    let after = to_i64("cursor", after)?;
    let lim = to_i64("limit", limit as u64)?;
    let own = own.map(|a| a.as_str());
    let slots = tx
        .query(
            &format!(
                "SELECT {SLOT_COLUMNS}, version FROM stock_slots
                  WHERE store = $1 AND version > $2 AND ($3::text IS NULL OR actor <> $3) ORDER BY version LIMIT $4"
            ),
            &[&store.as_str(), &after, &own, &lim],
        )
        .await?;
    let mut out = slots
        .iter()
        .map(|r| Ok(Pulled { version: version_at(r, 5)?, row: PulledRow::Slot(slot_at(r, 0)?.row()?) }))
        .collect::<Result<Vec<_>, StorageError>>()?;
    out.extend(price_rows(tx, &store_partition(store), after, lim).await?);
    let include_own = own.is_none();
    let kinds = CLOUD_ESCROW_KINDS.to_vec();
    let escrow = tx
        .query(
            &format!(
                "SELECT {ESCROW_COLUMNS}, version FROM escrow_rows
                  WHERE store = $1 AND version > $2 AND ($3 OR kind = ANY($4)) ORDER BY version LIMIT $5"
            ),
            &[&store.as_str(), &after, &include_own, &kinds, &lim],
        )
        .await?;
    for r in &escrow {
        out.push(Pulled { version: version_at(r, 7)?, row: PulledRow::Escrow(escrow_at(r, 0)?.row()?) });
    }
    let orders = tx
        .query(
            "SELECT order_id, store, header, version FROM orders WHERE store = $1 AND version > $2
              ORDER BY version LIMIT $3",
            &[&store.as_str(), &after, &lim],
        )
        .await?;
    for r in &orders {
        let (id, store, bytes): (String, String, Vec<u8>) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        out.push(Pulled { version: version_at(r, 3)?, row: PulledRow::Order(codec::header_of(&id, &store, &bytes)?) });
    }
    Ok(plan::in_version_order(out, limit))
}

async fn price_rows(
    tx: &Transaction<'_>,
    partition: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<Pulled>, StorageError> {
    let rows = tx
        .query(
            &format!(
                "SELECT {PRICE_COLUMNS}, version FROM prices
                  WHERE partition = $1 AND version > $2 ORDER BY version LIMIT $3"
            ),
            &[&partition, &after, &limit],
        )
        .await?;
    rows.iter().map(|r| Ok(Pulled { version: version_at(r, 10)?, row: PulledRow::Price(price_entry(r)?) })).collect()
}

async fn chain_rows(tx: &Transaction<'_>, after: u64, limit: usize) -> Result<Vec<Pulled>, StorageError> {
    let after = to_i64("cursor", after)?;
    let lim = to_i64("limit", limit as u64)?;
    let mut out = price_rows(tx, CHAIN, after, lim).await?;
    let rows = tx
        .query(
            &format!("SELECT {CATALOG_COLUMNS}, version FROM catalog WHERE version > $1 ORDER BY version LIMIT $2"),
            &[&after, &lim],
        )
        .await?;
    for r in &rows {
        out.push(Pulled { version: version_at(r, 6)?, row: PulledRow::Catalog(catalog_update(r)?) });
    }
    Ok(plan::in_version_order(out, limit))
}

async fn pull(
    tx: &Transaction<'_>,
    store: &StoreId,
    cursor: Cursor,
    max: usize,
    own: Option<&ActorId>,
) -> Result<Page, StorageError> {
    let store_rows = store_rows(tx, store, cursor.store, own, plan::store_read_limit(max)).await?;
    let chain_rows = match plan::chain_read_limit(&store_rows, max) {
        Some(limit) => chain_rows(tx, cursor.chain, limit).await?,
        None => Vec::new(),
    };
    let mut heads = Cursor::default();
    for (partition, head) in [(store_partition(store), &mut heads.store), (CHAIN.to_owned(), &mut heads.chain)] {
        let row = tx.query_opt("SELECT version FROM counters WHERE partition = $1", &[&partition]).await?;
        *head = match row {
            Some(r) => version_at(&r, 0)?,
            None => 0,
        };
    }
    Ok(plan::page(cursor, store_rows, chain_rows, max, heads))
}

/// Rows the ledger `store` last synced with would pull at `cursor` (the slots of all the
/// store's ledgers left out before its first sync, when that ledger is not known).
async fn pending_rows(
    tx: &Transaction<'_>,
    store: &StoreId,
    cursor: Cursor,
    ledger: Option<&ActorId>,
) -> Result<u64, StorageError> {
    let row = tx
        .query_one(
            "SELECT (SELECT count(*) FROM stock_slots WHERE store = $1 AND version > $2
                            AND CASE WHEN $7::text IS NULL THEN actor <> $3 AND NOT starts_with(actor, $3 || ':')
                                     ELSE actor <> $7 END)
                  + (SELECT count(*) FROM prices WHERE partition = $4 AND version > $2)
                  + (SELECT count(*) FROM prices WHERE partition = 'chain' AND version > $5)
                  + (SELECT count(*) FROM catalog WHERE version > $5)
                  + (SELECT count(*) FROM escrow_rows WHERE store = $1 AND version > $2 AND kind = ANY($6))
                  + (SELECT count(*) FROM orders WHERE store = $1 AND version > $2)",
            &[
                &store.as_str(),
                &to_i64("cursor", cursor.store)?,
                &ActorId::for_store(store).as_str(),
                &store_partition(store),
                &to_i64("cursor", cursor.chain)?,
                &CLOUD_ESCROW_KINDS.to_vec(),
                &ledger.map(ActorId::as_str),
            ],
        )
        .await?;
    to_u64("pending rows", row.try_get(0)?)
}

// ---- HQ writes ----

/// The first stamp of an op applied before, if `op_id` was; claims it otherwise. A second
/// process applying the same op waits on the claim's key until the first commits.
async fn claim_op(tx: &Transaction<'_>, op_id: &str, now_ms: u64) -> Result<Option<Option<HlcStamp>>, StorageError> {
    let claimed = tx
        .execute(
            "INSERT INTO applied_ops (op_id, applied_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&op_id, &to_i64("time", now_ms)?],
        )
        .await?;
    if claimed == 1 {
        return Ok(None);
    }
    let row = tx.query_one("SELECT stamp_wall, stamp_logical FROM applied_ops WHERE op_id = $1", &[&op_id]).await?;
    let (wall, logical): (Option<i64>, Option<i64>) = (row.try_get(0)?, row.try_get(1)?);
    let stamp = match (wall, logical) {
        (Some(wall), Some(logical)) => Some(
            StampColumns { wall, logical, actor: ActorId::cloud().as_str().to_owned() }
                .stamp(&format!("applied op {op_id}"))?,
        ),
        _ => None,
    };
    Ok(Some(stamp))
}

async fn apply(tx: &Transaction<'_>, writes: &CloudWrites, now_ms: u64) -> Result<WritesApplied, StorageError> {
    if let Some(op_id) = &writes.op_id {
        if let Some(stamp) = claim_op(tx, op_id, now_ms).await? {
            return Ok(WritesApplied { replayed: true, stamp });
        }
    }
    let mut versions = lock_partitions(tx, &plan::writes_partitions(writes)).await?;
    let stamped = if writes.prices.is_empty() && writes.catalog.is_empty() {
        plan::Stamped::default()
    } else {
        let mut clock = lock_clock(tx).await?;
        let stamped = plan::stamp_writes(&mut clock, writes, now_ms);
        save_clock(tx, &clock).await?;
        stamped
    };
    merge_registers(tx, &stamped.prices, &stamped.catalog, &mut versions).await?;
    let keys: Vec<SlotKey> = writes.stock.iter().map(plan::cloud_slot_key).collect();
    let current = load_slots(tx, &keys).await?;
    write_slots(tx, &plan::apply_movements(&current, &writes.stock)?, &mut versions).await?;
    save_versions(tx, &versions).await?;
    if let (Some(op_id), Some(first)) = (&writes.op_id, &stamped.first) {
        tx.execute(
            "UPDATE applied_ops SET stamp_wall = $2, stamp_logical = $3 WHERE op_id = $1",
            &[op_id, &to_i64("stamp", first.wall_ms)?, &i64::from(first.logical)],
        )
        .await?;
    }
    Ok(WritesApplied { replayed: false, stamp: stamped.first })
}

const HELD_COLUMNS: &str = "id, sku, scope, slot, amount, currency, win_from, win_until, reason, held_at_ms";

fn held_from(row: &Row) -> Result<HeldPrice, StorageError> {
    let id: i64 = row.try_get(0)?;
    Ok(HeldPrice {
        id,
        write: price_at(row, 1)?.write()?,
        reason: row.try_get(8)?,
        held_at_ms: to_u64(&format!("held price {id}"), row.try_get(9)?)?,
    })
}

async fn confirm_held(tx: &Transaction<'_>, id: i64, now_ms: u64) -> Result<Option<WritesApplied>, StorageError> {
    // The delete locks the row: a second confirmation waits, then finds nothing.
    let row = tx.query_opt(&format!("DELETE FROM held_prices WHERE id = $1 RETURNING {HELD_COLUMNS}"), &[&id]).await?;
    match row {
        Some(row) => {
            let writes = CloudWrites { prices: vec![held_from(&row)?.write], ..CloudWrites::default() };
            Ok(Some(apply(tx, &writes, now_ms).await?))
        }
        None => Ok(None),
    }
}

// ---- online allocation and orders ----

/// The stored rows of `ids`, each found by primary key (those never written are absent), in
/// one round trip.
async fn load_escrow_ids(tx: &Transaction<'_>, ids: &[EscrowId]) -> Result<Vec<EscrowRow>, StorageError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let store: Vec<&str> = ids.iter().map(|i| i.store.as_str()).collect();
    let sku: Vec<&str> = ids.iter().map(|i| i.sku.as_str()).collect();
    let kind: Vec<&str> = ids.iter().map(|i| i.kind).collect();
    let order_id: Vec<&str> = ids.iter().map(|i| i.order_id.as_str()).collect();
    let found = tx
        .query(
            &format!(
                "SELECT {ESCROW_COLUMNS} FROM escrow_rows
                  WHERE (store, sku, kind, order_id) IN (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]))"
            ),
            &[&store, &sku, &kind, &order_id],
        )
        .await?;
    found.iter().map(|r| escrow_at(r, 0)?.row()).collect()
}

/// The `escrow_totals` rows `(sku, reserved, last_seq)` of `store`'s `skus` (none for a SKU
/// never reserved).
async fn load_totals(
    tx: &Transaction<'_>,
    store: &StoreId,
    skus: &[Sku],
) -> Result<Vec<(Sku, u64, u64)>, StorageError> {
    let names: Vec<&str> = skus.iter().map(Sku::as_str).collect();
    let rows = tx
        .query(
            "SELECT sku, reserved, last_seq FROM escrow_totals WHERE store = $1 AND sku = ANY($2)",
            &[&store.as_str(), &names],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let sku: String = r.try_get(0)?;
            let what = format!("reservation totals of {store}/{sku}");
            Ok((parse_sku(&what, sku)?, to_u64(&what, r.try_get(1)?)?, to_u64(&what, r.try_get(2)?)?))
        })
        .collect()
}

async fn save_totals(tx: &Transaction<'_>, store: &StoreId, totals: &[(Sku, u64, u64)]) -> Result<(), StorageError> {
    let (mut skus, mut reserved, mut last_seq) = (Vec::new(), Vec::new(), Vec::new());
    for (sku, r, s) in totals {
        let what = format!("reservation totals of {store}/{sku}");
        skus.push(sku.as_str());
        reserved.push(to_i64(&what, *r)?);
        last_seq.push(to_i64(&what, *s)?);
    }
    tx.execute(
        "INSERT INTO escrow_totals (store, sku, reserved, last_seq)
         SELECT $1::text, * FROM unnest($2::text[], $3::bigint[], $4::bigint[])
         ON CONFLICT (store, sku) DO UPDATE SET reserved = excluded.reserved, last_seq = excluded.last_seq",
        &[&store.as_str(), &skus, &reserved, &last_seq],
    )
    .await?;
    Ok(())
}

/// Every stored row of `store`'s `skus` (all its SKUs when `None`).
async fn load_escrow(
    tx: &Transaction<'_>,
    store: &StoreId,
    skus: Option<&[Sku]>,
) -> Result<Vec<EscrowRow>, StorageError> {
    let skus: Option<Vec<&str>> = skus.map(|s| s.iter().map(Sku::as_str).collect());
    let rows = tx
        .query(
            &format!(
                "SELECT {ESCROW_COLUMNS} FROM escrow_rows WHERE store = $1 AND ($2::text[] IS NULL OR sku = ANY($2))
                  ORDER BY sku, kind, order_id"
            ),
            &[&store.as_str(), &skus],
        )
        .await?;
    rows.iter().map(|r| escrow_at(r, 0)?.row()).collect()
}

/// The columns of a batch of escrow rows, one array each (for `unnest`).
#[derive(Default)]
struct EscrowArrays {
    store: Vec<String>,
    sku: Vec<String>,
    kind: Vec<String>,
    order_id: Vec<String>,
    units: Vec<i64>,
    seq: Vec<i64>,
    cancelled: Vec<bool>,
    version: Vec<i64>,
}

impl EscrowArrays {
    fn push(&mut self, c: EscrowColumns, version: i64) {
        self.store.push(c.store);
        self.sku.push(c.sku);
        self.kind.push(c.kind);
        self.order_id.push(c.order_id);
        self.units.push(c.units);
        self.seq.push(c.seq);
        self.cancelled.push(c.cancelled);
        self.version.push(version);
    }
}

/// Writes escrow rows, each with the version given beside it.
async fn write_escrow(tx: &Transaction<'_>, rows: &[(EscrowRow, u64)]) -> Result<(), StorageError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut a = EscrowArrays::default();
    for (row, version) in rows {
        a.push(EscrowColumns::of(row)?, to_i64("version", *version)?);
    }
    tx.execute(
        &format!(
            "INSERT INTO escrow_rows ({ESCROW_COLUMNS}, version)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[],
                                  $7::boolean[], $8::bigint[])
             ON CONFLICT (store, sku, kind, order_id) DO UPDATE SET units = excluded.units, seq = excluded.seq,
                 cancelled = excluded.cancelled, version = excluded.version"
        ),
        &[&a.store, &a.sku, &a.kind, &a.order_id, &a.units, &a.seq, &a.cancelled, &a.version],
    )
    .await?;
    Ok(())
}

/// Merges a store's `Granted` and `Fulfilled` rows; each row that changes takes its own
/// version. The first `Fulfilled` row of one of an order's lines (a key the order reserves)
/// tells the cloud it was handed over; one naming another SKU is kept as the merge rules say,
/// but hands nothing over.
async fn merge_escrow(
    tx: &Transaction<'_>,
    rows: &[EscrowRow],
    versions: &mut Versions,
    now_ms: u64,
) -> Result<(), StorageError> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<EscrowId> = rows.iter().map(EscrowId::of).collect();
    let changed = plan::merge_escrow(load_escrow_ids(tx, &ids).await?, rows)?;
    let mut numbered = Vec::with_capacity(changed.len());
    for row in changed {
        let version = versions.next(&store_partition(&row.key().store))?;
        numbered.push((row, version));
    }
    write_escrow(tx, &numbered).await?;
    let (mut orders, mut stores, mut skus) = (Vec::new(), Vec::new(), Vec::new());
    for (row, _) in &numbered {
        if let EscrowRow::Fulfilled { key, order } = row {
            orders.push(order.as_str());
            stores.push(key.store.as_str());
            skus.push(key.sku.as_str());
        }
    }
    if !orders.is_empty() {
        tx.execute(
            "UPDATE orders o SET handed_over_ms = $4
               FROM unnest($1::text[], $2::text[], $3::text[]) AS f (order_id, store, sku)
              WHERE o.handed_over_ms IS NULL AND o.order_id = f.order_id AND o.store = f.store
                AND EXISTS (SELECT 1 FROM escrow_rows e
                             WHERE e.store = f.store AND e.sku = f.sku AND e.kind = 'reservation'
                               AND e.order_id = f.order_id)",
            &[&orders, &stores, &skus, &to_i64("time", now_ms)?],
        )
        .await?;
    }
    Ok(())
}

const ORDER_COLUMNS: &str = "order_id, store, header, pickup_code, cancel_reason, cancelled_ms, handed_over_ms";

fn order_record(row: &Row) -> Result<OrderRecord, StorageError> {
    let (id, store, bytes): (String, String, Vec<u8>) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    let what = format!("order {id}");
    let header = codec::header_of(&id, &store, &bytes)?;
    let time = |v: Option<i64>| v.map(|v| to_u64(&what, v)).transpose();
    Ok(OrderRecord {
        header,
        pickup_code: row.try_get(3)?,
        cancel_reason: parse_reason(&what, row.try_get(4)?)?,
        cancelled_at_ms: time(row.try_get(5)?)?,
        handed_over_at_ms: time(row.try_get(6)?)?,
    })
}

async fn load_order(tx: &Transaction<'_>, order: &OrderId) -> Result<Option<OrderRecord>, StorageError> {
    let row =
        tx.query_opt(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1"), &[&order.as_str()]).await?;
    row.as_ref().map(order_record).transpose()
}

/// Under the partition lock, claims the order id and reserves every line; a short order leaves
/// neither the claim nor a reservation behind. A second process creating the same id waits on
/// the claim until this one commits, then finds it.
async fn create_order(tx: &Transaction<'_>, new: &NewOrder) -> Result<CreateOutcome, StorageError> {
    let h = &new.header;
    let partition = store_partition(&h.store);
    let mut versions = lock_partitions(tx, &BTreeSet::from([partition.clone()])).await?;
    let claimed = tx
        .execute(
            "INSERT INTO orders (order_id, store, header, version, created_ms, expires_ms, pickup_code)
             VALUES ($1, $2, $3, 0, $4, $5, $6) ON CONFLICT (order_id) DO NOTHING",
            &[
                &h.order.as_str(),
                &h.store.as_str(),
                &codec::header_bytes(h)?,
                &h.created_at_ms,
                &h.expires_at_ms,
                &new.pickup_code,
            ],
        )
        .await?;
    if claimed == 0 {
        let stored = load_order(tx, &h.order)
            .await?
            .ok_or_else(|| invariant(format!("order {} is claimed but not found", h.order)))?;
        let same = plan::same_order(&stored.header, h);
        return Ok(if same { CreateOutcome::Replayed(stored) } else { CreateOutcome::Conflict(stored) });
    }
    let skus: Vec<Sku> = h.lines.iter().map(|l| l.sku.clone()).collect();
    let rows = load_escrow_ids(tx, &plan::reserve_ids(h)).await?;
    let bases = plan::reserve_bases(h, rows, load_totals(tx, &h.store, &skus).await?)?;
    match plan::reserve_order(&bases, h)? {
        Err(short) => {
            tx.execute("DELETE FROM orders WHERE order_id = $1", &[&h.order.as_str()]).await?;
            Ok(CreateOutcome::Short(short))
        }
        Ok(reserved) => {
            let version = versions.next(&partition)?;
            write_escrow(tx, &reserved.rows.into_iter().map(|r| (r, version)).collect::<Vec<_>>()).await?;
            save_totals(tx, &h.store, &reserved.totals).await?;
            tx.execute(
                "UPDATE orders SET version = $2 WHERE order_id = $1",
                &[&h.order.as_str(), &to_i64("version", version)?],
            )
            .await?;
            save_versions(tx, &versions).await?;
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

/// Finds the order's store, takes its partition lock, then reads the order again: every writer
/// of an order row holds that lock, so what is read next is current.
async fn cancel_order(
    tx: &Transaction<'_>,
    order: &OrderId,
    reason: CancelReason,
    now_ms: u64,
) -> Result<CancelOutcome, StorageError> {
    let Some(first) = load_order(tx, order).await? else { return Ok(CancelOutcome::NotFound) };
    let partition = store_partition(&first.header.store);
    let mut versions = lock_partitions(tx, &BTreeSet::from([partition.clone()])).await?;
    let vanished = || invariant(format!("order {order} vanished while being cancelled"));
    let record = load_order(tx, order).await?.ok_or_else(vanished)?;
    let h = &record.header;
    let escrows = plan::escrows_of(h, load_escrow_ids(tx, &plan::order_row_ids(h)).await?)?;
    let rows = match plan::cancel_order(&escrows, h)? {
        Err(skus) => return Ok(CancelOutcome::AlreadyFulfilled { record, skus }),
        Ok(rows) => rows,
    };
    let flagged = !rows.is_empty();
    if flagged {
        let version = versions.next(&partition)?;
        write_escrow(tx, &rows.into_iter().map(|r| (r, version)).collect::<Vec<_>>()).await?;
        save_versions(tx, &versions).await?;
    }
    let reasoned = tx
        .execute(
            "UPDATE orders SET cancel_reason = $2, cancelled_ms = $3 WHERE order_id = $1 AND cancel_reason IS NULL",
            &[&order.as_str(), &reason.as_str(), &to_i64("time", now_ms)?],
        )
        .await?;
    let record = load_order(tx, order).await?.ok_or_else(vanished)?;
    Ok(CancelOutcome::Cancelled { record, changed: flagged || reasoned > 0 })
}

async fn allocations(
    tx: &Transaction<'_>,
    store: &StoreId,
    skus: Option<&[Sku]>,
) -> Result<Vec<Allocation>, StorageError> {
    let rows = load_escrow(tx, store, skus).await?;
    let escrows = plan::escrows(store, skus.unwrap_or_default().iter().cloned(), rows)?;
    let names: Vec<&str> = escrows.keys().map(Sku::as_str).collect();
    let slots = tx
        .query("SELECT sku, inc, dec FROM stock_slots WHERE store = $1 AND sku = ANY($2)", &[&store.as_str(), &names])
        .await?;
    let mut on_hand: BTreeMap<String, i128> = BTreeMap::new();
    for r in &slots {
        let sku: String = r.try_get(0)?;
        let what = format!("stock slot {store}/{sku}");
        let slot = Slot { inc: to_u64(&what, r.try_get(1)?)?, dec: to_u64(&what, r.try_get(2)?)? };
        *on_hand.entry(sku).or_default() += slot.value();
    }
    Ok(escrows
        .into_iter()
        .map(|(sku, escrow)| Allocation { on_hand: on_hand.get(sku.as_str()).copied().unwrap_or(0), escrow })
        .collect())
}

// ---- reads for HQ ----

async fn status_from(tx: &Transaction<'_>, row: &Row) -> Result<StoreStatus, StorageError> {
    let store = parse_store("store", row.try_get(0)?)?;
    let what = format!("sync state of {store}");
    let last_seen: Option<i64> = row.try_get(2)?;
    let cursor = Cursor { chain: to_u64(&what, row.try_get(5)?)?, store: to_u64(&what, row.try_get(6)?)? };
    let ledger_actor: Option<String> = row.try_get(8)?;
    let ledger_actor = ledger_actor.map(|a| parse_actor(&what, a)).transpose()?;
    Ok(StoreStatus {
        created_at_ms: to_u64(&what, row.try_get(1)?)?,
        last_seen_ms: last_seen.map(|v| to_u64(&what, v)).transpose()?,
        head_version: to_u64(&what, row.try_get(3)?)?,
        acked_version: to_u64(&what, row.try_get(4)?)?,
        cursor,
        pending_rows: pending_rows(tx, &store, cursor, ledger_actor.as_ref()).await?,
        ledger_actor,
        refused_rows: to_u64(&what, row.try_get(7)?)?,
        store,
    })
}

async fn stores(tx: &Transaction<'_>) -> Result<Vec<StoreStatus>, StorageError> {
    let rows = tx
        .query(
            "SELECT s.id, s.created_ms, y.last_seen_ms, coalesce(y.head_version, 0), coalesce(y.acked_version, 0),
                    coalesce(y.cursor_chain, 0), coalesce(y.cursor_store, 0), coalesce(y.refused_rows, 0),
                    y.ledger_actor
               FROM stores s LEFT JOIN sync_state y ON y.store = s.id ORDER BY s.id",
            &[],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        out.push(status_from(tx, row).await?);
    }
    Ok(out)
}

async fn slots_where(tx: &Transaction<'_>, filter: &str, key: &str) -> Result<Vec<SlotRow>, StorageError> {
    let rows = tx
        .query(&format!("SELECT {SLOT_COLUMNS} FROM stock_slots WHERE {filter} ORDER BY store, sku, actor"), &[&key])
        .await?;
    rows.iter().map(|r| slot_at(r, 0)?.row()).collect()
}

/// Runs one write transaction and commits it. READ COMMITTED, asked for explicitly whatever the
/// server's `default_transaction_isolation`: each statement sees what committed before it,
/// which after the partition locks is what a merge, a reservation check or an order claim must
/// read. Under REPEATABLE READ or SERIALIZABLE a statement would read the snapshot taken before
/// the lock was granted (a stale counter, stale totals), or fail with a serialization error.
macro_rules! write_tx {
    ($self:expr, |$tx:ident| $body:expr) => {{
        let mut conn = $self.pool.get().await?;
        let $tx = conn.build_transaction().isolation_level(IsolationLevel::ReadCommitted).start().await?;
        let out = $body;
        $tx.commit().await?;
        Ok(out)
    }};
}

/// Runs one consistent read: every statement sees the same snapshot, so a page cut from two
/// tables never mixes two moments.
macro_rules! read_tx {
    ($self:expr, |$tx:ident| $body:expr) => {{
        let mut conn = $self.pool.get().await?;
        let $tx =
            conn.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start().await?;
        let out = $body;
        $tx.commit().await?;
        Ok(out)
    }};
}

impl Storage for PostgresStorage {
    async fn migrate(&self) -> Result<(), StorageError> {
        write_tx!(self, |tx| migrate(&tx).await?)
    }

    async fn add_store(&self, store: &StoreId, token_sha256: [u8; 32], now_ms: u64) -> Result<(), StorageError> {
        write_tx!(self, |tx| {
            let added = tx
                .execute(
                    "INSERT INTO stores (id, token_sha256, created_ms) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
                    &[&store.as_str(), &&token_sha256[..], &to_i64("time", now_ms)?],
                )
                .await?;
            if added == 0 {
                return Err(StorageError::StoreExists(store.clone()));
            }
            // Counter before sync state: the lock order every transaction follows.
            lock_partitions(&tx, &BTreeSet::from([store_partition(store)])).await?;
            tx.execute("INSERT INTO sync_state (store) VALUES ($1) ON CONFLICT DO NOTHING", &[&store.as_str()]).await?;
        })
    }

    async fn add_admin(&self, name: &str, token_sha256: [u8; 32], now_ms: u64) -> Result<(), StorageError> {
        write_tx!(self, |tx| {
            let added = tx
                .execute(
                    "INSERT INTO admins (name, token_sha256, created_ms) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
                    &[&name, &&token_sha256[..], &to_i64("time", now_ms)?],
                )
                .await?;
            if added == 0 {
                return Err(StorageError::AdminExists(name.to_owned()));
            }
        })
    }

    async fn authenticate(&self, token_sha256: [u8; 32]) -> Result<Option<Principal>, StorageError> {
        let hash = &token_sha256[..];
        read_tx!(self, |tx| {
            match tx.query_opt("SELECT id FROM stores WHERE token_sha256 = $1", &[&hash]).await? {
                Some(row) => Some(Principal::Store(parse_store("store", row.try_get(0)?)?)),
                None => {
                    let admin = tx.query_opt("SELECT name FROM admins WHERE token_sha256 = $1", &[&hash]).await?;
                    admin.map(|r| r.try_get(0)).transpose()?.map(Principal::Admin)
                }
            }
        })
    }

    async fn push(&self, report: SyncReport<'_>) -> Result<u64, StorageError> {
        write_tx!(self, |tx| push(&tx, &report).await?)
    }

    async fn pull(
        &self,
        store: &StoreId,
        cursor: Cursor,
        max_rows: u32,
        leave_out: Option<ActorId>,
    ) -> Result<Page, StorageError> {
        let max = max_rows.min(shared::sync::MAX_PAGE_ROWS) as usize;
        read_tx!(self, |tx| pull(&tx, store, cursor, max, leave_out.as_ref()).await?)
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
        let store = store.map(|s| s.as_str());
        write_tx!(self, |tx| {
            if let Some(s) = store {
                tx.execute(
                    "INSERT INTO sync_state (store, refused_rows) VALUES ($1, $2)
                     ON CONFLICT (store) DO UPDATE SET refused_rows = sync_state.refused_rows + excluded.refused_rows",
                    &[&s, &to_i64("refused rows", rows)?],
                )
                .await?;
            }
            if security {
                tx.execute(
                    "INSERT INTO security_events (at_ms, store, kind, detail) VALUES ($1, $2, $3, $4)",
                    &[&to_i64("time", now_ms)?, &store, &kind, &detail],
                )
                .await?;
            }
        })
    }

    async fn security_events(&self, limit: u32) -> Result<Vec<SecurityEvent>, StorageError> {
        read_tx!(self, |tx| {
            let rows = tx
                .query(
                    "SELECT at_ms, store, kind, detail FROM security_events ORDER BY id DESC LIMIT $1",
                    &[&i64::from(limit)],
                )
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let store: Option<String> = row.try_get(1)?;
                out.push(SecurityEvent {
                    at_ms: to_u64("security event time", row.try_get(0)?)?,
                    store: store.map(|s| parse_store("security event store", s)).transpose()?,
                    kind: row.try_get(2)?,
                    detail: row.try_get(3)?,
                });
            }
            out
        })
    }

    async fn apply(&self, writes: &CloudWrites, now_ms: u64) -> Result<WritesApplied, StorageError> {
        write_tx!(self, |tx| apply(&tx, writes, now_ms).await?)
    }

    async fn hold_price(&self, write: &PriceWrite, reason: &str, now_ms: u64) -> Result<i64, StorageError> {
        let p = PriceColumns::of(&write.key, write.value.as_ref())?;
        write_tx!(self, |tx| {
            let row = tx
                .query_one(
                    "INSERT INTO held_prices (sku, scope, slot, amount, currency, win_from, win_until, reason, held_at_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                    &[
                        &p.sku,
                        &p.scope,
                        &p.slot,
                        &p.amount,
                        &p.currency,
                        &p.win_from,
                        &p.win_until,
                        &reason,
                        &to_i64("time", now_ms)?,
                    ],
                )
                .await?;
            row.try_get::<_, i64>(0)?
        })
    }

    async fn held_prices(&self) -> Result<Vec<HeldPrice>, StorageError> {
        read_tx!(self, |tx| {
            let rows = tx.query(&format!("SELECT {HELD_COLUMNS} FROM held_prices ORDER BY id"), &[]).await?;
            rows.iter().map(held_from).collect::<Result<Vec<_>, _>>()?
        })
    }

    async fn confirm_held(&self, id: i64, now_ms: u64) -> Result<Option<WritesApplied>, StorageError> {
        write_tx!(self, |tx| confirm_held(&tx, id, now_ms).await?)
    }

    async fn prices_of(&self, sku: &Sku) -> Result<Vec<PriceEntry>, StorageError> {
        read_tx!(self, |tx| {
            let rows = tx
                .query(
                    &format!("SELECT {PRICE_COLUMNS} FROM prices WHERE sku = $1 ORDER BY scope, slot"),
                    &[&sku.as_str()],
                )
                .await?;
            rows.iter().map(price_entry).collect::<Result<Vec<_>, _>>()?
        })
    }

    async fn catalog_of(&self, sku: &Sku) -> Result<Vec<CatalogUpdate>, StorageError> {
        read_tx!(self, |tx| {
            let rows = tx
                .query(
                    &format!("SELECT {CATALOG_COLUMNS} FROM catalog WHERE sku = $1 ORDER BY field"),
                    &[&sku.as_str()],
                )
                .await?;
            rows.iter().map(catalog_update).collect::<Result<Vec<_>, _>>()?
        })
    }

    async fn stock_of_sku(&self, sku: &Sku) -> Result<Vec<SlotRow>, StorageError> {
        read_tx!(self, |tx| slots_where(&tx, "sku = $1", sku.as_str()).await?)
    }

    async fn stock_of_store(&self, store: &StoreId) -> Result<Vec<SlotRow>, StorageError> {
        read_tx!(self, |tx| slots_where(&tx, "store = $1", store.as_str()).await?)
    }

    async fn store_exists(&self, store: &StoreId) -> Result<bool, StorageError> {
        // One statement is a consistent read by itself: no transaction round trips.
        let conn = self.pool.get().await?;
        let row = conn.query_one("SELECT EXISTS (SELECT 1 FROM stores WHERE id = $1)", &[&store.as_str()]).await?;
        Ok(row.try_get(0)?)
    }

    async fn stores(&self) -> Result<Vec<StoreStatus>, StorageError> {
        read_tx!(self, |tx| stores(&tx).await?)
    }

    async fn known_skus(&self, skus: &[Sku]) -> Result<Vec<Sku>, StorageError> {
        let names: Vec<&str> = skus.iter().map(Sku::as_str).collect();
        let found: Result<BTreeSet<String>, StorageError> = read_tx!(self, |tx| {
            let rows = tx.query("SELECT DISTINCT sku FROM catalog WHERE sku = ANY($1)", &[&names]).await?;
            rows.iter().map(|r| r.try_get::<_, String>(0)).collect::<Result<BTreeSet<_>, _>>()?
        });
        let found = found?;
        Ok(skus.iter().filter(|s| found.contains(s.as_str())).cloned().collect())
    }

    async fn create_order(&self, order: &NewOrder) -> Result<CreateOutcome, StorageError> {
        write_tx!(self, |tx| create_order(&tx, order).await?)
    }

    async fn cancel_order(
        &self,
        order: &OrderId,
        reason: CancelReason,
        now_ms: u64,
    ) -> Result<CancelOutcome, StorageError> {
        write_tx!(self, |tx| cancel_order(&tx, order, reason, now_ms).await?)
    }

    async fn order(&self, order: &OrderId) -> Result<Option<OrderRecord>, StorageError> {
        read_tx!(self, |tx| load_order(&tx, order).await?)
    }

    async fn store_orders(
        &self,
        store: &StoreId,
        state: Option<OrderState>,
        limit: u32,
    ) -> Result<Vec<OrderRecord>, StorageError> {
        read_tx!(self, |tx| {
            let rows = tx
                .query(
                    &format!(
                        "SELECT {ORDER_COLUMNS} FROM orders WHERE store = $1 AND {}
                          ORDER BY created_ms DESC, order_id DESC LIMIT $2",
                        codec::order_state_sql(state)
                    ),
                    &[&store.as_str(), &i64::from(limit)],
                )
                .await?;
            rows.iter().map(order_record).collect::<Result<Vec<_>, _>>()?
        })
    }

    async fn due_orders(&self, now_ms: u64, limit: u32) -> Result<Vec<OrderId>, StorageError> {
        read_tx!(self, |tx| {
            let rows = tx
                .query(
                    "SELECT order_id FROM orders
                      WHERE cancel_reason IS NULL AND handed_over_ms IS NULL AND expires_ms <= $1
                      ORDER BY expires_ms, order_id LIMIT $2",
                    &[&to_i64("time", now_ms)?, &i64::from(limit)],
                )
                .await?;
            rows.iter().map(|r| parse_order("due order", r.try_get(0)?)).collect::<Result<Vec<_>, _>>()?
        })
    }

    async fn allocations(&self, store: &StoreId, skus: Option<&[Sku]>) -> Result<Vec<Allocation>, StorageError> {
        read_tx!(self, |tx| allocations(&tx, store, skus).await?)
    }
}
