//! The archive: every event of the log, per tenant, as encrypted Parquet files on object storage
//! (a local directory by default, S3 in production) — the log's cold tier, which outlives Kafka's
//! retention, feeds the query service and replays the whole history.
//!
//! - `columns`: the one table's columns (envelope, log position, typed payload fields, the event
//!   whole).
//! - `keys`: per-file data keys wrapped by the tenant's key store, as Parquet key metadata that
//!   DataFusion and pyarrow both resolve.
//! - `file`: one file written and read with those keys.

pub mod columns;
pub mod file;
pub mod keys;

#[cfg(test)]
mod tests;
