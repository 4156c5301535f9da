//! The two kinds of replica of the convergence simulation, a store hub and the cloud, built on
//! the `shared` crate's own state types (`StockState`, `PriceBook`, `CatalogItem`, `Hlc`) and
//! speaking the real sync messages (`SyncRequest`, `SyncResponse`, checked by `check_push`,
//! carried by `shared::wire`), so the simulation tests the library rather than a copy of it.
//!
//! Written here is only what the library leaves to its callers: the cloud's per-partition
//! version index and the store's outbox of its own changes (SQL tables in cloud-sync and
//! edge-agent), and the paging of pushes and pulls over them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use shared::sync::{self, check_push, Cursor, Push, PushRefusal, Rows, SyncRequest, SyncResponse, MAX_PAGE_ROWS};
use shared::wire::{self, WireError};
use shared::{
    effective_price, ActorId, CatalogField, CatalogItem, CatalogUpdate, Hlc, HlcStamp, PriceBook, PriceEntry, PriceKey,
    PriceScope, PriceSlot, PriceValue, SkewError, Sku, SlotKey, SlotRow, StockState, StoreId,
};

/// Every clock's skew fence: remote stamps further ahead of local wall time are refused.
pub const MAX_SKEW_MS: u64 = 2_000;

/// A row of replicated state, as the version indexes name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RowKey {
    Slot(SlotKey),
    Price(PriceKey),
    Catalog(Sku, &'static str),
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
}

impl Projection {
    fn canonical(mut self) -> Projection {
        self.slots.sort();
        self.prices.sort();
        self.catalog.sort();
        self
    }

    /// The projection encoded in its canonical order through the sync wire envelope.
    pub fn bytes(&self) -> Vec<u8> {
        wire::encode(&(&self.slots, &self.prices, &self.catalog)).expect("a projection encodes")
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
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Wire(e) => write!(f, "unreadable request: {e}"),
            Refused::UnknownStore(s) => write!(f, "unknown store {s}"),
            Refused::Push(e) => write!(f, "push refused: {e}"),
            Refused::Skew(e) => write!(f, "skew fence: {e}"),
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
}

struct StorePart {
    index: VersionIndex,
    stock: StockState,
    prices: PriceBook,
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
                    acked: 0,
                })
                .collect(),
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
            self.merge_push(idx, push);
            let part = &mut self.parts[idx];
            if push.from_version <= part.acked {
                part.acked = part.acked.max(push.to_version);
            }
        }
        if let Some(latest) = sync::stamps(&request).max() {
            self.clock.hlc.observe(latest, now_ms).expect("every stamp passed the fence above");
        }
        let (rows, next_cursor, more) = self.page(idx, request.cursor, request.max_rows, request.include_own_slots);
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

    fn merge_push(&mut self, idx: usize, push: &Push) {
        let slots: Vec<SlotRow> = push.rows.slot_rows().collect();
        for row in &slots {
            row.validate().expect("check_push bounds every count");
        }
        let part = &mut self.parts[idx];
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
    }

    /// The rows of `store` beyond `cursor`: the chain partition first, then the store's own,
    /// each in version order. The store's own slots are left out unless the request asks for
    /// them (`SyncRequest::include_own_slots`); skipped rows still move the cursor.
    fn page(&mut self, idx: usize, cursor: Cursor, max_rows: u32, with_own: bool) -> (Rows, Cursor, bool) {
        let limit = max_rows.clamp(1, MAX_PAGE_ROWS) as usize;
        let own = ActorId::for_store(&self.stores[idx]);
        let (mut slots, mut prices, mut catalog) = (Vec::new(), Vec::new(), Vec::new());
        let mut taken = 0;
        let mut next = cursor;
        let mut more = false;
        for (version, key) in self.chain.after(cursor.chain) {
            if taken == limit {
                more = true;
                break;
            }
            match key {
                RowKey::Price(k) => prices.push(self.chain_prices.get(k).expect("indexed price").clone()),
                RowKey::Catalog(sku, field) => {
                    catalog.push(catalog_row(&self.catalog, sku, field).expect("indexed catalog field"))
                }
                RowKey::Slot(k) => panic!("slot {k} in the chain partition"),
            }
            taken += 1;
            next.chain = version;
        }
        if !more {
            next.chain = next.chain.max(self.chain.head());
            let part = &self.parts[idx];
            for (version, key) in part.index.after(cursor.store) {
                if let RowKey::Slot(k) = key {
                    if !with_own && k.actor == own {
                        self.stats.own_slots_skipped += 1;
                        next.store = version;
                        continue;
                    }
                }
                if taken == limit {
                    more = true;
                    break;
                }
                match key {
                    RowKey::Slot(k) => slots.push(SlotRow { key: k.clone(), slot: part.stock.slot(k) }),
                    RowKey::Price(k) => prices.push(part.prices.get(k).expect("indexed price").clone()),
                    RowKey::Catalog(..) => panic!("catalog row in a store partition"),
                }
                taken += 1;
                next.store = version;
            }
            if !more {
                next.store = next.store.max(part.index.head());
            }
        }
        (Rows { stock: Rows::group_slots(slots), prices, catalog, ..Rows::default() }, next, more)
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
/// prices, the catalog; an outbox of its own changes and its sync positions.
pub struct Store {
    pub id: StoreId,
    pub actor: ActorId,
    pub stock: StockState,
    pub prices: PriceBook,
    pub catalog: BTreeMap<Sku, CatalogItem>,
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
    pub fn new(id: StoreId, pull_rows: u32, push_rows: usize) -> Store {
        let actor = ActorId::for_store(&id);
        Store {
            clock: Clock::new(actor.clone()),
            id,
            actor,
            stock: StockState::new(),
            prices: PriceBook::new(),
            catalog: BTreeMap::new(),
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
        let (mut slots, mut prices, mut catalog) = (Vec::new(), Vec::new(), Vec::new());
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
            }
        }
        Push {
            from_version: self.pushed,
            to_version: to,
            rows: Rows { stock: Rows::group_slots(slots), prices, catalog, ..Rows::default() },
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

    /// The outbox names exactly the store's own slots (`StockState` agrees with the index).
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
    }

    pub fn projection(&self) -> Projection {
        Projection {
            slots: self.stock.rows(),
            prices: self.prices.entries().cloned().collect(),
            catalog: self.catalog.values().flat_map(catalog_rows).collect(),
        }
        .canonical()
    }
}
