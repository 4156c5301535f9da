//! The writer's side of online pickup orders (issue 7), run inside its batch transaction:
//! screening a sync page's allocation rows and order headers against what the store holds
//! (a differing header or a conflicting reservation is refused and named; the rest merges),
//! resolving a handover or a pick into an event or a refusal, the effects of those events on
//! the allocation tables, and the top-up grant the policy asks for after a commit.

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::Connection;
use shared::sync::Rows;
use shared::{Escrow, EscrowRow, OrderHeader, OrderId, OrderLine, OrderStatus, Side, Sku, StoreId};

use super::allocation;
use super::command::{EventBody, IdempotencyKey};
use super::{projection, LedgerError};
use crate::orders::policy::{self, SweepScope};
use crate::orders::{format_utc, OnlinePolicy, OrderRefusal};

/// Names an allocation row in a refusal: `s1/MILK reservation W-1`.
fn describe(row: &EscrowRow) -> String {
    match row {
        EscrowRow::Granted { key, .. } => format!("{key} granted"),
        EscrowRow::Released { key, .. } => format!("{key} released"),
        EscrowRow::Reservation { key, order, .. } => format!("{key} reservation {order}"),
        EscrowRow::Fulfilled { key, order } => format!("{key} fulfilled {order}"),
    }
}

/// Takes out of a page (before it is recorded) the order headers and allocation rows this
/// store cannot merge, naming each in `refused`: another store's, an invalid header, a header
/// that differs from the one held (order ids are never reused), a reservation that disagrees
/// with the held one. What is left merges without error.
pub(super) fn screen_page(
    conn: &Connection,
    store: &StoreId,
    rows: &mut Rows,
    refused: &mut Vec<String>,
) -> Result<(), LedgerError> {
    let mut headers: Vec<OrderHeader> = Vec::with_capacity(rows.orders.len());
    for header in std::mem::take(&mut rows.orders) {
        if header.store != *store {
            refused.push(format!("order {} of store {}: this is store {store}", header.order, header.store));
            continue;
        }
        if let Err(e) = header.validate() {
            refused.push(e.to_string());
            continue;
        }
        let held = match headers.iter().find(|h| h.order == header.order) {
            Some(h) => Some(h.clone()),
            None => allocation::header(conn, &header.order)?,
        };
        match held {
            Some(held) => match held.check_same(&header) {
                Err(e) => refused.push(e.to_string()),
                Ok(()) if !headers.contains(&header) => headers.push(header),
                Ok(()) => {}
            },
            None => headers.push(header),
        }
    }
    rows.orders = headers;

    let mut escrows: BTreeMap<Sku, Escrow> = BTreeMap::new();
    let mut kept = Vec::with_capacity(rows.escrow.len());
    for row in std::mem::take(&mut rows.escrow) {
        if row.key().store != *store {
            refused.push(format!("online allocation row {}: this is store {store}", describe(&row)));
            continue;
        }
        let sku = row.key().sku.clone();
        let escrow = match escrows.entry(sku) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let loaded = allocation::load_escrow(conn, store, e.key())?;
                e.insert(loaded)
            }
        };
        // All or nothing per row: a refused row leaves the trial state as it was.
        match escrow.merge_rows(std::slice::from_ref(&row)) {
            Ok(_) => kept.push(row),
            Err(e) => refused.push(format!("online allocation row {}: {e}", describe(&row))),
        }
    }
    rows.escrow = kept;
    Ok(())
}

/// Each line of an order with its SKU's allocation and the line's status there.
type LineStates = Vec<(OrderLine, Escrow, OrderStatus)>;

/// Where each line of an order stands, or the refusal for a line whose reservation is missing.
fn line_escrows(
    conn: &Connection,
    store: &StoreId,
    header: &OrderHeader,
) -> Result<Result<LineStates, OrderRefusal>, LedgerError> {
    let mut lines = Vec::with_capacity(header.lines.len());
    for line in &header.lines {
        let escrow = allocation::load_escrow(conn, store, &line.sku)?;
        let Some(view) = escrow.order(&header.order) else {
            return Ok(Err(OrderRefusal::Incomplete { order: header.order.clone(), sku: line.sku.clone() }));
        };
        lines.push((line.clone(), escrow, view.status));
    }
    Ok(Ok(lines))
}

fn handed_over(status: OrderStatus) -> bool {
    matches!(status, OrderStatus::Fulfilled | OrderStatus::CancelledButFulfilled)
}

