//! The CRDT laws of DESIGN section 5, as properties: merge is idempotent, commutative and
//! associative; delta merging equals full-state merging; the row form agrees with the `crdts`
//! crate's reference types; and no merge order invents or loses a unit.

use crdts::{CmRDT, CvRDT, LWWReg, PNCounter};
use proptest::prelude::*;
use shared::*;

const ACTORS: [&str; 4] = ["store:s1", "store:s2", "cloud", "store:s3"];
const SKUS: [&str; 3] = ["A", "B", "C"];

fn key(actor: usize, sku: usize) -> SlotKey {
    SlotKey {
        store: StoreId::new("s1").unwrap(),
        sku: Sku::new(SKUS[sku]).unwrap(),
        actor: ActorId::new(ACTORS[actor]).unwrap(),
    }
}

/// One step of a replica's life: a local movement by its own actor, or a merge from a peer.
#[derive(Debug, Clone)]
enum Step {
    Move { replica: usize, sku: usize, movement: i64 },
    Sync { from: usize, to: usize },
}

fn steps(replicas: usize) -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        3 => (0..replicas, 0..SKUS.len(), -50i64..50).prop_map(|(replica, sku, movement)| Step::Move { replica, sku, movement }),
        1 => (0..replicas, 0..replicas).prop_map(|(from, to)| Step::Sync { from, to }),
    ];
    proptest::collection::vec(step, 0..60)
}

/// Plays the steps; replica `i` writes only as actor `i`. Syncs ship deltas since what the
/// receiver last got from that sender (as the real sync does), not full states.
fn play(replicas: usize, steps: &[Step]) -> (Vec<StockState>, i128) {
    let mut states = vec![StockState::new(); replicas];
    let mut cursors = vec![vec![0u64; replicas]; replicas];
    let mut total = 0i128;
    for step in steps {
        match *step {
            Step::Move { replica, sku, movement } => {
                states[replica].apply_local(key(replica, sku), movement).unwrap();
                total += i128::from(movement);
            }
            Step::Sync { from, to } if from != to => {
                let delta = states[from].delta_since(cursors[to][from]);
                cursors[to][from] = states[from].version();
                states[to].merge(&delta);
            }
            Step::Sync { .. } => {}
        }
    }
    (states, total)
}

fn total_value(state: &StockState) -> i128 {
    let store = StoreId::new("s1").unwrap();
    SKUS.iter().map(|s| state.value(&store, &Sku::new(*s).unwrap())).sum()
}

fn merged(a: &StockState, b: &StockState) -> Vec<SlotRow> {
    let mut m = a.clone();
    m.merge(&b.rows());
    m.rows()
}

