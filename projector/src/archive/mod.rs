//! The archive: every event of the log, per tenant, as encrypted Parquet files on object storage
//! (a local directory by default, S3 in production) — the log's cold tier, which outlives Kafka's
//! retention, feeds the query service and replays the whole history.
//!
//! Layout, under the archive's root:
//!
//! ```text
//! tenant_id=<T>/_manifest/000000000000.json   the tenant's hash-chained manifest
//! tenant_id=<T>/date=YYYY-MM-DD/<id>.parquet  files the manifest names (others are ignored)
//! _archiver/checkpoint.json                   where the archiver restarts reading (a hint)
//! ```
//!
//! Control-plane events and requests no tenant was resolved for go to the nil tenant
//! (`tenant_id=00000000-…`), under keys of their own: erasing a tenant shreds its data, not the
//! record that it existed and was erased.
//!
//! - `columns`: the one table's columns (envelope, log position, typed payload fields, the event
//!   whole).
//! - `keys`: per-file data keys wrapped by the tenant's key store, as Parquet key metadata that
//!   DataFusion and pyarrow both resolve.
//! - `file`: one file written and read with those keys.
//! - `manifest`: which files exist, per tenant, as an append-only hash chain.
//! - `archiver`: the projector that writes them, exactly once.
//! - `compact`, `verify`, `read`: merging small files, checking every chain and file, and reading
//!   events back in log order (replay).

pub mod archiver;
pub mod columns;
pub mod compact;
pub mod file;
pub mod keys;
pub mod location;
pub mod manifest;
pub mod read;
pub mod verify;

use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use uuid::Uuid;

pub use archiver::{ArchiveConfig, Archiver};
pub use location::{ArchiveLocation, S3Options};
pub use manifest::{Manifest, ManifestError};

/// The tenant control-plane events and tenant-less requests are archived under.
pub const SYSTEM_TENANT: Uuid = Uuid::nil();

/// An opened archive: its object store and the prefix it lives under.
#[derive(Debug, Clone)]
pub struct Archive {
    pub store: Arc<dyn ObjectStore>,
    pub root: Path,
}

impl Archive {
    pub fn open(location: &ArchiveLocation) -> Result<Archive, location::LocationError> {
        let (store, root) = location.open()?;
        Ok(Archive { store, root })
    }

    /// The tenants that have a directory in the archive.
    pub async fn tenants(&self) -> Result<Vec<Uuid>, ManifestError> {
        manifest::tenants(self.store.as_ref(), &self.root).await
    }

    /// A tenant's manifest, read and checked.
    pub async fn manifest(&self, tenant: Uuid) -> Result<Manifest, ManifestError> {
        Manifest::load(self.store.as_ref(), &self.root, tenant).await
    }

    /// Where a file a manifest names (`date=…/<id>.parquet`) is.
    pub fn file_path(&self, tenant: Uuid, path: &str) -> Path {
        let mut full = manifest::tenant_dir(&self.root, tenant);
        for part in path.split('/') {
            full = full.join(part);
        }
        full
    }

    pub async fn get(&self, path: &Path) -> Result<Bytes, object_store::Error> {
        self.store.get(path).await?.bytes().await
    }

    pub async fn put(&self, path: &Path, bytes: Bytes) -> Result<(), object_store::Error> {
        self.store
            .put(path, PutPayload::from(bytes))
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests;
