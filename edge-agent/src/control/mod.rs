//! The daemon's local control API: a Unix socket (mode 0660, an optional group) where
//! `storectl` sends one versioned JSON request per connection. Writes go through the daemon's
//! ledger writer (there is one writer); reads answer from the daemon's live state (sync, labels)
//! and from the ledger's committed projections (stock, pickup orders, online allocation).

pub mod client;
pub mod protocol;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;
use shared::{Currency, Money, OrderId, PriceKey, PriceScope, PriceSlot, PriceValue, Sku, StoreId, ValidityWindow};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::labels::runtime::Mismatches;
use crate::ledger::{Command, IdempotencyKey, LedgerHandle, LedgerReader, SubmitError};
use crate::orders::{OrderRefusal, StatusFilter};
use crate::sync::SyncControl;
use protocol::{Cmd, ErrorCode, Reply, CONTROL_VERSION, MAX_REQUEST_BYTES};

/// What the control API can reach in the running daemon.
#[derive(Clone)]
pub struct Control {
    pub store: StoreId,
    pub currency: Currency,
    pub data_dir: PathBuf,
    pub ledger: LedgerHandle,
    pub sync: Option<SyncControl>,
    /// Present when shelf labels are configured.
    pub mismatches: Option<Mismatches>,
    /// The MQTT side's live counters and device registry, when `[mqtt]` is configured.
    pub mqtt: Option<crate::mqtt::MqttHandles>,
    pub started_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("control socket group {0:?} does not exist")]
    NoSuchGroup(String),
}

/// Requests served at once; further connections wait to be accepted.
const MAX_CONNECTIONS: usize = 16;
/// A request must arrive, be answered and be read within this long.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Binds the socket (replacing a stale one left by a crash), sets its mode and group, and
/// serves until `stop`.
pub fn start(
    control: Control,
    path: &Path,
    group: Option<&str>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<(), ControlError> {
    let io = |source| ControlError::Io { path: path.to_owned(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), "Removed a stale control socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
    if let Some(group) = group {
        set_group(path, group)?;
    }
    tracing::info!(path = %path.display(), "Control socket listening");
    let control = Arc::new(control);
    // Bounded (DESIGN 13.7): at most this many requests at once; more wait to be accepted.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let stop = stop.clone();
    let socket_path = path.to_owned();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let Ok(permit) = slots.clone().acquire_owned().await else { break };
                        let control = control.clone();
                        tokio::spawn(async move {
                            // A client that sends nothing, or never reads, loses its slot.
                            let _ = tokio::time::timeout(REQUEST_TIMEOUT, serve(stream, &control)).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, error_code = "CONTROL_ACCEPT", "Control socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
            }
        }
        let _ = std::fs::remove_file(&socket_path);
    });
    Ok(())
}

fn set_group(path: &Path, group: &str) -> Result<(), ControlError> {
    let name = std::ffi::CString::new(group).map_err(|_| ControlError::NoSuchGroup(group.to_owned()))?;
    // SAFETY: getgrnam reads the group database and returns a pointer to static storage or
    // null; we read gr_gid at once, before any other call could overwrite it.
    let gid = unsafe {
        let entry = libc::getgrnam(name.as_ptr());
        if entry.is_null() {
            return Err(ControlError::NoSuchGroup(group.to_owned()));
        }
        (*entry).gr_gid
    };
    std::os::unix::fs::chown(path, None, Some(gid)).map_err(|source| ControlError::Io { path: path.to_owned(), source })
}

async fn serve(stream: UnixStream, control: &Control) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = String::new();
    let reply = match reader.read_line(&mut line).await {
        Ok(n) if n > MAX_REQUEST_BYTES => {
            Reply::error(ErrorCode::BadRequest, format!("request longer than {MAX_REQUEST_BYTES} bytes"))
        }
        Ok(_) => match protocol::parse_request(line.trim_end()) {
            Ok(request) => {
                let name = request.cmd.name();
                let reply = handle(control, request.cmd).await;
                if let Some(e) = &reply.error {
                    tracing::info!(command = name, error = %e.message, "Control request refused");
                }
                reply
            }
            Err(reply) => reply,
        },
        Err(e) => Reply::error(ErrorCode::BadRequest, format!("cannot read the request: {e}")),
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"v\":1}".to_vec());
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}

fn bad(message: impl Into<String>) -> Reply {
    Reply::error(ErrorCode::BadRequest, message)
}

fn parse_sku(sku: &str) -> Result<Sku, Reply> {
    Sku::new(sku).map_err(|e| bad(e.to_string()))
}

fn parse_order(order: &str) -> Result<OrderId, Reply> {
    OrderId::new(order).map_err(|e| bad(e.to_string()))
}

fn to_json(value: &impl serde::Serialize) -> Result<serde_json::Value, Reply> {
    serde_json::to_value(value)
        .map_err(|e| Reply::error(ErrorCode::Unavailable, format!("cannot encode the answer: {e}")))
}

