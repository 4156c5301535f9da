//! Envelopes as MQTT payloads. MQTT already delimits messages, so a payload is the frame's
//! content without COBS or the 0x00: `postcard(Envelope) | CRC-32C (LE)`. The CRC stays because
//! a payload may cross bridges and brokers we do not control, and because it lets one decoder
//! serve both transports. Bounded by [`MAX_PAYLOAD`] so a broker, a queue or a device buffer can
//! be sized for it.

pub use crate::codec::{crc32c, FrameError};
use crate::codec::{decode_payload, encode_payload};
use crate::message::Envelope;

/// Largest payload, in bytes (envelope and CRC). Encoders refuse a larger message with
/// [`FrameError::TooLarge`], decoders refuse larger input with [`FrameError::Oversized`]. Every
/// message fits except a [`crate::TagReads`] of more than
/// [`crate::TagReads::MAX_READS_ALWAYS_FIT`] long EPCs.
pub const MAX_PAYLOAD: usize = 480;

/// Writes the payload of `env` into `out` and returns its length.
///
/// Refuses an envelope whose `version` is not [`crate::PROTOCOL_VERSION`], one that breaks a
/// message rule ([`Envelope::validate`]), one larger than [`MAX_PAYLOAD`], and an `out` too small
/// (`BufferTooSmall` says how much is needed).
pub fn encode(env: &Envelope, out: &mut [u8]) -> Result<usize, FrameError> {
    let mut buf = [0u8; MAX_PAYLOAD];
    let len = encode_payload(env, &mut buf)?;
    let available = out.len();
    let dst = out.get_mut(..len).ok_or(FrameError::BufferTooSmall { needed: len, available })?;
    dst.copy_from_slice(&buf[..len]);
    Ok(len)
}

/// [`encode`] into a new `Vec`.
#[cfg(feature = "std")]
pub fn encode_vec(env: &Envelope) -> Result<Vec<u8>, FrameError> {
    let mut buf = [0u8; MAX_PAYLOAD];
    let len = encode_payload(env, &mut buf)?;
    Ok(buf[..len].to_vec())
}

/// Decodes one payload: checks its length, its CRC, its version byte (before anything else is
/// decoded), then decodes the envelope and refuses trailing bytes, an invalid device name, or a
/// `msg_id` that does not match the body.
pub fn decode(bytes: &[u8]) -> Result<Envelope, FrameError> {
    decode_payload(bytes)
}
