//! The messages themselves: one [`Envelope`] around one [`Body`] per message, for every device
//! kind and both directions. They live here, free of any encoding concern, so that firmware and
//! hub share one definition, and every string and vector is a `heapless` type with a fixed
//! capacity, so that every message has a maximum encoded size (documented on each type, checked
//! by tests, summarised in SPEC.md) and nothing here needs an allocator.
//!
//! Field order is wire order (postcard encodes struct fields in order and enum variants by
//! index): reordering fields or variants is a schema change (see [`crate::SCHEMA`]).

use core::fmt;

use heapless::{String, Vec};
use serde::{Deserialize, Serialize};

use crate::schema::{MESSAGES, PROTOCOL_VERSION, SCHEMA_HASH};

/// Maximum length of a [`DeviceName`], in bytes.
pub const DEVICE_NAME_MAX: usize = 32;

/// A device's name: 1 to 32 ASCII letters, digits, `-`, `_` or `.`. It appears in MQTT topics
/// and logs, so nothing else is allowed (no `/`, `+`, `#`, spaces or control characters).
pub type DeviceName = String<DEVICE_NAME_MAX>;

/// Errors of the message layer: a value that does not fit a message's rules or bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtoError {
    /// The device name is empty.
    EmptyDeviceName,
    /// The device name is longer than [`DEVICE_NAME_MAX`] bytes.
    DeviceNameTooLong {
        /// Its length in bytes.
        len: usize,
        /// [`DEVICE_NAME_MAX`].
        max: usize,
    },
    /// The device name contains a byte other than ASCII letters, digits, `-`, `_`, `.`.
    DeviceNameByte {
        /// Offending byte (the first byte of a multi-byte character).
        byte: u8,
        /// Its index in the name.
        index: usize,
    },
    /// A string or byte field is longer than its bound.
    TooLong {
        /// Which field (e.g. `"Scan.data"`).
        field: &'static str,
        /// Length given, in bytes (or elements).
        len: usize,
        /// The field's bound.
        max: usize,
    },
    /// The envelope's `msg_id` is not the id of its body.
    MsgIdMismatch {
        /// `msg_id` carried by the envelope.
        msg_id: u16,
        /// `msg_id` of the body it carries.
        body: u16,
    },
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ProtoError::EmptyDeviceName => f.write_str("device name is empty"),
            ProtoError::DeviceNameTooLong { len, max } => {
                write!(f, "device name is {len} bytes long; at most {max} are allowed")
            }
            ProtoError::DeviceNameByte { byte, index } => {
                if byte.is_ascii_graphic() || byte == b' ' {
                    write!(f, "device name has '{}'", byte as char)?;
                } else {
                    write!(f, "device name has byte 0x{byte:02x}")?;
                }
                write!(f, " at index {index}; only ASCII letters, digits, '-', '_' and '.' are allowed")
            }
            ProtoError::TooLong { field, len, max } => {
                write!(f, "{field} is {len} long; at most {max} fits")
            }
            ProtoError::MsgIdMismatch { msg_id, body } => {
                write!(f, "envelope msg_id 0x{msg_id:02x} does not match its body (msg_id 0x{body:02x})")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ProtoError {}

/// Checks a device name against the [`DeviceName`] rules.
pub fn check_device_name(name: &str) -> Result<(), ProtoError> {
    if name.is_empty() {
        return Err(ProtoError::EmptyDeviceName);
    }
    if name.len() > DEVICE_NAME_MAX {
        return Err(ProtoError::DeviceNameTooLong { len: name.len(), max: DEVICE_NAME_MAX });
    }
    match name.bytes().enumerate().find(|(_, b)| !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))) {
        Some((index, byte)) => Err(ProtoError::DeviceNameByte { byte, index }),
        None => Ok(()),
    }
}

/// Builds a [`DeviceName`], refusing one that breaks its rules.
pub fn device_name(name: &str) -> Result<DeviceName, ProtoError> {
    check_device_name(name)?;
    bounded_str("device", name)
}

/// Copies `s` into a bounded string, refusing it (naming `field`) if it is longer than `N` bytes.
pub fn bounded_str<const N: usize>(field: &'static str, s: &str) -> Result<String<N>, ProtoError> {
    let mut out = String::new();
    out.push_str(s).map_err(|()| ProtoError::TooLong { field, len: s.len(), max: N })?;
    Ok(out)
}

