//! Electronic shelf labels: what each label should show and what it confirmed it shows
//! ([`planner`]), the prices the labels confirmed showing ([`shelf`]), and when a price change
//! may reach the till ([`sequencing`]). These are pure state machines; [`runtime`] is the task
//! that drives them over the MQTT link.

pub mod planner;
pub mod runtime;
pub mod sequencing;
pub mod shelf;
