//! Domain and replicated-state types shared by the store daemon and the cloud.
//!
//! Everything here is pure: no SQLite, no sockets, no tokio, no wall clock (callers pass the
//! time in). That keeps the CRDT laws testable as plain functions and lets both sides of a
//! sync run the very same merge code.

pub mod catalog;
pub mod epc;
pub mod escrow;
pub mod gtin;
pub mod hlc;
pub mod ids;
pub mod lww;
pub mod money;
/// Not pure: the systemd notify helper both daemons use, behind the `notify` feature.
#[cfg(feature = "notify")]
pub mod notify;
pub mod orders;
pub mod price;
pub mod stock;
pub mod sync;
pub mod wire;

pub use catalog::{CatalogField, CatalogItem, CatalogUpdate, TaxClass, Unit};
pub use epc::{decode_sgtin96, decode_sgtin96_hex, EpcError, Sgtin};
pub use escrow::{Escrow, EscrowError, EscrowKey, EscrowOp, EscrowRow, EscrowState, OrderId, OrderStatus, Side};
pub use gtin::{Gtin, GtinError};
pub use hlc::{ClockJump, Hlc, HlcStamp, SkewError};
pub use ids::{ActorId, DeviceId, IdError, Sku, StoreId};
pub use lww::Lww;
pub use money::{Currency, Money, MoneyError};
pub use orders::{OrderError, OrderHeader, OrderLine};
pub use price::{
    effective_price, PriceBook, PriceEntry, PriceError, PriceKey, PriceScope, PriceSlot, PriceValue, PriceVersion,
    ValidityWindow,
};
pub use stock::{Slot, SlotKey, SlotRow, StockError, StockState};
pub use wire::{WireError, SYNC_PROTOCOL_VERSION};
