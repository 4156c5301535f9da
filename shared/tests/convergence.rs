//! Convergence by simulation (DESIGN sections 5, 8 and 13): many stores and the cloud, seeded
//! random operations (sales, receipts, counts, HQ transfers, HQ and store prices, catalog
//! edits, online orders), partitions, lost responses, replayed requests and stale answers,
//! skewed, jumping and dead clocks, in random reconnect order. After every partition heals and
//! every store syncs until quiet, all replicas must hold byte-identical state, no unit may be
//! invented or lost, and every register must hold the write with the greatest HLC stamp.
//!
//! Online orders (DESIGN 5 and 13.5, issue 7): stores grant units to the online channel from
//! the free stock they see, HQ places multi-line orders against the channel's rights alone,
//! cancels and expires them, stores hand them over and keep selling at the till. At every step,
//! on every replica, units reserved online never exceed units granted, and every grant was
//! covered by free stock; at the end every order has one status everywhere and the stock is
//! the receipts minus the till sales minus the units of the orders handed over.
//!
//! Pure and deterministic: no I/O, no wall clock, one seeded RNG. The normal run covers a few
//! seeds at a modest size; `CONVERGENCE_SCALE=large` runs a chain-sized one and
//! `CONVERGENCE_SEED=n` replays one seed (a failure prints the command that reproduces it).

#[path = "convergence/model.rs"]
mod model;
#[path = "convergence/online.rs"]
mod online;
#[path = "convergence/orders.rs"]
mod orders;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use model::{Cloud, Refused, Store, MAX_SKEW_MS};
use online::{check_key, Handover, HandoverRefusal, OrderRefused};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use shared::orders::{pickup_code_digest, OrderLine};
use shared::sync::{Cursor, Push, Rows, SlotGroup, SlotValue, SyncRequest, SyncResponse};
use shared::wire;
use shared::{
    ActorId, CatalogField, Currency, EscrowError, EscrowKey, EscrowRow, HlcStamp, Money, OrderHeader, OrderId,
    OrderStatus, PriceEntry, PriceKey, PriceScope, PriceSlot, PriceValue, Sku, Slot, StoreId, TaxClass, Unit,
    ValidityWindow,
};

/// 2023-11-14, so dead-RTC clocks reading 1970 are far behind.
const EPOCH_MS: u64 = 1_700_000_000_000;
const DEAD_RTC_MS: u64 = 3_000;

#[derive(Debug, Clone, Copy)]
struct Scale {
    name: &'static str,
    stores: usize,
    skus: usize,
    ops: usize,
    /// Page sizes (pull rows and push rows) are drawn per store from this range.
    page: (u32, u32),
    /// SKUs sold online (the first, hot ones): few enough that grants, orders and till sales
    /// meet on the same keys.
    online: usize,
}

const NORMAL: Scale = Scale { name: "normal", stores: 8, skus: 40, ops: 3_000, page: (2, 24), online: 4 };
const LARGE: Scale = Scale { name: "large", stores: 50, skus: 2_000, ops: 200_000, page: (20, 400), online: 8 };
const NORMAL_SEEDS: [u64; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0x5eed, 0xC0FFEE, 20_260_101];

fn scale() -> Scale {
    match std::env::var("CONVERGENCE_SCALE").as_deref() {
        Ok("large") => LARGE,
        Ok("normal") | Ok("") | Err(_) => NORMAL,
        Ok(other) => panic!("CONVERGENCE_SCALE={other:?}: expected \"normal\" or \"large\""),
    }
}

fn seeds(scale: Scale) -> Vec<u64> {
    match std::env::var("CONVERGENCE_SEED") {
        Ok(s) => vec![s.trim().parse().unwrap_or_else(|e| panic!("CONVERGENCE_SEED={s:?}: {e}"))],
        Err(_) if scale.name == "large" => vec![1],
        Err(_) => NORMAL_SEEDS.to_vec(),
    }
}

/// A store's wall clock: a small fixed skew, and sometimes a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClockFault {
    None,
    /// Runs this far ahead (beyond the fence) until op `until`.
    Ahead {
        by_ms: u64,
        until: usize,
    },
    /// Rebooted with a dead RTC at real time `since`: reads 1970 until NTP arrives at op `until`.
    DeadRtc {
        since: u64,
        until: usize,
    },
}

struct Node {
    store: Store,
    skew_ms: i64,
    fault: ClockFault,
    offline_until: usize,
}

/// What became of one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exchange {
    /// Answered and merged; `quiet` when nothing is left to push or pull.
    Done {
        quiet: bool,
    },
    /// The request never reached the cloud (partition, dropped in transit).
    Unreachable,
    /// The cloud applied the request but its answer was lost.
    Lost,
    Refused,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    sessions: u64,
    exchanges: u64,
    unreachable: u64,
    dropped_requests: u64,
    lost_responses: u64,
    refused: u64,
    replays: u64,
    stale_responses: u64,
    foreign_pushes: u64,
    partitions: u64,
    reconnect_waves: u64,
    clock_ahead: u64,
    dead_rtc: u64,
    multi_page_bootstraps: u64,
    healthy_store_refused_cloud_time: u64,
    refused_after_clock_fixed: u64,
}

/// What the online-order side of a run did (printed, and required to be non-zero).
#[derive(Debug, Default, Clone, Copy)]
struct OrderStats {
    grants: u64,
    /// The store's own check refused a grant beyond the free stock it saw.
    grants_refused: u64,
    releases: u64,
    releases_refused: u64,
    reserved: u64,
    /// Refused whole: a line beyond the online channel's rights at the store.
    refused_allocation: u64,
    /// HQ placed an order again (a retry): nothing changed.
    placed_again: u64,
    cancelled: u64,
    cancel_repeated: u64,
    /// HQ's cancellation refused: the cloud had seen the order handed over.
    cancel_refused_handed_over: u64,
    expired: u64,
    handed_over: u64,
    handover_repeated: u64,
    /// The store had seen HQ's cancellation (or expiry): refused, no stock moved.
    handover_refused_cancelled: u64,
    handover_refused_expired: u64,
    handover_refused_at_risk: u64,
    wrong_codes: u64,
    /// Till sales that left (more) units promised online uncovered by the shelf.
    at_risk: u64,
    /// Where the orders stand at the end, everywhere.
    final_waiting: u64,
    final_cancelled: u64,
    final_fulfilled: u64,
    final_cancelled_but_fulfilled: u64,
}

/// Every movement of one (store, SKU), by cause: what its stock must add up to.
#[derive(Debug, Default, Clone, Copy)]
struct Flows {
    receipts: i128,
    sales: i128,
    counted: i128,
    transferred: i128,
    handed_over: i128,
}

impl Flows {
    /// Initial stock is zero: everything on the shelf came in as a receipt or a transfer.
    fn net(&self) -> i128 {
        self.receipts - self.sales + self.counted + self.transferred - self.handed_over
    }
}

