//! Story: RFID zone cycle counts become stock counts in the ledger (embedded broker and
//! mosquitto). A native reader runs an inventory cycle over the milk shelf: 7 tagged packs of
//! milk (each read three times), 2 tags of a product the store does not sell, 1 tag that is not
//! SGTIN-96, and a pack on another antenna; the ledger held 10, so a count of 7 is recorded and
//! stock is 7, and the stray tags are reported, not recorded. The zone also holds bread, of
//! which the ledger says 3 but the cycle saw no tag: bread is counted as 0. A repeated cycle end counts
//! nothing; a cycle sent again after a restart of the hub is recognised and changes nothing.
//! An Impinj reader, which marks no cycles, is counted per configured window.

use std::time::Duration;

use device_sim::rfid::{sgtin96, RfidReader};
use e2e_tests::mqtt::{brokers, sgtin, Broker, TestClient};
use e2e_tests::store::StoreFixture;
use edge_agent::ledger::EventBody;
use rumqttc::QoS;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const MILK_GTIN: &str = "4006381333931";
const WINDOW_S: u64 = 5;

fn milk(serials: std::ops::Range<u64>) -> Vec<Vec<u8>> {
    serials.map(|s| sgtin96(MILK_GTIN, 7, s).unwrap()).collect()
}

