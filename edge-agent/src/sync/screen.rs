//! What a store accepts from a cloud page: its own store's stock slots, chain prices and its
//! own store-scope prices, valid values, the catalog, and its own store's online allocation
//! rows and order headers. Anything else is a cloud bug or a misrouted page; it is refused row
//! by row with the reason (recorded in the merge event), and the rest of the page still merges
//! so one bad row cannot stall the store's sync. (Rows that conflict with what the store holds,
//! such as a header that differs from the one it has, are refused by the ledger writer, which
//! alone sees the held state.)

use shared::sync::{Rows, SlotGroup};
use shared::{PriceScope, Slot, StoreId};

/// Splits a page into the rows to merge and the reasons for the rows refused.
pub fn screen(store: &StoreId, rows: Rows) -> (Rows, Vec<String>) {
    let mut refused = Vec::new();
    let mut stock: Vec<SlotGroup> = Vec::with_capacity(rows.stock.len());
    for mut group in rows.stock {
        if group.store != *store {
            refused.push(format!(
                "{} stock slots of store {} (actor {}): this is store {store}",
                group.slots.len(),
                group.store,
                group.actor
            ));
            continue;
        }
        group.slots.retain(|s| {
            let ok = s.inc <= Slot::MAX && s.dec <= Slot::MAX;
            if !ok {
                refused.push(format!(
                    "stock slot {}/{}/{}: count above {}",
                    group.store,
                    s.sku,
                    group.actor,
                    Slot::MAX
                ));
            }
            ok
        });
        stock.push(group);
    }
    let mut prices = Vec::with_capacity(rows.prices.len());
    for price in rows.prices {
        match &price.key.scope {
            PriceScope::Store(other) if other != store => {
                refused.push(format!("price {} of store {other}: this is store {store}", price.key.sku));
                continue;
            }
            _ => {}
        }
        if let Err(e) = price.validate() {
            refused.push(format!("price {} {}: {e}", price.key.sku, price.key.scope));
            continue;
        }
        prices.push(price);
    }
    let mut escrow = Vec::with_capacity(rows.escrow.len());
    for row in rows.escrow {
        if row.key().store != *store {
            refused.push(format!("online allocation row {}: this is store {store}", row.key()));
            continue;
        }
        if let Err(e) = row.validate() {
            refused.push(format!("online allocation row {}: {e}", row.key()));
            continue;
        }
        escrow.push(row);
    }
    let mut orders = Vec::with_capacity(rows.orders.len());
    for header in rows.orders {
        if header.store != *store {
            refused.push(format!("order {} of store {}: this is store {store}", header.order, header.store));
            continue;
        }
        if let Err(e) = header.validate() {
            refused.push(e.to_string());
            continue;
        }
        orders.push(header);
    }
    (Rows { stock, prices, catalog: rows.catalog, escrow, orders }, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::sync::SlotValue;
    use shared::{ActorId, Currency, HlcStamp, Money, PriceEntry, PriceKey, PriceSlot, PriceValue, Sku};

    fn store(s: &str) -> StoreId {
        StoreId::new(s).unwrap()
    }

    fn price(scope: PriceScope, minor: i64) -> PriceEntry {
        PriceEntry {
            key: PriceKey { sku: Sku::new("MILK").unwrap(), scope, slot: PriceSlot::Regular },
            value: Some(PriceValue { amount: Money::new(minor, Currency::new("EUR").unwrap()), window: None }),
            stamp: HlcStamp { wall_ms: 1, logical: 0, actor: ActorId::cloud() },
        }
    }

    #[test]
    fn keeps_own_rows_and_names_the_others() {
        let slot = |sku: &str| SlotValue { sku: Sku::new(sku).unwrap(), inc: 3, dec: 1 };
        let rows = Rows {
            stock: vec![
                SlotGroup { store: store("s1"), actor: ActorId::cloud(), slots: vec![slot("A")] },
                SlotGroup { store: store("s2"), actor: ActorId::cloud(), slots: vec![slot("B")] },
            ],
            prices: vec![
                price(PriceScope::Chain, 100),
                price(PriceScope::Store(store("s1")), 90),
                price(PriceScope::Store(store("s2")), 80),
                price(PriceScope::Chain, -5),
            ],
            catalog: vec![],
            ..Rows::default()
        };
        let (kept, refused) = screen(&store("s1"), rows);
        assert_eq!(kept.len(), 3);
        assert_eq!(refused.len(), 3, "{refused:?}");
        assert!(refused[0].contains("store s2"), "{refused:?}");
        assert!(refused.iter().any(|r| r.contains("negative")), "{refused:?}");
    }

    #[test]
    fn keeps_own_allocation_rows_and_orders_and_names_the_others() {
        use shared::orders::{pickup_code_digest, OrderLine};
        use shared::{EscrowKey, EscrowRow, OrderHeader, OrderId};
        let key = |s: &str| EscrowKey { store: store(s), sku: Sku::new("MILK").unwrap() };
        let header = |s: &str, id: &str, units: u64| {
            let order = OrderId::new(id).unwrap();
            OrderHeader {
                pickup_code_digest: pickup_code_digest(&order, "123456"),
                order,
                store: store(s),
                customer_ref: "c".into(),
                created_at_ms: 1,
                expires_at_ms: 2,
                lines: vec![OrderLine { sku: Sku::new("MILK").unwrap(), units }],
            }
        };
        let reservation = |s: &str, units: u64| EscrowRow::Reservation {
            key: key(s),
            order: OrderId::new("W-1").unwrap(),
            units,
            seq: 1,
            cancelled: false,
        };
        let rows = Rows {
            escrow: vec![reservation("s1", 2), reservation("s2", 2), reservation("s1", 0)],
            orders: vec![header("s1", "W-1", 2), header("s2", "W-2", 1), header("s1", "W-3", 0)],
            ..Rows::default()
        };
        let (kept, refused) = screen(&store("s1"), rows);
        assert_eq!((kept.escrow.len(), kept.orders.len()), (1, 1), "{refused:?}");
        assert_eq!(refused.len(), 4, "{refused:?}");
        assert!(refused[0].contains("s2/MILK") && refused[0].contains("this is store s1"), "{refused:?}");
        assert!(refused.iter().any(|r| r.contains("order W-2 of store s2")), "{refused:?}");
        assert!(refused.iter().any(|r| r.contains("line 1 (MILK) asks for 0 units")), "{refused:?}");
    }
}
