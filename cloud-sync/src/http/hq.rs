//! The HQ JSON API: catalog import, prices (with the hold of suspicious changes), stock
//! transfers, chain-wide stock, per-store sync status and security events. Every endpoint needs
//! an HQ admin token: no token or an unknown one is 401 and a `bad_token` security event, a
//! store's token is 403 and a `store_token_on_hq` security event. Errors are
//! `{"error": "..."}`, except a refused catalog file, which lists its bad rows, and the order
//! routes ([`super::orders`]), whose errors are `{"error": NAME, "message": "..."}`.
//! `cloud-sync/openapi.yaml` documents every shape.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shared::{
    Currency, HlcStamp, Money, PriceEntry, PriceKey, PriceScope, PriceSlot, PriceValue, Sku, StoreId, ValidityWindow,
};

use super::{authenticate, now_ms, read_body, AppState, AuthFailure};
use crate::catalog_import::{self, ImportErrors};
use crate::price_guard;
use crate::storage::{
    CloudMovement, CloudWrites, HeldPrice, PriceWrite, Principal, Storage, StorageError, StoreStatus,
};

/// Most security events one request lists.
pub const MAX_EVENTS: u32 = 1_000;
/// Longest transfer id.
pub const MAX_TRANSFER_ID: usize = 64;

/// An HQ API error: status and a one-line message, answered as `{"error": message}`; or, with
/// a `code`, as `{"error": code, "message": message, ...detail}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// A stable name for the error, for clients to match on.
    pub code: Option<&'static str>,
    /// More members of the body, beside `error` and `message` (only with a `code`).
    pub detail: serde_json::Map<String, Value>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), code: None, detail: serde_json::Map::new() }
    }

    /// An error with a stable name.
    pub(crate) fn coded(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { code: Some(code), ..ApiError::new(status, message) }
    }

    /// Adds a member to the body of a coded error.
    pub(crate) fn with(mut self, key: &str, value: Value) -> ApiError {
        self.detail.insert(key.to_owned(), value);
        self
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn unprocessable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> ApiError {
        let status = super::storage_status(&e);
        if status.is_server_error() {
            tracing::error!(error = %e, error_code = "DATABASE", "HQ request failed in the database");
        }
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = super::one_line(&self.message);
        let body = match self.code {
            None => json!({ "error": message }),
            Some(code) => {
                let mut body = serde_json::Map::new();
                body.insert("error".into(), json!(code));
                body.insert("message".into(), json!(message));
                body.extend(self.detail);
                Value::Object(body)
            }
        };
        let mut response = (self.status, Json(body)).into_response();
        super::decorate(self.status, response.headers_mut());
        response
    }
}

pub(crate) type ApiResult = Result<Response, ApiError>;

/// Checks that the request carries an HQ admin token; records refused credentials.
pub(crate) async fn admin<S: Storage>(app: &AppState<S>, headers: &HeaderMap) -> Result<String, ApiError> {
    let now = now_ms();
    let (store, message, kind) = match authenticate(&app.storage, headers).await {
        Ok(Principal::Admin(name)) => return Ok(name),
        Ok(Principal::Store(store)) => {
            let message = format!("store {store}'s token cannot use the HQ API: use an HQ admin token");
            (Some(store), message, "store_token_on_hq")
        }
        Err(AuthFailure::Storage(e)) => return Err(e.into()),
        Err(AuthFailure::Bearer(e)) => (None, e.to_string(), "bad_token"),
        Err(AuthFailure::Unknown) => (None, "unknown token for the HQ API".to_owned(), "bad_token"),
    };
    let status = if store.is_some() { StatusCode::FORBIDDEN } else { StatusCode::UNAUTHORIZED };
    tracing::warn!(
        store_id = store.as_ref().map_or("-", StoreId::as_str),
        error_code = kind,
        error = %message,
        "HQ request refused"
    );
    // Only a known credential's misuse is always recorded; anonymous attempts are rate-limited.
    if store.is_some() || app.anonymous_events.admit(now) {
        if let Err(e) = app.storage.record_refusal(store.as_ref(), kind, &message, 0, true, now).await {
            tracing::error!(error = %e, "Cannot record a refused HQ request");
        }
    }
    Err(ApiError::new(status, message))
}

