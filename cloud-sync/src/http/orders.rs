//! The HQ API of online pickup orders (DESIGN 5, 13.5): create an order (every line reserved
//! against the units the store granted the online channel, or none, naming every short line),
//! read it, cancel it, list a store's orders, the orders its stock no longer covers, and its
//! allocation per SKU. The same admin-token auth as the rest of `/v1/hq`. Errors are
//! `{"error": NAME, "message": LINE}`; a short order adds `order` and `lines`.
//! `cloud-sync/openapi.yaml` documents every shape.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shared::orders::{check_customer_ref, pickup_code_digest, OrderLine, MAX_ORDER_LINES};
use shared::{OrderHeader, OrderId, Sku, StoreId};

use super::hq::{admin, count, ApiError, ApiResult};
use super::{now_ms, read_body, AppState};
use crate::config::MAX_PICKUP_WINDOW_MINUTES;
use crate::orders::{self as view, Allocations, OrderState};
use crate::storage::{CancelOutcome, CancelReason, CreateOutcome, NewOrder, OrderRecord, Storage};

/// Most orders one listing returns (`?limit=`, default [`DEFAULT_LISTED_ORDERS`]).
pub const MAX_LISTED_ORDERS: u32 = 1_000;
pub const DEFAULT_LISTED_ORDERS: u32 = 100;

const INVALID: &str = "invalid order";

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::coded(StatusCode::UNPROCESSABLE_ENTITY, INVALID, message)
}

fn unknown_order(order: &str) -> ApiError {
    ApiError::coded(
        StatusCode::NOT_FOUND,
        "unknown order",
        format!("no order {:?}", order.chars().take(80).collect::<String>()),
    )
}

fn unknown_store(store: &str) -> ApiError {
    ApiError::coded(
        StatusCode::NOT_FOUND,
        "unknown store",
        format!("no store {:?}: add it with `cloud-sync store add`", store.chars().take(80).collect::<String>()),
    )
}

fn bad_query(e: QueryRejection) -> ApiError {
    ApiError::coded(StatusCode::BAD_REQUEST, "bad request", e.body_text())
}

/// `POST /v1/hq/orders` as HQ sends it (validated by hand, so every problem is a 422 naming
/// its field or line).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    order: String,
    store: String,
    customer_ref: String,
    lines: Vec<LineRequest>,
    #[serde(default)]
    pickup_window_minutes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineRequest {
    sku: String,
    units: u64,
}

/// The request as an order header (its pickup code's digest from `code`), or a 422 naming what
/// is wrong; `now_ms` is its creation time.
fn header_of(
    request: CreateRequest,
    code: &str,
    now_ms: u64,
    default_window_minutes: u64,
) -> Result<OrderHeader, ApiError> {
    let order = OrderId::new(request.order).map_err(|e| invalid(format!("`order`: {e}")))?;
    let store = StoreId::new(request.store).map_err(|e| invalid(format!("`store`: {e}")))?;
    check_customer_ref(&request.customer_ref).map_err(|e| invalid(format!("`customer_ref` {e}")))?;
    if request.lines.len() > MAX_ORDER_LINES {
        return Err(invalid(format!(
            "`lines`: order {order} has {} lines, more than the {MAX_ORDER_LINES} an order may have",
            request.lines.len()
        )));
    }
    let mut lines = Vec::with_capacity(request.lines.len());
    for (i, line) in request.lines.into_iter().enumerate() {
        let sku = Sku::new(line.sku).map_err(|e| invalid(format!("`lines[{i}].sku` (line {}): {e}", i + 1)))?;
        lines.push(OrderLine { sku, units: line.units });
    }
    let window = request.pickup_window_minutes.unwrap_or(default_window_minutes);
    if !(1..=MAX_PICKUP_WINDOW_MINUTES).contains(&window) {
        return Err(invalid(format!(
            "`pickup_window_minutes` must be between 1 and {MAX_PICKUP_WINDOW_MINUTES} (a year), got {window}"
        )));
    }
    let created = i64::try_from(now_ms).map_err(|_| invalid("the service clock is beyond 64-bit milliseconds"))?;
    let header = OrderHeader {
        pickup_code_digest: pickup_code_digest(&order, code),
        order,
        store,
        customer_ref: request.customer_ref,
        created_at_ms: created,
        // At most a year after a clock that fits in i64 milliseconds: no overflow.
        expires_at_ms: created.saturating_add(i64::try_from(window * 60_000).unwrap_or(i64::MAX)),
        lines,
    };
    header.validate().map_err(|e| invalid(e.to_string()))?;
    Ok(header)
}

