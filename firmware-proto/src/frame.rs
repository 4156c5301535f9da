//! Envelopes on a serial line. A serial line is a byte stream with no message boundaries and
//! occasional garbage (plugging in, noise, a device rebooting mid-frame), so each payload is
//! COBS-encoded and followed by a 0x00, the only byte that never occurs inside a frame: a reader
//! that lost its place resynchronises at the next 0x00, and garbage costs at most the frame it
//! lands in. [`Accumulator`] reassembles frames from reads of any size in a fixed buffer.
//!
//! Frame = `COBS(postcard(Envelope) | CRC-32C LE) | 0x00`, at most [`MAX_FRAME`] bytes.

pub use crate::codec::FrameError;
use crate::codec::{decode_payload, encode_payload};
use crate::message::Envelope;
use crate::payload::MAX_PAYLOAD;

/// Largest frame, in bytes, including COBS overhead and the trailing 0x00. A frame holds a
/// payload of at most [`MAX_PAYLOAD`] (480) bytes, which COBS-encodes to at most 482 bytes plus
/// the 0x00; the rest is headroom. Readers discard anything longer between two 0x00 bytes as
/// [`FrameError::Oversized`].
pub const MAX_FRAME: usize = 512;

// A full payload always fits a frame: COBS adds at most one byte per 254 plus one, and the
// frame ends with 0x00 (480 + 1 + 1 + 1 = 483 <= 512).
const _: () = assert!(MAX_PAYLOAD + MAX_PAYLOAD / 254 + 2 <= MAX_FRAME);

/// Writes the whole frame of `env`, trailing 0x00 included, into `out`; returns its length.
/// Refuses what [`crate::payload::encode`] refuses, and an `out` too small (`BufferTooSmall`
/// says how much is needed; [`MAX_FRAME`] always suffices).
pub fn encode(env: &Envelope, out: &mut [u8]) -> Result<usize, FrameError> {
    let mut frame = [0u8; MAX_FRAME];
    let len = encode_frame(env, &mut frame)?;
    let available = out.len();
    let dst = out.get_mut(..len).ok_or(FrameError::BufferTooSmall { needed: len, available })?;
    dst.copy_from_slice(&frame[..len]);
    Ok(len)
}

/// [`encode`] into a new `Vec`.
#[cfg(feature = "std")]
pub fn encode_vec(env: &Envelope) -> Result<Vec<u8>, FrameError> {
    let mut frame = [0u8; MAX_FRAME];
    let len = encode_frame(env, &mut frame)?;
    Ok(frame[..len].to_vec())
}

fn encode_frame(env: &Envelope, frame: &mut [u8; MAX_FRAME]) -> Result<usize, FrameError> {
    let mut payload = [0u8; MAX_PAYLOAD];
    let len = encode_payload(env, &mut payload)?;
    // A payload of at most MAX_PAYLOAD bytes always fits (see MAX_FRAME); checked anyway.
    let too_large = FrameError::TooLarge { msg: env.body.name(), max: MAX_PAYLOAD };
    let encoded = cobs::try_encode(&payload[..len], &mut frame[..MAX_FRAME - 1]).map_err(|_| too_large.clone())?;
    *frame.get_mut(encoded).ok_or(too_large)? = 0x00;
    Ok(encoded + 1)
}

/// Decodes one frame, with or without its trailing 0x00. Refuses an empty frame, one longer
/// than [`MAX_FRAME`], one with a 0x00 before its end, bad COBS, and everything
/// [`crate::payload::decode`] refuses.
pub fn decode(frame: &[u8]) -> Result<Envelope, FrameError> {
    let encoded = frame.strip_suffix(&[0x00]).unwrap_or(frame);
    if encoded.is_empty() {
        return Err(FrameError::Empty);
    }
    if encoded.len() > MAX_FRAME - 1 {
        return Err(FrameError::Oversized);
    }
    if encoded.contains(&0x00) {
        return Err(FrameError::Cobs);
    }
    let mut buf = [0u8; MAX_FRAME];
    buf[..encoded.len()].copy_from_slice(encoded);
    decode_in_place(&mut buf[..encoded.len()])
}

/// Decodes COBS bytes (no 0x00 inside, none at the end) in place, then the payload.
fn decode_in_place(encoded: &mut [u8]) -> Result<Envelope, FrameError> {
    let len = cobs::decode_in_place(encoded).map_err(|_| FrameError::Cobs)?;
    decode_payload(encoded.get(..len).ok_or(FrameError::Cobs)?)
}

