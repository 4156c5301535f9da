//! The self-checkout lane as a pure state machine: inputs (a scan, a scale reading, a
//! customer's touch, the ledger's answer) go in, outputs (display updates, a basket snapshot
//! to persist, a sale to commit) come out. No I/O, no clock: `lane::runtime` wires it to the
//! serial links and the ledger, and the tests drive it directly.
//!
//! Weighed items are priced per kilogram: `amount = round(price_per_kg * grams / 1000)`, rounded
//! half up to the currency's minor unit (1.5 cents becomes 2 cents), computed in 128-bit
//! integers so no intermediate overflows.

pub mod catalog;
pub mod runtime;

use serde::{Deserialize, Serialize};
use shared::{Currency, DeviceId, Gtin, Money, PriceVersion, Sku, StoreId, Unit};

use crate::ledger::{SaleLine, Tender};

/// Most lines a basket may hold (a ledger sale takes at most `ledger::command::MAX_LINES`).
pub const MAX_LINES: usize = 200;
/// Largest quantity of one piece line.
pub const MAX_QUANTITY: u32 = 999;

/// What the lane's catalog lookup knows about a product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub sku: Sku,
    pub name: String,
    pub unit: Unit,
    pub discontinued: bool,
    /// Price per piece, or per kilogram for weighed goods, and where it came from.
    pub price: Option<(Money, PriceVersion)>,
}

/// Product lookup by GTIN at a point in time (the lane's view of the catalog and prices).
pub trait Catalog {
    fn lookup(&self, gtin: &Gtin, at_ms: u64) -> Result<Option<Product>, String>;
}

