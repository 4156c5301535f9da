//! The versioned envelope every sync message travels in. postcard has no schema evolution:
//! bytes of a newer message read as an older type can decode "successfully" into garbage. So
//! every message starts with a magic and an explicit protocol version, checked before a single
//! body byte is interpreted, and unknown versions are refused with an error naming both.
//!
//! Layout: `b"SE"` | version (u16, little endian) | postcard body. Trailing bytes are refused.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The sync protocol version this build speaks.
pub const SYNC_PROTOCOL_VERSION: u16 = 2;
const MAGIC: [u8; 2] = *b"SE";
const HEADER_LEN: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("sync message too short: {len} bytes, the header alone is {HEADER_LEN}")]
    TooShort { len: usize },
    #[error("not a store-edge sync message (magic {found:02x?}, expected \"SE\")")]
    BadMagic { found: [u8; 2] },
    #[error(
        "unsupported sync protocol version {found}; this build speaks version {supported}: upgrade the older side"
    )]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("malformed sync message body: {0}")]
    Malformed(String),
    #[error("sync message has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
}

pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&SYNC_PROTOCOL_VERSION.to_le_bytes());
    postcard::to_extend(message, out).map_err(|e| WireError::Malformed(e.to_string()))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() < HEADER_LEN {
        return Err(WireError::TooShort { len: bytes.len() });
    }
    let found = [bytes[0], bytes[1]];
    if found != MAGIC {
        return Err(WireError::BadMagic { found });
    }
    let version = u16::from_le_bytes([bytes[2], bytes[3]]);
    if version != SYNC_PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion { found: version, supported: SYNC_PROTOCOL_VERSION });
    }
    let (message, rest) =
        postcard::take_from_bytes(&bytes[HEADER_LEN..]).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stock::{Slot, SlotKey, SlotRow};
    use crate::{ActorId, Sku, StoreId};
    use proptest::prelude::*;

    fn row() -> SlotRow {
        SlotRow {
            key: SlotKey {
                store: StoreId::new("s1").unwrap(),
                sku: Sku::new("A").unwrap(),
                actor: ActorId::new("store:s1").unwrap(),
            },
            slot: Slot { inc: 12, dec: 3 },
        }
    }

    #[test]
    fn golden_bytes_pin_the_layout() {
        let bytes = encode(&row()).unwrap();
        assert_eq!(bytes, [b"SE".as_slice(), &[2, 0], &[2], b"s1", &[1], b"A", &[8], b"store:s1", &[12, 3]].concat());
        assert_eq!(decode::<SlotRow>(&bytes).unwrap(), row());
    }

    #[test]
    fn refuses_unknown_versions_before_reading_the_body() {
        let mut bytes = encode(&row()).unwrap();
        bytes[2] = 1;
        assert_eq!(
            decode::<SlotRow>(&bytes).unwrap_err().to_string(),
            "unsupported sync protocol version 1; this build speaks version 2: upgrade the older side"
        );
        assert!(matches!(decode::<SlotRow>(b"XX\x01\x00"), Err(WireError::BadMagic { .. })));
        assert!(matches!(decode::<SlotRow>(b"SE"), Err(WireError::TooShort { len: 2 })));
        let mut long = encode(&row()).unwrap();
        long.push(0);
        assert_eq!(decode::<SlotRow>(&long), Err(WireError::TrailingBytes(1)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode::<SlotRow>(&bytes);
            let mut framed = b"SE\x01\x00".to_vec();
            framed.extend_from_slice(&bytes);
            let _ = decode::<Vec<SlotRow>>(&framed);
        }
    }
}
