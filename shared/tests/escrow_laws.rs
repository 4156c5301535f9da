//! The online-allocation escrow (DESIGN 5 and 13.5) as properties: its merge obeys the CRDT laws,
//! and under random operations, random partitions and random (even split, reordered) deliveries
//! between one store replica and one cloud replica, each side's purely local check is enough:
//! the channel never reserves a unit it was not granted, the store never grants a unit it does
//! not have free, and a store whose till respects the hold never leaves an order uncovered.

use std::collections::BTreeSet;

use proptest::prelude::*;
use shared::escrow::EscrowTotals;
use shared::*;

const SKUS: [&str; 2] = ["A", "B"];
const INITIAL_ON_HAND: i128 = 30;
const SAFETY: u64 = 2;

fn key(sku: usize) -> EscrowKey {
    EscrowKey { store: StoreId::new("s1").unwrap(), sku: Sku::new(SKUS[sku]).unwrap() }
}

fn store() -> Side {
    Side::Store(StoreId::new("s1").unwrap())
}

/// One step of the two replicas' lives.
#[derive(Debug, Clone)]
enum Step {
    Grant {
        sku: usize,
        units: u64,
    },
    Reserve {
        sku: usize,
        units: u64,
    },
    Release {
        sku: usize,
        units: u64,
    },
    Cancel {
        sku: usize,
        pick: usize,
    },
    Fulfil {
        sku: usize,
        pick: usize,
    },
    /// A till sale: `polite` sells only what the store sees as free (a store that respects the
    /// hold); otherwise the whole quantity (till sales are never refused).
    Sale {
        sku: usize,
        units: u64,
        polite: bool,
    },
    Receipt {
        sku: usize,
        units: u64,
    },
    /// Someone attempts an operation that is not theirs.
    Foreign {
        sku: usize,
        which: usize,
    },
    /// Ship what the receiver has not seen yet; `split` delivers it as two pages, the later half
    /// first (pages may arrive in any order).
    Sync {
        to_cloud: bool,
        split: bool,
    },
}

fn steps(ops: std::ops::Range<usize>) -> impl Strategy<Value = Vec<Step>> {
    let sku = 0..SKUS.len();
    let step = prop_oneof![
        3 => (sku.clone(), 0u64..12).prop_map(|(sku, units)| Step::Grant { sku, units }),
        4 => (sku.clone(), 0u64..6).prop_map(|(sku, units)| Step::Reserve { sku, units }),
        1 => (sku.clone(), 0u64..6).prop_map(|(sku, units)| Step::Release { sku, units }),
        2 => (sku.clone(), 0usize..8).prop_map(|(sku, pick)| Step::Cancel { sku, pick }),
        2 => (sku.clone(), 0usize..8).prop_map(|(sku, pick)| Step::Fulfil { sku, pick }),
        2 => (sku.clone(), 0u64..10, proptest::bool::weighted(0.8)).prop_map(|(sku, units, polite)| Step::Sale { sku, units, polite }),
        1 => (sku.clone(), 0u64..10).prop_map(|(sku, units)| Step::Receipt { sku, units }),
        1 => (sku, 0usize..5).prop_map(|(sku, which)| Step::Foreign { sku, which }),
        4 => (any::<bool>(), any::<bool>()).prop_map(|(to_cloud, split)| Step::Sync { to_cloud, split }),
    ];
    proptest::collection::vec(step, ops)
}

/// How syncs ship rows: as deltas since the receiver's cursor (the real sync), or full states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shipping {
    Delta,
    Full,
}

/// What the replicas were told, from the outside: the ground truth the states must agree with.
#[derive(Debug, Default)]
struct Truth {
    granted: [u64; 2],
    reserved: [u64; 2],
    released: [u64; 2],
    handed_over: [u64; 2],
    on_hand: [i128; 2],
    /// A till sale went beyond what the store saw as free: orders may now be at risk.
    oversold: [bool; 2],
    cancelled: BTreeSet<OrderId>,
    fulfilled: BTreeSet<OrderId>,
}

struct World {
    shop: EscrowState,
    cloud: EscrowState,
    /// What the shop has merged of the cloud, and the cloud of the shop (local versions).
    shop_cursor: u64,
    cloud_cursor: u64,
    next_order: u64,
    truth: Truth,
    /// Outcome of every step, to compare runs.
    trace: Vec<String>,
}

