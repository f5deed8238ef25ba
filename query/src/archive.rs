//! The archive read with DataFusion: each file's keys resolved through the key store by an
//! [`EncryptionFactory`] that reads the key metadata in the file (Loom's PKMT1 key material), for
//! one tenant; and a tenant's events as a table over exactly the files its manifest names.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::config::{EncryptionFactoryOptions, TableParquetOptions};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::parquet_encryption::EncryptionFactory;
use datafusion::prelude::SessionContext;
use loom_projector::archive::columns::SCHEMA;
use loom_projector::archive::keys::ArchiveKeys;
use loom_projector::archive::manifest::tenant_dir;
use loom_projector::archive::{Archive, Manifest};
use loom_schemas::keystore::KeyStore;
use object_store::path::Path;
use parquet::encryption::decrypt::FileDecryptionProperties;
use parquet::encryption::encrypt::FileEncryptionProperties;
use uuid::Uuid;

/// The URL the archive's object store is registered under in a session.
const ARCHIVE_URL: &str = "loom-archive://archive";

/// What of a tenant's files a reader may decrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every column, the events whole (`record`) included.
    Full,
    /// The metadata columns: aggregates, no events or bodies.
    Metadata,
}

/// Resolves the keys of one tenant's archive files through the key store; a file outside the
/// tenant's directory, or of another tenant's keys, is refused.
pub struct TenantKeys {
    keys: Arc<KeyStore>,
    tenant: Uuid,
    access: Access,
    /// `tenant_id=<tenant>`: the path segment every file of the tenant is under.
    segment: String,
}

impl TenantKeys {
    pub fn new(keys: Arc<KeyStore>, tenant: Uuid, access: Access) -> TenantKeys {
        TenantKeys {
            keys,
            tenant,
            access,
            segment: format!("tenant_id={tenant}"),
        }
    }
}

impl std::fmt::Debug for TenantKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantKeys")
            .field("tenant", &self.tenant)
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl EncryptionFactory for TenantKeys {
    async fn get_file_encryption_properties(
        &self,
        _config: &EncryptionFactoryOptions,
        _schema: &SchemaRef,
        file_path: &Path,
    ) -> Result<Option<Arc<FileEncryptionProperties>>> {
        Err(DataFusionError::Plan(format!(
            "{file_path}: the archive is written by the archiver alone"
        )))
    }

    async fn get_file_decryption_properties(
        &self,
        _config: &EncryptionFactoryOptions,
        file_path: &Path,
    ) -> Result<Option<Arc<FileDecryptionProperties>>> {
        if !file_path.parts().any(|part| part.as_ref() == self.segment) {
            return Err(DataFusionError::Plan(format!(
                "{file_path} is not a file of tenant {}",
                self.tenant
            )));
        }
        let keys = match self.access {
            Access::Full => ArchiveKeys::full(Arc::clone(&self.keys), self.tenant),
            Access::Metadata => ArchiveKeys::metadata_only(Arc::clone(&self.keys), self.tenant),
        };
        let properties = keys
            .decryption_properties()
            .map_err(|error| DataFusionError::External(Box::new(error)))?;
        Ok(Some(properties))
    }
}

/// Registers `tenant`'s archived events in `ctx` as table `name`: the files `manifest` names
/// (never an orphan, nor a file compaction replaced), every event type in one table of the
/// archive's columns, decrypted with `access`.
pub fn register_tenant_table(
    ctx: &SessionContext,
    archive: &Archive,
    manifest: &Manifest,
    keys: Arc<KeyStore>,
    access: Access,
    name: &str,
) -> Result<()> {
    let tenant = manifest.tenant;
    let base = ObjectStoreUrl::parse(ARCHIVE_URL)?;
    ctx.register_object_store(base.as_ref(), Arc::clone(&archive.store));
    let factory_id = format!("loom-{tenant}-{access:?}");
    ctx.runtime_env().register_parquet_encryption_factory(
        &factory_id,
        Arc::new(TenantKeys::new(keys, tenant, access)),
    );
    let mut parquet = TableParquetOptions::new();
    parquet.crypto.factory_id = Some(factory_id);
    // The page index is read for every column of a file, the record column's included, whose key
    // a metadata reader does not hold: such a reader prunes by row-group statistics only.
    parquet.global.enable_page_index = access == Access::Full;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default().with_options(parquet)))
        .with_file_extension(".parquet");
    let dir = tenant_dir(&archive.root, tenant);
    let urls = manifest
        .files
        .keys()
        .map(|path| ListingTableUrl::parse(format!("{ARCHIVE_URL}/{dir}/{path}")))
        .collect::<Result<Vec<_>>>()?;
    if urls.is_empty() {
        return Err(DataFusionError::Plan(format!(
            "tenant {tenant} has no archived events"
        )));
    }
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(Arc::clone(&SCHEMA));
    ctx.register_table(name, Arc::new(ListingTable::try_new(config)?))?;
    Ok(())
}