/// Counters of an [`Accumulator`], since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccumulatorStats {
    /// Frames decoded into an envelope.
    pub frames_ok: u64,
    /// Frames reported as an error (including each oversized run, once).
    pub frames_bad: u64,
    /// Bytes that did not end up in a decoded envelope: bad and oversized frames, and partial
    /// frames dropped by [`Accumulator::reset`]. 0x00 delimiters are not counted.
    pub bytes_discarded: u64,
}

/// Reassembles frames from a serial byte stream read in chunks of any size, in a fixed
/// [`MAX_FRAME`] buffer (no allocation).
///
/// Behaviour at the bound: bytes beyond [`MAX_FRAME`] before a 0x00 are discarded up to the
/// next 0x00, and that run is reported once as [`FrameError::Oversized`]. Empty frames (runs of
/// 0x00) are ignored, so a sender may send a 0x00 before a frame to flush a half-received one.
#[derive(Debug, Clone)]
pub struct Accumulator {
    buf: [u8; MAX_FRAME],
    /// Bytes of the current frame in `buf` (never counts the 0x00).
    len: usize,
    /// The current frame exceeded the buffer: discard up to the next 0x00.
    oversized: bool,
    stats: AccumulatorStats,
}

impl Default for Accumulator {
    fn default() -> Self {
        Accumulator::new()
    }
}

impl Accumulator {
    /// An empty accumulator.
    pub fn new() -> Accumulator {
        Accumulator { buf: [0; MAX_FRAME], len: 0, oversized: false, stats: AccumulatorStats::default() }
    }

