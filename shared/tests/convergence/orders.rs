//! The online-order side of the simulated world (DESIGN 5 and 13.5, issue 7): the stores'
//! allocation policy and handovers, HQ's orders, cancellations, expiries and releases, each
//! checked as it happens; the allocation invariants after every step; and, after full sync,
//! one status per order everywhere and every unit accounted for once.

use std::collections::BTreeSet;

use rand::Rng;
use shared::orders::{pickup_code_digest, OrderLine};
use shared::{EscrowError, EscrowKey, OrderHeader, OrderId, OrderStatus};

use crate::online::{check_key, line_keys, Counted, Handover, HandoverRefusal, OrderRefused};
use crate::{Flow, World};

impl World {
    /// A customer takes every unit the shelf shows: the till does not know about online orders.
    pub(super) fn clear_shelf(&mut self) {
        let (s, k) = (self.pick_store(), self.pick_online_sku());
        let on_hand = self.nodes[s].store.value(&self.skus[k]);
        let units = (on_hand - i128::from(self.rng.gen_range(0..=2))).clamp(1, 500);
        self.sale(s, k, i64::try_from(units).expect("clamped"));
    }

    /// The store's allocation policy: top the online channel's rights up to a random target,
    /// keeping a random safety stock, from what this replica sees. Most of the time it asks for
    /// what it sees free; sometimes for the whole shortfall, for its own check to refuse.
    pub(super) fn grant(&mut self) {
        let (s, k) = (self.pick_store(), self.pick_online_sku());
        let sku = self.skus[k].clone();
        let target: i128 = self.rng.gen_range(4..=24);
        let safety: u64 = self.rng.gen_range(0..=4);
        let store = &self.nodes[s].store;
        let key = store.escrow_key(&sku);
        let local = store.escrow.escrow(&key);
        let seen = Counted::of(&local.rows());
        let on_hand = store.value(&sku);
        let free = on_hand - seen.committed() - i128::from(safety);
        let shortfall = target - seen.rights();
        let units = if self.rng.gen_bool(0.75) { shortfall.min(free) } else { shortfall };
        if units <= 0 {
            return;
        }
        // Every row either side holds: the cloud's changes this store has not seen yet only keep
        // or lower what it must hold back, so its view is never below the truth.
        let mut everything = local.clone();
        if let Some(at_cloud) = self.cloud.escrow(s).get(&key) {
            everything.merge(at_cloud).expect("the store's and the cloud's rows merge");
        }
        let truth = Counted::of(&everything.rows());
        assert!(
            truth.committed() <= seen.committed(),
            "s{s} {sku}: sees {} committed, the truth is {}",
            seen.committed(),
            truth.committed()
        );
        let units = u64::try_from(units).expect("positive");
        match self.nodes[s].store.grant(&sku, units, safety) {
            Ok(_) => {
                let wanted = i128::from(units);
                assert!(wanted <= free, "s{s} {sku}: granted {units} with {free} free (on hand {on_hand})");
                let truly_free = on_hand - truth.committed() - i128::from(safety);
                assert!(wanted <= truly_free, "s{s} {sku}: granted {units}, {truly_free} truly free");
                self.order_stats.grants += 1;
                self.note(format!("s{s} grants {units} of sku {k} online ({free} free)"));
            }
            Err(EscrowError::InsufficientFreeStock { free: said, .. }) => {
                assert!(i128::from(units) > free && said == free, "s{s} {sku}: refused {units} with {free} free");
                self.order_stats.grants_refused += 1;
                self.note(format!("s{s} may not grant {units} of sku {k}: {free} free"));
            }
            Err(e) => panic!("s{s} {sku}: a grant refused for another reason: {e}"),
        }
    }

