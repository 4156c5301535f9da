//! The ledger as a library: durability contract, idempotency, counts as observations, the
//! clock across restarts, and refusal of files that are not this store's ledger.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use edge_agent::ledger::*;
use shared::*;

fn eur(cents: i64) -> Money {
    Money::new(cents, Currency::new("EUR").unwrap())
}
fn sku(s: &str) -> Sku {
    Sku::new(s).unwrap()
}
fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::new(s).unwrap()
}
fn opts(store: &str) -> LedgerOptions {
    LedgerOptions::new(StoreId::new(store).unwrap(), Currency::new("EUR").unwrap())
}
fn sale(s: &str, qty: i64) -> Command {
    Command::Sale {
        lines: vec![SaleLine { sku: sku(s), quantity: qty, line_total: eur(100 * qty), price: None }],
        tender: Tender::Card,
    }
}
fn start(dir: &Path, o: &LedgerOptions) -> (LedgerHandle, WriterThread) {
    Ledger::open(dir, o).unwrap().start_writer(64).unwrap()
}

#[test]
fn a_sale_is_durable_stock_moves_and_a_replay_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w) = start(dir.path(), &opts("s1"));
    h.blocking_submit(key("rcv-1"), Command::Receipt { sku: sku("A"), quantity: 10, reference: "DN-1".into() })
        .unwrap();
    let first = h.blocking_submit(key("lane1:basket7"), sale("A", 3)).unwrap();
    assert!(!first.replayed);
    let again = h.blocking_submit(key("lane1:basket7"), sale("A", 3)).unwrap();
    assert!(again.replayed);
    assert_eq!((again.seq, &again.stamp, &again.body), (first.seq, &first.stamp, &first.body));
    drop(h);
    w.join();

    let r = LedgerReader::open(dir.path()).unwrap();
    assert_eq!(r.stock(&sku("A")).unwrap().on_hand, 7);
    assert_eq!(r.event_count().unwrap(), 2);
    assert_eq!(r.outbox_depth().unwrap(), 1, "one own stock slot changed since the last push");
    let report = r.verify().unwrap().unwrap();
    assert_eq!(report.events, 2);
}

#[test]
fn a_count_records_the_movement_from_what_it_saw() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w) = start(dir.path(), &opts("s1"));
    h.blocking_submit(key("rcv"), Command::Receipt { sku: sku("A"), quantity: 10, reference: String::new() }).unwrap();
    h.blocking_submit(key("sale"), sale("A", 2)).unwrap();
    let counted = h.blocking_submit(key("count-1"), Command::Count { sku: sku("A"), counted: 5 }).unwrap();
    assert_eq!(counted.body, EventBody::Count { sku: sku("A"), counted: 5, seen: 8, movement: -3 });
    // A replay of the count after more sales returns the first result, not a new movement.
    h.blocking_submit(key("sale2"), sale("A", 1)).unwrap();
    let replay = h.blocking_submit(key("count-1"), Command::Count { sku: sku("A"), counted: 5 }).unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.body, counted.body);
    drop(h);
    w.join();
    let r = LedgerReader::open(dir.path()).unwrap();
    assert_eq!(r.stock(&sku("A")).unwrap().on_hand, 4);
    assert!(r.verify().unwrap().is_ok());
}

#[test]
fn bad_commands_are_refused_and_the_batch_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w) = start(dir.path(), &opts("s1"));
    let negative = Command::PriceChange {
        key: PriceKey { sku: sku("A"), scope: PriceScope::Chain, slot: PriceSlot::Regular },
        value: Some(PriceValue { amount: eur(-199), window: None }),
    };
    let err = h.blocking_submit(key("p1"), negative).unwrap_err();
    assert_eq!(err.to_string(), "command refused: price of A must not be negative: -1.99 EUR");
    let err = h.blocking_submit(key("s0"), sale("A", 0)).unwrap_err();
    assert!(err.to_string().contains("quantity must be positive"), "{err}");
    h.blocking_submit(key("ok"), sale("A", 1)).unwrap();
    drop(h);
    w.join();
    let r = LedgerReader::open(dir.path()).unwrap();
    assert_eq!(r.event_count().unwrap(), 1, "refused commands leave no event");
    assert!(r.event_by_key("p1").unwrap().is_none());
}

