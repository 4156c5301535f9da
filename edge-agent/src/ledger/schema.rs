//! Opening the ledger file: refuse what is not ours (a corrupt file, another application's
//! database, a newer schema, another store's ledger) with an error that says which, then apply
//! pending migrations in one transaction. Migrations only ever append to [`MIGRATIONS`].

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use shared::{ActorId, StoreId};

use super::LedgerError;

/// `PRAGMA application_id` of a store-edge ledger: "SEDG".
pub const APPLICATION_ID: i32 = 0x5345_4447;

/// Schema migrations, applied in order; `PRAGMA user_version` counts how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: the event log and the first projections.
    "
    CREATE TABLE meta (key TEXT PRIMARY KEY, value ANY) STRICT, WITHOUT ROWID;

    -- Append-only: sequence, HLC, idempotency key, versioned postcard body, hash chain.
    CREATE TABLE events (
        seq         INTEGER PRIMARY KEY,
        hlc_wall    INTEGER NOT NULL,
        hlc_logical INTEGER NOT NULL,
        actor       TEXT    NOT NULL,
        kind        TEXT    NOT NULL,
        idem_key    TEXT    NOT NULL UNIQUE,
        body        BLOB    NOT NULL,
        prev_hash   BLOB    NOT NULL,
        hash        BLOB    NOT NULL
    ) STRICT;

    -- PN-counter slots; version = local change version of the last change (delta cursor).
    CREATE TABLE stock_slots (
        store   TEXT    NOT NULL,
        sku     TEXT    NOT NULL,
        actor   TEXT    NOT NULL,
        inc     INTEGER NOT NULL CHECK (inc >= 0),
        dec     INTEGER NOT NULL CHECK (dec >= 0),
        version INTEGER NOT NULL,
        PRIMARY KEY (store, sku, actor)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX stock_slots_by_version ON stock_slots (version);

    -- LWW price registers; amount NULL = price withdrawn.
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
        version     INTEGER NOT NULL,
        PRIMARY KEY (sku, scope, slot)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX prices_by_version ON prices (version);

    -- Per-field LWW catalog; value is the postcard CatalogField.
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

    -- Derived from the catalog's gtins field, for scanner lookups.
    CREATE TABLE gtin_index (gtin TEXT NOT NULL, sku TEXT NOT NULL, PRIMARY KEY (gtin, sku)) STRICT, WITHOUT ROWID;

    -- The outbox: this store's own writes not yet acknowledged by the cloud. A view over the
    -- projections' change versions, so recording a change costs no extra write.
    CREATE VIEW outbox AS
        SELECT 'stock' AS entity, store || '/' || sku || '/' || actor AS entity_key, version
          FROM stock_slots
         WHERE actor = (SELECT value FROM meta WHERE key = 'actor')
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version')
        UNION ALL
        SELECT 'price', sku || '/' || scope || '/' || slot, version
          FROM prices
         WHERE actor = (SELECT value FROM meta WHERE key = 'actor')
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version')
        UNION ALL
        SELECT 'catalog', sku || '/' || field, version
          FROM catalog
         WHERE actor = (SELECT value FROM meta WHERE key = 'actor')
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version');
    ",
    // 2: self-checkout baskets in progress, so a restart resumes them.
    "
    CREATE TABLE lane_baskets (lane TEXT PRIMARY KEY, basket BLOB NOT NULL) STRICT, WITHOUT ROWID;
    ",
    // 3: RFID-tagged items sold, for the exit gate.
    "
    CREATE TABLE sold_epcs (epc BLOB PRIMARY KEY, seq INTEGER NOT NULL) STRICT, WITHOUT ROWID;
    ",
    // 4: the outbox holds only what the cloud accepts from a store: chain prices written here
    // (a store that ran alone) stay local, or every push would be refused for them.
    "
    DROP VIEW outbox;
    CREATE VIEW outbox AS
        SELECT 'stock' AS entity, store || '/' || sku || '/' || actor AS entity_key, version
          FROM stock_slots
         WHERE actor = (SELECT value FROM meta WHERE key = 'actor')
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version')
        UNION ALL
        SELECT 'price', sku || '/' || scope || '/' || slot, version
          FROM prices
         WHERE actor = (SELECT value FROM meta WHERE key = 'actor')
           AND scope = 'store:' || (SELECT value FROM meta WHERE key = 'store')
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version')
        UNION ALL
        SELECT 'catalog', sku || '/' || field, version
          FROM catalog
         WHERE actor = (SELECT value FROM meta WHERE key = 'actor')
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version');
    ",
    // 5: online pickup orders. This store's allocation rows (shared::escrow: its own `granted`
    // and `fulfilled`, the cloud's `released` and `reservation`), the order headers HQ sent, and
    // the local marks on them. Own rows carry the change version, so the outbox includes them.
    "
    CREATE TABLE escrow (
        sku       TEXT    NOT NULL,
        kind      TEXT    NOT NULL CHECK (kind IN ('granted', 'released', 'reservation', 'fulfilled')),
        order_id  TEXT    NOT NULL,  -- '' for granted and released
        units     INTEGER NOT NULL CHECK (units >= 0),  -- granted / released total, or the line's units
        seq       INTEGER NOT NULL CHECK (seq >= 0),    -- a reservation's order within the SKU
        cancelled INTEGER NOT NULL CHECK (cancelled IN (0, 1)),
        version   INTEGER NOT NULL,
        PRIMARY KEY (sku, kind, order_id)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX escrow_by_version ON escrow (version);
    CREATE INDEX escrow_by_order ON escrow (order_id);

    -- Immutable once HQ created them (a differing copy is refused). The marks are this store's.
    CREATE TABLE orders (
        order_id          TEXT    PRIMARY KEY,
        header            BLOB    NOT NULL,  -- version byte + postcard OrderHeader
        created_at_ms     INTEGER NOT NULL,
        expires_at_ms     INTEGER NOT NULL,
        version           INTEGER NOT NULL,
        picked_at_ms      INTEGER,
        picked_seq        INTEGER,
        handed_over_at_ms INTEGER,
        handed_over_seq   INTEGER
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX orders_by_created ON orders (created_at_ms);

    DROP VIEW outbox;
    CREATE VIEW outbox AS
        SELECT 'stock' AS entity, store || '/' || sku || '/' || actor AS entity_key, version
          FROM stock_slots
         WHERE actor = (SELECT value FROM meta WHERE key = 'actor')
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version')
        UNION ALL
        SELECT 'price', sku || '/' || scope || '/' || slot, version
          FROM prices
         WHERE actor = (SELECT value FROM meta WHERE key = 'actor')
           AND scope = 'store:' || (SELECT value FROM meta WHERE key = 'store')
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version')
        UNION ALL
        SELECT 'catalog', sku || '/' || field, version
          FROM catalog
         WHERE actor = (SELECT value FROM meta WHERE key = 'actor')
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version')
        UNION ALL
        SELECT 'escrow', sku || '/' || kind || '/' || order_id, version
          FROM escrow
         WHERE kind IN ('granted', 'fulfilled')
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version');
    ",
    // 6: the writer's online checks read only what is open, not a SKU's whole order history: a
    // reservation row says whether it still waits for pickup (`open`: not cancelled, not handed
    // over; kept by `allocation::write_row`), indexed for the open ones only, and each SKU's sum
    // of reserved units is kept as one row (reservations never change size).
    "
    ALTER TABLE escrow ADD COLUMN open INTEGER NOT NULL DEFAULT 0 CHECK (open IN (0, 1));
    UPDATE escrow SET open = 1
     WHERE kind = 'reservation' AND cancelled = 0
       AND NOT EXISTS (SELECT 1 FROM escrow f
                        WHERE f.sku = escrow.sku AND f.kind = 'fulfilled' AND f.order_id = escrow.order_id);
    CREATE INDEX escrow_open ON escrow (sku, seq) WHERE open = 1;

    CREATE TABLE escrow_reserved (
        sku   TEXT    PRIMARY KEY,
        units INTEGER NOT NULL CHECK (units >= 0)  -- sum of the SKU's reservations, ever
    ) STRICT, WITHOUT ROWID;
    INSERT INTO escrow_reserved (sku, units)
        SELECT sku, sum(units) FROM escrow WHERE kind = 'reservation' GROUP BY sku;
    ",
    // 7: stock slots in a rowid table with an integer key. The writer updates the store's own
    // slots by `id` (it keeps each slot's id in memory beside its value), so a slot write seeks
    // one integer instead of three text columns, and the version index (the outbox's cursor)
    // holds (version, id) instead of repeating the text key; `stock_slots_key` keeps the text
    // key unique. Rows are copied unchanged; the outbox view is recreated as it was.
    "
    CREATE TABLE stock_slots_v7 (
        id      INTEGER PRIMARY KEY,
        store   TEXT    NOT NULL,
        sku     TEXT    NOT NULL,
        actor   TEXT    NOT NULL,
        inc     INTEGER NOT NULL CHECK (inc >= 0),
        dec     INTEGER NOT NULL CHECK (dec >= 0),
        version INTEGER NOT NULL
    ) STRICT;
    INSERT INTO stock_slots_v7 (store, sku, actor, inc, dec, version)
        SELECT store, sku, actor, inc, dec, version FROM stock_slots ORDER BY store, sku, actor;
    DROP VIEW outbox;
    DROP TABLE stock_slots;
    ALTER TABLE stock_slots_v7 RENAME TO stock_slots;
    CREATE UNIQUE INDEX stock_slots_key ON stock_slots (store, sku, actor);
    CREATE INDEX stock_slots_by_version ON stock_slots (version);
    CREATE VIEW outbox AS
        SELECT 'stock' AS entity, store || '/' || sku || '/' || actor AS entity_key, version
          FROM stock_slots
         WHERE actor = (SELECT value FROM meta WHERE key = 'actor')
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version')
        UNION ALL
        SELECT 'price', sku || '/' || scope || '/' || slot, version
          FROM prices
         WHERE actor = (SELECT value FROM meta WHERE key = 'actor')
           AND scope = 'store:' || (SELECT value FROM meta WHERE key = 'store')
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version')
        UNION ALL
        SELECT 'catalog', sku || '/' || field, version
          FROM catalog
         WHERE actor = (SELECT value FROM meta WHERE key = 'actor')
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version')
        UNION ALL
        SELECT 'escrow', sku || '/' || kind || '/' || order_id, version
          FROM escrow
         WHERE kind IN ('granted', 'fulfilled')
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version');
    ",
    // 8: the actors this ledger has written as. A ledger restored from a `storectl backup`
    // writes as a new actor from then on (its old actor's counts in the cloud are ahead of the
    // restored ones, and a per-slot max would hide its new sales), but what it wrote as its
    // old actor and never pushed must still go out: the outbox holds the rows of all of them.
    "
    CREATE TABLE own_actors (actor TEXT PRIMARY KEY, since_seq INTEGER NOT NULL) STRICT, WITHOUT ROWID;
    INSERT INTO own_actors (actor, since_seq) SELECT value, 1 FROM meta WHERE key = 'actor';
    DROP VIEW outbox;
    CREATE VIEW outbox AS
        SELECT 'stock' AS entity, store || '/' || sku || '/' || actor AS entity_key, version
          FROM stock_slots
         WHERE actor IN (SELECT actor FROM own_actors)
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version')
        UNION ALL
        SELECT 'price', sku || '/' || scope || '/' || slot, version
          FROM prices
         WHERE actor IN (SELECT actor FROM own_actors)
           AND scope = 'store:' || (SELECT value FROM meta WHERE key = 'store')
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version')
        UNION ALL
        SELECT 'catalog', sku || '/' || field, version
          FROM catalog
         WHERE actor IN (SELECT actor FROM own_actors)
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version')
        UNION ALL
        SELECT 'escrow', sku || '/' || kind || '/' || order_id, version
          FROM escrow
         WHERE kind IN ('granted', 'fulfilled')
           AND version > (SELECT value FROM meta WHERE key = 'pushed_version');
    ",
];

pub fn latest_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Maps SQLite's "this is not a database" family to a clear error about the file.
fn classify(path: &Path, err: rusqlite::Error) -> LedgerError {
    use rusqlite::ErrorCode::*;
    match err.sqlite_error_code() {
        Some(NotADatabase) | Some(DatabaseCorrupt) => {
            LedgerError::NotADatabase { path: path.to_owned(), detail: err.to_string() }
        }
        Some(CannotOpen) | Some(ReadOnly) | Some(PermissionDenied) => LedgerError::CannotOpen {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, err.to_string()),
        },
        _ => LedgerError::Sqlite(err),
    }
}

fn check_identity(conn: &Connection, path: &Path) -> Result<i64, LedgerError> {
    let app_id: i32 = conn.pragma_query_value(None, "application_id", |r| r.get(0)).map_err(|e| classify(path, e))?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(|e| classify(path, e))?;
    let tables: i64 =
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0)).map_err(|e| classify(path, e))?;
    if app_id != APPLICATION_ID && !(app_id == 0 && version == 0 && tables == 0) {
        return Err(LedgerError::Foreign { path: path.to_owned(), found: app_id });
    }
    if version > latest_version() {
        return Err(LedgerError::TooNew { path: path.to_owned(), found: version, known: latest_version() });
    }
    if version < 0 {
        return Err(LedgerError::Corrupt {
            seq: None,
            detail: format!("{}: schema version {version} is negative", path.display()),
        });
    }
    Ok(version)
}

