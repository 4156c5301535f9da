//! The two kinds of replica of the convergence simulation, a store hub and the cloud, built on
//! the `shared` crate's own state types (`StockState`, `PriceBook`, `CatalogItem`, `Hlc`,
//! `EscrowState`, `OrderHeader`) and speaking the real sync messages (`SyncRequest`,
//! `SyncResponse`, checked by `check_push`, carried by `shared::wire`), so the simulation tests
//! the library rather than a copy of it.
//!
//! Written here is only what the library leaves to its callers: the cloud's per-partition
//! version index and the store's outbox of its own changes (SQL tables in cloud-sync and
//! edge-agent), the paging of pushes and pulls over them, and the order-level rules around the
//! per-line escrow: the cloud reserves and cancels a whole order or none of it, a page carries an
//! order's header with all its lines, and the store hands over a whole order or none of it.

// The model returns the library's own `EscrowError` by value, as the library's API does (clippy
// exempts exported APIs from this lint, not a test crate's).
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::online::{line_keys, reservation, EscrowRowId, Handover, HandoverRefusal, OrderRefused};
use shared::escrow::{Applied, EscrowError, OrderStatus, OrderView};
use shared::sync::{self, check_push, Cursor, Push, PushRefusal, Rows, SyncRequest, SyncResponse, MAX_PAGE_ROWS};
use shared::wire::{self, WireError};
use shared::{
    effective_price, ActorId, CatalogField, CatalogItem, CatalogUpdate, EscrowKey, EscrowOp, EscrowRow, EscrowState,
    Hlc, HlcStamp, OrderHeader, OrderId, PriceBook, PriceEntry, PriceKey, PriceScope, PriceSlot, PriceValue, Side,
    SkewError, Sku, SlotKey, SlotRow, StockState, StoreId,
};

/// Every clock's skew fence: remote stamps further ahead of local wall time are refused.
pub const MAX_SKEW_MS: u64 = 2_000;

/// A row of replicated state, as the version indexes name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RowKey {
    Slot(SlotKey),
    Price(PriceKey),
    Catalog(Sku, &'static str),
    /// A store-owned (granted, fulfilled) or cloud-owned (released) allocation row.
    Escrow(EscrowRowId),
    /// An online order: its header and every line's reservation row under one version, so a
    /// page never carries a line without its order nor an order without all its lines.
    Order(OrderId),
}

/// Rows with the version at which each last changed, so "rows changed since V" is a range scan
/// in version order (the `version` column of the real tables).
#[derive(Debug, Default, Clone)]
pub struct VersionIndex {
    head: u64,
    by_version: BTreeMap<u64, RowKey>,
    version_of: HashMap<RowKey, u64>,
}

impl VersionIndex {
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The row changed: it takes the next version.
    pub fn touch(&mut self, key: RowKey) {
        self.head += 1;
        if let Some(old) = self.version_of.insert(key.clone(), self.head) {
            self.by_version.remove(&old);
        }
        self.by_version.insert(self.head, key);
    }

    /// Versions continue above `to` (a rebuilt store whose cloud holds more than it issued).
    pub fn raise_head(&mut self, to: u64) {
        self.head = self.head.max(to);
    }

    /// Rows whose latest change is above `version`, in version order.
    pub fn after(&self, version: u64) -> impl Iterator<Item = (u64, &RowKey)> + '_ {
        self.by_version.range(version.saturating_add(1)..).map(|(v, k)| (*v, k))
    }
}

/// The catalog field registers of an item, as the rows that carry them.
pub fn catalog_rows(item: &CatalogItem) -> Vec<CatalogUpdate> {
    let mut out = Vec::new();
    let mut row = |field: CatalogField, stamp: &HlcStamp| {
        out.push(CatalogUpdate { sku: item.sku.clone(), field, stamp: stamp.clone() });
    };
    if let Some(r) = &item.name {
        row(CatalogField::Name(r.value.clone()), &r.stamp);
    }
    if let Some(r) = &item.gtins {
        row(CatalogField::Gtins(r.value.clone()), &r.stamp);
    }
    if let Some(r) = &item.unit {
        row(CatalogField::Unit(r.value), &r.stamp);
    }
    if let Some(r) = &item.tax_class {
        row(CatalogField::TaxClass(r.value.clone()), &r.stamp);
    }
    if let Some(r) = &item.discontinued {
        row(CatalogField::Discontinued(r.value), &r.stamp);
    }
    out
}

fn catalog_row(catalog: &BTreeMap<Sku, CatalogItem>, sku: &Sku, field: &str) -> Option<CatalogUpdate> {
    catalog.get(sku).and_then(|item| catalog_rows(item).into_iter().find(|u| u.field.name() == field))
}

fn merge_catalog(catalog: &mut BTreeMap<Sku, CatalogItem>, update: &CatalogUpdate) -> bool {
    catalog.entry(update.sku.clone()).or_insert_with(|| CatalogItem::new(update.sku.clone())).merge(update)
}

/// What one replica holds of one store, in a canonical order, for byte comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    pub slots: Vec<SlotRow>,
    pub prices: Vec<PriceEntry>,
    pub catalog: Vec<CatalogUpdate>,
    /// The store's online allocation rows, every kind and owner.
    pub escrow: Vec<EscrowRow>,
    /// The headers of the store's online orders.
    pub orders: Vec<OrderHeader>,
}

