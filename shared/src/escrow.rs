//! Online allocation (DESIGN 5 and 13.5): an escrow CRDT per (store, sku) so that online pickup
//! orders never promise a unit twice, while the store and the cloud each check their own side
//! locally, offline or not.
//!
//! # The state and who owns what
//!
//! Per [`EscrowKey`] (store, sku):
//!
//! | field | owner | meaning | merge |
//! |---|---|---|---|
//! | `granted` | store | units the store has handed to the online channel, ever | max |
//! | `released` | cloud | unreserved units the channel gave back to the store, ever | max |
//! | reservation `(order, units, seq)` | cloud | one online order line; immutable once made | must agree |
//! | reservation `cancelled` | cloud | HQ cancelled (or let expire) that order | or |
//! | fulfilled order ids | store | orders handed over at the store | union |
//!
//! Every field grows only and merges by join, so merge is idempotent, commutative and
//! associative, and a delta (any subset of rows) merges to the same result as the full state.
//!
//! Derived (see [`Escrow::totals`]): `reserved` = sum of all reservations; `fulfilled` = sum of
//! those handed over; `cancelled` = sum of those cancelled and *not* handed over; `promised` =
//! `reserved - cancelled - fulfilled` (orders still to pick up). Cloud rights =
//! `granted - reserved - released`; store committed = `rights + promised`.
//!
//! # The two local checks
//!
//! - The **cloud** reserves or releases only within its rights as it sees them. It owns both
//!   subtractions, and `granted` only grows, so `reserved + released <= granted` holds on every
//!   replica after any merge: the online channel never promises a unit it was not granted.
//! - The **store** grants only from `on_hand - committed - safety_stock` as it sees it. Every cloud
//!   change the store has not seen yet either leaves `committed` as it is (a reservation moves
//!   units from rights to promised) or lowers it (a release, a cancellation), so the store's view
//!   of `committed` is never below the truth and a grant it accepts is really covered.
//!
//! Till sales are never refused; when they push `on_hand` below `promised`,
//! [`Escrow::at_risk`] and [`Escrow::orders_at_risk`] say by how much and which orders (the most
//! recently reserved first lose their cover). Only the store replica can say this: it alone
//! knows `on_hand` and its own handovers at the same instant.
//!
//! # Cancellation and per-order state
//!
//! Aggregate `cancelled` and `fulfilled` counters cannot work: HQ may cancel an order while the
//! store, offline, hands the same order over. Two counters would then both count it, `promised`
//! would go negative, and nobody could tell which order it was. So the per-order lifecycle is a
//! small lattice: the cloud's `cancelled` flag and the store's `fulfilled` flag, each grow-only
//! and owned by one side. Both set is [`OrderStatus::CancelledButFulfilled`]: the units left the
//! store, so the handover wins (counted as fulfilled, not cancelled) and HQ must settle the order
//! with the customer (see [`Escrow::conflicts`]).
//!
//! A cancelled order's units go back to the **store's free stock**, not to the cloud's rights.
//! The cloud cannot know whether the store handed the order over while offline; if the units
//! went back to its rights it could re-sell units that already left the building. If the store
//! wants its online allocation kept up, it grants them again (its own local check). A store that
//! has seen the cancellation refuses the handover with [`EscrowError::OrderCancelled`] and records
//! no stock movement.
//!
//! `released` is the channel giving back *unreserved* rights (HQ lowers a store's online
//! allocation, a campaign ends); it is never used for orders.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{IdError, Sku, StoreId};
use crate::stock::Slot;

/// Why an escrow operation or merge was refused; each names the key and the numbers involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EscrowError {
    #[error("{actor} may not {op} on {key}: only {owner} may")]
    NotOwner { op: &'static str, actor: String, owner: String, key: String },
    #[error("{op} of 0 units on {key}: give a positive number of units")]
    ZeroUnits { op: &'static str, key: String },
    #[error(
        "store {store} cannot grant {wanted} units of {sku} to the online channel: {free} free \
         (on hand {on_hand} - committed {committed} - safety stock {safety})"
    )]
    InsufficientFreeStock {
        store: StoreId,
        sku: Sku,
        wanted: u64,
        free: i128,
        on_hand: i128,
        committed: i128,
        safety: u64,
    },
    #[error(
        "cannot reserve {wanted} units of {sku} at store {store} for order {order}: the online channel \
         holds {available} (granted {granted} - reserved {reserved} - released {released})"
    )]
    InsufficientAllocation {
        store: StoreId,
        sku: Sku,
        order: OrderId,
        wanted: u64,
        available: i128,
        granted: u64,
        reserved: u64,
        released: u64,
    },
    #[error(
        "cannot release {wanted} units of {sku} at store {store}: the online channel holds only {available} \
         unreserved there"
    )]
    ReleaseExceedsRights { store: StoreId, sku: Sku, wanted: u64, available: i128 },
    #[error(
        "order {order} already reserves {existing} units of {sku} at store {store}; it cannot become {wanted} \
         (cancel it and reserve under a new order id)"
    )]
    OrderExists { store: StoreId, sku: Sku, order: OrderId, existing: u64, wanted: u64 },
    #[error("order {order} has no reservation of {sku} at store {store} on {actor}'s replica{hint}")]
    UnknownOrder { store: StoreId, sku: Sku, order: OrderId, actor: String, hint: &'static str },
    #[error(
        "order {order} ({units} x {sku}) was cancelled by HQ: do not hand it over; its units are back in \
         store {store}'s free stock"
    )]
    OrderCancelled { store: StoreId, sku: Sku, order: OrderId, units: u64 },
    #[error(
        "order {order} ({units} x {sku}) was already handed over at store {store}: it can no longer be \
         cancelled (refund it as a return)"
    )]
    AlreadyFulfilled { store: StoreId, sku: Sku, order: OrderId, units: u64 },
    #[error("{op} of {units} units on {key} would take {field} from {current} above the largest storable count {max}")]
    Overflow { op: &'static str, key: String, field: &'static str, current: u64, units: u64, max: u64 },
    #[error("escrow row {row} carries {field} = {value}, outside the storable range {min}..={max}")]
    OutOfRange { row: String, field: &'static str, value: u64, min: u64, max: u64 },
    #[error(
        "order {order} on {key}: reservation rows disagree ({ours} here, {theirs} incoming); an order id is \
         never reused, so one of the replicas is corrupt"
    )]
    ConflictingReservation { key: String, order: OrderId, ours: String, theirs: String },
    #[error("cannot merge escrow of {theirs} into escrow of {ours}")]
    KeyMismatch { ours: String, theirs: String },
}

