//! `POST /v1/stores/{store}/sync`: one exchange of the store sync protocol (`shared::sync`).
//! The store pushes its own rows and names its cursor; the cloud merges the push and answers
//! with the version it now holds and a page of its rows beyond the cursor. Both bodies are
//! `application/x-postcard` in the versioned envelope of `shared::wire`; every error is one
//! `text/plain` line the edge logs as it is.
//!
//! Checks, in order: a declared body above the limit (413, before anything is read); the
//! bearer token (401, a `bad_token` security event) and that it is this store's (403, a
//! `wrong_store` security event); the body read with the limit (413); the envelope (400 naming
//! the versions when the protocol version is unknown); ownership of every pushed row (403, a
//! refusal with a security event, counted in the store's refused rows: another store's or
//! actor's row, an allocation row only the cloud writes, an order header) and the request's shape
//! (400, a refusal); every stamp against the skew fence (409, a refusal). Only then is anything
//! merged. Storage failures answer 503: the store retries, and a retry is harmless because
//! every merge is idempotent.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use shared::sync::{self as proto, SyncRequest, SyncResponse};
use shared::{wire, ActorId, Hlc, HlcStamp, StoreId};

use super::{authenticate, read_body, text_error, AppState, AuthFailure};
use crate::storage::{Principal, Storage, StorageError, SyncReport};

const BAD_TOKEN: &str = "bad_token";

/// The media type of sync bodies.
pub const POSTCARD: &str = "application/x-postcard";

/// A refused exchange: status, the one-line message, and what to record.
struct Refusal {
    status: StatusCode,
    message: String,
    /// `(kind, rows, security)` for `Storage::record_refusal`.
    record: Option<(&'static str, u64, bool)>,
    /// The store the refusal is recorded against (the path's, or the token's owner).
    store: Option<StoreId>,
}

impl Refusal {
    fn plain(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal { status, message: message.into(), record: None, store: None }
    }

    fn recorded(
        status: StatusCode,
        message: impl Into<String>,
        store: &StoreId,
        kind: &'static str,
        rows: u64,
        security: bool,
    ) -> Refusal {
        Refusal { status, message: message.into(), record: Some((kind, rows, security)), store: Some(store.clone()) }
    }

