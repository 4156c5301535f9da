//! The one interface between the service and its database, so the HTTP layer is written once
//! and runs on SQLite (embedded default) or PostgreSQL (several service processes on one
//! database). The service keeps no state outside it: the cloud's HLC, the per-partition version
//! counters and every store's sync position are rows.
//!
//! Invariants every backend keeps (the conformance story in `tests/conformance.rs` checks them
//! on both):
//! - Merges are per-slot max and LWW by (HLC, actor): applying the same rows twice, or in any
//!   order, gives the same state.
//! - Rows live in partitions (`chain`: chain prices and the catalog; `store:{id}`: that store's
//!   stock slots, store-scope prices, online allocation rows and order headers). A row that
//!   changes takes the next version of its partition, assigned in commit order (the counter row
//!   is bumped inside the transaction and its lock held to commit), so a puller reading
//!   "versions above my cursor" never skips a row that commits late (DESIGN section 13.1).
//! - The cloud's own writes (HQ prices, catalog, transfers) are stamped inside their transaction
//!   from the clock row, which also observes every store stamp merged, so two service processes
//!   never issue the same stamp and a cloud write always orders after what it has seen.
//! - A group of writes is all or nothing: a rejected catalog file leaves no row behind.
//! - Online allocation (DESIGN 5, 13.5) lives in the store's partition: escrow rows
//!   (`shared::escrow`) and order headers. A store's `Granted` and `Fulfilled` rows merge by max
//!   and union, each changed row taking its own version; an order operation (a creation: the
//!   header and every reservation; a cancellation: every line) takes one version for all its
//!   rows, and a pulled page never ends inside a version, so a store never sees a reservation
//!   without its order, nor half an order cancelled.
//! - Order operations are one transaction under the partition lock: the cloud reserves only
//!   against its rights as stored, all lines or none. Each reads a bounded number of rows
//!   whatever the SKU's history: a creation reads the keys' grant, release and reservation
//!   totals (a row kept with the reservations), a cancellation only the order's own rows.

mod codec;
mod pg_pool;
mod plan;
pub mod postgres;
pub mod sqlite;

use std::future::Future;

use serde::Serialize;
use shared::sync::{Cursor, Push, Rows};
use shared::{
    ActorId, CatalogField, CatalogUpdate, Escrow, HlcStamp, OrderHeader, OrderId, PriceEntry, PriceKey, PriceValue,
    Sku, SlotRow, StoreId,
};

use crate::orders::OrderState;

/// The schema version this build writes (both backends migrate to the same meaning).
pub const SCHEMA_VERSION: i64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("store {0} already exists")]
    StoreExists(StoreId),
    #[error("credential name {0} already exists")]
    AdminExists(String),
    #[error("stock movement of {movement} on the cloud slot of {store}/{sku} would overflow")]
    Overflow { store: StoreId, sku: Sku, movement: i64 },
    #[error("database holds an unreadable row: {0}")]
    Corrupt(String),
    #[error("database schema version {found} is newer than this build's {known}: upgrade cloud-sync")]
    TooNew { found: i64, known: i64 },
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("database task failed: {0}")]
    Task(String),
    /// A rule this service keeps broke (a bug, or a row changed behind its back): retrying
    /// cannot help, unlike [`StorageError::Task`].
    #[error("internal invariant broken: {0}")]
    Invariant(String),
}

/// Who a bearer credential belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Store(StoreId),
    Admin(String),
}

/// A page of the cloud's rows for one store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub rows: Rows,
    pub next_cursor: Cursor,
    pub more: bool,
}

/// What the store said about itself in a sync, recorded with the push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReport<'a> {
    pub store: &'a StoreId,
    /// The sending ledger's actor (one of the store's, checked by the caller): the status
    /// counts as pending what this ledger would pull, the other ledgers' slots included.
    pub sender: ActorId,
    pub push: Option<&'a Push>,
    /// The store's latest local change version.
    pub head_version: u64,
    /// The cursor the store sent (what it has merged of the cloud).
    pub cursor: Cursor,
    /// The highest HLC stamp in the request, for the cloud clock to observe (already checked
    /// against the skew fence by the caller).
    pub max_stamp: Option<&'a HlcStamp>,
    pub now_ms: u64,
}

/// An HQ price write; the storage stamps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PriceWrite {
    pub key: PriceKey,
    /// `None` withdraws the price.
    pub value: Option<PriceValue>,
}

/// An HQ catalog field write; the storage stamps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogWrite {
    pub sku: Sku,
    pub field: CatalogField,
}

/// A movement of the cloud actor's slot of (store, sku): transfers and HQ corrections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudMovement {
    pub store: StoreId,
    pub sku: Sku,
    pub movement: i64,
}

