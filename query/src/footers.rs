//! The archive's file footers, decrypted once and kept between queries.
//!
//! DataFusion caches the footer of a plaintext file only: a decrypted footer carries the keys
//! that read its file, and its cache is shared by every reader of a runtime. Each query would
//! read and decrypt every footer of its tenant twice, once for the statistics that plan it and
//! once more to open each file. Here the footers are kept by the SQL service, apart for each
//! [`Access`] level, so that a footer decrypted with a metadata reader's keys is all a metadata
//! reader is ever given. A footer is still only handed to a session whose key factory gave it
//! the file's keys, and the session's store is still bounded to its tenants' directories.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::common::Statistics;
use datafusion::config::EncryptionFactoryOptions;
use datafusion::datasource::file_format::file_compression_type::FileCompressionType;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::file_format::{FileFormat, FileMeta};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::ParquetSource;
use datafusion::datasource::physical_plan::parquet::CachedParquetMetaData;
use datafusion::datasource::physical_plan::parquet::metadata::{
    DFParquetMetadata, ordering_from_parquet_metadata,
};
use datafusion::datasource::physical_plan::{
    FileScanConfig, FileScanConfigBuilder, FileSource, ParquetFileMetrics, ParquetFileReaderFactory,
};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::cache::Cache;
use datafusion::execution::cache::cache_manager::CachedFileMetadataEntry;
use datafusion::execution::cache::default_cache::DefaultCache;
use datafusion::execution::parquet_encryption::EncryptionFactory;
use datafusion::physical_expr::LexOrdering;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::encryption::decrypt::FileDecryptionProperties;
use parquet::errors::ParquetError;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData};

use crate::archive::{Access, ArchiveKeyFactory};

/// Decrypted footers by file, one least-recently-used cache per access level.
pub struct FooterCache {
    full: DefaultCache<Path, CachedFileMetadataEntry>,
    metadata: DefaultCache<Path, CachedFileMetadataEntry>,
}

impl FooterCache {
    /// A cache holding at most `bytes` of footers in all (half for each access level).
    pub fn new(bytes: usize) -> FooterCache {
        FooterCache {
            full: DefaultCache::new(bytes / 2).with_name("loom archive footers (full)"),
            metadata: DefaultCache::new(bytes / 2).with_name("loom archive footers (metadata)"),
        }
    }

    fn level(&self, access: Access) -> &DefaultCache<Path, CachedFileMetadataEntry> {
        match access {
            Access::Full => &self.full,
            Access::Metadata => &self.metadata,
        }
    }

    /// Drops every footer, and with them the keys they hold (after a tenant's erasure).
    pub fn clear(&self) {
        self.full.clear();
        self.metadata.clear();
    }

    /// How many files' footers are kept for readers with `access`.
    pub fn files(&self, access: Access) -> usize {
        self.level(access).len()
    }

    /// How many bytes of footers are held.
    pub fn bytes(&self) -> usize {
        self.full.memory_used() + self.metadata.memory_used()
    }

    /// The footer of `file`, decrypted with `keys`: kept, or read and kept. A full reader's
    /// footer holds the page index too (what prunes pages within a row group); a metadata
    /// reader's cannot (the index of the record column is sealed with a key it does not hold).
    async fn footer(
        &self,
        access: Access,
        store: &Arc<dyn ObjectStore>,
        file: &ObjectMeta,
        keys: Arc<FileDecryptionProperties>,
        size_hint: Option<usize>,
    ) -> Result<Arc<ParquetMetaData>> {
        let cache = self.level(access);
        if let Some(entry) = cache.get(&file.location)
            && entry.is_valid_for(file)
            && let Some(kept) = entry
                .file_metadata
                .as_any()
                .downcast_ref::<CachedParquetMetaData>()
        {
            return Ok(Arc::clone(kept.parquet_metadata()));
        }
        let page_index = match access {
            Access::Full => PageIndexPolicy::Optional,
            Access::Metadata => PageIndexPolicy::Skip,
        };
        let footer = DFParquetMetadata::new(store, file)
            .with_decryption_properties(Some(keys))
            .with_metadata_size_hint(size_hint)
            .with_page_index_policy(Some(page_index))
            .fetch_metadata()
            .await?;
        cache.put(
            &file.location,
            CachedFileMetadataEntry::new(
                file.clone(),
                Arc::new(CachedParquetMetaData::new(Arc::clone(&footer))),
            ),
        );
        Ok(footer)
    }
}

/// Parquet read through a [`FooterCache`]: DataFusion's own format for everything but where
/// footers come from.
#[derive(Debug)]
pub struct ArchiveFormat {
    parquet: ParquetFormat,
    footers: Arc<FooterCache>,
    keys: Arc<ArchiveKeyFactory>,
    access: Access,
}

impl std::fmt::Debug for FooterCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FooterCache")
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

impl ArchiveFormat {
    pub fn new(
        parquet: ParquetFormat,
        footers: Arc<FooterCache>,
        keys: Arc<ArchiveKeyFactory>,
        access: Access,
    ) -> ArchiveFormat {
        ArchiveFormat {
            parquet,
            footers,
            keys,
            access,
        }
    }

    async fn footer(
        &self,
        store: &Arc<dyn ObjectStore>,
        file: &ObjectMeta,
    ) -> Result<Arc<ParquetMetaData>> {
        let keys = self
            .keys
            .get_file_decryption_properties(&EncryptionFactoryOptions::default(), &file.location)
            .await?
            .ok_or_else(|| {
                DataFusionError::Plan(format!("{}: no keys for this file", file.location))
            })?;
        self.footers
            .footer(
                self.access,
                store,
                file,
                keys,
                self.parquet.metadata_size_hint(),
            )
            .await
    }
}