impl World {
    fn new() -> World {
        World {
            shop: EscrowState::new(),
            cloud: EscrowState::new(),
            shop_cursor: 0,
            cloud_cursor: 0,
            next_order: 0,
            truth: Truth { on_hand: [INITIAL_ON_HAND; 2], ..Truth::default() },
            trace: Vec::new(),
        }
    }

    /// The state everyone would reach if all rows were exchanged now.
    fn everything(&self) -> EscrowState {
        let mut all = self.shop.clone();
        all.merge(&self.cloud.rows()).unwrap();
        all
    }

    fn step(&mut self, step: &Step, shipping: Shipping) -> Result<(), TestCaseError> {
        let outcome = match *step {
            Step::Grant { sku, units } => {
                let seen = self.shop.escrow(&key(sku));
                let free = seen.free(self.truth.on_hand[sku], SAFETY);
                let op = EscrowOp::Grant { units, on_hand: self.truth.on_hand[sku], safety_stock: SAFETY };
                let result = self.shop.apply(&store(), &key(sku), op);
                match &result {
                    Ok(_) => {
                        prop_assert!(units > 0 && i128::from(units) <= free, "granted {units} with {free} free");
                        self.truth.granted[sku] += units;
                    }
                    Err(EscrowError::ZeroUnits { .. }) => prop_assert_eq!(units, 0),
                    Err(EscrowError::InsufficientFreeStock { free: said, wanted, .. }) => {
                        prop_assert!(i128::from(units) > free, "refused {units} with {free} free");
                        prop_assert_eq!((*said, *wanted), (free, units));
                    }
                    Err(e) => prop_assert!(false, "unexpected refusal {e}"),
                }
                format!("{result:?}")
            }
            Step::Reserve { sku, units } => {
                self.next_order += 1;
                let order = OrderId::new(format!("o{}", self.next_order)).unwrap();
                let rights = self.cloud.escrow(&key(sku)).cloud_rights();
                let result = self.cloud.apply(&Side::Cloud, &key(sku), EscrowOp::Reserve { order, units });
                match &result {
                    Ok(a) => {
                        prop_assert!(a.changed && units > 0 && i128::from(units) <= rights);
                        self.truth.reserved[sku] += units;
                    }
                    Err(EscrowError::ZeroUnits { .. }) => prop_assert_eq!(units, 0),
                    Err(EscrowError::InsufficientAllocation { available, wanted, .. }) => {
                        prop_assert!(i128::from(units) > rights);
                        prop_assert_eq!((*available, *wanted), (rights, units));
                    }
                    Err(e) => prop_assert!(false, "unexpected refusal {e}"),
                }
                format!("{result:?}")
            }
            Step::Release { sku, units } => {
                let rights = self.cloud.escrow(&key(sku)).cloud_rights();
                let result = self.cloud.apply(&Side::Cloud, &key(sku), EscrowOp::Release { units });
                match &result {
                    Ok(_) => {
                        prop_assert!(units > 0 && i128::from(units) <= rights);
                        self.truth.released[sku] += units;
                    }
                    Err(EscrowError::ZeroUnits { .. }) => prop_assert_eq!(units, 0),
                    Err(EscrowError::ReleaseExceedsRights { available, .. }) => {
                        prop_assert!(i128::from(units) > rights);
                        prop_assert_eq!(*available, rights);
                    }
                    Err(e) => prop_assert!(false, "unexpected refusal {e}"),
                }
                format!("{result:?}")
            }
            Step::Cancel { sku, pick } => {
                let orders = self.cloud.escrow(&key(sku)).orders();
                let Some(seen) = orders.get(pick % orders.len().max(1)).cloned() else {
                    self.trace.push("no order to cancel".into());
                    return Ok(());
                };
                let result = self.cloud.apply(&Side::Cloud, &key(sku), EscrowOp::Cancel { order: seen.order.clone() });
                match (&result, seen.status) {
                    (Ok(a), OrderStatus::Reserved) => {
                        prop_assert!(a.changed);
                        self.truth.cancelled.insert(seen.order.clone());
                    }
                    (Ok(a), OrderStatus::Cancelled | OrderStatus::CancelledButFulfilled) => prop_assert!(!a.changed),
                    (Err(EscrowError::AlreadyFulfilled { .. }), OrderStatus::Fulfilled) => {}
                    (other, status) => prop_assert!(false, "cancel of a {status:?} order gave {other:?}"),
                }
                format!("{result:?}")
            }
            Step::Fulfil { sku, pick } => {
                let orders = self.shop.escrow(&key(sku)).orders();
                let Some(seen) = orders.get(pick % orders.len().max(1)).cloned() else {
                    self.trace.push("no order to fulfil".into());
                    return Ok(());
                };
                let result = self.shop.apply(&store(), &key(sku), EscrowOp::Fulfil { order: seen.order.clone() });
                match (&result, seen.status) {
                    (Ok(a), OrderStatus::Reserved) => {
                        prop_assert!(a.changed);
                        prop_assert_eq!(a.stock_out, seen.units);
                        self.truth.on_hand[sku] -= i128::from(a.stock_out);
                        self.truth.handed_over[sku] += a.stock_out;
                        self.truth.fulfilled.insert(seen.order.clone());
                    }
                    (Ok(a), OrderStatus::Fulfilled | OrderStatus::CancelledButFulfilled) => {
                        prop_assert_eq!((a.changed, a.stock_out), (false, 0));
                    }
                    // Issue 7: cancelled by HQ while the store was offline, seen since: refused,
                    // nothing moves.
                    (Err(EscrowError::OrderCancelled { .. }), OrderStatus::Cancelled) => {}
                    (other, status) => prop_assert!(false, "fulfil of a {status:?} order gave {other:?}"),
                }
                format!("{result:?}")
            }
            Step::Sale { sku, units, polite } => {
                let free = self.shop.escrow(&key(sku)).free(self.truth.on_hand[sku], SAFETY);
                let sold = if polite { units.min(u64::try_from(free.max(0)).unwrap()) } else { units };
                if i128::from(sold) > free {
                    self.truth.oversold[sku] = true;
                }
                self.truth.on_hand[sku] -= i128::from(sold);
                format!("sold {sold}")
            }
            Step::Receipt { sku, units } => {
                self.truth.on_hand[sku] += i128::from(units);
                format!("received {units}")
            }
            Step::Foreign { sku, which } => {
                let order = self.shop.escrow(&key(sku)).orders().first().map(|o| o.order.clone());
                let order = order.unwrap_or_else(|| OrderId::new("o-none").unwrap());
                let other = Side::Store(StoreId::new("s2").unwrap());
                let (side, op) = match which {
                    0 => (store(), EscrowOp::Reserve { order, units: 1 }),
                    1 => (store(), EscrowOp::Release { units: 1 }),
                    2 => (store(), EscrowOp::Cancel { order }),
                    3 => (Side::Cloud, EscrowOp::Grant { units: 1, on_hand: 1_000, safety_stock: 0 }),
                    _ => (other, EscrowOp::Fulfil { order }),
                };
                let (shop, cloud) = (self.shop.rows(), self.cloud.rows());
                let target = if side == Side::Cloud { &mut self.cloud } else { &mut self.shop };
                let result = target.apply(&side, &key(sku), op);
                prop_assert!(matches!(result, Err(EscrowError::NotOwner { .. })), "{result:?}");
                prop_assert_eq!((self.shop.rows(), self.cloud.rows()), (shop, cloud), "a refusal changed state");
                format!("{result:?}")
            }
            Step::Sync { to_cloud, split } => {
                let (from, to, cursor) = if to_cloud {
                    (&self.shop, &mut self.cloud, &mut self.cloud_cursor)
                } else {
                    (&self.cloud, &mut self.shop, &mut self.shop_cursor)
                };
                let rows = match shipping {
                    Shipping::Delta => from.delta_since(*cursor),
                    Shipping::Full => from.rows(),
                };
                *cursor = from.version();
                // Only the owner's rows travel: what the receiving side would check.
                let writer = if to_cloud { store() } else { Side::Cloud };
                let own: Vec<EscrowRow> = rows.into_iter().filter(|r| r.owner() == writer).collect();
                if split {
                    let (first, second) = own.split_at(own.len() / 2);
                    to.merge(second).unwrap();
                    check_replica(to, &self.truth)?;
                    to.merge(first).unwrap();
                } else {
                    to.merge(&own).unwrap();
                }
                format!("synced to_cloud={to_cloud}")
            }
        };
        self.trace.push(outcome);
        self.check()
    }

