//! The ledger's side of sync without a network: what a push page holds, what an answer moves
//! (acknowledged version, cursor) and how a page of cloud rows merges: in one transaction, as
//! one `SyncMerge` event that `ledger verify` replays, idempotently, feeding the label planner.

use std::path::Path;

use edge_agent::ledger::*;
use shared::sync::{Cursor, Rows, SlotGroup, SlotValue};
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
fn store() -> StoreId {
    StoreId::new("s1").unwrap()
}
/// The actor the ledger in `dir` writes with (chosen when it was created).
fn own(dir: &Path) -> ActorId {
    LedgerReader::open(dir).unwrap().actor().unwrap()
}
fn start(dir: &Path) -> (LedgerHandle, WriterThread) {
    let opts = LedgerOptions::new(store(), Currency::new("EUR").unwrap());
    Ledger::open(dir, &opts).unwrap().start_writer(64).unwrap()
}
fn cloud_stamp(wall_ms: u64) -> HlcStamp {
    HlcStamp { wall_ms, logical: 0, actor: ActorId::cloud() }
}
fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}
fn ack(acked_version: u64, cursor: Cursor) -> SyncAck {
    SyncAck { acked_version, pushed_to: acked_version, cursor, cloud_time: cloud_stamp(now_ms()), caught_up: true }
}
fn receipt(sku_id: &str, quantity: i64) -> Command {
    Command::Receipt { sku: sku(sku_id), quantity, reference: "DN".into() }
}

#[tokio::test]
async fn a_push_page_holds_own_changes_and_an_ack_empties_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w) = start(dir.path());
    for (i, s) in ["A", "B", "C"].iter().enumerate() {
        h.submit(key(&format!("rcv-{i}")), receipt(s, 10)).await.unwrap();
    }
    let price_key = PriceKey { sku: sku("A"), scope: PriceScope::Store(store()), slot: PriceSlot::Promotion };
    h.submit(
        key("promo"),
        Command::PriceChange { key: price_key, value: Some(PriceValue { amount: eur(99), window: None }) },
    )
    .await
    .unwrap();
    let reader = LedgerReader::open(dir.path()).unwrap();

    // A page of two rows stops at the second change; the whole outbox fits a larger page.
    let small = reader.push_page(2).unwrap().unwrap();
    assert_eq!((small.from_version, small.rows.len()), (0, 2));
    let all = reader.push_page(100).unwrap().unwrap();
    assert_eq!(all.rows.len(), 4);
    assert_eq!(all.rows.prices.len(), 1);
    assert_eq!(all.rows.stock[0].actor, own(dir.path()));
    assert_eq!(all.to_version, reader.sync_position().unwrap().head_version);

    h.apply_sync(ack(small.to_version, Cursor::default()), None).await.unwrap();
    let rest = reader.push_page(100).unwrap().unwrap();
    assert_eq!((rest.from_version, rest.rows.len()), (small.to_version, 2));
    h.apply_sync(ack(rest.to_version, Cursor::default()), None).await.unwrap();
    assert_eq!(reader.push_page(100).unwrap(), None);
    assert_eq!(reader.outbox_depth().unwrap(), 0);

    // The cloud lost data (a restored backup) and holds less: the store pushes again from there.
    h.apply_sync(ack(small.to_version, Cursor::default()), None).await.unwrap();
    assert_eq!(reader.push_page(100).unwrap().unwrap().rows.len(), 2);
    drop(h);
    w.join();
}