/// Copies `bytes` into a bounded vector, refusing them (naming `field`) if there are more than `N`.
pub fn bounded_bytes<const N: usize>(field: &'static str, bytes: &[u8]) -> Result<Vec<u8, N>, ProtoError> {
    Vec::from_slice(bytes).map_err(|()| ProtoError::TooLong { field, len: bytes.len(), max: N })
}

/// The longest prefix of `s` that fits in `N` bytes without splitting a character: for display
/// text (product names, lane messages) where a shortened text beats no text.
pub fn truncated_str<const N: usize>(s: &str) -> String<N> {
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::new();
    // Cannot fail: `end <= N` and `end` is a char boundary.
    let _ = out.push_str(&s[..end]);
    out
}

/// One message on the wire: who sent it (or, from the hub, whom it is for), which boot of that
/// sender, its sequence number, and the body. Encoded size: at most 46 bytes of header
/// (version 1, device 33, boot_id 5, seq 5, msg_id 1, body variant 1) plus the body.
///
/// `version` is the first field so that it is the first byte of every payload: decoders check
/// it before decoding anything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u8,
    /// The device: the sender of a device's message, the addressee of the hub's.
    pub device: DeviceName,
    /// The sender's boot id: a random value chosen at every boot; sequences restart with it.
    pub boot_id: u32,
    /// The sender's sequence number for this boot: starts at 1, never 0, one per envelope.
    pub seq: u32,
    /// `body.msg_id()`, repeated so that a reader can name a message whose body it cannot read.
    pub msg_id: u16,
    /// The message.
    pub body: Body,
}

impl Envelope {
    /// An envelope with `version = PROTOCOL_VERSION` and `msg_id = body.msg_id()`; refuses an
    /// invalid device name.
    pub fn new(device: &str, boot_id: u32, seq: u32, body: Body) -> Result<Envelope, ProtoError> {
        Ok(Envelope {
            version: PROTOCOL_VERSION,
            device: device_name(device)?,
            boot_id,
            seq,
            msg_id: body.msg_id(),
            body,
        })
    }

    /// Checks the rules the types cannot express: a valid device name and a `msg_id` matching
    /// the body. (The version is checked by the encoders and decoders, before this.)
    pub fn validate(&self) -> Result<(), ProtoError> {
        check_device_name(&self.device)?;
        let body = self.body.msg_id();
        if self.msg_id != body {
            return Err(ProtoError::MsgIdMismatch { msg_id: self.msg_id, body });
        }
        Ok(())
    }
}

/// Every message. The variant order is the wire discriminant; `msg_id` is the stable id in the
/// envelope (table in SPEC.md and [`MESSAGES`]).
// No `Box` without an allocator: a `Body` is as large as its largest variant (`TagReads`), on
// purpose, so it always fits its stack slot.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// device -> hub, first after every boot or reconnect.
    Hello(Hello),
    /// hub -> device: HELLO accepted.
    HelloAck(HelloAck),
    /// hub -> device: HELLO refused.
    HelloRefused(HelloRefused),
    /// both ways: link-level ack of a received envelope.
    Ack(Ack),
    /// device -> hub: liveness and health.
    Heartbeat(Heartbeat),
    /// scanner -> hub: one barcode.
    Scan(Scan),
    /// scale -> hub: a weight reading.
    Weight(Weight),
    /// lane -> hub: a customer action.
    LaneInput(LaneInput),
    /// hub -> lane: what to show.
    LaneDisplay(LaneDisplay),
    /// label -> hub: woke up; shows this content.
    LabelCheckIn(LabelCheckIn),
    /// hub -> label: show this content.
    LabelRender(LabelRender),
    /// device -> hub: progress of a command.
    CommandAck(CommandAck),
    /// RFID reader -> hub: a batch of tag reads.
    TagReads(TagReads),
    /// RFID reader -> hub: reader health.
    ReaderStatus(ReaderStatus),
    /// RFID reader -> hub: an inventory cycle started or ended (a zone count).
    InventoryCycle(InventoryCycle),
}

impl Body {
    fn index(&self) -> usize {
        match self {
            Body::Hello(_) => 0,
            Body::HelloAck(_) => 1,
            Body::HelloRefused(_) => 2,
            Body::Ack(_) => 3,
            Body::Heartbeat(_) => 4,
            Body::Scan(_) => 5,
            Body::Weight(_) => 6,
            Body::LaneInput(_) => 7,
            Body::LaneDisplay(_) => 8,
            Body::LabelCheckIn(_) => 9,
            Body::LabelRender(_) => 10,
            Body::CommandAck(_) => 11,
            Body::TagReads(_) => 12,
            Body::ReaderStatus(_) => 13,
            Body::InventoryCycle(_) => 14,
        }
    }

