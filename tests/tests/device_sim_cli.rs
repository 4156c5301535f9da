//! The technician's tool: `device-sim` processes play a scanner and a lane display against a
//! running `edge-agent`, through ptys at the paths the daemon's config names.

use std::process::Command;
use std::time::Duration;

use e2e_tests::store::StoreFixture;
use e2e_tests::{workspace_bin, Running};

#[test]
fn device_sim_plays_a_scanner_and_a_lane_that_pays() {
    let store = StoreFixture::new(&["lane-1"]);
    let daemon = store.start();

    // The lane pays 12 s after its HELLO, the scanner scans after 3 s: room for the hub to
    // find the scanner's pty late (its retry backoff grows while the pty does not exist yet).
    let mut lane = Command::new(workspace_bin("device-sim"));
    lane.args(["lane", "--name", "lane-1-display", "--tender", "card", "--tender-after-ms", "12000", "--pty"])
        .arg(store.device_path("lane-1", "display"));
    let lane = Running::spawn(lane, false);

    let scanner = Command::new(workspace_bin("device-sim"))
        .args([
            "scanner",
            "--suffix",
            "crlf",
            "--aim",
            "]E0",
            "--interval-ms",
            "300",
            "--start-delay-ms",
            "3000",
            "--pty",
        ])
        .arg(store.device_path("lane-1", "scanner"))
        .args(["4006381333931", "96385074"])
        .output()
        .unwrap();
    assert!(scanner.status.success(), "{}", String::from_utf8_lossy(&scanner.stderr));
    assert!(String::from_utf8_lossy(&scanner.stdout).contains("scanned 96385074"));

    let shown = lane.wait_for("Receipt", Duration::from_secs(30));
    assert!(shown.iter().any(|l| l.contains("amount_minor: 369")), "{shown:#?}");
    let mut child = lane.child;
    assert!(child.wait().unwrap().success());
    daemon.stop();
    assert_eq!(store.on_hand("MILK"), 99);
    assert_eq!(store.on_hand("BREAD"), 99);
}