/// Reads and parses a JSON body, naming the field at fault.
async fn json_body<S, T: DeserializeOwned>(app: &AppState<S>, headers: &HeaderMap, body: Body) -> Result<T, ApiError> {
    let bytes = read_body(headers, body, app.settings.max_body_bytes)
        .await
        .map_err(|e| ApiError::new(e.status(), e.message()))?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::bad_request(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::bad_request(format!("invalid JSON body at `{path}`: {inner}"))
        }
    })?;
    de.end().map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

fn parse_sku(text: &str) -> Result<Sku, ApiError> {
    Sku::new(text).map_err(|e| ApiError::bad_request(e.to_string()))
}

pub(crate) async fn known_stores<S: Storage>(app: &AppState<S>) -> Result<Vec<StoreStatus>, ApiError> {
    Ok(app.storage.stores().await?)
}

// ---------------------------------------------------------------------------------------------
// Catalog

pub async fn import_catalog<S: Storage>(State(app): State<AppState<S>>, headers: HeaderMap, body: Body) -> ApiResult {
    admin(&app, &headers).await?;
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default();
    let parse: fn(&[u8]) -> Result<Vec<catalog_import::CatalogRow>, ImportErrors> = match media.as_str() {
        "text/csv" => catalog_import::parse_csv,
        "application/json" => catalog_import::parse_json,
        _ => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Content-Type {media:?} is not accepted: send text/csv or application/json"),
            ))
        }
    };
    let bytes = read_body(&headers, body, app.settings.max_body_bytes)
        .await
        .map_err(|e| ApiError::new(e.status(), e.message()))?;
    let rows = match parse(&bytes) {
        Ok(rows) => rows,
        Err(errors) => {
            tracing::info!(bad_rows = errors.total, "Catalog import refused");
            return Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(errors)).into_response());
        }
    };
    let writes = CloudWrites { catalog: catalog_import::writes(&rows), ..CloudWrites::default() };
    app.storage.apply(&writes, now_ms()).await?;
    tracing::info!(rows = rows.len(), "Catalog imported");
    Ok(Json(json!({ "applied_rows": rows.len() })).into_response())
}

// ---------------------------------------------------------------------------------------------
// Prices

/// A price write as HQ sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceRequest {
    sku: Sku,
    /// `"chain"` or `{"store": "s1"}`.
    scope: Value,
    slot: SlotJson,
    /// A decimal string, or `null` to withdraw the price. Required: a forgotten amount must not
    /// withdraw a price.
    amount: Value,
    currency: Option<Currency>,
    window: Option<WindowJson>,
    #[serde(default)]
    confirm: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
enum SlotJson {
    Regular,
    Promotion,
}

