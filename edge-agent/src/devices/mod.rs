//! Device links and the parsers between their bytes and the hub's inputs. Serial links own
//! their port; parsers here are pure.

pub mod framed;
pub mod plain_scanner;
pub mod plain_task;
pub mod registry;
pub mod registry_store;
pub mod serial;
pub mod wiring;
