//! Story: a customer pays at a self-checkout lane with an RFID antenna; the tagged item read
//! there is recorded as sold with the sale, so the exit gate lets it pass, while a tagged item
//! that was not paid for raises the alarm. Against the embedded broker and mosquitto.

use std::time::Duration;

use device_sim::rfid::RfidReader;
use device_sim::{FramedSim, PlainScannerSim, Port, Suffix};
use e2e_tests::mqtt::{brokers, sgtin, Broker, TestClient};
use e2e_tests::store::StoreFixture;
use firmware_proto as fp;

const WAIT: Duration = Duration::from_secs(20);

/// Waits until the hub has taken in `n` tag reads in all (the router publishes its counters
/// once a second): a read still on its way over MQTT could otherwise arrive after the lane
/// input that follows it on the display's serial line.
async fn reads_taken(store: &StoreFixture, n: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let out = store.storectl(&["--json", "devices"]);
        let taken = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["counters"]["tag_reads"].as_u64())
            .unwrap_or(0);
        if taken >= n {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the hub took in {taken} tag reads, not {n}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_sold_at_the_lane_passes_the_exit_and_an_unpaid_one_alarms() {
    for kind in brokers() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::start(kind, dir.path());
        let extra = format!("{}[rfid]\nexit_zones = [\"gate-3:1\"]\n", broker.config_section());
        let store = StoreFixture::with_lane_config(&["lane-1"], "rfid_zones = [\"checkout-1:1\"]\n", &extra);
        let daemon = store.start();
        let mut watcher = TestClient::connect(broker.port, "watcher", &["se/v1/s1/hub/#"]).await;
        watcher.wait_for("se/v1/s1/hub/state", WAIT, |p| p == b"online").await;

        let mut scanner =
            PlainScannerSim::new(Port::pty(&store.device_path("lane-1", "scanner")).unwrap(), Suffix::Cr, None);
        let mut display = FramedSim::new(
            Port::pty(&store.device_path("lane-1", "display")).unwrap(),
            "lane-1-display",
            fp::DeviceKind::Lane,
        );
        assert!(matches!(display.hello(WAIT).await.unwrap(), fp::Body::HelloAck(_)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut checkout = RfidReader::connect("127.0.0.1", broker.port, "s1", "checkout-1");
        let mut gate = RfidReader::connect("127.0.0.1", broker.port, "s1", "gate-3");
        tokio::time::sleep(Duration::from_millis(300)).await;

        // The customer's tagged item lies at the lane while they pay.
        checkout.read(&[sgtin(1001)], 1, 1).await.unwrap();
        reads_taken(&store, 1).await;
        scanner.scan("4006381333931").await.unwrap();
        display.wait_display(WAIT, |d| matches!(d, fp::LaneDisplay::Total { amount_minor: 119, .. })).await.unwrap();
        display.input(fp::LaneInput::Tender(fp::TenderKind::Card)).await.unwrap();
        display.wait_display(WAIT, |d| matches!(d, fp::LaneDisplay::Receipt { .. })).await.unwrap();

        // At the exit: the paid item and one nobody paid for.
        gate.read(&[sgtin(1001), sgtin(1002)], 1, 1).await.unwrap();
        let alarm = watcher.wait_for("se/v1/s1/hub/alarm", WAIT, |_| true).await;
        let v: serde_json::Value = serde_json::from_slice(&alarm).unwrap();
        assert_eq!(v["serial"], 1002, "{kind:?}: only the unpaid item alarms: {v}");
        assert!(
            tokio::time::timeout(Duration::from_millis(700), watcher.wait_for("se/v1/s1/hub/alarm", WAIT, |_| true))
                .await
                .is_err(),
            "{kind:?}: the paid item raised an alarm"
        );

        // A customer puts an item down at the lane, then voids the basket and walks off with
        // it; the next customer pays at the same lane. Only tags that came to the lane during
        // a basket are sold with it: the walked-off item still alarms.
        checkout.read(&[sgtin(1004)], 1, 1).await.unwrap();
        reads_taken(&store, 4).await;
        scanner.scan("96385074").await.unwrap();
        display.wait_display(WAIT, |d| matches!(d, fp::LaneDisplay::Total { amount_minor: 250, .. })).await.unwrap();
        display.input(fp::LaneInput::VoidBasket).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await; // past the double-read window
        scanner.scan("96385074").await.unwrap();
        display.wait_display(WAIT, |d| matches!(d, fp::LaneDisplay::Total { amount_minor: 250, .. })).await.unwrap();
        display.input(fp::LaneInput::Tender(fp::TenderKind::Card)).await.unwrap();
        display.wait_display(WAIT, |d| matches!(d, fp::LaneDisplay::Receipt { .. })).await.unwrap();
        gate.read(&[sgtin(1004)], 1, 1).await.unwrap();
        let alarm = watcher.wait_for("se/v1/s1/hub/alarm", WAIT, |_| true).await;
        let v: serde_json::Value = serde_json::from_slice(&alarm).unwrap();
        assert_eq!(v["serial"], 1004, "{kind:?}: the voided basket's item was not sold with the next one: {v}");
        daemon.stop();
    }
}
