//! Where an online pickup order stands for the staff at the counter, derived from what the
//! store's replica holds (the order header, each line's escrow status, the local pick and
//! handover marks) and the time; the reasons a pick or handover is refused, each saying what
//! to do; and the views `storectl` and the control socket show. Pure: no SQL, no clock.

use std::fmt;

use serde::{Deserialize, Serialize};
use shared::{OrderId, OrderStatus, Sku};

/// An order's state as the counter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PickupStatus {
    /// Waiting for the customer; not yet put aside.
    Reserved,
    /// Waiting for the customer; staff put the goods aside.
    Picked,
    /// Past its pickup deadline and not handed over; HQ cancels it at the next sync.
    Expired,
    /// Handed over to the customer.
    Fulfilled,
    /// Cancelled by HQ (its units are back in the store's free stock).
    Cancelled,
}

impl PickupStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PickupStatus::Reserved => "reserved",
            PickupStatus::Picked => "picked",
            PickupStatus::Expired => "expired",
            PickupStatus::Fulfilled => "fulfilled",
            PickupStatus::Cancelled => "cancelled",
        }
    }

    /// Still to be collected (reserved, picked, or expired but not yet cancelled).
    pub fn is_open(self) -> bool {
        matches!(self, PickupStatus::Reserved | PickupStatus::Picked | PickupStatus::Expired)
    }

    /// Joins what the replica knows: a handover anywhere wins (the goods left the store), then a
    /// cancellation, then the deadline, then the local pick mark. `lines` are the escrow
    /// statuses of the order's lines (`None`: not synced yet).
    pub fn derive(lines: &[Option<OrderStatus>], handed_over: bool, picked: bool, expired: bool) -> PickupStatus {
        let any = |want: &[OrderStatus]| lines.iter().any(|l| l.is_some_and(|s| want.contains(&s)));
        if handed_over || any(&[OrderStatus::Fulfilled, OrderStatus::CancelledButFulfilled]) {
            PickupStatus::Fulfilled
        } else if any(&[OrderStatus::Cancelled]) {
            PickupStatus::Cancelled
        } else if expired {
            PickupStatus::Expired
        } else if picked {
            PickupStatus::Picked
        } else {
            PickupStatus::Reserved
        }
    }
}

impl fmt::Display for PickupStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which orders a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusFilter {
    /// Reserved, picked or expired: what still needs the counter.
    Open,
    All,
    Only(PickupStatus),
}

impl StatusFilter {
    pub fn parse(text: &str) -> Result<StatusFilter, String> {
        Ok(match text {
            "open" => StatusFilter::Open,
            "all" => StatusFilter::All,
            "reserved" => StatusFilter::Only(PickupStatus::Reserved),
            "picked" => StatusFilter::Only(PickupStatus::Picked),
            "expired" => StatusFilter::Only(PickupStatus::Expired),
            "fulfilled" => StatusFilter::Only(PickupStatus::Fulfilled),
            "cancelled" => StatusFilter::Only(PickupStatus::Cancelled),
            other => {
                return Err(format!(
                    "unknown order status {other:?}: use open, reserved, picked, expired, fulfilled, cancelled or all"
                ))
            }
        })
    }

    pub fn keeps(self, status: PickupStatus) -> bool {
        match self {
            StatusFilter::Open => status.is_open(),
            StatusFilter::All => true,
            StatusFilter::Only(s) => s == status,
        }
    }
}

/// One line of an order as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineSummary {
    pub sku: Sku,
    pub units: u64,
    /// The line's escrow status; `None` while its reservation has not reached the store.
    pub status: Option<OrderStatus>,
}

/// One order as `storectl orders list|show` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderSummary {
    pub order: OrderId,
    pub status: PickupStatus,
    pub customer_ref: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub lines: Vec<LineSummary>,
    pub picked_at_ms: Option<i64>,
    pub handed_over_at_ms: Option<i64>,
    /// HQ cancelled it, but the store had already handed it over (offline): the handover
    /// stands and HQ settles the order with the customer.
    pub cancelled_after_handover: bool,
}

/// `storectl orders list`: the orders that matched, the most recent [`OrderList::LIMIT`] of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderList {
    /// Oldest first.
    pub orders: Vec<OrderSummary>,
    /// How many matched (more than listed when above the limit).
    pub matching: usize,
}

impl OrderList {
    /// Most orders one listing shows (DESIGN 13.7: every answer is bounded).
    pub const LIMIT: usize = 1_000;
}

/// A waiting order whose units the store no longer has on hand (sales, a count or an
/// adjustment lowered the stock, a merge changed it, or more reservations arrived than it holds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AtRiskOrder {
    pub order: OrderId,
    pub sku: Sku,
    pub units: u64,
    /// Empty when the order's header has not reached the store.
    pub customer_ref: String,
    pub expires_at_ms: Option<i64>,
}

/// `storectl orders at-risk`: per SKU the shortfall, and every order at risk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AtRiskReport {
    pub skus: Vec<SkuAtRisk>,
    pub orders: Vec<AtRiskOrder>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuAtRisk {
    pub sku: Sku,
    pub on_hand: i64,
    /// Units of orders waiting for pickup.
    pub promised: u64,
    /// `promised - on_hand`: units promised online that are not in the store.
    pub shortfall: u64,
    pub orders: Vec<OrderId>,
}

/// The alert the writer raises when a commit leaves more orders of a SKU uncovered than before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShortageAlert {
    pub sku: Sku,
    pub on_hand: i64,
    pub promised: u64,
    pub shortfall: u64,
    /// Every order of the SKU now at risk (the new ones and those already known).
    pub orders: Vec<OrderId>,
}

