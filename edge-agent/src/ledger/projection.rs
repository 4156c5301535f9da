//! SQL for the projections (stock slots, price registers, catalog fields), shared by the
//! writer (inside its batch transaction) and by readers. The merge rules themselves come from
//! `shared` ([`Slot`], [`PriceEntry::wins_over`], [`Lww`]); this module only moves rows.

use rusqlite::{params, Connection, OptionalExtension, Row};
use shared::{
    ActorId, CatalogField, CatalogItem, CatalogUpdate, Currency, HlcStamp, Money, PriceEntry, PriceKey, PriceScope,
    PriceSlot, PriceValue, Sku, Slot, SlotKey, SlotRow, StoreId, ValidityWindow,
};

use shared::sync::Rows;

use super::LedgerError;

fn corrupt(what: &str, detail: impl std::fmt::Display) -> LedgerError {
    LedgerError::Corrupt { seq: None, detail: format!("{what}: {detail}") }
}

fn u64_col(row: &Row, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

pub fn stamp_from(row: &Row, first: usize) -> Result<HlcStamp, LedgerError> {
    let wall_ms = u64_col(row, first)?;
    let logical: i64 = row.get(first + 1)?;
    let actor: String = row.get(first + 2)?;
    Ok(HlcStamp {
        wall_ms,
        logical: u32::try_from(logical).map_err(|_| corrupt("HLC logical counter", logical))?,
        actor: ActorId::new(actor).map_err(|e| corrupt("actor", e))?,
    })
}

// ---- stock ----

pub fn slot(conn: &Connection, key: &SlotKey) -> Result<Slot, LedgerError> {
    let mut stmt =
        conn.prepare_cached("SELECT inc, dec FROM stock_slots WHERE store = ?1 AND sku = ?2 AND actor = ?3")?;
    let slot = stmt
        .query_row(params![key.store.as_str(), key.sku.as_str(), key.actor.as_str()], |r| {
            Ok(Slot { inc: u64_col(r, 0)?, dec: u64_col(r, 1)? })
        })
        .optional()?;
    Ok(slot.unwrap_or_default())
}

/// A slot and its row id (`None`: no row yet), for the writer, which then writes it by id.
pub fn slot_with_id(
    conn: &Connection,
    store: &StoreId,
    sku: &Sku,
    actor: &ActorId,
) -> Result<(Slot, Option<i64>), LedgerError> {
    let mut stmt =
        conn.prepare_cached("SELECT id, inc, dec FROM stock_slots WHERE store = ?1 AND sku = ?2 AND actor = ?3")?;
    let found = stmt
        .query_row(params![store.as_str(), sku.as_str(), actor.as_str()], |r| {
            Ok((r.get::<_, i64>(0)?, Slot { inc: u64_col(r, 1)?, dec: u64_col(r, 2)? }))
        })
        .optional()?;
    Ok(match found {
        Some((id, slot)) => (slot, Some(id)),
        None => (Slot::default(), None),
    })
}

/// Writes own slots as they now stand, each taking a version; one per batch, so the UPDATE is
/// looked up in the statement cache once, not once per slot.
pub struct SlotWriter<'c> {
    conn: &'c Connection,
    update: rusqlite::CachedStatement<'c>,
}

impl<'c> SlotWriter<'c> {
    pub fn new(conn: &'c Connection) -> Result<SlotWriter<'c>, LedgerError> {
        let update = conn.prepare_cached("UPDATE stock_slots SET inc = ?1, dec = ?2, version = ?3 WHERE id = ?4")?;
        Ok(SlotWriter { conn, update })
    }

    /// Writes one slot, taking `version`; returns its row id. With `id` (the row's, as read
    /// before), the row is updated by that integer key: no text key to seek, and only the
    /// version index changes besides the row.
    pub fn write(
        &mut self,
        (store, sku, actor): (&StoreId, &Sku, &ActorId),
        id: Option<i64>,
        slot: Slot,
        version: u64,
    ) -> Result<i64, LedgerError> {
        let to_i64 = |v: u64| i64::try_from(v).map_err(|_| corrupt("stock slot", format!("{v} exceeds i64")));
        let (inc, dec, version) = (to_i64(slot.inc)?, to_i64(slot.dec)?, to_i64(version)?);
        if let Some(id) = id {
            if self.update.execute(params![inc, dec, version, id])? == 1 {
                return Ok(id);
            }
            // The row is gone (the file was edited behind the writer): write it by its key.
        }
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO stock_slots (store, sku, actor, inc, dec, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (store, sku, actor) DO UPDATE SET inc = excluded.inc, dec = excluded.dec, version = excluded.version
             RETURNING id",
        )?;
        Ok(stmt.query_row(params![store.as_str(), sku.as_str(), actor.as_str(), inc, dec, version], |r| r.get(0))?)
    }
}

/// Merges a peer's slot (per-field max); returns whether the stored slot changed (and so took
/// `version`).
pub fn merge_slot(conn: &Connection, row: &SlotRow, version: u64) -> Result<bool, LedgerError> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO stock_slots (store, sku, actor, inc, dec, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (store, sku, actor) DO UPDATE
            SET inc = max(inc, excluded.inc), dec = max(dec, excluded.dec), version = excluded.version
          WHERE excluded.inc > inc OR excluded.dec > dec",
    )?;
    let to_i64 = |v: u64| i64::try_from(v).map_err(|_| corrupt("stock slot", format!("{v} exceeds i64")));
    let changed = stmt.execute(params![
        row.key.store.as_str(),
        row.key.sku.as_str(),
        row.key.actor.as_str(),
        to_i64(row.slot.inc)?,
        to_i64(row.slot.dec)?,
        to_i64(version)?
    ])?;
    Ok(changed > 0)
}

