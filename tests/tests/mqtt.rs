//! MQTT stories, each against the daemon's embedded broker and against a real mosquitto:
//! the retained hub state, an Impinj reader's JSON through the broker raising an exit alarm
//! under the right GTIN, and garbage, truncated envelopes and a 10 MB payload refused without
//! disturbing anything else.

use std::time::Duration;

use e2e_tests::mqtt::{brokers, sgtin, Broker, TestClient};
use e2e_tests::store::StoreFixture;
use firmware_proto as fp;
use rumqttc::QoS;

const WAIT: Duration = Duration::from_secs(20);

fn impinj_event(epc_hex: &str, antenna: u8) -> String {
    format!(
        r#"{{"timestamp":"2026-11-23T01:00:00.000+0000","hostname":"impinj-gate","eventType":"tagInventory","tagInventoryEvent":{{"epcHex":"{epc_hex}","antennaPort":{antenna},"peakRssiCdbm":-5100,"lastSeenTime":"2026-11-23T01:00:00.000Z"}}}}"#
    )
}

fn alarm_for(serial: u64) -> impl Fn(&[u8]) -> bool {
    move |p| {
        let v: serde_json::Value = serde_json::from_slice(p).unwrap();
        v["serial"] == serial && v["gtin"] == "80614141123458" && v["reader"] == "gate-1"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impinj_reads_through_the_broker_and_bad_payloads_refused() {
    for kind in brokers() {
        let dir = tempfile::tempdir().unwrap();
        eprintln!("MQTT story against {kind:?}");
        let broker = Broker::start(kind, dir.path());
        let extra = format!(
            "{}[rfid]\nexit_zones = [\"gate-1:1\"]\n[[rfid.impinj]]\ntopic = \"impinj/gate-1/events\"\nreader = \"gate-1\"\n",
            broker.config_section()
        );
        let store = StoreFixture::with_config(&[], &extra);
        let daemon = store.start();
        let mut watcher = TestClient::connect(broker.port, "watcher", &["se/v1/s1/hub/#"]).await;
        watcher.wait_for("se/v1/s1/hub/state", WAIT, |p| p == b"online").await;

        let reader = TestClient::connect(broker.port, "impinj-gate", &[]).await;
        // SGTIN-96 of GTIN 80614141123458 (the Tag Data Standard's example), serial 6789.
        let publish = |topic: &str, payload: Vec<u8>| {
            let c = reader.client.clone();
            let topic = topic.to_owned();
            async move { c.publish(topic, QoS::AtLeastOnce, false, payload).await.unwrap() }
        };
        publish("impinj/gate-1/events", impinj_event("3074257BF7194E4000001A85", 1).into_bytes()).await;
        watcher.wait_for("se/v1/s1/hub/alarm", WAIT, alarm_for(6789)).await;

        // Garbage JSON, a truncated envelope, an unknown version, a 10 MB payload.
        publish("impinj/gate-1/events", b"{not json".to_vec()).await;
        let env = fp::Envelope::new(
            "esl-1",
            1,
            1,
            fp::Body::Heartbeat(fp::Heartbeat { uptime_s: 1, battery_pct: Some(90), rssi_dbm: None }),
        )
        .unwrap();
        let good = fp::payload::encode_vec(&env).unwrap();
        publish("se/v1/s1/dev/esl/esl-1/status", good[..good.len() / 2].to_vec()).await;
        let mut other_version = good.clone();
        other_version[0] = 9;
        publish("se/v1/s1/dev/esl/esl-1/status", other_version).await;
        let big = TestClient::connect(broker.port, "big-sender", &[]).await;
        let _ = big.client.publish("impinj/gate-1/events", QoS::AtLeastOnce, false, vec![b' '; 10 * 1024 * 1024]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        // Nothing else was disturbed: the next read still raises its alarm.
        publish("impinj/gate-1/events", impinj_event("3074257BF7194E4000001A86", 1).into_bytes()).await;
        watcher.wait_for("se/v1/s1/hub/alarm", WAIT, alarm_for(6790)).await;
        // A read on a shelf antenna of the same reader is presence, not an alarm.
        publish("impinj/gate-1/events", impinj_event("3074257BF7194E4000001A87", 2).into_bytes()).await;
        publish("impinj/gate-1/events", impinj_event("3074257BF7194E4000001A88", 1).into_bytes()).await;
        let next = watcher.wait_for("se/v1/s1/hub/alarm", WAIT, |_| true).await;
        assert!(alarm_for(6792)(&next), "{kind:?}: the shelf read must not alarm: {}", String::from_utf8_lossy(&next));

        let log = daemon.log().join("\n");
        assert!(log.contains("IMPINJ_REFUSED"), "{kind:?}: garbage JSON counted:\n{log}");
        assert!(log.contains("MQTT_PAYLOAD"), "{kind:?}: bad envelopes counted:\n{log}");
        if kind == e2e_tests::mqtt::BrokerKind::Mosquitto {
            assert!(log.contains("MQTT_OVERSIZED"), "{kind:?}: the 10 MB payload refused:\n{log}");
        }
        assert!(!log.contains("MQTT connection lost"), "{kind:?}: the hub's session was not disturbed:\n{log}");
        daemon.stop();
        // A clean stop leaves `offline` retained.
        watcher.wait_for("se/v1/s1/hub/state", WAIT, |p| p == b"offline").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_reader_at_the_exit_duplicates_overflow_and_foreign_tags() {
    for kind in brokers() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::start(kind, dir.path());
        let extra = format!("{}[rfid]\nexit_zones = [\"gate-2:1\"]\n", broker.config_section());
        let store = StoreFixture::with_config(&[], &extra);
        let daemon = store.start();
        let mut watcher = TestClient::connect(broker.port, "watcher", &["se/v1/s1/hub/#"]).await;
        watcher.wait_for("se/v1/s1/hub/state", WAIT, |p| p == b"online").await;
        let mut reader = device_sim::rfid::RfidReader::connect("127.0.0.1", broker.port, "s1", "gate-2");

        // Shelf antenna: a burst of reads, each tag three times, and a tag that is not SGTIN.
        let shelf: Vec<Vec<u8>> = (1..=5).map(sgtin).chain([vec![0xE2, 0x80, 0x11, 0x05]]).collect();
        reader.read(&shelf, 2, 3).await.unwrap();
        reader.overflow(17).await.unwrap();
        // The exit antenna: one unsold item, read twice: one alarm.
        reader.read(&[sgtin(4242)], 1, 2).await.unwrap();
        let alarm = watcher.wait_for("se/v1/s1/hub/alarm", WAIT, |_| true).await;
        let v: serde_json::Value = serde_json::from_slice(&alarm).unwrap();
        assert_eq!(
            (v["reader"].as_str(), v["antenna"].as_u64(), v["serial"].as_u64()),
            (Some("gate-2"), Some(1), Some(4242)),
            "{kind:?}"
        );
        assert_eq!(v["gtin"], "80614141123458");
        assert!(
            tokio::time::timeout(Duration::from_millis(500), watcher.wait_for("se/v1/s1/hub/alarm", WAIT, |_| true))
                .await
                .is_err(),
            "{kind:?}: a duplicate read raises no second alarm"
        );
        let log = daemon.log().join("\n");
        assert!(log.contains("RFID_OVERFLOW") && log.contains("overflow=17"), "{kind:?}: overflow reported:\n{log}");
        assert!(log.contains("Device online") && log.contains("gate-2"), "{kind:?}:\n{log}");
        daemon.stop();
    }
}
