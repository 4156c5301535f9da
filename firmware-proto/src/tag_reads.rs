//! A borrowed decoder for the one message a hub receives by the hundred thousand per second:
//! an RFID reader's [`TagReads`](crate::TagReads) payload. It reads the EPCs in place instead of
//! building an [`Envelope`](crate::Envelope) through serde (which cost the hub's router about
//! as much as everything else it does per read).
//!
//! It is a fast path, not a second definition of the protocol: [`decode_tag_reads`] answers
//! `Some` only for bytes that [`crate::payload::decode`] accepts as a `TagReads` envelope, with
//! the same content, and `None` for everything else, including every malformed payload; the
//! caller then asks [`crate::payload::decode`], whose verdict and error are the protocol's.
//! Property tests hold the two decoders to that on valid and corrupted payloads.

use crate::codec::{crc32c, CRC_LEN, MIN_PAYLOAD};
use crate::message::{check_device_name, DEVICE_NAME_MAX};
use crate::payload::MAX_PAYLOAD;
use crate::schema::{MESSAGES, PROTOCOL_VERSION};

/// `Body::TagReads`' position in [`crate::Body`]: its postcard discriminant.
const TAG_READS_VARIANT: u8 = 12;
/// Most reads a `TagReads` holds (`heapless::Vec<TagRead, 16>`).
const MAX_READS: usize = 16;
/// Longest EPC (`heapless::Vec<u8, 32>`).
const MAX_EPC: usize = 32;

/// One read, borrowed from the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagReadRef<'a> {
    /// The EPC bytes.
    pub epc: &'a [u8],
    /// Antenna port.
    pub antenna: u8,
    /// Peak RSSI in centi-dBm.
    pub rssi_cdbm: i16,
    /// How many times it was read in this batch.
    pub count: u16,
}

/// A `TagReads` envelope, borrowed from its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagReadsPayload<'a> {
    /// The sending reader (a valid device name).
    pub device: &'a str,
    /// The reader's boot id.
    pub boot_id: u32,
    /// The reader's sequence number.
    pub seq: u32,
    /// The reads, decoded once (the first `count`).
    reads: [TagReadRef<'a>; MAX_READS],
    count: usize,
}

impl<'a> TagReadsPayload<'a> {
    /// The reads, in order.
    pub fn reads(&self) -> impl Iterator<Item = TagReadRef<'a>> + Clone + '_ {
        self.reads[..self.count].iter().copied()
    }

    /// How many reads.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether it holds no read.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// The payload as a borrowed `TagReads` envelope, when [`crate::payload::decode`] would accept
/// it as one; `None` otherwise (another message, or bytes that decoder refuses).
pub fn decode_tag_reads(bytes: &[u8]) -> Option<TagReadsPayload<'_>> {
    if bytes.len() > MAX_PAYLOAD || bytes.len() < MIN_PAYLOAD {
        return None;
    }
    let (data, trailer) = bytes.split_at(bytes.len() - CRC_LEN);
    if crc32c(data) != u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]) {
        return None;
    }
    let mut c = Cursor { bytes: data };
    if c.byte()? != PROTOCOL_VERSION {
        return None;
    }
    let name_len = c.short_len()?;
    if name_len > DEVICE_NAME_MAX {
        return None;
    }
    let device = core::str::from_utf8(c.take(name_len)?).ok()?;
    check_device_name(device).ok()?;
    let boot_id = c.varint(5, 0x0f)? as u32;
    let seq = c.varint(5, 0x0f)? as u32;
    let msg_id = c.varint(3, 0x03)? as u16;
    if msg_id != MESSAGES[usize::from(TAG_READS_VARIANT)].0 {
        return None;
    }
    // The discriminant in its one-byte form (postcard's own encoding of 12).
    if c.byte()? != TAG_READS_VARIANT {
        return None;
    }
    let count = c.short_len()?;
    if count > MAX_READS {
        return None;
    }
    let mut reads = [TagReadRef { epc: &[], antenna: 0, rssi_cdbm: 0, count: 0 }; MAX_READS];
    for read in &mut reads[..count] {
        *read = c.take_read()?;
    }
    if !c.bytes.is_empty() {
        return None;
    }
    Some(TagReadsPayload { device, boot_id, seq, reads, count })
}

struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    /// A length in its one-byte varint form (every length here is below 128); a longer form
    /// is left to the full decoder.
    fn short_len(&mut self) -> Option<usize> {
        let b = self.byte()?;
        (b < 0x80).then_some(usize::from(b))
    }

    /// An unsigned LEB128 varint of at most `max_bytes` bytes whose last byte is at most
    /// `last_max`: postcard's rule for the integer type, so the same bytes pass or fail.
    #[inline]
    fn varint(&mut self, max_bytes: u32, last_max: u8) -> Option<u64> {
        // The one- and two-byte forms inline (antennas, counts, RSSIs); only the two-byte form
        // of a type of at least three can skip the last-byte rule, and every type here is.
        match *self.bytes {
            [b0, ref rest @ ..] if b0 < 0x80 => {
                self.bytes = rest;
                Some(u64::from(b0))
            }
            [b0, b1, ref rest @ ..] if b1 < 0x80 && max_bytes > 2 => {
                self.bytes = rest;
                Some(u64::from(b0 & 0x7f) | u64::from(b1) << 7)
            }
            _ => self.long_varint(max_bytes, last_max),
        }
    }

    fn long_varint(&mut self, max_bytes: u32, last_max: u8) -> Option<u64> {
        let mut out = 0u64;
        for i in 0..max_bytes {
            let b = self.byte()?;
            out |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return (i + 1 < max_bytes || b <= last_max).then_some(out);
            }
        }
        None
    }

    #[inline]
    fn take_read(&mut self) -> Option<TagReadRef<'a>> {
        // EPC length (a one-byte varint: at most 32), the EPC and the antenna, sliced at once.
        let (&epc_len, rest) = self.bytes.split_first()?;
        let epc_len = usize::from(epc_len);
        if epc_len > MAX_EPC || rest.len() <= epc_len {
            return None;
        }
        let (epc, rest) = rest.split_at(epc_len);
        let antenna = rest[0];
        self.bytes = &rest[1..];
        let zigzag = self.varint(3, 0x03)? as u16;
        let rssi_cdbm = ((zigzag >> 1) as i16) ^ -((zigzag & 1) as i16);
        let count = self.varint(3, 0x03)? as u16;
        Some(TagReadRef { epc, antenna, rssi_cdbm, count })
    }
}

#[cfg(test)]
mod tests {
    use heapless::Vec;
    use proptest::prelude::*;

    use super::*;
    use crate::message::{Body, Envelope, TagRead, TagReads};
    use crate::payload;

    fn envelope(device: &str, boot_id: u32, seq: u32, reads: &[(std::vec::Vec<u8>, u8, i16, u16)]) -> Envelope {
        let mut out = Vec::new();
        for (epc, antenna, rssi_cdbm, count) in reads {
            let read =
                TagRead { epc: Vec::from_slice(epc).unwrap(), antenna: *antenna, rssi_cdbm: *rssi_cdbm, count: *count };
            out.push(read).unwrap();
        }
        Envelope::new(device, boot_id, seq, Body::TagReads(TagReads { reads: out })).unwrap()
    }

    /// Device, boot id, sequence and reads `(epc, antenna, rssi_cdbm, count)`, owned.
    type Decoded = (std::string::String, u32, u32, std::vec::Vec<(std::vec::Vec<u8>, u8, i16, u16)>);

    /// What the full decoder makes of `bytes`, in the fast decoder's terms.
    fn by_serde(bytes: &[u8]) -> Option<Decoded> {
        let env = payload::decode(bytes).ok()?;
        let Body::TagReads(t) = env.body else { return None };
        let reads = t.reads.iter().map(|r| (r.epc.to_vec(), r.antenna, r.rssi_cdbm, r.count)).collect();
        Some((env.device.as_str().into(), env.boot_id, env.seq, reads))
    }

    fn by_fast(bytes: &[u8]) -> Option<Decoded> {
        let p = decode_tag_reads(bytes)?;
        let reads: std::vec::Vec<_> = p.reads().map(|r| (r.epc.to_vec(), r.antenna, r.rssi_cdbm, r.count)).collect();
        assert_eq!(reads.len(), p.len());
        Some((p.device.into(), p.boot_id, p.seq, reads))
    }

    /// Rewrites the CRC trailer so a mutated payload reaches the decoders' later checks.
    fn with_crc(mut bytes: std::vec::Vec<u8>) -> std::vec::Vec<u8> {
        if bytes.len() >= CRC_LEN + 1 {
            let n = bytes.len() - CRC_LEN;
            let crc = crc32c(&bytes[..n]).to_le_bytes();
            bytes[n..].copy_from_slice(&crc);
        }
        bytes
    }