/// Every actor's slot of `sku` in `store`.
pub fn slots_of(conn: &Connection, store: &StoreId, sku: &Sku) -> Result<Vec<(ActorId, Slot)>, LedgerError> {
    let mut stmt =
        conn.prepare_cached("SELECT actor, inc, dec FROM stock_slots WHERE store = ?1 AND sku = ?2 ORDER BY actor")?;
    let rows = stmt.query_map(params![store.as_str(), sku.as_str()], |r| {
        Ok((r.get::<_, String>(0)?, Slot { inc: u64_col(r, 1)?, dec: u64_col(r, 2)? }))
    })?;
    rows.map(|r| {
        let (actor, slot) = r?;
        Ok((ActorId::new(actor).map_err(|e| corrupt("stock slot actor", e))?, slot))
    })
    .collect()
}

/// On-hand units: sum over every actor's slot. Saturates rather than wraps on absurd values.
pub fn on_hand(conn: &Connection, store: &StoreId, sku: &Sku) -> Result<i64, LedgerError> {
    let total: i128 = slots_of(conn, store, sku)?.iter().map(|(_, s)| s.value()).sum();
    Ok(total.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64)
}

// ---- prices ----

fn scope_text(scope: &PriceScope) -> String {
    scope.to_string()
}

fn parse_scope(text: &str) -> Result<PriceScope, LedgerError> {
    match text {
        "chain" => Ok(PriceScope::Chain),
        other => match other.strip_prefix("store:") {
            Some(id) => Ok(PriceScope::Store(StoreId::new(id).map_err(|e| corrupt("price scope", e))?)),
            None => Err(corrupt("price scope", other)),
        },
    }
}

fn parse_slot(text: &str) -> Result<PriceSlot, LedgerError> {
    match text {
        "regular" => Ok(PriceSlot::Regular),
        "promotion" => Ok(PriceSlot::Promotion),
        other => Err(corrupt("price slot", other)),
    }
}

const PRICE_COLUMNS: &str = "sku, scope, slot, amount, currency, win_from, win_until, hlc_wall, hlc_logical, actor";

fn price_from(row: &Row) -> Result<PriceEntry, LedgerError> {
    let sku: String = row.get(0)?;
    let scope: String = row.get(1)?;
    let slot: String = row.get(2)?;
    let amount: Option<i64> = row.get(3)?;
    let currency: Option<String> = row.get(4)?;
    let win_from: Option<i64> = row.get(5)?;
    let win_until: Option<i64> = row.get(6)?;
    let key = PriceKey {
        sku: Sku::new(sku).map_err(|e| corrupt("price sku", e))?,
        scope: parse_scope(&scope)?,
        slot: parse_slot(&slot)?,
    };
    let value = match (amount, currency) {
        (Some(minor), Some(code)) => Some(PriceValue {
            amount: Money::new(minor, Currency::new(&code).map_err(|e| corrupt("price currency", e))?),
            window: match (win_from, win_until) {
                (Some(f), Some(u)) => Some(ValidityWindow {
                    from_ms: u64::try_from(f).map_err(|_| corrupt("price window", f))?,
                    until_ms: u64::try_from(u).map_err(|_| corrupt("price window", u))?,
                }),
                _ => None,
            },
        }),
        _ => None,
    };
    Ok(PriceEntry { key, value, stamp: stamp_from(row, 7)? })
}

