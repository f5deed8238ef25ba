//! The query service: analytics, trace lookups, ad-hoc SQL and export over the archive and read
//! models. So far: analytics over the read models (`analytics`), trace lists and timelines
//! (`traces`), the archive read with DataFusion (`archive`), tenant-safe SQL over it (`sql`) and
//! its results as JSON, CSV, Arrow IPC or a table (`format`), all served over HTTP (`http`).

pub mod analytics;
pub mod archive;
pub mod export;
pub mod footers;
pub mod format;
pub mod http;
pub mod sql;
mod store;
pub mod traces;