#[derive(Debug, Clone, Copy)]
enum Flow {
    Receipt,
    Sale,
    Count,
    Transfer,
    HandOver,
}

struct World {
    seed: u64,
    scale: Scale,
    rng: StdRng,
    op: usize,
    real_ms: u64,
    cloud: Cloud,
    cloud_skew_ms: i64,
    nodes: Vec<Node>,
    skus: Vec<Sku>,
    sku_index: HashMap<Sku, usize>,
    eur: Currency,
    /// Every movement ever made, per (store, sku), by cause.
    flows: BTreeMap<(usize, usize), Flows>,
    /// Every order HQ placed, with its store, and the pickup code HQ gave the customer.
    orders: Vec<(usize, OrderId)>,
    codes: HashMap<OrderId, String>,
    next_order: u64,
    /// Orders whose handover moved stock (once each).
    handed: BTreeSet<OrderId>,
    order_stats: OrderStats,
    /// The write with the greatest stamp ever made to each price register / catalog field.
    price_writes: BTreeMap<PriceKey, PriceEntry>,
    catalog_writes: BTreeMap<(Sku, &'static str), HlcStamp>,
    catalog_values: BTreeMap<(Sku, &'static str), CatalogField>,
    /// Requests duplicated by the network, delivered again later.
    replays: VecDeque<(usize, Vec<u8>)>,
    /// Responses held back by the network, delivered to their store later.
    stale: VecDeque<(usize, Vec<u8>)>,
    trace: VecDeque<String>,
    stats: Stats,
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "convergence failed at op {} of seed {}; reproduce with: CONVERGENCE_SEED={} CONVERGENCE_SCALE={} \
                 cargo test -p shared --test convergence\nlast operations:\n  {}",
                self.op,
                self.seed,
                self.seed,
                self.scale.name,
                self.trace.iter().cloned().collect::<Vec<_>>().join("\n  ")
            );
        }
    }
}

