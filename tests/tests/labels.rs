//! Shelf label stories with the hub's label task, a fleet of 5,000 simulated labels and a real
//! broker (the embedded one, and mosquitto): a price decrease reaches the till at once and the
//! labels follow; an increase reaches the till only once every label shows it; a broker restart
//! in the middle of a change leaves every label showing the new price; a label that never
//! answers holds an increase only until the deadline.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use device_sim::esl::EslFleet;
use e2e_tests::mqtt::{brokers, Broker, BrokerKind};
use e2e_tests::store::StoreFixture;
use edge_agent::config::Config;
use edge_agent::labels::runtime::LabelInput;
use edge_agent::labels::sequencing::TillPrices;
use edge_agent::lane::catalog::LedgerCatalog;
use edge_agent::lane::Catalog;
use edge_agent::ledger::{Command, IdempotencyKey, Ledger, LedgerHandle, LedgerReader};
use shared::{Currency, Gtin, Money, PriceKey, PriceScope, PriceSlot, PriceValue, Sku};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const MILK_LABELS: usize = 5_000;
const WAIT: Duration = Duration::from_secs(60);
const INCREASE_DEADLINE_MS: u64 = 3_000;

async fn set_price(ledger: &LedgerHandle, sku: &str, cents: i64, key: &str) {
    let cmd = Command::PriceChange {
        key: PriceKey { sku: Sku::new(sku).unwrap(), scope: PriceScope::Chain, slot: PriceSlot::Regular },
        value: Some(PriceValue { amount: Money::new(cents, Currency::new("EUR").unwrap()), window: None }),
    };
    ledger.submit(IdempotencyKey::new(key).unwrap(), cmd).await.unwrap();
}

