//! SQL of the online allocation: this store's escrow rows (its own `granted` and `fulfilled`,
//! the cloud's `released` and `reservation`, one table), the order headers HQ sent, and the
//! local marks on them (picked, handed over). Shared by the writer (inside its transaction) and
//! readers. The merge rules are `shared::escrow`'s: rows are loaded into an [`Escrow`] and the
//! rows it says changed are written back, so SQL and the CRDT can never disagree.

use rusqlite::{params, Connection, OptionalExtension};
use shared::{Escrow, EscrowKey, EscrowRow, OrderHeader, OrderId, Sku, StoreId};

use super::LedgerError;

fn corrupt(what: &str, detail: impl std::fmt::Display) -> LedgerError {
    LedgerError::Corrupt { seq: None, detail: format!("{what}: {detail}") }
}

fn to_i64(what: &str, v: u64) -> Result<i64, LedgerError> {
    i64::try_from(v).map_err(|_| corrupt(what, format!("{v} exceeds i64")))
}

fn to_u64(what: &str, v: i64) -> Result<u64, LedgerError> {
    u64::try_from(v).map_err(|_| corrupt(what, format!("{v} is negative")))
}

/// A row's columns: kind, order id (`""` for the counters), units, seq, cancelled.
fn columns(row: &EscrowRow) -> (&'static str, &str, u64, u64, bool) {
    match row {
        EscrowRow::Granted { granted, .. } => ("granted", "", *granted, 0, false),
        EscrowRow::Released { released, .. } => ("released", "", *released, 0, false),
        EscrowRow::Reservation { order, units, seq, cancelled, .. } => {
            ("reservation", order.as_str(), *units, *seq, *cancelled)
        }
        EscrowRow::Fulfilled { order, .. } => ("fulfilled", order.as_str(), 0, 0, false),
    }
}

fn row_from(
    key: EscrowKey,
    kind: &str,
    order: String,
    units: i64,
    seq: i64,
    cancelled: i64,
) -> Result<EscrowRow, LedgerError> {
    let order = || OrderId::new(order.clone()).map_err(|e| corrupt("allocation order id", e));
    Ok(match kind {
        "granted" => EscrowRow::Granted { key, granted: to_u64("granted units", units)? },
        "released" => EscrowRow::Released { key, released: to_u64("released units", units)? },
        "reservation" => EscrowRow::Reservation {
            key,
            order: order()?,
            units: to_u64("reserved units", units)?,
            seq: to_u64("reservation seq", seq)?,
            cancelled: cancelled != 0,
        },
        "fulfilled" => EscrowRow::Fulfilled { key, order: order()? },
        other => return Err(corrupt("allocation row kind", other)),
    })
}

/// Writes one row as it now stands (the caller merged it), taking `version`.
pub fn write_row(conn: &Connection, row: &EscrowRow, version: u64) -> Result<(), LedgerError> {
    let (kind, order, units, seq, cancelled) = columns(row);
    conn.prepare_cached(
        "INSERT INTO escrow (sku, kind, order_id, units, seq, cancelled, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (sku, kind, order_id) DO UPDATE
            SET units = excluded.units, seq = excluded.seq, cancelled = excluded.cancelled, version = excluded.version",
    )?
    .execute(params![
        row.key().sku.as_str(),
        kind,
        order,
        to_i64("allocation units", units)?,
        to_i64("reservation seq", seq)?,
        i64::from(cancelled),
        to_i64("change version", version)?
    ])?;
    Ok(())
}

/// Every row of one SKU.
pub fn rows_of(conn: &Connection, store: &StoreId, sku: &Sku) -> Result<Vec<EscrowRow>, LedgerError> {
    let mut stmt = conn.prepare_cached("SELECT kind, order_id, units, seq, cancelled FROM escrow WHERE sku = ?1")?;
    let mut rows = stmt.query(params![sku.as_str()])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let key = EscrowKey { store: store.clone(), sku: sku.clone() };
        let kind: String = r.get(0)?;
        out.push(row_from(key, &kind, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)?);
    }
    Ok(out)
}

