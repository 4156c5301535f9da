//! MQTT stories, each against the daemon's embedded broker and against a real mosquitto:
//! the retained hub state, an Impinj reader's JSON through the broker raising an exit alarm
//! under the right GTIN, and garbage, truncated envelopes and a 10 MB payload refused without
//! disturbing anything else. And the hub's MQTT session when it drops: after a broker restart
//! that found its publish queue full it still hears its devices, and what it had not delivered
//! goes out on the next session.

use std::collections::HashSet;
use std::time::Duration;

use e2e_tests::mqtt::{brokers, sgtin, Broker, BrokerKind, Mosquitto, Relay, TestClient};
use e2e_tests::store::StoreFixture;
use edge_agent::mqtt::link::{self, LinkSettings, REQUEST_QUEUE};
use firmware_proto as fp;
use rumqttc::QoS;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
        if kind == BrokerKind::Embedded {
            // Nothing in the log marks its handling there; give it time to disturb the session.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        // Nothing else was disturbed: the next read still raises its alarm.
        publish("impinj/gate-1/events", impinj_event("3074257BF7194E4000001A86", 1).into_bytes()).await;
        watcher.wait_for("se/v1/s1/hub/alarm", WAIT, alarm_for(6790)).await;
        // A read on a shelf antenna of the same reader is presence, not an alarm.
        publish("impinj/gate-1/events", impinj_event("3074257BF7194E4000001A87", 2).into_bytes()).await;
        publish("impinj/gate-1/events", impinj_event("3074257BF7194E4000001A88", 1).into_bytes()).await;
        let next = watcher.wait_for("se/v1/s1/hub/alarm", WAIT, |_| true).await;
        assert!(alarm_for(6792)(&next), "{kind:?}: the shelf read must not alarm: {}", String::from_utf8_lossy(&next));

        let mut lines = daemon.log();
        // The 10 MB payload came on a connection of its own: the alarms above do not say the hub
        // has handled it yet.
        if kind == BrokerKind::Mosquitto && !lines.iter().any(|l| l.contains("MQTT_OVERSIZED")) {
            lines.extend(daemon.run.wait_for("MQTT_OVERSIZED", WAIT));
        }
        let log = lines.join("\n");
        assert!(log.contains("IMPINJ_REFUSED"), "{kind:?}: garbage JSON counted:\n{log}");
        assert!(log.contains("MQTT_PAYLOAD"), "{kind:?}: bad envelopes counted:\n{log}");
        if kind == BrokerKind::Mosquitto {
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

/// The hub's MQTT session (store s1, hearing label acks) with the broker on `port`, connected.
async fn connected_hub(port: u16, tasks: &TaskTracker, stop: &CancellationToken) -> link::MqttLink {
    let settings = LinkSettings {
        host: "127.0.0.1".into(),
        port,
        client_id: "hub-s1".into(),
        credentials: None,
        max_payload: 65_536,
        state_topic: "se/v1/s1/hub/state".into(),
        subscriptions: vec!["se/v1/s1/dev/+/+/ack".into()],
        tls: None,
    };
    let mut hub = link::spawn(settings, tasks, stop.clone());
    hub.connected.wait_for(|up| *up).await.unwrap();
    hub
}

/// Whether the hub hears `payload` that the device publishes on its ack topic (published again
/// every half second while the device's own session may still be reconnecting).
async fn heard(hub: &mut link::MqttLink, device: &TestClient, payload: &[u8]) -> bool {
    let topic = "se/v1/s1/dev/esl/esl-1/ack";
    for _ in 0..60 {
        let _ = device.client.try_publish(topic, QoS::AtLeastOnce, false, payload.to_vec());
        let wait = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(batch) = hub.incoming.recv().await {
                if batch.iter().any(|m| m.topic == topic && m.payload.as_ref() == payload) {
                    return true;
                }
            }
            false
        });
        if wait.await == Ok(true) {
            return true;
        }
    }
    false
}