impl World {
    fn new(seed: u64, scale: Scale) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let ids: Vec<StoreId> = (0..scale.stores).map(|i| StoreId::new(format!("s{i:03}")).unwrap()).collect();
        let nodes = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let pull = rng.gen_range(scale.page.0..=scale.page.1);
                let push = rng.gen_range(scale.page.0..=scale.page.1) as usize;
                // Every other store writes as a ledger actor of its own (`store:{id}:{ledger}`),
                // the rest as the store-wide actor of ledgers created before those existed.
                let store = match i % 2 {
                    0 => Store::with_actor(id.clone(), ActorId::for_store_ledger(id, "l0").unwrap(), pull, push),
                    _ => Store::new(id.clone(), pull, push),
                };
                Node { store, skew_ms: rng.gen_range(-300..=300), fault: ClockFault::None, offline_until: 0 }
            })
            .collect();
        World {
            seed,
            scale,
            cloud: Cloud::new(&ids),
            cloud_skew_ms: rng.gen_range(-100..=100),
            rng,
            op: 0,
            real_ms: EPOCH_MS,
            nodes,
            skus: (0..scale.skus).map(|k| Sku::new(format!("SKU-{k:05}")).unwrap()).collect(),
            sku_index: (0..scale.skus).map(|k| (Sku::new(format!("SKU-{k:05}")).unwrap(), k)).collect(),
            eur: Currency::new("EUR").unwrap(),
            flows: BTreeMap::new(),
            orders: Vec::new(),
            codes: HashMap::new(),
            next_order: 0,
            handed: BTreeSet::new(),
            order_stats: OrderStats::default(),
            price_writes: BTreeMap::new(),
            catalog_writes: BTreeMap::new(),
            catalog_values: BTreeMap::new(),
            replays: VecDeque::new(),
            stale: VecDeque::new(),
            trace: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    fn note(&mut self, what: String) {
        if self.trace.len() == 40 {
            self.trace.pop_front();
        }
        let line = format!("op {} t+{}ms: {what}", self.op, self.real_ms - EPOCH_MS);
        self.trace.push_back(line);
    }

    fn cloud_now(&self) -> u64 {
        self.real_ms.saturating_add_signed(self.cloud_skew_ms)
    }

    fn store_now(&self, s: usize) -> u64 {
        let node = &self.nodes[s];
        let wall = self.real_ms.saturating_add_signed(node.skew_ms);
        match node.fault {
            ClockFault::None => wall,
            ClockFault::Ahead { by_ms, .. } => wall + by_ms,
            ClockFault::DeadRtc { since, .. } => DEAD_RTC_MS + (self.real_ms - since),
        }
    }

    /// Half the time one of a few hot SKUs, so concurrent writes to one row are common.
    fn pick_sku(&mut self) -> usize {
        let hot = (self.skus.len() / 10).max(3).min(self.skus.len());
        if self.rng.gen_bool(0.5) {
            self.rng.gen_range(0..hot)
        } else {
            self.rng.gen_range(0..self.skus.len())
        }
    }

    /// A SKU of the online range.
    fn pick_online_sku(&mut self) -> usize {
        self.rng.gen_range(0..self.scale.online)
    }

    fn pick_store(&mut self) -> usize {
        self.rng.gen_range(0..self.nodes.len())
    }

    fn record_movement(&mut self, s: usize, k: usize, flow: Flow, movement: i64) {
        let flows = self.flows.entry((s, k)).or_default();
        let movement = i128::from(movement);
        match flow {
            Flow::Receipt => flows.receipts += movement,
            Flow::Sale => flows.sales -= movement,
            Flow::Count => flows.counted += movement,
            Flow::Transfer => flows.transferred += movement,
            Flow::HandOver => flows.handed_over -= movement,
        }
    }

    fn record_price(&mut self, entry: &PriceEntry) {
        match self.price_writes.get(&entry.key) {
            Some(best) if best.stamp > entry.stamp => {}
            Some(best) => {
                assert_ne!(best.stamp, entry.stamp, "two writes with one stamp");
                self.price_writes.insert(entry.key.clone(), entry.clone());
            }
            None => {
                self.price_writes.insert(entry.key.clone(), entry.clone());
            }
        }
    }

    fn record_catalog(&mut self, sku: &Sku, field: &CatalogField, stamp: &HlcStamp) {
        let key = (sku.clone(), field.name());
        if self.catalog_writes.get(&key).is_none_or(|best| best < stamp) {
            self.catalog_writes.insert(key.clone(), stamp.clone());
            self.catalog_values.insert(key, field.clone());
        }
    }

    fn random_price(&mut self, sku: &Sku) -> (PriceSlot, Option<PriceValue>) {
        let slot = if self.rng.gen_bool(0.3) { PriceSlot::Promotion } else { PriceSlot::Regular };
        if self.rng.gen_bool(0.1) {
            return (slot, None);
        }
        let window = (slot == PriceSlot::Promotion || self.rng.gen_bool(0.1)).then(|| {
            let from_ms = self.real_ms - self.rng.gen_range(0..600_000);
            ValidityWindow { from_ms, until_ms: from_ms + self.rng.gen_range(60_000..3_600_000) }
        });
        let amount = Money::new(self.rng.gen_range(50..50_000), self.eur);
        (slot, Some(PriceValue::new(sku, amount, window).unwrap()))
    }

    fn random_field(&mut self, k: usize) -> CatalogField {
        match self.rng.gen_range(0..4) {
            0 => CatalogField::Name(format!("Item {k} rev {}", self.rng.gen_range(0..1000))),
            1 => CatalogField::Discontinued(self.rng.gen_bool(0.3)),
            2 => CatalogField::Unit(if self.rng.gen_bool(0.8) { Unit::Piece } else { Unit::Gram }),
            _ => CatalogField::TaxClass(TaxClass(["standard", "reduced", "zero"][self.rng.gen_range(0..3)].into())),
        }
    }

    fn run(&mut self) {
        while self.op < self.scale.ops {
            self.step();
        }
        self.settle();
        self.check();
    }

    fn step(&mut self) {
        self.op += 1;
        self.real_ms += self.rng.gen_range(0..=50);
        let op = self.op;
        for node in &mut self.nodes {
            match node.fault {
                ClockFault::Ahead { until, .. } | ClockFault::DeadRtc { until, .. } if until <= op => {
                    node.fault = ClockFault::None
                }
                _ => {}
            }
        }
        match self.rng.gen_range(0..1000) {
            0..=293 => {
                let (s, k, units) = (self.pick_store(), self.pick_sku(), self.rng.gen_range(1..=5));
                self.sale(s, k, units)
            }
            294..=299 => self.clear_shelf(),
            300..=379 => {
                // Online SKUs are fast movers: they get a share of the deliveries of their own.
                let k = if self.rng.gen_bool(0.25) { self.pick_online_sku() } else { self.pick_sku() };
                let (s, units) = (self.pick_store(), self.rng.gen_range(10..=100));
                self.receipt(s, k, units)
            }
            380..=429 => self.count(),
            430..=479 => self.transfer(),
            480..=519 => self.hq_price(true),
            520..=549 => self.hq_price(false),
            550..=589 => self.store_price(),
            590..=604 => self.hq_catalog(),
            605..=612 => self.store_catalog(),
            613..=652 => self.grant(),
            653..=682 => self.online_order(),
            683..=712 => self.hand_over(),
            713..=715 => self.cancel(),
            716..=721 => self.expire(),
            722..=725 => self.release(),
            870..=879 => self.partition(),
            880..=889 => self.reconnect_wave(),
            890..=914 => self.replay(),
            915..=924 => self.stale_response(),
            925..=932 => self.foreign_push(),
            933..=936 => self.clock_ahead(),
            937..=940 => self.reboot(),
            _ => {
                let s = self.pick_store();
                self.session(s, true, 50);
            }
        }
        self.check_allocation();
    }

    /// A till sale: never refused (the item is in the customer's hand), even when it eats into
    /// units promised online; then the store's shortage alert must name the uncovered orders.
    fn sale(&mut self, s: usize, k: usize, units: i64) {
        let sku = self.skus[k].clone();
        let before = self.nodes[s].store.at_risk(&sku);
        self.nodes[s].store.move_stock(&sku, -units);
        self.record_movement(s, k, Flow::Sale, -units);
        let store = &self.nodes[s].store;
        let after = store.at_risk(&sku);
        let named = store.orders_at_risk(&sku);
        assert_eq!(named.is_empty(), after == 0, "s{s} {sku}: {after} units at risk, orders named {named:?}");
        let named_units: u64 = named.iter().map(|o| o.units).sum();
        assert!(named_units >= after, "s{s} {sku}: the alert names {named_units} units of {after} at risk");
        if after > before {
            self.order_stats.at_risk += 1;
        }
        self.note(format!("s{s} till sells {units} of sku {k}, {after} units promised online at risk"));
    }

    fn receipt(&mut self, s: usize, k: usize, units: i64) {
        self.nodes[s].store.move_stock(&self.skus[k], units);
        self.record_movement(s, k, Flow::Receipt, units);
        self.note(format!("s{s} receives {units} of sku {k}"));
    }

    /// A count is an observation (DESIGN 13.2): it records counted - seen, in the own slot.
    fn count(&mut self) {
        let (s, k) = (self.pick_store(), self.pick_sku());
        let seen = self.nodes[s].store.value(&self.skus[k]);
        let counted = (seen + i128::from(self.rng.gen_range(-3i64..=3))).max(0);
        let movement = i64::try_from(counted - seen).unwrap();
        self.nodes[s].store.move_stock(&self.skus[k], movement);
        self.record_movement(s, k, Flow::Count, movement);
        self.note(format!("s{s} counts {counted} of sku {k} (saw {seen})"));
    }

    /// HQ moves units between two stores: both legs in the cloud actor's slots.
    fn transfer(&mut self) {
        let (from, k) = (self.pick_store(), self.pick_sku());
        let to = (from + self.rng.gen_range(1..self.nodes.len())) % self.nodes.len();
        let units = self.rng.gen_range(1..=20);
        self.cloud.move_stock(from, &self.skus[k], -units);
        self.cloud.move_stock(to, &self.skus[k], units);
        self.record_movement(from, k, Flow::Transfer, -units);
        self.record_movement(to, k, Flow::Transfer, units);
        self.note(format!("HQ transfers {units} of sku {k} s{from} -> s{to}"));
    }

    fn hq_price(&mut self, chain: bool) {
        let k = self.pick_sku();
        let sku = self.skus[k].clone();
        let s = self.pick_store();
        let scope = if chain { PriceScope::Chain } else { PriceScope::Store(self.nodes[s].store.id.clone()) };
        let (slot, value) = self.random_price(&sku);
        let now = self.cloud_now();
        let entry = self.cloud.write_price(PriceKey { sku, scope, slot }, value, now);
        self.record_price(&entry);
        self.note(format!("HQ price {:?} {} {} @{}", entry.key.sku, entry.key.scope, slot.as_str(), entry.stamp));
    }

    fn store_price(&mut self) {
        let (s, k) = (self.pick_store(), self.pick_sku());
        let sku = self.skus[k].clone();
        let (slot, value) = self.random_price(&sku);
        let now = self.store_now(s);
        let scope = PriceScope::Store(self.nodes[s].store.id.clone());
        let entry = self.nodes[s].store.write_price(PriceKey { sku, scope, slot }, value, now);
        self.record_price(&entry);
        self.note(format!("s{s} price sku {k} {} @{}", slot.as_str(), entry.stamp));
    }

    fn hq_catalog(&mut self) {
        let k = self.pick_sku();
        let field = self.random_field(k);
        let now = self.cloud_now();
        let update = self.cloud.write_catalog(&self.skus[k].clone(), field, now);
        self.record_catalog(&update.sku, &update.field, &update.stamp);
        self.note(format!("HQ catalog sku {k} {} @{}", update.field.name(), update.stamp));
    }

    fn store_catalog(&mut self) {
        let (s, k) = (self.pick_store(), self.pick_sku());
        let field = self.random_field(k);
        let now = self.store_now(s);
        let update = self.nodes[s].store.write_catalog(&self.skus[k].clone(), field, now);
        self.record_catalog(&update.sku, &update.field, &update.stamp);
        self.note(format!("s{s} catalog sku {k} {} @{}", update.field.name(), update.stamp));
    }

    /// A store goes offline for a while: its syncs fail until it is back.
    fn partition(&mut self) {
        let s = self.pick_store();
        let len = self.rng.gen_range(self.scale.ops / 100..=self.scale.ops / 15);
        self.nodes[s].offline_until = self.op + len;
        self.stats.partitions += 1;
        self.note(format!("s{s} offline for {len} ops"));
    }

    /// Several stores come back at once and sync in random order.
    fn reconnect_wave(&mut self) {
        let mut order: Vec<usize> = (0..self.nodes.len()).collect();
        order.shuffle(&mut self.rng);
        order.truncate(self.rng.gen_range(1..=self.nodes.len()));
        self.stats.reconnect_waves += 1;
        self.note(format!("reconnect wave {order:?}"));
        for s in order {
            self.nodes[s].offline_until = 0;
            self.session(s, true, 50);
        }
    }

    /// The network delivers a request it duplicated earlier; its answer goes nowhere.
    fn replay(&mut self) {
        if self.replays.is_empty() {
            return;
        }
        let i = self.rng.gen_range(0..self.replays.len());
        let (s, bytes) = self.replays.remove(i).unwrap();
        let acked = self.cloud.acked(s);
        let id = self.nodes[s].store.id.clone();
        let now = self.cloud_now();
        let outcome = self.cloud.handle(&id, &bytes, now);
        assert!(self.cloud.acked(s) >= acked, "a replayed request moved the acknowledged version back");
        self.stats.replays += 1;
        self.note(format!("replay of an old s{s} request: {}", if outcome.is_ok() { "applied" } else { "refused" }));
    }

    /// An answer held back by the network reaches its store after newer ones.
    fn stale_response(&mut self) {
        if self.stale.is_empty() {
            return;
        }
        let i = self.rng.gen_range(0..self.stale.len());
        let (s, bytes) = self.stale.remove(i).unwrap();
        let response: SyncResponse = wire::decode(&bytes).expect("a response decodes");
        let now = self.store_now(s);
        self.nodes[s].store.apply(&response, now);
        self.stats.stale_responses += 1;
        self.note(format!("stale answer to s{s}: cursor back to {:?}", response.next_cursor));
    }

    /// A store's credentials try to write what the store does not own: refused whole.
    fn foreign_push(&mut self) {
        let s = self.pick_store();
        let other = (s + self.rng.gen_range(1..self.nodes.len())) % self.nodes.len();
        let id = self.nodes[s].store.id.clone();
        let other_id = self.nodes[other].store.id.clone();
        let k = self.pick_sku();
        let sku = self.skus[k].clone();
        let now = self.store_now(s);
        let stamp = self.nodes[s].store.clock.stamp(now);
        // A legitimate-looking own row first: if the cloud applied part of the request, the
        // stock check at the end would find these units.
        let own = SlotGroup {
            store: id.clone(),
            actor: self.nodes[s].store.actor.clone(),
            slots: vec![SlotValue { sku: sku.clone(), inc: 1_000_000_000, dec: 0 }],
        };
        let mut rows = Rows { stock: vec![own], ..Rows::default() };
        let mut store = id.clone();
        let price = |scope: PriceScope, stamp: HlcStamp| PriceEntry {
            key: PriceKey { sku: sku.clone(), scope, slot: PriceSlot::Regular },
            value: Some(PriceValue { amount: Money::new(1, self.eur), window: None }),
            stamp,
        };
        let own_key = EscrowKey { store: id.clone(), sku: sku.clone() };
        let forged = OrderId::new(format!("FORGED-{}", self.op)).expect("a valid order id");
        let variant = self.rng.gen_range(0..9);
        if variant >= 5 {
            // As the slot above: a legitimate-looking own grant first.
            rows.escrow.push(EscrowRow::Granted { key: own_key.clone(), granted: 1_000_000 });
        }
        match variant {
            0 => rows.stock.push(SlotGroup {
                store: other_id.clone(),
                actor: self.nodes[other].store.actor.clone(),
                slots: vec![SlotValue { sku: sku.clone(), inc: 7, dec: 0 }],
            }),
            1 => rows.stock.push(SlotGroup {
                store: id.clone(),
                actor: ActorId::cloud(),
                slots: vec![SlotValue { sku: sku.clone(), inc: 7, dec: 0 }],
            }),
            2 => rows.prices.push(price(PriceScope::Chain, stamp.clone())),
            3 => rows.prices.push(price(PriceScope::Store(other_id.clone()), stamp.clone())),
            4 => store = other_id.clone(),
            5 => rows.escrow.push(EscrowRow::Reservation {
                key: own_key.clone(),
                order: forged.clone(),
                units: 1,
                seq: 1,
                cancelled: false,
            }),
            6 => rows.escrow.push(EscrowRow::Released { key: own_key.clone(), released: 1 }),
            7 => rows
                .escrow
                .push(EscrowRow::Granted { key: EscrowKey { store: other_id.clone(), sku: sku.clone() }, granted: 7 }),
            _ => rows.orders.push(OrderHeader {
                pickup_code_digest: pickup_code_digest(&forged, "000000"),
                order: forged.clone(),
                store: id.clone(),
                customer_ref: "forged".into(),
                created_at_ms: 1,
                expires_at_ms: 2,
                lines: vec![OrderLine { sku: sku.clone(), units: 1 }],
            }),
        }
        let request = SyncRequest {
            store,
            sent_at: stamp,
            head_version: u64::MAX,
            push: Some(Push { from_version: 0, to_version: u64::MAX, rows }),
            cursor: Cursor::default(),
            max_rows: 10,
            include_own_slots: false,
        };
        let before = self.cloud.fingerprint();
        let now = self.cloud_now();
        match self.cloud.handle(&id, &wire::encode(&request).unwrap(), now) {
            Err(Refused::Push(refusal)) => assert!(refusal.is_ownership(), "variant {variant}: {refusal}"),
            Err(other) => panic!("variant {variant} of a foreign push was refused for another reason: {other}"),
            Ok(_) => panic!("variant {variant} of a foreign push was accepted"),
        }
        assert_eq!(self.cloud.fingerprint(), before, "a refused push changed the cloud");
        self.stats.foreign_pushes += 1;
        self.note(format!("s{s} pushes a foreign row (variant {variant}): refused"));
    }

    /// A store's clock runs ahead beyond the fence for a while: the cloud refuses its requests
    /// until real time has caught up with the stamps it issued meanwhile.
    fn clock_ahead(&mut self) {
        let s = self.pick_store();
        if self.nodes[s].fault != ClockFault::None {
            return;
        }
        let by_ms = MAX_SKEW_MS * self.rng.gen_range(2..=4);
        let until = self.op + self.rng.gen_range(self.scale.ops / 100..=self.scale.ops / 30);
        self.nodes[s].fault = ClockFault::Ahead { by_ms, until };
        self.stats.clock_ahead += 1;
        self.note(format!("s{s} clock runs {by_ms} ms ahead until op {until}"));
    }

    /// A store PC restarts (its HLC resumes from the persisted stamp), half the time with a
    /// dead RTC reading 1970 until NTP arrives.
    fn reboot(&mut self) {
        let s = self.pick_store();
        self.nodes[s].store.clock.reboot();
        if self.nodes[s].fault == ClockFault::None && self.rng.gen_bool(0.5) {
            let until = self.op + self.rng.gen_range(self.scale.ops / 100..=self.scale.ops / 30);
            self.nodes[s].fault = ClockFault::DeadRtc { since: self.real_ms, until };
            self.stats.dead_rtc += 1;
        }
        self.note(format!("s{s} reboots, clock {:?}", self.nodes[s].fault));
    }

    /// Exchanges until quiet, a failure, or `cap` exchanges; returns whether it got quiet.
    fn session(&mut self, s: usize, faults: bool, cap: usize) -> bool {
        self.stats.sessions += 1;
        for _ in 0..cap {
            match self.exchange(s, faults) {
                Exchange::Done { quiet: true } => return true,
                Exchange::Done { quiet: false } => {}
                _ => return false,
            }
        }
        false
    }

    /// One request and its answer, through the wire encoding and a faulty network.
    fn exchange(&mut self, s: usize, faults: bool) -> Exchange {
        self.stats.exchanges += 1;
        let now = self.store_now(s);
        let request = self.nodes[s].store.request(now);
        let bytes = wire::encode(&request).expect("a request encodes");
        assert_eq!(wire::decode::<SyncRequest>(&bytes).expect("a request decodes"), request);
        if self.nodes[s].offline_until > self.op {
            self.stats.unreachable += 1;
            return Exchange::Unreachable;
        }
        if faults && self.rng.gen_bool(0.05) {
            self.replays.push_back((s, bytes.clone()));
            if self.replays.len() > 64 {
                self.replays.pop_front();
            }
        }
        if faults && self.rng.gen_bool(0.03) {
            self.stats.dropped_requests += 1;
            self.note(format!("s{s} request dropped in transit"));
            return Exchange::Unreachable;
        }
        let id = self.nodes[s].store.id.clone();
        let cloud_now = self.cloud_now();
        let (before, acked) = (self.cloud.fingerprint(), self.cloud.acked(s));
        let answer = match self.cloud.handle(&id, &bytes, cloud_now) {
            Ok(answer) => {
                assert!(self.cloud.acked(s) >= acked, "an exchange moved the acknowledged version back");
                answer
            }
            Err(refused) => {
                assert_eq!(self.cloud.fingerprint(), before, "a refused request changed the cloud");
                self.stats.refused += 1;
                match &refused {
                    Refused::Skew(_) if self.nodes[s].fault == ClockFault::None => {
                        // The wall clock is right again, but the HLC keeps the future stamps it
                        // issued (it never goes back), so `sent_at` stays beyond the fence.
                        self.stats.refused_after_clock_fixed += 1;
                    }
                    Refused::Skew(_) => {}
                    other => panic!("an honest store's request was refused: {other}"),
                }
                self.note(format!("s{s} request refused: {refused}"));
                return Exchange::Refused;
            }
        };
        if faults && self.rng.gen_bool(0.02) {
            self.stale.push_back((s, answer.clone()));
            if self.stale.len() > 64 {
                self.stale.pop_front();
            }
        }
        if faults && self.rng.gen_bool(0.05) {
            self.stats.lost_responses += 1;
            self.note(format!("s{s} answer lost after the cloud applied the push"));
            return Exchange::Lost;
        }
        let response: SyncResponse = wire::decode(&answer).expect("a response decodes");
        let healthy = self.nodes[s].fault == ClockFault::None;
        let store = &mut self.nodes[s].store;
        let refused_before = store.stats.skew_refused;
        store.apply(&response, now);
        if healthy && store.stats.skew_refused > refused_before {
            // The cloud's clock adopted a stamp from a store running ahead (inside the fence),
            // and this store, running behind, finds the cloud beyond its own fence.
            self.stats.healthy_store_refused_cloud_time += 1;
        }
        assert!(store.pushed <= store.head(), "s{s}: the cloud acknowledged versions the store never issued");
        let quiet = !response.more && !store.pending();
        let (pushed, cursor) = (store.pushed, store.cursor);
        self.note(format!("s{s} synced: pushed {pushed}, cursor {cursor:?}, more {}", response.more));
        Exchange::Done { quiet }
    }

    /// Every partition heals, every clock is fixed, an hour passes; then every store syncs
    /// until quiet, in random order, twice round (the second round pushes nothing).
    fn settle(&mut self) {
        for node in &mut self.nodes {
            node.offline_until = 0;
            node.fault = ClockFault::None;
        }
        self.real_ms += 3_600_000;
        self.note("settle".into());
        for round in 0..2 {
            let mut order: Vec<usize> = (0..self.nodes.len()).collect();
            order.shuffle(&mut self.rng);
            for s in order {
                let pending = self.nodes[s].store.pending();
                assert!(round == 0 || !pending, "s{s} still had changes to push in the second round");
                assert!(self.session(s, false, 1_000_000), "s{s} did not get quiet");
                self.check_allocation();
            }
        }
    }

    fn check(&mut self) {
        let n = self.nodes.len();
        // (1) Every store equals the cloud's projection of it, byte for byte.
        for s in 0..n {
            self.nodes[s].store.check_outbox();
            let cloud = self.cloud.projection(s);
            let store = self.nodes[s].store.projection();
            assert!(
                cloud.bytes() == store.bytes(),
                "store s{s} differs from the cloud (left cloud, right store):\n{}",
                cloud.diff(&store)
            );
        }
        // (2) Stock adds up to every movement ever made, at the cloud and in every store.
        for s in 0..n {
            let mut per_sku: BTreeMap<Sku, i128> = BTreeMap::new();
            for row in self.cloud.slots(s) {
                *per_sku.entry(row.key.sku.clone()).or_default() += row.slot.value();
            }
            for (k, sku) in self.skus.iter().enumerate() {
                let expected = self.flows.get(&(s, k)).map_or(0, Flows::net);
                let at_cloud = per_sku.get(sku).copied().unwrap_or(0);
                assert_eq!(at_cloud, expected, "cloud stock of s{s}/{sku} against the movements made");
                if k % 7 == 0 {
                    // Spot checks of the library's own sum, on both sides.
                    let id = &self.nodes[s].store.id;
                    assert_eq!(self.cloud.stock(s).value(id, sku), expected);
                    assert_eq!(self.nodes[s].store.value(sku), expected);
                }
            }
        }
        // Transfers neither invent nor lose: the cloud's slots net to zero per SKU chain-wide.
        let mut net: BTreeMap<Sku, i128> = BTreeMap::new();
        for s in 0..n {
            for row in self.cloud.slots(s).into_iter().filter(|r| r.key.actor == ActorId::cloud()) {
                *net.entry(row.key.sku).or_default() += row.slot.value();
            }
        }
        assert!(net.values().all(|v| *v == 0), "transfers do not net to zero: {net:?}");
        // (3) Every register holds the write with the greatest stamp ever made to it.
        assert_eq!(self.cloud.price_registers(), self.price_writes.len(), "price registers nobody wrote");
        for (key, best) in &self.price_writes {
            assert_eq!(self.cloud.price(key), Some(best), "price register {key:?}");
        }
        assert_eq!(self.cloud.catalog_registers(), self.catalog_writes.len(), "catalog fields nobody wrote");
        for ((sku, field), stamp) in &self.catalog_writes {
            let held = self.cloud.catalog_field(sku, field).expect("a written field");
            assert_eq!(&held.stamp, stamp, "catalog {sku}.{field}");
            assert_eq!(&held.field, &self.catalog_values[&(sku.clone(), *field)], "catalog {sku}.{field}");
        }
        // The till price agrees between each store and the cloud, now, before and later.
        for s in 0..n {
            let id = self.nodes[s].store.id.clone();
            for (k, sku) in self.skus.iter().enumerate() {
                if n * self.skus.len() > 20_000 && k % 10 != s % 10 {
                    continue;
                }
                for at in [self.real_ms, self.real_ms - 3_600_000, self.real_ms + 600_000] {
                    let at_store = self.nodes[s].store.prices.effective_price(sku, &id, at).cloned();
                    assert_eq!(at_store, self.cloud.effective_price(s, sku, at), "till price of {sku} in s{s} at {at}");
                }
            }
        }
        // (4) Online orders: one status everywhere, every unit accounted for once.
        self.check_orders();
        // (5) A replica rebuilt from `Cursor::default()` gets the cloud's projection.
        for s in 0..n {
            self.check_bootstrap(s);
        }
    }

    /// Pulls a store's whole state into an empty replica, page by page from the start, as a
    /// store does after its ledger was replaced: it asks for its own slots on every page until
    /// it has caught up, and continues its versions above what the cloud acknowledges.
    fn check_bootstrap(&mut self, s: usize) {
        let node = &self.nodes[s].store;
        // A replaced store PC: a new ledger, writing as a new actor of the store.
        let actor = ActorId::for_store_ledger(&node.id, "rebuilt").unwrap();
        let mut fresh = Store::with_actor(node.id.clone(), actor, node.pull_rows, node.push_rows);
        let mut pages = 0;
        loop {
            pages += 1;
            assert!(pages < 1_000_000, "bootstrap of s{s} does not end");
            let now = self.real_ms.saturating_add_signed(self.nodes[s].skew_ms);
            let request = fresh.request(now);
            if let Some(push) = &request.push {
                assert!(push.rows.is_empty(), "an empty replica has no rows to push, only versions to skip");
            }
            let cloud_now = self.cloud_now();
            let answer = self.cloud.handle(&fresh.id, &wire::encode(&request).unwrap(), cloud_now).unwrap();
            let response: SyncResponse = wire::decode(&answer).unwrap();
            fresh.apply(&response, now);
            if !response.more && !fresh.pending() {
                break;
            }
        }
        self.stats.multi_page_bootstraps += u64::from(pages > 1);
        for key in fresh.take_dirty() {
            check_key(&format!("rebuilt s{s}"), fresh.escrow.get(&key).expect("a merged key"));
        }
        let expected = self.cloud.projection(s);
        let got = fresh.projection();
        assert!(
            expected.bytes() == got.bytes(),
            "bootstrapped s{s} differs (left cloud, right replica):\n{}",
            expected.diff(&got)
        );
    }
}

