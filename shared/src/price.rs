//! Prices as LWW registers per (sku, scope, slot). Scope is the whole chain or one store; the
//! slot is the regular price or a promotion, each with an optional validity window. The price a
//! till charges is *computed* from the registers at a point in time by [`effective_price`],
//! never stored twice, so the edge, the cloud and the label planner cannot disagree.
//!
//! Resolution order at time `t` (first register that holds a price valid at `t` wins):
//! store promotion, store regular, chain promotion, chain regular. A register whose value is
//! `None` (price withdrawn) or whose window does not contain `t` is skipped.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hlc::HlcStamp;
use crate::ids::{Sku, StoreId};
use crate::lww::Lww;
use crate::money::Money;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    #[error("price of {sku} must not be negative: {amount}")]
    Negative { sku: Sku, amount: Money },
    #[error("validity window of {sku} is empty: starts at {from_ms} ms, ends at {until_ms} ms")]
    EmptyWindow { sku: Sku, from_ms: u64, until_ms: u64 },
    #[error("validity window of {sku} ends at {until_ms} ms, beyond the largest storable time {max_ms} ms")]
    WindowOutOfRange { sku: Sku, until_ms: u64, max_ms: u64 },
    #[error("price of {sku} is in {found}, but this store trades in {expected}")]
    WrongCurrency { sku: Sku, found: crate::money::Currency, expected: crate::money::Currency },
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PriceScope {
    Chain,
    Store(StoreId),
}

impl std::fmt::Display for PriceScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PriceScope::Chain => f.write_str("chain"),
            PriceScope::Store(s) => write!(f, "store:{s}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PriceSlot {
    Regular,
    Promotion,
}

impl PriceSlot {
    pub fn as_str(self) -> &'static str {
        match self {
            PriceSlot::Regular => "regular",
            PriceSlot::Promotion => "promotion",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PriceKey {
    pub sku: Sku,
    pub scope: PriceScope,
    pub slot: PriceSlot,
}

/// Half-open `[from_ms, until_ms)` in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ValidityWindow {
    pub from_ms: u64,
    pub until_ms: u64,
}

impl ValidityWindow {
    pub fn contains(&self, at_ms: u64) -> bool {
        self.from_ms <= at_ms && at_ms < self.until_ms
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PriceValue {
    pub amount: Money,
    pub window: Option<ValidityWindow>,
}

impl PriceValue {
    /// A price as a user or HQ sets it: never negative, never an empty window.
    pub fn new(sku: &Sku, amount: Money, window: Option<ValidityWindow>) -> Result<PriceValue, PriceError> {
        let value = PriceValue { amount, window };
        value.validate(sku)?;
        Ok(value)
    }

    pub fn validate(&self, sku: &Sku) -> Result<(), PriceError> {
        if self.amount.is_negative() {
            return Err(PriceError::Negative { sku: sku.clone(), amount: self.amount });
        }
        if let Some(w) = self.window {
            if w.from_ms >= w.until_ms {
                return Err(PriceError::EmptyWindow { sku: sku.clone(), from_ms: w.from_ms, until_ms: w.until_ms });
            }
            // Stored in SQLite's signed 64-bit integers on both sides of a sync.
            if w.until_ms > i64::MAX as u64 {
                return Err(PriceError::WindowOutOfRange {
                    sku: sku.clone(),
                    until_ms: w.until_ms,
                    max_ms: i64::MAX as u64,
                });
            }
        }
        Ok(())
    }

    pub fn valid_at(&self, at_ms: u64) -> bool {
        self.window.is_none_or(|w| w.contains(at_ms))
    }
}

/// Which register write a price came from: recorded in each sale line, so an auditor can tell
/// exactly which price change a till charged.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PriceVersion {
    pub scope: PriceScope,
    pub slot: PriceSlot,
    pub stamp: HlcStamp,
}

/// One register write as it is stored and synced: `value: None` withdraws the price.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PriceEntry {
    pub key: PriceKey,
    pub value: Option<PriceValue>,
    pub stamp: HlcStamp,
}

impl PriceEntry {
    pub fn validate(&self) -> Result<(), PriceError> {
        match &self.value {
            Some(v) => v.validate(&self.key.sku),
            None => Ok(()),
        }
    }

    fn as_lww(&self) -> Lww<Option<PriceValue>> {
        Lww { value: self.value.clone(), stamp: self.stamp.clone() }
    }

    pub fn version(&self) -> PriceVersion {
        PriceVersion { scope: self.key.scope.clone(), slot: self.key.slot, stamp: self.stamp.clone() }
    }

