//! The hash chain over the event log (tamper evidence, as fiscal rules for tills ask): each
//! event's hash covers its predecessor's hash and every stored column, length-prefixed so no
//! two different events can hash the same bytes.

use sha2::{Digest, Sha256};
use shared::HlcStamp;

pub type Hash = [u8; 32];

/// The `prev_hash` of the first event.
pub const GENESIS: Hash = [0u8; 32];

pub fn event_hash(prev: &Hash, seq: u64, stamp: &HlcStamp, kind: &str, idem_key: &str, body: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(b"store-edge event v1");
    h.update(prev);
    h.update(seq.to_le_bytes());
    h.update(stamp.wall_ms.to_le_bytes());
    h.update(stamp.logical.to_le_bytes());
    for part in [stamp.actor.as_str().as_bytes(), kind.as_bytes(), idem_key.as_bytes(), body] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

pub fn hex(hash: &[u8]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}
