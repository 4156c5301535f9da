//! `storectl orders` and `storectl online` against the real daemon, at the pickup counter:
//! orders that reached the store (a sync page merged into its ledger before the daemon starts)
//! are listed and shown; a pick; a handover with a wrong code, a mistyped code, the right code,
//! then again; an order HQ cancelled and one never synced; a stock correction that eats into
//! promised units raises the alert (journal, metrics, `orders at-risk`); every refusal exits 65
//! (a mistyped code 64) with no stock moved; and with the daemon stopped the reads still
//! answer from the ledger file, which verifies.

use std::process::Output;

use e2e_tests::output::{json, ok, text};
use std::time::Duration;

use e2e_tests::mqtt::free_port;
use e2e_tests::store::StoreFixture;
use edge_agent::ledger::{Ledger, LedgerOptions, MergedPage, SyncAck};
use shared::orders::{pickup_code_digest, OrderLine};
use shared::sync::{Cursor, Rows};
use shared::{ActorId, Currency, EscrowKey, EscrowRow, HlcStamp, OrderHeader, OrderId, Sku, StoreId};

const CODE: &str = "482913";

/// Exit code and everything printed.
fn refused(out: Output) -> (i32, String) {
    assert!(!out.status.success(), "storectl should have refused: {}", text(&out));
    (out.status.code().unwrap_or(-1), text(&out))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// What the cloud would send: W-1 (2 MILK), W-2 (1 MILK, 1 EGGS; HQ cancelled it),
/// W-3 (95 MILK, reserved after W-1: the store has 100).
fn page() -> Rows {
    let store = StoreId::new("s1").unwrap();
    let header = |id: &str, lines: &[(&str, u64)]| {
        let order = OrderId::new(id).unwrap();
        OrderHeader {
            pickup_code_digest: pickup_code_digest(&order, CODE),
            order,
            store: store.clone(),
            customer_ref: format!("customer {id}"),
            created_at_ms: now_ms() - 60_000,
            expires_at_ms: now_ms() + 86_400_000,
            lines: lines.iter().map(|(s, u)| OrderLine { sku: Sku::new(*s).unwrap(), units: *u }).collect(),
        }
    };
    let reservation = |sku: &str, id: &str, units: u64, seq: u64, cancelled: bool| EscrowRow::Reservation {
        key: EscrowKey { store: store.clone(), sku: Sku::new(sku).unwrap() },
        order: OrderId::new(id).unwrap(),
        units,
        seq,
        cancelled,
    };
    Rows {
        orders: vec![
            header("W-1", &[("MILK", 2)]),
            header("W-2", &[("MILK", 1), ("EGGS", 1)]),
            header("W-3", &[("MILK", 95)]),
        ],
        escrow: vec![
            reservation("MILK", "W-1", 2, 1, false),
            reservation("MILK", "W-2", 1, 2, true),
            reservation("EGGS", "W-2", 1, 1, true),
            reservation("MILK", "W-3", 95, 3, false),
        ],
        ..Rows::default()
    }
}

/// Merges [`page`] through the store's own ledger writer, as its sync task would.
fn deliver_orders(store: &StoreFixture) {
    let data = store.data.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let opts = LedgerOptions::new(StoreId::new("s1").unwrap(), Currency::new("EUR").unwrap());
        let (h, w) = Ledger::open(&data, &opts).unwrap().start_writer(8).unwrap();
        let ack = SyncAck {
            acked_version: 0,
            pushed_to: 0,
            cursor: Cursor { chain: 0, store: 1 },
            cloud_time: HlcStamp { wall_ms: now_ms() as u64, logical: 0, actor: ActorId::cloud() },
            caught_up: true,
        };
        let merged = MergedPage { from: Cursor::default(), rows: page(), refused: vec![] };
        runtime.block_on(h.apply_sync(ack, Some(merged))).unwrap();
        drop(h);
        w.join();
    })
    .join()
    .expect("delivering the orders");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_at_the_counter_through_storectl() {
    let metrics_port = free_port();
    let store = StoreFixture::with_config(&[], &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"));
    deliver_orders(&store);
    let daemon = store.start();

    // The open orders, in both output modes.
    let list = json(store.storectl(&["--json", "orders", "list"]));
    let ids: Vec<&str> = list["orders"].as_array().unwrap().iter().filter_map(|o| o["order"].as_str()).collect();
    assert_eq!(ids, ["W-1", "W-3"], "W-2 is cancelled, so not open: {list}");
    let all = json(store.storectl(&["--json", "orders", "list", "--status", "all"]));
    assert_eq!(all["orders"][1]["status"], "cancelled", "{all}");
    let table = ok(store.storectl(&["orders", "list"]));
    assert!(table.contains("2 open orders") && table.contains("2 x MILK") && table.contains("customer W-1"), "{table}");
    let shown = ok(store.storectl(&["orders", "show", "W-2"]));
    assert!(shown.contains("order W-2: cancelled") && shown.contains("do not hand it over"), "{shown}");

    // Picked, then handed over: a wrong code, a mistyped one, the right one, then again.
    let picked = ok(store.storectl(&["orders", "pick", "W-1"]));
    assert!(picked.contains("order W-1 marked as picked"), "{picked}");
    let (code, msg) = refused(store.storectl(&["orders", "handover", "W-1", "--code", "000000"]));
    assert_eq!(code, 65, "{msg}");
    assert!(msg.contains("wrong pickup code for order W-1"), "{msg}");
    let (code, msg) = refused(store.storectl(&["orders", "handover", "W-1", "--code", "48291"]));
    assert_eq!(code, 64, "{msg}");
    assert!(msg.contains("a pickup code is 6 digits"), "{msg}");
    assert_eq!(store.on_hand("MILK"), 100, "refusals move no stock");
    let handed = ok(store.storectl(&["orders", "handover", "W-1", "--code", CODE]));
    assert!(handed.contains("order W-1 handed over at") && handed.contains("2 x MILK taken from stock"), "{handed}");
    assert_eq!(store.on_hand("MILK"), 98);
    let (code, msg) = refused(store.storectl(&["orders", "handover", "W-1", "--code", CODE]));
    assert_eq!(code, 65, "{msg}");
    assert!(msg.contains("order W-1 was already handed over at"), "{msg}");
    let (code, msg) = refused(store.storectl(&["orders", "handover", "W-2", "--code", CODE]));
    assert!(code == 65 && msg.contains("was cancelled by HQ"), "{code}: {msg}");
    let (code, msg) = refused(store.storectl(&["orders", "handover", "W-9", "--code", CODE]));
    assert!(code == 65 && msg.contains("not synced to this store yet"), "{code}: {msg}");
    assert_eq!(store.on_hand("MILK"), 98, "only the one handover moved stock");
    let w1 = json(store.storectl(&["--json", "orders", "show", "W-1"]));
    assert_eq!(w1["status"], "fulfilled", "{w1}");
    assert!(w1["picked_at_ms"].is_i64() && w1["handed_over_at_ms"].is_i64(), "{w1}");

    // Breakage found: 98 -> 90 on hand, while W-3 waits for 95. The alert names W-3 at once.
    assert!(json(store.storectl(&["--json", "orders", "at-risk"]))["orders"].as_array().unwrap().is_empty());
    ok(store.storectl(&["stock", "adjust", "MILK", "-8", "--reason", "breakage"]));
    let at_risk = json(store.storectl(&["--json", "orders", "at-risk"]));
    assert_eq!(at_risk["orders"][0]["order"], "W-3", "{at_risk}");
    assert_eq!(at_risk["skus"][0]["shortfall"], 5, "{at_risk}");
    let human = ok(store.storectl(&["orders", "at-risk"]));
    assert!(human.contains("MILK: 90 on hand, 95 promised, 5 short") && human.contains("customer W-3"), "{human}");
    let log = daemon.run.wait_for("ORDERS_AT_RISK", Duration::from_secs(10));
    let line = log.iter().rev().find(|l| l.contains("ORDERS_AT_RISK")).unwrap();
    assert!(line.contains("MILK") && line.contains("W-3"), "{line}");
    let metrics = e2e_tests::cloud::http_client()
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("edge_online_orders_at_risk{store=\"s1\"} 1\n"), "{metrics}");
    assert!(metrics.contains("edge_online_shortage_alerts_total{store=\"s1\"} 1\n"), "{metrics}");
    assert!(metrics.contains("edge_online_handovers_total{store=\"s1\"} 1\n"), "{metrics}");

    let online = json(store.storectl(&["--json", "online", "status", "MILK"]));
    assert_eq!(online["enabled"], false, "{online}");
    assert_eq!((online["skus"][0]["promised"].as_u64(), online["skus"][0]["on_hand"].as_i64()), (Some(95), Some(90)));

    // With the daemon stopped: reads from the ledger file; writes need the daemon (exit 69).
    daemon.stop();
    let out = store.storectl(&["--json", "orders", "list", "--status", "fulfilled"]);
    assert!(text(&out).contains("not running"), "{}", text(&out));
    let fulfilled = json(out);
    assert_eq!(fulfilled["orders"][0]["order"], "W-1", "{fulfilled}");
    assert_eq!(json(store.storectl(&["--json", "orders", "at-risk"]))["orders"][0]["order"], "W-3");
    let (code, msg) = refused(store.storectl(&["orders", "handover", "W-3", "--code", CODE]));
    assert_eq!(code, 69, "{msg}");
    let verify = ok(store.storectl(&["ledger", "verify"]));
    assert!(verify.starts_with("ledger OK"), "{verify}");

    // A backup is marked as not caught up with the cloud: a store restored from it syncs
    // before it grants or hands anything over (the cloud moved on meanwhile).
    let backup = store.data.join("backup.db");
    ok(store.storectl(&["backup", backup.to_str().unwrap()]));
    let caught_up = |path: &std::path::Path| -> i64 {
        let conn = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        conn.query_row("SELECT value FROM meta WHERE key = 'bootstrapped'", [], |r| r.get(0)).unwrap()
    };
    assert_eq!(caught_up(&backup), 0);
    assert_eq!(caught_up(&store.data.join(edge_agent::ledger::LEDGER_FILE)), 1, "the store itself is unchanged");
}
