//! Online pickup orders in the store (issue 7), the parts that need no I/O: the allocation
//! policy that keeps each SKU's online grant topped up ([`policy`]), and where an order stands
//! for the staff at the counter, with the reasons a pick or a handover is refused ([`status`]).
//! The ledger writer applies them inside its transactions; `storectl` and the control socket
//! show their views.

pub mod policy;
pub mod status;

pub use policy::{Allocation, OnlinePolicy, OnlineRule};
pub use status::{
    format_utc, AtRiskOrder, AtRiskReport, LineSummary, OnlineRow, OrderList, OrderRefusal, OrderSummary, PickupStatus,
    ShortageAlert, SkuAtRisk, StatusFilter,
};