/// Runs one seed to the end and checks it (a failure names the seed, see `World`'s drop);
/// returns what the run exercised.
fn simulate(seed: u64, scale: Scale) -> (Stats, model::CloudStats, model::StoreStats, u64, OrderStats) {
    let mut world = World::new(seed, scale);
    world.run();
    let mut store_stats = model::StoreStats::default();
    let mut jumps = world.cloud.clock.jumps;
    for node in &world.nodes {
        let st = node.store.stats;
        store_stats.truncated_pushes += st.truncated_pushes;
        store_stats.pages_with_more += st.pages_with_more;
        store_stats.skew_refused += st.skew_refused;
        store_stats.superseded_own_writes += st.superseded_own_writes;
        store_stats.acked_moved_back += st.acked_moved_back;
        jumps += node.store.clock.jumps;
    }
    (world.stats, world.cloud.stats, store_stats, jumps, world.order_stats)
}

#[test]
fn stores_and_cloud_converge_under_partitions_faults_and_skew() {
    let scale = scale();
    let mut total = Stats::default();
    let mut total_cloud = model::CloudStats::default();
    let mut total_store = model::StoreStats::default();
    let mut total_jumps = 0;
    let mut total_orders = OrderStats::default();
    for seed in seeds(scale) {
        let started = std::time::Instant::now();
        let (stats, cloud, store, jumps, orders) = simulate(seed, scale);
        println!(
            "seed {seed} ({} scale, {:.2?}): {stats:?}\n  cloud {cloud:?}\n  stores {store:?}, clock jumps {jumps}\n  \
             online orders {orders:?}",
            scale.name,
            started.elapsed()
        );
        macro_rules! add {
            ($into:ident, $from:ident: $($f:ident),*) => { $( $into.$f += $from.$f; )* };
        }
        add!(total, stats: lost_responses, dropped_requests, replays, stale_responses, foreign_pushes, refused,
            partitions, reconnect_waves, clock_ahead, dead_rtc, unreachable, multi_page_bootstraps);
        add!(total_cloud, cloud: refused_skew, refused_ownership, pages_with_more, own_slots_skipped);
        add!(total_store, store: truncated_pushes, pages_with_more, skew_refused, acked_moved_back);
        add!(total_cloud, cloud: own_escrow_skipped, oversized_order_pages);
        add!(total_orders, orders: grants, grants_refused, releases, releases_refused, reserved, refused_allocation,
            placed_again, cancelled, cancel_repeated, cancel_refused_handed_over, expired, handed_over,
            handover_repeated, handover_refused_cancelled, handover_refused_expired, handover_refused_at_risk,
            wrong_codes, at_risk, final_waiting, final_cancelled, final_fulfilled, final_cancelled_but_fulfilled);
        total_jumps += jumps;
    }
    if std::env::var("CONVERGENCE_SEED").is_ok() {
        return; // One seed alone need not hit every fault.
    }
    // The run exercised what it claims to (summed over the seeds of the run).
    let exercised = [
        ("lost responses", total.lost_responses),
        ("requests dropped in transit", total.dropped_requests),
        ("replayed requests", total.replays),
        ("stale answers", total.stale_responses),
        ("foreign pushes", total.foreign_pushes),
        ("partitions", total.partitions),
        ("syncs while offline", total.unreachable),
        ("reconnect waves", total.reconnect_waves),
        ("clocks ahead of the fence", total.clock_ahead),
        ("dead RTC reboots", total.dead_rtc),
        ("cloud skew refusals", total_cloud.refused_skew),
        ("ownership refusals", total_cloud.refused_ownership),
        ("pulled pages with more", total_cloud.pages_with_more),
        ("own slots skipped in pulls", total_cloud.own_slots_skipped),
        ("pushes cut at the page size", total_store.truncated_pushes),
        ("acknowledged versions moved back by stale answers", total_store.acked_moved_back),
        ("multi-page bootstraps", total.multi_page_bootstraps),
        ("HLC jumps", total_jumps),
        ("grants to the online channel", total_orders.grants),
        ("grants refused by the store's own check", total_orders.grants_refused),
        ("releases", total_orders.releases),
        ("releases beyond the rights refused", total_orders.releases_refused),
        ("orders reserved", total_orders.reserved),
        ("orders refused for insufficient allocation", total_orders.refused_allocation),
        ("orders placed again", total_orders.placed_again),
        ("orders cancelled", total_orders.cancelled),
        ("orders expired", total_orders.expired),
        ("cancellations refused after a handover", total_orders.cancel_refused_handed_over),
        ("orders handed over", total_orders.handed_over),
        ("repeated handovers", total_orders.handover_repeated),
        ("handovers refused as cancelled", total_orders.handover_refused_cancelled),
        ("wrong pickup codes", total_orders.wrong_codes),
        ("at-risk situations", total_orders.at_risk),
        ("orders cancelled but fulfilled", total_orders.final_cancelled_but_fulfilled),
        ("own allocation rows skipped in pulls", total_cloud.own_escrow_skipped),
    ];
    for (what, count) in exercised {
        assert!(count > 0, "the simulation never exercised {what}");
    }
}

