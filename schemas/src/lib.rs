//! Loom's contract: the events every component exchanges, how they are encoded and sealed, where
//! tenant keys live, the rules the control topic is folded by, and the append-only log that
//! carries them all.
//!
//! - [`event`]: the event types (mirroring `schemas/avro/*.avsc`).
//! - [`codec`]: Avro single-object encoding with a registry of every schema version.
//! - [`control`]: the control plane's rules, one fold the gateway and the projector share.
//! - [`project`]: what a project configures (routing policy, feature flags), parsed and checked.
//! - [`quota`]: the limits a quota may set (daily budgets, per-minute rates), checked.
//! - [`roles`]: the roles and the permission matrix every endpoint is checked against.
//! - [`crypto`]: sealed fields (AES-256-GCM), keyed body digests, API-key hashing.
//! - [`keystore`]: tenant data keys wrapped by a master key (file or Postgres).
//! - [`log`]: the log and its two transports: the embedded segment files (hash chain,
//!   checkpoints, recovery, verify) and Kafka (with the local spool for outages).
//!
//! With the `testing` feature, fixtures for tests and `loom bench`: [`samples`] (events and
//! histories), [`scratch`] (throw-away Postgres databases) and [`testing`] (the test
//! dependencies' addresses).

pub use secrecy::{ExposeSecret, SecretString};

#[cfg(test)]
mod catalogue;
pub mod codec;
pub mod control;
pub mod crypto;
pub mod event;
pub mod keystore;
pub mod log;
pub mod project;
pub mod quota;
pub mod roles;
#[cfg(any(test, feature = "testing"))]
pub mod samples;
#[cfg(any(test, feature = "testing"))]
pub mod scratch;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
