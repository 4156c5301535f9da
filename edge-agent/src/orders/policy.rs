//! The store's online allocation policy (`[online]` in the config): how many units of each SKU
//! the store keeps granted to the online channel, and how many it always keeps back for walk-in
//! customers. Pure, so it is tested without a ledger; the ledger writer asks it after every
//! commit that moves a SKU's stock or allocation, and grants what [`top_up`] says.

use serde::{Deserialize, Serialize};
use shared::{Escrow, Sku};

/// Largest target or safety stock the configuration accepts (far above any shelf).
pub const MAX_UNITS: u64 = 1_000_000_000;

/// `[online]`: off by default, so a store grants nothing until it is configured to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnlinePolicy {
    /// Grant units to the online channel at all.
    #[serde(default)]
    pub enabled: bool,
    /// Units to keep granted per SKU when no rule matches.
    #[serde(default)]
    pub target: u64,
    /// Units never granted when no rule matches.
    #[serde(default)]
    pub safety_stock: u64,
    /// Per-SKU or per-category settings; the first that matches wins.
    #[serde(default)]
    pub rule: Vec<OnlineRule>,
}

/// `[[online.rule]]`: matches one SKU (`sku`) or one catalog category (`category`, compared
/// without regard to ASCII case); a value it leaves out is the section's default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnlineRule {
    pub sku: Option<Sku>,
    pub category: Option<String>,
    pub target: Option<u64>,
    pub safety_stock: Option<u64>,
}

/// What the policy asks of one SKU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Units to keep granted (the cloud's unreserved rights).
    pub target: u64,
    /// Units never granted.
    pub safety_stock: u64,
    /// Index of the rule that matched, `None` for the section's defaults.
    pub rule: Option<usize>,
}

impl OnlineRule {
    fn matches(&self, sku: &Sku, category: Option<&str>) -> bool {
        match (&self.sku, &self.category) {
            (Some(s), _) => s == sku,
            (None, Some(c)) => category.is_some_and(|have| have.trim().eq_ignore_ascii_case(c.trim())),
            (None, None) => false,
        }
    }
}

impl OnlinePolicy {
    /// Checks the section; errors name the key (`online.rule[1].category`) as config errors do.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bound = |key: String, value: u64| {
            if value > MAX_UNITS {
                Err((key, format!("must be at most {MAX_UNITS}, got {value}")))
            } else {
                Ok(())
            }
        };
        bound("online.target".into(), self.target)?;
        bound("online.safety_stock".into(), self.safety_stock)?;
        for (i, rule) in self.rule.iter().enumerate() {
            let key = |field: &str| format!("online.rule[{i}]{field}");
            match (&rule.sku, &rule.category) {
                (Some(_), Some(_)) => {
                    return Err((key(""), "give either `sku` or `category`, not both".into()));
                }
                (None, None) => return Err((key(""), "give `sku = \"...\"` or `category = \"...\"` to match".into())),
                (None, Some(c)) if c.trim().is_empty() || c.len() > 200 || c.chars().any(char::is_control) => {
                    return Err((key(".category"), "must be 1 to 200 bytes without control characters".into()));
                }
                _ => {}
            }
            if let Some(t) = rule.target {
                bound(key(".target"), t)?;
            }
            if let Some(s) = rule.safety_stock {
                bound(key(".safety_stock"), s)?;
            }
        }
        Ok(())
    }

    /// What to keep granted of `sku`; `None` when the policy is off. A discontinued product
    /// gets target 0: the store stops offering it online (what is granted stays granted).
    pub fn allocation_for(&self, sku: &Sku, category: Option<&str>, discontinued: bool) -> Option<Allocation> {
        if !self.enabled {
            return None;
        }
        let (rule, found) = match self.rule.iter().enumerate().find(|(_, r)| r.matches(sku, category)) {
            Some((i, r)) => (Some(i), Some(r)),
            None => (None, None),
        };
        let target = found.and_then(|r| r.target).unwrap_or(self.target);
        let safety_stock = found.and_then(|r| r.safety_stock).unwrap_or(self.safety_stock);
        Some(Allocation { target: if discontinued { 0 } else { target }, safety_stock, rule })
    }

    /// Which SKUs may be asked to grant at all: every SKU when the default target is above 0,
    /// else only those named by a rule with a target (directly, or through their category).
    /// The writer's sweep (at start, and once the ledger caught up) looks at these only.
    pub fn sweep_scope(&self) -> SweepScope {
        if !self.enabled {
            return SweepScope::Nothing;
        }
        if self.target > 0 {
            return SweepScope::Every;
        }
        let granting = || self.rule.iter().filter(|r| r.target.unwrap_or(self.target) > 0);
        SweepScope::Only {
            skus: granting().filter_map(|r| r.sku.clone()).collect(),
            categories: granting().filter(|r| r.sku.is_none()).filter_map(|r| r.category.clone()).collect(),
        }
    }
}

