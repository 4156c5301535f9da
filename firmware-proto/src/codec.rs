//! The bytes shared by both transports: `postcard(Envelope) | CRC-32C (LE)`, called the
//! *payload*. MQTT carries it as is ([`crate::payload`]); serial wraps it in COBS and a 0x00
//! ([`crate::frame`]). Kept in one place so the two cannot drift apart, and so the order of the
//! checks (length, CRC, version byte, body, trailing bytes, envelope rules) is written once.

use core::fmt;

#[cfg(not(feature = "std"))]
use crc::{Crc, CRC_32_ISCSI};

use crate::message::{Envelope, ProtoError};
use crate::payload::MAX_PAYLOAD;
use crate::schema::PROTOCOL_VERSION;

/// CRC-32C (Castagnoli; `CRC_32_ISCSI` in the crc catalogue). Firmware (`no_std`) uses the
/// 1 KiB byte-wise table; the hub (`std`) the CPU's CRC-32C instruction where it has one
/// (SSE 4.2, ARMv8 CRC; the `crc32c` crate, with a table fallback): the same checksum, which the
/// hub computes for every RFID message (DESIGN 10: >= 100k reads/s). A test holds the two to
/// the same values.
#[cfg(not(feature = "std"))]
static CRC32C: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);

#[cfg(not(feature = "std"))]
fn checksum(bytes: &[u8]) -> u32 {
    CRC32C.checksum(bytes)
}

#[cfg(feature = "std")]
fn checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Bytes of the CRC trailer.
pub(crate) const CRC_LEN: usize = 4;

/// Smallest possible payload: the version byte and the CRC.
pub(crate) const MIN_PAYLOAD: usize = 1 + CRC_LEN;

