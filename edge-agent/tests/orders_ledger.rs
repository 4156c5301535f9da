//! Online pickup orders in the store's ledger, through the writer handle (issue 7): orders
//! arrive with a sync page; a handover checks the pickup code and moves stock once; wrong codes,
//! cancelled, expired and unknown orders are refused with nothing written; till sales that eat
//! into promised units raise an alert naming the orders; the top-up policy keeps each SKU's
//! grant at its target from free stock only; own allocation rows reach the push page; and
//! `ledger verify` replays all of it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use edge_agent::ledger::*;
use edge_agent::orders::{OnlinePolicy, PickupStatus, StatusFilter};
use shared::orders::{pickup_code_digest, OrderLine};
use shared::sync::{Cursor, Rows};
use shared::*;

const CODE: &str = "246810";
/// The test clock starts here (2023-11-14); orders expire a day later unless a test says so.
const T0: u64 = 1_700_000_000_000;
const DAY: i64 = 86_400_000;

fn eur(cents: i64) -> Money {
    Money::new(cents, Currency::new("EUR").unwrap())
}
fn sku(s: &str) -> Sku {
    Sku::new(s).unwrap()
}
fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::new(s).unwrap()
}
fn store() -> StoreId {
    StoreId::new("s1").unwrap()
}
fn order(id: &str) -> OrderId {
    OrderId::new(id).unwrap()
}
fn escrow_key(s: &str) -> EscrowKey {
    EscrowKey { store: store(), sku: sku(s) }
}

/// A store with a settable clock and an online policy.
struct Store {
    h: LedgerHandle,
    w: WriterThread,
    reader: LedgerReader,
    clock: Arc<AtomicU64>,
    /// Pages sent so far (each page's cursor moves on, so each is a new page).
    pages: u64,
}

fn policy(text: &str) -> OnlinePolicy {
    let p: OnlinePolicy = toml::from_str(text).unwrap();
    p.validate().unwrap();
    p
}

impl Store {
    fn open(dir: &Path, online: OnlinePolicy) -> Store {
        let clock = Arc::new(AtomicU64::new(T0));
        let mut opts = LedgerOptions::new(store(), Currency::new("EUR").unwrap());
        let c = clock.clone();
        opts.clock = Arc::new(move || c.load(Ordering::SeqCst));
        opts.online = online;
        let (h, w) = Ledger::open(dir, &opts).unwrap().start_writer(64).unwrap();
        let reader = LedgerReader::open(dir).unwrap();
        Store { h, w, reader, clock, pages: 0 }
    }

    fn now(&self) -> i64 {
        self.clock.load(Ordering::SeqCst) as i64
    }

    /// One cloud answer: acknowledges everything pushed so far and merges `rows` as a page.
    async fn sync(&mut self, rows: Rows) -> Applied {
        let from = Cursor { chain: 0, store: self.pages };
        self.pages += 1;
        let to = Cursor { chain: 0, store: self.pages };
        let pushed = self.reader.push_page(1_000).unwrap().map_or(0, |p| p.to_version);
        let pushed = pushed.max(self.reader.sync_position().unwrap().pushed_version);
        let ack = SyncAck {
            acked_version: pushed,
            pushed_to: pushed,
            cursor: to,
            cloud_time: HlcStamp { wall_ms: self.clock.load(Ordering::SeqCst), logical: 0, actor: ActorId::cloud() },
            caught_up: true,
        };
        self.h.apply_sync(ack, Some(MergedPage { from, rows, refused: vec![] })).await.unwrap().unwrap()
    }

    async fn submit(&self, k: &str, command: Command) -> Result<Applied, SubmitError> {
        self.h.submit(key(k), command).await
    }

    async fn receive(&self, s: &str, quantity: i64) {
        let k = format!("rcv-{s}-{}", self.reader.event_count().unwrap());
        self.submit(&k, Command::Receipt { sku: sku(s), quantity, reference: "DN".into() }).await.unwrap();
    }

    async fn sell(&self, s: &str, quantity: i64) {
        let lines = vec![SaleLine { sku: sku(s), quantity, line_total: eur(100 * quantity), price: None }];
        let k = format!("sale-{s}-{}", self.reader.event_count().unwrap());
        self.submit(&k, Command::Sale { lines, tender: Tender::Card }).await.unwrap();
    }

