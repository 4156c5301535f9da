//! Online pickup orders as HQ sees them, derived from the replicated escrow rows
//! (`shared::escrow`) and the cloud's own order records: where each order and line stands,
//! which orders the store's stock no longer covers, and the allocation of each SKU. Pure
//! functions of what storage returns, so both backends and every endpoint agree, and the rules
//! are unit-tested without a database.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};
use shared::orders::PICKUP_CODE_DIGITS;
use shared::{OrderId, OrderStatus, Sku};

use crate::storage::{Allocation, CancelReason, OrderRecord};

/// Where an order (or one of its lines) stands, as the API names it. `Expired` is a cancellation
/// the cloud made because the order was not picked up in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    Reserved,
    Cancelled,
    Expired,
    Fulfilled,
    /// HQ cancelled it (or it expired) while the store, not yet knowing, handed it over: the
    /// units left the store; HQ settles it with the customer.
    CancelledButFulfilled,
}

impl OrderState {
    pub const ALL: [OrderState; 5] = [
        OrderState::Reserved,
        OrderState::Cancelled,
        OrderState::Expired,
        OrderState::Fulfilled,
        OrderState::CancelledButFulfilled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::Reserved => "reserved",
            OrderState::Cancelled => "cancelled",
            OrderState::Expired => "expired",
            OrderState::Fulfilled => "fulfilled",
            OrderState::CancelledButFulfilled => "cancelled_but_fulfilled",
        }
    }

    fn handed_over(self) -> bool {
        matches!(self, OrderState::Fulfilled | OrderState::CancelledButFulfilled)
    }

    fn cancelled(self) -> bool {
        matches!(self, OrderState::Cancelled | OrderState::Expired | OrderState::CancelledButFulfilled)
    }
}

impl fmt::Display for OrderState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OrderState {
    type Err = String;

    fn from_str(s: &str) -> Result<OrderState, String> {
        OrderState::ALL.into_iter().find(|state| state.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = OrderState::ALL.iter().map(|s| s.as_str()).collect();
            format!(
                "unknown order status {:?}: expected one of {}",
                s.chars().take(40).collect::<String>(),
                names.join(", ")
            )
        })
    }
}

/// A line's state from its escrow status and the reason the cloud recorded for a cancellation.
pub fn line_state(status: OrderStatus, reason: Option<CancelReason>) -> OrderState {
    match status {
        OrderStatus::Reserved => OrderState::Reserved,
        OrderStatus::Cancelled if reason == Some(CancelReason::Expired) => OrderState::Expired,
        OrderStatus::Cancelled => OrderState::Cancelled,
        OrderStatus::Fulfilled => OrderState::Fulfilled,
        OrderStatus::CancelledButFulfilled => OrderState::CancelledButFulfilled,
    }
}

/// The order's state from its lines'. A handover is of the whole order, but its lines' rows may
/// reach the cloud over more than one push: one line handed over means the order was. The
/// cloud cancels every line in one transaction, so one cancelled line means all were.
pub fn overall_state(lines: &[OrderState], reason: Option<CancelReason>) -> OrderState {
    let handed_over = lines.iter().any(|s| s.handed_over());
    let cancelled = lines.iter().any(|s| s.cancelled());
    match (handed_over, cancelled) {
        (true, true) => OrderState::CancelledButFulfilled,
        (true, false) => OrderState::Fulfilled,
        (false, true) if reason == Some(CancelReason::Expired) => OrderState::Expired,
        (false, true) => OrderState::Cancelled,
        (false, false) => OrderState::Reserved,
    }
}

/// One line as HQ sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineView {
    pub sku: Sku,
    pub units: u64,
    pub state: OrderState,
}

/// An order as HQ sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderView {
    pub state: OrderState,
    pub lines: Vec<LineView>,
    /// The store's stock, as merged in the cloud, no longer covers one of its lines.
    pub at_risk: bool,
}

/// The allocations of a store's SKUs, each with the orders its stock no longer covers, worked
/// out once per SKU: a listing shows many orders of the same few SKUs, and
/// `Escrow::orders_at_risk` walks every order of its key.
#[derive(Debug, Clone, Default)]
pub struct Allocations {
    by_sku: BTreeMap<Sku, (Allocation, BTreeSet<OrderId>)>,
}

impl Allocations {
    pub fn get(&self, sku: &Sku) -> Option<&Allocation> {
        self.by_sku.get(sku).map(|(a, _)| a)
    }