#[tokio::test]
async fn a_cloud_page_merges_once_as_an_event_that_verify_replays() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w) = start(dir.path());
    let mut changes = h.subscribe();
    h.submit(key("rcv"), receipt("MILK", 10)).await.unwrap();
    h.submit(
        key("sale"),
        Command::Sale {
            lines: vec![SaleLine { sku: sku("MILK"), quantity: 3, line_total: eur(357), price: None }],
            tender: Tender::Cash,
        },
    )
    .await
    .unwrap();
    let chain_price = PriceEntry {
        key: PriceKey { sku: sku("MILK"), scope: PriceScope::Chain, slot: PriceSlot::Regular },
        value: Some(PriceValue { amount: eur(129), window: None }),
        stamp: cloud_stamp(now_ms() - 1_000),
    };
    let rows = Rows {
        stock: vec![
            // A transfer from HQ into this store, and this store's own slot as the cloud holds
            // it after a ledger rebuild: higher than ours, so it merges (per-field max).
            SlotGroup {
                store: store(),
                actor: ActorId::cloud(),
                slots: vec![SlotValue { sku: sku("MILK"), inc: 5, dec: 0 }],
            },
            SlotGroup {
                store: store(),
                actor: own(dir.path()),
                slots: vec![SlotValue { sku: sku("MILK"), inc: 12, dec: 3 }],
            },
        ],
        prices: vec![chain_price.clone()],
        catalog: vec![CatalogUpdate {
            sku: sku("MILK"),
            field: CatalogField::Name("Milk 1 l".into()),
            stamp: cloud_stamp(now_ms() - 1_000),
        }],
        ..Rows::default()
    };
    let to = Cursor { chain: 2, store: 7 };
    let page =
        MergedPage { from: Cursor::default(), rows: rows.clone(), refused: vec!["one row, for the record".into()] };
    let applied = h.apply_sync(ack(0, to), Some(page.clone())).await.unwrap().unwrap();
    assert!(!applied.replayed);
    assert_eq!(changes.recv().await.unwrap(), Change::Product(sku("MILK")));

    let reader = LedgerReader::open(dir.path()).unwrap();
    let stock = reader.stock(&sku("MILK")).unwrap();
    assert_eq!(stock.on_hand, 12 - 3 + 5, "own slot merged to (12, 3), plus the cloud's 5");
    assert_eq!(reader.prices(&sku("MILK")).unwrap(), vec![chain_price]);
    assert_eq!(reader.catalog_item(&sku("MILK")).unwrap().unwrap().name.unwrap().value, "Milk 1 l");
    assert_eq!(reader.sync_position().unwrap().cursor, to);
    let events = reader.event_count().unwrap();

    // The same page again (a retried answer): the first result, nothing moves.
    let again = h.apply_sync(ack(0, to), Some(page)).await.unwrap().unwrap();
    assert!(again.replayed);
    assert_eq!(reader.event_count().unwrap(), events);
    assert_eq!(reader.stock(&sku("MILK")).unwrap().on_hand, 14);

    // Selling after the merge moves the merged own slot on; verify replays merge and sale.
    h.submit(
        key("sale-2"),
        Command::Sale {
            lines: vec![SaleLine { sku: sku("MILK"), quantity: 1, line_total: eur(129), price: None }],
            tender: Tender::Cash,
        },
    )
    .await
    .unwrap();
    drop(h);
    w.join();
    assert_eq!(reader.stock(&sku("MILK")).unwrap().on_hand, 13);
    let report = reader.verify().unwrap().unwrap();
    assert_eq!(report.events, 4);
    let (_, body) = reader.event_by_key("sync:0.0-2.7").unwrap().unwrap();
    assert!(matches!(body, EventBody::SyncMerge { refused, .. } if refused.len() == 1));
}

#[tokio::test]
async fn merged_rows_of_other_actors_are_not_pushed_back() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w) = start(dir.path());
    let rows = Rows {
        stock: vec![SlotGroup {
            store: store(),
            actor: ActorId::cloud(),
            slots: vec![SlotValue { sku: sku("X"), inc: 4, dec: 1 }],
        }],
        ..Rows::default()
    };
    let page = MergedPage { from: Cursor::default(), rows, refused: vec![] };
    h.apply_sync(ack(0, Cursor { chain: 0, store: 1 }), Some(page)).await.unwrap();
    let reader = LedgerReader::open(dir.path()).unwrap();
    assert_eq!(reader.push_page(100).unwrap(), None, "the cloud's own slot is not this store's to push");
    assert_eq!(reader.stock(&sku("X")).unwrap().on_hand, 3);
    drop(h);
    w.join();
}

