//! What the labels of each product confirmed showing, as prices: the label task tells it every
//! content it renders (hash and price) and every label's confirmed content hash, and it answers
//! the distinct prices a product's labels show now, for the till's
//! `lower_of_shelf_and_system` policy. A label whose hash is not a content rendered here (blank,
//! or shown since before a restart with another price) counts as showing nothing known. Pure.

use std::collections::{HashMap, VecDeque};

use shared::{DeviceId, Sku};

use super::sequencing::ShelfPrice;

/// Contents remembered per product beyond those a label still shows (older ones are forgotten
/// first), so the memory is bounded by products x this + labels.
pub const KNOWN_PER_SKU: usize = 8;

#[derive(Debug, Default)]
pub struct ShelfPrices {
    /// Contents rendered per product, oldest first: (content hash, its price).
    known: HashMap<Sku, VecDeque<(u64, ShelfPrice)>>,
    /// The known content each label confirmed showing.
    shown: HashMap<DeviceId, (Sku, u64)>,
    /// Per product, how many labels show each known content.
    counts: HashMap<Sku, HashMap<u64, usize>>,
}

impl ShelfPrices {
    /// A content with this hash and price was rendered for `sku`.
    pub fn rendered(&mut self, sku: &Sku, hash: u64, price: ShelfPrice) {
        let known = self.known.entry(sku.clone()).or_default();
        if known.iter().any(|(h, _)| *h == hash) {
            return;
        }
        known.push_back((hash, price));
        if known.len() > KNOWN_PER_SKU {
            let counts = self.counts.get(sku);
            // The oldest that no label shows; never the one just rendered.
            let older = known.len() - 1;
            let unused =
                known.iter().take(older).position(|(h, _)| counts.and_then(|c| c.get(h)).is_none_or(|n| *n == 0));
            if let Some(i) = unused {
                known.remove(i);
            }
        }
    }

    /// `label` (of `sku`) confirmed showing the content `hash` (`None`: nothing known). Returns
    /// whether the set of prices shown for `sku` changed.
    pub fn shows(&mut self, label: &DeviceId, sku: &Sku, hash: Option<u64>) -> bool {
        let hash = hash.filter(|h| self.known.get(sku).is_some_and(|k| k.iter().any(|(known, _)| known == h)));
        let new = hash.map(|h| (sku.clone(), h));
        let old = match &new {
            Some(n) => self.shown.insert(label.clone(), n.clone()),
            None => self.shown.remove(label),
        };
        if old == new {
            return false;
        }
        let mut changed = false;
        if let Some((old_sku, h)) = old {
            if let Some(c) = self.counts.get_mut(&old_sku) {
                if let Some(n) = c.get_mut(&h) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        c.remove(&h);
                        changed = true;
                    }
                }
            }
        }
        if let Some((sku, h)) = new {
            let n = self.counts.entry(sku).or_default().entry(h).or_default();
            *n += 1;
            changed |= *n == 1;
        }
        changed
    }

    /// The distinct prices the labels of `sku` confirmed showing.
    pub fn prices(&self, sku: &Sku) -> Vec<ShelfPrice> {
        let (Some(counts), Some(known)) = (self.counts.get(sku), self.known.get(sku)) else { return Vec::new() };
        known.iter().filter(|(h, _)| counts.get(h).is_some_and(|n| *n > 0)).map(|(_, p)| *p).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{Currency, Money};

    fn price(cents: i64) -> ShelfPrice {
        ShelfPrice { regular: Money::new(cents, Currency::new("EUR").unwrap()), promo: None }
    }
    fn label(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    #[test]
    fn the_prices_shown_follow_the_labels_confirmations() {
        let milk = Sku::new("MILK").unwrap();
        let mut s = ShelfPrices::default();
        s.rendered(&milk, 1, price(99));
        assert!(s.shows(&label("a"), &milk, Some(1)));
        assert!(!s.shows(&label("b"), &milk, Some(1)), "a second label showing the same price changes nothing");
        s.rendered(&milk, 2, price(119));
        assert!(s.shows(&label("a"), &milk, Some(2)));
        assert_eq!(s.prices(&milk), vec![price(99), price(119)]);
        assert!(s.shows(&label("b"), &milk, Some(2)), "the last label showing 0.99 moved on");
        assert_eq!(s.prices(&milk), vec![price(119)]);
        assert!(!s.shows(&label("b"), &milk, Some(0xdead)), "an unknown content counts as nothing known");
        assert_eq!(s.prices(&milk), vec![price(119)]);
        assert!(s.shows(&label("a"), &milk, None), "no label is known to show 1.19 any more");
        assert!(s.prices(&milk).is_empty());
    }

    #[test]
    fn old_contents_are_forgotten_unless_a_label_still_shows_them() {
        let milk = Sku::new("MILK").unwrap();
        let mut s = ShelfPrices::default();
        s.rendered(&milk, 0, price(50));
        s.shows(&label("stuck"), &milk, Some(0));
        for h in 1..=2 * KNOWN_PER_SKU as u64 {
            s.rendered(&milk, h, price(100 + h as i64));
        }
        assert!(s.known[&milk].len() <= KNOWN_PER_SKU + 1);
        assert_eq!(s.prices(&milk), vec![price(50)], "the stuck label's price is still known");
    }
}
