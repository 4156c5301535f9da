//! Price sanity (DESIGN section 8): an HQ price change far from the price it replaces is more
//! likely a typo (1.29 typed as 12.9 or 0.129) than a decision, so it is held until a user
//! confirms it. Pure: the HTTP layer passes the registers it read and the clock.
//!
//! The price a change is compared with is the current value of the same register (sku, scope,
//! slot), whatever its window; when that register has never held a price (or was withdrawn), it
//! is the effective price now for the same scope: the store's, or for a chain price the chain's
//! own (promotion first, then regular). With no price at all there is nothing to compare with,
//! and the change applies. A withdrawal (no amount) is never held.

use shared::{effective_price, Money, PriceEntry, PriceKey, PriceScope, PriceSlot, Sku};

/// How far a change may move a price before it is held, in percent of the reference price.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// A drop of more than this percent is held (60: 1.00 -> 0.39 is held, 0.40 is not).
    pub decrease_pct: u32,
    /// A rise of more than this percent is held (100: 1.00 -> 2.01 is held, 2.00 is not).
    pub increase_pct: u32,
}

/// The price a change is compared with, and where it came from (for the hold reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub amount: Money,
    pub source: String,
}

/// The reference for a write to `key` among `entries` (every register of the SKU; others are
/// ignored), at `now_ms`.
pub fn reference(entries: &[PriceEntry], key: &PriceKey, now_ms: u64) -> Option<Reference> {
    let same_sku = entries.iter().filter(|e| e.key.sku == key.sku);
    if let Some(value) = same_sku.clone().find(|e| e.key == *key).and_then(|e| e.value.as_ref()) {
        return Some(Reference {
            amount: value.amount,
            source: format!("the current {} {} price", key.scope, key.slot.as_str()),
        });
    }
    let effective = match &key.scope {
        PriceScope::Store(store) => effective_price(same_sku, &key.sku, store, now_ms),
        PriceScope::Chain => chain_effective(entries, &key.sku, now_ms),
    }?;
    let value = effective.value.as_ref()?;
    let whose = match &key.scope {
        PriceScope::Store(store) => format!("store {store}"),
        PriceScope::Chain => "the chain".to_owned(),
    };
    Some(Reference {
        amount: value.amount,
        source: format!(
            "the effective price for {whose} (its {} {} price)",
            effective.key.scope,
            effective.key.slot.as_str()
        ),
    })
}

/// The chain's own effective price of `sku` at `now_ms` (what a store without prices of its
/// own charges): the chain promotion when one is valid, else the chain regular price.
pub fn chain_effective<'a>(entries: &'a [PriceEntry], sku: &Sku, now_ms: u64) -> Option<&'a PriceEntry> {
    entries
        .iter()
        .filter(|e| e.key.sku == *sku && e.key.scope == PriceScope::Chain)
        .filter(|e| e.value.as_ref().is_some_and(|v| v.valid_at(now_ms)))
        .min_by_key(|e| e.key.slot != PriceSlot::Promotion)
}

