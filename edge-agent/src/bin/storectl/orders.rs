//! `storectl orders ...` and `storectl online status`: online pickup orders at the counter.
//! Reads come from the daemon, or with it down from the ledger file (read-only, saying so on
//! stderr); a pick or a handover needs the daemon, since the ledger has one writer. Refusals
//! (wrong code, cancelled by HQ, already handed over, ...) exit 65 with the daemon's message.

use std::path::Path;

use clap::Subcommand;
use edge_agent::control::client::{call, ClientError};
use edge_agent::control::protocol::Cmd as ControlCmd;
use edge_agent::ledger::{LedgerError, LedgerReader};
use edge_agent::orders::{
    format_utc, AtRiskReport, OnlineRow, OrderList, OrderRefusal, OrderSummary, PickupStatus, StatusFilter,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use shared::{OrderId, OrderStatus, Sku};

use crate::{random_key, Failure, KeyArg, CONTROL_TIMEOUT};

#[derive(Subcommand)]
pub enum OrdersCmd {
    /// Pickup orders (by default the open ones: reserved, picked, expired).
    List {
        #[arg(long, value_enum, default_value = "open")]
        status: StatusArg,
    },
    /// One order: its lines, pickup deadline, and what happened to it.
    Show { order: String },
    /// Mark an order's goods as put aside for pickup.
    Pick {
        order: String,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Hand an order over to the customer: checks their pickup code, then takes every line
    /// from stock and marks the order fulfilled (the cloud learns it at the next sync).
    Handover {
        order: String,
        /// The 6-digit pickup code from the customer's confirmation.
        #[arg(long)]
        code: String,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Orders whose units the store no longer has on hand (after sales, counts, adjustments,
    /// merged changes or reservations beyond the stock).
    AtRisk,
}

#[derive(Subcommand)]
pub enum OnlineCmd {
    /// Units granted to the online channel, reserved, promised, its rights and what is free,
    /// per SKU (or for one SKU).
    Status { sku: Option<String> },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum StatusArg {
    Open,
    Reserved,
    Picked,
    Expired,
    Fulfilled,
    Cancelled,
    All,
}

impl StatusArg {
    fn as_str(self) -> &'static str {
        match self {
            StatusArg::Open => "open",
            StatusArg::Reserved => "reserved",
            StatusArg::Picked => "picked",
            StatusArg::Expired => "expired",
            StatusArg::Fulfilled => "fulfilled",
            StatusArg::Cancelled => "cancelled",
            StatusArg::All => "all",
        }
    }
}

fn now_ms() -> i64 {
    i64::try_from(crate::now_ms()).unwrap_or(i64::MAX)
}

/// Asks the daemon; with it down, reads the ledger file instead (and says so).
fn read<T: DeserializeOwned>(
    socket: &Path,
    data_dir: &Path,
    cmd: ControlCmd,
    local: impl FnOnce(&LedgerReader) -> Result<T, LedgerError>,
) -> Result<T, Failure> {
    match call(socket, cmd, CONTROL_TIMEOUT) {
        Ok(answer) => serde_json::from_value(answer)
            .map_err(|e| Failure::Io(format!("unreadable answer from the daemon (a newer or older edge-agent?): {e}"))),
        Err(ClientError::NotRunning { path, .. }) => {
            eprintln!("edge-agent is not running (no answer on {path}); from the ledger file, read-only:");
            let reader = LedgerReader::open(data_dir)?;
            Ok(local(&reader)?)
        }
        Err(e) => Err(Failure::Control(e)),
    }
}

fn parse_order(order: &str) -> Result<OrderId, Failure> {
    OrderId::new(order).map_err(|e| Failure::Usage(e.to_string()))
}

fn lines_text(lines: impl Iterator<Item = (Sku, u64)>) -> String {
    lines.map(|(sku, units)| format!("{units} x {sku}")).collect::<Vec<_>>().join(", ")
}

pub fn run(json: bool, data_dir: &Path, socket: &Path, command: &OrdersCmd) -> Result<(), Failure> {
    match command {
        OrdersCmd::List { status } => {
            let filter = StatusFilter::parse(status.as_str()).map_err(Failure::Usage)?;
            let now = now_ms();
            let cmd = ControlCmd::OrdersList { status: Some(status.as_str().to_owned()) };
            let list: OrderList = read(socket, data_dir, cmd, move |r| r.orders(filter, now))?;
            if json {
                println!("{}", json!({ "status": status.as_str(), "orders": list.orders, "matching": list.matching }));
            } else {
                print_list(status.as_str(), &list);
            }
            Ok(())
        }
        OrdersCmd::Show { order } => {
            let id = parse_order(order)?;
            let now = now_ms();
            let cmd = ControlCmd::OrdersShow { order: id.to_string() };
            let local_id = id.clone();
            let found: Option<OrderSummary> = read(socket, data_dir, cmd, move |r| r.order(&local_id, now))?;
            let Some(summary) = found else {
                return Err(Failure::Refused(format!(
                    "order {id} is not synced to this store yet; run `storectl sync now`, then retry"
                )));
            };
            if json {
                println!("{}", serde_json::to_string(&summary).map_err(|e| Failure::Io(e.to_string()))?);
            } else {
                print_order(&summary, now);
            }
            Ok(())
        }
        OrdersCmd::Pick { order, key } => {
            let order = parse_order(order)?;
            let key = key.key.clone().unwrap_or_else(random_key);
            let answer = write(socket, ControlCmd::OrdersPick { key: key.clone(), order: order.to_string() }, &key)?;
            if json {
                println!("{answer}");
            } else {
                println!("order {order} marked as picked (event {}){}", answer["seq"], replayed(&answer));
            }
            Ok(())
        }
        OrdersCmd::Handover { order, code, key } => {
            let order = parse_order(order)?;
            shared::orders::check_pickup_code_format(code)
                .map_err(|_| Failure::Usage(OrderRefusal::MistypedCode { order: order.clone() }.to_string()))?;
            let key = key.key.clone().unwrap_or_else(random_key);
            let cmd = ControlCmd::OrdersHandover { key: key.clone(), order: order.to_string(), code: code.clone() };
            let answer = write(socket, cmd, &key)?;
            if json {
                println!("{answer}");
            } else {
                let body = &answer["body"]["Handover"];
                let lines = body["lines"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|l| Some((Sku::new(l["sku"].as_str()?).ok()?, l["units"].as_u64()?)));
                let at = body["at_ms"].as_i64().map(format_utc).unwrap_or_default();
                println!(
                    "order {order} handed over at {at}: {} taken from stock (event {}){}",
                    lines_text(lines),
                    answer["seq"],
                    replayed(&answer)
                );
            }
            Ok(())
        }
        OrdersCmd::AtRisk => {
            let report: AtRiskReport =
                read(socket, data_dir, ControlCmd::OrdersAtRisk, |r| r.orders_at_risk(now_ms()))?;
            if json {
                println!("{}", serde_json::to_string(&report).map_err(|e| Failure::Io(e.to_string()))?);
            } else {
                print_at_risk(&report);
            }
            Ok(())
        }
    }
}

/// Sends a pick or a handover; on a broken connection, says how to retry safely.
fn write(socket: &Path, cmd: ControlCmd, key: &str) -> Result<Value, Failure> {
    call(socket, cmd, CONTROL_TIMEOUT).map_err(|e| {
        if let ClientError::Io(_) = &e {
            eprintln!("to retry without applying it twice, run the same command with --key {key}");
        }
        Failure::Control(e)
    })
}

fn replayed(answer: &Value) -> &'static str {
    if answer["replayed"].as_bool() == Some(true) {
        " (already recorded earlier with this key: nothing changed)"
    } else {
        ""
    }
}

fn print_list(status: &str, list: &OrderList) {
    let what = if status == "all" { String::new() } else { format!("{status} ") };
    if list.orders.is_empty() {
        println!("no {what}orders");
        return;
    }
    println!(
        "{} {what}orders{}",
        list.matching,
        if list.matching > list.orders.len() {
            format!(" (the latest {} shown)", list.orders.len())
        } else {
            String::new()
        }
    );
    println!("  {:<20} {:<10} {:<30} {:<24} PICK UP BY", "ORDER", "STATUS", "LINES", "CUSTOMER");
    for o in &list.orders {
        let lines = lines_text(o.lines.iter().map(|l| (l.sku.clone(), l.units)));
        println!(
            "  {:<20} {:<10} {:<30} {:<24} {}",
            o.order.as_str(),
            o.status.as_str(),
            lines,
            o.customer_ref,
            format_utc(o.expires_at_ms)
        );
    }
}

fn line_status(status: Option<OrderStatus>) -> &'static str {
    match status {
        None => "not synced yet",
        Some(OrderStatus::Reserved) => "reserved",
        Some(OrderStatus::Cancelled) => "cancelled",
        Some(OrderStatus::Fulfilled) => "handed over",
        Some(OrderStatus::CancelledButFulfilled) => "handed over (cancelled by HQ after)",
    }
}

fn print_order(o: &OrderSummary, now: i64) {
    println!("order {}: {}", o.order, o.status);
    println!("  customer:     {}", o.customer_ref);
    println!("  created:      {}", format_utc(o.created_at_ms));
    let late = if now >= o.expires_at_ms { " (passed)" } else { "" };
    println!("  pick up by:   {}{late}", format_utc(o.expires_at_ms));
    println!("  picked:       {}", o.picked_at_ms.map(format_utc).unwrap_or_else(|| "not yet".into()));
    println!("  handed over:  {}", o.handed_over_at_ms.map(format_utc).unwrap_or_else(|| "not yet".into()));
    println!("  {:<24} {:>8}  STATUS", "SKU", "UNITS");
    for l in &o.lines {
        println!("  {:<24} {:>8}  {}", l.sku.as_str(), l.units, line_status(l.status));
    }
    match o.status {
        PickupStatus::Cancelled => println!("do not hand it over: HQ cancelled it"),
        PickupStatus::Expired => {
            println!("do not hand it over: its pickup deadline passed (HQ cancels it at the next sync)")
        }
        _ if o.cancelled_after_handover => {
            println!("HQ cancelled it after it was handed over here: HQ settles it with the customer")
        }
        _ => {}
    }
}

fn print_at_risk(report: &AtRiskReport) {
    if report.orders.is_empty() {
        println!("no pickup order is at risk: every waiting order's units are in the store");
        return;
    }
    println!(
        "{} pickup orders at risk (their units are not in the store): restock, or ask HQ to contact the customers",
        report.orders.len()
    );
    for s in &report.skus {
        println!("  {}: {} on hand, {} promised, {} short", s.sku, s.on_hand, s.promised, s.shortfall);
        for o in report.orders.iter().filter(|o| o.sku == s.sku) {
            let by = o.expires_at_ms.map(|t| format!(", pick up by {}", format_utc(t))).unwrap_or_default();
            let customer =
                if o.customer_ref.is_empty() { "order not synced yet".to_owned() } else { o.customer_ref.clone() };
            println!("    {:<20} {:>6} units  {customer}{by}", o.order.as_str(), o.units);
        }
    }
}

/// What `online status` prints: from the daemon (with its policy), or from the ledger file.
#[derive(Deserialize)]
struct OnlineStatus {
    /// `None` when read from the ledger file (the policy lives with the daemon).
    enabled: Option<bool>,
    skus: Vec<OnlineRow>,
}

pub fn online(json: bool, data_dir: &Path, socket: &Path, command: &OnlineCmd) -> Result<(), Failure> {
    let OnlineCmd::Status { sku } = command;
    let sku = sku.as_deref().map(Sku::new).transpose().map_err(|e| Failure::Usage(e.to_string()))?;
    let local_sku = sku.clone();
    let cmd = ControlCmd::OnlineStatus { sku: sku.as_ref().map(Sku::to_string) };
    let status: OnlineStatus = read(socket, data_dir, cmd, move |r| {
        Ok(OnlineStatus { enabled: None, skus: r.online_status(local_sku.as_ref(), None)? })
    })?;
    if json {
        println!("{}", json!({ "enabled": status.enabled, "skus": status.skus }));
        return Ok(());
    }
    match status.enabled {
        Some(true) => println!("online allocation: on (the store tops each SKU up to its target)"),
        Some(false) => println!("online allocation: off ([online] enabled = false): the store grants nothing"),
        None => println!("online allocation: policy unknown (the daemon is not running)"),
    }
    if status.skus.is_empty() {
        println!("no SKU has an online allocation yet");
        return Ok(());
    }
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    println!(
        "  {:<20} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "SKU", "ON HAND", "GRANTED", "RESERVED", "PROMISED", "RIGHTS", "FREE", "TARGET", "SAFETY"
    );
    for r in &status.skus {
        println!(
            "  {:<20} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            r.sku.as_str(),
            r.on_hand,
            r.granted,
            r.reserved,
            r.promised,
            r.rights,
            r.free.map(|f| f.to_string()).unwrap_or_else(|| "-".into()),
            opt(r.target),
            opt(r.safety_stock)
        );
    }
    Ok(())
}