    /// The stable message id of this variant (SPEC.md, "Message ids").
    pub fn msg_id(&self) -> u16 {
        MESSAGES[self.index()].0
    }

    /// The variant's name in snake case (`"hello_ack"`, `"tag_reads"`), for logs and metrics.
    pub fn name(&self) -> &'static str {
        MESSAGES[self.index()].1
    }

    /// Whether the receiver answers this message with an [`Ack`] (and the sender keeps it in its
    /// [`crate::link::Outbox`] until then). Not acked: the handshake (a HELLO is answered by
    /// HelloAck or HelloRefused, and re-sent by the device until it is), acks themselves, and
    /// heartbeats (the next one replaces a lost one).
    pub fn needs_ack(&self) -> bool {
        !matches!(self, Body::Hello(_) | Body::HelloAck(_) | Body::HelloRefused(_) | Body::Ack(_) | Body::Heartbeat(_))
    }
}

/// The kinds of device; `as_str` is the `{kind}` of the MQTT topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeviceKind {
    /// Electronic shelf label.
    Esl,
    /// Barcode scanner.
    Scanner,
    /// Scale.
    Scale,
    /// RFID reader.
    Rfid,
    /// Self-checkout lane.
    Lane,
}

impl DeviceKind {
    /// Every kind, in wire order.
    pub const ALL: [DeviceKind; 5] =
        [DeviceKind::Esl, DeviceKind::Scanner, DeviceKind::Scale, DeviceKind::Rfid, DeviceKind::Lane];

    /// `"esl"`, `"scanner"`, `"scale"`, `"rfid"` or `"lane"`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Esl => "esl",
            DeviceKind::Scanner => "scanner",
            DeviceKind::Scale => "scale",
            DeviceKind::Rfid => "rfid",
            DeviceKind::Lane => "lane",
        }
    }

    /// The kind named `s` (as returned by [`DeviceKind::as_str`]).
    pub fn from_name(s: &str) -> Option<DeviceKind> {
        DeviceKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device introduces itself. At most 32 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// What the device is.
    pub kind: DeviceKind,
    /// Firmware version, free text (e.g. `"2.4.1"`), at most 24 bytes.
    pub firmware: String<24>,
    /// The device's [`PROTOCOL_VERSION`].
    pub protocol_version: u8,
    /// The device's [`SCHEMA_HASH`].
    pub schema_hash: u32,
}

impl Hello {
    /// A HELLO from this build: its protocol version and schema hash.
    pub fn new(kind: DeviceKind, firmware: &str) -> Result<Hello, ProtoError> {
        Ok(Hello {
            kind,
            firmware: bounded_str("Hello.firmware", firmware)?,
            protocol_version: PROTOCOL_VERSION,
            schema_hash: SCHEMA_HASH,
        })
    }
}

/// The hub accepted a HELLO. At most 10 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// Hub time, milliseconds since the Unix epoch, for devices without a clock.
    pub hub_time_ms: u64,
}

/// The hub refused a HELLO. At most 11 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloRefused {
    /// Why.
    pub reason: RefuseReason,
}

/// Why a HELLO was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    /// Protocol versions differ.
    ProtocolVersion {
        /// The hub's.
        ours: u8,
        /// The device's.
        theirs: u8,
    },
    /// Same version, different schema hash: the two were built from different message types.
    Schema {
        /// The hub's.
        ours: u32,
        /// The device's.
        theirs: u32,
    },
    /// The hub does not know (or does not accept) this device.
    UnknownDevice,
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RefuseReason::ProtocolVersion { ours, theirs } => {
                write!(f, "protocol version mismatch: hub speaks version {ours}, device speaks version {theirs}")
            }
            RefuseReason::Schema { ours, theirs } => {
                write!(f, "schema mismatch: hub schema hash 0x{ours:08x}, device schema hash 0x{theirs:08x}")
            }
            RefuseReason::UnknownDevice => f.write_str("device unknown to the hub"),
        }
    }
}

/// Link-level ack: the envelope with this `seq` (of the peer's current boot) arrived. At most
/// 5 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The acknowledged envelope's `seq`.
    pub of_seq: u32,
}