/// Opens (creating if needed) the ledger for writing, migrated to the latest schema and bound
/// to `store`; returns it with the actor it writes with (see [`bind_store`]).
pub fn open_for_writing(path: &Path, store: &StoreId) -> Result<(Connection, ActorId), LedgerError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| LedgerError::CannotOpen { path: dir.to_owned(), source })?;
    }
    // Probe with plain file I/O first: SQLite's "unable to open database file" hides the cause.
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| LedgerError::CannotOpen { path: path.to_owned(), source })?;
    let mut conn = Connection::open(path).map_err(|e| classify(path, e))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let version = check_identity(&conn, path)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(|e| classify(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(LedgerError::CannotOpen {
            path: path.to_owned(),
            source: std::io::Error::other(format!("the file system refused WAL mode (got {mode})")),
        });
    }
    // Money and stock: every commit reaches the disk before the caller hears "done".
    conn.pragma_update(None, "synchronous", "FULL")?;
    tune(&conn)?;
    migrate(&mut conn, version)?;
    let actor = bind_store(&conn, path, store)?;
    Ok((conn, actor))
}

/// Page cache and checkpoint sizes for the writer (the benchmark applies the same to its bare
/// reference loop). A bigger cache keeps index pages of the hot tables in memory; a longer WAL
/// before the automatic checkpoint means fewer checkpoint stalls inside commits, at the cost of
/// a WAL of up to ~16 MiB that readers scan.
pub fn tune(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "cache_size", -16_384)?;
    conn.pragma_update(None, "wal_autocheckpoint", 4_000)?;
    Ok(())
}

