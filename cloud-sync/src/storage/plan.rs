//! The storage decisions that need no database: which incoming rows change the state (by the
//! merge rules of `shared`, exactly as the edge applies them), which version each changed row
//! takes, how the cloud clock stamps and observes, when a push advances the acknowledged
//! version, and how a pulled page is cut. Both backends load rows, call these, and write the
//! result, so SQLite and PostgreSQL cannot drift apart in meaning.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;

use shared::sync::{Cursor, Push, Rows};
use shared::{
    ActorId, CatalogItem, CatalogUpdate, ClockJump, Hlc, HlcStamp, PriceEntry, PriceKey, Sku, Slot, SlotKey, SlotRow,
};

use super::codec::{price_partition, store_partition, CHAIN};
use super::{CloudMovement, CloudWrites, Page, StorageError};

/// Folds `incoming` into the `current` values of their keys; returns each key that changed
/// with its final value, once, in the order keys first changed. `merge` returns the new value
/// when the incoming one changes the current (absent) one.
fn fold_changes<K: Hash + Eq + Clone, V: Clone>(
    current: &HashMap<K, V>,
    incoming: impl IntoIterator<Item = (K, V)>,
    merge: impl Fn(Option<&V>, &V) -> Option<V>,
) -> Vec<(K, V)> {
    let mut work: HashMap<K, V> = HashMap::new();
    let mut order: Vec<K> = Vec::new();
    for (key, value) in incoming {
        let now = work.get(&key).or_else(|| current.get(&key));
        if let Some(next) = merge(now, &value) {
            if work.insert(key.clone(), next).is_none() {
                order.push(key);
            }
        }
    }
    order
        .into_iter()
        .filter_map(|k| {
            let v = work.remove(&k)?;
            Some((k, v))
        })
        .collect()
}

/// Slots whose per-field max differs from what is stored (an unchanged slot keeps its version).
pub(crate) fn merge_slots(
    current: &HashMap<SlotKey, Slot>,
    incoming: impl IntoIterator<Item = SlotRow>,
) -> Vec<SlotRow> {
    let pairs = incoming.into_iter().map(|r| (r.key, r.slot));
    fold_changes(current, pairs, |now, new| {
        let now = now.copied().unwrap_or_default();
        let merged = now.merge(*new);
        (merged != now).then_some(merged)
    })
    .into_iter()
    .map(|(key, slot)| SlotRow { key, slot })
    .collect()
}

/// Price writes that win their register by LWW (an equal stamp changes nothing).
pub(crate) fn merge_prices<'a>(
    current: &HashMap<PriceKey, PriceEntry>,
    incoming: impl IntoIterator<Item = &'a PriceEntry>,
) -> Vec<PriceEntry> {
    let pairs = incoming.into_iter().map(|e| (e.key.clone(), e.clone()));
    fold_changes(current, pairs, |now, new| match now {
        Some(now) if !new.wins_over(now) => None,
        _ => Some(new.clone()),
    })
    .into_iter()
    .map(|(_, e)| e)
    .collect()
}

/// A catalog register's key: the SKU and the field's name.
pub(crate) type CatalogKey = (Sku, &'static str);

pub(crate) fn catalog_key(update: &CatalogUpdate) -> CatalogKey {
    (update.sku.clone(), update.field.name())
}

/// Whether `new` wins the field register holding `now`, by [`CatalogItem::merge`] itself.
fn catalog_wins(now: &CatalogUpdate, new: &CatalogUpdate) -> bool {
    let mut item = CatalogItem::new(now.sku.clone());
    item.merge(now);
    item.merge(new)
}

/// Catalog field writes that win their register by LWW.
pub(crate) fn merge_catalog<'a>(
    current: &HashMap<CatalogKey, CatalogUpdate>,
    incoming: impl IntoIterator<Item = &'a CatalogUpdate>,
) -> Vec<CatalogUpdate> {
    let pairs = incoming.into_iter().map(|u| (catalog_key(u), u.clone()));
    fold_changes(current, pairs, |now, new| match now {
        Some(now) if !catalog_wins(now, new) => None,
        _ => Some(new.clone()),
    })
    .into_iter()
    .map(|(_, u)| u)
    .collect()
}

pub(crate) fn cloud_slot_key(movement: &CloudMovement) -> SlotKey {
    SlotKey { store: movement.store.clone(), sku: movement.sku.clone(), actor: ActorId::cloud() }
}