    fn storage(e: StorageError) -> Refusal {
        Refusal::plain(super::storage_status(&e), format!("cloud storage unavailable, retry later: {e}"))
    }
}

pub async fn sync<S: Storage>(
    State(app): State<AppState<S>>,
    Path(store): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let now_ms = super::now_ms();
    let store = match StoreId::new(store) {
        Ok(s) => s,
        Err(e) => return text_error(StatusCode::NOT_FOUND, &format!("no such store: {e}")),
    };
    match exchange(&app, &store, &headers, body, now_ms).await {
        Ok(bytes) => (StatusCode::OK, [(header::CONTENT_TYPE, POSTCARD)], bytes).into_response(),
        Err(refusal) => {
            if let Some((kind, rows, security)) = refusal.record {
                let on = refusal.store.as_ref();
                tracing::warn!(
                    store_id = %store,
                    error_code = kind,
                    status = refusal.status.as_u16(),
                    error = %refusal.message,
                    "Sync refused"
                );
                // A bad token proves nothing about who sent it: those are rate-limited.
                if kind != BAD_TOKEN || app.anonymous_events.admit(now_ms) {
                    if let Err(e) = app.storage.record_refusal(on, kind, &refusal.message, rows, security, now_ms).await
                    {
                        tracing::error!(store_id = %store, error = %e, "Cannot record a refused sync");
                    }
                }
            } else if refusal.status.is_server_error() {
                tracing::error!(store_id = %store, status = refusal.status.as_u16(), error = %refusal.message, "Sync failed");
            } else {
                tracing::info!(store_id = %store, status = refusal.status.as_u16(), error = %refusal.message, "Sync refused");
            }
            text_error(refusal.status, &refusal.message)
        }
    }
}

async fn exchange<S: Storage>(
    app: &AppState<S>,
    store: &StoreId,
    headers: &HeaderMap,
    body: Body,
    now_ms: u64,
) -> Result<Vec<u8>, Refusal> {
    let limit = app.settings.max_body_bytes;
    super::check_declared_length(headers, limit).map_err(|e| Refusal::plain(e.status(), e.message()))?;
    match authenticate(&app.storage, headers).await {
        Ok(Principal::Store(owner)) if owner == *store => {}
        Ok(Principal::Store(owner)) => {
            return Err(Refusal::recorded(
                StatusCode::FORBIDDEN,
                format!("this token belongs to store {owner}, not to store {store}"),
                &owner,
                "wrong_store",
                0,
                true,
            ))
        }
        Ok(Principal::Admin(name)) => {
            return Err(Refusal::recorded(
                StatusCode::FORBIDDEN,
                format!("HQ credential {name} cannot sync as store {store}: use the store's token"),
                store,
                "wrong_store",
                0,
                true,
            ))
        }
        Err(AuthFailure::Storage(e)) => return Err(Refusal::storage(e)),
        Err(AuthFailure::Bearer(e)) => {
            return Err(Refusal::recorded(StatusCode::UNAUTHORIZED, e.to_string(), store, BAD_TOKEN, 0, true))
        }
        Err(AuthFailure::Unknown) => {
            return Err(Refusal::recorded(
                StatusCode::UNAUTHORIZED,
                format!("unknown token for store {store}"),
                store,
                BAD_TOKEN,
                0,
                true,
            ))
        }
    }
    let bytes = read_body(headers, body, limit).await.map_err(|e| Refusal::plain(e.status(), e.message()))?;
    let request: SyncRequest =
        wire::decode(&bytes).map_err(|e| Refusal::plain(StatusCode::BAD_REQUEST, e.to_string()))?;
    drop(bytes);
    let rows = request.push.as_ref().map_or(0, |p| p.rows.len() as u64);
    if let Err(refusal) = proto::check_push(store, &request) {
        let (status, security) =
            if refusal.is_ownership() { (StatusCode::FORBIDDEN, true) } else { (StatusCode::BAD_REQUEST, false) };
        let kind = if security { "ownership" } else { "invalid_push" };
        return Err(Refusal::recorded(status, refusal.to_string(), store, kind, rows, security));
    }
    let fence = Hlc::new(ActorId::cloud(), app.settings.max_skew_ms);
    if let Some(e) = proto::stamps(&request).find_map(|s| fence.check_skew(s, now_ms).err()) {
        return Err(Refusal::recorded(StatusCode::CONFLICT, e.to_string(), store, "skew", rows, false));
    }
    let max_stamp = proto::stamps(&request).max();
    let acked_version = app
        .storage
        .push(SyncReport {
            store,
            sender: request.sent_at.actor.clone(),
            push: request.push.as_ref(),
            head_version: request.head_version,
            cursor: request.cursor,
            max_stamp,
            now_ms,
        })
        .await
        .map_err(Refusal::storage)?;
    // At least one row a page, so a pull always makes progress.
    let max_rows = request.max_rows.min(app.settings.page_rows).max(1);
    // The sending ledger's actor (checked by `check_push` to be one of the store's).
    let leave_out = (!request.include_own_slots).then(|| request.sent_at.actor.clone());
    let page = app.storage.pull(store, request.cursor, max_rows, leave_out).await.map_err(Refusal::storage)?;
    tracing::debug!(
        store_id = %store,
        pushed = rows,
        pulled = page.rows.len(),
        acked_version,
        more = page.more,
        "Sync exchange"
    );
    let response = SyncResponse {
        cloud_time: HlcStamp { wall_ms: now_ms, logical: 0, actor: ActorId::cloud() },
        acked_version,
        rows: page.rows,
        next_cursor: page.next_cursor,
        more: page.more,
    };
    wire::encode(&response)
        .map_err(|e| Refusal::plain(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode the sync response: {e}")))
}