/// An online order's id, as HQ's order system names it. Validated like the ids of [`crate::ids`].
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct OrderId(String);

// Written as the bare string, borrowed (as the ids of `crate::ids`).
impl Serialize for OrderId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl OrderId {
    pub const MAX_LEN: usize = 64;

    pub fn new(value: impl Into<String>) -> Result<OrderId, IdError> {
        let value = value.into();
        let refuse = |reason: String| IdError { what: "order id", value: value.chars().take(80).collect(), reason };
        if value.is_empty() {
            return Err(refuse("must not be empty".into()));
        }
        if value.len() > Self::MAX_LEN {
            return Err(refuse(format!("longer than {} bytes", Self::MAX_LEN)));
        }
        if let Some((pos, c)) =
            value.char_indices().find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
        {
            return Err(refuse(format!(
                "character {c:?} at byte {pos} is not allowed (use ASCII letters, digits, '-', '_', '.')"
            )));
        }
        Ok(OrderId(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for OrderId {
    type Error = IdError;
    fn try_from(value: String) -> Result<OrderId, IdError> {
        OrderId::new(value)
    }
}

impl From<OrderId> for String {
    fn from(id: OrderId) -> String {
        id.0
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OrderId({:?})", self.0)
    }
}

/// One SKU's online allocation in one store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EscrowKey {
    pub store: StoreId,
    pub sku: Sku,
}

impl fmt::Display for EscrowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.store, self.sku)
    }
}

/// Who attempts an operation. A store acts only on its own keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Side {
    Store(StoreId),
    Cloud,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Side::Store(store) => write!(f, "store {store}"),
            Side::Cloud => f.write_str("the cloud"),
        }
    }
}

/// One replicated row, as it is stored and synced. Each kind has exactly one owner
/// ([`EscrowRow::owner`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EscrowRow {
    /// Store-owned: units granted to the online channel, ever.
    Granted { key: EscrowKey, granted: u64 },
    /// Cloud-owned: unreserved units given back to the store, ever.
    Released { key: EscrowKey, released: u64 },
    /// Cloud-owned: one order line. `units` and `seq` never change; `cancelled` only turns on.
    Reservation { key: EscrowKey, order: OrderId, units: u64, seq: u64, cancelled: bool },
    /// Store-owned: the order was handed over at the store.
    Fulfilled { key: EscrowKey, order: OrderId },
}

impl EscrowRow {
    pub fn key(&self) -> &EscrowKey {
        match self {
            EscrowRow::Granted { key, .. }
            | EscrowRow::Released { key, .. }
            | EscrowRow::Reservation { key, .. }
            | EscrowRow::Fulfilled { key, .. } => key,
        }
    }

    /// The only side that may write this row.
    pub fn owner(&self) -> Side {
        match self {
            EscrowRow::Granted { key, .. } | EscrowRow::Fulfilled { key, .. } => Side::Store(key.store.clone()),
            EscrowRow::Released { .. } | EscrowRow::Reservation { .. } => Side::Cloud,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            EscrowRow::Granted { .. } => "granted",
            EscrowRow::Released { .. } => "released",
            EscrowRow::Reservation { .. } => "reservation",
            EscrowRow::Fulfilled { .. } => "fulfilled",
        }
    }

    fn id(&self) -> RowId {
        let kind = match self {
            EscrowRow::Granted { .. } => RowKind::Granted,
            EscrowRow::Released { .. } => RowKind::Released,
            EscrowRow::Reservation { order, .. } => RowKind::Reservation(order.clone()),
            EscrowRow::Fulfilled { order, .. } => RowKind::Fulfilled(order.clone()),
        };
        (self.key().clone(), kind)
    }

    fn label(&self) -> String {
        match self {
            EscrowRow::Reservation { order, .. } | EscrowRow::Fulfilled { order, .. } => {
                format!("{}/{}/{}", self.key(), self.kind(), order)
            }
            _ => format!("{}/{}", self.key(), self.kind()),
        }
    }

    /// Refuses a row that `writer` does not own: what the cloud checks on a store's push (one
    /// foreign row refuses the whole push, as [`crate::sync::check_push`] does for stock).
    pub fn check_writer(&self, writer: &Side) -> Result<(), EscrowError> {
        let owner = self.owner();
        if owner != *writer {
            return Err(EscrowError::NotOwner {
                op: "write",
                actor: writer.to_string(),
                owner: owner.to_string(),
                key: self.label(),
            });
        }
        Ok(())
    }

