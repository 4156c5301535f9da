//! Stories at a self-checkout lane, with the real daemon and simulated devices on pty pairs:
//! a plain scanner, a framed scale and a framed lane display per lane.

use std::time::Duration;

use e2e_tests::lane::LaneDevices;
use e2e_tests::store::{StoreFixture, STORE};
use edge_agent::ledger::EventBody;
use firmware_proto as fp;

const WAIT: Duration = Duration::from_secs(20);

async fn attach(store: &StoreFixture, lane: &str) -> LaneDevices {
    e2e_tests::lane::attach(store, lane, Some("]E0")).await
}

fn is_total(minor: i64) -> impl Fn(&fp::LaneDisplay) -> bool {
    move |d| matches!(d, fp::LaneDisplay::Total { amount_minor, .. } if *amount_minor == minor)
}

fn is_message(code: fp::LaneMessageCode) -> impl Fn(&fp::LaneDisplay) -> bool {
    move |d| matches!(d, fp::LaneDisplay::Message { code: c, .. } if *c == code)
}

/// Pays by card and returns the receipt id shown.
async fn pay(d: &mut LaneDevices) -> String {
    d.display.input(fp::LaneInput::Tender(fp::TenderKind::Card)).await.unwrap();
    let shown = d.display.wait_display(WAIT, |x| matches!(x, fp::LaneDisplay::Receipt { .. })).await.unwrap();
    match shown.last() {
        Some(fp::LaneDisplay::Receipt { receipt_id, .. }) => receipt_id.to_string(),
        other => panic!("no receipt: {other:?}"),
    }
}

fn sales(store: &StoreFixture) -> Vec<(String, EventBody)> {
    let conn = rusqlite::Connection::open_with_flags(
        edge_agent::ledger::Ledger::path_in(&store.data),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = conn.prepare("SELECT idem_key, body FROM events WHERE kind = 'sale' ORDER BY seq").unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))).unwrap();
    rows.map(|r| {
        let (k, b) = r.unwrap();
        (k, EventBody::decode(&b).unwrap())
    })
    .collect()
}