    /// HQ's order system places an order of one to three lines at a random store, reserved
    /// against the online channel's rights there (whatever the store's connectivity); now and
    /// then it places an order again, as a retry would.
    pub(super) fn online_order(&mut self) {
        if !self.orders.is_empty() && self.rng.gen_bool(0.05) {
            let (s, id) = self.orders[self.rng.gen_range(0..self.orders.len())].clone();
            let header = self.cloud.order(s, &id).expect("a placed order").clone();
            let before = self.cloud.fingerprint();
            let again = self.cloud.reserve_order(header);
            assert!(matches!(again, Ok(false)), "placing order {id} again gave {again:?}");
            assert_eq!(self.cloud.fingerprint(), before, "placing an order again changed the cloud");
            self.order_stats.placed_again += 1;
            return;
        }
        let s = self.pick_store();
        let mut lines: Vec<OrderLine> = Vec::new();
        for _ in 0..self.rng.gen_range(1..=3) {
            let k = self.pick_online_sku();
            let sku = self.skus[k].clone();
            if lines.iter().all(|l| l.sku != sku) {
                lines.push(OrderLine { sku, units: self.rng.gen_range(1..=4) });
            }
        }
        self.next_order += 1;
        let id = OrderId::new(format!("W{:07}", self.next_order)).expect("a valid order id");
        let code = format!("{:06}", self.rng.gen_range(0..1_000_000));
        let now = i64::try_from(self.cloud_now()).expect("simulated time fits i64");
        // Pickup windows of a twentieth to a third of the run: some orders expire uncollected.
        let window_ops = self.rng.gen_range(self.scale.ops / 20..=self.scale.ops / 3);
        let header = OrderHeader {
            pickup_code_digest: pickup_code_digest(&id, &code),
            order: id.clone(),
            store: self.nodes[s].store.id.clone(),
            customer_ref: format!("customer {}", self.rng.gen_range(0..10_000)),
            created_at_ms: now,
            expires_at_ms: now + i64::try_from(window_ops * 25).expect("small"),
            lines,
        };
        let summary = header.lines.iter().map(|l| format!("{}x{}", l.units, l.sku)).collect::<Vec<_>>().join(", ");
        let before = self.cloud.fingerprint();
        match self.cloud.reserve_order(header) {
            Ok(true) => {
                self.orders.push((s, id.clone()));
                self.codes.insert(id.clone(), code);
                self.order_stats.reserved += 1;
                self.note(format!("HQ places {id} at s{s}: {summary}"));
            }
            Err(OrderRefused::Allocation(EscrowError::InsufficientAllocation { .. })) => {
                assert_eq!(self.cloud.fingerprint(), before, "a refused order changed the cloud");
                self.order_stats.refused_allocation += 1;
                self.note(format!("HQ refuses {id} at s{s}: {summary} beyond the online allocation"));
            }
            Ok(false) => panic!("order {id} at s{s}: a new order id was already placed"),
            Err(OrderRefused::Header(e)) => panic!("order {id} at s{s}: a bad header: {e}"),
            Err(OrderRefused::Allocation(e)) => panic!("order {id} at s{s}: refused for another reason: {e}"),
        }
    }

    /// A customer comes for an order the store knows, mostly a recent one (sometimes with a
    /// mistyped code, sometimes again for one collected already).
    pub(super) fn hand_over(&mut self) {
        let s = self.pick_store();
        let known = self.nodes[s].store.order_ids.len();
        if known == 0 {
            return;
        }
        let oldest = if self.rng.gen_bool(0.8) { known.saturating_sub(6) } else { 0 };
        let id = self.nodes[s].store.order_ids[self.rng.gen_range(oldest..known)].clone();
        let code = self.codes.get(&id).expect("HQ keeps every code it gave").clone();
        let typo = self.rng.gen_bool(0.05);
        let presented =
            if typo { format!("{:06}", (code.parse::<u32>().expect("digits") + 1) % 1_000_000) } else { code };
        let now = self.store_now(s);
        let outcome = self.nodes[s].store.hand_over(&id, &presented, now);
        match &outcome {
            Handover::Done(lines) => {
                assert!(!typo, "s{s} handed {id} over on a wrong code");
                assert!(self.handed.insert(id.clone()), "s{s} handed {id} over twice");
                for (sku, units) in lines.clone() {
                    let k = self.sku_index[&sku];
                    self.record_movement(s, k, Flow::HandOver, -i64::try_from(units).expect("small"));
                }
                self.order_stats.handed_over += 1;
            }
            Handover::Repeated => {
                assert!(self.handed.contains(&id), "s{s} says {id} was handed over; it never was");
                self.order_stats.handover_repeated += 1;
            }
            Handover::Refused(HandoverRefusal::WrongCode) => {
                assert!(typo, "s{s} refused the right code for {id}");
                self.order_stats.wrong_codes += 1;
            }
            Handover::Refused(HandoverRefusal::Cancelled(e)) => {
                // What the counter staff read: it names the order and says not to hand it over.
                assert!(e.to_string().contains(&format!("order {id} ")), "{e}");
                self.order_stats.handover_refused_cancelled += 1;
            }
            Handover::Refused(HandoverRefusal::Expired) => self.order_stats.handover_refused_expired += 1,
            Handover::Refused(HandoverRefusal::AtRisk) => self.order_stats.handover_refused_at_risk += 1,
            Handover::Refused(HandoverRefusal::UnknownOrder) => panic!("s{s} lost the header of {id}"),
        }
        self.note(format!("s{s} customer for {id}: {outcome:?}"));
    }