#[async_trait]
impl FileFormat for ArchiveFormat {
    fn get_ext(&self) -> String {
        self.parquet.get_ext()
    }

    fn get_ext_with_compression(&self, compression: &FileCompressionType) -> Result<String> {
        self.parquet.get_ext_with_compression(compression)
    }

    fn compression_type(&self) -> Option<FileCompressionType> {
        self.parquet.compression_type()
    }

    async fn infer_schema(
        &self,
        state: &dyn Session,
        store: &Arc<dyn ObjectStore>,
        objects: &[ObjectMeta],
    ) -> Result<SchemaRef> {
        self.parquet.infer_schema(state, store, objects).await
    }

    async fn infer_stats(
        &self,
        _state: &dyn Session,
        store: &Arc<dyn ObjectStore>,
        table_schema: SchemaRef,
        file: &ObjectMeta,
    ) -> Result<Statistics> {
        let footer = self.footer(store, file).await?;
        DFParquetMetadata::statistics_from_parquet_metadata(&footer, &table_schema)
    }

    async fn infer_ordering(
        &self,
        _state: &dyn Session,
        store: &Arc<dyn ObjectStore>,
        table_schema: SchemaRef,
        file: &ObjectMeta,
    ) -> Result<Option<LexOrdering>> {
        let footer = self.footer(store, file).await?;
        ordering_from_parquet_metadata(&footer, &table_schema)
    }

    async fn infer_stats_and_ordering(
        &self,
        _state: &dyn Session,
        store: &Arc<dyn ObjectStore>,
        table_schema: SchemaRef,
        file: &ObjectMeta,
    ) -> Result<FileMeta> {
        let footer = self.footer(store, file).await?;
        let statistics =
            DFParquetMetadata::statistics_from_parquet_metadata(&footer, &table_schema)?;
        let ordering = ordering_from_parquet_metadata(&footer, &table_schema)?;
        Ok(FileMeta::new(statistics).with_ordering(ordering))
    }

    /// DataFusion's Parquet scan, with this format's footers and key factory.
    async fn create_physical_plan(
        &self,
        state: &dyn Session,
        conf: FileScanConfig,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut source = conf
            .file_source()
            .downcast_ref::<ParquetSource>()
            .cloned()
            .ok_or_else(|| DataFusionError::Internal("expected a Parquet source".into()))?
            .with_table_parquet_options(self.parquet.options().clone());
        let store = state
            .runtime_env()
            .object_store(conf.object_store_url.clone())?;
        source = source
            .with_parquet_file_reader_factory(Arc::new(Readers {
                store,
                footers: Arc::clone(&self.footers),
                access: self.access,
            }))
            .with_encryption_factory(Arc::clone(&self.keys) as Arc<dyn EncryptionFactory>);
        if let Some(hint) = self.parquet.metadata_size_hint() {
            source = source.with_metadata_size_hint(hint);
        }
        let conf = FileScanConfigBuilder::from(conf)
            .with_source(Arc::new(source))
            .build();
        Ok(DataSourceExec::from_data_source(conf))
    }

    fn file_source(&self, table_schema: TableSchema) -> Arc<dyn FileSource> {
        self.parquet.file_source(table_schema)
    }
}

/// Opens a scan's files with their footers from the cache.
#[derive(Debug)]
struct Readers {
    store: Arc<dyn ObjectStore>,
    footers: Arc<FooterCache>,
    access: Access,
}

impl ParquetFileReaderFactory for Readers {
    fn create_reader(
        &self,
        partition_index: usize,
        file: PartitionedFile,
        size_hint: Option<usize>,
        metrics: &ExecutionPlanMetricsSet,
    ) -> Result<Box<dyn AsyncFileReader + Send>> {
        let metrics =
            ParquetFileMetrics::new(partition_index, file.object_meta.location.as_ref(), metrics);
        Ok(Box::new(Reader {
            store: Arc::clone(&self.store),
            footers: Arc::clone(&self.footers),
            access: self.access,
            file: file.object_meta,
            size_hint,
            metrics,
        }))
    }
}

struct Reader {
    store: Arc<dyn ObjectStore>,
    footers: Arc<FooterCache>,
    access: Access,
    file: ObjectMeta,
    size_hint: Option<usize>,
    metrics: ParquetFileMetrics,
}

fn parquet_error(error: impl std::error::Error + Send + Sync + 'static) -> ParquetError {
    ParquetError::External(Box::new(error))
}

impl AsyncFileReader for Reader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        self.metrics
            .bytes_scanned
            .add((range.end - range.start) as usize);
        async move {
            self.store
                .get_range(&self.file.location, range)
                .await
                .map_err(parquet_error)
        }
        .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        self.metrics.bytes_scanned.add(total as usize);
        async move {
            self.store
                .get_ranges(&self.file.location, &ranges)
                .await
                .map_err(parquet_error)
        }
        .boxed()
    }

    /// The footer, only with the keys the session's key factory gave for this file.
    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let keys = options
                .and_then(|options| options.file_decryption_properties())
                .cloned()
                .ok_or_else(|| {
                    ParquetError::General(format!("{}: no keys for this file", self.file.location))
                })?;
            self.footers
                .footer(self.access, &self.store, &self.file, keys, self.size_hint)
                .await
                .map_err(|e| ParquetError::General(format!("{}: {e}", self.file.location)))
        }
        .boxed()
    }
}
