//! The column forms of the domain types, shared by both backends so that a row means the same
//! thing in SQLite and in PostgreSQL. Every value read back is validated on the way out: a row
//! that does not decode is [`StorageError::Corrupt`] naming the table and key, never a panic.

use std::fmt::Display;

use shared::{
    ActorId, CatalogField, CatalogUpdate, Currency, EscrowKey, EscrowRow, HlcStamp, Money, OrderHeader, OrderId,
    PriceEntry, PriceKey, PriceScope, PriceSlot, PriceValue, Sku, Slot, SlotKey, SlotRow, StoreId, ValidityWindow,
};

use super::{CancelReason, PriceWrite, StorageError};
use crate::orders::OrderState;

/// The partition of chain prices and of the whole catalog.
pub(crate) const CHAIN: &str = "chain";

/// The partition of a store's stock slots and its store-scope prices.
pub(crate) fn store_partition(store: &StoreId) -> String {
    format!("store:{store}")
}

/// The partition a price register lives in (its scope's text is the partition name).
pub(crate) fn price_partition(scope: &PriceScope) -> String {
    scope.to_string()
}

pub(crate) fn corrupt(what: impl Display, detail: impl Display) -> StorageError {
    StorageError::Corrupt(format!("{what}: {detail}"))
}

/// A rule of this service found broken: a bug, not a failure worth retrying.
pub(crate) fn invariant(detail: impl Display) -> StorageError {
    StorageError::Invariant(detail.to_string())
}

/// Counts, versions and clock values are `u64` in the domain and signed 64-bit in both
/// databases; everything the service accepts fits (slots are capped at `Slot::MAX`, stamps by
/// the skew fence), so a value that does not is refused rather than wrapped.
pub(crate) fn to_i64(what: &str, value: u64) -> Result<i64, StorageError> {
    i64::try_from(value).map_err(|_| corrupt(what, format!("{value} is beyond the database's 64-bit range")))
}

pub(crate) fn to_u64(what: &str, value: i64) -> Result<u64, StorageError> {
    u64::try_from(value).map_err(|_| corrupt(what, format!("negative value {value}")))
}

pub(crate) fn parse_store(what: &str, text: String) -> Result<StoreId, StorageError> {
    StoreId::new(text).map_err(|e| corrupt(what, e))
}

pub(crate) fn parse_actor(what: &str, text: String) -> Result<ActorId, StorageError> {
    ActorId::new(text).map_err(|e| corrupt(what, e))
}

pub(crate) fn parse_sku(what: &str, text: String) -> Result<Sku, StorageError> {
    Sku::new(text).map_err(|e| corrupt(what, e))
}

fn parse_scope(what: &str, text: &str) -> Result<PriceScope, StorageError> {
    if text == CHAIN {
        return Ok(PriceScope::Chain);
    }
    match text.strip_prefix("store:") {
        Some(id) => Ok(PriceScope::Store(StoreId::new(id).map_err(|e| corrupt(what, e))?)),
        None => Err(corrupt(what, format!("unknown price scope {text:?}"))),
    }
}

fn parse_slot(what: &str, text: &str) -> Result<PriceSlot, StorageError> {
    match text {
        "regular" => Ok(PriceSlot::Regular),
        "promotion" => Ok(PriceSlot::Promotion),
        other => Err(corrupt(what, format!("unknown price slot {other:?}"))),
    }
}

/// An HLC stamp as three columns.
#[derive(Debug, Clone)]
pub(crate) struct StampColumns {
    pub wall: i64,
    pub logical: i64,
    pub actor: String,
}

impl StampColumns {
    pub fn of(stamp: &HlcStamp) -> Result<StampColumns, StorageError> {
        Ok(StampColumns {
            wall: to_i64("HLC wall time", stamp.wall_ms)?,
            logical: i64::from(stamp.logical),
            actor: stamp.actor.as_str().to_owned(),
        })
    }

