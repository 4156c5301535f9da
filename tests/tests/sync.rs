//! Store sync as a process story: the real cloud-sync and two real edge-agents on loopback, a
//! fault proxy on each store's link. HQ sets a chain price while store A is offline; both
//! stores sell the same SKU at their lanes; A reconnects after B. Then the stores and the cloud
//! agree on stock and price, and A's shelf labels show the new price. Run against the SQLite
//! backend and against PostgreSQL.

use std::collections::HashSet;
use std::time::Duration;

use device_sim::esl::EslFleet;
use e2e_tests::cloud::{backends, Backend, CloudFixture};
use e2e_tests::mqtt::free_port;
use e2e_tests::proxy::Fault;
use e2e_tests::store::{Seed, StoreFixture};
use e2e_tests::synced::{cloud_stock, cloud_stock_of, sell, until, SyncedStore, WAIT};
use serde_json::{json, Value};
use shared::{PriceScope, Sku};

const MILK_GTIN: &str = "4006381333931";

pub const CATALOG_CSV: &str = "sku,name,gtins,unit,tax_class,discontinued
MILK,Milk 1 l,4006381333931,piece,food,false
BREAD,Bread,96385074,piece,food,false
EGGS,Eggs x6,036000291452,piece,food,false
APPLES,Apples,10614141000415,gram,food,false
";

async fn set_chain_price(cloud: &CloudFixture, sku: &str, amount: &str) {
    let body = json!({"sku": sku, "scope": "chain", "slot": "regular", "amount": amount, "currency": "EUR"});
    let (status, answer) = cloud.hq("PUT", "/v1/hq/prices", Some(body)).await;
    assert_eq!(status, 200, "setting {sku} to {amount}: {answer}");
}

/// The chain's regular price of a SKU in a store's ledger, in cents.
fn chain_price(store: &StoreFixture, sku: &str) -> Option<i64> {
    let prices = store.reader().prices(&Sku::new(sku).unwrap()).ok()?;
    prices.iter().find(|p| p.key.scope == PriceScope::Chain).and_then(|p| p.value.as_ref()).map(|v| v.amount.minor)
}