    /// Feeds bytes as they arrive (any chunking). Calls `on_frame` once per complete frame with
    /// the decoded envelope or the error (bad COBS, bad CRC, unsupported version, oversized,
    /// postcard). Oversized input is discarded up to the next 0x00 and reported once as
    /// [`FrameError::Oversized`]. Garbage costs at most the frame it lands in: the accumulator
    /// always resynchronises at the next 0x00.
    pub fn feed(&mut self, bytes: &[u8], mut on_frame: impl FnMut(Result<Envelope, FrameError>)) {
        let mut rest = bytes;
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == 0x00) {
                Some(end) => {
                    self.push(&rest[..end]);
                    self.end_frame(&mut on_frame);
                    rest = &rest[end + 1..];
                }
                None => {
                    self.push(rest);
                    rest = &[];
                }
            }
        }
    }

    /// Drops a partially received frame (e.g. after the port was unplugged), counting its bytes
    /// as discarded. Counters are kept.
    pub fn reset(&mut self) {
        self.stats.bytes_discarded += self.len as u64;
        self.len = 0;
        self.oversized = false;
    }

    /// Bytes of a frame received so far without its 0x00 (0 between frames).
    pub fn pending(&self) -> usize {
        self.len
    }

    /// Counters since creation.
    pub fn stats(&self) -> AccumulatorStats {
        self.stats
    }

    /// Appends bytes of the current frame (none of them 0x00).
    fn push(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        if self.oversized {
            self.stats.bytes_discarded += chunk.len() as u64;
            return;
        }
        match self.buf[..MAX_FRAME - 1].get_mut(self.len..self.len + chunk.len()) {
            Some(dst) => {
                dst.copy_from_slice(chunk);
                self.len += chunk.len();
            }
            None => {
                self.stats.bytes_discarded += (self.len + chunk.len()) as u64;
                self.len = 0;
                self.oversized = true;
            }
        }
    }

    /// A 0x00 arrived: the current frame is complete.
    fn end_frame(&mut self, on_frame: &mut impl FnMut(Result<Envelope, FrameError>)) {
        if self.oversized {
            self.oversized = false;
            self.stats.frames_bad += 1;
            on_frame(Err(FrameError::Oversized));
            return;
        }
        let len = self.len;
        if len == 0 {
            return;
        }
        self.len = 0;
        let result = decode_in_place(&mut self.buf[..len]);
        match result {
            Ok(_) => self.stats.frames_ok += 1,
            Err(_) => {
                self.stats.frames_bad += 1;
                self.stats.bytes_discarded += len as u64;
            }
        }
        on_frame(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Ack, Body};
    use std::vec::Vec;

    fn ack_frame(seq: u32) -> ([u8; MAX_FRAME], usize) {
        let env = Envelope::new("dev", 1, seq, Body::Ack(Ack { of_seq: seq })).unwrap();
        let mut out = [0u8; MAX_FRAME];
        let len = encode(&env, &mut out).unwrap();
        (out, len)
    }

    fn collect(acc: &mut Accumulator, bytes: &[u8]) -> Vec<Result<Envelope, FrameError>> {
        let mut got = Vec::new();
        acc.feed(bytes, |r| got.push(r));
        got
    }

    #[test]
    fn a_frame_split_byte_by_byte_decodes_once() {
        let (frame, len) = ack_frame(5);
        let mut acc = Accumulator::new();
        let mut got = Vec::new();
        for b in &frame[..len] {
            acc.feed(core::slice::from_ref(b), |r| got.push(r));
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().unwrap().seq, 5);
        assert_eq!(acc.stats().frames_ok, 1);
        assert_eq!(acc.pending(), 0);
    }

    #[test]
    fn oversized_input_is_reported_once_and_the_next_frame_decodes() {
        let mut acc = Accumulator::new();
        let garbage = [0x55u8; 3 * MAX_FRAME];
        assert!(collect(&mut acc, &garbage).is_empty());
        assert!(collect(&mut acc, &garbage).is_empty());
        let got = collect(&mut acc, &[0x00]);
        assert_eq!(got, [Err(FrameError::Oversized)]);
        let (frame, len) = ack_frame(9);
        let got = collect(&mut acc, &frame[..len]);
        assert_eq!(got.len(), 1);
        assert!(got[0].is_ok());
        let stats = acc.stats();
        assert_eq!(stats.frames_bad, 1);
        assert_eq!(stats.frames_ok, 1);
        assert_eq!(stats.bytes_discarded, 6 * MAX_FRAME as u64);
    }

    #[test]
    fn the_largest_frame_that_fits_is_not_oversized() {
        let mut acc = Accumulator::new();
        let mut bytes = [0x01u8; MAX_FRAME];
        bytes[MAX_FRAME - 1] = 0x00;
        // 511 bytes of valid-looking COBS (all empty groups): accepted into the buffer, then
        // refused by the payload bound, not by the accumulator.
        let got = collect(&mut acc, &bytes);
        assert_eq!(got, [Err(FrameError::Oversized)]);
        assert_eq!(acc.stats().bytes_discarded, MAX_FRAME as u64 - 1);
        // One more byte is over the accumulator's bound.
        let mut acc = Accumulator::new();
        let mut bytes = [0x01u8; MAX_FRAME + 1];
        bytes[MAX_FRAME] = 0x00;
        assert_eq!(collect(&mut acc, &bytes), [Err(FrameError::Oversized)]);
    }

    #[test]
    fn runs_of_zeros_are_ignored_and_reset_drops_a_partial_frame() {
        let (frame, len) = ack_frame(2);
        let mut acc = Accumulator::new();
        assert!(collect(&mut acc, &[0, 0, 0]).is_empty());
        assert!(collect(&mut acc, &frame[..len - 3]).is_empty());
        acc.reset();
        assert_eq!(acc.stats().bytes_discarded, len as u64 - 3);
        let got = collect(&mut acc, &frame[..len]);
        assert!(matches!(got.as_slice(), [Ok(env)] if env.seq == 2));
    }

    #[test]
    fn decode_refuses_two_frames_and_empty_input() {
        let (frame, len) = ack_frame(3);
        let mut two = Vec::from(&frame[..len]);
        two.extend_from_slice(&frame[..len]);
        assert_eq!(decode(&two), Err(FrameError::Cobs));
        assert_eq!(decode(&[]), Err(FrameError::Empty));
        assert_eq!(decode(&[0]), Err(FrameError::Empty));
        assert!(decode(&frame[..len]).is_ok());
        assert!(decode(&frame[..len - 1]).is_ok());
    }

    #[test]
    fn encode_says_how_much_room_it_needs() {
        let (frame, len) = ack_frame(4);
        let env = decode(&frame[..len]).unwrap();
        let mut small = [0u8; 8];
        assert_eq!(encode(&env, &mut small), Err(FrameError::BufferTooSmall { needed: len, available: 8 }));
        let mut exact = Vec::from(&frame[..len]);
        exact.fill(0xAA);
        assert_eq!(encode(&env, &mut exact), Ok(len));
        assert_eq!(exact.as_slice(), &frame[..len]);
    }
}
