//! The Delta table an export writes, through delta-rs: opened (or created on the first rows),
//! its watermarks read from its application transactions, its commits made with theirs.

use std::collections::HashMap;
use std::sync::{Arc, Once};

use datafusion::arrow::datatypes::SchemaRef;
use deltalake_core::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake_core::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake_core::kernel::{Action, Add, StructType, Transaction};
use deltalake_core::logstore::{
    LogStore, LogStoreFactory, StorageConfig, default_logstore, logstore_factories,
};
use deltalake_core::protocol::{DeltaOperation, SaveMode};
use deltalake_core::{DeltaTable, DeltaTableBuilder, DeltaTableError, ObjectStore};
use serde_json::Value;
use url::Url;

use super::rows::PARTITIONS;
use super::{ExportError, Target};

/// Opens the table at `target`; `None` if there is none yet.
pub async fn open(target: &Target) -> Result<Option<DeltaTable>, ExportError> {
    match builder(target)?.load().await {
        Ok(table) => Ok(Some(table)),
        Err(DeltaTableError::NotATable(_)) => Ok(None),
        Err(error) => Err(delta(target, error)),
    }
}

/// Creates the table at `target` with `schema`, partitioned by tenant and date; opens it instead
/// if another export created it meanwhile.
pub async fn create(target: &Target, schema: &SchemaRef) -> Result<DeltaTable, ExportError> {
    let columns: StructType = schema
        .as_ref()
        .try_into_kernel()
        .map_err(|e| delta(target, e.into()))?;
    let table = builder(target)?.build().map_err(|e| delta(target, e))?;
    let created = table
        .create()
        .with_table_name("loom_events")
        .with_comment("Loom's events, exported from its archive by `loom export`")
        .with_columns(columns.fields().cloned())
        .with_partition_columns(PARTITIONS)
        .with_save_mode(SaveMode::Ignore)
        .await
        .map_err(|e| delta(target, e))?;
    Ok(created)
}

/// Refuses a table whose columns are not `schema`'s (one exported with other bodies, or not by
/// Loom).
pub fn check_columns(
    target: &Target,
    table: &DeltaTable,
    schema: &SchemaRef,
) -> Result<(), ExportError> {
    let snapshot = table.snapshot().map_err(|e| delta(target, e))?;
    let theirs: Vec<String> = snapshot
        .schema()
        .fields()
        .map(|field| field.name().clone())
        .collect();
    let ours: Vec<String> = schema
        .fields()
        .iter()
        .map(|field| field.name().clone())
        .collect();
    if theirs != ours {
        return Err(ExportError::Invalid(format!(
            "the table at {target} has other columns than this export writes (it was written \
             with other --bodies, or not by Loom): export to another target"
        )));
    }
    Ok(())
}

/// The version the export application `app` last committed to `table`.
pub async fn watermark(
    target: &Target,
    table: &DeltaTable,
    app: &str,
) -> Result<Option<i64>, ExportError> {
    let snapshot = table.snapshot().map_err(|e| delta(target, e))?;
    snapshot
        .transaction_version(table.log_store().as_ref(), app)
        .await
        .map_err(|e| delta(target, e))
}

/// Commits `adds` to `table` as one version, with the application transactions `watermarks`
/// (so that the rows and how far they reach land together, or neither does).
pub async fn commit(
    target: &Target,
    table: &mut DeltaTable,
    adds: Vec<Add>,
    watermarks: Vec<Transaction>,
    metadata: HashMap<String, Value>,
) -> Result<u64, ExportError> {
    let properties = CommitProperties::default()
        .with_application_transactions(watermarks)
        .with_metadata(metadata);
    let operation = DeltaOperation::Write {
        mode: SaveMode::Append,
        partition_by: Some(PARTITIONS.map(String::from).to_vec()),
        predicate: None,
    };
    let snapshot = table.snapshot().map_err(|e| delta(target, e))?;
    let finalized = CommitBuilder::from(properties)
        .with_actions(adds.into_iter().map(Action::Add).collect())
        .build(Some(snapshot), table.log_store(), operation)
        .await
        .map_err(|e| delta(target, e))?;
    let version = finalized.version();
    table.state = Some(finalized.snapshot());
    Ok(version)
}

fn builder(target: &Target) -> Result<DeltaTableBuilder, ExportError> {
    let builder = DeltaTableBuilder::from_url(target.url.clone()).map_err(|e| delta(target, e))?;
    Ok(match &target.store {
        Some(store) => {
            register_s3();
            builder.with_storage_backend(Arc::clone(store), target.url.clone())
        }
        None => builder,
    })
}

fn delta(target: &Target, error: DeltaTableError) -> ExportError {
    ExportError::Table {
        target: target.to_string(),
        message: error.to_string(),
    }
}

/// delta-rs writes each commit create-only (`PutMode::Create`), which S3 and compatible servers
/// honour with conditional writes: the default log store is right for `s3://` tables too, given
/// the archive's own S3 client (so that its settings apply) rather than delta-rs's AWS crates.
fn register_s3() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| {
        if let Ok(scheme) = Url::parse("s3://") {
            logstore_factories().insert(scheme, Arc::new(CreateOnlyLogStore));
        }
    });
}

struct CreateOnlyLogStore;

impl LogStoreFactory for CreateOnlyLogStore {
    fn with_options(
        &self,
        prefixed_store: Arc<dyn ObjectStore>,
        root_store: Arc<dyn ObjectStore>,
        location: &Url,
        options: &StorageConfig,
    ) -> deltalake_core::DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}
