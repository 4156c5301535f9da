//! Story: the hub talks to the store's mosquitto over TLS (`mqtts://` and `ca_file`). A CA and
//! the broker's certificate are made at test time; mosquitto listens with TLS for the hub and
//! in plain MQTT for the simulated devices. The hub connects, shelf labels get their prices and
//! an RFID read at the exit raises the alarm. A hub given another CA does not connect: it says
//! why in its journal and keeps retrying, running on. A CA file that is missing stops the daemon
//! at start with exit 64, naming the file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use device_sim::esl::EslFleet;
use device_sim::rfid::RfidReader;
use e2e_tests::mqtt::{brokers, sgtin, BrokerKind, Mosquitto, TestClient, TlsFiles};
use e2e_tests::store::{Daemon, StoreFixture};
use e2e_tests::{workspace_bin, Running};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

const WAIT: Duration = Duration::from_secs(30);

/// A CA (certificate and key), as PEM.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    Ca { cert: params.self_signed(&key).unwrap(), key }
}

/// Writes the CA's certificate and a broker certificate it signs for 127.0.0.1 and localhost;
/// returns (ca.pem, broker.pem, broker.key).
fn write_broker_files(dir: &Path, ca: &Ca) -> (PathBuf, PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "store broker");
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let files = (dir.join("ca.pem"), dir.join("broker.pem"), dir.join("broker.key"));
    std::fs::write(&files.0, ca.cert.pem()).unwrap();
    std::fs::write(&files.1, cert.pem()).unwrap();
    std::fs::write(&files.2, key.serialize_pem()).unwrap();
    files
}

/// Starts the daemon and waits until it is ready and every one of `needles` was printed (in any
/// order, before or after ready), returning the lines seen.
fn start_seeing(store: &StoreFixture, needles: &[&str]) -> (Daemon, String) {
    let mut cmd = Command::new(workspace_bin("edge-agent"));
    cmd.arg("run").arg("--config").arg(&store.config);
    let run = Running::spawn(cmd, true);
    let mut seen = String::new();
    for needle in ["edge-agent ready"].iter().chain(needles) {
        if !seen.contains(needle) {
            seen.push_str(&run.wait_for(needle, WAIT).join("\n"));
            seen.push('\n');
        }
    }
    (Daemon { run }, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_speaks_tls_to_the_broker_and_a_wrong_ca_is_refused_and_retried() {
    if !brokers().contains(&BrokerKind::Mosquitto) {
        return; // mosquitto is not installed (a failure under CI=true, in `brokers`)
    }
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, cert, key) = write_broker_files(dir.path(), &ca("store-edge test CA"));
    let broker = Mosquitto::start_with_tls(dir.path(), TlsFiles { ca: &ca_pem, cert: &cert, key: &key });
    let tls_port = broker.tls_port.unwrap();
    eprintln!("TLS story against mosquitto, TLS on port {tls_port}");
    let bindings = dir.path().join("labels.csv");
    std::fs::write(&bindings, "label,sku\nmilk-1,MILK\nmilk-2,MILK\n").unwrap();
    let extra = format!(
        "[mqtt]\nurl = \"mqtts://127.0.0.1:{tls_port}\"\nca_file = \"{}\"\n[labels]\nbindings = \"{}\"\n\
         [rfid]\nexit_zones = [\"gate-1:1\"]\n",
        ca_pem.display(),
        bindings.display()
    );
    let store = StoreFixture::with_config(&[], &extra);
    let (daemon, _) = start_seeing(&store, &["MQTT connected"]);

    // Devices on the plain listener, the hub on the TLS one: labels and the exit gate work.
    let mut watcher = TestClient::connect(broker.port, "watcher", &["se/v1/s1/hub/#"]).await;
    watcher.wait_for("se/v1/s1/hub/state", WAIT, |p| p == b"online").await;
    let labels = ["milk-1".to_owned(), "milk-2".to_owned()];
    let fleet = EslFleet::start("127.0.0.1", broker.port, "s1", &labels, HashSet::new());
    let mut gate = RfidReader::connect("127.0.0.1", broker.port, "s1", "gate-1");
    gate.read(&[sgtin(77)], 1, 1).await.unwrap();
    let alarm = watcher.wait_for("se/v1/s1/hub/alarm", WAIT, |_| true).await;
    let alarm: serde_json::Value = serde_json::from_slice(&alarm).unwrap();
    assert_eq!(alarm["serial"], 77, "{alarm}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !fleet.snapshot().values().all(|s| s.last_price_minor == Some(119)) {
        assert!(tokio::time::Instant::now() < deadline, "labels over TLS: {:?}", fleet.snapshot());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.stop();

    // Another CA: no connection, a clear journal line, and retries while the daemon runs on.
    let other = tempfile::tempdir().unwrap();
    let (wrong_ca, _, _) = write_broker_files(other.path(), &ca("some other CA"));
    let extra = format!("[mqtt]\nurl = \"mqtts://127.0.0.1:{tls_port}\"\nca_file = \"{}\"\n", wrong_ca.display());
    let wrong = StoreFixture::with_config(&[], &extra);
    let (mut daemon, seen) = start_seeing(&wrong, &["MQTT_TLS", "attempt=2"]);
    let line = seen.lines().find(|l| l.contains("MQTT_TLS")).unwrap();
    eprintln!("{line}");
    assert!(line.contains("ca_file") && line.contains("invalid peer certificate"), "{line}");
    assert!(!seen.contains("MQTT connected"), "{seen}");
    assert!(daemon.run.child.try_wait().unwrap().is_none(), "the daemon runs on");
    let status = wrong.storectl(&["--json", "status"]);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    daemon.stop();

    // A CA file that is not there: exit 64 at start, naming the key and the file.
    let missing = dir.path().join("no-such-ca.pem");
    let extra = format!("[mqtt]\nurl = \"mqtts://127.0.0.1:{tls_port}\"\nca_file = \"{}\"\n", missing.display());
    let bad = StoreFixture::with_config(&[], &extra);
    let out = Command::new(workspace_bin("edge-agent")).arg("run").arg("--config").arg(&bad.config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("mqtt.ca_file") && stderr.contains("no-such-ca.pem"), "{stderr}");
}
