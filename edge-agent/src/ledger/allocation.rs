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

/// Writes one row as it now stands (the caller merged it), taking `version`. Also keeps what
/// lets the writer skip a SKU's order history (migration 6): a reservation's `open` flag (not
/// cancelled, not handed over) and the SKU's sum of reserved units.
pub fn write_row(conn: &Connection, row: &EscrowRow, version: u64) -> Result<(), LedgerError> {
    let (kind, order, units, seq, cancelled) = columns(row);
    let sku = row.key().sku.as_str();
    let units_i64 = to_i64("allocation units", units)?;
    let mut open = false;
    if let EscrowRow::Reservation { .. } = row {
        let held = conn
            .prepare_cached("SELECT 1 FROM escrow WHERE sku = ?1 AND kind = 'reservation' AND order_id = ?2")?
            .query_row(params![sku, order], |_| Ok(()))
            .optional()?
            .is_some();
        if !held {
            // A reservation never changes size, so it joins the SKU's sum once, when it arrives.
            conn.prepare_cached(
                "INSERT INTO escrow_reserved (sku, units) VALUES (?1, ?2)
                 ON CONFLICT (sku) DO UPDATE SET units = units + excluded.units",
            )?
            .execute(params![sku, units_i64])?;
        }
        open = !cancelled && !is_fulfilled(conn, sku, order)?;
    }
    conn.prepare_cached(
        "INSERT INTO escrow (sku, kind, order_id, units, seq, cancelled, version, open) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (sku, kind, order_id) DO UPDATE
            SET units = excluded.units, seq = excluded.seq, cancelled = excluded.cancelled,
                version = excluded.version, open = excluded.open",
    )?
    .execute(params![
        sku,
        kind,
        order,
        units_i64,
        to_i64("reservation seq", seq)?,
        i64::from(cancelled),
        to_i64("change version", version)?,
        i64::from(open)
    ])?;
    if let EscrowRow::Fulfilled { .. } = row {
        conn.prepare_cached(
            "UPDATE escrow SET open = 0 WHERE sku = ?1 AND kind = 'reservation' AND order_id = ?2 AND open = 1",
        )?
        .execute(params![sku, order])?;
    }
    Ok(())
}

fn is_fulfilled(conn: &Connection, sku: &str, order: &str) -> Result<bool, LedgerError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM escrow WHERE sku = ?1 AND kind = 'fulfilled' AND order_id = ?2")?
        .query_row(params![sku, order], |_| Ok(()))
        .optional()?
        .is_some())
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

/// One SKU's allocation as this replica holds it (empty if nothing happened there): every row,
/// for the views. The writer loads only what an operation needs ([`load_for`], [`totals`]).
pub fn load_escrow(conn: &Connection, store: &StoreId, sku: &Sku) -> Result<Escrow, LedgerError> {
    let mut escrow = Escrow::new(EscrowKey { store: store.clone(), sku: sku.clone() });
    escrow.merge_rows(&rows_of(conn, store, sku)?).map_err(|e| corrupt("allocation rows", e))?;
    Ok(escrow)
}

/// Part of one SKU's allocation: its `granted` and `released` counters and the rows of `orders`
/// (their reservations and handovers). Enough to merge rows naming those orders, or to fulfil
/// one of them, since a row joins only with the held row of the same identity; its totals are
/// not the SKU's (see [`totals`]).
pub fn load_for<'a>(
    conn: &Connection,
    store: &StoreId,
    sku: &Sku,
    orders: impl IntoIterator<Item = &'a OrderId>,
) -> Result<Escrow, LedgerError> {
    let key = || EscrowKey { store: store.clone(), sku: sku.clone() };
    let mut rows = Vec::new();
    let mut counters = conn.prepare_cached(
        "SELECT kind, order_id, units, seq, cancelled FROM escrow WHERE sku = ?1 AND kind IN ('granted', 'released')",
    )?;
    let mut found = counters.query(params![sku.as_str()])?;
    while let Some(r) = found.next()? {
        let kind: String = r.get(0)?;
        rows.push(row_from(key(), &kind, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)?);
    }
    let mut of_order = conn.prepare_cached(
        "SELECT kind, order_id, units, seq, cancelled FROM escrow
          WHERE sku = ?1 AND kind IN ('reservation', 'fulfilled') AND order_id = ?2",
    )?;
    let mut seen = std::collections::BTreeSet::new();
    for order in orders {
        if !seen.insert(order) {
            continue;
        }
        let mut found = of_order.query(params![sku.as_str(), order.as_str()])?;
        while let Some(r) = found.next()? {
            let kind: String = r.get(0)?;
            rows.push(row_from(key(), &kind, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)?);
        }
    }
    let mut escrow = Escrow::new(key());
    escrow.merge_rows(&rows).map_err(|e| corrupt("allocation rows", e))?;
    Ok(escrow)
}

