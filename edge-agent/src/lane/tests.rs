//! The lane state machine driven directly, without I/O.

use std::collections::HashMap;

use super::*;
use shared::{ActorId, HlcStamp, PriceScope, PriceSlot};

struct Shelf(HashMap<Gtin, Product>);

impl Catalog for Shelf {
    fn lookup(&self, gtin: &Gtin, _at_ms: u64) -> Result<Option<Product>, String> {
        Ok(self.0.get(gtin).cloned())
    }
}

fn eur(c: i64) -> Money {
    Money::new(c, Currency::new("EUR").unwrap())
}

fn version(wall: u64) -> PriceVersion {
    PriceVersion {
        scope: PriceScope::Chain,
        slot: PriceSlot::Regular,
        stamp: HlcStamp { wall_ms: wall, logical: 0, actor: ActorId::cloud() },
    }
}

const MILK: &str = "4006381333931";
const BREAD: &str = "96385074";
const APPLES: &str = "10614141000415";
const OLD: &str = "036000291452";

fn shelf() -> Shelf {
    let p = |sku: &str, name: &str, unit, cents, discontinued| Product {
        sku: Sku::new(sku).unwrap(),
        name: name.into(),
        unit,
        discontinued,
        price: Some((eur(cents), version(1))),
    };
    Shelf(HashMap::from([
        (Gtin::parse(MILK).unwrap(), p("MILK", "Milk 1 l", Unit::Piece, 119, false)),
        (Gtin::parse(BREAD).unwrap(), p("BREAD", "Bread", Unit::Piece, 250, false)),
        (Gtin::parse(APPLES).unwrap(), p("APPLES", "Apples", Unit::Gram, 299, false)),
        (Gtin::parse(OLD).unwrap(), p("OLD", "Old cereal", Unit::Piece, 100, true)),
    ]))
}

fn lane() -> Lane {
    Lane::new(DeviceId::new("lane-1").unwrap(), StoreId::new("s1").unwrap(), Currency::new("EUR").unwrap(), None, 0xabc)
}

fn scan(code: &str) -> LaneInput {
    LaneInput::Scan { data: code.as_bytes().to_vec() }
}

fn stable(grams: i32) -> LaneInput {
    LaneInput::Weight(WeightReading { grams, stable: true, under_zero: false, over_capacity: false })
}

fn messages(out: &[LaneOutput]) -> Vec<(MessageCode, String)> {
    out.iter()
        .filter_map(|o| match o {
            LaneOutput::Display(Display::Message { code, text }) => Some((*code, text.clone())),
            _ => None,
        })
        .collect()
}

fn last_total(out: &[LaneOutput]) -> Option<i64> {
    out.iter().rev().find_map(|o| match o {
        LaneOutput::Display(Display::Total { amount, .. }) => Some(amount.minor),
        _ => None,
    })
}

