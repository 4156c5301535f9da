//! The storage decisions that need no database: which incoming rows change the state (by the
//! merge rules of `shared`, exactly as the edge applies them), which version each changed row
//! takes, how the cloud clock stamps and observes, when a push advances the acknowledged
//! version, how an online order is reserved or cancelled against the stored escrow, and how a
//! pulled page is cut. Both backends load rows, call these, and write the result, so SQLite and
//! PostgreSQL cannot drift apart in meaning.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;

use shared::orders::MAX_ORDER_LINES;
use shared::sync::{Cursor, Push, Rows};
use shared::{
    ActorId, CatalogItem, CatalogUpdate, ClockJump, Escrow, EscrowError, EscrowKey, EscrowRow, Hlc, HlcStamp,
    OrderHeader, OrderId, PriceEntry, PriceKey, Side, Sku, Slot, SlotKey, SlotRow, StoreId,
};

use super::codec::{corrupt, invariant, price_partition, store_partition, EscrowId, CHAIN};
use super::{CloudMovement, CloudWrites, Page, ShortLine, StorageError};

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

/// Escrow rows a store pushed, joined into the stored rows of the same ids (`current`) by
/// [`Escrow::merge_rows`] itself (max for `Granted`, union for `Fulfilled`): the rows that
/// changed, as they now stand. An unchanged row keeps its version.
pub(crate) fn merge_escrow(current: Vec<EscrowRow>, incoming: &[EscrowRow]) -> Result<Vec<EscrowRow>, StorageError> {
    let mut keys: BTreeMap<EscrowKey, (Vec<EscrowRow>, Vec<EscrowRow>)> = BTreeMap::new();
    for row in current {
        keys.entry(row.key().clone()).or_default().0.push(row);
    }
    for row in incoming {
        keys.entry(row.key().clone()).or_default().1.push(row.clone());
    }
    let mut changed = Vec::new();
    for (key, (stored, pushed)) in keys {
        let what = format!("escrow of {key}");
        let mut escrow = Escrow::new(key);
        escrow.merge_rows(&stored).map_err(|e| corrupt(&what, e))?;
        changed.extend(escrow.merge_rows(&pushed).map_err(|e| corrupt(format!("pushed {what}"), e))?);
    }
    Ok(changed)
}

/// The escrow of each SKU of `store`, built from the rows storage loaded: one for every SKU in
/// `skus` (empty where nothing happened yet) and for every SKU the rows name.
pub(crate) fn escrows(
    store: &StoreId,
    skus: impl IntoIterator<Item = Sku>,
    rows: Vec<EscrowRow>,
) -> Result<BTreeMap<Sku, Escrow>, StorageError> {
    let empty = |sku: Sku| Escrow::new(EscrowKey { store: store.clone(), sku });
    let mut out: BTreeMap<Sku, Escrow> = skus.into_iter().map(|sku| (sku.clone(), empty(sku))).collect();
    let mut by_sku: BTreeMap<Sku, Vec<EscrowRow>> = BTreeMap::new();
    for row in rows {
        by_sku.entry(row.key().sku.clone()).or_default().push(row);
    }
    for (sku, rows) in by_sku {
        let escrow = out.entry(sku.clone()).or_insert_with(|| empty(sku));
        escrow.merge_rows(&rows).map_err(|e| corrupt(format!("escrow of {}", escrow.key()), e))?;
    }
    Ok(out)
}

/// The stored escrow of `header`'s lines, one per SKU, from the rows storage loaded (for a
/// cancellation: only the order's own rows, see [`order_row_ids`]).
pub(crate) fn escrows_of(header: &OrderHeader, rows: Vec<EscrowRow>) -> Result<BTreeMap<Sku, Escrow>, StorageError> {
    escrows(&header.store, header.lines.iter().map(|l| l.sku.clone()), rows)
}

