//! The HTTP face of the service: the store sync endpoint (postcard, [`sync`]) and the HQ JSON
//! API ([`hq`]), on one axum router generic over the storage backend. The router holds no state
//! of its own besides the settings, so any number of service processes can serve one database.
//!
//! Cross-cutting rules: every request body is read with a limit (`server.max_body_bytes`; a
//! declared length above it is refused before a byte is read, a streamed one as soon as it
//! crosses it), credentials are checked before a body is read, and a refused credential is a
//! security event. Storage failures answer 503 with `Retry-After`, since the database may be
//! back in a moment.

pub mod hq;
pub mod orders;
pub mod sync;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, HttpBody};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use tokio::net::TcpListener;

use crate::auth::{self, BearerError};
use crate::config::Config;
use crate::price_guard::Bounds;
use crate::storage::{Principal, Storage, StorageError};

/// What the handlers need from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_body_bytes: usize,
    pub max_skew_ms: u64,
    pub page_rows: u32,
    pub price_bounds: Bounds,
    /// How long an online order waits for pickup unless its request says otherwise.
    pub pickup_window_minutes: u64,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            max_body_bytes: config.server.max_body_bytes,
            max_skew_ms: config.sync.max_skew_ms,
            page_rows: config.sync.page_rows,
            price_bounds: Bounds {
                decrease_pct: config.prices.hold_decrease_pct,
                increase_pct: config.prices.hold_increase_pct,
            },
            pickup_window_minutes: config.orders.pickup_window_minutes,
        }
    }
}

/// The router's state: the database, the settings, and the budget of anonymous security
/// events.
pub struct AppState<S> {
    pub storage: S,
    pub settings: Arc<Settings>,
    pub(crate) anonymous_events: Arc<EventBudget>,
}

impl<S: Clone> Clone for AppState<S> {
    fn clone(&self) -> Self {
        AppState {
            storage: self.storage.clone(),
            settings: Arc::clone(&self.settings),
            anonymous_events: Arc::clone(&self.anonymous_events),
        }
    }
}

/// Most security events recorded per minute (per service process) for requests without a
/// valid credential. Anyone on the network can send those, and each would be a row: beyond the
/// budget they are counted and logged once a minute instead (DESIGN 13.7: bounded everything).
pub const ANONYMOUS_EVENTS_PER_MINUTE: u32 = 60;

/// A fixed one-minute window of [`ANONYMOUS_EVENTS_PER_MINUTE`] admissions.
#[derive(Debug, Default)]
pub(crate) struct EventBudget {
    /// (window start in ms, admitted in the window, refused in the window)
    window: std::sync::Mutex<(u64, u32, u64)>,
}

impl EventBudget {
    /// Whether an event at `now_ms` may be recorded.
    pub(crate) fn admit(&self, now_ms: u64) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if now_ms.saturating_sub(w.0) >= 60_000 {
            if w.2 > 0 {
                tracing::warn!(
                    not_recorded = w.2,
                    error_code = "SECURITY_EVENTS_DROPPED",
                    "Requests with bad credentials beyond the per-minute budget were refused but not recorded"
                );
            }
            *w = (now_ms, 0, 0);
        }
        if w.1 < ANONYMOUS_EVENTS_PER_MINUTE {
            w.1 += 1;
            true
        } else {
            w.2 += 1;
            false
        }
    }
}

/// Every route of the service.
pub fn router<S: Storage>(storage: S, settings: Settings) -> Router {
    let state = AppState { storage, settings: Arc::new(settings), anonymous_events: Arc::default() };
    Router::new()
        .route("/healthz", get(health::<S>))
        .route("/v1/stores/{store}/sync", post(sync::sync::<S>))
        .route("/v1/hq/catalog", post(hq::import_catalog::<S>))
        .route("/v1/hq/prices", put(hq::put_price::<S>))
        .route("/v1/hq/prices/held", get(hq::held_prices::<S>))
        .route("/v1/hq/prices/held/{id}/confirm", post(hq::confirm_held::<S>))
        .route("/v1/hq/prices/{sku}", get(hq::prices_of::<S>))
        .route("/v1/hq/transfers", post(hq::transfer::<S>))
        .route("/v1/hq/stock/{sku}", get(hq::stock_of::<S>))
        .route("/v1/hq/stores", get(hq::stores::<S>))
        .route("/v1/hq/orders", post(orders::create::<S>))
        .route("/v1/hq/orders/{order}", get(orders::get::<S>))
        .route("/v1/hq/orders/{order}/cancel", post(orders::cancel::<S>))
        .route("/v1/hq/stores/{store}/orders", get(orders::store_orders::<S>))
        .route("/v1/hq/stores/{store}/orders/at-risk", get(orders::at_risk::<S>))
        .route("/v1/hq/stores/{store}/allocation", get(orders::allocation::<S>))
        .route("/v1/hq/security-events", get(hq::security_events::<S>))
        .fallback(not_found)
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes, then finishes the requests in
/// flight (idle connections are closed at once).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn health<S: Storage>(State(app): State<AppState<S>>) -> Response {
    // One indexed lookup that never matches: proves the database answers, at the least cost.
    match app.storage.authenticate([0u8; 32]).await {
        Ok(_) => (StatusCode::OK, "ok").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, error_code = "DATABASE", "Health check: the database does not answer");
            text_error(StatusCode::SERVICE_UNAVAILABLE, &format!("database unavailable: {e}"))
        }
    }
}