#[test]
fn prices_and_catalog_project_and_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w) = start(dir.path(), &opts("s1"));
    let chain = PriceKey { sku: sku("MILK"), scope: PriceScope::Chain, slot: PriceSlot::Regular };
    let promo = PriceKey {
        sku: sku("MILK"),
        scope: PriceScope::Store(StoreId::new("s1").unwrap()),
        slot: PriceSlot::Promotion,
    };
    h.blocking_submit(
        key("p1"),
        Command::PriceChange { key: chain, value: Some(PriceValue { amount: eur(129), window: None }) },
    )
    .unwrap();
    h.blocking_submit(
        key("p2"),
        Command::PriceChange {
            key: promo,
            value: Some(PriceValue { amount: eur(99), window: Some(ValidityWindow { from_ms: 1000, until_ms: 2000 }) }),
        },
    )
    .unwrap();
    let gtin = Gtin::parse("4006381333931").unwrap();
    h.blocking_submit(key("c1"), Command::CatalogChange { sku: sku("MILK"), field: CatalogField::Gtins(vec![gtin]) })
        .unwrap();
    h.blocking_submit(
        key("c2"),
        Command::CatalogChange { sku: sku("MILK"), field: CatalogField::Name("Milk 1 l".into()) },
    )
    .unwrap();
    drop(h);
    w.join();
    let r = LedgerReader::open(dir.path()).unwrap();
    let entries = r.prices(&sku("MILK")).unwrap();
    let store = StoreId::new("s1").unwrap();
    let at = |t| effective_price(&entries, &sku("MILK"), &store, t).unwrap().value.as_ref().unwrap().amount.minor;
    assert_eq!((at(500), at(1500), at(2500)), (129, 99, 129));
    assert_eq!(r.skus_by_gtin(&gtin).unwrap(), vec![sku("MILK")]);
    assert_eq!(r.catalog_item(&sku("MILK")).unwrap().unwrap().name.unwrap().value, "Milk 1 l");
}

#[test]
fn the_clock_never_goes_backwards_across_a_restart_with_a_dead_rtc() {
    let dir = tempfile::tempdir().unwrap();
    let wall = Arc::new(AtomicU64::new(1_800_000_000_000));
    let mut o = opts("s1");
    let w2 = wall.clone();
    o.clock = Arc::new(move || w2.load(Ordering::SeqCst));
    let (h, w) = start(dir.path(), &o);
    let before = h.blocking_submit(key("a"), sale("A", 1)).unwrap();
    drop(h);
    w.join();
    wall.store(1_000, Ordering::SeqCst); // rebooted in 1970
    let (h, w) = start(dir.path(), &o);
    let after = h.blocking_submit(key("b"), sale("A", 1)).unwrap();
    assert!(after.stamp > before.stamp, "{:?} must order after {:?}", after.stamp, before.stamp);
    assert!(after.seq > before.seq);
    drop(h);
    w.join();
}

#[test]
fn many_concurrent_callers_share_batches_and_all_land_once() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let (h, w) = start(dir.path(), &opts("s1"));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..32 {
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    // Every key is submitted twice, concurrently with the others.
                    let k = format!("t{t}-{i}");
                    h.submit(key(&k), sale(&format!("S{}", i % 5), 1)).await.unwrap();
                    let again = h.submit(key(&k), sale(&format!("S{}", i % 5), 1)).await.unwrap();
                    assert!(again.replayed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    drop(h);
    w.join();
    let r = LedgerReader::open(dir.path()).unwrap();
    assert_eq!(r.event_count().unwrap(), 32 * 50);
    let total: i64 = (0..5).map(|i| r.stock(&sku(&format!("S{i}"))).unwrap().on_hand).sum();
    assert_eq!(total, -(32 * 50));
    assert!(r.verify().unwrap().is_ok());
}

#[test]
fn refuses_files_that_are_not_this_stores_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let path = Ledger::path_in(dir.path());

    std::fs::write(&path, b"this is not a database, just some text that happens to be long enough").unwrap();
    let e = Ledger::open(dir.path(), &opts("s1")).err().unwrap();
    assert!(matches!(e, LedgerError::NotADatabase { .. }), "{e}");
    assert!(e.to_string().contains("ledger.db"), "{e}");
    assert!(matches!(LedgerReader::open(dir.path()).err().unwrap(), LedgerError::NotADatabase { .. }));

    std::fs::remove_file(&path).unwrap();
    write_foreign_database(&path);
    let e = Ledger::open(dir.path(), &opts("s1")).err().unwrap();
    assert!(matches!(e, LedgerError::Foreign { .. }), "{e}");

    let other = tempfile::tempdir().unwrap();
    let (h, w) = start(other.path(), &opts("s1"));
    drop(h);
    w.join();
    let e = Ledger::open(other.path(), &opts("s2")).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "{} is the ledger of store s1, but this agent is configured as store s2",
            Ledger::path_in(other.path()).display()
        )
    );

    let e = LedgerReader::open(&dir.path().join("nowhere")).err().unwrap();
    assert!(matches!(e, LedgerError::CannotOpen { .. }), "{e}");
}