/// The orders `rows` name.
fn orders_named(rows: &[EscrowRow]) -> impl Iterator<Item = &OrderId> {
    rows.iter().filter_map(|r| match r {
        EscrowRow::Reservation { order, .. } | EscrowRow::Fulfilled { order, .. } => Some(order),
        EscrowRow::Granted { .. } | EscrowRow::Released { .. } => None,
    })
}

/// One SKU's counters, read without its order history: what the top-up needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkuTotals {
    pub granted: u64,
    pub released: u64,
    /// Every reservation ever (the kept sum, see migration 6).
    pub reserved: u64,
    /// Units of open reservations: orders waiting for pickup.
    pub promised: u64,
}

impl SkuTotals {
    /// As `Escrow::cloud_rights`: `granted - reserved - released`.
    pub fn rights(&self) -> i128 {
        i128::from(self.granted) - i128::from(self.reserved) - i128::from(self.released)
    }

    /// As `Escrow::committed`: `rights + promised`.
    pub fn committed(&self) -> i128 {
        self.rights() + i128::from(self.promised)
    }
}

/// The SKU's counters: two key lookups, the kept sum of reservations, and a sum over the
/// open reservations only (`INDEXED BY`: without statistics SQLite would rather walk the
/// SKU's whole primary-key range, its history).
pub fn totals(conn: &Connection, sku: &Sku) -> Result<SkuTotals, LedgerError> {
    let mut totals = SkuTotals::default();
    let mut counters =
        conn.prepare_cached("SELECT kind, units FROM escrow WHERE sku = ?1 AND kind IN ('granted', 'released')")?;
    let mut found = counters.query(params![sku.as_str()])?;
    while let Some(r) = found.next()? {
        let kind: String = r.get(0)?;
        let units = to_u64("allocation units", r.get(1)?)?;
        match kind.as_str() {
            "granted" => totals.granted = units,
            _ => totals.released = units,
        }
    }
    totals.reserved = reserved_sum(conn, sku)?;
    let promised: i64 = conn
        .prepare_cached(
            "SELECT coalesce(sum(units), 0) FROM escrow INDEXED BY escrow_open WHERE sku = ?1 AND open = 1",
        )?
        .query_row(params![sku.as_str()], |r| r.get(0))?;
    totals.promised = to_u64("promised units", promised)?;
    Ok(totals)
}

/// The SKU's sum of reserved units, ever.
pub fn reserved_sum(conn: &Connection, sku: &Sku) -> Result<u64, LedgerError> {
    let units: Option<i64> = conn
        .prepare_cached("SELECT units FROM escrow_reserved WHERE sku = ?1")?
        .query_row(params![sku.as_str()], |r| r.get(0))
        .optional()?;
    to_u64("reserved units", units.unwrap_or(0))
}

/// Units that merging `rows` would add to the SKU's reservations (those whose order `held`
/// does not have yet, each once).
pub fn new_reserved_units(held: &Escrow, rows: &[EscrowRow]) -> u128 {
    let mut seen = std::collections::BTreeSet::new();
    rows.iter()
        .filter_map(|r| match r {
            EscrowRow::Reservation { order, units, .. } if held.order(order).is_none() && seen.insert(order) => {
                Some(u128::from(*units))
            }
            _ => None,
        })
        .sum()
}