    fn reads_strategy() -> impl Strategy<Value = std::vec::Vec<(std::vec::Vec<u8>, u8, i16, u16)>> {
        proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 0..=32), any::<u8>(), any::<i16>(), any::<u16>()),
            0..=10,
        )
    }

    #[test]
    fn reads_a_reader_batch_as_the_full_decoder_does() {
        let env = envelope("rfid-1", 7, 42, &[(vec![0x30, 0x74, 0x25, 0x7b], 2, -5000, 3), (vec![], 0, 0, 0)]);
        let bytes = payload::encode_vec(&env).unwrap();
        let p = decode_tag_reads(&bytes).unwrap();
        assert_eq!((p.device, p.boot_id, p.seq, p.len()), ("rfid-1", 7, 42, 2));
        let first = p.reads().next().unwrap();
        assert_eq!(first, TagReadRef { epc: &[0x30, 0x74, 0x25, 0x7b], antenna: 2, rssi_cdbm: -5000, count: 3 });
        assert_eq!(by_fast(&bytes), by_serde(&bytes));
    }

    #[test]
    fn leaves_other_messages_and_bad_bytes_to_the_full_decoder() {
        let ack = Envelope::new("rfid-1", 1, 1, Body::Ack(crate::message::Ack { of_seq: 1 })).unwrap();
        assert!(decode_tag_reads(&payload::encode_vec(&ack).unwrap()).is_none());
        let mut bytes = payload::encode_vec(&envelope("rfid-1", 1, 1, &[(vec![1; 12], 1, 1, 1)])).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1; // CRC
        assert!(decode_tag_reads(&bytes).is_none());
        assert!(decode_tag_reads(&[]).is_none());
        assert!(decode_tag_reads(&[0u8; MAX_PAYLOAD + 1]).is_none());
    }

    /// The bounds of the message (EPC bytes, reads per batch), one past each: both decoders
    /// refuse (random corruption rarely builds such bytes consistently, so they are built here).
    #[test]
    fn refuses_one_byte_of_epc_or_one_read_too_many() {
        let bytes = payload::encode_vec(&envelope("r", 1, 1, &[(vec![5; 32], 1, 1, 1)])).unwrap();
        let mut data = bytes[..bytes.len() - CRC_LEN].to_vec();
        let at = data.iter().position(|&b| b == 32).unwrap(); // the EPC's length
        data[at] = 33;
        data.insert(at + 1, 5);
        data.extend_from_slice(&[0; CRC_LEN]);
        let data = with_crc(data);
        assert!(by_serde(&data).is_none());
        assert!(decode_tag_reads(&data).is_none());

        let one = (vec![7u8; 12], 1, -1, 1);
        let bytes = payload::encode_vec(&envelope("r", 1, 1, &vec![one; 16])).unwrap();
        let mut data = bytes[..bytes.len() - CRC_LEN].to_vec();
        let count_at = data.iter().position(|&b| b == 16).unwrap(); // the read count
        let read = data[count_at + 1..count_at + 1 + 16].to_vec(); // 1 + 12 + 1 + 1 + 1 bytes
        data[count_at] = 17;
        data.extend_from_slice(&read);
        data.extend_from_slice(&[0; CRC_LEN]);
        let data = with_crc(data);
        assert!(by_serde(&data).is_none());
        assert!(decode_tag_reads(&data).is_none());
        // Still 16 reads, without the extra one: both accept.
        assert!(by_fast(&bytes).is_some());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn agrees_with_the_full_decoder_on_valid_payloads(boot in any::<u32>(), seq in 1u32.., reads in reads_strategy()) {
            let bytes = payload::encode_vec(&envelope("rfid-1", boot, seq, &reads)).unwrap();
            prop_assert!(decode_tag_reads(&bytes).is_some());
            prop_assert_eq!(by_fast(&bytes), by_serde(&bytes));
        }

        /// Corrupted payloads (with a CRC made to match, so every later check is exercised):
        /// the fast decoder never accepts what the full one refuses, nor reads it differently.
        #[test]
        fn never_accepts_what_the_full_decoder_refuses(
            reads in reads_strategy(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut bytes = payload::encode_vec(&envelope("rfid-1", 9, 3, &reads)).unwrap();
            let body_len = bytes.len() - CRC_LEN;
            for (at, value) in edits {
                bytes[at.index(body_len)] = value;
            }
            if truncate {
                bytes.truncate(cut.index(body_len) + 1);
                bytes.extend_from_slice(&[0; CRC_LEN]);
            }
            let bytes = with_crc(bytes);
            if let Some(fast) = by_fast(&bytes) {
                prop_assert_eq!(Some(fast), by_serde(&bytes));
            }
        }

        #[test]
        fn never_accepts_arbitrary_bytes_the_full_decoder_refuses(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let bytes = with_crc(bytes);
            if let Some(fast) = by_fast(&bytes) {
                prop_assert_eq!(Some(fast), by_serde(&bytes));
            }
        }
    }
}