    /// Whether `sku`'s stock no longer covers `order`'s line of it.
    pub fn line_at_risk(&self, sku: &Sku, order: &OrderId) -> bool {
        self.by_sku.get(sku).is_some_and(|(_, risk)| risk.contains(order))
    }
}

impl FromIterator<Allocation> for Allocations {
    fn from_iter<I: IntoIterator<Item = Allocation>>(allocations: I) -> Allocations {
        let by_sku = allocations
            .into_iter()
            .map(|a| {
                let risk = a.escrow.orders_at_risk(a.on_hand).into_iter().map(|o| o.order).collect();
                (a.escrow.key().sku.clone(), (a, risk))
            })
            .collect();
        Allocations { by_sku }
    }
}

/// Joins an order's record with the allocation of its SKUs. Errors name the order and line
/// whose reservation is missing (the header and its reservations are written together, so
/// that is a damaged database).
pub fn order_view(record: &OrderRecord, allocations: &Allocations) -> Result<OrderView, String> {
    let order = &record.header.order;
    let mut lines = Vec::with_capacity(record.header.lines.len());
    let mut at_risk = false;
    for (i, line) in record.header.lines.iter().enumerate() {
        let missing = || format!("order {order}: line {} ({}) has no reservation in the database", i + 1, line.sku);
        let allocation = allocations.get(&line.sku).ok_or_else(missing)?;
        let seen = allocation.escrow.order(order).ok_or_else(missing)?;
        at_risk |= allocations.line_at_risk(&line.sku, order);
        lines.push(LineView {
            sku: line.sku.clone(),
            units: line.units,
            state: line_state(seen.status, record.cancel_reason),
        });
    }
    let states: Vec<OrderState> = lines.iter().map(|l| l.state).collect();
    Ok(OrderView { state: overall_state(&states, record.cancel_reason), lines, at_risk })
}

/// One order line the store's stock no longer covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineAtRisk {
    pub order: OrderId,
    pub sku: Sku,
    pub units: u64,
}

/// A SKU whose stock is below what is promised online.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortage {
    pub sku: Sku,
    pub on_hand: i128,
    pub promised: u64,
    pub short: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AtRisk {
    /// By SKU, then in reservation order (the most recently reserved lose their cover first).
    pub lines: Vec<LineAtRisk>,
    pub shortages: Vec<Shortage>,
}

impl AtRisk {
    /// How many distinct orders have a line at risk.
    pub fn orders(&self) -> usize {
        self.lines.iter().map(|l| &l.order).collect::<BTreeSet<_>>().len()
    }
}

/// The orders at risk among `allocations`, by `Escrow::orders_at_risk`: the cloud's view after
/// the store's last sync (the store raises its own alert at once; the cloud learns at sync).
pub fn at_risk(allocations: &[Allocation]) -> AtRisk {
    let mut out = AtRisk::default();
    for a in allocations {
        let short = a.escrow.at_risk(a.on_hand);
        if short == 0 {
            continue;
        }
        let sku = &a.escrow.key().sku;
        out.shortages.push(Shortage { sku: sku.clone(), on_hand: a.on_hand, promised: a.escrow.promised(), short });
        out.lines.extend(a.escrow.orders_at_risk(a.on_hand).into_iter().map(|o| LineAtRisk {
            order: o.order,
            sku: sku.clone(),
            units: o.units,
        }));
    }
    out
}

/// A fresh pickup code: [`PICKUP_CODE_DIGITS`] digits from the operating system's generator.
pub fn new_pickup_code() -> String {
    let n: u32 = rand::rngs::OsRng.gen_range(0..1_000_000);
    format!("{n:0width$}", width = PICKUP_CODE_DIGITS)
}