#[tokio::test]
async fn a_rebuilt_ledger_keeps_its_changes_when_the_cloud_holds_more() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w) = start(dir.path());
    h.submit(key("rcv-before-first-sync"), receipt("A", 4)).await.unwrap();
    let reader = LedgerReader::open(dir.path()).unwrap();
    assert!(!reader.sync_position().unwrap().bootstrapped, "a new ledger asks for its own slots back");

    // The cloud knows this store up to version 50 (its ledger was replaced); the answer leaves
    // more to pull, so the ledger is not caught up yet.
    let mut partial = ack(50, Cursor { chain: 0, store: 10 });
    (partial.caught_up, partial.pushed_to) = (false, 0);
    h.apply_sync(partial, None).await.unwrap();
    let position = reader.sync_position().unwrap();
    assert_eq!((position.pushed_version, position.head_version, position.bootstrapped), (0, 50, false));
    assert_eq!(position.cursor, Cursor::default(), "it pulls everything again, its own slots included");

    // A change after the answer takes a version above the cloud's; both changes are pushed.
    h.submit(key("rcv-after"), receipt("B", 2)).await.unwrap();
    let push = reader.push_page(100).unwrap().unwrap();
    assert_eq!((push.from_version, push.to_version), (0, 51));
    assert_eq!(push.rows.len(), 2, "{push:?}");
    h.apply_sync(ack(51, Cursor { chain: 0, store: 12 }), None).await.unwrap();
    let position = reader.sync_position().unwrap();
    assert_eq!((position.pushed_version, position.bootstrapped), (51, true));
    assert_eq!(reader.push_page(100).unwrap(), None);
    drop(h);
    w.join();
}

#[tokio::test]
async fn chain_prices_written_locally_stay_local() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w) = start(dir.path());
    let chain = PriceKey { sku: sku("A"), scope: PriceScope::Chain, slot: PriceSlot::Regular };
    let value = Some(PriceValue { amount: eur(100), window: None });
    h.submit(key("chain-price"), Command::PriceChange { key: chain, value: value.clone() }).await.unwrap();
    let reader = LedgerReader::open(dir.path()).unwrap();
    assert_eq!(reader.push_page(100).unwrap(), None, "the cloud refuses chain prices from a store");
    assert_eq!(reader.outbox_depth().unwrap(), 0);
    let own = PriceKey { sku: sku("A"), scope: PriceScope::Store(store()), slot: PriceSlot::Regular };
    h.submit(key("store-price"), Command::PriceChange { key: own, value }).await.unwrap();
    assert_eq!(reader.push_page(100).unwrap().unwrap().rows.prices.len(), 1);
    drop(h);
    w.join();
}

#[tokio::test]
async fn a_rebuilt_ledger_pushing_in_pages_sends_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w) = start(dir.path());
    for (i, s) in ["A", "B", "C"].iter().enumerate() {
        h.submit(key(&format!("rcv-{i}")), receipt(s, 1)).await.unwrap();
    }
    let reader = LedgerReader::open(dir.path()).unwrap();
    // The cloud knows this store up to 50 from its previous ledger; pages of two rows.
    let first = reader.push_page(2).unwrap().unwrap();
    assert_eq!(first.rows.len(), 2);
    let mut answer = ack(50, Cursor::default());
    answer.pushed_to = first.to_version;
    h.apply_sync(answer, None).await.unwrap();
    assert_eq!(reader.sync_position().unwrap().pushed_version, first.to_version, "only what the page carried");
    let second = reader.push_page(2).unwrap().unwrap();
    assert_eq!(second.rows.len(), 1, "the third change is still to send: {second:?}");
    let mut answer = ack(50, Cursor::default());
    answer.pushed_to = second.to_version;
    h.apply_sync(answer, None).await.unwrap();
    assert_eq!(reader.push_page(2).unwrap(), None);
    drop(h);
    w.join();
}