    pub fn stamp(self, what: &str) -> Result<HlcStamp, StorageError> {
        Ok(HlcStamp {
            wall_ms: to_u64(what, self.wall)?,
            logical: u32::try_from(self.logical)
                .map_err(|_| corrupt(what, format!("HLC logical counter {} out of range", self.logical)))?,
            actor: ActorId::new(self.actor).map_err(|e| corrupt(what, e))?,
        })
    }
}

/// A stock slot row (without its version).
#[derive(Debug, Clone)]
pub(crate) struct SlotColumns {
    pub store: String,
    pub sku: String,
    pub actor: String,
    pub inc: i64,
    pub dec: i64,
}

impl SlotColumns {
    pub fn of(row: &SlotRow) -> Result<SlotColumns, StorageError> {
        let what = format!("stock slot {}", row.key);
        Ok(SlotColumns {
            store: row.key.store.as_str().to_owned(),
            sku: row.key.sku.as_str().to_owned(),
            actor: row.key.actor.as_str().to_owned(),
            inc: to_i64(&what, row.slot.inc)?,
            dec: to_i64(&what, row.slot.dec)?,
        })
    }

    pub fn row(self) -> Result<SlotRow, StorageError> {
        let what = format!("stock slot {}/{}/{}", self.store, self.sku, self.actor);
        Ok(SlotRow {
            key: SlotKey {
                store: parse_store(&what, self.store)?,
                sku: parse_sku(&what, self.sku)?,
                actor: ActorId::new(self.actor).map_err(|e| corrupt(&what, e))?,
            },
            slot: Slot { inc: to_u64(&what, self.inc)?, dec: to_u64(&what, self.dec)? },
        })
    }
}

/// A price register's key and value (a held price has no stamp yet; a stored register adds
/// [`StampColumns`]). `amount` NULL means the price is withdrawn.
#[derive(Debug, Clone)]
pub(crate) struct PriceColumns {
    pub sku: String,
    pub scope: String,
    pub slot: String,
    pub amount: Option<i64>,
    pub currency: Option<String>,
    pub win_from: Option<i64>,
    pub win_until: Option<i64>,
}

impl PriceColumns {
    pub fn of(key: &PriceKey, value: Option<&PriceValue>) -> Result<PriceColumns, StorageError> {
        let what = format!("price {} {} {}", key.sku, key.scope, key.slot.as_str());
        let window = value.and_then(|v| v.window);
        Ok(PriceColumns {
            sku: key.sku.as_str().to_owned(),
            scope: key.scope.to_string(),
            slot: key.slot.as_str().to_owned(),
            amount: value.map(|v| v.amount.minor),
            currency: value.map(|v| v.amount.currency.code().to_owned()),
            win_from: window.map(|w| to_i64(&what, w.from_ms)).transpose()?,
            win_until: window.map(|w| to_i64(&what, w.until_ms)).transpose()?,
        })
    }

    pub fn write(self) -> Result<PriceWrite, StorageError> {
        let what = format!("price {} {} {}", self.sku, self.scope, self.slot);
        let key = PriceKey {
            sku: parse_sku(&what, self.sku)?,
            scope: parse_scope(&what, &self.scope)?,
            slot: parse_slot(&what, &self.slot)?,
        };
        let window = match (self.win_from, self.win_until) {
            (Some(from), Some(until)) => {
                Some(ValidityWindow { from_ms: to_u64(&what, from)?, until_ms: to_u64(&what, until)? })
            }
            (None, None) => None,
            _ => return Err(corrupt(&what, "validity window has only one end")),
        };
        let value = match (self.amount, self.currency) {
            (Some(minor), Some(code)) => Some(PriceValue {
                amount: Money::new(minor, Currency::new(&code).map_err(|e| corrupt(&what, e))?),
                window,
            }),
            (None, None) if window.is_none() => None,
            _ => return Err(corrupt(&what, "amount, currency and window do not agree")),
        };
        Ok(PriceWrite { key, value })
    }

    pub fn entry(self, stamp: StampColumns) -> Result<PriceEntry, StorageError> {
        let what = format!("price {} {} {}", self.sku, self.scope, self.slot);
        let write = self.write()?;
        Ok(PriceEntry { key: write.key, value: write.value, stamp: stamp.stamp(&what)? })
    }
}