fn sku(s: &str) -> Sku {
    Sku::new(s).unwrap()
}

/// Runs one exchange of `store` against `cloud`; `deliver` says whether the answer arrives.
fn exchange(cloud: &mut Cloud, store: &mut Store, now: u64, deliver: bool) -> Vec<u8> {
    let bytes = wire::encode(&store.request(now)).unwrap();
    let answer = cloud.handle(&store.id, &bytes, now).unwrap();
    if deliver {
        store.apply(&wire::decode(&answer).unwrap(), now);
    }
    bytes
}

/// The fault every retry policy must survive, step by step: the cloud applies a push, the
/// answer is lost, the store pushes the same rows again, and the network replays the first
/// request later. The units count once.
#[test]
fn a_push_whose_answer_was_lost_is_retried_and_counts_once() {
    let id = StoreId::new("s1").unwrap();
    let mut cloud = Cloud::new(std::slice::from_ref(&id));
    let mut store = Store::new(id.clone(), 10, 10);
    let milk = sku("MILK");
    store.move_stock(&milk, 12);
    store.move_stock(&milk, -3);
    let t = EPOCH_MS;
    let first = exchange(&mut cloud, &mut store, t, false);
    assert_eq!(cloud.acked(0), 2, "the cloud applied and acknowledged the push");
    assert_eq!(store.pushed, 0, "the store never heard");
    store.move_stock(&milk, -1);
    exchange(&mut cloud, &mut store, t + 10, true);
    assert_eq!((store.pushed, store.pending()), (3, false));
    cloud.handle(&id, &first, t + 20).unwrap();
    assert_eq!(cloud.acked(0), 3, "a replayed old request does not move the acknowledgement back");
    assert_eq!(cloud.stock(0).value(&id, &milk), 8);
    assert_eq!(cloud.slots(0), vec![shared::SlotRow { key: store.own_key(&milk), slot: Slot { inc: 12, dec: 4 } }]);
}