/// Refuses a merge that would take the SKU's sum of reservations past what can be stored (what
/// `Escrow::merge_rows` checks on a whole escrow; the writer holds only part of it).
pub fn check_reserved(reserved: u64, adding: u128, sku: &Sku) -> Result<(), String> {
    let total = u128::from(reserved) + adding;
    if total > u128::from(Escrow::MAX) {
        return Err(format!(
            "reserved units of {sku} would reach {total}, above the largest storable count {}",
            Escrow::MAX
        ));
    }
    Ok(())
}

/// Joins `rows` (all of one SKU, checked by the caller) into the stored allocation; each row
/// that changed takes the next change version. Returns how many changed. Reads only the rows
/// of the orders `rows` name, not the SKU's history.
pub fn merge_rows(
    conn: &Connection,
    store: &StoreId,
    sku: &Sku,
    rows: &[EscrowRow],
    version: &mut u64,
) -> Result<usize, LedgerError> {
    let mut escrow = load_for(conn, store, sku, orders_named(rows))?;
    check_reserved(reserved_sum(conn, sku)?, new_reserved_units(&escrow, rows), sku)
        .map_err(|e| corrupt("allocation merge", e))?;
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

/// SKUs with units promised to waiting orders (an open reservation: neither cancelled nor
/// handed over), from the index of open reservations.
pub fn skus_with_promised(conn: &Connection) -> Result<Vec<Sku>, LedgerError> {
    let mut stmt =
        conn.prepare_cached("SELECT DISTINCT sku FROM escrow INDEXED BY escrow_open WHERE open = 1 ORDER BY sku")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    rows.map(|r| Sku::new(r?).map_err(|e| corrupt("allocation sku", e))).collect()
}

/// Whether any order of `sku` waits for pickup (one probe of the index of open reservations).
pub fn has_open(conn: &Connection, sku: &Sku) -> Result<bool, LedgerError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM escrow INDEXED BY escrow_open WHERE sku = ?1 AND open = 1 LIMIT 1")?
        .query_row(params![sku.as_str()], |_| Ok(()))
        .optional()?
        .is_some())
}

/// An order line waiting for pickup, with what the store knows of its order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenLine {
    pub order: OrderId,
    pub units: u64,
    pub seq: u64,
    /// Staff put the goods aside.
    pub picked: bool,
    /// `None` while the order's header has not reached the store.
    pub expires_at_ms: Option<i64>,
}

/// The open reservations of `sku`, in reservation order: only those, never its history.
pub fn open_lines(conn: &Connection, sku: &Sku) -> Result<Vec<OpenLine>, LedgerError> {
    let mut stmt = conn.prepare_cached(
        "SELECT e.order_id, e.units, e.seq, o.picked_at_ms IS NOT NULL, o.expires_at_ms
           FROM escrow e INDEXED BY escrow_open LEFT JOIN orders o ON o.order_id = e.order_id
          WHERE e.sku = ?1 AND e.open = 1
          ORDER BY e.seq",
    )?;
    let mut rows = stmt.query(params![sku.as_str()])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(OpenLine {
            order: OrderId::new(r.get::<_, String>(0)?).map_err(|e| corrupt("allocation order id", e))?,
            units: to_u64("reserved units", r.get(1)?)?,
            seq: to_u64("reservation seq", r.get(2)?)?,
            picked: r.get(3)?,
            expires_at_ms: r.get(4)?,
        });
    }
    Ok(out)
}

/// Whether this ledger has caught up with the cloud once since it was created or restored
/// (`meta.bootstrapped`): until then it does not know the cloud's reservations and
/// cancellations, so it neither grants nor hands over.
pub fn caught_up(conn: &Connection) -> Result<bool, LedgerError> {
    let v: Option<i64> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'bootstrapped'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(v == Some(1))
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