    async fn handover(&self, k: &str, id: &str, code: &str) -> Result<Applied, SubmitError> {
        self.submit(k, Command::Handover { order: order(id), code: code.into() }).await
    }

    fn on_hand(&self, s: &str) -> i64 {
        self.reader.stock(&sku(s)).unwrap().on_hand
    }

    fn status(&self, id: &str) -> Option<PickupStatus> {
        self.reader.order(&order(id), self.now()).unwrap().map(|o| o.status)
    }

    fn online(&self, s: &str) -> edge_agent::orders::OnlineRow {
        self.reader.online_status(Some(&sku(s)), None).unwrap().remove(0)
    }

    fn pushed_escrow(&self) -> Vec<EscrowRow> {
        self.reader.push_page(1_000).unwrap().map(|p| p.rows.escrow).unwrap_or_default()
    }

    fn close(self) -> LedgerReader {
        drop(self.h);
        self.w.join();
        self.reader
    }
}

fn header(id: &str, lines: &[(&str, u64)], expires_at_ms: i64) -> OrderHeader {
    let order = order(id);
    OrderHeader {
        pickup_code_digest: pickup_code_digest(&order, CODE),
        order,
        store: store(),
        customer_ref: format!("customer of {id}"),
        created_at_ms: T0 as i64 - 1_000,
        expires_at_ms,
        lines: lines.iter().map(|(s, units)| OrderLine { sku: sku(s), units: *units }).collect(),
    }
}

fn reservation(s: &str, id: &str, units: u64, seq: u64, cancelled: bool) -> EscrowRow {
    EscrowRow::Reservation { key: escrow_key(s), order: order(id), units, seq, cancelled }
}

/// An order of one line and its reservation, as the cloud sends them together.
fn new_order(id: &str, s: &str, units: u64, seq: u64) -> Rows {
    Rows {
        orders: vec![header(id, &[(s, units)], T0 as i64 + DAY)],
        escrow: vec![reservation(s, id, units, seq, false)],
        ..Rows::default()
    }
}

fn refused(result: Result<Applied, SubmitError>) -> String {
    match result {
        Err(SubmitError::Rejected(r)) => r.0,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

const MILK_4: &str = "enabled = true\ntarget = 4\nsafety_stock = 2\n";

#[tokio::test]
async fn an_order_from_a_sync_page_is_handed_over_once_and_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), policy(MILK_4));
    s.receive("MILK", 10).await;
    assert!(s.pushed_escrow().is_empty(), "no grant before the ledger caught up with the cloud");

    // The first answer: caught up, so the store grants its target (10 on hand, 2 safety).
    s.sync(Rows::default()).await;
    assert_eq!(s.online("MILK").granted, 4);
    assert_eq!(s.pushed_escrow(), vec![EscrowRow::Granted { key: escrow_key("MILK"), granted: 4 }]);

    // W-1 arrives (2 units): listed, and the grant is topped back up to 4 rights.
    s.sync(new_order("W-1", "MILK", 2, 1)).await;
    let open = s.reader.orders(StatusFilter::Open, s.now()).unwrap();
    assert_eq!(open.orders.iter().map(|o| o.order.as_str()).collect::<Vec<_>>(), ["W-1"]);
    assert_eq!(open.orders[0].status, PickupStatus::Reserved);
    assert_eq!(open.orders[0].customer_ref, "customer of W-1");
    let row = s.online("MILK");
    assert_eq!((row.granted, row.reserved, row.promised, row.rights), (6, 2, 2, 4));

    // The right code: 2 units leave the store's own slot, once; the order is fulfilled.
    let done = s.handover("counter-1", "W-1", CODE).await.unwrap();
    assert!(matches!(&done.body, EventBody::Handover { lines, .. }
        if *lines == vec![OrderLine { sku: sku("MILK"), units: 2 }]));
    assert_eq!(s.on_hand("MILK"), 8);
    assert_eq!(s.status("W-1"), Some(PickupStatus::Fulfilled));
    assert!(
        s.pushed_escrow().contains(&EscrowRow::Fulfilled { key: escrow_key("MILK"), order: order("W-1") }),
        "the cloud learns the handover at the next push"
    );
    assert_eq!(s.h.stats().handovers, 1);

    // Again, by someone else at the counter: a clear refusal naming the time, no movement.
    let events = s.reader.event_count().unwrap();
    let again = refused(s.handover("counter-2", "W-1", CODE).await);
    assert!(again.starts_with("order W-1 was already handed over at 2023-11-14 22:13:20 UTC"), "{again}");
    assert_eq!(s.on_hand("MILK"), 8);
    assert_eq!(s.reader.event_count().unwrap(), events);
    // The same request retried (same key): its first result, nothing new.
    let replay = s.handover("counter-1", "W-1", CODE).await.unwrap();
    assert!(replay.replayed);
    assert_eq!((replay.seq, s.on_hand("MILK")), (done.seq, 8));

    let reader = s.close();
    let report = reader.verify().unwrap().unwrap();
    assert_eq!(report.allocation_rows_checked, 2, "MILK's grant and W-1's handover: {report:?}");
}