impl From<SlotJson> for PriceSlot {
    fn from(s: SlotJson) -> PriceSlot {
        match s {
            SlotJson::Regular => PriceSlot::Regular,
            SlotJson::Promotion => PriceSlot::Promotion,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct WindowJson {
    from_ms: u64,
    until_ms: u64,
}

fn parse_scope(value: &Value) -> Result<PriceScope, ApiError> {
    let bad = || ApiError::bad_request("`scope` must be \"chain\" or {\"store\": \"STORE_ID\"}");
    match value {
        Value::String(s) if s == "chain" => Ok(PriceScope::Chain),
        Value::Object(map) if map.len() == 1 => {
            let store = map.get("store").and_then(Value::as_str).ok_or_else(bad)?;
            Ok(PriceScope::Store(
                StoreId::new(store).map_err(|e| ApiError::bad_request(format!("`scope.store`: {e}")))?,
            ))
        }
        _ => Err(bad()),
    }
}

impl PriceRequest {
    fn write(&self) -> Result<PriceWrite, ApiError> {
        let scope = parse_scope(&self.scope)?;
        let key = PriceKey { sku: self.sku.clone(), scope, slot: self.slot.into() };
        let value = match &self.amount {
            Value::Null => None,
            Value::String(text) => {
                let currency = self
                    .currency
                    .ok_or_else(|| ApiError::bad_request("`currency` is required with an amount, e.g. \"EUR\""))?;
                let amount =
                    Money::parse(text.trim(), currency).map_err(|e| ApiError::bad_request(format!("`amount`: {e}")))?;
                let window = self.window.map(|w| ValidityWindow { from_ms: w.from_ms, until_ms: w.until_ms });
                Some(PriceValue::new(&self.sku, amount, window).map_err(|e| ApiError::unprocessable(e.to_string()))?)
            }
            _ => return Err(ApiError::bad_request("`amount` must be a decimal string such as \"1.29\", or null")),
        };
        Ok(PriceWrite { key, value })
    }
}

/// A price as the API shows it (the shape `PUT /v1/hq/prices` takes).
#[derive(Debug, Serialize)]
struct PriceJson {
    sku: String,
    scope: Value,
    slot: SlotJson,
    amount: Option<String>,
    currency: Option<String>,
    window: Option<WindowJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stamp: Option<HlcStamp>,
}

fn scope_json(scope: &PriceScope) -> Value {
    match scope {
        PriceScope::Chain => json!("chain"),
        PriceScope::Store(s) => json!({ "store": s.as_str() }),
    }
}

fn slot_json(slot: PriceSlot) -> SlotJson {
    match slot {
        PriceSlot::Regular => SlotJson::Regular,
        PriceSlot::Promotion => SlotJson::Promotion,
    }
}

/// `1.29` for 1.29 EUR: the decimal amount without its currency.
fn amount_text(m: &Money) -> String {
    let shown = m.to_string();
    shown.rsplit_once(' ').map_or(shown.clone(), |(amount, _)| amount.to_owned())
}

fn price_json(key: &PriceKey, value: Option<&PriceValue>, stamp: Option<&HlcStamp>) -> PriceJson {
    PriceJson {
        sku: key.sku.to_string(),
        scope: scope_json(&key.scope),
        slot: slot_json(key.slot),
        amount: value.map(|v| amount_text(&v.amount)),
        currency: value.map(|v| v.amount.currency.to_string()),
        window: value.and_then(|v| v.window).map(|w| WindowJson { from_ms: w.from_ms, until_ms: w.until_ms }),
        stamp: stamp.cloned(),
    }
}

fn entry_json(e: &PriceEntry) -> PriceJson {
    price_json(&e.key, e.value.as_ref(), Some(&e.stamp))
}

fn held_json(h: &HeldPrice) -> Value {
    json!({
        "id": h.id,
        "price": price_json(&h.write.key, h.write.value.as_ref(), None),
        "reason": h.reason,
        "held_at_ms": h.held_at_ms,
    })
}

pub async fn put_price<S: Storage>(State(app): State<AppState<S>>, headers: HeaderMap, body: Body) -> ApiResult {
    admin(&app, &headers).await?;
    let request: PriceRequest = json_body(&app, &headers, body).await?;
    let write = request.write()?;
    if let PriceScope::Store(store) = &write.key.scope {
        if !app.storage.store_exists(store).await? {
            return Err(ApiError::unprocessable(format!("no store {store}: add it with `cloud-sync store add`")));
        }
    }
    let now = now_ms();
    if !request.confirm {
        let entries = app.storage.prices_of(&write.key.sku).await?;
        let reference = price_guard::reference(&entries, &write.key, now);
        let new = write.value.as_ref().map(|v| v.amount);
        if let Some(reason) = price_guard::hold_reason(app.settings.price_bounds, reference.as_ref(), new.as_ref()) {
            let id = app.storage.hold_price(&write, &reason, now).await?;
            tracing::info!(sku = %write.key.sku, held_id = id, reason = %reason, "Price change held for confirmation");
            return Ok((StatusCode::ACCEPTED, Json(json!({ "held": id, "reason": reason }))).into_response());
        }
    }
    let applied = app.storage.apply(&CloudWrites { prices: vec![write], ..CloudWrites::default() }, now).await?;
    Ok(Json(json!({ "stamp": applied.stamp })).into_response())
}

pub async fn held_prices<S: Storage>(State(app): State<AppState<S>>, headers: HeaderMap) -> ApiResult {
    admin(&app, &headers).await?;
    let held = app.storage.held_prices().await?;
    Ok(Json(json!({ "held": held.iter().map(held_json).collect::<Vec<_>>() })).into_response())
}

pub async fn confirm_held<S: Storage>(
    State(app): State<AppState<S>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let name = admin(&app, &headers).await?;
    let id: i64 = id.parse().map_err(|_| ApiError::bad_request(format!("held price id {id:?} is not a number")))?;
    match app.storage.confirm_held(id, now_ms()).await? {
        Some(applied) => {
            tracing::info!(held_id = id, admin = %name, "Held price change confirmed");
            Ok(Json(json!({ "stamp": applied.stamp })).into_response())
        }
        None => {
            Err(ApiError::new(StatusCode::NOT_FOUND, format!("no held price {id}: confirmed already, or never held")))
        }
    }
}

pub async fn prices_of<S: Storage>(
    State(app): State<AppState<S>>,
    Path(sku): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    admin(&app, &headers).await?;
    let sku = parse_sku(&sku)?;
    let entries = app.storage.prices_of(&sku).await?;
    let stores = known_stores(&app).await?;
    let now = now_ms();
    let chain = price_guard::chain_effective(&entries, &sku, now).map(entry_json);
    let per_store: Vec<Value> = stores
        .iter()
        .map(|s| {
            let price = shared::effective_price(&entries, &sku, &s.store, now).map(entry_json);
            json!({ "store": s.store.as_str(), "price": price })
        })
        .collect();
    Ok(Json(json!({
        "sku": sku.as_str(),
        "at_ms": now,
        "registers": entries.iter().map(entry_json).collect::<Vec<_>>(),
        "effective": { "chain": chain, "stores": per_store },
    }))
    .into_response())
}

// ---------------------------------------------------------------------------------------------
// Stock

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    id: String,
    from: StoreId,
    to: StoreId,
    sku: Sku,
    quantity: u64,
}

pub async fn transfer<S: Storage>(State(app): State<AppState<S>>, headers: HeaderMap, body: Body) -> ApiResult {
    admin(&app, &headers).await?;
    let t: TransferRequest = json_body(&app, &headers, body).await?;
    if t.id.is_empty() || t.id.len() > MAX_TRANSFER_ID || !t.id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::bad_request(format!(
            "`id` must be 1 to {MAX_TRANSFER_ID} printable ASCII characters without spaces"
        )));
    }
    let quantity = i64::try_from(t.quantity)
        .ok()
        .filter(|q| *q > 0)
        .ok_or_else(|| ApiError::unprocessable(format!("`quantity` must be between 1 and {}", i64::MAX)))?;
    if t.from == t.to {
        return Err(ApiError::unprocessable(format!("a transfer needs two different stores (both are {})", t.from)));
    }
    for store in [&t.from, &t.to] {
        if !app.storage.store_exists(store).await? {
            return Err(ApiError::unprocessable(format!("no store {store}: add it with `cloud-sync store add`")));
        }
    }
    let writes = CloudWrites {
        op_id: Some(format!("transfer:{}", t.id)),
        stock: vec![
            CloudMovement { store: t.from.clone(), sku: t.sku.clone(), movement: -quantity },
            CloudMovement { store: t.to.clone(), sku: t.sku.clone(), movement: quantity },
        ],
        ..CloudWrites::default()
    };
    let applied = app.storage.apply(&writes, now_ms()).await?;
    tracing::info!(
        transfer_id = %t.id,
        from = %t.from,
        to = %t.to,
        sku = %t.sku,
        quantity,
        replayed = applied.replayed,
        "Stock transfer"
    );
    Ok(Json(json!({ "replayed": applied.replayed })).into_response())
}