    /// Whether this write wins against `current` in the register.
    pub fn wins_over(&self, current: &PriceEntry) -> bool {
        current.as_lww().loses_to(&self.as_lww())
    }
}

fn precedence(scope: &PriceScope, slot: PriceSlot) -> u8 {
    match (scope, slot) {
        (PriceScope::Store(_), PriceSlot::Promotion) => 0,
        (PriceScope::Store(_), PriceSlot::Regular) => 1,
        (PriceScope::Chain, PriceSlot::Promotion) => 2,
        (PriceScope::Chain, PriceSlot::Regular) => 3,
    }
}

/// Resolves the price of a SKU in `store` at `at_ms` among the register entries given (entries
/// of other SKUs or other stores are ignored, so callers may pass a superset).
pub fn effective_price<'a>(
    entries: impl IntoIterator<Item = &'a PriceEntry>,
    sku: &Sku,
    store: &StoreId,
    at_ms: u64,
) -> Option<&'a PriceEntry> {
    entries
        .into_iter()
        .filter(|e| &e.key.sku == sku)
        .filter(|e| match &e.key.scope {
            PriceScope::Chain => true,
            PriceScope::Store(s) => s == store,
        })
        .filter(|e| e.value.as_ref().is_some_and(|v| v.valid_at(at_ms)))
        .min_by_key(|e| precedence(&e.key.scope, e.key.slot))
}

/// In-memory set of price registers (the cloud's and the tests' form).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceBook {
    entries: BTreeMap<PriceKey, PriceEntry>,
}

impl PriceBook {
    pub fn new() -> PriceBook {
        PriceBook::default()
    }

    /// Merges one register write; returns whether it won.
    pub fn merge(&mut self, entry: &PriceEntry) -> bool {
        match self.entries.get(&entry.key) {
            Some(current) if !entry.wins_over(current) => false,
            _ => {
                self.entries.insert(entry.key.clone(), entry.clone());
                true
            }
        }
    }

    pub fn get(&self, key: &PriceKey) -> Option<&PriceEntry> {
        self.entries.get(key)
    }

    pub fn entries(&self) -> impl Iterator<Item = &PriceEntry> {
        self.entries.values()
    }

    pub fn effective_price(&self, sku: &Sku, store: &StoreId, at_ms: u64) -> Option<&PriceEntry> {
        let lo = PriceKey { sku: sku.clone(), scope: PriceScope::Chain, slot: PriceSlot::Regular };
        effective_price(self.entries.range(lo..).take_while(|(k, _)| &k.sku == sku).map(|(_, e)| e), sku, store, at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ActorId;
    use crate::money::Currency;

    fn sku() -> Sku {
        Sku::new("MILK-1L").unwrap()
    }
    fn store() -> StoreId {
        StoreId::new("s1").unwrap()
    }
    fn entry(scope: PriceScope, slot: PriceSlot, cents: i64, window: Option<(u64, u64)>, wall: u64) -> PriceEntry {
        PriceEntry {
            key: PriceKey { sku: sku(), scope, slot },
            value: Some(PriceValue {
                amount: Money::new(cents, Currency::new("EUR").unwrap()),
                window: window.map(|(from_ms, until_ms)| ValidityWindow { from_ms, until_ms }),
            }),
            stamp: HlcStamp { wall_ms: wall, logical: 0, actor: ActorId::cloud() },
        }
    }

    #[test]
    fn store_over_chain_and_promotions_inside_their_window() {
        let mut book = PriceBook::new();
        book.merge(&entry(PriceScope::Chain, PriceSlot::Regular, 199, None, 1));
        book.merge(&entry(PriceScope::Chain, PriceSlot::Promotion, 149, Some((100, 200)), 2));
        let at = |t| book.effective_price(&sku(), &store(), t).map(|e| e.value.as_ref().unwrap().amount.minor);
        assert_eq!(at(50), Some(199));
        assert_eq!(at(100), Some(149));
        assert_eq!(at(200), Some(199), "window is half-open");
        book.merge(&entry(PriceScope::Store(store()), PriceSlot::Regular, 189, None, 3));
        let at = |t| book.effective_price(&sku(), &store(), t).map(|e| e.value.as_ref().unwrap().amount.minor);
        assert_eq!(at(150), Some(189), "a store price beats a chain promotion");
        let other = StoreId::new("s2").unwrap();
        assert_eq!(book.effective_price(&sku(), &other, 150).unwrap().value.as_ref().unwrap().amount.minor, 149);
    }

    #[test]
    fn withdrawn_price_falls_back_and_lww_keeps_the_latest() {
        let mut book = PriceBook::new();
        book.merge(&entry(PriceScope::Chain, PriceSlot::Regular, 199, None, 1));
        let mut withdraw = entry(PriceScope::Store(store()), PriceSlot::Regular, 0, None, 5);
        withdraw.value = None;
        book.merge(&entry(PriceScope::Store(store()), PriceSlot::Regular, 189, None, 4));
        book.merge(&withdraw);
        assert!(!book.merge(&entry(PriceScope::Store(store()), PriceSlot::Regular, 179, None, 3)), "older write loses");
        assert_eq!(book.effective_price(&sku(), &store(), 0).unwrap().value.as_ref().unwrap().amount.minor, 199);
    }

    #[test]
    fn refuses_negative_prices_and_empty_windows() {
        let eur = Currency::new("EUR").unwrap();
        let e = PriceValue::new(&sku(), Money::new(-1, eur), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "price of Sku(\"MILK-1L\") must not be negative: -0.01 EUR".replace("Sku(\"MILK-1L\")", "MILK-1L")
        );
        assert!(matches!(
            PriceValue::new(&sku(), Money::new(1, eur), Some(ValidityWindow { from_ms: 5, until_ms: 5 })),
            Err(PriceError::EmptyWindow { .. })
        ));
    }
}