/// Liveness and health. At most 9 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Seconds since boot.
    pub uptime_s: u32,
    /// Battery charge, 0-100, if battery powered.
    pub battery_pct: Option<u8>,
    /// Radio signal strength, dBm, if wireless.
    pub rssi_dbm: Option<i8>,
}

/// One barcode read. At most 101 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scan {
    /// AIM symbology identifier such as `"]E0"` (EAN-13) or `"]C1"` (GS1-128); empty if the
    /// scanner does not report one.
    pub symbology: String<3>,
    /// The code's bytes as read, without AIM prefix or suffix; GS1 data may contain 0x1D (GS).
    pub data: Vec<u8, 96>,
}

impl Scan {
    /// A scan, refusing a symbology over 3 bytes or data over 96 bytes.
    pub fn new(symbology: &str, data: &[u8]) -> Result<Scan, ProtoError> {
        Ok(Scan { symbology: bounded_str("Scan.symbology", symbology)?, data: bounded_bytes("Scan.data", data)? })
    }
}

/// A scale reading. At most 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weight {
    /// Net weight in grams (negative below zero).
    pub grams: i32,
    /// No motion: only a stable weight may be sold.
    pub stable: bool,
    /// The scale reads below zero (needs re-zeroing).
    pub under_zero: bool,
    /// The load exceeds the scale's capacity.
    pub over_capacity: bool,
}

/// How the customer pays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TenderKind {
    /// Cash.
    Cash,
    /// Payment card.
    Card,
}

/// A customer action at a self-checkout lane. At most 9 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LaneInput {
    /// Start a new basket.
    StartBasket,
    /// Change the quantity of a basket line.
    SetQuantity {
        /// Line number, as shown by [`LaneDisplay::Line`].
        line: u16,
        /// New quantity.
        quantity: u32,
    },
    /// Remove a basket line.
    VoidLine {
        /// Line number.
        line: u16,
    },
    /// Pay.
    Tender(TenderKind),
    /// Abandon the basket.
    VoidBasket,
}

/// Why a lane shows a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LaneMessageCode {
    /// The barcode is valid but no product has it.
    UnknownProduct,
    /// The barcode is not valid (check digit, format).
    InvalidBarcode,
    /// The product may no longer be sold.
    Discontinued,
    /// Weighed item: the scale is still moving.
    WaitForStableWeight,
    /// The scale reports an error.
    ScaleError,
    /// A weighed item was scanned without a weight.
    WeighedItemNeedsScale,
    /// Information.
    Info,
    /// Any other error.
    Error,
}

/// What a lane shows. At most 67 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LaneDisplay {
    /// A basket line, new or changed.
    Line {
        /// Line number.
        line: u16,
        /// Product text, at most 40 bytes (see [`truncated_str`]).
        text: String<40>,
        /// Quantity (units, or grams for weighed items).
        quantity: i32,
        /// Line amount in minor units of the basket currency.
        amount_minor: i64,
    },
    /// A basket line was removed.
    LineVoided {
        /// Line number.
        line: u16,
    },
    /// The running total.
    Total {
        /// Total in minor units.
        amount_minor: i64,
        /// Number of items.
        items: u16,
        /// ISO 4217 code, e.g. `"EUR"`.
        currency: String<3>,
    },
    /// A message for the customer.
    Message {
        /// What kind of message.
        code: LaneMessageCode,
        /// Text, at most 64 bytes.
        text: String<64>,
    },
    /// The sale is committed.
    Receipt {
        /// Receipt id, at most 40 bytes.
        receipt_id: String<40>,
        /// Amount paid in minor units.
        total_minor: i64,
    },
    /// Clear the screen (basket done or voided).
    Cleared,
}

/// An electronic shelf label woke up and says what it shows. At most 12 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelCheckIn {
    /// `content_hash` of the [`LabelRender`] it displays (0 if none).
    pub shown_hash: u64,
    /// Battery charge, 0-100.
    pub battery_pct: u8,
    /// Radio signal strength, dBm.
    pub rssi_dbm: i8,
}

/// Content for a shelf label. At most 116 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelRender {
    /// Hash of this content, chosen by the hub; the label reports it back once shown.
    pub content_hash: u64,
    /// Product name, at most 40 bytes.
    pub name: String<40>,
    /// Shelf price in minor units.
    pub price_minor: i64,
    /// ISO 4217 code.
    pub currency: String<3>,
    /// A promotional price, if any.
    pub promo: Option<Promo>,
    /// A unit price (per kg, per l), if any.
    pub unit_price: Option<UnitPrice>,
    /// After this time (ms since the Unix epoch) the label must not apply this content.
    pub expires_ms: u64,
}