/// Applies the cloud's movements in order with [`Slot::apply`]; any overflow fails the group.
pub(crate) fn apply_movements(
    current: &HashMap<SlotKey, Slot>,
    movements: &[CloudMovement],
) -> Result<Vec<SlotRow>, StorageError> {
    let mut work: HashMap<SlotKey, Slot> = HashMap::new();
    let mut order: Vec<SlotKey> = Vec::new();
    for m in movements {
        let key = cloud_slot_key(m);
        let now = work.get(&key).or_else(|| current.get(&key)).copied().unwrap_or_default();
        let next = now.apply(m.movement).ok_or_else(|| StorageError::Overflow {
            store: m.store.clone(),
            sku: m.sku.clone(),
            movement: m.movement,
        })?;
        // A zero movement changes nothing, and an unchanged slot keeps its version.
        if next != now && work.insert(key.clone(), next).is_none() {
            order.push(key);
        }
    }
    Ok(order.into_iter().filter_map(|k| work.get(&k).map(|s| SlotRow { key: k.clone(), slot: *s })).collect())
}

/// The partitions a group of rows writes to, in lock order (sorted by name, so two
/// transactions locking several counter rows always take them in the same order).
pub(crate) fn partitions_of(rows: &Rows) -> BTreeSet<String> {
    let mut parts: BTreeSet<String> =
        rows.stock.iter().filter(|g| !g.slots.is_empty()).map(|g| store_partition(&g.store)).collect();
    parts.extend(rows.prices.iter().map(|p| price_partition(&p.key.scope)));
    if !rows.catalog.is_empty() {
        parts.insert(CHAIN.to_owned());
    }
    parts
}

/// The partitions a group of HQ writes touches, in lock order.
pub(crate) fn writes_partitions(writes: &CloudWrites) -> BTreeSet<String> {
    let mut parts: BTreeSet<String> = writes.stock.iter().map(|m| store_partition(&m.store)).collect();
    parts.extend(writes.prices.iter().map(|p| price_partition(&p.key.scope)));
    if !writes.catalog.is_empty() {
        parts.insert(CHAIN.to_owned());
    }
    parts
}

/// HQ writes with their stamps: each price, then each catalog field, takes the clock's next
/// stamp, so a later write in the group wins over an earlier one to the same register.
#[derive(Debug, Default)]
pub(crate) struct Stamped {
    pub prices: Vec<PriceEntry>,
    pub catalog: Vec<CatalogUpdate>,
    pub first: Option<HlcStamp>,
}

pub(crate) fn stamp_writes(clock: &mut Hlc, writes: &CloudWrites, now_ms: u64) -> Stamped {
    let mut out = Stamped::default();
    for w in &writes.prices {
        let s = stamp(clock, now_ms);
        out.first.get_or_insert_with(|| s.clone());
        out.prices.push(PriceEntry { key: w.key.clone(), value: w.value.clone(), stamp: s });
    }
    for w in &writes.catalog {
        let s = stamp(clock, now_ms);
        out.first.get_or_insert_with(|| s.clone());
        out.catalog.push(CatalogUpdate { sku: w.sku.clone(), field: w.field.clone(), stamp: s });
    }
    out
}

/// Hands out the next versions of the partitions a transaction has locked.
#[derive(Debug, Default)]
pub(crate) struct Versions {
    heads: BTreeMap<String, u64>,
    changed: BTreeSet<String>,
}

impl Versions {
    /// Starts from the counters as read (under lock) inside the transaction.
    pub fn new(heads: impl IntoIterator<Item = (String, u64)>) -> Versions {
        Versions { heads: heads.into_iter().collect(), changed: BTreeSet::new() }
    }

    /// The version the next change of `partition` will take, without taking it.
    pub fn peek(&self, partition: &str) -> Result<u64, StorageError> {
        let head = self
            .heads
            .get(partition)
            .ok_or_else(|| StorageError::Task(format!("internal: partition {partition} written without its lock")))?;
        head.checked_add(1).ok_or_else(|| super::codec::corrupt(partition, "version counter exhausted"))
    }

    pub fn next(&mut self, partition: &str) -> Result<u64, StorageError> {
        let head = self
            .heads
            .get_mut(partition)
            .ok_or_else(|| StorageError::Task(format!("internal: partition {partition} written without its lock")))?;
        *head = head.checked_add(1).ok_or_else(|| super::codec::corrupt(partition, "version counter exhausted"))?;
        self.changed.insert(partition.to_owned());
        Ok(*head)
    }

    /// The counters to write back: only those that moved.
    pub fn moved(&self) -> impl Iterator<Item = (&str, u64)> {
        self.changed.iter().filter_map(|p| self.heads.get(p).map(|v| (p.as_str(), *v)))
    }
}

/// The cloud's HLC resumed from its clock row. The skew fence is the request handler's job
/// (it checks before storage observes), so it is open here.
pub(crate) fn cloud_clock(wall_ms: u64, logical: u32) -> Hlc {
    Hlc::resume(ActorId::cloud(), u64::MAX, wall_ms, logical)
}

