//! Catalog items with one LWW register per field, so HQ renaming a product and a store
//! discontinuing it concurrently both survive the merge. Items are never deleted, only
//! discontinued, so there are no tombstones to collect.

use serde::{Deserialize, Serialize};

use crate::gtin::Gtin;
use crate::hlc::HlcStamp;
use crate::ids::Sku;
use crate::lww::{merge_opt, Lww};

/// How a SKU is counted: pieces, or grams for weighed goods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Unit {
    Piece,
    Gram,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Piece => "piece",
            Unit::Gram => "gram",
        }
    }
}

impl std::str::FromStr for Unit {
    type Err = String;
    fn from_str(s: &str) -> Result<Unit, String> {
        match s {
            "piece" => Ok(Unit::Piece),
            "gram" => Ok(Unit::Gram),
            other => Err(format!("unknown unit {other:?}: expected \"piece\" or \"gram\"")),
        }
    }
}

/// The chain's tax class code for a SKU (e.g. `standard`, `reduced`); rates live with the till.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaxClass(pub String);

/// One field write.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CatalogField {
    Name(String),
    Gtins(Vec<Gtin>),
    Unit(Unit),
    TaxClass(TaxClass),
    Discontinued(bool),
    /// The merchandising category (e.g. `dairy`): what store policies such as the online
    /// allocation target are configured by. Added after the first release, hence last.
    Category(String),
}

impl CatalogField {
    pub fn name(&self) -> &'static str {
        match self {
            CatalogField::Name(_) => "name",
            CatalogField::Gtins(_) => "gtins",
            CatalogField::Unit(_) => "unit",
            CatalogField::TaxClass(_) => "tax_class",
            CatalogField::Discontinued(_) => "discontinued",
            CatalogField::Category(_) => "category",
        }
    }
}

/// A field write as it is stored and synced.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CatalogUpdate {
    pub sku: Sku,
    pub field: CatalogField,
    pub stamp: HlcStamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogItem {
    pub sku: Sku,
    pub name: Option<Lww<String>>,
    pub gtins: Option<Lww<Vec<Gtin>>>,
    pub unit: Option<Lww<Unit>>,
    pub tax_class: Option<Lww<TaxClass>>,
    pub discontinued: Option<Lww<bool>>,
    pub category: Option<Lww<String>>,
}

impl CatalogItem {
    pub fn new(sku: Sku) -> CatalogItem {
        CatalogItem { sku, name: None, gtins: None, unit: None, tax_class: None, discontinued: None, category: None }
    }

    /// Merges one field write (updates for other SKUs are ignored); returns whether it won.
    pub fn merge(&mut self, update: &CatalogUpdate) -> bool {
        if update.sku != self.sku {
            return false;
        }
        let stamp = update.stamp.clone();
        match &update.field {
            CatalogField::Name(v) => merge_opt(&mut self.name, &Lww::new(v.clone(), stamp)),
            CatalogField::Gtins(v) => merge_opt(&mut self.gtins, &Lww::new(v.clone(), stamp)),
            CatalogField::Unit(v) => merge_opt(&mut self.unit, &Lww::new(*v, stamp)),
            CatalogField::TaxClass(v) => merge_opt(&mut self.tax_class, &Lww::new(v.clone(), stamp)),
            CatalogField::Discontinued(v) => merge_opt(&mut self.discontinued, &Lww::new(*v, stamp)),
            CatalogField::Category(v) => merge_opt(&mut self.category, &Lww::new(v.clone(), stamp)),
        }
    }

    pub fn is_discontinued(&self) -> bool {
        self.discontinued.as_ref().is_some_and(|d| d.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ActorId;

    #[test]
    fn concurrent_field_writes_both_survive() {
        let sku = Sku::new("A").unwrap();
        let st = |w, a: &str| HlcStamp { wall_ms: w, logical: 0, actor: ActorId::new(a).unwrap() };
        let rename =
            CatalogUpdate { sku: sku.clone(), field: CatalogField::Name("Milk 1 l".into()), stamp: st(10, "cloud") };
        let disc =
            CatalogUpdate { sku: sku.clone(), field: CatalogField::Discontinued(true), stamp: st(9, "store:s1") };
        let mut a = CatalogItem::new(sku.clone());
        let mut b = CatalogItem::new(sku);
        a.merge(&rename);
        a.merge(&disc);
        b.merge(&disc);
        b.merge(&rename);
        assert_eq!(a, b);
        assert!(a.is_discontinued());
        assert_eq!(a.name.unwrap().value, "Milk 1 l");
    }
}