/// Checks a handover against the order as this store holds it and, if it may go ahead, returns
/// the event that hands every line over (the units each reservation holds leave the store's
/// own slot). Checked in this order: known, code, already handed over, cancelled, complete,
/// expired. A refusal writes nothing.
pub(super) fn resolve_handover(
    conn: &Connection,
    store: &StoreId,
    order: &OrderId,
    code: Option<&str>,
    now_ms: i64,
) -> Result<Result<EventBody, OrderRefusal>, LedgerError> {
    let refuse = |r| Ok(Err(r));
    let Some(header) = allocation::header(conn, order)? else {
        return refuse(OrderRefusal::NotSynced { order: order.clone() });
    };
    let Some(code) = code else {
        return refuse(OrderRefusal::Invalid { order: order.clone(), reason: "no pickup code was given".into() });
    };
    if !header.code_matches(code) {
        return refuse(OrderRefusal::WrongCode { order: order.clone() });
    }
    let marks = allocation::marks(conn, order)?;
    if let Some(at) = marks.handed_over_at_ms {
        return refuse(OrderRefusal::AlreadyHandedOver { order: order.clone(), at: format_utc(at) });
    }
    let lines = match line_escrows(conn, store, &header)? {
        Ok(lines) => lines,
        Err(refusal) => return refuse(refusal),
    };
    if lines.iter().all(|(_, _, s)| handed_over(*s)) {
        // Handed over by this store before its ledger was rebuilt: the time went with it.
        let at = "an earlier time (before this ledger was rebuilt)".to_owned();
        return refuse(OrderRefusal::AlreadyHandedOver { order: order.clone(), at });
    }
    if lines.iter().any(|(_, _, s)| *s == OrderStatus::Cancelled) {
        return refuse(OrderRefusal::Cancelled { order: order.clone(), picked: marks.picked_at_ms.is_some() });
    }
    if header.is_expired(now_ms) {
        return refuse(OrderRefusal::Expired { order: order.clone(), at: format_utc(header.expires_at_ms) });
    }
    let side = Side::Store(store.clone());
    let mut out = Vec::with_capacity(lines.len());
    for (line, mut escrow, _) in lines {
        match escrow.fulfil(&side, order) {
            Ok(applied) if applied.stock_out > 0 => out.push(OrderLine { sku: line.sku, units: applied.stock_out }),
            Ok(_) => {}
            Err(e) => return refuse(OrderRefusal::Invalid { order: order.clone(), reason: e.to_string() }),
        }
    }
    Ok(Ok(EventBody::Handover { order: order.clone(), lines: out, at_ms: now_ms }))
}

/// Checks a pick (staff put the goods aside) and returns its event, or the refusal.
pub(super) fn resolve_pick(
    conn: &Connection,
    store: &StoreId,
    order: &OrderId,
    now_ms: i64,
) -> Result<Result<EventBody, OrderRefusal>, LedgerError> {
    let refuse = |r| Ok(Err(r));
    let Some(header) = allocation::header(conn, order)? else {
        return refuse(OrderRefusal::NotSynced { order: order.clone() });
    };
    let marks = allocation::marks(conn, order)?;
    if let Some(at) = marks.handed_over_at_ms {
        return refuse(OrderRefusal::AlreadyHandedOver { order: order.clone(), at: format_utc(at) });
    }
    let lines = match line_escrows(conn, store, &header)? {
        Ok(lines) => lines,
        Err(refusal) => return refuse(refusal),
    };
    if lines.iter().all(|(_, _, s)| handed_over(*s)) {
        let at = "an earlier time (before this ledger was rebuilt)".to_owned();
        return refuse(OrderRefusal::AlreadyHandedOver { order: order.clone(), at });
    }
    if lines.iter().any(|(_, _, s)| *s == OrderStatus::Cancelled) {
        return refuse(OrderRefusal::Cancelled { order: order.clone(), picked: false });
    }
    if header.is_expired(now_ms) {
        return refuse(OrderRefusal::Expired { order: order.clone(), at: format_utc(header.expires_at_ms) });
    }
    if let Some(at) = marks.picked_at_ms {
        return refuse(OrderRefusal::AlreadyPicked { order: order.clone(), at: format_utc(at) });
    }
    Ok(Ok(EventBody::Pick { order: order.clone(), at_ms: now_ms }))
}