async fn offline_store_converges(backend: Backend) {
    eprintln!("sync story against {backend:?}");
    let cloud = CloudFixture::start(backend);
    let (status, answer) = cloud.hq_raw("POST", "/v1/hq/catalog", Some(("text/csv", CATALOG_CSV.into()))).await;
    assert_eq!(status, 200, "catalog import: {answer}");
    for (sku, amount) in [("MILK", "1.19"), ("BREAD", "2.50"), ("EGGS", "3.29"), ("APPLES", "2.99")] {
        set_chain_price(&cloud, sku, amount).await;
    }

    // Store A has shelf labels on its embedded broker; B has none.
    let broker_port = free_port();
    let labels_dir = tempfile::tempdir().unwrap();
    let bindings = labels_dir.path().join("labels.csv");
    let milk_labels: Vec<String> = (0..20).map(|i| format!("milk-{i:02}")).collect();
    std::fs::write(
        &bindings,
        format!("label,sku\n{}", milk_labels.iter().map(|l| format!("{l},MILK\n")).collect::<String>()),
    )
    .unwrap();
    let a_extra = format!(
        "[mqtt]\nembedded_listen = \"127.0.0.1:{broker_port}\"\n[labels]\nbindings = \"{}\"\nincrease_deadline_ms = 10000\n",
        bindings.display()
    );
    let mut a = SyncedStore::new(&cloud, "s1", &a_extra).await;
    let mut b = SyncedStore::new(&cloud, "s2", "").await;
    let fleet = EslFleet::start("127.0.0.1", broker_port, "s1", &milk_labels, HashSet::new());

    until("both stores have the chain price of milk", || {
        chain_price(&a.fixture, "MILK") == Some(119) && chain_price(&b.fixture, "MILK") == Some(119)
    })
    .await;
    let shows = |cents: i64| fleet.snapshot().values().filter(|s| s.last_price_minor == Some(cents)).count();
    until("A's milk labels show 1.19", || shows(119) == milk_labels.len()).await;

    // A goes offline; HQ raises milk; B gets it.
    let faulted = a.proxy.counts().faulted;
    a.proxy.set(Fault::Down);
    // A's exchanges run one at a time: once one is refused, none forwarded is still in flight
    // (one could otherwise pull after the change below).
    until("A's next exchange is refused", || a.proxy.counts().faulted > faulted).await;
    set_chain_price(&cloud, "MILK", "1.29").await;
    until("B has the new milk price", || chain_price(&b.fixture, "MILK") == Some(129)).await;
    assert_eq!(chain_price(&a.fixture, "MILK"), Some(119), "A is offline and cannot know yet");

    // Both sell milk; A sells offline.
    sell(&a.fixture, "lane-1", &[MILK_GTIN]).await;
    sell(&b.fixture, "lane-1", &[MILK_GTIN]).await;
    assert_eq!(a.fixture.on_hand("MILK"), 99);
    assert_eq!(b.fixture.on_hand("MILK"), 99);
    let mut b_synced = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !b_synced {
        assert!(tokio::time::Instant::now() < deadline, "B's sale never reached the cloud");
        b_synced = cloud_stock_of(&cloud_stock(&cloud, "MILK").await, "s2") == Some(99);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cloud_stock_of(&cloud_stock(&cloud, "MILK").await, "s1"), Some(100), "A's sale is still only at A");
    assert!(a.proxy.counts().faulted > 0, "A kept trying while offline");

    // A reconnects after B.
    a.proxy.set(Fault::None);
    a.sync_now();
    until("A has the new milk price", || chain_price(&a.fixture, "MILK") == Some(129)).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stock = cloud_stock(&cloud, "MILK").await;
        if cloud_stock_of(&stock, "s1") == Some(99) && cloud_stock_of(&stock, "s2") == Some(99) {
            assert_eq!(stock["chain_total"].as_i64(), Some(198), "{stock}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the cloud never saw A's sale: {stock}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until("A's milk labels show 1.29", || shows(129) == milk_labels.len()).await;

    // Every replica agrees: stock per store, and the price registers.
    assert_eq!((a.fixture.on_hand("MILK"), b.fixture.on_hand("MILK")), (99, 99));
    let milk = Sku::new("MILK").unwrap();
    assert_eq!(a.fixture.reader().prices(&milk).unwrap(), b.fixture.reader().prices(&milk).unwrap());
    let (status, cloud_prices) = cloud.hq("GET", "/v1/hq/prices/MILK", None).await;
    assert_eq!(status, 200);
    assert!(cloud_prices.to_string().contains("\"1.29\""), "{cloud_prices}");
    for store in [&a, &b] {
        assert_eq!(
            store.fixture.reader().outbox_depth().unwrap(),
            0,
            "{} has nothing left to push",
            store.fixture.store
        );
    }
    let (status, stores) = cloud.hq("GET", "/v1/hq/stores", None).await;
    assert_eq!(status, 200);
    for (status, store) in stores["stores"].as_array().unwrap().iter().zip([&a, &b]) {
        assert_eq!(status["push_lag_versions"].as_u64(), Some(0), "{status}");
        assert_eq!(status["pending_rows"].as_u64(), Some(0), "{status}");
        let actor = store.fixture.reader().actor().unwrap();
        assert_eq!(status["ledger_actor"].as_str(), Some(actor.as_str()), "the ledger that syncs: {status}");
    }

    a.daemon.take().unwrap().stop();
    b.daemon.take().unwrap().stop();
    let verify = a.fixture.storectl(&["ledger", "verify"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_store_converges_with_the_cloud_and_its_labels_follow() {
    for backend in backends() {
        offline_store_converges(backend).await;
    }
}

/// DESIGN 9: a planned stop makes one bounded final sync, so a change made just before it
/// reaches the cloud although the next interval is an hour away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_just_before_a_planned_stop_reaches_the_cloud() {
    let cloud = CloudFixture::start(Backend::Sqlite);
    let token_dir = tempfile::tempdir().unwrap();
    let section = cloud.store_section("s1", token_dir.path(), &cloud.url(), "interval_ms = 3600000\n");
    let store = StoreFixture::custom("s1", &[], "", &section, Seed::StockOnly);
    let daemon = store.start();
    // The first session runs at start: the opening stock reaches the cloud.
    let deadline = tokio::time::Instant::now() + WAIT;
    while cloud_stock_of(&cloud_stock(&cloud, "MILK").await, "s1") != Some(100) {
        assert!(tokio::time::Instant::now() < deadline, "the opening stock never reached the cloud");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and that session is over (the next one is an hour away).
    while {
        let out = store.storectl(&["--json", "sync", "status"]);
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        status["status"]["last_success_ms"].as_u64().is_none()
    } {
        assert!(tokio::time::Instant::now() < deadline, "the first sync session never finished");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let receipt = store.storectl(&["stock", "receive", "MILK", "5", "--reference", "late delivery"]);
    assert!(receipt.status.success(), "{}", String::from_utf8_lossy(&receipt.stderr));
    daemon.stop();
    assert_eq!(cloud_stock_of(&cloud_stock(&cloud, "MILK").await, "s1"), Some(105), "the final sync pushed it");
    assert_eq!(store.reader().outbox_depth().unwrap(), 0);
}
