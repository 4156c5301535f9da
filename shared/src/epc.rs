//! SGTIN-96 decoding per the GS1 EPC Tag Data Standard: the 96-bit EPC an RFID tag carries
//! becomes the product's GTIN-14 plus the item's serial number, so a tag read counts under the
//! same key as a scan. Other EPC schemes (SSCC, GRAI, ...) are recognised as "not SGTIN" and
//! counted by the caller, never guessed at.

use crate::gtin::Gtin;

/// A decoded SGTIN-96.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sgtin {
    /// Filter value (0 all others, 1 point of sale item, ...), 0-7.
    pub filter: u8,
    pub partition: u8,
    pub gtin: Gtin,
    /// Serial number, up to 38 bits.
    pub serial: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EpcError {
    #[error("EPC is {0} bytes, an SGTIN-96 is 12")]
    Length(usize),
    #[error("EPC header 0x{0:02x} is not SGTIN-96 (0x30)")]
    NotSgtin96(u8),
    #[error("SGTIN-96 partition {0} is reserved")]
    Partition(u8),
    #[error("SGTIN-96 company prefix {value} does not fit {digits} digits")]
    CompanyPrefix { value: u64, digits: u32 },
    #[error("SGTIN-96 item reference {value} does not fit {digits} digits")]
    ItemReference { value: u64, digits: u32 },
    #[error("EPC hex is not valid hexadecimal")]
    Hex,
}

/// (company prefix bits, digits, item reference bits, digits) per partition value.
const PARTITIONS: [(u32, u32, u32, u32); 7] =
    [(40, 12, 4, 1), (37, 11, 7, 2), (34, 10, 10, 3), (30, 9, 14, 4), (27, 8, 17, 5), (24, 7, 20, 6), (20, 6, 24, 7)];

/// Decodes an EPC given as bytes (12 for SGTIN-96).
pub fn decode_sgtin96(epc: &[u8]) -> Result<Sgtin, EpcError> {
    let bytes: [u8; 12] = epc.try_into().map_err(|_| EpcError::Length(epc.len()))?;
    if bytes[0] != 0x30 {
        return Err(EpcError::NotSgtin96(bytes[0]));
    }
    let value = u128::from_be_bytes({
        let mut b = [0u8; 16];
        b[4..].copy_from_slice(&bytes);
        b
    });
    let bits = |from: u32, len: u32| -> u64 { ((value >> (96 - from - len)) & ((1u128 << len) - 1)) as u64 };
    let filter = bits(8, 3) as u8;
    let partition = bits(11, 3) as u8;
    let &(cp_bits, cp_digits, ir_bits, ir_digits) =
        PARTITIONS.get(usize::from(partition)).ok_or(EpcError::Partition(partition))?;
    let company = bits(14, cp_bits);
    let item = bits(14 + cp_bits, ir_bits);
    let serial = bits(58, 38);
    if company >= 10u64.pow(cp_digits) {
        return Err(EpcError::CompanyPrefix { value: company, digits: cp_digits });
    }
    if item >= 10u64.pow(ir_digits) {
        return Err(EpcError::ItemReference { value: item, digits: ir_digits });
    }
    // GTIN-14 = indicator (first digit of the item reference field) + company prefix + the rest
    // of the item reference + check digit.
    let item_digits = digits(item, ir_digits);
    let company_digits = digits(company, cp_digits);
    let mut body = [0u8; 13];
    body[0] = item_digits[0];
    body[1..1 + cp_digits as usize].copy_from_slice(&company_digits);
    body[1 + cp_digits as usize..].copy_from_slice(&item_digits[1..]);
    let gtin = Gtin::from_body13(body).ok_or(EpcError::ItemReference { value: item, digits: ir_digits })?;
    Ok(Sgtin { filter, partition, gtin, serial })
}

/// Decodes an EPC given as hex (as readers report it, e.g. `3074257BF7194E4000001A85`).
pub fn decode_sgtin96_hex(hex: &str) -> Result<Sgtin, EpcError> {
    let hex = hex.trim();
    if hex.len() % 2 != 0 || hex.len() > 64 {
        return Err(if hex.len() > 64 { EpcError::Length(hex.len() / 2) } else { EpcError::Hex });
    }
    let mut bytes = Vec::with_capacity(hex.len() / 2);
    for pair in hex.as_bytes().chunks(2) {
        let s = std::str::from_utf8(pair).map_err(|_| EpcError::Hex)?;
        bytes.push(u8::from_str_radix(s, 16).map_err(|_| EpcError::Hex)?);
    }
    decode_sgtin96(&bytes)
}

fn digits(mut value: u64, count: u32) -> Vec<u8> {
    let mut out = vec![0u8; count as usize];
    for slot in out.iter_mut().rev() {
        *slot = (value % 10) as u8;
        value /= 10;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_tag_data_standard_example() {
        // TDS: urn:epc:id:sgtin:0614141.812345.6789, filter 3 -> 3074257BF7194E4000001A85.
        let s = decode_sgtin96_hex("3074257BF7194E4000001A85").unwrap();
        assert_eq!((s.filter, s.partition, s.serial), (3, 5, 6789));
        assert_eq!(s.gtin.to_string(), "80614141123458");
    }

    #[test]
    fn refuses_what_is_not_an_sgtin96() {
        assert_eq!(decode_sgtin96_hex("3174257BF7194E4000001A85"), Err(EpcError::NotSgtin96(0x31)));
        assert_eq!(decode_sgtin96(&[0x30; 11]), Err(EpcError::Length(11)));
        assert_eq!(decode_sgtin96_hex("30zz"), Err(EpcError::Hex));
        // Partition 7 is reserved.
        assert_eq!(decode_sgtin96_hex("307C257BF7194E4000001A85"), Err(EpcError::Partition(7)));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40), hex in "\\PC{0,40}") {
            let _ = decode_sgtin96(&bytes);
            let _ = decode_sgtin96_hex(&hex);
            let mut sgtin = bytes.clone();
            sgtin.resize(12, 0);
            sgtin[0] = 0x30;
            let _ = decode_sgtin96(&sgtin);
        }
    }
}
