//! cloud-sync: the endpoint every store syncs with (postcard over HTTP) and the HQ JSON API,
//! on SQLite or PostgreSQL behind one storage trait.
//!
//! Codemap: [`config`] (the TOML file), [`auth`] (bearer tokens, stored hashed), [`http`] (the
//! router: store sync and HQ API), [`catalog_import`] and [`price_guard`] (pure validation the
//! HQ API runs before it writes), [`orders`] (online orders as HQ sees them, derived from the
//! escrow rows), [`expiry`] (the task that expires orders not picked up), [`storage`] (the one
//! interface to the database).

pub mod auth;
pub mod catalog_import;
pub mod config;
pub mod expiry;
pub mod http;
pub mod orders;
pub mod price_guard;
pub mod storage;