/// Writes applied in one transaction, all or nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloudWrites {
    /// When set, the writes are applied at most once under this key (a retried transfer).
    pub op_id: Option<String>,
    pub prices: Vec<PriceWrite>,
    pub catalog: Vec<CatalogWrite>,
    pub stock: Vec<CloudMovement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritesApplied {
    /// True when `op_id` had been applied before: nothing changed now.
    pub replayed: bool,
    /// The first stamp given to this group's price and catalog writes (none for stock only).
    pub stamp: Option<HlcStamp>,
}

/// A price change beyond the configured bound, waiting for an HQ user to confirm it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeldPrice {
    pub id: i64,
    pub write: PriceWrite,
    pub reason: String,
    pub held_at_ms: u64,
}

/// One store's sync position, for HQ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreStatus {
    pub store: StoreId,
    pub created_at_ms: u64,
    pub last_seen_ms: Option<u64>,
    /// The store's latest local version, as it last reported it.
    pub head_version: u64,
    /// The store's version the cloud holds: `head_version - acked_version` is the push lag.
    pub acked_version: u64,
    pub cursor: Cursor,
    /// The actor of the ledger the store last synced with (`None` before its first sync).
    /// It changes when the store starts a new ledger or restores a backup.
    pub ledger_actor: Option<ActorId>,
    /// Cloud rows this ledger has not pulled yet (as of its last cursor), the slots of the
    /// store's earlier ledgers included.
    pub pending_rows: u64,
    /// Rows refused from this store, ever.
    pub refused_rows: u64,
}

/// A refused request worth an auditor's attention (ownership violations, bad credentials).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecurityEvent {
    pub at_ms: u64,
    pub store: Option<StoreId>,
    pub kind: String,
    pub detail: String,
}

/// Why the cloud cancelled an order. Only the cloud knows: the replicated state is the
/// reservations' `cancelled` flag alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// HQ cancelled it.
    Cancelled,
    /// Not picked up by its `expires_at`.
    Expired,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::Cancelled => "cancelled",
            CancelReason::Expired => "expired",
        }
    }
}

/// An online pickup order as the cloud keeps it: the replicated header, and what only the
/// cloud knows (the pickup code itself, why and when it was cancelled, when the cloud learnt
/// it was handed over).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRecord {
    pub header: OrderHeader,
    /// The six digits the customer was given (the header holds only their digest).
    pub pickup_code: String,
    pub cancel_reason: Option<CancelReason>,
    pub cancelled_at_ms: Option<u64>,
    /// When a push first brought one of its `Fulfilled` rows.
    pub handed_over_at_ms: Option<u64>,
}

/// An order HQ asks for: the header (validated by the caller) and the code behind its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub header: OrderHeader,
    pub pickup_code: String,
}

/// One line the cloud cannot reserve: it holds fewer rights than wanted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShortLine {
    pub sku: Sku,
    pub wanted: u64,
    /// The cloud's rights on the key (never below 0 here).
    pub available: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    /// Every line reserved.
    Created(OrderRecord),
    /// The same order (store, customer reference, lines) was created before: its first answer.
    Replayed(OrderRecord),
    /// Some lines are short (every one of them listed); nothing was reserved.
    Short(Vec<ShortLine>),
    /// The order id belongs to a different order.
    Conflict(OrderRecord),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Cancelled now (`changed`), or before: a repeated cancel, or a second sweeper reaching
    /// the same order, changes nothing and says so, so it is logged and counted once.
    Cancelled {
        record: OrderRecord,
        changed: bool,
    },
    /// The cloud knows these lines were handed over: nothing changed.
    AlreadyFulfilled {
        record: OrderRecord,
        skus: Vec<Sku>,
    },
    NotFound,
}

/// One (store, SKU) of online allocation, with the stock the cloud has merged for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub escrow: Escrow,
    /// The sum of every stock slot of the key, as merged in the cloud.
    pub on_hand: i128,
}