fn parse_key(key: &str) -> Result<IdempotencyKey, Reply> {
    IdempotencyKey::new(format!("storectl:{key}")).map_err(|e| bad(e.to_string()))
}

async fn submit(control: &Control, key: &str, command: Command) -> Reply {
    let key = match parse_key(key) {
        Ok(k) => k,
        Err(r) => return r,
    };
    match control.ledger.submit(key, command).await {
        Ok(applied) => Reply::ok(json!({
            "seq": applied.seq,
            "replayed": applied.replayed,
            "event": applied.body.kind(),
            "body": serde_json::to_value(&applied.body).unwrap_or_default(),
        })),
        Err(SubmitError::Rejected(r)) => Reply::error(ErrorCode::Refused, r.to_string()),
        Err(e) => Reply::error(ErrorCode::Unavailable, e.to_string()),
    }
}

/// Reads from the ledger on a blocking thread (SQLite is blocking).
async fn read_ledger<T: Send + 'static>(
    control: &Control,
    f: impl FnOnce(&LedgerReader) -> Result<T, crate::ledger::LedgerError> + Send + 'static,
) -> Result<T, Reply> {
    let dir = control.data_dir.clone();
    tokio::task::spawn_blocking(move || LedgerReader::open(&dir).and_then(|r| f(&r)))
        .await
        .map_err(|e| Reply::error(ErrorCode::Unavailable, e.to_string()))?
        .map_err(|e| Reply::error(ErrorCode::Unavailable, e.to_string()))
}

async fn handle(control: &Control, cmd: Cmd) -> Reply {
    match handle_inner(control, cmd).await {
        Ok(reply) | Err(reply) => reply,
    }
}