pub async fn stock_of<S: Storage>(
    State(app): State<AppState<S>>,
    Path(sku): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    admin(&app, &headers).await?;
    let sku = parse_sku(&sku)?;
    let rows = app.storage.stock_of_sku(&sku).await?;
    let mut per_store: BTreeMap<&StoreId, (i128, Vec<Value>)> = BTreeMap::new();
    for row in &rows {
        let entry = per_store.entry(&row.key.store).or_default();
        entry.0 += row.slot.value();
        entry.1.push(json!({ "actor": row.key.actor.as_str(), "inc": row.slot.inc, "dec": row.slot.dec }));
    }
    let chain_total: i128 = per_store.values().map(|(v, _)| v).sum();
    let stores: Vec<Value> = per_store
        .into_iter()
        .map(|(store, (value, slots))| json!({ "store": store.as_str(), "value": count(value), "slots": slots }))
        .collect();
    Ok(Json(json!({ "sku": sku.as_str(), "stores": stores, "chain_total": count(chain_total) })).into_response())
}

/// A stock value as a JSON number, or as a decimal string beyond the 64-bit range JSON
/// readers handle (sums of slots can reach it; they are never truncated).
pub(crate) fn count(value: i128) -> Value {
    i64::try_from(value).map_or_else(|_| Value::String(value.to_string()), Value::from)
}