/// Unix milliseconds as an RFC 3339 UTC timestamp with milliseconds (`2023-11-14T22:13:20.000Z`).
pub fn rfc3339(ms: i64) -> String {
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, day_secs) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z", day_secs / 3600, day_secs % 3600 / 60, day_secs % 60)
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::orders::{pickup_code_digest, OrderLine};
    use shared::{Escrow, EscrowKey, OrderHeader, Side, StoreId};

    fn sku(s: &str) -> Sku {
        Sku::new(s).unwrap()
    }

    fn id(s: &str) -> OrderId {
        OrderId::new(s).unwrap()
    }

    fn store() -> StoreId {
        StoreId::new("s1").unwrap()
    }

    fn escrow(k: &str, granted: u64) -> Escrow {
        let mut e = Escrow::new(EscrowKey { store: store(), sku: sku(k) });
        e.grant(&Side::Store(store()), granted, i128::from(granted), 0).unwrap();
        e
    }

    fn record(order: &str, lines: &[(&str, u64)], reason: Option<CancelReason>) -> OrderRecord {
        OrderRecord {
            header: OrderHeader {
                order: id(order),
                store: store(),
                customer_ref: "c".into(),
                created_at_ms: 1,
                expires_at_ms: 2,
                pickup_code_digest: pickup_code_digest(&id(order), "123456"),
                lines: lines.iter().map(|(s, u)| OrderLine { sku: sku(s), units: *u }).collect(),
            },
            pickup_code: "123456".into(),
            cancel_reason: reason,
            cancelled_at_ms: None,
            handed_over_at_ms: None,
        }
    }

    #[test]
    fn states_parse_and_print_as_the_api_names_them() {
        for state in OrderState::ALL {
            assert_eq!(state.as_str().parse::<OrderState>(), Ok(state));
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        assert!("open".parse::<OrderState>().unwrap_err().contains("cancelled_but_fulfilled"));
    }

    #[test]
    fn an_order_takes_the_state_of_its_lines() {
        use OrderState::*;
        assert_eq!(overall_state(&[Reserved, Reserved], None), Reserved);
        assert_eq!(overall_state(&[Fulfilled, Reserved], None), Fulfilled, "the other line's row is on its way");
        assert_eq!(overall_state(&[Cancelled, Cancelled], Some(CancelReason::Cancelled)), Cancelled);
        assert_eq!(overall_state(&[Expired], Some(CancelReason::Expired)), Expired);
        assert_eq!(
            overall_state(&[CancelledButFulfilled, Cancelled], Some(CancelReason::Cancelled)),
            CancelledButFulfilled
        );
        assert_eq!(line_state(OrderStatus::Cancelled, Some(CancelReason::Expired)), Expired);
        assert_eq!(line_state(OrderStatus::CancelledButFulfilled, Some(CancelReason::Expired)), CancelledButFulfilled);
    }

    #[test]
    fn an_order_view_joins_lines_status_and_risk() {
        let mut milk = escrow("MILK", 5);
        milk.reserve(&Side::Cloud, id("W1"), 2).unwrap();
        milk.reserve(&Side::Cloud, id("W2"), 3).unwrap();
        let mut eggs = escrow("EGGS", 1);
        eggs.reserve(&Side::Cloud, id("W2"), 1).unwrap();
        eggs.fulfil(&Side::Store(store()), &id("W2")).unwrap();
        let all: Vec<Allocation> =
            [(milk, 4), (eggs, 0)].into_iter().map(|(escrow, on_hand)| Allocation { escrow, on_hand }).collect();
        let allocations: Allocations = all.iter().cloned().collect();
        assert!(
            allocations.line_at_risk(&sku("MILK"), &id("W2")) && !allocations.line_at_risk(&sku("MILK"), &id("W1"))
        );
        assert!(!allocations.line_at_risk(&sku("BREAD"), &id("W2")));
        let w1 = order_view(&record("W1", &[("MILK", 2)], None), &allocations).unwrap();
        assert_eq!((w1.state, w1.at_risk), (OrderState::Reserved, false), "reserved first, covered first");
        let w2 = order_view(&record("W2", &[("MILK", 3), ("EGGS", 1)], None), &allocations).unwrap();
        assert_eq!(w2.state, OrderState::Fulfilled);
        assert_eq!(w2.lines.iter().map(|l| l.state).collect::<Vec<_>>(), [OrderState::Reserved, OrderState::Fulfilled]);
        assert!(w2.at_risk, "4 on hand cover W1's 2, not W2's 3");
        let err = order_view(&record("W3", &[("MILK", 1)], None), &allocations).unwrap_err();
        assert_eq!(err, "order W3: line 1 (MILK) has no reservation in the database");

        let risk = at_risk(&all);
        assert_eq!(risk.lines, vec![LineAtRisk { order: id("W2"), sku: sku("MILK"), units: 3 }]);
        assert_eq!(risk.shortages, vec![Shortage { sku: sku("MILK"), on_hand: 4, promised: 5, short: 1 }]);
        assert_eq!(risk.orders(), 1);
    }

    #[test]
    fn pickup_codes_are_six_digits() {
        for _ in 0..100 {
            let code = new_pickup_code();
            shared::orders::check_pickup_code_format(&code).unwrap();
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
    }
}
