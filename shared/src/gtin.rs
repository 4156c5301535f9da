//! GS1 GTIN-8/12/13/14 parsing with check-digit validation, normalised to GTIN-14 so that the
//! same product scanned as an EAN-13 or read from an RFID tag as a GTIN-14 is the same key.

use core::fmt;
use core::str::FromStr;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GtinError {
    #[error("invalid GTIN {text:?}: {len} digits, expected 8, 12, 13 or 14")]
    Length { text: String, len: usize },
    #[error("invalid GTIN {text:?}: character {found:?} at position {position} is not a digit")]
    NotADigit { text: String, position: usize, found: char },
    #[error("invalid GTIN {text:?}: check digit is {found}, expected {expected}")]
    CheckDigit { text: String, expected: u8, found: u8 },
}

/// A GTIN normalised to 14 digits (left-padded with zeros).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Gtin([u8; 14]);

/// GS1 mod-10 check digit over the digits before it (weights 3,1,3,... from the right).
pub fn check_digit(body: &[u8]) -> u8 {
    let sum: u32 = body.iter().rev().enumerate().map(|(i, &d)| u32::from(d) * if i % 2 == 0 { 3 } else { 1 }).sum();
    ((10 - sum % 10) % 10) as u8
}

impl Gtin {
    pub fn parse(text: &str) -> Result<Gtin, GtinError> {
        let shown: String = text.chars().take(32).collect();
        let len = text.chars().count();
        if let Some((position, found)) = text.chars().enumerate().find(|(_, c)| !c.is_ascii_digit()) {
            return Err(GtinError::NotADigit { text: shown, position, found });
        }
        if ![8, 12, 13, 14].contains(&len) {
            return Err(GtinError::Length { text: shown, len });
        }
        let mut digits = [0u8; 14];
        for (slot, b) in digits[14 - len..].iter_mut().zip(text.bytes()) {
            *slot = b - b'0';
        }
        let expected = check_digit(&digits[..13]);
        if digits[13] != expected {
            return Err(GtinError::CheckDigit { text: shown, expected, found: digits[13] });
        }
        Ok(Gtin(digits))
    }

    /// Builds a GTIN-14 from its first 13 digits, computing the check digit (used by SGTIN
    /// decoding, where the tag carries no check digit).
    pub fn from_body13(body: [u8; 13]) -> Option<Gtin> {
        if body.iter().any(|&d| d > 9) {
            return None;
        }
        let mut digits = [0u8; 14];
        digits[..13].copy_from_slice(&body);
        digits[13] = check_digit(&body);
        Some(Gtin(digits))
    }

    pub fn digits(&self) -> &[u8; 14] {
        &self.0
    }
}

impl fmt::Display for Gtin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in self.0 {
            write!(f, "{d}")?;
        }
        Ok(())
    }
}
impl fmt::Debug for Gtin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gtin({self})")
    }
}
impl FromStr for Gtin {
    type Err = GtinError;
    fn from_str(s: &str) -> Result<Gtin, GtinError> {
        Gtin::parse(s)
    }
}
impl TryFrom<String> for Gtin {
    type Error = GtinError;
    fn try_from(s: String) -> Result<Gtin, GtinError> {
        Gtin::parse(&s)
    }
}
impl From<Gtin> for String {
    fn from(g: Gtin) -> String {
        g.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normalises_every_length_to_gtin14() {
        // GS1 examples: EAN-13, UPC-A, EAN-8 and a GTIN-14.
        assert_eq!(Gtin::parse("4006381333931").unwrap().to_string(), "04006381333931");
        assert_eq!(Gtin::parse("036000291452").unwrap().to_string(), "00036000291452");
        assert_eq!(Gtin::parse("96385074").unwrap().to_string(), "00000096385074");
        assert_eq!(Gtin::parse("10614141000415").unwrap().to_string(), "10614141000415");
        assert_eq!(Gtin::parse("4006381333931"), Gtin::parse("04006381333931"));
    }

    #[test]
    fn names_what_is_wrong() {
        assert_eq!(
            Gtin::parse("4006381333932").unwrap_err().to_string(),
            "invalid GTIN \"4006381333932\": check digit is 2, expected 1"
        );
        assert!(matches!(Gtin::parse("40063813339"), Err(GtinError::Length { len: 11, .. })));
        assert!(matches!(Gtin::parse("40063a1333931"), Err(GtinError::NotADigit { position: 5, found: 'a', .. })));
        assert!(Gtin::parse("").is_err());
        assert!(Gtin::parse("٤٠٠٦٣٨١٣٣٣٩٣").is_err(), "non-ASCII digits");
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,20}") {
            let _ = Gtin::parse(&s);
        }

        #[test]
        fn every_body_with_its_check_digit_round_trips(body in proptest::array::uniform13(0u8..10)) {
            let g = Gtin::from_body13(body).unwrap();
            prop_assert_eq!(Gtin::parse(&g.to_string()).unwrap(), g);
        }
    }
}
