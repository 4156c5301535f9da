//! When a price change reaches the till, so that no customer pays more than the shelf shows
//! (weights-and-measures rules: lower the till before the shelf, raise the shelf before the
//! till). The till charges the effective price, except that for a SKU with labels it never
//! charges more than the lowest price any of its labels may be showing: the price they all last
//! *confirmed*, or a lower one sent to them since. That holds until the deadline after the
//! increase was first seen (then the new price is charged and the lagging labels are listed for
//! staff). The check happens at the lookup itself, so there is no moment between a price
//! increase being committed and the hold taking effect.
//!
//! Under [`ChargePolicy::LowerOfShelfAndSystem`] the till also never charges more than the
//! lowest price a label of the SKU *confirmed* showing (told by the label task, see
//! [`TillPrices::set_shelf`]): a label that never took an increase keeps its old, lower price
//! charged after the deadline too, until it shows the new one.

use std::collections::HashMap;

use shared::{Money, PriceVersion, Sku};

/// What the till charges when a label and the system disagree (`[lane] charge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargePolicy {
    /// The system's price, within the increase rule above.
    System,
    /// Also never more than what a label of the product confirmed it shows right now. The
    /// default: price-accuracy rules in many places (and customers everywhere) expect the
    /// lowest displayed price to be honoured, so a label that missed an update never makes the
    /// till charge more than the shelf says.
    #[default]
    LowerOfShelfAndSystem,
}

/// A price a label shows: its regular price and, until its end (Unix ms), a promotion price.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShelfPrice {
    pub regular: Money,
    pub promo: Option<(Money, u64)>,
}

