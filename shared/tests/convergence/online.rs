//! Online orders in the convergence simulation (DESIGN 5 and 13.5): what an order operation
//! can answer, how the models name and find escrow rows in their version indexes, and the
//! allocation counters recomputed from the rows alone, so the invariants are not checked with
//! the `Escrow` arithmetic they are checking.

use std::collections::BTreeSet;

use shared::escrow::{Escrow, EscrowError, EscrowKey, EscrowRow, EscrowState, OrderId};
use shared::{OrderError, OrderHeader, Sku};

/// Why HQ's order system could not place an order.
#[derive(Debug)]
pub enum OrderRefused {
    Header(OrderError),
    /// A line beyond the online channel's rights (or the id reused with other units): nothing
    /// of the order was reserved.
    Allocation(EscrowError),
}

/// What became of a customer presenting a pickup code at the counter.
#[derive(Debug)]
pub enum Handover {
    /// Handed over: these units of these SKUs left the store's stock in the same step.
    Done(Vec<(Sku, u64)>),
    /// It was handed over before: nothing moves again.
    Repeated,
    /// Not handed over; nothing recorded.
    Refused(HandoverRefusal),
}

#[derive(Debug)]
pub enum HandoverRefusal {
    /// The store has no header of that order (yet).
    UnknownOrder,
    WrongCode,
    /// Past its pickup time on the store's clock: HQ cancels it as expired.
    Expired,
    /// HQ cancelled it and the store has seen it: the library's refusal.
    Cancelled(EscrowError),
    /// Till sales ate into it: its units are not on the shelf (the shortage alert names it).
    AtRisk,
}

/// The allocation key of each line of an order, in line order.
pub fn line_keys(header: &OrderHeader) -> Vec<EscrowKey> {
    header.lines.iter().map(|line| EscrowKey { store: header.store.clone(), sku: line.sku.clone() }).collect()
}

/// An escrow row as the version indexes name it. Reservations are not here: they travel with
/// their order's header under one version (`RowKey::Order` of the model).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EscrowRowId {
    Granted(EscrowKey),
    Released(EscrowKey),
    Fulfilled(EscrowKey, OrderId),
}

impl EscrowRowId {
    /// The id of a row; `None` for a reservation (indexed through its order).
    pub fn of(row: &EscrowRow) -> Option<EscrowRowId> {
        match row {
            EscrowRow::Granted { key, .. } => Some(EscrowRowId::Granted(key.clone())),
            EscrowRow::Released { key, .. } => Some(EscrowRowId::Released(key.clone())),
            EscrowRow::Fulfilled { key, order } => Some(EscrowRowId::Fulfilled(key.clone(), order.clone())),
            EscrowRow::Reservation { .. } => None,
        }
    }

    pub fn key(&self) -> &EscrowKey {
        match self {
            EscrowRowId::Granted(key) | EscrowRowId::Released(key) | EscrowRowId::Fulfilled(key, _) => key,
        }
    }

    /// Written by the store (granted, fulfilled): a pull leaves these out unless the store is
    /// rebuilding, as it does the store's own stock slots.
    pub fn store_owned(&self) -> bool {
        !matches!(self, EscrowRowId::Released(_))
    }

    /// The row as `state` holds it now.
    pub fn find(&self, state: &EscrowState) -> Option<EscrowRow> {
        let rows = state.get(self.key())?.rows();
        rows.into_iter().find(|row| EscrowRowId::of(row).as_ref() == Some(self))
    }
}

/// The reservation row of `order` on `key`, as `state` holds it now.
pub fn reservation(state: &EscrowState, key: &EscrowKey, order: &OrderId) -> Option<EscrowRow> {
    let rows = state.get(key)?.rows();
    rows.into_iter().find(|row| matches!(row, EscrowRow::Reservation { order: o, .. } if o == order))
}

/// The counters of one key, recomputed from its rows (DESIGN 13.5): `granted`, `released`,
/// `reserved` (every reservation), and each reservation counted once as waiting (`promised`),
/// handed over (`fulfilled`, cancelled or not) or cancelled and not handed over (`cancelled`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub granted: u128,
    pub released: u128,
    pub reserved: u128,
    pub promised: u128,
    pub fulfilled: u128,
    pub cancelled: u128,
}

impl Counted {
    pub fn of(rows: &[EscrowRow]) -> Counted {
        let handed: BTreeSet<&OrderId> = rows
            .iter()
            .filter_map(|row| match row {
                EscrowRow::Fulfilled { order, .. } => Some(order),
                _ => None,
            })
            .collect();
        let mut c = Counted::default();
        for row in rows {
            match row {
                EscrowRow::Granted { granted, .. } => c.granted = c.granted.max(u128::from(*granted)),
                EscrowRow::Released { released, .. } => c.released = c.released.max(u128::from(*released)),
                EscrowRow::Reservation { order, units, cancelled, .. } => {
                    let units = u128::from(*units);
                    c.reserved += units;
                    match (handed.contains(order), cancelled) {
                        (true, _) => c.fulfilled += units,
                        (false, true) => c.cancelled += units,
                        (false, false) => c.promised += units,
                    }
                }
                EscrowRow::Fulfilled { .. } => {}
            }
        }
        c
    }

    /// Units the online channel may still reserve.
    pub fn rights(&self) -> i128 {
        wide(self.granted) - wide(self.reserved) - wide(self.released)
    }

    /// Units the store must hold back: the channel's rights plus the orders waiting for pickup.
    pub fn committed(&self) -> i128 {
        self.rights() + wide(self.promised)
    }
}

fn wide(value: u128) -> i128 {
    i128::try_from(value).expect("escrow counts are bounded by Escrow::MAX")
}

/// What must hold for one key at any replica after any step, whatever it has seen: the online
/// channel holds no reservation (nor release) beyond the units granted to it, and the library's
/// derived counters agree with the rows. Returns the counters.
pub fn check_key(replica: &str, escrow: &Escrow) -> Counted {
    let key = escrow.key();
    let c = Counted::of(&escrow.rows());
    assert!(
        c.reserved + c.released <= c.granted,
        "{replica}, {key}: {} units reserved online + {} released exceed the {} granted",
        c.reserved,
        c.released,
        c.granted
    );
    assert_eq!(c.reserved, c.promised + c.fulfilled + c.cancelled, "{replica}, {key}: an order counted twice");
    let t = escrow.totals();
    let library = [t.granted, t.released, t.reserved, t.promised, t.fulfilled, t.cancelled].map(u128::from);
    let rows = [c.granted, c.released, c.reserved, c.promised, c.fulfilled, c.cancelled];
    assert_eq!(library, rows, "{replica}, {key}: Escrow::totals (granted, released, reserved, promised, fulfilled, cancelled) against its rows");
    assert_eq!(escrow.cloud_rights(), c.rights(), "{replica}, {key}: cloud rights");
    assert_eq!(escrow.committed(), c.committed(), "{replica}, {key}: committed");
    c
}
