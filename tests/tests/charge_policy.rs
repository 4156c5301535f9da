//! Story: the `[lane] charge` policy, through the real daemon, its lane devices and simulated
//! shelf labels (embedded broker and mosquitto). Bread's two labels show 2.50; one label's
//! display breaks and the price goes up to 3.00. Past the increase deadline the till charges
//! 3.00 under `system`, while under `lower_of_shelf_and_system` it keeps charging the 2.50 the
//! broken label still shows.

use std::collections::HashSet;
use std::time::Duration;

use device_sim::esl::EslFleet;
use e2e_tests::mqtt::{brokers, Broker};
use e2e_tests::store::StoreFixture;
use firmware_proto as fp;

const WAIT: Duration = Duration::from_secs(30);
const BREAD: &str = "96385074";

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn shows(fleet: &EslFleet, label: &str) -> Option<i64> {
    fleet.snapshot().get(label).and_then(|s| s.last_price_minor)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_that_missed_an_increase_is_honoured_only_under_lower_of_shelf_and_system() {
    for kind in brokers() {
        for (policy, second_bread) in [("lower_of_shelf_and_system", 250), ("system", 300)] {
            eprintln!("charge policy {policy} against {kind:?}");
            let dir = tempfile::tempdir().unwrap();
            let broker = Broker::start(kind, dir.path());
            let bindings = dir.path().join("labels.csv");
            std::fs::write(&bindings, "label,sku\nbread-1,BREAD\nbread-2,BREAD\n").unwrap();
            let extra = format!(
                "{}[labels]\nbindings = \"{}\"\nincrease_deadline_ms = 1000\n[lane]\ncharge = \"{policy}\"\n",
                broker.config_section(),
                bindings.display()
            );
            let store = StoreFixture::with_config(&["lane-1"], &extra);
            let daemon = store.start();
            let mut lane = e2e_tests::lane::attach(&store, "lane-1", None).await;
            let labels = ["bread-1".to_owned(), "bread-2".to_owned()];
            let fleet = EslFleet::start("127.0.0.1", broker.port, "s1", &labels, HashSet::new());
            until("both bread labels show 2.50", || labels.iter().all(|l| shows(&fleet, l) == Some(250))).await;

            // bread-2's display breaks: it keeps showing 2.50 and takes no more updates.
            fleet.silence("bread-2");
            let out = store.storectl(&["price", "set", "BREAD", "3.00", "--key", &format!("raise-{policy}")]);
            assert!(out.status.success(), "price set: {}", String::from_utf8_lossy(&out.stderr));
            until("bread-1 shows 3.00", || shows(&fleet, "bread-1") == Some(300)).await;

            // Before the deadline the increase is held under either policy.
            lane.scanner.scan(BREAD).await.unwrap();
            let first = |d: &fp::LaneDisplay| matches!(d, fp::LaneDisplay::Total { amount_minor: 250, .. });
            lane.display.wait_display(WAIT, first).await.unwrap();
            daemon.run.wait_for("LABELS_LAGGING", WAIT);

            // Past it, the policy decides.
            lane.scanner.scan(BREAD).await.unwrap();
            let total = 250 + second_bread;
            let seen = lane
                .display
                .wait_display(WAIT, |d| matches!(d, fp::LaneDisplay::Total { items: 2, .. }))
                .await
                .unwrap();
            assert!(
                matches!(seen.last(), Some(fp::LaneDisplay::Total { amount_minor, .. }) if *amount_minor == total),
                "{kind:?} {policy}: expected a total of {total}, the lane showed {seen:?}"
            );
            assert_eq!(shows(&fleet, "bread-2"), Some(250), "the broken label still shows 2.50");
            daemon.stop();
        }
    }
}