/// One SKU's allocation as this replica holds it (empty if nothing happened there).
pub fn load_escrow(conn: &Connection, store: &StoreId, sku: &Sku) -> Result<Escrow, LedgerError> {
    let mut escrow = Escrow::new(EscrowKey { store: store.clone(), sku: sku.clone() });
    escrow.merge_rows(&rows_of(conn, store, sku)?).map_err(|e| corrupt("allocation rows", e))?;
    Ok(escrow)
}

/// Joins `rows` (all of one SKU, checked by the caller) into the stored allocation; each row
/// that changed takes the next change version. Returns how many changed.
pub fn merge_rows(
    conn: &Connection,
    store: &StoreId,
    sku: &Sku,
    rows: &[EscrowRow],
    version: &mut u64,
) -> Result<usize, LedgerError> {
    let mut escrow = load_escrow(conn, store, sku)?;
    let changed = escrow.merge_rows(rows).map_err(|e| corrupt("allocation merge", e))?;
    for row in &changed {
        *version += 1;
        write_row(conn, row, *version)?;
    }
    Ok(changed.len())
}

/// The store's own rows (`granted`, `fulfilled`) changed in `(from, to]`: part of a push.
pub fn own_rows(conn: &Connection, store: &StoreId, from: u64, to: u64) -> Result<Vec<EscrowRow>, LedgerError> {
    let mut stmt = conn.prepare_cached(
        "SELECT sku, kind, order_id, units, seq, cancelled FROM escrow
          WHERE kind IN ('granted', 'fulfilled') AND version > ?1 AND version <= ?2 ORDER BY version",
    )?;
    let mut rows = stmt.query(params![to_i64("version", from)?, to_i64("version", to)?])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let sku = Sku::new(r.get::<_, String>(0)?).map_err(|e| corrupt("allocation sku", e))?;
        let kind: String = r.get(1)?;
        let key = EscrowKey { store: store.clone(), sku };
        out.push(row_from(key, &kind, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)?);
    }
    Ok(out)
}

/// SKUs with any allocation row, in order.
pub fn skus(conn: &Connection) -> Result<Vec<Sku>, LedgerError> {
    let mut stmt = conn.prepare_cached("SELECT DISTINCT sku FROM escrow ORDER BY sku")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    rows.map(|r| Sku::new(r?).map_err(|e| corrupt("allocation sku", e))).collect()
}

/// SKUs with units promised to waiting orders (a reservation neither cancelled nor handed over).
pub fn skus_with_promised(conn: &Connection) -> Result<Vec<Sku>, LedgerError> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT r.sku FROM escrow r
          WHERE r.kind = 'reservation' AND r.cancelled = 0
            AND NOT EXISTS (SELECT 1 FROM escrow f
                             WHERE f.sku = r.sku AND f.kind = 'fulfilled' AND f.order_id = r.order_id)
          ORDER BY r.sku",
    )?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    rows.map(|r| Sku::new(r?).map_err(|e| corrupt("allocation sku", e))).collect()
}

/// Whether the store ever held an allocation row (if not, no order can be at risk).
pub fn any_rows(conn: &Connection) -> Result<bool, LedgerError> {
    Ok(conn.prepare_cached("SELECT 1 FROM escrow LIMIT 1")?.query_row([], |_| Ok(())).optional()?.is_some())
}

// ---- order headers and marks ----

const HEADER_VERSION: u8 = 1;

fn decode_header(bytes: &[u8]) -> Result<OrderHeader, LedgerError> {
    match bytes.split_first() {
        Some((&HEADER_VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| corrupt("order header", e)),
        Some((v, _)) => Err(corrupt("order header", format!("unknown version {v}"))),
        None => Err(corrupt("order header", "empty")),
    }
}

/// The header of `order`, if this store has it.
pub fn header(conn: &Connection, order: &OrderId) -> Result<Option<OrderHeader>, LedgerError> {
    let bytes: Option<Vec<u8>> = conn
        .prepare_cached("SELECT header FROM orders WHERE order_id = ?1")?
        .query_row(params![order.as_str()], |r| r.get(0))
        .optional()?;
    bytes.map(|b| decode_header(&b)).transpose()
}

/// Keeps a header this store did not have (the caller refused one that differs from the held
/// one). Returns whether it was new.
pub fn insert_header(conn: &Connection, header: &OrderHeader, version: u64) -> Result<bool, LedgerError> {
    let bytes = postcard::to_extend(header, vec![HEADER_VERSION]).map_err(|e| corrupt("order header", e))?;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO orders (order_id, header, created_at_ms, expires_at_ms, version) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (order_id) DO NOTHING",
        )?
        .execute(params![
            header.order.as_str(),
            bytes,
            header.created_at_ms,
            header.expires_at_ms,
            to_i64("change version", version)?
        ])?;
    Ok(inserted > 0)
}