/// A promotional price. At most 20 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promo {
    /// Promotional price in minor units.
    pub price_minor: i64,
    /// End of the promotion, ms since the Unix epoch.
    pub until_ms: u64,
}

/// A unit price. At most 19 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitPrice {
    /// Price per unit in minor units.
    pub price_minor: i64,
    /// The unit, e.g. `"kg"`, `"l"`, `"100g"`; at most 8 bytes.
    pub per: String<8>,
}

/// Stages of a command's progress, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AckStage {
    /// Accepted by the device (or its access point), not yet delivered.
    Queued,
    /// Delivered to the device.
    Delivered,
    /// Applied (e.g. the label shows the content).
    Applied,
    /// Will not be applied; `code` says why.
    Failed,
}

/// Progress of a command (e.g. a [`LabelRender`]). At most 20 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandAck {
    /// `seq` of the command's envelope.
    pub of_seq: u32,
    /// How far it got.
    pub stage: AckStage,
    /// The content hash concerned, if the command carried one.
    pub content_hash: Option<u64>,
    /// Device-specific detail; 0 means none.
    pub code: u16,
}

/// An EPC as serde bytes. postcard writes bytes exactly as it writes a sequence of `u8` (a
/// varint length, then the bytes), so the wire format is the one [`crate::schema::SCHEMA`]
/// describes; reading them as bytes copies the EPC at once instead of one visitor call per
/// byte, on the hub's hottest decode (RFID ingest).
mod epc_bytes {
    use core::fmt;

    use heapless::Vec;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(epc: &Vec<u8, N>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(epc)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(deserializer: D) -> Result<Vec<u8, N>, D::Error> {
        deserializer.deserialize_bytes(EpcVisitor::<N>)
    }

    struct EpcVisitor<const N: usize>;

    impl<'de, const N: usize> Visitor<'de> for EpcVisitor<N> {
        type Value = Vec<u8, N>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "an EPC of at most {N} bytes")
        }

        fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<Self::Value, E> {
            Vec::from_slice(bytes).map_err(|_| E::invalid_length(bytes.len(), &self))
        }

        // Formats without a bytes type (self-describing ones) hand over a sequence.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut epc = Vec::new();
            while let Some(byte) = seq.next_element::<u8>()? {
                epc.push(byte).map_err(|_| A::Error::invalid_length(N + 1, &self))?;
            }
            Ok(epc)
        }
    }
}

/// One tag seen by an RFID reader. At most 40 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRead {
    /// The EPC bytes (12 for SGTIN-96), at most 32.
    #[serde(with = "epc_bytes")]
    pub epc: Vec<u8, 32>,
    /// Antenna port.
    pub antenna: u8,
    /// Peak RSSI in centi-dBm.
    pub rssi_cdbm: i16,
    /// How many times it was read in this batch.
    pub count: u16,
}

/// A batch of tag reads. Up to 16 reads, but a whole envelope must fit [`crate::MAX_PAYLOAD`]:
/// 16 reads of 12-byte EPCs always fit (at most 321 bytes); with EPCs of up to 32 bytes only
/// [`TagReads::MAX_READS_ALWAYS_FIT`] reads are guaranteed to (encoders refuse a larger batch
/// with [`crate::FrameError::TooLarge`]; split it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagReads {
    /// The reads.
    pub reads: Vec<TagRead, 16>,
}

impl TagReads {
    /// Reads per batch that always fit a payload, whatever their EPC length and values.
    pub const MAX_READS_ALWAYS_FIT: usize = 10;
}

/// RFID reader health. At most 7 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReaderStatus {
    /// Reads dropped since boot because the reader's buffer was full.
    pub overflow: u32,
    /// Reader temperature, degrees Celsius, if it reports one.
    pub temperature_c: Option<i8>,
}