impl Projection {
    fn canonical(mut self) -> Projection {
        self.slots.sort();
        self.prices.sort();
        self.catalog.sort();
        self.escrow.sort();
        self.orders.sort();
        self
    }

    /// The projection encoded in its canonical order through the sync wire envelope.
    pub fn bytes(&self) -> Vec<u8> {
        wire::encode(&(&self.slots, &self.prices, &self.catalog, &self.escrow, &self.orders))
            .expect("a projection encodes")
    }

    /// A short description of how two projections differ, for a failure message.
    pub fn diff(&self, other: &Projection) -> String {
        fn side<T: Ord + std::fmt::Debug>(what: &str, a: &[T], b: &[T]) -> Vec<String> {
            let a: BTreeSet<&T> = a.iter().collect();
            let b: BTreeSet<&T> = b.iter().collect();
            let only_a = a.difference(&b).take(5).map(|r| format!("  {what} only left: {r:?}"));
            let only_b = b.difference(&a).take(5).map(|r| format!("  {what} only right: {r:?}"));
            only_a.chain(only_b).collect()
        }
        let mut lines = side("slot", &self.slots, &other.slots);
        lines.extend(side("price", &self.prices, &other.prices));
        lines.extend(side("catalog", &self.catalog, &other.catalog));
        lines.extend(side("escrow", &self.escrow, &other.escrow));
        lines.extend(side("order", &self.orders, &other.orders));
        lines.join("\n")
    }
}

/// An HLC that checks, on every stamp it issues, that it never went backwards (DESIGN 13.3),
/// across reboots with a dead RTC too.
#[derive(Debug, Clone)]
pub struct Clock {
    pub hlc: Hlc,
    last: Option<HlcStamp>,
    pub jumps: u64,
}

impl Clock {
    pub fn new(actor: ActorId) -> Clock {
        Clock { hlc: Hlc::new(actor, MAX_SKEW_MS), last: None, jumps: 0 }
    }

    pub fn stamp(&mut self, now_ms: u64) -> HlcStamp {
        let (stamp, jump) = self.hlc.stamp(now_ms);
        self.jumps += u64::from(jump.is_some());
        if let Some(last) = &self.last {
            assert!(stamp > *last, "HLC of {} went backwards: {last} then {stamp}", self.hlc.actor());
        }
        self.last = Some(stamp.clone());
        stamp
    }

    /// A restart: the clock resumes from its persisted last stamp.
    pub fn reboot(&mut self) {
        let (wall_ms, logical) = self.hlc.last();
        self.hlc = Hlc::resume(self.hlc.actor().clone(), self.hlc.max_skew_ms(), wall_ms, logical);
    }
}

/// Why the cloud answered a request with an error instead of a response.
#[derive(Debug)]
pub enum Refused {
    Wire(WireError),
    UnknownStore(StoreId),
    Push(Box<PushRefusal>),
    Skew(SkewError),
    /// Allocation rows that do not merge (an order id reused, a count out of range).
    Escrow(EscrowError),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Wire(e) => write!(f, "unreadable request: {e}"),
            Refused::UnknownStore(s) => write!(f, "unknown store {s}"),
            Refused::Push(e) => write!(f, "push refused: {e}"),
            Refused::Skew(e) => write!(f, "skew fence: {e}"),
            Refused::Escrow(e) => write!(f, "allocation rows refused: {e}"),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct CloudStats {
    pub requests: u64,
    pub refused_ownership: u64,
    pub refused_skew: u64,
    pub pages_with_more: u64,
    pub own_slots_skipped: u64,
    pub own_escrow_skipped: u64,
    /// Pages that carried one whole order although it was larger than the rows asked for.
    pub oversized_order_pages: u64,
}

struct StorePart {
    index: VersionIndex,
    stock: StockState,
    prices: PriceBook,
    /// The store's online allocation rows, every owner.
    escrow: EscrowState,
    orders: BTreeMap<OrderId, OrderHeader>,
    /// Keys changed since the simulation last checked them.
    dirty: BTreeSet<EscrowKey>,
    acked: u64,
}

/// The cloud: every store's partition and the chain partition, each with its own versions.
pub struct Cloud {
    pub clock: Clock,
    ids: BTreeMap<StoreId, usize>,
    stores: Vec<StoreId>,
    /// Chain prices and the catalog.
    chain: VersionIndex,
    chain_prices: PriceBook,
    catalog: BTreeMap<Sku, CatalogItem>,
    /// Per store: its stock slots (every actor) and its store-scope prices.
    parts: Vec<StorePart>,
    /// Orders not known to be over, by expiry: (expires at, store, order).
    expiry: BTreeSet<(i64, usize, OrderId)>,
    pub stats: CloudStats,
}

impl Cloud {
    pub fn new(stores: &[StoreId]) -> Cloud {
        Cloud {
            clock: Clock::new(ActorId::cloud()),
            ids: stores.iter().enumerate().map(|(i, s)| (s.clone(), i)).collect(),
            stores: stores.to_vec(),
            chain: VersionIndex::default(),
            chain_prices: PriceBook::new(),
            catalog: BTreeMap::new(),
            parts: stores
                .iter()
                .map(|_| StorePart {
                    index: VersionIndex::default(),
                    stock: StockState::new(),
                    prices: PriceBook::new(),
                    escrow: EscrowState::new(),
                    orders: BTreeMap::new(),
                    dirty: BTreeSet::new(),
                    acked: 0,
                })
                .collect(),
            expiry: BTreeSet::new(),
            stats: CloudStats::default(),
        }
    }

