//! RFID: reader events in (the native envelope, or a vendor's JSON adapted at the edge:
//! [`impinj`]), per-zone presence out ([`presence`]): deduplicated reads, arrived/departed, and
//! the exit-gate alarm for a tagged item that was not sold; and zone cycle counts ([`cycle`],
//! pure) that the [`count`] task records in the ledger as stock counts. The MQTT side feeds them.

pub mod count;
pub mod cycle;
pub mod impinj;
pub mod presence;