/// A store rebuilding its ledger pulls its whole state back over several pages: it asks for
/// its own slots on every page until caught up (`SyncRequest::include_own_slots`; the cursor
/// alone cannot say it, it moves after the first page), and the answer acknowledges versions
/// the empty replica never issued, so it continues its versions above them and its next sale
/// is still pushed.
#[test]
fn paged_bootstrap_of_a_rebuilt_store_gets_all_its_own_slots() {
    let id = StoreId::new("s1").unwrap();
    let mut cloud = Cloud::new(std::slice::from_ref(&id));
    let mut store = Store::new(id.clone(), 100, 100);
    let skus: Vec<Sku> = (0..5).map(|i| sku(&format!("SKU-{i}"))).collect();
    for s in &skus {
        store.move_stock(s, 10);
    }
    exchange(&mut cloud, &mut store, EPOCH_MS, true);
    assert!(!store.pending());
    cloud.move_stock(0, &skus[0], 4);

    // The store PC is replaced: an empty replica pulls two rows a page from the start.
    let mut rebuilt = Store::new(id.clone(), 2, 2);
    let mut pages = 0;
    loop {
        pages += 1;
        let bytes = wire::encode(&rebuilt.request(EPOCH_MS + pages)).unwrap();
        let response: SyncResponse = wire::decode(&cloud.handle(&id, &bytes, EPOCH_MS + pages).unwrap()).unwrap();
        rebuilt.apply(&response, EPOCH_MS + pages);
        if !response.more {
            break;
        }
    }
    assert!(pages > 1);
    let own_rows = rebuilt.stock.rows().into_iter().filter(|r| r.key.actor == rebuilt.actor).count();
    assert_eq!(own_rows, 5, "every own slot arrives, on whichever page");
    let total: i128 = skus.iter().map(|s| rebuilt.value(s)).sum();
    let held: i128 = skus.iter().map(|s| cloud.stock(0).value(&id, s)).sum();
    assert_eq!((total, held), (54, 54));
    assert_eq!(rebuilt.head(), 5, "versions continue above what the cloud acknowledged");
    rebuilt.move_stock(&skus[1], -1);
    assert!(rebuilt.pending(), "the rebuilt store's first sale is pushed");
    exchange(&mut cloud, &mut rebuilt, EPOCH_MS + 100, true);
    let held: i128 = skus.iter().map(|s| cloud.stock(0).value(&id, s)).sum();
    assert_eq!(held, 53);
}