async fn not_found() -> Response {
    text_error(StatusCode::NOT_FOUND, "no such endpoint: see openapi.yaml for the API")
}

/// A one-line `text/plain` error an edge can log as it is.
pub(crate) fn text_error(status: StatusCode, message: &str) -> Response {
    let mut line = one_line(message);
    line.push('\n');
    let mut response = (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], line).into_response();
    decorate(status, response.headers_mut());
    response
}

/// Headers every error of a status carries: how to authenticate, when to retry.
pub(crate) fn decorate(status: StatusCode, headers: &mut HeaderMap) {
    match status {
        StatusCode::UNAUTHORIZED => {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        StatusCode::PAYLOAD_TOO_LARGE => {
            // The rest of the body is not read: the connection cannot be reused.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        _ => {}
    }
}

pub(crate) fn one_line(message: &str) -> String {
    message.split(['\r', '\n']).map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>().join(" ")
}

/// The status a storage failure answers with. Retryable unless the data itself is at fault.
pub(crate) fn storage_status(e: &StorageError) -> StatusCode {
    match e {
        StorageError::StoreExists(_) | StorageError::AdminExists(_) => StatusCode::CONFLICT,
        StorageError::Overflow { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        // Retrying cannot help: the data, or this service, is at fault.
        StorageError::Corrupt(_) | StorageError::Invariant(_) => StatusCode::INTERNAL_SERVER_ERROR,
        StorageError::TooNew { .. } | StorageError::Sqlite(_) | StorageError::Postgres(_) | StorageError::Task(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

/// Why a request's credentials were refused.
#[derive(Debug)]
pub(crate) enum AuthFailure {
    /// No usable `Authorization` header.
    Bearer(BearerError),
    /// A token no credential has.
    Unknown,
    Storage(StorageError),
}

/// The principal the request's bearer token belongs to.
pub(crate) async fn authenticate<S: Storage>(storage: &S, headers: &HeaderMap) -> Result<Principal, AuthFailure> {
    let token = auth::parse_bearer(headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes))
        .map_err(AuthFailure::Bearer)?;
    match storage.authenticate(auth::sha256(token)).await {
        Ok(Some(principal)) => Ok(principal),
        Ok(None) => Err(AuthFailure::Unknown),
        Err(e) => Err(AuthFailure::Storage(e)),
    }
}

/// Why a body could not be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BodyError {
    TooLarge { limit: usize },
    Read(String),
}

impl BodyError {
    pub(crate) fn message(&self) -> String {
        match self {
            BodyError::TooLarge { limit } => {
                format!("request body is larger than the limit of {limit} bytes (server.max_body_bytes)")
            }
            BodyError::Read(e) => format!("cannot read the request body: {e}"),
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Read(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Refuses a body whose declared length is above the limit, before reading any of it.
pub(crate) fn check_declared_length(headers: &HeaderMap, limit: usize) -> Result<(), BodyError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => Err(BodyError::TooLarge { limit }),
        _ => Ok(()),
    }
}

/// Reads a body, refusing it as soon as it crosses `limit` bytes: at most `limit` bytes are
/// ever buffered, whatever the client sends.
pub(crate) async fn read_body(headers: &HeaderMap, mut body: Body, limit: usize) -> Result<Vec<u8>, BodyError> {
    check_declared_length(headers, limit)?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut out = Vec::with_capacity(declared.min(limit).min(1 << 20));
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if out.len().saturating_add(data.len()) > limit {
                return Err(BodyError::TooLarge { limit });
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_a_retry_can_cure_answer_503() {
        assert_eq!(storage_status(&StorageError::Task("queue closed".into())), StatusCode::SERVICE_UNAVAILABLE);
        for fatal in [StorageError::Invariant("bug".into()), StorageError::Corrupt("row".into())] {
            assert_eq!(storage_status(&fatal), StatusCode::INTERNAL_SERVER_ERROR, "{fatal}");
        }
    }

    #[test]
    fn error_bodies_are_one_line() {
        assert_eq!(one_line("a\nb\r\n  c  \n"), "a b c");
    }

    #[test]
    fn anonymous_events_have_a_budget_a_minute() {
        let budget = EventBudget::default();
        let admitted = (0..100).filter(|_| budget.admit(1_000_000)).count();
        assert_eq!(admitted, ANONYMOUS_EVENTS_PER_MINUTE as usize);
        assert!(!budget.admit(1_059_999));
        assert!(budget.admit(1_060_000), "a new minute, a new budget");
    }

    #[tokio::test]
    async fn bodies_are_read_up_to_the_limit_only() {
        let headers = HeaderMap::new();
        assert_eq!(read_body(&headers, Body::from(vec![1u8; 10]), 10).await.unwrap().len(), 10);
        assert_eq!(read_body(&headers, Body::from(vec![1u8; 11]), 10).await, Err(BodyError::TooLarge { limit: 10 }));
        let mut declared = HeaderMap::new();
        declared.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100000000"));
        assert_eq!(read_body(&declared, Body::empty(), 10).await, Err(BodyError::TooLarge { limit: 10 }));
        assert!(BodyError::TooLarge { limit: 10 }.message().contains("10 bytes"));
    }
}
