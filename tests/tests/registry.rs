//! Story: the device registry survives a restart of the hub (embedded broker and mosquitto). A
//! label says hello and sends a heartbeat, a stranger not on the allow-list is quarantined; with
//! the daemon stopped, `storectl devices` shows what it last saved (and exits 3); the daemon
//! restarts and, before either speaks again, `storectl devices` shows the label (offline,
//! with its firmware, battery and last-seen time) and the stranger still quarantined. Then the
//! registry file is damaged: the daemon says so in its journal, starts with an empty registry
//! and the ledger is untouched.

use std::time::Duration;

use e2e_tests::mqtt::{brokers, Broker, TestClient};
use e2e_tests::store::{Daemon, StoreFixture};
use firmware_proto as fp;
use rumqttc::QoS;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn devices(store: &StoreFixture) -> Value {
    let out = store.storectl(&["--json", "devices"]);
    assert!(out.status.success(), "storectl devices: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Polls `storectl devices` until `cond` holds (the router publishes its registry once a second).
async fn devices_until(store: &StoreFixture, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let d = devices(store);
        if cond(&d) {
            return d;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}: {d}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn device<'a>(d: &'a Value, id: &str) -> Option<&'a Value> {
    d["devices"].as_array()?.iter().find(|x| x["id"] == id)
}

fn quarantined(d: &Value) -> Vec<String> {
    d["quarantined"].as_array().into_iter().flatten().filter_map(|q| q["id"].as_str().map(str::to_owned)).collect()
}

/// Waits until the hub says `online` (it subscribes before it says so): a device message sent
/// earlier, while a restarted hub is still connecting, would reach no subscriber.
async fn hub_online(port: u16, watcher_id: &str) {
    let mut watcher = TestClient::connect(port, watcher_id, &["se/v1/s1/hub/state"]).await;
    watcher.wait_for("se/v1/s1/hub/state", WAIT, |p| p == b"online").await;
}

async fn send(client: &TestClient, id: &str, seq: u32, body: fp::Body) {
    let env = fp::Envelope::new(id, 7, seq, body).unwrap();
    let topic = format!("se/v1/s1/dev/esl/{id}/status");
    client.client.publish(topic, QoS::AtLeastOnce, false, fp::payload::encode_vec(&env).unwrap()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_is_known_after_a_restart_and_a_damaged_file_only_empties_it() {
    for kind in brokers() {
        eprintln!("registry story against {kind:?}");
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::start(kind, dir.path());
        let extra = format!("{}allow_list = [\"esl-1\"]\n", broker.config_section());
        let store = StoreFixture::with_config(&[], &extra);
        let daemon = store.start();
        let label = TestClient::connect(broker.port, "label-gateway", &[]).await;
        let mut watcher = TestClient::connect(broker.port, "watcher", &["se/v1/s1/hub/state"]).await;
        watcher.wait_for("se/v1/s1/hub/state", WAIT, |p| p == b"online").await;

        send(&label, "esl-1", 1, fp::Body::Hello(fp::Hello::new(fp::DeviceKind::Esl, "2.4.1").unwrap())).await;
        let heartbeat = fp::Heartbeat { uptime_s: 5, battery_pct: Some(77), rssi_dbm: Some(-58) };
        send(&label, "esl-1", 2, fp::Body::Heartbeat(heartbeat)).await;
        send(&label, "esl-666", 1, fp::Body::Heartbeat(heartbeat)).await;
        let before = devices_until(&store, "the label is online and the stranger quarantined", |d| {
            device(d, "esl-1").is_some_and(|x| x["online"] == true && x["battery_pct"] == 77)
                && quarantined(d) == ["esl-666"]
        })
        .await;
        let seen = device(&before, "esl-1").unwrap()["last_seen_ms"].as_u64().unwrap();
        let now = edge_agent::labels::runtime::wall_ms();
        assert!(now >= seen && now - seen < 60_000, "{kind:?}: last seen is wall-clock time: {seen} (now {now})");
        daemon.stop();

        // The daemon down: storectl reads what it last saved, says so, and exits 3 (as status).
        let out = store.storectl(&["devices"]);
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(3), "{kind:?}: {table}{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            table.contains("NOT running") && table.contains("devices.db") && table.contains("1 devices"),
            "{kind:?}: {table}"
        );
        assert!(table.contains("esl-1") && table.contains("2.4.1") && table.contains("esl-666"), "{kind:?}: {table}");
        let out = store.storectl(&["--json", "devices"]);
        let saved: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(saved["daemon"], "not running", "{kind:?}: {saved}");
        let esl = device(&saved, "esl-1").unwrap();
        assert_eq!((&esl["online"], &esl["battery_pct"]), (&Value::Null, &Value::from(77)), "{kind:?}: {saved}");
        assert_eq!(quarantined(&saved), ["esl-666"], "{kind:?}");

        // After the restart, before anything speaks: known, offline, still quarantined.
        let daemon = store.start();
        let after = devices_until(&store, "the registry is restored", |d| device(d, "esl-1").is_some()).await;
        let esl = device(&after, "esl-1").unwrap();
        assert_eq!(
            (&esl["online"], &esl["firmware"], &esl["battery_pct"], &esl["rssi_dbm"], &esl["kind"]),
            (&Value::Bool(false), &Value::from("2.4.1"), &Value::from(77), &Value::from(-58), &Value::from("esl")),
            "{kind:?}: {after}"
        );
        assert_eq!(esl["last_seen_ms"].as_u64(), Some(seen), "{kind:?}");
        assert_eq!(quarantined(&after), ["esl-666"], "{kind:?}: the stranger stays quarantined");
        let table = String::from_utf8_lossy(&store.storectl(&["devices"]).stdout).into_owned();
        assert!(table.contains("1 devices, 0 online") && table.contains("OFFLINE"), "{table}");
        // It comes back online when it speaks.
        hub_online(broker.port, "watcher-2").await;
        send(&label, "esl-1", 3, fp::Body::Heartbeat(heartbeat)).await;
        devices_until(&store, "the label is online again", |d| device(d, "esl-1").is_some_and(|x| x["online"] == true))
            .await;
        daemon.stop();

        // A damaged registry file: one clear journal line, an empty registry, the ledger intact.
        let file = store.data.join("devices.db");
        std::fs::write(&file, b"this is not a SQLite database, it was overwritten by a bad disk").unwrap();
        let mut cmd = std::process::Command::new(e2e_tests::workspace_bin("edge-agent"));
        cmd.arg("run").arg("--config").arg(&store.config);
        let daemon = Daemon { run: e2e_tests::Running::spawn(cmd, true) };
        let log = daemon.run.wait_for("edge-agent ready", WAIT).join("\n");
        let line = log.lines().find(|l| l.contains("REGISTRY_CORRUPT")).unwrap_or_else(|| panic!("{kind:?}:\n{log}"));
        assert!(line.contains("devices.db") && line.contains("ledger is not affected"), "{kind:?}: {line}");
        let empty = devices_until(&store, "the router publishes its registry", |_| true).await;
        assert!(device(&empty, "esl-1").is_none() && quarantined(&empty).is_empty(), "{kind:?}: {empty}");
        assert!(store.data.join("devices.db.corrupt").exists(), "{kind:?}: the damaged file is kept aside");
        let verify = store.storectl(&["ledger", "verify"]);
        assert!(
            verify.status.success(),
            "{kind:?}: the ledger is untouched: {}",
            String::from_utf8_lossy(&verify.stdout)
        );
        hub_online(broker.port, "watcher-3").await;
        send(&label, "esl-1", 4, fp::Body::Heartbeat(heartbeat)).await;
        devices_until(&store, "the label is known again", |d| device(d, "esl-1").is_some()).await;
        daemon.stop();

        // Damaged again with the daemon down: storectl names the file and what will happen,
        // exits 65 (an unusable file, as for the ledger), and leaves the file where it is.
        std::fs::write(&file, b"overwritten again").unwrap();
        let out = store.storectl(&["devices"]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(65), "{kind:?}: {stderr}");
        assert!(
            stderr.contains("devices.db") && stderr.contains("moves an unusable registry aside"),
            "{kind:?}: {stderr}"
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"overwritten again", "{kind:?}: storectl changes nothing");
    }
}