#[tokio::test]
async fn wrong_code_cancelled_expired_and_unknown_orders_are_refused_with_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), OnlinePolicy::default());
    s.receive("MILK", 10).await;
    s.receive("EGGS", 10).await;
    let mut rows = new_order("W-1", "MILK", 2, 1);
    // W-2: two lines, one of them cancelled by HQ while this store was offline.
    rows.orders.push(header("W-2", &[("MILK", 1), ("EGGS", 2)], T0 as i64 + DAY));
    rows.escrow.push(reservation("MILK", "W-2", 1, 2, false));
    rows.escrow.push(reservation("EGGS", "W-2", 2, 1, true));
    // W-3: its pickup deadline passes before the customer comes.
    rows.orders.push(header("W-3", &[("EGGS", 1)], T0 as i64 + 60_000));
    rows.escrow.push(reservation("EGGS", "W-3", 1, 2, false));
    s.sync(rows).await;
    s.clock.store(T0 + 120_000, Ordering::SeqCst);
    let events = s.reader.event_count().unwrap();
    let outbox = s.reader.outbox_depth().unwrap();
    assert_eq!(outbox, 0, "everything was acknowledged");

    let wrong = refused(s.handover("k1", "W-1", "135790").await);
    assert!(wrong.starts_with("wrong pickup code for order W-1"), "{wrong}");
    let format = refused(s.handover("k2", "W-1", "12a4").await);
    assert!(format.starts_with("order W-1: a pickup code is 6 digits and the code given is not one"), "{format}");
    assert!(!format.contains("12a4"), "a mistyped code is never repeated: {format}");
    let cancelled = refused(s.handover("k3", "W-2", CODE).await);
    assert!(cancelled.starts_with("order W-2 was cancelled by HQ: do not hand it over"), "{cancelled}");
    let expired = refused(s.handover("k4", "W-3", CODE).await);
    assert!(expired.starts_with("order W-3 expired at 2023-11-14 22:14:20 UTC"), "{expired}");
    let unknown = refused(s.handover("k5", "W-9", CODE).await);
    assert_eq!(unknown, "order W-9 is not synced to this store yet; run `storectl sync now`, then retry");

    assert_eq!((s.on_hand("MILK"), s.on_hand("EGGS")), (10, 10), "no stock moved");
    assert_eq!(s.reader.event_count().unwrap(), events, "nothing recorded");
    assert_eq!(s.reader.outbox_depth().unwrap(), 0, "nothing to push");
    assert_eq!(s.reader.push_page(1_000).unwrap(), None);
    assert_eq!(s.status("W-2"), Some(PickupStatus::Cancelled));
    assert_eq!(s.status("W-3"), Some(PickupStatus::Expired));
    assert_eq!(s.status("W-1"), Some(PickupStatus::Reserved));
    let open: Vec<String> =
        s.reader.orders(StatusFilter::Open, s.now()).unwrap().orders.iter().map(|o| o.order.to_string()).collect();
    assert_eq!(open, ["W-1", "W-3"], "an expired order is open until HQ cancels it");

    // A refused handover can be retried with the same key once the problem is fixed.
    let ok = s.handover("k1", "W-1", CODE).await.unwrap();
    assert!(!ok.replayed);
    assert_eq!(s.on_hand("MILK"), 8);
    s.close().verify().unwrap().unwrap();
}

