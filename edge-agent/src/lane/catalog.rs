//! The lane's product lookup, answered from the ledger's projections (catalog fields, the GTIN
//! index, price registers) on the lane's own read-only connection, so a lookup never waits for
//! the writer.

use std::sync::{Arc, Mutex};

use shared::{effective_price, Gtin, StoreId, Unit};

use super::{Catalog, Product};
use crate::labels::sequencing::{ChargePolicy, TillPrices};
use crate::ledger::LedgerReader;

pub struct LedgerCatalog {
    reader: LedgerReader,
    store: StoreId,
    /// Price increases held until the shelf shows them, and what the labels confirmed showing.
    till: Option<Arc<Mutex<TillPrices>>>,
    /// Whether the lowest price a label confirmed showing caps the charge (`[lane] charge`).
    policy: ChargePolicy,
}

impl LedgerCatalog {
    pub fn new(reader: LedgerReader) -> LedgerCatalog {
        let store = reader.store().clone();
        LedgerCatalog { reader, store, till: None, policy: ChargePolicy::default() }
    }

    pub fn with_till(mut self, till: Arc<Mutex<TillPrices>>) -> LedgerCatalog {
        self.till = Some(till);
        self
    }

    pub fn with_policy(mut self, policy: ChargePolicy) -> LedgerCatalog {
        self.policy = policy;
        self
    }

    pub fn reader(&self) -> &LedgerReader {
        &self.reader
    }
}

impl Catalog for LedgerCatalog {
    fn lookup(&self, gtin: &Gtin, at_ms: u64) -> Result<Option<Product>, String> {
        let skus = self.reader.skus_by_gtin(gtin).map_err(|e| e.to_string())?;
        let sku = match skus.as_slice() {
            [] => return Ok(None),
            [one] => one.clone(),
            many => return Err(format!("GTIN {gtin} is claimed by {} products", many.len())),
        };
        let item = self.reader.catalog_item(&sku).map_err(|e| e.to_string())?;
        let (name, unit, discontinued) = match &item {
            Some(i) => (
                i.name.as_ref().map(|n| n.value.clone()).unwrap_or_else(|| sku.to_string()),
                i.unit.as_ref().map(|u| u.value).unwrap_or(Unit::Piece),
                i.is_discontinued(),
            ),
            None => (sku.to_string(), Unit::Piece, false),
        };
        let entries = self.reader.prices(&sku).map_err(|e| e.to_string())?;
        let price = effective_price(&entries, &sku, &self.store, at_ms)
            .and_then(|e| e.value.as_ref().map(|v| (v.amount, e.version())))
            .map(|effective| match self.till.as_ref().and_then(|t| t.lock().ok()) {
                Some(mut till) => {
                    let shelf = till.shelf(&sku, at_ms);
                    till.charge(&sku, effective, shelf, self.policy, at_ms)
                }
                None => effective,
            });
        Ok(Some(Product { sku, name, unit, discontinued, price }))
    }
}