/// See [`OnlinePolicy::sweep_scope`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SweepScope {
    Nothing,
    Every,
    Only { skus: Vec<Sku>, categories: Vec<String> },
}

impl SweepScope {
    /// Whether a SKU of this category is in scope (for `Only`, by category; SKUs are listed).
    pub fn has_category(&self, category: &str) -> bool {
        match self {
            SweepScope::Nothing => false,
            SweepScope::Every => true,
            SweepScope::Only { categories, .. } => {
                categories.iter().any(|c| c.trim().eq_ignore_ascii_case(category.trim()))
            }
        }
    }
}

/// Units to grant now so the online channel holds `target` unreserved units again:
/// `min(target - rights, free)`, or 0 when that is not positive. `rights` and `free` are as this
/// replica sees them (`granted - reserved - released`; `on_hand - committed - safety_stock`),
/// which is what makes the grant safe offline (see `shared::escrow`).
/// `rights` and `committed` are the SKU's (`Escrow::cloud_rights`, `Escrow::committed`), read by
/// the writer from its counters without loading the SKU's order history.
pub fn top_up(allocation: &Allocation, rights: i128, committed: i128, on_hand: i128) -> u64 {
    let wanted = i128::from(allocation.target) - rights;
    let free = on_hand - committed - i128::from(allocation.safety_stock);
    let units = wanted.min(free).min(i128::from(Escrow::MAX));
    u64::try_from(units.max(0)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{EscrowKey, OrderId, Side, StoreId};

    fn sku(s: &str) -> Sku {
        Sku::new(s).unwrap()
    }

    fn store() -> Side {
        Side::Store(StoreId::new("s1").unwrap())
    }

    fn escrow() -> Escrow {
        Escrow::new(EscrowKey { store: StoreId::new("s1").unwrap(), sku: sku("MILK") })
    }

    fn policy() -> OnlinePolicy {
        let text = r#"
            enabled = true
            target = 1
            safety_stock = 2
            [[rule]]
            sku = "EGGS"
            target = 6
            [[rule]]
            category = "dairy"
            target = 10
            safety_stock = 3
            [[rule]]
            category = "tobacco"
            target = 0
        "#;
        toml::from_str(text).unwrap()
    }

    #[test]
    fn the_first_matching_rule_wins_and_gaps_fall_back_to_the_defaults() {
        let p = policy();
        p.validate().unwrap();
        let a = p.allocation_for(&sku("MILK"), Some("Dairy"), false).unwrap();
        assert_eq!((a.target, a.safety_stock, a.rule), (10, 3, Some(1)));
        // EGGS are dairy too, but their own rule comes first; its safety stock is the default.
        let a = p.allocation_for(&sku("EGGS"), Some("dairy"), false).unwrap();
        assert_eq!((a.target, a.safety_stock, a.rule), (6, 2, Some(0)));
        let a = p.allocation_for(&sku("BREAD"), None, false).unwrap();
        assert_eq!((a.target, a.safety_stock, a.rule), (1, 2, None));
        assert_eq!(p.allocation_for(&sku("CIGS"), Some("tobacco"), false).unwrap().target, 0);
        assert_eq!(p.allocation_for(&sku("MILK"), Some("dairy"), true).unwrap().target, 0, "discontinued");
        assert_eq!(OnlinePolicy { enabled: false, ..p }.allocation_for(&sku("MILK"), Some("dairy"), false), None);
    }

    #[test]
    fn bad_rules_name_their_key() {
        let mut p = policy();
        p.rule[1].sku = Some(sku("X"));
        assert_eq!(p.validate().unwrap_err().0, "online.rule[1]");
        let mut p = policy();
        p.rule[2].category = Some(" ".into());
        assert_eq!(p.validate().unwrap_err().0, "online.rule[2].category");
        let mut p = policy();
        p.rule.push(OnlineRule { sku: None, category: None, target: Some(1), safety_stock: None });
        assert!(p.validate().unwrap_err().1.contains("sku"));
        let p = OnlinePolicy { target: MAX_UNITS + 1, ..policy() };
        assert_eq!(p.validate().unwrap_err().0, "online.target");
    }

    #[test]
    fn top_up_fills_to_the_target_from_free_stock_only() {
        let a = Allocation { target: 10, safety_stock: 3, rule: None };
        // 20 on hand, nothing granted: 10 wanted, 17 free.
        assert_eq!(top_up(&a, escrow().cloud_rights(), escrow().committed(), 20), 10);
        // 8 on hand: only 5 free above the safety stock.
        assert_eq!(top_up(&a, escrow().cloud_rights(), escrow().committed(), 8), 5);
        // At or below the safety stock, or negative after till sales: nothing.
        assert_eq!(top_up(&a, escrow().cloud_rights(), escrow().committed(), 3), 0);
        assert_eq!(top_up(&a, escrow().cloud_rights(), escrow().committed(), -4), 0);
        // Granted 10, the cloud reserved 4: rights 6, so 4 more; promised units stay committed.
        let mut e = escrow();
        e.grant(&store(), 10, 20, 3).unwrap();
        e.reserve(&Side::Cloud, OrderId::new("W-1").unwrap(), 4).unwrap();
        // Free: 20 - (6 rights + 4 promised) - 3 safety = 7; wanted: 10 - 6 = 4.
        assert_eq!(top_up(&a, e.cloud_rights(), e.committed(), 20), 4);
        // 12 on hand: free 12 - 10 - 3 < 0, so nothing even though 4 are wanted.
        assert_eq!(top_up(&a, e.cloud_rights(), e.committed(), 12), 0);
    }

    #[test]
    fn top_up_never_exceeds_what_escrow_grant_accepts() {
        let a = Allocation { target: 10, safety_stock: 2, rule: None };
        for on_hand in -5..30 {
            for reserved in 0..6u64 {
                let mut e = escrow();
                if reserved > 0 {
                    let granted = top_up(&a, e.cloud_rights(), e.committed(), 40);
                    e.grant(&store(), granted, 40, 2).unwrap();
                    e.reserve(&Side::Cloud, OrderId::new(format!("W-{reserved}")).unwrap(), reserved).unwrap();
                }
                let units = top_up(&a, e.cloud_rights(), e.committed(), on_hand);
                if units > 0 {
                    let rights = e.cloud_rights();
                    e.grant(&store(), units, on_hand, 2).unwrap();
                    assert!(e.cloud_rights() <= 10 && e.cloud_rights() > rights);
                    assert!(e.free(on_hand, 2) >= 0, "never grants what is not free");
                }
            }
        }
    }

    #[test]
    fn the_sweep_looks_only_where_a_target_can_grant() {
        let p = policy();
        assert_eq!(p.sweep_scope(), SweepScope::Every);
        let p = OnlinePolicy { target: 0, ..policy() };
        match p.sweep_scope() {
            SweepScope::Only { skus, categories } => {
                assert_eq!(skus, vec![sku("EGGS")]);
                assert_eq!(categories, vec!["dairy".to_owned()], "tobacco has target 0");
            }
            other => panic!("{other:?}"),
        }
        assert!(p.sweep_scope().has_category("DAIRY"));
        assert_eq!(OnlinePolicy::default().sweep_scope(), SweepScope::Nothing);
    }
}
