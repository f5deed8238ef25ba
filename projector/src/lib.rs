//! Projectors fold the log into read models (Postgres, or SQLite embedded) — and, in a later
//! capability, into the encrypted Parquet archive.
//!
//! A projection is a deterministic fold ([`fold`]) whose row changes are applied with the log
//! positions they reach in one transaction ([`write`]); a member of a consumer group per topic
//! feeds it ([`run`]). A crash at any point and a restart leave the state a clean replay gives.

pub mod archive;
pub mod buckets;
pub mod catalog;
pub mod fold;
pub mod lookup;
pub mod partitions;
pub mod replay;
pub mod rollups;
pub mod run;
pub mod store;
pub mod write;

pub use catalog::Catalog;

/// The topics the read models are folded from. The quota topic's ledger is the gateways' (and
/// the archive's); its denials are on the data topic.
pub const PROJECTED: [loom_schemas::log::Topic; 2] = [
    loom_schemas::log::Topic::Data,
    loom_schemas::log::Topic::Control,
];
pub use lookup::Lookup;
pub use replay::{FromArchive, ReplayReport, replay};
pub use run::{
    Projector, ProjectorConfig, ProjectorError, fold_batch, project_active, store_batch,
    stored_positions,
};
pub use store::{Backend, ReadStore, StoreError, StoreLocation};