#[tokio::test]
async fn picks_are_marked_once_and_refused_when_the_order_cannot_be_collected() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), OnlinePolicy::default());
    s.receive("MILK", 5).await;
    let mut rows = new_order("W-1", "MILK", 2, 1);
    rows.orders.push(header("W-2", &[("MILK", 1)], T0 as i64 + DAY));
    rows.escrow.push(reservation("MILK", "W-2", 1, 2, true));
    s.sync(rows).await;

    let picked = s.submit("pick-1", Command::Pick { order: order("W-1") }).await.unwrap();
    assert!(matches!(picked.body, EventBody::Pick { at_ms, .. } if at_ms == T0 as i64));
    assert_eq!(s.status("W-1"), Some(PickupStatus::Picked));
    let again = refused(s.submit("pick-2", Command::Pick { order: order("W-1") }).await);
    assert_eq!(again, "order W-1 was already picked at 2023-11-14 22:13:20 UTC; nothing changed");
    let cancelled = refused(s.submit("pick-3", Command::Pick { order: order("W-2") }).await);
    assert!(cancelled.contains("cancelled by HQ"), "{cancelled}");
    assert_eq!(s.on_hand("MILK"), 5, "a pick moves no stock");

    // HQ cancels W-1 after it was picked: staff are told to put the goods back.
    s.sync(Rows { escrow: vec![reservation("MILK", "W-1", 2, 1, true)], ..Rows::default() }).await;
    let back = refused(s.handover("h", "W-1", CODE).await);
    assert!(back.contains("put the goods back on the shelf"), "{back}");
    s.close().verify().unwrap().unwrap();
}

#[tokio::test]
async fn a_sale_that_eats_into_promised_units_raises_an_alert_naming_the_orders() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), OnlinePolicy::default());
    let mut alerts = s.h.subscribe_alerts();
    s.receive("MILK", 10).await;
    // W-1 (3, reserved first) and W-2 (4): 7 promised of 10 on hand.
    let mut rows = new_order("W-1", "MILK", 3, 1);
    let w2 = new_order("W-2", "MILK", 4, 2);
    rows.orders.extend(w2.orders);
    rows.escrow.extend(w2.escrow);
    s.sync(rows).await;
    assert!(s.reader.orders_at_risk(s.now()).unwrap().orders.is_empty());

    // The till sells 5 (it cannot refuse): 5 left cover W-1, not W-2.
    s.sell("MILK", 5).await;
    let alert = alerts.try_recv().expect("an alert at once, with the commit");
    assert_eq!((alert.sku.as_str(), alert.on_hand, alert.promised, alert.shortfall), ("MILK", 5, 7, 2));
    assert_eq!(alert.orders, vec![order("W-2")]);
    let report = s.reader.orders_at_risk(s.now()).unwrap();
    assert_eq!(report.orders.iter().map(|o| o.order.as_str()).collect::<Vec<_>>(), ["W-2"]);
    assert_eq!(report.orders[0].customer_ref, "customer of W-2");
    assert_eq!((report.skus[0].shortfall, report.skus[0].promised), (2, 7));
    let stats = s.h.stats();
    assert_eq!((stats.shortage_alerts, stats.orders_at_risk), (1, 1));

    // Another sale leaves the same order at risk: no second alert. The next uncovers W-1 too.
    s.sell("MILK", 1).await;
    assert!(alerts.try_recv().is_err(), "the set of orders at risk did not grow");
    s.sell("MILK", 2).await;
    let alert = alerts.try_recv().unwrap();
    assert_eq!(alert.orders, vec![order("W-1"), order("W-2")]);
    assert_eq!(s.h.stats().orders_at_risk, 2);

    // A restart knows which orders are at risk without alerting again for them.
    let reader = s.close();
    assert_eq!(reader.orders_at_risk(T0 as i64).unwrap().orders.len(), 2);
    let s = Store::open(dir.path(), OnlinePolicy::default());
    let mut alerts = s.h.subscribe_alerts();
    s.sell("MILK", 1).await;
    assert!(alerts.try_recv().is_err());
    assert_eq!(s.h.stats().orders_at_risk, 2);

    // Goods arrive: every order is covered again.
    s.receive("MILK", 20).await;
    assert_eq!(s.h.stats().orders_at_risk, 0);
    assert!(s.reader.orders_at_risk(s.now()).unwrap().skus.is_empty());
    s.close().verify().unwrap().unwrap();
}