/// A store whose ledger was lost starts an empty one and sells before its first sync. Written
/// as a new actor (as edge-agent's new ledgers are), its sales count: the old ledger's slot
/// comes back to it as another actor's, and the cloud keeps both. Written as the old ledger's
/// actor, the per-slot max with the cloud's larger counts hides them.
#[test]
fn a_rebuilt_store_writing_as_a_new_actor_keeps_what_it_sold_before_catching_up() {
    let id = StoreId::new("s1").unwrap();
    let milk = sku("MILK");
    let ledger = |name: &str| ActorId::for_store_ledger(&id, name).unwrap();
    let after_rebuild = |actor: ActorId| {
        let mut cloud = Cloud::new(std::slice::from_ref(&id));
        let mut old = Store::with_actor(id.clone(), ledger("a1"), 100, 100);
        old.move_stock(&milk, 50);
        old.move_stock(&milk, -10);
        exchange(&mut cloud, &mut old, EPOCH_MS, true);
        assert_eq!(cloud.stock(0).value(&id, &milk), 40);

        let mut rebuilt = Store::with_actor(id.clone(), actor, 1, 1);
        rebuilt.move_stock(&milk, -5);
        for t in 1..=6 {
            exchange(&mut cloud, &mut rebuilt, EPOCH_MS + t, true);
        }
        assert!(rebuilt.bootstrapped && !rebuilt.pending());
        (rebuilt.value(&milk), cloud.stock(0).value(&id, &milk))
    };
    assert_eq!(after_rebuild(ledger("b2")), (35, 35), "a new actor: 50 - 10 - 5");
    assert_eq!(after_rebuild(ledger("a1")), (40, 40), "the old actor: the 5 sold are hidden");
}