    pub fn acked(&self, store: usize) -> u64 {
        self.parts[store].acked
    }

    /// Every partition's head and every acknowledged version: unchanged by a refused request.
    pub fn fingerprint(&self) -> Vec<u64> {
        let mut out = vec![self.chain.head()];
        out.extend(self.parts.iter().flat_map(|p| [p.index.head(), p.acked]));
        out
    }

    /// One `POST /v1/stores/{path}/sync`: all of the request or nothing of it.
    pub fn handle(&mut self, path: &StoreId, body: &[u8], now_ms: u64) -> Result<Vec<u8>, Refused> {
        self.stats.requests += 1;
        let request: SyncRequest = wire::decode(body).map_err(Refused::Wire)?;
        let idx = *self.ids.get(path).ok_or_else(|| Refused::UnknownStore(path.clone()))?;
        if let Err(refusal) = check_push(path, &request) {
            self.stats.refused_ownership += u64::from(refusal.is_ownership());
            return Err(Refused::Push(Box::new(refusal)));
        }
        for stamp in sync::stamps(&request) {
            if let Err(e) = self.clock.hlc.check_skew(stamp, now_ms) {
                self.stats.refused_skew += 1;
                return Err(Refused::Skew(e));
            }
        }
        if let Some(push) = &request.push {
            // Allocation rows merge first and all or nothing: a refusal leaves the cloud as it was.
            self.merge_push(idx, push).map_err(Refused::Escrow)?;
            let part = &mut self.parts[idx];
            if push.from_version <= part.acked {
                part.acked = part.acked.max(push.to_version);
            }
        }
        if let Some(latest) = sync::stamps(&request).max() {
            self.clock.hlc.observe(latest, now_ms).expect("every stamp passed the fence above");
        }
        // The sending ledger's actor (`check_push` made sure it is one of the store's).
        let leave_out = (!request.include_own_slots).then_some(&request.sent_at.actor);
        let (rows, next_cursor, more) = self.page(idx, request.cursor, request.max_rows, leave_out);
        self.stats.pages_with_more += u64::from(more);
        let response = SyncResponse {
            cloud_time: self.clock.stamp(now_ms),
            acked_version: self.parts[idx].acked,
            rows,
            next_cursor,
            more,
        };
        Ok(wire::encode(&response).expect("a response encodes"))
    }

    fn merge_push(&mut self, idx: usize, push: &Push) -> Result<(), EscrowError> {
        let part = &mut self.parts[idx];
        for row in part.escrow.merge(&push.rows.escrow)? {
            let id = EscrowRowId::of(&row).filter(EscrowRowId::store_owned);
            let id = id.unwrap_or_else(|| panic!("check_push let a store change a cloud row: {row:?}"));
            if let EscrowRowId::Fulfilled(_, order) = &id {
                assert!(
                    part.orders.contains_key(order),
                    "store {} handed over order {order}, never placed",
                    self.stores[idx]
                );
            }
            part.dirty.insert(id.key().clone());
            part.index.touch(RowKey::Escrow(id));
        }
        let slots: Vec<SlotRow> = push.rows.slot_rows().collect();
        for row in &slots {
            row.validate().expect("check_push bounds every count");
        }
        for changed in part.stock.merge(&slots) {
            part.index.touch(RowKey::Slot(changed.key));
        }
        for price in &push.rows.prices {
            if part.prices.merge(price) {
                part.index.touch(RowKey::Price(price.key.clone()));
            }
        }
        for update in &push.rows.catalog {
            if merge_catalog(&mut self.catalog, update) {
                self.chain.touch(RowKey::Catalog(update.sku.clone(), update.field.name()));
            }
        }
        Ok(())
    }

    /// The rows of `store` beyond `cursor`: the chain partition first, then the store's own,
    /// each in version order. The sending ledger's own rows (the slots of `leave_out`, the
    /// store's granted and fulfilled rows) are left out unless the request asks for them
    /// (`SyncRequest::include_own_slots`); skipped rows still move the cursor. An order travels whole (its header and every line's
    /// reservation): it ends the page if it does not fit, unless the page is empty, and then it
    /// is sent alone above the rows asked for (at most `MAX_ORDER_LINES + 1` rows, far below
    /// `MAX_PAGE_ROWS`), so every order can be pulled.
    fn page(&mut self, idx: usize, cursor: Cursor, max_rows: u32, leave_out: Option<&ActorId>) -> (Rows, Cursor, bool) {
        let limit = max_rows.clamp(1, MAX_PAGE_ROWS) as usize;
        let with_own = leave_out.is_none();
        let mut rows = Rows::default();
        let mut slots = Vec::new();
        let mut taken = 0;
        let mut next = cursor;
        let mut more = false;
        for (version, key) in self.chain.after(cursor.chain) {
            if taken == limit {
                more = true;
                break;
            }
            match key {
                RowKey::Price(k) => rows.prices.push(self.chain_prices.get(k).expect("indexed price").clone()),
                RowKey::Catalog(sku, field) => {
                    rows.catalog.push(catalog_row(&self.catalog, sku, field).expect("indexed catalog field"))
                }
                other => panic!("{other:?} in the chain partition"),
            }
            taken += 1;
            next.chain = version;
        }
        if !more {
            next.chain = next.chain.max(self.chain.head());
            let part = &self.parts[idx];
            for (version, key) in part.index.after(cursor.store) {
                let skip = match key {
                    RowKey::Slot(k) if leave_out == Some(&k.actor) => Some(&mut self.stats.own_slots_skipped),
                    RowKey::Escrow(id) if !with_own && id.store_owned() => Some(&mut self.stats.own_escrow_skipped),
                    _ => None,
                };
                if let Some(counter) = skip {
                    *counter += 1;
                    next.store = version;
                    continue;
                }
                let cost = match key {
                    RowKey::Order(order) => 1 + part.orders.get(order).expect("indexed order").lines.len(),
                    _ => 1,
                };
                if taken > 0 && taken + cost > limit {
                    more = true;
                    break;
                }
                self.stats.oversized_order_pages += u64::from(cost > limit);
                match key {
                    RowKey::Slot(k) => slots.push(SlotRow { key: k.clone(), slot: part.stock.slot(k) }),
                    RowKey::Price(k) => rows.prices.push(part.prices.get(k).expect("indexed price").clone()),
                    RowKey::Escrow(id) => rows.escrow.push(id.find(&part.escrow).expect("indexed allocation row")),
                    RowKey::Order(order) => {
                        let header = part.orders.get(order).expect("indexed order");
                        for line in &header.lines {
                            let key = EscrowKey { store: header.store.clone(), sku: line.sku.clone() };
                            let row = reservation(&part.escrow, &key, order);
                            rows.escrow.push(row.expect("every line of a placed order is reserved"));
                        }
                        rows.orders.push(header.clone());
                    }
                    RowKey::Catalog(..) => panic!("catalog row in a store partition"),
                }
                taken += cost;
                next.store = version;
            }
            if !more {
                next.store = next.store.max(part.index.head());
            }
        }
        rows.stock = Rows::group_slots(slots);
        (rows, next, more)
    }