#[tokio::test]
async fn top_up_keeps_the_target_from_free_stock_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = policy(
        r#"
        enabled = true
        target = 0
        safety_stock = 1
        [[rule]]
        sku = "MILK"
        target = 5
        safety_stock = 3
        [[rule]]
        category = "dairy"
        target = 10
        "#,
    );
    let mut s = Store::open(dir.path(), p);
    s.receive("MILK", 6).await;
    s.receive("EGGS", 20).await;
    s.receive("BREAD", 20).await;
    let dairy = CatalogField::Category("dairy".into());
    s.submit("cat-eggs", Command::CatalogChange { sku: sku("EGGS"), field: dairy.clone() }).await.unwrap();
    assert!(s.pushed_escrow().is_empty());

    // Caught up: the sweep tops every covered SKU up. MILK: 6 on hand - 3 safety = 3 free (of
    // 5 wanted); EGGS (dairy): 10 of 19 free; BREAD: no rule, default target 0.
    s.sync(Rows::default()).await;
    assert_eq!((s.online("MILK").granted, s.online("EGGS").granted), (3, 10));
    assert!(s.reader.online_status(Some(&sku("BREAD")), None).unwrap()[0].granted == 0);

    // More milk: topped up to the target, no further.
    s.receive("MILK", 10).await;
    let milk = s.online("MILK");
    assert_eq!((milk.granted, milk.rights), (5, 5));
    s.receive("MILK", 10).await;
    assert_eq!(s.online("MILK").granted, 5);

    // The cloud reserves 4 and the till sells almost everything: the store grants only what is
    // free, here nothing, whatever the target wants.
    s.sync(new_order("W-1", "MILK", 4, 1)).await;
    let milk = s.online("MILK");
    assert_eq!((milk.granted, milk.rights, milk.promised), (9, 5, 4), "26 on hand: 4 more were free");
    s.sell("MILK", 20).await;
    s.sync(new_order("W-2", "MILK", 5, 2)).await;
    let milk = s.online("MILK");
    assert_eq!((milk.on_hand, milk.granted, milk.rights), (6, 9, 0));
    let with_policy = s.reader.online_status(Some(&sku("MILK")), Some(s.h.online_policy())).unwrap().remove(0);
    assert_eq!((with_policy.target, with_policy.safety_stock), (Some(5), Some(3)));
    assert_eq!(with_policy.free, Some(6 - 9 - 3), "never granted: the free units are negative");

    // Every grant is an event whose numbers show it was free stock.
    let reader = s.close();
    let mut grants = Vec::new();
    reader
        .for_each_event(|e| -> Result<(), LedgerError> {
            if let EventBody::Grant { sku, units, on_hand, committed, safety_stock, .. } = e.body {
                assert!(i128::from(units) <= i128::from(on_hand) - i128::from(committed) - i128::from(safety_stock));
                grants.push((sku.to_string(), units));
            }
            Ok(())
        })
        .unwrap();
    let expected: Vec<(String, u64)> =
        [("EGGS", 10), ("MILK", 3), ("MILK", 2), ("MILK", 4)].iter().map(|(s, u)| (s.to_string(), *u)).collect();
    assert_eq!(grants, expected);
    reader.verify().unwrap().unwrap();
}

#[tokio::test]
async fn conflicting_headers_and_reservations_are_refused_and_named_and_the_rest_merges() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), OnlinePolicy::default());
    s.receive("MILK", 10).await;
    s.sync(new_order("W-1", "MILK", 2, 1)).await;

    let mut changed = header("W-1", &[("MILK", 3)], T0 as i64 + DAY);
    changed.customer_ref = "someone else".into();
    let mut other_store = header("W-5", &[("MILK", 1)], T0 as i64 + DAY);
    other_store.store = StoreId::new("s2").unwrap();
    let rows = Rows {
        orders: vec![changed, other_store, header("W-2", &[("MILK", 1)], T0 as i64 + DAY)],
        escrow: vec![
            reservation("MILK", "W-1", 3, 1, false),
            EscrowRow::Released {
                key: EscrowKey { store: StoreId::new("s2").unwrap(), sku: sku("MILK") },
                released: 1,
            },
            reservation("MILK", "W-2", 1, 2, false),
            // The cancellation of W-1 is fine: only its size and place may not change.
            reservation("MILK", "W-1", 2, 1, true),
        ],
        ..Rows::default()
    };
    let applied = s.sync(rows).await;
    let EventBody::SyncMerge { rows, refused, .. } = &applied.body else { panic!("{applied:?}") };
    assert_eq!(refused.len(), 4, "{refused:?}");
    assert!(refused[0].starts_with("order W-1: the replicas hold different headers"), "{refused:?}");
    assert!(refused[1].contains("order W-5 of store s2"), "{refused:?}");
    assert!(refused[2].contains("reservation W-1") && refused[2].contains("reservation rows disagree"), "{refused:?}");
    // A page handed to the writer directly (not screened by the sync task) is screened again.
    assert!(refused[3].contains("s2/MILK released: this is store s1"), "{refused:?}");
    assert_eq!((rows.orders.len(), rows.escrow.len()), (1, 2), "W-2 and W-1's cancellation merged");
    assert_eq!(s.status("W-2"), Some(PickupStatus::Reserved));
    assert_eq!(s.status("W-1"), Some(PickupStatus::Cancelled));
    let w1 = s.reader.order(&order("W-1"), s.now()).unwrap().unwrap();
    assert_eq!((w1.customer_ref.as_str(), w1.lines[0].units), ("customer of W-1", 2), "the held header stays");
    s.close().verify().unwrap().unwrap();
}