/// The service's database. Each method is one transaction (or one consistent read).
pub trait Storage: Clone + Send + Sync + 'static {
    /// Creates or upgrades the schema; refuses a database from a newer build.
    fn migrate(&self) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Registers a store with the SHA-256 of its bearer token.
    fn add_store(
        &self,
        store: &StoreId,
        token_sha256: [u8; 32],
        now_ms: u64,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Registers an HQ admin credential.
    fn add_admin(
        &self,
        name: &str,
        token_sha256: [u8; 32],
        now_ms: u64,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    fn authenticate(
        &self,
        token_sha256: [u8; 32],
    ) -> impl Future<Output = Result<Option<Principal>, StorageError>> + Send;

    /// Merges the store's push (already checked for ownership and skew), advances its
    /// acknowledged version when the push is contiguous with it (`from_version <= acked`),
    /// records the report, and returns the acknowledged version.
    fn push(&self, report: SyncReport<'_>) -> impl Future<Output = Result<u64, StorageError>> + Send;

    /// The cloud's rows for `store` beyond `cursor`, at most `max_rows` (more only to carry one
    /// order whole: a page never ends inside a version), in version order per partition. With
    /// `leave_out` (the pulling ledger's actor), what that ledger wrote itself is left out: its
    /// stock slots and the store's `Granted` and `Fulfilled` allocation rows; slots of the
    /// store's earlier ledgers (one lost to a dead disk) are sent like any other actor's. A
    /// ledger catching up for the first time passes `None` and gets everything. A partition
    /// whose rows all fit moves its cursor to the partition's version as of the same snapshot,
    /// so rows skipped (the store's own) are not scanned again by every later pull.
    fn pull(
        &self,
        store: &StoreId,
        cursor: Cursor,
        max_rows: u32,
        leave_out: Option<ActorId>,
    ) -> impl Future<Output = Result<Page, StorageError>> + Send;

    /// Records a refused request: `rows` counts towards the store's refused rows; a security
    /// event is kept when `security` is set.
    fn record_refusal(
        &self,
        store: Option<&StoreId>,
        kind: &str,
        detail: &str,
        rows: u64,
        security: bool,
        now_ms: u64,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    fn security_events(&self, limit: u32) -> impl Future<Output = Result<Vec<SecurityEvent>, StorageError>> + Send;

    /// Applies HQ writes in one transaction, stamped from the clock row.
    fn apply(
        &self,
        writes: &CloudWrites,
        now_ms: u64,
    ) -> impl Future<Output = Result<WritesApplied, StorageError>> + Send;

    fn hold_price(
        &self,
        write: &PriceWrite,
        reason: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<i64, StorageError>> + Send;

    fn held_prices(&self) -> impl Future<Output = Result<Vec<HeldPrice>, StorageError>> + Send;

    /// Applies a held price and removes it from the held list, in one transaction; `None` when
    /// no such held price exists (confirmed or dismissed already).
    fn confirm_held(
        &self,
        id: i64,
        now_ms: u64,
    ) -> impl Future<Output = Result<Option<WritesApplied>, StorageError>> + Send;

    /// Every price register of a SKU (all scopes).
    fn prices_of(&self, sku: &Sku) -> impl Future<Output = Result<Vec<PriceEntry>, StorageError>> + Send;

    fn catalog_of(&self, sku: &Sku) -> impl Future<Output = Result<Vec<CatalogUpdate>, StorageError>> + Send;

    /// Every stock slot of a SKU across the chain.
    fn stock_of_sku(&self, sku: &Sku) -> impl Future<Output = Result<Vec<SlotRow>, StorageError>> + Send;

    /// Every stock slot of one store.
    fn stock_of_store(&self, store: &StoreId) -> impl Future<Output = Result<Vec<SlotRow>, StorageError>> + Send;

    fn stores(&self) -> impl Future<Output = Result<Vec<StoreStatus>, StorageError>> + Send;

    /// Whether `store` is registered: one indexed lookup, for requests naming a store.
    fn store_exists(&self, store: &StoreId) -> impl Future<Output = Result<bool, StorageError>> + Send;

    /// Which of `skus` the catalog knows (has any field of).
    fn known_skus(&self, skus: &[Sku]) -> impl Future<Output = Result<Vec<Sku>, StorageError>> + Send;

    /// Creates an online order under its store's partition lock: every line reserved against
    /// the cloud's rights as stored, or none. Idempotent by order id. Reads a few rows per line
    /// (grant, release, reservation totals), whatever the history of its SKUs.
    fn create_order(&self, order: &NewOrder) -> impl Future<Output = Result<CreateOutcome, StorageError>> + Send;

    /// Cancels every line of an order (`reason` is kept beside it), unless the cloud knows it
    /// was handed over. Idempotent: only the call that cancelled it answers `changed`. Reads
    /// only the order's own rows, whatever the history of its SKUs.
    fn cancel_order(
        &self,
        order: &OrderId,
        reason: CancelReason,
        now_ms: u64,
    ) -> impl Future<Output = Result<CancelOutcome, StorageError>> + Send;

    fn order(&self, order: &OrderId) -> impl Future<Output = Result<Option<OrderRecord>, StorageError>> + Send;

    /// A store's orders, newest first, at most `limit`, only those in `state` when given.
    fn store_orders(
        &self,
        store: &StoreId,
        state: Option<OrderState>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<OrderRecord>, StorageError>> + Send;

    /// Orders past their expiry, neither cancelled nor handed over, oldest expiry first.
    fn due_orders(&self, now_ms: u64, limit: u32) -> impl Future<Output = Result<Vec<OrderId>, StorageError>> + Send;

    /// The allocation of `skus` at `store` (each of them, empty where nothing happened yet), or
    /// of every SKU with allocation rows there when `None`, in SKU order.
    fn allocations(
        &self,
        store: &StoreId,
        skus: Option<&[Sku]>,
    ) -> impl Future<Output = Result<Vec<Allocation>, StorageError>> + Send;
}
