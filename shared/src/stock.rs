//! Stock as a PN-counter in row form: one grow-only `(inc, dec)` slot per (store, sku, actor).
//! Merge is per-slot max, value is sum(inc) - sum(dec). This in-memory form is what the cloud
//! and the property tests use; the edge ledger stores the same rows in SQLite and merges each
//! row with [`Slot::merge`], so both sides share one merge rule.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{ActorId, Sku, StoreId};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StockError {
    #[error("stock movement of {movement} on {key} would overflow the slot")]
    Overflow { key: String, movement: i64 },
    #[error("stock slot {key} carries {field} = {value}, above the largest storable count {max}")]
    OutOfRange { key: String, field: &'static str, value: u64, max: u64 },
}

/// Identifies one actor's slot of one SKU's counter in one store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SlotKey {
    pub store: StoreId,
    pub sku: Sku,
    pub actor: ActorId,
}

impl std::fmt::Display for SlotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.store, self.sku, self.actor)
    }
}

/// The grow-only increments and decrements one actor made, in base units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Slot {
    pub inc: u64,
    pub dec: u64,
}

impl Slot {
    /// Largest count a slot may hold, so that it fits SQLite's signed 64-bit integers.
    pub const MAX: u64 = i64::MAX as u64;

    /// Records a movement: positive adds to `inc`, negative to `dec`.
    pub fn apply(self, movement: i64) -> Option<Slot> {
        let mut next = self;
        if movement >= 0 {
            next.inc = self.inc.checked_add(movement as u64).filter(|v| *v <= Slot::MAX)?;
        } else {
            next.dec = self.dec.checked_add(movement.unsigned_abs()).filter(|v| *v <= Slot::MAX)?;
        }
        Some(next)
    }

    /// Per-field max: idempotent, commutative, associative.
    pub fn merge(self, other: Slot) -> Slot {
        Slot { inc: self.inc.max(other.inc), dec: self.dec.max(other.dec) }
    }

    pub fn value(self) -> i128 {
        i128::from(self.inc) - i128::from(self.dec)
    }
}

/// A slot as it travels in a delta.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SlotRow {
    pub key: SlotKey,
    pub slot: Slot,
}

impl SlotRow {
    /// Refuses rows whose counts cannot be stored (a malicious or corrupt peer).
    pub fn validate(&self) -> Result<(), StockError> {
        for (field, value) in [("inc", self.slot.inc), ("dec", self.slot.dec)] {
            if value > Slot::MAX {
                return Err(StockError::OutOfRange { key: self.key.to_string(), field, value, max: Slot::MAX });
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Versioned {
    slot: Slot,
    version: u64,
}

/// All slots of a replica, each with the local change version at which it last changed, so a
/// delta is "rows changed since version V".
#[derive(Debug, Clone, Default)]
pub struct StockState {
    slots: BTreeMap<SlotKey, Versioned>,
    version: u64,
}

impl StockState {
    pub fn new() -> StockState {
        StockState::default()
    }

    /// The local change version: bumps on every slot that changes.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Records a movement made by `key.actor` (the caller must own that actor).
    pub fn apply_local(&mut self, key: SlotKey, movement: i64) -> Result<SlotRow, StockError> {
        let current = self.slots.get(&key).map(|v| v.slot).unwrap_or_default();
        let slot = current.apply(movement).ok_or_else(|| StockError::Overflow { key: key.to_string(), movement })?;
        if slot != current {
            self.version += 1;
            self.slots.insert(key.clone(), Versioned { slot, version: self.version });
        }
        Ok(SlotRow { key, slot })
    }

    /// Rows changed after local version `since` (exclusive), in key order.
    pub fn delta_since(&self, since: u64) -> Vec<SlotRow> {
        self.slots
            .iter()
            .filter(|(_, v)| v.version > since)
            .map(|(k, v)| SlotRow { key: k.clone(), slot: v.slot })
            .collect()
    }

    /// Every row: the full state, for comparison with delta merging.
    pub fn rows(&self) -> Vec<SlotRow> {
        self.delta_since(0)
    }

    /// Merges rows from a peer (per-slot max); returns the rows that changed here.
    pub fn merge(&mut self, rows: &[SlotRow]) -> Vec<SlotRow> {
        let mut changed = Vec::new();
        for row in rows {
            let current = self.slots.get(&row.key).map(|v| v.slot).unwrap_or_default();
            let merged = current.merge(row.slot);
            if merged != current || !self.slots.contains_key(&row.key) && merged != Slot::default() {
                self.version += 1;
                self.slots.insert(row.key.clone(), Versioned { slot: merged, version: self.version });
                changed.push(SlotRow { key: row.key.clone(), slot: merged });
            }
        }
        changed
    }

    pub fn slot(&self, key: &SlotKey) -> Slot {
        self.slots.get(key).map(|v| v.slot).unwrap_or_default()
    }

    /// On-hand units of `sku` in `store`: the sum over every actor's slot.
    pub fn value(&self, store: &StoreId, sku: &Sku) -> i128 {
        self.slots.iter().filter(|(k, _)| &k.store == store && &k.sku == sku).map(|(_, v)| v.slot.value()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(store: &str, sku: &str, actor: &str) -> SlotKey {
        SlotKey {
            store: StoreId::new(store).unwrap(),
            sku: Sku::new(sku).unwrap(),
            actor: ActorId::new(actor).unwrap(),
        }
    }

    #[test]
    fn delta_since_carries_only_changed_rows() {
        let mut s = StockState::new();
        s.apply_local(key("s1", "A", "store:s1"), 10).unwrap();
        let v = s.version();
        s.apply_local(key("s1", "B", "store:s1"), -2).unwrap();
        let delta = s.delta_since(v);
        assert_eq!(delta.len(), 1);
        assert_eq!(delta[0].key.sku.as_str(), "B");
        assert_eq!(s.value(&StoreId::new("s1").unwrap(), &Sku::new("B").unwrap()), -2);
    }

    #[test]
    fn overflow_is_refused_not_wrapped() {
        let mut s = StockState::new();
        s.apply_local(key("s1", "A", "store:s1"), i64::MAX).unwrap();
        assert!(matches!(s.apply_local(key("s1", "A", "store:s1"), 1), Err(StockError::Overflow { .. })));
        let bad = SlotRow { key: key("s1", "A", "cloud"), slot: Slot { inc: u64::MAX, dec: 0 } };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn merge_is_per_slot_max_and_reports_changes() {
        let mut a = StockState::new();
        let mut b = StockState::new();
        a.apply_local(key("s1", "A", "store:s1"), 5).unwrap();
        b.apply_local(key("s1", "A", "cloud"), -3).unwrap();
        let changed = a.merge(&b.rows());
        assert_eq!(changed.len(), 1);
        assert!(a.merge(&b.rows()).is_empty(), "merging twice changes nothing");
        assert_eq!(a.value(&StoreId::new("s1").unwrap(), &Sku::new("A").unwrap()), 2);
    }
}
