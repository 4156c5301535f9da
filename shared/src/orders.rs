//! Online pickup orders as both sides see them: the order header HQ creates once and never
//! changes (lines, customer reference, expiry, the pickup code's digest). Where an order stands
//! (reserved, cancelled, handed over) is not here: it is the escrow rows of each line
//! ([`crate::escrow`]), which merge as CRDT state. The header travels in the store's partition so
//! the store can show the order and check the pickup code offline.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::escrow::OrderId;
use crate::ids::{Sku, StoreId};

/// Most lines in one order.
pub const MAX_ORDER_LINES: usize = 200;
/// Longest customer reference, in bytes.
pub const MAX_CUSTOMER_REF: usize = 128;
/// Digits of a pickup code.
pub const PICKUP_CODE_DIGITS: usize = 6;

/// One line: `units` of `sku` to pick up.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: Sku,
    pub units: u64,
}

/// An online pickup order, immutable once HQ created it. Two replicas holding different headers
/// under one order id is corruption ([`OrderHeader::check_same`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OrderHeader {
    pub order: OrderId,
    pub store: StoreId,
    /// HQ's reference for the customer (an account or order-system number), shown to staff.
    pub customer_ref: String,
    /// Unix milliseconds, the cloud's clock.
    pub created_at_ms: i64,
    /// After this the order is not handed over; the cloud cancels it as expired.
    pub expires_at_ms: i64,
    /// [`pickup_code_digest`] of the code the customer was given; the code itself stays with HQ.
    pub pickup_code_digest: [u8; 32],
    pub lines: Vec<OrderLine>,
}

/// Why an order header is refused; each names the order and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("order {order}: it has no lines")]
    NoLines { order: OrderId },
    #[error("order {order}: {lines} lines, more than the {max} an order may have")]
    TooManyLines { order: OrderId, lines: usize, max: usize },
    #[error("order {order}: line {line} ({sku}) asks for 0 units")]
    ZeroUnits { order: OrderId, line: usize, sku: Sku },
    #[error("order {order}: line {line} ({sku}) asks for {units} units, above the largest storable count {max}")]
    TooManyUnits { order: OrderId, line: usize, sku: Sku, units: u64, max: u64 },
    #[error("order {order}: {sku} appears on lines {first} and {second}; put each SKU on one line")]
    DuplicateSku { order: OrderId, sku: Sku, first: usize, second: usize },
    #[error("order {order}: customer reference {reason}")]
    CustomerRef { order: OrderId, reason: String },
    #[error("order {order}: expires at {expires_at_ms} ms, not after its creation at {created_at_ms} ms")]
    Expiry { order: OrderId, created_at_ms: i64, expires_at_ms: i64 },
    #[error("order {order}: the replicas hold different headers ({ours} here, {theirs} incoming); an order id is never reused")]
    Conflicting { order: OrderId, ours: String, theirs: String },
}

impl OrderHeader {
    /// Checks what every replica relies on; line numbers in errors count from 1.
    pub fn validate(&self) -> Result<(), OrderError> {
        let order = || self.order.clone();
        if self.lines.is_empty() {
            return Err(OrderError::NoLines { order: order() });
        }
        if self.lines.len() > MAX_ORDER_LINES {
            return Err(OrderError::TooManyLines { order: order(), lines: self.lines.len(), max: MAX_ORDER_LINES });
        }
        let mut seen: Vec<(&Sku, usize)> = Vec::with_capacity(self.lines.len());
        for (i, line) in self.lines.iter().enumerate() {
            let n = i + 1;
            if line.units == 0 {
                return Err(OrderError::ZeroUnits { order: order(), line: n, sku: line.sku.clone() });
            }
            if line.units > crate::escrow::Escrow::MAX {
                return Err(OrderError::TooManyUnits {
                    order: order(),
                    line: n,
                    sku: line.sku.clone(),
                    units: line.units,
                    max: crate::escrow::Escrow::MAX,
                });
            }
            if let Some((_, first)) = seen.iter().find(|(sku, _)| **sku == line.sku) {
                return Err(OrderError::DuplicateSku { order: order(), sku: line.sku.clone(), first: *first, second: n });
            }
            seen.push((&line.sku, n));
        }
        check_customer_ref(&self.customer_ref).map_err(|reason| OrderError::CustomerRef { order: order(), reason })?;
        if self.expires_at_ms <= self.created_at_ms {
            return Err(OrderError::Expiry {
                order: order(),
                created_at_ms: self.created_at_ms,
                expires_at_ms: self.expires_at_ms,
            });
        }
        Ok(())
    }

