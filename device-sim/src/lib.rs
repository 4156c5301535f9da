//! Simulated store hardware, for the end-to-end tests and for a technician checking a hub
//! without the real devices. Each simulator writes the bytes the real device would, to a pty
//! whose other end the hub opens through a by-id style symlink ([`Port::pty`]), or to a real
//! serial port ([`Port::open`]); and each can misbehave on demand (double scans, every suffix,
//! garbage, truncated frames, NAK re-sends, unplug and replug, motion before a stable weight).

pub mod esl;
pub mod framed;
pub mod plain;
pub mod port;
pub mod rfid;

pub use framed::FramedSim;
pub use plain::{PlainScannerSim, Suffix};
pub use port::Port;