async fn handle_inner(control: &Control, cmd: Cmd) -> Result<Reply, Reply> {
    Ok(match cmd {
        Cmd::Status => {
            let (position, events, outbox) =
                read_ledger(control, |r| Ok((r.sync_position()?, r.event_count()?, r.outbox_depth()?))).await?;
            let stats = control.ledger.stats();
            let sync = control.sync.as_ref().map(|s| s.status.lock().unwrap_or_else(|p| p.into_inner()).clone());
            Reply::ok(json!({
                "daemon": "running",
                "protocol": CONTROL_VERSION,
                "store": control.store.as_str(),
                "started_ms": control.started_ms,
                "uptime_s": now_ms().saturating_sub(control.started_ms) / 1000,
                "ledger": {
                    "events": events,
                    "queue_depth": control.ledger.queue_depth(),
                    "batches": stats.batches,
                    "failed_batches": stats.failed_batches,
                },
                "mqtt": control.mqtt.is_some(),
                "broker_connected": control.mqtt.as_ref().map(|m| *m.connected.borrow()),
                "cloud": sync.map(|s| json!({ "configured": true, "status": s })).unwrap_or(json!({ "configured": false })),
                "sync": { "outbox_rows": outbox, "position": position },
                "labels_mismatched": control.mismatches.as_ref().map(|m| m.lock().map(|l| l.len()).unwrap_or(0)),
            }))
        }
        Cmd::StockAdjust { key, sku, movement, reason } => {
            let sku = parse_sku(&sku)?;
            submit(control, &key, Command::Adjustment { sku, movement, reason }).await
        }
        Cmd::StockReceive { key, sku, quantity, reference } => {
            let sku = parse_sku(&sku)?;
            submit(control, &key, Command::Receipt { sku, quantity, reference }).await
        }
        Cmd::StockCount { key, sku, counted } => {
            let sku = parse_sku(&sku)?;
            submit(control, &key, Command::Count { sku, counted }).await
        }
        Cmd::PriceSet { key, sku, amount, promotion, from_ms, until_ms } => {
            let sku = parse_sku(&sku)?;
            let window = match (from_ms, until_ms) {
                (None, None) => None,
                (from, until) => Some(ValidityWindow {
                    from_ms: from.unwrap_or_else(now_ms),
                    until_ms: until.unwrap_or(i64::MAX as u64),
                }),
            };
            let value = match amount {
                None => None,
                Some(text) => {
                    let amount =
                        Money::parse(&text, control.currency).map_err(|e| bad(format!("price {text:?}: {e}")))?;
                    Some(PriceValue::new(&sku, amount, window).map_err(|e| bad(e.to_string()))?)
                }
            };
            let slot = if promotion { PriceSlot::Promotion } else { PriceSlot::Regular };
            let key_of = PriceKey { sku, scope: PriceScope::Store(control.store.clone()), slot };
            submit(control, &key, Command::PriceChange { key: key_of, value }).await
        }
        Cmd::LabelsMismatch => match &control.mismatches {
            None => Reply::error(ErrorCode::NotConfigured, "no shelf labels are configured ([labels] in the config)"),
            Some(m) => {
                let list = m.lock().map(|l| l.clone()).unwrap_or_default();
                let rows: Vec<_> =
                    list.iter().map(|(label, sku)| json!({ "label": label.as_str(), "sku": sku.as_str() })).collect();
                Reply::ok(json!({ "mismatched": rows }))
            }
        },
        Cmd::SyncStatus => {
            let position = read_ledger(control, |r| r.sync_position()).await?;
            let outbox = read_ledger(control, |r| r.outbox_depth()).await?;
            let status = control.sync.as_ref().map(|s| s.status.lock().unwrap_or_else(|p| p.into_inner()).clone());
            Reply::ok(
                json!({ "configured": status.is_some(), "status": status, "position": position, "outbox_rows": outbox }),
            )
        }
        Cmd::LabelsStatus => match control.mqtt.as_ref().and_then(|m| m.labels.as_ref()) {
            None => Reply::error(ErrorCode::NotConfigured, "no shelf labels are configured ([labels] in the config)"),
            Some(l) => {
                let view = l.board.lock().map(|v| v.clone()).unwrap_or_default();
                let mismatched = control.mismatches.as_ref().map(|m| m.lock().map(|l| l.len()).unwrap_or(0));
                Reply::ok(
                    json!({ "labels": view.labels, "stages": view.stages, "stale_inputs": view.stale_inputs, "mismatched": mismatched }),
                )
            }
        },
        Cmd::LabelsRepush { sku } => match control.mqtt.as_ref().and_then(|m| m.labels.as_ref()) {
            None => Reply::error(ErrorCode::NotConfigured, "no shelf labels are configured ([labels] in the config)"),
            Some(l) => {
                let sku = sku.as_deref().map(parse_sku).transpose()?;
                match l.inputs.try_send(crate::labels::runtime::LabelInput::Repush { sku }) {
                    Ok(()) => Reply::ok(json!({ "requested": true })),
                    Err(_) => Reply::error(ErrorCode::Unavailable, "the label task is busy; try again in a moment"),
                }
            }
        },
        Cmd::Devices => match &control.mqtt {
            None => Reply::error(ErrorCode::NotConfigured, "no MQTT devices are configured ([mqtt] in the config)"),
            Some(handles) => {
                let snapshot = handles.board.lock().map(|b| b.clone()).unwrap_or_default();
                let devices: Vec<_> = snapshot
                    .devices
                    .iter()
                    .map(|(id, info)| {
                        let mut v = serde_json::to_value(info).unwrap_or_default();
                        v["id"] = json!(id.as_str());
                        v
                    })
                    .collect();
                let quarantined: Vec<_> =
                    snapshot.quarantined.iter().map(|(id, n)| json!({ "id": id.as_str(), "messages": n })).collect();
                Reply::ok(json!({ "devices": devices, "quarantined": quarantined, "counters": snapshot.stats }))
            }
        },
        Cmd::OrdersList { status } => {
            let filter = StatusFilter::parse(status.as_deref().unwrap_or("open")).map_err(bad)?;
            let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
            Reply::ok(to_json(&read_ledger(control, move |r| r.orders(filter, now)).await?)?)
        }
        Cmd::OrdersShow { order } => {
            let order = parse_order(&order)?;
            let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
            let id = order.clone();
            match read_ledger(control, move |r| r.order(&id, now)).await? {
                Some(summary) => Reply::ok(to_json(&summary)?),
                None => Reply::error(ErrorCode::Refused, OrderRefusal::NotSynced { order }.to_string()),
            }
        }
        Cmd::OrdersPick { key, order } => {
            let order = parse_order(&order)?;
            submit(control, &key, Command::Pick { order }).await
        }
        Cmd::OrdersHandover { key, order, code } => {
            let order = parse_order(&order)?;
            // Never the code itself in the reply or the journal line of the refusal.
            shared::orders::check_pickup_code_format(&code)
                .map_err(|_| bad(OrderRefusal::MistypedCode { order: order.clone() }.to_string()))?;
            submit(control, &key, Command::Handover { order, code }).await
        }
        Cmd::OrdersAtRisk => {
            let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
            Reply::ok(to_json(&read_ledger(control, move |r| r.orders_at_risk(now)).await?)?)
        }
        Cmd::OnlineStatus { sku } => {
            let sku = sku.as_deref().map(parse_sku).transpose()?;
            let policy = control.ledger.online_policy().clone();
            let rows = read_ledger(control, move |r| r.online_status(sku.as_ref(), Some(&policy))).await?;
            Reply::ok(json!({ "enabled": control.ledger.online_policy().enabled, "skus": to_json(&rows)? }))
        }
        Cmd::SyncNow => match &control.sync {
            None => Reply::error(ErrorCode::NotConfigured, "no cloud is configured ([cloud] in the config)"),
            Some(s) => {
                s.now.notify_one();
                Reply::ok(json!({ "requested": true }))
            }
        },
    })
}