#[derive(Serialize)]
struct LineJson<'a> {
    sku: &'a str,
    units: u64,
    status: OrderState,
}

/// An order as the API shows it: the pickup code only when asked for, `at_risk` on reads.
#[derive(Serialize)]
struct OrderJson<'a> {
    order: &'a str,
    store: &'a str,
    status: OrderState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pickup_code: Option<&'a str>,
    created_at: String,
    expires_at: String,
    customer_ref: &'a str,
    lines: Vec<LineJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    at_risk: Option<bool>,
}

fn order_json<'a>(record: &'a OrderRecord, seen: &'a view::OrderView, code: bool, risk: bool) -> OrderJson<'a> {
    let h = &record.header;
    OrderJson {
        order: h.order.as_str(),
        store: h.store.as_str(),
        status: seen.state,
        pickup_code: code.then_some(record.pickup_code.as_str()),
        created_at: view::rfc3339(h.created_at_ms),
        expires_at: view::rfc3339(h.expires_at_ms),
        customer_ref: &h.customer_ref,
        lines: seen.lines.iter().map(|l| LineJson { sku: l.sku.as_str(), units: l.units, status: l.state }).collect(),
        at_risk: risk.then_some(seen.at_risk),
    }
}

/// The allocation of the SKUs of `records` at their store, each SKU's orders at risk worked
/// out once for all of them.
async fn allocations_for<S: Storage>(
    app: &AppState<S>,
    store: &StoreId,
    records: &[OrderRecord],
) -> Result<Allocations, ApiError> {
    let skus: BTreeSet<Sku> = records.iter().flat_map(|r| r.header.lines.iter().map(|l| l.sku.clone())).collect();
    let skus: Vec<Sku> = skus.into_iter().collect();
    Ok(app.storage.allocations(store, Some(&skus)).await?.into_iter().collect())
}

fn view_of(record: &OrderRecord, allocations: &Allocations) -> Result<view::OrderView, ApiError> {
    view::order_view(record, allocations).map_err(|e| {
        tracing::error!(order_id = %record.header.order, error = %e, error_code = "DATABASE", "Order cannot be shown");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e)
    })
}

/// One order as it stands now.
async fn show<S: Storage>(app: &AppState<S>, record: &OrderRecord, code: bool, risk: bool) -> Result<Value, ApiError> {
    let allocations = allocations_for(app, &record.header.store, std::slice::from_ref(record)).await?;
    let seen = view_of(record, &allocations)?;
    serde_json::to_value(order_json(record, &seen, code, risk))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode order: {e}")))
}

fn parse_create(bytes: &[u8]) -> Result<CreateRequest, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let request: CreateRequest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // "." is the whole body, "?" a place the parser never reached (broken JSON).
        if path == "." || path == "?" {
            invalid(format!("invalid JSON body: {inner}"))
        } else {
            invalid(format!("`{path}`: {inner}"))
        }
    })?;
    de.end().map_err(|e| invalid(format!("invalid JSON body: {e}")))?;
    Ok(request)
}

