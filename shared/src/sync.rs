//! The store <-> cloud sync messages, carried in the versioned envelope of [`crate::wire`].
//!
//! One exchange is one `POST /v1/stores/{store}/sync`: the store pushes a page of its own rows
//! changed in `(from_version, to_version]` and names the cloud cursor it has merged up to; the
//! cloud merges the push (idempotently: per-slot max, LWW) and answers with the version it now
//! holds durably and a page of rows changed since the cursor. Retrying, duplicating or
//! reordering an exchange is harmless because every merge is idempotent and the store only
//! moves its cursors to what an answer says.
//!
//! Stock rows travel grouped by (store, actor) so that the ids are paid once per group: a changed
//! slot costs its SKU and two varints on the wire (DESIGN section 10: <= 20 bytes a slot).
//!
//! The cloud's rows live in partitions: `chain` (chain prices, the catalog) and one per store
//! (that store's stock slots, its store-scope prices). Each partition has its own version
//! counter, so a store's cursor is one version per partition it reads.

use serde::{Deserialize, Serialize};

use crate::catalog::CatalogUpdate;
use crate::escrow::{EscrowRow, Side};
use crate::hlc::HlcStamp;
use crate::ids::{ActorId, Sku, StoreId};
use crate::orders::OrderHeader;
use crate::price::{PriceEntry, PriceScope};
use crate::stock::{Slot, SlotKey, SlotRow};

/// Most rows (stock slots + prices + catalog fields) in one push or one pulled page.
pub const MAX_PAGE_ROWS: u32 = 20_000;

/// Where a store has merged the cloud's partitions up to (exclusive lower bounds of the next
/// pull). `Cursor::default()` asks for everything. The sending ledger's own slots (those of
/// `sent_at.actor`) come back only when the request asks for them
/// ([`SyncRequest::include_own_slots`]): only that ledger writes them, so it needs them only
/// while catching up after a restore; the slots of the store's other ledgers come back always.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cursor {
    pub chain: u64,
    pub store: u64,
}

impl Cursor {
    pub fn is_start(&self) -> bool {
        *self == Cursor::default()
    }
}

/// One slot's counts, inside a [`SlotGroup`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SlotValue {
    pub sku: Sku,
    pub inc: u64,
    pub dec: u64,
}

/// The slots of one actor in one store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotGroup {
    pub store: StoreId,
    pub actor: ActorId,
    pub slots: Vec<SlotValue>,
}

/// Rows of replicated state, as pushed or pulled.
///
/// Online allocation ([`crate::escrow`]) lives in the store's partition: a store pushes its
/// `Granted` and `Fulfilled` rows and pulls the cloud's `Released` and `Reservation` rows and the
/// headers of its orders. A page that carries a reservation also carries its order's header
/// (the cloud writes both with one version), so a store never sees a line without its order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rows {
    pub stock: Vec<SlotGroup>,
    pub prices: Vec<PriceEntry>,
    pub catalog: Vec<CatalogUpdate>,
    pub escrow: Vec<EscrowRow>,
    pub orders: Vec<OrderHeader>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.stock.iter().map(|g| g.slots.len()).sum::<usize>()
            + self.prices.len()
            + self.catalog.len()
            + self.escrow.len()
            + self.orders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Groups slot rows by (store, actor), keeping their order within a group.
    pub fn group_slots(rows: impl IntoIterator<Item = SlotRow>) -> Vec<SlotGroup> {
        let mut groups: Vec<SlotGroup> = Vec::new();
        for row in rows {
            let value = SlotValue { sku: row.key.sku, inc: row.slot.inc, dec: row.slot.dec };
            match groups.iter_mut().find(|g| g.store == row.key.store && g.actor == row.key.actor) {
                Some(group) => group.slots.push(value),
                None => groups.push(SlotGroup { store: row.key.store, actor: row.key.actor, slots: vec![value] }),
            }
        }
        groups
    }

    /// The stock rows ungrouped.
    pub fn slot_rows(&self) -> impl Iterator<Item = SlotRow> + '_ {
        self.stock.iter().flat_map(|g| {
            g.slots.iter().map(move |s| SlotRow {
                key: SlotKey { store: g.store.clone(), sku: s.sku.clone(), actor: g.actor.clone() },
                slot: Slot { inc: s.inc, dec: s.dec },
            })
        })
    }
}