/// Why a change must be held, or `None` when it may apply at once.
pub fn hold_reason(bounds: Bounds, reference: Option<&Reference>, new: Option<&Money>) -> Option<String> {
    let (Some(reference), Some(new)) = (reference, new) else { return None };
    let old = reference.amount;
    if old.currency != new.currency {
        return Some(format!(
            "the currency changes from {} to {} against {} ({old}); confirm to apply",
            old.currency, new.currency, reference.source
        ));
    }
    let (o, n) = (i128::from(old.minor), i128::from(new.minor));
    if n < o {
        // Drop in percent of the old price, compared exactly: (o - n) / o > pct / 100.
        if (o - n) * 100 > o * i128::from(bounds.decrease_pct) {
            let pct = (o - n) * 100 / o;
            return Some(format!(
                "{old} -> {new} is a {pct}% decrease against {}; changes of more than -{}% need confirmation",
                reference.source, bounds.decrease_pct
            ));
        }
    } else if n > o && (n - o) * 100 > o * i128::from(bounds.increase_pct) {
        let pct = if o == 0 { "an unbounded".to_owned() } else { format!("a {}%", (n - o) * 100 / o) };
        return Some(format!(
            "{old} -> {new} is {pct} increase against {}; changes of more than +{}% need confirmation",
            reference.source, bounds.increase_pct
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{ActorId, Currency, HlcStamp, PriceValue, StoreId, ValidityWindow};

    const BOUNDS: Bounds = Bounds { decrease_pct: 60, increase_pct: 100 };

    fn eur(minor: i64) -> Money {
        Money::new(minor, Currency::new("EUR").unwrap())
    }
    fn key(scope: PriceScope, slot: PriceSlot) -> PriceKey {
        PriceKey { sku: Sku::new("MILK").unwrap(), scope, slot }
    }
    fn store() -> PriceScope {
        PriceScope::Store(StoreId::new("s1").unwrap())
    }
    fn entry(key: PriceKey, minor: Option<i64>, window: Option<(u64, u64)>) -> PriceEntry {
        PriceEntry {
            key,
            value: minor.map(|m| PriceValue {
                amount: eur(m),
                window: window.map(|(from_ms, until_ms)| ValidityWindow { from_ms, until_ms }),
            }),
            stamp: HlcStamp { wall_ms: 1, logical: 0, actor: ActorId::cloud() },
        }
    }
    fn reason(old: i64, new: i64) -> Option<String> {
        let r = Reference { amount: eur(old), source: "x".into() };
        hold_reason(BOUNDS, Some(&r), Some(&eur(new)))
    }

    #[test]
    fn holds_changes_beyond_the_bounds_and_only_those() {
        assert_eq!(reason(100, 40), None, "exactly -60% applies");
        assert!(reason(100, 39).unwrap().contains("61% decrease"), "{:?}", reason(100, 39));
        assert_eq!(reason(100, 200), None, "exactly +100% applies");
        assert!(reason(100, 201).unwrap().contains("101% increase"));
        assert_eq!(reason(129, 129), None);
        assert!(reason(129, 1290).is_some(), "a misplaced decimal point is held");
        assert!(reason(129, 13).is_some());
        assert!(reason(0, 1).unwrap().contains("unbounded"));
        assert_eq!(reason(0, 0), None);
        assert!(reason(100, 0).is_some());
    }

    #[test]
    fn no_reference_or_a_withdrawal_applies() {
        assert_eq!(hold_reason(BOUNDS, None, Some(&eur(1))), None);
        let r = Reference { amount: eur(100), source: "x".into() };
        assert_eq!(hold_reason(BOUNDS, Some(&r), None), None);
    }

    #[test]
    fn a_currency_change_is_held() {
        let r = Reference { amount: eur(100), source: "x".into() };
        let usd = Money::new(100, Currency::new("USD").unwrap());
        assert!(hold_reason(BOUNDS, Some(&r), Some(&usd)).unwrap().contains("EUR to USD"));
    }

    #[test]
    fn the_reference_is_the_same_register_first() {
        let chain_regular = entry(key(PriceScope::Chain, PriceSlot::Regular), Some(199), None);
        let store_regular = entry(key(store(), PriceSlot::Regular), Some(150), None);
        let entries = vec![chain_regular, store_regular];
        let r = reference(&entries, &key(store(), PriceSlot::Regular), 0).unwrap();
        assert_eq!(r.amount, eur(150));
        assert!(r.source.contains("current store:s1 regular"), "{}", r.source);
    }

    #[test]
    fn a_new_register_compares_with_the_effective_price_of_its_scope() {
        let entries = vec![
            entry(key(PriceScope::Chain, PriceSlot::Regular), Some(199), None),
            entry(key(PriceScope::Chain, PriceSlot::Promotion), Some(149), Some((100, 200))),
        ];
        let store_promo = key(store(), PriceSlot::Promotion);
        let r = reference(&entries, &store_promo, 150).unwrap();
        assert_eq!(r.amount, eur(149), "inside the chain promotion's window");
        assert!(r.source.contains("store s1") && r.source.contains("chain promotion"), "{}", r.source);
        assert_eq!(reference(&entries, &store_promo, 300).unwrap().amount, eur(199));
        let chain_promo_at = |t| reference(&entries[..1], &key(PriceScope::Chain, PriceSlot::Promotion), t);
        assert_eq!(chain_promo_at(0).unwrap().amount, eur(199));
        assert_eq!(reference(&[], &store_promo, 0), None);
    }

    #[test]
    fn a_withdrawn_register_falls_back_to_the_effective_price() {
        let entries = vec![
            entry(key(PriceScope::Chain, PriceSlot::Regular), Some(199), None),
            entry(key(store(), PriceSlot::Regular), None, None),
        ];
        assert_eq!(reference(&entries, &key(store(), PriceSlot::Regular), 0).unwrap().amount, eur(199));
    }
}