/// What a lane charges for this GTIN now.
fn till_price(catalog: &LedgerCatalog, gtin: &str) -> i64 {
    let now = edge_agent::labels::runtime::wall_ms();
    catalog.lookup(&Gtin::parse(gtin).unwrap(), now).unwrap().unwrap().price.unwrap().0.minor
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn all_show(fleet: &EslFleet, prefix: &str, cents: i64) -> bool {
    fleet.snapshot().iter().filter(|(l, _)| l.starts_with(prefix)).all(|(_, s)| s.last_price_minor == Some(cents))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn price_changes_reach_till_and_shelf_in_the_lawful_order() {
    for kind in brokers() {
        eprintln!("label story against {kind:?}");
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Broker::start(kind, dir.path());
        let bindings = dir.path().join("labels.csv");
        let mut csv = String::from("label,sku\n");
        let milk: Vec<String> = (0..MILK_LABELS).map(|i| format!("milk-{i:05}")).collect();
        for l in &milk {
            csv.push_str(&format!("{l},MILK\n"));
        }
        csv.push_str("bread-1,BREAD\nbread-silent,BREAD\n");
        std::fs::write(&bindings, csv).unwrap();
        let extra = format!(
            // The acks of a 5,000-label wave sometimes take seconds to come back on this 2-core
            // machine under load; with the default 2 s the planner would rightly retry, and this
            // story counts every re-tell. Retry late instead.
            "{}[labels]\nbindings = \"{}\"\nincrease_deadline_ms = {INCREASE_DEADLINE_MS}\nretry_after_ms = 15000\n",
            broker.config_section(),
            bindings.display()
        );
        let store = StoreFixture::with_config(&[], &extra);
        let config = Config::load(&store.config).unwrap();

        let opts = edge_agent::daemon::ledger_options(&config);
        let (ledger, writer) = Ledger::open(&config.ledger.data_dir, &opts).unwrap().start_writer(1024).unwrap();
        let till = Arc::new(Mutex::new(TillPrices::new(config.labels.as_ref().unwrap().increase_deadline_ms)));
        let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
        let mismatches = edge_agent::labels::runtime::Mismatches::default();
        let handles = edge_agent::mqtt::start(
            &config,
            &ledger,
            &till,
            &edge_agent::mqtt::presence(&config),
            &mismatches,
            &tasks,
            &stop,
        )
        .unwrap()
        .unwrap();
        let catalog = LedgerCatalog::new(LedgerReader::open(&config.ledger.data_dir).unwrap()).with_till(till.clone());

        let mut labels = milk.clone();
        labels.extend(["bread-1".to_owned(), "bread-silent".to_owned()]);
        let fleet =
            EslFleet::start("127.0.0.1", broker.port, "s1", &labels, HashSet::from(["bread-silent".to_owned()]));
        until("every milk label shows 1.19", || all_show(&fleet, "milk-", 119)).await;
        // At start-up a label's check-in can cross the first command: the hub, without the ack
        // yet, sends the content again (the safe choice). Such a re-send can still be on its
        // way after every label shows the price (with the embedded broker under load, hundreds
        // of them, seconds late; one CI run saw 87 arrive after a later command). Once the hub
        // knows that every label that answers shows its content, it re-sends nothing from
        // start-up (a check-in arriving later is older than the label's ack, and dropped). So
        // re-tells are judged by command id, what the hub decided, not by when the broker
        // delivered it: ids go up by one per command, and the board gives the last one decided
        // as of the moment every answering label was up to date.
        let labels_board = handles.labels.as_ref().unwrap().board.clone();
        let answering = labels.len() - 1;
        until("the hub knows every answering label shows its content", || {
            labels_board.lock().unwrap().stages.up_to_date == answering
        })
        .await;
        let point = labels_board.lock().unwrap().last_command_id;
        // A repush tells bread-1 what it shows on purpose (so bread-1 is left out below).
        let repush = LabelInput::Repush { sku: Some(Sku::new("BREAD").unwrap()) };
        handles.labels.as_ref().unwrap().inputs.send(repush).await.unwrap();
        until("bread-1 is told its content once more", || {
            fleet.snapshot()["bread-1"].last_repeat.is_some_and(|id| id > point)
        })
        .await;

        // A decrease: the till at once, the shelf after.
        set_price(&ledger, "MILK", 99, "p1").await;
        assert_eq!(till_price(&catalog, "4006381333931"), 99, "{kind:?}: a decrease is charged at once");
        until("every milk label shows 0.99", || all_show(&fleet, "milk-", 99)).await;

        // An increase: the till keeps the old price until every label shows the new one.
        set_price(&ledger, "MILK", 129, "p2").await;
        assert_eq!(till_price(&catalog, "4006381333931"), 99, "{kind:?}: no customer pays more than the shelf shows");
        until("every milk label shows 1.29", || all_show(&fleet, "milk-", 129)).await;
        until("the till charges 1.29", || till_price(&catalog, "4006381333931") == 129).await;
        let repeated: Vec<_> = fleet
            .snapshot()
            .into_iter()
            .filter(|(l, s)| l != "bread-1" && s.last_repeat.is_some_and(|id| id > point))
            .collect();
        assert!(
            repeated.is_empty(),
            "{kind:?}: no label is told again what it already shows: {} labels, e.g. {:?}; the hub's sends: {:?}",
            repeated.len(),
            &repeated[..repeated.len().min(3)],
            labels_board.lock().unwrap().sends
        );

        // A broker restart in the middle of a 5,000-label change.
        if kind == BrokerKind::Mosquitto {
            let before: u32 = fleet.snapshot().values().map(|s| s.commands).sum();
            let decided_before = labels_board.lock().unwrap().last_command_id;
            set_price(&ledger, "MILK", 139, "p3").await;
            tokio::time::sleep(Duration::from_millis(150)).await;
            broker.mosquitto.as_mut().unwrap().restart(Duration::from_millis(500));
            until("every milk label shows 1.39 after the restart", || all_show(&fleet, "milk-", 139)).await;
            // And the hub hears them say so (its session subscribed again after the restart): a
            // board from after the 1.39 commands were decided counts every answering label
            // up to date.
            until("the hub knows every answering label shows 1.39", || {
                let board = labels_board.lock().unwrap();
                board.last_command_id > decided_before && board.stages.up_to_date == answering
            })
            .await;
            let sent: u32 = fleet.snapshot().values().map(|s| s.commands).sum::<u32>() - before;
            // Commands lost with the broker are sent again; none beyond that.
            assert!(
                sent >= MILK_LABELS as u32 && sent <= 2 * MILK_LABELS as u32,
                "{kind:?}: {sent} commands for {MILK_LABELS} labels"
            );
        }

        // A label that never answers holds an increase only until the deadline.
        set_price(&ledger, "BREAD", 300, "p4").await;
        // The deadline runs from the till's first lookup of the new price, just below.
        let held_since = std::time::Instant::now();
        assert_eq!(till_price(&catalog, "96385074"), 250);
        until("bread-1 shows 3.00", || fleet.snapshot()["bread-1"].last_price_minor == Some(300)).await;
        let charged = till_price(&catalog, "96385074");
        // Unless bread-1 took longer than the deadline to show it (a loaded machine).
        if held_since.elapsed() < Duration::from_millis(INCREASE_DEADLINE_MS) {
            assert_eq!(charged, 250, "{kind:?}: one label still shows the old price");
        }
        until("the deadline passes and the till charges 3.00", || till_price(&catalog, "96385074") == 300).await;
        // The label that never answers is on the mismatch list for staff, and only it.
        until("the mismatch list names the silent label", || {
            mismatches.lock().unwrap().iter().map(|(l, _)| l.to_string()).collect::<Vec<_>>() == ["bread-silent"]
        })
        .await;

        stop.cancel();
        tasks.close();
        tasks.wait().await;
        drop(ledger);
        tokio::task::spawn_blocking(move || writer.join()).await.unwrap();
    }
}