/// The store's own changes in `(from_version, to_version]` of its local change version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Push {
    pub from_version: u64,
    pub to_version: u64,
    pub rows: Rows,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub store: StoreId,
    /// The store's clock when it sent this (checked against the cloud's skew fence).
    pub sent_at: HlcStamp,
    /// The store's latest local change version, so the cloud can report the store's lag.
    pub head_version: u64,
    /// `None` when the store has nothing unacknowledged.
    pub push: Option<Push>,
    pub cursor: Cursor,
    /// Most rows the store wants in the answer (the cloud caps it at [`MAX_PAGE_ROWS`]).
    pub max_rows: u32,
    /// Also send the sending ledger's own slots and the store's allocation grants and handovers:
    /// set by a store until it has caught up once with a new or restored ledger (it gets back
    /// what it had pushed). Kept for every page of that catch-up, not inferred from the cursor, which
    /// moves after the first page.
    pub include_own_slots: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    /// The cloud's clock, for the store's HLC to observe.
    pub cloud_time: HlcStamp,
    /// The highest local version of the store the cloud holds durably: the store pushes from
    /// here next time. Lower than the store thinks only if the cloud lost data (a restored
    /// backup); the store then pushes again from here.
    pub acked_version: u64,
    pub rows: Rows,
    /// Cursor to send next; rows up to it are in this page or were before.
    pub next_cursor: Cursor,
    /// More rows wait beyond `next_cursor`: pull again at once.
    pub more: bool,
}

/// Why the cloud refuses a row a store pushed: the whole request is refused, nothing applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushRefusal {
    #[error("stock slot {store}/{sku}/{actor}: store {pusher} may only write its own ledgers' slots (sent by {own})")]
    ForeignSlot { pusher: StoreId, own: ActorId, store: StoreId, sku: Sku, actor: ActorId },
    #[error(
        "price {sku} {scope}: store {pusher} may only write prices of its own scope, stamped by its ledgers (sent by {own}, found {actor})"
    )]
    ForeignPrice { pusher: StoreId, own: ActorId, sku: Sku, scope: PriceScope, actor: ActorId },
    #[error("catalog {sku}.{field}: store {pusher} may only write fields stamped by its ledgers (sent by {own}, found {actor})")]
    ForeignCatalog { pusher: StoreId, own: ActorId, sku: Sku, field: &'static str, actor: ActorId },
    #[error("online allocation row {row}: store {pusher} may not write it ({reason})")]
    ForeignEscrow { pusher: StoreId, row: String, reason: String },
    #[error("order {order}: store {pusher} may not push order headers; only HQ creates orders")]
    ForeignOrder { pusher: StoreId, order: String },
    #[error("request for store {path} carries store id {body}")]
    StoreMismatch { path: StoreId, body: StoreId },
    #[error("request of store {pusher} is sent by actor {actor}, not one of the store's (store:{pusher} or store:{pusher}:LEDGER)")]
    ForeignSender { pusher: StoreId, actor: ActorId },
    #[error("push range ({from}, {to}] is backwards")]
    BackwardsRange { from: u64, to: u64 },
    #[error("push of {rows} rows is above the page limit of {max}")]
    TooManyRows { rows: usize, max: u32 },
    #[error("invalid row: {0}")]
    Invalid(String),
}

impl PushRefusal {
    /// Whether this is an attempt to write what the store does not own (a security event), as
    /// opposed to a malformed request.
    pub fn is_ownership(&self) -> bool {
        matches!(
            self,
            PushRefusal::ForeignSlot { .. }
                | PushRefusal::ForeignPrice { .. }
                | PushRefusal::ForeignCatalog { .. }
                | PushRefusal::ForeignEscrow { .. }
                | PushRefusal::ForeignOrder { .. }
                | PushRefusal::StoreMismatch { .. }
                | PushRefusal::ForeignSender { .. }
        )
    }
}