    /// Refuses counts that cannot be stored (a corrupt or malicious peer).
    pub fn validate(&self) -> Result<(), EscrowError> {
        let max = Escrow::MAX;
        let check = |field: &'static str, value: u64, min: u64| {
            if value < min || value > max {
                Err(EscrowError::OutOfRange { row: self.label(), field, value, min, max })
            } else {
                Ok(())
            }
        };
        match self {
            EscrowRow::Granted { granted, .. } => check("granted", *granted, 0),
            EscrowRow::Released { released, .. } => check("released", *released, 0),
            EscrowRow::Reservation { units, seq, .. } => {
                check("units", *units, 1)?;
                check("seq", *seq, 1)
            }
            EscrowRow::Fulfilled { .. } => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum RowKind {
    Granted,
    Released,
    Reservation(OrderId),
    Fulfilled(OrderId),
}

type RowId = (EscrowKey, RowKind);

/// Where one order stands, joining the cloud's and the store's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum OrderStatus {
    /// Promised: the units wait in the store for pickup.
    Reserved,
    /// Cancelled (or expired) by HQ; its units are back in the store's free stock.
    Cancelled,
    /// Handed over at the store.
    Fulfilled,
    /// HQ cancelled it while the store, not yet knowing, handed it over. The units left the
    /// store, so it counts as fulfilled; HQ must settle it with the customer.
    CancelledButFulfilled,
}

/// One order line as a replica sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderView {
    pub order: OrderId,
    pub units: u64,
    /// Reservation order within the key (1, 2, ...): the earliest reserved keep their cover longest.
    pub seq: u64,
    pub status: OrderStatus,
}

/// The derived counters of one key (DESIGN 13.5's five slots, computed from the rows).
/// Always `granted = rights + reserved + released` and `reserved = promised + fulfilled + cancelled`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EscrowTotals {
    pub granted: u64,
    pub released: u64,
    pub reserved: u64,
    /// Units of orders cancelled and not handed over (back in the store's free stock).
    pub cancelled: u64,
    /// Units of orders handed over (including those HQ cancelled concurrently).
    pub fulfilled: u64,
    /// Units of orders still to pick up.
    pub promised: u64,
}

/// An operation on one key, as data (what the ledger logs, what the property tests generate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EscrowOp {
    /// Store: give `units` of free stock to the online channel. `on_hand` is the store's stock
    /// value now, `safety_stock` what it keeps back for walk-in customers.
    Grant { units: u64, on_hand: i128, safety_stock: u64 },
    /// Cloud: give `units` of unreserved rights back to the store.
    Release { units: u64 },
    /// Cloud: reserve `units` for an online order line.
    Reserve { order: OrderId, units: u64 },
    /// Cloud: cancel (or expire) an order line.
    Cancel { order: OrderId },
    /// Store: the customer picked the order up.
    Fulfil { order: OrderId },
}

impl EscrowOp {
    pub fn name(&self) -> &'static str {
        match self {
            EscrowOp::Grant { .. } => "grant",
            EscrowOp::Release { .. } => "release",
            EscrowOp::Reserve { .. } => "reserve",
            EscrowOp::Cancel { .. } => "cancel",
            EscrowOp::Fulfil { .. } => "fulfil",
        }
    }
}

/// What an accepted operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The row as it now stands (to store and sync).
    pub row: EscrowRow,
    /// False for a repeated cancel, fulfil or reserve that found its work already done.
    pub changed: bool,
    /// Units leaving the store's stock because of this operation (a handover): the caller
    /// records this stock movement in the same transaction. Zero for everything else.
    pub stock_out: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reserved {
    units: u64,
    seq: u64,
    cancelled: bool,
}

/// The escrow state of one key at one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escrow {
    key: EscrowKey,
    granted: u64,
    released: u64,
    reservations: BTreeMap<OrderId, Reserved>,
    /// May name orders whose reservation has not arrived yet (a partial page at a third
    /// replica); those count for nothing until it does.
    fulfilled: BTreeSet<OrderId>,
}

fn sum(values: impl Iterator<Item = u64>) -> u128 {
    values.map(u128::from).sum()
}