fn migrate(conn: &mut Connection, from: i64) -> Result<(), LedgerError> {
    if from == latest_version() {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        tx.execute_batch(sql)?;
        tracing::info!(schema_version = i + 1, "Ledger schema migrated");
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.pragma_update(None, "user_version", latest_version())?;
    tx.commit()?;
    Ok(())
}

/// A ledger belongs to one store for life: refuse to open another store's file. A new ledger
/// gets an actor of its own (`store:{store}:{random}`), never an earlier ledger's: a store
/// whose disk died starts a new ledger, and its counts must add to the old ledger's in the
/// cloud, not be max-merged into them. A ledger created before ledgers had their own actor
/// keeps `store:{store}`. A ledger restored from a `storectl backup` (marked `meta.backup`)
/// takes a new actor at its first open, for the same reason (see [`write_as_new_actor`]).
fn bind_store(conn: &Connection, path: &Path, store: &StoreId) -> Result<ActorId, LedgerError> {
    let bound: Option<(String, Option<String>)> = conn
        .query_row(
            "SELECT s.value, (SELECT a.value FROM meta a WHERE a.key = 'actor') FROM meta s WHERE s.key = 'store'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let actor = match bound {
        Some((found, _)) if found != store.as_str() => {
            return Err(LedgerError::WrongStore { path: path.to_owned(), found, expected: store.to_string() })
        }
        Some((_, actor)) => {
            let actor = actor.unwrap_or_default();
            match ActorId::new(actor.as_str()) {
                Ok(id) if id.is_of_store(store) => id,
                _ => {
                    return Err(LedgerError::Corrupt {
                        seq: None,
                        detail: format!(
                            "{}: meta actor {actor:?} is not an actor of store {store} (store:{store}[:LEDGER])",
                            path.display()
                        ),
                    })
                }
            }
        }
        None => {
            let actor = new_actor(store)?;
            // One transaction: a ledger bound to an actor missing from `own_actors` would
            // never push what it writes.
            let tx = conn.unchecked_transaction()?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('store', ?1), ('actor', ?2), ('pushed_version', 0)",
                [store.as_str(), actor.as_str()],
            )?;
            tx.execute("INSERT INTO own_actors (actor, since_seq) VALUES (?1, 1)", [actor.as_str()])?;
            tx.commit()?;
            tracing::info!(store_id = %store, actor = %actor, "New ledger: writing as a new actor of the store");
            return Ok(actor);
        }
    };
    // The current actor is always one of the ledger's own. Only a file bound by a version that
    // wrote the two rows apart can lack it, and then `own_actors` is empty; any other gap means
    // the file was edited.
    let empty: bool = conn.query_row("SELECT NOT EXISTS (SELECT 1 FROM own_actors)", [], |r| r.get(0))?;
    let listed: bool =
        conn.query_row("SELECT EXISTS (SELECT 1 FROM own_actors WHERE actor = ?1)", [actor.as_str()], |r| r.get(0))?;
    if empty {
        conn.execute("INSERT INTO own_actors (actor, since_seq) VALUES (?1, 1)", [actor.as_str()])?;
    } else if !listed {
        return Err(LedgerError::Corrupt {
            seq: None,
            detail: format!("{}: meta actor {actor} is not among the ledger's own actors (own_actors)", path.display()),
        });
    }
    let restored: Option<i64> =
        conn.query_row("SELECT value FROM meta WHERE key = 'backup'", [], |r| r.get(0)).optional()?;
    if restored.is_some() {
        return write_as_new_actor(conn, store, &actor);
    }
    Ok(actor)
}