#[tokio::test]
async fn verify_names_an_allocation_row_that_no_event_explains() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), policy(MILK_4));
    s.receive("MILK", 10).await;
    s.sync(Rows::default()).await;
    s.close().verify().unwrap().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join(LEDGER_FILE)).unwrap();
    conn.execute("UPDATE escrow SET units = 40 WHERE kind = 'granted'", []).unwrap();
    let reader = LedgerReader::open(dir.path()).unwrap();
    let broken = reader.verify().unwrap().unwrap_err();
    assert_eq!(broken.detail, "online allocation granted of MILK does not match the grant events");
}

#[tokio::test]
async fn a_restored_ledger_neither_grants_nor_hands_over_before_it_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), policy(MILK_4));
    s.receive("MILK", 10).await;
    s.sync(Rows::default()).await;
    s.sync(new_order("W-1", "MILK", 2, 1)).await;
    assert_eq!(s.online("MILK").granted, 6);
    let lost = s.close();
    let restored = tempfile::tempdir().unwrap();
    lost.backup_to(&restored.path().join(LEDGER_FILE)).unwrap();
    let lost_actor = lost.actor().unwrap();
    drop((lost, dir));

    // Restored from a backup (`storectl backup`'s copy): the cloud may have cancelled W-1 (or
    // another store handed it over). It writes as a new actor from here on.
    let mut s = Store::open(restored.path(), policy(MILK_4));
    assert_ne!(s.reader.actor().unwrap(), lost_actor);
    let events = s.reader.event_count().unwrap();
    let wait = refused(s.handover("h1", "W-1", CODE).await);
    assert_eq!(
        wait,
        "order W-1: this ledger is still catching up with the cloud; run `storectl sync now` and retry; nothing \
         was taken from stock"
    );
    let wait = refused(s.submit("p1", Command::Pick { order: order("W-1") }).await);
    assert!(wait.contains("still catching up with the cloud"), "{wait}");
    s.receive("MILK", 10).await;
    assert_eq!(s.online("MILK").granted, 6, "no grant before the first complete sync");
    assert_eq!((s.on_hand("MILK"), s.reader.event_count().unwrap()), (20, events + 1), "only the receipt");

    // Caught up: the same request goes through, and the top-up resumes.
    s.sync(Rows::default()).await;
    assert!(s.handover("h1", "W-1", CODE).await.is_ok());
    assert_eq!(s.on_hand("MILK"), 18);
    // The grants of the lost ledger's actor and the handover of the new one replay alike.
    s.close().verify().unwrap().unwrap();
}