/// The rows a cancellation of `header` reads: each line's reservation and handover of this
/// order, by primary key. [`Escrow::cancel`] looks at nothing else (not the key's other orders,
/// nor its grant), so an escrow built from these alone decides exactly as the whole one would.
pub(crate) fn order_row_ids(header: &OrderHeader) -> Vec<EscrowId> {
    let keys = header.lines.iter().map(|l| EscrowKey { store: header.store.clone(), sku: l.sku.clone() });
    keys.flat_map(|key| [EscrowId::reservation(&key, &header.order), EscrowId::fulfilled(&key, &header.order)])
        .collect()
}

/// What the cloud's reservation check on one key reads, each a row found by primary key, so
/// creating an order costs the same on a key with a year of orders as on a new one.
///
/// [`Escrow::reserve`] needs, of the key's history, only `granted - reserved - released` and
/// the highest `seq` given so far; `reserved` (every reservation's units, cancelled or handed
/// over or not) and that `seq` only change when the cloud reserves, so the transaction that
/// writes a reservation keeps them in an `escrow_totals` row (an aggregate query would still
/// scan every reservation of the key under the lock). `Escrow` itself cannot be built
/// from totals (it holds every reservation and lives in `shared`), so [`reserve_on`] repeats
/// its checks, in its order, with its errors; a test holds the two to the same answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ReserveBasis {
    pub granted: u64,
    pub released: u64,
    /// The sum of the units of every reservation of the key.
    pub reserved: u64,
    /// The highest `seq` of the key's reservations (0 when it has none).
    pub last_seq: u64,
    /// This order's reservation on the key, if it has one: `(units, seq, cancelled)`.
    pub existing: Option<(u64, u64, bool)>,
}

/// The rows [`reserve_bases`] needs besides the totals: each line's grant, release and this
/// order's reservation.
pub(crate) fn reserve_ids(header: &OrderHeader) -> Vec<EscrowId> {
    let keys = header.lines.iter().map(|l| EscrowKey { store: header.store.clone(), sku: l.sku.clone() });
    keys.flat_map(|key| [EscrowId::granted(&key), EscrowId::released(&key), EscrowId::reservation(&key, &header.order)])
        .collect()
}

/// The basis of each line of `header` from the rows of [`reserve_ids`] and the `escrow_totals`
/// rows `(sku, reserved, last_seq)` of its SKUs (a SKU never reserved has none).
pub(crate) fn reserve_bases(
    header: &OrderHeader,
    rows: Vec<EscrowRow>,
    totals: Vec<(Sku, u64, u64)>,
) -> Result<BTreeMap<Sku, ReserveBasis>, StorageError> {
    let mut bases: BTreeMap<Sku, ReserveBasis> =
        header.lines.iter().map(|l| (l.sku.clone(), ReserveBasis::default())).collect();
    let stray = |what: String| invariant(format!("order {}: loaded {what}, which it does not read", header.order));
    for row in rows {
        let key = row.key();
        let basis = match bases.get_mut(&key.sku) {
            Some(basis) if key.store == header.store => basis,
            _ => return Err(stray(format!("escrow row of {key}"))),
        };
        match row {
            EscrowRow::Granted { granted, .. } => basis.granted = granted,
            EscrowRow::Released { released, .. } => basis.released = released,
            EscrowRow::Reservation { order, units, seq, cancelled, .. } if order == header.order => {
                basis.existing = Some((units, seq, cancelled));
            }
            other => return Err(stray(format!("{other:?}"))),
        }
    }
    for (sku, reserved, last_seq) in totals {
        let basis = bases.get_mut(&sku).ok_or_else(|| stray(format!("the totals of {}/{sku}", header.store)))?;
        basis.reserved = reserved;
        basis.last_seq = last_seq;
    }
    Ok(bases)
}