    /// A movement of the cloud actor's slot (a transfer leg, an HQ correction).
    pub fn move_stock(&mut self, store: usize, sku: &Sku, movement: i64) {
        let key = SlotKey { store: self.stores[store].clone(), sku: sku.clone(), actor: ActorId::cloud() };
        let part = &mut self.parts[store];
        part.stock.apply_local(key.clone(), movement).expect("no slot overflows in the simulation");
        if movement != 0 {
            part.index.touch(RowKey::Slot(key));
        }
    }

    /// HQ places an online order: every line reserved against the online channel's rights at
    /// the store, or none (each line is tried on a copy first). Placing the same order again is
    /// harmless (`Ok(false)`). Its header and reservations share one version.
    pub fn reserve_order(&mut self, header: OrderHeader) -> Result<bool, OrderRefused> {
        header.validate().map_err(OrderRefused::Header)?;
        let idx = self.ids[&header.store];
        let part = &mut self.parts[idx];
        if let Some(held) = part.orders.get(&header.order) {
            held.check_same(&header).map_err(OrderRefused::Header)?;
            return Ok(false);
        }
        let keys = line_keys(&header);
        for (key, line) in keys.iter().zip(&header.lines) {
            let mut copy = part.escrow.escrow(key);
            copy.reserve(&Side::Cloud, header.order.clone(), line.units).map_err(OrderRefused::Allocation)?;
        }
        for (key, line) in keys.into_iter().zip(&header.lines) {
            let op = EscrowOp::Reserve { order: header.order.clone(), units: line.units };
            let applied = part.escrow.apply(&Side::Cloud, &key, op).expect("a line that reserves on a copy reserves");
            assert!(applied.changed, "order {}: a new order's line was already reserved", header.order);
            part.dirty.insert(key);
        }
        part.index.touch(RowKey::Order(header.order.clone()));
        self.expiry.insert((header.expires_at_ms, idx, header.order.clone()));
        part.orders.insert(header.order.clone(), header);
        Ok(true)
    }

    /// HQ cancels a whole order, or none of it: refused with `AlreadyFulfilled` when the cloud
    /// knows a line was handed over (a store's push may carry some of an order's handovers
    /// before the rest). `Ok(false)` if it was cancelled before.
    pub fn cancel_order(&mut self, store: usize, order: &OrderId) -> Result<bool, EscrowError> {
        let part = &mut self.parts[store];
        let header = part.orders.get(order).unwrap_or_else(|| panic!("HQ cancels order {order}, never placed"));
        let keys = line_keys(header);
        for key in &keys {
            part.escrow.escrow(key).cancel(&Side::Cloud, order)?;
        }
        let mut changed = false;
        for key in keys {
            let op = EscrowOp::Cancel { order: order.clone() };
            let applied = part.escrow.apply(&Side::Cloud, &key, op).expect("a line that cancels on a copy cancels");
            changed |= applied.changed;
            part.dirty.insert(key);
        }
        if changed {
            part.index.touch(RowKey::Order(order.clone()));
        }
        Ok(changed)
    }

    /// HQ's expiry sweep: every order whose pickup time is over at `now_ms` (the cloud's clock)
    /// is cancelled as expired, unless the cloud knows it was handed over. Returns each order
    /// looked at with what `cancel_order` said.
    pub fn expire(&mut self, now_ms: i64) -> Vec<(usize, OrderId, Result<bool, EscrowError>)> {
        let mut out = Vec::new();
        while self.expiry.first().is_some_and(|(at, _, _)| *at <= now_ms) {
            let Some((_, store, order)) = self.expiry.pop_first() else { break };
            let outcome = self.cancel_order(store, &order);
            out.push((store, order, outcome));
        }
        out
    }