#[tokio::test]
async fn one_handed_over_line_means_the_order_was_handed_over() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), OnlinePolicy::default());
    s.receive("MILK", 10).await;
    s.receive("EGGS", 10).await;
    let rows = Rows {
        orders: vec![header("W-1", &[("MILK", 2), ("EGGS", 1)], T0 as i64 + DAY)],
        escrow: vec![
            reservation("MILK", "W-1", 2, 1, false),
            reservation("EGGS", "W-1", 1, 1, false),
            // Its handover of MILK comes back from the cloud (this ledger was rebuilt); a partial
            // page has not brought EGGS's yet. The store handed both over in one event.
            EscrowRow::Fulfilled { key: escrow_key("MILK"), order: order("W-1") },
        ],
        ..Rows::default()
    };
    s.sync(rows).await;
    let events = s.reader.event_count().unwrap();
    let again = refused(s.handover("h1", "W-1", CODE).await);
    assert!(again.starts_with("order W-1 was already handed over at an earlier time"), "{again}");
    let pick = refused(s.submit("p1", Command::Pick { order: order("W-1") }).await);
    assert!(pick.starts_with("order W-1 was already handed over"), "{pick}");
    assert_eq!((s.on_hand("MILK"), s.on_hand("EGGS")), (10, 10), "EGGS did not leave a second time");
    assert_eq!(s.reader.event_count().unwrap(), events);
    s.close();
}

#[tokio::test]
async fn a_key_reused_for_another_command_is_refused_and_a_retry_gets_its_first_result() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), OnlinePolicy::default());
    s.receive("MILK", 10).await;
    let mut rows = new_order("W-1", "MILK", 2, 1);
    let w2 = new_order("W-2", "MILK", 1, 2);
    rows.orders.extend(w2.orders);
    rows.escrow.extend(w2.escrow);
    s.sync(rows).await;

    let picked = s.submit("k", Command::Pick { order: order("W-1") }).await.unwrap();
    let handed = s.handover("h", "W-1", CODE).await.unwrap();
    let events = s.reader.event_count().unwrap();

    // The pick's key for W-1's handover, the handover's key for W-2's: refused, nothing moved.
    let reused = refused(s.handover("k", "W-1", CODE).await);
    assert_eq!(reused, format!("idempotency key k already names event {} (pick of W-1); use a new key", picked.seq));
    let reused = refused(s.handover("h", "W-2", CODE).await);
    assert_eq!(
        reused,
        format!("idempotency key h already names event {} (handover of W-1); use a new key", handed.seq)
    );
    let reused = refused(s.submit("h", Command::Pick { order: order("W-2") }).await);
    assert!(reused.contains("(handover of W-1); use a new key"), "{reused}");
    let reused = refused(s.submit("k", Command::Count { sku: sku("MILK"), counted: 3 }).await);
    assert!(reused.contains("(pick of W-1); use a new key"), "{reused}");
    assert_eq!((s.on_hand("MILK"), s.reader.event_count().unwrap()), (8, events));

    // Genuine retries (the same command, refused today or not) get their first result.
    let again = s.submit("k", Command::Pick { order: order("W-1") }).await.unwrap();
    assert!(again.replayed && again.seq == picked.seq);
    let again = s.handover("h", "W-1", CODE).await.unwrap();
    assert!(again.replayed && again.seq == handed.seq);
    assert_eq!(s.on_hand("MILK"), 8);
    s.close().verify().unwrap().unwrap();
}

/// Opens the ledger file as a plain SQLite connection (a test inspecting the tables).
fn sqlite(dir: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.join(LEDGER_FILE)).unwrap()
}

