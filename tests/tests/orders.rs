//! Online pickup orders through a partition, as a process story (issue 7): the real cloud-sync
//! and a real edge-agent behind a fault proxy. The store keeps 4 units of milk granted to the
//! online channel (2 more held back as safety stock). While it is offline its till sells the
//! last free units and HQ takes online orders for milk: HQ reserves only what the store had
//! granted and refuses the rest; on reconnect nothing is promised twice and the store's shortage
//! alert names the order its till sales left without cover; the cloud sees it too. Then the
//! handovers: a wrong code, an order handed over offline (fulfilled in the cloud after the next
//! sync), a repeated handover, and an order HQ cancelled while the store was offline.
//! Run against the SQLite backend and against PostgreSQL.

use std::process::Output;

use e2e_tests::output::text;

use e2e_tests::cloud::{backends, Backend, CloudFixture};
use e2e_tests::proxy::Fault;
use e2e_tests::synced::{cloud_stock, cloud_stock_of, sell, until, SyncedStore, WAIT};
use serde_json::{json, Value};

const MILK_GTIN: &str = "4006381333931";

const CATALOG_CSV: &str = "sku,name,gtins,unit,tax_class,discontinued,category
MILK,Milk 1 l,4006381333931,piece,food,false,dairy
BREAD,Bread,96385074,piece,food,false,bakery
EGGS,Eggs x6,036000291452,piece,food,false,dairy
APPLES,Apples,10614141000415,gram,food,false,produce
";

/// Keep 4 units of dairy granted online, never granting the last 2 on the shelf.
const ONLINE: &str = "[online]
enabled = true
target = 0
safety_stock = 0
[[online.rule]]
category = \"dairy\"
target = 4
safety_stock = 2
";

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("storectl --json printed no JSON ({e}): {}", text(out)))
}

/// The online allocation of one SKU as the cloud holds it.
async fn cloud_allocation(cloud: &CloudFixture, store: &str, sku: &str) -> Value {
    let (status, answer) = cloud.hq("GET", &format!("/v1/hq/stores/{store}/allocation"), None).await;
    assert_eq!(status, 200, "{answer}");
    answer["skus"].as_array().and_then(|s| s.iter().find(|s| s["sku"] == sku).cloned()).unwrap_or(Value::Null)
}