    /// HQ lowers a store's online allocation: unreserved rights go back to the store.
    pub fn release(&mut self, store: usize, sku: &Sku, units: u64) -> Result<Applied, EscrowError> {
        let key = EscrowKey { store: self.stores[store].clone(), sku: sku.clone() };
        let part = &mut self.parts[store];
        let applied = part.escrow.apply(&Side::Cloud, &key, EscrowOp::Release { units })?;
        part.index.touch(RowKey::Escrow(EscrowRowId::Released(key.clone())));
        part.dirty.insert(key);
        Ok(applied)
    }

    pub fn escrow(&self, store: usize) -> &EscrowState {
        &self.parts[store].escrow
    }

    pub fn order(&self, store: usize, order: &OrderId) -> Option<&OrderHeader> {
        self.parts[store].orders.get(order)
    }

    /// Allocation keys of `store` changed since the last call.
    pub fn take_dirty(&mut self, store: usize) -> BTreeSet<EscrowKey> {
        std::mem::take(&mut self.parts[store].dirty)
    }

    /// An HQ price write, stamped by the cloud's clock.
    pub fn write_price(&mut self, key: PriceKey, value: Option<PriceValue>, now_ms: u64) -> PriceEntry {
        let entry = PriceEntry { key, value, stamp: self.clock.stamp(now_ms) };
        entry.validate().expect("the simulation writes valid prices");
        let (book, index) = match &entry.key.scope {
            PriceScope::Chain => (&mut self.chain_prices, &mut self.chain),
            PriceScope::Store(s) => {
                let part = &mut self.parts[self.ids[s]];
                (&mut part.prices, &mut part.index)
            }
        };
        // The cloud's clock has observed every stamp it merged, so its own write always wins.
        assert!(book.merge(&entry), "HQ write {:?} lost in the cloud's own register", entry.stamp);
        index.touch(RowKey::Price(entry.key.clone()));
        entry
    }

    /// An HQ catalog field write, stamped by the cloud's clock.
    pub fn write_catalog(&mut self, sku: &Sku, field: CatalogField, now_ms: u64) -> CatalogUpdate {
        let update = CatalogUpdate { sku: sku.clone(), field, stamp: self.clock.stamp(now_ms) };
        assert!(merge_catalog(&mut self.catalog, &update), "HQ write {:?} lost in the cloud", update.stamp);
        self.chain.touch(RowKey::Catalog(sku.clone(), update.field.name()));
        update
    }

    pub fn price(&self, key: &PriceKey) -> Option<&PriceEntry> {
        match &key.scope {
            PriceScope::Chain => self.chain_prices.get(key),
            PriceScope::Store(s) => self.parts[self.ids[s]].prices.get(key),
        }
    }

    pub fn price_registers(&self) -> usize {
        self.chain_prices.entries().count() + self.parts.iter().map(|p| p.prices.entries().count()).sum::<usize>()
    }

    pub fn catalog_field(&self, sku: &Sku, field: &str) -> Option<CatalogUpdate> {
        catalog_row(&self.catalog, sku, field)
    }

    pub fn catalog_registers(&self) -> usize {
        self.catalog.values().map(|item| catalog_rows(item).len()).sum()
    }

    /// The price a till of `store` charges at `at_ms`, resolved over the cloud's registers with
    /// the library's free function.
    pub fn effective_price(&self, store: usize, sku: &Sku, at_ms: u64) -> Option<PriceEntry> {
        let scopes = [PriceScope::Chain, PriceScope::Store(self.stores[store].clone())];
        let keys = scopes.into_iter().flat_map(|scope| {
            [PriceSlot::Regular, PriceSlot::Promotion].map(|slot| PriceKey {
                sku: sku.clone(),
                scope: scope.clone(),
                slot,
            })
        });
        let entries: Vec<&PriceEntry> = keys.filter_map(|k| self.price(&k)).collect();
        effective_price(entries, sku, &self.stores[store], at_ms).cloned()
    }

    /// Stock rows of one store, every actor.
    pub fn slots(&self, store: usize) -> Vec<SlotRow> {
        self.parts[store].stock.rows()
    }

    pub fn stock(&self, store: usize) -> &StockState {
        &self.parts[store].stock
    }