/// [`Escrow::reserve`] for the cloud on `key`, from its [`ReserveBasis`]: the reservation row
/// and whether it is new (false when the order already reserves these units there).
#[allow(clippy::result_large_err, reason = "the very error Escrow::reserve returns, so the two compare equal")]
pub(crate) fn reserve_on(
    key: &EscrowKey,
    basis: &ReserveBasis,
    order: &OrderId,
    units: u64,
) -> Result<(EscrowRow, bool), EscrowError> {
    let row = |units, seq, cancelled| EscrowRow::Reservation {
        key: key.clone(),
        order: order.clone(),
        units,
        seq,
        cancelled,
    };
    if units == 0 {
        return Err(EscrowError::ZeroUnits { op: "reserve", key: key.to_string() });
    }
    if let Some((existing, seq, cancelled)) = basis.existing {
        if existing == units {
            return Ok((row(units, seq, cancelled), false));
        }
        return Err(EscrowError::OrderExists {
            store: key.store.clone(),
            sku: key.sku.clone(),
            order: order.clone(),
            existing,
            wanted: units,
        });
    }
    let available = i128::from(basis.granted) - i128::from(basis.reserved) - i128::from(basis.released);
    if i128::from(units) > available {
        return Err(EscrowError::InsufficientAllocation {
            store: key.store.clone(),
            sku: key.sku.clone(),
            order: order.clone(),
            wanted: units,
            available,
            granted: basis.granted,
            reserved: basis.reserved,
            released: basis.released,
        });
    }
    let add = |field: &'static str, current: u64, by: u64| {
        current.checked_add(by).filter(|v| *v <= Escrow::MAX).ok_or_else(|| EscrowError::Overflow {
            op: "reserve",
            key: key.to_string(),
            field,
            current,
            units: by,
            max: Escrow::MAX,
        })
    };
    add("reserved", basis.reserved, units)?;
    let seq = add("seq", basis.last_seq, 1)?;
    Ok((row(units, seq, false), true))
}

/// What reserving an order writes: its reservation rows (one version for all of them) and the
/// new `escrow_totals` of the keys they changed, `(sku, reserved, last_seq)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reserved {
    pub rows: Vec<EscrowRow>,
    pub totals: Vec<(Sku, u64, u64)>,
}

/// Reserves every line of `header` for the cloud against the rights in `bases` (from
/// [`reserve_bases`]), all or none: the rows to write, or every line that is short.
pub(crate) fn reserve_order(
    bases: &BTreeMap<Sku, ReserveBasis>,
    header: &OrderHeader,
) -> Result<Result<Reserved, Vec<ShortLine>>, StorageError> {
    let mut work = bases.clone();
    let (mut rows, mut short, mut changed) = (Vec::new(), Vec::new(), BTreeSet::new());
    for line in &header.lines {
        let basis = work.get_mut(&line.sku).ok_or_else(|| {
            invariant(format!("no reservation basis loaded for {} of order {}", line.sku, header.order))
        })?;
        let key = EscrowKey { store: header.store.clone(), sku: line.sku.clone() };
        match reserve_on(&key, basis, &header.order, line.units) {
            Ok((row, new)) => {
                if let (true, EscrowRow::Reservation { units, seq, cancelled, .. }) = (new, &row) {
                    // In range: reserve_on checked both sums.
                    basis.reserved += units;
                    basis.last_seq = *seq;
                    basis.existing = Some((*units, *seq, *cancelled));
                    changed.insert(line.sku.clone());
                }
                rows.push(row);
            }
            Err(EscrowError::InsufficientAllocation { wanted, available, .. }) => short.push(ShortLine {
                sku: line.sku.clone(),
                wanted,
                available: u64::try_from(available.max(0)).unwrap_or(u64::MAX),
            }),
            // A reservation under an id the cloud has no order for, or a count that cannot be
            // stored: the database does not hold what this service wrote.
            Err(e) => return Err(corrupt(format!("order {}", header.order), e)),
        }
    }
    if !short.is_empty() {
        return Ok(Err(short));
    }
    let totals = changed.into_iter().filter_map(|sku| work.get(&sku).map(|b| (sku, b.reserved, b.last_seq))).collect();
    Ok(Ok(Reserved { rows, totals }))
}

