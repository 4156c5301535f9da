//! Money as integer minor units plus an ISO 4217 currency. Never floats: a price is what the
//! customer pays to the cent, and sums must be exact across millions of sales.

use core::fmt;
use core::str::FromStr;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("invalid currency code {0:?}: expected three upper-case ISO 4217 letters, e.g. EUR")]
    InvalidCurrency(String),
    #[error("invalid amount {text:?}: {reason}")]
    InvalidAmount { text: String, reason: String },
    #[error("currency mismatch: {left} vs {right}")]
    CurrencyMismatch { left: Currency, right: Currency },
    #[error("amount overflow")]
    Overflow,
}

/// ISO 4217 alphabetic code.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Currency([u8; 3]);

// Written as the code string, borrowed: no allocation per amount in every event body encoded.
impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.code())
    }
}

impl Currency {
    pub fn new(code: &str) -> Result<Self, MoneyError> {
        let b = code.as_bytes();
        if b.len() != 3 || !b.iter().all(u8::is_ascii_uppercase) {
            return Err(MoneyError::InvalidCurrency(code.chars().take(16).collect()));
        }
        Ok(Currency([b[0], b[1], b[2]]))
    }

    pub fn code(&self) -> &str {
        // Constructed only from three ASCII upper-case letters.
        core::str::from_utf8(&self.0).unwrap_or("???")
    }

    /// Digits after the decimal point (ISO 4217 minor unit). Two unless listed.
    pub fn minor_digits(&self) -> u32 {
        match self.code() {
            "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX" | "VND" | "VUV"
            | "XAF" | "XOF" | "XPF" => 0,
            "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
            _ => 2,
        }
    }
}

impl TryFrom<String> for Currency {
    type Error = MoneyError;
    fn try_from(s: String) -> Result<Self, MoneyError> {
        Currency::new(&s)
    }
}
impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.code().to_owned()
    }
}
impl FromStr for Currency {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, MoneyError> {
        Currency::new(s)
    }
}
impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}
impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Currency({})", self.code())
    }
}

/// An amount in minor units (cents) of a currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Money {
    pub minor: i64,
    pub currency: Currency,
}

impl Money {
    pub fn new(minor: i64, currency: Currency) -> Money {
        Money { minor, currency }
    }

    /// Parses a decimal amount like `12.34` or `-0.5` in the given currency. More decimals than
    /// the currency has are refused rather than rounded: a price is never silently changed.
    pub fn parse(text: &str, currency: Currency) -> Result<Money, MoneyError> {
        let bad =
            |reason: &str| MoneyError::InvalidAmount { text: text.chars().take(40).collect(), reason: reason.into() };
        let digits = currency.minor_digits();
        let (neg, body) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (int_part, frac_part) = match body.split_once('.') {
            Some((i, f)) => (i, f),
            None => (body, ""),
        };
        if int_part.is_empty() || !int_part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("expected digits, optionally with a decimal point, e.g. 12.34"));
        }
        if !frac_part.bytes().all(|b| b.is_ascii_digit()) || (body.contains('.') && frac_part.is_empty()) {
            return Err(bad("expected digits after the decimal point"));
        }
        if frac_part.len() as u32 > digits {
            return Err(bad(&format!("{currency} has {digits} decimal places")));
        }
        let scale = 10i64.pow(digits);
        let whole: i64 = int_part.parse().map_err(|_| bad("too large"))?;
        let mut frac: i64 = if frac_part.is_empty() { 0 } else { frac_part.parse().map_err(|_| bad("too large"))? };
        frac *= 10i64.pow(digits - frac_part.len() as u32);
        let minor = whole.checked_mul(scale).and_then(|w| w.checked_add(frac)).ok_or_else(|| bad("too large"))?;
        Ok(Money { minor: if neg { -minor } else { minor }, currency })
    }

    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch { left: self.currency, right: other.currency });
        }
        let minor = self.minor.checked_add(other.minor).ok_or(MoneyError::Overflow)?;
        Ok(Money { minor, currency: self.currency })
    }

    pub fn checked_mul(self, factor: i64) -> Result<Money, MoneyError> {
        let minor = self.minor.checked_mul(factor).ok_or(MoneyError::Overflow)?;
        Ok(Money { minor, currency: self.currency })
    }

    pub fn is_negative(&self) -> bool {
        self.minor < 0
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.currency.minor_digits();
        let sign = if self.minor < 0 { "-" } else { "" };
        let abs = self.minor.unsigned_abs();
        if digits == 0 {
            return write!(f, "{sign}{abs} {}", self.currency);
        }
        let scale = 10u64.pow(digits);
        write!(f, "{sign}{}.{:0width$} {}", abs / scale, abs % scale, self.currency, width = digits as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur() -> Currency {
        Currency::new("EUR").unwrap()
    }

    #[test]
    fn parses_and_prints_exactly() {
        assert_eq!(Money::parse("12.34", eur()).unwrap().minor, 1234);
        assert_eq!(Money::parse("12.3", eur()).unwrap().minor, 1230);
        assert_eq!(Money::parse("-0.05", eur()).unwrap().minor, -5);
        assert_eq!(Money::parse("7", eur()).unwrap().to_string(), "7.00 EUR");
        assert_eq!(Money::new(-1234, eur()).to_string(), "-12.34 EUR");
        assert_eq!(Money::parse("1500", Currency::new("JPY").unwrap()).unwrap().to_string(), "1500 JPY");
    }

    #[test]
    fn refuses_what_it_would_have_to_round() {
        for bad in ["1.234", "", ".5", "1.", "1,5", "abc", "99999999999999999999"] {
            assert!(Money::parse(bad, eur()).is_err(), "{bad:?}");
        }
        assert!(Currency::new("eur").is_err());
        assert!(Currency::new("EURO").is_err());
    }

    #[test]
    fn arithmetic_is_checked() {
        let a = Money::new(i64::MAX, eur());
        assert_eq!(a.checked_add(Money::new(1, eur())), Err(MoneyError::Overflow));
        let usd = Currency::new("USD").unwrap();
        assert!(matches!(
            Money::new(1, eur()).checked_add(Money::new(1, usd)),
            Err(MoneyError::CurrencyMismatch { .. })
        ));
    }
}