    /// Everything store `store` should hold.
    pub fn projection(&self, store: usize) -> Projection {
        let part = &self.parts[store];
        Projection {
            slots: part.stock.rows(),
            prices: self.chain_prices.entries().chain(part.prices.entries()).cloned().collect(),
            catalog: self.catalog.values().flat_map(catalog_rows).collect(),
            escrow: part.escrow.rows(),
            orders: part.orders.values().cloned().collect(),
        }
        .canonical()
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct StoreStats {
    pub truncated_pushes: u64,
    pub pages_with_more: u64,
    pub skew_refused: u64,
    pub superseded_own_writes: u64,
    pub acked_moved_back: u64,
}

/// A store hub: its own slots and the cloud's slots of this store, the chain's and its own
/// prices, the catalog, its online allocation and order headers; an outbox of its own changes
/// and its sync positions.
pub struct Store {
    pub id: StoreId,
    pub actor: ActorId,
    pub stock: StockState,
    pub prices: PriceBook,
    pub catalog: BTreeMap<Sku, CatalogItem>,
    /// The allocation rows of this store's keys, every owner.
    pub escrow: EscrowState,
    pub orders: BTreeMap<OrderId, OrderHeader>,
    /// Order ids in the order their headers arrived (for the simulation to pick from).
    pub order_ids: Vec<OrderId>,
    /// Allocation keys changed since the simulation last checked them.
    dirty: BTreeSet<EscrowKey>,
    pub clock: Clock,
    /// Own changes, by local change version: what a push carries.
    outbox: VersionIndex,
    /// The cloud holds every own change up to this version.
    pub pushed: u64,
    pub cursor: Cursor,
    /// Caught up with the cloud once: until then requests ask for the store's own slots.
    pub bootstrapped: bool,
    pub pull_rows: u32,
    pub push_rows: usize,
    pub stats: StoreStats,
}

impl Store {
    /// A store whose ledger writes as the store-wide actor (`store:{id}`).
    pub fn new(id: StoreId, pull_rows: u32, push_rows: usize) -> Store {
        let actor = ActorId::for_store(&id);
        Store::with_actor(id, actor, pull_rows, push_rows)
    }

    /// A store whose (new, empty) ledger writes as `actor`, as edge-agent's ledgers do since
    /// each has an actor of its own.
    pub fn with_actor(id: StoreId, actor: ActorId, pull_rows: u32, push_rows: usize) -> Store {
        Store {
            clock: Clock::new(actor.clone()),
            id,
            actor,
            stock: StockState::new(),
            prices: PriceBook::new(),
            catalog: BTreeMap::new(),
            escrow: EscrowState::new(),
            orders: BTreeMap::new(),
            order_ids: Vec::new(),
            dirty: BTreeSet::new(),
            outbox: VersionIndex::default(),
            pushed: 0,
            cursor: Cursor::default(),
            bootstrapped: false,
            pull_rows,
            push_rows,
            stats: StoreStats::default(),
        }
    }

    /// The latest local change version (own changes only).
    pub fn head(&self) -> u64 {
        self.outbox.head()
    }

    /// Own changes the cloud has not acknowledged.
    pub fn pending(&self) -> bool {
        self.pushed < self.outbox.head()
    }

    pub fn own_key(&self, sku: &Sku) -> SlotKey {
        SlotKey { store: self.id.clone(), sku: sku.clone(), actor: self.actor.clone() }
    }

    /// On-hand units as this replica sees them.
    pub fn value(&self, sku: &Sku) -> i128 {
        self.stock.value(&self.id, sku)
    }

    /// A sale, receipt or count movement in the store's own slot.
    pub fn move_stock(&mut self, sku: &Sku, movement: i64) {
        let key = self.own_key(sku);
        self.stock.apply_local(key.clone(), movement).expect("no slot overflows in the simulation");
        if movement != 0 {
            self.outbox.touch(RowKey::Slot(key));
        }
    }

    /// The allocation key of one of this store's SKUs.
    pub fn escrow_key(&self, sku: &Sku) -> EscrowKey {
        EscrowKey { store: self.id.clone(), sku: sku.clone() }
    }

    /// Grants `units` of `sku` to the online channel, keeping `safety_stock` back for walk-in
    /// customers: the library checks it against the free stock this replica sees.
    pub fn grant(&mut self, sku: &Sku, units: u64, safety_stock: u64) -> Result<Applied, EscrowError> {
        let key = self.escrow_key(sku);
        let op = EscrowOp::Grant { units, on_hand: self.value(sku), safety_stock };
        let applied = self.escrow.apply(&Side::Store(self.id.clone()), &key, op)?;
        self.outbox.touch(RowKey::Escrow(EscrowRowId::Granted(key.clone())));
        self.dirty.insert(key);
        Ok(applied)
    }

    /// Units promised online that the shelf no longer covers (DESIGN 5's shortage alert).
    pub fn at_risk(&self, sku: &Sku) -> u64 {
        self.escrow.get(&self.escrow_key(sku)).map_or(0, |e| e.at_risk(self.value(sku)))
    }

    /// The orders named by the shortage alert of `sku`.
    pub fn orders_at_risk(&self, sku: &Sku) -> Vec<OrderView> {
        self.escrow.get(&self.escrow_key(sku)).map_or_else(Vec::new, |e| e.orders_at_risk(self.value(sku)))
    }

    /// A customer presents `code` for `order` at the counter, at `now_ms` on the store's clock.
    /// The whole order is handed over or none of it: each line's handover and its stock
    /// movement out of the store's own slot are recorded in this one step.
    pub fn hand_over(&mut self, order: &OrderId, code: &str, now_ms: u64) -> Handover {
        let Some(header) = self.orders.get(order).cloned() else {
            return Handover::Refused(HandoverRefusal::UnknownOrder);
        };
        if !header.code_matches(code) {
            return Handover::Refused(HandoverRefusal::WrongCode);
        }
        let side = Side::Store(self.id.clone());
        let keys = line_keys(&header);
        let statuses: Vec<OrderStatus> = keys
            .iter()
            .zip(&header.lines)
            .map(|(key, line)| {
                let view = self.escrow.get(key).and_then(|e| e.order(order));
                let view = view.unwrap_or_else(|| panic!("store {}: order {order} without its line {key}", self.id));
                assert_eq!(view.units, line.units, "store {}: order {order} line {key} against its header", self.id);
                view.status
            })
            .collect();
        // The cloud cancels whole orders and pages them whole; the store hands over whole orders.
        assert!(statuses.windows(2).all(|w| w[0] == w[1]), "store {}: order {order} split: {statuses:?}", self.id);
        match statuses[0] {
            OrderStatus::Fulfilled | OrderStatus::CancelledButFulfilled => {
                for key in &keys {
                    let again = self.escrow.apply(&side, key, EscrowOp::Fulfil { order: order.clone() });
                    let again = again.unwrap_or_else(|e| panic!("store {}: a repeated handover refused: {e}", self.id));
                    assert_eq!((again.changed, again.stock_out), (false, 0), "a repeated handover moves nothing");
                }
                return Handover::Repeated;
            }
            OrderStatus::Cancelled => {
                let refused = self.escrow.apply(&side, &keys[0], EscrowOp::Fulfil { order: order.clone() });
                return match refused {
                    Err(e @ EscrowError::OrderCancelled { .. }) => Handover::Refused(HandoverRefusal::Cancelled(e)),
                    other => panic!("store {}: handover of cancelled order {order} gave {other:?}", self.id),
                };
            }
            OrderStatus::Reserved => {}
        }
        if header.is_expired(i64::try_from(now_ms).expect("simulated time fits i64")) {
            return Handover::Refused(HandoverRefusal::Expired);
        }
        if header.lines.iter().any(|line| self.orders_at_risk(&line.sku).iter().any(|o| o.order == *order)) {
            return Handover::Refused(HandoverRefusal::AtRisk);
        }
        let mut out = Vec::with_capacity(keys.len());
        for (key, line) in keys.into_iter().zip(&header.lines) {
            let applied = self.escrow.apply(&side, &key, EscrowOp::Fulfil { order: order.clone() });
            let applied = applied.unwrap_or_else(|e| panic!("store {}: handover of {order} refused: {e}", self.id));
            assert_eq!(
                (applied.changed, applied.stock_out),
                (true, line.units),
                "store {}: handover of {order}",
                self.id
            );
            let movement = i64::try_from(applied.stock_out).expect("order units fit a stock movement");
            self.move_stock(&line.sku, -movement);
            self.outbox.touch(RowKey::Escrow(EscrowRowId::Fulfilled(key.clone(), order.clone())));
            self.dirty.insert(key);
            out.push((line.sku.clone(), applied.stock_out));
        }
        Handover::Done(out)
    }

    /// Allocation keys changed since the last call.
    pub fn take_dirty(&mut self) -> BTreeSet<EscrowKey> {
        std::mem::take(&mut self.dirty)
    }

    /// A store-scope price set at the store, stamped by the store's clock.
    pub fn write_price(&mut self, key: PriceKey, value: Option<PriceValue>, now_ms: u64) -> PriceEntry {
        assert_eq!(key.scope, PriceScope::Store(self.id.clone()));
        let entry = PriceEntry { key, value, stamp: self.clock.stamp(now_ms) };
        entry.validate().expect("the simulation writes valid prices");
        if self.prices.merge(&entry) {
            self.outbox.touch(RowKey::Price(entry.key.clone()));
        } else {
            // Only when the store refused to adopt a cloud stamp (skew fence) it had merged.
            self.stats.superseded_own_writes += 1;
        }
        entry
    }

    pub fn write_catalog(&mut self, sku: &Sku, field: CatalogField, now_ms: u64) -> CatalogUpdate {
        let update = CatalogUpdate { sku: sku.clone(), field, stamp: self.clock.stamp(now_ms) };
        if merge_catalog(&mut self.catalog, &update) {
            self.outbox.touch(RowKey::Catalog(sku.clone(), update.field.name()));
        } else {
            self.stats.superseded_own_writes += 1;
        }
        update
    }

    /// The next request: a page of own changes since `pushed`, and the cursor.
    pub fn request(&mut self, now_ms: u64) -> SyncRequest {
        let push = self.pending().then(|| self.push_page());
        SyncRequest {
            store: self.id.clone(),
            sent_at: self.clock.stamp(now_ms),
            head_version: self.outbox.head(),
            push,
            cursor: self.cursor,
            max_rows: self.pull_rows,
            include_own_slots: !self.bootstrapped,
        }
    }

    /// At most `push_rows` rows, cut at a version so `(from, to]` holds exactly what is sent.
    /// A price or catalog register whose latest write is not the store's own (a newer HQ write
    /// merged over it) is left out: `check_push` would refuse the whole request for it, and the
    /// store's write lost to one the cloud already holds.
    fn push_page(&mut self) -> Push {
        let (mut slots, mut prices, mut catalog, mut escrow) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut to = self.outbox.head();
        let mut examined = self.pushed;
        let mut taken = 0;
        for (version, key) in self.outbox.after(self.pushed) {
            if taken == self.push_rows {
                to = examined;
                self.stats.truncated_pushes += 1;
                break;
            }
            examined = version;
            match key {
                RowKey::Slot(k) => {
                    slots.push(SlotRow { key: k.clone(), slot: self.stock.slot(k) });
                    taken += 1;
                }
                RowKey::Price(k) => {
                    let entry = self.prices.get(k).expect("an outbox price is in the book");
                    if entry.stamp.actor == self.actor {
                        prices.push(entry.clone());
                        taken += 1;
                    }
                }
                RowKey::Catalog(sku, field) => {
                    let update = catalog_row(&self.catalog, sku, field).expect("an outbox field is in the catalog");
                    if update.stamp.actor == self.actor {
                        catalog.push(update);
                        taken += 1;
                    }
                }
                RowKey::Escrow(id) => {
                    escrow.push(id.find(&self.escrow).expect("an outbox allocation row is in the state"));
                    taken += 1;
                }
                RowKey::Order(order) => panic!("order {order} in a store's outbox: only HQ places orders"),
            }
        }
        Push {
            from_version: self.pushed,
            to_version: to,
            rows: Rows { stock: Rows::group_slots(slots), prices, catalog, escrow, orders: Vec::new() },
        }
    }

    /// Merges a response's page and moves to the positions it names.
    pub fn apply(&mut self, response: &SyncResponse, now_ms: u64) {
        if self.clock.hlc.observe(&response.cloud_time, now_ms).is_err() {
            self.stats.skew_refused += 1;
        }
        let slots: Vec<SlotRow> = response.rows.slot_rows().collect();
        for row in &slots {
            assert_eq!(row.key.store, self.id, "the cloud sent store {} a slot of another store", self.id);
            row.validate().expect("the cloud sends storable counts");
        }
        let before = self.stock.version();
        let mut changed = self.stock.merge(&slots);
        let mut delta = self.stock.delta_since(before);
        changed.sort();
        delta.sort();
        assert_eq!(changed, delta, "merge reports exactly the rows delta_since sees changed");
        for price in &response.rows.prices {
            let ours =
                matches!(&price.key.scope, PriceScope::Chain) || price.key.scope == PriceScope::Store(self.id.clone());
            assert!(ours, "the cloud sent store {} a price of {}", self.id, price.key.scope);
            self.prices.merge(price);
        }
        for update in &response.rows.catalog {
            merge_catalog(&mut self.catalog, update);
        }
        self.merge_orders(&response.rows);
        self.stats.acked_moved_back += u64::from(response.acked_version < self.pushed);
        self.stats.pages_with_more += u64::from(response.more);
        if response.acked_version > self.outbox.head() {
            // As edge-agent does: the cloud holds versions this replica never issued (it was
            // rebuilt); adopting them would mark its next changes as pushed. Continue above.
            self.outbox.raise_head(response.acked_version);
        } else {
            self.pushed = response.acked_version;
        }
        self.bootstrapped |= !response.more;
        self.cursor = response.next_cursor;
    }

    /// Merges a page's allocation rows and order headers: every row of this store's keys, every
    /// reservation with its order's header, every header with all its lines.
    fn merge_orders(&mut self, rows: &Rows) {
        let id = &self.id;
        let in_page: BTreeSet<&OrderId> = rows.orders.iter().map(|h| &h.order).collect();
        for header in &rows.orders {
            assert_eq!(header.store, *id, "the cloud sent store {id} order {} of {}", header.order, header.store);
            header.validate().unwrap_or_else(|e| panic!("the cloud sent store {id} a bad header: {e}"));
        }
        for row in &rows.escrow {
            assert_eq!(row.key().store, *id, "the cloud sent store {id} an allocation row of {}", row.key());
            if let EscrowRow::Reservation { order, .. } = row {
                let known = in_page.contains(order) || self.orders.contains_key(order);
                assert!(known, "the cloud sent store {id} a line of order {order} without its header");
            }
        }
        let before = self.escrow.version();
        let changed = self.escrow.merge(&rows.escrow);
        let mut changed =
            changed.unwrap_or_else(|e| panic!("store {id}: the cloud's allocation rows do not merge: {e}"));
        let mut delta = self.escrow.delta_since(before);
        changed.sort();
        delta.sort();
        assert_eq!(changed, delta, "escrow merge reports exactly the rows delta_since sees changed");
        self.dirty.extend(changed.iter().map(|row| row.key().clone()));
        for header in &rows.orders {
            match self.orders.get(&header.order) {
                Some(held) => held.check_same(header).unwrap_or_else(|e| panic!("store {id}: {e}")),
                None => {
                    self.orders.insert(header.order.clone(), header.clone());
                    self.order_ids.push(header.order.clone());
                }
            }
            for key in line_keys(header) {
                let line = self.escrow.get(&key).and_then(|e| e.order(&header.order));
                assert!(line.is_some(), "store {id}: order {} arrived without its line {key}", header.order);
            }
        }
    }

    /// The outbox names exactly the store's own slots and own allocation rows (the states agree
    /// with the index).
    pub fn check_outbox(&self) {
        let in_state: BTreeSet<SlotKey> =
            self.stock.rows().into_iter().filter(|r| r.key.actor == self.actor).map(|r| r.key).collect();
        let in_outbox: BTreeSet<SlotKey> = self
            .outbox
            .after(0)
            .filter_map(|(_, k)| match k {
                RowKey::Slot(k) => Some(k.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(in_state, in_outbox, "store {}: outbox and own slots disagree", self.id);
        let own_rows: BTreeSet<EscrowRowId> =
            self.escrow.rows().iter().filter_map(EscrowRowId::of).filter(EscrowRowId::store_owned).collect();
        let in_outbox: BTreeSet<EscrowRowId> = self
            .outbox
            .after(0)
            .filter_map(|(_, k)| match k {
                RowKey::Escrow(id) => Some(id.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(own_rows, in_outbox, "store {}: outbox and own allocation rows disagree", self.id);
    }

    pub fn projection(&self) -> Projection {
        Projection {
            slots: self.stock.rows(),
            prices: self.prices.entries().cloned().collect(),
            catalog: self.catalog.values().flat_map(catalog_rows).collect(),
            escrow: self.escrow.rows(),
            orders: self.orders.values().cloned().collect(),
        }
        .canonical()
    }
}
