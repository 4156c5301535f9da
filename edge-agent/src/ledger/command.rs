//! What callers ask the ledger to do ([`Command`]) and what the ledger records ([`EventBody`]).
//!
//! A command is validated without I/O before it touches SQLite; the writer then *resolves* it
//! into an event body with everything needed to replay it (a count records the value it saw and
//! the movement it made), and that body is what is hashed, stored and returned to replays.

use serde::{Deserialize, Serialize};
use shared::sync::{Cursor, Rows};
use shared::{
    ActorId, CatalogField, Currency, Money, PriceKey, PriceScope, PriceValue, PriceVersion, Sku, SlotRow, StoreId,
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
}

/// Version byte in front of every stored body, so a later format can be told apart.
pub const BODY_VERSION: u8 = 1;

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
            EventBody::PriceChange { .. }
            | EventBody::CatalogChange { .. }
            | EventBody::EpcsSold { .. }
            | EventBody::SyncMerge { .. } => Vec::new(),
        }
    }

    /// The store's own slots as a cloud page brought them back (a store rebuilding its ledger
    /// pulls from the start): merged per-slot max into the own slot, by the writer and by
    /// `ledger verify` alike.
    pub fn own_slot_merges<'a>(&'a self, store: &'a StoreId, actor: &'a ActorId) -> Vec<SlotRow> {
        match self {
            EventBody::SyncMerge { rows, .. } => {
                rows.slot_rows().filter(|r| r.key.store == *store && r.key.actor == *actor).collect()
            }
            _ => Vec::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // postcard only fails for types serde cannot size (none here) or a full fixed buffer
        // (a Vec grows), so this cannot fail on any value of this type.
        postcard::to_extend(self, vec![BODY_VERSION]).expect("EventBody serialises into a Vec")
    }

    pub fn decode(bytes: &[u8]) -> Result<EventBody, String> {
        match bytes.split_first() {
            Some((&BODY_VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| format!("undecodable body: {e}")),
            Some((v, _)) => Err(format!("unknown body version {v} (this build reads {BODY_VERSION})")),
            None => Err("empty body".into()),
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
                EventBody::CatalogChange { sku: sku.clone(), field: field.clone() }
            }
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
}
