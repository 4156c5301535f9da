//! What callers ask the ledger to do ([`Command`]) and what the ledger records ([`EventBody`]).
//!
//! A command is validated without I/O before it touches SQLite; the writer then *resolves* it
//! into an event body with everything needed to replay it (a count records the value it saw and
//! the movement it made), and that body is what is hashed, stored and returned to replays.

use serde::{Deserialize, Serialize};
use shared::sync::{Cursor, Rows};
use shared::{
    ActorId, CatalogField, Currency, EscrowRow, Money, OrderId, OrderLine, PriceKey, PriceScope, PriceValue,
    PriceVersion, Side, Sku, Slot, StoreId,
};

/// Longest accepted idempotency key, in bytes.
pub const MAX_KEY_LEN: usize = 200;
/// Most lines in one sale or return.
pub const MAX_LINES: usize = 500;
/// Most GTINs one product may carry.
pub const MAX_GTINS: usize = 32;
/// Longest free-text field (reason, reference), in bytes.
pub const MAX_TEXT_LEN: usize = 200;

/// Identifies a command by its business identity (lane + basket, order + step, device + boot +
/// sequence), so a retry after a crash finds the first result instead of applying twice.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn new(key: impl Into<String>) -> Result<IdempotencyKey, Rejection> {
        let key = key.into();
        if key.is_empty() || key.len() > MAX_KEY_LEN || key.chars().any(char::is_control) {
            return Err(Rejection::new(format!(
                "idempotency key {:?} must be 1 to {MAX_KEY_LEN} bytes without control characters",
                key.chars().take(40).collect::<String>()
            )));
        }
        Ok(IdempotencyKey(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A command refused before anything was written: says what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejection(pub String);

impl Rejection {
    pub fn new(msg: impl Into<String>) -> Rejection {
        Rejection(msg.into())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tender {
    Cash,
    Card,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleLine {
    pub sku: Sku,
    /// Base units: pieces, or grams for weighed goods.
    pub quantity: i64,
    /// Price of the whole line, as charged.
    pub line_total: Money,
    /// The price register write the till charged from, when the line was priced by the system.
    pub price: Option<PriceVersion>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Goods leave with a customer: stock goes down by each line.
    Sale { lines: Vec<SaleLine>, tender: Tender },
    /// Goods come back from a customer: stock goes up by each line.
    Return { lines: Vec<SaleLine>, reference: String },
    /// Goods received from a delivery.
    Receipt { sku: Sku, quantity: i64, reference: String },
    /// A count observed `counted` units on hand: an observation, not an overwrite (DESIGN 13.2).
    Count { sku: Sku, counted: i64 },
    /// A correction (breakage, theft found, ...), positive or negative.
    Adjustment { sku: Sku, movement: i64, reason: String },
    /// Sets (or with `value: None` withdraws) one price register.
    PriceChange { key: PriceKey, value: Option<PriceValue> },
    /// Sets one catalog field.
    CatalogChange { sku: Sku, field: CatalogField },
    /// These RFID-tagged items left with a sale (read at its lane): the exit gate lets them pass.
    EpcsSold { epcs: Vec<Vec<u8>> },
    /// The customer collects an online order, proving it with the pickup code HQ gave them.
    /// The writer checks the code and the order's state; the code itself is never recorded.
    Handover { order: OrderId, code: String },
    /// Staff put an online order's goods aside for pickup (a local mark; no stock moves).
    Pick { order: OrderId },
}

/// The resolved, replayable record of a command, as hashed and stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventBody {
    Sale {
        lines: Vec<SaleLine>,
        tender: Tender,
        total: Money,
    },
    Return {
        lines: Vec<SaleLine>,
        reference: String,
        total: Money,
    },
    Receipt {
        sku: Sku,
        quantity: i64,
        reference: String,
    },
    Count {
        sku: Sku,
        counted: i64,
        seen: i64,
        movement: i64,
    },
    Adjustment {
        sku: Sku,
        movement: i64,
        reason: String,
    },
    PriceChange {
        key: PriceKey,
        value: Option<PriceValue>,
    },
    CatalogChange {
        sku: Sku,
        field: CatalogField,
    },
    EpcsSold {
        epcs: Vec<Vec<u8>>,
    },
    /// A page of the cloud's rows merged into the projections (DESIGN 13.6: every merge leaves
    /// a trace): which cursor it came from, which it moved to, and the rows themselves, so an
    /// auditor can replay how the store reached its state.
    /// `refused` names the rows of the page this store would not merge, with the reason.
    SyncMerge {
        from: Cursor,
        to: Cursor,
        rows: Rows,
        refused: Vec<String>,
    },
    /// The writer granted `units` of a SKU to the online channel (the top-up policy), taking the
    /// store's grant to `granted` in total. What it saw is kept so an auditor can check the
    /// grant was free stock: `on_hand - committed - safety_stock >= units`.
    Grant {
        sku: Sku,
        units: u64,
        granted: u64,
        on_hand: i64,
        committed: i64,
        safety_stock: u64,
        target: u64,
    },
    /// An online order was handed over at `at_ms` (Unix ms): each line leaves the store's own
    /// stock slot, in the same transaction as its `Fulfilled` allocation rows.
    Handover {
        order: OrderId,
        lines: Vec<OrderLine>,
        at_ms: i64,
    },
    /// Staff put an online order aside at `at_ms`.
    Pick {
        order: OrderId,
        at_ms: i64,
    },
}

/// Version byte in front of every stored body, so a later format can be told apart. Version 2:
/// sync pages carry allocation rows and order headers (`Rows` grew two fields); version-1
/// bodies are still read ([`legacy`]), since the hash chain covers their bytes as written.
pub const BODY_VERSION: u8 = 2;

impl EventBody {
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::Sale { .. } => "sale",
            EventBody::Return { .. } => "return",
            EventBody::Receipt { .. } => "receipt",
            EventBody::Count { .. } => "count",
            EventBody::Adjustment { .. } => "adjustment",
            EventBody::PriceChange { .. } => "price_change",
            EventBody::CatalogChange { .. } => "catalog_change",
            EventBody::EpcsSold { .. } => "epcs_sold",
            EventBody::SyncMerge { .. } => "sync_merge",
            EventBody::Grant { .. } => "online_grant",
            EventBody::Handover { .. } => "order_handover",
            EventBody::Pick { .. } => "order_pick",
        }
    }

    /// Whether this event writes allocation rows (a page carrying them, a grant, a handover):
    /// until one did, the writer skips its online checks.
    pub fn carries_allocation(&self) -> bool {
        match self {
            EventBody::SyncMerge { rows, .. } => !rows.escrow.is_empty(),
            EventBody::Grant { .. } | EventBody::Handover { .. } => true,
            _ => false,
        }
    }

    /// Whether `request` is the command this recorded event answered, so that a key seen before
    /// may return this event as its first result. The same kind on the same subject (order,
    /// SKU, price register); what the writer resolves (a count's `seen`, a handover's lines and
    /// time) and what a retry may legitimately carry differently are not compared.
    pub fn same_command(&self, request: &EventBody) -> bool {
        use EventBody as B;
        match (self, request) {
            (B::Handover { order: a, .. }, B::Handover { order: b, .. })
            | (B::Pick { order: a, .. }, B::Pick { order: b, .. }) => a == b,
            (B::Grant { sku: a, granted: ga, .. }, B::Grant { sku: b, granted: gb, .. }) => a == b && ga == gb,
            (B::Count { sku: a, counted: ca, .. }, B::Count { sku: b, counted: cb, .. }) => a == b && ca == cb,
            (B::Receipt { sku: a, .. }, B::Receipt { sku: b, .. })
            | (B::Adjustment { sku: a, .. }, B::Adjustment { sku: b, .. })
            | (B::CatalogChange { sku: a, .. }, B::CatalogChange { sku: b, .. }) => a == b,
            (B::PriceChange { key: a, .. }, B::PriceChange { key: b, .. }) => a == b,
            (a, b) => a.kind() == b.kind(),
        }
    }

    /// A few words naming the event, for messages: `handover of W-1`, `count of MILK`.
    pub fn describe(&self) -> String {
        match self {
            EventBody::Sale { lines, .. } => format!("sale of {} lines", lines.len()),
            EventBody::Return { lines, .. } => format!("return of {} lines", lines.len()),
            EventBody::Receipt { sku, .. } => format!("receipt of {sku}"),
            EventBody::Count { sku, .. } => format!("count of {sku}"),
            EventBody::Adjustment { sku, .. } => format!("adjustment of {sku}"),
            EventBody::PriceChange { key, .. } => format!("price change of {}", key.sku),
            EventBody::CatalogChange { sku, .. } => format!("catalog change of {sku}"),
            EventBody::EpcsSold { epcs } => format!("{} sold RFID tags", epcs.len()),
            EventBody::SyncMerge { .. } => "sync merge".to_owned(),
            EventBody::Grant { sku, granted, .. } => format!("online grant of {sku} to {granted}"),
            EventBody::Handover { order, .. } => format!("handover of {order}"),
            EventBody::Pick { order, .. } => format!("pick of {order}"),
        }
    }

    /// The stock movements this event made in the store's own slot. The writer applies them and
    /// `ledger verify` replays them, so the two can never disagree on what an event means.
    pub fn stock_movements(&self) -> Vec<(&Sku, i64)> {
        match self {
            EventBody::Sale { lines, .. } => lines.iter().map(|l| (&l.sku, -l.quantity)).collect(),
            EventBody::Return { lines, .. } => lines.iter().map(|l| (&l.sku, l.quantity)).collect(),
            EventBody::Receipt { sku, quantity, .. } => vec![(sku, *quantity)],
            EventBody::Count { sku, movement, .. } | EventBody::Adjustment { sku, movement, .. } => {
                vec![(sku, *movement)]
            }
            // Units are at most `Escrow::MAX` (= i64::MAX) by validation; a tampered body is caught
            // by its hash before this is replayed, and saturates rather than wraps.
            EventBody::Handover { lines, .. } => {
                lines.iter().map(|l| (&l.sku, -i64::try_from(l.units).unwrap_or(i64::MAX))).collect()
            }
            EventBody::PriceChange { .. }
            | EventBody::CatalogChange { .. }
            | EventBody::EpcsSold { .. }
            | EventBody::SyncMerge { .. }
            | EventBody::Grant { .. }
            | EventBody::Pick { .. } => Vec::new(),
        }
    }

    /// The SKUs whose stock or online allocation this event changes (or whose policy, through
    /// the catalog): after a commit the writer tops these up and checks them for orders at risk.
    pub fn touched_skus(&self) -> Vec<&Sku> {
        match self {
            EventBody::SyncMerge { rows, .. } => rows
                .stock
                .iter()
                .flat_map(|g| g.slots.iter().map(|s| &s.sku))
                .chain(rows.escrow.iter().map(|r| &r.key().sku))
                .chain(rows.catalog.iter().map(|c| &c.sku))
                .collect(),
            EventBody::CatalogChange { sku, .. } | EventBody::Grant { sku, .. } => vec![sku],
            other => other.stock_movements().into_iter().map(|(sku, _)| sku).collect(),
        }
    }

    /// The store's own allocation rows this event wrote or brought back (a rebuilt store pulls
    /// its own rows from the cloud): what `ledger verify` replays against the escrow table.
    pub fn own_escrow_rows(&self, store: &StoreId) -> Vec<EscrowRow> {
        let own = Side::Store(store.clone());
        match self {
            EventBody::SyncMerge { rows, .. } => {
                rows.escrow.iter().filter(|r| r.key().store == *store && r.owner() == own).cloned().collect()
            }
            EventBody::Grant { sku, granted, .. } => vec![EscrowRow::Granted {
                key: shared::EscrowKey { store: store.clone(), sku: sku.clone() },
                granted: *granted,
            }],
            EventBody::Handover { order, lines, .. } => lines
                .iter()
                .map(|l| EscrowRow::Fulfilled {
                    key: shared::EscrowKey { store: store.clone(), sku: l.sku.clone() },
                    order: order.clone(),
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The store's own slots as a cloud page brought them back (a store rebuilding its ledger
    /// pulls from the start): merged per-slot max into the own slot, by the writer and by
    /// `ledger verify` alike.
    pub fn own_slot_merges<'a>(&'a self, store: &StoreId, actor: &ActorId) -> Vec<(&'a Sku, Slot)> {
        match self {
            EventBody::SyncMerge { rows, .. } => rows
                .stock
                .iter()
                .filter(|g| g.store == *store && g.actor == *actor)
                .flat_map(|g| g.slots.iter().map(|s| (&s.sku, Slot { inc: s.inc, dec: s.dec })))
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // postcard only fails for types serde cannot size (none here) or a full fixed buffer
        // (a Vec grows), so this cannot fail on any value of this type.
        // Room for a typical sale up front: growing from one byte reallocated four times.
        let mut out = Vec::with_capacity(64);
        out.push(BODY_VERSION);
        postcard::to_extend(self, out).expect("EventBody serialises into a Vec")
    }

    pub fn decode(bytes: &[u8]) -> Result<EventBody, String> {
        match bytes.split_first() {
            Some((&BODY_VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| format!("undecodable body: {e}")),
            Some((&legacy::VERSION, rest)) => legacy::decode(rest),
            Some((v, _)) => Err(format!("unknown body version {v} (this build reads 1 and {BODY_VERSION})")),
            None => Err("empty body".into()),
        }
    }
}

/// Bodies of version 1, written before online orders: the same events, with sync pages whose
/// `Rows` had stock, prices and catalog only. postcard is not self-describing, so they are read
/// with the types they were written with (variants in the same order) and converted.
pub mod legacy {
    use serde::Deserialize;
    use shared::sync::{Cursor, Rows, SlotGroup};
    use shared::{CatalogField, CatalogUpdate, Money, PriceEntry, PriceKey, PriceValue, Sku};

    use super::{EventBody, SaleLine, Tender};

    pub const VERSION: u8 = 1;

    /// Decodes `bytes` as `T`, every byte of them: postcard's `from_bytes` ignores what follows
    /// a value, so a body of another shape could pass as a shorter one.
    fn exactly<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
        match postcard::take_from_bytes::<T>(bytes) {
            Ok((value, [])) => Ok(value),
            Ok((_, rest)) => Err(format!("{} bytes left over", rest.len())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A version-1 body: the shape written before online orders (sync pages of stock, prices
    /// and catalog), or else the shape intermediate builds wrote under the same version byte
    /// (pages with allocation rows and order headers, the online events): today's.
    pub fn decode(bytes: &[u8]) -> Result<EventBody, String> {
        match exactly::<EventBodyV1>(bytes) {
            Ok(v1) => Ok(EventBody::from(v1)),
            Err(first) => exactly::<EventBody>(bytes).map_err(|second| {
                format!("undecodable version-1 body: {first} (as written with online orders: {second})")
            }),
        }
    }

    #[derive(Deserialize)]
    pub struct RowsV1 {
        stock: Vec<SlotGroup>,
        prices: Vec<PriceEntry>,
        catalog: Vec<CatalogUpdate>,
    }

    #[derive(Deserialize)]
    pub enum EventBodyV1 {
        Sale { lines: Vec<SaleLine>, tender: Tender, total: Money },
        Return { lines: Vec<SaleLine>, reference: String, total: Money },
        Receipt { sku: Sku, quantity: i64, reference: String },
        Count { sku: Sku, counted: i64, seen: i64, movement: i64 },
        Adjustment { sku: Sku, movement: i64, reason: String },
        PriceChange { key: PriceKey, value: Option<PriceValue> },
        CatalogChange { sku: Sku, field: CatalogField },
        EpcsSold { epcs: Vec<Vec<u8>> },
        SyncMerge { from: Cursor, to: Cursor, rows: RowsV1, refused: Vec<String> },
    }

    impl From<EventBodyV1> for EventBody {
        fn from(v1: EventBodyV1) -> EventBody {
            match v1 {
                EventBodyV1::Sale { lines, tender, total } => EventBody::Sale { lines, tender, total },
                EventBodyV1::Return { lines, reference, total } => EventBody::Return { lines, reference, total },
                EventBodyV1::Receipt { sku, quantity, reference } => EventBody::Receipt { sku, quantity, reference },
                EventBodyV1::Count { sku, counted, seen, movement } => {
                    EventBody::Count { sku, counted, seen, movement }
                }
                EventBodyV1::Adjustment { sku, movement, reason } => EventBody::Adjustment { sku, movement, reason },
                EventBodyV1::PriceChange { key, value } => EventBody::PriceChange { key, value },
                EventBodyV1::CatalogChange { sku, field } => EventBody::CatalogChange { sku, field },
                EventBodyV1::EpcsSold { epcs } => EventBody::EpcsSold { epcs },
                EventBodyV1::SyncMerge { from, to, rows, refused } => EventBody::SyncMerge {
                    from,
                    to,
                    rows: Rows { stock: rows.stock, prices: rows.prices, catalog: rows.catalog, ..Rows::default() },
                    refused,
                },
            }
        }
    }
}

/// What validation needs to know about the store.
#[derive(Debug, Clone)]
pub struct StoreContext {
    pub store: StoreId,
    pub currency: Currency,
}

fn check_text(what: &str, text: &str) -> Result<(), Rejection> {
    if text.len() > MAX_TEXT_LEN || text.chars().any(char::is_control) {
        return Err(Rejection::new(format!("{what} must be at most {MAX_TEXT_LEN} bytes without control characters")));
    }
    Ok(())
}

fn check_quantity(what: &str, sku: &Sku, quantity: i64) -> Result<(), Rejection> {
    if quantity <= 0 {
        return Err(Rejection::new(format!("{what} of {sku}: quantity must be positive, got {quantity}")));
    }
    Ok(())
}

fn check_money(ctx: &StoreContext, sku: &Sku, amount: &Money) -> Result<(), Rejection> {
    if amount.currency != ctx.currency {
        return Err(Rejection::new(format!("{sku}: amount {amount} is not in the store currency {}", ctx.currency)));
    }
    Ok(())
}

fn total_of(ctx: &StoreContext, what: &str, lines: &[SaleLine]) -> Result<Money, Rejection> {
    if lines.is_empty() || lines.len() > MAX_LINES {
        return Err(Rejection::new(format!("{what} must have 1 to {MAX_LINES} lines, got {}", lines.len())));
    }
    let mut total = Money::new(0, ctx.currency);
    for (i, line) in lines.iter().enumerate() {
        check_quantity(&format!("{what} line {}", i + 1), &line.sku, line.quantity)?;
        check_money(ctx, &line.sku, &line.line_total)?;
        total = total
            .checked_add(line.line_total)
            .map_err(|e| Rejection::new(format!("{what} line {}: total {e}", i + 1)))?;
    }
    Ok(total)
}

impl Command {
    /// Checks everything that can be checked without the database, and fills in what can be
    /// computed from the command alone. A `Count` is completed by the writer, which knows the
    /// stock it observes (`seen`), so here it carries `seen: 0, movement: 0`.
    pub fn validate(&self, ctx: &StoreContext) -> Result<EventBody, Rejection> {
        Ok(match self {
            Command::Sale { lines, tender } => {
                EventBody::Sale { total: total_of(ctx, "sale", lines)?, lines: lines.clone(), tender: *tender }
            }
            Command::Return { lines, reference } => {
                check_text("return reference", reference)?;
                EventBody::Return {
                    total: total_of(ctx, "return", lines)?,
                    lines: lines.clone(),
                    reference: reference.clone(),
                }
            }
            Command::Receipt { sku, quantity, reference } => {
                check_quantity("receipt", sku, *quantity)?;
                check_text("receipt reference", reference)?;
                EventBody::Receipt { sku: sku.clone(), quantity: *quantity, reference: reference.clone() }
            }
            Command::Count { sku, counted } => {
                if *counted < 0 {
                    return Err(Rejection::new(format!(
                        "count of {sku}: counted units must not be negative, got {counted}"
                    )));
                }
                EventBody::Count { sku: sku.clone(), counted: *counted, seen: 0, movement: 0 }
            }
            Command::Adjustment { sku, movement, reason } => {
                if *movement == 0 {
                    return Err(Rejection::new(format!("adjustment of {sku}: movement must not be zero")));
                }
                check_text("adjustment reason", reason)?;
                EventBody::Adjustment { sku: sku.clone(), movement: *movement, reason: reason.clone() }
            }
            Command::PriceChange { key, value } => {
                if let PriceScope::Store(s) = &key.scope {
                    if s != &ctx.store {
                        return Err(Rejection::new(format!(
                            "price of {}: store {s} is not this store ({})",
                            key.sku, ctx.store
                        )));
                    }
                }
                if let Some(v) = value {
                    v.validate(&key.sku).map_err(|e| Rejection::new(e.to_string()))?;
                    check_money(ctx, &key.sku, &v.amount)?;
                }
                EventBody::PriceChange { key: key.clone(), value: value.clone() }
            }
            Command::EpcsSold { epcs } => {
                if epcs.is_empty() || epcs.len() > MAX_LINES {
                    return Err(Rejection::new(format!("sold EPCs: 1 to {MAX_LINES} per event, got {}", epcs.len())));
                }
                if let Some(bad) = epcs.iter().find(|e| e.is_empty() || e.len() > 32) {
                    return Err(Rejection::new(format!("sold EPC of {} bytes: an EPC has 1 to 32", bad.len())));
                }
                EventBody::EpcsSold { epcs: epcs.clone() }
            }
            Command::CatalogChange { sku, field } => {
                if let CatalogField::Name(name) = field {
                    check_text("product name", name)?;
                }
                if let CatalogField::Gtins(g) = field {
                    if g.len() > MAX_GTINS {
                        return Err(Rejection::new(format!(
                            "{sku}: at most {MAX_GTINS} GTINs per product, got {}",
                            g.len()
                        )));
                    }
                }
                if let CatalogField::TaxClass(t) = field {
                    check_text("tax class", &t.0)?;
                }
                if let CatalogField::Category(c) = field {
                    check_text("category", c)?;
                }
                EventBody::CatalogChange { sku: sku.clone(), field: field.clone() }
            }
            // The writer completes both from the order it holds (lines, time) or refuses them.
            Command::Handover { order, code } => {
                // The code is never echoed (see `OrderRefusal::MistypedCode`).
                shared::orders::check_pickup_code_format(code).map_err(|_| {
                    Rejection::new(crate::orders::OrderRefusal::MistypedCode { order: order.clone() }.to_string())
                })?;
                EventBody::Handover { order: order.clone(), lines: Vec::new(), at_ms: 0 }
            }
            Command::Pick { order } => EventBody::Pick { order: order.clone(), at_ms: 0 },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{PriceSlot, ValidityWindow};

    fn ctx() -> StoreContext {
        StoreContext { store: StoreId::new("s1").unwrap(), currency: Currency::new("EUR").unwrap() }
    }
    fn eur(c: i64) -> Money {
        Money::new(c, Currency::new("EUR").unwrap())
    }
    fn sku(s: &str) -> Sku {
        Sku::new(s).unwrap()
    }

    #[test]
    fn sale_total_is_the_sum_of_its_lines() {
        let cmd = Command::Sale {
            lines: vec![
                SaleLine { sku: sku("A"), quantity: 2, line_total: eur(398), price: None },
                SaleLine { sku: sku("B"), quantity: 1, line_total: eur(100), price: None },
            ],
            tender: Tender::Card,
        };
        let body = cmd.validate(&ctx()).unwrap();
        assert!(matches!(&body, EventBody::Sale { total, .. } if total.minor == 498));
        assert_eq!(body.stock_movements(), vec![(&sku("A"), -2), (&sku("B"), -1)]);
        assert_eq!(EventBody::decode(&body.encode()).unwrap(), body);
    }

    #[test]
    fn refuses_bad_commands_saying_what_is_wrong() {
        let neg_price = Command::PriceChange {
            key: PriceKey { sku: sku("A"), scope: PriceScope::Chain, slot: PriceSlot::Regular },
            value: Some(PriceValue { amount: eur(-5), window: None }),
        };
        assert_eq!(neg_price.validate(&ctx()).unwrap_err().0, "price of A must not be negative: -0.05 EUR");
        let usd = Command::PriceChange {
            key: PriceKey { sku: sku("A"), scope: PriceScope::Chain, slot: PriceSlot::Promotion },
            value: Some(PriceValue {
                amount: Money::new(5, Currency::new("USD").unwrap()),
                window: Some(ValidityWindow { from_ms: 1, until_ms: 2 }),
            }),
        };
        assert!(usd.validate(&ctx()).unwrap_err().0.contains("store currency EUR"));
        let other_store = Command::PriceChange {
            key: PriceKey {
                sku: sku("A"),
                scope: PriceScope::Store(StoreId::new("s2").unwrap()),
                slot: PriceSlot::Regular,
            },
            value: None,
        };
        assert!(other_store.validate(&ctx()).is_err());
        assert!(Command::Sale { lines: vec![], tender: Tender::Cash }.validate(&ctx()).is_err());
        assert!(Command::Receipt { sku: sku("A"), quantity: 0, reference: "x".into() }.validate(&ctx()).is_err());
        assert!(Command::Count { sku: sku("A"), counted: -1 }.validate(&ctx()).is_err());
        assert!(IdempotencyKey::new("").is_err());
        assert!(IdempotencyKey::new("a\nb").is_err());
    }

    #[test]
    fn bodies_of_unknown_versions_are_refused() {
        assert!(EventBody::decode(&[]).is_err());
        assert!(EventBody::decode(&[9, 0]).unwrap_err().contains("unknown body version 9"));
        assert!(EventBody::decode(&[BODY_VERSION, 0xff, 0xff]).is_err());
    }

    /// A sync page recorded before online orders (body version 1) still reads, as the same page.
    #[test]
    fn version_1_bodies_still_read() {
        use shared::sync::{SlotGroup, SlotValue};
        #[derive(Serialize)]
        struct RowsV1 {
            stock: Vec<SlotGroup>,
            prices: Vec<shared::PriceEntry>,
            catalog: Vec<shared::CatalogUpdate>,
        }
        #[derive(Serialize)]
        #[allow(dead_code)]
        enum V1 {
            Sale { lines: Vec<SaleLine>, tender: Tender, total: Money },
            Return,
            Receipt,
            Count,
            Adjustment,
            PriceChange,
            CatalogChange,
            EpcsSold,
            SyncMerge { from: Cursor, to: Cursor, rows: RowsV1, refused: Vec<String> },
        }
        let group = SlotGroup {
            store: StoreId::new("s1").unwrap(),
            actor: ActorId::cloud(),
            slots: vec![SlotValue { sku: sku("A"), inc: 5, dec: 1 }],
        };
        let old = V1::SyncMerge {
            from: Cursor::default(),
            to: Cursor { chain: 1, store: 2 },
            rows: RowsV1 { stock: vec![group.clone()], prices: vec![], catalog: vec![] },
            refused: vec!["a row".into()],
        };
        let bytes = postcard::to_extend(&old, vec![1u8]).unwrap();
        let body = EventBody::decode(&bytes).unwrap();
        let expected = EventBody::SyncMerge {
            from: Cursor::default(),
            to: Cursor { chain: 1, store: 2 },
            rows: Rows { stock: vec![group], ..Rows::default() },
            refused: vec!["a row".into()],
        };
        assert_eq!(body, expected);
        let sale = V1::Sale {
            lines: vec![SaleLine { sku: sku("A"), quantity: 1, line_total: eur(5), price: None }],
            tender: Tender::Cash,
            total: eur(5),
        };
        let bytes = postcard::to_extend(&sale, vec![1u8]).unwrap();
        assert!(matches!(EventBody::decode(&bytes).unwrap(), EventBody::Sale { total, .. } if total.minor == 5));
    }

    /// Intermediate builds wrote today's shape (pages with allocation rows, the online events)
    /// under version byte 1: those read as written; bytes left over after a body refuse it.
    #[test]
    fn version_1_bodies_of_the_intermediate_shape_read_and_trailing_bytes_refuse() {
        let key = shared::EscrowKey { store: StoreId::new("s1").unwrap(), sku: sku("A") };
        let page = EventBody::SyncMerge {
            from: Cursor::default(),
            to: Cursor { chain: 1, store: 2 },
            rows: Rows { escrow: vec![EscrowRow::Granted { key, granted: 4 }], ..Rows::default() },
            refused: vec![],
        };
        let handover = EventBody::Handover {
            order: OrderId::new("W-1").unwrap(),
            lines: vec![OrderLine { sku: sku("A"), units: 2 }],
            at_ms: 5,
        };
        for body in [page, handover] {
            let bytes = postcard::to_extend(&body, vec![legacy::VERSION]).unwrap();
            assert_eq!(EventBody::decode(&bytes).unwrap(), body);
        }
        let sale = EventBody::Sale {
            lines: vec![SaleLine { sku: sku("A"), quantity: 1, line_total: eur(5), price: None }],
            tender: Tender::Cash,
            total: eur(5),
        };
        let mut bytes = postcard::to_extend(&sale, vec![legacy::VERSION]).unwrap();
        assert_eq!(EventBody::decode(&bytes).unwrap(), sale);
        bytes.extend([0xff, 0xff]);
        let err = EventBody::decode(&bytes).unwrap_err();
        assert!(err.contains("2 bytes left over"), "{err}");
    }

    #[test]
    fn a_key_names_one_command_whatever_the_writer_resolved() {
        let w1 = OrderId::new("W-1").unwrap();
        let w2 = OrderId::new("W-2").unwrap();
        let recorded =
            EventBody::Handover { order: w1.clone(), lines: vec![OrderLine { sku: sku("A"), units: 2 }], at_ms: 5 };
        let retry = EventBody::Handover { order: w1.clone(), lines: vec![], at_ms: 0 };
        assert!(recorded.same_command(&retry));
        assert!(!recorded.same_command(&EventBody::Handover { order: w2, lines: vec![], at_ms: 0 }));
        assert!(!recorded.same_command(&EventBody::Pick { order: w1, at_ms: 0 }));
        let count = EventBody::Count { sku: sku("A"), counted: 5, seen: 7, movement: -2 };
        assert!(count.same_command(&EventBody::Count { sku: sku("A"), counted: 5, seen: 0, movement: 0 }));
        assert!(!count.same_command(&EventBody::Count { sku: sku("B"), counted: 5, seen: 0, movement: 0 }));
        assert_eq!(recorded.describe(), "handover of W-1");
    }

    #[test]
    fn a_handover_checks_the_code_format_and_moves_every_line_out() {
        let order = OrderId::new("W-1").unwrap();
        let bad = Command::Handover { order: order.clone(), code: "12a456".into() };
        let err = bad.validate(&ctx()).unwrap_err().0;
        assert!(err.starts_with("order W-1: a pickup code is 6 digits"), "{err}");
        assert!(!err.contains("12a456"), "the mistyped code is not repeated: {err}");
        let body = EventBody::Handover {
            order,
            lines: vec![OrderLine { sku: sku("A"), units: 2 }, OrderLine { sku: sku("B"), units: 1 }],
            at_ms: 5,
        };
        assert_eq!(body.stock_movements(), vec![(&sku("A"), -2), (&sku("B"), -1)]);
        assert_eq!(body.own_escrow_rows(&StoreId::new("s1").unwrap()).len(), 2);
        assert_eq!(EventBody::decode(&body.encode()).unwrap(), body);
    }
}