/// A catalog field write: the field's name as a column (the key), its value as postcard bytes.
#[derive(Debug, Clone)]
pub(crate) struct CatalogColumns {
    pub sku: String,
    pub field: String,
    pub value: Vec<u8>,
}

impl CatalogColumns {
    pub fn of(update: &CatalogUpdate) -> Result<CatalogColumns, StorageError> {
        let value = postcard::to_allocvec(&update.field)
            .map_err(|e| corrupt(format!("catalog {}.{}", update.sku, update.field.name()), e))?;
        Ok(CatalogColumns { sku: update.sku.as_str().to_owned(), field: update.field.name().to_owned(), value })
    }

    pub fn update(self, stamp: StampColumns) -> Result<CatalogUpdate, StorageError> {
        let what = format!("catalog {}.{}", self.sku, self.field);
        let field: CatalogField = postcard::from_bytes(&self.value).map_err(|e| corrupt(&what, e))?;
        if field.name() != self.field {
            return Err(corrupt(&what, format!("value holds field {}", field.name())));
        }
        Ok(CatalogUpdate { sku: parse_sku(&what, self.sku)?, field, stamp: stamp.stamp(&what)? })
    }
}

/// The escrow row kinds the cloud sends every store; `granted` and `fulfilled` are the store's
/// own, sent back only to a store rebuilding its ledger.
pub(crate) const CLOUD_ESCROW_KINDS: [&str; 2] = ["released", "reservation"];

/// An escrow row (without its version). `order_id` is empty for `granted` and `released`;
/// `units` holds the granted or released count or the reservation's units (0 for `fulfilled`).
#[derive(Debug, Clone)]
pub(crate) struct EscrowColumns {
    pub store: String,
    pub sku: String,
    pub kind: String,
    pub order_id: String,
    pub units: i64,
    pub seq: i64,
    pub cancelled: bool,
}

impl EscrowColumns {
    pub fn of(row: &EscrowRow) -> Result<EscrowColumns, StorageError> {
        let what = format!("escrow row {}", row.key());
        let (units, seq, cancelled) = match row {
            EscrowRow::Granted { granted, .. } => (*granted, 0, false),
            EscrowRow::Released { released, .. } => (*released, 0, false),
            EscrowRow::Reservation { units, seq, cancelled, .. } => (*units, *seq, *cancelled),
            EscrowRow::Fulfilled { .. } => (0, 0, false),
        };
        let id = EscrowId::of(row);
        Ok(EscrowColumns {
            store: id.store,
            sku: id.sku,
            kind: id.kind.to_owned(),
            order_id: id.order_id,
            units: to_i64(&what, units)?,
            seq: to_i64(&what, seq)?,
            cancelled,
        })
    }

    pub fn row(self) -> Result<EscrowRow, StorageError> {
        let what = format!("escrow row {}/{}/{}/{}", self.store, self.sku, self.kind, self.order_id);
        let key = EscrowKey { store: parse_store(&what, self.store)?, sku: parse_sku(&what, self.sku)? };
        let order = || OrderId::new(self.order_id.clone()).map_err(|e| corrupt(&what, e));
        let row = match self.kind.as_str() {
            "granted" => EscrowRow::Granted { key, granted: to_u64(&what, self.units)? },
            "released" => EscrowRow::Released { key, released: to_u64(&what, self.units)? },
            "reservation" => EscrowRow::Reservation {
                key,
                order: order()?,
                units: to_u64(&what, self.units)?,
                seq: to_u64(&what, self.seq)?,
                cancelled: self.cancelled,
            },
            "fulfilled" => EscrowRow::Fulfilled { key, order: order()? },
            other => return Err(corrupt(&what, format!("unknown kind {other:?}"))),
        };
        row.validate().map_err(|e| corrupt(&what, e))?;
        Ok(row)
    }
}

/// The primary key of an escrow row `(store, sku, kind, order_id)`: what the order operations
/// and merges look rows up by, so they read only the rows they need.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct EscrowId {
    pub store: String,
    pub sku: String,
    pub kind: &'static str,
    pub order_id: String,
}