/// Cancels every line of `header` for the cloud in `escrows`: the rows that changed (none for a
/// repeated cancel), or the SKUs of the lines the cloud knows were handed over.
pub(crate) fn cancel_order(
    escrows: &BTreeMap<Sku, Escrow>,
    header: &OrderHeader,
) -> Result<Result<Vec<EscrowRow>, Vec<Sku>>, StorageError> {
    let mut work = escrows.clone();
    let (mut rows, mut handed_over) = (Vec::new(), Vec::new());
    for line in &header.lines {
        let escrow = work
            .get_mut(&line.sku)
            .ok_or_else(|| invariant(format!("no escrow loaded for {} of order {}", line.sku, header.order)))?;
        match escrow.cancel(&Side::Cloud, &header.order) {
            Ok(applied) if applied.changed => rows.push(applied.row),
            Ok(_) => {}
            Err(EscrowError::AlreadyFulfilled { sku, .. }) => handed_over.push(sku),
            Err(e) => return Err(corrupt(format!("order {}", header.order), e)),
        }
    }
    Ok(if handed_over.is_empty() { Ok(rows) } else { Err(handed_over) })
}

/// Whether a create request repeats the order already stored under its id: the same store,
/// customer reference and lines (in any order). Times and the pickup code are the first ones.
pub(crate) fn same_order(stored: &OrderHeader, asked: &OrderHeader) -> bool {
    let lines = |h: &OrderHeader| {
        let mut lines = h.lines.clone();
        lines.sort();
        lines
    };
    stored.store == asked.store && stored.customer_ref == asked.customer_ref && lines(stored) == lines(asked)
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
    parts.extend(rows.escrow.iter().map(|r| store_partition(&r.key().store)));
    parts.extend(rows.orders.iter().map(|h| store_partition(&h.store)));
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
            .ok_or_else(|| invariant(format!("partition {partition} written without its lock")))?;
        head.checked_add(1).ok_or_else(|| super::codec::corrupt(partition, "version counter exhausted"))
    }

    pub fn next(&mut self, partition: &str) -> Result<u64, StorageError> {
        let head = self
            .heads
            .get_mut(partition)
            .ok_or_else(|| invariant(format!("partition {partition} written without its lock")))?;
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
    Escrow(EscrowRow),
    Order(OrderHeader),
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

/// Most rows one version holds in a partition: an order's header and its reservations, written
/// together so a store never sees a reservation without its order. Every other change takes a
/// version of its own.
pub(crate) const MAX_VERSION_ROWS: usize = MAX_ORDER_LINES + 1;

/// How many rows a backend reads from the store partition for a page of `max` rows: enough to
/// finish the version the page would end in, and one more to tell whether more remain.
pub(crate) fn store_read_limit(max: usize) -> usize {
    max.max(1) + MAX_VERSION_ROWS
}

/// How many of `rows` (in version order) a page of `max` takes: as many as fit without ending
/// inside a version; the whole first version when it alone is larger than a page (so a page
/// holds at most `max(max, MAX_VERSION_ROWS)` rows, and always makes progress).
pub(crate) fn cut(rows: &[Pulled], max: usize) -> usize {
    let max = max.max(1);
    if rows.len() <= max {
        return rows.len();
    }
    let last = rows[max - 1].version;
    if rows[max].version != last {
        return max;
    }
    match rows[..max].iter().rposition(|r| r.version != last) {
        Some(before) => before + 1,
        None => rows.iter().position(|r| r.version != last).unwrap_or(rows.len()),
    }
}

/// How many chain rows to read after `store_rows` were read for a page of `max`: none while the
/// store partition has more than the page takes, else the room left plus one (a full page
/// still reads one, to tell whether the chain has more).
pub(crate) fn chain_read_limit(store_rows: &[Pulled], max: usize) -> Option<usize> {
    let taken = cut(store_rows, max);
    (taken == store_rows.len()).then(|| max.max(1).saturating_sub(taken) + 1)
}

/// Cuts a page: the store partition first (never inside a version, see [`cut`]), then the
/// chain, at most `max` rows in all; each cursor moves to the last version included from its
/// partition, or, when every row of the partition beyond the cursor is in the page, to the
/// partition's version `heads` read in the same snapshot (rows the store does not get, its own,
/// are then not scanned again). The chain is only drained when it was read and had room.
pub(crate) fn page(
    cursor: Cursor,
    store_rows: Vec<Pulled>,
    chain_rows: Vec<Pulled>,
    max: usize,
    heads: Cursor,
) -> Page {
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
    let max = max.max(1);
    let store_taken = cut(&store_rows, max);
    let store_drained = store_taken == store_rows.len();
    let room = if store_drained { max.saturating_sub(store_taken) } else { 0 };
    let chain_taken = chain_rows.len().min(room);
    let more = !store_drained || chain_rows.len() > chain_taken;
    let chain_drained = store_drained && room > 0 && chain_rows.len() == chain_taken;
    let store_part = &store_rows[..store_taken];
    let chain_part = &chain_rows[..chain_taken];
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
            PulledRow::Escrow(e) => rows.escrow.push(e.clone()),
            PulledRow::Order(h) => rows.orders.push(h.clone()),
        }
    }
    rows.stock = Rows::group_slots(slots);
    Page { rows, next_cursor, more }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::CatalogField;

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
        let two = [pulled(21, "A"), pulled(22, "B")];
        assert_eq!(chain_read_limit(&two, 2), Some(1), "a full page still asks whether the chain has more");
        assert_eq!(chain_read_limit(&[pulled(21, "A"), pulled(22, "B"), pulled(23, "E")], 2), None);
        assert_eq!(chain_read_limit(&two, 5), Some(4));
    }

    fn order_header(order: &str, lines: &[(&str, u64)]) -> OrderHeader {
        let id = shared::OrderId::new(order).unwrap();
        OrderHeader {
            pickup_code_digest: shared::orders::pickup_code_digest(&id, "123456"),
            order: id,
            store: StoreId::new("s1").unwrap(),
            customer_ref: "c".into(),
            created_at_ms: 1,
            expires_at_ms: 2,
            lines: lines.iter().map(|(k, u)| shared::OrderLine { sku: Sku::new(*k).unwrap(), units: *u }).collect(),
        }
    }

    #[test]
    fn a_page_never_ends_inside_a_version() {
        let at = |v, sku: &str| Pulled { version: v, row: PulledRow::Slot(row(sku, v, 0)) };
        // Version 2 is an order: its header and two reservations.
        let rows = vec![at(1, "A"), at(2, "H"), at(2, "R1"), at(2, "R2"), at(3, "B")];
        assert_eq!(cut(&rows, 1), 1);
        assert_eq!(cut(&rows, 2), 1, "back to before the order");
        assert_eq!(cut(&rows, 3), 1);
        assert_eq!(cut(&rows, 4), 4, "the whole order");
        assert_eq!(cut(&rows, 9), 5);
        assert_eq!(cut(&rows[1..], 1), 3, "an order alone larger than a page goes whole");
        assert_eq!(cut(&rows, 0), 1, "a page of 0 is a page of 1");
        let heads = Cursor { chain: 0, store: 3 };
        let p = page(Cursor { chain: 0, store: 1 }, rows[1..].to_vec(), vec![], 2, heads);
        assert_eq!((p.rows.len(), p.next_cursor.store, p.more), (3, 2, true));
        assert!(store_read_limit(1) > MAX_VERSION_ROWS, "a read always finishes the version it ends in");
    }

    #[test]
    fn escrow_rows_merge_by_the_shared_rules_and_unchanged_rows_stay() {
        let key = EscrowKey { store: StoreId::new("s1").unwrap(), sku: Sku::new("A").unwrap() };
        let o = shared::OrderId::new("W1").unwrap();
        let granted = |g| EscrowRow::Granted { key: key.clone(), granted: g };
        let fulfilled = EscrowRow::Fulfilled { key: key.clone(), order: o.clone() };
        let current = vec![granted(5), fulfilled.clone()];
        assert!(merge_escrow(current.clone(), &[granted(4), fulfilled.clone()]).unwrap().is_empty());
        assert_eq!(merge_escrow(current, &[granted(7), granted(6)]).unwrap(), vec![granted(7)]);
        assert_eq!(merge_escrow(vec![], std::slice::from_ref(&fulfilled)).unwrap(), vec![fulfilled]);
    }

    /// The bases of `header`'s lines from a whole escrow per SKU, as storage would read them.
    fn bases_from(header: &OrderHeader, escrows: &BTreeMap<Sku, Escrow>) -> BTreeMap<Sku, ReserveBasis> {
        let wanted: BTreeSet<EscrowId> = reserve_ids(header).into_iter().collect();
        let rows = escrows.values().flat_map(Escrow::rows).filter(|r| wanted.contains(&EscrowId::of(r))).collect();
        let totals = escrows
            .iter()
            .map(|(sku, e)| (sku.clone(), e.totals().reserved, e.orders().iter().map(|o| o.seq).max().unwrap_or(0)))
            .collect();
        reserve_bases(header, rows, totals).unwrap()
    }

    #[test]
    fn an_order_reserves_all_lines_or_names_every_short_one() {
        let header = order_header("W1", &[("A", 2), ("B", 3), ("C", 1)]);
        let store = Side::Store(header.store.clone());
        let key = |k: &str| EscrowKey { store: header.store.clone(), sku: Sku::new(k).unwrap() };
        let granted = |k: &str, g| EscrowRow::Granted { key: key(k), granted: g };
        let escrows = escrows_of(&header, vec![granted("A", 5), granted("B", 1)]).unwrap();
        let short = reserve_order(&bases_from(&header, &escrows), &header).unwrap().unwrap_err();
        let named: Vec<(&str, u64, u64)> = short.iter().map(|s| (s.sku.as_str(), s.wanted, s.available)).collect();
        assert_eq!(named, [("B", 3, 1), ("C", 1, 0)]);
        let escrows = escrows_of(&header, vec![granted("A", 5), granted("B", 3), granted("C", 1)]).unwrap();
        let reserved = reserve_order(&bases_from(&header, &escrows), &header).unwrap().unwrap();
        let rows = reserved.rows;
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| matches!(r, EscrowRow::Reservation { cancelled: false, seq: 1, .. })));
        let sku = |k: &str| Sku::new(k).unwrap();
        assert_eq!(reserved.totals, vec![(sku("A"), 2, 1), (sku("B"), 3, 1), (sku("C"), 1, 1)]);

        // Cancelled once, from the order's own rows alone; again changes nothing; a handover
        // known to the cloud refuses it.
        let mut stored = rows.clone();
        stored.extend([granted("A", 5), granted("B", 3), granted("C", 1)]);
        let own = |rows: &[EscrowRow]| -> Vec<EscrowRow> {
            let ids = order_row_ids(&header);
            rows.iter().filter(|r| ids.contains(&EscrowId::of(r))).cloned().collect()
        };
        let escrows = escrows_of(&header, own(&stored)).unwrap();
        let cancelled = cancel_order(&escrows, &header).unwrap().unwrap();
        assert_eq!(cancelled.len(), 3);
        let escrows = escrows_of(&header, own(&[stored.clone(), cancelled].concat())).unwrap();
        assert!(cancel_order(&escrows, &header).unwrap().unwrap().is_empty());
        let mut handed = escrows_of(&header, own(&stored)).unwrap();
        handed.get_mut(&sku("B")).unwrap().fulfil(&store, &header.order).unwrap();
        let skus = cancel_order(&handed, &header).unwrap().unwrap_err();
        assert_eq!(skus, vec![sku("B")]);
    }

    #[test]
    fn a_missing_basis_or_escrow_is_a_broken_invariant_not_a_retry() {
        let header = order_header("W1", &[("A", 1)]);
        let err = reserve_order(&BTreeMap::new(), &header).unwrap_err();
        assert!(matches!(&err, StorageError::Invariant(m) if m.contains("A of order W1")), "{err}");
        let err = cancel_order(&BTreeMap::new(), &header).unwrap_err();
        assert!(matches!(err, StorageError::Invariant(_)), "{err}");
        let other = EscrowRow::Granted {
            key: EscrowKey { store: header.store.clone(), sku: Sku::new("Z").unwrap() },
            granted: 1,
        };
        assert!(matches!(reserve_bases(&header, vec![other], vec![]), Err(StorageError::Invariant(_))));
        let err = Versions::default().next("store:s1").unwrap_err();
        assert!(matches!(err, StorageError::Invariant(_)), "{err}");
    }

    /// A small deterministic generator (xorshift), so the law below is checked on many
    /// histories without a property-testing dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// The cloud's check from totals answers exactly as `Escrow::reserve` on the whole key:
    /// the same row and seq, the same refusals with the same numbers, on random histories of
    /// grants, releases, reservations, cancellations and handovers, near the storable maximum too.
    #[test]
    fn reserving_from_totals_agrees_with_the_whole_escrow() {
        let key = EscrowKey { store: StoreId::new("s1").unwrap(), sku: Sku::new("A").unwrap() };
        let store = Side::Store(key.store.clone());
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..2_000 {
            let mut escrow = Escrow::new(key.clone());
            let big = round % 10 == 0;
            let scale = |rng: &mut Rng| if big { Escrow::MAX - rng.below(8) } else { 1 + rng.below(6) };
            let first = scale(&mut rng);
            escrow.merge_rows(&[EscrowRow::Granted { key: key.clone(), granted: first }]).unwrap();
            for step in 0..rng.below(12) {
                let order = OrderId::new(format!("o{}", rng.below(6))).unwrap();
                let _ = match rng.below(5) {
                    0 => escrow
                        .merge_rows(&[EscrowRow::Granted {
                            key: key.clone(),
                            granted: escrow.totals().granted.saturating_add(rng.below(4)).min(Escrow::MAX),
                        }])
                        .map(|_| ()),
                    1 => escrow.release(&Side::Cloud, 1 + rng.below(2)).map(|_| ()),
                    2 => escrow.cancel(&Side::Cloud, &order).map(|_| ()),
                    3 => escrow.fulfil(&store, &order).map(|_| ()),
                    _ => escrow.reserve(&Side::Cloud, order, 1 + rng.below(4) + step % 2).map(|_| ()),
                };
            }
            let order = OrderId::new(format!("o{}", rng.below(8))).unwrap();
            let units = match rng.below(10) {
                0 => 0,
                1 => Escrow::MAX,
                _ => scale(&mut rng),
            };
            let view = escrow.order(&order);
            let basis = ReserveBasis {
                granted: escrow.totals().granted,
                released: escrow.totals().released,
                reserved: escrow.totals().reserved,
                last_seq: escrow.orders().iter().map(|o| o.seq).max().unwrap_or(0),
                existing: view.map(|o| {
                    let cancelled =
                        matches!(o.status, shared::OrderStatus::Cancelled | shared::OrderStatus::CancelledButFulfilled);
                    (o.units, o.seq, cancelled)
                }),
            };
            let ours = reserve_on(&key, &basis, &order, units);
            let theirs = escrow.reserve(&Side::Cloud, order, units).map(|a| (a.row, a.changed));
            assert_eq!(ours, theirs, "round {round}: {basis:?}");
        }
    }

    #[test]
    fn a_retried_order_is_the_same_order_whatever_its_line_order() {
        let a = order_header("W1", &[("A", 2), ("B", 3)]);
        let mut b = order_header("W1", &[("B", 3), ("A", 2)]);
        b.created_at_ms = 50;
        assert!(same_order(&a, &b));
        let c = order_header("W1", &[("A", 2), ("B", 4)]);
        assert!(!same_order(&a, &c));
        let mut d = a.clone();
        d.customer_ref = "other".into();
        assert!(!same_order(&a, &d));
    }
}
