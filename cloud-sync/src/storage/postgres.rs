//! PostgreSQL backend (several service processes on one database).