proptest! {
    #[test]
    fn stock_merge_is_idempotent_commutative_associative(s in steps(3)) {
        let (st, _) = play(3, &s);
        let (a, b, c) = (&st[0], &st[1], &st[2]);
        prop_assert_eq!(merged(a, a), a.rows());
        prop_assert_eq!(merged(a, b), merged(b, a));
        let mut ab = a.clone(); ab.merge(&b.rows());
        let mut bc = b.clone(); bc.merge(&c.rows());
        prop_assert_eq!(merged(&ab, c), merged(a, &bc));
    }

    #[test]
    fn delta_merge_equals_full_state_merge(s in steps(3)) {
        // `play` syncs by delta; replaying the same steps with full-state merges must agree.
        let (by_delta, _) = play(3, &s);
        let mut by_full = vec![StockState::new(); 3];
        for step in &s {
            match *step {
                Step::Move { replica, sku, movement } => { by_full[replica].apply_local(key(replica, sku), movement).unwrap(); }
                Step::Sync { from, to } if from != to => { let rows = by_full[from].rows(); by_full[to].merge(&rows); }
                Step::Sync { .. } => {}
            }
        }
        for (d, f) in by_delta.iter().zip(&by_full) {
            prop_assert_eq!(d.rows(), f.rows());
        }
    }

    #[test]
    fn no_merge_order_invents_or_loses_a_unit(s in steps(4), order in Just((0..4usize).collect::<Vec<_>>()).prop_shuffle()) {
        let (mut st, total) = play(4, &s);
        // Everyone reconnects in a random order, twice round so that all have seen all.
        for _ in 0..2 {
            for &i in &order {
                for j in 0..4 {
                    if i != j { let rows = st[j].rows(); st[i].merge(&rows); }
                }
            }
        }
        for r in &st {
            prop_assert_eq!(r.rows(), st[0].rows(), "replicas differ");
            prop_assert_eq!(total_value(r), total, "units invented or lost");
        }
    }

    #[test]
    fn slot_form_matches_crdts_pncounter(s in steps(3)) {
        // Reference: one crdts::PNCounter per replica and SKU, fed the same operations and merges.
        let mut reference: Vec<Vec<PNCounter<usize>>> = vec![vec![PNCounter::new(); SKUS.len()]; 3];
        for step in &s {
            match *step {
                Step::Move { replica, sku, movement } => {
                    let c = &mut reference[replica][sku];
                    let op = if movement >= 0 { c.inc_many(replica, movement as u64) } else { c.dec_many(replica, movement.unsigned_abs()) };
                    c.apply(op);
                }
                Step::Sync { from, to } if from != to => {
                    let sources = reference[from].clone();
                    for (target, src) in reference[to].iter_mut().zip(sources) {
                        target.merge(src);
                    }
                }
                Step::Sync { .. } => {}
            }
        }
        let (st, _) = play(3, &s);
        let store = StoreId::new("s1").unwrap();
        for (r, state) in st.iter().enumerate() {
            for (i, sku) in SKUS.iter().enumerate() {
                let ours = state.value(&store, &Sku::new(*sku).unwrap());
                prop_assert_eq!(reference[r][i].read().to_string(), ours.to_string());
            }
        }
    }

    #[test]
    fn price_register_matches_crdts_lwwreg(
        writes in proptest::collection::vec((0u64..20, 0usize..ACTORS.len(), 0i64..1000), 1..20),
        order in Just((0..20usize).collect::<Vec<_>>()).prop_shuffle(),
    ) {
        // Same writes delivered in a shuffled order: our register and crdts::LWWReg (marker =
        // the HLC stamp) must end on the same value. Distinct stamps, as an HLC guarantees.
        let mut seen = std::collections::BTreeSet::new();
        let entries: Vec<PriceEntry> = writes.iter().filter(|(w, a, _)| seen.insert((*w, *a))).map(|&(wall, actor, cents)| PriceEntry {
            key: PriceKey { sku: Sku::new("A").unwrap(), scope: PriceScope::Chain, slot: PriceSlot::Regular },
            value: Some(PriceValue { amount: Money::new(cents, Currency::new("EUR").unwrap()), window: None }),
            stamp: HlcStamp { wall_ms: wall, logical: 0, actor: ActorId::new(ACTORS[actor]).unwrap() },
        }).collect();
        let mut book = PriceBook::new();
        let mut reference: Option<LWWReg<i64, HlcStamp>> = None;
        for &i in order.iter().filter(|&&i| i < entries.len()) {
            let e = &entries[i];
            book.merge(e);
            let cents = e.value.as_ref().unwrap().amount.minor;
            match &mut reference {
                None => reference = Some(LWWReg { val: cents, marker: e.stamp.clone() }),
                Some(r) => r.update(cents, e.stamp.clone()),
            }
        }
        let ours = book.entries().next().unwrap().value.as_ref().unwrap().amount.minor;
        prop_assert_eq!(ours, reference.unwrap().val);
    }

    #[test]
    fn price_and_catalog_merges_commute(
        writes in proptest::collection::vec((0u64..10, 0usize..ACTORS.len(), 0i64..1000, any::<bool>()), 1..15),
        order in Just((0..15usize).collect::<Vec<_>>()).prop_shuffle(),
    ) {
        let mut seen = std::collections::BTreeSet::new();
        let updates: Vec<CatalogUpdate> = writes.iter().filter(|(w, a, _, _)| seen.insert((*w, *a))).map(|&(wall, actor, n, flag)| CatalogUpdate {
            sku: Sku::new("A").unwrap(),
            field: if flag { CatalogField::Discontinued(n % 2 == 0) } else { CatalogField::Name(format!("name {n}")) },
            stamp: HlcStamp { wall_ms: wall, logical: 0, actor: ActorId::new(ACTORS[actor]).unwrap() },
        }).collect();
        let mut forward = CatalogItem::new(Sku::new("A").unwrap());
        let mut shuffled = forward.clone();
        for u in &updates { forward.merge(u); }
        for &i in order.iter().filter(|&&i| i < updates.len()) { shuffled.merge(&updates[i]); shuffled.merge(&updates[i]); }
        prop_assert_eq!(forward, shuffled);
    }
}