#[test]
fn scan_weigh_and_pay() {
    let (shelf, mut lane) = (shelf(), lane());
    assert_eq!(last_total(&lane.handle(scan(MILK), 0, &shelf)), Some(119));
    assert_eq!(last_total(&lane.handle(scan(MILK), 0, &shelf)), Some(238), "same item again: quantity 2");
    assert_eq!(last_total(&lane.handle(scan(BREAD), 0, &shelf)), Some(488));
    // Weighed: motion first, then a stable 1.234 kg at 2.99/kg = 3.68966 -> 3.69.
    let out = lane.handle(scan(APPLES), 0, &shelf);
    assert_eq!(messages(&out)[0].0, MessageCode::WaitForStableWeight);
    let moving =
        LaneInput::Weight(WeightReading { grams: 900, stable: false, under_zero: false, over_capacity: false });
    assert!(lane.handle(moving, 0, &shelf).is_empty(), "a moving weight is never sold");
    assert_eq!(last_total(&lane.handle(stable(1234), 0, &shelf)), Some(488 + 369));
    let out = lane.handle(LaneInput::Tender(Tender::Card), 0, &shelf);
    let commit = out.iter().find_map(|o| match o {
        LaneOutput::Commit { key, lines, tender } => Some((key.clone(), lines.clone(), *tender)),
        _ => None,
    });
    let (key, lines, tender) = commit.expect("tender commits the sale");
    assert_eq!(key, "lane:s1:lane-1:0000000000000abc:1");
    assert_eq!(tender, Tender::Card);
    assert_eq!(
        lines.iter().map(|l| (l.sku.as_str(), l.quantity, l.line_total.minor)).collect::<Vec<_>>(),
        vec![("MILK", 2, 238), ("BREAD", 1, 250), ("APPLES", 1234, 369)]
    );
    assert!(lines.iter().all(|l| l.price == Some(version(1))));
    // Scans while paying are refused; the ledger's answer ends the basket.
    assert_eq!(messages(&lane.handle(scan(MILK), 0, &shelf))[0].0, MessageCode::Info);
    let stale =
        LaneInput::Committed { key: "lane:s1:lane-1:0000000000000abc:0".into(), receipt_id: "x".into(), total: eur(1) };
    assert!(lane.handle(stale, 0, &shelf).is_empty(), "an answer for another basket is ignored");
    let out = lane.handle(
        LaneInput::Committed { key: key.clone(), receipt_id: "s1-00000042".into(), total: eur(857) },
        0,
        &shelf,
    );
    assert!(out.contains(&LaneOutput::Display(Display::Receipt { receipt_id: "s1-00000042".into(), total: eur(857) })));
    assert_eq!(lane.basket().number, 2);
    assert!(lane.basket().lines.is_empty());
}

#[test]
fn each_bad_scan_gets_its_own_message() {
    let (shelf, mut lane) = (shelf(), lane());
    let m = |l: &mut Lane, code: &str| messages(&l.handle(scan(code), 0, &shelf))[0].clone();
    assert_eq!(m(&mut lane, "4006381333932").0, MessageCode::InvalidBarcode);
    assert!(m(&mut lane, "4006381333932").1.contains("check digit"));
    assert_eq!(m(&mut lane, "5901234123457").0, MessageCode::UnknownProduct);
    assert_eq!(m(&mut lane, OLD), (MessageCode::Discontinued, "Old cereal is no longer sold: ask staff".into()));
    assert_eq!(m(&mut lane, "HELLO").0, MessageCode::InvalidBarcode);
    assert_eq!(m(&mut lane, "123").0, MessageCode::InvalidBarcode);
    let out = lane.handle(LaneInput::Scan { data: vec![0xff, 0xfe] }, 0, &shelf);
    assert_eq!(messages(&out)[0].0, MessageCode::InvalidBarcode);
    assert!(lane.basket().lines.is_empty());
}

#[test]
fn quantities_voids_and_the_scale_flags() {
    let (shelf, mut lane) = (shelf(), lane());
    lane.handle(scan(MILK), 0, &shelf);
    lane.handle(scan(BREAD), 0, &shelf);
    assert_eq!(last_total(&lane.handle(LaneInput::SetQuantity { line: 1, quantity: 3 }, 0, &shelf)), Some(357 + 250));
    assert_eq!(last_total(&lane.handle(LaneInput::VoidLine { line: 2 }, 0, &shelf)), Some(357));
    assert_eq!(messages(&lane.handle(LaneInput::VoidLine { line: 2 }, 0, &shelf))[0].0, MessageCode::Error);
    assert_eq!(
        messages(&lane.handle(LaneInput::SetQuantity { line: 1, quantity: 0 }, 0, &shelf))[0].0,
        MessageCode::Error
    );
    let over = LaneInput::Weight(WeightReading { grams: 40_000, stable: true, under_zero: false, over_capacity: true });
    assert_eq!(messages(&lane.handle(over, 0, &shelf))[0].0, MessageCode::ScaleError);
    let under = LaneInput::Weight(WeightReading { grams: -5, stable: true, under_zero: true, over_capacity: false });
    assert_eq!(messages(&lane.handle(under, 0, &shelf))[0].0, MessageCode::ScaleError);
    // An under-zero reading is not a weight to sell with.
    assert_eq!(messages(&lane.handle(scan(APPLES), 0, &shelf))[0].0, MessageCode::WaitForStableWeight);
    let out = lane.handle(LaneInput::VoidBasket, 0, &shelf);
    assert!(out.contains(&LaneOutput::Display(Display::Cleared)));
    assert_eq!(lane.basket().number, 2);
    assert_eq!(
        messages(&lane.handle(LaneInput::Tender(Tender::Cash), 0, &shelf))[0].0,
        MessageCode::Info,
        "empty basket"
    );
}