    /// The invariants, after every step.
    fn check(&self) -> Result<(), TestCaseError> {
        check_replica(&self.shop, &self.truth)?;
        check_replica(&self.cloud, &self.truth)?;
        let all = self.everything();
        for sku in 0..SKUS.len() {
            let on_hand = self.truth.on_hand[sku];
            let mine = self.shop.escrow(&key(sku));
            let truth = all.escrow(&key(sku));
            let t = truth.totals();
            // Conservation against what the replicas were told.
            prop_assert_eq!(t.granted, self.truth.granted[sku], "granted");
            prop_assert_eq!(t.reserved, self.truth.reserved[sku], "reserved");
            prop_assert_eq!(t.released, self.truth.released[sku], "released");
            prop_assert_eq!(t.fulfilled, self.truth.handed_over[sku], "handed over");
            // No unit promised twice: what is waiting or handed over fits in what was granted
            // and not given back.
            prop_assert!(t.promised + t.fulfilled + t.cancelled + t.released <= t.granted);
            // The store's view of what it must hold back is never below the truth.
            prop_assert!(
                mine.committed() >= truth.committed(),
                "store sees {} committed, truth {}",
                mine.committed(),
                truth.committed()
            );
            if !self.truth.oversold[sku] {
                prop_assert!(
                    mine.free(on_hand, SAFETY) >= 0,
                    "free {} without an oversale",
                    mine.free(on_hand, SAFETY)
                );
                prop_assert!(truth.committed() <= on_hand - i128::from(SAFETY));
                prop_assert_eq!(mine.at_risk(on_hand), 0);
                prop_assert_eq!(truth.at_risk(on_hand), 0);
            }
            let risky = mine.orders_at_risk(on_hand);
            prop_assert_eq!(risky.is_empty(), mine.at_risk(on_hand) == 0);
            prop_assert!(risky.iter().map(|o| o.units).sum::<u64>() >= mine.at_risk(on_hand));
        }
        let conflicts: BTreeSet<OrderId> =
            (0..SKUS.len()).flat_map(|s| all.escrow(&key(s)).conflicts()).map(|o| o.order).collect();
        let both: BTreeSet<OrderId> = self.truth.cancelled.intersection(&self.truth.fulfilled).cloned().collect();
        prop_assert_eq!(conflicts, both, "cancelled-and-handed-over orders");
        Ok(())
    }
}