/// A broker restart while the hub's publish queue is full (a 5,000-label change going out as the
/// broker went down) must not leave the hub deaf: on reconnecting it subscribes again and says
/// `online` ahead of everything queued. A CI run once lost the subscription this way: the hub
/// sent label commands but never heard an ack again, so an increase was never confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_hears_its_devices_again_after_a_broker_restart_that_found_its_queue_full() {
    if !brokers().contains(&BrokerKind::Mosquitto) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut mosquitto = Mosquitto::start(dir.path());
    let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
    let mut hub = connected_hub(mosquitto.port, &tasks, &stop).await;
    let device = TestClient::connect(mosquitto.port, "esl-1", &[]).await;
    assert!(heard(&mut hub, &device, b"before").await, "the hub hears a device before the restart");

    mosquitto.kill();
    hub.connected.wait_for(|up| !*up).await.unwrap();
    // Down, the hub's session reads nothing from its queue: fill it to the brim.
    let mut queued = 0;
    while hub.client.try_publish("se/v1/s1/dev/esl/esl-9/cmd", QoS::AtLeastOnce, false, vec![0u8; 16]).is_ok() {
        queued += 1;
    }
    assert_eq!(queued, REQUEST_QUEUE, "the hub's publish queue is full while the broker is down");
    tokio::task::block_in_place(|| mosquitto.start_again());
    hub.connected.wait_for(|up| *up).await.unwrap();

    assert!(
        heard(&mut hub, &device, b"after").await,
        "the hub subscribed again after the restart and hears the device"
    );
    // The restarted broker kept no retained messages (no persistence): `online` is the hub's new one.
    let mut watcher = TestClient::connect(mosquitto.port, "watcher", &["se/v1/s1/hub/state"]).await;
    watcher.wait_for("se/v1/s1/hub/state", Duration::from_secs(10), |p| p == b"online").await;

    // Stopping the hub while its session waits for a broker that does not answer, with the
    // queue full, ends the session at once (its goodbye used to wait for room in the queue,
    // which nothing drained any more), and frees a publisher waiting for room, as the label
    // task may be. Something that accepts connections but never answers stands in for the
    // broker: once the hub's attempt arrives, its session waits in the event loop for a
    // CONNACK (5 s) when told to stop.
    mosquitto.kill();
    hub.connected.wait_for(|up| !*up).await.unwrap();
    let silent_broker = std::net::TcpListener::bind(("127.0.0.1", mosquitto.port)).unwrap();
    let _hub_attempt = tokio::task::block_in_place(|| loop {
        let (mut conn, _) = silent_broker.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut connect = [0u8; 256];
        let n = std::io::Read::read(&mut conn, &mut connect).unwrap_or(0);
        if connect[..n].windows(6).any(|w| w == b"hub-s1") {
            break conn;
        }
    });
    while hub.client.try_publish("se/v1/s1/dev/esl/esl-9/cmd", QoS::AtLeastOnce, false, vec![0u8; 16]).is_ok() {}
    let client = hub.client.clone();
    let waiting = tokio::spawn(async move {
        client.publish("se/v1/s1/dev/esl/esl-9/cmd", QoS::AtLeastOnce, false, vec![0u8; 16]).await
    });
    stop.cancel();
    tasks.close();
    let ended = tokio::time::timeout(Duration::from_secs(30), tasks.wait()).await;
    assert!(
        ended.is_ok(),
        "the hub's MQTT session ends when stopped while the broker does not answer and its queue is full"
    );
    drop(hub);
    let freed = tokio::time::timeout(Duration::from_secs(30), waiting).await;
    assert!(matches!(freed, Ok(Ok(Err(_)))), "a publisher waiting for room is told the session ended: {freed:?}");
}

/// QoS 1 publishes the hub had sent without an acknowledgement, or still had queued, when its
/// session dropped go out on the next session (rumqttc forgets them at a clean-session
/// reconnect; exit alarms published as the broker restarted were lost). A relay between the hub
/// and mosquitto holds what the hub sends, then cuts the connection; a watcher on the broker
/// itself gets every alarm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_hub_had_not_delivered_when_its_session_dropped_goes_out_on_the_next() {
    if !brokers().contains(&BrokerKind::Mosquitto) {
        return;
    }
    const ALARMS: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(dir.path());
    let relay = Relay::start(mosquitto.port).await;
    let mut watcher = TestClient::connect(mosquitto.port, "watcher", &["se/v1/s1/hub/alarm"]).await;
    let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
    let mut hub = connected_hub(relay.port, &tasks, &stop).await;
    hub.client.publish("se/v1/s1/hub/alarm", QoS::AtLeastOnce, false, "alarm-first").await.unwrap();
    watcher.wait_for("se/v1/s1/hub/alarm", WAIT, |p| p == b"alarm-first").await;

    // More alarms than the in-flight window: some sent and never acknowledged, the rest queued.
    relay.hold();
    for i in 0..ALARMS {
        hub.client.publish("se/v1/s1/hub/alarm", QoS::AtLeastOnce, false, format!("alarm-{i}")).await.unwrap();
    }
    let through = tokio::time::timeout(Duration::from_millis(500), watcher.rx.recv()).await;
    assert!(through.is_err(), "the relay held what the hub sent: {through:?}");
    relay.cut();
    hub.connected.wait_for(|up| !*up).await.unwrap();
    hub.connected.wait_for(|up| *up).await.unwrap();

    let mut missing: HashSet<String> = (0..ALARMS).map(|i| format!("alarm-{i}")).collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, watcher.rx.recv()).await {
            Ok(Some((_, payload))) => {
                missing.remove(&String::from_utf8_lossy(&payload).into_owned());
            }
            _ => break,
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {ALARMS} alarms never reached the broker, e.g. {:?}",
        missing.len(),
        missing.iter().next()
    );

    // A stop sends what is still queued before its goodbye.
    for i in 0..50 {
        hub.client.publish("se/v1/s1/hub/alarm", QoS::AtLeastOnce, false, format!("last-{i}")).await.unwrap();
    }
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    let mut last: HashSet<String> = (0..50).map(|i| format!("last-{i}")).collect();
    while !last.is_empty() {
        match tokio::time::timeout(WAIT, watcher.rx.recv()).await {
            Ok(Some((_, payload))) => {
                last.remove(&String::from_utf8_lossy(&payload).into_owned());
            }
            _ => break,
        }
    }
    assert!(last.is_empty(), "{} alarms queued at the stop never reached the broker", last.len());
}