/// An RFID reader's inventory cycle (one full pass over some antennas, for a zone count) started
/// or ended. Every read of the cycle is sent between its start and its end, on the same link, so
/// the hub counts the distinct tags read in between. At most 23 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryCycle {
    /// The reader's number for this cycle in this boot; a cycle's start and end carry the same.
    pub cycle_id: u32,
    /// False when the cycle starts; true once every read of it was sent.
    pub ended: bool,
    /// The antenna ports the cycle covers; empty for all of the reader's antennas.
    pub antennas: Vec<u8, 16>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn an_epc_is_read_as_bytes_with_its_bound_kept() {
        /// `TagRead` with room for a longer EPC: the same wire layout.
        #[derive(Serialize)]
        struct Wide {
            epc: Vec<u8, 64>,
            antenna: u8,
            rssi_cdbm: i16,
            count: u16,
        }
        let mut buf = [0u8; 128];
        for len in [0usize, 12, 32, 33] {
            let wide =
                Wide { epc: Vec::from_slice(&[0xA5; 64][..len]).unwrap(), antenna: 2, rssi_cdbm: -4200, count: 3 };
            let bytes = postcard::to_slice(&wide, &mut buf).unwrap();
            let read = postcard::from_bytes::<TagRead>(bytes);
            if len <= 32 {
                let read = read.unwrap();
                assert_eq!(
                    (read.epc.as_slice(), read.antenna, read.rssi_cdbm, read.count),
                    (&[0xA5; 64][..len], 2, -4200, 3)
                );
                let mut again = [0u8; 128];
                assert_eq!(postcard::to_slice(&read, &mut again).unwrap(), bytes, "same bytes written back");
            } else {
                assert!(read.is_err(), "an EPC of {len} bytes is refused");
            }
        }
    }

    #[test]
    fn envelope_new_fills_version_and_msg_id() {
        let env = Envelope::new("scan-01", 7, 1, Body::Ack(Ack { of_seq: 3 })).unwrap();
        assert_eq!(env.version, PROTOCOL_VERSION);
        assert_eq!(env.msg_id, 0x04);
        assert_eq!(env.validate(), Ok(()));
    }

    #[test]
    fn device_names_follow_the_rules() {
        assert_eq!(check_device_name("lane_3.front-B"), Ok(()));
        assert_eq!(check_device_name(""), Err(ProtoError::EmptyDeviceName));
        assert_eq!(check_device_name(&"a".repeat(33)), Err(ProtoError::DeviceNameTooLong { len: 33, max: 32 }));
        assert_eq!(check_device_name(&"a".repeat(32)), Ok(()));
        let err = check_device_name("dev/+").unwrap_err();
        assert_eq!(err, ProtoError::DeviceNameByte { byte: b'/', index: 3 });
        assert!(err.to_string().contains("'/' at index 3"), "{err}");
        let err = check_device_name("dév").unwrap_err();
        assert!(err.to_string().contains("byte 0xc3 at index 1"), "{err}");
        assert!(Envelope::new("a b", 1, 1, Body::Ack(Ack { of_seq: 1 })).is_err());
    }

    #[test]
    fn validate_refuses_a_msg_id_that_is_not_the_body_s() {
        let mut env = Envelope::new("s", 1, 1, Body::Ack(Ack { of_seq: 1 })).unwrap();
        env.msg_id = 0x10;
        assert_eq!(env.validate(), Err(ProtoError::MsgIdMismatch { msg_id: 0x10, body: 0x04 }));
    }

    #[test]
    fn bounded_helpers_refuse_and_truncate_at_char_boundaries() {
        assert!(Scan::new("]E0", &[b'1'; 96]).is_ok());
        assert_eq!(Scan::new("]E0", &[b'1'; 97]), Err(ProtoError::TooLong { field: "Scan.data", len: 97, max: 96 }));
        assert!(Scan::new("]E01", b"1").is_err());
        let s: String<4> = truncated_str("abcé");
        assert_eq!(s.as_str(), "abc");
        let s: String<5> = truncated_str("abcé");
        assert_eq!(s.as_str(), "abcé");
        let s: String<3> = truncated_str("");
        assert_eq!(s.as_str(), "");
    }

    #[test]
    fn device_kinds_round_trip_their_names() {
        for kind in DeviceKind::ALL {
            assert_eq!(DeviceKind::from_name(kind.as_str()), Some(kind));
        }
        assert_eq!(DeviceKind::from_name("printer"), None);
    }

    #[test]
    fn hello_new_speaks_for_this_build() {
        let hello = Hello::new(DeviceKind::Scale, "1.0.0").unwrap();
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        assert_eq!(hello.schema_hash, SCHEMA_HASH);
        assert!(Hello::new(DeviceKind::Scale, &"9".repeat(25)).is_err());
    }
}
