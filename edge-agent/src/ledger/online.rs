//! The writer's side of online pickup orders (issue 7), run inside its batch transaction:
//! screening a sync page's allocation rows and order headers against what the store holds
//! (a differing header or a conflicting reservation is refused and named; the rest merges),
//! resolving a handover or a pick into an event or a refusal, the effects of those events on
//! the allocation tables, and the top-up grant the policy asks for after a commit.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rusqlite::{params, Connection, OptionalExtension};
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

/// Which row of a SKU's allocation this is: a counter, or one order's reservation or handover.
type RowIdentity = (Sku, u8, Option<OrderId>);

fn identity(row: &EscrowRow) -> RowIdentity {
    let sku = row.key().sku.clone();
    match row {
        EscrowRow::Granted { .. } => (sku, 0, None),
        EscrowRow::Released { .. } => (sku, 1, None),
        EscrowRow::Reservation { order, .. } => (sku, 2, Some(order.clone())),
        EscrowRow::Fulfilled { order, .. } => (sku, 3, Some(order.clone())),
    }
}

/// The identities a row's merge depends on: its SKU's counters and its order's rows.
fn related_identities(row: &EscrowRow) -> Vec<RowIdentity> {
    let sku = &row.key().sku;
    let mut ids = vec![(sku.clone(), 0, None), (sku.clone(), 1, None)];
    if let EscrowRow::Reservation { order, .. } | EscrowRow::Fulfilled { order, .. } = row {
        ids.push((sku.clone(), 2, Some(order.clone())));
        ids.push((sku.clone(), 3, Some(order.clone())));
    }
    ids
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
    // Kept headers by order id (a page may carry 20,000): position in `headers`.
    let mut kept_at: HashMap<OrderId, usize> = HashMap::with_capacity(rows.orders.len());
    for header in std::mem::take(&mut rows.orders) {
        if header.store != *store {
            refused.push(format!("order {} of store {}: this is store {store}", header.order, header.store));
            continue;
        }
        if let Err(e) = header.validate() {
            refused.push(e.to_string());
            continue;
        }
        if let Some(&at) = kept_at.get(&header.order) {
            // Already kept from this page: a copy that differs is refused, an equal one dropped.
            if let Err(e) = headers[at].check_same(&header) {
                refused.push(e.to_string());
            }
            continue;
        }
        if let Some(held) = allocation::header(conn, &header.order)? {
            if let Err(e) = held.check_same(&header) {
                refused.push(e.to_string());
                continue;
            }
        }
        kept_at.insert(header.order.clone(), headers.len());
        headers.push(header);
    }
    rows.orders = headers;

    // The trial state: the held rows of the orders the page names (a row joins only with the
    // held row of the same identity), by identity, and each SKU's sum of reserved units. Each
    // page row is tried on a small escrow of its own identities, so a page of 20,000 rows for
    // one SKU costs 20,000 small merges, not 20,000 copies of a growing state.
    let mut named: BTreeMap<Sku, Vec<&OrderId>> = BTreeMap::new();
    for row in rows.escrow.iter().filter(|r| r.key().store == *store) {
        let orders = named.entry(row.key().sku.clone()).or_default();
        if let EscrowRow::Reservation { order, .. } | EscrowRow::Fulfilled { order, .. } = row {
            orders.push(order);
        }
    }
    let mut trial: BTreeMap<RowIdentity, EscrowRow> = BTreeMap::new();
    let mut reserved: BTreeMap<Sku, u64> = BTreeMap::new();
    for (sku, orders) in named {
        let held = allocation::load_for(conn, store, &sku, orders)?;
        trial.extend(held.rows().into_iter().map(|r| (identity(&r), r)));
        reserved.insert(sku.clone(), allocation::reserved_sum(conn, &sku)?);
    }
    let mut kept = Vec::with_capacity(rows.escrow.len());
    for row in std::mem::take(&mut rows.escrow) {
        let sku = &row.key().sku;
        let Some(sum) = reserved.get_mut(sku).filter(|_| row.key().store == *store) else {
            refused.push(format!("online allocation row {}: this is store {store}", describe(&row)));
            continue;
        };
        let mut small = Escrow::new(row.key().clone());
        let related: Vec<EscrowRow> = related_identities(&row).iter().filter_map(|id| trial.get(id)).cloned().collect();
        small.merge_rows(&related).map_err(|e| LedgerError::Corrupt {
            seq: None,
            detail: format!("held allocation rows of {}: {e}", row.key()),
        })?;
        let adding = allocation::new_reserved_units(&small, std::slice::from_ref(&row));
        if let Err(e) = allocation::check_reserved(*sum, adding, sku) {
            refused.push(format!("online allocation row {}: {e}", describe(&row)));
            continue;
        }
        // All or nothing per row: a refused row leaves the trial state as it was.
        match small.merge_rows(std::slice::from_ref(&row)) {
            Ok(changed) => {
                // `adding` fits (checked above), so the sum stays a storable count.
                *sum = sum.saturating_add(u64::try_from(adding).unwrap_or(u64::MAX));
                trial.extend(changed.into_iter().map(|r| (identity(&r), r)));
                kept.push(row);
            }
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
        // Only this order's rows: fulfilling it joins with nothing else.
        let escrow = allocation::load_for(conn, store, &line.sku, [&header.order])?;
        let Some(view) = escrow.order(&header.order) else {
            let (order, sku) = (header.order.clone(), line.sku.clone());
            return Ok(Err(match refused_reservation(conn, store, &sku, &order)? {
                Some((seq, reason)) => OrderRefusal::ReservationRefused { order, sku, seq, reason },
                None => OrderRefusal::Incomplete { order, sku },
            }));
        };
        lines.push((line.clone(), escrow, view.status));
    }
    Ok(Ok(lines))
}

/// The latest sync merge that refused `order`'s reservation of `sku`, and why. Only read when a
/// handover or pick finds the reservation missing (rare): it scans the recorded merges for the
/// refusal `screen_page` wrote, so the counter is told that syncing again will not bring it.
fn refused_reservation(
    conn: &Connection,
    store: &StoreId,
    sku: &Sku,
    order: &OrderId,
) -> Result<Option<(u64, String)>, LedgerError> {
    let prefix = format!("online allocation row {store}/{sku} reservation {order}: ");
    let found: Option<(i64, Vec<u8>)> = conn
        .prepare_cached(
            "SELECT seq, body FROM events WHERE kind = 'sync_merge' AND instr(body, ?1) > 0 ORDER BY seq DESC LIMIT 1",
        )?
        .query_row(params![prefix.as_bytes()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((seq, body)) = found else { return Ok(None) };
    let seq = u64::try_from(seq)
        .map_err(|_| LedgerError::Corrupt { seq: None, detail: format!("negative sequence {seq}") })?;
    let body = EventBody::decode(&body).map_err(|detail| LedgerError::Corrupt { seq: Some(seq), detail })?;
    let EventBody::SyncMerge { refused, .. } = body else { return Ok(None) };
    Ok(refused.iter().rev().find_map(|r| r.strip_prefix(&prefix)).map(|reason| (seq, reason.to_owned())))
}

fn handed_over(status: OrderStatus) -> bool {
    matches!(status, OrderStatus::Fulfilled | OrderStatus::CancelledButFulfilled)
}

/// What staff want to do with an order at the counter.
enum CounterAction<'a> {
    Handover { code: Option<&'a str> },
    Pick,
}

/// An order that may be handed over or picked, as this store holds it.
struct OpenOrder {
    marks: allocation::Marks,
    lines: LineStates,
}

/// The checks a handover and a pick share, in this order: caught up, known, (for a handover)
/// the code, already handed over, complete, cancelled, expired. A refusal writes nothing.
fn open_order(
    conn: &Connection,
    store: &StoreId,
    order: &OrderId,
    action: CounterAction<'_>,
    now_ms: i64,
) -> Result<Result<OpenOrder, OrderRefusal>, LedgerError> {
    let refuse = |r| Ok(Err(r));
    if !allocation::caught_up(conn)? {
        return refuse(OrderRefusal::CatchingUp { order: order.clone() });
    }
    let Some(header) = allocation::header(conn, order)? else {
        return refuse(OrderRefusal::NotSynced { order: order.clone() });
    };
    if let CounterAction::Handover { code } = action {
        let Some(code) = code else {
            return refuse(OrderRefusal::Invalid { order: order.clone(), reason: "no pickup code was given".into() });
        };
        if !header.code_matches(code) {
            return refuse(OrderRefusal::WrongCode { order: order.clone() });
        }
    }
    let marks = allocation::marks(conn, order)?;
    if let Some(at) = marks.handed_over_at_ms {
        return refuse(OrderRefusal::AlreadyHandedOver { order: order.clone(), at: format_utc(at) });
    }
    let lines = match line_escrows(conn, store, &header)? {
        Ok(lines) => lines,
        Err(refusal) => return refuse(refusal),
    };
    // A store hands every line over in one event, so one handed-over line means the order was.
    if lines.iter().any(|(_, _, s)| handed_over(*s)) {
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
    Ok(Ok(OpenOrder { marks, lines }))
}

/// Checks a handover against the order as this store holds it and, if it may go ahead, returns
/// the event that hands every line over (the units each reservation holds leave the store's
/// own slot). A refusal writes nothing.
pub(super) fn resolve_handover(
    conn: &Connection,
    store: &StoreId,
    order: &OrderId,
    code: Option<&str>,
    now_ms: i64,
) -> Result<Result<EventBody, OrderRefusal>, LedgerError> {
    let open = match open_order(conn, store, order, CounterAction::Handover { code }, now_ms)? {
        Ok(open) => open,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let side = Side::Store(store.clone());
    let mut out = Vec::with_capacity(open.lines.len());
    for (line, mut escrow, _) in open.lines {
        match escrow.fulfil(&side, order) {
            Ok(applied) if applied.stock_out > 0 => out.push(OrderLine { sku: line.sku, units: applied.stock_out }),
            Ok(_) => {}
            Err(e) => return Ok(Err(OrderRefusal::Invalid { order: order.clone(), reason: e.to_string() })),
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
    let open = match open_order(conn, store, order, CounterAction::Pick, now_ms)? {
        Ok(open) => open,
        Err(refusal) => return Ok(Err(refusal)),
    };
    if let Some(at) = open.marks.picked_at_ms {
        return Ok(Err(OrderRefusal::AlreadyPicked { order: order.clone(), at: format_utc(at) }));
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
    // The counters only, never the SKU's order history: this runs for every SKU a batch moves.
    let totals = allocation::totals(conn, sku)?;
    let on_hand = projection::on_hand(conn, store, sku)?;
    let units = policy::top_up(&allocation, totals.rights(), totals.committed(), i128::from(on_hand));
    if units == 0 {
        return Ok(None);
    }
    // What `Escrow::grant` checks: only free stock, and a total that can be stored.
    let free = i128::from(on_hand) - totals.committed() - i128::from(allocation.safety_stock);
    let granted = totals.granted.checked_add(units).filter(|g| *g <= Escrow::MAX);
    let Some(granted) = granted.filter(|_| i128::from(units) <= free) else {
        // top_up computes exactly what a grant accepts; a refusal here is a bug, not a reason
        // to stop the batch. It is tried again whenever the SKU's stock or allocation moves.
        tracing::warn!(
            sku = %sku,
            units,
            free = %free,
            granted = totals.granted,
            error_code = "ONLINE_GRANT_REFUSED",
            "Online allocation top-up refused: more than is free, or a total that cannot be stored"
        );
        return Ok(None);
    };
    let clamp = |v: i128| v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    Ok(Some(EventBody::Grant {
        sku: sku.clone(),
        units,
        granted,
        on_hand,
        committed: clamp(totals.committed()),
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
