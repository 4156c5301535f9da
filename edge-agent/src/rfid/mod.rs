//! RFID: reader events in (the native envelope, or a vendor's JSON adapted at the edge:
//! [`impinj`]), per-zone presence out ([`presence`]): deduplicated reads, arrived/departed,
//! cycle counts by GTIN, and the exit-gate alarm for a tagged item that was not sold. Pure; the
//! MQTT side feeds it.

pub mod impinj;
pub mod presence;