fn new_actor(store: &StoreId) -> Result<ActorId, LedgerError> {
    ActorId::for_store_ledger(store, &format!("{:016x}", rand::random::<u64>()))
        .map_err(|e| LedgerError::Corrupt { seq: None, detail: e.to_string() })
}

/// A backup put in place of a lost ledger: the cloud holds its actor's counts as the lost
/// ledger left them, ahead of the restored ones, so a sale written as that actor before the
/// next sync would vanish in the per-slot max. From here on it writes as a new actor; what
/// it wrote as the old one stays its own to push (`own_actors`), and the cloud's later counts
/// of the old actor come back by the usual max merge.
fn write_as_new_actor(conn: &Connection, store: &StoreId, old: &ActorId) -> Result<ActorId, LedgerError> {
    let actor = new_actor(store)?;
    let tx = conn.unchecked_transaction()?;
    let next_seq: i64 = tx.query_row("SELECT coalesce(max(seq), 0) + 1 FROM events", [], |r| r.get(0))?;
    tx.execute("UPDATE meta SET value = ?1 WHERE key = 'actor'", [actor.as_str()])?;
    tx.execute("INSERT INTO own_actors (actor, since_seq) VALUES (?1, ?2)", params![actor.as_str(), next_seq])?;
    tx.execute("DELETE FROM meta WHERE key = 'backup'", [])?;
    tx.commit()?;
    tracing::warn!(
        store_id = %store,
        previous_actor = %old,
        actor = %actor,
        from_seq = next_seq,
        error_code = "LEDGER_RESTORED_FROM_BACKUP",
        "This ledger was restored from a backup: it writes as a new actor of the store from here on, so sales before its next sync are not hidden by the counts the cloud holds for the old one"
    );
    Ok(actor)
}