/// The next cloud stamp. A wall clock far behind the clock row is worth a warning (the
/// service host's clock stepped back, or a store's stamp was observed far ahead); a forward
/// step is normal for the cloud, whose clock row only moves when something is written.
pub(crate) fn stamp(clock: &mut Hlc, now_ms: u64) -> HlcStamp {
    let (stamp, jump) = clock.stamp(now_ms);
    if let Some(ClockJump::Backwards { by_ms }) = jump {
        tracing::warn!(by_ms, "Service wall clock is behind the cloud clock row; stamping from the row");
    }
    stamp
}

/// The acknowledged version after a push: it advances only over a contiguous range, since a
/// gap below `from_version` may hold rows the cloud never received.
pub(crate) fn next_acked(acked: u64, push: Option<&Push>) -> u64 {
    match push {
        Some(p) if p.from_version <= acked => acked.max(p.to_version),
        _ => acked,
    }
}

/// One row read for a pull, with its partition version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PulledRow {
    Slot(SlotRow),
    Price(PriceEntry),
    Catalog(CatalogUpdate),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pulled {
    pub version: u64,
    pub row: PulledRow,
}

/// Merges the per-table reads of one partition into version order, keeping at most `limit`.
pub(crate) fn in_version_order(mut rows: Vec<Pulled>, limit: usize) -> Vec<Pulled> {
    rows.sort_by_key(|r| r.version);
    rows.truncate(limit);
    rows
}

/// How many rows a backend reads from the store partition for a page of `max` rows: one more
/// than fits tells whether more remain.
pub(crate) fn store_read_limit(max: usize) -> usize {
    max + 1
}

/// How many chain rows to read after `store_rows` were read for a page of `max`: none when the
/// store partition already overflows the page, else the room left plus one.
pub(crate) fn chain_read_limit(store_rows: usize, max: usize) -> Option<usize> {
    (store_rows <= max).then(|| max - store_rows + 1)
}