/// The basket save follows the display update within a commit; wait for it like a customer
/// reaching for the next item would.
async fn wait_for_saved_lines(store: &StoreFixture, lane: &str, lines: usize) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let saved =
            store.reader().lane_basket(lane).unwrap().map(|b| edge_agent::lane::runtime::decode_basket(&b).unwrap());
        if saved.is_some_and(|b| b.lines.len() == lines) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "basket of {lane} never saved with {lines} lines");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn assert_verifies(store: &StoreFixture) {
    let out = store.storectl(&["ledger", "verify"]);
    assert!(out.status.success(), "ledger verify: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_products_and_a_weighed_item_paid_by_card() {
    let store = StoreFixture::new(&["lane-1"]);
    let daemon = store.start();
    let mut d = attach(&store, "lane-1").await;

    d.scanner.scan("4006381333931").await.unwrap(); // milk 1.19
    d.display.wait_display(WAIT, is_total(119)).await.unwrap();
    d.scanner.scan("96385074").await.unwrap(); // bread 2.50
    d.display.wait_display(WAIT, is_total(369)).await.unwrap();
    d.scanner.scan("036000291452").await.unwrap(); // eggs 3.29
    d.display.wait_display(WAIT, is_total(698)).await.unwrap();
    d.scanner.scan("10614141000415").await.unwrap(); // apples 2.99/kg
    d.display.wait_display(WAIT, is_message(fp::LaneMessageCode::WaitForStableWeight)).await.unwrap();
    d.scale.weigh(1234, 3).await.unwrap(); // 1.234 kg -> 3.68966 -> 3.69
    d.display.wait_display(WAIT, is_total(698 + 369)).await.unwrap();
    let receipt = pay(&mut d).await;
    daemon.stop();

    let sales = sales(&store);
    assert_eq!(sales.len(), 1);
    let (key, EventBody::Sale { total, lines, .. }) = &sales[0] else { panic!("not a sale") };
    assert!(key.starts_with(&format!("lane:{STORE}:lane-1:")) && key.ends_with(":1"), "{key}");
    assert_eq!(total.minor, 1067);
    assert_eq!(lines.len(), 4);
    assert!(lines.iter().all(|l| l.price.is_some()), "each line records the price version it was charged from");
    assert!(receipt.starts_with(&format!("{STORE}-")));
    assert_eq!(store.on_hand("MILK"), 99);
    assert_eq!(store.on_hand("APPLES"), 50_000 - 1234);
    assert_verifies(&store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bad_codes_double_scans_and_an_unplugged_scanner() {
    let store = StoreFixture::new(&["lane-1"]);
    let daemon = store.start();
    let mut d = attach(&store, "lane-1").await;

    // Line noise on the scanner and broken frames on the scale and display links.
    d.scanner.garbage(b"\x01\x02\xff#noise\r").await.unwrap();
    d.scale.garbage(b"\x13\x37garbage\x00").await.unwrap();
    d.display.send_truncated(fp::Body::LaneInput(fp::LaneInput::VoidBasket)).await.unwrap();
    d.display.garbage(b"\x00").await.unwrap();
    d.scanner.scan("4006381333931").await.unwrap();
    d.display.wait_display(WAIT, is_total(119)).await.unwrap();

    // A bad check digit and an unknown product: each its own message, basket unchanged.
    d.scanner.scan("4006381333932").await.unwrap();
    d.display.wait_display(WAIT, is_message(fp::LaneMessageCode::InvalidBarcode)).await.unwrap();
    d.scanner.scan("5901234123457").await.unwrap();
    d.display.wait_display(WAIT, is_message(fp::LaneMessageCode::UnknownProduct)).await.unwrap();

    // A double read inside the window counts once.
    d.scanner.double_scan("96385074").await.unwrap();
    d.display.wait_display(WAIT, is_total(369)).await.unwrap();

    // The scanner is unplugged mid-basket and plugged back in: the basket carries on.
    d.scanner.port.unplug();
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.scanner.port.replug().unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await; // the link's backoff finds it again
    d.scanner.scan("036000291452").await.unwrap();
    d.display.wait_display(WAIT, is_total(698)).await.unwrap();

    // A duplicated lane message (lost ack) is acted on once: void line 3, then the duplicate.
    d.display.send_duplicated(fp::Body::LaneInput(fp::LaneInput::VoidLine { line: 3 })).await.unwrap();
    d.display.wait_display(WAIT, is_total(369)).await.unwrap();

    pay(&mut d).await;
    // The technician's view: the lost scanner is one line naming the store, lane, device and
    // kind (journald gets the same fields as STORE_ID, LANE_ID, DEVICE_ID, DEVICE_KIND).
    let log = daemon.log();
    let lost: Vec<&String> = log.iter().filter(|l| l.contains("SERIAL_LOST")).collect();
    assert_eq!(lost.len(), 1, "one line for the state change: {lost:?}");
    for field in ["store_id=s1", "lane_id=lane-1", "device_id=lane-1-scanner", "device_kind=\"scanner\""] {
        assert!(lost[0].contains(field), "{field} missing from {}", lost[0]);
    }
    daemon.stop();
    let sales = sales(&store);
    assert_eq!(sales.len(), 1);
    let EventBody::Sale { total, .. } = &sales[0].1 else { panic!() };
    assert_eq!(total.minor, 369);
    assert_eq!((store.on_hand("MILK"), store.on_hand("BREAD"), store.on_hand("EGGS")), (99, 99, 100));
    assert_verifies(&store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_basket_keeps_it_and_a_retried_tender_sells_once() {
    let store = StoreFixture::new(&["lane-1"]);
    let daemon = store.start();
    let mut d = attach(&store, "lane-1").await;
    d.scanner.scan("4006381333931").await.unwrap();
    d.scanner.scan("96385074").await.unwrap();
    d.display.wait_display(WAIT, is_total(369)).await.unwrap();
    wait_for_saved_lines(&store, "lane-1", 2).await;
    daemon.kill(); // power cut mid-basket

    let daemon = store.start();
    // The devices notice nothing but a reopened port: they say HELLO again.
    d.display.inbox.clear();
    assert!(matches!(d.display.hello(WAIT).await.unwrap(), fp::Body::HelloAck(_)));
    d.display.wait_display(WAIT, is_total(369)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.scanner.scan("036000291452").await.unwrap();
    d.display.wait_display(WAIT, is_total(698)).await.unwrap();

    // Pay, and press pay again while the sale is being recorded.
    d.display.input(fp::LaneInput::Tender(fp::TenderKind::Cash)).await.unwrap();
    d.display.input(fp::LaneInput::Tender(fp::TenderKind::Cash)).await.unwrap();
    d.display.wait_display(WAIT, |x| matches!(x, fp::LaneDisplay::Receipt { .. })).await.unwrap();
    daemon.stop();

    let sales = sales(&store);
    assert_eq!(sales.len(), 1, "{sales:?}");
    assert_eq!(store.on_hand("MILK"), 99);
    assert_verifies(&store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_lanes_sell_the_same_sku_at_once() {
    let store = StoreFixture::new(&["lane-1", "lane-2"]);
    let daemon = store.start();
    let mut a = attach(&store, "lane-1").await;
    let mut b = attach(&store, "lane-2").await;
    a.scanner.scan("4006381333931").await.unwrap();
    b.scanner.scan("4006381333931").await.unwrap();
    a.display.wait_display(WAIT, is_total(119)).await.unwrap();
    b.display.wait_display(WAIT, is_total(119)).await.unwrap();
    let (ra, rb) = tokio::join!(pay(&mut a), pay(&mut b));
    assert_ne!(ra, rb);
    daemon.stop();
    assert_eq!(sales(&store).len(), 2);
    assert_eq!(store.on_hand("MILK"), 98);
    assert_verifies(&store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_display_link_drops_mid_basket_resumes_and_the_basket_is_voided_on_command() {
    let store = StoreFixture::new(&["lane-1"]);
    let daemon = store.start();
    let mut d = attach(&store, "lane-1").await;
    d.scanner.scan("4006381333931").await.unwrap();
    d.scanner.scan("96385074").await.unwrap();
    d.display.wait_display(WAIT, is_total(369)).await.unwrap();

    // The display loses power and comes back: it boots, says HELLO, and is redrawn.
    d.display.port.unplug();
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.display.port.replug().unwrap();
    d.display.reboot();
    d.display.inbox.clear();
    assert!(matches!(d.display.hello(WAIT).await.unwrap(), fp::Body::HelloAck(_)));
    let redraw = d.display.wait_display(WAIT, is_total(369)).await.unwrap();
    assert!(redraw.iter().filter(|x| matches!(x, fp::LaneDisplay::Line { .. })).count() >= 2, "{redraw:?}");

    // The customer gives up: the basket is voided and the next one starts empty.
    d.display.input(fp::LaneInput::VoidBasket).await.unwrap();
    d.display.wait_display(WAIT, |x| matches!(x, fp::LaneDisplay::Cleared)).await.unwrap();
    d.scanner.scan("036000291452").await.unwrap();
    d.display.wait_display(WAIT, is_total(329)).await.unwrap();
    pay(&mut d).await;
    daemon.stop();

    let sales = sales(&store);
    assert_eq!(sales.len(), 1);
    assert!(sales[0].0.ends_with(":2"), "the voided basket 1 sold nothing: {}", sales[0].0);
    assert_eq!((store.on_hand("MILK"), store.on_hand("EGGS")), (100, 99));
    assert_verifies(&store);
}