/// One SKU's online allocation as `storectl online status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnlineRow {
    pub sku: Sku,
    pub on_hand: i64,
    pub granted: u64,
    pub released: u64,
    pub reserved: u64,
    /// Units of orders waiting for pickup.
    pub promised: u64,
    pub fulfilled: u64,
    pub cancelled: u64,
    /// What the online channel may still reserve: `granted - reserved - released`.
    pub rights: i64,
    /// What the store holds back for the channel: `rights + promised`.
    pub committed: i64,
    /// From the policy, when the daemon (or the configuration) is at hand.
    pub target: Option<u64>,
    pub safety_stock: Option<u64>,
    /// What the store could still grant: `on_hand - committed - safety_stock`.
    pub free: Option<i64>,
}

/// Why a pick or a handover was refused. Nothing was written and no stock moved; each message
/// says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderRefusal {
    /// A new or restored ledger that has not caught up with the cloud once: it may not know a
    /// cancellation or a handover made elsewhere.
    #[error(
        "order {order}: this ledger is still catching up with the cloud; run `storectl sync now` and retry; \
         nothing was taken from stock"
    )]
    CatchingUp { order: OrderId },
    #[error("order {order} is not synced to this store yet; run `storectl sync now`, then retry")]
    NotSynced { order: OrderId },
    #[error(
        "order {order}: its reservation of {sku} has not reached this store yet; run `storectl sync now`, then retry"
    )]
    Incomplete { order: OrderId, sku: Sku },
    /// The reservation did reach the store but was refused as conflicting with what it holds:
    /// syncing again brings the same refusal, so the counter must not keep retrying.
    #[error(
        "order {order}: its reservation of {sku} was refused by this store at sync (event {seq}: {reason}); syncing \
         again will not change that: ask HQ to check the order; nothing was taken from stock"
    )]
    ReservationRefused { order: OrderId, sku: Sku, seq: u64, reason: String },
    #[error(
        "wrong pickup code for order {order}: nothing was handed over (check the code in the customer's confirmation)"
    )]
    WrongCode { order: OrderId },
    /// Not a pickup code at all (a typo). The code is never repeated: not in the reply, not in
    /// the journal; it is the customer's proof of purchase.
    #[error(
        "order {order}: a pickup code is {} digits and the code given is not one; nothing was handed over (check \
         the code in the customer's confirmation)",
        shared::orders::PICKUP_CODE_DIGITS
    )]
    MistypedCode { order: OrderId },
    #[error("order {order} was already handed over at {at}; nothing was taken from stock again")]
    AlreadyHandedOver { order: OrderId, at: String },
    #[error(
        "order {order} was cancelled by HQ: do not hand it over{}; nothing was taken from stock (its units are back \
         in the store's free stock)",
        if *.picked { " and put the goods back on the shelf" } else { "" }
    )]
    Cancelled { order: OrderId, picked: bool },
    #[error("order {order} expired at {at}: do not hand it over (HQ cancels it at the next sync); nothing was taken from stock")]
    Expired { order: OrderId, at: String },
    #[error("order {order} was already picked at {at}; nothing changed")]
    AlreadyPicked { order: OrderId, at: String },
    #[error("order {order} cannot be handed over: {reason}; nothing was taken from stock")]
    Invalid { order: OrderId, reason: String },
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS UTC` (what the counter and the journal show).
pub fn format_utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rem / 3_600, rem % 3_600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use OrderStatus::*;

    #[test]
    fn a_handover_wins_then_a_cancellation_then_the_deadline_then_the_pick() {
        let d = PickupStatus::derive;
        assert_eq!(d(&[Some(Reserved), Some(Reserved)], false, false, false), PickupStatus::Reserved);
        assert_eq!(d(&[Some(Reserved)], false, true, false), PickupStatus::Picked);
        assert_eq!(d(&[Some(Reserved)], false, true, true), PickupStatus::Expired);
        assert_eq!(d(&[Some(Reserved), Some(Cancelled)], false, true, true), PickupStatus::Cancelled);
        assert_eq!(d(&[Some(CancelledButFulfilled)], false, false, true), PickupStatus::Fulfilled);
        assert_eq!(d(&[Some(Reserved)], true, true, true), PickupStatus::Fulfilled);
        assert_eq!(d(&[None], false, false, false), PickupStatus::Reserved);
    }

    #[test]
    fn filters() {
        assert!(StatusFilter::parse("open").unwrap().keeps(PickupStatus::Expired));
        assert!(!StatusFilter::parse("open").unwrap().keeps(PickupStatus::Fulfilled));
        assert!(StatusFilter::parse("all").unwrap().keeps(PickupStatus::Cancelled));
        assert!(StatusFilter::parse("picked").unwrap().keeps(PickupStatus::Picked));
        assert!(!StatusFilter::parse("picked").unwrap().keeps(PickupStatus::Reserved));
        assert!(StatusFilter::parse("done").unwrap_err().contains("fulfilled"));
    }

    #[test]
    fn utc_times() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(1_714_557_723_000), "2024-05-01 10:02:03 UTC");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(-1_000), "1969-12-31 23:59:59 UTC");
    }

    #[test]
    fn refusals_say_what_to_do() {
        let order = OrderId::new("W-1").unwrap();
        let text = OrderRefusal::Cancelled { order: order.clone(), picked: true }.to_string();
        assert!(text.contains("cancelled by HQ") && text.contains("back on the shelf"), "{text}");
        let text = OrderRefusal::NotSynced { order }.to_string();
        assert!(text.contains("not synced to this store yet") && text.contains("storectl sync now"), "{text}");
    }
}
