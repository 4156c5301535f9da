//! cloud-sync: the endpoint every store syncs with (postcard over HTTP) and the HQ JSON API,
//! on SQLite or PostgreSQL behind one storage trait.

pub mod storage;