// ---------------------------------------------------------------------------------------------
// Stores and security

#[derive(Serialize)]
struct StoreView<'a> {
    #[serde(flatten)]
    status: &'a StoreStatus,
    push_lag_versions: u64,
    seconds_since_seen: Option<u64>,
    /// Online orders the store's stock, as last synced, no longer covers.
    orders_at_risk: usize,
}

pub async fn stores<S: Storage>(State(app): State<AppState<S>>, headers: HeaderMap) -> ApiResult {
    admin(&app, &headers).await?;
    let stores = known_stores(&app).await?;
    let now = now_ms();
    let mut views: Vec<StoreView<'_>> = Vec::with_capacity(stores.len());
    for status in &stores {
        let allocations = app.storage.allocations(&status.store, None).await?;
        views.push(StoreView {
            status,
            push_lag_versions: status.head_version.saturating_sub(status.acked_version),
            seconds_since_seen: status.last_seen_ms.map(|seen| now.saturating_sub(seen) / 1000),
            orders_at_risk: crate::orders::at_risk(&allocations).orders(),
        });
    }
    Ok(Json(json!({ "stores": views })).into_response())
}

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    limit: Option<u32>,
}

pub async fn security_events<S: Storage>(
    State(app): State<AppState<S>>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult {
    admin(&app, &headers).await?;
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_EVENTS);
    let events = app.storage.security_events(limit).await?;
    Ok(Json(json!({ "events": events })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> PriceRequest {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn price_requests_become_writes() {
        let w = request(
            r#"{"sku":"MILK","scope":{"store":"s1"},"slot":"promotion","amount":"0.99","currency":"EUR","window":{"from_ms":1,"until_ms":2}}"#,
        )
        .write()
        .unwrap();
        assert_eq!(w.key.scope, PriceScope::Store(StoreId::new("s1").unwrap()));
        assert_eq!(w.key.slot, PriceSlot::Promotion);
        let v = w.value.unwrap();
        assert_eq!(v.amount.minor, 99);
        assert_eq!(v.window, Some(ValidityWindow { from_ms: 1, until_ms: 2 }));
        let withdraw = request(r#"{"sku":"MILK","scope":"chain","slot":"regular","amount":null}"#).write().unwrap();
        assert_eq!(withdraw.value, None);
    }

    #[test]
    fn bad_price_requests_say_why() {
        let e = |t: &str| request(t).write().unwrap_err();
        assert_eq!(
            e(r#"{"sku":"M","scope":"chain","slot":"regular","amount":"1.29"}"#).status,
            StatusCode::BAD_REQUEST
        );
        assert!(e(r#"{"sku":"M","scope":"shop","slot":"regular","amount":null}"#).message.contains("scope"));
        assert!(e(r#"{"sku":"M","scope":"chain","slot":"regular","amount":1.29,"currency":"EUR"}"#)
            .message
            .contains("decimal string"));
        assert!(e(r#"{"sku":"M","scope":"chain","slot":"regular","amount":"1.299","currency":"EUR"}"#)
            .message
            .contains("amount"));
        let negative = e(r#"{"sku":"M","scope":"chain","slot":"regular","amount":"-1","currency":"EUR"}"#);
        assert_eq!(negative.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(serde_json::from_str::<PriceRequest>(r#"{"sku":"M","scope":"chain","slot":"regular"}"#).is_err());
    }

    #[test]
    fn prices_show_in_the_shape_they_are_written() {
        let key = PriceKey { sku: Sku::new("M").unwrap(), scope: PriceScope::Chain, slot: PriceSlot::Regular };
        let value = PriceValue { amount: Money::new(129, Currency::new("EUR").unwrap()), window: None };
        let shown = serde_json::to_value(price_json(&key, Some(&value), None)).unwrap();
        assert_eq!(
            shown,
            json!({"sku":"M","scope":"chain","slot":"regular","amount":"1.29","currency":"EUR","window":null})
        );
        let jpy = Money::new(500, Currency::new("JPY").unwrap());
        assert_eq!(amount_text(&jpy), "500");
    }
}