pub fn price(conn: &Connection, key: &PriceKey) -> Result<Option<PriceEntry>, LedgerError> {
    let mut stmt = conn
        .prepare_cached(&format!("SELECT {PRICE_COLUMNS} FROM prices WHERE sku = ?1 AND scope = ?2 AND slot = ?3"))?;
    let mut rows = stmt.query(params![key.sku.as_str(), scope_text(&key.scope), key.slot.as_str()])?;
    match rows.next()? {
        Some(row) => Ok(Some(price_from(row)?)),
        None => Ok(None),
    }
}

pub fn prices_of(conn: &Connection, sku: &Sku) -> Result<Vec<PriceEntry>, LedgerError> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {PRICE_COLUMNS} FROM prices WHERE sku = ?1 ORDER BY scope, slot"))?;
    let mut rows = stmt.query(params![sku.as_str()])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(price_from(row)?);
    }
    Ok(out)
}

/// Merges one register write; returns whether it won (and was written).
pub fn merge_price(conn: &Connection, entry: &PriceEntry, version: u64) -> Result<bool, LedgerError> {
    if let Some(current) = price(conn, &entry.key)? {
        if !entry.wins_over(&current) {
            return Ok(false);
        }
    }
    let mut stmt = conn.prepare_cached(&format!(
        "INSERT OR REPLACE INTO prices ({PRICE_COLUMNS}, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
    ))?;
    let v = entry.value.as_ref();
    let window = v.and_then(|v| v.window);
    let to_i64 = |n: u64| i64::try_from(n).map_err(|_| corrupt("price register", format!("{n} exceeds i64")));
    stmt.execute(params![
        entry.key.sku.as_str(),
        scope_text(&entry.key.scope),
        entry.key.slot.as_str(),
        v.map(|v| v.amount.minor),
        v.map(|v| v.amount.currency.code().to_owned()),
        window.map(|w| to_i64(w.from_ms)).transpose()?,
        window.map(|w| to_i64(w.until_ms)).transpose()?,
        to_i64(entry.stamp.wall_ms)?,
        i64::from(entry.stamp.logical),
        entry.stamp.actor.as_str(),
        version as i64,
    ])?;
    Ok(true)
}

// ---- sync ----

/// The body of a push: the rows this ledger wrote (as any of its actors: `own_actors`) changed in `(from, to]`.
pub fn own_rows(conn: &Connection, store: &StoreId, from: u64, to: u64) -> Result<Rows, LedgerError> {
    let range = params![from as i64, to as i64];
    let mut stmt = conn.prepare_cached(
        "SELECT store, sku, inc, dec, actor FROM stock_slots
          WHERE actor IN (SELECT actor FROM own_actors) AND version > ?1 AND version <= ?2 ORDER BY version",
    )?;
    let mut rows = stmt.query(range)?;
    let mut slots = Vec::new();
    while let Some(row) = rows.next()? {
        let row_store: String = row.get(0)?;
        let sku: String = row.get(1)?;
        let actor: String = row.get(4)?;
        slots.push(SlotRow {
            key: SlotKey {
                store: StoreId::new(row_store).map_err(|e| corrupt("stock slot store", e))?,
                sku: Sku::new(sku).map_err(|e| corrupt("stock slot sku", e))?,
                actor: ActorId::new(actor).map_err(|e| corrupt("stock slot actor", e))?,
            },
            slot: Slot { inc: u64_col(row, 2)?, dec: u64_col(row, 3)? },
        });
    }
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {PRICE_COLUMNS} FROM prices
          WHERE actor IN (SELECT actor FROM own_actors) AND version > ?1 AND version <= ?2 AND scope = ?3
          ORDER BY version"
    ))?;
    // Only this store's own scope: the cloud refuses chain prices from a store (a store that
    // ran alone keeps those local).
    let own_scope = scope_text(&PriceScope::Store(store.clone()));
    let mut rows = stmt.query(params![from as i64, to as i64, own_scope])?;
    let mut prices = Vec::new();
    while let Some(row) = rows.next()? {
        prices.push(price_from(row)?);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT sku, value, hlc_wall, hlc_logical, actor FROM catalog
          WHERE actor IN (SELECT actor FROM own_actors) AND version > ?1 AND version <= ?2 ORDER BY version",
    )?;
    let mut rows = stmt.query(range)?;
    let mut catalog = Vec::new();
    while let Some(row) = rows.next()? {
        let sku: String = row.get(0)?;
        let bytes: Vec<u8> = row.get(1)?;
        catalog.push(CatalogUpdate {
            sku: Sku::new(sku).map_err(|e| corrupt("catalog sku", e))?,
            field: postcard::from_bytes(&bytes).map_err(|e| corrupt("catalog field", e))?,
            stamp: stamp_from(row, 2)?,
        });
    }
    // The store's own online allocation rows (grants, handovers); never the cloud's, nor headers.
    let escrow = super::allocation::own_rows(conn, store, from, to)?;
    Ok(Rows { stock: Rows::group_slots(slots), prices, catalog, escrow, ..Rows::default() })
}