/// Cuts a page: the store partition first, then the chain, at most `max` rows in all; each
/// cursor moves to the last version included from its partition, or, when every row of the
/// partition beyond the cursor is in the page, to the partition's version `heads` read in the
/// same snapshot (rows the store does not get, its own slots, are then not scanned again).
/// The chain is only drained when it was read (`chain_rows` non-empty or the store part fit).
pub(crate) fn page(
    cursor: Cursor,
    store_rows: Vec<Pulled>,
    chain_rows: Vec<Pulled>,
    max: usize,
    heads: Cursor,
) -> Page {
    let store_taken = store_rows.len().min(max);
    let chain_taken = chain_rows.len().min(max - store_taken);
    let more = store_rows.len() > store_taken || chain_rows.len() > chain_taken;
    let store_part = &store_rows[..store_taken];
    let chain_part = &chain_rows[..chain_taken];
    // A cursor beyond a partition's counter means the database lost versions the store had
    // seen (a restored backup): the store starts that partition over, or it would never see
    // the versions given again.
    if cursor.store > heads.store || cursor.chain > heads.chain {
        let restart = Cursor {
            store: if cursor.store > heads.store { 0 } else { cursor.store },
            chain: if cursor.chain > heads.chain { 0 } else { cursor.chain },
        };
        return Page { rows: Rows::default(), next_cursor: restart, more: true };
    }
    let store_drained = store_rows.len() == store_taken;
    let chain_drained = store_drained && store_taken < max && chain_rows.len() == chain_taken;
    let next_cursor = Cursor {
        store: if store_drained {
            heads.store.max(cursor.store)
        } else {
            store_part.last().map_or(cursor.store, |r| r.version)
        },
        chain: if chain_drained {
            heads.chain.max(cursor.chain)
        } else {
            chain_part.last().map_or(cursor.chain, |r| r.version)
        },
    };
    let mut slots = Vec::new();
    let mut rows = Rows::default();
    for pulled in store_part.iter().chain(chain_part) {
        match &pulled.row {
            PulledRow::Slot(s) => slots.push(s.clone()),
            PulledRow::Price(p) => rows.prices.push(p.clone()),
            PulledRow::Catalog(c) => rows.catalog.push(c.clone()),
        }
    }
    rows.stock = Rows::group_slots(slots);
    Page { rows, next_cursor, more }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{CatalogField, StoreId};

    fn key(sku: &str, actor: &str) -> SlotKey {
        SlotKey { store: StoreId::new("s1").unwrap(), sku: Sku::new(sku).unwrap(), actor: ActorId::new(actor).unwrap() }
    }

    fn row(sku: &str, inc: u64, dec: u64) -> SlotRow {
        SlotRow { key: key(sku, "store:s1"), slot: Slot { inc, dec } }
    }

    #[test]
    fn slots_change_only_when_their_max_moves_and_duplicates_fold() {
        let current = HashMap::from([(key("A", "store:s1"), Slot { inc: 5, dec: 2 })]);
        let changed = merge_slots(&current, [row("A", 5, 2), row("B", 0, 0), row("C", 1, 0), row("C", 3, 0)]);
        assert_eq!(changed, vec![row("C", 3, 0)]);
        let changed = merge_slots(&current, [row("A", 4, 3)]);
        assert_eq!(changed, vec![row("A", 5, 3)], "per-field max, not overwrite");
    }

    #[test]
    fn catalog_lww_uses_the_shared_register() {
        let st = |w| HlcStamp { wall_ms: w, logical: 0, actor: ActorId::cloud() };
        let upd = |name: &str, w| CatalogUpdate {
            sku: Sku::new("A").unwrap(),
            field: CatalogField::Name(name.into()),
            stamp: st(w),
        };
        let current = HashMap::from([(catalog_key(&upd("old", 5)), upd("old", 5))]);
        assert!(merge_catalog(&current, [&upd("older", 4)]).is_empty());
        assert!(merge_catalog(&current, [&upd("old", 5)]).is_empty(), "equal stamp and value: no change");
        assert_eq!(merge_catalog(&current, [&upd("new", 6), &upd("newer", 7)]), vec![upd("newer", 7)]);
    }

    #[test]
    fn movements_apply_in_order_and_overflow_fails_the_group() {
        let m = |sku: &str, movement| CloudMovement {
            store: StoreId::new("s1").unwrap(),
            sku: Sku::new(sku).unwrap(),
            movement,
        };
        let rows = apply_movements(&HashMap::new(), &[m("A", 3), m("A", -1), m("B", 0)]).unwrap();
        assert_eq!(rows, vec![SlotRow { key: key("A", "cloud"), slot: Slot { inc: 3, dec: 1 } }]);
        let err = apply_movements(&HashMap::new(), &[m("A", i64::MAX), m("A", 1)]).unwrap_err();
        assert!(matches!(err, StorageError::Overflow { movement: 1, .. }));
    }

    #[test]
    fn acked_advances_only_over_contiguous_pushes() {
        let push = |from, to| Push { from_version: from, to_version: to, rows: Rows::default() };
        assert_eq!(next_acked(3, Some(&push(3, 5))), 5);
        assert_eq!(next_acked(3, Some(&push(4, 9))), 3, "a gap: (3, 4] never arrived");
        assert_eq!(next_acked(7, Some(&push(0, 2))), 7, "a stale retry never lowers it");
        assert_eq!(next_acked(7, None), 7);
    }

    #[test]
    fn page_fills_from_the_store_partition_first() {
        let pulled = |v, sku: &str| Pulled { version: v, row: PulledRow::Slot(row(sku, v, 0)) };
        let cursor = Cursor { chain: 10, store: 20 };
        // The partitions' versions in the same snapshot: up to 30 in the store partition (rows
        // up to there the store does not get, its own slots), 12 in the chain.
        let heads = Cursor { chain: 12, store: 30 };
        let p = page(cursor, vec![pulled(21, "A"), pulled(22, "B")], vec![pulled(11, "C"), pulled(12, "D")], 3, heads);
        assert_eq!(p.next_cursor, Cursor { chain: 11, store: 30 }, "the store partition is drained: skip to its head");
        assert!(p.more);
        assert_eq!(p.rows.len(), 3);
        let p = page(cursor, vec![pulled(21, "A"), pulled(22, "B")], vec![], 2, heads);
        assert_eq!((p.next_cursor, p.more), (Cursor { chain: 10, store: 30 }, false), "the chain was not read");
        let p = page(cursor, vec![pulled(21, "A")], vec![pulled(11, "C")], 5, heads);
        assert_eq!((p.next_cursor, p.more), (heads, false), "both drained");
        let ahead = Cursor { chain: 10, store: 31 };
        let p = page(ahead, vec![], vec![], 5, heads);
        assert_eq!((p.next_cursor, p.more), (Cursor { chain: 10, store: 0 }, true), "a restored database: start over");
        let three = vec![pulled(21, "A"), pulled(22, "B"), pulled(23, "E")];
        let p = page(cursor, three, vec![], 2, heads);
        assert_eq!((p.next_cursor, p.more), (Cursor { chain: 10, store: 22 }, true), "not drained: the last row sent");
        assert_eq!(chain_read_limit(2, 2), Some(1), "a full page still asks whether the chain has more");
        assert_eq!(chain_read_limit(3, 2), None);
    }
}