impl EscrowId {
    fn new(key: &EscrowKey, kind: &'static str, order: Option<&OrderId>) -> EscrowId {
        EscrowId {
            store: key.store.as_str().to_owned(),
            sku: key.sku.as_str().to_owned(),
            kind,
            order_id: order.map_or("", OrderId::as_str).to_owned(),
        }
    }

    pub fn of(row: &EscrowRow) -> EscrowId {
        match row {
            EscrowRow::Granted { key, .. } => EscrowId::granted(key),
            EscrowRow::Released { key, .. } => EscrowId::released(key),
            EscrowRow::Reservation { key, order, .. } => EscrowId::reservation(key, order),
            EscrowRow::Fulfilled { key, order } => EscrowId::fulfilled(key, order),
        }
    }

    pub fn granted(key: &EscrowKey) -> EscrowId {
        EscrowId::new(key, "granted", None)
    }

    pub fn released(key: &EscrowKey) -> EscrowId {
        EscrowId::new(key, "released", None)
    }

    pub fn reservation(key: &EscrowKey, order: &OrderId) -> EscrowId {
        EscrowId::new(key, "reservation", Some(order))
    }

    pub fn fulfilled(key: &EscrowKey, order: &OrderId) -> EscrowId {
        EscrowId::new(key, "fulfilled", Some(order))
    }
}

/// The SQL condition (on the `orders` table's own columns, the same in both backends) that
/// selects the orders in `state`. The cloud writes `cancel_reason` with the cancelled flags,
/// and `handed_over_ms` with the first `Fulfilled` row a store pushes, in one transaction each.
pub(crate) fn order_state_sql(state: Option<OrderState>) -> &'static str {
    match state {
        None => "TRUE",
        Some(OrderState::Reserved) => "cancel_reason IS NULL AND handed_over_ms IS NULL",
        Some(OrderState::Cancelled) => "cancel_reason = 'cancelled' AND handed_over_ms IS NULL",
        Some(OrderState::Expired) => "cancel_reason = 'expired' AND handed_over_ms IS NULL",
        Some(OrderState::Fulfilled) => "cancel_reason IS NULL AND handed_over_ms IS NOT NULL",
        Some(OrderState::CancelledButFulfilled) => "cancel_reason IS NOT NULL AND handed_over_ms IS NOT NULL",
    }
}

/// An order header as stored: postcard bytes beside the columns it is found by.
pub(crate) fn header_bytes(header: &OrderHeader) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(header).map_err(|e| corrupt(format!("order {}", header.order), e))
}

/// Decodes a stored header, checking it against its row's key columns and its own rules.
pub(crate) fn header_of(order_id: &str, store: &str, bytes: &[u8]) -> Result<OrderHeader, StorageError> {
    let what = format!("order {order_id}");
    let header: OrderHeader = postcard::from_bytes(bytes).map_err(|e| corrupt(&what, e))?;
    if header.order.as_str() != order_id || header.store.as_str() != store {
        return Err(corrupt(&what, format!("header names order {} of store {}", header.order, header.store)));
    }
    header.validate().map_err(|e| corrupt(&what, e))?;
    Ok(header)
}

pub(crate) fn parse_order(what: &str, text: String) -> Result<OrderId, StorageError> {
    OrderId::new(text).map_err(|e| corrupt(what, e))
}