#[test]
fn a_restart_resumes_the_basket_and_retries_an_interrupted_payment() {
    let (shelf, mut lane) = (shelf(), lane());
    lane.handle(scan(MILK), 0, &shelf);
    let persisted = lane
        .handle(LaneInput::Tender(Tender::Cash), 0, &shelf)
        .into_iter()
        .find_map(|o| match o {
            LaneOutput::Persist(b) => Some(b),
            _ => None,
        })
        .unwrap();
    assert!(persisted.check(Currency::new("EUR").unwrap()).is_ok());
    let restarted = Lane::new(
        DeviceId::new("lane-1").unwrap(),
        StoreId::new("s1").unwrap(),
        Currency::new("EUR").unwrap(),
        Some(persisted),
        0xdef,
    );
    let out = restarted.resume();
    assert!(out
        .iter()
        .any(|o| matches!(o, LaneOutput::Commit { key, .. } if key == "lane:s1:lane-1:0000000000000abc:1")));
    assert!(out.iter().any(|o| matches!(o, LaneOutput::Display(Display::Line { line: 1, .. }))));
    // A failed commit gives the basket back to the customer.
    let mut lane = restarted;
    let out = lane.handle(LaneInput::CommitFailed { reason: "disk full".into(), key_taken: false }, 0, &shelf);
    assert_eq!(messages(&out)[0].0, MessageCode::Error);
    assert!(lane.basket().tendering.is_none());
    assert_eq!(lane.sale_key(), "lane:s1:lane-1:0000000000000abc:1", "not applied: retry under the same key");
    lane.handle(LaneInput::Tender(Tender::Cash), 0, &shelf);
    lane.handle(LaneInput::CommitFailed { reason: "key names another sale".into(), key_taken: true }, 0, &shelf);
    assert_eq!(lane.sale_key(), "lane:s1:lane-1:0000000000000abc:2", "a taken key is never reused");
    assert_eq!(lane.basket().lines.len(), 1, "the customer's basket stays");
}

#[test]
fn weighed_amounts_round_half_up() {
    assert_eq!(weighed_amount(eur(299), 1234).unwrap().minor, 369); // 368.966
    assert_eq!(weighed_amount(eur(100), 5).unwrap().minor, 1); // 0.5 -> 1
    assert_eq!(weighed_amount(eur(100), 4).unwrap().minor, 0); // 0.4 -> 0
    assert_eq!(weighed_amount(eur(1999), 1000).unwrap().minor, 1999);
    assert!(weighed_amount(eur(i64::MAX), 1_000_000).is_none());
}

#[test]
fn a_stale_weight_is_not_sold_and_a_damaged_saved_basket_is_detected() {
    let (shelf, mut lane) = (shelf(), lane());
    lane.handle(stable(500), 0, &shelf);
    let out = lane.handle(scan(APPLES), MAX_WEIGHT_AGE_MS + 1, &shelf);
    assert_eq!(messages(&out)[0].0, MessageCode::WaitForStableWeight, "a reading from long ago is not this item's");
    assert_eq!(last_total(&lane.handle(stable(1000), MAX_WEIGHT_AGE_MS + 2, &shelf)), Some(299));

    let eur_ = Currency::new("EUR").unwrap();
    let mut b = lane.basket().clone();
    assert!(b.check(eur_).is_ok());
    b.lines[0].line = 0;
    assert!(b.check(eur_).unwrap_err().contains("numbered 0"));
    let mut b = lane.basket().clone();
    b.lines[0].amount = Money::new(1, Currency::new("USD").unwrap());
    assert!(b.check(eur_).is_err());
}
