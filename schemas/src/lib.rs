//! Loom's contract: the events every component exchanges, how they are encoded and sealed, where
//! tenant keys live, and the append-only log that carries them.
//!
//! - [`event`]: the event types (mirroring `schemas/avro/*.avsc`).
//! - [`codec`]: Avro single-object encoding with a registry of every schema version.
//! - [`control`]: the control plane's rules, one fold the gateway and the projector share.
//! - [`crypto`]: sealed fields (AES-256-GCM), keyed body digests, API-key hashing.
//! - [`keystore`]: tenant data keys wrapped by a master key (file or Postgres).
//! - [`log`]: the log abstraction and its embedded segment-file implementation.

pub use secrecy::{ExposeSecret, SecretString};

pub mod codec;
pub mod control;
pub mod crypto;
pub mod event;
pub mod keystore;
pub mod log;
pub mod samples;
pub mod scratch;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