/// Checks that everything `store` pushes is its own to write and well-formed. Pure, so the cloud
/// and the tests share it.
pub fn check_push(store: &StoreId, request: &SyncRequest) -> Result<(), PushRefusal> {
    if request.store != *store {
        return Err(PushRefusal::StoreMismatch { path: store.clone(), body: request.store.clone() });
    }
    // The sending ledger's actor: the cloud leaves its slots out of pulls. A push may carry what
    // any of the store's ledgers wrote (a ledger restored from a backup writes as a new actor
    // but still pushes what it wrote as the old one); a store's counts only ever grow by max.
    let own = request.sent_at.actor.clone();
    if !own.is_of_store(store) {
        return Err(PushRefusal::ForeignSender { pusher: store.clone(), actor: own });
    }
    let Some(push) = &request.push else { return Ok(()) };
    if push.from_version > push.to_version {
        return Err(PushRefusal::BackwardsRange { from: push.from_version, to: push.to_version });
    }
    if push.rows.len() > MAX_PAGE_ROWS as usize {
        return Err(PushRefusal::TooManyRows { rows: push.rows.len(), max: MAX_PAGE_ROWS });
    }
    for group in &push.rows.stock {
        if group.store != *store || !group.actor.is_of_store(store) {
            let sku = group.slots.first().map(|s| s.sku.clone()).unwrap_or_else(|| Sku::new("-").expect("valid sku"));
            return Err(PushRefusal::ForeignSlot {
                pusher: store.clone(),
                own,
                store: group.store.clone(),
                sku,
                actor: group.actor.clone(),
            });
        }
        for s in &group.slots {
            if s.inc > Slot::MAX || s.dec > Slot::MAX {
                return Err(PushRefusal::Invalid(format!("stock slot {}/{}: count above {}", store, s.sku, Slot::MAX)));
            }
        }
    }
    for price in &push.rows.prices {
        let own_scope = price.key.scope == PriceScope::Store(store.clone());
        if !own_scope || !price.stamp.actor.is_of_store(store) {
            return Err(PushRefusal::ForeignPrice {
                pusher: store.clone(),
                own,
                sku: price.key.sku.clone(),
                scope: price.key.scope.clone(),
                actor: price.stamp.actor.clone(),
            });
        }
        price.validate().map_err(|e| PushRefusal::Invalid(e.to_string()))?;
    }
    for update in &push.rows.catalog {
        if !update.stamp.actor.is_of_store(store) {
            return Err(PushRefusal::ForeignCatalog {
                pusher: store.clone(),
                own,
                sku: update.sku.clone(),
                field: update.field.name(),
                actor: update.stamp.actor.clone(),
            });
        }
    }
    let writer = Side::Store(store.clone());
    for row in &push.rows.escrow {
        if let Err(e) = row.check_writer(&writer) {
            return Err(PushRefusal::ForeignEscrow {
                pusher: store.clone(),
                row: format!("{}", row.key()),
                reason: e.to_string(),
            });
        }
        row.validate().map_err(|e| PushRefusal::Invalid(e.to_string()))?;
    }
    if let Some(header) = push.rows.orders.first() {
        return Err(PushRefusal::ForeignOrder { pusher: store.clone(), order: header.order.to_string() });
    }
    Ok(())
}