impl ShelfPrice {
    /// What the label offers at `now_ms`: the promotion until it ends, then the regular price
    /// (the label prints the promotion's end, so it no longer binds after it).
    pub fn at(&self, now_ms: u64) -> Money {
        match self.promo {
            Some((p, until)) if now_ms < until => p,
            _ => self.regular,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct SkuState {
    /// The price every label of the SKU confirmed showing.
    confirmed: Option<(Money, PriceVersion)>,
    /// The lowest price sent to its labels since they last all confirmed one.
    floor: Option<(Money, PriceVersion)>,
    /// An increase not yet confirmed: its version, when it was first seen, whether its deadline
    /// was reported.
    increase: Option<(PriceVersion, u64, bool)>,
    /// The distinct contents its labels confirmed showing (empty: none known).
    shelf: Vec<ShelfPrice>,
}

/// An increase whose deadline passed before its labels confirmed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadlinePassed {
    pub sku: Sku,
    pub pending: PriceVersion,
}

#[derive(Debug, Default)]
pub struct TillPrices {
    deadline_ms: u64,
    skus: HashMap<Sku, SkuState>,
}

impl TillPrices {
    pub fn new(deadline_ms: u64) -> TillPrices {
        TillPrices { deadline_ms, skus: HashMap::new() }
    }

    /// `price` is about to be sent to the labels of `sku` (call before sending).
    pub fn on_rendered(&mut self, sku: &Sku, price: (Money, PriceVersion)) {
        let state = self.skus.entry(sku.clone()).or_default();
        if state.floor.as_ref().is_none_or(|f| price.0.minor < f.0.minor) {
            state.floor = Some(price);
        }
    }

    /// Every label of `sku` shows `price` (from this version).
    pub fn on_labels_confirmed(&mut self, sku: &Sku, price: (Money, PriceVersion)) {
        let state = self.skus.entry(sku.clone()).or_default();
        if state.increase.as_ref().is_some_and(|(v, _, _)| *v == price.1) {
            state.increase = None;
        }
        state.confirmed = Some(price);
        state.floor = None;
    }

    /// The prices the labels of `sku` confirmed showing now, one per distinct content (the label
    /// task calls it whenever that set changes).
    pub fn set_shelf(&mut self, sku: &Sku, shown: Vec<ShelfPrice>) {
        match self.skus.get_mut(sku) {
            Some(state) => state.shelf = shown,
            None if shown.is_empty() => {}
            None => self.skus.entry(sku.clone()).or_default().shelf = shown,
        }
    }

    /// The lowest price a label of `sku` confirmed showing, at `now_ms`.
    pub fn shelf(&self, sku: &Sku, now_ms: u64) -> Option<Money> {
        self.skus.get(sku)?.shelf.iter().map(|p| p.at(now_ms)).min_by_key(|m| m.minor)
    }

    /// What the till charges for `sku` whose effective price is `effective` at `now_ms`.
    pub fn charge(
        &mut self,
        sku: &Sku,
        effective: (Money, PriceVersion),
        shelf: Option<Money>,
        policy: ChargePolicy,
        now_ms: u64,
    ) -> (Money, PriceVersion) {
        let deadline_ms = self.deadline_ms;
        let system = match self.skus.get_mut(sku) {
            Some(state) => {
                // The lowest price a label of this SKU may be showing: the one they all
                // confirmed, or a lower one sent to them since.
                let lowest = match (&state.confirmed, &state.floor) {
                    (Some(c), Some(f)) if f.0.minor < c.0.minor => Some(f.clone()),
                    (Some(c), _) => Some(c.clone()),
                    (None, f) => f.clone(),
                };
                match lowest {
                    Some(c) if c.0.currency == effective.0.currency && effective.0.minor > c.0.minor => {
                        let first_seen = match &state.increase {
                            Some((v, at, _)) if *v == effective.1 => *at,
                            _ => {
                                state.increase = Some((effective.1.clone(), now_ms, false));
                                now_ms
                            }
                        };
                        if now_ms.saturating_sub(first_seen) >= deadline_ms {
                            effective
                        } else {
                            c
                        }
                    }
                    _ => effective,
                }
            }
            None => effective,
        };
        match (policy, shelf) {
            (ChargePolicy::LowerOfShelfAndSystem, Some(s))
                if s.currency == system.0.currency && s.minor < system.0.minor =>
            {
                (s, system.1)
            }
            _ => system,
        }
    }

    /// Increases whose deadline passed since the last poll, each reported once.
    pub fn poll(&mut self, now_ms: u64) -> Vec<DeadlinePassed> {
        let mut out = Vec::new();
        for (sku, state) in &mut self.skus {
            if let Some((v, at, reported)) = &mut state.increase {
                if !*reported && now_ms.saturating_sub(*at) >= self.deadline_ms {
                    *reported = true;
                    out.push(DeadlinePassed { sku: sku.clone(), pending: v.clone() });
                }
            }
        }
        out.sort_by(|a, b| a.sku.cmp(&b.sku));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{ActorId, Currency, HlcStamp, PriceScope, PriceSlot};

    fn v(wall: u64) -> PriceVersion {
        PriceVersion {
            scope: PriceScope::Chain,
            slot: PriceSlot::Regular,
            stamp: HlcStamp { wall_ms: wall, logical: 0, actor: ActorId::cloud() },
        }
    }
    fn eur(c: i64) -> Money {
        Money::new(c, Currency::new("EUR").unwrap())
    }
    fn milk() -> Sku {
        Sku::new("MILK").unwrap()
    }

    #[test]
    fn a_decrease_is_charged_at_once_an_increase_after_the_labels() {
        let mut t = TillPrices::new(60_000);
        let sys = ChargePolicy::System;
        assert_eq!(
            t.charge(&milk(), (eur(119), v(1)), None, sys, 0).0.minor,
            119,
            "no labels confirmed yet: system price"
        );
        t.on_labels_confirmed(&milk(), (eur(119), v(1)));
        assert_eq!(t.charge(&milk(), (eur(99), v(2)), None, sys, 1).0.minor, 99, "a decrease at once");
        t.on_labels_confirmed(&milk(), (eur(99), v(2)));
        assert_eq!(
            t.charge(&milk(), (eur(129), v(3)), None, sys, 2),
            (eur(99), v(2)),
            "the confirmed price until the labels show more"
        );
        t.on_labels_confirmed(&milk(), (eur(129), v(3)));
        assert_eq!(t.charge(&milk(), (eur(129), v(3)), None, sys, 3).0.minor, 129);
    }

    #[test]
    fn the_deadline_releases_an_increase_once_and_reports_it() {
        let mut t = TillPrices::new(1_000);
        t.on_labels_confirmed(&milk(), (eur(99), v(1)));
        let sys = ChargePolicy::System;
        assert_eq!(t.charge(&milk(), (eur(119), v(2)), None, sys, 10).0.minor, 99);
        assert!(t.poll(500).is_empty());
        assert_eq!(t.charge(&milk(), (eur(119), v(2)), None, sys, 1_010).0.minor, 119);
        assert_eq!(t.poll(1_010), vec![DeadlinePassed { sku: milk(), pending: v(2) }]);
        assert!(t.poll(5_000).is_empty(), "reported once");
        // A further increase starts its own clock.
        assert_eq!(t.charge(&milk(), (eur(139), v(3)), None, sys, 1_020).0.minor, 99);
    }

    #[test]
    fn an_increase_racing_an_unconfirmed_decrease_charges_the_lowest_shelf_price() {
        let mut t = TillPrices::new(60_000);
        let sys = ChargePolicy::System;
        t.on_labels_confirmed(&milk(), (eur(119), v(1)));
        t.on_rendered(&milk(), (eur(99), v(2))); // sent, not all confirmed yet
        t.on_rendered(&milk(), (eur(129), v(3)));
        assert_eq!(t.charge(&milk(), (eur(129), v(3)), None, sys, 0).0.minor, 99, "some label may show 0.99");
        t.on_labels_confirmed(&milk(), (eur(129), v(3)));
        assert_eq!(t.charge(&milk(), (eur(129), v(3)), None, sys, 1).0.minor, 129);
    }

    #[test]
    fn lower_of_shelf_and_system() {
        let mut t = TillPrices::new(1_000);
        let eff = (eur(129), v(3));
        let lower = ChargePolicy::LowerOfShelfAndSystem;
        assert_eq!(t.charge(&milk(), eff.clone(), Some(eur(119)), lower, 0).0.minor, 119);
        assert_eq!(t.charge(&milk(), eff.clone(), Some(eur(139)), lower, 0).0.minor, 129);
        assert_eq!(t.charge(&milk(), eff, Some(eur(119)), ChargePolicy::System, 0).0.minor, 129);
    }

    #[test]
    fn the_shelf_is_the_lowest_confirmed_price_and_a_promotion_ends() {
        let mut t = TillPrices::new(1_000);
        assert_eq!(t.shelf(&milk(), 0), None);
        let promo = ShelfPrice { regular: eur(129), promo: Some((eur(89), 5_000)) };
        t.set_shelf(&milk(), vec![ShelfPrice { regular: eur(119), promo: None }, promo]);
        assert_eq!(t.shelf(&milk(), 4_999), Some(eur(89)));
        assert_eq!(t.shelf(&milk(), 5_000), Some(eur(119)), "an ended promotion no longer binds");
        t.set_shelf(&milk(), Vec::new());
        assert_eq!(t.shelf(&milk(), 0), None);
    }

    #[test]
    fn a_label_that_missed_an_increase_keeps_its_price_charged_past_the_deadline() {
        let mut t = TillPrices::new(1_000);
        t.on_labels_confirmed(&milk(), (eur(99), v(1)));
        // One label applied 1.19, another still shows 0.99.
        t.set_shelf(
            &milk(),
            vec![ShelfPrice { regular: eur(99), promo: None }, ShelfPrice { regular: eur(119), promo: None }],
        );
        let eff = (eur(119), v(2));
        for policy in [ChargePolicy::System, ChargePolicy::LowerOfShelfAndSystem] {
            let shelf = t.shelf(&milk(), 0);
            assert_eq!(t.charge(&milk(), eff.clone(), shelf, policy, 0).0.minor, 99, "{policy:?}: held");
        }
        let shelf = t.shelf(&milk(), 2_000);
        assert_eq!(t.charge(&milk(), eff.clone(), shelf, ChargePolicy::System, 2_000).0.minor, 119, "deadline");
        let (price, version) = t.charge(&milk(), eff, shelf, ChargePolicy::LowerOfShelfAndSystem, 2_000);
        assert_eq!((price.minor, version), (99, v(2)), "the shelf price, recorded against the system's version");
    }
}