/// Errors of the framing layer (payload and frame encode/decode, and the accumulator).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The output buffer given to an encoder is too small.
    BufferTooSmall {
        /// Bytes the encoded message needs.
        needed: usize,
        /// Bytes the buffer has.
        available: usize,
    },
    /// The message encodes to more than [`MAX_PAYLOAD`] bytes (only a large
    /// [`crate::TagReads`] can): refused, split it.
    TooLarge {
        /// [`crate::Body::name`] of the message.
        msg: &'static str,
        /// [`MAX_PAYLOAD`].
        max: usize,
    },
    /// Input longer than the bound ([`crate::MAX_FRAME`] for a frame, [`MAX_PAYLOAD`] for a
    /// payload), discarded without decoding (the accumulator discards up to the next 0x00).
    Oversized,
    /// An empty frame or payload.
    Empty,
    /// The frame is not valid COBS (or holds a 0x00 before its end): corrupted or garbage.
    Cobs,
    /// Fewer bytes than the version byte and the CRC.
    Truncated {
        /// Bytes received.
        len: usize,
    },
    /// The CRC-32C does not match: the bytes were corrupted on the way.
    Crc {
        /// CRC computed over the received bytes.
        computed: u32,
        /// CRC the frame carries.
        received: u32,
    },
    /// The version byte is not [`PROTOCOL_VERSION`]; nothing else was decoded.
    UnsupportedVersion {
        /// Version byte received (or, when encoding, the envelope's `version`).
        found: u8,
        /// [`PROTOCOL_VERSION`].
        supported: u8,
    },
    /// postcard could not decode (or encode) the envelope.
    Postcard(postcard::Error),
    /// Bytes left over after the envelope: a different schema, or garbage.
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// The envelope decoded but breaks a message rule (device name, msg_id).
    Invalid(ProtoError),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BufferTooSmall { needed, available } => write!(
                f,
                "output buffer too small: the encoded message needs {needed} bytes, the buffer \
                 has {available}"
            ),
            FrameError::TooLarge { msg, max } => {
                write!(f, "{msg} message is larger than the {max}-byte payload limit; split it")
            }
            FrameError::Oversized => write!(
                f,
                "oversized frame discarded (longer than {} bytes, or a payload longer than {} \
                 bytes): garbage on the line or a peer with other limits",
                crate::frame::MAX_FRAME,
                MAX_PAYLOAD
            ),
            FrameError::Empty => f.write_str("empty frame"),
            FrameError::Cobs => f.write_str("invalid COBS encoding: corrupted frame or garbage on the line"),
            FrameError::Truncated { len } => write!(
                f,
                "truncated payload: {len} bytes, less than the minimum {MIN_PAYLOAD} (version \
                 byte and CRC)"
            ),
            FrameError::Crc { computed, received } => write!(
                f,
                "CRC-32C mismatch: computed 0x{computed:08x}, received 0x{received:08x}; \
                 corrupted on the way"
            ),
            FrameError::UnsupportedVersion { found, supported } => write!(
                f,
                "unsupported protocol version {found}; this build speaks version {supported}; \
                 update the older side"
            ),
            FrameError::Postcard(e) => write!(f, "envelope does not decode: {e}"),
            FrameError::TrailingBytes { count } => {
                write!(f, "{count} unexpected bytes after the envelope (different schema or garbage)")
            }
            FrameError::Invalid(e) => write!(f, "invalid envelope: {e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for FrameError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FrameError::Postcard(e) => Some(e),
            FrameError::Invalid(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ProtoError> for FrameError {
    fn from(e: ProtoError) -> FrameError {
        FrameError::Invalid(e)
    }
}

/// Writes the payload of `env` into `buf` and returns its length. Refuses an envelope with
/// another version or breaking a message rule, and one that would exceed [`MAX_PAYLOAD`].
pub(crate) fn encode_payload(env: &Envelope, buf: &mut [u8; MAX_PAYLOAD]) -> Result<usize, FrameError> {
    if env.version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion { found: env.version, supported: PROTOCOL_VERSION });
    }
    env.validate()?;
    let len = match postcard::to_slice(env, &mut buf[..MAX_PAYLOAD - CRC_LEN]) {
        Ok(used) => used.len(),
        Err(postcard::Error::SerializeBufferFull) => {
            return Err(FrameError::TooLarge { msg: env.body.name(), max: MAX_PAYLOAD })
        }
        Err(e) => return Err(FrameError::Postcard(e)),
    };
    let crc = checksum(&buf[..len]);
    buf[len..len + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(len + CRC_LEN)
}

/// Decodes one payload. Checks, in order: length bounds, CRC, version byte (before the body),
/// the envelope, trailing bytes, the envelope's rules.
pub(crate) fn decode_payload(bytes: &[u8]) -> Result<Envelope, FrameError> {
    if bytes.is_empty() {
        return Err(FrameError::Empty);
    }
    if bytes.len() > MAX_PAYLOAD {
        return Err(FrameError::Oversized);
    }
    if bytes.len() < MIN_PAYLOAD {
        return Err(FrameError::Truncated { len: bytes.len() });
    }
    let (data, trailer) = bytes.split_at(bytes.len() - CRC_LEN);
    let received = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let computed = checksum(data);
    if computed != received {
        return Err(FrameError::Crc { computed, received });
    }
    if data[0] != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion { found: data[0], supported: PROTOCOL_VERSION });
    }
    let (env, rest) = postcard::take_from_bytes::<Envelope>(data).map_err(FrameError::Postcard)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes { count: rest.len() });
    }
    env.validate()?;
    Ok(env)
}

/// CRC-32C of `bytes`, as carried in the payload trailer (little endian).
pub fn crc32c(bytes: &[u8]) -> u32 {
    checksum(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnoli() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    /// The hub's CRC (the CPU instruction) and the firmware's (the crc crate's table) agree on
    /// every length and alignment a payload can have.
    #[test]
    fn the_hub_s_crc_is_the_firmware_s() {
        let table = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
        let bytes: std::vec::Vec<u8> = (0..600u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for start in 0..8 {
            for end in start..bytes.len() {
                assert_eq!(crc32c(&bytes[start..end]), table.checksum(&bytes[start..end]), "bytes {start}..{end}");
            }
        }
    }
}