/// Every HLC stamp a request carries (for the skew fence and for the cloud clock to observe).
pub fn stamps(request: &SyncRequest) -> impl Iterator<Item = &HlcStamp> {
    let rows = request.push.as_ref().map(|p| &p.rows);
    std::iter::once(&request.sent_at)
        .chain(rows.into_iter().flat_map(|r| r.prices.iter().map(|p| &p.stamp)))
        .chain(rows.into_iter().flat_map(|r| r.catalog.iter().map(|c| &c.stamp)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire;

    fn store(s: &str) -> StoreId {
        StoreId::new(s).unwrap()
    }

    fn request(rows: Rows) -> SyncRequest {
        SyncRequest {
            store: store("s1"),
            sent_at: HlcStamp { wall_ms: 1, logical: 0, actor: ActorId::for_store(&store("s1")) },
            head_version: 3,
            push: Some(Push { from_version: 0, to_version: 3, rows }),
            cursor: Cursor::default(),
            max_rows: 100,
            include_own_slots: false,
        }
    }

    fn group(store_id: &str, actor: ActorId, n: usize) -> SlotGroup {
        SlotGroup {
            store: store(store_id),
            actor,
            slots: (0..n)
                .map(|i| SlotValue { sku: Sku::new(format!("SKU-{i:07}")).unwrap(), inc: 250, dec: 180 })
                .collect(),
        }
    }

    #[test]
    fn own_slots_are_accepted() {
        let req = request(Rows { stock: vec![group("s1", ActorId::for_store(&store("s1")), 2)], ..Rows::default() });
        assert_eq!(check_push(&store("s1"), &req), Ok(()));
    }

    #[test]
    fn another_stores_slot_is_an_ownership_refusal() {
        let req = request(Rows { stock: vec![group("s2", ActorId::for_store(&store("s2")), 1)], ..Rows::default() });
        let err = check_push(&store("s1"), &req).unwrap_err();
        assert!(err.is_ownership());
        assert!(err.to_string().contains("store:s2"), "{err}");
        let cloud_slot = request(Rows { stock: vec![group("s1", ActorId::cloud(), 1)], ..Rows::default() });
        assert!(check_push(&store("s1"), &cloud_slot).unwrap_err().is_ownership());
    }

    #[test]
    fn a_store_writes_what_its_ledgers_wrote_and_nothing_of_another_store() {
        let current = ActorId::for_store_ledger(&store("s1"), "b7").unwrap();
        let mut req = request(Rows { stock: vec![group("s1", current.clone(), 2)], ..Rows::default() });
        req.sent_at.actor = current.clone();
        assert_eq!(check_push(&store("s1"), &req), Ok(()));

        // A ledger restored from a backup pushes what it wrote as its old actor too.
        let mut restored = request(Rows {
            stock: vec![group("s1", ActorId::for_store(&store("s1")), 1), group("s1", current.clone(), 1)],
            ..Rows::default()
        });
        restored.sent_at.actor = current.clone();
        assert_eq!(check_push(&store("s1"), &restored), Ok(()));

        // Another store's ledger's slot, in its own store or in ours, is refused.
        for (slot_store, actor) in [("s10", "store:s10:b7"), ("s1", "store:s10:b7"), ("s1", "store:s1:")] {
            let mut foreign =
                request(Rows { stock: vec![group(slot_store, ActorId::new(actor).unwrap(), 1)], ..Rows::default() });
            foreign.sent_at.actor = current.clone();
            let e = check_push(&store("s1"), &foreign).unwrap_err();
            assert!(matches!(e, PushRefusal::ForeignSlot { .. }) && e.is_ownership(), "{actor}: {e}");
        }

        // A request sent by another store's actor is refused even without a push.
        let mut foreign = request(Rows::default());
        foreign.push = None;
        foreign.sent_at.actor = ActorId::for_store_ledger(&store("s10"), "b7").unwrap();
        let e = check_push(&store("s1"), &foreign).unwrap_err();
        assert!(matches!(e, PushRefusal::ForeignSender { .. }) && e.is_ownership(), "{e}");
        assert!(e.to_string().contains("store:s10:b7"), "{e}");
    }

    #[test]
    fn a_changed_slot_costs_at_most_20_bytes_on_the_wire() {
        let n = 10_000;
        let req = request(Rows { stock: vec![group("s1", ActorId::for_store(&store("s1")), n)], ..Rows::default() });
        let bytes = wire::encode(&req).unwrap();
        let per_slot = bytes.len() as f64 / n as f64;
        assert!(per_slot <= 20.0, "{per_slot} bytes per slot");
        assert_eq!(wire::decode::<SyncRequest>(&bytes).unwrap(), req);
    }

    #[test]
    fn grouping_round_trips() {
        let a = ActorId::for_store(&store("s1"));
        let rows: Vec<SlotRow> = [("s1", &a, "X"), ("s1", &ActorId::cloud(), "Y"), ("s1", &a, "Z")]
            .iter()
            .map(|(s, actor, sku)| SlotRow {
                key: SlotKey { store: store(s), sku: Sku::new(*sku).unwrap(), actor: (*actor).clone() },
                slot: Slot { inc: 1, dec: 0 },
            })
            .collect();
        let grouped = Rows { stock: Rows::group_slots(rows.clone()), ..Rows::default() };
        assert_eq!(grouped.stock.len(), 2);
        let mut back: Vec<SlotRow> = grouped.slot_rows().collect();
        back.sort();
        let mut expected = rows;
        expected.sort();
        assert_eq!(back, expected);
    }

    #[test]
    fn a_store_pushes_only_its_own_allocation_rows_and_never_orders() {
        use crate::escrow::{EscrowKey, OrderId};
        let key = |s: &str| EscrowKey { store: store(s), sku: Sku::new("MILK").unwrap() };
        let own = Rows {
            escrow: vec![
                EscrowRow::Granted { key: key("s1"), granted: 5 },
                EscrowRow::Fulfilled { key: key("s1"), order: OrderId::new("W1").unwrap() },
            ],
            ..Rows::default()
        };
        check_push(&store("s1"), &request(own)).unwrap();
        for row in [
            EscrowRow::Granted { key: key("s2"), granted: 5 },
            EscrowRow::Released { key: key("s1"), released: 1 },
            EscrowRow::Reservation {
                key: key("s1"),
                order: OrderId::new("W1").unwrap(),
                units: 1,
                seq: 1,
                cancelled: false,
            },
        ] {
            let e = check_push(&store("s1"), &request(Rows { escrow: vec![row], ..Rows::default() })).unwrap_err();
            assert!(e.is_ownership(), "{e}");
        }
        let order = OrderId::new("W1").unwrap();
        let header = OrderHeader {
            pickup_code_digest: crate::orders::pickup_code_digest(&order, "000000"),
            order,
            store: store("s1"),
            customer_ref: "c".into(),
            created_at_ms: 1,
            expires_at_ms: 2,
            lines: vec![crate::orders::OrderLine { sku: Sku::new("MILK").unwrap(), units: 1 }],
        };
        let e = check_push(&store("s1"), &request(Rows { orders: vec![header], ..Rows::default() })).unwrap_err();
        assert!(matches!(e, PushRefusal::ForeignOrder { .. }), "{e}");
    }
}
