//! The crash window between a sale's commit and the basket's clearing: the lane restarts with a
//! basket saved mid-payment whose sale is already in the ledger. Resuming re-issues the commit
//! under the same key, gets the first sale back, and shows its receipt; nothing sells twice.

use std::time::Duration;

use edge_agent::lane::runtime::{encode_basket, LaneTask};
use edge_agent::lane::{Basket, BasketLine, Display, Lane};
use edge_agent::ledger::{Command, IdempotencyKey, Ledger, LedgerOptions, LedgerReader, SaleLine, Tender};
use shared::{
    ActorId, Currency, DeviceId, Gtin, HlcStamp, Money, PriceScope, PriceSlot, PriceVersion, Sku, StoreId, Unit,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_committed_just_before_a_crash_is_not_sold_again_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let eur = Currency::new("EUR").unwrap();
    let store = StoreId::new("s1").unwrap();
    let lane_id = DeviceId::new("lane-1").unwrap();
    let (handle, writer) =
        Ledger::open(dir.path(), &LedgerOptions::new(store.clone(), eur)).unwrap().start_writer(16).unwrap();

    let version = PriceVersion {
        scope: PriceScope::Chain,
        slot: PriceSlot::Regular,
        stamp: HlcStamp { wall_ms: 1, logical: 0, actor: ActorId::cloud() },
    };
    let line = BasketLine {
        line: 1,
        sku: Sku::new("MILK").unwrap(),
        gtin: Gtin::parse("4006381333931").unwrap(),
        name: "Milk".into(),
        unit: Unit::Piece,
        quantity: 2,
        unit_price: Money::new(119, eur),
        price: version.clone(),
        amount: Money::new(238, eur),
        voided: false,
    };
    let basket =
        Basket { session: 42, number: 7, lines: vec![line], awaiting_weight: None, tendering: Some(Tender::Card) };
    // What the crashed daemon left: the basket saved mid-payment, and its sale committed.
    handle.save_basket(lane_id.as_str(), Some(encode_basket(&basket))).await.unwrap();
    let key = Lane::new(lane_id.clone(), store.clone(), eur, Some(basket.clone()), 0).sale_key();
    let sale = Command::Sale {
        lines: vec![SaleLine {
            sku: Sku::new("MILK").unwrap(),
            quantity: 2,
            line_total: Money::new(238, eur),
            price: Some(version),
        }],
        tender: Tender::Card,
    };
    let first = handle.submit(IdempotencyKey::new(key.clone()).unwrap(), sale).await.unwrap();

    let (display_tx, mut display) = mpsc::channel(64);
    let (_inputs_tx, inputs) = mpsc::channel(8);
    let task = LaneTask::new(
        lane_id.clone(),
        store.clone(),
        eur,
        LedgerReader::open(dir.path()).unwrap(),
        handle.clone(),
        display_tx,
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn(task.run(inputs, stop.clone()));
    let receipt = loop {
        match tokio::time::timeout(Duration::from_secs(10), display.recv()).await.unwrap().unwrap() {
            Display::Receipt { receipt_id, total } => break (receipt_id, total),
            _ => continue,
        }
    };
    assert_eq!(receipt, (format!("s1-{:08}", first.seq), Money::new(238, eur)), "the first sale's receipt");
    stop.cancel();
    running.await.unwrap();
    drop(handle);
    writer.join();

    let reader = LedgerReader::open(dir.path()).unwrap();
    assert_eq!(reader.stock(&Sku::new("MILK").unwrap()).unwrap().on_hand, -2, "sold once");
    let saved = edge_agent::lane::runtime::decode_basket(&reader.lane_basket("lane-1").unwrap().unwrap()).unwrap();
    assert_eq!((saved.number, saved.lines.len(), saved.tendering), (8, 0, None), "the next basket is open");
    assert!(reader.verify().unwrap().is_ok());
}