async fn wait_cloud_allocation(cloud: &CloudFixture, store: &str, sku: &str, what: &str, ok: impl Fn(&Value) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let allocation = cloud_allocation(cloud, store, sku).await;
        if ok(&allocation) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}: {allocation}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn order_status(cloud: &CloudFixture, order: &str) -> Value {
    let (status, answer) = cloud.hq("GET", &format!("/v1/hq/orders/{order}"), None).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

async fn wait_order_status(cloud: &CloudFixture, order: &str, want: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let answer = order_status(cloud, order).await;
        if answer["status"] == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{order} never became {want} in the cloud: {answer}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn create_order(cloud: &CloudFixture, order: &str, units: u64) -> (u16, Value) {
    let body = json!({"order": order, "store": "s1", "customer_ref": format!("customer of {order}"),
                      "lines": [{"sku": "MILK", "units": units}]});
    cloud.hq("POST", "/v1/hq/orders", Some(body)).await
}

/// The store's orders as `storectl --json orders list --status all` shows them.
fn store_orders(store: &SyncedStore) -> Vec<Value> {
    let out = store.fixture.storectl(&["--json", "orders", "list", "--status", "all"]);
    assert!(out.status.success(), "{}", text(&out));
    json_of(&out)["orders"].as_array().cloned().unwrap_or_default()
}

fn store_order_status(store: &SyncedStore, order: &str) -> Option<String> {
    store_orders(store).iter().find(|o| o["order"] == order).and_then(|o| o["status"].as_str().map(str::to_owned))
}

/// Orders at risk as `storectl --json orders at-risk` lists them.
fn store_at_risk(store: &SyncedStore) -> Vec<String> {
    let out = store.fixture.storectl(&["--json", "orders", "at-risk"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut orders: Vec<String> = json_of(&out)["orders"]
        .as_array()
        .map(|a| a.iter().filter_map(|o| o["order"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    orders.sort();
    orders.dedup();
    orders
}

fn handover(store: &SyncedStore, order: &str, code: &str) -> Output {
    store.fixture.storectl(&["orders", "handover", order, "--code", code])
}

async fn partition_story(backend: Backend) {
    eprintln!("orders story against {backend:?}");
    let cloud = CloudFixture::start(backend);
    let (status, answer) = cloud.hq_raw("POST", "/v1/hq/catalog", Some(("text/csv", CATALOG_CSV.into()))).await;
    assert_eq!(status, 200, "catalog import: {answer}");
    for (sku, amount) in [("MILK", "1.19"), ("BREAD", "2.50"), ("EGGS", "3.29"), ("APPLES", "2.99")] {
        let body = json!({"sku": sku, "scope": "chain", "slot": "regular", "amount": amount, "currency": "EUR"});
        let (status, answer) = cloud.hq("PUT", "/v1/hq/prices", Some(body)).await;
        assert_eq!(status, 200, "{answer}");
    }
    let mut store = SyncedStore::new(&cloud, "s1", ONLINE).await;
    let counted = store.fixture.storectl(&["stock", "count", "MILK", "10"]);
    assert!(counted.status.success(), "{}", text(&counted));

    // The store grants its target of 4 (10 on hand, safety stock 2); the cloud learns it.
    wait_cloud_allocation(&cloud, "s1", "MILK", "the cloud holds 4 units of milk", |a| a["rights"] == 4).await;

    // Online, HQ reserves 2; the store sees the order and tops its grant back up to 4 free rights.
    let (status, w1) = create_order(&cloud, "W-1", 2).await;
    assert_eq!(status, 201, "{w1}");
    assert_eq!(w1["status"], "reserved");
    let w1_code = w1["pickup_code"].as_str().expect("a pickup code").to_owned();
    until("the store has W-1", || store_order_status(&store, "W-1").as_deref() == Some("reserved")).await;
    wait_cloud_allocation(&cloud, "s1", "MILK", "the store topped up to 6 granted", |a| {
        a["granted"] == 6 && a["rights"] == 4
    })
    .await;
    let granted_before_partition = 6;

    // The partition. The till sells 8 of the 10: the last free units (10 - 6 committed - 2 safety
    // = 2 free) and 6 more, which the till cannot refuse.
    store.proxy.set(Fault::Down);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    sell(&store.fixture, "lane-1", &[MILK_GTIN; 8]).await;
    assert_eq!(store.fixture.on_hand("MILK"), 2);
    // The store's view: W-1's 2 units are still covered by the 2 on the shelf.
    assert_eq!(store_at_risk(&store), Vec::<String>::new());

    // Meanwhile HQ takes orders against the 4 units the cloud holds: 3 reserved, then 2 refused.
    let (status, w2) = create_order(&cloud, "W-2", 3).await;
    assert_eq!(status, 201, "{w2}");
    let w2_code = w2["pickup_code"].as_str().expect("a pickup code").to_owned();
    let (status, w3) = create_order(&cloud, "W-3", 2).await;
    assert_eq!(status, 409, "{w3}");
    assert_eq!(w3["error"], "insufficient allocation", "{w3}");
    assert_eq!(w3["lines"], json!([{"sku": "MILK", "wanted": 2, "available": 1}]), "{w3}");
    let (status, _) = cloud.hq("GET", "/v1/hq/orders/W-3", None).await;
    assert_eq!(status, 404, "a refused order is not kept");

    // Reconnect: the store learns W-2, which its till sales left without cover.
    store.proxy.set(Fault::None);
    store.sync_now();
    until("the store has W-2", || store_order_status(&store, "W-2").is_some()).await;
    until("the store names W-2 at risk", || store_at_risk(&store) == vec!["W-2".to_owned()]).await;
    let log = store.daemon.as_ref().unwrap().log();
    assert!(
        log.iter().any(|l| l.contains("ORDERS_AT_RISK") && l.contains("W-2") && l.contains("MILK")),
        "the journal names the order at risk: {log:#?}"
    );
    // Nothing promised twice: the cloud reserved 5 of the 6 granted, and the store granted no more
    // (it has nothing free).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, at_risk) = cloud.hq("GET", "/v1/hq/stores/s1/orders/at-risk", None).await;
        assert_eq!(status, 200, "{at_risk}");
        let orders: Vec<&str> =
            at_risk["orders"].as_array().unwrap().iter().filter_map(|o| o["order"].as_str()).collect();
        if orders == ["W-2"] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the cloud never saw W-2 at risk: {at_risk}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let allocation = cloud_allocation(&cloud, "s1", "MILK").await;
    assert_eq!(allocation["granted"], granted_before_partition, "{allocation}");
    assert_eq!(allocation["reserved"], 5, "{allocation}");
    assert_eq!(allocation["promised"], 5, "{allocation}");
    assert!(order_status(&cloud, "W-2").await["at_risk"] == true);
    assert!(order_status(&cloud, "W-1").await["at_risk"] == false);

    // Handovers. A wrong code moves nothing.
    let wrong = handover(&store, "W-1", if w1_code == "000000" { "111111" } else { "000000" });
    assert!(!wrong.status.success(), "{}", text(&wrong));
    assert!(text(&wrong).to_lowercase().contains("code"), "{}", text(&wrong));
    assert_eq!(store.fixture.on_hand("MILK"), 2);

    // W-1 is handed over while the store is offline; the cloud learns it after the next sync.
    store.proxy.set(Fault::Down);
    let first = handover(&store, "W-1", &w1_code);
    assert!(first.status.success(), "{}", text(&first));
    assert_eq!(store.fixture.on_hand("MILK"), 0);
    assert_eq!(store_order_status(&store, "W-1").as_deref(), Some("fulfilled"));
    let again = handover(&store, "W-1", &w1_code);
    assert!(!again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("already handed over"), "{}", text(&again));
    assert_eq!(store.fixture.on_hand("MILK"), 0, "a repeated handover moves no stock");
    assert_eq!(order_status(&cloud, "W-1").await["status"], "reserved", "the cloud cannot know yet");

    // HQ cancels W-2 while the store is still offline.
    let (status, cancelled) = cloud.hq("POST", "/v1/hq/orders/W-2/cancel", None).await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");

    store.proxy.set(Fault::None);
    store.sync_now();
    wait_order_status(&cloud, "W-1", "fulfilled").await;
    until("the store sees W-2 cancelled", || store_order_status(&store, "W-2").as_deref() == Some("cancelled")).await;
    let refused = handover(&store, "W-2", &w2_code);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("cancelled"), "{}", text(&refused));
    assert_eq!(store.fixture.on_hand("MILK"), 0, "a cancelled order moves no stock");
    until("nothing is at risk any more", || store_at_risk(&store).is_empty()).await;

    // Stock agrees: 10 counted, 8 sold at the till, 2 handed over.
    let deadline = tokio::time::Instant::now() + WAIT;
    while cloud_stock_of(&cloud_stock(&cloud, "MILK").await, "s1") != Some(0) {
        assert!(tokio::time::Instant::now() < deadline, "the cloud never saw the handover's stock movement");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let allocation = cloud_allocation(&cloud, "s1", "MILK").await;
    assert_eq!(allocation["fulfilled"], 2, "{allocation}");
    assert_eq!(allocation["cancelled"], 3, "{allocation}");
    assert_eq!(allocation["promised"], 0, "{allocation}");

    store.daemon.take().unwrap().stop();
    let verify = store.fixture.storectl(&["ledger", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_orders_never_promise_a_unit_twice_across_a_partition() {
    for backend in backends() {
        partition_story(backend).await;
    }
}