fn storectl_ok(store: &StoreFixture, args: &[&str]) {
    let out = store.storectl(args);
    assert!(out.status.success(), "storectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

async fn next_report(watcher: &mut TestClient) -> Value {
    let report = watcher.wait_for("se/v1/s1/hub/count", WAIT, |_| true).await;
    serde_json::from_slice(&report).unwrap()
}

fn impinj_event(epc: &[u8]) -> String {
    let hex: String = epc.iter().map(|b| format!("{b:02X}")).collect();
    format!(
        r#"{{"timestamp":"2026-11-23T01:00:00.000+0000","hostname":"impinj-backroom","eventType":"tagInventory","tagInventoryEvent":{{"epcHex":"{hex}","antennaPort":1,"peakRssiCdbm":-5100}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_cycle_count_reconciles_stock_once() {
    for kind in brokers() {
        eprintln!("RFID count story against {kind:?}");
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::start(kind, dir.path());
        let extra = format!(
            "{}[[rfid.impinj]]\ntopic = \"impinj/backroom/events\"\nreader = \"backroom-1\"\n\
             [[rfid.count_zone]]\nreader = \"shelf-1\"\nantennas = [1]\nskus = [\"MILK\", \"BREAD\"]\n\
             [[rfid.count_zone]]\nreader = \"backroom-1\"\nantennas = [1]\ncycle_seconds = {WINDOW_S}\n",
            broker.config_section()
        );
        let store = StoreFixture::with_config(&[], &extra);
        let daemon = store.start();
        let mut watcher = TestClient::connect(broker.port, "watcher", &["se/v1/s1/hub/#"]).await;
        watcher.wait_for("se/v1/s1/hub/state", WAIT, |p| p == b"online").await;
        storectl_ok(&store, &["stock", "count", "MILK", "10", "--key", "before-rfid"]);
        storectl_ok(&store, &["stock", "count", "BREAD", "3", "--key", "bread-before-rfid"]);
        assert_eq!(store.on_hand("MILK"), 10);

        // The cycle: 7 packs of milk, read three times each; two tags of a GTIN no product has;
        // one tag that is not SGTIN-96; and a pack on antenna 2, outside the zone.
        let mut shelf = RfidReader::connect("127.0.0.1", broker.port, "s1", "shelf-1");
        let mut tags = milk(1..8);
        tags.extend([sgtin(501), sgtin(502), vec![0xE2, 0x80, 0x11, 0x05]]);
        shelf.count_cycle(1, &tags, 1, 3).await.unwrap();
        shelf.read(&milk(100..101), 2, 1).await.unwrap();
        let report = next_report(&mut watcher).await;
        assert_eq!(
            (
                &report["recorded"]["MILK"]["counted"],
                &report["recorded"]["MILK"]["seen"],
                &report["recorded"]["MILK"]["movement"]
            ),
            (&Value::from(7), &Value::from(10), &Value::from(-3)),
            "{kind:?}: {report}"
        );
        assert_eq!(report["unknown_gtins"]["80614141123458"], 2, "{kind:?}: {report}");
        assert_eq!(report["not_sgtin"], 1, "{kind:?}: {report}");
        assert_eq!(store.on_hand("MILK"), 7, "{kind:?}");
        assert_eq!(
            (&report["recorded"]["BREAD"]["counted"], &report["recorded"]["BREAD"]["movement"]),
            (&Value::from(0), &Value::from(-3)),
            "{kind:?}: bread held by the zone and not seen is counted as 0: {report}"
        );
        assert_eq!(store.on_hand("BREAD"), 0, "{kind:?}");
        let key = format!("rfid-count:{}:{}:MILK", report["zone"].as_str().unwrap(), report["cycle"].as_str().unwrap());
        match store.reader().event_by_key(&key).unwrap() {
            Some((_, EventBody::Count { counted: 7, seen: 10, movement: -3, .. })) => {}
            other => panic!("{kind:?}: the count event under {key}: {other:?}"),
        }

        // The same end again (a re-delivery), then the next cycle: only the next one counts.
        shelf.cycle(1, true, &[1]).await.unwrap();
        shelf.count_cycle(2, &milk(1..7), 1, 1).await.unwrap();
        let report = next_report(&mut watcher).await;
        assert!(report["cycle"].as_str().unwrap().ends_with("cycle-2"), "{kind:?}: cycle 1 counted once: {report}");
        assert_eq!(store.on_hand("MILK"), 6, "{kind:?}");
        let repeated_end_logged = daemon.log().iter().any(|l| l.contains("RFID_CYCLE_NOT_COUNTED"));

        // A delivery, a hub restart, and the reader sends cycle 2 again: recognised, no change.
        storectl_ok(&store, &["stock", "receive", "MILK", "4", "--key", "delivery-1"]);
        daemon.stop();
        let daemon = store.start();
        // A new watcher: the embedded broker restarted with the daemon, and its subscriptions.
        let mut watcher = TestClient::connect(broker.port, "watcher-2", &["se/v1/s1/hub/#"]).await;
        watcher.wait_for("se/v1/s1/hub/state", WAIT, |p| p == b"online").await;
        shelf.count_cycle(2, &milk(1..7), 1, 1).await.unwrap();
        let report = next_report(&mut watcher).await;
        assert_eq!(report["recorded"]["MILK"]["replayed"], true, "{kind:?}: {report}");
        assert_eq!(store.on_hand("MILK"), 10, "{kind:?}: the delivery is not erased by an old count");

        // An Impinj reader: one window of reads, watched from its start (the hub joined the
        // window running at its start late, so that one is skipped).
        let impinj = TestClient::connect(broker.port, "impinj-backroom", &[]).await;
        let window_ms = WINDOW_S * 1000;
        let now = edge_agent::labels::runtime::wall_ms();
        let next_window = (now / window_ms + 1) * window_ms;
        tokio::time::sleep(Duration::from_millis(next_window - now + 300)).await;
        for epc in milk(200..204) {
            impinj.client.publish("impinj/backroom/events", QoS::AtLeastOnce, false, impinj_event(&epc)).await.unwrap();
        }
        let report = next_report(&mut watcher).await;
        assert_eq!(report["cycle"], format!("window-{next_window}"), "{kind:?}: {report}");
        assert_eq!(report["recorded"]["MILK"]["counted"], 4, "{kind:?}: {report}");
        assert_eq!(store.on_hand("MILK"), 4, "{kind:?}");
        let log = daemon.log().join("\n");
        assert!(!log.contains("RFID_COUNT_FAILED"), "{kind:?}:\n{log}");
        daemon.stop();
        // Before the restart: the repeated end was reported as not counted.
        assert!(repeated_end_logged, "{kind:?}: a repeated cycle end is reported");
    }
}