    /// HQ cancels a random order (the customer changed their mind).
    pub(super) fn cancel(&mut self) {
        if self.orders.is_empty() {
            return;
        }
        let (s, id) = self.orders[self.rng.gen_range(0..self.orders.len())].clone();
        let outcome = self.cloud.cancel_order(s, &id);
        self.count_cancel(s, &id, &outcome, false);
        self.note(format!("HQ cancels {id} at s{s}: {outcome:?}"));
    }

    /// HQ's expiry sweep on the cloud's clock.
    pub(super) fn expire(&mut self) {
        let now = i64::try_from(self.cloud_now()).expect("simulated time fits i64");
        for (s, id, outcome) in self.cloud.expire(now) {
            self.count_cancel(s, &id, &outcome, true);
            self.note(format!("HQ expires {id} at s{s}: {outcome:?}"));
        }
    }

    fn count_cancel(&mut self, s: usize, id: &OrderId, outcome: &Result<bool, EscrowError>, expiry: bool) {
        let stats = &mut self.order_stats;
        match outcome {
            Ok(true) if expiry => stats.expired += 1,
            Ok(true) => stats.cancelled += 1,
            Ok(false) => stats.cancel_repeated += 1,
            Err(EscrowError::AlreadyFulfilled { .. }) => {
                assert!(self.handed.contains(id), "the cloud says s{s} handed {id} over; it never did");
                stats.cancel_refused_handed_over += 1;
            }
            Err(e) => panic!("cancelling {id} at s{s}: {e}"),
        }
    }

    /// HQ lowers a store's online allocation of a SKU (sometimes beyond what it holds).
    pub(super) fn release(&mut self) {
        let (s, k) = (self.pick_store(), self.pick_online_sku());
        let key = EscrowKey { store: self.nodes[s].store.id.clone(), sku: self.skus[k].clone() };
        let rights = self.cloud.escrow(s).get(&key).map_or(0, |e| e.cloud_rights());
        let units = if self.rng.gen_bool(0.8) { self.rng.gen_range(1..=rights.max(1)) } else { rights + 1 };
        let units = u64::try_from(units).expect("positive");
        match self.cloud.release(s, &self.skus[k].clone(), units) {
            Ok(_) => {
                assert!(i128::from(units) <= rights);
                self.order_stats.releases += 1;
            }
            Err(EscrowError::ReleaseExceedsRights { .. }) => {
                assert!(i128::from(units) > rights);
                self.order_stats.releases_refused += 1;
            }
            Err(e) => panic!("releasing {units} of {key}: {e}"),
        }
        self.note(format!("HQ releases {units} of sku {k} at s{s} ({rights} unreserved)"));
    }