    /// Whether `code` is this order's pickup code (compared in constant time).
    pub fn code_matches(&self, code: &str) -> bool {
        let digest = pickup_code_digest(&self.order, code.trim());
        digest.iter().zip(self.pickup_code_digest.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    pub fn is_expired(&self, now_ms: i64) -> bool {
        now_ms >= self.expires_at_ms
    }

    pub fn skus(&self) -> BTreeSet<&Sku> {
        self.lines.iter().map(|l| &l.sku).collect()
    }

    /// Merging a header is keeping it: refuses an incoming header that differs from the one held.
    pub fn check_same(&self, incoming: &OrderHeader) -> Result<(), OrderError> {
        if self == incoming {
            return Ok(());
        }
        Err(OrderError::Conflicting {
            order: self.order.clone(),
            ours: self.summary(),
            theirs: incoming.summary(),
        })
    }

    fn summary(&self) -> String {
        let lines: Vec<String> = self.lines.iter().map(|l| format!("{}x{}", l.units, l.sku)).collect();
        format!("store {} [{}] expires {}", self.store, lines.join(", "), self.expires_at_ms)
    }
}

/// A customer reference is free text for staff: printable, one line, bounded.
pub fn check_customer_ref(value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > MAX_CUSTOMER_REF {
        return Err(format!("is longer than {MAX_CUSTOMER_REF} bytes"));
    }
    if let Some((pos, c)) = value.char_indices().find(|(_, c)| c.is_control()) {
        return Err(format!("has a control character {c:?} at byte {pos}"));
    }
    Ok(())
}

/// The digest a store checks a pickup code against: SHA-256 over the order id and the code, so
/// one order's digest says nothing about another's.
pub fn pickup_code_digest(order: &OrderId, code: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(b"store-edge pickup code v1\0");
    hash.update(order.as_str().as_bytes());
    hash.update(b"\0");
    hash.update(code.as_bytes());
    hash.finalize().into()
}

/// Whether `code` looks like a pickup code at all (digits only, the right length), so a typo
/// gets a message of its own rather than "wrong code".
pub fn check_pickup_code_format(code: &str) -> Result<(), String> {
    let code = code.trim();
    if code.len() != PICKUP_CODE_DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("a pickup code is {PICKUP_CODE_DIGITS} digits; got {:?}", code.chars().take(20).collect::<String>()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> OrderHeader {
        let order = OrderId::new("W-1001").unwrap();
        OrderHeader {
            pickup_code_digest: pickup_code_digest(&order, "123456"),
            order,
            store: StoreId::new("s1").unwrap(),
            customer_ref: "cust 42".into(),
            created_at_ms: 1_000,
            expires_at_ms: 2_000,
            lines: vec![
                OrderLine { sku: Sku::new("MILK").unwrap(), units: 2 },
                OrderLine { sku: Sku::new("EGGS").unwrap(), units: 1 },
            ],
        }
    }

    #[test]
    fn a_well_formed_order_passes_and_checks_its_code() {
        let h = header();
        h.validate().unwrap();
        assert!(h.code_matches("123456"));
        assert!(h.code_matches(" 123456\n"));
        assert!(!h.code_matches("123457"));
        let mut other = h.clone();
        other.order = OrderId::new("W-1002").unwrap();
        assert_ne!(pickup_code_digest(&other.order, "123456"), h.pickup_code_digest);
    }

    #[test]
    fn bad_orders_name_the_line() {
        let mut h = header();
        h.lines[1].units = 0;
        assert_eq!(h.validate().unwrap_err().to_string(), "order W-1001: line 2 (EGGS) asks for 0 units");
        let mut h = header();
        h.lines[1].sku = Sku::new("MILK").unwrap();
        assert!(h.validate().unwrap_err().to_string().contains("lines 1 and 2"));
        let mut h = header();
        h.lines.clear();
        assert!(matches!(h.validate(), Err(OrderError::NoLines { .. })));
        let mut h = header();
        h.customer_ref = "a\nb".into();
        assert!(h.validate().unwrap_err().to_string().contains("control character"));
        let mut h = header();
        h.expires_at_ms = h.created_at_ms;
        assert!(matches!(h.validate(), Err(OrderError::Expiry { .. })));
    }

    #[test]
    fn a_header_merges_only_with_itself() {
        let h = header();
        h.check_same(&h.clone()).unwrap();
        let mut other = h.clone();
        other.lines[0].units = 3;
        assert!(h.check_same(&other).unwrap_err().to_string().contains("3xMILK"));
    }

    #[test]
    fn code_format() {
        check_pickup_code_format("012345").unwrap();
        assert!(check_pickup_code_format("12345").is_err());
        assert!(check_pickup_code_format("12a456").is_err());
    }
}