// ---- catalog ----

pub fn catalog_item(conn: &Connection, sku: &Sku) -> Result<Option<CatalogItem>, LedgerError> {
    let mut stmt = conn.prepare_cached("SELECT value, hlc_wall, hlc_logical, actor FROM catalog WHERE sku = ?1")?;
    let mut rows = stmt.query(params![sku.as_str()])?;
    let mut item = CatalogItem::new(sku.clone());
    let mut any = false;
    while let Some(row) = rows.next()? {
        let bytes: Vec<u8> = row.get(0)?;
        let field: CatalogField = postcard::from_bytes(&bytes).map_err(|e| corrupt("catalog field", e))?;
        item.merge(&CatalogUpdate { sku: sku.clone(), field, stamp: stamp_from(row, 1)? });
        any = true;
    }
    Ok(any.then_some(item))
}

/// Merges one field write; returns whether it won. Keeps the GTIN index in step.
pub fn merge_catalog(conn: &Connection, update: &CatalogUpdate, version: u64) -> Result<bool, LedgerError> {
    let mut item = catalog_item(conn, &update.sku)?.unwrap_or_else(|| CatalogItem::new(update.sku.clone()));
    if !item.merge(update) {
        return Ok(false);
    }
    let value = postcard::to_allocvec(&update.field).map_err(|e| corrupt("catalog field", e))?;
    conn.prepare_cached(
        "INSERT OR REPLACE INTO catalog (sku, field, value, hlc_wall, hlc_logical, actor, version)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        update.sku.as_str(),
        update.field.name(),
        value,
        update.stamp.wall_ms as i64,
        i64::from(update.stamp.logical),
        update.stamp.actor.as_str(),
        version as i64
    ])?;
    if let CatalogField::Gtins(gtins) = &update.field {
        conn.prepare_cached("DELETE FROM gtin_index WHERE sku = ?1")?.execute(params![update.sku.as_str()])?;
        let mut insert = conn.prepare_cached("INSERT OR IGNORE INTO gtin_index (gtin, sku) VALUES (?1, ?2)")?;
        for gtin in gtins {
            insert.execute(params![gtin.to_string(), update.sku.as_str()])?;
        }
    }
    Ok(true)
}

pub fn skus_by_gtin(conn: &Connection, gtin: &shared::Gtin) -> Result<Vec<Sku>, LedgerError> {
    let mut stmt = conn.prepare_cached("SELECT sku FROM gtin_index WHERE gtin = ?1 ORDER BY sku")?;
    let rows = stmt.query_map(params![gtin.to_string()], |r| r.get::<_, String>(0))?;
    rows.map(|r| Sku::new(r?).map_err(|e| corrupt("gtin index sku", e))).collect()
}

/// Every SKU with a stock slot in `store`.
pub fn skus_in_store(conn: &Connection, store: &StoreId) -> Result<Vec<Sku>, LedgerError> {
    let mut stmt = conn.prepare_cached("SELECT DISTINCT sku FROM stock_slots WHERE store = ?1 ORDER BY sku")?;
    let rows = stmt.query_map(params![store.as_str()], |r| r.get::<_, String>(0))?;
    rows.map(|r| Sku::new(r?).map_err(|e| corrupt("stock slot sku", e))).collect()
}

/// Every SKU's merchandising category, as the catalog holds it.
pub fn categories(conn: &Connection) -> Result<Vec<(Sku, String)>, LedgerError> {
    let mut stmt = conn.prepare_cached("SELECT sku, value FROM catalog WHERE field = 'category' ORDER BY sku")?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let sku = Sku::new(row.get::<_, String>(0)?).map_err(|e| corrupt("catalog sku", e))?;
        let bytes: Vec<u8> = row.get(1)?;
        match postcard::from_bytes(&bytes).map_err(|e| corrupt("catalog field", e))? {
            CatalogField::Category(category) => out.push((sku, category)),
            other => return Err(corrupt("catalog category", format!("{sku} holds a {} value", other.name()))),
        }
    }
    Ok(out)
}