#[tokio::test]
async fn picked_orders_keep_their_cover_first_and_expired_ones_lose_it_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), OnlinePolicy::default());
    let mut alerts = s.h.subscribe_alerts();
    s.receive("MILK", 10).await;
    // W-1 reserved first but expires in a minute; W-2; W-3 reserved last but picked. Also
    // W-4, handed over, and W-5, cancelled: history, not waiting.
    let mut rows = Rows::default();
    for (id, seq, expires) in [("W-1", 1, T0 as i64 + 60_000), ("W-2", 2, T0 as i64 + DAY), ("W-3", 3, T0 as i64 + DAY)]
    {
        rows.orders.push(header(id, &[("MILK", 3)], expires));
        rows.escrow.push(reservation("MILK", id, 3, seq, false));
    }
    rows.orders.push(header("W-4", &[("MILK", 1)], T0 as i64 + DAY));
    rows.escrow.push(reservation("MILK", "W-4", 1, 4, false));
    rows.orders.push(header("W-5", &[("MILK", 5)], T0 as i64 + DAY));
    rows.escrow.push(reservation("MILK", "W-5", 5, 5, true));
    s.sync(rows).await;
    s.handover("h4", "W-4", CODE).await.unwrap();
    s.submit("p3", Command::Pick { order: order("W-3") }).await.unwrap();
    s.clock.store(T0 + 120_000, Ordering::SeqCst);
    assert!(alerts.try_recv().is_err(), "10 on hand covered the 10 promised, then 9 the 9");

    // 6 left: the picked W-3 and W-2 keep theirs; the expired W-1 (reserved first) loses it.
    s.sell("MILK", 3).await;
    let alert = alerts.try_recv().unwrap();
    assert_eq!((alert.on_hand, alert.promised, alert.shortfall), (6, 9, 3));
    assert_eq!(alert.orders, vec![order("W-1")]);
    assert_eq!(s.reader.orders_at_risk(s.now()).unwrap().skus[0].orders, vec![order("W-1")]);

    // 3 left: only the picked W-3 keeps its cover.
    s.sell("MILK", 3).await;
    assert_eq!(alerts.try_recv().unwrap().orders, vec![order("W-1"), order("W-2")]);

    // The writer's counters (read without the SKU's history) agree with the whole escrow.
    let conn = sqlite(dir.path());
    let whole = allocation::load_escrow(&conn, &store(), &sku("MILK")).unwrap().totals();
    let kept = allocation::totals(&conn, &sku("MILK")).unwrap();
    assert_eq!((kept.granted, kept.released, kept.reserved, kept.promised), (0, 0, 15, 9));
    assert_eq!((whole.reserved, whole.promised), (kept.reserved, kept.promised));

    // A restart ranks the same way (as of the ledger's time, never behind its last stamp).
    drop(conn);
    let reader = s.close();
    let before = reader.orders_at_risk(T0 as i64 + 120_000).unwrap();
    drop(reader);
    let s = Store::open(dir.path(), OnlinePolicy::default());
    assert_eq!(s.reader.orders_at_risk(T0 as i64 + 120_000).unwrap(), before);
    // Anything through the writer's queue runs after its start (which sets the gauge).
    s.h.save_basket("lane-1", None).await.unwrap();
    assert_eq!(s.h.stats().orders_at_risk, 2);
    s.close().verify().unwrap().unwrap();
}

#[tokio::test]
async fn an_order_past_its_deadline_stays_expired_when_the_clock_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), OnlinePolicy::default());
    s.receive("MILK", 10).await;
    s.sync(new_order("W-1", "MILK", 2, 1)).await;
    // Two days later something is recorded; then the RTC battery dies and the clock restarts
    // at an earlier time, before W-1's deadline.
    s.clock.store(T0 + 2 * DAY as u64, Ordering::SeqCst);
    s.receive("MILK", 1).await;
    s.clock.store(T0, Ordering::SeqCst);
    let expired = refused(s.handover("h1", "W-1", CODE).await);
    assert!(expired.starts_with("order W-1 expired at 2023-11-15 22:13:20 UTC"), "{expired}");
    assert_eq!(s.on_hand("MILK"), 11);
    s.close();
}

#[tokio::test]
async fn a_reservation_this_store_refused_is_named_instead_of_sync_and_retry() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), OnlinePolicy::default());
    s.receive("MILK", 10).await;
    // The header arrives, its reservation does not merge (a broken row: zero units).
    let rows = Rows {
        orders: vec![header("W-1", &[("MILK", 2)], T0 as i64 + DAY)],
        escrow: vec![reservation("MILK", "W-1", 0, 1, false)],
        ..Rows::default()
    };
    let merged = s.sync(rows).await;
    let EventBody::SyncMerge { refused: page_refused, .. } = &merged.body else { panic!("{merged:?}") };
    assert_eq!(page_refused.len(), 1, "{page_refused:?}");
    let msg = refused(s.handover("h1", "W-1", CODE).await);
    assert!(
        msg.starts_with(&format!(
            "order W-1: its reservation of MILK was refused by this store at sync (event {}: ",
            merged.seq
        )),
        "{msg}"
    );
    assert!(msg.contains("syncing again will not change that: ask HQ to check the order"), "{msg}");
    // A reservation that simply has not arrived yet still says to sync.
    s.sync(Rows { orders: vec![header("W-2", &[("MILK", 1)], T0 as i64 + DAY)], ..Rows::default() }).await;
    let msg = refused(s.handover("h2", "W-2", CODE).await);
    assert!(msg.contains("has not reached this store yet; run `storectl sync now`"), "{msg}");
    assert_eq!(s.on_hand("MILK"), 10);
    s.close();
}