    /// The allocation invariants on every key that changed on any replica since the last
    /// call: reserved + released <= granted and the library's counters agree with the rows
    /// (`online::check_key`); the cloud holds no grant the store did not make, and the store
    /// no cloud row the cloud did not write.
    pub(super) fn check_allocation(&mut self) {
        for s in 0..self.nodes.len() {
            for key in self.cloud.take_dirty(s) {
                let at_cloud = check_key("the cloud", self.cloud.escrow(s).get(&key).expect("a changed key"));
                let at_store = self.nodes[s].store.escrow.get(&key).map(|e| Counted::of(&e.rows())).unwrap_or_default();
                assert!(at_cloud.granted <= at_store.granted, "the cloud holds a grant of {key} the store never made");
            }
            for key in self.nodes[s].store.take_dirty() {
                let store = &self.nodes[s].store;
                let at_store = check_key(&format!("store s{s}"), store.escrow.get(&key).expect("a changed key"));
                let at_cloud = self.cloud.escrow(s).get(&key).map(|e| Counted::of(&e.rows())).unwrap_or_default();
                assert!(
                    at_store.reserved <= at_cloud.reserved && at_store.released <= at_cloud.released,
                    "store s{s} holds reservations or releases of {key} the cloud never made"
                );
            }
        }
    }

    /// After full sync: every order has the same status at the cloud and at its store, on every
    /// line; the handovers that moved stock are exactly the orders counted fulfilled; per key,
    /// the units handed over equal the escrow's fulfilled units, so the stock is the receipts
    /// minus the till sales minus the units of fulfilled orders (plus counts and transfers), and
    /// no order is both counted fulfilled and back in free stock (cancelled).
    pub(super) fn check_orders(&mut self) {
        let mut fulfilled_orders = BTreeSet::new();
        let mut stats = self.order_stats;
        for (s, id) in &self.orders {
            let store = &self.nodes[*s].store;
            let header = self.cloud.order(*s, id).expect("a placed order");
            assert_eq!(store.orders.get(id), Some(header), "s{s}: the header of {id}");
            let mut statuses = BTreeSet::new();
            for key in line_keys(header) {
                let at_cloud = self.cloud.escrow(*s).get(&key).and_then(|e| e.order(id)).expect("a reserved line");
                let at_store = store.escrow.get(&key).and_then(|e| e.order(id)).expect("a pulled line");
                assert_eq!(at_cloud, at_store, "order {id} line {key}: the cloud and s{s} disagree");
                statuses.insert(at_cloud.status);
            }
            assert_eq!(statuses.len(), 1, "order {id}: its lines stand differently: {statuses:?}");
            match statuses.first().expect("one status") {
                OrderStatus::Reserved => stats.final_waiting += 1,
                OrderStatus::Cancelled => stats.final_cancelled += 1,
                OrderStatus::Fulfilled => stats.final_fulfilled += 1,
                OrderStatus::CancelledButFulfilled => stats.final_cancelled_but_fulfilled += 1,
            }
            if matches!(statuses.first(), Some(OrderStatus::Fulfilled | OrderStatus::CancelledButFulfilled)) {
                fulfilled_orders.insert(id.clone());
            }
        }
        assert_eq!(fulfilled_orders, self.handed, "orders counted fulfilled against the handovers that moved stock");
        for s in 0..self.nodes.len() {
            let keys: Vec<EscrowKey> = self.cloud.escrow(s).keys().cloned().collect();
            for key in keys {
                let escrow = self.cloud.escrow(s).get(&key).expect("a listed key");
                let counted = check_key("the cloud after sync", escrow);
                let k = self.sku_index[&key.sku];
                let flows = self.flows.get(&(s, k)).copied().unwrap_or_default();
                assert_eq!(Ok(counted.fulfilled), u128::try_from(flows.handed_over), "{key}: units handed over");
                let totals = escrow.totals();
                let cancelled: u64 =
                    escrow.orders().iter().filter(|o| o.status == OrderStatus::Cancelled).map(|o| o.units).sum();
                assert_eq!(totals.cancelled, cancelled, "{key}: a handed-over order counted back in free stock");
                let stock = self.cloud.stock(s).value(&key.store, &key.sku);
                assert_eq!(
                    stock,
                    flows.receipts - flows.sales + flows.counted + flows.transferred
                        - i128::try_from(counted.fulfilled).expect("small"),
                    "{key}: stock against receipts, sales, counts, transfers and fulfilled orders"
                );
            }
        }
        self.order_stats = stats;
    }
}
