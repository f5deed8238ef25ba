//! The archive read with DataFusion: each file's keys resolved through the key store by an
//! [`EncryptionFactory`] that reads the key metadata in the file (Loom's PKMT1 key material), for
//! one tenant or all; and the events as a table over exactly the files the manifests name.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::config::{EncryptionFactoryOptions, TableParquetOptions};
use datafusion::datasource::empty::EmptyTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::parquet_encryption::EncryptionFactory;
use datafusion::prelude::SessionContext;
use loom_projector::archive::columns::{RECORD, SCHEMA};
use loom_projector::archive::keys::ArchiveKeys;
use loom_projector::archive::manifest::tenant_dir;
use loom_projector::archive::{Archive, Manifest};
use loom_schemas::keystore::KeyStore;
use loom_schemas::roles::{Permission, Role};
use object_store::path::Path;
use parquet::encryption::decrypt::FileDecryptionProperties;
use parquet::encryption::encrypt::FileEncryptionProperties;
use uuid::Uuid;

use crate::footers::{ArchiveFormat, FooterCache};
use crate::store::BoundedStore;

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

impl Access {
    /// What a key with `role` reads: everything for the roles that may read bodies (developer
    /// and up), the metadata columns only for the rest (viewer).
    pub fn for_role(role: Role) -> Access {
        match role.allows(Permission::ReadBodies) {
            true => Access::Full,
            false => Access::Metadata,
        }
    }
}

/// Whose files a session may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One tenant's.
    Tenant(Uuid),
    /// Every tenant's (the operator).
    AllTenants,
}

/// Resolves the keys of archive files through the key store: the tenant of a file is the
/// `tenant_id=<T>` segment of its path, refused if outside the scope, and the key metadata in the
/// file must name that same tenant's keys (else the key store refuses them).
pub struct ArchiveKeyFactory {
    keys: Arc<KeyStore>,
    scope: Scope,
    access: Access,
}

impl ArchiveKeyFactory {
    pub fn new(keys: Arc<KeyStore>, scope: Scope, access: Access) -> ArchiveKeyFactory {
        ArchiveKeyFactory {
            keys,
            scope,
            access,
        }
    }
}

impl std::fmt::Debug for ArchiveKeyFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveKeyFactory")
            .field("scope", &self.scope)
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

/// The tenant whose directory (`tenant_id=<T>`) `path` is in.
fn tenant_of(path: &Path) -> Option<Uuid> {
    path.parts()
        .find_map(|part| Uuid::parse_str(part.as_ref().strip_prefix("tenant_id=")?).ok())
}

#[async_trait]
impl EncryptionFactory for ArchiveKeyFactory {
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
        let tenant = match (tenant_of(file_path), self.scope) {
            (Some(found), Scope::Tenant(tenant)) if found == tenant => tenant,
            (Some(found), Scope::AllTenants) => found,
            _ => {
                return Err(DataFusionError::Plan(format!(
                    "{file_path} is not a file this session may read"
                )));
            }
        };
        let keys = match self.access {
            Access::Full => ArchiveKeys::full(Arc::clone(&self.keys), tenant),
            Access::Metadata => ArchiveKeys::metadata_only(Arc::clone(&self.keys), tenant),
        };
        let properties = keys
            .decryption_properties()
            .map_err(|error| DataFusionError::External(Box::new(error)))?;
        Ok(Some(properties))
    }
}

/// The archive's columns a reader with `access` sees: without the record column for
/// [`Access::Metadata`].
pub fn schema(access: Access) -> SchemaRef {
    match access {
        Access::Full => Arc::clone(&SCHEMA),
        Access::Metadata => Arc::new(Schema::new(
            SCHEMA
                .fields()
                .iter()
                .filter(|field| field.name() != RECORD)
                .cloned()
                .collect::<Vec<_>>(),
        )),
    }
}

/// How much of a file's end is fetched at first for its footer.
const FOOTER_HINT_BYTES: usize = 64 << 10;

/// Registers the archived events of `manifests`' tenants in `ctx` as table `name`: the files the
/// manifests name (never an orphan, nor a file compaction replaced), every event type in one
/// table of the archive's columns, decrypted with `access`, their footers kept in `footers`. The
/// session's object store is the archive's, bounded to those tenants' directories. A `lookup`
/// table reads the columns of its filters before any other.
#[allow(clippy::too_many_arguments)]
pub fn register_events(
    ctx: &SessionContext,
    archive: &Archive,
    manifests: &[Manifest],
    keys: Arc<KeyStore>,
    footers: Arc<FooterCache>,
    scope: Scope,
    access: Access,
    name: &str,
    lookup: bool,
) -> Result<()> {
    let dirs: Vec<Path> = manifests
        .iter()
        .map(|manifest| tenant_dir(&archive.root, manifest.tenant))
        .collect();
    let base = ObjectStoreUrl::parse(ARCHIVE_URL)?;
    let files = manifests.iter().zip(&dirs).flat_map(|(manifest, dir)| {
        manifest.files.values().filter_map(move |file| {
            Some((
                Path::parse(format!("{dir}/{}", file.path)).ok()?,
                file.bytes,
            ))
        })
    });
    ctx.register_object_store(
        base.as_ref(),
        Arc::new(BoundedStore::new(Arc::clone(&archive.store), dirs.clone()).with_files(files)),
    );
    let factory_id = match scope {
        Scope::Tenant(tenant) => format!("loom-{tenant}-{access:?}"),
        Scope::AllTenants => format!("loom-all-{access:?}"),
    };
    let key_factory = Arc::new(ArchiveKeyFactory::new(keys, scope, access));
    ctx.runtime_env()
        .register_parquet_encryption_factory(&factory_id, Arc::clone(&key_factory) as _);
    let mut parquet = TableParquetOptions::new();
    parquet.crypto.factory_id = Some(factory_id);
    // The page index is read for every column of a file, the record column's included, whose key
    // a metadata reader does not hold: such a reader prunes by row-group statistics only.
    parquet.global.enable_page_index = access == Access::Full;
    // A lookup's filter is evaluated on its own columns first (the digest, then the trace id):
    // of a row group its bloom filter admits, the other columns are read only in the pages that
    // hold the trace's rows. At 10M events this halved an archived lookup's p99; queries that
    // read most rows gain nothing from it.
    parquet.global.pushdown_filters = lookup;
    parquet.global.reorder_filters = lookup;
    // DataFusion fetches the last 512 KiB of a file to find its footer: most of a small file
    // (a file's footer, its columns' metadata encrypted, is some tens of KiB).
    parquet.global.metadata_size_hint = Some(FOOTER_HINT_BYTES);
    let format = ArchiveFormat::new(
        ParquetFormat::default().with_options(parquet),
        footers,
        key_factory,
        access,
    );
    let options = ListingOptions::new(Arc::new(format)).with_file_extension(".parquet");
    let mut urls = Vec::new();
    for (manifest, dir) in manifests.iter().zip(&dirs) {
        for path in manifest.files.keys() {
            urls.push(ListingTableUrl::parse(format!(
                "{ARCHIVE_URL}/{dir}/{path}"
            ))?);
        }
    }
    let table: Arc<dyn TableProvider> = if urls.is_empty() {
        // Nothing archived yet: an empty table of the same columns, so queries still plan.
        Arc::new(EmptyTable::new(schema(access)))
    } else {
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .with_schema(schema(access));
        Arc::new(ListingTable::try_new(config)?)
    };
    ctx.register_table(name, table)?;
    Ok(())
}
