//! A store that syncs with a test's cloud through a fault proxy (so a test can take it offline),
//! and the small steps the sync and orders stories share: waiting for a condition, selling at
//! a lane, reading stock as the cloud holds it.

use std::time::Duration;

use firmware_proto as fp;
use serde_json::Value;

use crate::cloud::CloudFixture;
use crate::lane::{attach, LaneDevices};
use crate::proxy::FaultProxy;
use crate::store::{Daemon, Seed, StoreFixture};
use crate::{signal, SIGUSR1};

/// How long a story waits for anything before it fails.
pub const WAIT: Duration = Duration::from_secs(60);

/// Waits until `cond` holds, failing the test after [`WAIT`] naming `what`.
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sells the items of one basket at a lane: scan each, wait for the total, pay by card, wait for
/// the receipt.
pub async fn sell(store: &StoreFixture, lane: &str, gtins: &[&str]) {
    let LaneDevices { mut scanner, mut display, scale: _scale } = attach(store, lane, None).await;
    // Each scan raises the total (identical items add to one line, so the line count cannot
    // tell); waiting for it keeps the scans in order with what the lane has seen.
    let mut total = 0;
    for gtin in gtins {
        scanner.scan(gtin).await.unwrap();
        let shown = display
            .wait_display(WAIT, |d| matches!(d, fp::LaneDisplay::Total { amount_minor, .. } if *amount_minor > total))
            .await
            .unwrap();
        if let Some(fp::LaneDisplay::Total { amount_minor, .. }) = shown.last() {
            total = *amount_minor;
        }
    }
    display.input(fp::LaneInput::Tender(fp::TenderKind::Card)).await.unwrap();
    display.wait_display(WAIT, |d| matches!(d, fp::LaneDisplay::Receipt { .. })).await.unwrap();
}

/// Stock of a SKU per store as the cloud holds it (`GET /v1/hq/stock/{sku}`).
pub async fn cloud_stock(cloud: &CloudFixture, sku: &str) -> Value {
    let (status, answer) = cloud.hq("GET", &format!("/v1/hq/stock/{sku}"), None).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

pub fn cloud_stock_of(answer: &Value, store: &str) -> Option<i64> {
    answer["stores"].as_array()?.iter().find(|s| s["store"] == store)?["value"].as_i64()
}

/// A store registered with the cloud, syncing through its own fault proxy every 300 ms.
pub struct SyncedStore {
    pub fixture: StoreFixture,
    pub proxy: FaultProxy,
    pub daemon: Option<Daemon>,
    _token_dir: tempfile::TempDir,
}

impl SyncedStore {
    /// Registers `id` with the cloud and starts its edge-agent with one lane and `extra` config.
    pub async fn new(cloud: &CloudFixture, id: &str, extra: &str) -> SyncedStore {
        let proxy = FaultProxy::start(cloud.addr).await;
        let dir = tempfile::tempdir().unwrap();
        let cloud_section = cloud.store_section(
            id,
            dir.path(),
            &proxy.url(),
            "interval_ms = 300\ntimeout_ms = 3000\nbackoff_min_ms = 100\nbackoff_max_ms = 1000\n",
        );
        // The stories scan baskets of identical items back to back: no double-read filter.
        let lane = "double_read_window_ms = 0\n";
        let fixture = StoreFixture::custom(id, &["lane-1"], lane, &format!("{extra}{cloud_section}"), Seed::StockOnly);
        let daemon = Some(fixture.start());
        SyncedStore { fixture, proxy, daemon, _token_dir: dir }
    }

    /// SIGUSR1: sync now rather than at the next interval.
    pub fn sync_now(&self) {
        signal(&self.daemon.as_ref().unwrap().run.child, SIGUSR1);
    }
}
