//! The query service: analytics, trace lookups, ad-hoc SQL and export over the archive and read
//! models. So far: the archive read with DataFusion (`archive`).

pub mod archive;