/// What a recorded event does to the allocation tables: a page's headers and rows merge, a
/// grant raises the store's `granted`, a handover adds its `fulfilled` rows and the handover
/// mark, a pick its mark. Changed rows take the next change versions (own rows so reach the
/// outbox). Returns how many orders were new to this store.
pub(super) fn apply(
    conn: &Connection,
    version: &mut u64,
    store: &StoreId,
    body: &EventBody,
    seq: u64,
) -> Result<usize, LedgerError> {
    let merge = |rows: Vec<EscrowRow>, version: &mut u64| -> Result<(), LedgerError> {
        let mut by_sku: BTreeMap<Sku, Vec<EscrowRow>> = BTreeMap::new();
        for row in rows {
            by_sku.entry(row.key().sku.clone()).or_default().push(row);
        }
        for (sku, rows) in by_sku {
            allocation::merge_rows(conn, store, &sku, &rows, version)?;
        }
        Ok(())
    };
    match body {
        EventBody::SyncMerge { rows, .. } => {
            // Headers first, so no listing shows a line without its order.
            let mut new_orders = 0;
            for header in &rows.orders {
                if allocation::insert_header(conn, header, *version + 1)? {
                    *version += 1;
                    new_orders += 1;
                }
            }
            merge(rows.escrow.clone(), version)?;
            Ok(new_orders)
        }
        EventBody::Grant { .. } => {
            merge(body.own_escrow_rows(store), version)?;
            Ok(0)
        }
        EventBody::Handover { order, at_ms, .. } => {
            merge(body.own_escrow_rows(store), version)?;
            allocation::set_handed_over(conn, order, *at_ms, seq)?;
            Ok(0)
        }
        EventBody::Pick { order, at_ms } => {
            allocation::set_picked(conn, order, *at_ms, seq)?;
            Ok(0)
        }
        _ => Ok(0),
    }
}

/// The grant that tops `sku` up to the policy's target from free stock, as an event to record;
/// `None` when nothing is to be granted. Only the writer calls this, so what it reads (stock,
/// allocation) cannot change before the grant is recorded.
pub(super) fn plan_grant(
    conn: &Connection,
    store: &StoreId,
    policy: &OnlinePolicy,
    sku: &Sku,
) -> Result<Option<EventBody>, LedgerError> {
    let item = projection::catalog_item(conn, sku)?;
    let category = item.as_ref().and_then(|i| i.category.as_ref()).map(|c| c.value.as_str());
    let discontinued = item.as_ref().is_some_and(|i| i.is_discontinued());
    let Some(allocation) = policy.allocation_for(sku, category, discontinued) else { return Ok(None) };
    if allocation.target == 0 {
        return Ok(None);
    }
    let escrow = allocation::load_escrow(conn, store, sku)?;
    let on_hand = projection::on_hand(conn, store, sku)?;
    let units = policy::top_up(&allocation, &escrow, i128::from(on_hand));
    if units == 0 {
        return Ok(None);
    }
    let mut next = escrow.clone();
    if let Err(e) = next.grant(&Side::Store(store.clone()), units, i128::from(on_hand), allocation.safety_stock) {
        // top_up computes exactly what grant accepts; a refusal here is a bug, not a reason to
        // stop the batch: the grant waits for the next change.
        tracing::warn!(sku = %sku, error = %e, error_code = "ONLINE_GRANT_REFUSED", "Online allocation top-up refused");
        return Ok(None);
    }
    let clamp = |v: i128| v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    Ok(Some(EventBody::Grant {
        sku: sku.clone(),
        units,
        granted: next.totals().granted,
        on_hand,
        committed: clamp(escrow.committed()),
        safety_stock: allocation.safety_stock,
        target: allocation.target,
    }))
}

/// A grant's key: the store's `granted` only grows, so its new total names the grant for good.
pub(super) fn grant_key(sku: &Sku, granted: u64) -> Result<IdempotencyKey, LedgerError> {
    IdempotencyKey::new(format!("online:grant:{sku}:{granted}"))
        .map_err(|e| LedgerError::Corrupt { seq: None, detail: format!("grant key: {e}") })
}

/// The SKUs a sweep tops up (at start, and once a new ledger caught up with the cloud): those
/// the policy may grant for (see [`OnlinePolicy::sweep_scope`]).
pub(super) fn sweep_candidates(
    conn: &Connection,
    store: &StoreId,
    policy: &OnlinePolicy,
) -> Result<BTreeSet<Sku>, LedgerError> {
    let scope = policy.sweep_scope();
    let mut skus = BTreeSet::new();
    match &scope {
        SweepScope::Nothing => {}
        SweepScope::Every => skus.extend(projection::skus_in_store(conn, store)?),
        SweepScope::Only { skus: named, .. } => {
            skus.extend(named.iter().cloned());
            for (sku, category) in projection::categories(conn)? {
                if scope.has_category(&category) {
                    skus.insert(sku);
                }
            }
        }
    }
    Ok(skus)
}
