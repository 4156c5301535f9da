//! The views of online orders that `storectl` and the control socket show, each read from one
//! snapshot of the projections: the order list, one order, the orders at risk, and the online
//! allocation per SKU. The writer uses [`at_risk_of`] too, after each commit, to raise the
//! shortage alert, so the alert and `storectl orders at-risk` rank orders the same way.

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::Connection;
use shared::escrow::OrderView;
use shared::{EscrowRow, OrderHeader, OrderId, OrderStatus, Sku, StoreId};

use super::allocation::{self, Marks};
use super::{projection, LedgerError};
use crate::orders::{
    AtRiskOrder, AtRiskReport, LineSummary, OnlinePolicy, OnlineRow, OrderList, OrderSummary, PickupStatus, SkuAtRisk,
    StatusFilter,
};

/// Per order, per SKU: the reservation's `cancelled` flag (if the reservation is here) and
/// whether the store handed the line over.
#[derive(Debug, Default)]
struct OrderRows {
    reservations: BTreeMap<Sku, bool>,
    fulfilled: BTreeSet<Sku>,
}

fn index(rows: Vec<EscrowRow>) -> BTreeMap<OrderId, OrderRows> {
    let mut by_order: BTreeMap<OrderId, OrderRows> = BTreeMap::new();
    for row in rows {
        match row {
            EscrowRow::Reservation { key, order, cancelled, .. } => {
                by_order.entry(order).or_default().reservations.insert(key.sku, cancelled);
            }
            EscrowRow::Fulfilled { key, order } => {
                by_order.entry(order).or_default().fulfilled.insert(key.sku);
            }
            EscrowRow::Granted { .. } | EscrowRow::Released { .. } => {}
        }
    }
    by_order
}

/// A line's status as `shared::escrow` derives it (a handover without its reservation counts
/// for nothing until the reservation arrives).
fn line_status(rows: Option<&OrderRows>, sku: &Sku) -> Option<OrderStatus> {
    let rows = rows?;
    let cancelled = *rows.reservations.get(sku)?;
    Some(match (cancelled, rows.fulfilled.contains(sku)) {
        (false, false) => OrderStatus::Reserved,
        (true, false) => OrderStatus::Cancelled,
        (false, true) => OrderStatus::Fulfilled,
        (true, true) => OrderStatus::CancelledButFulfilled,
    })
}

fn summary(header: OrderHeader, marks: Marks, rows: Option<&OrderRows>, now_ms: i64) -> OrderSummary {
    let lines: Vec<LineSummary> = header
        .lines
        .iter()
        .map(|l| LineSummary { sku: l.sku.clone(), units: l.units, status: line_status(rows, &l.sku) })
        .collect();
    let statuses: Vec<Option<OrderStatus>> = lines.iter().map(|l| l.status).collect();
    let status = PickupStatus::derive(
        &statuses,
        marks.handed_over_at_ms.is_some(),
        marks.picked_at_ms.is_some(),
        header.is_expired(now_ms),
    );
    OrderSummary {
        cancelled_after_handover: statuses.contains(&Some(OrderStatus::CancelledButFulfilled)),
        order: header.order,
        status,
        customer_ref: header.customer_ref,
        created_at_ms: header.created_at_ms,
        expires_at_ms: header.expires_at_ms,
        lines,
        picked_at_ms: marks.picked_at_ms,
        handed_over_at_ms: marks.handed_over_at_ms,
    }
}

/// The orders whose status `filter` keeps, oldest first, at most [`OrderList::LIMIT`] (the
/// most recent of them).
pub fn list(conn: &Connection, store: &StoreId, filter: StatusFilter, now_ms: i64) -> Result<OrderList, LedgerError> {
    let rows = index(allocation::order_rows(conn, store)?);
    let mut orders: Vec<OrderSummary> = allocation::headers(conn)?
        .into_iter()
        .map(|(header, marks)| {
            let r = rows.get(&header.order);
            summary(header, marks, r, now_ms)
        })
        .filter(|o| filter.keeps(o.status))
        .collect();
    let matching = orders.len();
    orders.drain(..matching.saturating_sub(OrderList::LIMIT));
    Ok(OrderList { orders, matching })
}

/// One order, if this store has its header.
pub fn one(
    conn: &Connection,
    store: &StoreId,
    order: &OrderId,
    now_ms: i64,
) -> Result<Option<OrderSummary>, LedgerError> {
    let Some(header) = allocation::header(conn, order)? else { return Ok(None) };
    let marks = allocation::marks(conn, order)?;
    let rows = index(allocation::rows_of_order(conn, store, order)?);
    Ok(Some(summary(header, marks, rows.get(order), now_ms)))
}

/// Which waiting orders keep their cover first when stock runs short: those staff put aside
/// (their goods are already off the shelf), then the others, and last the orders past their
/// pickup deadline that HQ has not cancelled yet (they will not be handed over); within a rank,
/// the earliest reserved.
fn cover_rank(line: &allocation::OpenLine, now_ms: i64) -> u8 {
    let expired = line.expires_at_ms.is_some_and(|at| now_ms >= at);
    match (expired, line.picked) {
        (true, _) => 2,
        (false, true) => 0,
        (false, false) => 1,
    }
}

