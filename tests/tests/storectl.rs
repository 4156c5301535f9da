//! `storectl` against the real daemon, in both output modes: writes go through the daemon's
//! control socket (and a retried write with the same key applies once), refusals exit with the
//! documented codes, and with the daemon stopped the read commands still answer from the ledger
//! file, read-only, and say so, while writes refuse with exit 69.

use std::process::Output;

use e2e_tests::output::{json, ok, text};

use std::collections::HashSet;
use std::time::Duration;

use device_sim::esl::EslFleet;
use e2e_tests::mqtt::free_port;
use e2e_tests::store::StoreFixture;
use serde_json::Value;

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storectl_writes_through_the_daemon_and_reads_without_it() {
    let port = free_port();
    let labels = tempfile::tempdir().unwrap();
    let bindings = labels.path().join("labels.csv");
    std::fs::write(&bindings, "label,sku\nmilk-1,MILK\nmilk-2,MILK\n").unwrap();
    let metrics_port = free_port();
    let extra = format!(
        // Retries late: an ack slower than the default 2 s would add a retry to the count below.
        "[mqtt]\nembedded_listen = \"127.0.0.1:{port}\"\n[labels]\nbindings = \"{}\"\nretry_after_ms = 15000\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        bindings.display()
    );
    let store = StoreFixture::with_config(&[], &extra);
    let daemon = store.start();
    let fleet = EslFleet::start("127.0.0.1", port, "s1", &["milk-1".into(), "milk-2".into()], HashSet::new());

    // The labels check in and show the price: devices online, nothing mismatched.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let devices = json(store.storectl(&["--json", "devices"]));
        let online = devices["devices"].as_array().unwrap().iter().filter(|d| d["online"] == true).count();
        let mismatched = json(store.storectl(&["--json", "labels", "mismatch"]));
        if online == 2 && mismatched["mismatched"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "devices {devices}, mismatched {mismatched}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let table = ok(store.storectl(&["devices"]));
    assert!(table.contains("2 devices, 2 online") && table.contains("milk-1"), "{table}");

    // Label stages, and a repush that re-sends every label its content and watches it land.
    let labels = json(store.storectl(&["--json", "labels", "status"]));
    assert_eq!((labels["labels"].as_u64(), labels["stages"]["up_to_date"].as_u64()), (Some(2), Some(2)), "{labels}");
    let before: u32 = fleet.snapshot().values().map(|s| s.commands).sum();
    let repush = ok(store.storectl(&["labels", "repush", "MILK"]));
    assert!(repush.contains("2/2 up to date"), "{repush}");
    let after: u32 = fleet.snapshot().values().map(|s| s.commands).sum();
    assert_eq!(after, before + 2, "each label told once more");

    // The same, as Prometheus sees it.
    let metrics = e2e_tests::cloud::http_client()
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let expected = [
        "edge_devices{store=\"s1\",state=\"online\"} 2",
        "edge_labels_mismatched{store=\"s1\"} 0",
        "edge_labels{store=\"s1\",stage=\"up_to_date\"} 2",
        "edge_mqtt_connected{store=\"s1\"} 1",
        "# TYPE edge_ledger_events_total counter",
    ];
    for line in expected {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }

    // Status, both ways.
    let human = ok(store.storectl(&["status"]));
    assert!(human.contains("edge-agent is running for store s1"), "{human}");
    let status = json(store.storectl(&["--json", "status"]));
    assert_eq!(status["daemon"], "running");
    assert_eq!(status["cloud"]["configured"], false);
    assert_eq!(status["broker_connected"], true, "{status}");

    // A delivery, recorded once even when the command is run again with its key.
    let first = ok(store.storectl(&["stock", "receive", "MILK", "10", "--reference", "DN-7", "--key", "dn-7"]));
    assert!(first.contains("recorded as event") && first.contains("receipt"), "{first}");
    let again =
        json(store.storectl(&["--json", "stock", "receive", "MILK", "10", "--reference", "DN-7", "--key", "dn-7"]));
    assert_eq!(again["replayed"], true);
    assert_eq!(store.on_hand("MILK"), 110);

    // Breakage, then a count that finds 100: the count records the movement it makes.
    ok(store.storectl(&["stock", "adjust", "MILK", "-3", "--reason", "broken on delivery"]));
    let count = json(store.storectl(&["--json", "stock", "count", "MILK", "100"]));
    assert_eq!(count["body"]["Count"]["seen"], 107, "{count}");
    assert_eq!(count["body"]["Count"]["movement"], -7, "{count}");
    assert_eq!(store.on_hand("MILK"), 100);

    // Store prices: a promotion, and a 20% markdown (bread 2.50 -> 2.00).
    ok(store.storectl(&["price", "set", "MILK", "0.89", "--promotion"]));
    let milk = json(store.storectl(&["--json", "price", "show", "MILK"]));
    assert_eq!(milk["effective"]["amount_minor"], 89, "{milk}");
    assert_eq!(milk["effective"]["scope"], "store:s1");
    ok(store.storectl(&["price", "markdown", "BREAD", "--percent", "20"]));
    let bread = json(store.storectl(&["--json", "price", "show", "BREAD"]));
    assert_eq!(bread["effective"]["amount_minor"], 200, "{bread}");
    let twice = ok(store.storectl(&["price", "markdown", "BREAD", "--percent", "20"]));
    assert!(twice.contains("already recorded"), "the same markdown runs once, never 20% of 20%: {twice}");
    let bread = json(store.storectl(&["--json", "price", "show", "BREAD"]));
    assert_eq!(bread["effective"]["amount_minor"], 200, "{bread}");

    // Refusals with their exit codes.
    let not_a_number = store.storectl(&["stock", "adjust", "MILK", "lots", "--reason", "x"]);
    assert_eq!(code(&not_a_number), 64, "{}", text(&not_a_number));
    let bad_sku = store.storectl(&["stock", "receive", "no spaces allowed", "1"]);
    assert_eq!(code(&bad_sku), 64, "{}", text(&bad_sku));
    let bad_price = store.storectl(&["price", "set", "MILK", "1.999"]);
    assert_eq!(code(&bad_price), 64, "{}", text(&bad_price));
    assert!(text(&bad_price).contains("1.999"), "{}", text(&bad_price));
    let overflow = store.storectl(&["stock", "adjust", "MILK", "9223372036854775807", "--reason", "x"]);
    assert_eq!(code(&overflow), 65, "{}", text(&overflow));
    let no_cloud = store.storectl(&["sync", "now"]);
    assert_eq!(code(&no_cloud), 78, "{}", text(&no_cloud));
    assert_eq!(json(store.storectl(&["--json", "sync", "status"]))["configured"], false);

    // Export for auditors: every event, as JSON lines and as CSV.
    let events = ok(store.storectl(&["ledger", "export"]));
    let lines: Vec<Value> = events.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().any(|e| e["kind"] == "count" && e["idem_key"].as_str().unwrap().starts_with("storectl:")));
    assert_eq!(lines.first().unwrap()["seq"], 1);
    let csv = ok(store.storectl(&["ledger", "export", "--format", "csv"]));
    assert!(csv.starts_with("seq,hlc_wall_ms,hlc_logical,actor,kind,idem_key,hash,body\n"), "{csv:.200}");
    assert_eq!(csv.lines().count(), lines.len() + 1);

    // An online backup while the daemon runs, verified; never over an existing file.
    let backup = store.path().join("backup.db");
    let b = json(store.storectl(&["--json", "backup", backup.to_str().unwrap()]));
    assert_eq!(b["verified"], true);
    assert_eq!(b["events"].as_u64(), Some(lines.len() as u64));
    let again = store.storectl(&["backup", backup.to_str().unwrap()]);
    assert!(!again.status.success() && text(&again).contains("exists already"), "{}", text(&again));

    // The doctor: the ledger, the disk and the daemon are fine.
    let config = store.config.to_str().unwrap();
    let doctor = json(store.storectl(&["--json", "doctor", "--config", config]));
    let verdict = |name: &str| {
        doctor["checks"].as_array().unwrap().iter().find(|c| c["check"] == name).map(|c| c["verdict"].clone())
    };
    for name in ["ledger file", "ledger chain", "daemon"] {
        assert_eq!(verdict(name), Some(Value::from("ok")), "{name}: {doctor}");
    }
    assert!(ok(store.storectl(&["completions", "bash"])).contains("storectl"));

    // The daemon stops: reads still answer, read-only, and say so; writes refuse.
    daemon.stop();
    let down = store.storectl(&["status"]);
    assert_eq!(code(&down), 3, "{}", text(&down));
    assert!(text(&down).contains("NOT running") && text(&down).contains("read-only"), "{}", text(&down));
    let down_json = store.storectl(&["--json", "status"]);
    assert_eq!(code(&down_json), 3);
    let v: Value = serde_json::from_slice(&down_json.stdout).unwrap();
    assert_eq!((v["daemon"].as_str(), v["read_only"].as_bool()), (Some("not running"), Some(true)), "{v}");
    let write = store.storectl(&["stock", "receive", "MILK", "1"]);
    assert_eq!(code(&write), 69, "{}", text(&write));
    assert!(text(&write).contains("not running"), "{}", text(&write));
    assert_eq!(json(store.storectl(&["--json", "stock", "show", "MILK"]))["on_hand"], 100);
    let sync = store.storectl(&["sync", "status"]);
    assert!(sync.status.success() && text(&sync).contains("read-only"), "{}", text(&sync));
    ok(store.storectl(&["ledger", "verify"]));
}
