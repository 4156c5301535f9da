//! The local control API's messages: one JSON request line, one JSON reply line, both carrying
//! the protocol version, so `storectl` and the daemon can be upgraded separately and an
//! unknown version is refused with a message naming both.

use serde::{Deserialize, Serialize};

/// The control protocol version this build speaks.
pub const CONTROL_VERSION: u16 = 1;
/// Longest request line accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub v: u16,
    #[serde(flatten)]
    pub cmd: Cmd,
}

/// What `storectl` asks the daemon. Writes carry an idempotency key so a retried command
/// (a timeout, a script run twice) applies once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Cmd {
    Status,
    StockAdjust {
        key: String,
        sku: String,
        movement: i64,
        reason: String,
    },
    StockReceive {
        key: String,
        sku: String,
        quantity: i64,
        reference: String,
    },
    StockCount {
        key: String,
        sku: String,
        counted: i64,
    },
    /// A store-scope price; `promotion` selects the promotion register; `amount: None`
    /// withdraws the store's price.
    PriceSet {
        key: String,
        sku: String,
        amount: Option<String>,
        promotion: bool,
        from_ms: Option<u64>,
        until_ms: Option<u64>,
    },
    LabelsMismatch,
    /// Label counts by stage (up to date, pending, in flight, failed, expired).
    LabelsStatus,
    /// Send every label (of one SKU, or all) its content again.
    LabelsRepush {
        sku: Option<String>,
    },
    /// MQTT devices: health, firmware, last seen; quarantined strangers; refusal counters.
    Devices,
    SyncStatus,
    SyncNow,
    /// Pickup orders by status (`open`, `reserved`, `picked`, `expired`, `fulfilled`,
    /// `cancelled`, `all`; default `open`).
    OrdersList {
        status: Option<String>,
    },
    OrdersShow {
        order: String,
    },
    /// Staff put an order's goods aside.
    OrdersPick {
        key: String,
        order: String,
    },
    /// Hand an order over to the customer who gives its pickup code.
    OrdersHandover {
        key: String,
        order: String,
        code: String,
    },
    /// Pickup orders whose units the store does not have.
    OrdersAtRisk,
    /// The online allocation of one SKU, or of every SKU that has one.
    OnlineStatus {
        sku: Option<String>,
    },
}

impl Cmd {
    pub fn name(&self) -> &'static str {
        match self {
            Cmd::Status => "status",
            Cmd::StockAdjust { .. } => "stock_adjust",
            Cmd::StockReceive { .. } => "stock_receive",
            Cmd::StockCount { .. } => "stock_count",
            Cmd::PriceSet { .. } => "price_set",
            Cmd::LabelsMismatch => "labels_mismatch",
            Cmd::Devices => "devices",
            Cmd::LabelsStatus => "labels_status",
            Cmd::LabelsRepush { .. } => "labels_repush",
            Cmd::SyncStatus => "sync_status",
            Cmd::SyncNow => "sync_now",
            Cmd::OrdersList { .. } => "orders_list",
            Cmd::OrdersShow { .. } => "orders_show",
            Cmd::OrdersPick { .. } => "orders_pick",
            Cmd::OrdersHandover { .. } => "orders_handover",
            Cmd::OrdersAtRisk => "orders_at_risk",
            Cmd::OnlineStatus { .. } => "online_status",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub v: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ok: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// Why the daemon refused a request: `code` is stable for scripts, `message` is for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed, of another version, or names something invalid.
    BadRequest,
    /// The ledger refused the command (e.g. a stock overflow); nothing was applied.
    Refused,
    /// The feature is not configured on this daemon (no `[cloud]`, no `[labels]`).
    NotConfigured,
    /// The daemon could not do it now (the ledger write failed, it is shutting down).
    Unavailable,
}

impl Reply {
    pub fn ok(value: serde_json::Value) -> Reply {
        Reply { v: CONTROL_VERSION, ok: Some(value), error: None }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply { v: CONTROL_VERSION, ok: None, error: Some(ErrorBody { code, message: message.into() }) }
    }
}

/// Parses one request line: the version is checked before the command, so a newer storectl
/// gets "unsupported version" rather than a confusing field error.
pub fn parse_request(line: &str) -> Result<Request, Reply> {
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| Reply::error(ErrorCode::BadRequest, format!("request is not JSON: {e}")))?;
    match value.get("v").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(CONTROL_VERSION) => {}
        Some(v) => {
            return Err(Reply::error(
                ErrorCode::BadRequest,
                format!("control protocol version {v} is not supported; this daemon speaks {CONTROL_VERSION}"),
            ))
        }
        None => return Err(Reply::error(ErrorCode::BadRequest, "request has no protocol version \"v\"")),
    }
    serde_json::from_value(value).map_err(|e| Reply::error(ErrorCode::BadRequest, format!("bad request: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_versions_are_checked_first() {
        let req =
            Request { v: CONTROL_VERSION, cmd: Cmd::StockCount { key: "k".into(), sku: "MILK".into(), counted: 12 } };
        let line = serde_json::to_string(&req).unwrap();
        assert_eq!(parse_request(&line).unwrap(), req);
        let newer = line.replace("\"v\":1", "\"v\":9");
        let err = parse_request(&newer).unwrap_err().error.unwrap();
        assert!(err.message.contains("version 9") && err.message.contains("speaks 1"), "{}", err.message);
        let unknown = parse_request(r#"{"v":1,"cmd":"format_disk"}"#).unwrap_err().error.unwrap();
        assert_eq!(unknown.code, ErrorCode::BadRequest);
        assert!(parse_request("not json").is_err());
    }

    #[test]
    fn order_commands_are_snake_case_lines() {
        let req = Request {
            v: CONTROL_VERSION,
            cmd: Cmd::OrdersHandover { key: "k".into(), order: "W-1".into(), code: "123456".into() },
        };
        let line = serde_json::to_string(&req).unwrap();
        assert!(line.contains("\"cmd\":\"orders_handover\""), "{line}");
        assert_eq!(parse_request(&line).unwrap(), req);
        let at_risk = parse_request(r#"{"v":1,"cmd":"orders_at_risk"}"#).unwrap();
        assert_eq!(at_risk.cmd, Cmd::OrdersAtRisk);
    }
}