/// Every header, oldest first, with its marks.
pub fn headers(conn: &Connection) -> Result<Vec<(OrderHeader, Marks)>, LedgerError> {
    let mut stmt = conn.prepare_cached(
        "SELECT header, picked_at_ms, handed_over_at_ms FROM orders ORDER BY created_at_ms, order_id",
    )?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let bytes: Vec<u8> = r.get(0)?;
        out.push((decode_header(&bytes)?, Marks { picked_at_ms: r.get(1)?, handed_over_at_ms: r.get(2)? }));
    }
    Ok(out)
}

/// What this store did to an order: when it was put aside, when it was handed over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marks {
    pub picked_at_ms: Option<i64>,
    pub handed_over_at_ms: Option<i64>,
}

pub fn marks(conn: &Connection, order: &OrderId) -> Result<Marks, LedgerError> {
    let found = conn
        .prepare_cached("SELECT picked_at_ms, handed_over_at_ms FROM orders WHERE order_id = ?1")?
        .query_row(params![order.as_str()], |r| Ok(Marks { picked_at_ms: r.get(0)?, handed_over_at_ms: r.get(1)? }))
        .optional()?;
    Ok(found.unwrap_or_default())
}

/// Records the pick of `order` by event `seq`.
pub fn set_picked(conn: &Connection, order: &OrderId, at_ms: i64, seq: u64) -> Result<(), LedgerError> {
    conn.prepare_cached("UPDATE orders SET picked_at_ms = ?2, picked_seq = ?3 WHERE order_id = ?1")?
        .execute(params![order.as_str(), at_ms, to_i64("event sequence", seq)?])?;
    Ok(())
}

/// Records the handover of `order` by event `seq`.
pub fn set_handed_over(conn: &Connection, order: &OrderId, at_ms: i64, seq: u64) -> Result<(), LedgerError> {
    conn.prepare_cached("UPDATE orders SET handed_over_at_ms = ?2, handed_over_seq = ?3 WHERE order_id = ?1")?
        .execute(params![order.as_str(), at_ms, to_i64("event sequence", seq)?])?;
    Ok(())
}

/// The reservation and fulfilment rows naming `order` (across its SKUs).
pub fn rows_of_order(conn: &Connection, store: &StoreId, order: &OrderId) -> Result<Vec<EscrowRow>, LedgerError> {
    let mut stmt = conn.prepare_cached(
        "SELECT sku, kind, order_id, units, seq, cancelled FROM escrow WHERE order_id = ?1 ORDER BY sku, kind",
    )?;
    let mut rows = stmt.query(params![order.as_str()])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let sku = Sku::new(r.get::<_, String>(0)?).map_err(|e| corrupt("allocation sku", e))?;
        let kind: String = r.get(1)?;
        let key = EscrowKey { store: store.clone(), sku };
        out.push(row_from(key, &kind, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)?);
    }
    Ok(out)
}

/// Every reservation and fulfilment row (for listings: one read instead of one per order).
pub fn order_rows(conn: &Connection, store: &StoreId) -> Result<Vec<EscrowRow>, LedgerError> {
    let mut stmt = conn.prepare_cached(
        "SELECT sku, kind, order_id, units, seq, cancelled FROM escrow WHERE kind IN ('reservation', 'fulfilled')",
    )?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let sku = Sku::new(r.get::<_, String>(0)?).map_err(|e| corrupt("allocation sku", e))?;
        let kind: String = r.get(1)?;
        let key = EscrowKey { store: store.clone(), sku };
        out.push(row_from(key, &kind, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)?);
    }
    Ok(out)
}