fn short_message(header: &OrderHeader, short: &[crate::storage::ShortLine]) -> String {
    let lines: Vec<String> =
        short.iter().map(|s| format!("{} (wanted {}, available {})", s.sku, s.wanted, s.available)).collect();
    format!(
        "insufficient allocation for order {} at store {}: {}; nothing was reserved",
        header.order,
        header.store,
        lines.join(", ")
    )
}

/// `POST /v1/hq/orders`.
pub async fn create<S: Storage>(State(app): State<AppState<S>>, headers: HeaderMap, body: Body) -> ApiResult {
    let name = admin(&app, &headers).await?;
    let bytes = read_body(&headers, body, app.settings.max_body_bytes)
        .await
        .map_err(|e| ApiError::new(e.status(), e.message()))?;
    let code = view::new_pickup_code();
    let header = header_of(parse_create(&bytes)?, &code, now_ms(), app.settings.pickup_window_minutes)?;
    if !app.storage.store_exists(&header.store).await? {
        return Err(invalid(format!("`store`: no store {}: add it with `cloud-sync store add`", header.store)));
    }
    let skus: Vec<Sku> = header.lines.iter().map(|l| l.sku.clone()).collect();
    let known: BTreeSet<Sku> = app.storage.known_skus(&skus).await?.into_iter().collect();
    let unknown: Vec<String> = skus
        .iter()
        .enumerate()
        .filter(|(_, sku)| !known.contains(*sku))
        .map(|(i, sku)| format!("{sku} (line {})", i + 1))
        .collect();
    if !unknown.is_empty() {
        return Err(invalid(format!("`lines`: unknown SKU {}: import it into the catalog first", unknown.join(", "))));
    }
    match app.storage.create_order(&NewOrder { header: header.clone(), pickup_code: code }).await? {
        CreateOutcome::Created(record) => {
            let h = &record.header;
            tracing::info!(order_id = %h.order, store_id = %h.store, lines = h.lines.len(), admin = %name, "Online order reserved");
            let seen = view::OrderView {
                state: OrderState::Reserved,
                lines: h
                    .lines
                    .iter()
                    .map(|l| view::LineView { sku: l.sku.clone(), units: l.units, state: OrderState::Reserved })
                    .collect(),
                at_risk: false,
            };
            Ok((StatusCode::CREATED, Json(order_json(&record, &seen, true, false))).into_response())
        }
        CreateOutcome::Replayed(record) => Ok(Json(show(&app, &record, true, false).await?).into_response()),
        CreateOutcome::Short(short) => {
            tracing::info!(order_id = %header.order, store_id = %header.store, short_lines = short.len(), "Online order refused: insufficient allocation");
            let lines: Vec<Value> = short
                .iter()
                .map(|s| json!({ "sku": s.sku.as_str(), "wanted": s.wanted, "available": s.available }))
                .collect();
            Err(ApiError::coded(StatusCode::CONFLICT, "insufficient allocation", short_message(&header, &short))
                .with("order", json!(header.order.as_str()))
                .with("lines", Value::Array(lines)))
        }
        CreateOutcome::Conflict(record) => Err(ApiError::coded(
            StatusCode::CONFLICT,
            "order exists",
            format!(
                "order {} already exists for store {} with other contents (store, customer reference or lines); \
                 an order id is never reused",
                record.header.order, record.header.store
            ),
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderQuery {
    #[serde(default)]
    with_code: bool,
}

/// `GET /v1/hq/orders/{order}`.
pub async fn get<S: Storage>(
    State(app): State<AppState<S>>,
    Path(order): Path<String>,
    headers: HeaderMap,
    query: Result<Query<OrderQuery>, QueryRejection>,
) -> ApiResult {
    admin(&app, &headers).await?;
    let Query(query) = query.map_err(bad_query)?;
    let id = OrderId::new(order.clone()).map_err(|_| unknown_order(&order))?;
    let record = app.storage.order(&id).await?.ok_or_else(|| unknown_order(&order))?;
    Ok(Json(show(&app, &record, query.with_code, true).await?).into_response())
}

/// `POST /v1/hq/orders/{order}/cancel` (any body is ignored).
pub async fn cancel<S: Storage>(
    State(app): State<AppState<S>>,
    Path(order): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let name = admin(&app, &headers).await?;
    let id = OrderId::new(order.clone()).map_err(|_| unknown_order(&order))?;
    match app.storage.cancel_order(&id, CancelReason::Cancelled, now_ms()).await? {
        CancelOutcome::Cancelled { record, changed } => {
            // A repeated cancel answers the same, but only the one that cancelled is logged.
            if changed {
                tracing::info!(order_id = %id, store_id = %record.header.store, admin = %name, "Online order cancelled");
            }
            Ok(Json(show(&app, &record, false, true).await?).into_response())
        }
        CancelOutcome::AlreadyFulfilled { record, skus } => {
            let skus: Vec<&str> = skus.iter().map(Sku::as_str).collect();
            Err(ApiError::coded(
                StatusCode::CONFLICT,
                "already handed over",
                format!(
                    "order {id} was already handed over at store {} ({}): it can no longer be cancelled (refund it as a return)",
                    record.header.store,
                    skus.join(", ")
                ),
            ))
        }
        CancelOutcome::NotFound => Err(unknown_order(&order)),
    }
}

/// The store of a `/v1/hq/stores/{store}/...` path, if it is registered.
async fn known_store<S: Storage>(app: &AppState<S>, store: &str) -> Result<StoreId, ApiError> {
    let id = StoreId::new(store).map_err(|_| unknown_store(store))?;
    if app.storage.store_exists(&id).await? {
        Ok(id)
    } else {
        Err(unknown_store(store))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    limit: Option<u32>,
}

/// `GET /v1/hq/stores/{store}/orders?status=reserved&limit=100`: newest first.
pub async fn store_orders<S: Storage>(
    State(app): State<AppState<S>>,
    Path(store): Path<String>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult {
    admin(&app, &headers).await?;
    let Query(query) = query.map_err(bad_query)?;
    let state = query
        .status
        .as_deref()
        .map(str::parse::<OrderState>)
        .transpose()
        .map_err(|e| ApiError::coded(StatusCode::BAD_REQUEST, "bad request", format!("`status`: {e}")))?;
    let limit = query.limit.unwrap_or(DEFAULT_LISTED_ORDERS).clamp(1, MAX_LISTED_ORDERS);
    let store = known_store(&app, &store).await?;
    let records = app.storage.store_orders(&store, state, limit).await?;
    let allocations = allocations_for(&app, &store, &records).await?;
    let mut orders = Vec::with_capacity(records.len());
    for record in &records {
        let seen = view_of(record, &allocations)?;
        orders.push(
            serde_json::to_value(order_json(record, &seen, false, true))
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode order: {e}")))?,
        );
    }
    Ok(Json(json!({ "store": store.as_str(), "orders": orders })).into_response())
}

/// `GET /v1/hq/stores/{store}/orders/at-risk`: the order lines the store's stock, as last
/// synced, no longer covers, and the SKUs short.
pub async fn at_risk<S: Storage>(
    State(app): State<AppState<S>>,
    Path(store): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    admin(&app, &headers).await?;
    let store = known_store(&app, &store).await?;
    let risk = view::at_risk(&app.storage.allocations(&store, None).await?);
    let orders: Vec<Value> = risk
        .lines
        .iter()
        .map(|l| json!({ "order": l.order.as_str(), "sku": l.sku.as_str(), "units": l.units }))
        .collect();
    let skus: Vec<Value> = risk
        .shortages
        .iter()
        .map(
            |s| json!({ "sku": s.sku.as_str(), "on_hand": count(s.on_hand), "promised": s.promised, "short": s.short }),
        )
        .collect();
    Ok(Json(json!({ "store": store.as_str(), "orders": orders, "skus": skus })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocationQuery {
    sku: Option<String>,
}

/// `GET /v1/hq/stores/{store}/allocation?sku=MILK`: every SKU with allocation rows, or one.
pub async fn allocation<S: Storage>(
    State(app): State<AppState<S>>,
    Path(store): Path<String>,
    headers: HeaderMap,
    query: Result<Query<AllocationQuery>, QueryRejection>,
) -> ApiResult {
    admin(&app, &headers).await?;
    let Query(query) = query.map_err(bad_query)?;
    let sku = query
        .sku
        .map(Sku::new)
        .transpose()
        .map_err(|e| ApiError::coded(StatusCode::BAD_REQUEST, "bad request", format!("`sku`: {e}")))?;
    let store = known_store(&app, &store).await?;
    let allocations = app.storage.allocations(&store, sku.as_ref().map(std::slice::from_ref)).await?;
    let skus: Vec<Value> = allocations
        .iter()
        .map(|a| {
            let t = a.escrow.totals();
            json!({
                "sku": a.escrow.key().sku.as_str(),
                "granted": t.granted,
                "released": t.released,
                "reserved": t.reserved,
                "promised": t.promised,
                "fulfilled": t.fulfilled,
                "cancelled": t.cancelled,
                "rights": count(a.escrow.cloud_rights()),
            })
        })
        .collect();
    Ok(Json(json!({ "store": store.as_str(), "skus": skus })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> CreateRequest {
        parse_create(text.as_bytes()).unwrap()
    }

    const GOOD: &str = r#"{"order":"W-1001","store":"s1","customer_ref":"cust 42","lines":[{"sku":"MILK","units":2}]}"#;

    #[test]
    fn a_request_becomes_a_header_with_the_code_digest_and_expiry() {
        let h = header_of(request(GOOD), "123456", 1_000, 2880).unwrap();
        assert_eq!((h.order.as_str(), h.store.as_str(), h.customer_ref.as_str()), ("W-1001", "s1", "cust 42"));
        assert_eq!((h.created_at_ms, h.expires_at_ms), (1_000, 1_000 + 2880 * 60_000));
        assert!(h.code_matches("123456"));
        let own = GOOD.replace("]}", "],\"pickup_window_minutes\":30}");
        assert_eq!(header_of(request(&own), "1", 0, 2880).unwrap().expires_at_ms, 30 * 60_000);
    }

    #[test]
    fn every_bad_request_is_a_422_naming_its_field_or_line() {
        let refused = |text: &str| match parse_create(text.as_bytes()) {
            Err(e) => e,
            Ok(r) => header_of(r, "123456", 1_000, 2880).unwrap_err(),
        };
        for (text, names) in [
            (GOOD.replace("W-1001", "W 1001"), "`order`"),
            (GOOD.replace("\"s1\"", "\"s 1\""), "`store`"),
            (GOOD.replace("cust 42", ""), "`customer_ref`"),
            (GOOD.replace("\"MILK\"", "\"M ILK\""), "`lines[0].sku` (line 1)"),
            (GOOD.replace("\"units\":2", "\"units\":0"), "line 1 (MILK) asks for 0 units"),
            (GOOD.replace("\"units\":2", "\"units\":-2"), "`lines[0].units`"),
            (GOOD.replace("}]}", "},{\"sku\":\"MILK\",\"units\":1}]}"), "lines 1 and 2"),
            (GOOD.replace("]}", "],\"colour\":1}"), "colour"),
            (GOOD.replace("]}", "],\"pickup_window_minutes\":0}"), "`pickup_window_minutes`"),
            (GOOD.replace("[{\"sku\":\"MILK\",\"units\":2}]", "[]"), "no lines"),
            ("{".to_owned(), "invalid JSON"),
        ] {
            let e = refused(&text);
            assert_eq!((e.status, e.code), (StatusCode::UNPROCESSABLE_ENTITY, Some(INVALID)), "{text}");
            assert!(e.message.contains(names), "{text}: {}", e.message);
        }
    }
}
