#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]
//! The store-edge device protocol: what store devices (scanners, scales, RFID readers,
//! electronic shelf labels, self-checkout lanes) and the hub say to each other, and the exact
//! bytes they say it with. It exists as its own `no_std` crate so that device firmware and the
//! hub compile the very same types: a change to a message is a change to one file, caught by the
//! schema hash and the golden-byte tests instead of being misread on the wire.
//!
//! Layers, bottom to top (each has its own error type):
//!
//! - [`message`]: the [`Envelope`] and every [`Body`], all bounded (`heapless`), so every
//!   message has a documented maximum size. Errors: [`ProtoError`].
//! - [`schema`]: [`PROTOCOL_VERSION`], the [`SCHEMA`] text and its [`SCHEMA_HASH`].
//! - [`compat`]: the HELLO check, [`check_hello`]. Errors: [`Incompatible`].
//! - [`payload`] (MQTT) and [`frame`] (serial, COBS + 0x00): envelope <-> bytes, with a CRC-32C
//!   and the version byte checked before anything else is decoded. Errors: [`FrameError`].
//! - [`tag_reads`]: a borrowed fast path for RFID readers' `TagReads` payloads, held to the
//!   same verdicts as [`payload`] by property tests (the hub decodes these by the hundred
//!   thousand per second).
//! - [`link`]: pure state machines for acks, retries and duplicate detection
//!   ([`link::Outbox`], [`link::Dedup`]). Errors: [`link::WindowFull`].
//!
//! Nothing in this crate panics on any input bytes, allocates (without the `std` feature),
//! reads a clock or does I/O. The wire format is specified in `SPEC.md` next to this crate.
//!
//! Features: `std` (default) adds `Vec`-returning helpers ([`frame::encode_vec`],
//! [`payload::encode_vec`]) and `std::error::Error` impls.

#[cfg(all(test, not(feature = "std")))]
extern crate std;

pub mod compat;
pub mod frame;
pub mod link;
pub mod message;
pub mod payload;
pub mod schema;
pub mod tag_reads;

mod codec;

pub use codec::FrameError;
pub use compat::{check_hello, Incompatible};
pub use frame::{Accumulator, AccumulatorStats, MAX_FRAME};
pub use message::*;
pub use payload::MAX_PAYLOAD;
pub use schema::{msg_name, MESSAGES, PROTOCOL_VERSION, SCHEMA, SCHEMA_HASH};