/// What must hold at any replica after any step or merge, whatever it has seen.
fn check_replica(state: &EscrowState, truth: &Truth) -> Result<(), TestCaseError> {
    for sku in 0..SKUS.len() {
        let e = state.escrow(&key(sku));
        let t: EscrowTotals = e.totals();
        prop_assert!(
            t.reserved + t.released <= t.granted,
            "reserved {} + released {} > granted {}",
            t.reserved,
            t.released,
            t.granted
        );
        prop_assert!(t.reserved <= t.granted, "units reserved online exceed units granted");
        prop_assert!(e.cloud_rights() >= 0);
        prop_assert_eq!(i128::from(t.granted), e.cloud_rights() + i128::from(t.reserved) + i128::from(t.released));
        prop_assert_eq!(t.reserved, t.promised + t.fulfilled + t.cancelled);
        prop_assert!(t.granted <= truth.granted[sku] && t.reserved <= truth.reserved[sku]);
    }
    Ok(())
}

fn play(steps: &[Step], shipping: Shipping) -> Result<World, TestCaseError> {
    let mut world = World::new();
    for step in steps {
        world.step(step, shipping)?;
    }
    Ok(world)
}

fn merged(a: &EscrowState, b: &EscrowState) -> Vec<EscrowRow> {
    let mut m = a.clone();
    m.merge(&b.rows()).unwrap();
    m.rows()
}