/// Marks the ledger file at `path` (a fresh backup copy, not a live ledger) as a backup, in
/// one transaction: a ledger restored from it writes as a new actor at its first open, and
/// counts as not caught up with the cloud (`bootstrapped = 0`): whenever it is restored, the
/// cloud has moved on (orders reserved, cancelled, handed over), so it neither grants nor
/// hands over until its first complete sync.
pub(crate) fn mark_as_backup(path: &Path) -> Result<(), LedgerError> {
    let mut conn = Connection::open(path).map_err(|e| classify(path, e))?;
    let tx = conn.transaction()?;
    tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('backup', 1), ('bootstrapped', 0)", [])?;
    tx.commit()?;
    Ok(())
}

/// Opens an existing ledger read-only (storectl with the daemon down, or a reader beside the
/// writer). Never creates or migrates anything.
pub fn open_read_only(path: &Path) -> Result<Connection, LedgerError> {
    if !path.exists() {
        return Err(LedgerError::CannotOpen {
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no ledger file here (has the daemon ever run with this data folder?)",
            ),
        });
    }
    let conn = crate::read_only::open(path).map_err(|e| classify(path, e))?;
    let version = check_identity(&conn, path)?;
    if version < latest_version() {
        return Err(LedgerError::TooOld { path: path.to_owned(), found: version, known: latest_version() });
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use rusqlite::Connection;
    use shared::{Currency, Money, Sku, StoreId};

    use crate::ledger::{Command, IdempotencyKey, Ledger, LedgerOptions, LedgerReader, SaleLine, Tender};

    fn opts() -> LedgerOptions {
        LedgerOptions::new(StoreId::new("s1").unwrap(), Currency::new("EUR").unwrap())
    }

    fn sell(dir: &Path, keys: std::ops::Range<u32>) {
        let (handle, writer) = Ledger::open(dir, &opts()).unwrap().start_writer(16).unwrap();
        for i in keys {
            let sale = Command::Sale {
                lines: vec![SaleLine {
                    sku: Sku::new(format!("SKU{}", i % 3)).unwrap(),
                    quantity: 1,
                    line_total: Money::new(100, Currency::new("EUR").unwrap()),
                    price: None,
                }],
                tender: Tender::Cash,
            };
            handle.blocking_submit(IdempotencyKey::new(format!("sale:{i}")).unwrap(), sale).unwrap();
        }
        drop(handle);
        writer.join();
    }

    /// Puts the stock slots back into the shape schema 6 had (migration 1's WITHOUT ROWID table
    /// and version index, migration 5's outbox view, no `own_actors`), rows unchanged.
    fn downgrade_to_6(path: &Path) {
        let conn = Connection::open(path).unwrap();
        // The outbox view of schemas 6 and 7 is schema 8's with the one actor of `meta`.
        let outbox: String = conn
            .query_row("SELECT sql FROM sqlite_schema WHERE type = 'view' AND name = 'outbox'", [], |r| r.get(0))
            .unwrap();
        let outbox = outbox
            .replace("actor IN (SELECT actor FROM own_actors)", "actor = (SELECT value FROM meta WHERE key = 'actor')");
        conn.execute_batch("DROP VIEW outbox; DROP TABLE own_actors;").unwrap();
        conn.execute_batch(&format!(
            "BEGIN;
             CREATE TABLE old_slots (
                 store   TEXT    NOT NULL,
                 sku     TEXT    NOT NULL,
                 actor   TEXT    NOT NULL,
                 inc     INTEGER NOT NULL CHECK (inc >= 0),
                 dec     INTEGER NOT NULL CHECK (dec >= 0),
                 version INTEGER NOT NULL,
                 PRIMARY KEY (store, sku, actor)
             ) STRICT, WITHOUT ROWID;
             INSERT INTO old_slots SELECT store, sku, actor, inc, dec, version FROM stock_slots;
             DROP TABLE stock_slots;
             ALTER TABLE old_slots RENAME TO stock_slots;
             CREATE INDEX stock_slots_by_version ON stock_slots (version);
             {outbox};
             PRAGMA user_version = 6;
             COMMIT;"
        ))
        .unwrap();
    }

    fn stock(dir: &Path) -> Vec<(String, i64)> {
        let reader = LedgerReader::open(dir).unwrap();
        (0..3)
            .map(|i| {
                let view = reader.stock(&Sku::new(format!("SKU{i}")).unwrap()).unwrap();
                (view.sku, view.on_hand)
            })
            .collect()
    }

    #[test]
    fn migration_7_converts_the_stock_slots_of_an_existing_ledger() {
        let dir = tempfile::tempdir().unwrap();
        sell(dir.path(), 0..10);
        let path = Ledger::path_in(dir.path());
        let outbox = LedgerReader::open(dir.path()).unwrap().outbox_depth().unwrap();
        downgrade_to_6(&path);
        let old = Connection::open(&path).unwrap();
        let before: Vec<(String, i64)> = old
            .prepare("SELECT sku, inc - dec FROM stock_slots ORDER BY sku")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(before, [("SKU0".into(), -4), ("SKU1".into(), -3), ("SKU2".into(), -3)]);
        assert_eq!(old.query_row("SELECT count(*) FROM outbox", [], |r| r.get::<_, i64>(0)).unwrap(), outbox as i64);
        drop(old);

        // Opening migrates; the slots, the outbox and the verified chain are as they were.
        sell(dir.path(), 10..13);
        let reader = LedgerReader::open(dir.path()).unwrap();
        let version: i64 = Connection::open(&path).unwrap().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, super::latest_version());
        assert_eq!(stock(dir.path()), [("SKU0".into(), -5), ("SKU1".into(), -4), ("SKU2".into(), -4)]);
        assert_eq!(reader.outbox_depth().unwrap(), outbox);
        let report = reader.verify().unwrap().expect("the migrated ledger verifies");
        assert_eq!((report.events, report.skus_checked), (13, 3));
        let ids: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(DISTINCT id) FROM stock_slots", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ids, 3);
    }

    fn actor(dir: &Path) -> shared::ActorId {
        LedgerReader::open(dir).unwrap().actor().unwrap()
    }

    /// Binds the (empty) ledger in `dir` to `actor`, as if it had been created with it.
    fn set_meta_actor(dir: &Path, actor: &str) {
        let conn = Connection::open(super::super::Ledger::path_in(dir)).unwrap();
        conn.execute("UPDATE meta SET value = ?1 WHERE key = 'actor'", [actor]).unwrap();
        conn.execute("UPDATE own_actors SET actor = ?1", [actor]).unwrap();
    }

    #[test]
    fn each_new_ledger_writes_as_an_actor_of_its_own_for_life() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        sell(a.path(), 0..2);
        sell(b.path(), 0..2);
        let first = actor(a.path());
        assert!(first.as_str().starts_with("store:s1:"), "{first}");
        assert!(first.is_of_store(&StoreId::new("s1").unwrap()));
        assert_ne!(first, actor(b.path()), "another ledger of the same store");
        sell(a.path(), 2..4);
        assert_eq!(actor(a.path()), first, "reopening keeps it");
        let reader = LedgerReader::open(a.path()).unwrap();
        let slots = reader.stock(&Sku::new("SKU0").unwrap()).unwrap().slots;
        assert_eq!(slots.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(), [first.as_str()]);
        assert!(reader.verify().unwrap().is_ok());
    }

    #[test]
    fn a_ledger_restored_from_a_backup_writes_as_a_new_actor_and_still_pushes_what_it_wrote_before() {
        let (live, restored) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        sell(live.path(), 0..3);
        let old = actor(live.path());
        LedgerReader::open(live.path()).unwrap().backup_to(&Ledger::path_in(restored.path())).unwrap();
        assert_eq!(actor(restored.path()), old, "the copy is the old ledger until it is opened to write");

        sell(restored.path(), 3..6);
        let new = actor(restored.path());
        assert_ne!(new, old);
        assert!(new.is_of_store(&StoreId::new("s1").unwrap()));
        sell(restored.path(), 6..7);
        assert_eq!(actor(restored.path()), new, "only its first open takes a new actor");

        let reader = LedgerReader::open(restored.path()).unwrap();
        let mut slots = reader.stock(&Sku::new("SKU0").unwrap()).unwrap().slots;
        slots.sort();
        let mut expected = vec![
            (old.to_string(), shared::Slot { inc: 0, dec: 1 }),
            (new.to_string(), shared::Slot { inc: 0, dec: 2 }),
        ];
        expected.sort();
        assert_eq!(slots, expected, "sales before the backup stay the old actor's; later ones are the new one's");
        // Never synced: both actors' slots wait in the outbox.
        let push = reader.push_page(1_000).unwrap().unwrap();
        let actors: BTreeSet<&str> = push.rows.stock.iter().map(|g| g.actor.as_str()).collect();
        assert_eq!(actors, BTreeSet::from([old.as_str(), new.as_str()]));
        assert!(reader.verify().unwrap().is_ok());
        assert_eq!(actor(live.path()), old, "the live ledger is untouched");

        // The old actor's slots are still checked against the events written as it.
        let conn = Connection::open(Ledger::path_in(restored.path())).unwrap();
        conn.execute("UPDATE stock_slots SET dec = dec + 1 WHERE actor = ?1 AND sku = 'SKU1'", [old.as_str()]).unwrap();
        let broken = reader.verify().unwrap().unwrap_err();
        assert!(broken.detail.starts_with(&format!("stock projection of SKU1 (actor {old})")), "{}", broken.detail);
    }

    #[test]
    fn an_edited_list_of_own_actors_is_caught() {
        let (live, restored) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        sell(live.path(), 0..3);
        let old = actor(live.path());
        LedgerReader::open(live.path()).unwrap().backup_to(&Ledger::path_in(restored.path())).unwrap();
        sell(restored.path(), 3..4);
        let new = actor(restored.path());
        let conn = Connection::open(Ledger::path_in(restored.path())).unwrap();
        let reader = LedgerReader::open(restored.path()).unwrap();

        // The old actor struck from the list: its events no longer belong to the ledger.
        conn.execute("DELETE FROM own_actors WHERE actor = ?1", [old.as_str()]).unwrap();
        let broken = reader.verify().unwrap().unwrap_err();
        assert_eq!(broken.seq, Some(1));
        assert!(broken.detail.contains(&format!("stamped by actor {old}")), "{}", broken.detail);

        // The old actor listed again: the log verifies. A ledger whose current actor is not
        // listed is refused at open.
        conn.execute("INSERT INTO own_actors (actor, since_seq) VALUES (?1, 1)", [old.as_str()]).unwrap();
        assert!(reader.verify().unwrap().is_ok());
        conn.execute("DELETE FROM own_actors WHERE actor = ?1", [new.as_str()]).unwrap();
        let Err(e) = Ledger::open(restored.path(), &opts()) else { panic!("opened without its actor listed") };
        assert!(e.to_string().contains("not among the ledger's own actors"), "{e}");
    }

    #[test]
    fn a_backup_takes_its_name_only_when_complete_and_marked() {
        let (live, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        sell(live.path(), 0..2);
        let reader = LedgerReader::open(live.path()).unwrap();
        let target = out.path().join("backup.db");
        let partial = out.path().join("backup.db.partial");
        std::fs::write(&partial, b"left over by an attempt that died").unwrap();
        reader.backup_to(&target).unwrap();
        assert!(!partial.exists());
        let copy = Connection::open(&target).unwrap();
        let marks: (i64, i64) = copy
            .query_row(
                "SELECT (SELECT value FROM meta WHERE key = 'backup'), (SELECT value FROM meta WHERE key = 'bootstrapped')",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(marks, (1, 0));
        let again = reader.backup_to(&target).unwrap_err().to_string();
        assert!(again.contains("exists already"), "{again}");
        assert!(!partial.exists());
    }

    #[test]
    fn a_ledger_created_with_the_store_wide_actor_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        drop(Ledger::open(dir.path(), &opts()).unwrap());
        set_meta_actor(dir.path(), "store:s1");
        sell(dir.path(), 0..3);
        assert_eq!(actor(dir.path()).as_str(), "store:s1");
        let reader = LedgerReader::open(dir.path()).unwrap();
        assert_eq!(reader.stock(&Sku::new("SKU0").unwrap()).unwrap().slots[0].0, "store:s1");
        let push = reader.push_page(100).unwrap().unwrap();
        assert!(push.rows.stock.iter().all(|g| g.actor.as_str() == "store:s1") && push.rows.len() == 3);
        assert!(reader.verify().unwrap().is_ok());
    }

    #[test]
    fn a_ledger_bound_to_another_stores_actor_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        drop(Ledger::open(dir.path(), &opts()).unwrap());
        for bad in ["store:s2:0f3a", "cloud", "store:s1:"] {
            set_meta_actor(dir.path(), bad);
            let Err(e) = Ledger::open(dir.path(), &opts()) else { panic!("{bad} accepted") };
            let text = e.to_string();
            assert!(text.contains(&format!("{bad:?}")) && text.contains("not an actor of store s1"), "{text}");
        }
    }

    #[test]
    fn own_slots_written_by_id_survive_a_restart_and_match_the_events() {
        let dir = tempfile::tempdir().unwrap();
        sell(dir.path(), 0..6);
        sell(dir.path(), 6..9);
        let reader = LedgerReader::open(dir.path()).unwrap();
        assert_eq!(stock(dir.path()), [("SKU0".into(), -3), ("SKU1".into(), -3), ("SKU2".into(), -3)]);
        assert!(reader.verify().unwrap().is_ok());
    }
}