fn clamp(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

impl Escrow {
    /// Largest count any field or total may hold, so that it fits SQLite's signed 64-bit integers.
    pub const MAX: u64 = Slot::MAX;

    pub fn new(key: EscrowKey) -> Escrow {
        Escrow { key, granted: 0, released: 0, reservations: BTreeMap::new(), fulfilled: BTreeSet::new() }
    }

    pub fn key(&self) -> &EscrowKey {
        &self.key
    }

    fn status(&self, order: &OrderId, r: &Reserved) -> OrderStatus {
        match (r.cancelled, self.fulfilled.contains(order)) {
            (false, false) => OrderStatus::Reserved,
            (true, false) => OrderStatus::Cancelled,
            (false, true) => OrderStatus::Fulfilled,
            (true, true) => OrderStatus::CancelledButFulfilled,
        }
    }

    fn units_where(&self, keep: impl Fn(OrderStatus) -> bool) -> u128 {
        sum(self.reservations.iter().filter(|(o, r)| keep(self.status(o, r))).map(|(_, r)| r.units))
    }

    /// The five counters, derived from the rows. Merges refuse any state whose totals do not fit
    /// in [`Escrow::MAX`], so they never saturate on a state this type accepted.
    pub fn totals(&self) -> EscrowTotals {
        use OrderStatus::*;
        EscrowTotals {
            granted: self.granted,
            released: self.released,
            reserved: clamp(self.units_where(|_| true)),
            cancelled: clamp(self.units_where(|s| s == Cancelled)),
            fulfilled: clamp(self.units_where(|s| matches!(s, Fulfilled | CancelledButFulfilled))),
            promised: clamp(self.units_where(|s| s == Reserved)),
        }
    }

    /// Units the online channel may still reserve: `granted - reserved - released`. Negative only
    /// on a replica fed by a broken cloud (the cloud never reserves beyond what it saw granted).
    pub fn cloud_rights(&self) -> i128 {
        let t = self.totals();
        i128::from(t.granted) - i128::from(t.reserved) - i128::from(t.released)
    }

    /// Units of orders waiting for pickup in the store.
    pub fn promised(&self) -> u64 {
        self.totals().promised
    }

    /// Units the store must hold back for the online channel: its unreserved rights plus the
    /// orders waiting for pickup.
    pub fn committed(&self) -> i128 {
        self.cloud_rights() + i128::from(self.promised())
    }

    /// Units the store may still grant: `on_hand - committed - safety_stock` (may be negative
    /// after till sales ate into the online allocation).
    pub fn free(&self, on_hand: i128, safety_stock: u64) -> i128 {
        on_hand - self.committed() - i128::from(safety_stock)
    }

    /// Units promised online that the store no longer has (`promised - on_hand`, at least 0).
    /// Meaningful on the store's replica, which knows `on_hand` and its own handovers together.
    pub fn at_risk(&self, on_hand: i128) -> u64 {
        let short = i128::from(self.promised()) - on_hand.max(0);
        u64::try_from(short.max(0)).unwrap_or(u64::MAX)
    }

    /// Every order line this replica knows, in reservation order.
    pub fn orders(&self) -> Vec<OrderView> {
        let mut orders: Vec<OrderView> = self
            .reservations
            .iter()
            .map(|(o, r)| OrderView { order: o.clone(), units: r.units, seq: r.seq, status: self.status(o, r) })
            .collect();
        orders.sort_by_key(|o| o.seq);
        orders
    }

    pub fn order(&self, order: &OrderId) -> Option<OrderView> {
        self.reservations.get(order).map(|r| OrderView {
            order: order.clone(),
            units: r.units,
            seq: r.seq,
            status: self.status(order, r),
        })
    }

    /// The waiting orders that `on_hand` no longer covers: on-hand units cover waiting orders in
    /// reservation order, and every order not fully covered is at risk. Empty iff
    /// [`Escrow::at_risk`] is 0.
    pub fn orders_at_risk(&self, on_hand: i128) -> Vec<OrderView> {
        let mut cover = on_hand.max(0);
        let mut at_risk = Vec::new();
        for order in self.orders().into_iter().filter(|o| o.status == OrderStatus::Reserved) {
            if i128::from(order.units) <= cover {
                cover -= i128::from(order.units);
            } else {
                cover = 0;
                at_risk.push(order);
            }
        }
        at_risk
    }

    /// Orders HQ cancelled that the store handed over anyway (it had not seen the cancellation):
    /// for HQ to settle with the customer.
    pub fn conflicts(&self) -> Vec<OrderView> {
        self.orders().into_iter().filter(|o| o.status == OrderStatus::CancelledButFulfilled).collect()
    }

    fn require(&self, side: &Side, op: &'static str, store_op: bool) -> Result<(), EscrowError> {
        let ok = match side {
            Side::Store(store) => store_op && *store == self.key.store,
            Side::Cloud => !store_op,
        };
        if ok {
            return Ok(());
        }
        let owner = if store_op { Side::Store(self.key.store.clone()) } else { Side::Cloud };
        Err(EscrowError::NotOwner { op, actor: side.to_string(), owner: owner.to_string(), key: self.key.to_string() })
    }

    fn nonzero(&self, op: &'static str, units: u64) -> Result<(), EscrowError> {
        if units == 0 {
            return Err(EscrowError::ZeroUnits { op, key: self.key.to_string() });
        }
        Ok(())
    }

    fn add(&self, op: &'static str, field: &'static str, current: u64, units: u64) -> Result<u64, EscrowError> {
        current.checked_add(units).filter(|v| *v <= Escrow::MAX).ok_or_else(|| EscrowError::Overflow {
            op,
            key: self.key.to_string(),
            field,
            current,
            units,
            max: Escrow::MAX,
        })
    }

    fn unknown(&self, side: &Side, order: &OrderId) -> EscrowError {
        EscrowError::UnknownOrder {
            store: self.key.store.clone(),
            sku: self.key.sku.clone(),
            order: order.clone(),
            actor: side.to_string(),
            hint: match side {
                Side::Store(_) => " (not received from the cloud yet: sync, then retry)",
                Side::Cloud => "",
            },
        }
    }

    fn reservation_row(&self, order: &OrderId, r: Reserved) -> EscrowRow {
        EscrowRow::Reservation {
            key: self.key.clone(),
            order: order.clone(),
            units: r.units,
            seq: r.seq,
            cancelled: r.cancelled,
        }
    }

    /// Store: grants `units` to the online channel, only from free stock as this replica sees it.
    pub fn grant(&mut self, side: &Side, units: u64, on_hand: i128, safety_stock: u64) -> Result<Applied, EscrowError> {
        self.require(side, "grant", true)?;
        self.nonzero("grant", units)?;
        let free = self.free(on_hand, safety_stock);
        if i128::from(units) > free {
            return Err(EscrowError::InsufficientFreeStock {
                store: self.key.store.clone(),
                sku: self.key.sku.clone(),
                wanted: units,
                free,
                on_hand,
                committed: self.committed(),
                safety: safety_stock,
            });
        }
        self.granted = self.add("grant", "granted", self.granted, units)?;
        Ok(Applied {
            row: EscrowRow::Granted { key: self.key.clone(), granted: self.granted },
            changed: true,
            stock_out: 0,
        })
    }

    /// Cloud: gives `units` of unreserved rights back to the store.
    pub fn release(&mut self, side: &Side, units: u64) -> Result<Applied, EscrowError> {
        self.require(side, "release", false)?;
        self.nonzero("release", units)?;
        let available = self.cloud_rights();
        if i128::from(units) > available {
            return Err(EscrowError::ReleaseExceedsRights {
                store: self.key.store.clone(),
                sku: self.key.sku.clone(),
                wanted: units,
                available,
            });
        }
        self.released = self.add("release", "released", self.released, units)?;
        Ok(Applied {
            row: EscrowRow::Released { key: self.key.clone(), released: self.released },
            changed: true,
            stock_out: 0,
        })
    }

    /// Cloud: reserves `units` for order line `order`, only within the rights this replica sees.
    /// Repeating the same reservation is harmless; changing its size is refused.
    pub fn reserve(&mut self, side: &Side, order: OrderId, units: u64) -> Result<Applied, EscrowError> {
        self.require(side, "reserve", false)?;
        self.nonzero("reserve", units)?;
        if let Some(r) = self.reservations.get(&order).copied() {
            if r.units == units {
                return Ok(Applied { row: self.reservation_row(&order, r), changed: false, stock_out: 0 });
            }
            return Err(EscrowError::OrderExists {
                store: self.key.store.clone(),
                sku: self.key.sku.clone(),
                order,
                existing: r.units,
                wanted: units,
            });
        }
        let t = self.totals();
        let available = self.cloud_rights();
        if i128::from(units) > available {
            return Err(EscrowError::InsufficientAllocation {
                store: self.key.store.clone(),
                sku: self.key.sku.clone(),
                order,
                wanted: units,
                available,
                granted: t.granted,
                reserved: t.reserved,
                released: t.released,
            });
        }
        self.add("reserve", "reserved", t.reserved, units)?;
        let last = self.reservations.values().map(|r| r.seq).max().unwrap_or(0);
        let seq = self.add("reserve", "seq", last, 1)?;
        let r = Reserved { units, seq, cancelled: false };
        self.reservations.insert(order.clone(), r);
        Ok(Applied { row: self.reservation_row(&order, r), changed: true, stock_out: 0 })
    }

    /// Cloud: cancels (or expires) an order line; its units go back to the store's free stock.
    /// Refused once this replica knows the order was handed over.
    pub fn cancel(&mut self, side: &Side, order: &OrderId) -> Result<Applied, EscrowError> {
        self.require(side, "cancel", false)?;
        let r = *self.reservations.get(order).ok_or_else(|| self.unknown(side, order))?;
        if r.cancelled {
            return Ok(Applied { row: self.reservation_row(order, r), changed: false, stock_out: 0 });
        }
        if self.fulfilled.contains(order) {
            return Err(EscrowError::AlreadyFulfilled {
                store: self.key.store.clone(),
                sku: self.key.sku.clone(),
                order: order.clone(),
                units: r.units,
            });
        }
        let r = Reserved { cancelled: true, ..r };
        self.reservations.insert(order.clone(), r);
        Ok(Applied { row: self.reservation_row(order, r), changed: true, stock_out: 0 })
    }

    /// Store: the customer picked the order up; `stock_out` units leave the store's stock.
    /// Refused, with no stock movement, once this replica knows HQ cancelled the order.
    pub fn fulfil(&mut self, side: &Side, order: &OrderId) -> Result<Applied, EscrowError> {
        self.require(side, "fulfil", true)?;
        let r = *self.reservations.get(order).ok_or_else(|| self.unknown(side, order))?;
        let row = EscrowRow::Fulfilled { key: self.key.clone(), order: order.clone() };
        if self.fulfilled.contains(order) {
            return Ok(Applied { row, changed: false, stock_out: 0 });
        }
        if r.cancelled {
            return Err(EscrowError::OrderCancelled {
                store: self.key.store.clone(),
                sku: self.key.sku.clone(),
                order: order.clone(),
                units: r.units,
            });
        }
        self.fulfilled.insert(order.clone());
        Ok(Applied { row, changed: true, stock_out: r.units })
    }

    /// Runs `op` on behalf of `side`.
    pub fn apply(&mut self, side: &Side, op: EscrowOp) -> Result<Applied, EscrowError> {
        match op {
            EscrowOp::Grant { units, on_hand, safety_stock } => self.grant(side, units, on_hand, safety_stock),
            EscrowOp::Release { units } => self.release(side, units),
            EscrowOp::Reserve { order, units } => self.reserve(side, order, units),
            EscrowOp::Cancel { order } => self.cancel(side, &order),
            EscrowOp::Fulfil { order } => self.fulfil(side, &order),
        }
    }

    /// Every row of this key (the zero counters are left out: they carry nothing).
    pub fn rows(&self) -> Vec<EscrowRow> {
        let mut rows = Vec::new();
        if self.granted > 0 {
            rows.push(EscrowRow::Granted { key: self.key.clone(), granted: self.granted });
        }
        if self.released > 0 {
            rows.push(EscrowRow::Released { key: self.key.clone(), released: self.released });
        }
        rows.extend(self.reservations.iter().map(|(o, r)| self.reservation_row(o, *r)));
        rows.extend(self.fulfilled.iter().map(|o| EscrowRow::Fulfilled { key: self.key.clone(), order: o.clone() }));
        rows
    }

    fn row(&self, kind: &RowKind) -> Option<EscrowRow> {
        let key = self.key.clone();
        match kind {
            RowKind::Granted => Some(EscrowRow::Granted { key, granted: self.granted }),
            RowKind::Released => Some(EscrowRow::Released { key, released: self.released }),
            RowKind::Reservation(o) => self.reservations.get(o).map(|r| self.reservation_row(o, *r)),
            RowKind::Fulfilled(o) => self.fulfilled.get(o).map(|o| EscrowRow::Fulfilled { key, order: o.clone() }),
        }
    }

    /// Joins one row in (the caller checked the key and the range). Returns whether it changed.
    fn join_row(&mut self, row: &EscrowRow) -> Result<bool, EscrowError> {
        Ok(match row {
            EscrowRow::Granted { granted, .. } => {
                let changed = *granted > self.granted;
                self.granted = self.granted.max(*granted);
                changed
            }
            EscrowRow::Released { released, .. } => {
                let changed = *released > self.released;
                self.released = self.released.max(*released);
                changed
            }
            EscrowRow::Reservation { order, units, seq, cancelled, .. } => match self.reservations.get_mut(order) {
                None => {
                    self.reservations
                        .insert(order.clone(), Reserved { units: *units, seq: *seq, cancelled: *cancelled });
                    true
                }
                Some(r) if r.units != *units || r.seq != *seq => {
                    return Err(EscrowError::ConflictingReservation {
                        key: self.key.to_string(),
                        order: order.clone(),
                        ours: format!("{} units, seq {}", r.units, r.seq),
                        theirs: format!("{units} units, seq {seq}"),
                    });
                }
                Some(r) => {
                    let changed = *cancelled && !r.cancelled;
                    r.cancelled |= *cancelled;
                    changed
                }
            },
            EscrowRow::Fulfilled { order, .. } => self.fulfilled.insert(order.clone()),
        })
    }

    /// Refuses a state whose totals cannot be stored.
    fn check_totals(&self) -> Result<(), EscrowError> {
        let reserved = self.units_where(|_| true);
        if reserved > u128::from(Escrow::MAX) {
            return Err(EscrowError::OutOfRange {
                row: self.key.to_string(),
                field: "reserved (sum of reservations)",
                value: clamp(reserved),
                min: 0,
                max: Escrow::MAX,
            });
        }
        Ok(())
    }

    /// Joins rows of this key in, all or nothing: on error this escrow is unchanged. Returns the
    /// rows that changed here, as they now stand.
    pub fn merge_rows(&mut self, rows: &[EscrowRow]) -> Result<Vec<EscrowRow>, EscrowError> {
        let mut next = self.clone();
        let mut changed = BTreeSet::new();
        for row in rows {
            if *row.key() != self.key {
                return Err(EscrowError::KeyMismatch { ours: self.key.to_string(), theirs: row.key().to_string() });
            }
            row.validate()?;
            if next.join_row(row)? {
                changed.insert(row.id().1);
            }
        }
        next.check_totals()?;
        *self = next;
        Ok(changed.iter().filter_map(|kind| self.row(kind)).collect())
    }

    /// Joins another replica's state of the same key (idempotent, commutative, associative).
    pub fn merge(&mut self, other: &Escrow) -> Result<Vec<EscrowRow>, EscrowError> {
        self.merge_rows(&other.rows())
    }
}

/// All escrows of a replica, each row with the local change version at which it last changed, so
/// a delta is "rows changed since version V" (as [`crate::stock::StockState`]).
#[derive(Debug, Clone, Default)]
pub struct EscrowState {
    escrows: BTreeMap<EscrowKey, Escrow>,
    versions: BTreeMap<RowId, u64>,
    version: u64,
}

impl EscrowState {
    pub fn new() -> EscrowState {
        EscrowState::default()
    }

    /// The local change version: bumps on every row that changes.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn get(&self, key: &EscrowKey) -> Option<&Escrow> {
        self.escrows.get(key)
    }

    /// The escrow of `key`, empty if nothing happened there yet.
    pub fn escrow(&self, key: &EscrowKey) -> Escrow {
        self.escrows.get(key).cloned().unwrap_or_else(|| Escrow::new(key.clone()))
    }

    pub fn keys(&self) -> impl Iterator<Item = &EscrowKey> {
        self.escrows.keys()
    }

    fn touch(&mut self, row: &EscrowRow) {
        self.version += 1;
        self.versions.insert(row.id(), self.version);
    }

    /// Runs `op` on `key` on behalf of `side`; nothing changes if it is refused.
    pub fn apply(&mut self, side: &Side, key: &EscrowKey, op: EscrowOp) -> Result<Applied, EscrowError> {
        let mut escrow = self.escrow(key);
        let applied = escrow.apply(side, op)?;
        if applied.changed {
            self.touch(&applied.row);
            self.escrows.insert(key.clone(), escrow);
        }
        Ok(applied)
    }

    /// Merges rows from a peer, all or nothing; returns the rows that changed here.
    pub fn merge(&mut self, rows: &[EscrowRow]) -> Result<Vec<EscrowRow>, EscrowError> {
        let mut by_key: BTreeMap<&EscrowKey, Vec<EscrowRow>> = BTreeMap::new();
        for row in rows {
            by_key.entry(row.key()).or_default().push(row.clone());
        }
        let mut merged = Vec::with_capacity(by_key.len());
        let mut changed = Vec::new();
        for (key, rows) in by_key {
            let mut escrow = self.escrow(key);
            changed.extend(escrow.merge_rows(&rows)?);
            merged.push(escrow);
        }
        for escrow in merged {
            self.escrows.insert(escrow.key.clone(), escrow);
        }
        for row in &changed {
            self.touch(row);
        }
        Ok(changed)
    }

    /// Rows changed after local version `since` (exclusive), in key order.
    pub fn delta_since(&self, since: u64) -> Vec<EscrowRow> {
        self.versions
            .iter()
            .filter(|(_, v)| **v > since)
            .filter_map(|((key, kind), _)| self.escrows.get(key)?.row(kind))
            .collect()
    }

    /// Every row: the full state.
    pub fn rows(&self) -> Vec<EscrowRow> {
        self.delta_since(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> EscrowKey {
        EscrowKey { store: StoreId::new("s1").unwrap(), sku: Sku::new("A").unwrap() }
    }

    fn store() -> Side {
        Side::Store(StoreId::new("s1").unwrap())
    }

    fn order(id: &str) -> OrderId {
        OrderId::new(id).unwrap()
    }

    /// Store grants 10 of 20 on hand (safety 2), cloud reserves o1 = 3 and o2 = 4.
    fn sample() -> Escrow {
        let mut e = Escrow::new(key());
        e.grant(&store(), 10, 20, 2).unwrap();
        e.reserve(&Side::Cloud, order("o1"), 3).unwrap();
        e.reserve(&Side::Cloud, order("o2"), 4).unwrap();
        e
    }

    #[test]
    fn derived_counters_follow_the_formulation() {
        let mut e = sample();
        e.release(&Side::Cloud, 1).unwrap();
        e.fulfil(&store(), &order("o1")).unwrap();
        let t = e.totals();
        assert_eq!((t.granted, t.reserved, t.released, t.fulfilled, t.promised, t.cancelled), (10, 7, 1, 3, 4, 0));
        assert_eq!(e.cloud_rights(), 2);
        assert_eq!(e.committed(), 6);
        assert_eq!(e.free(17, 2), 9);
    }

    #[test]
    fn each_side_is_refused_the_other_sides_operations() {
        let mut e = sample();
        let before = e.clone();
        let err = e.reserve(&store(), order("o3"), 1).unwrap_err();
        assert_eq!(err.to_string(), "store s1 may not reserve on s1/A: only the cloud may");
        let err = e.grant(&Side::Cloud, 1, 100, 0).unwrap_err();
        assert_eq!(err.to_string(), "the cloud may not grant on s1/A: only store s1 may");
        let other = Side::Store(StoreId::new("s2").unwrap());
        let err = e.fulfil(&other, &order("o1")).unwrap_err();
        assert_eq!(err.to_string(), "store s2 may not fulfil on s1/A: only store s1 may");
        assert!(e.release(&store(), 1).is_err());
        assert!(e.cancel(&store(), &order("o1")).is_err());
        assert_eq!(e, before, "refusals change nothing");
    }

    #[test]
    fn the_store_grants_only_free_stock() {
        let mut e = sample();
        // on hand 20, committed 10 (rights 3 + promised 7), safety 2: 8 free.
        let err = e.grant(&store(), 9, 20, 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "store s1 cannot grant 9 units of A to the online channel: 8 free \
             (on hand 20 - committed 10 - safety stock 2)"
        );
        e.grant(&store(), 8, 20, 2).unwrap();
        assert_eq!(e.free(20, 2), 0);
        assert!(matches!(e.grant(&store(), 0, 20, 2), Err(EscrowError::ZeroUnits { op: "grant", .. })));
    }

    #[test]
    fn the_cloud_reserves_and_releases_only_its_rights() {
        let mut e = sample();
        let err = e.reserve(&Side::Cloud, order("o3"), 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot reserve 4 units of A at store s1 for order o3: the online channel holds 3 \
             (granted 10 - reserved 7 - released 0)"
        );
        assert!(matches!(err, EscrowError::InsufficientAllocation { available: 3, wanted: 4, .. }));
        let err = e.release(&Side::Cloud, 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot release 4 units of A at store s1: the online channel holds only 3 unreserved there"
        );
        e.release(&Side::Cloud, 3).unwrap();
        assert_eq!(e.cloud_rights(), 0);
    }

    #[test]
    fn a_reservation_is_immutable_and_its_retry_harmless() {
        let mut e = sample();
        let again = e.reserve(&Side::Cloud, order("o1"), 3).unwrap();
        assert!(!again.changed);
        let err = e.reserve(&Side::Cloud, order("o1"), 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "order o1 already reserves 3 units of A at store s1; it cannot become 2 (cancel it and reserve under a new order id)"
        );
    }

    #[test]
    fn fulfilling_a_cancelled_order_is_refused_with_no_stock_movement() {
        let mut cloud = sample();
        let mut shop = sample();
        cloud.cancel(&Side::Cloud, &order("o1")).unwrap();
        shop.merge(&cloud).unwrap();
        let err = shop.fulfil(&store(), &order("o1")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "order o1 (3 x A) was cancelled by HQ: do not hand it over; its units are back in store s1's free stock"
        );
        assert_eq!(shop.order(&order("o1")).unwrap().status, OrderStatus::Cancelled);
        // The cancelled units are no longer committed: free again for the store.
        assert_eq!(shop.committed(), 7);
        let done = shop.fulfil(&store(), &order("o2")).unwrap();
        assert_eq!((done.changed, done.stock_out), (true, 4));
        let again = shop.fulfil(&store(), &order("o2")).unwrap();
        assert_eq!((again.changed, again.stock_out), (false, 0), "a retried handover moves no stock twice");
    }

    #[test]
    fn cancel_concurrent_with_an_offline_handover_counts_as_fulfilled_and_is_reported() {
        let mut cloud = sample();
        let mut shop = sample();
        cloud.cancel(&Side::Cloud, &order("o1")).unwrap();
        shop.fulfil(&store(), &order("o1")).unwrap();
        let mut a = cloud.clone();
        a.merge(&shop).unwrap();
        shop.merge(&cloud).unwrap();
        assert_eq!(a, shop);
        let t = shop.totals();
        assert_eq!((t.reserved, t.fulfilled, t.cancelled, t.promised), (7, 3, 0, 4));
        assert_eq!(shop.conflicts().iter().map(|o| o.order.as_str()).collect::<Vec<_>>(), ["o1"]);
        assert_eq!(shop.cloud_rights(), 3, "the cancellation gave nothing back to the cloud");
        let mut b = sample();
        b.fulfil(&store(), &order("o2")).unwrap();
        let err = b.cancel(&Side::Cloud, &order("o2")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "order o2 (4 x A) was already handed over at store s1: it can no longer be cancelled (refund it as a return)"
        );
    }

    #[test]
    fn unknown_orders_are_named() {
        let mut e = sample();
        let err = e.fulfil(&store(), &order("o9")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "order o9 has no reservation of A at store s1 on store s1's replica (not received from the cloud yet: sync, then retry)"
        );
        assert!(e.cancel(&Side::Cloud, &order("o9")).is_err());
    }

    #[test]
    fn till_sales_below_promised_name_the_latest_orders() {
        let e = sample();
        assert_eq!(e.at_risk(7), 0);
        assert!(e.orders_at_risk(7).is_empty());
        // 5 on hand: o1 (3, reserved first) is covered, o2 (4) is not.
        assert_eq!(e.at_risk(5), 2);
        let risk: Vec<_> = e.orders_at_risk(5).into_iter().map(|o| o.order.to_string()).collect();
        assert_eq!(risk, ["o2"]);
        assert_eq!(e.at_risk(-3), 7);
        assert_eq!(e.orders_at_risk(-3).len(), 2);
    }

    #[test]
    fn overflow_is_refused_not_wrapped() {
        let mut e = Escrow::new(key());
        e.grant(&store(), Escrow::MAX, i128::from(Escrow::MAX), 0).unwrap();
        let err = e.grant(&store(), 1, i128::MAX / 2, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "grant of 1 units on s1/A would take granted from {0} above the largest storable count {0}",
                Escrow::MAX
            )
        );
        let bad = EscrowRow::Granted { key: key(), granted: u64::MAX };
        let err = Escrow::new(key()).merge_rows(&[bad]).unwrap_err();
        assert!(err.to_string().contains("outside the storable range 0..="), "{err}");
        let zero = EscrowRow::Reservation { key: key(), order: order("o1"), units: 0, seq: 1, cancelled: false };
        assert!(Escrow::new(key()).merge_rows(&[zero]).is_err());
        let big = |o: &str, seq| EscrowRow::Reservation {
            key: key(),
            order: order(o),
            units: Escrow::MAX,
            seq,
            cancelled: false,
        };
        let err = Escrow::new(key()).merge_rows(&[big("a", 1), big("b", 2)]).unwrap_err();
        assert!(err.to_string().contains("reserved (sum of reservations)"), "{err}");
    }

    #[test]
    fn conflicting_reservations_refuse_the_whole_merge() {
        let mut e = sample();
        let before = e.clone();
        let rows = [
            EscrowRow::Granted { key: key(), granted: 50 },
            EscrowRow::Reservation { key: key(), order: order("o1"), units: 5, seq: 1, cancelled: false },
        ];
        let err = e.merge_rows(&rows).unwrap_err();
        assert_eq!(
            err.to_string(),
            "order o1 on s1/A: reservation rows disagree (3 units, seq 1 here, 5 units, seq 1 incoming); an order id \
             is never reused, so one of the replicas is corrupt"
        );
        assert_eq!(e, before);
    }

    #[test]
    fn rows_are_checked_against_their_writer() {
        let e = sample();
        for row in e.rows() {
            let owner = row.owner();
            row.check_writer(&owner).unwrap();
        }
        let reservation = e.rows().into_iter().find(|r| matches!(r, EscrowRow::Reservation { .. })).unwrap();
        let err = reservation.check_writer(&store()).unwrap_err();
        assert_eq!(err.to_string(), "store s1 may not write on s1/A/reservation/o1: only the cloud may");
        let granted = EscrowRow::Granted { key: key(), granted: 1 };
        assert!(granted.check_writer(&Side::Store(StoreId::new("s2").unwrap())).is_err());
        assert!(granted.check_writer(&Side::Cloud).is_err());
    }

    #[test]
    fn order_ids_are_validated() {
        assert!(OrderId::new("web-2024.0001_a").is_ok());
        let err = OrderId::new("o 1").unwrap_err();
        assert!(err.to_string().contains("order id"), "{err}");
        assert!(OrderId::new("").is_err());
        assert!(OrderId::new("x".repeat(65)).is_err());
    }

    #[test]
    fn rows_round_trip_through_postcard() {
        let rows = sample().rows();
        let bytes = postcard::to_allocvec(&rows).unwrap();
        assert_eq!(postcard::from_bytes::<Vec<EscrowRow>>(&bytes).unwrap(), rows);
    }
}