/// A scale reading as the lane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightReading {
    pub grams: i32,
    pub stable: bool,
    pub under_zero: bool,
    pub over_capacity: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaneInput {
    Scan {
        data: Vec<u8>,
    },
    Weight(WeightReading),
    StartBasket,
    SetQuantity {
        line: u16,
        quantity: u32,
    },
    VoidLine {
        line: u16,
    },
    Tender(Tender),
    VoidBasket,
    /// The lane display's link came back: show it everything again.
    DisplayReconnected,
    /// The ledger made the sale under `key` durable (now, or on an earlier try).
    Committed {
        key: String,
        receipt_id: String,
        total: Money,
    },
    /// The ledger could not record the sale; the basket stays and payment can be retried.
    /// `key_taken`: the key already names a different sale, so the retry needs a new key.
    CommitFailed {
        reason: String,
        key_taken: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageCode {
    UnknownProduct,
    InvalidBarcode,
    Discontinued,
    WaitForStableWeight,
    ScaleError,
    Info,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Display {
    Line { line: u16, text: String, quantity: i64, amount: Money },
    LineVoided { line: u16 },
    Total { amount: Money, items: u16 },
    Message { code: MessageCode, text: String },
    Receipt { receipt_id: String, total: Money },
    Cleared,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaneOutput {
    Display(Display),
    /// Persist this basket (through the ledger writer) so a restart resumes it.
    Persist(Basket),
    /// Commit this sale; the key is the lane + basket, so a retry never sells twice.
    Commit {
        key: String,
        lines: Vec<SaleLine>,
        tender: Tender,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BasketLine {
    pub line: u16,
    pub sku: Sku,
    pub gtin: Gtin,
    pub name: String,
    pub unit: Unit,
    /// Pieces, or grams for weighed goods.
    pub quantity: i64,
    /// Per piece, or per kilogram.
    pub unit_price: Money,
    pub price: PriceVersion,
    pub amount: Money,
    pub voided: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Basket {
    /// Chosen at random when a lane starts without a saved basket and carried from basket to
    /// basket: if the saved basket is ever lost, the numbers restart under a new session, so a
    /// new basket can never take an old sale's idempotency key.
    pub session: u64,
    /// Counts up per lane session; with the lane and session it is the sale's idempotency key.
    pub number: u64,
    pub lines: Vec<BasketLine>,
    /// A weighed item scanned before a stable weight: it waits for one.
    pub awaiting_weight: Option<(Gtin, Sku)>,
    /// Set once the customer paid: the sale is being committed.
    pub tendering: Option<Tender>,
}

impl Basket {
    pub fn new(session: u64, number: u64) -> Basket {
        Basket { session, number, lines: Vec::new(), awaiting_weight: None, tendering: None }
    }

    /// The next, empty basket of the same session.
    pub fn next(&self) -> Basket {
        Basket::new(self.session, self.number.saturating_add(1))
    }

    /// Whether a basket read back from storage is one this code could have written: lines
    /// numbered 1..n in order, within bounds, in the lane's currency.
    pub fn check(&self, currency: Currency) -> Result<(), String> {
        if self.lines.len() > MAX_LINES {
            return Err(format!("{} lines, at most {MAX_LINES}", self.lines.len()));
        }
        for (i, l) in self.lines.iter().enumerate() {
            if usize::from(l.line) != i + 1 {
                return Err(format!("line {} is numbered {}", i + 1, l.line));
            }
            if l.amount.currency != currency || l.unit_price.currency != currency {
                return Err(format!("line {} is not in {currency}", l.line));
            }
            if l.quantity <= 0 {
                return Err(format!("line {} has quantity {}", l.line, l.quantity));
            }
        }
        Ok(())
    }

    fn live(&self) -> impl Iterator<Item = &BasketLine> {
        self.lines.iter().filter(|l| !l.voided)
    }
}

#[derive(Debug)]
pub struct Lane {
    id: DeviceId,
    store: StoreId,
    currency: Currency,
    basket: Basket,
    /// The last scale reading and when it came.
    scale: Option<(WeightReading, u64)>,
}

/// A stable weight older than this is not used for a weighed item scanned now.
pub const MAX_WEIGHT_AGE_MS: u64 = 10_000;

fn msg(code: MessageCode, text: impl Into<String>) -> LaneOutput {
    LaneOutput::Display(Display::Message { code, text: text.into() })
}

/// `price_per_kg * grams / 1000`, rounded half up to the minor unit.
pub fn weighed_amount(price_per_kg: Money, grams: i64) -> Option<Money> {
    let exact = i128::from(price_per_kg.minor) * i128::from(grams);
    let rounded = (exact + 500).div_euclid(1000);
    i64::try_from(rounded).ok().map(|minor| Money::new(minor, price_per_kg.currency))
}

impl Lane {
    /// A lane, resuming `restored` (from SQLite) when there is one, else starting basket 1 of
    /// a new session `fresh_session` (pick it at random).
    pub fn new(id: DeviceId, store: StoreId, currency: Currency, restored: Option<Basket>, fresh_session: u64) -> Lane {
        Lane { id, store, currency, basket: restored.unwrap_or_else(|| Basket::new(fresh_session, 1)), scale: None }
    }

    pub fn basket(&self) -> &Basket {
        &self.basket
    }

    /// The idempotency key of the current basket's sale.
    pub fn sale_key(&self) -> String {
        format!("lane:{}:{}:{:016x}:{}", self.store, self.id, self.basket.session, self.basket.number)
    }

    /// What to do right after a (re)start: show the basket, and if payment was under way,
    /// commit it again (the same key, so a sale that did commit is not made twice).
    pub fn resume(&self) -> Vec<LaneOutput> {
        let mut out = self.full_display();
        if let Some(tender) = self.basket.tendering {
            out.push(self.commit(tender));
        }
        out
    }

    pub fn handle(&mut self, input: LaneInput, now_ms: u64, catalog: &dyn Catalog) -> Vec<LaneOutput> {
        let mut out = Vec::new();
        if self.basket.tendering.is_some()
            && !matches!(
                input,
                LaneInput::Committed { .. }
                    | LaneInput::CommitFailed { .. }
                    | LaneInput::DisplayReconnected
                    | LaneInput::Weight(_)
            )
        {
            out.push(msg(MessageCode::Info, "Payment in progress, please wait"));
            return out;
        }
        match input {
            LaneInput::Scan { data } => self.scan(&data, now_ms, catalog, &mut out),
            LaneInput::Weight(reading) => self.weight(reading, now_ms, catalog, &mut out),
            LaneInput::StartBasket => out.push(self.total()),
            LaneInput::SetQuantity { line, quantity } => self.set_quantity(line, quantity, &mut out),
            LaneInput::VoidLine { line } => match self.basket.lines.iter_mut().find(|l| l.line == line && !l.voided) {
                Some(l) => {
                    l.voided = true;
                    out.push(LaneOutput::Display(Display::LineVoided { line }));
                    out.push(self.total());
                    out.push(LaneOutput::Persist(self.basket.clone()));
                }
                None => out.push(msg(MessageCode::Error, format!("There is no line {line} to remove"))),
            },
            LaneInput::VoidBasket => {
                self.basket = self.basket.next();
                out.push(LaneOutput::Display(Display::Cleared));
                out.push(LaneOutput::Persist(self.basket.clone()));
            }
            LaneInput::Tender(tender) => {
                if self.basket.live().next().is_none() {
                    out.push(msg(MessageCode::Info, "The basket is empty: scan an item first"));
                } else {
                    self.basket.tendering = Some(tender);
                    self.basket.awaiting_weight = None;
                    out.push(LaneOutput::Persist(self.basket.clone()));
                    out.push(self.commit(tender));
                }
            }
            LaneInput::DisplayReconnected => out.extend(self.full_display()),
            LaneInput::Committed { key, receipt_id, total } => {
                if self.basket.tendering.is_some() && key == self.sale_key() {
                    out.push(LaneOutput::Display(Display::Receipt { receipt_id, total }));
                    self.basket = self.basket.next();
                    out.push(LaneOutput::Display(Display::Cleared));
                    out.push(LaneOutput::Persist(self.basket.clone()));
                }
            }
            LaneInput::CommitFailed { reason, key_taken } => {
                self.basket.tendering = None;
                if key_taken {
                    // The key already names another sale: this basket pays under the next one.
                    self.basket.number = self.basket.number.saturating_add(1);
                }
                out.push(msg(
                    MessageCode::Error,
                    format!("Payment could not be recorded ({reason}); please try again"),
                ));
                out.push(LaneOutput::Persist(self.basket.clone()));
            }
        }
        out
    }

    fn scan(&mut self, data: &[u8], now_ms: u64, catalog: &dyn Catalog, out: &mut Vec<LaneOutput>) {
        let Ok(text) = std::str::from_utf8(data) else {
            out.push(msg(MessageCode::InvalidBarcode, "This barcode cannot be read as a product: ask staff"));
            return;
        };
        if !text.bytes().all(|b| b.is_ascii_digit()) {
            out.push(msg(MessageCode::InvalidBarcode, "This barcode is not a product barcode: ask staff"));
            return;
        }
        let gtin = match Gtin::parse(text) {
            Ok(g) => g,
            Err(shared::GtinError::CheckDigit { .. }) => {
                out.push(msg(MessageCode::InvalidBarcode, "Barcode misread (check digit wrong): please scan again"));
                return;
            }
            Err(_) => {
                out.push(msg(MessageCode::InvalidBarcode, format!("{text} is not a product barcode: ask staff")));
                return;
            }
        };
        let product = match catalog.lookup(&gtin, now_ms) {
            Ok(Some(p)) => p,
            Ok(None) => {
                out.push(msg(MessageCode::UnknownProduct, format!("Unknown product {gtin}: ask staff")));
                return;
            }
            Err(e) => {
                out.push(msg(MessageCode::Error, format!("Product lookup failed ({e}): ask staff")));
                return;
            }
        };
        if product.discontinued {
            out.push(msg(MessageCode::Discontinued, format!("{} is no longer sold: ask staff", product.name)));
            return;
        }
        let Some((price, version)) = product.price.clone() else {
            out.push(msg(MessageCode::UnknownProduct, format!("{} has no price: ask staff", product.name)));
            return;
        };
        if price.currency != self.currency {
            out.push(msg(MessageCode::Error, format!("{} is priced in {}: ask staff", product.name, price.currency)));
            return;
        }
        match product.unit {
            Unit::Piece => {
                if let Some(l) = self
                    .basket
                    .lines
                    .iter_mut()
                    .find(|l| !l.voided && l.sku == product.sku && l.unit == Unit::Piece && l.price == version)
                {
                    if l.quantity >= i64::from(MAX_QUANTITY) {
                        out.push(msg(MessageCode::Error, format!("At most {MAX_QUANTITY} of one item per basket")));
                        return;
                    }
                    l.quantity += 1;
                    let line = l.line;
                    self.reprice(line, out);
                    return;
                }
                self.add_line(gtin, product, price, version, 1, out);
            }
            Unit::Gram => match self.scale {
                Some((r, at))
                    if r.stable
                        && !r.under_zero
                        && !r.over_capacity
                        && r.grams > 0
                        && now_ms.saturating_sub(at) <= MAX_WEIGHT_AGE_MS =>
                {
                    self.scale = None;
                    self.add_line(gtin, product, price, version, i64::from(r.grams), out);
                }
                _ => {
                    self.basket.awaiting_weight = Some((gtin, product.sku.clone()));
                    out.push(msg(MessageCode::WaitForStableWeight, format!("Place {} on the scale", product.name)));
                    out.push(LaneOutput::Persist(self.basket.clone()));
                }
            },
        }
    }

    fn weight(&mut self, reading: WeightReading, now_ms: u64, catalog: &dyn Catalog, out: &mut Vec<LaneOutput>) {
        if reading.over_capacity {
            self.scale = None;
            out.push(msg(MessageCode::ScaleError, "Too heavy for the scale: ask staff"));
            return;
        }
        if reading.under_zero {
            self.scale = None;
            out.push(msg(MessageCode::ScaleError, "The scale needs zeroing: ask staff"));
            return;
        }
        // Only a stable weight may be sold; motion readings just wait for the next one.
        self.scale = Some((reading, now_ms));
        if !reading.stable || reading.grams <= 0 || self.basket.tendering.is_some() {
            return;
        }
        if let Some((gtin, _)) = self.basket.awaiting_weight.take() {
            let digits = gtin.to_string();
            self.scan(digits.as_bytes(), now_ms, catalog, out);
        }
    }

    fn add_line(
        &mut self,
        gtin: Gtin,
        product: Product,
        unit_price: Money,
        version: PriceVersion,
        quantity: i64,
        out: &mut Vec<LaneOutput>,
    ) {
        if self.basket.lines.len() >= MAX_LINES {
            out.push(msg(MessageCode::Error, format!("A basket holds at most {MAX_LINES} lines: pay for these first")));
            return;
        }
        let Some(amount) = line_amount(product.unit, unit_price, quantity) else {
            out.push(msg(MessageCode::Error, "Amount too large: ask staff"));
            return;
        };
        let line = self.basket.lines.len() as u16 + 1;
        self.basket.lines.push(BasketLine {
            line,
            sku: product.sku,
            gtin,
            name: product.name,
            unit: product.unit,
            quantity,
            unit_price,
            price: version,
            amount,
            voided: false,
        });
        self.basket.awaiting_weight = None;
        out.push(self.line_display(line));
        out.push(self.total());
        out.push(LaneOutput::Persist(self.basket.clone()));
    }

    fn set_quantity(&mut self, line: u16, quantity: u32, out: &mut Vec<LaneOutput>) {
        let Some(l) = self.basket.lines.iter_mut().find(|l| l.line == line && !l.voided) else {
            out.push(msg(MessageCode::Error, format!("There is no line {line} to change")));
            return;
        };
        if l.unit == Unit::Gram {
            out.push(msg(MessageCode::Error, "A weighed item's quantity comes from the scale"));
            return;
        }
        if !(1..=MAX_QUANTITY).contains(&quantity) {
            out.push(msg(MessageCode::Error, format!("Quantity must be between 1 and {MAX_QUANTITY}")));
            return;
        }
        l.quantity = i64::from(quantity);
        self.reprice(line, out);
    }

    fn reprice(&mut self, line: u16, out: &mut Vec<LaneOutput>) {
        if let Some(l) = self.basket.lines.iter_mut().find(|l| l.line == line) {
            match line_amount(l.unit, l.unit_price, l.quantity) {
                Some(a) => l.amount = a,
                None => {
                    out.push(msg(MessageCode::Error, "Amount too large: ask staff"));
                    return;
                }
            }
        }
        out.push(self.line_display(line));
        out.push(self.total());
        out.push(LaneOutput::Persist(self.basket.clone()));
    }

    fn line_display(&self, line: u16) -> LaneOutput {
        match self.basket.lines.iter().find(|l| l.line == line) {
            Some(l) => LaneOutput::Display(Display::Line {
                line,
                text: l.name.clone(),
                quantity: l.quantity,
                amount: l.amount,
            }),
            None => msg(MessageCode::Error, format!("There is no line {line}")),
        }
    }

    fn total_amount(&self) -> Money {
        let minor = self.basket.live().map(|l| i128::from(l.amount.minor)).sum::<i128>();
        Money::new(minor.clamp(0, i128::from(i64::MAX)) as i64, self.currency)
    }

    fn total(&self) -> LaneOutput {
        let items = self.basket.live().count() as u16;
        LaneOutput::Display(Display::Total { amount: self.total_amount(), items })
    }

    fn full_display(&self) -> Vec<LaneOutput> {
        let mut out = vec![LaneOutput::Display(Display::Cleared)];
        for l in &self.basket.lines {
            out.push(self.line_display(l.line));
            if l.voided {
                out.push(LaneOutput::Display(Display::LineVoided { line: l.line }));
            }
        }
        out.push(self.total());
        if self.basket.tendering.is_some() {
            out.push(msg(MessageCode::Info, "Payment in progress, please wait"));
        } else if let Some((gtin, _)) = &self.basket.awaiting_weight {
            out.push(msg(MessageCode::WaitForStableWeight, format!("Place item {gtin} on the scale")));
        }
        out
    }

    fn commit(&self, tender: Tender) -> LaneOutput {
        let lines = self
            .basket
            .live()
            .map(|l| SaleLine {
                sku: l.sku.clone(),
                quantity: l.quantity,
                line_total: l.amount,
                price: Some(l.price.clone()),
            })
            .collect();
        LaneOutput::Commit { key: self.sale_key(), lines, tender }
    }
}

fn line_amount(unit: Unit, unit_price: Money, quantity: i64) -> Option<Money> {
    match unit {
        Unit::Piece => unit_price.checked_mul(quantity).ok(),
        Unit::Gram => weighed_amount(unit_price, quantity),
    }
}

#[cfg(test)]
mod tests;