pub(crate) fn parse_reason(what: &str, text: Option<String>) -> Result<Option<CancelReason>, StorageError> {
    match text.as_deref() {
        None => Ok(None),
        Some("cancelled") => Ok(Some(CancelReason::Cancelled)),
        Some("expired") => Ok(Some(CancelReason::Expired)),
        Some(other) => Err(corrupt(what, format!("unknown cancel reason {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp() -> HlcStamp {
        HlcStamp { wall_ms: 7, logical: 2, actor: ActorId::cloud() }
    }

    #[test]
    fn price_columns_round_trip_and_refuse_half_rows() {
        let key = PriceKey { sku: Sku::new("A").unwrap(), scope: PriceScope::Chain, slot: PriceSlot::Promotion };
        let value = PriceValue {
            amount: Money::new(199, Currency::new("EUR").unwrap()),
            window: Some(ValidityWindow { from_ms: 1, until_ms: 2 }),
        };
        let cols = PriceColumns::of(&key, Some(&value)).unwrap();
        let entry = cols.clone().entry(StampColumns::of(&stamp()).unwrap()).unwrap();
        assert_eq!(entry, PriceEntry { key: key.clone(), value: Some(value), stamp: stamp() });
        let withdrawn = PriceColumns::of(&key, None).unwrap().write().unwrap();
        assert_eq!(withdrawn, PriceWrite { key, value: None });
        let half = PriceColumns { currency: None, ..cols.clone() };
        assert!(matches!(half.write(), Err(StorageError::Corrupt(m)) if m.contains("price A chain promotion")));
        let bad_scope = PriceColumns { scope: "region:x".into(), ..cols };
        assert!(matches!(bad_scope.write(), Err(StorageError::Corrupt(m)) if m.contains("region:x")));
    }

    #[test]
    fn catalog_value_must_match_its_field_column() {
        let update =
            CatalogUpdate { sku: Sku::new("A").unwrap(), field: CatalogField::Discontinued(true), stamp: stamp() };
        let cols = CatalogColumns::of(&update).unwrap();
        assert_eq!(cols.clone().update(StampColumns::of(&stamp()).unwrap()).unwrap(), update);
        let swapped = CatalogColumns { field: "name".into(), ..cols.clone() };
        assert!(matches!(swapped.update(StampColumns::of(&stamp()).unwrap()), Err(StorageError::Corrupt(_))));
        let garbage = CatalogColumns { value: vec![0xff, 0xff], ..cols };
        assert!(matches!(garbage.update(StampColumns::of(&stamp()).unwrap()), Err(StorageError::Corrupt(_))));
    }

    #[test]
    fn escrow_rows_round_trip_and_refuse_bad_columns() {
        let key = EscrowKey { store: StoreId::new("s1").unwrap(), sku: Sku::new("A").unwrap() };
        let order = OrderId::new("W-1").unwrap();
        for row in [
            EscrowRow::Granted { key: key.clone(), granted: 5 },
            EscrowRow::Released { key: key.clone(), released: 1 },
            EscrowRow::Reservation { key: key.clone(), order: order.clone(), units: 2, seq: 3, cancelled: true },
            EscrowRow::Fulfilled { key: key.clone(), order: order.clone() },
        ] {
            let cols = EscrowColumns::of(&row).unwrap();
            let id = EscrowId::of(&row);
            assert_eq!(
                (id.store, id.sku, id.kind, id.order_id),
                (cols.store.clone(), cols.sku.clone(), cols.kind.as_str(), cols.order_id.clone())
            );
            assert_eq!(cols.row().unwrap(), row);
        }
        let cols = EscrowColumns::of(&EscrowRow::Fulfilled { key, order }).unwrap();
        let unknown = EscrowColumns { kind: "promised".into(), ..cols.clone() };
        assert!(matches!(unknown.row(), Err(StorageError::Corrupt(m)) if m.contains("promised")));
        let no_order = EscrowColumns { order_id: String::new(), ..cols.clone() };
        assert!(matches!(no_order.row(), Err(StorageError::Corrupt(m)) if m.contains("escrow row s1/A/fulfilled/")));
        let zero = EscrowColumns { kind: "reservation".into(), units: 0, seq: 1, ..cols };
        assert!(matches!(zero.row(), Err(StorageError::Corrupt(_))));
        assert!(parse_reason("x", Some("lost".into())).is_err());
    }

    #[test]
    fn negative_counts_are_corrupt_not_wrapped() {
        let cols = SlotColumns { store: "s1".into(), sku: "A".into(), actor: "cloud".into(), inc: -1, dec: 0 };
        assert!(matches!(cols.row(), Err(StorageError::Corrupt(m)) if m.contains("s1/A/cloud")));
        assert!(to_i64("x", u64::MAX).is_err());
    }
}
