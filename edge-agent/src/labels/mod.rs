//! Electronic shelf labels: what each label should show and what it confirmed it shows
//! ([`planner`]), and when a price change may reach the till ([`sequencing`]). Both are pure
//! state machines; the MQTT link that carries their commands is wired by the daemon.

pub mod planner;
pub mod runtime;
pub mod sequencing;
