//! When a price change reaches the till, so that no customer pays more than the shelf shows
//! (weights-and-measures rules: lower the till before the shelf, raise the shelf before the
//! till). A decrease is charged at once while the labels follow; an increase is charged only
//! once every label of the SKU confirmed the new content, or at a deadline (then the lagging
//! labels are listed for staff). Until then the till keeps charging the old, lower price.
//! Also the charge policy for a shelf that still shows something else.

use std::collections::HashMap;

use shared::{Money, PriceVersion, Sku};

/// What the till charges when a label and the system disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChargePolicy {
    /// Always the system's price (the labels are trusted to follow).
    #[default]
    System,
    /// The lower of the shelf's and the system's price.
    LowerOfShelfAndSystem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Hold {
    /// The price the till keeps charging meanwhile.
    charge: (Money, PriceVersion),
    /// The new price waiting for its labels.
    pending: PriceVersion,
    deadline_ms: u64,
}

/// A hold released at its deadline with labels still lagging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadlinePassed {
    pub sku: Sku,
    pub pending: PriceVersion,
}

#[derive(Debug, Default)]
pub struct TillPrices {
    holds: HashMap<Sku, Hold>,
}

impl TillPrices {
    pub fn new() -> TillPrices {
        TillPrices::default()
    }

    /// The effective price of `sku` changed from `old` to `new`. Returns true when the till
    /// must wait for the labels (an increase), false when it charges the new price at once.
    pub fn on_price_change(
        &mut self,
        sku: &Sku,
        old: Option<(Money, PriceVersion)>,
        new: &(Money, PriceVersion),
        now_ms: u64,
        deadline_after_ms: u64,
    ) -> bool {
        // The lowest price of a chain of increases is the one still charged.
        let charged = self.holds.get(sku).map(|h| h.charge.clone()).or(old);
        match charged {
            Some(c) if new.0.currency == c.0.currency && new.0.minor > c.0.minor => {
                let deadline_ms = now_ms.saturating_add(deadline_after_ms);
                self.holds.insert(sku.clone(), Hold { charge: c, pending: new.1.clone(), deadline_ms });
                true
            }
            _ => {
                self.holds.remove(sku);
                false
            }
        }
    }

    /// Every label of `sku` confirmed the content of `version`: the till may charge it.
    pub fn on_labels_confirmed(&mut self, sku: &Sku, version: &PriceVersion) -> bool {
        if self.holds.get(sku).is_some_and(|h| &h.pending == version) {
            self.holds.remove(sku);
            return true;
        }
        false
    }

    /// Holds whose deadline passed: released, returned for the log and the mismatch list.
    pub fn poll(&mut self, now_ms: u64) -> Vec<DeadlinePassed> {
        let due: Vec<Sku> =
            self.holds.iter().filter(|(_, h)| h.deadline_ms <= now_ms).map(|(s, _)| s.clone()).collect();
        let mut out: Vec<_> = due
            .into_iter()
            .filter_map(|sku| self.holds.remove(&sku).map(|h| DeadlinePassed { sku, pending: h.pending }))
            .collect();
        out.sort_by(|a, b| a.sku.cmp(&b.sku));
        out
    }

    /// What the till charges for `sku` whose effective price is `effective`, the shelf showing
    /// `shelf` (if known), under `policy`.
    pub fn charge(
        &self,
        sku: &Sku,
        effective: (Money, PriceVersion),
        shelf: Option<Money>,
        policy: ChargePolicy,
    ) -> (Money, PriceVersion) {
        let system = match self.holds.get(sku) {
            Some(h) => h.charge.clone(),
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

    pub fn held(&self) -> usize {
        self.holds.len()
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
        let mut t = TillPrices::new();
        assert!(!t.on_price_change(&milk(), Some((eur(119), v(1))), &(eur(99), v(2)), 0, 60_000));
        assert_eq!(t.charge(&milk(), (eur(99), v(2)), None, ChargePolicy::System).0.minor, 99);

        assert!(t.on_price_change(&milk(), Some((eur(99), v(2))), &(eur(129), v(3)), 0, 60_000));
        assert_eq!(
            t.charge(&milk(), (eur(129), v(3)), None, ChargePolicy::System),
            (eur(99), v(2)),
            "old price until confirmed"
        );
        assert!(!t.on_labels_confirmed(&milk(), &v(2)), "confirmation of another version does not release");
        assert!(t.on_labels_confirmed(&milk(), &v(3)));
        assert_eq!(t.charge(&milk(), (eur(129), v(3)), None, ChargePolicy::System).0.minor, 129);
    }

    #[test]
    fn the_deadline_releases_and_names_the_sku_and_chained_increases_keep_the_lowest() {
        let mut t = TillPrices::new();
        t.on_price_change(&milk(), Some((eur(99), v(1))), &(eur(109), v(2)), 0, 1_000);
        t.on_price_change(&milk(), Some((eur(109), v(2))), &(eur(119), v(3)), 10, 1_000);
        assert_eq!(t.charge(&milk(), (eur(119), v(3)), None, ChargePolicy::System).0.minor, 99);
        assert!(t.poll(999).is_empty());
        assert_eq!(t.poll(1_010), vec![DeadlinePassed { sku: milk(), pending: v(3) }]);
        assert_eq!(t.held(), 0);
    }

    #[test]
    fn lower_of_shelf_and_system() {
        let t = TillPrices::new();
        let eff = (eur(129), v(3));
        assert_eq!(t.charge(&milk(), eff.clone(), Some(eur(119)), ChargePolicy::LowerOfShelfAndSystem).0.minor, 119);
        assert_eq!(t.charge(&milk(), eff.clone(), Some(eur(139)), ChargePolicy::LowerOfShelfAndSystem).0.minor, 129);
        assert_eq!(t.charge(&milk(), eff, Some(eur(119)), ChargePolicy::System).0.minor, 129);
    }
}