fn header(id: &str, store: &StoreId, lines: &[(&Sku, u64)], code: &str) -> OrderHeader {
    let order = OrderId::new(id).unwrap();
    let now = i64::try_from(EPOCH_MS).unwrap();
    OrderHeader {
        pickup_code_digest: pickup_code_digest(&order, code),
        order,
        store: store.clone(),
        customer_ref: "customer 1".into(),
        created_at_ms: now,
        expires_at_ms: now + 3_600_000,
        lines: lines.iter().map(|(sku, units)| OrderLine { sku: (*sku).clone(), units: *units }).collect(),
    }
}

/// Issue 7's race, step by step: HQ cancels a two-line order while the store, offline, hands
/// it over. After sync both sides hold the same rows; the order counts once, as fulfilled (its
/// units left the store, so none goes back to free stock), and both name it for HQ to settle.
#[test]
fn an_order_cancelled_while_the_store_hands_it_over_offline_counts_once_as_fulfilled() {
    let id = StoreId::new("s1").unwrap();
    let mut cloud = Cloud::new(std::slice::from_ref(&id));
    let mut store = Store::new(id.clone(), 50, 50);
    let (milk, eggs) = (sku("MILK"), sku("EGGS"));
    store.move_stock(&milk, 10);
    store.move_stock(&eggs, 10);
    store.grant(&milk, 5, 2).unwrap();
    store.grant(&eggs, 5, 2).unwrap();
    let err = store.grant(&eggs, 4, 2).unwrap_err();
    assert!(matches!(err, EscrowError::InsufficientFreeStock { free: 3, .. }), "{err}");
    exchange(&mut cloud, &mut store, EPOCH_MS, true);
    let order = header("W1", &id, &[(&milk, 3), (&eggs, 2)], "424242");
    let w1 = order.order.clone();
    let too_big = header("W2", &id, &[(&milk, 1), (&eggs, 6)], "111111");
    assert!(matches!(cloud.reserve_order(too_big), Err(OrderRefused::Allocation(_))));
    assert!(cloud.order(0, &OrderId::new("W2").unwrap()).is_none(), "a refused order reserves no line");
    assert!(cloud.reserve_order(order.clone()).unwrap());
    exchange(&mut cloud, &mut store, EPOCH_MS + 10, true);
    assert_eq!(store.orders.get(&w1), Some(&order));

    assert!(cloud.cancel_order(0, &w1).unwrap(), "HQ cancels while the store is offline");
    assert!(matches!(store.hand_over(&w1, "000000", EPOCH_MS + 20), Handover::Refused(HandoverRefusal::WrongCode)));
    match store.hand_over(&w1, "424242", EPOCH_MS + 20) {
        Handover::Done(lines) => assert_eq!(lines, vec![(milk.clone(), 3), (eggs.clone(), 2)]),
        other => panic!("{other:?}"),
    }
    assert!(matches!(store.hand_over(&w1, "424242", EPOCH_MS + 21), Handover::Repeated));
    exchange(&mut cloud, &mut store, EPOCH_MS + 30, true);
    exchange(&mut cloud, &mut store, EPOCH_MS + 40, true);

    assert!(
        cloud.projection(0).bytes() == store.projection().bytes(),
        "{}",
        cloud.projection(0).diff(&store.projection())
    );
    for sku in [&milk, &eggs] {
        let key = EscrowKey { store: id.clone(), sku: sku.clone() };
        for (side, escrow) in
            [("cloud", cloud.escrow(0).get(&key).unwrap()), ("store", store.escrow.get(&key).unwrap())]
        {
            assert_eq!(escrow.order(&w1).unwrap().status, OrderStatus::CancelledButFulfilled, "{side} {sku}");
            assert_eq!(escrow.conflicts().len(), 1, "{side} names the order for HQ to settle");
            let counted = check_key(side, escrow);
            assert_eq!((counted.cancelled, counted.promised), (0, 0), "{side} {sku}: nothing back in free stock");
        }
    }
    assert_eq!((cloud.stock(0).value(&id, &milk), cloud.stock(0).value(&id, &eggs)), (7, 8));
    assert!(!cloud.cancel_order(0, &w1).unwrap(), "cancelling again changes nothing");
}

/// An order travels whole: a store that asks for pages of two rows still gets a three-line
/// order (header and lines) in one page, never a line without its order.
#[test]
fn a_page_carries_an_order_whole_even_above_the_rows_asked_for() {
    let id = StoreId::new("s1").unwrap();
    let mut cloud = Cloud::new(std::slice::from_ref(&id));
    let mut store = Store::new(id.clone(), 2, 50);
    let skus: Vec<Sku> = ["A", "B", "C"].into_iter().map(sku).collect();
    for s in &skus {
        store.move_stock(s, 5);
        store.grant(s, 5, 0).unwrap();
    }
    exchange(&mut cloud, &mut store, EPOCH_MS, true);
    let lines: Vec<(&Sku, u64)> = skus.iter().map(|s| (s, 1)).collect();
    assert!(cloud.reserve_order(header("W1", &id, &lines, "123456")).unwrap());
    let mut sizes = Vec::new();
    for t in 1..10 {
        let request = store.request(EPOCH_MS + t);
        let answer = cloud.handle(&id, &wire::encode(&request).unwrap(), EPOCH_MS + t).unwrap();
        let response: SyncResponse = wire::decode(&answer).unwrap();
        store.apply(&response, EPOCH_MS + t);
        sizes.push((response.rows.orders.len(), response.rows.escrow.len()));
        if !response.more {
            break;
        }
    }
    assert!(sizes.contains(&(1, 3)), "the order and its three lines in one page: {sizes:?}");
    assert_eq!(cloud.stats.oversized_order_pages, 1);
    assert!(matches!(store.hand_over(&OrderId::new("W1").unwrap(), "123456", EPOCH_MS + 20), Handover::Done(_)));
    assert_eq!(skus.iter().map(|s| store.value(s)).sum::<i128>(), 12);
}