/// The open lines `on_hand` does not cover: units cover lines in [`cover_rank`] order and every
/// line not fully covered is at risk (as `Escrow::orders_at_risk`, with the store's ranking).
/// Returned in reservation order.
fn uncovered(mut lines: Vec<allocation::OpenLine>, on_hand: i64, now_ms: i64) -> Vec<allocation::OpenLine> {
    lines.sort_by_key(|l| (cover_rank(l, now_ms), l.seq));
    let mut cover = i128::from(on_hand.max(0));
    let mut at_risk: Vec<allocation::OpenLine> = lines
        .into_iter()
        .filter(|l| {
            if i128::from(l.units) <= cover {
                cover -= i128::from(l.units);
                false
            } else {
                cover = 0;
                true
            }
        })
        .collect();
    at_risk.sort_by_key(|l| l.seq);
    at_risk
}

/// The SKU's waiting orders that its stock on hand no longer covers as of `now_ms`, or `None`
/// when all are covered (or none wait). Reads one index probe when no order of the SKU waits,
/// and otherwise only its open reservations, never its order history: the writer calls this
/// for every SKU a batch moves.
pub fn at_risk_of(
    conn: &Connection,
    store: &StoreId,
    sku: &Sku,
    now_ms: i64,
) -> Result<Option<(SkuAtRisk, Vec<OrderView>)>, LedgerError> {
    if !allocation::has_open(conn, sku)? {
        return Ok(None);
    }
    let lines = allocation::open_lines(conn, sku)?;
    let promised = u64::try_from(lines.iter().map(|l| u128::from(l.units)).sum::<u128>()).unwrap_or(u64::MAX);
    let on_hand = projection::on_hand(conn, store, sku)?;
    let shortfall = i128::from(promised) - i128::from(on_hand.max(0));
    if shortfall <= 0 {
        return Ok(None);
    }
    let orders: Vec<OrderView> = uncovered(lines, on_hand, now_ms)
        .into_iter()
        .map(|l| OrderView { order: l.order, units: l.units, seq: l.seq, status: OrderStatus::Reserved })
        .collect();
    let sku_at_risk = SkuAtRisk {
        sku: sku.clone(),
        on_hand,
        promised,
        shortfall: u64::try_from(shortfall).unwrap_or(u64::MAX),
        orders: orders.iter().map(|o| o.order.clone()).collect(),
    };
    Ok(Some((sku_at_risk, orders)))
}

/// Every SKU with orders at risk as of `now_ms`, and the orders (with the customer reference,
/// for a call).
pub fn at_risk(conn: &Connection, store: &StoreId, now_ms: i64) -> Result<AtRiskReport, LedgerError> {
    let mut report = AtRiskReport::default();
    for sku in allocation::skus_with_promised(conn)? {
        let Some((sku_at_risk, orders)) = at_risk_of(conn, store, &sku, now_ms)? else { continue };
        for o in orders {
            let header = allocation::header(conn, &o.order)?;
            report.orders.push(AtRiskOrder {
                sku: sku.clone(),
                units: o.units,
                customer_ref: header.as_ref().map(|h| h.customer_ref.clone()).unwrap_or_default(),
                expires_at_ms: header.map(|h| h.expires_at_ms),
                order: o.order,
            });
        }
        report.skus.push(sku_at_risk);
    }
    Ok(report)
}

/// The online allocation of `sku`, or of every SKU that has one; with the policy's target,
/// safety stock and the free units when `policy` is given.
pub fn online(
    conn: &Connection,
    store: &StoreId,
    sku: Option<&Sku>,
    policy: Option<&OnlinePolicy>,
) -> Result<Vec<OnlineRow>, LedgerError> {
    let skus = match sku {
        Some(s) => vec![s.clone()],
        None => allocation::skus(conn)?,
    };
    let clamp = |v: i128| v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    let mut out = Vec::with_capacity(skus.len());
    for sku in skus {
        let escrow = allocation::load_escrow(conn, store, &sku)?;
        let on_hand = projection::on_hand(conn, store, &sku)?;
        let allocation = match policy {
            Some(p) => {
                let item = projection::catalog_item(conn, &sku)?;
                let category = item.as_ref().and_then(|i| i.category.as_ref()).map(|c| c.value.clone());
                let discontinued = item.as_ref().is_some_and(|i| i.is_discontinued());
                p.allocation_for(&sku, category.as_deref(), discontinued)
            }
            None => None,
        };
        let t = escrow.totals();
        out.push(OnlineRow {
            on_hand,
            granted: t.granted,
            released: t.released,
            reserved: t.reserved,
            promised: t.promised,
            fulfilled: t.fulfilled,
            cancelled: t.cancelled,
            rights: clamp(escrow.cloud_rights()),
            committed: clamp(escrow.committed()),
            target: allocation.map(|a| a.target),
            safety_stock: allocation.map(|a| a.safety_stock),
            free: allocation.map(|a| clamp(escrow.free(i128::from(on_hand), a.safety_stock))),
            sku,
        });
    }
    Ok(out)
}