proptest! {
    #[test]
    fn escrow_merge_is_idempotent_commutative_associative(s in steps(0..80), cut in 0usize..80) {
        // Three states of one history: the shop, the cloud, and the cloud as it was mid-way.
        let cut = cut.min(s.len());
        let mid = play(&s[..cut], Shipping::Delta)?.cloud;
        let end = play(&s, Shipping::Delta)?;
        let (a, b, c) = (&end.shop, &end.cloud, &mid);
        prop_assert_eq!(merged(a, a), a.rows());
        prop_assert_eq!(merged(a, b), merged(b, a));
        let mut ab = a.clone(); ab.merge(&b.rows()).unwrap();
        let mut bc = b.clone(); bc.merge(&c.rows()).unwrap();
        prop_assert_eq!(merged(&ab, c), merged(a, &bc));
        // Merging a state that is already included changes nothing and reports nothing.
        let mut again = ab.clone();
        prop_assert!(again.merge(&a.rows()).unwrap().is_empty());
        prop_assert_eq!(again.rows(), ab.rows());
    }

    #[test]
    fn delta_merge_equals_full_state_merge(s in steps(0..80)) {
        let by_delta = play(&s, Shipping::Delta)?;
        let by_full = play(&s, Shipping::Full)?;
        prop_assert_eq!(&by_delta.trace, &by_full.trace);
        prop_assert_eq!(by_delta.shop.rows(), by_full.shop.rows());
        prop_assert_eq!(by_delta.cloud.rows(), by_full.cloud.rows());
    }

    #[test]
    fn local_checks_keep_the_bounds_under_partitions(s in steps(0..150)) {
        // `play` checks every invariant after every step (and between split pages).
        let mut world = play(&s, Shipping::Delta)?;
        // Reconnect: both ways, twice; then both replicas hold the same rows.
        for to_cloud in [true, false, true, false] {
            world.step(&Step::Sync { to_cloud, split: false }, Shipping::Delta)?;
        }
        prop_assert_eq!(world.shop.rows(), world.cloud.rows(), "replicas differ after reconnecting");
        prop_assert_eq!(world.shop.rows(), world.everything().rows());
    }

    #[test]
    fn merging_rows_in_any_order_and_grouping_converges(
        s in steps(0..80),
        order in Just((0..200usize).collect::<Vec<_>>()).prop_shuffle(),
        pages in 1usize..6,
    ) {
        let world = play(&s, Shipping::Delta)?;
        let expected = world.everything().rows();
        let rows = expected.clone();
        let shuffled: Vec<EscrowRow> = order.iter().filter(|&&i| i < rows.len()).map(|&i| rows[i].clone()).collect();
        let mut state = EscrowState::new();
        for page in shuffled.chunks(shuffled.len().div_ceil(pages).max(1)) {
            state.merge(page).unwrap();
            state.merge(page).unwrap();
        }
        prop_assert_eq!(state.rows(), expected);
    }
}

#[test]
fn the_store_offline_story() {
    // The store grants 5 of 10 and goes offline. HQ reserves o1 (2) and o2 (3), then cancels
    // o1. Offline, the store sells 6 at the till (one more than its 5 free: a till never refuses)
    // and hands o1 over to a customer who came in. On reconnecting, o1 is a conflict for HQ to
    // settle, and the 2 units left do not cover o2 (3): the shortage names o2.
    let k = key(0);
    let mut shop = EscrowState::new();
    let mut cloud = EscrowState::new();
    shop.apply(&store(), &k, EscrowOp::Grant { units: 5, on_hand: 10, safety_stock: 0 }).unwrap();
    cloud.merge(&shop.rows()).unwrap();
    let o1 = OrderId::new("o1").unwrap();
    let o2 = OrderId::new("o2").unwrap();
    cloud.apply(&Side::Cloud, &k, EscrowOp::Reserve { order: o1.clone(), units: 2 }).unwrap();
    shop.merge(&cloud.rows()).unwrap();
    cloud.apply(&Side::Cloud, &k, EscrowOp::Reserve { order: o2.clone(), units: 3 }).unwrap();
    cloud.apply(&Side::Cloud, &k, EscrowOp::Cancel { order: o1.clone() }).unwrap();
    let err = cloud.apply(&Side::Cloud, &k, EscrowOp::Reserve { order: OrderId::new("o3").unwrap(), units: 1 });
    assert!(matches!(err, Err(EscrowError::InsufficientAllocation { available: 0, wanted: 1, .. })), "{err:?}");

    let mut on_hand = 10i128;
    assert_eq!(shop.escrow(&k).free(on_hand, 0), 5);
    on_hand -= 6;
    let handed = shop.apply(&store(), &k, EscrowOp::Fulfil { order: o1.clone() }).unwrap();
    on_hand -= i128::from(handed.stock_out);
    assert_eq!(on_hand, 2);
    // Before reconnecting the store knows of no waiting order, but its free stock is negative:
    // the channel holds 3 rights the shelf no longer covers.
    assert_eq!(shop.escrow(&k).at_risk(on_hand), 0);
    assert_eq!(shop.escrow(&k).free(on_hand, 0), -1);

    shop.merge(&cloud.rows()).unwrap();
    cloud.merge(&shop.rows()).unwrap();
    assert_eq!(shop.rows(), cloud.rows());
    let e = shop.escrow(&k);
    assert_eq!(e.order(&o1).unwrap().status, OrderStatus::CancelledButFulfilled);
    assert_eq!(e.conflicts().len(), 1);
    assert_eq!(e.promised(), 3);
    assert_eq!(e.at_risk(on_hand), 1);
    let risky: Vec<OrderId> = e.orders_at_risk(on_hand).into_iter().map(|o| o.order).collect();
    assert_eq!(risky, [o2]);
}