/// A valid SQLite file of some other application.
fn write_foreign_database(path: &Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("CREATE TABLE recipes (name TEXT); INSERT INTO recipes VALUES ('soup');").unwrap();
}

#[test]
fn a_retry_gets_its_first_result_even_if_the_command_would_be_refused_today() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w) = start(dir.path(), &opts("s1"));
    let receive = |k: &str, quantity: i64| {
        h.blocking_submit(key(k), Command::Receipt { sku: sku("A"), quantity, reference: String::new() })
    };
    let big = |k: &str| receive(k, 1 << 62);
    let first = big("k1").unwrap();
    receive("k2", (1 << 62) - 1).unwrap(); // the slot is now full: i64::MAX
                                           // Applying k1 again would overflow the slot; its retry must still return k1's result.
    let retry = big("k1").unwrap();
    assert!(retry.replayed);
    assert_eq!(retry.seq, first.seq);
    assert!(big("k3").unwrap_err().to_string().contains("overflow"));
    drop(h);
    w.join();
    // Reopened in another currency, an old sale's retry is still its first result.
    let mut usd = opts("s1");
    usd.currency = Currency::new("USD").unwrap();
    let (h, w) = start(dir.path(), &usd);
    let sale_eur = sale("A", 1);
    assert!(h.blocking_submit(key("k4"), sale_eur.clone()).is_err(), "EUR sale refused by a USD store");
    drop(h);
    w.join();
    let (h, w) = start(dir.path(), &opts("s1"));
    let applied = h.blocking_submit(key("k4"), sale_eur.clone()).unwrap();
    drop(h);
    w.join();
    let (h, w) = start(dir.path(), &usd);
    assert_eq!(h.blocking_submit(key("k4"), sale_eur).unwrap().seq, applied.seq);
    drop(h);
    w.join();
}

#[test]
fn a_hand_edited_ledger_is_refused_at_open_not_appended_to() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w) = start(dir.path(), &opts("s1"));
    for i in 0..5 {
        h.blocking_submit(key(&format!("s{i}")), sale("A", 1)).unwrap();
    }
    drop(h);
    w.join();
    let path = Ledger::path_in(dir.path());
    let conn = rusqlite::Connection::open(&path).unwrap();
    // Deleting the last sale would free its key and let the next append reuse seq 5.
    conn.execute("DELETE FROM events WHERE seq = 5", []).unwrap();
    drop(conn);
    let e = Ledger::open(dir.path(), &opts("s1")).err().unwrap();
    assert!(matches!(e, LedgerError::Corrupt { .. }) && e.to_string().contains("ends at 4"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let (h, w) = start(dir.path(), &opts("s1"));
    h.blocking_submit(key("s"), sale("A", 1)).unwrap();
    drop(h);
    w.join();
    let conn = rusqlite::Connection::open(Ledger::path_in(dir.path())).unwrap();
    conn.execute("UPDATE meta SET value = -1 WHERE key = 'hlc_wall'", []).unwrap();
    drop(conn);
    let e = Ledger::open(dir.path(), &opts("s1")).err().unwrap();
    assert!(e.to_string().contains("hlc_wall is negative"), "{e}");
}
